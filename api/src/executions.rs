//! Executions: running a command, an execution's record, its output, its end.

use std::fmt;

use serde::{Deserialize, Serialize};

/// The longest time one `wait` request asks the daemon to hold (its own maximum is 300 s);
/// [`Client::wait_final`](crate::Client::wait_final) asks again until the execution has
/// ended.
pub const WAIT_POLL_MS: u32 = 60_000;

/// An execution's id: a number the daemon gives it when it is recorded, never reused.
#[derive(
    Debug, Clone, Copy, Default, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize,
)]
#[serde(transparent)]
pub struct ExecutionId(pub u64);

impl fmt::Display for ExecutionId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}", self.0)
    }
}

impl From<u64> for ExecutionId {
    fn from(id: u64) -> Self {
        Self(id)
    }
}

impl std::str::FromStr for ExecutionId {
    type Err = std::num::ParseIntError;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        s.parse().map(Self)
    }
}

/// Whether `name` can be an allow-list command's name: 1 to 64 of `A-Z a-z 0-9 . _ -` (the
/// agent's rule). Servers check it before anything is sent to a guest.
pub fn is_command_name(name: &str) -> bool {
    (1..=64).contains(&name.len())
        && name
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || matches!(b, b'.' | b'_' | b'-'))
}

/// Where an execution is in its life.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum ExecState {
    /// Recorded; not yet accepted by the agent (on a control plane: not yet claimed by its
    /// host).
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
    /// On a control plane: not yet claimed, and its host is offline.
    Delayed,
    /// On a control plane: claimed by its host, not yet started by the agent.
    InProgress,
    /// On a control plane: its host did not claim it before the delivery deadline.
    DeliveryTimedOut,
    /// On a control plane: its host stopped reporting it and did not come back in time,
    /// so how it ended cannot be known.
    HostLost,
    /// A state this client does not know; treated as final.
    #[serde(other)]
    Unknown,
}

impl ExecState {
    /// Every state the daemon knows, in declaration order (not [`ExecState::Unknown`]).
    pub const ALL: [ExecState; 14] = [
        ExecState::Pending,
        ExecState::Running,
        ExecState::Succeeded,
        ExecState::Failed,
        ExecState::TimedOut,
        ExecState::Cancelled,
        ExecState::AgentLost,
        ExecState::Undeliverable,
        ExecState::Rejected,
        ExecState::FailedToStart,
        ExecState::Delayed,
        ExecState::InProgress,
        ExecState::DeliveryTimedOut,
        ExecState::HostLost,
    ];

    /// The known state with this name (`timed_out`).
    pub fn from_name(name: &str) -> Option<Self> {
        Self::ALL.into_iter().find(|s| s.as_str() == name)
    }

    /// Whether the execution has ended: anything but pending, running, delayed and in
    /// progress.
    pub fn is_final(self) -> bool {
        !matches!(
            self,
            Self::Pending | Self::Running | Self::Delayed | Self::InProgress
        )
    }

    /// Whether the execution ended badly, as `max_errors` counts: a final state other than
    /// succeeded, cancelled (a caller's choice) and delivery_timed_out (its host was away).
    pub fn is_error(self) -> bool {
        self.is_final()
            && !matches!(
                self,
                Self::Succeeded | Self::Cancelled | Self::DeliveryTimedOut
            )
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
            Self::Delayed => "delayed",
            Self::InProgress => "in_progress",
            Self::DeliveryTimedOut => "delivery_timed_out",
            Self::HostLost => "host_lost",
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
    pub id: ExecutionId,
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

impl StreamTotals {
    /// The totals of a stream of which `stored_len` of `total_len` bytes are kept.
    pub fn new(stored_len: u64, total_len: u64) -> Self {
        Self {
            stored_len,
            total_len,
            truncated: stored_len < total_len,
        }
    }
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

/// `POST /v1/exec`: what to run where. Absent optional fields and `null` mean the same;
/// integers may be written with a zero fraction (`5.0`).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ExecRequest {
    /// `vm1`, `a,b`, `role=web` or `*`.
    pub target: String,
    /// The command name.
    pub command: String,
    /// The argument values.
    #[serde(default)]
    pub args: Vec<String>,
    /// A timeout that overrides the command's, in milliseconds.
    #[serde(default, deserialize_with = "optional_whole_number")]
    pub timeout_ms: Option<u32>,
    /// At most this many running at once across the target's VMs (a number, or a
    /// percentage of the VMs as `"10%"`).
    #[serde(default)]
    pub max_concurrency: Option<Limit>,
    /// Stop dispatching once more than this many have failed (a number, or a percentage of
    /// the VMs as `"10%"`).
    #[serde(default)]
    pub max_errors: Option<Limit>,
    /// On a control plane: a key that makes the request idempotent. A second request with
    /// the same key creates nothing and answers with the first one's command (or 409 if it
    /// asked for something else).
    #[serde(
        default,
        skip_serializing_if = "Option::is_none",
        deserialize_with = "idempotency_key"
    )]
    pub idempotency_key: Option<String>,
}

