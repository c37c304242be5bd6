//! The update state machine: ONE transition table ([`next`]), pure, no I/O;
//! and the [`Updater`] that persists each new state (flushed) BEFORE it runs
//! the state's actions, so a crash or power cut at any point resumes or rolls
//! back on restart ([`Updater::recover`] feeds [`Event::Boot`]).
//!
//! ```text
//! Idle --offer ok--> Downloading --all chunks--> Verifying --body ok--> Staging --installed--> Trial
//! Trial --passed--> Committed --done--> Idle
//! Trial (end: discard) --passed|server_command|cancelled--> RolledBack (shadow_ended, not refused) --done--> Idle
//! Trial --load_failed|golden_mismatch|nan_output|latency_budget|error_rate|crash_loop|server_command|cancelled--> RolledBack --done--> Idle
//! Downloading|Verifying|Staging --failure|cancel--> Idle          (offer refused up front: Rejected, stays Idle)
//! ```
//!
//! Every event the table accepts, and every commit, rollback and refused
//! offer, is one info line with an `event` field (`offer_accepted`,
//! `offer_refused`, `download_done`, `download_failed`, `verified`,
//! `verify_failed`, `staged`, `stage_failed`, `trial_started`,
//! `trial_passed`, `trial_failed`, `rollback_ordered`, `rollout_cancelled`,
//! `committed`, `rolled_back`, `rollback_refused`; docs/agent.md).
//!
//! Fault injection (documented in docs/agent.md): `EDGEFLEET_FAULT_PAUSE_IN=<state>`
//! makes the agent sleep right after persisting `<state>` and before its side
//! effects, so a test can SIGKILL it there. It only delays; it cannot skip a step.

use std::collections::BTreeSet;
use std::fs::OpenOptions;
use std::os::unix::fs::FileExt as _;
use std::path::PathBuf;
use std::sync::{mpsc, Arc, Mutex};
use std::time::{Duration, Instant};

use base64::Engine as _;
use edgefleet_bundle::{Policy, SignedManifest, TrustStore, VerifiedBundle, VerifiedManifest};
use edgefleet_protocol::chunk::ChunkData;
use edgefleet_protocol::messages::{
    rollback_reason, ChunkRequest, EventKind, ReleaseRef, TrialEnd, TrialPolicy, UpdateEvent,
    UpdateOffer, MAX_CHUNKS_PER_REQUEST,
};
use edgefleet_protocol::{DeviceId, Down, Up};
use serde::{Deserialize, Serialize};

use crate::api::StatusInfo;
use crate::engine::{label, Engine, LatencyReference, TrialStats};
use crate::runtime::Model;
use crate::slots::{SlotName, Slots};
use crate::store::{keys, Store};

/// Smallest reference latency (ms) the `max_p99_ratio` check compares against.
pub const RATIO_FLOOR_MS: f64 = 1.0;

/// Candidate requests needed before any verdict on error rate or latency.
pub const MIN_SAMPLES: u64 = 5;

/// Golden-input runs timed when a trial starts (after the self-test's run,
/// which warms the model up); their median is the candidate's own latency
/// reference ([`LatencyReference::own_ms`]).
pub const REFERENCE_RUNS: usize = 5;

/// Requests both models need before `max_p99_ratio` compares p99s; with
/// fewer it compares p50s (the p99 of a few samples is their maximum).
pub const P99_MIN_SAMPLES: u64 = 100;

/// Restarts during one trial that count as a crash loop.
pub const CRASH_LOOP_BOOTS: u32 = 2;

/// The update being worked on (persisted with the state).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Job {
    /// Rollout id.
    pub rollout_id: String,
    /// Release (from the verified manifest).
    pub release: ReleaseRef,
    /// Signed manifest bytes, base64.
    pub manifest_b64: String,
    /// Signature, base64.
    pub signature_b64: String,
    /// Body SHA-256 hex.
    pub body_sha256: String,
    /// Trial policy.
    pub trial: TrialPolicy,
}

/// Persisted update state.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(tag = "state", rename_all = "snake_case")]
pub enum State {
    /// Nothing in progress.
    Idle,
    /// Fetching chunks.
    Downloading {
        /// The job.
        job: Job,
    },
    /// Checking the complete body.
    Verifying {
        /// The job.
        job: Job,
    },
    /// Installing into the inactive slot.
    Staging {
        /// The job.
        job: Job,
    },
    /// Candidate on trial.
    Trial {
        /// The job.
        job: Job,
        /// Slot holding the candidate.
        slot: SlotName,
        /// Agent starts seen during this trial.
        boots: u32,
    },
    /// Trial passed; the commit is being applied (idempotent).
    Committed {
        /// The job.
        job: Job,
        /// New active slot.
        slot: SlotName,
    },
    /// Trial failed or rollback ordered; the rollback is being applied (idempotent).
    RolledBack {
        /// The job.
        job: Job,
        /// Slot that held the candidate.
        slot: SlotName,
        /// Reason code.
        reason: String,
        /// Detail.
        detail: String,
    },
}

impl State {
    /// Short name (`idle`, `downloading`, ...), used in Hello and the fault hook.
    pub fn name(&self) -> &'static str {
        match self {
            State::Idle => "idle",
            State::Downloading { .. } => "downloading",
            State::Verifying { .. } => "verifying",
            State::Staging { .. } => "staging",
            State::Trial { .. } => "trial",
            State::Committed { .. } => "committed",
            State::RolledBack { .. } => "rolled_back",
        }
    }
    fn job(&self) -> Option<&Job> {
        match self {
            State::Idle => None,
            State::Downloading { job } | State::Verifying { job } | State::Staging { job } => {
                Some(job)
            }
            State::Trial { job, .. }
            | State::Committed { job, .. }
            | State::RolledBack { job, .. } => Some(job),
        }
    }
}

/// What happened (input of [`next`]).
#[derive(Debug, Clone, PartialEq)]
pub enum Event {
    /// The agent started (recovery).
    Boot,
    /// An offer passed signature and policy checks.
    OfferAccepted(Job),
    /// Every chunk is on disk.
    DownloadComplete,
    /// The download failed.
    DownloadFailed(String, String),
    /// Body and payload verified.
    Verified,
    /// Body or payload failed verification (bundle error code, detail).
    VerifyFailed(String, String),
    /// Installed into this slot.
    Staged(SlotName),
    /// Installing failed.
    StageFailed(String, String),
    /// Trial window passed.
    TrialPassed,
    /// Trial failed (reason code, detail).
    TrialFailed(String, String),
    /// Server ordered a rollback.
    RollbackCommand(String),
    /// Server cancelled the rollout.
    Cancel,
    /// Commit or rollback applied.
    Done,
}

/// Side effects the driver performs after persisting the new state.
#[derive(Debug, Clone, PartialEq)]
pub enum Action {
    /// Publish an update event.
    Report(EventKind, Option<String>, Option<String>),
    /// Ask for missing chunks (resumes from the persisted bitmap).
    RequestChunks,
    /// Verify the downloaded body.
    VerifyBody,
    /// Install into the inactive slot.
    Install,
    /// Load the candidate, run golden vectors, start the live trial.
    StartTrial(SlotName),
    /// Make the slot active, raise the floor.
    Commit(SlotName),
    /// Drop the candidate; the active slot serves.
    Rollback(SlotName),
    /// Swap active and previous (server rollback with no trial running).
    RollbackActive(String),
    /// Never install this release again.
    Refuse(String),
    /// Remove the partial download and bitmap.
    CleanupDownload,
    /// Emit [`Event::Done`].
    Finish,
}

