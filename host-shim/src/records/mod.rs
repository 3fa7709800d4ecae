//! The daemon's durable records: every execution (who ran what where, when, how it ended, and
//! its output up to a cap per stream) and an audit entry for every API call, in an embedded
//! SQLite database (`portless.db`) in the state directory.
//!
//! The records are what make a daemon restart lose nothing: they reload as they were, and
//! executions still running in a guest are found again by their agent execution id
//! (generation, counter) through [`Records::find_by_agent_id`] and [`Records::unfinished`],
//! then finish normally through [`Records::finish`], which records an end only once.
//!
//! In the daemon every write goes through the records writer ([`writer`]), which commits
//! them in groups on a thread of its own; reads use a pool of read connections, which in WAL
//! mode never wait for the writer. [`retention`] prunes what is past its time or size.
//!
//! # Schema (version [`SCHEMA_VERSION`], kept in `PRAGMA user_version`)
//!
//! - `executions`: one row per execution; the id is `INTEGER PRIMARY KEY AUTOINCREMENT`, so an
//!   id is never handed out twice. Arguments are a JSON array of strings. Per stream the row
//!   holds `*_stored` (bytes kept), `*_total` (bytes produced) and `*_chunks` (stored chunks);
//!   the stream is truncated when fewer were kept than produced. `output_cap` is the cap in
//!   force when the execution was created, so a restart with another cap never leaves a hole
//!   in a stream. The cap counts what a stream costs on disk: its bytes plus
//!   [`CHUNK_OVERHEAD`] per chunk.
//! - `output`: the kept bytes as chunks keyed by `(execution, stream, offset)` (a table
//!   `WITHOUT ROWID`: one b-tree), one row per append, so appending never rewrites what is
//!   already stored. The drivers merge a stream's output before it comes here. The chunks of
//!   a stream are contiguous from offset 0 and end at `*_stored`. Output for an execution
//!   that has ended is refused.
//! - `vm_usage`: per VM, the bytes and chunks of output stored, for the VM quota.
//! - `audit`: one row per API call, allowed or denied.
//!
//! An execution a fleet's control plane asked for carries its invocation's id in
//! `fleet_invocation` (unique), so that a redelivered invocation finds it (schema 4).
//!
//! Schema 2 (from 1) rebuilt `output` without its rowid, added the chunk counts, the usage
//! table and an index of ends for pruning, and switched the file to incremental vacuum, so
//! that pages freed by pruning go back to the file system.
//!
//! # Durability and disk
//!
//! The database runs in WAL mode with `synchronous = NORMAL`: every committed change survives
//! the daemon crashing or being killed; a power loss may lose the last few commits but never
//! corrupts the database. When the state directory's disk has less than `min_free` free, or
//! a write failed for lack of space, [`Records::disk_problem`] says so: output is then
//! counted but not kept, and the API refuses new executions, while ends, audit entries and
//! every read keep working.

use std::fs::DirBuilder;
use std::os::unix::fs::DirBuilderExt;
use std::path::{Path, PathBuf};
use std::sync::{Mutex, MutexGuard, PoisonError};
use std::time::Duration;

pub use portless_api::{
    AuditEntry, AuditOrder, AuditQuery, AuditRecord, ExecState, ExecutionId, ExecutionQuery,
    ExecutionRecord, Stream, StreamTotals,
};
use rusqlite::types::{
    FromSql, FromSqlError, FromSqlResult, ToSql, ToSqlOutput, Type, Value, ValueRef,
};
use rusqlite::{Connection, OptionalExtension, Row, TransactionBehavior, params, params_from_iter};

pub mod retention;
pub mod writer;

pub use retention::{Pruned, Retention};
pub use writer::{Done, Job, JobResult, Op, OpResult, Priority, Writer};

/// The name of the database file in the state directory.
pub const DB_FILE_NAME: &str = "portless.db";

/// The default cap on the output kept per stream of one execution: 16 MiB.
pub const DEFAULT_OUTPUT_CAP: u64 = 16 * 1024 * 1024;

/// The schema version this build writes (`PRAGMA user_version`).
pub const SCHEMA_VERSION: i64 = 4;

/// How long a call waits for a lock held by another connection before it fails.
pub const BUSY_TIMEOUT: Duration = Duration::from_secs(5);

