//! The cursor and dedupe tables: what they answer and that each is pruned
//! (README "Bounded state"), on SQLite and PostgreSQL.
mod common;

use chat_relay::protocol::{ChatMessage, MessageKind, RoomId};
use chat_relay::store::{NewClaim, SendKey, SeqSend, Store};
use common::app::{pg_db, sqlite_db};

fn key(room: &RoomId, cid: &str) -> SendKey {
    SendKey {
        room: room.clone(),
        user: "u".into(),
        cid: cid.into(),
    }
}

/// The sequencer's burst: many claims in one call — new ones, one an earlier
/// send holds, and one key twice (new once) — and their settling in one call.
async fn batched_claims(db: &str) {
    let store = Store::connect(db).await.expect("store");
    let room = RoomId::parse("chat.batch").expect("room");
    assert_eq!(
        store
            .claim_send(&room, "u", "old", "id0")
            .await
            .expect("claim"),
        None
    );
    let claim = |cid: &'static str, id: &'static str| NewClaim {
        room: &room,
        user: "u",
        cid,
        id,
    };
    let fresh = store
        .claim_sends(&[
            claim("a", "id1"),
            claim("old", "id2"),
            claim("b", "id3"),
            claim("b", "id4"),
        ])
        .await
        .expect("claims");
    assert_eq!(fresh[..2], [true, false]);
    assert_eq!(fresh[2] as u8 + fresh[3] as u8, 1, "{fresh:?}");
    store
        .settle_sends(&[key(&room, "a")], &[key(&room, "b")])
        .await
        .expect("settle");
    let a = store
        .claim_send(&room, "u", "a", "id5")
        .await
        .expect("claim");
    assert_eq!(a.map(|c| (c.id, c.confirmed)), Some(("id1".into(), true)));
    // Released: a retry of `b` may publish.
    assert_eq!(
        store
            .claim_send(&room, "u", "b", "id6")
            .await
            .expect("claim"),
        None
    );
}

#[tokio::test]
async fn batched_claims_sqlite() {
    let (_dir, db) = sqlite_db();
    batched_claims(&db).await;
}

#[tokio::test]
async fn batched_claims_postgres() {
    let db = pg_db().await;
    batched_claims(&db).await;
}

async fn cursor_and_dedupe(db: &str) {
    let store = Store::connect(db).await.expect("store");
    let room = RoomId::parse("chat.bounds").expect("room");
    // Positions: 1, 2, 3 … in one epoch.
    let first = store.next_seq(&room).await.expect("seq");
    let second = store.next_seq(&room).await.expect("seq");
    assert_eq!((first.seq, second.seq), (1, 2));
    assert_eq!(first.epoch, second.epoch);
    assert_eq!(store.room_head(&room).await.expect("head"), Some(second));
    // A voided position shows in the range; a stored one with its seq.
    store.void_seq(&room, 1).await.expect("void");
    let m = ChatMessage {
        room: room.clone(),
        id: ulid::Ulid::new().to_string(),
        user: "u".into(),
        text: "t".into(),
        ts: 1,
        kind: MessageKind::Chat,
        seq: Some(2),
    };
    store
        .insert_messages(std::slice::from_ref(&m))
        .await
        .expect("insert");
    let (rows, voids) = store.seq_range(&room, 0, 2).await.expect("range");
    assert_eq!((rows, voids), (vec![m.clone()], vec![1]));
    assert_eq!(store.seq_of(&room, &m.id).await.expect("seq_of"), Some(2));

    // A cid claim: new, then taken (pending), then confirmed; a failed one is released.
    assert_eq!(
        store
            .claim_send(&room, "u", "c1", "id1")
            .await
            .expect("claim"),
        None
    );
    let again = store
        .claim_send(&room, "u", "c1", "id2")
        .await
        .expect("claim");
    assert_eq!(
        again.map(|c| (c.id, c.confirmed)),
        Some(("id1".into(), false))
    );
    store
        .settle_sends(&[key(&room, "c1")], &[])
        .await
        .expect("settle");
    let again = store
        .claim_send(&room, "u", "c1", "id3")
        .await
        .expect("claim");
    assert_eq!(
        again.map(|c| (c.id, c.confirmed)),
        Some(("id1".into(), true))
    );
    assert_eq!(
        store
            .claim_send(&room, "u", "c2", "id4")
            .await
            .expect("claim"),
        None
    );
    store
        .settle_sends(&[], &[key(&room, "c2")])
        .await
        .expect("settle");
    assert_eq!(
        store
            .claim_send(&room, "u", "c2", "id5")
            .await
            .expect("claim"),
        None
    );

    // Pruning: a window of 0 ms drops every claim; voids stay for 24 h.
    tokio::time::sleep(std::time::Duration::from_millis(5)).await;
    assert_eq!(store.prune_sends(0).await.expect("prune"), 2);
    assert_eq!(
        store
            .claim_send(&room, "u", "c1", "id6")
            .await
            .expect("claim"),
        None
    );
    let (_, voids) = store.seq_range(&room, 0, 2).await.expect("range");
    assert_eq!(voids, vec![1]);

    // Counted ids are dropped after the analytics window.
    store.apply_analytics(&[m], 1000).await.expect("count");
    tokio::time::sleep(std::time::Duration::from_millis(5)).await;
    assert!(store.prune_activity(0).await.expect("prune") >= 1);
}

