//! Per-release request statistics, process gauges, and their two outputs:
//! [`TelemetryRecord`]s (one per release per interval, for the outbox) and the
//! Prometheus text exposition for `GET /metrics`.
//!
//! Design: counters are kept twice. The *interval* counters are what a
//! [`TelemetryRecord`] reports and are reset by [`Stats::snapshot_all_and_reset`];
//! the *lifetime* counters feed Prometheus, whose counters must never go
//! backwards. Latency uses HDR histograms in microseconds with 3 significant
//! figures (relative error <= 0.1%), range 1 µs .. 1 h; larger values saturate.

use std::collections::BTreeMap;
use std::fmt::Write as _;
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use edgefleet_protocol::capture::FeedbackSummary;
use edgefleet_protocol::messages::ReleaseRef;
use edgefleet_protocol::telemetry::{names, LatencySummary, ShadowSummary, TelemetryRecord};
use hdrhistogram::Histogram;

/// Highest latency the histograms track (µs); larger samples are clamped.
pub const MAX_LATENCY_US: u64 = 3_600_000_000;
/// Significant figures of the latency histograms.
pub const LATENCY_SIGFIG: u8 = 3;
/// Linux `USER_HZ`: clock ticks per second in `/proc/self/stat`. It is 100 on
/// every architecture Linux supports for user space (x86, arm, aarch64, riscv).
pub const CLOCK_TICKS_PER_S: f64 = 100.0;

fn new_histogram() -> Histogram<u64> {
    // Bounds are constants that satisfy hdrhistogram's preconditions
    // (low >= 1, high >= 2 * low, sigfig <= 5), so this cannot fail.
    Histogram::new_with_bounds(1, MAX_LATENCY_US, LATENCY_SIGFIG)
        .expect("constant histogram bounds are valid")
}

/// Counters of one release.
#[derive(Debug, Clone)]
struct Counters {
    requests: u64,
    errors: u64,
    rejected: u64,
    latency_us: Histogram<u64>,
    feedback: FeedbackSummary,
    shadow: ShadowSummary,
}

impl Counters {
    fn new() -> Self {
        Counters {
            requests: 0,
            errors: 0,
            rejected: 0,
            latency_us: new_histogram(),
            feedback: FeedbackSummary::default(),
            shadow: ShadowSummary::default(),
        }
    }
    fn is_idle(&self) -> bool {
        self.requests == 0
            && self.errors == 0
            && self.rejected == 0
            && self.feedback == FeedbackSummary::default()
            && self.shadow == ShadowSummary::default()
    }
}

/// Lifetime counters of one release (Prometheus).
#[derive(Debug, Clone)]
struct Lifetime {
    release: Option<ReleaseRef>,
    requests: u64,
    errors: u64,
    rejected: u64,
    latency_sum_us: u64,
    latency_count: u64,
    /// Feedback labels received (Prometheus counter, never reset).
    labels_total: u64,
    /// Labels and agreements since the release was last activated (the
    /// online-accuracy gauge).
    labelled_since_active: u64,
    agreed_since_active: u64,
    /// Latency of the previous interval, merged with the current one for the
    /// summary quantiles (a window of one to two telemetry intervals).
    prev_interval_us: Histogram<u64>,
}

/// Key of a release in the maps: `None` is "no model loaded".
type Key = Option<(String, u64)>;

fn key(r: Option<&ReleaseRef>) -> Key {
    r.map(|r| (r.model.clone(), r.release))
}

/// Converts a histogram in microseconds into a [`LatencySummary`] in milliseconds.
pub fn latency_summary(h: &Histogram<u64>) -> LatencySummary {
    if h.is_empty() {
        return LatencySummary::default();
    }
    let ms = |us: u64| us as f64 / 1000.0;
    LatencySummary {
        count: h.len(),
        p50_ms: ms(h.value_at_quantile(0.50)),
        p95_ms: ms(h.value_at_quantile(0.95)),
        p99_ms: ms(h.value_at_quantile(0.99)),
        max_ms: ms(h.max()),
    }
}

/// One reading of the process gauges.
#[derive(Debug, Clone, Copy, PartialEq, Default)]
pub struct ProcessSample {
    /// Resident set size (bytes); 0 when `/proc` is unavailable.
    pub rss_bytes: u64,
    /// CPU time used since the previous sample, percent of one core
    /// (200 = two cores busy); 0 on the first sample or without `/proc`.
    pub cpu_percent: f32,
}

