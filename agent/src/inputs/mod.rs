//! Input sources that feed the runtime with model input windows.
//!
//! A source is blocking and paces itself to its configured rate: run it on a
//! dedicated thread (`tokio::task::spawn_blocking`) and send each window to
//! the runtime. Kinds, selected by `kind` in an `[[inputs]]` table of the
//! agent config (see [`from_config`]):
//!
//! - `i2c_accel`: an ADXL345 3-axis accelerometer over I2C ([`i2c_accel`]),
//!   windows `[1, 3, N]` f32 in g; needs the `linux-i2c` feature for a real bus;
//! - `replay`: tensors replayed from files ([`replay`]), with optional
//!   transforms for drift experiments.

pub mod i2c_accel;
pub mod replay;

use edgefleet_bundle::payload::Tensor;

/// Errors of input sources, naming the device register or file at fault.
#[derive(Debug, thiserror::Error)]
pub enum InputError {
    /// An I2C transfer failed (NACK, bus error, ...).
    #[error("i2c device 0x{addr:02x}: {op} register 0x{register:02x}: {detail}")]
    I2c {
        /// 7-bit device address.
        addr: u8,
        /// `read` or `write`.
        op: &'static str,
        /// Register address.
        register: u8,
        /// The bus error, as text (`embedded_hal::i2c::ErrorKind`).
        detail: String,
    },
    /// The device id register holds an unexpected value.
    #[error("i2c device 0x{addr:02x}: DEVID register 0x00 reads 0x{found:02x}, expected 0x{expected:02x} (not an ADXL345?)")]
    WrongDevice {
        /// 7-bit device address.
        addr: u8,
        /// Value read.
        found: u8,
        /// Value expected.
        expected: u8,
    },
    /// A transfer still failed after all retries.
    #[error("i2c device 0x{addr:02x}: giving up after {attempts} attempts: {last}")]
    Exhausted {
        /// 7-bit device address.
        addr: u8,
        /// Attempts made.
        attempts: u32,
        /// The last error.
        #[source]
        last: Box<InputError>,
    },
    /// A window holds values the sensor cannot measure: a frozen sensor, a
    /// stuck bus or garbage on the wires. The window is dropped, never fed to
    /// the model; the source stays usable.
    #[error("i2c device 0x{addr:02x}: implausible window: {reason}")]
    Implausible {
        /// 7-bit device address.
        addr: u8,
        /// What is implausible (axis, sample, value).
        reason: String,
    },
    /// A file could not be read.
    #[error("input file {path}: {source}")]
    Io {
        /// The file or directory.
        path: String,
        /// The I/O error.
        #[source]
        source: std::io::Error,
    },
    /// A file's content or name is not in the expected format.
    #[error("input file {path}: {reason}")]
    Format {
        /// The file.
        path: String,
        /// What is wrong.
        reason: String,
    },
    /// The `[[inputs]]` table is invalid.
    #[error("input config: {0}")]
    Config(String),
}

/// A producer of model input windows.
pub trait InputSource: Send {
    /// Blocks until the next window is due (per the source's rate) and returns
    /// it: one tensor per model input, in the order the source was configured.
    ///
    /// # Errors
    /// [`InputError`]; a source stays usable after an error (call again).
    fn next_window(&mut self) -> Result<Vec<Tensor>, InputError>;
}

impl<T: InputSource + ?Sized> InputSource for Box<T> {
    fn next_window(&mut self) -> Result<Vec<Tensor>, InputError> {
        (**self).next_window()
    }
}

/// Builds a source from one `[[inputs]]` table:
///
/// ```toml
/// [[inputs]]
/// kind = "i2c_accel"     # needs the `linux-i2c` feature
/// bus = "/dev/i2c-1"
/// address = 0x53         # optional, default 0x53 (ALT pin low); 0x1d with ALT high
/// rate_hz = 100.0        # sample rate; the ADXL345 output rate is the next one >= this
/// window = 128           # samples per window: tensor [1, 3, window]
/// range_g = 4            # 2, 4, 8 or 16 (full resolution: 3.9 mg/LSB at any range)
/// tensor = "input"       # model input name
///
/// [[inputs]]
/// kind = "replay"
/// dir = "/var/lib/edgefleet/replay"
/// inputs = ["input"]     # model input names; with several, files are <case>.<input>.npy|f32
/// rate_hz = 10.0         # windows per second (0 or absent: as fast as asked)
/// shape = [1, 3, 224, 224]   # for .f32 files without a sidecar .json
/// noise_std = 0.1        # transforms, all optional
/// gain = 1.2
/// offset = 0.1
/// rotate90 = 1           # quarter turns of [N, C, H, W] images
/// seed = 42
/// ```
///
/// # Errors
/// [`InputError::Config`] for an unknown kind or a bad field; the source's own errors.
pub fn from_config(v: &toml::Value) -> Result<Box<dyn InputSource>, InputError> {
    let kind = v
        .get("kind")
        .and_then(toml::Value::as_str)
        .ok_or_else(|| InputError::Config("missing string field `kind`".into()))?;
    match kind {
        "i2c_accel" => i2c_accel::from_config(v),
        "replay" => Ok(Box::new(replay::Replay::open(
            &replay::ReplayConfig::from_toml(v)?,
        )?)),
        other => Err(InputError::Config(format!(
            "unknown input kind `{other}` (expected `i2c_accel` or `replay`)"
        ))),
    }
}