/// The migrations, in order: `MIGRATIONS[n]` takes the schema from version `n` to `n + 1`
/// (public so that tests can build a database of an earlier version).
pub const MIGRATIONS: [&str; SCHEMA_VERSION as usize] = [
    r#"
CREATE TABLE executions (
    id                INTEGER PRIMARY KEY AUTOINCREMENT,
    principal         TEXT    NOT NULL,
    vm                TEXT    NOT NULL,
    command           TEXT    NOT NULL,
    args              TEXT    NOT NULL,
    state             TEXT    NOT NULL,
    requested_at_ms   INTEGER NOT NULL,
    started_at_ms     INTEGER,
    finished_at_ms    INTEGER,
    duration_ms       INTEGER,
    exit_code         INTEGER,
    signal            INTEGER,
    detail            TEXT,
    agent_generation  INTEGER,
    agent_counter     INTEGER,
    output_cap        INTEGER NOT NULL,
    stdout_stored     INTEGER NOT NULL DEFAULT 0,
    stdout_total      INTEGER NOT NULL DEFAULT 0,
    stderr_stored     INTEGER NOT NULL DEFAULT 0,
    stderr_total      INTEGER NOT NULL DEFAULT 0
);
CREATE INDEX executions_by_vm ON executions (vm, id);
CREATE INDEX executions_by_principal ON executions (principal, id);
CREATE INDEX executions_by_state ON executions (state, id);
CREATE UNIQUE INDEX executions_by_agent_id
    ON executions (vm, agent_generation, agent_counter)
    WHERE agent_generation IS NOT NULL;

CREATE TABLE output (
    execution  INTEGER NOT NULL REFERENCES executions (id) ON DELETE CASCADE,
    stream     INTEGER NOT NULL,
    offset     INTEGER NOT NULL,
    data       BLOB    NOT NULL,
    PRIMARY KEY (execution, stream, offset)
);

CREATE TABLE audit (
    id         INTEGER PRIMARY KEY AUTOINCREMENT,
    at_ms      INTEGER NOT NULL,
    principal  TEXT,
    caller     TEXT    NOT NULL,
    action     TEXT    NOT NULL,
    target     TEXT,
    allowed    INTEGER NOT NULL,
    reason     TEXT
);
CREATE INDEX audit_by_time ON audit (at_ms, id);
CREATE INDEX audit_by_principal ON audit (principal, id);
"#,
    r#"
CREATE TABLE output_v2 (
    execution  INTEGER NOT NULL REFERENCES executions (id) ON DELETE CASCADE,
    stream     INTEGER NOT NULL,
    offset     INTEGER NOT NULL,
    data       BLOB    NOT NULL,
    PRIMARY KEY (execution, stream, offset)
) WITHOUT ROWID;
INSERT INTO output_v2 (execution, stream, offset, data)
    SELECT execution, stream, offset, data FROM output;
DROP TABLE output;
ALTER TABLE output_v2 RENAME TO output;

ALTER TABLE executions ADD COLUMN stdout_chunks INTEGER NOT NULL DEFAULT 0;
ALTER TABLE executions ADD COLUMN stderr_chunks INTEGER NOT NULL DEFAULT 0;
UPDATE executions SET
    stdout_chunks = (SELECT COUNT(*) FROM output WHERE execution = executions.id AND stream = 0),
    stderr_chunks = (SELECT COUNT(*) FROM output WHERE execution = executions.id AND stream = 1);
CREATE INDEX executions_by_end ON executions (finished_at_ms, id)
    WHERE finished_at_ms IS NOT NULL;

CREATE TABLE vm_usage (
    vm            TEXT    PRIMARY KEY,
    stored_bytes  INTEGER NOT NULL,
    chunks        INTEGER NOT NULL
) WITHOUT ROWID;
INSERT INTO vm_usage (vm, stored_bytes, chunks)
    SELECT vm, SUM(stdout_stored + stderr_stored), SUM(stdout_chunks + stderr_chunks)
    FROM executions GROUP BY vm;
"#,
    r#"
ALTER TABLE audit ADD COLUMN count INTEGER NOT NULL DEFAULT 1;
"#,
    r#"
ALTER TABLE executions ADD COLUMN fleet_invocation INTEGER;
CREATE UNIQUE INDEX executions_by_fleet_invocation ON executions (fleet_invocation)
    WHERE fleet_invocation IS NOT NULL;
"#,
];

/// The columns of `executions` that [`record_from_row`] reads, in its order.
const EXECUTION_COLUMNS: &str = "id, principal, vm, command, args, state, requested_at_ms, \
     started_at_ms, finished_at_ms, duration_ms, exit_code, signal, detail, agent_generation, \
     agent_counter, output_cap, stdout_stored, stdout_total, stderr_stored, stderr_total";

/// What can go wrong with the records.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum RecordsError {
    /// The state directory could not be created, or the database file in it could not be.
    #[error("cannot create {path}: {source}")]
    Create {
        /// The directory or file.
        path: PathBuf,
        /// Why.
        source: std::io::Error,
    },
    /// SQLite failed.
    #[error("database: {0}")]
    Database(#[from] rusqlite::Error),
    /// The database was written by a newer build (or its version is nonsense).
    #[error("database schema version {found} is not one this build knows (0 to {supported})")]
    UnsupportedSchema {
        /// The version in the file.
        found: i64,
        /// The newest version this build knows.
        supported: i64,
    },
    /// No execution has this id.
    #[error("no execution {0}")]
    UnknownExecution(ExecutionId),
    /// [`Records::mark_accepted`] on an execution that is no longer pending.
    #[error("execution {id} is {state}, not pending")]
    NotPending {
        /// The execution.
        id: ExecutionId,
        /// Its state.
        state: ExecState,
    },
    /// [`Records::mark_accepted`] with an agent execution id another execution already has.
    #[error(
        "agent execution {generation:08x}-{counter:08x} on {vm} is already execution {existing}"
    )]
    AgentIdInUse {
        /// The VM.
        vm: String,
        /// The agent generation.
        generation: u32,
        /// The agent's counter.
        counter: u32,
        /// The execution that has it.
        existing: ExecutionId,
    },
    /// [`Records::finish`] with a state that is not final.
    #[error("{0} is not a final state")]
    NotFinal(ExecState),
    /// An output chunk starts beyond the end of what was received: bytes are missing.
    #[error(
        "execution {id} {stream}: chunk at offset {offset}, but only {received} bytes received"
    )]
    OutputGap {
        /// The execution.
        id: ExecutionId,
        /// The stream.
        stream: Stream,
        /// Where the chunk starts.
        offset: u64,
        /// Bytes of the stream received so far.
        received: u64,
    },
    /// An output chunk's end does not fit in a `u64` (or in SQLite's `i64`).
    #[error("execution {id} {stream}: chunk at offset {offset} overflows")]
    OutputOverflow {
        /// The execution.
        id: ExecutionId,
        /// The stream.
        stream: Stream,
        /// Where the chunk starts.
        offset: u64,
    },
    /// Stored records are inconsistent (chunks missing, say).
    #[error("corrupt records: {0}")]
    Corrupt(String),
    /// A whole group commit of the records writer failed (nothing of it was written).
    #[error("{reason}{}", if *.disk_full { " (the disk is full)" } else { "" })]
    GroupFailed {
        /// What failed.
        reason: String,
        /// Whether for lack of disk space.
        disk_full: bool,
    },
    /// Output for an execution that has ended: it is not attached to the final record.
    #[error("execution {id} has ended ({state}): output refused")]
    Ended {
        /// The execution.
        id: ExecutionId,
        /// Its final state.
        state: ExecState,
    },
}

impl RecordsError {
    /// Whether SQLite failed for lack of disk space.
    pub fn is_disk_full(&self) -> bool {
        match self {
            Self::Database(rusqlite::Error::SqliteFailure(e, _)) => {
                e.code == rusqlite::ErrorCode::DiskFull
            }
            Self::GroupFailed { disk_full, .. } => *disk_full,
            _ => false,
        }
    }
}

/// An execution state as stored: its name (`timed_out`).
struct StoredState(ExecState);

impl ToSql for StoredState {
    fn to_sql(&self) -> rusqlite::Result<ToSqlOutput<'_>> {
        Ok(ToSqlOutput::from(self.0.as_str()))
    }
}

