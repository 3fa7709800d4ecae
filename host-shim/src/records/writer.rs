//! The records writer: one thread that owns every write to the records and commits them in
//! groups. VM drivers hand it batches (accepted, output, exits) and API handlers their audit
//! entries and new executions; it takes what is queued, applies it in one transaction (each
//! job in a savepoint of its own, so that one job's failure does not undo another's), commits
//! once, and then tells each job's owner. Nothing that writes the records runs on an async
//! worker, and a burst of output from one VM costs one commit, not one per frame.
//!
//! # Fairness
//!
//! API jobs go first: every group starts with all queued API jobs, then takes driver jobs in
//! arrival order until [`GROUP_BYTES`] of output are in it. A driver has at most one job
//! queued at a time (it merges output while its job is in flight), so an API write waits
//! for at most one group of at most `GROUP_BYTES` of output plus the API jobs ahead of it.
//!
//! # Pruning
//!
//! Every [`Retention`] interval, and again while there is more to do, the writer runs one
//! bounded [`Records::prune_step`] between groups.

use std::collections::VecDeque;
use std::sync::{Arc, Condvar, Mutex, PoisonError};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use super::retention::Retention;
use super::{
    AuditEntry, ExecutionId, Finish, NewExecution, Records, RecordsError, Stream, append_output,
    audit, create_execution, finish, mark_accepted,
};

/// Output bytes in one group commit, at most (a single job may be larger).
pub const GROUP_BYTES: usize = 4 << 20;

/// Executions or audit entries deleted per pruning step.
const PRUNE_ROWS: usize = 64;

/// One write.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Op {
    /// A new pending execution; answered with [`Done::Created`].
    Create(NewExecution),
    /// The agent accepted an execution ([`Records::mark_accepted`]).
    Accept {
        /// The execution.
        id: ExecutionId,
        /// The agent's execution id: generation.
        generation: u32,
        /// The agent's execution id: counter.
        counter: u32,
        /// When (ms since the epoch).
        at_ms: u64,
    },
    /// An execution ended ([`Records::finish`]); answered with [`Done::Finished`].
    Finish {
        /// The execution.
        id: ExecutionId,
        /// How.
        end: Finish,
    },
    /// Output ([`Records::append_output`]).
    Output {
        /// The execution.
        id: ExecutionId,
        /// The stream.
        stream: Stream,
        /// Where `data` starts in the stream.
        offset: u64,
        /// The bytes.
        data: Vec<u8>,
    },
    /// An audit entry.
    Audit(AuditEntry),
}

impl Op {
    fn output_len(&self) -> usize {
        match self {
            Self::Output { data, .. } => data.len(),
            _ => 0,
        }
    }
}

/// What an [`Op`] did.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Done {
    /// The new execution's id.
    Created(ExecutionId),
    /// Whether the end was recorded now (`false`: it had ended before).
    Finished(bool),
    /// Anything else succeeded.
    Ok,
}

/// The answer of one op: done, or refused for a reason that concerns that op alone (an
/// output gap, an agent id in use, ...). A failure of the database itself fails the whole
/// job instead ([`JobResult`]).
pub type OpResult = Result<Done, RecordsError>;

/// The answer of a job: one result per op, in order, or why none was applied.
pub type JobResult = Result<Vec<OpResult>, RecordsError>;

/// A job's owner learns its result through this (called on the writer's thread).
pub type Completion = Box<dyn FnOnce(JobResult) + Send>;

/// A group of ops applied together, and whom to tell.
pub struct Job {
    /// The writes, in order.
    pub ops: Vec<Op>,
    /// Called once the job's group is committed (or has failed).
    pub done: Completion,
}

/// Who a job is from, for the order of the queue.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Priority {
    /// An API call waits for it.
    Api,
    /// A VM driver's batch.
    Driver,
}

#[derive(Default)]
struct Queue {
    api: VecDeque<Job>,
    drivers: VecDeque<Job>,
    stop: bool,
}

