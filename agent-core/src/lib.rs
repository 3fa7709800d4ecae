//! The Portless agent's state machine (commands, executions, output, program push, metrics)
//! behind a platform trait: no I/O, no allocation.
//!
//! - [`config`]: the allow-list, parsed from a strict subset of TOML into a fixed-size value,
//!   and the checks every exec request passes through.
//! - [`platform`]: what the agent needs from the operating system, as a trait.
//! - [`agent`]: the state machine, driven by [`Agent::poll`] with the time, the channel and
//!   the platform passed in.
#![no_std]
#![forbid(unsafe_code)]
#![cfg_attr(
    not(test),
    deny(
        clippy::indexing_slicing,
        clippy::unwrap_used,
        clippy::expect_used,
        clippy::panic
    )
)]

#[cfg(test)]
extern crate std;

pub mod agent;
pub mod config;
pub mod platform;

pub use agent::{Activity, Agent};

pub use ring_protocol;
