//! A/B model slots on disk: `data_dir/slots/{a,b}/` each holding
//! `files/` (the verified payload files), `payload.tar.zst` (the verified
//! payload tar, base for delta bundles) and `slot.json` (the signed manifest
//! and what the agent did with it, written atomically).
//!
//! Which slot is active, previous or staged lives in the store. Changes are
//! made on an in-memory copy ([`Slots::edit`]) and take effect only when
//! [`Slots::commit`] has persisted them (persist, then swap).

use std::path::{Path, PathBuf};

use base64::Engine as _;
use edgefleet_bundle::{
    fsio, sha256, Manifest, Policy, SignedManifest, TrustStore, VerifiedBundle,
};
use edgefleet_protocol::messages::ReleaseRef;
use serde::{Deserialize, Serialize};

use crate::store::{keys, Store, StoreError};

/// One of the two slots.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum SlotName {
    /// Slot a.
    A,
    /// Slot b.
    B,
}

impl SlotName {
    /// The other slot.
    pub fn other(self) -> Self {
        match self {
            SlotName::A => SlotName::B,
            SlotName::B => SlotName::A,
        }
    }
    /// `a` or `b`.
    pub fn as_str(self) -> &'static str {
        match self {
            SlotName::A => "a",
            SlotName::B => "b",
        }
    }
}

/// Slot roles (persisted under `store::keys::SLOTS`).
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct SlotsMeta {
    /// The slot that serves.
    pub active: Option<SlotName>,
    /// The slot a rollback returns to.
    pub previous: Option<SlotName>,
    /// A slot installed and on trial, not yet committed.
    pub staged: Option<SlotName>,
    /// Bumped by every [`Slots::commit`]; also recorded in the store's
    /// guard, so a store that lost writes is recognised (`store` module docs).
    #[serde(default)]
    pub epoch: u64,
}

/// For people: `active a, previous -, staged b, epoch 3`.
impl std::fmt::Display for SlotsMeta {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let n = |s: &Option<SlotName>| s.map_or("-", |s| s.as_str());
        write!(
            f,
            "active {}, previous {}, staged {}, epoch {}",
            n(&self.active),
            n(&self.previous),
            n(&self.staged),
            self.epoch
        )
    }
}

/// `slot.json`: what a slot holds.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct SlotInfo {
    /// The release.
    pub release: ReleaseRef,
    /// The exact signed manifest bytes, base64.
    pub manifest_b64: String,
    /// Its signature, base64.
    pub signature_b64: String,
    /// True once a trial passed (or it was the initial bundle).
    pub committed: bool,
    /// Increases each time the slot becomes active; recovery picks the largest.
    pub activated_seq: u64,
}

/// Slot errors.
#[derive(Debug, thiserror::Error)]
pub enum SlotError {
    /// Store failure.
    #[error(transparent)]
    Store(#[from] StoreError),
    /// Bundle / file failure.
    #[error("slot {slot}: {source}")]
    Bundle {
        /// The slot.
        slot: &'static str,
        /// The error.
        source: edgefleet_bundle::Error,
    },
    /// The slot's contents are not what its manifest says.
    #[error("slot {slot}: {reason}")]
    Invalid {
        /// The slot.
        slot: &'static str,
        /// What is wrong.
        reason: String,
    },
}

impl SlotError {
    fn bundle(slot: SlotName, source: edgefleet_bundle::Error) -> Self {
        SlotError::Bundle {
            slot: slot.as_str(),
            source,
        }
    }
    fn invalid(slot: SlotName, reason: impl Into<String>) -> Self {
        SlotError::Invalid {
            slot: slot.as_str(),
            reason: reason.into(),
        }
    }
}

/// The slot set.
#[derive(Debug)]
pub struct Slots {
    root: PathBuf,
    meta: SlotsMeta,
}

/// A slot whose manifest signature and every file hash were re-checked.
#[derive(Debug, Clone)]
pub struct CheckedSlot {
    /// The slot.
    pub slot: SlotName,
    /// Its `slot.json`.
    pub info: SlotInfo,
    /// The verified manifest.
    pub manifest: Manifest,
    /// Directory holding the payload files.
    pub files_dir: PathBuf,
}

impl Slots {
    /// Loads slot roles from the store; when the store has none (a fresh or
    /// rebuilt store) they are recovered from the `slot.json` files, at the
    /// guard's epoch. The caller raises the floor with [`committed_floor`].
    ///
    /// # Errors
    /// [`SlotError`].
    pub fn load(data_dir: &Path, store: &Store) -> Result<Self, SlotError> {
        let root = data_dir.join("slots");
        let meta = match store.get_json::<SlotsMeta>(keys::SLOTS)? {
            Some(m) => m,
            None => {
                let mut m = recover_meta(&root);
                m.epoch = store.guard_epoch();
                if m.active.is_some() {
                    tracing::warn!(roles = %m, "slot roles recovered from slot.json files");
                    store.put_json(keys::SLOTS, &m)?;
                }
                m
            }
        };
        Ok(Slots { root, meta })
    }

