//! The application: builds every role from a [`Config`], binds the listener
//! (port 0 works: tests read the bound port back) and runs until stopped.

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use tokio::net::TcpListener;
use tokio::task::JoinSet;
use tokio_util::sync::CancellationToken;

use crate::bus::{self, MessageBus};
use crate::config::{Config, Role};
use crate::gateway::{self, Gateway};
use crate::http::{self, HttpState};
use crate::ids::IdGen;
use crate::store::Store;
use crate::workers;

/// Errors that stop the application from starting.
#[derive(Debug, thiserror::Error)]
pub enum AppError {
    #[error(transparent)]
    Bus(#[from] bus::BusError),
    #[error(transparent)]
    Auth(#[from] crate::auth::AuthError),
    #[error(transparent)]
    Store(#[from] crate::store::StoreError),
    #[error("cannot bind {0}: {1}")]
    Bind(SocketAddr, std::io::Error),
    #[error("server error: {0}")]
    Serve(std::io::Error),
}

pub struct Application {
    listener: TcpListener,
    http: HttpState,
    tcp_nodelay: bool,
    /// Worker tasks; a JoinSet aborts them all if the application is dropped
    /// (a crash), so no role outlives its process.
    workers: JoinSet<()>,
}

impl Application {
    /// Connects the configured bus and DB, then builds.
    pub async fn build(cfg: Config) -> Result<Application, AppError> {
        let bus = bus::connect(&cfg.bus).await?;
        Self::build_with_bus(cfg, bus).await
    }

    /// Builds on an existing bus (tests share one memory bus between two
    /// instances this way).
    pub async fn build_with_bus(
        cfg: Config,
        bus: Arc<dyn MessageBus>,
    ) -> Result<Application, AppError> {
        let auth = crate::auth::Authenticator::from_config(&cfg.auth)?;
        if cfg.has_role(Role::Gateway) && auth.is_open() {
            tracing::warn!(
                "authentication is OFF: any client may connect under any name \
                 (set AUTH_JWT_SECRET or AUTH_JWT_PUBLIC_KEY to require tokens)"
            );
        }
        let store = Store::connect(&cfg.database_url).await?;
        let instance = cfg
            .instance_id
            .clone()
            .unwrap_or_else(|| format!("relay-{}", ulid::Ulid::new().to_string().to_lowercase()));
        let listener = TcpListener::bind(cfg.bind)
            .await
            .map_err(|e| AppError::Bind(cfg.bind, e))?;
        let shutdown = CancellationToken::new();
        let ids = Arc::new(IdGen::default());
        let gateway = Arc::new(Gateway::new(
            bus.clone(),
            store.clone(),
            ids.clone(),
            cfg.limits.clone(),
            cfg.presence.clone(),
            instance.clone(),
            shutdown.clone(),
        ));
        let mut workers = JoinSet::new();
        let mut role_ready = Vec::new();

        if cfg.has_role(Role::Gateway) {
            let (live_tx, live_rx) = tokio::sync::watch::channel(false);
            role_ready.push(("live_delivery", live_rx.clone()));
            workers.spawn(gateway::presence::run(
                gateway.clone(),
                live_rx,
                shutdown.clone(),
            ));
            workers.spawn(gateway::live::run(
                gateway.clone(),
                format!("live-{instance}"),
                live_tx,
                shutdown.clone(),
            ));
        }
        if cfg.has_role(Role::Gateway) {
            // `send` dedupe claims live for the window, then go: the table
            // holds at most one window of sends.
            let (store, stop) = (store.clone(), shutdown.clone());
            let window = cfg.limits.send_dedupe_window_ms as i64;
            workers.spawn(async move {
                let mut tick = tokio::time::interval(Duration::from_secs(60));
                loop {
                    tokio::select! {
                        _ = stop.cancelled() => break,
                        _ = tick.tick() => {}
                    }
                    if let Err(e) = store.prune_sends(window).await {
                        tracing::warn!(error = %e, "send dedupe: prune failed");
                    }
                }
            });
        }
        if cfg.has_role(Role::Persist) {
            let (tx, rx) = tokio::sync::watch::channel(false);
            role_ready.push(("persist", rx));
            workers.spawn(workers::persist::run(
                bus.clone(),
                store.clone(),
                cfg.persist.clone(),
                tx,
                shutdown.clone(),
            ));
        }
        if cfg.has_role(Role::Analytics) {
            let (tx, rx) = tokio::sync::watch::channel(false);
            role_ready.push(("analytics", rx));
            workers.spawn(workers::analytics::run(
                bus.clone(),
                store.clone(),
                cfg.analytics.clone(),
                instance.clone(),
                ids.clone(),
                tx,
                shutdown.clone(),
            ));
        }
        // Serve only once every role's consumer is subscribed, so nothing a
        // first client sends is missed by a role that was still joining.
        for (name, rx) in &role_ready {
            let mut rx = rx.clone();
            if tokio::time::timeout(Duration::from_secs(30), rx.wait_for(|r| *r))
                .await
                .is_err()
            {
                tracing::warn!(
                    role = name,
                    "role not subscribed after 30 s; serving anyway (see /readyz)"
                );
            }
        }
        tracing::info!(
            %instance,
            bus = bus.backend(),
            db = store.kind(),
            roles = ?cfg.roles,
            addr = %listener.local_addr().map_err(AppError::Serve)?,
            "chat-relay started"
        );
        let http = HttpState {
            gateway,
            auth: Arc::new(auth),
            allowed_origins: cfg.auth.allowed_origins.clone().into(),
            conns_per_ip: Arc::default(),
            role_ready: role_ready.into(),
            lag_groups: [cfg.persist.group.clone(), cfg.analytics.group.clone()].into(),
            serve_gateway: cfg.has_role(Role::Gateway),
            static_dir: cfg.static_dir.clone(),
            stomp: cfg.stomp.clone(),
        };
        Ok(Application {
            listener,
            http,
            tcp_nodelay: cfg.tcp_nodelay,
            workers,
        })
    }

    pub fn port(&self) -> u16 {
        self.listener.local_addr().map(|a| a.port()).unwrap_or(0)
    }

    pub fn instance(&self) -> &str {
        &self.http.gateway.instance
    }

    pub fn store(&self) -> Store {
        self.http.gateway.store.clone()
    }

    /// Cancelling this token stops the application gracefully.
    pub fn shutdown_token(&self) -> CancellationToken {
        self.http.gateway.shutdown.clone()
    }

    /// Serves until the shutdown token is cancelled, then: sockets get a close
    /// frame, the persistence batch in flight is written and acked, the bus is
    /// flushed and closed.
    pub async fn run_until_stopped(self) -> Result<(), AppError> {
        let Application {
            listener,
            http,
            tcp_nodelay: nodelay,
            workers,
        } = self;
        let shutdown = http.gateway.shutdown.clone();
        let bus = http.gateway.bus.clone();
        let store = http.gateway.store.clone();
        let router = http::router(http);
        // TCP_NODELAY: chat frames are small and latency-bound. With Nagle on,
        // a frame written while the previous one is unacknowledged waits for
        // the peer's (possibly delayed, up to 40 ms) ACK.
        use axum::serve::ListenerExt;
        let listener = listener.tap_io(move |tcp| {
            if let Err(e) = tcp.set_nodelay(nodelay) {
                tracing::debug!(error = %e, "TCP_NODELAY not set");
            }
        });
        let served = axum::serve(
            listener,
            router.into_make_service_with_connect_info::<SocketAddr>(),
        )
        .with_graceful_shutdown(shutdown.clone().cancelled_owned())
        .await;
        shutdown.cancel();
        let mut workers = workers;
        let _ = tokio::time::timeout(Duration::from_secs(15), async {
            while workers.join_next().await.is_some() {}
        })
        .await;
        bus.close().await;
        store.close().await;
        tracing::info!("chat-relay stopped");
        served.map_err(AppError::Serve)
    }
}
