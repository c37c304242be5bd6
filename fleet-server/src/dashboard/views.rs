//! What each dashboard page shows, gathered from the store as typed views
//! ([`render`](super::render) turns them into HTML; nothing here formats).

use std::collections::{BTreeMap, BTreeSet};

use edgefleet_drift::Verdict;
use edgefleet_protocol::messages::ReleaseRef;
use serde::{Deserialize, Serialize};

use crate::capture::CaptureBatch;
use crate::drift::{DriftRecord, RequestState, RetrainRequest};
use crate::registry::Device;
use crate::rollout::{DeviceProgress, DeviceState, Rollout, RolloutState};
use crate::{Result, State};

/// Rows per page of every list.
pub const PAGE_SIZE: usize = 50;

/// Devices listed under "needing attention" on the fleet page (the device
/// list, filtered by state, has them all).
pub const ATTENTION_ROWS: usize = 20;

/// A device's state as the fleet page counts it (first that applies).
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum DeviceClass {
    /// Not connected (offline status, last will, or heartbeat timeout).
    Offline,
    /// A candidate release is in its trial.
    InTrial,
    /// Downloading, verifying or staging a release.
    Updating,
    /// Its latest update rolled back (agent state, or its latest rollout outcome).
    RolledBack,
    /// Online and serving its committed release.
    Online,
}

impl DeviceClass {
    /// Every class, in the fleet page's order.
    pub const ALL: [DeviceClass; 5] = [
        DeviceClass::Online,
        DeviceClass::Updating,
        DeviceClass::InTrial,
        DeviceClass::RolledBack,
        DeviceClass::Offline,
    ];

    /// The query-string and CSS name.
    pub fn name(self) -> &'static str {
        match self {
            DeviceClass::Offline => "offline",
            DeviceClass::InTrial => "in_trial",
            DeviceClass::Updating => "updating",
            DeviceClass::RolledBack => "rolled_back",
            DeviceClass::Online => "online",
        }
    }

    /// What a person reads.
    pub fn label(self) -> &'static str {
        match self {
            DeviceClass::Offline => "offline",
            DeviceClass::InTrial => "in trial",
            DeviceClass::Updating => "updating",
            DeviceClass::RolledBack => "rolled back",
            DeviceClass::Online => "online",
        }
    }

    fn of(d: &Device, latest: Option<&DeviceProgress>) -> Self {
        let st = d.update_state.as_deref().unwrap_or("idle");
        if !d.online {
            DeviceClass::Offline
        } else if st == "trial" {
            DeviceClass::InTrial
        } else if matches!(st, "downloading" | "verifying" | "staging") {
            DeviceClass::Updating
        } else if st == "rolled_back" || latest.is_some_and(|p| p.state == DeviceState::RolledBack)
        {
            DeviceClass::RolledBack
        } else {
            DeviceClass::Online
        }
    }
}

/// `model r<release>`, or `none`.
pub fn release_label(r: Option<&ReleaseRef>) -> String {
    r.map_or_else(|| "none".into(), |r| format!("{} r{}", r.model, r.release))
}

/// Per device, its progress in the most recent rollout that includes it,
/// with that rollout.
struct Latest<'a> {
    /// Per device, every rollout it was in with its progress, oldest first.
    by_device: BTreeMap<&'a str, Vec<(&'a Rollout, &'a DeviceProgress)>>,
}

impl<'a> Latest<'a> {
    fn of(rollouts: &'a [Rollout]) -> Self {
        let mut by_device: BTreeMap<&str, Vec<(&Rollout, &DeviceProgress)>> = BTreeMap::new();
        for r in rollouts {
            for (id, p) in &r.devices {
                by_device.entry(id).or_default().push((r, p));
            }
        }
        for v in by_device.values_mut() {
            v.sort_by_key(|(r, _)| (r.created_ms, r.id.as_str()));
        }
        Latest { by_device }
    }

    /// The device's progress in its latest rollout.
    fn progress(&self, id: &str) -> Option<&'a DeviceProgress> {
        self.by_device.get(id)?.last().map(|(_, p)| *p)
    }

    /// The release the rollouts intend for `id`: that of its newest rollout
    /// that still means it, skipping those the device failed, rolled back,
    /// timed out or was cancelled in, and aborted or halted ones it had not
    /// committed in (the device then stays on what an older rollout gave it).
    fn intended(&self, id: &str) -> Option<&'a ReleaseRef> {
        self.by_device
            .get(id)?
            .iter()
            .rev()
            .find(|(r, p)| !dropped(r, p))
            .map(|(r, _)| &r.release)
    }
}

/// Whether a rollout no longer means its release for a device.
fn dropped(r: &Rollout, p: &DeviceProgress) -> bool {
    let done = matches!(
        p.state,
        DeviceState::Committed | DeviceState::AlreadyCurrent | DeviceState::ShadowEnded
    );
    let stopped = matches!(r.state, RolloutState::Aborted | RolloutState::Halted(_));
    (stopped && !done)
        || matches!(
            p.state,
            DeviceState::Cancelled
                | DeviceState::Failed
                | DeviceState::RolledBack
                | DeviceState::TimedOut
        )
}

