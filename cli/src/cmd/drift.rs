//! `edgefleet drift` and `edgefleet retraining`: drift statistics and
//! retraining requests through the fleet API (docs/fleet-server.md, "Drift rule").

use serde_json::Value;

use super::bundles::{Client, Conn};
use super::table;

/// Subcommands of `edgefleet drift`.
#[derive(clap::Subcommand)]
pub enum Command {
    /// The latest drift statistic of each device and feature, with its threshold,
    /// p-value, effective sample size and verdict (a table; the API's JSON with --json).
    #[command(after_help = "Examples:
  edgefleet drift show
  edgefleet drift show --device vad-rpi4-06
  edgefleet drift show --group line-3 --feature output.logit
  edgefleet drift show --device vad-rpi4-06 --limit 50 --json | jq '.series[].points[].statistic'")]
    Show {
        /// Server connection.
        #[command(flatten)]
        conn: Conn,
        /// Only this device.
        #[arg(long)]
        device: Option<String>,
        /// Only devices of this group.
        #[arg(long)]
        group: Option<String>,
        /// Only this model.
        #[arg(long)]
        model: Option<String>,
        /// Only this feature (e.g. `input.rms`, `classes`).
        #[arg(long)]
        feature: Option<String>,
        /// Reports per device to fetch (the table shows the latest; --json all).
        #[arg(long, default_value_t = 1)]
        limit: usize,
        /// Print the API's JSON instead of a table.
        #[arg(long)]
        json: bool,
    },
}

/// Subcommands of `edgefleet retraining`.
#[derive(clap::Subcommand)]
pub enum RetrainingCommand {
    /// Retraining requests, open and closed: group, model, state, drifting devices,
    /// everyone who was a member, when opened and closed (the API's JSON with --json,
    /// which adds the evidence per device and feature and the membership history).
    #[command(after_help = "Examples:
  edgefleet retraining list
  edgefleet retraining list --state open --group line-3
  edgefleet retraining list --json | jq '.requests[] | {id, drifting, evidence}'")]
    List {
        /// Server connection.
        #[command(flatten)]
        conn: Conn,
        /// Only this group.
        #[arg(long)]
        group: Option<String>,
        /// Only this model.
        #[arg(long)]
        model: Option<String>,
        /// Only `open` or `closed` requests.
        #[arg(long, value_parser = ["open", "closed"])]
        state: Option<String>,
        /// Print the API's JSON instead of a table.
        #[arg(long)]
        json: bool,
    },
}

