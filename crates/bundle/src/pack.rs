//! Building a bundle: deterministic payload tar, one zstd frame for the body,
//! manifest with per-chunk hashes, detached ed25519 signature, head frame.

use crate::archive::{append_entry, build_tar, compress_frame};
use crate::keys::SigningKey;
use crate::manifest::{check_path, BodyInfo, FileEntry, Manifest, PayloadInfo, FORMAT_VERSION};
use crate::{sha256, Error, DEFAULT_CHUNK_SIZE};

/// zstd level used for bodies unless told otherwise (best ratio for OTA).
pub const DEFAULT_ZSTD_LEVEL: i32 = 19;

/// Builds a full bundle.
///
/// ```
/// # use edgefleet_bundle::{BundleBuilder, SigningKey};
/// let key = SigningKey::generate();
/// let bytes = BundleBuilder::new("vad", "1.0.0".parse().unwrap(), 1)
///     .target("rpi4")
///     .file("model.onnx", vec![1, 2, 3])
///     .build(&key)
///     .unwrap();
/// assert!(bytes.len() > 100);
/// ```
#[derive(Debug, Clone)]
pub struct BundleBuilder {
    model: String,
    version: semver::Version,
    release: u64,
    targets: Vec<String>,
    min_agent_version: semver::Version,
    files: Vec<(String, Vec<u8>)>,
    chunk_size: u32,
    level: i32,
    created_at: Option<String>,
}

impl BundleBuilder {
    /// A builder for `model` at semantic `version` with release counter `release`.
    pub fn new(model: impl Into<String>, version: semver::Version, release: u64) -> Self {
        BundleBuilder {
            model: model.into(),
            version,
            release,
            targets: Vec::new(),
            min_agent_version: semver::Version::new(0, 1, 0),
            files: Vec::new(),
            chunk_size: DEFAULT_CHUNK_SIZE,
            level: DEFAULT_ZSTD_LEVEL,
            created_at: None,
        }
    }
    /// Adds a target profile id (repeatable).
    pub fn target(mut self, id: impl Into<String>) -> Self {
        self.targets.push(id.into());
        self
    }
    /// Oldest agent that may run this bundle (default 0.1.0).
    pub fn min_agent_version(mut self, v: semver::Version) -> Self {
        self.min_agent_version = v;
        self
    }
    /// Adds a payload file at relative `path`.
    pub fn file(mut self, path: impl Into<String>, bytes: Vec<u8>) -> Self {
        self.files.push((path.into(), bytes));
        self
    }
    /// Chunk size in bytes (power of two, 1 KiB..=128 KiB; default 64 KiB).
    pub fn chunk_size(mut self, bytes: u32) -> Self {
        self.chunk_size = bytes;
        self
    }
    /// zstd level for the body (default [`DEFAULT_ZSTD_LEVEL`]).
    pub fn zstd_level(mut self, level: i32) -> Self {
        self.level = level;
        self
    }
    /// Fixes `created_at` (RFC 3339) for reproducible bundles; default: now.
    pub fn created_at(mut self, rfc3339: impl Into<String>) -> Self {
        self.created_at = Some(rfc3339.into());
        self
    }

    /// Packs and signs. Returns the bundle bytes.
    ///
    /// # Errors
    /// [`Error::Pack`] for an invalid path or zstd failure,
    /// [`Error::ManifestField`] when a field breaks a manifest rule.
    pub fn build(mut self, key: &SigningKey) -> Result<Vec<u8>, Error> {
        for (p, _) in &self.files {
            check_path(p).map_err(|r| Error::Pack {
                reason: format!("file path `{p}`: {r}"),
            })?;
        }
        self.files.sort_by(|a, b| a.0.cmp(&b.0));
        let tar = build_tar(&self.files)?;
        let body = compress_frame(&tar, self.level)?;
        let manifest = Manifest {
            format_version: FORMAT_VERSION,
            model: self.model,
            version: self.version,
            release: self.release,
            targets: self.targets,
            created_at: self.created_at.unwrap_or_else(|| {
                humantime::format_rfc3339_seconds(std::time::SystemTime::now()).to_string()
            }),
            min_agent_version: self.min_agent_version,
            key_id: key.key_id(),
            files: self
                .files
                .iter()
                .map(|(p, d)| FileEntry {
                    path: p.clone(),
                    size: d.len() as u64,
                    sha256: sha256(d),
                })
                .collect(),
            payload: PayloadInfo {
                size: tar.len() as u64,
                sha256: sha256(&tar),
            },
            body: body_info(&body, self.chunk_size),
            delta_from: None,
        };
        sign_and_assemble(&manifest, key, &body)
    }
}

