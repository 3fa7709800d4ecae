//! The agent's lifecycle as one VM's driver sees it: the hello and what it changes (a new
//! generation, a restart), the heartbeat both ways, the VM's published state, protocol
//! violations, cut-offs for exceeded budgets and the resets and back-off they bring, the
//! agent lost, the reconciliation with the records after a daemon restart, and the cache of
//! the guest's allow-list.

use std::time::Instant;

use ring_protocol::HostEndpoint;
use ring_protocol::message::{
    Capabilities, ExecutionId as AgentExecId, Hello, HostToAgent, MIN_PROTOCOL_VERSION,
    PROTOCOL_VERSION,
};

use super::budget::Limit;
use super::dispatch::{Pending, PendingKind};
use super::driver::{Driver, RECENTLY_ENDED, Running};
use super::{ChannelKind, CommandList, CutOff, VmError, VmEvent, VmState};
use crate::records::{ExecState, ExecutionQuery};

impl Driver {
    pub(super) fn publish_status(&self) {
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

    pub(super) fn tick(&mut self, now: Instant) {
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
    pub(super) fn reconcile_records(&mut self, now: Instant) {
        let vm = self.settings.name.clone();
        let answer = self.settings.budget.answer_timeout;
        if let Ok(recent) = self.records.executions(&ExecutionQuery {
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
