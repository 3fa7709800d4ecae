//! The agent's state machine: requests in, processes started and watched, output and
//! results out. It is driven by [`Agent::poll`], which the caller invokes with the time, the
//! channel and the platform whenever something may have happened (a doorbell, a readable
//! pipe, a child exit, a deadline); it never reads a clock or calls the OS itself.
//!
//! Flow control: output is read from a process's pipe only when the outgoing ring has room
//! for the resulting frame, so a slow host makes the pipe fill and the process block in
//! `write`; nothing is dropped. Likewise a request is taken from the ring only when its
//! reply fits.
//!
//! Capacities, all fixed: [`MAX_RUNNING`] executions at once (the
//! config's `max_running` may lower it), [`MAX_FINISHED`] finished ones remembered for status
//! queries, one program push at a time, and no output buffered per execution beyond the
//! kernel's pipe: output moves from the pipe to the ring through one shared
//! [`OUTPUT_CHUNK`]-byte buffer. The allow-list's own limits are in [`crate::config`].

use heapless::{Deque, String, Vec};
use ring_protocol::frame::frame_len;
use ring_protocol::message::{
    AgentCounters, AgentToHost, Capabilities, ErrorCode, ExecRequest, ExecState, ExecutionId,
    Finished, Hello, HostToAgent, MIN_PROTOCOL_VERSION, Metrics, Outcome, PROTOCOL_VERSION,
    ProtocolError, PushOutcome, Rejection, Stream,
};
use ring_protocol::{ChannelError, GuestEndpoint, RecvError, SendError, SharedMemory};
use sha2::{Digest, Sha256};

use crate::config::{Config, MAX_RUNNING};
use crate::platform::{ExitStatus, LogEvent, Platform, ReadOutcome, Signal, SpawnRequest};

/// Finished executions remembered for status queries (the oldest is forgotten first).
pub const MAX_FINISHED: usize = 64;
/// Largest piece of output sent in one frame.
pub const OUTPUT_CHUNK: usize = 4096;
/// Free space kept in the outgoing ring before a request is taken: every reply but a
/// command listing fits in it.
pub const REPLY_RESERVE: u32 = 1024;
/// How long to keep reading the pipes of a process that has exited while something it left
/// behind still holds them open. Output held back by a full ring is still read in full: the
/// grace only ends the wait for an empty pipe to close.
pub const DRAIN_GRACE_MS: u64 = 2000;
/// Longest an execution waits, once it has ended, for the processes it left behind to die
/// after they were killed (a process in uninterruptible sleep dies only when it wakes). The
/// execution then ends anyway, its leftovers counted.
pub const LEFTOVER_WAIT_MS: u64 = 5000;
/// How often the processes left behind are checked for while they die.
const LEFTOVER_POLL_MS: u64 = 10;
/// Longest pushed program name.
pub const MAX_PUSH_NAME: usize = 64;
/// Most messages handled in one poll, so that output keeps flowing under a request flood.
const MAX_REQUESTS_PER_POLL: usize = 32;

/// The software string in the agent's hello.
pub const SOFTWARE: &str = concat!("portless-agent/", env!("CARGO_PKG_VERSION"));

/// What one [`Agent::poll`] did and what it waits for.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct Activity {
    /// Something happened: poll again soon rather than sleeping long.
    pub worked: bool,
    /// The agent has output or a reply waiting for this much free space in the ring.
    pub tx_needed: Option<u32>,
    /// The earliest time (ms) at which a timer (timeout, kill grace, drain) fires.
    pub next_deadline: Option<u64>,
    /// Executions running.
    pub running: usize,
}

impl Activity {
    fn wake_at(&mut self, at: u64) {
        self.next_deadline = Some(self.next_deadline.map_or(at, |d| d.min(at)));
    }
    fn need(&mut self, bytes: u32) {
        self.tx_needed = Some(self.tx_needed.map_or(bytes, |n| n.min(bytes)));
    }
}

#[derive(Debug, Clone, Copy, Default)]
struct StreamState {
    /// Bytes read from the pipe.
    produced: u64,
    /// Pipe closed.
    closed: bool,
}

#[derive(Debug, Clone, Copy)]
struct Stop {
    reason: Outcome,
    signalled_at: u64,
    killed: bool,
}

struct Execution<P> {
    id: ExecutionId,
    process: Option<P>,
    started_at: u64,
    deadline: Option<u64>,
    kill_grace_ms: u64,
    max_output: u64,
    streams: [StreamState; 2],
    exit: Option<(ExitStatus, u64)>,
    stop: Option<Stop>,
    truncated: bool,
    /// Once the end is reached: how many processes were left behind, and when they were
    /// killed.
    leftovers: Option<(u32, u64)>,
}

impl<P> Execution<P> {
    fn state(&self, now: u64) -> ExecState {
        ExecState::Running {
            elapsed_ms: now.saturating_sub(self.started_at),
            stdout_bytes: self.streams[0].produced,
            stderr_bytes: self.streams[1].produced,
        }
    }

