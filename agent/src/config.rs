//! Agent configuration (`agent.toml`). Unknown keys are rejected; every error
//! names the file and, where toml knows it, the key.

use std::net::SocketAddr;
use std::path::{Path, PathBuf};

use edgefleet_bundle::TrustStore;
use edgefleet_drift::{Autocorrelation, Correction, TestConfig, WindowConfig};
use edgefleet_protocol::DeviceId;
use serde::Deserialize;

/// Why the configuration could not be used.
#[derive(Debug, thiserror::Error)]
pub enum ConfigError {
    /// The file could not be read.
    #[error("config {path}: {source}")]
    Read {
        /// The file.
        path: PathBuf,
        /// The I/O error.
        source: std::io::Error,
    },
    /// The TOML did not parse or did not match the schema (toml names the key).
    #[error("config {path}: {reason}")]
    Parse {
        /// The file.
        path: PathBuf,
        /// toml's message, with the key and line.
        reason: String,
    },
    /// A key has a value the agent cannot use.
    #[error("config {path}: key `{key}`: {reason}")]
    Invalid {
        /// The file.
        path: PathBuf,
        /// The key.
        key: String,
        /// What is wrong.
        reason: String,
    },
}

/// MQTT broker settings.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct BrokerConfig {
    /// `mqtt://host:port` (no TLS in this build, see docs/agent.md).
    pub url: String,
    /// Optional username.
    #[serde(default)]
    pub username: Option<String>,
    /// Optional password.
    #[serde(default)]
    pub password: Option<String>,
}

impl BrokerConfig {
    /// Host and port from `url`.
    ///
    /// # Errors
    /// A message saying what is wrong with the URL.
    pub fn host_port(&self) -> Result<(String, u16), String> {
        let rest = self.url.strip_prefix("mqtt://").ok_or_else(|| {
            format!(
                "`{}` must start with mqtt:// (TLS is not built in)",
                self.url
            )
        })?;
        let (host, port) = rest
            .rsplit_once(':')
            .ok_or_else(|| format!("`{}` has no :port", self.url))?;
        let port: u16 = port
            .trim_end_matches('/')
            .parse()
            .map_err(|e| format!("port in `{}`: {e}", self.url))?;
        if host.is_empty() {
            return Err(format!("`{}` has no host", self.url));
        }
        Ok((host.to_string(), port))
    }
}

/// Local inference API.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ApiConfig {
    /// TCP listen address; must be a loopback address (`127.0.0.1:port`). Port 0 picks one.
    pub listen: SocketAddr,
    /// Optional Unix socket path.
    #[serde(default)]
    pub unix_socket: Option<PathBuf>,
    /// Inference worker threads (default 2).
    #[serde(default = "default_workers")]
    pub workers: usize,
    /// Bounded queue length; beyond it requests get 503 + Retry-After (default 256).
    #[serde(default = "default_queue")]
    pub queue_len: usize,
    /// Per-request timeout in milliseconds (default 2000).
    #[serde(default = "default_timeout")]
    pub request_timeout_ms: u64,
    /// Largest micro-batch for models with a batch axis (default 8).
    #[serde(default = "default_batch")]
    pub max_batch: usize,
    /// Threads one inference's matrix products run on (a pool shared by the
    /// workers; 1..=1024). Default: the target profile's `cores` when
    /// `target_profile` is given, else 1.
    #[serde(default)]
    pub threads: Option<usize>,
}

fn default_workers() -> usize {
    2
}
fn default_queue() -> usize {
    256
}
fn default_timeout() -> u64 {
    2000
}
fn default_batch() -> usize {
    8
}
fn default_telemetry() -> u64 {
    30
}

