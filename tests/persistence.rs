//! Persistence and analytics workers against both databases: SQLite (a temp
//! file) and the real PostgreSQL on 127.0.0.1:5432 (`TEST_DATABASE_URL`).
mod common;

use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use chat_relay::bus::memory::MemoryBus;
use chat_relay::bus::{MessageBus, Outgoing, Priority};
use chat_relay::config::{Config, Role};
use chat_relay::protocol::{BusEvent, ChatMessage, MessageKind, RoomId};
use chat_relay::store::Store;
use common::app::*;
use serde_json::json;
use tokio_util::sync::CancellationToken;

fn msg(room: &RoomId, id: String, user: &str, ts: i64) -> ChatMessage {
    ChatMessage {
        room: room.clone(),
        id,
        user: user.into(),
        text: format!("hello from {user}"),
        ts,
        kind: MessageKind::Chat,
        seq: None,
    }
}

async fn publish(bus: &dyn MessageBus, m: &ChatMessage) {
    bus.publish(Outgoing {
        room: m.room.clone(),
        payload: Bytes::from(BusEvent::Message(m.clone()).to_json()),
        priority: Priority::Normal,
    })
    .await
    .expect("publish");
}

/// The persistence worker is aborted (crash-style: no flush, no acks) in the
/// middle of a stream; a new one takes over. Every message ends up stored
/// exactly once: unacked deliveries come back and the insert is idempotent.
async fn crash_restart_without_duplicates(db: &str) {
    let bus = Arc::new(MemoryBus::new(Default::default()));
    let store = Store::connect(db).await.expect("db");
    let mut cfg = Config::from_env().expect("cfg").persist;
    cfg.batch_size = 50;
    cfg.batch_wait_ms = 30;
    let spawn = |bus: Arc<MemoryBus>, store: Store, cfg| {
        let token = CancellationToken::new();
        (
            tokio::spawn(chat_relay::workers::persist::run(
                bus,
                store,
                cfg,
                tokio::sync::watch::channel(false).0,
                token.clone(),
            )),
            token,
        )
    };
    let (w1, _t1) = spawn(bus.clone(), store.clone(), cfg.clone());
    tokio::time::sleep(Duration::from_millis(100)).await;
    let room = RoomId::parse("chat.crash").unwrap();
    let ids = chat_relay::ids::IdGen::default();
    let n = 2000;
    let msgs: Vec<ChatMessage> = (0..n)
        .map(|i| msg(&room, ids.next(), &format!("u{}", i % 7), 1))
        .collect();
    let publisher = {
        let (bus, msgs) = (bus.clone(), msgs.clone());
        tokio::spawn(async move {
            for m in &msgs {
                publish(bus.as_ref(), m).await;
            }
        })
    };
    // Crash while rows are flowing.
    let s = store.clone();
    eventually(Duration::from_secs(20), "some rows written", || {
        let s = s.clone();
        async move { s.count_messages(None).await.unwrap() > 100 }
    })
    .await;
    w1.abort();
    let _ = w1.await;
    let at_crash = store.count_messages(None).await.unwrap();
    assert!(at_crash < n as i64, "crash happened mid-stream");
    // Replays of already-stored messages (a redelivery after commit-before-ack).
    for m in msgs.iter().take(20) {
        publish(bus.as_ref(), m).await;
    }
    let (w2, t2) = spawn(bus.clone(), store.clone(), cfg.clone());
    publisher.await.unwrap();
    let s = store.clone();
    eventually(Duration::from_secs(30), "all rows", || {
        let s = s.clone();
        async move { s.count_messages(None).await.unwrap() >= n as i64 }
    })
    .await;
    tokio::time::sleep(Duration::from_millis(300)).await;
    assert_eq!(
        store.count_messages(Some(&room)).await.unwrap(),
        n as i64,
        "exactly once"
    );
    // Every id present, in order, once.
    let all = store.after(&room, "", n as i64 + 10).await.unwrap();
    let got: Vec<&str> = all.iter().map(|m| m.id.as_str()).collect();
    let want: Vec<&str> = msgs.iter().map(|m| m.id.as_str()).collect();
    assert_eq!(got, want);
    t2.cancel();
    let _ = w2.await;
}

#[tokio::test]
async fn crash_restart_without_duplicates_sqlite() {
    let (_d, db) = sqlite_db();
    crash_restart_without_duplicates(&db).await;
}

#[tokio::test]
async fn crash_restart_without_duplicates_postgres() {
    crash_restart_without_duplicates(&pg_db().await).await;
}

/// The bulk insert counts only new rows: a batch that repeats an id inside
/// itself and one already stored writes each message once, and larger than
/// one statement's worth on SQLite (chunked) as on PostgreSQL (one UNNEST).
async fn bulk_insert_is_idempotent(db: &str) {
    let store = Store::connect(db).await.expect("store");
    let room = RoomId::parse("chat.bulk").expect("room");
    let ids: Vec<String> = (0..2500).map(|_| ulid::Ulid::new().to_string()).collect();
    let first: Vec<ChatMessage> = ids[..10]
        .iter()
        .map(|id| msg(&room, id.clone(), "a", 1))
        .collect();
    assert_eq!(store.insert_messages(&first).await.expect("insert"), 10);
    // 2,500 distinct ids, 10 of them stored already, plus one repeated in the batch.
    let mut batch: Vec<ChatMessage> = ids
        .iter()
        .map(|id| msg(&room, id.clone(), "b", 2))
        .collect();
    batch.push(msg(&room, ids[2000].clone(), "b", 2));
    assert_eq!(store.insert_messages(&batch).await.expect("insert"), 2490);
    assert_eq!(
        store.count_messages(Some(&room)).await.expect("count"),
        2500
    );
    // The first write wins: a redelivery never rewrites a stored message.
    let h = store.history(&room, None, 3000).await.expect("history");
    assert_eq!(h.iter().filter(|m| m.user == "a").count(), 10);
}

