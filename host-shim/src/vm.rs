//! One VM as the daemon sees it: its channel, the agent's life (waiting, ready,
//! unresponsive, restarted) and the requests in flight. Each VM is driven by a thread of its
//! own that owns the channel; API tasks talk to it through [`VmHandle`] and get answers on
//! oneshot channels. Results and output go straight into the [`Records`]; followers hear of
//! them through a broadcast of [`VmEvent`]s.
//!
//! The thread sleeps in `poll(2)` on a wake-up eventfd (API requests), and, for an
//! `ivshmem-doorbell` VM, on the eventfd the guest rings and the ivshmem server's socket; a
//! `plain` VM cannot ring the host, so its thread also wakes on a timer that backs off from
//! 50 us to `poll_max` while nothing happens.

use std::collections::{HashMap, VecDeque};
use std::os::fd::{AsRawFd, OwnedFd, RawFd};
use std::sync::{Arc, Mutex, mpsc};
use std::time::{Duration, Instant};

use ring_protocol::message::{
    AgentToHost, Capabilities, ExecRequest, ExecutionId as AgentExecId, Finished, Hello,
    HostToAgent, MIN_PROTOCOL_VERSION, Metrics, Outcome, PROTOCOL_VERSION, ParamKind, PushOutcome,
    Rejection, Stream,
};
use ring_protocol::{ChannelError, HostEndpoint, RecvError, SendError, SharedMemory, frame_buf};
use serde::Serialize;
use tokio::sync::{broadcast, oneshot};

use crate::ivshmem::{self, Server};
use crate::memory::GuestRegion;
use crate::records::{ExecState, ExecutionId, Finish, OutputStream, Records};

/// Where a VM's agent is, as the API reports it.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum VmState {
    /// No agent has greeted yet (or the channel is being reset).
    WaitingForAgent,
    /// The agent answers.
    Ready,
    /// The agent's heartbeat stopped.
    Unresponsive,
}

/// A VM's state for the API.
#[derive(Debug, Clone, Serialize)]
pub struct VmStatus {
    /// The VM's name.
    pub name: String,
    /// Where its agent is.
    pub state: VmState,
    /// The agent's generation (changes when it restarts).
    pub agent_generation: Option<u32>,
    /// The agent's software string.
    pub agent_software: Option<String>,
    /// The agent's allow-list revision.
    pub config_revision: Option<u32>,
    /// Milliseconds since the agent's heartbeat last moved.
    pub heartbeat_age_ms: Option<u64>,
    /// Agent restarts seen by this daemon.
    pub agent_restarts: u32,
    /// Executions running in the guest.
    pub running: usize,
}

/// One declared parameter of a command, for the API.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
#[serde(tag = "kind", rename_all = "snake_case")]
pub enum ParamDesc {
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
        /// The class, as written in the guest's config.
        charset: String,
        /// Shortest length.
        min_len: u16,
        /// Longest length.
        max_len: u16,
    },
}

/// A command the guest allows, for the API.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct CommandDesc {
    /// Its name.
    pub name: String,
    /// One line for people.
    pub description: String,
    /// Parameters, in argument order.
    pub params: Vec<ParamDesc>,
    /// Timeout in milliseconds, 0 for none.
    pub timeout_ms: u32,
    /// Output kept per stream by the agent.
    pub max_output: u64,
}

/// A VM's allow-list as last listed.
#[derive(Debug, Clone, Serialize)]
pub struct CommandList {
    /// Milliseconds since it was listed.
    pub age_ms: u64,
    /// The agent's allow-list revision it was listed from.
    pub config_revision: u32,
    /// The commands.
    pub commands: Vec<CommandDesc>,
}

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
        data: Vec<u8>,
        /// Run it once stored, recorded as this execution.
        run: Option<ExecutionId>,
        /// Timeout for the run.
        timeout_ms: Option<u32>,
        /// The outcome.
        reply: oneshot::Sender<Result<PushOutcome, VmError>>,
    },
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
    status: Arc<Mutex<VmStatus>>,
}

impl VmHandle {
    /// Queues a request and wakes the driver.
    pub fn request(&self, req: Request) -> Result<(), VmError> {
        self.tx.send(req).map_err(|_| VmError::ShuttingDown)?;
        let _ = ivshmem::signal_eventfd(self.wake.as_raw_fd());
        Ok(())
    }

    /// The VM's state now.
    pub fn status(&self) -> VmStatus {
        self.status
            .lock()
            .map(|s| s.clone())
            .unwrap_or_else(|p| p.into_inner().clone())
    }
}

/// Starts the driver thread of a VM.
pub fn spawn(
    settings: VmSettings,
    channel: ChannelKind,
    records: Arc<Records>,
    events: broadcast::Sender<VmEvent>,
) -> std::io::Result<(VmHandle, std::thread::JoinHandle<()>)> {
    let (tx, rx) = mpsc::channel();
    let wake = Arc::new(ivshmem::eventfd()?);
    let status = Arc::new(Mutex::new(VmStatus {
        name: settings.name.clone(),
        state: VmState::WaitingForAgent,
        agent_generation: None,
        agent_software: None,
        config_revision: None,
        heartbeat_age_ms: None,
        agent_restarts: 0,
        running: 0,
    }));
    let handle = VmHandle {
        tx,
        wake: wake.clone(),
        status: status.clone(),
    };
    let thread = std::thread::Builder::new()
        .name(format!("vm-{}", settings.name))
        .spawn(move || {
            let mut driver = Driver::new(settings, channel, records, events, rx, wake, status);
            driver.run();
        })?;
    Ok((handle, thread))
}

