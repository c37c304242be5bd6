//! The inference engine: a bounded queue served by dedicated worker threads
//! (inference is blocking and never runs on the tokio runtime), the active
//! model behind an `Arc` that is swapped atomically (in-flight calls finish on
//! the model they started with), an optional trial candidate (shadow or
//! serve), micro-batching for models with a batch axis, and the counters
//! `/metrics` and the trial read.
//!
//! Every request that reaches a worker (local API or an input source) ends in
//! one place, `finish`: its latency as the caller saw it (queue wait
//! included) goes into the telemetry [`Stats`] of the release that answered;
//! a successful one is handed to the drift thread through a bounded channel
//! ([`DriftTap`]) *after* the reply was sent, and dropped (counted) when that
//! channel is full, so drift never adds latency to a request.

use std::collections::BTreeMap;
use std::sync::atomic::{AtomicBool, AtomicU64, AtomicUsize, Ordering};
use std::sync::mpsc::{sync_channel, Receiver, SyncSender, TrySendError};
use std::sync::{Arc, Mutex, OnceLock, RwLock};
use std::time::{Duration, Instant};

use edgefleet_bundle::payload::{Tensor, TensorData};
use edgefleet_protocol::messages::{ReleaseRef, TrialEnd, TrialMode};

use crate::runtime::{check_finite, Compute, Model, RunError};
use crate::telemetry::{MetricsExtras, Outbox, Stats};

/// A completed inference.
#[derive(Debug)]
pub struct Reply {
    /// Outputs in model order.
    pub outputs: Vec<Tensor>,
    /// Release that answered.
    pub release: ReleaseRef,
}

/// Why a request was not run.
#[derive(Debug, thiserror::Error)]
pub enum SubmitError {
    /// The queue is full (503 + Retry-After).
    #[error("queue full")]
    Saturated,
    /// No model is loaded.
    #[error("no model loaded")]
    NoModel,
}

type ReplyTx = tokio::sync::oneshot::Sender<Result<Reply, RunError>>;

struct Job {
    inputs: Vec<Tensor>,
    stream: Option<String>,
    request_id: Option<String>,
    reply: ReplyTx,
    enqueued: Instant,
    deadline: Instant,
}

/// A successful inference, handed to the drift thread.
#[derive(Debug)]
pub struct DriftSample {
    /// Release that answered.
    pub release: ReleaseRef,
    /// The request's inputs (as given: state inputs filled by the runtime are absent).
    pub inputs: Vec<Tensor>,
    /// The outputs.
    pub outputs: Vec<Tensor>,
    /// The local API request id (`crate::feedback`), if the request came
    /// through the API.
    pub request_id: Option<String>,
}

/// Capacity of the drift channel (samples); beyond it samples are dropped.
pub const DRIFT_CHANNEL_CAPACITY: usize = 256;

/// The engine's side of the drift channel.
#[derive(Debug, Default)]
pub struct DriftTap {
    tx: OnceLock<SyncSender<DriftSample>>,
    /// Set by the drift thread while the active release has a reference
    /// profile; when false no sample is copied.
    pub enabled: AtomicBool,
    /// Samples handed over.
    pub sent: AtomicU64,
    /// Samples dropped because the channel was full.
    pub dropped: AtomicU64,
    /// Per drift test, the last statistic / threshold (for `/metrics`),
    /// written by the drift thread.
    pub ratios: Mutex<Vec<(String, f64)>>,
    /// Samples kept by data capture (for `/metrics`), written by the drift thread.
    pub captured_samples: AtomicU64,
    /// Bytes of capture batches on disk (for `/metrics`), written by the drift thread.
    pub capture_pending_bytes: AtomicU64,
}

