//! The database: SQLite (default, a file next to the binary) or PostgreSQL,
//! chosen by the `DATABASE_URL` scheme. Migrations run at start-up.
//!
//! Every write is idempotent by message id: the persistence worker inserts with
//! `ON CONFLICT (id) DO NOTHING`, and the analytics worker records the ids it
//! counted in `analytics_seen` inside the same transaction as the counts, so a
//! redelivered (or replayed) message changes nothing the second time.
//!
//! The SQL is written once in PostgreSQL's dialect (`$1` placeholders,
//! `GREATEST`) and rewritten for SQLite (`?1`, `MAX`) by `Store::sql`.

use std::collections::{HashMap, HashSet};
use std::str::FromStr;
use std::sync::Arc;
use std::time::{Duration, Instant};

use serde::Serialize;
use sqlx::pool::PoolConnection;
use sqlx::postgres::{PgConnectOptions, PgPool};
use sqlx::sqlite::{SqliteConnectOptions, SqliteJournalMode, SqlitePool};
use sqlx::{Postgres, Sqlite};
use sqlx::{QueryBuilder, Row};

use crate::protocol::{ChatMessage, MessageKind, RoomId};

#[derive(Debug, thiserror::Error)]
pub enum StoreError {
    #[error("database error: {0}")]
    Db(#[from] sqlx::Error),
    #[error("migration failed: {0}")]
    Migrate(#[from] sqlx::migrate::MigrateError),
    #[error("unsupported DATABASE_URL (want sqlite:// or postgres://): {0}")]
    BadUrl(String),
    #[error("cannot lock {0} for migrations: {1}")]
    Lock(String, std::io::Error),
}

/// The database file of a SQLite URL (`None` for an in-memory database).
fn opts_filename(url: &str) -> Option<std::path::PathBuf> {
    let opts = SqliteConnectOptions::from_str(url).ok()?;
    let path = opts.get_filename();
    let s = path.to_string_lossy();
    (!s.is_empty() && s != ":memory:").then(|| path.to_path_buf())
}

/// An exclusive OS lock on `<db>.migrate-lock`, held until dropped (the
/// lock is released when the file is closed, also if the process dies).
async fn migration_lock(
    db: Option<std::path::PathBuf>,
) -> Result<Option<std::fs::File>, StoreError> {
    let Some(db) = db else { return Ok(None) };
    let mut name = db.into_os_string();
    name.push(".migrate-lock");
    let path = std::path::PathBuf::from(name);
    let shown = path.display().to_string();
    let locked = tokio::task::spawn_blocking(move || {
        let f = std::fs::OpenOptions::new()
            .create(true)
            .truncate(false)
            .write(true)
            .open(&path)?;
        f.lock()?;
        Ok::<_, std::io::Error>(f)
    })
    .await
    .map_err(|e| StoreError::Lock(shown.clone(), std::io::Error::other(e)))?
    .map_err(|e| StoreError::Lock(shown, e))?;
    Ok(Some(locked))
}

/// A connection pool to one of the two supported databases.
#[derive(Clone, Debug)]
pub enum Store {
    Sqlite(SqlitePool),
    Postgres {
        /// Every statement's pool.
        pool: PgPool,
        /// The sequencer's own connection for its key lookups (planned
        /// once, see [`Store::connect`]).
        sequencer: Keyed,
        /// The db-writer's connection (one of `pool`'s, held: [`Keyed`]).
        writer: Keyed,
    },
}

/// A connection held from one statement to the next instead of handed back
/// to its pool after each: the sequencer's (one of its own pool's) and the
/// db-writer's (one of the main pool's).
///
/// Why: sqlx 0.8 tests every connection handed back to a pool with a ping
/// (`PoolConnection::return_to_pool`: a `Sync` and the server's answer), so
/// each sequencer burst — one statement, on the path of every send — cost
/// two round trips to the database and woke its backend twice (`perf`: 5 %
/// of the relay's CPU in `return_to_pool`; BENCHMARKS.md), and so did each
/// of the db-writer's batches. Held, the
/// connection is pinged only as the pool pings on acquire: after
/// `PING_IDLE` without a statement. A call that fails or is cancelled
/// drops it back into the pool, whose release ping tells a broken
/// connection from a good one, and the next call takes one from the pool.
/// `tests/store_bounds.rs` counts the round trips.
#[derive(Clone)]
pub struct Keyed {
    pool: PgPool,
    held: Arc<tokio::sync::Mutex<Held>>,
}

/// The held connection and when its last statement ended.
type Held = Option<(PoolConnection<Postgres>, Instant)>;

impl std::fmt::Debug for Keyed {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Keyed").field("pool", &self.pool).finish()
    }
}

/// The held connection, lent to one call: [`KeyedConn::keep`] puts it back;
/// dropped without that, it goes back to the pool.
struct KeyedConn<'a> {
    slot: tokio::sync::MutexGuard<'a, Held>,
    conn: PoolConnection<Postgres>,
}

impl Keyed {
    fn new(pool: PgPool) -> Keyed {
        Keyed {
            pool,
            held: Arc::new(tokio::sync::Mutex::new(None)),
        }
    }

    /// Lends the held connection (pinged first when it sat idle for
    /// [`PING_IDLE`]), or one from the pool.
    async fn conn(&self) -> Result<KeyedConn<'_>, sqlx::Error> {
        use sqlx::Connection;
        let mut slot = self.held.lock().await;
        let held = match slot.take() {
            Some((mut c, used)) if used.elapsed() >= PING_IDLE => match c.ping().await {
                Ok(()) => Some(c),
                Err(e) => {
                    tracing::debug!(error = %e, "held connection: ping failed, replaced");
                    None
                }
            },
            held => held.map(|(c, _)| c),
        };
        let conn = match held {
            Some(c) => c,
            None => self.pool.acquire().await?,
        };
        Ok(KeyedConn { slot, conn })
    }

    /// Hands the held connection back, then closes the pool (which waits
    /// for every connection lent out).
    async fn close(&self) {
        drop(self.held.lock().await.take());
        self.pool.close().await;
    }
}

impl KeyedConn<'_> {
    /// The call succeeded: the connection stays held for the next one.
    fn keep(self) {
        let KeyedConn { mut slot, conn } = self;
        *slot = Some((conn, Instant::now()));
    }
}

/// Runs the same code against whichever pool this store has.
macro_rules! on_pool {
    ($self:expr, $pool:ident => $body:expr) => {
        match $self {
            Store::Sqlite($pool) => $body,
            Store::Postgres { pool: $pool, .. } => $body,
        }
    };
}

/// A pooled connection idle at least this long is pinged before it is handed
/// out (one round trip), so a connection the database dropped meanwhile is
/// replaced instead of failing a statement. sqlx's default pings on *every*
/// acquire: with one statement per sequencer burst that was a second round
/// trip per send and 12 % of the relay's CPU (`perf`, BENCHMARKS.md). A
/// connection in use within this window is as good as its last statement.
const PING_IDLE: Duration = Duration::from_secs(10);

/// The pools' `before_acquire`: pings a connection only when it sat idle for
/// [`PING_IDLE`] or longer.
fn ping_if_idle<C: sqlx::Connection>(
    conn: &mut C,
    meta: sqlx::pool::PoolConnectionMetadata,
) -> futures::future::BoxFuture<'_, Result<bool, sqlx::Error>> {
    Box::pin(async move {
        if meta.idle_for >= PING_IDLE {
            conn.ping().await?;
        }
        Ok(true)
    })
}

/// The options every pool shares: `max` connections, `acquire` timeout, and
/// a ping only after [`PING_IDLE`] ([`ping_if_idle`]) instead of sqlx's ping
/// before every statement.
fn pool_options<DB: sqlx::Database>(max: u32, acquire: Duration) -> sqlx::pool::PoolOptions<DB> {
    sqlx::pool::PoolOptions::new()
        .max_connections(max)
        .acquire_timeout(acquire)
        .test_before_acquire(false)
        .before_acquire(ping_if_idle::<DB::Connection>)
}

/// Rows per SQLite INSERT statement: 8 parameters per row stays far below
/// its bind-parameter limit (PostgreSQL takes a whole batch as arrays).
const ROWS_PER_STATEMENT: usize = 1000;

