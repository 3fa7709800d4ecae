//! The driver of one VM: its state, and its loop: the channel's I/O (frames in, the outbox
//! out, the guest's doorbell rung), API requests taken in, and sleep on the doorbell's
//! eventfd or a backing-off timer. What the loop calls lives by concern: the agent's
//! lifecycle in `lifecycle.rs`, the dispatch of requests in `dispatch.rs`, replies in `replies.rs`, and
//! record writing in `writing.rs`.

use std::collections::{HashMap, HashSet, VecDeque};
use std::os::fd::{AsRawFd, OwnedFd};
use std::sync::{Arc, Mutex, mpsc};
use std::time::{Duration, Instant};

use ring_protocol::message::{ExecutionId as AgentExecId, HostToAgent};
use ring_protocol::{ChannelError, HostEndpoint, RecvError, SharedMemory, frame_buf};
use tokio::sync::{broadcast, oneshot};

use super::batch::Batches;
use super::budget::{Backoff, Bucket, Violations};
use super::dispatch::{Pending, PushJob, PushStream};
use super::message::OwnedMsg;
use super::{
    ChannelKind, CommandInfo, CommandList, CutOff, Request, VmError, VmEvent, VmInfo, VmSettings,
    VmState,
};
use crate::records::{ExecutionId, Records, Writer};
use crate::vm::ivshmem;

/// How often the host bumps its heartbeat and checks the agent's.
pub(super) const TICK: Duration = Duration::from_millis(500);
/// Polling interval of a plain channel whose agent has been idle for a second.
const IDLE_POLL: Duration = Duration::from_millis(10);
/// Polling interval of a plain channel with no agent attached.
const IDLE_POLL_NO_AGENT: Duration = Duration::from_millis(50);
/// Executions that ended recently, whose late frames (read again after a daemon restart,
/// say) are dropped without counting as violations.
pub(super) const RECENTLY_ENDED: usize = 256;
/// Pushes whose result came, whose second result (a failed push committed anyway) is
/// expected and dropped.
pub(super) const RECENT_PUSHES: usize = 16;

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
    pub(super) status: Arc<Mutex<VmInfo>>,
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
    pub(super) last_beat: (u32, Instant),
    pub(super) commands: Option<(Instant, u32, Vec<CommandInfo>)>,
    pub(super) listing: Option<Listing>,
    pub(super) waiting_for_list: Vec<oneshot::Sender<Result<CommandList, VmError>>>,
    pub(super) reset_started: Option<Instant>,
    pub(super) config_revision: u32,
    pub(super) restarts: u32,
    pub(super) host_generation: u32,
    pub(super) batches: Batches,
    frames: Bucket,
    pub(super) output_bytes: Bucket,
    pub(super) rows: Bucket,
    pub(super) violations: Violations,
    pub(super) backoff: Backoff,
    pub(super) last_cutoff: Option<CutOff>,
    /// The restart barrier: a ping sent after the reconciled requests; once it is
    /// answered, a reconciled execution that got no answer was never delivered.
    pub(super) barrier: Option<u64>,
    /// A batch failed and its failure was logged (until one succeeds).
    pub(super) batch_failure_logged: bool,
    /// When the agent's last `Error` report was logged.
    pub(super) error_logged: Option<Instant>,
    /// Scratch space to encode a message that must wait in the outbox.
    pub(super) scratch: Box<ring_protocol::FrameBuf>,
    /// The read was paced (a bucket ran dry): when to look again.
    pub(super) paced_until: Option<Instant>,
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
            super::dispatch::reject(req, VmError::ShuttingDown);
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
}

/// Waits on `fds` for up to `timeout`: short waits (a polling guest) stay interruptible by
/// the wake-up eventfd, so that an API request or the writer's answer is seen at once.
fn poll_fds(fds: &mut [libc::pollfd], timeout: Duration) {
    crate::vm::ivshmem::poll(fds, timeout);
}
