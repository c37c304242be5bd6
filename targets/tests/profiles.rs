//! Every checked-in profile loads; schema and value errors name the file and the key.

use edgefleet_targets::{builtin_dir, load, load_dir, Error, Precision, Task};

#[test]
fn every_checked_in_profile_loads() {
    let all = load_dir(builtin_dir()).expect("checked-in profiles load");
    let ids: Vec<&str> = all.iter().map(|t| t.id.as_str()).collect();
    for want in [
        "rpi4",
        "rpi5",
        "jetson-orin-nano",
        "imx8mp",
        "x86-avx2-gateway",
    ] {
        assert!(ids.contains(&want), "missing profile {want}: {ids:?}");
    }
    for t in &all {
        assert!(t.runs(Precision::F32));
        let det = t.overrides_for("ch_PP-OCRv4_det_infer").expect("det shape");
        assert_eq!(det.inputs["x"].len(), 4);
        let vad = t
            .overrides_for("silero_vad_16k_op15")
            .expect("silero prefix match");
        assert_eq!(vad.consts["sr"], 16000.0);
        assert_eq!(
            det.task,
            Some(Task::ProbabilityMap { threshold: 0.3 }),
            "{}",
            t.id
        );
        let rec = t.overrides_for("ch_PP-OCRv4_rec_infer").expect("rec");
        assert_eq!(rec.task, Some(Task::Ctc { blank: 0 }), "{}", t.id);
        assert_eq!(vad.task, None);
    }
}

#[test]
fn unknown_task_kind_and_task_key_are_refused() {
    let dir = tempfile::tempdir().expect("tempdir");
    for (to, want) in [
        ("kind = \"boxes\", threshold = 0.3", "boxes"),
        ("kind = \"probability-map\", thresh = 0.3", "thresh"),
    ] {
        let p = write(
            &dir,
            "task.toml",
            &rpi4_text().replace("kind = \"probability-map\", threshold = 0.3", to),
        );
        let msg = load(&p).expect_err(to).to_string();
        assert!(msg.contains("task.toml") && msg.contains(want), "{msg}");
    }
    // The task metrics' thresholds are optional (defaults 0.95, 0.95 and 1.0).
    let p = write(
        &dir,
        "defaults.toml",
        &rpi4_text()
            .replace("min_mask_iou = 0.95\n", "")
            .replace("min_box_f1 = 0.95\n", "")
            .replace("min_sequence_agreement = 1.0\n", ""),
    );
    let t = load(&p).expect("defaults");
    assert_eq!(
        (
            t.gate.min_mask_iou,
            t.gate.min_box_f1,
            t.gate.min_sequence_agreement
        ),
        (0.95, 0.95, 1.0)
    );
}

fn write(dir: &tempfile::TempDir, name: &str, text: &str) -> std::path::PathBuf {
    let p = dir.path().join(name);
    std::fs::write(&p, text).expect("write");
    p
}

fn rpi4_text() -> String {
    std::fs::read_to_string(builtin_dir().join("rpi4.toml")).expect("rpi4.toml")
}

#[test]
fn unknown_key_names_file_and_key() {
    let dir = tempfile::tempdir().expect("tempdir");
    let p = write(
        &dir,
        "typo.toml",
        &rpi4_text().replace("cores = 4", "coress = 4"),
    );
    let e = load(&p).expect_err("unknown key refused");
    let msg = e.to_string();
    assert!(matches!(e, Error::Parse { .. }), "{msg}");
    assert!(msg.contains("typo.toml") && msg.contains("coress"), "{msg}");

    let p = write(
        &dir,
        "gate.toml",
        &rpi4_text().replace("min_cosine", "min_cosin"),
    );
    let msg = load(&p).expect_err("unknown gate key").to_string();
    assert!(
        msg.contains("gate.toml") && msg.contains("min_cosin"),
        "{msg}"
    );
}

#[test]
fn impossible_values_name_file_and_key() {
    let dir = tempfile::tempdir().expect("tempdir");
    let cases = [
        ("cores = 4", "cores = 0", "cores"),
        ("min_cosine = 0.99", "min_cosine = 1.5", "gate.min_cosine"),
        (
            "min_top1_agreement = 0.9",
            "min_top1_agreement = -0.1",
            "gate.min_top1_agreement",
        ),
        (
            "max_abs_error = 0.1",
            "max_abs_error = -1.0",
            "gate.max_abs_error",
        ),
        (
            "precisions = [\"f32\"]",
            "precisions = [\"int8\"]",
            "precisions",
        ),
        ("prune = 0.0", "prune = 1.0", "policy.prune"),
        (
            "x = [1, 3, 256, 256]",
            "x = [1, 3, 0, 256]",
            "models.ch_PP-OCRv4_det_infer.inputs.x",
        ),
        (
            "min_mask_iou = 0.95",
            "min_mask_iou = 1.01",
            "gate.min_mask_iou",
        ),
        ("min_box_f1 = 0.95", "min_box_f1 = 2", "gate.min_box_f1"),
        (
            "min_sequence_agreement = 1.0",
            "min_sequence_agreement = -0.5",
            "gate.min_sequence_agreement",
        ),
        (
            "threshold = 0.3",
            "threshold = 1.0",
            "models.ch_PP-OCRv4_det_infer.task.threshold",
        ),
        (
            "latency_budget_ms = 250.0",
            "latency_budget_ms = 0.0",
            "latency_budget_ms",
        ),
    ];
    for (from, to, key) in cases {
        let text = rpi4_text();
        assert!(text.contains(from), "fixture lacks {from}");
        let p = write(&dir, "bad.toml", &text.replace(from, to));
        let e = load(&p).expect_err(to);
        let msg = e.to_string();
        assert!(
            matches!(&e, Error::Invalid { key: k, .. } if k == key),
            "{to}: {msg}"
        );
        assert!(msg.contains("bad.toml") && msg.contains(key), "{msg}");
    }
    let p = write(
        &dir,
        "f16.toml",
        &rpi4_text().replace("quantize = \"int8-weights\"", "quantize = \"f16\""),
    );
    let msg = load(&p).expect_err("f16 on an f32-only target").to_string();
    assert!(msg.contains("policy.quantize"), "{msg}");
}

#[test]
fn wrong_type_and_missing_file_are_errors() {
    let dir = tempfile::tempdir().expect("tempdir");
    let p = write(
        &dir,
        "ty.toml",
        &rpi4_text().replace("cores = 4", "cores = \"four\""),
    );
    let msg = load(&p).expect_err("wrong type").to_string();
    assert!(msg.contains("ty.toml") && msg.contains("cores"), "{msg}");
    let msg = load(dir.path().join("nope.toml"))
        .expect_err("missing")
        .to_string();
    assert!(msg.contains("nope.toml"), "{msg}");
}
