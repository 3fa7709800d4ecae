//! The control plane's routes: the host API's, with VMs named `host/vm`, plus
//! `GET /v1/hosts` and `GET /v1/commands/{id}`. Every call identifies its caller by bearer
//! token first, is authorized, and is written to the audit log, allowed or denied.

use std::collections::{BTreeMap, HashMap};
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use axum::Json;
use axum::body::{Body, Bytes};
use axum::extract::{ConnectInfo, DefaultBodyLimit, Path, Query, State};
use axum::http::{HeaderMap, StatusCode, header};
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post};
use portless_api::events::FOLLOW_CHUNK;
use portless_api::{
    AuditEntry, AuditLog, AuditRecord, CancelResponse, CommandList, Dispatched, ExecRequest,
    ExecResponse, ExecState, ExecutionId, ExecutionList, ExecutionRecord, FleetCommand, FleetPush,
    FollowLine, HostInfo, HostList, Invocation, Limit, ProgramInfo, PushOutcome, PushResponse,
    Rights, Stream, StreamTotals, VmInfo, VmList, VmState, Whoami, is_command_name, output_headers,
};
use portless_console::SessionCaller;
use serde::Deserialize;
use sha2::{Digest, Sha256};

use super::target::{FleetVm, Selector, Target};
use super::{ApiError, Control, ControlPrincipal};
use crate::store::host_channel;

type ApiResult<T> = Result<T, ApiError>;

/// Arguments per exec, at most, and bytes per argument.
const MAX_ARGS: usize = 64;
const MAX_ARG_LEN: usize = 4096;
/// Longest idempotency key.
const MAX_KEY_LEN: usize = 200;
/// Largest program a control plane stores (as a daemon takes).
const MAX_PROGRAM: usize = 64 << 20;

pub(super) fn router(control: Arc<Control>) -> axum::Router {
    axum::Router::new()
        .route("/v1/hosts", get(hosts))
        .route("/v1/vms", get(vms))
        .route("/v1/vms/{vm}/commands", get(commands))
        .route("/v1/exec", post(exec))
        .route(
            "/v1/programs",
            post(upload)
                .layer(DefaultBodyLimit::max(MAX_PROGRAM + 1))
                .layer(axum::middleware::from_fn_with_state(
                    control.clone(),
                    upload_slot,
                )),
        )
        .route("/v1/push", post(push))
        .route(
            "/v1/vms/{vm}/push",
            post(push_one)
                .layer(DefaultBodyLimit::max(MAX_PROGRAM + 1))
                .layer(axum::middleware::from_fn_with_state(
                    control.clone(),
                    upload_slot,
                )),
        )
        .route("/v1/commands/{id}", get(command))
        .route("/v1/executions", get(list_executions))
        .route("/v1/executions/{id}", get(execution))
        .route("/v1/executions/{id}/wait", get(wait))
        .route("/v1/executions/{id}/output", get(output))
        .route("/v1/executions/{id}/follow", get(follow))
        .route("/v1/executions/{id}/cancel", post(cancel))
        .route("/v1/audit", get(audit))
        .route("/v1/events", get(super::events::events))
        .route("/v1/whoami", get(whoami))
        .route("/v1/console/codes", post(super::console::console_code))
        .fallback(|| async {
            ApiError::not_found("no such endpoint on a control plane (see openapi.json)")
        })
        .layer(axum::middleware::from_fn_with_state(
            control.clone(),
            super::console::guard,
        ))
        .with_state(control)
}

/// Programs a server takes in at once (each body is held in memory until it is stored).
pub(super) const MAX_UPLOADS_IN_FLIGHT: usize = 4;

/// Holds one of the server's [`MAX_UPLOADS_IN_FLIGHT`] upload slots while a request with a
/// program body is read and handled; with none free, the request is refused (503) before
/// its body is read.
async fn upload_slot(
    State(c): State<Arc<Control>>,
    request: axum::extract::Request,
    next: axum::middleware::Next,
) -> Response {
    let Ok(_permit) = c.uploads.try_acquire() else {
        return ApiError(
            StatusCode::SERVICE_UNAVAILABLE,
            format!(
                "{MAX_UPLOADS_IN_FLIGHT} programs are being taken in by this server: try again \
                 shortly"
            ),
        )
        .into_response();
    };
    next.run(request).await
}

/// A caller, identified.
pub(super) struct Caller<'a> {
    pub(super) principal: &'a ControlPrincipal,
    /// Where it called from, and how it was identified, as the audit log names it:
    /// `127.0.0.1:40000` (a token) or `127.0.0.1:40000 console session 1a2b3c4d`.
    pub(super) peer: String,
}

impl ControlPrincipal {
    fn selectors(&self) -> Vec<Selector> {
        self.vms
            .iter()
            .filter_map(|s| Selector::parse(s).ok())
            .collect()
    }

    fn may_access(&self, vm: &FleetVm) -> bool {
        self.selectors().iter().any(|s| s.matches(vm))
    }

    fn may_run(&self, command: &str) -> bool {
        self.commands.iter().any(|c| c == "*" || c == command)
    }

    fn may_read(&self, rec: &ExecutionRecord) -> bool {
        self.read_all || rec.principal == self.name
    }
}

