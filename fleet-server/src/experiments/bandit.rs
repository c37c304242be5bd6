//! Thompson-sampling allocation of an experiment's cohort (issue #13, item 4;
//! docs/loop.md, "Bandit experiments").
//!
//! With `"allocation": {"kind": "thompson"}` the share of the cohort on the
//! candidate is not fixed: every `every_units` new units of the primary metric
//! (both arms together), once the rollout of the previous allocation has
//! finished, the share becomes `P(candidate is better | data)` under
//! `Beta(1 + s, 1 + f)` posteriors, kept within `[floor, 1 − floor]`
//! ([`edgefleet_experiment::thompson_allocation_with_floor`]; Thompson 1933,
//! Russo et al. 2018, ch. 3). The primary metric must be a proportion:
//! online accuracy (success = a label the model agreed with) or error rate
//! (success = a request without error).
//!
//! A device keeps its point `u` in `[0, 1)` from
//! [`edgefleet_experiment::assign`], and is on the candidate when `u ≥ 1 −
//! share`: a larger share moves only control devices to the candidate, a
//! smaller one only candidate devices back, so a device changes arm only when
//! the share crosses its point. Each arm keeps at least one device. Moved
//! devices are tagged (or untagged) `exp:<id>:b`; the new candidate devices
//! get the candidate through a new rollout, the others are commanded back to
//! their previous slot. A reallocation that moves nobody is not recorded.
//!
//! Decisions stay with the always-valid mSPRT: telemetry is counted by the
//! release that answered it, the plug-in variance follows each arm's own
//! sample size, and `aa_thompson_allocation_keeps_the_false_positive_rate`
//! (crates/experiment/tests/statistics.rs) measures the false-positive rate
//! with a reallocation after every look.

use std::collections::BTreeMap;
use std::sync::Arc;

use edgefleet_experiment::Proportion;
use serde::{Deserialize, Serialize};

use super::{candidate_tag, CreateExperiment, Experiment, MetricKind};
use crate::rollout::RolloutSpec;
use crate::store::now_ms;
use crate::{Error, Result, State};

/// How the cohort is split between control and candidate.
#[derive(Debug, Clone, Copy, Serialize, Deserialize, PartialEq, Default)]
#[serde(tag = "kind", rename_all = "snake_case", deny_unknown_fields)]
pub enum Allocation {
    /// `candidate_share` of the cohort on the candidate from start to end.
    #[default]
    Fixed,
    /// Thompson sampling: the share follows the posterior probability that
    /// the candidate is better.
    Thompson {
        /// Least share of the cohort on each arm, in `(0, 0.5]`. Default 0.1.
        #[serde(default = "default_floor")]
        floor: f64,
        /// New units of the primary metric (labels or requests, both arms
        /// together) between two reallocations, at least 1. Default 200.
        #[serde(default = "default_every")]
        every_units: u64,
    },
}

fn default_floor() -> f64 {
    0.1
}
fn default_every() -> u64 {
    200
}

/// Posterior draws per reallocation (Monte Carlo error of the share about
/// `0.5 / √DRAWS` ≈ 0.005).
const DRAWS: u32 = 10_000;

/// One change of the allocation, kept in the experiment.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
pub struct Reallocation {
    /// When (server ms).
    pub at_ms: u64,
    /// Units of the primary metric in both arms then.
    pub units: u64,
    /// The candidate's share from then on, in `[floor, 1 − floor]`.
    pub candidate_share: f64,
    /// Devices moved from the control to the candidate.
    pub to_candidate: Vec<String>,
    /// Devices moved from the candidate back to the control.
    pub to_control: Vec<String>,
}

/// Checks the allocation of a create request.
///
/// # Errors
/// [`Error::BadRequest`] naming `allocation.floor`, `allocation.every_units`
/// or `allocation` (a primary metric that is not a proportion).
pub(crate) fn check(s: &CreateExperiment) -> Result<()> {
    let Allocation::Thompson { floor, every_units } = s.allocation else {
        return Ok(());
    };
    if !(floor > 0.0 && floor <= 0.5) {
        return Err(Error::bad(
            "allocation.floor",
            format!("{floor} is outside (0, 0.5]"),
        ));
    }
    if every_units == 0 {
        return Err(Error::bad("allocation.every_units", "must be at least 1"));
    }
    if successes(s.metric, &Default::default()).is_none() {
        return Err(Error::bad(
            "allocation",
            format!(
                "Thompson allocation needs a proportion as the primary metric (online_accuracy or error_rate), not {}",
                s.metric.name()
            ),
        ));
    }
    Ok(())
}

/// The arm's successes as a proportion where higher is better, or `None`
/// for a metric that is not a proportion.
fn successes(m: MetricKind, arm: &super::ArmMetrics) -> Option<Proportion> {
    match m {
        MetricKind::OnlineAccuracy => Some(arm.accuracy),
        MetricKind::ErrorRate => {
            Proportion::from_counts(arm.errors.failures(), arm.errors.trials()).ok()
        }
        MetricKind::LatencyP50Ms | MetricKind::CpuPercent => None,
    }
}

/// The candidate's current share.
pub fn candidate_share(e: &Experiment) -> f64 {
    e.allocations
        .last()
        .map_or(e.spec.candidate_share, |r| r.candidate_share)
}

/// Units of the primary metric in both arms.
fn units(e: &Experiment) -> u64 {
    e.arms
        .iter()
        .map(|a| a.summary(e.spec.metric).count())
        .sum()
}

