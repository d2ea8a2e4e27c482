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
//! - `PAYMENT_DELAY_MS`: simulated processing time before the payment is
//!   committed (default 0);
//! - `PAYMENT_AFTER_COMMIT_MS`: time spent after the commit and before the
//!   response, standing in for work after the charge such as notifying a
//!   ledger (default 0);
//! - `IDEMPOTENCY_TTL_SECS`: how long responses are kept (default 86400);
//! - `IDEMPOTENCY_LEASE_MS`: how long a lock outlives a crashed holder
//!   (default 60000);
//! - `IDEMPOTENCY_FINGERPRINT`: `json` (default) fingerprints the body as
//!   canonical JSON, `raw` as its bytes;
//! - `IDEMPOTENCY_MAX_ENTRIES`: records the memory store holds at most
//!   (default 1000000; its bytes are not bounded beyond 512 MiB per million
//!   records);
//! - `IDEMPOTENCY_STORE`: `memory` (default), a `redis://` URL (feature
//!   `redis`), `redis+cluster://host:port,host:port,…` for a Redis Cluster
//!   (feature `redis`), a `postgres://` URL (feature `postgres`), or `off` to serve
//!   without the layer, as a baseline for load tests;
//! - `IDEMPOTENCY_LAYER`: `off` serves without the layer but keeps the
//!   store's ledger (payments in PostgreSQL stay there, unfenced): the
//!   baseline for a shared store.
//!
//! On PostgreSQL the payments themselves live in a `payments` table, each
//! inserted in the same transaction as the layer's fence
//! (`PostgresStore::fence_in`): a payment is committed exactly when its key
//! is marked, so a replica that dies after the commit leaves a key the next
//! one recovers (answering with the committed payment, same id), and one
//! that stalls past its lease finds its fence refused and rolls back. Every
//! replica reads every payment from the table. With the memory and Redis
//! stores the payments live in this process's memory.
//!
//! Built with the `utoipa` feature it serves its OpenAPI document at
//! `GET /openapi.json`, with the key header and the layer's answers on
//! `POST /payments`.

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
    Extension, Json, Router,
};
use bytes::Bytes;
use serde::{Deserialize, Serialize};
use tower_idempotency::{
    fingerprint::BodyFingerprint, key::IDEMPOTENCY_EXPIRES, store::MemoryLimits, Execution,
    IdempotencyLayer, MemoryStore, Store,
};

#[derive(Clone, Serialize)]
struct Payment {
    id: String,
    amount: u64,
    currency: String,
    #[serde(skip_serializing_if = "Option::is_none")]
    description: Option<String>,
    status: String,
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
    ledger: Ledger,
    delay: Duration,
    after_commit: Duration,
}

/// Where payments are kept.
#[derive(Clone)]
enum Ledger {
    Memory(Arc<Mutex<BTreeMap<String, Payment>>>),
    #[cfg(feature = "postgres")]
    Postgres(postgres::Ledger),
}

impl Ledger {
    async fn list(&self) -> Result<Vec<Payment>, String> {
        match self {
            Self::Memory(payments) => Ok(payments
                .lock()
                .expect("payments lock")
                .values()
                .cloned()
                .collect()),
            #[cfg(feature = "postgres")]
            Self::Postgres(ledger) => ledger.list().await,
        }
    }

