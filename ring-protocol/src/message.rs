//! The messages carried in frames, encoded with postcard.
//!
//! Strings and byte strings borrow from the buffer they were decoded from (the receiver's
//! private copy of the frame), so decoding allocates nothing. Variant order is part of the
//! wire format (postcard encodes an enum as the variant's index): append new variants at the
//! end, never reorder. PROTOCOL.md lists every message with its index.

use serde::{Deserialize, Serialize};

/// The protocol version this crate speaks.
pub const PROTOCOL_VERSION: u16 = 1;
/// The oldest protocol version this crate still speaks.
pub const MIN_PROTOCOL_VERSION: u16 = 1;
/// Most positional arguments in one exec request.
pub const MAX_ARGS: usize = 16;
/// Most declared parameters of one command.
pub const MAX_PARAMS: usize = 8;

/// Identifies an execution across agent restarts: the agent's generation and a counter.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize)]
pub struct ExecutionId {
    /// The agent generation that started it.
    pub generation: u32,
    /// Sequence number within that generation, from 1.
    pub counter: u32,
}

impl core::fmt::Display for ExecutionId {
    fn fmt(&self, f: &mut core::fmt::Formatter<'_>) -> core::fmt::Result {
        write!(f, "{:08x}-{:08x}", self.generation, self.counter)
    }
}

/// Optional features a side supports, as bits.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Default, Serialize, Deserialize)]
pub struct Capabilities(pub u32);

impl Capabilities {
    /// The agent accepts program pushes.
    pub const PUSH: Self = Self(1 << 0);
    /// The agent answers metrics requests.
    pub const METRICS: Self = Self(1 << 1);
    /// This side can be woken by an interrupt (otherwise it polls).
    pub const INTERRUPTS: Self = Self(1 << 2);
    /// The agent can cancel executions.
    pub const CANCEL: Self = Self(1 << 3);
    /// The host reads [`AgentToHost::Ended`]: an agent then ends executions with it instead
    /// of [`AgentToHost::Exit`].
    pub const ENDED: Self = Self(1 << 4);

    /// Whether every bit of `other` is set.
    pub const fn contains(self, other: Self) -> bool {
        self.0 & other.0 == other.0
    }

    /// The union of both sets.
    #[must_use]
    pub const fn union(self, other: Self) -> Self {
        Self(self.0 | other.0)
    }
}

/// Sent by both sides first on every (re)connect.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub struct Hello<'a> {
    /// Oldest protocol version the sender speaks.
    pub min_version: u16,
    /// Newest protocol version the sender speaks.
    pub max_version: u16,
    /// What the sender supports.
    pub capabilities: Capabilities,
    /// The sender's generation (changes when its process restarts).
    pub generation: u32,
    /// Revision of the sender's command configuration (agent), 0 for the host.
    pub config_revision: u32,
    /// Name and version of the sending software, for logs.
    pub software: &'a str,
    /// Whether this hello answers the peer's. A side answers every hello that is not itself
    /// an answer, so each (re)attach costs at most one hello each way plus one answer.
    pub reply: bool,
}

impl Hello<'_> {
    /// The version both sides will speak, if their ranges overlap.
    pub fn negotiate(&self, other: &Hello<'_>) -> Option<u16> {
        let v = self.max_version.min(other.max_version);
        (v >= self.min_version.max(other.min_version)).then_some(v)
    }
}

/// How a declared parameter of a command is checked.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub enum ParamKind<'a> {
    /// A decimal integer in `min..=max`.
    Integer {
        /// Smallest value accepted.
        min: i64,
        /// Largest value accepted.
        max: i64,
    },
    /// One of a list of words, separated by `|` (`"start|stop|restart"`).
    OneOf {
        /// The choices, `|`-separated.
        choices: &'a str,
    },
    /// A string of `min_len..=max_len` bytes, each in the character class.
    Text {
        /// The class, as written in the config (`"a-z0-9._-"`).
        class: &'a str,
        /// Shortest length accepted.
        min_len: u16,
        /// Longest length accepted.
        max_len: u16,
    },
}

