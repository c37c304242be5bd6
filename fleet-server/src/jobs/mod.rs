//! Retraining jobs (issue #13; docs/loop.md).
//!
//! A job takes a cohort (a group's devices running one model) from captured
//! data to a proven-better release: the server cuts a dataset version from
//! the cohort's captures ([`crate::datasets`]), a training worker pulls the
//! job under a lease ([`claim`]), trains, compiles, uploads the signed
//! bundles and reports its gate numbers ([`complete`]); the server checks
//! the gate itself and moves the job on. Every state change goes through the
//! transition table of [`machine`] and is written to the `jobs` tree before
//! it is answered, so a job survives a server restart; a worker that stops
//! heart-beating loses its lease and the job is offered again
//! ([`expire_leases`]) until `max_attempts`.
//!
//! The worker, not the job, decides *what* runs (the built-in trainer or the
//! operator's own command, configured on the worker): a job only carries
//! data references and parameters, so a server can never make a worker run
//! a command.

pub mod machine;

use std::sync::Arc;

use serde::{Deserialize, Serialize};
use serde_json::Value;

use crate::datasets::{self, CreateDataset, Dataset};
use crate::store::{self, now_ms};
use crate::{Error, Result, State};
pub use machine::{Event, JobState};

/// Default lease: a worker that has not sent a heartbeat for this long is
/// presumed dead and its job is offered again.
pub const DEFAULT_LEASE_S: u64 = 60;

/// Transitions kept per job (oldest dropped first).
pub const HISTORY_PER_JOB: usize = 200;

/// The acceptance gate of a candidate (issue #13, point 3).
#[derive(Debug, Clone, Copy, Serialize, Deserialize, PartialEq)]
#[serde(deny_unknown_fields)]
pub struct GateSpec {
    /// The candidate must beat the current release on the new data's
    /// held-out split by at least this much (metric units, e.g. accuracy
    /// points as a fraction). Default 0.0 (strictly better is not required;
    /// not worse is).
    #[serde(default)]
    pub min_improvement: f64,
    /// The candidate may lose at most this much on the previous test set.
    /// Default 0.01.
    #[serde(default = "default_max_regression")]
    pub max_regression: f64,
}

fn default_max_regression() -> f64 {
    0.01
}

impl Default for GateSpec {
    fn default() -> Self {
        Self {
            min_improvement: 0.0,
            max_regression: default_max_regression(),
        }
    }
}

/// `POST /v1/jobs` body (also made by the drift rule from a request).
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
#[serde(deny_unknown_fields)]
pub struct CreateJob {
    /// Group (the cohort).
    pub group: String,
    /// Model.
    pub model: String,
    /// Retraining request it answers, if any.
    #[serde(default)]
    pub request: Option<String>,
    /// Share of the previous training data replayed next to the captures,
    /// in `[0, 1]`, so the model does not forget. Default 0.5.
    #[serde(default = "default_replay")]
    pub replay_fraction: f64,
    /// Target profiles to compile for (`targets/*.toml` names); empty: the
    /// worker's defaults for the model.
    #[serde(default)]
    pub targets: Vec<String>,
    /// The acceptance gate.
    #[serde(default)]
    pub gate: GateSpec,
    /// Worker attempts before the job fails. Default 3.
    #[serde(default = "default_attempts")]
    pub max_attempts: u32,
    /// Lease length, seconds. Default [`DEFAULT_LEASE_S`].
    #[serde(default = "default_lease")]
    pub lease_s: u64,
    /// Training parameters handed to the worker as they are (a JSON object).
    #[serde(default)]
    pub params: serde_json::Map<String, Value>,
    /// Trial policy of the canary (the experiment's candidate rollout);
    /// default the rollout default. Unknown fields refused.
    #[serde(
        default,
        deserialize_with = "crate::rollout::plan::strict_trial_opt",
        skip_serializing_if = "Option::is_none"
    )]
    pub trial: Option<edgefleet_protocol::messages::TrialPolicy>,
    /// `collecting` waits until the group's capture batches of the model
    /// hold this many labelled samples (devices capture after their alarm
    /// and upload in chunks, so a job opened with its request would
    /// otherwise cut an empty dataset). Default 0: cut at once.
    #[serde(default)]
    pub min_labelled: u64,
    /// How long `collecting` waits for `min_labelled` (s); then it cuts
    /// what there is (`no_data` when there is nothing). Default 3600.
    #[serde(default = "default_collect_timeout")]
    pub collect_timeout_s: u64,
}

