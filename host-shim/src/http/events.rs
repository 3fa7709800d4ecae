//! `GET /v1/events`: server-sent events of the VMs a caller may see and of the executions
//! it asks for, over one connection (`portless_api::stream` defines them).
//!
//! The caller is identified first; every execution it names is then authorized as a read
//! of that execution (audited one by one), and one it may not read is "no execution" (404)
//! for the whole request. The stream counts as one follow of the principal
//! (`callers.follows_per_principal`). Each output and end event's id is the cursor of
//! every execution of the stream, so a client that reconnects with `Last-Event-ID` gets
//! exactly what it had not: nothing lost, nothing twice. The stream ends when every
//! execution it follows has ended and no VM states were asked for; otherwise when the
//! client goes away or the daemon stops.

use std::collections::BTreeMap;
use std::sync::Arc;
use std::time::Duration;

use axum::body::{Body, Bytes};
use axum::extract::{ConnectInfo, RawQuery, State};
use axum::http::{HeaderMap, header};
use axum::response::{IntoResponse, Response};
use portless_api::events::FOLLOW_CHUNK;
use portless_api::stream::{KEEP_ALIVE_S, RETRY_MS};
use portless_api::{
    Cursor, EventsRequest, ExecState, ExecutionId, Position, Stream, StreamEvent, VmInfo,
};
use tokio::sync::{broadcast, mpsc};

use super::identify::Peer;
use super::policy::{Action, Principal};
use super::{ApiError, ApiResult, App, read};
use crate::vm::VmEvent;

/// How often the VMs' states are compared with what was last sent, beside the drivers'
/// own state-change events (the running count and the agent's version change without
/// one).
const VM_RESCAN: Duration = Duration::from_secs(1);

pub(super) async fn events(
    State(app): State<Arc<App>>,
    ConnectInfo(peer): ConnectInfo<Peer>,
    headers: HeaderMap,
    RawQuery(query): RawQuery,
) -> ApiResult<Response> {
    // Identified before the query is looked at, so that a stranger learns nothing.
    let principal = app
        .authorize(
            &peer,
            &headers,
            &Action::ListVms,
            None,
            Some("events".into()),
        )
        .await?;
    let ask = EventsRequest::from_query(query.as_deref().unwrap_or("")).map_err(ApiError::bad)?;
    for id in &ask.executions {
        app.authorize_execution(&peer, &headers, &Action::ReadExecution, id.0)
            .await?;
    }
    let last_id = headers
        .get("last-event-id")
        .map(|v| v.to_str())
        .transpose()
        .map_err(|_| ApiError::bad("Last-Event-ID is not text"))?;
    let cursor = ask.start(last_id).map_err(ApiError::bad)?;
    let slot = app.follow_slot(principal)?;
    let (tx, rx) = mpsc::channel::<Result<Bytes, std::io::Error>>(16);
    let principal = principal.clone();
    tokio::spawn(async move {
        // Counted against the principal for as long as the stream lives.
        let _slot = slot;
        let mut feed = Feed {
            app: &app,
            principal: &principal,
            tx: &tx,
            vms: ask.vms,
            sent_vms: BTreeMap::new(),
            cursor,
            states: BTreeMap::new(),
        };
        let _ = feed.run().await;
    });
    let stream = futures_util::stream::unfold(rx, |mut rx| async move {
        rx.recv().await.map(|item| (item, rx))
    });
    Ok((
        [
            (header::CONTENT_TYPE, "text/event-stream"),
            (header::CACHE_CONTROL, "no-store"),
        ],
        Body::from_stream(stream),
    )
        .into_response())
}

/// The client went away (or the daemon stops): the stream ends.
struct Gone;

/// What woke a stream up.
enum Wake {
    /// Time to compare everything with what was sent (or something was missed).
    Rescan,
    /// A VM's state changed.
    Vm(String),
    /// An execution has news.
    Execution(ExecutionId),
    /// Nothing was sent for a while.
    KeepAlive,
}

/// One stream's state: what was sent.
struct Feed<'a> {
    app: &'a Arc<App>,
    principal: &'a Principal,
    tx: &'a mpsc::Sender<Result<Bytes, std::io::Error>>,
    vms: bool,
    /// The VMs as last sent, without their heartbeat age (which changes all the time).
    sent_vms: BTreeMap<String, VmInfo>,
    /// Where each execution is.
    cursor: Cursor,
    /// The state each execution was last sent in.
    states: BTreeMap<ExecutionId, ExecState>,
}

