//! ADXL345 3-axis accelerometer over embedded-hal 1.0 I2C, sampled at a rate
//! into fixed windows `[1, 3, N]` of f32 in g (channel-major: x samples, then
//! y, then z).
//!
//! Register map (Analog Devices ADXL345 data sheet, rev. G):
//! `DEVID` 0x00 = 0xE5; `BW_RATE` 0x2C (low 4 bits: output data rate code);
//! `POWER_CTL` 0x2D (bit 3 `Measure`); `DATA_FORMAT` 0x31 (bit 3 `FULL_RES`,
//! bits 1:0 range ±2/4/8/16 g); `DATAX0..DATAZ1` 0x32..0x37, three
//! little-endian two's-complement i16; full resolution is 3.9 mg/LSB (the data
//! sheet's typical 256 LSB/g) at every range.
//!
//! Errors never panic: a failed transfer is retried with exponential backoff
//! (`retry_initial`, doubling, `max_retries` times), re-initialising the
//! device (it may have been power-cycled); then [`InputError::Exhausted`] is
//! returned and the next call starts over. A wrong `DEVID` is reported as
//! [`InputError::WrongDevice`] (also retried: a loose connector can read garbage).
//!
//! Every window is checked before it leaves ([`implausible`]): a value
//! beyond the configured range (garbage on the bus: full resolution never
//! reports more than the range) or a window in which no axis moves by a
//! single LSB (a frozen sensor or a bus that returns the same bytes: real
//! sensor noise is about 1 LSB RMS, data sheet "noise") is refused as
//! [`InputError::Implausible`] instead of reaching the model.

use std::time::Duration;

use edgefleet_bundle::payload::Tensor;
use embedded_hal::i2c::{Error as _, I2c};

use super::{InputError, InputSource, Pacer};

/// `DEVID` register.
pub const REG_DEVID: u8 = 0x00;
/// Expected `DEVID` value.
pub const DEVID_ADXL345: u8 = 0xE5;
/// `BW_RATE` register.
pub const REG_BW_RATE: u8 = 0x2C;
/// `POWER_CTL` register.
pub const REG_POWER_CTL: u8 = 0x2D;
/// `DATA_FORMAT` register.
pub const REG_DATA_FORMAT: u8 = 0x31;
/// `DATAX0`, first of the six data registers.
pub const REG_DATAX0: u8 = 0x32;
/// `POWER_CTL` `Measure` bit.
pub const POWER_CTL_MEASURE: u8 = 0x08;
/// `DATA_FORMAT` `FULL_RES` bit.
pub const DATA_FORMAT_FULL_RES: u8 = 0x08;
/// Scale in full-resolution mode (g per LSB).
pub const G_PER_LSB: f32 = 0.0039;
/// Default 7-bit address (ALT ADDRESS pin low); 0x1D with it high.
pub const DEFAULT_ADDRESS: u8 = 0x53;
/// Windows at least this long are refused when no axis moves (shorter
/// ones can be still by chance).
pub const FROZEN_MIN_SAMPLES: usize = 16;

/// Why a channel-major window `[3 * n]` (g) cannot come from a working
/// ADXL345 at `range_g`, or `None`: a value beyond the range (with one LSB
/// of slack), or, for `n >= FROZEN_MIN_SAMPLES`, all three axes constant.
pub fn implausible(data: &[f32], n: usize, range_g: u8) -> Option<String> {
    let limit = f32::from(range_g) + G_PER_LSB;
    for (axis, ch) in ["x", "y", "z"].iter().zip(data.chunks(n.max(1))) {
        if let Some((i, v)) = ch.iter().enumerate().find(|(_, v)| v.abs() > limit) {
            return Some(format!(
                "{axis} sample {i} reads {v} g, outside the ±{range_g} g range"
            ));
        }
    }
    let still = |ch: &[f32]| ch.iter().all(|v| *v == ch[0]);
    if n >= FROZEN_MIN_SAMPLES && data.chunks(n).all(still) {
        return Some(format!(
            "no axis moved in {n} samples (x {} g, y {} g, z {} g): a frozen sensor or a stuck bus",
            data[0],
            data[n],
            data[2 * n]
        ));
    }
    None
}

