//! What a replayed record must match, and how a mismatch is told apart from damage.

use crate::error::{Error, Result};

use super::Record;

/// What a stored result must match to be replayed into a caller: the caller's operation (if
/// it has one) and schema version.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Expected<'e> {
    /// The caller's operation name; `None` for a plain `Call`.
    pub operation: Option<&'e str>,
    /// The caller's schema version (`version = N`).
    pub result_version: u32,
}

impl Record<'_> {
    /// Decodes the payload as the caller's type `ty` with `decode`, once the record is known to
    /// be of the caller's operation and schema version. A record of another operation or
    /// version, or a payload that is valid JSON of another shape, is [`Error::TypeMismatch`]
    /// (never decoded into the caller's type); a payload that is not JSON at all was damaged,
    /// [`Error::Corrupt`].
    pub fn decode_payload<V>(
        &self,
        expected: &Expected<'_>,
        ty: &str,
        decode: impl FnOnce(&[u8]) -> serde_json::Result<V>,
    ) -> Result<V> {
        // Records of version 1 (no operation) and of plain calls carry no operation to compare;
        // a different one cannot share a storage key unless SHA-256 collides, but is refused.
        let other_operation = matches!(expected.operation, Some(op) if !self.operation.is_empty() && self.operation != op);
        if other_operation || self.result_version != expected.result_version {
            return Err(self.mismatch(expected, ty, None));
        }
        decode(self.payload).map_err(|e| {
            match serde_json::from_slice::<serde::de::IgnoredAny>(self.payload) {
                Ok(_) => self.mismatch(expected, ty, Some(format!("it does not decode: {e}"))),
                Err(_) => Error::corrupt(format!("stored value is not valid JSON for `{ty}`: {e}")),
            }
        })
    }

    /// [`Error::TypeMismatch`]: this record is not what a caller of type `ty` expected.
    pub fn mismatch(&self, expected: &Expected<'_>, ty: &str, why: Option<String>) -> Error {
        let mut found = format!("version {}", self.result_version);
        if !self.operation.is_empty() {
            found = format!("{found} of `{}`", self.operation);
        }
        if !self.type_name.is_empty() {
            found = format!("{found}, written as `{}`", self.type_name);
        }
        if let Some(why) = why {
            found = format!("{found} ({why})");
        }
        let expected = match expected.operation {
            Some(op) => format!("version {} of `{op}`, as `{ty}`", expected.result_version),
            None => format!("version {}, as `{ty}`", expected.result_version),
        };
        Error::TypeMismatch {
            expected,
            found,
            key: None,
        }
    }
}
