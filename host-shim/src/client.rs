//! The client side of the daemon's HTTP/JSON API on its unix socket: what the `portless` CLI
//! (and anything else in Rust) uses to talk to `portless serve`.
//!
//! One HTTP/1.1 connection per request, over a [`tokio::net::UnixStream`]. Each endpoint is a
//! typed method of [`Client`]; the JSON it answers is deserialized into the types of this
//! module, which mirror the API contract on their own (they do not share code with the
//! daemon), tolerate absent optional fields and ignore unknown ones. A call the daemon
//! refuses comes back as [`ClientError::Api`] with the HTTP status and the daemon's `error`
//! message.
//!
//! The methods need a tokio runtime: each connection is driven by a task of its own.

use std::collections::BTreeMap;
use std::fmt;
use std::io;
use std::path::{Path, PathBuf};

use base64::Engine as _;
use http_body_util::{BodyExt, Full};
use hyper::body::{Bytes, Incoming};
use hyper::client::conn::http1::SendRequest;
use hyper::header::{CONTENT_TYPE, HOST, HeaderMap};
use hyper::{Method, Request, Response, StatusCode};
use hyper_util::rt::TokioIo;
use serde::de::DeserializeOwned;
use serde::{Deserialize, Serialize};

/// The longest line of a `follow` stream the client accepts (a line carries one chunk of
/// output, base64-encoded, or the final record).
pub const MAX_FOLLOW_LINE: usize = 64 * 1024 * 1024;

/// The longest time one `wait` request asks the daemon to hold (its own maximum is 300 s);
/// [`Client::wait_final`] asks again until the execution has ended.
pub const WAIT_POLL_MS: u32 = 60_000;

/// What can go wrong talking to the daemon.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum ClientError {
    /// The socket could not be connected to: the daemon is not running, or the path is wrong,
    /// or the caller may not use it.
    #[error(
        "cannot connect to the daemon at {}: {source}; `portless serve` must be running \
         (or pass --socket PATH, or set PORTLESS_SOCKET)",
        socket.display()
    )]
    Connect {
        /// The socket.
        socket: PathBuf,
        /// Why.
        source: io::Error,
    },
    /// The HTTP exchange failed (the daemon closed the connection, say).
    #[error("talking to the daemon at {}: {source}", socket.display())]
    Http {
        /// The socket.
        socket: PathBuf,
        /// Why.
        source: hyper::Error,
    },
    /// The daemon answered with an error status.
    #[error("{message}")]
    Api {
        /// The HTTP status.
        status: u16,
        /// The daemon's `error` message (or the body, or the status's reason, when the body
        /// is not the usual JSON).
        message: String,
    },
    /// A follow stream stopped before the execution's end (the daemon went away).
    #[error("{request}: the stream ended before the execution did")]
    StreamEnded {
        /// The request.
        request: String,
    },
    /// The daemon's answer is not what the API promises.
    #[error("unexpected answer from the daemon to {request}: {detail}")]
    Protocol {
        /// The request (`GET /v1/vms`).
        request: String,
        /// What is wrong with the answer.
        detail: String,
    },
}

impl ClientError {
    /// The HTTP status of an error answer from the daemon.
    pub fn status(&self) -> Option<u16> {
        match self {
            Self::Api { status, .. } => Some(*status),
            _ => None,
        }
    }

    /// Whether the daemon could not be reached or the connection broke: the kind of error
    /// that a restart of the daemon causes and that may go away if the call is repeated.
    pub fn is_transport(&self) -> bool {
        matches!(
            self,
            Self::Connect { .. } | Self::Http { .. } | Self::StreamEnded { .. }
        )
    }
}

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

#[derive(Deserialize)]
struct VmList {
    vms: Vec<VmInfo>,
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

/// Where an execution is in its life.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum ExecState {
    /// Recorded; not yet accepted by the agent.
    Pending,
    /// Accepted and started by the agent.
    Running,
    /// Exited with code 0.
    Succeeded,
    /// Exited with another code, or killed by a signal Portless did not send.
    Failed,
    /// Killed after its timeout.
    TimedOut,
    /// Killed at a caller's request.
    Cancelled,
    /// The agent restarted or vanished while it ran.
    AgentLost,
    /// The VM did not become ready within the delivery timeout.
    Undeliverable,
    /// The agent (or the daemon's policy) refused it.
    Rejected,
    /// The agent could not start the program.
    FailedToStart,
    /// A state this client does not know; treated as final.
    #[serde(other)]
    Unknown,
}

impl ExecState {
    /// Whether the execution has ended: anything but pending and running.
    pub fn is_final(self) -> bool {
        !matches!(self, Self::Pending | Self::Running)
    }