/// Reads RSS from `/proc/self/status` and CPU time from `/proc/self/stat`,
/// computing CPU percent as the delta between consecutive [`ProcessSampler::sample`] calls.
#[derive(Debug)]
pub struct ProcessSampler {
    last: Option<(Instant, u64)>,
    last_cpu_percent: f32,
}

impl Default for ProcessSampler {
    fn default() -> Self {
        Self::new()
    }
}

impl ProcessSampler {
    /// A sampler; the first [`ProcessSampler::sample`] measures from now.
    pub fn new() -> Self {
        ProcessSampler {
            last: cpu_ticks().map(|t| (Instant::now(), t)),
            last_cpu_percent: 0.0,
        }
    }

    /// RSS now and CPU percent since the previous call (or since [`ProcessSampler::new`]).
    pub fn sample(&mut self) -> ProcessSample {
        let now = Instant::now();
        let ticks = cpu_ticks();
        let cpu_percent = match (self.last, ticks) {
            (Some((t0, k0)), Some(k1)) => {
                let wall = now.duration_since(t0).as_secs_f64();
                if wall > 0.0 {
                    (k1.saturating_sub(k0) as f64 / CLOCK_TICKS_PER_S / wall * 100.0) as f32
                } else {
                    0.0
                }
            }
            _ => 0.0,
        };
        if let Some(k) = ticks {
            self.last = Some((now, k));
        }
        self.last_cpu_percent = cpu_percent;
        ProcessSample {
            rss_bytes: rss_bytes(),
            cpu_percent,
        }
    }

    /// CPU percent computed by the last [`ProcessSampler::sample`] (no new reading).
    pub fn last_cpu_percent(&self) -> f32 {
        self.last_cpu_percent
    }
}

/// Resident set size of this process (bytes), from `VmRSS` in `/proc/self/status`; 0 if unavailable.
pub fn rss_bytes() -> u64 {
    std::fs::read_to_string("/proc/self/status")
        .ok()
        .and_then(|s| parse_vm_rss_kib(&s))
        .map_or(0, |kib| kib * 1024)
}

fn parse_vm_rss_kib(status: &str) -> Option<u64> {
    let line = status.lines().find(|l| l.starts_with("VmRSS:"))?;
    line.split_whitespace().nth(1)?.parse().ok()
}

/// utime + stime of this process in clock ticks, from `/proc/self/stat`.
fn cpu_ticks() -> Option<u64> {
    parse_stat_ticks(&std::fs::read_to_string("/proc/self/stat").ok()?)
}

fn parse_stat_ticks(stat: &str) -> Option<u64> {
    // Fields after the command name (which may contain spaces and parentheses,
    // hence the last ')'): state is field 3, utime 14, stime 15 (1-based).
    let rest = &stat[stat.rfind(')')? + 1..];
    let f: Vec<&str> = rest.split_whitespace().collect();
    let utime: u64 = f.get(11)?.parse().ok()?;
    let stime: u64 = f.get(12)?.parse().ok()?;
    Some(utime + stime)
}

/// Gauges and counters owned by other components, rendered by
/// [`Stats::render_prometheus`] under their names from
/// [`edgefleet_protocol::telemetry::names`].
#[derive(Debug, Clone, Default)]
pub struct MetricsExtras {
    /// Records waiting in the telemetry outbox ([`crate::telemetry::Outbox::len`]).
    pub outbox_records: u64,
    /// Records dropped by the outbox so far ([`crate::telemetry::Outbox::dropped`]).
    pub outbox_dropped: u64,
    /// Rollbacks so far per reason (`golden_mismatch`, `nan_output`, ...).
    pub rollbacks: Vec<(String, u64)>,
    /// Per drift test (feature name or `classes`): the last
    /// `statistic / threshold` (>= 1 is drift; see `crate::drift::max_ratio`).
    pub drift_ratio: Vec<(String, f64)>,
    /// True when the model is loaded and passed its self-test.
    pub model_ready: bool,
    /// Samples kept by data capture so far.
    pub captured_samples: u64,
    /// Bytes of capture batches on disk waiting for upload (open batch included).
    pub capture_pending_bytes: u64,
}