#[tokio::test]
async fn cursor_and_dedupe_tables_sqlite() {
    let (_d, db) = sqlite_db();
    cursor_and_dedupe(&db).await;
}

#[tokio::test]
async fn cursor_and_dedupe_tables_postgres() {
    cursor_and_dedupe(&pg_db().await).await;
}

/// Two relays starting at once on a fresh SQLite file both migrate it without
/// error (they took turns on the migration lock), ten times over.
#[tokio::test]
async fn concurrent_starts_on_a_fresh_sqlite_file() {
    for _ in 0..10 {
        let (_d, db) = sqlite_db();
        let (a, b) = tokio::join!(Store::connect(&db), Store::connect(&db));
        let (a, b) = (a.expect("first start"), b.expect("second start"));
        let room = RoomId::parse("chat.race").expect("room");
        assert_eq!(a.next_seq(&room).await.expect("seq").seq, 1);
        assert_eq!(b.next_seq(&room).await.expect("seq").seq, 2);
    }
}

/// The heartbeat's one query for all rooms: members of the asked rooms on
/// live instances only, with their room.
async fn presence_members_of_many_rooms(db: &str) {
    let store = Store::connect(db).await.expect("store");
    let room = |n: &str| RoomId::parse(&format!("chat.{n}")).expect("room");
    let now = chrono::Utc::now().timestamp_millis();
    store.presence_beat("live", now).await.expect("beat");
    store
        .presence_beat("dead", now - 60_000)
        .await
        .expect("beat");
    store
        .presence_change("live", &room("a"), "alice", 1)
        .await
        .expect("write");
    store
        .presence_change("live", &room("b"), "bob", 1)
        .await
        .expect("write");
    store
        .presence_change("live", &room("c"), "carol", 1)
        .await
        .expect("write");
    store
        .presence_change("dead", &room("a"), "dan", 1)
        .await
        .expect("write");
    let mut got = store
        .presence_members_in(&[room("a"), room("b"), room("none")], now - 10_000)
        .await
        .expect("members");
    got.sort();
    let want = [("chat.a", "live", "alice"), ("chat.b", "live", "bob")]
        .map(|(r, i, u)| (r.to_string(), i.to_string(), u.to_string()));
    assert_eq!(got, want);
    // The same answer as the per-room query the join uses.
    assert_eq!(
        store
            .presence_members(&room("a"), now - 10_000)
            .await
            .expect("members"),
        vec![("live".to_string(), "alice".to_string())]
    );
    assert!(
        store
            .presence_members_in(&[], now)
            .await
            .expect("members")
            .is_empty()
    );
}

#[tokio::test]
async fn presence_members_of_many_rooms_sqlite() {
    let (_d, db) = sqlite_db();
    presence_members_of_many_rooms(&db).await;
}

#[tokio::test]
async fn presence_members_of_many_rooms_postgres() {
    presence_members_of_many_rooms(&pg_db().await).await;
}

