//! How long one `begin` on the memory store can take as the store grows,
//! and while a sweep runs beside it: the worst cases, not the mean, since
//! a shard that resizes or is swept under its lock stalls every request
//! that lands on it.
//!
//! `cargo bench --bench growth` inserts 4,000,000 records one by one and
//! prints, per million, the p99, p99.9 and largest time of one first use
//! (`begin` + `complete`); then the same while another thread sweeps the
//! whole store again and again.

use std::time::{Duration, Instant};

use bytes::Bytes;
use tower_idempotency::{
    key::{Fingerprint, RecordKey},
    store::{BeginOutcome, Completion, MemoryLimits, MemoryStore},
    Store,
};

const RECORDS: u64 = 4_000_000;
const STEP: u64 = 1_000_000;
const FP: Fingerprint = Fingerprint::from_bytes([3; 32]);

fn percentile(sorted: &[Duration], p: f64) -> Duration {
    sorted[((sorted.len() as f64 * p) as usize).min(sorted.len() - 1)]
}

async fn first_use(store: &MemoryStore, key: &RecordKey, record: &Bytes) -> Duration {
    let started = Instant::now();
    let Ok(BeginOutcome::Acquired(token)) = store.begin(key, &FP, Duration::from_secs(600)).await
    else {
        panic!("a fresh key is acquired");
    };
    store
        .complete(
            key,
            &FP,
            token,
            Completion::Response(record.clone()),
            Duration::from_secs(3600),
        )
        .await
        .unwrap();
    started.elapsed()
}

fn report(label: &str, times: &mut [Duration]) {
    times.sort_unstable();
    println!(
        "{label:<28} p99 {:>7.1} µs   p99.9 {:>7.1} µs   max {:>9.1} µs",
        percentile(times, 0.99).as_secs_f64() * 1e6,
        percentile(times, 0.999).as_secs_f64() * 1e6,
        times[times.len() - 1].as_secs_f64() * 1e6,
    );
}

fn main() {
    let runtime = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .unwrap();
    let store = MemoryStore::builder()
        .with_limits(
            MemoryLimits::new(RECORDS as usize * 2, usize::MAX)
                .with_max_entries_per_scope(RECORDS as usize * 2),
        )
        .build();
    let record = tower_idempotency::store::encode_parts(
        http::StatusCode::CREATED,
        &http::HeaderMap::new(),
        b"{\"id\":\"pay_1\"}",
        None,
    );
    let key = |i: u64| RecordKey::new(b"growth", &i.to_string());
    runtime.block_on(async {
        println!("first use while the store grows (one thread):");
        for step in 0..RECORDS / STEP {
            let mut times = Vec::with_capacity(STEP as usize);
            for i in step * STEP..(step + 1) * STEP {
                times.push(first_use(&store, &key(i), &record).await);
            }
            report(&format!("{} to {} M records", step, step + 1), &mut times);
        }
    });

    println!("first use while another thread sweeps the whole store:");
    let sweeper = {
        let store = store.clone();
        let stop = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(false));
        let running = std::sync::Arc::clone(&stop);
        let handle = std::thread::spawn(move || {
            let mut sweeps = 0;
            while !running.load(std::sync::atomic::Ordering::Relaxed) {
                store.sweep();
                sweeps += 1;
            }
            sweeps
        });
        (handle, stop)
    };
    runtime.block_on(async {
        let mut times = Vec::with_capacity(STEP as usize / 4);
        for i in RECORDS..RECORDS + STEP / 4 {
            times.push(first_use(&store, &key(i), &record).await);
        }
        report("beside a sweep", &mut times);
    });
    sweeper.1.store(true, std::sync::atomic::Ordering::Relaxed);
    let sweeps = sweeper.0.join().unwrap();
    println!("({sweeps} whole sweeps ran meanwhile)");
}
