//! Dataset folder round trip, seeded splits and hostile fixtures (each error names the file).

use std::path::Path;

use edgefleet_trainer::dataset::{
    npy, write_dataset, Dataset, Examples, Provenance, SplitFractions, SplitName, Task,
};
use edgefleet_trainer::Error;

fn vad_examples(n: usize) -> Examples {
    Examples {
        x: (0..n * 576).map(|i| (i % 97) as f32 / 97.0 - 0.5).collect(),
        sample_shape: vec![576],
        y: Some((0..n).map(|i| (i % 2) as i64).collect()),
    }
}

fn prov() -> Provenance {
    Provenance::Generator {
        name: "test".into(),
        parameters: serde_json::json!({}),
        seed: 1,
    }
}

fn write(dir: &Path, n: usize) -> Dataset {
    write_dataset(
        dir,
        Task::Vad,
        &vad_examples(n),
        None,
        prov(),
        SplitFractions::default(),
        7,
    )
    .expect("write")
}

fn err_of(dir: &Path) -> String {
    Dataset::open(dir).expect_err("must be refused").to_string()
}

#[test]
fn round_trip_and_splits_are_exact_and_disjoint() {
    let t = tempfile::tempdir().expect("tempdir");
    let dir = t.path().join("ds");
    let d = write(&dir, 1000);
    let again = Dataset::open(&dir).expect("open");
    assert_eq!(d.id(), again.id());
    let mut seen = vec![0u8; 1000];
    let mut total = 0;
    for s in [SplitName::Train, SplitName::Validation, SplitName::Test] {
        let idx = again.indices(s);
        for &i in &idx {
            seen[i] += 1;
        }
        let e = again.split(s).expect("split");
        assert_eq!(e.len(), idx.len());
        if let Some(&i) = idx.first() {
            assert_eq!(e.sample(0), vad_examples(1000).sample(i));
        }
        total += idx.len();
    }
    assert_eq!(total, 1000);
    assert!(seen.iter().all(|&c| c == 1));
    let test = again.indices(SplitName::Test).len();
    assert!((60..140).contains(&test), "{test}");
    // Same seed, other folder: identical split; the id depends on content only.
    let d2 = write(&t.path().join("ds2"), 1000);
    assert_eq!(d2.indices(SplitName::Test), again.indices(SplitName::Test));
    assert_eq!(d2.id(), d.id());
}

#[test]
fn hostile_fixtures_name_the_file() {
    let t = tempfile::tempdir().expect("tempdir");
    // Missing file.
    let a = t.path().join("a");
    write(&a, 20);
    std::fs::remove_file(a.join("labels.npy")).expect("rm");
    assert!(err_of(&a).contains("labels.npy"), "{}", err_of(&a));
    // Hash mismatch: one flipped byte in the data.
    let b = t.path().join("b");
    write(&b, 20);
    let mut bytes = std::fs::read(b.join("inputs.npy")).expect("read");
    let last = bytes.len() - 1;
    bytes[last] ^= 1;
    std::fs::write(b.join("inputs.npy"), &bytes).expect("write");
    let e = err_of(&b);
    assert!(e.contains("inputs.npy") && e.contains("sha256"), "{e}");
}

/// Replaces `name` in `dir` with `bytes` and fixes the manifest's hash and id, so the
/// content check (not the hash) has to catch it.
fn replace_rehashed(dir: &Path, name: &str, bytes: &[u8]) {
    std::fs::write(dir.join(name), bytes).expect("write");
    let p = dir.join("manifest.json");
    let mut m: edgefleet_trainer::dataset::Manifest =
        serde_json::from_slice(&std::fs::read(&p).expect("read")).expect("parse");
    if let Some(f) = m.files.get_mut(name) {
        f.sha256 = edgefleet_trainer::dataset::sha256_hex(bytes);
        f.bytes = bytes.len() as u64;
    }
    m.id = edgefleet_trainer::dataset::manifest::content_id(&m.files);
    std::fs::write(&p, serde_json::to_vec(&m).expect("json")).expect("write");
}

#[test]
fn content_errors_name_the_file() {
    let t = tempfile::tempdir().expect("tempdir");
    let c = t.path().join("short_labels");
    write(&c, 20);
    replace_rehashed(&c, "labels.npy", &npy::encode_i64(&[19], &[0; 19]));
    let e = err_of(&c);
    assert!(
        e.contains("labels.npy") && e.contains("missing label"),
        "{e}"
    );

    let d = t.path().join("bad_label");
    write(&d, 20);
    let mut l = vec![0i64; 20];
    l[5] = 2;
    replace_rehashed(&d, "labels.npy", &npy::encode_i64(&[20], &l));
    let e = err_of(&d);
    assert!(e.contains("labels.npy") && e.contains("sample 5"), "{e}");

    let s = t.path().join("bad_shape");
    write(&s, 20);
    replace_rehashed(
        &s,
        "inputs.npy",
        &npy::encode_f32(&[20, 512], &vec![0.0; 20 * 512]),
    );
    let e = err_of(&s);
    assert!(e.contains("inputs.npy") && e.contains("576"), "{e}");

    let k = t.path().join("corrupt");
    write(&k, 20);
    replace_rehashed(&k, "inputs.npy", b"\x93NUMPY garbage");
    let e = err_of(&k);
    assert!(e.contains("inputs.npy") && e.contains(".npy"), "{e}");

    let u = t.path().join("unknown_field");
    write(&u, 20);
    let p = u.join("manifest.json");
    let mut v: serde_json::Value =
        serde_json::from_slice(&std::fs::read(&p).expect("read")).expect("parse");
    v["extra"] = serde_json::json!(1);
    std::fs::write(&p, v.to_string()).expect("write");
    assert!(matches!(Dataset::open(&u), Err(Error::Manifest { .. })));
}

#[test]
fn vad_labels_follow_clean_speech_energy() {
    use edgefleet_trainer::synth::vad;
    // Seed 991: not used by any fixture.
    let s = vad::scene(991, 0, 3).expect("espeak-ng");
    let (_, y) = vad::windows(&s);
    let peak = s.clean.iter().fold(0.0f32, |m, v| m.max(v.abs()));
    for (k, &label) in y.iter().enumerate() {
        let w = &s.clean[k * 512..(k + 1) * 512];
        let quiet = w.iter().filter(|v| v.abs() < 1e-6).count();
        if label == 1 {
            assert!(quiet < 400, "window {k} labelled speech but silent");
        }
        if w.iter().all(|v| *v == 0.0) {
            assert_eq!(label, 0, "window {k} is digital silence");
        }
    }
    assert!(peak >= 0.0);
}

#[test]
fn text_generator_is_deterministic_and_pairs_lines() {
    use edgefleet_trainer::synth::text;
    let a = text::generate(6, 5, 0);
    let b = text::generate(6, 5, 0);
    assert_eq!(a, b);
    assert_eq!(a.len(), 6);
    assert_eq!(a.y.as_deref(), Some(&[0, 1, 0, 1, 0, 1][..]));
    assert!(a.x.iter().all(|v| (-1.0..=1.0).contains(v)));
}