/// Checks an `[[inputs]]` table without opening its source (no file or bus
/// is touched): the kind is known and every key and value is one its source
/// accepts. The agent's config loader runs it, so a misspelt key stops the
/// agent at start instead of when the source opens.
///
/// # Errors
/// [`InputError::Config`] naming the kind and the key at fault.
pub fn check_config(v: &toml::Value) -> Result<(), InputError> {
    let kind = v
        .get("kind")
        .and_then(toml::Value::as_str)
        .ok_or_else(|| InputError::Config("missing string field `kind`".into()))?;
    match kind {
        "i2c_accel" => i2c_accel::config_from_toml(v).map(drop),
        "replay" => replay::ReplayConfig::from_toml(v).map(drop),
        other => Err(InputError::Config(format!(
            "unknown input kind `{other}` (expected `i2c_accel` or `replay`)"
        ))),
    }
}

/// Refuses a key of the `kind` table `v` that is not in `keys`, naming it.
pub(crate) fn refuse_unknown_keys(
    v: &toml::Value,
    kind: &str,
    keys: &[&str],
) -> Result<(), InputError> {
    let unknown = v
        .as_table()
        .and_then(|t| t.keys().find(|k| !keys.contains(&k.as_str())));
    match unknown {
        Some(k) => Err(InputError::Config(format!(
            "{kind}: unknown key `{k}` (expected one of {})",
            keys.join(", ")
        ))),
        None => Ok(()),
    }
}

/// Reads an optional float field (integers accepted).
pub(crate) fn get_f64(v: &toml::Value, key: &str) -> Result<Option<f64>, InputError> {
    match v.get(key) {
        None => Ok(None),
        Some(toml::Value::Float(f)) => Ok(Some(*f)),
        Some(toml::Value::Integer(i)) => Ok(Some(*i as f64)),
        Some(other) => Err(InputError::Config(format!(
            "`{key}` must be a number, got {other}"
        ))),
    }
}

/// Reads an optional non-negative integer field.
pub(crate) fn get_u64(v: &toml::Value, key: &str) -> Result<Option<u64>, InputError> {
    match v.get(key) {
        None => Ok(None),
        Some(toml::Value::Integer(i)) if *i >= 0 => Ok(Some(*i as u64)),
        Some(other) => Err(InputError::Config(format!(
            "`{key}` must be a non-negative integer, got {other}"
        ))),
    }
}

/// Paces a loop to `rate_hz` (no pacing for rate 0 or none).
#[derive(Debug)]
pub(crate) struct Pacer {
    period: Option<std::time::Duration>,
    next: Option<std::time::Instant>,
}

impl Pacer {
    pub(crate) fn new(rate_hz: Option<f64>) -> Self {
        let period = rate_hz
            .filter(|r| r.is_finite() && *r > 0.0)
            .map(|r| std::time::Duration::from_secs_f64(1.0 / r));
        Pacer { period, next: None }
    }
    /// Sleeps until the next tick. If the caller fell behind by more than a
    /// period, the schedule restarts from now (no burst to catch up).
    pub(crate) fn wait(&mut self) {
        let Some(p) = self.period else { return };
        let now = std::time::Instant::now();
        let due = self.next.unwrap_or(now);
        if due > now {
            std::thread::sleep(due - now);
            self.next = Some(due + p);
        } else {
            self.next = Some(if now - due > p { now + p } else { due + p });
        }
    }
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;

    #[test]
    fn unknown_kind_and_missing_kind_are_config_errors() {
        let v: toml::Value = toml::from_str("kind = \"camera\"").unwrap();
        assert!(matches!(from_config(&v), Err(InputError::Config(m)) if m.contains("camera")));
        let v: toml::Value = toml::from_str("dir = \"x\"").unwrap();
        assert!(matches!(from_config(&v), Err(InputError::Config(m)) if m.contains("kind")));
    }

    #[test]
    fn pacer_keeps_rate() {
        let mut p = Pacer::new(Some(200.0));
        let t = std::time::Instant::now();
        for _ in 0..21 {
            p.wait();
        }
        let e = t.elapsed().as_secs_f64();
        assert!((0.09..0.5).contains(&e), "{e}");
    }
}
