//! The one error type of idem.

use std::fmt;
use std::time::Duration;

use crate::storage_key::StorageKey;

/// A boxed error from a store's backend (a Redis, PostgreSQL or SQLite client error).
pub type BoxError = Box<dyn std::error::Error + Send + Sync + 'static>;

/// Everything that can go wrong in an idempotent call, each variant meaningful to a caller.
///
/// An `#[idempotent]` function's error type must implement `From<idempotency::Error>`; the body's own
/// errors pass through untouched, and idem's errors are converted with that `From`.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum Error {
    /// Another call with the same key is running now (and `on_conflict = "reject"`, the
    /// default). Retry later; the running call's result will then be replayed.
    #[error("a call with this idempotency key is already in flight{}", at(key))]
    InFlight {
        /// The record's storage key (`idem get --storage-key ...`), where known.
        key: Option<StorageKey>,
    },

    /// The key was used before with different arguments (a different fingerprint). The stored
    /// result is not returned and the body did not run: the caller reused a key by mistake.
    #[error(
        "idempotency key reused with a different request (fingerprint mismatch){}",
        at(key)
    )]
    KeyReuse {
        /// The record's storage key, where known.
        key: Option<StorageKey>,
    },

    /// The user key is empty or longer than [`MAX_KEY_LEN`](crate::key::MAX_KEY_LEN) bytes.
    /// Nothing ran.
    #[error("invalid idempotency key: {reason}")]
    InvalidKey {
        /// What is wrong with the key.
        reason: String,
    },

    /// This caller's claim was taken over by another caller after its lease expired (it stalled,
    /// or could not renew). Its result was not stored; the newer holder's result stands.
    #[error(
        "the claim's lease was lost to a newer holder (stale fencing token){}",
        at(key)
    )]
    LeaseLost {
        /// The record's storage key, where known.
        key: Option<StorageKey>,
    },

    /// The store could not be reached or failed. The body does not run without a claim.
    #[error("idempotency store error ({backend}): {source}")]
    Store {
        /// Which backend failed: `"memory"`, `"sqlite"`, `"redis"`, `"postgres"`, or a custom name.
        backend: &'static str,
        /// The backend's own error.
        #[source]
        source: BoxError,
    },

    /// The store refused a write because it is full (Redis at `maxmemory` under `noeviction`,
    /// a full disk). A call that could not claim did not run its body; a result that could not
    /// be stored is returned to its caller and stored in the background once there is room.
    /// Make room: raise the limit, lower the ttls, or purge expired records.
    #[error("idempotency store is full ({backend}): {source}")]
    StoreFull {
        /// Which backend is full.
        backend: &'static str,
        /// The backend's own error.
        #[source]
        source: BoxError,
    },
    /// A stored record could not be decoded (truncated, altered, or of an unknown format version).
    /// The body is not re-run silently: remove the record or fix the store.
    #[error("corrupt idempotency record{}: {reason}", at(key))]
    Corrupt {
        /// What was wrong with the record.
        reason: String,
        /// The record's storage key, where known.
        key: Option<StorageKey>,
    },

    /// A stored result does not fit this build: it was written with another schema version
    /// (`version = N`), or it does not decode as the caller's type (the result type changed
    /// incompatibly while records of the old shape were live). The body did not run and
    /// nothing was decoded wrongly. Keep result types backward compatible (new fields with
    /// `#[serde(default)]`, renamed ones with `#[serde(alias)]`); for an incompatible change,
    /// give the function a new `version = N`: until their ttl runs out, records of the old
    /// version then fail with this error (remove them to run those keys again).
    #[error("the stored result ({found}) does not fit this build ({expected}): keep the result type backward compatible (#[serde(default)] on new fields), or for an incompatible change set a new `version = N` and let the old records expire{}", at(key))]
    TypeMismatch {
        /// What the caller expects: schema version, operation, type.
        expected: String,
        /// What the record holds.
        found: String,
        /// The record's storage key, where known.
        key: Option<StorageKey>,
    },

    /// `on_conflict = "wait"`: the call in flight did not finish within the wait limit.
    #[error(
        "gave up waiting {waited:?} for the call in flight with this key{}",
        at(key)
    )]
    WaitTimeout {
        /// How long the call waited.
        waited: Duration,
        /// The record's storage key, where known.
        key: Option<StorageKey>,
    },

    /// The result could not be encoded as JSON (or the arguments could not be fingerprinted),
    /// e.g. a map with non-string keys.
    #[error("could not encode value as JSON: {0}")]
    Encode(#[source] serde_json::Error),

    /// A call with this key started its body earlier, and that body's outcome is unknown: it
    /// panicked, was abandoned, or its result could not be kept. Its side effect may have
    /// happened, so under the at-most-once policy (the default, see
    /// [`OnUnknown`](crate::engine::OnUnknown)) the body is not run again for this key until the
    /// record is resolved: check the downstream system for the effect, then remove the record,
    /// or wait until the recovery window (by default an hour) passes. Retrying at once does not
    /// help.
    #[error("a call with this idempotency key started earlier and its outcome is unknown ({reason}); the body is not run again until the record is resolved{}", at(key))]
    OutcomeUnknown {
        /// What happened to the earlier call: `"the body panicked"`, `"the call was abandoned"`, ...
        reason: String,
        /// The record's storage key (`idem forget --storage-key ...` resolves it), where known.
        key: Option<StorageKey>,
    },

    /// A configuration mistake (a lease below [`MIN_LEASE`](crate::engine::MIN_LEASE), an
    /// unknown store URL, a feature this build lacks). Nothing ran; retrying does not help: fix
    /// the configuration.
    #[error("idempotency configuration error: {reason}")]
    Config {
        /// What is wrong and how to fix it.
        reason: String,
    },

    /// idem was used in a way that cannot be made idempotent, so it refused rather than run
    /// unrecorded: a [`step`](crate::step) outside an idempotent call (or in a task the body
    /// spawned, which does not see the call), two steps of one name in one call (name the
    /// steps of a loop `format!("item-{i}")`), an empty step name. The step did not run;
    /// retrying does not help: fix the code.
    #[error("idempotency misuse: {reason}")]
    Misuse {
        /// What was done, and how to do it instead.
        reason: String,
    },

    /// The encoded result is larger than the configured limit, so it was not stored.
    #[error("result of {size} bytes exceeds the record size limit of {limit} bytes")]
    TooLarge {
        /// The encoded size.
        size: usize,
        /// The configured limit.
        limit: usize,
    },
}

