//! The driver of one VM: its loop, the agent's lifecycle (hello, heartbeat, restarts),
//! channel resets, cut-offs for exceeded budgets and the back-off after them, and the
//! reconciliation with the records after a daemon restart.

use std::collections::{HashMap, HashSet, VecDeque};
use std::os::fd::{AsRawFd, OwnedFd};
use std::sync::{Arc, Mutex, mpsc};
use std::time::{Duration, Instant};

use ring_protocol::message::{
    Capabilities, ExecutionId as AgentExecId, Hello, HostToAgent, MIN_PROTOCOL_VERSION,
    PROTOCOL_VERSION,
};
use ring_protocol::{ChannelError, HostEndpoint, RecvError, SharedMemory, frame_buf};
use tokio::sync::{broadcast, oneshot};

use super::batch::{Batches, RowsBudget, Then};
use super::budget::{Backoff, Bucket, Limit, Violations};
use super::message::OwnedMsg;
use super::requests::{Pending, PendingKind, PushJob, PushStream};
use super::{
    ChannelKind, CommandInfo, CommandList, CutOff, Request, VmError, VmEvent, VmInfo, VmSettings,
    VmState,
};
use crate::records::{ExecState, ExecutionFilter, ExecutionId, Finish, Op, Records, Writer};
use crate::vm::ivshmem;

/// How often the host bumps its heartbeat and checks the agent's.
pub(super) const TICK: Duration = Duration::from_millis(500);
/// Polling interval of a plain channel whose agent has been idle for a second.
const IDLE_POLL: Duration = Duration::from_millis(10);
/// Polling interval of a plain channel with no agent attached.
const IDLE_POLL_NO_AGENT: Duration = Duration::from_millis(50);
/// Executions that ended recently, whose late frames (read again after a daemon restart,
/// say) are dropped without counting as violations.
const RECENTLY_ENDED: usize = 256;
/// Pushes whose result came, whose second result (a failed push committed anyway) is
/// expected and dropped.
const RECENT_PUSHES: usize = 16;

/// An execution running in the guest.
pub(super) struct Running {
    /// Its record.
    pub(super) id: ExecutionId,
    /// When to ask the agent about it, if it should have ended by then (its timeout
    /// passed, and a margin).
    pub(super) deadline: Option<Instant>,
    /// Status queries sent past the deadline.
    pub(super) overdue: u8,
}

/// A listing in progress.
pub(super) struct Listing {
    pub(super) request_id: u64,
    pub(super) entries: Vec<CommandInfo>,
    pub(super) bytes: usize,
    pub(super) deadline: Instant,
}

