//! `edgefleet rollouts`: create, watch and control rollouts through the fleet API.

use serde_json::Value;

use super::bundles::{Client, Conn};

/// Subcommands of `edgefleet rollouts`.
#[derive(clap::Subcommand)]
pub enum Command {
    /// Create and start a rollout.
    #[command(after_help = "Examples:
  edgefleet rollouts create --bundle 3f5a9c1e --group line-3            # hash prefix from `bundles list`
  edgefleet rollouts create --bundle bundles/silero_vad-1.0.0-rpi4.efb --tag canary --waves 1,100%
  edgefleet rollouts create --bundle 3f5a9c1e --max-failure-rate 0.1 --rollback-on-halt
  edgefleet rollouts create --bundle 3f5a9c1e --trial-window 60 --trial-max-latency-ratio 5 --trial-mode serve
  then: edgefleet rollouts watch ID")]
    Create {
        /// Server connection.
        #[command(flatten)]
        conn: Conn,
        /// Bundle: its SHA-256, a unique prefix of it (>= 8 hex digits, as in
        /// `bundles list`), or the uploaded .efb file.
        #[arg(long)]
        bundle: String,
        /// Only devices in this group.
        #[arg(long)]
        group: Option<String>,
        /// Only devices with this tag.
        #[arg(long)]
        tag: Option<String>,
        /// Only devices with this target.
        #[arg(long)]
        target: Option<String>,
        /// Waves (cumulative count or percentage).
        #[arg(long, default_value = "1,5%,25%,100%")]
        waves: String,
        /// Seed of the device order.
        #[arg(long, default_value_t = 0)]
        seed: u64,
        /// Per-device commit timeout (s).
        #[arg(long, default_value_t = 600)]
        wave_timeout_s: u64,
        /// Halt when a wave's failure rate exceeds this (0..1).
        #[arg(long, default_value_t = 0.0)]
        max_failure_rate: f64,
        /// Command rollback to a halted wave's committed devices.
        #[arg(long)]
        rollback_on_halt: bool,
        /// The trial each device runs (flags left out take the server's defaults).
        #[command(flatten)]
        trial: TrialArgs,
    },
    /// List rollouts: a table (id, state, release, devices, wave, counts, created,
    /// updated), or the API's JSON with --json.
    #[command(after_help = "Examples:
  edgefleet rollouts list
  edgefleet rollouts list --json | jq -r '.rollouts[] | select(.state.state == \"running\") | .id'")]
    List {
        /// Server connection.
        #[command(flatten)]
        conn: Conn,
        /// Print the API's JSON instead of a table.
        #[arg(long)]
        json: bool,
    },
    /// Follow a rollout: redraw its waves and counts until it completes, halts or is
    /// aborted (plain lines, one per change, when stdout is not a terminal). Exits 0 when
    /// it completed, 1 when it halted or was aborted.
    #[command(after_help = "Examples:
  edgefleet rollouts watch r-5f0c2a91b7e4
  edgefleet rollouts watch r-5f0c2a91b7e4 --interval-s 5 | tee rollout.log")]
    Watch {
        /// Server connection.
        #[command(flatten)]
        conn: Conn,
        /// Rollout id.
        id: String,
        /// Seconds between polls.
        #[arg(long, default_value_t = 1.0)]
        interval_s: f64,
    },
    /// Show a rollout with per-device state (JSON).
    #[command(after_help = "Example:
  edgefleet rollouts show r-5f0c2a91b7e4")]
    Show {
        /// Server connection.
        #[command(flatten)]
        conn: Conn,
        /// Rollout id.
        id: String,
    },
    /// Pause a rollout.
    #[command(after_help = "Example:
  edgefleet rollouts pause r-5f0c2a91b7e4   # no new offers; resume continues")]
    Pause {
        /// Server connection.
        #[command(flatten)]
        conn: Conn,
        /// Rollout id.
        id: String,
    },
    /// Resume a paused rollout.
    #[command(after_help = "Example:
  edgefleet rollouts resume r-5f0c2a91b7e4")]
    Resume {
        /// Server connection.
        #[command(flatten)]
        conn: Conn,
        /// Rollout id.
        id: String,
    },
    /// Abort a rollout (cancels outstanding offers).
    #[command(after_help = "Example:
  edgefleet rollouts abort r-5f0c2a91b7e4")]
    Abort {
        /// Server connection.
        #[command(flatten)]
        conn: Conn,
        /// Rollout id.
        id: String,
    },
}

