//! The `#[idempotent]` attribute of the [`idempotency`](https://docs.rs/idempotency) crate. Use it
//! through that crate (`use idempotency::idempotent;`), not directly.
//!
//! This crate only parses, checks and generates: the expansion is one call into
//! `::idempotency::__private` (or the path given with `crate = ...`), where all behaviour
//! lives, in `idem-runtime`.

mod args;
mod duration;
mod expand;
mod fallback;
mod validate;

use proc_macro::TokenStream;

/// Makes an async function safe to retry: every call with the same key runs the body at most
/// once, and every later call gets the first call's result back.
///
/// ```ignore
/// use idempotency::idempotent;
///
/// #[idempotent(name = "billing.charge", key = req.order_id, ttl = "24h")]
/// async fn charge(req: ChargeRequest) -> Result<Receipt, PaymentError> {
///     processor.charge(&req).await
/// }
/// ```
///
/// The function must be `async` and return `Result<T, E>` with `T: Serialize +
/// DeserializeOwned` (stored as JSON, replayed) and `E: From<idempotency::Error>`. It works on
/// free functions, `&self` / `&mut self` methods, generic functions, and methods inside
/// `#[async_trait]` impls.
///
/// | argument | meaning | default |
/// |---|---|---|
/// | `name = "billing.charge"` | the operation's stable name: part of every storage key, kept when the function moves or is renamed. Required with a durable store (SQLite, Redis, PostgreSQL) | the function's path, memory store only |
/// | `key = EXPR` | an expression over the parameters (borrowed, never moved) giving an `IntoKey`: a string, an integer, a `Uuid` | the fingerprint of the non-skipped parameters |
/// | `scope = EXPR` | for whom, e.g. a tenant id: scopes never share records | none |
/// | `ttl = "24h"` / `ttl = 3600` / `ttl = EXPR` | how long a result is replayed | `24h` |
/// | `lease = "30s"` | how long a claim holds before another caller may take over; renewed while the body runs; at least `100ms` | `30s` |
/// | `store = EXPR` | the store (`IntoStore`): `&S` of a store that is `Clone`, `Arc<S>`, `Arc<dyn Store>`, a built-in store by value | the installed store, else memory |
/// | `skip(a, b)` | parameters left out of the fingerprint (`self` is never in it) | none |
/// | `fingerprint = EXPR` / `fingerprint = false` | what must match when a key is reused | the non-skipped parameters |
/// | `on_conflict = "reject"` / `"wait"`, `wait = "5s"` | a key in flight elsewhere: fail with `Error::InFlight`, or wait for its result | `reject`; waiting defaults to 2 × lease + 1 s |
/// | `cache_errors = true` / `= path::to::predicate` | also keep `Err` results | errors release the key |
/// | `on_replay = path::to::hook` | a `fn(T, &ReplayInfo) -> T` applied to replayed `Ok` values (not to fresh ones); the stored record is unchanged | replayed values as stored |
/// | `max_record_bytes = N` | the largest stored result | 8 MiB |
/// | `on_unknown = "refuse"` / `"rerun"` | a started body with an unknown outcome (panic, abandoned, result not storable): refuse the key (at most once) or release it (at least once) | `refuse` |
/// | `recovery = "1h"` | how long an unknown outcome refuses the key | 1 hour (the ttl if shorter) |
/// | `version = N` | the result's schema version: raise it when the result type changes incompatibly | `0` |
/// | `detach = false` | keep the body in the caller's future even though it owns its data | detached when it owns its data |
/// | `crate = path` | the facade's path if your `Cargo.toml` renames the dependency | `::idempotency` |
///
/// Every mistake is a compile error at the offending token that says how to fix it, and all of
/// them are reported at once.
#[proc_macro_attribute]
pub fn idempotent(args: TokenStream, item: TokenStream) -> TokenStream {
    expand::idempotent(args.into(), item.into()).into()
}
