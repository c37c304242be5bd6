//! Drift ingestion, the drift time series and the drift rule
//! (docs/fleet-server.md, "Drift").
//!
//! Every [`DriftMessage`] is stored as a [`DriftRecord`] (the last
//! [`REPORTS_PER_DEVICE`] per device). The rule is evaluated per
//! `(group, model)` on every report and on a periodic tick ([`spawn_tick`]):
//! a device *drifts* when it is online and its latest report with a verdict
//! (`ok` or `drift`) received within [`crate::DriftRule::window_s`], of the
//! release it runs, says `drift`. When the drifting devices reach
//! `min_devices` and `min_fraction` of the group, a [`RetrainRequest`] opens;
//! while open its members follow the drifting set (joins and leaves are kept
//! in its history, evidence per device and feature), and it closes itself
//! when no member has drifted for [`crate::DriftRule::close_after_s`].

use std::collections::{BTreeMap, BTreeSet};
use std::sync::Arc;
use std::time::Duration;

use edgefleet_drift::{DataQuality, TestKind, Verdict};
use edgefleet_protocol::messages::{DriftMessage, ReleaseRef};
use serde::{Deserialize, Serialize};
use tokio::sync::watch;

use crate::registry::Device;
use crate::store::{self, device_prefix, now_ms, seq_key};
use crate::{Result, State};

/// Reports kept per device (oldest dropped first): at one report every 10 s,
/// about 5.5 hours.
pub const REPORTS_PER_DEVICE: usize = 2000;

/// History entries kept per retraining request (oldest dropped first).
pub const HISTORY_PER_REQUEST: usize = 1000;

/// One test of a stored report: what is needed to audit its verdict.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
pub struct TestRecord {
    /// Feature name, or `classes`.
    pub name: String,
    /// Statistic (`psi` or `chi_square`).
    pub kind: TestKind,
    /// The statistic's value (PSI, or X²).
    pub statistic: f64,
    /// Value at which the test alarms at its corrected level; `None` without a verdict.
    pub threshold: Option<f64>,
    /// Upper-tail p-value under the null; `None` without a verdict.
    pub p_value: Option<f64>,
    /// Window sample count (Kish effective count of the decayed window).
    pub n: f64,
    /// Effective sample size under the AR(1) autocorrelation.
    pub n_eff: f64,
    /// Overdispersion `φ` of the PSI null (from the reference's
    /// chunk-to-chunk variability; 1 for classes and in records stored
    /// before it existed).
    #[serde(default = "one")]
    pub overdispersion: f64,
    /// The test's verdict.
    pub verdict: Verdict,
}

fn one() -> f64 {
    1.0
}

/// A stored drift report.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
pub struct DriftRecord {
    /// Device.
    pub device: String,
    /// Server receive time (ms since the Unix epoch).
    pub received_ms: u64,
    /// Release whose reference was used.
    pub release: ReleaseRef,
    /// Device sequence number.
    pub seq: u64,
    /// Sent because the verdict became `drift`.
    pub alarm: bool,
    /// Device clock at the evaluation (ms; informational).
    pub ts_ms: u64,
    /// Overall verdict of the report.
    pub verdict: Verdict,
    /// Family-wise false-alarm level of the evaluation.
    pub alpha: f64,
    /// Every test, in the device's order.
    pub tests: Vec<TestRecord>,
    /// Data-quality counters since the release was activated.
    pub quality: DataQuality,
}

impl DriftRecord {
    /// The record of a message received at `received_ms`.
    pub fn from_message(m: &DriftMessage, received_ms: u64) -> Self {
        DriftRecord {
            device: m.device_id.to_string(),
            received_ms,
            release: m.release.clone(),
            seq: m.seq,
            alarm: m.alarm,
            ts_ms: m.ts_ms,
            verdict: m.report.verdict,
            alpha: m.report.alpha,
            tests: m
                .report
                .tests
                .iter()
                .map(|t| TestRecord {
                    name: t.name.clone(),
                    kind: t.kind,
                    statistic: t.statistic,
                    threshold: t.threshold,
                    p_value: t.p_value,
                    n: t.window_samples,
                    n_eff: t.effective_samples,
                    overdispersion: t.overdispersion,
                    verdict: t.verdict,
                })
                .collect(),
            quality: m.quality,
        }
    }

