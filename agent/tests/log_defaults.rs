//! Both agent entry points log the same way (issue #20): the `edgefleet-agent`
//! binary here, `edgefleet agent` in cli/tests/log_defaults.rs, with the
//! same assertions: info lines of the edgefleet crates by default (on stderr),
//! `--log-level` and `EDGEFLEET_LOG` documented in `--help`, and a bad level
//! refused naming it.
//!
//! ```sh
//! cargo test -p edgefleet-agent --test log_defaults
//! ```
#![allow(missing_docs, clippy::unwrap_used, clippy::expect_used)]

const EXE: &str = env!("CARGO_BIN_EXE_edgefleet-agent");
const PREFIX: &[&str] = &[];

#[path = "common/log_defaults.rs"]
mod shared;
