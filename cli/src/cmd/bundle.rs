//! `edgefleet bundle pack | inspect | verify | delta | extract`.

use std::path::{Path, PathBuf};

use anyhow::{bail, Context};
use edgefleet_bundle::{
    delta, fsio, AgentVersionCheck, BundleBuilder, Policy, ReleaseFloor, SigningKey, TargetCheck,
    TrustStore, UnverifiedBundle, VerifiedBundle,
};

/// Subcommands of `edgefleet bundle`.
#[derive(clap::Subcommand)]
pub enum Command {
    /// Pack payload files into a signed bundle.
    #[command(
        after_help = "Example:\n  edgefleet bundle pack --key keys/release.pem --model vad --version 1.0.0 \\\n    \
        --release 1 --target rpi4 --file model.onnx --file notes.txt=README.txt --out vad-1.efb\n  \
        tar --zstd -tf vad-1.efb   # lists manifest.json, manifest.sig, README.txt, model.onnx"
    )]
    Pack(PackArgs),
    /// Print a bundle's manifest WITHOUT verifying it.
    #[command(after_help = "Example:\n  edgefleet bundle inspect vad-1.efb")]
    Inspect {
        /// Bundle file.
        bundle: PathBuf,
    },
    /// Verify a bundle's signature, policy and every payload hash.
    #[command(
        after_help = "Examples:\n  edgefleet bundle verify --trust keys/release.pub.pem vad-1.efb\n  \
        edgefleet bundle verify --trust keys/release.pub.pem --target rpi4 --min-release 1 vad-2.efb\n  \
        edgefleet bundle verify --trust keys/release.pub.pem --base vad-1.efb vad-1-to-2.delta.efb"
    )]
    Verify(VerifyArgs),
    /// Encode a new bundle as a signed delta against a base bundle (zstd patch-from).
    #[command(
        after_help = "Example:\n  edgefleet bundle delta --trust keys/release.pub.pem --key keys/release.pem \\\n    \
        --base vad-1.efb --new vad-2.efb --out vad-1-to-2.delta.efb"
    )]
    Delta(DeltaArgs),
    /// Verify a bundle and write its payload files into a directory.
    #[command(
        after_help = "Example:\n  edgefleet bundle extract --trust keys/release.pub.pem vad-1.efb --out /tmp/vad1"
    )]
    Extract {
        #[command(flatten)]
        verify: VerifyArgs,
        /// Output directory.
        #[arg(long)]
        out: PathBuf,
    },
}

/// Arguments of `edgefleet bundle pack`.
#[derive(clap::Args)]
pub struct PackArgs {
    /// Private signing key (PKCS#8 PEM).
    #[arg(long)]
    pub key: PathBuf,
    /// Model name.
    #[arg(long)]
    pub model: String,
    /// Semantic version.
    #[arg(long)]
    pub version: semver::Version,
    /// Release counter (must increase with every release of this model).
    #[arg(long)]
    pub release: u64,
    /// Target profile id (repeatable).
    #[arg(long = "target", required = true)]
    pub targets: Vec<String>,
    /// Payload file: PATH or PATH=NAME_IN_BUNDLE (repeatable).
    #[arg(long = "file", required = true)]
    pub files: Vec<String>,
    /// Oldest agent version that may run it.
    #[arg(long, default_value = "0.1.0")]
    pub min_agent_version: semver::Version,
    /// Chunk size in bytes (power of two, 1024..=131072).
    #[arg(long, default_value_t = edgefleet_bundle::DEFAULT_CHUNK_SIZE)]
    pub chunk_size: u32,
    /// zstd level.
    #[arg(long, default_value_t = edgefleet_bundle::pack::DEFAULT_ZSTD_LEVEL)]
    pub level: i32,
    /// Output bundle file.
    #[arg(long)]
    pub out: PathBuf,
}

/// Trust and policy options shared by verify, delta and extract.
#[derive(clap::Args)]
pub struct VerifyArgs {
    /// Trusted public key (SPKI PEM) or trust store (JSON); repeatable.
    #[arg(long = "trust", required = true)]
    pub trust: Vec<PathBuf>,
    /// Key id to treat as revoked (repeatable).
    #[arg(long = "revoked")]
    pub revoked: Vec<String>,
    /// Require this target profile id (as a device would).
    #[arg(long)]
    pub target: Option<String>,
    /// Require a release counter above this floor (as a device would).
    #[arg(long)]
    pub min_release: Option<u64>,
    /// Check min_agent_version against this agent version.
    #[arg(long)]
    pub agent_version: Option<semver::Version>,
    /// Base bundle, for verifying a delta.
    #[arg(long)]
    pub base: Option<PathBuf>,
    /// The bundle to verify.
    pub bundle: PathBuf,
}

/// Arguments of `edgefleet bundle delta`.
#[derive(clap::Args)]
pub struct DeltaArgs {
    /// Trusted public key or trust store used to verify both inputs; repeatable.
    #[arg(long = "trust", required = true)]
    pub trust: Vec<PathBuf>,
    /// Private key that signs the delta.
    #[arg(long)]
    pub key: PathBuf,
    /// The bundle the device holds.
    #[arg(long)]
    pub base: PathBuf,
    /// The new bundle.
    #[arg(long)]
    pub new: PathBuf,
    /// zstd level.
    #[arg(long, default_value_t = edgefleet_bundle::pack::DEFAULT_ZSTD_LEVEL)]
    pub level: i32,
    /// Output delta file.
    #[arg(long)]
    pub out: PathBuf,
}

