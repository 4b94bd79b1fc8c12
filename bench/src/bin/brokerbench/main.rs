//! `brokerbench`: the brokers alone, without the relay, to put the relay's
//! figures in proportion.
//!
//! * No subcommand: producer-only throughput (`produce.rs`).
//! * `e2e`: the relay's broker traffic reproduced with the raw client
//!   libraries — producers, per-instance live consumers and the two worker
//!   groups — reporting acked/s and end-to-end latency (`e2e/`).
//! * `drop-kafka-topic`: deletes a relay run's topic (the load tools'
//!   cleanup; tansu keeps every topic in memory).
//!
//! ```text
//! cargo run --release --bin brokerbench -- --backend rabbitmq --n 50000
//! cargo run --release --bin brokerbench -- e2e --backend kafka --rate 1000 --seconds 15
//! ```

mod e2e;
mod produce;

use clap::{Parser, Subcommand};

#[derive(Parser)]
#[command(args_conflicts_with_subcommands = true, subcommand_negates_reqs = true)]
struct Cli {
    #[command(subcommand)]
    mode: Option<Mode>,
    #[command(flatten)]
    produce: produce::ProduceArgs,
}

#[derive(Subcommand)]
enum Mode {
    /// The relay's broker traffic (producers + live consumers + worker
    /// groups) without the relay: the broker's ceiling for the same work.
    E2e(Box<e2e::E2eArgs>),
    /// Deletes topic `KAFKA_TOPIC` (flags and environment as the relay's):
    /// `loadtest/compare.py` drops each run's topic, since tansu keeps every
    /// topic's records in memory and a topic left behind slows later runs.
    DropKafkaTopic(Box<chat_relay::bus::kafka::KafkaConfig>),
}

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    let cli = Cli::parse();
    match cli.mode {
        Some(Mode::E2e(a)) => e2e::run(*a).await,
        Some(Mode::DropKafkaTopic(cfg)) => e2e::drop_topic(&cfg).await,
        None => produce::run(cli.produce).await,
    }
}
