//! The runtime of [`idempotency`](https://docs.rs/idempotency): everything `#[idempotent]` does,
//! without macros.
//!
//! Use it through the `idempotency` crate. The modules, one concept each:
//! [`key`] (user keys and storage keys), [`fingerprint`] (canonical JSON hashing),
//! [`record`] (the stored envelope), [`store`] (the `Store` trait and its backends),
//! [`engine`] (the claim/run/complete state machine the macro calls), [`metrics`](mod@metrics).

#![warn(missing_docs)]
#![cfg_attr(docsrs, feature(doc_cfg))]

mod canonical;
pub mod context;
pub mod engine;
pub mod error;
pub mod fingerprint;
mod forget;
#[cfg(feature = "http")]
pub mod http;
pub mod key;
pub mod metrics;
#[doc(hidden)]
pub mod record;
pub mod served;
mod storage_key;
pub mod store;

pub use context::CallContext;
pub use engine::OnReplay;
pub use engine::{drain, running, DrainReport};
pub use engine::{step, step_key, MAX_STEP_NAME_LEN};
pub use engine::{
    Call, ErrorPolicy, IdempotentResult, IntoDuration, OnConflict, OnUnknown, Storable, MIN_LEASE,
};
pub use engine::{Purger, PurgerHandle, PurgerStats};
pub use error::{Error, Result};
pub use fingerprint::{Fingerprint, FingerprintBuilder, Fingerprintable};
pub use forget::forget;
pub use key::{IntoKey, Operation, StorageKey};
pub use metrics::{counters, Counters};
pub use served::{observe, ReplayInfo, Served};
pub use store::connect;
#[cfg(feature = "dynamodb")]
pub use store::dynamodb::DynamoDbStore;
pub use store::local::LocalCache;
pub use store::memory::MemoryStore;
#[cfg(feature = "postgres")]
pub use store::postgres::PostgresStore;
#[cfg(feature = "redis")]
pub use store::redis::RedisStore;
#[cfg(feature = "sqlite")]
pub use store::sqlite::SqliteStore;
pub use store::{
    default_store, install, Claim, FencingToken, Forgotten, IntoStore, RecordState, RecordSummary,
    ScanPage, Store, StoredRecord, ABANDONED_CLAIM_RETENTION,
};

/// Items the `#[idempotent]` expansion names, with the forms only the macro needs (they carry
/// a key or fingerprint that failed to derive into the call, which returns the error without
/// running anything). Not public API: may change in any release.
#[doc(hidden)]
pub mod __private {
    pub use crate::engine::{
        default_wait, Call, Decoding, ErrorPolicy, IntoDuration, OnConflict, OnUnknown, Probe,
        ViaClone, ViaDecode, DEFAULT_LEASE,
    };
    pub use crate::fingerprint::Fingerprint;
    pub use crate::key::{Operation, StorageKey};

    use crate::error::Result;
    use crate::fingerprint::FingerprintBuilder;
    use crate::key::IntoKey;

    /// The call of `operation` under `key` in `scope` (`key = ...`): [`Call::for_operation`],
    /// with the fingerprint of the parameters.
    pub fn keyed(
        operation: Operation,
        scope: &(impl IntoKey + ?Sized),
        key: &(impl IntoKey + ?Sized),
        fingerprint: Result<Option<Fingerprint>>,
    ) -> Call {
        match Call::for_operation(operation, scope, key) {
            Ok(mut call) => {
                match fingerprint {
                    Ok(fingerprint) => call.fingerprint = fingerprint,
                    Err(e) => call.failed = Some(Box::new(e)),
                }
                call
            }
            Err(e) => Call::failed(operation, e),
        }
    }

    /// The call of `operation` keyed by the fingerprint of its arguments (no `key = ...`):
    /// [`Call::by_content`].
    pub fn by_content(
        operation: Operation,
        scope: &(impl IntoKey + ?Sized),
        fingerprint: Result<Fingerprint>,
    ) -> Call {
        match fingerprint.and_then(|fp| Call::by_content(operation, scope, fp)) {
            Ok(call) => call,
            Err(e) => Call::failed(operation, e),
        }
    }

    /// `on_replay = path`: the hook as a function pointer of the function's return type `R`,
    /// so that a hook of another type is one error, at the path.
    pub fn on_replay<R: crate::engine::IdempotentResult>(
        hook: fn(R::Ok, &crate::served::ReplayInfo) -> R::Ok,
    ) -> fn(R::Ok, &crate::served::ReplayInfo) -> R::Ok {
        hook
    }

    /// A fingerprint made by adding values to a builder (the parameters).
    pub fn fingerprint_with(
        add: impl FnOnce(&mut FingerprintBuilder) -> Result<()>,
    ) -> Result<Fingerprint> {
        let mut b = FingerprintBuilder::new();
        add(&mut b)?;
        Ok(b.finish())
    }
}
