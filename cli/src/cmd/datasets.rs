//! `edgefleet datasets`: versioned datasets cut from captured data, through
//! the fleet API (docs/fleet-server.md, "Datasets").

use anyhow::{bail, Context as _};
use serde_json::{json, Value};

use super::bundles::{Client, Conn};
use super::table;

/// Subcommands of `edgefleet datasets`.
#[derive(clap::Subcommand)]
pub enum Command {
    /// Generate a dataset folder with exact labels (rendered text lines, or espeak-ng speech
    /// in noise), split train / validation / test by a seeded rule (docs/datasets.md).
    #[command(after_help = "Examples:
  edgefleet datasets synth --task text-direction --samples 4000 --unlabelled 2000 --out data/text
  edgefleet datasets synth --task vad --samples 20000 --unlabelled 10000 --seed 7 --out data/vad")]
    Synth {
        /// text-direction | vad.
        #[arg(long)]
        task: edgefleet_trainer::dataset::Task,
        /// Labelled samples.
        #[arg(long)]
        samples: usize,
        /// Teacher-only inputs (for distillation), from an independent stream.
        #[arg(long, default_value_t = 0)]
        unlabelled: usize,
        /// Generator and split seed.
        #[arg(long, default_value_t = 1)]
        seed: u64,
        /// Fraction of groups for validation.
        #[arg(long, default_value_t = 0.1)]
        validation: f64,
        /// Fraction of groups for test.
        #[arg(long, default_value_t = 0.1)]
        test: f64,
        /// Dataset folder to create (must not exist or be empty).
        #[arg(long)]
        out: std::path::PathBuf,
    },
    /// Check a dataset folder (manifest, sha256 of every file, shapes, dtypes, labels) and
    /// print its summary; exits non-zero naming the first bad file.
    #[command(after_help = "Example:
  edgefleet datasets check data/text")]
    Check {
        /// Dataset folder.
        dir: std::path::PathBuf,
    },
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
        Command::Synth {
            task,
            samples,
            unlabelled,
            seed,
            validation,
            test,
            out,
        } => synth(task, samples, unlabelled, seed, (validation, test), &out)?,
        Command::Check { dir } => check(&dir)?,
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

/// Group sizes of the seeded split: a text line upright and turned stay together; VAD windows
/// in runs of 32 (about 1 s of audio) so that neighbouring windows rarely straddle splits.
fn group_size(task: edgefleet_trainer::dataset::Task) -> usize {
    match task {
        edgefleet_trainer::dataset::Task::TextDirection => 2,
        edgefleet_trainer::dataset::Task::Vad => 32,
    }
}

fn synth(
    task: edgefleet_trainer::dataset::Task,
    samples: usize,
    unlabelled: usize,
    seed: u64,
    (validation, test): (f64, f64),
    out: &std::path::Path,
) -> anyhow::Result<()> {
    use edgefleet_trainer::dataset::{write_dataset, Provenance, SplitFractions, Task};
    use edgefleet_trainer::synth;
    let started = std::time::Instant::now();
    let gen = |n: usize, stream: u64| -> anyhow::Result<edgefleet_trainer::dataset::Examples> {
        Ok(match task {
            Task::TextDirection => synth::text::generate(n, seed, stream),
            Task::Vad => synth::vad::generate(n, seed, stream)?,
        })
    };
    let inputs = gen(samples, 0)?;
    let unl = if unlabelled > 0 {
        let mut u = gen(unlabelled, 1)?;
        u.y = None;
        Some(u)
    } else {
        None
    };
    let name = match task {
        Task::TextDirection => synth::text::NAME,
        Task::Vad => synth::vad::NAME,
    };
    let ds = write_dataset(
        out,
        task,
        &inputs,
        unl.as_ref(),
        Provenance::Generator {
            name: name.into(),
            parameters: json!({"samples": samples, "unlabelled": unlabelled}),
            seed,
        },
        SplitFractions {
            validation,
            test,
            group_size: group_size(task),
        },
        seed,
    )?;
    print_summary(&ds);
    println!("generated in {:.1} s", started.elapsed().as_secs_f64());
    Ok(())
}

fn check(dir: &std::path::Path) -> anyhow::Result<()> {
    let ds = edgefleet_trainer::dataset::Dataset::open(dir)?;
    print_summary(&ds);
    println!("ok: every file matches the manifest");
    Ok(())
}

fn print_summary(ds: &edgefleet_trainer::dataset::Dataset) {
    use edgefleet_trainer::dataset::SplitName;
    let m = ds.manifest();
    let count = |s| ds.indices(s).len();
    println!(
        "{} {} task {} ({} samples: {} train, {} validation, {} test; {} unlabelled)",
        ds.dir().display(),
        ds.id(),
        ds.task(),
        m.num_samples,
        count(SplitName::Train),
        count(SplitName::Validation),
        count(SplitName::Test),
        m.num_unlabelled
    );
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
