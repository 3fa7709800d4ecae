//! Who is calling, and may it: the caller of a request from its connection (unix peer
//! credentials) and its `Authorization` header (a bearer token), the policy's decision, and
//! the audit entry that records it. Every handler identifies its caller before anything
//! else; a denied call changes nothing and learns nothing.

use axum::extract::connect_info::Connected;
use axum::http::{HeaderMap, StatusCode, header};
use std::net::SocketAddr;

use portless_console::SessionCaller;

use super::policy::{Action, Caller, Principal};
use super::{ApiError, ApiResult, App, now_ms, read, write};
use crate::config::VmConfig;
use crate::records::{AuditEntry, ExecutionId, ExecutionRecord, Op};
use crate::vm::VmHandle;

/// How a connection reached the daemon.
#[derive(Debug, Clone)]
pub enum Peer {
    /// The unix socket, with the peer's credentials.
    Unix(Option<(u32, u32, Option<i32>)>),
    /// The TCP listener.
    Tcp(SocketAddr),
}

impl Connected<axum::serve::IncomingStream<'_, tokio::net::UnixListener>> for Peer {
    fn connect_info(stream: axum::serve::IncomingStream<'_, tokio::net::UnixListener>) -> Self {
        Self::Unix(
            stream
                .io()
                .peer_cred()
                .ok()
                .map(|c| (c.uid(), c.gid(), c.pid())),
        )
    }
}

impl Connected<axum::serve::IncomingStream<'_, NoDelay>> for Peer {
    fn connect_info(stream: axum::serve::IncomingStream<'_, NoDelay>) -> Self {
        Self::Tcp(*stream.remote_addr())
    }
}

/// A TCP listener whose connections send at once (`TCP_NODELAY`): the API's answers and the
/// event stream's events are small writes, which Nagle's algorithm would otherwise hold
/// back until the peer's delayed acknowledgement (tens of milliseconds each).
#[derive(Debug)]
pub(crate) struct NoDelay(pub(crate) tokio::net::TcpListener);

impl axum::serve::Listener for NoDelay {
    type Io = tokio::net::TcpStream;
    type Addr = std::net::SocketAddr;

    async fn accept(&mut self) -> (Self::Io, Self::Addr) {
        let (io, addr) = axum::serve::Listener::accept(&mut self.0).await;
        // A socket that refuses the option still works, only slower.
        let _ = io.set_nodelay(true);
        (io, addr)
    }

    fn local_addr(&self) -> std::io::Result<Self::Addr> {
        self.0.local_addr()
    }
}

/// The peer a denied call is counted against: a TCP caller's address (not its port: each
/// connection has a new one), a unix caller's uid.
pub(super) fn peer_key(peer: &Peer) -> String {
    match peer {
        Peer::Unix(Some((uid, _, _))) => format!("unix uid {uid}"),
        Peer::Unix(None) => "unix (no credentials)".to_owned(),
        Peer::Tcp(addr) => format!("tcp {}", addr.ip()),
    }
}

/// The caller of a request, from the `Authorization` header, the console's session cookie
/// and the connection, in that order. On failure: how to name the caller in the audit log,
/// and why it was refused.
pub(super) async fn caller(
    console: &portless_console::Console,
    peer: &Peer,
    headers: &HeaderMap,
) -> Result<Caller, (String, String)> {
    let bearer = headers
        .get(header::AUTHORIZATION)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.strip_prefix("Bearer "))
        .map(str::to_owned);
    if let Some(token) = bearer {
        return Ok(Caller::Token(token));
    }
    match console.caller(headers).await {
        SessionCaller::Active(a) => {
            return Ok(Caller::Session {
                principal: a.principal,
                tag: a.tag,
            });
        }
        SessionCaller::Expired => {
            return Err((
                format!("{} (ended console session)", peer_key(peer)),
                "the console session has ended (logged out or expired): log in again".into(),
            ));
        }
        SessionCaller::Unavailable(e) => {
            return Err((
                format!("{} (console session)", peer_key(peer)),
                format!("the console's sessions cannot be read: {e}"),
            ));
        }
        SessionCaller::None => {}
    }
    match peer {
        Peer::Unix(Some((uid, gid, pid))) => Ok(Caller::Unix {
            uid: *uid,
            gid: *gid,
            pid: *pid,
        }),
        Peer::Unix(None) => Err((
            "unix (no credentials)".into(),
            "peer credentials unavailable".into(),
        )),
        Peer::Tcp(addr) => Err((
            format!("tcp {addr} (no token)"),
            "the TCP listener needs `Authorization: Bearer <token>`".into(),
        )),
    }
}

impl App {
    /// The VM `name` for `action`: the caller is identified (and audited) before an unknown
    /// name is reported, so that names are not revealed to strangers.
    pub(super) async fn vm_for(
        &self,
        peer: &Peer,
        headers: &HeaderMap,
        action: &Action<'_>,
        name: &str,
        target: Option<String>,
    ) -> ApiResult<(&VmConfig, &VmHandle, &Principal)> {
        match self.vm(name) {
            Ok((cfg, handle)) => {
                let p = self
                    .authorize(peer, headers, action, Some(cfg), target)
                    .await?;
                Ok((cfg, handle, p))
            }
            Err(e) => {
                self.authorize(peer, headers, &Action::ListVms, None, target)
                    .await?;
                Err(e)
            }
        }
    }

