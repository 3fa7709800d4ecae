//! One VM as the daemon sees it: its channel, the agent's life (waiting, ready,
//! unresponsive, restarted, cut off) and the requests in flight. Each VM is driven by a
//! thread of its own that owns the channel; API tasks talk to it through [`VmHandle`] and get
//! answers on oneshot channels. Results and output go to the records writer in batches, and
//! a frame is released to the guest only once its effect is durable; followers hear of them
//! through a broadcast of [`VmEvent`]s.
//!
//! The thread sleeps in `poll(2)` on a wake-up eventfd (API requests, the writer's
//! answers), and, for an `ivshmem-doorbell` VM, on the eventfd the guest rings and the
//! ivshmem server's socket; a `plain` VM cannot ring the host, so its thread also wakes on a
//! timer that backs off from 50 us to `poll_max` while nothing happens.
//!
//! What one guest can make the host spend is bounded by the VM's [`BudgetConfig`]
//! (`[budget]` in `host.toml`; ARCHITECTURE.md, "what one guest can cost the host"):
//!
//! - `driver.rs`: the loop: the channel's I/O, sleeping on the doorbell or a timer;
//! - `lifecycle.rs`: the agent's lifecycle (hello, heartbeat, restarts), resets, cut-offs
//!   and their back-off, reconciliation with the records, the cache of the allow-list;
//! - `writing.rs`: what the agent reported, written to the records in batches; the ends
//!   of executions;
//! - `dispatch.rs`: API requests dispatched as messages, requests in flight and their
//!   deadlines, pushes streamed into the ring as room appears;
//! - `replies.rs`: what the agent sends, matched to what was asked;
//! - `batch.rs`: effects of frames on their way to the records, and the release of frames;
//! - `budget.rs`: pacing buckets, protocol violations, cut-off reasons;
//! - `message.rs`: agent messages copied out of the frame buffer;
//! - [`stepped`]: a driver stepped by hand, for fuzzing and tests;
//! - [`memory`], [`ivshmem`]: the channel's two kinds: a region mapped with `vm-memory`
//!   (`plain`), and the ivshmem server whose doorbell eventfds ring both ways (`doorbell`).

mod batch;
mod budget;
mod dispatch;
mod driver;
pub mod ivshmem;
mod lifecycle;
pub mod memory;
mod message;
mod replies;
pub mod stepped;
mod writing;

use std::os::fd::{AsRawFd, OwnedFd, RawFd};
use std::sync::{Arc, Mutex, mpsc};
use std::time::Duration;

use ring_protocol::SharedMemory;
use ring_protocol::message::{Metrics, PushOutcome, Rejection};
use tokio::sync::{broadcast, oneshot};

pub use crate::config::BudgetConfig;
use crate::records::{ExecutionId, Writer};
use crate::vm::memory::GuestRegion;
use ivshmem::Server;
pub use portless_api::{CommandInfo, CommandList, CutOff, Param, VmInfo, VmState};

/// Why a request to a VM failed.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum VmError {
    /// The agent refused it.
    #[error("rejected by the agent: {}", rejection_text(.0))]
    Rejected(Rejection),
    /// The agent was not ready within the delivery timeout.
    #[error("undeliverable: the agent was not ready within the delivery timeout")]
    Undeliverable,
    /// The agent restarted or vanished before answering.
    #[error("the agent was lost before it answered")]
    AgentLost,
    /// The VM's driver is gone (the daemon is stopping).
    #[error("the VM is shutting down")]
    ShuttingDown,
    /// The request is malformed (a message too large for a frame, say).
    #[error("{0}")]
    Invalid(String),
    /// The VM's budget has no room for the request now (too many in flight, or the guest
    /// is not reading what waits for it).
    #[error("{0}")]
    Busy(String),
    /// The agent did not answer within the answer timeout.
    #[error("the agent did not answer within {} ms", .0.as_millis())]
    NoAnswer(Duration),
}

/// A rejection in words, for people.
pub fn rejection_text(r: &Rejection) -> String {
    use ring_protocol::message::ArgProblem as P;
    match r {
        Rejection::UnknownCommand => "no such command in the guest's allow-list".into(),
        Rejection::InvalidArgument { index, problem } => {
            let what = match problem {
                P::Missing => "is missing",
                P::Unexpected => "is one too many",
                P::NotInteger => "is not an integer",
                P::OutOfRange => "is out of the allowed range",
                P::NotAChoice => "is not one of the allowed choices",
                P::BadCharacter => "has a character outside the allowed set",
                P::BadLength => "is too short or too long",
            };
            format!("argument {} {what}", u32::from(*index) + 1)
        }
        Rejection::Busy => "the agent runs as many commands as its config allows; try again".into(),
        Rejection::NotAllowed => "the guest's config does not allow this".into(),
        Rejection::TooLarge => "larger than the guest allows".into(),
        Rejection::HashMismatch => "the program arrived damaged (SHA-256 mismatch)".into(),
        Rejection::UnknownExecution => "the agent does not know that execution".into(),
        Rejection::BadPush => "the push was out of order or its name is not allowed".into(),
        Rejection::Failed => "the agent could not do it".into(),
    }
}