impl FromSql for StoredState {
    fn column_result(value: ValueRef<'_>) -> FromSqlResult<Self> {
        let name = value.as_str()?;
        ExecState::from_name(name)
            .map(Self)
            .ok_or_else(|| FromSqlError::Other(format!("unknown execution state {name:?}").into()))
    }
}

/// The number stored in `output.stream`.
fn stream_code(stream: Stream) -> i64 {
    match stream {
        Stream::Stdout => 0,
        Stream::Stderr => 1,
    }
}

/// The `executions` column counting this stream's stored chunks.
fn chunks_column(stream: Stream) -> &'static str {
    match stream {
        Stream::Stdout => "stdout_chunks",
        Stream::Stderr => "stderr_chunks",
    }
}

/// The `executions` columns of this stream: (bytes kept, bytes produced).
fn stream_columns(stream: Stream) -> (&'static str, &'static str) {
    match stream {
        Stream::Stdout => ("stdout_stored", "stdout_total"),
        Stream::Stderr => ("stderr_stored", "stderr_total"),
    }
}

/// An execution about to be sent to an agent.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct NewExecution {
    /// Who asked for it.
    pub principal: String,
    /// The VM it runs on.
    pub vm: String,
    /// The command name from the allow-list.
    pub command: String,
    /// The argument values, in order.
    pub args: Vec<String>,
    /// When it was asked for, in milliseconds since the Unix epoch.
    pub requested_at_ms: u64,
    /// The fleet invocation it carries out, when a control plane asked for it: one
    /// execution per invocation, at most.
    pub fleet_invocation: Option<u64>,
}

/// How an execution ended, for [`Records::finish`].
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Finish {
    /// The final state; must be [final](ExecState::is_final).
    pub state: ExecState,
    /// The exit code, when the program exited.
    pub exit_code: Option<i32>,
    /// The signal that killed it, when one did.
    pub signal: Option<i32>,
    /// When it ended, in milliseconds since the Unix epoch.
    pub finished_at_ms: u64,
    /// How long it ran, as measured by the agent, when it ran.
    pub duration_ms: Option<u64>,
    /// A one-line explanation (the rejection, the OS error, why the agent was lost).
    pub detail: Option<String>,
}

/// A range of one stream's kept output, from [`Records::read_output`].
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct OutputSlice {
    /// Where `data` starts in the stream.
    pub offset: u64,
    /// The bytes; empty when `offset` is at or past `stored_len`.
    pub data: Vec<u8>,
    /// Bytes of the stream kept.
    pub stored_len: u64,
    /// Bytes of the stream produced.
    pub total_len: u64,
    /// Whether bytes were dropped for the cap.
    pub truncated: bool,
}

/// Bytes of disk one stored output chunk costs beyond its data: its key (execution, stream,
/// offset), the record header and the b-tree cell, rounded up. The output cap and the VM
/// quota count it, so that a stream of 1-byte chunks costs what it stores (measured in
/// `tests/records.rs`, `a_chunk_costs_no_more_than_its_overhead`).
pub const CHUNK_OVERHEAD: u64 = 32;

/// Read connections kept open for reuse; more are opened when more readers come at once.
const IDLE_READERS: usize = 8;

/// How often the free space of the state directory's file system is looked at, at most.
const DISK_CHECK_INTERVAL: Duration = Duration::from_millis(250);

/// After a write failed for lack of space, the disk counts as full until this much more
/// than the reserve is free again.
const RECOVERED_FREE: u64 = 4 << 20;

/// What the store may spend on disk ([`Records::open_with`]).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct StoreLimits {
    /// Bytes kept per stream of each execution created through this handle, chunk overhead
    /// included.
    pub output_cap: u64,
    /// Bytes of output (chunk overhead included) kept for one VM, over all its executions;
    /// output past it is counted but not kept.
    pub vm_quota: u64,
    /// Free bytes the state directory's file system must keep; below it, output is counted
    /// but not kept and new executions are refused ([`Records::disk_problem`]).
    pub min_free: u64,
}

impl Default for StoreLimits {
    fn default() -> Self {
        Self {
            output_cap: DEFAULT_OUTPUT_CAP,
            vm_quota: u64::MAX,
            min_free: 0,
        }
    }
}

/// Whether the disk has room, as last looked at.
#[derive(Debug, Default)]
struct DiskWatch {
    checked: Option<std::time::Instant>,
    /// Why the disk is considered full, if it is.
    problem: Option<String>,
    /// A write failed for lack of space since the last check that found room.
    write_failed: bool,
}

/// The records database. One write connection behind a mutex (taken by the records writer,
/// [`writer::Writer`], and by the synchronous write calls of tests and tools), and a pool of
/// read connections: in WAL mode readers never wait for the writer, nor the writer for them,
/// so queries from the API never queue behind a burst of output. Share it with an `Arc`.
#[derive(Debug)]
pub struct Records {
    // Declared (and so dropped) before the write connection: the last connection to close
    // checkpoints the WAL into the file, and only the write connection can.
    readers: Mutex<Vec<Connection>>,
    conn: Mutex<Connection>,
    limits: StoreLimits,
    disk: Mutex<DiskWatch>,
    path: PathBuf,
    dir: PathBuf,
}

/// A read connection from the pool, returned to it on drop.
struct Reader<'a> {
    records: &'a Records,
    conn: Option<Connection>,
}

impl std::ops::Deref for Reader<'_> {
    type Target = Connection;
    fn deref(&self) -> &Connection {
        // The connection is only taken out in `drop`.
        self.conn.as_ref().unwrap_or_else(|| unreachable!())
    }
}

impl std::ops::DerefMut for Reader<'_> {
    fn deref_mut(&mut self) -> &mut Connection {
        self.conn.as_mut().unwrap_or_else(|| unreachable!())
    }
}

impl Drop for Reader<'_> {
    fn drop(&mut self) {
        if let Some(conn) = self.conn.take() {
            let mut pool = self
                .records
                .readers
                .lock()
                .unwrap_or_else(PoisonError::into_inner);
            if pool.len() < IDLE_READERS {
                pool.push(conn);
            }
        }
    }
}

