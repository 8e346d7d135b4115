//! [`forget`]: removing the record of one call of an `#[idempotent]` function, named as the
//! attribute names it.

use crate::error::Result;
use crate::key::{IntoKey, StorageKey};
use crate::store::{Forgotten, IntoStore};

/// Removes the record that `#[idempotent(name = "...")]` keeps for `key` in `scope`, so the
/// next call with them runs the body again, and wakes the calls waiting for it. An operator's
/// tool: to run a call again on purpose, or to resolve an unknown outcome
/// ([`Error::OutcomeUnknown`](crate::Error::OutcomeUnknown)) once the downstream system has
/// been checked.
///
/// `name` is the attribute's `name = "..."`; `scope` and `key` are the values its
/// `scope = ...` and `key = ...` expressions give (a string, an integer, a `Uuid`: whatever
/// [`IntoKey`] takes; a function without `scope = ...` has the scope `""`). They make the same
/// storage key as the attribute ([`StorageKey::derive_named`]); with a key of your own, call
/// [`Store::forget`](crate::Store::forget).
///
/// A completed record (a stored result, or an unknown outcome) is removed:
/// [`Forgotten::Completed`]. A call in flight is refused with
/// [`Error::InFlight`](crate::Error::InFlight) unless `force` is set; a forced removal
/// ([`Forgotten::InFlight`]) fences the running call off: its result is not stored
/// ([`Error::LeaseLost`](crate::Error::LeaseLost)), even after another call claimed the key
/// again. No record: [`Forgotten::Absent`]. An empty or too long key is
/// [`Error::InvalidKey`](crate::Error::InvalidKey), as for the attribute.
///
/// ```
/// # use idem_runtime as idempotency;
/// use idempotency::{Forgotten, MemoryStore};
///
/// # #[tokio::main(flavor = "current_thread")] async fn main() -> idempotency::Result<()> {
/// let store = MemoryStore::new();
/// // `#[idempotent(name = "billing.charge", key = order_id, store = &store)]` (no `scope`)
/// // charged the order 42 ...
/// # let charge = idempotency::__private::keyed(
/// #     idempotency::Operation::named("billing.charge"), "", &42, Ok(None));
/// # let _: u32 = charge.store(&store)
/// #     .run(idempotency::ErrorPolicy::never(), async { Ok::<_, idempotency::Error>(7) })
/// #     .await?;
/// match idempotency::forget(&store, "billing.charge", "", &42, false).await? {
///     Forgotten::Completed { token } => println!("removed the result of claim {}", token.0),
///     Forgotten::InFlight { .. } => unreachable!("only a forced removal removes a call in flight"),
///     Forgotten::Absent => println!("no record: nothing to forget"),
/// }
/// // ... and the next charge of order 42 runs its body again.
/// # assert_eq!(idempotency::forget(&store, "billing.charge", "", &42, false).await?, Forgotten::Absent);
/// # Ok(()) }
/// ```
pub async fn forget(
    store: impl IntoStore,
    name: &str,
    scope: &(impl IntoKey + ?Sized),
    key: &(impl IntoKey + ?Sized),
    force: bool,
) -> Result<Forgotten> {
    let key = StorageKey::derive_named(name, scope, key)?;
    store.into_store().forget(&key, force).await
}
