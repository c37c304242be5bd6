//! The retraining job's state machine as one transition table, with no I/O
//! (in the manner of Mender's update state machine: every state change goes
//! through [`next`], so a test can drive every state with every event).
//!
//! ```text
//! queued -> collecting -> training -> compiling -> canary -> experiment -> promoted
//!              |             |  ^         |          |           |
//!              |             +--+ retry   |          +-----------+--> rejected
//!              +-------------+------------+-> failed / rejected (gate)
//! any non-terminal state --cancel--> cancelled
//! ```

use serde::{Deserialize, Serialize};

/// Where a retraining job is (docs/loop.md, "Job states").
#[derive(Debug, Clone, Copy, Serialize, Deserialize, PartialEq, Eq, PartialOrd, Ord, Hash)]
#[serde(rename_all = "snake_case")]
pub enum JobState {
    /// Created; the server has not cut its dataset yet.
    Queued,
    /// The server is cutting the dataset version from the cohort's captures.
    Collecting,
    /// Waiting for, or held by, a training worker (under a lease).
    Training,
    /// The worker trained the model and is compiling, signing and uploading
    /// bundles (still under its lease).
    Compiling,
    /// The candidate runs on the cohort's canary devices.
    Canary,
    /// The candidate is in an A/B experiment against the current release.
    Experiment,
    /// The candidate won and is the cohort's release. Terminal.
    Promoted,
    /// The gate, the canary or the experiment said the candidate is not
    /// better. Terminal; the job records the numbers.
    Rejected,
    /// Something broke (no data, a worker failed too often). Terminal.
    Failed,
    /// An operator cancelled it. Terminal.
    Cancelled,
}

impl JobState {
    /// Every state, in the order of the pipeline.
    pub const ALL: [JobState; 10] = [
        JobState::Queued,
        JobState::Collecting,
        JobState::Training,
        JobState::Compiling,
        JobState::Canary,
        JobState::Experiment,
        JobState::Promoted,
        JobState::Rejected,
        JobState::Failed,
        JobState::Cancelled,
    ];

    /// True for promoted, rejected, failed and cancelled.
    pub fn is_terminal(self) -> bool {
        matches!(
            self,
            JobState::Promoted | JobState::Rejected | JobState::Failed | JobState::Cancelled
        )
    }

    /// True while a worker lease applies (training, compiling).
    pub fn is_leased(self) -> bool {
        matches!(self, JobState::Training | JobState::Compiling)
    }

    /// The snake_case name (`training`).
    pub fn name(self) -> &'static str {
        match self {
            JobState::Queued => "queued",
            JobState::Collecting => "collecting",
            JobState::Training => "training",
            JobState::Compiling => "compiling",
            JobState::Canary => "canary",
            JobState::Experiment => "experiment",
            JobState::Promoted => "promoted",
            JobState::Rejected => "rejected",
            JobState::Failed => "failed",
            JobState::Cancelled => "cancelled",
        }
    }
}

/// What happened to a job.
#[derive(Debug, Clone, Copy, Serialize, Deserialize, PartialEq, Eq, Hash)]
#[serde(rename_all = "snake_case")]
pub enum Event {
    /// The server starts cutting the dataset.
    Collect,
    /// The dataset version exists; the job waits for a worker.
    DatasetReady,
    /// No captured data to train on.
    NoData,
    /// The worker finished training and starts compiling.
    Trained,
    /// The worker uploaded the candidate's bundles and its gate passed.
    Uploaded,
    /// The candidate's gate (new data and previous test set) failed.
    GateFailed,
    /// The worker reported a failure, or its lease expired; a retry is left.
    Retry,
    /// The worker reported a failure, or its lease expired; no retry left.
    GiveUp,
    /// The canary devices committed the candidate.
    CanaryPassed,
    /// A canary device rolled the candidate back.
    CanaryFailed,
    /// The experiment's decision rule says the candidate is better.
    ExperimentWon,
    /// The experiment's decision rule or a guardrail says it is not.
    ExperimentLost,
    /// An operator cancelled the job.
    Cancel,
}

/// The transition table: the state after `event` in state `from`, or
/// `None` for any pair not in the table (every event in a terminal state
/// included).
pub fn next(from: JobState, event: Event) -> Option<JobState> {
    use Event as E;
    use JobState as S;
    let to = match (from, event) {
        (s, E::Cancel) if !s.is_terminal() => S::Cancelled,
        (S::Queued, E::Collect) => S::Collecting,
        (S::Collecting, E::DatasetReady) => S::Training,
        (S::Collecting, E::NoData) => S::Failed,
        (S::Training, E::Trained) => S::Compiling,
        (S::Training | S::Compiling, E::GateFailed) => S::Rejected,
        (S::Training | S::Compiling, E::Retry) => S::Training,
        (S::Training | S::Compiling, E::GiveUp) => S::Failed,
        (S::Compiling, E::Uploaded) => S::Canary,
        (S::Canary, E::CanaryPassed) => S::Experiment,
        (S::Canary, E::CanaryFailed) => S::Rejected,
        (S::Experiment, E::ExperimentWon) => S::Promoted,
        (S::Experiment, E::ExperimentLost) => S::Rejected,
        _ => return None,
    };
    Some(to)
}

#[cfg(test)]
mod tests {
    use super::*;

    const EVENTS: [Event; 13] = [
        Event::Collect,
        Event::DatasetReady,
        Event::NoData,
        Event::Trained,
        Event::Uploaded,
        Event::GateFailed,
        Event::Retry,
        Event::GiveUp,
        Event::CanaryPassed,
        Event::CanaryFailed,
        Event::ExperimentWon,
        Event::ExperimentLost,
        Event::Cancel,
    ];

    /// Every (state, event) pair: terminal states refuse everything, cancel
    /// works from every other state, and exactly the documented pairs are
    /// allowed (the count pins the table).
    #[test]
    fn table_is_exact() {
        let mut allowed = 0;
        for s in JobState::ALL {
            for e in EVENTS {
                if let Some(t) = next(s, e) {
                    allowed += 1;
                    assert!(!s.is_terminal(), "{s:?} {e:?} -> {t:?}");
                }
            }
            if !s.is_terminal() {
                assert_eq!(next(s, Event::Cancel), Some(JobState::Cancelled));
            }
        }
        // 6 cancels + 15 pipeline pairs.
        assert_eq!(allowed, 6 + 15);
    }

    /// The happy path reaches promoted; a retry returns to training.
    #[test]
    fn paths() {
        let mut s = JobState::Queued;
        for e in [
            Event::Collect,
            Event::DatasetReady,
            Event::Retry,
            Event::Trained,
            Event::Retry,
            Event::Trained,
            Event::Uploaded,
            Event::CanaryPassed,
            Event::ExperimentWon,
        ] {
            s = next(s, e).expect("allowed");
        }
        assert_eq!(s, JobState::Promoted);
        assert!(s.is_terminal());
        assert_eq!(
            next(JobState::Compiling, Event::GateFailed),
            Some(JobState::Rejected)
        );
    }
}