fn default_collect_timeout() -> u64 {
    3600
}

fn default_replay() -> f64 {
    0.5
}
fn default_attempts() -> u32 {
    3
}
fn default_lease() -> u64 {
    DEFAULT_LEASE_S
}

/// A worker's hold on a job.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
pub struct Lease {
    /// Lease id (`ls-` and 16 hex digits); every worker call names it.
    pub id: String,
    /// Worker name (its `--name`, host name by default).
    pub worker: String,
    /// The worker's compute (`cuda`, `cpu`).
    pub device: String,
    /// Expiry (server ms); a heartbeat moves it `lease_s` ahead.
    pub expires_ms: u64,
}

/// The candidate's gate numbers, as reported by the worker and checked by
/// the server against [`GateSpec`].
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
#[serde(deny_unknown_fields)]
pub struct GateNumbers {
    /// Metric name (`accuracy`, `f1`).
    pub metric: String,
    /// Candidate on the new data's held-out split.
    pub candidate_new: f64,
    /// Current release on the same split.
    pub current_new: f64,
    /// Candidate on the previous test set.
    pub candidate_previous: f64,
    /// Current release on the previous test set.
    pub current_previous: f64,
    /// Samples in the new held-out split.
    pub new_samples: u64,
    /// Samples in the previous test set.
    pub previous_samples: u64,
}

/// The server's gate verdict.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
pub struct GateVerdict {
    /// The numbers.
    pub numbers: GateNumbers,
    /// The rule applied.
    pub spec: GateSpec,
    /// Passed.
    pub passed: bool,
    /// Why, in words, with the numbers.
    pub reason: String,
}

impl GateVerdict {
    /// Applies `spec` to `n`: the candidate passes when
    /// `candidate_new - current_new >= min_improvement` and
    /// `current_previous - candidate_previous <= max_regression`, with every
    /// number finite and both splits non-empty.
    pub fn judge(n: GateNumbers, spec: GateSpec) -> Self {
        let finite = [
            n.candidate_new,
            n.current_new,
            n.candidate_previous,
            n.current_previous,
        ]
        .iter()
        .all(|x| x.is_finite());
        let gain = n.candidate_new - n.current_new;
        let loss = n.current_previous - n.candidate_previous;
        let finite = finite && gain.is_finite() && loss.is_finite();
        let (passed, reason) = if !finite {
            (false, "a gate number is not finite".to_string())
        } else if n.new_samples == 0 || n.previous_samples == 0 {
            (false, "a gate split is empty".to_string())
        } else if gain < spec.min_improvement {
            (
                false,
                format!(
                    "{} on the new data {:.4} vs current {:.4}: gain {gain:+.4} below {:+.4}",
                    n.metric, n.candidate_new, n.current_new, spec.min_improvement
                ),
            )
        } else if loss > spec.max_regression {
            (
                false,
                format!(
                    "{} on the previous test set {:.4} vs current {:.4}: loss {loss:.4} above {:.4}",
                    n.metric, n.candidate_previous, n.current_previous, spec.max_regression
                ),
            )
        } else {
            (
                true,
                format!(
                    "{} gain {gain:+.4} on new data ({} samples), loss {loss:+.4} on the previous test set ({} samples)",
                    n.metric, n.new_samples, n.previous_samples
                ),
            )
        };
        GateVerdict {
            numbers: n,
            spec,
            passed,
            reason,
        }
    }
}

/// What a job produced and from what (issue #13: lineage).
#[derive(Debug, Clone, Default, Serialize, Deserialize, PartialEq)]
pub struct Lineage {
    /// Dataset version cut from the captures.
    pub dataset: Option<String>,
    /// Its content hash.
    pub dataset_sha256: Option<String>,
    /// The worker's training run record (`run.json`, as it wrote it).
    pub run: Option<Value>,
    /// Teacher / student, from the run record or the worker.
    pub teacher: Option<String>,
    /// Compile reports, one per target.
    pub compile_reports: Vec<Value>,
    /// Uploaded bundles (SHA-256 of the body), one per target.
    pub bundles: Vec<String>,
    /// Rollouts of the candidate to its experiments' B devices (the canary),
    /// one per target.
    pub rollouts: Vec<String>,
    /// Experiments against the current release, one per target.
    pub experiments: Vec<String>,
}

