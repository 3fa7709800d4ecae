//! The daemon's HTTP/JSON API (`openapi.json` at the crate root documents it): who is calling
//! (unix peer credentials, or a bearer token on the TCP listener), what the policy allows,
//! the audit entry of every call, and the handlers, which talk to the VM drivers and read the
//! records. Bad requests get a 4xx with `{"error": "..."}` saying what is wrong.

use std::collections::BTreeMap;
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use axum::Json;
use axum::body::{Body, Bytes};
use axum::extract::connect_info::{ConnectInfo, Connected};
use axum::extract::{Path, Query, State};
use axum::http::{HeaderMap, StatusCode, header};
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post};
use base64::Engine as _;
use serde::{Deserialize, Serialize};
use tokio::sync::{Semaphore, broadcast, oneshot};

use crate::callers::Callers;
use crate::config::{HostConfig, Target, VmConfig};
use crate::policy::{Action, Caller, Policy, Principal};
use crate::records::{
    AuditEntry, AuditFilter, AuditOrder, Done, ExecState, ExecutionId, ExecutionRecord, Finish,
    NewExecution, Op, OutputStream, Records, RecordsError, Writer,
};
use crate::vm::{Program, Request, VmError, VmEvent, VmHandle};

/// Everything the handlers share.
pub struct App {
    /// The configuration in force.
    pub config: HostConfig,
    /// Who may do what.
    pub policy: Policy,
    /// Executions, output and audit; read on the blocking pool, never on an async worker.
    pub records: Arc<Records>,
    /// Every write to the records goes through it.
    pub writer: Writer,
    /// The VM drivers, by name.
    pub vms: BTreeMap<String, VmHandle>,
    /// Output and completion events from the drivers.
    pub events: broadcast::Sender<VmEvent>,
    /// Names pushes, so that one the API gave up on can be withdrawn.
    pub tickets: std::sync::atomic::AtomicU64,
    /// What callers may make the daemon spend: denied calls, follows, pushes.
    pub callers: Callers,
    /// Turns true when the daemon stops: open streams end.
    pub stopping: tokio::sync::watch::Receiver<bool>,
    /// When the daemon started (ms since the epoch).
    pub started_ms: u64,
}

/// Runs a read of the records on the blocking pool: SQLite never runs on an async worker.
async fn read<T: Send + 'static>(
    app: &App,
    f: impl FnOnce(&Records) -> Result<T, RecordsError> + Send + 'static,
) -> ApiResult<T> {
    let records = app.records.clone();
    tokio::task::spawn_blocking(move || f(&records))
        .await
        .map_err(ApiError::internal)?
        .map_err(ApiError::internal)
}

/// Refuses new work (503) while the disk of the records is full, naming the cause; reads,
/// listings and the audit log keep working.
async fn refuse_if_disk_full(app: &App) -> ApiResult<()> {
    let records = app.records.clone();
    let problem = tokio::task::spawn_blocking(move || records.disk_problem())
        .await
        .map_err(ApiError::internal)?;
    match problem {
        Some(cause) => Err(ApiError(
            StatusCode::SERVICE_UNAVAILABLE,
            format!("new executions are refused: {cause}"),
        )),
        None => Ok(()),
    }
}

/// Applies writes through the records writer; the first op's result.
async fn write(app: &App, ops: Vec<Op>) -> Result<Done, RecordsError> {
    let results = app.writer.run(ops).await?;
    results.into_iter().next().unwrap_or(Ok(Done::Ok))
}

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

impl Connected<axum::serve::IncomingStream<'_, tokio::net::TcpListener>> for Peer {
    fn connect_info(stream: axum::serve::IncomingStream<'_, tokio::net::TcpListener>) -> Self {
        Self::Tcp(*stream.remote_addr())
    }
}

/// An API error: a status and a message for the `error` field.
#[derive(Debug)]
pub struct ApiError(StatusCode, String);

impl ApiError {
    fn bad(msg: impl Into<String>) -> Self {
        Self(StatusCode::BAD_REQUEST, msg.into())
    }
    fn not_found(msg: impl Into<String>) -> Self {
        Self(StatusCode::NOT_FOUND, msg.into())
    }
    fn internal(e: impl std::fmt::Display) -> Self {
        Self(StatusCode::INTERNAL_SERVER_ERROR, e.to_string())
    }
}

impl IntoResponse for ApiError {
    fn into_response(self) -> Response {
        (self.0, Json(serde_json::json!({ "error": self.1 }))).into_response()
    }
}

impl From<VmError> for ApiError {
    fn from(e: VmError) -> Self {
        let status = match e {
            VmError::Rejected(_) | VmError::Invalid(_) => StatusCode::UNPROCESSABLE_ENTITY,
            VmError::Undeliverable
            | VmError::AgentLost
            | VmError::ShuttingDown
            | VmError::Busy(_) => StatusCode::SERVICE_UNAVAILABLE,
            VmError::NoAnswer(_) => StatusCode::GATEWAY_TIMEOUT,
        };
        Self(status, e.to_string())
    }
}

type ApiResult<T> = Result<T, ApiError>;

fn now_ms() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| u64::try_from(d.as_millis()).unwrap_or(u64::MAX))
}

