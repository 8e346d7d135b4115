//! [`IdempotencyKey`]: the key of one logical operation, sent as `Idempotency-Key`;
//! [`KeyRule`]: the rule a key that cannot be sent breaks.

use std::fmt;

use http::header::{HeaderMap, HeaderName, HeaderValue};

use crate::Error;

/// The request header that carries the key: `Idempotency-Key`.
pub const IDEMPOTENCY_KEY: HeaderName = HeaderName::from_static("idempotency-key");

/// The longest key idem's server accepts (and the IETF draft's common limit), in bytes.
pub const MAX_KEY_LEN: usize = 255;

/// The rule a key broke, in [`Error::InvalidKey`]: a key is 1 to [`MAX_KEY_LEN`] bytes of
/// visible ASCII (`!` to `~`: no space, no control character, no byte over 127), given once.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
#[non_exhaustive]
pub enum KeyRule {
    /// The key is empty.
    Empty,
    /// The key is longer than [`MAX_KEY_LEN`] bytes.
    TooLong {
        /// Its length in bytes.
        len: usize,
    },
    /// The key holds a byte that is not visible ASCII.
    NotVisibleAscii {
        /// The offset of the first such byte.
        at: usize,
        /// The byte.
        byte: u8,
    },
    /// The request carries more than one `Idempotency-Key` header (a server refuses it, or
    /// would have to pick one).
    Repeated,
}

impl KeyRule {
    /// The rule `key` breaks, if any.
    fn check(key: &[u8]) -> Option<Self> {
        if key.is_empty() {
            return Some(KeyRule::Empty);
        }
        if key.len() > MAX_KEY_LEN {
            return Some(KeyRule::TooLong { len: key.len() });
        }
        key.iter()
            .position(|b| !b.is_ascii_graphic())
            .map(|at| KeyRule::NotVisibleAscii { at, byte: key[at] })
    }
}

impl fmt::Display for KeyRule {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match *self {
            KeyRule::Empty => f.write_str("it is empty; a key is 1 to 255 bytes"),
            KeyRule::TooLong { len } => {
                write!(
                    f,
                    "it is {len} bytes long; a key is at most {MAX_KEY_LEN} bytes"
                )
            }
            KeyRule::NotVisibleAscii { at, byte } => {
                let what = match byte {
                    b' ' => "a space".to_owned(),
                    b if b.is_ascii_control() => format!("a control character (0x{b:02x})"),
                    b => format!("a non-ASCII byte (0x{b:02x})"),
                };
                write!(
                    f,
                    "byte {at} is {what}; a key is visible ASCII only (`!` to `~`, no spaces)"
                )
            }
            KeyRule::Repeated => f.write_str(
                "the request has more than one Idempotency-Key header; give the key once",
            ),
        }
    }
}

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
/// Without an extension, a key already in the request's `Idempotency-Key` header is kept; a
/// header that breaks a [`KeyRule`] is refused ([`Error::InvalidKey`], nothing is sent), never
/// replaced. Only a request with no key at all gets a new UUIDv7. Either way every retry of the
/// request sends the same key.
#[derive(Clone, PartialEq, Eq, Hash)]
pub struct IdempotencyKey(HeaderValue);

impl IdempotencyKey {
    /// A key from your own value: 1 to [`MAX_KEY_LEN`] bytes of visible ASCII. Otherwise
    /// [`Error::InvalidKey`], whose [`KeyRule`] says which rule the value broke.
    pub fn new(key: impl AsRef<str>) -> Result<Self, Error> {
        Self::from_bytes(key.as_ref().as_bytes())
    }

