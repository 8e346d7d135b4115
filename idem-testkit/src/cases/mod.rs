//! Every conformance case, as a function of a store: `case(store, native_expiry)`.
//!
//! Each case uses keys of its own ([`unique`](crate::unique)), so cases may run at once on one
//! store. `native_expiry` is `true` for a store whose server deletes expired records itself
//! (`purge_expired` then finds nothing and returns 0). A case panics, with what went wrong, if
//! the store breaks a promise. Bodies count their runs in their first line, before any
//! `.await`, so a run that was interrupted still counts.
//!
//! The cases through [`Call`] (the engine `#[idempotent]` expands to) check what callers see;
//! the others drive the [`Store`] methods directly and check the protocol: atomic claims,
//! fencing tokens, expiry, purge, and the end of a lease, when a holder whose lease ran out
//! keeps its claim until someone takes it over; and the operator's methods, `forget` (fenced)
//! and `scan`.

use std::sync::Arc;
use std::time::Duration;

use idem_runtime::{Call, Claim, Fingerprint, StorageKey, Store};

mod calls;
mod lease_end;
mod operate;
mod protocol;
mod steps;

pub use calls::*;
pub use lease_end::*;
pub use operate::*;
pub use protocol::*;
pub use steps::*;

/// The fingerprint `n` (32 bytes of `n`).
fn fp(n: u8) -> Fingerprint {
    Fingerprint([n; 32])
}

/// A lease or ttl no case outlives.
const LONG: Duration = Duration::from_secs(60);

/// A lease or ttl short enough to run out during [`PAST_LEASE`].
const SHORT: Duration = Duration::from_millis(300);

/// A sleep that outlasts [`SHORT`] with room to spare for slow machines and clock steps.
const PAST_LEASE: Duration = Duration::from_millis(700);

/// A call on `store` under `key` with fingerprint `fp(1)`.
fn call(store: &Arc<dyn Store>, key: &StorageKey) -> Call {
    Call::new(key.clone())
        .store(store)
        .fingerprint(Some(fp(1)))
        .lease(Duration::from_secs(10))
}

/// The bytes of a record that replays `payload` (JSON) as `type_name`.
fn record(token: u64, payload: &str, type_name: &str) -> Vec<u8> {
    crate::record_bytes(token, payload, type_name)
}

/// Claims `key` with `fp(1)`, which must be acquired; its token.
async fn acquire(store: &dyn Store, key: &StorageKey, lease: Duration) -> u64 {
    match store.claim(key, Some(&fp(1)), lease).await.unwrap() {
        Claim::Acquired { token, .. } => token.0,
        other => panic!("expected to acquire, got {other:?}"),
    }
}

/// A completed record under a new key `label`, kept for `ttl`; its key.
async fn completed(store: &dyn Store, label: &str, ttl: Duration) -> StorageKey {
    let key = crate::unique(label);
    let t = acquire(store, &key, LONG).await;
    let bytes = record(t, "1", "u32");
    let token = idem_runtime::FencingToken(t);
    store.complete(&key, token, &bytes, ttl).await.unwrap();
    key
}

fn is_lease_lost<T: std::fmt::Debug>(result: &idem_runtime::Result<T>) -> bool {
    matches!(result, Err(idem_runtime::Error::LeaseLost { .. }))
}
