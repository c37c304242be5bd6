//! Corruption, truncation, delta, rotation and round-trip properties.

use edgefleet_bundle::delta::make_delta;
use edgefleet_bundle::{
    BundleBuilder, Manifest, Policy, RotationStatement, SigningKey, TrustStore, UnverifiedBundle,
};
use proptest::prelude::*;

fn key() -> SigningKey {
    SigningKey::from_seed([1; 32])
}
fn trust() -> TrustStore {
    let mut t = TrustStore::new();
    t.add(key().public_key());
    t
}
fn policy() -> Policy {
    Policy::device("rpi4", 0, "1.0.0".parse().expect("v"))
}
fn small_bundle(payload: Vec<u8>) -> Vec<u8> {
    BundleBuilder::new("m", "1.0.0".parse().expect("v"), 1)
        .target("rpi4")
        .file("model.bin", payload)
        .chunk_size(1024)
        .created_at("2026-01-01T00:00:00Z")
        .build(&key())
        .expect("build")
}
fn verify(bytes: &[u8]) -> Result<edgefleet_bundle::VerifiedBundle, edgefleet_bundle::Error> {
    UnverifiedBundle::parse(bytes)?.verify(&trust(), &policy())
}

#[test]
fn every_single_byte_flip_is_rejected() {
    let bundle = small_bundle(b"weights ".repeat(40));
    verify(&bundle).expect("pristine bundle verifies");
    let mut rejected = 0;
    for i in 0..bundle.len() {
        for mask in [0x01u8, 0x80, 0xff] {
            let mut b = bundle.clone();
            b[i] ^= mask;
            assert!(
                verify(&b).is_err(),
                "flip of byte {i} with mask {mask:#04x} was accepted"
            );
            rejected += 1;
        }
    }
    eprintln!(
        "{} bytes, {rejected} flipped copies, all rejected",
        bundle.len()
    );
}

#[test]
fn truncation_at_every_chunk_boundary_is_rejected() {
    // Incompressible payload so the body spans many 1 KiB chunks.
    let mut x: u64 = 0x9e3779b97f4a7c15;
    let payload: Vec<u8> = (0..20_000)
        .map(|_| {
            x ^= x << 13;
            x ^= x >> 7;
            x ^= x << 17;
            x as u8
        })
        .collect();
    let bundle = small_bundle(payload);
    let m = UnverifiedBundle::parse(&bundle)
        .expect("parse")
        .manifest_unverified()
        .clone();
    let body_start = bundle.len() - m.body.size as usize;
    let chunks = m.body.chunks.len();
    assert!(chunks >= 10, "only {chunks} chunks");
    for k in 0..chunks {
        let cut = body_start + k * m.body.chunk_size as usize;
        let e = verify(&bundle[..cut]).expect_err("truncated bundle accepted");
        assert_eq!(e.code(), "body_size", "cut at chunk {k}: {e}");
    }
    // And anywhere inside the head.
    for cut in (0..body_start).step_by(7) {
        assert!(
            verify(&bundle[..cut]).is_err(),
            "head cut at {cut} accepted"
        );
    }
}

#[test]
fn chunks_verify_one_by_one_for_a_resumable_transfer() {
    let bundle = small_bundle((0..9000u32).map(|i| (i * 7 % 251) as u8).collect());
    let ub = UnverifiedBundle::parse(&bundle).expect("parse");
    let body_start = bundle.len() - ub.manifest_unverified().body.size as usize;
    let vm = ub
        .signed_manifest()
        .clone()
        .verify(&trust(), &policy())
        .expect("verify manifest");
    let body = &bundle[body_start..];
    for i in 0..vm.manifest().body.chunks.len() {
        let r = vm.manifest().chunk_range(i).expect("range");
        vm.check_chunk(i, &body[r.clone()]).expect("chunk ok");
        let mut bad = body[r].to_vec();
        bad[0] ^= 1;
        assert_eq!(
            vm.check_chunk(i, &bad).expect_err("bad chunk").code(),
            "chunk_hash"
        );
    }
    let vb = vm.verify_body(body.to_vec(), None).expect("body");
    assert_eq!(vb.file("model.bin").map(<[u8]>::len), Some(9000));
}

fn layered_model(seed: u64, changed_layer: Option<usize>) -> Vec<u8> {
    // 8 "layers" of 16 KiB pseudo-random weights; one layer differs.
    let mut out = Vec::new();
    for layer in 0..8 {
        let mut x = seed ^ (layer as u64 + 1).wrapping_mul(0x9e3779b97f4a7c15);
        if Some(layer) == changed_layer {
            x ^= 0xdead_beef;
        }
        for _ in 0..16 * 1024 {
            x ^= x << 13;
            x ^= x >> 7;
            x ^= x << 17;
            out.push(x as u8);
        }
    }
    out
}

