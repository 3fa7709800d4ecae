//! `POST /v1/vms/{vm}/push`: a program spooled to disk as it arrives, then streamed into
//! the guest by the VM's driver.

use std::sync::Arc;

use axum::Json;
use axum::body::Body;
use axum::extract::{ConnectInfo, Path, Query, State};
use axum::http::{HeaderMap, StatusCode, header};
use portless_api::{PushOutcome, PushResponse};
use serde::Deserialize;
use tokio::sync::oneshot;

use super::identify::Peer;
use super::policy::Action;
use super::{
    ApiError, ApiResult, App, MAX_PUSH_BYTES, answer_within, now_ms, refuse_if_disk_full, write,
};
use crate::records::{Done, ExecState, Finish, NewExecution, Op};
use crate::vm::{Program, Request};

#[derive(Deserialize)]
pub(super) struct PushQuery {
    name: String,
    #[serde(default)]
    run: bool,
    timeout_ms: Option<u32>,
}

pub(super) async fn push(
    State(app): State<Arc<App>>,
    ConnectInfo(peer): ConnectInfo<Peer>,
    headers: HeaderMap,
    Path(vm): Path<String>,
    Query(q): Query<PushQuery>,
    body: Body,
) -> ApiResult<Json<PushResponse>> {
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
            fleet_invocation: None,
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
    let (outcome, error) = match outcome {
        ring_protocol::message::PushOutcome::Stored => (PushOutcome::Stored, None),
        ring_protocol::message::PushOutcome::Started(_) => (PushOutcome::Started, None),
        ring_protocol::message::PushOutcome::Failed(r) => {
            (PushOutcome::Failed, Some(crate::vm::rejection_text(&r)))
        }
    };
    Ok(Json(PushResponse {
        vm,
        name: q.name,
        size,
        sha256,
        outcome,
        execution: run.filter(|_| outcome == PushOutcome::Started),
        error,
    }))
}

/// The directory pushed programs are spooled to, below the state directory.
pub const SPOOL_DIR: &str = "spool";

/// Writes a push's body to a new file in the spool directory, unlinked at once (the driver
/// reads it through its descriptor; nothing is left behind however the daemon ends), with
/// its size and SHA-256. More than [`MAX_PUSH_BYTES`] is refused (413) as soon as it is
/// known: from `Content-Length`, else while reading.
pub(super) async fn spool(app: &App, headers: &HeaderMap, body: Body) -> ApiResult<Program> {
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
