//! The steps of a Redis store: the `Store` operations, one round trip
//! each in the common case, and what they share.

use std::{sync::atomic::Ordering, time::Duration};

use async_trait::async_trait;
use bytes::Bytes;
use redis::{aio::ConnectionManager, ErrorKind, RedisResult, Script, ServerErrorKind};

use super::{connection::Connection, value, value::Found, RedisStore};
use crate::{
    key::{Fingerprint, RecordKey},
    store::{expiry_millis, BeginOutcome, Completion, DecodeError, LockToken, Store, StoreError},
};

impl RedisStore {
    fn key(&self, key: &RecordKey) -> String {
        let mut name = String::with_capacity(self.prefix.len() + 2 * key.as_bytes().len());
        name.push_str(&self.prefix);
        crate::key::push_hex(&mut name, key.as_bytes());
        name
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
            .map_err(begin_failed)?;
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

    /// `complete` as one native command, `SET … IFEQ <lock> PX … GET`,
    /// where the server has it (Valkey 8.1, Redis 8.4): it writes the
    /// record only over this token's unfenced lock, and answers what it
    /// found, so no script runs. `None` when a script has to decide: the
    /// lock is fenced (its value carries the lease's end, which the store
    /// does not know), the key is gone, or the server refused the command.
    async fn complete_natively(
        &self,
        name: &str,
        record: &value::Record<'_>,
        ttl: Duration,
    ) -> Option<Result<(), StoreError>> {
        let lock = record.lock();
        let size = name.len() + record.head.len() + record.response.len() + lock.len() + 32;
        let mut set = redis::Cmd::with_capacity(8, size);
        set.arg("SET")
            .arg(name)
            .arg(record)
            .arg("IFEQ")
            .arg(&lock[..])
            .arg("PX")
            .arg(expiry_millis(ttl))
            .arg("GET");
        let found: Option<Vec<u8>> = match self.connection.query(&set).await {
            Ok(found) => found,
            // A refused `SET` never writes: the script decides instead. A
            // server without `IFEQ` calls it a syntax error, and is not
            // asked again.
            Err(err) if err.code().is_some() => {
                if err.detail().is_some_and(|d| d.starts_with("syntax error")) {
                    self.compare_and_set.store(false, Ordering::Relaxed);
                }
                return None;
            }
            Err(err) => return Some(Err(StoreError::backend(err))),
        };
        match found {
            Some(found) if found == lock || record.written_in(&found) => Some(Ok(())),
            // A server that answers nothing where the condition failed, as
            // one without the old value might, leaves it to the script too.
            None => None,
            Some(found) if record.held_in(&found) => None,
            Some(_) => Some(Err(StoreError::LockLost)),
        }
    }

    /// `complete` on one server with a script: the record staged with a
    /// native `SET`, then the script that moves it onto the record, in one
    /// round trip.
    async fn complete_staged(
        &self,
        connection: &mut ConnectionManager,
        name: &str,
        token: LockToken,
        record: &value::Record<'_>,
        ttl: Duration,
    ) -> Result<(), StoreError> {
        let staged = value::staged_name(&self.prefix, name, token);
        let mut invocation = self.scripts.complete_staged.key(name);
        invocation
            .key(&staged)
            .arg(&value::token_bytes(token)[..])
            .arg(&record.head[..1]);
        let mut stage_and_complete = redis::pipe();
        stage_and_complete
            .ignore_errors()
            .cmd("SET")
            .arg(&staged)
            .arg(record)
            .arg("PX")
            .arg(expiry_millis(ttl))
            .invoke_script(&invocation);
        let (staged_answer, completed): (RedisResult<()>, RedisResult<i64>) = stage_and_complete
            .query_async(connection)
            .await
            .map_err(StoreError::backend)?;
        staged_answer.map_err(StoreError::backend)?;
        let completed = match completed {
            // A server that lost its scripts: the record is staged, and
            // the invocation loads the script before it runs it.
            Err(err) if err.kind() == ErrorKind::Server(ServerErrorKind::NoScript) => {
                invocation.invoke_async(connection).await
            }
            completed => completed,
        };
        if completed.map_err(StoreError::backend)? == 1 {
            Ok(())
        } else {
            Err(StoreError::LockLost)
        }
    }

    async fn held(
        &self,
        script: &Script,
        name: &str,
        args: impl FnOnce(&mut redis::ScriptInvocation<'_>),
    ) -> Result<(), StoreError> {
        let mut invocation = script.key(name);
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

/// A `begin` that reached the key and found what this store did not write
/// (a value of another type, an answer of another shape) has seen the key:
/// a decode error, which the layer never fails open on. Anything else is
/// the backend's.
fn begin_failed(err: redis::RedisError) -> StoreError {
    if err.code() == Some("WRONGTYPE") || err.kind() == redis::ErrorKind::UnexpectedReturnType {
        StoreError::Decode(DecodeError(
            "a Redis key holding what this store did not write",
        ))
    } else {
        StoreError::backend(err)
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
        // Sized for its seven arguments, so that it is never grown.
        let mut set = redis::Cmd::with_capacity(7, name.len() + lock.len() + 32);
        set.arg("SET")
            .arg(&name)
            .arg(&lock[..])
            .arg("NX")
            .arg("PX")
            .arg(expiry_millis(lease))
            .arg("GET");
        let found: Option<Vec<u8>> = self.connection.query(&set).await.map_err(begin_failed)?;
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
        fingerprint: &Fingerprint,
        token: LockToken,
        outcome: Completion,
        ttl: Duration,
    ) -> Result<(), StoreError> {
        let (state, response) = match outcome {
            Completion::Response(response) => (b'c', response),
            Completion::NotReplayable => (b'n', Bytes::new()),
        };
        let record = value::Record::new(state, fingerprint, token, &response);
        let name = self.key(key);
        let natively = if self.compare_and_set.load(Ordering::Relaxed) {
            self.complete_natively(&name, &record, ttl).await
        } else {
            None
        };
        match (natively, &self.connection) {
            (Some(done), _) => done?,
            (None, Connection::Single(connection)) => {
                let connection = &mut connection.clone();
                self.complete_staged(connection, &name, token, &record, ttl)
                    .await?;
            }
            (None, Connection::Cluster(_)) => {
                self.held(&self.scripts.complete, &name, |script| {
                    script
                        .arg(&value::token_bytes(token)[..])
                        .arg(&record.head[..1])
                        .arg(&record)
                        .arg(expiry_millis(ttl));
                })
                .await?;
            }
        }
        self.replicated(&name, ttl).await
    }

    async fn release(&self, key: &RecordKey, token: LockToken) -> Result<(), StoreError> {
        self.held(&self.scripts.release, &self.key(key), |script| {
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
        self.held(&self.scripts.renew, &self.key(key), |script| {
            script
                .arg(&value::token_bytes(token)[..])
                .arg(expiry_millis(lease));
        })
        .await
    }
}
