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

/// Holds the `messages` table so the persistence worker's next insert waits:
/// PostgreSQL `LOCK TABLE … IN EXCLUSIVE MODE` (inserts wait for it), SQLite
/// `BEGIN IMMEDIATE` (the write lock; the worker waits in its busy timeout).
/// The lock is released by [`TableLock::release`].
enum TableLock {
    Pg(sqlx::PgConnection),
    Sqlite(sqlx::SqliteConnection),
}

impl TableLock {
    async fn take(db: &str) -> TableLock {
        use sqlx::Connection as _;
        if db.starts_with("sqlite:") {
            let mut c = sqlx::SqliteConnection::connect(db).await.expect("sqlite");
            sqlx::query("BEGIN IMMEDIATE")
                .execute(&mut c)
                .await
                .expect("lock");
            TableLock::Sqlite(c)
        } else {
            let mut c = sqlx::PgConnection::connect(db).await.expect("pg");
            sqlx::query("BEGIN").execute(&mut c).await.expect("begin");
            sqlx::query("LOCK TABLE messages IN EXCLUSIVE MODE")
                .execute(&mut c)
                .await
                .expect("lock");
            TableLock::Pg(c)
        }
    }

    async fn release(self) {
        let done = match self {
            TableLock::Pg(mut c) => sqlx::query("ROLLBACK").execute(&mut c).await.map(|_| ()),
            TableLock::Sqlite(mut c) => sqlx::query("ROLLBACK").execute(&mut c).await.map(|_| ()),
        };
        done.expect("unlock");
    }
}

/// The persistence worker is aborted (crash-style: no flush, no acks) while it
/// holds deliveries it has not written — deterministically: the first half is
/// stored, then the table is locked so the worker's next insert waits, the
/// second half is published and the test waits until the worker has taken
/// deliveries off the queue (the group's lag drops) before aborting it. A new
/// worker takes over. Every message ends up stored exactly once, in order:
/// unacked deliveries come back and the insert is idempotent.
async fn crash_restart_without_duplicates(db: &str) {
    let bus: Arc<dyn MessageBus> = Arc::new(MemoryBus::new(Default::default()));
    crash_restart_without_duplicates_on(bus, db).await;
}

/// [`crash_restart_without_duplicates`] on any bus that reports consumer lag.
async fn crash_restart_without_duplicates_on(bus: Arc<dyn MessageBus>, db: &str) {
    let store = Store::connect(db).await.expect("db");
    let mut cfg = Config::from_env().expect("cfg").persist;
    cfg.batch_size = 50;
    cfg.batch_wait_ms = 30;
    let spawn = |bus: Arc<dyn MessageBus>, store: Store, cfg| {
        let token = CancellationToken::new();
        let (ready_tx, mut ready) = tokio::sync::watch::channel(false);
        let task = tokio::spawn(chat_relay::workers::persist::run(
            bus,
            store,
            cfg,
            ready_tx,
            token.clone(),
        ));
        async move {
            ready.wait_for(|r| *r).await.expect("worker subscribed");
            (task, token)
        }
    };
    let (w1, _t1) = spawn(bus.clone(), store.clone(), cfg.clone()).await;
    let room = RoomId::parse("chat.crash").unwrap();
    let ids = chat_relay::ids::IdGen::default();
    let n = 2000;
    let half = n / 2;
    let msgs: Vec<ChatMessage> = (0..n)
        .map(|i| msg(&room, ids.next(), &format!("u{}", i % 7), 1))
        .collect();
    for m in &msgs[..half] {
        publish(bus.as_ref(), m).await;
    }
    let s = store.clone();
    eventually(Duration::from_secs(30), "the first half stored", || {
        let s = s.clone();
        async move { s.count_messages(None).await.unwrap() == half as i64 }
    })
    .await;
    let lock = TableLock::take(db).await;
    for m in &msgs[half..] {
        publish(bus.as_ref(), m).await;
    }
    // The worker takes deliveries off the queue but cannot write them (the
    // lag counts them until acked; `undelivered` no longer does).
    let lag = |bus: Arc<dyn MessageBus>| async move {
        bus.consumer_lag()
            .expect("the bus reports lag")
            .lag(&cfg_group())
            .await
            .unwrap_or(i64::MAX)
    };
    eventually(
        Duration::from_secs(30),
        "the worker holds deliveries",
        || {
            let bus = bus.clone();
            async move {
                let undelivered = bus
                    .consumer_lag()
                    .expect("the bus reports lag")
                    .undelivered(&cfg_group())
                    .await
                    .unwrap_or(i64::MAX);
                undelivered < (n - half) as i64
            }
        },
    )
    .await;
    assert!(
        lag(bus.clone()).await >= (n - half) as i64,
        "held, unacked deliveries are lag"
    );
    w1.abort();
    let _ = w1.await;
    lock.release().await;
    // At most the batch the worker had sent before the abort lands (on
    // PostgreSQL the server still runs a statement whose client vanished —
    // committed but never acked, like a crash between commit and ack).
    let at_crash = store.count_messages(None).await.unwrap();
    assert!(
        (half as i64..=(half + cfg.batch_size) as i64).contains(&at_crash),
        "the crash happened mid-stream: {at_crash} rows"
    );
    // Replays of already-stored messages (a redelivery after commit-before-ack).
    for m in msgs.iter().take(20) {
        publish(bus.as_ref(), m).await;
    }
    let (w2, t2) = spawn(bus.clone(), store.clone(), cfg.clone()).await;
    let s = store.clone();
    eventually(Duration::from_secs(30), "all rows", || {
        let s = s.clone();
        async move { s.count_messages(None).await.unwrap() >= n as i64 }
    })
    .await;
    eventually(Duration::from_secs(30), "the queue drained", || {
        let bus = bus.clone();
        async move { lag(bus).await == 0 }
    })
    .await;
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

/// The persistence group's name in the default configuration.
fn cfg_group() -> String {
    Config::from_env().expect("cfg").persist.group
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

/// On Redis Streams: the aborted worker's deliveries stay in the group's
/// pending-entries list and the new worker claims them (`XAUTOCLAIM` after
/// `REDIS_STREAMS_CLAIM_IDLE_MS`).
#[tokio::test]
async fn crash_restart_without_duplicates_redis_streams() {
    let bus = common::redis_streams::CleanBus::fresh("crash").await;
    let bus: Arc<dyn MessageBus> = Arc::new(bus);
    crash_restart_without_duplicates_on(bus, &pg_db().await).await;
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