#[test]
fn delta_rebuilds_and_verifies_as_the_full_bundle() {
    let k = key();
    let b1 = BundleBuilder::new("m", "1.0.0".parse().expect("v"), 1)
        .target("rpi4")
        .file("model.bin", layered_model(1, None))
        .build(&k)
        .expect("b1");
    let b2 = BundleBuilder::new("m", "1.1.0".parse().expect("v"), 2)
        .target("rpi4")
        .file("model.bin", layered_model(1, Some(3)))
        .build(&k)
        .expect("b2");
    let v1 = verify(&b1).expect("v1");
    let v2 = verify(&b2).expect("v2");
    let d = make_delta(&v1, &v2, &k, 19).expect("delta");
    assert!(
        d.len() * 4 < b2.len(),
        "delta {} vs full {}",
        d.len(),
        b2.len()
    );
    // Without the base: refused.
    assert_eq!(verify(&d).expect_err("no base").code(), "delta_base");
    // With the wrong base: refused.
    let wrong =
        UnverifiedBundle::parse(&d)
            .expect("p")
            .verify_delta(&trust(), &policy(), v2.payload_tar());
    assert_eq!(wrong.expect_err("wrong base").code(), "delta_base");
    // With the right base: identical payload to the full bundle.
    let rebuilt = UnverifiedBundle::parse(&d)
        .expect("p")
        .verify_delta(&trust(), &policy(), v1.payload_tar())
        .expect("ok");
    assert_eq!(rebuilt.payload_tar(), v2.payload_tar());
    assert_eq!(rebuilt.file("model.bin"), v2.file("model.bin"));
    // A tampered delta is refused.
    let mut t = d.clone();
    let n = t.len() - 10;
    t[n] ^= 1;
    assert!(UnverifiedBundle::parse(&t)
        .and_then(|u| u.verify_delta(&trust(), &policy(), v1.payload_tar()))
        .is_err());
}

#[test]
fn key_rotation_adds_a_key_and_revocation_removes_it() {
    let old = key();
    let new = SigningKey::from_seed([2; 32]);
    let mut ts = trust();
    let bundle_new = BundleBuilder::new("m", "1.0.0".parse().expect("v"), 1)
        .target("rpi4")
        .file("a", vec![1])
        .build(&new)
        .expect("b");
    let check = |ts: &TrustStore| {
        UnverifiedBundle::parse(&bundle_new)
            .and_then(|u| u.verify(ts, &policy()))
            .map(|_| ())
    };
    assert_eq!(check(&ts).expect_err("unknown").code(), "unknown_key");
    // A statement signed by an untrusted key is refused.
    let (st, sig) = RotationStatement::sign(&new, &new.public_key());
    assert!(ts.apply_rotation(&st, &sig).is_err());
    // Signed by the old key: accepted; both keys now verify.
    let (st, sig) = RotationStatement::sign(&old, &new.public_key());
    let mut bad_sig = sig;
    bad_sig[0] ^= 1;
    assert!(ts.apply_rotation(&st, &bad_sig).is_err());
    ts.apply_rotation(&st, &sig).expect("rotation");
    check(&ts).expect("new key trusted");
    assert!(verify(&small_bundle(vec![1, 2, 3])).is_ok());
    // Revoke the old key: its bundles are refused, and it cannot be rotated back in.
    ts.revoke(&old.key_id()).expect("revoke");
    let old_bundle = small_bundle(vec![1, 2, 3]);
    let e = UnverifiedBundle::parse(&old_bundle)
        .and_then(|u| u.verify(&ts, &policy()))
        .expect_err("revoked");
    assert_eq!(e.code(), "revoked_key");
    let (st, sig) = RotationStatement::sign(&new, &old.public_key());
    assert!(
        ts.apply_rotation(&st, &sig).is_err(),
        "revoked key re-added"
    );
    // Round-trip through the on-disk format keeps the revocation.
    let dir = tempfile::tempdir().expect("tmp");
    let p = dir.path().join("trust.json");
    ts.save(&p).expect("save");
    let ts2 = TrustStore::load(&p).expect("load");
    assert_eq!(
        ts2.lookup(&old.key_id()).expect_err("revoked").code(),
        "revoked_key"
    );
    ts2.lookup(&new.key_id()).expect("new trusted");
}

#[test]
fn verification_does_not_read_the_clock() {
    // created_at in 1970 and far in the future both verify: the device clock
    // is never compared with anything.
    for t in ["1970-01-01T00:00:00Z", "2199-12-31T23:59:59Z"] {
        let b = BundleBuilder::new("m", "1.0.0".parse().expect("v"), 1)
            .target("rpi4")
            .file("a", vec![1])
            .created_at(t)
            .build(&key())
            .expect("b");
        verify(&b).expect("verifies regardless of created_at");
    }
}

