//! Binary chunk messages.
#![no_main]
use edgefleet_protocol::chunk::ChunkData;
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    if let Ok(c) = ChunkData::decode(data) {
        assert_eq!(c.encode().expect("encode"), data);
    }
});
