//! VMs: their list and state, their allow-lists, pings, metrics and pushes.

use std::collections::BTreeMap;
use std::fmt;

use serde::{Deserialize, Serialize};

use crate::executions::ExecutionId;

/// Where a VM's agent is (`state` of a VM).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum VmState {
    /// No agent has greeted yet.
    WaitingForAgent,
    /// The agent answers.
    Ready,
    /// The agent's heartbeat stopped.
    Unresponsive,
    /// The guest exceeded a budget and is backed off.
    CutOff,
    /// On a control plane: the VM's host stopped sending its heartbeat, so its state is not
    /// known.
    HostOffline,
    /// A state this client does not know.
    #[serde(other)]
    Unknown,
}

impl VmState {
    /// The API's name of the state.
    pub fn as_str(self) -> &'static str {
        match self {
            Self::WaitingForAgent => "waiting_for_agent",
            Self::Ready => "ready",
            Self::Unresponsive => "unresponsive",
            Self::CutOff => "cut_off",
            Self::HostOffline => "host_offline",
            Self::Unknown => "unknown",
        }
    }
}

impl fmt::Display for VmState {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

/// One VM of `GET /v1/vms`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct VmInfo {
    /// The VM's name.
    pub name: String,
    /// Its labels.
    #[serde(default)]
    pub labels: BTreeMap<String, String>,
    /// `plain` or `doorbell`.
    #[serde(default)]
    pub channel: String,
    /// Where its agent is.
    pub state: VmState,
    /// The agent's generation (changes when it restarts).
    #[serde(default)]
    pub agent_generation: Option<u32>,
    /// The agent's software string.
    #[serde(default)]
    pub agent_software: Option<String>,
    /// The agent's allow-list revision.
    #[serde(default)]
    pub config_revision: Option<u32>,
    /// Milliseconds since the agent's heartbeat last moved.
    #[serde(default)]
    pub heartbeat_age_ms: Option<u64>,
    /// Agent restarts the daemon has seen.
    #[serde(default)]
    pub agent_restarts: u32,
    /// Executions running in the guest.
    #[serde(default)]
    pub running: usize,
    /// Times the guest was cut off for exceeding a budget.
    #[serde(default)]
    pub cutoffs: u32,
    /// The last cut-off, if any.
    #[serde(default)]
    pub last_cutoff: Option<CutOff>,
    /// Protocol violations counted.
    #[serde(default)]
    pub violations: u64,
}

impl VmInfo {
    /// A VM named `name` of which nothing is known (state `unknown`, no labels).
    pub fn unknown(name: impl Into<String>) -> Self {
        Self {
            name: name.into(),
            labels: BTreeMap::new(),
            channel: String::new(),
            state: VmState::Unknown,
            agent_generation: None,
            agent_software: None,
            config_revision: None,
            heartbeat_age_ms: None,
            agent_restarts: 0,
            running: 0,
            cutoffs: 0,
            last_cutoff: None,
            violations: 0,
        }
    }
}

/// A cut-off of a guest that exceeded a budget.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct CutOff {
    /// When (ms since the epoch).
    pub at_ms: u64,
    /// The budget's key in `[budget]`.
    pub budget: String,
    /// What happened.
    #[serde(default)]
    pub detail: String,
}

/// `GET /v1/vms`: every VM the caller may see.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct VmList {
    /// The VMs, in the order of the configuration.
    pub vms: Vec<VmInfo>,
}

/// One declared parameter of a command.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(tag = "kind", rename_all = "snake_case")]
pub enum Param {
    /// An integer in `min..=max`.
    Integer {
        /// Its name.
        name: String,
        /// Smallest value.
        min: i64,
        /// Largest value.
        max: i64,
    },
    /// One of a list of words.
    Choice {
        /// Its name.
        name: String,
        /// The words.
        choices: Vec<String>,
    },
    /// A string of characters from a class.
    String {
        /// Its name.
        name: String,
        /// The class, as written in the guest's allow-list.
        charset: String,
        /// Shortest length.
        min_len: u16,
        /// Longest length.
        max_len: u16,
    },
    /// A kind of parameter this client does not know.
    #[serde(other)]
    Other,
}