impl Error {
    /// Wraps a backend error as [`Error::Store`].
    pub fn store(backend: &'static str, source: impl Into<BoxError>) -> Self {
        Error::Store {
            backend,
            source: source.into(),
        }
    }

    /// Builds an [`Error::Corrupt`] with a reason (the key is added where the record was read:
    /// see [`Error::with_key`]).
    pub fn corrupt(reason: impl Into<String>) -> Self {
        Error::Corrupt {
            reason: reason.into(),
            key: None,
        }
    }

    /// [`Error::LeaseLost`] for the record under `key`.
    pub fn lease_lost(key: &StorageKey) -> Self {
        Error::LeaseLost {
            key: Some(key.clone()),
        }
    }

    /// The storage key of the record this error concerns, if it concerns one and the key is
    /// known: pass it to `idem get --storage-key` to see the record.
    pub fn storage_key(&self) -> Option<&StorageKey> {
        match self {
            Error::InFlight { key }
            | Error::KeyReuse { key }
            | Error::LeaseLost { key }
            | Error::Corrupt { key, .. }
            | Error::TypeMismatch { key, .. }
            | Error::WaitTimeout { key, .. }
            | Error::OutcomeUnknown { key, .. } => key.as_ref(),
            _ => None,
        }
    }

    /// Records `key` as the storage key of an error that concerns a record and does not name
    /// one yet (an error decoding a record's bytes, say); other errors are returned unchanged.
    pub fn with_key(mut self, storage_key: &StorageKey) -> Self {
        if let Error::InFlight { key }
        | Error::KeyReuse { key }
        | Error::LeaseLost { key }
        | Error::Corrupt { key, .. }
        | Error::TypeMismatch { key, .. }
        | Error::WaitTimeout { key, .. }
        | Error::OutcomeUnknown { key, .. } = &mut self
        {
            if key.is_none() {
                *key = Some(storage_key.clone());
            }
        }
        self
    }

    /// Builds an [`Error::Config`] with a reason.
    pub fn config(reason: impl Into<String>) -> Self {
        Error::Config {
            reason: reason.into(),
        }
    }

    /// Builds an [`Error::Misuse`] with a reason.
    pub fn misuse(reason: impl Into<String>) -> Self {
        Error::Misuse {
            reason: reason.into(),
        }
    }

    /// Whether retrying the same call later may succeed: in flight, a wait that timed out, a
    /// lost lease (the newer holder's result will be replayed), store trouble, a full store
    /// (it drains as records expire or are purged: retry with backoff, as the HTTP layer's
    /// `503` with `Retry-After` says). Never a configuration mistake, a key or record problem,
    /// or an unknown outcome.
    pub fn is_retryable(&self) -> bool {
        matches!(
            self,
            Error::InFlight { .. }
                | Error::Store { .. }
                | Error::StoreFull { .. }
                | Error::WaitTimeout { .. }
                | Error::LeaseLost { .. }
        )
    }
}

/// Prints " (storage key <hex>)" for a known key, nothing otherwise.
fn at(key: &Option<StorageKey>) -> impl fmt::Display + '_ {
    struct At<'a>(&'a Option<StorageKey>);
    impl fmt::Display for At<'_> {
        fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
            match self.0 {
                Some(key) => write!(f, " (storage key {})", key.as_str()),
                None => Ok(()),
            }
        }
    }
    At(key)
}

/// `Result` with [`Error`].
pub type Result<T, E = Error> = std::result::Result<T, E>;

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn errors_about_a_record_print_its_storage_key_once_known() {
        let key = StorageKey::derive("scope", "k").unwrap();
        let bare = Error::corrupt("truncated");
        assert_eq!(bare.storage_key(), None);
        assert_eq!(bare.to_string(), "corrupt idempotency record: truncated");
        let keyed = bare.with_key(&key);
        assert_eq!(keyed.storage_key(), Some(&key));
        assert_eq!(
            keyed.to_string(),
            format!(
                "corrupt idempotency record (storage key {}): truncated",
                key.as_str()
            )
        );
        // A key already known is kept; errors about no record stay as they were.
        let other = StorageKey::derive("scope", "other").unwrap();
        assert_eq!(keyed.with_key(&other).storage_key(), Some(&key));
        let config = Error::config("x").with_key(&key);
        assert_eq!(config.storage_key(), None);
        assert!(Error::lease_lost(&key)
            .to_string()
            .ends_with(&format!("(storage key {})", key.as_str())));
    }
}
