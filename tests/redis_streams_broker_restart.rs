//! A private `redis-server` with an AOF (`appendfsync always`: every XADD is
//! on disk before Redis answers) SIGKILLed and restarted under a running
//! relay: `/readyz` goes 503, sends meanwhile are answered
//! `bus_unavailable`, and afterwards the producer, the live reader and the
//! `db-writer` group recover by themselves — live delivery resumes and every
//! acked message is stored once.
mod common;

use std::time::Duration;

use chat_relay::bus::BusKind;
use chat_relay::bus::redis_streams::{shard_of, stream_key};
use chat_relay::config::Role;
use chat_relay::protocol::RoomId;
use common::app::*;
use common::redis_streams::{admin, config, prefix, redis_at};

#[tokio::test]
async fn redis_killed_and_restarted_under_the_relay() {
    let dir = tempfile::tempdir().expect("tempdir");
    let dir_s = dir.path().to_string_lossy().into_owned();
    let mut server = common::redis_server::RedisServer::start_with(&[
        "--dir",
        &dir_s,
        "--save",
        "",
        "--appendonly",
        "yes",
        "--appendfsync",
        "always",
    ])
    .await;
    let db = pg_db().await;
    let mut cfg = test_config(&db);
    cfg.bus.bus = BusKind::RedisStreams;
    cfg.bus.redis = redis_at(&server.url());
    let streams = config(&prefix("rr"));
    cfg.bus.redis_streams = streams.clone();
    cfg.limits.publish_timeout_ms = 3000;
    cfg.roles = vec![Role::Gateway, Role::Persist];
    let app = spawn_app(cfg).await;
    let room = "chat.streamsrestart";
    let mut c = app.client("rosa").await;
    c.join(room, None).await;
    say_acked_and_delivered(&mut c, room, "before").await;

    server.kill().await;
    sends_refused_while_down(&app, &mut c, room, Duration::from_secs(15)).await;
    server.restart().await;
    // The AOF kept the stream: the entry acked before the kill is still there.
    let key = stream_key(
        &streams.redis_streams_prefix,
        shard_of(
            &RoomId::parse(room).expect("room"),
            streams.redis_streams_shards,
        ),
    );
    let entries: Vec<(String, Vec<(String, String)>)> =
        admin(&server.url(), &["XRANGE", &key, "-", "+"]).await;
    assert!(
        entries
            .iter()
            .any(|(_, f)| f.iter().any(|(_, v)| v.contains("\"before\""))),
        "the stream survived the SIGKILL: {entries:?}"
    );
    let (got, acked) = delivery_resumes(
        &app,
        &mut c,
        room,
        "after",
        Duration::from_secs(30),
        Duration::from_secs(30),
    )
    .await;
    assert_eq!(got["user"], "rosa");
    stored_once(&app.store, room, "before", &acked).await;
    app.stop().await;
}