/// Two gateways take positions of the same rooms at once, their batches
/// listing the rooms in opposite orders. `take_seqs` locks the rows in one
/// order (by room), so they never deadlock: before, PostgreSQL found a
/// deadlock about once per second of load at two gateways, held both batches
/// for `deadlock_timeout` (1 s) and failed one (`db_unavailable`).
#[tokio::test]
async fn position_batches_of_two_gateways_never_deadlock_postgres() {
    let db = pg_db().await;
    let store = Store::connect(&db).await.expect("store");
    let rooms: Vec<(RoomId, i64)> = (0..40)
        .map(|i| (RoomId::parse(&format!("chat.dl{i}")).expect("room"), 1))
        .collect();
    let reversed: Vec<(RoomId, i64)> = rooms.iter().rev().cloned().collect();
    let run = |store: Store, batch: Vec<(RoomId, i64)>| {
        tokio::spawn(async move {
            for _ in 0..150 {
                store.take_seqs(&batch).await?;
            }
            Ok::<_, chat_relay::store::StoreError>(())
        })
    };
    let a = run(store.clone(), rooms.clone());
    let b = run(store.clone(), reversed);
    a.await.expect("task").expect("batch a");
    b.await.expect("task").expect("batch b");
    // Every position handed out once: 300 batches took one of each room.
    let head = store
        .room_head(&rooms[0].0)
        .await
        .expect("head")
        .expect("some");
    assert_eq!(head.seq, 300);
}

/// The sequencer's one-statement burst (`Store::sequence`): earlier
/// confirmations ride along, new claims take positions in the order given
/// (claimless sends always do), a key an earlier send holds and the second
/// of a key claimed twice take none, and each room's head covers exactly its
/// new sends.
async fn one_statement_burst(db: &str) {
    let store = Store::connect(db).await.expect("store");
    let (r1, r2) = (
        RoomId::parse("chat.burst1").expect("room"),
        RoomId::parse("chat.burst2").expect("room"),
    );
    // An earlier send, still pending, and one whose publish is confirmed
    // by this burst.
    assert_eq!(
        store
            .claim_send(&r1, "u", "old", "id0")
            .await
            .expect("claim"),
        None
    );
    assert_eq!(
        store
            .claim_send(&r2, "u", "done", "id9")
            .await
            .expect("claim"),
        None
    );
    store.take_seqs(&[(r1.clone(), 5)]).await.expect("seqs");
    let send = |room, claim| SeqSend { room, claim };
    let out = store
        .sequence(
            &[
                send(&r1, Some(("u", "a", "id1"))),
                send(&r1, None),
                send(&r1, Some(("u", "old", "id2"))),
                send(&r2, Some(("u", "b", "id3"))),
                send(&r2, Some(("u", "b", "id4"))),
                send(&r1, Some(("u", "c", "id5"))),
            ],
            &[key(&r2, "done")],
        )
        .await
        .expect("sequence");
    assert_eq!(out.takes[..4], [true, true, false, true], "{:?}", out.takes);
    assert!(
        !out.takes[4],
        "a key claimed twice in one burst is new once"
    );
    assert!(out.takes[5]);
    // r1 had 5 positions; its 3 new sends got 6..=8. r2 is new: 1.
    assert_eq!(out.heads.get(r1.as_str()).map(|h| h.seq), Some(8));
    assert_eq!(out.heads.get(r2.as_str()).map(|h| h.seq), Some(1));
    assert_eq!(out.heads.len(), 2);
    let epoch = store
        .room_head(&r1)
        .await
        .expect("head")
        .expect("some")
        .epoch;
    assert_eq!(
        out.heads[r1.as_str()].epoch,
        epoch,
        "the epoch of an existing room is kept"
    );
    // The confirmation rode along: a retry of `done` gets the original id.
    let done = store
        .claim_send(&r2, "u", "done", "id10")
        .await
        .expect("claim");
    assert_eq!(
        done.map(|c| (c.id, c.confirmed)),
        Some(("id9".into(), true))
    );
    // The new claims are pending under their message ids.
    let a = store
        .claim_send(&r1, "u", "a", "id11")
        .await
        .expect("claim");
    assert_eq!(a.map(|c| (c.id, c.confirmed)), Some(("id1".into(), false)));
    // Only confirmations, no sends: settled alone.
    let none = store.sequence(&[], &[key(&r1, "a")]).await.expect("settle");
    assert!(none.takes.is_empty() && none.heads.is_empty());
    let a = store
        .claim_send(&r1, "u", "a", "id12")
        .await
        .expect("claim");
    assert_eq!(a.map(|c| c.confirmed), Some(true));
}

