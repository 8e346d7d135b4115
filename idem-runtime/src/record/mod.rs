//! The stored record: a versioned, checksummed envelope around a result's serde_json bytes.
//!
//! Stores keep these bytes opaque; only this module reads them. The byte format is pinned by
//! golden tests, so records written by one release stay readable by the next. Layout (v2, all
//! integers big-endian):
//!
//! | bytes | field |
//! |---|---|
//! | 4 | magic `IDEM` |
//! | 1 | format version, `2` |
//! | 1 | outcome: `0` = `Ok`, `1` = `Err`, `2` = unknown (the payload is a UTF-8 reason) |
//! | 1 | flags: bit 0 = has fingerprint |
//! | 32 | fingerprint (zeros if none) |
//! | 8 | fencing token of the claim that wrote it |
//! | 8 | completed at, milliseconds since the Unix epoch (writer's clock, informational) |
//! | 8 | ttl in milliseconds |
//! | 2 | length of the type name |
//! | n | Rust type name of the payload, UTF-8 (informational: for people reading the record, never compared) |
//! | 2 | length of the operation name |
//! | o | the operation's stable name (`name = "billing.charge"`), UTF-8; empty for a plain `Call` |
//! | 4 | the result's schema version (`version = N`, default 0) |
//! | 4 | payload length |
//! | m | payload (serde_json bytes for `#[idempotent]`) |
//! | 4 | CRC-32 of everything before it |
//!
//! Version 1 (idem 0.1) had no operation and no schema version: the type name was followed by
//! the payload length. Version 1 records still decode, as operation `""` and schema version 0.
//!
//! Whether a stored value belongs to a caller is not decided by Rust type names, which change
//! when a type moves or the compiler changes: the operation name is part of the storage key, the
//! schema version is compared, and the payload must decode as the caller's type.

use std::time::Duration;

use crate::error::{Error, Result};
use crate::fingerprint::Fingerprint;

mod expect;
mod readable;
pub use expect::Expected;
/// The readable columns of the SQL stores.
#[cfg(any(feature = "sqlite", feature = "postgres"))]
pub(crate) use readable::{Readable, STATUS_PROCESSING};

/// The magic bytes every record starts with.
pub const MAGIC: &[u8; 4] = b"IDEM";
/// The format version this release writes.
pub const FORMAT_VERSION: u8 = 2;
/// The oldest format version this release reads.
pub const OLDEST_FORMAT_VERSION: u8 = 1;
const FIXED_HEADER: usize = 4 + 1 + 1 + 1 + 32 + 8 + 8 + 8 + 2;

/// Whether the stored payload is the `Ok` or the `Err` of the result.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Outcome {
    /// The body returned `Ok`.
    Ok,
    /// The body returned `Err` and the error was kept (`cache_errors`).
    Err,
    /// The body started but its outcome is unknown (it panicked, was abandoned, or its result
    /// could not be kept); the payload is a UTF-8 reason and the type name is empty. Replayed
    /// as [`Error::OutcomeUnknown`].
    Unknown,
}

/// A decoded (or to-be-encoded) record, borrowing its strings from the bytes.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Record<'a> {
    /// `Ok` or `Err`.
    pub outcome: Outcome,
    /// The fingerprint of the call that produced it, if fingerprinting was on.
    pub fingerprint: Option<Fingerprint>,
    /// The fencing token of the claim that completed it.
    pub token: u64,
    /// When it was completed, ms since the Unix epoch (the writer's clock; for humans only,
    /// expiry is the store's business).
    pub completed_at_ms: u64,
    /// The ttl it was stored with, in ms.
    pub ttl_ms: u64,
    /// `std::any::type_name` of the payload's type, for people reading the record; never
    /// compared (it changes when the type moves or the compiler changes).
    pub type_name: &'a str,
    /// The stable name of the operation that wrote it (`""` for a plain `Call`, and for
    /// version 1 records).
    pub operation: &'a str,
    /// The result's schema version (`version = N` of the attribute; 0 by default and for
    /// version 1 records).
    pub result_version: u32,
    /// The encoded value.
    pub payload: &'a [u8],
}

