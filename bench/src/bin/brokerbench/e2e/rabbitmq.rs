//! RabbitMQ with lapin, as `src/bus/rabbitmq.rs` sets it up: a durable topic
//! exchange (unique per run), publisher confirms and persistent messages with
//! routing key `room.chat.<name>`; per instance an exclusive auto-delete live
//! queue bound per room and consumed with no_ack; the worker groups as
//! durable queues bound to `room.#` (classic with `x-max-priority`, or quorum),
//! `basic.qos` prefetch from `RabbitConfig`, manual acks after processing,
//! one `multiple` ack for what was ready at once (the relay's batch ack).
//! Every consumer and every producer owns its connection, as in the relay.

use std::time::Duration;

use chat_relay::bus::rabbitmq::{QueueType, RabbitConfig};
use chat_relay::protocol::RoomId;
use futures::future::BoxFuture;
use futures::{FutureExt, StreamExt};
use lapin::options::{
    BasicAckOptions, BasicConsumeOptions, BasicPublishOptions, BasicQosOptions,
    ConfirmSelectOptions, ExchangeDeclareOptions, ExchangeDeleteOptions, QueueBindOptions,
    QueueDeclareOptions, QueueDeleteOptions,
};
use lapin::publisher_confirm::Confirmation;
use lapin::types::{AMQPValue, FieldTable};
use lapin::{BasicProperties, Channel, Connection, ConnectionProperties, ExchangeKind};
use serde_json::json;
use tokio_util::sync::CancellationToken;

use super::stats::{LiveStats, WorkerStats};
use super::{Consumer, Pending, Publish};

pub struct Rabbit {
    cfg: RabbitConfig,
    worker_queues: std::sync::Mutex<Vec<String>>,
}

fn routing_key(room: &RoomId) -> String {
    format!("room.chat.{}", room.name())
}

async fn open(cfg: &RabbitConfig, name: &str) -> anyhow::Result<(Connection, Channel)> {
    let props = ConnectionProperties::default()
        .with_executor(tokio_executor_trait::Tokio::current())
        .with_reactor(tokio_reactor_trait::Tokio)
        .with_connection_name(format!("brokerbench {} {name}", cfg.rabbitmq_exchange).into());
    let conn = tokio::time::timeout(
        Duration::from_secs(5),
        Connection::connect(&cfg.amqp_url, props),
    )
    .await
    .map_err(|_| anyhow::anyhow!("rabbitmq connect timed out"))??;
    let ch = conn.create_channel().await?;
    ch.exchange_declare(
        &cfg.rabbitmq_exchange,
        ExchangeKind::Topic,
        ExchangeDeclareOptions {
            durable: true,
            ..Default::default()
        },
        FieldTable::default(),
    )
    .await?;
    Ok((conn, ch))
}

impl Rabbit {
    pub async fn setup(mut cfg: RabbitConfig, run: &str) -> anyhow::Result<Rabbit> {
        cfg.rabbitmq_exchange = format!("brokerbench-{run}");
        cfg.rabbitmq_queue_prefix = format!("brokerbench-{run}.");
        // Fail early when the broker is not there.
        let (conn, _) = open(&cfg, "setup").await?;
        let _ = conn.close(200, "bye").await;
        Ok(Rabbit {
            cfg,
            worker_queues: Default::default(),
        })
    }

    pub async fn producer(&self, instance: usize) -> anyhow::Result<RabbitProducer> {
        let (conn, ch) = open(&self.cfg, &format!("publisher {instance}")).await?;
        ch.confirm_select(ConfirmSelectOptions::default()).await?;
        Ok(RabbitProducer {
            _conn: conn,
            ch,
            exchange: self.cfg.rabbitmq_exchange.clone(),
            confirm_timeout: Duration::from_millis(self.cfg.rabbitmq_confirm_timeout_ms),
        })
    }

    pub async fn live(
        &self,
        instance: usize,
        rooms: &[RoomId],
        mut stats: LiveStats,
        stop: CancellationToken,
    ) -> anyhow::Result<Consumer<LiveStats>> {
        let group = format!("live-{instance}");
        let (conn, ch) = open(&self.cfg, &group).await?;
        let queue = format!("{}live.{group}", self.cfg.rabbitmq_queue_prefix);
        ch.queue_declare(
            &queue,
            QueueDeclareOptions {
                exclusive: true,
                auto_delete: true,
                ..Default::default()
            },
            FieldTable::default(),
        )
        .await?;
        for r in rooms {
            ch.queue_bind(
                &queue,
                &self.cfg.rabbitmq_exchange,
                &routing_key(r),
                QueueBindOptions::default(),
                FieldTable::default(),
            )
            .await?;
        }
        let mut consumer = ch
            .basic_consume(
                &queue,
                "",
                BasicConsumeOptions {
                    no_ack: true,
                    ..Default::default()
                },
                FieldTable::default(),
            )
            .await?;
        let unique = stats.unique.clone();
        let task = tokio::spawn(async move {
            loop {
                let d = tokio::select! {
                    _ = stop.cancelled() => break,
                    d = consumer.next() => d,
                };
                match d {
                    Some(Ok(d)) => {
                        if d.routing_key.as_str().starts_with("room.") {
                            stats.record(&d.data);
                        }
                    }
                    Some(Err(e)) => {
                        eprintln!("rabbitmq live consumer error: {e}");
                        break;
                    }
                    None => break,
                }
            }
            let _ = ch.close(200, "bye").await;
            let _ = conn.close(200, "bye").await;
            stats
        });
        Ok(Consumer { unique, task })
    }

