//! The execution routes: `POST /v1/exec`, and an execution's record, wait, output, follow
//! stream and cancel.

use std::collections::BTreeMap;
use std::sync::Arc;
use std::time::Duration;

use axum::Json;
use axum::body::{Body, Bytes};
use axum::extract::{ConnectInfo, Path, Query, State};
use axum::http::{HeaderMap, StatusCode, header};
use axum::response::{IntoResponse, Response};
use portless_api::{
    CancelResponse, Dispatched, ExecRequest, ExecResponse, ExecutionList, FollowLine,
    events::FOLLOW_CHUNK, is_command_name, output_headers,
};
use serde::Deserialize;
use tokio::sync::{Semaphore, broadcast, oneshot};

use super::identify::Peer;
use super::policy::Action;
use super::{
    ApiError, ApiResult, App, answer, answer_within, now_ms, read, refuse_if_disk_full, write,
};
use crate::config::{Target, VmConfig};
use crate::records::{Done, ExecState, ExecutionId, ExecutionRecord, NewExecution, Op, Stream};
use crate::vm::{Request, VmEvent};

pub(super) async fn exec(
    State(app): State<Arc<App>>,
    ConnectInfo(peer): ConnectInfo<Peer>,
    headers: HeaderMap,
    Json(body): Json<ExecRequest>,
) -> ApiResult<Json<ExecResponse>> {
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
    let total = vms.len();
    let concurrency = body.max_concurrency.and_then(|l| l.concurrency_of(total));
    let max_errors = body.max_errors.map(|l| l.of(total));
    let bounded = concurrency.is_some();
    let limit = concurrency
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
        if max_errors.is_some_and(|max| errors.load(std::sync::atomic::Ordering::Relaxed) > max) {
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
            let d = dispatch(&app2, &name, &principal, command, args, timeout, None).await;
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
                Some(id) if bounded && !refused => !wait_final(&app2, id, None)
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
    Ok(Json(ExecResponse {
        executions,
        skipped,
        command: None,
    }))
}

/// Records and sends one exec (for fleet invocation `fleet_invocation`, when a control plane
/// asked for it); returns once the agent accepted or refused it.
pub(crate) async fn dispatch(
    app: &App,
    vm: &str,
    principal: &str,
    command: String,
    args: Vec<String>,
    timeout_ms: Option<u32>,
    fleet_invocation: Option<u64>,
) -> Dispatched {
    let new = NewExecution {
        principal: principal.to_owned(),
        vm: vm.to_owned(),
        command: command.clone(),
        args: args.clone(),
        requested_at_ms: now_ms(),
        fleet_invocation,
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
            id: Some(id),
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
        id: Some(id),
        state,
        error: result.err().map(|e| e.1),
    }
}

/// Waits until execution `id` is final (or `limit` passes); the record then.
pub(super) async fn wait_final(
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

pub(super) async fn list_executions(
    State(app): State<Arc<App>>,
    ConnectInfo(peer): ConnectInfo<Peer>,
    headers: HeaderMap,
    Query(q): Query<ListQuery>,
) -> ApiResult<Json<ExecutionList>> {
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
    let mut before = q.before.map(ExecutionId);
    while list.len() < want {
        let filter = crate::records::ExecutionQuery {
            vm: q.vm.clone(),
            principal: q.principal.clone(),
            state,
            command: q.command.clone(),
            since_ms: q.since_ms,
            until_ms: q.until_ms,
            before,
            limit: Some(want.max(100)),
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
    Ok(Json(ExecutionList { executions: list }))
}

pub(super) async fn execution(
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
pub(super) struct WaitQuery {
    timeout_ms: Option<u64>,
}

pub(super) async fn wait(
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
pub(super) struct OutputQuery {
    stream: Option<String>,
    offset: Option<u64>,
    limit: Option<usize>,
}

pub(super) fn stream_of(s: Option<&str>) -> ApiResult<Stream> {
    match s.unwrap_or("stdout") {
        "stdout" => Ok(Stream::Stdout),
        "stderr" => Ok(Stream::Stderr),
        other => Err(ApiError::bad(format!(
            "stream is stdout or stderr, not \"{other}\""
        ))),
    }
}

pub(super) async fn output(
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
    let totals = portless_api::StreamTotals {
        stored_len: slice.stored_len,
        total_len: slice.total_len,
        truncated: slice.truncated,
    };
    Ok(output_response(&totals, slice.data))
}

/// `GET .../output`'s answer: the bytes, with the stream's totals in headers.
pub(crate) fn output_response(totals: &portless_api::StreamTotals, data: Vec<u8>) -> Response {
    let mut response = ([(header::CONTENT_TYPE, "application/octet-stream")], data).into_response();
    for (name, value) in output_headers::of(totals) {
        if let Ok(value) = header::HeaderValue::from_str(&value) {
            response
                .headers_mut()
                .insert(header::HeaderName::from_static(name), value);
        }
    }
    response
}

pub(super) async fn follow(
    State(app): State<Arc<App>>,
    ConnectInfo(peer): ConnectInfo<Peer>,
    headers: HeaderMap,
    Path(id): Path<u64>,
) -> ApiResult<Response> {
    let (_, principal) = app
        .authorize_execution(&peer, &headers, &Action::ReadExecution, id)
        .await?;
    let slot = app.follow_slot(principal)?;
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
            for (k, stream) in [(0, Stream::Stdout), (1, Stream::Stderr)] {
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
                    let line = FollowLine::output(stream, offsets[k], &slice.data).to_line();
                    offsets[k] += slice.data.len() as u64;
                    if tx.send(Ok(Bytes::from(line))).await.is_err() {
                        return;
                    }
                }
            }
            if rec.state.is_final() {
                let line = FollowLine::end(rec).to_line();
                let _ = tx.send(Ok(Bytes::from(line))).await;
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

pub(super) async fn cancel(
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
        Json(CancelResponse {
            id: ExecutionId(id),
            state: rec.state,
        }),
    )
        .into_response())
}