    /// The API's name of the state.
    pub fn as_str(self) -> &'static str {
        match self {
            Self::Pending => "pending",
            Self::Running => "running",
            Self::Succeeded => "succeeded",
            Self::Failed => "failed",
            Self::TimedOut => "timed_out",
            Self::Cancelled => "cancelled",
            Self::AgentLost => "agent_lost",
            Self::Undeliverable => "undeliverable",
            Self::Rejected => "rejected",
            Self::FailedToStart => "failed_to_start",
            Self::Unknown => "unknown",
        }
    }
}

impl fmt::Display for ExecState {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

/// One of an execution's two output streams.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Stream {
    /// Standard output.
    Stdout,
    /// Standard error.
    Stderr,
}

impl Stream {
    /// The API's name of the stream.
    pub fn as_str(self) -> &'static str {
        match self {
            Self::Stdout => "stdout",
            Self::Stderr => "stderr",
        }
    }
}

impl fmt::Display for Stream {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

/// How much of one output stream the daemon holds.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct StreamTotals {
    /// Bytes kept, from offset 0.
    #[serde(default)]
    pub stored_len: u64,
    /// Bytes the program produced (as far as received).
    #[serde(default)]
    pub total_len: u64,
    /// Whether bytes were dropped for the daemon's cap.
    #[serde(default)]
    pub truncated: bool,
}

/// Everything the daemon records about one execution, except its output bytes.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ExecutionRecord {
    /// Its id.
    pub id: u64,
    /// Who asked for it.
    #[serde(default)]
    pub principal: String,
    /// The VM it runs on.
    pub vm: String,
    /// The command name.
    pub command: String,
    /// The argument values.
    #[serde(default)]
    pub args: Vec<String>,
    /// Where it is in its life.
    pub state: ExecState,
    /// When it was asked for (ms since the epoch).
    #[serde(default)]
    pub requested_at_ms: u64,
    /// When the agent accepted it.
    #[serde(default)]
    pub started_at_ms: Option<u64>,
    /// When it ended.
    #[serde(default)]
    pub finished_at_ms: Option<u64>,
    /// How long it ran, as measured by the agent.
    #[serde(default)]
    pub duration_ms: Option<u64>,
    /// The exit code, when the program exited.
    #[serde(default)]
    pub exit_code: Option<i32>,
    /// The signal that killed it, when one did.
    #[serde(default)]
    pub signal: Option<i32>,
    /// A one-line explanation of how it ended.
    #[serde(default)]
    pub detail: Option<String>,
    /// The agent generation of its agent execution id, once accepted.
    #[serde(default)]
    pub agent_generation: Option<u32>,
    /// The counter of its agent execution id, once accepted.
    #[serde(default)]
    pub agent_counter: Option<u32>,
    /// The cap on bytes kept per stream.
    #[serde(default)]
    pub output_cap: u64,
    /// Standard output.
    #[serde(default)]
    pub stdout: StreamTotals,
    /// Standard error.
    #[serde(default)]
    pub stderr: StreamTotals,
}

impl ExecutionRecord {
    /// The totals of one stream.
    pub fn totals(&self, stream: Stream) -> StreamTotals {
        match stream {
            Stream::Stdout => self.stdout,
            Stream::Stderr => self.stderr,
        }
    }
}

/// `POST /v1/exec`: what to run where.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ExecRequest {
    /// `vm1`, `a,b`, `role=web` or `*`.
    pub target: String,
    /// The command name.
    pub command: String,
    /// The argument values.
    pub args: Vec<String>,
    /// A timeout that overrides the command's, in milliseconds.
    pub timeout_ms: Option<u32>,
    /// At most this many running at once across the target's VMs.
    pub max_concurrency: Option<usize>,
    /// Stop dispatching once more than this many have failed.
    pub max_errors: Option<usize>,
}

/// One VM's part of an exec, as dispatched.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Dispatched {
    /// The VM.
    pub vm: String,
    /// The execution's id, when it was recorded.
    #[serde(default)]
    pub id: Option<u64>,
    /// Its state when the daemon answered.
    #[serde(default)]
    pub state: Option<ExecState>,
    /// Why it was refused, when it was.
    #[serde(default)]
    pub error: Option<String>,
}

impl Dispatched {
    /// Whether the execution was refused at dispatch: it has no id, an error, or already
    /// ended in a state in which Portless could not run it.
    pub fn refused(&self) -> bool {
        self.id.is_none()
            || self.error.is_some()
            || matches!(
                self.state,
                Some(
                    ExecState::Rejected
                        | ExecState::Undeliverable
                        | ExecState::AgentLost
                        | ExecState::FailedToStart
                )
            )
    }
}

/// `POST /v1/exec`'s answer.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct ExecResponse {
    /// One entry per VM dispatched to (or refused), in VM order.
    #[serde(default)]
    pub executions: Vec<Dispatched>,
    /// VMs not dispatched to because `max_errors` was exceeded.
    #[serde(default)]
    pub skipped: Vec<String>,
}

