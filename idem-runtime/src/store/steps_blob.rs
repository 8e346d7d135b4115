//! The steps of a call in flight, framed as one binary value: how the SQLite and PostgreSQL
//! stores keep them in a column of the record's own row, so that they share the row's life
//! (a release, a forget or a purge deletes them with it) without a table of their own.
//!
//! The value is a sequence of frames, one per step name, in the order the names were first
//! saved:
//!
//! ```text
//! u32 big-endian name length | name (UTF-8) | u32 big-endian record length | record
//! ```
//!
//! No header and no count: an empty sequence is an empty value (the stores keep `NULL` instead),
//! and a frame is found by walking those before it. A call saves few steps, and reads them once,
//! after a takeover, so the walk costs nothing that matters.

use std::collections::HashMap;

use bytes::Bytes;

use crate::error::{Error, Result};

/// The longest name or record a frame can hold: its length must fit the frame's `u32`. Both
/// SQLite and PostgreSQL refuse values longer than 1 GiB, far less, so a store that checks
/// against this bound before [`append`] never reaches its panic.
/// (PostgreSQL and DynamoDB check their own, smaller, bounds.)
#[cfg_attr(not(feature = "sqlite"), allow(dead_code))]
pub(crate) const MAX_PART_LEN: usize = u32::MAX as usize;

/// The steps `existing` (a value from [`append`], or `None` for none yet) with the step `name`
/// set to `record`: a step of that name is replaced where it stands, else the step is added at
/// the end.
///
/// A malformed `existing` is not repaired: its frames up to the damage are handled as usual,
/// the rest is kept byte for byte and the new step follows it, so [`decode`] still reports the
/// damage (as [`Error::Corrupt`]) instead of a save silently dropping steps.
///
/// # Panics
///
/// If `name` or `record` is longer than [`MAX_PART_LEN`] bytes.
pub(crate) fn append(existing: Option<&[u8]>, name: &str, record: &[u8]) -> Vec<u8> {
    let existing = existing.unwrap_or_default();
    let mut out = Vec::with_capacity(existing.len() + 8 + name.len() + record.len());
    let mut rest = existing;
    let mut replaced = false;
    while !rest.is_empty() {
        let Some(Frame {
            whole,
            name: step_name,
            after,
            ..
        }) = next_frame(rest)
        else {
            // Damaged from here on: keep it as it is, for `decode` to report.
            out.extend_from_slice(rest);
            break;
        };
        if step_name == name.as_bytes() && !replaced {
            push_frame(&mut out, name, record);
            replaced = true;
        } else {
            out.extend_from_slice(whole);
        }
        rest = after;
    }
    if !replaced {
        push_frame(&mut out, name, record);
    }
    out
}

/// The steps held in `blob`, as `(name, record)` pairs in the order their names were first
/// saved. A name may stand in more than one frame, and then its **last** frame is the step:
/// SQLite replaces a step where it stands ([`append`]), while PostgreSQL appends a frame in one
/// `UPDATE` (`steps || frame`) without reading those before it, so a save repeated after a lost
/// reply leaves a name twice.
///
/// A value that does not walk to its end as whole frames (a length running past the end, a
/// name that is not UTF-8) is [`Error::Corrupt`], saying where: it was damaged since it was
/// written.
pub(crate) fn decode(blob: &[u8]) -> Result<Vec<(String, Bytes)>> {
    let mut steps: Vec<(String, Bytes)> = Vec::new();
    // The index in `steps` of each name.
    let mut seen: HashMap<&str, usize> = HashMap::new();
    let mut rest = blob;
    while !rest.is_empty() {
        let at = blob.len() - rest.len();
        let Some(Frame {
            name,
            record,
            after,
            ..
        }) = next_frame(rest)
        else {
            return Err(Error::corrupt(format!(
                "the steps of a call are damaged: the frame at byte {at} of {} runs past the end \
                 (each frame is a u32 name length, the name, a u32 record length, the record)",
                blob.len()
            )));
        };
        let name = std::str::from_utf8(name).map_err(|_| {
            Error::corrupt(format!(
                "the steps of a call are damaged: the name of the step at byte {at} is not UTF-8"
            ))
        })?;
        let record = Bytes::copy_from_slice(record);
        match seen.get(name) {
            Some(&i) => steps[i].1 = record,
            None => {
                seen.insert(name, steps.len());
                steps.push((name.to_owned(), record));
            }
        }
        rest = after;
    }
    Ok(steps)
}

/// Appends one frame.
fn push_frame(out: &mut Vec<u8>, name: &str, record: &[u8]) {
    out.extend_from_slice(&frame_len(name.len()));
    out.extend_from_slice(name.as_bytes());
    out.extend_from_slice(&frame_len(record.len()));
    out.extend_from_slice(record);
}

/// A length as a frame writes it.
fn frame_len(len: usize) -> [u8; 4] {
    u32::try_from(len)
        .expect("a step's name or record is longer than a frame can hold (u32::MAX bytes)")
        .to_be_bytes()
}

/// The first frame of some bytes, split into its parts.
struct Frame<'a> {
    /// The whole frame, lengths included.
    whole: &'a [u8],
    /// The name's bytes (not yet checked to be UTF-8).
    name: &'a [u8],
    /// The record's bytes.
    record: &'a [u8],
    /// What follows the frame.
    after: &'a [u8],
}

/// Splits the first frame off `bytes`, or `None` if `bytes` does not start with a whole frame.
fn next_frame(bytes: &[u8]) -> Option<Frame<'_>> {
    let (name, after_name) = length_prefixed(bytes)?;
    let (record, after) = length_prefixed(after_name)?;
    Some(Frame {
        whole: &bytes[..bytes.len() - after.len()],
        name,
        record,
        after,
    })
}

