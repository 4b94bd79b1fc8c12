//! One STOMP-over-WebSocket connection.
//!
//! Two tasks, as for `/ws`: the reader decodes frames (possibly split across
//! WebSocket messages) and answers each; the writer turns the room
//! registry's frames into `MESSAGE`s for this connection's subscriptions and
//! sends heart-beats when nothing else went out for the negotiated interval.
//!
//! Every refusal is an `ERROR` frame with a `message` header (and the
//! relay's error `code`), after which the connection is closed, as STOMP 1.2
//! requires. Live delivery is at-most-once as in Spring's simple broker:
//! `ack` modes `client`/`client-individual` are accepted and `ACK`/`NACK`
//! answered, but nothing is redelivered.

use std::collections::HashMap;
use std::sync::atomic::{AtomicU16, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use axum::extract::ws::{CloseFrame, Message, WebSocket};
use futures::stream::FuturesOrdered;
use futures::{SinkExt, StreamExt};
use serde::Deserialize;
use serde_json::json;
use tokio::time::Instant;

use super::frame::{self, Command, DecodeLimits, Decoder, Frame};
use super::{send_kind, subscription_room};
use crate::auth::{Authenticator, ConnSlot, RoomPolicy};
use crate::config::StompConfig;
use crate::gateway::conn::{
    CLOSE_GOING_AWAY, CLOSE_POLICY, CLOSE_TOKEN_EXPIRED, CLOSE_TOO_BIG, CLOSE_TRY_AGAIN,
    MAX_SENDS_IN_FLIGHT, next_conn_id, oversized, send_limiter, token_expiry,
};
use crate::gateway::rooms::{ConnId, EnterError, Frame as RoomFrame, Outlet, kick_slow};
use crate::gateway::{Gateway, SendError};
use crate::protocol::{ErrorCode, PresenceEvent, RoomId, RoomKind, valid_user};

/// The versions this endpoint speaks, best first.
const VERSIONS: [&str; 2] = ["1.2", "1.1"];
/// WebSocket subprotocols offered at the upgrade (the names stompjs sends).
pub const SUBPROTOCOLS: [&str; 2] = ["v12.stomp", "v11.stomp"];
const CLOSE_NORMAL: u16 = 1000;

/// What the HTTP upgrade learned about the caller (`?token=`, an
/// `Authorization` header, `?user=`), used when `CONNECT` carries nothing.
#[derive(Debug, Default, Clone)]
pub struct Upgrade {
    pub token: Option<String>,
    pub user: Option<String>,
}

/// How a client subscribed.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum AckMode {
    Auto,
    Client,
    ClientIndividual,
}

impl AckMode {
    fn parse(s: Option<&str>) -> Option<AckMode> {
        match s {
            None | Some("auto") => Some(AckMode::Auto),
            Some("client") => Some(AckMode::Client),
            Some("client-individual") => Some(AckMode::ClientIndividual),
            Some(_) => None,
        }
    }
}

struct Subscription {
    room: RoomId,
    destination: String,
    ack: AckMode,
}

/// Subscription id → subscription, shared by the reader (which changes it)
/// and the writer (which addresses `MESSAGE`s with it).
type Subs = Arc<Mutex<HashMap<String, Subscription>>>;

/// A refusal: the relay's error code and the `ERROR` frame's `message`.
#[derive(Debug)]
struct Refusal {
    code: ErrorCode,
    message: String,
    close: u16,
}

fn refuse(code: ErrorCode, message: impl Into<String>) -> Refusal {
    Refusal {
        code,
        message: message.into(),
        close: CLOSE_POLICY,
    }
}

/// What a frame's handling tells the read loop.
enum Next {
    Continue,
    /// The client said `DISCONNECT` (its receipt, if any, is queued).
    Disconnect,
}

/// A `SEND` waiting for the bus: its `receipt` and how it ended.
type Answer = futures::future::BoxFuture<'static, (Option<String>, Result<String, SendError>)>;

/// The state of the reader.
struct Session {
    id: ConnId,
    gw: Arc<Gateway>,
    /// Frames this side builds (CONNECTED, RECEIPT, ERROR): written in order.
    ctl: flume::Sender<String>,
    /// The room registry's queue for this connection.
    room_tx: flume::Sender<RoomFrame>,
    kick: tokio_util::sync::CancellationToken,
    /// Set once `CONNECT` succeeded.
    user: Option<Arc<str>>,
    rooms_allowed: RoomPolicy,
    expires_at: Option<i64>,
    subs: Subs,
    /// Rooms entered in the registry and how many subscriptions use each.
    entered: HashMap<RoomId, usize>,
    /// Heart-beat the writer sends (ms, 0 = none); read by the writer.
    send_every: Arc<AtomicU64>,
    /// Longest silence accepted from the client (0 = unchecked).
    recv_every: Duration,
}

