//! The peer-export decoder on arbitrary bytes: it must never panic, and whatever it accepts
//! must encode back to bytes that decode to the same thing.
#![no_main]

use kvxfer::peer::PeerBlob;
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    if let Ok(blob) = PeerBlob::decode(data) {
        let again = blob.encode().expect("a decoded blob encodes");
        assert_eq!(PeerBlob::decode(&again).expect("re-decodes"), blob);
    }
});
