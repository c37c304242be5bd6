//! Statistical acceptance tests for `edgefleet-experiment`.
//!
//! Every simulation is seeded and deterministic; run with `--nocapture` to
//! see the measured rates. Simulated experiments send batches of
//! [`BATCH`] observations per arm and evaluate the rule after every batch,
//! up to [`MAX_BATCHES`] batches (4,000 observations per arm).
#![allow(clippy::unwrap_used)]

use edgefleet_experiment::{
    assign, confidence_sequence_half_width, mixture_log_likelihood_ratio,
    one_sided_log_likelihood_ratio, thompson_allocation, thompson_allocation_with_floor, Decision,
    DecisionRule, Direction, Error, Guardrail, GuardrailMonitor, GuardrailVerdict, Margin, Mean,
    Proportion, SequentialTest, Summary,
};

/// Simulated experiments per scenario.
const EXPERIMENTS: usize = 1000;
/// Observations per arm per telemetry batch.
const BATCH: u64 = 20;
/// Batches per experiment (the stated maximum sample size is
/// `BATCH * MAX_BATCHES = 4000` per arm).
const MAX_BATCHES: u64 = 200;
/// Significance level of every rule.
const ALPHA: f64 = 0.05;
/// Two-sided 97.5% normal quantile (naive fixed-horizon z-test).
const Z_975: f64 = 1.959_963_984_540_054;

// ---------------------------------------------------------------- helpers

/// SplitMix64 (Steele, Lea, Flood 2014) for the simulations.
struct Rng(u64);

impl Rng {
    fn new(seed: u64) -> Self {
        Self(seed)
    }

    fn next_u64(&mut self) -> u64 {
        self.0 = self.0.wrapping_add(0x9E37_79B9_7F4A_7C15);
        let mut z = self.0;
        z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
        z ^ (z >> 31)
    }

    /// Uniform in `[0, 1)`.
    fn uniform(&mut self) -> f64 {
        (self.next_u64() >> 11) as f64 * (1.0 / (1u64 << 53) as f64)
    }

    /// Standard normal (Marsaglia polar method).
    fn normal(&mut self) -> f64 {
        loop {
            let u = 2.0 * self.uniform() - 1.0;
            let v = 2.0 * self.uniform() - 1.0;
            let s = u * u + v * v;
            if s > 0.0 && s < 1.0 {
                return u * (-2.0 * s.ln() / s).sqrt();
            }
        }
    }

    /// Number of successes in `n` Bernoulli(`p`) trials.
    fn binomial(&mut self, n: u64, p: f64) -> u64 {
        (0..n).filter(|_| self.uniform() < p).count() as u64
    }
}

/// Data-generating model of one arm.
#[derive(Clone, Copy)]
enum Model {
    /// Bernoulli with success probability `p`.
    Bernoulli(f64),
    /// Normal with mean and standard deviation (ms).
    Gaussian(f64, f64),
}

impl Model {
    fn mean(self) -> f64 {
        match self {
            Model::Bernoulli(p) => p,
            Model::Gaussian(m, _) => m,
        }
    }
}

/// Accumulator of one simulated arm.
enum Arm {
    Bernoulli(Proportion),
    Gaussian(Mean),
}

impl Arm {
    fn new(model: Model) -> Self {
        match model {
            Model::Bernoulli(_) => Arm::Bernoulli(Proportion::new()),
            Model::Gaussian(..) => Arm::Gaussian(Mean::new()),
        }
    }

    /// Adds one batch of `BATCH` observations drawn from `model`.
    fn add_batch(&mut self, model: Model, rng: &mut Rng) {
        match (self, model) {
            (Arm::Bernoulli(p), Model::Bernoulli(q)) => {
                let s = rng.binomial(BATCH, q);
                p.record_batch(s, BATCH).unwrap();
            }
            (Arm::Gaussian(m), Model::Gaussian(mu, sd)) => {
                let mut batch = Mean::new();
                for _ in 0..BATCH {
                    batch.push(mu + sd * rng.normal()).unwrap();
                }
                m.merge(&batch).unwrap();
            }
            _ => unreachable!("arm and model kinds match"),
        }
    }

    fn summary(&self) -> Summary {
        match self {
            Arm::Bernoulli(p) => p.summary(),
            Arm::Gaussian(m) => m.summary(),
        }
    }
}

/// What one simulated experiment did.
#[derive(Default)]
struct Outcome {
    /// First non-`Continue` decision of the mSPRT and the smaller arm's
    /// sample size then.
    decided: Option<(Decision, u64)>,
    /// Whether the naive fixed-horizon z-test, peeked at after every batch,
    /// ever rejected.
    naive_rejected: bool,
    /// Whether the always-valid interval contained the true difference at
    /// every evaluation.
    covered: bool,
}

