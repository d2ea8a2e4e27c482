//! The table's upkeep: creating and migrating it, and deleting expired
//! records.

use std::time::Duration;

use super::{sql, sqlstate, PostgresStore};
use crate::store::StoreError;

impl PostgresStore {
    /// The SQL that creates the table, its expiry index and the function
    /// `begin` calls, if missing, and adds the columns a table made by an
    /// earlier build lacks. Run it inside a transaction that first takes
    /// `pg_advisory_xact_lock`, as [`migrate`](Self::migrate) does, if
    /// several processes may run it at once. A table migrated by an
    /// earlier build needs it run again: its `begin` function is new.
    ///
    /// Where it alters an existing table, it waits for the table's lock as
    /// long as the transaction's `lock_timeout` allows: set one (`SET
    /// LOCAL lock_timeout`) so that a lock request queued behind a long
    /// transaction cannot hold up every request to the table, and run it
    /// again, in a new transaction, if it fails with `55P03`
    /// (`lock_not_available`).
    pub fn migration_sql(&self) -> String {
        sql::migration(&self.table)
    }

    /// Creates the table, index and function if they do not exist. Any
    /// number of processes may run it at once on a fresh database: an
    /// advisory lock on the table's name lets one create while the others
    /// wait, then find it made. (`CREATE TABLE IF NOT EXISTS` alone is not
    /// safe under concurrency in PostgreSQL: two creators race on the
    /// catalog.)
    ///
    /// A table made by an earlier build is altered, which needs a lock on
    /// it that no other transaction holds meanwhile, and every request to
    /// the table queues behind a request for that lock. So the migration
    /// waits for it 100 ms at first, gives up and tries again, each time
    /// waiting twice as long, up to 10 s: requests are held up no longer
    /// than that, and a table that never has a moment free of other
    /// transactions still gets migrated once the wait outlasts the longest
    /// of them. Each failed attempt logs a warning; wrap the call in a
    /// timeout to bound it.
    pub async fn migrate(&self) -> Result<(), StoreError> {
        // One simple query: PostgreSQL runs its statements as one implicit
        // transaction, which holds the lock to its end and, if a statement
        // fails, rolls back without leaving the pooled connection inside
        // an aborted transaction.
        // The lock is on the name as PostgreSQL folds it, qualified with
        // the schema an unqualified name is created in, so that every
        // spelling of one table takes one lock.
        let table = self.table.to_ascii_lowercase();
        let qualified = match table.split_once('.') {
            Some(_) => format!("'{table}'"),
            None => format!("current_schema() || '.{table}'"),
        };
        let migration = self.migration_sql();
        let (mut wait, longest) = (Duration::from_millis(100), Duration::from_secs(10));
        let mut attempt = 0;
        loop {
            attempt += 1;
            // The advisory lock is waited for without a timeout, even one
            // set on the role: waiting for another replica's migration
            // holds up no request, and a timeout then only ever means the
            // table.
            let locked = format!(
                "SET LOCAL lock_timeout = 0;
                 SELECT pg_advisory_xact_lock(hashtext('tower-idempotency:' || {qualified}));
                 SET LOCAL lock_timeout = {millis};
                 {migration}",
                millis = wait.as_millis(),
            );
            let Err(err) = sqlx::raw_sql(&locked).execute(&self.pool).await else {
                return Ok(());
            };
            if sqlstate(&err).as_deref() != Some("55P03") {
                return Err(StoreError::backend(err));
            }
            tracing::warn!(
                table = %self.table,
                attempt,
                error = %err,
                "the idempotency table's migration got no lock on it in {wait:?}: another \
                 transaction holds the table (pg_blocking_pids names it); migrating again"
            );
            tokio::time::sleep(Duration::from_millis(100)).await;
            wait = (wait * 2).min(longest);
        }
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
}