    /// True when the report has a verdict the rule uses (`ok` or `drift`).
    pub fn has_verdict(&self) -> bool {
        matches!(self.verdict, Verdict::Ok | Verdict::Drift)
    }
}

/// Whether a retraining request is open.
#[derive(Debug, Clone, Copy, Serialize, Deserialize, PartialEq, Eq)]
#[serde(rename_all = "snake_case")]
pub enum RequestState {
    /// Some device of the cohort drifted within the last `close_after_s`.
    Open,
    /// The cohort returned to normal; kept as history.
    Closed,
}

/// A device that was a member of a request.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
pub struct Member {
    /// Device id.
    pub device: String,
    /// Drifting now (a current member).
    pub drifting: bool,
    /// When it (last) joined (server ms).
    pub joined_ms: u64,
    /// When it last left; `None` while a member.
    pub left_ms: Option<u64>,
    /// Release of its latest drifting report.
    pub release: ReleaseRef,
}

/// Evidence of one device on one feature: its latest test that said `drift`.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
pub struct Evidence {
    /// Device id.
    pub device: String,
    /// Feature name, or `classes`.
    pub feature: String,
    /// Statistic kind.
    pub kind: TestKind,
    /// Latest statistic value.
    pub statistic: f64,
    /// Its threshold.
    pub threshold: Option<f64>,
    /// Its p-value.
    pub p_value: Option<f64>,
    /// Its effective sample size.
    pub n_eff: f64,
    /// Report sequence number it came from.
    pub seq: u64,
    /// First report (server ms) with this feature drifting.
    pub first_seen_ms: u64,
    /// Latest such report (server ms).
    pub last_seen_ms: u64,
}

/// A membership change of a request.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
pub struct Change {
    /// Server ms.
    pub at_ms: u64,
    /// Device id.
    pub device: String,
    /// `joined` or `left`.
    pub change: String,
    /// Why it left: `ok` (its latest verdict is ok), `offline`, `not_in_group`,
    /// `stale` (no verdict within the window), `other_release`; `drift` on joins.
    pub reason: String,
}

/// A retraining request: a cohort of a group drifting on one model.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
pub struct RetrainRequest {
    /// Id (`rt-` and 12 hex digits).
    pub id: String,
    /// Group whose devices drift.
    pub group: String,
    /// Model.
    pub model: String,
    /// Open or closed.
    pub state: RequestState,
    /// Opened (server ms).
    pub opened_ms: u64,
    /// Last change (server ms).
    pub updated_ms: u64,
    /// Closed (server ms).
    pub closed_ms: Option<u64>,
    /// Devices in the group at the last evaluation.
    pub group_devices: usize,
    /// Current members (drifting devices), sorted.
    pub drifting: Vec<String>,
    /// Every device that was ever a member, sorted by id.
    pub members: Vec<Member>,
    /// Evidence per device and feature, sorted by (device, feature).
    pub evidence: Vec<Evidence>,
    /// Joins and leaves, oldest first (at most [`HISTORY_PER_REQUEST`]).
    pub history: Vec<Change>,
    /// Since when no member drifts (server ms); `None` while some do.
    pub quiet_since_ms: Option<u64>,
    /// `min_devices` of the rule that opened it.
    pub min_devices: usize,
    /// `min_fraction` of the rule that opened it.
    pub min_fraction: f64,
    /// What the webhook/command returned (run once, on open).
    pub action: Option<String>,
}