/// A declared parameter of a command.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub struct ParamSpec<'a> {
    /// Its name, for help and errors.
    pub name: &'a str,
    /// How values are checked.
    pub kind: ParamKind<'a>,
}

/// A command the guest's config allows, as listed to the host.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct CommandInfo<'a> {
    /// Name used to run it.
    pub name: &'a str,
    /// One line for people.
    pub description: &'a str,
    /// Declared parameters, in argument order.
    pub params: heapless::Vec<ParamSpec<'a>, MAX_PARAMS>,
    /// Timeout in milliseconds, 0 for none.
    pub timeout_ms: u32,
    /// Most output bytes kept per stream.
    pub max_output: u64,
}

/// The positional arguments of an exec request.
pub type Args<'a> = heapless::Vec<&'a str, MAX_ARGS>;

/// Run a command by name.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ExecRequest<'a> {
    /// Chosen by the host; echoed in the reply.
    pub request_id: u64,
    /// Command name from the allow-list.
    pub command: &'a str,
    /// Values for the declared parameters, in order.
    pub args: Args<'a>,
    /// Overrides the command's timeout when shorter, in milliseconds.
    pub timeout_ms: Option<u32>,
}

/// Which output stream a chunk belongs to.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
pub enum Stream {
    /// Standard output.
    Stdout,
    /// Standard error.
    Stderr,
}

/// Why a single argument was refused.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub enum ArgProblem {
    /// A declared parameter has no value.
    Missing,
    /// More values than declared parameters.
    Unexpected,
    /// Not a decimal integer.
    NotInteger,
    /// An integer outside the declared range.
    OutOfRange,
    /// Not one of the declared choices.
    NotAChoice,
    /// A character outside the declared class.
    BadCharacter,
    /// Shorter or longer than declared.
    BadLength,
}

/// Why a request was refused.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub enum Rejection {
    /// No command of that name in the allow-list.
    UnknownCommand,
    /// An argument is wrong.
    InvalidArgument {
        /// Zero-based position of the argument.
        index: u8,
        /// What is wrong with it.
        problem: ArgProblem,
    },
    /// As many executions are running as the agent allows.
    Busy,
    /// The agent's config does not allow this (program push disabled, for one).
    NotAllowed,
    /// A pushed program exceeds the size limit.
    TooLarge,
    /// A pushed program's SHA-256 does not match.
    HashMismatch,
    /// No execution with that id is known.
    UnknownExecution,
    /// No push with that id is in progress, or a chunk does not follow the previous one.
    BadPush,
    /// The agent could not do it (a file could not be written, say).
    Failed,
}

/// How an execution ended.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub enum Outcome {
    /// Exited with this code.
    Exited(i32),
    /// Killed by this signal (not by Portless).
    Signaled(i32),
    /// Killed after its timeout.
    TimedOut,
    /// Killed at the host's request.
    Cancelled,
    /// Never started; the OS error number.
    FailedToStart(i32),
}

/// How an execution is doing, as answered to a status query.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub enum ExecState {
    /// Not known to the agent (never existed, or too old to be remembered).
    Unknown,
    /// Still running.
    Running {
        /// Milliseconds since it started.
        elapsed_ms: u64,
        /// Stdout bytes produced so far.
        stdout_bytes: u64,
        /// Stderr bytes produced so far.
        stderr_bytes: u64,
    },
    /// Finished.
    Finished(Finished),
}

/// The end of an execution.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub struct Finished {
    /// How it ended.
    pub outcome: Outcome,
    /// Milliseconds from start to end.
    pub duration_ms: u64,
    /// Stdout bytes produced in all.
    pub stdout_bytes: u64,
    /// Stderr bytes produced in all.
    pub stderr_bytes: u64,
    /// Whether output beyond the command's limit was dropped by the agent.
    pub truncated: bool,
}

