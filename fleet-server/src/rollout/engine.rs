//! The rollout engine: runs [`super::plan`] against the registry, the store
//! and MQTT. Every transition is written to the store before its side effects
//! are sent, so a restart resumes from the last transition.

use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::time::Duration;

use edgefleet_protocol::messages::{Down, ReleaseRef, UpdateEvent, UpdateOffer};
use edgefleet_protocol::topics::{self, DownKind};
use edgefleet_protocol::DeviceId;
use rumqttc::QoS;
use tokio::sync::watch;
use tokio::task::JoinHandle;

use super::plan::{Action, DeviceState, Rollout, RolloutSpec, WaveSpec};
use crate::store::{self, now_ms};
use crate::{Error, Result, State};

/// Spawns the ticker: resumes active rollouts, then steps them every `tick_ms`
/// (wave starts, timeouts).
pub fn spawn(state: Arc<State>, mut shutdown: watch::Receiver<bool>) -> JoinHandle<()> {
    tokio::spawn(async move {
        let now = now_ms();
        let resumed: Vec<(Rollout, Vec<Action>)> = {
            let mut map = state.lock_rollouts();
            map.values_mut()
                .filter(|r| r.state.is_active())
                .map(|r| {
                    let a = r.resume_after_restart(now);
                    (r.clone(), a)
                })
                .collect()
        };
        for (r, a) in resumed {
            tracing::info!(rollout = %r.id, state = ?r.state, "resuming rollout");
            state.commit(&r, a).await;
        }
        let mut iv = tokio::time::interval(Duration::from_millis(state.config.tick_ms.max(10)));
        loop {
            tokio::select! {
                _ = shutdown.changed() => break,
                _ = iv.tick() => state.tick().await,
            }
        }
    })
}

impl State {
    pub(crate) fn lock_rollouts(
        &self,
    ) -> std::sync::MutexGuard<'_, std::collections::BTreeMap<String, Rollout>> {
        self.rollouts.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Persists `r` then performs `actions`.
    async fn commit(self: &Arc<Self>, r: &Rollout, actions: Vec<Action>) {
        if let Err(e) = store::put(&self.store.rollouts, r.id.as_bytes(), r) {
            tracing::error!(rollout = %r.id, error = %e, "persisting rollout failed");
        }
        for a in actions {
            if let Err(e) = self.perform(r, a).await {
                tracing::warn!(rollout = %r.id, error = %e, "rollout action failed");
            }
        }
    }

    async fn perform(self: &Arc<Self>, r: &Rollout, a: Action) -> Result<()> {
        let client = self
            .mqtt
            .get()
            .ok_or_else(|| Error::Mqtt("not connected".into()))?;
        let (device, down) = match a {
            Action::Offer(d) => {
                let active = self.registry.get(&d)?.and_then(|x| x.active);
                let b = self.bundles.clone();
                let sha = r.spec.bundle.clone();
                let served =
                    tokio::task::spawn_blocking(move || b.offer_for(&sha, active.as_ref()))
                        .await
                        .map_err(|e| Error::Mqtt(e.to_string()))??;
                let offer = UpdateOffer::new(
                    r.id.clone(),
                    r.release.clone(),
                    &served.manifest_bytes,
                    &served.signature,
                    r.spec.trial.clone(),
                );
                self.stats.offers_sent.fetch_add(1, Ordering::Relaxed);
                (d, Down::UpdateOffer(offer))
            }
            Action::Cancel(d) => (
                d,
                Down::Cancel {
                    rollout_id: r.id.clone(),
                },
            ),
            Action::Rollback(d, reason) => (d, Down::Rollback { reason }),
        };
        let id = DeviceId::new(&device)?;
        client
            .publish(
                topics::down(&id, DownKind::Command),
                QoS::AtLeastOnce,
                false,
                down.encode()?,
            )
            .await
            .map_err(|e| Error::Mqtt(e.to_string()))
    }

