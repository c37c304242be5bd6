//! Fleet A/B experiments between two releases of a model (issue #13;
//! docs/loop.md, "Experiments"). The statistics live in
//! [`edgefleet_experiment`]; this module runs them on the fleet.
//!
//! `POST /v1/experiments` with a group (the cohort), a control bundle (A,
//! normally the release the cohort runs) and a candidate bundle (B):
//! 1. every device of the cohort gets a sticky variant,
//!    [`edgefleet_experiment::assign`]`(device, experiment id, [1 - share, share])`;
//! 2. the B devices are tagged `exp:<id>:b` and get the candidate through an
//!    ordinary rollout (one wave, trial and automatic rollback as usual);
//! 3. on every tick the telemetry each device sent since the last tick is
//!    added to the metrics of the arm whose release answered (requests and
//!    errors, feedback labels and agreements, latency p50 per record, CPU);
//! 4. the primary metric goes through the always-valid mSPRT
//!    ([`edgefleet_experiment::SequentialTest`]), each guardrail through its
//!    one-sided monitor, after every tick: safe to look at any time;
//! 5. the candidate wins -> with `promote: automatic` a rollout of it to the
//!    whole cohort (blue-green: every device switches; each keeps the
//!    previous release in its other A/B slot); the control wins, the test is
//!    inconclusive or a guardrail stops it -> the B devices are commanded to
//!    roll back to their previous slot.
//!
//! With `"allocation": {"kind": "thompson"}` the candidate's share follows
//! the posterior probability that it is better ([`bandit`]). With
//! `"candidate_mode": "shadow"` the candidate runs beside the control on the
//! B devices without serving ([`shadow`]).

mod bandit;
mod shadow;

pub use bandit::{candidate_share, Allocation, Reallocation};
pub use shadow::{wilson, CandidateMode};

use std::collections::BTreeMap;
use std::sync::Arc;

use edgefleet_experiment::{
    Decision, DecisionRule, Direction, Evaluation, Guardrail, GuardrailMonitor, GuardrailReport,
    GuardrailVerdict, Margin, Mean, Proportion, SequentialTest, Summary,
};
use edgefleet_protocol::telemetry::TelemetryRecord;
use serde::{Deserialize, Serialize};

use crate::registry::Selector;
use crate::rollout::RolloutSpec;
use crate::store::{self, now_ms};
use crate::{Error, Result, State};

/// A metric measured per variant from telemetry.
#[derive(Debug, Clone, Copy, Serialize, Deserialize, PartialEq, Eq, Hash, PartialOrd, Ord)]
#[serde(rename_all = "snake_case")]
pub enum MetricKind {
    /// `agreed / labelled` of feedback labels (online accuracy); higher is better.
    OnlineAccuracy,
    /// `errors / requests`; lower is better.
    ErrorRate,
    /// Mean over telemetry records of the interval's p50 latency (ms); lower is better.
    LatencyP50Ms,
    /// Mean over records of CPU use (percent of one core); lower is better.
    CpuPercent,
}

impl MetricKind {
    /// Which way is better.
    pub fn direction(self) -> Direction {
        match self {
            MetricKind::OnlineAccuracy => Direction::HigherIsBetter,
            _ => Direction::LowerIsBetter,
        }
    }

    /// The snake_case name (`online_accuracy`).
    pub fn name(self) -> &'static str {
        match self {
            MetricKind::OnlineAccuracy => "online_accuracy",
            MetricKind::ErrorRate => "error_rate",
            MetricKind::LatencyP50Ms => "latency_p50_ms",
            MetricKind::CpuPercent => "cpu_percent",
        }
    }

    /// Default mixing scale `τ` in the metric's units: the effect size the
    /// test is most sensitive to (Johari et al. 2022 §4.2).
    pub fn default_tau(self) -> f64 {
        match self {
            MetricKind::OnlineAccuracy => 0.05,
            MetricKind::ErrorRate => 0.02,
            MetricKind::LatencyP50Ms => 2.0,
            MetricKind::CpuPercent => 5.0,
        }
    }
}

