//! The Portless host: the pieces of the `portless` daemon that other crates' tests use too.
//!
//! - [`ivshmem`]: the ivshmem server that QEMU's `ivshmem-doorbell` device connects to.
//! - [`memory`]: guest memory mapped with `vm-memory`, as the channel's shared memory.
//! - [`config`]: `host.toml`, the daemon's configuration.
//! - [`policy`]: who may do what on which VM.
//! - [`records`]: executions, their output and the audit log, in SQLite; the writer that
//!   commits them in groups; retention.
//! - [`sys`]: the daemon's private files, and free disk space.
//! - [`tls`]: TLS on the TCP listener.
//! - [`callers`]: what callers of the API may make the daemon spend.
//! - [`vm`]: one VM's driver: its channel, its agent's life, the requests in flight.
//! - [`api`]: the HTTP/JSON API: callers, policy, audit, handlers.
//! - [`daemon`]: `portless serve`.
//! - [`client`]: the API's client side, over the daemon's unix socket.
//! - [`cli`]: the `portless` command line (every verb but `serve`).
#![deny(unsafe_op_in_unsafe_fn)]

pub mod api;
pub mod callers;
pub mod cli;
pub mod client;
pub mod config;
pub mod daemon;
pub mod ivshmem;
pub mod memory;
pub mod policy;
pub mod records;
pub mod sys;
pub mod tls;
pub mod vm;
