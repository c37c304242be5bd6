//! Pure rollout logic: wave sizes, seeded device order, the per-wave gate.
//!
//! State chain of a device in a rollout:
//! `pending -> offered -> committed | failed | rolled_back | timed_out`, or
//! `pending -> cancelled` (halt/abort), `already_current` when it runs the release.
//! A rollout: `running <-> paused`, `running -> completed | halted`, `* -> aborted`.

use std::collections::BTreeMap;

use edgefleet_protocol::messages::{rollback_reason, EventKind, ReleaseRef, TrialEnd, TrialPolicy};
use serde::{Deserialize, Serialize};
use sha2::Digest as _;

use crate::registry::Selector;

/// One wave's size: an absolute count of devices or a percentage of the
/// selection. Sizes are cumulative ("25%" means 25% of all devices are done
/// after this wave).
#[derive(Debug, Clone, Copy, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum WaveSpec {
    /// This many devices in total after the wave.
    Count(usize),
    /// This percentage of the selection in total after the wave.
    Percent(f64),
}

impl WaveSpec {
    /// Parses `"1"` or `"5%"`.
    ///
    /// # Errors
    /// A message naming the text.
    pub fn parse(s: &str) -> Result<Self, String> {
        let s = s.trim();
        if let Some(p) = s.strip_suffix('%') {
            let v: f64 = p
                .trim()
                .parse()
                .map_err(|_| format!("`{s}` is not a percentage"))?;
            if !(v > 0.0 && v <= 100.0) {
                return Err(format!("`{s}`: a percentage must be in (0, 100]"));
            }
            Ok(WaveSpec::Percent(v))
        } else {
            let v: usize = s
                .parse()
                .map_err(|_| format!("`{s}` is not a device count or percentage"))?;
            if v == 0 {
                return Err("a wave of 0 devices".into());
            }
            Ok(WaveSpec::Count(v))
        }
    }
    /// Parses a comma-separated list (`"1,5%,25%,100%"`).
    ///
    /// # Errors
    /// As [`WaveSpec::parse`].
    pub fn parse_list(s: &str) -> Result<Vec<Self>, String> {
        s.split(',').map(WaveSpec::parse).collect()
    }
}

/// Cumulative device counts after each wave, for `total` devices. Each wave
/// adds at least one device while any remain; waves that would add none are
/// dropped; the result is strictly increasing and at most `total`.
pub fn cumulative_sizes(total: usize, waves: &[WaveSpec]) -> Vec<usize> {
    let mut out: Vec<usize> = Vec::new();
    for w in waves {
        let want = match *w {
            WaveSpec::Count(n) => n,
            WaveSpec::Percent(p) => ((p / 100.0) * total as f64).ceil() as usize,
        };
        let prev = out.last().copied().unwrap_or(0);
        let n = want.max(prev + 1).min(total);
        if n > prev {
            out.push(n);
        }
    }
    out
}

/// Seeded deterministic order: by SHA-256(seed LE ++ device id), then id.
pub fn order_devices(seed: u64, ids: impl IntoIterator<Item = String>) -> Vec<String> {
    let mut v: Vec<([u8; 32], String)> = ids
        .into_iter()
        .map(|id| {
            let mut h = sha2::Sha256::new();
            h.update(seed.to_le_bytes());
            h.update(id.as_bytes());
            (h.finalize().into(), id)
        })
        .collect();
    v.sort();
    v.into_iter().map(|(_, id)| id).collect()
}