/// Why a device does or does not count for `(group, model)`.
enum Standing {
    Drifting(DriftRecord),
    Out(&'static str),
}

/// Stores a drift report and evaluates the rule for each of the device's groups.
///
/// # Errors
/// Store errors.
pub async fn ingest(state: &Arc<State>, m: &DriftMessage) -> Result<()> {
    let r = DriftRecord::from_message(m, now_ms());
    store::put(&state.store.drift, &seq_key(&r.device, r.seq), &r)?;
    store::prune_device(&state.store.drift, &r.device, REPORTS_PER_DEVICE)?;
    let Some(dev) = state.registry.get(&r.device)? else {
        return Ok(());
    };
    for g in &dev.groups {
        evaluate(state, g, &r.release.model, now_ms()).await?;
    }
    Ok(())
}

/// Drops a device's oldest reports beyond `keep`.
/// Latest report of `device` for `model` with a verdict (`ok`/`drift`)
/// received at or after `since` (insufficient data and no data are skipped).
fn latest_verdict(
    state: &State,
    device: &str,
    model: &str,
    since: u64,
) -> Result<Option<DriftRecord>> {
    for kv in state.store.drift.scan_prefix(device_prefix(device)).rev() {
        let (k, v) = kv?;
        let r: DriftRecord = store::decode(&k, &v)?;
        if r.received_ms < since {
            return Ok(None);
        }
        if r.release.model == model && r.has_verdict() {
            return Ok(Some(r));
        }
    }
    Ok(None)
}

/// Whether `d` counts as drifting on `model`.
fn standing(state: &State, d: &Device, model: &str, since: u64) -> Result<Standing> {
    if !d.online {
        return Ok(Standing::Out("offline"));
    }
    if d.active.as_ref().is_some_and(|a| a.model != model) {
        return Ok(Standing::Out("other_release"));
    }
    let Some(r) = latest_verdict(state, &d.id, model, since)? else {
        return Ok(Standing::Out("stale"));
    };
    // Design: a report of a release the device no longer runs (an upgrade, a
    // rollback) never counts; an unknown active release (no hello yet) does.
    if d.active
        .as_ref()
        .is_some_and(|a| a.release != r.release.release)
    {
        return Ok(Standing::Out("other_release"));
    }
    Ok(match r.verdict {
        Verdict::Drift => Standing::Drifting(r),
        _ => Standing::Out("ok"),
    })
}

/// True when `drifting` of `group_devices` devices fires the rule.
pub fn fires(drifting: usize, group_devices: usize, min_devices: usize, min_fraction: f64) -> bool {
    drifting > 0
        && drifting >= min_devices
        && drifting as f64 >= min_fraction * group_devices as f64
}

/// Re-evaluates the rule for `(group, model)` at `now` (server ms): opens a
/// request, updates the open one's members and evidence, or closes it.
///
/// # Errors
/// Store errors.
pub async fn evaluate(state: &Arc<State>, group: &str, model: &str, now: u64) -> Result<()> {
    let _guard = state.drift_rule_lock.lock().await;
    let rule = &state.config.drift_rule;
    let since = now.saturating_sub(rule.window_s.saturating_mul(1000));
    let in_group: Vec<Device> = state
        .registry
        .list()?
        .into_iter()
        .filter(|d| d.groups.contains(group))
        .collect();
    let mut drifting = BTreeMap::new();
    let mut out = BTreeMap::new();
    for d in &in_group {
        match standing(state, d, model, since)? {
            Standing::Drifting(r) => {
                drifting.insert(d.id.clone(), r);
            }
            Standing::Out(why) => {
                out.insert(d.id.clone(), why);
            }
        }
    }
    match open_request(state, group, model)? {
        Some(mut req) => {
            let before = req.clone();
            update(&mut req, &drifting, &out, in_group.len(), now);
            close_if_quiet(&mut req, now, rule.close_after_s);
            if req != before {
                store::put(&state.store.retraining, req.id.as_bytes(), &req)?;
            }
        }
        None if fires(
            drifting.len(),
            in_group.len(),
            rule.min_devices,
            rule.min_fraction,
        ) =>
        {
            let req = open(group, model, &drifting, in_group.len(), rule, now);
            store::put(&state.store.retraining, req.id.as_bytes(), &req)?;
            tracing::warn!(
                event = "retraining_opened", id = %req.id, group, model,
                devices = ?req.drifting, "drift rule fired: retraining request opened"
            );
            let st = state.clone();
            let id = req.id.clone();
            tokio::spawn(async move { run_action(&st, &id).await });
        }
        None => {}
    }
    Ok(())
}

fn open_request(state: &State, group: &str, model: &str) -> Result<Option<RetrainRequest>> {
    Ok(store::scan::<RetrainRequest>(&state.store.retraining, b"")?
        .into_iter()
        .find(|r| r.state == RequestState::Open && r.group == group && r.model == model))
}

fn open(
    group: &str,
    model: &str,
    drifting: &BTreeMap<String, DriftRecord>,
    group_devices: usize,
    rule: &crate::DriftRule,
    now: u64,
) -> RetrainRequest {
    let mut req = RetrainRequest {
        id: format!("rt-{}", hex::encode(rand::random::<[u8; 6]>())),
        group: group.to_string(),
        model: model.to_string(),
        state: RequestState::Open,
        opened_ms: now,
        updated_ms: now,
        closed_ms: None,
        group_devices,
        drifting: Vec::new(),
        members: Vec::new(),
        evidence: Vec::new(),
        history: Vec::new(),
        quiet_since_ms: None,
        min_devices: rule.min_devices,
        min_fraction: rule.min_fraction,
        action: None,
    };
    update(&mut req, drifting, &BTreeMap::new(), group_devices, now);
    req
}

/// Makes `req`'s members the drifting set: joins, leaves (with the reason
/// from `out`, else `not_in_group`) and evidence.
fn update(
    req: &mut RetrainRequest,
    drifting: &BTreeMap<String, DriftRecord>,
    out: &BTreeMap<String, &'static str>,
    group_devices: usize,
    now: u64,
) {
    req.group_devices = group_devices;
    let now_set: BTreeSet<&String> = drifting.keys().collect();
    let mut changes = Vec::new();
    for m in req.members.iter_mut().filter(|m| m.drifting) {
        if !now_set.contains(&m.device) {
            m.drifting = false;
            m.left_ms = Some(now);
            let why = out.get(&m.device).copied().unwrap_or("not_in_group");
            changes.push(change(now, &m.device, "left", why));
        }
    }
    for (dev, r) in drifting {
        match req.members.iter_mut().find(|m| &m.device == dev) {
            Some(m) if m.drifting => m.release = r.release.clone(),
            Some(m) => {
                m.drifting = true;
                m.joined_ms = now;
                m.left_ms = None;
                m.release = r.release.clone();
                changes.push(change(now, dev, "joined", "drift"));
            }
            None => {
                req.members.push(Member {
                    device: dev.clone(),
                    drifting: true,
                    joined_ms: now,
                    left_ms: None,
                    release: r.release.clone(),
                });
                changes.push(change(now, dev, "joined", "drift"));
            }
        }
        record_evidence(&mut req.evidence, r);
    }
    req.members.sort_by(|a, b| a.device.cmp(&b.device));
    req.evidence
        .sort_by(|a, b| (&a.device, &a.feature).cmp(&(&b.device, &b.feature)));
    req.drifting = drifting.keys().cloned().collect();
    if !changes.is_empty() {
        for c in &changes {
            tracing::info!(
                event = "retraining_member_changed", id = %req.id, device = %c.device,
                change = %c.change, reason = %c.reason, "retraining request membership changed"
            );
        }
        req.history.extend(changes);
        let excess = req.history.len().saturating_sub(HISTORY_PER_REQUEST);
        req.history.drain(..excess);
        req.updated_ms = now;
    }
    req.quiet_since_ms = if req.drifting.is_empty() {
        req.quiet_since_ms.or(Some(now))
    } else {
        None
    };
}

fn change(at_ms: u64, device: &str, change: &str, reason: &str) -> Change {
    Change {
        at_ms,
        device: device.to_string(),
        change: change.to_string(),
        reason: reason.to_string(),
    }
}

/// Upserts one evidence row per drifting test of `r` (a report already
/// recorded keeps its row: `last_seen_ms` only moves forward).
fn record_evidence(evidence: &mut Vec<Evidence>, r: &DriftRecord) {
    for t in r.tests.iter().filter(|t| t.verdict == Verdict::Drift) {
        match evidence
            .iter_mut()
            .find(|e| e.device == r.device && e.feature == t.name)
        {
            Some(e) if e.last_seen_ms >= r.received_ms && e.seq == r.seq => {}
            Some(e) => {
                e.kind = t.kind;
                e.statistic = t.statistic;
                e.threshold = t.threshold;
                e.p_value = t.p_value;
                e.n_eff = t.n_eff;
                e.seq = r.seq;
                e.last_seen_ms = r.received_ms;
            }
            None => evidence.push(Evidence {
                device: r.device.clone(),
                feature: t.name.clone(),
                kind: t.kind,
                statistic: t.statistic,
                threshold: t.threshold,
                p_value: t.p_value,
                n_eff: t.n_eff,
                seq: r.seq,
                first_seen_ms: r.received_ms,
                last_seen_ms: r.received_ms,
            }),
        }
    }
}

/// Closes `req` when no member has drifted for `close_after_s`.
fn close_if_quiet(req: &mut RetrainRequest, now: u64, close_after_s: u64) {
    let Some(quiet) = req.quiet_since_ms else {
        return;
    };
    if now.saturating_sub(quiet) >= close_after_s.saturating_mul(1000) {
        req.state = RequestState::Closed;
        req.closed_ms = Some(now);
        req.updated_ms = now;
        tracing::info!(
            event = "retraining_closed", id = %req.id, group = %req.group, model = %req.model,
            "cohort back to normal: retraining request closed"
        );
    }
}

/// Re-evaluates the rule every quarter of `close_after_s` (50 ms to 5 s) for
/// every open request and every `(group, model)` of a device's active release.
pub fn spawn_tick(
    state: Arc<State>,
    mut shutdown: watch::Receiver<bool>,
) -> tokio::task::JoinHandle<()> {
    let ms = (state.config.drift_rule.close_after_s.saturating_mul(1000) / 4).clamp(50, 5000);
    tokio::spawn(async move {
        let mut tick = tokio::time::interval(Duration::from_millis(ms));
        tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        loop {
            tokio::select! {
                _ = shutdown.changed() => break,
                _ = tick.tick() => {}
            }
            if let Err(e) = tick_once(&state).await {
                tracing::warn!(error = %e, "drift rule tick failed");
            }
        }
    })
}

/// One tick: every `(group, model)` pair worth evaluating.
///
/// # Errors
/// Store errors.
pub async fn tick_once(state: &Arc<State>) -> Result<()> {
    let mut pairs = BTreeSet::new();
    for r in requests(state)? {
        if r.state == RequestState::Open {
            pairs.insert((r.group, r.model));
        }
    }
    for d in state.registry.list()? {
        if let Some(a) = &d.active {
            for g in &d.groups {
                pairs.insert((g.clone(), a.model.clone()));
            }
        }
    }
    for (g, m) in pairs {
        evaluate(state, &g, &m, now_ms()).await?;
    }
    Ok(())
}

/// Opens the retraining job of a new request when the rule says so.
fn open_job(state: &State, req: &RetrainRequest) -> Option<String> {
    if state.config.drift_rule.jobs != crate::RequestJobs::Create {
        return None;
    }
    let spec = match state
        .config
        .drift_rule
        .job_body(&req.group, &req.model, &req.id)
    {
        Ok(s) => s,
        Err(e) => return Some(format!("job: {e}")),
    };
    Some(match crate::jobs::create(state, spec) {
        Ok((j, true)) => {
            tracing::info!(event = "retraining_job_created", job = %j.id, request = %req.id, "retraining job created");
            format!("job {} created", j.id)
        }
        Ok((j, false)) => format!("job {} already open", j.id),
        Err(e) => format!("job: {e}"),
    })
}

async fn run_action(state: &Arc<State>, id: &str) {
    let rule = &state.config.drift_rule;
    let job = match store::get::<RetrainRequest>(&state.store.retraining, id.as_bytes()) {
        Ok(Some(r)) => {
            let st = state.clone();
            tokio::task::spawn_blocking(move || open_job(&st, &r))
                .await
                .ok()
                .flatten()
        }
        _ => None,
    };
    if rule.webhook.is_none() && rule.command.is_none() && job.is_none() {
        return;
    }
    let req = match store::get::<RetrainRequest>(&state.store.retraining, id.as_bytes()) {
        Ok(Some(r)) => r,
        _ => return,
    };
    let summary = serde_json::json!({ "event": "drift_retraining_request", "request": req });
    let mut results: Vec<String> = job.into_iter().collect();
    if let Some(url) = &rule.webhook {
        results.push(post_webhook(url, &summary).await);
    }
    if let Some(cmd) = &rule.command {
        results.push(run_command(cmd, &summary.to_string()).await);
    }
    let _guard = state.drift_rule_lock.lock().await;
    let stored = store::get::<RetrainRequest>(&state.store.retraining, id.as_bytes());
    if let Ok(Some(mut req)) = stored {
        req.action = Some(results.join("; "));
        if let Err(e) = store::put(&state.store.retraining, id.as_bytes(), &req) {
            tracing::error!(error = %e, "storing the retraining action result failed");
        }
    }
}

async fn post_webhook(url: &str, summary: &serde_json::Value) -> String {
    let r = reqwest::Client::new()
        .post(url)
        .json(summary)
        .timeout(Duration::from_secs(10))
        .send()
        .await;
    match r {
        Ok(resp) => format!("webhook {url}: HTTP {}", resp.status().as_u16()),
        Err(e) => format!("webhook {url}: {e}"),
    }
}

async fn run_command(cmd: &str, body: &str) -> String {
    let out = tokio::process::Command::new("sh")
        .arg("-c")
        .arg(cmd)
        .env("EDGEFLEET_DRIFT_SUMMARY", body)
        .stdin(std::process::Stdio::piped())
        .spawn();
    match out {
        Ok(mut child) => {
            if let Some(mut stdin) = child.stdin.take() {
                use tokio::io::AsyncWriteExt as _;
                let _ = stdin.write_all(body.as_bytes()).await;
            }
            match child.wait().await {
                Ok(st) => format!("command `{cmd}`: {st}"),
                Err(e) => format!("command `{cmd}`: {e}"),
            }
        }
        Err(e) => format!("command `{cmd}`: {e}"),
    }
}

/// `GET /v1/drift` filters; unknown parameters are refused.
#[derive(Debug, Clone, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Query {
    /// Only this device.
    pub device: Option<String>,
    /// Only devices of this group.
    pub group: Option<String>,
    /// Only reports of this model.
    pub model: Option<String>,
    /// Only this feature's test (reports without it are left out).
    pub feature: Option<String>,
    /// Only reports received at or after this time (server ms).
    pub since_ms: Option<u64>,
    /// At most this many of the latest reports per device (default
    /// [`DEFAULT_LIMIT`], at most [`REPORTS_PER_DEVICE`]).
    pub limit: Option<usize>,
}

