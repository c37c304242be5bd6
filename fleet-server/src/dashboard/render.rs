//! HTML of the dashboard pages (maud: escaped by default, checked at
//! compile time). Every control has a label; tables have header cells;
//! charts are `<div class="chart">` elements whose data `dashboard.js` draws
//! with uPlot, with a text summary beside them.

use maud::{html, Markup, DOCTYPE};

use super::session::CsrfToken;
use super::views::{
    Chart, DeviceClass, DeviceView, DevicesView, DriftView, FleetView, Listed, RolloutSummary,
    RolloutView,
};
use crate::bundles::BundleInfo;
use crate::rollout::RolloutState;

/// Server ms as `YYYY-MM-DD HH:MM:SS` UTC.
pub(super) fn time(ms: u64) -> String {
    let t = std::time::UNIX_EPOCH + std::time::Duration::from_millis(ms);
    humantime::format_rfc3339_seconds(t)
        .to_string()
        .replace('T', " ")
        .replace('Z', " UTC")
}

/// A rollout history entry (`"<server ms> <what happened>"`) with its
/// time written as UTC; any other text as it is.
fn history_line(h: &str) -> String {
    match h.split_once(' ') {
        Some((ms, rest)) if !ms.is_empty() && ms.bytes().all(|b| b.is_ascii_digit()) => {
            match ms.parse::<u64>() {
                Ok(ms) => format!("{} {rest}", time(ms)),
                Err(_) => h.to_string(),
            }
        }
        _ => h.to_string(),
    }
}

/// The page frame: head, navigation (when logged in), title, body.
pub(super) fn layout(title: &str, csrf: Option<&CsrfToken>, body: Markup) -> String {
    html! {
        (DOCTYPE)
        html lang="en" {
            head {
                meta charset="utf-8";
                meta name="viewport" content="width=device-width, initial-scale=1";
                title { (title) " · edgefleet" }
                link rel="stylesheet" href="/assets/uPlot.min.css";
                link rel="stylesheet" href="/assets/dashboard.css";
                script src="/assets/uPlot.iife.min.js" defer {}
                script src="/assets/dashboard.js" defer {}
            }
            body {
                header {
                    strong { "edgefleet" }
                    @if let Some(csrf) = csrf {
                        nav aria-label="Main" {
                            a href="/" { "Fleet" }
                            a href="/devices" { "Devices" }
                            a href="/rollouts" { "Rollouts" }
                            a href="/drift" { "Drift" }
                            a href="/bundles" { "Bundles" }
                            a href="/jobs" { "Jobs" }
                            a href="/experiments" { "Experiments" }
                        }
                        form method="post" action="/logout" class="logout" {
                            input type="hidden" name="csrf" value=(csrf.as_str());
                            button type="submit" id="logout" { "Log out" }
                        }
                    }
                }
                main { h1 { (title) } (body) }
            }
        }
    }
    .into_string()
}

/// The login form, with an error line when `error` is set.
pub fn login(error: Option<&str>) -> String {
    layout(
        "Log in",
        None,
        html! {
            @if let Some(e) = error { p.error role="alert" { (e) } }
            form method="post" action="/login" {
                label for="token" { "Operator token" }
                input type="password" id="token" name="token" autocomplete="current-password" required autofocus;
                button type="submit" id="login" { "Log in" }
            }
            p.hint { "The token is the fleet server's operator token (the API's bearer token, `--token`)." }
        },
    )
}

/// `GET /login/once/{code}`: one button that posts the code.
pub fn login_once(code: &str) -> String {
    layout(
        "Log in",
        None,
        html! {
            form method="post" action=(format!("/login/once/{}", urlencode(code))) {
                p { "Log in to the fleet dashboard with this one-time link (it works once, for 15 minutes)." }
                button type="submit" id="login" autofocus { "Log in" }
            }
        },
    )
}

/// A page that only says what went wrong.
pub fn error_page(title: &str, why: &str) -> String {
    layout(
        title,
        None,
        html! { p.error role="alert" { (why) } p { a href="/" { "Back to the fleet" } } },
    )
}

fn chart(c: &Chart) -> Markup {
    let data = serde_json::to_string(c).unwrap_or_else(|_| "{}".into());
    html! {
        figure.chart-box {
            div.chart id=(c.id) data-chart=(data) data-points=(c.points())
                role="img" aria-label=(format!("{}: {}; {} points", c.title, c.y_label, c.points())) {}
            figcaption {
                (c.title) " (" (c.y_label) ", time axis UTC)"
                @if c.points() == 0 { " — no data yet" }
            }
        }
    }
}

