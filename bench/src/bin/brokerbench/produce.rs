//! Producer-only mode (no subcommand): what the broker alone reaches on this
//! machine, to put the relay's publish rate in proportion. Publishes `--n`
//! messages of `--size` bytes with `--concurrency` in flight, with the same
//! durability the relay uses (RabbitMQ: publisher confirms + persistent;
//! Kafka: acks=all + idempotence), and prints msgs/s. For Redis use
//! `redis-benchmark -t publish`.
//!
//!     cargo run --release --bin brokerbench -- --backend rabbitmq --n 50000

use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant};

/// Flags of the producer-only mode.
#[derive(clap::Args)]
pub struct ProduceArgs {
    /// rabbitmq or kafka.
    #[arg(long)]
    backend: Option<String>,
    #[arg(long, default_value_t = 50_000)]
    n: u64,
    #[arg(long, default_value_t = 64)]
    concurrency: u64,
    #[arg(long, default_value_t = 200)]
    size: usize,
    #[arg(long, default_value = "amqp://guest:guest@127.0.0.1:5672/%2f")]
    amqp_url: String,
    #[arg(long, default_value = "127.0.0.1:9092")]
    kafka_brokers: String,
}

pub async fn run(a: ProduceArgs) -> anyhow::Result<()> {
    let Some(backend) = a.backend.clone() else {
        anyhow::bail!("--backend is required (or use the `e2e` subcommand)");
    };
    let payload = vec![b'x'; a.size];
    let next = Arc::new(AtomicU64::new(0));
    let started;
    match backend.as_str() {
        "rabbitmq" => {
            use lapin::options::*;
            use lapin::types::FieldTable;
            let props = lapin::ConnectionProperties::default()
                .with_executor(tokio_executor_trait::Tokio::current())
                .with_reactor(tokio_reactor_trait::Tokio);
            let conn = lapin::Connection::connect(&a.amqp_url, props).await?;
            let ch = conn.create_channel().await?;
            ch.confirm_select(ConfirmSelectOptions::default()).await?;
            ch.exchange_declare(
                "brokerbench",
                lapin::ExchangeKind::Topic,
                ExchangeDeclareOptions {
                    durable: true,
                    ..Default::default()
                },
                FieldTable::default(),
            )
            .await?;
            let q = ch
                .queue_declare(
                    "brokerbench",
                    QueueDeclareOptions {
                        durable: true,
                        ..Default::default()
                    },
                    FieldTable::default(),
                )
                .await?;
            ch.queue_bind(
                q.name().as_str(),
                "brokerbench",
                "#",
                QueueBindOptions::default(),
                FieldTable::default(),
            )
            .await?;
            ch.queue_purge("brokerbench", QueuePurgeOptions::default())
                .await?;
            started = Instant::now();
            let mut tasks = Vec::new();
            for _ in 0..a.concurrency {
                let (ch, next, payload, n) = (ch.clone(), next.clone(), payload.clone(), a.n);
                tasks.push(tokio::spawn(async move {
                    while next.fetch_add(1, Ordering::Relaxed) < n {
                        let c = ch
                            .basic_publish(
                                "brokerbench",
                                "room.chat.x",
                                BasicPublishOptions::default(),
                                &payload,
                                lapin::BasicProperties::default().with_delivery_mode(2),
                            )
                            .await?
                            .await?;
                        anyhow::ensure!(c.is_ack(), "nacked");
                    }
                    anyhow::Ok(())
                }));
            }
            for t in tasks {
                t.await??;
            }
            ch.queue_purge("brokerbench", QueuePurgeOptions::default())
                .await?;
        }
        "kafka" => {
            use rdkafka::producer::{FutureProducer, FutureRecord};
            // A fresh topic per run: tansu's memory storage slows down as a
            // topic grows, which would make later runs look slower.
            let topic = format!("brokerbench-{}", ulid::Ulid::new());
            let p: FutureProducer = rdkafka::ClientConfig::new()
                .set("bootstrap.servers", &a.kafka_brokers)
                .set("acks", "all")
                .set("enable.idempotence", "true")
                .set("linger.ms", "2")
                .set("compression.type", "lz4")
                .create()?;
            chat_relay::bus::kafka::ensure_topic(&chat_relay::bus::kafka::KafkaConfig {
                kafka_brokers: a.kafka_brokers.clone(),
                kafka_topic: topic.clone(),
                ..Default::default()
            })
            .await?;
            started = Instant::now();
            let mut tasks = Vec::new();
            for i in 0..a.concurrency {
                let (p, next, payload, n, topic) =
                    (p.clone(), next.clone(), payload.clone(), a.n, topic.clone());
                tasks.push(tokio::spawn(async move {
                    let key = format!("chat.room{i}");
                    while next.fetch_add(1, Ordering::Relaxed) < n {
                        p.send(
                            FutureRecord::to(&topic).key(&key).payload(&payload),
                            Duration::from_secs(5),
                        )
                        .await
                        .map_err(|(e, _)| anyhow::anyhow!(e))?;
                    }
                    anyhow::Ok(())
                }));
            }
            for t in tasks {
                t.await??;
            }
        }
        other => anyhow::bail!("unknown backend {other}"),
    }
    let secs = started.elapsed().as_secs_f64();
    println!(
        "{{\"backend\":\"{}\",\"messages\":{},\"seconds\":{:.2},\"msgs_per_s\":{:.0}}}",
        backend,
        a.n,
        secs,
        a.n as f64 / secs
    );
    Ok(())
}