/// Reports per device `GET /v1/drift` returns without `limit`.
pub const DEFAULT_LIMIT: usize = 100;

/// One point of a feature's time series.
#[derive(Debug, Clone, Serialize, PartialEq)]
pub struct Point {
    /// Server receive time (ms).
    pub received_ms: u64,
    /// Report sequence number.
    pub seq: u64,
    /// Release number.
    pub release: u64,
    /// Statistic.
    pub statistic: f64,
    /// Threshold.
    pub threshold: Option<f64>,
    /// p-value.
    pub p_value: Option<f64>,
    /// Window sample count.
    pub n: f64,
    /// Effective sample size.
    pub n_eff: f64,
    /// Verdict.
    pub verdict: Verdict,
}

/// A time series of one device, model and feature.
#[derive(Debug, Clone, Serialize, PartialEq)]
pub struct Series {
    /// Device.
    pub device: String,
    /// Model.
    pub model: String,
    /// Feature name, or `classes`.
    pub feature: String,
    /// Oldest first.
    pub points: Vec<Point>,
}

/// The reports `q` selects (oldest first) and their per-feature series.
///
/// # Errors
/// [`crate::Error::BadRequest`] for a `limit` of 0 or above
/// [`REPORTS_PER_DEVICE`]; store errors.
pub fn query(state: &State, q: &Query) -> Result<(Vec<DriftRecord>, Vec<Series>)> {
    let limit = q.limit.unwrap_or(DEFAULT_LIMIT);
    if !(1..=REPORTS_PER_DEVICE).contains(&limit) {
        return Err(crate::Error::bad(
            "limit",
            format!("= {limit} is outside 1..={REPORTS_PER_DEVICE}"),
        ));
    }
    let devices: Vec<String> = match (&q.device, &q.group) {
        (Some(d), _) => vec![d.clone()],
        (None, g) => state
            .registry
            .list()?
            .into_iter()
            .filter(|d| g.as_ref().is_none_or(|g| d.groups.contains(g)))
            .map(|d| d.id)
            .collect(),
    };
    let mut reports = Vec::new();
    for d in devices {
        let mine = store::scan_newest(&state.store.drift, &device_prefix(&d), limit, |r| {
            selected(r, q)
        })?;
        reports.extend(mine.into_iter().map(|mut r: DriftRecord| {
            if let Some(f) = &q.feature {
                r.tests.retain(|t| &t.name == f);
            }
            r
        }));
    }
    reports.sort_by_key(|r| (r.received_ms, r.device.clone(), r.seq));
    let series = series(&reports);
    Ok((reports, series))
}

