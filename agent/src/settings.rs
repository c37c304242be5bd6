//! Runtime settings the fleet server may change with `Down::Config`
//! (docs/specs/mqtt.md, `edgefleet_protocol::messages::ConfigUpdate`):
//! the telemetry interval, the drift report interval, the drift test
//! settings and the data-capture policy. They start from agent.toml (capture:
//! off); a server update is validated, persisted in the store (key
//! [`STORE_KEY`], so it survives restarts and power cuts) and published on a
//! `tokio::sync::watch` channel that the telemetry loop, the drift thread and
//! data capture follow without a restart.

use std::time::Duration;

use edgefleet_drift::TestConfig;
use edgefleet_protocol::capture::CapturePolicy;
use edgefleet_protocol::messages::ConfigUpdate;

use crate::config::Config;
use crate::store::{Store, StoreError};

/// Store key of the server's accumulated overrides (JSON [`ConfigUpdate`]).
pub const STORE_KEY: &str = "runtime_config";

/// The settings in force.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct RuntimeSettings {
    /// Telemetry snapshot period.
    pub telemetry_interval: Duration,
    /// Regular drift report period.
    pub drift_interval: Duration,
    /// Drift test settings (false-alarm rate, correction, minimum samples).
    pub drift_test: TestConfig,
    /// Data capture policy (off unless the server switched it on).
    pub capture: CapturePolicy,
}

impl RuntimeSettings {
    /// The settings agent.toml gives (capture off).
    pub fn from_config(cfg: &Config) -> Self {
        RuntimeSettings {
            telemetry_interval: Duration::from_secs(cfg.telemetry_interval_s),
            drift_interval: Duration::from_secs(cfg.drift.report_interval_s),
            drift_test: cfg.drift.test(),
            capture: CapturePolicy::default(),
        }
    }

    /// These settings with `u` applied; fields `u` leaves out keep their value.
    ///
    /// # Errors
    /// The message of [`ConfigUpdate::validate`], naming the field out of range.
    pub fn apply(&self, u: &ConfigUpdate) -> Result<Self, String> {
        u.validate().map_err(|e| e.to_string())?;
        let secs = |v: Option<u64>, cur: Duration| v.map_or(cur, Duration::from_secs);
        Ok(RuntimeSettings {
            telemetry_interval: secs(u.telemetry_interval_s, self.telemetry_interval),
            drift_interval: secs(u.drift_interval_s, self.drift_interval),
            drift_test: u.drift_test.unwrap_or(self.drift_test),
            capture: u.capture.unwrap_or(self.capture),
        })
    }
}

/// Merges `u` into the stored overrides (later fields win) and returns them.
///
/// # Errors
/// Store errors.
pub fn persist(store: &Store, u: &ConfigUpdate) -> Result<ConfigUpdate, StoreError> {
    let mut all: ConfigUpdate = store.get_json(STORE_KEY)?.unwrap_or_default();
    if u.telemetry_interval_s.is_some() {
        all.telemetry_interval_s = u.telemetry_interval_s;
    }
    if u.drift_interval_s.is_some() {
        all.drift_interval_s = u.drift_interval_s;
    }
    if u.drift_test.is_some() {
        all.drift_test = u.drift_test;
    }
    if u.capture.is_some() {
        all.capture = u.capture;
    }
    store.put_json(STORE_KEY, &all)?;
    Ok(all)
}

/// The settings at boot: agent.toml, then the server's stored overrides
/// (an override that no longer validates is logged and ignored).
pub fn at_boot(cfg: &Config, store: &Store) -> RuntimeSettings {
    let base = RuntimeSettings::from_config(cfg);
    match store.get_json::<ConfigUpdate>(STORE_KEY) {
        Ok(Some(u)) => match base.apply(&u) {
            Ok(s) => {
                tracing::info!(?u, "runtime settings: server overrides applied");
                s
            }
            Err(e) => {
                tracing::warn!(error = %e, "stored runtime settings ignored");
                base
            }
        },
        Ok(None) => base,
        Err(e) => {
            tracing::warn!(error = %e, "stored runtime settings unreadable; using agent.toml");
            base
        }
    }
}