/// Size, hash and per-chunk hashes of a body (used by the packer and by
/// tools that assemble bundles by hand, such as the hostile-fixture generator).
pub fn body_info(body: &[u8], chunk_size: u32) -> BodyInfo {
    BodyInfo {
        size: body.len() as u64,
        sha256: sha256(body),
        chunk_size,
        chunks: body
            .chunks(chunk_size.max(1) as usize)
            .map(sha256)
            .collect(),
    }
}

/// Validates, signs, and returns head + body.
pub(crate) fn sign_and_assemble(
    m: &Manifest,
    key: &SigningKey,
    body: &[u8],
) -> Result<Vec<u8>, Error> {
    m.validate()?;
    let bytes = m.to_json();
    if bytes.len() > crate::MAX_MANIFEST_BYTES {
        return Err(Error::Pack {
            reason: format!(
                "manifest would be {} bytes (limit {}): use a larger chunk size than {}",
                bytes.len(),
                crate::MAX_MANIFEST_BYTES,
                m.body.chunk_size
            ),
        });
    }
    let sig = key.sign(&bytes);
    let mut out = encode_head(&bytes, &sig)?;
    out.extend_from_slice(body);
    Ok(out)
}

/// The head frame: tar entries `manifest.json` and `manifest.sig` without the
/// end-of-archive blocks (the body frame supplies them), as one zstd frame of
/// raw (stored) blocks.
///
/// Design: the head is stored, not compressed, so that its encoding is
/// canonical and owned by us: the verifier re-encodes the head from the
/// manifest and signature it read and requires the exact bytes. A flipped
/// byte anywhere in the head is therefore detected even where a compressed
/// frame would decode to the same content (unused entropy-table entries).
///
/// # Errors
/// [`Error::Pack`] when the manifest is too large for a tar entry.
pub fn encode_head(manifest_bytes: &[u8], sig: &[u8; 64]) -> Result<Vec<u8>, Error> {
    let mut tar = Vec::with_capacity(manifest_bytes.len() + 2048);
    append_entry(&mut tar, "manifest.json", manifest_bytes)?;
    append_entry(&mut tar, "manifest.sig", sig)?;
    Ok(raw_zstd_frame(&tar))
}

/// A zstd frame (RFC 8878 section 3.1.1) holding `data` in Raw blocks:
/// single-segment, 4-byte Frame_Content_Size, no checksum.
pub fn raw_zstd_frame(data: &[u8]) -> Vec<u8> {
    const MAX_BLOCK: usize = 128 * 1024;
    let mut out = Vec::with_capacity(data.len() + 16 + 3 * (data.len() / MAX_BLOCK + 1));
    out.extend_from_slice(&0xFD2F_B528u32.to_le_bytes());
    // Frame_Header_Descriptor: FCS_Field_Size = 2 (4 bytes), Single_Segment = 1.
    out.push(0b1010_0000);
    out.extend_from_slice(&(data.len() as u32).to_le_bytes());
    let mut blocks = data.chunks(MAX_BLOCK).peekable();
    if blocks.peek().is_none() {
        out.extend_from_slice(&[1, 0, 0]);
    }
    while let Some(b) = blocks.next() {
        let last = u32::from(blocks.peek().is_none());
        // Block_Header: Last_Block (bit 0), Block_Type 0 = Raw (bits 1-2), Block_Size (bits 3-23).
        let h = last | ((b.len() as u32) << 3);
        out.extend_from_slice(&h.to_le_bytes()[..3]);
        out.extend_from_slice(b);
    }
    out
}
