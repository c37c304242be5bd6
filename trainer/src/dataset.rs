//! Versioned dataset folders: `manifest.json` + `inputs.npy` (f32 [N, ...sample shape]) +
//! `labels.npy` (i64 [N]) + optional `unlabelled.npy` (f32 [M, ...sample shape]). Format:
//! `docs/datasets.md`. [`Dataset::open`] checks everything (hashes, shapes, dtypes, labels)
//! before any training starts; [`write_dataset`] never leaves a half-written folder.

pub mod manifest;
pub mod npy;

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

use serde::{Deserialize, Serialize};
use sha2::{Digest, Sha256};

pub use manifest::{FileEntry, LabelKind, Manifest, Provenance, SplitRule, FORMAT_VERSION};

use crate::Error;

/// The inputs file.
pub const INPUTS: &str = "inputs.npy";
/// The labels file.
pub const LABELS: &str = "labels.npy";
/// The teacher-only inputs file (distillation).
pub const UNLABELLED: &str = "unlabelled.npy";
/// The manifest file.
pub const MANIFEST: &str = "manifest.json";

/// What a dataset is for; fixes the sample shape and the classes.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Task {
    /// Text-line direction, like the PP-OCR cls model: f32 [3, 48, 192] normalised
    /// `(pixel / 255 - 0.5) / 0.5`; class 0 = upright, 1 = turned 180 degrees.
    TextDirection,
    /// Voice activity at 16 kHz, like Silero VAD's `input`: f32 [576] = 64 samples of context
    /// then 512 new samples, in [-1, 1]; class 1 = speech in more than half the new samples.
    Vad,
}

impl Task {
    /// One sample's shape.
    pub fn sample_shape(self) -> Vec<usize> {
        match self {
            Task::TextDirection => vec![3, 48, 192],
            Task::Vad => vec![576],
        }
    }

    /// Number of classes (labels are `0..classes()`).
    pub fn classes(self) -> usize {
        2
    }

    /// The snake_case name (as in the manifest).
    pub fn name(self) -> &'static str {
        match self {
            Task::TextDirection => "text_direction",
            Task::Vad => "vad",
        }
    }
}

impl std::fmt::Display for Task {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.name())
    }
}

impl std::str::FromStr for Task {
    type Err = Error;
    fn from_str(s: &str) -> Result<Self, Error> {
        match s.replace('-', "_").as_str() {
            "text_direction" => Ok(Task::TextDirection),
            "vad" => Ok(Task::Vad),
            o => Err(Error::Invalid {
                what: "task".into(),
                reason: format!("{o:?}: expected text-direction or vad"),
            }),
        }
    }
}

/// A split of a dataset.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum SplitName {
    /// Training samples.
    Train,
    /// Validation samples (early stopping).
    Validation,
    /// Held-out test samples (final metrics).
    Test,
}

/// Samples in memory.
#[derive(Debug, Clone, PartialEq)]
pub struct Examples {
    /// Row-major f32 [n, ...sample_shape].
    pub x: Vec<f32>,
    /// One sample's shape.
    pub sample_shape: Vec<usize>,
    /// Class indices, i64 [n], or `None` for unlabelled samples.
    pub y: Option<Vec<i64>>,
}

impl Examples {
    /// Values in one sample.
    pub fn sample_len(&self) -> usize {
        self.sample_shape.iter().product()
    }

    /// Number of samples.
    pub fn len(&self) -> usize {
        self.x.len().checked_div(self.sample_len()).unwrap_or(0)
    }

    /// True when there are no samples.
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// Sample `i`'s values.
    pub fn sample(&self, i: usize) -> &[f32] {
        let n = self.sample_len();
        &self.x[i * n..(i + 1) * n]
    }
}

/// Validation and test fractions of a split (the rest is train).
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct SplitFractions {
    /// Fraction for validation, in [0, 1).
    pub validation: f64,
    /// Fraction for test, in [0, 1).
    pub test: f64,
    /// Consecutive samples kept in one split (e.g. 2: a line upright and turned).
    pub group_size: usize,
}