impl Session {
    fn push(&self, s: String) {
        if self.ctl.try_send(s).is_err() {
            kick_slow(&self.kick);
        }
    }

    fn receipt(&self, f: &Frame) {
        if let Some(r) = f.header("receipt") {
            self.push(frame::encode(Command::Receipt, &[("receipt-id", r)], ""));
        }
    }

    /// Queues the `ERROR` frame of a refusal (the caller then closes).
    fn error(&self, r: &Refusal, receipt: Option<&str>) {
        metrics::counter!("stomp_errors_total", "code" => r.code.as_str()).increment(1);
        let mut h = vec![
            ("message", r.message.as_str()),
            ("code", r.code.as_str()),
            ("content-type", "text/plain"),
        ];
        if let Some(id) = receipt {
            h.push(("receipt-id", id));
        }
        self.push(frame::encode(Command::Error, &h, &r.message));
    }

    async fn handle(
        &mut self,
        f: Frame,
        limiter: &Limiter,
        auth: &Authenticator,
        up: &Upgrade,
        cfg: &StompConfig,
        in_flight: &mut FuturesOrdered<Answer>,
    ) -> Result<Next, Refusal> {
        if self.user.is_none() {
            return match f.command {
                Command::Connect | Command::Stomp => self.connect(&f, auth, up, cfg),
                _ => Err(refuse(ErrorCode::BadFrame, "send CONNECT (or STOMP) first")),
            };
        }
        match f.command {
            Command::Connect | Command::Stomp => {
                Err(refuse(ErrorCode::BadFrame, "already connected"))
            }
            Command::Send => {
                if f.header("transaction").is_some() {
                    return Err(refuse(
                        ErrorCode::BadFrame,
                        "transactions are not supported",
                    ));
                }
                if limiter.check().is_err() {
                    metrics::counter!("ws_limit_breaches_total", "limit" => "rate").increment(1);
                    return Err(refuse(
                        ErrorCode::RateLimited,
                        "too many messages: slow down",
                    ));
                }
                let answer = self.send(&f).await?;
                in_flight.push_back(answer);
                Ok(Next::Continue)
            }
            Command::Subscribe => {
                Box::pin(self.subscribe(&f)).await?;
                self.receipt(&f);
                Ok(Next::Continue)
            }
            Command::Unsubscribe => {
                let id = f
                    .header("id")
                    .ok_or_else(|| refuse(ErrorCode::MissingField, "UNSUBSCRIBE needs an id"))?;
                let room = self.subs.lock().ok().and_then(|mut s| s.remove(id));
                let Some(sub) = room else {
                    return Err(refuse(
                        ErrorCode::NotJoined,
                        format!("no subscription with id {id:?}"),
                    ));
                };
                self.release(&sub.room).await;
                self.receipt(&f);
                Ok(Next::Continue)
            }
            Command::Ack | Command::Nack => {
                // Accepted for compatibility; live delivery does not redeliver.
                self.receipt(&f);
                Ok(Next::Continue)
            }
            Command::Begin | Command::Commit | Command::Abort => Err(refuse(
                ErrorCode::BadFrame,
                "transactions are not supported",
            )),
            Command::Disconnect => Ok(Next::Disconnect),
            Command::Connected | Command::Message | Command::Receipt | Command::Error => {
                Err(refuse(
                    ErrorCode::BadFrame,
                    "that is a server frame, not a client frame",
                ))
            }
        }
    }