/// The query pairs of the options that are set.
fn pairs(opts: &[(&'static str, Option<String>)]) -> Vec<(&'static str, String)> {
    opts.iter()
        .filter_map(|(k, v)| v.clone().map(|v| (*k, v)))
        .collect()
}

/// Runs `edgefleet drift`.
pub fn run(cmd: Command) -> anyhow::Result<()> {
    let Command::Show {
        conn,
        device,
        group,
        model,
        feature,
        limit,
        json,
    } = cmd;
    let mut q = pairs(&[
        ("device", device),
        ("group", group),
        ("model", model),
        ("feature", feature),
    ]);
    q.push(("limit", limit.to_string()));
    let v = Client::new(conn).get("/v1/drift", &q)?;
    if json {
        println!("{}", serde_json::to_string_pretty(&v)?);
    } else {
        print!("{}", drift_table(&v, table::now_ms()));
    }
    Ok(())
}

/// Runs `edgefleet retraining`.
pub fn run_retraining(cmd: RetrainingCommand) -> anyhow::Result<()> {
    let RetrainingCommand::List {
        conn,
        group,
        model,
        state,
        json,
    } = cmd;
    let q = pairs(&[("group", group), ("model", model), ("state", state)]);
    let v = Client::new(conn).get("/v1/retraining", &q)?;
    if json {
        println!("{}", serde_json::to_string_pretty(&v)?);
    } else {
        print!("{}", retraining_table(&v, table::now_ms()));
    }
    Ok(())
}

/// A number for people: 4 significant digits, `-` when absent.
fn num(v: &Value) -> String {
    match v.as_f64() {
        Some(x) if x != 0.0 && (x.abs() < 1e-3 || x.abs() >= 1e5) => format!("{x:.3e}"),
        Some(x) => format!("{}", (x * 1e4).round() / 1e4),
        None => "-".into(),
    }
}

/// The `drift show` table of a `GET /v1/drift` answer: the latest point of
/// each device, model and feature.
pub fn drift_table(v: &Value, now_ms: u64) -> String {
    let rows: Vec<Vec<String>> = v["series"]
        .as_array()
        .into_iter()
        .flatten()
        .filter_map(|s| {
            let p = s["points"].as_array()?.last()?;
            Some(vec![
                s["device"].as_str().unwrap_or("").to_string(),
                format!("{}@{}", s["model"].as_str().unwrap_or("?"), p["release"]),
                s["feature"].as_str().unwrap_or("").to_string(),
                num(&p["statistic"]),
                num(&p["threshold"]),
                num(&p["p_value"]),
                num(&p["n_eff"]),
                p["verdict"].as_str().unwrap_or("-").to_string(),
                table::ago(now_ms, p["received_ms"].as_u64().unwrap_or(0)),
            ])
        })
        .collect();
    table::render(
        &[
            "device",
            "release",
            "feature",
            "statistic",
            "threshold",
            "p-value",
            "n_eff",
            "verdict",
            "received",
        ],
        &rows,
    )
}

/// The `retraining list` table of a `GET /v1/retraining` answer.
pub fn retraining_table(v: &Value, now_ms: u64) -> String {
    let rows: Vec<Vec<String>> = v["requests"]
        .as_array()
        .into_iter()
        .flatten()
        .map(|r| {
            let members: Vec<Value> = r["members"]
                .as_array()
                .into_iter()
                .flatten()
                .map(|m| m["device"].clone())
                .collect();
            vec![
                r["id"].as_str().unwrap_or("").to_string(),
                r["group"].as_str().unwrap_or("").to_string(),
                r["model"].as_str().unwrap_or("").to_string(),
                r["state"].as_str().unwrap_or("").to_string(),
                table::list(&r["drifting"]),
                table::list(&Value::Array(members)),
                table::ago(now_ms, r["opened_ms"].as_u64().unwrap_or(0)),
                table::ago(now_ms, r["closed_ms"].as_u64().unwrap_or(0)),
            ]
        })
        .collect();
    table::render(
        &[
            "id", "group", "model", "state", "drifting", "members", "opened", "closed",
        ],
        &rows,
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_drift_table_shows_the_latest_point_per_feature() {
        let now = 1_700_000_000_000u64;
        let v = serde_json::json!({"series": [
            {"device": "cam-01", "model": "vad", "feature": "input.rms", "points": [
                {"received_ms": now - 20_000, "release": 1, "statistic": 0.5, "threshold": 0.31,
                 "p_value": 1e-7, "n_eff": 52.25, "verdict": "drift"},
                {"received_ms": now - 4_000, "release": 2, "statistic": 0.012_345, "threshold": 0.31,
                 "p_value": 0.42, "n_eff": 60.0, "verdict": "ok"}]},
            {"device": "cam-02", "model": "vad", "feature": "classes", "points": [
                {"received_ms": now - 1_000, "release": 2, "statistic": 3.0, "threshold": null,
                 "p_value": null, "n_eff": 4.0, "verdict": "insufficient_data"}]}
        ]});
        assert_eq!(
            drift_table(&v, now),
            "device  release  feature    statistic  threshold  p-value  n_eff  verdict            received\n\
             cam-01  vad@2    input.rms  0.0123     0.31       0.42     60     ok                 4s ago\n\
             cam-02  vad@2    classes    3          -          -        4      insufficient_data  1s ago\n"
        );
    }

    #[test]
    fn the_retraining_table_lists_drifting_devices_and_members() {
        let now = 1_700_000_000_000u64;
        let v = serde_json::json!({"requests": [
            {"id": "rt-1", "group": "line", "model": "vad", "state": "closed",
             "drifting": [], "members": [{"device": "a"}, {"device": "b"}],
             "opened_ms": now - 120_000, "closed_ms": now - 60_000},
            {"id": "rt-2", "group": "line", "model": "vad", "state": "open",
             "drifting": ["c"], "members": [{"device": "c"}],
             "opened_ms": now - 5_000, "closed_ms": null}
        ]});
        assert_eq!(
            retraining_table(&v, now),
            "id    group  model  state   drifting  members  opened  closed\n\
             rt-1  line   vad    closed  -         a,b      2m ago  1m ago\n\
             rt-2  line   vad    open    c         c        5s ago  -\n"
        );
    }
}
