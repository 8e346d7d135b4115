//! The readable view of a record: what the SQL stores write beside the envelope, in columns an
//! operator reads with plain SQL (`operation`, `status`, `result`).
//!
//! The envelope stays the source of truth: the engine reads only the record's bytes, with their
//! checksum, format version and type check. The view is derived from those bytes when a store
//! writes them, here, so every store derives it the same way; a store only writes the columns.

// Only the SQL stores write readable columns.
#![cfg_attr(not(any(feature = "sqlite", feature = "postgres")), allow(dead_code))]

use super::{Outcome, Record};

/// The `status` of a claim in flight (no record yet): written by a store when it claims.
pub(crate) const STATUS_PROCESSING: &str = "processing";
/// The `status` of a stored `Ok`.
pub(crate) const STATUS_COMPLETED: &str = "completed";
/// The `status` of a kept `Err` (`cache_errors`): replayed as that error.
pub(crate) const STATUS_FAILED: &str = "failed";
/// The `status` of an unknown outcome (the body started, its result was not kept): replayed
/// as [`Error::OutcomeUnknown`](crate::Error::OutcomeUnknown) until the recovery window passes.
pub(crate) const STATUS_UNKNOWN: &str = "unknown";

/// The readable columns of a completed record.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) struct Readable<'a> {
    /// The operation's stable name; `None` for a plain `Call` and version 1 records.
    pub(crate) operation: Option<&'a str>,
    /// [`STATUS_COMPLETED`], [`STATUS_FAILED`] or [`STATUS_UNKNOWN`].
    pub(crate) status: &'static str,
    /// The stored answer (the `Ok` or the kept `Err`) as JSON text, when it is JSON that
    /// PostgreSQL's `jsonb` also accepts; `None` otherwise, and for an unknown outcome (whose
    /// payload is a reason, not an answer).
    pub(crate) result: Option<&'a str>,
}

impl Outcome {
    /// The word of the `status` column for a record of this outcome.
    pub(crate) fn status(self) -> &'static str {
        match self {
            Outcome::Ok => STATUS_COMPLETED,
            Outcome::Err => STATUS_FAILED,
            Outcome::Unknown => STATUS_UNKNOWN,
        }
    }
}

impl<'a> Readable<'a> {
    /// The view of the encoded record `bytes`, or `None` if they are not a record this release
    /// reads (a store used directly may keep any bytes: its readable columns stay `NULL`).
    pub(crate) fn of(bytes: &'a [u8]) -> Option<Readable<'a>> {
        let record = Record::decode(bytes).ok()?;
        let result = match record.outcome {
            Outcome::Unknown => None,
            Outcome::Ok | Outcome::Err => json_text(record.payload),
        };
        Some(Readable {
            operation: Some(record.operation).filter(|op| !op.is_empty()),
            status: record.outcome.status(),
            result,
        })
    }
}

/// `payload` as text if it is one JSON value that both serde_json and PostgreSQL's `jsonb`
/// accept: `jsonb` refuses the escape `\u0000` and unpaired surrogate escapes, and a refused
/// value would fail the statement that stores the record, so such a payload (rare: serde_json
/// writes neither but for a NUL, or a `RawValue` holding them) gets no readable result.
///
/// This runs on every complete of a SQL store, so it allocates nothing: the JSON is checked
/// without being built (`IgnoredAny`), then scanned once for those escapes.
fn json_text(payload: &[u8]) -> Option<&str> {
    let text = std::str::from_utf8(payload).ok()?;
    serde_json::from_str::<serde::de::IgnoredAny>(text).ok()?;
    (!has_refused_escape(text)).then_some(text)
}

/// Whether the JSON `text` (already checked to be JSON) holds, in a string or an object key,
/// the escape `\u0000` or a surrogate escape (`\uD800` to `\uDFFF`; paired ones are refused
/// too, to keep this a plain scan). In valid JSON a backslash appears only inside strings, as
/// the start of an escape, so each one is read with the character it escapes: `\\u0000` (an
/// escaped backslash, then `u0000`) is not a NUL.
fn has_refused_escape(text: &str) -> bool {
    let bytes = text.as_bytes();
    let mut i = 0;
    while let Some(at) = bytes[i..].iter().position(|&b| b == b'\\') {
        let escape = i + at + 1;
        if let Some([b'u', a, b, c, d]) = bytes.get(escape..escape + 5) {
            let nul = [*a, *b, *c, *d] == *b"0000";
            let surrogate = a.eq_ignore_ascii_case(&b'd')
                && matches!(b.to_ascii_lowercase(), b'8'..=b'9' | b'a'..=b'f');
            if nul || surrogate {
                return true;
            }
        }
        i = escape + 1;
    }
    false
}

#[cfg(test)]
mod tests {
    use std::time::Duration;

    use super::*;

    fn encoded(outcome: Outcome, operation: &str, payload: &[u8]) -> Vec<u8> {
        Record {
            operation,
            ..Record::now(outcome, 1, Duration::from_secs(60), payload)
        }
        .encode()
    }

    #[test]
    fn outcomes_have_their_words_and_json_results() {
        let ok = encoded(Outcome::Ok, "billing.charge", br#"{"amount":5}"#);
        assert_eq!(
            Readable::of(&ok),
            Some(Readable {
                operation: Some("billing.charge"),
                status: "completed",
                result: Some(r#"{"amount":5}"#),
            })
        );
        let err = encoded(Outcome::Err, "billing.charge", br#""declined""#);
        let view = Readable::of(&err).unwrap();
        assert_eq!(
            (view.status, view.result),
            ("failed", Some(r#""declined""#))
        );
        let unknown = Record::unknown(3, "the result was not stored", Duration::from_secs(60));
        let unknown = unknown.encode();
        assert_eq!(
            Readable::of(&unknown),
            Some(Readable {
                operation: None,
                status: "unknown",
                result: None,
            })
        );
    }

    #[test]
    fn what_is_not_json_for_postgres_has_no_result() {
        for payload in [
            &b"not json"[..],
            b"\xff\xfe",
            br#""a\u0000b""#,
            br#"{"k\u0000":1}"#,
            b"1 2",
            b"",
        ] {
            let bytes = encoded(Outcome::Ok, "", payload);
            let view = Readable::of(&bytes).unwrap();
            assert_eq!(view.result, None, "{payload:?}");
            assert_eq!(view.operation, None);
        }
        // Surrogate escapes, paired or not, and in either case.
        for payload in [&br#""\ud800""#[..], br#""\uDBFF\uDC00""#, br#"["\uDfFf"]"#] {
            let bytes = encoded(Outcome::Ok, "", payload);
            assert_eq!(Readable::of(&bytes).unwrap().result, None, "{payload:?}");
        }
        // Other escapes are fine.
        let bytes = encoded(Outcome::Ok, "", br#""a\u0001\\u0000""#);
        assert_eq!(
            Readable::of(&bytes).unwrap().result,
            Some(r#""a\u0001\\u0000""#)
        );
    }

    #[test]
    fn bytes_that_are_no_record_have_no_view() {
        assert_eq!(Readable::of(b"late"), None);
        let mut bytes = encoded(Outcome::Ok, "op", b"1");
        let last = bytes.len() - 1;
        bytes[last] ^= 1;
        assert_eq!(Readable::of(&bytes), None, "checksum");
    }
}
