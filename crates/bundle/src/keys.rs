//! Signing keys, key ids, and the device's trust store (several trusted keys
//! at once for rotation; revocation; rotation statements signed by the old key).
//!
//! Keys are ed25519 (RFC 8032) stored as PKCS#8 / SPKI PEM (RFC 8410), so
//! OpenSSL reads them: `openssl pkeyutl -verify -pubin -inkey k.pub.pem -rawin
//! -in manifest.json -sigfile manifest.sig`.

use std::collections::BTreeMap;
use std::fmt;
use std::path::Path;

use ed25519_dalek::pkcs8::spki::der::pem::LineEnding;
use ed25519_dalek::pkcs8::{DecodePrivateKey, DecodePublicKey, EncodePrivateKey, EncodePublicKey};
use ed25519_dalek::{Signer, Verifier};
use serde::{Deserialize, Serialize};

use crate::{fsio, sha256, Error};

/// A key id: the first 16 bytes of SHA-256 over the raw 32-byte ed25519
/// public key, as 32 lowercase hex characters.
#[derive(Clone, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize)]
#[serde(try_from = "String", into = "String")]
pub struct KeyId(String);

impl KeyId {
    /// The key id of a public key.
    pub fn of(key: &PublicKey) -> Self {
        KeyId(hex::encode(&sha256(key.0.as_bytes()).0[..16]))
    }
    /// The hex text.
    pub fn as_str(&self) -> &str {
        &self.0
    }
}
impl TryFrom<String> for KeyId {
    type Error = String;
    fn try_from(s: String) -> Result<Self, String> {
        if s.len() == 32
            && s.bytes()
                .all(|c| c.is_ascii_digit() || (b'a'..=b'f').contains(&c))
        {
            Ok(KeyId(s))
        } else {
            Err(format!("key id `{s}` is not 32 lowercase hex characters"))
        }
    }
}
impl From<KeyId> for String {
    fn from(k: KeyId) -> String {
        k.0
    }
}
impl fmt::Display for KeyId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.0)
    }
}
impl fmt::Debug for KeyId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "KeyId({})", self.0)
    }
}

/// An ed25519 public key.
#[derive(Clone, Copy, PartialEq, Eq)]
pub struct PublicKey(pub(crate) ed25519_dalek::VerifyingKey);

impl fmt::Debug for PublicKey {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "PublicKey({})", KeyId::of(self))
    }
}

impl PublicKey {
    /// Parses an SPKI PEM (`-----BEGIN PUBLIC KEY-----`).
    ///
    /// # Errors
    /// [`Error::Key`] naming `origin`.
    pub fn from_pem(pem: &str, origin: &Path) -> Result<Self, Error> {
        ed25519_dalek::VerifyingKey::from_public_key_pem(pem)
            .map(PublicKey)
            .map_err(|e| Error::Key {
                path: origin.into(),
                reason: format!("not an ed25519 SPKI PEM public key: {e}"),
            })
    }
    /// Reads an SPKI PEM file.
    ///
    /// # Errors
    /// [`Error::Io`] or [`Error::Key`] naming the file.
    pub fn from_pem_file(path: &Path) -> Result<Self, Error> {
        let text = String::from_utf8(fsio::read(path)?).map_err(|_| Error::Key {
            path: path.into(),
            reason: "not UTF-8 text".into(),
        })?;
        Self::from_pem(&text, path)
    }
    /// SPKI PEM text.
    pub fn to_pem(&self) -> String {
        self.0.to_public_key_pem(LineEnding::LF).unwrap_or_default()
    }
    /// The key id.
    pub fn key_id(&self) -> KeyId {
        KeyId::of(self)
    }
    /// Verifies a 64-byte ed25519 signature over `msg` (strict verification:
    /// rejects small-order keys and non-canonical signatures).
    pub fn verify(&self, msg: &[u8], sig: &[u8; 64]) -> bool {
        let sig = ed25519_dalek::Signature::from_bytes(sig);
        self.0.verify_strict(msg, &sig).is_ok() && self.0.verify(msg, &sig).is_ok()
    }
}

/// An ed25519 signing key. Never printed by `Debug`.
pub struct SigningKey(ed25519_dalek::SigningKey);

impl fmt::Debug for SigningKey {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "SigningKey({})", self.key_id())
    }
}

