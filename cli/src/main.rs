//! `edgefleet`: the operator's command line.
//!
//! Each subcommand family lives in one module under `cmd/` with an `Args`
//! struct (clap) and a `run` function; this file only wires them together.

mod cmd;

use clap::{Parser, Subcommand};

/// edgefleet: compile ONNX models for edge devices, sign them into bundles,
/// and roll them out to a fleet over MQTT.
#[derive(Parser)]
#[command(
    name = "edgefleet",
    version,
    about,
    long_about = None,
    after_help = "Examples:
  edgefleet demo                                   # a whole fleet on real models
  edgefleet serve --trust keys/release.pub.pem --token secret
  EDGEFLEET_TOKEN=secret edgefleet rollouts list
  edgefleet --log-level debug agent --config agent.toml"
)]
struct Cli {
    /// Logging (the same options and defaults as `edgefleet-agent`).
    #[command(flatten)]
    log: edgefleet_agent::logging::LogArgs,
    /// Fleet server URL, for the commands that talk to it (devices, bundles,
    /// rollouts); given before or after the subcommand.
    // Design: global, so `edgefleet --server URL bundles upload` works; each of
    // those commands also declares it (`cmd::bundles::Conn`, same id), and clap
    // hands the value given here down to it (a value on the command line beats
    // the environment and the default, wherever it was given).
    #[arg(
        long,
        global = true,
        env = "EDGEFLEET_SERVER",
        default_value = cmd::bundles::DEFAULT_SERVER,
        value_name = "URL"
    )]
    #[allow(dead_code)]
    server: String,
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// Generate an ed25519 signing key pair (PKCS#8 PEM).
    Keygen(cmd::keygen::Args),
    /// Pack, inspect, verify and delta-encode signed bundles.
    #[command(
        subcommand,
        after_help = "Examples:
  edgefleet bundle pack --key keys/release.pem --model vad --version 1.0.0 --release 1 \\
      --target rpi4 --file model.onnx --out vad-1.efb
  edgefleet bundle verify --trust keys/release.pub.pem vad-1.efb"
    )]
    Bundle(cmd::bundle::Command),
    /// Compile an ONNX model for a target profile into a signed bundle.
    Compile(Box<cmd::compile::Args>),
    /// Run the fleet server (REST API, MQTT broker, rollouts).
    Serve(cmd::serve::Args),
    /// Query and manage the device registry through the fleet API.
    #[command(
        subcommand,
        after_help = "Examples (the server and token from --server/--token or EDGEFLEET_SERVER/EDGEFLEET_TOKEN):
  edgefleet devices list --group line-3
  edgefleet devices show cam-17"
    )]
    Devices(cmd::devices::Command),
    /// Upload and list bundles through the fleet API.
    #[command(
        subcommand,
        after_help = "Examples:
  edgefleet bundles upload bundles/silero_vad-1.0.0-rpi4.efb
  edgefleet bundles list"
    )]
    Bundles(cmd::bundles::Command),
    /// Create, watch and control rollouts through the fleet API.
    #[command(
        subcommand,
        after_help = "Examples:
  edgefleet rollouts create --bundle 3f5a9c1e --group line-3
  edgefleet rollouts watch r-0001"
    )]
    Rollouts(cmd::rollouts::Command),
    /// Drift statistics per device and feature, with thresholds and verdicts.
    #[command(
        subcommand,
        after_help = "Examples:
  edgefleet drift show
  edgefleet drift show --device vad-rpi4-06 --feature output.logit"
    )]
    Drift(cmd::drift::Command),
    /// Retraining requests opened by the drift rule (open and closed, with members).
    #[command(
        subcommand,
        after_help = "Examples:
  edgefleet retraining list
  edgefleet retraining list --state open --json"
    )]
    Retraining(cmd::drift::RetrainingCommand),
    /// Data capture for retraining, per group (off by default).
    #[command(
        subcommand,
        after_help = "Examples:
  edgefleet capture enable --group line-3 --max-samples-per-alarm 200
  edgefleet capture request --group line-3 --samples 100
  edgefleet capture disable --group line-3"
    )]
    Capture(cmd::capture::Command),
    /// Versioned datasets cut from captured data.
    #[command(
        subcommand,
        after_help = "Examples:
  edgefleet datasets synth --task vad --samples 20000 --out data/vad
  edgefleet datasets create --group line-3 --model silero_vad
  edgefleet datasets list
  edgefleet datasets download ds-3f5a9c1e0b7d2a64 --out data/line-3"
    )]
    Datasets(cmd::datasets::Command),
    /// Verify a bundle, load it as the agent does, run it on golden or given inputs, time it.
    Run(Box<cmd::run::Args>),
    /// Retraining jobs: list, show, create, cancel (docs/loop.md).
    #[command(
        subcommand,
        after_help = "Examples:
  edgefleet jobs list
  edgefleet jobs show job-3f5a9c1e0b7d
  edgefleet jobs create --group line-3 --model silero_vad
  edgefleet jobs cancel job-3f5a9c1e0b7d"
    )]
    Jobs(cmd::jobs::Command),
    /// A/B experiments between two releases on a group (always-valid decisions, guardrails).
    #[command(
        subcommand,
        after_help = "Examples:
  edgefleet experiments create --group line-3 --control 3f5a9c --candidate 8e21d0
  edgefleet experiments list
  edgefleet experiments show exp-3f5a9c1e0b7d
  edgefleet experiments cancel exp-3f5a9c1e0b7d"
    )]
    Experiments(cmd::experiments::Command),
    /// A training worker: pull retraining jobs from the server, train, compile, upload.
    Worker(Box<cmd::worker::Args>),
    /// Train a full-size (teacher) or compact model on a dataset folder; export ONNX.
    Train(Box<cmd::train::TrainArgs>),
    /// Distil a compact student from a trained teacher (Hinton et al. 2015); export ONNX.
    Distill(Box<cmd::train::DistillArgs>),
    /// Run a whole fleet on real models: compile, serve, 20+ agents, rollouts, drift.
    Demo(cmd::demo::Args),
    /// Run the device agent (same code as the `edgefleet-agent` binary).
    Agent(cmd::agent::Args),
}

