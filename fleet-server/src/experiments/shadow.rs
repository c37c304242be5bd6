//! The shadow arm of an experiment (issue #13, point 5; docs/loop.md,
//! "Shadow experiments").
//!
//! With `"candidate_mode": "shadow"` the B devices do not serve the
//! candidate: their rollout offers it with a trial of mode `shadow` and end
//! `discard` ([`TrialEnd::Discard`]), so each B device keeps answering with
//! the control and runs the candidate on the same inputs beside it. The
//! agent reports the candidate's runs in telemetry under the candidate's
//! release (requests, errors, latency) with `shadow: {compared, agreed}`,
//! its agreement with the served answer. The arms compared are therefore:
//! - A: every answer the control served (A devices and B devices alike);
//! - B: the candidate's shadow runs.
//!
//! Only metrics a shadow run can measure are allowed as the primary metric
//! (`latency_p50_ms`, `error_rate`): its answers are never served, so there
//! are no feedback labels for them, and its CPU cannot be told apart from
//! the control's on the same device. Agreement is reported with its Wilson
//! interval and, with `min_agreement`, gates a win: a candidate that beats
//! the control but agrees with it less than that is not promoted.
//!
//! The shadow trial lasts `shadow_window_s`; the experiment ends
//! inconclusive when that passes without a decision. Ending it cancels the
//! B rollout (each device discards the candidate, `shadow_ended`, without
//! refusing it); promotion is an ordinary rollout of the candidate to the
//! whole cohort, which a device still shadowing accepts as the end of its
//! shadow.

use edgefleet_protocol::messages::{TrialEnd, TrialMode, TrialPolicy};
use serde::{Deserialize, Serialize};

use super::{CreateExperiment, Experiment, MetricKind};
use crate::rollout::RolloutState;
use crate::{Error, Result, State};

/// How the candidate runs on the B devices.
#[derive(Debug, Clone, Copy, Serialize, Deserialize, PartialEq, Eq, Default)]
#[serde(rename_all = "snake_case")]
pub enum CandidateMode {
    /// The candidate serves the B devices' requests (an A/B test).
    #[default]
    Serve,
    /// The candidate shadows the control on the B devices' live inputs;
    /// its answers are discarded.
    Shadow,
}

/// Default shadow window (s): one hour.
pub(crate) fn default_window_s() -> u64 {
    3600
}

/// Grace after the shadow window before the B rollout times a device out
/// (s): the device reports `shadow_ended` at the window's end.
const ROLLOUT_GRACE_S: u64 = 300;

/// Checks the shadow fields of a create request.
///
/// # Errors
/// [`Error::BadRequest`] naming `metric`, `guardrails`, `allocation`,
/// `shadow_window_s` or `min_agreement`.
pub(crate) fn check(s: &CreateExperiment) -> Result<()> {
    if let Some(t) = &s.trial {
        t.validate()
            .map_err(|e| Error::bad("trial", e.to_string()))?;
    }
    if s.candidate_mode == CandidateMode::Shadow && s.trial.is_some() {
        return Err(Error::bad(
            "trial",
            "a shadow arm's trial is set by the experiment (shadow_window_s)",
        ));
    }
    if s.candidate_mode == CandidateMode::Serve {
        if s.min_agreement.is_some() {
            return Err(Error::bad(
                "min_agreement",
                "only a shadow candidate (candidate_mode: shadow) reports agreement",
            ));
        }
        return Ok(());
    }
    if !measurable(s.metric) {
        return Err(Error::bad(
            "metric",
            format!(
                "a shadow candidate's answers are not served: compare latency_p50_ms or error_rate, not {}",
                s.metric.name()
            ),
        ));
    }
    if let Some(g) = s.guardrails.iter().find(|g| !measurable(g.metric)) {
        return Err(Error::bad(
            "guardrails",
            format!(
                "a shadow candidate cannot be measured on {}",
                g.metric.name()
            ),
        ));
    }
    if s.allocation != super::Allocation::Fixed {
        return Err(Error::bad(
            "allocation",
            "Thompson allocation moves devices between serving arms; a shadow arm serves nothing",
        ));
    }
    if s.shadow_window_s == 0 || s.shadow_window_s > TrialPolicy::MAX_WINDOW_S {
        return Err(Error::bad(
            "shadow_window_s",
            format!(
                "= {} is outside 1..={}",
                s.shadow_window_s,
                TrialPolicy::MAX_WINDOW_S
            ),
        ));
    }
    if let Some(m) = s.min_agreement {
        if !(0.0..=1.0).contains(&m) {
            return Err(Error::bad(
                "min_agreement",
                format!("{m} is outside [0, 1]"),
            ));
        }
    }
    Ok(())
}

fn measurable(m: MetricKind) -> bool {
    matches!(m, MetricKind::LatencyP50Ms | MetricKind::ErrorRate)
}

