//! The relay on `BUS=nats` end to end (NATS JetStream on `NATS_URL`): two
//! instances as one chat, gateway crash and resume, resume as a proof, send
//! retries published once, cluster presence, and the persistence worker
//! crashing with unacked deliveries — every message stored exactly once.
//! Each test has its own stream, subject prefix and consumers, deleted at
//! the end.
mod common;

use std::sync::Arc;
use std::time::Duration;

use chat_relay::bus::BusKind;
use chat_relay::bus::MessageBus;
use chat_relay::bus::nats::NatsConfig;
use chat_relay::config::{Config, Role};
use chat_relay::protocol::RoomId;
use common::app::*;
use common::nats::Cleanup;

async fn bus(cfg: &NatsConfig) -> Arc<dyn MessageBus> {
    Arc::new(common::nats::connect(cfg.clone()).await)
}

fn config(db: &str, nats: &NatsConfig, roles: &[Role]) -> Config {
    let mut cfg = test_config(db);
    cfg.bus.bus = BusKind::Nats;
    cfg.bus.nats = nats.clone();
    cfg.roles = roles.to_vec();
    cfg
}

#[tokio::test]
async fn two_instances_act_as_one_on_nats() {
    let nats = common::nats::config(&common::conformance::uniq("m"));
    let _clean = Cleanup::new(&nats);
    let db = pg_db().await;
    common::multi::two_instances_act_as_one(bus(&nats).await, bus(&nats).await, &db).await;
}

#[tokio::test]
async fn gateway_crash_clients_resume_on_the_other_on_nats() {
    let nats = common::nats::config(&common::conformance::uniq("c"));
    let _clean = Cleanup::new(&nats);
    let db = pg_db().await;
    common::multi::gateway_crash_clients_resume_on_the_other(
        bus(&nats).await,
        bus(&nats).await,
        &db,
    )
    .await;
}

#[tokio::test]
async fn resume_is_a_proof_on_nats() {
    let nats = common::nats::config(&common::conformance::uniq("r"));
    let _clean = Cleanup::new(&nats);
    let db = pg_db().await;
    common::multi::resume_is_a_proof(
        bus(&nats).await,
        bus(&nats).await,
        bus(&nats).await,
        bus(&nats).await,
        &db,
    )
    .await;
}

#[tokio::test]
async fn send_retries_are_published_once_on_nats() {
    let nats = common::nats::config(&common::conformance::uniq("d"));
    let _clean = Cleanup::new(&nats);
    let db = pg_db().await;
    common::multi::send_retries_are_published_once(bus(&nats).await, bus(&nats).await, &db).await;
}

#[tokio::test]
async fn presence_is_cluster_wide_on_nats() {
    let nats = common::nats::config(&common::conformance::uniq("pr"));
    let _clean = Cleanup::new(&nats);
    let db = pg_db().await;
    common::multi::presence_is_cluster_wide(
        bus(&nats).await,
        bus(&nats).await,
        bus(&nats).await,
        &db,
    )
    .await;
}

async fn count(store: &chat_relay::store::Store, room: &RoomId) -> i64 {
    store.count_messages(Some(room)).await.unwrap()
}

/// The persistence worker is aborted (no flush, no acks) while messages flow
/// and a DB lock holds its next insert, so it dies holding deliveries it
/// pulled but never acked — and an insert the server still runs once the
/// lock goes (committed, never acked). In-process, the dropped deliveries
/// nak as they go; the no-nak case of a dead process is
/// `bus_nats::deliveries_of_a_dead_worker_come_back_after_ack_wait`. A new
/// worker joins the durable consumer and every message is stored exactly
/// once, in order.
#[tokio::test]
async fn persistence_crash_with_unacked_deliveries_stores_everything_once() {
    let tag = common::conformance::uniq("p");
    let mut nats = common::nats::config(&tag);
    nats.nats_ack_wait_ms = 2000;
    let _clean = Cleanup::new(&nats);
    let db = pg_db().await;
    let gateway = spawn_app(config(&db, &nats, &[Role::Gateway])).await;
    let persist = spawn_app(config(&db, &nats, &[Role::Persist])).await;
    let room = format!("chat.{tag}");
    let room_id = RoomId::parse(&room).unwrap();
    let store = gateway.store.clone();
    let mut c = gateway.client("nat").await;
    c.join(&room, None).await;
    for i in 0..20 {
        c.say(&room, &format!("m{i}")).await;
    }
    eventually(Duration::from_secs(20), "first 20 rows", || async {
        count(&store, &room_id).await == 20
    })
    .await;
    // Hold the table: the worker pulls the next messages but cannot commit.
    let lock = {
        use sqlx::Connection as _;
        let mut l = sqlx::PgConnection::connect(&db).await.expect("pg");
        sqlx::query("BEGIN").execute(&mut l).await.expect("begin");
        sqlx::query("LOCK TABLE messages IN EXCLUSIVE MODE")
            .execute(&mut l)
            .await
            .expect("lock");
        l
    };
    let n = 100;
    for i in 20..20 + n {
        c.say(&room, &format!("m{i}")).await;
    }
    let mut acks = 0;
    while acks < 20 + n {
        if c.recv().await["type"] == "ack" {
            acks += 1;
        }
    }
    let probe = common::nats::connect(nats.clone()).await;
    let group = config(&db, &nats, &[]).persist.group;
    eventually(
        Duration::from_secs(20),
        "the worker holds deliveries",
        || {
            let (probe, group) = (&probe, group.clone());
            async move {
                let lag = probe.consumer_lag().expect("lag");
                lag.undelivered(&group).await.is_some_and(|l| l < n as i64)
            }
        },
    )
    .await;
    persist.crash().await; // no flush, no acks
    drop(lock); // the connection closes: the lock is released
    assert!(
        count(&store, &room_id).await < (20 + n) as i64,
        "the crash left messages unstored"
    );
    let persist = spawn_app(config(&db, &nats, &[Role::Persist])).await;
    eventually(
        Duration::from_secs(60),
        "all rows after the crash",
        || async { count(&store, &room_id).await >= (20 + n) as i64 },
    )
    .await;
    tokio::time::sleep(Duration::from_millis(nats.nats_ack_wait_ms + 1000)).await;
    let want: Vec<String> = (0..20 + n).map(|i| format!("m{i}")).collect();
    let rows = store.after(&room_id, "", 1000).await.unwrap();
    let texts: Vec<String> = rows.into_iter().map(|m| m.text).collect();
    assert_eq!(texts, want, "all, once, in order");
    gateway.stop().await;
    persist.stop().await;
}