/// Runs `edgefleet rollouts`.
pub fn run(cmd: Command) -> anyhow::Result<()> {
    match cmd {
        Command::Create {
            conn,
            bundle,
            group,
            tag,
            target,
            waves,
            seed,
            wave_timeout_s,
            max_failure_rate,
            rollback_on_halt,
            trial,
        } => {
            let client = Client::new(conn);
            let bundle = super::bundles::resolve_bundle(&client, &bundle)?;
            let body = serde_json::json!({
                "bundle": bundle,
                "selector": {"group": group, "tag": tag, "target": target},
                "waves": waves.split(',').map(str::trim).collect::<Vec<_>>(),
                "seed": seed, "wave_timeout_s": wave_timeout_s,
                "max_failure_rate": max_failure_rate, "rollback_on_halt": rollback_on_halt,
                "trial": trial.policy_json(),
            });
            let v = client.post_json("/v1/rollouts", &body)?;
            println!(
                "{}",
                created_line(
                    v["rollout"]["id"].as_str().unwrap_or("?"),
                    v["rollout"]["devices_total"].as_u64().unwrap_or(0)
                )
            );
            println!("{}", trial_summary(&v["rollout"]["spec"]["trial"]));
        }
        Command::List { conn, json } => {
            let v = Client::new(conn).get("/v1/rollouts", &[])?;
            if json {
                println!("{}", serde_json::to_string_pretty(&v)?);
            } else {
                print!("{}", list_table(&v, super::table::now_ms()));
            }
        }
        Command::Watch {
            conn,
            id,
            interval_s,
        } => watch(&Client::new(conn), &id, interval_s)?,
        Command::Show { conn, id } => Client::new(conn).print(&format!("/v1/rollouts/{id}"))?,
        Command::Pause { conn, id } => control(conn, &id, "pause")?,
        Command::Resume { conn, id } => control(conn, &id, "resume")?,
        Command::Abort { conn, id } => control(conn, &id, "abort")?,
    }
    Ok(())
}

fn control(conn: Conn, id: &str, op: &str) -> anyhow::Result<()> {
    let v =
        Client::new(conn).post_json(&format!("/v1/rollouts/{id}/{op}"), &serde_json::json!({}))?;
    println!(
        "rollout {id}: {}",
        v["rollout"]["state"]["state"].as_str().unwrap_or("?")
    );
    Ok(())
}

/// A rollout's state for people: `running`, `halted: REASON`, ...
fn state(r: &Value) -> String {
    let st = r["state"]["state"].as_str().unwrap_or("?");
    match r["state"]["reason"].as_str() {
        Some(reason) => format!("{st}: {reason}"),
        None => st.to_string(),
    }
}

/// Sums of the waves' counts: (committed, failed, in progress).
fn totals(r: &Value) -> (u64, u64, u64) {
    let waves = r["waves"].as_array().into_iter().flatten();
    waves.fold((0, 0, 0), |(c, f, p), w| {
        (
            c + w["committed"].as_u64().unwrap_or(0),
            f + w["failed"].as_u64().unwrap_or(0),
            p + w["in_progress"].as_u64().unwrap_or(0),
        )
    })
}

/// `2/4` (1-based current wave of all), `-` before the first.
fn wave(r: &Value) -> String {
    let n = r["waves"].as_array().map_or(0, Vec::len);
    match r["current_wave"].as_u64() {
        Some(w) => format!("{}/{n}", w + 1),
        None => format!("-/{n}"),
    }
}

/// The `rollouts list` table of a `GET /v1/rollouts` answer, times relative to `now_ms`.
pub fn list_table(v: &Value, now_ms: u64) -> String {
    use super::table::ago;
    let rows: Vec<Vec<String>> = v["rollouts"]
        .as_array()
        .into_iter()
        .flatten()
        .map(|r| {
            let (c, f, p) = totals(r);
            vec![
                r["id"].as_str().unwrap_or("").to_string(),
                state(r),
                super::devices::release(&r["release"]),
                r["devices_total"].to_string(),
                wave(r),
                c.to_string(),
                f.to_string(),
                p.to_string(),
                ago(now_ms, r["created_ms"].as_u64().unwrap_or(0)),
                ago(now_ms, r["updated_ms"].as_u64().unwrap_or(0)),
            ]
        })
        .collect();
    super::table::render(
        &[
            "id",
            "state",
            "release",
            "devices",
            "wave",
            "committed",
            "failed",
            "in progress",
            "created",
            "updated",
        ],
        &rows,
    )
}

/// What `rollouts create` prints first: `rollout ID created: 1 device`.
pub fn created_line(id: &str, devices: u64) -> String {
    let s = if devices == 1 { "" } else { "s" };
    format!("rollout {id} created: {devices} device{s}")
}

