//! Per-route use in axum: only the routes that change state carry the
//! layer; the rest of the router is untouched. Keys are scoped by the
//! client an authentication middleware finds (here from `x-api-key`), so
//! two clients' keys never meet, whatever credentials they send.
//!
//! ```sh
//! cargo run --example axum_routes
//! curl -i -X POST localhost:3002/transfers -H 'Idempotency-Key: t-1' -d '{"amount":5}'
//! ```

use std::sync::{
    atomic::{AtomicU64, Ordering},
    Arc,
};

use axum::{
    extract::{Request, State},
    http::StatusCode,
    middleware::{self, Next},
    response::Response,
    routing::post,
    Json, Router,
};
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

/// The caller, as authentication found it.
#[derive(Clone)]
struct ApiClient(String);

impl std::fmt::Display for ApiClient {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "client:{}", self.0)
    }
}

/// Stands in for real authentication: the API key names the client.
async fn authenticate(mut request: Request, next: Next) -> Response {
    let client = request
        .headers()
        .get("x-api-key")
        .and_then(|v| v.to_str().ok())
        .map(|key| ApiClient(key.to_owned()));
    if let Some(client) = client {
        request.extensions_mut().insert(client);
    }
    next.run(request).await
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
            post(transfer)
                .layer(
                    IdempotencyLayer::new(store.clone())
                        .with_key_required(true)
                        .with_principal_scope::<ApiClient>(),
                )
                // Added last, so it runs first: the scope needs its answer.
                .layer(middleware::from_fn(authenticate)),
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
