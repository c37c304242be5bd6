//! `manifest.json` of a dataset folder (format version 1, see `docs/datasets.md`).

use std::collections::BTreeMap;

use serde::{Deserialize, Serialize};
use sha2::{Digest, Sha256};

use super::Task;

/// The manifest format this crate writes and reads.
pub const FORMAT_VERSION: u32 = 1;

/// The whole manifest. Unknown fields are refused.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Manifest {
    /// Always [`FORMAT_VERSION`].
    pub format_version: u32,
    /// The dataset id: sha256 (hex) over the sorted `"<sha256>  <file name>\n"` lines of
    /// [`Manifest::files`] (the `sha256sum` format).
    pub id: String,
    /// What the samples are for.
    pub task: Task,
    /// One sample's shape (without the sample axis), e.g. `[3, 48, 192]`.
    pub sample_shape: Vec<usize>,
    /// Input dtype; always `"f32"`.
    pub dtype: String,
    /// What `labels.npy` holds.
    pub label_kind: LabelKind,
    /// Samples in `inputs.npy` (and labels in `labels.npy`).
    pub num_samples: usize,
    /// Samples in `unlabelled.npy` (0 when absent).
    pub num_unlabelled: usize,
    /// Every data file by name (e.g. `inputs.npy`) with its sha256 and size.
    pub files: BTreeMap<String, FileEntry>,
    /// Where the samples come from.
    pub provenance: Provenance,
    /// How samples are assigned to train / validation / test.
    pub split: SplitRule,
}

/// What the labels are.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum LabelKind {
    /// `labels.npy`, i64 [N], a class index in `0..task.classes()`.
    ClassIndex,
    /// No labels (an unlabelled set, e.g. device captures for distillation).
    None,
}

/// One data file.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct FileEntry {
    /// sha256 of the file's bytes, lower-case hex.
    pub sha256: String,
    /// Size in bytes.
    pub bytes: u64,
}

/// Where the samples come from.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(tag = "kind", rename_all = "snake_case", deny_unknown_fields)]
pub enum Provenance {
    /// A deterministic generator (e.g. `edgefleet datasets synth`).
    Generator {
        /// The generator's name, e.g. `text_direction_lines/1`.
        name: String,
        /// Its parameters (free-form JSON object).
        parameters: serde_json::Value,
        /// Its seed.
        seed: u64,
    },
    /// Inputs captured on devices and uploaded to the fleet server.
    DeviceCaptures {
        /// Device ids.
        devices: Vec<String>,
        /// Free text (model, version, time range).
        note: String,
    },
}

/// Seeded split: sample `i` belongs to group `g = i / group_size`; `u = first 8 bytes (big
/// endian) of sha256(seed as 8 bytes LE ++ g as 8 bytes LE) / 2^64`; `u < test` is test,
/// `u < test + validation` is validation, the rest is train. Groups keep related samples (a text
/// line upright and turned) in one split.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct SplitRule {
    /// Always `"sha256_seed_group"`.
    pub rule: String,
    /// The split seed.
    pub seed: u64,
    /// Consecutive samples that share a split (1 = every sample on its own).
    pub group_size: usize,
    /// Fraction of groups for validation, in [0, 1).
    pub validation: f64,
    /// Fraction of groups for test, in [0, 1).
    pub test: f64,
}

/// The split rule's name.
pub const SPLIT_RULE: &str = "sha256_seed_group";

impl SplitRule {
    /// Which split sample `index` is in.
    pub fn assign(&self, index: usize) -> super::SplitName {
        let g = (index / self.group_size.max(1)) as u64;
        let mut h = Sha256::new();
        h.update(self.seed.to_le_bytes());
        h.update(g.to_le_bytes());
        let d = h.finalize();
        let mut b = [0u8; 8];
        b.copy_from_slice(&d[..8]);
        let u = u64::from_be_bytes(b) as f64 / 18_446_744_073_709_551_616.0;
        if u < self.test {
            super::SplitName::Test
        } else if u < self.test + self.validation {
            super::SplitName::Validation
        } else {
            super::SplitName::Train
        }
    }
}

/// The dataset id of `files` (see [`Manifest::id`]).
pub fn content_id(files: &BTreeMap<String, FileEntry>) -> String {
    let mut lines: Vec<String> = files
        .iter()
        .map(|(n, f)| format!("{}  {n}\n", f.sha256))
        .collect();
    lines.sort();
    let mut h = Sha256::new();
    for l in &lines {
        h.update(l.as_bytes());
    }
    hex::encode(h.finalize())
}
