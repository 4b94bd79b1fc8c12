//! Redis Streams test hygiene: each test uses its own key prefix, and every
//! key under it is deleted when its [`Cleanup`] guard drops — at the end of
//! the test, also when it panics.

use std::sync::Arc;

use async_trait::async_trait;
use chat_relay::bus::redis::RedisConfig;
use chat_relay::bus::redis_streams::{RedisStreamsBus, RedisStreamsConfig};
use chat_relay::bus::{
    BusError, Capabilities, ConsumerLag, MessageBus, Outgoing, SubscribeOptions, Subscription,
};

/// The shared Redis (`REDIS_URL` or the relay's default), written once.
pub fn url() -> String {
    RedisConfig::default().redis_url
}

/// A fresh key prefix for one test.
pub fn prefix(tag: &str) -> String {
    format!("test-{}:", super::conformance::uniq(tag))
}

/// Settings for a test: its own prefix, a short claim idle time so
/// redelivery happens within the test's waits.
pub fn config(prefix: &str) -> RedisStreamsConfig {
    RedisStreamsConfig {
        redis_streams_prefix: prefix.to_string(),
        redis_streams_claim_idle_ms: 1000,
        redis_streams_block_ms: 500,
        ..Default::default()
    }
}

pub fn redis_at(url: &str) -> RedisConfig {
    RedisConfig {
        redis_url: url.to_string(),
        redis_reconnect_max_ms: 300,
        ..Default::default()
    }
}

/// Deletes every key of `url` starting with `prefix`.
pub struct Cleanup {
    url: String,
    prefix: String,
}

impl Cleanup {
    pub fn new(url: &str, prefix: &str) -> Cleanup {
        Cleanup {
            url: url.to_string(),
            prefix: prefix.to_string(),
        }
    }
}

impl Drop for Cleanup {
    fn drop(&mut self) {
        let (url, prefix) = (self.url.clone(), self.prefix.clone());
        // Drop may run inside the test's runtime: the blocking client on a
        // thread of its own.
        let done = std::thread::spawn(move || -> redis::RedisResult<usize> {
            let client = redis::Client::open(url.as_str())?;
            let mut conn = client.get_connection_with_timeout(std::time::Duration::from_secs(2))?;
            let keys: Vec<String> = redis::cmd("KEYS")
                .arg(format!("{prefix}*"))
                .query(&mut conn)?;
            if !keys.is_empty() {
                redis::cmd("DEL").arg(&keys).query::<i64>(&mut conn)?;
            }
            Ok(keys.len())
        })
        .join();
        if !matches!(done, Ok(Ok(_))) {
            eprintln!("Redis keys under {} were not all deleted", self.prefix);
        }
    }
}

/// A Redis Streams bus whose keys are deleted with it.
pub struct CleanBus {
    pub bus: Arc<RedisStreamsBus>,
    _cleanup: Cleanup,
}

impl CleanBus {
    /// A bus on the shared Redis with a fresh prefix.
    pub async fn fresh(tag: &str) -> CleanBus {
        let p = prefix(tag);
        CleanBus::connect(&url(), config(&p)).await
    }

    pub async fn connect(url: &str, cfg: RedisStreamsConfig) -> CleanBus {
        let cleanup = Cleanup::new(url, &cfg.redis_streams_prefix);
        let bus = RedisStreamsBus::connect(redis_at(url), cfg)
            .await
            .unwrap_or_else(|e| panic!("Redis at {url} is unreachable: {e}"));
        CleanBus {
            bus: Arc::new(bus),
            _cleanup: cleanup,
        }
    }
}

impl std::ops::Deref for CleanBus {
    type Target = RedisStreamsBus;
    fn deref(&self) -> &RedisStreamsBus {
        &self.bus
    }
}

#[async_trait]
impl MessageBus for CleanBus {
    fn backend(&self) -> &'static str {
        self.bus.backend()
    }
    fn capabilities(&self) -> Capabilities {
        self.bus.capabilities()
    }
    async fn publish(&self, msg: Outgoing) -> Result<(), BusError> {
        self.bus.publish(msg).await
    }
    async fn subscribe(&self, opts: SubscribeOptions) -> Result<Subscription, BusError> {
        self.bus.subscribe(opts).await
    }
    async fn ready(&self) -> Result<(), BusError> {
        self.bus.ready().await
    }
    async fn close(&self) {
        self.bus.close().await
    }
    fn consumer_lag(&self) -> Option<&dyn ConsumerLag> {
        self.bus.consumer_lag()
    }
}

/// One admin connection, kept: while `maxclients` refuses new connections
/// it still gets through.
pub struct Admin(redis::aio::MultiplexedConnection);

impl Admin {
    pub async fn connect(url: &str) -> Admin {
        let client = redis::Client::open(url).expect("url");
        Admin(
            client
                .get_multiplexed_async_connection()
                .await
                .expect("admin connection"),
        )
    }

    pub async fn cmd<T: redis::FromRedisValue>(&mut self, args: &[&str]) -> T {
        let mut c = redis::cmd(args[0]);
        for a in &args[1..] {
            c.arg(*a);
        }
        c.query_async(&mut self.0)
            .await
            .unwrap_or_else(|e| panic!("{args:?}: {e}"))
    }

    /// Refuses new connections (`maxclients 1`; existing ones stay) and
    /// kills the connection named `name` (`CLIENT SETNAME` of the bus's
    /// readers): that reader stays away until [`Admin::allow_connections`].
    pub async fn kill_and_lock_out(&mut self, name: &str) {
        let list: String = self.cmd(&["CLIENT", "LIST"]).await;
        let field = format!("name={name}");
        let id = list
            .lines()
            .find(|l| l.split_whitespace().any(|f| f == field))
            .and_then(|l| l.split_whitespace().find_map(|f| f.strip_prefix("id=")))
            .unwrap_or_else(|| panic!("no connection {name} in {list}"))
            .to_string();
        let _: () = self.cmd(&["CONFIG", "SET", "maxclients", "1"]).await;
        let killed: i64 = self.cmd(&["CLIENT", "KILL", "ID", &id]).await;
        assert_eq!(killed, 1, "killed {name}");
    }

    pub async fn allow_connections(&mut self) {
        let _: () = self.cmd(&["CONFIG", "SET", "maxclients", "10000"]).await;
    }
}

/// Runs one command on a fresh connection.
pub async fn admin<T: redis::FromRedisValue>(url: &str, args: &[&str]) -> T {
    Admin::connect(url).await.cmd(args).await
}