/// One state change.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
pub struct Transition {
    /// Server ms.
    pub at_ms: u64,
    /// From.
    pub from: JobState,
    /// To.
    pub to: JobState,
    /// The event.
    pub event: Event,
    /// Details (worker, reason).
    pub note: String,
}

/// A retraining job.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
pub struct Job {
    /// `job-` and 12 hex digits.
    pub id: String,
    /// What was asked.
    pub spec: CreateJob,
    /// Where it is.
    pub state: JobState,
    /// Created (server ms).
    pub created_ms: u64,
    /// Last change (server ms).
    pub updated_ms: u64,
    /// Worker attempts started.
    pub attempts: u32,
    /// The current lease (training, compiling).
    pub lease: Option<Lease>,
    /// The gate verdict, once judged.
    pub gate: Option<GateVerdict>,
    /// Lineage.
    pub lineage: Lineage,
    /// Why it failed or was rejected.
    pub error: Option<String>,
    /// State changes, oldest first (at most [`HISTORY_PER_JOB`]).
    pub history: Vec<Transition>,
}

impl Job {
    /// Applies `event` (through [`machine::next`]) and records it.
    ///
    /// # Errors
    /// [`Error::Conflict`] naming the state and the event when the table
    /// refuses it.
    pub fn apply(&mut self, event: Event, note: impl Into<String>, at_ms: u64) -> Result<()> {
        let to = machine::next(self.state, event).ok_or_else(|| {
            Error::Conflict(format!(
                "job {} is {}: event `{}` does not apply",
                self.id,
                self.state.name(),
                serde_json::to_value(event)
                    .ok()
                    .and_then(|v| v.as_str().map(str::to_string))
                    .unwrap_or_default()
            ))
        })?;
        self.history.push(Transition {
            at_ms,
            from: self.state,
            to,
            event,
            note: note.into(),
        });
        if self.history.len() > HISTORY_PER_JOB {
            self.history.remove(0);
        }
        self.state = to;
        self.updated_ms = at_ms;
        if !to.is_leased() {
            self.lease = None;
        }
        Ok(())
    }
}

/// A group, model or target name: 1-64 characters of `[A-Za-z0-9._:-]`,
/// not starting with `.` (names become tags, topics and file names).
///
/// # Errors
/// [`Error::BadRequest`] naming `field`.
pub fn check_name(field: &'static str, n: &str) -> Result<()> {
    let ok = !n.is_empty()
        && n.len() <= 64
        && !n.starts_with('.')
        && n.bytes()
            .all(|c| c.is_ascii_alphanumeric() || b"._:-".contains(&c));
    if ok {
        Ok(())
    } else {
        Err(Error::bad(
            field,
            format!(
                "`{}` is not 1-64 characters of [A-Za-z0-9._:-] (not starting with `.`)",
                n.chars().take(64).collect::<String>()
            ),
        ))
    }
}

fn check_spec(state: &State, s: &CreateJob) -> Result<()> {
    check_name("group", &s.group)?;
    check_name("model", &s.model)?;
    for t in &s.targets {
        check_name("targets", t)?;
    }
    if let Some(r) = &s.request {
        if store::get::<crate::drift::RetrainRequest>(&state.store.retraining, r.as_bytes())?
            .is_none()
        {
            return Err(Error::bad(
                "request",
                format!("no retraining request `{r}`"),
            ));
        }
    }
    if !(0.0..=1.0).contains(&s.replay_fraction) {
        return Err(Error::bad(
            "replay_fraction",
            format!("{} is outside [0, 1]", s.replay_fraction),
        ));
    }
    if !(s.gate.min_improvement.is_finite() && s.gate.max_regression.is_finite())
        || s.gate.max_regression < 0.0
    {
        return Err(Error::bad(
            "gate",
            "min_improvement and max_regression must be finite, max_regression >= 0",
        ));
    }
    if s.max_attempts == 0 {
        return Err(Error::bad("max_attempts", "must be at least 1"));
    }
    if !(5..=86_400).contains(&s.lease_s) {
        return Err(Error::bad(
            "lease_s",
            format!("{} is outside 5..=86400", s.lease_s),
        ));
    }
    Ok(())
}

/// Reads a job.
///
/// # Errors
/// [`Error::NotFound`]; store errors.
pub fn get(state: &State, id: &str) -> Result<Job> {
    store::get(&state.store.jobs, id.as_bytes())?.ok_or_else(|| Error::NotFound {
        what: "job",
        id: id.to_string(),
    })
}

