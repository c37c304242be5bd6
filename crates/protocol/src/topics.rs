//! Topic layout (docs/specs/mqtt.md, "Topics").
//!
//! ```text
//! edgefleet/v1/devices/{device_id}/up/{hello|status|heartbeat|telemetry|drift|event|chunk_req}   device -> server
//! edgefleet/v1/devices/{device_id}/down/{cmd|chunk}                                                server -> device
//! ```
//! A device's ACL is exactly: publish `edgefleet/v1/devices/{id}/up/#`,
//! subscribe `edgefleet/v1/devices/{id}/down/#`.

use std::fmt;
use std::str::FromStr;

use serde::{Deserialize, Serialize};

use crate::{Error, TOPIC_PREFIX};

/// Longest device id (bytes).
pub const MAX_DEVICE_ID_LEN: usize = 64;

/// A validated device id: 1-64 bytes of `[A-Za-z0-9._-]`, not starting with
/// `.` or `-`. This excludes the MQTT wildcards `+` and `#`, the level
/// separator `/`, `$` (broker-reserved topics), whitespace and NUL.
#[derive(Debug, Clone, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize)]
#[serde(try_from = "String", into = "String")]
pub struct DeviceId(String);

impl DeviceId {
    /// Validates `s`.
    ///
    /// # Errors
    /// [`Error::DeviceId`] naming the id and the rule.
    pub fn new(s: &str) -> Result<Self, Error> {
        let bad = |reason| Error::DeviceId {
            id: s.chars().take(80).collect(),
            reason,
        };
        if s.is_empty() {
            return Err(bad("empty"));
        }
        if s.len() > MAX_DEVICE_ID_LEN {
            return Err(bad("longer than 64 bytes"));
        }
        if s.starts_with('.') || s.starts_with('-') {
            return Err(bad("starts with `.` or `-`"));
        }
        if let Some(c) = s
            .chars()
            .find(|c| !(c.is_ascii_alphanumeric() || "._-".contains(*c)))
        {
            return Err(match c {
                '+' | '#' => bad("contains an MQTT wildcard (`+` or `#`)"),
                '/' => bad("contains the MQTT level separator `/`"),
                _ => bad("contains a character outside [A-Za-z0-9._-]"),
            });
        }
        Ok(DeviceId(s.to_string()))
    }
    /// The id text.
    pub fn as_str(&self) -> &str {
        &self.0
    }
}
impl FromStr for DeviceId {
    type Err = Error;
    fn from_str(s: &str) -> Result<Self, Error> {
        DeviceId::new(s)
    }
}
impl TryFrom<String> for DeviceId {
    type Error = Error;
    fn try_from(s: String) -> Result<Self, Error> {
        DeviceId::new(&s)
    }
}
impl From<DeviceId> for String {
    fn from(d: DeviceId) -> String {
        d.0
    }
}
impl fmt::Display for DeviceId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.0)
    }
}

/// Device -> server topic kinds.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum UpKind {
    /// `up/hello`: sent after every connect (QoS 1).
    Hello,
    /// `up/status`: retained online/offline; the last will publishes offline (QoS 1).
    Status,
    /// `up/heartbeat`: periodic liveness (QoS 0).
    Heartbeat,
    /// `up/telemetry`: telemetry batches (QoS 1, store-and-forward).
    Telemetry,
    /// `up/drift`: drift reports (QoS 1).
    Drift,
    /// `up/event`: update and rollback events (QoS 1).
    Event,
    /// `up/chunk_req`: bundle chunk requests (QoS 1).
    ChunkRequest,
    /// `up/capture`: capture batch chunks (QoS 1).
    Capture,
}

/// Server -> device topic kinds.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum DownKind {
    /// `down/cmd`: commands (update offer, cancel, rollback, config), QoS 1.
    Command,
    /// `down/chunk`: binary bundle chunks, QoS 1.
    Chunk,
}

impl UpKind {
    /// All kinds.
    pub const ALL: [UpKind; 8] = [
        UpKind::Hello,
        UpKind::Status,
        UpKind::Heartbeat,
        UpKind::Telemetry,
        UpKind::Drift,
        UpKind::Event,
        UpKind::ChunkRequest,
        UpKind::Capture,
    ];
    /// The last topic level.
    pub fn as_str(self) -> &'static str {
        match self {
            UpKind::Hello => "hello",
            UpKind::Status => "status",
            UpKind::Heartbeat => "heartbeat",
            UpKind::Telemetry => "telemetry",
            UpKind::Drift => "drift",
            UpKind::Event => "event",
            UpKind::ChunkRequest => "chunk_req",
            UpKind::Capture => "capture",
        }
    }
}

impl DownKind {
    /// The last topic level.
    pub fn as_str(self) -> &'static str {
        match self {
            DownKind::Command => "cmd",
            DownKind::Chunk => "chunk",
        }
    }
}

/// `edgefleet/v1/devices/{id}/up/{kind}`.
pub fn up(id: &DeviceId, kind: UpKind) -> String {
    format!("{TOPIC_PREFIX}/devices/{id}/up/{}", kind.as_str())
}
/// `edgefleet/v1/devices/{id}/down/{kind}`.
pub fn down(id: &DeviceId, kind: DownKind) -> String {
    format!("{TOPIC_PREFIX}/devices/{id}/down/{}", kind.as_str())
}
/// What the server subscribes to: every device's up topics.
pub fn all_up_filter() -> String {
    format!("{TOPIC_PREFIX}/devices/+/up/#")
}
/// What a device subscribes to: its own down topics.
pub fn down_filter(id: &DeviceId) -> String {
    format!("{TOPIC_PREFIX}/devices/{id}/down/#")
}
/// What a device may publish to (its ACL write pattern).
pub fn up_filter(id: &DeviceId) -> String {
    format!("{TOPIC_PREFIX}/devices/{id}/up/#")
}

/// A parsed edgefleet topic.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Topic {
    /// Device -> server.
    Up(DeviceId, UpKind),
    /// Server -> device.
    Down(DeviceId, DownKind),
}

/// Parses a topic.
///
/// # Errors
/// [`Error::Topic`] naming the topic, or [`Error::DeviceId`].
pub fn parse(topic: &str) -> Result<Topic, Error> {
    let bad = |reason: &str| Error::Topic {
        topic: topic.chars().take(200).collect(),
        reason: reason.into(),
    };
    let rest = topic
        .strip_prefix(TOPIC_PREFIX)
        .and_then(|r| r.strip_prefix("/devices/"))
        .ok_or_else(|| bad("does not start with edgefleet/v1/devices/"))?;
    let parts: Vec<&str> = rest.split('/').collect();
    let [id, dir, kind] = parts.as_slice() else {
        return Err(bad("expected devices/{id}/{up|down}/{kind}"));
    };
    let id = DeviceId::new(id)?;
    match *dir {
        "up" => UpKind::ALL
            .iter()
            .find(|k| k.as_str() == *kind)
            .map(|k| Topic::Up(id, *k))
            .ok_or_else(|| bad("unknown up kind")),
        "down" => match *kind {
            "cmd" => Ok(Topic::Down(id, DownKind::Command)),
            "chunk" => Ok(Topic::Down(id, DownKind::Chunk)),
            _ => Err(bad("unknown down kind")),
        },
        _ => Err(bad("direction must be up or down")),
    }
}