    /// Commands `device` to roll back to its previous A/B slot (what an
    /// experiment does to its candidate devices when the candidate loses).
    ///
    /// # Errors
    /// [`Error::Mqtt`] when not connected or the publish fails; a bad id.
    pub async fn send_rollback(self: &Arc<Self>, device: &str, reason: &str) -> Result<()> {
        let client = self
            .mqtt
            .get()
            .ok_or_else(|| Error::Mqtt("not connected".into()))?;
        let id = DeviceId::new(device)?;
        let down = Down::Rollback {
            reason: reason.to_string(),
        };
        client
            .publish(
                topics::down(&id, DownKind::Command),
                QoS::AtLeastOnce,
                false,
                down.encode()?,
            )
            .await
            .map_err(|e| Error::Mqtt(e.to_string()))
    }

    /// Steps every running rollout.
    pub async fn tick(self: &Arc<Self>) {
        let now = now_ms();
        let changed: Vec<(Rollout, Vec<Action>)> = {
            let mut map = self.lock_rollouts();
            map.values_mut()
                .filter(|r| r.state == super::RolloutState::Running)
                .filter_map(|r| {
                    let before = (r.updated_ms, r.history.len());
                    let a = r.step(now);
                    (before != (r.updated_ms, r.history.len()) || !a.is_empty())
                        .then(|| (r.clone(), a))
                })
                .collect()
        };
        for (r, a) in changed {
            self.commit(&r, a).await;
        }
    }

    /// An update event from a device.
    pub async fn on_event(self: &Arc<Self>, ev: &UpdateEvent) {
        let now = now_ms();
        let changed: Vec<(Rollout, Vec<Action>)> = {
            let mut map = self.lock_rollouts();
            map.values_mut()
                .filter(|r| {
                    r.state.is_active() && ev.rollout_id.as_ref().is_none_or(|id| *id == r.id)
                })
                .filter_map(|r| {
                    r.apply_event(
                        ev.device_id.as_str(),
                        ev.kind,
                        ev.reason.clone(),
                        ev.detail.clone(),
                        now,
                    )
                    .then(|| {
                        let a = r.step(now);
                        (r.clone(), a)
                    })
                })
                .collect()
        };
        for (r, a) in changed {
            self.commit(&r, a).await;
        }
    }

    /// A device reported its active release (hello, heartbeat).
    pub async fn on_active(self: &Arc<Self>, device: &str, active: Option<&ReleaseRef>) {
        let now = now_ms();
        let changed: Vec<(Rollout, Vec<Action>)> = {
            let mut map = self.lock_rollouts();
            map.values_mut()
                .filter(|r| r.state.is_active())
                .filter_map(|r| {
                    r.apply_active(device, active, now).then(|| {
                        let a = r.step(now);
                        (r.clone(), a)
                    })
                })
                .collect()
        };
        for (r, a) in changed {
            self.commit(&r, a).await;
        }
    }

    /// A device said hello while idle: re-sends the offers it may have missed
    /// ([`Rollout::reoffer_on_idle_hello`]). Nothing changes state, so nothing
    /// is persisted; a device that is busy with the same release ignores a repeat.
    pub async fn on_idle_hello(self: &Arc<Self>, device: &str) {
        let todo: Vec<(Rollout, Action)> = {
            let map = self.lock_rollouts();
            map.values()
                .filter_map(|r| r.reoffer_on_idle_hello(device).map(|a| (r.clone(), a)))
                .collect()
        };
        for (r, a) in todo {
            tracing::info!(rollout = %r.id, device, "idle device said hello with an offer outstanding: offering again");
            if let Err(e) = self.perform(&r, a).await {
                tracing::warn!(rollout = %r.id, error = %e, "rollout action failed");
            }
        }
    }

