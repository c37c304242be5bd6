use std::path::PathBuf;

use crate::manifest::Digest;

/// Everything that can go wrong reading, verifying, packing or installing a
/// bundle. Each variant names the thing that is wrong; [`Error::code`] gives a
/// stable machine-readable reason for telemetry and tests.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum Error {
    /// A file could not be read or written.
    #[error("{path}: {source}")]
    Io {
        /// The file.
        path: PathBuf,
        /// The OS error.
        #[source]
        source: std::io::Error,
    },
    /// The head (first zstd frame) is missing, corrupt or not a bundle head.
    #[error("bundle head is invalid: {reason}")]
    Head {
        /// What is wrong.
        reason: String,
    },
    /// `manifest.json` exceeds [`crate::MAX_MANIFEST_BYTES`].
    #[error("manifest.json is {size} bytes, the limit is {limit}")]
    ManifestTooLarge {
        /// Its size in bytes.
        size: usize,
        /// The limit in bytes.
        limit: usize,
    },
    /// `manifest.json` is not valid JSON for the schema.
    #[error("manifest.json does not parse: {reason}")]
    ManifestJson {
        /// The parser's message, with line and column.
        reason: String,
    },
    /// The manifest's `format_version` is not one this code reads.
    #[error("manifest format_version {found} is not supported (this build reads {supported})")]
    UnsupportedFormatVersion {
        /// The version found.
        found: u64,
        /// The version this build reads.
        supported: u32,
    },
    /// A manifest field holds an impossible value.
    #[error("manifest field `{field}` is invalid: {reason}")]
    ManifestField {
        /// The field, e.g. `body.chunks`.
        field: String,
        /// What is wrong.
        reason: String,
    },
    /// `manifest.sig` is not a 64-byte ed25519 signature.
    #[error("manifest.sig is malformed: {reason}")]
    SignatureMalformed {
        /// What is wrong.
        reason: String,
    },
    /// The manifest names a key that the trust store does not hold.
    #[error("manifest is signed by key {key_id}, which is not in the trust store")]
    UnknownKey {
        /// The key id from the manifest.
        key_id: String,
    },
    /// The manifest is signed by a revoked key.
    #[error("manifest is signed by key {key_id}, which has been revoked")]
    RevokedKey {
        /// The key id.
        key_id: String,
    },
    /// The signature does not verify against the named trusted key.
    #[error("signature over manifest.json does not verify with key {key_id}")]
    BadSignature {
        /// The key id.
        key_id: String,
    },
    /// The bundle is not built for this device's target profile.
    #[error("bundle targets {bundle:?}, this device is `{device}`")]
    WrongTarget {
        /// The device's target profile id.
        device: String,
        /// The bundle's target ids.
        bundle: Vec<String>,
    },
    /// Release counter not above the device's stored floor (downgrade or replay).
    #[error("bundle release {release} is not above the device's release floor {floor} (downgrade or replay)")]
    Downgrade {
        /// The bundle's release counter.
        release: u64,
        /// The device's stored minimum (the last committed release).
        floor: u64,
    },
    /// The bundle needs a newer agent.
    #[error("bundle needs agent >= {required}, this agent is {agent}")]
    AgentTooOld {
        /// Minimum agent version from the manifest.
        required: String,
        /// This agent's version.
        agent: String,
    },
    /// The body's length differs from the manifest (truncated or padded).
    #[error(
        "bundle body is {actual} bytes, the manifest declares {expected} (truncated or padded)"
    )]
    BodySize {
        /// Declared size in bytes.
        expected: u64,
        /// Actual size in bytes.
        actual: u64,
    },
    /// A body chunk does not match its hash in the manifest.
    #[error("body chunk {index} does not match its SHA-256 in the manifest")]
    ChunkHash {
        /// Zero-based chunk index.
        index: usize,
    },
    /// A chunk index is outside the manifest's chunk list.
    #[error("chunk index {index} is out of range (the body has {count} chunks)")]
    ChunkIndex {
        /// Requested index.
        index: usize,
        /// Number of chunks.
        count: usize,
    },
    /// The body does not match its hash in the manifest.
    #[error("bundle body does not match its SHA-256 in the manifest")]
    BodyHash,
    /// The body does not decompress.
    #[error("payload does not decompress: {reason}")]
    Decompress {
        /// zstd's message.
        reason: String,
    },
    /// Decompression produced more than the declared size (a zstd bomb is cut off here).
    #[error("payload decompresses beyond its declared {limit} bytes")]
    PayloadTooLarge {
        /// The declared size in bytes.
        limit: u64,
    },
    /// The decompressed payload differs from the manifest's `payload` entry.
    #[error("decompressed payload does not match the manifest: {reason}")]
    PayloadMismatch {
        /// Size or hash difference.
        reason: String,
    },
    /// An archive entry is an absolute path, contains `..`, or is a link or device file.
    #[error("archive entry `{path}` is rejected: {reason}")]
    UnsafeEntry {
        /// The entry's path as stored.
        path: String,
        /// Why.
        reason: String,
    },
    /// An archive entry is not listed in the manifest, or listed twice.
    #[error("archive entry `{path}` is not listed in the manifest (or is duplicated)")]
    UnexpectedEntry {
        /// The entry's path.
        path: String,
    },
    /// A file listed in the manifest is not in the archive.
    #[error("file `{path}` is listed in the manifest but missing from the payload")]
    MissingFile {
        /// The file.
        path: String,
    },
    /// A payload file's size differs from the manifest.
    #[error("payload file `{path}` is {actual} bytes, the manifest declares {expected}")]
    FileSize {
        /// The file.
        path: String,
        /// Declared bytes.
        expected: u64,
        /// Actual bytes.
        actual: u64,
    },
    /// A payload file's hash differs from the manifest.
    #[error("payload file `{path}` does not match its SHA-256 in the manifest")]
    FileHash {
        /// The file.
        path: String,
    },
    /// A delta needs a base payload the device does not hold.
    #[error("delta applies to base payload {expected}, but {actual}")]
    DeltaBase {
        /// The base payload hash the delta was made from.
        expected: Digest,
        /// What the device has.
        actual: String,
    },
    /// A key file could not be parsed.
    #[error("key {path}: {reason}")]
    Key {
        /// The key file.
        path: PathBuf,
        /// What is wrong.
        reason: String,
    },
    /// A trust store or rotation statement is invalid.
    #[error("trust store: {reason}")]
    Trust {
        /// What is wrong.
        reason: String,
    },
    /// A payload file does not match its schema (see [`crate::payload`]).
    #[error("payload {file}: {reason}")]
    Payload {
        /// The payload file or tensor.
        file: String,
        /// What is wrong.
        reason: String,
    },
    /// Packing was asked for something invalid.
    #[error("cannot pack: {reason}")]
    Pack {
        /// What is wrong.
        reason: String,
    },
}

