use std::{fmt, sync::Arc, time::Duration};

use async_trait::async_trait;
use bytes::Bytes;
use sqlx::{PgPool, Row};

use self::sql::Statements;
use super::{expiry_millis, BeginOutcome, Completion, DecodeError, LockToken, Store, StoreError};
use crate::{
    execution::Execution,
    key::{Fingerprint, RecordKey},
};

mod maintenance;
mod sql;

use sql::{COMPLETED, IN_FLIGHT, NOT_REPLAYABLE};

/// A [`Store`] on PostgreSQL, through the `sqlx::PgPool` your application
/// already has.
///
/// Records live in one table (default `idempotency_records`): run
/// [`migrate`](Self::migrate) at start-up, or put
/// [`migration_sql`](Self::migration_sql) into your own migrations. Each
/// operation is one round trip. `begin` calls a PL/pgSQL function that the
/// migration creates in the table's schema (`<table>_begin_v3`): it reads
/// the key, so that a replay takes no row lock; a missing key it takes with
/// an `INSERT … ON CONFLICT DO NOTHING`, and an expired or recoverable row
/// with an `UPDATE … WHERE expired`, which checks again under the row's
/// lock, so each is atomic under concurrent requests. A body that changes
/// gets a new name, and the migration leaves the earlier build's function
/// for the replicas that still call it. The other operations are single
/// statements.
/// The migration needs `CREATE` on the table's schema once, to make the
/// function, and ownership of the table to compress its responses with
/// lz4 (without it they keep the server's default); the application's
/// role needs `EXECUTE` on the function (which PostgreSQL grants to
/// everyone unless told otherwise). The function returns the table's row
/// type, so dropping the table takes `DROP TABLE … CASCADE`. Expired rows
/// are never returned, and are deleted by
/// [`delete_expired`](Self::delete_expired), which
/// [`spawn_cleanup`](Self::spawn_cleanup) runs on a schedule.
///
/// `begin` holds under any isolation level: a call whose transaction loses
/// a race on the row (a serialization failure under `REPEATABLE READ` or
/// `SERIALIZABLE`, or a deadlock) is run again, and one that gives up
/// waiting on the row's lock (`lock_timeout`, `statement_timeout`) answers
/// that the key is in flight, never a backend failure that
/// [`StoreFailure::FailOpen`](crate::StoreFailure::FailOpen) would run the
/// handler on.
///
/// ```no_run
/// # async fn run(pool: sqlx::PgPool) -> Result<(), tower_idempotency::store::StoreError> {
/// use std::time::Duration;
/// use tower_idempotency::{store::PostgresStore, IdempotencyLayer};
///
/// let store = PostgresStore::new(pool).with_table("idempotency_records")?;
/// store.migrate().await?;
/// store.spawn_cleanup(Duration::from_secs(300));
/// let layer = IdempotencyLayer::new(store);
/// # Ok(()) }
/// ```
#[derive(Clone)]
pub struct PostgresStore {
    pool: PgPool,
    table: String,
    sql: Arc<Statements>,
}

impl fmt::Debug for PostgresStore {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("PostgresStore")
            .field("table", &self.table)
            .finish_non_exhaustive()
    }
}

impl PostgresStore {
    /// A store on `pool`, in the table `idempotency_records`.
    pub fn new(pool: PgPool) -> Self {
        let table = "idempotency_records".to_owned();
        Self {
            pool,
            sql: Arc::new(Statements::for_table(&table)),
            table,
        }
    }

    /// Uses another table, optionally schema-qualified (`billing.idempotency`).
    /// Each part must be a plain identifier: letters, digits and `_`.
    pub fn with_table(mut self, table: &str) -> Result<Self, StoreError> {
        let valid = |part: &str| {
            part.chars()
                .next()
                .is_some_and(|c| c.is_ascii_alphabetic() || c == '_')
                && part.chars().all(|c| c.is_ascii_alphanumeric() || c == '_')
                && part.len() <= 63
        };
        let parts: Vec<&str> = table.split('.').collect();
        if parts.len() > 2 || !parts.iter().all(|p| valid(p)) {
            return Err(StoreError::backend(format!(
                "{table:?} is not a plain table name"
            )));
        }
        if !sql::Names::of(table).fit() {
            return Err(StoreError::backend(format!(
                "{table:?} is too long: the names of its index and function must fit \
                 PostgreSQL's 63 bytes"
            )));
        }
        self.sql = Arc::new(Statements::for_table(table));
        self.table = table.to_owned();
        Ok(self)
    }

