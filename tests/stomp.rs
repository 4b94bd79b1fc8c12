//! The STOMP 1.2 endpoint against a real relay on port 0, with raw frames on
//! a real WebSocket: what a Spring/stompjs client sees, the same room shared
//! with a native `/ws` client, every refusal as ERROR-then-close, frames
//! split across WebSocket messages, heart-beats, auth, DISCONNECT.

mod common;

use std::time::Duration;

use chat_relay::config::Config;
use chat_relay::gateway::stomp::frame::Command;
use common::app::{TestApp, spawn_app, sqlite_db, test_config};
use common::stomp::{End, Stomp};
use jsonwebtoken::{Algorithm, EncodingKey, Header};
use serde_json::json;

const SECRET: &str = "a-test-secret-that-is-at-least-32-bytes-long";

async fn app_with(f: impl FnOnce(&mut Config)) -> (tempfile::TempDir, TestApp) {
    let (dir, db) = sqlite_db();
    let mut cfg = test_config(&db);
    f(&mut cfg);
    (dir, spawn_app(cfg).await)
}

fn token(claims: serde_json::Value) -> String {
    jsonwebtoken::encode(
        &Header::new(Algorithm::HS256),
        &claims,
        &EncodingKey::from_secret(SECRET.as_bytes()),
    )
    .expect("encode")
}

fn exp() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .expect("clock")
        .as_secs()
        + 600
}

#[tokio::test]
async fn a_dungeontalk_client_connects_subscribes_sends_and_receives() {
    let (_d, app) = app_with(|_| {}).await;
    let (mut s, connected) = Stomp::connect(app.port, "alice", &[]).await;
    assert_eq!(s.protocol.as_deref(), Some("v12.stomp"), "subprotocol");
    assert_eq!(connected.command, Command::Connected);
    assert_eq!(connected.header("version"), Some("1.2"));
    assert_eq!(connected.header("heart-beat"), Some("30000,30000"));
    assert_eq!(connected.header("user-name"), Some("alice"));

    let members = s.subscribe("sub-0", "/sub/chat/room/1").await;
    let m: serde_json::Value = serde_json::from_slice(&members.body).expect("json");
    assert_eq!(m["event"], "members");
    assert_eq!(m["members"], json!(["alice"]));

    let id = s.send("/pub/chat/message", "1", "hi").await;
    let (f, v) = s.recv_message().await;
    assert_eq!(f.header("subscription"), Some("sub-0"));
    assert_eq!(f.header("message-id"), Some(id.as_str()));
    assert_eq!(f.header("destination"), Some("/sub/chat/room/1"));
    assert_eq!(f.header("content-type"), Some("application/json"));
    assert_eq!(f.header("ack"), None, "ack:auto carries no ack header");
    assert_eq!(v["id"], id.as_str());
    assert_eq!(v["roomId"], "1");
    assert_eq!(v["sender"], "alice");
    assert_eq!(v["content"], "hi");
    assert_eq!(v["type"], "chat");
    assert!(v["timestamp"].as_str().is_some_and(|t| t.ends_with('Z')));

    // AI-game rooms: their own destinations, ack:client gets an ack header
    // and ACK is answered.
    s.frame(
        "SUBSCRIBE",
        &[
            ("id", "sub-1"),
            ("destination", "/sub/aichat/room/7"),
            ("ack", "client-individual"),
        ],
        "",
    )
    .await;
    s.recv_message().await; // members
    let id = s.send("/pub/aichat/send", "7", "roll for initiative").await;
    let (f, v) = s.recv_message().await;
    assert_eq!(f.header("destination"), Some("/sub/aichat/room/7"));
    assert_eq!(f.header("ack"), Some(id.as_str()));
    assert_eq!(v["content"], "roll for initiative");
    s.frame("ACK", &[("id", &id), ("receipt", "acked")], "")
        .await;
    let r = s.recv_command(Command::Receipt).await;
    assert_eq!(r.header("receipt-id"), Some("acked"));

    // The message is stored like any other: history over HTTP has it.
    tokio::time::sleep(Duration::from_millis(300)).await;
    let (st, h) = app.get_json("/api/rooms/ai.7/messages").await;
    assert_eq!(st, 200);
    assert!(h.to_string().contains("roll for initiative"), "{h}");
}