/// Splits `bytes` into a u32-big-endian-length-prefixed part and what follows, or `None` if
/// the prefix or the part runs past the end.
fn length_prefixed(bytes: &[u8]) -> Option<(&[u8], &[u8])> {
    let (len, rest) = bytes.split_first_chunk::<4>()?;
    let len = usize::try_from(u32::from_be_bytes(*len)).ok()?;
    (len <= rest.len()).then(|| rest.split_at(len))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn steps(blob: &[u8]) -> Vec<(String, Vec<u8>)> {
        decode(blob)
            .expect("decodes")
            .into_iter()
            .map(|(n, r)| (n, r.to_vec()))
            .collect()
    }

    fn owned(pairs: &[(&str, &[u8])]) -> Vec<(String, Vec<u8>)> {
        pairs
            .iter()
            .map(|(n, r)| (n.to_string(), r.to_vec()))
            .collect()
    }

    #[test]
    fn the_frame_is_big_endian_lengths_around_the_bytes() {
        assert_eq!(
            append(None, "ab", b"xyz"),
            [0, 0, 0, 2, b'a', b'b', 0, 0, 0, 3, b'x', b'y', b'z']
        );
        assert_eq!(append(None, "", b""), [0, 0, 0, 0, 0, 0, 0, 0]);
    }

    #[test]
    fn appends_in_order_and_replaces_a_name_where_it_stands() {
        let one = append(None, "charge", b"c1");
        let two = append(Some(&one), "ship", b"s1");
        let three = append(Some(&two), "email", b"");
        assert_eq!(
            steps(&three),
            owned(&[("charge", b"c1"), ("ship", b"s1"), ("email", b"")])
        );
        // Replacing the middle one with a longer record keeps the others whole and in place.
        let replaced = append(Some(&three), "ship", b"s2-longer");
        assert_eq!(
            steps(&replaced),
            owned(&[("charge", b"c1"), ("ship", b"s2-longer"), ("email", b"")])
        );
        let shorter = append(Some(&replaced), "charge", b"");
        assert_eq!(
            steps(&shorter),
            owned(&[("charge", b""), ("ship", b"s2-longer"), ("email", b"")])
        );
    }

    #[test]
    fn names_and_records_are_bytes_not_text() {
        // A record holding what looks like frame lengths, and a name of several UTF-8 bytes.
        let record = [0, 0, 0, 9, 0xff, 0, 0, 0, 0];
        let blob = append(Some(&append(None, "étape", &record)), "b", b"1");
        assert_eq!(steps(&blob), owned(&[("étape", &record), ("b", b"1")]));
        assert_eq!(steps(&append(Some(&blob), "étape", b"2"))[0].1, b"2");
    }

    #[test]
    fn an_empty_value_is_no_steps() {
        assert!(decode(&[]).expect("decodes").is_empty());
        assert_eq!(append(Some(&[]), "a", b"1"), append(None, "a", b"1"));
    }

    #[test]
    fn a_damaged_value_is_corrupt_and_says_where() {
        let good = append(Some(&append(None, "a", b"1")), "b", b"22");
        // Cut anywhere inside a frame: runs past the end.
        for cut in 1..good.len() {
            if cut == 10 {
                continue; // the boundary between the two frames: a whole first frame
            }
            let err = decode(&good[..cut]).expect_err("a cut value");
            assert!(matches!(err, Error::Corrupt { .. }), "{err:?}");
            assert!(err.to_string().contains("runs past the end"), "{err}");
        }
        assert_eq!(steps(&good[..10]), owned(&[("a", b"1")]));

        // A length larger than what follows.
        let mut long = good.clone();
        long[3] = 200;
        let err = decode(&long).expect_err("a length past the end");
        assert!(err.to_string().contains("byte 0"), "{err}");

        // A name that is not UTF-8.
        let mut bad_name = good.clone();
        bad_name[4] = 0xff;
        let err = decode(&bad_name).expect_err("a name not UTF-8");
        assert!(matches!(err, Error::Corrupt { .. }), "{err:?}");
        assert!(err.to_string().contains("not UTF-8"), "{err}");
    }

    /// PostgreSQL appends a frame per save: the last frame of a name is the step, where the
    /// name first stood.
    #[test]
    fn the_last_frame_of_a_name_is_its_step() {
        let blob = [
            append(None, "a", b"1"),
            append(None, "b", b"2"),
            append(None, "a", b"333"),
            append(None, "", b""),
            append(None, "a", b""),
        ]
        .concat();
        assert_eq!(steps(&blob), owned(&[("a", b""), ("b", b"2"), ("", b"")]));
    }

    #[test]
    fn appending_to_a_damaged_value_keeps_the_damage_visible() {
        let good = append(None, "a", b"1");
        let mut damaged = good.clone();
        damaged.extend_from_slice(&[0, 0, 0, 50, b'x']);
        let after = append(Some(&damaged), "b", b"2");
        assert!(
            after.starts_with(&damaged),
            "nothing of the old value is dropped"
        );
        assert!(matches!(decode(&after), Err(Error::Corrupt { .. })));
        // A name before the damage is still replaced where it stands.
        let replaced = append(Some(&damaged), "a", b"9");
        assert_eq!(&replaced[..10], &append(None, "a", b"9")[..]);
        assert_eq!(&replaced[10..15], &[0, 0, 0, 50, b'x']);
    }
}
