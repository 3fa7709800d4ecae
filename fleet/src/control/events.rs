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

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use axum::body::Body;
use axum::extract::{ConnectInfo, RawQuery, State};
use axum::http::{HeaderMap, header};
use axum::response::{IntoResponse, Response};
use portless_api::feed::{Feed, FeedSource, Gone};
use portless_api::stream::{KEEP_ALIVE_S, RETRY_MS};
use portless_api::{EventsRequest, ExecutionId, ExecutionRecord, Stream, VmInfo};
use tokio::sync::mpsc;

use super::routes::{POLL, read_output};
use super::{ApiError, Control, ControlPrincipal};

/// How often the VMs are compared with what was last sent.
pub(super) const VM_RESCAN: Duration = Duration::from_secs(2);

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
    let cursor = ask.start_at(&headers).map_err(ApiError::bad)?;
    let slot = c.stream_slot(&caller.principal.name)?;
    let principal = caller.principal.clone();
    let (tx, rx) = mpsc::channel(16);
    tokio::spawn(async move {
        let _slot = slot;
        let source = Source {
            c: &c,
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

/// The control plane's side of a stream: the database, as one principal sees it.
struct Source<'a> {
    c: &'a Control,
    principal: &'a ControlPrincipal,
}

impl FeedSource for Source<'_> {
    async fn vms(&self) -> Result<Vec<VmInfo>, ()> {
        self.c.visible_vms(self.principal).await.map_err(|_| ())
    }

    async fn record(&self, id: ExecutionId) -> Result<Option<ExecutionRecord>, ()> {
        self.c.record(id.0).await.map_err(|_| ())
    }

    async fn output(
        &self,
        id: ExecutionId,
        stream: Stream,
        offset: u64,
        max: usize,
        stored: u64,
    ) -> Result<Vec<u8>, ()> {
        read_output(self.c, id.0, stream, offset, max, stored)
            .await
            .map_err(|_| ())
    }
}

/// Feeds the stream until every execution has ended and no VM states were asked for, or
/// the client goes away: the executions every [`POLL`], the VMs every [`VM_RESCAN`].
async fn run(source: &Source<'_>, feed: &mut Feed<'_>) -> Result<(), Gone> {
    feed.send(format!("retry: {RETRY_MS}\n\n")).await?;
    let mut poll = tokio::time::interval(POLL);
    poll.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    let mut rescan = tokio::time::interval(VM_RESCAN);
    let mut keep_alive = tokio::time::interval(Duration::from_secs(KEEP_ALIVE_S));
    keep_alive.tick().await;
    let mut following = true;
    loop {
        tokio::select! {
            _ = poll.tick(), if following => {
                following = feed.send_executions(source, None).await?;
                if !following && !feed.vms {
                    return Ok(());
                }
            }
            _ = rescan.tick(), if feed.vms => feed.send_vms(source, None).await?,
            _ = keep_alive.tick() => feed.send(": keep-alive\n\n".into()).await?,
            () = feed.closed() => return Err(Gone),
        }
    }
}
