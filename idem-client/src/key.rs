//! [`IdempotencyKey`]: the key of one logical operation, sent as `Idempotency-Key`.

use std::fmt;

use http::header::{HeaderMap, HeaderName, HeaderValue};

use crate::Error;

/// The request header that carries the key: `Idempotency-Key`.
pub const IDEMPOTENCY_KEY: HeaderName = HeaderName::from_static("idempotency-key");

/// The longest key idem's server accepts (and the IETF draft's common limit), in bytes.
pub const MAX_KEY_LEN: usize = 255;

/// The `Idempotency-Key` of one logical operation.
///
/// - **As a request extension** it is the key to send, instead of a new UUIDv7: with
///   reqwest-middleware, `client.post(url).with_extension(IdempotencyKey::new("order-42")?)`;
///   with the tower layer, `request.extensions_mut().insert(key)`. Give the same key when you
///   retry the same operation later (after a restart, from a queue); give a new one for a new
///   operation.
/// - **As a response extension** it is the key that was sent, on every response of a request
///   the policy applies to: log it, store it with the operation.
///
/// Without an extension, a key already in the request's `Idempotency-Key` header is kept;
/// otherwise a new UUIDv7 is generated. Either way every retry of the request sends the same key.
#[derive(Clone, PartialEq, Eq, Hash)]
pub struct IdempotencyKey(HeaderValue);

impl IdempotencyKey {
    /// A key from your own value: 1 to [`MAX_KEY_LEN`] bytes of visible ASCII.
    pub fn new(key: impl AsRef<str>) -> Result<Self, Error> {
        let key = key.as_ref();
        let valid = !key.is_empty()
            && key.len() <= MAX_KEY_LEN
            && key.bytes().all(|b| b.is_ascii_graphic());
        match HeaderValue::from_str(key) {
            Ok(value) if valid => Ok(Self(value)),
            _ => Err(Error::InvalidKey {
                key: key.to_owned(),
            }),
        }
    }

    /// A new key: a UUIDv7 (time-ordered, random), for a new operation.
    pub fn generate() -> Self {
        let uuid = uuid::Uuid::now_v7().hyphenated().to_string();
        Self(HeaderValue::from_str(&uuid).expect("a UUID is a valid header value"))
    }

    /// The key as text.
    pub fn as_str(&self) -> &str {
        self.0.to_str().expect("checked to be visible ASCII")
    }

    /// The key as a header value.
    pub fn header_value(&self) -> &HeaderValue {
        &self.0
    }

    /// The key of a request: its extension if given, else its `Idempotency-Key` header if valid,
    /// else a new one. The header is then set to it.
    pub(crate) fn for_request(extension: Option<&Self>, headers: &mut HeaderMap) -> Self {
        let key = extension.cloned().unwrap_or_else(|| {
            headers
                .get(IDEMPOTENCY_KEY)
                .and_then(|v| v.to_str().ok())
                .and_then(|v| Self::new(v).ok())
                .unwrap_or_else(Self::generate)
        });
        headers.insert(IDEMPOTENCY_KEY, key.0.clone());
        key
    }
}

impl fmt::Display for IdempotencyKey {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

impl fmt::Debug for IdempotencyKey {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_tuple("IdempotencyKey")
            .field(&self.as_str())
            .finish()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn keys_are_checked_and_generated_keys_differ() {
        assert_eq!(
            IdempotencyKey::new("order-42").unwrap().as_str(),
            "order-42"
        );
        assert!(IdempotencyKey::new("").is_err());
        assert!(IdempotencyKey::new("has space").is_err());
        assert!(IdempotencyKey::new("x".repeat(MAX_KEY_LEN + 1)).is_err());
        let (a, b) = (IdempotencyKey::generate(), IdempotencyKey::generate());
        assert_ne!(a, b);
        assert_eq!(
            uuid::Uuid::parse_str(a.as_str()).unwrap().get_version_num(),
            7
        );
    }

    #[test]
    fn the_extension_wins_then_the_header_then_a_new_key() {
        let mut headers = HeaderMap::new();
        headers.insert(IDEMPOTENCY_KEY, HeaderValue::from_static("from-header"));
        let given = IdempotencyKey::new("from-extension").unwrap();
        let key = IdempotencyKey::for_request(Some(&given), &mut headers);
        assert_eq!(key, given);
        assert_eq!(headers[IDEMPOTENCY_KEY], "from-extension");

        headers.insert(IDEMPOTENCY_KEY, HeaderValue::from_static("from-header"));
        let key = IdempotencyKey::for_request(None, &mut headers);
        assert_eq!(key.as_str(), "from-header");

        let mut empty = HeaderMap::new();
        let key = IdempotencyKey::for_request(None, &mut empty);
        assert_eq!(empty[IDEMPOTENCY_KEY], key.as_str());
    }
}
