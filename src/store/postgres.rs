use std::{fmt, sync::Arc, time::Duration};

use async_trait::async_trait;
use bytes::Bytes;
use sqlx::{PgPool, Row};

use super::{expiry_millis, BeginOutcome, Completion, DecodeError, LockToken, Store, StoreError};
use crate::key::{Fingerprint, RecordKey};

const IN_FLIGHT: i16 = 0;
const COMPLETED: i16 = 1;
const NOT_REPLAYABLE: i16 = 2;

/// A [`Store`] on PostgreSQL, through the `sqlx::PgPool` your application
/// already has.
///
/// Records live in one table (default `idempotency_records`): run
/// [`migrate`](Self::migrate) at start-up, or put
/// [`migration_sql`](Self::migration_sql) into your own migrations. Each
/// operation is a single statement; taking a lock is an
/// `INSERT … ON CONFLICT … DO UPDATE … WHERE expired`, atomic under
/// concurrent inserts. Expired rows are never returned, and are deleted by
/// [`delete_expired`](Self::delete_expired), which
/// [`spawn_cleanup`](Self::spawn_cleanup) runs on a schedule.
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

struct Statements {
    begin: String,
    complete: String,
    release: String,
    renew: String,
    delete_expired: String,
}

impl Statements {
    fn for_table(t: &str) -> Self {
        Self {
            begin: format!(
                "WITH acquired AS (
                    INSERT INTO {t} AS r (key, fingerprint, state, token, lease_until, expires_at)
                    VALUES ($1, $2, {IN_FLIGHT}, $3,
                            now() + $4 * interval '1 millisecond',
                            now() + $4 * interval '1 millisecond')
                    ON CONFLICT (key) DO UPDATE SET
                        fingerprint = EXCLUDED.fingerprint, state = {IN_FLIGHT},
                        token = EXCLUDED.token, lease_until = EXCLUDED.lease_until,
                        expires_at = EXCLUDED.expires_at, response = NULL
                    WHERE r.expires_at <= now()
                    RETURNING 1
                )
                SELECT TRUE AS acquired, NULL::bytea AS fingerprint, NULL::smallint AS state,
                       NULL::bytea AS response
                FROM acquired
                UNION ALL
                SELECT FALSE, fingerprint, state,
                       CASE WHEN fingerprint = $2 THEN response END
                FROM {t}
                WHERE key = $1 AND expires_at > now() AND NOT EXISTS (SELECT 1 FROM acquired)"
            ),
            complete: format!(
                "UPDATE {t} SET state = $3, response = $4,
                        lease_until = NULL, expires_at = now() + $5 * interval '1 millisecond'
                 WHERE key = $1 AND token = $2 AND state = {IN_FLIGHT}"
            ),
            release: format!(
                "DELETE FROM {t} WHERE key = $1 AND token = $2 AND state = {IN_FLIGHT}"
            ),
            renew: format!(
                "UPDATE {t} SET lease_until = now() + $3 * interval '1 millisecond',
                        expires_at = now() + $3 * interval '1 millisecond'
                 WHERE key = $1 AND token = $2 AND state = {IN_FLIGHT}"
            ),
            delete_expired: format!("DELETE FROM {t} WHERE expires_at <= now()"),
        }
    }
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
        self.sql = Arc::new(Statements::for_table(table));
        self.table = table.to_owned();
        Ok(self)
    }

    /// The SQL that creates the table and its expiry index, if missing.
    pub fn migration_sql(&self) -> String {
        let t = &self.table;
        let index = t.replace('.', "_");
        format!(
            "CREATE TABLE IF NOT EXISTS {t} (
    key         BYTEA PRIMARY KEY,
    fingerprint BYTEA NOT NULL,
    state       SMALLINT NOT NULL,
    token       BYTEA NOT NULL,
    lease_until TIMESTAMPTZ,
    response    BYTEA,
    expires_at  TIMESTAMPTZ NOT NULL
);
CREATE INDEX IF NOT EXISTS {index}_expires_at ON {t} (expires_at);
"
        )
    }

    /// Creates the table and index if they do not exist.
    pub async fn migrate(&self) -> Result<(), StoreError> {
        sqlx::raw_sql(&self.migration_sql())
            .execute(&self.pool)
            .await
            .map_err(StoreError::backend)?;
        Ok(())
    }

    /// Deletes every expired record; returns how many.
    pub async fn delete_expired(&self) -> Result<u64, StoreError> {
        let done = sqlx::query(&self.sql.delete_expired)
            .execute(&self.pool)
            .await
            .map_err(StoreError::backend)?;
        Ok(done.rows_affected())
    }

    /// Runs [`delete_expired`](Self::delete_expired) every `interval` in a
    /// background task, until the returned handle is aborted.
    pub fn spawn_cleanup(&self, interval: Duration) -> tokio::task::JoinHandle<()> {
        let store = self.clone();
        tokio::spawn(async move {
            let mut ticks = tokio::time::interval(interval);
            ticks.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
            loop {
                ticks.tick().await;
                if let Err(err) = store.delete_expired().await {
                    tracing::warn!(error = %err, "idempotency cleanup failed");
                }
            }
        })
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
        // A row committed by a racing insert after this statement's snapshot
        // blocks the insert yet is invisible to the select; the next attempt
        // sees it.
        for _ in 0..3 {
            let row = sqlx::query(&self.sql.begin)
                .bind(&key.as_bytes()[..])
                .bind(&fingerprint.as_bytes()[..])
                .bind(&token_bytes(token)[..])
                .bind(millis(lease))
                .fetch_optional(&self.pool)
                .await
                .map_err(StoreError::backend)?;
            let Some(row) = row else { continue };
            if row
                .try_get::<bool, _>("acquired")
                .map_err(StoreError::backend)?
            {
                return Ok(BeginOutcome::Acquired(token));
            }
            let found: Vec<u8> = row.try_get("fingerprint").map_err(StoreError::backend)?;
            if found != fingerprint.as_bytes() {
                return Ok(BeginOutcome::Mismatch);
            }
            let state: i16 = row.try_get("state").map_err(StoreError::backend)?;
            return Ok(match state {
                IN_FLIGHT => BeginOutcome::InFlight,
                COMPLETED => BeginOutcome::Completed(Bytes::from(
                    row.try_get::<Vec<u8>, _>("response")
                        .map_err(StoreError::backend)?,
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
        token: LockToken,
        outcome: Completion,
        ttl: Duration,
    ) -> Result<(), StoreError> {
        let token = token_bytes(token);
        let query = sqlx::query(&self.sql.complete)
            .bind(&key.as_bytes()[..])
            .bind(&token[..]);
        // The record is kept as the layer encoded it, and handed back as
        // it is: neither direction decodes it.
        let query = match outcome {
            Completion::Response(record) => query.bind(COMPLETED).bind(record.to_vec()),
            Completion::NotReplayable => query.bind(NOT_REPLAYABLE).bind(None::<Vec<u8>>),
        };
        self.held(query.bind(millis(ttl))).await
    }

    async fn release(&self, key: &RecordKey, token: LockToken) -> Result<(), StoreError> {
        let token = token_bytes(token);
        self.held(
            sqlx::query(&self.sql.release)
                .bind(&key.as_bytes()[..])
                .bind(&token[..]),
        )
        .await
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