/// What an operator asks for (`POST /v1/rollouts`); unknown fields are refused.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RolloutSpec {
    /// Body SHA-256 of the uploaded bundle.
    pub bundle: String,
    /// Which devices.
    #[serde(default)]
    pub selector: Selector,
    /// Waves, e.g. `["1", "5%", "25%", "100%"]`.
    #[serde(default = "default_waves")]
    pub waves: Vec<String>,
    /// Seed of the device order.
    #[serde(default)]
    pub seed: u64,
    /// A device that has not committed this long after its offer fails (s).
    #[serde(default = "default_timeout")]
    pub wave_timeout_s: u64,
    /// Halt when (failed + rolled back + timed out) / wave size exceeds this.
    #[serde(default = "default_rate")]
    pub max_failure_rate: f64,
    /// On halt, command `rollback` to the wave's committed devices.
    #[serde(default)]
    pub rollback_on_halt: bool,
    /// Trial policy sent with the offer; fields left out take
    /// [`TrialPolicy::default`]'s values, unknown ones are refused.
    #[serde(default, deserialize_with = "strict_trial")]
    pub trial: TrialPolicy,
}

/// [`TrialPolicy`] as the REST body spells it: the same fields, unknown ones
/// refused (the protocol type ignores them, for forward compatibility on MQTT).
#[derive(Deserialize)]
#[serde(deny_unknown_fields, default)]
struct StrictTrial {
    window_s: u64,
    min_requests: u64,
    max_error_rate: f64,
    max_p99_ratio: f64,
    mode: edgefleet_protocol::messages::TrialMode,
    end: edgefleet_protocol::messages::TrialEnd,
}

impl Default for StrictTrial {
    fn default() -> Self {
        let d = TrialPolicy::default();
        StrictTrial {
            window_s: d.window_s,
            min_requests: d.min_requests,
            max_error_rate: d.max_error_rate,
            max_p99_ratio: d.max_p99_ratio,
            mode: d.mode,
            end: d.end,
        }
    }
}

fn strict_trial<'de, D: serde::Deserializer<'de>>(d: D) -> Result<TrialPolicy, D::Error> {
    let t = StrictTrial::deserialize(d)?;
    Ok(TrialPolicy {
        window_s: t.window_s,
        min_requests: t.min_requests,
        max_error_rate: t.max_error_rate,
        max_p99_ratio: t.max_p99_ratio,
        mode: t.mode,
        end: t.end,
    })
}

/// [`strict_trial`] for an optional field (`None` when absent).
///
/// # Errors
/// An unknown field or a value of the wrong type.
pub(crate) fn strict_trial_opt<'de, D: serde::Deserializer<'de>>(
    d: D,
) -> Result<Option<TrialPolicy>, D::Error> {
    strict_trial(d).map(Some)
}

fn default_waves() -> Vec<String> {
    vec!["1".into(), "5%".into(), "25%".into(), "100%".into()]
}
fn default_timeout() -> u64 {
    600
}
fn default_rate() -> f64 {
    0.0
}

/// Rollout state.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case", tag = "state", content = "reason")]
pub enum RolloutState {
    /// Waves are advancing.
    Running,
    /// Operator paused: no new offers, no wave advance.
    Paused,
    /// Every wave passed its gate.
    Completed,
    /// A gate failed.
    Halted(String),
    /// Operator aborted.
    Aborted,
}

impl RolloutState {
    /// Running or paused: its devices are taken.
    pub fn is_active(&self) -> bool {
        matches!(self, RolloutState::Running | RolloutState::Paused)
    }
}

/// A device's state within a rollout.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum DeviceState {
    /// Not offered yet.
    Pending,
    /// Offer sent at `at_ms`.
    Offered,
    /// Reported committed (or reports the release active).
    Committed,
    /// Already ran the release when the rollout was created.
    AlreadyCurrent,
    /// Reported failed or rejected.
    Failed,
    /// Reported rolled back.
    RolledBack,
    /// Ran the release as a shadow arm (`trial.end: discard`) and put it
    /// aside when the window passed or the rollout stopped: done, not a
    /// failure.
    ShadowEnded,
    /// Did not commit within the wave timeout.
    TimedOut,
    /// Not offered (or offer cancelled) because the rollout stopped.
    Cancelled,
}

