//! The daemon as a host of a fleet (`[fleet]` in `host.toml`): the [`Runner`] through which
//! `portless-fleet`'s membership reaches this daemon's VMs. An invocation runs exactly as a
//! local execution: the same policy check (as the `[fleet] principal` of this file, on this
//! file's VMs), the same audit entry, the same records, the same drivers. The execution is
//! recorded with the invocation's id before it is sent to the guest, so a redelivered
//! invocation finds it instead of running again.

use std::collections::HashMap;
use std::sync::{Arc, Mutex, PoisonError};
use std::time::Duration;

use portless_api::{AuditEntry, CommandList, ExecState, ExecutionId, ExecutionRecord, Stream};
use portless_fleet::member::{Claimed, Started, VmReport};
use portless_fleet::{Member, MemberConfig, Runner, Store};
use tokio::sync::{oneshot, watch};

use crate::config::FleetConfig;
use crate::http::App;
use crate::http::policy::Action;
use crate::records::{Finish, NewExecution, Op};
use crate::vm::{Program, Request};

/// The daemon's side of its membership.
pub struct HostRunner {
    app: Arc<App>,
    principal: String,
    /// Each VM's allow-list as last fetched, by the revision it had.
    commands: Mutex<HashMap<String, (u32, CommandList)>>,
}

impl HostRunner {
    /// The runner of `app`, running invocations as `principal`.
    pub fn new(app: Arc<App>, principal: String) -> Self {
        Self {
            app,
            principal,
            commands: Mutex::new(HashMap::new()),
        }
    }

    fn audit(&self, c: &Claimed, allowed: bool, reason: Option<String>) -> Op {
        Op::Audit(AuditEntry {
            at_ms: crate::records::now_ms(),
            principal: Some(self.principal.clone()),
            caller: format!(
                "fleet invocation {} (attempt {}) for {:?}",
                c.id, c.attempt, c.principal
            ),
            action: "exec".into(),
            target: Some(format!("{}:{}", c.vm, c.command)),
            allowed,
            reason,
            count: 1,
        })
    }

