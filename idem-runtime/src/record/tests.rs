//! Unit tests of the record format.
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
        result_version: 3,
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
            result_version: 0,
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
            Err(Error::Corrupt { reason, .. }) => {
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
            result_version: f.7 .1,
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