#[tokio::test]
async fn one_statement_burst_sqlite() {
    let (_dir, db) = sqlite_db();
    one_statement_burst(&db).await;
}

#[tokio::test]
async fn one_statement_burst_postgres() {
    one_statement_burst(&pg_db().await).await;
}

/// The same as `position_batches_of_two_gateways_never_deadlock_postgres`
/// for the sequencer's one-statement burst, with claims in every send.
#[tokio::test]
async fn sequencer_bursts_of_two_gateways_never_deadlock_postgres() {
    let db = pg_db().await;
    let store = Store::connect(&db).await.expect("store");
    let rooms: Vec<RoomId> = (0..40)
        .map(|i| RoomId::parse(&format!("chat.sq{i}")).expect("room"))
        .collect();
    let run = |store: Store, rooms: Vec<RoomId>, user: &'static str| {
        tokio::spawn(async move {
            for round in 0..150 {
                let ids: Vec<(String, String)> = rooms
                    .iter()
                    .map(|r| (format!("{round}"), format!("{user}-{r}-{round}")))
                    .collect();
                let sends: Vec<SeqSend<'_>> = rooms
                    .iter()
                    .zip(&ids)
                    .map(|(room, (cid, id))| SeqSend {
                        room,
                        claim: Some((user, cid.as_str(), id.as_str())),
                    })
                    .collect();
                let out = store.sequence(&sends, &[]).await?;
                assert!(out.takes.iter().all(|t| *t));
            }
            Ok::<_, chat_relay::store::StoreError>(())
        })
    };
    let a = run(store.clone(), rooms.clone(), "a");
    let b = run(store.clone(), rooms.iter().rev().cloned().collect(), "b");
    a.await.expect("task").expect("burst a");
    b.await.expect("task").expect("burst b");
    let head = store
        .room_head(&rooms[0])
        .await
        .expect("head")
        .expect("some");
    assert_eq!(head.seq, 300);
}

/// Sequential and index scans of `send_dedupe` so far, as far as the
/// backends have reported them.
async fn dedupe_scans(conn: &mut sqlx::PgConnection) -> (i64, i64) {
    sqlx::query_as(
        "SELECT coalesce(seq_scan, 0), coalesce(idx_scan, 0) \
         FROM pg_stat_user_tables WHERE relname = 'send_dedupe'",
    )
    .fetch_one(conn)
    .await
    .expect("stats")
}

/// Scans of `send_dedupe` once at least `at_least` are reported and the
/// counts stopped moving: each backend flushes its counters about a second
/// after it goes idle. Gives up waiting after 30 s.
async fn reported_scans(conn: &mut sqlx::PgConnection, at_least: i64) -> (i64, i64) {
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(30);
    let mut last = dedupe_scans(conn).await;
    loop {
        tokio::time::sleep(std::time::Duration::from_millis(1500)).await;
        let now = dedupe_scans(conn).await;
        let done = now == last && now.0 + now.1 >= at_least;
        if done || std::time::Instant::now() > deadline {
            return now;
        }
        last = now;
    }
}

