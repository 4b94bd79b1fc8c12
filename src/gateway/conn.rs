//! One WebSocket connection. The reader decodes client frames and answers each
//! with a frame (never a silent drop). Frames for the client are written into
//! the socket by whoever has them ([`Outbox`]); the writer task only finishes
//! what the socket could not take at once, and closes the socket.

use std::collections::{HashMap, HashSet};
use std::num::NonZeroU32;
use std::sync::Arc;
use std::sync::atomic::{AtomicU16, AtomicU64, Ordering};

use axum::extract::ws::{CloseFrame, Message, Utf8Bytes, WebSocket};
use futures::stream::FuturesOrdered;
use futures::{SinkExt, StreamExt};
use governor::{Quota, RateLimiter};
use tokio_util::sync::CancellationToken;

use super::outbox::{Finished, Outbox};
use super::recovery::{self, Cursor, Recovery};
use super::rooms::{ConnId, EnterError, Frame, Outlet, kick_slow};
use super::{Gateway, SendError};
use crate::auth::{ConnSlot, RoomPolicy};
use crate::protocol::{
    ClientFrame, ErrorCode, PresenceEvent, RoomId, ServerFrame, decode_client_frame, error_frame,
};

static NEXT_CONN: AtomicU64 = AtomicU64::new(1);

/// A connection id unique in this process, whatever the protocol (`/ws` or STOMP).
pub(crate) fn next_conn_id() -> ConnId {
    NEXT_CONN.fetch_add(1, Ordering::Relaxed)
}

/// Close codes (RFC 6455 and IANA registry).
pub const CLOSE_POLICY: u16 = 1008;
pub const CLOSE_TOO_BIG: u16 = 1009;
pub const CLOSE_TRY_AGAIN: u16 = 1013;
pub const CLOSE_GOING_AWAY: u16 = 1001;
/// Application close code (4000-4999 are the application's): the token's
/// `exp` passed while the socket was open.
pub const CLOSE_TOKEN_EXPIRED: u16 = 4001;

/// Who is on a socket: the name, the rooms the token allows and when the
/// token expires (`None`: authentication is off).
pub struct Session {
    pub user: String,
    pub rooms: RoomPolicy,
    pub expires_at: Option<i64>,
}

struct Conn {
    id: ConnId,
    user: Arc<str>,
    out: Arc<Outbox>,
    kick: CancellationToken,
    joined: HashMap<RoomId, ()>,
    rooms_allowed: RoomPolicy,
    gw: Arc<Gateway>,
}

fn text(s: String) -> Frame {
    Frame {
        id: None,
        seq: None,
        text: Utf8Bytes::from(s),
    }
}

impl Conn {
    /// Writes (or queues) a frame; a full queue means the client is too
    /// slow: kick it.
    fn push(&self, f: Frame) {
        if self.out.push(f.text).is_err() {
            kick_slow(&self.kick);
        }
    }

    fn error(&self, code: ErrorCode, message: &str, cid: Option<&str>) {
        metrics::counter!("ws_client_errors_total", "code" => code.as_str()).increment(1);
        self.push(text(error_frame(code, message, cid)));
    }

