//! The `chat-relay` binary: `serve` (default) runs the relay; `replay` rewinds a
//! Kafka, NATS or Redis Streams consumer group.

use anyhow::Context;
use clap::{Parser, Subcommand};

use chat_relay::app::Application;
use chat_relay::config::Config;

#[derive(Parser)]
#[command(
    name = "chat-relay",
    version,
    about = "Game chat relay over a pluggable message bus"
)]
struct Cli {
    #[command(subcommand)]
    cmd: Option<Cmd>,
}

#[derive(Subcommand)]
enum Cmd {
    /// Run the relay (the default when no subcommand is given).
    Serve(Box<Config>),
    /// Rewind a Kafka, NATS (`--bus nats`) or Redis Streams (`--bus
    /// redis-streams`) consumer group (stop its workers first), so a restarted
    /// worker reprocesses the log: `--from-beginning`, `--from-offset
    /// 0:12,3:40` (Kafka partition:offset, Redis Streams shard:id),
    /// `--from-sequence 120` (NATS) or `--from-time 2026-11-22T10:00:00Z`.
    Replay(Box<chat_relay::replay::ReplayArgs>),
    /// Exit 0 when the local relay answers `/readyz` with 200 (for container healthchecks).
    Healthcheck {
        /// Address of the relay to check.
        #[arg(long, env = "BIND", default_value = "127.0.0.1:8080")]
        bind: std::net::SocketAddr,
    },
}

fn main() -> anyhow::Result<()> {
    chat_relay::telemetry::init();
    let cli = Cli::parse();
    // The runtime is built after reading the configuration, which sets its
    // number of worker threads.
    let cmd = match cli.cmd {
        Some(cmd) => cmd,
        None => Cmd::Serve(Box::new(
            Config::from_env().context("reading configuration")?,
        )),
    };
    let mut rt = tokio::runtime::Builder::new_multi_thread();
    if let Cmd::Serve(cfg) = &cmd
        && cfg.worker_threads > 0
    {
        rt.worker_threads(cfg.worker_threads);
    }
    rt.enable_all()
        .build()
        .context("starting the Tokio runtime")?
        .block_on(run(cmd))
}

async fn run(cmd: Cmd) -> anyhow::Result<()> {
    let cfg = match cmd {
        Cmd::Serve(cfg) => *cfg,
        Cmd::Healthcheck { bind } => return healthcheck(bind).await,
        Cmd::Replay(args) => {
            let what = format!("replaying consumer group {}", args.group);
            let (log, report) = match args.bus {
                chat_relay::bus::BusKind::RedisStreams => (
                    format!(
                        "the redis streams {}stream:*",
                        args.redis_streams.redis_streams_prefix
                    ),
                    chat_relay::replay::replay_redis_streams(
                        &args.group,
                        &args.from,
                        &args.redis,
                        &args.redis_streams,
                    )
                    .await
                    .context(what)?
                    .to_string(),
                ),
                bus => (
                    match bus {
                        chat_relay::bus::BusKind::Nats => {
                            format!("stream {}", args.nats.nats_stream)
                        }
                        _ => format!("topic {}", args.kafka.kafka_topic),
                    },
                    chat_relay::replay::replay(&args)
                        .await
                        .context(what)?
                        .to_string(),
                ),
            };
            println!(
                "consumer group {} rewound on {log}:\n{report}restart its workers to reprocess the log",
                args.group
            );
            return Ok(());
        }
    };
    let app = Application::build(cfg)
        .await
        .context("starting chat-relay")?;
    let token = app.shutdown_token();
    tokio::spawn(async move {
        shutdown_signal().await;
        tracing::info!("shutdown signal received");
        token.cancel();
    });
    app.run_until_stopped().await?;
    Ok(())
}

async fn shutdown_signal() {
    let ctrl_c = tokio::signal::ctrl_c();
    #[cfg(unix)]
    {
        let mut term =
            match tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate()) {
                Ok(s) => s,
                Err(_) => {
                    let _ = ctrl_c.await;
                    return;
                }
            };
        tokio::select! {
            _ = ctrl_c => {},
            _ = term.recv() => {},
        }
    }
    #[cfg(not(unix))]
    {
        let _ = ctrl_c.await;
    }
}

/// A minimal `GET /readyz` so the container image needs no curl.
async fn healthcheck(mut bind: std::net::SocketAddr) -> anyhow::Result<()> {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    if bind.ip().is_unspecified() {
        bind.set_ip(std::net::Ipv4Addr::LOCALHOST.into());
    }
    let check = async {
        let mut s = tokio::net::TcpStream::connect(bind).await?;
        s.write_all(b"GET /readyz HTTP/1.1\r\nHost: localhost\r\nConnection: close\r\n\r\n")
            .await?;
        let mut buf = Vec::new();
        s.read_to_end(&mut buf).await?;
        anyhow::Ok(String::from_utf8_lossy(&buf).into_owned())
    };
    let resp = tokio::time::timeout(std::time::Duration::from_secs(3), check)
        .await
        .context("timed out")??;
    anyhow::ensure!(
        resp.starts_with("HTTP/1.1 200"),
        "not ready: {}",
        resp.lines().next().unwrap_or("")
    );
    Ok(())
}