impl DeviceState {
    fn is_failure(&self) -> bool {
        matches!(
            self,
            DeviceState::Failed | DeviceState::RolledBack | DeviceState::TimedOut
        )
    }
}

/// One device's progress.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct DeviceProgress {
    /// Wave index.
    pub wave: usize,
    /// State.
    pub state: DeviceState,
    /// When the offer was (last) sent (server ms).
    pub offered_ms: Option<u64>,
    /// Reason reported or assigned (a device's `reason` code, e.g. `load_failed`).
    pub reason: Option<String>,
    /// The device's human-readable detail of that reason (e.g. the load
    /// error, or the latencies a trial compared); `None` when it sent none.
    #[serde(default)]
    pub detail: Option<String>,
}

/// A rollout and all its state (persisted as JSON on every transition).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Rollout {
    /// Id.
    pub id: String,
    /// The spec it was created from.
    pub spec: RolloutSpec,
    /// Release offered.
    pub release: ReleaseRef,
    /// Devices in wave order.
    pub order: Vec<String>,
    /// Cumulative sizes per wave.
    pub wave_ends: Vec<usize>,
    /// Current wave (`None` before the first starts).
    pub current_wave: Option<usize>,
    /// State.
    pub state: RolloutState,
    /// Per device.
    pub devices: BTreeMap<String, DeviceProgress>,
    /// Created (server ms).
    pub created_ms: u64,
    /// Last transition (server ms).
    pub updated_ms: u64,
    /// Transitions, oldest first.
    pub history: Vec<String>,
}

/// Side effects the engine performs for the pure logic.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Action {
    /// Send the update offer.
    Offer(String),
    /// Send `cancel`.
    Cancel(String),
    /// Send `rollback`.
    Rollback(String, String),
}

/// Per-wave counts.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Default)]
pub struct WaveCounts {
    /// Devices in the wave.
    pub size: usize,
    /// Committed or already current.
    pub committed: usize,
    /// Failed, rolled back or timed out.
    pub failed: usize,
    /// Still offered or pending.
    pub in_progress: usize,
}

impl Rollout {
    /// Creates a rollout over `selected` devices; `current` are those
    /// already running the release.
    pub fn new(
        id: String,
        spec: RolloutSpec,
        release: ReleaseRef,
        waves: &[WaveSpec],
        selected: Vec<String>,
        current: &[String],
        now: u64,
    ) -> Self {
        let order = order_devices(spec.seed, selected);
        let wave_ends = cumulative_sizes(order.len(), waves);
        let mut devices = BTreeMap::new();
        let mut start = 0;
        for (w, &end) in wave_ends.iter().enumerate() {
            for id in &order[start..end] {
                let state = if current.contains(id) {
                    DeviceState::AlreadyCurrent
                } else {
                    DeviceState::Pending
                };
                devices.insert(
                    id.clone(),
                    DeviceProgress {
                        wave: w,
                        state,
                        offered_ms: None,
                        reason: None,
                        detail: None,
                    },
                );
            }
            start = end;
        }
        let history = vec![format!(
            "{now} created: {} devices in {} waves",
            order.len(),
            wave_ends.len()
        )];
        Rollout {
            id,
            spec,
            release,
            order,
            wave_ends,
            current_wave: None,
            state: RolloutState::Running,
            devices,
            created_ms: now,
            updated_ms: now,
            history,
        }
    }

    /// Device ids of wave `w`.
    pub fn wave_devices(&self, w: usize) -> &[String] {
        let start = if w == 0 { 0 } else { self.wave_ends[w - 1] };
        &self.order[start..self.wave_ends[w]]
    }

    /// Counts of wave `w`.
    pub fn wave_counts(&self, w: usize) -> WaveCounts {
        let mut c = WaveCounts::default();
        for id in self.wave_devices(w) {
            c.size += 1;
            match self.devices.get(id).map(|d| &d.state) {
                Some(
                    DeviceState::Committed | DeviceState::AlreadyCurrent | DeviceState::ShadowEnded,
                ) => c.committed += 1,
                Some(s) if s.is_failure() => c.failed += 1,
                Some(DeviceState::Pending | DeviceState::Offered) => c.in_progress += 1,
                _ => {}
            }
        }
        c
    }

