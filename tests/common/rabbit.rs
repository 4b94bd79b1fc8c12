//! RabbitMQ test hygiene: durable exchanges and queues a test declared are
//! deleted when its [`Cleanup`] guard drops — at the end of the test, also
//! when it panics.

use std::sync::Arc;

use async_trait::async_trait;
use chat_relay::bus::rabbitmq::RabbitBus;
use chat_relay::bus::{
    BusError, Capabilities, MessageBus, Outgoing, SubscribeOptions, Subscription,
};

/// Deletes every queue and exchange whose name contains `marker` (a test's
/// unique tag) on the default vhost.
pub struct Cleanup {
    marker: String,
}

impl Cleanup {
    pub fn new(marker: impl Into<String>) -> Cleanup {
        Cleanup {
            marker: marker.into(),
        }
    }
}

fn names(what: &str, marker: &str) -> Vec<String> {
    std::process::Command::new("rabbitmqctl")
        .args([what, "-q", "name"])
        .output()
        .map(|o| {
            String::from_utf8_lossy(&o.stdout)
                .lines()
                .map(str::trim)
                .filter(|n| n.contains(marker))
                .map(String::from)
                .collect()
        })
        .unwrap_or_default()
}

impl Drop for Cleanup {
    fn drop(&mut self) {
        let marker = self.marker.clone();
        // Drop may run inside the test's runtime: use a thread of its own.
        let done = std::thread::spawn(move || {
            let queues = names("list_queues", &marker);
            let exchanges = names("list_exchanges", &marker);
            let rt = tokio::runtime::Builder::new_current_thread()
                .enable_all()
                .build()
                .ok()?;
            rt.block_on(async {
                use lapin::options::{ExchangeDeleteOptions, QueueDeleteOptions};
                let url = chat_relay::bus::rabbitmq::RabbitConfig::default().amqp_url;
                let conn = lapin::Connection::connect(
                    &url,
                    lapin::ConnectionProperties::default()
                        .with_executor(tokio_executor_trait::Tokio::current())
                        .with_reactor(tokio_reactor_trait::Tokio),
                )
                .await
                .ok()?;
                // A channel per deletion: a queue that vanished meanwhile (an
                // exclusive live queue) closes its channel with NOT_FOUND.
                for q in &queues {
                    let ch = conn.create_channel().await.ok()?;
                    let _ = ch.queue_delete(q, QueueDeleteOptions::default()).await;
                }
                for e in &exchanges {
                    let ch = conn.create_channel().await.ok()?;
                    let _ = ch
                        .exchange_delete(e, ExchangeDeleteOptions::default())
                        .await;
                }
                let _ = conn.close(200, "cleanup").await;
                Some(queues.len() + exchanges.len())
            })
        })
        .join();
        if !matches!(done, Ok(Some(_))) {
            eprintln!("RabbitMQ objects of {} were not all deleted", self.marker);
        }
    }
}

/// A RabbitMQ bus whose exchange and queues are deleted with it.
pub struct CleanBus {
    pub bus: Arc<RabbitBus>,
    _cleanup: Cleanup,
}

impl CleanBus {
    pub fn new(bus: RabbitBus, marker: &str) -> CleanBus {
        CleanBus {
            bus: Arc::new(bus),
            _cleanup: Cleanup::new(marker),
        }
    }
}

impl std::ops::Deref for CleanBus {
    type Target = RabbitBus;
    fn deref(&self) -> &RabbitBus {
        &self.bus
    }
}

#[async_trait]
impl MessageBus for CleanBus {
    fn backend(&self) -> &'static str {
        self.bus.backend()
    }
    fn capabilities(&self) -> Capabilities {
        self.bus.capabilities()
    }
    async fn publish(&self, msg: Outgoing) -> Result<(), BusError> {
        self.bus.publish(msg).await
    }
    async fn subscribe(&self, opts: SubscribeOptions) -> Result<Subscription, BusError> {
        self.bus.subscribe(opts).await
    }
    async fn ready(&self) -> Result<(), BusError> {
        self.bus.ready().await
    }
    async fn close(&self) {
        self.bus.close().await
    }
}
