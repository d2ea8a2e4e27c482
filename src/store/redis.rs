use std::{fmt, time::Duration};

use async_trait::async_trait;
use bytes::Bytes;
use redis::{aio::ConnectionManager, Script};

use super::{expiry_millis, BeginOutcome, Completion, LockToken, Store, StoreError};
use crate::key::{Fingerprint, RecordKey};

/// Each record is one hash: `f` fingerprint, `s` state (`i` in flight, `c`
/// completed, `n` not replayable), `t` lock token, `r` encoded response, and
/// for a fenced record `e` = `1` and `l` its lease's end (server time, ms).
/// The key's own expiry is the lease while in flight and unfenced, and the
/// TTL once fenced or completed: a fenced record outlives its lease, so the
/// next request recovers it instead of running again.
const BEGIN: &str = r"
local k = KEYS[1]
local rec = redis.call('HMGET', k, 's', 'f', 'e', 'l')
if not rec[1] then
  redis.call('HSET', k, 'f', ARGV[1], 's', 'i', 't', ARGV[2])
  redis.call('PEXPIRE', k, ARGV[3])
  return {'acquired', ''}
end
if rec[2] ~= ARGV[1] then return {'mismatch', ''} end
if rec[1] == 'i' then
  if rec[3] ~= '1' then return {'in_flight', ''} end
  local t = redis.call('TIME')
  local now = tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000)
  if tonumber(rec[4]) > now then return {'in_flight', ''} end
  redis.call('HSET', k, 't', ARGV[2], 'l', now + tonumber(ARGV[3]))
  if redis.call('PTTL', k) < tonumber(ARGV[3]) then redis.call('PEXPIRE', k, ARGV[3]) end
  return {'recover', ''}
end
if rec[1] == 'n' then return {'not_replayable', ''} end
return {'completed', redis.call('HGET', k, 'r')}
";

const COMPLETE: &str = r"
local k = KEYS[1]
local rec = redis.call('HMGET', k, 's', 't')
if rec[1] ~= 'i' or rec[2] ~= ARGV[1] then return 0 end
redis.call('HSET', k, 's', ARGV[2], 'r', ARGV[3])
redis.call('PEXPIRE', k, ARGV[4])
return 1
";

const RELEASE: &str = r"
local k = KEYS[1]
local rec = redis.call('HMGET', k, 's', 't', 'e')
if rec[1] ~= 'i' or rec[2] ~= ARGV[1] then return 0 end
if rec[3] == '1' then
  redis.call('HSET', k, 'l', 0)
else
  redis.call('DEL', k)
end
return 1
";

const RENEW: &str = r"
local k = KEYS[1]
local rec = redis.call('HMGET', k, 's', 't', 'e')
if rec[1] ~= 'i' or rec[2] ~= ARGV[1] then return 0 end
if rec[3] == '1' then
  local t = redis.call('TIME')
  local now = tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000)
  redis.call('HSET', k, 'l', now + tonumber(ARGV[2]))
  if redis.call('PTTL', k) < tonumber(ARGV[2]) then redis.call('PEXPIRE', k, ARGV[2]) end
else
  redis.call('PEXPIRE', k, ARGV[2])
end
return 1
";

/// `1` fenced, `0` lock lost, `2` fenced before.
const FENCE: &str = r"
local k = KEYS[1]
local rec = redis.call('HMGET', k, 's', 't', 'e')
if rec[1] ~= 'i' or rec[2] ~= ARGV[1] then return 0 end
if rec[3] == '1' then return 2 end
local t = redis.call('TIME')
local now = tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000)
local lease = redis.call('PTTL', k)
redis.call('HSET', k, 'e', '1', 'l', now + lease)
if lease < tonumber(ARGV[2]) then redis.call('PEXPIRE', k, ARGV[2]) end
return 1
";

