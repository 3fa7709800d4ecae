//! What the agent needs from the operating system, as a trait: the agent's state machine calls
//! it and never touches the OS itself, so the same machine runs on Linux (`agent-linux`) and
//! against a fake in tests.

use ring_protocol::message::Stream;

/// An OS error number (`errno`), as reported to the host in `FailedToStart`.
pub type Errno = i32;

/// Who a process runs as: a user or group name, or a numeric id.
pub use crate::config::Principal as Identity;

/// Everything needed to start one process. Arguments go to `execve` as they are: no shell.
#[derive(Debug, Clone, Copy)]
pub struct SpawnRequest<'a> {
    /// Absolute path of the program.
    pub program: &'a str,
    /// `argv[1..]`; `argv[0]` is `program`.
    pub args: &'a [&'a str],
    /// The whole environment (`KEY=VALUE`), nothing inherited.
    pub env: &'a [&'a str],
    /// Working directory, if not the platform's default.
    pub cwd: Option<&'a str>,
    /// Run as this user, if set.
    pub user: Option<Identity<'a>>,
    /// Run as this group, if set.
    pub group: Option<Identity<'a>>,
    /// Resource limits of the whole execution (the process and everything it starts).
    pub limits: Limits,
}

/// Resource limits of one execution, as the allow-list gives them (`None`: no limit). A
/// platform that cannot enforce a limit that is set refuses to start the command.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct Limits {
    /// Most memory in bytes (cgroup `memory.max`).
    pub memory_max: Option<u64>,
    /// Most processes and threads at once (cgroup `pids.max`).
    pub pids_max: Option<u32>,
    /// Most CPU time, in percent of one CPU (cgroup `cpu.max`).
    pub cpu_max_percent: Option<u32>,
}

impl Limits {
    /// No limit.
    pub const NONE: Self = Self {
        memory_max: None,
        pids_max: None,
        cpu_max_percent: None,
    };

    /// Whether any limit is set.
    pub const fn any(&self) -> bool {
        self.memory_max.is_some() || self.pids_max.is_some() || self.cpu_max_percent.is_some()
    }
}

/// The result of reading a process's output pipe.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ReadOutcome {
    /// This many bytes were read into the buffer.
    Data(usize),
    /// Nothing to read now.
    WouldBlock,
    /// The stream is closed: the process and everything that inherited it are done with it.
    Closed,
}

/// How a process ended, as the OS reports it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ExitStatus {
    /// `exit(code)`.
    Exited(i32),
    /// Killed by this signal.
    Signaled(i32),
}

/// Signals the agent sends to a process group.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Signal {
    /// Ask politely (SIGTERM).
    Terminate,
    /// Insist (SIGKILL).
    Kill,
}

/// Guest-wide figures, read on demand.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct SystemMetrics {
    /// Milliseconds since boot.
    pub uptime_ms: u64,
    /// Load averages over 1, 5 and 15 minutes, times 1000.
    pub load_milli: [u32; 3],
    /// Total memory in KiB.
    pub mem_total_kib: u64,
    /// Available memory in KiB.
    pub mem_available_kib: u64,
    /// Number of processes.
    pub processes: u32,
    /// The agent's own resident memory in KiB.
    pub agent_rss_kib: u64,
}

/// Something worth a line in the guest's log.
#[derive(Debug, Clone, Copy)]
pub enum LogEvent<'a> {
    /// An execution started.
    Started {
        /// Its id.
        execution: ring_protocol::message::ExecutionId,
        /// The command name (or the pushed program's name).
        command: &'a str,
    },
    /// An execution ended.
    Finished {
        /// Its id.
        execution: ring_protocol::message::ExecutionId,
        /// How.
        finished: ring_protocol::message::Finished,
        /// Processes it left running, killed at its end.
        leftovers: u32,
    },
    /// A request was refused.
    Rejected {
        /// What was asked for.
        what: &'a str,
        /// Why.
        reason: ring_protocol::message::Rejection,
    },
    /// A program was pushed and stored.
    Pushed {
        /// Its file name.
        name: &'a str,
        /// Its size.
        size: u64,
    },
    /// A protocol-level problem (an undecodable frame, an error from the host).
    Protocol(&'a str),
}

/// The operating system, as the agent sees it.
pub trait Platform {
    /// A running process: whatever the platform needs to find it again.
    type Process;

    /// Starts a process in a new process group with its stdout and stderr on non-blocking
    /// pipes and stdin closed.
    fn spawn(&mut self, request: &SpawnRequest<'_>) -> Result<Self::Process, Errno>;

    /// Reads what is available of one output stream into `buf`.
    fn read_output(
        &mut self,
        process: &mut Self::Process,
        stream: Stream,
        buf: &mut [u8],
    ) -> ReadOutcome;

    /// Reaps the process if it has ended. Must not block.
    fn try_wait(&mut self, process: &mut Self::Process) -> Option<ExitStatus>;

    /// Signals everything the execution started: the process, its process group and, where
    /// the platform contains executions (a cgroup each), whatever left the group.
    fn signal(&mut self, process: &mut Self::Process, signal: Signal);

    /// Kills whatever the execution started that is still running, once its leader has been
    /// reaped and its output read. Returns how many processes that was (0: none).
    fn kill_leftovers(&mut self, process: &mut Self::Process) -> u32;

    /// Whether nothing the execution started is still running. Must not block.
    fn leftovers_gone(&mut self, process: &mut Self::Process) -> bool;

    /// Releases what is left of a finished process (pipes). After this the handle is dropped.
    fn release(&mut self, process: Self::Process);

    /// Creates the staging file for a program push named `name` in `dir`, replacing any
    /// earlier partial one, readable and writable by the agent only.
    fn push_create(&mut self, dir: &str, name: &str) -> Result<(), Errno>;

    /// Appends to the staging file.
    fn push_write(&mut self, data: &[u8]) -> Result<(), Errno>;

    /// Ends the push: if `keep`, makes the staging file the program `dir/name` (executable by
    /// its owner only) and returns; otherwise deletes it.
    fn push_finish(&mut self, keep: bool) -> Result<(), Errno>;

    /// Reads the guest's figures.
    fn metrics(&mut self) -> SystemMetrics;

    /// Records an event in the guest's log.
    fn log(&mut self, event: &LogEvent<'_>);
}
