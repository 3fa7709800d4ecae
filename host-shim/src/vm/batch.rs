//! Effects of the guest's frames on their way to the records, and the release of the frames.
//!
//! The driver peeks frames without consuming them; what a frame changes in the records
//! (an execution accepted or ended, output) goes into the *building* batch, output merged
//! per stream. A batch goes to the records writer when the previous one is committed (one
//! in flight at a time), or, if it holds only output, once that has waited
//! `merge_wait` or reached `merge_bytes`. Once the writer has committed a batch, the driver
//! releases the frames read before it was sent: a frame leaves the ring only after its
//! effect is durable, so a daemon killed at any point reads it again when it comes back
//! (PROTOCOL.md 3.5). A batch that fails (the disk is full) is sent again after a pause, and
//! its frames stay in the ring meanwhile.

use std::os::fd::{AsRawFd, OwnedFd};
use std::sync::{Arc, mpsc};
use std::time::{Duration, Instant};

use ring_protocol::message::PushOutcome;
use tokio::sync::oneshot;

use super::VmError;
use crate::records::{ExecutionId, Job, JobResult, Op, Priority, Stream, Writer};

/// What to do once an op is committed.
pub(super) enum Then {
    /// Nothing.
    Nothing,
    /// Output was stored: followers hear of it.
    Output(ExecutionId),
    /// An execution ended: followers hear of it if this was its end, and an API request
    /// that it refuses hears why.
    Ended {
        id: ExecutionId,
        refused: Option<(oneshot::Sender<Result<(), VmError>>, VmError)>,
    },
    /// An execution was accepted: tell the API (or, if its agent id is in use by an
    /// execution that ended before, refuse it).
    Accepted {
        id: ExecutionId,
        agent: ring_protocol::message::ExecutionId,
        reply: Option<oneshot::Sender<Result<(), VmError>>>,
    },
    /// A push ended: tell the API.
    Pushed {
        reply: oneshot::Sender<Result<PushOutcome, VmError>>,
        outcome: PushOutcome,
    },
}

struct Merged {
    id: ExecutionId,
    stream: Stream,
    offset: u64,
    data: Vec<u8>,
}

/// The batch being built.
#[derive(Default)]
struct Building {
    output: Vec<Merged>,
    output_bytes: usize,
    ops: Vec<(Op, Then)>,
    /// When its first output came.
    output_since: Option<Instant>,
}

impl Building {
    fn is_empty(&self) -> bool {
        self.output.is_empty() && self.ops.is_empty()
    }
}

/// A batch the writer has.
struct InFlight {
    /// The ops as sent (again, should the job fail).
    ops: Vec<Op>,
    thens: Vec<Then>,
    /// Release the frames before this read index of `epoch` once it is committed.
    release: Option<(u32, u32)>,
    failures: u32,
    /// Not sent again before this (after a failure).
    retry_at: Option<Instant>,
    submitted: bool,
}

/// A committed batch: release its frames (if still of this epoch) and act on its results.
pub(super) struct Committed {
    /// (epoch, read index) to release up to.
    pub(super) release: Option<(u32, u32)>,
    /// Each op's follow-up with its result.
    pub(super) results: Vec<(Then, crate::records::OpResult)>,
}

/// The effects of one VM's frames between the ring and the records.
pub(super) struct Batches {
    writer: Writer,
    building: Building,
    in_flight: Option<InFlight>,
    done_tx: mpsc::Sender<JobResult>,
    done_rx: mpsc::Receiver<JobResult>,
    wake: Arc<OwnedFd>,
    merge_bytes: usize,
    merge_wait: Duration,
    /// Output chunks the batches sent to the writer (for the rows budget).
    pub(super) rows_sent: u64,
}

/// How much of the output rows budget is left.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(super) enum RowsBudget {
    /// Nearly all of it (90%): write output as it comes.
    Plenty,
    /// Some: merge output for `merge_wait` before writing it.
    Some,
    /// None: merge output until the budget has refilled.
    Spent,
}

/// The first pause after a failed batch; it doubles up to [`RETRY_MAX`].
const RETRY_FIRST: Duration = Duration::from_millis(100);
const RETRY_MAX: Duration = Duration::from_secs(5);

impl Batches {
    pub(super) fn new(
        writer: Writer,
        wake: Arc<OwnedFd>,
        merge_bytes: usize,
        merge_wait: Duration,
    ) -> Self {
        let (done_tx, done_rx) = mpsc::channel();
        Self {
            writer,
            building: Building::default(),
            in_flight: None,
            done_tx,
            done_rx,
            wake,
            merge_bytes: merge_bytes.max(1),
            merge_wait,
            rows_sent: 0,
        }
    }

    /// Adds output, merged with the stream's previous piece when it follows it.
    pub(super) fn output(
        &mut self,
        id: ExecutionId,
        stream: Stream,
        offset: u64,
        data: &[u8],
        now: Instant,
    ) {
        self.building.output_since.get_or_insert(now);
        self.building.output_bytes += data.len();
        if let Some(last) = self
            .building
            .output
            .iter_mut()
            .rev()
            .find(|m| m.id == id && m.stream == stream)
            && last.offset + last.data.len() as u64 == offset
            && last.data.len() < self.merge_bytes
        {
            last.data.extend_from_slice(data);
            return;
        }
        self.building.output.push(Merged {
            id,
            stream,
            offset,
            data: data.to_vec(),
        });
    }