fn rolled_back(job: &Job, slot: SlotName, reason: &str, detail: &str) -> (State, Vec<Action>) {
    (
        State::RolledBack {
            job: job.clone(),
            slot,
            reason: reason.into(),
            detail: detail.into(),
        },
        vec![
            Action::Rollback(slot),
            Action::Refuse(reason.into()),
            Action::Report(
                EventKind::RolledBack,
                Some(reason.into()),
                Some(detail.into()),
            ),
            Action::Finish,
        ],
    )
}

/// The end of a shadow trial with `end: discard`: the candidate is put
/// aside as after a rollback, but it is not refused (the experiment it
/// served may still promote it) and the reason is `shadow_ended`.
fn shadow_ended(job: &Job, slot: SlotName, detail: &str) -> (State, Vec<Action>) {
    (
        State::RolledBack {
            job: job.clone(),
            slot,
            reason: rollback_reason::SHADOW_ENDED.into(),
            detail: detail.into(),
        },
        vec![
            Action::Rollback(slot),
            Action::Report(
                EventKind::RolledBack,
                Some(rollback_reason::SHADOW_ENDED.into()),
                Some(detail.into()),
            ),
            Action::Finish,
        ],
    )
}

fn failed(reason: &str, detail: &str, refuse: bool) -> (State, Vec<Action>) {
    let mut a = vec![Action::Report(
        EventKind::Failed,
        Some(reason.into()),
        Some(detail.into()),
    )];
    if refuse {
        a.push(Action::Refuse(reason.into()));
    }
    a.push(Action::CleanupDownload);
    (State::Idle, a)
}

/// THE transition table. Pure: no I/O. Unlisted (state, event) pairs leave
/// the state unchanged with no actions.
pub fn next(state: &State, event: Event) -> (State, Vec<Action>) {
    use Event as E;
    use State as S;
    match (state, event) {
        (S::Idle, E::OfferAccepted(job)) => (
            S::Downloading { job },
            vec![
                Action::Report(EventKind::Downloading, None, None),
                Action::RequestChunks,
            ],
        ),
        (S::Idle, E::RollbackCommand(r)) => (S::Idle, vec![Action::RollbackActive(r)]),
        (S::Idle, E::Boot) => (S::Idle, vec![Action::CleanupDownload]),

        (S::Downloading { job }, E::Boot) => (
            S::Downloading { job: job.clone() },
            vec![Action::RequestChunks],
        ),
        (S::Downloading { job }, E::DownloadComplete) => {
            (S::Verifying { job: job.clone() }, vec![Action::VerifyBody])
        }
        (S::Downloading { .. }, E::DownloadFailed(r, d)) => failed(&r, &d, false),

        (S::Verifying { job }, E::Boot) => {
            (S::Verifying { job: job.clone() }, vec![Action::VerifyBody])
        }
        (S::Verifying { job }, E::Verified) => (
            S::Staging { job: job.clone() },
            vec![
                Action::Report(EventKind::Verified, None, None),
                Action::Install,
            ],
        ),
        (S::Verifying { .. }, E::VerifyFailed(r, d)) => failed(&r, &d, true),

        (S::Staging { job }, E::Boot) => (S::Staging { job: job.clone() }, vec![Action::Install]),
        (S::Staging { job }, E::Staged(slot)) => (
            S::Trial {
                job: job.clone(),
                slot,
                boots: 0,
            },
            vec![
                Action::Report(EventKind::Staged, None, None),
                Action::Report(EventKind::TrialStarted, None, None),
                Action::StartTrial(slot),
            ],
        ),
        (S::Staging { .. }, E::StageFailed(r, d)) => failed(&r, &d, false),

        (S::Downloading { .. } | S::Verifying { .. } | S::Staging { .. }, E::Cancel) => {
            failed("cancelled", "server cancelled the rollout", false)
        }
        (
            S::Downloading { .. } | S::Verifying { .. } | S::Staging { .. },
            E::RollbackCommand(r),
        ) => failed("server_command", &r, false),

        (S::Trial { job, slot, boots }, E::Boot) => {
            if boots + 1 >= CRASH_LOOP_BOOTS {
                rolled_back(
                    job,
                    *slot,
                    "crash_loop",
                    &format!("{} agent restarts during the trial", boots + 1),
                )
            } else {
                (
                    S::Trial {
                        job: job.clone(),
                        slot: *slot,
                        boots: boots + 1,
                    },
                    vec![Action::StartTrial(*slot)],
                )
            }
        }
        (S::Trial { job, slot, .. }, E::TrialPassed) if job.trial.end == TrialEnd::Discard => {
            shadow_ended(job, *slot, "the shadow window passed")
        }
        (S::Trial { job, slot, .. }, E::RollbackCommand(d))
            if job.trial.end == TrialEnd::Discard =>
        {
            shadow_ended(job, *slot, &d)
        }
        (S::Trial { job, slot, .. }, E::Cancel) if job.trial.end == TrialEnd::Discard => {
            shadow_ended(job, *slot, "server cancelled the rollout")
        }
        (S::Trial { job, slot, .. }, E::TrialPassed) => (
            S::Committed {
                job: job.clone(),
                slot: *slot,
            },
            vec![
                Action::Commit(*slot),
                Action::Report(EventKind::Committed, None, None),
                Action::Finish,
            ],
        ),
        (S::Trial { job, slot, .. }, E::TrialFailed(r, d)) => rolled_back(job, *slot, &r, &d),
        (S::Trial { job, slot, .. }, E::RollbackCommand(d)) => {
            rolled_back(job, *slot, "server_command", &d)
        }
        (S::Trial { job, slot, .. }, E::Cancel) => {
            rolled_back(job, *slot, "cancelled", "server cancelled the rollout")
        }

        // Commit and rollback are idempotent: a restart repeats them.
        (S::Committed { job, slot }, E::Boot) => (
            S::Committed {
                job: job.clone(),
                slot: *slot,
            },
            vec![
                Action::Commit(*slot),
                Action::Report(EventKind::Committed, None, None),
                Action::Finish,
            ],
        ),
        (
            S::RolledBack {
                job,
                slot,
                reason,
                detail,
            },
            E::Boot,
        ) if reason == rollback_reason::SHADOW_ENDED => shadow_ended(job, *slot, detail),
        (
            S::RolledBack {
                job,
                slot,
                reason,
                detail,
            },
            E::Boot,
        ) => rolled_back(job, *slot, reason, detail),
        (S::Committed { .. } | S::RolledBack { .. }, E::Done) => {
            (S::Idle, vec![Action::CleanupDownload])
        }

        (s, _) => (s.clone(), vec![]),
    }
}

/// Inputs to the updater thread.
#[derive(Debug)]
pub enum Input {
    /// A server command.
    Down(Down),
    /// A bundle chunk.
    Chunk(ChunkData),
    /// Stop.
    Shutdown,
}

/// Settings the updater needs.
#[derive(Debug, Clone)]
pub struct UpdaterConfig {
    /// Device id.
    pub device_id: DeviceId,
    /// Target id.
    pub target: String,
    /// Data dir.
    pub data_dir: PathBuf,
    /// Trial p99 budget (ms).
    pub latency_budget_ms: f64,
}

/// Publishes an up message (the MQTT layer queues it while offline).
pub type Publish = Arc<dyn Fn(Up) + Send + Sync>;