/// Who decides to promote a winner.
#[derive(Debug, Clone, Copy, Serialize, Deserialize, PartialEq, Eq, Default)]
#[serde(rename_all = "snake_case")]
pub enum Promotion {
    /// The server rolls the winner out to the whole cohort at once.
    Automatic,
    /// The result is recorded; an operator rolls out.
    #[default]
    Manual,
}

/// A guardrail of a create request.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
#[serde(deny_unknown_fields)]
pub struct GuardrailSpec {
    /// Metric watched.
    pub metric: MetricKind,
    /// Stop when the candidate is proven worse by more than this fraction
    /// of the control's value.
    #[serde(default)]
    pub max_relative_degradation: Option<f64>,
    /// Stop when proven worse by more than this (metric units).
    #[serde(default)]
    pub max_absolute_degradation: Option<f64>,
}

/// `POST /v1/experiments` body.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
#[serde(deny_unknown_fields)]
pub struct CreateExperiment {
    /// Cohort: the devices of this group at creation.
    pub group: String,
    /// Only devices of this target profile (a cohort spanning several
    /// targets runs one experiment per target, each with its bundles).
    #[serde(default)]
    pub target: Option<String>,
    /// Control bundle (A), body SHA-256.
    pub control: String,
    /// Candidate bundle (B), body SHA-256; same model as the control.
    pub candidate: String,
    /// Share of the cohort assigned to B, in `(0, 1)`. Default 0.5. With a
    /// Thompson allocation, the share until the first reallocation.
    #[serde(default = "half")]
    pub candidate_share: f64,
    /// Fixed (default) or Thompson sampling ([`Allocation`]).
    #[serde(default)]
    pub allocation: Allocation,
    /// Primary metric. Default online accuracy.
    #[serde(default = "accuracy")]
    pub metric: MetricKind,
    /// False-positive rate of the decision (always valid). Default 0.05.
    #[serde(default = "alpha")]
    pub alpha: f64,
    /// Mixing scale; default [`MetricKind::default_tau`].
    #[serde(default)]
    pub tau: Option<f64>,
    /// No decision before each arm has this many units (labels, requests or
    /// records). Default 100.
    #[serde(default = "min_samples")]
    pub min_samples_per_arm: u64,
    /// Inconclusive once both arms reach this many units.
    #[serde(default)]
    pub max_samples_per_arm: Option<u64>,
    /// Guardrails. Default: error rate at most 50 % worse (relative).
    #[serde(default = "default_guardrails")]
    pub guardrails: Vec<GuardrailSpec>,
    /// What happens to a winning candidate. Default manual.
    #[serde(default)]
    pub promote: Promotion,
    /// The retraining job this experiment judges, if any.
    #[serde(default)]
    pub job: Option<String>,
    /// Trial policy of the candidate's rollout to the B devices (a serving
    /// candidate only; unknown fields refused); default the rollout default.
    #[serde(
        default,
        deserialize_with = "crate::rollout::plan::strict_trial_opt",
        skip_serializing_if = "Option::is_none"
    )]
    pub trial: Option<edgefleet_protocol::messages::TrialPolicy>,
    /// Serve (default: an A/B test) or shadow (the candidate runs beside
    /// the control on the B devices, its answers discarded; [`shadow`]).
    #[serde(default)]
    pub candidate_mode: CandidateMode,
    /// Shadow only: how long the B devices shadow (s), `1..=86400`; the
    /// experiment ends inconclusive when it passes. Default 3600.
    #[serde(default = "shadow::default_window_s")]
    pub shadow_window_s: u64,
    /// Shadow only: a winning candidate whose agreement with the control
    /// (fraction of shadow runs with the same answer) is below this is not
    /// promoted. Default none.
    #[serde(default)]
    pub min_agreement: Option<f64>,
}

fn half() -> f64 {
    0.5
}
fn accuracy() -> MetricKind {
    MetricKind::OnlineAccuracy
}
fn alpha() -> f64 {
    0.05
}
fn min_samples() -> u64 {
    100
}
fn default_guardrails() -> Vec<GuardrailSpec> {
    vec![GuardrailSpec {
        metric: MetricKind::ErrorRate,
        max_relative_degradation: Some(0.5),
        max_absolute_degradation: None,
    }]
}

