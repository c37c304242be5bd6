//! edgefleet device agent: verifies, installs into an A/B slot, trials,
//! commits or rolls back model bundles, and serves inference locally.
//! See docs/agent.md.

pub mod agent;
pub mod api;
pub mod capture;
pub mod config;
pub mod drift;
pub mod engine;
pub mod feedback;
pub mod inputs;
pub mod logging;
pub mod mqtt;
pub mod pipeline;
pub mod runtime;
pub mod settings;
pub mod slots;
pub mod store;
pub mod telemetry;
#[cfg(any(test, feature = "testkit"))]
pub mod testkit;
pub mod update;

/// This agent's version (checked against a bundle's `min_agent_version`).
pub fn agent_version() -> semver::Version {
    semver::Version::parse(env!("CARGO_PKG_VERSION"))
        .unwrap_or_else(|_| semver::Version::new(0, 0, 0))
}