/// Settings of the accelerometer source.
#[derive(Debug, Clone, PartialEq)]
pub struct AccelConfig {
    /// 7-bit I2C address.
    pub address: u8,
    /// Sample rate (Hz); the device's output data rate is set to the lowest
    /// rate >= this (6.25 .. 3200 Hz). 0 samples as fast as the bus allows.
    pub rate_hz: f64,
    /// Samples per window (N of `[1, 3, N]`, >= 1).
    pub window: usize,
    /// Measurement range in g: 2, 4, 8 or 16.
    pub range_g: u8,
    /// Name of the produced tensor (the model input).
    pub tensor: String,
    /// Retries of a failed transfer before giving up.
    pub max_retries: u32,
    /// First retry delay (doubles each retry).
    pub retry_initial: Duration,
}

impl Default for AccelConfig {
    /// Address 0x53, 100 Hz, 128-sample windows, ±4 g, tensor `input`, 5 retries from 10 ms.
    fn default() -> Self {
        AccelConfig {
            address: DEFAULT_ADDRESS,
            rate_hz: 100.0,
            window: 128,
            range_g: 4,
            tensor: "input".into(),
            max_retries: 5,
            retry_initial: Duration::from_millis(10),
        }
    }
}

/// `BW_RATE` rate code for the lowest output data rate >= `hz` (0x06 = 6.25 Hz .. 0x0F = 3200 Hz).
pub fn rate_code(hz: f64) -> u8 {
    let mut code = 0x06u8;
    let mut rate = 6.25f64;
    while rate < hz && code < 0x0F {
        code += 1;
        rate *= 2.0;
    }
    code
}

/// `DATA_FORMAT` range bits for `g` (2 -> 0, 4 -> 1, 8 -> 2, anything else -> 3 = 16 g).
pub fn range_bits(g: u8) -> u8 {
    match g {
        0..=2 => 0,
        3..=4 => 1,
        5..=8 => 2,
        _ => 3,
    }
}

/// Decodes the six data bytes into (x, y, z) in g.
pub fn decode_xyz(b: &[u8; 6]) -> [f32; 3] {
    let axis = |i: usize| f32::from(i16::from_le_bytes([b[i], b[i + 1]])) * G_PER_LSB;
    [axis(0), axis(2), axis(4)]
}

/// The accelerometer source over any embedded-hal 1.0 I2C bus.
#[derive(Debug)]
pub struct Adxl345<I> {
    i2c: I,
    cfg: AccelConfig,
    ready: bool,
    pacer: Pacer,
    sleep: fn(Duration),
}

impl<I: I2c> Adxl345<I> {
    /// A source on `i2c`; the device is initialised on the first window.
    pub fn new(i2c: I, cfg: AccelConfig) -> Self {
        let pacer = Pacer::new(Some(cfg.rate_hz));
        Adxl345 {
            i2c,
            cfg: AccelConfig {
                window: cfg.window.max(1),
                ..cfg
            },
            ready: false,
            pacer,
            sleep: std::thread::sleep,
        }
    }

    /// Replaces the function used for retry backoff sleeps (tests: a no-op).
    pub fn with_sleep(mut self, sleep: fn(Duration)) -> Self {
        self.sleep = sleep;
        self
    }

    /// Disables rate pacing (tests, or a caller that paces itself).
    pub fn unpaced(mut self) -> Self {
        self.pacer = Pacer::new(None);
        self
    }

    /// Gives the bus back.
    pub fn release(self) -> I {
        self.i2c
    }

    fn err(&self, op: &'static str, register: u8, e: &I::Error) -> InputError {
        InputError::I2c {
            addr: self.cfg.address,
            op,
            register,
            detail: format!("{:?}", e.kind()),
        }
    }

    fn write_reg(&mut self, reg: u8, v: u8) -> Result<(), InputError> {
        self.i2c
            .write(self.cfg.address, &[reg, v])
            .map_err(|e| self.err("write", reg, &e))
    }

