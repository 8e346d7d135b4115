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
    pub schema: u32,
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
            schema: 0,
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
        out.extend_from_slice(&self.schema.to_be_bytes());
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
        let (operation, schema) = if version >= 2 {
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
            schema,
            payload,
        })
    }
}

/// What a stored result must match to be replayed into a caller: the caller's operation (if
/// it has one) and schema version.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Expected<'e> {
    /// The caller's operation name; `None` for a plain `Call`.
    pub operation: Option<&'e str>,
    /// The caller's schema version (`version = N`).
    pub schema: u32,
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
        if other_operation || self.schema != expected.schema {
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
        let mut found = format!("version {}", self.schema);
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
            Some(op) => format!("version {} of `{op}`, as `{ty}`", expected.schema),
            None => format!("version {}, as `{ty}`", expected.schema),
        };
        Error::TypeMismatch { expected, found }
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
mod tests {
    use super::*;

    fn sample() -> Record<'static> {
        Record {
            outcome: Outcome::Ok,
            fingerprint: Some(Fingerprint([0xab; 32])),
            token: 7,
            completed_at_ms: 1_700_000_000_000,
            ttl_ms: 86_400_000,
            type_name: "app::Receipt",
            operation: "billing.charge",
            schema: 3,
            payload: br#"{"id":"r_1","amount":500}"#,
        }
    }

    fn from_hex(hex: &str) -> Vec<u8> {
        (0..hex.len())
            .step_by(2)
            .map(|i| u8::from_str_radix(&hex[i..i + 2], 16).unwrap())
            .collect()
    }

    /// Golden bytes: if this test fails, the stored format changed. Bump FORMAT_VERSION and keep
    /// a decoder for this version instead of editing the expectation.
    #[test]
    fn golden_v2_bytes() {
        let bytes = sample().encode();
        let golden = concat!(
            "4944454d",
            "02",
            "00",
            "01",
            "abababababababababababababababababababababababababababababababab",
            "0000000000000007",
            "0000018bcfe56800",
            "0000000005265c00",
            "000c",
            "6170703a3a52656365697074",
            "000e",
            "62696c6c696e672e636861726765",
            "00000003",
            "00000019",
            "7b226964223a22725f31222c22616d6f756e74223a3530307d",
        );
        let hex: String = bytes.iter().map(|b| format!("{b:02x}")).collect();
        assert_eq!(&hex[..hex.len() - 8], golden);
        // The checksum is CRC-32 (IEEE) of the rest.
        assert_eq!(
            &hex[hex.len() - 8..],
            format!("{:08x}", crc32fast::hash(&bytes[..bytes.len() - 4]))
        );
        assert_eq!(Record::decode(&bytes).unwrap(), sample());
    }

    /// A record exactly as idem 0.1 wrote it (format version 1, checksum included) still
    /// decodes: operation `""`, schema version 0.
    #[test]
    fn golden_v1_bytes_still_decode() {
        let bytes = from_hex(concat!(
            "4944454d",
            "01",
            "00",
            "01",
            "abababababababababababababababababababababababababababababababab",
            "0000000000000007",
            "0000018bcfe56800",
            "0000000005265c00",
            "000c",
            "6170703a3a52656365697074",
            "00000019",
            "7b226964223a22725f31222c22616d6f756e74223a3530307d",
            "34581483",
        ));
        let record = Record::decode(&bytes).unwrap();
        assert_eq!(
            record,
            Record {
                operation: "",
                schema: 0,
                ..sample()
            }
        );
    }

    #[test]
    fn unknown_outcomes_round_trip_with_their_reason() {
        let rec = Record {
            outcome: Outcome::Unknown,
            type_name: "",
            payload: b"the body panicked",
            ..sample()
        };
        assert_eq!(Record::decode(&rec.encode()).unwrap(), rec);
    }

    #[test]
    fn round_trip_without_fingerprint_and_err_outcome() {
        let rec = Record {
            outcome: Outcome::Err,
            fingerprint: None,
            ..sample()
        };
        assert_eq!(Record::decode(&rec.encode()).unwrap(), rec);
    }

    #[test]
    fn every_truncation_and_every_bit_flip_is_corrupt() {
        let bytes = sample().encode();
        for n in 0..bytes.len() {
            assert!(
                matches!(Record::decode(&bytes[..n]), Err(Error::Corrupt { .. })),
                "truncated to {n}"
            );
        }
        for i in 0..bytes.len() {
            for bit in 0..8 {
                let mut b = bytes.clone();
                b[i] ^= 1 << bit;
                assert!(
                    matches!(Record::decode(&b), Err(Error::Corrupt { .. })),
                    "flip byte {i} bit {bit}"
                );
            }
        }
    }

    #[test]
    fn garbage_and_future_versions_are_corrupt() {
        assert!(matches!(
            Record::decode(b"garbage"),
            Err(Error::Corrupt { .. })
        ));
        let mut b = sample().encode();
        b[4] = 3;
        let err = Record::decode(&b).unwrap_err();
        assert!(err.to_string().contains("version 3"), "{err}");
    }

    /// Property tests of the decoder: whatever the bytes, `decode` returns `Ok` or
    /// `Error::Corrupt`, never panics; what `encode` writes decodes to the same record; and a
    /// truncated or bit-flipped record is always `Corrupt`. 2048 cases per property
    /// (`PROPTEST_CASES` does not lower it).
    mod proptests {
        use super::*;
        use proptest::collection::vec;
        use proptest::prelude::*;

        /// Decodes `bytes`: `Ok` or `Corrupt` (with a reason), nothing else.
        fn decodes_or_is_corrupt(bytes: &[u8]) -> std::result::Result<bool, TestCaseError> {
            match Record::decode(bytes) {
                Ok(_) => Ok(true),
                Err(Error::Corrupt { reason }) => {
                    prop_assert!(!reason.is_empty());
                    Ok(false)
                }
                Err(other) => Err(TestCaseError::fail(format!("not Corrupt: {other:?}"))),
            }
        }

        fn with_crc(mut body: Vec<u8>) -> Vec<u8> {
            let crc = crc32fast::hash(&body);
            body.extend_from_slice(&crc.to_be_bytes());
            body
        }

        /// The fields of a record, owned.
        type Fields = (
            bool,
            Option<[u8; 32]>,
            u64,
            u64,
            u64,
            String,
            Vec<u8>,
            (String, u32),
        );

        fn fields() -> impl Strategy<Value = Fields> {
            (
                any::<bool>(),
                any::<Option<[u8; 32]>>(),
                any::<u64>(),
                any::<u64>(),
                any::<u64>(),
                // Type names: short Rust-like paths, or any text (multi-byte too).
                prop_oneof!["[a-z_:<>, ]{0,40}", any::<String>()],
                vec(any::<u8>(), 0..300),
                ("[a-z_.]{0,20}", any::<u32>()),
            )
        }

        fn build(f: &Fields) -> Record<'_> {
            Record {
                outcome: if f.0 { Outcome::Ok } else { Outcome::Err },
                fingerprint: f.1.map(Fingerprint),
                token: f.2,
                completed_at_ms: f.3,
                ttl_ms: f.4,
                type_name: &f.5,
                operation: &f.7 .0,
                schema: f.7 .1,
                payload: &f.6,
            }
        }

        proptest! {
            #![proptest_config(ProptestConfig {
                cases: 2048,
                failure_persistence: None,
                ..ProptestConfig::default()
            })]

            #[test]
            fn arbitrary_bytes_decode_or_are_corrupt(bytes in vec(any::<u8>(), 0..400)) {
                decodes_or_is_corrupt(&bytes)?;
            }

            /// Magic, version and a correct checksum around arbitrary bytes: the field parsing
            /// behind the first checks gets arbitrary input.
            #[test]
            fn framed_arbitrary_bytes_decode_or_are_corrupt(
                outcome in 0u8..3,
                flags in 0u8..3,
                tail in vec(any::<u8>(), 0..400),
            ) {
                let mut body = MAGIC.to_vec();
                body.extend_from_slice(&[FORMAT_VERSION, outcome, flags]);
                body.extend_from_slice(&tail);
                decodes_or_is_corrupt(&with_crc(body))?;
            }

            #[test]
            fn records_round_trip(f in fields()) {
                let record = build(&f);
                let bytes = record.encode();
                prop_assert_eq!(Record::decode(&bytes)?, record);
            }

            #[test]
            fn truncated_records_are_corrupt(f in fields(), cut in any::<prop::sample::Index>()) {
                let bytes = build(&f).encode();
                let cut = cut.index(bytes.len());
                prop_assert!(!decodes_or_is_corrupt(&bytes[..cut])?, "truncated to {}", cut);
            }

            /// CRC-32 catches every change of up to three bits in records this short.
            #[test]
            fn bit_flipped_records_are_corrupt(
                f in fields(),
                flips in vec((any::<prop::sample::Index>(), 0u8..8), 1..=3),
            ) {
                let mut bytes = build(&f).encode();
                let flips: std::collections::BTreeSet<(usize, u8)> =
                    flips.iter().map(|(i, bit)| (i.index(bytes.len()), *bit)).collect();
                for (i, bit) in &flips {
                    bytes[*i] ^= 1 << bit;
                }
                prop_assert!(!decodes_or_is_corrupt(&bytes)?, "flipped {:?}", flips);
            }

            /// Length fields set to anything, with the checksum fixed or not.
            #[test]
            fn changed_length_fields_decode_or_are_corrupt(
                f in fields(),
                name_len in any::<u16>(),
                payload_len in prop_oneof![any::<u32>(), 0u32..400],
                fix in any::<bool>(),
            ) {
                let good = build(&f).encode();
                let mut bytes = good.clone();
                let name_at = FIXED_HEADER - 2;
                let old_name_len =
                    u16::from_be_bytes([bytes[name_at], bytes[name_at + 1]]) as usize;
                let op_at = FIXED_HEADER + old_name_len;
                let op_len = u16::from_be_bytes([bytes[op_at], bytes[op_at + 1]]) as usize;
                let payload_len_at = op_at + 2 + op_len + 4;
                bytes[name_at..name_at + 2].copy_from_slice(&name_len.to_be_bytes());
                bytes[payload_len_at..payload_len_at + 4]
                    .copy_from_slice(&payload_len.to_be_bytes());
                if fix {
                    bytes.truncate(bytes.len() - 4);
                    bytes = with_crc(bytes);
                }
                let ok = decodes_or_is_corrupt(&bytes)?;
                if bytes != good {
                    prop_assert!(fix || !ok, "a changed record passed its checksum");
                }
            }
        }
    }
}