impl Control {
    /// Who is calling: the principal whose token the request bears, else the principal of
    /// the console session its cookie names. A caller neither identifies is refused (401)
    /// and audited.
    pub(super) async fn identify(
        &self,
        peer: SocketAddr,
        headers: &HeaderMap,
        action: &str,
    ) -> ApiResult<Caller<'_>> {
        let peer = peer.to_string();
        let token = headers
            .get(header::AUTHORIZATION)
            .and_then(|v| v.to_str().ok())
            .and_then(|v| v.strip_prefix("Bearer "));
        let refused = match token {
            Some(t) => match self.principal_for_token(t) {
                Some(principal) => return Ok(Caller { principal, peer }),
                None => "unknown bearer token".to_owned(),
            },
            None => match self.console.caller(headers).await {
                SessionCaller::Active(a) => {
                    let peer = format!("{peer} console session {}", a.tag);
                    match self
                        .config
                        .principals
                        .iter()
                        .find(|p| p.name == a.principal)
                    {
                        Some(principal) => return Ok(Caller { principal, peer }),
                        None => {
                            let reason = format!(
                                "the console session's principal {:?} is no longer configured",
                                a.principal
                            );
                            self.audit(None, &peer, action, None, false, Some(&reason))
                                .await;
                            return Err(ApiError(StatusCode::UNAUTHORIZED, reason));
                        }
                    }
                }
                SessionCaller::Expired => {
                    "the console session has ended (logged out or expired): log in again".to_owned()
                }
                SessionCaller::Unavailable(e) => {
                    return Err(ApiError(
                        StatusCode::SERVICE_UNAVAILABLE,
                        format!("the console's sessions cannot be read: {e}"),
                    ));
                }
                SessionCaller::None => "no bearer token".to_owned(),
            },
        };
        self.audit(None, &peer, action, None, false, Some(&refused))
            .await;
        Err(ApiError(
            StatusCode::UNAUTHORIZED,
            format!("{refused}: a control plane takes `Authorization: Bearer <token>`"),
        ))
    }

    /// The principal whose token is `token`.
    pub(super) fn principal_for_token(&self, token: &str) -> Option<&ControlPrincipal> {
        let hash: [u8; 32] = Sha256::digest(token.as_bytes()).into();
        self.config
            .principals
            .iter()
            .find(|p| constant_eq(&p.token_sha256, &hash))
    }

    /// Writes an audit entry; a failure is reported on stderr (the call goes on: the
    /// database that lost the entry would fail the call itself).
    async fn audit(
        &self,
        principal: Option<&str>,
        peer: &str,
        action: &str,
        target: Option<&str>,
        allowed: bool,
        detail: Option<&str>,
    ) {
        if let Err(e) = self
            .try_audit(principal, peer, action, target, allowed, detail)
            .await
        {
            eprintln!("portless control: audit entry not written: {e}");
        }
    }

    /// Writes an audit entry, or says why it could not.
    pub(super) async fn try_audit(
        &self,
        principal: Option<&str>,
        peer: &str,
        action: &str,
        target: Option<&str>,
        allowed: bool,
        detail: Option<&str>,
    ) -> Result<(), crate::store::StoreError> {
        let client = self.store.client().await?;
        client
            .execute(
                "INSERT INTO audit (principal, peer, action, target, allowed, detail) \
                 VALUES ($1, $2, $3, $4, $5, $6)",
                &[&principal, &peer, &action, &target, &allowed, &detail],
            )
            .await?;
        Ok(())
    }

    pub(super) async fn allowed(&self, caller: &Caller<'_>, action: &str, target: Option<&str>) {
        self.audit(
            Some(&caller.principal.name),
            &caller.peer,
            action,
            target,
            true,
            None,
        )
        .await;
    }

    /// Audits a denial and returns its error.
    pub(super) async fn deny(
        &self,
        caller: &Caller<'_>,
        action: &str,
        target: Option<&str>,
        error: ApiError,
    ) -> ApiError {
        self.audit(
            Some(&caller.principal.name),
            &caller.peer,
            action,
            target,
            false,
            Some(&error.1),
        )
        .await;
        error
    }

    /// Every registered VM, by host and name, with whether its host is offline.
    async fn fleet_vms(&self) -> ApiResult<Vec<(FleetVm, bool, serde_json::Value)>> {
        let offline = ms(self.config.host_offline_after);
        let client = self.store.client().await?;
        let rows = client
            .query(
                "SELECT v.host, v.name, v.labels, h.labels, \
                   h.heartbeat_at < now() - $1::bigint * interval '1 millisecond', v.info \
                 FROM vms v JOIN hosts h ON h.name = v.host ORDER BY v.host, v.name",
                &[&offline],
            )
            .await?;
        Ok(rows
            .iter()
            .map(|r| {
                let vm = FleetVm {
                    host: r.get(0),
                    name: r.get(1),
                    labels: merged_labels(&r.get(3), &r.get(2)),
                };
                (vm, r.get(4), r.get(5))
            })
            .collect())
    }

    /// The VMs `principal` may see, as `GET /v1/vms` shows them.
    pub(super) async fn visible_vms(&self, principal: &ControlPrincipal) -> ApiResult<Vec<VmInfo>> {
        Ok(self
            .fleet_vms()
            .await?
            .into_iter()
            .filter(|(vm, _, _)| principal.may_access(vm))
            .map(|(vm, offline, info)| {
                let mut info: VmInfo =
                    serde_json::from_value(info).unwrap_or_else(|_| VmInfo::unknown(""));
                info.name = vm.full_name();
                info.labels = vm.labels;
                if offline {
                    info.state = VmState::HostOffline;
                }
                info
            })
            .collect())
    }

    /// One VM as a selector sees it (its labels over its host's); a VM no longer registered
    /// has no labels.
    async fn fleet_vm(&self, host: &str, name: &str) -> ApiResult<FleetVm> {
        let client = self.store.client().await?;
        let row = client
            .query_opt(
                "SELECT v.labels, h.labels FROM vms v JOIN hosts h ON h.name = v.host \
                 WHERE v.host = $1 AND v.name = $2",
                &[&host, &name],
            )
            .await?;
        Ok(FleetVm {
            host: host.to_owned(),
            name: name.to_owned(),
            labels: row
                .map(|r| merged_labels(&r.get(1), &r.get(0)))
                .unwrap_or_default(),
        })
    }

    /// The record of an invocation the caller may read (404 for one it may not: a denied
    /// call learns nothing).
    pub(super) async fn readable(
        &self,
        caller: &Caller<'_>,
        action: &str,
        id: u64,
    ) -> ApiResult<ExecutionRecord> {
        let target = id.to_string();
        // The record and the labels its VM has now, in one round trip.
        let found = match i64::try_from(id) {
            Err(_) => None,
            Ok(id) => {
                let client = self.store.client().await?;
                client
                    .query_opt(
                        &format!(
                            "SELECT {RECORD_COLUMNS}, v.labels, h.labels FROM invocations i \
                             LEFT JOIN vms v ON v.host = i.host AND v.name = i.vm \
                             LEFT JOIN hosts h ON h.name = i.host WHERE i.id = $1"
                        ),
                        &[&id],
                    )
                    .await?
            }
        };
        let visible = found.as_ref().is_some_and(|r| {
            let rec = record_of(r);
            let vm = FleetVm {
                host: r.get(2),
                name: r.get(3),
                labels: match (
                    r.get::<_, Option<serde_json::Value>>(RECORD_FIELDS + 1),
                    r.get::<_, Option<serde_json::Value>>(RECORD_FIELDS),
                ) {
                    (Some(host), Some(own)) => merged_labels(&host, &own),
                    // A VM no longer registered has no labels.
                    _ => BTreeMap::new(),
                },
            };
            caller.principal.may_read(&rec) && caller.principal.may_access(&vm)
        });
        let found = found.as_ref().map(record_of);
        match found {
            Some(rec) if visible => {
                self.allowed(caller, action, Some(&target)).await;
                Ok(rec)
            }
            _ => Err(self
                .deny(
                    caller,
                    action,
                    Some(&target),
                    ApiError::not_found(format!("no execution {id}")),
                )
                .await),
        }
    }

    pub(super) async fn record(&self, id: u64) -> ApiResult<Option<ExecutionRecord>> {
        let Ok(id) = i64::try_from(id) else {
            return Ok(None);
        };
        let client = self.store.client().await?;
        let row = client
            .query_opt(
                &format!("SELECT {RECORD_COLUMNS} FROM invocations i WHERE i.id = $1"),
                &[&id],
            )
            .await?;
        Ok(row.as_ref().map(record_of))
    }
}

fn constant_eq(a: &[u8; 32], b: &[u8; 32]) -> bool {
    a.iter().zip(b).fold(0u8, |acc, (x, y)| acc | (x ^ y)) == 0
}