    /// `CONNECT`/`STOMP`: version, identity, heart-beats, then `CONNECTED`.
    fn connect(
        &mut self,
        f: &Frame,
        auth: &Authenticator,
        up: &Upgrade,
        cfg: &StompConfig,
    ) -> Result<Next, Refusal> {
        let offered = f.header("accept-version").unwrap_or("1.0");
        let version = VERSIONS
            .iter()
            .find(|v| offered.split(',').any(|o| o.trim() == **v))
            .ok_or_else(|| {
                refuse(
                    ErrorCode::BadFrame,
                    format!("supported versions are 1.2 and 1.1 (client offered {offered})"),
                )
            })?;
        let (cx, cy) = match f.header("heart-beat") {
            None => (0, 0),
            Some(h) => parse_heartbeat(h).ok_or_else(|| {
                refuse(
                    ErrorCode::BadFrame,
                    "heart-beat must be two non-negative integers: cx,cy",
                )
            })?,
        };
        let token = f
            .header("Authorization")
            .or_else(|| f.header("authorization"))
            .and_then(|v| v.strip_prefix("Bearer "))
            .or_else(|| f.header("passcode").filter(|p| !p.is_empty()))
            .or(up.token.as_deref());
        let (user, rooms, expires_at) = match auth.verify(token.map(str::trim)) {
            Ok(Some(id)) => (id.user, id.rooms, id.expires_at),
            Ok(None) => {
                let name = f.header("login").or(up.user.as_deref()).ok_or_else(|| {
                    refuse(
                        ErrorCode::Unauthorized,
                        "CONNECT needs a login header (your user name)",
                    )
                })?;
                if !valid_user(name) {
                    return Err(refuse(
                        ErrorCode::BadFrame,
                        "login must be 1-32 characters, no control characters",
                    ));
                }
                (name.to_string(), RoomPolicy::any(), None)
            }
            Err(e) => {
                metrics::counter!("ws_rejected_total", "reason" => "auth").increment(1);
                return Err(refuse(ErrorCode::Unauthorized, e.to_string()));
            }
        };
        // Heart-beats (spec 1.2 "Heart-beating"): the server sends every
        // max(sx, cy) when both are non-zero, and expects every max(cx, sy).
        let s = cfg.stomp_heartbeat_ms;
        let every = |a: u64, b: u64| if a == 0 || b == 0 { 0 } else { a.max(b) };
        self.send_every.store(every(s, cy), Ordering::Relaxed);
        self.recv_every = Duration::from_millis(every(cx, s));
        let hb = format!("{s},{s}");
        let session = self.id.to_string();
        self.push(frame::encode(
            Command::Connected,
            &[
                ("version", version),
                ("heart-beat", &hb),
                ("server", concat!("chat-relay/", env!("CARGO_PKG_VERSION"))),
                ("session", &session),
                ("user-name", &user),
            ],
            "",
        ));
        self.user = Some(Arc::from(user.as_str()));
        self.rooms_allowed = rooms;
        self.expires_at = expires_at;
        Ok(Next::Continue)
    }

    async fn subscribe(&mut self, f: &Frame) -> Result<(), Refusal> {
        let id = f
            .header("id")
            .ok_or_else(|| refuse(ErrorCode::MissingField, "SUBSCRIBE needs an id"))?;
        let destination = f
            .header("destination")
            .ok_or_else(|| refuse(ErrorCode::MissingField, "SUBSCRIBE needs a destination"))?;
        let room = subscription_room(destination).ok_or_else(|| {
            refuse(
                ErrorCode::BadRoom,
                format!(
                    "unknown destination {destination:?}: subscribe to /sub/chat/room/{{roomId}} \
                     or /sub/aichat/room/{{roomId}} (roomId: 1-64 characters of [A-Za-z0-9_-])"
                ),
            )
        })?;
        let ack = AckMode::parse(f.header("ack")).ok_or_else(|| {
            refuse(
                ErrorCode::BadFrame,
                "ack must be auto, client or client-individual",
            )
        })?;
        if !self.rooms_allowed.allows(&room) {
            metrics::counter!("ws_limit_breaches_total", "limit" => "forbidden_room").increment(1);
            return Err(refuse(
                ErrorCode::Forbidden,
                format!("your token does not allow room {room}"),
            ));
        }
        let limit = self.gw.limits.max_rooms_per_conn;
        {
            let Ok(mut subs) = self.subs.lock() else {
                return Err(refuse(ErrorCode::Internal, "subscription table poisoned"));
            };
            if subs.contains_key(id) {
                return Err(refuse(
                    ErrorCode::BadFrame,
                    format!("subscription id {id:?} is already in use"),
                ));
            }
            if subs.len() >= limit {
                metrics::counter!("ws_limit_breaches_total", "limit" => "rooms_per_conn")
                    .increment(1);
                return Err(refuse(
                    ErrorCode::TooManyRooms,
                    format!("at most {limit} subscriptions per connection"),
                ));
            }
            // In the table before the room is entered, so the writer can
            // address the first delivery.
            subs.insert(
                id.to_string(),
                Subscription {
                    room: room.clone(),
                    destination: destination.to_string(),
                    ack,
                },
            );
        }
        let user = self.user.clone().unwrap_or_else(|| Arc::from(""));
        if let Some(n) = self.entered.get_mut(&room) {
            *n += 1;
        } else {
            let entered = self
                .gw
                .rooms
                .enter(
                    &room,
                    self.id,
                    user.clone(),
                    Outlet::Queue(self.room_tx.clone()),
                    self.kick.clone(),
                    self.gw.limits.max_members_per_room,
                )
                .await;
            if let Err(e) = entered {
                if let Ok(mut s) = self.subs.lock() {
                    s.remove(id);
                }
                return Err(match e {
                    EnterError::Full(n) => {
                        metrics::counter!("ws_limit_breaches_total", "limit" => "members_per_room")
                            .increment(1);
                        refuse(
                            ErrorCode::RoomFull,
                            format!("room {room} is full ({n} members)"),
                        )
                    }
                    EnterError::Bus(e) => Refusal {
                        code: ErrorCode::BusUnavailable,
                        message: format!("cannot subscribe: {e}"),
                        close: CLOSE_TRY_AGAIN,
                    },
                });
            }
            self.entered.insert(room.clone(), 1);
        }
        let first = self.entered.get(&room) == Some(&1);
        let members = if first {
            self.gw.presence_entered(&room, &user).await
        } else {
            self.gw.rooms.members(&room)
        };
        // The members now, as the first MESSAGE of the subscription (a `/ws`
        // client gets them in `joined`).
        let body = json!({
            "id": format!("members-{}-{id}", self.id),
            "roomId": room.name(),
            "sender": "system",
            "content": format!("in the room: {}", members.join(", ")),
            "timestamp": iso(chrono::Utc::now().timestamp_millis()),
            "type": "system",
            "event": "members",
            "members": members,
        })
        .to_string();
        let msg_id = format!("members-{}-{id}", self.id);
        self.push(message_frame(id, &msg_id, destination, ack, &body));
        self.gw
            .rooms
            .release(&room, self.id, &std::collections::HashSet::new());
        if first {
            self.gw.announce(&room, &user, PresenceEvent::Join).await;
        }
        Ok(())
    }