    fn read_regs(&mut self, reg: u8, buf: &mut [u8]) -> Result<(), InputError> {
        self.i2c
            .write_read(self.cfg.address, &[reg], buf)
            .map_err(|e| self.err("read", reg, &e))
    }

    /// Checks `DEVID` and configures rate, format and measurement mode.
    ///
    /// # Errors
    /// [`InputError::I2c`], [`InputError::WrongDevice`] (no retry here).
    pub fn init(&mut self) -> Result<(), InputError> {
        let mut id = [0u8];
        self.read_regs(REG_DEVID, &mut id)?;
        if id[0] != DEVID_ADXL345 {
            return Err(InputError::WrongDevice {
                addr: self.cfg.address,
                found: id[0],
                expected: DEVID_ADXL345,
            });
        }
        self.write_reg(REG_BW_RATE, rate_code(self.cfg.rate_hz))?;
        self.write_reg(
            REG_DATA_FORMAT,
            DATA_FORMAT_FULL_RES | range_bits(self.cfg.range_g),
        )?;
        self.write_reg(REG_POWER_CTL, POWER_CTL_MEASURE)?;
        self.ready = true;
        Ok(())
    }

    /// Reads one (x, y, z) sample in g (no retry).
    ///
    /// # Errors
    /// [`InputError::I2c`].
    pub fn read_sample(&mut self) -> Result<[f32; 3], InputError> {
        let mut b = [0u8; 6];
        self.read_regs(REG_DATAX0, &mut b)?;
        Ok(decode_xyz(&b))
    }

    /// One sample with initialisation and retries.
    fn sample_with_retry(&mut self) -> Result<[f32; 3], InputError> {
        let mut delay = self.cfg.retry_initial;
        let mut attempt = 0u32;
        loop {
            let r = if self.ready {
                self.read_sample()
            } else {
                self.init().and_then(|()| self.read_sample())
            };
            match r {
                Ok(s) => return Ok(s),
                Err(e) => {
                    self.ready = false;
                    attempt += 1;
                    if attempt > self.cfg.max_retries {
                        return Err(InputError::Exhausted {
                            addr: self.cfg.address,
                            attempts: attempt,
                            last: Box::new(e),
                        });
                    }
                    tracing::debug!(error = %e, attempt, "accelerometer read failed; retrying");
                    (self.sleep)(delay);
                    delay = delay.saturating_mul(2);
                }
            }
        }
    }
}

impl<I: I2c + Send> InputSource for Adxl345<I> {
    fn next_window(&mut self) -> Result<Vec<Tensor>, InputError> {
        let n = self.cfg.window;
        let mut data = vec![0f32; 3 * n];
        for i in 0..n {
            self.pacer.wait();
            let [x, y, z] = self.sample_with_retry()?;
            data[i] = x;
            data[n + i] = y;
            data[2 * n + i] = z;
        }
        if let Some(reason) = implausible(&data, n, self.cfg.range_g) {
            return Err(InputError::Implausible {
                addr: self.cfg.address,
                reason,
            });
        }
        Ok(vec![Tensor::f32(
            self.cfg.tensor.clone(),
            vec![1, 3, n],
            data,
        )])
    }
}

/// Keys a `kind = "i2c_accel"` table may hold (`name` is the pipeline's).
pub const I2C_ACCEL_KEYS: [&str; 8] = [
    "kind", "name", "bus", "address", "rate_hz", "window", "range_g", "tensor",
];