#[cfg(test)]
#[allow(clippy::unwrap_used, clippy::panic)]
mod tests {
    use super::*;
    use edgefleet_protocol::capture::CaptureMode;

    fn base() -> RuntimeSettings {
        RuntimeSettings {
            telemetry_interval: Duration::from_secs(10),
            drift_interval: Duration::from_secs(30),
            drift_test: TestConfig::default(),
            capture: CapturePolicy::default(),
        }
    }

    #[test]
    fn apply_table() {
        let t = |f: fn(&mut TestConfig)| {
            let mut d = TestConfig::default();
            f(&mut d);
            Some(d)
        };
        let c = |f: fn(&mut CapturePolicy)| {
            let mut p = CapturePolicy::default();
            f(&mut p);
            Some(p)
        };
        let cases: Vec<(ConfigUpdate, Result<(), &str>)> = vec![
            (ConfigUpdate::default(), Ok(())),
            (
                ConfigUpdate {
                    telemetry_interval_s: Some(2),
                    ..Default::default()
                },
                Ok(()),
            ),
            (
                ConfigUpdate {
                    telemetry_interval_s: Some(0),
                    ..Default::default()
                },
                Err("telemetry_interval_s"),
            ),
            (
                ConfigUpdate {
                    drift_interval_s: Some(ConfigUpdate::MAX_INTERVAL_S + 1),
                    ..Default::default()
                },
                Err("drift_interval_s"),
            ),
            (
                ConfigUpdate {
                    drift_test: t(|d| d.alpha = 0.05),
                    ..Default::default()
                },
                Ok(()),
            ),
            (
                ConfigUpdate {
                    drift_test: t(|d| d.alpha = f64::NAN),
                    ..Default::default()
                },
                Err("drift_test.alpha"),
            ),
            (
                ConfigUpdate {
                    drift_test: t(|d| d.min_samples = 0.0),
                    ..Default::default()
                },
                Err("drift_test.min_samples"),
            ),
            (
                ConfigUpdate {
                    capture: c(|p| p.mode = CaptureMode::OnAlarm),
                    ..Default::default()
                },
                Ok(()),
            ),
            (
                ConfigUpdate {
                    capture: c(|p| p.max_samples_per_minute = 0),
                    ..Default::default()
                },
                Err("capture.max_samples_per_minute"),
            ),
        ];
        for (u, want) in cases {
            match (base().apply(&u), want) {
                (Ok(s), Ok(())) => {
                    let want_t = u
                        .telemetry_interval_s
                        .map_or(base().telemetry_interval, Duration::from_secs);
                    assert_eq!(s.telemetry_interval, want_t);
                    assert_eq!(s.drift_test, u.drift_test.unwrap_or_default());
                    assert_eq!(s.capture, u.capture.unwrap_or_default());
                }
                (Err(e), Err(field)) => assert!(e.contains(field), "{e} should name {field}"),
                (got, want) => panic!("{u:?}: got {got:?}, want {want:?}"),
            }
        }
    }

    #[test]
    fn persist_merges_and_survives_reopen() {
        let dir = tempfile::tempdir().unwrap();
        let on = CapturePolicy {
            mode: CaptureMode::OnAlarm,
            ..CapturePolicy::default()
        };
        {
            let store = Store::open(dir.path()).unwrap().store;
            persist(
                &store,
                &ConfigUpdate {
                    telemetry_interval_s: Some(3),
                    capture: Some(on),
                    ..Default::default()
                },
            )
            .unwrap();
            let all = persist(
                &store,
                &ConfigUpdate {
                    drift_interval_s: Some(7),
                    ..Default::default()
                },
            )
            .unwrap();
            assert_eq!(all.telemetry_interval_s, Some(3));
            assert_eq!(all.drift_interval_s, Some(7));
            assert_eq!(all.capture, Some(on));
            store.flush().unwrap();
        }
        let store = Store::open(dir.path()).unwrap().store;
        let u: ConfigUpdate = store.get_json(STORE_KEY).unwrap().unwrap();
        let s = base().apply(&u).unwrap();
        assert_eq!(s.telemetry_interval, Duration::from_secs(3));
        assert_eq!(s.drift_interval, Duration::from_secs(7));
        assert_eq!(s.capture, on, "the capture policy survives a restart");
    }
}