    fn log(&mut self, now: u64, what: String) {
        self.updated_ms = now;
        self.history.push(format!("{now} {what}"));
    }

    /// A wave for people: 1-based, `wave 1 of 3` (the `wave` field of log
    /// lines and the API's `current_wave` are 0-based indexes).
    fn wave_name(&self, w: usize) -> String {
        format!("wave {} of {}", w + 1, self.wave_ends.len())
    }

    fn start_wave(&mut self, w: usize, now: u64, actions: &mut Vec<Action>) {
        self.current_wave = Some(w);
        let (name, n) = (self.wave_name(w), self.wave_devices(w).len());
        tracing::info!(event = "wave_started", rollout = %self.id, wave = w, devices = n, "rollout {name} started");
        self.log(now, format!("{name} started ({})", plural(n, "device")));
        let ids: Vec<String> = self.wave_devices(w).to_vec();
        for id in ids {
            if let Some(d) = self.devices.get_mut(&id) {
                if d.state == DeviceState::Pending {
                    d.state = DeviceState::Offered;
                    d.offered_ms = Some(now);
                    actions.push(Action::Offer(id));
                }
            }
        }
    }

    /// Advances the rollout: starts waves, times devices out, applies the gate.
    pub fn step(&mut self, now: u64) -> Vec<Action> {
        let mut actions = Vec::new();
        if self.state != RolloutState::Running {
            return actions;
        }
        loop {
            let w = match self.current_wave {
                None if self.wave_ends.is_empty() => {
                    self.state = RolloutState::Completed;
                    self.log(now, "completed (no devices)".into());
                    return actions;
                }
                None => {
                    self.start_wave(0, now, &mut actions);
                    0
                }
                Some(w) => w,
            };
            let timeout_ms = self.spec.wave_timeout_s.saturating_mul(1000);
            let mut timed_out = 0;
            for id in self.wave_devices(w).to_vec() {
                if let Some(d) = self.devices.get_mut(&id) {
                    if d.state == DeviceState::Offered
                        && now >= d.offered_ms.unwrap_or(now) + timeout_ms
                    {
                        d.state = DeviceState::TimedOut;
                        d.reason = Some(format!("no commit within {} s", self.spec.wave_timeout_s));
                        timed_out += 1;
                    }
                }
            }
            if timed_out > 0 {
                let name = self.wave_name(w);
                self.log(
                    now,
                    format!("{name}: {} timed out", plural(timed_out, "device")),
                );
            }
            let c = self.wave_counts(w);
            let rate = c.failed as f64 / c.size.max(1) as f64;
            if rate > self.spec.max_failure_rate {
                self.halt(
                    w,
                    now,
                    format!(
                        "{}: {} of {} devices failed ({:.1}% > {:.1}%)",
                        self.wave_name(w),
                        c.failed,
                        c.size,
                        rate * 100.0,
                        self.spec.max_failure_rate * 100.0
                    ),
                    &mut actions,
                );
                return actions;
            }
            if c.in_progress > 0 {
                return actions;
            }
            self.log(
                now,
                format!(
                    "{} passed: {} committed, {} failed",
                    self.wave_name(w),
                    c.committed,
                    c.failed
                ),
            );
            if w + 1 >= self.wave_ends.len() {
                self.state = RolloutState::Completed;
                self.log(now, "completed".into());
                tracing::info!(event = "rollout_completed", rollout = %self.id, "rollout completed");
                return actions;
            }
            self.start_wave(w + 1, now, &mut actions);
        }
    }

