//! A control plane's own routes: its hosts (`GET /v1/hosts`) and its commands, each with
//! one invocation per VM (`GET /v1/commands/{id}`). Everything else of a control plane is
//! the host API, with VMs named `host/vm`.

use std::collections::BTreeMap;

use serde::{Deserialize, Serialize};

use crate::executions::{ExecState, ExecutionId, Limit};

/// One host of `GET /v1/hosts`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct HostInfo {
    /// Its name in the fleet.
    pub name: String,
    /// Its labels.
    #[serde(default)]
    pub labels: BTreeMap<String, String>,
    /// Whether its heartbeat is recent.
    pub online: bool,
    /// Milliseconds since its last heartbeat.
    #[serde(default)]
    pub heartbeat_age_ms: u64,
    /// Its software's name and version.
    #[serde(default)]
    pub software: String,
    /// How many of its VMs the caller may see.
    #[serde(default)]
    pub vms: usize,
    /// How many times its daemon registered (started).
    #[serde(default)]
    pub boots: u64,
}

/// `GET /v1/hosts`: every host with a VM the caller may see.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct HostList {
    /// The hosts, by name.
    pub hosts: Vec<HostInfo>,
}

/// `GET /v1/commands/{id}`: a command created by `POST /v1/exec` on a control plane.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct FleetCommand {
    /// Its id.
    pub id: u64,
    /// Who asked for it.
    pub principal: String,
    /// The target as given.
    pub target: String,
    /// The command name.
    pub command: String,
    /// Its arguments.
    #[serde(default)]
    pub args: Vec<String>,
    /// When it was created (ms since the epoch).
    #[serde(default)]
    pub created_at_ms: u64,
    /// The concurrency limit, as resolved (`None`: none).
    #[serde(default)]
    pub max_concurrency: Option<Limit>,
    /// The error limit, as resolved (`None`: none).
    #[serde(default)]
    pub max_errors: Option<Limit>,
    /// Invocations claimed and not yet ended.
    #[serde(default)]
    pub active: u64,
    /// Invocations that ended in an error.
    #[serde(default)]
    pub errors: u64,
    /// Its invocations (one per VM), in VM order.
    #[serde(default)]
    pub invocations: Vec<Invocation>,
    /// How many invocations are in each state.
    #[serde(default)]
    pub states: BTreeMap<String, u64>,
}

/// One invocation of a [`FleetCommand`]: its VM, its execution id and its state.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Invocation {
    /// The VM (`host/vm`).
    pub vm: String,
    /// The execution.
    pub id: ExecutionId,
    /// Its state.
    pub state: ExecState,
}

/// `POST /v1/programs`'s answer: a program stored by the control plane, by reference.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ProgramInfo {
    /// Its SHA-256, in hex: its reference.
    pub sha256: String,
    /// Its size in bytes.
    pub size: u64,
}

/// `POST /v1/push` on a control plane: push a program uploaded before (by its SHA-256) to
/// every VM of a target, and run it with `run`. Each host fetches the program once.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct FleetPush {
    /// As for `POST /v1/exec`: `host/vm`, `host/*`, `key=value`, `*` or a comma list.
    pub target: String,
    /// The file name in the guest.
    pub name: String,
    /// The program's SHA-256 (hex), from `POST /v1/programs`.
    pub sha256: String,
    /// Run it once stored.
    #[serde(default)]
    pub run: bool,
    /// A timeout for the run, in milliseconds.
    #[serde(default)]
    pub timeout_ms: Option<u32>,
    /// As for `POST /v1/exec`.
    #[serde(default)]
    pub max_concurrency: Option<Limit>,
    /// As for `POST /v1/exec`.
    #[serde(default)]
    pub max_errors: Option<Limit>,
    /// As for `POST /v1/exec`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub idempotency_key: Option<String>,
}
