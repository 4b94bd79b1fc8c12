//! A connection's sends are pipelined: each is handed to the bus
//! (`MessageBus::submit`) without waiting for the broker's confirmation of the
//! one before, the acks still come in send order, and the number waiting for
//! the bus per connection is bounded. The bus here is the memory bus behind a
//! gate that holds every confirmation until the test opens it — the part of a
//! real broker that matters (a confirm that arrives later), nothing mocked of
//! delivery.
mod common;

use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::Duration;

use async_trait::async_trait;
use chat_relay::bus::memory::{MemoryBus, MemoryConfig};
use chat_relay::bus::{
    BusError, Capabilities, Confirm, MessageBus, Outgoing, SubscribeOptions, Subscription,
};
use common::app::*;
use tokio::sync::watch;

/// The memory bus whose chat confirmations wait for `open`.
struct GatedBus {
    inner: MemoryBus,
    open: watch::Receiver<bool>,
    /// Chat messages handed to the bus so far.
    submitted: AtomicUsize,
}

#[async_trait]
impl MessageBus for GatedBus {
    fn backend(&self) -> &'static str {
        "memory"
    }
    fn capabilities(&self) -> Capabilities {
        self.inner.capabilities()
    }
    async fn publish(&self, msg: Outgoing) -> Result<(), BusError> {
        self.inner.publish(msg).await
    }
    async fn submit(&self, msg: Outgoing) -> Result<Confirm, BusError> {
        self.inner.publish(msg).await?;
        self.submitted.fetch_add(1, Ordering::SeqCst);
        let mut open = self.open.clone();
        Ok(Box::pin(async move {
            open.wait_for(|o| *o).await.map_err(|_| BusError::Closed)?;
            Ok(())
        }))
    }
    async fn subscribe(&self, opts: SubscribeOptions) -> Result<Subscription, BusError> {
        self.inner.subscribe(opts).await
    }
    async fn ready(&self) -> Result<(), BusError> {
        self.inner.ready().await
    }
}

async fn wait_submitted(bus: &GatedBus, n: usize) {
    let deadline = tokio::time::Instant::now() + Duration::from_secs(10);
    while bus.submitted.load(Ordering::SeqCst) < n {
        assert!(
            tokio::time::Instant::now() < deadline,
            "only {} of {n} sends reached the bus",
            bus.submitted.load(Ordering::SeqCst)
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

/// An app on a [`GatedBus`] (closed) and the sender that opens the gate.
async fn gated_app() -> (
    tempfile::TempDir,
    TestApp,
    Arc<GatedBus>,
    watch::Sender<bool>,
) {
    let (dir, db) = sqlite_db();
    let (open_tx, open) = watch::channel(false);
    let bus = Arc::new(GatedBus {
        inner: MemoryBus::new(MemoryConfig::default()),
        open,
        submitted: AtomicUsize::new(0),
    });
    let mut cfg = test_config(&db);
    // Confirmations are held for as long as the test needs.
    cfg.limits.publish_timeout_ms = 60_000;
    let app = spawn_app_on(cfg, bus.clone()).await;
    (dir, app, bus, open_tx)
}

#[tokio::test]
async fn sends_are_pipelined_and_acked_in_order() {
    let (_dir, app, bus, open_tx) = gated_app().await;
    let mut c = app.client("alice").await;
    c.join("chat.pipe", None).await;

    // Ten sends, none confirmed: every one reaches the bus all the same (a
    // connection waiting for each confirmation would have handed over one),
    // and every one is delivered, but none is acked yet.
    let cids = send_n(&mut c, "chat.pipe", 10).await;
    wait_submitted(&bus, 10).await;
    let mut delivered = 0;
    while delivered < 10 {
        let v = c.recv().await;
        assert_ne!(v["type"], "ack", "acked before the bus confirmed: {v}");
        if v["type"] == "message" {
            delivered += 1;
        }
    }
    assert!(c.try_recv(Duration::from_millis(300)).await.is_none());

    // Confirmed: the acks come in send order.
    open_tx.send(true).expect("gate");
    let mut acked = Vec::new();
    while acked.len() < 10 {
        let v = c.recv_type("ack").await;
        acked.push(v["cid"].as_str().expect("cid").to_string());
    }
    assert_eq!(acked, cids);
    app.stop().await;
}

#[tokio::test]
async fn sends_waiting_for_the_bus_are_bounded_per_connection() {
    let (_dir, app, bus, open_tx) = gated_app().await;
    let mut c = app.client("alice").await;
    c.join("chat.bound", None).await;

    // 100 sends with nothing confirmed: 64 are handed to the bus, then the
    // connection stops reading until the oldest is answered.
    let cids = send_n(&mut c, "chat.bound", 100).await;
    wait_submitted(&bus, 64).await;
    tokio::time::sleep(Duration::from_millis(500)).await;
    assert_eq!(bus.submitted.load(Ordering::SeqCst), 64);

    open_tx.send(true).expect("gate");
    wait_submitted(&bus, 100).await;
    let mut acked = Vec::new();
    while acked.len() < 100 {
        let v = c.recv_type("ack").await;
        acked.push(v["cid"].as_str().expect("cid").to_string());
    }
    assert_eq!(acked, cids);
    app.stop().await;
}

/// Sends `n` messages and returns their cids in send order.
async fn send_n(c: &mut Client, room: &str, n: usize) -> Vec<String> {
    let mut cids = Vec::new();
    for i in 0..n {
        cids.push(c.say(room, &format!("m{i}")).await);
    }
    cids
}
