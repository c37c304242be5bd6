//! Staged rollouts. [`plan`] holds the wave maths and the gate logic as pure
//! functions on a [`Rollout`] value (unit-tested, no I/O); [`engine`] runs them
//! against the store and MQTT.

pub mod engine;
pub mod plan;

pub use plan::{Action, DeviceProgress, DeviceState, Rollout, RolloutSpec, RolloutState, WaveSpec};
