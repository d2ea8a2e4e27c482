use std::{fmt, time::Duration};

use async_trait::async_trait;
use bytes::Bytes;
use redis::{aio::ConnectionManager, cluster_async::ClusterConnection, Script};

use self::{
    connection::{evicts_keys_with_a_ttl, sets_and_gets, Connection},
    value::Found,
};
use super::{expiry_millis, BeginOutcome, Completion, DecodeError, LockToken, Store, StoreError};
use crate::key::{Fingerprint, RecordKey};

mod connection;
mod scripts;
mod value;

/// A [`Store`] on Redis or Redis Cluster, shared by every replica that
/// connects to it.
///
/// Every record is one string key, and every operation one round trip on
/// it, so each is atomic and lives on one hash slot of a cluster. `begin`
/// is Redis's own `SET … NX PX … GET`: it takes a free key, or answers a
/// replay, for what a `GET` costs. The steps that must compare a lock token
/// before they write are server-side scripts (`EVALSHA`, falling back to
/// `EVAL` once per connection), as is taking over a fenced record whose
/// lease ran out. In-flight leases and completed-record TTLs are Redis key
/// expiries, so nothing needs sweeping. Keys are `{prefix}{hex digest}`;
/// the prefix defaults to `idempotency:`. Needs Redis 7.0 or newer (`SET`
/// with both `NX` and `GET`).
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
    prefix: String,
    scripts: Scripts,
    replica_acks: Option<(u32, Duration)>,
}

