//! The app harness: spawn a relay on port 0 with a real config, talk to it with
//! real WebSocket clients (tokio-tungstenite).

use std::sync::Arc;
use std::time::Duration;

use chat_relay::app::Application;
use chat_relay::bus::MessageBus;
use chat_relay::config::{Config, Role};
use chat_relay::store::Store;
use futures::{SinkExt, StreamExt};
use serde_json::{Value, json};
use tokio::net::TcpStream;
use tokio::task::JoinHandle;
use tokio_tungstenite::tungstenite::Message;
use tokio_tungstenite::{MaybeTlsStream, WebSocketStream};
use tokio_util::sync::CancellationToken;

pub struct TestApp {
    pub port: u16,
    pub instance: String,
    pub store: Store,
    pub token: CancellationToken,
    pub handle: JoinHandle<()>,
}

impl TestApp {
    pub fn http(&self, path: &str) -> String {
        format!("http://127.0.0.1:{}{}", self.port, path)
    }
    pub fn ws_url(&self, user: &str) -> String {
        format!("ws://127.0.0.1:{}/ws?user={}", self.port, user)
    }
    pub async fn client(&self, user: &str) -> Client {
        Client::connect(&self.ws_url(user)).await
    }
    /// Graceful stop: waits for the application to finish.
    pub async fn stop(self) {
        self.token.cancel();
        let _ = tokio::time::timeout(Duration::from_secs(20), self.handle).await;
    }
    /// Crash-style stop: the task is aborted mid-flight.
    pub async fn crash(self) {
        self.handle.abort();
        let _ = self.handle.await;
    }
    pub async fn get_json(&self, path: &str) -> (u16, Value) {
        http_get(&self.http(path)).await
    }
}

/// Minimal HTTP/1.1 GET over a raw socket (keeps test deps small).
pub async fn http_get(url: &str) -> (u16, Value) {
    http_request("GET", url, None).await
}

/// Minimal HTTP/1.1 request with an optional JSON body.
pub async fn http_request(method: &str, url: &str, body: Option<&str>) -> (u16, Value) {
    http_request_with_headers(method, url, &[], body).await
}

/// [`http_request`] with extra request headers (e.g. `Authorization`).
pub async fn http_request_with_headers(
    method: &str,
    url: &str,
    headers: &[(&str, &str)],
    body: Option<&str>,
) -> (u16, Value) {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let rest = url.strip_prefix("http://").expect("http url");
    let (host, path) = rest.split_at(rest.find('/').unwrap_or(rest.len()));
    let mut s = TcpStream::connect(host).await.expect("connect");
    let extra: String = headers
        .iter()
        .map(|(k, v)| format!("{k}: {v}\r\n"))
        .collect();
    let req = match body {
        Some(b) => format!(
            "{method} {path} HTTP/1.1\r\nHost: {host}\r\nConnection: close\r\n{extra}Content-Type: application/json\r\nContent-Length: {}\r\n\r\n{b}",
            b.len()
        ),
        None => {
            format!("{method} {path} HTTP/1.1\r\nHost: {host}\r\nConnection: close\r\n{extra}\r\n")
        }
    };
    s.write_all(req.as_bytes()).await.expect("write");
    let mut buf = Vec::new();
    s.read_to_end(&mut buf).await.expect("read");
    let text = String::from_utf8_lossy(&buf);
    let status: u16 = text
        .split(' ')
        .nth(1)
        .and_then(|c| c.parse().ok())
        .unwrap_or(0);
    let body = text.split_once("\r\n\r\n").map(|(_, b)| b).unwrap_or("");
    if let Ok(v) = serde_json::from_str(body) {
        return (status, v);
    }
    // Chunked JSON bodies: the JSON between the first '{' and the last '}'.
    if let (Some(a), Some(b)) = (body.find('{'), body.rfind('}'))
        && let Ok(v) = serde_json::from_str(&body[a..=b])
    {
        return (status, v);
    }
    (status, Value::String(body.to_string()))
}

