//! `cargo xtask`: the one entry point for automation.
#![forbid(unsafe_code)]

fn main() {}
