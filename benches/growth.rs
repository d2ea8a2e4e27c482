//! How long one `begin` on the memory store can take as the store grows,
//! and while a sweep runs beside it: the worst cases, not the mean, since
//! a shard that resizes or is swept under its lock stalls every request
//! that lands on it.
//!
//! `cargo bench --bench growth` inserts 4,000,000 records one by one and
//! prints, per million, the p99, p99.9 and largest time of one first use
//! (`begin` + `complete`), and of the replays another thread makes
//! meanwhile of 10,000 keys stored before: a first use that grows its
//! shard's table pays for the growth itself, and a replay waits on a
//! shard's lock only when it lands on one another request holds. Then the
//! first uses again while another thread sweeps the whole store again and
//! again.

use std::{
    sync::{
        atomic::{AtomicBool, AtomicU64, Ordering},
        Arc,
    },
    time::{Duration, Instant},
};

use bytes::Bytes;
use tower_idempotency::{
    key::{Fingerprint, RecordKey},
    store::{BeginOutcome, Completion, MemoryLimits, MemoryStore},
    Store,
};

const RECORDS: u64 = 4_000_000;
const REPLAYED: u64 = 10_000;
const STEP: u64 = 1_000_000;
const FP: Fingerprint = Fingerprint::from_bytes([3; 32]);

fn percentile(sorted: &[Duration], p: f64) -> Duration {
    sorted[((sorted.len() as f64 * p) as usize).min(sorted.len() - 1)]
}

/// Stores a copy of `record` of its own, made before the clock starts: one
/// shared handle would make every store and replay count on a single
/// atomic, a cache line both threads fight over outside any shard's lock.
async fn first_use(store: &MemoryStore, key: &RecordKey, record: &Bytes) -> Duration {
    let record = Bytes::copy_from_slice(record);
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
            Completion::Response(record),
            Duration::from_secs(3600),
        )
        .await
        .unwrap();
    started.elapsed()
}

fn report(label: &str, times: &mut [Duration]) {
    if times.is_empty() {
        println!("{label:<28} none");
        return;
    }
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
    let replayed = |i: u64| RecordKey::new(b"replayed", &i.to_string());
    runtime.block_on(async {
        for i in 0..REPLAYED {
            first_use(&store, &replayed(i), &record).await;
        }
    });
    let grown = Arc::new(AtomicU64::new(0));
    let done = Arc::new(AtomicBool::new(false));
    let replayer = {
        let (store, grown, done) = (store.clone(), Arc::clone(&grown), Arc::clone(&done));
        std::thread::spawn(move || {
            let runtime = tokio::runtime::Builder::new_current_thread()
                .enable_all()
                .build()
                .unwrap();
            let keys: Vec<RecordKey> = (0..REPLAYED).map(replayed).collect();
            // Every window's times written once before the clock starts:
            // a vector that grew, or wrote its first byte to a fresh page,
            // would stall the replays it times on the kernel.
            let mut times: Vec<(Vec<Duration>, usize)> = (0..RECORDS / STEP)
                .map(|_| (vec![Duration::ZERO; 4 * STEP as usize], 0))
                .collect();
            runtime.block_on(async {
                for key in keys.iter().cycle() {
                    if done.load(Ordering::Relaxed) {
                        break;
                    }
                    let window = (grown.load(Ordering::Relaxed) / STEP) as usize;
                    let started = Instant::now();
                    let outcome = store.begin(key, &FP, Duration::from_secs(600)).await;
                    let took = started.elapsed();
                    assert!(matches!(outcome, Ok(BeginOutcome::Completed(_))));
                    if let Some((window, len)) = times.get_mut(window) {
                        if let Some(slot) = window.get_mut(*len) {
                            *slot = took;
                            *len += 1;
                        }
                    }
                }
            });
            times
                .into_iter()
                .map(|(mut window, len)| {
                    window.truncate(len);
                    window
                })
                .collect::<Vec<_>>()
        })
    };
    let mut first_uses = Vec::new();
    runtime.block_on(async {
        for step in 0..RECORDS / STEP {
            let mut times = Vec::with_capacity(STEP as usize);
            for i in step * STEP..(step + 1) * STEP {
                times.push(first_use(&store, &key(i), &record).await);
                grown.store(i + 1, Ordering::Relaxed);
            }
            first_uses.push(times);
        }
    });
    done.store(true, Ordering::Relaxed);
    let replays = replayer.join().unwrap();
    println!("first use while the store grows, and replays of other keys beside it:");
    for (step, (mut firsts, mut replays)) in first_uses.into_iter().zip(replays).enumerate() {
        report(&format!("{} to {} M records", step, step + 1), &mut firsts);
        report(
            &format!("  replays beside them ({})", replays.len()),
            &mut replays,
        );
    }

    println!("first use while another thread sweeps the whole store:");
    let sweeper = {
        let store = store.clone();
        let stop = Arc::new(AtomicBool::new(false));
        let running = Arc::clone(&stop);
        let handle = std::thread::spawn(move || {
            let mut sweeps = 0;
            while !running.load(Ordering::Relaxed) {
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
    sweeper.1.store(true, Ordering::Relaxed);
    let sweeps = sweeper.0.join().unwrap();
    println!("({sweeps} whole sweeps ran meanwhile)");
}