impl Records {
    /// Opens (creating if needed) `portless.db` in `state_dir`, creating the directory with
    /// mode 0700 if it is missing (an existing directory keeps its mode) and the file with
    /// mode 0600, and brings the schema up to [`SCHEMA_VERSION`]. `output_cap` is the number of
    /// bytes kept per stream of each execution created through this handle
    /// ([`DEFAULT_OUTPUT_CAP`] unless configured otherwise), chunk overhead included.
    pub fn open(state_dir: &Path, output_cap: u64) -> Result<Self, RecordsError> {
        Self::open_with(
            state_dir,
            StoreLimits {
                output_cap,
                ..StoreLimits::default()
            },
        )
    }

    /// [`open`](Self::open) with every limit on what the store may spend.
    pub fn open_with(state_dir: &Path, limits: StoreLimits) -> Result<Self, RecordsError> {
        DirBuilder::new()
            .recursive(true)
            .mode(0o700)
            .create(state_dir)
            .map_err(|source| RecordsError::Create {
                path: state_dir.to_owned(),
                source,
            })?;
        let path = state_dir.join(DB_FILE_NAME);
        // Created here rather than by SQLite so that it is never readable by others; SQLite
        // gives the -wal and -shm files the same mode.
        crate::sys::open_private(&path).map_err(|source| RecordsError::Create {
            path: path.clone(),
            source,
        })?;
        let mut conn = Connection::open(&path)?;
        conn.busy_timeout(BUSY_TIMEOUT)?;
        // Pages freed by pruning go back to the file system (`incremental_vacuum`). It must
        // be chosen before the first table exists; a database of schema 1 is converted once
        // by `migrate`.
        conn.pragma_update(None, "auto_vacuum", "INCREMENTAL")?;
        let mode: String = conn.query_row("PRAGMA journal_mode = WAL", [], |r| r.get(0))?;
        if !mode.eq_ignore_ascii_case("wal") {
            return Err(RecordsError::Corrupt(format!(
                "journal mode is {mode}, not wal"
            )));
        }
        conn.pragma_update(None, "synchronous", "NORMAL")?;
        conn.pragma_update(None, "foreign_keys", true)?;
        migrate(&mut conn)?;
        Ok(Self {
            conn: Mutex::new(conn),
            readers: Mutex::new(Vec::new()),
            limits,
            disk: Mutex::new(DiskWatch::default()),
            path,
            dir: state_dir.to_owned(),
        })
    }

    /// The path of the database file.
    pub fn path(&self) -> &Path {
        &self.path
    }

    /// The cap on output bytes kept per stream for executions created from now on.
    pub fn output_cap(&self) -> u64 {
        self.limits.output_cap
    }

    /// The limits in force.
    pub fn limits(&self) -> StoreLimits {
        self.limits
    }

