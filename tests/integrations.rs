//! The hyper, axum per-route and tonic examples, run as processes and
//! exercised the way their users would.

#[path = "common/process.rs"]
mod process;

use std::process::Command;

#[tokio::test]
async fn hyper_example_replays_a_retried_order() {
    let server = process::start("hyper", &[]);
    let client = reqwest::Client::new();
    let order = || {
        client
            .post(format!("{}/orders", server.base))
            .header("idempotency-key", "order-1")
            .body("two coffees")
            .send()
    };
    let first = order().await.unwrap();
    assert_eq!(first.status(), 201);
    assert!(first.headers().get("idempotent-replayed").is_none());
    let first = first.text().await.unwrap();
    assert_eq!(first, "order 1: two coffees\n");

    let retry = order().await.unwrap();
    assert_eq!(retry.headers()["idempotent-replayed"], "true");
    assert_eq!(retry.text().await.unwrap(), first);

    let other = client
        .post(format!("{}/orders", server.base))
        .header("idempotency-key", "order-2")
        .body("one tea")
        .send()
        .await
        .unwrap();
    assert_eq!(other.text().await.unwrap(), "order 2: one tea\n");
}

#[tokio::test]
async fn axum_example_protects_only_the_routes_that_carry_the_layer() {
    let server = process::start("axum_routes", &[]);
    let client = reqwest::Client::new();
    let send = |path: &str| {
        client
            .post(format!("{}{path}", server.base))
            .header("idempotency-key", "k-1")
            .json(&serde_json::json!({"amount": 5}))
            .send()
    };
    let first = send("/transfers").await.unwrap();
    assert_eq!(first.status(), 201);
    let first = first.text().await.unwrap();
    let retry = send("/transfers").await.unwrap();
    assert_eq!(retry.headers()["idempotent-replayed"], "true");
    assert_eq!(retry.text().await.unwrap(), first);

    for _ in 0..2 {
        let search = send("/search").await.unwrap();
        assert_eq!(search.status(), 200);
        assert!(search.headers().get("idempotent-replayed").is_none());
    }

    let without_key = client
        .post(format!("{}/transfers", server.base))
        .json(&serde_json::json!({"amount": 5}))
        .send()
        .await
        .unwrap();
    assert_eq!(without_key.status(), 400);

    // The same key from two API clients names two transfers.
    let as_client = |api_key: &'static str| {
        client
            .post(format!("{}/transfers", server.base))
            .header("idempotency-key", "shared-key")
            .header("x-api-key", api_key)
            .json(&serde_json::json!({"amount": 5}))
            .send()
    };
    let alice = as_client("alice").await.unwrap();
    assert_eq!(alice.status(), 201);
    let bob = as_client("bob").await.unwrap();
    assert_eq!(bob.status(), 201);
    assert!(bob.headers().get("idempotent-replayed").is_none());
    let alice_again = as_client("alice").await.unwrap();
    assert_eq!(alice_again.headers()["idempotent-replayed"], "true");
}

fn grpc_charge(addr: &str, key: &str, amount: u64) -> String {
    let output = Command::new(process::example_path("grpc"))
        .args(["charge", addr, key, &amount.to_string()])
        .output()
        .expect("run the gRPC client");
    assert!(
        output.status.success(),
        "{}",
        String::from_utf8_lossy(&output.stderr)
    );
    String::from_utf8(output.stdout).unwrap().trim().to_owned()
}

#[tokio::test]
async fn grpc_example_replays_the_same_message_for_a_retried_call() {
    let server = process::start("grpc", &[]);
    let addr = server.base.clone();
    let (first, retry, other) = tokio::task::spawn_blocking(move || {
        (
            grpc_charge(&addr, "charge-1", 1500),
            grpc_charge(&addr, "charge-1", 1500),
            grpc_charge(&addr, "charge-2", 900),
        )
    })
    .await
    .unwrap();
    assert_eq!(first, "id=ch_1 amount=1500 replayed=false");
    assert_eq!(retry, "id=ch_1 amount=1500 replayed=true");
    assert_eq!(other, "id=ch_2 amount=900 replayed=false");
}

#[tokio::test]
async fn grpc_example_refuses_a_reused_key_with_another_message() {
    let server = process::start("grpc", &[]);
    let addr = server.base.clone();
    let (first, reused) = tokio::task::spawn_blocking(move || {
        (
            grpc_charge(&addr, "charge-9", 100),
            grpc_charge(&addr, "charge-9", 200),
        )
    })
    .await
    .unwrap();
    assert_eq!(first, "id=ch_1 amount=100 replayed=false");
    assert!(reused.starts_with("status="), "{reused}");
}