/// The driver: owns the persisted state and performs actions.
pub struct Updater {
    cfg: UpdaterConfig,
    store: Store,
    slots: Slots,
    trust: TrustStore,
    engine: Arc<Engine>,
    status: Arc<Mutex<StatusInfo>>,
    publish: Publish,
    state: State,
    pending: std::collections::VecDeque<Event>,
    vm: Option<VerifiedManifest>,
    verified: Option<VerifiedBundle>,
    in_flight: BTreeSet<u32>,
    last_progress: Instant,
    stalls: u32,
    /// Where `Down::Config` updates go (see [`crate::settings`]).
    settings: Option<tokio::sync::watch::Sender<crate::settings::RuntimeSettings>>,
}

impl std::fmt::Debug for Updater {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Updater")
            .field("state", &self.state.name())
            .finish()
    }
}

fn b64() -> base64::engine::GeneralPurpose {
    base64::engine::general_purpose::STANDARD
}

impl Updater {
    /// Creates the driver with the persisted state (Idle when none).
    #[allow(clippy::too_many_arguments)]
    pub fn new(
        cfg: UpdaterConfig,
        store: Store,
        slots: Slots,
        trust: TrustStore,
        engine: Arc<Engine>,
        status: Arc<Mutex<StatusInfo>>,
        publish: Publish,
    ) -> Self {
        let state = store
            .get_json::<State>(keys::UPDATE)
            .ok()
            .flatten()
            .unwrap_or(State::Idle);
        Updater {
            cfg,
            store,
            slots,
            trust,
            engine,
            status,
            publish,
            state,
            pending: Default::default(),
            vm: None,
            verified: None,
            in_flight: BTreeSet::new(),
            last_progress: Instant::now(),
            stalls: 0,
            settings: None,
        }
    }

    /// Applies the server's `Down::Config` to `tx` (validated, persisted
    /// first); without this, config commands are logged and ignored.
    #[must_use]
    pub fn with_settings(
        mut self,
        tx: tokio::sync::watch::Sender<crate::settings::RuntimeSettings>,
    ) -> Self {
        self.settings = Some(tx);
        self
    }

    fn on_config(&mut self, u: &edgefleet_protocol::messages::ConfigUpdate) {
        let Some(tx) = &self.settings else {
            tracing::warn!("config command ignored: no runtime settings channel");
            return;
        };
        let next = match tx.borrow().apply(u) {
            Ok(n) => n,
            Err(e) => {
                tracing::warn!(error = %e, "config command rejected");
                return;
            }
        };
        // Persisted before it takes effect, like every other state change.
        if let Err(e) = crate::settings::persist(&self.store, u) {
            tracing::error!(error = %e, "config command not stored; not applied");
            return;
        }
        tracing::info!(?next, "config command applied");
        tx.send_replace(next);
    }

    /// Current state.
    pub fn state(&self) -> &State {
        &self.state
    }

    /// Resumes or rolls back from the persisted state.
    pub fn recover(&mut self) {
        tracing::info!(state = self.state.name(), "recovering update state");
        self.step(Event::Boot);
    }

    /// Runs the updater loop until [`Input::Shutdown`] or the channel closes.
    pub fn run(mut self, rx: mpsc::Receiver<Input>) {
        self.recover();
        loop {
            match rx.recv_timeout(Duration::from_millis(200)) {
                Ok(Input::Shutdown) | Err(mpsc::RecvTimeoutError::Disconnected) => break,
                Ok(Input::Down(d)) => self.on_down(d),
                Ok(Input::Chunk(c)) => self.on_chunk(c),
                Err(mpsc::RecvTimeoutError::Timeout) => {}
            }
            self.tick();
        }
        let _ = self.store.flush();
    }

    fn step(&mut self, event: Event) {
        self.pending.push_back(event);
        while let Some(ev) = self.pending.pop_front() {
            // The job the event happened to: a transition back to Idle drops
            // it from the state, but its Report/Refuse actions still name it.
            let job = self.state.job().cloned();
            let (new, actions) = next(&self.state, ev.clone());
            if new != self.state || !actions.is_empty() {
                log_event(&ev, job.as_ref());
            }
            if new != self.state {
                // Design: persist (flushed) BEFORE any side effect of the new state.
                if let Err(e) = self.store.put_json(keys::UPDATE, &new) {
                    tracing::error!(error = %e, "cannot persist update state; staying put");
                    return;
                }
                tracing::debug!(from = self.state.name(), to = new.name(), "update state");
                self.state = new;
                self.set_status();
                fault_pause(self.state.name());
            }
            for a in actions {
                self.act(a, job.as_ref());
            }
        }
    }

    fn set_status(&self) {
        if let Ok(mut s) = self.status.lock() {
            s.update_state = self.state.name().into();
            let meta = self.slots.meta();
            s.active = meta
                .active
                .and_then(|x| self.slots.info(x))
                .map(|i| i.release);
            s.previous = meta
                .previous
                .and_then(|x| self.slots.info(x))
                .map(|i| i.release);
        }
    }

    fn report(
        &self,
        kind: EventKind,
        release: ReleaseRef,
        rollout: Option<String>,
        reason: Option<String>,
        detail: Option<String>,
    ) {
        let seq = self.store.next_event_seq().unwrap_or(0);
        tracing::debug!(
            ?kind,
            ?reason,
            ?detail,
            release = release.release,
            "update event reported"
        );
        (self.publish)(Up::Event(UpdateEvent {
            device_id: self.cfg.device_id.clone(),
            rollout_id: rollout,
            release,
            kind,
            reason,
            detail,
            seq,
        }));
    }

    fn on_down(&mut self, d: Down) {
        match d {
            Down::UpdateOffer(o) => self.on_offer(o),
            Down::Cancel { rollout_id } => {
                if self.state.job().is_some_and(|j| j.rollout_id == rollout_id) {
                    self.step(Event::Cancel);
                }
            }
            Down::Rollback { reason } => self.step(Event::RollbackCommand(reason)),
            Down::Config(c) => self.on_config(&c),
            // Data capture is handled by the MQTT session (crate::capture);
            // these never reach the updater there.
            Down::CaptureRequest(_) | Down::CaptureAck(_) => {}
        }
    }

