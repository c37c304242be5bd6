//! `edgefleet keygen`: a new ed25519 signing key pair.

use std::path::PathBuf;

use anyhow::{bail, Context};
use edgefleet_bundle::SigningKey;

/// Arguments of `edgefleet keygen`.
#[derive(clap::Args)]
#[command(after_help = "Example:\n  edgefleet keygen --out keys/release\n  \
    # writes keys/release.pem (PKCS#8, mode 0600) and keys/release.pub.pem (SPKI)\n  \
    openssl pkey -in keys/release.pem -noout -text   # OpenSSL reads both")]
pub struct Args {
    /// Path stem: writes STEM.pem (private, mode 0600) and STEM.pub.pem (public).
    #[arg(long)]
    pub out: PathBuf,
    /// Overwrite existing key files.
    #[arg(long)]
    pub force: bool,
}

/// Runs `edgefleet keygen`.
pub fn run(args: Args) -> anyhow::Result<()> {
    let private = args.out.with_extension("pem");
    let public = args.out.with_extension("pub.pem");
    for p in [&private, &public] {
        if p.exists() && !args.force {
            bail!("{} exists; pass --force to overwrite", p.display());
        }
    }
    if let Some(dir) = private.parent().filter(|d| !d.as_os_str().is_empty()) {
        std::fs::create_dir_all(dir).with_context(|| format!("creating {}", dir.display()))?;
    }
    let key = SigningKey::generate();
    key.write_pem_files(&private, &public)?;
    println!("key id     {}", key.key_id());
    println!("private    {} (mode 0600)", private.display());
    println!("public     {}", public.display());
    Ok(())
}
