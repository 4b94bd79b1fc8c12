//! The conformance suite and RabbitMQ-specific behaviour on the real broker
//! (`AMQP_URL`, default amqp://guest:guest@127.0.0.1:5672/%2f). Each test has
//! its own exchange and queue prefix. An unreachable broker fails the tests.
mod common;

use std::sync::Arc;
use std::sync::atomic::Ordering;
use std::time::Duration;

use bytes::Bytes;
use chat_relay::bus::rabbitmq::{RabbitBus, RabbitConfig};
use chat_relay::bus::{MessageBus, Outgoing, Priority, SubscribeOptions};
use common::conformance as c;

fn cfg() -> RabbitConfig {
    let tag = c::uniq("t");
    RabbitConfig {
        rabbitmq_exchange: format!("test-{tag}"),
        rabbitmq_queue_prefix: format!("test-{tag}."),
        rabbitmq_reconnect_max_ms: 500,
        ..Default::default()
    }
}

async fn bus_with(cfg: RabbitConfig) -> RabbitBus {
    let url = cfg.amqp_url.clone();
    RabbitBus::connect(cfg)
        .await
        .unwrap_or_else(|e| panic!("RabbitMQ at {url} is unreachable: {e}"))
}

/// A bus on a fresh exchange; its exchange and queues are deleted with it.
async fn bus() -> common::rabbit::CleanBus {
    let cfg = cfg();
    let marker = cfg.rabbitmq_exchange.clone();
    common::rabbit::CleanBus::new(bus_with(cfg).await, &marker)
}

conformance_tests!(bus().await);

async fn send(
    bus: &dyn MessageBus,
    room: &chat_relay::protocol::RoomId,
    body: &str,
    priority: Priority,
) {
    bus.publish(Outgoing {
        room: room.clone(),
        payload: Bytes::from(body.to_string()),
        priority,
    })
    .await
    .expect("publish confirmed");
}

/// A backlog in a worker queue drains system messages first.
#[tokio::test]
async fn backlog_drains_priority_first() {
    let bus = bus().await;
    let g = c::uniq("prio");
    drop(
        bus.subscribe(SubscribeOptions::shared(g.clone()))
            .await
            .unwrap(),
    ); // declare the queue
    tokio::time::sleep(Duration::from_millis(300)).await;
    let room = c::room("prio");
    for i in 0..50 {
        send(&bus, &room, &format!("chat{i}"), Priority::Normal).await;
    }
    for i in 0..3 {
        send(&bus, &room, &format!("system{i}"), Priority::System).await;
    }
    let mut sub = bus.subscribe(SubscribeOptions::shared(g)).await.unwrap();
    let got = c::ack_all(c::recv_n(&mut sub, &[&room], 53, Duration::from_secs(10)).await).await;
    assert_eq!(got.len(), 53);
    assert_eq!(
        &got[..3],
        ["system0", "system1", "system2"],
        "system first: {:?}",
        &got[..5]
    );
    let chats: Vec<String> = (0..50).map(|i| format!("chat{i}")).collect();
    assert_eq!(&got[3..], &chats[..], "then the chat messages in order");
}

/// A consumer that dies before acking: another member of the group gets its
/// messages, flagged as redelivered.
#[tokio::test]
async fn unacked_messages_go_to_another_consumer() {
    let bus = bus().await;
    let g = c::uniq("dies");
    let room = c::room("dies");
    let mut a = bus
        .subscribe(SubscribeOptions::shared(g.clone()))
        .await
        .unwrap();
    for i in 0..10 {
        send(&bus, &room, &format!("m{i}"), Priority::Normal).await;
    }
    let held = c::recv_n(&mut a, &[&room], 10, Duration::from_secs(10)).await;
    assert_eq!(held.len(), 10);
    assert!(held.iter().all(|d| !d.redelivered));
    let mut b = bus.subscribe(SubscribeOptions::shared(g)).await.unwrap();
    drop(held);
    drop(a); // the consumer "dies": its channel closes with 10 unacked
    let again = c::recv_n(&mut b, &[&room], 10, Duration::from_secs(10)).await;
    assert_eq!(again.len(), 10, "all unacked messages redelivered to b");
    assert!(
        again.iter().all(|d| d.redelivered),
        "flagged as redelivered"
    );
    let mut bodies = c::ack_all(again).await;
    bodies.sort_by_key(|s| s[1..].parse::<u32>().unwrap());
    assert_eq!(bodies, (0..10).map(|i| format!("m{i}")).collect::<Vec<_>>());
}

