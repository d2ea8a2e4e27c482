use std::{
    fmt,
    sync::{
        atomic::{AtomicBool, Ordering},
        Arc,
    },
    time::Duration,
};

use redis::{aio::ConnectionManager, cluster_async::ClusterConnection, Script};

use self::connection::{evicts_keys_with_a_ttl, Connection, ServerVersion};
use super::StoreError;

mod connection;
mod scripts;
mod steps;
mod value;

/// A [`Store`](super::Store) on Redis or Redis Cluster, shared by every
/// replica that connects to it.
///
/// Every record is one string key, and every operation one round trip
/// (two for a `begin` that finds a fenced record in flight, and for a
/// fenced `complete` on a server with `SET … IFEQ`), atomic and on one hash
/// slot of a cluster. `begin` is Redis's own `SET … NX PX … GET`:
/// it takes a free key, or answers a replay, for what a `GET` costs. The
/// other steps, which must compare a lock token before they write, are
/// server-side scripts (`EVALSHA`, loaded into a server that lacks them),
/// as is taking over a fenced record whose lease ran out, except where
/// `complete` can compare natively.
///
/// `complete` writes the record whole, with the fingerprint `begin` took
/// the key with. Where the server has `SET … IFEQ` (Valkey 8.1 and later,
/// Redis 8.4 and later), it is that one native command: the record
/// replaces the lock only if the lock is still this token's, unfenced, and
/// no script runs. [`connect`] and [`connect_cluster`] read every
/// master's version and send it only if all have it; a store on a
/// connection of your own sends it until a server refuses it (a syntax
/// error, which writes nothing). Elsewhere the store uses scripts, as it
/// does for a fenced lock, whose value carries its lease's end. On one
/// server, that script is pipelined after a native `SET` of the record to
/// a key of its own, and renames that key onto the record's once it has
/// checked the lock: the response never passes through Lua, which Redis
/// 7.0 would hash byte by byte. The staged key is the prefix, the record's key in braces,
/// `:staged:` and the lock token in hex (or, if the prefix has a hash tag
/// of its own, the record's key, `:staged:` and the token): it opens with
/// the prefix, for an ACL that limits the store's keys to it, and shares
/// the record's hash slot, for a proxy that shards by hash tag. It lives
/// one round trip, or, if its script never runs (a connection lost in
/// between), the record's TTL. On a cluster, the script is given the record
/// as an argument instead: a one-key script follows a slot being migrated
/// from one master to another, which a staged key could not.
///
/// In-flight leases and completed-record TTLs are Redis key expiries, so
/// nothing needs sweeping. Keys are `{prefix}{hex digest}`; the prefix
/// defaults to `idempotency:`. Needs Redis 7.0 or newer (`SET` with both
/// `NX` and `GET`), or Valkey.
///
/// ```no_run
/// # async fn run() -> Result<(), tower_idempotency::store::StoreError> {
/// use tower_idempotency::{store::RedisStore, IdempotencyLayer};
///
/// let store = RedisStore::connect("redis://127.0.0.1:6379").await?.with_prefix("payments:");
/// let layer = IdempotencyLayer::new(store);
/// # Ok(()) }
/// ```
///
/// # What Redis can lose
///
/// Redis may drop a lock or a record behind the store's back, and a
/// duplicate then runs while the first is still running:
///
/// - under a `maxmemory-policy` that evicts keys with a TTL (`volatile-*`,
///   `allkeys-*`; managed services often default to `volatile-lru`). Every
///   key of this store has a TTL. Run it with `noeviction`: [`connect`]
///   and [`connect_cluster`] read the policy of every master and log a
///   warning for any other.
/// - on a failover, since replication is asynchronous: a lock or a record
///   the old master acknowledged may not have reached the replica that
///   takes over. [`with_replica_acks`](Self::with_replica_acks) waits for
///   replicas to acknowledge each lock, fence and completion before the
///   handler runs or the response goes out, at the cost of one more round
///   trip each.
///
/// [`connect`]: Self::connect
/// [`connect_cluster`]: Self::connect_cluster
#[derive(Clone)]
pub struct RedisStore {
    connection: Connection,
    // Shared, as the scripts are, so that a clone per request costs
    // reference counts only.
    prefix: Arc<str>,
    scripts: Arc<Scripts>,
    replica_acks: Option<(u32, Duration)>,
    /// Whether the server may take `SET … IFEQ`: until it refuses one.
    compare_and_set: Arc<AtomicBool>,
}

struct Scripts {
    begin: Script,
    complete: Script,
    complete_staged: Script,
    release: Script,
    renew: Script,
    fence: Script,
}

impl fmt::Debug for RedisStore {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let kind = match self.connection {
            Connection::Single(_) => "server",
            Connection::Cluster(_) => "cluster",
        };
        f.debug_struct("RedisStore")
            .field("on", &kind)
            .field("prefix", &self.prefix)
            .field("replica_acks", &self.replica_acks)
            .finish_non_exhaustive()
    }
}

impl RedisStore {
    /// Connects to the Redis server at `url` with a reconnecting, multiplexed
    /// connection whose commands time out after 2 s (the layer then answers
    /// 503 instead of hanging), and warns if the server may evict keys.
    /// Fails on a server older than Redis 7.0.
    pub async fn connect(url: &str) -> Result<Self, StoreError> {
        let client = redis::Client::open(url).map_err(StoreError::backend)?;
        let config = redis::aio::ConnectionManagerConfig::new()
            .set_connection_timeout(Some(Duration::from_secs(2)))
            .set_response_timeout(Some(Duration::from_secs(2)))
            .set_number_of_retries(2);
        let connection = ConnectionManager::new_with_config(client, config)
            .await
            .map_err(StoreError::backend)?;
        let store = Self::new(connection);
        store.check_server().await?;
        Ok(store)
    }