/// A range of one stream's kept output (`GET /v1/executions/{id}/output`).
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct OutputChunk {
    /// The bytes.
    pub data: Vec<u8>,
    /// Bytes of the stream kept by the daemon.
    pub stored_len: u64,
    /// Bytes of the stream produced.
    pub total_len: u64,
    /// Whether bytes were dropped for the cap.
    pub truncated: bool,
}

/// One event of `GET /v1/executions/{id}/follow`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum FollowEvent {
    /// Output bytes at `offset` of `stream`.
    Output {
        /// Which stream.
        stream: Stream,
        /// Where `data` starts in the stream.
        offset: u64,
        /// The bytes.
        data: Vec<u8>,
    },
    /// The execution ended; nothing follows.
    End(Box<ExecutionRecord>),
}

/// One line of a follow stream as sent.
#[derive(Deserialize)]
#[serde(tag = "type", rename_all = "snake_case")]
enum FollowLine {
    Output {
        stream: Stream,
        offset: u64,
        data: String,
    },
    End {
        execution: Box<ExecutionRecord>,
    },
}

/// `POST /v1/executions/{id}/cancel`'s answer.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct CancelResponse {
    /// The execution.
    pub id: u64,
    /// Its state when the daemon answered.
    pub state: ExecState,
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
    pub execution: Option<u64>,
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

/// The order of an audit query's answer.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub enum AuditOrder {
    /// Oldest first; with a limit, the oldest entries that match.
    #[default]
    Oldest,
    /// Newest first; with a limit, the newest entries that match.
    Newest,
}

/// Which audit entries to fetch (`GET /v1/audit`); unset fields match everything.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct AuditQuery {
    /// Only of this principal.
    pub principal: Option<String>,
    /// Only of this action.
    pub action: Option<String>,
    /// Only allowed (`true`) or only denied (`false`) calls.
    pub allowed: Option<bool>,
    /// Only at or after this time (ms since the epoch).
    pub since_ms: Option<u64>,
    /// At most this many.
    pub limit: Option<usize>,
    /// Oldest or newest first.
    pub order: AuditOrder,
}

impl AuditQuery {
    /// The query string, without the `?`.
    fn query_string(&self) -> String {
        let mut q = Query::default();
        if let Some(p) = &self.principal {
            q.push("principal", p);
        }
        if let Some(a) = &self.action {
            q.push("action", a);
        }
        if let Some(allowed) = self.allowed {
            q.push("allowed", if allowed { "true" } else { "false" });
        }
        if let Some(since) = self.since_ms {
            q.push("since_ms", &since.to_string());
        }
        if let Some(limit) = self.limit {
            q.push("limit", &limit.to_string());
        }
        q.push(
            "order",
            match self.order {
                AuditOrder::Oldest => "oldest",
                AuditOrder::Newest => "newest",
            },
        );
        q.0
    }
}

/// One audit entry.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct AuditEntry {
    /// Its sequence number.
    pub id: u64,
    /// When (ms since the epoch).
    pub at_ms: u64,
    /// The principal; `None` for an unidentified caller.
    #[serde(default)]
    pub principal: Option<String>,
    /// How the caller presented itself.
    #[serde(default)]
    pub caller: String,
    /// What it asked for.
    pub action: String,
    /// What it asked about.
    #[serde(default)]
    pub target: Option<String>,
    /// Whether it was allowed.
    pub allowed: bool,
    /// Why.
    #[serde(default)]
    pub reason: Option<String>,
    /// How many calls it stands for (denied calls past a peer's budget are counted together).
    #[serde(default = "one")]
    pub count: u64,
}

fn one() -> u64 {
    1
}

#[derive(Deserialize)]
struct AuditLog {
    entries: Vec<AuditEntry>,
}

#[derive(Deserialize)]
struct ErrorBody {
    error: String,
}

/// A client of one daemon, by its socket path. Cheap to clone; holds no connection.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Client {
    socket: PathBuf,
}

impl Client {
    /// A client of the daemon listening on `socket`.
    pub fn new(socket: impl Into<PathBuf>) -> Self {
        Self {
            socket: socket.into(),
        }
    }

    /// The daemon's socket.
    pub fn socket(&self) -> &Path {
        &self.socket
    }

    /// `GET /v1/vms`: every VM the caller may see, with its state.
    pub async fn vms(&self) -> Result<Vec<VmInfo>, ClientError> {
        let list: VmList = self.get_json("/v1/vms").await?;
        Ok(list.vms)
    }

    /// `GET /v1/vms/{vm}/commands`: the VM's allow-list.
    pub async fn commands(&self, vm: &str) -> Result<CommandList, ClientError> {
        self.get_json(&format!("/v1/vms/{}/commands", encode(vm)))
            .await
    }

    /// `POST /v1/exec`: runs a command on a target; answers once every execution is
    /// accepted or refused.
    pub async fn exec(&self, request: &ExecRequest) -> Result<ExecResponse, ClientError> {
        let body = serde_json::to_vec(request).map_err(|e| ClientError::Protocol {
            request: "POST /v1/exec".into(),
            detail: format!("cannot encode the request: {e}"),
        })?;
        self.call_json(
            Method::POST,
            "/v1/exec",
            Some((Bytes::from(body), "application/json")),
        )
        .await
    }

