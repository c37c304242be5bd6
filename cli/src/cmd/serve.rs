//! `edgefleet serve` (not implemented yet).

/// Arguments of `edgefleet serve`.
#[derive(clap::Args)]
pub struct Args {}

/// Runs `edgefleet serve`.
pub fn run(_args: Args) -> anyhow::Result<()> {
    anyhow::bail!("edgefleet serve is not implemented yet")
}