#[tokio::test]
async fn stomp_and_native_clients_share_rooms_and_presence() {
    let (_d, app) = app_with(|_| {}).await;
    let (mut s, _) = Stomp::connect(app.port, "alice", &[]).await;
    s.subscribe("a", "/sub/chat/room/lobby").await;

    let mut bob = app.client("bob").await;
    let (joined, _) = bob.join("chat.lobby", None).await;
    assert!(
        joined["members"]
            .as_array()
            .is_some_and(|m| m.contains(&json!("alice"))),
        "the native client sees the STOMP member: {joined}"
    );
    // Its own join comes first (as on /ws), then bob's.
    let (_, own) = s.recv_message().await;
    assert_eq!(
        (own["sender"].as_str(), own["event"].as_str()),
        (Some("alice"), Some("join"))
    );
    let (_, p) = s.recv_message().await;
    assert_eq!(
        (p["type"].as_str(), p["event"].as_str()),
        (Some("system"), Some("join"))
    );
    assert_eq!(p["sender"], "bob");

    bob.say("chat.lobby", "hello from ws").await;
    let (_, v) = s.recv_message().await;
    assert_eq!(
        (v["sender"].as_str(), v["content"].as_str()),
        (Some("bob"), Some("hello from ws"))
    );

    s.send("/pub/chat/message", "lobby", "hello from stomp")
        .await;
    let m = bob.recv_type("message").await;
    let m = if m["user"] == "bob" {
        bob.recv_type("message").await
    } else {
        m
    };
    assert_eq!(
        (m["user"].as_str(), m["text"].as_str()),
        (Some("alice"), Some("hello from stomp"))
    );

    // UNSUBSCRIBE leaves the room: the native client hears it.
    s.frame("UNSUBSCRIBE", &[("id", "a"), ("receipt", "u")], "")
        .await;
    s.recv_command(Command::Receipt).await;
    let leave = bob.recv_type("presence").await;
    assert_eq!(
        (leave["user"].as_str(), leave["event"].as_str()),
        (Some("alice"), Some("leave"))
    );
    bob.say("chat.lobby", "after").await;
    match s.next(Duration::from_millis(500)).await {
        Err(End::Timeout) => {}
        other => panic!("nothing after UNSUBSCRIBE, got {other:?}"),
    }
}

#[tokio::test]
async fn frames_split_across_websocket_messages_and_several_per_message() {
    let (_d, app) = app_with(|_| {}).await;
    let mut s = Stomp::open(app.port, "/stomp").await;
    let wire = "\nCONNECT\r\naccept-version:1.2\r\nlogin:carol\r\nheart-beat:0,0\r\n\r\n\0\n\
                SUBSCRIBE\nid:0\ndestination:/sub/chat/room/split\n\n\0\n\n\
                SEND\ndestination:/pub/chat/message\ncontent-length:34\nreceipt:r\n\n{\"roomId\":\"split\",\"content\":\"a:b\"}\0";
    // One byte at a time for the first frames, the rest in one message.
    let (head, tail) = wire.split_at(60);
    for c in head.chars() {
        s.raw(&c.to_string()).await;
    }
    s.raw(tail).await;
    assert_eq!(s.recv().await.command, Command::Connected);
    s.recv_message().await; // members
    let r = s.recv_command(Command::Receipt).await;
    assert_eq!(r.header("receipt-id"), Some("r"));
    let (_, v) = s.recv_message().await;
    assert_eq!(v["content"], "a:b");
}

async fn refused(app: &TestApp, frames: &[&str]) -> chat_relay::gateway::stomp::frame::Frame {
    let (mut s, _) = Stomp::connect(app.port, "mallory", &[]).await;
    for f in frames {
        s.raw(f).await;
    }
    s.expect_error().await
}