fn put(state: &State, job: &Job) -> Result<()> {
    store::put(&state.store.jobs, job.id.as_bytes(), job)?;
    state.store.jobs.flush()?;
    Ok(())
}

/// Every job, newest first.
///
/// # Errors
/// Store errors.
pub fn list(state: &State) -> Result<Vec<Job>> {
    let mut v: Vec<Job> = store::scan(&state.store.jobs, b"")?;
    v.sort_by(|a, b| b.created_ms.cmp(&a.created_ms).then(a.id.cmp(&b.id)));
    Ok(v)
}

fn lock(state: &State) -> std::sync::MutexGuard<'_, ()> {
    state.jobs_lock.lock().unwrap_or_else(|p| p.into_inner())
}

/// Creates a queued job, or returns the open job of the same
/// `(group, model)` (one job per cohort at a time). The bool is true when a
/// new job was created.
///
/// # Errors
/// [`Error::BadRequest`] naming the field that is wrong; store errors.
pub fn create(state: &State, spec: CreateJob) -> Result<(Job, bool)> {
    check_spec(state, &spec)?;
    let _g = lock(state);
    if let Some(open) = list(state)?.into_iter().find(|j| {
        !j.state.is_terminal() && j.spec.group == spec.group && j.spec.model == spec.model
    }) {
        return Ok((open, false));
    }
    let now = now_ms();
    let job = Job {
        id: format!("job-{}", hex::encode(rand::random::<[u8; 6]>())),
        spec,
        state: JobState::Queued,
        created_ms: now,
        updated_ms: now,
        attempts: 0,
        lease: None,
        gate: None,
        lineage: Lineage::default(),
        error: None,
        history: Vec::new(),
    };
    put(state, &job)?;
    Ok((job, true))
}

/// Reads, changes and writes one job under the jobs lock.
fn update<T>(state: &State, id: &str, f: impl FnOnce(&mut Job) -> Result<T>) -> Result<(Job, T)> {
    let _g = lock(state);
    let mut job = get(state, id)?;
    let out = f(&mut job)?;
    put(state, &job)?;
    Ok((job, out))
}

/// Cancels a job that has not ended.
///
/// # Errors
/// [`Error::NotFound`]; [`Error::Conflict`] for an ended job.
pub fn cancel(state: &State, id: &str, who: &str) -> Result<Job> {
    update(state, id, |j| {
        j.apply(Event::Cancel, format!("cancelled by {who}"), now_ms())
    })
    .map(|(j, ())| j)
}

/// Cuts the dataset of every queued or collecting job (a collecting job is
/// one the server stopped in the middle: cutting is idempotent). Returns
/// the jobs that changed.
///
/// # Errors
/// Store errors.
pub fn collect(state: &State) -> Result<Vec<Job>> {
    let pending: Vec<String> = list(state)?
        .into_iter()
        .filter(|j| matches!(j.state, JobState::Queued | JobState::Collecting))
        .map(|j| j.id)
        .collect();
    let mut changed = Vec::new();
    for id in pending {
        let (job, ()) = update(state, &id, |j| collect_one(state, j))?;
        changed.push(job);
    }
    Ok(changed)
}

fn collect_one(state: &State, j: &mut Job) -> Result<()> {
    let now = now_ms();
    if j.state == JobState::Queued {
        j.apply(Event::Collect, "cutting the dataset", now)?;
    }
    let req = CreateDataset {
        group: j.spec.group.clone(),
        model: j.spec.model.clone(),
    };
    let waited_ms = now.saturating_sub(j.created_ms);
    if j.spec.min_labelled > 0
        && waited_ms < j.spec.collect_timeout_s.saturating_mul(1000)
        && datasets::labelled_available(state, &req)? < j.spec.min_labelled
    {
        return Ok(());
    }
    match datasets::create(state, &req) {
        Ok((d, _)) => {
            let note = format!(
                "dataset {} v{}: {} samples ({} labelled) from {} devices",
                d.id,
                d.version,
                d.provenance.samples,
                d.provenance.labels,
                d.provenance.devices.len()
            );
            j.lineage.dataset = Some(d.id);
            j.lineage.dataset_sha256 = Some(d.content_sha256);
            j.apply(Event::DatasetReady, note, now)
        }
        Err(Error::Conflict(why)) => {
            j.error = Some(format!("no captured data: {why}"));
            j.apply(Event::NoData, why, now)
        }
        Err(e) => Err(e),
    }
}