/// Where an experiment is.
#[derive(Debug, Clone, Copy, Serialize, Deserialize, PartialEq, Eq)]
#[serde(rename_all = "snake_case")]
pub enum ExperimentState {
    /// Collecting data.
    Running,
    /// The candidate won and was rolled out to the cohort.
    Promoted,
    /// The candidate won; promotion is manual.
    CandidateWon,
    /// The control won or the test was inconclusive; B devices rolled back.
    ControlKept,
    /// A guardrail stopped it; B devices rolled back.
    Stopped,
    /// Cancelled by an operator; B devices rolled back.
    Cancelled,
}

/// Metrics of one variant, accumulated from telemetry.
#[derive(Debug, Clone, Default, Serialize, Deserialize, PartialEq)]
pub struct ArmMetrics {
    /// Feedback: agreed of labelled.
    pub accuracy: Proportion,
    /// Errors of requests.
    pub errors: Proportion,
    /// p50 latency per record (ms).
    pub latency_p50_ms: Mean,
    /// CPU per record (percent).
    pub cpu_percent: Mean,
    /// Telemetry records counted.
    pub records: u64,
    /// Shadow runs that gave the control's answer, of those compared (only
    /// the candidate of a shadow experiment has any).
    #[serde(default)]
    pub agreement: Proportion,
}

impl ArmMetrics {
    fn add(&mut self, r: &TelemetryRecord) -> Result<()> {
        let e = |e: edgefleet_experiment::Error| Error::Conflict(format!("metric: {e}"));
        self.records += 1;
        self.errors
            .record_batch(r.errors, r.requests.max(r.errors))
            .map_err(e)?;
        // Design: a device's inconsistent summary (agreed > labelled) is
        // left out of the metric, not allowed to stop every experiment's tick.
        if let Some(f) = r.feedback.filter(|f| f.agreed <= f.labelled) {
            self.accuracy
                .record_batch(f.agreed, f.labelled)
                .map_err(e)?;
        }
        if r.requests > 0 && r.latency.p50_ms.is_finite() {
            self.latency_p50_ms.push(r.latency.p50_ms).map_err(e)?;
        }
        if r.cpu_percent.is_finite() {
            self.cpu_percent.push(f64::from(r.cpu_percent)).map_err(e)?;
        }
        if let Some(s) = r.shadow.filter(|s| s.agreed <= s.compared) {
            self.agreement
                .record_batch(s.agreed, s.compared)
                .map_err(e)?;
        }
        Ok(())
    }

    /// The summary of `m` for the tests. For an error rate the units are
    /// requests and the mean the error rate.
    pub fn summary(&self, m: MetricKind) -> Summary {
        match m {
            MetricKind::OnlineAccuracy => self.accuracy.summary(),
            MetricKind::ErrorRate => self.errors.summary(),
            MetricKind::LatencyP50Ms => self.latency_p50_ms.summary(),
            MetricKind::CpuPercent => self.cpu_percent.summary(),
        }
    }
}

/// One guardrail's running state.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
pub struct GuardrailState {
    /// The guardrail.
    pub spec: Guardrail,
    /// Its metric.
    pub metric: MetricKind,
    /// Monitor state.
    pub monitor: GuardrailMonitor,
    /// Latest report.
    pub last: Option<GuardrailReport>,
}

/// An experiment.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
pub struct Experiment {
    /// `exp-` and 12 hex digits.
    pub id: String,
    /// What was asked.
    pub spec: CreateExperiment,
    /// Model (both bundles').
    pub model: String,
    /// Release counters of A and B.
    pub releases: [u64; 2],
    /// Where it is.
    pub state: ExperimentState,
    /// Created / last changed (server ms).
    pub created_ms: u64,
    /// Last change (server ms).
    pub updated_ms: u64,
    /// Variant per device (0 = control A, 1 = candidate B), as of the last
    /// reallocation.
    pub assignment: BTreeMap<String, usize>,
    /// Reallocations of a Thompson allocation, oldest first (empty for a
    /// fixed one).
    #[serde(default)]
    pub allocations: Vec<Reallocation>,
    /// Rollout giving B its release.
    pub rollout: Option<String>,
    /// Rollout promoting the winner to the cohort.
    pub promotion: Option<String>,
    /// Last telemetry `seq` counted per device.
    pub cursors: BTreeMap<String, u64>,
    /// Metrics of A and B.
    pub arms: [ArmMetrics; 2],
    /// The primary metric's decision rule.
    pub rule: DecisionRule,
    /// Its sequential test.
    pub test: SequentialTest,
    /// Its latest evaluation.
    pub last: Option<Evaluation>,
    /// Guardrails.
    pub guardrails: Vec<GuardrailState>,
    /// What ended it, in words with the numbers.
    pub outcome: Option<String>,
}

