//! `floor`: the cheapest fan-out this machine can do, the yardstick for the
//! relay's CPU per delivery (issue #15: "the floor and the peers").
//!
//! It speaks just enough of the relay's protocol for `loadgen` (and
//! `loadtest/peers/gen.mjs`): `GET /ws?user=…`, a `join` frame registers the
//! socket in the room (answered `joined`), a `send` frame is answered `ack`
//! and becomes one relay-shaped `message` frame — encoded ONCE, WebSocket
//! header included — whose bytes are written to every member's socket. No
//! bus, no database, no persistence, no per-recipient framing.
//!
//! Why not axum or tokio-tungstenite: both frame every outgoing message per
//! socket (a header and a copy into that socket's write buffer) and put a
//! writer task between the sender and each socket. The floor is the *least*
//! a WebSocket fan-out can cost here, so it does the handshake itself
//! (`httparse` + tungstenite's accept-key helper), reads masked client frames
//! itself, and the sending task writes the pre-encoded frame straight into
//! each subscriber's socket with `try_write` — one `write` syscall per
//! delivery, no wake-up of another task. Only a socket whose kernel buffer is
//! full gets the rest queued for its own flusher task. What is left is the
//! kernel's loopback TCP path, which every server on this machine pays.
//!
//!     cargo run --release -p chat-relay-bench --bin floor -- --bind 127.0.0.1:9300

use std::collections::HashMap;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{SystemTime, UNIX_EPOCH};

use bytes::{Buf, BufMut, Bytes, BytesMut};
use clap::Parser;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::tcp::{OwnedReadHalf, OwnedWriteHalf};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::Notify;

#[derive(Parser, Debug)]
struct Args {
    /// Listen address (port 0: any free port, printed on stderr).
    #[arg(long, env = "BIND", default_value = "127.0.0.1:0")]
    bind: std::net::SocketAddr,
    /// Same meaning and default as the relay's `TCP_NODELAY`: send each
    /// frame at once.
    #[arg(long, env = "TCP_NODELAY", default_value_t = true, action = clap::ArgAction::Set)]
    tcp_nodelay: bool,
    /// Bytes queued for one socket whose kernel buffer is full before it is
    /// dropped as too slow (the relay drops slow clients too).
    #[arg(long, env = "FLOOR_MAX_PENDING_BYTES", default_value_t = 4 << 20)]
    max_pending_bytes: usize,
    /// Same meaning and default as the relay's `WORKER_THREADS` (0: Tokio's
    /// one per core), so a run that sets it for the relay holds the floor
    /// to the same runtime.
    #[arg(long, env = "WORKER_THREADS", default_value_t = 0)]
    worker_threads: usize,
}

/// Largest client frame accepted (the relay's `MAX_FRAME_BYTES` default).
const MAX_FRAME: usize = 65536;
/// Largest handshake request.
const MAX_REQUEST: usize = 8192;

fn now_ms() -> i64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_millis() as i64)
        .unwrap_or(0)
}

/// One server-to-client text frame, header included (servers do not mask).
fn encode_text(payload: &[u8]) -> Bytes {
    let n = payload.len();
    let mut f = BytesMut::with_capacity(n + 10);
    f.put_u8(0x81);
    if n < 126 {
        f.put_u8(n as u8);
    } else if n <= u16::MAX as usize {
        f.put_u8(126);
        f.put_u16(n as u16);
    } else {
        f.put_u8(127);
        f.put_u64(n as u64);
    }
    f.put_slice(payload);
    f.freeze()
}

/// One subscriber's socket, shared by every room it joined.
struct Sub {
    w: OwnedWriteHalf,
    /// Bytes the kernel did not take yet (empty almost always).
    pending: Mutex<Pending>,
    wake: Notify,
    max_pending: usize,
}

#[derive(Default)]
struct Pending {
    buf: BytesMut,
    closed: bool,
}

impl Sub {
    /// Writes `frame` now if the socket takes it; queues the rest for the
    /// flusher otherwise (keeping frame order).
    fn send(&self, frame: &[u8]) {
        let Ok(mut p) = self.pending.lock() else {
            return;
        };
        if p.closed {
            return;
        }
        if p.buf.is_empty() {
            match self.w.try_write(frame) {
                Ok(n) if n == frame.len() => return,
                Ok(n) => p.buf.extend_from_slice(&frame[n..]),
                Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => {
                    p.buf.extend_from_slice(frame)
                }
                Err(_) => p.closed = true,
            }
        } else {
            p.buf.extend_from_slice(frame);
        }
        if p.buf.len() > self.max_pending {
            p.closed = true;
        }
        drop(p);
        self.wake.notify_one();
    }