#[tokio::test]
async fn every_refusal_is_an_error_frame_then_close() {
    let (_d, app) = app_with(|c| {
        c.stomp.stomp_max_headers = 8;
        c.stomp.stomp_max_header_bytes = 128;
        c.limits.max_frame_bytes = 4096;
        c.limits.max_text_bytes = 64;
    })
    .await;
    let cases: Vec<(Vec<String>, &str, &str)> = vec![
        (
            vec!["SUBSCRIBE\nid:0\ndestination:/topic/x\nreceipt:r1\n\n\0".into()],
            "bad_room",
            "unknown destination",
        ),
        (
            vec!["SUBSCRIBE\ndestination:/sub/chat/room/1\n\n\0".into()],
            "missing_field",
            "id",
        ),
        (
            vec!["SUBSCRIBE\nid:0\ndestination:/sub/chat/room/1\nack:sometimes\n\n\0".into()],
            "bad_frame",
            "ack",
        ),
        (
            vec!["SEND\ndestination:/pub/nowhere\n\n{}\0".into()],
            "bad_room",
            "unknown destination",
        ),
        (
            vec!["SEND\ndestination:/pub/chat/message\n\nnot json\0".into()],
            "invalid_json",
            "JSON",
        ),
        (
            vec![
                "SEND\ndestination:/pub/chat/message\n\n{\"roomId\":\"a b\",\"content\":\"x\"}\0"
                    .into(),
            ],
            "bad_room",
            "roomId",
        ),
        (
            vec![
                "SEND\ndestination:/pub/chat/message\n\n{\"roomId\":\"1\",\"content\":\" \"}\0"
                    .into(),
            ],
            "empty_text",
            "empty",
        ),
        (
            vec![format!(
                "SEND\ndestination:/pub/chat/message\n\n{{\"roomId\":\"1\",\"content\":\"{}\"}}\0",
                "x".repeat(65)
            )],
            "text_too_long",
            "longer",
        ),
        (
            vec!["SEND\ndestination:/pub/chat/message\ntransaction:t1\n\n{}\0".into()],
            "bad_frame",
            "transactions",
        ),
        (
            vec!["BEGIN\ntransaction:t1\n\n\0".into()],
            "bad_frame",
            "transactions",
        ),
        (vec!["HELLO\n\n\0".into()], "bad_frame", "unknown command"),
        (vec!["MESSAGE\n\n\0".into()], "bad_frame", "server frame"),
        (
            vec!["CONNECT\naccept-version:1.2\n\n\0".into()],
            "bad_frame",
            "already connected",
        ),
        (
            vec!["UNSUBSCRIBE\nid:nope\n\n\0".into()],
            "not_joined",
            "no subscription",
        ),
        (vec!["SEND\na:\\t\n\n\0".into()], "bad_frame", "escape"),
        (
            vec![format!(
                "SEND\n{}\n\0",
                (0..9).map(|i| format!("h{i}:v\n")).collect::<String>()
            )],
            "bad_frame",
            "headers",
        ),
        (
            vec![format!("SEND\nh:{}\n\n\0", "x".repeat(200))],
            "bad_frame",
            "longer than 128",
        ),
        // One frame over MAX_FRAME_BYTES, in WebSocket messages under it.
        (
            vec![
                "SEND\ndestination:/pub/chat/message\n\n".into(),
                "x".repeat(3000),
                "x".repeat(3000),
            ],
            "bad_frame",
            "larger than 4096",
        ),
    ];
    for (frames, code, words) in cases {
        let frames: Vec<&str> = frames.iter().map(String::as_str).collect();
        let e = refused(&app, &frames).await;
        assert_eq!(e.header("code"), Some(code), "{frames:?}: {e:?}");
        let msg = e.header("message").unwrap_or_default();
        assert!(
            msg.contains(words),
            "{frames:?}: message {msg:?} lacks {words:?}"
        );
    }
    // Every refusal is counted by code.
    let (_, metrics) = common::app::http_get(&app.http("/metrics")).await;
    let metrics = metrics.as_str().unwrap_or_default().to_string();
    let count = |code: &str| -> f64 {
        metrics
            .lines()
            .find(|l| {
                l.starts_with("stomp_errors_total") && l.contains(&format!("code=\"{code}\""))
            })
            .and_then(|l| l.rsplit(' ').next())
            .and_then(|v| v.parse().ok())
            .unwrap_or(0.0)
    };
    assert!(count("bad_room") >= 3.0, "{metrics}");
    assert!(count("bad_frame") >= 8.0, "{metrics}");
    // A refused frame's receipt is named in the ERROR.
    let e = refused(
        &app,
        &["SUBSCRIBE\nid:0\ndestination:/topic/x\nreceipt:r9\n\n\0"],
    )
    .await;
    assert_eq!(e.header("receipt-id"), Some("r9"));

    // Before CONNECT, and an unsupported version.
    let mut s = Stomp::open(app.port, "/stomp").await;
    s.frame("SEND", &[("destination", "/pub/chat/message")], "{}")
        .await;
    assert!(
        s.expect_error()
            .await
            .header("message")
            .unwrap_or_default()
            .contains("CONNECT")
    );
    let mut s = Stomp::open(app.port, "/stomp").await;
    s.frame("CONNECT", &[("accept-version", "1.0"), ("login", "x")], "")
        .await;
    assert!(
        s.expect_error()
            .await
            .header("message")
            .unwrap_or_default()
            .contains("1.2")
    );
    let mut s = Stomp::open(app.port, "/stomp").await;
    s.frame("CONNECT", &[("accept-version", "1.2")], "").await;
    assert_eq!(
        s.expect_error().await.header("code"),
        Some("unauthorized"),
        "no login"
    );
}