fn snapshot_rollouts(s: &State) -> Vec<Rollout> {
    s.lock_rollouts().values().cloned().collect()
}

/// One row of the release table: a (group, target) pair.
#[derive(Debug, Clone)]
pub struct ReleaseRow {
    /// Group (`None` for devices in no group). A device in several groups
    /// is counted in each group's rows.
    pub group: Option<String>,
    /// Target profile (`None` when the device has not said).
    pub target: Option<String>,
    /// Devices in the pair.
    pub devices: usize,
    /// Releases the rollouts intend, with device counts.
    pub intended: BTreeMap<String, usize>,
    /// Releases actually active, with device counts.
    pub running: BTreeMap<String, usize>,
}

/// A device on the fleet page's attention list.
#[derive(Debug, Clone)]
pub struct Attention {
    /// Device id.
    pub device: String,
    /// Its class.
    pub class: DeviceClass,
    /// Why it is listed.
    pub why: String,
}

/// The fleet page.
#[derive(Debug, Clone)]
pub struct FleetView {
    /// Registered devices.
    pub total: usize,
    /// Devices per class, in [`DeviceClass::ALL`] order.
    pub counts: Vec<(DeviceClass, usize)>,
    /// Release distribution per (group, target).
    pub releases: Vec<ReleaseRow>,
    /// The first [`ATTENTION_ROWS`] devices needing attention.
    pub attention: Vec<Attention>,
    /// How many need attention in all.
    pub attention_total: usize,
    /// Open retraining requests.
    pub open_requests: usize,
    /// Running or paused rollouts.
    pub active_rollouts: usize,
}

/// Gathers the fleet page.
///
/// # Errors
/// Store errors.
pub fn fleet(s: &State) -> Result<FleetView> {
    let devices = s.registry.list()?;
    let rollouts = snapshot_rollouts(s);
    let latest = Latest::of(&rollouts);
    let requests = crate::drift::requests(s)?;
    let drifting: BTreeSet<&str> = requests
        .iter()
        .filter(|r| r.state == RequestState::Open)
        .flat_map(|r| r.drifting.iter().map(String::as_str))
        .collect();
    let mut counts: BTreeMap<DeviceClass, usize> = BTreeMap::new();
    let mut rows: BTreeMap<(Option<String>, Option<String>), ReleaseRow> = BTreeMap::new();
    let mut attention = Vec::new();
    for d in &devices {
        let class = DeviceClass::of(d, latest.progress(&d.id));
        *counts.entry(class).or_default() += 1;
        count_release(&mut rows, d, latest.intended(&d.id));
        if let Some(why) = attention_reason(d, class, latest.progress(&d.id), &drifting) {
            attention.push(Attention {
                device: d.id.clone(),
                class,
                why,
            });
        }
    }
    let attention_total = attention.len();
    attention.truncate(ATTENTION_ROWS);
    Ok(FleetView {
        total: devices.len(),
        counts: DeviceClass::ALL
            .iter()
            .map(|c| (*c, counts.get(c).copied().unwrap_or(0)))
            .collect(),
        releases: rows.into_values().collect(),
        attention,
        attention_total,
        open_requests: requests
            .iter()
            .filter(|r| r.state == RequestState::Open)
            .count(),
        active_rollouts: rollouts.iter().filter(|r| r.state.is_active()).count(),
    })
}

fn count_release(
    rows: &mut BTreeMap<(Option<String>, Option<String>), ReleaseRow>,
    d: &Device,
    intended: Option<&ReleaseRef>,
) {
    let target = d.target.clone();
    let groups: Vec<Option<String>> = if d.groups.is_empty() {
        vec![None]
    } else {
        d.groups.iter().cloned().map(Some).collect()
    };
    for g in groups {
        let row = rows
            .entry((g.clone(), target.clone()))
            .or_insert_with(|| ReleaseRow {
                group: g,
                target: target.clone(),
                devices: 0,
                intended: BTreeMap::new(),
                running: BTreeMap::new(),
            });
        row.devices += 1;
        *row.running
            .entry(release_label(d.active.as_ref()))
            .or_default() += 1;
        if let Some(r) = intended {
            *row.intended.entry(release_label(Some(r))).or_default() += 1;
        }
    }
}

fn attention_reason(
    d: &Device,
    class: DeviceClass,
    latest: Option<&DeviceProgress>,
    drifting: &BTreeSet<&str>,
) -> Option<String> {
    let failed = latest.filter(|p| {
        matches!(
            p.state,
            DeviceState::Failed | DeviceState::RolledBack | DeviceState::TimedOut
        )
    });
    if let Some(p) = failed {
        let reason = p.reason.clone().unwrap_or_else(|| "-".into());
        return Some(format!("latest rollout: {:?} ({reason})", p.state).to_lowercase());
    }
    if drifting.contains(d.id.as_str()) {
        return Some("drifting (open retraining request)".into());
    }
    match class {
        DeviceClass::Offline => Some("offline".into()),
        DeviceClass::RolledBack => Some("rolled back".into()),
        _ => None,
    }
}

