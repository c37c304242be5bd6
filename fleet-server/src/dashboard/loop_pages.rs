//! Dashboard pages of the closed loop (issue #13): retraining jobs and A/B
//! experiments, read-only (operators act through the API and CLI).

use maud::{html, Markup};

use super::render::{layout, time};
use super::session::CsrfToken;
use crate::experiments::{ArmMetrics, Experiment};
use crate::jobs::Job;

/// Rows shown per list page (newest first).
pub const LIST_ROWS: usize = 200;

fn num(x: Option<f64>) -> String {
    x.map_or("—".into(), |v| format!("{v:.4}"))
}

fn state_class(s: &str) -> &'static str {
    match s {
        "promoted" | "candidate_won" => "ok",
        "rejected" | "failed" | "stopped" | "control_kept" => "bad",
        _ => "",
    }
}

fn short(sha: &str) -> &str {
    &sha[..12.min(sha.len())]
}

/// `GET /jobs`.
pub fn jobs(csrf: &CsrfToken, v: &[Job]) -> String {
    layout(
        "Retraining jobs",
        Some(csrf),
        html! {
            p id="matched" { (v.len()) " jobs" @if v.len() > LIST_ROWS { " (newest " (LIST_ROWS) " shown)" } }
            table id="jobs" {
                thead { tr { th { "job" } th { "group" } th { "model" } th { "state" } th { "attempts" } th { "worker" } th { "dataset" } th { "gate" } th { "updated" } } }
                tbody { @for j in v.iter().take(LIST_ROWS) { tr {
                    td { a href=(format!("/jobs/{}", j.id)) { (j.id) } }
                    td { (j.spec.group) } td { (j.spec.model) }
                    td class=(state_class(j.state.name())) { (j.state.name()) }
                    td { (j.attempts) }
                    td { (j.lease.as_ref().map_or("—", |l| l.worker.as_str())) }
                    td { (j.lineage.dataset.as_deref().unwrap_or("—")) }
                    td { (j.gate.as_ref().map_or("—", |g| if g.passed { "pass" } else { "fail" })) }
                    td { (time(j.updated_ms)) }
                } } }
            }
        },
    )
}

/// `GET /jobs/{id}`.
pub fn job(csrf: &CsrfToken, j: &Job) -> String {
    layout(
        &format!("Job {}", j.id),
        Some(csrf),
        html! {
            dl.facts {
                dt { "cohort" } dd { (j.spec.group) " · " (j.spec.model) }
                dt { "state" } dd #state class=(state_class(j.state.name())) { (j.state.name()) }
                dt { "attempts" } dd { (j.attempts) " of " (j.spec.max_attempts) }
                @if let Some(l) = &j.lease {
                    dt { "lease" } dd { (l.worker) " (" (l.device) "), expires " (time(l.expires_ms)) }
                }
                @if let Some(e) = &j.error { dt { "why" } dd.bad #error { (e) } }
                @if let Some(r) = &j.spec.request { dt { "request" } dd { (r) } }
            }
            @if let Some(g) = &j.gate {
                h2 { "Gate" }
                p #gate class=(if g.passed { "ok" } else { "bad" }) { (if g.passed { "passed: " } else { "failed: " }) (g.reason) }
                table id="gate" {
                    thead { tr { th { (g.numbers.metric) } th { "candidate" } th { "current release" } th { "samples" } } }
                    tbody {
                        tr { td { "new data (held-out)" } td { (num(Some(g.numbers.candidate_new))) } td { (num(Some(g.numbers.current_new))) } td { (g.numbers.new_samples) } }
                        tr { td { "previous test set" } td { (num(Some(g.numbers.candidate_previous))) } td { (num(Some(g.numbers.current_previous))) } td { (g.numbers.previous_samples) } }
                    }
                }
            }
            h2 { "Lineage" }
            dl.facts #lineage {
                dt { "dataset" } dd { (j.lineage.dataset.as_deref().unwrap_or("—")) @if let Some(h) = &j.lineage.dataset_sha256 { " (" code { (short(h)) } ")" } }
                dt { "training run" } dd { @if let Some(r) = &j.lineage.run { code { (r.to_string().chars().take(300).collect::<String>()) } } @else { "—" } }
                dt { "teacher / student" } dd { (j.lineage.teacher.as_deref().unwrap_or("—")) }
                dt { "bundles" } dd { @for b in &j.lineage.bundles { code { (short(b)) } " " } }
                dt { "compile reports" } dd { (j.lineage.compile_reports.len()) }
                dt { "canary rollouts" } dd { @for r in &j.lineage.rollouts { a href=(format!("/rollouts/{r}")) { (r) } " " } }
                dt { "experiments" } dd { @for e in &j.lineage.experiments { a href=(format!("/experiments/{e}")) { (e) } " " } }
            }
            h2 { "History" }
            ol #history { @for t in &j.history {
                li { (time(t.at_ms)) " " (t.from.name()) " → " (t.to.name()) ": " (t.note) }
            } }
        },
    )
}