#[test]
fn private_key_file_is_mode_0600_and_openssl_compatible_pem() {
    use std::os::unix::fs::PermissionsExt;
    let dir = tempfile::tempdir().expect("tmp");
    let (p, q) = (dir.path().join("k.pem"), dir.path().join("k.pub.pem"));
    let k = SigningKey::generate();
    k.write_pem_files(&p, &q).expect("write");
    let mode = std::fs::metadata(&p).expect("meta").permissions().mode() & 0o777;
    assert_eq!(mode, 0o600);
    let text = std::fs::read_to_string(&p).expect("read");
    assert!(text.starts_with("-----BEGIN PRIVATE KEY-----"));
    assert_eq!(
        SigningKey::from_pkcs8_pem_file(&p)
            .expect("reload")
            .key_id(),
        k.key_id()
    );
    assert_eq!(
        edgefleet_bundle::PublicKey::from_pem_file(&q)
            .expect("pub")
            .key_id(),
        k.key_id()
    );
}

fn arb_manifest() -> impl Strategy<Value = Manifest> {
    (
        "[a-z][a-z0-9._-]{0,20}",
        (0u64..100, 0u64..100, 0u64..100),
        any::<u64>(),
        prop::collection::vec("[a-z0-9-]{1,12}", 1..4),
        prop::collection::vec(
            (
                "[a-z]{1,8}(/[a-z0-9_-][a-z0-9._-]{0,7})?",
                0u64..1_000_000,
                any::<[u8; 32]>(),
            ),
            1..6,
        ),
        (1u64..2_000_000, 13u32..=17),
        any::<Option<[u8; 32]>>(),
    )
        .prop_map(
            |(model, (ma, mi, pa), release, targets, files, (body_size, cs_log), delta)| {
                let chunk_size = 1u32 << cs_log;
                let n = body_size.div_ceil(u64::from(chunk_size)) as usize;
                let mut seen = std::collections::BTreeSet::new();
                let files: Vec<_> = files
                    .into_iter()
                    .filter(|(p, _, _)| seen.insert(p.clone()))
                    .map(|(path, size, h)| edgefleet_bundle::manifest::FileEntry {
                        path,
                        size,
                        sha256: edgefleet_bundle::Digest(h),
                    })
                    .collect();
                let total: u64 = files.iter().map(|f| f.size).sum();
                Manifest {
                    format_version: 1,
                    model,
                    version: semver::Version::new(ma, mi, pa),
                    release,
                    targets,
                    created_at: "2026-01-01T00:00:00Z".into(),
                    min_agent_version: semver::Version::new(0, 1, 0),
                    key_id: key().key_id(),
                    files,
                    payload: edgefleet_bundle::manifest::PayloadInfo {
                        size: total + 1024,
                        sha256: edgefleet_bundle::Digest([3; 32]),
                    },
                    body: edgefleet_bundle::manifest::BodyInfo {
                        size: body_size,
                        sha256: edgefleet_bundle::Digest([4; 32]),
                        chunk_size,
                        chunks: (0..n)
                            .map(|i| edgefleet_bundle::Digest([i as u8; 32]))
                            .collect(),
                    },
                    delta_from: delta.map(edgefleet_bundle::Digest),
                }
            },
        )
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(200))]
    #[test]
    fn manifest_json_round_trips(m in arb_manifest()) {
        let bytes = m.to_json();
        let back = Manifest::from_json(&bytes).expect("parse");
        prop_assert_eq!(back, m);
    }

    #[test]
    fn parse_never_panics_on_arbitrary_bytes(bytes in prop::collection::vec(any::<u8>(), 0..4096)) {
        let _ = UnverifiedBundle::parse(&bytes).map(|u| u.verify(&trust(), &policy()));
    }

    #[test]
    fn pack_verify_round_trips(files in prop::collection::btree_map("[a-z]{1,10}", prop::collection::vec(any::<u8>(), 0..3000), 1..5)) {
        let mut b = BundleBuilder::new("m", "1.0.0".parse().expect("v"), 3).target("rpi4").chunk_size(1024).zstd_level(1);
        for (k, v) in &files {
            b = b.file(k.clone(), v.clone());
        }
        let bytes = b.build(&key()).expect("build");
        let vb = verify(&bytes).expect("verify");
        for (k, v) in &files {
            prop_assert_eq!(vb.file(k), Some(&v[..]));
        }
        // Re-assembly reproduces the exact bytes.
        prop_assert_eq!(vb.to_bytes().expect("bytes"), bytes);
    }
}