fn selected(r: &DriftRecord, q: &Query) -> bool {
    q.model.as_ref().is_none_or(|m| &r.release.model == m)
        && q.since_ms.is_none_or(|s| r.received_ms >= s)
        && q.feature
            .as_ref()
            .is_none_or(|f| r.tests.iter().any(|t| &t.name == f))
}

/// Groups the tests of `reports` (oldest first) by device, model and feature.
pub fn series(reports: &[DriftRecord]) -> Vec<Series> {
    let mut by: BTreeMap<(String, String, String), Vec<Point>> = BTreeMap::new();
    for r in reports {
        for t in &r.tests {
            by.entry((r.device.clone(), r.release.model.clone(), t.name.clone()))
                .or_default()
                .push(Point {
                    received_ms: r.received_ms,
                    seq: r.seq,
                    release: r.release.release,
                    statistic: t.statistic,
                    threshold: t.threshold,
                    p_value: t.p_value,
                    n: t.n,
                    n_eff: t.n_eff,
                    verdict: t.verdict,
                });
        }
    }
    by.into_iter()
        .map(|((device, model, feature), points)| Series {
            device,
            model,
            feature,
            points,
        })
        .collect()
}

/// `GET /v1/retraining` filters; unknown parameters are refused.
#[derive(Debug, Clone, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RequestQuery {
    /// Only this group.
    pub group: Option<String>,
    /// Only this model.
    pub model: Option<String>,
    /// Only open or only closed requests.
    pub state: Option<RequestState>,
}