    /// The write connection. A panic while it was held cannot have left a transaction open
    /// (an uncommitted transaction rolls back when dropped), so a poisoned lock is taken
    /// anyway.
    fn conn(&self) -> MutexGuard<'_, Connection> {
        self.conn.lock().unwrap_or_else(PoisonError::into_inner)
    }

    /// A read connection (from the pool, or a new one).
    fn reader(&self) -> Result<Reader<'_>, RecordsError> {
        let pooled = self
            .readers
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .pop();
        let conn = match pooled {
            Some(c) => c,
            None => {
                let c = Connection::open_with_flags(
                    &self.path,
                    rusqlite::OpenFlags::SQLITE_OPEN_READ_ONLY
                        | rusqlite::OpenFlags::SQLITE_OPEN_NO_MUTEX,
                )?;
                c.busy_timeout(BUSY_TIMEOUT)?;
                c
            }
        };
        Ok(Reader {
            records: self,
            conn: Some(conn),
        })
    }

    /// Runs `f` in one write transaction on the write connection.
    pub(crate) fn write<T>(
        &self,
        f: impl FnOnce(&rusqlite::Transaction<'_>) -> Result<T, RecordsError>,
    ) -> Result<T, RecordsError> {
        let mut conn = self.conn();
        let tx = conn.transaction_with_behavior(TransactionBehavior::Immediate)?;
        let out = f(&tx).map_err(|e| self.note_write_error(e))?;
        tx.commit().map_err(|e| self.note_write_error(e.into()))?;
        Ok(out)
    }

    /// Why the disk is full, if it is: free space on the state directory's file system
    /// below `min_free`, or a write that failed for lack of space. Looked at no more often
    /// than every 250 ms. While it is, output is counted but not kept, and the API refuses
    /// new executions.
    pub fn disk_problem(&self) -> Option<String> {
        let mut disk = self.disk.lock().unwrap_or_else(PoisonError::into_inner);
        if disk
            .checked
            .is_none_or(|t| t.elapsed() >= DISK_CHECK_INTERVAL)
        {
            disk.checked = Some(std::time::Instant::now());
            let free = crate::sys::free_bytes(&self.dir);
            let recovered = self.limits.min_free.saturating_add(RECOVERED_FREE);
            if disk.write_failed && free.is_some_and(|f| f >= recovered) {
                disk.write_failed = false;
            }
            disk.problem = match free {
                Some(f) if f < self.limits.min_free => Some(format!(
                    "the disk of the state directory {} has {} free, less than the {} \
                     kept in reserve (records.min_free)",
                    self.dir.display(),
                    human_bytes(f),
                    human_bytes(self.limits.min_free)
                )),
                _ if disk.write_failed => Some(self.full_message()),
                _ => None,
            };
        }
        disk.problem.clone()
    }

    fn full_message(&self) -> String {
        format!(
            "the disk of the state directory {} is full (a write failed for lack of space)",
            self.dir.display()
        )
    }

    /// Notes a failed write: a full disk makes [`disk_problem`](Self::disk_problem) say so.
    pub(crate) fn note_write_error(&self, e: RecordsError) -> RecordsError {
        if e.is_disk_full() {
            let mut disk = self.disk.lock().unwrap_or_else(PoisonError::into_inner);
            disk.write_failed = true;
            disk.checked = Some(std::time::Instant::now());
            disk.problem = Some(self.full_message());
        }
        e
    }

    /// Records a new execution, [pending](ExecState::Pending), and returns its id.
    pub fn create_execution(&self, new: &NewExecution) -> Result<ExecutionId, RecordsError> {
        self.write(|tx| create_execution(tx, new, self.limits.output_cap))
    }

    /// Records that the agent accepted the execution as agent execution
    /// (`agent_generation`, `agent_counter`) at `started_at_ms`: the state becomes
    /// [running](ExecState::Running).
    ///
    /// Accepting again with the same agent id (a reply read twice across a daemon restart)
    /// changes nothing. Anything else that is not pending is [`RecordsError::NotPending`]; an
    /// agent id another execution on the same VM has is [`RecordsError::AgentIdInUse`].
    pub fn mark_accepted(
        &self,
        id: ExecutionId,
        agent_generation: u32,
        agent_counter: u32,
        started_at_ms: u64,
    ) -> Result<(), RecordsError> {
        self.write(|tx| mark_accepted(tx, id, agent_generation, agent_counter, started_at_ms))
    }

    /// Records how the execution ended. The end is recorded once: if the execution is already
    /// final, nothing changes and the answer is `false`; otherwise `true`.
    pub fn finish(&self, id: ExecutionId, end: &Finish) -> Result<bool, RecordsError> {
        self.write(|tx| finish(tx, id, end))
    }

    /// Adds a chunk of output that starts at byte `offset` of the stream, in one transaction.
    ///
    /// The agent sends a stream's chunks contiguously. A chunk that starts before the end of
    /// what was received (a resend after a daemon restart) adds only its part past that end,
    /// if any; a chunk that starts after it is [`RecordsError::OutputGap`] and adds nothing.
    /// Bytes are kept while the stream's cost (its bytes plus [`CHUNK_OVERHEAD`] per chunk)
    /// stays within the execution's output cap, the VM's output within its quota (the VM's
    /// oldest finished executions are deleted to make room) and the disk above its reserve; past that they are counted in the total but not kept, and the
    /// stream is then truncated. Output for an execution that has ended is
    /// [`RecordsError::Ended`] and changes nothing.
    pub fn append_output(
        &self,
        id: ExecutionId,
        stream: Stream,
        offset: u64,
        data: &[u8],
    ) -> Result<(), RecordsError> {
        let disk_full = self.disk_problem().is_some();
        self.write(|tx| append_output(tx, id, stream, offset, data, &self.limits, disk_full))
    }

    /// Adds an audit entry.
    pub fn audit(&self, entry: &AuditEntry) -> Result<(), RecordsError> {
        self.write(|tx| audit(tx, entry))
    }

    /// Bytes of output (chunk overhead included) stored for `vm`.
    pub fn vm_usage(&self, vm: &str) -> Result<u64, RecordsError> {
        let conn = self.reader()?;
        let used = conn
            .prepare_cached("SELECT stored_bytes, chunks FROM vm_usage WHERE vm = ?1")?
            .query_row([vm], |r| Ok((r.get::<_, u64>(0)?, r.get::<_, u64>(1)?)))
            .optional()?;
        Ok(used.map_or(0, |(stored, chunks)| {
            stored.saturating_add(chunks.saturating_mul(CHUNK_OVERHEAD))
        }))
    }

    /// The execution with this id, if there is one.
    pub fn execution(&self, id: ExecutionId) -> Result<Option<ExecutionRecord>, RecordsError> {
        let conn = self.reader()?;
        let record = conn
            .prepare_cached(&format!(
                "SELECT {EXECUTION_COLUMNS} FROM executions WHERE id = ?1"
            ))?
            .query_row([id.0], record_from_row)
            .optional()?;
        Ok(record)
    }

    /// The executions that match `filter`, newest (highest id) first.
    pub fn executions(
        &self,
        filter: &ExecutionQuery,
    ) -> Result<Vec<ExecutionRecord>, RecordsError> {
        let mut sql = format!("SELECT {EXECUTION_COLUMNS} FROM executions WHERE 1");
        let mut args: Vec<Value> = Vec::new();
        if let Some(vm) = &filter.vm {
            args.push(Value::Text(vm.clone()));
            sql += &format!(" AND vm = ?{}", args.len());
        }
        if let Some(principal) = &filter.principal {
            args.push(Value::Text(principal.clone()));
            sql += &format!(" AND principal = ?{}", args.len());
        }
        if let Some(state) = filter.state {
            args.push(Value::Text(state.as_str().to_owned()));
            sql += &format!(" AND state = ?{}", args.len());
        }
        if let Some(command) = &filter.command {
            args.push(Value::Text(command.clone()));
            sql += &format!(" AND command = ?{}", args.len());
        }
        if let Some(since) = filter.since_ms {
            args.push(Value::Integer(to_i64(since)));
            sql += &format!(" AND requested_at_ms >= ?{}", args.len());
        }
        if let Some(until) = filter.until_ms {
            args.push(Value::Integer(to_i64(until)));
            sql += &format!(" AND requested_at_ms < ?{}", args.len());
        }
        if let Some(before) = filter.before {
            args.push(Value::Integer(to_i64(before.0)));
            sql += &format!(" AND id < ?{}", args.len());
        }
        sql += " ORDER BY id DESC";
        push_limit(&mut sql, &mut args, filter.limit);
        let conn = self.reader()?;
        let mut stmt = conn.prepare_cached(&sql)?;
        let rows = stmt.query_map(params_from_iter(args), record_from_row)?;
        Ok(rows.collect::<Result<_, _>>()?)
    }

    /// Up to `max_len` bytes of the stream's kept output from `offset`, with the stream's
    /// totals. Past the kept bytes the answer is empty (the caller can tell from the totals
    /// whether more may come or the rest was dropped).
    pub fn read_output(
        &self,
        id: ExecutionId,
        stream: Stream,
        offset: u64,
        max_len: usize,
    ) -> Result<OutputSlice, RecordsError> {
        let (stored_col, total_col) = stream_columns(stream);
        let mut conn = self.reader()?;
        // One read transaction: the totals and the chunks are of the same moment.
        let tx = conn.transaction()?;
        let (stored, total) = tx
            .prepare_cached(&format!(
                "SELECT {stored_col}, {total_col} FROM executions WHERE id = ?1"
            ))?
            .query_row([id.0], |r| Ok((r.get::<_, u64>(0)?, r.get::<_, u64>(1)?)))
            .optional()?
            .ok_or(RecordsError::UnknownExecution(id))?;
        let start = offset.min(stored);
        let end = start
            .saturating_add(u64::try_from(max_len).unwrap_or(u64::MAX))
            .min(stored);
        let mut data = Vec::with_capacity(to_usize(end - start).unwrap_or(0));
        if start < end {
            // The chunk holding `start` is the last one that starts at or before it.
            let mut stmt = tx.prepare_cached(
                "SELECT offset, data FROM output \
                 WHERE execution = ?1 AND stream = ?2 AND offset < ?4 AND offset >= \
                   (SELECT COALESCE(MAX(offset), 0) FROM output \
                    WHERE execution = ?1 AND stream = ?2 AND offset <= ?3) \
                 ORDER BY offset",
            )?;
            let mut rows = stmt.query(params![id.0, stream_code(stream), start, end])?;
            while let Some(row) = rows.next()? {
                let chunk_offset: u64 = row.get(0)?;
                let chunk = row
                    .get_ref(1)?
                    .as_blob()
                    .map_err(|e| RecordsError::Corrupt(format!("output chunk: {e}")))?;
                let at = start + data.len() as u64;
                // Chunks are contiguous, so each begins where the copy stands (the first one
                // may begin before `start`).
                let from = at
                    .checked_sub(chunk_offset)
                    .filter(|_| chunk_offset == at || data.is_empty())
                    .and_then(to_usize)
                    .filter(|&from| from < chunk.len())
                    .ok_or_else(|| missing_output(id, stream, at))?;
                let want = to_usize(end - at).unwrap_or(usize::MAX);
                let take = (chunk.len() - from).min(want);
                data.extend_from_slice(&chunk[from..from + take]);
            }
            if data.len() as u64 != end - start {
                return Err(missing_output(id, stream, start + data.len() as u64));
            }
        }
        Ok(OutputSlice {
            offset: start,
            data,
            stored_len: stored,
            total_len: total,
            truncated: stored < total,
        })
    }

    /// The execution on `vm` that the agent knows as (`generation`, `counter`), if any.
    pub fn find_by_agent_id(
        &self,
        vm: &str,
        generation: u32,
        counter: u32,
    ) -> Result<Option<ExecutionId>, RecordsError> {
        find_by_agent_id(&*self.reader()?, vm, generation, counter)
    }

    /// The execution that carries out fleet invocation `invocation`, if one was recorded.
    pub fn find_by_fleet_invocation(
        &self,
        invocation: u64,
    ) -> Result<Option<ExecutionId>, RecordsError> {
        let conn = self.reader()?;
        let id: Option<i64> = conn
            .prepare_cached("SELECT id FROM executions WHERE fleet_invocation = ?1")?
            .query_row([invocation], |r| r.get(0))
            .optional()?;
        id.map(id_from_rowid).transpose()
    }

    /// The executions on `vm` that have not ended (pending or running), oldest first: what is
    /// left to reconcile with the agent after a daemon restart.
    pub fn unfinished(&self, vm: &str) -> Result<Vec<ExecutionRecord>, RecordsError> {
        let conn = self.reader()?;
        let mut stmt = conn.prepare_cached(&format!(
            "SELECT {EXECUTION_COLUMNS} FROM executions \
             WHERE vm = ?1 AND state IN ('pending', 'running') ORDER BY id"
        ))?;
        let rows = stmt.query_map([vm], record_from_row)?;
        Ok(rows.collect::<Result<_, _>>()?)
    }

    /// The audit entries that match `filter`, in insertion order, oldest or newest first as
    /// `filter.order` says; a limit keeps the first entries of that order.
    pub fn audit_log(&self, filter: &AuditQuery) -> Result<Vec<AuditRecord>, RecordsError> {
        let mut sql = String::from(
            "SELECT id, at_ms, principal, caller, action, target, allowed, reason, count \
             FROM audit WHERE 1",
        );
        let mut args: Vec<Value> = Vec::new();
        if let Some(principal) = &filter.principal {
            args.push(Value::Text(principal.clone()));
            sql += &format!(" AND principal = ?{}", args.len());
        }
        if let Some(action) = &filter.action {
            args.push(Value::Text(action.clone()));
            sql += &format!(" AND action = ?{}", args.len());
        }
        if let Some(allowed) = filter.allowed {
            args.push(Value::Integer(allowed.into()));
            sql += &format!(" AND allowed = ?{}", args.len());
        }
        if let Some(since) = filter.since_ms {
            args.push(Value::Integer(to_i64(since)));
            sql += &format!(" AND at_ms >= ?{}", args.len());
        }
        sql += match filter.order {
            AuditOrder::Oldest => " ORDER BY id ASC",
            AuditOrder::Newest => " ORDER BY id DESC",
        };
        push_limit(&mut sql, &mut args, filter.limit);
        let conn = self.reader()?;
        let mut stmt = conn.prepare_cached(&sql)?;
        let rows = stmt.query_map(params_from_iter(args), |r| {
            Ok(AuditRecord {
                id: r.get(0)?,
                entry: AuditEntry {
                    at_ms: r.get(1)?,
                    principal: r.get(2)?,
                    caller: r.get(3)?,
                    action: r.get(4)?,
                    target: r.get(5)?,
                    allowed: r.get(6)?,
                    reason: r.get(7)?,
                    count: r.get(8)?,
                },
            })
        })?;
        Ok(rows.collect::<Result<_, _>>()?)
    }
}

