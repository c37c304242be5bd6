//! The binary chunk message on `down/chunk` (docs/specs/mqtt.md, "Chunk data").
//!
//! ```text
//! offset size field
//!      0    4 magic "EFCK"
//!      4    1 version (1)
//!      5   32 body SHA-256 (raw)
//!     37    4 chunk index, u32 big-endian
//!     41    4 chunk count of the body, u32 big-endian
//!     45    4 data length, u32 big-endian (<= MAX_CHUNK_DATA)
//!     49    n data
//! ```
//! Binary rather than JSON+base64: chunks are the bulk of OTA traffic.

use crate::Error;

/// Magic bytes.
pub const MAGIC: &[u8; 4] = b"EFCK";
/// Chunk message format version.
pub const VERSION: u8 = 1;
/// Header length (bytes).
pub const HEADER_LEN: usize = 49;
/// Largest chunk payload (bytes); equals the bundle format's largest chunk size.
pub const MAX_CHUNK_DATA: usize = 128 * 1024;

/// One chunk of a bundle body.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ChunkData {
    /// SHA-256 of the whole body this chunk belongs to.
    pub body_sha256: [u8; 32],
    /// Zero-based chunk index.
    pub index: u32,
    /// Number of chunks in the body.
    pub count: u32,
    /// The chunk bytes.
    pub data: Vec<u8>,
}

impl ChunkData {
    /// Encodes the message.
    ///
    /// # Errors
    /// [`Error::TooLarge`] when `data` exceeds [`MAX_CHUNK_DATA`].
    pub fn encode(&self) -> Result<Vec<u8>, Error> {
        if self.data.len() > MAX_CHUNK_DATA {
            return Err(Error::TooLarge {
                what: "chunk data",
                size: self.data.len(),
                limit: MAX_CHUNK_DATA,
            });
        }
        let mut out = Vec::with_capacity(HEADER_LEN + self.data.len());
        out.extend_from_slice(MAGIC);
        out.push(VERSION);
        out.extend_from_slice(&self.body_sha256);
        out.extend_from_slice(&self.index.to_be_bytes());
        out.extend_from_slice(&self.count.to_be_bytes());
        out.extend_from_slice(&(self.data.len() as u32).to_be_bytes());
        out.extend_from_slice(&self.data);
        Ok(out)
    }

    /// Decodes and checks the framing (not the chunk hash: that needs the
    /// verified manifest, see `edgefleet_bundle::VerifiedManifest::check_chunk`).
    ///
    /// # Errors
    /// [`Error::Malformed`] naming the field, [`Error::UnsupportedVersion`],
    /// [`Error::TooLarge`].
    pub fn decode(bytes: &[u8]) -> Result<Self, Error> {
        let bad = |reason: String| Error::Malformed {
            kind: "chunk",
            reason,
        };
        if bytes.len() < HEADER_LEN {
            return Err(bad(format!(
                "{} bytes, the header alone is {HEADER_LEN}",
                bytes.len()
            )));
        }
        if &bytes[0..4] != MAGIC {
            return Err(bad("magic is not EFCK".into()));
        }
        if bytes[4] != VERSION {
            return Err(Error::UnsupportedVersion {
                found: bytes[4].into(),
                supported: VERSION.into(),
            });
        }
        let u32_at =
            |o: usize| u32::from_be_bytes([bytes[o], bytes[o + 1], bytes[o + 2], bytes[o + 3]]);
        let mut body_sha256 = [0u8; 32];
        body_sha256.copy_from_slice(&bytes[5..37]);
        let index = u32_at(37);
        let count = u32_at(41);
        let len = u32_at(45) as usize;
        if len > MAX_CHUNK_DATA {
            return Err(Error::TooLarge {
                what: "chunk data",
                size: len,
                limit: MAX_CHUNK_DATA,
            });
        }
        if bytes.len() - HEADER_LEN != len {
            return Err(bad(format!(
                "data length field says {len}, {} bytes follow",
                bytes.len() - HEADER_LEN
            )));
        }
        if index >= count {
            return Err(bad(format!("index {index} is not below count {count}")));
        }
        Ok(ChunkData {
            body_sha256,
            index,
            count,
            data: bytes[HEADER_LEN..].to_vec(),
        })
    }
}