/// The whole file.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Config {
    /// This device's id (also its MQTT client id).
    pub device_id: DeviceId,
    /// Directory for the store, slots and downloads.
    pub data_dir: PathBuf,
    /// Target profile id (must be in a bundle's `targets`).
    pub target: String,
    /// Optional target profile TOML (for `latency_budget_ms`).
    #[serde(default)]
    pub target_profile: Option<PathBuf>,
    /// Latency budget for a trial's p99 (ms); overrides the target profile's. Default 100.
    #[serde(default)]
    pub latency_budget_ms: Option<f64>,
    /// MQTT broker.
    pub broker: BrokerConfig,
    /// Trusted keys: SPKI PEM files or trust-store JSON files.
    pub trusted_keys: Vec<PathBuf>,
    /// Local API.
    pub api: ApiConfig,
    /// Telemetry interval (s).
    #[serde(default = "default_telemetry")]
    pub telemetry_interval_s: u64,
    /// Drift detection (`[drift]`, docs/agent.md "Drift").
    #[serde(default)]
    pub drift: DriftSection,
    /// Data capture limits (`[capture]`, docs/agent.md "Data capture").
    #[serde(default)]
    pub capture: CaptureSection,
    /// Operator tags reported in Hello.
    #[serde(default)]
    pub tags: Vec<String>,
    /// A bundle to install at first boot (verified like any other).
    #[serde(default)]
    pub initial_bundle: Option<PathBuf>,
    /// Input sources, passed as-is to the inputs module.
    #[serde(default)]
    pub inputs: Vec<toml::Value>,
    /// Disk-use ceiling of the data directory's store (`[storage]`).
    #[serde(default)]
    pub storage: StorageConfig,
}

/// `[drift]`: the drift detector's settings (docs/agent.md, "Drift"). The
/// test settings (`alpha` .. `min_effective_per_bin`) are the defaults the
/// server's `ConfigUpdate.drift_test` may override at run time; the window
/// settings are fixed while a release is active.
#[derive(Debug, Clone, Copy, PartialEq, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct DriftSection {
    /// Period of the regular drift reports (s, >= 1). Default 300.
    pub report_interval_s: u64,
    /// Evaluate the tests every this many inferences (>= 1). Default 50.
    pub check_every: u64,
    /// Save the detector state every this many inferences (>= 1). Default 500.
    pub persist_every: u64,
    /// Window half-life in inferences ([`WindowConfig::half_life`]). Default 4000.
    pub half_life: f64,
    /// Half-life of the autocorrelation estimate in inferences
    /// ([`WindowConfig::rho_half_life`]). Default 32000.
    pub rho_half_life: f64,
    /// False-alarm probability of one evaluation, in (0, 0.5]. Default 0.001.
    pub alpha: f64,
    /// `bonferroni` (default), `benjamini_hochberg` or `none`.
    pub correction: Correction,
    /// Fixed AR(1) coefficient in [0, 1); absent: estimated online.
    pub rho: Option<f64>,
    /// Window units below which a test reports insufficient data (>= 1). Default 100.
    pub min_samples: f64,
    /// Effective samples needed per bin (>= 0). Default 5.
    pub min_effective_per_bin: f64,
}

impl Default for DriftSection {
    fn default() -> Self {
        let w = WindowConfig::default();
        let t = TestConfig::default();
        DriftSection {
            report_interval_s: 300,
            check_every: 50,
            persist_every: 500,
            half_life: w.half_life,
            rho_half_life: w.rho_half_life,
            alpha: t.alpha,
            correction: t.correction,
            rho: None,
            min_samples: t.min_samples,
            min_effective_per_bin: t.min_effective_per_bin,
        }
    }
}

impl DriftSection {
    /// The window settings.
    pub fn window(&self) -> WindowConfig {
        WindowConfig {
            half_life: self.half_life,
            rho_half_life: self.rho_half_life,
        }
    }

    /// The test settings.
    pub fn test(&self) -> TestConfig {
        TestConfig {
            alpha: self.alpha,
            correction: self.correction,
            autocorrelation: self
                .rho
                .map_or(Autocorrelation::Estimate, Autocorrelation::Fixed),
            min_samples: self.min_samples,
            min_effective_per_bin: self.min_effective_per_bin,
        }
    }

