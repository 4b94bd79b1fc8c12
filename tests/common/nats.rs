//! NATS test support: [`Cleanup`] deletes a test's JetStream stream (and with
//! it every consumer on it) when it drops — also when the test panics — and
//! [`NatsServer`] is a private `nats-server -js` on a free port with its own
//! store directory, for tests that kill and restart the server.
use std::process::Stdio;
use std::sync::Arc;
use std::time::Duration;

use async_trait::async_trait;
use chat_relay::bus::nats::{NatsBus, NatsConfig};
use chat_relay::bus::{
    BusError, Capabilities, Confirm, ConsumerLag, MessageBus, Outgoing, SubscribeOptions,
    Subscription,
};
use tokio::process::{Child, Command};

/// A test's own stream, subject prefix and consumer prefix, from `tag`.
pub fn config(tag: &str) -> NatsConfig {
    NatsConfig {
        nats_stream: format!("test-{tag}"),
        nats_subject_prefix: format!("test.{tag}"),
        nats_consumer_prefix: format!("test-{tag}-"),
        nats_reconnect_max_ms: 500,
        ..Default::default()
    }
}

/// Deletes stream `stream` on `url` when dropped.
pub struct Cleanup {
    url: String,
    stream: String,
}

impl Cleanup {
    pub fn new(cfg: &NatsConfig) -> Cleanup {
        Cleanup {
            url: cfg.nats_url.clone(),
            stream: cfg.nats_stream.clone(),
        }
    }
}

impl Drop for Cleanup {
    fn drop(&mut self) {
        let (url, stream) = (self.url.clone(), self.stream.clone());
        // Drop may run inside the test's runtime: use a thread of its own.
        let done = std::thread::spawn(move || {
            let rt = tokio::runtime::Builder::new_current_thread()
                .enable_all()
                .build()
                .ok()?;
            rt.block_on(async {
                let client =
                    tokio::time::timeout(Duration::from_secs(3), async_nats::connect(url.as_str()))
                        .await
                        .ok()?
                        .ok()?;
                let js = async_nats::jetstream::new(client);
                match js.delete_stream(&stream).await {
                    Ok(_) => Some(()),
                    // Never created (the test failed before connecting).
                    Err(e) if e.to_string().contains("not found") => Some(()),
                    Err(_) => None,
                }
            })
        })
        .join();
        if !matches!(done, Ok(Some(()))) {
            eprintln!("NATS stream {} was not deleted", self.stream);
        }
    }
}

pub async fn connect(cfg: NatsConfig) -> NatsBus {
    let url = cfg.nats_url.clone();
    NatsBus::connect(cfg)
        .await
        .unwrap_or_else(|e| panic!("NATS at {url} is unreachable: {e}"))
}

/// A NATS bus whose stream is deleted with it.
pub struct CleanBus {
    pub bus: Arc<NatsBus>,
    _cleanup: Cleanup,
}

impl CleanBus {
    pub async fn new(cfg: NatsConfig) -> CleanBus {
        let cleanup = Cleanup::new(&cfg);
        CleanBus {
            bus: Arc::new(connect(cfg).await),
            _cleanup: cleanup,
        }
    }
}

impl std::ops::Deref for CleanBus {
    type Target = NatsBus;
    fn deref(&self) -> &NatsBus {
        &self.bus
    }
}

#[async_trait]
impl MessageBus for CleanBus {
    fn backend(&self) -> &'static str {
        self.bus.backend()
    }
    fn capabilities(&self) -> Capabilities {
        self.bus.capabilities()
    }
    async fn publish(&self, msg: Outgoing) -> Result<(), BusError> {
        self.bus.publish(msg).await
    }
    async fn submit(&self, msg: Outgoing) -> Result<Confirm, BusError> {
        self.bus.submit(msg).await
    }
    async fn subscribe(&self, opts: SubscribeOptions) -> Result<Subscription, BusError> {
        self.bus.subscribe(opts).await
    }
    async fn ready(&self) -> Result<(), BusError> {
        self.bus.ready().await
    }
    async fn close(&self) {
        self.bus.close().await
    }
    fn consumer_lag(&self) -> Option<&dyn ConsumerLag> {
        self.bus.consumer_lag()
    }
}

/// A private `nats-server -js` on a free port with its own `-sd` directory
/// (file storage survives a SIGKILL, like a real server's disk). Killed when dropped.
pub struct NatsServer {
    pub port: u16,
    dir: tempfile::TempDir,
    child: Option<Child>,
}

impl NatsServer {
    pub async fn start() -> NatsServer {
        let port = super::free_port();
        let mut s = NatsServer {
            port,
            dir: tempfile::tempdir().expect("tempdir"),
            child: None,
        };
        s.restart().await;
        s
    }

    pub fn url(&self) -> String {
        format!("nats://127.0.0.1:{}", self.port)
    }

    pub async fn restart(&mut self) {
        let bin = std::env::var("NATS_SERVER_BIN").unwrap_or_else(|_| "nats-server".into());
        let sd = self.dir.path().join("js");
        let log = self.dir.path().join("nats.log");
        let child = Command::new(&bin)
            .args([
                "-a",
                "127.0.0.1",
                "-p",
                &self.port.to_string(),
                "-js",
                "-sd",
            ])
            .arg(&sd)
            .arg("-l")
            .arg(&log)
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .kill_on_drop(true)
            .spawn()
            .unwrap_or_else(|e| panic!("cannot start {bin} (run scripts/services.sh): {e}"));
        self.child = Some(child);
        for _ in 0..100 {
            if tokio::net::TcpStream::connect(("127.0.0.1", self.port))
                .await
                .is_ok()
            {
                return;
            }
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
        let log = std::fs::read_to_string(&log).unwrap_or_default();
        panic!("nats-server did not listen on {}: {log}", self.port);
    }

    /// SIGKILL: no clean shutdown, as in a crash.
    pub async fn kill(&mut self) {
        if let Some(mut c) = self.child.take() {
            let _ = c.kill().await;
            let _ = c.wait().await;
        }
    }
}
