/// Why a topic or message was rejected. Each variant names the topic, field
/// or size involved.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
#[non_exhaustive]
pub enum Error {
    /// A device id breaks the rules of [`crate::topics::DeviceId`].
    #[error("device id `{id}` is invalid: {reason}")]
    DeviceId {
        /// The offending id (truncated to 80 characters).
        id: String,
        /// Which rule.
        reason: &'static str,
    },
    /// A topic is not an edgefleet topic of a known kind.
    #[error("topic `{topic}` is not an edgefleet v1 topic: {reason}")]
    Topic {
        /// The topic (truncated to 200 characters).
        topic: String,
        /// What is wrong.
        reason: String,
    },
    /// A message is larger than [`crate::MAX_MESSAGE_BYTES`] (or a field's bound).
    #[error("{what} is {size} bytes, the limit is {limit}")]
    TooLarge {
        /// What was too large.
        what: &'static str,
        /// Its size in bytes.
        size: usize,
        /// The limit in bytes.
        limit: usize,
    },
    /// The message's `v` is not [`crate::PROTOCOL_VERSION`].
    #[error("message version {found} is not supported (this build speaks {supported})")]
    UnsupportedVersion {
        /// Version found.
        found: u64,
        /// Version this build speaks.
        supported: u32,
    },
    /// The message does not parse for its topic's schema.
    #[error("malformed {kind} message: {reason}")]
    Malformed {
        /// The message kind expected from the topic.
        kind: &'static str,
        /// The parser's message.
        reason: String,
    },
    /// A field of a message is out of its documented range.
    #[error("field `{field}` {reason}")]
    Field {
        /// Dotted field name, e.g. `drift_thresholds.ks_alarm`.
        field: &'static str,
        /// What is wrong, with the value.
        reason: String,
    },
    /// A message names a device other than the one whose topic it came on.
    #[error("message on the topic of device `{topic_device}` claims to be from `{claimed}`")]
    Impersonation {
        /// Device id from the topic.
        topic_device: String,
        /// Device id in the payload.
        claimed: String,
    },
}
