//! Requests to the agent: API requests turned into messages, the budget of requests in
//! flight, the outbox of messages waiting for room (bounded: past `queued_bytes` a guest
//! that does not read is cut off), the answer deadline of every request, and pushes,
//! streamed into the ring as room appears rather than queued whole.

use std::time::{Duration, Instant};

use ring_protocol::SendError;
use ring_protocol::message::{ExecRequest, ExecutionId as AgentExecId, HostToAgent, PushOutcome};
use tokio::sync::oneshot;

use super::batch::Then;
use super::budget::Limit;
use super::driver::{Driver, Listing, Running};
use super::{Program, Request, VmError};
use crate::records::{ExecState, ExecutionId};

/// Largest piece of a pushed program per frame.
const PUSH_CHUNK: usize = 4096;
/// Commands listed per page.
pub(super) const LIST_PAGE: u16 = 64;

/// A request sent to the agent and not answered yet, and when it must be answered by.
pub(super) struct Pending {
    pub(super) kind: PendingKind,
    pub(super) deadline: Instant,
}

pub(super) enum PendingKind {
    Exec {
        id: ExecutionId,
        reply: Option<oneshot::Sender<Result<(), VmError>>>,
        /// Its timeout (the request's, else the listed command's), if it has one.
        timeout_ms: Option<u32>,
    },
    Ping {
        sent: Instant,
        /// `None`: the restart barrier.
        reply: Option<oneshot::Sender<Result<Duration, VmError>>>,
    },
    Metrics {
        reply: oneshot::Sender<Result<ring_protocol::message::Metrics, VmError>>,
    },
    /// A cancel: only a refusal is answered; success shows as the execution's exit.
    Cancel,
    Push(PushJob),
    Status {
        id: ExecutionId,
        agent: AgentExecId,
    },
}

impl PendingKind {
    /// What was asked, for messages.
    pub(super) fn name(&self) -> &'static str {
        match self {
            Self::Exec { .. } => "an exec",
            Self::Ping { .. } => "a ping",
            Self::Metrics { .. } => "a metrics request",
            Self::Cancel => "a cancel",
            Self::Push(_) => "a push",
            Self::Status { .. } => "a status query",
        }
    }
}

/// A push from the API.
pub(super) struct PushJob {
    pub(super) ticket: u64,
    pub(super) name: String,
    pub(super) program: Program,
    pub(super) run: Option<ExecutionId>,
    pub(super) timeout_ms: Option<u32>,
    pub(super) reply: Option<oneshot::Sender<Result<PushOutcome, VmError>>>,
    /// The API gave up on it: a start is cancelled, nothing is recorded.
    pub(super) withdrawn: bool,
}

/// The push being streamed into the ring.
pub(super) struct PushStream {
    pub(super) push_id: u64,
    pub(super) job: PushJob,
    /// Bytes of the program sent so far.
    pub(super) sent: u64,
    /// The next chunk, read from the program's file and not sent yet (the ring had no
    /// room): its length.
    pub(super) staged: usize,
    /// The chunk buffer.
    pub(super) buf: Box<[u8; PUSH_CHUNK]>,
}

/// Who a message toward the guest is for: an API request (refused when the outbox is
/// full), or an answer to the guest itself (which cuts a guest that does not read off).
#[derive(Clone, Copy, PartialEq, Eq)]
enum Origin {
    Api,
    Guest,
}

impl Driver {
    /// Queues an API request for dispatch, or refuses it at once when the VM's budget of
    /// requests in flight is used up.
    pub(super) fn accept_request(&mut self, req: Request, now: Instant) {
        if let Request::WithdrawPush { ticket } = req {
            self.withdraw_push(ticket);
            return;
        }
        let in_flight = self.pending.len()
            + self.queue.len()
            + self.pushes.len()
            + usize::from(self.streaming.is_some());
        let limit = self.settings.budget.requests_in_flight as usize;
        let answerable = matches!(req, Request::Commands { .. }) && self.commands.is_some();
        if in_flight >= limit && !answerable {
            let err = VmError::Busy(format!(
                "vm {} has {in_flight} requests in flight, its budget \
                 (budget.requests_in_flight); try again",
                self.settings.name
            ));
            self.refuse(req, err);
            return;
        }
        let deadline = now + self.settings.delivery_timeout;
        self.queue.push_back((req, deadline));
    }