/// `POST /v1/jobs/claim` body.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
#[serde(deny_unknown_fields)]
pub struct ClaimRequest {
    /// Worker name.
    pub worker: String,
    /// Its compute (`cuda`, `cpu`).
    pub device: String,
    /// Models it can train; empty: any.
    #[serde(default)]
    pub models: Vec<String>,
}

/// What a worker gets with a job.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
pub struct Claimed {
    /// The job (its lease set).
    pub job: Job,
    /// The dataset version to train on.
    pub dataset: Dataset,
}

/// Gives the oldest training job without a live lease to `req.worker`
/// (attempt `attempts + 1`), or `None`.
///
/// # Errors
/// [`Error::BadRequest`] for an empty worker name; store errors.
pub fn claim(state: &State, req: &ClaimRequest) -> Result<Option<Claimed>> {
    if req.worker.trim().is_empty() {
        return Err(Error::bad("worker", "is empty"));
    }
    let now = now_ms();
    let mut candidates: Vec<Job> = list(state)?
        .into_iter()
        .filter(|j| j.state == JobState::Training && j.lease.is_none())
        .filter(|j| req.models.is_empty() || req.models.contains(&j.spec.model))
        .collect();
    candidates.sort_by_key(|j| j.created_ms);
    for c in candidates {
        let won = update(state, &c.id, |j| {
            if j.state != JobState::Training || j.lease.is_some() {
                return Ok(false);
            }
            j.attempts += 1;
            j.lease = Some(Lease {
                id: format!("ls-{}", hex::encode(rand::random::<[u8; 8]>())),
                worker: req.worker.clone(),
                device: req.device.clone(),
                expires_ms: now + j.spec.lease_s * 1000,
            });
            j.updated_ms = now;
            Ok(true)
        })?;
        if let (job, true) = won {
            let ds_id = job.lineage.dataset.clone().unwrap_or_default();
            let dataset = datasets::get(state, &ds_id)?.ok_or_else(|| Error::NotFound {
                what: "dataset",
                id: ds_id,
            })?;
            return Ok(Some(Claimed { job, dataset }));
        }
    }
    Ok(None)
}

/// Worker stage in a heartbeat.
#[derive(Debug, Clone, Copy, Serialize, Deserialize, PartialEq, Eq)]
#[serde(rename_all = "snake_case")]
pub enum WorkerStage {
    /// Training.
    Training,
    /// Training done; compiling, signing, uploading.
    Compiling,
}

/// `POST /v1/jobs/{id}/heartbeat` body.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
#[serde(deny_unknown_fields)]
pub struct Heartbeat {
    /// The lease id from the claim.
    pub lease: String,
    /// What the worker is doing.
    pub stage: WorkerStage,
    /// Progress in words (epoch, loss).
    #[serde(default)]
    pub message: String,
}

fn check_lease(j: &Job, lease: &str, now: u64) -> Result<()> {
    match &j.lease {
        Some(l) if l.id == lease && l.expires_ms >= now => Ok(()),
        Some(l) if l.id == lease => Err(Error::Conflict(format!(
            "lease {lease} of job {} expired; the job is offered again",
            j.id
        ))),
        _ => Err(Error::Conflict(format!(
            "lease `{lease}` does not hold job {} (it is {})",
            j.id,
            j.state.name()
        ))),
    }
}

/// Extends the lease and records the stage (training -> compiling).
///
/// # Errors
/// [`Error::Conflict`] when the lease is not the job's live lease.
pub fn heartbeat(state: &State, id: &str, hb: &Heartbeat) -> Result<Job> {
    update(state, id, |j| {
        let now = now_ms();
        check_lease(j, &hb.lease, now)?;
        if hb.stage == WorkerStage::Compiling && j.state == JobState::Training {
            let worker = j
                .lease
                .as_ref()
                .map(|l| l.worker.clone())
                .unwrap_or_default();
            j.apply(Event::Trained, format!("{worker}: {}", hb.message), now)?;
        }
        if let Some(l) = &mut j.lease {
            l.expires_ms = now + j.spec.lease_s * 1000;
        }
        j.updated_ms = now;
        Ok(())
    })
    .map(|(j, ())| j)
}

/// `POST /v1/jobs/{id}/complete` body.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
#[serde(deny_unknown_fields)]
pub struct Completion {
    /// The lease id.
    pub lease: String,
    /// Gate numbers.
    pub gate: GateNumbers,
    /// The training run record.
    pub run: Value,
    /// Teacher / student.
    #[serde(default)]
    pub teacher: Option<String>,
    /// Compile reports, one per target (empty when the gate failed before
    /// compiling).
    #[serde(default)]
    pub compile_reports: Vec<Value>,
    /// Uploaded bundles (body SHA-256), one per target.
    #[serde(default)]
    pub bundles: Vec<String>,
}

