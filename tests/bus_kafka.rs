//! The conformance suite and Kafka-specific behaviour on a real Kafka-protocol
//! broker (tansu, started by scripts/services.sh on `KAFKA_BROKERS`, default
//! 127.0.0.1:9092). Each test has its own topic. An unreachable broker fails.
mod common;

use std::collections::HashMap;
use std::time::Duration;

use chat_relay::bus::kafka::{KafkaBus, KafkaConfig};
use chat_relay::bus::{MessageBus, SubscribeOptions};
use chat_relay::protocol::RoomId;
use chat_relay::replay::{ReplayArgs, ReplayFrom, replay};
use common::conformance as c;

fn cfg() -> KafkaConfig {
    KafkaConfig {
        kafka_topic: c::uniq("test-"),
        kafka_fetch_wait_max_ms: common::TANSU_FETCH_WAIT_MS,
        ..Default::default()
    }
}

async fn bus_with(cfg: KafkaConfig) -> KafkaBus {
    let b = cfg.kafka_brokers.clone();
    KafkaBus::connect(cfg)
        .await
        .unwrap_or_else(|e| panic!("Kafka broker at {b} is unreachable: {e}"))
}

async fn bus() -> KafkaBus {
    bus_with(cfg()).await
}

conformance_tests!(bus().await);

/// 30 rooms x 40 messages from 30 concurrent senders, read by a group of two
/// consumers in one process: every room arrives complete and in order.
#[tokio::test]
async fn per_room_order_across_30_partitions_with_concurrent_senders() {
    let mut k = cfg();
    k.kafka_consumers = 2;
    let bus = bus_with(k).await;
    let rooms: Vec<RoomId> = (0..30).map(|i| c::room(&format!("p{i}x"))).collect();
    let refs: Vec<&RoomId> = rooms.iter().collect();
    let mut sub = bus
        .subscribe(SubscribeOptions::shared(c::uniq("g")))
        .await
        .unwrap();
    let per = 40;
    futures::future::join_all(rooms.iter().map(|r| {
        let bus = &bus;
        async move {
            for i in 0..per {
                c::publish(bus, r, &i.to_string()).await;
            }
        }
    }))
    .await;
    let got = c::recv_n(&mut sub, &refs, per * rooms.len(), Duration::from_secs(30)).await;
    let mut seen: HashMap<RoomId, Vec<usize>> = HashMap::new();
    for d in got {
        seen.entry(d.room.clone())
            .or_default()
            .push(String::from_utf8_lossy(&d.payload).parse().unwrap());
        d.ack().await.unwrap();
    }
    for r in &rooms {
        assert_eq!(seen.get(r).map(|v| v.len()), Some(per), "{r} complete");
        assert_eq!(seen[r], (0..per).collect::<Vec<_>>(), "{r} in order");
    }
}

/// Rewinding a stopped group: everything is read again; an active group is refused.
#[tokio::test]
async fn replay_rewinds_a_stopped_group() {
    let k = cfg();
    let bus = bus_with(k.clone()).await;
    let room = c::room("replay");
    let group = c::uniq("rg");
    let mut sub = bus
        .subscribe(SubscribeOptions::shared(group.clone()))
        .await
        .unwrap();

    for i in 0..10 {
        c::publish(&bus, &room, &format!("m{i}")).await;
    }
    tokio::time::sleep(Duration::from_millis(1100)).await;
    let t_mid = chrono::Utc::now();
    tokio::time::sleep(Duration::from_millis(1100)).await;
    for i in 10..20 {
        c::publish(&bus, &room, &format!("m{i}")).await;
    }
    let got = c::ack_all(c::recv_n(&mut sub, &[&room], 20, Duration::from_secs(20)).await).await;
    assert_eq!(got.len(), 20);
    let args = |from: ReplayFrom| ReplayArgs {
        group: group.clone(),
        from,
        bus: chat_relay::bus::BusKind::Kafka,
        kafka: k.clone(),
        nats: Default::default(),
        redis: Default::default(),
        redis_streams: Default::default(),
    };
    let beginning = ReplayFrom {
        from_beginning: true,
        from_offset: None,
        from_time: None,
        from_sequence: None,
    };
    // An active group must be refused. Apache Kafka lists the group's members
    // (DescribeGroups) and rejects a non-member's commit; tansu 0.6 does
    // neither (a documented gap), so there the check cannot see the group.
    if broker_lists_groups(&k, &group) {
        let err = replay(&args(beginning.clone()))
            .await
            .expect_err("active group must be refused");
        assert!(err.to_string().contains("active"), "{err}");
    } else {
        eprintln!(
            "note: this broker does not describe consumer groups (tansu gap): active-group refusal not exercised"
        );
    }
    drop(sub);
    tokio::time::sleep(Duration::from_secs(1)).await;

    let rep = replay(&args(beginning.clone())).await.expect("replay");
    assert_eq!(rep.partitions.len(), 30);
    let mut sub = bus
        .subscribe(SubscribeOptions::shared(group.clone()))
        .await
        .unwrap();
    let again = c::ack_all(c::recv_n(&mut sub, &[&room], 20, Duration::from_secs(20)).await).await;
    assert_eq!(again, got, "the whole log again, in order");
    drop(sub);
    tokio::time::sleep(Duration::from_secs(1)).await;

    // From a time: only the second half.
    replay(&args(ReplayFrom {
        from_beginning: false,
        from_offset: None,
        from_time: Some(t_mid.to_rfc3339()),
        from_sequence: None,
    }))
    .await
    .expect("replay from time");
    let mut sub = bus
        .subscribe(SubscribeOptions::shared(group.clone()))
        .await
        .unwrap();
    let half = c::ack_all(c::recv_n(&mut sub, &[&room], 20, Duration::from_secs(5)).await).await;
    assert_eq!(half, got[10..].to_vec());
    drop(sub);
    tokio::time::sleep(Duration::from_secs(1)).await;

    // From an offset: the partition of the room, offset 15.
    let part = rep
        .partitions
        .iter()
        .find(|(_, old, _)| old.is_some())
        .map(|(p, _, _)| *p)
        .unwrap();
    replay(&args(ReplayFrom {
        from_beginning: false,
        from_offset: Some(format!("{part}:15")),
        from_time: None,
        from_sequence: None,
    }))
    .await
    .expect("replay from offset");
    let mut sub = bus
        .subscribe(SubscribeOptions::shared(group))
        .await
        .unwrap();
    let tail = c::ack_all(c::recv_n(&mut sub, &[&room], 20, Duration::from_secs(5)).await).await;
    assert_eq!(tail, got[15..].to_vec());
}

fn broker_lists_groups(k: &KafkaConfig, group: &str) -> bool {
    use rdkafka::consumer::{BaseConsumer, Consumer};
    let c: BaseConsumer = rdkafka::ClientConfig::new()
        .set("bootstrap.servers", &k.kafka_brokers)
        .create()
        .unwrap();
    c.fetch_group_list(Some(group), Duration::from_secs(5))
        .map(|g| {
            g.groups()
                .iter()
                .any(|g| g.name() == group && !g.members().is_empty())
        })
        .unwrap_or(false)
}