    /// Adds a state change (accepted, ended) with what to do once it is committed.
    pub(super) fn op(&mut self, op: Op, then: Then) {
        self.building.ops.push((op, then));
    }

    /// Whether the building batch's output is full: read no more output until it has gone.
    pub(super) fn full(&self) -> bool {
        self.building.output_bytes >= self.merge_bytes * 2
    }

    /// Output bytes on their way: in the building batch and in the one in flight.
    pub(super) fn bytes(&self) -> usize {
        let in_flight: usize = self.in_flight.as_ref().map_or(0, |f| {
            f.ops
                .iter()
                .map(|op| match op {
                    Op::Output { data, .. } => data.len(),
                    _ => 0,
                })
                .sum()
        });
        self.building.output_bytes + in_flight
    }

    /// Whether anything waits to be written or committed.
    pub(super) fn idle(&self) -> bool {
        self.building.is_empty() && self.in_flight.is_none()
    }

    /// Output chunks the building batch would write now.
    pub(super) fn rows_waiting(&self) -> u64 {
        self.building.output.len() as u64
    }

    /// Sends the building batch to the writer if it is due and none is in flight: now if
    /// it changes a state (someone waits for it) or the rows budget has plenty left, else
    /// once its output has waited `merge_wait` or filled `merge_bytes`, and never while the
    /// rows budget is spent (its output keeps merging meanwhile). `release` is the read index (and epoch)
    /// covering every frame whose effect is in it. Returns whether it sent one.
    pub(super) fn submit_if_due(
        &mut self,
        now: Instant,
        rows: RowsBudget,
        release: Option<(u32, u32)>,
    ) -> bool {
        if let Some(f) = &mut self.in_flight {
            if !f.submitted && f.retry_at.is_none_or(|t| now >= t) {
                f.submitted = true;
                f.retry_at = None;
                let ops = f.ops.clone();
                self.send(ops);
                return true;
            }
            return false;
        }
        if self.building.is_empty() {
            return false;
        }
        let has_output = !self.building.output.is_empty();
        let due = !self.building.ops.is_empty()
            || rows == RowsBudget::Plenty
            || self.building.output_bytes >= self.merge_bytes
            || self
                .building
                .output_since
                .is_some_and(|t| now.saturating_duration_since(t) >= self.merge_wait);
        if !due || (has_output && rows == RowsBudget::Spent) {
            return false;
        }
        let b = std::mem::take(&mut self.building);
        self.rows_sent += b.output.len() as u64;
        let mut ops = Vec::with_capacity(b.output.len() + b.ops.len());
        let mut thens = Vec::with_capacity(ops.capacity());
        // Output first: an execution's output is stored before its end.
        for m in b.output {
            thens.push(Then::Output(m.id));
            ops.push(Op::Output {
                id: m.id,
                stream: m.stream,
                offset: m.offset,
                data: m.data,
            });
        }
        for (op, then) in b.ops {
            ops.push(op);
            thens.push(then);
        }
        self.in_flight = Some(InFlight {
            ops: ops.clone(),
            thens,
            release,
            failures: 0,
            retry_at: None,
            submitted: true,
        });
        self.send(ops);
        true
    }

    fn send(&self, ops: Vec<Op>) {
        let tx = self.done_tx.clone();
        let wake = self.wake.clone();
        self.writer.submit(
            Priority::Driver,
            Job {
                ops,
                done: Box::new(move |r| {
                    let _ = tx.send(r);
                    let _ = crate::vm::ivshmem::signal_eventfd(wake.as_raw_fd());
                }),
            },
        );
    }

    /// The batch the writer finished, if it has; `Err` with the reason when it failed (it
    /// is sent again after a pause).
    pub(super) fn take_committed(&mut self, now: Instant) -> Option<Result<Committed, String>> {
        let result = self.done_rx.try_recv().ok()?;
        let mut f = self.in_flight.take()?;
        match result {
            Ok(results) => Some(Ok(Committed {
                release: f.release,
                results: f.thens.into_iter().zip(results).collect(),
            })),
            Err(e) => {
                f.failures += 1;
                let pause = RETRY_FIRST
                    .saturating_mul(1 << f.failures.min(6))
                    .min(RETRY_MAX);
                f.retry_at = Some(now + pause);
                f.submitted = false;
                self.in_flight = Some(f);
                Some(Err(e.to_string()))
            }
        }
    }

    /// When the building batch becomes due by age, or a failed batch may be sent again.
    pub(super) fn next_due(&self) -> Option<Instant> {
        if let Some(f) = &self.in_flight {
            return f.retry_at;
        }
        self.building.output_since.map(|t| t + self.merge_wait)
    }

    /// Waits (up to `limit`) for the batch in flight, then sends and waits for what is left:
    /// at shutdown, so that nothing the driver decided is left unwritten.
    pub(super) fn drain(&mut self, limit: Duration) {
        let deadline = Instant::now() + limit;
        while !self.idle() && Instant::now() < deadline {
            let now = Instant::now();
            self.submit_if_due(now + self.merge_wait + RETRY_MAX, RowsBudget::Plenty, None);
            if let Ok(r) = self
                .done_rx
                .recv_timeout(deadline.saturating_duration_since(Instant::now()))
            {
                let f = self.in_flight.take();
                if r.is_err() {
                    // Failed at shutdown: the frames stay in the ring for the next daemon.
                    drop(f);
                    return;
                }
            } else {
                return;
            }
        }
    }
}
