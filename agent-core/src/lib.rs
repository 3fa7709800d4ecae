//! The Portless agent's state machine (commands, executions, output, program push, metrics)
//! behind a platform trait: no I/O, no allocation.
//!
//! This crate is being built; today it only fixes its place in the workspace and proves that
//! it builds for a bare-metal target together with `ring-protocol`.
#![no_std]
#![forbid(unsafe_code)]

pub use ring_protocol;
