//! `edgefleet-agent --config agent.toml [--log-level LEVEL]`
//!
//! Logging is set up by `edgefleet_agent::logging`, the same as for
//! `edgefleet agent`: info for the edgefleet crates unless `--log-level` or
//! `EDGEFLEET_LOG` says otherwise.

use std::path::PathBuf;

use clap::Parser;
use edgefleet_agent::logging::LogArgs;

/// edgefleet device agent.
#[derive(Debug, Parser)]
#[command(
    version,
    about,
    after_help = "Examples:
  edgefleet-agent --config /etc/edgefleet/agent.toml
  edgefleet-agent --config agent.toml --log-level debug
  EDGEFLEET_LOG=info,edgefleet_agent::update=debug edgefleet-agent --config agent.toml"
)]
struct Args {
    /// Path to agent.toml (see docs/agent.md).
    #[arg(long, env = "EDGEFLEET_AGENT_CONFIG")]
    config: PathBuf,
    /// Logging.
    #[command(flatten)]
    log: LogArgs,
}

fn main() -> std::process::ExitCode {
    let args = Args::parse();
    if let Err(e) = edgefleet_agent::logging::init(&args.log) {
        eprintln!("error: {e}");
        return std::process::ExitCode::from(2);
    }
    let cfg = match edgefleet_agent::config::Config::load(&args.config) {
        Ok(c) => c,
        Err(e) => {
            eprintln!("error: {e}");
            return std::process::ExitCode::from(2);
        }
    };
    let rt = match tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
    {
        Ok(rt) => rt,
        Err(e) => {
            eprintln!("error: tokio runtime: {e}");
            return std::process::ExitCode::FAILURE;
        }
    };
    let res = rt.block_on(async move {
        let (tx, rx) = tokio::sync::watch::channel(false);
        tokio::spawn(async move {
            use tokio::signal::unix::{signal, SignalKind};
            let (Ok(mut term), Ok(mut int)) = (
                signal(SignalKind::terminate()),
                signal(SignalKind::interrupt()),
            ) else {
                return;
            };
            tokio::select! {
                _ = term.recv() => tracing::info!("SIGTERM"),
                _ = int.recv() => tracing::info!("SIGINT"),
            }
            let _ = tx.send(true);
        });
        edgefleet_agent::agent::run(cfg, rx).await
    });
    match res {
        Ok(()) => std::process::ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("error: {e:#}");
            std::process::ExitCode::FAILURE
        }
    }
}