pub fn test_config(database_url: &str) -> Config {
    let mut cfg = Config::from_env().expect("config");
    cfg.bind = "127.0.0.1:0".parse().expect("addr");
    cfg.database_url = database_url.to_string();
    cfg.persist.batch_wait_ms = 20;
    cfg.analytics.flush_ms = 100;
    cfg.limits.rate_per_sec = 1000;
    cfg.limits.rate_burst = 1000;
    cfg.instance_id = None;
    cfg.bus.kafka.kafka_fetch_wait_max_ms = super::TANSU_FETCH_WAIT_MS;
    cfg
}

pub fn roles(cfg: &mut Config, r: &[Role]) {
    cfg.roles = r.to_vec();
}

/// A fresh SQLite file in a temp dir (kept alive by the returned guard).
pub fn sqlite_db() -> (tempfile::TempDir, String) {
    let dir = tempfile::tempdir().expect("tempdir");
    let url = format!("sqlite://{}/chat.db", dir.path().display());
    (dir, url)
}

fn pg_base() -> String {
    std::env::var("TEST_DATABASE_URL")
        .unwrap_or_else(|_| "postgres://postgres@127.0.0.1:5432/test".to_string())
}

/// A fresh PostgreSQL database on `TEST_DATABASE_URL` (default the local
/// server), dropped again (`WITH (FORCE)`) when the value is dropped — at
/// the end of the test, also when it panics. Fails loudly when PostgreSQL is
/// unreachable: never skips. Derefs to its URL.
pub struct PgDb {
    url: String,
    name: String,
}

impl std::ops::Deref for PgDb {
    type Target = str;
    fn deref(&self) -> &str {
        &self.url
    }
}

impl std::fmt::Display for PgDb {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(&self.url)
    }
}

impl Drop for PgDb {
    fn drop(&mut self) {
        // Drop may run inside the test's runtime: use a thread of its own.
        let (base, name) = (pg_base(), self.name.clone());
        let dropped = std::thread::spawn(move || {
            let rt = tokio::runtime::Builder::new_current_thread()
                .enable_all()
                .build()
                .ok()?;
            rt.block_on(async {
                use sqlx::Connection;
                let mut conn = sqlx::PgConnection::connect(&base).await.ok()?;
                sqlx::query(&format!("DROP DATABASE IF EXISTS {name} WITH (FORCE)"))
                    .execute(&mut conn)
                    .await
                    .ok()
            })
        })
        .join();
        if !matches!(dropped, Ok(Some(_))) {
            eprintln!("test database {} was not dropped", self.name);
        }
    }
}

pub async fn pg_db() -> PgDb {
    use sqlx::Connection;
    let base = pg_base();
    let mut conn = sqlx::PgConnection::connect(&base)
        .await
        .unwrap_or_else(|e| panic!("PostgreSQL at {base} is unreachable: {e}"));
    let name = format!("t_{}", ulid::Ulid::new().to_string().to_lowercase());
    sqlx::query(&format!("CREATE DATABASE {name}"))
        .execute(&mut conn)
        .await
        .expect("create database");
    let (prefix, _) = base.rsplit_once('/').expect("db url");
    PgDb {
        url: format!("{prefix}/{name}"),
        name,
    }
}

pub async fn spawn_app(cfg: Config) -> TestApp {
    let app = Application::build(cfg).await.expect("build app");
    start(app)
}

pub async fn spawn_app_on(cfg: Config, bus: Arc<dyn MessageBus>) -> TestApp {
    let app = Application::build_with_bus(cfg, bus)
        .await
        .expect("build app");
    start(app)
}

fn start(app: Application) -> TestApp {
    let port = app.port();
    let instance = app.instance().to_string();
    let store = app.store();
    let token = app.shutdown_token();
    let handle = tokio::spawn(async move {
        let _ = app.run_until_stopped().await;
    });
    TestApp {
        port,
        instance,
        store,
        token,
        handle,
    }
}

pub type Ws = WebSocketStream<MaybeTlsStream<TcpStream>>;

pub struct Client {
    pub ws: Ws,
    cid: u64,
}

pub const RECV: Duration = Duration::from_secs(15);

impl Client {
    pub async fn connect(url: &str) -> Client {
        let (ws, _) = tokio_tungstenite::connect_async(url)
            .await
            .expect("ws connect");
        Client { ws, cid: 0 }
    }