impl SigningKey {
    /// A fresh key from the OS random number generator.
    pub fn generate() -> Self {
        SigningKey(ed25519_dalek::SigningKey::generate(&mut rand::rngs::OsRng))
    }
    /// A key from a 32-byte seed (tests and fixtures only need determinism).
    pub fn from_seed(seed: [u8; 32]) -> Self {
        SigningKey(ed25519_dalek::SigningKey::from_bytes(&seed))
    }
    /// Parses a PKCS#8 PEM private key (`-----BEGIN PRIVATE KEY-----`).
    ///
    /// # Errors
    /// [`Error::Key`] naming `origin`.
    pub fn from_pem(pem: &str, origin: &Path) -> Result<Self, Error> {
        ed25519_dalek::SigningKey::from_pkcs8_pem(pem)
            .map(SigningKey)
            .map_err(|e| Error::Key {
                path: origin.into(),
                reason: format!("not an ed25519 PKCS#8 PEM private key: {e}"),
            })
    }
    /// Reads a PKCS#8 PEM private key file.
    ///
    /// # Errors
    /// [`Error::Io`] or [`Error::Key`] naming the file.
    pub fn from_pkcs8_pem_file(path: &Path) -> Result<Self, Error> {
        let text = String::from_utf8(fsio::read(path)?).map_err(|_| Error::Key {
            path: path.into(),
            reason: "not UTF-8 text".into(),
        })?;
        Self::from_pem(&text, path)
    }
    /// Writes the private key (PKCS#8 PEM, mode 0600) and the public key (SPKI
    /// PEM, mode 0644), each atomically.
    ///
    /// # Errors
    /// [`Error::Io`] naming the file.
    pub fn write_pem_files(&self, private: &Path, public: &Path) -> Result<(), Error> {
        // PKCS#8 v1 (RFC 8410 section 7, no embedded public key): OpenSSL 3.0
        // refuses the v2 form that ed25519-dalek writes by default.
        let pem = ed25519_dalek::pkcs8::KeypairBytes {
            secret_key: self.0.to_bytes(),
            public_key: None,
        }
        .to_pkcs8_pem(LineEnding::LF)
        .map_err(|e| Error::Key {
            path: private.into(),
            reason: e.to_string(),
        })?;
        fsio::write_atomic_mode(private, pem.as_bytes(), 0o600)?;
        fsio::write_atomic(public, self.public_key().to_pem().as_bytes())
    }
    /// The public half.
    pub fn public_key(&self) -> PublicKey {
        PublicKey(self.0.verifying_key())
    }
    /// The key id of the public half.
    pub fn key_id(&self) -> KeyId {
        self.public_key().key_id()
    }
    /// Signs `msg` (pure ed25519, RFC 8032 section 5.1.6).
    pub fn sign(&self, msg: &[u8]) -> [u8; 64] {
        self.0.sign(msg).to_bytes()
    }
}

/// Whether a key in the trust store may still sign.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum KeyState {
    /// Signatures by this key are accepted.
    Trusted,
    /// Signatures by this key are refused; it is kept so it cannot be re-added by a rotation.
    Revoked,
}

#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
struct StoredKey {
    key_id: KeyId,
    public_key_pem: String,
    state: KeyState,
}

#[derive(Debug, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
struct StoredTrust {
    format_version: u32,
    keys: Vec<StoredKey>,
}

/// The set of keys a device (or the server) accepts signatures from.
#[derive(Debug, Clone, Default)]
pub struct TrustStore {
    keys: BTreeMap<KeyId, (PublicKey, KeyState)>,
}

/// A statement, signed by a trusted key, that adds a new key to the trust
/// store (key rotation). Serialized as JSON; the signature is detached.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RotationStatement {
    /// Always 1.
    pub format_version: u32,
    /// The key that signs this statement; must be trusted and not revoked.
    pub old_key_id: KeyId,
    /// The key being added.
    pub new_key_id: KeyId,
    /// The new key, SPKI PEM.
    pub new_public_key_pem: String,
}

impl RotationStatement {
    /// Builds and signs a statement that `old` vouches for `new`.
    /// Returns the statement bytes and the detached signature.
    pub fn sign(old: &SigningKey, new: &PublicKey) -> (Vec<u8>, [u8; 64]) {
        let st = RotationStatement {
            format_version: 1,
            old_key_id: old.key_id(),
            new_key_id: new.key_id(),
            new_public_key_pem: new.to_pem(),
        };
        let bytes = serde_json::to_vec_pretty(&st).unwrap_or_default();
        let sig = old.sign(&bytes);
        (bytes, sig)
    }
}

impl TrustStore {
    /// An empty store (accepts nothing).
    pub fn new() -> Self {
        Self::default()
    }

    /// Adds a root key directly (provisioning; not over the air).
    pub fn add(&mut self, key: PublicKey) -> KeyId {
        let id = key.key_id();
        self.keys
            .entry(id.clone())
            .or_insert((key, KeyState::Trusted));
        id
    }

    /// Marks a key revoked. Revocation is permanent: the key is kept as revoked
    /// so a rotation statement cannot add it back.
    ///
    /// # Errors
    /// [`Error::Trust`] when the key is not in the store.
    pub fn revoke(&mut self, id: &KeyId) -> Result<(), Error> {
        match self.keys.get_mut(id) {
            Some(e) => {
                e.1 = KeyState::Revoked;
                Ok(())
            }
            None => Err(Error::Trust {
                reason: format!("cannot revoke key {id}: not in the trust store"),
            }),
        }
    }

