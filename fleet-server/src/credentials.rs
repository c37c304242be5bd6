//! Per-device broker credentials (docs/fleet-server.md, "Device isolation").
//!
//! The server issues each device a random secret (`POST
//! /v1/devices/{id}/credentials`): the device's broker username is its id, its
//! password the secret. The secret is returned once; the store keeps only a
//! salted hash. The embedded broker checks connects against these
//! ([`BrokerAuth`]); for Mosquitto the operator adds the same username and
//! secret to its password file with `mosquitto_passwd`.
//!
//! Design: the secrets are 256 random bits chosen by the server, not passwords
//! people pick, so there is nothing to gain from a slow password hash (a
//! guess succeeds with probability 2^-256 whatever the hash costs); a salted
//! SHA-256 is enough, adds no dependency, and keeps the broker's connect path
//! cheap when a whole fleet reconnects at once.

use edgefleet_protocol::DeviceId;
use rand::RngCore as _;
use serde::{Deserialize, Serialize};
use sha2::{Digest as _, Sha256};

use crate::store::{self, now_ms};
use crate::{Error, Result};

/// Hash scheme of stored records: SHA-256(domain, salt, secret).
pub const SCHEME: &str = "sha256-salted-v1";
const DOMAIN: &[u8] = b"edgefleet device broker secret v1\0";
/// Suffix of the agent's second MQTT connection (its telemetry publisher).
pub const TELEMETRY_SUFFIX: &str = "-telemetry";

/// What the store keeps for a device (never the secret).
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct Stored {
    /// Hash scheme ([`SCHEME`]).
    pub scheme: String,
    /// Random salt (hex).
    pub salt: String,
    /// SHA-256(domain ++ salt ++ secret) (hex).
    pub hash: String,
    /// When the secret was issued (server clock, ms since the epoch).
    pub issued_ms: u64,
}

/// A freshly issued secret (returned once, by the API).
#[derive(Debug, Clone, Serialize)]
pub struct Issued {
    /// Device id = broker username.
    pub device: String,
    /// Broker username (the device id).
    pub username: String,
    /// The secret (broker password). Not stored.
    pub password: String,
    /// When it was issued (ms since the epoch).
    pub issued_ms: u64,
    /// Whether an earlier secret was replaced (it no longer works).
    pub rotated: bool,
}

/// Credential records in the `credentials` tree (device id -> [`Stored`]).
#[derive(Clone)]
pub struct Credentials {
    tree: sled::Tree,
    reserved: Vec<String>,
}

fn digest(salt: &[u8], secret: &str) -> [u8; 32] {
    let mut h = Sha256::new();
    h.update(DOMAIN);
    h.update(salt);
    h.update(secret.as_bytes());
    h.finalize().into()
}

fn ct_eq(a: &[u8], b: &[u8]) -> bool {
    a.len() == b.len() && a.iter().zip(b).fold(0u8, |acc, (x, y)| acc | (x ^ y)) == 0
}

impl Credentials {
    /// Credentials in `tree`; `reserved` are usernames no device may get
    /// (the server's own broker username).
    pub fn new(tree: sled::Tree, reserved: Vec<String>) -> Self {
        Credentials { tree, reserved }
    }

    /// Checks that `id` may get credentials.
    ///
    /// # Errors
    /// [`Error::BadRequest`] (field `id`) saying why not.
    pub fn check_id(&self, id: &str) -> Result<DeviceId> {
        let d = DeviceId::new(id).map_err(|e| Error::bad("id", e.to_string()))?;
        if self.reserved.iter().any(|r| r == id) {
            return Err(Error::bad(
                "id",
                format!("`{id}` is the server's own broker username"),
            ));
        }
        if id.ends_with(TELEMETRY_SUFFIX) {
            // Device `x` also connects as client id `x-telemetry`: a device
            // named `x-telemetry` would share (and lose) its MQTT session.
            return Err(Error::bad(
                "id",
                format!(
                    "`{id}` ends in `{TELEMETRY_SUFFIX}`, the suffix of every agent's telemetry \
                     connection (client id `<device>{TELEMETRY_SUFFIX}`)"
                ),
            ));
        }
        Ok(d)
    }