/// The longest idempotency key, in bytes.
pub const MAX_IDEMPOTENCY_KEY: usize = 200;

/// An idempotency key: 1 to [`MAX_IDEMPOTENCY_KEY`] bytes.
fn idempotency_key<'de, D: serde::Deserializer<'de>>(d: D) -> Result<Option<String>, D::Error> {
    use serde::de::Error;
    match Option::<String>::deserialize(d)? {
        Some(k) if k.is_empty() || k.len() > MAX_IDEMPOTENCY_KEY => Err(D::Error::custom(format!(
            "idempotency_key: 1 to {MAX_IDEMPOTENCY_KEY} bytes"
        ))),
        k => Ok(k),
    }
}

/// A limit of a fan-out (`max_concurrency`, `max_errors`): a count of VMs, or a percentage
/// of the VMs targeted, as fleet tools write them (`5`, `"10%"`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Limit {
    /// This many.
    Count(usize),
    /// This percentage (0 to 100) of the VMs targeted, rounded down.
    Percent(u8),
}

impl Limit {
    /// The count this limit stands for in a fan-out to `total` VMs: a percentage rounds
    /// down.
    pub fn of(self, total: usize) -> usize {
        match self {
            Self::Count(n) => n,
            Self::Percent(p) => total.saturating_mul(usize::from(p)) / 100,
        }
    }

    /// How many may run at once in a fan-out to `total` VMs: `None` for no limit (a count
    /// of 0), at least 1 for a percentage.
    pub fn concurrency_of(self, total: usize) -> Option<usize> {
        match self {
            Self::Count(0) => None,
            Self::Count(n) => Some(n),
            Self::Percent(_) => Some(self.of(total).max(1)),
        }
    }
}

impl fmt::Display for Limit {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Self::Count(n) => write!(f, "{n}"),
            Self::Percent(p) => write!(f, "{p}%"),
        }
    }
}

/// A limit that is neither a whole number nor a percentage from 0% to 100%.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("{0:?} is not a limit: expected a whole number (5) or a percentage from 0% to 100% (10%)")]
pub struct BadLimit(pub String);

impl std::str::FromStr for Limit {
    type Err = BadLimit;

    fn from_str(s: &str) -> Result<Self, BadLimit> {
        let bad = || BadLimit(s.to_owned());
        let digits =
            |t: &str| !t.is_empty() && t.len() <= 20 && t.bytes().all(|b| b.is_ascii_digit());
        match s.strip_suffix('%') {
            // 0 to 100, without leading zeros (the schema's pattern).
            Some(p) if digits(p) && (p.len() == 1 || !p.starts_with('0')) => {
                match p.parse::<u8>() {
                    Ok(p) if p <= 100 => Ok(Self::Percent(p)),
                    _ => Err(bad()),
                }
            }
            Some(_) => Err(bad()),
            None if digits(s) => s.parse().map(Self::Count).map_err(|_| bad()),
            None => Err(bad()),
        }
    }
}

impl Serialize for Limit {
    fn serialize<S: serde::Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        match self {
            Self::Count(n) => s.serialize_u64(*n as u64),
            Self::Percent(_) => s.collect_str(self),
        }
    }
}

impl<'de> Deserialize<'de> for Limit {
    fn deserialize<D: serde::Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        use serde::de::Error;
        #[derive(Deserialize)]
        #[serde(untagged)]
        enum Raw {
            Number(serde_json::Number),
            Text(String),
        }
        match Raw::deserialize(d)? {
            Raw::Number(n) => whole_number(n).map(Self::Count).map_err(D::Error::custom),
            // In JSON a count is a number: a string is a percentage.
            Raw::Text(t) if t.ends_with('%') => t.parse().map_err(D::Error::custom),
            Raw::Text(t) => Err(D::Error::custom(BadLimit(t))),
        }
    }
}

/// An optional integer that JSON may also write with a zero fraction (`5.0`, which JSON
/// Schema counts as an integer too); anything else out of the type's range is an error.
fn optional_whole_number<'de, D, T>(d: D) -> Result<Option<T>, D::Error>
where
    D: serde::Deserializer<'de>,
    T: TryFrom<u64>,
{
    use serde::de::Error;
    match Option::<serde_json::Number>::deserialize(d)? {
        None => Ok(None),
        Some(n) => whole_number(n).map(Some).map_err(D::Error::custom),
    }
}