    /// Connects to the Redis Cluster that `nodes` (`redis://host:port`
    /// URLs, any of its nodes) belong to, through redis-rs's cluster client,
    /// with the same timeouts as [`connect`](Self::connect), and warns if
    /// any master may evict keys. Fails if a master is older than Redis 7.0.
    ///
    /// ```no_run
    /// # async fn run() -> Result<(), tower_idempotency::store::StoreError> {
    /// use tower_idempotency::{store::RedisStore, IdempotencyLayer};
    ///
    /// let store = RedisStore::connect_cluster([
    ///     "redis://10.0.0.1:6379",
    ///     "redis://10.0.0.2:6379",
    ///     "redis://10.0.0.3:6379",
    /// ])
    /// .await?;
    /// let layer = IdempotencyLayer::new(store);
    /// # Ok(()) }
    /// ```
    pub async fn connect_cluster<I, S>(nodes: I) -> Result<Self, StoreError>
    where
        I: IntoIterator<Item = S>,
        S: AsRef<str>,
    {
        let nodes: Vec<String> = nodes.into_iter().map(|n| n.as_ref().to_owned()).collect();
        let client = redis::cluster::ClusterClientBuilder::new(nodes)
            .connection_timeout(Duration::from_secs(2))
            .response_timeout(Duration::from_secs(2))
            .retries(2)
            .build()
            .map_err(StoreError::backend)?;
        let connection = client
            .get_async_connection()
            .await
            .map_err(StoreError::backend)?;
        let store = Self::on_cluster(connection);
        store.check_server().await?;
        Ok(store)
    }

    /// A store on a connection you configured yourself. Unlike
    /// [`connect`](Self::connect) it checks nothing: the server must be
    /// Redis 7.0 or newer.
    pub fn new(connection: ConnectionManager) -> Self {
        Self::on(Connection::Single(connection))
    }

    /// A store on a cluster connection you configured yourself. Unlike
    /// [`connect_cluster`](Self::connect_cluster) it checks nothing: every
    /// master must be Redis 7.0 or newer.
    pub fn on_cluster(connection: ClusterConnection) -> Self {
        Self::on(Connection::Cluster(connection))
    }

    fn on(connection: Connection) -> Self {
        Self {
            connection,
            prefix: Arc::from("idempotency:"),
            scripts: Arc::new(Scripts {
                begin: Script::new(scripts::BEGIN),
                complete: Script::new(scripts::COMPLETE),
                complete_staged: Script::new(scripts::COMPLETE_STAGED),
                release: Script::new(scripts::RELEASE),
                renew: Script::new(scripts::RENEW),
                fence: Script::new(scripts::FENCE),
            }),
            replica_acks: None,
            compare_and_set: Arc::new(AtomicBool::new(true)),
        }
    }

    /// Sets the prefix of every key this store writes. A prefix with a hash
    /// tag (`{payments}:`) puts every record on the tag's one slot of a
    /// cluster; without one, records spread over the slots by their whole
    /// key.
    #[must_use]
    pub fn with_prefix(mut self, prefix: impl Into<String>) -> Self {
        self.prefix = Arc::from(prefix.into());
        self
    }

    /// Requires `replicas` replicas to acknowledge each lock, fence and
    /// completion (Redis `WAIT`) within `timeout`. A lock they did not
    /// acknowledge is released again and the request answered 503 before
    /// its handler runs, so a master that fails over right after cannot
    /// take the lock with it. Costs one round trip more per write, and
    /// holds the connection's other commands behind each `WAIT`.
    #[must_use]
    pub fn with_replica_acks(mut self, replicas: u32, timeout: Duration) -> Self {
        self.replica_acks = Some((replicas, timeout));
        self
    }

    /// Refuses a server older than 7.0, on which every `begin` would fail,
    /// warns of one that may evict keys, and sends `SET … IFEQ` only if
    /// every master has it (a store whose versions are unknown finds out
    /// from the first answer).
    async fn check_server(&self) -> Result<(), StoreError> {
        match self.connection.versions().await {
            Ok(versions) => {
                if let Some(old) = versions.iter().find(|v| !v.sets_and_gets()) {
                    return Err(StoreError::backend(format!(
                        "RedisStore needs Redis 7.0 or newer (SET with NX and GET); \
                         a server runs {}",
                        old.redis
                    )));
                }
                let native = versions.iter().all(ServerVersion::sets_if_equal);
                self.compare_and_set.store(native, Ordering::Relaxed);
            }
            Err(err) => tracing::warn!(
                error = %err,
                "could not read Redis's version; RedisStore needs 7.0 or newer"
            ),
        }
        match self.connection.eviction_policies().await {
            Ok(policies) => {
                for policy in policies.iter().filter(|p| evicts_keys_with_a_ttl(p)) {
                    tracing::warn!(
                        policy = %policy,
                        "Redis may evict idempotency locks and records (maxmemory-policy {policy}): \
                         a duplicate could then run twice; set maxmemory-policy noeviction"
                    );
                }
            }
            Err(err) => tracing::warn!(
                error = %err,
                "could not read Redis's maxmemory-policy; make sure it is noeviction"
            ),
        }
        Ok(())
    }
}
