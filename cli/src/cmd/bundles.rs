//! `edgefleet bundles` (not implemented yet).

/// Subcommands of `edgefleet bundles`.
#[derive(clap::Subcommand)]
pub enum Command {
    /// Not implemented yet.
    List,
}

/// Runs `edgefleet bundles`.
pub fn run(_cmd: Command) -> anyhow::Result<()> {
    anyhow::bail!("edgefleet bundles is not implemented yet")
}