fn main() -> std::process::ExitCode {
    let cli = Cli::parse();
    // The same setup as the `edgefleet-agent` binary (info for edgefleet crates).
    if let Err(e) = edgefleet_agent::logging::init(&cli.log) {
        eprintln!("error: {e}");
        return std::process::ExitCode::from(2);
    }
    let result = match cli.command {
        Command::Keygen(a) => cmd::keygen::run(a),
        Command::Bundle(c) => cmd::bundle::run(c),
        Command::Compile(a) => cmd::compile::run(*a),
        Command::Serve(a) => cmd::serve::run(a),
        Command::Devices(c) => cmd::devices::run(c),
        Command::Bundles(c) => cmd::bundles::run(c),
        Command::Rollouts(c) => cmd::rollouts::run(c),
        Command::Drift(c) => cmd::drift::run(c),
        Command::Retraining(c) => cmd::drift::run_retraining(c),
        Command::Capture(c) => cmd::capture::run(c),
        Command::Datasets(c) => cmd::datasets::run(c),
        Command::Run(a) => cmd::run::run(*a),
        Command::Jobs(c) => cmd::jobs::run(c),
        Command::Experiments(c) => cmd::experiments::run(c),
        Command::Worker(a) => cmd::worker::run(*a),
        Command::Train(a) => cmd::train::run_train(*a),
        Command::Distill(a) => cmd::train::run_distill(*a),
        Command::Demo(a) => cmd::demo::run(a),
        Command::Agent(a) => cmd::agent::run(a),
    };
    match result {
        Ok(()) => std::process::ExitCode::SUCCESS,
        Err(e) => {
            // Bundle rejections carry a stable code (tests and scripts match on it).
            match e
                .chain()
                .find_map(|c| c.downcast_ref::<edgefleet_bundle::Error>())
            {
                Some(be) => eprintln!("error[{}]: {}", be.code(), one_line(&e)),
                None => eprintln!("error: {}", one_line(&e)),
            }
            std::process::ExitCode::FAILURE
        }
    }
}

