//! Two relay instances acting as one chat, per backend. The broker backends
//! add themselves here: each gives the harness two separate bus connections.
mod common;

use std::sync::Arc;

use chat_relay::bus::MessageBus;
use chat_relay::bus::memory::MemoryBus;
use common::app::sqlite_db;
use common::multi::{gateway_crash_clients_resume_on_the_other, two_instances_act_as_one};

#[tokio::test]
async fn memory_two_applications_on_one_in_process_bus() {
    // `memory` is single-process: two applications only share it in one process.
    let bus: Arc<dyn MessageBus> = Arc::new(MemoryBus::new(Default::default()));
    let (_d, db) = sqlite_db();
    two_instances_act_as_one(bus.clone(), bus, &db).await;
}

#[tokio::test]
async fn memory_gateway_crash_clients_resume_on_the_other() {
    let bus: Arc<dyn MessageBus> = Arc::new(MemoryBus::new(Default::default()));
    let (_d, db) = sqlite_db();
    gateway_crash_clients_resume_on_the_other(bus.clone(), bus, &db).await;
}

#[tokio::test]
async fn memory_resume_is_a_proof() {
    let bus: Arc<dyn MessageBus> = Arc::new(MemoryBus::new(Default::default()));
    let (_d, db) = sqlite_db();
    common::multi::resume_is_a_proof(bus.clone(), bus.clone(), bus.clone(), bus, &db).await;
}

#[tokio::test]
async fn memory_send_retries_are_published_once() {
    let bus: Arc<dyn MessageBus> = Arc::new(MemoryBus::new(Default::default()));
    let (_d, db) = sqlite_db();
    common::multi::send_retries_are_published_once(bus.clone(), bus, &db).await;
}

#[tokio::test]
async fn memory_presence_is_cluster_wide() {
    let bus: Arc<dyn MessageBus> = Arc::new(MemoryBus::new(Default::default()));
    // PostgreSQL, as a cluster would share: three instances heartbeating one
    // SQLite file every 300 ms may contend for its single writer lock (this test
    // timed out once on a clean-clone run with SQLite; the cause is not proven).
    let db = common::app::pg_db().await;
    common::multi::presence_is_cluster_wide(bus.clone(), bus.clone(), bus, &db).await;
}

/// The memory bus with subscriptions that take a while to come up, as a
/// broker's do (a Kafka group join takes seconds): delivery itself is the
/// memory bus's, nothing mocked.
struct SlowSubscribe(Arc<MemoryBus>);

#[async_trait::async_trait]
impl MessageBus for SlowSubscribe {
    fn backend(&self) -> &'static str {
        "memory"
    }
    fn capabilities(&self) -> chat_relay::bus::Capabilities {
        self.0.capabilities()
    }
    async fn publish(
        &self,
        msg: chat_relay::bus::Outgoing,
    ) -> Result<(), chat_relay::bus::BusError> {
        self.0.publish(msg).await
    }
    async fn subscribe(
        &self,
        opts: chat_relay::bus::SubscribeOptions,
    ) -> Result<chat_relay::bus::Subscription, chat_relay::bus::BusError> {
        tokio::time::sleep(std::time::Duration::from_millis(500)).await;
        self.0.subscribe(opts).await
    }
    async fn ready(&self) -> Result<(), chat_relay::bus::BusError> {
        self.0.ready().await
    }
}

/// A member of an instance that has just started is in `joined.members` on
/// the others at once, not a heartbeat later: the instance beats as soon as
/// its live delivery is up (the first tick fires at start-up, before the
/// subscription is; the heartbeat here is a minute, so only the beat on
/// becoming live can make this pass).
#[tokio::test]
async fn memory_a_fresh_instance_members_are_visible_before_its_second_heartbeat() {
    use chat_relay::config::Role;
    let mem = Arc::new(MemoryBus::new(Default::default()));
    let (_d, db) = sqlite_db();
    let gateway = || {
        let mut cfg = common::app::test_config(&db);
        common::app::roles(&mut cfg, &[Role::Gateway]);
        cfg.presence.presence_heartbeat_ms = 60_000;
        cfg.presence.presence_ttl_ms = 120_000;
        cfg
    };
    let a = common::app::spawn_app_on(gateway(), Arc::new(SlowSubscribe(mem.clone()))).await;
    for _ in 0..100 {
        if common::app::http_get(&a.http("/readyz")).await.0 == 200 {
            break;
        }
        tokio::time::sleep(std::time::Duration::from_millis(50)).await;
    }
    let mut alice = a.client("alice").await;
    alice.join("chat.fresh", None).await;
    // `/readyz` turns 200 when A's live subscription is up; its beat on
    // becoming live is written by the presence task a moment later (on a
    // loaded machine, after B's join below read the members: a flake once).
    // Wait for that first beat — the one under test — not for a heartbeat.
    let store = chat_relay::store::Store::connect(&db).await.expect("store");
    for _ in 0..100 {
        if !store.presence_alive(0).await.expect("presence").is_empty() {
            break;
        }
        tokio::time::sleep(std::time::Duration::from_millis(50)).await;
    }
    let b = common::app::spawn_app_on(gateway(), Arc::new(SlowSubscribe(mem))).await;
    let mut bob = b.client("bob").await;
    let (joined, _) = bob.join("chat.fresh", None).await;
    assert_eq!(
        joined["members"],
        serde_json::json!(["alice", "bob"]),
        "{joined}"
    );
    a.stop().await;
    b.stop().await;
}
