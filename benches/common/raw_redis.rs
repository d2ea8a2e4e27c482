//! What a raw redis-rs client does in place of the Redis store: the
//! baseline of the store benches.

use bytes::Bytes;
use tower_idempotency::key::RecordKey;

/// The key the raw client's replays read.
pub const HOT: &str = "bench-raw:hot";

/// Stores `encoded` under [`HOT`].
pub async fn store_hot(conn: &mut impl redis::aio::ConnectionLike, encoded: &Bytes) {
    let _: () = redis::cmd("SET")
        .arg(HOT)
        .arg(&encoded[..])
        .query_async(conn)
        .await
        .unwrap();
}

/// A first use: a lock taken with `SET NX PX`, then the response stored
/// with `SET PX`.
pub async fn first_use(
    conn: &mut impl redis::aio::ConnectionLike,
    key: &RecordKey,
    encoded: &Bytes,
) {
    let k = format!("bench-raw:{}", key.to_hex());
    let _: Option<String> = redis::cmd("SET")
        .arg(&k)
        .arg("lock")
        .arg("NX")
        .arg("PX")
        .arg(60_000)
        .query_async(conn)
        .await
        .unwrap();
    let _: () = redis::cmd("SET")
        .arg(&k)
        .arg(&encoded[..])
        .arg("PX")
        .arg(600_000)
        .query_async(conn)
        .await
        .unwrap();
}

/// A replay: one `GET` of the stored response.
pub async fn get(conn: &mut impl redis::aio::ConnectionLike) {
    let _: Vec<u8> = redis::cmd("GET").arg(HOT).query_async(conn).await.unwrap();
}
