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

use std::sync::Arc;
use std::time::Duration;

use axum::body::{Body, Bytes};
use axum::extract::{ConnectInfo, RawQuery, State};
use axum::http::{HeaderMap, header};
use axum::response::{IntoResponse, Response};
use portless_api::feed::{Feed, FeedSource, Gone};
use portless_api::stream::{KEEP_ALIVE_S, RETRY_MS};
use portless_api::{EventsRequest, ExecutionId, ExecutionRecord, Stream, VmInfo};
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
    let cursor = ask.start_at(&headers).map_err(ApiError::bad)?;
    let slot = app.follow_slot(principal)?;
    let (tx, rx) = mpsc::channel::<Result<Bytes, std::io::Error>>(16);
    let principal = principal.clone();
    tokio::spawn(async move {
        // Counted against the principal for as long as the stream lives.
        let _slot = slot;
        let source = Source {
            app: &app,
            principal: &principal,
        };
        let mut feed = Feed::new(&tx, ask.vms, cursor);
        let _ = run(&source, &mut feed).await;
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

/// The daemon's side of a stream: its VMs and records, as one principal sees them.
struct Source<'a> {
    app: &'a Arc<App>,
    principal: &'a Principal,
}

impl FeedSource for Source<'_> {
    async fn vms(&self) -> Result<Vec<VmInfo>, ()> {
        Ok(super::vms::visible_vms(self.app, self.principal))
    }

    async fn record(&self, id: ExecutionId) -> Result<Option<ExecutionRecord>, ()> {
        read(self.app, move |r| r.execution(id))
            .await
            .map_err(|_| ())
    }

    async fn output(
        &self,
        id: ExecutionId,
        stream: Stream,
        offset: u64,
        max: usize,
        _stored: u64,
    ) -> Result<Vec<u8>, ()> {
        read(self.app, move |r| r.read_output(id, stream, offset, max))
            .await
            .map(|slice| slice.data)
            .map_err(|_| ())
    }
}

/// Feeds the stream until every execution has ended and no VM states were asked for, the
/// client goes away, or the daemon stops: woken by the drivers' events, and every
/// [`VM_RESCAN`] in case one was missed.
async fn run(source: &Source<'_>, feed: &mut Feed<'_>) -> Result<(), Gone> {
    let app = source.app;
    feed.send(format!("retry: {RETRY_MS}\n\n")).await?;
    let mut events = app.events.subscribe();
    let mut stopping = app.stopping.clone();
    let mut rescan = tokio::time::interval(VM_RESCAN);
    let mut keep_alive = tokio::time::interval(Duration::from_secs(KEEP_ALIVE_S));
    keep_alive.tick().await;
    let mut wake = Wake::Rescan;
    loop {
        match wake {
            Wake::Rescan => {
                if feed.vms {
                    feed.send_vms(source, None).await?;
                }
                if !feed.send_executions(source, None).await? && !feed.vms {
                    return Ok(());
                }
            }
            Wake::Vm(vm) => feed.send_vms(source, Some(&vm)).await?,
            Wake::Execution(id) => {
                if !feed.send_executions(source, Some(id)).await? && !feed.vms {
                    return Ok(());
                }
            }
            Wake::KeepAlive => feed.send(": keep-alive\n\n".into()).await?,
        }
        // Wait for news of what this stream watches; end at once when the client has gone
        // or the daemon stops.
        let watched = &*feed;
        let next = async {
            loop {
                match events.recv().await {
                    Ok(VmEvent::Output(e) | VmEvent::Finished(e)) if watched.follows(e) => {
                        return Wake::Execution(e);
                    }
                    Ok(VmEvent::State(vm)) if watched.vms => return Wake::Vm(vm),
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
            () = watched.closed() => return Err(Gone),
            _ = stopping.wait_for(|s| *s) => return Err(Gone),
        };
    }
}
