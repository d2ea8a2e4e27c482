//! A handler's fence inside its own PostgreSQL transaction
//! (`PostgresStore::fence_in`), against a real server: while that
//! transaction is open, the record's row is locked, and retries of the key
//! must still be answered at once.
#![cfg(feature = "postgres")]

mod common;
#[path = "common/postgres.rs"]
mod postgres;

use std::{convert::Infallible, sync::Arc, time::Duration};

use bytes::Bytes;
use common::{post, unique_key};
use http::{Request, Response, StatusCode};
use http_body_util::Full;
use tokio::sync::{oneshot, Mutex};
use tower::{Layer, ServiceExt};
use tower_idempotency::{body::RequestBody, store::PostgresStore, Execution, IdempotencyLayer};

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