/// Device list filters (`GET /devices`); unknown parameters are refused.
#[derive(Debug, Clone, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct DeviceFilter {
    /// Substring of the device id.
    pub q: Option<String>,
    /// Member of this group.
    pub group: Option<String>,
    /// On this target.
    pub target: Option<String>,
    /// In this class ([`DeviceClass::name`]).
    pub state: Option<String>,
    /// Page, from 1.
    pub page: Option<usize>,
}

/// One device-list row.
#[derive(Debug, Clone)]
pub struct DeviceRow {
    /// Device id.
    pub id: String,
    /// Class.
    pub class: DeviceClass,
    /// Target.
    pub target: String,
    /// Active release.
    pub active: String,
    /// Groups.
    pub groups: Vec<String>,
    /// Last message (server ms).
    pub last_seen_ms: u64,
}

/// The device list.
#[derive(Debug, Clone)]
pub struct DevicesView {
    /// The filters, as given (empty strings dropped).
    pub filter: DeviceFilter,
    /// This page's rows.
    pub rows: Vec<DeviceRow>,
    /// Devices matching the filters.
    pub matched: usize,
    /// Page shown (from 1) and pages in all.
    pub page: usize,
    /// Pages in all (at least 1).
    pub pages: usize,
    /// Every group and target (for the filter selects).
    pub groups: Vec<String>,
    /// Every target.
    pub targets: Vec<String>,
}

fn non_empty(v: &Option<String>) -> Option<String> {
    v.as_ref()
        .map(|s| s.trim().to_string())
        .filter(|s| !s.is_empty())
}

/// The page `page` (from 1, clamped) of `n` items: `(page, pages, range)`.
pub fn paging(n: usize, page: usize) -> (usize, usize, std::ops::Range<usize>) {
    let pages = n.div_ceil(PAGE_SIZE).max(1);
    let page = page.clamp(1, pages);
    let start = (page - 1) * PAGE_SIZE;
    (page, pages, start.min(n)..(start + PAGE_SIZE).min(n))
}

/// Gathers a filtered page of the device list.
///
/// # Errors
/// Store errors.
pub fn devices(s: &State, f: &DeviceFilter) -> Result<DevicesView> {
    let filter = DeviceFilter {
        q: non_empty(&f.q),
        group: non_empty(&f.group),
        target: non_empty(&f.target),
        state: non_empty(&f.state),
        page: f.page,
    };
    let all = s.registry.list()?;
    let rollouts = snapshot_rollouts(s);
    let latest = Latest::of(&rollouts);
    let groups: BTreeSet<String> = all.iter().flat_map(|d| d.groups.clone()).collect();
    let targets: BTreeSet<String> = all.iter().filter_map(|d| d.target.clone()).collect();
    let rows: Vec<DeviceRow> = all
        .iter()
        .map(|d| (d, DeviceClass::of(d, latest.progress(&d.id))))
        .filter(|(d, c)| keep(d, *c, &filter))
        .map(|(d, class)| DeviceRow {
            id: d.id.clone(),
            class,
            target: d.target.clone().unwrap_or_else(|| "-".into()),
            active: release_label(d.active.as_ref()),
            groups: d.groups.iter().cloned().collect(),
            last_seen_ms: d.last_seen_ms,
        })
        .collect();
    let (page, pages, range) = paging(rows.len(), filter.page.unwrap_or(1));
    Ok(DevicesView {
        matched: rows.len(),
        rows: rows[range].to_vec(),
        page,
        pages,
        filter,
        groups: groups.into_iter().collect(),
        targets: targets.into_iter().collect(),
    })
}

fn keep(d: &Device, c: DeviceClass, f: &DeviceFilter) -> bool {
    f.q.as_ref().is_none_or(|q| d.id.contains(q.as_str()))
        && f.group.as_ref().is_none_or(|g| d.groups.contains(g))
        && f.target
            .as_ref()
            .is_none_or(|t| d.target.as_deref() == Some(t.as_str()))
        && f.state.as_ref().is_none_or(|st| c.name() == st)
}

/// A chart: one x axis (seconds since the Unix epoch, UTC) and named series
/// in one unit. Serialised into the page for `assets/dashboard.js`.
#[derive(Debug, Clone, Serialize)]
pub struct Chart {
    /// Element id (tests and links find the chart by it).
    pub id: String,
    /// Title.
    pub title: String,
    /// Y axis label with its unit.
    pub y_label: String,
    /// Sample times (s since the epoch).
    pub x: Vec<f64>,
    /// Series: label and values (`None`: no value at that time).
    pub series: Vec<(String, Vec<Option<f64>>)>,
    /// A horizontal threshold line, if any.
    pub threshold: Option<f64>,
    /// Draw lines across missing values: yes where series are sampled at
    /// different times on a shared axis (drift reports); no where a missing
    /// value is an outage (telemetry buckets).
    pub span_gaps: bool,
}