#[tokio::test]
async fn rate_limit_is_an_error_too() {
    let (_d, app) = app_with(|c| {
        c.limits.rate_per_sec = 1;
        c.limits.rate_burst = 2;
    })
    .await;
    let (mut s, _) = Stomp::connect(app.port, "speedy", &[]).await;
    for i in 0..3 {
        let body = json!({"roomId": "r", "content": format!("m{i}")}).to_string();
        s.frame("SEND", &[("destination", "/pub/chat/message")], &body)
            .await;
    }
    let e = s.expect_error().await;
    assert_eq!(e.header("code"), Some("rate_limited"));
}

#[tokio::test]
async fn heart_beats_are_sent_and_a_silent_client_is_closed() {
    let (_d, app) = app_with(|c| c.stomp.stomp_heartbeat_ms = 200).await;
    let (mut s, c) = Stomp::connect(app.port, "hb", &[("heart-beat", "100,100")]).await;
    assert_eq!(c.header("heart-beat"), Some("200,200"));
    // The client keeps beating for a second: the connection stays, and the
    // server's own beats (every max(200, 100) ms) arrive.
    for _ in 0..10 {
        s.raw("\n").await;
        match s.next(Duration::from_millis(100)).await {
            Err(End::Timeout) => {}
            other => panic!("open while beating: {other:?}"),
        }
    }
    assert!(s.heartbeats >= 3, "server heart-beats: {}", s.heartbeats);
    // Silence: closed after max(100, 200) ms plus grace, with an ERROR.
    let t = std::time::Instant::now();
    let e = s.expect_error().await;
    assert!(
        e.header("message")
            .unwrap_or_default()
            .contains("heart-beat")
    );
    assert!(t.elapsed() < Duration::from_secs(5));

    // heart-beat 0,0: nothing sent, nothing required.
    let (mut s, c) = Stomp::connect(app.port, "quiet", &[("heart-beat", "0,0")]).await;
    assert_eq!(c.header("heart-beat"), Some("200,200"));
    assert_eq!(
        s.next(Duration::from_millis(700)).await.err(),
        Some(End::Timeout)
    );
    assert_eq!(s.heartbeats, 0);
}

#[tokio::test]
async fn a_socket_that_never_connects_is_closed() {
    let (_d, app) = app_with(|c| c.stomp.stomp_connect_timeout_ms = 300).await;
    let mut s = Stomp::open(app.port, "/stomp").await;
    let e = s.expect_error().await;
    assert!(e.header("message").unwrap_or_default().contains("CONNECT"));
}