/// Request statistics per release plus the process gauges. Not synchronised:
/// share it behind a `Mutex` (each call is a few hundred nanoseconds).
#[derive(Debug)]
pub struct Stats {
    started: Instant,
    interval_start: Instant,
    active: Option<ReleaseRef>,
    interval: BTreeMap<Key, (Option<ReleaseRef>, Counters)>,
    lifetime: BTreeMap<Key, Lifetime>,
    queue_depth: u32,
    process: ProcessSampler,
}

impl Default for Stats {
    fn default() -> Self {
        Self::new()
    }
}

impl Stats {
    /// Empty statistics; uptime counts from now.
    pub fn new() -> Self {
        let now = Instant::now();
        Stats {
            started: now,
            interval_start: now,
            active: None,
            interval: BTreeMap::new(),
            lifetime: BTreeMap::new(),
            queue_depth: 0,
            process: ProcessSampler::new(),
        }
    }

    /// Sets the release in the active slot (`None`: no model). Requests
    /// recorded without an explicit release are attributed to it.
    pub fn set_active_release(&mut self, release: Option<ReleaseRef>) {
        if release != self.active {
            // Design: online accuracy is per activation of a release, so a
            // rollback to a release starts its accuracy afresh.
            if let Some(l) = self.lifetime.get_mut(&key(release.as_ref())) {
                l.labelled_since_active = 0;
                l.agreed_since_active = 0;
            }
        }
        self.active = release;
    }

    /// Records a feedback label for a request `release` answered; `agreed`
    /// when it equals the model's answer.
    pub fn record_feedback(&mut self, release: &ReleaseRef, agreed: bool) {
        let (c, l) = self.entry(Some(release));
        c.feedback.labelled += 1;
        l.labels_total += 1;
        l.labelled_since_active += 1;
        if agreed {
            c.feedback.agreed += 1;
            l.agreed_since_active += 1;
        }
    }

    /// Records one comparison of a shadow candidate (`release`) with the
    /// serving model on the same inputs; `agreed` per
    /// [`crate::engine::shadow_agrees`].
    pub fn record_shadow(&mut self, release: &ReleaseRef, agreed: bool) {
        let (c, _) = self.entry(Some(release));
        c.shadow.compared += 1;
        if agreed {
            c.shadow.agreed += 1;
        }
    }

    /// Records a label for a request id the agent does not remember
    /// (counted on the active release's record).
    pub fn record_unknown_feedback(&mut self) {
        let (c, _) = self.entry(None);
        c.feedback.unknown_request += 1;
    }

    /// The release in the active slot.
    pub fn active_release(&self) -> Option<&ReleaseRef> {
        self.active.as_ref()
    }

    fn entry(&mut self, release: Option<&ReleaseRef>) -> (&mut Counters, &mut Lifetime) {
        let release = release.or(self.active.as_ref()).cloned();
        let k = key(release.as_ref());
        let c = &mut self
            .interval
            .entry(k.clone())
            .or_insert_with(|| (release.clone(), Counters::new()))
            .1;
        let l = self.lifetime.entry(k).or_insert_with(|| Lifetime {
            release,
            requests: 0,
            errors: 0,
            rejected: 0,
            latency_sum_us: 0,
            latency_count: 0,
            labels_total: 0,
            labelled_since_active: 0,
            agreed_since_active: 0,
            prev_interval_us: new_histogram(),
        });
        (c, l)
    }

    /// Records a completed request of `release` (`None`: the active release)
    /// that took `latency` (queue wait included, as the caller saw it).
    pub fn record_ok(&mut self, release: Option<&ReleaseRef>, latency: Duration) {
        let us = u64::try_from(latency.as_micros())
            .unwrap_or(u64::MAX)
            .clamp(1, MAX_LATENCY_US);
        let (c, l) = self.entry(release);
        c.requests += 1;
        c.latency_us.saturating_record(us);
        l.requests += 1;
        l.latency_sum_us = l.latency_sum_us.saturating_add(us);
        l.latency_count += 1;
    }

    /// Records a failed request (model error, NaN output or timeout). Failed
    /// requests count in `errors` only, not in `requests` or latency.
    pub fn record_error(&mut self, release: Option<&ReleaseRef>) {
        let (c, l) = self.entry(release);
        c.errors += 1;
        l.errors += 1;
    }