impl Default for SplitFractions {
    fn default() -> Self {
        SplitFractions {
            validation: 0.1,
            test: 0.1,
            group_size: 1,
        }
    }
}

/// An opened, fully checked dataset held in memory.
#[derive(Debug, Clone)]
pub struct Dataset {
    dir: PathBuf,
    manifest: Manifest,
    inputs: Vec<f32>,
    labels: Option<Vec<i64>>,
    unlabelled: Option<Vec<f32>>,
}

fn manifest_err(dir: &Path, reason: impl Into<String>) -> Error {
    Error::Manifest {
        path: dir.join(MANIFEST),
        reason: reason.into(),
    }
}

impl Dataset {
    /// Opens and checks `dir`: manifest (known fields, version, task shape), every listed file
    /// present with its sha256, the dataset id, each .npy's dtype and shape, every label present
    /// and in `0..task.classes()`. Errors name the file.
    pub fn open(dir: &Path) -> Result<Self, Error> {
        let manifest = read_manifest(dir)?;
        check_manifest(dir, &manifest)?;
        let inputs_bytes = read_checked(dir, &manifest, INPUTS, "the inputs")?;
        let inputs = load_inputs(
            &dir.join(INPUTS),
            &inputs_bytes,
            &manifest,
            manifest.num_samples,
        )?;
        drop(inputs_bytes);
        let labels = match manifest.label_kind {
            LabelKind::ClassIndex => {
                let b = read_checked(dir, &manifest, LABELS, "label_kind is class_index")?;
                Some(load_labels(&dir.join(LABELS), &b, &manifest)?)
            }
            LabelKind::None => None,
        };
        let unlabelled = if manifest.files.contains_key(UNLABELLED) {
            let b = read_checked(dir, &manifest, UNLABELLED, "the manifest lists it")?;
            let path = dir.join(UNLABELLED);
            Some(load_inputs(&path, &b, &manifest, manifest.num_unlabelled)?)
        } else if manifest.num_unlabelled > 0 {
            return Err(manifest_err(
                dir,
                "num_unlabelled > 0 but unlabelled.npy not listed",
            ));
        } else {
            None
        };
        Ok(Dataset {
            dir: dir.to_path_buf(),
            manifest,
            inputs,
            labels,
            unlabelled,
        })
    }

    /// The task.
    pub fn task(&self) -> Task {
        self.manifest.task
    }

    /// The dataset id (content hash, see [`Manifest::id`]).
    pub fn id(&self) -> &str {
        &self.manifest.id
    }

    /// The folder it was opened from.
    pub fn dir(&self) -> &Path {
        &self.dir
    }

    /// The manifest.
    pub fn manifest(&self) -> &Manifest {
        &self.manifest
    }

    /// Sample indices of split `s`, ascending.
    pub fn indices(&self, s: SplitName) -> Vec<usize> {
        (0..self.manifest.num_samples)
            .filter(|&i| self.manifest.split.assign(i) == s)
            .collect()
    }

    /// The samples of split `s` (in index order), with labels when the dataset has them.
    pub fn split(&self, s: SplitName) -> Result<Examples, Error> {
        let shape = self.manifest.sample_shape.clone();
        let n: usize = shape.iter().product();
        let idx = self.indices(s);
        let mut x = Vec::with_capacity(idx.len() * n);
        for &i in &idx {
            x.extend_from_slice(&self.inputs[i * n..(i + 1) * n]);
        }
        let y = self
            .labels
            .as_ref()
            .map(|l| idx.iter().map(|&i| l[i]).collect());
        Ok(Examples {
            x,
            sample_shape: shape,
            y,
        })
    }

