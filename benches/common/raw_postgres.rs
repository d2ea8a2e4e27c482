//! What a raw sqlx client does in place of the PostgreSQL store: the
//! baseline of the store benches.

use bytes::Bytes;
use tower_idempotency::key::RecordKey;

/// The raw client's table, made if missing. Its body is compressed as the
/// store's response is: with lz4 (`RAW_COMPRESSION=default` leaves it
/// to the server's default, pglz unless configured otherwise).
pub async fn create_table(pool: &sqlx::PgPool) {
    let compression = std::env::var("RAW_COMPRESSION").unwrap_or_else(|_| "lz4".to_owned());
    sqlx::raw_sql(&format!(
        "CREATE TABLE IF NOT EXISTS bench_raw (key BYTEA PRIMARY KEY, state SMALLINT, body BYTEA, expires_at TIMESTAMPTZ);
         ALTER TABLE bench_raw ALTER COLUMN body SET COMPRESSION {compression};"
    ))
    .execute(pool)
    .await
    .unwrap();
}

/// Stores `encoded` under `key` for an hour, unless it is there already.
pub async fn store_hot(pool: &sqlx::PgPool, key: &RecordKey, encoded: &Bytes) {
    sqlx::query(
        "INSERT INTO bench_raw VALUES ($1, 1, $2, now() + interval '1 hour') ON CONFLICT DO NOTHING",
    )
    .bind(&key.as_bytes()[..])
    .bind(&encoded[..])
    .execute(pool)
    .await
    .unwrap();
}

/// A first use: a lock row inserted unless one exists, then the response
/// stored in it.
pub async fn insert_then_update(pool: &sqlx::PgPool, key: &RecordKey, encoded: &Bytes) {
    sqlx::query("INSERT INTO bench_raw (key, state, expires_at) VALUES ($1, 0, now() + interval '1 minute') ON CONFLICT DO NOTHING")
        .bind(&key.as_bytes()[..])
        .execute(pool)
        .await
        .unwrap();
    sqlx::query("UPDATE bench_raw SET state = 1, body = $2, expires_at = now() + interval '10 minutes' WHERE key = $1")
        .bind(&key.as_bytes()[..])
        .bind(&encoded[..])
        .execute(pool)
        .await
        .unwrap();
}

/// A replay: one `SELECT` of the stored response.
pub async fn select(pool: &sqlx::PgPool, key: &RecordKey) {
    let _: (Vec<u8>,) =
        sqlx::query_as("SELECT body FROM bench_raw WHERE key = $1 AND expires_at > now()")
            .bind(&key.as_bytes()[..])
            .fetch_one(pool)
            .await
            .unwrap();
}
