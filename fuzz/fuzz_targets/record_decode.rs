//! `Record::decode` on arbitrary bytes: `Ok` or `Error::Corrupt`, never a panic; whatever decodes
//! encodes to bytes that decode to the same record.
//!
//! ```text
//! cargo +nightly fuzz run record_decode -- -max_total_time=60
//! ```
#![no_main]

use idem_runtime::record::Record;
use idem_runtime::Error;
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    match Record::decode(data) {
        Ok(record) => {
            let again = record.encode();
            assert_eq!(Record::decode(&again).expect("re-encoded record"), record);
        }
        Err(Error::Corrupt { reason, .. }) => assert!(!reason.is_empty()),
        Err(other) => panic!("decode gave another error than Corrupt: {other:?}"),
    }
});