    /// The teacher-only inputs (`unlabelled.npy`), if any.
    pub fn unlabelled(&self) -> Result<Option<Examples>, Error> {
        Ok(self.unlabelled.as_ref().map(|u| Examples {
            x: u.clone(),
            sample_shape: self.manifest.sample_shape.clone(),
            y: None,
        }))
    }
}

fn read_manifest(dir: &Path) -> Result<Manifest, Error> {
    let path = dir.join(MANIFEST);
    let text = match std::fs::read_to_string(&path) {
        Ok(t) => t,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
            return Err(Error::MissingFile {
                path,
                why: "every dataset folder has a manifest".into(),
            })
        }
        Err(e) => return Err(Error::io(path, e)),
    };
    serde_json::from_str(&text).map_err(|e| manifest_err(dir, e.to_string()))
}

fn check_manifest(dir: &Path, m: &Manifest) -> Result<(), Error> {
    if m.format_version != FORMAT_VERSION {
        return Err(manifest_err(
            dir,
            format!(
                "format_version {}, this build reads {FORMAT_VERSION}",
                m.format_version
            ),
        ));
    }
    if m.sample_shape != m.task.sample_shape() {
        return Err(Error::Shape {
            path: dir.join(MANIFEST),
            task: m.task.to_string(),
            actual: m.sample_shape.iter().map(|&d| d as u64).collect(),
            expected: format!("sample_shape {:?}", m.task.sample_shape()),
        });
    }
    if m.dtype != "f32" {
        return Err(manifest_err(
            dir,
            format!("dtype {:?}, expected \"f32\"", m.dtype),
        ));
    }
    if m.split.rule != manifest::SPLIT_RULE {
        return Err(manifest_err(
            dir,
            format!("unknown split rule {:?}", m.split.rule),
        ));
    }
    check_fractions(m.split.validation, m.split.test)
        .map_err(|e| manifest_err(dir, e.to_string()))?;
    for name in m.files.keys() {
        if ![INPUTS, LABELS, UNLABELLED].contains(&name.as_str()) {
            return Err(manifest_err(dir, format!("unknown file {name:?} listed")));
        }
    }
    let id = manifest::content_id(&m.files);
    if id != m.id {
        return Err(manifest_err(
            dir,
            format!("id {} is not the content hash {id}", m.id),
        ));
    }
    Ok(())
}

fn check_fractions(validation: f64, test: f64) -> Result<(), Error> {
    let ok = |f: f64| (0.0..1.0).contains(&f);
    if !ok(validation) || !ok(test) || validation + test >= 1.0 {
        return Err(Error::Invalid {
            what: "split fractions".into(),
            reason: format!("validation {validation} and test {test}: each in [0, 1), sum below 1"),
        });
    }
    Ok(())
}

/// Reads `name` from `dir` and checks it against the manifest's sha256.
fn read_checked(dir: &Path, m: &Manifest, name: &str, why: &str) -> Result<Vec<u8>, Error> {
    let path = dir.join(name);
    let entry = m.files.get(name).ok_or_else(|| Error::MissingFile {
        path: path.clone(),
        why: format!("{why}, but the manifest does not list it"),
    })?;
    let bytes = match std::fs::read(&path) {
        Ok(b) => b,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
            return Err(Error::MissingFile {
                path,
                why: format!("{why}; listed in the manifest"),
            })
        }
        Err(e) => return Err(Error::io(path, e)),
    };
    let actual = sha256_hex(&bytes);
    if actual != entry.sha256 {
        return Err(Error::HashMismatch {
            path,
            expected: entry.sha256.clone(),
            actual,
        });
    }
    Ok(bytes)
}

/// sha256 of `bytes`, lower-case hex.
pub fn sha256_hex(bytes: &[u8]) -> String {
    hex::encode(Sha256::digest(bytes))
}

