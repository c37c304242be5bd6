//! `edgefleet compile` (not implemented yet).

/// Arguments of `edgefleet compile`.
#[derive(clap::Args)]
pub struct Args {}

/// Runs `edgefleet compile`.
pub fn run(_args: Args) -> anyhow::Result<()> {
    anyhow::bail!("edgefleet compile is not implemented yet")
}
