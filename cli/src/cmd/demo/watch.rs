//! Follows the fleet's drift reports through `GET /v1/drift` and keeps, per
//! device, what the demo's verdicts need: how many reports carried a verdict,
//! which said `drift` and when, and the largest statistic/threshold ratio
//! over every test with a verdict (the margin an unshifted device keeps
//! below its alarm threshold).

use std::collections::{BTreeMap, BTreeSet};

use serde_json::Value;

use super::Api;

/// What one device reported since the watch began.
#[derive(Debug, Clone, Default, serde::Serialize)]
pub struct DeviceDrift {
    /// Reports whose overall verdict is `ok` or `drift`.
    pub verdict_reports: usize,
    /// Reports whose overall verdict is `drift`.
    pub drift_reports: usize,
    /// Server receive time of the first `drift` report (ms since the epoch).
    pub first_drift_ms: Option<u64>,
    /// Verdict of the latest report with a verdict (`ok` or `drift`).
    pub last_verdict: Option<String>,
    /// Largest `statistic / threshold` over the tests with a verdict (1.0 is
    /// the alarm level); 0 before any.
    pub max_ratio: f64,
    /// The test (feature name, or `classes`) that gave `max_ratio`.
    pub max_ratio_test: String,
}

/// Accumulates the drift reports received since `since_ms`.
pub struct DriftWatch {
    since_ms: u64,
    cursor_ms: u64,
    seen: BTreeSet<(String, u64)>,
    /// Per device.
    pub devices: BTreeMap<String, DeviceDrift>,
}

/// Overlap of successive polls (ms): a report stored while a poll ran is
/// picked up by the next one; duplicates are dropped by (device, seq).
const OVERLAP_MS: u64 = 10_000;

impl DriftWatch {
    /// A watch of the reports received at or after `since_ms` (server clock,
    /// ms since the epoch).
    pub fn new(since_ms: u64) -> Self {
        DriftWatch {
            since_ms,
            cursor_ms: since_ms,
            seen: BTreeSet::new(),
            devices: BTreeMap::new(),
        }
    }

    /// Fetches the reports received since the last poll and folds them in.
    ///
    /// # Errors
    /// API errors.
    pub fn poll(&mut self, api: &Api) -> anyhow::Result<()> {
        let from = self.cursor_ms.saturating_sub(OVERLAP_MS).max(self.since_ms);
        let v = api.get(&format!("/v1/drift?since_ms={from}&limit=2000"))?;
        for r in v["drift"].as_array().into_iter().flatten() {
            let (Some(dev), Some(seq), Some(at)) = (
                r["device"].as_str(),
                r["seq"].as_u64(),
                r["received_ms"].as_u64(),
            ) else {
                continue;
            };
            if at < self.since_ms || !self.seen.insert((dev.to_string(), seq)) {
                continue;
            }
            self.cursor_ms = self.cursor_ms.max(at);
            fold(self.devices.entry(dev.to_string()).or_default(), r, at);
        }
        Ok(())
    }

    /// The device's record (default when it sent nothing yet).
    pub fn device(&self, id: &str) -> DeviceDrift {
        self.devices.get(id).cloned().unwrap_or_default()
    }
}

fn fold(d: &mut DeviceDrift, r: &Value, at: u64) {
    let verdict = r["verdict"].as_str().unwrap_or("");
    if verdict != "ok" && verdict != "drift" {
        return;
    }
    d.verdict_reports += 1;
    d.last_verdict = Some(verdict.to_string());
    if verdict == "drift" {
        d.drift_reports += 1;
        d.first_drift_ms.get_or_insert(at);
    }
    for t in r["tests"].as_array().into_iter().flatten() {
        let v = t["verdict"].as_str().unwrap_or("");
        let (Some(stat), Some(thr)) = (t["statistic"].as_f64(), t["threshold"].as_f64()) else {
            continue;
        };
        if (v == "ok" || v == "drift") && thr > 0.0 && stat / thr > d.max_ratio {
            d.max_ratio = stat / thr;
            d.max_ratio_test = t["name"].as_str().unwrap_or("").to_string();
        }
    }
}