/// A request sent to the agent and not answered yet.
enum Pending {
    Exec {
        id: ExecutionId,
        reply: Option<oneshot::Sender<Result<(), VmError>>>,
    },
    Ping {
        sent: Instant,
        reply: oneshot::Sender<Result<Duration, VmError>>,
    },
    Metrics {
        reply: oneshot::Sender<Result<Metrics, VmError>>,
    },
    Cancel {
        reply: Option<oneshot::Sender<Result<(), VmError>>>,
    },
    Push {
        run: Option<ExecutionId>,
        reply: oneshot::Sender<Result<PushOutcome, VmError>>,
    },
}

impl Pending {
    fn fail(self, err: VmError, records: &Records, events: &broadcast::Sender<VmEvent>) {
        match self {
            Self::Exec { id, reply } => {
                let state = if err == VmError::Undeliverable {
                    ExecState::Undeliverable
                } else {
                    ExecState::AgentLost
                };
                end_unrun(records, events, id, state, err.to_string());
                if let Some(r) = reply {
                    let _ = r.send(Err(err));
                }
            }
            Self::Ping { reply, .. } => drop(reply.send(Err(err))),
            Self::Metrics { reply } => drop(reply.send(Err(err))),
            Self::Cancel { reply } => {
                if let Some(r) = reply {
                    let _ = r.send(Err(err));
                }
            }
            Self::Push { run, reply } => {
                if let Some(id) = run {
                    end_unrun(records, events, id, ExecState::AgentLost, err.to_string());
                }
                let _ = reply.send(Err(err));
            }
        }
    }
}

fn now_ms() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| u64::try_from(d.as_millis()).unwrap_or(u64::MAX))
}

fn finish_record(
    records: &Records,
    events: &broadcast::Sender<VmEvent>,
    id: ExecutionId,
    state: ExecState,
    exit_code: Option<i32>,
    signal: Option<i32>,
    detail: Option<String>,
) {
    let end = Finish {
        state,
        exit_code,
        signal,
        finished_at_ms: now_ms(),
        duration_ms: None,
        detail,
    };
    if let Ok(true) = records.finish(id, &end) {
        let _ = events.send(VmEvent::Finished(id));
    }
}

/// Ends the record of an execution that never ran to an exit (refused, lost, undeliverable),
/// saying why.
fn end_unrun(
    records: &Records,
    events: &broadcast::Sender<VmEvent>,
    id: ExecutionId,
    state: ExecState,
    detail: impl Into<String>,
) {
    finish_record(records, events, id, state, None, None, Some(detail.into()));
}

/// The record state an agent's outcome maps to.
fn state_of(outcome: Outcome) -> (ExecState, Option<i32>, Option<i32>) {
    match outcome {
        Outcome::Exited(0) => (ExecState::Succeeded, Some(0), None),
        Outcome::Exited(c) => (ExecState::Failed, Some(c), None),
        Outcome::Signaled(s) => (ExecState::Failed, None, Some(s)),
        Outcome::TimedOut => (ExecState::TimedOut, None, None),
        Outcome::Cancelled => (ExecState::Cancelled, None, None),
        Outcome::FailedToStart(_) => (ExecState::FailedToStart, None, None),
    }
}

fn describe(info: &ring_protocol::message::CommandInfo<'_>) -> CommandDesc {
    let params = info
        .params
        .iter()
        .map(|p| match p.kind {
            ParamKind::Integer { min, max } => ParamDesc::Integer {
                name: p.name.to_owned(),
                min,
                max,
            },
            ParamKind::OneOf { choices } => ParamDesc::Choice {
                name: p.name.to_owned(),
                choices: choices.split('|').map(str::to_owned).collect(),
            },
            ParamKind::Text {
                class,
                min_len,
                max_len,
            } => ParamDesc::String {
                name: p.name.to_owned(),
                charset: class.to_owned(),
                min_len,
                max_len,
            },
        })
        .collect();
    CommandDesc {
        name: info.name.to_owned(),
        description: info.description.to_owned(),
        params,
        timeout_ms: info.timeout_ms,
        max_output: info.max_output,
    }
}

/// Largest piece of a pushed program per frame.
const PUSH_CHUNK: usize = 4096;
/// Commands listed per page.
const LIST_PAGE: u16 = 64;
/// How often the host bumps its heartbeat and checks the agent's.
const TICK: Duration = Duration::from_millis(500);
/// Polling interval of a plain channel whose agent has been idle for a second.
const IDLE_POLL: Duration = Duration::from_millis(10);
/// Polling interval of a plain channel with no agent attached.
const IDLE_POLL_NO_AGENT: Duration = Duration::from_millis(50);