fn ms(d: Duration) -> i64 {
    i64::try_from(d.as_millis()).unwrap_or(i64::MAX)
}

fn merged_labels(host: &serde_json::Value, vm: &serde_json::Value) -> BTreeMap<String, String> {
    let mut labels: BTreeMap<String, String> =
        serde_json::from_value(host.clone()).unwrap_or_default();
    let own: BTreeMap<String, String> = serde_json::from_value(vm.clone()).unwrap_or_default();
    labels.extend(own);
    labels
}

/// How many columns [`RECORD_COLUMNS`] names (checked when compiling).
const RECORD_FIELDS: usize = 21;

const fn columns(list: &str) -> usize {
    let bytes = list.as_bytes();
    let (mut i, mut n) = (0, 1);
    while i < bytes.len() {
        if bytes[i] == b',' {
            n += 1;
        }
        i += 1;
    }
    n
}

const _: () = assert!(columns(RECORD_COLUMNS) == RECORD_FIELDS);

const RECORD_COLUMNS: &str = "i.id, i.principal, i.host, i.vm, i.command, i.args, i.state, \
    i.requested_at_ms, i.started_at_ms, i.finished_at_ms, i.duration_ms, i.exit_code, \
    i.signal, i.detail, i.agent_generation, i.agent_counter, i.output_cap, \
    i.stdout_stored, i.stdout_total, i.stderr_stored, i.stderr_total";

fn record_of(r: &tokio_postgres::Row) -> ExecutionRecord {
    let u = |i: usize| -> u64 { u64::try_from(r.get::<_, i64>(i)).unwrap_or(0) };
    let ou = |i: usize| -> Option<u64> {
        r.get::<_, Option<i64>>(i)
            .and_then(|v| u64::try_from(v).ok())
    };
    let o32 = |i: usize| -> Option<u32> {
        r.get::<_, Option<i64>>(i)
            .and_then(|v| u32::try_from(v).ok())
    };
    let host: String = r.get(2);
    let vm: String = r.get(3);
    let state: String = r.get(6);
    ExecutionRecord {
        id: ExecutionId(u(0)),
        principal: r.get(1),
        vm: format!("{host}/{vm}"),
        command: r.get(4),
        args: serde_json::from_value(r.get(5)).unwrap_or_default(),
        state: ExecState::from_name(&state).unwrap_or(ExecState::Unknown),
        requested_at_ms: u(7),
        started_at_ms: ou(8),
        finished_at_ms: ou(9),
        duration_ms: ou(10),
        exit_code: r.get(11),
        signal: r.get(12),
        detail: r.get(13),
        agent_generation: o32(14),
        agent_counter: o32(15),
        output_cap: u(16),
        stdout: StreamTotals::new(u(17), u(18)),
        stderr: StreamTotals::new(u(19), u(20)),
    }
}

type Peer = ConnectInfo<SocketAddr>;

async fn whoami(
    State(c): State<Arc<Control>>,
    ConnectInfo(peer): Peer,
    headers: HeaderMap,
) -> ApiResult<Json<Whoami>> {
    let caller = c.identify(peer, &headers, "whoami").await?;
    let p = caller.principal;
    Ok(Json(Whoami {
        principal: p.name.clone(),
        caller: caller.peer.clone(),
        rights: Rights {
            push: p.push,
            audit: p.audit,
            read_all: p.read_all,
            cancel_all: p.cancel_all,
        },
        fleet: true,
    }))
}

async fn hosts(
    State(c): State<Arc<Control>>,
    ConnectInfo(peer): Peer,
    headers: HeaderMap,
) -> ApiResult<Json<HostList>> {
    let caller = c.identify(peer, &headers, "list_hosts").await?;
    let vms = c.fleet_vms().await?;
    let mut seen: HashMap<String, usize> = HashMap::new();
    for (vm, _, _) in &vms {
        if caller.principal.may_access(vm) {
            *seen.entry(vm.host.clone()).or_default() += 1;
        }
    }
    let offline = ms(c.config.host_offline_after);
    let client = c.store.client().await?;
    let rows = client
        .query(
            "SELECT name, labels, software, boots, \
               (extract(epoch FROM now() - heartbeat_at) * 1000)::bigint, \
               heartbeat_at >= now() - $1::bigint * interval '1 millisecond' \
             FROM hosts ORDER BY name",
            &[&offline],
        )
        .await?;
    let hosts = rows
        .iter()
        .filter_map(|r| {
            let name: String = r.get(0);
            let count = *seen.get(&name)?;
            Some(HostInfo {
                labels: serde_json::from_value(r.get(1)).unwrap_or_default(),
                software: r.get(2),
                boots: u64::try_from(r.get::<_, i64>(3)).unwrap_or(0),
                heartbeat_age_ms: u64::try_from(r.get::<_, i64>(4)).unwrap_or(0),
                online: r.get(5),
                vms: count,
                name,
            })
        })
        .collect();
    c.allowed(&caller, "list_hosts", None).await;
    Ok(Json(HostList { hosts }))
}

async fn vms(
    State(c): State<Arc<Control>>,
    ConnectInfo(peer): Peer,
    headers: HeaderMap,
) -> ApiResult<Json<VmList>> {
    let caller = c.identify(peer, &headers, "list_vms").await?;
    let list = c.visible_vms(caller.principal).await?;
    c.allowed(&caller, "list_vms", None).await;
    Ok(Json(VmList { vms: list }))
}

/// `host/vm` of a path, or 404.
fn split_vm(vm: &str) -> ApiResult<(&str, &str)> {
    vm.split_once('/')
        .filter(|(h, v)| !h.is_empty() && !v.is_empty() && !v.contains('/'))
        .ok_or_else(|| {
            ApiError::not_found(format!("no vm {vm:?}: a control plane names VMs host/vm"))
        })
}

async fn commands(
    State(c): State<Arc<Control>>,
    ConnectInfo(peer): Peer,
    headers: HeaderMap,
    Path(vm): Path<String>,
) -> ApiResult<Json<CommandList>> {
    let caller = c.identify(peer, &headers, "list_commands").await?;
    let unknown = || ApiError::not_found(format!("no vm {vm:?}"));
    let Ok((host, name)) = split_vm(&vm) else {
        return Err(c.deny(&caller, "list_commands", Some(&vm), unknown()).await);
    };
    let client = c.store.client().await?;
    let row = client
        .query_opt(
            "SELECT v.commands, (extract(epoch FROM now() - v.commands_at) * 1000)::bigint \
             FROM vms v WHERE v.host = $1 AND v.name = $2",
            &[&host, &name],
        )
        .await?;
    drop(client);
    let fleet_vm = c.fleet_vm(host, name).await?;
    let Some(row) = row.filter(|_| caller.principal.may_access(&fleet_vm)) else {
        return Err(c.deny(&caller, "list_commands", Some(&vm), unknown()).await);
    };
    let Some(list) = row
        .get::<_, Option<serde_json::Value>>(0)
        .and_then(|v| serde_json::from_value::<CommandList>(v).ok())
    else {
        c.allowed(&caller, "list_commands", Some(&vm)).await;
        return Err(ApiError(
            StatusCode::SERVICE_UNAVAILABLE,
            format!("{vm}: its host has not reported the VM's commands yet"),
        ));
    };
    c.allowed(&caller, "list_commands", Some(&vm)).await;
    Ok(Json(CommandList {
        vm: vm.clone(),
        age_ms: row
            .get::<_, Option<i64>>(1)
            .and_then(|a| u64::try_from(a).ok())
            .unwrap_or(0)
            .saturating_add(list.age_ms),
        ..list
    }))
}

