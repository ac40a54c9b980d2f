//! The peer-export decoder on arbitrary bytes: it must never panic, and whatever it accepts
//! must encode back to bytes that decode to the same thing. Each input is tried as it is and
//! also sealed in a valid header (magic, version, length, checksum), so that the fuzzer reaches
//! the field checks behind the checksum.
#![no_main]

use kvxfer::peer::{PeerBlob, VERSION};
use libfuzzer_sys::fuzz_target;
use xxhash_rust::xxh3::xxh3_64;

fn sealed(body: &[u8]) -> Vec<u8> {
    let mut out = Vec::with_capacity(24 + body.len());
    out.extend_from_slice(b"KVXPEER\0");
    out.extend_from_slice(&VERSION.to_le_bytes());
    out.extend_from_slice(&0u16.to_le_bytes());
    out.extend_from_slice(&((24 + body.len()) as u32).to_le_bytes());
    out.extend_from_slice(&xxh3_64(body).to_le_bytes());
    out.extend_from_slice(body);
    out
}

fn check(data: &[u8]) {
    if let Ok(blob) = PeerBlob::decode(data) {
        let again = blob.encode().expect("a decoded blob encodes");
        assert_eq!(PeerBlob::decode(&again).expect("re-decodes"), blob);
    }
}

fuzz_target!(|data: &[u8]| {
    check(data);
    check(&sealed(data));
});