/// The peer a denied call is counted against: a TCP caller's address (not its port: each
/// connection has a new one), a unix caller's uid.
fn peer_key(peer: &Peer) -> String {
    match peer {
        Peer::Unix(Some((uid, _, _))) => format!("unix uid {uid}"),
        Peer::Unix(None) => "unix (no credentials)".to_owned(),
        Peer::Tcp(addr) => format!("tcp {}", addr.ip()),
    }
}

/// The caller of a request, from the connection and the `Authorization` header.
/// On failure: how to name the caller in the audit log, and why it was refused.
fn caller(peer: &Peer, headers: &HeaderMap) -> Result<Caller, (String, String)> {
    let bearer = headers
        .get(header::AUTHORIZATION)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.strip_prefix("Bearer "))
        .map(str::to_owned);
    match (peer, bearer) {
        (_, Some(token)) => Ok(Caller::Token(token)),
        (Peer::Unix(Some((uid, gid, pid))), None) => Ok(Caller::Unix {
            uid: *uid,
            gid: *gid,
            pid: *pid,
        }),
        (Peer::Unix(None), None) => Err((
            "unix (no credentials)".into(),
            "peer credentials unavailable".into(),
        )),
        (Peer::Tcp(addr), None) => Err((
            format!("tcp {addr} (no token)"),
            "the TCP listener needs `Authorization: Bearer <token>`".into(),
        )),
    }
}

