//! `persistbench`: can the `db-writer` keep up? Two measurements against the
//! database in `--database-url` (a fresh PostgreSQL database or SQLite file):
//!
//! * `--mode insert` — the bulk insert alone: `Store::insert_messages` with
//!   `--batch` rows per call, `--n` rows in total; prints rows/s.
//! * `--mode worker` (default) — the real persistence worker fed by the bus
//!   chosen by `BUS` (same env/flags as the relay): messages are published at a
//!   fixed `--rate` for `--seconds`, then the bench waits for the last row.
//!   Prints rows/s stored, how long the worker needed after the last publish
//!   (drain), and the persist lag (`stored_at - ts`, from the rows themselves)
//!   p50/p99/max.
//!
//! ```sh
//! cargo run --release --bin persistbench -- \
//!     --database-url postgres://postgres@127.0.0.1/bench --rate 50000 --seconds 10
//! ```

use std::time::{Duration, Instant};

use bytes::Bytes;
use clap::Parser;
use tokio_util::sync::CancellationToken;

use chat_relay::bus::BusConfig;
use chat_relay::bus::{self, Outgoing, Priority};
use chat_relay::config::PersistConfig;
use chat_relay::protocol::{BusEvent, ChatMessage, MessageKind, RoomId};
use chat_relay::store::Store;

#[derive(Parser)]
struct Args {
    #[arg(long, env = "DATABASE_URL")]
    database_url: String,
    /// `insert` (bulk insert alone) or `worker` (bus → persistence worker → DB).
    #[arg(long, default_value = "worker")]
    mode: String,
    /// Rows in total (`insert` mode).
    #[arg(long, default_value_t = 200_000)]
    n: usize,
    /// Rows per insert call (`insert` mode).
    #[arg(long, default_value_t = 2000)]
    batch: usize,
    /// Messages per second published (`worker` mode).
    #[arg(long, default_value_t = 50_000)]
    rate: u64,
    #[arg(long, default_value_t = 10)]
    seconds: u64,
    /// Rooms the messages are spread over.
    #[arg(long, default_value_t = 100)]
    rooms: usize,
    /// Bytes of text per message.
    #[arg(long, default_value_t = 100)]
    size: usize,
    #[command(flatten)]
    bus: BusConfig,
    #[command(flatten)]
    persist: PersistConfig,
}

fn message(i: usize, rooms: usize, text: &str) -> anyhow::Result<ChatMessage> {
    Ok(ChatMessage {
        room: RoomId::parse(&format!("chat.bench-{}", i % rooms))
            .ok_or_else(|| anyhow::anyhow!("bad room name"))?,
        id: ulid::Ulid::new().to_string(),
        user: format!("u{}", i % 1000),
        text: text.to_string(),
        ts: chrono::Utc::now().timestamp_millis(),
        kind: MessageKind::Chat,
        seq: Some(i as i64),
    })
}

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    let a = Args::parse();
    let store = Store::connect(&a.database_url).await?;
    let text = "x".repeat(a.size);
    match a.mode.as_str() {
        "insert" => {
            let rows = (0..a.n)
                .map(|i| message(i, a.rooms, &text))
                .collect::<anyhow::Result<Vec<_>>>()?;
            let started = Instant::now();
            let mut stored = 0;
            for chunk in rows.chunks(a.batch) {
                stored += store.insert_messages(chunk).await?;
            }
            let secs = started.elapsed().as_secs_f64();
            println!(
                "{{\"mode\":\"insert\",\"db\":\"{}\",\"rows\":{stored},\"batch\":{},\"seconds\":{secs:.2},\"rows_per_s\":{:.0}}}",
                store.kind(),
                a.batch,
                stored as f64 / secs
            );
        }
        "worker" => worker(&a, store, &text).await?,
        other => anyhow::bail!("unknown mode {other} (insert or worker)"),
    }
    Ok(())
}

async fn worker(a: &Args, store: Store, text: &str) -> anyhow::Result<()> {
    let bus = bus::connect(&a.bus).await?;
    let shutdown = CancellationToken::new();
    let (ready_tx, mut ready) = tokio::sync::watch::channel(false);
    let task = tokio::spawn(chat_relay::workers::persist::run(
        bus.clone(),
        store.clone(),
        a.persist.clone(),
        ready_tx,
        shutdown.clone(),
    ));
    ready.wait_for(|r| *r).await?;
    let total = (a.rate * a.seconds) as usize;
    // Publish in 1 ms ticks, catching up when a tick was late.
    let started = Instant::now();
    let mut sent = 0usize;
    let mut tick = tokio::time::interval(Duration::from_millis(1));
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Burst);
    while sent < total {
        tick.tick().await;
        let due = ((started.elapsed().as_secs_f64() * a.rate as f64) as usize).min(total);
        while sent < due {
            let m = message(sent, a.rooms, text)?;
            let room = m.room.clone();
            bus.publish(Outgoing {
                room,
                payload: Bytes::from(BusEvent::Message(m).to_json()),
                priority: Priority::Normal,
            })
            .await?;
            sent += 1;
        }
    }
    let published = started.elapsed();
    let stored = loop {
        let n = store.count_messages(None).await?;
        if n as usize >= total || started.elapsed() > published + Duration::from_secs(60) {
            break n;
        }
        tokio::time::sleep(Duration::from_millis(10)).await;
    };
    let drain = started.elapsed() - published;
    shutdown.cancel();
    let _ = task.await;
    let lag = lag_quantiles_ms(&store, &[0.5, 0.99, 1.0]).await?;
    println!(
        "{{\"mode\":\"worker\",\"bus\":\"{}\",\"db\":\"{}\",\"offered_per_s\":{},\"published\":{total},\"stored\":{stored},\
         \"publish_seconds\":{:.2},\"drain_ms\":{},\"rows_per_s\":{:.0},\"lag_ms\":{{\"p50\":{},\"p99\":{},\"max\":{}}}}}",
        bus.backend(),
        store.kind(),
        a.rate,
        published.as_secs_f64(),
        drain.as_millis(),
        stored as f64 / (published + drain).as_secs_f64(),
        lag[0],
        lag[1],
        lag[2],
    );
    Ok(())
}

/// Quantiles of `stored_at - ts` over every stored row (ms).
async fn lag_quantiles_ms(store: &Store, q: &[f64]) -> anyhow::Result<Vec<i64>> {
    let sql = "SELECT stored_at - ts FROM messages";
    let mut lags: Vec<i64> = match store {
        Store::Postgres { pool: p, .. } => sqlx::query_scalar(sql).fetch_all(p).await?,
        Store::Sqlite(p) => sqlx::query_scalar(sql).fetch_all(p).await?,
    };
    lags.sort_unstable();
    Ok(q.iter()
        .map(|q| {
            let i = ((lags.len() as f64 * q) as usize).min(lags.len().saturating_sub(1));
            lags.get(i).copied().unwrap_or(0)
        })
        .collect())
}
