//! The workload shared by the criterion benches (`benches/overhead.rs`) and
//! `examples/bench_report`: a function taking a small struct (~100 bytes of JSON) and returning
//! one (~200 bytes), written plainly, with `#[idempotent]`, with the `cached` crate, and as a
//! hand-written moka lookup.
//!
//! `#[idempotent]` is named here through `idem_macros` with `crate = ::idem_runtime` (what the
//! facade re-exports), so this crate does not depend on the facade whose tests use it.

use std::sync::{Arc, OnceLock};

use idem_macros::idempotent;
use idem_runtime::MemoryStore;
use serde::{Deserialize, Serialize};

/// The argument: a charge to make.
#[derive(Clone, Debug, Serialize, Deserialize, PartialEq, Eq, Hash)]
#[allow(missing_docs)]
pub struct ChargeRequest {
    pub order_id: u64,
    pub customer: String,
    pub amount_cents: u64,
    pub currency: String,
    pub description: String,
}

/// The result: the charge's receipt.
#[derive(Clone, Debug, Serialize, Deserialize, PartialEq)]
#[allow(missing_docs)]
pub struct Receipt {
    pub id: String,
    pub order_id: u64,
    pub customer: String,
    pub status: String,
    pub amount_cents: u64,
    pub currency: String,
    pub created_at: u64,
    pub processor: String,
    pub message: String,
}

/// The error of the workload's functions.
#[derive(Clone, Debug, thiserror::Error)]
pub enum BenchError {
    /// idem's error, as text.
    #[error("idem: {0}")]
    Idem(String),
}

impl From<idem_runtime::Error> for BenchError {
    fn from(e: idem_runtime::Error) -> Self {
        BenchError::Idem(e.to_string())
    }
}

/// The request of order `order_id`.
pub fn request(order_id: u64) -> ChargeRequest {
    ChargeRequest {
        order_id,
        customer: "cus_4f8a2b".into(),
        amount_cents: 12_500,
        currency: "usd".into(),
        description: "order".into(),
    }
}

/// The body: cheap, so the table shows what the wrappers cost.
pub fn compute(req: &ChargeRequest) -> Receipt {
    Receipt {
        id: format!(
            "ch_{:016x}",
            req.order_id.wrapping_mul(0x9e37_79b9_7f4a_7c15)
        ),
        order_id: req.order_id,
        customer: req.customer.clone(),
        status: "succeeded".into(),
        amount_cents: req.amount_cents,
        currency: req.currency.clone(),
        created_at: 1_700_000_000,
        processor: "bench".into(),
        message: "approved".into(),
    }
}

/// The body, called plainly.
pub async fn plain(req: ChargeRequest) -> Result<Receipt, BenchError> {
    Ok(compute(&req))
}

/// The in-memory store of [`with_idem`] and [`with_idem_unfingerprinted`]: without the default
/// capacity limits, since a benchmark makes millions of misses whose records live for a day.
pub fn memory_store() -> &'static Arc<MemoryStore> {
    static STORE: OnceLock<Arc<MemoryStore>> = OnceLock::new();
    STORE.get_or_init(|| Arc::new(unbounded_memory_store()))
}

/// A memory store without capacity limits (for benchmarks that fill it on purpose).
pub fn unbounded_memory_store() -> MemoryStore {
    MemoryStore::builder()
        .max_records(usize::MAX)
        .max_bytes(usize::MAX)
        .build()
        .expect("limits that hold a record")
}

/// `#[idempotent]` with the default fingerprint (canonical JSON of the request).
#[idempotent(crate = ::idem_runtime, key = req.order_id, store = &**memory_store())]
pub async fn with_idem(req: ChargeRequest) -> Result<Receipt, BenchError> {
    Ok(compute(&req))
}

/// `#[idempotent]` without fingerprinting (trusting keys, as `cached` does).
#[idempotent(crate = ::idem_runtime, key = req.order_id, store = &**memory_store(), fingerprint = false)]
pub async fn with_idem_unfingerprinted(req: ChargeRequest) -> Result<Receipt, BenchError> {
    Ok(compute(&req))
}

/// The `cached` crate's async memoization, keyed the same way.
#[cached::cached(key = "u64", convert = "{ req.order_id }")]
pub async fn with_cached(req: ChargeRequest) -> Result<Receipt, BenchError> {
    Ok(compute(&req))
}

/// A hand-written moka lookup.
pub fn moka_cache() -> &'static moka::future::Cache<u64, Receipt> {
    static CACHE: OnceLock<moka::future::Cache<u64, Receipt>> = OnceLock::new();
    CACHE.get_or_init(|| moka::future::Cache::new(2_000_000))
}

/// The body behind a moka lookup.
pub async fn with_moka(req: ChargeRequest) -> Result<Receipt, BenchError> {
    Ok(moka_cache()
        .get_with(req.order_id, async { compute(&req) })
        .await)
}
