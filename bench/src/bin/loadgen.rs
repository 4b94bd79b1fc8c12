//! `loadgen`: a lean WebSocket load generator for chat-relay, for when k6
//! saturates the 2-core machine before the relay does.
//!
//! Fan-out mode: `rooms × subs` subscriber connections; `publishers`
//! connections send at a fixed total `rate` (open loop: a send is due on the
//! clock, whether or not the previous one was acked). Every message carries the
//! publisher id, a per-publisher sequence number and the send time, so each
//! subscriber measures end-to-end latency (hdrhistogram, µs) and counts loss,
//! duplicates, reordering and room positions delivered out of order. Prints
//! one JSON line.
//!
//!     cargo run --release --bin loadgen -- --url ws://127.0.0.1:8080 --rooms 100 --subs 50 --rate 4000 --seconds 20

use std::collections::{BTreeMap, HashMap};
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use clap::Parser;
use futures::{SinkExt, StreamExt};
use hdrhistogram::Histogram;
use serde_json::json;
use tokio::sync::Mutex;
use tokio_tungstenite::tungstenite::Message;

#[derive(Parser, Debug, Clone)]
struct Args {
    /// Relay WebSocket base URLs, comma-separated (clients are spread over them).
    #[arg(long, default_value = "ws://127.0.0.1:8080")]
    url: String,
    #[arg(long, default_value_t = 10)]
    rooms: usize,
    /// Subscribers per room.
    #[arg(long, default_value_t = 10)]
    subs: usize,
    /// Publisher connections (spread over the rooms).
    #[arg(long, default_value_t = 20)]
    publishers: usize,
    /// Total messages per second over all publishers.
    #[arg(long, default_value_t = 1000)]
    rate: u64,
    #[arg(long, default_value_t = 10)]
    seconds: u64,
    /// Message text size in bytes.
    #[arg(long, default_value_t = 100)]
    size: usize,
    /// Seconds to keep reading after the last send.
    #[arg(long, default_value_t = 3)]
    drain: u64,
    /// Room name prefix (defaults to a unique one).
    #[arg(long)]
    prefix: Option<String>,
    /// Density mode: open this many idle connections (each joined to one of
    /// `rooms`), hold them `hold` seconds, print a JSON line. No publishing.
    #[arg(long, default_value_t = 0)]
    idle_conns: usize,
    /// Seconds to hold the idle connections once all have joined.
    #[arg(long, default_value_t = 20)]
    hold: u64,
    /// Spread idle connections over source addresses 127.0.0.1..=127.0.0.N:
    /// one source address reaches only ~28,000 ports to one relay port.
    #[arg(long, default_value_t = 1)]
    source_ips: u8,
}

fn now_us() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_micros() as u64)
        .unwrap_or(0)
}

/// The generator's WebSocket buffers. tungstenite's default read buffer is
/// 128 KiB and it zeroes that much before every read: with thousands of
/// subscribers reading a small frame each, that memset was a third of the
/// generator's CPU (`perf`: 10 % of the whole machine in `memset` under the
/// full profile) — CPU the relay and the brokers it measures did not get.
fn ws_config() -> tokio_tungstenite::tungstenite::protocol::WebSocketConfig {
    tokio_tungstenite::tungstenite::protocol::WebSocketConfig::default().read_buffer_size(4096)
}

/// The parts of a server frame the subscribers look at.
#[derive(serde::Deserialize)]
struct Frame<'a> {
    #[serde(rename = "type", borrow)]
    kind: &'a str,
    /// Escaped JSON inside JSON: borrowed when it has no escapes, owned otherwise.
    #[serde(default, borrow)]
    text: Option<std::borrow::Cow<'a, str>>,
    /// When the gateway stamped the message (ms): after its room position
    /// was taken, just before it went to the bus.
    #[serde(default)]
    ts: Option<u64>,
    /// The message's room position.
    #[serde(default)]
    seq: Option<i64>,
}

/// A load-generator message body: run prefix, publisher, sequence, send time (µs).
#[derive(serde::Deserialize)]
struct Body<'a> {
    #[serde(borrow)]
    r: std::borrow::Cow<'a, str>,
    p: u64,
    s: u64,
    t: u64,
}