    fn on_offer(&mut self, o: UpdateOffer) {
        let reject = |s: &Self, code: &str, detail: String| {
            tracing::info!(
                event = "offer_refused",
                release = %label(&o.release),
                rollout = %o.rollout_id,
                reason = code,
                detail = %detail,
                "update offer refused"
            );
            s.report(
                EventKind::Rejected,
                o.release.clone(),
                Some(o.rollout_id.clone()),
                Some(code.into()),
                Some(detail),
            );
        };
        // Design: an experiment whose shadow arm won promotes its candidate
        // with an ordinary (commit) offer of the same release. It may arrive
        // before the cancel of the shadow rollout, so it ends the shadow
        // itself, then is handled as any offer.
        if let State::Trial { job, .. } = &self.state {
            if job.trial.end == TrialEnd::Discard
                && o.trial.end == TrialEnd::Commit
                && job.release == o.release
            {
                let why = format!("promoted by rollout {}", o.rollout_id);
                self.step(Event::RollbackCommand(why));
            }
        }
        if let Some(job) = self.state.job() {
            if job.release.release != o.release.release || job.release.model != o.release.model {
                reject(
                    self,
                    "busy",
                    format!(
                        "update of release {} in state {}",
                        job.release.release,
                        self.state.name()
                    ),
                );
            }
            return;
        }
        // Design: an offer is delivered at least once (QoS 1, and a restarted
        // server re-sends the offers of waves in progress): an offer of the
        // release this device already runs committed is answered as committed,
        // not refused as a downgrade of itself.
        if self.engine.active().is_some_and(|m| m.release == o.release) {
            tracing::info!(
                event = "offer_already_active",
                release = %label(&o.release),
                rollout = %o.rollout_id,
                "update offer for the active release: reported committed"
            );
            return self.report(
                EventKind::Committed,
                o.release.clone(),
                Some(o.rollout_id.clone()),
                None,
                Some("already active".into()),
            );
        }
        if let Ok(Some(why)) = self.store.refused(&o.release.model, o.release.release) {
            return reject(
                self,
                "refused_release",
                format!("release {} was refused before: {why}", o.release.release),
            );
        }
        let (mb, sig) = match o.manifest_and_signature() {
            Ok(x) => x,
            Err(e) => return reject(self, "malformed_offer", e.to_string()),
        };
        if let Err(e) = o.trial.validate() {
            return reject(self, "malformed_offer", e.to_string());
        }
        let floor = self.store.floor().unwrap_or(u64::MAX);
        let policy = Policy::device(self.cfg.target.clone(), floor, crate::agent_version());
        let vm = match SignedManifest::parse(mb.clone(), &sig)
            .and_then(|s| s.verify(&self.trust, &policy))
        {
            Ok(vm) => vm,
            Err(e) => return reject(self, e.code(), e.to_string()),
        };
        let m = vm.manifest();
        let release = crate::slots::release_ref(m);
        if let Ok(Some(why)) = self.store.refused(&release.model, release.release) {
            return reject(
                self,
                "refused_release",
                format!("release {} was refused before: {why}", release.release),
            );
        }
        let job = Job {
            rollout_id: o.rollout_id,
            release,
            manifest_b64: b64().encode(&mb),
            signature_b64: b64().encode(&sig),
            body_sha256: m.body.sha256.to_hex(),
            trial: o.trial,
        };
        let _ = self.store.remove(keys::DL_BITMAP);
        let _ = std::fs::remove_file(self.part_path());
        self.vm = Some(vm);
        self.step(Event::OfferAccepted(job));
    }

    /// Re-verifies the job's manifest (after a restart the verified type is gone).
    fn manifest(&mut self) -> Result<VerifiedManifest, edgefleet_bundle::Error> {
        if let Some(vm) = &self.vm {
            if self
                .state
                .job()
                .is_some_and(|j| j.body_sha256 == vm.manifest().body.sha256.to_hex())
            {
                return Ok(vm.clone());
            }
        }
        let job = self
            .state
            .job()
            .ok_or_else(|| edgefleet_bundle::Error::Payload {
                file: "update".into(),
                reason: "no job".into(),
            })?;
        let mb = b64().decode(&job.manifest_b64).unwrap_or_default();
        let sig = b64().decode(&job.signature_b64).unwrap_or_default();
        // The floor only rises at commit, so the accepted manifest still passes.
        let floor = self.store.floor().unwrap_or(u64::MAX);
        let policy = Policy::device(self.cfg.target.clone(), floor, crate::agent_version());
        let vm = SignedManifest::parse(mb, &sig)?.verify(&self.trust, &policy)?;
        self.vm = Some(vm.clone());
        Ok(vm)
    }

    fn part_path(&self) -> PathBuf {
        self.cfg.data_dir.join("download").join("body.part")
    }

    fn bitmap(&self, count: usize) -> Vec<u8> {
        let mut b = self
            .store
            .get_raw(keys::DL_BITMAP)
            .ok()
            .flatten()
            .unwrap_or_default();
        b.resize(count.div_ceil(8), 0);
        b
    }

    fn missing(&self, count: usize) -> Vec<u32> {
        let b = self.bitmap(count);
        (0..count as u32)
            .filter(|i| b[*i as usize / 8] & (1 << (i % 8)) == 0)
            .collect()
    }

    fn request_chunks(&mut self) {
        let vm = match self.manifest() {
            Ok(vm) => vm,
            Err(e) => return self.step(Event::DownloadFailed(e.code().into(), e.to_string())),
        };
        let count = vm.manifest().body.chunks.len();
        let missing = self.missing(count);
        if missing.is_empty() {
            return self.step(Event::DownloadComplete);
        }
        let first = missing[0];
        let mut n = 1;
        while (n as usize) < missing.len()
            && n < MAX_CHUNKS_PER_REQUEST
            && missing[n as usize] == first + n
        {
            n += 1;
        }
        self.in_flight = (first..first + n).collect();
        self.last_progress = Instant::now();
        (self.publish)(Up::ChunkRequest(ChunkRequest {
            device_id: self.cfg.device_id.clone(),
            body_sha256: vm.manifest().body.sha256.to_hex(),
            first,
            count: n,
        }));
    }

    fn on_chunk(&mut self, c: ChunkData) {
        if !matches!(self.state, State::Downloading { .. }) {
            return;
        }
        let Ok(vm) = self.manifest() else { return };
        let m = vm.manifest();
        if c.body_sha256 != m.body.sha256.0 {
            return;
        }
        if let Err(e) = vm.check_chunk(c.index as usize, &c.data) {
            tracing::warn!(index = c.index, error = %e, "chunk rejected");
            return;
        }
        let path = self.part_path();
        let res = (|| -> std::io::Result<()> {
            std::fs::create_dir_all(path.parent().unwrap_or(&self.cfg.data_dir))?;
            let f = OpenOptions::new()
                .create(true)
                .truncate(false)
                .write(true)
                .open(&path)?;
            f.write_all_at(&c.data, u64::from(c.index) * u64::from(m.body.chunk_size))?;
            f.sync_data()
        })();
        if let Err(e) = res {
            return self.step(Event::DownloadFailed(
                "io".into(),
                format!("{}: {e}", path.display()),
            ));
        }
        let count = m.body.chunks.len();
        let mut b = self.bitmap(count);
        b[c.index as usize / 8] |= 1 << (c.index % 8);
        if let Err(e) = self.store.put_raw(keys::DL_BITMAP, &b) {
            tracing::error!(error = %e, "cannot persist the chunk bitmap");
        }
        self.in_flight.remove(&c.index);
        self.last_progress = Instant::now();
        self.stalls = 0;
        if self.in_flight.is_empty() {
            self.request_chunks();
        }
    }

    fn verify_body(&mut self) -> Result<VerifiedBundle, (String, String)> {
        let vm = self
            .manifest()
            .map_err(|e| (e.code().to_string(), e.to_string()))?;
        let path = self.part_path();
        let body = std::fs::read(&path)
            .map_err(|e| ("io".to_string(), format!("{}: {e}", path.display())))?;
        let base = match (vm.manifest().delta_from, self.slots.meta().active) {
            (Some(_), Some(a)) => Some(
                self.slots
                    .payload_tar(a)
                    .map_err(|e| ("delta_base".to_string(), e.to_string()))?,
            ),
            _ => None,
        };
        vm.verify_body(body, base.as_deref())
            .map_err(|e| (e.code().to_string(), e.to_string()))
    }

