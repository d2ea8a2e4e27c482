//! A small payments API with the idempotency layer on its `POST /payments`.
//!
//! ```sh
//! cargo run --example payments
//! curl -i -X POST localhost:3000/payments \
//!   -H 'Idempotency-Key: 8e03978e-40d5-43e8-bc93-6894a57f9324' \
//!   -H 'Content-Type: application/json' \
//!   -d '{"amount": 1000, "currency": "EUR"}'
//! ```
//!
//! Settings, from the environment:
//! - `PORT`: the port on 127.0.0.1 (default 3000; 0 picks a free one);
//! - `PAYMENT_DELAY_MS`: simulated processing time (default 0);
//! - `IDEMPOTENCY_TTL_SECS`: how long responses are kept (default 86400);
//! - `IDEMPOTENCY_LEASE_MS`: how long a lock outlives a crashed holder
//!   (default 60000);
//! - `IDEMPOTENCY_STORE`: `memory` (default), a `redis://` URL (feature
//!   `redis`), a `postgres://` URL (feature `postgres`), or `off` to serve
//!   without the layer, as a baseline for load tests.

use std::{
    collections::BTreeMap,
    env,
    sync::{Arc, Mutex},
    time::Duration,
};

use axum::{
    extract::{Path, State},
    http::{header, StatusCode},
    response::{IntoResponse, Response},
    routing::{get, post},
    Json, Router,
};
use bytes::Bytes;
use serde::{Deserialize, Serialize};
use tower_idempotency::{IdempotencyLayer, MemoryStore, Store};

#[derive(Clone, Serialize)]
struct Payment {
    id: String,
    amount: u64,
    currency: String,
    #[serde(skip_serializing_if = "Option::is_none")]
    description: Option<String>,
    status: &'static str,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct NewPayment {
    amount: u64,
    currency: String,
    description: Option<String>,
}

#[derive(Clone)]
struct App {
    payments: Arc<Mutex<BTreeMap<String, Payment>>>,
    delay: Duration,
}

fn invalid(detail: impl Into<String>) -> Response {
    let body = serde_json::json!({
        "type": "about:blank",
        "title": "Invalid payment",
        "status": 400,
        "detail": detail.into(),
    });
    (
        StatusCode::BAD_REQUEST,
        [(header::CONTENT_TYPE, "application/problem+json")],
        body.to_string(),
    )
        .into_response()
}

fn fresh_id() -> String {
    use std::hash::{BuildHasher, Hasher};
    let mut hasher = std::collections::hash_map::RandomState::new().build_hasher();
    hasher.write_u128(
        std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .unwrap_or_default()
            .as_nanos(),
    );
    format!("pay_{:016x}", hasher.finish())
}

async fn create(State(app): State<App>, body: Bytes) -> Response {
    let new: NewPayment = match serde_json::from_slice(&body) {
        Ok(new) => new,
        Err(err) => return invalid(format!("the body must be a payment object: {err}")),
    };
    if new.amount == 0 {
        return invalid("amount must be a positive integer");
    }
    if new.currency.len() != 3 || !new.currency.bytes().all(|b| b.is_ascii_alphabetic()) {
        return invalid("currency must be three letters, such as EUR");
    }
    if !app.delay.is_zero() {
        tokio::time::sleep(app.delay).await;
    }
    let payment = Payment {
        id: fresh_id(),
        amount: new.amount,
        currency: new.currency.to_ascii_uppercase(),
        description: new.description,
        status: "succeeded",
    };
    app.payments
        .lock()
        .expect("payments lock")
        .insert(payment.id.clone(), payment.clone());
    (StatusCode::CREATED, Json(payment)).into_response()
}

async fn list(State(app): State<App>) -> Json<Vec<Payment>> {
    Json(
        app.payments
            .lock()
            .expect("payments lock")
            .values()
            .cloned()
            .collect(),
    )
}