    pub(super) fn vm(&self, name: &str) -> ApiResult<(&VmConfig, &VmHandle)> {
        match (self.config.vm(name), self.vms.get(name)) {
            (Some(c), Some(h)) => Ok((c, h)),
            _ => Err(ApiError::not_found(format!("no vm named \"{name}\""))),
        }
    }

    /// Identifies and authorizes the caller for `action` (on `vm`), recording the decision.
    pub(super) async fn authorize(
        &self,
        peer: &Peer,
        headers: &HeaderMap,
        action: &Action<'_>,
        vm: Option<&VmConfig>,
        target: Option<String>,
    ) -> ApiResult<&Principal> {
        self.authorize_for(peer, headers, action, vm, None, target)
            .await
    }

    /// [`authorize`](Self::authorize) for an execution started by principal `owner`:
    /// reading or cancelling another principal's execution also needs `read_all` or
    /// `cancel_all`. Denied for that reason, the caller is told the execution does not
    /// exist (it learns nothing); the audit log says why.
    pub(super) async fn authorize_for(
        &self,
        peer: &Peer,
        headers: &HeaderMap,
        action: &Action<'_>,
        vm: Option<&VmConfig>,
        owner: Option<(&str, u64)>,
        target: Option<String>,
    ) -> ApiResult<&Principal> {
        let caller = caller(&self.console, peer, headers).await;
        let mut hidden = false;
        let (principal, result) = match &caller {
            Ok(c) => match self.policy.check(c, action, vm) {
                Ok(p) => match owner.filter(|(o, _)| *o != p.name()) {
                    None => (Some(p), Ok(None)),
                    Some((o, _)) => match others_right(p, action) {
                        Ok(right) => (
                            Some(p),
                            Ok(Some(format!("an execution of principal {o:?} ({right})"))),
                        ),
                        Err(right) => {
                            hidden = true;
                            let reason = format!(
                                "principal {:?} may not {action} of principal {o:?} \
                                 (needs {right})",
                                p.name()
                            );
                            (Some(p), Err(reason))
                        }
                    },
                },
                Err(d) => (self.policy.identify(c), Err(d.reason)),
            },
            Err((_, reason)) => (None, Err(reason.clone())),
        };
        self.record(peer, &caller, principal, action, target, &result)
            .await?;
        match (result, principal) {
            (Ok(_), Some(p)) => Ok(p),
            (Err(_), _) if hidden => Err(ApiError::not_found(format!(
                "no execution {}",
                owner.map_or(0, |(_, id)| id)
            ))),
            (Err(reason), _) => Err(ApiError(StatusCode::FORBIDDEN, reason)),
            (Ok(_), None) => Err(ApiError(
                StatusCode::FORBIDDEN,
                "unidentified caller".into(),
            )),
        }
    }

    /// The caller's principal, if one matches; a caller none matches is audited as denied
    /// `action` on `target` and refused (403). Nothing is audited for an identified caller:
    /// its call is audited when it is authorized.
    pub(super) async fn identified(
        &self,
        peer: &Peer,
        headers: &HeaderMap,
        action: &Action<'_>,
        target: &str,
    ) -> ApiResult<&Principal> {
        if let Ok(c) = caller(&self.console, peer, headers).await
            && let Some(p) = self.policy.identify(&c)
        {
            return Ok(p);
        }
        // Not identified: `authorize` audits and refuses it.
        self.authorize(peer, headers, action, None, Some(target.to_owned()))
            .await
    }

    /// Audits `action` on `target` as denied for `reason` (a request that cannot be carried
    /// out as asked).
    pub(super) async fn audit_denied(
        &self,
        peer: &Peer,
        headers: &HeaderMap,
        action: &Action<'_>,
        target: &str,
        reason: &str,
    ) -> ApiResult<()> {
        let caller = caller(&self.console, peer, headers).await;
        let principal = caller.as_ref().ok().and_then(|c| self.policy.identify(c));
        let result = Err(reason.to_owned());
        self.record(
            peer,
            &caller,
            principal,
            action,
            Some(target.to_owned()),
            &result,
        )
        .await
    }

    /// Writes the audit entry of a call: allowed (with an optional note) or denied (with its
    /// reason). When it cannot be written, nothing is done (503).
    pub(super) async fn record(
        &self,
        peer: &Peer,
        caller: &Result<Caller, (String, String)>,
        principal: Option<&Principal>,
        action: &Action<'_>,
        target: Option<String>,
        result: &Result<Option<String>, String>,
    ) -> ApiResult<()> {
        let who = caller
            .as_ref()
            .map_or_else(|(who, _)| who.clone(), ToString::to_string);
        self.record_as(peer, who, principal, action, target, result)
            .await
    }

