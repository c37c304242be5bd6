//! Device-fault suites for edgefleet.
//!
//! - Crash injection (SIGKILL in every update state, restart, assert a
//!   verified model serves and the agent ends Idle with the old or new
//!   release): `agent/tests/crash_injection.rs`, run with
//!   `cargo test -p edgefleet-agent --test crash_injection`. It lives in the
//!   agent package because `CARGO_BIN_EXE_edgefleet-agent` is only defined
//!   for that package's tests. The hook it uses, `EDGEFLEET_FAULT_PAUSE_IN`,
//!   is described in docs/agent.md.
//! - Test bundles (good, golden-mismatch, NaN, slow, batched):
//!   `edgefleet_agent::testkit` (feature `testkit`).