    /// The committed roles.
    pub fn meta(&self) -> SlotsMeta {
        self.meta
    }

    /// A copy of the roles to change; apply with [`Slots::commit`].
    pub fn edit(&self) -> SlotsMeta {
        self.meta
    }

    /// Persists `next` (flushed), then makes it current.
    ///
    /// # Errors
    /// [`SlotError::Store`]; on error the current roles are unchanged.
    pub fn commit(&mut self, store: &Store, next: SlotsMeta) -> Result<(), SlotError> {
        let next = SlotsMeta {
            epoch: self.meta.epoch.max(store.guard_epoch()) + 1,
            ..next
        };
        store.put_json(keys::SLOTS, &next)?;
        self.meta = next;
        // After sled's copy is flushed: the guard never runs ahead of it.
        store.note_roles_epoch(next.epoch)?;
        Ok(())
    }

    /// Slot directory.
    pub fn dir(&self, s: SlotName) -> PathBuf {
        self.root.join(s.as_str())
    }

    /// The slot an update installs into: not the active one.
    pub fn inactive(&self) -> SlotName {
        self.meta.active.map_or(SlotName::A, SlotName::other)
    }

    /// `slot.json` of a slot.
    pub fn info(&self, s: SlotName) -> Option<SlotInfo> {
        read_info(&self.root, s)
    }

    /// Installs a verified bundle into slot `s` (which must not be active):
    /// files, compressed payload tar, then `slot.json` last, each written
    /// atomically. `committed` marks an initial bundle.
    ///
    /// # Errors
    /// [`SlotError`].
    pub fn install(
        &self,
        s: SlotName,
        b: &VerifiedBundle,
        committed: bool,
    ) -> Result<SlotInfo, SlotError> {
        if self.meta.active == Some(s) {
            return Err(SlotError::invalid(
                s,
                "refusing to install over the active slot",
            ));
        }
        let dir = self.dir(s);
        let io = |e: std::io::Error| SlotError::invalid(s, format!("{}: {e}", dir.display()));
        // slot.json goes first so a half-written slot is never taken for a good one.
        match std::fs::remove_file(dir.join("slot.json")) {
            Ok(()) => {}
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
            Err(e) => return Err(io(e)),
        }
        if dir.join("files").exists() {
            std::fs::remove_dir_all(dir.join("files")).map_err(io)?;
        }
        std::fs::create_dir_all(&dir).map_err(io)?;
        b.install_files(&dir.join("files"))
            .map_err(|e| SlotError::bundle(s, e))?;
        let z = zstd::encode_all(b.payload_tar(), 3).map_err(io)?;
        fsio::write_atomic(&dir.join("payload.tar.zst"), &z)
            .map_err(|e| SlotError::bundle(s, e))?;
        let m = b.manifest();
        let b64 = base64::engine::general_purpose::STANDARD;
        let info = SlotInfo {
            release: release_ref(m),
            manifest_b64: b64.encode(b.signed().manifest_bytes()),
            signature_b64: b64.encode(b.signed().signature()),
            committed,
            activated_seq: 0,
        };
        write_info(&self.root, s, &info)?;
        Ok(info)
    }

    /// Marks slot `s` committed and newly activated in its `slot.json`.
    ///
    /// # Errors
    /// [`SlotError`].
    pub fn mark_activated(&self, s: SlotName, committed: bool) -> Result<(), SlotError> {
        let mut info = self
            .info(s)
            .ok_or_else(|| SlotError::invalid(s, "no slot.json"))?;
        let seq = [SlotName::A, SlotName::B]
            .iter()
            .filter_map(|x| self.info(*x))
            .map(|i| i.activated_seq)
            .max()
            .unwrap_or(0);
        info.committed |= committed;
        info.activated_seq = seq + 1;
        write_info(&self.root, s, &info)
    }

    /// The uncompressed payload tar of a slot (delta base).
    ///
    /// # Errors
    /// [`SlotError`].
    pub fn payload_tar(&self, s: SlotName) -> Result<Vec<u8>, SlotError> {
        let p = self.dir(s).join("payload.tar.zst");
        let z = fsio::read(&p).map_err(|e| SlotError::bundle(s, e))?;
        zstd::decode_all(&z[..]).map_err(|e| SlotError::invalid(s, format!("{}: {e}", p.display())))
    }