    /// One subscription of `room` ended: leave the room when it was the last.
    async fn release(&mut self, room: &RoomId) {
        let last = match self.entered.get_mut(room) {
            Some(n) if *n > 1 => {
                *n -= 1;
                false
            }
            Some(_) => true,
            None => false,
        };
        if last {
            self.entered.remove(room);
            let user = self.user.clone().unwrap_or_else(|| Arc::from(""));
            self.gw.presence_left(room, self.id, &user).await;
        }
    }

    /// `SEND`: the ordered half now; the receipt once the bus accepted.
    async fn send(&mut self, f: &Frame) -> Result<Answer, Refusal> {
        let destination = f
            .header("destination")
            .ok_or_else(|| refuse(ErrorCode::MissingField, "SEND needs a destination"))?;
        let kind = send_kind(destination).ok_or_else(|| {
            refuse(
                ErrorCode::BadRoom,
                format!(
                    "unknown destination {destination:?}: send to /pub/chat/message or /pub/aichat/send"
                ),
            )
        })?;
        let (room_name, content) = parse_send_body(&f.body)?;
        let prefix = match kind {
            RoomKind::Chat => "chat",
            RoomKind::Ai => "ai",
        };
        let room = RoomId::parse(&format!("{prefix}.{room_name}")).ok_or_else(|| {
            refuse(
                ErrorCode::BadRoom,
                "roomId must be 1-64 characters of [A-Za-z0-9_-]",
            )
        })?;
        if content.trim().is_empty() {
            return Err(refuse(ErrorCode::EmptyText, "content is empty"));
        }
        let max = self.gw.limits.max_text_bytes;
        if content.len() > max {
            return Err(refuse(
                ErrorCode::TextTooLong,
                format!("content is longer than {max} bytes"),
            ));
        }
        if !self.rooms_allowed.allows(&room) {
            return Err(refuse(
                ErrorCode::Forbidden,
                format!("your token does not allow room {room}"),
            ));
        }
        let user = self.user.as_deref().unwrap_or_default().to_string();
        let pending = self
            .gw
            .begin_chat(room, user, content, None)
            .await
            .map_err(|e| refuse(e.code(), e.to_string()))?;
        let gw = self.gw.clone();
        let task = tokio::spawn(async move { pending.finish(&gw).await });
        let receipt = f.header("receipt").map(str::to_string);
        Ok(Box::pin(async move {
            let res = task
                .await
                .unwrap_or_else(|e| Err(SendError::Bus(format!("message state unknown: {e}"))));
            (receipt, res)
        }))
    }

