//! Scratch harness: compiles `agent/src/drift.rs` (with its unit tests) until
//! `agent/src/lib.rs` declares `pub mod drift;` — then replace the include by
//! `use edgefleet_agent::drift;`.
#![allow(missing_docs)]

#[allow(dead_code)]
#[path = "../src/drift.rs"]
mod drift;
