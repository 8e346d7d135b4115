//! `Record::decode` on `IDEM`, version 1, the fuzzer's bytes and a correct CRC-32: the checksum
//! no longer stops the fuzzer, so it explores the field parsing behind it. `Ok` or
//! `Error::Corrupt`, never a panic.
//!
//! ```text
//! cargo +nightly fuzz run record_decode_framed -- -max_total_time=60
//! ```
#![no_main]

use idem_runtime::record::{Record, FORMAT_VERSION, MAGIC};
use idem_runtime::Error;
use libfuzzer_sys::fuzz_target;

/// CRC-32 (IEEE), as the record format uses.
fn crc32(bytes: &[u8]) -> u32 {
    let mut crc = !0u32;
    for &b in bytes {
        crc ^= u32::from(b);
        for _ in 0..8 {
            crc = if crc & 1 == 1 {
                (crc >> 1) ^ 0xedb8_8320
            } else {
                crc >> 1
            };
        }
    }
    !crc
}

fuzz_target!(|data: &[u8]| {
    let mut bytes = MAGIC.to_vec();
    bytes.push(FORMAT_VERSION);
    bytes.extend_from_slice(data);
    let crc = crc32(&bytes);
    bytes.extend_from_slice(&crc.to_be_bytes());
    match Record::decode(&bytes) {
        Ok(record) => {
            let again = record.encode();
            assert_eq!(Record::decode(&again).expect("re-encoded record"), record);
        }
        Err(Error::Corrupt { reason, .. }) => assert!(!reason.is_empty()),
        Err(other) => panic!("decode gave another error than Corrupt: {other:?}"),
    }
});
