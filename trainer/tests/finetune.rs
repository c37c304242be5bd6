//! Fine-tuning a released model on shifted, labelled field data (issue #13's built-in
//! trainer): over several field-data seeds the candidate beats the base on the field data's
//! held-out split by a clear margin and keeps the previous test set; the run folder it writes
//! is itself a base; bad field data is refused naming the problem.
//!
//! The task is a small VAD stand-in (a tone in noise, as in `train_loop.rs`); the field data
//! is the same task at a much higher noise floor (a noisier room), where a model that learned
//! "energy means speech" calls everything speech.

mod common;

use std::path::Path;

use common::windows;

use edgefleet_trainer::dataset::{self, Examples, Provenance, SplitFractions, Task};
use edgefleet_trainer::device::DeviceChoice;
use edgefleet_trainer::finetune::{self, FinetuneRequest};
use edgefleet_trainer::model::ModelSize;
use edgefleet_trainer::run::{self, Progress, RunRecord, RunRequest};
use edgefleet_trainer::train::TrainConfig;

/// Quiet room: noise half-width 0.087 (std 0.05).
const QUIET: f32 = 0.087;
/// The field's noisier room: half-width 0.7 (std 0.4, louder than most tones).
const NOISY: f32 = 0.7;

fn base_config() -> TrainConfig {
    TrainConfig {
        epochs: 3,
        batch_size: 16,
        lr: 5e-3,
        warmup_steps: 4,
        weight_decay: 1e-4,
        seed: 11,
        patience: 5,
        distill: None,
    }
}

/// The previous dataset (quiet room) and a student trained on it: the release the cohort runs.
fn base_run(root: &Path) -> RunRecord {
    let data = root.join("previous-data");
    dataset::write_dataset(
        &data,
        Task::Vad,
        &windows(800, 1, QUIET),
        None,
        Provenance::Generator {
            name: "tone_in_noise/1".into(),
            parameters: serde_json::json!({"noise": QUIET}),
            seed: 1,
        },
        SplitFractions {
            validation: 0.15,
            test: 0.2,
            group_size: 1,
        },
        5,
    )
    .expect("previous dataset");
    run::run(&RunRequest {
        data,
        out: root.join("base"),
        size: ModelSize::Student,
        config: base_config(),
        device: DeviceChoice::Cpu,
        teacher: None,
        mlflow: None,
        progress: Progress::Quiet,
    })
    .expect("base run")
}

fn request(root: &Path, new: Examples, seed: u64, out: &str) -> FinetuneRequest {
    let mut config = finetune::finetune_config();
    config.seed = seed;
    config.lr = 2e-3;
    FinetuneRequest {
        base: root.join("base"),
        previous: None,
        new,
        new_id: format!("ds-test-{seed}"),
        replay_fraction: 0.5,
        config,
        device: DeviceChoice::Cpu,
        out: root.join(out),
    }
}

#[test]
fn finetune_recovers_the_field_data_and_keeps_the_previous_test_set() {
    let root = tempfile::tempdir().expect("tmp");
    let base = base_run(root.path());
    eprintln!("base: test F1 {:.3}", base.test.metric);
    assert!(base.test.metric >= 0.8, "base F1 {}", base.test.metric);
    let mut gains = Vec::new();
    for seed in [21u64, 22, 23] {
        let new = windows(400, 100 + seed, NOISY);
        let out = format!("ft-{seed}");
        let ft = finetune::finetune(&request(root.path(), new, seed, &out)).expect("finetune");
        let g = &ft.gate;
        eprintln!("seed {seed}: {g:?}");
        assert_eq!(g.metric, "speech_f1");
        assert_eq!(g.new_samples, 80, "20% of 400 field samples held out");
        assert!(
            g.candidate_new >= g.current_new + 0.1,
            "seed {seed}: no clear gain on the field data: {g:?}"
        );
        assert!(
            g.candidate_previous >= g.current_previous - 0.05,
            "seed {seed}: forgot the previous test set: {g:?}"
        );
        gains.push(g.candidate_new - g.current_new);
        // The run folder is complete and is itself a base (kind finetune, lineage inside).
        let rec = RunRecord::load(&root.path().join(&out)).expect("run.json");
        assert_eq!(rec.kind, "finetune");
        let f = rec.finetune.as_ref().expect("finetune lineage");
        assert_eq!(f.gate, ft.gate);
        assert_eq!((f.new_train, f.new_validation, f.new_test), (240, 80, 80));
        assert_eq!(f.replayed, 240, "replay 0.5: as many previous as new");
        assert_eq!(rec.dataset, base.dataset, "replay source carried forward");
        assert!(root.path().join(&out).join("model.onnx").is_file());
    }
    eprintln!("F1 gains on the field data: {gains:?}");
}