    async fn join(&mut self, room: RoomId, since: Cursor) {
        let gw = self.gw.clone();
        let limits = &gw.limits;
        if self.joined.contains_key(&room) {
            // Re-join: answer again so clients can use it to resync, but do not
            // register twice.
            self.leave_inner(&room).await;
        }
        if !self.rooms_allowed.allows(&room) {
            metrics::counter!("ws_limit_breaches_total", "limit" => "forbidden_room").increment(1);
            self.error(
                ErrorCode::Forbidden,
                &format!("your token does not allow room {room}"),
                None,
            );
            return;
        }
        if self.joined.len() >= limits.max_rooms_per_conn {
            metrics::counter!("ws_limit_breaches_total", "limit" => "rooms_per_conn").increment(1);
            self.error(
                ErrorCode::TooManyRooms,
                &format!("at most {} rooms per connection", limits.max_rooms_per_conn),
                None,
            );
            return;
        }
        let ticket = match self
            .gw
            .rooms
            .enter(
                &room,
                self.id,
                self.user.clone(),
                Outlet::Socket(self.out.clone()),
                self.kick.clone(),
                limits.max_members_per_room,
            )
            .await
        {
            Ok(t) => t,
            Err(EnterError::Full(n)) => {
                metrics::counter!("ws_limit_breaches_total", "limit" => "members_per_room")
                    .increment(1);
                self.error(
                    ErrorCode::RoomFull,
                    &format!("room {room} is full ({n} members)"),
                    None,
                );
                return;
            }
            Err(EnterError::Bus(e)) => {
                self.error(
                    ErrorCode::BusUnavailable,
                    &format!("cannot join: {e}"),
                    None,
                );
                return;
            }
        };
        self.joined.insert(room.clone(), ());
        let Recovery {
            frames: history,
            recovered,
            head,
        } = recovery::history(&self.gw, &room, self.id, &since, ticket.recent).await;
        if let Some(h) = &head {
            self.gw.rooms.advance(&room, h.seq);
        }
        let members = self.gw.presence_entered(&room, &self.user).await;
        self.push(text(
            ServerFrame::Joined {
                room: &room,
                members,
                recovered,
                epoch: head.as_ref().map(|h| h.epoch.as_str()),
                seq: head.as_ref().map(|h| h.seq),
            }
            .to_json(),
        ));
        let mut sent = HashSet::with_capacity(history.len());
        for f in history {
            if let Some(id) = &f.id {
                sent.insert(id.clone());
            }
            self.push(f);
        }
        self.gw.rooms.release(&room, self.id, &sent);
        self.gw
            .announce(&room, &self.user, PresenceEvent::Join)
            .await;
    }

    async fn leave_inner(&mut self, room: &RoomId) {
        if self.joined.remove(room).is_some() {
            self.gw.presence_left(room, self.id, &self.user).await;
        }
    }

    async fn leave(&mut self, room: RoomId) {
        if !self.joined.contains_key(&room) {
            self.error(ErrorCode::NotJoined, "you are not in this room", None);
            return;
        }
        self.leave_inner(&room).await;
        self.push(text(ServerFrame::Left { room: &room }.to_json()));
    }

    /// The ordered half of a send (id, position, handed to the bus); the
    /// returned future waits for the bus's answer and is polled by the reader
    /// beside the next frames, so a connection's sends are pipelined. `None`
    /// when the send was answered already (refused before the bus).
    async fn send(&mut self, room: RoomId, body: String, cid: Option<String>) -> Option<Answer> {
        if !self.joined.contains_key(&room) {
            self.error(
                ErrorCode::NotJoined,
                "join the room before sending to it",
                cid.as_deref(),
            );
            return None;
        }
        match self
            .gw
            .begin_chat(room, self.user.to_string(), body, cid.as_deref())
            .await
        {
            Ok(pending) => {
                // A task of its own: the claim and position settle even while
                // the reader is busy (a retry of this very `cid` waits for
                // them) or after the connection is gone.
                let gw = self.gw.clone();
                let task = tokio::spawn(async move { pending.finish(&gw).await });
                Some(Box::pin(async move {
                    let res = task.await.unwrap_or_else(|e| {
                        Err(SendError::Bus(format!("message state unknown: {e}")))
                    });
                    (cid, res)
                }))
            }
            Err(e) => {
                self.error(e.code(), &e.to_string(), cid.as_deref());
                None
            }
        }
    }

    /// Tells the client how its send ended: `ack` with the message id, or the error.
    fn answer(&self, cid: Option<String>, res: Result<String, SendError>) {
        match res {
            Ok(id) => self.push(text(
                ServerFrame::Ack {
                    cid: cid.as_deref(),
                    id: &id,
                }
                .to_json(),
            )),
            Err(e) => self.error(e.code(), &e.to_string(), cid.as_deref()),
        }
    }
}

/// A send waiting for the bus: resolves to its `cid` and how it ended.
type Answer = futures::future::BoxFuture<'static, (Option<String>, Result<String, SendError>)>;