impl DriftTap {
    /// Connects the channel (once); returns the receiver, or `None` if already connected.
    pub fn connect(&self, capacity: usize) -> Option<Receiver<DriftSample>> {
        let (tx, rx) = sync_channel(capacity.max(1));
        self.tx.set(tx).ok().map(|()| rx)
    }
    fn wants(&self) -> bool {
        self.tx.get().is_some() && self.enabled.load(Ordering::Relaxed)
    }
    fn offer(&self, s: DriftSample) {
        let Some(tx) = self.tx.get() else { return };
        match tx.try_send(s) {
            Ok(()) => {
                self.sent.fetch_add(1, Ordering::Relaxed);
            }
            Err(TrySendError::Full(_) | TrySendError::Disconnected(_)) => {
                self.dropped.fetch_add(1, Ordering::Relaxed);
            }
        }
    }
}

/// Latency and counters of one release.
#[derive(Debug)]
pub struct ReleaseStats {
    /// Completed requests.
    pub requests: u64,
    /// Failed requests.
    pub errors: u64,
    /// Latency in microseconds.
    pub latency_us: hdrhistogram::Histogram<u64>,
}

impl ReleaseStats {
    /// Empty counters.
    pub(crate) fn new() -> Self {
        ReleaseStats {
            requests: 0,
            errors: 0,
            latency_us: hdrhistogram::Histogram::new_with_bounds(1, 60_000_000, 2).unwrap_or_else(
                |_| hdrhistogram::Histogram::new(2).unwrap_or_else(|_| unreachable_hist()),
            ),
        }
    }
    /// Counts one request that took `d` (and failed unless `ok`).
    pub(crate) fn record(&mut self, d: Duration, ok: bool) {
        self.requests += 1;
        if !ok {
            self.errors += 1;
        }
        let _ = self
            .latency_us
            .record((d.as_micros() as u64).clamp(1, 60_000_000));
    }
    /// A quantile in milliseconds.
    pub fn quantile_ms(&self, q: f64) -> f64 {
        self.latency_us.value_at_quantile(q) as f64 / 1e3
    }
}

fn unreachable_hist() -> hdrhistogram::Histogram<u64> {
    // hdrhistogram::Histogram::new(2) only fails for sigfig > 5.
    hdrhistogram::Histogram::new_with_max(1 << 40, 1).unwrap_or_else(|_| std::process::abort())
}

/// Trial candidate and what was observed of it.
#[derive(Debug)]
pub struct Trial {
    /// The candidate.
    pub model: Arc<Model>,
    /// Shadow or serve.
    pub mode: TrialMode,
    /// Commit or discard when it passes. A discarded shadow (an experiment's
    /// shadow arm) also reports its runs in telemetry under its own release,
    /// with its agreement with the serving model (`TelemetryRecord.shadow`).
    pub end: TrialEnd,
    /// When the trial started.
    pub started: Instant,
    /// What its latency is compared with (besides the target's budget).
    pub reference: LatencyReference,
    /// Observations.
    pub stats: Mutex<TrialStats>,
}

/// What a trial's latency ratio (`TrialPolicy::max_p99_ratio`) compares the
/// candidate with. The target's latency budget applies in every case.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct LatencyReference {
    /// The candidate is a new release of the model that was active when the
    /// trial started: its latency is compared with that release's on the
    /// same inputs ([`TrialStats::baseline`], recorded in shadow mode).
    pub same_model: bool,
    /// The candidate's own median latency (ms) on its golden inputs, measured
    /// on this device when the trial started; `None` without golden vectors.
    /// The reference when the candidate is a different model (another model's
    /// latency says nothing about this one) or no baseline was recorded.
    pub own_ms: Option<f64>,
}

/// What a trial observed.
#[derive(Debug)]
pub struct TrialStats {
    /// Candidate calls and latency.
    pub candidate: ReleaseStats,
    /// The active model's latency on the same inputs (shadow mode only;
    /// empty in serve mode).
    pub baseline: ReleaseStats,
    /// First NaN/Inf output seen.
    pub non_finite: Option<String>,
}