    /// Creates or rotates the secret of `id` and returns it (the only copy).
    ///
    /// # Errors
    /// [`Error::BadRequest`] for an id that cannot have credentials, store errors.
    pub fn issue(&self, id: &str) -> Result<Issued> {
        let d = self.check_id(id)?;
        let mut secret = [0u8; 32];
        let mut salt = [0u8; 16];
        rand::rngs::OsRng.fill_bytes(&mut secret);
        rand::rngs::OsRng.fill_bytes(&mut salt);
        let password = hex::encode(secret);
        let rec = Stored {
            scheme: SCHEME.into(),
            salt: hex::encode(salt),
            hash: hex::encode(digest(&salt, &password)),
            issued_ms: now_ms(),
        };
        let v = serde_json::to_vec(&rec).map_err(|e| Error::Corrupt {
            key: d.to_string(),
            reason: e.to_string(),
        })?;
        let old = self.tree.insert(d.as_str().as_bytes(), v)?;
        self.tree.flush()?;
        Ok(Issued {
            device: d.to_string(),
            username: d.to_string(),
            password,
            issued_ms: rec.issued_ms,
            rotated: old.is_some(),
        })
    }

    /// The stored record of `id` (no secret in it).
    ///
    /// # Errors
    /// Store errors, [`Error::Corrupt`].
    pub fn get(&self, id: &str) -> Result<Option<Stored>> {
        store::get(&self.tree, id.as_bytes())
    }

    /// Removes the credentials of `id`; returns whether there were any.
    ///
    /// # Errors
    /// Store errors.
    pub fn revoke(&self, id: &str) -> Result<bool> {
        let old = self.tree.remove(id.as_bytes())?;
        self.tree.flush()?;
        Ok(old.is_some())
    }

    /// Whether `secret` is the current secret of device `id`.
    ///
    /// # Errors
    /// Store errors, [`Error::Corrupt`] (a record that does not decode).
    pub fn verify(&self, id: &str, secret: &str) -> Result<bool> {
        let Some(rec) = self.get(id)? else {
            return Ok(false);
        };
        let corrupt = |r: &str| Error::Corrupt {
            key: id.to_string(),
            reason: r.to_string(),
        };
        if rec.scheme != SCHEME {
            return Err(corrupt("unknown credential scheme"));
        }
        let salt = hex::decode(&rec.salt).map_err(|_| corrupt("salt is not hex"))?;
        let want = hex::decode(&rec.hash).map_err(|_| corrupt("hash is not hex"))?;
        Ok(ct_eq(&digest(&salt, secret), &want))
    }
}

/// Why the embedded broker refused a connection (logged, never sent to the client).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Refusal {
    /// No username, or one that is neither the server's nor a valid device id.
    UnknownUser,
    /// The username is a device id without credentials.
    NoCredentials,
    /// Wrong password.
    WrongSecret,
    /// Right credentials, but a client id other than `<id>` or `<id>-telemetry`.
    ClientIdMismatch,
    /// The credential store failed or holds a bad record.
    StoreError,
}

impl Refusal {
    /// A short machine-readable reason.
    pub fn as_str(self) -> &'static str {
        match self {
            Refusal::UnknownUser => "unknown_user",
            Refusal::NoCredentials => "no_credentials",
            Refusal::WrongSecret => "wrong_secret",
            Refusal::ClientIdMismatch => "client_id_mismatch",
            Refusal::StoreError => "store_error",
        }
    }
}

/// Who connected.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Principal {
    /// The fleet server itself (or a tool given its credentials).
    Server,
    /// A device.
    Device(DeviceId),
}

/// The embedded broker's connect check: the server's own username with its
/// password, or a device id with its current secret and a client id that is
/// the device id or `<id>-telemetry` (the agent's two connections).
#[derive(Clone, Copy)]
pub struct BrokerAuth<'a> {
    /// Device credentials.
    pub credentials: &'a Credentials,
    /// The server's broker username and password.
    pub server: (&'a str, &'a str),
}