async fn show(State(app): State<App>, Path(id): Path<String>) -> Response {
    match app.payments.lock().expect("payments lock").get(&id) {
        Some(payment) => Json(payment.clone()).into_response(),
        None => StatusCode::NOT_FOUND.into_response(),
    }
}

fn setting<T: std::str::FromStr>(name: &str, default: T) -> T {
    match env::var(name) {
        Ok(value) => value
            .parse()
            .unwrap_or_else(|_| panic!("{name} must be a number, got {value:?}")),
        Err(_) => default,
    }
}

async fn store_from(url: &str) -> Result<Option<Arc<dyn Store>>, String> {
    match url {
        "off" => Ok(None),
        "" | "memory" => Ok(Some(Arc::new(MemoryStore::new()))),
        #[cfg(feature = "redis")]
        url if url.starts_with("redis://") => {
            let store = tower_idempotency::store::RedisStore::connect(url)
                .await
                .map_err(|e| format!("cannot connect to Redis at {url}: {e}"))?;
            Ok(Some(Arc::new(store)))
        }
        #[cfg(feature = "postgres")]
        url if url.starts_with("postgres://") || url.starts_with("postgresql://") => {
            let pool = sqlx::PgPool::connect(url)
                .await
                .map_err(|e| format!("cannot connect to PostgreSQL at {url}: {e}"))?;
            let store = tower_idempotency::store::PostgresStore::new(pool);
            store
                .migrate()
                .await
                .map_err(|e| format!("cannot create the idempotency table: {e}"))?;
            Ok(Some(Arc::new(store)))
        }
        other => Err(format!(
            "IDEMPOTENCY_STORE={other:?} is not supported by this build: use `memory`, `off`, \
             a redis:// URL (with --features redis) or a postgres:// URL (with --features postgres)"
        )),
    }
}

#[tokio::main]
async fn main() {
    let port: u16 = setting("PORT", 3000);
    let app = App {
        payments: Arc::default(),
        delay: Duration::from_millis(setting("PAYMENT_DELAY_MS", 0)),
    };
    let ttl = Duration::from_secs(setting("IDEMPOTENCY_TTL_SECS", 86_400));
    let lease = Duration::from_millis(setting("IDEMPOTENCY_LEASE_MS", 60_000));
    let store = match store_from(&env::var("IDEMPOTENCY_STORE").unwrap_or_default()).await {
        Ok(store) => store,
        Err(message) => {
            eprintln!("{message}");
            std::process::exit(2);
        }
    };

    let mut create_route = post(create).get(list);
    if let Some(store) = &store {
        create_route = create_route.layer(
            IdempotencyLayer::with_shared_store(Arc::clone(store))
                .with_key_required(true)
                .with_ttl(ttl)
                .with_lease(lease),
        );
    }
    let router = Router::new()
        .route("/payments", create_route)
        .route("/payments/{id}", get(show))
        .with_state(app);

    let listener = tokio::net::TcpListener::bind(("127.0.0.1", port))
        .await
        .unwrap_or_else(|e| panic!("cannot listen on 127.0.0.1:{port}: {e}"));
    let addr = listener.local_addr().expect("local address");
    let store_name = store
        .as_ref()
        .map_or("none (layer off)".to_owned(), |s| format!("{s:?}"));
    println!("payments API listening on http://{addr}");
    println!("idempotency store: {store_name}");
    println!();
    println!("Try it: send the same request twice and compare the ids.");
    println!("  curl -i -X POST http://{addr}/payments \\");
    println!("    -H 'Idempotency-Key: 8e03978e-40d5-43e8-bc93-6894a57f9324' \\");
    println!("    -H 'Content-Type: application/json' \\");
    println!("    -d '{{\"amount\": 1000, \"currency\": \"EUR\"}}'");
    println!("  curl http://{addr}/payments");
    axum::serve(listener, router).await.expect("server error");
}
