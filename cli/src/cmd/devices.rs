//! `edgefleet devices` (not implemented yet).

/// Subcommands of `edgefleet devices`.
#[derive(clap::Subcommand)]
pub enum Command {
    /// Not implemented yet.
    List,
}

/// Runs `edgefleet devices`.
pub fn run(_cmd: Command) -> anyhow::Result<()> {
    anyhow::bail!("edgefleet devices is not implemented yet")
}