/// All retraining requests (open and closed), oldest first.
///
/// # Errors
/// Store errors.
pub fn requests(state: &State) -> Result<Vec<RetrainRequest>> {
    let mut v: Vec<RetrainRequest> = store::scan(&state.store.retraining, b"")?;
    v.sort_by(|a, b| (a.opened_ms, &a.id).cmp(&(b.opened_ms, &b.id)));
    Ok(v)
}

/// The requests `q` selects, oldest first.
///
/// # Errors
/// Store errors.
pub fn requests_matching(state: &State, q: &RequestQuery) -> Result<Vec<RetrainRequest>> {
    Ok(requests(state)?
        .into_iter()
        .filter(|r| {
            q.group.as_ref().is_none_or(|g| &r.group == g)
                && q.model.as_ref().is_none_or(|m| &r.model == m)
                && q.state.is_none_or(|s| r.state == s)
        })
        .collect())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_rule_needs_both_the_count_and_the_fraction() {
        assert!(!fires(0, 10, 0, 0.0), "nothing drifting never fires");
        assert!(!fires(2, 10, 3, 0.1));
        assert!(!fires(3, 10, 3, 0.5));
        assert!(fires(3, 10, 3, 0.3));
        assert!(fires(1, 1, 1, 1.0));
    }
}
