//! What the agent sends, matched to what was asked. A reply must answer a request in flight
//! with a reply of that request's kind; anything else is a protocol violation (counted, and
//! the request stays in flight). An execution id the agent already used is refused. Output
//! and exits of executions that ended recently (frames read again after a daemon restart)
//! are dropped quietly.

use std::time::Instant;

use ring_protocol::message::{
    ExecState as AgentState, ExecutionId as AgentExecId, Finished, HostToAgent, Outcome,
    PushOutcome, Rejection, Stream,
};

use super::batch::Then;
use super::budget::Limit;
use super::dispatch::{LIST_PAGE, Pending, PendingKind};
use super::driver::Driver;
use super::message::{OwnedMsg, listing_cost};
use super::{VmError, rejection_text};
use crate::records::{ExecState, ExecutionId, Op};

impl Driver {
    pub(super) fn handle(&mut self, msg: OwnedMsg, now: Instant) {
        match msg {
            OwnedMsg::Hello {
                generation,
                software,
                config_revision,
                reply,
            } => self.on_hello(generation, software, config_revision, reply, now),
            OwnedMsg::Pong { nonce } => {
                let Some(p) = self.take_pending(nonce, "a pong", now, |k| {
                    matches!(k, PendingKind::Ping { .. })
                }) else {
                    return;
                };
                if let PendingKind::Ping { sent, reply } = p.kind {
                    match reply {
                        Some(r) => drop(r.send(Ok(sent.elapsed()))),
                        None => self.barrier_answered(nonce),
                    }
                }
            }
            OwnedMsg::Command { request_id, info } => {
                let budget = self.settings.budget;
                let Some(listing) = self.listing.as_mut().filter(|l| l.request_id == request_id)
                else {
                    self.violation(now, "a listed command for no listing");
                    return;
                };
                listing.bytes += listing_cost(&info);
                listing.entries.push(info);
                let (n, bytes) = (listing.entries.len(), listing.bytes);
                if n > budget.listing_entries as usize {
                    let detail =
                        format!("a listing of more than {} commands", budget.listing_entries);
                    self.cut_off(Limit::ListingEntries, detail, now);
                } else if bytes as u64 > budget.listing_bytes {
                    let detail = format!("a listing of more than {} bytes", budget.listing_bytes);
                    self.cut_off(Limit::ListingBytes, detail, now);
                }
            }
            OwnedMsg::CommandsEnd { request_id, next } => {
                if self
                    .listing
                    .as_ref()
                    .is_none_or(|l| l.request_id != request_id)
                {
                    self.violation(now, "the end of no listing");
                    return;
                }
                if let Some(start) = next {
                    let request_id = self.request_id();
                    if let Some(l) = self.listing.as_mut() {
                        l.request_id = request_id;
                        l.deadline = now + self.settings.budget.answer_timeout;
                    }
                    let _ = self.send_to_guest(&HostToAgent::ListCommands {
                        request_id,
                        start,
                        limit: LIST_PAGE,
                    });
                    return;
                }
                if let Some(l) = self.listing.take() {
                    self.commands = Some((now, self.config_revision, l.entries));
                    let answer = self.command_list();
                    for w in self.waiting_for_list.drain(..) {
                        let _ = w.send(Ok(answer.clone()));
                    }
                }
            }
            OwnedMsg::Accepted {
                request_id,
                execution,
            } => {
                let Some(p) = self.take_pending(request_id, "an acceptance", now, |k| {
                    matches!(k, PendingKind::Exec { .. })
                }) else {
                    return;
                };
                if let PendingKind::Exec {
                    id,
                    reply,
                    timeout_ms,
                } = p.kind
                {
                    self.started(id, execution, timeout_ms, reply, now);
                }
            }
            OwnedMsg::Rejected { request_id, reason } => self.on_rejected(request_id, reason, now),
            OwnedMsg::Output {
                execution,
                stream,
                offset,
                data,
            } => {
                self.output_bytes.spend(data.len() as u64);
                if let Some(run) = self.running.get(&execution) {
                    let s = match stream {
                        Stream::Stdout => portless_api::Stream::Stdout,
                        Stream::Stderr => portless_api::Stream::Stderr,
                    };
                    let id = run.id;
                    self.batches.output(id, s, offset, &data, now);
                } else if !self.ended_set.contains(&execution) {
                    self.violation(now, "output of an execution the agent never started");
                }
            }
            OwnedMsg::Exit {
                execution,
                finished,
                leftovers,
            } => {
                if let Some(run) = self.running.remove(&execution) {
                    self.remember_ended(execution);
                    self.record_exit(run.id, &finished, leftovers);
                } else if !self.ended_set.contains(&execution) {
                    self.violation(now, "the exit of an execution the agent never started");
                }
            }
            OwnedMsg::PushResult { push_id, outcome } => self.on_push_result(push_id, outcome, now),
            OwnedMsg::Metrics {
                request_id,
                metrics,
            } => {
                let Some(p) = self.take_pending(request_id, "metrics", now, |k| {
                    matches!(k, PendingKind::Metrics { .. })
                }) else {
                    return;
                };
                if let PendingKind::Metrics { reply } = p.kind {
                    let _ = reply.send(Ok(metrics));
                }
            }
            OwnedMsg::Status {
                request_id,
                execution,
                state,
            } => {
                let Some(p) = self.take_pending(
                    request_id,
                    "a status",
                    now,
                    |k| matches!(k, PendingKind::Status { agent, .. } if *agent == execution),
                ) else {
                    return;
                };
                if let PendingKind::Status { id, agent } = p.kind {
                    self.on_status(id, agent, state);
                }
            }
            OwnedMsg::CommandsChanged { config_revision } => {
                self.config_revision = config_revision;
                self.commands = None;
                self.list_commands(now);
            }
            OwnedMsg::Error(detail) => {
                // Reports are the agent's to make; logged at most every 10 s.
                if self
                    .error_logged
                    .is_none_or(|t| now.saturating_duration_since(t).as_secs() >= 10)
                {
                    self.error_logged = Some(now);
                    eprintln!(
                        "portless: vm {}: agent reports: {}",
                        self.settings.name,
                        detail.escape_debug()
                    );
                }
            }
        }
    }