    /// [`App::record`] for a caller described by `who` (the console's login page and
    /// sessions, which are not API callers).
    pub(super) async fn record_as(
        &self,
        peer: &Peer,
        who: String,
        principal: Option<&Principal>,
        action: &Action<'_>,
        target: Option<String>,
        result: &Result<Option<String>, String>,
    ) -> ApiResult<()> {
        let now = now_ms();
        let entry = AuditEntry {
            at_ms: now,
            principal: principal.map(|p| p.name().to_owned()),
            caller: who,
            action: action_name(action).to_owned(),
            target,
            allowed: result.is_ok(),
            reason: match result {
                Ok(note) => note.clone(),
                Err(reason) => Some(reason.clone()),
            },
            count: 1,
        };
        // A denied call does nothing, so past its peer's budget it is counted rather than
        // written (the count is written when the interval ends).
        let entries = if result.is_err() {
            self.callers.denied(&peer_key(peer), entry, now)
        } else {
            vec![entry]
        };
        if entries.is_empty() {
            return Ok(());
        }
        write(self, entries.into_iter().map(Op::Audit).collect())
            .await
            .map_err(|e| {
                ApiError(
                    StatusCode::SERVICE_UNAVAILABLE,
                    format!("the audit log cannot be written, so nothing is done: {e}"),
                )
            })?;
        Ok(())
    }

    pub(super) async fn execution(&self, id: u64) -> ApiResult<ExecutionRecord> {
        let missing = || ApiError::not_found(format!("no execution {id}"));
        // Ids are SQLite row ids: none is above i64::MAX.
        if i64::try_from(id).is_err() {
            return Err(missing());
        }
        read(self, move |r| r.execution(ExecutionId(id)))
            .await?
            .ok_or_else(missing)
    }

    /// Authorizes reading or cancelling execution `id` (checked against its VM).
    pub(super) async fn authorize_execution(
        &self,
        peer: &Peer,
        headers: &HeaderMap,
        action: &Action<'_>,
        id: u64,
    ) -> ApiResult<(ExecutionRecord, &Principal)> {
        let target = Some(format!("execution {id}"));
        let rec = match self.execution(id).await {
            Ok(r) => r,
            Err(e) => {
                // Audit the attempt under the caller's identity, then say it does not exist.
                self.authorize(peer, headers, &Action::ListVms, None, target)
                    .await?;
                return Err(e);
            }
        };
        let Some(vm) = self.config.vm(&rec.vm) else {
            self.authorize(peer, headers, &Action::ListVms, None, target)
                .await?;
            return Err(ApiError::not_found(format!(
                "execution {id} belongs to vm \"{}\", no longer configured",
                rec.vm
            )));
        };
        let owner = Some((rec.principal.as_str(), id));
        let principal = self
            .authorize_for(peer, headers, action, Some(vm), owner, target)
            .await?;
        Ok((rec, principal))
    }
}

/// Whether `principal` may do `action` on another principal's execution: the right that
/// allows it, or the one it lacks.
pub(super) fn others_right(
    principal: &Principal,
    action: &Action<'_>,
) -> Result<&'static str, &'static str> {
    let (right, has) = match action {
        Action::Cancel => ("cancel_all", principal.config().cancel_all),
        _ => ("read_all", principal.config().read_all),
    };
    if has { Ok(right) } else { Err(right) }
}

pub(super) fn action_name(a: &Action<'_>) -> &'static str {
    match a {
        Action::ListVms => "list_vms",
        Action::ListCommands => "list_commands",
        Action::Exec { .. } => "exec",
        Action::ReadExecution => "read_execution",
        Action::Cancel => "cancel",
        Action::Push => "push",
        Action::Ping => "ping",
        Action::Metrics => "metrics",
        Action::ReadAudit => "read_audit",
        Action::ReadDaemon => "read_daemon",
        Action::Whoami => "whoami",
        Action::ConsoleCode => "console_code",
        Action::ConsoleRequest => "console_request",
        Action::ConsoleLogin => "console_login",
        Action::ConsoleLogout => "console_logout",
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Every action the audit log records is one the API document lists for `action`.
    #[test]
    fn the_document_lists_every_audited_action() {
        let doc: serde_json::Value =
            serde_json::from_str(portless_api::OPENAPI).expect("the document is JSON");
        let listed = &doc["components"]["schemas"]["AuditRecord"]["properties"]["action"]["enum"];
        let actions = [
            Action::ListVms,
            Action::ListCommands,
            Action::Exec { command: "x" },
            Action::ReadExecution,
            Action::Cancel,
            Action::Push,
            Action::Ping,
            Action::Metrics,
            Action::ReadAudit,
            Action::ReadDaemon,
            Action::Whoami,
            Action::ConsoleCode,
            Action::ConsoleRequest,
            Action::ConsoleLogin,
            Action::ConsoleLogout,
        ];
        for a in actions {
            let name = action_name(&a);
            assert!(
                listed
                    .as_array()
                    .is_some_and(|l| l.iter().any(|v| v == name)),
                "{name} is not in AuditRecord.action's enum"
            );
        }
    }
}