#[derive(Clone)]
struct Scripts {
    begin: Script,
    complete: Script,
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
            prefix: "idempotency:".to_owned(),
            scripts: Scripts {
                begin: Script::new(scripts::BEGIN),
                complete: Script::new(scripts::COMPLETE),
                release: Script::new(scripts::RELEASE),
                renew: Script::new(scripts::RENEW),
                fence: Script::new(scripts::FENCE),
            },
            replica_acks: None,
        }
    }

    /// Sets the prefix of every key this store writes.
    #[must_use]
    pub fn with_prefix(mut self, prefix: impl Into<String>) -> Self {
        self.prefix = prefix.into();
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
    /// and warns of one that may evict keys.
    async fn check_server(&self) -> Result<(), StoreError> {
        match self.connection.versions().await {
            Ok(versions) => {
                if let Some(old) = versions.iter().find(|v| !sets_and_gets(v)) {
                    return Err(StoreError::backend(format!(
                        "RedisStore needs Redis 7.0 or newer (SET with NX and GET); \
                         a server runs {old}"
                    )));
                }
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

    fn key(&self, key: &RecordKey) -> String {
        format!("{}{}", self.prefix, key.to_hex())
    }

    /// Waits for the replicas `with_replica_acks` asks for, if any, at
    /// most `within` (and between 1 ms and 1.5 s, inside the connection's
    /// 2 s response timeout: `WAIT` with 0 would block for ever).
    async fn replicated(&self, key: &str, within: Duration) -> Result<(), StoreError> {
        let Some((replicas, timeout)) = self.replica_acks else {
            return Ok(());
        };
        let timeout = timeout
            .min(within)
            .clamp(Duration::from_millis(1), Duration::from_millis(1500));
        let acked = self
            .connection
            .wait(key, replicas, timeout)
            .await
            .map_err(StoreError::backend)?;
        if acked < i64::from(replicas) {
            return Err(StoreError::NotDurable(format!(
                "{acked} of {replicas} Redis replicas acknowledged within {timeout:?}"
            )));
        }
        Ok(())
    }

    /// Whether `token` still holds `key` on the master that answers now. A
    /// `WAIT` that a retry sent to a new master, or over a new connection,
    /// counts no write of this one: the lock must be found where it is.
    async fn still_held(&self, name: &str, token: LockToken) -> Result<bool, StoreError> {
        let mut get = redis::cmd("GET");
        get.arg(name);
        let value: Option<Vec<u8>> = self
            .connection
            .query(&get)
            .await
            .map_err(StoreError::backend)?;
        Ok(value.is_some_and(|value| value::held_by(&value, token)))
    }

    /// The script half of `begin`, for a fenced record in flight.
    async fn take_over(
        &self,
        name: &str,
        lock: &[u8],
        token: LockToken,
        lease: Duration,
    ) -> Result<BeginOutcome, StoreError> {
        let mut invocation = self.scripts.begin.key(name);
        invocation.arg(lock).arg(expiry_millis(lease));
        let (state, response): (String, Vec<u8>) = self
            .connection
            .invoke(&invocation)
            .await
            .map_err(StoreError::backend)?;
        Ok(match state.as_str() {
            "acquired" => BeginOutcome::Acquired(token),
            "recover" => BeginOutcome::Recover(token),
            "mismatch" => BeginOutcome::Mismatch,
            "in_flight" => BeginOutcome::InFlight,
            "not_replayable" => BeginOutcome::NotReplayable,
            "completed" => BeginOutcome::Completed(Bytes::from(response)),
            // The script ran on the key: whatever it found there, it is
            // not a reason to fail open.
            _ => {
                return Err(StoreError::Decode(DecodeError(
                    "an unexpected answer from the Redis begin script",
                )))
            }
        })
    }

    async fn held(
        &self,
        script: &Script,
        key: &RecordKey,
        args: impl FnOnce(&mut redis::ScriptInvocation<'_>),
    ) -> Result<(), StoreError> {
        let mut invocation = script.key(self.key(key));
        args(&mut invocation);
        let done: i64 = self
            .connection
            .invoke(&invocation)
            .await
            .map_err(StoreError::backend)?;
        if done == 1 {
            Ok(())
        } else {
            Err(StoreError::LockLost)
        }
    }
}

#[async_trait]
impl Store for RedisStore {
    async fn begin(
        &self,
        key: &RecordKey,
        fingerprint: &Fingerprint,
        lease: Duration,
    ) -> Result<BeginOutcome, StoreError> {
        let token = LockToken::random();
        let name = self.key(key);
        let lock = value::lock(fingerprint, token);
        let mut set = redis::cmd("SET");
        set.arg(&name)
            .arg(&lock[..])
            .arg("NX")
            .arg("PX")
            .arg(expiry_millis(lease))
            .arg("GET");
        let found: Option<Vec<u8>> = self.connection.query(&set).await.map_err(|err| {
            // The key holds a value of another type: this store did not
            // write it, but it has seen the key.
            if err.code() == Some("WRONGTYPE") {
                StoreError::Decode(DecodeError("a Redis key that is not a string"))
            } else {
                StoreError::backend(err)
            }
        })?;
        let taken = match found
            .map(|v| value::found(v, fingerprint, token))
            .transpose()?
        {
            None | Some(Found::Ours { fenced: false }) => BeginOutcome::Acquired(token),
            Some(Found::Ours { fenced: true }) => BeginOutcome::Recover(token),
            Some(Found::Mismatch) => return Ok(BeginOutcome::Mismatch),
            Some(Found::InFlight) => return Ok(BeginOutcome::InFlight),
            Some(Found::NotReplayable) => return Ok(BeginOutcome::NotReplayable),
            Some(Found::Completed(response)) => return Ok(BeginOutcome::Completed(response)),
            Some(Found::Fenced) => match self.take_over(&name, &lock, token, lease).await? {
                taken @ (BeginOutcome::Acquired(_) | BeginOutcome::Recover(_)) => taken,
                answer => return Ok(answer),
            },
        };
        if self.replica_acks.is_some() {
            // Inside a third of the lease, which runs out while it waits.
            let acked = match self.replicated(&name, lease / 3).await {
                Ok(()) => self.still_held(&name, token).await,
                Err(err) => Err(err),
            };
            if !matches!(acked, Ok(true)) {
                // A lock the replicas may not have must not be run under.
                let _ = self.release(key, token).await;
                return Err(acked.err().unwrap_or_else(|| {
                    StoreError::NotDurable("the lock was lost before it was acknowledged".into())
                }));
            }
        }
        Ok(taken)
    }

    async fn complete(
        &self,
        key: &RecordKey,
        token: LockToken,
        outcome: Completion,
        ttl: Duration,
    ) -> Result<(), StoreError> {
        let (state, record) = match outcome {
            Completion::Response(record) => ("c", record),
            Completion::NotReplayable => ("n", Bytes::new()),
        };
        self.held(&self.scripts.complete, key, |script| {
            script
                .arg(&value::token_bytes(token)[..])
                .arg(state)
                .arg(&record[..])
                .arg(expiry_millis(ttl));
        })
        .await?;
        self.replicated(&self.key(key), ttl).await
    }

    async fn release(&self, key: &RecordKey, token: LockToken) -> Result<(), StoreError> {
        self.held(&self.scripts.release, key, |script| {
            script.arg(&value::token_bytes(token)[..]);
        })
        .await
    }

    async fn fence(
        &self,
        key: &RecordKey,
        token: LockToken,
        ttl: Duration,
    ) -> Result<(), StoreError> {
        let name = self.key(key);
        let mut invocation = self.scripts.fence.key(&name);
        invocation
            .arg(&value::token_bytes(token)[..])
            .arg(expiry_millis(ttl));
        let fenced: i64 = self
            .connection
            .invoke(&invocation)
            .await
            .map_err(StoreError::backend)?;
        match fenced {
            1 => self.replicated(&name, ttl).await,
            2 => Err(StoreError::EffectCommitted),
            _ => Err(StoreError::LockLost),
        }
    }

    async fn renew(
        &self,
        key: &RecordKey,
        token: LockToken,
        lease: Duration,
    ) -> Result<(), StoreError> {
        self.held(&self.scripts.renew, key, |script| {
            script
                .arg(&value::token_bytes(token)[..])
                .arg(expiry_millis(lease));
        })
        .await
    }
}