    /// A key from the bytes of a header value or of your own value.
    fn from_bytes(key: &[u8]) -> Result<Self, Error> {
        match KeyRule::check(key) {
            None => Ok(Self(
                HeaderValue::from_bytes(key).expect("visible ASCII is a valid header value"),
            )),
            Some(rule) => Err(Error::InvalidKey {
                key: String::from_utf8_lossy(key).into_owned(),
                rule,
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

    /// The key of a request: its extension if given, else its `Idempotency-Key` header, else a
    /// new one (only when the caller set no key at all). The header is then set to it.
    ///
    /// A header the caller set is never replaced: if it breaks a [`KeyRule`] (or is given more
    /// than once), the request is refused with [`Error::InvalidKey`] and must not be sent, since
    /// a fresh key would silently lose the deduplication the caller asked for.
    pub(crate) fn for_request(
        extension: Option<&Self>,
        headers: &mut HeaderMap,
    ) -> Result<Self, Error> {
        let key = match extension {
            Some(key) => key.clone(),
            None => {
                let mut values = headers.get_all(IDEMPOTENCY_KEY).iter();
                match (values.next(), values.next()) {
                    (None, _) => Self::generate(),
                    (Some(value), None) => Self::from_bytes(value.as_bytes())?,
                    (Some(value), Some(_)) => {
                        return Err(Error::InvalidKey {
                            key: String::from_utf8_lossy(value.as_bytes()).into_owned(),
                            rule: KeyRule::Repeated,
                        })
                    }
                }
            }
        };
        headers.insert(IDEMPOTENCY_KEY, key.0.clone());
        Ok(key)
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

    fn rule(key: &str) -> KeyRule {
        match IdempotencyKey::new(key) {
            Err(Error::InvalidKey { rule, .. }) => rule,
            other => panic!("{key:?} gave {other:?}"),
        }
    }

    #[test]
    fn keys_are_checked_and_generated_keys_differ() {
        assert_eq!(
            IdempotencyKey::new("order-42").unwrap().as_str(),
            "order-42"
        );
        assert_eq!(
            IdempotencyKey::new("x".repeat(MAX_KEY_LEN))
                .unwrap()
                .as_str()
                .len(),
            MAX_KEY_LEN
        );
        assert_eq!(rule(""), KeyRule::Empty);
        assert_eq!(
            rule("has space"),
            KeyRule::NotVisibleAscii { at: 3, byte: b' ' }
        );
        assert_eq!(
            rule("tab\t"),
            KeyRule::NotVisibleAscii { at: 3, byte: b'\t' }
        );
        assert_eq!(
            rule("caf\u{e9}"),
            KeyRule::NotVisibleAscii { at: 3, byte: 0xc3 }
        );
        assert_eq!(
            rule(&"x".repeat(MAX_KEY_LEN + 1)),
            KeyRule::TooLong {
                len: MAX_KEY_LEN + 1
            }
        );
        let (a, b) = (IdempotencyKey::generate(), IdempotencyKey::generate());
        assert_ne!(a, b);
        assert_eq!(
            uuid::Uuid::parse_str(a.as_str()).unwrap().get_version_num(),
            7
        );
    }

    #[test]
    fn the_message_names_the_broken_rule() {
        let text = |key: &str| IdempotencyKey::new(key).unwrap_err().to_string();
        assert!(
            text("order 42").contains("byte 5 is a space"),
            "{}",
            text("order 42")
        );
        assert!(text("").contains("it is empty"));
        assert!(text(&"k".repeat(300)).contains("it is 300 bytes long; a key is at most 255"));
        assert!(text("caf\u{e9}").contains("a non-ASCII byte (0xc3)"));
    }

    #[test]
    fn the_extension_wins_then_the_header_then_a_new_key() {
        let mut headers = HeaderMap::new();
        headers.insert(IDEMPOTENCY_KEY, HeaderValue::from_static("from-header"));
        let given = IdempotencyKey::new("from-extension").unwrap();
        let key = IdempotencyKey::for_request(Some(&given), &mut headers).unwrap();
        assert_eq!(key, given);
        assert_eq!(headers[IDEMPOTENCY_KEY], "from-extension");

        headers.insert(IDEMPOTENCY_KEY, HeaderValue::from_static("from-header"));
        let key = IdempotencyKey::for_request(None, &mut headers).unwrap();
        assert_eq!(key.as_str(), "from-header");

        let mut empty = HeaderMap::new();
        let key = IdempotencyKey::for_request(None, &mut empty).unwrap();
        assert_eq!(empty[IDEMPOTENCY_KEY], key.as_str());
    }

    #[test]
    fn a_header_the_caller_set_is_refused_never_replaced() {
        for (value, expected) in [
            (
                &b"order 42"[..],
                KeyRule::NotVisibleAscii { at: 5, byte: b' ' },
            ),
            (b"", KeyRule::Empty),
            (b"ord\xe9r", KeyRule::NotVisibleAscii { at: 3, byte: 0xe9 }),
        ] {
            let mut headers = HeaderMap::new();
            headers.insert(IDEMPOTENCY_KEY, HeaderValue::from_bytes(value).unwrap());
            match IdempotencyKey::for_request(None, &mut headers) {
                Err(Error::InvalidKey { rule, .. }) => assert_eq!(rule, expected),
                other => panic!("{value:?} gave {other:?}"),
            }
            assert_eq!(headers[IDEMPOTENCY_KEY].as_bytes(), value, "left as it was");
        }
        let mut twice = HeaderMap::new();
        twice.append(IDEMPOTENCY_KEY, HeaderValue::from_static("a"));
        twice.append(IDEMPOTENCY_KEY, HeaderValue::from_static("b"));
        assert!(matches!(
            IdempotencyKey::for_request(None, &mut twice),
            Err(Error::InvalidKey {
                rule: KeyRule::Repeated,
                ..
            })
        ));
    }
}
