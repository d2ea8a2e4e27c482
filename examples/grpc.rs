//! A gRPC service behind the layer, on tonic. The key travels as
//! `idempotency-key` metadata (an HTTP/2 header), so the layer sees it like
//! any other request header.
//!
//! For a unary gRPC call the fingerprint covers the method path
//! (`/payments.Payments/Charge`), the length-prefixed protobuf message (the
//! request body), and `content-type` (`application/grpc`). gRPC statuses
//! travel in trailers, which the layer stores and replays with the message.
//!
//! ```sh
//! cargo run --example grpc                      # serves on 127.0.0.1:50051
//! cargo run --example grpc -- charge http://127.0.0.1:50051 key-1 1500
//! ```

use std::{
    convert::Infallible,
    sync::{
        atomic::{AtomicU64, Ordering},
        Arc,
    },
    task::{Context, Poll},
};

use http::uri::PathAndQuery;
use tonic::{body::Body, codegen::BoxFuture, server::NamedService, Request, Response, Status};
use tonic_prost::ProstCodec;
use tower_idempotency::IdempotencyLayer;

#[path = "common/payments_proto.rs"]
mod proto;

use proto::{ChargeReply, ChargeRequest, CHARGE};

/// The `payments.Payments` service, written out as tonic's code generator
/// would, so the example needs no `protoc`.
#[derive(Clone, Default)]
struct Payments {
    charges: Arc<AtomicU64>,
}

impl NamedService for Payments {
    const NAME: &'static str = "payments.Payments";
}

impl tonic::server::UnaryService<ChargeRequest> for Payments {
    type Response = ChargeReply;
    type Future = BoxFuture<Response<ChargeReply>, Status>;

    fn call(&mut self, request: Request<ChargeRequest>) -> Self::Future {
        let charges = Arc::clone(&self.charges);
        Box::pin(async move {
            let request = request.into_inner();
            if request.amount == 0 {
                return Err(Status::invalid_argument("amount must be positive"));
            }
            let n = charges.fetch_add(1, Ordering::SeqCst) + 1;
            Ok(Response::new(ChargeReply {
                id: format!("ch_{n}"),
                amount: request.amount,
            }))
        })
    }
}

impl tower::Service<http::Request<Body>> for Payments {
    type Response = http::Response<Body>;
    type Error = Infallible;
    type Future = BoxFuture<Self::Response, Infallible>;

    fn poll_ready(&mut self, _: &mut Context<'_>) -> Poll<Result<(), Infallible>> {
        Poll::Ready(Ok(()))
    }

    fn call(&mut self, request: http::Request<Body>) -> Self::Future {
        let service = self.clone();
        Box::pin(async move {
            if request.uri().path() != CHARGE {
                return Ok(Status::unimplemented("no such method").into_http());
            }
            let mut grpc =
                tonic::server::Grpc::new(ProstCodec::<ChargeReply, ChargeRequest>::default());
            Ok(grpc.unary(service, request).await)
        })
    }
}

async fn serve() -> Result<(), Box<dyn std::error::Error>> {
    let port: u16 = std::env::var("PORT")
        .ok()
        .and_then(|p| p.parse().ok())
        .unwrap_or(50051);
    let listener = tokio::net::TcpListener::bind(("127.0.0.1", port)).await?;
    println!(
        "gRPC payments listening on http://{}",
        listener.local_addr()?
    );
    tonic::transport::Server::builder()
        .layer(IdempotencyLayer::default())
        .add_service(Payments::default())
        .serve_with_incoming(tonic::transport::server::TcpIncoming::from(listener))
        .await?;
    Ok(())
}

async fn charge(addr: String, key: String, amount: u64) -> Result<(), Box<dyn std::error::Error>> {
    let channel = tonic::transport::Channel::from_shared(addr)?
        .connect()
        .await?;
    let mut client = tonic::client::Grpc::new(channel);
    let mut request = Request::new(ChargeRequest {
        amount,
        currency: "EUR".to_owned(),
    });
    request
        .metadata_mut()
        .insert("idempotency-key", key.parse()?);
    client.ready().await?;
    let codec = ProstCodec::<ChargeRequest, ChargeReply>::default();
    match client
        .unary(request, PathAndQuery::from_static(CHARGE), codec)
        .await
    {
        Ok(response) => {
            let replayed = response.metadata().get("idempotent-replayed").is_some();
            let reply = response.into_inner();
            println!(
                "id={} amount={} replayed={replayed}",
                reply.id, reply.amount
            );
        }
        Err(status) => println!("status={:?} message={}", status.code(), status.message()),
    }
    Ok(())
}

#[tokio::main]
async fn main() -> Result<(), Box<dyn std::error::Error>> {
    let args: Vec<String> = std::env::args().skip(1).collect();
    match args.as_slice() {
        [] => serve().await,
        [cmd, addr, key, amount] if cmd == "charge" => {
            charge(addr.clone(), key.clone(), amount.parse()?).await
        }
        _ => Err("usage: grpc [charge ADDR KEY AMOUNT]".into()),
    }
}