    fn halt(&mut self, w: usize, now: u64, reason: String, actions: &mut Vec<Action>) {
        self.state = RolloutState::Halted(reason.clone());
        tracing::info!(event = "rollout_halted", rollout = %self.id, wave = w, %reason, "rollout halted");
        self.log(now, format!("halted: {reason}"));
        self.stop_devices(actions);
        if self.spec.rollback_on_halt {
            for id in self.wave_devices(w).to_vec() {
                if self
                    .devices
                    .get(&id)
                    .is_some_and(|d| d.state == DeviceState::Committed)
                {
                    actions.push(Action::Rollback(id, format!("rollout {} halted", self.id)));
                }
            }
        }
    }

    fn stop_devices(&mut self, actions: &mut Vec<Action>) {
        for (id, d) in self.devices.iter_mut() {
            match d.state {
                DeviceState::Offered => {
                    d.state = DeviceState::Cancelled;
                    actions.push(Action::Cancel(id.clone()));
                }
                DeviceState::Pending => d.state = DeviceState::Cancelled,
                _ => {}
            }
        }
    }

    /// Applies an update event from a device, keeping its `reason` and
    /// `detail`. Returns true when state changed.
    pub fn apply_event(
        &mut self,
        device: &str,
        kind: EventKind,
        reason: Option<String>,
        detail: Option<String>,
        now: u64,
    ) -> bool {
        let Some(d) = self.devices.get_mut(device) else {
            return false;
        };
        if d.state != DeviceState::Offered {
            return false;
        }
        let new = match kind {
            EventKind::Committed => DeviceState::Committed,
            EventKind::RolledBack
                if reason.as_deref() == Some(rollback_reason::SHADOW_ENDED)
                    && self.spec.trial.end == TrialEnd::Discard =>
            {
                DeviceState::ShadowEnded
            }
            EventKind::RolledBack => DeviceState::RolledBack,
            EventKind::Failed | EventKind::Rejected => DeviceState::Failed,
            _ => return false,
        };
        d.state = new.clone();
        d.reason = reason;
        d.detail = detail;
        self.updated_ms = now;
        true
    }

    /// A device reports (hello/heartbeat) `active`: if it is this rollout's
    /// release and the device was offered it, that is a commit (covers events
    /// lost while the server was down).
    pub fn apply_active(&mut self, device: &str, active: Option<&ReleaseRef>, now: u64) -> bool {
        let Some(d) = self.devices.get_mut(device) else {
            return false;
        };
        let same = active
            .is_some_and(|a| a.model == self.release.model && a.release == self.release.release);
        if d.state == DeviceState::Offered && same {
            d.state = DeviceState::Committed;
            d.reason = Some("reported the release active".into());
            self.updated_ms = now;
            return true;
        }
        false
    }

    /// A device said hello (it connected) while idle. If it still holds an
    /// outstanding offer of this running rollout, the offer may never have
    /// reached it: a broker keeps nothing for a device whose session is gone
    /// (the embedded broker restarts with the server, so offers re-sent on a
    /// restart while the device was offline are lost). Returns the offer to
    /// send again; the offer time is kept, so the wave timeout still applies.
    /// (Call after [`Rollout::apply_active`], which settles a device that
    /// already runs the release.)
    pub fn reoffer_on_idle_hello(&self, device: &str) -> Option<Action> {
        let d = self.devices.get(device)?;
        (self.state == RolloutState::Running && d.state == DeviceState::Offered)
            .then(|| Action::Offer(device.to_string()))
    }

    /// Operator pause.
    pub fn pause(&mut self, now: u64) -> Result<(), String> {
        if self.state != RolloutState::Running {
            return Err(format!(
                "rollout is {:?}, only a running rollout can be paused",
                self.state
            ));
        }
        self.state = RolloutState::Paused;
        self.log(now, "paused".into());
        tracing::info!(event = "rollout_paused", rollout = %self.id, "rollout paused");
        Ok(())
    }