impl Chart {
    /// Data points drawn (non-missing values over all series).
    pub fn points(&self) -> usize {
        self.series
            .iter()
            .map(|(_, v)| v.iter().flatten().count())
            .sum()
    }
}

/// One rollout a device took part in.
#[derive(Debug, Clone)]
pub struct DeviceRollout {
    /// Rollout id.
    pub rollout: String,
    /// Release offered.
    pub release: String,
    /// The rollout's state.
    pub rollout_state: RolloutState,
    /// The device's progress.
    pub progress: DeviceProgress,
    /// Created (server ms).
    pub created_ms: u64,
}

/// A drift feature's latest test.
#[derive(Debug, Clone)]
pub struct FeatureNow {
    /// Model.
    pub model: String,
    /// Feature name.
    pub feature: String,
    /// Statistic.
    pub statistic: f64,
    /// Threshold.
    pub threshold: Option<f64>,
    /// Effective sample size.
    pub n_eff: f64,
    /// Verdict.
    pub verdict: Verdict,
}

/// The device page.
#[derive(Debug, Clone)]
pub struct DeviceView {
    /// The registry record.
    pub device: Device,
    /// Class.
    pub class: DeviceClass,
    /// Rollouts it took part in, newest first.
    pub rollouts: Vec<DeviceRollout>,
    /// p50 / p99 latency (ms) over time.
    pub latency: Chart,
    /// Requests per second over time.
    pub rate: Chart,
    /// statistic / threshold per drift feature over time (alarm at 1).
    pub drift: Chart,
    /// Latest test per feature.
    pub features: Vec<FeatureNow>,
    /// Captured batches, newest first.
    pub captures: Vec<CaptureBatch>,
    /// Online accuracy per release.
    pub feedback: Vec<crate::telemetry::ReleaseFeedback>,
}

/// Telemetry bucket width of the device charts (s).
pub const CHART_BUCKET_S: u64 = 10;

/// Most points of a device's telemetry charts (buckets widen beyond it).
pub const CHART_POINTS: usize = 360;

/// Drift reports per device the charts read.
pub const CHART_REPORTS: usize = 200;

/// Gathers a device page; `None` for an unknown device.
///
/// # Errors
/// Store errors.
pub fn device(s: &State, id: &str) -> Result<Option<DeviceView>> {
    let Some(device) = s.registry.get(id)? else {
        return Ok(None);
    };
    let rollouts = snapshot_rollouts(s);
    let latest = Latest::of(&rollouts);
    let class = DeviceClass::of(&device, latest.progress(id));
    let mut mine: Vec<DeviceRollout> = rollouts
        .iter()
        .filter_map(|r| {
            r.devices.get(id).map(|p| DeviceRollout {
                rollout: r.id.clone(),
                release: release_label(Some(&r.release)),
                rollout_state: r.state.clone(),
                progress: p.clone(),
                created_ms: r.created_ms,
            })
        })
        .collect();
    mine.sort_by_key(|r| std::cmp::Reverse(r.created_ms));
    let tel = crate::telemetry::query(
        &s.store,
        &s.registry,
        &crate::telemetry::Query {
            device: Some(id.to_string()),
            bucket_s: Some(CHART_BUCKET_S),
            max_points: Some(CHART_POINTS),
            ..Default::default()
        },
    )?;
    let (latency, rate) = telemetry_charts(&tel);
    let (reports, _) = crate::drift::query(
        s,
        &crate::drift::Query {
            device: Some(id.to_string()),
            limit: Some(CHART_REPORTS),
            ..Default::default()
        },
    )?;
    let mut captures: Vec<CaptureBatch> =
        crate::store::scan(&s.store.captures, &crate::store::device_prefix(id))?;
    captures.sort_by_key(|c| std::cmp::Reverse(c.received_ms));
    Ok(Some(DeviceView {
        drift: drift_chart(
            "drift",
            "Drift: statistic / threshold per feature",
            &reports,
        ),
        features: latest_features(&reports),
        device,
        class,
        rollouts: mine,
        latency,
        rate,
        captures,
        feedback: tel.feedback,
    }))
}

/// Every bucket start from the first to the last, with the bucket when one
/// arrived: a gap (the device was offline) is a gap in the line, not a
/// straight segment across it.
fn with_gaps(t: &crate::telemetry::Summary) -> Vec<(u64, Option<&crate::telemetry::Bucket>)> {
    let step = ((t.bucket_s * 1e3).round() as u64).max(1);
    let (Some(first), Some(last)) = (t.series.first(), t.series.last()) else {
        return Vec::new();
    };
    let by: BTreeMap<u64, &crate::telemetry::Bucket> =
        t.series.iter().map(|b| (b.start_ms, b)).collect();
    (first.start_ms..=last.start_ms)
        .step_by(step as usize)
        .map(|at| (at, by.get(&at).copied()))
        .collect()
}