struct Shared {
    records: Arc<Records>,
    queue: Mutex<Queue>,
    ready: Condvar,
    /// Apply jobs at once in the submitting thread instead of on a writer thread.
    inline: bool,
}

/// A handle to the records writer. Clones share one writer.
#[derive(Clone)]
pub struct Writer {
    shared: Arc<Shared>,
}

impl std::fmt::Debug for Writer {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Writer")
            .field("inline", &self.shared.inline)
            .finish_non_exhaustive()
    }
}

impl Writer {
    /// Starts the writer thread for `records`, pruning to `retention` every `prune_every`.
    pub fn start(
        records: Arc<Records>,
        retention: Retention,
        prune_every: Duration,
    ) -> std::io::Result<(Self, JoinHandle<()>)> {
        let shared = Arc::new(Shared {
            records,
            queue: Mutex::new(Queue::default()),
            ready: Condvar::new(),
            inline: false,
        });
        let s = shared.clone();
        let thread = std::thread::Builder::new()
            .name("records-writer".into())
            .spawn(move || run(&s, &retention, prune_every))?;
        Ok((Self { shared }, thread))
    }

    /// A writer without a thread: every job is applied and answered inside
    /// [`submit`](Self::submit), in one transaction of its own. For tests and tools that
    /// drive the daemon's parts in one thread.
    pub fn inline(records: Arc<Records>) -> Self {
        Self {
            shared: Arc::new(Shared {
                records,
                queue: Mutex::new(Queue::default()),
                ready: Condvar::new(),
                inline: true,
            }),
        }
    }

    /// The records written to.
    pub fn records(&self) -> &Arc<Records> {
        &self.shared.records
    }

    /// Queues a job; its completion is called once it is committed (or failed).
    pub fn submit(&self, priority: Priority, job: Job) {
        if self.shared.inline {
            apply_group(&self.shared.records, vec![job]);
            return;
        }
        let mut q = self
            .shared
            .queue
            .lock()
            .unwrap_or_else(PoisonError::into_inner);
        if q.stop {
            drop(q);
            (job.done)(Err(stopped()));
            return;
        }
        match priority {
            Priority::Api => q.api.push_back(job),
            Priority::Driver => q.drivers.push_back(job),
        }
        drop(q);
        self.shared.ready.notify_one();
    }

    /// Applies `ops` as one API job and waits, without blocking the async runtime, for
    /// their results.
    pub async fn run(&self, ops: Vec<Op>) -> JobResult {
        let (tx, rx) = tokio::sync::oneshot::channel();
        self.submit_api(ops, move |r| drop(tx.send(r)));
        rx.await.unwrap_or_else(|_| Err(stopped()))
    }

    /// Applies `ops` as one API job and blocks the calling thread until they are committed.
    pub fn run_blocking(&self, ops: Vec<Op>) -> JobResult {
        let (tx, rx) = std::sync::mpsc::channel();
        self.submit_api(ops, move |r| drop(tx.send(r)));
        rx.recv().unwrap_or_else(|_| Err(stopped()))
    }

    fn submit_api(&self, ops: Vec<Op>, done: impl FnOnce(JobResult) + Send + 'static) {
        let done = Box::new(done);
        self.submit(Priority::Api, Job { ops, done });
    }

    /// Asks the writer thread to stop once the queue is empty; jobs submitted after this
    /// fail at once.
    pub fn stop(&self) {
        self.shared
            .queue
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .stop = true;
        self.shared.ready.notify_all();
    }
}

fn stopped() -> RecordsError {
    RecordsError::GroupFailed {
        reason: "the records writer has stopped".into(),
        disk_full: false,
    }
}