/// The error chain on one line, each cause once: the library errors print their
/// source in their own message (`key.pem: No such file or directory`), which
/// anyhow's `{:#}` would repeat.
fn one_line(e: &anyhow::Error) -> String {
    let mut out = String::new();
    for cause in e.chain() {
        let s = cause.to_string();
        if out.contains(&s) {
            continue;
        }
        if !out.is_empty() {
            out.push_str(": ");
        }
        out.push_str(&s);
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;
    use clap::CommandFactory as _;

    /// Every command below `edgefleet`, by its full name, with whether its help
    /// (short or long) has an `Example` section.
    fn walk(cmd: &clap::Command, path: &str, out: &mut Vec<(String, bool)>) {
        for sub in cmd.get_subcommands() {
            let name = format!("{path} {}", sub.get_name());
            let help = [sub.get_after_help(), sub.get_after_long_help()];
            let has = help
                .iter()
                .flatten()
                .any(|h| h.to_string().contains("Example"));
            out.push((name.clone(), has));
            walk(sub, &name, out);
        }
    }

    #[test]
    fn every_subcommand_has_an_example() {
        let cmd = Cli::command();
        cmd.clone().debug_assert();
        let mut all = Vec::new();
        walk(&cmd, "edgefleet", &mut all);
        let missing: Vec<&str> = all
            .iter()
            .filter(|(_, has)| !has)
            .map(|(n, _)| n.as_str())
            .collect();
        assert!(all.len() > 25, "walked only {} commands", all.len());
        assert_eq!(
            missing,
            Vec::<&str>::new(),
            "subcommands without an example"
        );
    }

    fn server_of(args: &[&str]) -> String {
        let cli = Cli::try_parse_from(args).expect("parses");
        match cli.command {
            Command::Bundles(cmd::bundles::Command::Upload { conn, .. }) => conn.server,
            _ => panic!("not bundles upload"),
        }
    }

    #[test]
    fn server_is_a_global_option() {
        let up = ["bundles", "upload", "--token", "t", "a.efb"];
        let before: Vec<&str> = ["edgefleet", "--server", "http://fleet:9000"]
            .into_iter()
            .chain(up)
            .collect();
        assert_eq!(server_of(&before), "http://fleet:9000");
        let after: Vec<&str> = ["edgefleet"]
            .into_iter()
            .chain(up)
            .chain(["--server", "http://fleet:9001"])
            .collect();
        assert_eq!(server_of(&after), "http://fleet:9001");
        if std::env::var_os("EDGEFLEET_SERVER").is_none() {
            let none: Vec<&str> = ["edgefleet"].into_iter().chain(up).collect();
            assert_eq!(server_of(&none), cmd::bundles::DEFAULT_SERVER);
        }
    }

    #[test]
    fn log_level_defaults_to_the_agent_binary_default() {
        let cli =
            Cli::try_parse_from(["edgefleet", "agent", "--config", "a.toml"]).expect("parses");
        if std::env::var_os(edgefleet_agent::logging::ENV).is_none() {
            assert_eq!(cli.log.log_level, edgefleet_agent::logging::DEFAULT_LEVEL);
        }
        let cli = Cli::try_parse_from([
            "edgefleet",
            "agent",
            "--config",
            "a.toml",
            "--log-level",
            "debug",
        ])
        .expect("the flag is global");
        assert_eq!(cli.log.log_level, "debug");
    }
}