    /// Output is complete: both pipes closed, or the process exited long enough ago that
    /// whatever still holds them open is not ours to wait for.
    fn drained(&self, now: u64) -> bool {
        match self.exit {
            None => false,
            Some((_, at)) => {
                (self.streams[0].closed && self.streams[1].closed)
                    || now >= at.saturating_add(DRAIN_GRACE_MS)
            }
        }
    }

    fn finished(&self, now: u64) -> Finished {
        let outcome = match (self.stop, self.exit) {
            (Some(stop), _) => stop.reason,
            (None, Some((ExitStatus::Exited(code), _))) => Outcome::Exited(code),
            (None, Some((ExitStatus::Signaled(sig), _))) => Outcome::Signaled(sig),
            (None, None) => Outcome::Signaled(9),
        };
        let end = self.exit.map_or(now, |(_, at)| at);
        Finished {
            outcome,
            duration_ms: end.saturating_sub(self.started_at),
            stdout_bytes: self.streams[0].produced,
            stderr_bytes: self.streams[1].produced,
            truncated: self.truncated,
        }
    }
}

struct Push {
    id: u64,
    name: String<MAX_PUSH_NAME>,
    size: u64,
    received: u64,
    expected: [u8; 32],
    hasher: Sha256,
    /// Already answered with a failure: later chunks are dropped, the commit says BadPush.
    failed: bool,
    /// The configuration revision it began under.
    config_revision: u32,
}

struct Listing {
    request_id: u64,
    next: u16,
    end: u16,
}

/// The agent: configuration, executions, pushes, counters. One per guest.
pub struct Agent<P: Platform> {
    config: Config,
    config_revision: u32,
    generation: u32,
    next_counter: u32,
    running: Vec<Execution<P::Process>, MAX_RUNNING>,
    finished: Deque<(ExecutionId, Finished), MAX_FINISHED>,
    push: Option<Push>,
    listing: Option<Listing>,
    incompatible: bool,
    interrupts: bool,
    /// The capabilities of the host's latest Hello on this attachment.
    host_capabilities: Capabilities,
    counters: AgentCounters,
    chunk: [u8; OUTPUT_CHUNK],
}

/// Whether `name` is a safe file name for a pushed program: no path, no hidden file.
fn valid_push_name(name: &str) -> bool {
    !name.is_empty()
        && name.len() <= MAX_PUSH_NAME
        && !name.starts_with('.')
        && name
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || matches!(b, b'.' | b'_' | b'-'))
}

impl<P: Platform> Agent<P> {
    /// An agent with `config`, whose execution ids carry `generation` (make it differ across
    /// agent restarts: the platform persists or randomises it).
    pub fn new(config: Config, generation: u32) -> Self {
        Self {
            config,
            config_revision: 1,
            generation,
            next_counter: 1,
            running: Vec::new(),
            finished: Deque::new(),
            push: None,
            listing: None,
            incompatible: false,
            interrupts: false,
            host_capabilities: Capabilities(0),
            counters: AgentCounters::default(),
            chunk: [0; OUTPUT_CHUNK],
        }
    }

    /// The generation in this agent's execution ids.
    pub fn generation(&self) -> u32 {
        self.generation
    }

    /// The processes still running (or whose output is still being drained), for the
    /// caller's wait loop.
    pub fn processes(&self) -> impl Iterator<Item = &P::Process> {
        self.running.iter().filter_map(|e| e.process.as_ref())
    }

    /// Kills every process the agent started and forgets them (the agent is stopping).
    pub fn shutdown(&mut self, platform: &mut P) {
        while let Some(mut e) = self.running.pop() {
            if let Some(mut p) = e.process.take() {
                platform.signal(&mut p, Signal::Kill);
                platform.release(p);
            }
        }
        if self.push.take().is_some_and(|p| !p.failed) {
            let _ = platform.push_finish(false);
        }
    }

    /// The configuration in force.
    pub fn config(&self) -> &Config {
        &self.config
    }

    /// The agent's counters.
    pub fn counters(&self) -> AgentCounters {
        let mut c = self.counters;
        c.running = u32::try_from(self.running.len()).unwrap_or(u32::MAX);
        c
    }

    /// Notes a channel reset (for the counters).
    pub fn note_reset(&mut self) {
        self.counters.resets = self.counters.resets.wrapping_add(1);
    }

    /// Puts a new configuration in force (the old one is left in `config`). Running
    /// executions carry on under the rules they started with; a program push in progress
    /// fails at its commit (`Failed`), as its file is staged under the old rules. Call
    /// [`announce_config`](Self::announce_config) to tell the host.
    pub fn swap_config(&mut self, config: &mut Config) {
        core::mem::swap(&mut self.config, config);
        self.config_revision = self.config_revision.wrapping_add(1);
    }

    /// The revision of the configuration in force (1 at start, +1 per reload).
    pub fn config_revision(&self) -> u32 {
        self.config_revision
    }

    /// Says whether the platform wakes the agent by interrupt (announced in the hello as
    /// [`Capabilities::INTERRUPTS`]; a host may then stop expecting it to poll).
    pub fn set_interrupts(&mut self, interrupts: bool) {
        self.interrupts = interrupts;
    }