/// The sequencer's statements (settles, and the burst with confirmations
/// riding along) stay index lookups once `send_dedupe` is large, however
/// many times they ran while it was small. A plan made on a small table
/// scans the whole table on every call (measured: most of the database's
/// CPU at 1,000 msg/s); PostgreSQL's default makes such a generic plan after
/// five calls and keeps it. The sequencer's connection plans its statements
/// once, generically, with hash and merge joins and sequential scans off
/// (`Store::connect`). Checked by removing those three settings: this test
/// then counts a sequential scan per statement.
#[tokio::test]
async fn settles_never_scan_send_dedupe_postgres() {
    use sqlx::Connection;
    let db = pg_db().await;
    let store = Store::connect(&db).await.expect("store");
    let room = RoomId::parse("chat.plan").expect("room");
    // Bursts of 50 keys while the table is empty: a hash join over a scan
    // of the (empty) table is their cheapest plan.
    const WARM: i64 = 40;
    for i in 0..WARM {
        let k: Vec<SendKey> = (0..50)
            .map(|j| key(&room, &format!("warm{i}.{j}")))
            .collect();
        store.settle_sends(&k, &k).await.expect("settle");
        let id = format!("warm-id{i}");
        let sends = [SeqSend {
            room: &room,
            claim: Some(("u", "warm", id.as_str())),
        }];
        store.sequence(&sends, &k).await.expect("sequence");
    }
    let mut conn = sqlx::PgConnection::connect(&db).await.expect("connect");
    sqlx::query(
        "INSERT INTO send_dedupe (room, user_name, cid, id, state, created_at) \
         SELECT 'chat.plan', 'u', 'c' || g, 'id' || g, 'pending', 0 \
         FROM generate_series(1, 50000) g",
    )
    .execute(&mut conn)
    .await
    .expect("fill");
    // At least the warm-up's two settle statements and its burst's update.
    let (seq0, idx0) = reported_scans(&mut conn, 3 * WARM).await;
    const CALLS: i64 = 30;
    for i in 0..CALLS {
        let k = [key(&room, &format!("c{}", i * 7 + 1))];
        store.settle_sends(&k, &[]).await.expect("settle");
        let (cid, id) = (format!("new{i}"), format!("new-id{i}"));
        let sends = [SeqSend {
            room: &room,
            claim: Some(("u", cid.as_str(), id.as_str())),
        }];
        let rode = [key(&room, &format!("c{}", i * 7 + 2))];
        store.sequence(&sends, &rode).await.expect("sequence");
    }
    let (seq, idx) = reported_scans(&mut conn, seq0 + idx0 + 2 * CALLS).await;
    let (seq, idx) = (seq - seq0, idx - idx0);
    assert!(
        idx >= 2 * CALLS,
        "lookups not counted: {seq} seq, {idx} idx"
    );
    assert_eq!(seq, 0, "sequential scans of send_dedupe by the sequencer");
}

/// A TCP proxy in front of PostgreSQL that counts the `Sync` messages clients
/// send: one per round trip (a statement ends with one; so does sqlx's
/// ping). Startup messages carry no type byte; everything after them does.
async fn sync_counting_proxy(
    upstream: String,
) -> (
    std::net::SocketAddr,
    std::sync::Arc<std::sync::atomic::AtomicU64>,
) {
    use std::sync::atomic::{AtomicU64, Ordering};
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0")
        .await
        .expect("bind");
    let addr = listener.local_addr().expect("addr");
    let syncs = std::sync::Arc::new(AtomicU64::new(0));
    let counter = syncs.clone();
    tokio::spawn(async move {
        while let Ok((client, _)) = listener.accept().await {
            let server = tokio::net::TcpStream::connect(&upstream)
                .await
                .expect("PostgreSQL behind the proxy");
            let (mut cr, mut cw) = client.into_split();
            let (mut sr, mut sw) = server.into_split();
            tokio::spawn(async move {
                let _ = tokio::io::copy(&mut sr, &mut cw).await;
            });
            let syncs = counter.clone();
            tokio::spawn(async move {
                let mut started = false;
                loop {
                    let (kind, len) = if started {
                        let Ok(kind) = cr.read_u8().await else { return };
                        let Ok(len) = cr.read_u32().await else { return };
                        (Some(kind), len)
                    } else {
                        let Ok(len) = cr.read_u32().await else { return };
                        (None, len)
                    };
                    let mut body = vec![0u8; len.saturating_sub(4) as usize];
                    if cr.read_exact(&mut body).await.is_err() {
                        return;
                    }
                    match kind {
                        Some(b'S') => {
                            syncs.fetch_add(1, Ordering::SeqCst);
                        }
                        // The startup message (protocol 3.0) ends the
                        // untyped part; SSL or GSS requests come before it.
                        None => started = body.starts_with(&[0, 3, 0, 0]),
                        Some(_) => {}
                    }
                    let mut frame = Vec::with_capacity(len as usize + 1);
                    frame.extend(kind);
                    frame.extend(len.to_be_bytes());
                    frame.extend(body);
                    if sw.write_all(&frame).await.is_err() {
                        return;
                    }
                }
            });
        }
    });
    (addr, syncs)
}