/// Loads and merges trust stores, then applies revocations.
pub fn load_trust(paths: &[PathBuf], revoked: &[String]) -> anyhow::Result<TrustStore> {
    let mut ts = TrustStore::new();
    for p in paths {
        ts.merge(TrustStore::load(p)?);
    }
    for r in revoked {
        let id = edgefleet_bundle::KeyId::try_from(r.clone()).map_err(anyhow::Error::msg)?;
        ts.revoke(&id)?;
    }
    Ok(ts)
}

fn verify_file(
    path: &Path,
    ts: &TrustStore,
    policy: &Policy,
    base: Option<&Path>,
) -> anyhow::Result<VerifiedBundle> {
    let ub = UnverifiedBundle::read(path)?;
    let vb = if ub.manifest_unverified().is_delta() {
        let Some(base) = base else {
            bail!(
                "{} is a delta bundle: pass --base with the bundle it was made from",
                path.display()
            );
        };
        let base = UnverifiedBundle::read(base)?.verify(ts, &Policy::publisher())?;
        ub.verify_delta(ts, policy, base.payload_tar())?
    } else {
        ub.verify(ts, policy)?
    };
    Ok(vb)
}

/// Verifies the bundle of `a` under its trust and policy options.
pub(super) fn verify_args(a: &VerifyArgs) -> anyhow::Result<VerifiedBundle> {
    let ts = load_trust(&a.trust, &a.revoked)?;
    let policy = Policy {
        target: a
            .target
            .clone()
            .map_or(TargetCheck::AnyTarget, TargetCheck::Device),
        release: a
            .min_release
            .map_or(ReleaseFloor::NotApplicable, ReleaseFloor::Above),
        agent: a
            .agent_version
            .clone()
            .map_or(AgentVersionCheck::NotAnAgent, AgentVersionCheck::Agent),
    };
    verify_file(&a.bundle, &ts, &policy, a.base.as_deref())
        .with_context(|| format!("{} rejected", a.bundle.display()))
}

/// Runs `edgefleet bundle ...`.
pub fn run(cmd: Command) -> anyhow::Result<()> {
    match cmd {
        Command::Pack(a) => {
            let key = SigningKey::from_pkcs8_pem_file(&a.key)?;
            let mut b = BundleBuilder::new(a.model, a.version, a.release)
                .min_agent_version(a.min_agent_version)
                .chunk_size(a.chunk_size)
                .zstd_level(a.level);
            for t in a.targets {
                b = b.target(t);
            }
            for f in &a.files {
                let (path, name) = match f.split_once('=') {
                    Some((p, n)) => (PathBuf::from(p), n.to_string()),
                    None => {
                        let p = PathBuf::from(f);
                        let n = p
                            .file_name()
                            .with_context(|| format!("--file {f}: no file name"))?
                            .to_string_lossy()
                            .into_owned();
                        (p, n)
                    }
                };
                b = b.file(name, fsio::read(&path)?);
            }
            let bytes = b.build(&key)?;
            fsio::write_atomic(&a.out, &bytes)?;
            println!(
                "wrote {} ({} bytes, signed by {})",
                a.out.display(),
                bytes.len(),
                key.key_id()
            );
            Ok(())
        }
        Command::Inspect { bundle } => {
            let ub = UnverifiedBundle::read(&bundle)?;
            println!(
                "# NOT VERIFIED: use `edgefleet bundle verify` before trusting anything below"
            );
            println!(
                "{}",
                String::from_utf8_lossy(ub.signed_manifest().manifest_bytes())
            );
            Ok(())
        }
        Command::Verify(a) => {
            let vb = verify_args(&a)?;
            let m = vb.manifest();
            println!(
                "OK {} {} release {} targets {} signed by {} ({} files, {} payload bytes{})",
                m.model,
                m.version,
                m.release,
                m.targets.join(","),
                m.key_id,
                m.files.len(),
                m.payload.size,
                if m.is_delta() { ", delta" } else { "" }
            );
            Ok(())
        }
        Command::Delta(a) => {
            let ts = load_trust(&a.trust, &[])?;
            let key = SigningKey::from_pkcs8_pem_file(&a.key)?;
            let base = verify_file(&a.base, &ts, &Policy::publisher(), None)?;
            let new = verify_file(&a.new, &ts, &Policy::publisher(), None)?;
            let bytes = delta::make_delta(&base, &new, &key, a.level)?;
            fsio::write_atomic(&a.out, &bytes)?;
            let full = new.to_bytes()?.len();
            println!(
                "wrote {} ({} bytes; full bundle {} bytes; ratio {:.3})",
                a.out.display(),
                bytes.len(),
                full,
                bytes.len() as f64 / full as f64
            );
            Ok(())
        }
        Command::Extract { verify, out } => {
            let vb = verify_args(&verify)?;
            vb.install_files(&out)?;
            println!(
                "extracted {} files to {}",
                vb.file_names().count(),
                out.display()
            );
            Ok(())
        }
    }
}