    /// Checks every value; `Err((key, reason))` names the first bad key.
    pub fn check(&self) -> Result<(), (&'static str, String)> {
        let positive = |v: f64| v.is_finite() && v > 0.0;
        if self.report_interval_s == 0 {
            return Err(("drift.report_interval_s", "must be at least 1".into()));
        }
        if self.check_every == 0 || self.persist_every == 0 {
            return Err((
                "drift.check_every",
                "check_every and persist_every must be at least 1".into(),
            ));
        }
        if !positive(self.half_life) || !positive(self.rho_half_life) {
            return Err((
                "drift.half_life",
                format!(
                    "half_life = {} and rho_half_life = {} must be positive numbers",
                    self.half_life, self.rho_half_life
                ),
            ));
        }
        if !(self.alpha > 0.0 && self.alpha <= 0.5) {
            return Err((
                "drift.alpha",
                format!("= {} is outside (0, 0.5]", self.alpha),
            ));
        }
        if let Some(r) = self.rho {
            if !(0.0..1.0).contains(&r) {
                return Err(("drift.rho", format!("= {r} is outside [0, 1)")));
            }
        }
        if !(self.min_samples.is_finite() && self.min_samples >= 1.0) {
            return Err((
                "drift.min_samples",
                format!("= {} must be at least 1", self.min_samples),
            ));
        }
        if !(self.min_effective_per_bin.is_finite() && self.min_effective_per_bin >= 0.0) {
            return Err((
                "drift.min_effective_per_bin",
                format!(
                    "= {} must be a non-negative number",
                    self.min_effective_per_bin
                ),
            ));
        }
        Ok(())
    }
}

/// Smallest accepted `capture.max_bytes` (bytes).
pub const MIN_CAPTURE_BYTES: u64 = 64 * 1024;

/// `[capture]`: the device owner's limits on data capture (docs/agent.md,
/// "Data capture"). Whether anything is captured is the server's
/// `ConfigUpdate.capture` (off by default).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct CaptureSection {
    /// Disk cap of `data_dir/capture` (bytes): closed batches waiting for
    /// upload plus the open batch are never more. Default 16 MiB; at least
    /// [`MIN_CAPTURE_BYTES`].
    pub max_bytes: u64,
    /// A batch is closed at this many samples (1..=10000). Default 50.
    pub batch_samples: u32,
    /// ... or when its first sample is this old (s, >= 1). Default 60.
    pub batch_age_s: u64,
    /// Upload chunk size (bytes, 256..=262144; smaller for thin links).
    /// Default 262144 (`MAX_CAPTURE_CHUNK_BYTES`).
    pub chunk_bytes: u32,
}

impl Default for CaptureSection {
    fn default() -> Self {
        CaptureSection {
            max_bytes: 16 * 1024 * 1024,
            batch_samples: 50,
            batch_age_s: 60,
            chunk_bytes: 256 * 1024,
        }
    }
}

/// Smallest accepted `storage.max_bytes` (bytes): room for the update state,
/// drift state and a few hundred telemetry records.
pub const MIN_STORAGE_BYTES: u64 = 1024 * 1024;

/// `[storage]`: how much disk the agent's store may use (docs/agent.md, "Storage").
#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct StorageConfig {
    /// Ceiling of `data_dir/store` in bytes (sled's files: telemetry outbox,
    /// drift state, update state, counters). The telemetry outbox gets a
    /// quarter of it as its budget of encoded records, and drops its oldest
    /// records (counted in `outbox_dropped`) beyond that or whenever the
    /// store's files pass five eighths of it; at startup the store is
    /// compacted when its files pass three quarters of it. Slots (model
    /// files) are not counted: the bundles fix their size.
    /// Default 8 MiB; at least [`MIN_STORAGE_BYTES`].
    #[serde(default = "default_storage_max_bytes")]
    pub max_bytes: u64,
}

fn default_storage_max_bytes() -> u64 {
    8 * 1024 * 1024
}

impl Default for StorageConfig {
    fn default() -> Self {
        StorageConfig {
            max_bytes: default_storage_max_bytes(),
        }
    }
}

impl Config {
    /// Reads and validates `path`.
    ///
    /// # Errors
    /// [`ConfigError`] naming the file and key.
    pub fn load(path: &Path) -> Result<Self, ConfigError> {
        let text = std::fs::read_to_string(path).map_err(|e| ConfigError::Read {
            path: path.into(),
            source: e,
        })?;
        Self::parse(&text, path)
    }