    /// Applies a rotation statement signed by a currently trusted key.
    ///
    /// # Errors
    /// [`Error::Trust`] when the statement does not parse, is signed by an
    /// unknown or revoked key, the signature fails, the new key's id does not
    /// match its PEM, or the new key was revoked before.
    pub fn apply_rotation(&mut self, statement: &[u8], sig: &[u8; 64]) -> Result<KeyId, Error> {
        let st: RotationStatement =
            serde_json::from_slice(statement).map_err(|e| Error::Trust {
                reason: format!("rotation statement does not parse: {e}"),
            })?;
        if st.format_version != 1 {
            return Err(Error::Trust {
                reason: format!(
                    "rotation statement format_version {} unsupported",
                    st.format_version
                ),
            });
        }
        let old = self.lookup(&st.old_key_id).map_err(|e| Error::Trust {
            reason: format!("rotation: {e}"),
        })?;
        if !old.verify(statement, sig) {
            return Err(Error::Trust {
                reason: format!(
                    "rotation statement signature does not verify with key {}",
                    st.old_key_id
                ),
            });
        }
        let new = PublicKey::from_pem(&st.new_public_key_pem, Path::new("rotation statement"))?;
        if new.key_id() != st.new_key_id {
            return Err(Error::Trust {
                reason: "rotation statement new_key_id does not match its PEM".into(),
            });
        }
        if let Some((_, KeyState::Revoked)) = self.keys.get(&st.new_key_id) {
            return Err(Error::Trust {
                reason: format!("rotation would re-add revoked key {}", st.new_key_id),
            });
        }
        Ok(self.add(new))
    }

    /// The trusted key with this id.
    ///
    /// # Errors
    /// [`Error::UnknownKey`] or [`Error::RevokedKey`].
    pub fn lookup(&self, id: &KeyId) -> Result<PublicKey, Error> {
        match self.keys.get(id) {
            None => Err(Error::UnknownKey {
                key_id: id.to_string(),
            }),
            Some((_, KeyState::Revoked)) => Err(Error::RevokedKey {
                key_id: id.to_string(),
            }),
            Some((k, KeyState::Trusted)) => Ok(*k),
        }
    }

    /// All keys with their states.
    pub fn keys(&self) -> impl Iterator<Item = (&KeyId, KeyState)> {
        self.keys.iter().map(|(id, (_, s))| (id, *s))
    }

    /// Loads a trust store: a JSON file written by [`TrustStore::save`], or a
    /// single SPKI PEM public key file (trusted).
    ///
    /// # Errors
    /// [`Error::Io`], [`Error::Key`] or [`Error::Trust`] naming the file.
    pub fn load(path: &Path) -> Result<Self, Error> {
        let bytes = fsio::read(path)?;
        let mut ts = TrustStore::new();
        if bytes.starts_with(b"-----BEGIN") {
            let text = String::from_utf8_lossy(&bytes);
            ts.add(PublicKey::from_pem(&text, path)?);
            return Ok(ts);
        }
        let st: StoredTrust = serde_json::from_slice(&bytes).map_err(|e| Error::Trust {
            reason: format!("{}: {e}", path.display()),
        })?;
        if st.format_version != 1 {
            return Err(Error::Trust {
                reason: format!(
                    "{}: format_version {} unsupported",
                    path.display(),
                    st.format_version
                ),
            });
        }
        for k in st.keys {
            let key = PublicKey::from_pem(&k.public_key_pem, path)?;
            if key.key_id() != k.key_id {
                return Err(Error::Trust {
                    reason: format!(
                        "{}: key {} does not match its PEM",
                        path.display(),
                        k.key_id
                    ),
                });
            }
            ts.keys.insert(k.key_id, (key, k.state));
        }
        Ok(ts)
    }

    /// Merges another store into this one; a revocation in either wins.
    pub fn merge(&mut self, other: TrustStore) {
        for (id, (k, s)) in other.keys {
            let e = self.keys.entry(id).or_insert((k, s));
            if s == KeyState::Revoked {
                e.1 = KeyState::Revoked;
            }
        }
    }

    /// Writes the store as JSON, atomically.
    ///
    /// # Errors
    /// [`Error::Io`] naming the file.
    pub fn save(&self, path: &Path) -> Result<(), Error> {
        let st = StoredTrust {
            format_version: 1,
            keys: self
                .keys
                .iter()
                .map(|(id, (k, s))| StoredKey {
                    key_id: id.clone(),
                    public_key_pem: k.to_pem(),
                    state: *s,
                })
                .collect(),
        };
        fsio::write_atomic(path, &serde_json::to_vec_pretty(&st).unwrap_or_default())
    }
}
