//! `edgefleet`: the operator's command line.
//!
//! Each subcommand family lives in one module under `cmd/` with an `Args`
//! struct (clap) and a `run` function; this file only wires them together.

mod cmd;

use clap::{Parser, Subcommand};

/// edgefleet: compile ONNX models for edge devices, sign them into bundles,
/// and roll them out to a fleet over MQTT.
#[derive(Parser)]
#[command(name = "edgefleet", version, about, long_about = None)]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// Generate an ed25519 signing key pair (PKCS#8 PEM).
    Keygen(cmd::keygen::Args),
    /// Pack, inspect, verify and delta-encode signed bundles.
    #[command(subcommand)]
    Bundle(cmd::bundle::Command),
    /// Compile an ONNX model for a target profile into a signed bundle.
    Compile(Box<cmd::compile::Args>),
    /// Run the fleet server (REST API, MQTT broker, rollouts).
    Serve(cmd::serve::Args),
    /// Query and manage the device registry through the fleet API.
    #[command(subcommand)]
    Devices(cmd::devices::Command),
    /// Upload and list bundles through the fleet API.
    #[command(subcommand)]
    Bundles(cmd::bundles::Command),
    /// Create, watch and control rollouts through the fleet API.
    #[command(subcommand)]
    Rollouts(cmd::rollouts::Command),
    /// Run a whole fleet on real models: compile, serve, 20+ agents, rollouts, drift.
    Demo(cmd::demo::Args),
    /// Run the device agent (same code as the `edgefleet-agent` binary).
    Agent(cmd::agent::Args),
}

fn main() -> std::process::ExitCode {
    tracing_subscriber::fmt()
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_env("EDGEFLEET_LOG")
                // rumqttd logs every client disconnect at ERROR: not news for an operator.
                .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("warn,rumqttd=off")),
        )
        .with_writer(std::io::stderr)
        // Colour only on a terminal: logs redirected to a file stay plain text.
        .with_ansi(std::io::IsTerminal::is_terminal(&std::io::stderr()))
        .init();
    let cli = Cli::parse();
    let result = match cli.command {
        Command::Keygen(a) => cmd::keygen::run(a),
        Command::Bundle(c) => cmd::bundle::run(c),
        Command::Compile(a) => cmd::compile::run(*a),
        Command::Serve(a) => cmd::serve::run(a),
        Command::Devices(c) => cmd::devices::run(c),
        Command::Bundles(c) => cmd::bundles::run(c),
        Command::Rollouts(c) => cmd::rollouts::run(c),
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