fn class_badge(c: DeviceClass) -> Markup {
    html! { span class=(format!("badge {}", c.name())) { (c.label()) } }
}

fn state_text(s: &RolloutState) -> String {
    match s {
        RolloutState::Halted(why) => format!("halted: {why}"),
        other => format!("{other:?}").to_lowercase(),
    }
}

/// `GET /`.
pub fn fleet(csrf: &CsrfToken, v: &FleetView) -> String {
    layout(
        "Fleet",
        Some(csrf),
        html! {
            section aria-label="Device states" {
                ul.counts {
                    li { a href="/devices" { span.count id="count-total" { (v.total) } " devices" } }
                    @for (c, n) in &v.counts {
                        li { a href=(format!("/devices?state={}", c.name())) {
                            span.count id=(format!("count-{}", c.name())) { (n) } " " (class_badge(*c))
                        } }
                    }
                }
                p { (v.active_rollouts) " active rollouts · " (v.open_requests) " open retraining requests" }
            }
            section {
                h2 { "Releases per group and target" }
                table {
                    thead { tr { th { "group" } th { "target" } th { "devices" } th { "rolled out" } th { "running" } } }
                    tbody {
                        @for r in &v.releases {
                            tr {
                                td { @match &r.group {
                                    Some(g) => a href=(release_row_link(g, r.target.as_deref())) { (g) },
                                    None => span.muted { "(no group)" },
                                } }
                                td { (r.target.as_deref().unwrap_or("(unknown)")) }
                                td { (r.devices) }
                                td { @for (rel, n) in &r.intended { span.rel { (rel) " × " (n) } " " } }
                                td { @for (rel, n) in &r.running { span.rel { (rel) " × " (n) } " " } }
                            }
                        }
                    }
                }
            }
            section {
                h2 { "Needing attention (" (v.attention_total) ")" }
                @if v.attention.is_empty() { p { "Nothing needs attention." } }
                @else {
                    table id="attention" {
                        thead { tr { th { "device" } th { "state" } th { "why" } } }
                        tbody { @for a in &v.attention {
                            tr { td { a href=(format!("/devices/{}", a.device)) { (a.device) } } td { (class_badge(a.class)) } td { (a.why) } }
                        } }
                    }
                }
            }
        },
    )
}

fn select(name: &str, label: &str, options: &[String], current: Option<&String>) -> Markup {
    html! {
        label for=(name) { (label) }
        select id=(name) name=(name) {
            option value="" { "any" }
            @for o in options {
                option value=(o) selected[current == Some(o)] { (o) }
            }
        }
    }
}

fn pager(base: &str, page: usize, pages: usize) -> Markup {
    let sep = if base.contains('?') { '&' } else { '?' };
    html! {
        nav.pager aria-label="Pages" {
            @if page > 1 { a href=(format!("{base}{sep}page={}", page - 1)) rel="prev" { "previous" } }
            span { "page " (page) " of " (pages) }
            @if page < pages { a href=(format!("{base}{sep}page={}", page + 1)) rel="next" { "next" } }
        }
    }
}

/// `GET /devices`.
pub fn devices(csrf: &CsrfToken, v: &DevicesView) -> String {
    let f = &v.filter;
    let states: Vec<String> = DeviceClass::ALL
        .iter()
        .map(|c| c.name().to_string())
        .collect();
    let mut base = String::from("/devices?");
    for (k, val) in [
        ("q", &f.q),
        ("group", &f.group),
        ("target", &f.target),
        ("state", &f.state),
    ] {
        if let Some(x) = val {
            base.push_str(&format!("{k}={}&", urlencode(x)));
        }
    }
    let base = base.trim_end_matches(['&', '?']).to_string();
    layout(
        "Devices",
        Some(csrf),
        html! {
            form method="get" action="/devices" .filters {
                label for="q" { "id contains" }
                input type="search" id="q" name="q" value=[f.q.as_deref()];
                (select("group", "group", &v.groups, f.group.as_ref()))
                (select("target", "target", &v.targets, f.target.as_ref()))
                (select("state", "state", &states, f.state.as_ref()))
                button type="submit" { "Filter" }
            }
            p id="matched" { (v.matched) " devices match" }
            table id="devices" {
                thead { tr { th { "device" } th { "state" } th { "target" } th { "release" } th { "groups" } th { "last seen" } } }
                tbody { @for d in &v.rows {
                    tr {
                        td { a href=(format!("/devices/{}", d.id)) { (d.id) } }
                        td { (class_badge(d.class)) }
                        td { (d.target) } td { (d.active) } td { (d.groups.join(", ")) }
                        td { (time(d.last_seen_ms)) }
                    }
                } }
            }
            (pager(&base, v.page, v.pages))
        },
    )
}

