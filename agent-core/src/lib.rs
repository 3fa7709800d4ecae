//! The Portless agent's state machine (commands, executions, output, program push, metrics)
//! behind a platform trait: no I/O, no allocation.
//!
//! - [`config`]: the allow-list, parsed from a strict subset of TOML into a fixed-size value,
//!   and the checks every exec request passes through.
//!
//! The rest of the state machine is being built.
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

pub mod config;

pub use ring_protocol;
