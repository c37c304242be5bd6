//! Telemetry: per-release request statistics, the store-and-forward outbox and
//! the MQTT publisher that drains it (specified in `docs/specs/telemetry.md`).
//!
//! Wiring (done by the agent's owner of `main`/`mqtt`):
//!
//! ```text
//! runtime --record_ok/record_error--> Stats (behind a Mutex)
//! every telemetry interval: Stats::snapshot_all_and_reset() --append--> Outbox (sled)
//! Publisher::run(outbox, AsyncClient, LinkEvent receiver) --QoS 1--> broker
//! mqtt eventloop --forward_event(&Event)--> LinkEvent sender (ConnAck, Outgoing publish pkids, PubAck pkids)
//! ```
//!
//! Every component here is independent of the rest of the agent: they only
//! use the protocol crate's types, sled and rumqttc.

pub mod outbox;
pub mod publisher;
pub mod stats;

pub use outbox::{Outbox, OutboxConfig};
pub use publisher::{forward_event, LinkEvent, Publisher, PublisherConfig};
pub use stats::{MetricsExtras, ProcessSampler, Stats};

/// Errors of the telemetry components; each names the store, record or topic at fault.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// A sled operation failed.
    #[error("telemetry outbox: {op}: {source}")]
    Store {
        /// What was being done (`open`, `append seq 42`, `ack up to 17`, ...).
        op: String,
        /// The sled error.
        #[source]
        source: sled::Error,
    },
    /// A record could not be encoded.
    #[error("telemetry record seq {seq}: encode: {source}")]
    Encode {
        /// Sequence number of the record.
        seq: u64,
        /// The JSON error.
        #[source]
        source: serde_json::Error,
    },
    /// A batch message could not be encoded (e.g. larger than `MAX_MESSAGE_BYTES`).
    #[error("telemetry batch for {topic}: {source}")]
    Message {
        /// Topic the batch was for.
        topic: String,
        /// The protocol error.
        #[source]
        source: edgefleet_protocol::Error,
    },
    /// The MQTT client refused the publish (its event loop is gone).
    #[error("telemetry publish to {topic}: {source}")]
    Publish {
        /// Topic of the publish.
        topic: String,
        /// The client error.
        #[source]
        source: Box<rumqttc::ClientError>,
    },
    /// The link-event channel closed: the MQTT module stopped.
    #[error("telemetry publisher: the MQTT link event channel closed")]
    LinkClosed,
}