/// How long to run each experiment.
#[derive(Clone, Copy, PartialEq)]
enum Stop {
    /// Until the mSPRT decides (power).
    AtDecision,
    /// Until both the mSPRT and the naive test have rejected (A/A).
    WhenBothRejected,
    /// Always the full horizon (coverage).
    Never,
}

/// Runs one experiment of up to `batches` batches, evaluating after each.
fn run_experiment(
    a: Model,
    b: Model,
    rule: &DecisionRule,
    seed: u64,
    stop: Stop,
    batches: u64,
) -> Outcome {
    let mut rng = Rng::new(seed);
    let (mut arm_a, mut arm_b) = (Arm::new(a), Arm::new(b));
    let mut test = SequentialTest::new();
    let truth = b.mean() - a.mean();
    let mut out = Outcome {
        covered: true,
        ..Outcome::default()
    };
    for _ in 0..batches {
        arm_a.add_batch(a, &mut rng);
        arm_b.add_batch(b, &mut rng);
        let (sa, sb) = (arm_a.summary(), arm_b.summary());
        let eval = test.update(rule, &sa, &sb).unwrap();
        observe(&mut out, &eval, truth);
        if let Some(effect) = eval.effect {
            let z = effect.difference / effect.standard_error;
            out.naive_rejected |= z.abs() > Z_975;
        }
        let done = match stop {
            Stop::AtDecision => out.decided.is_some(),
            Stop::WhenBothRejected => out.decided.is_some() && out.naive_rejected,
            Stop::Never => false,
        };
        if done {
            break;
        }
    }
    out
}

/// Records decision and coverage of one evaluation.
fn observe(out: &mut Outcome, eval: &edgefleet_experiment::Evaluation, truth: f64) {
    if let Some(effect) = eval.effect {
        out.covered &= effect.always_valid.contains(truth);
    }
    let decided = !matches!(eval.decision, Decision::Continue | Decision::Warmup);
    if decided && out.decided.is_none() {
        out.decided = Some((eval.decision, eval.samples_a.min(eval.samples_b)));
    }
}

/// Runs `EXPERIMENTS` experiments of up to `batches` batches with seeds
/// derived from `base_seed`.
fn run_many(
    a: Model,
    b: Model,
    rule: &DecisionRule,
    base_seed: u64,
    stop: Stop,
    batches: u64,
) -> Vec<Outcome> {
    (0..EXPERIMENTS as u64)
        .map(|i| {
            let seed = base_seed ^ i.wrapping_mul(0x9E37_79B9);
            run_experiment(a, b, rule, seed, stop, batches)
        })
        .collect()
}

/// Binomial 3-sigma margin for a rate `p` over `EXPERIMENTS` runs.
fn three_sigma(p: f64) -> f64 {
    3.0 * (p * (1.0 - p) / EXPERIMENTS as f64).sqrt()
}

/// `q`-quantile (nearest rank) of `xs`.
fn quantile(xs: &mut [u64], q: f64) -> u64 {
    xs.sort_unstable();
    let rank = ((q * xs.len() as f64).ceil() as usize).clamp(1, xs.len());
    xs[rank - 1]
}

fn rule(tau: f64, direction: Direction) -> DecisionRule {
    DecisionRule {
        alpha: ALPHA,
        tau,
        min_samples_per_arm: 100,
        direction,
        max_samples_per_arm: None,
    }
}

/// Accuracy rule: mixing sd 0.05 (5 accuracy points).
fn accuracy_rule() -> DecisionRule {
    rule(0.05, Direction::HigherIsBetter)
}

/// Latency rule: mixing sd 2 ms.
fn latency_rule() -> DecisionRule {
    rule(2.0, Direction::LowerIsBetter)
}

/// The field named by an [`Error::InvalidParameter`].
fn field(err: Error) -> String {
    match err {
        Error::InvalidParameter { field, .. } => field,
        other => panic!("expected InvalidParameter, got {other:?}"),
    }
}

// ---------------------------------------------------------------- assignment

#[test]
fn assignment_split_matches_allocations() {
    let allocations = [0.5, 0.3, 0.2];
    let n = 100_000;
    let mut counts = [0usize; 3];
    for i in 0..n {
        counts[assign(&format!("device-{i}"), "exp-split", &allocations).unwrap()] += 1;
    }
    for (c, w) in counts.iter().zip(allocations) {
        let share = *c as f64 / n as f64;
        println!("allocation {w:.2}: share {share:.4}");
        assert!((share - w).abs() < 0.01, "share {share} vs allocation {w}");
    }
}