/// Sends of one connection waiting for the bus at once. Past it the reader
/// stops reading until the oldest is answered (TCP back-pressure on the
/// client), so a client cannot grow the server's memory by sending faster
/// than the broker confirms.
pub(crate) const MAX_SENDS_IN_FLIGHT: usize = 64;

/// Whether a read failed on a frame over `MAX_FRAME_BYTES` (tungstenite
/// reports it as a capacity error); counted in `ws_oversized_frames_total`.
pub(crate) fn oversized(e: &axum::Error) -> bool {
    let s = e.to_string();
    let big = s.contains("too long") || s.contains("too big") || s.contains("Space limit");
    if big {
        metrics::counter!("ws_oversized_frames_total").increment(1);
    }
    big
}

/// A connection's send rate limit (`RATE_LIMIT_PER_SEC`, `RATE_LIMIT_BURST`),
/// the same for `/ws` and STOMP.
pub(crate) fn send_limiter(limits: &crate::config::Limits) -> governor::DefaultDirectRateLimiter {
    let per_sec = NonZeroU32::new(limits.rate_per_sec.max(1)).unwrap_or(NonZeroU32::MIN);
    let burst = NonZeroU32::new(limits.rate_burst.max(1)).unwrap_or(NonZeroU32::MIN);
    RateLimiter::direct(Quota::per_second(per_sec).allow_burst(burst))
}

/// Resolves when the token expiring at `exp` (unix seconds) expires; never
/// without one.
pub(crate) async fn token_expiry(exp: Option<i64>) {
    match exp {
        Some(exp) => {
            let left = exp.saturating_mul(1000) - chrono::Utc::now().timestamp_millis();
            tokio::time::sleep(std::time::Duration::from_millis(left.max(0) as u64)).await;
        }
        None => std::future::pending().await,
    }
}

