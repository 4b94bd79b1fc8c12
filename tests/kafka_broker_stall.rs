//! The Kafka-protocol broker stalls (SIGSTOP, no connection closed) for
//! longer than the producer's `message.timeout.ms` under a running relay, then
//! comes back. The records that timed out make librdkafka re-initialise its
//! idempotent producer's epoch; a broker that then fences the producer
//! (tansu 0.6 answers every later record with `ProducerFenced`) must not
//! leave the gateway refusing every send until it is restarted: the relay
//! replaces a fenced producer, and sends are acked and delivered again.
//! Its own test binary, with a private broker (memory storage, the shared
//! broker's engine) so the stall touches no other test.
mod common;

use std::time::Duration;

use chat_relay::bus::BusKind;
use chat_relay::config::Role;
use common::app::*;
use common::tansu_server::TansuServer;

#[tokio::test]
async fn a_stalled_broker_does_not_leave_the_producer_fenced() {
    let broker = TansuServer::start_memory().await;
    let db = pg_db().await;
    let mut cfg = test_config(&db);
    cfg.bus.bus = BusKind::Kafka;
    cfg.bus.kafka.kafka_brokers = broker.brokers();
    cfg.bus.kafka.kafka_topic = common::conformance::uniq("stall-");
    cfg.bus.kafka.kafka_partitions = 1;
    // A short delivery timeout so the stall below outlasts it.
    cfg.bus.kafka.kafka_message_timeout_ms = 1500;
    cfg.limits.publish_timeout_ms = 3000;
    cfg.roles = vec![Role::Gateway];
    let app = spawn_app(cfg).await;
    let room = "chat.kafkastall";
    let mut c = app.client("sam").await;
    c.join(room, None).await;
    say_acked_and_delivered(&mut c, room, "before").await;

    // Records handed to librdkafka while the broker is stopped time out.
    broker.pause(true);
    for _ in 0..3 {
        c.say(room, "during").await;
    }
    let e = c.recv_type("error").await;
    assert_eq!(e["code"], "bus_unavailable", "{e}");
    tokio::time::sleep(Duration::from_secs(3)).await;
    broker.pause(false);

    // Sends are acked and delivered again (after at most a few refusals
    // while the producer is replaced), and stay so.
    let (got, _) = delivery_resumes(
        &app,
        &mut c,
        room,
        "after",
        Duration::from_secs(30),
        Duration::from_secs(30),
    )
    .await;
    assert_eq!(got["user"], "sam");
    for i in 0..5 {
        say_acked_and_delivered(&mut c, room, &format!("steady {i}")).await;
    }
    // It was the replacement that brought them back (without it every send
    // after the stall is refused: checked against the previous build).
    let (_, m) = http_get(&app.http("/metrics")).await;
    let m = m.as_str().unwrap_or_default().to_string();
    assert!(
        m.contains("kafka_producers_replaced_total"),
        "no producer was replaced"
    );
    app.stop().await;
}