    /// Refuses a request that was never sent: its execution, if any, ends `rejected`.
    fn refuse(&mut self, req: Request, err: VmError) {
        match req {
            Request::Exec { id, reply, .. } => self.refuse_exec(id, reply, err),
            Request::Push { run, reply, .. } => {
                if let Some(id) = run {
                    self.end_unrun(id, ExecState::Rejected, err.to_string());
                }
                let _ = reply.send(Err(err));
            }
            other => reject(other, err),
        }
    }

    /// A request for an agent that did not become ready within the delivery timeout.
    pub(super) fn undeliverable(&mut self, req: Request) {
        let err = VmError::Undeliverable;
        match req {
            Request::Exec { id, reply, .. } => {
                self.end_refused(id, ExecState::Undeliverable, err.to_string(), reply, err);
            }
            Request::Push { run, reply, .. } => {
                if let Some(id) = run {
                    self.end_unrun(id, ExecState::Undeliverable, err.to_string());
                }
                let _ = reply.send(Err(err));
            }
            other => reject(other, err),
        }
    }

    /// Sends an answer the guest's own message asked for (a hello, the next listing page,
    /// a status query): queued when the ring is full; a guest that lets `queued_bytes` pile
    /// up is cut off.
    pub(super) fn send_to_guest(&mut self, msg: &HostToAgent<'_>) -> Result<(), VmError> {
        self.send(msg, Origin::Guest)
    }

    /// Sends a message an API request asked for: refused (not queued) when `queued_bytes`
    /// already wait for the guest.
    fn send_for_api(&mut self, msg: &HostToAgent<'_>) -> Result<(), VmError> {
        self.send(msg, Origin::Api)
    }

    /// Sends a message, or queues it (in order, at its encoded length) when the ring is full
    /// or being reset.
    fn send(&mut self, msg: &HostToAgent<'_>, origin: Origin) -> Result<(), VmError> {
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
        let len = ring_protocol::message::encode(msg, &mut self.scratch[..])
            .map_err(|e| VmError::Invalid(e.to_string()))?
            .len();
        let limit = self.settings.budget.queued_bytes;
        let queued = (self.outbox_bytes + len) as u64;
        if queued > limit {
            let detail = format!(
                "{} bytes of messages wait for a guest that does not read its ring (budget \
                 queued_bytes, {limit})",
                self.outbox_bytes
            );
            return Err(match origin {
                Origin::Api => VmError::Busy(format!("vm {}: {detail}", self.settings.name)),
                Origin::Guest => {
                    self.cut_off(Limit::QueuedBytes, detail, Instant::now());
                    VmError::AgentLost
                }
            });
        }
        self.outbox.push_back(self.scratch[..len].into());
        self.outbox_bytes += len;
        self.flush();
        Ok(())
    }

    /// Sends what the outbox holds while the ring has room.
    pub(super) fn flush(&mut self) -> bool {
        let mut sent = false;
        let Some(ep) = self.ep.as_mut() else {
            return false;
        };
        let mem = self.channel.region();
        while let Some(frame) = self.outbox.front() {
            match ep.send_frame(mem, frame) {
                Ok(()) => {}
                Err(SendError::Full { .. } | SendError::Detached) => break,
                // Cannot be sent ever (it was encoded within the limit): drop it.
                Err(_) => {}
            }
            if let Some(f) = self.outbox.pop_front() {
                self.outbox_bytes -= f.len();
            }
            sent = true;
        }
        sent
    }

