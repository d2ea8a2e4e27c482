//! Per-route use in axum: only the routes that change state carry the
//! layer; the rest of the router is untouched.
//!
//! ```sh
//! cargo run --example axum_routes
//! curl -i -X POST localhost:3002/transfers -H 'Idempotency-Key: t-1' -d '{"amount":5}'
//! ```

use std::sync::{
    atomic::{AtomicU64, Ordering},
    Arc,
};

use axum::{extract::State, http::StatusCode, routing::post, Json, Router};
use serde_json::{json, Value};
use tower_idempotency::{IdempotencyLayer, MemoryStore};

async fn transfer(
    State(counter): State<Arc<AtomicU64>>,
    Json(body): Json<Value>,
) -> (StatusCode, Json<Value>) {
    let id = counter.fetch_add(1, Ordering::SeqCst) + 1;
    (
        StatusCode::CREATED,
        Json(json!({ "transfer": id, "request": body })),
    )
}

async fn search(State(counter): State<Arc<AtomicU64>>, Json(body): Json<Value>) -> Json<Value> {
    let run = counter.fetch_add(1, Ordering::SeqCst) + 1;
    Json(json!({ "search": run, "query": body }))
}

#[tokio::main]
async fn main() -> std::io::Result<()> {
    let port: u16 = std::env::var("PORT")
        .ok()
        .and_then(|p| p.parse().ok())
        .unwrap_or(3002);
    let store = MemoryStore::new();
    let counter = Arc::new(AtomicU64::new(0));

    let app = Router::new()
        // Moving money must never happen twice: the key is required here.
        .route(
            "/transfers",
            post(transfer).layer(IdempotencyLayer::new(store.clone()).with_key_required(true)),
        )
        // A read-only POST: retries are harmless, so no layer.
        .route("/search", post(search))
        .with_state(counter);

    let listener = tokio::net::TcpListener::bind(("127.0.0.1", port)).await?;
    println!(
        "axum per-route example listening on http://{}",
        listener.local_addr()?
    );
    axum::serve(listener, app).await
}
