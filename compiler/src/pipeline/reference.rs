//! Stage 3: the fp32 reference. tract runs the specialised graph on the calibration
//! cases (recurrent state threaded from its own outputs); the cases held out for the
//! drift reference are set aside (issue #11: the reference describes data, not the
//! calibration set).

use std::time::Duration;

use edgefleet_bundle::payload::{StateBinding, TensorData, TensorSpec};
use edgefleet_targets::TargetProfile;

use super::{progress, Specialised};
use crate::onnx::{self, pb};
use crate::runtime::{Outputs, Runner, Threads};
use crate::{
    calib, generated_reference_cases, split_cases, state_bindings, CompileOptions,
    DriftReferenceReport, Error, MIN_CASES_TO_SPLIT, SPLIT_BLOCK, SPLIT_SEED,
};

/// Stage 3's hand-off: the fp32 reference and the cases it ran.
pub(crate) struct Reference {
    /// tract on the specialised fp32 graph; its `inputs` / `outputs` are the model's
    /// tensor specs in call order.
    pub runner: Runner,
    /// Recurrent state bindings (input `X` fed by output `XN`).
    pub state: Vec<StateBinding>,
    /// Calibration cases as full input lists in `runner.inputs` order, state
    /// threaded from the reference's own previous outputs (the gate's and the golden
    /// vectors' inputs).
    pub cases: Vec<Vec<TensorData>>,
    /// The reference's outputs, one per case of `cases`.
    pub outputs: Vec<Outputs>,
    /// The held-out cases of the drift reference (state inputs zero: the device's
    /// own state is threaded in stage 6).
    pub drift_cases: Vec<Vec<TensorData>>,
    /// How the cases were split (counts of the kept pass and the features are filled
    /// in stage 6).
    pub drift_report: DriftReferenceReport,
    /// `generated: <kinds>` or the calibration directory.
    pub calibration: String,
    /// Median latency of the reference on the first case, on `threads`.
    pub latency: Duration,
    /// Threads every latency of this compile is measured on (the profile's `cores`,
    /// capped at this machine's).
    pub threads: Threads,
    /// The original model under tract: median latency, or why it does not load or run.
    pub original_tract: String,
}

/// Runs stage 3.
///
/// # Errors
/// [`Error::Node`] (or [`Error::Runtime`] where tract names no node) when the
/// specialised model does not load or run in tract;
/// [`Error::Budget`] (`ram_budget_bytes`) when its weights and one set of inputs and
/// outputs exceed the target's RAM; [`Error::Calibration`] for a bad calibration
/// directory.
pub(super) fn run(
    spec: &Specialised,
    opts: &CompileOptions,
    target: &TargetProfile,
) -> Result<Reference, Error> {
    let path = spec.source.path.as_path();
    let runner = Runner::onnx(
        &spec.bytes,
        &format!("{} (specialised fp32)", path.display()),
    )
    .map_err(|e| crate::explain::locate(e, &spec.model))?;
    check_resident_budget(onnx::graph(&spec.model), &runner, target)?;
    let state = state_bindings(&runner.inputs, &runner.outputs);
    let loaded = calibration_cases(&runner, &state, spec, opts)?;
    let split = split_calibration(loaded.cases, loaded.generated);
    let drift_cases = split
        .reference
        .iter()
        .map(|c| case_inputs(&runner.inputs, &runner.outputs, &state, c, None))
        .collect();
    let pb = progress(
        opts.progress,
        split.calibration.len() as u64,
        &format!("{}: reference run", spec.source.name),
    );
    let (cases, outputs) = run_threaded(&runner, &state, &split.calibration, &pb)
        .map_err(|e| crate::explain::locate(e, &spec.model))?;
    pb.finish_and_clear();
    let threads = Threads::for_cores(target.cores);
    let latency = runner.median_latency_on(&cases[0], 5, threads)?;
    let original_tract = original_under_tract(&spec.source.original, &runner, &cases[0]);
    Ok(Reference {
        runner,
        state,
        cases,
        outputs,
        drift_cases,
        drift_report: split.report,
        calibration: loaded.description,
        latency,
        threads,
        original_tract,
    })
}

/// RAM the device needs at least: the weights as tract holds them after load (fp32,
/// whatever the file stores) and one set of inputs and outputs; activations come on
/// top (not estimated).
///
/// # Errors
/// [`Error::Budget`] (`ram_budget_bytes`) when that exceeds the target's budget.
fn check_resident_budget(
    g: &pb::GraphProto,
    runner: &Runner,
    target: &TargetProfile,
) -> Result<(), Error> {
    let weights: u64 = g
        .initializer
        .iter()
        .map(|t| t.dims.iter().map(|&d| d.max(0) as u64).product::<u64>())
        .sum();
    let io: u64 = runner
        .inputs
        .iter()
        .chain(&runner.outputs)
        .map(|t| t.len() as u64)
        .sum();
    let resident = 4 * (weights + io);
    if resident > target.ram_budget_bytes {
        return Err(Error::Budget {
            target: target.id.clone(),
            budget: "ram_budget_bytes",
            what: "the model (fp32 weights as loaded, one set of inputs and outputs)".into(),
            need: resident,
            limit: target.ram_budget_bytes,
        });
    }
    Ok(())
}