fn telemetry_charts(t: &crate::telemetry::Summary) -> (Chart, Chart) {
    let slots = with_gaps(t);
    let x: Vec<f64> = slots.iter().map(|(at, _)| *at as f64 / 1e3).collect();
    let col = |f: &dyn Fn(&crate::telemetry::Bucket) -> f64| -> Vec<Option<f64>> {
        slots.iter().map(|(_, b)| b.map(f)).collect()
    };
    let latency = Chart {
        id: "chart-latency".into(),
        title: "Inference latency".into(),
        y_label: "latency (ms)".into(),
        x: x.clone(),
        series: vec![
            ("p50".into(), col(&|b| b.p50_ms)),
            ("p99".into(), col(&|b| b.p99_ms)),
        ],
        threshold: None,
        span_gaps: false,
    };
    let rate = Chart {
        id: "chart-rate".into(),
        title: "Request rate".into(),
        y_label: "requests per second".into(),
        x,
        series: vec![
            (
                "requests/s".into(),
                col(&|b| b.requests as f64 / t.bucket_s),
            ),
            ("errors/s".into(), col(&|b| b.errors as f64 / t.bucket_s)),
        ],
        threshold: None,
        span_gaps: false,
    };
    (latency, rate)
}

/// statistic / threshold of every feature with a verdict, per report time.
fn drift_chart(id: &str, title: &str, reports: &[DriftRecord]) -> Chart {
    let with: Vec<&DriftRecord> = reports.iter().filter(|r| r.has_verdict()).collect();
    let names: BTreeSet<&str> = with
        .iter()
        .flat_map(|r| r.tests.iter().map(|t| t.name.as_str()))
        .collect();
    let series = names
        .iter()
        .map(|n| {
            let v = with
                .iter()
                .map(|r| {
                    r.tests
                        .iter()
                        .find(|t| t.name == *n)
                        .and_then(|t| ratio(t.statistic, t.threshold))
                })
                .collect();
            (n.to_string(), v)
        })
        .collect();
    Chart {
        id: id.into(),
        title: title.into(),
        y_label: "statistic / threshold (alarm at 1)".into(),
        x: with.iter().map(|r| r.received_ms as f64 / 1e3).collect(),
        series,
        threshold: Some(1.0),
        span_gaps: true,
    }
}

fn ratio(statistic: f64, threshold: Option<f64>) -> Option<f64> {
    threshold
        .filter(|t| *t > 0.0 && t.is_finite())
        .map(|t| statistic / t)
        .filter(|r| r.is_finite())
}

fn latest_features(reports: &[DriftRecord]) -> Vec<FeatureNow> {
    let mut by: BTreeMap<(String, String), FeatureNow> = BTreeMap::new();
    for r in reports {
        for t in &r.tests {
            by.insert(
                (r.release.model.clone(), t.name.clone()),
                FeatureNow {
                    model: r.release.model.clone(),
                    feature: t.name.clone(),
                    statistic: t.statistic,
                    threshold: t.threshold,
                    n_eff: t.n_eff,
                    verdict: t.verdict,
                },
            );
        }
    }
    by.into_values().collect()
}

/// The rollout list (newest first).
pub fn rollouts(s: &State, f: &ModelFilter) -> Listed<RolloutSummary> {
    let mut v: Vec<RolloutSummary> = snapshot_rollouts(s).iter().map(summary).collect();
    v.sort_by_key(|r| std::cmp::Reverse(r.created_ms));
    listed(v, |r| &r.model, f)
}

/// Query of the rollout and bundle lists: one model, a page.
#[derive(Debug, Clone, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ModelFilter {
    /// Only this model (empty: any).
    pub model: Option<String>,
    /// Page, from 1 ([`PAGE_SIZE`] rows each).
    pub page: Option<usize>,
}

/// One filtered page of a list.
#[derive(Debug, Clone)]
pub struct Listed<T> {
    /// The page's rows.
    pub rows: Vec<T>,
    /// Every model in the unfiltered list (the filter's choices).
    pub models: Vec<String>,
    /// The model filtered on.
    pub model: Option<String>,
    /// Rows matching the filter, on all pages.
    pub matched: usize,
    /// This page, from 1.
    pub page: usize,
    /// Pages in all.
    pub pages: usize,
}

/// Filters `all` (kept in order) to `f.model` and cuts `f.page`.
pub fn listed<T>(all: Vec<T>, model_of: impl Fn(&T) -> &str, f: &ModelFilter) -> Listed<T> {
    let models: BTreeSet<String> = all.iter().map(|t| model_of(t).to_string()).collect();
    let model = non_empty(&f.model);
    let mut kept: Vec<T> = all
        .into_iter()
        .filter(|t| model.as_deref().is_none_or(|m| model_of(t) == m))
        .collect();
    let matched = kept.len();
    let (page, pages, range) = paging(matched, f.page.unwrap_or(1));
    Listed {
        rows: kept.drain(range).collect(),
        models: models.into_iter().collect(),
        model,
        matched,
        page,
        pages,
    }
}

/// A rollout's headline.
#[derive(Debug, Clone)]
pub struct RolloutSummary {
    /// Id.
    pub id: String,
    /// Model of the release offered.
    pub model: String,
    /// Release offered.
    pub release: String,
    /// State.
    pub state: RolloutState,
    /// Current wave (from 0).
    pub current_wave: Option<usize>,
    /// Per wave counts.
    pub waves: Vec<crate::rollout::plan::WaveCounts>,
    /// Wave specs as given (`1`, `5%`, ...).
    pub wave_specs: Vec<String>,
    /// Devices in all.
    pub devices: usize,
    /// Created (server ms).
    pub created_ms: u64,
}