#[test]
fn assignment_independent_between_experiments() {
    let n = 100_000;
    let mut joint = [[0usize; 2]; 2];
    for i in 0..n {
        let id = format!("device-{i}");
        let x = assign(&id, "exp-x", &[1.0, 1.0]).unwrap();
        let y = assign(&id, "exp-y", &[1.0, 1.0]).unwrap();
        joint[x][y] += 1;
    }
    for row in joint {
        for c in row {
            let share = c as f64 / n as f64;
            println!("joint cell share {share:.4} (independent: 0.25)");
            assert!((share - 0.25).abs() < 0.01);
        }
    }
}

#[test]
fn assignment_is_pinned_and_sticky() {
    // Expected values computed independently with Python's hashlib:
    // SHA-256("model-v7-vs-v8" 0x00 "device-NNNN"), top 53 bits / 2^53.
    let expected = [1, 1, 1, 1, 2, 0, 1, 2, 0, 0, 0, 0];
    for (i, &e) in expected.iter().enumerate() {
        let id = format!("device-{i:04}");
        let got = assign(&id, "model-v7-vs-v8", &[1.0, 1.0, 1.0]).unwrap();
        assert_eq!(got, e, "{id}");
        assert_eq!(
            assign(&id, "model-v7-vs-v8", &[1.0, 1.0, 1.0]).unwrap(),
            got
        );
    }
}

// ---------------------------------------------------------------- A/A

/// Shared body of the A/A tests.
fn aa_false_positive_rates(model: Model, rule: &DecisionRule, seed: u64, label: &str) {
    let start = std::time::Instant::now();
    let outcomes = run_many(
        model,
        model,
        rule,
        seed,
        Stop::WhenBothRejected,
        MAX_BATCHES,
    );
    let msprt = outcomes.iter().filter(|o| o.decided.is_some()).count() as f64 / EXPERIMENTS as f64;
    let naive = outcomes.iter().filter(|o| o.naive_rejected).count() as f64 / EXPERIMENTS as f64;
    println!(
        "A/A {label}: {EXPERIMENTS} experiments x {MAX_BATCHES} looks: mSPRT FPR {msprt:.3} \
         (alpha {ALPHA}), naive peeking z-test FPR {naive:.3} [{:.2?}]",
        start.elapsed()
    );
    assert!(msprt <= ALPHA + three_sigma(ALPHA), "mSPRT FPR {msprt}");
    assert!(naive > 0.10, "naive peeking FPR {naive} should be inflated");
}

#[test]
fn aa_bernoulli_accuracy_false_positive_rate() {
    aa_false_positive_rates(
        Model::Bernoulli(0.8),
        &accuracy_rule(),
        0xA11CE,
        "accuracy p=0.8",
    );
}

#[test]
fn aa_gaussian_latency_false_positive_rate() {
    let latency = Model::Gaussian(50.0, 10.0);
    aa_false_positive_rates(latency, &latency_rule(), 0xB0B, "latency 50±10 ms");
}

// ---------------------------------------------------------------- power

/// A power scenario: effect, rule and the stated maximum sample size.
struct PowerCase {
    label: &'static str,
    a: Model,
    b: Model,
    rule: DecisionRule,
    /// Stated maximum sample size per arm (a multiple of `BATCH`).
    max_per_arm: u64,
    /// Per-arm size of a fixed-horizon two-sided z-test with 80% power at
    /// `ALPHA`, `(z_0.975 + z_0.8)² (σ_A² + σ_B²) / δ²`, for comparison.
    fixed_horizon_n: f64,
    seed: u64,
}

/// Shared body of the power tests: asserts power >= 80% within the stated
/// maximum sample size and that no experiment picks the wrong winner.
fn power(case: &PowerCase) {
    let start = std::time::Instant::now();
    let batches = case.max_per_arm / BATCH;
    let outcomes = run_many(
        case.a,
        case.b,
        &case.rule,
        case.seed,
        Stop::AtDecision,
        batches,
    );
    let mut n: Vec<u64> = outcomes
        .iter()
        .filter_map(|o| match o.decided {
            Some((Decision::BWins, n)) => Some(n),
            _ => None,
        })
        .collect();
    let wrong = outcomes
        .iter()
        .filter(|o| matches!(o.decided, Some((Decision::AWins, _))))
        .count();
    let power = n.len() as f64 / EXPERIMENTS as f64;
    let (median, p90) = (quantile(&mut n, 0.5), quantile(&mut n, 0.9));
    println!(
        "power {}: {power:.3} within {} per arm; samples per arm at decision: median {median}, \
         p90 {p90} (fixed-horizon 80%-power z-test: {:.0} per arm); wrong-sign decisions {wrong} \
         [{:.2?}]",
        case.label,
        case.max_per_arm,
        case.fixed_horizon_n,
        start.elapsed()
    );
    assert!(power >= 0.80, "power {power}");
    assert_eq!(wrong, 0);
}

/// `(z_0.975 + z_0.8)²`.
const Z_SUM_SQ: f64 = (1.959_963_984_540_054 + 0.841_621_233_572_914_3)
    * (1.959_963_984_540_054 + 0.841_621_233_572_914_3);