/// Records the worker's result and judges the gate: passed (and bundles
/// uploaded) -> canary; failed -> rejected with the numbers.
///
/// # Errors
/// [`Error::Conflict`] for a stale lease; [`Error::BadRequest`] for a
/// passing gate without bundles, or a bundle the server does not hold.
pub fn complete(state: &State, id: &str, c: &Completion) -> Result<Job> {
    check_lease(&get(state, id)?, &c.lease, now_ms())?;
    let model = get(state, id)?.spec.model;
    for sha in &c.bundles {
        match state.bundles.get(sha)? {
            None => {
                return Err(Error::bad(
                    "bundles",
                    format!("bundle {sha} was not uploaded"),
                ))
            }
            Some(b) if b.model != model => {
                return Err(Error::bad(
                    "bundles",
                    format!(
                        "bundle {sha} is of model `{}`, the job's is `{model}`",
                        b.model
                    ),
                ))
            }
            Some(_) => {}
        }
    }
    update(state, id, |j| {
        let now = now_ms();
        check_lease(j, &c.lease, now)?;
        let verdict = GateVerdict::judge(c.gate.clone(), j.spec.gate);
        j.lineage.run = Some(c.run.clone());
        j.lineage.teacher.clone_from(&c.teacher);
        j.lineage.compile_reports.clone_from(&c.compile_reports);
        j.lineage.bundles.clone_from(&c.bundles);
        let reason = verdict.reason.clone();
        let passed = verdict.passed;
        j.gate = Some(verdict);
        if !passed {
            j.error = Some(format!("gate: {reason}"));
            return j.apply(Event::GateFailed, reason, now);
        }
        if c.bundles.is_empty() {
            return Err(Error::bad(
                "bundles",
                "a passing candidate needs its bundles",
            ));
        }
        if j.state == JobState::Training {
            j.apply(Event::Trained, "trained", now)?;
        }
        j.apply(Event::Uploaded, reason, now)
    })
    .map(|(j, ())| j)
}

/// `POST /v1/jobs/{id}/fail` body.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
#[serde(deny_unknown_fields)]
pub struct Failure {
    /// The lease id.
    pub lease: String,
    /// What went wrong.
    pub reason: String,
}

fn retry_or_give_up(j: &mut Job, why: String, now: u64) -> Result<()> {
    if j.attempts >= j.spec.max_attempts {
        j.error = Some(format!(
            "{why} (attempt {} of {})",
            j.attempts, j.spec.max_attempts
        ));
        j.apply(Event::GiveUp, why, now)
    } else {
        j.apply(Event::Retry, why, now)?;
        j.lease = None;
        Ok(())
    }
}

/// A worker gives up on its attempt: the job is offered again, or fails
/// after `max_attempts`.
///
/// # Errors
/// [`Error::Conflict`] for a stale lease.
pub fn fail(state: &State, id: &str, f: &Failure) -> Result<Job> {
    update(state, id, |j| {
        let now = now_ms();
        check_lease(j, &f.lease, now)?;
        let worker = j
            .lease
            .as_ref()
            .map(|l| l.worker.clone())
            .unwrap_or_default();
        retry_or_give_up(j, format!("worker {worker} failed: {}", f.reason), now)
    })
    .map(|(j, ())| j)
}

/// Takes the job from every worker whose lease ran out at `now`; returns
/// the jobs that changed.
///
/// # Errors
/// Store errors.
pub fn expire_leases(state: &State, now: u64) -> Result<Vec<Job>> {
    let expired: Vec<String> = list(state)?
        .into_iter()
        .filter(|j| j.lease.as_ref().is_some_and(|l| l.expires_ms < now))
        .map(|j| j.id)
        .collect();
    let mut changed = Vec::new();
    for id in expired {
        let (job, hit) = update(state, &id, |j| {
            let Some(l) = j.lease.clone().filter(|l| l.expires_ms < now) else {
                return Ok(false);
            };
            retry_or_give_up(
                j,
                format!("lease of worker {} expired (no heartbeat)", l.worker),
                now,
            )?;
            Ok(true)
        })?;
        if hit {
            changed.push(job);
        }
    }
    Ok(changed)
}