impl TrialStats {
    /// Nothing observed yet.
    pub(crate) fn new() -> Self {
        TrialStats {
            candidate: ReleaseStats::new(),
            baseline: ReleaseStats::new(),
            non_finite: None,
        }
    }
}

/// Counters for `/metrics` (request counters and latency are in [`Engine::stats`]).
#[derive(Debug, Default)]
pub struct Counters {
    /// Requests refused with 503.
    pub rejected: AtomicU64,
    /// Rollbacks by reason.
    pub rollbacks: Mutex<BTreeMap<String, u64>>,
}

/// The engine (shared as `Arc<Engine>`).
pub struct Engine {
    compute: Compute,
    active: RwLock<Option<Arc<Model>>>,
    trial: RwLock<Option<Arc<Trial>>>,
    tx: SyncSender<Job>,
    depth: Arc<AtomicUsize>,
    /// Counters.
    pub counters: Counters,
    /// Telemetry statistics per release (docs/specs/telemetry.md).
    pub stats: Mutex<Stats>,
    /// Drift channel.
    pub drift: DriftTap,
    outbox: OnceLock<Arc<Outbox>>,
    started: Instant,
}

impl std::fmt::Debug for Engine {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Engine")
            .field("depth", &self.depth)
            .finish()
    }
}

/// Release label used in metrics.
pub fn label(r: &ReleaseRef) -> String {
    format!("{}@{}", r.model, r.release)
}

impl Engine {
    /// Starts `workers` inference threads over a queue of `queue_len`; models
    /// run on the calling worker thread.
    pub fn start(workers: usize, queue_len: usize, max_batch: usize) -> Arc<Self> {
        Self::start_on(workers, queue_len, max_batch, Compute::default())
    }

    /// [`Engine::start`] with models loaded for this engine (active, trial)
    /// running their matrix products on `compute`.
    pub fn start_on(
        workers: usize,
        queue_len: usize,
        max_batch: usize,
        compute: Compute,
    ) -> Arc<Self> {
        let (tx, rx) = sync_channel::<Job>(queue_len);
        let e = Arc::new(Engine {
            compute,
            active: RwLock::new(None),
            trial: RwLock::new(None),
            tx,
            depth: Arc::new(AtomicUsize::new(0)),
            counters: Counters::default(),
            stats: Mutex::new(Stats::new()),
            drift: DriftTap::default(),
            outbox: OnceLock::new(),
            started: Instant::now(),
        });
        let rx = Arc::new(Mutex::new(rx));
        for i in 0..workers {
            let weak = Arc::downgrade(&e);
            let rx = rx.clone();
            let _ = std::thread::Builder::new()
                .name(format!("infer-{i}"))
                .spawn(move || worker(weak, rx, max_batch.max(1)));
        }
        e
    }

    /// Where models loaded for this engine run their matrix products.
    pub fn compute(&self) -> &Compute {
        &self.compute
    }

    /// Seconds since start.
    pub fn uptime(&self) -> Duration {
        self.started.elapsed()
    }

    /// Requests waiting.
    pub fn queue_depth(&self) -> usize {
        self.depth.load(Ordering::Relaxed)
    }

    /// The active model.
    pub fn active(&self) -> Option<Arc<Model>> {
        self.active.read().ok().and_then(|g| g.clone())
    }

    /// The model that answers requests: the active one, or on a first
    /// install the trial candidate (which then serves).
    pub fn serving(&self) -> Option<Arc<Model>> {
        self.active()
            .or_else(|| self.trial().map(|t| t.model.clone()))
    }

    /// Swaps the active model; calls in flight finish on the old one.
    pub fn set_active(&self, m: Option<Arc<Model>>) {
        if let Ok(mut s) = self.stats.lock() {
            s.set_active_release(m.as_ref().map(|m| m.release.clone()));
        }
        if let Ok(mut g) = self.active.write() {
            *g = m;
        }
    }