fn summary(r: &Rollout) -> RolloutSummary {
    RolloutSummary {
        id: r.id.clone(),
        model: r.release.model.clone(),
        release: release_label(Some(&r.release)),
        state: r.state.clone(),
        current_wave: r.current_wave,
        waves: (0..r.wave_ends.len()).map(|w| r.wave_counts(w)).collect(),
        wave_specs: r.spec.waves.clone(),
        devices: r.order.len(),
        created_ms: r.created_ms,
    }
}

/// The rollout page.
#[derive(Debug, Clone)]
pub struct RolloutView {
    /// Headline.
    pub summary: RolloutSummary,
    /// The gate: most failures per wave (fraction), wave timeout (s), trial policy.
    pub max_failure_rate: f64,
    /// Wave timeout (s).
    pub wave_timeout_s: u64,
    /// Trial policy as text.
    pub trial: String,
    /// Roll back the committed devices on a halt.
    pub rollback_on_halt: bool,
    /// Transitions, oldest first.
    pub history: Vec<String>,
    /// This page of devices, in wave order.
    pub devices: Vec<(String, DeviceProgress)>,
    /// Page (from 1) and pages.
    pub page: usize,
    /// Pages in all.
    pub pages: usize,
}

/// Gathers a rollout page; `None` for an unknown id.
pub fn rollout(s: &State, id: &str, page: usize) -> Option<RolloutView> {
    let r = s.lock_rollouts().get(id).cloned()?;
    let (page, pages, range) = paging(r.order.len(), page);
    let devices = r.order[range]
        .iter()
        .filter_map(|d| r.devices.get(d).map(|p| (d.clone(), p.clone())))
        .collect();
    Some(RolloutView {
        summary: summary(&r),
        max_failure_rate: r.spec.max_failure_rate,
        wave_timeout_s: r.spec.wave_timeout_s,
        trial: r.spec.trial.to_string(),
        rollback_on_halt: r.spec.rollback_on_halt,
        history: r.history.clone(),
        devices,
        page,
        pages,
    })
}

/// Drift page filter.
#[derive(Debug, Clone, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct DriftFilter {
    /// Only this group (default: every group).
    pub group: Option<String>,
}

/// One device on the drift page.
#[derive(Debug, Clone)]
pub struct DriftDevice {
    /// Device id.
    pub device: String,
    /// Model of its latest report with a verdict.
    pub model: String,
    /// Largest statistic / threshold in that report.
    pub ratio: f64,
    /// Feature with that ratio.
    pub feature: String,
    /// The report's verdict.
    pub verdict: Verdict,
    /// A member of an open retraining request, or its latest verdict is drift.
    pub flagged: bool,
}

/// One group on the drift page.
#[derive(Debug, Clone)]
pub struct DriftGroup {
    /// Group.
    pub group: String,
    /// Largest statistic / threshold per device over time (the
    /// [`MAX_CHART_DEVICES`] highest now).
    pub chart: Chart,
    /// The group's devices with a verdict, flagged first, then by ratio:
    /// every flagged one, and unflagged ones up to [`MAX_TABLE_DEVICES`].
    pub devices: Vec<DriftDevice>,
    /// Unflagged devices left out of `devices` (lower ratios).
    pub more: usize,
}

/// Devices listed per group on the drift page besides the flagged ones (a
/// group of 10,000 would otherwise be one 10,000-row table).
pub const MAX_TABLE_DEVICES: usize = 50;

/// Devices drawn per group chart.
pub const MAX_CHART_DEVICES: usize = 12;

/// Drift reports per device the drift page reads.
pub const GROUP_REPORTS: usize = 60;

/// The drift page.
#[derive(Debug, Clone)]
pub struct DriftView {
    /// Groups shown.
    pub groups: Vec<DriftGroup>,
    /// Retraining requests, open first, newest first.
    pub requests: Vec<RetrainRequest>,
}

/// Gathers the drift page.
///
/// # Errors
/// Store errors.
pub fn drift(s: &State, f: &DriftFilter) -> Result<DriftView> {
    let mut requests = crate::drift::requests(s)?;
    requests.sort_by_key(|r| {
        (
            r.state != RequestState::Open,
            std::cmp::Reverse(r.opened_ms),
        )
    });
    let open: BTreeSet<String> = requests
        .iter()
        .filter(|r| r.state == RequestState::Open)
        .flat_map(|r| r.drifting.clone())
        .collect();
    let all_groups: BTreeSet<String> = s
        .registry
        .list()?
        .into_iter()
        .flat_map(|d| d.groups)
        .collect();
    let groups = match non_empty(&f.group) {
        Some(g) => vec![g],
        None => all_groups.into_iter().collect(),
    };
    let groups = groups
        .into_iter()
        .map(|g| drift_group(s, g, &open))
        .collect::<Result<Vec<_>>>()?;
    if let Some(g) = non_empty(&f.group) {
        requests.retain(|r| r.group == g);
    }
    Ok(DriftView { groups, requests })
}