/// Advances jobs every `period` until `shutdown`: cuts datasets, expires
/// leases, starts and follows canaries and experiments. Runs once at start, so a restarted server resumes at once.
pub fn spawn_tick(
    state: Arc<State>,
    period: std::time::Duration,
    mut shutdown: tokio::sync::watch::Receiver<bool>,
) -> tokio::task::JoinHandle<()> {
    tokio::spawn(async move {
        loop {
            let s = state.clone();
            let r = tokio::task::spawn_blocking(move || -> Result<()> {
                collect(&s)?;
                expire_leases(&s, now_ms())?;
                Ok(())
            })
            .await;
            match r {
                Ok(Err(e)) => tracing::warn!(error = %e, "jobs tick"),
                Err(e) => tracing::warn!(error = %e, "jobs tick panicked"),
                Ok(Ok(())) => {}
            }
            if let Err(e) = advance_fleet_stages(&state).await {
                tracing::warn!(error = %e, "jobs tick (canary, experiment)");
            }
            tokio::select! {
                _ = tokio::time::sleep(period) => {}
                _ = shutdown.changed() => return,
            }
        }
    })
}

/// The cohort's current bundle for `target`: the bundle of `model` and
/// `target` whose release most of the group's devices of that target run.
fn control_bundle(state: &State, group: &str, model: &str, target: &str) -> Result<Option<String>> {
    let mut counts: std::collections::BTreeMap<u64, usize> = std::collections::BTreeMap::new();
    for d in state.registry.list()? {
        if d.groups.contains(group) && d.target.as_deref() == Some(target) {
            if let Some(a) = d.active.as_ref().filter(|a| a.model == model) {
                *counts.entry(a.release).or_default() += 1;
            }
        }
    }
    let Some((&release, _)) = counts.iter().max_by_key(|(r, n)| (**n, **r)) else {
        return Ok(None);
    };
    Ok(state
        .bundles
        .list()?
        .into_iter()
        .find(|b| b.model == model && b.release == release && b.targets.iter().any(|t| t == target))
        .map(|b| b.sha256))
}

/// Starts one experiment per target of the candidate (its B arm's rollout
/// is the canary). Returns the event when none can start.
async fn start_canary(state: &Arc<State>, j: &mut Job) -> Result<Option<(Event, String)>> {
    for sha in j.lineage.bundles.clone() {
        let Some(info) = state.bundles.get(&sha)? else {
            return Ok(Some((Event::CanaryFailed, format!("bundle {sha} is gone"))));
        };
        for target in &info.targets {
            let Some(control) = control_bundle(state, &j.spec.group, &j.spec.model, target)? else {
                continue;
            };
            let spec = crate::experiments::CreateExperiment {
                target: Some(target.clone()),
                job: Some(j.id.clone()),
                trial: j.spec.trial.clone(),
                ..serde_json::from_value(serde_json::json!({
                    "group": j.spec.group,
                    "control": control,
                    "candidate": sha,
                    "promote": "automatic",
                }))
                .map_err(|e| Error::bad("experiment", e.to_string()))?
            };
            match crate::experiments::create(state, spec).await {
                Ok(e) => {
                    j.lineage.rollouts.extend(e.rollout.clone());
                    j.lineage.experiments.push(e.id);
                }
                Err(e) => {
                    return Ok(Some((
                        Event::CanaryFailed,
                        format!("experiment for {target}: {e}"),
                    )))
                }
            }
        }
    }
    if j.lineage.experiments.is_empty() {
        return Ok(Some((
            Event::CanaryFailed,
            "no device of the cohort runs the model on a target the candidate was compiled for"
                .into(),
        )));
    }
    Ok(None)
}

/// The canary passed when every candidate rollout completed; failed when one halted.
fn canary_verdict(state: &State, j: &Job) -> Option<(Event, String)> {
    let rollouts = state.lock_rollouts();
    let mut done = 0;
    for id in &j.lineage.rollouts {
        match rollouts.get(id).map(|r| &r.state) {
            Some(crate::rollout::RolloutState::Completed) => done += 1,
            Some(crate::rollout::RolloutState::Halted(why)) => {
                return Some((
                    Event::CanaryFailed,
                    format!("canary rollout {id} halted: {why}"),
                ))
            }
            Some(crate::rollout::RolloutState::Aborted) | None => {
                return Some((
                    Event::CanaryFailed,
                    format!("canary rollout {id} was aborted"),
                ))
            }
            _ => {}
        }
    }
    (done == j.lineage.rollouts.len()).then(|| {
        (
            Event::CanaryPassed,
            format!("{done} canary rollouts committed"),
        )
    })
}