struct Driver {
    settings: VmSettings,
    channel: ChannelKind,
    peer: Option<u16>,
    ep: Option<HostEndpoint>,
    records: Arc<Records>,
    events: broadcast::Sender<VmEvent>,
    rx: mpsc::Receiver<Request>,
    wake: Arc<OwnedFd>,
    status: Arc<Mutex<VmStatus>>,
    /// Requests waiting for a ready agent, with their delivery deadline.
    queue: VecDeque<(Request, Instant)>,
    /// Messages encoded and waiting for room in the ring (in order).
    outbox: VecDeque<Vec<u8>>,
    pending: HashMap<u64, Pending>,
    running: HashMap<AgentExecId, ExecutionId>,
    next_request: u64,
    generation: Option<u32>,
    state: VmState,
    last_beat: (u32, Instant),
    commands: Option<(Instant, u32, Vec<CommandDesc>)>,
    listing: Option<(u64, Vec<CommandDesc>)>,
    waiting_for_list: Vec<oneshot::Sender<Result<CommandList, VmError>>>,
    reset_started: Option<Instant>,
    config_revision: u32,
    restarts: u32,
    host_generation: u32,
}

impl Driver {
    fn new(
        settings: VmSettings,
        channel: ChannelKind,
        records: Arc<Records>,
        events: broadcast::Sender<VmEvent>,
        rx: mpsc::Receiver<Request>,
        wake: Arc<OwnedFd>,
        status: Arc<Mutex<VmStatus>>,
    ) -> Self {
        // Execution record ids double as request ids; others count down from the top so
        // that the two never meet.
        Self {
            settings,
            channel,
            peer: None,
            ep: None,
            records,
            events,
            rx,
            wake,
            status,
            queue: VecDeque::new(),
            outbox: VecDeque::new(),
            pending: HashMap::new(),
            running: HashMap::new(),
            next_request: u64::MAX,
            generation: None,
            state: VmState::WaitingForAgent,
            last_beat: (0, Instant::now()),
            commands: None,
            listing: None,
            waiting_for_list: Vec::new(),
            reset_started: None,
            config_revision: 0,
            restarts: 0,
            host_generation: u32::try_from(now_ms() & 0xffff_ffff).unwrap_or(1).max(1),
        }
    }

    fn mem(&self) -> &dyn SharedMemory {
        self.channel.region()
    }

    fn request_id(&mut self) -> u64 {
        self.next_request -= 1;
        self.next_request
    }

    fn publish_status(&self) {
        if let Ok(mut s) = self.status.lock() {
            let changed = s.state != self.state;
            s.state = self.state;
            s.agent_generation = self.generation;
            s.config_revision = self.generation.map(|_| self.config_revision);
            s.heartbeat_age_ms = self
                .generation
                .map(|_| u64::try_from(self.last_beat.1.elapsed().as_millis()).unwrap_or(u64::MAX));
            s.agent_restarts = self.restarts;
            s.running = self.running.len();
            if changed {
                let _ = self.events.send(VmEvent::State(self.settings.name.clone()));
            }
        }
    }

    fn run(&mut self) {
        // Open (or take over) the region.
        let opened = HostEndpoint::open(self.mem(), self.host_generation);
        match opened {
            Ok(ep) => self.ep = Some(ep),
            Err(e) => {
                eprintln!("portless: vm {}: region unusable: {e}", self.settings.name);
                return;
            }
        }
        self.reconcile_records();
        let _ = self.send(&HostToAgent::Hello(self.hello(false)));
        let mut sleep = Duration::from_micros(50);
        let mut next_tick = Instant::now();
        let mut last_work = Instant::now();
        loop {
            let mut worked = self.take_requests();
            if worked.is_none() {
                break; // the daemon dropped every handle: stop
            }
            worked = worked.map(|w| w | self.pump());
            let now = Instant::now();
            if now >= next_tick {
                self.tick(now);
                next_tick = now + TICK;
            }
            self.ring_guest();
            self.publish_status();
            if worked == Some(true) {
                sleep = Duration::from_micros(50);
                last_work = Instant::now();
                continue;
            }
            self.sleep(sleep.min(next_tick.saturating_duration_since(Instant::now())));
            sleep = (sleep * 2).min(self.poll_cap(last_work.elapsed()));
        }
        // Shutting down: answer what is waiting; executions in the guest keep running and
        // are found again by the next daemon.
        for (req, _) in std::mem::take(&mut self.queue) {
            reject(req, VmError::ShuttingDown);
        }
    }

    /// Sleeps until a request, a doorbell, QEMU connecting, or `timeout` (a plain channel
    /// cannot be rung, so the timeout is its polling interval; a doorbell channel sleeps to
    /// the next tick).
    fn sleep(&mut self, timeout: Duration) {
        let mut fds = [libc::pollfd {
            fd: self.wake.as_raw_fd(),
            events: libc::POLLIN,
            revents: 0,
        }; 3];
        let mut n = 1;
        let mut timeout = timeout;
        if let ChannelKind::Doorbell(server) = &self.channel {
            if let Some(fd) = server.host_event(0) {
                fds[n].fd = fd;
                n += 1;
            }
            fds[n].fd = server.listener_fd();
            n += 1;
            // Arm the doorbell; only then may we sleep past the polling interval.
            if let Some(ep) = self.ep.as_mut() {
                let mem = self.channel.region();
                let needed =
                    (!self.outbox.is_empty()).then_some(ring_protocol::MAX_FRAME_LEN as u32);
                // Armed: a guest whose QEMU is connected rings when there is something to
                // do, and a QEMU that connects wakes us. A guest attached with no QEMU
                // connected (this daemon restarted under a running VM) cannot ring: poll it.
                let unreachable = self.peer.is_none() && ep.guest_attached(mem);
                match ep.prepare_wait(mem, needed) {
                    Ok(true) if !unreachable => {
                        timeout = timeout.max(TICK.min(self.until_deadline()))
                    }
                    Ok(true) => {}
                    _ => timeout = Duration::ZERO,
                }
            }
        }
        poll_fds(&mut fds[..n], timeout);
        ivshmem::take_eventfd(self.wake.as_raw_fd());
        if let ChannelKind::Doorbell(server) = &mut self.channel {
            if let Some(fd) = server.host_event(0) {
                ivshmem::take_eventfd(fd);
            }
            if fds
                .get(n - 1)
                .is_some_and(|f| f.revents & libc::POLLIN != 0)
            {
                match server.try_accept() {
                    Ok(Some(peer)) => self.peer = Some(peer),
                    Ok(None) => {}
                    Err(e) => eprintln!("portless: vm {}: ivshmem client: {e}", self.settings.name),
                }
            }
            if let Some(ep) = self.ep.as_mut() {
                ep.end_wait(server.region());
            }
        }
    }

