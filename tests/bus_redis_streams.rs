//! The conformance suite and Redis Streams behaviour on a real Redis
//! (`REDIS_URL`, default 127.0.0.1:6379; private `redis-server`s where a test
//! kills connections or changes server settings). Each test has its own key
//! prefix and deletes its keys.
mod common;

use std::time::Duration;

use bytes::Bytes;
use chat_relay::bus::redis_streams::{RedisStreamsConfig, shard_of, stream_key};
use chat_relay::bus::{BusError, MessageBus, Outgoing, Priority, SubscribeOptions};
use chat_relay::replay::{ReplayFrom, replay_redis_streams};
use common::conformance as c;
use common::redis_streams::{Admin, CleanBus, admin, config, prefix, redis_at, url};

/// The suite holds deliveries unacked for up to 6 s while it counts them
/// (competing consumers): a claim idle time below that would hand them to
/// the other member. 8 s is still within the suite's 20 s redelivery wait.
async fn conformance_bus() -> CleanBus {
    let cfg = RedisStreamsConfig {
        redis_streams_claim_idle_ms: 8000,
        ..config(&prefix("conf"))
    };
    CleanBus::connect(&url(), cfg).await
}

conformance_tests!(conformance_bus().await);

/// Entries carry the room and the payload as fields, in the room's shard.
#[tokio::test]
async fn entries_are_in_the_rooms_shard() {
    let bus = CleanBus::fresh("layout").await;
    let room = c::room("layout");
    c::publish(&bus, &room, r#"{"hello":1}"#).await;
    let p = bus.bus.keys()[0].trim_end_matches("stream:0").to_string();
    let key = stream_key(&p, shard_of(&room, 8));
    let v: Vec<(String, Vec<(String, String)>)> = admin(&url(), &["XRANGE", &key, "-", "+"]).await;
    assert_eq!(v.len(), 1, "{v:?}");
    assert_eq!(
        v[0].1,
        vec![
            ("room".to_string(), room.as_str().to_string()),
            ("payload".to_string(), r#"{"hello":1}"#.to_string())
        ]
    );
}

/// A delivery taken over from a consumer that never acked it is flagged
/// `redelivered`; a first delivery is not.
#[tokio::test]
async fn claimed_entries_are_flagged_redelivered() {
    let bus = CleanBus::fresh("flag").await;
    let r = c::room("flag");
    let g = c::uniq("g");
    let mut a = bus
        .subscribe(SubscribeOptions::shared(g.clone()))
        .await
        .unwrap();
    c::publish(&bus, &r, "x").await;
    let first = c::recv_n(&mut a, &[&r], 1, Duration::from_secs(10)).await;
    assert_eq!(first.len(), 1);
    assert!(!first[0].redelivered, "a first delivery is not flagged");
    drop(first);
    drop(a);
    let mut b = bus
        .subscribe(SubscribeOptions::shared(g.clone()))
        .await
        .unwrap();
    let again = c::recv_n(&mut b, &[&r], 1, Duration::from_secs(10)).await;
    assert_eq!(again.len(), 1, "claimed after REDIS_STREAMS_CLAIM_IDLE_MS");
    assert!(again[0].redelivered, "a claimed delivery is flagged");
    assert_eq!(&again[0].payload[..], b"x");
    c::ack_all(again).await;
    // Acked: it does not come back again.
    let none = c::recv_n(&mut b, &[&r], 1, Duration::from_millis(2500)).await;
    assert!(none.is_empty(), "acked entry came back");
}

/// The consumer lag (`XINFO GROUPS` lag + pending, summed over shards) counts
/// entries the group has not been handed yet (the conformance suite checks
/// the handed-out, unacked half).
#[tokio::test]
async fn consumer_lag_counts_undelivered_entries() {
    let bus = CleanBus::fresh("lag").await;
    let g = c::uniq("g");
    let sub = bus
        .subscribe(SubscribeOptions::shared(g.clone()))
        .await
        .unwrap();
    drop(sub);
    tokio::time::sleep(Duration::from_millis(300)).await;
    for i in 0..7 {
        c::publish(&bus, &c::room(&format!("lag{i}x")), "m").await;
    }
    let lag = bus.consumer_lag().expect("reports lag").lag(&g).await;
    assert_eq!(lag, Some(7));
    let mut sub = bus
        .subscribe(SubscribeOptions::shared(g.clone()))
        .await
        .unwrap();
    let mut n = 0;
    while n < 7 {
        let d = tokio::time::timeout(Duration::from_secs(10), sub.next())
            .await
            .unwrap()
            .unwrap();
        d.ack().await.unwrap();
        n += 1;
    }
    assert_eq!(bus.consumer_lag().unwrap().lag(&g).await, Some(0));
}

/// Kills the live reader's connection (`CLIENT KILL ID`) and refuses new
/// connections (`maxclients`) while three messages are published; once it
/// reconnects it reads on from the last id it saw: all three arrive, in
/// order, and the resumption counter stays 0 (no catch-up needed).
#[tokio::test]
async fn live_reader_resumes_from_its_last_id_without_a_gap() {
    let server = common::redis_server::RedisServer::start().await;
    let bus = CleanBus::connect(&server.url(), config(&prefix("gap"))).await;
    let room = c::room("gap");
    let group = c::uniq("inst");
    let mut sub = bus
        .subscribe(SubscribeOptions::instance(group.clone()))
        .await
        .unwrap();
    sub.interest.add_room(&room).await.unwrap();
    c::publish(&bus, &room, "before").await;
    let got = c::ack_all(c::recv_n(&mut sub, &[&room], 1, Duration::from_secs(5)).await).await;
    assert_eq!(got, ["before"]);
    let resumed = sub
        .resumed
        .clone()
        .expect("a live subscription reports resumptions");

    let mut adm = Admin::connect(&server.url()).await;
    adm.kill_and_lock_out(&format!("chat-relay:live:{group}"))
        .await;
    for i in 0..3 {
        c::publish(&bus, &room, &format!("missed{i}")).await;
    }
    adm.allow_connections().await;
    let got = c::ack_all(c::recv_n(&mut sub, &[&room], 3, Duration::from_secs(10)).await).await;
    assert_eq!(got, ["missed0", "missed1", "missed2"]);
    assert_eq!(*resumed.borrow(), 0, "resumed without a gap: no catch-up");
}

/// The same, but the entries after the reader's position were trimmed away
/// meanwhile (`MAXLEN ~ 2` with one entry per stream node, so trimming is
/// exact): the reader cannot resume without a gap and says so — the
/// resumption counter goes up, the gateway then catches up from the DB.
#[tokio::test]
async fn live_reader_reports_a_gap_when_entries_were_trimmed() {
    let server = common::redis_server::RedisServer::start().await;
    let _: () = admin(
        &server.url(),
        &["CONFIG", "SET", "stream-node-max-entries", "1"],
    )
    .await;
    let mut cfg = config(&prefix("trim"));
    cfg.redis_streams_maxlen = 2;
    cfg.redis_streams_shards = 1;
    let bus = CleanBus::connect(&server.url(), cfg).await;
    let room = c::room("trim");
    let group = c::uniq("inst");
    let mut sub = bus
        .subscribe(SubscribeOptions::instance(group.clone()))
        .await
        .unwrap();
    sub.interest.add_room(&room).await.unwrap();
    c::publish(&bus, &room, "before").await;
    assert_eq!(
        c::ack_all(c::recv_n(&mut sub, &[&room], 1, Duration::from_secs(5)).await).await,
        ["before"]
    );
    let mut resumed = sub.resumed.clone().expect("resumptions");

    let mut adm = Admin::connect(&server.url()).await;
    adm.kill_and_lock_out(&format!("chat-relay:live:{group}"))
        .await;
    for i in 0..10 {
        c::publish(&bus, &room, &format!("m{i}")).await;
    }
    let len: i64 = adm.cmd(&["XLEN", &bus.keys()[0]]).await;
    assert!(len <= 3, "trimmed to about 2 entries, XLEN {len}");
    adm.allow_connections().await;
    tokio::time::timeout(Duration::from_secs(10), resumed.changed())
        .await
        .expect("the gap is reported")
        .expect("counter alive");
    assert_eq!(*resumed.borrow(), 1);
}

/// `MAXLEN ~ N` keeps a shard at about N entries (here with one entry per
/// stream node, so exactly); `MAX_AGE_MS` (`MINID ~`) drops entries older
/// than the age.
#[tokio::test]
async fn retention_by_maxlen_and_by_age() {
    let server = common::redis_server::RedisServer::start().await;
    let _: () = admin(
        &server.url(),
        &["CONFIG", "SET", "stream-node-max-entries", "1"],
    )
    .await;
    let mut cfg = config(&prefix("ret"));
    cfg.redis_streams_shards = 1;
    cfg.redis_streams_maxlen = 50;
    let bus = CleanBus::connect(&server.url(), cfg.clone()).await;
    let room = c::room("ret");
    // A group that reads nothing: trimming does not wait for it.
    let g = c::uniq("g");
    drop(
        bus.subscribe(SubscribeOptions::shared(g.clone()))
            .await
            .unwrap(),
    );
    for i in 0..200 {
        c::publish(&bus, &room, &format!("{i}")).await;
    }
    let len: i64 = admin(&server.url(), &["XLEN", &bus.keys()[0]]).await;
    assert!((50..=51).contains(&len), "MAXLEN ~ 50: XLEN {len}");
    assert_eq!(
        bus.consumer_lag().unwrap().lag(&g).await,
        Some(50),
        "only the retained entries are left for the group: 150 it never read were trimmed"
    );

    let mut cfg = config(&prefix("age"));
    cfg.redis_streams_shards = 1;
    cfg.redis_streams_maxlen = 0;
    cfg.redis_streams_max_age_ms = 1000;
    let bus = CleanBus::connect(&server.url(), cfg).await;
    for i in 0..20 {
        c::publish(&bus, &room, &format!("old{i}")).await;
    }
    tokio::time::sleep(Duration::from_millis(1500)).await;
    c::publish(&bus, &room, "new").await;
    let len: i64 = admin(&server.url(), &["XLEN", &bus.keys()[0]]).await;
    assert_eq!(len, 1, "entries older than 1 s are gone");
}

#[tokio::test]
async fn maxlen_and_max_age_together_are_refused() {
    let mut cfg = config(&prefix("both"));
    cfg.redis_streams_max_age_ms = 1000;
    let r = chat_relay::bus::redis_streams::RedisStreamsBus::connect(redis_at(&url()), cfg).await;
    assert!(matches!(r, Err(BusError::Config(_))));
}

/// `chat-relay replay` on Redis Streams: refused while a consumer of the
/// group is active; once it is gone, `--from-beginning` makes a new member
/// read every retained entry again, and `--from-time` only the later ones.
#[tokio::test]
async fn replay_rewinds_a_stopped_group() {
    let p = prefix("replay");
    let cfg = config(&p);
    let bus = CleanBus::connect(&url(), cfg.clone()).await;
    let room = c::room("replay");
    let g = c::uniq("g");
    let mut sub = bus
        .subscribe(SubscribeOptions::shared(g.clone()))
        .await
        .unwrap();
    for i in 0..5 {
        c::publish(&bus, &room, &format!("a{i}")).await;
    }
    let got = c::ack_all(c::recv_n(&mut sub, &[&room], 5, Duration::from_secs(10)).await).await;
    assert_eq!(got.len(), 5);
    let from = |beginning: bool, time: Option<String>| ReplayFrom {
        from_beginning: beginning,
        from_offset: None,
        from_time: time,
        from_sequence: None,
    };
    let redis = redis_at(&url());
    let active = replay_redis_streams(&g, &from(true, None), &redis, &cfg).await;
    assert!(
        matches!(active, Err(BusError::Rejected(_))),
        "an active group is refused: {active:?}"
    );
    drop(sub);
    // Idle past REDIS_STREAMS_CLAIM_IDLE_MS: the consumer counts as gone.
    tokio::time::sleep(Duration::from_millis(1300)).await;
    let report = replay_redis_streams(&g, &from(true, None), &redis, &cfg)
        .await
        .expect("replay");
    assert_eq!(report.streams.len(), 8, "{report}");
    let mut sub = bus
        .subscribe(SubscribeOptions::shared(g.clone()))
        .await
        .unwrap();
    let again = c::ack_all(c::recv_n(&mut sub, &[&room], 5, Duration::from_secs(10)).await).await;
    assert_eq!(again, got, "the whole retained log again, in order");

    let cut = chrono::Utc::now();
    tokio::time::sleep(Duration::from_millis(20)).await;
    for i in 0..3 {
        c::publish(&bus, &room, &format!("b{i}")).await;
    }
    let b = c::ack_all(c::recv_n(&mut sub, &[&room], 3, Duration::from_secs(10)).await).await;
    assert_eq!(b, ["b0", "b1", "b2"]);
    drop(sub);
    tokio::time::sleep(Duration::from_millis(1300)).await;
    replay_redis_streams(&g, &from(false, Some(cut.to_rfc3339())), &redis, &cfg)
        .await
        .expect("replay from time");
    let mut sub = bus
        .subscribe(SubscribeOptions::shared(g.clone()))
        .await
        .unwrap();
    let again = c::ack_all(c::recv_n(&mut sub, &[&room], 3, Duration::from_secs(10)).await).await;
    assert_eq!(again, ["b0", "b1", "b2"], "only the entries after the time");
    let more = c::recv_n(&mut sub, &[&room], 1, Duration::from_millis(1500)).await;
    assert!(more.is_empty(), "nothing older comes back");
}

/// Publishing fails fast while the server is down, and a subscription of a
/// shared group comes back by itself when it is up again (groups re-created
/// on a server that lost them).
#[tokio::test]
async fn redis_restart_fails_fast_and_groups_come_back() {
    let mut server = common::redis_server::RedisServer::start().await;
    let bus = CleanBus::connect(&server.url(), config(&prefix("rs"))).await;
    let room = c::room("rs");
    let mut sub = bus
        .subscribe(SubscribeOptions::shared(c::uniq("g")))
        .await
        .unwrap();
    c::publish(&bus, &room, "before").await;
    assert_eq!(
        c::ack_all(c::recv_n(&mut sub, &[&room], 1, Duration::from_secs(5)).await).await,
        ["before"]
    );
    server.kill().await;
    let t = std::time::Instant::now();
    assert!(bus.ready().await.is_err());
    let r = bus
        .publish(Outgoing {
            room: room.clone(),
            payload: Bytes::from("lost"),
            priority: Priority::Normal,
        })
        .await;
    assert!(r.is_err(), "publish while Redis is down fails");
    assert!(t.elapsed() < Duration::from_secs(5), "failures are fast");
    server.restart().await;
    // No persistence on this server: the entry is gone (the group's
    // reconnect may already have re-created an empty stream).
    let key = bus.keys()[shard_of(&room, 8) as usize].clone();
    let len: i64 = admin(&server.url(), &["XLEN", &key]).await;
    assert_eq!(len, 0, "a restart without persistence loses the stream");
    let got = tokio::time::timeout(Duration::from_secs(20), async {
        loop {
            let _ = bus
                .publish(Outgoing {
                    room: room.clone(),
                    payload: Bytes::from("after"),
                    priority: Priority::Normal,
                })
                .await;
            if let Ok(Some(d)) = tokio::time::timeout(Duration::from_millis(500), sub.next()).await
            {
                return d;
            }
        }
    })
    .await
    .expect("the group subscription comes back");
    assert_eq!(&got.payload[..], b"after");
}

/// `XACK` calls so far on a private server (`INFO commandstats`).
async fn xack_calls(url: &str) -> u64 {
    let info: String = admin(url, &["INFO", "commandstats"]).await;
    info.lines()
        .find_map(|l| l.strip_prefix("cmdstat_xack:calls="))
        .and_then(|rest| rest.split(',').next())
        .map_or(0, |n| n.parse().expect("a call count"))
}

/// Entries of `group` still pending (handed out, not acked), summed over the
/// shard streams.
async fn pending(url: &str, bus: &CleanBus, group: &str) -> Vec<String> {
    let mut ids = Vec::new();
    for key in bus.bus.keys() {
        let v: Vec<(String, String, u64, u64)> =
            admin(url, &["XPENDING", key, group, "-", "+", "1000"]).await;
        ids.extend(v.into_iter().map(|e| e.0));
    }
    ids
}

/// A worker's batch is acked with one `XACK` per stream it spans, not one per
/// entry, and only the entries in it: one held back stays pending, exactly
/// it, and can still be acked afterwards. Counted by the server itself.
#[tokio::test]
async fn batch_ack_is_one_xack_per_stream_and_exact() {
    let server = common::redis_server::RedisServer::start().await;
    let bus = CleanBus::connect(&server.url(), config(&prefix("ba"))).await;
    let g = c::uniq("ba");
    let mut sub = bus
        .subscribe(SubscribeOptions::shared(g.clone()))
        .await
        .unwrap();
    // 40 entries over 4 rooms: at most 4 shard streams.
    let rooms: Vec<_> = (0..4).map(|i| c::room(&format!("ba{i}x"))).collect();
    let shards: std::collections::HashSet<_> = rooms.iter().map(|r| shard_of(r, 8)).collect();
    for i in 0..40 {
        c::publish(&bus, &rooms[i % 4], &format!("m{i}")).await;
    }
    let want: Vec<&_> = rooms.iter().collect();
    let mut batch = c::recv_n(&mut sub, &want, 40, Duration::from_secs(10)).await;
    assert_eq!(batch.len(), 40);
    let held = batch.remove(17);
    let before = xack_calls(&server.url()).await;
    chat_relay::bus::Delivery::ack_batch(batch).await.unwrap();
    let calls = xack_calls(&server.url()).await - before;
    assert_eq!(
        calls,
        shards.len() as u64,
        "one XACK per stream, not per entry"
    );
    let left = pending(&server.url(), &bus, &g).await;
    assert_eq!(left.len(), 1, "only the held entry is pending: {left:?}");
    held.ack().await.unwrap();
    assert!(pending(&server.url(), &bus, &g).await.is_empty());
}
