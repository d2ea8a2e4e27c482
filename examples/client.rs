//! Charges payments on the payments example through the client layer: each
//! payment gets a fresh `Idempotency-Key`, kept across every retry, so a
//! retry after a lost response or a 409 is answered from the stored
//! response instead of charging again.
//!
//! ```sh
//! cargo run --example payments &
//! cargo run --example client --features client -- 3
//! ```
//!
//! `PAYMENTS_URL` names the server (default `http://127.0.0.1:3000`); the
//! argument is how many payments to make (default 1).

use std::time::Duration;

use bytes::Bytes;
use http::Request;
use http_body_util::{BodyExt, Full};
use hyper_util::{client::legacy::Client, rt::TokioExecutor};
use tower::{retry::RetryLayer, ServiceBuilder, ServiceExt};
use tower_idempotency::client::{RetryPolicy, SetIdempotencyKeyLayer};

#[tokio::main]
async fn main() -> Result<(), tower_idempotency::BoxError> {
    let base = std::env::var("PAYMENTS_URL").unwrap_or_else(|_| "http://127.0.0.1:3000".into());
    let count: usize = std::env::args().nth(1).map_or(Ok(1), |n| n.parse())?;

    let client = ServiceBuilder::new()
        .layer(SetIdempotencyKeyLayer::new())
        .layer(RetryLayer::new(
            RetryPolicy::new()
                .with_max_retries(5)
                .with_backoff(Duration::from_millis(100)),
        ))
        .service(Client::builder(TokioExecutor::new()).build_http::<Full<Bytes>>());

    for n in 1..=count {
        let body = format!(r#"{{"amount": {}, "currency": "EUR"}}"#, n * 100);
        let request = Request::post(format!("{base}/payments"))
            .header("content-type", "application/json")
            .body(Full::new(Bytes::from(body)))?;
        let response = client.clone().oneshot(request).await?;
        let status = response.status();
        let replayed = response.headers().contains_key("idempotent-replayed");
        let body = response.into_body().collect().await?.to_bytes();
        println!(
            "payment {n}: {status}{} {}",
            if replayed { " (replayed)" } else { "" },
            String::from_utf8_lossy(&body)
        );
    }
    Ok(())
}
