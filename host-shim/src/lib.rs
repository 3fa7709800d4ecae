//! The Portless host daemon (`portless serve`) as a library, in folders by concern:
//!
//! - [`vm`]: the VM side. One driver thread per VM owns its channel (a region mapped with
//!   `vm-memory`, [`vm::memory`]; the ivshmem server QEMU's `ivshmem-doorbell` connects to,
//!   [`vm::ivshmem`]), the agent's lifecycle, the dispatch of requests, the command cache,
//!   and the writing of what the agent reports to the records. Never touches HTTP.
//! - [`records`]: executions, their output and the audit log, in SQLite; the writer that
//!   commits them in groups; retention. Knows nothing of VMs or HTTP.
//! - [`http`]: the HTTP layer: routes and handlers, who is calling ([`http::identify`]),
//!   what the policy allows ([`http::policy`]), the audit entry of every call, what callers
//!   may make the daemon spend ([`http::callers`]), TLS on the TCP listener (`portless-tls`).
//!   Its JSON is `portless-api`'s types, defined once for every server and client.
//! - [`config`]: `host.toml`, the daemon's configuration, and the budgets' defaults.
//! - [`sys`]: the daemon's private files, and free disk space.
//! - [`fleet`]: the daemon as a host of a fleet (`[fleet]`): invocations a control plane
//!   asked for, run through the pieces above.
//! - [`daemon`]: `portless serve`: the pieces above wired together.
//!
//! The `portless` binary is this library's `serve` and, for every other verb, a client of
//! the API through `portless-api`.
#![deny(unsafe_op_in_unsafe_fn)]

pub mod config;
pub mod daemon;
pub mod fleet;
pub mod http;
pub mod records;
pub mod sys;
pub mod vm;