pub(super) struct Driver {
    pub(super) settings: VmSettings,
    pub(super) channel: ChannelKind,
    pub(super) peer: Option<u16>,
    pub(super) ep: Option<HostEndpoint>,
    pub(super) records: Arc<Records>,
    pub(super) events: broadcast::Sender<VmEvent>,
    rx: mpsc::Receiver<Request>,
    wake: Arc<OwnedFd>,
    status: Arc<Mutex<VmInfo>>,
    /// Requests waiting for a ready agent, with their delivery deadline.
    pub(super) queue: VecDeque<(Request, Instant)>,
    /// Messages encoded and waiting for room in the ring (in order), at their length.
    pub(super) outbox: VecDeque<Box<[u8]>>,
    /// Bytes in `outbox`.
    pub(super) outbox_bytes: usize,
    /// Requests sent and not answered, by request id.
    pub(super) pending: HashMap<u64, Pending>,
    /// Executions running in the guest, by the agent's id.
    pub(super) running: HashMap<AgentExecId, Running>,
    /// Executions that ended recently, oldest first.
    pub(super) ended: VecDeque<AgentExecId>,
    pub(super) ended_set: HashSet<AgentExecId>,
    /// Pushes answered recently.
    pub(super) answered_pushes: VecDeque<u64>,
    /// Pushes waiting for their turn, and the one being streamed into the ring.
    pub(super) pushes: VecDeque<PushJob>,
    pub(super) streaming: Option<PushStream>,
    next_request: u64,
    pub(super) generation: Option<u32>,
    /// The epoch in which the agent's current generation said hello.
    pub(super) hello_epoch: Option<u32>,
    pub(super) state: VmState,
    last_beat: (u32, Instant),
    pub(super) commands: Option<(Instant, u32, Vec<CommandInfo>)>,
    pub(super) listing: Option<Listing>,
    pub(super) waiting_for_list: Vec<oneshot::Sender<Result<CommandList, VmError>>>,
    reset_started: Option<Instant>,
    pub(super) config_revision: u32,
    restarts: u32,
    host_generation: u32,
    pub(super) batches: Batches,
    frames: Bucket,
    pub(super) output_bytes: Bucket,
    rows: Bucket,
    pub(super) violations: Violations,
    backoff: Backoff,
    last_cutoff: Option<CutOff>,
    /// The restart barrier: a ping sent after the reconciled requests; once it is
    /// answered, a reconciled execution that got no answer was never delivered.
    pub(super) barrier: Option<u64>,
    /// A batch failed and its failure was logged (until one succeeds).
    batch_failure_logged: bool,
    /// When the agent's last `Error` report was logged.
    pub(super) error_logged: Option<Instant>,
    /// Scratch space to encode a message that must wait in the outbox.
    pub(super) scratch: Box<ring_protocol::FrameBuf>,
    /// The read was paced (a bucket ran dry): when to look again.
    paced_until: Option<Instant>,
    /// When the next heartbeat and health check is due.
    next_tick: Instant,
}

impl Driver {
    pub(super) fn new(
        settings: VmSettings,
        channel: ChannelKind,
        writer: Writer,
        events: broadcast::Sender<VmEvent>,
        rx: mpsc::Receiver<Request>,
        wake: Arc<OwnedFd>,
        status: Arc<Mutex<VmInfo>>,
    ) -> Self {
        let now = Instant::now();
        let b = settings.budget;
        let records = writer.records().clone();
        let batches = Batches::new(
            writer,
            wake.clone(),
            settings.merge_bytes,
            settings.merge_wait,
        );
        // Execution record ids double as request ids; others count down from the top of a
        // range of 2^32 ids of this daemon's generation, so that the two never meet and a
        // reply to a request of an earlier daemon, read again from the ring, does not
        // answer one of this daemon's.
        let host_generation = u32::try_from(crate::records::now_ms() & 0xffff_ffff)
            .unwrap_or(1)
            .max(1);
        Self {
            frames: Bucket::new(u64::from(b.frames_per_s), now),
            output_bytes: Bucket::new(b.output_bytes_per_s, now),
            rows: Bucket::new(u64::from(b.output_rows_per_s), now),
            violations: Violations::new(now),
            backoff: Backoff::new(b.backoff, b.backoff_max),
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
            outbox_bytes: 0,
            pending: HashMap::new(),
            running: HashMap::new(),
            ended: VecDeque::new(),
            ended_set: HashSet::new(),
            answered_pushes: VecDeque::new(),
            pushes: VecDeque::new(),
            streaming: None,
            next_request: (u64::from(host_generation) << 32) | 0xffff_ffff,
            generation: None,
            hello_epoch: None,
            state: VmState::WaitingForAgent,
            last_beat: (0, now),
            commands: None,
            listing: None,
            waiting_for_list: Vec::new(),
            reset_started: None,
            config_revision: 0,
            restarts: 0,
            host_generation,
            batches,
            last_cutoff: None,
            barrier: None,
            batch_failure_logged: false,
            error_logged: None,
            scratch: Box::new(frame_buf()),
            paced_until: None,
            next_tick: now,
        }
    }

    pub(super) fn mem(&self) -> &dyn SharedMemory {
        self.channel.region()
    }

    pub(super) fn request_id(&mut self) -> u64 {
        self.next_request -= 1;
        self.next_request
    }

