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

/// What refusing a result that would not decode back costs on the miss path: idem encodes the
/// result (`to_vec`, as before) and decodes it once more as its type (`encode_and_check`), so
/// that a `NaN` is an `Encode` error at the first call rather than a `TypeMismatch` on the
/// retry. Compare with `miss/idem` for the share of a whole first call.
fn result_check(c: &mut Criterion) {
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .unwrap();
    let receipt = rt.block_on(plain(request(7))).unwrap();
    let mut g = c.benchmark_group("result_check");
    g.bench_function("to_vec", |b| {
        b.iter(|| serde_json::to_vec(std::hint::black_box(&receipt)).unwrap())
    });
    g.bench_function("encode_and_check", |b| {
        b.iter(|| {
            let bytes = serde_json::to_vec(std::hint::black_box(&receipt)).unwrap();
            let back: Receipt = serde_json::from_slice(&bytes).unwrap();
            (bytes, back)
        })
    });
    g.finish();
}

criterion_group!(benches, hits, misses, result_check);
criterion_main!(benches);