/// Serves one upgraded socket until the client leaves, is kicked, or the
/// server shuts down.
pub async fn serve(
    socket: WebSocket,
    user: Result<Session, String>,
    gw: Arc<Gateway>,
    slot: ConnSlot,
) {
    // Held for the life of the connection: frees the per-IP slot on return.
    let _slot = slot;
    let (mut sink, mut stream) = socket.split();
    let Session {
        user,
        rooms: rooms_allowed,
        expires_at,
    } = match user {
        Ok(u) => u,
        Err(reason) => {
            let _ = sink
                .send(Message::Text(
                    error_frame(ErrorCode::BadFrame, &reason, None).into(),
                ))
                .await;
            let _ = sink
                .send(Message::Close(Some(CloseFrame {
                    code: CLOSE_POLICY,
                    reason: "bad user name".into(),
                })))
                .await;
            return;
        }
    };
    let limits = gw.limits.clone();
    // One token for every reason to stop: server shutdown (it is a child of
    // the shutdown token), a slow client (the room registry cancels it), an
    // oversized frame or an expired token (their close code in `close_code`).
    // Reader and writer each create its `cancelled()` future once, not once
    // per frame.
    let kick = gw.shutdown.child_token();
    // Why the connection is being closed, when it is not the default
    // (shutdown or a slow client): a close code set before `kick` fires.
    let close_code = Arc::new(AtomicU16::new(0));
    metrics::gauge!("ws_connections").increment(1.0);
    gw.connections.fetch_add(1, Ordering::Relaxed);

    let out = Outbox::new(sink, limits.outbound_queue);
    // Writer: finishes what the socket could not take at once, then closes it.
    let (writer_kick, writer_close_code, shutdown, writer_out) = (
        kick.clone(),
        close_code.clone(),
        gw.shutdown.clone(),
        out.clone(),
    );
    let writer = tokio::spawn(async move {
        let close = || {
            let (code, reason) = match writer_close_code.load(Ordering::Relaxed) {
                CLOSE_TOO_BIG => (CLOSE_TOO_BIG, "frame too big"),
                CLOSE_TOKEN_EXPIRED => (CLOSE_TOKEN_EXPIRED, "token expired"),
                _ if shutdown.is_cancelled() => (CLOSE_GOING_AWAY, "server shutting down"),
                _ => (CLOSE_TRY_AGAIN, "too slow: outbound queue full"),
            };
            Message::Close(Some(CloseFrame {
                code,
                reason: reason.into(),
            }))
        };
        // On a kick the socket is closed at once, with what is queued
        // dropped; when the reader is done everything queued is written
        // first (a close frame is owed then only if it ended on a kick).
        let sink = tokio::select! {
            biased;
            _ = writer_kick.cancelled() => writer_out.take(),
            f = writer_out.run() => match f {
                Finished::Drained(s) => Some(s),
                Finished::Failed => None,
            },
        };
        if let Some(mut sink) = sink {
            if writer_kick.is_cancelled() {
                let _ = sink.send(close()).await;
            }
            let _ = sink.close().await;
        }
    });

    let mut conn = Conn {
        id: next_conn_id(),
        user: Arc::from(user.as_str()),
        out: out.clone(),
        kick: kick.clone(),
        joined: HashMap::new(),
        rooms_allowed,
        gw: gw.clone(),
    };
    let limiter = send_limiter(&limits);

    let reader_stopped = kick.cancelled();
    tokio::pin!(reader_stopped);
    // A token's `exp` is enforced on the open socket too, not only at the
    // upgrade: the socket is closed with 4001 when it passes.
    let expiry = token_expiry(expires_at);
    tokio::pin!(expiry);
    // Sends waiting for the bus, answered in the order they were sent.
    let mut in_flight: FuturesOrdered<Answer> = FuturesOrdered::new();
    loop {
        let msg = tokio::select! {
            _ = &mut reader_stopped => break,
            Some((cid, res)) = in_flight.next(), if !in_flight.is_empty() => {
                conn.answer(cid, res);
                continue;
            }
            _ = &mut expiry => {
                metrics::counter!("ws_token_expired_total").increment(1);
                close_code.store(CLOSE_TOKEN_EXPIRED, Ordering::Relaxed);
                kick.cancel();
                break;
            }
            m = stream.next(), if in_flight.len() < MAX_SENDS_IN_FLIGHT => m,
        };
        let msg = match msg {
            Some(Ok(m)) => m,
            Some(Err(e)) => {
                if oversized(&e) {
                    close_code.store(CLOSE_TOO_BIG, Ordering::Relaxed);
                    kick.cancel();
                }
                break;
            }
            None => break,
        };
        match msg {
            Message::Text(t) => match decode_client_frame(t.as_str(), limits.max_text_bytes) {
                // Boxed: a join's future is large (history merge) and would
                // otherwise sit inline in every idle connection's task.
                Ok(ClientFrame::Join {
                    room,
                    since,
                    since_seq,
                    epoch,
                }) => {
                    let cursor = Cursor {
                        id: since,
                        seq: since_seq,
                        epoch,
                    };
                    Box::pin(conn.join(room, cursor)).await
                }
                Ok(ClientFrame::Leave { room }) => Box::pin(conn.leave(room)).await,
                Ok(ClientFrame::Send { room, text, cid }) => {
                    if limiter.check().is_err() {
                        conn.error(
                            ErrorCode::RateLimited,
                            "too many messages: slow down",
                            cid.as_deref(),
                        );
                    } else if let Some(answer) = Box::pin(conn.send(room, text, cid)).await {
                        in_flight.push_back(answer);
                    }
                }
                Err(e) => conn.error(e.code, &e.message, e.cid.as_deref()),
            },
            Message::Binary(_) => conn.error(
                ErrorCode::BinaryNotSupported,
                "binary frames are not supported: send JSON text frames",
                None,
            ),
            Message::Close(_) => break,
            Message::Ping(_) | Message::Pong(_) => {}
        }
    }

    let rooms: Vec<RoomId> = conn.joined.keys().cloned().collect();
    for r in rooms {
        conn.leave_inner(&r).await;
    }
    drop(conn);
    // The writer ends once what is queued is written (or it sent a close).
    out.finish();
    let _ = writer.await;
    metrics::gauge!("ws_connections").decrement(1.0);
    gw.connections.fetch_sub(1, Ordering::Relaxed);
}