/// What `rollouts watch` shows of one `GET /v1/rollouts/{id}` answer: a
/// summary line, then a table of the waves (`>` marks the current one).
pub fn progress(r: &Value, now_ms: u64) -> String {
    let (c, f, p) = totals(r);
    let head = format!(
        "rollout {}  {}  {}  wave {}  committed {c}, failed {f}, in progress {p} of {}  (updated {})\n",
        r["id"].as_str().unwrap_or("?"),
        super::devices::release(&r["release"]),
        state(r),
        wave(r),
        r["devices_total"],
        super::table::ago(now_ms, r["updated_ms"].as_u64().unwrap_or(0)),
    );
    let current = r["current_wave"].as_u64();
    let rows: Vec<Vec<String>> = r["waves"]
        .as_array()
        .into_iter()
        .flatten()
        .enumerate()
        .map(|(i, w)| {
            let mark = if current == u64::try_from(i).ok() {
                ">"
            } else {
                " "
            };
            vec![
                format!("{mark}{}", i + 1),
                w["size"].to_string(),
                w["committed"].to_string(),
                w["failed"].to_string(),
                w["in_progress"].to_string(),
            ]
        })
        .collect();
    head + &super::table::render(
        &[" wave", "devices", "committed", "failed", "in progress"],
        &rows,
    )
}

/// True once the rollout will not change any more.
fn finished(r: &Value) -> bool {
    matches!(
        r["state"]["state"].as_str(),
        Some("completed" | "halted" | "aborted")
    )
}