    fn close(&self) {
        if let Ok(mut p) = self.pending.lock() {
            p.closed = true;
        }
        self.wake.notify_one();
    }

    /// Drains what `send` could not write, whenever the socket is writable.
    async fn flusher(self: Arc<Self>) {
        loop {
            self.wake.notified().await;
            loop {
                {
                    let Ok(mut p) = self.pending.lock() else {
                        return;
                    };
                    if p.closed {
                        return;
                    }
                    if p.buf.is_empty() {
                        break;
                    }
                    match self.w.try_write(&p.buf) {
                        Ok(n) => p.buf.advance(n),
                        Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => {}
                        Err(_) => {
                            p.closed = true;
                            return;
                        }
                    }
                    if p.buf.is_empty() {
                        break;
                    }
                }
                if self.w.writable().await.is_err() {
                    return;
                }
            }
        }
    }
}

struct Room {
    subs: Mutex<Vec<Arc<Sub>>>,
    seq: AtomicU64,
}

#[derive(Default)]
struct Registry {
    rooms: Mutex<HashMap<String, Arc<Room>>>,
}

impl Registry {
    fn room(&self, name: &str) -> Option<Arc<Room>> {
        let mut rooms = self.rooms.lock().ok()?;
        Some(
            rooms
                .entry(name.to_string())
                .or_insert_with(|| {
                    Arc::new(Room {
                        subs: Mutex::new(Vec::new()),
                        seq: AtomicU64::new(0),
                    })
                })
                .clone(),
        )
    }

    fn join(&self, name: &str, sub: &Arc<Sub>) -> Option<Arc<Room>> {
        let room = self.room(name)?;
        let mut subs = room.subs.lock().ok()?;
        if !subs.iter().any(|s| Arc::ptr_eq(s, sub)) {
            subs.push(sub.clone());
        }
        drop(subs);
        Some(room)
    }

    fn leave(&self, room: &Room, sub: &Arc<Sub>) {
        if let Ok(mut subs) = room.subs.lock() {
            subs.retain(|s| !Arc::ptr_eq(s, sub));
        }
    }
}

/// The client frames the floor understands (the relay's field names).
#[derive(serde::Deserialize)]
struct ClientFrame<'a> {
    #[serde(rename = "type", borrow)]
    kind: &'a str,
    #[serde(default, borrow)]
    room: Option<std::borrow::Cow<'a, str>>,
    #[serde(default, borrow)]
    text: Option<std::borrow::Cow<'a, str>>,
    #[serde(default, borrow)]
    cid: Option<std::borrow::Cow<'a, str>>,
}

fn main() -> anyhow::Result<()> {
    let args = Args::parse();
    let mut rt = tokio::runtime::Builder::new_multi_thread();
    if args.worker_threads > 0 {
        rt.worker_threads(args.worker_threads);
    }
    rt.enable_all().build()?.block_on(serve_all(args))
}

async fn serve_all(args: Args) -> anyhow::Result<()> {
    let listener = TcpListener::bind(args.bind).await?;
    eprintln!("floor listening on {}", listener.local_addr()?);
    let reg = Arc::new(Registry::default());
    loop {
        let (tcp, _) = match listener.accept().await {
            Ok(c) => c,
            Err(e) => {
                eprintln!("accept: {e}");
                continue;
            }
        };
        let _ = tcp.set_nodelay(args.tcp_nodelay);
        let (reg, max_pending) = (reg.clone(), args.max_pending_bytes);
        tokio::spawn(async move {
            if let Err(e) = serve(tcp, reg, max_pending).await {
                eprintln!("connection: {e}");
            }
        });
    }
}

