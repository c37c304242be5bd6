//! edgefleet's MQTT protocol: topics, messages and their encoding, with no I/O
//! (specified in `docs/specs/mqtt.md`).
//!
//! - [`topics`]: the topic layout under [`TOPIC_PREFIX`] and the device id rules;
//! - [`messages`]: JSON control messages (device -> server `Up`, server -> device `Down`);
//! - [`chunk`]: the binary bundle-chunk message;
//! - [`capture`]: data capture for retraining (policy, chunks, acks, feedback);
//! - [`telemetry`]: metric names (the telemetry spec in code) and record types.
//!
//! Size limits are constants here so both sides use the same numbers:
//! decoders reject anything above [`MAX_MESSAGE_BYTES`] with an error, and the
//! MQTT clients and the broker are configured with [`MQTT_MAX_PACKET_BYTES`],
//! which is larger, so an oversized message reaches the decoder and is
//! rejected there instead of tearing down the MQTT session.

pub mod capture;
pub mod chunk;
mod error;
pub mod messages;
pub mod telemetry;
pub mod topics;

pub use error::Error;
pub use messages::{Down, Up};
pub use topics::DeviceId;

/// Version of the message schema; carried in every JSON message as `"v"` and
/// in the topic prefix.
pub const PROTOCOL_VERSION: u32 = 1;
/// Every edgefleet topic starts with this.
pub const TOPIC_PREFIX: &str = "edgefleet/v1";
/// Largest application message a decoder accepts (bytes).
pub const MAX_MESSAGE_BYTES: usize = 512 * 1024;
/// MQTT maximum packet size to configure on clients (both directions) and the
/// broker (bytes). Larger than [`MAX_MESSAGE_BYTES`] on purpose: see the crate docs.
pub const MQTT_MAX_PACKET_BYTES: usize = 1024 * 1024;
/// MQTT keep-alive the agent uses (seconds); the broker publishes the last
/// will after 1.5x this without traffic.
pub const KEEP_ALIVE_S: u64 = 15;
/// How often an agent publishes `up/heartbeat` by default (seconds;
/// docs/specs/mqtt.md, "Heartbeat and liveness").
pub const HEARTBEAT_INTERVAL_S: u64 = 30;
/// The server marks a device offline when it has heard nothing from it for
/// this long (seconds): three missed heartbeats at [`HEARTBEAT_INTERVAL_S`].
pub const HEARTBEAT_TIMEOUT_S: u64 = 3 * HEARTBEAT_INTERVAL_S;