    /// Attaches the telemetry outbox (for the `/metrics` outbox gauges).
    pub fn set_outbox(&self, o: Arc<Outbox>) {
        let _ = self.outbox.set(o);
    }

    /// The interval's telemetry records (one per release that served, the
    /// active release first), resetting the interval counters.
    pub fn snapshot_telemetry(&self) -> Vec<edgefleet_protocol::telemetry::TelemetryRecord> {
        let depth = u32::try_from(self.queue_depth()).unwrap_or(u32::MAX);
        self.stats
            .lock()
            .map(|mut s| {
                s.set_queue_depth(depth);
                s.snapshot_all_and_reset()
            })
            .unwrap_or_default()
    }

    /// True while a model answers requests: the active one, or on a first
    /// install the candidate on trial (which serves). Derived from what is
    /// loaded now, so it follows every install, commit and rollback.
    pub fn ready(&self) -> bool {
        self.serving().is_some()
    }

    /// Prometheus text (format 0.0.4) of every metric in
    /// `edgefleet_protocol::telemetry::names`; `model_ready` is [`Engine::ready`].
    pub fn render_metrics(&self) -> String {
        let extras = MetricsExtras {
            outbox_records: self.outbox.get().map_or(0, |o| o.len()),
            outbox_dropped: self.outbox.get().map_or(0, |o| o.dropped()),
            rollbacks: self
                .counters
                .rollbacks
                .lock()
                .map(|m| m.iter().map(|(k, v)| (k.clone(), *v)).collect())
                .unwrap_or_default(),
            drift_ratio: self
                .drift
                .ratios
                .lock()
                .map(|p| p.clone())
                .unwrap_or_default(),
            model_ready: self.ready(),
            captured_samples: self.drift.captured_samples.load(Ordering::Relaxed),
            capture_pending_bytes: self.drift.capture_pending_bytes.load(Ordering::Relaxed),
        };
        let depth = u32::try_from(self.queue_depth()).unwrap_or(u32::MAX);
        self.stats
            .lock()
            .map(|mut s| {
                s.set_queue_depth(depth);
                s.render_prometheus(&extras)
            })
            .unwrap_or_default()
    }

    /// The trial, if one runs.
    pub fn trial(&self) -> Option<Arc<Trial>> {
        self.trial.read().ok().and_then(|g| g.clone())
    }

    /// Starts a trial of `model`, judged against `reference`; returns the
    /// mode it runs in (serve on a first install, whatever was asked).
    pub fn start_trial(
        &self,
        model: Arc<Model>,
        mode: TrialMode,
        end: TrialEnd,
        reference: LatencyReference,
    ) -> TrialMode {
        // Design: on a first install there is no active model to shadow, so
        // the candidate serves; otherwise it would never see live inputs and
        // the trial could not gather evidence.
        let mode = if self.active().is_none() {
            TrialMode::Serve
        } else {
            mode
        };
        let t = Trial {
            model,
            mode,
            end,
            started: Instant::now(),
            reference,
            stats: Mutex::new(TrialStats::new()),
        };
        if let Ok(mut g) = self.trial.write() {
            *g = Some(Arc::new(t));
        }
        mode
    }

    /// Ends the trial; returns the candidate.
    pub fn end_trial(&self) -> Option<Arc<Model>> {
        self.trial
            .write()
            .ok()
            .and_then(|mut g| g.take())
            .map(|t| t.model.clone())
    }

    /// Counts a rollback.
    pub fn count_rollback(&self, reason: &str) {
        if let Ok(mut m) = self.counters.rollbacks.lock() {
            *m.entry(reason.to_string()).or_default() += 1;
        }
    }

    /// Queues a request; the receiver yields the reply.
    ///
    /// # Errors
    /// [`SubmitError::Saturated`] when the queue is full, [`SubmitError::NoModel`].
    pub fn submit(
        &self,
        inputs: Vec<Tensor>,
        stream: Option<String>,
        timeout: Duration,
    ) -> Result<tokio::sync::oneshot::Receiver<Result<Reply, RunError>>, SubmitError> {
        self.submit_with_id(inputs, stream, timeout, None)
    }