/// Reads the upgrade request, answers 101, returns the user name and any
/// bytes that followed the request.
async fn handshake(tcp: &mut TcpStream) -> anyhow::Result<(String, BytesMut)> {
    let mut buf = BytesMut::with_capacity(1024);
    loop {
        if tcp.read_buf(&mut buf).await? == 0 {
            anyhow::bail!("closed during the handshake");
        }
        let mut headers = [httparse::EMPTY_HEADER; 32];
        let mut req = httparse::Request::new(&mut headers);
        match req.parse(&buf)? {
            httparse::Status::Partial if buf.len() < MAX_REQUEST => continue,
            httparse::Status::Partial => anyhow::bail!("request too large"),
            httparse::Status::Complete(len) => {
                let path = req.path.unwrap_or("");
                let user = path
                    .split_once('?')
                    .map(|(_, q)| q)
                    .unwrap_or("")
                    .split('&')
                    .find_map(|kv| kv.strip_prefix("user="))
                    .unwrap_or("")
                    .to_string();
                let key = req
                    .headers
                    .iter()
                    .find(|h| h.name.eq_ignore_ascii_case("sec-websocket-key"))
                    .map(|h| h.value);
                let (Some(key), true) = (key, path.starts_with("/ws")) else {
                    tcp.write_all(b"HTTP/1.1 400 Bad Request\r\ncontent-length: 0\r\n\r\n")
                        .await?;
                    anyhow::bail!("not a WebSocket upgrade to /ws");
                };
                let accept = tokio_tungstenite::tungstenite::handshake::derive_accept_key(key);
                let resp = format!(
                    "HTTP/1.1 101 Switching Protocols\r\nupgrade: websocket\r\nconnection: upgrade\r\nsec-websocket-accept: {accept}\r\n\r\n"
                );
                tcp.write_all(resp.as_bytes()).await?;
                buf.advance(len);
                return Ok((user, buf));
            }
        }
    }
}

/// One client frame: opcode and unmasked payload; `None` until complete.
fn next_frame(buf: &mut BytesMut) -> anyhow::Result<Option<(u8, BytesMut)>> {
    if buf.len() < 2 {
        return Ok(None);
    }
    let (b0, b1) = (buf[0], buf[1]);
    if b0 & 0x80 == 0 || b0 & 0x0f == 0 {
        anyhow::bail!("fragmented frames are not supported");
    }
    if b1 & 0x80 == 0 {
        anyhow::bail!("client frames must be masked");
    }
    let (len, at) = match b1 & 0x7f {
        126 if buf.len() >= 4 => (u16::from_be_bytes([buf[2], buf[3]]) as usize, 4),
        127 if buf.len() >= 10 => {
            let mut b = [0u8; 8];
            b.copy_from_slice(&buf[2..10]);
            (u64::from_be_bytes(b) as usize, 10)
        }
        126 | 127 => return Ok(None),
        n => (n as usize, 2),
    };
    if len > MAX_FRAME {
        anyhow::bail!("frame over {MAX_FRAME} bytes");
    }
    if buf.len() < at + 4 + len {
        return Ok(None);
    }
    let mut frame = buf.split_to(at + 4 + len);
    let mask = [frame[at], frame[at + 1], frame[at + 2], frame[at + 3]];
    frame.advance(at + 4);
    for (i, b) in frame.iter_mut().enumerate() {
        *b ^= mask[i & 3];
    }
    Ok(Some((b0 & 0x0f, frame)))
}

async fn serve(mut tcp: TcpStream, reg: Arc<Registry>, max_pending: usize) -> anyhow::Result<()> {
    let (user, mut buf) = handshake(&mut tcp).await?;
    let (r, w) = tcp.into_split();
    let sub = Arc::new(Sub {
        w,
        pending: Mutex::new(Pending::default()),
        wake: Notify::new(),
        max_pending,
    });
    let flusher = tokio::spawn(sub.clone().flusher());
    let mut joined: Vec<(String, Arc<Room>)> = Vec::new();
    let res = read_loop(r, &mut buf, &user, &sub, &reg, &mut joined).await;
    for (_, room) in &joined {
        reg.leave(room, &sub);
    }
    sub.close();
    let _ = flusher.await;
    res
}

async fn read_loop(
    mut r: OwnedReadHalf,
    buf: &mut BytesMut,
    user: &str,
    sub: &Arc<Sub>,
    reg: &Registry,
    joined: &mut Vec<(String, Arc<Room>)>,
) -> anyhow::Result<()> {
    loop {
        while let Some((op, payload)) = next_frame(buf)? {
            match op {
                0x1 => on_text(&payload, user, sub, reg, joined),
                0x8 => return Ok(()),
                0x9 => {
                    // Pong with the ping's payload.
                    let mut f = BytesMut::with_capacity(payload.len() + 2);
                    f.put_u8(0x8a);
                    f.put_u8(payload.len().min(125) as u8);
                    f.put_slice(&payload[..payload.len().min(125)]);
                    sub.send(&f);
                }
                _ => {}
            }
        }
        if r.read_buf(buf).await? == 0 {
            return Ok(());
        }
    }
}

