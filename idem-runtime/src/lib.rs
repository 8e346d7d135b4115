//! The runtime of [idem](https://docs.rs/idem): everything `#[idempotent]` does, without macros.
//!
//! Use it through the [`idempotency`](https://docs.rs/idempotency) crate. The modules, one concept each:
//! [`key`] (user keys and storage keys), [`fingerprint`] (canonical JSON hashing),
//! [`record`] (the stored envelope), [`store`] (the `Store` trait and its backends),
//! [`exec`] (the claim/run/complete state machine the macro calls), [`metrics`](mod@metrics).

#![warn(missing_docs)]
#![cfg_attr(docsrs, feature(doc_cfg))]

mod canonical;
pub mod context;
pub mod error;
pub mod exec;
pub mod fingerprint;
mod hex;
#[cfg(feature = "http")]
pub mod http;
pub mod key;
pub mod metrics;
pub mod record;
pub mod store;

pub use context::CallContext;
pub use error::{Error, Result};
pub use exec::{
    Call, ErrorPolicy, IdempotentResult, IntoDuration, OnConflict, OnUnknown, Storable, MIN_LEASE,
};
pub use fingerprint::Fingerprint;
pub use key::{IntoKey, StorageKey};
pub use metrics::{metrics, Metrics};
pub use store::connect;
pub use store::memory::MemoryStore;
#[cfg(feature = "postgres")]
pub use store::postgres::PostgresStore;
#[cfg(feature = "redis")]
pub use store::redis::RedisStore;
#[cfg(feature = "sqlite")]
pub use store::sqlite::SqliteStore;
pub use store::{default_store, install, Claim, FencingToken, RecordState, Store, StoredRecord};