    /// Operator resume.
    pub fn resume(&mut self, now: u64) -> Result<(), String> {
        if self.state != RolloutState::Paused {
            return Err(format!(
                "rollout is {:?}, only a paused rollout can be resumed",
                self.state
            ));
        }
        self.state = RolloutState::Running;
        self.log(now, "resumed".into());
        tracing::info!(event = "rollout_resumed", rollout = %self.id, "rollout resumed");
        Ok(())
    }

    /// Operator abort: cancels outstanding offers.
    pub fn abort(&mut self, now: u64) -> Result<Vec<Action>, String> {
        if !self.state.is_active() {
            let state = match &self.state {
                RolloutState::Completed => "completed",
                RolloutState::Halted(_) => "halted",
                RolloutState::Aborted => "aborted",
                RolloutState::Running | RolloutState::Paused => "active",
            };
            return Err(format!("rollout is {state}, already finished"));
        }
        self.state = RolloutState::Aborted;
        self.log(now, "aborted".into());
        tracing::info!(event = "rollout_aborted", rollout = %self.id, "rollout aborted");
        let mut actions = Vec::new();
        self.stop_devices(&mut actions);
        Ok(actions)
    }

    /// After a server restart: re-send outstanding offers and restart their
    /// timeouts (the device may never have received the first).
    pub fn resume_after_restart(&mut self, now: u64) -> Vec<Action> {
        if !self.state.is_active() {
            return Vec::new();
        }
        let mut actions = Vec::new();
        for (id, d) in self.devices.iter_mut() {
            if d.state == DeviceState::Offered {
                d.offered_ms = Some(now);
                if self.state == RolloutState::Running {
                    actions.push(Action::Offer(id.clone()));
                }
            }
        }
        self.log(
            now,
            format!(
                "resumed after server restart ({} offers re-sent)",
                actions.len()
            ),
        );
        actions
    }
}

