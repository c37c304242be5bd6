//! Central training for edgefleet: versioned datasets, device choice (CUDA when present, the
//! CPU otherwise), models, distillation and ONNX export. See `docs/datasets.md` and
//! `docs/trainer.md`.

pub mod dataset;
pub mod device;
pub mod error;
pub mod finetune;
pub mod infer;
pub mod mlflow;
pub mod mlflow_local;
pub mod model;
pub mod onnx;
pub mod run;
pub mod synth;
pub mod train;

pub use error::Error;