/// `chat-relay replay` on NATS: refused while the `db-writer` group has a
/// running member; once it is stopped, the table emptied and the group
/// replayed from the beginning, a restarted worker rebuilds the DB exactly.
#[tokio::test]
async fn replay_rebuilds_the_db_on_nats() {
    use chat_relay::replay::{ReplayArgs, ReplayFrom, replay};
    let tag = common::conformance::uniq("rp");
    let nats = common::nats::config(&tag);
    let _clean = Cleanup::new(&nats);
    let db = pg_db().await;
    let gateway = spawn_app(config(&db, &nats, &[Role::Gateway])).await;
    let persist = spawn_app(config(&db, &nats, &[Role::Persist])).await;
    let group = config(&db, &nats, &[]).persist.group;
    let room = format!("chat.{tag}");
    let room_id = RoomId::parse(&room).unwrap();
    let store = gateway.store.clone();
    let mut c = gateway.client("rita").await;
    c.join(&room, None).await;
    let n = 40;
    for i in 0..n {
        c.say(&room, &format!("m{i}")).await;
    }
    eventually(Duration::from_secs(20), "all rows", || async {
        count(&store, &room_id).await == n as i64
    })
    .await;
    let args = |from: ReplayFrom| ReplayArgs {
        group: group.clone(),
        from,
        bus: BusKind::Nats,
        kafka: Default::default(),
        nats: nats.clone(),
        redis: Default::default(),
        redis_streams: Default::default(),
    };
    let beginning = ReplayFrom {
        from_beginning: true,
        from_offset: None,
        from_time: None,
        from_sequence: None,
    };
    let refused = replay(&args(beginning.clone())).await;
    assert!(
        matches!(&refused, Err(e) if e.to_string().contains("active")),
        "a running group is refused: {refused:?}"
    );
    persist.stop().await;
    store.truncate_messages().await.unwrap();
    // The stopped member's last pull request lingers until it expires.
    let deadline = std::time::Instant::now() + Duration::from_secs(40);
    let report = loop {
        match replay(&args(beginning.clone())).await {
            Ok(r) => break r,
            Err(e) if e.to_string().contains("active") && std::time::Instant::now() < deadline => {
                tokio::time::sleep(Duration::from_millis(500)).await
            }
            Err(e) => panic!("replay: {e}"),
        }
    };
    let replayed = report.consumer.expect("a NATS report");
    assert!(replayed.delivered >= n as u64, "{replayed:?}");
    assert_eq!(count(&store, &room_id).await, 0);
    let persist = spawn_app(config(&db, &nats, &[Role::Persist])).await;
    eventually(Duration::from_secs(30), "DB rebuilt", || async {
        count(&store, &room_id).await >= n as i64
    })
    .await;
    tokio::time::sleep(Duration::from_secs(1)).await;
    let want: Vec<String> = (0..n).map(|i| format!("m{i}")).collect();
    let texts = |rows: Vec<chat_relay::protocol::ChatMessage>| {
        rows.into_iter().map(|m| m.text).collect::<Vec<_>>()
    };
    assert_eq!(
        texts(store.after(&room_id, "", 1000).await.unwrap()),
        want,
        "rebuilt exactly"
    );
    persist.stop().await;
    gateway.stop().await;
}