    /// Parses TOML text; `path` is used in messages and to resolve relative paths.
    ///
    /// # Errors
    /// [`ConfigError`] naming the file and key.
    pub fn parse(text: &str, path: &Path) -> Result<Self, ConfigError> {
        let mut c: Config = toml::from_str(text).map_err(|e| ConfigError::Parse {
            path: path.into(),
            reason: e.to_string(),
        })?;
        let invalid = |key: &str, reason: String| ConfigError::Invalid {
            path: path.into(),
            key: key.into(),
            reason,
        };
        c.broker.host_port().map_err(|r| invalid("broker.url", r))?;
        if !c.api.listen.ip().is_loopback() {
            return Err(invalid(
                "api.listen",
                format!("{} is not a loopback address", c.api.listen),
            ));
        }
        if c.api.workers == 0 || c.api.queue_len == 0 || c.api.max_batch == 0 {
            return Err(invalid(
                "api",
                "workers, queue_len and max_batch must be at least 1".into(),
            ));
        }
        if c.api.threads.is_some_and(|t| t == 0 || t > 1024) {
            return Err(invalid(
                "api.threads",
                format!("{} is impossible (1..=1024)", c.api.threads.unwrap_or(0)),
            ));
        }
        if c.trusted_keys.is_empty() {
            return Err(invalid(
                "trusted_keys",
                "at least one trusted key is required".into(),
            ));
        }
        if c.telemetry_interval_s == 0 {
            return Err(invalid("telemetry_interval_s", "must be at least 1".into()));
        }
        c.drift.check().map_err(|(k, r)| invalid(k, r))?;
        for (i, t) in c.inputs.iter().enumerate() {
            crate::inputs::check_config(t)
                .map_err(|e| invalid(&format!("inputs[{i}]"), e.to_string()))?;
        }
        if c.capture.max_bytes < MIN_CAPTURE_BYTES {
            return Err(invalid(
                "capture.max_bytes",
                format!(
                    "{} bytes is below the minimum of {MIN_CAPTURE_BYTES}",
                    c.capture.max_bytes
                ),
            ));
        }
        if !(1..=10_000).contains(&c.capture.batch_samples) || c.capture.batch_age_s == 0 {
            return Err(invalid(
                "capture.batch_samples",
                format!(
                    "batch_samples = {} must be in 1..=10000 and batch_age_s = {} at least 1",
                    c.capture.batch_samples, c.capture.batch_age_s
                ),
            ));
        }
        if !(256..=256 * 1024).contains(&c.capture.chunk_bytes) {
            return Err(invalid(
                "capture.chunk_bytes",
                format!("= {} is outside 256..=262144", c.capture.chunk_bytes),
            ));
        }
        if c.storage.max_bytes < MIN_STORAGE_BYTES {
            return Err(invalid(
                "storage.max_bytes",
                format!(
                    "{} bytes is below the minimum of {MIN_STORAGE_BYTES}",
                    c.storage.max_bytes
                ),
            ));
        }
        let base = path.parent().unwrap_or(Path::new("."));
        let rel = |p: &mut PathBuf| {
            if p.is_relative() {
                *p = base.join(&*p);
            }
        };
        rel(&mut c.data_dir);
        c.trusted_keys.iter_mut().for_each(rel);
        if let Some(p) = c.initial_bundle.as_mut() {
            rel(p);
        }
        if let Some(p) = c.target_profile.as_mut() {
            rel(p);
        }
        if let Some(p) = c.api.unix_socket.as_mut() {
            rel(p);
        }
        // Input tables are opaque to the config, except that a relative
        // `dir` (replay sources) is resolved like every other path.
        for t in &mut c.inputs {
            if let Some(toml::Value::String(d)) = t.get_mut("dir") {
                let mut p = PathBuf::from(&*d);
                rel(&mut p);
                *d = p.display().to_string();
            }
        }
        Ok(c)
    }