    /// How a `SEND` ended: its `RECEIPT`, or the `ERROR` (then close).
    fn answer(&self, receipt: Option<String>, res: Result<String, SendError>) -> Result<(), ()> {
        match res {
            Ok(id) => {
                if let Some(r) = receipt {
                    self.push(frame::encode(
                        Command::Receipt,
                        &[("receipt-id", &r), ("message-id", &id)],
                        "",
                    ));
                }
                Ok(())
            }
            Err(e) => {
                self.error(&refuse(e.code(), e.to_string()), receipt.as_deref());
                Err(())
            }
        }
    }
}

type Limiter = governor::DefaultDirectRateLimiter;

fn parse_heartbeat(h: &str) -> Option<(u64, u64)> {
    let (a, b) = h.split_once(',')?;
    Some((a.trim().parse().ok()?, b.trim().parse().ok()?))
}

/// `{"roomId": "1" | 1, "content": "…"}` (other fields, such as a `sender`
/// the client may add, are ignored: the sender is the session's user).
fn parse_send_body(body: &[u8]) -> Result<(String, String), Refusal> {
    #[derive(Deserialize)]
    #[serde(rename_all = "camelCase")]
    struct Body {
        room_id: Option<serde_json::Value>,
        content: Option<serde_json::Value>,
    }
    let bad = |m: &str| refuse(ErrorCode::BadFrame, m);
    let b: Body = serde_json::from_slice(body).map_err(|e| {
        if e.is_data() {
            bad("the body must be a JSON object {\"roomId\": …, \"content\": …}")
        } else {
            refuse(ErrorCode::InvalidJson, "the body is not valid JSON")
        }
    })?;
    let room = match b.room_id {
        Some(serde_json::Value::String(s)) => s,
        Some(serde_json::Value::Number(n)) => n.to_string(),
        Some(_) => return Err(bad("roomId must be a string or a number")),
        None => return Err(refuse(ErrorCode::MissingField, "the body needs a roomId")),
    };
    let content = match b.content {
        Some(serde_json::Value::String(s)) => s,
        Some(_) => return Err(bad("content must be a string")),
        None => return Err(refuse(ErrorCode::MissingField, "the body needs a content")),
    };
    Ok((room, content))
}

fn iso(ts_ms: i64) -> String {
    chrono::DateTime::from_timestamp_millis(ts_ms)
        .unwrap_or_default()
        .to_rfc3339_opts(chrono::SecondsFormat::Millis, true)
}

fn message_frame(sub: &str, msg_id: &str, destination: &str, ack: AckMode, body: &str) -> String {
    let mut h = vec![
        ("subscription", sub),
        ("message-id", msg_id),
        ("destination", destination),
        ("content-type", "application/json"),
    ];
    if ack != AckMode::Auto {
        h.push(("ack", msg_id));
    }
    frame::encode(Command::Message, &h, body)
}

/// The registry's frames are the `/ws` protocol's JSON (bus payloads,
/// presence, gaps); this is the STOMP body of one, or `None` for frames a
/// STOMP client has no use for.
fn stomp_body(text: &str, presence_n: &mut u64) -> Option<(RoomId, String, String)> {
    #[derive(Deserialize)]
    struct Incoming {
        #[serde(rename = "type")]
        frame: String,
        room: Option<RoomId>,
        id: Option<String>,
        user: Option<String>,
        text: Option<String>,
        ts: Option<i64>,
        kind: Option<String>,
        seq: Option<i64>,
        event: Option<PresenceEvent>,
        from_seq: Option<i64>,
    }
    let m: Incoming = serde_json::from_str(text).ok()?;
    let room = m.room?;
    let now = chrono::Utc::now().timestamp_millis();
    match m.frame.as_str() {
        "message" => {
            let id = m.id?;
            let body = json!({
                "id": id,
                "roomId": room.name(),
                "sender": m.user,
                "content": m.text,
                "timestamp": iso(m.ts.unwrap_or(now)),
                "type": if m.kind.as_deref() == Some("system") { "system" } else { "chat" },
                "seq": m.seq,
            });
            Some((room, id, body.to_string()))
        }
        "presence" => {
            *presence_n += 1;
            let user = m.user?;
            let (event, verb) = match m.event? {
                PresenceEvent::Join => ("join", "joined"),
                PresenceEvent::Leave => ("leave", "left"),
            };
            let id = format!("presence-{presence_n}");
            let body = json!({
                "id": id,
                "roomId": room.name(),
                "sender": user,
                "content": format!("{user} {verb}"),
                "timestamp": iso(now),
                "type": "system",
                "event": event,
            });
            Some((room, id, body.to_string()))
        }
        "gap" => {
            *presence_n += 1;
            let id = format!("gap-{presence_n}");
            let body = json!({
                "id": id,
                "roomId": room.name(),
                "sender": "system",
                "content": "messages after this point may have been missed; reload the history",
                "timestamp": iso(now),
                "type": "system",
                "event": "gap",
                "fromSeq": m.from_seq,
            });
            Some((room, id, body.to_string()))
        }
        _ => None,
    }
}