    /// The longest a plain channel's driver sleeps between polls: `poll_max` while the agent
    /// is busy, longer once it has been idle a while, longer still with no agent attached (a
    /// request from the API wakes the driver at once in any case).
    fn poll_cap(&self, idle: Duration) -> Duration {
        let attached = self
            .ep
            .as_ref()
            .is_some_and(|ep| ep.guest_attached(self.mem()));
        if !attached {
            IDLE_POLL_NO_AGENT
        } else if idle > Duration::from_secs(1)
            && self.pending.is_empty()
            && self.running.is_empty()
        {
            IDLE_POLL.max(self.settings.poll_max)
        } else {
            self.settings.poll_max
        }
    }

    /// Time to the earliest delivery deadline of a queued request.
    fn until_deadline(&self) -> Duration {
        self.queue
            .iter()
            .map(|(_, d)| d.saturating_duration_since(Instant::now()))
            .min()
            .unwrap_or(TICK)
    }

    fn ring_guest(&mut self) {
        let Some(ep) = self.ep.as_mut() else { return };
        let mem = self.channel.region();
        if ep.take_kick(mem)
            && let (ChannelKind::Doorbell(server), Some(peer)) = (&self.channel, self.peer)
        {
            let _ = server.ring(peer, 0);
        }
    }

