//! JSON control messages and topics as received from the broker.
#![no_main]
use edgefleet_protocol::{topics, DeviceId, Down, Up};
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    let dev = DeviceId::new("dev-1").expect("id");
    if let Ok(m) = Up::decode(data, &dev) {
        let again = Up::decode(&m.encode().expect("encode"), &dev).expect("round trip");
        assert_eq!(again, m);
    }
    if let Ok(m) = Down::decode(data) {
        let _ = m.encode();
    }
    let _ = topics::parse(&String::from_utf8_lossy(data));
});
