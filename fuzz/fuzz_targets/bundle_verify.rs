//! Bundle bytes as they arrive over the air: parse and verify must never
//! panic, and must never accept anything not signed by the trusted key.
#![no_main]
use edgefleet_bundle::{Policy, SigningKey, TrustStore, UnverifiedBundle};
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    let mut trust = TrustStore::new();
    trust.add(SigningKey::from_seed([7; 32]).public_key());
    let policy = Policy::device("rpi4", 5, "0.1.0".parse().expect("semver"));
    if let Ok(ub) = UnverifiedBundle::parse(data) {
        let _ = ub.manifest_unverified().chunk_range(0);
        let _ = ub.verify(&trust, &policy);
    }
});
