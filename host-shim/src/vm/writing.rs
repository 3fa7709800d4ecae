//! Record writing for one VM's driver: what the agent reported goes to the records writer in
//! batches, and the frames that carried it are released to the guest only once it is
//! durable; the ends of executions; the follow-ups of committed batches.

use std::time::Instant;

use ring_protocol::message::{ExecutionId as AgentExecId, HostToAgent};

use super::batch::{RowsBudget, Then};
use super::driver::{Driver, RECENT_PUSHES, RECENTLY_ENDED};
use super::{VmError, VmEvent};
use crate::records::{ExecState, ExecutionId, Finish, Op};

impl Driver {
    /// Releases every frame read when no effect of any is still on its way to the records.
    pub(super) fn release_idle(&mut self) {
        if !self.batches.idle() {
            return;
        }
        if let Some(ep) = self.ep.as_mut() {
            let upto = ep.read_index();
            ep.release(self.channel.region(), upto);
        }
    }

    /// Sends the building batch to the writer when it is due (and the rows budget allows).
    pub(super) fn submit_batch(&mut self, now: Instant) -> bool {
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

    pub(super) fn rows_burst(&self) -> u64 {
        u64::from(self.settings.budget.output_rows_per_s)
    }

    /// Acts on a batch the writer committed: releases its frames and follows up its ops.
    pub(super) fn take_committed(&mut self, now: Instant) -> bool {
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
    pub(super) fn follow_up(&mut self, then: Then, result: crate::records::OpResult, now: Instant) {
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
}
