//! `edgefleet datasets`: versioned datasets cut from captured data, through
//! the fleet API (docs/fleet-server.md, "Datasets").

use anyhow::{bail, Context as _};
use serde_json::{json, Value};

use super::bundles::{Client, Conn};
use super::table;

/// Subcommands of `edgefleet datasets`.
#[derive(clap::Subcommand)]
pub enum Command {
    /// Cut a new version from every capture batch of a group and model (the same
    /// content again returns the existing version). Prints the dataset (JSON).
    #[command(after_help = "Example:
  edgefleet datasets create --group line-3 --model silero_vad")]
    Create {
        /// Server connection.
        #[command(flatten)]
        conn: Conn,
        /// Group.
        #[arg(long)]
        group: String,
        /// Model.
        #[arg(long)]
        model: String,
    },
    /// List datasets: id, group, model, version, batches, samples, labels, size,
    /// devices, content hash, when cut (the API's JSON with --json).
    #[command(after_help = "Examples:
  edgefleet datasets list
  edgefleet datasets list --json | jq -r '.datasets[] | select(.model == \"silero_vad\") | .id'")]
    List {
        /// Server connection.
        #[command(flatten)]
        conn: Conn,
        /// Print the API's JSON instead of a table.
        #[arg(long)]
        json: bool,
    },
    /// Show one dataset: provenance and batches (JSON).
    #[command(after_help = "Example:
  edgefleet datasets show ds-3f5a9c1e0b7d2a64")]
    Show {
        /// Server connection.
        #[command(flatten)]
        conn: Conn,
        /// Dataset id.
        id: String,
    },
    /// Download a dataset's batches into a directory (`<capture_id>.bin` each,
    /// every one checked against its SHA-256, and `dataset.json`).
    #[command(after_help = "Example:
  edgefleet datasets download ds-3f5a9c1e0b7d2a64 --out data/line-3-v1")]
    Download {
        /// Server connection.
        #[command(flatten)]
        conn: Conn,
        /// Dataset id.
        id: String,
        /// Directory to write into (created).
        #[arg(long)]
        out: std::path::PathBuf,
    },
}

/// Runs `edgefleet datasets`.
pub fn run(cmd: Command) -> anyhow::Result<()> {
    match cmd {
        Command::Create { conn, group, model } => {
            let v = Client::new(conn)
                .post_json("/v1/datasets", &json!({"group": group, "model": model}))?;
            if v["created"] == false {
                eprintln!("no new batch: this is the existing version");
            }
            println!("{}", serde_json::to_string_pretty(&v)?);
        }
        Command::List { conn, json } => {
            let v = Client::new(conn).get("/v1/datasets", &[])?;
            if json {
                println!("{}", serde_json::to_string_pretty(&v)?);
            } else {
                print!("{}", list_table(&v, table::now_ms()));
            }
        }
        Command::Show { conn, id } => Client::new(conn).print(&format!("/v1/datasets/{id}"))?,
        Command::Download { conn, id, out } => download(&Client::new(conn), &id, &out)?,
    }
    Ok(())
}

fn download(c: &Client, id: &str, out: &std::path::Path) -> anyhow::Result<()> {
    let v = c.get(&format!("/v1/datasets/{id}"), &[])?;
    let d = &v["dataset"];
    std::fs::create_dir_all(out).with_context(|| format!("creating {}", out.display()))?;
    for b in d["batches"].as_array().into_iter().flatten() {
        let cid = b["capture_id"]
            .as_str()
            .context("batch without capture_id")?;
        let bytes = c.get_bytes(&format!("/v1/datasets/{id}/batches/{cid}"))?;
        let sha = edgefleet_bundle::sha256(&bytes).to_hex();
        if sha != cid {
            bail!("batch {cid}: downloaded bytes have SHA-256 {sha}");
        }
        edgefleet_bundle::write_atomic(&out.join(format!("{cid}.bin")), &bytes)?;
    }
    let meta = serde_json::to_vec_pretty(d)?;
    edgefleet_bundle::write_atomic(&out.join("dataset.json"), &meta)?;
    println!(
        "{} batches of {id} in {}",
        d["batches"].as_array().map_or(0, Vec::len),
        out.display()
    );
    Ok(())
}

/// The `datasets list` table of a `GET /v1/datasets` answer.
pub fn list_table(v: &Value, now_ms: u64) -> String {
    let rows: Vec<Vec<String>> = v["datasets"]
        .as_array()
        .into_iter()
        .flatten()
        .map(|d| {
            let p = &d["provenance"];
            vec![
                d["id"].as_str().unwrap_or("").to_string(),
                d["group"].as_str().unwrap_or("").to_string(),
                d["model"].as_str().unwrap_or("").to_string(),
                d["version"].to_string(),
                p["batches"].to_string(),
                p["samples"].to_string(),
                p["labels"].to_string(),
                table::bytes(p["bytes"].as_u64().unwrap_or(0)),
                table::list(&p["devices"]),
                d["content_sha256"]
                    .as_str()
                    .unwrap_or("")
                    .chars()
                    .take(super::bundles::SHOWN_HASH_DIGITS)
                    .collect(),
                table::ago(now_ms, d["created_ms"].as_u64().unwrap_or(0)),
            ]
        })
        .collect();
    table::render(
        &[
            "id", "group", "model", "version", "batches", "samples", "labels", "size", "devices",
            "content", "cut",
        ],
        &rows,
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_list_is_a_table_with_provenance() {
        let now = 1_700_000_000_000u64;
        let v = json!({"datasets": [
            {"id": "ds-0123456789abcdef", "group": "line", "model": "vad", "version": 2,
             "content_sha256": "ab".repeat(32), "created_ms": now - 65_000,
             "provenance": {"batches": 3, "samples": 120, "labels": 7, "bytes": 3_145_728,
                            "devices": ["cam-01", "cam-02"]}}
        ]});
        assert_eq!(
            list_table(&v, now),
            "id                   group  model  version  batches  samples  labels  size     devices        content       cut\n\
             ds-0123456789abcdef  line   vad    2        3        120      7       3.0 MiB  cam-01,cam-02  abababababab  1m 5s ago\n"
        );
    }
}