/// Calibration cases, loaded or generated, before the split.
struct LoadedCases {
    cases: Vec<calib::Case>,
    /// For generated cases: how many calibrate (the rest are the drift reference).
    generated: Option<usize>,
    /// `generated: <kinds>` or the directory.
    description: String,
}

/// The calibration cases of the data (non-state) inputs: from `--calibration DIR`,
/// else generated. Design: as many generated cases as stay cheap. A case of a small
/// input (Silero's 576-sample window) costs well under a millisecond per candidate,
/// and the gate's verdict -- which the narrowing step leans on -- is only as good as
/// the number of cases behind it.
///
/// # Errors
/// [`Error::Calibration`] from [`calib::load_dir`].
fn calibration_cases(
    runner: &Runner,
    state: &[StateBinding],
    spec: &Specialised,
    opts: &CompileOptions,
) -> Result<LoadedCases, Error> {
    let data_inputs: Vec<&TensorSpec> = runner
        .inputs
        .iter()
        .filter(|i| !state.iter().any(|b| b.input == i.name))
        .collect();
    if let Some(dir) = &opts.calibration {
        return Ok(LoadedCases {
            cases: calib::load_dir(dir, &data_inputs)?,
            generated: None,
            description: dir.display().to_string(),
        });
    }
    let largest = data_inputs.iter().map(|s| s.len()).max().unwrap_or(0);
    let n_cases = if opts.cases > 0 {
        opts.cases
    } else if largest > 100_000 {
        4
    } else if largest > 10_000 {
        8
    } else {
        32
    };
    // A CTC recogniser reads lines after the orientation classifier turned them
    // upright: it is not calibrated on upside-down text.
    let lines = if matches!(
        spec.source.overrides.task,
        Some(edgefleet_targets::Task::Ctc { .. })
    ) {
        calib::Lines::Upright
    } else {
        calib::Lines::UprightAndTurned
    };
    let ranges = declared_ranges(&data_inputs, spec, opts)?;
    let kinds: Vec<String> = data_inputs
        .iter()
        .map(|s| {
            let mut k = format!("{}={:?}", s.name, calib::kind_of(s));
            if s.dtype != edgefleet_bundle::payload::DType::F32 {
                k += &format!(" {}", s.dtype);
            }
            if let Some([lo, hi]) = calib::range_of(s, &ranges) {
                k += &format!(" in {lo}..{hi}");
            }
            k
        })
        .collect();
    Ok(LoadedCases {
        cases: calib::generate(
            &data_inputs,
            n_cases + generated_reference_cases(largest),
            lines,
            &ranges,
        ),
        generated: Some(n_cases),
        description: format!("generated: {}", kinds.join(", ")),
    })
}

/// The declared ranges of the data inputs: the flags over the profile's. A
/// flag naming no data input is an error; a profile entry is not.
///
/// # Errors
/// [`Error::Shape`] naming the input for an unknown name (flag) or a range
/// that is not finite, inverted or outside the input's type.
fn declared_ranges(
    inputs: &[&TensorSpec],
    spec: &Specialised,
    opts: &CompileOptions,
) -> Result<calib::Ranges, Error> {
    let bad = |input: &str, reason: String| Error::Shape {
        path: spec.source.path.clone(),
        input: input.into(),
        reason,
    };
    for name in opts.ranges.keys() {
        if !inputs.iter().any(|s| &s.name == name) {
            return Err(bad(
                name,
                format!(
                    "--range names no data input (inputs: {})",
                    inputs
                        .iter()
                        .map(|s| s.name.as_str())
                        .collect::<Vec<_>>()
                        .join(", ")
                ),
            ));
        }
    }
    let mut ranges = spec.source.overrides.ranges.clone();
    ranges.extend(opts.ranges.clone());
    ranges.retain(|name, _| inputs.iter().any(|s| &s.name == name));
    for s in inputs {
        if let Some(r) = ranges.get(&s.name) {
            calib::check_range(s, *r).map_err(|reason| bad(&s.name, reason))?;
        }
    }
    Ok(ranges)
}

/// Runs the reference over the calibration cases in order, each case's state inputs
/// taken from the previous case's outputs (zeros for the first). Returns the full
/// input lists and the outputs.
///
/// # Errors
/// [`Error::Runtime`] when a case does not run.
fn run_threaded(
    runner: &Runner,
    state: &[StateBinding],
    cases: &[calib::Case],
    pb: &indicatif::ProgressBar,
) -> Result<(Vec<Vec<TensorData>>, Vec<Outputs>), Error> {
    let mut full = Vec::with_capacity(cases.len());
    let mut outs: Vec<Outputs> = Vec::with_capacity(cases.len());
    for c in cases {
        let inputs = case_inputs(&runner.inputs, &runner.outputs, state, c, outs.last());
        outs.push(runner.run(&inputs)?);
        full.push(inputs);
        pb.inc(1);
    }
    Ok((full, outs))
}