    /// Whether the channel is attached and the agent has said hello.
    pub(super) fn is_ready(&self) -> bool {
        self.state == VmState::Ready
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
            s.cutoffs = self.backoff.count;
            s.last_cutoff.clone_from(&self.last_cutoff);
            s.violations = self.violations.total;
            if changed {
                let _ = self.events.send(VmEvent::State(self.settings.name.clone()));
            }
        }
    }

    /// Opens (or takes over) the region, greets the agent and reconciles the records.
    /// `false` when the region is unusable.
    pub(super) fn open(&mut self, now: Instant) -> bool {
        match HostEndpoint::open(self.mem(), self.host_generation) {
            Ok(ep) => self.ep = Some(ep),
            Err(e) => {
                eprintln!("portless: vm {}: region unusable: {e}", self.settings.name);
                return false;
            }
        }
        let _ = self.send_to_guest(&HostToAgent::Hello(self.hello(false)));
        self.reconcile_records(now);
        true
    }

    /// One pass: API requests, the writer's answers, the guest's frames (within the pass's
    /// budget), the push being streamed, the outbox, the batch toward the records, the
    /// periodic tick, releases and kicks. Whether anything happened; `None` once every
    /// handle is gone.
    pub(super) fn step(&mut self, now: Instant) -> Option<bool> {
        let mut worked = self.take_requests(now)?;
        worked |= self.take_committed(now);
        worked |= self.pump(now);
        worked |= self.stream_push(now);
        worked |= self.flush();
        worked |= self.submit_batch(now);
        if now >= self.next_tick {
            self.tick(now);
            self.next_tick = now + TICK;
        }
        self.release_idle();
        self.ring_guest();
        self.publish_status();
        Some(worked)
    }

    /// When the driver must look again even if nothing wakes it.
    pub(super) fn next_wake(&self) -> Instant {
        [
            Some(self.next_tick),
            self.batches.next_due(),
            self.paced_until,
            self.next_deadline(),
        ]
        .into_iter()
        .flatten()
        .min()
        .unwrap_or(self.next_tick)
    }

    /// Serves the VM (after [`open`](Self::open)) until every handle is gone.
    pub(super) fn run(&mut self) {
        let mut sleep = Duration::from_micros(50);
        let mut last_work = Instant::now();
        // Until the daemon drops every handle.
        while let Some(worked) = self.step(Instant::now()) {
            if worked {
                sleep = Duration::from_micros(50);
                last_work = Instant::now();
                continue;
            }
            let own = self.next_wake().saturating_duration_since(Instant::now());
            self.sleep(sleep.min(own), own);
            sleep = (sleep * 2).min(self.poll_cap(last_work.elapsed()));
        }
        self.shut_down();
    }

    /// Shutting down: answers what is waiting; executions in the guest keep running and are
    /// found again by the next daemon, and frames not released are read again.
    pub(super) fn shut_down(&mut self) {
        for (req, _) in std::mem::take(&mut self.queue) {
            super::requests::reject(req, VmError::ShuttingDown);
        }
        self.batches.drain(Duration::from_secs(2));
    }

    /// Sleeps until a request, a doorbell, QEMU connecting, or `timeout` (a plain channel
    /// cannot be rung, so the timeout is its polling interval; a doorbell channel sleeps
    /// longer, but never past `own`, the driver's next deadline: a merge wait, a retry, an
    /// answer, the tick).
    fn sleep(&mut self, timeout: Duration, own: Duration) {
        let mut fds = [libc::pollfd {
            fd: self.wake.as_raw_fd(),
            events: libc::POLLIN,
            revents: 0,
        }; 3];
        let mut n = 1;
        let mut timeout = timeout;
        let paced = self.paced_until.is_some();
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
                // A paced guest has frames waiting already: sleep only to the refill.
                // A driver holding frames it has not released is not rung for new data
                // (PROTOCOL.md 3.5): it wakes for its writer's answer, or on its own.
                let unreachable = self.peer.is_none() && ep.guest_attached(mem);
                let holding = ep.unreleased() != 0;
                match ep.prepare_wait(mem, needed) {
                    Ok(true) if !unreachable && !paced && !holding => {
                        timeout = timeout.max(TICK.min(self.until_deadline()).min(own));
                    }
                    Ok(true) => {}
                    _ if paced => {}
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

    pub(super) fn hello(&self, reply: bool) -> Hello<'static> {
        Hello {
            min_version: MIN_PROTOCOL_VERSION,
            max_version: PROTOCOL_VERSION,
            capabilities: if matches!(self.channel, ChannelKind::Doorbell(_)) {
                Capabilities::ENDED.union(Capabilities::INTERRUPTS)
            } else {
                Capabilities::ENDED
            },
            generation: self.host_generation,
            config_revision: 0,
            software: concat!("portless/", env!("CARGO_PKG_VERSION")),
            reply,
        }
    }

    /// Takes API requests; `None` when every handle is gone.
    fn take_requests(&mut self, now: Instant) -> Option<bool> {
        let mut worked = false;
        loop {
            match self.rx.try_recv() {
                Ok(req) => {
                    worked = true;
                    self.accept_request(req, now);
                }
                Err(mpsc::TryRecvError::Empty) => break,
                Err(mpsc::TryRecvError::Disconnected) => return None,
            }
        }
        if self.is_ready() {
            while let Some((req, _)) = self.queue.pop_front() {
                self.dispatch(req, now);
            }
        } else {
            // Not ready: give up on what has waited past its delivery deadline. A listing
            // can be answered from the cache meanwhile.
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

    /// Receives and handles what the agent sent, within the pass's and the buckets'
    /// budgets; handles channel errors. Frames are peeked: they stay in the ring until their
    /// effect is durable ([`release_idle`](Self::release_idle), `take_committed`).
    fn pump(&mut self, now: Instant) -> bool {
        self.paced_until = None;
        let mut worked = false;
        let mut buf = frame_buf();
        let per_pass = self.settings.budget.frames_per_pass;
        for _ in 0..per_pass {
            if self.backoff.waiting(now) {
                break;
            }
            if !self.frames.allows(now) {
                self.paced_until = Some(now + self.frames.wait_for(1.0));
                break;
            }
            if !self.output_bytes.allows(now) {
                self.paced_until = Some(now + self.output_bytes.wait_for(1.0));
                break;
            }
            if self.batches.full() {
                // Output waits for the writer: read no more until it has gone.
                break;
            }
            let Some(ep) = self.ep.as_mut() else {
                return worked;
            };
            let mem = self.channel.region();
            match ep.peek(mem, &mut buf) {
                Ok(Some(msg)) => {
                    worked = true;
                    self.frames.spend(1);
                    let owned = OwnedMsg::from(&msg);
                    self.handle(owned, now);
                }
                Ok(None) => break,
                Err(RecvError::Undecodable(_)) => {
                    worked = true;
                    self.frames.spend(1);
                    self.violation(now, "an undecodable frame");
                }
                Err(RecvError::Channel(ChannelError::Detached)) => break,
                Err(e) => {
                    eprintln!(
                        "portless: vm {}: channel corrupt ({e}); resetting",
                        self.settings.name
                    );
                    self.begin_reset("the channel was corrupt".into());
                    break;
                }
            }
        }
        worked
    }

    /// Releases every frame read when no effect of any is still on its way to the records.
    fn release_idle(&mut self) {
        if !self.batches.idle() {
            return;
        }
        if let Some(ep) = self.ep.as_mut() {
            let upto = ep.read_index();
            ep.release(self.channel.region(), upto);
        }
    }

    /// Sends the building batch to the writer when it is due (and the rows budget allows).
    fn submit_batch(&mut self, now: Instant) -> bool {
        let rows = self.batches.rows_waiting();
        let burst = self.rows_burst();
        // Output goes as it comes while the budget is nearly untouched (a command now and
        // then, read at once); under sustained output it is merged for `merge_wait`, so that
        // the chunks grow with the rate rather than their number.
        let budget = if rows == 0 || self.rows.has((burst - burst / 10).max(rows), now) {
            RowsBudget::Plenty
        } else if self.rows.has(rows.min(burst), now) {
            RowsBudget::Some
        } else {
            RowsBudget::Spent
        };
        let release = self.ep.as_ref().map(|ep| (ep.epoch(), ep.read_index()));
        let sent = self.batches.submit_if_due(now, budget, release);
        if sent {
            self.rows.spend(rows);
        }
        if budget == RowsBudget::Spent {
            let wait = now + self.rows.wait_for(rows.min(burst) as f64);
            self.paced_until = Some(self.paced_until.map_or(wait, |t| t.min(wait)));
        }
        sent
    }

    fn rows_burst(&self) -> u64 {
        u64::from(self.settings.budget.output_rows_per_s)
    }

    /// Acts on a batch the writer committed: releases its frames and follows up its ops.
    fn take_committed(&mut self, now: Instant) -> bool {
        let Some(result) = self.batches.take_committed(now) else {
            return false;
        };
        let committed = match result {
            Ok(c) => c,
            Err(e) => {
                if !self.batch_failure_logged {
                    eprintln!(
                        "portless: vm {}: writing records failed ({e}); its frames stay in the \
                         ring and are written again shortly",
                        self.settings.name
                    );
                    self.batch_failure_logged = true;
                }
                return true;
            }
        };
        self.batch_failure_logged = false;
        if let (Some((epoch, upto)), Some(ep)) = (committed.release, self.ep.as_mut())
            && ep.epoch() == epoch
        {
            ep.release(self.channel.region(), upto);
        }
        for (then, result) in committed.results {
            self.follow_up(then, result, now);
        }
        true
    }

    /// What to do once an op is durable.
    fn follow_up(&mut self, then: Then, result: crate::records::OpResult, now: Instant) {
        use crate::records::{Done, RecordsError};
        match then {
            Then::Nothing => {}
            Then::Output(id) => match result {
                Ok(_) => {
                    let _ = self.events.send(VmEvent::Output(id));
                }
                Err(RecordsError::OutputGap { .. } | RecordsError::OutputOverflow { .. }) => {
                    self.violation(now, "output that skips bytes of its stream");
                }
                Err(_) => {}
            },
            Then::Ended { id, refused } => {
                if let Ok(Done::Finished(true)) = result {
                    let _ = self.events.send(VmEvent::Finished(id));
                }
                if let Some((reply, error)) = refused {
                    let _ = reply.send(Err(error));
                }
            }
            Then::Accepted { id, agent, reply } => match result {
                Err(RecordsError::NotPending { state, .. }) => {
                    // It ended before the agent's acceptance was recorded (it was given up
                    // on): the agent must not go on with it, and nothing more attaches.
                    if self.running.get(&agent).is_some_and(|r| r.id == id) {
                        self.running.remove(&agent);
                    }
                    self.remember_ended(agent);
                    let request_id = self.request_id();
                    let _ = self.send_to_guest(&HostToAgent::Cancel {
                        request_id,
                        execution: agent,
                    });
                    if let Some(r) = reply {
                        let _ = r.send(Err(VmError::Invalid(format!(
                            "execution {id} had already ended ({state}) when the agent \
                             accepted it; it was cancelled in the guest"
                        ))));
                    }
                }
                Err(RecordsError::AgentIdInUse { existing, .. }) => {
                    self.violation(now, "an execution id the agent used before");
                    if self.running.get(&agent).is_some_and(|r| r.id == id) {
                        self.running.remove(&agent);
                    }
                    let detail = format!(
                        "the agent reused execution id {agent}, which execution {existing} had"
                    );
                    self.end_unrun(id, ExecState::AgentLost, detail);
                    if let Some(r) = reply {
                        let _ = r.send(Err(VmError::AgentLost));
                    }
                }
                _ => {
                    if let Some(r) = reply {
                        let _ = r.send(Ok(()));
                    }
                }
            },
            Then::Pushed { reply, outcome } => {
                let _ = reply.send(Ok(outcome));
            }
        }
    }

    /// Ends the record of an execution that never ran to an exit (refused, lost,
    /// undeliverable), saying why.
    pub(super) fn end_unrun(
        &mut self,
        id: ExecutionId,
        state: ExecState,
        detail: impl Into<String>,
    ) {
        let then = Then::Ended { id, refused: None };
        self.end(id, state, None, None, None, Some(detail.into()), then);
    }

    /// Queues an execution's end for the records.
    #[allow(clippy::too_many_arguments)]
    pub(super) fn end(
        &mut self,
        id: ExecutionId,
        state: ExecState,
        exit_code: Option<i32>,
        signal: Option<i32>,
        duration_ms: Option<u64>,
        detail: Option<String>,
        then: Then,
    ) {
        let end = Finish {
            state,
            exit_code,
            signal,
            finished_at_ms: crate::records::now_ms(),
            duration_ms,
            detail,
        };
        self.batches.op(Op::Finish { id, end }, then);
    }

    /// Remembers that an agent execution ended (its late frames are dropped quietly).
    pub(super) fn remember_ended(&mut self, agent: AgentExecId) {
        if self.ended_set.insert(agent) {
            self.ended.push_back(agent);
            if self.ended.len() > RECENTLY_ENDED
                && let Some(old) = self.ended.pop_front()
            {
                self.ended_set.remove(&old);
            }
        }
    }

    /// Remembers that a push was answered (a second answer is expected and dropped).
    pub(super) fn remember_push(&mut self, push_id: u64) {
        self.answered_pushes.push_back(push_id);
        if self.answered_pushes.len() > RECENT_PUSHES {
            self.answered_pushes.pop_front();
        }
    }

    /// Counts a protocol violation, logs the first of an episode, and cuts the guest off
    /// past the budget.
    pub(super) fn violation(&mut self, now: Instant, what: &str) {
        let limit = self.settings.budget.violations_per_min;
        let (first, exceeded) = self.violations.note(now, limit);
        if first {
            eprintln!(
                "portless: vm {}: protocol violation: {what} (more in this episode are \
                 counted, not logged)",
                self.settings.name
            );
        }
        if exceeded {
            self.cut_off(
                Limit::Violations,
                format!("more than {limit} protocol violations in a minute, the last: {what}"),
                now,
            );
        }
    }

    /// Cuts the guest off for exceeding `limit`: resets the channel, ends what was in flight
    /// (`agent_lost`, naming the budget), and backs it off before it is served again.
    pub(super) fn cut_off(&mut self, limit: Limit, detail: String, now: Instant) {
        if self.state == VmState::CutOff {
            return;
        }
        let wait = self.backoff.cut(now);
        let unlogged = self.violations.end_episode();
        eprintln!(
            "portless: vm {}: cut off: budget {} exceeded ({detail}); its executions in flight \
             end agent_lost; served again in {} ms{}",
            self.settings.name,
            limit.key(),
            wait.as_millis(),
            if unlogged > 0 {
                format!(" ({unlogged} more violations were not logged)")
            } else {
                String::new()
            }
        );
        self.last_cutoff = Some(CutOff {
            at_ms: crate::records::now_ms(),
            budget: limit.key().to_owned(),
            detail: detail.clone(),
        });
        self.begin_reset(format!(
            "the guest was cut off: budget {} exceeded ({detail})",
            limit.key()
        ));
        self.state = VmState::CutOff;
    }

    pub(super) fn begin_reset(&mut self, reason: String) {
        if let Some(ep) = self.ep.as_mut() {
            let mem = self.channel.region();
            ep.begin_reset(mem);
            self.reset_started = Some(Instant::now());
        }
        // Whatever was in the rings is gone: so is everything in flight.
        self.outbox.clear();
        self.outbox_bytes = 0;
        self.lose_agent(&reason, VmError::AgentLost);
        self.hello_epoch = None;
        self.state = VmState::WaitingForAgent;
    }

    /// The agent restarted, vanished or the channel was reset: nothing in flight will be
    /// answered.
    pub(super) fn lose_agent(&mut self, reason: &str, err: VmError) {
        for (_, pending) in std::mem::take(&mut self.pending) {
            self.fail_pending(pending.kind, err.clone(), reason);
        }
        for (agent, run) in std::mem::take(&mut self.running) {
            self.remember_ended(agent);
            self.end_unrun(run.id, ExecState::AgentLost, reason);
        }
        if self.listing.take().is_some() {
            for w in self.waiting_for_list.drain(..) {
                let _ = w.send(Err(err.clone()));
            }
        }
        if let Some(p) = self.streaming.take() {
            self.fail_push(p.job, err.clone(), reason);
        }
        // Pushes waiting for their turn were meant for the agent that is gone.
        for job in std::mem::take(&mut self.pushes) {
            self.fail_push(job, err.clone(), reason);
        }
        self.barrier = None;
    }

    fn tick(&mut self, now: Instant) {
        self.expire(now);
        let Some(ep) = self.ep.as_mut() else { return };
        let mem = self.channel.region();
        ep.beat(mem);
        if ep.is_resetting() {
            if self.backoff.waiting(now) {
                return;
            }
            let force = self
                .reset_started
                .is_some_and(|t| now.duration_since(t) >= self.settings.reset_timeout);
            if ep.try_finish_reset(mem, force) {
                self.reset_started = None;
                if self.state == VmState::CutOff {
                    self.state = VmState::WaitingForAgent;
                }
                let _ = self.send_to_guest(&HostToAgent::Hello(self.hello(false)));
            }
            return;
        }
        if ep.reset_requested(mem) {
            eprintln!(
                "portless: vm {}: the agent asked for a channel reset",
                self.settings.name
            );
            self.begin_reset("the agent asked for a channel reset".into());
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
                && !(self.pending.is_empty()
                    && self.running.is_empty()
                    && self.pushes.is_empty()
                    && self.streaming.is_none())
            {
                self.lose_agent(
                    &format!(
                        "the agent's heartbeat stopped for {} s",
                        self.settings.lost_after.as_secs()
                    ),
                    VmError::AgentLost,
                );
            }
        }
        if let Some((at, _, _)) = &self.commands
            && at.elapsed() >= self.settings.command_refresh
            && self.state == VmState::Ready
        {
            self.list_commands(now);
        }
    }

    /// After a daemon restart: executions recorded as running in this VM may still be in
    /// the guest. Map them again (their output and exit are then recorded) and ask the agent
    /// about each; an execution recorded as sent but never accepted gets its answer from the
    /// ring, or, once a ping sent after it is answered, ends `undeliverable` (it never
    /// reached the agent). Recently ended ones are remembered, so that their frames read
    /// again are dropped quietly.
    fn reconcile_records(&mut self, now: Instant) {
        let vm = self.settings.name.clone();
        let answer = self.settings.budget.answer_timeout;
        if let Ok(recent) = self.records.executions(&ExecutionFilter {
            vm: Some(vm.clone()),
            limit: Some(RECENTLY_ENDED),
            ..Default::default()
        }) {
            for rec in recent.iter().rev() {
                if let (true, Some(generation), Some(counter)) = (
                    rec.state.is_final(),
                    rec.agent_generation,
                    rec.agent_counter,
                ) {
                    self.remember_ended(AgentExecId {
                        generation,
                        counter,
                    });
                }
            }
        }
        let Ok(list) = self.records.unfinished(&vm) else {
            return;
        };
        let mut unanswered = false;
        for rec in list {
            if let (Some(generation), Some(counter)) = (rec.agent_generation, rec.agent_counter) {
                let agent = AgentExecId {
                    generation,
                    counter,
                };
                self.running.insert(
                    agent,
                    Running {
                        id: rec.id,
                        deadline: None,
                        overdue: 0,
                    },
                );
                let request_id = self.request_id();
                if self
                    .send_to_guest(&HostToAgent::Status {
                        request_id,
                        execution: agent,
                    })
                    .is_ok()
                {
                    self.pending.insert(
                        request_id,
                        Pending {
                            kind: PendingKind::Status { id: rec.id, agent },
                            deadline: now + answer,
                        },
                    );
                }
            } else {
                // Sent but never accepted: the answer may still be in the ring.
                self.pending.insert(
                    rec.id.0,
                    Pending {
                        kind: PendingKind::Exec {
                            id: rec.id,
                            reply: None,
                            timeout_ms: None,
                        },
                        deadline: now + answer,
                    },
                );
                unanswered = true;
            }
        }
        if unanswered {
            let nonce = self.request_id();
            if self.send_to_guest(&HostToAgent::Ping { nonce }).is_ok() {
                self.barrier = Some(nonce);
                self.pending.insert(
                    nonce,
                    Pending {
                        kind: PendingKind::Ping {
                            sent: now,
                            reply: None,
                        },
                        deadline: now + answer,
                    },
                );
            }
        }
    }

    /// The agent said hello.
    pub(super) fn on_hello(
        &mut self,
        generation: u32,
        software: String,
        config_revision: u32,
        reply: bool,
        now: Instant,
    ) {
        let epoch = self.ep.as_ref().map(HostEndpoint::epoch);
        if !reply {
            if self.generation == Some(generation) && self.hello_epoch == epoch && epoch.is_some() {
                // An agent greets once per attach; a second greeting in the same session is
                // noise (each costs an answer).
                self.violation(now, "a repeated hello");
            }
            self.hello_epoch = epoch;
            if self
                .send_to_guest(&HostToAgent::Hello(self.hello(true)))
                .is_err()
            {
                return;
            }
        }
        if self.generation.is_some_and(|g| g != generation) {
            self.restarts += 1;
        }
        if self.generation != Some(generation) {
            // Executions of another generation cannot finish any more.
            let lost: Vec<_> = self
                .running
                .keys()
                .filter(|k| k.generation != generation)
                .copied()
                .collect();
            for k in lost {
                if let Some(run) = self.running.remove(&k) {
                    self.remember_ended(k);
                    self.end_unrun(run.id, ExecState::AgentLost, "the agent restarted");
                }
            }
            // Requests sent before the restart were dropped by the new agent. (The first
            // hello this daemon sees may come from the agent that had them: those sent by
            // `reconcile_records` stay, and are answered, expire or meet the barrier.)
            if self.generation.is_some() {
                for (_, p) in std::mem::take(&mut self.pending) {
                    self.fail_pending(p.kind, VmError::AgentLost, "the agent restarted");
                }
                self.barrier = None;
                if let Some(p) = self.streaming.take() {
                    self.fail_push(p.job, VmError::AgentLost, "the agent restarted");
                }
            }
            self.commands = None;
            self.listing = None;
        }
        self.generation = Some(generation);
        self.config_revision = config_revision;
        if let Ok(mut s) = self.status.lock() {
            s.agent_software = Some(software);
        }
        if self.state != VmState::CutOff {
            self.state = VmState::Ready;
        }
        self.last_beat.1 = now;
        if self.commands.is_none()
            || self
                .commands
                .as_ref()
                .is_some_and(|c| c.1 != config_revision)
        {
            self.list_commands(now);
        }
    }

    pub(super) fn command_list(&self) -> CommandList {
        match &self.commands {
            Some((at, revision, list)) => CommandList {
                vm: self.settings.name.clone(),
                age_ms: u64::try_from(at.elapsed().as_millis()).unwrap_or(u64::MAX),
                config_revision: *revision,
                commands: list.clone(),
            },
            None => CommandList {
                vm: self.settings.name.clone(),
                age_ms: 0,
                config_revision: 0,
                commands: Vec::new(),
            },
        }
    }
}

/// Waits on `fds` for up to `timeout`: short waits (a polling guest) stay interruptible by
/// the wake-up eventfd, so that an API request or the writer's answer is seen at once.
fn poll_fds(fds: &mut [libc::pollfd], timeout: Duration) {
    crate::vm::ivshmem::poll(fds, timeout);
}