    /// The request in flight that `request_id` answers, if it is of the kind `fits` wants;
    /// otherwise a violation (`what` names the reply), and a request of another kind stays
    /// in flight.
    fn take_pending(
        &mut self,
        request_id: u64,
        what: &str,
        now: Instant,
        fits: impl Fn(&PendingKind) -> bool,
    ) -> Option<Pending> {
        match self.pending.get(&request_id) {
            Some(p) if fits(&p.kind) => self.pending.remove(&request_id),
            Some(p) => {
                let asked = p.kind.name();
                self.violation(now, &format!("{what} in answer to {asked}"));
                None
            }
            None => {
                self.violation(now, &format!("{what} that answers no request"));
                None
            }
        }
    }

    /// An execution started as agent execution `agent`: mapped and recorded, unless the
    /// agent used that id before.
    fn started(
        &mut self,
        id: ExecutionId,
        agent: AgentExecId,
        timeout_ms: Option<u32>,
        reply: Option<tokio::sync::oneshot::Sender<Result<(), VmError>>>,
        now: Instant,
    ) {
        match self.map_running(id, agent, timeout_ms, now) {
            Ok(accept) => self.batches.op(accept, Then::Accepted { id, agent, reply }),
            Err(detail) => {
                let then = Then::Ended {
                    id,
                    refused: reply.map(|r| (r, VmError::AgentLost)),
                };
                self.end(
                    id,
                    ExecState::AgentLost,
                    None,
                    None,
                    None,
                    Some(detail),
                    then,
                );
            }
        }
    }

