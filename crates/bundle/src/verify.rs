//! Verification as a typestate.
//!
//! ```text
//! bytes --parse--> UnverifiedBundle --verify(trust, policy)--> VerifiedBundle
//! manifest+sig --parse--> SignedManifest --verify--> VerifiedManifest
//!                 (chunks checked one by one) --verify_body--> VerifiedBundle
//! ```
//!
//! [`VerifiedManifest`] and [`VerifiedBundle`] have private fields and no
//! public constructor: the only way to obtain one is to pass verification.
//! Installing takes a `&VerifiedBundle`, so an unverified bundle cannot be
//! installed. There is no switch that skips the signature check; what a caller
//! may choose is which *policy* applies (a device checks its target and
//! release floor; a publisher does not have one), and those choices are enums.

use std::collections::BTreeMap;
use std::ops::Range;
use std::path::Path;

use crate::archive::{decompress_bounded, index_payload, split_head};
use crate::keys::TrustStore;
use crate::manifest::Manifest;
use crate::{fsio, sha256, Error};

/// Which target profile the bundle must be built for.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum TargetCheck {
    /// A device: the manifest's `targets` must contain this id.
    Device(String),
    /// A publisher (fleet server, CLI): any target is acceptable; the server
    /// matches targets to devices itself.
    AnyTarget,
}

/// Anti-rollback: which release counters are acceptable.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ReleaseFloor {
    /// The release must be strictly above this stored floor (the last
    /// committed release). Downgrades and replays of the same release fail.
    Above(u64),
    /// A publisher stores bundles of any release.
    NotApplicable,
}

/// Whether the reader is an agent with a version to compare against the
/// manifest's `min_agent_version`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum AgentVersionCheck {
    /// The bundle must not need a newer agent than this.
    Agent(semver::Version),
    /// Not an agent.
    NotAnAgent,
}

/// What a verifier requires beyond a valid signature and intact contents.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Policy {
    /// Target profile requirement.
    pub target: TargetCheck,
    /// Release counter requirement.
    pub release: ReleaseFloor,
    /// Agent version requirement.
    pub agent: AgentVersionCheck,
}

impl Policy {
    /// A device's policy.
    pub fn device(target: impl Into<String>, floor: u64, agent_version: semver::Version) -> Self {
        Policy {
            target: TargetCheck::Device(target.into()),
            release: ReleaseFloor::Above(floor),
            agent: AgentVersionCheck::Agent(agent_version),
        }
    }
    /// A publisher's policy (fleet server upload, `edgefleet bundle verify` without flags).
    pub fn publisher() -> Self {
        Policy {
            target: TargetCheck::AnyTarget,
            release: ReleaseFloor::NotApplicable,
            agent: AgentVersionCheck::NotAnAgent,
        }
    }

    fn check(&self, m: &Manifest) -> Result<(), Error> {
        if let TargetCheck::Device(t) = &self.target {
            if !m.targets.iter().any(|x| x == t) {
                return Err(Error::WrongTarget {
                    device: t.clone(),
                    bundle: m.targets.clone(),
                });
            }
        }
        if let ReleaseFloor::Above(floor) = self.release {
            if m.release <= floor {
                return Err(Error::Downgrade {
                    release: m.release,
                    floor,
                });
            }
        }
        if let AgentVersionCheck::Agent(v) = &self.agent {
            if *v < m.min_agent_version {
                return Err(Error::AgentTooOld {
                    required: m.min_agent_version.to_string(),
                    agent: v.to_string(),
                });
            }
        }
        Ok(())
    }
}

/// A manifest and its detached signature, not yet verified.
#[derive(Debug, Clone)]
pub struct SignedManifest {
    manifest: Manifest,
    bytes: Vec<u8>,
    sig: [u8; 64],
}

impl SignedManifest {
    /// Parses manifest bytes and a 64-byte signature.
    ///
    /// # Errors
    /// [`Error::SignatureMalformed`] and the errors of [`Manifest::from_json`].
    pub fn parse(manifest_bytes: Vec<u8>, sig: &[u8]) -> Result<Self, Error> {
        let sig: [u8; 64] = sig.try_into().map_err(|_| Error::SignatureMalformed {
            reason: format!("{} bytes, an ed25519 signature is 64", sig.len()),
        })?;
        let manifest = Manifest::from_json(&manifest_bytes)?;
        Ok(SignedManifest {
            manifest,
            bytes: manifest_bytes,
            sig,
        })
    }

