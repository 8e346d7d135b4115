//! # idem — make async functions safe to retry
//!
//! ```
//! use idempotency::idempotent;
//! # #[derive(serde::Serialize, serde::Deserialize)] struct ChargeRequest { order_id: u64, amount: u64 }
//! # #[derive(serde::Serialize, serde::Deserialize, Clone, Debug, PartialEq)] struct Receipt { id: String }
//! # #[derive(Debug)] enum PaymentError { Idem(idempotency::Error) }
//! # impl From<idempotency::Error> for PaymentError { fn from(e: idempotency::Error) -> Self { PaymentError::Idem(e) } }
//!
//! #[idempotent(key = format!("charge:{}", req.order_id), ttl = "24h")]
//! async fn charge(req: ChargeRequest) -> Result<Receipt, PaymentError> {
//!     // Runs at most once per order id; every retry gets this receipt back.
//!     Ok(Receipt { id: format!("r_{}", req.amount) })
//! }
//! # #[tokio::main(flavor = "current_thread")] async fn main() {
//! let first = charge(ChargeRequest { order_id: 1, amount: 500 }).await.unwrap();
//! let retry = charge(ChargeRequest { order_id: 1, amount: 500 }).await.unwrap();
//! assert_eq!(first, retry);
//! # }
//! ```
//!
//! The function derives a key, claims it in a [`Store`], runs its body at most once per key,
//! stores the result as JSON, and replays it to every later call with the same key, across
//! threads, and (with a shared store) processes and machines.
//!
//! ## Arguments of `#[idempotent(...)]`
//!
//! | argument | meaning | default |
//! |---|---|---|
//! | `name = "billing.charge"` | the operation's stable name (what is done): part of every storage key, kept when the function moves or is renamed; required with a durable store ([`Store::durable`]) | the function's path, memory store only |
//! | `key = EXPR` | an expression over the parameters (borrowed, never moved) giving an [`IntoKey`]: a string, an integer, a `Uuid` | the fingerprint of the non-skipped parameters |
//! | `scope = EXPR` | for whom, e.g. a tenant id: scopes never share records | none |
//! | `ttl = "24h"` / `ttl = 3600` / `ttl = EXPR` | how long a completed result is replayed | `24h` |
//! | `lease = "30s"` | how long a claim is held before another caller may take over; renewed while the body runs (by the lease keeper thread); at least 100 ms ([`MIN_LEASE`]) | `30s` |
//! | `store = EXPR` | the store ([`IntoStore`]): `&S` of a store that is `Clone` (every built-in one), `Arc<S>`, `Arc<dyn Store>`, a built-in store by value | [`install`]ed store, else an in-memory one |
//! | `skip(a, b)` | parameters left out of the fingerprint (handles, connections) | none |
//! | `fingerprint = EXPR` / `fingerprint = false` | what must match when a key is reused | canonical JSON of the non-skipped parameters |
//! | `on_conflict = "reject"` / `"wait"`, `wait = "5s"` | a call whose key is in flight elsewhere: fail with [`Error::InFlight`], or wait for that result (by default `default_wait`: 2 × lease + 1 s) | `reject` |
//! | `cache_errors = true` / `cache_errors = path::to::predicate` | also keep `Err` results (all, or those the `fn(&E) -> bool` accepts) | errors are not kept |
//! | `on_replay = path::to::hook` | a `fn(T, &`[`ReplayInfo`]`) -> T` applied to every replayed `Ok` value before the caller gets it (never to a fresh one); the stored record is not changed. [`observe`] tells a caller whether its call was replayed ([`Served`]) | replayed values as stored |
//! | `max_record_bytes = N` | the largest encoded result that is stored; a larger one is not kept and the call returns `Error::TooLarge` (an unknown outcome) | 8 MiB |
//! | `on_unknown = "refuse"` / `"rerun"` | a started body whose outcome is unknown (panic, abandoned, result not storable): refuse the key with [`Error::OutcomeUnknown`] until the recovery window passes (at most once), or release it (at least once); see [`OnUnknown`] | `refuse` |
//! | `recovery = "1h"` | how long a key with an unknown outcome is refused | 1 hour (the ttl if shorter) |
//! | `version = N` | the result's schema version: raise it when the result type changes incompatibly; records of another version are [`Error::TypeMismatch`] | `0` |
//! | `detach = false` | keep the body in the caller's future even though it owns its data | detached when the function owns its data |
//! | `crate = path` | this crate's path if your `Cargo.toml` renames it | `::idempotency` |
//!
//! The function must be `async` and return `Result<T, E>` with `T: Serialize + DeserializeOwned`
//! and `E: From<idempotency::Error>`. It works on free functions, `&self`/`&mut self` methods,
//! generic functions and methods inside `#[async_trait]` impls.
//!
//! ## Guarantees
//!
//! - **At most once per key**: the claim is one atomic store operation; every claim gets a
//!   strictly increasing fencing token, and a holder whose lease was taken over cannot store its
//!   result ([`Error::LeaseLost`]).
//! - **Replay is exact**: the stored serde_json bytes are decoded into the same value.
//! - **Key reuse is caught**: same key, different arguments is [`Error::KeyReuse`].
//! - **A started body is never run again by accident**: a function that owns its data (no
//!   `&self`, no borrowed parameters, no generics) keeps its body running when its caller stops
//!   waiting (the body moves to a task of its own then), and its result is stored for the retry. A panic, an
//!   abandoned borrowing body, or a result that cannot be stored is an unknown outcome, recorded
//!   (at most once, the default) or released (at least once) per [`OnUnknown`]. An `Err` the body
//!   returns (unless kept) releases the claim, so a retry runs at once. A crashed process's claim
//!   is taken over when its lease expires.
//! - **Fencing reaches the body**: inside a body, [`context::current()`] gives its [`CallContext`](context::CallContext): the
//!   fencing token to pass to the downstream write, and whether the claim was lost.
//! - **Durable steps**: inside a body, [`step`]`("charge", async { .. })` records a side
//!   effect's value as it completes, so a call resumed after a crash (or an interruption)
//!   replays the steps that completed and runs only the rest; [`step_key`] gives the step's
//!   downstream system an idempotency key that is the same in every run of the call.
//! - **Fail closed**: if the store cannot be reached, the body does not run ([`Error::Store`]).
//! - **Safe across deploys**: an operation's `name = "..."` is part of its storage key and
//!   survives moving or renaming the function; results are checked by schema version and by
//!   decoding, not by Rust type names ([`Error::TypeMismatch`]). Durable stores refuse unnamed
//!   functions ([`Error::Config`]).
//!
//! ## Stores and features
//!
//! | store | cargo feature | for |
//! |---|---|---|
//! | [`MemoryStore`] | (always) | the default; tests; one process |
//! | `SqliteStore` | `sqlite` | embedded and durable: one file, several processes on one machine |
//! | `RedisStore` | `redis` | many processes and machines |
//! | `PostgresStore` | `postgres` | many processes, when the data already lives in PostgreSQL |
//! | `DynamoDbStore` | `dynamodb` | many processes on AWS, without a server to run |
//!
//! Other features: `http` (`http::IdempotencyLayer`, a tower layer for
//! `Idempotency-Key`), `axum` (`Error` is an axum response, so a handler can use `?`),
//! `metrics` (counters and histograms through the `metrics` crate: see [`mod@metrics`]),
//! `client` (`client`: retry with the same key from reqwest or a tower client), `uuid` (`Uuid`
//! keys), `full` (all of them). Default features: `sqlite-bundled` (SQLite compiled in;
//! without it `sqlite` links the system's libsqlite3) and `tls-ring` (the rustls crypto
//! provider of Redis and PostgreSQL TLS; `tls-aws-lc-rs` chooses aws-lc-rs, and wins when both
//! are on; idem passes it explicitly and installs no process default, except before a
//! `rediss://` connection, whose `redis` crate needs one). [`install`] sets the store of
//! functions without `store = ...`; [`connect`] opens one from a URL (`memory`, `sqlite:PATH`,
//! `redis://...`, `postgres://...`, `dynamodb://...`).