    /// A push by reference: checked as a local push, recorded (with the invocation's id)
    /// before the guest sees it, and ended in the records here when it is only stored.
    async fn push(&self, c: Claimed) -> Started {
        let Some(push) = c.push.clone() else {
            return Started::Refused {
                state: ExecState::Rejected,
                detail: "not a push".into(),
            };
        };
        let app = &self.app;
        let refuse = |detail: String| Started::Refused {
            state: ExecState::Rejected,
            detail,
        };
        let decision = match (app.policy.principal(&self.principal), app.config.vm(&c.vm)) {
            (None, _) => Err(format!(
                "the fleet principal {:?} is not configured",
                self.principal
            )),
            (_, None) => Err(format!("the host has no vm {:?}", c.vm)),
            (Some(p), Some(vm)) => app
                .policy
                .authorize(p, &Action::Push, Some(vm))
                .map_err(|d| d.to_string()),
        };
        let audit = |allowed: bool, reason: Option<String>| {
            let mut op = self.audit(&c, allowed, reason);
            if let Op::Audit(e) = &mut op {
                e.action = "push".into();
                e.target = Some(format!("{}:{}", c.vm, push.name));
            }
            op
        };
        if let Err(reason) = decision {
            let _ = app
                .writer
                .run(vec![audit(false, Some(reason.clone()))])
                .await;
            return refuse(format!("refused by the host's policy: {reason}"));
        }
        if app.writer.run(vec![audit(true, None)]).await.is_err() {
            return refuse("the host could not write its audit log".into());
        }
        let new = NewExecution {
            principal: c.principal.clone(),
            vm: c.vm.clone(),
            command: format!("push:{}", push.name),
            args: Vec::new(),
            requested_at_ms: crate::records::now_ms(),
            fleet_invocation: Some(c.id),
        };
        let local = match app.writer.run(vec![Op::Create(new)]).await {
            Ok(mut r) => match r.pop() {
                Some(Ok(crate::records::Done::Created(id))) => id,
                other => return refuse(format!("not recorded: {other:?}")),
            },
            Err(e) => return refuse(format!("not recorded: {e}")),
        };
        let end = |state: ExecState, detail: String| Op::Finish {
            id: local,
            end: Finish {
                state,
                exit_code: None,
                signal: None,
                finished_at_ms: crate::records::now_ms(),
                duration_ms: None,
                detail: Some(detail),
            },
        };
        let Some(handle) = app.vms.get(&c.vm) else {
            let _ = app
                .writer
                .run(vec![end(ExecState::Undeliverable, "no driver".into())])
                .await;
            return Started::Local(local.0);
        };
        let program = match Program::from_bytes(&push.program) {
            Ok(p) => p,
            Err(e) => {
                let _ = app
                    .writer
                    .run(vec![end(ExecState::Rejected, format!("the program: {e}"))])
                    .await;
                return Started::Local(local.0);
            }
        };
        // Ordering: Relaxed: a counter that only has to be unique.
        let ticket = app
            .tickets
            .fetch_add(1, std::sync::atomic::Ordering::Relaxed);
        let (reply, rx) = oneshot::channel();
        let sent = handle.request(Request::Push {
            name: push.name.clone(),
            program,
            run: push.run.then_some(local),
            timeout_ms: c.timeout_ms,
            ticket,
            reply,
        });
        let limit = app.config.daemon.delivery_timeout + Duration::from_secs(5);
        let answer = match sent {
            Ok(()) => tokio::time::timeout(limit, rx).await.ok(),
            Err(e) => Some(Ok(Err(e))),
        };
        let ended = match answer {
            None => {
                let _ = handle.request(Request::WithdrawPush { ticket });
                Some(end(
                    ExecState::Undeliverable,
                    "the agent did not confirm the push in time; it was withdrawn".into(),
                ))
            }
            Some(Err(_)) => Some(end(
                ExecState::Undeliverable,
                "the daemon is stopping".into(),
            )),
            Some(Ok(Err(e))) => Some(end(ExecState::Undeliverable, e.to_string())),
            Some(Ok(Ok(outcome))) => match outcome {
                ring_protocol::message::PushOutcome::Stored => Some(end(
                    ExecState::Succeeded,
                    format!("stored in the guest as {} ({})", push.name, push.sha256),
                )),
                // The driver reports the run as the execution it is.
                ring_protocol::message::PushOutcome::Started(_) => None,
                ring_protocol::message::PushOutcome::Failed(r) => {
                    Some(end(ExecState::Rejected, crate::vm::rejection_text(&r)))
                }
            },
        };
        if let Some(op) = ended {
            let _ = app.writer.run(vec![op]).await;
        }
        Started::Local(local.0)
    }

    async fn read<T: Send + 'static>(
        &self,
        f: impl FnOnce(&crate::records::Records) -> T + Send + 'static,
    ) -> Option<T> {
        let records = self.app.records.clone();
        tokio::task::spawn_blocking(move || f(&records)).await.ok()
    }
}

impl Runner for HostRunner {
    async fn vms(&self) -> Vec<VmReport> {
        let Some(principal) = self.app.policy.principal(&self.principal) else {
            return Vec::new();
        };
        let mut out = Vec::new();
        for vm in self
            .app
            .config
            .vms
            .iter()
            .filter(|vm| principal.may_access(vm))
        {
            let Some(handle) = self.app.vms.get(&vm.name) else {
                continue;
            };
            let info = portless_api::VmInfo {
                labels: vm.labels.clone(),
                channel: vm.channel.kind().to_owned(),
                ..handle.status()
            };
            // The allow-list is fetched again only when its revision moved.
            let cached = self
                .commands
                .lock()
                .unwrap_or_else(PoisonError::into_inner)
                .get(&vm.name)
                .cloned();
            let commands = match (info.config_revision, cached) {
                (Some(rev), Some((had, list))) if had == rev => Some(list),
                (Some(rev), _) if info.state == portless_api::VmState::Ready => {
                    let (reply, rx) = oneshot::channel();
                    let fetched = match handle.request(Request::Commands { reply }) {
                        Ok(()) => tokio::time::timeout(Duration::from_secs(5), rx)
                            .await
                            .ok()
                            .and_then(Result::ok)
                            .and_then(Result::ok),
                        Err(_) => None,
                    };
                    if let Some(list) = &fetched {
                        self.commands
                            .lock()
                            .unwrap_or_else(PoisonError::into_inner)
                            .insert(vm.name.clone(), (rev, list.clone()));
                    }
                    fetched
                }
                (_, cached) => cached.map(|c| c.1),
            };
            out.push(VmReport { info, commands });
        }
        out
    }

