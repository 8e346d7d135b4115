//! Criterion benches of what `#[idempotent]` costs on the in-memory store, next to a plain
//! call, the `cached` crate and a moka lookup (the same workload as `examples/bench_report`:
//! `idem_support::workload`).
//!
//! ```text
//! cargo bench --bench overhead
//! ```

use std::sync::atomic::{AtomicU64, Ordering};

use criterion::{criterion_group, criterion_main, Criterion};
use idem_support::workload::*;

fn hits(c: &mut Criterion) {
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .unwrap();
    let req = request(7);
    rt.block_on(async {
        with_idem(req.clone()).await.unwrap();
        with_idem_unfingerprinted(req.clone()).await.unwrap();
        with_cached(req.clone()).await.unwrap();
        with_moka(req.clone()).await.unwrap();
    });
    let mut g = c.benchmark_group("hit");
    g.bench_function("plain", |b| b.to_async(&rt).iter(|| plain(req.clone())));
    g.bench_function("idem", |b| b.to_async(&rt).iter(|| with_idem(req.clone())));
    g.bench_function("idem_unfingerprinted", |b| {
        b.to_async(&rt)
            .iter(|| with_idem_unfingerprinted(req.clone()))
    });
    g.bench_function("cached_crate", |b| {
        b.to_async(&rt).iter(|| with_cached(req.clone()))
    });
    g.bench_function("moka", |b| b.to_async(&rt).iter(|| with_moka(req.clone())));
    g.finish();
}

fn misses(c: &mut Criterion) {
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .unwrap();
    // Every iteration a key never seen before.
    static NEXT: AtomicU64 = AtomicU64::new(1 << 40);
    let next = || request(NEXT.fetch_add(1, Ordering::Relaxed));
    let mut g = c.benchmark_group("miss");
    g.bench_function("plain", |b| b.to_async(&rt).iter(|| plain(next())));
    g.bench_function("idem", |b| b.to_async(&rt).iter(|| with_idem(next())));
    g.bench_function("cached_crate", |b| {
        b.to_async(&rt).iter(|| with_cached(next()))
    });
    g.finish();
}

criterion_group!(benches, hits, misses);
criterion_main!(benches);
