//! `edgefleet experiments`: A/B experiments between two releases through the
//! fleet API (docs/loop.md, "Experiments").

use serde_json::{json, Value};

use super::bundles::{resolve_bundle, Client, Conn};
use super::table;

/// Subcommands of `edgefleet experiments`.
#[derive(clap::Subcommand)]
pub enum Command {
    /// Start an experiment on a group: a sticky share of its devices gets the candidate;
    /// the always-valid test decides; guardrails stop it. Prints it (JSON).
    #[command(after_help = "Examples:
  edgefleet experiments create --group line-3 --control 3f5a9c --candidate 8e21d0
  edgefleet experiments create --group line-3 --control 3f5a9c --candidate 8e21d0 \\
      --metric latency_p50_ms --share 0.2 --promote automatic --max-samples 20000
  edgefleet experiments create --group line-3 --control 3f5a9c --candidate 8e21d0 \\
      --allocation thompson --thompson-floor 0.1 --reallocate-every 500
  edgefleet experiments create --group line-3 --control 3f5a9c --candidate 8e21d0 \
      --candidate-mode shadow --metric latency_p50_ms --min-agreement 0.95")]
    Create {
        /// Server connection.
        #[command(flatten)]
        conn: Conn,
        /// Cohort (group).
        #[arg(long)]
        group: String,
        /// Control bundle (A): SHA-256 or a unique prefix.
        #[arg(long)]
        control: String,
        /// Candidate bundle (B): SHA-256 or a unique prefix.
        #[arg(long)]
        candidate: String,
        /// Share of the cohort on the candidate, in (0, 1).
        #[arg(long, default_value_t = 0.5)]
        share: f64,
        /// online_accuracy | error_rate | latency_p50_ms | cpu_percent.
        #[arg(long, default_value = "online_accuracy")]
        metric: String,
        /// False-positive rate of the decision (always valid under peeking).
        #[arg(long, default_value_t = 0.05)]
        alpha: f64,
        /// No decision before each arm has this many units.
        #[arg(long, default_value_t = 100)]
        min_samples: u64,
        /// Inconclusive once both arms have this many units.
        #[arg(long)]
        max_samples: Option<u64>,
        /// automatic (roll the winner out to the cohort) | manual.
        #[arg(long, default_value = "manual")]
        promote: String,
        /// fixed (the share stays) | thompson (the share follows the
        /// posterior probability that the candidate is better; the metric
        /// must be online_accuracy or error_rate).
        #[arg(long, value_enum, default_value_t = AllocationKind::Fixed)]
        allocation: AllocationKind,
        /// Thompson: least share of the cohort on each arm, in (0, 0.5].
        #[arg(long, default_value_t = 0.1)]
        thompson_floor: f64,
        /// Thompson: new units of the metric (both arms) between reallocations.
        #[arg(long, default_value_t = 200)]
        reallocate_every: u64,
        /// serve (the candidate answers its devices' requests) | shadow (it
        /// runs beside the control on the same inputs, answers discarded;
        /// the metric must be latency_p50_ms or error_rate).
        #[arg(long, value_enum, default_value_t = CandidateModeArg::Serve)]
        candidate_mode: CandidateModeArg,
        /// Shadow: how long the candidate devices shadow (s); the experiment
        /// ends inconclusive after it.
        #[arg(long, default_value_t = 3600)]
        shadow_window: u64,
        /// Shadow: keep a winning candidate out when its agreement with the
        /// control is below this fraction.
        #[arg(long)]
        min_agreement: Option<f64>,
    },
    /// List experiments: id, group, state, metric, A and B means, p-value, devices.
    #[command(after_help = "Examples:
  edgefleet experiments list
  edgefleet experiments list --json | jq '.experiments[] | select(.state == \"running\")'")]
    List {
        /// Server connection.
        #[command(flatten)]
        conn: Conn,
        /// Print the API's JSON instead of a table.
        #[arg(long)]
        json: bool,
    },
    /// Show one experiment: assignment, metrics per variant, evaluation, guardrails (JSON).
    #[command(after_help = "Examples:
  edgefleet experiments show 5b1e0c2a9f4d7e31")]
    Show {
        /// Server connection.
        #[command(flatten)]
        conn: Conn,
        /// Experiment id.
        id: String,
    },
    /// Cancel a running experiment (its candidate devices roll back).
    #[command(after_help = "Examples:
  edgefleet experiments cancel 5b1e0c2a9f4d7e31")]
    Cancel {
        /// Server connection.
        #[command(flatten)]
        conn: Conn,
        /// Experiment id.
        id: String,
    },
}