    /// Performs `a`; `prev` is the job of the state the transition left.
    fn act(&mut self, a: Action, prev: Option<&Job>) {
        let job = self.state.job().or(prev).cloned();
        let rel = job.as_ref().map(|j| j.release.clone());
        let rollout = job.as_ref().map(|j| j.rollout_id.clone());
        match a {
            Action::Report(kind, reason, detail) => {
                if let Some(r) = rel {
                    self.report(kind, r, rollout, reason, detail);
                }
            }
            Action::RequestChunks => self.request_chunks(),
            Action::VerifyBody => match self.verify_body() {
                Ok(vb) => {
                    self.verified = Some(vb);
                    self.step(Event::Verified);
                }
                Err((c, d)) => self.step(Event::VerifyFailed(c, d)),
            },
            Action::Install => {
                let vb = match self.verified.take() {
                    Some(v) => Ok(v),
                    None => self.verify_body(),
                };
                let vb = match vb {
                    Ok(v) => v,
                    Err((c, d)) => return self.step(Event::StageFailed(c, d)),
                };
                let slot = self.slots.inactive();
                let mut meta = self.slots.edit();
                if meta.previous == Some(slot) {
                    meta.previous = None;
                }
                meta.staged = None;
                if let Err(e) = self.slots.commit(&self.store, meta) {
                    return self.step(Event::StageFailed("io".into(), e.to_string()));
                }
                if let Err(e) = self.slots.install(slot, &vb, false) {
                    return self.step(Event::StageFailed("io".into(), e.to_string()));
                }
                meta.staged = Some(slot);
                if let Err(e) = self.slots.commit(&self.store, meta) {
                    return self.step(Event::StageFailed("io".into(), e.to_string()));
                }
                self.set_status();
                self.step(Event::Staged(slot));
            }
            Action::StartTrial(slot) => self.start_trial(slot, job.as_ref()),
            Action::Commit(slot) => {
                let candidate = self.engine.end_trial();
                let model = match candidate {
                    Some(m) if self.slots.dir(slot).exists() => Ok(m),
                    _ => self.load_slot(slot).map(Arc::new),
                };
                let mut meta = self.slots.edit();
                if meta.active != Some(slot) {
                    meta.previous = meta.active;
                    meta.active = Some(slot);
                }
                meta.staged = None;
                let res = self
                    .slots
                    .commit(&self.store, meta)
                    .and_then(|_| self.slots.mark_activated(slot, true))
                    .map_err(|e| e.to_string())
                    .and_then(|_| {
                        self.store
                            .raise_floor(rel.as_ref().map_or(0, |r| r.release))
                            .map_err(|e| e.to_string())
                    });
                if let Err(e) = res {
                    tracing::error!(error = %e, "commit failed to persist");
                }
                match model {
                    Ok(m) => self.engine.set_active(Some(m)),
                    Err(e) => tracing::error!(error = %e, "committed slot does not load"),
                }
                self.set_status();
                tracing::info!(
                    event = "committed",
                    release = %rel.as_ref().map(label).unwrap_or_default(),
                    slot = slot.as_str(),
                    "update committed: the candidate is active"
                );
            }
            Action::Rollback(slot) => {
                self.engine.end_trial();
                let mut meta = self.slots.edit();
                if meta.staged == Some(slot) {
                    meta.staged = None;
                }
                if let Err(e) = self.slots.commit(&self.store, meta) {
                    tracing::error!(error = %e, "rollback failed to persist");
                }
                if let State::RolledBack { reason, detail, .. } = &self.state {
                    self.engine.count_rollback(reason);
                    tracing::info!(
                        event = "rolled_back",
                        release = %rel.as_ref().map(label).unwrap_or_default(),
                        slot = slot.as_str(),
                        reason = %reason,
                        detail = %detail,
                        "update rolled back: the candidate is dropped"
                    );
                }
                self.set_status();
            }
            Action::RollbackActive(reason) => self.rollback_active(reason),
            Action::Refuse(reason) => {
                if let Some(r) = rel {
                    if let Err(e) = self.store.refuse(&r.model, r.release, &reason) {
                        tracing::error!(error = %e, "cannot record the refused release");
                    }
                }
            }
            Action::CleanupDownload => {
                let _ = std::fs::remove_file(self.part_path());
                let _ = self.store.remove(keys::DL_BITMAP);
                self.verified = None;
                self.vm = None;
            }
            Action::Finish => self.pending.push_back(Event::Done),
        }
    }

    fn load_slot(&self, slot: SlotName) -> Result<Model, String> {
        let c = self
            .slots
            .check(slot, &self.trust, &self.cfg.target)
            .map_err(|e| e.to_string())?;
        Model::load_on(&c.files_dir, c.info.release, self.engine.compute())
            .map_err(|e| e.to_string())
    }

    /// Loads the candidate in `slot`, runs its golden vectors, measures its
    /// own latency reference and starts the live trial. A candidate that
    /// does not load ends the trial with `load_failed` (the detail is the
    /// load error); one that fails its golden vectors with the self-test's code.
    fn start_trial(&mut self, slot: SlotName, job: Option<&Job>) {
        let policy = job.map_or_else(TrialPolicy::default, |j| j.trial.clone());
        let m = match self.load_slot(slot) {
            Ok(m) => m,
            Err(e) => return self.step(Event::TrialFailed(rollback_reason::LOAD_FAILED.into(), e)),
        };
        if let Err(e) = m.self_test() {
            return self.step(Event::TrialFailed(e.code().into(), e.detail().into()));
        }
        let reference = LatencyReference {
            same_model: self
                .engine
                .active()
                .is_some_and(|a| a.release.model == m.release.model),
            own_ms: golden_median_ms(&m),
        };
        let release = label(&m.release);
        let mode = self
            .engine
            .start_trial(Arc::new(m), policy.mode, policy.end, reference);
        tracing::info!(
            event = "trial_started",
            release = %release,
            slot = slot.as_str(),
            mode = %mode,
            policy = %policy,
            same_model = reference.same_model,
            own_ms = %reference.own_ms.map_or("-".into(), |v| format!("{v:.3}")),
            "trial started"
        );
    }

    fn rollback_active(&mut self, reason: String) {
        let meta = self.slots.meta();
        let (Some(active), Some(prev)) = (meta.active, meta.previous) else {
            if let Some(r) = meta
                .active
                .and_then(|a| self.slots.info(a))
                .map(|i| i.release)
            {
                tracing::info!(
                    event = "rollback_refused",
                    release = %label(&r),
                    reason = "no_previous",
                    "server rollback refused: no previous slot"
                );
                self.report(
                    EventKind::Failed,
                    r,
                    None,
                    Some("no_previous".into()),
                    Some(reason),
                );
            }
            return;
        };
        let old = self.slots.info(active).map(|i| i.release);
        let m = match self
            .load_slot(prev)
            .and_then(|m| m.self_test().map(|_| m).map_err(|e| e.detail().to_string()))
        {
            Ok(m) => m,
            Err(e) => {
                if let Some(r) = old {
                    tracing::info!(
                        event = "rollback_refused",
                        release = %label(&r),
                        reason = "previous_unusable",
                        detail = %e,
                        "server rollback refused: the previous slot does not load"
                    );
                    self.report(
                        EventKind::Failed,
                        r,
                        None,
                        Some("previous_unusable".into()),
                        Some(e),
                    );
                }
                return;
            }
        };
        let mut next = meta;
        next.active = Some(prev);
        next.previous = Some(active);
        if let Err(e) = self
            .slots
            .commit(&self.store, next)
            .and_then(|_| self.slots.mark_activated(prev, false))
        {
            tracing::error!(error = %e, "server rollback failed to persist");
            return;
        }
        let now_active = label(&m.release);
        self.engine.set_active(Some(Arc::new(m)));
        self.engine.count_rollback("server_command");
        self.set_status();
        tracing::info!(
            event = "rolled_back",
            release = %old.as_ref().map(label).unwrap_or_default(),
            active = %now_active,
            reason = "server_command",
            detail = %reason,
            "server rollback: the previous slot is active again"
        );
        if let Some(r) = old {
            let _ = self.store.refuse(&r.model, r.release, "server_command");
            self.report(
                EventKind::RolledBack,
                r,
                None,
                Some("server_command".into()),
                Some(reason),
            );
        }
    }