#[derive(Default)]
struct SubStats {
    received: u64,
    dups: u64,
    reordered: u64,
    gaps: u64,
    /// Deliveries whose room position was below one this subscriber already
    /// got: the room's order as the sequencer gave it was not the order of
    /// delivery (two publishers' messages crossed on the way). A client
    /// resuming from the higher position would never get the lower one.
    seq_inversions: u64,
    /// Deliveries whose publisher sat on another relay instance.
    cross: u64,
}

/// Where clients sit when several relay URLs are given, so that every room
/// spans instances: the k-th subscriber of a room (subscriber `i` is in room
/// `i % rooms`) on instance `k % n`, and a room's publishers rotated over the
/// instances too. (Placing subscriber `i` on `i % n` would put every
/// subscriber of a room on one instance whenever `n` divides the room count:
/// no delivery would cross instances.)
#[derive(Clone, Copy)]
struct Placement {
    rooms: usize,
    instances: usize,
}

impl Placement {
    fn subscriber(&self, i: usize) -> usize {
        (i / self.rooms) % self.instances
    }
    fn publisher(&self, p: usize) -> usize {
        (p % self.rooms + p / self.rooms) % self.instances
    }
}

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    let args = Args::parse();
    if args.idle_conns > 0 {
        return idle(&args).await;
    }
    let urls: Vec<String> = args.url.split(',').map(|s| s.trim().to_string()).collect();
    let place = Placement {
        rooms: args.rooms.max(1),
        instances: urls.len().max(1),
    };
    let prefix = args
        .prefix
        .clone()
        .unwrap_or_else(|| format!("lg{}", now_us() % 1_000_000_000));
    let room = |i: usize| format!("chat.{prefix}-{}", i % args.rooms);
    // End to end, and split at the gateway's `ts` stamp: ingress (client →
    // gateway → room position) and egress (bus → live consumer → socket).
    // `ts` has millisecond resolution, so the halves are ±1 ms.
    let hist = Arc::new(Mutex::new([
        Histogram::<u64>::new_with_bounds(1, 60_000_000, 3)?,
        Histogram::<u64>::new_with_bounds(1, 60_000_000, 3)?,
        Histogram::<u64>::new_with_bounds(1, 60_000_000, 3)?,
    ]));
    let totals = Arc::new(Mutex::new(SubStats::default()));
    let joined = Arc::new(AtomicU64::new(0));
    // Subscribers read until the publishers are done plus `drain` seconds
    // (connecting thousands of subscribers takes seconds of its own).
    let done = tokio_util::sync::CancellationToken::new();

    // Subscribers.
    let mut subs = Vec::new();
    for i in 0..args.rooms * args.subs {
        let instance = place.subscriber(i);
        let url = format!("{}/ws?user=s{i}", urls[instance]);
        let (room, hist, totals, joined, prefix, done) = (
            room(i),
            hist.clone(),
            totals.clone(),
            joined.clone(),
            prefix.clone(),
            done.clone(),
        );
        subs.push(tokio::spawn(async move {
            let (mut ws, _) =
                match tokio_tungstenite::connect_async_with_config(&url, Some(ws_config()), true)
                    .await
                {
                    Ok(c) => c,
                    Err(e) => {
                        eprintln!("subscriber connect failed: {e}");
                        return;
                    }
                };
            let _ = ws
                .send(Message::Text(
                    json!({"type":"join","room":room}).to_string().into(),
                ))
                .await;
            let new = || Histogram::<u64>::new_with_bounds(1, 60_000_000, 3).expect("histogram");
            let mut local = [new(), new(), new()];
            let mut st = SubStats::default();
            let mut last: HashMap<u64, u64> = HashMap::new();
            let mut seen: HashMap<u64, std::collections::HashSet<u64>> = HashMap::new();
            let mut last_seq: Option<i64> = None;
            loop {
                let m = tokio::select! {
                    _ = done.cancelled() => break,
                    m = ws.next() => m,
                };
                let m = match m {
                    Some(Ok(Message::Text(t))) => t,
                    Some(Ok(_)) => continue,
                    _ => break,
                };
                // Typed, borrowed parsing: the generator must stay cheaper
                // than the relay it measures.
                let v: Frame = match serde_json::from_str(m.as_str()) {
                    Ok(v) => v,
                    Err(_) => continue,
                };
                match v.kind {
                    "joined" => {
                        joined.fetch_add(1, Ordering::Relaxed);
                    }
                    "message" => {
                        let Some(text) = v.text else {
                            continue;
                        };
                        let Ok(b) = serde_json::from_str::<Body>(&text) else {
                            continue;
                        };
                        if b.r != prefix.as_str() {
                            continue;
                        }
                        let (p, s, t) = (b.p, b.s, b.t);
                        let now = now_us();
                        let _ = local[0].record(now.saturating_sub(t).max(1));
                        if let Some(ts) = v.ts.map(|ms| ms * 1000) {
                            let _ = local[1].record(ts.saturating_sub(t).max(1));
                            let _ = local[2].record(now.saturating_sub(ts).max(1));
                        }
                        st.received += 1;
                        if place.publisher(p as usize) != instance {
                            st.cross += 1;
                        }
                        if !seen.entry(p).or_default().insert(s) {
                            st.dups += 1;
                            continue;
                        }
                        if let Some(q) = v.seq {
                            if last_seq.is_some_and(|l| q < l) {
                                st.seq_inversions += 1;
                            }
                            last_seq = last_seq.max(Some(q));
                        }
                        let l = last.entry(p).or_insert(u64::MAX);
                        if *l != u64::MAX && s < *l {
                            st.reordered += 1;
                        }
                        if *l == u64::MAX || s > *l {
                            *l = s;
                        }
                    }
                    _ => {}
                }
            }
            for s in seen.values() {
                if let (Some(min), Some(max)) = (s.iter().min(), s.iter().max()) {
                    st.gaps += (max - min + 1) - s.len() as u64;
                }
            }
            let mut h = hist.lock().await;
            for (h, l) in h.iter_mut().zip(&local) {
                let _ = h.add(l);
            }
            drop(h);
            let mut t = totals.lock().await;
            t.received += st.received;
            t.dups += st.dups;
            t.reordered += st.reordered;
            t.gaps += st.gaps;
            t.seq_inversions += st.seq_inversions;
            t.cross += st.cross;
        }));
    }
    let deadline = Instant::now() + Duration::from_secs(30);
    while joined.load(Ordering::Relaxed) < (args.rooms * args.subs) as u64
        && Instant::now() < deadline
    {
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    let joined_n = joined.load(Ordering::Relaxed);

    // Publishers: open loop at rate/publishers each.
    let acked = Arc::new(AtomicU64::new(0));
    let errors = Arc::new(AtomicU64::new(0));
    // Error frames by code, with the first message of each: a refusal is
    // only explained by what the relay said.
    let error_codes: Arc<std::sync::Mutex<BTreeMap<String, (u64, String)>>> = Arc::default();
    let sent = Arc::new(AtomicU64::new(0));
    let late = Arc::new(AtomicU64::new(0));
    let per_pub = (args.rate as f64 / args.publishers as f64).max(0.001);
    let pad = "x".repeat(args.size.saturating_sub(60));
    let started = Instant::now();
    // Every publisher connects and joins within this, then starts at its phase.
    let start_at = started + Duration::from_millis(500);
    // Markers for drivers that measure CPU over the publishing window only.
    let sending = Arc::new(AtomicU64::new(args.publishers as u64));
    tokio::spawn(async move {
        tokio::time::sleep_until(start_at.into()).await;
        eprintln!("publish-start");
    });
    let mut pubs = Vec::new();
    for p in 0..args.publishers {
        let url = format!("{}/ws?user=p{p}", urls[place.publisher(p)]);
        let (room, acked, errors, error_codes, sent, late, pad, prefix) = (
            room(p),
            acked.clone(),
            errors.clone(),
            error_codes.clone(),
            sent.clone(),
            late.clone(),
            pad.clone(),
            prefix.clone(),
        );
        let (seconds, publishers, sending) = (args.seconds, args.publishers, sending.clone());
        pubs.push(tokio::spawn(async move {
            let (ws, _) =
                match tokio_tungstenite::connect_async_with_config(&url, Some(ws_config()), true)
                    .await
                {
                    Ok(c) => c,
                    Err(e) => {
                        eprintln!("publisher connect failed: {e}");
                        return;
                    }
                };
            let (mut tx, mut rx) = ws.split();
            let _ = tx
                .send(Message::Text(
                    json!({"type":"join","room":room}).to_string().into(),
                ))
                .await;
            let reader = tokio::spawn(async move {
                while let Some(Ok(m)) = rx.next().await {
                    if let Message::Text(t) = m {
                        if t.as_str().starts_with(r#"{"type":"ack""#) {
                            acked.fetch_add(1, Ordering::Relaxed);
                        } else if t.as_str().starts_with(r#"{"type":"error""#) {
                            errors.fetch_add(1, Ordering::Relaxed);
                            let v: serde_json::Value =
                                serde_json::from_str(t.as_str()).unwrap_or_default();
                            let code = v["code"].as_str().unwrap_or("?").to_string();
                            if let Ok(mut m) = error_codes.lock() {
                                let e = m.entry(code).or_insert_with(|| {
                                    (0, v["message"].as_str().unwrap_or("").to_string())
                                });
                                e.0 += 1;
                            }
                        }
                    }
                }
            });
            // Stagger the publishers over one period: started together, they
            // would all send in the same instant every period, and the
            // resulting bursts (publishers × subs deliveries at once) measure
            // the generator's schedule, not the relay.
            let period = Duration::from_secs_f64(1.0 / per_pub);
            let phase = period.mul_f64(p as f64 / publishers as f64);
            tokio::time::sleep_until((start_at + phase).into()).await;
            let mut tick = tokio::time::interval(period);
            tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Burst);
            // Exactly rate × seconds over all publishers: a deadline loop
            // sent one more per publisher (its first tick fires at once).
            let total = (seconds as f64 * per_pub).round() as u64;
            let mut seq = 0u64;
            while seq < total {
                let due = tick.tick().await;
                if due.elapsed() > Duration::from_millis(10) {
                    late.fetch_add(1, Ordering::Relaxed);
                }
                let text =
                    json!({"r": prefix, "p": p, "s": seq, "t": now_us(), "x": pad}).to_string();
                let f = json!({"type":"send","room":room,"text":text,"cid":seq.to_string()})
                    .to_string();
                if tx.send(Message::Text(f.into())).await.is_err() {
                    break;
                }
                sent.fetch_add(1, Ordering::Relaxed);
                seq += 1;
            }
            if sending.fetch_sub(1, Ordering::Relaxed) == 1 {
                eprintln!("publish-end");
            }
            tokio::time::sleep(Duration::from_secs(2)).await;
            reader.abort();
        }));
    }
    for p in pubs {
        let _ = p.await;
    }
    let send_secs = started
        .elapsed()
        .as_secs_f64()
        .min(args.seconds as f64)
        .max(0.001);
    tokio::time::sleep(Duration::from_secs(args.drain)).await;
    done.cancel();
    for s in subs {
        let _ = s.await;
    }
    let hs = hist.lock().await;
    let h = &hs[0];
    let split = |h: &Histogram<u64>| {
        let q = |q: f64| h.value_at_quantile(q) as f64 / 1000.0;
        json!({"p50": q(0.5), "p99": q(0.99)})
    };
    let t = totals.lock().await;
    let acked = acked.load(Ordering::Relaxed);
    let expected = acked * args.subs as u64;
    let ms = |q: f64| h.value_at_quantile(q) as f64 / 1000.0;
    let out = json!({
        "rooms": args.rooms, "subs": args.subs, "publishers": args.publishers, "rate": args.rate,
        "seconds": args.seconds, "size": args.size, "subscribers_joined": joined_n,
        "sent": sent.load(Ordering::Relaxed), "acked": acked, "errors": errors.load(Ordering::Relaxed),
        "error_codes": error_codes.lock().map(|m| m.iter().map(|(k, (n, msg))| (k.clone(), json!({"count": n, "first": msg}))).collect::<serde_json::Map<_, _>>()).unwrap_or_default(),
        "late_sends": late.load(Ordering::Relaxed),
        "deliveries": t.received, "expected_deliveries": expected,
        "lost": expected.saturating_sub(t.received - t.dups), "duplicates": t.dups, "reordered": t.reordered, "gaps": t.gaps, "seq_inversions": t.seq_inversions,
        "deliveries_per_s": (t.received as f64 / send_secs).round(),
        "cross_instance_share": if t.received > 0 { t.cross as f64 / t.received as f64 } else { 0.0 },
        "e2e_ms": {"p50": ms(0.5), "p95": ms(0.95), "p99": ms(0.99), "p999": ms(0.999), "max": h.max() as f64 / 1000.0},
        "ingress_ms": split(&hs[1]), "egress_ms": split(&hs[2]),
    });
    println!("{out}");
    Ok(())
}

