//! User keys and storage keys.
//!
//! A user key is whatever the `key = ...` expression gives (a string, an integer, a UUID). It is
//! never used as a backend key or as SQL text: the storage key is
//! `hex(SHA-256(operation, 0x00, scope, 0x00, user key))` for `#[idempotent]` functions
//! ([`StorageKey::derive_for`]) and `hex(SHA-256(scope, 0x00, user key))` for the HTTP layer
//! and plain calls ([`StorageKey::derive`]): fixed length and safe for every backend.

use sha2::{Digest, Sha256};

use crate::error::{Error, Result};
pub use crate::storage_key::StorageKey;

/// The longest accepted user key, in bytes.
pub const MAX_KEY_LEN: usize = 255;

/// A value usable as an idempotency key or scope: it appends its bytes to a buffer.
///
/// Implemented for strings, integers, `bool`, `char` and references to them, and for
/// `uuid::Uuid` with the `uuid` feature. Implement it for your own id types.
#[diagnostic::on_unimplemented(
    message = "`{Self}` cannot be used as an idempotency key",
    label = "this key is a `{Self}`",
    note = "keys are strings, integers, `bool`, `char`, byte slices or `Uuid` (feature `uuid`): use a field of it (`key = req.order_id`), format it (`key = format!(\"{{}}:{{}}\", a, b)`), or implement `IntoKey` for `{Self}`"
)]
pub trait IntoKey {
    /// Appends this key's bytes to `out`.
    fn append_key(&self, out: &mut Vec<u8>);
}

impl<K: IntoKey + ?Sized> IntoKey for &K {
    fn append_key(&self, out: &mut Vec<u8>) {
        (**self).append_key(out)
    }
}

impl IntoKey for str {
    fn append_key(&self, out: &mut Vec<u8>) {
        out.extend_from_slice(self.as_bytes())
    }
}

impl IntoKey for String {
    fn append_key(&self, out: &mut Vec<u8>) {
        out.extend_from_slice(self.as_bytes())
    }
}

impl IntoKey for std::borrow::Cow<'_, str> {
    fn append_key(&self, out: &mut Vec<u8>) {
        out.extend_from_slice(self.as_bytes())
    }
}

impl IntoKey for [u8] {
    fn append_key(&self, out: &mut Vec<u8>) {
        out.extend_from_slice(self)
    }
}

impl IntoKey for Vec<u8> {
    fn append_key(&self, out: &mut Vec<u8>) {
        out.extend_from_slice(self)
    }
}

macro_rules! display_keys {
    ($($t:ty),*) => {$(
        impl IntoKey for $t {
            fn append_key(&self, out: &mut Vec<u8>) {
                use std::io::Write;
                // Writing to a Vec cannot fail.
                let _ = write!(out, "{}", self);
            }
        }
    )*};
}
display_keys!(u8, u16, u32, u64, u128, usize, i8, i16, i32, i64, i128, isize, bool, char);

#[cfg(feature = "uuid")]
impl IntoKey for uuid::Uuid {
    fn append_key(&self, out: &mut Vec<u8>) {
        let mut buf = uuid::Uuid::encode_buffer();
        out.extend_from_slice(self.hyphenated().encode_lower(&mut buf).as_bytes())
    }
}

/// What an idempotent function does, as part of its identity: a stable name such as
/// `"billing.charge"` (`name = "..."` in the attribute), apart from the scope (for whom: a
/// tenant) and the key (which request).
///
/// The name is part of every storage key, so two operations never share a record: `refund`
/// after `charge` with the same scope and key runs `refund`. A stable name survives moving or
/// renaming the function. Without one, the attribute falls back to the function's path
/// (`module::function`), which changes when the function moves: that default is refused by
/// durable stores ([`Store::durable`](crate::Store::durable)), whose records outlive the build that wrote them.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Operation {
    name: &'static str,
    explicit: bool,
}

impl Operation {
    /// An operation with a stable name chosen by the user.
    pub const fn named(name: &'static str) -> Self {
        Operation {
            name,
            explicit: true,
        }
    }

    /// An operation named after its function's path: fine for records that die with the
    /// process (the memory store), refused by durable stores.
    pub const fn from_path(path: &'static str) -> Self {
        Operation {
            name: path,
            explicit: false,
        }
    }

    /// The name.
    pub fn name(&self) -> &'static str {
        self.name
    }

    /// Whether the name was chosen by the user (stable across refactoring).
    pub fn is_stable(&self) -> bool {
        self.explicit
    }
}

