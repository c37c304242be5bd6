//! Bundle benchmark: pack and verify throughput for a 10 MB payload, and the
//! size of a delta between two bundles whose models differ in one layer.
//!
//! Timings are printed with a baseline measured in the same process (SHA-256
//! and a plain memcpy over the same bytes) because shared machines are noisy.
//!
//! `cargo run --release -p edgefleet-bundle --example bench_bundle [MODEL.onnx]`
//! With a model path, the delta is measured on that real file with one
//! contiguous 1/20th of it (a layer's worth of weights) changed.

use std::time::Instant;

use edgefleet_bundle::delta::make_delta;
use edgefleet_bundle::{sha256, BundleBuilder, Policy, SigningKey, TrustStore, UnverifiedBundle};

fn weights(n: usize, seed: u64) -> Vec<u8> {
    // fp32 weights ~ N(0, 0.05): realistic entropy for a trained fp32 model.
    let mut x = seed | 1;
    let mut out = Vec::with_capacity(n);
    while out.len() < n {
        let mut s = 0.0f32;
        for _ in 0..4 {
            x ^= x << 13;
            x ^= x >> 7;
            x ^= x << 17;
            s += (x >> 40) as f32 / (1u64 << 24) as f32 - 0.5;
        }
        out.extend_from_slice(&(s * 0.05).to_le_bytes());
    }
    out.truncate(n);
    out
}

fn time<T>(f: impl FnOnce() -> T) -> (T, f64) {
    let t = Instant::now();
    let r = f();
    (r, t.elapsed().as_secs_f64())
}

fn main() {
    let key = SigningKey::generate();
    let mut trust = TrustStore::new();
    trust.add(key.public_key());
    let policy = Policy::device("rpi4", 0, "1.0.0".parse().expect("semver"));
    let mb = 10usize;
    let payload = weights(mb << 20, 7);

    let (_, t_sha) = time(|| sha256(&payload));
    let (_, t_copy) = time(|| payload.clone());
    println!(
        "baseline: sha256 {:.0} MB/s, memcpy {:.0} MB/s",
        mb as f64 / t_sha,
        mb as f64 / t_copy
    );
    println!(
        "{:<28} {:>10} {:>10} {:>12} {:>14}",
        "step", "MB/s", "ms", "bundle MB", "vs sha256 x"
    );
    for level in [3, 19] {
        let (bundle, t_pack) = time(|| {
            BundleBuilder::new("bench", "1.0.0".parse().expect("v"), 1)
                .target("rpi4")
                .file("model.onnx", payload.clone())
                .zstd_level(level)
                .build(&key)
                .expect("pack")
        });
        let (v, t_verify) = time(|| {
            UnverifiedBundle::parse(&bundle)
                .and_then(|u| u.verify(&trust, &policy))
                .expect("verify")
        });
        assert_eq!(v.file("model.onnx").map(<[u8]>::len), Some(payload.len()));
        println!(
            "{:<28} {:>10.1} {:>10.0} {:>12.2} {:>14.1}",
            format!("pack (zstd -{level})"),
            mb as f64 / t_pack,
            t_pack * 1e3,
            bundle.len() as f64 / 1e6,
            t_pack / t_sha
        );
        println!(
            "{:<28} {:>10.1} {:>10.0} {:>12} {:>14.1}",
            format!("verify (zstd -{level})"),
            mb as f64 / t_verify,
            t_verify * 1e3,
            "",
            t_verify / t_sha
        );
    }

    // Delta between two models that differ in one layer.
    let (base_model, what) = match std::env::args().nth(1) {
        Some(p) => (std::fs::read(&p).expect("read model"), p),
        None => (
            weights(4 << 20, 11),
            "synthetic 4 MiB fp32 model, 20 layers".into(),
        ),
    };
    let mut new_model = base_model.clone();
    let layer = new_model.len() / 20;
    let start = new_model.len() / 2;
    let replacement = weights(layer, 99);
    new_model[start..start + layer].copy_from_slice(&replacement);
    let mk = |m: Vec<u8>, r| {
        let b = BundleBuilder::new("bench", "1.0.0".parse().expect("v"), r)
            .target("rpi4")
            .file("model.onnx", m)
            .build(&key)
            .expect("pack");
        UnverifiedBundle::parse(&b)
            .and_then(|u| u.verify(&trust, &Policy::publisher()))
            .expect("verify")
    };
    let (b1, b2) = (mk(base_model, 1), mk(new_model, 2));
    let full = b2.to_bytes().expect("bytes").len();
    let (delta, t_delta) = time(|| make_delta(&b1, &b2, &key, 19).expect("delta"));
    let (_, t_apply) = time(|| {
        UnverifiedBundle::parse(&delta)
            .and_then(|u| u.verify_delta(&trust, &policy, b1.payload_tar()))
            .expect("apply")
    });
    println!("delta ({what}; one layer = 1/20 of the file changed):");
    println!(
        "  full {} bytes, delta {} bytes, delta/full = {:.3}; encode {:.0} ms, apply+verify {:.0} ms",
        full,
        delta.len(),
        delta.len() as f64 / full as f64,
        t_delta * 1e3,
        t_apply * 1e3
    );
}
