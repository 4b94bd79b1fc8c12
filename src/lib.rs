//! chat-relay: a game chat server whose messages go through a pluggable bus.
//!
//! Layout, in the order a message travels:
//! * [`protocol`] — the wire protocol, in one place (room ids, client and server
//!   frames, bus events, the one vocabulary of error codes).
//! * [`http`] — routes and their state: `/ws` upgrade, history, `POST`, stats,
//!   health, metrics, the browser client.
//! * [`gateway`] — the gateway wing: a WebSocket connection ([`gateway::conn`])
//!   publishes through [`gateway::Gateway`]; this instance's live consumer
//!   ([`gateway::live`]) feeds the room registry ([`gateway::rooms`]), which
//!   fans out to the sockets; [`gateway::recovery`] fills a rejoining client's gap.
//! * [`bus`] — the narrow `MessageBus` trait, optional capabilities, one module
//!   per backend, and the one reconnect loop ([`bus::reconnect`]).
//! * [`workers`] — the shared consumer groups behind the bus: persistence, analytics.
//! * [`store`] — SQLite / PostgreSQL: messages, history, analytics aggregates.
//! * [`assets`] — the browser client, embedded in the binary.
//! * [`auth`] — JWT identities, room claims, browser origins, per-IP connection slots.
//! * [`config`], [`settings`] — every setting from env with clap flags, defaults written once.
//! * [`ids`] — message ids.
//! * [`replay`] — the `chat-relay replay` admin command (Kafka).
//! * [`app`] — `Application::build(config)` → bound port → `run_until_stopped()`.
//! * [`telemetry`] — logging set-up.
pub mod app;
pub mod assets;
pub mod auth;
pub mod bus;
pub mod config;
pub mod gateway;
pub mod http;
pub mod ids;
pub mod protocol;
pub mod replay;
pub mod settings;
pub mod store;
pub mod telemetry;
pub mod workers;