/// What became of a program push.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub enum PushOutcome {
    /// Stored, not run.
    Stored,
    /// Stored and started as this execution.
    Started(ExecutionId),
    /// Refused or failed.
    Failed(Rejection),
}

/// The agent's own counters.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Serialize, Deserialize)]
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
    /// Executions running now.
    pub running: u32,
    /// Channel resets since the agent started.
    pub resets: u32,
}

/// Guest metrics.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Serialize, Deserialize)]
pub struct Metrics {
    /// Milliseconds since the guest booted.
    pub uptime_ms: u64,
    /// Load averages over 1, 5 and 15 minutes, times 1000.
    pub load_milli: [u32; 3],
    /// Total memory in KiB.
    pub mem_total_kib: u64,
    /// Available memory in KiB.
    pub mem_available_kib: u64,
    /// Number of processes.
    pub processes: u32,
    /// The agent's resident memory in KiB.
    pub agent_rss_kib: u64,
    /// The agent's own counters.
    pub agent: AgentCounters,
}

/// Kinds of protocol error.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub enum ErrorCode {
    /// A frame could not be decoded as a message.
    Undecodable,
    /// No protocol version in common.
    UnsupportedVersion,
    /// A message that makes no sense now (before hello, say).
    Unexpected,
    /// Something went wrong inside the sender.
    Internal,
}

/// A protocol-level error report.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub struct ProtocolError<'a> {
    /// What kind of error.
    pub code: ErrorCode,
    /// Details for people.
    pub detail: &'a str,
}