impl Feed<'_> {
    async fn send(&self, text: String) -> Result<(), Gone> {
        self.tx.send(Ok(Bytes::from(text))).await.map_err(|_| Gone)
    }

    async fn event(&self, event: &StreamEvent, with_cursor: bool) -> Result<(), Gone> {
        self.send(event.to_sse(with_cursor.then_some(&self.cursor)))
            .await
    }

    async fn run(&mut self) -> Result<(), Gone> {
        self.send(format!("retry: {RETRY_MS}\n\n")).await?;
        let mut events = self.app.events.subscribe();
        let mut stopping = self.app.stopping.clone();
        let mut rescan = tokio::time::interval(VM_RESCAN);
        let mut keep_alive = tokio::time::interval(Duration::from_secs(KEEP_ALIVE_S));
        keep_alive.tick().await;
        let mut wake = Wake::Rescan;
        loop {
            match wake {
                Wake::Rescan => {
                    if self.vms {
                        self.send_vms(None).await?;
                    }
                    if !self.send_executions(None).await? && !self.vms {
                        return Ok(());
                    }
                }
                Wake::Vm(vm) => self.send_vms(Some(&vm)).await?,
                Wake::Execution(id) => {
                    if !self.send_executions(Some(id)).await? && !self.vms {
                        return Ok(());
                    }
                }
                Wake::KeepAlive => self.send(": keep-alive\n\n".into()).await?,
            }
            // Wait for news of what this stream watches; end at once when the client has
            // gone or the daemon stops.
            let cursor = &self.cursor;
            let vms = self.vms;
            let next = async {
                loop {
                    match events.recv().await {
                        Ok(VmEvent::Output(e) | VmEvent::Finished(e))
                            if cursor.0.contains_key(&e) =>
                        {
                            return Wake::Execution(e);
                        }
                        Ok(VmEvent::State(vm)) if vms => return Wake::Vm(vm),
                        Err(broadcast::error::RecvError::Lagged(_)) => return Wake::Rescan,
                        Err(broadcast::error::RecvError::Closed) => {
                            tokio::time::sleep(Duration::from_millis(100)).await;
                            return Wake::Rescan;
                        }
                        Ok(_) => {}
                    }
                }
            };
            wake = tokio::select! {
                w = next => w,
                _ = rescan.tick() => Wake::Rescan,
                _ = keep_alive.tick() => Wake::KeepAlive,
                () = self.tx.closed() => return Err(Gone),
                _ = stopping.wait_for(|s| *s) => return Err(Gone),
            };
        }
    }

    /// Sends the VMs (or VM `only`) whose state differs from what was last sent.
    async fn send_vms(&mut self, only: Option<&str>) -> Result<(), Gone> {
        for vm in super::vms::visible_vms(self.app, self.principal) {
            if only.is_some_and(|o| o != vm.name) {
                continue;
            }
            let compared = VmInfo {
                heartbeat_age_ms: None,
                ..vm.clone()
            };
            if self.sent_vms.get(&vm.name) == Some(&compared) && only.is_none() {
                continue;
            }
            self.sent_vms.insert(vm.name.clone(), compared);
            self.event(&StreamEvent::Vm(Box::new(vm)), false).await?;
        }
        Ok(())
    }

    /// Sends what is new of every execution not yet ended (or of `only`): its state, its
    /// output, its end. Whether any is still followed.
    async fn send_executions(&mut self, only: Option<ExecutionId>) -> Result<bool, Gone> {
        let ids: Vec<ExecutionId> = self.cursor.0.keys().copied().collect();
        let mut following = false;
        for id in ids {
            if self.cursor.position(id) == Position::Ended {
                continue;
            }
            if only.is_some_and(|o| o != id) {
                following = true;
                continue;
            }
            // The state is read before the output, so that output that arrives with the
            // end is still sent before the end.
            let Ok(Some(rec)) = read(self.app, move |r| r.execution(id)).await else {
                // Gone from the records (pruned): nothing more can come.
                self.cursor.0.insert(id, Position::Ended);
                continue;
            };
            if self.states.get(&id) != Some(&rec.state) && !rec.state.is_final() {
                self.states.insert(id, rec.state);
                self.event(&StreamEvent::Execution(Box::new(rec.clone())), false)
                    .await?;
            }
            for stream in [Stream::Stdout, Stream::Stderr] {
                loop {
                    let from = self.cursor.position(id).offset(stream);
                    let Ok(slice) = read(self.app, move |r| {
                        r.read_output(id, stream, from, FOLLOW_CHUNK)
                    })
                    .await
                    else {
                        break;
                    };
                    if slice.data.is_empty() {
                        break;
                    }
                    let len = slice.data.len() as u64;
                    let (stdout, stderr) = match stream {
                        Stream::Stdout => {
                            (from + len, self.cursor.position(id).offset(Stream::Stderr))
                        }
                        Stream::Stderr => {
                            (self.cursor.position(id).offset(Stream::Stdout), from + len)
                        }
                    };
                    self.cursor.0.insert(id, Position::At { stdout, stderr });
                    let event = StreamEvent::Output {
                        execution: id,
                        stream,
                        offset: from,
                        data: slice.data,
                    };
                    self.event(&event, true).await?;
                }
            }
            if rec.state.is_final() {
                self.cursor.0.insert(id, Position::Ended);
                self.event(&StreamEvent::End(Box::new(rec)), true).await?;
            } else {
                following = true;
            }
        }
        Ok(following)
    }
}