/// Polls the rollout every `interval_s` and redraws [`progress`] (a terminal)
/// or prints it when it changed (anything else), until it finishes.
fn watch(client: &Client, id: &str, interval_s: f64) -> anyhow::Result<()> {
    use std::io::{IsTerminal as _, Write as _};
    if !(interval_s.is_finite() && interval_s > 0.0) {
        anyhow::bail!("--interval-s must be a positive number of seconds, not {interval_s}");
    }
    let tty = std::io::stdout().is_terminal();
    let mut shown = String::new();
    let mut last_lines = 0;
    loop {
        let v = client.get(&format!("/v1/rollouts/{id}"), &[])?;
        let r = &v["rollout"];
        let text = progress(r, super::table::now_ms());
        let mut out = std::io::stdout().lock();
        if tty {
            // Up to the start of the last drawing, clear to the end of the screen.
            if last_lines > 0 {
                write!(out, "\x1b[{last_lines}A\x1b[J")?;
            }
            write!(out, "{text}")?;
            last_lines = text.lines().count();
        } else {
            // Without a terminal: only changes, ages left out (they change every poll).
            let stable = progress(r, 0);
            if stable != shown {
                write!(out, "{stable}")?;
                shown = stable;
            }
        }
        out.flush()?;
        drop(out);
        if finished(r) {
            return match r["state"]["state"].as_str() {
                Some("completed") => Ok(()),
                _ => anyhow::bail!("rollout {id} {}", state(r)),
            };
        }
        std::thread::sleep(std::time::Duration::from_secs_f64(interval_s));
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn created_counts_devices_in_words() {
        assert_eq!(created_line("r-1", 1), "rollout r-1 created: 1 device");
        assert_eq!(created_line("r-1", 0), "rollout r-1 created: 0 devices");
        assert_eq!(created_line("r-1", 5), "rollout r-1 created: 5 devices");
    }

    fn halted(now: u64) -> Value {
        serde_json::json!({
            "id": "r-5f0c2a91b7e4",
            "state": {"state": "halted", "reason": "wave 1: 1 of 1 devices failed (max 0)"},
            "release": {"model": "vad", "release": 2, "version": "1.1.0"},
            "current_wave": 0,
            "waves": [
                {"size": 1, "committed": 0, "failed": 1, "in_progress": 0},
                {"size": 4, "committed": 0, "failed": 0, "in_progress": 4}
            ],
            "devices_total": 5, "created_ms": now - 65_000, "updated_ms": now - 5_000
        })
    }

    #[test]
    fn the_list_is_a_table_with_counts_and_ages() {
        let now = 1_700_000_000_000u64;
        let v = serde_json::json!({"rollouts": [halted(now)]});
        assert_eq!(
            list_table(&v, now),
            "id              state                                          release                devices  wave  committed  failed  in progress  created    updated\n\
             r-5f0c2a91b7e4  halted: wave 1: 1 of 1 devices failed (max 0)  vad 1.1.0 (release 2)  5        1/2   0          1       4            1m 5s ago  5s ago\n"
        );
    }

    #[test]
    fn watch_shows_the_waves_and_why_it_halted() {
        let now = 1_700_000_000_000u64;
        let r = halted(now);
        assert_eq!(
            progress(&r, now),
            "rollout r-5f0c2a91b7e4  vad 1.1.0 (release 2)  halted: wave 1: 1 of 1 devices failed (max 0)  \
             wave 1/2  committed 0, failed 1, in progress 4 of 5  (updated 5s ago)\n\
             \u{20}wave  devices  committed  failed  in progress\n\
             >1     1        0          1       0\n\
             \u{20}2     4        0          0       4\n"
        );
        assert!(finished(&r));
        let mut running = r.clone();
        running["state"] = serde_json::json!({"state": "running"});
        assert!(!finished(&running));
        assert!(state(&running) == "running");
    }
}

/// `rollouts create` trial flags: each one given sets that field of the
/// offer's trial policy (`TrialPolicy` in docs/specs/mqtt.md); the server
/// fills the rest with its defaults and refuses values out of range.
#[derive(clap::Args, Debug, Default)]
pub struct TrialArgs {
    /// Trial window (s): the candidate must run this long before it commits
    /// [server default: 10].
    #[arg(long = "trial-window", value_name = "SECONDS")]
    pub window_s: Option<u64>,
    /// Requests the candidate must answer (or shadow) before it commits
    /// [server default: 20].
    #[arg(long = "trial-min-requests", value_name = "N")]
    pub min_requests: Option<u64>,
    /// Largest failed-request fraction of the candidate, 0..1 [server default: 0.01].
    #[arg(long = "trial-max-error-rate", value_name = "RATE")]
    pub max_error_rate: Option<f64>,
    /// Largest ratio of the candidate's latency to its reference (>= 1): the
    /// previous release of the same model, else the candidate's own latency
    /// on its golden inputs; the target's latency budget applies as well
    /// [server default: 3].
    #[arg(long = "trial-max-latency-ratio", value_name = "RATIO")]
    pub max_latency_ratio: Option<f64>,
    /// `shadow`: the active model answers and the candidate runs beside it;
    /// `serve`: the candidate answers [server default: shadow].
    #[arg(long = "trial-mode", value_enum)]
    pub mode: Option<TrialModeArg>,
}

/// `--trial-mode` values.
#[derive(clap::ValueEnum, Clone, Copy, Debug, PartialEq, Eq)]
pub enum TrialModeArg {
    /// The active model answers; the candidate runs on the same inputs.
    Shadow,
    /// The candidate answers.
    Serve,
}

impl TrialArgs {
    /// The `trial` object of `POST /v1/rollouts`: only the fields given.
    pub fn policy_json(&self) -> Value {
        let mut m = serde_json::Map::new();
        let mut put = |k: &str, v: Option<Value>| {
            if let Some(v) = v {
                m.insert(k.to_string(), v);
            }
        };
        put("window_s", self.window_s.map(Value::from));
        put("min_requests", self.min_requests.map(Value::from));
        put("max_error_rate", self.max_error_rate.map(Value::from));
        put("max_p99_ratio", self.max_latency_ratio.map(Value::from));
        put(
            "mode",
            self.mode.map(|m| {
                Value::from(match m {
                    TrialModeArg::Shadow => "shadow",
                    TrialModeArg::Serve => "serve",
                })
            }),
        );
        Value::Object(m)
    }
}

/// One line describing the trial policy the server stored.
fn trial_summary(t: &Value) -> String {
    format!(
        "trial: {} mode, window {} s, at least {} requests, error rate <= {}, latency <= {} x reference",
        t["mode"].as_str().unwrap_or("?"),
        t["window_s"],
        t["min_requests"],
        t["max_error_rate"],
        t["max_p99_ratio"]
    )
}

#[cfg(test)]
mod trial_args_tests {
    use super::*;
    use clap::Parser as _;

    #[derive(clap::Parser)]
    struct Cli {
        #[command(flatten)]
        trial: TrialArgs,
    }

    #[test]
    fn trial_flags_become_the_policy_fields_given() {
        let cli = Cli::try_parse_from([
            "x",
            "--trial-window",
            "45",
            "--trial-min-requests",
            "7",
            "--trial-max-error-rate",
            "0.2",
            "--trial-max-latency-ratio",
            "6.5",
            "--trial-mode",
            "serve",
        ])
        .expect("flags parse");
        assert_eq!(
            cli.trial.policy_json(),
            serde_json::json!({"window_s": 45, "min_requests": 7, "max_error_rate": 0.2,
                               "max_p99_ratio": 6.5, "mode": "serve"})
        );
        let none = Cli::try_parse_from(["x"]).expect("no flags parse");
        assert_eq!(none.trial.policy_json(), serde_json::json!({}));
        assert!(Cli::try_parse_from(["x", "--trial-mode", "canary"]).is_err());
    }
}