    /// Records a request refused with 503 because the queue was full.
    pub fn record_rejected(&mut self) {
        let (c, l) = self.entry(None);
        c.rejected += 1;
        l.rejected += 1;
    }

    /// Sets the queue depth gauge (requests waiting).
    pub fn set_queue_depth(&mut self, depth: u32) {
        self.queue_depth = depth;
    }

    /// Seconds since [`Stats::new`].
    pub fn uptime(&self) -> Duration {
        self.started.elapsed()
    }

    /// One record per release for the interval since the last call, then
    /// resets the interval counters. The active release always gets a record
    /// (first); other releases get one only if they saw requests (a shadow
    /// candidate, or the previous release draining after a swap). `seq` and
    /// `outbox_dropped` are 0: [`crate::telemetry::Outbox::append`] assigns them.
    pub fn snapshot_all_and_reset(&mut self) -> Vec<TelemetryRecord> {
        let now = Instant::now();
        let interval_s = now.duration_since(self.interval_start).as_secs_f64();
        self.interval_start = now;
        let ts_ms = SystemTime::now()
            .duration_since(UNIX_EPOCH)
            .map_or(0, |d| d.as_millis() as u64);
        let process = self.process.sample();
        let uptime_s = self.started.elapsed().as_secs();
        let active_key = key(self.active.as_ref());
        let mut interval = std::mem::take(&mut self.interval);
        let active = interval
            .remove(&active_key)
            .unwrap_or_else(|| (self.active.clone(), Counters::new()));
        let mut out = Vec::with_capacity(1 + interval.len());
        for (k, (release, c)) in std::iter::once((active_key, active)).chain(interval) {
            if out.is_empty() || !c.is_idle() {
                out.push(TelemetryRecord {
                    seq: 0,
                    ts_ms,
                    release,
                    interval_s,
                    requests: c.requests,
                    errors: c.errors,
                    rejected: c.rejected,
                    latency: latency_summary(&c.latency_us),
                    queue_depth: self.queue_depth,
                    rss_bytes: process.rss_bytes,
                    cpu_percent: process.cpu_percent,
                    uptime_s,
                    outbox_dropped: 0,
                    feedback: (c.feedback != FeedbackSummary::default()).then_some(c.feedback),
                    shadow: (c.shadow != ShadowSummary::default()).then_some(c.shadow),
                });
            }
            if let Some(l) = self.lifetime.get_mut(&k) {
                l.prev_interval_us = c.latency_us;
            }
        }
        out
    }

    /// The active release's record for the interval (see
    /// [`Stats::snapshot_all_and_reset`]); records of other releases in the
    /// interval are discarded, so prefer `snapshot_all_and_reset` in the agent loop.
    pub fn snapshot_and_reset(&mut self) -> TelemetryRecord {
        let mut all = self.snapshot_all_and_reset();
        all.swap_remove(0)
    }