    /// Maps agent execution `agent` to record `id` as running and returns the op that
    /// records it; if the agent used that id before (a violation), why it is refused.
    fn map_running(
        &mut self,
        id: ExecutionId,
        agent: AgentExecId,
        timeout_ms: Option<u32>,
        now: Instant,
    ) -> Result<Op, String> {
        let reused = match self.running.get(&agent) {
            Some(other) => Some(format!(
                "the agent reused execution id {agent}, which execution {} has",
                other.id
            )),
            None => self.ended_set.contains(&agent).then(|| {
                format!("the agent reused execution id {agent} of an execution that ended")
            }),
        };
        if let Some(detail) = reused {
            self.violation(now, "an execution id the agent used before");
            return Err(detail);
        }
        let entry = self.running_entry(id, timeout_ms, now);
        self.running.insert(agent, entry);
        Ok(Op::Accept {
            id,
            generation: agent.generation,
            counter: agent.counter,
            at_ms: crate::records::now_ms(),
        })
    }

    fn on_rejected(&mut self, request_id: u64, reason: Rejection, now: Instant) {
        if self
            .listing
            .as_ref()
            .is_some_and(|l| l.request_id == request_id)
        {
            self.listing = None;
            for w in self.waiting_for_list.drain(..) {
                let _ = w.send(Err(VmError::Rejected(reason)));
            }
            return;
        }
        let Some(p) = self.take_pending(request_id, "a refusal", now, |k| {
            matches!(
                k,
                PendingKind::Exec { .. }
                    | PendingKind::Cancel
                    | PendingKind::Metrics { .. }
                    | PendingKind::Status { .. }
            )
        }) else {
            return;
        };
        match p.kind {
            PendingKind::Exec { id, reply, .. } => {
                let detail = rejection_text(&reason);
                self.end(
                    id,
                    ExecState::Rejected,
                    None,
                    None,
                    None,
                    Some(detail),
                    Then::Ended {
                        id,
                        refused: reply.map(|r| (r, VmError::Rejected(reason))),
                    },
                );
            }
            PendingKind::Metrics { reply } => drop(reply.send(Err(VmError::Rejected(reason)))),
            // The agent no longer knows it (it forgets the oldest of its finished ones).
            PendingKind::Status { id, agent } if self.running.remove(&agent).is_some() => {
                self.remember_ended(agent);
                self.end_unrun(id, ExecState::AgentLost, "the agent no longer knows it");
            }
            _ => {}
        }
    }

    fn on_status(&mut self, id: ExecutionId, agent: AgentExecId, state: AgentState) {
        match state {
            AgentState::Running { .. } => {}
            AgentState::Finished(f) => {
                if self.running.remove(&agent).is_some() {
                    self.remember_ended(agent);
                    self.record_exit(id, &f, 0);
                }
            }
            AgentState::Unknown => {
                if self.running.remove(&agent).is_some() {
                    self.remember_ended(agent);
                    self.end_unrun(id, ExecState::AgentLost, "the agent no longer knows it");
                }
            }
        }
    }

    fn on_push_result(&mut self, push_id: u64, outcome: PushOutcome, now: Instant) {
        if !self.pending.contains_key(&push_id) {
            if self.answered_pushes.contains(&push_id) {
                return; // the second answer of a push that failed early
            }
            // An early failure of the push being streamed.
            if self
                .streaming
                .as_ref()
                .is_some_and(|s| s.push_id == push_id)
                && let (Some(s), PushOutcome::Failed(_)) = (self.streaming.take(), outcome)
            {
                self.remember_push(push_id);
                self.push_done(s.job, outcome, now);
                return;
            }
        }
        let Some(p) = self.take_pending(push_id, "a push result", now, |k| {
            matches!(k, PendingKind::Push(_))
        }) else {
            return;
        };
        self.remember_push(push_id);
        if let PendingKind::Push(job) = p.kind {
            self.push_done(job, outcome, now);
        }
    }