impl App {
    /// The VM `name` for `action`: the caller is identified (and audited) before an unknown
    /// name is reported, so that names are not revealed to strangers.
    async fn vm_for(
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

    fn vm(&self, name: &str) -> ApiResult<(&VmConfig, &VmHandle)> {
        match (self.config.vm(name), self.vms.get(name)) {
            (Some(c), Some(h)) => Ok((c, h)),
            _ => Err(ApiError::not_found(format!("no vm named \"{name}\""))),
        }
    }

    /// Identifies and authorizes the caller for `action` (on `vm`), recording the decision.
    async fn authorize(
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
    async fn authorize_for(
        &self,
        peer: &Peer,
        headers: &HeaderMap,
        action: &Action<'_>,
        vm: Option<&VmConfig>,
        owner: Option<(&str, u64)>,
        target: Option<String>,
    ) -> ApiResult<&Principal> {
        let caller = caller(peer, headers);
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
    async fn identified(
        &self,
        peer: &Peer,
        headers: &HeaderMap,
        action: &Action<'_>,
        target: &str,
    ) -> ApiResult<&Principal> {
        if let Ok(c) = caller(peer, headers)
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
    async fn audit_denied(
        &self,
        peer: &Peer,
        headers: &HeaderMap,
        action: &Action<'_>,
        target: &str,
        reason: &str,
    ) -> ApiResult<()> {
        let caller = caller(peer, headers);
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
    async fn record(
        &self,
        peer: &Peer,
        caller: &Result<Caller, (String, String)>,
        principal: Option<&Principal>,
        action: &Action<'_>,
        target: Option<String>,
        result: &Result<Option<String>, String>,
    ) -> ApiResult<()> {
        let now = now_ms();
        let entry = AuditEntry {
            at_ms: now,
            principal: principal.map(|p| p.name().to_owned()),
            caller: caller
                .as_ref()
                .map_or_else(|(who, _)| who.clone(), ToString::to_string),
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

    async fn execution(&self, id: u64) -> ApiResult<ExecutionRecord> {
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
    async fn authorize_execution(
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
fn others_right(principal: &Principal, action: &Action<'_>) -> Result<&'static str, &'static str> {
    let (right, has) = match action {
        Action::Cancel => ("cancel_all", principal.config().cancel_all),
        _ => ("read_all", principal.config().read_all),
    };
    if has { Ok(right) } else { Err(right) }
}

fn action_name(a: &Action<'_>) -> &'static str {
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
    }
}

/// Errors that axum produces before a handler runs (a malformed id, query or JSON body, a
/// wrong method, a body too large) come as plain text: give them the API's JSON shape too.
async fn json_errors(response: Response) -> Response {
    let status = response.status();
    let is_json = response
        .headers()
        .get(header::CONTENT_TYPE)
        .is_some_and(|v| v.as_bytes().starts_with(b"application/json"));
    if !(status.is_client_error() || status.is_server_error()) || is_json {
        return response;
    }
    let (parts, body) = response.into_parts();
    let text = match axum::body::to_bytes(body, 64 * 1024).await {
        Ok(b) if !b.is_empty() => String::from_utf8_lossy(&b).into_owned(),
        _ => status.canonical_reason().unwrap_or("error").to_lowercase(),
    };
    let mut fixed = ApiError(status, text).into_response();
    for (name, value) in &parts.headers {
        if name != header::CONTENT_TYPE && name != header::CONTENT_LENGTH {
            fixed.headers_mut().insert(name.clone(), value.clone());
        }
    }
    fixed
}

/// Largest program the API accepts for a push (the guest's own limit may be lower).
pub const MAX_PUSH_BYTES: usize = 64 << 20;

/// The router of the API.
pub fn router(app: Arc<App>) -> axum::Router {
    axum::Router::new()
        .route("/v1/vms", get(list_vms))
        .route("/v1/vms/{vm}/commands", get(commands))
        .route("/v1/vms/{vm}/ping", post(ping))
        .route("/v1/vms/{vm}/metrics", get(metrics))
        .route("/v1/vms/{vm}/push", post(push))
        .route("/v1/exec", post(exec))
        .route("/v1/executions", get(list_executions))
        .route("/v1/executions/{id}", get(execution))
        .route("/v1/executions/{id}/wait", get(wait))
        .route("/v1/executions/{id}/output", get(output))
        .route("/v1/executions/{id}/follow", get(follow))
        .route("/v1/executions/{id}/cancel", post(cancel))
        .route("/v1/audit", get(audit))
        .route("/v1/daemon", get(daemon_state))
        .fallback(|| async { ApiError::not_found("no such endpoint (see openapi.json)") })
        .layer(axum::middleware::map_response(json_errors))
        .with_state(app)
}

#[derive(Serialize)]
struct VmView {
    #[serde(flatten)]
    status: crate::vm::VmStatus,
    labels: BTreeMap<String, String>,
    channel: &'static str,
}

async fn list_vms(
    State(app): State<Arc<App>>,
    ConnectInfo(peer): ConnectInfo<Peer>,
    headers: HeaderMap,
) -> ApiResult<Json<serde_json::Value>> {
    let principal = app
        .authorize(&peer, &headers, &Action::ListVms, None, None)
        .await?;
    let vms: Vec<VmView> = app
        .config
        .vms
        .iter()
        .filter(|vm| principal.may_access(vm))
        .filter_map(|vm| {
            app.vms.get(&vm.name).map(|h| VmView {
                status: h.status(),
                labels: vm.labels.clone(),
                channel: vm.channel.kind(),
            })
        })
        .collect();
    Ok(Json(serde_json::json!({ "vms": vms })))
}

/// Waits for a driver's answer, up to the delivery timeout and a little more.
async fn answer<T>(app: &App, rx: oneshot::Receiver<Result<T, VmError>>) -> ApiResult<T> {
    match answer_within(app, rx).await {
        Some(r) => r,
        None => Err(ApiError(
            StatusCode::GATEWAY_TIMEOUT,
            "the agent has not answered yet (the request is in its queue)".into(),
        )),
    }
}

/// The driver's answer, or `None` if the agent has not answered within the delivery timeout
/// (and a little more): the request may still be carried out.
async fn answer_within<T>(
    app: &App,
    rx: oneshot::Receiver<Result<T, VmError>>,
) -> Option<ApiResult<T>> {
    let limit = app.config.daemon.delivery_timeout + Duration::from_secs(5);
    match tokio::time::timeout(limit, rx).await {
        Ok(Ok(r)) => Some(r.map_err(ApiError::from)),
        Ok(Err(_)) => Some(Err(VmError::ShuttingDown.into())),
        Err(_) => None,
    }
}

async fn commands(
    State(app): State<Arc<App>>,
    ConnectInfo(peer): ConnectInfo<Peer>,
    headers: HeaderMap,
    Path(vm): Path<String>,
) -> ApiResult<Json<serde_json::Value>> {
    let (_, handle, _) = app
        .vm_for(
            &peer,
            &headers,
            &Action::ListCommands,
            &vm,
            Some(vm.clone()),
        )
        .await?;
    let (reply, rx) = oneshot::channel();
    handle.request(Request::Commands { reply })?;
    let list = answer(&app, rx).await?;
    Ok(Json(serde_json::json!({
        "vm": vm, "age_ms": list.age_ms, "config_revision": list.config_revision, "commands": list.commands,
    })))
}

async fn ping(
    State(app): State<Arc<App>>,
    ConnectInfo(peer): ConnectInfo<Peer>,
    headers: HeaderMap,
    Path(vm): Path<String>,
) -> ApiResult<Json<serde_json::Value>> {
    let (_, handle, _) = app
        .vm_for(&peer, &headers, &Action::Ping, &vm, Some(vm.clone()))
        .await?;
    let (reply, rx) = oneshot::channel();
    handle.request(Request::Ping { reply })?;
    let rtt = answer(&app, rx).await?;
    Ok(Json(
        serde_json::json!({ "vm": vm, "rtt_us": u64::try_from(rtt.as_micros()).unwrap_or(u64::MAX) }),
    ))
}

async fn metrics(
    State(app): State<Arc<App>>,
    ConnectInfo(peer): ConnectInfo<Peer>,
    headers: HeaderMap,
    Path(vm): Path<String>,
) -> ApiResult<Json<serde_json::Value>> {
    let (_, handle, _) = app
        .vm_for(&peer, &headers, &Action::Metrics, &vm, Some(vm.clone()))
        .await?;
    let (reply, rx) = oneshot::channel();
    handle.request(Request::Metrics { reply })?;
    let m = answer(&app, rx).await?;
    Ok(Json(serde_json::json!({ "vm": vm, "metrics": m })))
}

#[derive(Deserialize)]
struct PushQuery {
    name: String,
    #[serde(default)]
    run: bool,
    timeout_ms: Option<u32>,
}

async fn push(
    State(app): State<Arc<App>>,
    ConnectInfo(peer): ConnectInfo<Peer>,
    headers: HeaderMap,
    Path(vm): Path<String>,
    Query(q): Query<PushQuery>,
    body: Body,
) -> ApiResult<Json<serde_json::Value>> {
    let (_, handle, principal) = app
        .vm_for(
            &peer,
            &headers,
            &Action::Push,
            &vm,
            Some(format!("{vm}:{}", q.name)),
        )
        .await?;
    if q.name.is_empty() || q.name.contains('/') || q.name.starts_with('.') {
        return Err(ApiError::bad(format!(
            "bad program name \"{}\": a file name, not a path",
            q.name
        )));
    }
    // The program is spooled to the state directory, so its disk must have room.
    refuse_if_disk_full(&app).await?;
    // Held until the agent has answered: pushes in flight are bounded.
    let Some(_slot) = app.callers.push_slot() else {
        return Err(ApiError(
            StatusCode::SERVICE_UNAVAILABLE,
            format!(
                "{} pushes are being taken in already (callers.pushes_in_flight); try again",
                app.callers.push_limit()
            ),
        ));
    };
    let program = spool(&app, &headers, body).await?;
    let sha256 = hex::encode(program.sha256());
    let size = program.size();
    let run = if q.run {
        let new = NewExecution {
            principal: principal.name().to_owned(),
            vm: vm.clone(),
            command: format!("push:{}", q.name),
            args: Vec::new(),
            requested_at_ms: now_ms(),
        };
        match write(&app, vec![Op::Create(new)]).await {
            Ok(Done::Created(id)) => Some(id),
            Ok(_) => return Err(ApiError::internal("no execution id")),
            Err(e) => return Err(ApiError::internal(e)),
        }
    } else {
        None
    };
    let (reply, rx) = oneshot::channel();
    // Ordering: Relaxed: a counter; only its uniqueness matters.
    let ticket = app
        .tickets
        .fetch_add(1, std::sync::atomic::Ordering::Relaxed);
    let sent = handle.request(Request::Push {
        name: q.name.clone(),
        program,
        run,
        timeout_ms: q.timeout_ms,
        ticket,
        reply,
    });
    let answered = match sent {
        Ok(()) => answer_within(&app, rx).await,
        Err(e) => Some(Err(e.into())),
    };
    let outcome = match answered {
        Some(Ok(o)) => o,
        // The driver ended the run's record already.
        Some(Err(e)) => return Err(e),
        None => {
            // Given up on: withdrawn from the driver (a late start is cancelled in the
            // guest), and its run ends here, before any of its output could attach.
            let _ = handle.request(Request::WithdrawPush { ticket });
            let err = ApiError(
                StatusCode::GATEWAY_TIMEOUT,
                "the agent did not confirm the push in time; it was withdrawn".into(),
            );
            if let Some(id) = run {
                let end = Finish {
                    state: ExecState::Undeliverable,
                    exit_code: None,
                    signal: None,
                    finished_at_ms: now_ms(),
                    duration_ms: None,
                    detail: Some(err.1.clone()),
                };
                let _ = write(&app, vec![Op::Finish { id, end }]).await;
            }
            return Err(err);
        }
    };
    let (word, error) = match outcome {
        ring_protocol::message::PushOutcome::Stored => ("stored", None),
        ring_protocol::message::PushOutcome::Started(_) => ("started", None),
        ring_protocol::message::PushOutcome::Failed(r) => {
            ("failed", Some(crate::vm::rejection_text(&r)))
        }
    };
    Ok(Json(serde_json::json!({
        "vm": vm, "name": q.name, "size": size, "sha256": sha256, "outcome": word,
        "execution": run.filter(|_| word == "started").map(|id| id.0), "error": error,
    })))
}

/// The directory pushed programs are spooled to, below the state directory.
pub const SPOOL_DIR: &str = "spool";

/// Writes a push's body to a new file in the spool directory, unlinked at once (the driver
/// reads it through its descriptor; nothing is left behind however the daemon ends), with
/// its size and SHA-256. More than [`MAX_PUSH_BYTES`] is refused (413) as soon as it is
/// known: from `Content-Length`, else while reading.
async fn spool(app: &App, headers: &HeaderMap, body: Body) -> ApiResult<Program> {
    use futures_util::StreamExt;
    use sha2::Digest;
    use tokio::io::AsyncWriteExt;
    let too_large = || {
        ApiError(
            StatusCode::PAYLOAD_TOO_LARGE,
            format!("a pushed program is at most {MAX_PUSH_BYTES} bytes"),
        )
    };
    let declared = headers
        .get(header::CONTENT_LENGTH)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.parse::<u64>().ok());
    if declared.is_some_and(|n| n > MAX_PUSH_BYTES as u64) {
        return Err(too_large());
    }
    // Ordering: Relaxed: a counter; only its uniqueness matters.
    let n = app
        .tickets
        .fetch_add(1, std::sync::atomic::Ordering::Relaxed);
    let path = app
        .config
        .daemon
        .state_dir
        .join(SPOOL_DIR)
        .join(format!("push-{n}"));
    let file = tokio::task::spawn_blocking(move || {
        let file = crate::sys::create_private(&path)?;
        std::fs::remove_file(&path)?;
        Ok::<_, std::io::Error>(file)
    })
    .await
    .map_err(ApiError::internal)?
    .map_err(|e| {
        ApiError(
            StatusCode::SERVICE_UNAVAILABLE,
            format!("the program cannot be spooled: {e}"),
        )
    })?;
    let mut out = tokio::fs::File::from_std(file);
    let mut hasher = sha2::Sha256::new();
    let mut size = 0u64;
    let mut stream = body.into_data_stream();
    while let Some(chunk) = stream.next().await {
        let chunk =
            chunk.map_err(|e| ApiError::bad(format!("the program's upload broke off: {e}")))?;
        size += chunk.len() as u64;
        if size > MAX_PUSH_BYTES as u64 {
            return Err(too_large());
        }
        hasher.update(&chunk);
        out.write_all(&chunk).await.map_err(|e| {
            ApiError(
                StatusCode::SERVICE_UNAVAILABLE,
                format!("the program cannot be spooled: {e}"),
            )
        })?;
    }
    out.flush().await.map_err(ApiError::internal)?;
    let file = out.into_std().await;
    Ok(Program::new(file, size, hasher.finalize().into()))
}

#[derive(Deserialize)]
struct ExecBody {
    target: String,
    command: String,
    #[serde(default)]
    args: Vec<String>,
    #[serde(default, deserialize_with = "whole_number")]
    timeout_ms: Option<u32>,
    #[serde(default, deserialize_with = "whole_number")]
    max_concurrency: Option<usize>,
    #[serde(default, deserialize_with = "whole_number")]
    max_errors: Option<usize>,
}

/// An optional integer that JSON may also write with a zero fraction (`5.0`, which JSON
/// Schema counts as an integer too); anything else out of the type's range is an error.
fn whole_number<'de, D, T>(d: D) -> Result<Option<T>, D::Error>
where
    D: serde::Deserializer<'de>,
    T: TryFrom<u64>,
{
    use serde::de::Error;
    let Some(n) = Option::<serde_json::Number>::deserialize(d)? else {
        return Ok(None);
    };
    let whole = n.as_u64().or_else(|| {
        n.as_f64()
            // `u64::MAX as f64` is 2^64, itself out of range.
            .filter(|f| f.fract() == 0.0 && *f >= 0.0 && *f < u64::MAX as f64)
            .map(|f| f as u64)
    });
    let value = whole.ok_or_else(|| D::Error::custom(format!("{n} is not a whole number")))?;
    T::try_from(value)
        .map(Some)
        .map_err(|_| D::Error::custom(format!("{n} is out of range")))
}

/// Whether `name` can be an allow-list command's name: 1 to 64 of `A-Z a-z 0-9 . _ -`
/// (the agent's rule), so that nothing else is sent to a guest.
fn is_command_name(name: &str) -> bool {
    (1..=64).contains(&name.len())
        && name
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || matches!(b, b'.' | b'_' | b'-'))
}

#[derive(Serialize, Clone)]
struct Dispatched {
    vm: String,
    id: Option<u64>,
    state: ExecState,
    error: Option<String>,
}

async fn exec(
    State(app): State<Arc<App>>,
    ConnectInfo(peer): ConnectInfo<Peer>,
    headers: HeaderMap,
    Json(body): Json<ExecBody>,
) -> ApiResult<Json<serde_json::Value>> {
    let action = Action::Exec {
        command: &body.command,
    };
    // Identify first: a caller no principal matches is refused (and audited) before the
    // target is even parsed, so it learns nothing of the VMs. An identified caller's target
    // that does not resolve is audited as a denied exec.
    app.identified(&peer, &headers, &action, &body.target)
        .await?;
    if !is_command_name(&body.command) {
        let reason = format!(
            "command {:?}: a command name is 1 to 64 of A-Z a-z 0-9 . _ -",
            body.command
        );
        app.audit_denied(&peer, &headers, &action, &body.target, &reason)
            .await?;
        return Err(ApiError::bad(reason));
    }
    // A target that does not parse is a bad request (400); one that parses but names no
    // configured VM, or selects none, finds nothing (404).
    let resolved = Target::parse(&body.target)
        .map_err(|e| ApiError::bad(format!("target: {e}")))
        .and_then(|t| {
            let selected = app
                .config
                .select_vms(&t)
                .map_err(|e| ApiError::not_found(e.to_string()))?;
            Ok((t, selected))
        });
    let (target, selected) = match resolved {
        Ok(r) => r,
        Err(err) => {
            app.audit_denied(&peer, &headers, &action, &body.target, &err.1)
                .await?;
            return Err(err);
        }
    };
    // `*` means every VM this caller may use; a VM named outright must be allowed.
    let all = matches!(target, Target::All);
    let mut vms: Vec<&VmConfig> = Vec::new();
    let mut principal_name = String::new();
    for vm in selected {
        let target = Some(format!("{}:{}", vm.name, body.command));
        match app
            .authorize(&peer, &headers, &action, Some(vm), target)
            .await
        {
            Ok(p) => {
                principal_name = p.name().to_owned();
                vms.push(vm);
            }
            Err(e) if all && e.0 == StatusCode::FORBIDDEN => {}
            Err(e) => return Err(e),
        }
    }
    if vms.is_empty() {
        return Err(ApiError(
            StatusCode::FORBIDDEN,
            format!(
                "no vm in \"{}\" allows this caller to run \"{}\"",
                body.target, body.command
            ),
        ));
    }
    refuse_if_disk_full(&app).await?;
    let bounded = body.max_concurrency.is_some_and(|n| n > 0);
    let limit = body
        .max_concurrency
        .filter(|n| *n > 0)
        .unwrap_or(Semaphore::MAX_PERMITS)
        .min(Semaphore::MAX_PERMITS);
    let permits = Arc::new(Semaphore::new(limit));
    let errors = Arc::new(std::sync::atomic::AtomicUsize::new(0));
    let mut tasks = tokio::task::JoinSet::new();
    let mut skipped = Vec::new();
    let mut order = Vec::new();
    for vm in vms {
        let permit = permits
            .clone()
            .acquire_owned()
            .await
            .map_err(ApiError::internal)?;
        // Ordering: Relaxed: a counter read by this task only, after the tasks update it.
        if body
            .max_errors
            .is_some_and(|max| errors.load(std::sync::atomic::Ordering::Relaxed) > max)
        {
            skipped.push(vm.name.clone());
            continue;
        }
        let app2 = app.clone();
        let (name, command, args, timeout, principal) = (
            vm.name.clone(),
            body.command.clone(),
            body.args.clone(),
            body.timeout_ms,
            principal_name.clone(),
        );
        let errors = errors.clone();
        order.push(name.clone());
        let (first_tx, first_rx) = oneshot::channel();
        tasks.spawn(async move {
            let d = dispatch(&app2, &name, &principal, command, args, timeout).await;
            // Refused or undeliverable counts at once, before the next VM is dispatched.
            let refused =
                d.error.is_some() || d.state.is_final() && d.state != ExecState::Succeeded;
            if refused {
                // Ordering: Relaxed: only counted; the dispatch loop reads it after `first_rx`.
                errors.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
            }
            let _ = first_tx.send(d.clone());
            // With a concurrency limit, a slot frees when the execution ends; an execution
            // that ends badly counts as an error too.
            let failed = match d.id {
                Some(id) if bounded && !refused => !wait_final(&app2, ExecutionId(id), None)
                    .await
                    .is_some_and(|r| r.state == ExecState::Succeeded),
                _ => false,
            };
            if failed {
                // Ordering: Relaxed: only counted.
                errors.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
            }
            drop(permit);
            d
        });
        // Dispatch in order: wait until this one is accepted or refused.
        let _ = first_rx.await;
    }
    let mut results: BTreeMap<String, Dispatched> = BTreeMap::new();
    while let Some(r) = tasks.join_next().await {
        let d = r.map_err(ApiError::internal)?;
        results.insert(d.vm.clone(), d);
    }
    let executions: Vec<Dispatched> = order.iter().filter_map(|n| results.remove(n)).collect();
    Ok(Json(
        serde_json::json!({ "executions": executions, "skipped": skipped }),
    ))
}

/// Records and sends one exec; returns once the agent accepted or refused it.
async fn dispatch(
    app: &App,
    vm: &str,
    principal: &str,
    command: String,
    args: Vec<String>,
    timeout_ms: Option<u32>,
) -> Dispatched {
    let new = NewExecution {
        principal: principal.to_owned(),
        vm: vm.to_owned(),
        command: command.clone(),
        args: args.clone(),
        requested_at_ms: now_ms(),
    };
    let id = match write(app, vec![Op::Create(new)]).await {
        Ok(Done::Created(id)) => id,
        other => {
            return Dispatched {
                vm: vm.to_owned(),
                id: None,
                state: ExecState::Rejected,
                error: Some(match other {
                    Err(e) => e.to_string(),
                    Ok(_) => "no execution id".into(),
                }),
            };
        }
    };
    let Some(handle) = app.vms.get(vm) else {
        return Dispatched {
            vm: vm.to_owned(),
            id: Some(id.0),
            state: ExecState::Undeliverable,
            error: Some("no driver".into()),
        };
    };
    let (reply, rx) = oneshot::channel();
    let sent = handle.request(Request::Exec {
        id,
        command,
        args,
        timeout_ms,
        reply,
    });
    // No answer yet is not a failure: the execution is pending and will settle (accepted,
    // or agent_lost if the agent never answers); its record says which.
    let result = match sent {
        Ok(()) => answer_within(app, rx).await.unwrap_or(Ok(())),
        Err(e) => Err(e.into()),
    };
    let state = read(app, move |r| r.execution(id))
        .await
        .ok()
        .flatten()
        .map_or(ExecState::Pending, |r| r.state);
    Dispatched {
        vm: vm.to_owned(),
        id: Some(id.0),
        state,
        error: result.err().map(|e| e.1),
    }
}

/// Waits until execution `id` is final (or `limit` passes); the record then.
async fn wait_final(
    app: &App,
    id: ExecutionId,
    limit: Option<Duration>,
) -> Option<ExecutionRecord> {
    let mut events = app.events.subscribe();
    let deadline = limit.map(|l| tokio::time::Instant::now() + l);
    loop {
        let rec = read(app, move |r| r.execution(id)).await.ok().flatten()?;
        if rec.state.is_final() {
            return Some(rec);
        }
        let next = async {
            loop {
                match events.recv().await {
                    Ok(VmEvent::Finished(f)) if f == id => return,
                    Err(broadcast::error::RecvError::Lagged(_)) => return,
                    Err(broadcast::error::RecvError::Closed) => {
                        tokio::time::sleep(Duration::from_millis(100)).await;
                        return;
                    }
                    _ => {}
                }
            }
        };
        // Re-read the record at least every second in case an event was missed.
        let wake = tokio::time::sleep(Duration::from_secs(1));
        match deadline {
            Some(d) => {
                tokio::select! { () = next => {}, () = wake => {}, () = tokio::time::sleep_until(d) => return Some(rec) }
            }
            None => tokio::select! { () = next => {}, () = wake => {} },
        }
    }
}

#[derive(Deserialize)]
struct ListQuery {
    vm: Option<String>,
    state: Option<String>,
    limit: Option<usize>,
}

async fn list_executions(
    State(app): State<Arc<App>>,
    ConnectInfo(peer): ConnectInfo<Peer>,
    headers: HeaderMap,
    Query(q): Query<ListQuery>,
) -> ApiResult<Json<serde_json::Value>> {
    let principal = app
        .authorize(&peer, &headers, &Action::ListVms, None, None)
        .await?;
    let state = match &q.state {
        Some(s) => Some(
            ExecState::from_name(s)
                .ok_or_else(|| ApiError::bad(format!("unknown state \"{s}\"")))?,
        ),
        None => None,
    };
    // The limit counts what the caller may see: read pages until it is reached.
    let want = q.limit.unwrap_or(100).min(10_000);
    let mut list: Vec<ExecutionRecord> = Vec::new();
    let mut before = None;
    while list.len() < want {
        let filter = crate::records::ExecutionFilter {
            vm: q.vm.clone(),
            state,
            before,
            limit: Some(want.max(100)),
            ..Default::default()
        };
        let page = read(&app, move |r| r.executions(&filter)).await?;
        let Some(last) = page.last() else { break };
        before = Some(last.id);
        // Another principal's executions only with `read_all`.
        let all = principal.config().read_all;
        list.extend(page.into_iter().filter(|r| {
            (all || r.principal == principal.name())
                && app
                    .config
                    .vm(&r.vm)
                    .is_some_and(|vm| principal.may_access(vm))
        }));
    }
    list.truncate(want);
    Ok(Json(serde_json::json!({ "executions": list })))
}

async fn execution(
    State(app): State<Arc<App>>,
    ConnectInfo(peer): ConnectInfo<Peer>,
    headers: HeaderMap,
    Path(id): Path<u64>,
) -> ApiResult<Json<ExecutionRecord>> {
    let (rec, _) = app
        .authorize_execution(&peer, &headers, &Action::ReadExecution, id)
        .await?;
    Ok(Json(rec))
}

#[derive(Deserialize)]
struct WaitQuery {
    timeout_ms: Option<u64>,
}

async fn wait(
    State(app): State<Arc<App>>,
    ConnectInfo(peer): ConnectInfo<Peer>,
    headers: HeaderMap,
    Path(id): Path<u64>,
    Query(q): Query<WaitQuery>,
) -> ApiResult<Json<ExecutionRecord>> {
    app.authorize_execution(&peer, &headers, &Action::ReadExecution, id)
        .await?;
    let limit = Duration::from_millis(q.timeout_ms.unwrap_or(30_000).min(300_000));
    wait_final(&app, ExecutionId(id), Some(limit))
        .await
        .map(Json)
        .ok_or_else(|| ApiError::not_found(format!("no execution {id}")))
}

#[derive(Deserialize)]
struct OutputQuery {
    stream: Option<String>,
    offset: Option<u64>,
    limit: Option<usize>,
}

fn stream_of(s: Option<&str>) -> ApiResult<OutputStream> {
    match s.unwrap_or("stdout") {
        "stdout" => Ok(OutputStream::Stdout),
        "stderr" => Ok(OutputStream::Stderr),
        other => Err(ApiError::bad(format!(
            "stream is stdout or stderr, not \"{other}\""
        ))),
    }
}

async fn output(
    State(app): State<Arc<App>>,
    ConnectInfo(peer): ConnectInfo<Peer>,
    headers: HeaderMap,
    Path(id): Path<u64>,
    Query(q): Query<OutputQuery>,
) -> ApiResult<Response> {
    app.authorize_execution(&peer, &headers, &Action::ReadExecution, id)
        .await?;
    let stream = stream_of(q.stream.as_deref())?;
    let (offset, limit) = (q.offset.unwrap_or(0), q.limit.unwrap_or(usize::MAX));
    let slice = read(&app, move |r| {
        r.read_output(ExecutionId(id), stream, offset, limit)
    })
    .await?;
    Ok((
        [
            (header::CONTENT_TYPE, "application/octet-stream".to_owned()),
            (
                header::HeaderName::from_static("x-portless-total-len"),
                slice.total_len.to_string(),
            ),
            (
                header::HeaderName::from_static("x-portless-stored-len"),
                slice.stored_len.to_string(),
            ),
            (
                header::HeaderName::from_static("x-portless-truncated"),
                slice.truncated.to_string(),
            ),
        ],
        slice.data,
    )
        .into_response())
}

/// Largest piece of output in one followed line.
const FOLLOW_CHUNK: usize = 64 * 1024;

async fn follow(
    State(app): State<Arc<App>>,
    ConnectInfo(peer): ConnectInfo<Peer>,
    headers: HeaderMap,
    Path(id): Path<u64>,
) -> ApiResult<Response> {
    let (_, principal) = app
        .authorize_execution(&peer, &headers, &Action::ReadExecution, id)
        .await?;
    let Some(slot) = app.callers.open_follow(principal.name()) else {
        return Err(ApiError(
            StatusCode::TOO_MANY_REQUESTS,
            format!(
                "principal {:?} has {} follow streams open already (callers.follows_per_principal)",
                principal.name(),
                app.callers.follow_limit()
            ),
        ));
    };
    let (tx, rx) = tokio::sync::mpsc::channel::<Result<Bytes, std::io::Error>>(16);
    let id = ExecutionId(id);
    tokio::spawn(async move {
        // Counted against the principal for as long as the stream lives.
        let _slot = slot;
        let mut stopping = app.stopping.clone();
        let mut events = app.events.subscribe();
        let mut offsets = [0u64; 2];
        loop {
            // Read the state before the output, so that output that arrives with the end is
            // still sent before the end line.
            let rec = match read(&app, move |r| r.execution(id)).await {
                Ok(Some(r)) => r,
                _ => return,
            };
            for (k, stream) in [(0, OutputStream::Stdout), (1, OutputStream::Stderr)] {
                loop {
                    let from = offsets[k];
                    let Ok(slice) =
                        read(&app, move |r| r.read_output(id, stream, from, FOLLOW_CHUNK)).await
                    else {
                        return;
                    };
                    if slice.data.is_empty() {
                        break;
                    }
                    let line = serde_json::json!({
                        "type": "output",
                        "stream": if k == 0 { "stdout" } else { "stderr" },
                        "offset": offsets[k],
                        "data": base64::engine::general_purpose::STANDARD.encode(&slice.data),
                    });
                    offsets[k] += slice.data.len() as u64;
                    if tx.send(Ok(Bytes::from(format!("{line}\n")))).await.is_err() {
                        return;
                    }
                }
            }
            if rec.state.is_final() {
                let line = serde_json::json!({ "type": "end", "execution": rec });
                let _ = tx.send(Ok(Bytes::from(format!("{line}\n")))).await;
                return;
            }
            let next = async {
                loop {
                    match events.recv().await {
                        Ok(VmEvent::Output(e) | VmEvent::Finished(e)) if e == id => return,
                        Err(broadcast::error::RecvError::Lagged(_)) => return,
                        Err(broadcast::error::RecvError::Closed) => {
                            tokio::time::sleep(Duration::from_millis(100)).await;
                            return;
                        }
                        _ => {}
                    }
                }
            };
            // Nothing to send: wait for news, but end at once when the client has gone (its
            // body is dropped) or the daemon stops.
            tokio::select! {
                () = next => {}
                () = tokio::time::sleep(Duration::from_secs(1)) => {}
                () = tx.closed() => return,
                _ = stopping.wait_for(|s| *s) => return,
            }
        }
    });
    let stream = futures_util::stream::unfold(rx, |mut rx| async move {
        rx.recv().await.map(|item| (item, rx))
    });
    Ok((
        [(header::CONTENT_TYPE, "application/x-ndjson")],
        Body::from_stream(stream),
    )
        .into_response())
}

async fn cancel(
    State(app): State<Arc<App>>,
    ConnectInfo(peer): ConnectInfo<Peer>,
    headers: HeaderMap,
    Path(id): Path<u64>,
) -> ApiResult<Response> {
    let (rec, _) = app
        .authorize_execution(&peer, &headers, &Action::Cancel, id)
        .await?;
    if rec.state.is_final() {
        return Err(ApiError(
            StatusCode::CONFLICT,
            format!("execution {id} already ended ({})", rec.state.as_str()),
        ));
    }
    let (_, handle) = app.vm(&rec.vm)?;
    let (reply, rx) = oneshot::channel();
    handle.request(Request::Cancel {
        id: ExecutionId(id),
        reply,
    })?;
    answer(&app, rx).await?;
    Ok((
        StatusCode::ACCEPTED,
        Json(serde_json::json!({ "id": id, "state": rec.state })),
    )
        .into_response())
}

/// The daemon's own state, for operators (the `audit` right): its version, when it
/// started, and what its callers hold.
async fn daemon_state(
    State(app): State<Arc<App>>,
    ConnectInfo(peer): ConnectInfo<Peer>,
    headers: HeaderMap,
) -> ApiResult<Json<serde_json::Value>> {
    app.authorize(&peer, &headers, &Action::ReadDaemon, None, None)
        .await?;
    let counts = app.callers.counts();
    Ok(Json(serde_json::json!({
        "version": env!("CARGO_PKG_VERSION"),
        "started_at_ms": app.started_ms,
        "vms": app.vms.len(),
        "follows_open": counts.follows_open,
        "follows": counts.follows,
        "follows_per_principal": app.callers.follow_limit(),
        "pushes_in_flight": counts.pushes_in_flight,
        "pushes_limit": app.callers.push_limit(),
        "denied_peers": counts.denied_peers,
    })))
}

#[derive(Deserialize)]
struct AuditQuery {
    principal: Option<String>,
    action: Option<String>,
    allowed: Option<bool>,
    since_ms: Option<u64>,
    limit: Option<usize>,
    order: Option<String>,
}

async fn audit(
    State(app): State<Arc<App>>,
    ConnectInfo(peer): ConnectInfo<Peer>,
    headers: HeaderMap,
    Query(q): Query<AuditQuery>,
) -> ApiResult<Json<serde_json::Value>> {
    app.authorize(&peer, &headers, &Action::ReadAudit, None, None)
        .await?;
    let order = match q.order.as_deref() {
        Some("oldest") => AuditOrder::OldestFirst,
        None | Some("newest") => AuditOrder::NewestFirst,
        Some(o) => {
            return Err(ApiError::bad(format!(
                "order is oldest or newest, not \"{o}\""
            )));
        }
    };
    let filter = AuditFilter {
        principal: q.principal,
        action: q.action,
        allowed: q.allowed,
        since_ms: q.since_ms,
        limit: q.limit.or(Some(1000)),
        order,
    };
    let entries = read(&app, move |r| r.audit_log(&filter)).await?;
    Ok(Json(serde_json::json!({ "entries": entries })))
}
