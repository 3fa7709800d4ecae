//! The daemon's own state, for operators.

use std::collections::BTreeMap;

use serde::{Deserialize, Serialize};

/// `GET /v1/daemon`: the daemon's version, when it started, and what its callers hold.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct DaemonState {
    /// The daemon's version.
    pub version: String,
    /// When it started (ms since the epoch).
    #[serde(default)]
    pub started_at_ms: u64,
    /// VMs it serves.
    #[serde(default)]
    pub vms: u64,
    /// Follow streams open, in all.
    #[serde(default)]
    pub follows_open: u64,
    /// Follow streams open, by principal (principals with none are left out).
    #[serde(default)]
    pub follows: BTreeMap<String, u32>,
    /// `callers.follows_per_principal`.
    #[serde(default)]
    pub follows_per_principal: u64,
    /// Pushes being taken in.
    #[serde(default)]
    pub pushes_in_flight: u64,
    /// `callers.pushes_in_flight`.
    #[serde(default)]
    pub pushes_limit: u64,
    /// Peers whose denied calls are being counted in the current interval.
    #[serde(default)]
    pub denied_peers: u64,
}