    fn push_done(&mut self, job: super::dispatch::PushJob, outcome: PushOutcome, now: Instant) {
        if job.withdrawn {
            // The API gave up on it and ended its record: a late start is stopped.
            if let PushOutcome::Started(agent) = outcome {
                self.remember_ended(agent);
                let request_id = self.request_id();
                let _ = self.send_to_guest(&HostToAgent::Cancel {
                    request_id,
                    execution: agent,
                });
            }
            return;
        }
        let then = |reply: Option<_>| match reply {
            Some(reply) => Then::Pushed { reply, outcome },
            None => Then::Nothing,
        };
        match (outcome, job.run) {
            (PushOutcome::Started(agent), Some(id)) => {
                let timeout = job.timeout_ms.filter(|&t| t > 0);
                match self.map_running(id, agent, timeout, now) {
                    Ok(accept) => self.batches.op(accept, then(job.reply)),
                    Err(detail) => {
                        self.end_unrun(id, ExecState::AgentLost, detail);
                        if let Some(r) = job.reply {
                            let _ = r.send(Err(VmError::AgentLost));
                        }
                    }
                }
            }
            (PushOutcome::Failed(reason), Some(id)) => {
                let detail = rejection_text(&reason);
                self.end(
                    id,
                    ExecState::Rejected,
                    None,
                    None,
                    None,
                    Some(detail),
                    then(job.reply),
                );
            }
            (PushOutcome::Stored, Some(id)) => {
                // Asked to run, the agent only stored it (PROTOCOL.md 7.1 says Started or
                // Failed): the run never happened.
                self.violation(now, "a push stored when it was to run");
                self.end_unrun(
                    id,
                    ExecState::Rejected,
                    "the agent stored it but did not run it",
                );
                if let Some(r) = job.reply {
                    let _ = r.send(Ok(outcome));
                }
            }
            (PushOutcome::Started(agent), None) => {
                // Started when it was only to be stored: stopped, and nothing is recorded.
                self.violation(now, "a push started when it was only to be stored");
                self.remember_ended(agent);
                let request_id = self.request_id();
                let _ = self.send_to_guest(&HostToAgent::Cancel {
                    request_id,
                    execution: agent,
                });
                if let Some(r) = job.reply {
                    let _ = r.send(Ok(PushOutcome::Stored));
                }
            }
            (PushOutcome::Stored | PushOutcome::Failed(_), None) => {
                if let Some(r) = job.reply {
                    let _ = r.send(Ok(outcome));
                }
            }
        }
    }

    /// The restart barrier was answered: executions found pending in the records that got
    /// no answer before it never reached the agent.
    fn barrier_answered(&mut self, nonce: u64) {
        if self.barrier != Some(nonce) {
            return;
        }
        self.barrier = None;
        let stale: Vec<u64> = self
            .pending
            .iter()
            .filter(|(_, p)| matches!(p.kind, PendingKind::Exec { reply: None, .. }))
            .map(|(k, _)| *k)
            .collect();
        for k in stale {
            if let Some(p) = self.pending.remove(&k) {
                self.fail_pending(
                    p.kind,
                    VmError::Undeliverable,
                    "the daemon stopped before the request reached the agent",
                );
            }
        }
    }

    /// Records how an execution ended, as the agent reports it.
    /// Ends a record as the agent reported; `leftovers` processes it left running were
    /// killed by the agent at its end (said in the record's detail).
    pub(super) fn record_exit(&mut self, id: ExecutionId, f: &Finished, leftovers: u32) {
        let (state, exit_code, signal) = match f.outcome {
            Outcome::Exited(0) => (ExecState::Succeeded, Some(0), None),
            Outcome::Exited(c) => (ExecState::Failed, Some(c), None),
            Outcome::Signaled(s) => (ExecState::Failed, None, Some(s)),
            Outcome::TimedOut => (ExecState::TimedOut, None, None),
            Outcome::Cancelled => (ExecState::Cancelled, None, None),
            Outcome::FailedToStart(_) => (ExecState::FailedToStart, None, None),
        };
        let detail = match f.outcome {
            Outcome::FailedToStart(errno) => Some(format!(
                "failed to start: {}",
                std::io::Error::from_raw_os_error(errno)
            )),
            _ if leftovers == 1 => Some("killed 1 process it left running".to_owned()),
            _ if leftovers > 1 => Some(format!("killed {leftovers} processes it left running")),
            _ => None,
        };
        self.end(
            id,
            state,
            exit_code,
            signal,
            Some(f.duration_ms),
            detail,
            Then::Ended { id, refused: None },
        );
    }
}
