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

/// Telemetry records kept per device (retention): about 28 hours at the
/// agent's default 5 s interval. Older records are removed as new ones arrive.
pub const RECORDS_PER_DEVICE: usize = 20_000;

/// Retention runs when a batch holds a record whose `seq` is a multiple of
/// this (a scan of the device's records is not paid on every batch).
pub const PRUNE_EVERY: u64 = 64;

/// Stores a batch; returns (new, duplicates). Keeps at most
/// [`RECORDS_PER_DEVICE`] records per device (checked every [`PRUNE_EVERY`]
/// sequence numbers).
///
/// # Errors
/// Store errors.
pub fn ingest(store: &Store, b: &TelemetryBatch) -> Result<(u64, u64)> {
    let counts = insert(store, b)?;
    if b.records.iter().any(|r| r.seq % PRUNE_EVERY == 0) {
        store::prune_device(&store.telemetry, b.device_id.as_str(), RECORDS_PER_DEVICE)?;
    }
    Ok(counts)
}

fn insert(store: &Store, b: &TelemetryBatch) -> Result<(u64, u64)> {
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
    /// Downsampling: widen the buckets so the series has at most this many
    /// (read as 2 when smaller; default: no limit, `bucket_s` as given).
    pub max_points: Option<usize>,
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
    /// Width of the series' buckets (s), after any downsampling.
    pub bucket_s: f64,
    /// Over time.
    pub series: Vec<Bucket>,
    /// Ground-truth feedback per release (online accuracy, issue #11 item 5),
    /// ordered by model then release counter; releases without a label are
    /// left out.
    pub feedback: Vec<ReleaseFeedback>,
}

/// Feedback labels the devices received for one release, summed over the
/// matched records.
#[derive(Debug, Clone, Serialize, PartialEq)]
pub struct ReleaseFeedback {
    /// The release the labelled requests were answered by.
    pub release: ReleaseRef,
    /// Labels for requests this release answered.
    pub labelled: u64,
    /// Of those, labels equal to the model's answer.
    pub agreed: u64,
    /// `agreed / labelled`: the online accuracy (agreement with ground truth).
    pub online_accuracy: f64,
}

/// Sums the records' feedback per release (records without a release or
/// without labels add nothing). Labels for unknown request ids are not
/// counted: they cannot be attributed to a release.
fn feedback_per_release(recs: &[Stored]) -> Vec<ReleaseFeedback> {
    let mut m: std::collections::BTreeMap<(String, u64), (ReleaseRef, u64, u64)> =
        Default::default();
    for s in recs {
        let (Some(r), Some(f)) = (&s.record.release, &s.record.feedback) else {
            continue;
        };
        if f.labelled == 0 {
            continue;
        }
        let e = m
            .entry((r.model.clone(), r.release))
            .or_insert_with(|| (r.clone(), 0, 0));
        e.1 += f.labelled;
        e.2 += f.agreed;
    }
    m.into_values()
        .map(|(release, labelled, agreed)| ReleaseFeedback {
            release,
            labelled,
            agreed,
            online_accuracy: agreed as f64 / labelled as f64,
        })
        .collect()
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

/// The bucket width (ms): `bucket_s` (default 60 s), widened so that the
/// records' time span fits in `max_points` buckets (at least 2: buckets
/// start at multiples of the width, so a span of `w * (n - 1)` or less
/// touches at most `n` of them).
fn bucket_ms(recs: &[Stored], bucket_s: Option<u64>, max_points: Option<usize>) -> u64 {
    let want = bucket_s.unwrap_or(60).max(1) * 1000;
    let (Some(lo), Some(hi)) = (
        recs.iter().map(|s| s.received_ms).min(),
        recs.iter().map(|s| s.received_ms).max(),
    ) else {
        return want;
    };
    match max_points {
        Some(n) => want.max((hi - lo) / (n.max(2) as u64 - 1) + 1),
        _ => want,
    }
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
    let bucket = bucket_ms(&recs, q.bucket_s, q.max_points);
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
        bucket_s: bucket as f64 / 1e3,
        series,
        feedback: feedback_per_release(&recs),
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use edgefleet_protocol::capture::FeedbackSummary;

    fn stored(release: Option<u64>, feedback: Option<(u64, u64)>) -> Stored {
        let mut record = TelemetryRecord {
            seq: 1,
            ts_ms: 0,
            release: None,
            interval_s: 5.0,
            requests: 0,
            errors: 0,
            rejected: 0,
            latency: Default::default(),
            queue_depth: 0,
            rss_bytes: 0,
            cpu_percent: 0.0,
            uptime_s: 0,
            outbox_dropped: 0,
            feedback: None,
            shadow: None,
        };
        record.release = release.map(|n| ReleaseRef {
            model: "m".into(),
            release: n,
            version: format!("1.0.{n}"),
        });
        record.feedback = feedback.map(|(labelled, agreed)| FeedbackSummary {
            labelled,
            agreed,
            unknown_request: 3,
        });
        Stored {
            device: "d".into(),
            received_ms: 0,
            record,
        }
    }

    #[test]
    fn feedback_is_summed_per_release_and_unlabelled_releases_are_left_out() {
        let recs = vec![
            stored(Some(2), Some((4, 3))),
            stored(Some(1), Some((10, 9))),
            stored(Some(2), Some((6, 1))),
            stored(Some(3), None),
            stored(Some(4), Some((0, 0))),
            stored(None, Some((5, 5))),
        ];
        let got: Vec<(u64, u64, u64, f64)> = feedback_per_release(&recs)
            .iter()
            .map(|f| (f.release.release, f.labelled, f.agreed, f.online_accuracy))
            .collect();
        assert_eq!(got, vec![(1, 10, 9, 0.9), (2, 10, 4, 0.4)]);
    }

    /// Distinct buckets the records fall in at width `w`.
    fn buckets(recs: &[Stored], w: u64) -> usize {
        let starts: std::collections::BTreeSet<u64> =
            recs.iter().map(|s| s.received_ms / w * w).collect();
        starts.len()
    }

    #[test]
    fn max_points_caps_the_buckets_whatever_the_span_and_alignment() {
        let mut rng: u64 = 0x9e37_79b9_7f4a_7c15;
        let mut next = move || {
            rng ^= rng << 13;
            rng ^= rng >> 7;
            rng ^= rng << 17;
            rng
        };
        for _ in 0..2000 {
            let lo = next() % 10_000_000_000;
            let span = next() % 100_000_000;
            let n = (next() % 300) as usize;
            let recs: Vec<Stored> = (0..=20)
                .map(|i| Stored {
                    received_ms: lo + span * i / 20,
                    ..stored(None, None)
                })
                .collect();
            let w = bucket_ms(&recs, Some(1), Some(n));
            assert!(w >= 1000, "never under bucket_s");
            let got = buckets(&recs, w);
            assert!(
                got <= n.max(2),
                "lo {lo} span {span} n {n}: {got} buckets of {w} ms"
            );
        }
        // No cap: the requested width, however many buckets.
        let recs: Vec<Stored> = (0..100)
            .map(|i| Stored {
                received_ms: i * 60_000,
                ..stored(None, None)
            })
            .collect();
        assert_eq!(bucket_ms(&recs, None, None), 60_000);
        assert_eq!(buckets(&recs, 60_000), 100);
        let capped = buckets(&recs, bucket_ms(&recs, None, Some(10)));
        assert!(
            (9..=10).contains(&capped),
            "{capped} buckets for max_points 10"
        );
    }

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