/// Aggregates of one room, as served by `/api/stats`.
#[derive(Debug, Clone, Serialize, PartialEq)]
pub struct RoomStats {
    pub room: String,
    pub messages: i64,
    /// Messages in the last 60 s (by message timestamp).
    pub per_min: i64,
    /// Distinct users who wrote in the last 5 minutes.
    pub active_users: i64,
    pub top_talkers: Vec<Talker>,
    /// Users flagged for flooding in the last 10 minutes.
    pub flagged: Vec<String>,
}

#[derive(Debug, Clone, Serialize, PartialEq, Eq)]
pub struct Talker {
    pub user: String,
    pub messages: i64,
}

/// How long a voided position is remembered: a client resuming across an
/// older one gets `recovered:false` (the position is then simply missing).
pub const VOID_RETENTION_MS: i64 = 24 * 3_600_000;

/// The last position handed out in a room, and the counter's epoch.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RoomHead {
    pub seq: i64,
    pub epoch: String,
}

/// A new `send` claim: `(room, user, cid)` for message `id`.
#[derive(Debug, Clone, Copy)]
pub struct NewClaim<'a> {
    pub room: &'a RoomId,
    pub user: &'a str,
    pub cid: &'a str,
    pub id: &'a str,
}

/// One send of a sequencer burst ([`Store::sequence`]): its room and, when
/// it carries a `cid`, its claim `(user, cid, message id)`.
#[derive(Debug, Clone, Copy)]
pub struct SeqSend<'a> {
    pub room: &'a RoomId,
    pub claim: Option<(&'a str, &'a str, &'a str)>,
}

/// What [`Store::sequence`] answers: per send whether it takes a position,
/// and the new head of each room (by name) that took positions.
#[derive(Debug, Default)]
pub struct Sequenced {
    pub takes: Vec<bool>,
    pub heads: HashMap<String, RoomHead>,
}

/// The key of a `send` claim.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SendKey {
    pub room: RoomId,
    pub user: String,
    pub cid: String,
}

/// An earlier `send` with the same `(room, user, cid)`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SendClaim {
    /// The message id it was published as.
    pub id: String,
    /// Its publish was confirmed (else it is still in flight).
    pub confirmed: bool,
    /// When it was claimed (unix ms).
    pub created_at: i64,
}

/// A user who crossed the flood threshold in this batch.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct FloodFlag {
    pub room: RoomId,
    pub user: String,
    pub rate: i64,
}

/// One analytics batch's counts: per room, per (room, user) and per (room,
/// user, second) — messages and the latest timestamp.
struct Tally<'a> {
    rooms: HashMap<&'a RoomId, (i64, i64)>,
    users: HashMap<(&'a RoomId, &'a str), (i64, i64)>,
    secs: HashMap<(&'a RoomId, &'a str, i64), i64>,
}