/// Percent-encodes a query value (RFC 3986 unreserved characters kept).
/// The device list filtered to a group and (when known) a target.
fn release_row_link(group: &str, target: Option<&str>) -> String {
    match target {
        Some(t) => format!(
            "/devices?group={}&target={}",
            urlencode(group),
            urlencode(t)
        ),
        None => format!("/devices?group={}", urlencode(group)),
    }
}

fn urlencode(s: &str) -> String {
    s.bytes()
        .map(|b| {
            if b.is_ascii_alphanumeric() || b"-._~".contains(&b) {
                (b as char).to_string()
            } else {
                format!("%{b:02X}")
            }
        })
        .collect()
}

/// `GET /devices/{id}`.
pub fn device(csrf: &CsrfToken, v: &DeviceView) -> String {
    let d = &v.device;
    let rel = |r: &Option<edgefleet_protocol::messages::ReleaseRef>| {
        r.as_ref().map_or_else(
            || "none".to_string(),
            |r| format!("{} r{} ({})", r.model, r.release, r.version),
        )
    };
    layout(
        &format!("Device {}", d.id),
        Some(csrf),
        html! {
            dl.identity {
                dt { "state" } dd { (class_badge(v.class)) " update state " (d.update_state.as_deref().unwrap_or("-")) }
                dt { "target" } dd { (d.target.as_deref().unwrap_or("-")) }
                dt { "agent" } dd { (d.agent_version.as_deref().unwrap_or("-")) }
                dt { "active release" } dd id="active" { (rel(&d.active)) }
                dt { "previous release" } dd { (rel(&d.previous)) }
                dt { "tags" } dd { (d.tags.iter().chain(&d.operator_tags).cloned().collect::<Vec<_>>().join(", ")) }
                dt { "groups" } dd { (d.groups.iter().cloned().collect::<Vec<_>>().join(", ")) }
                dt { "last seen" } dd { (time(d.last_seen_ms)) }
            }
            h2 { "Latency and load" }
            div.charts { (chart(&v.latency)) (chart(&v.rate)) }
            @if !v.feedback.is_empty() {
                h2 { "Online accuracy (ground-truth feedback)" }
                table { thead { tr { th { "release" } th { "labelled" } th { "agreed" } th { "accuracy" } } }
                    tbody { @for f in &v.feedback { tr {
                        td { (f.release.model) " r" (f.release.release) } td { (f.labelled) } td { (f.agreed) }
                        td { (format!("{:.3}", f.online_accuracy)) }
                    } } } }
            }
            h2 { "Drift" }
            (chart(&v.drift))
            table id="features" {
                thead { tr { th { "model" } th { "feature" } th { "statistic" } th { "threshold" } th { "n_eff" } th { "verdict" } } }
                tbody { @for f in &v.features { tr {
                    td { (f.model) } td { (f.feature) } td { (format!("{:.4}", f.statistic)) }
                    td { (f.threshold.map_or("-".into(), |t| format!("{t:.4}"))) }
                    td { (format!("{:.0}", f.n_eff)) } td { (format!("{:?}", f.verdict).to_lowercase()) }
                } } }
            }
            h2 { "Release history and update outcomes" }
            table id="history" {
                thead { tr { th { "rollout" } th { "release" } th { "created" } th { "wave" } th { "outcome" } th { "reason" } } }
                tbody { @for r in &v.rollouts { tr {
                    td { a href=(format!("/rollouts/{}", r.rollout)) { (r.rollout) } " (" (state_text(&r.rollout_state)) ")" }
                    td { (r.release) } td { (time(r.created_ms)) } td { (r.progress.wave + 1) }
                    td { (format!("{:?}", r.progress.state).to_lowercase()) }
                    td { (r.progress.reason.as_deref().unwrap_or("")) " " (r.progress.detail.as_deref().unwrap_or("")) }
                } } }
            }
            h2 { "Captured data" }
            @if v.captures.is_empty() { p { "Nothing captured." } }
            @else {
                table id="captures" {
                    thead { tr { th { "batch" } th { "release" } th { "samples" } th { "labelled" } th { "bytes" } th { "received" } } }
                    tbody { @for c in &v.captures { tr {
                        td { code { (&c.capture_id[..12.min(c.capture_id.len())]) } }
                        td { (c.release.model) " r" (c.release.release) } td { (c.samples) } td { (c.labelled) }
                        td { (c.bytes) } td { (time(c.received_ms)) }
                    } } }
                }
            }
        },
    )
}