fn load_inputs(path: &Path, bytes: &[u8], m: &Manifest, n: usize) -> Result<Vec<f32>, Error> {
    let a = npy::parse_f32(path, bytes)?;
    let mut want: Vec<u64> = vec![n as u64];
    want.extend(m.sample_shape.iter().map(|&d| d as u64));
    if a.shape.len() != want.len() || a.shape[1..] != want[1..] {
        return Err(Error::Shape {
            path: path.to_path_buf(),
            task: m.task.to_string(),
            actual: a.shape,
            expected: format!("[N, {}]", join(&m.sample_shape)),
        });
    }
    if a.shape[0] != n as u64 {
        return Err(Error::Shape {
            path: path.to_path_buf(),
            task: m.task.to_string(),
            actual: a.shape,
            expected: format!("{n} samples as the manifest says: {want:?}"),
        });
    }
    Ok(a.data)
}

fn join(d: &[usize]) -> String {
    d.iter()
        .map(|v| v.to_string())
        .collect::<Vec<_>>()
        .join(", ")
}

fn load_labels(path: &Path, bytes: &[u8], m: &Manifest) -> Result<Vec<i64>, Error> {
    let a = npy::parse_i64(path, bytes)?;
    let label_err = |reason: String| Error::Label {
        path: path.to_path_buf(),
        reason,
    };
    if a.shape.len() != 1 {
        return Err(label_err(format!(
            "labels have shape {:?}, expected [N]",
            a.shape
        )));
    }
    if a.data.len() < m.num_samples {
        return Err(label_err(format!(
            "missing label for sample {} ({} labels for {} inputs)",
            a.data.len(),
            a.data.len(),
            m.num_samples
        )));
    }
    if a.data.len() > m.num_samples {
        return Err(label_err(format!(
            "{} labels for {} inputs",
            a.data.len(),
            m.num_samples
        )));
    }
    let classes = m.task.classes() as i64;
    if let Some(i) = a.data.iter().position(|&l| l < 0 || l >= classes) {
        return Err(label_err(format!(
            "label {} of sample {i} is outside the classes 0..{classes} of task {}",
            a.data[i], m.task
        )));
    }
    Ok(a.data)
}

/// Writes a dataset folder at `dir` (which must not exist or be empty) and opens it.
///
/// `inputs` holds every sample (labelled when `inputs.y` is `Some`); `unlabelled` the
/// teacher-only inputs. Files are written into a sibling temporary folder, fsynced, then
/// renamed into place, so `dir` is either absent or complete.
pub fn write_dataset(
    dir: &Path,
    task: Task,
    inputs: &Examples,
    unlabelled: Option<&Examples>,
    provenance: Provenance,
    fractions: SplitFractions,
    seed: u64,
) -> Result<Dataset, Error> {
    check_examples(task, inputs, "inputs")?;
    if let Some(u) = unlabelled {
        check_examples(task, u, "unlabelled")?;
    }
    check_fractions(fractions.validation, fractions.test)?;
    let tmp = prepare_tmp(dir)?;
    let files = write_files(&tmp, inputs, unlabelled)?;
    let manifest = Manifest {
        format_version: FORMAT_VERSION,
        id: manifest::content_id(&files),
        task,
        sample_shape: task.sample_shape(),
        dtype: "f32".into(),
        label_kind: if inputs.y.is_some() {
            LabelKind::ClassIndex
        } else {
            LabelKind::None
        },
        num_samples: inputs.len(),
        num_unlabelled: unlabelled.map_or(0, Examples::len),
        files,
        provenance,
        split: SplitRule {
            rule: manifest::SPLIT_RULE.into(),
            seed,
            group_size: fractions.group_size.max(1),
            validation: fractions.validation,
            test: fractions.test,
        },
    };
    let json = serde_json::to_vec_pretty(&manifest).map_err(|e| Error::Invalid {
        what: "manifest".into(),
        reason: e.to_string(),
    })?;
    npy::write_synced(&tmp.join(MANIFEST), &json)?;
    commit(&tmp, dir)?;
    Dataset::open(dir)
}