/// The next reallocation, if one is due: Thompson allocation, enough new
/// units since the last one, and the previous rollout finished
/// (`rollout_active` false). `None` when nothing is due or nothing would
/// move or an arm would be left empty.
///
/// # Errors
/// Assignment and Thompson errors (bad parameters, checked at creation).
pub(crate) fn plan(e: &Experiment, rollout_active: bool) -> Result<Option<Reallocation>> {
    let Allocation::Thompson { floor, every_units } = e.spec.allocation else {
        return Ok(None);
    };
    let now_units = units(e);
    let last_units = e.allocations.last().map_or(0, |r| r.units);
    if rollout_active || now_units < last_units.saturating_add(every_units) {
        return Ok(None);
    }
    let (Some(a), Some(b)) = (
        successes(e.spec.metric, &e.arms[0]),
        successes(e.spec.metric, &e.arms[1]),
    ) else {
        return Ok(None);
    };
    let share =
        edgefleet_experiment::thompson_allocation_with_floor(&[a, b], DRAWS, seed(e), floor)
            .map_err(|x| Error::bad("allocation", x.to_string()))?[1];
    let next = reassign(e, share)?;
    let moved = |from: usize| -> Vec<String> {
        e.assignment
            .iter()
            .filter(|(d, &v)| v == from && next.get(*d) == Some(&(1 - from)))
            .map(|(d, _)| d.clone())
            .collect()
    };
    let (to_candidate, to_control) = (moved(0), moved(1));
    if to_candidate.is_empty() && to_control.is_empty() {
        return Ok(None);
    }
    Ok(Some(Reallocation {
        at_ms: now_ms(),
        units: now_units,
        candidate_share: share,
        to_candidate,
        to_control,
    }))
}

/// Every device's arm at `share`: the devices whose point is at least
/// `1 − share` are on the candidate, except that each arm keeps at least one
/// device (on a small cohort a floor of 10 % may be less than one device;
/// the device nearest the boundary then stays).
fn reassign(e: &Experiment, share: f64) -> Result<BTreeMap<String, usize>> {
    let mut points = e
        .assignment
        .keys()
        .map(|d| {
            let u = edgefleet_experiment::assignment_point(d, &e.id)
                .map_err(|x| Error::bad("allocation", x.to_string()))?;
            Ok((u, d.clone()))
        })
        .collect::<Result<Vec<_>>>()?;
    points.sort_by(|a, b| a.0.total_cmp(&b.0));
    let n = points.len();
    let on_control = points.iter().filter(|(u, _)| *u < 1.0 - share).count();
    let on_control = on_control.clamp(1.min(n), n.saturating_sub(1));
    Ok(points
        .into_iter()
        .enumerate()
        .map(|(i, (_, d))| (d, usize::from(i >= on_control)))
        .collect())
}

/// A seed per experiment and reallocation: the id's 48 random bits and the
/// number of reallocations so far.
fn seed(e: &Experiment) -> u64 {
    let id = u64::from_str_radix(e.id.trim_start_matches("exp-"), 16).unwrap_or(0);
    id ^ (e.allocations.len() as u64 + 1).wrapping_mul(0x9E37_79B9_7F4A_7C15)
}

/// Applies `r`: moves the devices, rolls the candidate out to the new
/// candidate devices, commands the others back, records `r`.
///
/// # Errors
/// Registry and rollout errors (the experiment is left as it was when the
/// registry fails; a failed rollback command is logged, as at the end of an
/// experiment).
pub(crate) async fn apply(state: &Arc<State>, e: &mut Experiment, r: Reallocation) -> Result<()> {
    let tag = candidate_tag(&e.id);
    for d in &r.to_candidate {
        state.registry.update(d, |dev| {
            dev.tags.insert(tag.clone());
        })?;
    }
    for d in &r.to_control {
        state.registry.update(d, |dev| {
            dev.tags.remove(&tag);
        })?;
    }
    for d in &r.to_candidate {
        e.assignment.insert(d.clone(), 1);
    }
    for d in &r.to_control {
        e.assignment.insert(d.clone(), 0);
        let why = format!(
            "experiment {}: Thompson allocation moved this device back to the control (candidate share {:.3})",
            e.id, r.candidate_share
        );
        if let Err(x) = state.send_rollback(d, &why).await {
            tracing::warn!(experiment = %e.id, device = %d, error = %x, "rollback command failed");
        }
    }
    if !r.to_candidate.is_empty() {
        let spec: RolloutSpec = serde_json::from_value(serde_json::json!({
            "bundle": e.spec.candidate,
            "selector": {"group": e.spec.group, "tag": tag, "target": e.spec.target},
            "waves": ["100%"],
        }))
        .map_err(|x| Error::bad("candidate", x.to_string()))?;
        let ro = state.create_rollout(spec).await?;
        e.rollout = Some(ro.id);
    }
    tracing::info!(
        event = "experiment_reallocated",
        experiment = %e.id,
        candidate_share = r.candidate_share,
        to_candidate = r.to_candidate.len(),
        to_control = r.to_control.len(),
        "Thompson allocation moved devices"
    );
    e.allocations.push(r);
    e.updated_ms = now_ms();
    Ok(())
}

/// Whether the experiment's candidate rollout is still placing devices.
pub(crate) fn rollout_active(state: &State, e: &Experiment) -> bool {
    e.rollout.as_ref().is_some_and(|id| {
        state
            .lock_rollouts()
            .get(id)
            .is_some_and(|r| r.state.is_active())
    })
}