#![warn(missing_docs)]
#![cfg_attr(docsrs, feature(doc_cfg))]

#[cfg(feature = "runtime")]
pub use idem_macros::idempotent;
#[cfg(feature = "runtime")]
pub use idem_runtime::{
    connect, counters, default_store, drain, install, metrics, observe, running, Call, Counters,
    DrainReport, Error, ErrorPolicy, Fingerprint, FingerprintBuilder, Fingerprintable,
    IdempotentResult, IntoDuration, IntoKey, IntoStore, LocalCache, MemoryStore, OnConflict,
    OnReplay, OnUnknown, Operation, ReplayInfo, Result, Served, Storable, StorageKey, Store,
    MAX_STEP_NAME_LEN, MIN_LEASE,
};
#[cfg(feature = "runtime")]
pub use idem_runtime::{step, step_key};

#[cfg(feature = "runtime")]
/// What a running body knows of its own call: [`context::current()`] gives its
/// [`CallContext`](context::CallContext) (the fencing token to hand to the downstream write,
/// whether the claim was lost, by the store's word or the holder's own deadline), and
/// [`context::token()`] the token alone.
pub mod context {
    pub use idem_runtime::context::{current, token, CallContext, CLOCK_MARGIN};
    pub use idem_runtime::FencingToken;
}

