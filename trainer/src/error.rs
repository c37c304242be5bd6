//! The crate's one error type. Every variant names the file, device or value it is about.

use std::path::PathBuf;

/// Everything the trainer library can refuse or fail at.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// Reading or writing a file failed.
    #[error("{path}: {source}")]
    Io {
        /// The file or folder.
        path: PathBuf,
        /// The OS error.
        #[source]
        source: std::io::Error,
    },
    /// A file the dataset needs is not there.
    #[error("{path}: missing file ({why})")]
    MissingFile {
        /// The file that should exist.
        path: PathBuf,
        /// Why it is needed.
        why: String,
    },
    /// A dataset manifest that does not parse or does not fit its folder.
    #[error("{path}: invalid manifest: {reason}")]
    Manifest {
        /// The manifest.json.
        path: PathBuf,
        /// What is wrong.
        reason: String,
    },
    /// A .npy file that is not a valid .npy of the expected dtype.
    #[error("{path}: corrupted or unexpected .npy: {reason}")]
    Npy {
        /// The .npy file.
        path: PathBuf,
        /// What is wrong.
        reason: String,
    },
    /// A file whose sha256 is not the one in the manifest.
    #[error("{path}: sha256 {actual} does not match the manifest's {expected}")]
    HashMismatch {
        /// The file.
        path: PathBuf,
        /// sha256 (hex) the manifest lists.
        expected: String,
        /// sha256 (hex) of the file on disk.
        actual: String,
    },
    /// An array whose shape does not fit the task.
    #[error("{path}: shape {actual:?} does not fit task {task}: expected {expected}")]
    Shape {
        /// The file.
        path: PathBuf,
        /// The task's name.
        task: String,
        /// The shape found.
        actual: Vec<u64>,
        /// The shape expected, in words.
        expected: String,
    },
    /// A label that is missing or outside the task's classes.
    #[error("{path}: {reason}")]
    Label {
        /// The labels file.
        path: PathBuf,
        /// What is wrong, with the sample index.
        reason: String,
    },
    /// An argument that cannot be used (fractions, sizes, names).
    #[error("invalid {what}: {reason}")]
    Invalid {
        /// What was given.
        what: String,
        /// Why it is refused.
        reason: String,
    },
    /// CUDA was asked for, and the driver, NVRTC or the CUDA headers are missing.
    #[error("CUDA was asked for (--device cuda) but is not usable here: {missing}; use --device auto or cpu")]
    CudaUnavailable {
        /// What the probe did not find, with where it looked.
        missing: String,
    },
    /// A data generator failed (e.g. espeak-ng missing or failing).
    #[error("data generator {generator}: {reason}")]
    Synth {
        /// The generator's name.
        generator: String,
        /// What failed.
        reason: String,
    },
    /// An MLflow tracking server could not be reached (REST API 2.0).
    #[error("MLflow server {url} unreachable ({endpoint}): {reason}")]
    MlflowUnreachable {
        /// The tracking server's base URL.
        url: String,
        /// The REST endpoint, e.g. `POST /api/2.0/mlflow/runs/create`.
        endpoint: String,
        /// The transport error.
        reason: String,
    },
    /// An MLflow endpoint answered with an error (REST API 2.0 error body).
    #[error("MLflow {endpoint}: HTTP {status} {error_code}: {message}")]
    Mlflow {
        /// The REST endpoint, e.g. `GET /api/2.0/mlflow/registered-models/alias`.
        endpoint: String,
        /// The HTTP status.
        status: u16,
        /// MLflow's `error_code`, e.g. `RESOURCE_DOES_NOT_EXIST`.
        error_code: String,
        /// MLflow's `message`.
        message: String,
    },
    /// A `models:/` URI that does not parse.
    #[error("invalid MLflow model URI {uri:?}: {reason}; expected models:/NAME@ALIAS or models:/NAME/VERSION")]
    ModelUri {
        /// The URI given.
        uri: String,
        /// What is wrong.
        reason: String,
    },
}

impl Error {
    /// An [`Error::Io`] about `path`.
    pub fn io(path: impl Into<PathBuf>, source: std::io::Error) -> Self {
        Error::Io {
            path: path.into(),
            source,
        }
    }
}