    /// `GET /v1/executions/{id}`: an execution's record.
    pub async fn execution(&self, id: u64) -> Result<ExecutionRecord, ClientError> {
        self.get_json(&format!("/v1/executions/{id}")).await
    }

    /// `GET /v1/executions/{id}/wait`: the record once the execution has ended, or as it
    /// is after `timeout_ms` (the daemon's default when `None`).
    pub async fn wait(
        &self,
        id: u64,
        timeout_ms: Option<u32>,
    ) -> Result<ExecutionRecord, ClientError> {
        let path = match timeout_ms {
            Some(ms) => format!("/v1/executions/{id}/wait?timeout_ms={ms}"),
            None => format!("/v1/executions/{id}/wait"),
        };
        self.get_json(&path).await
    }

    /// Waits, as long as it takes, until the execution has ended; returns its final record.
    pub async fn wait_final(&self, id: u64) -> Result<ExecutionRecord, ClientError> {
        loop {
            let record = self.wait(id, Some(WAIT_POLL_MS)).await?;
            if record.state.is_final() {
                return Ok(record);
            }
        }
    }

    /// `GET /v1/executions/{id}/output`: up to `limit` bytes (the daemon's default when
    /// `None`) of a stream's kept output from `offset`, with the stream's totals.
    pub async fn output(
        &self,
        id: u64,
        stream: Stream,
        offset: u64,
        limit: Option<usize>,
    ) -> Result<OutputChunk, ClientError> {
        let mut path = format!("/v1/executions/{id}/output?stream={stream}&offset={offset}");
        if let Some(limit) = limit {
            path += &format!("&limit={limit}");
        }
        let response = self.call(Method::GET, &path, None).await?;
        let request = format!("GET {path}");
        let headers = response.headers().clone();
        let data = read_body(response, &self.socket).await?;
        Ok(OutputChunk {
            data: data.to_vec(),
            stored_len: header_u64(&headers, "x-portless-stored-len", &request)?,
            total_len: header_u64(&headers, "x-portless-total-len", &request)?,
            truncated: header_bool(&headers, "x-portless-truncated", &request)?,
        })
    }

    /// `GET /v1/executions/{id}/follow`: the execution's output as it arrives (what is
    /// already stored first), then its final record.
    pub async fn follow(&self, id: u64) -> Result<Follow, ClientError> {
        let path = format!("/v1/executions/{id}/follow");
        let (response, sender) = self.exchange(Method::GET, &path, None).await?;
        let response = check_status(response, &self.socket).await?;
        Ok(Follow {
            body: response.into_body(),
            _sender: sender,
            buf: Vec::new(),
            ended: false,
            socket: self.socket.clone(),
            request: format!("GET {path}"),
        })
    }

    /// `POST /v1/executions/{id}/cancel`: asks the agent to kill a running execution.
    pub async fn cancel(&self, id: u64) -> Result<CancelResponse, ClientError> {
        self.call_json(Method::POST, &format!("/v1/executions/{id}/cancel"), None)
            .await
    }

    /// `POST /v1/vms/{vm}/push`: stores a program in the guest, and runs it if asked.
    pub async fn push(&self, push: PushRequest<'_>) -> Result<PushResponse, ClientError> {
        let mut q = Query::default();
        q.push("name", push.name);
        q.push("run", if push.run { "true" } else { "false" });
        if let Some(ms) = push.timeout_ms {
            q.push("timeout_ms", &ms.to_string());
        }
        let path = format!("/v1/vms/{}/push?{}", encode(push.vm), q.0);
        self.call_json(
            Method::POST,
            &path,
            Some((Bytes::from(push.program), "application/octet-stream")),
        )
        .await
    }

    /// `POST /v1/vms/{vm}/ping`: one round trip through the VM's agent.
    pub async fn ping(&self, vm: &str) -> Result<PingResponse, ClientError> {
        self.call_json(Method::POST, &format!("/v1/vms/{}/ping", encode(vm)), None)
            .await
    }

    /// `GET /v1/vms/{vm}/metrics`: the guest's figures.
    pub async fn metrics(&self, vm: &str) -> Result<MetricsResponse, ClientError> {
        self.get_json(&format!("/v1/vms/{}/metrics", encode(vm)))
            .await
    }

    /// `GET /v1/audit`: audit entries.
    pub async fn audit(&self, query: &AuditQuery) -> Result<Vec<AuditEntry>, ClientError> {
        let log: AuditLog = self
            .get_json(&format!("/v1/audit?{}", query.query_string()))
            .await?;
        Ok(log.entries)
    }

    async fn get_json<T: DeserializeOwned>(&self, path: &str) -> Result<T, ClientError> {
        self.call_json(Method::GET, path, None).await
    }