/// The request's fingerprint, to tell a repeated request from another under the same key.
fn fingerprint(body: &ExecRequest) -> String {
    let canonical = serde_json::json!([
        body.target,
        body.command,
        body.args,
        body.timeout_ms,
        body.max_concurrency.map(|l| l.to_string()),
        body.max_errors.map(|l| l.to_string()),
    ]);
    hex::encode(Sha256::digest(canonical.to_string().as_bytes()))
}

async fn exec(
    State(c): State<Arc<Control>>,
    ConnectInfo(peer): Peer,
    headers: HeaderMap,
    Json(body): Json<ExecRequest>,
) -> ApiResult<Json<ExecResponse>> {
    let caller = c.identify(peer, &headers, "exec").await?;
    let audit_target = format!("{}:{}", body.target, body.command);
    let deny = |e: ApiError| c.deny(&caller, "exec", Some(&audit_target), e);
    if !is_command_name(&body.command) {
        return Err(deny(ApiError::bad(format!(
            "command {:?}: a command name is 1 to 64 of A-Z a-z 0-9 . _ -",
            body.command
        )))
        .await);
    }
    if body.args.len() > MAX_ARGS || body.args.iter().any(|a| a.len() > MAX_ARG_LEN) {
        return Err(deny(ApiError::bad(format!(
            "at most {MAX_ARGS} arguments of at most {MAX_ARG_LEN} bytes each"
        )))
        .await);
    }
    if let Err(e) = check_key(body.idempotency_key.as_deref()) {
        return Err(deny(e).await);
    }
    if let Err(e) = Target::parse(&body.target) {
        return Err(deny(ApiError::bad(format!("target: {e}"))).await);
    }
    if !caller.principal.may_run(&body.command) {
        return Err(deny(ApiError::forbidden(format!(
            "principal {:?} may not run {:?}",
            caller.principal.name, body.command
        )))
        .await);
    }
    submit(&c, &caller, "exec", &audit_target, &body, None)
        .await
        .map(Json)
}

/// A push's program, by reference: its SHA-256 (stored in `programs`), the file name in the
/// guest, and whether to run it.
struct ProgramRef<'a> {
    sha256: &'a str,
    name: &'a str,
    run: bool,
}

/// Creates a command and its invocations (one per VM of the target the caller may use),
/// and wakes their hosts; or, for an idempotency key used before by the same request, the
/// first command's invocations.
async fn submit(
    c: &Control,
    caller: &Caller<'_>,
    action: &str,
    audit_target: &str,
    body: &ExecRequest,
    program: Option<ProgramRef<'_>>,
) -> ApiResult<ExecResponse> {
    let deny = |e: ApiError| c.deny(caller, action, Some(audit_target), e);
    let target = match Target::parse(&body.target) {
        Ok(t) => t,
        Err(e) => return Err(deny(ApiError::bad(format!("target: {e}"))).await),
    };
    let all = c.fleet_vms().await?;
    let visible: Vec<FleetVm> = all
        .iter()
        .filter(|(vm, _, _)| caller.principal.may_access(vm))
        .map(|(vm, _, _)| vm.clone())
        .collect();
    // A VM named outright that the caller may not see is as unknown as one that is not
    // there.
    let chosen = match target.select(&visible) {
        Ok(v) => v,
        Err(e) => return Err(deny(ApiError::not_found(e)).await),
    };
    let offline: HashMap<(String, String), bool> = all
        .iter()
        .map(|(vm, off, _)| ((vm.host.clone(), vm.name.clone()), *off))
        .collect();
    let total = chosen.len();
    let max_concurrency = body
        .max_concurrency
        .and_then(|l| l.concurrency_of(total))
        .map(|n| i32::try_from(n).unwrap_or(i32::MAX));
    let max_errors = body
        .max_errors
        .map(|l| i32::try_from(l.of(total)).unwrap_or(i32::MAX));
    let hash = match &program {
        Some(p) => fingerprint(body) + &format!(":{}:{}:{}", p.sha256, p.name, p.run),
        None => fingerprint(body),
    };
    let (sha, name, run) = match &program {
        Some(p) => (Some(p.sha256), Some(p.name), p.run),
        None => (None, None, false),
    };
    let deliver_ms = ms(c.config.delivery_timeout);
    let args = serde_json::to_value(&body.args).unwrap_or_default();
    let timeout = body.timeout_ms.map(i64::from);
    let (hosts, names, states): (Vec<String>, Vec<String>, Vec<&str>) = {
        let mut h = Vec::with_capacity(total);
        let mut n = Vec::with_capacity(total);
        let mut s = Vec::with_capacity(total);
        for vm in &chosen {
            h.push(vm.host.clone());
            n.push(vm.name.clone());
            let off = offline
                .get(&(vm.host.clone(), vm.name.clone()))
                .copied()
                .unwrap_or(false);
            s.push(if off { "delayed" } else { "pending" });
        }
        (h, n, s)
    };
    let mut client = c.store.client().await?;
    let tx = client.transaction().await?;
    let created = tx
        .query_opt(
            "INSERT INTO commands (idempotency_key, request_sha256, principal, target, command, \
               args, timeout_ms, max_concurrency, max_errors, deliver_by, invocations, \
               program, program_name, run) \
             VALUES ($1, $2, $3, $4, $5, $6, $7, $8, $9, \
               now() + $10::bigint * interval '1 millisecond', $11, $12, $13, $14) \
             ON CONFLICT (idempotency_key) DO NOTHING RETURNING id",
            &[
                &body.idempotency_key,
                &hash,
                &caller.principal.name,
                &body.target,
                &body.command,
                &args,
                &timeout,
                &max_concurrency,
                &max_errors,
                &deliver_ms,
                &i32::try_from(total).unwrap_or(i32::MAX),
                &sha,
                &name,
                &run,
            ],
        )
        .await?;
    let command_id: i64 = match created {
        Some(row) => row.get(0),
        None => {
            // The key was used before: the same request answers with its command.
            let row = tx
                .query_one(
                    "SELECT id, request_sha256, principal FROM commands \
                     WHERE idempotency_key = $1",
                    &[&body.idempotency_key],
                )
                .await?;
            let (id, earlier, principal): (i64, String, String) =
                (row.get(0), row.get(1), row.get(2));
            drop(tx);
            if earlier != hash || principal != caller.principal.name {
                return Err(deny(ApiError(
                    StatusCode::CONFLICT,
                    "idempotency_key was used by another request".into(),
                ))
                .await);
            }
            c.allowed(caller, action, Some(audit_target)).await;
            let invocations = c.invocations(id).await?;
            return Ok(exec_response(id, invocations));
        }
    };
    let rows = tx
        .query(
            "INSERT INTO invocations (command_id, host, vm, principal, command, args, \
               timeout_ms, state, requested_at_ms, deliver_by, program, program_name, run, \
               limited) \
             SELECT $1, h, v, $2, $3, $4, $5, s, \
               (extract(epoch FROM now()) * 1000)::bigint, \
               now() + $6::bigint * interval '1 millisecond', $10, $11, $12, $13 \
             FROM unnest($7::text[], $8::text[], $9::text[]) WITH ORDINALITY AS u(h, v, s, n) \
             ORDER BY n RETURNING id, host, vm, state",
            &[
                &command_id,
                &caller.principal.name,
                &body.command,
                &args,
                &timeout,
                &deliver_ms,
                &hosts,
                &names,
                &states,
                &sha,
                &name,
                &run,
                &(max_concurrency.is_some() || max_errors.is_some()),
            ],
        )
        .await?;
    let mut distinct: Vec<String> = hosts.iter().map(|h| host_channel(h)).collect();
    distinct.sort();
    distinct.dedup();
    tx.execute(
        "SELECT pg_notify(ch, '') FROM unnest($1::text[]) AS ch",
        &[&distinct],
    )
    .await?;
    tx.commit().await?;
    c.allowed(caller, action, Some(audit_target)).await;
    let invocations = rows
        .iter()
        .map(|r| {
            let (h, v, s): (String, String, String) = (r.get(1), r.get(2), r.get(3));
            Invocation {
                vm: format!("{h}/{v}"),
                id: ExecutionId(u64::try_from(r.get::<_, i64>(0)).unwrap_or(0)),
                state: ExecState::from_name(&s).unwrap_or(ExecState::Unknown),
            }
        })
        .collect();
    Ok(exec_response(command_id, invocations))
}

