//! chat-relay: a game chat server whose messages go through a pluggable bus.
//!
//! Layout:
//! * [`protocol`] — the wire protocol, in one place (room ids, client and server frames, error codes).
//! * [`auth`] — JWT identities, room claims, browser origins, per-IP connection slots.
//! * [`config`] — every setting, from env with clap flags.
//! * [`bus`] — the `MessageBus` trait and one module per backend (memory, redis, kafka, rabbitmq).
//! * [`gateway`] — WebSocket connections and the per-instance room registry.
//! * [`workers`] — consumer-group roles: live delivery, persistence, analytics.
//! * [`store`] — SQLite / PostgreSQL: messages, history, analytics aggregates.
//! * [`http`] — routes: `/ws`, history, stats, health, metrics, static client.
//! * [`app`] — `Application::build(config)` → bound port → `run_until_stopped()`.
//! * [`telemetry`] — logging set-up.
pub mod app;
pub mod auth;
pub mod bus;
pub mod config;
pub mod gateway;
pub mod http;
pub mod ids;
pub mod protocol;
pub mod store;
pub mod telemetry;
pub mod workers;
