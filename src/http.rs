//! HTTP routes: the WebSocket endpoint, history, stats, health and metrics.

use std::net::SocketAddr;
use std::sync::atomic::Ordering;
use std::sync::{Arc, OnceLock};

use axum::Json;
use axum::Router;
use axum::extract::{ConnectInfo, Path, Query, State, WebSocketUpgrade};
use axum::http::{HeaderMap, StatusCode};
use axum::response::{IntoResponse, Response};
use axum::routing::get;
use metrics_exporter_prometheus::{PrometheusBuilder, PrometheusHandle};
use serde::Deserialize;
use serde_json::json;
use tower_http::trace::TraceLayer;

use crate::auth::{self, Authenticator, ConnCounter, Identity, RoomPolicy};
use crate::bus::MessageBus;
use crate::gateway::{Gateway, conn, stomp};
use crate::protocol::{ErrorCode, RoomId, valid_user};
use crate::store::Store;

/// What the HTTP handlers need; built once by the application.
#[derive(Clone)]
pub struct HttpState {
    /// The gateway's context: `/ws` connections, `POST` publishing, stats.
    pub gateway: Arc<Gateway>,
    pub auth: Arc<Authenticator>,
    /// Browser origins allowed to open `/ws` (`ALLOWED_ORIGINS`).
    pub allowed_origins: Arc<[String]>,
    pub conns_per_ip: Arc<ConnCounter>,
    /// Per role: is its consumer subscribed (drives `/readyz`)?
    pub role_ready: Arc<[(&'static str, tokio::sync::watch::Receiver<bool>)]>,
    /// Consumer groups whose lag `/metrics` reports where the bus knows it.
    pub lag_groups: Arc<[String]>,
    /// This process runs the gateway role: serve `/ws` and the browser client.
    pub serve_gateway: bool,
    /// Directory served at `/` instead of the embedded client (development).
    pub static_dir: Option<String>,
    /// The STOMP endpoint's settings (`STOMP_PATH`, heart-beats, limits).
    pub stomp: crate::config::StompConfig,
}

impl HttpState {
    fn bus(&self) -> &dyn MessageBus {
        self.gateway.bus.as_ref()
    }
    fn store(&self) -> &Store {
        &self.gateway.store
    }
}

/// The process-wide Prometheus recorder (installed once; several
/// applications in one test process share it).
pub fn metrics_handle() -> PrometheusHandle {
    static HANDLE: OnceLock<PrometheusHandle> = OnceLock::new();
    HANDLE
        .get_or_init(|| {
            let builder = PrometheusBuilder::new()
                .set_buckets(&[
                    0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0,
                ])
                .unwrap_or_else(|_| PrometheusBuilder::new());
            match builder.install_recorder() {
                Ok(h) => {
                    // Histogram samples pile up in the recorder until a scrape
                    // or an upkeep drains them into buckets: without this, a
                    // relay nobody scrapes grows by every recorded sample.
                    let upkeep = h.clone();
                    let _ = std::thread::Builder::new()
                        .name("metrics-upkeep".into())
                        .spawn(move || {
                            loop {
                                std::thread::sleep(std::time::Duration::from_secs(5));
                                upkeep.run_upkeep();
                            }
                        });
                    h
                }
                // Another recorder is installed: render an empty registry.
                Err(_) => PrometheusBuilder::new().build_recorder().handle(),
            }
        })
        .clone()
}

pub fn router(state: HttpState) -> Router {
    let _ = metrics_handle();
    let mut r = Router::new()
        .route("/healthz", get(|| async { "ok" }))
        .route("/readyz", get(readyz))
        .route("/metrics", get(metrics))
        .route("/api/stats", get(stats))
        .route(
            "/api/rooms/{room}/messages",
            get(history).post(post_message),
        );
    if state.serve_gateway {
        if !state.stomp.stomp_path.is_empty() {
            r = r.route(&state.stomp.stomp_path, get(stomp));
        }
        r = r
            .route("/ws", get(ws))
            .merge(crate::assets::client_service(state.static_dir.as_deref()));
    }
    r.layer(TraceLayer::new_for_http()).with_state(state)
}

/// A refusal: an HTTP status with `{"error":{"code":…,"message":…}}`, the
/// code from the one vocabulary the WebSocket error frames use too.
fn error(status: StatusCode, code: ErrorCode, message: &str) -> Response {
    (
        status,
        Json(json!({"error": {"code": code.as_str(), "message": message}})),
    )
        .into_response()
}

#[derive(Deserialize)]
struct WsParams {
    user: Option<String>,
    token: Option<String>,
}

/// The refusals every WebSocket upgrade (`/ws`, `/stomp`) answers before
/// anything else: 503 while shutting down, 403 for a foreign origin.
fn refuse_upgrade(state: &HttpState, headers: &HeaderMap) -> Option<Response> {
    if state.gateway.shutdown.is_cancelled() {
        return Some(error(
            StatusCode::SERVICE_UNAVAILABLE,
            ErrorCode::ShuttingDown,
            "server is shutting down",
        ));
    }
    if !auth::origin_allowed(&state.allowed_origins, headers) {
        metrics::counter!("ws_rejected_total", "reason" => "origin").increment(1);
        return Some(error(
            StatusCode::FORBIDDEN,
            ErrorCode::ForbiddenOrigin,
            "this origin may not open a WebSocket here (see ALLOWED_ORIGINS)",
        ));
    }
    None
}

/// One of the caller's per-IP connection slots, or 429.
fn conn_slot(state: &HttpState, peer: SocketAddr) -> Result<auth::ConnSlot, Box<Response>> {
    let max = state.gateway.limits.max_conns_per_ip;
    state
        .conns_per_ip
        .try_acquire(peer.ip(), max)
        .ok_or_else(|| {
            metrics::counter!("ws_rejected_total", "reason" => "conns_per_ip").increment(1);
            Box::new(error(
                StatusCode::TOO_MANY_REQUESTS,
                ErrorCode::TooManyConnections,
                &format!("at most {max} connections per IP address"),
            ))
        })
}

/// The socket's frame limit and buffers, the same for both protocols.
fn sized(upgrade: WebSocketUpgrade, limits: &crate::config::Limits) -> WebSocketUpgrade {
    upgrade
        .max_message_size(limits.max_frame_bytes)
        .max_frame_size(limits.max_frame_bytes)
        // Small buffers: most sockets are idle and each buffer is per connection.
        .read_buffer_size(1024)
        .write_buffer_size(2 * 1024)
        .max_write_buffer_size(limits.max_frame_bytes.max(64 * 1024) * 16)
}

/// The WebSocket upgrade. Refusals happen here, before the upgrade, as HTTP
/// statuses with a JSON body: 403 foreign origin, 401 missing/bad token,
/// 429 too many connections from one IP, 503 shutting down.
async fn ws(
    State(state): State<HttpState>,
    Query(p): Query<WsParams>,
    ConnectInfo(peer): ConnectInfo<SocketAddr>,
    headers: HeaderMap,
    upgrade: WebSocketUpgrade,
) -> Response {
    if let Some(refused) = refuse_upgrade(&state, &headers) {
        return refused;
    }
    let user = match state
        .auth
        .verify(auth::token_from(&headers, p.token.as_deref()))
    {
        // The name comes from the token; `?user=` is ignored.
        Ok(Some(id)) => Ok(conn::Session {
            user: id.user,
            rooms: id.rooms,
            expires_at: id.expires_at,
        }),
        Ok(None) => match p.user {
            Some(u) if valid_user(&u) => Ok(conn::Session {
                user: u,
                rooms: RoomPolicy::any(),
                expires_at: None,
            }),
            Some(_) => Err("user name must be 1-32 characters, no control characters".to_string()),
            None => Err("missing ?user=<name>".to_string()),
        },
        Err(e) => {
            metrics::counter!("ws_rejected_total", "reason" => "auth").increment(1);
            return error(
                StatusCode::UNAUTHORIZED,
                ErrorCode::Unauthorized,
                &e.to_string(),
            );
        }
    };
    let slot = match conn_slot(&state, peer) {
        Ok(s) => s,
        Err(refused) => return *refused,
    };
    let limits = state.gateway.limits.clone();
    sized(upgrade, &limits).on_upgrade(move |socket| conn::serve(socket, user, state.gateway, slot))
}

/// The STOMP endpoint's upgrade: the same refusals as `/ws` (origin, per-IP
/// slots, shutdown) as HTTP statuses; who the caller is is settled by the
/// `CONNECT` frame (or `?token=`/`?user=`/`Authorization` here, for clients
/// that cannot set STOMP headers).
async fn stomp(
    State(state): State<HttpState>,
    Query(p): Query<WsParams>,
    ConnectInfo(peer): ConnectInfo<SocketAddr>,
    headers: HeaderMap,
    upgrade: WebSocketUpgrade,
) -> Response {
    if let Some(refused) = refuse_upgrade(&state, &headers) {
        return refused;
    }
    let slot = match conn_slot(&state, peer) {
        Ok(s) => s,
        Err(refused) => return *refused,
    };
    let up = stomp::session::Upgrade {
        token: auth::token_from(&headers, p.token.as_deref()).map(str::to_string),
        user: p.user,
    };
    let (gw, auth, cfg) = (state.gateway, state.auth, state.stomp);
    let limits = gw.limits.clone();
    sized(upgrade.protocols(stomp::session::SUBPROTOCOLS), &limits)
        .on_upgrade(move |socket| stomp::session::serve(socket, up, gw, auth, cfg, slot))
}

async fn readyz(State(state): State<HttpState>) -> Response {
    let bus = state.bus().ready().await;
    let db = state.store().ping().await;
    let mut roles_ok = true;
    let mut roles = serde_json::Map::new();
    for (name, rx) in state.role_ready.iter() {
        let ok = *rx.borrow();
        roles_ok &= ok;
        roles.insert(
            (*name).into(),
            (if ok { "ok" } else { "not subscribed" }).into(),
        );
    }
    let body = json!({
        "bus": bus.as_ref().map(|_| "ok".to_string()).unwrap_or_else(|e| e.to_string()),
        "db": db.as_ref().map(|_| "ok".to_string()).unwrap_or_else(|e| e.to_string()),
        "roles": roles,
        "backend": state.bus().backend(),
    });
    let status = if bus.is_ok() && db.is_ok() && roles_ok && !state.gateway.shutdown.is_cancelled()
    {
        StatusCode::OK
    } else {
        StatusCode::SERVICE_UNAVAILABLE
    };
    (status, Json(body)).into_response()
}

async fn metrics(State(state): State<HttpState>) -> Response {
    if let Some(lags) = state.bus().consumer_lag() {
        for g in state.lag_groups.iter() {
            if let Some(lag) = lags.lag(g).await {
                metrics::gauge!("bus_consumer_lag", "group" => g.clone()).set(lag as f64);
            }
        }
    }
    metrics::gauge!("local_rooms").set(state.gateway.rooms.local_rooms() as f64);
    metrics::gauge!("runtime_worker_threads")
        .set(tokio::runtime::Handle::current().metrics().num_workers() as f64);
    metrics_handle().render().into_response()
}

/// The caller of an HTTP request on `room`, from its bearer token: `None`
/// when authentication is off; 401 for a missing or bad token, 403 when the
/// token's `rooms` claim does not allow the room.
fn caller_for_room(
    state: &HttpState,
    headers: &HeaderMap,
    room: &RoomId,
) -> Result<Option<Identity>, Box<Response>> {
    match state.auth.verify(auth::token_from(headers, None)) {
        Ok(Some(id)) if !id.rooms.allows(room) => Err(Box::new(error(
            StatusCode::FORBIDDEN,
            ErrorCode::Forbidden,
            &format!("your token does not allow room {room}"),
        ))),
        Ok(id) => Ok(id),
        Err(e) => Err(Box::new(error(
            StatusCode::UNAUTHORIZED,
            ErrorCode::Unauthorized,
            &e.to_string(),
        ))),
    }
}

#[derive(Deserialize)]
struct HistoryParams {
    limit: Option<i64>,
    before: Option<String>,
}

async fn history(
    State(state): State<HttpState>,
    Path(room): Path<String>,
    Query(p): Query<HistoryParams>,
    headers: HeaderMap,
) -> Response {
    let Some(room) = RoomId::parse(&room) else {
        return error(
            StatusCode::BAD_REQUEST,
            ErrorCode::BadRoom,
            "room must be chat.<name> or ai.<name>",
        );
    };
    // With auth on, reading a room needs a token that may join it.
    if let Err(refused) = caller_for_room(&state, &headers, &room) {
        return *refused;
    }
    let limit = p.limit.unwrap_or(50);
    if !(1..=500).contains(&limit) {
        return error(
            StatusCode::BAD_REQUEST,
            ErrorCode::BadLimit,
            "limit must be 1..=500",
        );
    }
    match state
        .store()
        .history(&room, p.before.as_deref(), limit)
        .await
    {
        Ok(msgs) => {
            let messages: Vec<serde_json::Value> = msgs
                .into_iter()
                .map(|m| {
                    let mut v = serde_json::to_value(&m).unwrap_or_default();
                    if let Some(o) = v.as_object_mut() {
                        o.insert("type".into(), "message".into());
                    }
                    v
                })
                .collect();
            Json(json!({"room": room, "messages": messages})).into_response()
        }
        Err(e) => {
            tracing::warn!(error = %e, "history query failed");
            error(
                StatusCode::SERVICE_UNAVAILABLE,
                ErrorCode::DbUnavailable,
                "history is unavailable right now",
            )
        }
    }
}

async fn stats(State(state): State<HttpState>, headers: HeaderMap) -> Response {
    // With auth on: a valid token, and only the rooms it may join.
    let policy = match state.auth.verify(auth::token_from(&headers, None)) {
        Ok(Some(id)) => id.rooms,
        Ok(None) => RoomPolicy::any(),
        Err(e) => {
            return error(
                StatusCode::UNAUTHORIZED,
                ErrorCode::Unauthorized,
                &e.to_string(),
            );
        }
    };
    let now = chrono::Utc::now().timestamp_millis();
    match state.store().stats(now, 100).await {
        Ok(mut rooms) => {
            rooms.retain(|r| RoomId::parse(&r.room).is_some_and(|id| policy.allows(&id)));
            Json(json!({
            "backend": state.bus().backend(),
            "instance": state.gateway.instance,
            "db": state.store().kind(),
            "capabilities": state.bus().capabilities(),
            "connections": state.gateway.connections.load(Ordering::Relaxed),
            "local_rooms": state.gateway.rooms.local_rooms(),
            "rooms": rooms,
            }))
            .into_response()
        }
        Err(e) => {
            tracing::warn!(error = %e, "stats query failed");
            error(
                StatusCode::SERVICE_UNAVAILABLE,
                ErrorCode::DbUnavailable,
                "stats are unavailable right now",
            )
        }
    }
}

#[derive(Deserialize)]
struct PostMessage {
    /// Ignored when authentication is on (the token's `sub` is the user).
    user: Option<String>,
    text: String,
}

/// `POST /api/rooms/<room>/messages` `{"user":…,"text":…}`: publishes like a
/// WebSocket `send` (for bots, the AI game master and the load tests) and
/// answers `202 {"id":…}` once the bus accepted it.
async fn post_message(
    State(state): State<HttpState>,
    Path(room): Path<String>,
    headers: HeaderMap,
    body: Result<Json<PostMessage>, axum::extract::rejection::JsonRejection>,
) -> Response {
    let Some(room) = RoomId::parse(&room) else {
        return error(
            StatusCode::BAD_REQUEST,
            ErrorCode::BadRoom,
            "room must be chat.<name> or ai.<name>",
        );
    };
    let Ok(Json(body)) = body else {
        return error(
            StatusCode::BAD_REQUEST,
            ErrorCode::BadFrame,
            "body must be JSON {\"user\":…,\"text\":…}",
        );
    };
    let user = match caller_for_room(&state, &headers, &room) {
        Err(refused) => return *refused,
        Ok(Some(id)) => id.user,
        Ok(None) => match body.user {
            Some(u) if valid_user(&u) => u,
            _ => {
                return error(
                    StatusCode::BAD_REQUEST,
                    ErrorCode::BadFrame,
                    "user name must be 1-32 characters",
                );
            }
        },
    };
    if body.text.trim().is_empty() {
        return error(
            StatusCode::BAD_REQUEST,
            ErrorCode::EmptyText,
            "text is empty",
        );
    }
    if body.text.len() > state.gateway.limits.max_text_bytes {
        return error(
            StatusCode::PAYLOAD_TOO_LARGE,
            ErrorCode::TextTooLong,
            "text is too long",
        );
    }
    match state
        .gateway
        .publish_chat(room, user, body.text, None)
        .await
    {
        Ok(id) => (StatusCode::ACCEPTED, Json(json!({"id": id}))).into_response(),
        Err(e) => error(StatusCode::SERVICE_UNAVAILABLE, e.code(), &e.to_string()),
    }
}
