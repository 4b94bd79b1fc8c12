//! Shared test support: the bus conformance suite, the app harness and the
//! multi-instance harness.
#![allow(dead_code)]
pub mod app;
pub mod conformance;
pub mod multi;
pub mod nats;
pub mod rabbit;
pub mod redis_server;
pub mod redis_streams;
pub mod stomp;
pub mod tansu_server;

/// `fetch.wait.max.ms` for the Kafka tests. The product default (500 ms) is
/// right for Apache Kafka, which answers a fetch as soon as data arrives;
/// tansu, the broker the tests run against, holds every fetch for the whole
/// wait — a test-profile value, never a product default.
pub const TANSU_FETCH_WAIT_MS: u32 = 5;

/// A port nobody listens on right now, for a test's private broker (the
/// listener is dropped before the broker binds, so another process could
/// still take it first).
pub fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0")
        .and_then(|l| l.local_addr())
        .map(|a| a.port())
        .expect("free port")
}