/// A store on a fresh PostgreSQL database (dropped with the returned
/// guard), connected through a proxy that counts the round trips (`Sync`
/// messages) at the wire.
async fn store_via_counting_proxy() -> (
    Store,
    std::sync::Arc<std::sync::atomic::AtomicU64>,
    common::app::PgDb,
) {
    let db = pg_db().await;
    // postgres://[user@]host[:port]/db[?…]: the same URL, via the proxy.
    let (scheme, rest) = db.split_once("://").expect("db url");
    let (user, rest) = rest.rsplit_once('@').map_or(("", rest), |(u, r)| (u, r));
    let (upstream, path) = rest.split_once('/').expect("db url");
    let upstream = if upstream.contains(':') {
        upstream.to_string()
    } else {
        format!("{upstream}:5432")
    };
    let (addr, syncs) = sync_counting_proxy(upstream).await;
    let at = if user.is_empty() { "" } else { "@" };
    let sep = if path.contains('?') { '&' } else { '?' };
    let via = format!("{scheme}://{user}{at}{addr}/{path}{sep}sslmode=disable");
    (Store::connect(&via).await.expect("store"), syncs, db)
}

/// Each sequencer burst is ONE round trip to PostgreSQL: the statement. sqlx
/// pings every connection handed back to a pool (a second round trip per
/// burst, on the path of every send); the sequencer holds its connection
/// instead (`store::Keyed`). Counted at the wire, through a proxy.
#[tokio::test]
async fn a_sequencer_burst_is_one_round_trip_postgres() {
    use std::sync::atomic::Ordering;
    let (store, syncs, _db) = store_via_counting_proxy().await;
    let room = RoomId::parse("chat.trips").expect("room");
    // The first burst prepares the statement (one more round trip).
    let first = store
        .sequence(
            &[SeqSend {
                room: &room,
                claim: Some(("u", "c0", "id0")),
            }],
            &[],
        )
        .await
        .expect("sequence");
    assert!(first.takes[0]);
    tokio::time::sleep(std::time::Duration::from_millis(300)).await;
    let before = syncs.load(Ordering::SeqCst);
    const BURSTS: u64 = 40;
    for i in 1..=BURSTS {
        let (cid, id) = (format!("c{i}"), format!("id{i}"));
        let prev = format!("c{}", i - 1);
        let out = store
            .sequence(
                &[SeqSend {
                    room: &room,
                    claim: Some(("u", &cid, &id)),
                }],
                &[key(&room, &prev)],
            )
            .await
            .expect("sequence");
        assert_eq!(out.heads[room.as_str()].seq, i as i64 + 1);
    }
    // A ping on release would run in a task of its own, after the call.
    tokio::time::sleep(std::time::Duration::from_millis(300)).await;
    let trips = syncs.load(Ordering::SeqCst) - before;
    assert_eq!(
        trips, BURSTS,
        "{BURSTS} bursts made {trips} round trips to PostgreSQL"
    );
    store.close().await;
}

/// Each db-writer batch is ONE round trip too: the writer holds its
/// connection (`store::Keyed`) instead of handing it back to the pool, whose
/// release ping was a second round trip per batch.
#[tokio::test]
async fn a_persist_batch_is_one_round_trip_postgres() {
    use std::sync::atomic::Ordering;
    let (store, syncs, _db) = store_via_counting_proxy().await;
    let msg = |i: u32| chat_relay::protocol::ChatMessage {
        room: RoomId::parse("chat.rows").expect("room"),
        id: format!("01ROW{i:08}"),
        user: "u".into(),
        text: "t".into(),
        ts: 1,
        kind: chat_relay::protocol::MessageKind::Chat,
        seq: Some(i as i64),
    };
    // The first batch prepares the statement (one more round trip).
    assert_eq!(store.insert_messages(&[msg(0)]).await.expect("insert"), 1);
    tokio::time::sleep(std::time::Duration::from_millis(300)).await;
    let before = syncs.load(Ordering::SeqCst);
    const BATCHES: u32 = 40;
    for i in 1..=BATCHES {
        let rows = [msg(2 * i - 1), msg(2 * i)];
        assert_eq!(store.insert_messages(&rows).await.expect("insert"), 2);
    }
    // A ping on release would run in a task of its own, after the call.
    tokio::time::sleep(std::time::Duration::from_millis(300)).await;
    let trips = syncs.load(Ordering::SeqCst) - before;
    assert_eq!(
        trips, BATCHES as u64,
        "{BATCHES} batches made {trips} round trips to PostgreSQL"
    );
    store.close().await;
}