/// Something followers may want to know.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum VmEvent {
    /// More output of this execution is in the records.
    Output(ExecutionId),
    /// This execution finished.
    Finished(ExecutionId),
    /// A VM's state changed.
    State(String),
}

/// Requests to a VM's driver.
pub enum Request {
    /// Run a command for a recorded (pending) execution.
    Exec {
        /// The execution's record; its number is also the request id on the wire.
        id: ExecutionId,
        /// Command name.
        command: String,
        /// Arguments.
        args: Vec<String>,
        /// Timeout override.
        timeout_ms: Option<u32>,
        /// Accepted, or why not.
        reply: oneshot::Sender<Result<(), VmError>>,
    },
    /// Cancel a running execution.
    Cancel {
        /// Which.
        id: ExecutionId,
        /// Sent, or why not.
        reply: oneshot::Sender<Result<(), VmError>>,
    },
    /// Round trip to the agent.
    Ping {
        /// The round-trip time.
        reply: oneshot::Sender<Result<Duration, VmError>>,
    },
    /// The guest's metrics.
    Metrics {
        /// The figures.
        reply: oneshot::Sender<Result<Metrics, VmError>>,
    },
    /// The allow-list (from the cache when there is one).
    Commands {
        /// The list.
        reply: oneshot::Sender<Result<CommandList, VmError>>,
    },
    /// Push a program, and run it if `run` (as execution `id`).
    Push {
        /// File name in the guest.
        name: String,
        /// The program.
        program: Program,
        /// Run it once stored, recorded as this execution.
        run: Option<ExecutionId>,
        /// Timeout for the run.
        timeout_ms: Option<u32>,
        /// Names this push for [`Request::WithdrawPush`].
        ticket: u64,
        /// The outcome.
        reply: oneshot::Sender<Result<PushOutcome, VmError>>,
    },
    /// The API gave up waiting for push `ticket`: it must not start any more (a start that
    /// comes anyway is cancelled in the guest, and its output is not recorded).
    WithdrawPush {
        /// The push's ticket.
        ticket: u64,
    },
}

/// A pushed program, in a file of its own (the API spools the request's body to the state
/// directory and unlinks it at once): the driver reads it a chunk at a time as the ring has
/// room, so the daemon never holds a whole program in memory.
#[derive(Debug)]
pub struct Program {
    file: std::fs::File,
    size: u64,
    sha256: [u8; 32],
}

impl Program {
    /// A program in `file` (read from offset 0), `size` bytes with this SHA-256.
    pub fn new(file: std::fs::File, size: u64, sha256: [u8; 32]) -> Self {
        Self { file, size, sha256 }
    }

    /// A program held in an anonymous memory file (tests, the fuzzer).
    pub fn from_bytes(data: &[u8]) -> std::io::Result<Self> {
        use sha2::Digest;
        use std::io::Write;
        let mut file = crate::vm::ivshmem::memfd(0)?;
        file.write_all(data)?;
        Ok(Self::new(
            file,
            data.len() as u64,
            sha2::Sha256::digest(data).into(),
        ))
    }

    /// Its size in bytes.
    pub fn size(&self) -> u64 {
        self.size
    }

    /// Its SHA-256.
    pub fn sha256(&self) -> [u8; 32] {
        self.sha256
    }

    /// Reads the bytes at `offset` into `buf` (all of it, or up to the end); how many.
    pub fn read_at(&self, offset: u64, buf: &mut [u8]) -> std::io::Result<usize> {
        use std::os::unix::fs::FileExt;
        let want = usize::try_from(self.size.saturating_sub(offset))
            .unwrap_or(usize::MAX)
            .min(buf.len());
        let part = buf.get_mut(..want).unwrap_or_default();
        self.file.read_exact_at(part, offset)?;
        Ok(want)
    }
}

/// Settings of a VM's driver.
#[derive(Debug, Clone)]
pub struct VmSettings {
    /// The VM's name.
    pub name: String,
    /// No heartbeat for this long: unresponsive.
    pub heartbeat_timeout: Duration,
    /// Unresponsive for this long: executions in flight end `agent_lost`.
    pub lost_after: Duration,
    /// A request for an agent that is not ready within this ends `undeliverable`.
    pub delivery_timeout: Duration,
    /// Periodic re-listing of the allow-list.
    pub command_refresh: Duration,
    /// Longest sleep between polls of a plain channel.
    pub poll_max: Duration,
    /// How long a reset waits for the guest to detach before forcing it.
    pub reset_timeout: Duration,
    /// What the guest may make the host spend.
    pub budget: BudgetConfig,
    /// Output of one stream is merged into one chunk up to this many bytes ...
    pub merge_bytes: usize,
    /// ... or for this long.
    pub merge_wait: Duration,
}

