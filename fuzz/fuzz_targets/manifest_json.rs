//! Manifest JSON and a detached signature from an update offer.
#![no_main]
use edgefleet_bundle::{Manifest, Policy, SignedManifest, SigningKey, TrustStore};
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    if let Ok(m) = Manifest::from_json(data) {
        // Anything that parses re-serialises and re-parses to the same value.
        let again = Manifest::from_json(&m.to_json()).expect("round trip");
        assert_eq!(again, m);
    }
    if data.len() > 64 {
        let (sig, json) = data.split_at(64);
        if let Ok(sm) = SignedManifest::parse(json.to_vec(), sig) {
            let mut trust = TrustStore::new();
            trust.add(SigningKey::from_seed([7; 32]).public_key());
            let _ = sm.verify(&trust, &Policy::publisher());
        }
    }
});
