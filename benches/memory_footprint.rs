//! What a record of the memory store really costs in memory, next to what the store counts
//! against its `max_bytes` (`MemoryStore::bytes`): a counting allocator measures the heap
//! growth of filling a store, then of purging it. `cargo bench --bench memory_footprint`
//! (`IDEM_FOOTPRINT_RECORDS` sets the count, default 1 000 000).

use std::alloc::{GlobalAlloc, Layout, System};
use std::sync::atomic::{AtomicIsize, Ordering};
use std::time::{Duration, Instant};

use idempotency::store::Claim;
use idempotency::{MemoryStore, StorageKey, Store};

/// The system allocator, counting the bytes live on the heap.
struct Counting;

static LIVE: AtomicIsize = AtomicIsize::new(0);

unsafe impl GlobalAlloc for Counting {
    unsafe fn alloc(&self, layout: Layout) -> *mut u8 {
        LIVE.fetch_add(layout.size() as isize, Ordering::Relaxed);
        System.alloc(layout)
    }
    unsafe fn dealloc(&self, ptr: *mut u8, layout: Layout) {
        LIVE.fetch_sub(layout.size() as isize, Ordering::Relaxed);
        System.dealloc(ptr, layout)
    }
    unsafe fn realloc(&self, ptr: *mut u8, layout: Layout, new_size: usize) -> *mut u8 {
        LIVE.fetch_add(
            new_size as isize - layout.size() as isize,
            Ordering::Relaxed,
        );
        System.realloc(ptr, layout, new_size)
    }
}

#[global_allocator]
static GLOBAL: Counting = Counting;

fn live() -> isize {
    LIVE.load(Ordering::Relaxed)
}

fn main() {
    let n: usize = std::env::var("IDEM_FOOTPRINT_RECORDS")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(1_000_000);
    let result = [7u8; 16];
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_time()
        .start_paused(true)
        .build()
        .unwrap();
    rt.block_on(async {
        let keys: Vec<StorageKey> = (0..n)
            .map(|i| StorageKey::derive("footprint", &i.to_string()).unwrap())
            .collect();
        let store = MemoryStore::builder()
            .max_records(usize::MAX)
            .max_bytes(usize::MAX)
            .build()
            .unwrap();
        let before = live();
        let started = Instant::now();
        for k in &keys {
            let Claim::Acquired { token, .. } =
                store.claim(k, None, Duration::from_secs(30)).await.unwrap()
            else {
                panic!("a fresh key is acquired");
            };
            store
                .complete(k, token, &result, Duration::from_secs(10))
                .await
                .unwrap();
        }
        let filled = live() - before;
        let took = started.elapsed();
        println!(
            "{n} records with a {}-byte result: {filled} bytes on the heap ({} per record), {} counted by the store ({} per record), {:.1?} to fill",
            result.len(),
            filled / n as isize,
            store.bytes(),
            store.bytes() / n,
            took
        );
        tokio::time::advance(Duration::from_secs(11)).await;
        let purged = store.purge_expired().await.unwrap();
        println!(
            "after purging {purged}: {} bytes left on the heap, {} counted, table capacity {}",
            live() - before,
            store.bytes(),
            store.capacity()
        );
    });
}