    async fn call_json<T: DeserializeOwned>(
        &self,
        method: Method,
        path: &str,
        body: Option<(Bytes, &'static str)>,
    ) -> Result<T, ClientError> {
        let request = format!("{method} {path}");
        let response = self.call(method, path, body).await?;
        let bytes = read_body(response, &self.socket).await?;
        serde_json::from_slice(&bytes).map_err(|e| ClientError::Protocol {
            request,
            detail: e.to_string(),
        })
    }

    /// One request; an error status becomes [`ClientError::Api`].
    async fn call(
        &self,
        method: Method,
        path: &str,
        body: Option<(Bytes, &'static str)>,
    ) -> Result<Response<Incoming>, ClientError> {
        let (response, _sender) = self.exchange(method, path, body).await?;
        check_status(response, &self.socket).await
    }

    /// Connects, sends one request and returns the response with the connection's sender
    /// (the connection lives while either is held or the body is being read).
    async fn exchange(
        &self,
        method: Method,
        path: &str,
        body: Option<(Bytes, &'static str)>,
    ) -> Result<(Response<Incoming>, SendRequest<Full<Bytes>>), ClientError> {
        let stream = tokio::net::UnixStream::connect(&self.socket)
            .await
            .map_err(|source| ClientError::Connect {
                socket: self.socket.clone(),
                source,
            })?;
        let http = |source| ClientError::Http {
            socket: self.socket.clone(),
            source,
        };
        let (mut sender, connection) = hyper::client::conn::http1::handshake(TokioIo::new(stream))
            .await
            .map_err(http)?;
        tokio::spawn(async move {
            // Errors surface through the request or the body, where they are reported.
            let _ = connection.await;
        });
        let mut builder = Request::builder()
            .method(method.clone())
            .uri(path)
            .header(HOST, "portless");
        let body = match body {
            Some((bytes, content_type)) => {
                builder = builder.header(CONTENT_TYPE, content_type);
                bytes
            }
            None => Bytes::new(),
        };
        let request = builder
            .body(Full::new(body))
            .map_err(|e| ClientError::Protocol {
                request: format!("{method} {path}"),
                detail: format!("cannot build the request: {e}"),
            })?;
        let response = sender.send_request(request).await.map_err(http)?;
        Ok((response, sender))
    }
}

/// A follow stream (`GET /v1/executions/{id}/follow`), read event by event.
#[derive(Debug)]
pub struct Follow {
    body: Incoming,
    _sender: SendRequest<Full<Bytes>>,
    buf: Vec<u8>,
    ended: bool,
    socket: PathBuf,
    request: String,
}

impl Follow {
    /// The next event; `None` once the stream is over. A stream that stops before its
    /// `end` event (the daemon went away) is an error.
    pub async fn next(&mut self) -> Result<Option<FollowEvent>, ClientError> {
        loop {
            if let Some(line) = take_line(&mut self.buf) {
                if line.iter().all(u8::is_ascii_whitespace) {
                    continue;
                }
                if self.ended {
                    return Err(self.protocol("data after the end event".into()));
                }
                let event = parse_follow_line(&line).map_err(|d| self.protocol(d))?;
                self.ended = matches!(event, FollowEvent::End(_));
                return Ok(Some(event));
            }
            match self.body.frame().await {
                Some(Ok(frame)) => {
                    if let Ok(data) = frame.into_data() {
                        if self.buf.len() + data.len() > MAX_FOLLOW_LINE {
                            return Err(self.protocol("a line longer than the limit".into()));
                        }
                        self.buf.extend_from_slice(&data);
                    }
                }
                Some(Err(source)) => {
                    return Err(ClientError::Http {
                        socket: self.socket.clone(),
                        source,
                    });
                }
                None if self.ended && self.buf.iter().all(u8::is_ascii_whitespace) => {
                    return Ok(None);
                }
                None if !self.buf.is_empty() => {
                    // The last line may lack its newline.
                    self.buf.push(b'\n');
                }
                None => {
                    return Err(ClientError::StreamEnded {
                        request: self.request.clone(),
                    });
                }
            }
        }
    }

    fn protocol(&self, detail: String) -> ClientError {
        ClientError::Protocol {
            request: self.request.clone(),
            detail,
        }
    }
}

/// Removes and returns the first complete line of `buf`, without its newline.
fn take_line(buf: &mut Vec<u8>) -> Option<Vec<u8>> {
    let end = buf.iter().position(|&b| b == b'\n')?;
    let mut line: Vec<u8> = buf.drain(..=end).collect();
    line.pop();
    Some(line)
}

/// Decodes one line of a follow stream.
pub fn parse_follow_line(line: &[u8]) -> Result<FollowEvent, String> {
    let parsed: FollowLine = serde_json::from_slice(line).map_err(|e| e.to_string())?;
    Ok(match parsed {
        FollowLine::Output {
            stream,
            offset,
            data,
        } => FollowEvent::Output {
            stream,
            offset,
            data: base64::engine::general_purpose::STANDARD
                .decode(data)
                .map_err(|e| format!("output data is not base64: {e}"))?,
        },
        FollowLine::End { execution } => FollowEvent::End(execution),
    })
}

/// Passes a success through; turns an error status into [`ClientError::Api`] with the
/// daemon's message.
async fn check_status(
    response: Response<Incoming>,
    socket: &Path,
) -> Result<Response<Incoming>, ClientError> {
    let status = response.status();
    if status.is_success() {
        return Ok(response);
    }
    let body = read_body(response, socket).await.unwrap_or_default();
    Err(ClientError::Api {
        status: status.as_u16(),
        message: error_message(status, &body),
    })
}

/// The message of an error answer: the JSON `error`, else the body's first line, else the
/// status.
pub fn error_message(status: StatusCode, body: &[u8]) -> String {
    if let Ok(ErrorBody { error }) = serde_json::from_slice(body) {
        return error;
    }
    let text = String::from_utf8_lossy(body);
    match text.lines().map(str::trim).find(|l| !l.is_empty()) {
        Some(line) => format!("{line} ({status})"),
        None => format!("the daemon answered {status}"),
    }
}

async fn read_body(response: Response<Incoming>, socket: &Path) -> Result<Bytes, ClientError> {
    let collected = response
        .into_body()
        .collect()
        .await
        .map_err(|source| ClientError::Http {
            socket: socket.to_owned(),
            source,
        })?;
    Ok(collected.to_bytes())
}

fn header<'h>(headers: &'h HeaderMap, name: &str, request: &str) -> Result<&'h str, ClientError> {
    headers
        .get(name)
        .and_then(|v| v.to_str().ok())
        .map(str::trim)
        .ok_or_else(|| ClientError::Protocol {
            request: request.to_owned(),
            detail: format!("no valid {name} header"),
        })
}

fn header_u64(headers: &HeaderMap, name: &str, request: &str) -> Result<u64, ClientError> {
    let value = header(headers, name, request)?;
    value.parse().map_err(|_| ClientError::Protocol {
        request: request.to_owned(),
        detail: format!("{name}: {value:?} is not a number"),
    })
}

fn header_bool(headers: &HeaderMap, name: &str, request: &str) -> Result<bool, ClientError> {
    match header(headers, name, request)? {
        "true" => Ok(true),
        "false" => Ok(false),
        value => Err(ClientError::Protocol {
            request: request.to_owned(),
            detail: format!("{name}: {value:?} is not true or false"),
        }),
    }
}

/// A query string under construction.
#[derive(Default)]
struct Query(String);

impl Query {
    fn push(&mut self, key: &str, value: &str) {
        if !self.0.is_empty() {
            self.0.push('&');
        }
        self.0 += &encode(key);
        self.0.push('=');
        self.0 += &encode(value);
    }
}

/// Percent-encodes everything but RFC 3986's unreserved characters, for a path segment or a
/// query value.
pub fn encode(s: &str) -> String {
    let mut out = String::with_capacity(s.len());
    for b in s.bytes() {
        if b.is_ascii_alphanumeric() || matches!(b, b'-' | b'.' | b'_' | b'~') {
            out.push(char::from(b));
        } else {
            out += &format!("%{b:02X}");
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    use tokio::net::UnixListener;

    #[test]
    fn encodes_reserved_characters() {
        assert_eq!(encode("vm-1.a_b~"), "vm-1.a_b~");
        assert_eq!(encode("a b/c?d&e=f"), "a%20b%2Fc%3Fd%26e%3Df");
        assert_eq!(encode("é"), "%C3%A9");
    }

    #[test]
    fn unknown_states_deserialize() {
        let s: ExecState = serde_json::from_str("\"exploded\"").expect("state");
        assert_eq!(s, ExecState::Unknown);
        assert!(s.is_final());
        let s: ExecState = serde_json::from_str("\"timed_out\"").expect("state");
        assert_eq!(s, ExecState::TimedOut);
        let v: VmState = serde_json::from_str("\"ready\"").expect("state");
        assert_eq!(v, VmState::Ready);
        let p: Param = serde_json::from_str(r#"{"kind":"float","name":"x"}"#).expect("param");
        assert_eq!(p, Param::Other);
    }

    #[test]
    fn follow_lines_decode() {
        let e =
            parse_follow_line(br#"{"type":"output","stream":"stderr","offset":5,"data":"aGk="}"#)
                .expect("output");
        assert_eq!(
            e,
            FollowEvent::Output {
                stream: Stream::Stderr,
                offset: 5,
                data: b"hi".to_vec()
            }
        );
        assert!(
            parse_follow_line(br#"{"type":"output","stream":"stdout","offset":0,"data":"!"}"#)
                .is_err()
        );
        let end = parse_follow_line(
            br#"{"type":"end","execution":{"id":3,"vm":"vm1","command":"uname","state":"succeeded","exit_code":0}}"#,
        )
        .expect("end");
        match end {
            FollowEvent::End(r) => {
                assert_eq!(
                    (r.id, r.state, r.exit_code),
                    (3, ExecState::Succeeded, Some(0))
                );
            }
            other => panic!("{other:?}"),
        }
    }

    #[test]
    fn error_messages_prefer_the_json_error() {
        assert_eq!(
            error_message(StatusCode::NOT_FOUND, br#"{"error":"no vm named x"}"#),
            "no vm named x"
        );
        assert_eq!(
            error_message(StatusCode::BAD_GATEWAY, b"\n upstream down \n"),
            "upstream down (502 Bad Gateway)"
        );
        assert_eq!(
            error_message(StatusCode::FORBIDDEN, b""),
            "the daemon answered 403 Forbidden"
        );
    }

    /// A one-connection-per-answer HTTP server on a unix socket: answers each request with
    /// the next canned response and hands back the request heads and bodies it saw.
    async fn fake_daemon(
        answers: Vec<Vec<u8>>,
    ) -> (
        tempdir::Dir,
        PathBuf,
        tokio::task::JoinHandle<Vec<(String, Vec<u8>)>>,
    ) {
        let dir = tempdir::Dir::new();
        let socket = dir.0.join("d.sock");
        let listener = UnixListener::bind(&socket).expect("bind");
        let task = tokio::spawn(async move {
            let mut seen = Vec::new();
            for answer in answers {
                let (mut conn, _) = listener.accept().await.expect("accept");
                let mut buf = Vec::new();
                let (head, body) = loop {
                    let mut chunk = [0u8; 4096];
                    let n = conn.read(&mut chunk).await.expect("read");
                    buf.extend_from_slice(&chunk[..n]);
                    if let Some(at) = buf.windows(4).position(|w| w == b"\r\n\r\n") {
                        let head = String::from_utf8_lossy(&buf[..at]).into_owned();
                        let len = head
                            .lines()
                            .find_map(|l| {
                                l.to_ascii_lowercase()
                                    .strip_prefix("content-length:")
                                    .map(|v| v.trim().parse::<usize>().expect("length"))
                            })
                            .unwrap_or(0);
                        while buf.len() < at + 4 + len {
                            let n = conn.read(&mut chunk).await.expect("read");
                            assert!(n > 0, "eof in body");
                            buf.extend_from_slice(&chunk[..n]);
                        }
                        break (head, buf[at + 4..at + 4 + len].to_vec());
                    }
                    assert!(n > 0, "eof in head");
                };
                seen.push((head, body));
                conn.write_all(&answer).await.expect("write");
                conn.shutdown().await.expect("shutdown");
            }
            seen
        });
        (dir, socket, task)
    }

    fn response(status: &str, headers: &[(&str, &str)], body: &[u8]) -> Vec<u8> {
        let mut out = format!("HTTP/1.1 {status}\r\nconnection: close\r\n");
        for (k, v) in headers {
            out += &format!("{k}: {v}\r\n");
        }
        out += &format!("content-length: {}\r\n\r\n", body.len());
        let mut out = out.into_bytes();
        out.extend_from_slice(body);
        out
    }

    mod tempdir {
        use std::path::PathBuf;

        /// A private directory under the system's temporary directory, removed on drop.
        pub(super) struct Dir(pub(super) PathBuf);

        impl Dir {
            pub(super) fn new() -> Self {
                use std::sync::atomic::{AtomicU32, Ordering};
                static NEXT: AtomicU32 = AtomicU32::new(0);
                // Ordering: only uniqueness matters.
                let n = NEXT.fetch_add(1, Ordering::Relaxed);
                let path = std::env::temp_dir()
                    .join(format!("portless-client-{}-{n}", std::process::id()));
                let _ = std::fs::remove_dir_all(&path);
                std::fs::create_dir_all(&path).expect("temp dir");
                Self(path)
            }
        }

        impl Drop for Dir {
            fn drop(&mut self) {
                let _ = std::fs::remove_dir_all(&self.0);
            }
        }
    }

    #[tokio::test]
    async fn requests_and_answers_round_trip() {
        let (_dir, socket, server) = fake_daemon(vec![
            response(
                "200 OK",
                &[("content-type", "application/json")],
                br#"{"executions":[{"vm":"a","id":7,"state":"pending","error":null},{"vm":"b","id":null,"state":"rejected","error":"denied"}],"skipped":["c"]}"#,
            ),
            response(
                "200 OK",
                &[
                    ("x-portless-total-len", "10"),
                    ("x-portless-stored-len", "4"),
                    ("x-portless-truncated", "true"),
                ],
                b"abcd",
            ),
            response("404 Not Found", &[], br#"{"error":"no vm named zz"}"#),
            response("200 OK", &[], br#"{"entries":[]}"#),
            response("200 OK", &[], br#"{"vm":"a","name":"x y","size":3,"sha256":"00","outcome":"started","execution":9,"error":null}"#),
        ])
        .await;
        let client = Client::new(&socket);
        let answer = client
            .exec(&ExecRequest {
                target: "role=web".into(),
                command: "sleep".into(),
                args: vec!["5".into()],
                timeout_ms: Some(1000),
                max_concurrency: None,
                max_errors: Some(0),
            })
            .await
            .expect("exec");
        assert_eq!(answer.executions.len(), 2);
        assert!(!answer.executions[0].refused());
        assert!(answer.executions[1].refused());
        assert_eq!(answer.skipped, ["c"]);

        let chunk = client
            .output(7, Stream::Stderr, 2, Some(100))
            .await
            .expect("output");
        assert_eq!(
            chunk,
            OutputChunk {
                data: b"abcd".to_vec(),
                stored_len: 4,
                total_len: 10,
                truncated: true
            }
        );

        let err = client.commands("zz").await.expect_err("404");
        assert_eq!(err.status(), Some(404));
        assert_eq!(err.to_string(), "no vm named zz");

        let entries = client
            .audit(&AuditQuery {
                principal: Some("a b".into()),
                allowed: Some(false),
                limit: Some(5),
                order: AuditOrder::Newest,
                ..AuditQuery::default()
            })
            .await
            .expect("audit");
        assert!(entries.is_empty());

        let pushed = client
            .push(PushRequest {
                vm: "a",
                name: "x y",
                run: true,
                timeout_ms: None,
                program: b"\x7fEL".to_vec(),
            })
            .await
            .expect("push");
        assert_eq!(
            (pushed.outcome, pushed.execution),
            (PushOutcome::Started, Some(9))
        );

        let seen = server.await.expect("server");
        let first_line = |i: usize| seen[i].0.lines().next().unwrap_or_default().to_owned();
        assert_eq!(first_line(0), "POST /v1/exec HTTP/1.1");
        let body: serde_json::Value = serde_json::from_slice(&seen[0].1).expect("json body");
        assert_eq!(
            body,
            serde_json::json!({"target":"role=web","command":"sleep","args":["5"],
                "timeout_ms":1000,"max_concurrency":null,"max_errors":0})
        );
        assert_eq!(
            first_line(1),
            "GET /v1/executions/7/output?stream=stderr&offset=2&limit=100 HTTP/1.1"
        );
        assert_eq!(first_line(2), "GET /v1/vms/zz/commands HTTP/1.1");
        assert_eq!(
            first_line(3),
            "GET /v1/audit?principal=a%20b&allowed=false&limit=5&order=newest HTTP/1.1"
        );
        assert_eq!(
            first_line(4),
            "POST /v1/vms/a/push?name=x%20y&run=true HTTP/1.1"
        );
        assert_eq!(seen[4].1, b"\x7fEL");
    }

    #[tokio::test]
    async fn follow_reads_events_split_across_chunks() {
        let stream = concat!(
            r#"{"type":"output","stream":"stdout","offset":0,"data":"aGVs"}"#,
            "\n",
            r#"{"type":"output","stream":"stdout","offset":3,"data":"bG8K"}"#,
            "\n",
            r#"{"type":"end","execution":{"id":1,"vm":"v","command":"c","state":"failed","exit_code":3}}"#,
            "\n"
        );
        // Chunked transfer encoding, cut in the middle of lines.
        let mut answer =
            b"HTTP/1.1 200 OK\r\ncontent-type: application/x-ndjson\r\ntransfer-encoding: chunked\r\n\r\n"
                .to_vec();
        for piece in stream.as_bytes().chunks(17) {
            answer.extend_from_slice(format!("{:x}\r\n", piece.len()).as_bytes());
            answer.extend_from_slice(piece);
            answer.extend_from_slice(b"\r\n");
        }
        answer.extend_from_slice(b"0\r\n\r\n");
        let (_dir, socket, server) = fake_daemon(vec![answer]).await;
        let mut follow = Client::new(&socket).follow(1).await.expect("follow");
        let mut out = Vec::new();
        let mut end = None;
        while let Some(event) = follow.next().await.expect("event") {
            match event {
                FollowEvent::Output { data, .. } => out.extend(data),
                FollowEvent::End(r) => end = Some(r),
            }
        }
        assert_eq!(out, b"hello\n");
        assert_eq!(end.map(|r| r.exit_code), Some(Some(3)));
        server.await.expect("server");
    }

    #[tokio::test]
    async fn an_absent_daemon_names_the_socket() {
        let dir = tempdir::Dir::new();
        let socket = dir.0.join("nobody.sock");
        let err = Client::new(&socket).vms().await.expect_err("no daemon");
        assert!(err.is_transport());
        let text = err.to_string();
        assert!(text.contains(&socket.display().to_string()), "{text}");
        assert!(text.contains("`portless serve` must be running"), "{text}");
    }
}
