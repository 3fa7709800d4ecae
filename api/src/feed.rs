//! What every server of `GET /v1/events` does the same way: [`Feed`], one stream's memory
//! of what it sent (the VMs as last sent, each execution's [`Cursor`] position and state),
//! and the events that bring a client up to date, read through a [`FeedSource`]. When to
//! look (woken by a daemon's drivers, or polling a database) is the server's.

use std::collections::BTreeMap;
use std::future::Future;

use hyper::body::Bytes;
use tokio::sync::mpsc;

use crate::events::FOLLOW_CHUNK;
use crate::executions::{ExecState, ExecutionId, ExecutionRecord, Stream};
use crate::stream::{Cursor, Position, StreamEvent};
use crate::vms::VmInfo;

/// Where a stream's events come from. `Err(())`: it cannot be read just now (the stream
/// tries again the next time it looks).
pub trait FeedSource: Sync {
    /// The VMs the stream's principal may see.
    fn vms(&self) -> impl Future<Output = Result<Vec<VmInfo>, ()>> + Send;
    /// An execution's record; `None` when there is none (any more).
    fn record(
        &self,
        id: ExecutionId,
    ) -> impl Future<Output = Result<Option<ExecutionRecord>, ()>> + Send;
    /// Up to `max` bytes of `stream` from `offset`, of the `stored` the record says are
    /// kept.
    fn output(
        &self,
        id: ExecutionId,
        stream: Stream,
        offset: u64,
        max: usize,
        stored: u64,
    ) -> impl Future<Output = Result<Vec<u8>, ()>> + Send;
}

/// The client went away: the stream ends.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Gone;

/// The body of an event stream, as a server hands it to its HTTP layer.
pub type Sender = mpsc::Sender<Result<Bytes, std::io::Error>>;

/// One stream: what it sent, and where it sends.
pub struct Feed<'a> {
    tx: &'a Sender,
    /// Whether the VMs' states were asked for.
    pub vms: bool,
    /// The VMs as last sent, without their heartbeat age (which changes all the time).
    sent_vms: BTreeMap<String, VmInfo>,
    /// Where each execution is.
    cursor: Cursor,
    /// The state each execution was last sent in.
    states: BTreeMap<ExecutionId, ExecState>,
}

impl<'a> Feed<'a> {
    /// A stream into `tx` of the VMs (when `vms`) and of the executions of `cursor` from
    /// where it says.
    pub fn new(tx: &'a Sender, vms: bool, cursor: Cursor) -> Self {
        Self {
            tx,
            vms,
            sent_vms: BTreeMap::new(),
            cursor,
            states: BTreeMap::new(),
        }
    }

    /// Sends `text` as it is (a comment, `retry:`).
    pub async fn send(&self, text: String) -> Result<(), Gone> {
        self.tx.send(Ok(Bytes::from(text))).await.map_err(|_| Gone)
    }

    /// Whether the client has gone: completes when it does.
    pub async fn closed(&self) {
        self.tx.closed().await;
    }

    /// Whether the stream follows `id` (and has not sent its end).
    pub fn follows(&self, id: ExecutionId) -> bool {
        self.cursor
            .0
            .get(&id)
            .is_some_and(|p| *p != Position::Ended)
    }

    async fn event(&self, event: &StreamEvent, with_cursor: bool) -> Result<(), Gone> {
        self.send(event.to_sse(with_cursor.then_some(&self.cursor)))
            .await
    }

    /// Sends the VMs (or VM `only`, even unchanged) whose state differs from what was last
    /// sent.
    pub async fn send_vms(
        &mut self,
        source: &impl FeedSource,
        only: Option<&str>,
    ) -> Result<(), Gone> {
        let Ok(vms) = source.vms().await else {
            return Ok(());
        };
        for vm in vms {
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
    /// output, its end (once every kept byte is sent). Whether any is still followed.
    pub async fn send_executions(
        &mut self,
        source: &impl FeedSource,
        only: Option<ExecutionId>,
    ) -> Result<bool, Gone> {
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
            let rec = match source.record(id).await {
                Ok(Some(rec)) => rec,
                Ok(None) => {
                    // Gone from the records (pruned): nothing more can come.
                    self.cursor.0.insert(id, Position::Ended);
                    continue;
                }
                Err(()) => {
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
                    let data = match source.output(id, stream, from, FOLLOW_CHUNK, stored).await {
                        Ok(d) if !d.is_empty() => d,
                        _ => {
                            complete = false;
                            break;
                        }
                    };
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
