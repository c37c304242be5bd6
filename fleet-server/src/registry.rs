//! The device registry: devices appear through hello, status (retained, and
//! the last will) and heartbeat; operators add tags and groups via the API.

use std::collections::BTreeSet;

use edgefleet_protocol::messages::{Heartbeat, Hello, ReleaseRef, Status};
use serde::{Deserialize, Serialize};

use crate::store::{self, now_ms, Store};
use crate::Result;

/// What the server knows about one device.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, Default)]
pub struct Device {
    /// Device id.
    pub id: String,
    /// Connected (hello / status online) or not (status offline, last will).
    pub online: bool,
    /// Target profile id.
    pub target: Option<String>,
    /// Agent version.
    pub agent_version: Option<String>,
    /// Release in the active slot.
    pub active: Option<ReleaseRef>,
    /// Release in the previous slot.
    pub previous: Option<ReleaseRef>,
    /// Update state reported by the agent.
    pub update_state: Option<String>,
    /// Last message received (server clock, ms since the epoch).
    pub last_seen_ms: u64,
    /// Tags from the agent's own config (hello).
    pub tags: BTreeSet<String>,
    /// Tags added by operators.
    pub operator_tags: BTreeSet<String>,
    /// Groups (operators assign them).
    pub groups: BTreeSet<String>,
    /// Agent process run id from the last hello.
    pub boot_id: Option<String>,
}

impl Device {
    /// Device tags and operator tags.
    pub fn has_tag(&self, t: &str) -> bool {
        self.tags.contains(t) || self.operator_tags.contains(t)
    }
}

/// Registry over the store.
#[derive(Clone)]
pub struct Registry {
    store: Store,
}

impl Registry {
    /// Wraps the store.
    pub fn new(store: Store) -> Self {
        Registry { store }
    }

    /// One device.
    ///
    /// # Errors
    /// Store errors.
    pub fn get(&self, id: &str) -> Result<Option<Device>> {
        store::get(&self.store.devices, id.as_bytes())
    }

    /// All devices, by id.
    ///
    /// # Errors
    /// Store errors.
    pub fn list(&self) -> Result<Vec<Device>> {
        store::scan(&self.store.devices, b"")
    }

    /// Read-modify-write of one device (created when absent).
    ///
    /// # Errors
    /// Store errors.
    pub fn update(&self, id: &str, f: impl FnOnce(&mut Device)) -> Result<Device> {
        let mut d = self.get(id)?.unwrap_or_else(|| Device {
            id: id.to_string(),
            ..Device::default()
        });
        f(&mut d);
        store::put(&self.store.devices, id.as_bytes(), &d)?;
        Ok(d)
    }

    /// Applies a hello.
    ///
    /// # Errors
    /// Store errors.
    pub fn hello(&self, h: &Hello) -> Result<Device> {
        self.update(h.device_id.as_str(), |d| {
            d.online = true;
            d.target = Some(h.target.clone());
            d.agent_version = Some(h.agent_version.clone());
            d.active = h.active.clone();
            d.previous = h.previous.clone();
            d.update_state = Some(h.update_state.clone());
            d.tags = h.tags.iter().cloned().collect();
            d.boot_id = Some(h.boot_id.clone());
            d.last_seen_ms = now_ms();
        })
    }

    /// Applies a status (online/offline, also the last will).
    ///
    /// # Errors
    /// Store errors.
    pub fn status(&self, s: &Status) -> Result<Device> {
        self.update(s.device_id.as_str(), |d| {
            d.online = s.online;
            if s.online {
                d.last_seen_ms = now_ms();
            }
        })
    }

    /// Applies a heartbeat.
    ///
    /// # Errors
    /// Store errors.
    pub fn heartbeat(&self, h: &Heartbeat) -> Result<Device> {
        self.update(h.device_id.as_str(), |d| {
            d.online = true;
            d.active = h.active.clone();
            d.update_state = Some(h.update_state.clone());
            d.last_seen_ms = now_ms();
        })
    }

    /// Marks a device seen (any message).
    ///
    /// # Errors
    /// Store errors.
    pub fn touch(&self, id: &str) -> Result<()> {
        self.update(id, |d| d.last_seen_ms = now_ms()).map(|_| ())
    }
}

/// Which devices a rollout or a query selects. Empty fields match everything.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, Default)]
pub struct Selector {
    /// Device must be in this group.
    #[serde(default)]
    pub group: Option<String>,
    /// Device must carry this tag.
    #[serde(default)]
    pub tag: Option<String>,
    /// Device must have this target profile.
    #[serde(default)]
    pub target: Option<String>,
}

impl Selector {
    /// True when `d` matches.
    pub fn matches(&self, d: &Device) -> bool {
        self.group.as_ref().is_none_or(|g| d.groups.contains(g))
            && self.tag.as_ref().is_none_or(|t| d.has_tag(t))
            && self
                .target
                .as_ref()
                .is_none_or(|t| d.target.as_deref() == Some(t.as_str()))
    }
}
