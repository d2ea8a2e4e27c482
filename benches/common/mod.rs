//! The handler, requests and store steps the benches share.
#![allow(dead_code, unreachable_pub)]

#[cfg(feature = "postgres")]
pub mod raw_postgres;
#[cfg(feature = "redis")]
pub mod raw_redis;
pub mod store_steps;

use std::convert::Infallible;

use bytes::Bytes;
use http::{Request, Response, StatusCode};
use http_body_util::{BodyExt, Full};

/// The handler every variant wraps: reads the body, answers a small JSON.
pub async fn handler<B>(req: Request<B>) -> Result<Response<Full<Bytes>>, Infallible>
where
    B: http_body::Body,
    B::Error: std::fmt::Debug,
{
    let body = req.into_body().collect().await.expect("body").to_bytes();
    let reply = format!("{{\"id\":\"pay_1\",\"received\":{}}}", body.len());
    Ok(Response::builder()
        .status(StatusCode::CREATED)
        .header("content-type", "application/json")
        .body(Full::new(Bytes::from(reply)))
        .expect("response"))
}

/// A POST to `/payments` with `body` and, if given, a key.
pub fn request(key: Option<&str>, body: &Bytes) -> Request<Full<Bytes>> {
    let mut builder = Request::post("/payments").header("content-type", "application/json");
    if let Some(key) = key {
        builder = builder.header("idempotency-key", key);
    }
    builder.body(Full::new(body.clone())).expect("request")
}

/// A POST to `/payments` with `body` and the key `n`. Every row of a bench
/// that compares paths builds its requests this way, the baseline's too,
/// so that what is timed beyond the baseline is the layer's own work.
pub fn keyed(n: u64, body: &Bytes) -> Request<Full<Bytes>> {
    let mut req = request(None, body);
    req.headers_mut()
        .insert("idempotency-key", http::HeaderValue::from(n));
    req
}

/// Reads a response body to its end, as a server would.
pub async fn drain<B: http_body::Body>(response: Response<B>)
where
    B::Error: std::fmt::Debug,
{
    response.into_body().collect().await.expect("response body");
}