    /// Fences the request inside the handler's own transaction: checks that
    /// `execution` still holds its key and that no effect was committed for
    /// it, and marks the effect committed, in one statement on `connection`
    /// (a `&mut Transaction` derefs to one). Call it in the transaction that
    /// performs the effect, on the database this store's table is in.
    ///
    /// The mark commits or rolls back with the effect, so the record and the
    /// effect can never disagree, whatever dies when. If the lease was taken
    /// over, this fails with [`StoreError::LockLost`]; if the effect was
    /// committed already (a recovery that did not check), with
    /// [`StoreError::EffectCommitted`]: either way, roll back. The row stays
    /// locked until the transaction ends, so a takeover racing it waits,
    /// then recovers instead of running again.
    ///
    /// ```no_run
    /// # async fn charge(
    /// #     pool: sqlx::PgPool,
    /// #     store: tower_idempotency::store::PostgresStore,
    /// #     execution: tower_idempotency::Execution,
    /// # ) -> Result<(), Box<dyn std::error::Error>> {
    /// let mut tx = pool.begin().await?;
    /// store.fence_in(&mut tx, &execution).await?;
    /// sqlx::query("INSERT INTO payments (record_key, amount) VALUES ($1, $2)")
    ///     .bind(&execution.record_key().as_bytes()[..])
    ///     .bind(1000_i64)
    ///     .execute(&mut *tx)
    ///     .await?;
    /// tx.commit().await?;
    /// # Ok(()) }
    /// ```
    pub async fn fence_in(
        &self,
        connection: &mut sqlx::PgConnection,
        execution: &Execution,
    ) -> Result<(), StoreError> {
        self.fence_on(
            connection,
            &execution.record_key(),
            execution.token(),
            execution.ttl(),
        )
        .await
    }

    async fn fence_on(
        &self,
        connection: &mut sqlx::PgConnection,
        key: &RecordKey,
        token: LockToken,
        ttl: Duration,
    ) -> Result<(), StoreError> {
        let (fenced, committed): (bool, bool) = sqlx::query_as(&self.sql.fence)
            .bind(&key.as_bytes()[..])
            .bind(&token_bytes(token)[..])
            .bind(millis(ttl))
            .fetch_one(connection)
            .await
            .map_err(StoreError::backend)?;
        match (fenced, committed) {
            (true, _) => Ok(()),
            (false, true) => Err(StoreError::EffectCommitted),
            (false, false) => Err(StoreError::LockLost),
        }
    }

    async fn held(
        &self,
        query: sqlx::query::Query<'_, sqlx::Postgres, sqlx::postgres::PgArguments>,
    ) -> Result<(), StoreError> {
        let done = query
            .execute(&self.pool)
            .await
            .map_err(StoreError::backend)?;
        if done.rows_affected() == 1 {
            Ok(())
        } else {
            Err(StoreError::LockLost)
        }
    }
}

fn millis(duration: Duration) -> i64 {
    expiry_millis(duration) as i64
}

fn token_bytes(token: LockToken) -> [u8; 16] {
    token.as_u128().to_be_bytes()
}

