//! `edgefleet devices`: the device registry through the fleet API.

use super::bundles::Client;

/// Subcommands of `edgefleet devices`.
#[derive(clap::Subcommand)]
pub enum Command {
    /// List devices (optionally filtered): a table (id, online, target, active release,
    /// update state, last seen, groups, tags), or the API's JSON with --json.
    #[command(after_help = "Examples:
  edgefleet devices list
  edgefleet devices list --group line-3 --target rpi4
  edgefleet devices list --json | jq -r '.devices[] | select(.online) | .id'")]
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
        /// Print the API's JSON instead of a table.
        #[arg(long)]
        json: bool,
    },
    /// Show one device (JSON: registry entry and its rollouts).
    #[command(after_help = "Example:
  edgefleet devices show cam-17")]
    Show {
        /// Server connection.
        #[command(flatten)]
        conn: super::bundles::Conn,
        /// Device id.
        id: String,
    },
    /// Add or remove operator tags.
    #[command(after_help = "Example:
  edgefleet devices tag cam-17 --add canary --remove line-2")]
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
    #[command(after_help = "Example:
  edgefleet devices group cam-17 --add line-3   # then: edgefleet rollouts create --group line-3 ...")]
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

  edgefleet devices credentials cam-17 --broker-url mqtt://10.0.0.5:1884 > cam-17.broker.toml

It prints a complete [broker] table (url, username, password) for the agent's agent.toml:
replace that file's [broker] table with it. Running it again rotates the secret: the
device's current password stops working.
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
        /// MQTT URL the agent connects to, printed as the table's `url`
        /// [default: the --server host, port 1884 (`serve`'s default --mqtt-port)].
        #[arg(long, value_name = "URL")]
        broker_url: Option<String>,
    },
    /// Change a device's runtime settings (sent as `Down::Config`, QoS 1; the
    /// agent persists them and applies them without a restart). Capture is set
    /// per group: `edgefleet capture enable --group G`.
    #[command(after_help = "Examples:
  edgefleet devices config cam-17 --telemetry-interval-s 10
  edgefleet devices config cam-17 --drift-alpha 0.001                  # fewer false alarms per evaluation
  edgefleet devices config cam-17 --drift-alpha 0.01 --drift-correction benjamini-hochberg --drift-min-samples 400")]
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
        /// Drift test: false-alarm probability of one evaluation across all
        /// tests, (0, 0.5]. Sends the whole test configuration (the other
        /// --drift-* options at their defaults unless given).
        #[arg(long)]
        drift_alpha: Option<f64>,
        /// Drift test: multiple-test correction.
        #[arg(
            long,
            value_enum,
            default_value = "bonferroni",
            requires = "drift_alpha"
        )]
        drift_correction: CorrectionArg,
        /// Drift test: fewest window samples for a verdict (>= 1).
        #[arg(long, default_value_t = 100.0, requires = "drift_alpha")]
        drift_min_samples: f64,
        /// Drift test: fewest effective samples per bin for a verdict (>= 0).
        #[arg(long, default_value_t = 5.0, requires = "drift_alpha")]
        drift_min_effective_per_bin: f64,
    },
}

/// `--drift-correction` values.
#[derive(clap::ValueEnum, Clone, Copy, Debug)]
pub enum CorrectionArg {
    /// Each test at alpha / tests (family-wise rate <= alpha).
    Bonferroni,
    /// Benjamini-Hochberg step-up (false discovery rate <= alpha).
    BenjaminiHochberg,
    /// No correction (only for a single test).
    None,
}

impl From<CorrectionArg> for edgefleet_drift::Correction {
    fn from(c: CorrectionArg) -> Self {
        match c {
            CorrectionArg::Bonferroni => Self::Bonferroni,
            CorrectionArg::BenjaminiHochberg => Self::BenjaminiHochberg,
            CorrectionArg::None => Self::None,
        }
    }
}