    /// As [`Engine::submit`], tagging the request with the local API's
    /// request id (handed to the drift thread with the sample, for capture).
    ///
    /// # Errors
    /// As [`Engine::submit`].
    pub fn submit_with_id(
        &self,
        inputs: Vec<Tensor>,
        stream: Option<String>,
        timeout: Duration,
        request_id: Option<String>,
    ) -> Result<tokio::sync::oneshot::Receiver<Result<Reply, RunError>>, SubmitError> {
        if self.serving().is_none() {
            return Err(SubmitError::NoModel);
        }
        let (reply, rx) = tokio::sync::oneshot::channel();
        self.depth.fetch_add(1, Ordering::Relaxed);
        let now = Instant::now();
        match self.tx.try_send(Job {
            inputs,
            stream,
            request_id,
            reply,
            enqueued: now,
            deadline: now + timeout,
        }) {
            Ok(()) => Ok(rx),
            Err(TrySendError::Full(_) | TrySendError::Disconnected(_)) => {
                self.depth.fetch_sub(1, Ordering::Relaxed);
                self.counters.rejected.fetch_add(1, Ordering::Relaxed);
                if let Ok(mut s) = self.stats.lock() {
                    s.record_rejected();
                }
                Err(SubmitError::Saturated)
            }
        }
    }

    /// Runs a request synchronously on the calling thread (benchmarks, inputs module).
    ///
    /// # Errors
    /// As [`Model::run`], or no model.
    pub fn run_now(&self, inputs: &[Tensor], stream: Option<&str>) -> Result<Reply, RunError> {
        let m = self
            .serving()
            .ok_or_else(|| RunError::Inference("no model loaded".into()))?;
        let (release, res) = self.run_one(&m, inputs, stream);
        res.map(|outputs| Reply { outputs, release })
    }

    /// Completes a job: reply, telemetry, drift (in that order, so the
    /// bookkeeping is off the caller's latency).
    fn finish(&self, job: Job, release: ReleaseRef, res: Result<Vec<Tensor>, RunError>) {
        let now = Instant::now();
        let latency = now.saturating_duration_since(job.enqueued);
        // A reply after the deadline is a 504 for an API caller: an error.
        let ok = matches!(&res, Ok(out) if now <= job.deadline && check_finite(out).is_ok());
        let drift_outputs = match &res {
            Ok(out) if ok && self.drift.wants() => Some(out.clone()),
            _ => None,
        };
        let _ = job.reply.send(res.map(|outputs| Reply {
            outputs,
            release: release.clone(),
        }));
        if let Ok(mut s) = self.stats.lock() {
            if ok {
                s.record_ok(Some(&release), latency);
            } else {
                s.record_error(Some(&release));
            }
        }
        if let Some(outputs) = drift_outputs {
            self.drift.offer(DriftSample {
                release,
                inputs: job.inputs,
                outputs,
                request_id: job.request_id,
            });
        }
    }