    async fn start(&self, c: Claimed) -> Started {
        let id = c.id;
        if let Some(Ok(Some(local))) = self.read(move |r| r.find_by_fleet_invocation(id)).await {
            // Started by an earlier attempt: report it, do not run it again.
            return Started::Local(local.0);
        }
        if c.push.is_some() {
            return self.push(c).await;
        }
        let refuse = |detail: String| Started::Refused {
            state: ExecState::Rejected,
            detail,
        };
        let app = &self.app;
        let Some(principal) = app.policy.principal(&self.principal) else {
            return refuse(format!(
                "the host's fleet principal {:?} is not configured",
                self.principal
            ));
        };
        let vm = app.config.vm(&c.vm);
        let decision = match vm {
            None => Err(format!("the host has no vm {:?}", c.vm)),
            Some(vm) => app
                .policy
                .authorize(
                    principal,
                    &Action::Exec {
                        command: &c.command,
                    },
                    Some(vm),
                )
                .map_err(|d| d.to_string()),
        };
        if let Err(reason) = decision {
            let _ = app
                .writer
                .run(vec![self.audit(&c, false, Some(reason.clone()))])
                .await;
            return refuse(format!("refused by the host's policy: {reason}"));
        }
        if app
            .writer
            .run(vec![self.audit(&c, true, None)])
            .await
            .is_err()
        {
            return refuse("the host could not write its audit log".into());
        }
        let d = crate::http::dispatch(
            app,
            &c.vm,
            &c.principal,
            c.command.clone(),
            c.args.clone(),
            c.timeout_ms,
            Some(c.id),
        )
        .await;
        match d.id {
            Some(local) => Started::Local(local.0),
            None => Started::Refused {
                state: if d.state.is_final() {
                    d.state
                } else {
                    ExecState::Rejected
                },
                detail: d.error.unwrap_or_else(|| "not recorded".into()),
            },
        }
    }

    async fn records(&self, ids: Vec<u64>) -> Vec<ExecutionRecord> {
        self.read(move |r| {
            ids.into_iter()
                .filter_map(|id| r.execution(ExecutionId(id)).ok().flatten())
                .collect()
        })
        .await
        .unwrap_or_default()
    }

    async fn output(&self, id: u64, stream: Stream, offset: u64, max: usize) -> Option<Vec<u8>> {
        self.read(move |r| r.read_output(ExecutionId(id), stream, offset, max))
            .await?
            .ok()
            .map(|s| s.data)
    }

    async fn cancel(&self, id: u64) {
        let vm = self
            .read(move |r| r.execution(ExecutionId(id)))
            .await
            .and_then(Result::ok)
            .flatten()
            .map(|r| r.vm);
        let Some(handle) = vm.and_then(|vm| self.app.vms.get(&vm)) else {
            return;
        };
        let (reply, rx) = oneshot::channel();
        if handle
            .request(Request::Cancel {
                id: ExecutionId(id),
                reply,
            })
            .is_ok()
        {
            let _ = tokio::time::timeout(Duration::from_secs(10), rx).await;
        }
    }
}

/// Starts the membership of `app` in the fleet of `config`; it ends when `stop` turns true.
pub fn start(
    app: Arc<App>,
    config: &FleetConfig,
    stop: watch::Receiver<bool>,
) -> anyhow::Result<tokio::task::JoinHandle<()>> {
    let store = Store::new(&config.database, 4)?;
    let mut member = MemberConfig::new(config.host.clone());
    member.labels = config.labels.clone();
    member.lease = config.lease;
    member.heartbeat = config.heartbeat;
    let runner = Arc::new(HostRunner::new(app, config.principal.clone()));
    let member = Member::new(store, member, runner);
    Ok(tokio::spawn(member.run(stop)))
}
