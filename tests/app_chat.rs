//! End-to-end tests of the relay on the embedded default (memory bus), with
//! real WebSocket clients against an app bound to port 0.
mod common;

use std::time::Duration;

use chat_relay::config::Role;
use common::app::*;
use serde_json::json;
use tokio_tungstenite::tungstenite::Message;

#[tokio::test]
async fn two_clients_see_each_other_in_order_with_acks() {
    let (_dir, db) = sqlite_db();
    let app = spawn_app(test_config(&db)).await;
    let mut a = app.client("alice").await;
    let mut b = app.client("bob").await;
    let (ja, _) = a.join("chat.lobby", None).await;
    assert_eq!(ja["recovered"], false);
    let (jb, _) = b.join("chat.lobby", None).await;
    assert!(jb["members"].as_array().unwrap().contains(&json!("alice")));
    // Alice sees bob's arrival.
    let p = a.recv_type("presence").await;
    assert_eq!(
        p,
        json!({"type":"presence","room":"chat.lobby","user":"bob","event":"join","instance":app.instance})
    );

    for i in 0..20 {
        a.say("chat.lobby", &format!("a{i}")).await;
        b.say("chat.lobby", &format!("b{i}")).await;
    }
    for c in [&mut a, &mut b] {
        let (mut acks, mut msgs) = (Vec::new(), Vec::new());
        while acks.len() < 20 || msgs.len() < 40 {
            let v = c.recv().await;
            match v["type"].as_str() {
                Some("ack") => acks.push(v),
                Some("message") => msgs.push(v),
                other => panic!("unexpected {other:?}: {v}"),
            }
        }
        let from = |u: &str| -> Vec<String> {
            msgs.iter()
                .filter(|m| m["user"] == u)
                .map(|m| m["text"].as_str().unwrap().to_string())
                .collect()
        };
        assert_eq!(
            from("alice"),
            (0..20).map(|i| format!("a{i}")).collect::<Vec<_>>()
        );
        assert_eq!(
            from("bob"),
            (0..20).map(|i| format!("b{i}")).collect::<Vec<_>>()
        );
        // Ids are time-ordered in delivery order.
        let ids: Vec<&str> = msgs.iter().map(|m| m["id"].as_str().unwrap()).collect();
        let mut sorted = ids.clone();
        sorted.sort();
        assert_eq!(ids, sorted);
        assert!(
            msgs.iter()
                .all(|m| m["kind"] == "chat" && m["ts"].as_i64().unwrap() > 0)
        );
        assert!(
            acks.iter()
                .all(|a| a["cid"].as_str().unwrap().starts_with('c'))
        );
    }
    app.stop().await;
}

#[tokio::test]
async fn history_and_since_recovery() {
    let (_dir, db) = sqlite_db();
    let app = spawn_app(test_config(&db)).await;
    let mut a = app.client("alice").await;
    a.join("chat.hist", None).await;
    for i in 0..5 {
        a.say("chat.hist", &format!("m{i}")).await;
    }
    let mut ids = Vec::new();
    while ids.len() < 5 {
        let v = a.recv_type("message").await;
        ids.push(v["id"].as_str().unwrap().to_string());
    }
    // A newcomer gets the history (ring + DB).
    let mut b = app.client("bob").await;
    let (_, hist) = b.join("chat.hist", None).await;
    let texts: Vec<&str> = hist.iter().map(|m| m["text"].as_str().unwrap()).collect();
    assert_eq!(texts, ["m0", "m1", "m2", "m3", "m4"]);

    // Bob drops after m1, alice goes on; bob resumes with since=m1: gap-free, no dups.
    drop(b);
    for i in 5..8 {
        a.say("chat.hist", &format!("m{i}")).await;
    }
    let mut c = app.client("bob").await;
    let (joined, rec) = c.join("chat.hist", Some(&ids[1])).await;
    assert_eq!(joined["recovered"], true);
    let texts: Vec<&str> = rec.iter().map(|m| m["text"].as_str().unwrap()).collect();
    assert_eq!(texts, ["m2", "m3", "m4", "m5", "m6", "m7"]);

    // The DB has them too (wait for the persistence batch).
    eventually(Duration::from_secs(10), "8 rows", || async {
        let (_, v) = app.get_json("/api/rooms/chat.hist/messages?limit=50").await;
        v["messages"].as_array().map(|a| a.len()) == Some(8)
    })
    .await;
    let (_, v) = app
        .get_json(&format!(
            "/api/rooms/chat.hist/messages?limit=2&before={}",
            ids[3]
        ))
        .await;
    let t: Vec<&str> = v["messages"]
        .as_array()
        .unwrap()
        .iter()
        .map(|m| m["text"].as_str().unwrap())
        .collect();
    assert_eq!(t, ["m1", "m2"]);

    // Recovery from a fresh instance with an empty ring reads the DB only.
    app.stop().await;
    let app2 = spawn_app(test_config(&db)).await;
    let mut d = app2.client("dave").await;
    let (joined, rec) = d.join("chat.hist", Some(&ids[3])).await;
    assert_eq!(joined["recovered"], true);
    assert_eq!(rec.len(), 4);
    // An unknown `since` cannot be vouched for: recovered=false, latest history sent.
    let mut e = app2.client("erin").await;
    let (joined, rec) = e
        .join("chat.hist", Some("01ZZZZZZZZZZZZZZZZZZZZZZZZ"))
        .await;
    assert_eq!(joined["recovered"], false);
    assert!(rec.is_empty());
    let (joined, _) = e.join("chat.hist", Some("not-an-id")).await;
    assert_eq!(joined["recovered"], false);
    app2.stop().await;
}