fn exec_response(command: i64, invocations: Vec<Invocation>) -> ExecResponse {
    ExecResponse {
        executions: invocations
            .into_iter()
            .map(|i| Dispatched {
                vm: i.vm,
                id: Some(i.id),
                state: i.state,
                error: None,
            })
            .collect(),
        skipped: Vec::new(),
        command: u64::try_from(command).ok(),
    }
}

impl Control {
    async fn invocations(&self, command: i64) -> ApiResult<Vec<Invocation>> {
        let client = self.store.client().await?;
        let rows = client
            .query(
                "SELECT id, host, vm, state FROM invocations WHERE command_id = $1 ORDER BY id",
                &[&command],
            )
            .await?;
        Ok(rows
            .iter()
            .map(|r| {
                let (h, v, s): (String, String, String) = (r.get(1), r.get(2), r.get(3));
                Invocation {
                    vm: format!("{h}/{v}"),
                    id: ExecutionId(u64::try_from(r.get::<_, i64>(0)).unwrap_or(0)),
                    state: ExecState::from_name(&s).unwrap_or(ExecState::Unknown),
                }
            })
            .collect())
    }
}

async fn command(
    State(c): State<Arc<Control>>,
    ConnectInfo(peer): Peer,
    headers: HeaderMap,
    Path(id): Path<u64>,
) -> ApiResult<Json<FleetCommand>> {
    let caller = c.identify(peer, &headers, "read_command").await?;
    let target = id.to_string();
    let row = match i64::try_from(id) {
        Ok(id) => {
            let client = c.store.client().await?;
            client
                .query_opt(
                    "SELECT id, principal, target, command, args, \
                       (extract(epoch FROM created_at) * 1000)::bigint, max_concurrency, \
                       max_errors FROM commands WHERE id = $1",
                    &[&id],
                )
                .await?
        }
        Err(_) => None,
    };
    let Some(row) =
        row.filter(|r| caller.principal.read_all || r.get::<_, String>(1) == caller.principal.name)
    else {
        return Err(c
            .deny(
                &caller,
                "read_command",
                Some(&target),
                ApiError::not_found(format!("no command {id}")),
            )
            .await);
    };
    let invocations = c.invocations(row.get(0)).await?;
    let mut states: BTreeMap<String, u64> = BTreeMap::new();
    for i in &invocations {
        *states.entry(i.state.as_str().to_owned()).or_default() += 1;
    }
    c.allowed(&caller, "read_command", Some(&target)).await;
    let limit = |i: usize| {
        row.get::<_, Option<i32>>(i)
            .and_then(|n| usize::try_from(n).ok())
            .map(Limit::Count)
    };
    Ok(Json(FleetCommand {
        id,
        principal: row.get(1),
        target: row.get(2),
        command: row.get(3),
        args: serde_json::from_value(row.get(4)).unwrap_or_default(),
        created_at_ms: u64::try_from(row.get::<_, i64>(5)).unwrap_or(0),
        max_concurrency: limit(6),
        max_errors: limit(7),
        // Counted from the invocations: the command's own counters are kept only for its
        // limits.
        active: invocations
            .iter()
            .filter(|i| matches!(i.state, ExecState::InProgress | ExecState::Running))
            .count() as u64,
        errors: invocations.iter().filter(|i| i.state.is_error()).count() as u64,
        invocations,
        states,
    }))
}

#[derive(Deserialize)]
pub(super) struct ListQuery {
    vm: Option<String>,
    state: Option<String>,
    command: Option<String>,
    principal: Option<String>,
    since_ms: Option<u64>,
    until_ms: Option<u64>,
    before: Option<u64>,
    limit: Option<usize>,
}