#[tokio::test]
async fn bulk_insert_is_idempotent_sqlite() {
    let (_d, db) = sqlite_db();
    bulk_insert_is_idempotent(&db).await;
}

#[tokio::test]
async fn bulk_insert_is_idempotent_postgres() {
    bulk_insert_is_idempotent(&pg_db().await).await;
}

/// A scripted conversation through the real app; `/api/stats` must show the
/// exact numbers, and the flooder is flagged with a system message in the room.
async fn analytics_numbers(db: &str) {
    let mut cfg = test_config(db);
    cfg.analytics.flood_max_per_min = 5;
    let app = spawn_app(cfg).await;
    let room = "chat.tavern";
    let mut clients = Vec::new();
    for (user, n) in [("alice", 3), ("bob", 2), ("carol", 7)] {
        let mut c = app.client(user).await;
        c.join(room, None).await;
        for i in 0..n {
            c.say(room, &format!("{user} {i}")).await;
            c.recv_type("ack").await;
        }
        clients.push(c);
    }
    // Somebody quiet in another room.
    let mut d = app.client("dave").await;
    d.join("ai.quest", None).await;
    d.say("ai.quest", "hi").await;
    d.recv_type("ack").await;

    // The flood warning arrives in the room as a system message.
    let alice = &mut clients[0];
    let warn = loop {
        let v = alice.recv_type("message").await;
        if v["kind"] == "system" {
            break v;
        }
    };
    assert_eq!(warn["user"], "system");
    assert!(warn["text"].as_str().unwrap().contains("carol"), "{warn}");

    let mut last = json!(null);
    let ok = tokio::time::timeout(Duration::from_secs(15), async {
        loop {
            let (_, v) = app.get_json("/api/stats").await;
            let find = |name: &str| {
                v["rooms"]
                    .as_array()
                    .and_then(|a| a.iter().find(|r| r["room"] == name).cloned())
            };
            if let (Some(r), Some(_)) = (find(room), find("ai.quest"))
                && r["messages"] == 12
                && !r["flagged"].as_array().is_none_or(|f| f.is_empty())
            {
                last = v.clone();
                return r;
            }
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
    })
    .await;
    let r = ok.unwrap_or_else(|_| panic!("stats never reached 12 messages: {last}"));
    assert_eq!(r["messages"], 12, "system messages are not counted");
    assert_eq!(r["per_min"], 12);
    assert_eq!(r["active_users"], 3);
    assert_eq!(
        r["top_talkers"],
        json!([{"user":"carol","messages":7},{"user":"alice","messages":3},{"user":"bob","messages":2}])
    );
    assert_eq!(r["flagged"], json!(["carol"]));
    let (_, v) = app.get_json("/api/stats").await;
    let q = v["rooms"]
        .as_array()
        .unwrap()
        .iter()
        .find(|r| r["room"] == "ai.quest")
        .cloned()
        .unwrap();
    assert_eq!(
        (q["messages"].as_i64(), q["active_users"].as_i64()),
        (Some(1), Some(1))
    );
    assert!(q["flagged"].as_array().unwrap().is_empty());
    app.stop().await;

    // Exactly once under redelivery: feeding the same messages again changes nothing.
    let store = Store::connect(db).await.unwrap();
    let room_id = RoomId::parse(room).unwrap();
    let again = store.after(&room_id, "", 100).await.unwrap();
    assert_eq!(again.len(), 13, "12 chat + 1 system stored");
    store.apply_analytics(&again, 5).await.unwrap();
    let now = chrono::Utc::now().timestamp_millis();
    let s = store.stats(now, 10).await.unwrap();
    let t = s.iter().find(|r| r.room == room).unwrap();
    assert_eq!(t.messages, 12);
}

#[tokio::test]
async fn analytics_numbers_sqlite() {
    let (_d, db) = sqlite_db();
    analytics_numbers(&db).await;
}

#[tokio::test]
async fn analytics_numbers_postgres() {
    analytics_numbers(&pg_db().await).await;
}

/// History, recovery and the HTTP history API on PostgreSQL too.
#[tokio::test]
async fn history_on_postgres() {
    let db = pg_db().await;
    let mut cfg = test_config(&db);
    cfg.roles = vec![Role::Gateway, Role::Persist];
    let app = spawn_app(cfg).await;
    let mut a = app.client("pg").await;
    a.join("chat.pg", None).await;
    let mut ids = Vec::new();
    for i in 0..10 {
        a.say("chat.pg", &format!("p{i}")).await;
    }
    while ids.len() < 10 {
        ids.push(
            a.recv_type("message").await["id"]
                .as_str()
                .unwrap()
                .to_string(),
        );
    }
    eventually(Duration::from_secs(10), "10 rows in postgres", || async {
        let (_, v) = app.get_json("/api/rooms/chat.pg/messages").await;
        v["messages"].as_array().map(|m| m.len()) == Some(10)
    })
    .await;
    app.stop().await;
    let app = spawn_app(test_config(&db)).await;
    let mut b = app.client("pg2").await;
    let (j, rec) = b.join("chat.pg", Some(&ids[6])).await;
    assert_eq!(j["recovered"], true);
    let t: Vec<&str> = rec.iter().map(|m| m["text"].as_str().unwrap()).collect();
    assert_eq!(t, ["p7", "p8", "p9"]);
    app.stop().await;
}