/// `GET /experiments`.
pub fn experiments(csrf: &CsrfToken, v: &[Experiment]) -> String {
    layout(
        "Experiments",
        Some(csrf),
        html! {
            p id="matched" { (v.len()) " experiments" @if v.len() > LIST_ROWS { " (newest " (LIST_ROWS) " shown)" } }
            table id="experiments" {
                thead { tr { th { "experiment" } th { "group" } th { "target" } th { "state" } th { "metric" } th { "A" } th { "B" } th { "p (always valid)" } th { "devices A / B" } th { "updated" } } }
                tbody { @for e in v.iter().take(LIST_ROWS) {
                    @let eff = e.last.as_ref().and_then(|l| l.effect.as_ref());
                    @let state = serde_name(&e.state);
                    tr {
                        td { a href=(format!("/experiments/{}", e.id)) { (e.id) } }
                        td { (e.spec.group) } td { (e.spec.target.as_deref().unwrap_or("all")) }
                        td class=(state_class(&state)) { (state) }
                        td { (e.spec.metric.name()) }
                        td { (num(eff.map(|x| x.mean_a))) } td { (num(eff.map(|x| x.mean_b))) }
                        td { (num(e.last.as_ref().map(|l| l.p_value))) }
                        td { (arm_count(e, 0)) " / " (arm_count(e, 1)) }
                        td { (time(e.updated_ms)) }
                    }
                } }
            }
        },
    )
}

fn serde_name<T: serde::Serialize>(x: &T) -> String {
    serde_json::to_value(x)
        .ok()
        .and_then(|v| v.as_str().map(str::to_string))
        .unwrap_or_default()
}

fn arm_count(e: &Experiment, arm: usize) -> usize {
    e.assignment.values().filter(|&&v| v == arm).count()
}

fn arm_row(name: &str, release: u64, devices: usize, m: &ArmMetrics) -> Markup {
    html! { tr {
        td { (name) } td { (release) } td { (devices) } td { (m.records) }
        td { (num(m.accuracy.rate())) " (" (m.accuracy.trials()) ")" }
        td { (num(m.errors.rate())) " (" (m.errors.trials()) ")" }
        td { (num(m.latency_p50_ms.mean())) }
        td { (num(m.cpu_percent.mean())) }
    } }
}

/// `GET /experiments/{id}`.
pub fn experiment(csrf: &CsrfToken, e: &Experiment) -> String {
    let state = serde_name(&e.state);
    layout(
        &format!("Experiment {}", e.id),
        Some(csrf),
        html! {
            dl.facts {
                dt { "cohort" } dd { (e.spec.group) " · " (e.model) " · target " (e.spec.target.as_deref().unwrap_or("all")) }
                dt { "state" } dd #state class=(state_class(&state)) { (state) }
                dt { "decision rule" } dd { "mSPRT on " (e.spec.metric.name()) ", alpha " (e.rule.alpha) ", tau " (e.rule.tau) ", at least " (e.rule.min_samples_per_arm) " per arm (always valid: safe to look at any time)" }
                @if let Some(o) = &e.outcome { dt { "outcome" } dd #outcome { (o) } }
                @if let Some(j) = &e.spec.job { dt { "job" } dd { a href=(format!("/jobs/{j}")) { (j) } } }
                @if let Some(r) = &e.rollout { dt { "candidate rollout" } dd { a href=(format!("/rollouts/{r}")) { (r) } } }
                @if let Some(r) = &e.promotion { dt { "promotion" } dd { a href=(format!("/rollouts/{r}")) { (r) } } }
            }
            h2 { "Variants" }
            table id="arms" {
                thead { tr { th { "variant" } th { "release" } th { "devices" } th { "records" } th { "online accuracy (labels)" } th { "error rate (requests)" } th { "p50 ms" } th { "CPU %" } } }
                tbody {
                    (arm_row("A (control)", e.releases[0], arm_count(e, 0), &e.arms[0]))
                    (arm_row("B (candidate)", e.releases[1], arm_count(e, 1), &e.arms[1]))
                }
            }
            @if let Some(l) = &e.last {
                h2 { "Latest evaluation" }
                p #evaluation {
                    (serde_name(&l.decision)) ", always-valid p = " (num(Some(l.p_value))) ", n = " (l.samples_a) " / " (l.samples_b)
                    @if let Some(x) = &l.effect {
                        "; difference B − A " (format!("{:+.4}", x.difference))
                        ", always-valid interval " (format!("{:+.4} .. {:+.4}", x.always_valid.low, x.always_valid.high))
                        " (fixed-horizon " (format!("{:+.4} .. {:+.4}", x.fixed_horizon.low, x.fixed_horizon.high)) ")"
                    }
                }
            }
            h2 { "Guardrails" }
            table id="guardrails" {
                thead { tr { th { "metric" } th { "state" } th { "control" } th { "candidate" } th { "allowed degradation" } th { "p" } } }
                tbody { @for g in &e.guardrails { tr {
                    td { (g.spec.metric) }
                    @if let Some(r) = &g.last {
                        td { (serde_name(&r.verdict)) } td { (num(Some(r.baseline_mean))) } td { (num(Some(r.candidate_mean))) }
                        td { (num(Some(r.allowed_degradation))) } td { (num(Some(r.p_value))) }
                    } @else {
                        td.muted { "no data yet" } td {} td {} td {} td {}
                    }
                } } }
            }
        },
    )
}
