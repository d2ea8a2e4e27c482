//! Memory held by the memory store: bytes per entry beyond the response's
//! own body and headers, and the resident size of one million stored 1 KiB
//! responses. Measured with a counting allocator and /proc/self/statm, not
//! estimated.
//!
//! `cargo bench --bench memory` (about 2 GiB of memory at its peak).
// The counting allocator below is the one unsafe block in the project.
#![allow(unsafe_code)]

use std::{
    alloc::{GlobalAlloc, Layout, System},
    sync::atomic::{AtomicUsize, Ordering},
    time::Duration,
};

use bytes::Bytes;
use http::{HeaderMap, HeaderValue, StatusCode};
use tower_idempotency::{
    key::{Fingerprint, RecordKey},
    store::{BeginOutcome, Completion, MemoryLimits, MemoryStore, StoredResponse},
    Store,
};

struct Counting;

static LIVE: AtomicUsize = AtomicUsize::new(0);

// SAFETY: delegates to the system allocator and only counts sizes.
unsafe impl GlobalAlloc for Counting {
    unsafe fn alloc(&self, layout: Layout) -> *mut u8 {
        LIVE.fetch_add(layout.size(), Ordering::Relaxed);
        unsafe { System.alloc(layout) }
    }
    unsafe fn dealloc(&self, ptr: *mut u8, layout: Layout) {
        LIVE.fetch_sub(layout.size(), Ordering::Relaxed);
        unsafe { System.dealloc(ptr, layout) }
    }
    unsafe fn realloc(&self, ptr: *mut u8, layout: Layout, new_size: usize) -> *mut u8 {
        LIVE.fetch_add(new_size, Ordering::Relaxed);
        LIVE.fetch_sub(layout.size(), Ordering::Relaxed);
        unsafe { System.realloc(ptr, layout, new_size) }
    }
}

#[global_allocator]
static ALLOCATOR: Counting = Counting;

fn resident_bytes() -> usize {
    let statm = std::fs::read_to_string("/proc/self/statm").unwrap_or_default();
    let pages: usize = statm
        .split_whitespace()
        .nth(1)
        .and_then(|p| p.parse().ok())
        .unwrap_or(0);
    pages * 4096
}

/// A 1 KiB JSON response with one header, its body in an allocation of its
/// own as a handler's would be.
fn response(i: usize) -> StoredResponse {
    let mut headers = HeaderMap::new();
    headers.insert("content-type", HeaderValue::from_static("application/json"));
    let mut body = format!("{{\"id\":\"pay_{i:016}\",\"pad\":\"").into_bytes();
    body.resize(1022, b'x');
    body.extend_from_slice(b"\"}");
    StoredResponse::new(StatusCode::CREATED, headers, Bytes::from(body), None)
}

/// The bytes the response itself needs: body, header name and value.
fn payload_bytes(response: &StoredResponse) -> usize {
    response.body.len()
        + response
            .headers
            .iter()
            .map(|(n, v)| n.as_str().len() + v.len())
            .sum::<usize>()
}

async fn fill(store: &MemoryStore, entries: usize) -> usize {
    let mut payload = 0;
    for i in 0..entries {
        let key = RecordKey::new(b"bench", &format!("key-{i}"));
        let fingerprint = Fingerprint::from_bytes([7; 32]);
        let Ok(BeginOutcome::Acquired(token)) = store
            .begin(&key, &fingerprint, Duration::from_secs(60))
            .await
        else {
            panic!("fresh key {i} not acquired");
        };
        let response = response(i);
        payload += payload_bytes(&response);
        store
            .complete(
                &key,
                &fingerprint,
                token,
                Completion::Response(response.encode()),
                Duration::from_secs(3600),
            )
            .await
            .expect("complete");
    }
    payload
}

fn main() {
    if std::env::args().any(|a| a == "--list") {
        return;
    }
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .expect("runtime");
    rt.block_on(async {
        for entries in [100_000usize, 1_000_000] {
            let store = MemoryStore::builder()
                .with_limits(MemoryLimits::new(entries, usize::MAX).with_max_entries_per_scope(entries))
                .build();
            let (heap_before, rss_before) = (LIVE.load(Ordering::Relaxed), resident_bytes());
            let payload = fill(&store, entries).await;
            let (heap_after, rss_after) = (LIVE.load(Ordering::Relaxed), resident_bytes());
            let heap = heap_after - heap_before;
            let overhead = (heap - payload) as f64 / entries as f64;
            println!(
                "memory/{entries}: heap {:.1} MiB, resident +{:.1} MiB, payload {:.1} MiB, overhead {overhead:.0} B/entry ({:.0} B/entry resident)",
                heap as f64 / 1048576.0,
                (rss_after - rss_before) as f64 / 1048576.0,
                payload as f64 / 1048576.0,
                ((rss_after - rss_before) as f64 - payload as f64) / entries as f64,
            );
            drop(store);
        }
    });
}
