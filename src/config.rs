//! Configuration: every value comes from an environment variable and has a
//! matching command-line flag (clap). The README's configuration table lists them.

use std::net::SocketAddr;
use std::time::Duration;

use clap::Args;

use crate::bus::BusConfig;

/// Which roles a process runs.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, clap::ValueEnum)]
pub enum Role {
    /// WebSocket gateway plus its live-delivery consumer.
    Gateway,
    /// The `db-writer` consumer group.
    Persist,
    /// The `analytics` consumer group.
    Analytics,
}

/// Settings of `chat-relay serve`.
#[derive(Debug, Clone, Args)]
pub struct Config {
    /// Address the HTTP/WebSocket server listens on.
    #[arg(long, env = "BIND", default_value = "127.0.0.1:8080")]
    pub bind: SocketAddr,

    /// Roles this process runs (comma-separated).
    #[arg(
        long,
        env = "ROLES",
        value_enum,
        value_delimiter = ',',
        default_value = "gateway,persist,analytics"
    )]
    pub roles: Vec<Role>,

    /// This instance's id; names its live-delivery consumer group. Generated when unset.
    #[arg(long, env = "INSTANCE_ID")]
    pub instance_id: Option<String>,

    /// `sqlite://file.db` or `postgres://user@host/db`.
    #[arg(long, env = "DATABASE_URL", default_value = "sqlite://chat-relay.db")]
    pub database_url: String,

    /// Set TCP_NODELAY on client sockets: frames leave at once instead of
    /// waiting (Nagle) for the previous segment's ACK.
    #[arg(long, env = "TCP_NODELAY", default_value_t = true, action = clap::ArgAction::Set)]
    pub tcp_nodelay: bool,

    /// Tokio worker threads of this process; 0: Tokio's default (one per
    /// core, or `TOKIO_WORKER_THREADS`). Fewer threads mean fewer thread
    /// wake-ups per message (a message's tasks run on one thread instead of
    /// waking the others), at the price of capping the process at that many
    /// cores (README, "The floor").
    #[arg(long, env = "WORKER_THREADS", default_value_t = 0)]
    pub worker_threads: usize,

    /// Directory to serve at `/` instead of the browser client embedded in
    /// the binary (for working on the client without rebuilding).
    #[arg(long, env = "STATIC_DIR")]
    pub static_dir: Option<String>,

    #[command(flatten)]
    pub bus: BusConfig,

    #[command(flatten)]
    pub limits: Limits,

    #[command(flatten)]
    pub auth: crate::auth::AuthConfig,

    #[command(flatten)]
    pub stomp: StompConfig,

    #[command(flatten)]
    pub presence: PresenceConfig,

    #[command(flatten)]
    pub persist: PersistConfig,

    #[command(flatten)]
    pub analytics: AnalyticsConfig,
}

/// Per-connection limits.
#[derive(Debug, Clone, Args)]
pub struct Limits {
    /// Longest message text in bytes.
    #[arg(long, env = "MAX_TEXT_BYTES", default_value_t = 4096)]
    pub max_text_bytes: usize,
    /// Largest WebSocket frame/message a client may send, in bytes (close 1009 above).
    #[arg(long, env = "MAX_FRAME_BYTES", default_value_t = 65536)]
    pub max_frame_bytes: usize,
    /// Sustained sends per second per connection (token bucket refill rate).
    #[arg(long, env = "RATE_LIMIT_PER_SEC", default_value_t = 20)]
    pub rate_per_sec: u32,
    /// Token bucket size: sends allowed in a burst.
    #[arg(long, env = "RATE_LIMIT_BURST", default_value_t = 40)]
    pub rate_burst: u32,
    /// Frames queued for one client while its socket takes no more, before it counts as slow and is disconnected (close 1013).
    #[arg(long, env = "OUTBOUND_QUEUE", default_value_t = 1024)]
    pub outbound_queue: usize,
    /// Rooms one connection may join (error `too_many_rooms` above).
    #[arg(long, env = "MAX_ROOMS_PER_CONN", default_value_t = 32)]
    pub max_rooms_per_conn: usize,
    /// Open WebSocket connections per client IP (HTTP 429 above; 0 = no limit).
    /// Behind a reverse proxy every client shares the proxy's IP: raise it or set 0.
    #[arg(long, env = "MAX_CONNS_PER_IP", default_value_t = 256)]
    pub max_conns_per_ip: usize,
    /// Members of one room on this instance (error `room_full` above; 0 = no limit).
    #[arg(long, env = "MAX_MEMBERS_PER_ROOM", default_value_t = 10000)]
    pub max_members_per_room: usize,
    /// Messages sent on join/recovery at most; more than that after `since` means `recovered:false`.
    #[arg(long, env = "HISTORY_ON_JOIN", default_value_t = 100)]
    pub history_on_join: i64,
    /// How long a publish may take before the client gets `bus_unavailable` (ms).
    #[arg(long, env = "PUBLISH_TIMEOUT_MS", default_value_t = 5000)]
    pub publish_timeout_ms: u64,
    /// How long a join with a cursor waits for missed messages the db-writer
    /// has not stored yet before answering `recovered:false` (ms).
    #[arg(long, env = "RECOVERY_WAIT_MS", default_value_t = 5000)]
    pub recovery_wait_ms: u64,
    /// How long live messages whose room position came early wait for the
    /// positions before them (two gateways' messages can cross on the bus),
    /// counted again whenever some of them go out, before they go out anyway
    /// and the missing ones are caught up (ms; 0 = deliver in arrival order).
    #[arg(long, env = "LIVE_REORDER_WAIT_MS", default_value_t = 1000)]
    pub live_reorder_wait_ms: u64,
    /// How long a `send`'s `cid` is remembered per user and room: a retry
    /// within it gets the original `ack` instead of a second message (ms).
    #[arg(long, env = "SEND_DEDUPE_WINDOW_MS", default_value_t = 600_000)]
    pub send_dedupe_window_ms: u64,
}