    fn hello(&self, reply: bool) -> Hello<'static> {
        Hello {
            min_version: MIN_PROTOCOL_VERSION,
            max_version: PROTOCOL_VERSION,
            capabilities: if matches!(self.channel, ChannelKind::Doorbell(_)) {
                Capabilities::INTERRUPTS
            } else {
                Capabilities::default()
            },
            generation: self.host_generation,
            config_revision: 0,
            software: concat!("portless/", env!("CARGO_PKG_VERSION")),
            reply,
        }
    }

    /// Sends a message, or queues it (in order) when the ring is full or being reset.
    fn send(&mut self, msg: &HostToAgent<'_>) -> Result<(), VmError> {
        // Nothing waiting: encode straight into the ring (no copy, no allocation).
        if self.outbox.is_empty()
            && let Some(ep) = self.ep.as_mut()
        {
            match ep.send(self.channel.region(), msg) {
                Ok(()) => return Ok(()),
                Err(SendError::Full { .. } | SendError::Detached) => {}
                Err(e) => return Err(VmError::Invalid(e.to_string())),
            }
        }
        // Keep it, in order, until there is room.
        let mut buf = vec![0u8; ring_protocol::MAX_PAYLOAD_LEN];
        let len = ring_protocol::message::encode(msg, &mut buf)
            .map_err(|e| VmError::Invalid(e.to_string()))?
            .len();
        buf.truncate(len);
        self.outbox.push_back(buf);
        self.flush();
        Ok(())
    }

    fn flush(&mut self) -> bool {
        let mut sent = false;
        let Some(ep) = self.ep.as_mut() else {
            return false;
        };
        let mem = self.channel.region();
        while let Some(frame) = self.outbox.front() {
            match ep.send_frame(mem, frame) {
                Ok(()) => {
                    self.outbox.pop_front();
                    sent = true;
                }
                Err(SendError::Full { .. } | SendError::Detached) => break,
                Err(_) => {
                    // Cannot be sent ever (it was encoded within the limit): drop it.
                    self.outbox.pop_front();
                }
            }
        }
        sent
    }

    /// Takes API requests; `None` when every handle is gone.
    fn take_requests(&mut self) -> Option<bool> {
        let mut worked = false;
        loop {
            match self.rx.try_recv() {
                Ok(req) => {
                    worked = true;
                    let deadline = Instant::now() + self.settings.delivery_timeout;
                    self.queue.push_back((req, deadline));
                }
                Err(mpsc::TryRecvError::Empty) => break,
                Err(mpsc::TryRecvError::Disconnected) => return None,
            }
        }
        if self.state == VmState::Ready {
            while let Some((req, _)) = self.queue.pop_front() {
                self.dispatch(req);
            }
        } else {
            // Not ready: give up on what has waited past its delivery deadline. A listing
            // can be answered from the cache meanwhile.
            let now = Instant::now();
            let mut keep = VecDeque::new();
            for (req, deadline) in std::mem::take(&mut self.queue) {
                match req {
                    Request::Commands { reply } if self.commands.is_some() => {
                        let _ = reply.send(Ok(self.command_list()));
                    }
                    req if now >= deadline => self.undeliverable(req),
                    req => keep.push_back((req, deadline)),
                }
            }
            self.queue = keep;
        }
        Some(worked)
    }

    fn undeliverable(&mut self, req: Request) {
        match req {
            Request::Exec { id, reply, .. } => {
                Pending::Exec {
                    id,
                    reply: Some(reply),
                }
                .fail(VmError::Undeliverable, &self.records, &self.events);
            }
            Request::Push { run, reply, .. } => {
                Pending::Push { run, reply }.fail(
                    VmError::Undeliverable,
                    &self.records,
                    &self.events,
                );
            }
            other => reject(other, VmError::Undeliverable),
        }
    }

    fn command_list(&self) -> CommandList {
        match &self.commands {
            Some((at, revision, list)) => CommandList {
                age_ms: u64::try_from(at.elapsed().as_millis()).unwrap_or(u64::MAX),
                config_revision: *revision,
                commands: list.clone(),
            },
            None => CommandList {
                age_ms: 0,
                config_revision: 0,
                commands: Vec::new(),
            },
        }
    }

    fn dispatch(&mut self, req: Request) {
        match req {
            Request::Exec {
                id,
                command,
                args,
                timeout_ms,
                reply,
            } => {
                let mut args_ref = ring_protocol::message::Args::new();
                if args.iter().any(|a| args_ref.push(a.as_str()).is_err()) {
                    let err = VmError::Invalid(format!(
                        "at most {} arguments",
                        ring_protocol::message::MAX_ARGS
                    ));
                    end_unrun(
                        &self.records,
                        &self.events,
                        id,
                        ExecState::Rejected,
                        err.to_string(),
                    );
                    let _ = reply.send(Err(err));
                    return;
                }
                let msg = HostToAgent::Exec(ExecRequest {
                    request_id: id.0,
                    command: &command,
                    args: args_ref,
                    timeout_ms,
                });
                match self.send(&msg) {
                    Ok(()) => {
                        self.pending.insert(
                            id.0,
                            Pending::Exec {
                                id,
                                reply: Some(reply),
                            },
                        );
                    }
                    Err(e) => {
                        end_unrun(
                            &self.records,
                            &self.events,
                            id,
                            ExecState::Rejected,
                            e.to_string(),
                        );
                        let _ = reply.send(Err(e));
                    }
                }
            }
            Request::Cancel { id, reply } => {
                let Some(agent_id) = self
                    .running
                    .iter()
                    .find(|(_, v)| **v == id)
                    .map(|(k, _)| *k)
                else {
                    let _ = reply.send(Err(VmError::Invalid(format!(
                        "execution {id} is not running"
                    ))));
                    return;
                };
                let request_id = self.request_id();
                match self.send(&HostToAgent::Cancel {
                    request_id,
                    execution: agent_id,
                }) {
                    Ok(()) => {
                        // Success shows as the execution's exit; only a rejection answers.
                        let _ = reply.send(Ok(()));
                        self.pending
                            .insert(request_id, Pending::Cancel { reply: None });
                    }
                    Err(e) => drop(reply.send(Err(e))),
                }
            }
            Request::Ping { reply } => {
                let nonce = self.request_id();
                match self.send(&HostToAgent::Ping { nonce }) {
                    Ok(()) => {
                        self.pending.insert(
                            nonce,
                            Pending::Ping {
                                sent: Instant::now(),
                                reply,
                            },
                        );
                    }
                    Err(e) => drop(reply.send(Err(e))),
                }
            }
            Request::Metrics { reply } => {
                let request_id = self.request_id();
                match self.send(&HostToAgent::Metrics { request_id }) {
                    Ok(()) => {
                        self.pending.insert(request_id, Pending::Metrics { reply });
                    }
                    Err(e) => drop(reply.send(Err(e))),
                }
            }
            Request::Commands { reply } => {
                if self.commands.is_some() {
                    let _ = reply.send(Ok(self.command_list()));
                } else {
                    self.waiting_for_list.push(reply);
                    self.list_commands();
                }
            }
            Request::Push {
                name,
                data,
                run,
                timeout_ms,
                reply,
            } => {
                use sha2::Digest;
                let push_id = self.request_id();
                let sha256: [u8; 32] = sha2::Sha256::digest(&data).into();
                let begin = HostToAgent::PushBegin {
                    push_id,
                    name: &name,
                    size: data.len() as u64,
                    sha256,
                };
                let mut result = self.send(&begin);
                for (k, chunk) in data.chunks(PUSH_CHUNK).enumerate() {
                    if result.is_err() {
                        break;
                    }
                    let offset = (k * PUSH_CHUNK) as u64;
                    result = self.send(&HostToAgent::PushChunk {
                        push_id,
                        offset,
                        data: chunk,
                    });
                }
                if result.is_ok() {
                    result = self.send(&HostToAgent::PushCommit {
                        push_id,
                        run: run.is_some(),
                        timeout_ms,
                    });
                }
                match result {
                    Ok(()) => {
                        self.pending.insert(push_id, Pending::Push { run, reply });
                    }
                    Err(e) => {
                        if let Some(id) = run {
                            end_unrun(
                                &self.records,
                                &self.events,
                                id,
                                ExecState::Rejected,
                                e.to_string(),
                            );
                        }
                        let _ = reply.send(Err(e));
                    }
                }
            }
        }
    }

    fn list_commands(&mut self) {
        if self.listing.is_some() {
            return;
        }
        let request_id = self.request_id();
        if self
            .send(&HostToAgent::ListCommands {
                request_id,
                start: 0,
                limit: LIST_PAGE,
            })
            .is_ok()
        {
            self.listing = Some((request_id, Vec::new()));
        }
    }

    /// Receives and handles everything the agent sent; handles channel errors.
    fn pump(&mut self) -> bool {
        let mut worked = self.flush();
        let mut buf = frame_buf();
        loop {
            let Some(ep) = self.ep.as_mut() else {
                return worked;
            };
            let mem = self.channel.region();
            match ep.recv(mem, &mut buf) {
                Ok(Some(msg)) => {
                    worked = true;
                    let owned = OwnedMsg::from(&msg);
                    self.handle(owned);
                }
                Ok(None) => break,
                Err(RecvError::Undecodable(_)) => {
                    worked = true;
                    eprintln!(
                        "portless: vm {}: undecodable frame from the agent",
                        self.settings.name
                    );
                }
                Err(RecvError::Channel(ChannelError::Detached)) => break,
                Err(e) => {
                    eprintln!(
                        "portless: vm {}: channel corrupt ({e}); resetting",
                        self.settings.name
                    );
                    self.begin_reset();
                    break;
                }
            }
        }
        worked | self.flush()
    }

    fn begin_reset(&mut self) {
        if let Some(ep) = self.ep.as_mut() {
            let mem = self.channel.region();
            ep.begin_reset(mem);
            self.reset_started = Some(Instant::now());
        }
        // Whatever was in the rings is gone: so is everything in flight.
        self.outbox.clear();
        self.lose_agent(VmError::AgentLost);
        self.state = VmState::WaitingForAgent;
    }

    /// The agent restarted, vanished or the channel was reset: nothing in flight will be
    /// answered.
    fn lose_agent(&mut self, err: VmError) {
        for (_, pending) in std::mem::take(&mut self.pending) {
            pending.fail(err.clone(), &self.records, &self.events);
        }
        for (_, id) in std::mem::take(&mut self.running) {
            end_unrun(
                &self.records,
                &self.events,
                id,
                ExecState::AgentLost,
                err.to_string(),
            );
        }
        self.listing = None;
    }

    fn tick(&mut self, now: Instant) {
        let Some(ep) = self.ep.as_mut() else { return };
        let mem = self.channel.region();
        ep.beat(mem);
        if ep.is_resetting() {
            let force = self
                .reset_started
                .is_some_and(|t| now.duration_since(t) >= self.settings.reset_timeout);
            if ep.try_finish_reset(mem, force) {
                self.reset_started = None;
                let _ = self.send(&HostToAgent::Hello(self.hello(false)));
            }
            return;
        }
        if ep.reset_requested(mem) {
            eprintln!(
                "portless: vm {}: the agent asked for a channel reset",
                self.settings.name
            );
            self.begin_reset();
            return;
        }
        let beat = ep.peer_heartbeat(mem);
        if beat != self.last_beat.0 {
            self.last_beat = (beat, now);
            if self.state == VmState::Unresponsive {
                self.state = VmState::Ready;
            }
        } else if self.generation.is_some() {
            let quiet = now.duration_since(self.last_beat.1);
            if quiet >= self.settings.heartbeat_timeout && self.state == VmState::Ready {
                self.state = VmState::Unresponsive;
            }
            if quiet >= self.settings.lost_after
                && !(self.pending.is_empty() && self.running.is_empty())
            {
                self.lose_agent(VmError::AgentLost);
            }
        }
        if let Some((at, _, _)) = &self.commands
            && at.elapsed() >= self.settings.command_refresh
            && self.state == VmState::Ready
        {
            self.list_commands();
        }
    }

    /// After a daemon restart: executions recorded as running in this VM are still in the
    /// guest (if the agent did not restart): map them again so that their output and exit
    /// are recorded; the agent's hello settles the rest.
    fn reconcile_records(&mut self) {
        if let Ok(list) = self.records.unfinished(&self.settings.name) {
            for rec in list {
                if let (Some(generation), Some(counter)) = (rec.agent_generation, rec.agent_counter)
                {
                    self.running.insert(
                        AgentExecId {
                            generation,
                            counter,
                        },
                        rec.id,
                    );
                } else {
                    // Sent but never accepted: the answer may still be in the ring.
                    self.pending.insert(
                        rec.id.0,
                        Pending::Exec {
                            id: rec.id,
                            reply: None,
                        },
                    );
                }
            }
        }
    }

    fn on_hello(&mut self, generation: u32, software: String, config_revision: u32, reply: bool) {
        if !reply {
            let _ = self.send(&HostToAgent::Hello(self.hello(true)));
        }
        if self.generation.is_some_and(|g| g != generation) {
            self.restarts += 1;
        }
        if self.generation != Some(generation) {
            // Executions of another generation cannot finish any more.
            let lost: Vec<_> = self
                .running
                .iter()
                .filter(|(k, _)| k.generation != generation)
                .map(|(k, v)| (*k, *v))
                .collect();
            for (k, id) in lost {
                self.running.remove(&k);
                end_unrun(
                    &self.records,
                    &self.events,
                    id,
                    ExecState::AgentLost,
                    "the agent restarted",
                );
            }
            // Requests sent before the restart were dropped by the new agent.
            let stale: Vec<u64> = self.pending.keys().copied().collect();
            for k in stale {
                if let Some(p) = self.pending.remove(&k) {
                    p.fail(VmError::AgentLost, &self.records, &self.events);
                }
            }
            self.commands = None;
        }
        self.generation = Some(generation);
        self.config_revision = config_revision;
        if let Ok(mut s) = self.status.lock() {
            s.agent_software = Some(software);
        }
        self.state = VmState::Ready;
        self.last_beat.1 = Instant::now();
        if self.commands.is_none()
            || self
                .commands
                .as_ref()
                .is_some_and(|c| c.1 != config_revision)
        {
            self.list_commands();
        }
    }

    fn handle(&mut self, msg: OwnedMsg) {
        match msg {
            OwnedMsg::Hello {
                generation,
                software,
                config_revision,
                reply,
            } => {
                self.on_hello(generation, software, config_revision, reply);
            }
            OwnedMsg::Pong { nonce } => {
                if let Some(Pending::Ping { sent, reply }) = self.pending.remove(&nonce) {
                    let _ = reply.send(Ok(sent.elapsed()));
                }
            }
            OwnedMsg::Command { request_id, info } => {
                if let Some((rid, list)) = self.listing.as_mut()
                    && *rid == request_id
                {
                    list.push(info);
                }
            }
            OwnedMsg::CommandsEnd { request_id, next } => {
                let Some((rid, _)) = &self.listing else {
                    return;
                };
                if *rid != request_id {
                    return;
                }
                if let Some(start) = next {
                    let request_id = self.request_id();
                    if let Some((_, list)) = self.listing.take() {
                        self.listing = Some((request_id, list));
                    }
                    let _ = self.send(&HostToAgent::ListCommands {
                        request_id,
                        start,
                        limit: LIST_PAGE,
                    });
                    return;
                }
                if let Some((_, list)) = self.listing.take() {
                    self.commands = Some((Instant::now(), self.config_revision, list));
                    let answer = self.command_list();
                    for w in self.waiting_for_list.drain(..) {
                        let _ = w.send(Ok(answer.clone()));
                    }
                }
            }
            OwnedMsg::Accepted {
                request_id,
                execution,
            } => match self.pending.remove(&request_id) {
                Some(Pending::Exec { id, reply }) => {
                    let _ = self.records.mark_accepted(
                        id,
                        execution.generation,
                        execution.counter,
                        now_ms(),
                    );
                    self.running.insert(execution, id);
                    if let Some(r) = reply {
                        let _ = r.send(Ok(()));
                    }
                }
                Some(other) => drop(self.pending.insert(request_id, other)),
                None => {}
            },
            OwnedMsg::Rejected { request_id, reason } => match self.pending.remove(&request_id) {
                Some(Pending::Exec { id, reply }) => {
                    end_unrun(
                        &self.records,
                        &self.events,
                        id,
                        ExecState::Rejected,
                        rejection_text(&reason),
                    );
                    if let Some(r) = reply {
                        let _ = r.send(Err(VmError::Rejected(reason)));
                    }
                }
                Some(Pending::Cancel { reply: Some(r) }) => {
                    let _ = r.send(Err(VmError::Rejected(reason)));
                }
                Some(Pending::Cancel { reply: None }) => {}
                Some(Pending::Metrics { reply }) => {
                    drop(reply.send(Err(VmError::Rejected(reason))))
                }
                Some(other) => drop(self.pending.insert(request_id, other)),
                None => {}
            },
            OwnedMsg::Output {
                execution,
                stream,
                offset,
                data,
            } => {
                if let Some(id) = self.running.get(&execution).copied() {
                    let s = match stream {
                        Stream::Stdout => OutputStream::Stdout,
                        Stream::Stderr => OutputStream::Stderr,
                    };
                    if let Err(e) = self.records.append_output(id, s, offset, &data) {
                        eprintln!("portless: vm {}: output of {id}: {e}", self.settings.name);
                    }
                    let _ = self.events.send(VmEvent::Output(id));
                }
            }
            OwnedMsg::Exit {
                execution,
                finished,
            } => {
                if let Some(id) = self.running.remove(&execution) {
                    record_exit(&self.records, &self.events, id, &finished);
                }
            }
            OwnedMsg::PushResult { push_id, outcome } => {
                if let Some(Pending::Push { run, reply }) = self.pending.remove(&push_id) {
                    match (outcome, run) {
                        (PushOutcome::Started(agent_id), Some(id)) => {
                            let _ = self.records.mark_accepted(
                                id,
                                agent_id.generation,
                                agent_id.counter,
                                now_ms(),
                            );
                            self.running.insert(agent_id, id);
                        }
                        (PushOutcome::Failed(reason), Some(id)) => {
                            end_unrun(
                                &self.records,
                                &self.events,
                                id,
                                ExecState::Rejected,
                                rejection_text(&reason),
                            );
                        }
                        _ => {}
                    }
                    let _ = reply.send(Ok(outcome));
                }
            }
            OwnedMsg::Metrics {
                request_id,
                metrics,
            } => {
                if let Some(Pending::Metrics { reply }) = self.pending.remove(&request_id) {
                    let _ = reply.send(Ok(metrics));
                }
            }
            OwnedMsg::CommandsChanged { config_revision } => {
                self.config_revision = config_revision;
                self.commands = None;
                self.list_commands();
            }
            OwnedMsg::Error(detail) => {
                eprintln!(
                    "portless: vm {}: agent reports: {detail}",
                    self.settings.name
                );
            }
            OwnedMsg::Status => {}
        }
    }
}