/// Reads the `i2c_accel` fields of an `[[inputs]]` table into an [`AccelConfig`] and the bus path.
///
/// # Errors
/// [`InputError::Config`], also for a key outside [`I2C_ACCEL_KEYS`].
pub fn config_from_toml(v: &toml::Value) -> Result<(String, AccelConfig), InputError> {
    super::refuse_unknown_keys(v, "i2c_accel", &I2C_ACCEL_KEYS)?;
    let d = AccelConfig::default();
    let bus = v
        .get("bus")
        .and_then(toml::Value::as_str)
        .unwrap_or("/dev/i2c-1")
        .to_string();
    let address = super::get_u64(v, "address")?.map_or(Ok(d.address), |a| {
        u8::try_from(a)
            .ok()
            .filter(|a| *a < 0x80)
            .ok_or_else(|| InputError::Config(format!("`address` {a} is not a 7-bit I2C address")))
    })?;
    let range_g = super::get_u64(v, "range_g")?.unwrap_or(u64::from(d.range_g));
    if ![2, 4, 8, 16].contains(&range_g) {
        return Err(InputError::Config(format!(
            "`range_g` must be 2, 4, 8 or 16, got {range_g}"
        )));
    }
    let window = super::get_u64(v, "window")?.unwrap_or(d.window as u64);
    if window == 0 || window > 1 << 20 {
        return Err(InputError::Config(format!(
            "`window` must be 1..=1048576, got {window}"
        )));
    }
    let rate_hz = super::get_f64(v, "rate_hz")?.unwrap_or(d.rate_hz);
    if !(rate_hz.is_finite() && rate_hz >= 0.0) {
        return Err(InputError::Config(format!(
            "`rate_hz` must be >= 0, got {rate_hz}"
        )));
    }
    let tensor = v
        .get("tensor")
        .and_then(toml::Value::as_str)
        .unwrap_or("input")
        .to_string();
    Ok((
        bus,
        AccelConfig {
            address,
            rate_hz,
            window: window as usize,
            range_g: range_g as u8,
            tensor,
            ..d
        },
    ))
}

/// Opens the accelerometer on a Linux I2C bus (`/dev/i2c-N`).
///
/// # Errors
/// [`InputError::Io`] naming the bus device.
#[cfg(feature = "linux-i2c")]
pub fn open_linux(
    bus: &str,
    cfg: AccelConfig,
) -> Result<Adxl345<linux_embedded_hal::I2cdev>, InputError> {
    let dev = linux_embedded_hal::I2cdev::new(bus).map_err(|e| InputError::Io {
        path: bus.to_string(),
        source: std::io::Error::other(e.to_string()),
    })?;
    Ok(Adxl345::new(dev, cfg))
}