    /// Loads every trusted key file into one trust store.
    ///
    /// # Errors
    /// The bundle crate's error naming the key file.
    pub fn trust_store(&self) -> Result<TrustStore, edgefleet_bundle::Error> {
        let mut t = TrustStore::new();
        for p in &self.trusted_keys {
            t.merge(TrustStore::load(p)?);
        }
        Ok(t)
    }

    /// Threads per inference: `api.threads`, else the target profile's `cores`,
    /// else 1.
    ///
    /// # Errors
    /// The target profile does not load (its error).
    pub fn compute_threads(&self) -> Result<usize, String> {
        if let Some(t) = self.api.threads {
            return Ok(t);
        }
        if let Some(p) = &self.target_profile {
            let t = edgefleet_targets::load(p).map_err(|e| e.to_string())?;
            return Ok(t.cores as usize);
        }
        Ok(1)
    }

    /// The trial latency budget (ms): the config's, else the target profile's, else 100.
    ///
    /// # Errors
    /// The target profile's load error as text.
    pub fn latency_budget_ms(&self) -> Result<f64, String> {
        if let Some(b) = self.latency_budget_ms {
            return Ok(b);
        }
        if let Some(p) = &self.target_profile {
            let t = edgefleet_targets::load(p).map_err(|e| e.to_string())?;
            return Ok(f64::from(t.latency_budget_ms));
        }
        Ok(100.0)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const GOOD: &str = r#"
device_id = "dev-1"
data_dir = "data"
target = "x86-avx2-gateway"
trusted_keys = ["keys/release.pub.pem"]
tags = ["line-3"]
[broker]
url = "mqtt://127.0.0.1:1883"
[api]
listen = "127.0.0.1:0"
[[inputs]]
kind = "replay"
dir = "replay"
"#;

    #[test]
    fn parses_and_resolves_relative_paths() {
        let c = Config::parse(GOOD, Path::new("/etc/edgefleet/agent.toml")).expect("parses");
        assert_eq!(c.data_dir, PathBuf::from("/etc/edgefleet/data"));
        assert_eq!(
            c.trusted_keys[0],
            PathBuf::from("/etc/edgefleet/keys/release.pub.pem")
        );
        assert_eq!(
            c.broker.host_port().expect("url"),
            ("127.0.0.1".to_string(), 1883)
        );
        assert_eq!(c.inputs.len(), 1);
        assert_eq!(c.api.workers, 2);
        assert_eq!(c.inputs[0]["dir"].as_str(), Some("/etc/edgefleet/replay"));
    }

    /// An `[[inputs]]` table is checked when the config loads, not when its
    /// source opens: a misspelt transform, a bad value and an unknown kind
    /// are each refused naming the table and the key.
    #[test]
    fn input_tables_are_checked_at_load() {
        for (extra, want) in [
            ("gian = 1.5\n", "`gian`"),
            ("rate_hz = \"fast\"\n", "rate_hz"),
        ] {
            let e = Config::parse(&format!("{GOOD}{extra}"), Path::new("/x/agent.toml"))
                .expect_err(extra);
            let s = e.to_string();
            assert!(s.contains("inputs[0]") && s.contains(want), "{extra}: {s}");
        }
        let text = GOOD.replace(
            "kind = \"replay\"\ndir = \"replay\"",
            "kind = \"i2c_accel\"\nbus = \"/dev/i2c-1\"\nwindw = 8",
        );
        let s = Config::parse(&text, Path::new("a.toml"))
            .expect_err("i2c key")
            .to_string();
        assert!(s.contains("i2c_accel") && s.contains("`windw`"), "{s}");
        let text = GOOD.replace("kind = \"replay\"", "kind = \"camera\"");
        let s = Config::parse(&text, Path::new("a.toml"))
            .expect_err("kind")
            .to_string();
        assert!(s.contains("`camera`"), "{s}");
    }

    #[test]
    fn unknown_key_is_named_with_the_file() {
        let e = Config::parse(&format!("bogus = 1\n{GOOD}"), Path::new("/x/agent.toml"))
            .expect_err("unknown key");
        let s = e.to_string();
        assert!(s.contains("/x/agent.toml") && s.contains("bogus"), "{s}");
    }

    #[test]
    fn drift_and_capture_sections() {
        let c = Config::parse(GOOD, Path::new("a.toml")).expect("parses");
        assert_eq!(c.drift, DriftSection::default());
        assert_eq!(c.capture, CaptureSection::default());
        let text = format!(
            "{GOOD}[drift]\nalpha = 0.001\ncorrection = \"benjamini_hochberg\"\nrho = 0.5\n[capture]\nmax_bytes = 1048576\nchunk_bytes = 1024\n"
        );
        let c = Config::parse(&text, Path::new("a.toml")).expect("parses");
        let t = c.drift.test();
        assert_eq!(t.alpha, 0.001);
        assert_eq!(t.correction, Correction::BenjaminiHochberg);
        assert_eq!(t.autocorrelation, Autocorrelation::Fixed(0.5));
        assert_eq!(
            (c.capture.max_bytes, c.capture.chunk_bytes),
            (1_048_576, 1024)
        );
        for (extra, key) in [
            ("[drift]\nalpha = 0.9\n", "drift.alpha"),
            ("[drift]\nrho = 1.0\n", "drift.rho"),
            ("[drift]\ncheck_every = 0\n", "drift.check_every"),
            ("[drift]\npsi_alarm = 0.2\n", "psi_alarm"),
            ("[capture]\nmax_bytes = 10\n", "capture.max_bytes"),
            ("[capture]\nchunk_bytes = 1\n", "capture.chunk_bytes"),
            ("[capture]\nmode = \"on_alarm\"\n", "mode"),
        ] {
            let e = Config::parse(&format!("{GOOD}{extra}"), Path::new("a.toml")).expect_err(extra);
            assert!(e.to_string().contains(key), "{extra}: {e}");
        }
    }

    #[test]
    fn bad_values_name_the_key() {
        let e = Config::parse(
            &GOOD.replace("mqtt://127.0.0.1:1883", "http://h:1"),
            Path::new("a.toml"),
        )
        .expect_err("bad url");
        assert!(e.to_string().contains("broker.url"), "{e}");
        let e = Config::parse(
            &GOOD.replace("127.0.0.1:0", "0.0.0.0:8080"),
            Path::new("a.toml"),
        )
        .expect_err("not loopback");
        assert!(e.to_string().contains("api.listen"), "{e}");
        let e = Config::parse(&GOOD.replace("dev-1", "dev/1"), Path::new("a.toml"))
            .expect_err("bad id");
        assert!(e.to_string().contains("device_id"), "{e}");
    }

    /// Threads per inference: the explicit `api.threads`, else the target
    /// profile's `cores` (the builtin 4-core x86 gateway here), else 1; 0 and
    /// absurd counts are refused naming the key.
    #[test]
    fn compute_threads_follow_config_then_profile() {
        let c = Config::parse(GOOD, Path::new("a.toml")).expect("parses");
        assert_eq!(c.compute_threads(), Ok(1));
        let profile = edgefleet_targets::builtin_dir().join("x86-avx2-gateway.toml");
        let cores = edgefleet_targets::load(&profile).expect("profile").cores as usize;
        assert!(cores > 1, "the test needs a multi-core profile");
        let with_profile = GOOD.replace(
            "tags = [",
            &format!(
                "target_profile = {:?}\ntags = [",
                profile.display().to_string()
            ),
        );
        let c = Config::parse(&with_profile, Path::new("a.toml")).expect("parses");
        assert_eq!(c.compute_threads(), Ok(cores));
        let c = Config::parse(
            &with_profile.replace("[api]\n", "[api]\nthreads = 3\n"),
            Path::new("a.toml"),
        )
        .expect("parses");
        assert_eq!(c.compute_threads(), Ok(3));
        for bad in ["0", "5000"] {
            let e = Config::parse(
                &GOOD.replace("[api]\n", &format!("[api]\nthreads = {bad}\n")),
                Path::new("a.toml"),
            )
            .expect_err(bad);
            assert!(e.to_string().contains("api.threads"), "{bad}: {e}");
        }
    }
}