fn run(shared: &Shared, retention: &Retention, prune_every: Duration) {
    let mut next_prune = Instant::now();
    let mut prune_failed_logged = false;
    loop {
        let group = {
            let mut q = shared.queue.lock().unwrap_or_else(PoisonError::into_inner);
            loop {
                if !q.api.is_empty() || !q.drivers.is_empty() {
                    break;
                }
                if q.stop {
                    return;
                }
                let wait = next_prune.saturating_duration_since(Instant::now());
                if wait.is_zero() {
                    break;
                }
                q = shared
                    .ready
                    .wait_timeout(q, wait)
                    .unwrap_or_else(PoisonError::into_inner)
                    .0;
            }
            take_group(&mut q)
        };
        if !group.is_empty() {
            apply_group(&shared.records, group);
        }
        if Instant::now() >= next_prune {
            match shared
                .records
                .prune_step(super::now_ms(), retention, PRUNE_ROWS)
            {
                Ok(p) => {
                    prune_failed_logged = false;
                    next_prune = if p.more {
                        Instant::now()
                    } else {
                        Instant::now() + prune_every
                    };
                }
                Err(e) => {
                    if !prune_failed_logged {
                        eprintln!("portless: records: pruning failed: {e}");
                        prune_failed_logged = true;
                    }
                    next_prune = Instant::now() + prune_every;
                }
            }
        }
    }
}

/// Every queued API job, then driver jobs up to [`GROUP_BYTES`] of output (at least one).
fn take_group(q: &mut Queue) -> Vec<Job> {
    let mut group: Vec<Job> = q.api.drain(..).collect();
    let mut bytes = 0;
    while let Some(job) = q.drivers.front() {
        let len: usize = job.ops.iter().map(Op::output_len).sum();
        if bytes > 0 && bytes + len > GROUP_BYTES {
            break;
        }
        bytes += len;
        group.extend(q.drivers.pop_front());
    }
    group
}

/// Applies the jobs in one transaction, each in a savepoint, commits, and completes them.
fn apply_group(records: &Records, group: Vec<Job>) {
    let disk_full = records.disk_problem().is_some();
    let limits = records.limits();
    let mut results: Vec<JobResult> = Vec::with_capacity(group.len());
    let committed = (|| {
        let mut conn = records.conn();
        let mut tx = conn.transaction_with_behavior(rusqlite::TransactionBehavior::Immediate)?;
        for job in &group {
            let sp = tx.savepoint()?;
            // Dropped without commit (a failed job): rolled back, the others stay.
            match apply_job(&sp, &job.ops, &limits, disk_full) {
                Ok(r) => {
                    sp.commit()?;
                    results.push(Ok(r));
                }
                Err(e) => results.push(Err(records.note_write_error(e))),
            }
        }
        tx.commit()
    })();
    match committed {
        Ok(()) => {
            for (job, result) in group.into_iter().zip(results) {
                (job.done)(result);
            }
        }
        Err(e) => {
            let disk_full = records.note_write_error(e.into()).is_disk_full();
            for job in group {
                (job.done)(Err(RecordsError::GroupFailed {
                    reason: "the group commit failed".into(),
                    disk_full,
                }));
            }
        }
    }
}

/// Applies one job's ops; a database failure fails the job, anything else is that op's
/// result.
fn apply_job(
    conn: &rusqlite::Connection,
    ops: &[Op],
    limits: &super::StoreLimits,
    disk_full: bool,
) -> Result<Vec<OpResult>, RecordsError> {
    let mut out = Vec::with_capacity(ops.len());
    for op in ops {
        let r = match op {
            Op::Create(new) => create_execution(conn, new, limits.output_cap).map(Done::Created),
            Op::Accept {
                id,
                generation,
                counter,
                at_ms,
            } => mark_accepted(conn, *id, *generation, *counter, *at_ms).map(|()| Done::Ok),
            Op::Finish { id, end } => finish(conn, *id, end).map(Done::Finished),
            Op::Output {
                id,
                stream,
                offset,
                data,
            } => append_output(conn, *id, *stream, *offset, data, limits, disk_full)
                .map(|()| Done::Ok),
            Op::Audit(entry) => audit(conn, entry).map(|()| Done::Ok),
        };
        match r {
            Err(e @ RecordsError::Database(_)) => return Err(e),
            r => out.push(r),
        }
    }
    Ok(out)
}