async fn list_executions(
    State(c): State<Arc<Control>>,
    ConnectInfo(peer): Peer,
    headers: HeaderMap,
    Query(q): Query<ListQuery>,
) -> ApiResult<Json<ExecutionList>> {
    let caller = c.identify(peer, &headers, "list_executions").await?;
    if let Some(s) = &q.state
        && ExecState::from_name(s).is_none()
    {
        return Err(ApiError::bad(format!("unknown state \"{s}\"")));
    }
    let (host, vm) = match q.vm.as_deref().map(split_vm) {
        Some(Ok((h, v))) => (Some(h.to_owned()), Some(v.to_owned())),
        Some(Err(e)) => return Err(ApiError::bad(e.1)),
        None => (None, None),
    };
    let want = q.limit.unwrap_or(100).min(10_000);
    let principal = match (&q.principal, caller.principal.read_all) {
        (p, true) => p.clone(),
        (Some(p), false) if *p != caller.principal.name => {
            // Only their own: nothing of another principal's.
            c.allowed(&caller, "list_executions", None).await;
            return Ok(Json(ExecutionList::default()));
        }
        (_, false) => Some(caller.principal.name.clone()),
    };
    let i = |v: Option<u64>| v.and_then(|v| i64::try_from(v).ok());
    let mut before = i(q.before);
    let mut out = Vec::new();
    let client = c.store.client().await?;
    let mut labels: HashMap<(String, String), FleetVm> = HashMap::new();
    while out.len() < want {
        let page = client
            .query(
                &format!(
                    "SELECT {RECORD_COLUMNS} FROM invocations i \
                     WHERE ($1::text IS NULL OR i.host = $1) AND ($2::text IS NULL OR i.vm = $2) \
                     AND ($3::text IS NULL OR i.state = $3) \
                     AND ($4::text IS NULL OR i.command = $4) \
                     AND ($5::text IS NULL OR i.principal = $5) \
                     AND ($6::bigint IS NULL OR i.requested_at_ms >= $6) \
                     AND ($7::bigint IS NULL OR i.requested_at_ms < $7) \
                     AND ($8::bigint IS NULL OR i.id < $8) \
                     ORDER BY i.id DESC LIMIT $9"
                ),
                &[
                    &host,
                    &vm,
                    &q.state,
                    &q.command,
                    &principal,
                    &i(q.since_ms),
                    &i(q.until_ms),
                    &before,
                    &i64::try_from(want.max(100)).unwrap_or(100),
                ],
            )
            .await?;
        let Some(last) = page.last() else { break };
        before = Some(last.get(0));
        for row in &page {
            let rec = record_of(row);
            let (h, v): (String, String) = (row.get(2), row.get(3));
            let key = (h.clone(), v.clone());
            if !labels.contains_key(&key) {
                labels.insert(key.clone(), c.fleet_vm(&h, &v).await?);
            }
            if labels
                .get(&key)
                .is_some_and(|vm| caller.principal.may_access(vm))
            {
                out.push(rec);
            }
        }
    }
    out.truncate(want);
    c.allowed(&caller, "list_executions", None).await;
    Ok(Json(ExecutionList { executions: out }))
}

async fn execution(
    State(c): State<Arc<Control>>,
    ConnectInfo(peer): Peer,
    headers: HeaderMap,
    Path(id): Path<u64>,
) -> ApiResult<Json<ExecutionRecord>> {
    let caller = c.identify(peer, &headers, "read_execution").await?;
    Ok(Json(c.readable(&caller, "read_execution", id).await?))
}

#[derive(Deserialize)]
pub(super) struct WaitQuery {
    timeout_ms: Option<u64>,
}

/// How often a wait or follow looks at the database.
pub(super) const POLL: Duration = Duration::from_millis(100);

async fn wait(
    State(c): State<Arc<Control>>,
    ConnectInfo(peer): Peer,
    headers: HeaderMap,
    Path(id): Path<u64>,
    Query(q): Query<WaitQuery>,
) -> ApiResult<Json<ExecutionRecord>> {
    let caller = c.identify(peer, &headers, "read_execution").await?;
    let mut rec = c.readable(&caller, "read_execution", id).await?;
    let deadline = tokio::time::Instant::now()
        + Duration::from_millis(q.timeout_ms.unwrap_or(30_000).min(300_000));
    while !rec.state.is_final() && tokio::time::Instant::now() < deadline {
        tokio::time::sleep(POLL).await;
        match c.record(id).await? {
            Some(r) => rec = r,
            None => break,
        }
    }
    Ok(Json(rec))
}

#[derive(Deserialize)]
pub(super) struct OutputQuery {
    stream: Option<String>,
    offset: Option<u64>,
    limit: Option<usize>,
}

fn stream_of(s: Option<&str>) -> ApiResult<Stream> {
    match s.unwrap_or("stdout") {
        "stdout" => Ok(Stream::Stdout),
        "stderr" => Ok(Stream::Stderr),
        other => Err(ApiError::bad(format!(
            "stream is stdout or stderr, not \"{other}\""
        ))),
    }
}

/// Up to `max` bytes of a stream from `offset`, as far as the database holds it
/// (`stored`).
pub(super) async fn read_output(
    c: &Control,
    id: u64,
    stream: Stream,
    offset: u64,
    max: usize,
    stored: u64,
) -> ApiResult<Vec<u8>> {
    let start = offset.min(stored);
    let end = start
        .saturating_add(u64::try_from(max).unwrap_or(u64::MAX))
        .min(stored);
    let mut data = Vec::new();
    if start >= end {
        return Ok(data);
    }
    let code: i16 = match stream {
        Stream::Stdout => 0,
        Stream::Stderr => 1,
    };
    let (id, s, e) = (
        i64::try_from(id).unwrap_or(i64::MAX),
        i64::try_from(start).unwrap_or(i64::MAX),
        i64::try_from(end).unwrap_or(i64::MAX),
    );
    let client = c.store.client().await?;
    let rows = client
        .query(
            "SELECT \"offset\", data FROM output WHERE invocation = $1 AND stream = $2 \
             AND \"offset\" < $4 AND \"offset\" >= (SELECT COALESCE(MAX(\"offset\"), 0) \
               FROM output WHERE invocation = $1 AND stream = $2 AND \"offset\" <= $3) \
             ORDER BY \"offset\"",
            &[&id, &code, &s, &e],
        )
        .await?;
    for row in rows {
        let at = start + data.len() as u64;
        let chunk_offset = u64::try_from(row.get::<_, i64>(0)).unwrap_or(0);
        let chunk: &[u8] = row.get(1);
        let from = usize::try_from(at.saturating_sub(chunk_offset)).unwrap_or(usize::MAX);
        if chunk_offset > at || from >= chunk.len() {
            break;
        }
        let want = usize::try_from(end - at).unwrap_or(usize::MAX);
        let take = (chunk.len() - from).min(want);
        data.extend_from_slice(&chunk[from..from + take]);
        if data.len() as u64 >= end - start {
            break;
        }
    }
    Ok(data)
}

async fn output(
    State(c): State<Arc<Control>>,
    ConnectInfo(peer): Peer,
    headers: HeaderMap,
    Path(id): Path<u64>,
    Query(q): Query<OutputQuery>,
) -> ApiResult<Response> {
    let caller = c.identify(peer, &headers, "read_execution").await?;
    let rec = c.readable(&caller, "read_execution", id).await?;
    let stream = stream_of(q.stream.as_deref())?;
    let totals = rec.totals(stream);
    let data = read_output(
        &c,
        id,
        stream,
        q.offset.unwrap_or(0),
        q.limit.unwrap_or(usize::MAX),
        totals.stored_len,
    )
    .await?;
    let mut response = ([(header::CONTENT_TYPE, "application/octet-stream")], data).into_response();
    for (name, value) in output_headers::of(&totals) {
        if let Ok(value) = header::HeaderValue::from_str(&value) {
            response
                .headers_mut()
                .insert(header::HeaderName::from_static(name), value);
        }
    }
    Ok(response)
}