impl<'a> Record<'a> {
    /// A record of `outcome` written now under `token`, kept for `ttl`, with no fingerprint,
    /// type name, operation or schema version (set them with struct update syntax).
    pub fn now(outcome: Outcome, token: u64, ttl: Duration, payload: &'a [u8]) -> Self {
        Record {
            outcome,
            fingerprint: None,
            token,
            completed_at_ms: std::time::SystemTime::now()
                .duration_since(std::time::UNIX_EPOCH)
                .map(|d| u64::try_from(d.as_millis()).unwrap_or(u64::MAX))
                .unwrap_or(0),
            ttl_ms: u64::try_from(ttl.as_millis()).unwrap_or(u64::MAX),
            type_name: "",
            operation: "",
            result_version: 0,
            payload,
        }
    }

    /// The record of an unknown outcome (see [`Outcome::Unknown`]), kept for `recovery`.
    pub fn unknown(token: u64, reason: &'a str, recovery: Duration) -> Self {
        Record::now(Outcome::Unknown, token, recovery, reason.as_bytes())
    }

    /// The reason a record of an unknown outcome gives.
    pub fn reason(&self) -> String {
        String::from_utf8_lossy(self.payload).into_owned()
    }

    /// Encodes the record in the current format.
    pub fn encode(&self) -> Vec<u8> {
        let mut out = Vec::with_capacity(
            FIXED_HEADER
                + self.type_name.len()
                + 2
                + self.operation.len()
                + 8
                + self.payload.len()
                + 4,
        );
        out.extend_from_slice(MAGIC);
        out.push(FORMAT_VERSION);
        out.push(match self.outcome {
            Outcome::Ok => 0,
            Outcome::Err => 1,
            Outcome::Unknown => 2,
        });
        out.push(u8::from(self.fingerprint.is_some()));
        out.extend_from_slice(&self.fingerprint.map(|f| f.0).unwrap_or([0; 32]));
        out.extend_from_slice(&self.token.to_be_bytes());
        out.extend_from_slice(&self.completed_at_ms.to_be_bytes());
        out.extend_from_slice(&self.ttl_ms.to_be_bytes());
        // Type names over 64 KiB (deeply nested generics) are cut at a character boundary, so
        // the stored name stays UTF-8; the decoder compares the same cut (see `type_name_key`).
        let name = type_name_key(self.type_name).as_bytes();
        out.extend_from_slice(&(name.len() as u16).to_be_bytes());
        out.extend_from_slice(name);
        let operation = type_name_key(self.operation).as_bytes();
        out.extend_from_slice(&(operation.len() as u16).to_be_bytes());
        out.extend_from_slice(operation);
        out.extend_from_slice(&self.result_version.to_be_bytes());
        out.extend_from_slice(&(self.payload.len() as u32).to_be_bytes());
        out.extend_from_slice(self.payload);
        let crc = crc32fast::hash(&out);
        out.extend_from_slice(&crc.to_be_bytes());
        out
    }

    /// Encodes the record, refusing one whose payload does not fit the envelope's 32-bit
    /// length or whose encoding is larger than `limit` bytes ([`Error::TooLarge`]).
    pub fn encode_checked(&self, limit: usize) -> Result<Vec<u8>> {
        if self.payload.len() > u32::MAX as usize {
            return Err(Error::TooLarge {
                size: self.payload.len(),
                limit: u32::MAX as usize,
            });
        }
        let bytes = self.encode();
        if bytes.len() > limit {
            return Err(Error::TooLarge {
                size: bytes.len(),
                limit,
            });
        }
        Ok(bytes)
    }