impl BrokerAuth<'_> {
    /// Decides one CONNECT.
    ///
    /// # Errors
    /// The [`Refusal`].
    pub fn check(
        &self,
        client_id: &str,
        username: &str,
        password: &str,
    ) -> std::result::Result<Principal, Refusal> {
        if username == self.server.0 {
            // Compared as digests: constant time, lengths do not leak.
            return if ct_eq(
                &Sha256::digest(password.as_bytes()),
                &Sha256::digest(self.server.1.as_bytes()),
            ) {
                Ok(Principal::Server)
            } else {
                Err(Refusal::WrongSecret)
            };
        }
        let Ok(id) = DeviceId::new(username) else {
            return Err(Refusal::UnknownUser);
        };
        let rec = self
            .credentials
            .get(username)
            .map_err(|_| Refusal::StoreError)?;
        if rec.is_none() {
            return Err(Refusal::NoCredentials);
        }
        if !self
            .credentials
            .verify(username, password)
            .map_err(|_| Refusal::StoreError)?
        {
            return Err(Refusal::WrongSecret);
        }
        let ok_client = client_id == username
            || client_id
                .strip_suffix(TELEMETRY_SUFFIX)
                .is_some_and(|p| p == username);
        if !ok_client {
            return Err(Refusal::ClientIdMismatch);
        }
        Ok(Principal::Device(id))
    }
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;

    fn creds() -> Credentials {
        let db = sled::Config::new().temporary(true).open().unwrap();
        let t = db.open_tree("credentials").unwrap();
        Credentials::new(t, vec!["edgefleet-server".into()])
    }

    #[test]
    fn issue_verify_rotate_revoke() {
        let c = creds();
        let a = c.issue("cam-1").unwrap();
        assert!(!a.rotated);
        assert_eq!(a.username, "cam-1");
        assert_eq!(a.password.len(), 64);
        assert!(c.verify("cam-1", &a.password).unwrap());
        assert!(!c.verify("cam-1", "nope").unwrap());
        assert!(!c.verify("cam-2", &a.password).unwrap());
        let stored = serde_json::to_string(&c.get("cam-1").unwrap().unwrap()).unwrap();
        assert!(!stored.contains(&a.password), "only a hash is stored");
        let b = c.issue("cam-1").unwrap();
        assert!(b.rotated);
        assert_ne!(a.password, b.password);
        assert!(
            !c.verify("cam-1", &a.password).unwrap(),
            "old secret revoked"
        );
        assert!(c.verify("cam-1", &b.password).unwrap());
        assert!(c.revoke("cam-1").unwrap());
        assert!(!c.verify("cam-1", &b.password).unwrap());
        assert!(!c.revoke("cam-1").unwrap());
    }

    #[test]
    fn ids_that_cannot_have_credentials() {
        let c = creds();
        for bad in [
            "",
            "a/b",
            "+",
            "#",
            "-x",
            "edgefleet-server",
            "cam-telemetry",
        ] {
            assert!(
                matches!(c.issue(bad), Err(Error::BadRequest { field: "id", .. })),
                "{bad}"
            );
        }
    }

    #[test]
    fn broker_connect_rules() {
        let c = creds();
        let s = c.issue("cam-1").unwrap().password;
        let auth = BrokerAuth {
            credentials: &c,
            server: ("edgefleet-server", "srv"),
        };
        assert_eq!(
            auth.check("any", "edgefleet-server", "srv"),
            Ok(Principal::Server)
        );
        assert_eq!(
            auth.check("any", "edgefleet-server", "x"),
            Err(Refusal::WrongSecret)
        );
        let dev = Ok(Principal::Device("cam-1".parse().unwrap()));
        assert_eq!(auth.check("cam-1", "cam-1", &s), dev);
        assert_eq!(auth.check("cam-1-telemetry", "cam-1", &s), dev);
        assert_eq!(
            auth.check("cam-2", "cam-1", &s),
            Err(Refusal::ClientIdMismatch)
        );
        assert_eq!(
            auth.check("cam-1x", "cam-1", &s),
            Err(Refusal::ClientIdMismatch)
        );
        assert_eq!(auth.check("", "cam-1", &s), Err(Refusal::ClientIdMismatch));
        assert_eq!(
            auth.check("cam-1", "cam-1", "wrong"),
            Err(Refusal::WrongSecret)
        );
        assert_eq!(
            auth.check("cam-2", "cam-2", &s),
            Err(Refusal::NoCredentials)
        );
        assert_eq!(auth.check("x", "", ""), Err(Refusal::UnknownUser));
        assert_eq!(auth.check("x", "a/b", &s), Err(Refusal::UnknownUser));
    }
}