/// A [`Store`] on Redis, shared by every replica that connects to it.
///
/// Every operation is one server-side script on one key (`EVALSHA`, falling
/// back to `EVAL` once per connection), so each is atomic, takes one round
/// trip, and works on Redis Cluster. In-flight leases and completed-record
/// TTLs are Redis key expiries, so nothing needs sweeping. Keys are
/// `{prefix}{hex digest}`; the prefix defaults to `idempotency:`.
///
/// ```no_run
/// # async fn run() -> Result<(), tower_idempotency::store::StoreError> {
/// use tower_idempotency::{store::RedisStore, IdempotencyLayer};
///
/// let store = RedisStore::connect("redis://127.0.0.1:6379").await?.with_prefix("payments:");
/// let layer = IdempotencyLayer::new(store);
/// # Ok(()) }
/// ```
#[derive(Clone)]
pub struct RedisStore {
    connection: ConnectionManager,
    prefix: String,
    scripts: Scripts,
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
        f.debug_struct("RedisStore")
            .field("prefix", &self.prefix)
            .finish_non_exhaustive()
    }
}

impl RedisStore {
    /// Connects to the Redis server at `url` with a reconnecting, multiplexed
    /// connection whose commands time out after 2 s (the layer then answers
    /// 503 instead of hanging).
    pub async fn connect(url: &str) -> Result<Self, StoreError> {
        let client = redis::Client::open(url).map_err(StoreError::backend)?;
        let config = redis::aio::ConnectionManagerConfig::new()
            .set_connection_timeout(Some(Duration::from_secs(2)))
            .set_response_timeout(Some(Duration::from_secs(2)))
            .set_number_of_retries(2);
        let connection = ConnectionManager::new_with_config(client, config)
            .await
            .map_err(StoreError::backend)?;
        Ok(Self::new(connection))
    }

    /// A store on a connection you configured yourself.
    pub fn new(connection: ConnectionManager) -> Self {
        Self {
            connection,
            prefix: "idempotency:".to_owned(),
            scripts: Scripts {
                begin: Script::new(BEGIN),
                complete: Script::new(COMPLETE),
                release: Script::new(RELEASE),
                renew: Script::new(RENEW),
                fence: Script::new(FENCE),
            },
        }
    }

    /// Sets the prefix of every key this store writes.
    #[must_use]
    pub fn with_prefix(mut self, prefix: impl Into<String>) -> Self {
        self.prefix = prefix.into();
        self
    }

    fn key(&self, key: &RecordKey) -> String {
        format!("{}{}", self.prefix, key.to_hex())
    }

    async fn held(
        &self,
        script: &Script,
        key: &RecordKey,
        args: impl FnOnce(&mut redis::ScriptInvocation<'_>),
    ) -> Result<(), StoreError> {
        let mut invocation = script.key(self.key(key));
        args(&mut invocation);
        let done: i64 = invocation
            .invoke_async(&mut self.connection.clone())
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
        let (state, response): (String, Vec<u8>) = self
            .scripts
            .begin
            .key(self.key(key))
            .arg(&fingerprint.as_bytes()[..])
            .arg(token.to_string())
            .arg(expiry_millis(lease))
            .invoke_async(&mut self.connection.clone())
            .await
            .map_err(StoreError::backend)?;
        Ok(match state.as_str() {
            "acquired" => BeginOutcome::Acquired(token),
            "recover" => BeginOutcome::Recover(token),
            "mismatch" => BeginOutcome::Mismatch,
            "in_flight" => BeginOutcome::InFlight,
            "not_replayable" => BeginOutcome::NotReplayable,
            "completed" => BeginOutcome::Completed(Bytes::from(response)),
            other => {
                return Err(StoreError::backend(format!(
                    "unexpected answer {other:?} from the begin script"
                )))
            }
        })
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
                .arg(token.to_string())
                .arg(state)
                .arg(&record[..])
                .arg(expiry_millis(ttl));
        })
        .await
    }

    async fn release(&self, key: &RecordKey, token: LockToken) -> Result<(), StoreError> {
        self.held(&self.scripts.release, key, |script| {
            script.arg(token.to_string());
        })
        .await
    }

    async fn fence(
        &self,
        key: &RecordKey,
        token: LockToken,
        ttl: Duration,
    ) -> Result<(), StoreError> {
        let fenced: i64 = self
            .scripts
            .fence
            .key(self.key(key))
            .arg(token.to_string())
            .arg(expiry_millis(ttl))
            .invoke_async(&mut self.connection.clone())
            .await
            .map_err(StoreError::backend)?;
        match fenced {
            1 => Ok(()),
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
            script.arg(token.to_string()).arg(expiry_millis(lease));
        })
        .await
    }
}