impl Limits {
    pub fn publish_timeout(&self) -> Duration {
        Duration::from_millis(self.publish_timeout_ms)
    }
}

/// The STOMP 1.2 endpoint (the gateway role), beside `/ws`.
#[derive(Debug, Clone, Args)]
pub struct StompConfig {
    /// Path of the STOMP-over-WebSocket endpoint (subprotocols `v12.stomp`,
    /// `v11.stomp`); empty turns it off.
    #[arg(long, env = "STOMP_PATH", default_value = "/stomp")]
    pub stomp_path: String,
    /// Heart-beat the server offers to send, and wants to receive, in ms
    /// (the `heart-beat` header of `CONNECTED`: Spring's default 30000,30000).
    /// 0 turns heart-beating off on the server's side.
    #[arg(long, env = "STOMP_HEARTBEAT_MS", default_value_t = 30_000)]
    pub stomp_heartbeat_ms: u64,
    /// How long a new socket may take to send `CONNECT` before it is closed (ms).
    #[arg(long, env = "STOMP_CONNECT_TIMEOUT_MS", default_value_t = 10_000)]
    pub stomp_connect_timeout_ms: u64,
    /// Headers one STOMP frame may carry (an `ERROR` above).
    #[arg(long, env = "STOMP_MAX_HEADERS", default_value_t = 32)]
    pub stomp_max_headers: usize,
    /// Longest header line (or command line) in bytes (an `ERROR` above). The
    /// whole frame is bounded by `MAX_FRAME_BYTES`.
    #[arg(long, env = "STOMP_MAX_HEADER_BYTES", default_value_t = 1024)]
    pub stomp_max_header_bytes: usize,
}

/// Cluster presence (the gateway role): heartbeats of each instance and
/// their expiry, in the database every instance shares.
#[derive(Debug, Clone, Args)]
pub struct PresenceConfig {
    /// How often an instance heartbeats and checks the others (ms).
    #[arg(long, env = "PRESENCE_HEARTBEAT_MS", default_value_t = 3000)]
    pub presence_heartbeat_ms: u64,
    /// An instance not heard from for this long is dead: its members leave
    /// (ms). Members of a dead instance leave within TTL + one heartbeat.
    #[arg(long, env = "PRESENCE_TTL_MS", default_value_t = 10_000)]
    pub presence_ttl_ms: u64,
}

/// The `db-writer` role.
#[derive(Debug, Clone, Args)]
pub struct PersistConfig {
    /// Rows per transaction at most.
    #[arg(
        id = "persist_batch_size",
        long = "persist-batch-size",
        env = "PERSIST_BATCH_SIZE",
        default_value_t = 2000
    )]
    pub batch_size: usize,
    /// Longest a message waits for its batch to fill (ms).
    #[arg(
        id = "persist_batch_wait_ms",
        long = "persist-batch-wait-ms",
        env = "PERSIST_BATCH_WAIT_MS",
        default_value_t = 50
    )]
    pub batch_wait_ms: u64,
    /// Consumer group of the persistence role.
    #[arg(
        id = "persist_group",
        long = "persist-group",
        env = "PERSIST_GROUP",
        default_value = "db-writer"
    )]
    pub group: String,
}

/// The `analytics` role.
#[derive(Debug, Clone, Args)]
pub struct AnalyticsConfig {
    /// Messages per user per minute in one room above which the user is flagged as flooding.
    #[arg(long, env = "FLOOD_MAX_PER_MIN", default_value_t = 60)]
    pub flood_max_per_min: u32,
    /// How often aggregates are written to the DB (ms).
    #[arg(
        id = "analytics_flush_ms",
        long = "analytics-flush-ms",
        env = "ANALYTICS_FLUSH_MS",
        default_value_t = 1000
    )]
    pub flush_ms: u64,
    /// Consumer group of the analytics role.
    #[arg(
        id = "analytics_group",
        long = "analytics-group",
        env = "ANALYTICS_GROUP",
        default_value = "analytics"
    )]
    pub group: String,
    /// How long counted message ids are kept to make counting exactly-once
    /// (ms). A redelivery or replay of a message counted longer ago than this
    /// is counted again; the default matches `KAFKA_RETENTION_MS`, as far
    /// back as a replay can reach.
    #[arg(
        long,
        env = "ANALYTICS_DEDUPE_WINDOW_MS",
        default_value_t = 604_800_000
    )]
    pub dedupe_window_ms: u64,
    /// Publish a system message into the room when a user is flagged.
    #[arg(long, env = "FLOOD_WARNINGS", default_value_t = true, action = clap::ArgAction::Set)]
    pub flood_warnings: bool,
}

impl Config {
    /// Builds a config from defaults and environment only (tests use this and
    /// then override fields).
    pub fn from_env() -> Result<Config, clap::Error> {
        crate::settings::from_env()
    }

    pub fn has_role(&self, r: Role) -> bool {
        self.roles.contains(&r)
    }
}