/// Brings the schema from its `user_version` up to [`SCHEMA_VERSION`], each step in a
/// transaction of its own.
fn migrate(conn: &mut Connection) -> Result<(), RecordsError> {
    let found: i64 = conn.pragma_query_value(None, "user_version", |r| r.get(0))?;
    let done = usize::try_from(found)
        .ok()
        .filter(|_| found <= SCHEMA_VERSION)
        .ok_or(RecordsError::UnsupportedSchema {
            found,
            supported: SCHEMA_VERSION,
        })?;
    for (from, step) in (0_i64..).zip(MIGRATIONS).skip(done) {
        let tx = conn.transaction_with_behavior(TransactionBehavior::Exclusive)?;
        tx.execute_batch(step)?;
        tx.pragma_update(None, "user_version", from + 1)?;
        tx.commit()?;
    }
    // A database created before schema 2 has no incremental vacuum: convert it once (a
    // VACUUM rewrites the file, so pruning can give pages back to the file system).
    let vacuum: i64 = conn.pragma_query_value(None, "auto_vacuum", |r| r.get(0))?;
    if vacuum != 2 {
        conn.pragma_update(None, "auto_vacuum", "INCREMENTAL")?;
        conn.execute_batch("VACUUM")?;
    }
    Ok(())
}