#[tokio::test]
async fn disconnect_receipt_follows_every_earlier_send() {
    let (_d, app) = app_with(|_| {}).await;
    let mut bob = app.client("bob").await;
    bob.join("chat.bye", None).await;
    let (mut s, _) = Stomp::connect(app.port, "dora", &[]).await;
    for i in 0..5 {
        let body = json!({"roomId": "bye", "content": format!("m{i}")}).to_string();
        s.frame("SEND", &[("destination", "/pub/chat/message")], &body)
            .await;
    }
    s.frame("DISCONNECT", &[("receipt", "77")], "").await;
    let r = s.recv_command(Command::Receipt).await;
    assert_eq!(r.header("receipt-id"), Some("77"));
    assert!(matches!(
        s.next(Duration::from_secs(5)).await,
        Err(End::Closed(_))
    ));
    let mut got = Vec::new();
    while got.len() < 5 {
        let m = bob.recv_type("message").await;
        got.push(m["text"].as_str().unwrap_or_default().to_string());
    }
    assert_eq!(got, ["m0", "m1", "m2", "m3", "m4"], "all sent, in order");
}

#[tokio::test]
async fn with_auth_on_the_token_names_the_user_and_its_rooms() {
    let (_d, app) = app_with(|c| c.auth.auth_jwt_secret = Some(SECRET.into())).await;
    // No token: ERROR unauthorized.
    let (mut s, f) = Stomp::connect(app.port, "alice", &[]).await;
    assert_eq!(f.command, Command::Error);
    assert_eq!(f.header("code"), Some("unauthorized"));
    assert!(matches!(
        s.next(Duration::from_secs(5)).await,
        Err(End::Closed(_))
    ));
    // A bad token.
    let (_, f) = Stomp::connect(app.port, "alice", &[("passcode", "not-a-jwt")]).await;
    assert_eq!(f.header("code"), Some("unauthorized"));

    let t = token(json!({"sub": "erin", "exp": exp(), "rooms": ["chat.ok"]}));
    // passcode (Spring's login/passcode): the name is the token's, not `login`.
    let (_, f) = Stomp::connect(app.port, "impostor", &[("passcode", &t)]).await;
    assert_eq!(f.command, Command::Connected);
    assert_eq!(f.header("user-name"), Some("erin"));
    // Authorization: Bearer in CONNECT.
    let bearer = format!("Bearer {t}");
    let (mut s, f) = Stomp::connect(app.port, "", &[("Authorization", &bearer)]).await;
    assert_eq!(f.header("user-name"), Some("erin"));
    s.subscribe("0", "/sub/chat/room/ok").await;
    s.frame(
        "SUBSCRIBE",
        &[("id", "1"), ("destination", "/sub/chat/room/other")],
        "",
    )
    .await;
    assert_eq!(s.expect_error().await.header("code"), Some("forbidden"));
    // SEND into a room the token does not allow, without subscribing.
    let (mut s, _) = Stomp::connect(app.port, "", &[("passcode", &t)]).await;
    let body = json!({"roomId": "other", "content": "x"}).to_string();
    s.frame("SEND", &[("destination", "/pub/chat/message")], &body)
        .await;
    assert_eq!(s.expect_error().await.header("code"), Some("forbidden"));
    // ?token= on the upgrade, for clients that cannot set CONNECT headers.
    let mut s = Stomp::open(app.port, &format!("/stomp?token={t}")).await;
    s.frame("CONNECT", &[("accept-version", "1.2")], "").await;
    assert_eq!(s.recv().await.header("user-name"), Some("erin"));
}