    /// The manifest as claimed, NOT verified: for display (`bundle inspect`) only.
    pub fn manifest_unverified(&self) -> &Manifest {
        &self.manifest
    }
    /// The exact signed bytes.
    pub fn manifest_bytes(&self) -> &[u8] {
        &self.bytes
    }
    /// The detached signature.
    pub fn signature(&self) -> &[u8; 64] {
        &self.sig
    }

    /// Checks the signature against the trust store, then the policy.
    ///
    /// # Errors
    /// [`Error::UnknownKey`], [`Error::RevokedKey`], [`Error::BadSignature`],
    /// [`Error::WrongTarget`], [`Error::Downgrade`], [`Error::AgentTooOld`].
    pub fn verify(self, trust: &TrustStore, policy: &Policy) -> Result<VerifiedManifest, Error> {
        let key = trust.lookup(&self.manifest.key_id)?;
        if !key.verify(&self.bytes, &self.sig) {
            return Err(Error::BadSignature {
                key_id: self.manifest.key_id.to_string(),
            });
        }
        policy.check(&self.manifest)?;
        Ok(VerifiedManifest { inner: self })
    }
}

/// A manifest whose signature verified and whose policy holds. The body it
/// describes is still to be checked.
#[derive(Debug, Clone)]
pub struct VerifiedManifest {
    inner: SignedManifest,
}

impl VerifiedManifest {
    /// The verified manifest.
    pub fn manifest(&self) -> &Manifest {
        &self.inner.manifest
    }
    /// The exact signed bytes (to forward to a device).
    pub fn manifest_bytes(&self) -> &[u8] {
        &self.inner.bytes
    }
    /// The detached signature.
    pub fn signature(&self) -> &[u8; 64] {
        &self.inner.sig
    }

    /// Checks one received chunk against its hash (resumable transfer).
    ///
    /// # Errors
    /// [`Error::ChunkIndex`], [`Error::BodySize`] (wrong length), [`Error::ChunkHash`].
    pub fn check_chunk(&self, index: usize, data: &[u8]) -> Result<(), Error> {
        let m = self.manifest();
        let r = m.chunk_range(index)?;
        if data.len() != r.len() {
            return Err(Error::BodySize {
                expected: r.len() as u64,
                actual: data.len() as u64,
            });
        }
        if sha256(data) != m.body.chunks[index] {
            return Err(Error::ChunkHash { index });
        }
        Ok(())
    }

    /// Verifies a complete body. For a delta bundle, `base_payload` must be the
    /// uncompressed payload tar the delta was made from (its SHA-256 is checked).
    ///
    /// # Errors
    /// [`Error::BodySize`], [`Error::ChunkHash`], [`Error::BodyHash`],
    /// [`Error::DeltaBase`], [`Error::Decompress`], [`Error::PayloadTooLarge`],
    /// and the archive errors of [`crate::archive::index_payload`].
    pub fn verify_body(
        self,
        body: Vec<u8>,
        base_payload: Option<&[u8]>,
    ) -> Result<VerifiedBundle, Error> {
        let m = &self.inner.manifest;
        if body.len() as u64 != m.body.size {
            return Err(Error::BodySize {
                expected: m.body.size,
                actual: body.len() as u64,
            });
        }
        for i in 0..m.body.chunks.len() {
            let r = m.chunk_range(i)?;
            if sha256(&body[r]) != m.body.chunks[i] {
                return Err(Error::ChunkHash { index: i });
            }
        }
        if sha256(&body) != m.body.sha256 {
            return Err(Error::BodyHash);
        }
        let prefix = match (&m.delta_from, base_payload) {
            (None, _) => None,
            (Some(want), Some(base)) => {
                let have = sha256(base);
                if have != *want {
                    return Err(Error::DeltaBase {
                        expected: *want,
                        actual: format!("the device holds {have}"),
                    });
                }
                Some(base)
            }
            (Some(want), None) => {
                return Err(Error::DeltaBase {
                    expected: *want,
                    actual: "no base payload was given".into(),
                })
            }
        };
        let payload = decompress_bounded(&body, m.payload.size, prefix)?;
        let files = index_payload(&payload, m)?;
        Ok(VerifiedBundle {
            manifest: self,
            payload,
            files,
            body,
        })
    }
}

/// A parsed bundle file whose signature and contents are not yet checked.
#[derive(Debug)]
pub struct UnverifiedBundle {
    signed: SignedManifest,
    body: Vec<u8>,
}