fn on_text(
    payload: &[u8],
    user: &str,
    sub: &Arc<Sub>,
    reg: &Registry,
    joined: &mut Vec<(String, Arc<Room>)>,
) {
    let Ok(f) = serde_json::from_slice::<ClientFrame>(payload) else {
        sub.send(&encode_text(
            br#"{"type":"error","code":"invalid_json","message":"not JSON"}"#,
        ));
        return;
    };
    let Some(room_name) = f.room.as_deref() else {
        return;
    };
    match f.kind {
        "join" => {
            if let Some(room) = reg.join(room_name, sub) {
                if !joined.iter().any(|(n, _)| n == room_name) {
                    joined.push((room_name.to_string(), room));
                }
                let j = serde_json::json!({"type":"joined","room":room_name,"members":[],"recovered":true});
                sub.send(&encode_text(j.to_string().as_bytes()));
            }
        }
        "send" => {
            let Some((_, room)) = joined.iter().find(|(n, _)| n == room_name) else {
                return;
            };
            let id = ulid::Ulid::new().to_string();
            let seq = room.seq.fetch_add(1, Ordering::Relaxed) + 1;
            let msg = message_json(room_name, &id, user, f.text.as_deref().unwrap_or(""), seq);
            // Encoded once; the same bytes go to every member.
            let frame = encode_text(msg.as_bytes());
            if let Ok(subs) = room.subs.lock() {
                for s in subs.iter() {
                    s.send(&frame);
                }
            }
            sub.send(&encode_text(ack_json(f.cid.as_deref(), &id).as_bytes()));
        }
        _ => {}
    }
}

/// `{"type":"ack","cid":…,"id":…}`, `type` first as the relay writes it
/// (loadgen recognises acks by that prefix).
fn ack_json(cid: Option<&str>, id: &str) -> String {
    #[derive(serde::Serialize)]
    struct A<'a> {
        #[serde(rename = "type")]
        t: &'static str,
        cid: Option<&'a str>,
        id: &'a str,
    }
    serde_json::to_string(&A { t: "ack", cid, id }).unwrap_or_default()
}

/// `{"type":"message","room":…,"id":…,"user":…,"text":…,"ts":…,"kind":"chat","seq":n}`
fn message_json(room: &str, id: &str, user: &str, text: &str, seq: u64) -> String {
    #[derive(serde::Serialize)]
    struct M<'a> {
        #[serde(rename = "type")]
        t: &'static str,
        room: &'a str,
        id: &'a str,
        user: &'a str,
        text: &'a str,
        ts: i64,
        kind: &'static str,
        seq: u64,
    }
    serde_json::to_string(&M {
        t: "message",
        room,
        id,
        user,
        text,
        ts: now_ms(),
        kind: "chat",
        seq,
    })
    .unwrap_or_default()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn frames_round_trip_through_the_parser() {
        // A masked client frame of 300 bytes (16-bit length).
        let payload = vec![b'a'; 300];
        let mask = [1u8, 2, 3, 4];
        let mut f = BytesMut::new();
        f.put_u8(0x81);
        f.put_u8(0x80 | 126);
        f.put_u16(300);
        f.put_slice(&mask);
        f.extend(payload.iter().enumerate().map(|(i, b)| b ^ mask[i & 3]));
        let mut half = f.split_to(100);
        assert!(next_frame(&mut half).unwrap().is_none());
        half.unsplit(f);
        let (op, p) = next_frame(&mut half).unwrap().unwrap();
        assert_eq!((op, &p[..]), (1, &payload[..]));
        assert!(half.is_empty());
        assert_eq!(&encode_text(b"hi")[..], b"\x81\x02hi");
        assert_eq!(encode_text(&payload)[..4], [0x81, 126, 1, 44]);
    }

    #[test]
    fn message_frame_has_the_relay_shape() {
        let v: serde_json::Value =
            serde_json::from_str(&message_json("chat.a", "01H", "u", "{\"r\":1}", 7)).unwrap();
        assert_eq!(v["type"], "message");
        assert_eq!(v["text"], "{\"r\":1}");
        assert_eq!(v["kind"], "chat");
        assert_eq!(v["seq"], 7);
        assert_eq!(
            ack_json(Some("c1"), "01H"),
            r#"{"type":"ack","cid":"c1","id":"01H"}"#
        );
    }
}
