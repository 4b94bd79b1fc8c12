//! Shared test support: the bus conformance suite, the app harness and the
//! multi-instance harness.
#![allow(dead_code)]
pub mod app;
pub mod conformance;
pub mod multi;
pub mod nats;
pub mod rabbit;
pub mod redis_server;
pub mod tansu_server;