/// A command a VM allows.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct CommandInfo {
    /// Its name.
    pub name: String,
    /// One line for people.
    #[serde(default)]
    pub description: String,
    /// Parameters, in argument order.
    #[serde(default)]
    pub params: Vec<Param>,
    /// Timeout in milliseconds, 0 for none.
    #[serde(default)]
    pub timeout_ms: u32,
    /// Output kept per stream by the agent.
    #[serde(default)]
    pub max_output: u64,
}

/// `GET /v1/vms/{vm}/commands`: a VM's allow-list, from the daemon's cache.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct CommandList {
    /// The VM.
    pub vm: String,
    /// Milliseconds since the list was fetched from the agent.
    #[serde(default)]
    pub age_ms: u64,
    /// The agent's allow-list revision it was listed from.
    #[serde(default)]
    pub config_revision: u32,
    /// The commands.
    pub commands: Vec<CommandInfo>,
}

/// How a push went.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum PushOutcome {
    /// Stored in the guest.
    Stored,
    /// Stored and started.
    Started,
    /// Not stored (or not started).
    Failed,
    /// An outcome this client does not know.
    #[serde(other)]
    Unknown,
}

impl PushOutcome {
    /// The API's name of the outcome.
    pub fn as_str(self) -> &'static str {
        match self {
            Self::Stored => "stored",
            Self::Started => "started",
            Self::Failed => "failed",
            Self::Unknown => "unknown",
        }
    }
}

/// `POST /v1/vms/{vm}/push`'s answer.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct PushResponse {
    /// The VM.
    pub vm: String,
    /// The file name in the guest.
    pub name: String,
    /// Bytes pushed.
    #[serde(default)]
    pub size: u64,
    /// SHA-256 of the program, in hex, as the guest computed it.
    #[serde(default)]
    pub sha256: String,
    /// How it went.
    pub outcome: PushOutcome,
    /// The execution that runs it, when it was started.
    #[serde(default)]
    pub execution: Option<ExecutionId>,
    /// Why it failed, when it did.
    #[serde(default)]
    pub error: Option<String>,
}

/// What to push (`POST /v1/vms/{vm}/push`).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PushRequest<'a> {
    /// The VM.
    pub vm: &'a str,
    /// The file name in the guest.
    pub name: &'a str,
    /// Whether to run it once stored.
    pub run: bool,
    /// Timeout of the run, in milliseconds.
    pub timeout_ms: Option<u32>,
    /// The program.
    pub program: Vec<u8>,
}

/// `POST /v1/vms/{vm}/ping`'s answer.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct PingResponse {
    /// The VM.
    pub vm: String,
    /// Round-trip time through the agent, in microseconds.
    pub rtt_us: u64,
}

/// The agent's own counters, in [`Metrics`].
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(default)]
pub struct AgentCounters {
    /// Frames received.
    pub frames_in: u64,
    /// Frames sent.
    pub frames_out: u64,
    /// Output bytes sent.
    pub output_bytes: u64,
    /// Executions started.
    pub executions: u64,
    /// Requests rejected.
    pub rejections: u64,
    /// Executions running.
    pub running: u64,
    /// Channel resets.
    pub resets: u64,
}

/// A guest's figures.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(default)]
pub struct Metrics {
    /// Guest uptime in milliseconds.
    pub uptime_ms: u64,
    /// Load averages (1, 5, 15 minutes) in thousandths.
    pub load_milli: Vec<u64>,
    /// Total memory, KiB.
    pub mem_total_kib: u64,
    /// Available memory, KiB.
    pub mem_available_kib: u64,
    /// Processes in the guest.
    pub processes: u64,
    /// The agent's resident set, KiB.
    pub agent_rss_kib: u64,
    /// The agent's counters.
    pub agent: AgentCounters,
}

/// `GET /v1/vms/{vm}/metrics`'s answer.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct MetricsResponse {
    /// The VM.
    pub vm: String,
    /// Its figures.
    pub metrics: Metrics,
}