#[tokio::test]
async fn bad_input_gets_error_frames_and_the_connection_stays_usable() {
    let (_dir, db) = sqlite_db();
    let app = spawn_app(test_config(&db)).await;
    let mut c = app.client("carol").await;
    let cases: Vec<(Message, &str)> = vec![
        (Message::Text("{not json".into()), "invalid_json"),
        (Message::Text("[1,2]".into()), "bad_frame"),
        (Message::Text(r#"{"type":"dance"}"#.into()), "unknown_type"),
        (
            Message::Text(r#"{"room":"chat.a"}"#.into()),
            "missing_field",
        ),
        (Message::Text(r#"{"type":"join"}"#.into()), "missing_field"),
        (
            Message::Text(r#"{"type":"send","room":"chat.a","cid":"x"}"#.into()),
            "missing_field",
        ),
        (
            Message::Text(r#"{"type":"join","room":"lobby"}"#.into()),
            "bad_room",
        ),
        (
            Message::Text(r#"{"type":"join","room":"chat.<script>"}"#.into()),
            "bad_room",
        ),
        (
            Message::Text(
                r#"{"type":"send","room":"chat.notjoined","text":"hi","cid":"n1"}"#.into(),
            ),
            "not_joined",
        ),
        (
            Message::Text(r#"{"type":"leave","room":"chat.notjoined"}"#.into()),
            "not_joined",
        ),
        (
            Message::Text(r#"{"type":"send","room":"chat.a","text":"   ","cid":"e"}"#.into()),
            "empty_text",
        ),
        (
            Message::Binary(vec![1u8, 2, 3].into()),
            "binary_not_supported",
        ),
    ];
    for (m, code) in cases {
        c.send_raw(m).await;
        let v = c.recv().await;
        assert_eq!(v["type"], "error", "{v}");
        assert_eq!(v["code"], code, "{v}");
        assert!(v["message"].as_str().is_some_and(|s| !s.is_empty()));
    }
    // The cid is echoed so a client can match the error to its send.
    c.send(json!({"type":"send","room":"chat.notjoined","text":"x","cid":"k9"}))
        .await;
    assert_eq!(c.recv().await["cid"], "k9");
    // Text over the limit (4 KiB default).
    c.join("chat.a", None).await;
    c.send(json!({"type":"send","room":"chat.a","text":"x".repeat(4097),"cid":"big"}))
        .await;
    let v = c.recv().await;
    assert_eq!(
        (v["code"].as_str(), v["cid"].as_str()),
        (Some("text_too_long"), Some("big"))
    );
    // Still usable.
    c.say("chat.a", "still here").await;
    let (ack, m) = c.recv_ack_and_message().await;
    assert_eq!(ack["type"], "ack");
    assert_eq!(m["text"], "still here");
    // A frame over 64 KiB closes with 1009.
    c.send_raw(Message::Text("y".repeat(70_000).into())).await;
    assert_eq!(c.recv_close().await, Some(1009));
    app.stop().await;
}

#[tokio::test]
async fn bad_user_names_are_refused_with_a_reason() {
    let (_dir, db) = sqlite_db();
    let app = spawn_app(test_config(&db)).await;
    for url in [
        format!("ws://127.0.0.1:{}/ws", app.port),
        app.ws_url(""),
        app.ws_url(&"x".repeat(33)),
    ] {
        let mut c = Client::connect(&url).await;
        let v = c.recv().await;
        assert_eq!(v["type"], "error");
        assert_eq!(v["code"], "bad_frame");
        assert_eq!(c.recv_close().await, Some(1008));
    }
    app.stop().await;
}

#[tokio::test]
async fn rate_limit_answers_rate_limited() {
    let (_dir, db) = sqlite_db();
    let mut cfg = test_config(&db);
    cfg.limits.rate_per_sec = 1;
    cfg.limits.rate_burst = 3;
    let app = spawn_app(cfg).await;
    let mut c = app.client("speedy").await;
    c.join("chat.fast", None).await;
    for i in 0..6 {
        c.say("chat.fast", &format!("{i}")).await;
    }
    let (mut acks, mut limited) = (0, 0);
    while acks + limited < 6 {
        let v = c.recv().await;
        match v["type"].as_str() {
            Some("ack") => acks += 1,
            Some("error") => {
                assert_eq!(v["code"], "rate_limited");
                limited += 1;
            }
            _ => {}
        }
    }
    assert_eq!((acks, limited), (3, 3));
    app.stop().await;
}

/// Frames a socket cannot take at once are queued and written later, after
/// the ones before them and before the ones after them: a client that stops
/// reading for longer than the kernel's buffers hold (9 MB here) gets every
/// message, in order, once it reads again.
#[tokio::test]
async fn a_client_that_stops_reading_gets_everything_in_order_later() {
    let (_dir, db) = sqlite_db();
    let mut cfg = test_config(&db);
    cfg.limits.outbound_queue = 4096;
    let app = spawn_app(cfg).await;
    let mut paused = app.client("paused").await;
    paused.join("chat.backlog", None).await;
    let mut sender = app.client("sender").await;
    sender.join("chat.backlog", None).await;
    let n = 3000;
    let pad = "z".repeat(3000);
    for i in 0..n {
        sender.say("chat.backlog", &format!("{i} {pad}")).await;
        sender.recv_type("ack").await;
    }
    let mut next = 0;
    while next < n {
        let v = paused.recv().await;
        if v["type"] == "message" && v["user"] == "sender" {
            let text = v["text"].as_str().unwrap_or_default();
            let i: usize = text.split(' ').next().unwrap_or("").parse().unwrap();
            assert_eq!(i, next, "frames arrive in the order they were sent");
            next += 1;
        }
    }
    app.stop().await;
}

#[tokio::test]
async fn slow_client_is_disconnected_without_slowing_others() {
    let (_dir, db) = sqlite_db();
    let mut cfg = test_config(&db);
    cfg.limits.outbound_queue = 8;
    let app = spawn_app(cfg).await;
    let mut slow = app.client("slow").await;
    slow.join("chat.flood", None).await;
    let mut fast = app.client("fast").await;
    fast.join("chat.flood", None).await;
    let mut sender = app.client("sender").await;
    sender.join("chat.flood", None).await;
    let n = 1500;
    let body = "z".repeat(3000);
    let reader = tokio::spawn(async move {
        let mut got = 0;
        while got < n {
            let v = fast.recv().await;
            if v["type"] == "message" && v["user"] == "sender" {
                got += 1;
            }
        }
        got
    });
    for _ in 0..n {
        sender.say("chat.flood", &body).await;
        // The sender reads its own echoes and acks, so it is not slow itself.
        sender.recv_type("ack").await;
    }
    assert_eq!(reader.await.unwrap(), n, "the fast client got everything");
    // The slow one, once it reads, finds a 1013 close after its backlog.
    assert_eq!(slow.recv_close().await, Some(1013));
    app.stop().await;
}

#[tokio::test]
async fn graceful_shutdown_flushes_and_closes_sockets() {
    let (_dir, db) = sqlite_db();
    let mut cfg = test_config(&db);
    cfg.persist.batch_wait_ms = 2000; // a batch is certainly in flight at shutdown
    cfg.persist.batch_size = 10_000;
    let app = spawn_app(cfg).await;
    let store = app.store.clone();
    let mut c = app.client("last").await;
    c.join("chat.bye", None).await;
    for i in 0..50 {
        c.say("chat.bye", &format!("{i}")).await;
    }
    let mut acks = 0;
    while acks < 50 {
        if c.recv().await["type"] == "ack" {
            acks += 1;
        }
    }
    app.token.cancel();
    assert_eq!(c.recv_close().await, Some(1001));
    let _ = tokio::time::timeout(Duration::from_secs(20), app.handle).await;
    let store2 = chat_relay::store::Store::connect(&db).await.unwrap();
    assert_eq!(store2.count_messages(None).await.unwrap(), 50);
    drop(store);
}

#[tokio::test]
async fn health_ready_metrics_and_static_client() {
    let (_dir, db) = sqlite_db();
    let app = spawn_app(test_config(&db)).await;
    assert_eq!(app.get_json("/healthz").await.0, 200);
    let (s, v) = app.get_json("/readyz").await;
    assert_eq!(s, 200, "{v}");
    assert_eq!(v["bus"], "ok");
    let (s, v) = app.get_json("/api/rooms/nope/messages").await;
    assert_eq!((s, v["error"]["code"].as_str()), (400, Some("bad_room")));
    let (s, v) = app.get_json("/api/rooms/chat.x/messages?limit=0").await;
    assert_eq!((s, v["error"]["code"].as_str()), (400, Some("bad_limit")));
    let (s, v) = app.get_json("/api/stats").await;
    assert_eq!((s, v["backend"].as_str()), (200, Some("memory")));
    let mut c = app.client("m").await;
    c.join("chat.metrics", None).await;
    c.say("chat.metrics", "count me").await;
    c.recv_type("message").await;
    // Bots and the AI game master post over HTTP; members get it like any message.
    let (s, v) = http_request(
        "POST",
        &app.http("/api/rooms/chat.metrics/messages"),
        Some(r#"{"user":"gm","text":"a dragon appears"}"#),
    )
    .await;
    assert_eq!(s, 202, "{v}");
    let m = c.recv_type("message").await;
    assert_eq!(
        (m["user"].as_str(), m["text"].as_str(), m["id"].as_str()),
        (Some("gm"), Some("a dragon appears"), v["id"].as_str())
    );
    let (s, v) = http_request(
        "POST",
        &app.http("/api/rooms/bad/messages"),
        Some(r#"{"user":"gm","text":"x"}"#),
    )
    .await;
    assert_eq!((s, v["error"]["code"].as_str()), (400, Some("bad_room")));
    let (s, v) = http_request(
        "POST",
        &app.http("/api/rooms/chat.x/messages"),
        Some("{nope"),
    )
    .await;
    assert_eq!((s, v["error"]["code"].as_str()), (400, Some("bad_frame")));
    let (s, body) = app.get_json("/metrics").await;
    assert_eq!(s, 200);
    let body = body.as_str().unwrap_or_default().to_string();
    for m in [
        "ws_connections",
        "messages_in_total",
        "publish_latency_seconds",
        "messages_out_total",
    ] {
        assert!(body.contains(m), "metric {m} missing");
    }
    app.stop().await;
}

#[tokio::test]
async fn roles_can_run_separately() {
    // Gateway and persistence as separate applications on one bus.
    let (_dir, db) = sqlite_db();
    let bus: std::sync::Arc<dyn chat_relay::bus::MessageBus> =
        std::sync::Arc::new(chat_relay::bus::memory::MemoryBus::new(Default::default()));
    let mut g = test_config(&db);
    roles(&mut g, &[Role::Gateway]);
    let gateway = spawn_app_on(g, bus.clone()).await;
    let mut p = test_config(&db);
    roles(&mut p, &[Role::Persist]);
    let persist = spawn_app_on(p, bus.clone()).await;
    // The worker-only process still serves health and metrics, but no /ws.
    assert_eq!(persist.get_json("/healthz").await.0, 200);
    assert_eq!(persist.get_json("/readyz").await.0, 200);
    assert_eq!(persist.get_json("/ws?user=x").await.0, 404);
    let mut c = gateway.client("sep").await;
    c.join("chat.sep", None).await;
    c.say("chat.sep", "hello").await;
    c.recv_type("ack").await;
    let store = persist.store.clone();
    eventually(
        Duration::from_secs(10),
        "row written by the persist role",
        || {
            let store = store.clone();
            async move { store.count_messages(None).await.unwrap() == 1 }
        },
    )
    .await;
    gateway.stop().await;
    persist.stop().await;
}

/// A `cid` claim left unconfirmed by a gateway that died mid-send does not
/// block the retry: once it is older than two publish timeouts, the retry
/// publishes (taking the claim over) — or, when the original message is
/// stored after all, is answered with its id without publishing again.
#[tokio::test]
async fn a_dead_gateways_unconfirmed_claim_does_not_block_the_retry() {
    let (_d, db) = sqlite_db();
    let mut cfg = test_config(&db);
    cfg.limits.publish_timeout_ms = 200;
    let app = spawn_app(cfg).await;
    let room = chat_relay::protocol::RoomId::parse("chat.claims").unwrap();
    // What a gateway that died between claim and publish leaves behind.
    assert!(
        app.store
            .claim_send(&room, "ivy", "r1", "01DEAD")
            .await
            .unwrap()
            .is_none()
    );
    // One whose message was published and stored, but never settled.
    assert!(
        app.store
            .claim_send(&room, "ivy", "r2", "01STORED")
            .await
            .unwrap()
            .is_none()
    );
    let stored = chat_relay::protocol::ChatMessage {
        room: room.clone(),
        id: "01STORED".into(),
        user: "ivy".into(),
        text: "stored".into(),
        ts: 1,
        kind: chat_relay::protocol::MessageKind::Chat,
        seq: None,
    };
    app.store.insert_messages(&[stored]).await.unwrap();
    tokio::time::sleep(Duration::from_millis(500)).await;

    let mut c = app.client("ivy").await;
    c.join("chat.claims", None).await;
    c.send(json!({"type": "send", "room": "chat.claims", "text": "retried", "cid": "r1"}))
        .await;
    let (ack, m) = c.recv_ack_and_message().await;
    assert_ne!(ack["id"], "01DEAD", "published anew: {ack}");
    assert_eq!(
        (m["text"].as_str(), &m["id"]),
        (Some("retried"), &ack["id"])
    );

    c.send(json!({"type": "send", "room": "chat.claims", "text": "stored", "cid": "r2"}))
        .await;
    let ack = c.recv_type("ack").await;
    assert_eq!(ack["id"], "01STORED", "the stored original: {ack}");
    // Not published a second time.
    while let Some(v) = c.try_recv(Duration::from_millis(500)).await {
        assert_ne!(v["type"], "message", "no second copy: {v}");
    }
    app.stop().await;
}

/// A message the bus hands over twice (Kafka after a lost answer, a
/// catch-up racing the live stream) reaches each socket once, and the drop
/// is counted; a late message with a new id, even below the room's last
/// position, is still delivered.
#[tokio::test]
async fn a_message_the_bus_repeats_reaches_each_socket_once() {
    use chat_relay::bus::{MessageBus, Outgoing, Priority};
    let (_dir, db) = sqlite_db();
    let bus: std::sync::Arc<dyn MessageBus> =
        std::sync::Arc::new(chat_relay::bus::memory::MemoryBus::new(Default::default()));
    let app = spawn_app_on(test_config(&db), bus.clone()).await;
    let (mut a, mut b) = (app.client("ann").await, app.client("bob").await);
    a.join("chat.twice", None).await;
    b.join("chat.twice", None).await;
    a.say("chat.twice", "one").await;
    let one = b.recv_type("message").await;
    a.say("chat.twice", "two").await;
    let two = b.recv_type("message").await;
    assert_eq!(two["text"], "two");
    let room = chat_relay::protocol::RoomId::parse("chat.twice").unwrap();
    let republish = |frame: serde_json::Value| {
        let (bus, room) = (bus.clone(), room.clone());
        async move {
            bus.publish(Outgoing {
                room,
                payload: bytes::Bytes::from(frame.to_string()),
                priority: Priority::Normal,
            })
            .await
            .expect("publish");
        }
    };
    // The same message again (the bus payload is the client frame).
    republish(two.clone()).await;
    republish(one.clone()).await;
    // A late message: an older position, but a message not seen here.
    let mut late = one.clone();
    late["id"] = json!("01LATEMESSAGE0000000000000");
    late["text"] = json!("late");
    republish(late).await;
    a.say("chat.twice", "three").await;
    let texts: Vec<String> = [b.recv_type("message").await, b.recv_type("message").await]
        .iter()
        .map(|m| m["text"].as_str().unwrap_or_default().to_string())
        .collect();
    assert_eq!(
        texts,
        ["late", "three"],
        "the repeats were dropped, the late one was not"
    );
    assert!(b.try_recv(Duration::from_millis(300)).await.is_none());
    let (_, m) = app.get_json("/metrics").await;
    let m = m.as_str().unwrap_or_default().to_string();
    assert!(
        m.lines()
            .any(|l| l.starts_with("live_duplicates_dropped_total") && l.ends_with(" 2")),
        "two repeats counted:\n{}",
        m.lines()
            .filter(|l| l.contains("duplicates"))
            .collect::<Vec<_>>()
            .join("\n")
    );
    app.stop().await;
}