#[cfg(feature = "runtime")]
/// For the authors of stores and for operators: the store protocol's types ([`Store`],
/// [`Claim`](store::Claim), [`StoredRecord`](store::StoredRecord), ...), what an operator sees
/// and does ([`forget`](store::forget), [`scan`](Store::scan)'s [`ScanPage`](store::ScanPage),
/// the background [`Purger`](store::Purger)), and store URLs. A function author needs none of
/// it: the root has the stores and [`connect`].
pub mod store {
    pub use idem_runtime::store::local::{
        LocalCacheBuilder, DEFAULT_LOCAL_MAX_AGE, DEFAULT_LOCAL_MAX_ENTRIES,
    };
    pub use idem_runtime::store::memory::MemoryStoreBuilder;
    pub use idem_runtime::store::{
        redact_url, Claim, FencingToken, Forgotten, RecordState, RecordSummary, ScanPage, StoreUrl,
        StoredRecord, ABANDONED_CLAIM_RETENTION,
    };
    pub use idem_runtime::{forget, Purger, PurgerHandle, PurgerStats, Store};
}

/// The client side of `Idempotency-Key`: a `reqwest-middleware` middleware and a tower layer
/// that attach one key per operation, keep it across every retry, and wait out 409 Conflict.
#[cfg(feature = "client")]
#[cfg_attr(docsrs, doc(cfg(feature = "client")))]
pub use idem_client as client;
#[cfg(feature = "http")]
pub use idem_runtime::http;
#[cfg(feature = "dynamodb")]
pub use idem_runtime::DynamoDbStore;
#[cfg(feature = "postgres")]
pub use idem_runtime::PostgresStore;
#[cfg(feature = "redis")]
pub use idem_runtime::RedisStore;
#[cfg(feature = "sqlite")]
pub use idem_runtime::SqliteStore;

/// The PostgreSQL backend's defaults and client crates, for [`PostgresStore`].
#[cfg(feature = "postgres")]
#[cfg_attr(docsrs, doc(cfg(feature = "postgres")))]
pub mod postgres {
    pub use idem_runtime::store::postgres::{
        deadpool_postgres, tokio_postgres, PostgresOptions, DEFAULT_POOL_SIZE, DEFAULT_TABLE,
    };
}

/// The DynamoDB backend's defaults, options and SDK crate, for [`DynamoDbStore`].
#[cfg(feature = "dynamodb")]
#[cfg_attr(docsrs, doc(cfg(feature = "dynamodb")))]
pub mod dynamodb {
    pub use idem_runtime::store::dynamodb::{
        aws_sdk_dynamodb, DynamoDbOptions, ATTEMPT_TIMEOUT, DEFAULT_TABLE, FENCE_GRACE,
    };
}

/// The SQLite backend's options, for [`SqliteStore`].
#[cfg(feature = "sqlite")]
#[cfg_attr(docsrs, doc(cfg(feature = "sqlite")))]
pub mod sqlite {
    pub use idem_runtime::store::sqlite::SqliteOptions;
}

/// The Redis backend's defaults and client crate, for [`RedisStore`].
#[cfg(feature = "redis")]
#[cfg_attr(docsrs, doc(cfg(feature = "redis")))]
pub mod redis {
    pub use idem_runtime::store::redis::{
        redis, RedisConnection, RedisOptions, DEFAULT_EVICTION_CHECK_INTERVAL, DEFAULT_PREFIX,
        FENCE_GRACE, RESPONSE_TIMEOUT,
    };
}

/// Items the `#[idempotent]` expansion names. Not public API: may change in any release.
#[cfg(feature = "runtime")]
#[doc(hidden)]
pub mod __private {
    pub use idem_runtime::__private::*;
}