#[tokio::test]
async fn versions_names_limits_and_shared_subscriptions() {
    let (_d, app) = app_with(|c| {
        c.limits.max_rooms_per_conn = 2;
        c.limits.max_members_per_room = 1;
    })
    .await;
    // 1.1 when that is all the client accepts; the name from ?user=.
    let mut s = Stomp::open(app.port, "/stomp?user=olga").await;
    s.frame("CONNECT", &[("accept-version", "1.0,1.1")], "")
        .await;
    let c = s.recv().await;
    assert_eq!(
        (c.header("version"), c.header("user-name")),
        (Some("1.1"), Some("olga"))
    );

    // Two subscriptions to one room: one member; the room stays joined until
    // the last one goes.
    s.subscribe("x", "/sub/chat/room/two").await;
    s.subscribe("y", "/sub/chat/room/two").await;
    let id = s
        .send("/pub/chat/message", "two", "once per subscription")
        .await;
    let mut subs = Vec::new();
    while subs.len() < 2 {
        let (f, v) = s.recv_message().await;
        if v["id"] == id.as_str() {
            subs.push(f.header("subscription").unwrap_or_default().to_string());
        }
    }
    subs.sort();
    assert_eq!(subs, ["x", "y"]);
    // MAX_ROOMS_PER_CONN bounds subscriptions.
    s.frame(
        "SUBSCRIBE",
        &[("id", "z"), ("destination", "/sub/chat/room/three")],
        "",
    )
    .await;
    assert_eq!(
        s.expect_error().await.header("code"),
        Some("too_many_rooms")
    );

    // MAX_MEMBERS_PER_ROOM: the room already has a member on this instance.
    let (mut a, _) = Stomp::connect(app.port, "first", &[]).await;
    a.subscribe("0", "/sub/chat/room/full").await;
    let (mut b, _) = Stomp::connect(app.port, "second", &[]).await;
    b.frame(
        "SUBSCRIBE",
        &[("id", "0"), ("destination", "/sub/chat/room/full")],
        "",
    )
    .await;
    assert_eq!(b.expect_error().await.header("code"), Some("room_full"));
}

/// The memory bus with a switch that makes it refuse publishes, as a broker
/// that went away does (delivery is the memory bus's, nothing mocked).
struct Switchable {
    inner: chat_relay::bus::memory::MemoryBus,
    down: std::sync::atomic::AtomicBool,
}

#[async_trait::async_trait]
impl chat_relay::bus::MessageBus for Switchable {
    fn backend(&self) -> &'static str {
        "memory"
    }
    fn capabilities(&self) -> chat_relay::bus::Capabilities {
        self.inner.capabilities()
    }
    async fn publish(
        &self,
        msg: chat_relay::bus::Outgoing,
    ) -> Result<(), chat_relay::bus::BusError> {
        if self.down.load(std::sync::atomic::Ordering::SeqCst) {
            return Err(chat_relay::bus::BusError::Unavailable("broker down".into()));
        }
        self.inner.publish(msg).await
    }
    async fn subscribe(
        &self,
        opts: chat_relay::bus::SubscribeOptions,
    ) -> Result<chat_relay::bus::Subscription, chat_relay::bus::BusError> {
        self.inner.subscribe(opts).await
    }
    async fn ready(&self) -> Result<(), chat_relay::bus::BusError> {
        self.inner.ready().await
    }
}

#[tokio::test]
async fn a_send_the_bus_refuses_is_an_error_naming_its_receipt() {
    let bus = std::sync::Arc::new(Switchable {
        inner: chat_relay::bus::memory::MemoryBus::new(Default::default()),
        down: false.into(),
    });
    let (_d, db) = sqlite_db();
    let app = common::app::spawn_app_on(test_config(&db), bus.clone()).await;
    let (mut s, _) = Stomp::connect(app.port, "unlucky", &[]).await;
    s.send("/pub/chat/message", "b", "while up").await;
    bus.down.store(true, std::sync::atomic::Ordering::SeqCst);
    let body = json!({"roomId": "b", "content": "while down"}).to_string();
    s.frame(
        "SEND",
        &[("destination", "/pub/chat/message"), ("receipt", "r-down")],
        &body,
    )
    .await;
    let e = s.expect_error().await;
    assert_eq!(e.header("code"), Some("bus_unavailable"), "{e:?}");
    assert_eq!(e.header("receipt-id"), Some("r-down"));
    assert!(e.header("message").unwrap_or_default().contains("not sent"));
}
