//! The manifest: the one signed document of a bundle (`manifest.json`).
//!
//! Schema and field rules: `docs/specs/bundle.md`, section "Manifest".

use std::fmt;

use serde::{Deserialize, Deserializer, Serialize, Serializer};

use crate::keys::KeyId;
use crate::{
    Error, MAX_CHUNK_SIZE, MAX_FILES, MAX_MANIFEST_BYTES, MAX_PAYLOAD_BYTES, MIN_CHUNK_SIZE,
};

/// The manifest format version this build writes and reads.
pub const FORMAT_VERSION: u32 = 1;

/// A SHA-256 digest, written as 64 lowercase hex characters.
#[derive(Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct Digest(pub [u8; 32]);

impl Digest {
    /// Lowercase hex.
    pub fn to_hex(&self) -> String {
        hex::encode(self.0)
    }
    /// Parses 64 hex characters.
    ///
    /// # Errors
    /// A message saying what is wrong with the text.
    pub fn from_hex(s: &str) -> Result<Self, String> {
        if s.len() != 64 {
            return Err(format!(
                "a SHA-256 digest is 64 hex characters, got {}",
                s.len()
            ));
        }
        let mut out = [0u8; 32];
        hex::decode_to_slice(s, &mut out).map_err(|e| format!("not hex: {e}"))?;
        Ok(Digest(out))
    }
}

impl fmt::Display for Digest {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.to_hex())
    }
}
impl fmt::Debug for Digest {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "Digest({})", self.to_hex())
    }
}
impl Serialize for Digest {
    fn serialize<S: Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        s.serialize_str(&self.to_hex())
    }
}
impl<'de> Deserialize<'de> for Digest {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        let s = String::deserialize(d)?;
        Digest::from_hex(&s).map_err(serde::de::Error::custom)
    }
}

/// One payload file.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct FileEntry {
    /// Relative path inside the payload: `[A-Za-z0-9._-]` segments joined by `/`,
    /// no empty, `.` or `..` segment, at most 255 bytes.
    pub path: String,
    /// Size in bytes.
    pub size: u64,
    /// SHA-256 of the file's bytes.
    pub sha256: Digest,
}

/// The decompressed payload tar.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct PayloadInfo {
    /// Size of the uncompressed payload tar in bytes (bounds decompression).
    pub size: u64,
    /// SHA-256 of the uncompressed payload tar. Deltas name their base by it.
    pub sha256: Digest,
}

/// The bytes transferred after the head: a zstd frame of the payload tar, or,
/// for a delta, a zstd frame of the payload tar compressed against the base
/// payload as reference prefix.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct BodyInfo {
    /// Body size in bytes.
    pub size: u64,
    /// SHA-256 of the whole body.
    pub sha256: Digest,
    /// Chunk size in bytes, a power of two in [`MIN_CHUNK_SIZE`, `MAX_CHUNK_SIZE`];
    /// the last chunk may be shorter.
    pub chunk_size: u32,
    /// SHA-256 of each chunk, in order; `ceil(size / chunk_size)` entries.
    pub chunks: Vec<Digest>,
}

/// The signed manifest (`manifest.json`). Unknown fields are rejected.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Manifest {
    /// [`FORMAT_VERSION`].
    pub format_version: u32,
    /// Model name, `[A-Za-z0-9._-]{1,64}`.
    pub model: String,
    /// Semantic version of this model release (informational for operators).
    pub version: semver::Version,
    /// Monotonic release counter; a device installs only releases above its
    /// floor (anti-rollback, TUF-style version counter).
    pub release: u64,
    /// Target profile ids this bundle was compiled for (`targets/*.toml` `id`).
    pub targets: Vec<String>,
    /// Creation time, RFC 3339 UTC. Informational only: verification never
    /// reads the device clock.
    pub created_at: String,
    /// Oldest agent version that can run this bundle.
    pub min_agent_version: semver::Version,
    /// Id of the key that signed `manifest.sig`.
    pub key_id: KeyId,
    /// Payload files.
    pub files: Vec<FileEntry>,
    /// The uncompressed payload tar.
    pub payload: PayloadInfo,
    /// The transferred body and its chunks.
    pub body: BodyInfo,
    /// For a delta bundle: SHA-256 of the base payload tar the body was
    /// compressed against. `None` for a full bundle.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub delta_from: Option<Digest>,
}

#[derive(Deserialize)]
struct VersionProbe {
    format_version: Option<u64>,
}

impl Manifest {
    /// Parses and validates manifest bytes. The format version is read first,
    /// so an unknown version gets its own error rather than a schema error.
    ///
    /// # Errors
    /// [`Error::ManifestTooLarge`], [`Error::ManifestJson`],
    /// [`Error::UnsupportedFormatVersion`], [`Error::ManifestField`].
    pub fn from_json(bytes: &[u8]) -> Result<Self, Error> {
        if bytes.len() > MAX_MANIFEST_BYTES {
            return Err(Error::ManifestTooLarge {
                size: bytes.len(),
                limit: MAX_MANIFEST_BYTES,
            });
        }
        let probe: VersionProbe =
            serde_json::from_slice(bytes).map_err(|e| Error::ManifestJson {
                reason: e.to_string(),
            })?;
        match probe.format_version {
            Some(v) if v == u64::from(FORMAT_VERSION) => {}
            Some(v) => {
                return Err(Error::UnsupportedFormatVersion {
                    found: v,
                    supported: FORMAT_VERSION,
                })
            }
            None => return Err(Error::field("format_version", "missing")),
        }
        let m: Manifest = serde_json::from_slice(bytes).map_err(|e| Error::ManifestJson {
            reason: e.to_string(),
        })?;
        m.validate()?;
        Ok(m)
    }

