//! Runtime settings the fleet server may change with `Down::Config`
//! (docs/specs/mqtt.md, `edgefleet_protocol::messages::ConfigUpdate`):
//! the telemetry interval, the drift report interval and the drift
//! thresholds. They start from agent.toml; a server update is validated,
//! persisted in the store (key [`STORE_KEY`], so it survives restarts and
//! power cuts) and published on a `tokio::sync::watch` channel that the
//! telemetry loop and the drift thread follow without a restart.

use std::time::Duration;

use edgefleet_drift::DriftThresholds;
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
    /// Drift alarm thresholds.
    pub drift_thresholds: DriftThresholds,
}

impl RuntimeSettings {
    /// The settings agent.toml gives.
    pub fn from_config(cfg: &Config) -> Self {
        RuntimeSettings {
            telemetry_interval: Duration::from_secs(cfg.telemetry_interval_s),
            drift_interval: Duration::from_secs(cfg.drift_interval_s),
            drift_thresholds: cfg.drift_thresholds.unwrap_or_default(),
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
            drift_thresholds: u.drift_thresholds.unwrap_or(self.drift_thresholds),
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
    if u.drift_thresholds.is_some() {
        all.drift_thresholds = u.drift_thresholds;
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

    fn base() -> RuntimeSettings {
        RuntimeSettings {
            telemetry_interval: Duration::from_secs(10),
            drift_interval: Duration::from_secs(30),
            drift_thresholds: DriftThresholds::default(),
        }
    }

    #[test]
    fn apply_table() {
        let t = |f: fn(&mut DriftThresholds)| {
            let mut d = DriftThresholds::default();
            f(&mut d);
            Some(d)
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
                    drift_thresholds: t(|d| d.psi_alarm = f64::NAN),
                    ..Default::default()
                },
                Err("psi_alarm"),
            ),
            (
                ConfigUpdate {
                    drift_thresholds: t(|d| d.ks_alarm = 1.5),
                    ..Default::default()
                },
                Err("ks_alarm"),
            ),
            (
                ConfigUpdate {
                    drift_thresholds: t(|d| d.chi2_p_alarm = 0.0),
                    ..Default::default()
                },
                Err("chi2_p_alarm"),
            ),
            (
                ConfigUpdate {
                    drift_thresholds: t(|d| d.min_samples = 0),
                    ..Default::default()
                },
                Err("min_samples"),
            ),
        ];
        for (u, want) in cases {
            match (base().apply(&u), want) {
                (Ok(s), Ok(())) => {
                    if let Some(v) = u.telemetry_interval_s {
                        assert_eq!(s.telemetry_interval, Duration::from_secs(v));
                    } else {
                        assert_eq!(s.telemetry_interval, base().telemetry_interval);
                    }
                }
                (Err(e), Err(field)) => assert!(e.contains(field), "{e} should name {field}"),
                (got, want) => panic!("{u:?}: got {got:?}, want {want:?}"),
            }
        }
    }

    #[test]
    fn persist_merges_and_survives_reopen() {
        let dir = tempfile::tempdir().unwrap();
        {
            let store = Store::open(dir.path()).unwrap().store;
            persist(
                &store,
                &ConfigUpdate {
                    telemetry_interval_s: Some(3),
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
            store.flush().unwrap();
        }
        let store = Store::open(dir.path()).unwrap().store;
        let u: ConfigUpdate = store.get_json(STORE_KEY).unwrap().unwrap();
        let s = base().apply(&u).unwrap();
        assert_eq!(s.telemetry_interval, Duration::from_secs(3));
        assert_eq!(s.drift_interval, Duration::from_secs(7));
    }
}
