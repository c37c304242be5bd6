//! Statistics of fleet A/B experiments between model releases.
//!
//! The fleet server runs an experiment by assigning devices to variants
//! ([`assign`]), accumulating each variant's metrics from telemetry
//! ([`Proportion`], [`Mean`]; both mergeable and serde-serialisable for
//! persistence), and after **every** telemetry batch asking an always-valid
//! rule whether to stop ([`SequentialTest`] with a [`DecisionRule`]) and
//! whether a guardrail fired ([`GuardrailMonitor`] with a [`Guardrail`]).
//! Optionally it shifts traffic with Thompson sampling
//! ([`thompson_allocation`]). Variant A is the control (current release),
//! B the candidate; every effect is `B − A` in the metric's units.
//!
//! # Assignment
//! A device's variant is a pure function of `SHA-256(experiment_id || 0x00
//! || device_id)` mapped to `[0, 1)` and the cumulative allocation weights:
//! sticky (a device never changes arm), deterministic on every platform,
//! stateless, and independent across experiment ids.
//!
//! # Why always-valid inference
//! A fixed-horizon z-test has level `α` only if it is looked at once, at a
//! sample size fixed in advance. Evaluating it after every batch and stopping
//! at the first `p < α` inflates the false-positive rate far beyond `α`
//! (the tests of this crate measure about 0.3–0.4 over 200 looks).
//! Instead this crate uses the **mixture sequential probability ratio test**
//! (mSPRT) of R. Johari, P. Koomen, L. Pekelis, D. Walsh, "Always Valid
//! Inference: Continuous Monitoring of A/B Tests", *Operations Research*
//! 70(3), 1806–1821, 2022 (arXiv:1512.04922). With `θ̂_n = x̄_B − x̄_A`, `V_n =
//! s_A²/n_A + s_B²/n_B` (the variance of `θ̂_n`) and a normal mixing
//! distribution `N(0, τ²)` over the true difference `θ`, the mixture
//! likelihood ratio against `θ = 0` is
//!
//! `Λ_n = √(V_n / (V_n + τ²)) · exp(τ² θ̂_n² / (2 V_n (V_n + τ²)))`.
//!
//! Under `θ = 0` (Gaussian data, known variance) `Λ_n` is a non-negative
//! martingale with mean 1 — a mixture martingale in the sense of H. Robbins,
//! "Statistical methods related to the law of the iterated logarithm", *Ann.
//! Math. Statist.* 41(5), 1970 — so by Ville's inequality `P(∃ n: Λ_n ≥ 1/α)
//! ≤ α`. The always-valid p-value `p_n = min(p_{n−1}, 1/Λ_n)` may therefore be
//! checked after every batch, and stopping at any data-dependent time keeps
//! `P(false positive) ≤ α`. Inverting the test gives the confidence sequence
//! `θ̂_n ± √(V_n (V_n + τ²)/τ² · (2 ln(1/α) + ln((V_n + τ²)/V_n)))`, whose
//! running intersection covers `θ` at all times simultaneously with
//! probability `≥ 1 − α` (see [`confidence_sequence_half_width`]). Proportions
//! use the normal approximation with plug-in variance `p̂(1 − p̂)`, and means
//! the sample variance, as in Johari et al.; the guarantee is then
//! asymptotic, which is why a [`DecisionRule`] has `min_samples_per_arm`.
//! `τ` is in the metric's units and tunes power (detection is fastest for
//! effects of roughly size `τ`), not validity.
//!
//! Each evaluation ([`Evaluation`]) reports the decision, the always-valid
//! p-value, the effect with its always-valid interval and, for reference
//! only, the fixed-horizon Wald interval `θ̂ ± z_{1−α/2} √V`.
//!
//! # Guardrails
//! A [`Guardrail`] stops a candidate proven worse than the control beyond a
//! relative or absolute margin. It is the one-sided version of the same
//! machinery: the contrast `c = (degradation) − (margin)` is tested against
//! `c ≤ 0` with a half-normal mixture, `Λ⁺ = 2 Λ Φ(τ ĉ / √(V (V + τ²)))`
//! (derived in [`one_sided_log_likelihood_ratio`]), which controls the
//! false-stop rate at `α` under continuous monitoring.
//!
//! # Thompson sampling
//! [`thompson_allocation`] gives each arm the posterior probability that it
//! is best (W. R. Thompson, *Biometrika* 25, 1933; D. Russo et al., "A
//! Tutorial on Thompson Sampling", *Found. Trends ML* 11(1), 2018) under
//! `Beta(1 + s, 1 + f)` posteriors, estimated by Monte Carlo with Beta
//! variates from two Gamma variates (G. Marsaglia, W. W. Tsang, ACM TOMS
//! 26(3), 2000) drawn from a seeded SplitMix64 stream, with a floor so that
//! no arm is starved. Adaptive allocation changes `n_A / n_B` over time,
//! which the plug-in variance `V_n` accounts for; decisions should still be
//! taken with the mSPRT above, not from the allocation.
//!
//! # Errors and determinism
//! Every fallible function returns [`Error`], naming the offending field;
//! nothing panics on bad input. No I/O, no global state, no clock: the same
//! inputs (and seed) give the same outputs.

mod assign;
mod decision;
mod error;
mod guardrail;
mod metric;
mod msprt;
mod normal;
mod rng;
mod thompson;

pub use assign::{assign, assignment_point};
pub use decision::{
    Decision, DecisionRule, Direction, Effect, Evaluation, Interval, SequentialTest,
};
pub use error::Error;
pub use guardrail::{Guardrail, GuardrailMonitor, GuardrailReport, GuardrailVerdict, Margin};
pub use metric::{Mean, Proportion, Summary};
pub use msprt::{
    confidence_sequence_half_width, mixture_log_likelihood_ratio, one_sided_log_likelihood_ratio,
};
pub use thompson::{thompson_allocation, thompson_allocation_with_floor, DEFAULT_THOMPSON_FLOOR};