fn record_exit(
    records: &Records,
    events: &broadcast::Sender<VmEvent>,
    id: ExecutionId,
    f: &Finished,
) {
    let (state, exit_code, signal) = state_of(f.outcome);
    let detail = match f.outcome {
        Outcome::FailedToStart(errno) => Some(format!(
            "failed to start: {}",
            std::io::Error::from_raw_os_error(errno)
        )),
        _ => None,
    };
    let end = Finish {
        state,
        exit_code,
        signal,
        finished_at_ms: now_ms(),
        duration_ms: Some(f.duration_ms),
        detail,
    };
    if let Ok(true) = records.finish(id, &end) {
        let _ = events.send(VmEvent::Finished(id));
    }
}

fn reject(req: Request, err: VmError) {
    match req {
        Request::Exec { reply, .. } | Request::Cancel { reply, .. } => drop(reply.send(Err(err))),
        Request::Ping { reply } => drop(reply.send(Err(err))),
        Request::Metrics { reply } => drop(reply.send(Err(err))),
        Request::Commands { reply } => drop(reply.send(Err(err))),
        Request::Push { reply, .. } => drop(reply.send(Err(err))),
    }
}

fn poll_fds(fds: &mut [libc::pollfd], timeout: Duration) {
    let ms = i32::try_from(timeout.as_millis()).unwrap_or(i32::MAX);
    // Sub-millisecond waits: `poll` would round them to 0 and spin.
    if timeout < Duration::from_millis(1) && !timeout.is_zero() {
        std::thread::sleep(timeout);
        return;
    }
    crate::ivshmem::poll(fds, ms);
}