fn guardrail(g: &GuardrailSpec, alpha: f64) -> Result<Guardrail> {
    let margin = match (g.max_relative_degradation, g.max_absolute_degradation) {
        (Some(r), None) => Margin::MaxRelativeDegradation(r),
        (None, Some(a)) => Margin::MaxAbsoluteDegradation(a),
        _ => {
            return Err(Error::bad(
                "guardrails",
                "each guardrail needs exactly one of max_relative_degradation, max_absolute_degradation",
            ))
        }
    };
    let spec = Guardrail {
        metric: g.metric.name().to_string(),
        direction: g.metric.direction(),
        margin,
        alpha,
        tau: g.metric.default_tau(),
        min_samples_per_arm: 30,
    };
    spec.validate()
        .map_err(|e| Error::bad("guardrails", e.to_string()))?;
    Ok(spec)
}

fn rule(s: &CreateExperiment) -> Result<DecisionRule> {
    let r = DecisionRule {
        alpha: s.alpha,
        tau: s.tau.unwrap_or_else(|| s.metric.default_tau()),
        min_samples_per_arm: s.min_samples_per_arm,
        direction: s.metric.direction(),
        max_samples_per_arm: s.max_samples_per_arm,
    };
    r.validate()
        .map_err(|e| Error::bad("rule", e.to_string()))?;
    Ok(r)
}

/// Reads an experiment.
///
/// # Errors
/// [`Error::NotFound`]; store errors.
pub fn get(state: &State, id: &str) -> Result<Experiment> {
    store::get(&state.store.experiments, id.as_bytes())?.ok_or_else(|| Error::NotFound {
        what: "experiment",
        id: id.to_string(),
    })
}

fn put(state: &State, e: &Experiment) -> Result<()> {
    store::put(&state.store.experiments, e.id.as_bytes(), e)?;
    state.store.experiments.flush()?;
    Ok(())
}

/// Every experiment, newest first.
///
/// # Errors
/// Store errors.
pub fn list(state: &State) -> Result<Vec<Experiment>> {
    let mut v: Vec<Experiment> = store::scan(&state.store.experiments, b"")?;
    v.sort_by(|a, b| b.created_ms.cmp(&a.created_ms).then(a.id.cmp(&b.id)));
    Ok(v)
}

/// The tag of a device assigned to B.
pub fn candidate_tag(id: &str) -> String {
    format!("exp:{id}:b")
}

/// Draws the experiment id and the cohort's sticky assignment under it.
/// Design: with a small cohort every device may hash to one arm; the id is
/// then drawn again (at most [`ASSIGNMENT_DRAWS`] times), so assignment stays
/// a pure function of (device, id) and both arms get a device.
///
/// # Errors
/// [`Error::Conflict`] when the cohort has fewer than 2 devices (or no draw
/// split it).
fn draw_assignment(
    state: &State,
    s: &CreateExperiment,
) -> Result<(String, BTreeMap<String, usize>)> {
    // The cohort is the group's devices of the experiment's target (all
    // targets without one): a device of another target never gets this
    // experiment's candidate bundle.
    let sel = Selector {
        group: Some(s.group.clone()),
        target: s.target.clone(),
        ..Selector::default()
    };
    let cohort: Vec<String> = state
        .registry
        .list()?
        .into_iter()
        .filter(|d| sel.matches(d))
        .map(|d| d.id)
        .collect();
    let shares = [1.0 - s.candidate_share, s.candidate_share];
    for _ in 0..ASSIGNMENT_DRAWS {
        let id = format!("exp-{}", hex::encode(rand::random::<[u8; 6]>()));
        let mut assignment = BTreeMap::new();
        for d in &cohort {
            let v = edgefleet_experiment::assign(d, &id, &shares)
                .map_err(|e| Error::bad("candidate_share", e.to_string()))?;
            assignment.insert(d.clone(), v);
        }
        let on_b = assignment.values().filter(|&&v| v == 1).count();
        if on_b > 0 && on_b < assignment.len() {
            return Ok((id, assignment));
        }
    }
    Err(Error::Conflict(format!(
        "group {} has {} devices: both variants need at least one",
        s.group,
        cohort.len()
    )))
}