#[test]
fn power_accuracy_plus_six_points() {
    power(&PowerCase {
        label: "accuracy 0.80 -> 0.86",
        a: Model::Bernoulli(0.80),
        b: Model::Bernoulli(0.86),
        rule: accuracy_rule(),
        max_per_arm: 2000,
        fixed_horizon_n: Z_SUM_SQ * (0.8 * 0.2 + 0.86 * 0.14) / (0.06 * 0.06),
        seed: 0xC0FFEE,
    });
}

#[test]
fn power_latency_minus_point_two_sd() {
    power(&PowerCase {
        label: "latency 50 -> 48 ms (sd 10, i.e. -0.2 sd)",
        a: Model::Gaussian(50.0, 10.0),
        b: Model::Gaussian(48.0, 10.0),
        rule: latency_rule(),
        max_per_arm: 1200,
        fixed_horizon_n: Z_SUM_SQ * 200.0 / 4.0,
        seed: 0xD00D,
    });
}

// ---------------------------------------------------------------- coverage

/// Shared body of the coverage tests.
fn coverage(a: Model, b: Model, rule: &DecisionRule, seed: u64, label: &str) {
    let start = std::time::Instant::now();
    let outcomes = run_many(a, b, rule, seed, Stop::Never, MAX_BATCHES);
    let covered = outcomes.iter().filter(|o| o.covered).count() as f64 / EXPERIMENTS as f64;
    println!(
        "coverage {label}: always-valid CI covered B-A at all {MAX_BATCHES} looks in {covered:.3} \
         of runs (target >= {}) [{:.2?}]",
        1.0 - ALPHA,
        start.elapsed()
    );
    assert!(covered >= 1.0 - ALPHA, "coverage {covered}");
}

#[test]
fn confidence_sequence_coverage_accuracy() {
    coverage(
        Model::Bernoulli(0.80),
        Model::Bernoulli(0.83),
        &accuracy_rule(),
        0xE1,
        "accuracy 0.80 vs 0.83",
    );
}

#[test]
fn confidence_sequence_coverage_latency() {
    coverage(
        Model::Gaussian(50.0, 10.0),
        Model::Gaussian(51.0, 12.0),
        &latency_rule(),
        0xE2,
        "latency 50±10 vs 51±12 ms",
    );
}

// ---------------------------------------------------------------- guardrail

/// Error-rate guardrail: lower is better, 20% relative degradation allowed.
fn error_rate_guardrail(margin: Margin) -> Guardrail {
    Guardrail {
        metric: "error_rate".into(),
        direction: Direction::LowerIsBetter,
        margin,
        alpha: ALPHA,
        tau: 0.02,
        min_samples_per_arm: 100,
    }
}

/// Runs `EXPERIMENTS` guardrail experiments; returns the smaller arm's
/// sample size at Stop for each stopped run.
fn guardrail_runs(base: f64, candidate: f64, g: &Guardrail, seed: u64) -> Vec<u64> {
    let mut stopped = Vec::new();
    for i in 0..EXPERIMENTS as u64 {
        let mut rng = Rng::new(seed ^ i.wrapping_mul(0x9E37_79B9));
        let (mut a, mut b) = (Proportion::new(), Proportion::new());
        let mut monitor = GuardrailMonitor::new();
        for _ in 0..MAX_BATCHES {
            a.record_batch(rng.binomial(BATCH, base), BATCH).unwrap();
            b.record_batch(rng.binomial(BATCH, candidate), BATCH)
                .unwrap();
            let report = monitor.update(g, &a.summary(), &b.summary()).unwrap();
            if report.verdict == GuardrailVerdict::Stop {
                assert!(report.excess_lower_bound.unwrap() > 0.0);
                stopped.push(a.trials().min(b.trials()));
                break;
            }
        }
    }
    stopped
}

#[test]
fn guardrail_stops_doubled_error_rate() {
    let g = error_rate_guardrail(Margin::MaxRelativeDegradation(0.2));
    let mut n = guardrail_runs(0.05, 0.10, &g, 0xF1);
    let rate = n.len() as f64 / EXPERIMENTS as f64;
    let (median, p90) = (quantile(&mut n, 0.5), quantile(&mut n, 0.9));
    println!(
        "guardrail error rate 5% -> 10% (margin +20% rel.): stopped in {rate:.3} of runs; \
         samples per arm at stop: median {median}, p90 {p90}"
    );
    assert!(rate >= 0.95, "stop rate {rate}");
}