    /// The earliest answer deadline, if anything waits for an answer.
    pub(super) fn next_deadline(&self) -> Option<Instant> {
        let pending = self.pending.values().map(|p| p.deadline).min();
        let listing = self.listing.as_ref().map(|l| l.deadline);
        let running = self.running.values().filter_map(|r| r.deadline).min();
        [pending, listing, running].into_iter().flatten().min()
    }

    /// Ends what was not answered in time: executions `agent_lost`, other requests with
    /// [`VmError::NoAnswer`]; asks the agent about executions that should have ended.
    pub(super) fn expire(&mut self, now: Instant) {
        let answer = self.settings.budget.answer_timeout;
        let late: Vec<u64> = self
            .pending
            .iter()
            .filter(|(_, p)| p.deadline <= now)
            .map(|(k, _)| *k)
            .collect();
        for k in late {
            if let Some(p) = self.pending.remove(&k) {
                if self.barrier == Some(k) {
                    self.barrier = None;
                }
                let why = format!(
                    "the agent did not answer {} within {} ms",
                    p.kind.name(),
                    answer.as_millis()
                );
                self.fail_pending(p.kind, VmError::NoAnswer(answer), &why);
            }
        }
        if self.listing.as_ref().is_some_and(|l| l.deadline <= now) {
            self.listing = None;
            for w in self.waiting_for_list.drain(..) {
                let _ = w.send(Err(VmError::NoAnswer(answer)));
            }
        }
        let overdue: Vec<AgentExecId> = self
            .running
            .iter()
            .filter(|(_, r)| r.deadline.is_some_and(|d| d <= now))
            .map(|(k, _)| *k)
            .collect();
        for agent in overdue {
            let Some(run) = self.running.get_mut(&agent) else {
                continue;
            };
            run.overdue += 1;
            run.deadline = Some(now + answer);
            let (id, times) = (run.id, run.overdue);
            if times > 2 {
                self.running.remove(&agent);
                self.remember_ended(agent);
                self.end_unrun(
                    id,
                    ExecState::AgentLost,
                    "the agent did not report the end of the execution within its timeout",
                );
                continue;
            }
            // Past its timeout: ask how it is (and, the second time, stop it).
            let request_id = self.request_id();
            let msg = if times == 1 {
                HostToAgent::Status {
                    request_id,
                    execution: agent,
                }
            } else {
                HostToAgent::Cancel {
                    request_id,
                    execution: agent,
                }
            };
            if self.send_to_guest(&msg).is_ok() {
                let kind = if times == 1 {
                    PendingKind::Status { id, agent }
                } else {
                    PendingKind::Cancel
                };
                self.pending.insert(
                    request_id,
                    Pending {
                        kind,
                        deadline: now + answer,
                    },
                );
            }
        }
    }

    /// Answers a request that will not be answered by the agent.
    pub(super) fn fail_pending(&mut self, kind: PendingKind, err: VmError, reason: &str) {
        match kind {
            PendingKind::Exec { id, reply, .. } => {
                let state = if err == VmError::Undeliverable {
                    ExecState::Undeliverable
                } else {
                    ExecState::AgentLost
                };
                match reply {
                    Some(reply) => self.end_refused(id, state, reason.to_owned(), reply, err),
                    None => self.end_unrun(id, state, reason),
                }
            }
            PendingKind::Ping { reply, .. } => {
                if let Some(r) = reply {
                    let _ = r.send(Err(err));
                }
            }
            PendingKind::Metrics { reply } => drop(reply.send(Err(err))),
            PendingKind::Cancel => {}
            PendingKind::Push(job) => self.fail_push(job, err, reason),
            PendingKind::Status { id, agent } => {
                if self.running.remove(&agent).is_some() {
                    self.remember_ended(agent);
                    self.end_unrun(id, ExecState::AgentLost, reason);
                }
            }
        }
    }