impl VmSettings {
    /// Settings for VM `name` with the default timings and budgets of `host.toml`.
    pub fn new(name: impl Into<String>) -> Self {
        let daemon = crate::config::DaemonConfig::default();
        let records = crate::config::RecordsConfig::default();
        Self {
            name: name.into(),
            heartbeat_timeout: daemon.heartbeat_timeout,
            lost_after: daemon.heartbeat_timeout * 6,
            delivery_timeout: daemon.delivery_timeout,
            command_refresh: daemon.command_refresh,
            poll_max: Duration::from_millis(1),
            reset_timeout: daemon.heartbeat_timeout,
            budget: BudgetConfig::default(),
            merge_bytes: usize::try_from(records.output_merge_bytes).unwrap_or(usize::MAX),
            merge_wait: records.output_merge_wait,
        }
    }
}

/// The channel of a VM.
pub enum ChannelKind {
    /// A memory-backend file that the host maps and polls.
    Plain(GuestRegion),
    /// The daemon is the VM's ivshmem server.
    Doorbell(Server),
}

impl ChannelKind {
    /// The shared region, whichever the kind.
    pub fn region(&self) -> &dyn SharedMemory {
        match self {
            Self::Plain(r) => r,
            Self::Doorbell(s) => s.region(),
        }
    }
}

/// The API's end of a VM's driver.
#[derive(Clone)]
pub struct VmHandle {
    tx: mpsc::Sender<Request>,
    wake: Arc<OwnedFd>,
    status: Arc<Mutex<VmInfo>>,
}

impl VmHandle {
    /// Queues a request and wakes the driver.
    pub fn request(&self, req: Request) -> Result<(), VmError> {
        self.tx.send(req).map_err(|_| VmError::ShuttingDown)?;
        let _ = ivshmem::signal_eventfd(self.wake.as_raw_fd());
        Ok(())
    }

    /// The VM's state now (without its labels and channel, which the configuration has).
    pub fn status(&self) -> VmInfo {
        self.status
            .lock()
            .map(|s| s.clone())
            .unwrap_or_else(|p| p.into_inner().clone())
    }
}

impl VmHandle {
    /// A handle for VM `name` and the driver's end of its request channel.
    fn new(name: &str) -> std::io::Result<(Self, mpsc::Receiver<Request>)> {
        let (tx, rx) = mpsc::channel();
        let status = VmInfo {
            state: VmState::WaitingForAgent,
            ..VmInfo::unknown(name)
        };
        let handle = Self {
            tx,
            wake: Arc::new(ivshmem::eventfd()?),
            status: Arc::new(Mutex::new(status)),
        };
        Ok((handle, rx))
    }
}

/// Starts the driver thread of a VM; its records go through `writer`.
pub fn spawn(
    settings: VmSettings,
    channel: ChannelKind,
    writer: Writer,
    events: broadcast::Sender<VmEvent>,
) -> std::io::Result<(VmHandle, std::thread::JoinHandle<()>)> {
    let (handle, rx) = VmHandle::new(&settings.name)?;
    let (wake, status) = (handle.wake.clone(), handle.status.clone());
    // The driver opens the region and reconciles the records before this returns, so that
    // no execution the API creates from now on is taken for one a previous daemon left.
    let (opened_tx, opened_rx) = mpsc::channel();
    let thread = std::thread::Builder::new()
        .name(format!("vm-{}", settings.name))
        .spawn(move || {
            let mut driver =
                driver::Driver::new(settings, channel, writer, events, rx, wake, status);
            let opened = driver.open(std::time::Instant::now());
            let _ = opened_tx.send(opened);
            if opened {
                driver.run();
            }
        })?;
    // A region that cannot be used is reported by the driver; the VM's requests then fail.
    let _ = opened_rx.recv();
    Ok((handle, thread))
}

/// The raw descriptor of the driver's wake-up eventfd (for tests).
pub fn wake_fd(handle: &VmHandle) -> RawFd {
    handle.wake.as_raw_fd()
}

/// A guest's figures as the API reports them.
pub fn metrics_for_api(m: &Metrics) -> portless_api::Metrics {
    let c = &m.agent;
    portless_api::Metrics {
        uptime_ms: m.uptime_ms,
        load_milli: m.load_milli.iter().map(|&l| u64::from(l)).collect(),
        mem_total_kib: m.mem_total_kib,
        mem_available_kib: m.mem_available_kib,
        processes: m.processes.into(),
        agent_rss_kib: m.agent_rss_kib,
        agent: portless_api::AgentCounters {
            frames_in: c.frames_in,
            frames_out: c.frames_out,
            output_bytes: c.output_bytes,
            executions: c.executions,
            rejections: c.rejections,
            running: c.running.into(),
            resets: c.resets.into(),
        },
    }
}