#[test]
fn guardrail_does_not_stop_equal_candidate() {
    let g = error_rate_guardrail(Margin::MaxRelativeDegradation(0.2));
    let stopped = guardrail_runs(0.05, 0.05, &g, 0xF2).len() as f64 / EXPERIMENTS as f64;
    let g0 = error_rate_guardrail(Margin::MaxAbsoluteDegradation(0.0));
    let stopped0 = guardrail_runs(0.05, 0.05, &g0, 0xF3).len() as f64 / EXPERIMENTS as f64;
    println!(
        "guardrail equal error rates 5%: not stopped in {:.3} of runs (margin +20% rel.); \
         false stops with zero margin {stopped0:.3} (alpha {ALPHA})",
        1.0 - stopped
    );
    assert!(1.0 - stopped >= 0.95, "stopped {stopped}");
    assert!(
        stopped0 <= ALPHA + three_sigma(ALPHA),
        "zero-margin false stops {stopped0}"
    );
}

#[test]
fn guardrail_report_numbers() {
    let g = Guardrail {
        metric: "latency_ms".into(),
        direction: Direction::LowerIsBetter,
        margin: Margin::MaxAbsoluteDegradation(2.0),
        alpha: ALPHA,
        tau: 2.0,
        min_samples_per_arm: 100,
    };
    let a = Summary::new(5000, 50.0, 100.0).unwrap();
    let b = Summary::new(5000, 56.0, 100.0).unwrap();
    let mut monitor = GuardrailMonitor::new();
    let report = monitor.update(&g, &a, &b).unwrap();
    println!("{report:?}");
    assert_eq!(report.verdict, GuardrailVerdict::Stop);
    assert_eq!(report.metric, "latency_ms");
    assert!((report.degradation - 6.0).abs() < 1e-12);
    assert!((report.allowed_degradation - 2.0).abs() < 1e-12);
    assert!((report.excess - 4.0).abs() < 1e-12);
    let lb = report.excess_lower_bound.unwrap();
    assert!(lb > 0.0 && lb < 4.0);
    // Improvement never trips a guardrail.
    let better = Summary::new(5000, 40.0, 100.0).unwrap();
    let mut fresh = GuardrailMonitor::new();
    assert_eq!(
        fresh.update(&g, &a, &better).unwrap().verdict,
        GuardrailVerdict::Continue
    );
    // Warmup below min samples.
    let small = Summary::new(10, 90.0, 100.0).unwrap();
    let mut fresh = GuardrailMonitor::new();
    assert_eq!(
        fresh.update(&g, &a, &small).unwrap().verdict,
        GuardrailVerdict::Warmup
    );
}

// ---------------------------------------------------------------- decision details

#[test]
fn decision_reports_effect_and_is_sticky() {
    let rule = DecisionRule {
        max_samples_per_arm: Some(10_000),
        ..accuracy_rule()
    };
    let mut test = SequentialTest::new();
    let a = Proportion::from_counts(800, 1000).unwrap();
    let b = Proportion::from_counts(900, 1000).unwrap();
    let eval = test.update(&rule, &a.summary(), &b.summary()).unwrap();
    println!("{eval:?}");
    assert_eq!(eval.decision, Decision::BWins);
    let effect = eval.effect.unwrap();
    assert!((effect.difference - 0.1).abs() < 1e-12);
    assert!(effect.always_valid.low > 0.0 && effect.always_valid.contains(0.1));
    // The always-valid interval is wider than the fixed-horizon one.
    assert!(effect.always_valid.low < effect.fixed_horizon.low);
    assert!(effect.always_valid.high > effect.fixed_horizon.high);
    assert!(eval.p_value <= ALPHA);
    // Later data pointing the other way does not flip a final decision.
    let b2 = Proportion::from_counts(1500, 2000).unwrap();
    let a2 = Proportion::from_counts(1600, 2000).unwrap();
    assert_eq!(
        test.update(&rule, &a2.summary(), &b2.summary())
            .unwrap()
            .decision,
        Decision::BWins
    );
    // Lower-is-better metric: B higher means A wins.
    let mut t = SequentialTest::new();
    let lat = latency_rule();
    let la = Summary::new(2000, 50.0, 100.0).unwrap();
    let lb = Summary::new(2000, 53.0, 100.0).unwrap();
    assert_eq!(t.update(&lat, &la, &lb).unwrap().decision, Decision::AWins);
}

#[test]
fn decision_warmup_and_inconclusive() {
    let rule = DecisionRule {
        max_samples_per_arm: Some(1000),
        ..accuracy_rule()
    };
    let mut test = SequentialTest::new();
    let small = Proportion::from_counts(40, 50).unwrap();
    let eval = test
        .update(&rule, &small.summary(), &small.summary())
        .unwrap();
    assert_eq!(eval.decision, Decision::Warmup);
    assert!(eval.effect.is_none());
    assert_eq!(test.evaluations(), 0);
    let same = Proportion::from_counts(800, 1000).unwrap();
    let eval = test
        .update(&rule, &same.summary(), &same.summary())
        .unwrap();
    assert_eq!(eval.decision, Decision::Inconclusive);
    assert_eq!(test.evaluations(), 1);
}