    fn tick(&mut self) {
        match &self.state {
            State::Downloading { .. } if self.last_progress.elapsed() > Duration::from_secs(3) => {
                self.stalls += 1;
                if self.stalls > 40 {
                    self.stalls = 0;
                    return self.step(Event::DownloadFailed(
                        "timeout".into(),
                        "no chunk for 2 minutes".into(),
                    ));
                }
                self.request_chunks();
            }
            State::Trial { job, .. } => {
                let policy = job.trial.clone();
                self.probe_idle_trial(&policy);
                if let Some(ev) = self.judge_trial(&policy) {
                    self.step(ev);
                }
            }
            _ => {}
        }
    }

    /// A device without live traffic (no input source, no API caller) would
    /// stay in trial forever. Once the window is over with fewer than
    /// `min_requests` live requests, the agent feeds the candidate its own
    /// golden inputs through the engine (serving model and shadow, exactly
    /// like a live request, at most [`PROBES_PER_TICK`] per tick), so the
    /// NaN, error-rate and latency checks still judge it on measurements.
    fn probe_idle_trial(&self, p: &TrialPolicy) {
        let Some(t) = self.engine.trial() else { return };
        if t.started.elapsed() < Duration::from_secs(p.window_s) {
            return;
        }
        let seen = t.stats.lock().map_or(0, |s| s.candidate.requests);
        let Some(golden) = t.model.golden_inputs() else {
            return;
        };
        let missing = p.min_requests.saturating_sub(seen).min(PROBES_PER_TICK);
        if missing > 0 && seen == 0 {
            tracing::info!(
                release = %crate::engine::label(&t.model.release),
                probes = p.min_requests,
                "trial: no live requests in the window; probing with golden inputs"
            );
        }
        for _ in 0..missing {
            let _ = self.engine.run_now(&golden, None);
        }
    }

    /// Trial verdict from what the engine observed, or `None` to keep waiting.
    fn judge_trial(&self, p: &TrialPolicy) -> Option<Event> {
        let t = self.engine.trial()?;
        let s = t.stats.lock().ok()?;
        judge(
            &s,
            &t.reference,
            p,
            self.cfg.latency_budget_ms,
            t.started.elapsed(),
        )
    }
}

/// The trial verdict from what was observed so far, or `None` to keep
/// waiting. Pure; the checks run in this order: NaN/Inf outputs, then (with
/// at least [`MIN_SAMPLES`] candidate requests) the error rate, the target's
/// latency budget and the latency ratio ([`check_ratio`]); finally the
/// window: it passes once `window_s` is over (`elapsed`) and the candidate
/// has served `min_requests`.
pub fn judge(
    s: &TrialStats,
    reference: &LatencyReference,
    p: &TrialPolicy,
    budget_ms: f64,
    elapsed: Duration,
) -> Option<Event> {
    if let Some(nf) = &s.non_finite {
        return Some(trial_failed(rollback_reason::NAN_OUTPUT, nf.clone()));
    }
    let n = s.candidate.requests;
    if n >= MIN_SAMPLES {
        let verdict = check_error_rate(s, p)
            .or_else(|| check_budget(s, budget_ms))
            .or_else(|| check_ratio(s, reference, p));
        if verdict.is_some() {
            return verdict;
        }
    }
    (elapsed >= Duration::from_secs(p.window_s) && n >= p.min_requests)
        .then_some(Event::TrialPassed)
}

fn trial_failed(reason: &str, detail: String) -> Event {
    Event::TrialFailed(reason.into(), detail)
}

fn check_error_rate(s: &TrialStats, p: &TrialPolicy) -> Option<Event> {
    let (n, errors) = (s.candidate.requests, s.candidate.errors);
    (errors as f64 / n.max(1) as f64 > p.max_error_rate).then(|| {
        trial_failed(
            rollback_reason::ERROR_RATE,
            format!("{errors} of {n} requests failed"),
        )
    })
}

/// The target profile's budget (ms) against the candidate's p99.
fn check_budget(s: &TrialStats, budget_ms: f64) -> Option<Event> {
    let p99 = s.candidate.quantile_ms(0.99);
    (p99 > budget_ms).then(|| {
        trial_failed(
            rollback_reason::LATENCY_BUDGET,
            format!("p99 {p99:.2} ms over the target budget {budget_ms:.2} ms"),
        )
    })
}

/// `max_p99_ratio` against the previous release of the same model, measured
/// on the same inputs (shadow baseline). A different model, or a trial with no
/// baseline (serve mode, first install), is judged by the target's budget
/// alone ([`check_budget`]): another model's latency says nothing about this
/// one, and its own golden-input median at trial start
/// ([`LatencyReference::own_ms`], logged with `trial_started`) measures the
/// machine's load as much as the model (a demo beside a `cargo build` rolled
/// back a first install of ppocr cls at p50 49 ms against its own 3.6 ms).
///
/// Design: the p99 of fewer than [`P99_MIN_SAMPLES`] requests is their
/// maximum, i.e. one scheduler hiccup (a loaded 2-core CI machine stalled a
/// 0.01 ms model for 3.6 ms); below that the ratio compares medians, which a
/// really slower model moves too. The baseline is floored at
/// [`RATIO_FLOOR_MS`]: sub-millisecond latencies are scheduler noise.
fn check_ratio(s: &TrialStats, r: &LatencyReference, p: &TrialPolicy) -> Option<Event> {
    let n = s.candidate.requests;
    if !r.same_model || s.baseline.requests < MIN_SAMPLES {
        return None;
    }
    let (q, label) = if n.min(s.baseline.requests) >= P99_MIN_SAMPLES {
        (0.99, "p99")
    } else {
        (0.5, "p50")
    };
    let new = s.candidate.quantile_ms(q);
    let base = s.baseline.quantile_ms(q).max(RATIO_FLOOR_MS);
    (new > p.max_p99_ratio * base).then(|| {
        trial_failed(
            rollback_reason::LATENCY_BUDGET,
            format!(
                "{label} {new:.2} ms over {} x the previous release's {base:.2} ms",
                p.max_p99_ratio
            ),
        )
    })
}

/// The median latency (ms) of [`REFERENCE_RUNS`] runs of `m`'s golden
/// inputs; `None` without golden vectors or when a run fails.
fn golden_median_ms(m: &Model) -> Option<f64> {
    let inputs = m.golden_inputs()?;
    let mut ms = Vec::with_capacity(REFERENCE_RUNS);
    for _ in 0..REFERENCE_RUNS {
        let t = Instant::now();
        m.run(&inputs, None).ok()?;
        ms.push(t.elapsed().as_secs_f64() * 1e3);
    }
    ms.sort_by(f64::total_cmp);
    ms.get(ms.len() / 2).copied()
}

