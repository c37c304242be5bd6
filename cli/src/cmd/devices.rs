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
    }
    Ok(())
}