/// Draws of the experiment id before a cohort is declared unsplittable.
const ASSIGNMENT_DRAWS: usize = 64;

/// Checks the request and assigns the cohort (no side effects yet).
fn plan(state: &State, s: CreateExperiment) -> Result<Experiment> {
    crate::jobs::check_name("group", &s.group)?;
    if let Some(t) = &s.target {
        crate::jobs::check_name("target", t)?;
    }
    if s.control == s.candidate {
        return Err(Error::bad("candidate", "is the control bundle"));
    }
    if let Some(j) = &s.job {
        crate::jobs::get(state, j).map_err(|_| Error::bad("job", format!("no job `{j}`")))?;
    }
    if let Some(other) = list(state)?.into_iter().find(|e| {
        e.state == ExperimentState::Running
            && e.spec.group == s.group
            && (e.spec.target.is_none() || s.target.is_none() || e.spec.target == s.target)
    }) {
        return Err(Error::Conflict(format!(
            "experiment {} is running on group {} (one experiment per group and target at a time)",
            other.id, s.group
        )));
    }
    if !(s.candidate_share > 0.0 && s.candidate_share < 1.0) {
        return Err(Error::bad(
            "candidate_share",
            format!("{} is outside (0, 1)", s.candidate_share),
        ));
    }
    let bundle = |field: &'static str, sha: &str| {
        state
            .bundles
            .get(sha)?
            .ok_or_else(|| Error::bad(field, format!("bundle {sha} is not uploaded")))
    };
    let (a, b) = (
        bundle("control", &s.control)?,
        bundle("candidate", &s.candidate)?,
    );
    if a.model != b.model {
        return Err(Error::bad(
            "candidate",
            format!("model {} differs from the control's {}", b.model, a.model),
        ));
    }
    if a.release == b.release {
        return Err(Error::bad(
            "candidate",
            format!(
                "has the control's release counter {}: telemetry could not tell the arms apart",
                a.release
            ),
        ));
    }
    let rule = rule(&s)?;
    bandit::check(&s)?;
    shadow::check(&s)?;
    let guardrails = s
        .guardrails
        .iter()
        .map(|g| {
            Ok(GuardrailState {
                spec: guardrail(g, s.alpha)?,
                metric: g.metric,
                monitor: GuardrailMonitor::new(),
                last: None,
            })
        })
        .collect::<Result<Vec<_>>>()?;
    let (id, assignment) = draw_assignment(state, &s)?;
    let now = now_ms();
    Ok(Experiment {
        id,
        model: a.model.clone(),
        releases: [a.release, b.release],
        state: ExperimentState::Running,
        created_ms: now,
        updated_ms: now,
        assignment,
        allocations: Vec::new(),
        rollout: None,
        promotion: None,
        cursors: BTreeMap::new(),
        arms: [ArmMetrics::default(), ArmMetrics::default()],
        rule,
        test: SequentialTest::new(),
        last: None,
        guardrails,
        outcome: None,
        spec: s,
    })
}

/// Creates and starts an experiment: assigns the cohort, tags the B
/// devices, rolls the candidate out to them.
///
/// # Errors
/// [`Error::BadRequest`] naming the field; [`Error::Conflict`] when a
/// variant would be empty; store and rollout errors.
pub async fn create(state: &Arc<State>, s: CreateExperiment) -> Result<Experiment> {
    let mut e = plan(state, s)?;
    // Telemetry before the start does not count.
    for d in e.assignment.keys() {
        let last = last_seq(state, d)?;
        e.cursors.insert(d.clone(), last);
    }
    let tag = candidate_tag(&e.id);
    for (d, v) in &e.assignment {
        if *v == 1 {
            state.registry.update(d, |dev| {
                dev.tags.insert(tag.clone());
            })?;
        }
    }
    put(state, &e)?;
    let spec: RolloutSpec = serde_json::from_value(shadow::rollout_body(&e, &tag))
        .map_err(|x| Error::bad("candidate", x.to_string()))?;
    let r = state.create_rollout(spec).await?;
    e.rollout = Some(r.id);
    put(state, &e)?;
    Ok(e)
}