    /// Runs one request on the serving model (and the shadow candidate);
    /// returns the release that answered and its outputs.
    fn run_one(
        &self,
        active: &Arc<Model>,
        inputs: &[Tensor],
        stream: Option<&str>,
    ) -> (ReleaseRef, Result<Vec<Tensor>, RunError>) {
        let trial = self.trial();
        let serving = match &trial {
            Some(t) if t.mode == TrialMode::Serve => t.model.clone(),
            _ => active.clone(),
        };
        let t0 = Instant::now();
        let res = serving.run(inputs, stream);
        let d = t0.elapsed();
        if let Some(t) = trial {
            // Design: shadow runs use their own stream key so the candidate's
            // recurrent state never leaks into the serving model's.
            let (cand_res, cand_d) = if t.mode == TrialMode::Shadow {
                let key = stream.map(|s| format!("shadow:{s}"));
                let t1 = Instant::now();
                let r = t.model.run(inputs, key.as_deref());
                (r, t1.elapsed())
            } else {
                (
                    res.as_ref()
                        .map(|r| r.clone())
                        .map_err(|e| RunError::Inference(e.to_string())),
                    d,
                )
            };
            if t.mode == TrialMode::Shadow && t.end == TrialEnd::Discard {
                self.record_shadow(&t, &res, &cand_res, cand_d);
            }
            if let Ok(mut s) = t.stats.lock() {
                s.candidate.record(cand_d, cand_res.is_ok());
                if t.mode == TrialMode::Shadow {
                    s.baseline.record(d, res.is_ok());
                }
                if let Ok(out) = &cand_res {
                    if let Err(e) = check_finite(out) {
                        s.non_finite.get_or_insert(e);
                    }
                }
            }
        }
        (serving.release.clone(), res)
    }
}

impl Engine {
    /// Telemetry of a shadow arm's run: the candidate's request (latency,
    /// error) under its own release and, when both models answered,
    /// whether they agreed ([`shadow_agrees`]).
    fn record_shadow(
        &self,
        t: &Trial,
        serving: &Result<Vec<Tensor>, RunError>,
        candidate: &Result<Vec<Tensor>, RunError>,
        took: Duration,
    ) {
        let ok = matches!(candidate, Ok(out) if check_finite(out).is_ok());
        let agreed = match (serving, candidate) {
            (Ok(a), Ok(b)) if ok => Some(shadow_agrees(&t.model.spec, a, b)),
            _ => None,
        };
        if let Ok(mut s) = self.stats.lock() {
            let release = Some(&t.model.release);
            if ok {
                s.record_ok(release, took);
            } else {
                s.record_error(release);
            }
            if let Some(agreed) = agreed {
                s.record_shadow(&t.model.release, agreed);
            }
        }
    }
}

/// Whether a shadow candidate's `candidate` outputs agree with the serving
/// model's `serving` on the same inputs: the same label-comparable answer
/// ([`crate::feedback::Answer`]: class of output 0, or a probability
/// thresholded at 0.5) when the model has one; otherwise the same shapes and
/// every element within `1e-3 · max(1, |a|)` of the serving value.
pub fn shadow_agrees(
    spec: &edgefleet_bundle::payload::ModelSpec,
    serving: &[Tensor],
    candidate: &[Tensor],
) -> bool {
    use crate::feedback::Answer;
    if let (Some(a), Some(b)) = (Answer::of(spec, serving), Answer::of(spec, candidate)) {
        return a.value() == b.value();
    }
    serving.len() == candidate.len()
        && serving.iter().zip(candidate).all(|(a, b)| {
            a.shape == b.shape
                && match (&a.data, &b.data) {
                    (TensorData::F32(x), TensorData::F32(y)) => x
                        .iter()
                        .zip(y)
                        .all(|(a, b)| (a - b).abs() <= 1e-3 * a.abs().max(1.0)),
                    (TensorData::I64(x), TensorData::I64(y)) => x == y,
                    _ => false,
                }
        })
}