/// A JSON number that is a whole number in `T`'s range (`5` or `5.0`).
fn whole_number<T: TryFrom<u64>>(n: serde_json::Number) -> Result<T, String> {
    let whole = n.as_u64().or_else(|| {
        n.as_f64()
            // `u64::MAX as f64` is 2^64, itself out of range.
            .filter(|f| f.fract() == 0.0 && *f >= 0.0 && *f < u64::MAX as f64)
            .map(|f| f as u64)
    });
    let value = whole.ok_or_else(|| format!("{n} is not a whole number"))?;
    T::try_from(value).map_err(|_| format!("{n} is out of range"))
}

/// One VM's part of an exec, as dispatched.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Dispatched {
    /// The VM.
    pub vm: String,
    /// The execution's id; `None` only when its record could not be created.
    #[serde(default)]
    pub id: Option<ExecutionId>,
    /// Its state once the agent accepted or refused it (`pending` when it could not be
    /// read back).
    pub state: ExecState,
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
                ExecState::Rejected
                    | ExecState::Undeliverable
                    | ExecState::AgentLost
                    | ExecState::FailedToStart
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
    /// On a control plane: the command, whose invocations (one per VM) the executions are.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub command: Option<u64>,
}

/// `GET /v1/executions`: executions, newest first.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct ExecutionList {
    /// The records.
    pub executions: Vec<ExecutionRecord>,
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

/// `POST /v1/executions/{id}/cancel`'s answer.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct CancelResponse {
    /// The execution.
    pub id: ExecutionId,
    /// Its state when the daemon answered.
    pub state: ExecState,
}

/// Which executions `GET /v1/executions` lists: every filter that is set must match. The
/// list is newest first; page back through it with `before`, the last id of a page.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct ExecutionQuery {
    /// Only on this VM.
    pub vm: Option<String>,
    /// Only in this state.
    pub state: Option<ExecState>,
    /// Only of this command.
    pub command: Option<String>,
    /// Only those this principal started.
    pub principal: Option<String>,
    /// Only those asked for at or after this time (ms since the epoch).
    pub since_ms: Option<u64>,
    /// Only those asked for before this time (ms since the epoch).
    pub until_ms: Option<u64>,
    /// Only those with an id below this one.
    pub before: Option<ExecutionId>,
    /// At most this many (the daemon's default 100, at most 10,000).
    pub limit: Option<usize>,
}

impl ExecutionQuery {
    /// The query's `(key, value)` pairs, in the order the route documents them.
    pub fn pairs(&self) -> Vec<(&'static str, String)> {
        let mut q = Vec::new();
        let mut put = |k, v: Option<String>| {
            if let Some(v) = v {
                q.push((k, v));
            }
        };
        put("vm", self.vm.clone());
        put("state", self.state.map(|s| s.as_str().to_owned()));
        put("command", self.command.clone());
        put("principal", self.principal.clone());
        put("since_ms", self.since_ms.map(|v| v.to_string()));
        put("until_ms", self.until_ms.map(|v| v.to_string()));
        put("before", self.before.map(|v| v.to_string()));
        put("limit", self.limit.map(|v| v.to_string()));
        q
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn limits_read_as_numbers_or_percentages() {
        let read = |j: &str| serde_json::from_str::<Limit>(j);
        assert_eq!(read("5").ok(), Some(Limit::Count(5)));
        assert_eq!(read("5.0").ok(), Some(Limit::Count(5)));
        assert_eq!(read(r#""10%""#).ok(), Some(Limit::Percent(10)));
        assert_eq!("7".parse::<Limit>().ok(), Some(Limit::Count(7)));
        for bad in [
            r#""101%""#,
            r#""-1%""#,
            r#""%""#,
            r#""x""#,
            "1.5",
            "-1",
            r#""1 %""#,
        ] {
            assert!(read(bad).is_err(), "{bad}");
        }
        assert_eq!(
            serde_json::to_string(&Limit::Percent(10)).ok().as_deref(),
            Some(r#""10%""#)
        );
        assert_eq!(
            serde_json::to_string(&Limit::Count(3)).ok().as_deref(),
            Some("3")
        );
        assert_eq!(Limit::Percent(10).of(55), 5);
        assert_eq!(Limit::Percent(10).concurrency_of(5), Some(1));
        assert_eq!(Limit::Count(0).concurrency_of(5), None);
        assert!(ExecState::HostLost.is_error() && !ExecState::DeliveryTimedOut.is_error());
        assert!(!ExecState::InProgress.is_final() && ExecState::DeliveryTimedOut.is_final());
    }
}
