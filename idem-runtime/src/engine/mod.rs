//! The engine: claim a key, run the body at most once, store its outcome, replay it.
//!
//! - [`call`](Call): the public builder and the two ways to run a body;
//! - `policy`: defaults, limits and the policies a call is given ([`OnConflict`],
//!   [`OnUnknown`], [`ErrorPolicy`]);
//! - `claim`: claiming a key (waiting for a holder) and replaying a stored result;
//! - `decoded`: replaying values this process already decoded (result types that are `Clone`);
//! - `finish`: running the body under the claim and storing, releasing or recording what
//!   became of it;
//! - `storing`: the one rule for writing an outcome whose body has run (retries, a full store),
//!   used in the caller and in the background;
//! - `step`: a body's durable steps, recorded one by one and replayed when a call resumes;
//! - `renewal`: the lease keeper, a thread that renews the leases held while bodies run;
//! - `background`: work that outlives the caller (storing after the caller left, releasing
//!   from a destructor);
//! - `running`: the one place bodies and background work are spawned, counted so that a
//!   process can [`drain`] before it exits.
//!
//! Everything here is plain Rust, usable (and tested) without the macro:
//!
//! ```
//! # use idem_runtime as idempotency;
//! use idempotency::{Call, ErrorPolicy, StorageKey, MemoryStore, Error};
//! # #[tokio::main(flavor = "current_thread")] async fn main() {
//! let store = MemoryStore::new();
//! let out: Result<u32, Error> = Call::new(StorageKey::derive("docs", "k1").unwrap())
//!     .store(&store)
//!     .run(ErrorPolicy::never(), async { Ok(42) })
//!     .await;
//! assert_eq!(out.unwrap(), 42);
//! # }
//! ```

mod background;
mod call;
mod claim;
mod decoded;
mod finish;
mod policy;
mod purger;
mod renewal;
mod running;
pub(crate) mod step;
mod storing;

#[cfg(feature = "http")]
pub(crate) use call::{unchanged, Interrupted};
pub use call::{Call, OnReplay};
pub use decoded::{Decoding, IntoReplayer, Probe, Replayer, ViaClone, ViaDecode};
pub use policy::{
    default_wait, ErrorPolicy, IdempotentResult, IntoDuration, OnConflict, OnUnknown, Storable,
    DEFAULT_LEASE, DEFAULT_MAX_RECORD_BYTES, DEFAULT_RECOVERY, DEFAULT_TTL, MIN_LEASE,
};
pub use purger::{
    jittered, Purger, PurgerHandle, PurgerStats, DEFAULT_PURGE_BATCH, DEFAULT_PURGE_INTERVAL,
    DEFAULT_PURGE_JITTER,
};
pub use running::{drain, running, DrainReport};
pub use step::{step, step_key, MAX_STEP_NAME_LEN};