    /// Prometheus text exposition (format 0.0.4) of every metric in
    /// [`edgefleet_protocol::telemetry::names`] and no other name. Counters are
    /// lifetime totals; latency quantiles cover the current and the previous
    /// telemetry interval; CPU percent is the value of the last completed interval.
    pub fn render_prometheus(&self, extras: &MetricsExtras) -> String {
        let mut o = String::with_capacity(4096);
        let rel_label = |r: &Option<ReleaseRef>| match r {
            Some(r) => escape(&format!("{}@{}", r.model, r.version)),
            None => "none".to_string(),
        };
        header(
            &mut o,
            names::REQUESTS_TOTAL,
            "counter",
            "Inference requests completed.",
        );
        for l in self.lifetime.values() {
            let _ = writeln!(
                o,
                "{}{{release=\"{}\"}} {}",
                names::REQUESTS_TOTAL,
                rel_label(&l.release),
                l.requests
            );
        }
        header(
            &mut o,
            names::REQUEST_ERRORS_TOTAL,
            "counter",
            "Inference requests that failed (error or timeout).",
        );
        for l in self.lifetime.values() {
            let _ = writeln!(
                o,
                "{}{{release=\"{}\"}} {}",
                names::REQUEST_ERRORS_TOTAL,
                rel_label(&l.release),
                l.errors
            );
        }
        header(
            &mut o,
            names::REQUESTS_REJECTED_TOTAL,
            "counter",
            "Requests refused with 503 because the queue was full.",
        );
        let rejected: u64 = self.lifetime.values().map(|l| l.rejected).sum();
        let _ = writeln!(o, "{} {rejected}", names::REQUESTS_REJECTED_TOTAL);
        header(
            &mut o,
            names::INFERENCE_LATENCY_SECONDS,
            "summary",
            "Inference latency in seconds.",
        );
        for (k, l) in &self.lifetime {
            let mut h = l.prev_interval_us.clone();
            if let Some((_, c)) = self.interval.get(k) {
                let _ = h.add(&c.latency_us);
            }
            let rel = rel_label(&l.release);
            for q in [0.5, 0.95, 0.99] {
                let v = if h.is_empty() {
                    0.0
                } else {
                    h.value_at_quantile(q) as f64 / 1e6
                };
                let _ = writeln!(
                    o,
                    "{}{{release=\"{rel}\",quantile=\"{q}\"}} {v}",
                    names::INFERENCE_LATENCY_SECONDS
                );
            }
            let _ = writeln!(
                o,
                "{}_sum{{release=\"{rel}\"}} {}",
                names::INFERENCE_LATENCY_SECONDS,
                l.latency_sum_us as f64 / 1e6
            );
            let _ = writeln!(
                o,
                "{}_count{{release=\"{rel}\"}} {}",
                names::INFERENCE_LATENCY_SECONDS,
                l.latency_count
            );
        }
        gauge(
            &mut o,
            names::QUEUE_DEPTH,
            "Requests waiting in the queue.",
            self.queue_depth as f64,
        );
        gauge(
            &mut o,
            names::RSS_BYTES,
            "Resident set size in bytes.",
            rss_bytes() as f64,
        );
        gauge(
            &mut o,
            names::CPU_PERCENT,
            "Process CPU use over the last interval, percent of one core.",
            f64::from(self.process.last_cpu_percent()),
        );
        gauge(
            &mut o,
            names::UPTIME_SECONDS,
            "Seconds since the agent started.",
            self.started.elapsed().as_secs_f64().floor(),
        );
        gauge(
            &mut o,
            names::OUTBOX_RECORDS,
            "Records waiting in the telemetry outbox.",
            extras.outbox_records as f64,
        );
        header(
            &mut o,
            names::OUTBOX_DROPPED_TOTAL,
            "counter",
            "Telemetry records dropped because the outbox hit its disk bound.",
        );
        let _ = writeln!(
            o,
            "{} {}",
            names::OUTBOX_DROPPED_TOTAL,
            extras.outbox_dropped
        );
        header(
            &mut o,
            names::ROLLBACKS_TOTAL,
            "counter",
            "Rollbacks by reason.",
        );
        for (reason, n) in &extras.rollbacks {
            let _ = writeln!(
                o,
                "{}{{reason=\"{}\"}} {n}",
                names::ROLLBACKS_TOTAL,
                escape(reason)
            );
        }
        header(
            &mut o,
            names::DRIFT_RATIO,
            "gauge",
            "Per drift test: last statistic divided by its alarm threshold (>= 1 is drift).",
        );
        for (feature, ratio) in &extras.drift_ratio {
            let _ = writeln!(
                o,
                "{}{{feature=\"{}\"}} {ratio}",
                names::DRIFT_RATIO,
                escape(feature)
            );
        }
        gauge(
            &mut o,
            names::MODEL_READY,
            "1 when the model is loaded and passed its self-test.",
            if extras.model_ready { 1.0 } else { 0.0 },
        );
        self.render_feedback(&mut o);
        header(
            &mut o,
            names::CAPTURED_SAMPLES_TOTAL,
            "counter",
            "Samples kept by data capture.",
        );
        let _ = writeln!(
            o,
            "{} {}",
            names::CAPTURED_SAMPLES_TOTAL,
            extras.captured_samples
        );
        gauge(
            &mut o,
            names::CAPTURE_PENDING_BYTES,
            "Bytes of capture batches on disk waiting for upload.",
            extras.capture_pending_bytes as f64,
        );
        o
    }