    pub fn from_ws(ws: Ws) -> Client {
        Client { ws, cid: 0 }
    }

    pub async fn send(&mut self, v: Value) {
        self.ws
            .send(Message::Text(v.to_string().into()))
            .await
            .expect("ws send");
    }

    pub async fn send_raw(&mut self, m: Message) {
        self.ws.send(m).await.expect("ws send");
    }

    /// Next JSON frame; panics on timeout or close.
    pub async fn recv(&mut self) -> Value {
        self.try_recv(RECV)
            .await
            .expect("a frame before the timeout")
    }

    /// Next JSON text frame within `wait`; `None` on timeout, close or end.
    pub async fn try_recv(&mut self, wait: Duration) -> Option<Value> {
        loop {
            match tokio::time::timeout(wait, self.ws.next()).await {
                Ok(Some(Ok(Message::Text(t)))) => {
                    return Some(serde_json::from_str(t.as_str()).expect("json frame"));
                }
                Ok(Some(Ok(Message::Ping(_) | Message::Pong(_)))) => continue,
                _ => return None,
            }
        }
    }

    /// Reads frames until one of type `ty` (skipping others).
    pub async fn recv_type(&mut self, ty: &str) -> Value {
        loop {
            let v = self.recv().await;
            if v["type"] == ty {
                return v;
            }
        }
    }

    /// Reads until both the `ack` of one's own send and a `message` arrived,
    /// in whichever order: the live echo may overtake the ack (the bus hands
    /// the message to the live consumer before the sender's answer is
    /// written). Skips other frames.
    pub async fn recv_ack_and_message(&mut self) -> (Value, Value) {
        let (mut ack, mut msg) = (None, None);
        while ack.is_none() || msg.is_none() {
            let v = self.recv().await;
            if v["type"] == "ack" && ack.is_none() {
                ack = Some(v);
            } else if v["type"] == "message" && msg.is_none() {
                msg = Some(v);
            }
        }
        (ack.unwrap_or_default(), msg.unwrap_or_default())
    }

    /// Reads until a close frame arrives; returns its code.
    pub async fn recv_close(&mut self) -> Option<u16> {
        loop {
            match tokio::time::timeout(RECV, self.ws.next()).await {
                Ok(Some(Ok(Message::Close(f)))) => return f.map(|f| u16::from(f.code)),
                Ok(Some(Ok(_))) => continue,
                _ => return None,
            }
        }
    }

    /// Joins and returns (joined frame, the history messages that followed it).
    /// History ends at the first frame that is not a message already stored
    /// before the join, so callers should join before traffic starts.
    pub async fn join(&mut self, room: &str, since: Option<&str>) -> (Value, Vec<Value>) {
        let mut j = json!({"type": "join", "room": room});
        if let Some(s) = since {
            j["since"] = json!(s);
        }
        self.send(j).await;
        let joined = self.recv_type("joined").await;
        let mut hist = Vec::new();
        while let Some(v) = self.try_recv(Duration::from_millis(300)).await {
            if v["type"] == "message" {
                hist.push(v);
            }
        }
        (joined, hist)
    }

    /// Sends a chat message, returns its cid.
    pub async fn say(&mut self, room: &str, text: &str) -> String {
        self.cid += 1;
        let cid = format!("c{}", self.cid);
        self.send(json!({"type": "send", "room": room, "text": text, "cid": cid}))
            .await;
        cid
    }
}

/// The next `message` frame, skipping other frames; panics on a frame of
/// type `forbidden` on the way (e.g. a `gap` where none may come).
pub async fn next_message(c: &mut Client, forbidden: &str) -> Value {
    loop {
        let v = c.recv().await;
        assert_ne!(v["type"], forbidden, "{v}");
        if v["type"] == "message" {
            return v;
        }
    }
}

