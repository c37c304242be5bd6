//! Drift ingestion and the drift rule: when PSI is above the threshold on at
//! least `min_fraction` (and `min_devices`) of a group's devices, a
//! retraining request is opened (stored, listed in the API) and the
//! configured webhook or command receives the drift summary.

use std::sync::Arc;

use edgefleet_drift::DriftStatus;
use edgefleet_protocol::messages::{DriftMessage, ReleaseRef};
use serde::{Deserialize, Serialize};

use crate::store::{self, device_prefix, now_ms, seq_key};
use crate::{Result, State};

/// A stored drift report (summary of the statistics).
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
pub struct Stored {
    /// Device.
    pub device: String,
    /// Server receive time (ms).
    pub received_ms: u64,
    /// Release whose profile was used.
    pub release: ReleaseRef,
    /// Device sequence number.
    pub seq: u64,
    /// Sent as an alarm.
    pub alarm: bool,
    /// The device's verdict; `None` for reports stored before it was recorded
    /// (counted as a verdict). `insufficient_data` reports never count for the
    /// drift rule: PSI over fewer than the device's `min_samples` is noise.
    #[serde(default)]
    pub status: Option<DriftStatus>,
    /// Largest feature PSI.
    pub max_psi: f64,
    /// Per feature `(name, psi, ks)`.
    pub features: Vec<(String, f64, f64)>,
}

/// An open retraining request.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
pub struct RetrainRequest {
    /// Id.
    pub id: String,
    /// Group whose devices drift.
    pub group: String,
    /// Model.
    pub model: String,
    /// Opened (server ms).
    pub opened_ms: u64,
    /// Devices in the group.
    pub group_devices: usize,
    /// Devices above the threshold: `(device, max_psi)`.
    pub drifting: Vec<(String, f64)>,
    /// PSI threshold of the rule.
    pub psi_threshold: f64,
    /// What the webhook/command returned.
    pub action: Option<String>,
}

/// Stores a drift report and evaluates the rule.
///
/// # Errors
/// Store errors.
pub async fn ingest(state: &Arc<State>, m: &DriftMessage) -> Result<()> {
    let s = Stored {
        device: m.device_id.to_string(),
        received_ms: now_ms(),
        release: m.release.clone(),
        seq: m.seq,
        alarm: m.alarm,
        status: Some(m.report.status),
        max_psi: m.report.max_psi,
        features: m
            .report
            .features
            .iter()
            .map(|f| (f.name.clone(), f.psi, f.ks))
            .collect(),
    };
    store::put(&state.store.drift, &seq_key(&s.device, s.seq), &s)?;
    evaluate(state, &s).await
}

impl Stored {
    /// True when the device had enough samples for a verdict (`ok` or `alarm`).
    pub fn has_verdict(&self) -> bool {
        self.status != Some(DriftStatus::InsufficientData)
    }
}

/// Latest report of `device` for `model` received after `since` that carries a
/// verdict (reports with insufficient data are skipped).
fn latest(state: &State, device: &str, model: &str, since: u64) -> Result<Option<Stored>> {
    for kv in state.store.drift.scan_prefix(device_prefix(device)).rev() {
        let (k, v) = kv?;
        let s: Stored = store::decode(&k, &v)?;
        if s.received_ms < since {
            return Ok(None);
        }
        if s.release.model == model && s.has_verdict() {
            return Ok(Some(s));
        }
    }
    Ok(None)
}

async fn evaluate(state: &Arc<State>, s: &Stored) -> Result<()> {
    let rule = &state.config.drift_rule;
    let Some(dev) = state.registry.get(&s.device)? else {
        return Ok(());
    };
    let since = now_ms().saturating_sub(rule.window_s * 1000);
    let all = state.registry.list()?;
    for g in &dev.groups {
        let open: Vec<RetrainRequest> = store::scan(&state.store.retraining, b"")?;
        if open
            .iter()
            .any(|r| &r.group == g && r.model == s.release.model)
        {
            continue;
        }
        let members: Vec<&str> = all
            .iter()
            .filter(|d| d.groups.contains(g))
            .map(|d| d.id.as_str())
            .collect();
        let mut drifting = Vec::new();
        for d in &members {
            if let Some(r) = latest(state, d, &s.release.model, since)? {
                if r.max_psi > rule.psi_threshold {
                    drifting.push((d.to_string(), r.max_psi));
                }
            }
        }
        let frac = drifting.len() as f64 / members.len().max(1) as f64;
        if drifting.len() < rule.min_devices || frac < rule.min_fraction {
            continue;
        }
        let req = RetrainRequest {
            id: format!("rt-{}", hex::encode(rand::random::<[u8; 6]>())),
            group: g.clone(),
            model: s.release.model.clone(),
            opened_ms: now_ms(),
            group_devices: members.len(),
            drifting,
            psi_threshold: rule.psi_threshold,
            action: None,
        };
        store::put(&state.store.retraining, req.id.as_bytes(), &req)?;
        tracing::warn!(group = %g, model = %req.model, devices = req.drifting.len(), "drift rule fired: retraining request opened");
        let st = state.clone();
        tokio::spawn(async move { run_action(&st, req).await });
    }
    Ok(())
}

async fn run_action(state: &Arc<State>, mut req: RetrainRequest) {
    let rule = &state.config.drift_rule;
    let summary = serde_json::json!({ "event": "drift_retraining_request", "request": req });
    let mut results = Vec::new();
    if let Some(url) = &rule.webhook {
        let r = reqwest::Client::new()
            .post(url)
            .json(&summary)
            .timeout(std::time::Duration::from_secs(10))
            .send()
            .await;
        results.push(match r {
            Ok(resp) => format!("webhook {url}: HTTP {}", resp.status().as_u16()),
            Err(e) => format!("webhook {url}: {e}"),
        });
    }
    if let Some(cmd) = &rule.command {
        let body = summary.to_string();
        let out = tokio::process::Command::new("sh")
            .arg("-c")
            .arg(cmd)
            .env("EDGEFLEET_DRIFT_SUMMARY", &body)
            .stdin(std::process::Stdio::piped())
            .spawn();
        results.push(match out {
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
        });
    }
    if results.is_empty() {
        return;
    }
    req.action = Some(results.join("; "));
    if let Err(e) = store::put(&state.store.retraining, req.id.as_bytes(), &req) {
        tracing::error!(error = %e, "storing the retraining action result failed");
    }
}

/// Drift series for a device or group.
///
/// # Errors
/// Store errors.
pub fn query(
    state: &State,
    device: Option<&str>,
    group: Option<&str>,
    model: Option<&str>,
) -> Result<Vec<Stored>> {
    let devices: Vec<String> = match (device, group) {
        (Some(d), _) => vec![d.to_string()],
        (None, Some(g)) => state
            .registry
            .list()?
            .into_iter()
            .filter(|d| d.groups.contains(g))
            .map(|d| d.id)
            .collect(),
        (None, None) => state.registry.list()?.into_iter().map(|d| d.id).collect(),
    };
    let mut out = Vec::new();
    for d in devices {
        out.extend(
            store::scan::<Stored>(&state.store.drift, &device_prefix(&d))?
                .into_iter()
                .filter(|s| model.is_none_or(|m| s.release.model == m)),
        );
    }
    out.sort_by_key(|s| s.received_ms);
    Ok(out)
}

/// All retraining requests.
///
/// # Errors
/// Store errors.
pub fn requests(state: &State) -> Result<Vec<RetrainRequest>> {
    store::scan(&state.store.retraining, b"")
}