    async fn get(&self, id: &str) -> Result<Option<Payment>, String> {
        match self {
            Self::Memory(payments) => Ok(payments.lock().expect("payments lock").get(id).cloned()),
            #[cfg(feature = "postgres")]
            Self::Postgres(ledger) => ledger.get(id).await,
        }
    }
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

async fn create(
    State(app): State<App>,
    execution: Option<Extension<Execution>>,
    body: Bytes,
) -> Response {
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
    let payment = Payment {
        id: fresh_id(),
        amount: new.amount,
        currency: new.currency.to_ascii_uppercase(),
        description: new.description,
        status: "succeeded".to_owned(),
    };
    let payment = match &app.ledger {
        Ledger::Memory(payments) => {
            if !app.delay.is_zero() {
                tokio::time::sleep(app.delay).await;
            }
            payments
                .lock()
                .expect("payments lock")
                .insert(payment.id.clone(), payment.clone());
            payment
        }
        #[cfg(feature = "postgres")]
        Ledger::Postgres(ledger) => {
            let execution = execution.as_ref().map(|Extension(execution)| execution);
            match ledger.charge(payment, execution, app.delay).await {
                Ok(payment) => payment,
                Err(answer) => return answer,
            }
        }
    };
    #[cfg(not(feature = "postgres"))]
    let _ = execution;
    if !app.after_commit.is_zero() {
        tokio::time::sleep(app.after_commit).await;
    }
    (StatusCode::CREATED, Json(payment)).into_response()
}

async fn list(State(app): State<App>) -> Response {
    match app.ledger.list().await {
        Ok(payments) => Json(payments).into_response(),
        Err(err) => server_error(&err),
    }
}

async fn show(State(app): State<App>, Path(id): Path<String>) -> Response {
    match app.ledger.get(&id).await {
        Ok(Some(payment)) => Json(payment).into_response(),
        Ok(None) => StatusCode::NOT_FOUND.into_response(),
        Err(err) => server_error(&err),
    }
}

fn server_error(detail: &str) -> Response {
    eprintln!("payments: {detail}");
    (StatusCode::INTERNAL_SERVER_ERROR, detail.to_owned()).into_response()
}

fn setting<T: std::str::FromStr>(name: &str, default: T) -> T {
    match env::var(name) {
        Ok(value) => value
            .parse()
            .unwrap_or_else(|_| panic!("{name} must be a number, got {value:?}")),
        Err(_) => default,
    }
}

/// The store the layer uses (`None` when it is off) and where payments live.
async fn setup(url: &str) -> Result<(Option<Arc<dyn Store>>, Ledger), String> {
    let in_memory = || Ledger::Memory(Arc::default());
    match url {
        "off" => Ok((None, in_memory())),
        "" | "memory" => {
            let entries: usize = setting("IDEMPOTENCY_MAX_ENTRIES", 1_000_000);
            let limits = MemoryLimits::new(entries, entries.saturating_mul(512));
            let store = MemoryStore::builder().with_limits(limits).build();
            Ok((Some(Arc::new(store)), in_memory()))
        }
        #[cfg(feature = "redis")]
        url if url.starts_with("redis+cluster://") => {
            let nodes: Vec<String> = url["redis+cluster://".len()..]
                .split(',')
                .map(|node| format!("redis://{node}"))
                .collect();
            let store = tower_idempotency::store::RedisStore::connect_cluster(&nodes)
                .await
                .map_err(|e| format!("cannot connect to the Redis Cluster at {url}: {e}"))?;
            Ok((Some(Arc::new(store)), in_memory()))
        }
        #[cfg(feature = "redis")]
        url if url.starts_with("redis://") => {
            let store = tower_idempotency::store::RedisStore::connect(url)
                .await
                .map_err(|e| format!("cannot connect to Redis at {url}: {e}"))?;
            Ok((Some(Arc::new(store)), in_memory()))
        }
        #[cfg(feature = "postgres")]
        url if url.starts_with("postgres://") || url.starts_with("postgresql://") => {
            let ledger = postgres::Ledger::connect(url).await?;
            Ok((
                Some(Arc::new(ledger.store.clone())),
                Ledger::Postgres(ledger),
            ))
        }
        other => Err(format!(
            "IDEMPOTENCY_STORE={other:?} is not supported by this build: use `memory`, `off`, \
             a redis:// or redis+cluster:// URL (with --features redis) or a postgres:// URL \
             (with --features postgres)"
        )),
    }
}

#[cfg(feature = "postgres")]
mod postgres {
    use std::time::Duration;

