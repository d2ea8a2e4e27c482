//! The layer in front of a plain hyper 1.x server, through hyper-util's
//! tower adapter.
//!
//! ```sh
//! cargo run --example hyper
//! curl -i -X POST localhost:3001/orders -H 'Idempotency-Key: order-1' -d 'two coffees'
//! ```

use std::{
    convert::Infallible,
    sync::{
        atomic::{AtomicU64, Ordering},
        Arc,
    },
};

use bytes::Bytes;
use http::{Request, Response, StatusCode};
use http_body_util::{BodyExt, Full};
use hyper::body::Incoming;
use hyper_util::{rt::TokioIo, service::TowerToHyperService};
use tower::ServiceBuilder;
use tower_idempotency::{body::RequestBody, IdempotencyLayer};

async fn place_order(
    orders: Arc<AtomicU64>,
    req: Request<RequestBody<Incoming>>,
) -> Result<Response<Full<Bytes>>, Infallible> {
    let items = match req.into_body().collect().await {
        Ok(body) => body.to_bytes(),
        Err(_) => {
            return Ok(Response::builder()
                .status(StatusCode::BAD_REQUEST)
                .body(Full::default())
                .unwrap())
        }
    };
    let number = orders.fetch_add(1, Ordering::SeqCst) + 1;
    let reply = format!("order {number}: {}\n", String::from_utf8_lossy(&items));
    Ok(Response::builder()
        .status(StatusCode::CREATED)
        .header("content-type", "text/plain")
        .body(Full::new(Bytes::from(reply)))
        .unwrap())
}

#[tokio::main]
async fn main() -> std::io::Result<()> {
    let port: u16 = std::env::var("PORT")
        .ok()
        .and_then(|p| p.parse().ok())
        .unwrap_or(3001);
    let listener = tokio::net::TcpListener::bind(("127.0.0.1", port)).await?;
    println!(
        "hyper orders server listening on http://{}",
        listener.local_addr()?
    );

    let orders = Arc::new(AtomicU64::new(0));
    let service = ServiceBuilder::new()
        .layer(IdempotencyLayer::default())
        .service_fn(move |req| place_order(Arc::clone(&orders), req));

    loop {
        let (stream, _) = listener.accept().await?;
        let service = TowerToHyperService::new(service.clone());
        tokio::spawn(async move {
            if let Err(err) = hyper::server::conn::http1::Builder::new()
                .serve_connection(TokioIo::new(stream), service)
                .await
            {
                eprintln!("connection error: {err}");
            }
        });
    }
}
