//! The device registry: devices appear through hello, status (retained, and
//! the last will) and heartbeat; operators add tags and groups via the API.
//!
//! The registry follows what devices report: the active release from hello,
//! heartbeat and update events (committed, rolled back); `online` from the
//! control session (hello, status, heartbeat; the last will sets it false)
//! and from the heartbeat timeout ([`Registry::expire`]: nothing heard for
//! that long is offline); every device message refreshes `last_seen_ms`.

use std::collections::BTreeSet;
use std::sync::{Arc, Mutex};

use edgefleet_protocol::messages::{EventKind, Heartbeat, Hello, ReleaseRef, Status, UpdateEvent};
use serde::{Deserialize, Serialize};

use crate::store::{self, now_ms, Store};
use crate::Result;

/// What the server knows about one device.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, Default)]
pub struct Device {
    /// Device id.
    pub id: String,
    /// Connected (hello, status online, heartbeat) or not (status offline,
    /// the last will, or nothing heard for the heartbeat timeout).
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

/// Why a device record changed (the `cause` field of the registry's log lines).
pub mod cause {
    /// A hello message.
    pub const HELLO: &str = "hello";
    /// A status message (online, or offline: graceful or the last will).
    pub const STATUS: &str = "status";
    /// A heartbeat.
    pub const HEARTBEAT: &str = "heartbeat";
    /// An update event (committed, rolled back).
    pub const EVENT: &str = "event";
    /// Any other device message (telemetry, drift, chunk request).
    pub const MESSAGE: &str = "message";
    /// Nothing heard for the heartbeat timeout.
    pub const HEARTBEAT_TIMEOUT: &str = "heartbeat_timeout";
    /// An operator through the API.
    pub const OPERATOR: &str = "operator";
}

/// A message newer than this refreshes `last_seen_ms` again (ms): telemetry
/// and chunk requests do not each cost a store write.
const SEEN_RESOLUTION_MS: u64 = 1000;

/// Registry over the store. Every change goes through one lock, so a
/// heartbeat and the offline sweep never overwrite each other.
#[derive(Clone)]
pub struct Registry {
    store: Store,
    lock: Arc<Mutex<()>>,
}

impl Registry {
    /// Wraps the store.
    pub fn new(store: Store) -> Self {
        Registry {
            store,
            lock: Arc::default(),
        }
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

    /// Read-modify-write of one device by an operator (created when absent).
    ///
    /// # Errors
    /// Store errors.
    pub fn update(&self, id: &str, f: impl FnOnce(&mut Device)) -> Result<Device> {
        self.apply(id, cause::OPERATOR, f)
    }

    /// Read-modify-write of one device under the registry lock; logs what
    /// changed (one info line per change, each with an `event` field:
    /// `device_registered`, `device_online`, `device_offline`,
    /// `active_release_changed`).
    fn apply(&self, id: &str, why: &'static str, f: impl FnOnce(&mut Device)) -> Result<Device> {
        let _guard = self.lock.lock().unwrap_or_else(|p| p.into_inner());
        let before = self.get(id)?;
        let mut d = before.clone().unwrap_or_else(|| Device {
            id: id.to_string(),
            ..Device::default()
        });
        f(&mut d);
        store::put(&self.store.devices, id.as_bytes(), &d)?;
        log_changes(before.as_ref(), &d, why);
        Ok(d)
    }

    /// Applies a hello.
    ///
    /// # Errors
    /// Store errors.
    pub fn hello(&self, h: &Hello) -> Result<Device> {
        self.apply(h.device_id.as_str(), cause::HELLO, |d| {
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
        self.apply(s.device_id.as_str(), cause::STATUS, |d| {
            d.online = s.online;
            if s.online {
                d.last_seen_ms = now_ms();
            }
        })
    }

    /// Applies a heartbeat: online, seen now, and the active release and
    /// update state the device reports.
    ///
    /// # Errors
    /// Store errors.
    pub fn heartbeat(&self, h: &Heartbeat) -> Result<Device> {
        self.apply(h.device_id.as_str(), cause::HEARTBEAT, |d| {
            d.online = true;
            d.active = h.active.clone();
            d.update_state = Some(h.update_state.clone());
            d.last_seen_ms = now_ms();
        })
    }

    /// Applies an update event: seen now; `committed` makes the event's
    /// release active (the old one previous), `rolled_back` of the active
    /// release makes the previous one active again (the device swaps its
    /// slots the same way). A rollback during a trial changes nothing: the
    /// candidate never was active.
    ///
    /// # Errors
    /// Store errors.
    pub fn event(&self, ev: &UpdateEvent) -> Result<Device> {
        self.apply(ev.device_id.as_str(), cause::EVENT, |d| {
            d.last_seen_ms = now_ms();
            match ev.kind {
                EventKind::Committed if d.active.as_ref() != Some(&ev.release) => {
                    d.previous = d.active.take();
                    d.active = Some(ev.release.clone());
                }
                EventKind::RolledBack if d.active.as_ref() == Some(&ev.release) => {
                    std::mem::swap(&mut d.active, &mut d.previous);
                }
                _ => {}
            }
        })
    }

    /// Marks a device seen now (telemetry, drift, chunk requests). It does
    /// not set `online`: telemetry comes on the agent's second connection,
    /// which may outlive the control session the last will reported. Writes
    /// only when the last write is older than a second.
    ///
    /// # Errors
    /// Store errors.
    pub fn seen(&self, id: &str) -> Result<()> {
        let now = now_ms();
        if self
            .get(id)?
            .is_some_and(|d| now.saturating_sub(d.last_seen_ms) < SEEN_RESOLUTION_MS)
        {
            return Ok(());
        }
        self.apply(id, cause::MESSAGE, |d| d.last_seen_ms = now_ms())
            .map(|_| ())
    }

    /// Marks offline every online device not heard from for `timeout_ms`
    /// at `now_ms` (the heartbeat timeout). Returns their ids.
    ///
    /// # Errors
    /// Store errors.
    pub fn expire(&self, timeout_ms: u64, now_ms: u64) -> Result<Vec<String>> {
        let silent = |d: &Device| d.online && now_ms.saturating_sub(d.last_seen_ms) > timeout_ms;
        let mut out = Vec::new();
        for d in self.list()?.into_iter().filter(|d| silent(d)) {
            // Checked again under the lock: a heartbeat may have come since.
            let mut expired = false;
            self.apply(&d.id, cause::HEARTBEAT_TIMEOUT, |d| {
                if silent(d) {
                    d.online = false;
                    expired = true;
                }
            })?;
            if expired {
                out.push(d.id);
            }
        }
        Ok(out)
    }
}

/// One info line per change between `before` and `after`.
fn log_changes(before: Option<&Device>, after: &Device, why: &'static str) {
    let id = after.id.as_str();
    if before.is_none() {
        tracing::info!(
            event = "device_registered",
            device = id,
            target = after.target.as_deref().unwrap_or("-"),
            cause = why,
            "device registered"
        );
    }
    let was_online = before.is_some_and(|d| d.online);
    if after.online != was_online {
        if after.online {
            tracing::info!(
                event = "device_online",
                device = id,
                cause = why,
                "device online"
            );
        } else {
            tracing::info!(
                event = "device_offline",
                device = id,
                cause = why,
                last_seen_ms = after.last_seen_ms,
                "device offline"
            );
        }
    }
    let was_active = before.and_then(|d| d.active.as_ref());
    if after.active.as_ref() != was_active {
        let show = |r: Option<&ReleaseRef>| {
            r.map_or_else(
                || "none".to_string(),
                |r| format!("{}@{} ({})", r.model, r.release, r.version),
            )
        };
        tracing::info!(
            event = "active_release_changed", device = id, cause = why,
            from = %show(was_active), to = %show(after.active.as_ref()),
            "active release changed"
        );
    }
}

/// Which devices a rollout or a query selects. Empty fields match everything;
/// an unknown field is refused (a misspelt selector must not select everything).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, Default)]
#[serde(deny_unknown_fields)]
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