    /// Decodes a record, checking magic, version, lengths and checksum. Any defect is
    /// [`Error::Corrupt`]; this never panics, whatever the input.
    pub fn decode(bytes: &'a [u8]) -> Result<Record<'a>> {
        let mut r = Reader { bytes, pos: 0 };
        if r.take(4)? != MAGIC {
            return Err(Error::corrupt("not an idem record (bad magic)"));
        }
        let version = r.u8()?;
        if !(OLDEST_FORMAT_VERSION..=FORMAT_VERSION).contains(&version) {
            return Err(Error::corrupt(format!(
                "unknown record format version {version} (this release reads {OLDEST_FORMAT_VERSION} to {FORMAT_VERSION})"
            )));
        }
        if bytes.len() < 4 {
            return Err(Error::corrupt("truncated record"));
        }
        let (body, crc) = bytes.split_at(bytes.len() - 4);
        if crc32fast::hash(body).to_be_bytes() != crc {
            return Err(Error::corrupt(
                "checksum mismatch (record altered or truncated)",
            ));
        }
        let outcome = match r.u8()? {
            0 => Outcome::Ok,
            1 => Outcome::Err,
            2 => Outcome::Unknown,
            other => return Err(Error::corrupt(format!("unknown outcome tag {other}"))),
        };
        let flags = r.u8()?;
        if flags & !1 != 0 {
            return Err(Error::corrupt(format!("unknown flags {flags:#x}")));
        }
        let fp: [u8; 32] = r.take(32)?.try_into().expect("took 32 bytes");
        let fingerprint = (flags & 1 == 1).then_some(Fingerprint(fp));
        let token = r.u64()?;
        let completed_at_ms = r.u64()?;
        let ttl_ms = r.u64()?;
        let name_len = r.u16()? as usize;
        let type_name = std::str::from_utf8(r.take(name_len)?)
            .map_err(|_| Error::corrupt("type name is not UTF-8"))?;
        let (operation, result_version) = if version >= 2 {
            let op_len = r.u16()? as usize;
            let operation = std::str::from_utf8(r.take(op_len)?)
                .map_err(|_| Error::corrupt("operation name is not UTF-8"))?;
            (operation, r.u32()?)
        } else {
            ("", 0)
        };
        let payload_len = r.u32()? as usize;
        let payload = r.take(payload_len)?;
        if r.pos != body.len() {
            return Err(Error::corrupt("trailing bytes after payload"));
        }
        Ok(Record {
            outcome,
            fingerprint,
            token,
            completed_at_ms,
            ttl_ms,
            type_name,
            operation,
            result_version,
            payload,
        })
    }
}

/// Checks that `encoded`, a value encoded to be stored as the payload of a record (an `Ok` or
/// a kept `Err`), decodes back (with `decode`), so that a value that cannot be replayed is
/// refused when it is stored, not found out on the retry: serde_json writes a `NaN` or
/// infinite float as `null`, which no `f64` decodes from. The check decodes the payload once,
/// on the path that runs the body.
pub fn encode_payload<D>(
    encoded: serde_json::Result<Vec<u8>>,
    decode: impl FnOnce(&[u8]) -> serde_json::Result<D>,
) -> serde_json::Result<Vec<u8>> {
    let payload = encoded?;
    match decode(&payload) {
        Ok(_) => Ok(payload),
        Err(e) => Err(<serde_json::Error as serde::de::Error>::custom(format_args!(
            "the value would not decode back from its JSON ({e}); a NaN or infinite float is written as null, which does not decode as a float"
        ))),
    }
}

/// The form of a type name that is stored: at most `u16::MAX` bytes, cut at a character
/// boundary. Compare an expected type name in this form with a decoded one.
pub fn type_name_key(name: &str) -> &str {
    let mut end = name.len().min(u16::MAX as usize);
    while !name.is_char_boundary(end) {
        end -= 1;
    }
    &name[..end]
}

struct Reader<'a> {
    bytes: &'a [u8],
    pos: usize,
}

impl<'a> Reader<'a> {
    fn take(&mut self, n: usize) -> Result<&'a [u8]> {
        let end = self
            .pos
            .checked_add(n)
            .filter(|&end| end <= self.bytes.len())
            .ok_or_else(|| Error::corrupt("truncated record"))?;
        let s = &self.bytes[self.pos..end];
        self.pos = end;
        Ok(s)
    }
    fn u8(&mut self) -> Result<u8> {
        Ok(self.take(1)?[0])
    }
    fn u16(&mut self) -> Result<u16> {
        Ok(u16::from_be_bytes(
            self.take(2)?.try_into().expect("2 bytes"),
        ))
    }
    fn u32(&mut self) -> Result<u32> {
        Ok(u32::from_be_bytes(
            self.take(4)?.try_into().expect("4 bytes"),
        ))
    }
    fn u64(&mut self) -> Result<u64> {
        Ok(u64::from_be_bytes(
            self.take(8)?.try_into().expect("8 bytes"),
        ))
    }
}

#[cfg(test)]
mod tests;