impl StorageKey {
    /// Derives the storage key of `user_key` for `operation` in `scope`:
    /// SHA-256(operation name, 0x00, scope, 0x00, user key). What `#[idempotent]` uses.
    pub fn derive_for(
        operation: &Operation,
        scope: &(impl IntoKey + ?Sized),
        user_key: &(impl IntoKey + ?Sized),
    ) -> Result<Self> {
        Self::derive_named(operation.name, scope, user_key)
    }

    /// [`derive_for`](Self::derive_for) with the operation's name given as a string (an
    /// operator's tool reads it at run time): the key of `#[idempotent(name = "...")]`.
    pub fn derive_named(
        operation: &str,
        scope: &(impl IntoKey + ?Sized),
        user_key: &(impl IntoKey + ?Sized),
    ) -> Result<Self> {
        if operation.as_bytes().contains(&0) {
            return Err(Error::config("an operation name contains a NUL byte"));
        }
        Self::derive_parts(Some(operation), scope, user_key)
    }

    /// Derives the storage key of `user_key` in `scope`, checking the user key's length.
    pub fn derive(
        scope: &(impl IntoKey + ?Sized),
        user_key: &(impl IntoKey + ?Sized),
    ) -> Result<Self> {
        Self::derive_parts(None, scope, user_key)
    }

    fn derive_parts(
        operation: Option<&str>,
        scope: &(impl IntoKey + ?Sized),
        user_key: &(impl IntoKey + ?Sized),
    ) -> Result<Self> {
        thread_local! {
            /// Reused across calls on a thread: deriving a key allocates nothing.
            static BUF: std::cell::Cell<Vec<u8>> = const { std::cell::Cell::new(Vec::new()) };
        }
        let mut buf = BUF.with(|b| b.take());
        buf.clear();
        if let Some(operation) = operation {
            buf.extend_from_slice(operation.as_bytes());
            buf.push(0);
        }
        let scope_from = buf.len();
        scope.append_key(&mut buf);
        let scope_len = buf.len();
        buf.push(0);
        user_key.append_key(&mut buf);
        let key_len = buf.len() - scope_len - 1;
        // The 0x00 separates scope from key: a NUL inside the scope would make
        // ("s\0", "k") and ("s", "\0k") hash alike, letting one scope reach another's records.
        let result = if buf[scope_from..scope_len].contains(&0) {
            Err(Error::InvalidKey {
                reason: "the scope contains a NUL byte".into(),
            })
        } else if key_len == 0 {
            Err(Error::InvalidKey {
                reason: "the key is empty".into(),
            })
        } else if key_len > MAX_KEY_LEN {
            Err(Error::InvalidKey {
                reason: format!("the key is {key_len} bytes long; the limit is {MAX_KEY_LEN}"),
            })
        } else {
            Ok(Self::from_digest(&Sha256::digest(&buf).into()))
        };
        if buf.capacity() <= 4096 {
            BUF.with(|b| b.set(buf));
        }
        result
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn storage_key_is_fixed_length_hex_and_scoped() {
        let a = StorageKey::derive("svc::charge", "order-1").unwrap();
        let b = StorageKey::derive("svc::refund", "order-1").unwrap();
        assert_eq!(a.as_str().len(), 64);
        assert_ne!(a, b, "scopes must not share records");
        assert_eq!(
            a,
            StorageKey::derive("svc::charge", &String::from("order-1")).unwrap()
        );
        assert_eq!(StorageKey::from_hex(a.as_str()), Some(a));
    }

    #[test]
    fn scope_and_key_are_separated() {
        // ("ab", "c") and ("a", "bc") must not collide.
        assert_ne!(
            StorageKey::derive("ab", "c").unwrap(),
            StorageKey::derive("a", "bc").unwrap()
        );
    }

    #[test]
    fn known_vector() {
        // sha256("s\0k")
        let k = StorageKey::derive("s", "k").unwrap();
        let mut h = Sha256::new();
        h.update(b"s\0k");
        assert_eq!(k, StorageKey::from_digest(&h.finalize().into()));
    }

    #[test]
    fn a_nul_in_the_scope_is_refused() {
        let err = StorageKey::derive("s\0", "k").unwrap_err();
        assert!(err.to_string().contains("NUL"), "{err}");
        // NULs in the key are fine: the separator comes before them.
        assert!(StorageKey::derive("s", "\0k").is_ok());
    }

    #[test]
    fn empty_and_long_keys_are_invalid() {
        assert!(matches!(
            StorageKey::derive("s", ""),
            Err(Error::InvalidKey { .. })
        ));
        let long = "x".repeat(MAX_KEY_LEN + 1);
        assert!(matches!(
            StorageKey::derive("s", &long),
            Err(Error::InvalidKey { .. })
        ));
        assert!(StorageKey::derive("s", &"x".repeat(MAX_KEY_LEN)).is_ok());
        assert!(StorageKey::derive("s", &42u64).is_ok());
    }
}
