//! `cargo run --example payments`, run as a process and driven over HTTP.

#[path = "common/process.rs"]
mod process;

use std::collections::HashSet;

use serde_json::{json, Value};

const KEY: &str = "8e03978e-40d5-43e8-bc93-6894a57f9324";

async fn create(
    client: &reqwest::Client,
    base: &str,
    key: Option<&str>,
    body: &Value,
) -> reqwest::Response {
    let mut request = client.post(format!("{base}/payments")).json(body);
    if let Some(key) = key {
        request = request.header("idempotency-key", key);
    }
    request.send().await.expect("POST /payments")
}

#[tokio::test]
async fn same_key_and_body_return_the_same_payment() {
    let server = process::start("payments", &[]);
    let client = reqwest::Client::new();
    let body = json!({"amount": 1000, "currency": "EUR", "description": "rent"});

    let first = create(&client, &server.base, Some(KEY), &body).await;
    assert_eq!(first.status(), 201);
    assert!(first.headers().get("idempotent-replayed").is_none());
    let first: Value = first.json().await.unwrap();

    let retry = create(&client, &server.base, Some(KEY), &body).await;
    assert_eq!(retry.status(), 201);
    assert_eq!(retry.headers()["idempotent-replayed"], "true");
    let retry: Value = retry.json().await.unwrap();
    assert_eq!(retry["id"], first["id"]);

    let listed: Vec<Value> = client
        .get(format!("{}/payments", server.base))
        .send()
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
    assert_eq!(listed, vec![first.clone()]);

    let one: Value = client
        .get(format!(
            "{}/payments/{}",
            server.base,
            first["id"].as_str().unwrap()
        ))
        .send()
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
    assert_eq!(one, first);
}

#[tokio::test]
async fn payment_without_a_key_is_refused() {
    let server = process::start("payments", &[]);
    let client = reqwest::Client::new();
    let response = create(
        &client,
        &server.base,
        None,
        &json!({"amount": 1, "currency": "EUR"}),
    )
    .await;
    assert_eq!(response.status(), 400);
    assert_eq!(
        response.headers()["content-type"],
        "application/problem+json"
    );
}

#[tokio::test]
async fn invalid_payments_get_400() {
    let server = process::start("payments", &[]);
    let client = reqwest::Client::new();
    for (i, body) in [
        json!({"amount": 0, "currency": "EUR"}),
        json!({"amount": -5, "currency": "EUR"}),
        json!({"amount": 5, "currency": "EURO"}),
        json!({"amount": 5}),
        json!("not an object"),
    ]
    .iter()
    .enumerate()
    {
        let response = create(&client, &server.base, Some(&format!("invalid-{i}")), body).await;
        assert_eq!(response.status(), 400, "{body}");
    }
}

#[tokio::test]
async fn reused_key_with_another_body_gets_422() {
    let server = process::start("payments", &[]);
    let client = reqwest::Client::new();
    create(
        &client,
        &server.base,
        Some(KEY),
        &json!({"amount": 1, "currency": "EUR"}),
    )
    .await;
    let response = create(
        &client,
        &server.base,
        Some(KEY),
        &json!({"amount": 2, "currency": "EUR"}),
    )
    .await;
    assert_eq!(response.status(), 422);
}

#[tokio::test]
async fn concurrent_duplicates_over_http_create_one_payment() {
    let server = process::start("payments", &[("PAYMENT_DELAY_MS", "200")]);
    let client = reqwest::Client::new();
    let body = json!({"amount": 42, "currency": "USD"});
    let tasks: Vec<_> = (0..32)
        .map(|_| {
            let (client, base, body) = (client.clone(), server.base.clone(), body.clone());
            tokio::spawn(async move {
                create(&client, &base, Some(KEY), &body)
                    .await
                    .status()
                    .as_u16()
            })
        })
        .collect();
    let mut statuses = Vec::new();
    for task in tasks {
        statuses.push(task.await.unwrap());
    }
    assert!(
        statuses.iter().all(|s| *s == 201 || *s == 409),
        "{statuses:?}"
    );
    assert_eq!(statuses.iter().filter(|s| **s == 201).count(), 1);

    let retry: Value = create(&client, &server.base, Some(KEY), &body)
        .await
        .json()
        .await
        .unwrap();
    let listed: Vec<Value> = client
        .get(format!("{}/payments", server.base))
        .send()
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
    assert_eq!(listed.len(), 1);
    assert_eq!(listed[0]["id"], retry["id"]);
}

#[tokio::test]
async fn distinct_keys_create_distinct_payments() {
    let server = process::start("payments", &[]);
    let client = reqwest::Client::new();
    let mut ids = HashSet::new();
    for i in 0..10 {
        let body = json!({"amount": 1, "currency": "EUR"});
        let payment: Value = create(&client, &server.base, Some(&format!("k{i}")), &body)
            .await
            .json()
            .await
            .unwrap();
        ids.insert(payment["id"].as_str().unwrap().to_owned());
    }
    assert_eq!(ids.len(), 10);
}