/// `c` sends `missed0`, `missed1`, … (`n` of them) to `room`, each acked,
/// and waits until the db-writer has stored `rows` messages of the room.
pub async fn send_missed_and_stored(
    c: &mut Client,
    store: &Store,
    room: &str,
    n: usize,
    rows: i64,
) {
    for i in 0..n {
        c.say(room, &format!("missed{i}")).await;
        c.recv_type("ack").await;
    }
    let room_id = chat_relay::protocol::RoomId::parse(room).expect("room");
    eventually(Duration::from_secs(20), "the db-writer stored them", || {
        let (store, room_id) = (store.clone(), room_id.clone());
        async move { store.count_messages(Some(&room_id)).await.unwrap() >= rows }
    })
    .await;
}

/// Waits until `f` returns true, polling; panics after `wait`.
pub async fn eventually<F, Fut>(wait: Duration, what: &str, mut f: F)
where
    F: FnMut() -> Fut,
    Fut: std::future::Future<Output = bool>,
{
    let deadline = tokio::time::Instant::now() + wait;
    loop {
        if f().await {
            return;
        }
        if tokio::time::Instant::now() > deadline {
            panic!("timed out waiting for: {what}");
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

/// Sends `text` and waits for both its `ack` and its delivery back to the
/// sender, in whichever order they come (RabbitMQ may deliver a persistent
/// message before it confirms it).
pub async fn say_acked_and_delivered(c: &mut Client, room: &str, text: &str) {
    c.say(room, text).await;
    let (mut ack, mut msg) = (false, false);
    while !(ack && msg) {
        let v = c.recv().await;
        ack |= v["type"] == "ack";
        msg |= v["type"] == "message" && v["text"] == text;
    }
}

/// The broker is down: `/readyz` turns 503 within `wait`, and a send is
/// answered `bus_unavailable` for its `cid` — never silence.
pub async fn sends_refused_while_down(app: &TestApp, c: &mut Client, room: &str, wait: Duration) {
    eventually(wait, "readyz 503", || async {
        app.get_json("/readyz").await.0 == 503
    })
    .await;
    let cid = c.say(room, "while down").await;
    let e = c.recv_type("error").await;
    assert_eq!(
        (e["code"].as_str(), e["cid"].as_str()),
        (Some("bus_unavailable"), Some(cid.as_str())),
        "{e}"
    );
}

/// The broker is back: `/readyz` returns to 200 within `ready_wait`, then
/// `text` is sent until the client's own message comes back (within
/// `resume_wait`). Returns that message and the ids acked meanwhile.
pub async fn delivery_resumes(
    app: &TestApp,
    c: &mut Client,
    room: &str,
    text: &str,
    ready_wait: Duration,
    resume_wait: Duration,
) -> (Value, Vec<String>) {
    eventually(ready_wait, "readyz 200", || async {
        app.get_json("/readyz").await.0 == 200
    })
    .await;
    let mut acked = vec![];
    let got = tokio::time::timeout(resume_wait, async {
        loop {
            c.say(room, text).await;
            while let Some(v) = c.try_recv(Duration::from_millis(500)).await {
                if v["type"] == "ack" {
                    acked.push(v["id"].as_str().unwrap_or_default().to_string());
                }
                if v["type"] == "message" && v["text"] == text {
                    return v;
                }
            }
        }
    })
    .await
    .expect("delivery resumes after the broker is back");
    (got, acked)
}

/// The message `first` and every `acked` id end up stored, each once.
pub async fn stored_once(store: &Store, room: &str, first: &str, acked: &[String]) {
    let room_id = chat_relay::protocol::RoomId::parse(room).expect("room id");
    eventually(Duration::from_secs(30), "acked messages stored", || {
        let (store, room_id) = (store.clone(), room_id.clone());
        async move {
            let rows = store.history(&room_id, None, 500).await.unwrap_or_default();
            rows.iter().any(|m| m.text == first)
                && acked.iter().all(|id| rows.iter().any(|m| &m.id == id))
        }
    })
    .await;
    let rows = store.history(&room_id, None, 500).await.expect("history");
    let mut ids: Vec<&str> = rows.iter().map(|m| m.id.as_str()).collect();
    let n = ids.len();
    ids.dedup();
    assert_eq!(ids.len(), n, "no duplicates");
    assert_eq!(rows.iter().filter(|m| m.text == first).count(), 1);
}