/// The rollout body that gives the B devices the candidate: as a shadow
/// trial that never commits for a shadow arm, an ordinary one otherwise.
pub(crate) fn rollout_body(e: &Experiment, tag: &str) -> serde_json::Value {
    let mut body = serde_json::json!({
        "bundle": e.spec.candidate,
        "selector": {"group": e.spec.group, "tag": tag, "target": e.spec.target},
        "waves": ["100%"],
    });
    if let (CandidateMode::Serve, Some(t)) = (e.spec.candidate_mode, &e.spec.trial) {
        body["trial"] = serde_json::to_value(t).unwrap_or_default();
    }
    if e.spec.candidate_mode == CandidateMode::Shadow {
        let w = e.spec.shadow_window_s;
        body["trial"] = serde_json::json!({
            "mode": TrialMode::Shadow,
            "end": TrialEnd::Discard,
            "window_s": w,
            "min_requests": 0,
        });
        body["wave_timeout_s"] = (w + ROLLOUT_GRACE_S).into();
    }
    body
}

/// Why a running shadow experiment must stop now, if it must: its window
/// passed (`ControlKept`, inconclusive), or its rollout halted because the
/// candidate failed its trial on devices (`Stopped`).
pub(crate) fn forced_end(
    state: &State,
    e: &Experiment,
    now_ms: u64,
) -> Option<(super::ExperimentState, String)> {
    if e.spec.candidate_mode != CandidateMode::Shadow {
        return None;
    }
    let halted = e.rollout.as_ref().and_then(|id| {
        match state.lock_rollouts().get(id).map(|r| r.state.clone()) {
            Some(RolloutState::Halted(why)) => Some(why),
            _ => None,
        }
    });
    if let Some(why) = halted {
        return Some((
            super::ExperimentState::Stopped,
            format!("the shadow candidate failed its trial on devices: {why}"),
        ));
    }
    let ends = e
        .created_ms
        .saturating_add(e.spec.shadow_window_s.saturating_mul(1000));
    (now_ms >= ends).then(|| {
        (
            super::ExperimentState::ControlKept,
            format!(
                "inconclusive: the shadow window of {} s passed without a decision",
                e.spec.shadow_window_s
            ),
        )
    })
}

/// The agreement of the shadow candidate with the control, in words with
/// its 95 % Wilson score interval (Wilson 1927, "Probable inference, the law
/// of succession, and statistical inference", JASA 22:209): a description,
/// not a sequential decision. Empty for a serving candidate.
pub(crate) fn agreement_text(e: &Experiment) -> String {
    if e.spec.candidate_mode != CandidateMode::Shadow {
        return String::new();
    }
    let a = &e.arms[1].agreement;
    let (n, k) = (a.trials(), a.successes());
    match wilson(k, n, 1.96) {
        Some((lo, hi)) => format!(
            "; agreement with the control {:.4} (95% Wilson {:.4} .. {:.4}, n = {n})",
            k as f64 / n as f64,
            lo,
            hi
        ),
        None => "; no agreement measured".into(),
    }
}

/// With `min_agreement`, why a winning shadow candidate is kept out: its
/// measured agreement (the point estimate, looked at once, when the
/// primary test has decided) is below the minimum, or none was measured.
pub(crate) fn agreement_short(e: &Experiment) -> Option<String> {
    let min = e.spec.min_agreement?;
    let a = &e.arms[1].agreement;
    if a.trials() == 0 {
        return Some(format!("no agreement measured (min_agreement {min})"));
    }
    let p = a.successes() as f64 / a.trials() as f64;
    (p < min).then(|| format!("agreement {p:.4} is below min_agreement {min}"))
}

/// Wilson score interval of `k` successes in `n` trials at normal quantile
/// `z`; `None` when `n` is 0.
pub fn wilson(k: u64, n: u64, z: f64) -> Option<(f64, f64)> {
    if n == 0 {
        return None;
    }
    let (n, p) = (n as f64, k as f64 / n as f64);
    let z2 = z * z;
    let centre = (p + z2 / (2.0 * n)) / (1.0 + z2 / n);
    let half = z / (1.0 + z2 / n) * (p * (1.0 - p) / n + z2 / (4.0 * n * n)).sqrt();
    Some(((centre - half).max(0.0), (centre + half).min(1.0)))
}

#[cfg(test)]
mod tests {
    use super::wilson;

    /// Values from Newcombe (1998), "Two-sided confidence intervals for the
    /// single proportion", Statistics in Medicine 17:857, table I (method 3).
    #[test]
    fn wilson_matches_newcombe_table() {
        let (lo, hi) = wilson(81, 263, 1.959_964).expect("n > 0");
        assert!(
            (lo - 0.2553).abs() < 1e-4 && (hi - 0.3662).abs() < 1e-4,
            "{lo} {hi}"
        );
        let (lo, hi) = wilson(15, 148, 1.959_964).expect("n > 0");
        assert!(
            (lo - 0.0624).abs() < 1e-4 && (hi - 0.1605).abs() < 1e-4,
            "{lo} {hi}"
        );
        let (lo, hi) = wilson(0, 20, 1.959_964).expect("n > 0");
        assert!(lo == 0.0 && (hi - 0.1611).abs() < 1e-4, "{lo} {hi}");
        assert_eq!(wilson(0, 0, 1.96), None);
    }
}
