//! The conformance suite of [`idem_runtime::Store`], for the authors of stores.
//!
//! A store keeps the promises of the `idempotency` crate (a body runs at most once per key,
//! a stale holder is fenced off, a result is never lost while nobody took over, ...) only if it
//! implements the claim protocol exactly. The built-in stores (memory, SQLite, Redis,
//! PostgreSQL) are held to it by this suite; a DynamoDB, MySQL or FoundationDB store is too,
//! with one macro:
//!
//! ```toml
//! [dev-dependencies]
//! idem-testkit = "0.1"
//! tokio = { version = "1", features = ["macros", "rt-multi-thread"] }
//! ```
//!
//! # Testing your own store
//!
//! In `tests/conformance.rs` of your store's crate:
//!
//! ```
//! use std::sync::Arc;
//!
//! use idem_runtime::{MemoryStore, Store};
//!
//! /// A store of this test's own: no other test sees its records. `None` skips the test (say,
//! /// when the database server is unreachable; print why).
//! async fn fresh_store() -> Option<Arc<dyn Store>> {
//!     // `MyStore::connect(...).await.ok()` for yours.
//!     Some(Arc::new(MemoryStore::new()))
//! }
//!
//! // One `#[tokio::test]` per case, in a module `conformance`.
//! idem_testkit::conformance!(fresh_store, native_expiry = false);
//! # fn main() {}
//! ```
//!
//! `native_expiry = true` says that the store's server deletes expired records itself (as
//! Redis does), so `purge_expired` finds nothing to remove and returns 0.
//!
//! Each case takes at most a few seconds (most sleep past a 300 ms lease or ttl) and they run
//! in parallel, each on a multi-threaded runtime of two workers, with keys of their own
//! ([`unique`]), so one store may serve them all; the cases are also public functions in
//! [`cases`], to call from a test of your own. A store whose records cannot be read back
//! quickly after a write (eventually consistent reads) fails them: claims must be atomic.
//!
//! `cargo test conformance::` runs the suite alone. A store that needs a guard kept alive (a
//! temporary directory, a server process) can be wrapped in an [`Intercept`] that
//! [keeps](Intercept::keeping) it; the same wrapper fakes faults (a failing `complete`, a slow
//! `claim`) by overriding one method of [`Hooks`].
//!
//! The example store `idem-store-redb` in the `idempotency` repository (`examples/redb-store`)
//! is a complete store on the `redb` embedded database that passes this suite.
#![warn(missing_docs)]
#![cfg_attr(docsrs, feature(doc_cfg))]

pub mod cases;
mod intercept;

pub use intercept::{Forward, Hooks, Intercept};

/// For implementing [`Hooks`] (and stores): `#[idem_testkit::async_trait]`.
#[doc(no_inline)]
pub use async_trait::async_trait;

use idem_runtime::StorageKey;

/// A storage key no other test or run uses: `label` and a random number, in the scope
/// `"conformance"`.
pub fn unique(label: &str) -> StorageKey {
    StorageKey::derive("conformance", &format!("{label}:{}", rand::random::<u64>()))
        .expect("a key of a label and a number is valid")
}

/// The bytes of a completed record as idem writes them: the body's `Ok` of `payload` (JSON),
/// of the type named `type_name`, with the fingerprint `[1; 32]`, stored by `token`. For tests
/// of your own that `complete` by hand: stores keep record bytes as they are, and a call replays
/// them.
pub fn record_bytes(token: u64, payload: &str, type_name: &str) -> Vec<u8> {
    idem_runtime::store::completed_record(idem_runtime::FencingToken(token), payload, type_name)
}

/// Runs the whole conformance suite against a store: one
/// `#[tokio::test(flavor = "multi_thread", worker_threads = 2)]` per case of [`cases`], in a
/// module `conformance`.
///
/// ```text
/// idem_testkit::conformance!(fresh_store, native_expiry = false);
/// ```
///
/// `fresh_store` names an `async fn() -> Option<Arc<dyn Store>>` in scope that gives a store
/// isolated from other tests' records (its own file, table or key prefix), or `None` to skip
/// the case. `native_expiry` is `true` for a store whose server deletes expired records itself,
/// so that `purge_expired` returns 0. The calling crate needs `tokio` (features `macros` and
/// `rt-multi-thread`) among its dev-dependencies.
#[macro_export]
macro_rules! conformance {
    ($fresh:path, native_expiry = $native:expr $(,)?) => {
        #[allow(unused_imports)]
        mod conformance {
            use super::*;

            $crate::__with_cases!([$crate::__conformance_tests]($fresh, $native));
        }
    };
}

/// `__with_cases!([path::to::m] (args))` calls `path::to::m!(args; case, case, ...)` with every
/// case of [`cases`]: the one list of them.
#[doc(hidden)]
#[macro_export]
macro_rules! __with_cases {
    ([$($m:tt)*] ($($args:tt)*)) => {
        $($m)*! {$($args)*;
            exactly_once_under_200_concurrent_callers, replay_is_identical, key_reuse_is_refused,
            ttl_expiry_runs_again, expired_lease_is_taken_over, stale_tokens_are_fenced,
            tokens_strictly_increase, release_on_error, unknown_on_panic, unknown_on_cancel,
            long_body_renews_its_lease, corrupt_records_are_errors_not_reruns,
            wrong_type_is_type_mismatch, purge_removes_only_expired, get_reports_states,
            missing_fingerprint_matches_any, wait_gets_the_first_result,
            complete_after_lease_end_lands, takeover_fences_the_old_token,
            renew_after_lease_end_holds_again, get_reports_an_expired_claim_in_flight,
            purge_keeps_a_claim_whose_lease_just_ended,
            expired_claim_with_another_fingerprint_is_taken_over,
            forget_completed_runs_the_body_again, forget_in_flight_is_refused_unless_forced,
            forced_forget_fences_the_holder_off, forget_wakes_waiters, forget_absent_is_absent,
            forget_racing_complete_is_one_order, scan_lists_what_get_reports,
            steps_are_fenced_by_the_token, takeover_keeps_the_steps,
            renewal_keeps_the_steps_and_zero_hands_them_on, steps_go_with_the_record,
            an_interrupted_call_resumes_its_steps}
    };
}

/// One test per case; see [`conformance!`].
#[doc(hidden)]
#[macro_export]
macro_rules! __conformance_tests {
    ($fresh:path, $native:expr; $($case:ident),*) => {$(
        #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
        async fn $case() {
            if let Some(store) = $fresh().await {
                $crate::cases::$case(store, $native).await;
            }
        }
    )*};
}

/// Defines [`CASES`].
macro_rules! case_names {
    (; $($case:ident),*) => {
        /// The names of every case of [`cases`] that [`conformance!`] runs, in its order.
        pub const CASES: &[&str] = &[$(stringify!($case)),*];
    };
}
__with_cases!([case_names]());

#[cfg(test)]
mod tests {
    #[test]
    fn every_case_is_listed_once() {
        let mut names = crate::CASES.to_vec();
        names.sort_unstable();
        names.dedup();
        assert_eq!(names.len(), crate::CASES.len());
        assert_eq!(crate::CASES.len(), 35);
    }
}
