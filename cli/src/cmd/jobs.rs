//! `edgefleet jobs`: retraining jobs through the fleet API (docs/loop.md).

use serde_json::{json, Value};

use super::bundles::{Client, Conn};
use super::table;

/// Subcommands of `edgefleet jobs`.
#[derive(clap::Subcommand)]
pub enum Command {
    /// List jobs, newest first: id, group, model, state, attempts, worker, dataset, updated
    /// (the API's JSON with --json).
    #[command(after_help = "Examples:
  edgefleet jobs list
  edgefleet jobs list --state training --json")]
    List {
        /// Server connection.
        #[command(flatten)]
        conn: Conn,
        /// Only jobs in this state (queued, collecting, training, compiling, canary,
        /// experiment, promoted, rejected, failed, cancelled).
        #[arg(long)]
        state: Option<String>,
        /// Only jobs of this group.
        #[arg(long)]
        group: Option<String>,
        /// Print the API's JSON instead of a table.
        #[arg(long)]
        json: bool,
    },
    /// Show one job: state, lease, gate numbers, lineage, history (JSON).
    #[command(after_help = "Example:
  edgefleet jobs show job-3f5a9c1e0b7d")]
    Show {
        /// Server connection.
        #[command(flatten)]
        conn: Conn,
        /// Job id.
        id: String,
    },
    /// Create a job for a group and model (an open job of the same pair is returned
    /// instead). Prints the job (JSON).
    #[command(after_help = "Examples:
  edgefleet jobs create --group line-3 --model silero_vad
  edgefleet jobs create --group line-3 --model text-student --max-regression 0.02 \\
      --param epochs=4 --lease-s 120")]
    Create {
        /// Server connection.
        #[command(flatten)]
        conn: Conn,
        /// Group (the cohort).
        #[arg(long)]
        group: String,
        /// Model.
        #[arg(long)]
        model: String,
        /// Share of the previous training data replayed next to the captures (0..1).
        #[arg(long, default_value_t = 0.5)]
        replay_fraction: f64,
        /// Target profile names to compile for (repeatable; default: the worker's).
        #[arg(long = "target")]
        targets: Vec<String>,
        /// Gate: least gain over the current release on the new data's held-out split.
        #[arg(long, default_value_t = 0.0)]
        min_improvement: f64,
        /// Gate: largest loss allowed on the previous test set.
        #[arg(long, default_value_t = 0.01)]
        max_regression: f64,
        /// Worker attempts before the job fails.
        #[arg(long, default_value_t = 3)]
        max_attempts: u32,
        /// Worker lease, seconds (a worker silent this long loses the job).
        #[arg(long, default_value_t = 60)]
        lease_s: u64,
        /// Training parameter KEY=VALUE (repeatable; VALUE parsed as JSON, else a string).
        #[arg(long = "param", value_name = "KEY=VALUE")]
        params: Vec<String>,
    },
    /// Cancel a job that has not ended.
    #[command(after_help = "Example:
  edgefleet jobs cancel job-3f5a9c1e0b7d")]
    Cancel {
        /// Server connection.
        #[command(flatten)]
        conn: Conn,
        /// Job id.
        id: String,
    },
}

/// `KEY=VALUE` pairs as a JSON object (a VALUE that is not JSON is a string).
fn params(pairs: &[String]) -> anyhow::Result<serde_json::Map<String, Value>> {
    let mut m = serde_json::Map::new();
    for p in pairs {
        let (k, v) = p
            .split_once('=')
            .filter(|(k, _)| !k.trim().is_empty())
            .ok_or_else(|| anyhow::anyhow!("--param {p}: expected KEY=VALUE with a KEY"))?;
        let value = serde_json::from_str(v).unwrap_or_else(|_| Value::String(v.to_string()));
        m.insert(k.trim().to_string(), value);
    }
    Ok(m)
}

/// Runs `edgefleet jobs`.
pub fn run(cmd: Command) -> anyhow::Result<()> {
    match cmd {
        Command::List {
            conn,
            state,
            group,
            json,
        } => {
            let q: Vec<(&str, String)> = state
                .into_iter()
                .map(|s| ("state", s))
                .chain(group.into_iter().map(|g| ("group", g)))
                .collect();
            let v = Client::new(conn).get("/v1/jobs", &q)?;
            if json {
                println!("{}", serde_json::to_string_pretty(&v)?);
            } else {
                print!("{}", list_table(&v, table::now_ms()));
            }
        }
        Command::Show { conn, id } => Client::new(conn).print(&format!("/v1/jobs/{id}"))?,
        Command::Create {
            conn,
            group,
            model,
            replay_fraction,
            targets,
            min_improvement,
            max_regression,
            max_attempts,
            lease_s,
            params: p,
        } => {
            let body = json!({
                "group": group,
                "model": model,
                "replay_fraction": replay_fraction,
                "targets": targets,
                "gate": {"min_improvement": min_improvement, "max_regression": max_regression},
                "max_attempts": max_attempts,
                "lease_s": lease_s,
                "params": params(&p)?,
            });
            let v = Client::new(conn).post_json("/v1/jobs", &body)?;
            if v["created"] == false {
                eprintln!("an open job of this group and model exists: this is it");
            }
            println!("{}", serde_json::to_string_pretty(&v)?);
        }
        Command::Cancel { conn, id } => {
            let v = Client::new(conn).post_json(&format!("/v1/jobs/{id}/cancel"), &json!({}))?;
            println!("{} {}", id, v["job"]["state"].as_str().unwrap_or("?"));
        }
    }
    Ok(())
}

/// The `jobs list` table of a `GET /v1/jobs` answer.
pub fn list_table(v: &Value, now_ms: u64) -> String {
    let s = |x: &Value| x.as_str().unwrap_or("-").to_string();
    let rows: Vec<Vec<String>> = v["jobs"]
        .as_array()
        .into_iter()
        .flatten()
        .map(|j| {
            vec![
                s(&j["id"]),
                s(&j["spec"]["group"]),
                s(&j["spec"]["model"]),
                s(&j["state"]),
                j["attempts"].to_string(),
                s(&j["lease"]["worker"]),
                s(&j["lineage"]["dataset"]),
                table::ago(now_ms, j["updated_ms"].as_u64().unwrap_or(0)),
            ]
        })
        .collect();
    table::render(
        &[
            "id", "group", "model", "state", "attempts", "worker", "dataset", "updated",
        ],
        &rows,
    )
}