/// Serves one upgraded STOMP socket until the client disconnects, a refusal
/// closes it, it falls silent, or the server shuts down.
pub async fn serve(
    socket: WebSocket,
    up: Upgrade,
    gw: Arc<Gateway>,
    auth: Arc<Authenticator>,
    cfg: StompConfig,
    slot: ConnSlot,
) {
    let _slot = slot;
    let (mut sink, mut stream) = socket.split();
    let limits = gw.limits.clone();
    let (ctl, ctl_rx) = flume::bounded::<String>(limits.outbound_queue.max(1));
    let (room_tx, room_rx) = flume::bounded::<RoomFrame>(limits.outbound_queue.max(1));
    let kick = gw.shutdown.child_token();
    let close_code = Arc::new(AtomicU16::new(0));
    let send_every = Arc::new(AtomicU64::new(0));
    let subs: Subs = Arc::default();
    metrics::gauge!("ws_connections").increment(1.0);
    metrics::gauge!("stomp_connections").increment(1.0);
    gw.connections.fetch_add(1, Ordering::Relaxed);

    // Writer: control frames in order, room frames as MESSAGEs, heart-beats.
    let writer = {
        let (kick, close_code, send_every, subs) = (
            kick.clone(),
            close_code.clone(),
            send_every.clone(),
            subs.clone(),
        );
        let shutdown = gw.shutdown.clone();
        tokio::spawn(async move {
            let close = |stopped: bool| {
                let (code, reason) = match close_code.load(Ordering::Relaxed) {
                    0 if stopped && shutdown.is_cancelled() => {
                        (CLOSE_GOING_AWAY, "server shutting down")
                    }
                    0 if stopped => (CLOSE_TRY_AGAIN, "too slow: outbound queue full"),
                    0 => (CLOSE_NORMAL, "bye"),
                    CLOSE_TOO_BIG => (CLOSE_TOO_BIG, "frame too big"),
                    CLOSE_TOKEN_EXPIRED => (CLOSE_TOKEN_EXPIRED, "token expired"),
                    CLOSE_TRY_AGAIN => (CLOSE_TRY_AGAIN, "try again later"),
                    c => (c, "STOMP ERROR sent"),
                };
                Message::Close(Some(CloseFrame {
                    code,
                    reason: reason.into(),
                }))
            };
            let mut presence_n = 0u64;
            let mut last_write = Instant::now();
            let mut rooms_open = true;
            let stopped = kick.cancelled();
            tokio::pin!(stopped);
            loop {
                let every = send_every.load(Ordering::Relaxed);
                let beat = async {
                    if every == 0 {
                        std::future::pending::<()>().await
                    } else {
                        tokio::time::sleep_until(last_write + Duration::from_millis(every)).await
                    }
                };
                let mut out: Vec<String> = Vec::new();
                tokio::select! {
                    biased;
                    _ = &mut stopped => {
                        let _ = sink.send(close(true)).await;
                        break;
                    }
                    s = ctl_rx.recv_async() => match s {
                        Ok(s) => {
                            out.push(s);
                            out.extend(ctl_rx.try_iter());
                        }
                        Err(_) => {
                            // The reader is done and everything it queued is written.
                            let _ = sink.send(close(false)).await;
                            break;
                        }
                    },
                    f = room_rx.recv_async(), if rooms_open => match f {
                        Ok(f) => {
                            let frames = std::iter::once(f).chain(room_rx.try_iter());
                            if let Ok(subs) = subs.lock() {
                                for f in frames {
                                    let Some((room, msg_id, body)) = stomp_body(f.text.as_str(), &mut presence_n) else {
                                        continue;
                                    };
                                    for (sid, s) in subs.iter() {
                                        if s.room == room {
                                            out.push(message_frame(sid, &msg_id, &s.destination, s.ack, &body));
                                        }
                                    }
                                }
                            }
                        }
                        Err(_) => rooms_open = false,
                    },
                    _ = beat => out.push("\n".to_string()),
                }
                let mut ok = true;
                for s in out.drain(..) {
                    if sink.feed(Message::Text(s.into())).await.is_err() {
                        ok = false;
                        break;
                    }
                }
                if !ok || sink.flush().await.is_err() {
                    break;
                }
                last_write = Instant::now();
            }
            let _ = sink.close().await;
        })
    };

    let mut s = Session {
        id: next_conn_id(),
        gw: gw.clone(),
        ctl,
        room_tx,
        kick: kick.clone(),
        user: None,
        rooms_allowed: RoomPolicy::any(),
        expires_at: None,
        subs,
        entered: HashMap::new(),
        send_every,
        recv_every: Duration::ZERO,
    };
    let limiter = send_limiter(&limits);
    let mut decoder = Decoder::new(DecodeLimits {
        max_frame: limits.max_frame_bytes,
        max_headers: cfg.stomp_max_headers,
        max_header_line: cfg.stomp_max_header_bytes,
    });
    let mut in_flight: FuturesOrdered<Answer> = FuturesOrdered::new();
    let connect_by = Instant::now() + Duration::from_millis(cfg.stomp_connect_timeout_ms);
    let mut last_read = Instant::now();
    let stopped = kick.cancelled();
    tokio::pin!(stopped);
    let mut expiry: std::pin::Pin<Box<dyn std::future::Future<Output = ()> + Send>> =
        Box::pin(std::future::pending());
    let mut disconnect: Option<Option<String>> = None;
    'read: loop {
        // Before CONNECT: the connect timeout; after: the client's heart-beat
        // with half an interval of grace for the network.
        let silent_by = if s.user.is_none() {
            Some(connect_by)
        } else if s.recv_every.is_zero() {
            None
        } else {
            Some(last_read + s.recv_every + s.recv_every / 2)
        };
        let silence = async {
            match silent_by {
                Some(t) => tokio::time::sleep_until(t).await,
                None => std::future::pending().await,
            }
        };
        let msg = tokio::select! {
            _ = &mut stopped => break,
            Some((receipt, res)) = in_flight.next(), if !in_flight.is_empty() => {
                if s.answer(receipt, res).is_err() {
                    close_code.store(CLOSE_TRY_AGAIN, Ordering::Relaxed);
                    break;
                }
                // DISCONNECT waited for the sends before it.
                if in_flight.is_empty() && disconnect.is_some() {
                    break;
                }
                continue;
            }
            _ = &mut expiry => {
                metrics::counter!("ws_token_expired_total").increment(1);
                s.error(&refuse(ErrorCode::Unauthorized, "token expired"), None);
                close_code.store(CLOSE_TOKEN_EXPIRED, Ordering::Relaxed);
                break;
            }
            _ = silence => {
                let why = if s.user.is_none() {
                    "no CONNECT frame in time".to_string()
                } else {
                    metrics::counter!("stomp_heartbeat_timeouts_total").increment(1);
                    format!("no heart-beat or frame for {} ms", (s.recv_every + s.recv_every / 2).as_millis())
                };
                s.error(&refuse(ErrorCode::BadFrame, why), None);
                close_code.store(CLOSE_POLICY, Ordering::Relaxed);
                break;
            }
            m = stream.next(), if disconnect.is_none() && in_flight.len() < MAX_SENDS_IN_FLIGHT => m,
        };
        let bytes = match msg {
            Some(Ok(Message::Text(t))) => t.as_str().as_bytes().to_vec(),
            Some(Ok(Message::Binary(b))) => b.to_vec(),
            Some(Ok(Message::Ping(_) | Message::Pong(_))) => {
                last_read = Instant::now();
                continue;
            }
            Some(Ok(Message::Close(_))) | None => break,
            Some(Err(e)) => {
                if oversized(&e) {
                    close_code.store(CLOSE_TOO_BIG, Ordering::Relaxed);
                    kick.cancel();
                }
                break;
            }
        };
        last_read = Instant::now();
        decoder.extend(&bytes);
        loop {
            let f = match decoder.next_frame() {
                Ok(Some(f)) => f,
                Ok(None) => break,
                Err(e) => {
                    let code = match e {
                        frame::FrameError::TooBig(_) => CLOSE_TOO_BIG,
                        _ => CLOSE_POLICY,
                    };
                    s.error(&refuse(ErrorCode::BadFrame, e.to_string()), None);
                    close_code.store(code, Ordering::Relaxed);
                    break 'read;
                }
            };
            let receipt = f.header("receipt").map(str::to_string);
            let was_connected = s.user.is_some();
            match s
                .handle(f, &limiter, &auth, &up, &cfg, &mut in_flight)
                .await
            {
                Ok(Next::Continue) => {
                    if !was_connected && s.user.is_some() {
                        expiry = Box::pin(token_expiry(s.expires_at));
                    }
                }
                Ok(Next::Disconnect) => {
                    // Its receipt only after every earlier SEND was answered:
                    // stop reading, wait for the answers, then close.
                    disconnect = Some(receipt);
                    if in_flight.is_empty() {
                        break 'read;
                    }
                    break;
                }
                Err(r) => {
                    s.error(&r, receipt.as_deref());
                    close_code.store(r.close, Ordering::Relaxed);
                    break 'read;
                }
            }
        }
    }
    if let Some(Some(receipt)) = disconnect {
        s.push(frame::encode(
            Command::Receipt,
            &[("receipt-id", &receipt)],
            "",
        ));
    }
    let rooms: Vec<RoomId> = s.entered.keys().cloned().collect();
    for r in rooms {
        s.entered.insert(r.clone(), 1);
        s.release(&r).await;
    }
    drop(s);
    let _ = writer.await;
    metrics::gauge!("ws_connections").decrement(1.0);
    metrics::gauge!("stomp_connections").decrement(1.0);
    gw.connections.fetch_sub(1, Ordering::Relaxed);
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn heartbeat_header() {
        assert_eq!(parse_heartbeat("10000,0"), Some((10000, 0)));
        assert_eq!(parse_heartbeat(" 1 , 2 "), Some((1, 2)));
        assert_eq!(parse_heartbeat("1"), None);
        assert_eq!(parse_heartbeat("-1,2"), None);
    }

    #[test]
    fn send_bodies() {
        assert_eq!(
            parse_send_body(br#"{"roomId":"1","content":"hi"}"#).unwrap(),
            ("1".into(), "hi".into())
        );
        assert_eq!(
            parse_send_body(br#"{"roomId":7,"content":"x","sender":"eve"}"#).unwrap(),
            ("7".into(), "x".into())
        );
        for (b, code) in [
            (&br#"{"content":"hi"}"#[..], ErrorCode::MissingField),
            (br#"{"roomId":"1"}"#, ErrorCode::MissingField),
            (br#"{"roomId":[1],"content":"x"}"#, ErrorCode::BadFrame),
            (br#"[1]"#, ErrorCode::BadFrame),
            (b"not json", ErrorCode::InvalidJson),
        ] {
            assert_eq!(parse_send_body(b).unwrap_err().code, code);
        }
    }

    #[test]
    fn bodies_of_registry_frames() {
        let mut n = 0;
        let (_, id, body) = stomp_body(
            r#"{"type":"message","room":"chat.1","id":"01J","user":"bob","text":"hi","ts":0,"kind":"chat","seq":3}"#,
            &mut n,
        )
        .unwrap();
        assert_eq!(id, "01J");
        let v: serde_json::Value = serde_json::from_str(&body).unwrap();
        assert_eq!(v["roomId"], "1");
        assert_eq!(v["sender"], "bob");
        assert_eq!(v["content"], "hi");
        assert_eq!(v["type"], "chat");
        assert_eq!(v["timestamp"], "1970-01-01T00:00:00.000Z");
        let (_, _, body) = stomp_body(
            r#"{"type":"presence","room":"ai.q","user":"amy","event":"leave"}"#,
            &mut n,
        )
        .unwrap();
        let v: serde_json::Value = serde_json::from_str(&body).unwrap();
        assert_eq!(
            (v["type"].as_str(), v["event"].as_str()),
            (Some("system"), Some("leave"))
        );
        let (_, _, body) = stomp_body(
            r#"{"type":"gap","room":"chat.1","from_seq":4,"to_seq":9}"#,
            &mut n,
        )
        .unwrap();
        let v: serde_json::Value = serde_json::from_str(&body).unwrap();
        assert_eq!(
            (v["type"].as_str(), v["event"].as_str()),
            (Some("system"), Some("gap"))
        );
        assert!(stomp_body(r#"{"type":"ack","id":"x"}"#, &mut n).is_none());
    }
}