    fn render_feedback(&self, o: &mut String) {
        let rel_label = |r: &Option<ReleaseRef>| match r {
            Some(r) => escape(&format!("{}@{}", r.model, r.version)),
            None => "none".to_string(),
        };
        header(
            o,
            names::FEEDBACK_LABELS_TOTAL,
            "counter",
            "Feedback labels received for served requests.",
        );
        for l in self.lifetime.values().filter(|l| l.labels_total > 0) {
            let _ = writeln!(
                o,
                "{}{{release=\"{}\"}} {}",
                names::FEEDBACK_LABELS_TOTAL,
                rel_label(&l.release),
                l.labels_total
            );
        }
        header(
            o,
            names::ONLINE_ACCURACY,
            "gauge",
            "Labels agreeing with the model's answer / labels, since the release was activated.",
        );
        for l in self
            .lifetime
            .values()
            .filter(|l| l.labelled_since_active > 0)
        {
            let _ = writeln!(
                o,
                "{}{{release=\"{}\"}} {}",
                names::ONLINE_ACCURACY,
                rel_label(&l.release),
                l.agreed_since_active as f64 / l.labelled_since_active as f64
            );
        }
    }
}

fn header(o: &mut String, name: &str, kind: &str, help: &str) {
    let _ = writeln!(o, "# HELP {name} {help}\n# TYPE {name} {kind}");
}

fn gauge(o: &mut String, name: &str, help: &str, v: f64) {
    header(o, name, "gauge", help);
    let _ = writeln!(o, "{name} {v}");
}