#[test]
fn pure_functions_agree_with_the_paper_formula() {
    let (theta, v, tau) = (0.02_f64, 1e-4_f64, 0.05_f64);
    let lambda = (v / (v + tau * tau)).sqrt()
        * (tau * tau * theta * theta / (2.0 * v * (v + tau * tau))).exp();
    let got = mixture_log_likelihood_ratio(theta, v, tau).unwrap();
    assert!((got - lambda.ln()).abs() < 1e-12);
    let h = confidence_sequence_half_width(v, tau, ALPHA).unwrap();
    let at_boundary = mixture_log_likelihood_ratio(h, v, tau).unwrap();
    assert!((at_boundary - (1.0 / ALPHA).ln()).abs() < 1e-9);
    // One-sided mixture: Λ⁺ < Λ·2 and increasing in the estimate.
    let one = one_sided_log_likelihood_ratio(theta, v, tau).unwrap();
    assert!(one < got + std::f64::consts::LN_2);
    assert!(one_sided_log_likelihood_ratio(-theta, v, tau).unwrap() < one);
}

// ---------------------------------------------------------------- Thompson

#[test]
fn thompson_converges_to_better_arm() {
    let truth = [0.50, 0.60, 0.55];
    let mut rng = Rng::new(0x7505);
    let mut arms = [Proportion::new(); 3];
    let mut shares: Vec<f64> = vec![1.0 / 3.0; 3];
    for round in 0..40u64 {
        for (arm, (&p, &share)) in arms.iter_mut().zip(truth.iter().zip(&shares)) {
            let pulls = (300.0 * share).round() as u64;
            arm.record_batch(rng.binomial(pulls, p), pulls).unwrap();
        }
        shares = thompson_allocation(&arms, 2000, round).unwrap();
    }
    println!("Thompson shares after 40 rounds of 300 pulls (truth {truth:?}): {shares:.3?}");
    assert!(shares[1] >= 0.85, "{shares:?}");
    assert!((shares.iter().sum::<f64>() - 1.0).abs() < 1e-12);
}

#[test]
fn thompson_respects_floor_and_is_deterministic() {
    let arms = [
        Proportion::from_counts(100, 1000).unwrap(),
        Proportion::from_counts(900, 1000).unwrap(),
    ];
    let shares = thompson_allocation(&arms, 5000, 1).unwrap();
    println!("clear winner: {shares:?}");
    assert!((shares[0] - 0.05).abs() < 1e-12);
    assert!((shares[1] - 0.95).abs() < 1e-12);
    let custom = thompson_allocation_with_floor(&arms, 5000, 1, 0.2).unwrap();
    assert!((custom[0] - 0.2).abs() < 1e-12);

    let close = [
        Proportion::from_counts(50, 100).unwrap(),
        Proportion::from_counts(52, 100).unwrap(),
    ];
    let x = thompson_allocation(&close, 4000, 99).unwrap();
    let y = thompson_allocation(&close, 4000, 99).unwrap();
    let z = thompson_allocation(&close, 4000, 100).unwrap();
    println!("close arms: seed 99 {x:?}, seed 100 {z:?}");
    assert_eq!(x, y);
    assert_ne!(x, z);
    assert!(x.iter().all(|&s| s >= 0.05));
    // Empty arms: symmetric posteriors, about half each.
    let empty = thompson_allocation(&[Proportion::new(); 2], 4000, 5).unwrap();
    assert!((empty[0] - 0.5).abs() < 0.05, "{empty:?}");
}

/// One bandit experiment: every round `2 * BATCH` Bernoulli observations
/// are split between the arms by the current Thompson shares (floor 0.1, as
/// the fleet server's default), the mSPRT is evaluated after every round,
/// and the shares are recomputed from the posteriors. Returns the first
/// decision with the total sample size and the control's share of it.
fn bandit_experiment(pa: f64, pb: f64, seed: u64, rounds: u64) -> Option<(Decision, u64, f64)> {
    let mut rng = Rng::new(seed);
    let mut arms = [Proportion::new(); 2];
    let mut share_b = 0.5;
    let mut test = SequentialTest::new();
    let rule = accuracy_rule();
    for round in 0..rounds {
        let nb = ((2 * BATCH) as f64 * share_b).round() as u64;
        let na = 2 * BATCH - nb;
        arms[0].record_batch(rng.binomial(na, pa), na).unwrap();
        arms[1].record_batch(rng.binomial(nb, pb), nb).unwrap();
        let eval = test
            .update(&rule, &arms[0].summary(), &arms[1].summary())
            .unwrap();
        if !matches!(eval.decision, Decision::Continue | Decision::Warmup) {
            let total = arms[0].trials() + arms[1].trials();
            return Some((eval.decision, total, arms[0].trials() as f64 / total as f64));
        }
        share_b = thompson_allocation_with_floor(&arms, 1000, seed ^ round, 0.1).unwrap()[1];
    }
    None
}