fn last_seq(state: &State, device: &str) -> Result<u64> {
    let Some(kv) = state
        .store
        .telemetry
        .scan_prefix(store::device_prefix(device))
        .next_back()
    else {
        return Ok(0);
    };
    let (k, v) = kv?;
    let s: crate::telemetry::Stored = store::decode(&k, &v)?;
    Ok(s.record.seq)
}

/// Adds the telemetry of the cohort since each device's cursor to the
/// metrics of the arm whose release answered it (a device moved by a
/// reallocation counts for its old arm until it runs the new one).
fn collect(state: &State, e: &mut Experiment) -> Result<bool> {
    let mut any = false;
    for device in e.assignment.keys() {
        let from = e.cursors.get(device).copied().unwrap_or(0);
        let start = store::seq_key(device, from.saturating_add(1));
        let end = store::seq_key(device, u64::MAX);
        for kv in state.store.telemetry.range(start..=end) {
            let (k, val) = kv?;
            let s: crate::telemetry::Stored = store::decode(&k, &val)?;
            e.cursors.insert(device.clone(), s.record.seq);
            let arm = s.record.release.as_ref().and_then(|r| {
                (r.model == e.model)
                    .then(|| e.releases.iter().position(|&x| x == r.release))
                    .flatten()
            });
            if let Some(v) = arm {
                e.arms[v].add(&s.record)?;
                any = true;
            }
        }
    }
    Ok(any)
}

/// Runs the decision rule and the guardrails; returns the new state, if any.
fn judge(e: &mut Experiment) -> Result<Option<(ExperimentState, String)>> {
    let m = e.spec.metric;
    let (a, b) = (e.arms[0].summary(m), e.arms[1].summary(m));
    let ev = e
        .test
        .update(&e.rule, &a, &b)
        .map_err(|x| Error::Conflict(format!("decision: {x}")))?;
    for g in &mut e.guardrails {
        let (ga, gb) = (e.arms[0].summary(g.metric), e.arms[1].summary(g.metric));
        let r = g
            .monitor
            .update(&g.spec, &ga, &gb)
            .map_err(|x| Error::Conflict(format!("guardrail: {x}")))?;
        let stop = r.verdict == GuardrailVerdict::Stop;
        let what = format!(
            "guardrail {} stopped it: control {:.4}, candidate {:.4} (n = {}, {})",
            g.spec.metric,
            r.baseline_mean,
            r.candidate_mean,
            r.samples_baseline,
            r.samples_candidate
        );
        g.last = Some(r);
        if stop {
            e.last = Some(ev);
            return Ok(Some((ExperimentState::Stopped, what)));
        }
    }
    let effect = ev.effect.as_ref().map_or(String::new(), |x| {
        format!(
            "{}: control {:.4}, candidate {:.4}, difference {:+.4} (always-valid {:.0}% interval {:+.4} .. {:+.4}), p = {:.4}, n = {} / {}",
            m.name(), x.mean_a, x.mean_b, x.difference, (1.0 - e.rule.alpha) * 100.0, x.always_valid.low, x.always_valid.high,
            ev.p_value, ev.samples_a, ev.samples_b
        )
    });
    let effect = effect + &shadow::agreement_text(e);
    let next = match ev.decision {
        Decision::BWins if shadow::agreement_short(e).is_some() => Some((
            ExperimentState::ControlKept,
            format!(
                "candidate better but kept out: {}: {effect}",
                shadow::agreement_short(e).unwrap_or_default()
            ),
        )),
        Decision::BWins => Some((
            match e.spec.promote {
                Promotion::Automatic => ExperimentState::Promoted,
                Promotion::Manual => ExperimentState::CandidateWon,
            },
            format!("candidate better: {effect}"),
        )),
        Decision::AWins => Some((
            ExperimentState::ControlKept,
            format!("control better: {effect}"),
        )),
        Decision::Inconclusive => Some((
            ExperimentState::ControlKept,
            format!("inconclusive at the sample cap: {effect}"),
        )),
        Decision::Warmup | Decision::Continue => None,
    };
    e.last = Some(ev);
    Ok(next)
}