fn drift_group(s: &State, group: String, open: &BTreeSet<String>) -> Result<DriftGroup> {
    let (reports, _) = crate::drift::query(
        s,
        &crate::drift::Query {
            group: Some(group.clone()),
            limit: Some(GROUP_REPORTS),
            ..Default::default()
        },
    )?;
    let mut per_device: BTreeMap<&str, Vec<&DriftRecord>> = BTreeMap::new();
    for r in reports.iter().filter(|r| r.has_verdict()) {
        per_device.entry(&r.device).or_default().push(r);
    }
    let mut devices: Vec<DriftDevice> = per_device
        .iter()
        .filter_map(|(d, rs)| {
            let last = rs.last()?;
            let (ratio, feature) = max_ratio(last);
            Some(DriftDevice {
                device: d.to_string(),
                model: last.release.model.clone(),
                ratio,
                feature,
                verdict: last.verdict,
                flagged: open.contains(*d) || last.verdict == Verdict::Drift,
            })
        })
        .collect();
    devices.sort_by(|a, b| b.flagged.cmp(&a.flagged).then(b.ratio.total_cmp(&a.ratio)));
    let keep = devices
        .iter()
        .filter(|d| d.flagged)
        .count()
        .max(MAX_TABLE_DEVICES);
    let more = devices.len().saturating_sub(keep);
    devices.truncate(keep);
    let drawn: Vec<&str> = devices
        .iter()
        .take(MAX_CHART_DEVICES)
        .map(|d| d.device.as_str())
        .collect();
    let chart = group_chart(&group, &drawn, &per_device);
    Ok(DriftGroup {
        group,
        chart,
        devices,
        more,
    })
}

fn max_ratio(r: &DriftRecord) -> (f64, String) {
    r.tests
        .iter()
        .filter_map(|t| ratio(t.statistic, t.threshold).map(|x| (x, t.name.clone())))
        .max_by(|a, b| a.0.total_cmp(&b.0))
        .unwrap_or((0.0, "-".into()))
}

/// One series per drawn device on the union of their report times.
fn group_chart(
    group: &str,
    drawn: &[&str],
    per_device: &BTreeMap<&str, Vec<&DriftRecord>>,
) -> Chart {
    let mut times: BTreeSet<u64> = BTreeSet::new();
    for d in drawn {
        times.extend(per_device[d].iter().map(|r| r.received_ms));
    }
    let times: Vec<u64> = times.into_iter().collect();
    let series = drawn
        .iter()
        .map(|d| {
            let at: BTreeMap<u64, f64> = per_device[d]
                .iter()
                .map(|r| (r.received_ms, max_ratio(r).0))
                .collect();
            (
                d.to_string(),
                times.iter().map(|t| at.get(t).copied()).collect(),
            )
        })
        .collect();
    Chart {
        id: format!("chart-drift-{group}"),
        title: format!("Group {group}: largest statistic / threshold per device"),
        y_label: "statistic / threshold (alarm at 1)".into(),
        x: times.iter().map(|t| *t as f64 / 1e3).collect(),
        series,
        threshold: Some(1.0),
        span_gaps: true,
    }
}

