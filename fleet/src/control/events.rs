//! `GET /v1/events` on a control plane: server-sent events of the VMs a caller may see and
//! of the executions (invocations) it asks for, as the daemon sends them
//! (`portless_api::stream`), read from the database.
//!
//! The caller is identified first; every execution it names is then authorized as a read
//! (audited one by one), and one it may not read is "no execution" (404) for the whole
//! request. Where the daemon is woken by its drivers, a control plane looks: the
//! executions every [`POLL`](super::routes::POLL) (100 ms), the VMs every
//! [`VM_RESCAN`]. A stream holds one of its principal's stream slots on this server
//! ([`MAX_STREAMS_PER_PRINCIPAL`](super::MAX_STREAMS_PER_PRINCIPAL)) for as long as it
//! lives. Ids are cursors, so a client that reconnects with `Last-Event-ID` (to this server
//! or another) gets exactly what it had not.

use std::collections::BTreeMap;
use std::net::SocketAddr;
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
use tokio::sync::mpsc;

use super::routes::{POLL, read_output};
use super::{ApiError, Control, ControlPrincipal};

/// How often the VMs are compared with what was last sent.
pub(super) const VM_RESCAN: Duration = Duration::from_secs(2);

type Tx = mpsc::Sender<Result<Bytes, std::io::Error>>;

pub(super) async fn events(
    State(c): State<Arc<Control>>,
    ConnectInfo(peer): ConnectInfo<SocketAddr>,
    headers: HeaderMap,
    RawQuery(query): RawQuery,
) -> Result<Response, ApiError> {
    // Identified before the query is looked at, so that a stranger learns nothing.
    let caller = c.identify(peer, &headers, "list_vms").await?;
    let ask = match EventsRequest::from_query(query.as_deref().unwrap_or("")) {
        Ok(a) => a,
        Err(e) => {
            let error = ApiError::bad(e);
            return Err(c.deny(&caller, "list_vms", Some("events"), error).await);
        }
    };
    c.allowed(&caller, "list_vms", Some("events")).await;
    for id in &ask.executions {
        c.readable(&caller, "read_execution", id.0).await?;
    }
    let last_id = headers
        .get("last-event-id")
        .map(|v| v.to_str())
        .transpose()
        .map_err(|_| ApiError::bad("Last-Event-ID is not text"))?;
    let cursor = ask.start(last_id).map_err(ApiError::bad)?;
    let slot = c.stream_slot(&caller.principal.name)?;
    let principal = caller.principal.clone();
    let (tx, rx) = mpsc::channel(16);
    tokio::spawn(async move {
        let _slot = slot;
        let mut feed = Feed {
            c: &c,
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

/// The client went away: the stream ends.
struct Gone;

/// One stream's state: what was sent.
struct Feed<'a> {
    c: &'a Control,
    principal: &'a ControlPrincipal,
    tx: &'a Tx,
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
        let mut poll = tokio::time::interval(POLL);
        poll.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        let mut rescan = tokio::time::interval(VM_RESCAN);
        let mut keep_alive = tokio::time::interval(Duration::from_secs(KEEP_ALIVE_S));
        keep_alive.tick().await;
        let mut following = true;
        loop {
            tokio::select! {
                _ = poll.tick(), if following => {
                    following = self.send_executions().await?;
                    if !following && !self.vms {
                        return Ok(());
                    }
                }
                _ = rescan.tick(), if self.vms => self.send_vms().await?,
                _ = keep_alive.tick() => self.send(": keep-alive\n\n".into()).await?,
                () = self.tx.closed() => return Err(Gone),
            }
        }
    }

    /// Sends the VMs whose state differs from what was last sent. A failed read is tried
    /// again at the next rescan.
    async fn send_vms(&mut self) -> Result<(), Gone> {
        let Ok(vms) = self.c.visible_vms(self.principal).await else {
            return Ok(());
        };
        for vm in vms {
            let compared = VmInfo {
                heartbeat_age_ms: None,
                ..vm.clone()
            };
            if self.sent_vms.get(&vm.name) == Some(&compared) {
                continue;
            }
            self.sent_vms.insert(vm.name.clone(), compared);
            self.event(&StreamEvent::Vm(Box::new(vm)), false).await?;
        }
        Ok(())
    }

    /// Sends what is new of every execution not yet ended: its state, its output, its
    /// end. Whether any is still followed. A failed read is tried again at the next poll.
    async fn send_executions(&mut self) -> Result<bool, Gone> {
        let ids: Vec<ExecutionId> = self.cursor.0.keys().copied().collect();
        let mut following = false;
        for id in ids {
            if self.cursor.position(id) == Position::Ended {
                continue;
            }
            // The state is read before the output, so that output that arrives with the
            // end is still sent before the end.
            let rec = match self.c.record(id.0).await {
                Ok(Some(rec)) => rec,
                Ok(None) => {
                    self.cursor.0.insert(id, Position::Ended);
                    continue;
                }
                Err(_) => {
                    following = true;
                    continue;
                }
            };
            if self.states.get(&id) != Some(&rec.state) && !rec.state.is_final() {
                self.states.insert(id, rec.state);
                self.event(&StreamEvent::Execution(Box::new(rec.clone())), false)
                    .await?;
            }
            let mut complete = true;
            for stream in [Stream::Stdout, Stream::Stderr] {
                let stored = rec.totals(stream).stored_len;
                loop {
                    let from = self.cursor.position(id).offset(stream);
                    if from >= stored {
                        break;
                    }
                    let Ok(data) =
                        read_output(self.c, id.0, stream, from, FOLLOW_CHUNK, stored).await
                    else {
                        complete = false;
                        break;
                    };
                    if data.is_empty() {
                        complete = false;
                        break;
                    }
                    let len = data.len() as u64;
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
                        data,
                    };
                    self.event(&event, true).await?;
                }
            }
            if rec.state.is_final() && complete {
                self.cursor.0.insert(id, Position::Ended);
                self.event(&StreamEvent::End(Box::new(rec)), true).await?;
            } else {
                following = true;
            }
        }
        Ok(following)
    }
}
