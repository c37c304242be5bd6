//! Device-fault suites for edgefleet.
//!
//! - Crash injection (SIGKILL in every update state, restart, assert a
//!   verified model serves and the agent ends Idle with the old or new
//!   release): `tests/crash_injection.rs`. The hook it uses,
//!   `EDGEFLEET_FAULT_PAUSE_IN`, is described in docs/agent.md.
//! - Data-directory damage: `tests/data_dir_damage.rs`, run with
//!   `cargo test -p edgefleet-firmware-tests --test data_dir_damage`. Every
//!   file of a device's data directory x {truncate, zero a block, flip
//!   bytes, delete}, and a store that opens with older contents: a verified
//!   model keeps serving and an older signed release is refused
//!   (`downgrade`). The agent runs as a process: `fw-agent`
//!   (the agent's own `agent/src/main.rs`, built again here), because
//!   `CARGO_BIN_EXE_<name>` exists only for a package's own binaries.
//! - Test bundles (good, golden-mismatch, NaN, slow, batched):
//!   `edgefleet_agent::testkit` (feature `testkit`).
//! - Flaky links: `tests/flaky_link.rs` (network namespace, shaped veth,
//!   link flaps). Sensor faults: `tests/sensor_faults.rs` (embedded-hal
//!   mock bus).
//! - Power cuts: `tests/power_cut.rs` (module [`powercut`]). A real agent
//!   runs its first install, an update with a trial and commit, and a
//!   refused downgrade on a recording FUSE filesystem; then, for every cut
//!   point of the write log and three assumptions about unsynced writes, an
//!   agent starts on the directory a power cut there leaves and must serve a
//!   verified model, never one older than the last release it reported
//!   committed.

pub mod powercut;