async fn follow(
    State(c): State<Arc<Control>>,
    ConnectInfo(peer): Peer,
    headers: HeaderMap,
    Path(id): Path<u64>,
) -> ApiResult<Response> {
    let caller = c.identify(peer, &headers, "read_execution").await?;
    c.readable(&caller, "read_execution", id).await?;
    let slot = c.stream_slot(&caller.principal.name)?;
    let (tx, rx) = tokio::sync::mpsc::channel::<Result<Bytes, std::io::Error>>(16);
    tokio::spawn(async move {
        let _slot = slot;
        let mut offsets = [0u64; 2];
        loop {
            // The state before the output, so that output that came with the end is sent
            // before the end line.
            let rec = match c.record(id).await {
                Ok(Some(r)) => r,
                Ok(None) => return,
                Err(_) => {
                    tokio::time::sleep(POLL * 5).await;
                    continue;
                }
            };
            for (k, stream) in [(0, Stream::Stdout), (1, Stream::Stderr)] {
                let stored = rec.totals(stream).stored_len;
                while offsets[k] < stored {
                    let Ok(data) =
                        read_output(&c, id, stream, offsets[k], FOLLOW_CHUNK, stored).await
                    else {
                        break;
                    };
                    if data.is_empty() {
                        break;
                    }
                    let line = FollowLine::output(stream, offsets[k], &data).to_line();
                    offsets[k] += data.len() as u64;
                    if tx.send(Ok(Bytes::from(line))).await.is_err() {
                        return;
                    }
                }
            }
            if rec.state.is_final()
                && offsets[0] >= rec.stdout.stored_len
                && offsets[1] >= rec.stderr.stored_len
            {
                let _ = tx
                    .send(Ok(Bytes::from(FollowLine::end(rec).to_line())))
                    .await;
                return;
            }
            tokio::select! {
                () = tokio::time::sleep(POLL) => {}
                () = tx.closed() => return,
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
    State(c): State<Arc<Control>>,
    ConnectInfo(peer): Peer,
    headers: HeaderMap,
    Path(id): Path<u64>,
) -> ApiResult<Response> {
    let caller = c.identify(peer, &headers, "cancel").await?;
    let target = id.to_string();
    let found = c.record(id).await?;
    let may = match &found {
        Some(rec) => {
            let (host, vm) = rec.vm.split_once('/').unwrap_or(("", ""));
            (caller.principal.cancel_all || rec.principal == caller.principal.name)
                && caller.principal.may_access(&c.fleet_vm(host, vm).await?)
        }
        None => false,
    };
    let rec = match found {
        Some(rec) if may => rec,
        _ => {
            return Err(c
                .deny(
                    &caller,
                    "cancel",
                    Some(&target),
                    ApiError::not_found(format!("no execution {id}")),
                )
                .await);
        }
    };
    if rec.state.is_final() {
        c.allowed(&caller, "cancel", Some(&target)).await;
        return Err(ApiError(
            StatusCode::CONFLICT,
            format!("execution {id} already ended ({})", rec.state.as_str()),
        ));
    }
    let client = c.store.client().await?;
    let row = client
        .query_opt(
            "UPDATE invocations SET cancel_requested = true, \
               state = CASE WHEN state IN ('pending', 'delayed') THEN 'cancelled' ELSE state END, \
               finished_at_ms = CASE WHEN state IN ('pending', 'delayed') \
                 THEN (extract(epoch FROM clock_timestamp()) * 1000)::bigint \
                 ELSE finished_at_ms END, \
               detail = CASE WHEN state IN ('pending', 'delayed') \
                 THEN 'cancelled before its host took it' ELSE detail END \
             WHERE id = $1 AND state IN ('pending', 'delayed', 'in_progress', 'running') \
             RETURNING state, host",
            &[&i64::try_from(id).unwrap_or(i64::MAX)],
        )
        .await?;
    c.allowed(&caller, "cancel", Some(&target)).await;
    let Some(row) = row else {
        let now = c.record(id).await?.map_or(ExecState::Unknown, |r| r.state);
        return Err(ApiError(
            StatusCode::CONFLICT,
            format!("execution {id} already ended ({now})"),
        ));
    };
    let (state, host): (String, String) = (row.get(0), row.get(1));
    // The host learns of it at once, or at its next heartbeat.
    let _ = client
        .execute("SELECT pg_notify($1, '')", &[&host_channel(&host)])
        .await;
    Ok((
        StatusCode::ACCEPTED,
        Json(CancelResponse {
            id: ExecutionId(id),
            state: ExecState::from_name(&state).unwrap_or(ExecState::Unknown),
        }),
    )
        .into_response())
}

#[derive(Deserialize)]
pub(super) struct AuditParams {
    principal: Option<String>,
    action: Option<String>,
    allowed: Option<bool>,
    since_ms: Option<u64>,
    limit: Option<usize>,
    order: Option<String>,
}

async fn audit(
    State(c): State<Arc<Control>>,
    ConnectInfo(peer): Peer,
    headers: HeaderMap,
    Query(q): Query<AuditParams>,
) -> ApiResult<Json<AuditLog>> {
    let caller = c.identify(peer, &headers, "read_audit").await?;
    if !caller.principal.audit {
        return Err(c
            .deny(
                &caller,
                "read_audit",
                None,
                ApiError::forbidden(format!(
                    "principal {:?} may not read the audit log",
                    caller.principal.name
                )),
            )
            .await);
    }
    let newest = match q.order.as_deref() {
        None | Some("oldest") => false,
        Some("newest") => true,
        Some(o) => {
            return Err(ApiError::bad(format!(
                "order is oldest or newest, not {o:?}"
            )));
        }
    };
    c.allowed(&caller, "read_audit", None).await;
    let limit = i64::try_from(q.limit.unwrap_or(1000).min(10_000)).unwrap_or(1000);
    let since = q.since_ms.and_then(|v| i64::try_from(v).ok());
    let client = c.store.client().await?;
    let rows = client
        .query(
            &format!(
                "SELECT id, (extract(epoch FROM at) * 1000)::bigint, principal, peer, action, \
                   target, allowed, detail FROM audit \
                 WHERE ($1::text IS NULL OR principal = $1) AND ($2::text IS NULL OR action = $2) \
                 AND ($3::boolean IS NULL OR allowed = $3) \
                 AND ($4::bigint IS NULL OR at >= to_timestamp($4 / 1000.0)) \
                 ORDER BY id {} LIMIT $5",
                if newest { "DESC" } else { "ASC" }
            ),
            &[&q.principal, &q.action, &q.allowed, &since, &limit],
        )
        .await?;
    let entries = rows
        .iter()
        .map(|r| AuditRecord {
            id: u64::try_from(r.get::<_, i64>(0)).unwrap_or(0),
            entry: AuditEntry {
                at_ms: u64::try_from(r.get::<_, i64>(1)).unwrap_or(0),
                principal: r.get(2),
                caller: r.get(3),
                action: r.get(4),
                target: r.get(5),
                allowed: r.get(6),
                reason: r.get(7),
                count: 1,
            },
        })
        .collect();
    Ok(Json(AuditLog { entries }))
}

/// A file name in the guest: not empty, no `/`, not hidden, at most 255 bytes.
fn check_program_name(name: &str) -> ApiResult<()> {
    if name.is_empty() || name.len() > 255 || name.contains('/') || name.starts_with('.') {
        return Err(ApiError::bad(format!(
            "bad program name {name:?}: a file name, not a path"
        )));
    }
    Ok(())
}

/// Stores a program by its SHA-256 (once, however often it is uploaded).
async fn store_program(c: &Control, data: &[u8]) -> ApiResult<ProgramInfo> {
    let sha256 = hex::encode(Sha256::digest(data));
    let size = i64::try_from(data.len()).unwrap_or(i64::MAX);
    let client = c.store.client().await?;
    client
        .execute(
            "INSERT INTO programs (sha256, size, data) VALUES ($1, $2, $3) \
             ON CONFLICT (sha256) DO NOTHING",
            &[&sha256, &size, &data],
        )
        .await?;
    Ok(ProgramInfo {
        sha256,
        size: data.len() as u64,
    })
}

impl Control {
    async fn may_push(&self, caller: &Caller<'_>, action: &str, target: &str) -> ApiResult<()> {
        if caller.principal.push {
            return Ok(());
        }
        Err(self
            .deny(
                caller,
                action,
                Some(target),
                ApiError::forbidden(format!(
                    "principal {:?} may not push programs",
                    caller.principal.name
                )),
            )
            .await)
    }
}

async fn upload(
    State(c): State<Arc<Control>>,
    ConnectInfo(peer): Peer,
    headers: HeaderMap,
    body: Bytes,
) -> ApiResult<Response> {
    let caller = c.identify(peer, &headers, "upload_program").await?;
    c.may_push(&caller, "upload_program", "-").await?;
    let info = store_program(&c, &body).await?;
    c.allowed(&caller, "upload_program", Some(&info.sha256))
        .await;
    Ok((StatusCode::CREATED, Json(info)).into_response())
}

/// An idempotency key is 1 to [`MAX_KEY_LEN`] bytes.
fn check_key(key: Option<&str>) -> ApiResult<()> {
    match key {
        Some(k) if k.is_empty() || k.len() > MAX_KEY_LEN => Err(ApiError::bad(format!(
            "idempotency_key: 1 to {MAX_KEY_LEN} bytes"
        ))),
        _ => Ok(()),
    }
}

async fn push(
    State(c): State<Arc<Control>>,
    ConnectInfo(peer): Peer,
    headers: HeaderMap,
    Json(body): Json<FleetPush>,
) -> ApiResult<Json<ExecResponse>> {
    let caller = c.identify(peer, &headers, "push").await?;
    let audit_target = format!("{}:{}", body.target, body.name);
    c.may_push(&caller, "push", &audit_target).await?;
    if let Err(e) = check_program_name(&body.name).and(check_key(body.idempotency_key.as_deref())) {
        return Err(c.deny(&caller, "push", Some(&audit_target), e).await);
    }
    let client = c.store.client().await?;
    let known = client
        .query_opt("SELECT 1 FROM programs WHERE sha256 = $1", &[&body.sha256])
        .await?;
    drop(client);
    if known.is_none() {
        let e = ApiError::not_found(format!(
            "no program {:?}: upload it first (POST /v1/programs)",
            body.sha256
        ));
        return Err(c.deny(&caller, "push", Some(&audit_target), e).await);
    }
    let request = ExecRequest {
        target: body.target.clone(),
        command: format!("push:{}", body.name),
        args: Vec::new(),
        timeout_ms: body.timeout_ms,
        max_concurrency: body.max_concurrency,
        max_errors: body.max_errors,
        idempotency_key: body.idempotency_key.clone(),
    };
    let program = ProgramRef {
        sha256: &body.sha256,
        name: &body.name,
        run: body.run,
    };
    submit(&c, &caller, "push", &audit_target, &request, Some(program))
        .await
        .map(Json)
}

#[derive(Deserialize)]
pub(super) struct PushQuery {
    name: String,
    #[serde(default)]
    run: bool,
    timeout_ms: Option<u32>,
}

/// The host API's push to one VM (what `portless push` sends): the program is stored by
/// reference and pushed as a one-VM push; the answer comes once the guest stored it (or
/// started it, with `run`), as a daemon's does.
async fn push_one(
    State(c): State<Arc<Control>>,
    ConnectInfo(peer): Peer,
    headers: HeaderMap,
    Path(vm): Path<String>,
    Query(q): Query<PushQuery>,
    body: Bytes,
) -> ApiResult<Json<PushResponse>> {
    let caller = c.identify(peer, &headers, "push").await?;
    let audit_target = format!("{vm}:{}", q.name);
    c.may_push(&caller, "push", &audit_target).await?;
    if let Err(e) = check_program_name(&q.name).and(split_vm(&vm).map(drop)) {
        return Err(c.deny(&caller, "push", Some(&audit_target), e).await);
    }
    let info = store_program(&c, &body).await?;
    let request = ExecRequest {
        target: vm.clone(),
        command: format!("push:{}", q.name),
        args: Vec::new(),
        timeout_ms: q.timeout_ms,
        max_concurrency: None,
        max_errors: None,
        idempotency_key: None,
    };
    let program = ProgramRef {
        sha256: &info.sha256,
        name: &q.name,
        run: q.run,
    };
    let answer = submit(&c, &caller, "push", &audit_target, &request, Some(program)).await?;
    let id = answer
        .executions
        .first()
        .and_then(|d| d.id)
        .ok_or_else(|| ApiError(StatusCode::INTERNAL_SERVER_ERROR, "no invocation".into()))?;
    // Until the guest has it: stored (final), or started (running or final).
    let deadline = tokio::time::Instant::now() + c.config.delivery_timeout;
    let rec = loop {
        let rec = c
            .record(id.0)
            .await?
            .ok_or_else(|| ApiError::not_found(format!("no execution {id}")))?;
        let started = q.run && rec.state == ExecState::Running;
        if rec.state.is_final() || started {
            break rec;
        }
        if tokio::time::Instant::now() >= deadline {
            return Err(ApiError(
                StatusCode::GATEWAY_TIMEOUT,
                format!(
                    "execution {id}: its host has not delivered the push yet ({})",
                    rec.state
                ),
            ));
        }
        tokio::time::sleep(POLL).await;
    };
    let failed = matches!(
        rec.state,
        ExecState::Rejected
            | ExecState::Undeliverable
            | ExecState::AgentLost
            | ExecState::DeliveryTimedOut
            | ExecState::HostLost
            | ExecState::Cancelled
    ) || (!q.run && rec.state != ExecState::Succeeded);
    let outcome = if failed {
        PushOutcome::Failed
    } else if q.run {
        PushOutcome::Started
    } else {
        PushOutcome::Stored
    };
    Ok(Json(PushResponse {
        vm,
        name: q.name,
        size: info.size,
        sha256: info.sha256,
        outcome,
        execution: (q.run && !failed).then_some(id),
        error: failed.then(|| rec.detail.unwrap_or_else(|| rec.state.to_string())),
    }))
}
