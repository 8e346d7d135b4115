//! Fingerprints: what must match when a key is reused.
//!
//! A fingerprint is the SHA-256 of the canonical JSON of the fingerprinted values: object keys
//! sorted by their UTF-8 bytes, no whitespace, strings escaped as serde_json escapes them. So two
//! `HashMap`s with equal content (whatever their iteration order) give the same fingerprint, and
//! the fingerprint does not depend on serde_json's `preserve_order` feature.

use std::fmt;

use serde::Serialize;
use sha2::{Digest, Sha256};

use crate::error::{Error, Result};

/// SHA-256 of the canonical JSON of a call's fingerprinted values.
#[derive(Clone, Copy, PartialEq, Eq, Hash)]
pub struct Fingerprint(pub [u8; 32]);

impl Fingerprint {
    /// The fingerprint of one value.
    pub fn of<T: Serialize + ?Sized>(value: &T) -> Result<Self> {
        let mut json = Vec::with_capacity(128);
        crate::canonical::write(value, &mut json).map_err(Error::Encode)?;
        Ok(Fingerprint(Sha256::digest(&json).into()))
    }

    /// The fingerprint of raw bytes (the HTTP layer hashes method, path and body this way).
    pub fn of_bytes(parts: &[&[u8]]) -> Self {
        let mut h = Sha256::new();
        for p in parts {
            // Length-prefix each part so ("ab","c") and ("a","bc") differ.
            h.update((p.len() as u64).to_be_bytes());
            h.update(p);
        }
        Fingerprint(h.finalize().into())
    }

    /// 64 lowercase hex digits.
    pub fn to_hex(&self) -> String {
        hex::encode(self.0)
    }

    /// Parses 64 hex digits.
    pub fn from_hex(s: &str) -> Option<Self> {
        <[u8; 32] as hex::FromHex>::from_hex(s)
            .ok()
            .map(Fingerprint)
    }
}

impl fmt::Debug for Fingerprint {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "Fingerprint({})", self.to_hex())
    }
}

/// A value that can be part of a fingerprint: anything `Serialize`.
///
/// Implemented for every such type; it exists so that a parameter that cannot be fingerprinted
/// is reported in one sentence that says what to do.
#[diagnostic::on_unimplemented(
    message = "parameter of type `{Self}` cannot be fingerprinted: it does not implement `Serialize`",
    label = "not `Serialize`",
    note = "leave it out of the fingerprint with `skip(name)` (handles, connections, contexts), derive `serde::Serialize` for it, or give `fingerprint = ...`"
)]
pub trait Fingerprintable: Serialize {}

#[diagnostic::do_not_recommend]
impl<T: Serialize + ?Sized> Fingerprintable for T {}

/// Builds a fingerprint from several values, hashed as the canonical JSON array of them.
///
/// The `#[idempotent]` macro adds each non-skipped parameter in declaration order.
pub struct FingerprintBuilder {
    /// The canonical JSON so far; hashed once at the end, which costs far less than feeding
    /// the hasher the many small pieces a serializer writes.
    json: Vec<u8>,
}

impl Default for FingerprintBuilder {
    fn default() -> Self {
        Self::new()
    }
}

thread_local! {
    /// A buffer reused across calls on a thread, so fingerprinting allocates nothing.
    static SPARE: std::cell::Cell<Vec<u8>> = const { std::cell::Cell::new(Vec::new()) };
}

impl FingerprintBuilder {
    /// An empty builder (fingerprint of `[]`).
    pub fn new() -> Self {
        let mut json = SPARE.with(|spare| spare.take());
        json.clear();
        FingerprintBuilder { json }
    }

    /// Adds one value. Fails with [`Error::Encode`] if it cannot be represented as JSON.
    pub fn add<T: Fingerprintable + ?Sized>(&mut self, value: &T) -> Result<&mut Self> {
        self.json
            .push(if self.json.is_empty() { b'[' } else { b',' });
        crate::canonical::write(value, &mut self.json).map_err(Error::Encode)?;
        Ok(self)
    }

