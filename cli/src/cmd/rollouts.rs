//! `edgefleet rollouts` (not implemented yet).

/// Subcommands of `edgefleet rollouts`.
#[derive(clap::Subcommand)]
pub enum Command {
    /// Not implemented yet.
    List,
}

/// Runs `edgefleet rollouts`.
pub fn run(_cmd: Command) -> anyhow::Result<()> {
    anyhow::bail!("edgefleet rollouts is not implemented yet")
}