    use axum::{
        http::StatusCode,
        response::{IntoResponse, Response},
    };
    use sqlx::{
        postgres::{PgPoolOptions, PgRow},
        PgPool, Row,
    };
    use tower_idempotency::{
        store::{PostgresStore, StoreError},
        Execution,
    };

    use super::{server_error, Payment};

    /// Payments in a table of the same database as the idempotency records,
    /// each inserted in the transaction that fences its key.
    #[derive(Clone)]
    pub(super) struct Ledger {
        pool: PgPool,
        pub(super) store: PostgresStore,
    }

    const COLUMNS: &str = "id, amount, currency, description, status";

    impl Ledger {
        /// Connects, and creates both tables if they are missing: safe with
        /// any number of replicas starting at once, each under an advisory
        /// lock.
        pub(super) async fn connect(url: &str) -> Result<Self, String> {
            // A short acquire timeout: with the database gone, the layer
            // answers 503 in seconds instead of holding requests for 30 s.
            let pool = PgPoolOptions::new()
                .acquire_timeout(Duration::from_secs(3))
                .connect(url)
                .await
                .map_err(|e| format!("cannot connect to PostgreSQL at {url}: {e}"))?;
            let store = PostgresStore::new(pool.clone());
            store
                .migrate()
                .await
                .map_err(|e| format!("cannot create the idempotency table: {e}"))?;
            let create = async {
                let mut tx = pool.begin().await?;
                sqlx::query("SELECT pg_advisory_xact_lock(hashtext('payments example: payments'))")
                    .execute(&mut *tx)
                    .await?;
                sqlx::raw_sql(
                    "CREATE TABLE IF NOT EXISTS payments (
                        id          TEXT PRIMARY KEY,
                        record_key  BYTEA NOT NULL UNIQUE,
                        amount      BIGINT NOT NULL,
                        currency    TEXT NOT NULL,
                        description TEXT,
                        status      TEXT NOT NULL,
                        created_at  TIMESTAMPTZ NOT NULL DEFAULT now()
                    )",
                )
                .execute(&mut *tx)
                .await?;
                tx.commit().await
            };
            create
                .await
                .map_err(|e| format!("cannot create the payments table: {e}"))?;
            Ok(Self { pool, store })
        }

        /// Charges once: a recovery answers with the payment an earlier
        /// holder committed; a first run waits `delay` (the processing),
        /// then fences and inserts in one transaction.
        pub(super) async fn charge(
            &self,
            payment: Payment,
            execution: Option<&Execution>,
            delay: Duration,
        ) -> Result<Payment, Response> {
            // Without the layer (`IDEMPOTENCY_LAYER=off`, a baseline for
            // load tests) a payment has no record key: its id stands in.
            let record_key = execution.map(Execution::record_key);
            let key = record_key
                .as_ref()
                .map_or(payment.id.as_bytes(), |k| &k.as_bytes()[..]);
            if execution.is_some_and(Execution::is_recovery) {
                return match self.by_record(key).await {
                    Ok(Some(committed)) => Ok(committed),
                    Ok(None) => Err(server_error(
                        "recovery found no committed payment for a fenced key",
                    )),
                    Err(err) => Err(server_error(&err.to_string())),
                };
            }
            if !delay.is_zero() {
                tokio::time::sleep(delay).await;
            }
            let charged = async {
                let mut tx = self.pool.begin().await.map_err(StoreError::backend)?;
                if let Some(execution) = execution {
                    self.store.fence_in(&mut tx, execution).await?;
                }
                sqlx::query(
                    "INSERT INTO payments (id, record_key, amount, currency, description, status)
                     VALUES ($1, $2, $3, $4, $5, $6)",
                )
                .bind(&payment.id)
                .bind(key)
                .bind(payment.amount as i64)
                .bind(&payment.currency)
                .bind(&payment.description)
                .bind(&payment.status)
                .execute(&mut *tx)
                .await
                .map_err(StoreError::backend)?;
                tx.commit().await.map_err(StoreError::backend)
            };
            match charged.await {
                Ok(()) => Ok(payment),
                // Another attempt holds the key now: nothing was charged
                // here, and a retry gets that attempt's payment.
                Err(StoreError::LockLost) => {
                    let mut answer = (
                        StatusCode::CONFLICT,
                        [("retry-after", "1")],
                        "another attempt with this key holds it now; nothing was charged here",
                    )
                        .into_response();
                    answer
                        .extensions_mut()
                        .insert(tower_idempotency::NotExecuted);
                    Err(answer)
                }
                Err(err) => Err(server_error(&format!("payment not committed: {err}"))),
            }
        }