    fn capabilities(&self) -> Capabilities {
        let mut caps = Capabilities::METRICS.union(Capabilities::CANCEL);
        if self.interrupts {
            caps = caps.union(Capabilities::INTERRUPTS);
        }
        if self.config.push_settings().enabled {
            caps.union(Capabilities::PUSH)
        } else {
            caps
        }
    }

    fn hello(&self, reply: bool) -> AgentToHost<'static> {
        AgentToHost::Hello(Hello {
            min_version: MIN_PROTOCOL_VERSION,
            max_version: PROTOCOL_VERSION,
            capabilities: self.capabilities(),
            generation: self.generation,
            config_revision: self.config_revision,
            software: SOFTWARE,
            reply,
        })
    }

    /// Greets the host after (re)attaching. A listing in progress is abandoned (the host
    /// asks again).
    pub fn on_attach<M: SharedMemory + ?Sized>(
        &mut self,
        ep: &mut GuestEndpoint,
        mem: &M,
    ) -> Result<(), SendError> {
        self.listing = None;
        self.host_capabilities = Capabilities(0);
        let hello = self.hello(false);
        self.send(ep, mem, &hello)
    }

    /// Tells the host that the allow-list changed.
    pub fn announce_config<M: SharedMemory + ?Sized>(
        &mut self,
        ep: &mut GuestEndpoint,
        mem: &M,
    ) -> Result<(), SendError> {
        let msg = AgentToHost::CommandsChanged {
            config_revision: self.config_revision,
        };
        self.send(ep, mem, &msg)
    }

    fn send<M: SharedMemory + ?Sized>(
        &mut self,
        ep: &mut GuestEndpoint,
        mem: &M,
        msg: &AgentToHost<'_>,
    ) -> Result<(), SendError> {
        ep.send(mem, msg)?;
        self.counters.frames_out = self.counters.frames_out.wrapping_add(1);
        Ok(())
    }

    /// Does everything that can be done now: answers requests, moves output, reaps
    /// processes, enforces timeouts. Returns what it did and what it waits for; the caller
    /// then rings the host if `ep.take_kick` says so, and sleeps until a doorbell, a pipe, a
    /// child or `next_deadline`. A channel error means the channel must be reset; the
    /// executions carry on and their results are sent after the next attach.
    ///
    /// Requests are copied out of the ring into a frame-sized buffer on the stack, cleared
    /// whenever one has come in; [`poll_with_buffer`](Self::poll_with_buffer) reuses one the
    /// caller keeps instead.
    pub fn poll<M: SharedMemory + ?Sized>(
        &mut self,
        now: u64,
        ep: &mut GuestEndpoint,
        mem: &M,
        platform: &mut P,
    ) -> Result<Activity, ChannelError> {
        // Most polls find no request: do not clear a frame-sized buffer for them. One that
        // comes in just after this look is found by the caller's next look at the ring.
        if self.listing.is_none() && ep.has_incoming(mem) {
            let mut buf = ring_protocol::frame_buf();
            self.poll_inner(now, ep, mem, platform, Some(&mut buf))
        } else {
            self.poll_inner(now, ep, mem, platform, None)
        }
    }

    /// [`poll`](Self::poll), copying requests into `buf` (a [`ring_protocol::frame_buf`]
    /// kept across calls), so that no call clears 8 KiB of stack: in an emulated guest that
    /// costs more than handling a small request.
    pub fn poll_with_buffer<M: SharedMemory + ?Sized>(
        &mut self,
        now: u64,
        ep: &mut GuestEndpoint,
        mem: &M,
        platform: &mut P,
        buf: &mut ring_protocol::FrameBuf,
    ) -> Result<Activity, ChannelError> {
        self.poll_inner(now, ep, mem, platform, Some(buf))
    }

    fn poll_inner<M: SharedMemory + ?Sized>(
        &mut self,
        now: u64,
        ep: &mut GuestEndpoint,
        mem: &M,
        platform: &mut P,
        buf: Option<&mut ring_protocol::FrameBuf>,
    ) -> Result<Activity, ChannelError> {
        let mut act = Activity::default();
        self.continue_listing(ep, mem, &mut act)?;
        if let Some(buf) = buf {
            self.take_requests(now, ep, mem, platform, &mut act, buf)?;
        }
        self.service_executions(now, ep, mem, platform, &mut act)?;
        act.running = self.running.len();
        Ok(act)
    }

    fn take_requests<M: SharedMemory + ?Sized>(
        &mut self,
        now: u64,
        ep: &mut GuestEndpoint,
        mem: &M,
        platform: &mut P,
        act: &mut Activity,
        buf: &mut ring_protocol::FrameBuf,
    ) -> Result<(), ChannelError> {
        for _ in 0..MAX_REQUESTS_PER_POLL {
            if self.listing.is_some() {
                return Ok(());
            }
            if ep.tx_free(mem)? < REPLY_RESERVE {
                if ep.has_incoming(mem) {
                    act.need(REPLY_RESERVE);
                }
                return Ok(());
            }
            let msg = match ep.recv(mem, buf) {
                Ok(Some(msg)) => msg,
                Ok(None) => return Ok(()),
                Err(RecvError::Channel(e)) => return Err(e),
                Err(_) => {
                    act.worked = true;
                    self.counters.frames_in = self.counters.frames_in.wrapping_add(1);
                    platform.log(&LogEvent::Protocol("undecodable frame from the host"));
                    let err = ProtocolError {
                        code: ErrorCode::Undecodable,
                        detail: "frame is not a valid message",
                    };
                    self.reply(ep, mem, &AgentToHost::Error(err))?;
                    continue;
                }
            };
            act.worked = true;
            self.counters.frames_in = self.counters.frames_in.wrapping_add(1);
            self.handle(now, msg, ep, mem, platform)?;
        }
        act.worked = true;
        Ok(())
    }

    /// Sends a reply that was made room for ([`REPLY_RESERVE`]); a reply that does not fit
    /// even so is a bug in the size budget, reported to the host as an internal error.
    fn reply<M: SharedMemory + ?Sized>(
        &mut self,
        ep: &mut GuestEndpoint,
        mem: &M,
        msg: &AgentToHost<'_>,
    ) -> Result<(), ChannelError> {
        let Err(e) = self.send(ep, mem, msg) else {
            return Ok(());
        };
        if let Some(fault) = channel_fault(e) {
            return Err(fault);
        }
        let err = ProtocolError {
            code: ErrorCode::Internal,
            detail: "reply too large",
        };
        match self
            .send(ep, mem, &AgentToHost::Error(err))
            .map_err(channel_fault)
        {
            Err(Some(fault)) => Err(fault),
            _ => Ok(()),
        }
    }

    fn reject<M: SharedMemory + ?Sized>(
        &mut self,
        request_id: u64,
        reason: Rejection,
        what: &str,
        ep: &mut GuestEndpoint,
        mem: &M,
        platform: &mut P,
    ) -> Result<(), ChannelError> {
        self.counters.rejections = self.counters.rejections.wrapping_add(1);
        platform.log(&LogEvent::Rejected { what, reason });
        self.reply(ep, mem, &AgentToHost::Rejected { request_id, reason })
    }

    fn handle<M: SharedMemory + ?Sized>(
        &mut self,
        now: u64,
        msg: HostToAgent<'_>,
        ep: &mut GuestEndpoint,
        mem: &M,
        platform: &mut P,
    ) -> Result<(), ChannelError> {
        match msg {
            HostToAgent::Hello(h) => {
                let ours = Hello {
                    min_version: MIN_PROTOCOL_VERSION,
                    max_version: PROTOCOL_VERSION,
                    capabilities: Capabilities::default(),
                    generation: 0,
                    config_revision: 0,
                    software: "",
                    reply: false,
                };
                self.incompatible = ours.negotiate(&h).is_none();
                self.host_capabilities = h.capabilities;
                // Every hello that is not itself a reply gets one (PROTOCOL.md 5.6), so that
                // the host learns our version range even when there is no overlap.
                if !h.reply {
                    let hello = self.hello(true);
                    self.reply(ep, mem, &hello)?;
                }
                if self.incompatible {
                    let err = ProtocolError {
                        code: ErrorCode::UnsupportedVersion,
                        detail: "no protocol version in common",
                    };
                    return self.reply(ep, mem, &AgentToHost::Error(err));
                }
                Ok(())
            }
            HostToAgent::Error(e) => {
                platform.log(&LogEvent::Protocol(e.detail));
                Ok(())
            }
            _ if self.incompatible => {
                let err = ProtocolError {
                    code: ErrorCode::UnsupportedVersion,
                    detail: "no protocol version in common",
                };
                self.reply(ep, mem, &AgentToHost::Error(err))
            }
            HostToAgent::Ping { nonce } => self.reply(ep, mem, &AgentToHost::Pong { nonce }),
            HostToAgent::ListCommands {
                request_id,
                start,
                limit,
            } => {
                let total = u16::try_from(self.config.commands().len()).unwrap_or(u16::MAX);
                let end = start.saturating_add(limit).min(total);
                self.listing = Some(Listing {
                    request_id,
                    next: start.min(end),
                    end,
                });
                Ok(())
            }
            HostToAgent::Exec(req) => self.exec(now, &req, ep, mem, platform),
            HostToAgent::Status {
                request_id,
                execution,
            } => {
                let state = self.state_of(now, execution);
                if state == ExecState::Unknown {
                    return self.reject(
                        request_id,
                        Rejection::UnknownExecution,
                        "status",
                        ep,
                        mem,
                        platform,
                    );
                }
                self.reply(
                    ep,
                    mem,
                    &AgentToHost::Status {
                        request_id,
                        execution,
                        state,
                    },
                )
            }
            HostToAgent::Cancel {
                request_id,
                execution,
            } => {
                if let Some(e) = self.running.iter_mut().find(|e| e.id == execution) {
                    if e.stop.is_none() && e.exit.is_none() {
                        if let Some(p) = e.process.as_mut() {
                            platform.signal(p, Signal::Terminate);
                        }
                        e.stop = Some(Stop {
                            reason: Outcome::Cancelled,
                            signalled_at: now,
                            killed: false,
                        });
                    }
                    return Ok(());
                }
                if self.finished.iter().any(|(id, _)| *id == execution) {
                    return Ok(());
                }
                self.reject(
                    request_id,
                    Rejection::UnknownExecution,
                    "cancel",
                    ep,
                    mem,
                    platform,
                )
            }
            HostToAgent::PushBegin {
                push_id,
                name,
                size,
                sha256,
            } => self.push_begin(push_id, name, size, sha256, ep, mem, platform),
            HostToAgent::PushChunk {
                push_id,
                offset,
                data,
            } => self.push_chunk(push_id, offset, data, ep, mem, platform),
            HostToAgent::PushCommit {
                push_id,
                run,
                timeout_ms,
            } => self.push_commit(now, push_id, run, timeout_ms, ep, mem, platform),
            HostToAgent::Metrics { request_id } => {
                let sys = platform.metrics();
                let metrics = Metrics {
                    uptime_ms: sys.uptime_ms,
                    load_milli: sys.load_milli,
                    mem_total_kib: sys.mem_total_kib,
                    mem_available_kib: sys.mem_available_kib,
                    processes: sys.processes,
                    agent_rss_kib: sys.agent_rss_kib,
                    agent: self.counters(),
                };
                self.reply(
                    ep,
                    mem,
                    &AgentToHost::Metrics {
                        request_id,
                        metrics,
                    },
                )
            }
        }
    }

    fn state_of(&self, now: u64, id: ExecutionId) -> ExecState {
        if let Some(e) = self.running.iter().find(|e| e.id == id) {
            return e.state(now);
        }
        self.finished
            .iter()
            .find(|(fid, _)| *fid == id)
            .map_or(ExecState::Unknown, |(_, f)| ExecState::Finished(*f))
    }

    fn new_id(&mut self) -> ExecutionId {
        let id = ExecutionId {
            generation: self.generation,
            counter: self.next_counter,
        };
        self.next_counter = self.next_counter.wrapping_add(1).max(1);
        id
    }

    fn exec<M: SharedMemory + ?Sized>(
        &mut self,
        now: u64,
        req: &ExecRequest<'_>,
        ep: &mut GuestEndpoint,
        mem: &M,
        platform: &mut P,
    ) -> Result<(), ChannelError> {
        let rid = req.request_id;
        let settings = self.config.agent_settings();
        let busy = self.running.len() >= usize::from(settings.max_running).min(MAX_RUNNING);
        let started = match self.config.command(req.command) {
            None => Err(Rejection::UnknownCommand),
            Some(cmd) => match cmd.check_args(&req.args) {
                Err(reason) => Err(reason),
                Ok(()) if busy => Err(Rejection::Busy),
                Ok(()) => spawn_command(&cmd, req, platform),
            },
        };
        let (spawned, timeout, max_output) = match started {
            Ok(s) => s,
            Err(reason) => return self.reject(rid, reason, req.command, ep, mem, platform),
        };
        let id = self.new_id();
        let grace = u64::from(settings.kill_grace_ms);
        self.start(
            now,
            id,
            req.command,
            spawned,
            timeout,
            max_output,
            grace,
            platform,
        );
        self.reply(
            ep,
            mem,
            &AgentToHost::Accepted {
                request_id: rid,
                execution: id,
            },
        )
    }

    /// Records a spawn attempt as an execution (a failed one finishes at once).
    #[allow(clippy::too_many_arguments)]
    fn start(
        &mut self,
        now: u64,
        id: ExecutionId,
        command: &str,
        spawned: Result<P::Process, crate::platform::Errno>,
        timeout: Option<u32>,
        max_output: u64,
        kill_grace_ms: u64,
        platform: &mut P,
    ) {
        self.counters.executions = self.counters.executions.wrapping_add(1);
        platform.log(&LogEvent::Started {
            execution: id,
            command,
        });
        let (process, exit, stop) = match spawned {
            Ok(p) => (Some(p), None, None),
            Err(errno) => (
                None,
                Some((ExitStatus::Exited(-1), now)),
                Some(Stop {
                    reason: Outcome::FailedToStart(errno),
                    signalled_at: now,
                    killed: true,
                }),
            ),
        };
        let closed = process.is_none();
        let exec = Execution {
            id,
            process,
            started_at: now,
            deadline: timeout.map(|t| now.saturating_add(u64::from(t))),
            kill_grace_ms,
            max_output,
            streams: [StreamState {
                produced: 0,
                closed,
            }; 2],
            exit,
            stop,
            truncated: false,
            leftovers: None,
        };
        // `exec` checked for room; a push run is checked in `push_commit`.
        if let Err(mut lost) = self.running.push(exec)
            && let Some(mut p) = lost.process.take()
        {
            platform.signal(&mut p, Signal::Kill);
            platform.release(p);
        }
    }

    fn continue_listing<M: SharedMemory + ?Sized>(
        &mut self,
        ep: &mut GuestEndpoint,
        mem: &M,
        act: &mut Activity,
    ) -> Result<(), ChannelError> {
        let Some(listing) = self.listing.as_mut() else {
            return Ok(());
        };
        let total = u16::try_from(self.config.commands().len()).unwrap_or(u16::MAX);
        while listing.next < listing.end {
            let Some(cmd) = self.config.commands().get(usize::from(listing.next)) else {
                break;
            };
            let msg = AgentToHost::Command {
                request_id: listing.request_id,
                index: listing.next,
                info: cmd.info(),
            };
            match ep.send(mem, &msg) {
                Ok(()) => {
                    self.counters.frames_out = self.counters.frames_out.wrapping_add(1);
                    listing.next += 1;
                    act.worked = true;
                }
                Err(SendError::Full { needed }) => {
                    act.need(needed);
                    return Ok(());
                }
                // A command too large to list: skip it rather than stall the listing.
                Err(e) => match channel_fault(e) {
                    Some(fault) => return Err(fault),
                    None => listing.next += 1,
                },
            }
        }
        let next = (listing.end < total).then_some(listing.end);
        let msg = AgentToHost::CommandsEnd {
            request_id: listing.request_id,
            total,
            next,
        };
        match ep.send(mem, &msg) {
            Ok(()) => {
                self.counters.frames_out = self.counters.frames_out.wrapping_add(1);
                self.listing = None;
                act.worked = true;
                Ok(())
            }
            Err(SendError::Full { needed }) => {
                act.need(needed);
                Ok(())
            }
            Err(e) => Err(channel_fault(e).unwrap_or(ChannelError::Detached)),
        }
    }

    fn service_executions<M: SharedMemory + ?Sized>(
        &mut self,
        now: u64,
        ep: &mut GuestEndpoint,
        mem: &M,
        platform: &mut P,
        act: &mut Activity,
    ) -> Result<(), ChannelError> {
        let output_frame = u32::try_from(frame_len(OUTPUT_CHUNK + 64)).unwrap_or(u32::MAX);
        let mut i = 0;
        while let Some(exec) = self.running.get_mut(i) {
            // A pipe not read to the end for lack of room in the ring.
            let mut held_back = false;
            // Output first, so that it precedes the exit.
            for (k, stream) in [Stream::Stdout, Stream::Stderr].into_iter().enumerate() {
                while let Some(process) = exec.process.as_mut() {
                    let Some(st) = exec.streams.get_mut(k) else {
                        break;
                    };
                    if st.closed {
                        break;
                    }
                    if ep.tx_free(mem)? < output_frame {
                        act.need(output_frame);
                        held_back = true;
                        break;
                    }
                    match platform.read_output(process, stream, &mut self.chunk) {
                        ReadOutcome::WouldBlock => break,
                        ReadOutcome::Closed => {
                            st.closed = true;
                            act.worked = true;
                            break;
                        }
                        ReadOutcome::Data(n) => {
                            act.worked = true;
                            let offset = st.produced;
                            st.produced = st.produced.saturating_add(n as u64);
                            let keep = exec.max_output.saturating_sub(offset).min(n as u64);
                            if keep < n as u64 {
                                exec.truncated = true;
                            }
                            let Some(data) = self.chunk.get(..keep as usize) else {
                                break;
                            };
                            if data.is_empty() {
                                continue;
                            }
                            let msg = AgentToHost::Output {
                                execution: exec.id,
                                stream,
                                offset,
                                data,
                            };
                            // Room was checked above and we are the only producer, so any
                            // failure is the channel's.
                            if let Err(e) = ep.send(mem, &msg) {
                                return Err(channel_fault(e).unwrap_or(ChannelError::Detached));
                            }
                            self.counters.frames_out = self.counters.frames_out.wrapping_add(1);
                            self.counters.output_bytes =
                                self.counters.output_bytes.wrapping_add(keep);
                        }
                    }
                }
            }
            // Reap.
            if exec.exit.is_none()
                && let Some(p) = exec.process.as_mut()
                && let Some(status) = platform.try_wait(p)
            {
                exec.exit = Some((status, now));
                act.worked = true;
            }
            // Timers.
            if exec.exit.is_none() {
                if let Some(stop) = exec.stop.as_mut() {
                    let kill_at = stop.signalled_at.saturating_add(exec.kill_grace_ms);
                    if !stop.killed && now >= kill_at {
                        if let Some(p) = exec.process.as_mut() {
                            platform.signal(p, Signal::Kill);
                        }
                        stop.killed = true;
                        act.worked = true;
                    } else if !stop.killed {
                        act.wake_at(kill_at);
                    }
                } else if let Some(deadline) = exec.deadline {
                    if now >= deadline {
                        if let Some(p) = exec.process.as_mut() {
                            platform.signal(p, Signal::Terminate);
                        }
                        exec.stop = Some(Stop {
                            reason: Outcome::TimedOut,
                            signalled_at: now,
                            killed: false,
                        });
                        act.wake_at(now.saturating_add(exec.kill_grace_ms));
                        act.worked = true;
                    } else {
                        act.wake_at(deadline);
                    }
                }
            } else if !exec.drained(now)
                && let Some((_, at)) = exec.exit
            {
                act.wake_at(at.saturating_add(DRAIN_GRACE_MS));
            }
            // Finish. The drain grace gives up on a pipe that stays open but empty, never on
            // output still waiting in a pipe because the host has not made room for it: that
            // would drop it, untold, however soon the host reads.
            if exec.drained(now) && !held_back {
                // Nothing it started outlives it: what is left is killed, and the end waits
                // (a bounded time) until it is gone.
                if let Some(p) = exec.process.as_mut() {
                    let (count, since) = *exec
                        .leftovers
                        .get_or_insert_with(|| (platform.kill_leftovers(p), now));
                    if count > 0
                        && !platform.leftovers_gone(p)
                        && now < since.saturating_add(LEFTOVER_WAIT_MS)
                    {
                        act.wake_at(now.saturating_add(LEFTOVER_POLL_MS));
                        i += 1;
                        continue;
                    }
                }
                let leftovers = exec.leftovers.map_or(0, |(n, _)| n);
                let finished = exec.finished(now);
                let id = exec.id;
                let msg = if self.host_capabilities.contains(Capabilities::ENDED) {
                    AgentToHost::Ended {
                        execution: id,
                        finished,
                        leftovers,
                    }
                } else {
                    AgentToHost::Exit {
                        execution: id,
                        finished,
                    }
                };
                match ep.send(mem, &msg) {
                    Ok(()) => {
                        self.counters.frames_out = self.counters.frames_out.wrapping_add(1);
                    }
                    Err(SendError::Full { needed }) => {
                        act.need(needed);
                        i += 1;
                        continue;
                    }
                    Err(e) => return Err(channel_fault(e).unwrap_or(ChannelError::Detached)),
                }
                act.worked = true;
                let done = self.running.swap_remove(i);
                if let Some(p) = done.process {
                    platform.release(p);
                }
                platform.log(&LogEvent::Finished {
                    execution: id,
                    finished,
                    leftovers,
                });
                if self.finished.is_full() {
                    self.finished.pop_front();
                }
                let _ = self.finished.push_back((id, finished));
                continue;
            }
            i += 1;
        }
        Ok(())
    }

    #[allow(clippy::too_many_arguments)]
    fn push_begin<M: SharedMemory + ?Sized>(
        &mut self,
        push_id: u64,
        name: &str,
        size: u64,
        sha256: [u8; 32],
        ep: &mut GuestEndpoint,
        mem: &M,
        platform: &mut P,
    ) -> Result<(), ChannelError> {
        let settings = self.config.push_settings();
        let refusal = if !settings.enabled {
            Some(Rejection::NotAllowed)
        } else if size > settings.max_bytes {
            Some(Rejection::TooLarge)
        } else if !valid_push_name(name) {
            Some(Rejection::BadPush)
        } else if self.push.as_ref().is_some_and(|p| !p.failed) {
            Some(Rejection::Busy)
        } else {
            None
        };
        if let Some(reason) = refusal {
            return self.push_failed(push_id, reason, "push", ep, mem, platform);
        }
        if let Some(old) = self.push.take()
            && !old.failed
        {
            let _ = platform.push_finish(false);
        }
        if platform.push_create(settings.dir, name).is_err() {
            return self.push_failed(push_id, Rejection::Failed, name, ep, mem, platform);
        }
        let mut stored = String::new();
        let _ = stored.push_str(name);
        self.push = Some(Push {
            id: push_id,
            name: stored,
            size,
            received: 0,
            expected: sha256,
            hasher: Sha256::new(),
            failed: false,
            config_revision: self.config_revision,
        });
        Ok(())
    }

    fn push_failed<M: SharedMemory + ?Sized>(
        &mut self,
        push_id: u64,
        reason: Rejection,
        what: &str,
        ep: &mut GuestEndpoint,
        mem: &M,
        platform: &mut P,
    ) -> Result<(), ChannelError> {
        self.counters.rejections = self.counters.rejections.wrapping_add(1);
        platform.log(&LogEvent::Rejected { what, reason });
        let msg = AgentToHost::PushResult {
            push_id,
            outcome: PushOutcome::Failed(reason),
        };
        self.reply(ep, mem, &msg)
    }

    fn push_chunk<M: SharedMemory + ?Sized>(
        &mut self,
        push_id: u64,
        offset: u64,
        data: &[u8],
        ep: &mut GuestEndpoint,
        mem: &M,
        platform: &mut P,
    ) -> Result<(), ChannelError> {
        let Some(push) = self.push.as_mut().filter(|p| p.id == push_id && !p.failed) else {
            return Ok(());
        };
        let end = offset.saturating_add(data.len() as u64);
        let problem = if offset != push.received {
            Some(Rejection::BadPush)
        } else if end > push.size {
            Some(Rejection::TooLarge)
        } else if platform.push_write(data).is_err() {
            Some(Rejection::Failed)
        } else {
            None
        };
        match problem {
            None => {
                push.hasher.update(data);
                push.received = end;
                Ok(())
            }
            Some(reason) => {
                push.failed = true;
                let _ = platform.push_finish(false);
                self.push_failed(push_id, reason, "push chunk", ep, mem, platform)
            }
        }
    }

    #[allow(clippy::too_many_arguments)]
    fn push_commit<M: SharedMemory + ?Sized>(
        &mut self,
        now: u64,
        push_id: u64,
        run: bool,
        timeout_ms: Option<u32>,
        ep: &mut GuestEndpoint,
        mem: &M,
        platform: &mut P,
    ) -> Result<(), ChannelError> {
        // Take the push only if it is the one named: a commit for another push (one refused
        // as Busy, say) must not end the push in progress.
        let Some(push) = self.push.take_if(|p| p.id == push_id) else {
            return self.push_failed(
                push_id,
                Rejection::BadPush,
                "push commit",
                ep,
                mem,
                platform,
            );
        };
        if push.failed {
            return self.push_failed(
                push_id,
                Rejection::BadPush,
                "push commit",
                ep,
                mem,
                platform,
            );
        }
        if push.config_revision != self.config_revision {
            // Begun under an earlier allow-list: the file is staged in that one's directory,
            // and the new one may not allow pushes at all. Storing it, or running
            // `<new dir>/<name>`, would mix the two; the host pushes again.
            let _ = platform.push_finish(false);
            return self.push_failed(push_id, Rejection::Failed, &push.name, ep, mem, platform);
        }
        if push.received != push.size {
            let _ = platform.push_finish(false);
            return self.push_failed(
                push_id,
                Rejection::BadPush,
                "push commit",
                ep,
                mem,
                platform,
            );
        }
        let digest: [u8; 32] = push.hasher.finalize().into();
        if digest != push.expected {
            let _ = platform.push_finish(false);
            return self.push_failed(
                push_id,
                Rejection::HashMismatch,
                &push.name,
                ep,
                mem,
                platform,
            );
        }
        if platform.push_finish(true).is_err() {
            return self.push_failed(push_id, Rejection::Failed, &push.name, ep, mem, platform);
        }
        platform.log(&LogEvent::Pushed {
            name: &push.name,
            size: push.size,
        });
        if !run {
            let msg = AgentToHost::PushResult {
                push_id,
                outcome: PushOutcome::Stored,
            };
            return self.reply(ep, mem, &msg);
        }
        let settings = self.config.agent_settings();
        if self.running.len() >= usize::from(settings.max_running).min(MAX_RUNNING) {
            return self.push_failed(push_id, Rejection::Busy, &push.name, ep, mem, platform);
        }
        let push_settings = self.config.push_settings();
        let mut path: String<512> = String::new();
        let ok = path.push_str(push_settings.dir).is_ok()
            && path.push('/').is_ok()
            && path.push_str(&push.name).is_ok();
        if !ok {
            return self.push_failed(push_id, Rejection::Failed, &push.name, ep, mem, platform);
        }
        let timeout = match (push_settings.timeout_ms, timeout_ms) {
            (0, t) => t,
            (c, None) => Some(c),
            (c, Some(t)) => Some(c.min(t)),
        };
        let request = SpawnRequest {
            program: &path,
            args: &[],
            env: &["PATH=/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin"],
            cwd: Some(push_settings.dir),
            user: push_settings.user,
            group: push_settings.group,
            limits: crate::platform::Limits::NONE,
        };
        let spawned = platform.spawn(&request);
        let id = self.new_id();
        let max_output = settings.default_max_output;
        let grace = u64::from(settings.kill_grace_ms);
        self.start(
            now, id, &push.name, spawned, timeout, max_output, grace, platform,
        );
        let msg = AgentToHost::PushResult {
            push_id,
            outcome: PushOutcome::Started(id),
        };
        self.reply(ep, mem, &msg)
    }
}

