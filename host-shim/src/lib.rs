//! The Portless host: the pieces of the `portless` daemon that other crates' tests use too.
//!
//! - [`ivshmem`]: the ivshmem server that QEMU's `ivshmem-doorbell` device connects to.
//! - [`memory`]: guest memory mapped with `vm-memory`, as the channel's shared memory.
#![deny(unsafe_op_in_unsafe_fn)]

pub mod ivshmem;
pub mod memory;
