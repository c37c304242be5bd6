//! `edgefleet demo` (not implemented yet).

/// Arguments of `edgefleet demo`.
#[derive(clap::Args)]
pub struct Args {}

/// Runs `edgefleet demo`.
pub fn run(_args: Args) -> anyhow::Result<()> {
    anyhow::bail!("edgefleet demo is not implemented yet")
}