    /// Re-checks a slot before loading it: the stored manifest's signature
    /// against the trust store and target, and every file's size and SHA-256.
    ///
    /// # Errors
    /// [`SlotError`] naming the slot and file.
    pub fn check(
        &self,
        s: SlotName,
        trust: &TrustStore,
        target: &str,
    ) -> Result<CheckedSlot, SlotError> {
        let info = self
            .info(s)
            .ok_or_else(|| SlotError::invalid(s, "no slot.json (empty or half-installed)"))?;
        let manifest = verified_manifest(s, &info, trust, target)?;
        let files_dir = self.dir(s).join("files");
        for f in &manifest.files {
            let p = files_dir.join(&f.path);
            let bytes = fsio::read(&p).map_err(|e| SlotError::bundle(s, e))?;
            if bytes.len() as u64 != f.size || sha256(&bytes) != f.sha256 {
                return Err(SlotError::invalid(
                    s,
                    format!("{}: size or SHA-256 differs from the manifest", f.path),
                ));
            }
        }
        Ok(CheckedSlot {
            slot: s,
            info,
            manifest,
            files_dir,
        })
    }
}

/// The manifest of a slot's `slot.json`, its signature verified against
/// `trust` and `target` (not against today's floor: an installed slot passed
/// the floor when it was installed, and re-checking would forbid rollback).
fn verified_manifest(
    s: SlotName,
    info: &SlotInfo,
    trust: &TrustStore,
    target: &str,
) -> Result<Manifest, SlotError> {
    let b64 = base64::engine::general_purpose::STANDARD;
    let mb = b64
        .decode(&info.manifest_b64)
        .map_err(|e| SlotError::invalid(s, format!("manifest_b64: {e}")))?;
    let sig = b64
        .decode(&info.signature_b64)
        .map_err(|e| SlotError::invalid(s, format!("signature_b64: {e}")))?;
    let policy = Policy {
        target: edgefleet_bundle::TargetCheck::Device(target.into()),
        release: edgefleet_bundle::ReleaseFloor::NotApplicable,
        agent: edgefleet_bundle::AgentVersionCheck::Agent(crate::agent_version()),
    };
    SignedManifest::parse(mb, &sig)
        .and_then(|sm| sm.verify(trust, &policy))
        .map(|vm| vm.manifest().clone())
        .map_err(|e| SlotError::bundle(s, e))
}

/// The highest release that a slot under `data_dir/slots` holds as
/// committed, read from its signed manifest (the signature verified against
/// `trust` and `target`; a slot whose `slot.json` is missing, damaged or not
/// signed by a trusted key does not count). 0 when none. The release floor
/// is never below it, whatever happened to the store.
pub fn committed_floor(data_dir: &Path, trust: &TrustStore, target: &str) -> u64 {
    let root = data_dir.join("slots");
    [SlotName::A, SlotName::B]
        .into_iter()
        .filter_map(|s| {
            let info = read_info(&root, s).filter(|i| i.committed)?;
            match verified_manifest(s, &info, trust, target) {
                Ok(m) => Some(m.release),
                Err(e) => {
                    tracing::warn!(slot = s.as_str(), error = %e, "committed slot's manifest does not verify; not used for the floor");
                    None
                }
            }
        })
        .max()
        .unwrap_or(0)
}

/// The release a manifest describes.
pub fn release_ref(m: &Manifest) -> ReleaseRef {
    ReleaseRef {
        model: m.model.clone(),
        release: m.release,
        version: m.version.to_string(),
    }
}

fn read_info(root: &Path, s: SlotName) -> Option<SlotInfo> {
    let bytes = std::fs::read(root.join(s.as_str()).join("slot.json")).ok()?;
    serde_json::from_slice(&bytes).ok()
}

fn write_info(root: &Path, s: SlotName, info: &SlotInfo) -> Result<(), SlotError> {
    let bytes =
        serde_json::to_vec_pretty(info).map_err(|e| SlotError::invalid(s, e.to_string()))?;
    fsio::write_atomic(&root.join(s.as_str()).join("slot.json"), &bytes)
        .map_err(|e| SlotError::bundle(s, e))
}

/// Rebuilds slot roles from `slot.json` files: the committed slot activated
/// last is active, the other committed slot is previous; uncommitted slots
/// (a trial in progress when the store was lost) are dropped.
pub fn recover_meta(root: &Path) -> SlotsMeta {
    let mut committed: Vec<(u64, SlotName)> = [SlotName::A, SlotName::B]
        .into_iter()
        .filter_map(|s| {
            read_info(root, s)
                .filter(|i| i.committed)
                .map(|i| (i.activated_seq, s))
        })
        .collect();
    committed.sort();
    SlotsMeta {
        active: committed.last().map(|x| x.1),
        previous: committed.len().eq(&2).then(|| committed[0].1),
        staged: None,
        epoch: 0,
    }
}

#[cfg(test)]
mod display_tests {
    use super::*;

    #[test]
    fn roles_read_as_words() {
        let m = SlotsMeta {
            active: Some(SlotName::A),
            previous: None,
            staged: Some(SlotName::B),
            epoch: 3,
        };
        assert_eq!(m.to_string(), "active a, previous -, staged b, epoch 3");
    }
}