/// The original (unspecialised) model under tract, for the report: its median
/// latency on `case`, or why it does not load or run (often it does not: that is why
/// the reference is the specialised graph).
fn original_under_tract(original: &[u8], reference: &Runner, case: &[TensorData]) -> String {
    match Runner::onnx_with_inputs(original, &reference.inputs, "original") {
        Ok(r) => match r.median_latency(case, 5) {
            Ok(d) => format!("{:.3} ms", d.as_secs_f64() * 1e3),
            Err(e) => format!("loads, does not run: {e}"),
        },
        Err(e) => format!(
            "does not load: {}",
            e.to_string().chars().take(200).collect::<String>()
        ),
    }
}

/// Runs `runner` over full input lists (a candidate over the reference's cases).
///
/// # Errors
/// [`Error::Runtime`] when a case does not run.
pub(super) fn run_cases(
    runner: &Runner,
    cases: &[Vec<TensorData>],
    pb: &indicatif::ProgressBar,
) -> Result<Vec<Outputs>, Error> {
    let mut out = Vec::with_capacity(cases.len());
    for c in cases {
        out.push(runner.run(c)?);
        pb.inc(1);
    }
    Ok(out)
}

/// The full input list of one calibration case in `specs` order: state
/// inputs from `prev`'s bound output (zeros without one), data inputs from
/// the case (zeros when missing), each in its input's type
/// ([`TensorData::from_f32`]: integers rounded and saturated).
fn case_inputs(
    specs: &[TensorSpec],
    outputs: &[TensorSpec],
    state: &[StateBinding],
    case: &calib::Case,
    prev: Option<&Outputs>,
) -> Vec<TensorData> {
    specs
        .iter()
        .map(|spec| {
            if let Some(b) = state.iter().find(|b| b.input == spec.name) {
                let oi = outputs.iter().position(|o| o.name == b.output).unwrap_or(0);
                let v = prev.map_or_else(|| vec![0.0; spec.len()], |p| p[oi].clone());
                TensorData::from_f32(spec.dtype, &v)
            } else {
                let v = case
                    .get(&spec.name)
                    .cloned()
                    .unwrap_or_else(|| vec![0.0; spec.len()]);
                TensorData::from_f32(spec.dtype, &v)
            }
        })
        .collect()
}

/// The calibration cases split into the gate's part and the drift
/// reference's part ([`DriftReferenceReport`] fields filled but for the
/// counts of the kept pass and the features).
struct CaseSplit {
    calibration: Vec<calib::Case>,
    reference: Vec<calib::Case>,
    report: DriftReferenceReport,
}

/// Splits loaded or generated cases. Generated: `generated` cases calibrate
/// (the same cases as without a reference) and the rest, further into the
/// same generated stream or pages, are the reference. A directory: a quarter
/// of the cases (at least 32, at most 256) calibrate, chosen by
/// [`split_cases`], the rest are the reference; too few cases are shared.
fn split_calibration(all: Vec<calib::Case>, generated: Option<usize>) -> CaseSplit {
    let n = all.len();
    let report =
        |split: &str, rule: String, cal: usize, reference: usize, note| DriftReferenceReport {
            split: split.into(),
            rule,
            calibration_cases: cal,
            reference_cases: reference,
            warmup_cases: 0,
            samples: 0,
            features: Vec::new(),
            note,
        };
    if let Some(k) = generated.filter(|&k| k < n) {
        let mut calibration = all;
        let reference = calibration.split_off(k);
        let rule = format!(
            "generated: the first {k} cases calibrate, the next {} (later in the same generated audio / other pages) are the reference",
            reference.len()
        );
        return CaseSplit {
            report: report("held_out", rule, k, reference.len(), None),
            calibration,
            reference,
        };
    }
    let k = (n / 4).clamp(32, 256);
    match split_cases(n, k) {
        Some((cal, reference)) => {
            let rule = format!(
                "directory: blocks of {SPLIT_BLOCK} consecutive cases shuffled with seed {SPLIT_SEED:#x}; {} cases calibrate, {} are the reference",
                cal.len(),
                reference.len()
            );
            let pick = |idx: &[usize]| -> Vec<calib::Case> { idx.iter().map(|&i| all[i].clone()).collect() };
            CaseSplit {
                report: report("held_out", rule, cal.len(), reference.len(), None),
                calibration: pick(&cal),
                reference: pick(&reference),
            }
        }
        None => CaseSplit {
            report: report(
                "shared",
                "every case calibrates and is the reference".into(),
                n,
                n,
                Some(format!(
                    "only {n} calibration cases: at least {MIN_CASES_TO_SPLIT} are needed to hold some out, so the drift reference is the calibration data itself"
                )),
            ),
            calibration: all.clone(),
            reference: all,
        },
    }
}