/// The bundle page: every bundle, newest upload first.
///
/// # Errors
/// Store errors.
pub fn bundles(s: &State, f: &ModelFilter) -> Result<Listed<crate::bundles::BundleInfo>> {
    let mut v = s.bundles.list()?;
    v.sort_by_key(|b| std::cmp::Reverse(b.uploaded_ms));
    Ok(listed(v, |b| &b.model, f))
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;

    #[test]
    fn an_outage_is_a_gap_in_the_telemetry_charts() {
        let bucket = |start_ms: u64, requests: u64| crate::telemetry::Bucket {
            start_ms,
            requests,
            errors: 0,
            error_rate: 0.0,
            p50_ms: 1.0,
            p99_ms: 2.0,
        };
        let t = crate::telemetry::Summary {
            records: 3,
            devices: 1,
            requests: 6,
            errors: 0,
            error_rate: 0.0,
            p50_ms: 1.0,
            p99_ms: 2.0,
            bucket_s: 60.0,
            series: vec![
                bucket(600_000, 60),
                bucket(660_000, 120),
                bucket(840_000, 60),
            ],
            feedback: vec![],
        };
        let (latency, rate) = telemetry_charts(&t);
        assert_eq!(latency.x, [600.0, 660.0, 720.0, 780.0, 840.0]);
        assert_eq!(
            rate.series[0].1,
            [Some(1.0), Some(2.0), None, None, Some(1.0)],
            "requests/s with the two missing minutes left empty"
        );
        assert!(!latency.span_gaps && !rate.span_gaps);
        assert_eq!(latency.points(), 6);
    }

    #[test]
    fn paging_clamps_and_covers_every_row() {
        assert_eq!(paging(0, 1), (1, 1, 0..0));
        assert_eq!(paging(50, 1), (1, 1, 0..50));
        assert_eq!(paging(51, 2), (2, 2, 50..51));
        assert_eq!(paging(51, 9), (2, 2, 50..51));
        assert_eq!(paging(120, 0), (1, 3, 0..50));
    }

    #[test]
    fn rolled_out_counts_only_what_a_rollout_still_means_a_device_to_run() {
        use crate::registry::Selector;
        use crate::rollout::plan::{RolloutSpec, WaveSpec};
        use edgefleet_protocol::messages::TrialPolicy;
        let spec = RolloutSpec {
            bundle: "x".into(),
            selector: Selector::default(),
            waves: vec!["100%".into()],
            seed: 1,
            wave_timeout_s: 10,
            max_failure_rate: 0.0,
            rollback_on_halt: false,
            trial: TrialPolicy::default(),
        };
        let rel = ReleaseRef {
            model: "m".into(),
            release: 2,
            version: "1.0.0".into(),
        };
        let states = [
            DeviceState::Committed,
            DeviceState::AlreadyCurrent,
            DeviceState::Offered,
            DeviceState::Pending,
            DeviceState::Failed,
            DeviceState::RolledBack,
            DeviceState::TimedOut,
            DeviceState::Cancelled,
        ];
        let ids: Vec<String> = (0..states.len()).map(|i| format!("d{i}")).collect();
        let waves = [WaveSpec::parse("100%").unwrap()];
        let mut r = Rollout::new("r".into(), spec, rel, &waves, ids.clone(), &[], 0);
        for (id, st) in ids.iter().zip(&states) {
            r.devices.get_mut(id).unwrap().state = st.clone();
        }
        let intended = |r: &Rollout| -> Vec<&str> {
            let all = [r.clone()];
            let l = Latest::of(&all);
            ids.iter()
                .filter(|id| l.intended(id).is_some())
                .map(|id| match id.as_str() {
                    "d0" => "committed",
                    "d1" => "already_current",
                    "d2" => "offered",
                    "d3" => "pending",
                    _ => "a failure",
                })
                .collect()
        };
        assert_eq!(
            intended(&r),
            ["committed", "already_current", "offered", "pending"]
        );
        for stopped in [RolloutState::Halted("wave 0".into()), RolloutState::Aborted] {
            r.state = stopped;
            assert_eq!(
                intended(&r),
                ["committed", "already_current"],
                "{:?}",
                r.state
            );
        }
        // An older completed rollout of release 1 to every device: where the
        // newer one is dropped, the device is meant to stay on release 1.
        let mut older = r.clone();
        older.id = "r0".into();
        older.created_ms = 0;
        older.release.release = 1;
        older.state = RolloutState::Completed;
        for p in older.devices.values_mut() {
            p.state = DeviceState::Committed;
        }
        r.created_ms = 10;
        let both = [r.clone(), older];
        let l = Latest::of(&both);
        let got: Vec<u64> = ids
            .iter()
            .map(|id| l.intended(id).unwrap().release)
            .collect();
        assert_eq!(got, [2, 2, 1, 1, 1, 1, 1, 1]);
        assert_eq!(
            l.progress("d4").unwrap().state,
            DeviceState::Failed,
            "progress: the newest"
        );
    }

    #[test]
    fn lists_filter_by_model_then_page_in_order() {
        let all: Vec<(String, usize)> = (0..130)
            .map(|i| (if i % 3 == 0 { "vad" } else { "ocr" }.to_string(), i))
            .collect();
        let f = |model: &str, page| ModelFilter {
            model: Some(model.into()),
            page: Some(page),
        };
        let l = listed(all.clone(), |t| &t.0, &f("vad", 1));
        assert_eq!((l.matched, l.page, l.pages), (44, 1, 1));
        assert_eq!(
            l.rows.iter().map(|t| t.1).collect::<Vec<_>>(),
            (0..130).step_by(3).collect::<Vec<_>>()
        );
        assert_eq!(l.models, ["ocr", "vad"]);
        let l = listed(all.clone(), |t| &t.0, &f("ocr", 9));
        assert_eq!(
            (l.matched, l.page, l.pages, l.rows.len()),
            (86, 2, 2, 36),
            "page clamped to the last"
        );
        assert_eq!(l.rows[0].1, 76, "the 51st ocr row");
        let l = listed(all.clone(), |t| &t.0, &f(" ", 1));
        assert_eq!(
            (l.model, l.matched, l.rows.len()),
            (None, 130, 50),
            "blank: any model"
        );
        let l = listed(all, |t| &t.0, &f("nope", 1));
        assert_eq!((l.matched, l.pages, l.rows.len()), (0, 1, 0));
    }

    #[test]
    fn ratios_refuse_missing_and_zero_thresholds() {
        assert_eq!(ratio(2.0, Some(4.0)), Some(0.5));
        assert_eq!(ratio(2.0, None), None);
        assert_eq!(ratio(2.0, Some(0.0)), None);
        assert_eq!(ratio(f64::INFINITY, Some(1.0)), None);
    }
}