/// Escapes a Prometheus label value (backslash, double quote, newline).
fn escape(s: &str) -> String {
    s.replace('\\', "\\\\")
        .replace('"', "\\\"")
        .replace('\n', "\\n")
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;

    fn rel(n: u64) -> ReleaseRef {
        ReleaseRef {
            model: "m".into(),
            release: n,
            version: format!("1.0.{n}"),
        }
    }

    #[test]
    fn quantiles_in_ms_within_hdr_precision() {
        let mut s = Stats::new();
        s.set_active_release(Some(rel(1)));
        for i in 1..=1000u64 {
            s.record_ok(None, Duration::from_micros(i * 100)); // 0.1 .. 100 ms
        }
        s.record_error(None);
        s.record_rejected();
        s.set_queue_depth(3);
        let r = s.snapshot_and_reset();
        assert_eq!(
            (r.requests, r.errors, r.rejected, r.queue_depth),
            (1000, 1, 1, 3)
        );
        assert_eq!(r.latency.count, 1000);
        assert!((r.latency.p50_ms - 50.0).abs() <= 0.05, "{:?}", r.latency);
        assert!((r.latency.p99_ms - 99.0).abs() <= 0.1, "{:?}", r.latency);
        assert!((r.latency.max_ms - 100.0).abs() <= 0.1, "{:?}", r.latency);
        assert_eq!(r.release, Some(rel(1)));
        // Reset: the next interval is empty but still reported for the active release.
        let r2 = s.snapshot_and_reset();
        assert_eq!((r2.requests, r2.latency.count), (0, 0));
        assert_eq!(r2.latency, LatencySummary::default());
    }

    #[test]
    fn per_release_records_active_first() {
        let mut s = Stats::new();
        s.set_active_release(Some(rel(2)));
        s.record_ok(Some(&rel(1)), Duration::from_millis(1));
        s.record_ok(None, Duration::from_millis(2));
        s.record_ok(None, Duration::from_millis(2));
        let all = s.snapshot_all_and_reset();
        assert_eq!(all.len(), 2);
        assert_eq!((all[0].release.clone(), all[0].requests), (Some(rel(2)), 2));
        assert_eq!((all[1].release.clone(), all[1].requests), (Some(rel(1)), 1));
        assert_eq!(
            s.snapshot_all_and_reset().len(),
            1,
            "idle old release not reported"
        );
    }

    #[test]
    fn process_gauges_read_proc() {
        let mut p = ProcessSampler::new();
        let mut x = 0u64;
        for i in 0..5_000_000u64 {
            x = x.wrapping_mul(31).wrapping_add(i);
        }
        std::hint::black_box(x);
        let s = p.sample();
        assert!(s.rss_bytes > 1024 * 1024, "{s:?}");
        assert!(s.cpu_percent >= 0.0 && s.cpu_percent.is_finite());
        assert_eq!(
            parse_stat_ticks("1 (a b) c) S 1 2 3 4 5 6 7 8 9 10 250 50 0 0"),
            Some(300)
        );
        assert_eq!(
            parse_vm_rss_kib("Name:\tx\nVmRSS:\t  1234 kB\n"),
            Some(1234)
        );
    }

    #[test]
    fn prometheus_uses_only_protocol_names() {
        let mut s = Stats::new();
        s.set_active_release(Some(ReleaseRef {
            model: "k\"w".into(),
            release: 1,
            version: "1.0.0".into(),
        }));
        s.record_ok(None, Duration::from_millis(3));
        let extras = MetricsExtras {
            outbox_records: 4,
            outbox_dropped: 2,
            rollbacks: vec![("nan_output".into(), 1)],
            drift_ratio: vec![("input.x".into(), 0.3)],
            model_ready: true,
            captured_samples: 7,
            capture_pending_bytes: 1024,
        };
        s.record_feedback(
            &ReleaseRef {
                model: "k\"w".into(),
                release: 1,
                version: "1.0.0".into(),
            },
            true,
        );
        let text = s.render_prometheus(&extras);
        let all = [
            names::REQUESTS_TOTAL,
            names::REQUEST_ERRORS_TOTAL,
            names::REQUESTS_REJECTED_TOTAL,
            names::INFERENCE_LATENCY_SECONDS,
            names::QUEUE_DEPTH,
            names::RSS_BYTES,
            names::CPU_PERCENT,
            names::UPTIME_SECONDS,
            names::OUTBOX_RECORDS,
            names::OUTBOX_DROPPED_TOTAL,
            names::ROLLBACKS_TOTAL,
            names::DRIFT_RATIO,
            names::MODEL_READY,
            names::FEEDBACK_LABELS_TOTAL,
            names::ONLINE_ACCURACY,
            names::CAPTURED_SAMPLES_TOTAL,
            names::CAPTURE_PENDING_BYTES,
        ];
        for line in text.lines().filter(|l| !l.starts_with('#')) {
            let name = line.split(['{', ' ']).next().unwrap_or_default();
            let base = name.trim_end_matches("_sum").trim_end_matches("_count");
            assert!(all.contains(&base), "unexpected metric {name}");
        }
        for n in all {
            assert!(text.contains(&format!("# TYPE {n} ")), "missing {n}");
        }
        assert!(
            text.contains("edgefleet_agent_requests_total{release=\"k\\\"w@1.0.0\"} 1"),
            "{text}"
        );
        assert!(text.contains("edgefleet_agent_inference_latency_seconds{release=\"k\\\"w@1.0.0\",quantile=\"0.5\"} 0.003"), "{text}");
        assert!(text.contains("edgefleet_agent_outbox_dropped_total 2"));
        assert!(text.contains("edgefleet_agent_model_ready 1"));
        assert!(text.contains("edgefleet_agent_captured_samples_total 7"));
        assert!(text.contains("edgefleet_agent_capture_pending_bytes 1024"));
        assert!(
            text.contains("edgefleet_agent_online_accuracy{release=\"k\\\"w@1.0.0\"} 1"),
            "{text}"
        );
    }

    #[test]
    fn feedback_counts_per_release_and_reset_on_activation() {
        let mut s = Stats::new();
        s.set_active_release(Some(rel(1)));
        for agreed in [true, true, false] {
            s.record_feedback(&rel(1), agreed);
        }
        s.record_unknown_feedback();
        let r = s.snapshot_and_reset();
        assert_eq!(
            r.feedback,
            Some(FeedbackSummary {
                labelled: 3,
                agreed: 2,
                unknown_request: 1
            })
        );
        assert_eq!(s.snapshot_and_reset().feedback, None, "interval reset");
        let text = s.render_prometheus(&MetricsExtras::default());
        assert!(
            text.contains("edgefleet_agent_feedback_labels_total{release=\"m@1.0.1\"} 3"),
            "{text}"
        );
        let acc = format!(
            "edgefleet_agent_online_accuracy{{release=\"m@1.0.1\"}} {}",
            2.0 / 3.0
        );
        assert!(text.contains(&acc), "{text}");
        // A model change and back: accuracy starts afresh, the counter does not.
        s.set_active_release(Some(rel(2)));
        s.set_active_release(Some(rel(1)));
        let text = s.render_prometheus(&MetricsExtras::default());
        assert!(!text.contains("edgefleet_agent_online_accuracy{"), "{text}");
        assert!(
            text.contains("edgefleet_agent_feedback_labels_total{release=\"m@1.0.1\"} 3"),
            "{text}"
        );
    }
}