/// How the cohort is split (`--allocation`).
#[derive(Clone, Copy, clap::ValueEnum)]
pub enum AllocationKind {
    /// The share stays as created.
    Fixed,
    /// Thompson sampling.
    Thompson,
}

/// How the candidate runs (`--candidate-mode`).
#[derive(Clone, Copy, clap::ValueEnum)]
pub enum CandidateModeArg {
    /// It serves its devices' requests (A/B).
    Serve,
    /// It shadows the control; its answers are discarded.
    Shadow,
}

/// Runs `edgefleet experiments`.
pub fn run(cmd: Command) -> anyhow::Result<()> {
    match cmd {
        Command::Create {
            conn,
            group,
            control,
            candidate,
            share,
            metric,
            alpha,
            min_samples,
            max_samples,
            promote,
            allocation,
            thompson_floor,
            reallocate_every,
            candidate_mode,
            shadow_window,
            min_agreement,
        } => {
            let c = Client::new(conn);
            let allocation = match allocation {
                AllocationKind::Fixed => json!({"kind": "fixed"}),
                AllocationKind::Thompson => json!({"kind": "thompson",
                    "floor": thompson_floor, "every_units": reallocate_every}),
            };
            let body = json!({
                "group": group,
                "control": resolve_bundle(&c, &control)?,
                "candidate": resolve_bundle(&c, &candidate)?,
                "candidate_share": share,
                "metric": metric,
                "alpha": alpha,
                "min_samples_per_arm": min_samples,
                "max_samples_per_arm": max_samples,
                "promote": promote,
                "allocation": allocation,
                "candidate_mode": match candidate_mode {
                    CandidateModeArg::Serve => "serve",
                    CandidateModeArg::Shadow => "shadow",
                },
                "shadow_window_s": shadow_window,
                "min_agreement": min_agreement,
            });
            let v = c.post_json("/v1/experiments", &body)?;
            println!("{}", serde_json::to_string_pretty(&v)?);
        }
        Command::List { conn, json } => {
            let v = Client::new(conn).get("/v1/experiments", &[])?;
            if json {
                println!("{}", serde_json::to_string_pretty(&v)?);
            } else {
                print!("{}", list_table(&v, table::now_ms()));
            }
        }
        Command::Show { conn, id } => {
            Client::new(conn).print(&format!("/v1/experiments/{id}"))?;
        }
        Command::Cancel { conn, id } => {
            let v =
                Client::new(conn).post_json(&format!("/v1/experiments/{id}/cancel"), &json!({}))?;
            println!("{id} {}", v["experiment"]["state"].as_str().unwrap_or("?"));
        }
    }
    Ok(())
}

/// The `experiments list` table of a `GET /v1/experiments` answer.
pub fn list_table(v: &Value, now_ms: u64) -> String {
    let s = |x: &Value| x.as_str().unwrap_or("-").to_string();
    let num = |x: &Value| x.as_f64().map_or("-".to_string(), |f| format!("{f:.4}"));
    let rows: Vec<Vec<String>> = v["experiments"]
        .as_array()
        .into_iter()
        .flatten()
        .map(|e| {
            let eff = &e["last"]["effect"];
            let b = e["assignment"]
                .as_object()
                .map_or(0, |m| m.values().filter(|x| x.as_u64() == Some(1)).count());
            let n = e["assignment"].as_object().map_or(0, |m| m.len());
            vec![
                s(&e["id"]),
                s(&e["spec"]["group"]),
                s(&e["state"]),
                s(&e["spec"]["metric"]),
                num(&eff["mean_a"]),
                num(&eff["mean_b"]),
                num(&e["last"]["p_value"]),
                format!("{}/{}", n - b, b),
                table::ago(now_ms, e["updated_ms"].as_u64().unwrap_or(0)),
            ]
        })
        .collect();
    table::render(
        &[
            "id",
            "group",
            "state",
            "metric",
            "a",
            "b",
            "p",
            "devices a/b",
            "updated",
        ],
        &rows,
    )
}