/// Density mode: `idle_conns` connections that join a room and stay idle.
/// Prints `all joined` on stderr when the last one joined (the driver samples
/// the relay's RSS then), holds, and prints one JSON line.
async fn idle(args: &Args) -> anyhow::Result<()> {
    use tokio_tungstenite::tungstenite::protocol::WebSocketConfig;
    let base = args.url.split(',').next().unwrap_or_default().to_string();
    let uri: tokio_tungstenite::tungstenite::http::Uri = base.parse()?;
    let host = uri.host().unwrap_or("127.0.0.1").to_string();
    let addr: std::net::SocketAddr = format!("{host}:{}", uri.port_u16().unwrap_or(80)).parse()?;
    let prefix = args.prefix.clone().unwrap_or_else(|| "idle".into());
    let joined = Arc::new(AtomicU64::new(0));
    let failed = Arc::new(AtomicU64::new(0));
    let times = Arc::new(Mutex::new(Histogram::<u64>::new_with_bounds(
        1, 600_000, 3,
    )?));
    let release = tokio_util::sync::CancellationToken::new();
    // Handshakes in flight at once: keeps the relay's accept queue short.
    let gate = Arc::new(tokio::sync::Semaphore::new(256));
    let started = Instant::now();
    let mut tasks = Vec::with_capacity(args.idle_conns);
    for i in 0..args.idle_conns {
        let src =
            std::net::Ipv4Addr::new(127, 0, 0, 1 + (i % args.source_ips.max(1) as usize) as u8);
        let url = format!("{base}/ws?user=i{i}");
        let room = format!("chat.{prefix}-{}", i % args.rooms.max(1));
        let (joined, failed, times, release, gate) = (
            joined.clone(),
            failed.clone(),
            times.clone(),
            release.clone(),
            gate.clone(),
        );
        tasks.push(tokio::spawn(async move {
            let permit = gate.acquire_owned().await;
            let t0 = Instant::now();
            let conn = async {
                let sock = tokio::net::TcpSocket::new_v4()?;
                sock.bind(std::net::SocketAddr::new(src.into(), 0))?;
                let stream = sock.connect(addr).await?;
                let cfg = WebSocketConfig::default()
                    .read_buffer_size(4096)
                    .write_buffer_size(0);
                let (mut ws, _) =
                    tokio_tungstenite::client_async_with_config(url, stream, Some(cfg)).await?;
                ws.send(Message::Text(
                    json!({"type":"join","room":room}).to_string().into(),
                ))
                .await?;
                while let Some(m) = ws.next().await {
                    if let Message::Text(t) = m?
                        && t.as_str().starts_with(r#"{"type":"joined""#)
                    {
                        return anyhow::Ok(ws);
                    }
                }
                anyhow::bail!("closed before joined")
            };
            let mut ws = match tokio::time::timeout(Duration::from_secs(60), conn).await {
                Ok(Ok(ws)) => ws,
                Ok(Err(e)) => {
                    if failed.fetch_add(1, Ordering::Relaxed) < 5 {
                        eprintln!("idle connection failed: {e}");
                    }
                    return;
                }
                Err(_) => {
                    failed.fetch_add(1, Ordering::Relaxed);
                    return;
                }
            };
            drop(permit);
            let _ = times
                .lock()
                .await
                .record(t0.elapsed().as_millis().max(1) as u64);
            joined.fetch_add(1, Ordering::Relaxed);
            // Idle: answer pings (tungstenite does on read) until released.
            loop {
                tokio::select! {
                    _ = release.cancelled() => break,
                    m = ws.next() => if m.is_none() { break },
                }
            }
            let _ = ws.close(None).await;
        }));
    }
    let n = args.idle_conns as u64;
    while joined.load(Ordering::Relaxed) + failed.load(Ordering::Relaxed) < n {
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    let ramp = started.elapsed().as_secs_f64();
    eprintln!("all joined: {} of {n}", joined.load(Ordering::Relaxed));
    tokio::time::sleep(Duration::from_secs(args.hold)).await;
    release.cancel();
    for t in tasks {
        let _ = t.await;
    }
    let h = times.lock().await;
    println!(
        "{}",
        json!({"mode": "idle", "conns": n, "joined": joined.load(Ordering::Relaxed),
               "failed": failed.load(Ordering::Relaxed), "ramp_s": (ramp * 10.0).round() / 10.0,
               "connect_join_ms": {"p50": h.value_at_quantile(0.5), "p99": h.value_at_quantile(0.99)}})
    );
    Ok(())
}
