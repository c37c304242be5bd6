//! The training loop on a tiny synthetic VAD set (CPU, seconds): it beats chance on a held-out
//! set generated with another seed, and a run stopped after 1 epoch and resumed to 3 ends with
//! exactly the metrics of an uninterrupted 3-epoch run.

mod common;

use burn::backend::{Autodiff, NdArray};
use common::windows;
use edgefleet_trainer::dataset::Task;
use edgefleet_trainer::model::{ConvNetConfig, ModelSize};
use edgefleet_trainer::train::{self, NoObserver, TrainConfig, TrainData};
use edgefleet_trainer::train::{EpochMetrics, RunObserver};
use edgefleet_trainer::Error;

/// Stops the run (as a kill would) after epoch `.0`'s checkpoint is written.
struct KillAfter(usize);

impl RunObserver for KillAfter {
    fn params(&mut self, _: &serde_json::Value) -> Result<(), Error> {
        Ok(())
    }
    fn epoch(&mut self, m: &EpochMetrics) -> Result<(), Error> {
        if m.epoch >= self.0 {
            return Err(Error::Invalid {
                what: "run".into(),
                reason: "killed by the test".into(),
            });
        }
        Ok(())
    }
    fn artifacts(&mut self, _: &[std::path::PathBuf]) -> Result<(), Error> {
        Ok(())
    }
}

type B = Autodiff<NdArray<f32>>;

fn config(epochs: usize) -> TrainConfig {
    TrainConfig {
        epochs,
        batch_size: 16,
        lr: 5e-3,
        warmup_steps: 4,
        weight_decay: 1e-4,
        seed: 11,
        patience: 5,
        distill: None,
    }
}

#[test]
fn tiny_vad_student_beats_chance_and_resumes_exactly() {
    let (tr, va, te) = (
        windows(512, 1, 0.087),
        windows(64, 2, 0.087),
        windows(128, 3, 0.087),
    );
    let data = TrainData {
        task: Task::Vad,
        train: &tr,
        val: &va,
        soft: None,
    };
    let arch = ConvNetConfig::for_task(Task::Vad, ModelSize::Student);
    let dev = Default::default();
    let dir = tempfile::tempdir().expect("tempdir");

    let full = train::train::<B>(
        &arch,
        &data,
        &config(3),
        &dir.path().join("full"),
        &mut NoObserver,
        &dev,
    )
    .expect("train");
    let pred = train::predict(
        &burn::module::AutodiffModule::valid(&full.model),
        &arch,
        &te,
        &dev,
    )
    .expect("predict");
    let f1 = train::metric(Task::Vad, &pred, te.y.as_deref().expect("labels"));
    eprintln!(
        "tiny VAD student: held-out F1 {f1:.3}, history {:?}",
        full.history
    );
    assert!(f1 >= 0.8, "held-out F1 {f1} is not clearly above chance");

    // "Kill" after epoch 1: the observer fails once the epoch's checkpoint is on disk.
    let ck = dir.path().join("resumed");
    let killed = train::train::<B>(&arch, &data, &config(3), &ck, &mut KillAfter(1), &dev);
    assert!(killed.is_err(), "the run was not stopped");
    let resumed =
        train::train::<B>(&arch, &data, &config(3), &ck, &mut NoObserver, &dev).expect("resume");
    assert_eq!(
        resumed.history, full.history,
        "resumed run differs from the uninterrupted one"
    );
}
