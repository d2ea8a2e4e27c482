//! A handler's fence inside its own PostgreSQL transaction
//! (`PostgresStore::fence_in`), against a real server: while that
//! transaction is open, the record's row is locked. Retries of the key must
//! still be answered at once, and a retry that takes over a lease lapsed
//! meanwhile must learn how that transaction ended: a recovery if it
//! committed, a fresh run if it rolled back, never a second charge.
#![cfg(feature = "postgres")]

mod common;
#[path = "common/postgres.rs"]
mod postgres;

use std::{convert::Infallible, sync::Arc, time::Duration};

use bytes::Bytes;
use common::{post, read, unique_key};
use http::{Request, Response, StatusCode};
use http_body_util::Full;
use tokio::sync::{oneshot, Mutex};
use tower::{util::BoxCloneSyncService, Layer, ServiceExt};
use tower_idempotency::{
    body::{RequestBody, ResponseBody},
    store::PostgresStore,
    Execution, IdempotencyLayer,
};

/// A retry that arrives while the holder has fenced its key and not yet
/// committed gets 409 while that transaction is still open: it reads the
/// record without waiting on the row's lock, so duplicates cannot pile up
/// on the pool behind a slow effect.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_retry_is_answered_while_the_holders_fencing_transaction_is_open() {
    let pool = sqlx::PgPool::connect(&postgres::server_url())
        .await
        .unwrap();
    let store = PostgresStore::new(pool.clone())
        .with_table("fence_in_records")
        .unwrap();
    store.migrate().await.unwrap();
    let (fenced_tx, fenced) = oneshot::channel::<()>();
    let (commit_tx, commit) = oneshot::channel::<()>();
    let signals = Arc::new(Mutex::new(Some((fenced_tx, commit))));
    let handler_store = store.clone();
    let svc = IdempotencyLayer::new(store).layer(tower::service_fn(
        move |request: Request<RequestBody<Full<Bytes>>>| {
            let (pool, store, signals) =
                (pool.clone(), handler_store.clone(), Arc::clone(&signals));
            async move {
                let execution = request.extensions().get::<Execution>().unwrap().clone();
                let (fenced, commit) = signals.lock().await.take().expect("one run");
                let mut tx = pool.begin().await.unwrap();
                store.fence_in(&mut tx, &execution).await.unwrap();
                fenced.send(()).unwrap();
                commit.await.unwrap();
                tx.commit().await.unwrap();
                let mut response = Response::new(Full::new(Bytes::from_static(b"{}")));
                *response.status_mut() = StatusCode::CREATED;
                Ok::<_, Infallible>(response)
            }
        },
    ));
    let key = unique_key("fence-in");
    let request = || post("/payments", Some(&key), "{\"amount\":1}");
    let first = tokio::spawn(svc.clone().oneshot(request()));
    fenced.await.unwrap();
    let retry = tokio::time::timeout(Duration::from_secs(10), svc.clone().oneshot(request()))
        .await
        .expect("the retry waited on the open transaction")
        .unwrap();
    assert_eq!(retry.status(), StatusCode::CONFLICT);
    commit_tx.send(()).unwrap();
    let first = first.await.unwrap().unwrap();
    assert_eq!(first.status(), StatusCode::CREATED);
}

type Payments =
    BoxCloneSyncService<Request<Full<Bytes>>, Response<ResponseBody<Full<Bytes>>>, Infallible>;

/// What the first run's fencing transaction does once the test lets it go.
#[derive(Clone, Copy, Debug)]
enum End {
    Commit,
    RollBack,
}