/// The experiments' joint verdict: won when all promoted the candidate, lost
/// when any kept the control or stopped.
fn experiment_verdict(state: &State, j: &Job) -> Result<Option<(Event, String)>> {
    use crate::experiments::ExperimentState as X;
    let mut won = Vec::new();
    for id in &j.lineage.experiments {
        let e = crate::experiments::get(state, id)?;
        let outcome = e.outcome.clone().unwrap_or_default();
        match e.state {
            X::Running => return Ok(None),
            X::Promoted | X::CandidateWon => won.push(format!("{id}: {outcome}")),
            X::ControlKept | X::Stopped | X::Cancelled => {
                return Ok(Some((Event::ExperimentLost, format!("{id}: {outcome}"))))
            }
        }
    }
    Ok(Some((Event::ExperimentWon, won.join("; "))))
}

/// Moves jobs through canary and experiment (the stages that act on the
/// fleet). Called by the tick.
///
/// # Errors
/// Store errors.
pub async fn advance_fleet_stages(state: &Arc<State>) -> Result<()> {
    let all = list(state)?;
    // A job that ended (cancelled, or rejected while its experiments ran)
    // leaves no experiment running: cancelling one rolls its B devices back.
    for j in all
        .iter()
        .filter(|j| j.state.is_terminal() && j.state != JobState::Promoted)
    {
        for id in &j.lineage.experiments {
            if crate::experiments::get(state, id)?.state
                == crate::experiments::ExperimentState::Running
            {
                let _ = crate::experiments::cancel(state, id).await;
            }
        }
    }
    let jobs: Vec<Job> = all
        .into_iter()
        .filter(|j| matches!(j.state, JobState::Canary | JobState::Experiment))
        .collect();
    for mut j in jobs {
        let next = match j.state {
            JobState::Canary if j.lineage.experiments.is_empty() => {
                let r = start_canary(state, &mut j).await?;
                update(state, &j.id, |s| {
                    s.lineage.rollouts.clone_from(&j.lineage.rollouts);
                    s.lineage.experiments.clone_from(&j.lineage.experiments);
                    Ok(())
                })?;
                r
            }
            JobState::Canary => canary_verdict(state, &j),
            _ => experiment_verdict(state, &j)?,
        };
        if let Some((event, note)) = next {
            let lost = matches!(event, Event::CanaryFailed | Event::ExperimentLost);
            if lost {
                for id in &j.lineage.experiments {
                    let _ = crate::experiments::cancel(state, id).await;
                }
            }
            update(state, &j.id, |s| {
                if s.state != j.state {
                    return Ok(());
                }
                if lost {
                    s.error = Some(note.clone());
                }
                s.apply(event, note, now_ms())
            })?;
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn numbers(cn: f64, un: f64, cp: f64, up: f64) -> GateNumbers {
        GateNumbers {
            metric: "accuracy".into(),
            candidate_new: cn,
            current_new: un,
            candidate_previous: cp,
            current_previous: up,
            new_samples: 10,
            previous_samples: 10,
        }
    }

    /// The gate's boundaries, and numbers whose difference overflows.
    #[test]
    fn gate_verdicts() {
        let spec = GateSpec::default();
        assert!(GateVerdict::judge(numbers(0.9, 0.8, 0.9, 0.905), spec).passed);
        assert!(!GateVerdict::judge(numbers(0.9, 0.8, 0.88, 0.9), spec).passed);
        assert!(!GateVerdict::judge(numbers(0.79, 0.8, 0.9, 0.9), spec).passed);
        let huge = GateVerdict::judge(numbers(1e308, -1e308, 0.9, 0.9), spec);
        assert!(!huge.passed, "{}", huge.reason);
        assert!(huge.reason.contains("not finite"));
        let mut empty = numbers(0.9, 0.8, 0.9, 0.9);
        empty.new_samples = 0;
        assert!(!GateVerdict::judge(empty, spec).passed);
    }

    #[test]
    fn names() {
        for ok in ["line-3", "vad", "a.b:c_d"] {
            assert!(check_name("group", ok).is_ok(), "{ok}");
        }
        for bad in ["", ".hidden", "../evil", "a/b", "x y", "ü", &"a".repeat(65)] {
            assert!(check_name("group", bad).is_err(), "{bad:?}");
        }
    }
}