    pub async fn worker(
        &self,
        group: &str,
        mut stats: WorkerStats,
        stop: CancellationToken,
    ) -> anyhow::Result<Consumer<WorkerStats>> {
        let (conn, ch) = open(&self.cfg, group).await?;
        let queue = format!("{}{group}", self.cfg.rabbitmq_queue_prefix);
        let mut args = FieldTable::default();
        match self.cfg.rabbitmq_queue_type {
            QueueType::Classic => args.insert(
                "x-max-priority".into(),
                AMQPValue::LongInt(i32::from(self.cfg.rabbitmq_max_priority)),
            ),
            QueueType::Quorum => args.insert(
                "x-queue-type".into(),
                AMQPValue::LongString("quorum".into()),
            ),
        }
        ch.queue_declare(
            &queue,
            QueueDeclareOptions {
                durable: true,
                ..Default::default()
            },
            args,
        )
        .await?;
        if let Ok(mut q) = self.worker_queues.lock() {
            q.push(queue.clone());
        }
        ch.queue_bind(
            &queue,
            &self.cfg.rabbitmq_exchange,
            "room.#",
            QueueBindOptions::default(),
            FieldTable::default(),
        )
        .await?;
        ch.basic_qos(self.cfg.rabbitmq_prefetch, BasicQosOptions::default())
            .await?;
        let mut consumer = ch
            .basic_consume(
                &queue,
                "",
                BasicConsumeOptions::default(),
                FieldTable::default(),
            )
            .await?;
        let unique = stats.unique.clone();
        let prefetch = usize::from(self.cfg.rabbitmq_prefetch.max(1));
        let task = tokio::spawn(async move {
            // As the relay's workers: take what is ready (up to the
            // prefetch), handle it, then confirm it with one `multiple` ack.
            let mut ended = false;
            while !ended {
                let d = tokio::select! {
                    _ = stop.cancelled() => break,
                    d = consumer.next() => d,
                };
                let mut last = None;
                let mut taken = 0;
                let mut next = d;
                loop {
                    match next {
                        Some(Ok(d)) => {
                            stats.record(&d.data);
                            last = Some(d.acker);
                            taken += 1;
                        }
                        Some(Err(e)) => {
                            eprintln!("rabbitmq worker consumer error: {e}");
                            ended = true;
                            break;
                        }
                        None => {
                            ended = true;
                            break;
                        }
                    }
                    if taken >= prefetch {
                        break;
                    }
                    match consumer.next().now_or_never() {
                        Some(n) => next = n,
                        None => break,
                    }
                }
                if let Some(a) = last
                    && let Err(e) = a.ack(BasicAckOptions { multiple: true }).await
                {
                    eprintln!("rabbitmq ack: {e}");
                }
            }
            let _ = ch.close(200, "bye").await;
            let _ = conn.close(200, "bye").await;
            stats
        });
        Ok(Consumer { unique, task })
    }

    /// Deletes the worker queues and the exchange of the run (the live
    /// queues went with their connections).
    pub async fn teardown(&self) {
        let Ok((conn, ch)) = open(&self.cfg, "teardown").await else {
            eprintln!("rabbitmq: cannot connect to delete the run's queues");
            return;
        };
        let queues = self
            .worker_queues
            .lock()
            .map(|q| q.clone())
            .unwrap_or_default();
        for q in queues {
            if let Err(e) = ch.queue_delete(&q, QueueDeleteOptions::default()).await {
                eprintln!("rabbitmq: queue {q} not deleted: {e}");
            }
        }
        if let Err(e) = ch
            .exchange_delete(
                &self.cfg.rabbitmq_exchange,
                ExchangeDeleteOptions::default(),
            )
            .await
        {
            eprintln!("rabbitmq: exchange not deleted: {e}");
        }
        let _ = conn.close(200, "bye").await;
    }

    pub fn settings(&self) -> serde_json::Value {
        let c = &self.cfg;
        json!({"exchange": c.rabbitmq_exchange, "confirms": true, "delivery_mode": 2,
               "prefetch": c.rabbitmq_prefetch, "queue_type": format!("{:?}", c.rabbitmq_queue_type),
               "x-max-priority": c.rabbitmq_max_priority,
               "confirm_timeout_ms": c.rabbitmq_confirm_timeout_ms})
    }
}

pub struct RabbitProducer {
    _conn: Connection,
    ch: Channel,
    exchange: String,
    confirm_timeout: Duration,
}

impl Publish for RabbitProducer {
    fn start<'a>(
        &'a self,
        room: &'a RoomId,
        payload: Vec<u8>,
    ) -> BoxFuture<'a, Result<Pending, String>> {
        Box::pin(async move {
            let props = BasicProperties::default()
                .with_delivery_mode(2)
                .with_priority(0)
                .with_content_type("application/json".into());
            // Returns once the frames are written to the channel, in call
            // order; the confirm follows.
            let confirm = self
                .ch
                .basic_publish(
                    &self.exchange,
                    &routing_key(room),
                    BasicPublishOptions::default(),
                    &payload,
                    props,
                )
                .await
                .map_err(|e| e.to_string())?;
            let timeout = self.confirm_timeout;
            let pending: Pending = Box::pin(async move {
                match tokio::time::timeout(timeout, confirm).await {
                    Ok(Ok(Confirmation::Ack(_))) | Ok(Ok(Confirmation::NotRequested)) => Ok(()),
                    Ok(Ok(Confirmation::Nack(_))) => Err("nacked".to_string()),
                    Ok(Err(e)) => Err(e.to_string()),
                    Err(_) => Err("no publisher confirm in time".to_string()),
                }
            });
            Ok(pending)
        })
    }
}