    /// A push that will not complete: its run, if any, ends; the API hears why.
    pub(super) fn fail_push(&mut self, job: PushJob, err: VmError, reason: &str) {
        if let Some(id) = job.run
            && !job.withdrawn
        {
            self.end_unrun(id, ExecState::AgentLost, reason);
        }
        if let Some(r) = job.reply {
            let _ = r.send(Err(err));
        }
    }

    pub(super) fn dispatch(&mut self, req: Request, now: Instant) {
        let answer = self.settings.budget.answer_timeout;
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
                    self.refuse_exec(id, reply, err);
                    return;
                }
                let msg = HostToAgent::Exec(ExecRequest {
                    request_id: id.0,
                    command: &command,
                    args: args_ref,
                    timeout_ms,
                });
                let timeout_ms = self.timeout_of(&command, timeout_ms);
                match self.send_for_api(&msg) {
                    Ok(()) => {
                        self.pending.insert(
                            id.0,
                            Pending {
                                kind: PendingKind::Exec {
                                    id,
                                    reply: Some(reply),
                                    timeout_ms,
                                },
                                deadline: now + answer,
                            },
                        );
                    }
                    Err(e) => self.refuse_exec(id, reply, e),
                }
            }
            Request::Cancel { id, reply } => {
                let Some(agent) = self
                    .running
                    .iter()
                    .find(|(_, r)| r.id == id)
                    .map(|(k, _)| *k)
                else {
                    let _ = reply.send(Err(VmError::Invalid(format!(
                        "execution {id} is not running"
                    ))));
                    return;
                };
                let request_id = self.request_id();
                match self.send_for_api(&HostToAgent::Cancel {
                    request_id,
                    execution: agent,
                }) {
                    Ok(()) => {
                        // Success shows as the execution's exit; only a rejection answers.
                        // An agent that reports no end within the answer timeout is asked,
                        // told again, and then given up on (`expire`).
                        let by = now + answer;
                        if let Some(r) = self.running.get_mut(&agent) {
                            r.deadline = Some(r.deadline.map_or(by, |d| d.min(by)));
                        }
                        let _ = reply.send(Ok(()));
                        self.pending.insert(
                            request_id,
                            Pending {
                                kind: PendingKind::Cancel,
                                deadline: now + answer,
                            },
                        );
                    }
                    Err(e) => drop(reply.send(Err(e))),
                }
            }
            Request::Ping { reply } => {
                let nonce = self.request_id();
                match self.send_for_api(&HostToAgent::Ping { nonce }) {
                    Ok(()) => {
                        self.pending.insert(
                            nonce,
                            Pending {
                                kind: PendingKind::Ping {
                                    sent: Instant::now(),
                                    reply: Some(reply),
                                },
                                deadline: now + answer,
                            },
                        );
                    }
                    Err(e) => drop(reply.send(Err(e))),
                }
            }
            Request::Metrics { reply } => {
                let request_id = self.request_id();
                match self.send_for_api(&HostToAgent::Metrics { request_id }) {
                    Ok(()) => {
                        self.pending.insert(
                            request_id,
                            Pending {
                                kind: PendingKind::Metrics { reply },
                                deadline: now + answer,
                            },
                        );
                    }
                    Err(e) => drop(reply.send(Err(e))),
                }
            }
            Request::Commands { reply } => {
                if self.commands.is_some() {
                    let _ = reply.send(Ok(self.command_list()));
                } else {
                    self.waiting_for_list.push(reply);
                    self.list_commands(now);
                }
            }
            Request::Push {
                name,
                program,
                run,
                timeout_ms,
                ticket,
                reply,
            } => {
                self.pushes.push_back(PushJob {
                    ticket,
                    name,
                    program,
                    run,
                    timeout_ms,
                    reply: Some(reply),
                    withdrawn: false,
                });
            }
            Request::WithdrawPush { ticket } => self.withdraw_push(ticket),
        }
    }

    /// An exec refused before it reached the agent.
    fn refuse_exec(
        &mut self,
        id: ExecutionId,
        reply: oneshot::Sender<Result<(), VmError>>,
        err: VmError,
    ) {
        self.end_refused(id, ExecState::Rejected, err.to_string(), reply, err);
    }

    /// Ends an execution that did not run, and tells the API request that asked for it
    /// `err`, once the end is recorded.
    fn end_refused(
        &mut self,
        id: ExecutionId,
        state: ExecState,
        detail: String,
        reply: oneshot::Sender<Result<(), VmError>>,
        err: VmError,
    ) {
        let then = Then::Ended {
            id,
            refused: Some((reply, err)),
        };
        self.end(id, state, None, None, None, Some(detail), then);
    }

    /// An exec's timeout: the request's, else the listed command's (0: none).
    fn timeout_of(&self, command: &str, timeout_ms: Option<u32>) -> Option<u32> {
        let listed = self
            .commands
            .as_ref()
            .and_then(|(_, _, list)| list.iter().find(|c| c.name == command))
            .map(|c| c.timeout_ms);
        timeout_ms.or(listed).filter(|&t| t > 0)
    }

    /// The entry of an execution just accepted: a deadline past its timeout (with a margin
    /// for the agent's kill grace and drain) when it has one.
    pub(super) fn running_entry(
        &self,
        id: ExecutionId,
        timeout_ms: Option<u32>,
        now: Instant,
    ) -> Running {
        Running {
            id,
            deadline: timeout_ms.map(|ms| {
                now + Duration::from_millis(u64::from(ms)) + self.settings.budget.answer_timeout
            }),
            overdue: 0,
        }
    }

    pub(super) fn list_commands(&mut self, now: Instant) {
        if self.listing.is_some() {
            return;
        }
        let request_id = self.request_id();
        if self
            .send_to_guest(&HostToAgent::ListCommands {
                request_id,
                start: 0,
                limit: LIST_PAGE,
            })
            .is_ok()
        {
            self.listing = Some(Listing {
                request_id,
                entries: Vec::new(),
                bytes: 0,
                deadline: now + self.settings.budget.answer_timeout,
            });
        }
    }

    /// Streams the current push into the ring while it has room, starting the next push
    /// when none is streaming; commits it once all of it is sent.
    pub(super) fn stream_push(&mut self, now: Instant) -> bool {
        if !self.is_ready() || !self.outbox.is_empty() {
            return false;
        }
        let mut worked = false;
        if self.streaming.is_none() {
            let Some(job) = self.pushes.pop_front() else {
                return false;
            };
            let push_id = self.request_id();
            let begun = self.send_for_api(&HostToAgent::PushBegin {
                push_id,
                name: &job.name,
                size: job.program.size(),
                sha256: job.program.sha256(),
            });
            if let Err(e) = begun {
                self.fail_push(job, e.clone(), &e.to_string());
                return true;
            }
            self.streaming = Some(PushStream {
                push_id,
                job,
                sent: 0,
                staged: 0,
                buf: Box::new([0; PUSH_CHUNK]),
            });
            if !self.outbox.is_empty() {
                // The begin waits for room: the chunks follow it, never pass it.
                return true;
            }
            worked = true;
        }
        let Some(ep) = self.ep.as_mut() else {
            return worked;
        };
        let mem = self.channel.region();
        let Some(s) = self.streaming.as_mut() else {
            return worked;
        };
        while s.sent < s.job.program.size() {
            if s.staged == 0 {
                match s.job.program.read_at(s.sent, &mut s.buf[..]) {
                    Ok(n) if n > 0 => s.staged = n,
                    result => {
                        // The spool file failed us: the push cannot be completed.
                        let why = match result {
                            Err(e) => format!("the spooled program could not be read: {e}"),
                            Ok(_) => "the spooled program ended early".to_owned(),
                        };
                        if let Some(s) = self.streaming.take() {
                            self.fail_push(s.job, VmError::Invalid(why.clone()), &why);
                        }
                        return true;
                    }
                }
            }
            let chunk = HostToAgent::PushChunk {
                push_id: s.push_id,
                offset: s.sent,
                data: s.buf.get(..s.staged).unwrap_or_default(),
            };
            match ep.send(mem, &chunk) {
                Ok(()) => {
                    s.sent += s.staged as u64;
                    s.staged = 0;
                    worked = true;
                }
                Err(_) => return worked,
            }
        }
        let commit = HostToAgent::PushCommit {
            push_id: s.push_id,
            run: s.job.run.is_some(),
            timeout_ms: s.job.timeout_ms,
        };
        if ep.send(mem, &commit).is_err() {
            return worked;
        }
        if let Some(s) = self.streaming.take() {
            self.pending.insert(
                s.push_id,
                Pending {
                    kind: PendingKind::Push(s.job),
                    deadline: now + self.settings.budget.answer_timeout,
                },
            );
        }
        true
    }

    /// The API gave up on push `ticket`: one not sent yet is dropped; one being streamed
    /// is committed as it is, incomplete, which the agent refuses; one committed is
    /// marked, so that a start that comes anyway is cancelled. Its run, if any, ends
    /// `undeliverable` now (the API ends it too; the first end stands), so no output can
    /// attach to it later.
    fn withdraw_push(&mut self, ticket: u64) {
        const WHY: &str = "the push was withdrawn: the API gave up waiting for the agent";
        let queued = self
            .queue
            .iter()
            .position(|(r, _)| matches!(r, Request::Push { ticket: t, .. } if *t == ticket));
        if let Some(k) = queued {
            if let Some((Request::Push { run: Some(id), .. }, _)) = self.queue.remove(k) {
                self.end_unrun(id, ExecState::Undeliverable, WHY);
            }
            return;
        }
        if let Some(k) = self.pushes.iter().position(|p| p.ticket == ticket) {
            if let Some(job) = self.pushes.remove(k)
                && let Some(id) = job.run
            {
                self.end_unrun(id, ExecState::Undeliverable, WHY);
            }
            return;
        }
        if self
            .streaming
            .as_ref()
            .is_some_and(|s| s.job.ticket == ticket)
            && let Some(mut s) = self.streaming.take()
        {
            if let Some(id) = s.job.run {
                self.end_unrun(id, ExecState::Undeliverable, WHY);
            }
            s.job.withdrawn = true;
            s.job.reply = None;
            let commit = HostToAgent::PushCommit {
                push_id: s.push_id,
                run: false,
                timeout_ms: None,
            };
            if self.send_to_guest(&commit).is_ok() {
                let deadline = Instant::now() + self.settings.budget.answer_timeout;
                self.pending.insert(
                    s.push_id,
                    Pending {
                        kind: PendingKind::Push(s.job),
                        deadline,
                    },
                );
            }
            return;
        }
        let mut ended = None;
        for p in self.pending.values_mut() {
            if let PendingKind::Push(job) = &mut p.kind
                && job.ticket == ticket
                && !job.withdrawn
            {
                job.withdrawn = true;
                job.reply = None;
                ended = job.run;
            }
        }
        if let Some(id) = ended {
            self.end_unrun(id, ExecState::Undeliverable, WHY);
        }
    }
}

/// Answers a request that is not sent with `err`.
pub(super) fn reject(req: Request, err: VmError) {
    match req {
        Request::Exec { reply, .. } | Request::Cancel { reply, .. } => drop(reply.send(Err(err))),
        Request::Ping { reply } => drop(reply.send(Err(err))),
        Request::Metrics { reply } => drop(reply.send(Err(err))),
        Request::Commands { reply } => drop(reply.send(Err(err))),
        Request::Push { reply, .. } => drop(reply.send(Err(err))),
        Request::WithdrawPush { .. } => {}
    }
}