#[test]
fn aa_thompson_allocation_keeps_the_false_positive_rate() {
    let start = std::time::Instant::now();
    let decided = (0..EXPERIMENTS as u64)
        .filter(|&i| {
            bandit_experiment(0.8, 0.8, 0x7A7A ^ i.wrapping_mul(0x9E37_79B9), MAX_BATCHES).is_some()
        })
        .count();
    let fpr = decided as f64 / EXPERIMENTS as f64;
    println!(
        "A/A with Thompson allocation (floor 0.1, reallocated after every look): {EXPERIMENTS} \
         experiments x {MAX_BATCHES} looks: mSPRT FPR {fpr:.3} (alpha {ALPHA}) [{:.2?}]",
        start.elapsed()
    );
    assert!(fpr <= ALPHA + three_sigma(ALPHA), "FPR {fpr}");
}

#[test]
fn thompson_allocation_finds_the_better_arm_and_decides() {
    let start = std::time::Instant::now();
    // Shifting traffic to the better arm costs power at a given total
    // (the control's mean gets fewer observations), so the horizon is
    // 8,000 observations in all, twice the fixed-allocation power test's.
    const ROUNDS: u64 = 200;
    let mut n = Vec::new();
    let mut control_share = 0.0;
    let mut wrong = 0;
    for i in 0..EXPERIMENTS as u64 {
        match bandit_experiment(0.80, 0.86, 0xBA5D ^ i.wrapping_mul(0x9E37_79B9), ROUNDS) {
            Some((Decision::BWins, total, a_share)) => {
                n.push(total);
                control_share += a_share;
            }
            Some((Decision::AWins, ..)) => wrong += 1,
            _ => {}
        }
    }
    let power = n.len() as f64 / EXPERIMENTS as f64;
    control_share /= n.len().max(1) as f64;
    let (median, p90) = (quantile(&mut n, 0.5), quantile(&mut n, 0.9));
    println!(
        "power with Thompson allocation, accuracy 0.80 -> 0.86: {power:.3} within {} observations \
         in all; at decision: median {median}, p90 {p90} in all, of which {:.1} % on the worse \
         arm (fixed allocation: 50 %); wrong-sign decisions {wrong} [{:.2?}]",
        ROUNDS * 2 * BATCH,
        control_share * 100.0,
        start.elapsed()
    );
    assert!(power >= 0.80, "power {power}");
    assert_eq!(wrong, 0);
}

// ---------------------------------------------------------------- bad input

#[test]
fn bad_rules_name_the_field() {
    let good = accuracy_rule();
    let cases: [(DecisionRule, &str); 9] = [
        (
            DecisionRule {
                alpha: f64::NAN,
                ..good
            },
            "alpha",
        ),
        (
            DecisionRule {
                alpha: -0.05,
                ..good
            },
            "alpha",
        ),
        (DecisionRule { alpha: 0.0, ..good }, "alpha"),
        (DecisionRule { alpha: 1.0, ..good }, "alpha"),
        (DecisionRule { tau: 0.0, ..good }, "tau"),
        (DecisionRule { tau: -1.0, ..good }, "tau"),
        (
            DecisionRule {
                tau: f64::INFINITY,
                ..good
            },
            "tau",
        ),
        (
            DecisionRule {
                min_samples_per_arm: 1,
                ..good
            },
            "min_samples_per_arm",
        ),
        (
            DecisionRule {
                max_samples_per_arm: Some(10),
                ..good
            },
            "max_samples_per_arm",
        ),
    ];
    let s = Proportion::from_counts(800, 1000).unwrap().summary();
    for (rule, name) in cases {
        let err = SequentialTest::new().update(&rule, &s, &s).unwrap_err();
        println!("{err}");
        assert_eq!(field(err), name);
    }
}