impl Error {
    /// A stable, machine-readable code for this error (used in rollback and
    /// rejection reports, and by the hostile-fixture tests).
    pub fn code(&self) -> &'static str {
        match self {
            Error::Io { .. } => "io",
            Error::Head { .. } => "head_invalid",
            Error::ManifestTooLarge { .. } => "manifest_too_large",
            Error::ManifestJson { .. } => "manifest_json",
            Error::UnsupportedFormatVersion { .. } => "unsupported_format_version",
            Error::ManifestField { .. } => "manifest_field",
            Error::SignatureMalformed { .. } => "signature_malformed",
            Error::UnknownKey { .. } => "unknown_key",
            Error::RevokedKey { .. } => "revoked_key",
            Error::BadSignature { .. } => "bad_signature",
            Error::WrongTarget { .. } => "wrong_target",
            Error::Downgrade { .. } => "downgrade",
            Error::AgentTooOld { .. } => "agent_too_old",
            Error::BodySize { .. } => "body_size",
            Error::ChunkHash { .. } => "chunk_hash",
            Error::ChunkIndex { .. } => "chunk_index",
            Error::BodyHash => "body_hash",
            Error::Decompress { .. } => "decompress",
            Error::PayloadTooLarge { .. } => "payload_too_large",
            Error::PayloadMismatch { .. } => "payload_mismatch",
            Error::UnsafeEntry { .. } => "unsafe_entry",
            Error::UnexpectedEntry { .. } => "unexpected_entry",
            Error::MissingFile { .. } => "missing_file",
            Error::FileSize { .. } => "file_size",
            Error::FileHash { .. } => "file_hash",
            Error::DeltaBase { .. } => "delta_base",
            Error::Key { .. } => "key",
            Error::Trust { .. } => "trust",
            Error::Payload { .. } => "payload",
            Error::Pack { .. } => "pack",
        }
    }

    pub(crate) fn io(path: impl Into<PathBuf>, source: std::io::Error) -> Self {
        Error::Io {
            path: path.into(),
            source,
        }
    }

    pub(crate) fn field(field: &str, reason: impl Into<String>) -> Self {
        Error::ManifestField {
            field: field.into(),
            reason: reason.into(),
        }
    }
}
