//! The Portless fleet: one control plane over many hosts, on PostgreSQL.
//!
//! PostgreSQL holds every durable fact of the fleet and carries its work; host daemons and
//! any number of stateless control-plane servers are its clients.
//!
//! - [`store`]: the database: its pool, the versioned schema and its migrations, the
//!   wake-up channels (`LISTEN/NOTIFY`).
//! - [`member`]: the host side: registration, heartbeat, claims of invocations, reports of
//!   states and output, behind the [`member::Runner`] a host daemon implements with its own
//!   drivers and records.
//! - [`control`]: the control plane's API server (`portless control`): the public API of a
//!   host daemon, fleet-wide, and the sweeper that ends what cannot be delivered.
//!
//! The delivery semantics are those of ARCHITECTURE.md, "The fleet".

pub mod control;
pub mod member;
pub mod store;

pub use member::{Member, MemberConfig, Runner};
pub use store::{Store, StoreError};