        async fn by_record(&self, key: &[u8]) -> Result<Option<Payment>, sqlx::Error> {
            sqlx::query(&format!(
                "SELECT {COLUMNS} FROM payments WHERE record_key = $1"
            ))
            .bind(key)
            .fetch_optional(&self.pool)
            .await?
            .map(|row| payment_of(&row))
            .transpose()
        }

        pub(super) async fn list(&self) -> Result<Vec<Payment>, String> {
            sqlx::query(&format!(
                "SELECT {COLUMNS} FROM payments ORDER BY created_at, id"
            ))
            .fetch_all(&self.pool)
            .await
            .and_then(|rows| rows.iter().map(payment_of).collect())
            .map_err(|e| e.to_string())
        }

        pub(super) async fn get(&self, id: &str) -> Result<Option<Payment>, String> {
            sqlx::query(&format!("SELECT {COLUMNS} FROM payments WHERE id = $1"))
                .bind(id)
                .fetch_optional(&self.pool)
                .await
                .and_then(|row| row.as_ref().map(payment_of).transpose())
                .map_err(|e| e.to_string())
        }
    }

    fn payment_of(row: &PgRow) -> Result<Payment, sqlx::Error> {
        Ok(Payment {
            id: row.try_get("id")?,
            amount: row.try_get::<i64, _>("amount")? as u64,
            currency: row.try_get("currency")?,
            description: row.try_get("description")?,
            status: row.try_get("status")?,
        })
    }
}

/// The API's OpenAPI document: its three operations, written out here,
/// and what the idempotency layer adds to the one it covers.
#[cfg(feature = "utoipa")]
mod openapi {
    use serde_json::json;
    use tower_idempotency::IdempotencyLayer;
    use utoipa::{
        openapi::{
            path::{HttpMethod, OperationBuilder, ParameterBuilder, ParameterIn, PathItem},
            request_body::RequestBodyBuilder,
            response::ResponseBuilder,
            schema::{ObjectBuilder, Type},
            ContentBuilder, InfoBuilder, OpenApi, OpenApiBuilder, PathsBuilder, Required,
        },
        Modify,
    };

    fn json_response(description: &str, example: serde_json::Value) -> ResponseBuilder {
        ResponseBuilder::new().description(description).content(
            "application/json",
            ContentBuilder::new().example(Some(example)).build(),
        )
    }