/// A payment handler that fences its key in the transaction that records
/// the charge, and renders the recorded charge on a recovery. The first
/// run says when it has fenced and holds its transaction open until told
/// how to end it; later runs go straight through.
fn payments(
    store: &PostgresStore,
    pool: &sqlx::PgPool,
) -> (Payments, oneshot::Receiver<()>, oneshot::Sender<End>) {
    let (fenced_tx, fenced) = oneshot::channel::<()>();
    let (end_tx, end) = oneshot::channel::<End>();
    let first_run = Arc::new(Mutex::new(Some((fenced_tx, end))));
    let (store, pool) = (store.clone(), pool.clone());
    let layer = IdempotencyLayer::new(store.clone())
        .with_lease(LEASE)
        // Never renewed: the first run's lease lapses while it stalls.
        .with_max_hold(Duration::ZERO);
    let svc = layer.layer(tower::service_fn(
        move |request: Request<RequestBody<Full<Bytes>>>| {
            let (pool, store, first_run) = (pool.clone(), store.clone(), Arc::clone(&first_run));
            async move {
                let execution = request.extensions().get::<Execution>().unwrap().clone();
                let key = execution.record_key().as_bytes().to_vec();
                if execution.is_recovery() {
                    let charges: i64 =
                        sqlx::query_scalar("SELECT count(*) FROM charges WHERE record_key = $1")
                            .bind(&key)
                            .fetch_one(&pool)
                            .await
                            .unwrap();
                    return Ok::<_, Infallible>(answer(StatusCode::OK, charges));
                }
                let first_run = first_run.lock().await.take();
                let mut tx = pool.begin().await.unwrap();
                if store.fence_in(&mut tx, &execution).await.is_err() {
                    return Ok(answer(StatusCode::CONFLICT, 0));
                }
                sqlx::query("INSERT INTO charges (record_key) VALUES ($1)")
                    .bind(&key)
                    .execute(&mut *tx)
                    .await
                    .unwrap();
                let end = match first_run {
                    Some((fenced, end)) => {
                        fenced.send(()).unwrap();
                        end.await.unwrap()
                    }
                    None => End::Commit,
                };
                match end {
                    End::Commit => tx.commit().await.unwrap(),
                    End::RollBack => {
                        tx.rollback().await.unwrap();
                        return Ok(answer(StatusCode::SERVICE_UNAVAILABLE, 0));
                    }
                }
                Ok(answer(StatusCode::CREATED, 1))
            }
        },
    ));
    (BoxCloneSyncService::new(svc), fenced, end_tx)
}

const LEASE: Duration = Duration::from_millis(100);

fn answer(status: StatusCode, charges: i64) -> Response<Full<Bytes>> {
    let mut response = Response::new(Full::new(Bytes::from(format!("{{\"charges\":{charges}}}"))));
    *response.status_mut() = status;
    response
}

/// A store on a table of its own, and the charges table its handler writes.
async fn store_and_charges(table: &str) -> (PostgresStore, sqlx::PgPool) {
    let pool = sqlx::PgPool::connect(&postgres::fresh_database(table).await)
        .await
        .unwrap();
    let store = PostgresStore::new(pool.clone()).with_table(table).unwrap();
    store.migrate().await.unwrap();
    sqlx::raw_sql("CREATE TABLE charges (record_key BYTEA NOT NULL)")
        .execute(&pool)
        .await
        .unwrap();
    (store, pool)
}

/// Waits until a statement on `table` waits for a row lock.
async fn until_a_statement_waits_on(pool: &sqlx::PgPool, table: &str) {
    for _ in 0..1000 {
        let waiting: i64 = sqlx::query_scalar(
            "SELECT count(*) FROM pg_stat_activity
             WHERE datname = current_database() AND wait_event_type = 'Lock'
               AND query LIKE '%' || $1 || '%'",
        )
        .bind(table)
        .fetch_one(pool)
        .await
        .unwrap();
        if waiting > 0 {
            return;
        }
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    panic!("no statement on {table} waited for a row lock");
}

async fn charges_for(pool: &sqlx::PgPool) -> i64 {
    sqlx::query_scalar("SELECT count(*) FROM charges")
        .fetch_one(pool)
        .await
        .unwrap()
}

/// What each request of a takeover came to, and what was charged.
struct Takeover {
    first: StatusCode,
    retry: (http::response::Parts, Bytes),
    replay: (http::response::Parts, Bytes),
    charges: i64,
}

/// The holder fences, then stalls past its lease with its transaction
/// open; a retry takes the key over and waits on the row until the
/// holder's transaction ends as `end` says; then one more retry.
async fn takeover_of_a_stalled_fence(table: &str, end: End) -> Takeover {
    let (store, pool) = store_and_charges(table).await;
    let (svc, fenced, end_tx) = payments(&store, &pool);
    let key = unique_key(table);
    let request = || post("/payments", Some(&key), "{\"amount\":1}");
    let first = tokio::spawn(svc.clone().oneshot(request()));
    fenced.await.unwrap();
    tokio::time::sleep(LEASE * 3).await;
    let retry = tokio::spawn(svc.clone().oneshot(request()));
    until_a_statement_waits_on(&pool, table).await;
    end_tx.send(end).unwrap();
    let retry = read(retry.await.unwrap().unwrap()).await;
    let first = first.await.unwrap().unwrap().status();
    let replay = read(svc.oneshot(request()).await.unwrap()).await;
    Takeover {
        first,
        retry,
        replay,
        charges: charges_for(&pool).await,
    }
}

/// Once the stalled holder commits, the retry is a recovery: it renders
/// the one charge and charges nothing, and later retries replay that.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_takeover_waiting_on_the_holders_fencing_transaction_recovers_once_it_commits() {
    let takeover = takeover_of_a_stalled_fence("takeover_commit", End::Commit).await;
    assert_eq!(takeover.first, StatusCode::CREATED);
    let (retry, body) = takeover.retry;
    assert_eq!(
        (retry.status, &body[..]),
        (StatusCode::OK, &b"{\"charges\":1}"[..])
    );
    let (replay, body) = takeover.replay;
    assert_eq!(replay.headers["idempotent-replayed"], "true");
    assert_eq!(
        (replay.status, &body[..]),
        (StatusCode::OK, &b"{\"charges\":1}"[..])
    );
    assert_eq!(takeover.charges, 1);
}