    /// Creates and starts a rollout.
    ///
    /// # Errors
    /// [`Error::NotFound`] (bundle), [`Error::BadRequest`] (waves, rates,
    /// a trial policy out of range: `TrialPolicy::validate`),
    /// [`Error::Conflict`] when a selected device is in another active rollout.
    pub async fn create_rollout(self: &Arc<Self>, spec: RolloutSpec) -> Result<Rollout> {
        let bundle = self
            .bundles
            .get(&spec.bundle)?
            .ok_or_else(|| Error::NotFound {
                what: "bundle",
                id: spec.bundle.clone(),
            })?;
        let waves: Vec<WaveSpec> = spec
            .waves
            .iter()
            .map(|w| WaveSpec::parse(w))
            .collect::<Result<_, _>>()
            .map_err(|e| Error::bad("waves", e))?;
        if waves.is_empty() {
            return Err(Error::bad("waves", "at least one wave is required"));
        }
        if !(0.0..=1.0).contains(&spec.max_failure_rate) {
            return Err(Error::bad("max_failure_rate", "must be in 0..=1"));
        }
        match spec.trial.validate() {
            Ok(()) => {}
            Err(edgefleet_protocol::Error::Field { field, reason }) => {
                return Err(Error::bad(field, reason))
            }
            Err(e) => return Err(Error::bad("trial", e.to_string())),
        }
        let release = bundle.release_ref();
        let devices: Vec<_> = self
            .registry
            .list()?
            .into_iter()
            .filter(|d| spec.selector.matches(d))
            .filter(|d| {
                d.target
                    .as_ref()
                    .is_some_and(|t| bundle.targets.contains(t))
            })
            .collect();
        if devices.is_empty() {
            return Err(Error::bad(
                "selector",
                "selects no registered device whose target the bundle supports",
            ));
        }
        let current: Vec<String> = devices
            .iter()
            .filter(|d| {
                d.active
                    .as_ref()
                    .is_some_and(|a| a.model == release.model && a.release == release.release)
            })
            .map(|d| d.id.clone())
            .collect();
        let ids: Vec<String> = devices.into_iter().map(|d| d.id).collect();
        let now = now_ms();
        let id = format!("r-{}", hex::encode(rand::random::<[u8; 6]>()));
        let (r, a) = {
            let mut map = self.lock_rollouts();
            let busy: Vec<&String> = ids
                .iter()
                .filter(|d| {
                    map.values().any(|r| {
                        r.state.is_active()
                            && r.devices.get(*d).is_some_and(|p| {
                                matches!(p.state, DeviceState::Pending | DeviceState::Offered)
                            })
                    })
                })
                .take(10)
                .collect();
            if !busy.is_empty() {
                return Err(Error::Conflict(format!(
                    "devices already in an active rollout (one active rollout per device): {busy:?}"
                )));
            }
            let mut r = Rollout::new(id.clone(), spec, release, &waves, ids, &current, now);
            let a = r.step(now);
            map.insert(id, r.clone());
            (r, a)
        };
        tracing::info!(event = "rollout_created", rollout = %r.id, bundle = %r.spec.bundle, release = r.release.release, devices = r.order.len(), "rollout created");
        self.commit(&r, a).await;
        Ok(r)
    }

    /// Operator control: `pause`, `resume` or `abort`.
    ///
    /// # Errors
    /// [`Error::NotFound`], [`Error::Conflict`] for an invalid transition.
    pub async fn control_rollout(self: &Arc<Self>, id: &str, op: &str) -> Result<Rollout> {
        let now = now_ms();
        let (r, a) = {
            let mut map = self.lock_rollouts();
            let r = map.get_mut(id).ok_or_else(|| Error::NotFound {
                what: "rollout",
                id: id.to_string(),
            })?;
            let a = match op {
                "pause" => r.pause(now).map(|_| Vec::new()),
                "resume" => r.resume(now).map(|_| r.step(now)),
                "abort" => r.abort(now),
                _ => {
                    return Err(Error::bad(
                        "action",
                        format!("`{op}` is not pause, resume or abort"),
                    ))
                }
            }
            .map_err(Error::Conflict)?;
            (r.clone(), a)
        };
        self.commit(&r, a).await;
        Ok(r)
    }
}