    pub(super) fn document(layer: Option<&IdempotencyLayer>) -> OpenApi {
        let payment =
            json!({"id": "pay_1", "amount": 1000, "currency": "EUR", "status": "succeeded"});
        let new_payment = ObjectBuilder::new()
            .schema_type(Type::Object)
            .property("amount", ObjectBuilder::new().schema_type(Type::Integer))
            .property("currency", ObjectBuilder::new().schema_type(Type::String))
            .property(
                "description",
                ObjectBuilder::new().schema_type(Type::String),
            )
            .required("amount")
            .required("currency");
        let create = OperationBuilder::new()
            .summary(Some("Charge a payment"))
            .request_body(Some(
                RequestBodyBuilder::new()
                    .content(
                        "application/json",
                        ContentBuilder::new().schema(Some(new_payment)).build(),
                    )
                    .required(Some(Required::True))
                    .build(),
            ))
            .response("201", json_response("The payment", payment.clone()));
        let list = OperationBuilder::new()
            .summary(Some("Every payment"))
            .response("200", json_response("The payments", json!([payment])));
        let show = OperationBuilder::new()
            .summary(Some("One payment"))
            .parameter(
                ParameterBuilder::new()
                    .name("id")
                    .parameter_in(ParameterIn::Path)
                    .required(Required::True)
                    .schema(Some(ObjectBuilder::new().schema_type(Type::String))),
            )
            .response("200", json_response("The payment", payment))
            .response("404", ResponseBuilder::new().description("No such payment"));
        let mut payments = PathItem::new(HttpMethod::Post, create);
        payments.get = Some(list.build());
        let mut document = OpenApiBuilder::new()
            .info(InfoBuilder::new().title("payments").version("1").build())
            .paths(
                PathsBuilder::new()
                    .path("/payments", payments)
                    .path("/payments/{id}", PathItem::new(HttpMethod::Get, show)),
            )
            .build();
        if let Some(layer) = layer {
            layer.openapi_docs().modify(&mut document);
        }
        document
    }
}

#[tokio::main]
async fn main() {
    let port: u16 = setting("PORT", 3000);
    let ttl = Duration::from_secs(setting("IDEMPOTENCY_TTL_SECS", 86_400));
    let lease = Duration::from_millis(setting("IDEMPOTENCY_LEASE_MS", 60_000));
    let (store, ledger) = match setup(&env::var("IDEMPOTENCY_STORE").unwrap_or_default()).await {
        Ok(setup) => setup,
        Err(message) => {
            eprintln!("{message}");
            std::process::exit(2);
        }
    };
    let app = App {
        ledger,
        delay: Duration::from_millis(setting("PAYMENT_DELAY_MS", 0)),
        after_commit: Duration::from_millis(setting("PAYMENT_AFTER_COMMIT_MS", 0)),
    };

    let body_fingerprint = match env::var("IDEMPOTENCY_FINGERPRINT").as_deref() {
        Ok("raw") => BodyFingerprint::Raw,
        Ok("json") | Err(_) => BodyFingerprint::canonical_json(),
        Ok(other) => {
            eprintln!("IDEMPOTENCY_FINGERPRINT must be `json` or `raw`, got {other:?}");
            std::process::exit(2);
        }
    };
    let layer_on = env::var("IDEMPOTENCY_LAYER").as_deref() != Ok("off");
    let layer = store.as_ref().filter(|_| layer_on).map(|store| {
        IdempotencyLayer::with_shared_store(Arc::clone(store))
            .with_key_required(true)
            // A client that re-serialises its payment (other key order
            // or spacing) still gets its replay, not a 422.
            .with_body_fingerprint(body_fingerprint)
            .with_expiry_header(IDEMPOTENCY_EXPIRES)
            .with_ttl(ttl)
            .with_lease(lease)
    });
    let mut create_route = post(create).get(list);
    if let Some(layer) = &layer {
        create_route = create_route.layer(layer.clone());
    }
    let router = Router::new()
        .route("/payments", create_route)
        .route("/payments/{id}", get(show));
    #[cfg(feature = "utoipa")]
    let router = {
        let document = openapi::document(layer.as_ref());
        router.route("/openapi.json", get(move || async move { Json(document) }))
    };
    let router = router.with_state(app);

    let listener = tokio::net::TcpListener::bind(("127.0.0.1", port))
        .await
        .unwrap_or_else(|e| panic!("cannot listen on 127.0.0.1:{port}: {e}"));
    let addr = listener.local_addr().expect("local address");
    let store_name = match (&store, &layer) {
        (Some(store), Some(_)) => format!("{store:?}"),
        (Some(store), None) => format!("{store:?}, but the layer is off"),
        (None, _) => "none (layer off)".to_owned(),
    };
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