#[test]
fn a_finetuned_run_is_a_base_and_bad_field_data_is_refused() {
    let root = tempfile::tempdir().expect("tmp");
    base_run(root.path());
    // Bad inputs, each refused naming the problem, before any training.
    let mut unlabelled = windows(100, 5, NOISY);
    unlabelled.y = None;
    let e = finetune::finetune(&request(root.path(), unlabelled, 1, "x")).expect_err("refused");
    assert!(e.to_string().contains("no labels"), "{e}");
    let few = windows(6, 5, NOISY);
    let e = finetune::finetune(&request(root.path(), few, 1, "x")).expect_err("refused");
    assert!(e.to_string().contains("at least 50"), "{e}");
    let mut ragged = windows(100, 5, NOISY);
    ragged.y.as_mut().expect("labels").pop();
    let e = finetune::finetune(&request(root.path(), ragged, 1, "x")).expect_err("refused");
    assert!(e.to_string().contains("57600 values for 99 labels"), "{e}");
    let mut shape = windows(40, 5, NOISY);
    shape.sample_shape = vec![2, 288];
    let e = finetune::finetune(&request(root.path(), shape, 1, "x")).expect_err("refused");
    assert!(e.to_string().contains("[2, 288]"), "{e}");
    let mut r = request(root.path(), windows(100, 5, NOISY), 1, "x");
    r.replay_fraction = 1.0;
    let e = finetune::finetune(&r).expect_err("refused");
    assert!(e.to_string().contains("replay_fraction"), "{e}");
    let mut r = request(root.path(), windows(100, 5, NOISY), 1, "x");
    r.previous = Some(root.path().join("nowhere"));
    let e = finetune::finetune(&r).expect_err("refused");
    assert!(e.to_string().contains("--previous-data"), "{e}");
    // Another dataset given as the base's previous data: refused by its id.
    let other = root.path().join("other-data");
    dataset::write_dataset(
        &other,
        Task::Vad,
        &windows(200, 9, QUIET),
        None,
        Provenance::Generator {
            name: "tone_in_noise/1".into(),
            parameters: serde_json::json!({"noise": QUIET}),
            seed: 9,
        },
        SplitFractions::default(),
        5,
    )
    .expect("other dataset");
    let mut r = request(root.path(), windows(100, 5, NOISY), 1, "x");
    r.previous = Some(other.clone());
    let e = finetune::finetune(&r).expect_err("refused");
    assert!(e.to_string().contains("not its training data"), "{e}");
    assert!(finetune::check_base(&root.path().join("base"), Some(&other)).is_err());
    assert!(finetune::check_base(&root.path().join("base"), None).is_ok());
    assert!(!root.path().join("x").join("run.json").exists());

    // A fine-tuned run is the base of the next job.
    let ft = finetune::finetune(&request(root.path(), windows(200, 6, NOISY), 3, "gen1"))
        .expect("gen 1");
    let mut next = request(root.path(), windows(200, 7, NOISY), 4, "gen2");
    next.base = root.path().join("gen1");
    let ft2 = finetune::finetune(&next).expect("gen 2");
    let f = ft2.record.finetune.expect("lineage");
    assert_eq!(f.base, root.path().join("gen1"));
    assert_eq!(
        Some(&f.base_model_sha256),
        ft.record.artifacts.get("model.onnx")
    );
}

#[test]
fn small_field_sets_split_with_every_split_non_empty() {
    for n in 5..=200 {
        let s = finetune::split_new(&windows(n, 3, QUIET)).expect("split");
        let (a, b, c) = (s.train.len(), s.val.len(), s.test.len());
        assert_eq!(a + b + c, n);
        assert!(a > 0 && b > 0 && c > 0, "{n}: {a} {b} {c}");
        if n >= 20 {
            // 4 of 20 chunks of floor(n/20) or ceil(n/20) samples each.
            assert!(
                c >= 4 * (n / 20) && c <= 4 * n.div_ceil(20),
                "{n}: test {c}"
            );
        }
    }
}