fn waves_table(r: &RolloutSummary) -> Markup {
    html! {
        table.waves {
            thead { tr { th { "wave" } th { "size" } th { "committed" } th { "failed" } th { "in progress" } } }
            tbody { @for (i, w) in r.waves.iter().enumerate() {
                tr class=[(r.current_wave == Some(i)).then_some("current")] {
                    td { (i + 1) " (" (r.wave_specs.get(i).map_or("", String::as_str)) ")" }
                    td { (w.size) } td { (w.committed) } td { (w.failed) } td { (w.in_progress) }
                }
            } }
        }
    }
}

/// `GET /rollouts`.
pub fn rollouts(csrf: &CsrfToken, v: &Listed<RolloutSummary>) -> String {
    layout(
        "Rollouts",
        Some(csrf),
        html! {
            (model_filter("/rollouts", v))
            p id="matched" { (v.matched) " rollouts match" }
            table id="rollouts" {
                thead { tr { th { "rollout" } th { "release" } th { "state" } th { "devices" } th { "waves committed" } th { "created" } } }
                tbody { @for r in &v.rows { tr {
                    td { a href=(format!("/rollouts/{}", r.id)) { (r.id) } }
                    td { (r.release) } td.state { (state_text(&r.state)) } td { (r.devices) }
                    td { (r.waves.iter().map(|w| format!("{}/{}", w.committed, w.size)).collect::<Vec<_>>().join(" · ")) }
                    td { (time(r.created_ms)) }
                } } }
            }
            (pager(&model_base("/rollouts", v), v.page, v.pages))
        },
    )
}

/// The rollout and bundle lists' filter: a model select and a button.
fn model_filter<T>(action: &str, v: &Listed<T>) -> Markup {
    html! {
        form method="get" action=(action) .filters {
            (select("model", "model", &v.models, v.model.as_ref()))
            button type="submit" { "Filter" }
        }
    }
}

/// The list's address with its filter, for the pager.
fn model_base<T>(path: &str, v: &Listed<T>) -> String {
    match &v.model {
        Some(m) => format!("{path}?model={}", urlencode(m)),
        None => path.to_string(),
    }
}

/// `GET /rollouts/{id}`.
pub fn rollout(csrf: &CsrfToken, v: &RolloutView) -> String {
    let r = &v.summary;
    let control = |action: &str, label: &str| {
        html! {
            form method="post" action=(format!("/rollouts/{}/{action}", r.id)) {
                input type="hidden" name="csrf" value=(csrf.as_str());
                button type="submit" id=(action) { (label) }
            }
        }
    };
    layout(
        &format!("Rollout {}", r.id),
        Some(csrf),
        html! {
            p { "Release " strong { (r.release) } " to " (r.devices) " devices. State: " strong id="state" { (state_text(&r.state)) } }
            div.controls {
                @if r.state == RolloutState::Running { (control("pause", "Pause")) }
                @if r.state == RolloutState::Paused { (control("resume", "Resume")) }
                @if r.state.is_active() { (control("abort", "Abort")) }
            }
            h2 { "Waves" }
            (waves_table(r))
            p.gate { "Gate: a wave halts the rollout above " (format!("{:.0}%", v.max_failure_rate * 100.0))
                " failures or when it has not committed within " (v.wave_timeout_s) " s; trial: " (v.trial)
                "; on a halt, committed devices " @if v.rollback_on_halt { "roll back" } @else { "stay" } "." }
            h2 { "Devices" }
            table id="rollout-devices" {
                thead { tr { th { "device" } th { "wave" } th { "outcome" } th { "reason" } th { "offered" } } }
                tbody { @for (id, p) in &v.devices { tr {
                    td { a href=(format!("/devices/{id}")) { (id) } } td { (p.wave + 1) }
                    td { (format!("{:?}", p.state).to_lowercase()) }
                    td { (p.reason.as_deref().unwrap_or("")) " " (p.detail.as_deref().unwrap_or("")) }
                    td { (p.offered_ms.map(time).unwrap_or_default()) }
                } } }
            }
            (pager(&format!("/rollouts/{}", r.id), v.page, v.pages))
            h2 { "History" }
            ol { @for h in &v.history { li { (history_line(h)) } } }
        },
    )
}