/// `1 device`, `3 devices`.
fn plural(n: usize, what: &str) -> String {
    if n == 1 {
        format!("1 {what}")
    } else {
        format!("{n} {what}s")
    }
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;

    fn spec(waves: &[&str], rate: f64, rollback: bool) -> RolloutSpec {
        RolloutSpec {
            bundle: "x".into(),
            selector: Selector::default(),
            waves: waves.iter().map(|s| s.to_string()).collect(),
            seed: 7,
            wave_timeout_s: 10,
            max_failure_rate: rate,
            rollback_on_halt: rollback,
            trial: TrialPolicy::default(),
        }
    }
    fn rel() -> ReleaseRef {
        ReleaseRef {
            model: "m".into(),
            release: 2,
            version: "1.0.0".into(),
        }
    }
    fn rollout(n: usize, waves: &[&str], rate: f64, rollback: bool) -> Rollout {
        let ws: Vec<WaveSpec> = waves.iter().map(|w| WaveSpec::parse(w).unwrap()).collect();
        let ids = (0..n).map(|i| format!("d{i}")).collect();
        Rollout::new(
            "r".into(),
            spec(waves, rate, rollback),
            rel(),
            &ws,
            ids,
            &[],
            0,
        )
    }
    fn offered(a: &[Action]) -> Vec<String> {
        a.iter()
            .filter_map(|a| {
                if let Action::Offer(d) = a {
                    Some(d.clone())
                } else {
                    None
                }
            })
            .collect()
    }

    #[test]
    fn wave_sizes_are_cumulative_and_grow() {
        let w = WaveSpec::parse_list("1,5%,25%,100%").unwrap();
        assert_eq!(cumulative_sizes(50, &w), vec![1, 3, 13, 50]);
        assert_eq!(cumulative_sizes(1000, &w), vec![1, 50, 250, 1000]);
        assert_eq!(cumulative_sizes(2, &w), vec![1, 2]);
        assert_eq!(cumulative_sizes(0, &w), Vec::<usize>::new());
        assert_eq!(
            cumulative_sizes(10, &WaveSpec::parse_list("50%").unwrap()),
            vec![5]
        );
        assert!(
            WaveSpec::parse("0").is_err()
                && WaveSpec::parse("150%").is_err()
                && WaveSpec::parse("x").is_err()
        );
    }

    #[test]
    fn order_is_seeded_and_deterministic() {
        let ids: Vec<String> = (0..20).map(|i| format!("d{i}")).collect();
        let a = order_devices(1, ids.clone());
        assert_eq!(a, order_devices(1, ids.iter().rev().cloned()));
        assert_ne!(a, order_devices(2, ids.clone()));
        let mut s = a.clone();
        s.sort();
        let mut t = ids;
        t.sort();
        assert_eq!(s, t);
    }

    #[test]
    fn waves_advance_when_all_commit() {
        let mut r = rollout(10, &["1", "50%", "100%"], 0.0, false);
        let a = r.step(0);
        assert_eq!(offered(&a).len(), 1);
        assert!(r.step(1).is_empty());
        assert!(r.apply_event(&offered(&a)[0], EventKind::Committed, None, None, 2));
        let a = r.step(2);
        assert_eq!(offered(&a).len(), 4);
        for d in offered(&a) {
            r.apply_event(&d, EventKind::Committed, None, None, 3);
        }
        let a = r.step(3);
        assert_eq!(offered(&a).len(), 5);
        for d in offered(&a) {
            r.apply_active(&d, Some(&rel()), 4);
        }
        r.step(4);
        assert_eq!(r.state, RolloutState::Completed);
    }

    #[test]
    fn canary_failure_halts_and_leaves_others_untouched() {
        let mut r = rollout(10, &["1", "100%"], 0.0, true);
        let a = r.step(0);
        r.apply_event(
            &offered(&a)[0],
            EventKind::RolledBack,
            Some("golden_mismatch".into()),
            None,
            1,
        );
        let a = r.step(1);
        assert_eq!(
            r.state,
            RolloutState::Halted("wave 1 of 2: 1 of 1 devices failed (100.0% > 0.0%)".into())
        );
        let texts: Vec<&str> = r
            .history
            .iter()
            .map(|h| h.split_once(' ').map_or("", |(_, t)| t))
            .collect();
        assert_eq!(
            texts[1..],
            [
                "wave 1 of 2 started (1 device)",
                "halted: wave 1 of 2: 1 of 1 devices failed (100.0% > 0.0%)"
            ]
        );
        assert!(offered(&a).is_empty());
        assert_eq!(
            r.abort(2),
            Err("rollout is halted, already finished".to_string())
        );
        assert_eq!(
            r.devices
                .values()
                .filter(|d| d.state == DeviceState::Cancelled)
                .count(),
            9
        );
    }

    #[test]
    fn silent_device_times_out_and_fails_the_wave() {
        let mut r = rollout(4, &["100%"], 0.3, false);
        let a = r.step(0);
        let ids = offered(&a);
        for d in &ids[..3] {
            r.apply_event(d, EventKind::Committed, None, None, 1);
        }
        r.step(5_000);
        assert_eq!(r.state, RolloutState::Running);
        r.step(10_000);
        assert_eq!(r.devices[&ids[3]].state, DeviceState::TimedOut);
        // 1 of 4 = 25% <= 30%: passes.
        assert_eq!(r.state, RolloutState::Completed);
        let mut r = rollout(4, &["100%"], 0.0, false);
        r.step(0);
        r.step(10_000);
        assert!(matches!(r.state, RolloutState::Halted(_)));
    }

    #[test]
    fn rollback_on_halt_targets_committed_wave_devices() {
        let mut r = rollout(4, &["100%"], 0.4, true);
        let ids = offered(&r.step(0));
        r.apply_event(&ids[0], EventKind::Committed, None, None, 1);
        r.apply_event(&ids[1], EventKind::Failed, None, None, 1);
        r.apply_event(&ids[2], EventKind::Failed, None, None, 1);
        let a = r.step(2);
        assert!(a.contains(&Action::Rollback(ids[0].clone(), "rollout r halted".into())));
        assert!(a.contains(&Action::Cancel(ids[3].clone())));
    }

    #[test]
    fn pause_resume_abort_and_restart() {
        let mut r = rollout(3, &["1", "100%"], 0.0, false);
        let ids = offered(&r.step(0));
        r.pause(1).unwrap();
        r.apply_event(&ids[0], EventKind::Committed, None, None, 2);
        assert!(r.step(3).is_empty());
        assert!(r.pause(3).is_err());
        r.resume(4).unwrap();
        let next = offered(&r.step(4));
        assert_eq!(next.len(), 2);
        let again = r.resume_after_restart(100);
        assert_eq!(offered(&again).len(), 2);
        let a = r.abort(101).unwrap();
        assert_eq!(a.len(), 2);
        assert!(r.abort(102).is_err());
    }

    #[test]
    fn a_device_failure_keeps_its_reason_and_detail() {
        let mut r = rollout(2, &["100%"], 1.0, false);
        let ids = offered(&r.step(0));
        assert!(r.apply_event(
            &ids[0],
            EventKind::RolledBack,
            Some("load_failed".into()),
            Some("load m@2: model.nnef.tar: not an archive".into()),
            1,
        ));
        let d = &r.devices[&ids[0]];
        assert_eq!(
            (d.state.clone(), d.reason.as_deref(), d.detail.as_deref()),
            (
                DeviceState::RolledBack,
                Some("load_failed"),
                Some("load m@2: model.nnef.tar: not an archive")
            )
        );
        // Rollouts stored before `detail` existed still load.
        let mut v = serde_json::to_value(&r).unwrap();
        v["devices"][&ids[0]]
            .as_object_mut()
            .unwrap()
            .remove("detail");
        let back: Rollout = serde_json::from_value(v).unwrap();
        assert_eq!(back.devices[&ids[0]].detail, None);
    }

    #[test]
    fn the_trial_policy_takes_defaults_and_refuses_unknown_fields() {
        let spec: RolloutSpec = serde_json::from_str(
            r#"{"bundle": "x", "trial": {"window_s": 3, "max_p99_ratio": 8.0}}"#,
        )
        .unwrap();
        assert_eq!(
            spec.trial,
            TrialPolicy {
                window_s: 3,
                max_p99_ratio: 8.0,
                ..TrialPolicy::default()
            }
        );
        let e = serde_json::from_str::<RolloutSpec>(r#"{"bundle": "x", "trial": {"window": 3}}"#)
            .unwrap_err();
        assert!(e.to_string().contains("unknown field `window`"), "{e}");
        // What the server stores reads back the same.
        let json = serde_json::to_string(&spec).unwrap();
        assert_eq!(serde_json::from_str::<RolloutSpec>(&json).unwrap(), spec);
    }

    #[test]
    fn idle_hello_re_offers_only_an_outstanding_offer_of_a_running_rollout() {
        let mut r = rollout(3, &["1", "100%"], 0.0, false);
        let ids = offered(&r.step(0));
        let canary = &ids[0];
        let pending = r.order.iter().find(|d| *d != canary).unwrap().clone();
        assert_eq!(
            r.reoffer_on_idle_hello(canary),
            Some(Action::Offer(canary.clone()))
        );
        assert_eq!(r.reoffer_on_idle_hello(&pending), None, "not offered yet");
        assert_eq!(r.reoffer_on_idle_hello("stranger"), None);
        r.pause(1).unwrap();
        assert_eq!(r.reoffer_on_idle_hello(canary), None, "paused");
        r.resume(2).unwrap();
        r.apply_event(canary, EventKind::Committed, None, None, 3);
        assert_eq!(r.reoffer_on_idle_hello(canary), None, "committed");
    }
}