/// Commands the B devices back to their previous slot.
async fn roll_back_candidates(state: &Arc<State>, e: &Experiment, why: &str) {
    for (d, v) in &e.assignment {
        if *v == 1 {
            if let Err(x) = state
                .send_rollback(d, &format!("experiment {}: {why}", e.id))
                .await
            {
                tracing::warn!(experiment = %e.id, device = %d, error = %x, "rollback command failed");
            }
        }
    }
}

/// Applies an ending: promotion rollout or rollbacks.
async fn end(
    state: &Arc<State>,
    e: &mut Experiment,
    to: ExperimentState,
    why: String,
) -> Result<()> {
    tracing::info!(event = "experiment_ended", experiment = %e.id, state = ?to, outcome = %why, "experiment ended");
    if let Some(r) = &e.rollout {
        let _ = state.control_rollout(r, "abort").await;
    }
    match to {
        ExperimentState::Promoted => {
            let spec: RolloutSpec = serde_json::from_value(serde_json::json!({
                "bundle": e.spec.candidate,
                "selector": {"group": e.spec.group, "target": e.spec.target},
                "waves": ["100%"],
            }))
            .map_err(|x| Error::bad("candidate", x.to_string()))?;
            let r = state.create_rollout(spec).await?;
            e.promotion = Some(r.id);
        }
        ExperimentState::CandidateWon => {}
        // A shadow arm ends with its rollout's cancel above: each B device
        // discards the candidate it never served.
        _ if e.spec.candidate_mode == CandidateMode::Shadow => {}
        _ => roll_back_candidates(state, e, &why).await,
    }
    e.state = to;
    e.outcome = Some(why);
    e.updated_ms = now_ms();
    Ok(())
}

/// One tick: every running experiment collects, judges and maybe ends.
///
/// # Errors
/// Store errors.
pub async fn tick(state: &Arc<State>) -> Result<()> {
    for mut e in list(state)?
        .into_iter()
        .filter(|e| e.state == ExperimentState::Running)
    {
        let st = state.clone();
        let (e2, fresh) = tokio::task::spawn_blocking(move || -> Result<(Experiment, bool)> {
            let any = collect(&st, &mut e)?;
            Ok((e, any))
        })
        .await
        .map_err(|x| Error::Conflict(x.to_string()))??;
        e = e2;
        if let Some((to, why)) = shadow::forced_end(state, &e, now_ms()) {
            end(state, &mut e, to, why).await?;
        } else if fresh {
            if let Some((to, why)) = judge(&mut e)? {
                end(state, &mut e, to, why).await?;
            } else if let Some(r) = bandit::plan(&e, bandit::rollout_active(state, &e))? {
                bandit::apply(state, &mut e, r).await?;
            }
        }
        put(state, &e)?;
    }
    Ok(())
}

/// Cancels a running experiment (B devices roll back).
///
/// # Errors
/// [`Error::NotFound`]; [`Error::Conflict`] when it has ended.
pub async fn cancel(state: &Arc<State>, id: &str) -> Result<Experiment> {
    let mut e = get(state, id)?;
    if e.state != ExperimentState::Running {
        return Err(Error::Conflict(format!(
            "experiment {id} has ended ({:?})",
            e.state
        )));
    }
    end(
        state,
        &mut e,
        ExperimentState::Cancelled,
        "cancelled by the operator".into(),
    )
    .await?;
    put(state, &e)?;
    Ok(e)
}

/// Runs [`tick`] every `period` until `shutdown`.
pub fn spawn_tick(
    state: Arc<State>,
    period: std::time::Duration,
    mut shutdown: tokio::sync::watch::Receiver<bool>,
) -> tokio::task::JoinHandle<()> {
    tokio::spawn(async move {
        loop {
            if let Err(e) = tick(&state).await {
                tracing::warn!(error = %e, "experiments tick");
            }
            tokio::select! {
                _ = tokio::time::sleep(period) => {}
                _ = shutdown.changed() => return,
            }
        }
    })
}