/// If the stalled holder's transaction rolls back instead, nothing was
/// charged: the waiting retry runs the request afresh and charges once.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_takeover_waiting_on_the_holders_fencing_transaction_runs_afresh_once_it_rolls_back() {
    let takeover = takeover_of_a_stalled_fence("takeover_rollback", End::RollBack).await;
    assert_eq!(takeover.first, StatusCode::SERVICE_UNAVAILABLE);
    assert_eq!(takeover.retry.0.status, StatusCode::CREATED);
    let replay = takeover.replay.0;
    assert_eq!(replay.headers["idempotent-replayed"], "true");
    assert_eq!(replay.status, StatusCode::CREATED);
    assert_eq!(takeover.charges, 1);
}

/// How long the leases of the two tests below are, and how long the row
/// stays locked past the end of the first one.
const ROW_LEASE: Duration = Duration::from_millis(2_000);

/// A key taken with a lease of [`ROW_LEASE`], its row locked by another
/// transaction until that lease has run out, and `step` (a store call on
/// the key) sent meanwhile, to wait on the row for longer than a lease
/// before the lock goes. Returns what a `begin` of the same key finds the
/// moment `step` is done.
async fn begin_after_a_step_that_waited_on_the_row<F, Step>(table: &str, step: F) -> String
where
    F: FnOnce(
        PostgresStore,
        tower_idempotency::key::RecordKey,
        tower_idempotency::store::LockToken,
    ) -> Step,
    Step: std::future::Future<Output = ()> + Send + 'static,
{
    use tower_idempotency::{
        key::{Fingerprint, RecordKey},
        store::BeginOutcome,
        Store,
    };
    let (store, pool) = store_and_charges(table).await;
    let (key, fingerprint) = (
        RecordKey::new(b"", &unique_key(table)),
        Fingerprint::from_bytes([9; 32]),
    );
    let Ok(BeginOutcome::Acquired(token)) = store.begin(&key, &fingerprint, ROW_LEASE).await else {
        panic!("a fresh key is acquired");
    };
    let mut holder = pool.begin().await.unwrap();
    sqlx::query(&format!("SELECT 1 FROM {table} WHERE key = $1 FOR UPDATE"))
        .bind(&key.as_bytes()[..])
        .execute(&mut *holder)
        .await
        .unwrap();
    tokio::time::sleep(ROW_LEASE + Duration::from_millis(200)).await;
    let step = tokio::spawn(step(store.clone(), key, token));
    until_a_statement_waits_on(&pool, table).await;
    tokio::time::sleep(ROW_LEASE + Duration::from_millis(200)).await;
    holder.rollback().await.unwrap();
    step.await.unwrap();
    format!("{:?}", store.begin(&key, &fingerprint, ROW_LEASE).await)
}

/// A takeover of a lapsed lease that waited on the row's lock for longer
/// than a lease gets a whole lease from when it took the row, not from
/// when its statement began: the next request finds the key in flight
/// rather than free to take again.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_takeover_that_waited_on_the_row_past_a_lease_gets_a_whole_lease() {
    use tower_idempotency::{key::Fingerprint, store::BeginOutcome, Store};
    let next =
        begin_after_a_step_that_waited_on_the_row("takeover_lease", |store, key, _| async move {
            let taken = store
                .begin(&key, &Fingerprint::from_bytes([9; 32]), ROW_LEASE)
                .await;
            assert!(matches!(taken, Ok(BeginOutcome::Acquired(_))), "{taken:?}");
        })
        .await;
    assert_eq!(next, "Ok(InFlight)");
}

/// The same for a renewal that waited on the row's lock: the lease runs
/// from when the row is renewed.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_renewal_that_waited_on_the_row_past_a_lease_gets_a_whole_lease() {
    use tower_idempotency::Store;
    let next = begin_after_a_step_that_waited_on_the_row(
        "renewal_lease",
        |store, key, token| async move {
            store.renew(&key, token, ROW_LEASE).await.unwrap();
        },
    )
    .await;
    assert_eq!(next, "Ok(InFlight)");
}
