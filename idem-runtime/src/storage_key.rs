//! The storage key: the fixed-length name a record is stored under. Its own module, below
//! both the errors (which carry it) and the key derivation (which returns errors), so that
//! neither imports the other in a circle; the derivation is in [`key`](crate::key).

use std::fmt;

/// The key a record is stored under: 64 lowercase hex digits of SHA-256(operation name, 0x00,
/// scope, 0x00, user key) for a call of an operation ([`derive_for`](Self::derive_for), the
/// attribute's and [`Call::for_operation`](crate::Call::for_operation)'s), or of SHA-256(scope,
/// 0x00, user key) for the HTTP layer, which has no operation ([`derive`](Self::derive)).
#[derive(Clone, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct StorageKey([u8; 64]);

impl StorageKey {
    /// The storage key made from a digest directly (used when the key is the fingerprint).
    pub fn from_digest(digest: &[u8; 32]) -> Self {
        let mut hex = [0u8; 64];
        hex::encode_to_slice(digest, &mut hex).expect("64 hex digits for 32 bytes");
        StorageKey(hex)
    }

    /// Parses 64 lowercase hex digits (as stored by a backend).
    pub fn from_hex(s: &str) -> Option<Self> {
        let bytes = s.as_bytes();
        if bytes.len() != 64 || !bytes.iter().all(|b| matches!(b, b'0'..=b'9' | b'a'..=b'f')) {
            return None;
        }
        let mut hex = [0u8; 64];
        hex.copy_from_slice(bytes);
        Some(StorageKey(hex))
    }

    /// The key as 64 lowercase hex digits.
    pub fn as_str(&self) -> &str {
        // Only ever built from hex digits, which are ASCII.
        std::str::from_utf8(&self.0).expect("storage keys are ASCII hex")
    }
}

impl fmt::Debug for StorageKey {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "StorageKey({})", self.as_str())
    }
}

impl fmt::Display for StorageKey {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}