/// An agent message copied out of the frame buffer, so that handling it may send.
enum OwnedMsg {
    Hello {
        generation: u32,
        software: String,
        config_revision: u32,
        reply: bool,
    },
    Pong {
        nonce: u64,
    },
    Command {
        request_id: u64,
        info: CommandDesc,
    },
    CommandsEnd {
        request_id: u64,
        next: Option<u16>,
    },
    Accepted {
        request_id: u64,
        execution: AgentExecId,
    },
    Rejected {
        request_id: u64,
        reason: Rejection,
    },
    Output {
        execution: AgentExecId,
        stream: Stream,
        offset: u64,
        data: Vec<u8>,
    },
    Exit {
        execution: AgentExecId,
        finished: Finished,
    },
    Status,
    PushResult {
        push_id: u64,
        outcome: PushOutcome,
    },
    Metrics {
        request_id: u64,
        metrics: Metrics,
    },
    CommandsChanged {
        config_revision: u32,
    },
    Error(String),
}

impl OwnedMsg {
    fn from(msg: &AgentToHost<'_>) -> Self {
        match msg {
            AgentToHost::Hello(h) => Self::Hello {
                generation: h.generation,
                software: h.software.to_owned(),
                config_revision: h.config_revision,
                reply: h.reply,
            },
            AgentToHost::Pong { nonce } => Self::Pong { nonce: *nonce },
            AgentToHost::Command {
                request_id, info, ..
            } => Self::Command {
                request_id: *request_id,
                info: describe(info),
            },
            AgentToHost::CommandsEnd {
                request_id, next, ..
            } => Self::CommandsEnd {
                request_id: *request_id,
                next: *next,
            },
            AgentToHost::Accepted {
                request_id,
                execution,
            } => Self::Accepted {
                request_id: *request_id,
                execution: *execution,
            },
            AgentToHost::Rejected { request_id, reason } => Self::Rejected {
                request_id: *request_id,
                reason: *reason,
            },
            AgentToHost::Output {
                execution,
                stream,
                offset,
                data,
            } => Self::Output {
                execution: *execution,
                stream: *stream,
                offset: *offset,
                data: data.to_vec(),
            },
            AgentToHost::Exit {
                execution,
                finished,
            } => Self::Exit {
                execution: *execution,
                finished: *finished,
            },
            AgentToHost::Status { .. } => Self::Status,
            AgentToHost::PushResult { push_id, outcome } => Self::PushResult {
                push_id: *push_id,
                outcome: *outcome,
            },
            AgentToHost::Metrics {
                request_id,
                metrics,
            } => Self::Metrics {
                request_id: *request_id,
                metrics: *metrics,
            },
            AgentToHost::CommandsChanged { config_revision } => Self::CommandsChanged {
                config_revision: *config_revision,
            },
            AgentToHost::Error(e) => Self::Error(e.detail.to_owned()),
        }
    }
}

/// The raw descriptor of the driver's wake-up eventfd (for tests).
pub fn wake_fd(handle: &VmHandle) -> RawFd {
    handle.wake.as_raw_fd()
}
