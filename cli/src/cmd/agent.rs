//! `edgefleet agent`: the device daemon, the same code as the `edgefleet-agent`
//! binary (`edgefleet_agent::agent::run`), so one executable can play both
//! roles (the demo starts its devices this way).

use std::path::PathBuf;

use anyhow::Context as _;

/// Arguments of `edgefleet agent`.
#[derive(clap::Args)]
#[command(after_help = "Example:\n  edgefleet agent --config /etc/edgefleet/agent.toml")]
pub struct Args {
    /// Path to agent.toml (see docs/agent.md).
    #[arg(long, env = "EDGEFLEET_AGENT_CONFIG")]
    pub config: PathBuf,
}

/// Runs the agent until SIGTERM or SIGINT.
pub fn run(args: Args) -> anyhow::Result<()> {
    let cfg = edgefleet_agent::config::Config::load(&args.config)?;
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .context("tokio runtime")?;
    rt.block_on(async move {
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
                _ = term.recv() => {}
                _ = int.recv() => {}
            }
            let _ = tx.send(true);
        });
        edgefleet_agent::agent::run(cfg, rx).await
    })?;
    Ok(())
}