#[async_trait]
impl Store for PostgresStore {
    async fn begin(
        &self,
        key: &RecordKey,
        fingerprint: &Fingerprint,
        lease: Duration,
    ) -> Result<BeginOutcome, StoreError> {
        let token = LockToken::random();
        let own = token_bytes(token);
        // The function's read and its write can disagree
        // (see `sql::begin_function`); the next attempt sees the row.
        for _ in 0..3 {
            let found = sqlx::query(&self.sql.begin)
                .bind(&key.as_bytes()[..])
                .bind(&fingerprint.as_bytes()[..])
                .bind(&own[..])
                .bind(millis(lease))
                .fetch_one(&self.pool)
                .await;
            let row = match found {
                Ok(row) => row,
                Err(err) => match sqlstate(&err).as_deref() {
                    // A race on the row that the call's own transaction lost
                    // (under REPEATABLE READ or SERIALIZABLE, or a deadlock):
                    // each attempt is a transaction of its own, so the next
                    // one sees the winner's row.
                    Some("40001" | "40P01") => continue,
                    // It gave up waiting on the row's lock (`lock_timeout`,
                    // `statement_timeout`): another request holds the key.
                    // Not a backend failure, which the layer may fail open
                    // on and run the handler beside that request.
                    Some("55P03" | "57014") => return Ok(BeginOutcome::InFlight),
                    _ => return Err(StoreError::backend(err)),
                },
            };
            let Some(state) = row
                .try_get::<Option<i16>, _>(0)
                .map_err(StoreError::backend)?
            else {
                continue;
            };
            let holder: Vec<u8> = row.try_get(1).map_err(StoreError::backend)?;
            if holder == own {
                let recovered: bool = row.try_get(2).map_err(StoreError::backend)?;
                return Ok(if recovered {
                    BeginOutcome::Recover(token)
                } else {
                    BeginOutcome::Acquired(token)
                });
            }
            let found: Vec<u8> = row.try_get(3).map_err(StoreError::backend)?;
            if found != fingerprint.as_bytes() {
                return Ok(BeginOutcome::Mismatch);
            }
            return Ok(match state {
                IN_FLIGHT => BeginOutcome::InFlight,
                COMPLETED => BeginOutcome::Completed(Bytes::from(
                    row.try_get::<Vec<u8>, _>(4).map_err(StoreError::backend)?,
                )),
                NOT_REPLAYABLE => BeginOutcome::NotReplayable,
                _ => return Err(DecodeError("unknown record state").into()),
            });
        }
        Ok(BeginOutcome::InFlight)
    }

    async fn complete(
        &self,
        key: &RecordKey,
        _: &Fingerprint,
        token: LockToken,
        outcome: Completion,
        ttl: Duration,
    ) -> Result<(), StoreError> {
        let token = token_bytes(token);
        let (state, record) = match &outcome {
            Completion::Response(record) => (COMPLETED, Some(&record[..])),
            Completion::NotReplayable => (NOT_REPLAYABLE, None),
        };
        // The record is kept as the layer encoded it, and handed back as
        // it is: neither direction decodes it.
        let done = sqlx::query(&self.sql.complete)
            .bind(&key.as_bytes()[..])
            .bind(&token[..])
            .bind(state)
            .bind(record)
            .bind(millis(ttl))
            .execute(&self.pool)
            .await
            .map_err(StoreError::backend)?;
        if done.rows_affected() == 1 {
            return Ok(());
        }
        // Only when the lock is not found: a retry after an answer that
        // never came finds the row its own first attempt completed, and
        // leaves it as it is.
        let landed: bool = sqlx::query_scalar(&self.sql.completed_by)
            .bind(&key.as_bytes()[..])
            .bind(&token[..])
            .bind(state)
            .fetch_one(&self.pool)
            .await
            .map_err(StoreError::backend)?;
        if landed {
            Ok(())
        } else {
            Err(StoreError::LockLost)
        }
    }

    async fn release(&self, key: &RecordKey, token: LockToken) -> Result<(), StoreError> {
        let token = token_bytes(token);
        let settled: i64 = sqlx::query_scalar(&self.sql.release)
            .bind(&key.as_bytes()[..])
            .bind(&token[..])
            .fetch_one(&self.pool)
            .await
            .map_err(StoreError::backend)?;
        if settled == 1 {
            Ok(())
        } else {
            Err(StoreError::LockLost)
        }
    }

    async fn fence(
        &self,
        key: &RecordKey,
        token: LockToken,
        ttl: Duration,
    ) -> Result<(), StoreError> {
        let mut connection = self.pool.acquire().await.map_err(StoreError::backend)?;
        self.fence_on(&mut connection, key, token, ttl).await
    }

    async fn renew(
        &self,
        key: &RecordKey,
        token: LockToken,
        lease: Duration,
    ) -> Result<(), StoreError> {
        let token = token_bytes(token);
        self.held(
            sqlx::query(&self.sql.renew)
                .bind(&key.as_bytes()[..])
                .bind(&token[..])
                .bind(millis(lease)),
        )
        .await
    }
}

/// The SQLSTATE of an error the server raised.
fn sqlstate(err: &sqlx::Error) -> Option<std::borrow::Cow<'_, str>> {
    err.as_database_error().and_then(|err| err.code())
}