/// `GET /drift`.
pub fn drift(csrf: &CsrfToken, v: &DriftView) -> String {
    layout(
        "Drift",
        Some(csrf),
        html! {
            @if v.groups.is_empty() { p { "No groups yet: assign devices to groups to follow drift per cohort." } }
            @for g in &v.groups {
                section.group {
                    h2 { "Group " a href=(format!("/drift?group={}", urlencode(&g.group))) { (g.group) } }
                    (chart(&g.chart))
                    table.drift-devices {
                        thead { tr { th { "device" } th { "model" } th { "largest statistic / threshold" } th { "feature" } th { "verdict" } th { "flagged" } } }
                        tbody { @for d in &g.devices {
                            tr class=[d.flagged.then_some("flagged")] data-device=(d.device) {
                                td { a href=(format!("/devices/{}", d.device)) { (d.device) } } td { (d.model) }
                                td { (format!("{:.2}", d.ratio)) } td { (d.feature) }
                                td { (format!("{:?}", d.verdict).to_lowercase()) }
                                td { @if d.flagged { strong { "drifting" } } }
                            }
                        } }
                    }
                    @if g.more > 0 {
                        p.muted { (g.more) " more devices with lower statistics: "
                            a href=(format!("/devices?group={}", urlencode(&g.group))) { "all of group " (g.group) } }
                    }
                }
            }
            h2 { "Retraining requests" }
            @if v.requests.is_empty() { p { "None." } }
            @for r in &v.requests {
                details.request open[r.state == crate::drift::RequestState::Open] {
                    summary { (r.id) " · group " (r.group) " · model " (r.model) " · "
                        (format!("{:?}", r.state).to_lowercase()) " · opened " (time(r.opened_ms))
                        " · drifting: " (r.drifting.join(", ")) }
                    table { thead { tr { th { "device" } th { "feature" } th { "statistic" } th { "threshold" } th { "p-value" } th { "n_eff" } th { "since" } } }
                        tbody { @for e in &r.evidence { tr {
                            td { (e.device) } td { (e.feature) } td { (format!("{:.4}", e.statistic)) }
                            td { (e.threshold.map_or("-".into(), |t| format!("{t:.4}"))) }
                            td { (e.p_value.map_or("-".into(), |p| format!("{p:.2e}"))) }
                            td { (format!("{:.0}", e.n_eff)) } td { (time(e.first_seen_ms)) }
                        } } } }
                }
            }
        },
    )
}

/// `GET /bundles`.
pub fn bundles(csrf: &CsrfToken, v: &Listed<BundleInfo>) -> String {
    layout(
        "Bundles",
        Some(csrf),
        html! {
            (model_filter("/bundles", v))
            p id="matched" { (v.matched) " bundles match" }
            table id="bundles" {
                thead { tr {
                    th { "model" } th { "release" } th { "version" } th { "targets" } th { "size (bytes)" }
                    th { "chunks" } th { "gate" } th { "gate metrics (vs fp32)" } th { "size ratio" }
                    th { "key" } th { "uploaded" } th { "sha256" }
                } }
                tbody { @for b in &v.rows { tr data-sha=(b.sha256) {
                    td { (b.model) } td { (b.release) } td { (b.version) } td { (b.targets.join(", ")) }
                    td { (b.size) } td { (b.chunks) " × " (b.chunk_size) }
                    (compile_cells(b.compile.as_ref()))
                    td { code { (b.key_id) } }
                    td { (time(b.uploaded_ms)) } td { code { (&b.sha256[..12.min(b.sha256.len())]) } }
                } } }
            }
            (pager(&model_base("/bundles", v), v.page, v.pages))
            p.hint { "Gate metrics and size ratio (shipped ONNX bytes / original) come from the shipped candidate of each bundle's "
                code { "compile_report.json" } "; a bundle packed without a compile report shows none." }
        },
    )
}

/// The gate, metrics and size-ratio cells of one bundle row.
fn compile_cells(c: Option<&crate::bundles::CompileSummary>) -> Markup {
    match c {
        None => html! { td.muted { "—" } td.muted { "no compile report" } td.muted { "—" } },
        Some(c) => html! {
            td class=(if c.gate == "pass" { "ok" } else { "bad" }) { (c.gate) }
            td.metrics { @for (k, v) in &c.metrics { span.metric { (k) " " (format!("{v:.4}")) } " " } }
            td { (format!("{:.3}", c.size_ratio)) " (" (c.shipped_bytes) " / " (c.original_bytes) ")" }
        },
    }
}

#[cfg(test)]
mod tests {
    use super::history_line;

    #[test]
    fn history_times_are_written_as_utc() {
        assert_eq!(
            history_line("1796594255948 created: 6 devices in 3 waves"),
            "2026-12-06 21:57:35 UTC created: 6 devices in 3 waves"
        );
        for odd in [
            "",
            "created",
            "12x4 created",
            "99999999999999999999999 too big",
        ] {
            assert_eq!(history_line(odd), odd);
        }
    }
}