/// What starting a command gave: the process (or the errno), its timeout and output limit.
type Spawned<T> = (Result<T, crate::platform::Errno>, Option<u32>, u64);

/// Starts an allowed, checked command: argv with the parameters substituted, its own
/// environment, user, group and directory. A timeout in the request can only shorten the
/// command's.
fn spawn_command<P: Platform>(
    cmd: &crate::config::CommandSpec<'_>,
    req: &ExecRequest<'_>,
    platform: &mut P,
) -> Result<Spawned<P::Process>, Rejection> {
    let mut argv: Vec<&str, { crate::config::MAX_ARGV }> = Vec::new();
    for a in cmd.substituted_args(&req.args) {
        argv.push(a).map_err(|_| Rejection::Failed)?;
    }
    let mut env: Vec<&str, { crate::config::MAX_ENV }> = Vec::new();
    for kv in cmd.env() {
        env.push(kv).map_err(|_| Rejection::Failed)?;
    }
    // A request's timeout of 0 means "none of its own", as 0 does in the config.
    let timeout = match (cmd.timeout_ms(), req.timeout_ms.filter(|t| *t > 0)) {
        (0, t) => t,
        (c, None) => Some(c),
        (c, Some(t)) => Some(c.min(t)),
    };
    let request = SpawnRequest {
        program: cmd.program(),
        args: &argv,
        env: &env,
        cwd: cmd.cwd(),
        user: cmd.user(),
        group: cmd.group(),
        limits: cmd.limits(),
    };
    Ok((platform.spawn(&request), timeout, cmd.max_output()))
}

/// The channel error behind a failed send, if the channel is at fault; `None` if only this
/// message could not be sent.
fn channel_fault(e: SendError) -> Option<ChannelError> {
    match e {
        SendError::Ring(r) => Some(ChannelError::Ring(r)),
        SendError::Detached => Some(ChannelError::Detached),
        _ => None,
    }
}