/// Messages from the host to the agent. Variant order is wire format.
#[allow(clippy::large_enum_variant)] // no allocation: decoded in place, never boxed
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub enum HostToAgent<'a> {
    /// 0: handshake.
    Hello(Hello<'a>),
    /// 1: liveness check; answered with [`AgentToHost::Pong`].
    Ping {
        /// Echoed back.
        nonce: u64,
    },
    /// 2: one page of the allow-list.
    ListCommands {
        /// Echoed in the replies.
        request_id: u64,
        /// Index of the first command wanted.
        start: u16,
        /// Most commands wanted.
        limit: u16,
    },
    /// 3: run a command.
    Exec(ExecRequest<'a>),
    /// 4: how is an execution doing?
    Status {
        /// Echoed in the reply.
        request_id: u64,
        /// Which execution.
        execution: ExecutionId,
    },
    /// 5: stop an execution (TERM, then KILL after a grace period).
    Cancel {
        /// Echoed in a rejection; success shows as the execution's exit.
        request_id: u64,
        /// Which execution.
        execution: ExecutionId,
    },
    /// 6: start a program push.
    PushBegin {
        /// Chosen by the host.
        push_id: u64,
        /// File name (no path).
        name: &'a str,
        /// Total size in bytes.
        size: u64,
        /// SHA-256 of the whole program.
        sha256: [u8; 32],
    },
    /// 7: the next piece of a program push.
    PushChunk {
        /// Which push.
        push_id: u64,
        /// Byte offset of `data` in the program; chunks come in order.
        offset: u64,
        /// The bytes.
        #[serde(serialize_with = "bytes")]
        data: &'a [u8],
    },
    /// 8: all chunks sent: verify, store, and run if asked.
    PushCommit {
        /// Which push.
        push_id: u64,
        /// Run it once stored.
        run: bool,
        /// Timeout for the run, in milliseconds.
        timeout_ms: Option<u32>,
    },
    /// 9: ask for metrics.
    Metrics {
        /// Echoed in the reply.
        request_id: u64,
    },
    /// 10: protocol error.
    Error(ProtocolError<'a>),
}

/// Messages from the agent to the host. Variant order is wire format.
#[allow(clippy::large_enum_variant)] // no allocation: decoded in place, never boxed
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub enum AgentToHost<'a> {
    /// 0: handshake.
    Hello(Hello<'a>),
    /// 1: answer to a ping.
    Pong {
        /// The ping's nonce.
        nonce: u64,
    },
    /// 2: one command of a listing.
    Command {
        /// The listing request.
        request_id: u64,
        /// Index of this command in the allow-list.
        index: u16,
        /// The command.
        info: CommandInfo<'a>,
    },
    /// 3: end of one page of a listing.
    CommandsEnd {
        /// The listing request.
        request_id: u64,
        /// Commands in the allow-list in all.
        total: u16,
        /// Index to ask for next, if the page stopped early.
        next: Option<u16>,
    },
    /// 4: an exec request was accepted and started.
    Accepted {
        /// The request.
        request_id: u64,
        /// The new execution.
        execution: ExecutionId,
    },
    /// 5: a request was refused.
    Rejected {
        /// The request (exec, list, status, cancel or metrics); pushes are answered with
        /// [`AgentToHost::PushResult`] instead.
        request_id: u64,
        /// Why.
        reason: Rejection,
    },
    /// 6: output of a running execution.
    Output {
        /// Which execution.
        execution: ExecutionId,
        /// Which stream.
        stream: Stream,
        /// Offset of `data` in the stream.
        offset: u64,
        /// The bytes.
        #[serde(serialize_with = "bytes")]
        data: &'a [u8],
    },
    /// 7: an execution ended. No output of it follows.
    Exit {
        /// Which execution.
        execution: ExecutionId,
        /// How it ended.
        finished: Finished,
    },
    /// 8: answer to a status query.
    Status {
        /// The query.
        request_id: u64,
        /// Which execution.
        execution: ExecutionId,
        /// Its state.
        state: ExecState,
    },
    /// 9: what became of a push.
    PushResult {
        /// Which push.
        push_id: u64,
        /// The result.
        outcome: PushOutcome,
    },
    /// 10: answer to a metrics request.
    Metrics {
        /// The request.
        request_id: u64,
        /// The figures.
        metrics: Metrics,
    },
    /// 11: the allow-list changed (config reload); the host should list again.
    CommandsChanged {
        /// The new config revision.
        config_revision: u32,
    },
    /// 12: protocol error.
    Error(ProtocolError<'a>),
    /// 13: an execution ended, with what the agent had to clean up after it; sent instead of
    /// `Exit` to a host that announces [`Capabilities::ENDED`]. No output of it follows.
    Ended {
        /// Which execution.
        execution: ExecutionId,
        /// How it ended.
        finished: Finished,
        /// Processes it had started that were still running when it ended (after its
        /// leader exited and its output was read), which the agent then killed.
        leftovers: u32,
    },
}

/// Serialises a byte string as one block (postcard: length, then a single copy) rather than
/// as a sequence of `u8` elements, which postcard would push one at a time. The bytes on the
/// wire are the same; decoding `&[u8]` already borrows them in one piece.
fn bytes<S: serde::Serializer>(data: &&[u8], s: S) -> Result<S::Ok, S::Error> {
    s.serialize_bytes(data)
}

/// A message failed to decode.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct DecodeError;

impl core::fmt::Display for DecodeError {
    fn fmt(&self, f: &mut core::fmt::Formatter<'_>) -> core::fmt::Result {
        f.write_str("frame is not a valid message")
    }
}

impl core::error::Error for DecodeError {}

/// Decodes one message from a payload, borrowing strings and bytes from it. Trailing bytes
/// after the message are an error.
pub fn decode<'a, T: Deserialize<'a>>(payload: &'a [u8]) -> Result<T, DecodeError> {
    match postcard::take_from_bytes(payload) {
        Ok((msg, [])) => Ok(msg),
        _ => Err(DecodeError),
    }
}

/// Encodes one message into `buf`, returning the used part.
pub fn encode<'b, T: Serialize + ?Sized>(
    msg: &T,
    buf: &'b mut [u8],
) -> Result<&'b mut [u8], crate::SendError> {
    postcard::to_slice(msg, buf).map_err(|e| match e {
        postcard::Error::SerializeBufferFull => crate::SendError::TooLarge,
        _ => crate::SendError::Encode,
    })
}