fn worker(engine: std::sync::Weak<Engine>, rx: Arc<Mutex<Receiver<Job>>>, max_batch: usize) {
    loop {
        let mut jobs = Vec::new();
        {
            let Ok(rx) = rx.lock() else { return };
            match rx.recv() {
                Ok(j) => jobs.push(j),
                Err(_) => return,
            }
            let batchable = |e: &Engine| {
                e.active().is_some_and(|m| m.spec.batch_axis.is_some()) && e.trial().is_none()
            };
            if let Some(e) = engine.upgrade() {
                if batchable(&e) && jobs[0].stream.is_none() {
                    while jobs.len() < max_batch {
                        match rx.try_recv() {
                            Ok(j) if j.stream.is_none() => jobs.push(j),
                            Ok(j) => {
                                jobs.push(j);
                                break;
                            }
                            Err(_) => break,
                        }
                    }
                }
            }
        }
        let Some(e) = engine.upgrade() else { return };
        e.depth.fetch_sub(jobs.len(), Ordering::Relaxed);
        let now = Instant::now();
        let mut live = Vec::new();
        let Some(active) = e.serving() else {
            for j in jobs {
                let _ = j
                    .reply
                    .send(Err(RunError::Inference("no model loaded".into())));
            }
            continue;
        };
        for j in jobs {
            if j.deadline <= now {
                e.finish(
                    j,
                    active.release.clone(),
                    Err(RunError::Inference("timed out in the queue".into())),
                );
            } else {
                live.push(j);
            }
        }
        let batch_limit = active
            .spec
            .batch_axis
            .and_then(|a| {
                active
                    .spec
                    .inputs
                    .first()
                    .and_then(|s| s.shape.get(a).copied())
            })
            .unwrap_or(1);
        if live.len() > 1 && batch_limit > 1 && live.iter().all(|j| j.stream.is_none()) {
            let mut live = live.into_iter().peekable();
            while live.peek().is_some() {
                let mut chunk: Vec<Job> = live.by_ref().take(batch_limit).collect();
                let reqs: Vec<Vec<Tensor>> = chunk
                    .iter_mut()
                    .map(|j| std::mem::take(&mut j.inputs))
                    .collect();
                let outs = active.run_batch(&reqs);
                for ((mut j, inputs), o) in chunk.into_iter().zip(reqs).zip(outs) {
                    j.inputs = inputs;
                    e.finish(j, active.release.clone(), o);
                }
            }
            continue;
        }
        for j in live {
            let (release, r) = e.run_one(&active, &j.inputs, j.stream.as_deref());
            e.finish(j, release, r);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use edgefleet_bundle::payload::{DType, ModelFormat, ModelSpec, Task, TensorSpec};

    fn spec(task: Task) -> ModelSpec {
        ModelSpec {
            name: "m".into(),
            format: ModelFormat::Nnef,
            file: "m.nnef.tar".into(),
            inputs: vec![],
            outputs: vec![TensorSpec {
                name: "y".into(),
                dtype: DType::F32,
                shape: vec![1, 3],
            }],
            state: vec![],
            task,
            batch_axis: None,
        }
    }

    fn t(v: &[f32]) -> Vec<Tensor> {
        vec![Tensor::f32("y", vec![1, v.len()], v.to_vec())]
    }

    #[test]
    fn shadow_agreement_compares_answers_then_values() {
        let cls = spec(Task::Classifier {
            labels: vec!["a".into(), "b".into(), "c".into()],
        });
        assert!(shadow_agrees(
            &cls,
            &t(&[0.1, 0.7, 0.2]),
            &t(&[0.3, 0.4, 0.3])
        ));
        assert!(!shadow_agrees(
            &cls,
            &t(&[0.1, 0.7, 0.2]),
            &t(&[0.5, 0.4, 0.1])
        ));
        let prob = spec(Task::Other);
        assert!(shadow_agrees(&prob, &t(&[0.51]), &t(&[0.99])));
        assert!(!shadow_agrees(&prob, &t(&[0.51]), &t(&[0.49])));
        // No answer: element-wise within 1e-3 relative (1e-3 absolute below 1).
        assert!(shadow_agrees(
            &prob,
            &t(&[1000.0, 2.0]),
            &t(&[1000.9, 2.0005])
        ));
        assert!(!shadow_agrees(
            &prob,
            &t(&[1000.0, 2.0]),
            &t(&[1001.2, 2.0])
        ));
        assert!(!shadow_agrees(&prob, &t(&[1.0, 2.0]), &t(&[1.0, 2.0, 3.0])));
        assert!(!shadow_agrees(&prob, &t(&[1.0]), &[]));
    }
}