pub(crate) fn from_config(v: &toml::Value) -> Result<Box<dyn InputSource>, InputError> {
    let (bus, cfg) = config_from_toml(v)?;
    #[cfg(feature = "linux-i2c")]
    {
        Ok(Box::new(open_linux(&bus, cfg)?))
    }
    #[cfg(not(feature = "linux-i2c"))]
    {
        let _ = cfg;
        Err(InputError::Config(format!(
            "input kind `i2c_accel` on {bus}: this agent was built without the `linux-i2c` feature"
        )))
    }
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;
    use embedded_hal::i2c::{ErrorKind, NoAcknowledgeSource};
    use embedded_hal_mock::eh1::i2c::{Mock, Transaction as T};

    const A: u8 = DEFAULT_ADDRESS;

    fn init_tx(rate: u8, format: u8) -> Vec<T> {
        vec![
            T::write_read(A, vec![REG_DEVID], vec![DEVID_ADXL345]),
            T::write(A, vec![REG_BW_RATE, rate]),
            T::write(A, vec![REG_DATA_FORMAT, format]),
            T::write(A, vec![REG_POWER_CTL, POWER_CTL_MEASURE]),
        ]
    }

    fn data_tx(x: i16, y: i16, z: i16) -> T {
        let mut b = Vec::new();
        for v in [x, y, z] {
            b.extend(v.to_le_bytes());
        }
        T::write_read(A, vec![REG_DATAX0], b)
    }

    fn cfg(window: usize) -> AccelConfig {
        AccelConfig {
            window,
            rate_hz: 100.0,
            range_g: 4,
            ..AccelConfig::default()
        }
    }

    fn no_sleep(_: Duration) {}

    #[test]
    fn window_of_three_axes_in_g() {
        let mut tx = init_tx(0x0A, DATA_FORMAT_FULL_RES | 1);
        tx.push(data_tx(256, -256, 0));
        tx.push(data_tx(0, 512, -1));
        let mock = Mock::new(&tx);
        let mut s = Adxl345::new(mock, cfg(2)).unpaced();
        let w = s.next_window().unwrap();
        assert_eq!(w[0].shape, vec![1, 3, 2]);
        let edgefleet_bundle::payload::TensorData::F32(d) = &w[0].data else {
            panic!()
        };
        let want = [
            256.0 * G_PER_LSB,
            0.0,
            -256.0 * G_PER_LSB,
            512.0 * G_PER_LSB,
            0.0,
            -G_PER_LSB,
        ];
        assert_eq!(d.as_slice(), &want);
        s.release().done();
    }

    #[test]
    fn nack_is_retried_with_reinit() {
        let nack = ErrorKind::NoAcknowledge(NoAcknowledgeSource::Address);
        let mut tx = vec![T::write_read(A, vec![REG_DEVID], vec![0]).with_error(nack)];
        tx.extend(init_tx(0x0A, DATA_FORMAT_FULL_RES | 1));
        tx.push(data_tx(1, 2, 3).with_error(nack));
        tx.extend(init_tx(0x0A, DATA_FORMAT_FULL_RES | 1));
        tx.push(data_tx(1, 2, 3));
        let mut s = Adxl345::new(Mock::new(&tx), cfg(1))
            .unpaced()
            .with_sleep(no_sleep);
        let w = s.next_window().unwrap();
        assert_eq!(w[0].data_len(), 3);
        s.release().done();
    }

    #[test]
    fn wrong_device_id_gives_clear_error_after_retries() {
        let tx: Vec<T> = (0..3)
            .map(|_| T::write_read(A, vec![REG_DEVID], vec![0x42]))
            .collect();
        let c = AccelConfig {
            max_retries: 2,
            ..cfg(4)
        };
        let mut s = Adxl345::new(Mock::new(&tx), c)
            .unpaced()
            .with_sleep(no_sleep);
        let e = s.next_window().unwrap_err();
        let msg = e.to_string();
        assert!(msg.contains("giving up after 3 attempts"), "{msg}");
        let InputError::Exhausted { last, .. } = e else {
            panic!()
        };
        assert!(matches!(
            *last,
            InputError::WrongDevice {
                found: 0x42,
                expected: 0xE5,
                addr: 0x53
            }
        ));
        assert!(last.to_string().contains("DEVID register 0x00 reads 0x42"));
        s.release().done();
    }

    #[test]
    fn persistent_nack_names_register() {
        let nack = ErrorKind::NoAcknowledge(NoAcknowledgeSource::Data);
        let tx: Vec<T> = (0..2)
            .map(|_| T::write_read(A, vec![REG_DEVID], vec![0]).with_error(nack))
            .collect();
        let c = AccelConfig {
            max_retries: 1,
            ..cfg(1)
        };
        let mut s = Adxl345::new(Mock::new(&tx), c)
            .unpaced()
            .with_sleep(no_sleep);
        let msg = s.next_window().unwrap_err().to_string();
        assert!(
            msg.contains("0x53") && msg.contains("register 0x00") && msg.contains("NoAcknowledge"),
            "{msg}"
        );
        s.release().done();
    }

    #[test]
    fn rate_codes_and_config() {
        assert_eq!(rate_code(100.0), 0x0A);
        assert_eq!(rate_code(101.0), 0x0B);
        assert_eq!(rate_code(1.0), 0x06);
        assert_eq!(rate_code(10_000.0), 0x0F);
        assert_eq!(range_bits(16), 3);
        let v: toml::Value = toml::from_str(
            "kind='i2c_accel'\nbus='/dev/i2c-7'\naddress=0x1d\nwindow=64\nrange_g=8\nrate_hz=200",
        )
        .unwrap();
        let (bus, c) = config_from_toml(&v).unwrap();
        assert_eq!(
            (bus.as_str(), c.address, c.window, c.range_g, c.rate_hz),
            ("/dev/i2c-7", 0x1d, 64, 8, 200.0)
        );
        let v: toml::Value = toml::from_str("kind='i2c_accel'\nrange_g=3").unwrap();
        assert!(config_from_toml(&v).is_err());
    }
}
