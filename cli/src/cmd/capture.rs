//! `edgefleet capture`: per-group data capture for retraining through the fleet
//! API (docs/fleet-server.md, "Data capture"). Off by default (privacy).

use serde_json::json;

use super::bundles::{Client, Conn};

/// Subcommands of `edgefleet capture`.
#[derive(clap::Subcommand)]
pub enum Command {
    /// Switch capture on for a group: its devices keep a bounded, rate-limited
    /// sample of their inputs after each drift alarm (and on `capture request`)
    /// and upload it to the server.
    #[command(after_help = "Examples:
  edgefleet capture enable --group line-3
  edgefleet capture enable --group line-3 --max-samples-per-alarm 500 --max-samples-per-minute 120")]
    Enable {
        /// Server connection.
        #[command(flatten)]
        conn: Conn,
        /// Group.
        #[arg(long)]
        group: String,
        /// Samples kept after one alarm or asked for by one request (1..=100000).
        #[arg(long, default_value_t = 200)]
        max_samples_per_alarm: u32,
        /// Rate limit: samples kept per minute at most (1..=6000).
        #[arg(long, default_value_t = 60)]
        max_samples_per_minute: u32,
    },
    /// Switch capture off for a group (devices stop capturing; uploads of
    /// batches already captured are refused).
    #[command(after_help = "Example:
  edgefleet capture disable --group line-3")]
    Disable {
        /// Server connection.
        #[command(flatten)]
        conn: Conn,
        /// Group.
        #[arg(long)]
        group: String,
    },
    /// Show a group's capture policy (JSON).
    #[command(after_help = "Example:
  edgefleet capture show --group line-3")]
    Show {
        /// Server connection.
        #[command(flatten)]
        conn: Conn,
        /// Group.
        #[arg(long)]
        group: String,
    },
    /// Ask every online device of a group to capture its next N inferences now
    /// (refused with 409 while capture is off for the group).
    #[command(after_help = "Example:
  edgefleet capture request --group line-3 --samples 100")]
    Request {
        /// Server connection.
        #[command(flatten)]
        conn: Conn,
        /// Group.
        #[arg(long)]
        group: String,
        /// Samples per device (1..=100000).
        #[arg(long)]
        samples: u32,
    },
}

/// Runs `edgefleet capture`.
pub fn run(cmd: Command) -> anyhow::Result<()> {
    let v = match cmd {
        Command::Enable {
            conn,
            group,
            max_samples_per_alarm,
            max_samples_per_minute,
        } => Client::new(conn).put_json(
            &format!("/v1/groups/{group}/capture"),
            &json!({
                "mode": "on_alarm",
                "max_samples_per_alarm": max_samples_per_alarm,
                "max_samples_per_minute": max_samples_per_minute,
            }),
        )?,
        Command::Disable { conn, group } => {
            let c = Client::new(conn);
            let path = format!("/v1/groups/{group}/capture");
            // Keep the limits the group had; only the mode changes.
            let mut p = c.get(&path, &[])?["policy"].clone();
            p["mode"] = json!("off");
            c.put_json(&path, &p)?
        }
        Command::Show { conn, group } => {
            Client::new(conn).get(&format!("/v1/groups/{group}/capture"), &[])?
        }
        Command::Request {
            conn,
            group,
            samples,
        } => Client::new(conn).post_json(
            &format!("/v1/groups/{group}/capture/requests"),
            &json!({ "samples": samples }),
        )?,
    };
    println!("{}", serde_json::to_string_pretty(&v)?);
    Ok(())
}