fn check_examples(task: Task, e: &Examples, what: &str) -> Result<(), Error> {
    let invalid = |reason: String| Error::Invalid {
        what: what.into(),
        reason,
    };
    if e.sample_shape != task.sample_shape() {
        return Err(invalid(format!(
            "sample shape {:?} does not fit task {task}: {:?}",
            e.sample_shape,
            task.sample_shape()
        )));
    }
    if e.x.len() % e.sample_len() != 0 {
        return Err(invalid(format!(
            "{} values is not a whole number of samples",
            e.x.len()
        )));
    }
    if let Some(y) = &e.y {
        if y.len() != e.len() {
            return Err(invalid(format!(
                "{} labels for {} samples",
                y.len(),
                e.len()
            )));
        }
        if let Some(i) = y.iter().position(|&l| l < 0 || l >= task.classes() as i64) {
            return Err(invalid(format!(
                "label {} of sample {i} is not a class of {task}",
                y[i]
            )));
        }
    }
    Ok(())
}

/// A fresh temporary sibling folder of `dir`; refuses a `dir` that has content.
fn prepare_tmp(dir: &Path) -> Result<PathBuf, Error> {
    if let Ok(mut rd) = std::fs::read_dir(dir) {
        if rd.next().is_some() {
            return Err(Error::Invalid {
                what: "output folder".into(),
                reason: format!("{} exists and is not empty", dir.display()),
            });
        }
    }
    let parent = match dir.parent() {
        Some(p) if !p.as_os_str().is_empty() => p.to_path_buf(),
        _ => PathBuf::from("."),
    };
    std::fs::create_dir_all(&parent).map_err(|e| Error::io(&parent, e))?;
    let name = dir
        .file_name()
        .map_or_else(|| "dataset".into(), |n| n.to_string_lossy().into_owned());
    let tmp = parent.join(format!(".{name}.tmp-{}", std::process::id()));
    if tmp.exists() {
        std::fs::remove_dir_all(&tmp).map_err(|e| Error::io(&tmp, e))?;
    }
    std::fs::create_dir(&tmp).map_err(|e| Error::io(&tmp, e))?;
    Ok(tmp)
}

fn write_files(
    tmp: &Path,
    inputs: &Examples,
    unlabelled: Option<&Examples>,
) -> Result<BTreeMap<String, FileEntry>, Error> {
    let mut files = BTreeMap::new();
    let mut put = |name: &str, bytes: Vec<u8>| -> Result<(), Error> {
        npy::write_synced(&tmp.join(name), &bytes)?;
        files.insert(
            name.to_string(),
            FileEntry {
                sha256: sha256_hex(&bytes),
                bytes: bytes.len() as u64,
            },
        );
        Ok(())
    };
    let shape = |e: &Examples| {
        let mut s = vec![e.len()];
        s.extend(&e.sample_shape);
        s
    };
    put(INPUTS, npy::encode_f32(&shape(inputs), &inputs.x))?;
    if let Some(y) = &inputs.y {
        put(LABELS, npy::encode_i64(&[y.len()], y))?;
    }
    if let Some(u) = unlabelled {
        put(UNLABELLED, npy::encode_f32(&shape(u), &u.x))?;
    }
    Ok(files)
}

/// Renames `tmp` to `dir` (replacing an empty `dir`) and fsyncs the parent.
fn commit(tmp: &Path, dir: &Path) -> Result<(), Error> {
    if dir.exists() {
        std::fs::remove_dir(dir).map_err(|e| Error::io(dir, e))?;
    }
    std::fs::rename(tmp, dir).map_err(|e| Error::io(dir, e))?;
    if let Some(parent) = dir.parent().filter(|p| !p.as_os_str().is_empty()) {
        if let Ok(f) = std::fs::File::open(parent) {
            f.sync_all().map_err(|e| Error::io(parent, e))?;
        }
    }
    Ok(())
}
