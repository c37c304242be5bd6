//! `edgefleet devices`: the device registry through the fleet API.

use super::bundles::Client;

/// Subcommands of `edgefleet devices`.
#[derive(clap::Subcommand)]
pub enum Command {
    /// List devices (optionally filtered).
    List {
        /// Server connection.
        #[command(flatten)]
        conn: super::bundles::Conn,
        /// Only this group.
        #[arg(long)]
        group: Option<String>,
        /// Only this tag.
        #[arg(long)]
        tag: Option<String>,
        /// Only this target profile.
        #[arg(long)]
        target: Option<String>,
    },
    /// Show one device.
    Show {
        /// Server connection.
        #[command(flatten)]
        conn: super::bundles::Conn,
        /// Device id.
        id: String,
    },
    /// Add or remove operator tags.
    Tag {
        /// Server connection.
        #[command(flatten)]
        conn: super::bundles::Conn,
        /// Device id.
        id: String,
        /// Tags to add.
        #[arg(long)]
        add: Vec<String>,
        /// Tags to remove.
        #[arg(long)]
        remove: Vec<String>,
    },
    /// Add or remove groups.
    Group {
        /// Server connection.
        #[command(flatten)]
        conn: super::bundles::Conn,
        /// Device id.
        id: String,
        /// Groups to add.
        #[arg(long)]
        add: Vec<String>,
        /// Groups to remove.
        #[arg(long)]
        remove: Vec<String>,
    },
    /// Create or rotate a device's broker credentials (username = device id) and
    /// print the secret: it is shown once, the server keeps only a salted hash.
    #[command(after_help = "Examples:
  edgefleet devices credentials cam-17            # new secret (the old one stops working)
  edgefleet devices credentials cam-17 --revoke   # the device can no longer connect

Put the secret in the agent's config ([broker] username = \"cam-17\", password = \"...\").
With an external Mosquitto, also add it to the broker's password file:
  mosquitto_passwd -b /etc/mosquitto/edgefleet.passwd cam-17 SECRET   # then reload mosquitto")]
    Credentials {
        /// Server connection.
        #[command(flatten)]
        conn: super::bundles::Conn,
        /// Device id.
        id: String,
        /// Revoke the credentials instead.
        #[arg(long)]
        revoke: bool,
    },
    /// Change a device's runtime settings (sent as `Down::Config`, QoS 1; the
    /// agent persists them and applies them without a restart).
    #[command(after_help = "Examples:
  edgefleet devices config cam-17 --telemetry-interval-s 10
  edgefleet devices config cam-17 --psi-alarm 0.2 --ks-alarm 0.2 --chi2-p-alarm 0.001 --min-samples 500")]
    Config {
        /// Server connection.
        #[command(flatten)]
        conn: super::bundles::Conn,
        /// Device id.
        id: String,
        /// Telemetry interval (s, 1..=86400).
        #[arg(long)]
        telemetry_interval_s: Option<u64>,
        /// Drift report interval (s, 1..=86400).
        #[arg(long)]
        drift_interval_s: Option<u64>,
        /// Drift thresholds: all four together (PSI alarm level).
        #[arg(long, requires_all = ["ks_alarm", "chi2_p_alarm", "min_samples"])]
        psi_alarm: Option<f64>,
        /// KS alarm level (0..1].
        #[arg(long, requires = "psi_alarm")]
        ks_alarm: Option<f64>,
        /// Chi-square p-value alarm level (0..1).
        #[arg(long, requires = "psi_alarm")]
        chi2_p_alarm: Option<f64>,
        /// Minimum samples before any verdict.
        #[arg(long, requires = "psi_alarm")]
        min_samples: Option<u64>,
    },
}

/// Runs `edgefleet devices`.
pub fn run(cmd: Command) -> anyhow::Result<()> {
    match cmd {
        Command::List {
            conn,
            group,
            tag,
            target,
        } => {
            let c = Client::new(conn);
            let mut q = Vec::new();
            for (k, v) in [("group", group), ("tag", tag), ("target", target)] {
                if let Some(v) = v {
                    q.push((k, v));
                }
            }
            let v = c.get("/v1/devices", &q)?;
            println!(
                "{:<24} {:<8} {:<20} {:<16} {:<12} groups",
                "id", "online", "target", "active", "state"
            );
            for d in v["devices"].as_array().into_iter().flatten() {
                let active = d["active"].as_object().map_or("-".to_string(), |a| {
                    format!("{}#{}", a["model"].as_str().unwrap_or("?"), a["release"])
                });
                println!(
                    "{:<24} {:<8} {:<20} {:<16} {:<12} {}",
                    d["id"].as_str().unwrap_or(""),
                    d["online"],
                    d["target"].as_str().unwrap_or("-"),
                    active,
                    d["update_state"].as_str().unwrap_or("-"),
                    d["groups"]
                );
            }
        }
        Command::Show { conn, id } => Client::new(conn).print(&format!("/v1/devices/{id}"))?,
        Command::Tag {
            conn,
            id,
            add,
            remove,
        } => {
            let v = Client::new(conn).post_json(
                &format!("/v1/devices/{id}/tags"),
                &serde_json::json!({"add": add, "remove": remove}),
            )?;
            println!("{}", serde_json::to_string_pretty(&v)?);
        }
        Command::Group {
            conn,
            id,
            add,
            remove,
        } => {
            let v = Client::new(conn).post_json(
                &format!("/v1/devices/{id}/groups"),
                &serde_json::json!({"add": add, "remove": remove}),
            )?;
            println!("{}", serde_json::to_string_pretty(&v)?);
        }
        Command::Credentials { conn, id, revoke } => {
            let c = Client::new(conn);
            let path = format!("/v1/devices/{id}/credentials");
            if revoke {
                c.delete(&path)?;
                println!("revoked the broker credentials of {id}");
                return Ok(());
            }
            let v = c.post_json(&path, &serde_json::json!({}))?;
            let cr = &v["credentials"];
            let (user, pass) = (
                cr["username"].as_str().unwrap_or(&id),
                cr["password"].as_str().unwrap_or_default(),
            );
            if cr["rotated"] == true {
                eprintln!("rotated: the previous secret of {id} no longer works");
            }
            eprintln!("the secret is shown once; the server keeps only a salted hash");
            println!("[broker]\nusername = \"{user}\"\npassword = \"{pass}\"");
        }
        Command::Config {
            conn,
            id,
            telemetry_interval_s,
            drift_interval_s,
            psi_alarm,
            ks_alarm,
            chi2_p_alarm,
            min_samples,
        } => {
            let thresholds = match (psi_alarm, ks_alarm, chi2_p_alarm, min_samples) {
                (Some(p), Some(k), Some(c), Some(m)) => serde_json::json!({
                    "psi_alarm": p, "ks_alarm": k, "chi2_p_alarm": c, "min_samples": m
                }),
                _ => serde_json::Value::Null,
            };
            let v = Client::new(conn).post_json(
                &format!("/v1/devices/{id}/config"),
                &serde_json::json!({
                    "telemetry_interval_s": telemetry_interval_s,
                    "drift_interval_s": drift_interval_s,
                    "drift_thresholds": thresholds,
                }),
            )?;
            println!("{}", serde_json::to_string_pretty(&v)?);
        }
    }
    Ok(())
}