    /// Canonical bytes: pretty JSON with a trailing newline. These exact bytes are signed.
    pub fn to_json(&self) -> Vec<u8> {
        let mut v = serde_json::to_vec_pretty(self).unwrap_or_default();
        v.push(b'\n');
        v
    }

    /// Checks every field rule of `docs/specs/bundle.md`.
    ///
    /// # Errors
    /// [`Error::ManifestField`] naming the field.
    pub fn validate(&self) -> Result<(), Error> {
        if self.format_version != FORMAT_VERSION {
            return Err(Error::UnsupportedFormatVersion {
                found: self.format_version.into(),
                supported: FORMAT_VERSION,
            });
        }
        check_name("model", &self.model)?;
        if self.targets.is_empty() {
            return Err(Error::field(
                "targets",
                "at least one target id is required",
            ));
        }
        for t in &self.targets {
            check_name("targets", t)?;
        }
        if self.files.is_empty() || self.files.len() > MAX_FILES {
            return Err(Error::field(
                "files",
                format!(
                    "must list 1..={MAX_FILES} files, lists {}",
                    self.files.len()
                ),
            ));
        }
        let mut seen = std::collections::BTreeSet::new();
        let mut total: u64 = 0;
        for f in &self.files {
            check_path(&f.path)
                .map_err(|r| Error::field("files.path", format!("`{}`: {r}", f.path)))?;
            if !seen.insert(f.path.as_str()) {
                return Err(Error::field(
                    "files.path",
                    format!("`{}` is listed twice", f.path),
                ));
            }
            total = total.saturating_add(f.size);
        }
        if self.payload.size > MAX_PAYLOAD_BYTES || total > self.payload.size {
            return Err(Error::field(
                "payload.size",
                format!(
                    "{} bytes cannot hold {} bytes of files (limit {MAX_PAYLOAD_BYTES})",
                    self.payload.size, total
                ),
            ));
        }
        let b = &self.body;
        if !b.chunk_size.is_power_of_two()
            || !(MIN_CHUNK_SIZE..=MAX_CHUNK_SIZE).contains(&b.chunk_size)
        {
            return Err(Error::field(
                "body.chunk_size",
                format!(
                    "{} is not a power of two in {MIN_CHUNK_SIZE}..={MAX_CHUNK_SIZE}",
                    b.chunk_size
                ),
            ));
        }
        let want = b.size.div_ceil(u64::from(b.chunk_size));
        if b.size == 0 || want != b.chunks.len() as u64 {
            return Err(Error::field(
                "body.chunks",
                format!(
                    "a {}-byte body in {}-byte chunks has {want} chunks, {} listed",
                    b.size,
                    b.chunk_size,
                    b.chunks.len()
                ),
            ));
        }
        Ok(())
    }

    /// Byte range of chunk `index` within the body.
    ///
    /// # Errors
    /// [`Error::ChunkIndex`] when out of range.
    pub fn chunk_range(&self, index: usize) -> Result<std::ops::Range<usize>, Error> {
        let count = self.body.chunks.len();
        if index >= count {
            return Err(Error::ChunkIndex { index, count });
        }
        let cs = self.body.chunk_size as usize;
        let start = index * cs;
        let end = (start + cs).min(self.body.size as usize);
        Ok(start..end)
    }

    /// True when this is a delta bundle.
    pub fn is_delta(&self) -> bool {
        self.delta_from.is_some()
    }
}

/// Names (model, target ids): `[A-Za-z0-9._-]{1,64}`.
fn check_name(field: &str, s: &str) -> Result<(), Error> {
    if s.is_empty()
        || s.len() > 64
        || !s
            .bytes()
            .all(|c| c.is_ascii_alphanumeric() || b"._-".contains(&c))
    {
        return Err(Error::field(
            field,
            format!("`{s}` is not 1-64 characters of [A-Za-z0-9._-]"),
        ));
    }
    Ok(())
}

/// Payload paths: relative, `/`-separated segments of `[A-Za-z0-9._-]`, no
/// empty, `.` or `..` segment, at most 255 bytes.
///
/// # Errors
/// A message saying which rule the path breaks.
pub fn check_path(p: &str) -> Result<(), &'static str> {
    if p.is_empty() || p.len() > 255 {
        return Err("path must be 1-255 bytes");
    }
    if p.starts_with('/') {
        return Err("absolute path");
    }
    for seg in p.split('/') {
        if seg.is_empty() || seg == "." {
            return Err("empty or `.` path segment");
        }
        if seg == ".." {
            return Err("`..` path segment (path traversal)");
        }
        if !seg
            .bytes()
            .all(|c| c.is_ascii_alphanumeric() || b"._-".contains(&c))
        {
            return Err("characters outside [A-Za-z0-9._-]");
        }
    }
    Ok(())
}