/// The broker drops every connection: `ready()` reports it, the relay
/// reconnects, redeclares and re-binds, and messages flow again — including
/// to the dynamic (live) subscription, which must have been re-bound.
#[tokio::test]
async fn connection_loss_reconnects_and_rebinds() {
    let cfg = cfg();
    let _clean = common::rabbit::Cleanup::new(cfg.rabbitmq_exchange.clone());
    let exchange = cfg.rabbitmq_exchange.clone();
    let bus = Arc::new(bus_with(cfg).await);
    let room = c::room("loss");
    let mut live = bus
        .subscribe(SubscribeOptions::instance(c::uniq("inst")))
        .await
        .unwrap();
    live.interest.add_room(&room).await.unwrap();
    let mut worker = bus
        .subscribe(SubscribeOptions::shared(c::uniq("w")))
        .await
        .unwrap();
    send(bus.as_ref(), &room, "before", Priority::Normal).await;
    assert_eq!(
        c::ack_all(c::recv_n(&mut live, &[&room], 1, Duration::from_secs(5)).await).await,
        ["before"]
    );
    assert_eq!(
        c::ack_all(c::recv_n(&mut worker, &[&room], 1, Duration::from_secs(5)).await).await,
        ["before"]
    );

    // Close exactly this bus's connections (their names carry the exchange).
    let list = std::process::Command::new("rabbitmqctl")
        .args(["list_connections", "-q", "pid", "client_properties"])
        .output()
        .expect("rabbitmqctl");
    let list = String::from_utf8_lossy(&list.stdout).into_owned();
    let mut closed = 0;
    for line in list.lines().filter(|l| l.contains(&exchange)) {
        let pid = line.split_whitespace().next().unwrap();
        let out = std::process::Command::new("rabbitmqctl")
            .args(["close_connection", pid, "test: connection loss"])
            .output()
            .expect("rabbitmqctl");
        assert!(
            out.status.success(),
            "{}",
            String::from_utf8_lossy(&out.stderr)
        );
        closed += 1;
    }
    assert_eq!(closed, 3, "publisher + two consumers: {list}");
    // The outage can last only milliseconds (the broker stays up), so count
    // the publisher's recovery instead of racing to see `ready()` fail.
    // (`/readyz` going 503 during a real outage is tested in app_rabbitmq.)
    common::app::eventually(Duration::from_secs(10), "the publisher reconnects", || {
        let bus = bus.clone();
        async move { bus.reconnects() >= 1 }
    })
    .await;
    common::app::eventually(Duration::from_secs(30), "ready again", || {
        let bus = bus.clone();
        async move { bus.ready().await.is_ok() }
    })
    .await;
    // Publish until both subscriptions are back (they reconnect on their own).
    let back = tokio::time::timeout(Duration::from_secs(30), async {
        let mut i = 0;
        let (mut got_live, mut got_worker) = (false, false);
        while !(got_live && got_worker) {
            i += 1;
            let _ = bus
                .publish(Outgoing {
                    room: room.clone(),
                    payload: Bytes::from(format!("after{i}")),
                    priority: Priority::Normal,
                })
                .await;
            if !got_live {
                got_live = !c::recv_n(&mut live, &[&room], 1, Duration::from_millis(300))
                    .await
                    .is_empty();
            }
            if !got_worker {
                got_worker = !c::ack_all(
                    c::recv_n(&mut worker, &[&room], 1, Duration::from_millis(300)).await,
                )
                .await
                .is_empty();
            }
        }
    })
    .await;
    assert!(back.is_ok(), "live and worker subscriptions came back");
}

/// Unacknowledged deliveries of a queue, as the broker counts them.
fn unacked_on_broker(queue: &str) -> Option<u64> {
    let out = std::process::Command::new("rabbitmqctl")
        .args(["list_queues", "-q", "name", "messages_unacknowledged"])
        .output()
        .expect("rabbitmqctl");
    String::from_utf8_lossy(&out.stdout).lines().find_map(|l| {
        let mut it = l.split_whitespace();
        (it.next() == Some(queue)).then(|| it.next()?.parse().ok())?
    })
}

/// A worker's batch costs one `basic.ack multiple` when it is every unsettled
/// delivery up to its highest tag, and one ack per delivery when a delivery
/// the worker still holds sits below — the broker then still counts that one
/// unacknowledged, and nothing else.
#[tokio::test]
async fn batch_ack_is_one_frame_without_a_hole_and_exact_with_one() {
    let cfg = cfg();
    let queue_prefix = cfg.rabbitmq_queue_prefix.clone();
    let marker = cfg.rabbitmq_exchange.clone();
    let bus = common::rabbit::CleanBus::new(bus_with(cfg).await, &marker);
    let g = c::uniq("ba");
    let queue = format!("{queue_prefix}{g}");
    let room = c::room("ba");
    let mut sub = bus.subscribe(SubscribeOptions::shared(g)).await.unwrap();
    for i in 0..20 {
        send(&bus, &room, &format!("m{i}"), Priority::Normal).await;
    }
    let whole = c::recv_n(&mut sub, &[&room], 20, Duration::from_secs(10)).await;
    assert_eq!(whole.len(), 20);
    chat_relay::bus::Delivery::ack_batch(whole).await.unwrap();
    let acks = bus.batch_acks();
    assert_eq!(acks.multiple.load(Ordering::Relaxed), 1, "one multiple ack");
    assert_eq!(acks.single.load(Ordering::Relaxed), 0);
    common::app::eventually(Duration::from_secs(10), "the broker settled all 20", || {
        let q = queue.clone();
        async move { unacked_on_broker(&q) == Some(0) }
    })
    .await;

    for i in 20..30 {
        send(&bus, &room, &format!("m{i}"), Priority::Normal).await;
    }
    let mut batch = c::recv_n(&mut sub, &[&room], 10, Duration::from_secs(10)).await;
    assert_eq!(batch.len(), 10);
    let held = batch.remove(4);
    chat_relay::bus::Delivery::ack_batch(batch).await.unwrap();
    assert_eq!(acks.multiple.load(Ordering::Relaxed), 1);
    assert_eq!(acks.single.load(Ordering::Relaxed), 1, "acked one by one");
    common::app::eventually(Duration::from_secs(10), "the broker holds only m24", || {
        let q = queue.clone();
        async move { unacked_on_broker(&q) == Some(1) }
    })
    .await;
    // The held delivery is still acknowledgeable afterwards.
    assert_eq!(&held.payload[..], b"m24");
    held.ack().await.unwrap();
    common::app::eventually(Duration::from_secs(10), "m24 settled too", || {
        let q = queue.clone();
        async move { unacked_on_broker(&q) == Some(0) }
    })
    .await;
}
