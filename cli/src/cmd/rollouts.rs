//! `edgefleet rollouts`: create, watch and control rollouts through the fleet API.

use super::bundles::{Client, Conn};

/// Subcommands of `edgefleet rollouts`.
#[derive(clap::Subcommand)]
pub enum Command {
    /// Create and start a rollout.
    Create {
        /// Server connection.
        #[command(flatten)]
        conn: Conn,
        /// Bundle (body SHA-256 from `bundles list`).
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
    },
    /// List rollouts.
    List {
        /// Server connection.
        #[command(flatten)]
        conn: Conn,
    },
    /// Show a rollout with per-device state.
    Show {
        /// Server connection.
        #[command(flatten)]
        conn: Conn,
        /// Rollout id.
        id: String,
    },
    /// Pause a rollout.
    Pause {
        /// Server connection.
        #[command(flatten)]
        conn: Conn,
        /// Rollout id.
        id: String,
    },
    /// Resume a paused rollout.
    Resume {
        /// Server connection.
        #[command(flatten)]
        conn: Conn,
        /// Rollout id.
        id: String,
    },
    /// Abort a rollout (cancels outstanding offers).
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
        } => {
            let body = serde_json::json!({
                "bundle": bundle,
                "selector": {"group": group, "tag": tag, "target": target},
                "waves": waves.split(',').map(str::trim).collect::<Vec<_>>(),
                "seed": seed, "wave_timeout_s": wave_timeout_s,
                "max_failure_rate": max_failure_rate, "rollback_on_halt": rollback_on_halt,
            });
            let v = Client::new(conn).post_json("/v1/rollouts", &body)?;
            println!(
                "rollout {} created: {} devices",
                v["rollout"]["id"].as_str().unwrap_or("?"),
                v["rollout"]["devices_total"]
            );
        }
        Command::List { conn } => {
            let v = Client::new(conn).get("/v1/rollouts", &[])?;
            println!(
                "{:<16} {:<12} {:<8} {:<6} waves",
                "id", "state", "devices", "wave"
            );
            for r in v["rollouts"].as_array().into_iter().flatten() {
                println!(
                    "{:<16} {:<12} {:<8} {:<6} {}",
                    r["id"].as_str().unwrap_or(""),
                    r["state"]["state"].as_str().unwrap_or(""),
                    r["devices_total"],
                    r["current_wave"],
                    r["waves"]
                );
            }
        }
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