/// The info line of an event the transition table accepted (`job`: the job
/// of the state it happened in).
fn log_event(ev: &Event, job: Option<&Job>) {
    let release = job.map(|j| label(&j.release)).unwrap_or_default();
    let rollout = job.map(|j| j.rollout_id.as_str()).unwrap_or_default();
    match ev {
        Event::OfferAccepted(j) => tracing::info!(
            event = "offer_accepted",
            release = %label(&j.release),
            rollout = %j.rollout_id,
            "update offer accepted: downloading"
        ),
        Event::DownloadComplete => {
            tracing::info!(event = "download_done", %release, %rollout, "bundle downloaded")
        }
        Event::Verified => {
            tracing::info!(event = "verified", %release, %rollout, "bundle verified")
        }
        Event::Staged(slot) => tracing::info!(
            event = "staged",
            %release,
            %rollout,
            slot = slot.as_str(),
            "bundle installed into the inactive slot"
        ),
        Event::TrialPassed => {
            tracing::info!(event = "trial_passed", %release, %rollout, "trial passed")
        }
        Event::TrialFailed(reason, detail) => tracing::info!(
            event = "trial_failed",
            %release,
            %rollout,
            %reason,
            %detail,
            "trial failed"
        ),
        Event::DownloadFailed(reason, detail)
        | Event::VerifyFailed(reason, detail)
        | Event::StageFailed(reason, detail) => {
            let name = match ev {
                Event::DownloadFailed(..) => "download_failed",
                Event::VerifyFailed(..) => "verify_failed",
                _ => "stage_failed",
            };
            tracing::info!(
                event = name,
                %release,
                %rollout,
                %reason,
                %detail,
                "update failed; the active slot is unchanged"
            );
        }
        Event::RollbackCommand(detail) => tracing::info!(
            event = "rollback_ordered",
            %release,
            %rollout,
            %detail,
            "the server ordered a rollback"
        ),
        Event::Cancel => tracing::info!(
            event = "rollout_cancelled",
            %release,
            %rollout,
            "the server cancelled the rollout"
        ),
        Event::Boot | Event::Done => {}
    }
}

/// Golden-input probes run per tick when a trial saw too little live traffic.
const PROBES_PER_TICK: u64 = 5;