    /// The fingerprint of the values added so far.
    pub fn finish(mut self) -> Fingerprint {
        if self.json.is_empty() {
            self.json.push(b'[');
        }
        self.json.push(b']');
        Fingerprint(Sha256::digest(&self.json).into())
    }
}

impl Drop for FingerprintBuilder {
    fn drop(&mut self) {
        // Keep the buffer for the next call, unless a huge argument made it huge.
        if self.json.capacity() <= 64 * 1024 {
            let json = std::mem::take(&mut self.json);
            SPARE.with(|spare| spare.set(json));
        }
    }
}

/// Canonical JSON of `value` as a `String` (exposed for tests and debugging).
pub fn canonical_json<T: Serialize + ?Sized>(value: &T) -> Result<String> {
    let mut out = Vec::new();
    crate::canonical::write(value, &mut out).map_err(Error::Encode)?;
    Ok(String::from_utf8(out).expect("serde_json writes UTF-8"))
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::collections::{BTreeMap, HashMap};

    #[test]
    fn equal_hashmaps_fingerprint_equal() {
        // Build two maps with different insertion orders and enough entries that their
        // iteration orders differ.
        let mut a = HashMap::new();
        let mut b = HashMap::new();
        for i in 0..64 {
            a.insert(format!("k{i}"), i);
        }
        for i in (0..64).rev() {
            b.insert(format!("k{i}"), i);
        }
        assert_eq!(Fingerprint::of(&a).unwrap(), Fingerprint::of(&b).unwrap());
        let sorted: BTreeMap<_, _> = a.clone().into_iter().collect();
        assert_eq!(
            Fingerprint::of(&a).unwrap(),
            Fingerprint::of(&sorted).unwrap()
        );
        b.insert("k0".into(), 1000);
        assert_ne!(Fingerprint::of(&a).unwrap(), Fingerprint::of(&b).unwrap());
    }

    #[test]
    fn canonical_form_sorts_keys_and_strips_space() {
        let v: serde_json::Value =
            serde_json::from_str(r#"{ "b": [1, {"z": 1, "a": "x\"y"}], "a": null }"#).unwrap();
        assert_eq!(
            canonical_json(&v).unwrap(),
            r#"{"a":null,"b":[1,{"a":"x\"y","z":1}]}"#
        );
    }

    #[test]
    fn builder_is_the_array_of_its_parts() {
        let mut b = FingerprintBuilder::new();
        b.add(&1).unwrap().add("two").unwrap();
        assert_eq!(b.finish(), Fingerprint::of(&(1, "two")).unwrap());
        assert_eq!(
            FingerprintBuilder::new().finish(),
            Fingerprint::of(&Vec::<u8>::new()).unwrap()
        );
    }

    #[test]
    fn non_string_map_keys_are_an_encode_error_not_a_panic() {
        let mut m = HashMap::new();
        m.insert(vec![1u8], 1);
        assert!(matches!(Fingerprint::of(&m), Err(Error::Encode(_))));
    }

    #[test]
    fn hex_round_trip() {
        let f = Fingerprint::of("x").unwrap();
        assert_eq!(Fingerprint::from_hex(&f.to_hex()), Some(f));
        assert_eq!(
            Fingerprint::from_hex(&f.to_hex().to_ascii_uppercase()),
            Some(f)
        );
        let digits = f.to_hex();
        assert_eq!(digits.len(), 64);
        assert!(digits
            .bytes()
            .all(|b| matches!(b, b'0'..=b'9' | b'a'..=b'f')));
        assert_eq!(Fingerprint::from_hex(&digits[..62]), None);
        assert_eq!(Fingerprint::from_hex(&format!("{}zz", &digits[..62])), None);
        assert_eq!(
            Fingerprint::of_bytes(&[]).to_hex(),
            // SHA-256 of nothing.
            "e3b0c44298fc1c149afbf4c8996fb92427ae41e4649b934ca495991b7852b855"
        );
    }
}
