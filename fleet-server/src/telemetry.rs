//! Telemetry ingestion (deduplicated by `(device, seq)`: QoS 1 is
//! at-least-once) and queries per device, release and group.

use edgefleet_protocol::messages::{ReleaseRef, TelemetryBatch};
use edgefleet_protocol::telemetry::TelemetryRecord;
use serde::{Deserialize, Serialize};

use crate::registry::Registry;
use crate::store::{self, now_ms, seq_key, Store};
use crate::Result;

/// A stored record.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct Stored {
    /// Device.
    pub device: String,
    /// Server receive time (ms).
    pub received_ms: u64,
    /// The record.
    pub record: TelemetryRecord,
}

/// Stores a batch; returns (new, duplicates).
///
/// # Errors
/// Store errors.
pub fn ingest(store: &Store, b: &TelemetryBatch) -> Result<(u64, u64)> {
    let (mut new, mut dup) = (0, 0);
    let now = now_ms();
    let device = b.device_id.as_str();
    for r in &b.records {
        let key = seq_key(device, r.seq);
        let v = serde_json::to_vec(&Stored {
            device: device.to_string(),
            received_ms: now,
            record: r.clone(),
        })
        .map_err(|e| crate::Error::Corrupt {
            key: device.to_string(),
            reason: e.to_string(),
        })?;
        match store
            .telemetry
            .compare_and_swap(key, None::<&[u8]>, Some(v))?
        {
            Ok(()) => new += 1,
            Err(_) => dup += 1,
        }
    }
    Ok((new, dup))
}

/// Query filters (all optional; unknown ones are refused).
#[derive(Debug, Clone, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Query {
    /// One device.
    pub device: Option<String>,
    /// Devices of a group.
    pub group: Option<String>,
    /// Records of this model.
    pub model: Option<String>,
    /// Records of this release counter.
    pub release: Option<u64>,
    /// Series bucket width (s), default 60.
    pub bucket_s: Option<u64>,
    /// Only records received at or after this time (ms).
    pub since_ms: Option<u64>,
}

/// One bucket of the series.
#[derive(Debug, Clone, Serialize, PartialEq)]
pub struct Bucket {
    /// Bucket start (server ms).
    pub start_ms: u64,
    /// Requests.
    pub requests: u64,
    /// Errors.
    pub errors: u64,
    /// Error rate.
    pub error_rate: f64,
    /// p50 latency (ms).
    pub p50_ms: f64,
    /// p99 latency (ms).
    pub p99_ms: f64,
}

/// Query result.
#[derive(Debug, Clone, Serialize, PartialEq)]
pub struct Summary {
    /// Records matched.
    pub records: u64,
    /// Devices matched.
    pub devices: usize,
    /// Requests.
    pub requests: u64,
    /// Errors.
    pub errors: u64,
    /// errors / requests.
    pub error_rate: f64,
    /// Request-weighted median of the interval p50s (ms).
    pub p50_ms: f64,
    /// Request-weighted 99th percentile of the interval p99s (ms).
    pub p99_ms: f64,
    /// Over time.
    pub series: Vec<Bucket>,
}

/// Weighted quantile of `(value, weight)` pairs.
pub fn weighted_quantile(mut v: Vec<(f64, u64)>, q: f64) -> f64 {
    v.retain(|(x, w)| x.is_finite() && *w > 0);
    if v.is_empty() {
        return 0.0;
    }
    v.sort_by(|a, b| a.0.total_cmp(&b.0));
    let total: u64 = v.iter().map(|x| x.1).sum();
    let target = (q * total as f64).ceil().max(1.0) as u64;
    let mut acc = 0;
    for (x, w) in &v {
        acc += w;
        if acc >= target {
            return *x;
        }
    }
    v.last().map(|x| x.0).unwrap_or(0.0)
}

fn release_matches(r: Option<&ReleaseRef>, q: &Query) -> bool {
    q.model
        .as_ref()
        .is_none_or(|m| r.is_some_and(|r| &r.model == m))
        && q.release.is_none_or(|n| r.is_some_and(|r| r.release == n))
}

fn aggregate(recs: &[&Stored]) -> (u64, u64, f64, f64, f64) {
    let req: u64 = recs.iter().map(|s| s.record.requests).sum();
    let err: u64 = recs.iter().map(|s| s.record.errors).sum();
    let p50 = weighted_quantile(
        recs.iter()
            .map(|s| (s.record.latency.p50_ms, s.record.requests.max(1)))
            .collect(),
        0.5,
    );
    let p99 = weighted_quantile(
        recs.iter()
            .map(|s| (s.record.latency.p99_ms, s.record.requests.max(1)))
            .collect(),
        0.99,
    );
    (
        req,
        err,
        if req == 0 {
            0.0
        } else {
            err as f64 / req as f64
        },
        p50,
        p99,
    )
}

/// Runs a query.
///
/// # Errors
/// Store errors.
pub fn query(store: &Store, registry: &Registry, q: &Query) -> Result<Summary> {
    let devices: Option<Vec<String>> = match (&q.device, &q.group) {
        (Some(d), _) => Some(vec![d.clone()]),
        (None, Some(g)) => Some(
            registry
                .list()?
                .into_iter()
                .filter(|d| d.groups.contains(g))
                .map(|d| d.id)
                .collect(),
        ),
        (None, None) => None,
    };
    let mut recs: Vec<Stored> = match &devices {
        Some(ds) => {
            let mut v = Vec::new();
            for d in ds {
                v.extend(store::scan::<Stored>(
                    &store.telemetry,
                    &store::device_prefix(d),
                )?);
            }
            v
        }
        None => store::scan(&store.telemetry, b"")?,
    };
    recs.retain(|s| {
        release_matches(s.record.release.as_ref(), q)
            && q.since_ms.is_none_or(|t| s.received_ms >= t)
    });
    let all: Vec<&Stored> = recs.iter().collect();
    let (requests, errors, error_rate, p50_ms, p99_ms) = aggregate(&all);
    let bucket = q.bucket_s.unwrap_or(60).max(1) * 1000;
    let mut buckets: std::collections::BTreeMap<u64, Vec<&Stored>> = Default::default();
    for s in &recs {
        buckets
            .entry(s.received_ms / bucket * bucket)
            .or_default()
            .push(s);
    }
    let series = buckets
        .into_iter()
        .map(|(start_ms, v)| {
            let (requests, errors, error_rate, p50_ms, p99_ms) = aggregate(&v);
            Bucket {
                start_ms,
                requests,
                errors,
                error_rate,
                p50_ms,
                p99_ms,
            }
        })
        .collect();
    let devs: std::collections::BTreeSet<&str> = recs.iter().map(|s| s.device.as_str()).collect();
    Ok(Summary {
        records: recs.len() as u64,
        devices: devs.len(),
        requests,
        errors,
        error_rate,
        p50_ms,
        p99_ms,
        series,
    })
}

#[cfg(test)]
mod tests {
    use super::weighted_quantile;

    #[test]
    fn quantiles() {
        assert_eq!(weighted_quantile(vec![], 0.5), 0.0);
        assert_eq!(
            weighted_quantile(vec![(1.0, 1), (2.0, 1), (3.0, 1)], 0.5),
            2.0
        );
        assert_eq!(weighted_quantile(vec![(1.0, 98), (50.0, 2)], 0.99), 50.0);
        assert_eq!(weighted_quantile(vec![(1.0, 99), (50.0, 1)], 0.5), 1.0);
    }
}