/// `EDGEFLEET_FAULT_PAUSE_IN=<state>`: sleep after persisting `<state>`.
fn fault_pause(state: &str) {
    if let Ok(v) = std::env::var("EDGEFLEET_FAULT_PAUSE_IN") {
        if v == state {
            tracing::warn!(
                state,
                "EDGEFLEET_FAULT_PAUSE_IN: pausing 60 s (fault injection)"
            );
            std::thread::sleep(Duration::from_secs(60));
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn job() -> Job {
        Job {
            rollout_id: "r1".into(),
            release: ReleaseRef {
                model: "m".into(),
                release: 2,
                version: "1.0.2".into(),
            },
            manifest_b64: String::new(),
            signature_b64: String::new(),
            body_sha256: "00".into(),
            trial: TrialPolicy::default(),
        }
    }

    #[test]
    fn transition_table() {
        use Action as A;
        use Event as E;
        use SlotName::B;
        let j = job();
        let dl = State::Downloading { job: j.clone() };
        let ver = State::Verifying { job: j.clone() };
        let stg = State::Staging { job: j.clone() };
        let tr = |boots| State::Trial {
            job: j.clone(),
            slot: B,
            boots,
        };
        let com = State::Committed {
            job: j.clone(),
            slot: B,
        };
        let rb = |r: &str, d: &str| State::RolledBack {
            job: j.clone(),
            slot: B,
            reason: r.into(),
            detail: d.into(),
        };
        let rb_actions = |r: &str, d: &str| {
            vec![
                A::Rollback(B),
                A::Refuse(r.into()),
                A::Report(EventKind::RolledBack, Some(r.into()), Some(d.into())),
                A::Finish,
            ]
        };
        let fail = |r: &str, d: &str, refuse: bool| {
            let mut v = vec![A::Report(EventKind::Failed, Some(r.into()), Some(d.into()))];
            if refuse {
                v.push(A::Refuse(r.into()));
            }
            v.push(A::CleanupDownload);
            v
        };
        let table: Vec<(State, Event, State, Vec<Action>)> = vec![
            (State::Idle, E::Boot, State::Idle, vec![A::CleanupDownload]),
            (
                State::Idle,
                E::OfferAccepted(j.clone()),
                dl.clone(),
                vec![
                    A::Report(EventKind::Downloading, None, None),
                    A::RequestChunks,
                ],
            ),
            (
                State::Idle,
                E::RollbackCommand("op".into()),
                State::Idle,
                vec![A::RollbackActive("op".into())],
            ),
            (State::Idle, E::TrialPassed, State::Idle, vec![]),
            (dl.clone(), E::Boot, dl.clone(), vec![A::RequestChunks]),
            (
                dl.clone(),
                E::DownloadComplete,
                ver.clone(),
                vec![A::VerifyBody],
            ),
            (
                dl.clone(),
                E::DownloadFailed("timeout".into(), "d".into()),
                State::Idle,
                fail("timeout", "d", false),
            ),
            (
                dl.clone(),
                E::Cancel,
                State::Idle,
                fail("cancelled", "server cancelled the rollout", false),
            ),
            (dl.clone(), E::OfferAccepted(j.clone()), dl.clone(), vec![]),
            (ver.clone(), E::Boot, ver.clone(), vec![A::VerifyBody]),
            (
                ver.clone(),
                E::Verified,
                stg.clone(),
                vec![A::Report(EventKind::Verified, None, None), A::Install],
            ),
            (
                ver.clone(),
                E::VerifyFailed("body_hash".into(), "d".into()),
                State::Idle,
                fail("body_hash", "d", true),
            ),
            (
                ver.clone(),
                E::RollbackCommand("op".into()),
                State::Idle,
                fail("server_command", "op", false),
            ),
            (stg.clone(), E::Boot, stg.clone(), vec![A::Install]),
            (
                stg.clone(),
                E::Staged(B),
                tr(0),
                vec![
                    A::Report(EventKind::Staged, None, None),
                    A::Report(EventKind::TrialStarted, None, None),
                    A::StartTrial(B),
                ],
            ),
            (
                stg.clone(),
                E::StageFailed("io".into(), "d".into()),
                State::Idle,
                fail("io", "d", false),
            ),
            (tr(0), E::Boot, tr(1), vec![A::StartTrial(B)]),
            (
                tr(1),
                E::Boot,
                rb("crash_loop", "2 agent restarts during the trial"),
                rb_actions("crash_loop", "2 agent restarts during the trial"),
            ),
            (
                tr(0),
                E::TrialPassed,
                com.clone(),
                vec![
                    A::Commit(B),
                    A::Report(EventKind::Committed, None, None),
                    A::Finish,
                ],
            ),
            (
                tr(0),
                E::TrialFailed("nan_output".into(), "d".into()),
                rb("nan_output", "d"),
                rb_actions("nan_output", "d"),
            ),
            (
                tr(0),
                E::TrialFailed("load_failed".into(), "d".into()),
                rb("load_failed", "d"),
                rb_actions("load_failed", "d"),
            ),
            (
                tr(0),
                E::TrialFailed("golden_mismatch".into(), "d".into()),
                rb("golden_mismatch", "d"),
                rb_actions("golden_mismatch", "d"),
            ),
            (
                tr(0),
                E::TrialFailed("latency_budget".into(), "d".into()),
                rb("latency_budget", "d"),
                rb_actions("latency_budget", "d"),
            ),
            (
                tr(0),
                E::TrialFailed("error_rate".into(), "d".into()),
                rb("error_rate", "d"),
                rb_actions("error_rate", "d"),
            ),
            (
                tr(0),
                E::RollbackCommand("op".into()),
                rb("server_command", "op"),
                rb_actions("server_command", "op"),
            ),
            (
                tr(0),
                E::Cancel,
                rb("cancelled", "server cancelled the rollout"),
                rb_actions("cancelled", "server cancelled the rollout"),
            ),
            (
                com.clone(),
                E::Boot,
                com.clone(),
                vec![
                    A::Commit(B),
                    A::Report(EventKind::Committed, None, None),
                    A::Finish,
                ],
            ),
            (com.clone(), E::Done, State::Idle, vec![A::CleanupDownload]),
            (
                rb("nan_output", "d"),
                E::Boot,
                rb("nan_output", "d"),
                rb_actions("nan_output", "d"),
            ),
            (
                rb("nan_output", "d"),
                E::Done,
                State::Idle,
                vec![A::CleanupDownload],
            ),
        ];
        for (i, (from, ev, want_state, want_actions)) in table.into_iter().enumerate() {
            let (s, a) = next(&from, ev.clone());
            assert_eq!(s, want_state, "row {i}: {} + {ev:?}", from.name());
            assert_eq!(a, want_actions, "row {i}: {} + {ev:?}", from.name());
        }
    }

    /// A shadow trial with `end: discard` never commits: passing, a
    /// rollback command, a cancel and a restart in `rolled_back` all end in
    /// `shadow_ended` without refusing the release; a failed trial still
    /// refuses it.
    #[test]
    fn shadow_discard_never_commits_and_does_not_refuse() {
        use Action as A;
        use Event as E;
        use SlotName::B;
        let mut j = job();
        j.trial.end = TrialEnd::Discard;
        let tr = State::Trial {
            job: j.clone(),
            slot: B,
            boots: 0,
        };
        let ended = |d: &str| {
            (
                State::RolledBack {
                    job: j.clone(),
                    slot: B,
                    reason: "shadow_ended".into(),
                    detail: d.into(),
                },
                vec![
                    A::Rollback(B),
                    A::Report(
                        EventKind::RolledBack,
                        Some("shadow_ended".into()),
                        Some(d.into()),
                    ),
                    A::Finish,
                ],
            )
        };
        for (ev, detail) in [
            (E::TrialPassed, "the shadow window passed"),
            (
                E::RollbackCommand("experiment over".into()),
                "experiment over",
            ),
            (E::Cancel, "server cancelled the rollout"),
        ] {
            let (s, a) = next(&tr, ev.clone());
            assert_eq!((s.clone(), a), ended(detail), "{ev:?}");
            assert_eq!(next(&s, E::Boot), ended(detail), "restart after {ev:?}");
        }
        let (_, a) = next(&tr, E::TrialFailed("nan_output".into(), "x".into()));
        assert!(a.contains(&A::Refuse("nan_output".into())), "{a:?}");
    }

    /// Trial stats: candidate latencies (ms, all successful) and the
    /// baseline's (the active model on the same inputs).
    fn observed(candidate_ms: &[f64], baseline_ms: &[f64]) -> TrialStats {
        let mut s = TrialStats::new();
        for &ms in candidate_ms {
            s.candidate.record(Duration::from_secs_f64(ms / 1e3), true);
        }
        for &ms in baseline_ms {
            s.baseline.record(Duration::from_secs_f64(ms / 1e3), true);
        }
        s
    }

    fn failure(v: Option<Event>) -> (String, String) {
        match v {
            Some(Event::TrialFailed(r, d)) => (r, d),
            other => panic!("expected a trial failure, got {other:?}"),
        }
    }

    const OVER: Duration = Duration::from_secs(11);
    const BUDGET_MS: f64 = 100.0;

    #[test]
    fn a_heavier_different_model_within_the_budget_passes() {
        // 50 ms per request, shadowing a 1 ms model of another name: judged
        // by the budget, not against the 1 ms.
        let s = observed(&[50.0; 20], &[1.0; 20]);
        let own = LatencyReference {
            same_model: false,
            own_ms: Some(40.0),
        };
        let p = TrialPolicy::default();
        assert_eq!(
            judge(&s, &own, &p, BUDGET_MS, OVER),
            Some(Event::TrialPassed)
        );
        // Without golden vectors only the budget applies.
        let none = LatencyReference {
            same_model: false,
            own_ms: None,
        };
        assert_eq!(
            judge(&s, &none, &p, BUDGET_MS, OVER),
            Some(Event::TrialPassed)
        );
        // The window is not over yet: no verdict.
        assert_eq!(judge(&s, &own, &p, BUDGET_MS, Duration::from_secs(9)), None);
    }

    #[test]
    fn a_new_release_of_the_same_model_is_judged_against_the_previous_one() {
        let s = observed(&[50.0; 20], &[1.0; 20]);
        let same = LatencyReference {
            same_model: true,
            own_ms: Some(40.0),
        };
        let (reason, detail) = failure(judge(&s, &same, &TrialPolicy::default(), BUDGET_MS, OVER));
        assert_eq!(reason, "latency_budget");
        assert!(
            detail.starts_with("p50 ")
                && detail.ends_with("over 3 x the previous release's 1.00 ms"),
            "{detail}"
        );
        // In serve mode there is no baseline: the budget alone applies.
        let serve = observed(&[50.0; 20], &[]);
        assert_eq!(
            judge(&serve, &same, &TrialPolicy::default(), BUDGET_MS, OVER),
            Some(Event::TrialPassed)
        );
    }

    #[test]
    fn a_different_model_is_judged_by_the_budget_alone() {
        let p = TrialPolicy::default();
        // 5 x slower than its own golden median at trial start (a busy
        // machine), inside the budget: passes.
        let slow = observed(&[50.0; 20], &[1.0; 20]);
        let own10 = LatencyReference {
            same_model: false,
            own_ms: Some(10.0),
        };
        assert_eq!(
            judge(&slow, &own10, &p, BUDGET_MS, OVER),
            Some(Event::TrialPassed)
        );
        let over_budget = observed(&[150.0; 20], &[1.0; 20]);
        let own140 = LatencyReference {
            same_model: false,
            own_ms: Some(140.0),
        };
        let (reason, detail) = failure(judge(&over_budget, &own140, &p, BUDGET_MS, OVER));
        assert_eq!(reason, "latency_budget");
        assert!(
            detail.starts_with("p99 ") && detail.ends_with("over the target budget 100.00 ms"),
            "{detail}"
        );
    }

    #[test]
    fn errors_and_non_finite_outputs_fail_before_latency() {
        let p = TrialPolicy::default();
        let r = LatencyReference {
            same_model: false,
            own_ms: None,
        };
        let mut s = observed(&[1.0; 19], &[]);
        s.candidate.record(Duration::from_millis(1), false);
        let (reason, detail) = failure(judge(&s, &r, &p, BUDGET_MS, OVER));
        assert_eq!(
            (reason.as_str(), detail.as_str()),
            ("error_rate", "1 of 20 requests failed")
        );
        s.non_finite = Some("y[0] is NaN".into());
        assert_eq!(
            failure(judge(&s, &r, &p, BUDGET_MS, OVER)),
            ("nan_output".to_string(), "y[0] is NaN".to_string())
        );
    }

    #[test]
    fn state_round_trips_through_json() {
        let s = State::Trial {
            job: job(),
            slot: SlotName::B,
            boots: 1,
        };
        let j = serde_json::to_string(&s).expect("json");
        assert_eq!(serde_json::from_str::<State>(&j).expect("parse"), s);
    }
}
