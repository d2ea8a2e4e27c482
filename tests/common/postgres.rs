//! Fresh PostgreSQL databases on the test server, one per test that needs
//! tables of its own.
#![allow(dead_code, unreachable_pub)]

use std::sync::atomic::{AtomicUsize, Ordering};

/// The test server's URL (`TEST_DATABASE_URL`).
pub fn server_url() -> String {
    std::env::var("TEST_DATABASE_URL")
        .expect("TEST_DATABASE_URL is not set: run the tests with ./scripts/test")
}

/// Creates an empty database named after `purpose` and returns its URL.
pub async fn fresh_database(purpose: &str) -> String {
    static CREATED: AtomicUsize = AtomicUsize::new(0);
    let url = server_url();
    let name = format!(
        "{purpose}_{}_{}",
        std::process::id(),
        CREATED.fetch_add(1, Ordering::Relaxed)
    );
    let pool = sqlx::PgPool::connect(&url)
        .await
        .expect("connect to PostgreSQL");
    sqlx::raw_sql(&format!("CREATE DATABASE {name}"))
        .execute(&pool)
        .await
        .expect("create a test database");
    pool.close().await;
    let (server, _) = url.rsplit_once('/').expect("a database in the URL");
    format!("{server}/{name}")
}