/// `NewExecution` into `executions`, pending, with the cap in force.
fn create_execution(
    conn: &Connection,
    new: &NewExecution,
    output_cap: u64,
) -> Result<ExecutionId, RecordsError> {
    let args = serde_json::to_string(&new.args)
        .map_err(|e| RecordsError::Corrupt(format!("arguments: {e}")))?;
    conn.prepare_cached(
        "INSERT INTO executions (principal, vm, command, args, state, requested_at_ms, \
         output_cap, fleet_invocation) VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7, ?8)",
    )?
    .execute(params![
        new.principal,
        new.vm,
        new.command,
        args,
        StoredState(ExecState::Pending),
        new.requested_at_ms,
        output_cap,
        new.fleet_invocation,
    ])?;
    id_from_rowid(conn.last_insert_rowid())
}

/// See [`Records::mark_accepted`].
fn mark_accepted(
    conn: &Connection,
    id: ExecutionId,
    agent_generation: u32,
    agent_counter: u32,
    started_at_ms: u64,
) -> Result<(), RecordsError> {
    let (vm, state, generation, counter) = conn
        .prepare_cached(
            "SELECT vm, state, agent_generation, agent_counter FROM executions WHERE id = ?1",
        )?
        .query_row([id.0], |r| {
            Ok((
                r.get::<_, String>(0)?,
                r.get::<_, StoredState>(1)?.0,
                r.get::<_, Option<u32>>(2)?,
                r.get::<_, Option<u32>>(3)?,
            ))
        })
        .optional()?
        .ok_or(RecordsError::UnknownExecution(id))?;
    match state {
        ExecState::Pending => {}
        ExecState::Running
            if generation == Some(agent_generation) && counter == Some(agent_counter) =>
        {
            return Ok(());
        }
        _ => return Err(RecordsError::NotPending { id, state }),
    }
    if let Some(existing) = find_by_agent_id(conn, &vm, agent_generation, agent_counter)? {
        return Err(RecordsError::AgentIdInUse {
            vm,
            generation: agent_generation,
            counter: agent_counter,
            existing,
        });
    }
    conn.prepare_cached(
        "UPDATE executions SET state = ?2, agent_generation = ?3, agent_counter = ?4, \
         started_at_ms = ?5 WHERE id = ?1",
    )?
    .execute(params![
        id.0,
        StoredState(ExecState::Running),
        agent_generation,
        agent_counter,
        started_at_ms
    ])?;
    Ok(())
}

/// See [`Records::finish`].
fn finish(conn: &Connection, id: ExecutionId, end: &Finish) -> Result<bool, RecordsError> {
    if !end.state.is_final() {
        return Err(RecordsError::NotFinal(end.state));
    }
    let changed = conn
        .prepare_cached(
            "UPDATE executions SET state = ?2, exit_code = ?3, signal = ?4, \
             finished_at_ms = ?5, duration_ms = ?6, detail = ?7 \
             WHERE id = ?1 AND state IN ('pending', 'running')",
        )?
        .execute(params![
            id.0,
            StoredState(end.state),
            end.exit_code,
            end.signal,
            end.finished_at_ms,
            end.duration_ms,
            end.detail,
        ])?;
    if changed == 0 {
        let exists = conn
            .prepare_cached("SELECT 1 FROM executions WHERE id = ?1")?
            .exists([id.0])?;
        return if exists {
            Ok(false)
        } else {
            Err(RecordsError::UnknownExecution(id))
        };
    }
    Ok(true)
}

/// See [`Records::append_output`]; `disk_full` says whether the disk is below its reserve.
fn append_output(
    conn: &Connection,
    id: ExecutionId,
    stream: Stream,
    offset: u64,
    data: &[u8],
    limits: &StoreLimits,
    disk_full: bool,
) -> Result<(), RecordsError> {
    let overflow = RecordsError::OutputOverflow { id, stream, offset };
    let end = u64::try_from(data.len())
        .ok()
        .and_then(|len| offset.checked_add(len))
        .filter(|&end| i64::try_from(end).is_ok())
        .ok_or(overflow)?;
    let (stored_col, total_col) = stream_columns(stream);
    let chunks_col = chunks_column(stream);
    let (vm, state, cap, stored, total, chunks) = conn
        .prepare_cached(&format!(
            "SELECT vm, state, output_cap, {stored_col}, {total_col}, {chunks_col} \
             FROM executions WHERE id = ?1"
        ))?
        .query_row([id.0], |r| {
            Ok((
                r.get::<_, String>(0)?,
                r.get::<_, StoredState>(1)?.0,
                r.get::<_, u64>(2)?,
                r.get::<_, u64>(3)?,
                r.get::<_, u64>(4)?,
                r.get::<_, u64>(5)?,
            ))
        })
        .optional()?
        .ok_or(RecordsError::UnknownExecution(id))?;
    if state.is_final() {
        return Err(RecordsError::Ended { id, state });
    }
    if offset > total {
        return Err(RecordsError::OutputGap {
            id,
            stream,
            offset,
            received: total,
        });
    }
    if end <= total {
        return Ok(()); // all of it is here already
    }
    // `offset <= total < end`, so the new part is a non-empty tail of `data`.
    let new = to_usize(total - offset)
        .and_then(|skip| data.get(skip..))
        .ok_or_else(|| RecordsError::Corrupt("output offsets out of range".into()))?;
    let mut new_stored = stored;
    let mut new_chunks = chunks;
    // Kept bytes are always a prefix of the stream: once any byte was dropped, none after
    // it is kept.
    if stored == total && !disk_full {
        let used = stored.saturating_add(chunks.saturating_mul(CHUNK_OVERHEAD));
        let (vm_stored, vm_chunks) = conn
            .prepare_cached("SELECT stored_bytes, chunks FROM vm_usage WHERE vm = ?1")?
            .query_row([&vm], |r| Ok((r.get::<_, u64>(0)?, r.get::<_, u64>(1)?)))
            .optional()?
            .unwrap_or((0, 0));
        let mut vm_used = vm_stored.saturating_add(vm_chunks.saturating_mul(CHUNK_OVERHEAD));
        let wanted = (new.len() as u64).saturating_add(CHUNK_OVERHEAD);
        if vm_used.saturating_add(wanted) > limits.vm_quota && limits.vm_quota != u64::MAX {
            // The VM is at its quota: its oldest finished executions make room for this.
            vm_used = retention::make_room(conn, &vm, vm_used, wanted, limits.vm_quota)?;
        }
        let room = cap
            .saturating_sub(used)
            .min(limits.vm_quota.saturating_sub(vm_used))
            .saturating_sub(CHUNK_OVERHEAD);
        let keep = to_usize(room).map_or(new.len(), |room| room.min(new.len()));
        if keep > 0 {
            conn.prepare_cached(
                "INSERT INTO output (execution, stream, offset, data) VALUES (?1, ?2, ?3, ?4)",
            )?
            .execute(params![id.0, stream_code(stream), total, &new[..keep]])?;
            conn.prepare_cached(
                "INSERT INTO vm_usage (vm, stored_bytes, chunks) VALUES (?1, ?2, 1) \
                 ON CONFLICT (vm) DO UPDATE SET stored_bytes = stored_bytes + ?2, \
                 chunks = chunks + 1",
            )?
            .execute(params![vm, keep as u64])?;
            new_stored = total + keep as u64;
            new_chunks += 1;
        }
    }
    conn.prepare_cached(&format!(
        "UPDATE executions SET {stored_col} = ?2, {total_col} = ?3, {chunks_col} = ?4 \
         WHERE id = ?1"
    ))?
    .execute(params![id.0, new_stored, end, new_chunks])?;
    Ok(())
}