impl UnverifiedBundle {
    /// Splits bundle bytes into head and body and parses the manifest.
    ///
    /// # Errors
    /// [`Error::Head`], [`Error::SignatureMalformed`] and the errors of
    /// [`Manifest::from_json`].
    pub fn parse(bytes: &[u8]) -> Result<Self, Error> {
        let (mbytes, sig, head_len) = split_head(bytes)?;
        let signed = SignedManifest::parse(mbytes, &sig)?;
        Ok(UnverifiedBundle {
            signed,
            body: bytes[head_len..].to_vec(),
        })
    }

    /// Reads and parses a bundle file.
    ///
    /// # Errors
    /// [`Error::Io`] naming the file, and the errors of [`UnverifiedBundle::parse`].
    pub fn read(path: &Path) -> Result<Self, Error> {
        Self::parse(&fsio::read(path)?)
    }

    /// The manifest as claimed, NOT verified: for display only.
    pub fn manifest_unverified(&self) -> &Manifest {
        self.signed.manifest_unverified()
    }

    /// The signed manifest (to send in an update offer).
    pub fn signed_manifest(&self) -> &SignedManifest {
        &self.signed
    }

    /// The body bytes as found after the head, NOT verified. Lets a relay
    /// serve chunks without holding keys; every receiver checks each chunk
    /// against its verified manifest.
    pub fn body_unverified(&self) -> &[u8] {
        &self.body
    }

    /// Verifies a full bundle: signature, policy, body, payload.
    ///
    /// # Errors
    /// Everything [`SignedManifest::verify`] and
    /// [`VerifiedManifest::verify_body`] return; a delta bundle without its
    /// base gives [`Error::DeltaBase`].
    pub fn verify(self, trust: &TrustStore, policy: &Policy) -> Result<VerifiedBundle, Error> {
        self.signed
            .verify(trust, policy)?
            .verify_body(self.body, None)
    }

    /// Verifies a delta bundle against the base payload tar it was made from,
    /// then the rebuilt payload exactly as for a full bundle.
    ///
    /// # Errors
    /// As [`UnverifiedBundle::verify`].
    pub fn verify_delta(
        self,
        trust: &TrustStore,
        policy: &Policy,
        base_payload: &[u8],
    ) -> Result<VerifiedBundle, Error> {
        self.signed
            .verify(trust, policy)?
            .verify_body(self.body, Some(base_payload))
    }
}

/// A bundle whose signature, policy, body and every payload file verified.
#[derive(Debug)]
pub struct VerifiedBundle {
    manifest: VerifiedManifest,
    payload: Vec<u8>,
    files: BTreeMap<String, Range<usize>>,
    body: Vec<u8>,
}

impl VerifiedBundle {
    /// The verified manifest.
    pub fn manifest(&self) -> &Manifest {
        self.manifest.manifest()
    }
    /// The verified manifest with its signature (to forward in an update offer).
    pub fn signed(&self) -> &VerifiedManifest {
        &self.manifest
    }
    /// A payload file's bytes.
    pub fn file(&self, path: &str) -> Option<&[u8]> {
        self.files.get(path).map(|r| &self.payload[r.clone()])
    }
    /// Payload file paths.
    pub fn file_names(&self) -> impl Iterator<Item = &str> {
        self.files.keys().map(String::as_str)
    }
    /// The uncompressed payload tar: the base for a later delta.
    pub fn payload_tar(&self) -> &[u8] {
        &self.payload
    }
    /// The body as transferred (a zstd frame; for a delta, the patch).
    pub fn body(&self) -> &[u8] {
        &self.body
    }
    /// The complete bundle file bytes (head + body), re-assembled with the
    /// original signed manifest.
    ///
    /// # Errors
    /// [`Error::Pack`] if the head cannot be encoded.
    pub fn to_bytes(&self) -> Result<Vec<u8>, Error> {
        let mut out =
            crate::pack::encode_head(self.manifest.manifest_bytes(), self.manifest.signature())?;
        out.extend_from_slice(&self.body);
        Ok(out)
    }

    /// Writes every payload file under `dir` (created if missing), each with
    /// [`fsio::write_atomic`], then fsyncs the directories.
    ///
    /// # Errors
    /// [`Error::Io`] naming the file.
    pub fn install_files(&self, dir: &Path) -> Result<(), Error> {
        std::fs::create_dir_all(dir).map_err(|e| Error::io(dir, e))?;
        for (name, r) in &self.files {
            let path = dir.join(name);
            if let Some(parent) = path.parent() {
                std::fs::create_dir_all(parent).map_err(|e| Error::io(parent, e))?;
            }
            fsio::write_atomic(&path, &self.payload[r.clone()])?;
        }
        fsio::sync_dir(dir)
    }
}
