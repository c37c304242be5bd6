//! edgefleet's signed OTA bundle format (specified in `docs/specs/bundle.md`).
//!
//! A bundle is two concatenated zstd frames that together decompress to one
//! tar archive, so `tar --zstd -tf bundle.efb` lists it:
//!
//! ```text
//! +-------------------------------+----------------------------------------+
//! | head: zstd frame              | body: zstd frame                       |
//! |  tar entries manifest.json,   |  payload tar (model, golden vectors,   |
//! |  manifest.sig (no trailer)    |  drift profile, report) + trailer      |
//! +-------------------------------+----------------------------------------+
//! ```
//!
//! The manifest is signed (detached ed25519 over its exact bytes) and lists
//! the SHA-256 of the body, of every body chunk (so a transfer resumes and
//! checks each chunk) and of every payload file. Verification is a typestate:
//! [`UnverifiedBundle`] -> [`VerifiedBundle`]; only a [`VerifiedBundle`] can be
//! read or installed, and nothing turns verification off.
//!
//! Module map, one concept each:
//! - [`manifest`]: the signed document and its validation;
//! - [`keys`]: signing keys, key ids, the trust store, rotation and revocation;
//! - [`pack`]: building a bundle;
//! - [`verify`]: the typestate, policy (target, release counter, agent version);
//! - [`archive`]: bounded decompression and the hostile-entry checks;
//! - [`delta`]: zstd patch-from deltas;
//! - [`payload`]: the schemas of the payload files compiler and agent share;
//! - [`npy`]: the `.npy` tensor files of calibration sets and replayed inputs;
//! - [`fsio`]: crash-safe file writes.

pub mod archive;
pub mod delta;
mod error;
pub mod fsio;
pub mod keys;
pub mod manifest;
pub mod npy;
pub mod pack;
pub mod payload;
#[cfg(feature = "tract")]
pub mod tract;
pub mod verify;

pub use error::Error;
pub use fsio::write_atomic;
pub use keys::{KeyId, PublicKey, RotationStatement, SigningKey, TrustStore};
pub use manifest::{Digest, Manifest, FORMAT_VERSION};
pub use pack::BundleBuilder;
pub use verify::{
    AgentVersionCheck, Policy, ReleaseFloor, SignedManifest, TargetCheck, UnverifiedBundle,
    VerifiedBundle, VerifiedManifest,
};

/// Upper bound on `manifest.json` (bytes). Also bounds the update offer message.
pub const MAX_MANIFEST_BYTES: usize = 256 * 1024;
/// Upper bound on the decompressed head (manifest, signature and tar headers), bytes.
pub const MAX_HEAD_BYTES: usize = MAX_MANIFEST_BYTES + 8 * 1024;
/// Smallest allowed chunk size (bytes).
pub const MIN_CHUNK_SIZE: u32 = 1024;
/// Largest allowed chunk size (bytes); a chunk must fit one MQTT message.
pub const MAX_CHUNK_SIZE: u32 = 128 * 1024;
/// Chunk size used when the packer is not told otherwise (bytes).
pub const DEFAULT_CHUNK_SIZE: u32 = 64 * 1024;
/// Upper bound on the number of payload files.
pub const MAX_FILES: usize = 64;
/// Upper bound on the decompressed payload (bytes): 2 GiB.
pub const MAX_PAYLOAD_BYTES: u64 = 2 << 30;
/// Largest zstd window a decoder will allocate for a body or delta (log2 bytes).
pub const MAX_WINDOW_LOG: u32 = 27;

/// SHA-256 of `bytes`.
pub fn sha256(bytes: &[u8]) -> Digest {
    use sha2::Digest as _;
    Digest(sha2::Sha256::digest(bytes).into())
}