/// One audit row.
fn audit(conn: &Connection, entry: &AuditEntry) -> Result<(), RecordsError> {
    conn.prepare_cached(
        "INSERT INTO audit (at_ms, principal, caller, action, target, allowed, reason, count) \
         VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7, ?8)",
    )?
    .execute(params![
        entry.at_ms,
        entry.principal,
        entry.caller,
        entry.action,
        entry.target,
        entry.allowed,
        entry.reason,
        entry.count,
    ])?;
    Ok(())
}

/// `1.5 MiB`, for messages.
pub fn human_bytes(n: u64) -> String {
    const UNITS: [&str; 5] = ["bytes", "KiB", "MiB", "GiB", "TiB"];
    let mut value = n as f64;
    let mut unit = 0;
    while value >= 1024.0 && unit + 1 < UNITS.len() {
        value /= 1024.0;
        unit += 1;
    }
    if unit == 0 {
        format!("{n} bytes")
    } else {
        format!("{value:.1} {}", UNITS[unit])
    }
}

fn find_by_agent_id(
    conn: &Connection,
    vm: &str,
    generation: u32,
    counter: u32,
) -> Result<Option<ExecutionId>, RecordsError> {
    let id = conn
        .prepare_cached(
            "SELECT id FROM executions \
             WHERE vm = ?1 AND agent_generation = ?2 AND agent_counter = ?3",
        )?
        .query_row(params![vm, generation, counter], |r| r.get(0))
        .optional()?;
    Ok(id.map(ExecutionId))
}

fn record_from_row(r: &Row<'_>) -> rusqlite::Result<ExecutionRecord> {
    let args: String = r.get(4)?;
    let args = serde_json::from_str(&args)
        .map_err(|e| rusqlite::Error::FromSqlConversionFailure(4, Type::Text, e.into()))?;
    Ok(ExecutionRecord {
        id: ExecutionId(r.get(0)?),
        principal: r.get(1)?,
        vm: r.get(2)?,
        command: r.get(3)?,
        args,
        state: r.get::<_, StoredState>(5)?.0,
        requested_at_ms: r.get(6)?,
        started_at_ms: r.get(7)?,
        finished_at_ms: r.get(8)?,
        duration_ms: r.get(9)?,
        exit_code: r.get(10)?,
        signal: r.get(11)?,
        detail: r.get(12)?,
        agent_generation: r.get(13)?,
        agent_counter: r.get(14)?,
        output_cap: r.get(15)?,
        stdout: StreamTotals::new(r.get(16)?, r.get(17)?),
        stderr: StreamTotals::new(r.get(18)?, r.get(19)?),
    })
}

/// Milliseconds since the Unix epoch, now.
pub fn now_ms() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| u64::try_from(d.as_millis()).unwrap_or(u64::MAX))
}

fn id_from_rowid(rowid: i64) -> Result<ExecutionId, RecordsError> {
    u64::try_from(rowid)
        .map(ExecutionId)
        .map_err(|_| RecordsError::Corrupt(format!("negative execution id {rowid}")))
}

/// Appends `LIMIT ?n` when there is a limit.
fn push_limit(sql: &mut String, args: &mut Vec<Value>, limit: Option<usize>) {
    if let Some(limit) = limit {
        args.push(Value::Integer(i64::try_from(limit).unwrap_or(i64::MAX)));
        *sql += &format!(" LIMIT ?{}", args.len());
    }
}

/// A filter bound as SQLite's `i64`; values past `i64::MAX` match as `i64::MAX`, which no
/// stored value exceeds.
fn to_i64(value: u64) -> i64 {
    i64::try_from(value).unwrap_or(i64::MAX)
}

fn to_usize(value: u64) -> Option<usize> {
    usize::try_from(value).ok()
}

fn missing_output(id: ExecutionId, stream: Stream, at: u64) -> RecordsError {
    RecordsError::Corrupt(format!(
        "execution {id} {stream}: stored output missing at offset {at}"
    ))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn states_round_trip_through_names_and_serde() {
        for state in ExecState::ALL {
            assert_eq!(ExecState::from_name(state.as_str()), Some(state));
            let json = serde_json::to_string(&state).expect("serialise");
            assert_eq!(json, format!("\"{state}\""));
        }
        assert_eq!(ExecState::from_name("done"), None);
        let open: Vec<_> = ExecState::ALL
            .into_iter()
            .filter(|s| !s.is_final())
            .collect();
        assert_eq!(
            open,
            [
                ExecState::Pending,
                ExecState::Running,
                ExecState::Delayed,
                ExecState::InProgress
            ]
        );
    }

    #[test]
    fn ids_display_as_numbers() {
        assert_eq!(ExecutionId(42).to_string(), "42");
        assert_eq!(
            serde_json::to_string(&ExecutionId(42)).expect("serialise"),
            "42"
        );
    }

    #[test]
    fn migrations_match_the_schema_version() {
        assert_eq!(MIGRATIONS.len() as i64, SCHEMA_VERSION);
    }
}