/// Runs `edgefleet devices`.
pub fn run(cmd: Command) -> anyhow::Result<()> {
    match cmd {
        Command::List {
            conn,
            group,
            tag,
            target,
            json,
        } => {
            let c = Client::new(conn);
            let mut q = Vec::new();
            for (k, v) in [("group", group), ("tag", tag), ("target", target)] {
                if let Some(v) = v {
                    q.push((k, v));
                }
            }
            let v = c.get("/v1/devices", &q)?;
            if json {
                println!("{}", serde_json::to_string_pretty(&v)?);
            } else {
                print!("{}", list_table(&v, super::table::now_ms()));
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
        Command::Credentials {
            conn,
            id,
            revoke,
            broker_url,
        } => {
            let broker_url = broker_url.unwrap_or_else(|| default_broker_url(&conn.server));
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
            print!("{}", broker_table(&broker_url, user, pass));
        }
        Command::Config {
            conn,
            id,
            telemetry_interval_s,
            drift_interval_s,
            drift_alpha,
            drift_correction,
            drift_min_samples,
            drift_min_effective_per_bin,
        } => {
            let drift_test = drift_alpha.map(|alpha| edgefleet_drift::TestConfig {
                alpha,
                correction: drift_correction.into(),
                min_samples: drift_min_samples,
                min_effective_per_bin: drift_min_effective_per_bin,
                ..edgefleet_drift::TestConfig::default()
            });
            let v = Client::new(conn).post_json(
                &format!("/v1/devices/{id}/config"),
                &serde_json::json!({
                    "telemetry_interval_s": telemetry_interval_s,
                    "drift_interval_s": drift_interval_s,
                    "drift_test": drift_test,
                }),
            )?;
            println!("{}", serde_json::to_string_pretty(&v)?);
        }
    }
    Ok(())
}

/// The embedded broker's URL on the host of `server` (the API URL), at
/// `serve`'s default MQTT port.
pub fn default_broker_url(server: &str) -> String {
    let host = reqwest::Url::parse(server)
        .ok()
        .and_then(|u| u.host_str().map(str::to_string))
        .unwrap_or_else(|| "127.0.0.1".into());
    format!("mqtt://{host}:1884")
}

/// The agent.toml `[broker]` table `devices credentials` prints (JSON string
/// escapes are valid TOML basic strings).
pub fn broker_table(url: &str, user: &str, pass: &str) -> String {
    let q = |s: &str| serde_json::Value::from(s).to_string();
    format!(
        "[broker]\nurl = {}\nusername = {}\npassword = {}\n",
        q(url),
        q(user),
        q(pass)
    )
}

/// A release for people: `model version (release N)`, `-` when none.
pub fn release(r: &serde_json::Value) -> String {
    match r.as_object() {
        Some(a) => format!(
            "{} {} (release {})",
            a.get("model").and_then(|m| m.as_str()).unwrap_or("?"),
            a.get("version").and_then(|m| m.as_str()).unwrap_or("?"),
            a.get("release").unwrap_or(&serde_json::Value::Null)
        ),
        None => "-".into(),
    }
}

/// The `devices list` table of a `GET /v1/devices` answer, times relative to `now_ms`.
pub fn list_table(v: &serde_json::Value, now_ms: u64) -> String {
    use super::table;
    let rows: Vec<Vec<String>> = v["devices"]
        .as_array()
        .into_iter()
        .flatten()
        .map(|d| {
            let mut tags: Vec<serde_json::Value> = Vec::new();
            for k in ["tags", "operator_tags"] {
                tags.extend(d[k].as_array().into_iter().flatten().cloned());
            }
            vec![
                d["id"].as_str().unwrap_or("").to_string(),
                if d["online"] == true { "yes" } else { "no" }.to_string(),
                d["target"].as_str().unwrap_or("-").to_string(),
                release(&d["active"]),
                d["update_state"].as_str().unwrap_or("-").to_string(),
                table::ago(now_ms, d["last_seen_ms"].as_u64().unwrap_or(0)),
                table::list(&d["groups"]),
                table::list(&serde_json::Value::Array(tags)),
            ]
        })
        .collect();
    table::render(
        &[
            "id",
            "online",
            "target",
            "active",
            "state",
            "last seen",
            "groups",
            "tags",
        ],
        &rows,
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn credentials_print_a_complete_broker_table() {
        assert_eq!(
            default_broker_url("http://127.0.0.1:8080"),
            "mqtt://127.0.0.1:1884"
        );
        assert_eq!(
            default_broker_url("https://fleet.example:443/"),
            "mqtt://fleet.example:1884"
        );
        assert_eq!(default_broker_url("not a url"), "mqtt://127.0.0.1:1884");
        let t = broker_table("mqtt://127.0.0.1:1884", "cam-01", "ab\"c");
        assert_eq!(
            t,
            "[broker]\nurl = \"mqtt://127.0.0.1:1884\"\nusername = \"cam-01\"\npassword = \"ab\\\"c\"\n"
        );
    }

    #[test]
    fn the_list_is_a_table_with_releases_and_ages() {
        let now = 1_700_000_000_000u64;
        let v = serde_json::json!({"devices": [
            {"id": "cam-01", "online": true, "target": "rpi4",
             "active": {"model": "silero_vad", "release": 2, "version": "1.1.0"},
             "update_state": "idle", "last_seen_ms": now - 4_000,
             "groups": ["line-3"], "tags": ["dock"], "operator_tags": ["canary"]},
            {"id": "cam-02", "online": false, "target": null, "active": null,
             "update_state": null, "last_seen_ms": now - 7_260_000,
             "groups": [], "tags": [], "operator_tags": []}
        ]});
        assert_eq!(
            list_table(&v, now),
            "id      online  target  active                        state  last seen  groups  tags\n\
             cam-01  yes     rpi4    silero_vad 1.1.0 (release 2)  idle   4s ago     line-3  dock,canary\n\
             cam-02  no      -       -                             -      2h 1m ago  -       -\n"
        );
    }
}
