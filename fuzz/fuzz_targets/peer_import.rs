//! The peer-export decoder on arbitrary bytes: it must never panic, and whatever it accepts
//! must encode back to bytes that decode to the same thing. Each input is tried as it is and
//! also sealed in a valid header (magic, version, length, checksum), so that the fuzzer reaches
//! the field checks behind the checksum.
#![no_main]

use kvxfer::fuzzing::{PeerBlob, seal};
use libfuzzer_sys::fuzz_target;

fn check(data: &[u8]) {
    if let Ok(blob) = PeerBlob::decode(data, None) {
        let again = blob.encode(None).expect("a decoded blob encodes");
        assert_eq!(PeerBlob::decode(&again, None).expect("re-decodes"), blob);
    }
}

fuzz_target!(|data: &[u8]| {
    check(data);
    if let Ok(sealed) = seal(data, None) {
        check(&sealed);
    }
});