impl<'a> Tally<'a> {
    fn of(fresh: &[&'a ChatMessage]) -> Tally<'a> {
        let mut t = Tally {
            rooms: HashMap::new(),
            users: HashMap::new(),
            secs: HashMap::new(),
        };
        for m in fresh {
            let e = t.rooms.entry(&m.room).or_default();
            e.0 += 1;
            e.1 = e.1.max(m.ts);
            let e = t.users.entry((&m.room, m.user.as_str())).or_default();
            e.0 += 1;
            e.1 = e.1.max(m.ts);
            *t.secs
                .entry((&m.room, m.user.as_str(), m.ts.div_euclid(1000)))
                .or_default() += 1;
        }
        t
    }
}

/// [`Store::apply_analytics`] on PostgreSQL: the same transaction in a fixed
/// handful of statements, each taking the whole batch as arrays, instead of
/// one round trip per message and four per user (a batch of N messages from
/// U users in R rooms: N + R + 3U statements and more, now 5–6). Rows are
/// written in key order, so two analytics
/// consumers never lock the same rows in different orders. Like every
/// statement on PostgreSQL, they are planned with the batch's real keys at
/// each call (`plan_cache_mode`, see [`Store::connect`]).
async fn apply_analytics_pg(
    p: &PgPool,
    batch: &[ChatMessage],
    flood_max: i64,
) -> Result<Vec<FloodFlag>, StoreError> {
    let now = now_ms();
    let mut tx = p.begin().await?;
    let ids: Vec<&str> = batch.iter().map(|m| m.id.as_str()).collect();
    let new_ids: HashSet<String> = sqlx::query(
        "INSERT INTO analytics_seen (id, seen_at) SELECT id, $2 FROM UNNEST($1::text[]) AS u(id) \
         ON CONFLICT (id) DO NOTHING RETURNING id",
    )
    .bind(&ids)
    .bind(now)
    .fetch_all(&mut *tx)
    .await?
    .iter()
    .map(|r| r.try_get(0))
    .collect::<Result<_, _>>()?;
    // A message counts once: its id went in now, and only its first copy
    // in this batch.
    let mut once: HashSet<&str> = HashSet::new();
    let fresh: Vec<&ChatMessage> = batch
        .iter()
        .filter(|m| {
            m.kind == MessageKind::Chat && new_ids.contains(&m.id) && once.insert(m.id.as_str())
        })
        .collect();
    let Tally { rooms, users, secs } = Tally::of(&fresh);
    let mut rooms: Vec<_> = rooms.into_iter().collect();
    rooms.sort();
    let mut users: Vec<_> = users.into_iter().collect();
    users.sort();
    let mut secs: Vec<_> = secs.into_iter().collect();
    secs.sort();
    if !rooms.is_empty() {
        sqlx::query(
            "INSERT INTO room_totals (room, messages, last_ts) \
             SELECT * FROM UNNEST($1::text[], $2::bigint[], $3::bigint[]) \
             ON CONFLICT (room) DO UPDATE SET messages = room_totals.messages + excluded.messages, \
             last_ts = GREATEST(room_totals.last_ts, excluded.last_ts)",
        )
        .bind(rooms.iter().map(|(r, _)| r.as_str()).collect::<Vec<_>>())
        .bind(rooms.iter().map(|(_, (n, _))| *n).collect::<Vec<_>>())
        .bind(rooms.iter().map(|(_, (_, l))| *l).collect::<Vec<_>>())
        .execute(&mut *tx)
        .await?;
    }
    if users.is_empty() {
        tx.commit().await?;
        return Ok(Vec::new());
    }
    let u_room: Vec<&str> = users.iter().map(|((r, _), _)| r.as_str()).collect();
    let u_user: Vec<&str> = users.iter().map(|((_, u), _)| *u).collect();
    sqlx::query(
        "INSERT INTO user_totals (room, user_name, messages, last_ts) \
         SELECT * FROM UNNEST($1::text[], $2::text[], $3::bigint[], $4::bigint[]) \
         ON CONFLICT (room, user_name) DO UPDATE SET messages = user_totals.messages + excluded.messages, \
         last_ts = GREATEST(user_totals.last_ts, excluded.last_ts)",
    )
    .bind(&u_room)
    .bind(&u_user)
    .bind(users.iter().map(|(_, (n, _))| *n).collect::<Vec<_>>())
    .bind(users.iter().map(|(_, (_, l))| *l).collect::<Vec<_>>())
    .execute(&mut *tx)
    .await?;
    sqlx::query(
        "INSERT INTO activity (room, user_name, sec, messages) \
         SELECT * FROM UNNEST($1::text[], $2::text[], $3::bigint[], $4::bigint[]) \
         ON CONFLICT (room, user_name, sec) DO UPDATE SET messages = activity.messages + excluded.messages",
    )
    .bind(secs.iter().map(|((r, _, _), _)| r.as_str()).collect::<Vec<_>>())
    .bind(secs.iter().map(|((_, u, _), _)| *u).collect::<Vec<_>>())
    .bind(secs.iter().map(|((_, _, s), _)| *s).collect::<Vec<_>>())
    .bind(secs.iter().map(|(_, n)| *n).collect::<Vec<_>>())
    .execute(&mut *tx)
    .await?;
    // Each user's messages in the minute up to its latest one, and when it
    // was last flagged.
    let last_sec: Vec<i64> = users.iter().map(|(_, (_, l))| l.div_euclid(1000)).collect();
    let rows = sqlx::query(
        "SELECT u.i, \
           (SELECT CAST(COALESCE(SUM(a.messages), 0) AS BIGINT) FROM activity a \
             WHERE a.room = u.room AND a.user_name = u.user_name AND a.sec > u.last_sec - 60 AND a.sec <= u.last_sec), \
           (SELECT f.flagged_at FROM flood_flags f WHERE f.room = u.room AND f.user_name = u.user_name) \
         FROM UNNEST($1::text[], $2::text[], $3::bigint[]) WITH ORDINALITY AS u(room, user_name, last_sec, i)",
    )
    .bind(&u_room)
    .bind(&u_user)
    .bind(&last_sec)
    .fetch_all(&mut *tx)
    .await?;
    let mut flags = Vec::new();
    let mut flagged: Vec<(&str, &str, i64, i64)> = Vec::new();
    for r in &rows {
        let i: i64 = r.try_get(0)?;
        let rate: i64 = r.try_get(1)?;
        let prev: Option<i64> = r.try_get(2)?;
        let Some(((room, user), (_, last))) =
            usize::try_from(i - 1).ok().and_then(|i| users.get(i))
        else {
            continue;
        };
        // Flag once per minute at most, so one flood gives one warning.
        if rate > flood_max && prev.is_none_or(|at| at < last - 60_000) {
            flagged.push((room.as_str(), user, *last, rate));
            flags.push(FloodFlag {
                room: (*room).clone(),
                user: user.to_string(),
                rate,
            });
        }
    }
    if !flagged.is_empty() {
        sqlx::query(
            "INSERT INTO flood_flags (room, user_name, flagged_at, rate) \
             SELECT * FROM UNNEST($1::text[], $2::text[], $3::bigint[], $4::bigint[]) \
             ON CONFLICT (room, user_name) DO UPDATE SET flagged_at = excluded.flagged_at, rate = excluded.rate",
        )
        .bind(flagged.iter().map(|f| f.0).collect::<Vec<_>>())
        .bind(flagged.iter().map(|f| f.1).collect::<Vec<_>>())
        .bind(flagged.iter().map(|f| f.2).collect::<Vec<_>>())
        .bind(flagged.iter().map(|f| f.3).collect::<Vec<_>>())
        .execute(&mut *tx)
        .await?;
    }
    tx.commit().await?;
    Ok(flags)
}

fn now_ms() -> i64 {
    chrono::Utc::now().timestamp_millis()
}

impl Store {
    /// Connects and runs migrations.
    pub async fn connect(url: &str) -> Result<Store, StoreError> {
        let store = if url.starts_with("sqlite:") {
            let opts = SqliteConnectOptions::from_str(url)?
                .create_if_missing(true)
                .journal_mode(SqliteJournalMode::Wal)
                .synchronous(sqlx::sqlite::SqliteSynchronous::Normal)
                .busy_timeout(Duration::from_secs(10));
            // Two processes starting at once on a fresh file would race to
            // switch it to WAL ("database is locked") and to apply the same
            // migrations: hold an exclusive lock on a file beside the
            // database while opening and migrating it.
            let _lock = migration_lock(opts_filename(url)).await?;
            let pool = pool_options::<Sqlite>(4, Duration::from_secs(10))
                .connect_with(opts)
                .await?;
            sqlx::migrate!("./migrations/sqlite").run(&pool).await?;
            Store::Sqlite(pool)
        } else if url.starts_with("postgres:") || url.starts_with("postgresql:") {
            // Statements are prepared once per connection (sqlx's statement
            // cache: one round trip per call instead of two), but planned with
            // each call's values: PostgreSQL's default switches a prepared
            // statement to a generic plan after five calls, and a generic plan
            // made while a table is small keeps what is cheap on a small
            // table — for the settles, a hash join over a sequential scan of
            // the whole `send_dedupe` table at every call (measured: 7,084
            // scans reading 60 million rows in a 30 s run at 1,000 msg/s,
            // most of the database's CPU). The settles have since moved to the
            // sequencer's connection below; the statements left here (the
            // workers' batches, history, presence, the claim slow path) run
            // once per batch, join or retry, not once per send, so planning
            // them with their real keys costs little.
            let opts = PgConnectOptions::from_str(url)?;
            let pool = pool_options::<Postgres>(8, Duration::from_secs(5))
                .connect_with(
                    opts.clone()
                        .options([("plan_cache_mode", "force_custom_plan")]),
                )
                .await?;
            sqlx::migrate!("./migrations/postgres").run(&pool).await?;
            // The sequencer's statements run once per burst, on the hot path
            // of every send, and are nothing but lookups of unique keys
            // (`send_dedupe`, `room_seq`) for a list of keys. Planned at
            // each call, planning cost twice the execution (`pg_stat_statements`
            // over a 30 s run at 1,000 msg/s: 6.1 s planning, 2.7 s executing
            // the burst); planned once, the database's CPU in that run fell
            // from 49 % to 31–33 % of a core (BENCHMARKS.md). On their own
            // connection they are planned once, and the plan cannot
            // be the scan above: with hash and merge joins and sequential
            // scans off, the only join left is a nested loop over the keys
            // probing the primary key, which is right at any table size.
            // `tests/store_bounds.rs` counts the scans.
            let keyed = pool_options::<Postgres>(2, Duration::from_secs(5)).connect_lazy_with(
                opts.options([
                    ("plan_cache_mode", "force_generic_plan"),
                    ("enable_hashjoin", "off"),
                    ("enable_mergejoin", "off"),
                    ("enable_seqscan", "off"),
                ]),
            );
            Store::Postgres {
                pool: pool.clone(),
                sequencer: Keyed::new(keyed),
                writer: Keyed::new(pool),
            }
        } else {
            return Err(StoreError::BadUrl(url.to_string()));
        };
        Ok(store)
    }

    pub fn kind(&self) -> &'static str {
        match self {
            Store::Sqlite(_) => "sqlite",
            Store::Postgres { .. } => "postgres",
        }
    }

    /// Rewrites PostgreSQL-dialect SQL for SQLite.
    fn sql(&self, pg: &str) -> String {
        match self {
            Store::Postgres { .. } => pg.to_string(),
            Store::Sqlite(_) => pg.replace('$', "?").replace("GREATEST(", "MAX("),
        }
    }

    pub async fn ping(&self) -> Result<(), StoreError> {
        on_pool!(self, p => sqlx::query("SELECT 1").execute(p).await.map(|_| ()))?;
        Ok(())
    }

    pub async fn close(&self) {
        match self {
            Store::Sqlite(p) => p.close().await,
            Store::Postgres {
                pool: p,
                sequencer,
                writer,
            } => {
                sequencer.close().await;
                writer.close().await;
                p.close().await;
            }
        }
    }

    /// Inserts a batch in one transaction; returns how many rows were new
    /// (the rest were already stored: redeliveries or replays).
    pub async fn insert_messages(&self, batch: &[ChatMessage]) -> Result<u64, StoreError> {
        if batch.is_empty() {
            return Ok(0);
        }
        let stored_at = now_ms();
        let n = match self {
            // One autocommitted statement with array parameters whatever the
            // batch size: prepared once (multi-row VALUES needs a statement per
            // row count, chunks and BEGIN/COMMIT round trips). Same raw rows/s
            // here (PostgreSQL's index upkeep dominates), but the worker's lag
            // at 50,000 rows/s fell from ~2 s to ~0.1 s (BENCHMARKS.md).
            // On the db-writer's held connection: handed back to the pool
            // after each batch, sqlx pinged it (a second round trip per
            // batch; see [`Keyed`]).
            Store::Postgres { writer, .. } => {
                let mut conn = writer.conn().await?;
                let column = |f: fn(&ChatMessage) -> &str| batch.iter().map(f).collect::<Vec<_>>();
                let ts: Vec<i64> = batch.iter().map(|m| m.ts).collect();
                let seq: Vec<Option<i64>> = batch.iter().map(|m| m.seq).collect();
                let n = sqlx::query(
                    "INSERT INTO messages (id, room, user_name, text, ts, kind, seq, stored_at) \
                     SELECT id, room, user_name, text, ts, kind, seq, $8 FROM \
                     UNNEST($1::text[], $2::text[], $3::text[], $4::text[], $5::bigint[], $6::text[], $7::bigint[]) \
                     AS t(id, room, user_name, text, ts, kind, seq) \
                     ON CONFLICT (id) DO NOTHING",
                )
                .bind(column(|m| m.id.as_str()))
                .bind(column(|m| m.room.as_str()))
                .bind(column(|m| m.user.as_str()))
                .bind(column(|m| m.text.as_str()))
                .bind(ts)
                .bind(column(|m| m.kind.as_str()))
                .bind(seq)
                .bind(stored_at)
                .execute(&mut *conn.conn)
                .await?
                .rows_affected();
                conn.keep();
                n
            }
            Store::Sqlite(p) => {
                let mut tx = p.begin().await?;
                let mut inserted = 0;
                for chunk in batch.chunks(ROWS_PER_STATEMENT) {
                    let mut qb = QueryBuilder::new(
                        "INSERT INTO messages (id, room, user_name, text, ts, kind, seq, stored_at) ",
                    );
                    qb.push_values(chunk, |mut b, m| {
                        b.push_bind(m.id.as_str())
                            .push_bind(m.room.as_str())
                            .push_bind(m.user.as_str())
                            .push_bind(m.text.as_str())
                            .push_bind(m.ts)
                            .push_bind(m.kind.as_str())
                            .push_bind(m.seq)
                            .push_bind(stored_at);
                    });
                    qb.push(" ON CONFLICT (id) DO NOTHING");
                    inserted += qb.build().execute(&mut *tx).await?.rows_affected();
                }
                tx.commit().await?;
                inserted
            }
        };
        Ok(n)
    }

    /// Messages of `room` older than `before` (or the latest), oldest first.
    pub async fn history(
        &self,
        room: &RoomId,
        before: Option<&str>,
        limit: i64,
    ) -> Result<Vec<ChatMessage>, StoreError> {
        let sql = self.sql(
            "SELECT id, room, user_name, text, ts, kind, seq FROM messages \
             WHERE room = $1 AND id < $2 ORDER BY id DESC LIMIT $3",
        );
        // ULIDs are Crockford base32: every id sorts below "~".
        let before = before.unwrap_or("~");
        let mut rows = on_pool!(self, p => {
            let rows = sqlx::query(&sql)
                .bind(room.as_str())
                .bind(before)
                .bind(limit)
                .fetch_all(p)
                .await?;
            rows.iter().map(row_to_message).collect::<Result<Vec<_>, _>>()?
        });
        rows.reverse();
        Ok(rows)
    }

    /// Messages of `room` after `since`, oldest first, at most `limit`.
    pub async fn after(
        &self,
        room: &RoomId,
        since: &str,
        limit: i64,
    ) -> Result<Vec<ChatMessage>, StoreError> {
        let sql = self.sql(
            "SELECT id, room, user_name, text, ts, kind, seq FROM messages \
             WHERE room = $1 AND id > $2 ORDER BY id LIMIT $3",
        );
        let rows = on_pool!(self, p => {
            let rows = sqlx::query(&sql)
                .bind(room.as_str())
                .bind(since)
                .bind(limit)
                .fetch_all(p)
                .await?;
            rows.iter().map(row_to_message).collect::<Result<Vec<_>, _>>()?
        });
        Ok(rows)
    }

    /// Whether message `id` of `room` is stored.
    pub async fn has_message(&self, room: &RoomId, id: &str) -> Result<bool, StoreError> {
        let sql = self.sql("SELECT 1 FROM messages WHERE id = $1 AND room = $2");
        let found = on_pool!(self, p => sqlx::query(&sql)
            .bind(id)
            .bind(room.as_str())
            .fetch_optional(p)
            .await?
            .is_some());
        Ok(found)
    }

    /// Number of stored messages (all rooms, or one).
    pub async fn count_messages(&self, room: Option<&RoomId>) -> Result<i64, StoreError> {
        let (sql, bind) = match room {
            Some(r) => (
                self.sql("SELECT COUNT(*) FROM messages WHERE room = $1"),
                Some(r.as_str()),
            ),
            None => ("SELECT COUNT(*) FROM messages".to_string(), None),
        };
        let n: i64 = on_pool!(self, p => {
            let mut q = sqlx::query(&sql);
            if let Some(b) = bind {
                q = q.bind(b);
            }
            q.fetch_one(p).await?.try_get(0)?
        });
        Ok(n)
    }

    /// Counts a batch of messages into the analytics tables, exactly once per
    /// message id, in one transaction. Returns the users that crossed the
    /// flood threshold (`flood_max` messages in 60 s in one room) with this batch.
    pub async fn apply_analytics(
        &self,
        batch: &[ChatMessage],
        flood_max: i64,
    ) -> Result<Vec<FloodFlag>, StoreError> {
        if batch.is_empty() {
            return Ok(Vec::new());
        }
        if let Store::Postgres { pool: p, .. } = self {
            return apply_analytics_pg(p, batch, flood_max).await;
        }
        let seen_sql = self.sql(
            "INSERT INTO analytics_seen (id, seen_at) VALUES ($1, $2) ON CONFLICT (id) DO NOTHING",
        );
        let room_sql = self.sql(
            "INSERT INTO room_totals (room, messages, last_ts) VALUES ($1, $2, $3) \
             ON CONFLICT (room) DO UPDATE SET messages = room_totals.messages + excluded.messages, \
             last_ts = GREATEST(room_totals.last_ts, excluded.last_ts)",
        );
        let user_sql = self.sql(
            "INSERT INTO user_totals (room, user_name, messages, last_ts) VALUES ($1, $2, $3, $4) \
             ON CONFLICT (room, user_name) DO UPDATE SET messages = user_totals.messages + excluded.messages, \
             last_ts = GREATEST(user_totals.last_ts, excluded.last_ts)",
        );
        let act_sql = self.sql(
            "INSERT INTO activity (room, user_name, sec, messages) VALUES ($1, $2, $3, $4) \
             ON CONFLICT (room, user_name, sec) DO UPDATE SET messages = activity.messages + excluded.messages",
        );
        let rate_sql = self.sql(
            "SELECT CAST(COALESCE(SUM(messages), 0) AS BIGINT) FROM activity \
             WHERE room = $1 AND user_name = $2 AND sec > $3 AND sec <= $4",
        );
        let flagged_sql =
            self.sql("SELECT flagged_at FROM flood_flags WHERE room = $1 AND user_name = $2");
        let flag_sql = self.sql(
            "INSERT INTO flood_flags (room, user_name, flagged_at, rate) VALUES ($1, $2, $3, $4) \
             ON CONFLICT (room, user_name) DO UPDATE SET flagged_at = excluded.flagged_at, rate = excluded.rate",
        );
        let now = now_ms();
        let flags = on_pool!(self, p => {
            let mut tx = p.begin().await?;
            let mut fresh: Vec<&ChatMessage> = Vec::with_capacity(batch.len());
            for m in batch {
                let r = sqlx::query(&seen_sql).bind(m.id.as_str()).bind(now).execute(&mut *tx).await?;
                if r.rows_affected() == 1 && m.kind == MessageKind::Chat {
                    fresh.push(m);
                }
            }
            let Tally { rooms, users, secs } = Tally::of(&fresh);
            for (room, (n, last)) in &rooms {
                sqlx::query(&room_sql).bind(room.as_str()).bind(n).bind(last).execute(&mut *tx).await?;
            }
            for ((room, user), (n, last)) in &users {
                sqlx::query(&user_sql).bind(room.as_str()).bind(*user).bind(n).bind(last).execute(&mut *tx).await?;
            }
            for ((room, user, sec), n) in &secs {
                sqlx::query(&act_sql).bind(room.as_str()).bind(*user).bind(sec).bind(n).execute(&mut *tx).await?;
            }
            let mut flags = Vec::new();
            for ((room, user), (_, last)) in &users {
                let last_sec = last.div_euclid(1000);
                let rate: i64 = sqlx::query(&rate_sql)
                    .bind(room.as_str()).bind(*user).bind(last_sec - 60).bind(last_sec)
                    .fetch_one(&mut *tx).await?.try_get(0)?;
                if rate > flood_max {
                    let prev: Option<i64> = sqlx::query(&flagged_sql)
                        .bind(room.as_str()).bind(*user)
                        .fetch_optional(&mut *tx).await?
                        .map(|r| r.try_get(0)).transpose()?;
                    // Flag once per minute at most, so one flood gives one warning.
                    if prev.is_none_or(|at| at < last - 60_000) {
                        sqlx::query(&flag_sql).bind(room.as_str()).bind(*user).bind(*last).bind(rate)
                            .execute(&mut *tx).await?;
                        flags.push(FloodFlag { room: (*room).clone(), user: user.to_string(), rate });
                    }
                }
            }
            tx.commit().await?;
            flags
        });
        Ok(flags)
    }

    /// Deletes per-second activity older than 10 minutes (the windows only look back 5).
    pub async fn prune_activity(&self, seen_window_ms: i64) -> Result<u64, StoreError> {
        let sql = self.sql("DELETE FROM activity WHERE sec < $1");
        let seen_sql = self.sql("DELETE FROM analytics_seen WHERE seen_at < $1");
        let cutoff = now_ms() / 1000 - 600;
        let seen_cutoff = now_ms() - seen_window_ms;
        let n = on_pool!(self, p => {
            sqlx::query(&sql).bind(cutoff).execute(p).await?.rows_affected()
                + sqlx::query(&seen_sql).bind(seen_cutoff).execute(p).await?.rows_affected()
        });
        Ok(n)
    }

    /// Per-room aggregates for `/api/stats`, busiest rooms first, as of `now` (unix ms).
    pub async fn stats(&self, now: i64, max_rooms: i64) -> Result<Vec<RoomStats>, StoreError> {
        let rooms_sql = self
            .sql("SELECT room, messages FROM room_totals ORDER BY messages DESC, room LIMIT $1");
        let per_min_sql = self
            .sql("SELECT CAST(COALESCE(SUM(messages), 0) AS BIGINT) FROM activity WHERE room = $1 AND sec > $2");
        let active_sql =
            self.sql("SELECT COUNT(DISTINCT user_name) FROM activity WHERE room = $1 AND sec > $2");
        let top_sql = self.sql(
            "SELECT user_name, messages FROM user_totals WHERE room = $1 \
             ORDER BY messages DESC, user_name LIMIT 5",
        );
        let flagged_sql = self.sql(
            "SELECT user_name FROM flood_flags WHERE room = $1 AND flagged_at > $2 ORDER BY user_name",
        );
        let now_sec = now.div_euclid(1000);
        let out = on_pool!(self, p => {
            let rooms = sqlx::query(&rooms_sql).bind(max_rooms).fetch_all(p).await?;
            let mut out = Vec::with_capacity(rooms.len());
            for r in rooms {
                let room: String = r.try_get(0)?;
                let messages: i64 = r.try_get(1)?;
                let per_min: i64 = sqlx::query(&per_min_sql).bind(&room).bind(now_sec - 60)
                    .fetch_one(p).await?.try_get(0)?;
                let active_users: i64 = sqlx::query(&active_sql).bind(&room).bind(now_sec - 300)
                    .fetch_one(p).await?.try_get(0)?;
                let top_talkers = sqlx::query(&top_sql).bind(&room).fetch_all(p).await?
                    .iter()
                    .map(|r| Ok(Talker { user: r.try_get(0)?, messages: r.try_get(1)? }))
                    .collect::<Result<Vec<_>, sqlx::Error>>()?;
                let flagged = sqlx::query(&flagged_sql).bind(&room).bind(now - 600_000)
                    .fetch_all(p).await?
                    .iter()
                    .map(|r| r.try_get(0))
                    .collect::<Result<Vec<String>, sqlx::Error>>()?;
                out.push(RoomStats { room, messages, per_min, active_users, top_talkers, flagged });
            }
            out
        });
        Ok(out)
    }

    /// Empties the message table (used by tests and before a full Kafka replay).
    pub async fn truncate_messages(&self) -> Result<(), StoreError> {
        on_pool!(self, p => sqlx::query("DELETE FROM messages").execute(p).await.map(|_| ()))?;
        Ok(())
    }

    /// Hands out the next position of `room` (its cursor), creating the
    /// counter with a fresh epoch on first use.
    pub async fn next_seq(&self, room: &RoomId) -> Result<RoomHead, StoreError> {
        let mut heads = self.take_seqs(&[(room.clone(), 1)]).await?;
        heads
            .pop()
            .ok_or_else(|| StoreError::Db(sqlx::Error::RowNotFound))
    }

    /// Takes `n` positions of each listed room (rooms distinct) in one
    /// transaction — one commit for a whole batch of sends — and returns each
    /// room's new head: the room got positions `head - n + 1 ..= head`.
    pub async fn take_seqs(&self, rooms: &[(RoomId, i64)]) -> Result<Vec<RoomHead>, StoreError> {
        if rooms.is_empty() {
            return Ok(Vec::new());
        }
        let epoch = || ulid::Ulid::new().to_string().to_lowercase();
        match self {
            Store::Postgres { pool: p, .. } => {
                // Rows are locked in the order given: in room order, so two
                // gateways' batches over the same rooms queue behind each
                // other instead of deadlocking (PostgreSQL would hold both
                // for `deadlock_timeout`, 1 s, then fail one).
                let mut sorted: Vec<&(RoomId, i64)> = rooms.iter().collect();
                sorted.sort_by(|a, b| a.0.cmp(&b.0));
                let names: Vec<&str> = sorted.iter().map(|(r, _)| r.as_str()).collect();
                let counts: Vec<i64> = sorted.iter().map(|(_, n)| *n).collect();
                let epochs: Vec<String> = sorted.iter().map(|_| epoch()).collect();
                let rows = sqlx::query(
                    "INSERT INTO room_seq (room, seq, epoch) \
                     SELECT * FROM UNNEST($1::text[], $2::bigint[], $3::text[]) \
                     ON CONFLICT (room) DO UPDATE SET seq = room_seq.seq + excluded.seq \
                     RETURNING room, seq, epoch",
                )
                .bind(names)
                .bind(counts)
                .bind(epochs)
                .fetch_all(p)
                .await?;
                let mut by_room: HashMap<String, RoomHead> = HashMap::with_capacity(rows.len());
                for r in &rows {
                    by_room.insert(
                        r.try_get("room")?,
                        RoomHead {
                            seq: r.try_get("seq")?,
                            epoch: r.try_get("epoch")?,
                        },
                    );
                }
                rooms
                    .iter()
                    .map(|(room, _)| {
                        by_room
                            .remove(room.as_str())
                            .ok_or(StoreError::Db(sqlx::Error::RowNotFound))
                    })
                    .collect()
            }
            Store::Sqlite(p) => {
                let mut tx = p.begin().await?;
                let mut heads = Vec::with_capacity(rooms.len());
                for (room, n) in rooms {
                    let r = sqlx::query(
                        "INSERT INTO room_seq (room, seq, epoch) VALUES (?1, ?2, ?3) \
                         ON CONFLICT (room) DO UPDATE SET seq = room_seq.seq + excluded.seq \
                         RETURNING seq, epoch",
                    )
                    .bind(room.as_str())
                    .bind(n)
                    .bind(epoch())
                    .fetch_one(&mut *tx)
                    .await?;
                    heads.push(RoomHead {
                        seq: r.try_get(0)?,
                        epoch: r.try_get(1)?,
                    });
                }
                tx.commit().await?;
                Ok(heads)
            }
        }
    }

    /// The last position handed out in `room` (`None`: no message yet).
    pub async fn room_head(&self, room: &RoomId) -> Result<Option<RoomHead>, StoreError> {
        let sql = self.sql("SELECT seq, epoch FROM room_seq WHERE room = $1");
        let head = on_pool!(self, p => {
            match sqlx::query(&sql).bind(room.as_str()).fetch_optional(p).await? {
                Some(r) => Some(RoomHead { seq: r.try_get(0)?, epoch: r.try_get(1)? }),
                None => None,
            }
        });
        Ok(head)
    }

    /// Records that position `seq` of `room` will never carry a message (its
    /// publish failed), so recovery does not wait for it.
    pub async fn void_seq(&self, room: &RoomId, seq: i64) -> Result<(), StoreError> {
        let sql = self.sql(
            "INSERT INTO room_seq_void (room, seq, voided_at) VALUES ($1, $2, $3) \
             ON CONFLICT (room, seq) DO NOTHING",
        );
        on_pool!(self, p => sqlx::query(&sql)
            .bind(room.as_str())
            .bind(seq)
            .bind(now_ms())
            .execute(p)
            .await
            .map(|_| ()))?;
        Ok(())
    }

    /// Stored messages of `room` with `after < seq <= upto`, in room order,
    /// and the voided positions in that range.
    pub async fn seq_range(
        &self,
        room: &RoomId,
        after: i64,
        upto: i64,
    ) -> Result<(Vec<ChatMessage>, Vec<i64>), StoreError> {
        let msg_sql = self.sql(
            "SELECT id, room, user_name, text, ts, kind, seq FROM messages \
             WHERE room = $1 AND seq > $2 AND seq <= $3 ORDER BY seq",
        );
        let void_sql =
            self.sql("SELECT seq FROM room_seq_void WHERE room = $1 AND seq > $2 AND seq <= $3");
        let out = on_pool!(self, p => {
            let rows = sqlx::query(&msg_sql)
                .bind(room.as_str())
                .bind(after)
                .bind(upto)
                .fetch_all(p)
                .await?;
            let msgs = rows.iter().map(row_to_message).collect::<Result<Vec<_>, _>>()?;
            let voids = sqlx::query(&void_sql)
                .bind(room.as_str())
                .bind(after)
                .bind(upto)
                .fetch_all(p)
                .await?
                .iter()
                .map(|r| r.try_get::<i64, _>(0))
                .collect::<Result<Vec<_>, _>>()?;
            (msgs, voids)
        });
        Ok(out)
    }

    /// The position of stored message `id` in `room`.
    pub async fn seq_of(&self, room: &RoomId, id: &str) -> Result<Option<i64>, StoreError> {
        let sql = self.sql("SELECT seq FROM messages WHERE id = $1 AND room = $2");
        let seq = on_pool!(self, p => {
            match sqlx::query(&sql).bind(id).bind(room.as_str()).fetch_optional(p).await? {
                Some(r) => r.try_get::<Option<i64>, _>(0)?,
                None => None,
            }
        });
        Ok(seq)
    }

    /// Claims `(room, user, cid)` for a new message `id`. Returns `None` when
    /// the claim is new (publish it), or the earlier claim: its id and whether
    /// that publish was confirmed.
    pub async fn claim_send(
        &self,
        room: &RoomId,
        user: &str,
        cid: &str,
        id: &str,
    ) -> Result<Option<SendClaim>, StoreError> {
        let insert = self.sql(
            "INSERT INTO send_dedupe (room, user_name, cid, id, state, created_at) \
             VALUES ($1, $2, $3, $4, 'pending', $5) ON CONFLICT (room, user_name, cid) DO NOTHING",
        );
        let select = self.sql(
            "SELECT id, state, created_at FROM send_dedupe WHERE room = $1 AND user_name = $2 AND cid = $3",
        );
        let claim = on_pool!(self, p => {
            let new = sqlx::query(&insert)
                .bind(room.as_str())
                .bind(user)
                .bind(cid)
                .bind(id)
                .bind(now_ms())
                .execute(p)
                .await?
                .rows_affected()
                == 1;
            if new {
                None
            } else {
                match sqlx::query(&select)
                    .bind(room.as_str())
                    .bind(user)
                    .bind(cid)
                    .fetch_optional(p)
                    .await?
                {
                    Some(r) => Some(SendClaim {
                        id: r.try_get(0)?,
                        confirmed: r.try_get::<String, _>(1)? == "acked",
                        created_at: r.try_get(2)?,
                    }),
                    // Pruned between the two statements: treat as taken.
                    None => Some(SendClaim { id: id.to_string(), confirmed: false, created_at: now_ms() }),
                }
            }
        });
        Ok(claim)
    }

    /// Claims many `(room, user, cid)` at once for new message ids, in one
    /// statement (PostgreSQL) or one transaction (SQLite) — the sequencer's
    /// burst, so a send's dedupe claim costs no round trip of its own.
    /// Returns, per claim, whether it is new (`false`: an earlier send holds
    /// it; [`Store::claim_send`] tells which). Within one call a key claimed
    /// twice is new for one of them only.
    pub async fn claim_sends(&self, claims: &[NewClaim<'_>]) -> Result<Vec<bool>, StoreError> {
        if claims.is_empty() {
            return Ok(Vec::new());
        }
        let now = now_ms();
        // Message ids are unique: a claim is new when its id went in.
        let inserted: HashSet<String> = match self {
            Store::Postgres { pool: p, .. } => {
                let rooms: Vec<&str> = claims.iter().map(|c| c.room.as_str()).collect();
                let users: Vec<&str> = claims.iter().map(|c| c.user).collect();
                let cids: Vec<&str> = claims.iter().map(|c| c.cid).collect();
                let ids: Vec<&str> = claims.iter().map(|c| c.id).collect();
                let rows = sqlx::query(
                    "INSERT INTO send_dedupe (room, user_name, cid, id, state, created_at) \
                     SELECT u.room, u.user_name, u.cid, u.id, 'pending', $5 \
                     FROM UNNEST($1::text[], $2::text[], $3::text[], $4::text[]) AS u(room, user_name, cid, id) \
                     ON CONFLICT (room, user_name, cid) DO NOTHING RETURNING id",
                )
                .bind(rooms)
                .bind(users)
                .bind(cids)
                .bind(ids)
                .bind(now)
                .fetch_all(p)
                .await?;
                rows.iter()
                    .map(|r| r.try_get::<String, _>(0))
                    .collect::<Result<_, _>>()?
            }
            Store::Sqlite(p) => {
                let mut tx = p.begin().await?;
                let mut set = HashSet::new();
                for c in claims {
                    let n = sqlx::query(
                        "INSERT INTO send_dedupe (room, user_name, cid, id, state, created_at) \
                         VALUES (?1, ?2, ?3, ?4, 'pending', ?5) ON CONFLICT (room, user_name, cid) DO NOTHING",
                    )
                    .bind(c.room.as_str())
                    .bind(c.user)
                    .bind(c.cid)
                    .bind(c.id)
                    .bind(now)
                    .execute(&mut *tx)
                    .await?
                    .rows_affected();
                    if n == 1 {
                        set.insert(c.id.to_string());
                    }
                }
                tx.commit().await?;
                set
            }
        };
        Ok(claims.iter().map(|c| inserted.contains(c.id)).collect())
    }

    /// A sequencer burst in one round trip: marks `acked` claims confirmed,
    /// claims every send that has a `cid`, and takes one position of its
    /// room for each send that got one (a send without a claim always does).
    /// On PostgreSQL this is one statement — one commit for the burst instead
    /// of one each for the settles, the claims and the positions, which under
    /// load was most of the relay's database CPU. On SQLite it is the three
    /// calls in turn.
    ///
    /// Returns, per send, whether it takes a position, and the head of every
    /// room that took positions: the room's `n` new sends got `head - n + 1
    /// ..= head`, in the order given. Room rows are locked in room order, so
    /// two gateways' bursts queue behind each other instead of deadlocking.
    /// Keys in `acked` must not be claimed again in the same call (the
    /// caller settles those first).
    pub async fn sequence(
        &self,
        sends: &[SeqSend<'_>],
        acked: &[SendKey],
    ) -> Result<Sequenced, StoreError> {
        if sends.is_empty() {
            if !acked.is_empty() {
                self.settle_sends(acked, &[]).await?;
            }
            return Ok(Sequenced::default());
        }
        let now = now_ms();
        let p = match self {
            Store::Postgres { sequencer, .. } => sequencer,
            Store::Sqlite(_) => {
                if !acked.is_empty() {
                    self.settle_sends(acked, &[]).await?;
                }
                let claims: Vec<NewClaim<'_>> = sends
                    .iter()
                    .filter_map(|s| {
                        s.claim.map(|(user, cid, id)| NewClaim {
                            room: s.room,
                            user,
                            cid,
                            id,
                        })
                    })
                    .collect();
                let mut fresh = self.claim_sends(&claims).await?.into_iter();
                let takes: Vec<bool> = sends
                    .iter()
                    .map(|s| s.claim.is_none() || fresh.next().unwrap_or(false))
                    .collect();
                let mut counts: Vec<(RoomId, i64)> = Vec::new();
                for (s, _) in sends.iter().zip(&takes).filter(|(_, t)| **t) {
                    match counts.iter_mut().find(|(r, _)| r == s.room) {
                        Some((_, n)) => *n += 1,
                        None => counts.push((s.room.clone(), 1)),
                    }
                }
                let heads = self.take_seqs(&counts).await?;
                return Ok(Sequenced {
                    takes,
                    heads: counts
                        .into_iter()
                        .map(|(r, _)| r.as_str().to_string())
                        .zip(heads)
                        .collect(),
                });
            }
        };
        let rooms: Vec<&str> = sends.iter().map(|s| s.room.as_str()).collect();
        let users: Vec<Option<&str>> = sends.iter().map(|s| s.claim.map(|c| c.0)).collect();
        let cids: Vec<Option<&str>> = sends.iter().map(|s| s.claim.map(|c| c.1)).collect();
        // Every send has an id (its message id); claimless sends are told
        // apart by their position in the arrays.
        let ids: Vec<String> = sends
            .iter()
            .enumerate()
            .map(|(i, s)| s.claim.map_or_else(|| format!("#{i}"), |c| c.2.to_string()))
            .collect();
        let epochs: Vec<String> = sends
            .iter()
            .map(|_| ulid::Ulid::new().to_string().to_lowercase())
            .collect();
        let a_room: Vec<&str> = acked.iter().map(|k| k.room.as_str()).collect();
        let a_user: Vec<&str> = acked.iter().map(|k| k.user.as_str()).collect();
        let a_cid: Vec<&str> = acked.iter().map(|k| k.cid.as_str()).collect();
        let mut conn = p.conn().await?;
        let rows = sqlx::query(
            "WITH acked AS ( \
               UPDATE send_dedupe d SET state = 'acked' \
               FROM UNNEST($7::text[], $8::text[], $9::text[]) AS u(room, user_name, cid) \
               WHERE d.room = u.room AND d.user_name = u.user_name AND d.cid = u.cid), \
             req AS ( \
               SELECT * FROM UNNEST($1::text[], $2::text[], $3::text[], $4::text[], $5::text[]) \
                 AS r(room, user_name, cid, id, epoch)), \
             claimed AS ( \
               INSERT INTO send_dedupe (room, user_name, cid, id, state, created_at) \
               SELECT room, user_name, cid, id, 'pending', $6 FROM req WHERE cid IS NOT NULL \
               ON CONFLICT (room, user_name, cid) DO NOTHING RETURNING id), \
             counts AS ( \
               SELECT room, count(*) AS n, min(epoch) AS epoch FROM req \
               WHERE cid IS NULL OR id IN (SELECT id FROM claimed) GROUP BY room), \
             heads AS ( \
               INSERT INTO room_seq (room, seq, epoch) \
               SELECT room, n, epoch FROM counts ORDER BY room \
               ON CONFLICT (room) DO UPDATE SET seq = room_seq.seq + excluded.seq \
               RETURNING room, seq, epoch) \
             SELECT false AS head, id AS key, 0::bigint AS seq, ''::text AS epoch FROM claimed \
             UNION ALL SELECT true, room, seq, epoch FROM heads",
        )
        .bind(&rooms)
        .bind(&users)
        .bind(&cids)
        .bind(&ids)
        .bind(&epochs)
        .bind(now)
        .bind(&a_room)
        .bind(&a_user)
        .bind(&a_cid)
        .fetch_all(&mut *conn.conn)
        .await?;
        conn.keep();
        let mut claimed: HashSet<String> = HashSet::new();
        let mut heads: HashMap<String, RoomHead> = HashMap::new();
        for r in &rows {
            let key: String = r.try_get(1)?;
            if r.try_get::<bool, _>(0)? {
                let head = RoomHead {
                    seq: r.try_get(2)?,
                    epoch: r.try_get(3)?,
                };
                heads.insert(key, head);
            } else {
                claimed.insert(key);
            }
        }
        let takes = sends
            .iter()
            .map(|s| s.claim.is_none_or(|c| claimed.contains(c.2)))
            .collect();
        Ok(Sequenced { takes, heads })
    }

    /// Settles many claims at once: `acked` are kept as confirmed (a retry
    /// gets the original id), `failed` deleted so a retry may publish.
    pub async fn settle_sends(
        &self,
        acked: &[SendKey],
        failed: &[SendKey],
    ) -> Result<(), StoreError> {
        match self {
            // The two statements join the keys against `send_dedupe`: on the
            // sequencer's connection that is always a primary-key probe per
            // key (see `Store::connect`).
            Store::Postgres {
                sequencer: keyed, ..
            } => {
                let mut conn = keyed.conn().await?;
                fn cols(keys: &[SendKey]) -> (Vec<&str>, Vec<&str>, Vec<&str>) {
                    let room: Vec<&str> = keys.iter().map(|k| k.room.as_str()).collect();
                    let user: Vec<&str> = keys.iter().map(|k| k.user.as_str()).collect();
                    let cid: Vec<&str> = keys.iter().map(|k| k.cid.as_str()).collect();
                    (room, user, cid)
                }
                if !acked.is_empty() {
                    let (room, user, cid) = cols(acked);
                    sqlx::query(
                        "UPDATE send_dedupe d SET state = 'acked' \
                         FROM UNNEST($1::text[], $2::text[], $3::text[]) AS u(room, user_name, cid) \
                         WHERE d.room = u.room AND d.user_name = u.user_name AND d.cid = u.cid",
                    )
                    .bind(room)
                    .bind(user)
                    .bind(cid)
                    .execute(&mut *conn.conn)
                    .await?;
                }
                if !failed.is_empty() {
                    let (room, user, cid) = cols(failed);
                    sqlx::query(
                        "DELETE FROM send_dedupe d \
                         USING UNNEST($1::text[], $2::text[], $3::text[]) AS u(room, user_name, cid) \
                         WHERE d.room = u.room AND d.user_name = u.user_name AND d.cid = u.cid",
                    )
                    .bind(room)
                    .bind(user)
                    .bind(cid)
                    .execute(&mut *conn.conn)
                    .await?;
                }
                conn.keep();
            }
            Store::Sqlite(p) => {
                let mut tx = p.begin().await?;
                for (keys, sql) in [
                    (
                        acked,
                        "UPDATE send_dedupe SET state = 'acked' WHERE room = ?1 AND user_name = ?2 AND cid = ?3",
                    ),
                    (
                        failed,
                        "DELETE FROM send_dedupe WHERE room = ?1 AND user_name = ?2 AND cid = ?3",
                    ),
                ] {
                    for k in keys {
                        sqlx::query(sql)
                            .bind(k.room.as_str())
                            .bind(&k.user)
                            .bind(&k.cid)
                            .execute(&mut *tx)
                            .await?;
                    }
                }
                tx.commit().await?;
            }
        }
        Ok(())
    }

    /// Takes over a claim still pending as `old_id` (its gateway died before
    /// settling it) for `new_id`; `false` when someone else settled or took
    /// it first.
    pub async fn take_over_send(
        &self,
        room: &RoomId,
        user: &str,
        cid: &str,
        old_id: &str,
        new_id: &str,
    ) -> Result<bool, StoreError> {
        let sql = self.sql(
            "UPDATE send_dedupe SET id = $5, created_at = $6 \
             WHERE room = $1 AND user_name = $2 AND cid = $3 AND id = $4 AND state = 'pending'",
        );
        let n = on_pool!(self, p => sqlx::query(&sql)
            .bind(room.as_str())
            .bind(user)
            .bind(cid)
            .bind(old_id)
            .bind(new_id)
            .bind(now_ms())
            .execute(p)
            .await?
            .rows_affected());
        Ok(n == 1)
    }

    /// Drops `send` claims older than `dedupe_window_ms` and voided positions
    /// older than [`VOID_RETENTION_MS`]; returns the rows removed.
    pub async fn prune_sends(&self, dedupe_window_ms: i64) -> Result<u64, StoreError> {
        let dedupe = self.sql("DELETE FROM send_dedupe WHERE created_at < $1");
        let voids = self.sql("DELETE FROM room_seq_void WHERE voided_at < $1");
        let n = on_pool!(self, p => {
            sqlx::query(&dedupe).bind(now_ms() - dedupe_window_ms).execute(p).await?.rows_affected()
                + sqlx::query(&voids).bind(now_ms() - VOID_RETENTION_MS).execute(p).await?.rows_affected()
        });
        Ok(n)
    }

    /// Records `instance` as alive at `now_ms`. `true` when it had no row
    /// (first beat, or its rows were expired or lost): re-sync its members.
    pub async fn presence_beat(&self, instance: &str, now_ms: i64) -> Result<bool, StoreError> {
        let update = self.sql("UPDATE presence_instances SET last_seen = $2 WHERE instance = $1");
        let insert = self.sql(
            "INSERT INTO presence_instances (instance, last_seen) VALUES ($1, $2) \
             ON CONFLICT (instance) DO UPDATE SET last_seen = excluded.last_seen",
        );
        let missing = on_pool!(self, p => {
            let n = sqlx::query(&update).bind(instance).bind(now_ms).execute(p).await?.rows_affected();
            if n == 0 {
                sqlx::query(&insert).bind(instance).bind(now_ms).execute(p).await?;
            }
            n == 0
        });
        Ok(missing)
    }

    /// Replaces every member row of `instance` with `members` (room, user,
    /// connections), in one transaction.
    pub async fn presence_sync(
        &self,
        instance: &str,
        members: &[(RoomId, String, i64)],
    ) -> Result<(), StoreError> {
        let clear = self.sql("DELETE FROM presence_members WHERE instance = $1");
        let insert = self.sql(
            "INSERT INTO presence_members (instance, room, user_name, conns) VALUES ($1, $2, $3, $4)",
        );
        on_pool!(self, p => {
            let mut tx = p.begin().await?;
            sqlx::query(&clear).bind(instance).execute(&mut *tx).await?;
            for (room, user, conns) in members {
                sqlx::query(&insert)
                    .bind(instance)
                    .bind(room.as_str())
                    .bind(user)
                    .bind(*conns)
                    .execute(&mut *tx)
                    .await?;
            }
            tx.commit().await?;
        });
        Ok(())
    }

    /// One more (`delta = 1`) or one fewer (`-1`) connection of `user` in
    /// `room` on `instance`; the row goes at zero.
    pub async fn presence_change(
        &self,
        instance: &str,
        room: &RoomId,
        user: &str,
        delta: i64,
    ) -> Result<(), StoreError> {
        let upsert = self.sql(
            "INSERT INTO presence_members (instance, room, user_name, conns) VALUES ($1, $2, $3, $4) \
             ON CONFLICT (instance, room, user_name) DO UPDATE SET conns = presence_members.conns + excluded.conns",
        );
        let prune = self.sql(
            "DELETE FROM presence_members WHERE instance = $1 AND room = $2 AND user_name = $3 AND conns <= 0",
        );
        on_pool!(self, p => {
            sqlx::query(&upsert)
                .bind(instance)
                .bind(room.as_str())
                .bind(user)
                .bind(delta)
                .execute(p)
                .await?;
            sqlx::query(&prune).bind(instance).bind(room.as_str()).bind(user).execute(p).await?;
        });
        Ok(())
    }

    /// Members of `room` on instances alive since `alive_since_ms`:
    /// (instance, user) pairs.
    pub async fn presence_members(
        &self,
        room: &RoomId,
        alive_since_ms: i64,
    ) -> Result<Vec<(String, String)>, StoreError> {
        let sql = self.sql(
            "SELECT m.instance, m.user_name FROM presence_members m \
             JOIN presence_instances i ON i.instance = m.instance \
             WHERE m.room = $1 AND i.last_seen >= $2 AND m.conns > 0",
        );
        let rows = on_pool!(self, p => {
            sqlx::query(&sql)
                .bind(room.as_str())
                .bind(alive_since_ms)
                .fetch_all(p)
                .await?
                .iter()
                .map(|r| Ok((r.try_get(0)?, r.try_get(1)?)))
                .collect::<Result<Vec<(String, String)>, sqlx::Error>>()?
        });
        Ok(rows)
    }

    /// Members of every room of `rooms` on instances alive since
    /// `alive_since_ms`, in one query: (room, instance, user). The heartbeat
    /// reconciles all of a gateway's rooms with it — one query per room per
    /// heartbeat cost ~80 µs of relay CPU per room, every
    /// `PRESENCE_HEARTBEAT_MS`, traffic or not (`loadtest/idle.py`).
    pub async fn presence_members_in(
        &self,
        rooms: &[RoomId],
        alive_since_ms: i64,
    ) -> Result<Vec<(String, String, String)>, StoreError> {
        // The room list travels as one JSON array parameter: no bind limit,
        // one statement text whatever the number of rooms.
        let list = serde_json::to_string(&rooms.iter().map(RoomId::as_str).collect::<Vec<_>>())
            .map_err(|e| StoreError::Db(sqlx::Error::Protocol(e.to_string())))?;
        let within = match self {
            Store::Postgres { .. } => "SELECT json_array_elements_text($1::json)",
            Store::Sqlite(_) => "SELECT value FROM json_each($1)",
        };
        let sql = self.sql(&format!(
            "SELECT m.room, m.instance, m.user_name FROM presence_members m \
             JOIN presence_instances i ON i.instance = m.instance \
             WHERE m.room IN ({within}) AND i.last_seen >= $2 AND m.conns > 0"
        ));
        let rows = on_pool!(self, p => {
            sqlx::query(&sql)
                .bind(&list)
                .bind(alive_since_ms)
                .fetch_all(p)
                .await?
                .iter()
                .map(|r| Ok((r.try_get(0)?, r.try_get(1)?, r.try_get(2)?)))
                .collect::<Result<Vec<(String, String, String)>, sqlx::Error>>()?
        });
        Ok(rows)
    }

    /// Instances alive since `alive_since_ms`.
    pub async fn presence_alive(&self, alive_since_ms: i64) -> Result<Vec<String>, StoreError> {
        let sql = self.sql("SELECT instance FROM presence_instances WHERE last_seen >= $1");
        let rows = on_pool!(self, p => {
            sqlx::query(&sql)
                .bind(alive_since_ms)
                .fetch_all(p)
                .await?
                .iter()
                .map(|r| r.try_get::<String, _>(0))
                .collect::<Result<Vec<_>, _>>()?
        });
        Ok(rows)
    }

    /// Deletes the rows of instances not seen since `alive_since_ms` (any
    /// instance may do it; idempotent), or of one instance leaving.
    pub async fn presence_forget(
        &self,
        alive_since_ms: i64,
        leaving: Option<&str>,
    ) -> Result<u64, StoreError> {
        let members = self.sql(
            "DELETE FROM presence_members WHERE instance = $2 OR instance IN \
             (SELECT instance FROM presence_instances WHERE last_seen < $1)",
        );
        let instances =
            self.sql("DELETE FROM presence_instances WHERE last_seen < $1 OR instance = $2");
        let leaving = leaving.unwrap_or("");
        let n = on_pool!(self, p => {
            sqlx::query(&members).bind(alive_since_ms).bind(leaving).execute(p).await?.rows_affected()
                + sqlx::query(&instances).bind(alive_since_ms).bind(leaving).execute(p).await?.rows_affected()
        });
        Ok(n)
    }
}

fn row_to_message<R: Row>(r: &R) -> Result<ChatMessage, sqlx::Error>
where
    for<'a> &'a str: sqlx::ColumnIndex<R>,
    for<'a> String: sqlx::Decode<'a, R::Database> + sqlx::Type<R::Database>,
    for<'a> i64: sqlx::Decode<'a, R::Database> + sqlx::Type<R::Database>,
    for<'a> Option<i64>: sqlx::Decode<'a, R::Database> + sqlx::Type<R::Database>,
{
    let room: String = r.try_get("room")?;
    let kind: String = r.try_get("kind")?;
    Ok(ChatMessage {
        room: RoomId::parse(&room)
            .ok_or_else(|| sqlx::Error::Decode("bad room id in DB".into()))?,
        id: r.try_get("id")?,
        user: r.try_get("user_name")?,
        text: r.try_get("text")?,
        ts: r.try_get("ts")?,
        kind: MessageKind::parse(&kind),
        seq: r.try_get("seq")?,
    })
}