#[test]
fn bad_inputs_name_the_field() {
    assert_eq!(field(assign("d", "e", &[]).unwrap_err()), "allocations");
    assert_eq!(
        field(assign("d", "e", &[1.0, f64::NAN]).unwrap_err()),
        "allocations[1]"
    );
    assert_eq!(
        field(assign("d", "e", &[-1.0, 2.0]).unwrap_err()),
        "allocations[0]"
    );
    assert_eq!(
        field(assign("d", "e", &[0.0, 0.0]).unwrap_err()),
        "allocations"
    );
    assert_eq!(
        field(assign("d", "e", &[f64::MAX, f64::MAX]).unwrap_err()),
        "allocations"
    );
    assert_eq!(field(assign("", "e", &[1.0]).unwrap_err()), "device_id");
    assert_eq!(field(assign("d", "", &[1.0]).unwrap_err()), "experiment_id");
    assert_eq!(
        field(Proportion::from_counts(5, 3).unwrap_err()),
        "successes"
    );
    assert_eq!(field(Mean::new().push(f64::NAN).unwrap_err()), "x");
    assert_eq!(
        field(Summary::new(3, f64::INFINITY, 1.0).unwrap_err()),
        "mean"
    );
    assert_eq!(field(Summary::new(3, 1.0, -1.0).unwrap_err()), "variance");
    assert_eq!(
        field(mixture_log_likelihood_ratio(f64::NAN, 1.0, 1.0).unwrap_err()),
        "estimate"
    );
    assert_eq!(
        field(mixture_log_likelihood_ratio(0.0, -1.0, 1.0).unwrap_err()),
        "variance"
    );
    assert_eq!(
        field(confidence_sequence_half_width(1.0, 1.0, 2.0).unwrap_err()),
        "alpha"
    );
    assert_eq!(field(thompson_allocation(&[], 10, 0).unwrap_err()), "arms");
    let two = [Proportion::new(); 2];
    assert_eq!(field(thompson_allocation(&two, 0, 0).unwrap_err()), "draws");
    assert_eq!(
        field(thompson_allocation_with_floor(&two, 10, 0, 0.6).unwrap_err()),
        "floor"
    );
    assert_eq!(
        field(thompson_allocation_with_floor(&two, 10, 0, f64::NAN).unwrap_err()),
        "floor"
    );
    let s = Summary::new(1000, 0.05, 0.0475).unwrap();
    let bad = error_rate_guardrail(Margin::MaxRelativeDegradation(-0.1));
    let err = GuardrailMonitor::new().update(&bad, &s, &s).unwrap_err();
    assert_eq!(field(err), "max_relative_degradation");
    let bad = Guardrail {
        alpha: f64::NAN,
        ..error_rate_guardrail(Margin::MaxAbsoluteDegradation(0.0))
    };
    assert_eq!(
        field(GuardrailMonitor::new().update(&bad, &s, &s).unwrap_err()),
        "alpha"
    );
    // Tiny tau overflows the interval: an error, not a panic or NaN.
    let tiny = DecisionRule {
        tau: 1e-200,
        ..accuracy_rule()
    };
    assert!(SequentialTest::new().update(&tiny, &s, &s).is_err());
}

// ---------------------------------------------------------------- serde

#[test]
fn serde_round_trips_and_refuses_unknown_fields() {
    let rule = accuracy_rule();
    let json = serde_json::to_string(&rule).unwrap();
    println!("{json}");
    assert_eq!(serde_json::from_str::<DecisionRule>(&json).unwrap(), rule);
    let unknown = r#"{"alpha":0.05,"tau":0.05,"min_samples_per_arm":100,"direction":"higher_is_better","alfa":0.1}"#;
    let err = serde_json::from_str::<DecisionRule>(unknown).unwrap_err();
    assert!(err.to_string().contains("alfa"), "{err}");
    let negative =
        r#"{"alpha":-0.05,"tau":0.05,"min_samples_per_arm":100,"direction":"higher_is_better"}"#;
    let err = serde_json::from_str::<DecisionRule>(negative).unwrap_err();
    assert!(err.to_string().contains("alpha"), "{err}");

    let mut m = Mean::new();
    for x in [12.5, 14.0, 9.75] {
        m.push(x).unwrap();
    }
    let back: Mean = serde_json::from_str(&serde_json::to_string(&m).unwrap()).unwrap();
    assert_eq!(back, m);
    assert!(serde_json::from_str::<Mean>(r#"{"count":2,"mean":1.0,"m2":-1.0}"#).is_err());
    let p = Proportion::from_counts(3, 7).unwrap();
    let back: Proportion = serde_json::from_str(&serde_json::to_string(&p).unwrap()).unwrap();
    assert_eq!(back, p);
    assert!(serde_json::from_str::<Proportion>(r#"{"successes":8,"trials":7}"#).is_err());

    let mut test = SequentialTest::new();
    let a = Proportion::from_counts(800, 1000).unwrap().summary();
    test.update(&rule, &a, &a).unwrap();
    let back: SequentialTest =
        serde_json::from_str(&serde_json::to_string(&test).unwrap()).unwrap();
    assert_eq!(back, test);
    let g = error_rate_guardrail(Margin::MaxRelativeDegradation(0.2));
    let gj = serde_json::to_string(&g).unwrap();
    println!("{gj}");
    assert_eq!(serde_json::from_str::<Guardrail>(&gj).unwrap(), g);
    let mut monitor = GuardrailMonitor::new();
    monitor.update(&g, &a, &a).unwrap();
    let back: GuardrailMonitor =
        serde_json::from_str(&serde_json::to_string(&monitor).unwrap()).unwrap();
    assert_eq!(back, monitor);
}
