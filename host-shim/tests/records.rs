//! The records database against real SQLite files: the execution life cycle, output with its
//! cap, resends and gaps across a reopen (a daemon restart), audit queries, two threads at
//! once, and a thousand executions with every byte accounted for.

use std::os::unix::fs::PermissionsExt;
use std::path::PathBuf;
use std::sync::Arc;
use std::sync::atomic::{AtomicU32, Ordering};
use std::time::Instant;

use host_shim::records::{
    AuditEntry, AuditOrder, AuditQuery, CHUNK_OVERHEAD, DB_FILE_NAME, DEFAULT_OUTPUT_CAP,
    ExecState, ExecutionId, ExecutionQuery, Finish, NewExecution, Records, RecordsError,
    SCHEMA_VERSION, Stream,
};

/// What a stored chunk costs beyond its bytes, as the caps count it.
const O: u64 = CHUNK_OVERHEAD;

/// A fresh, empty directory for one test.
fn scratch(name: &str) -> PathBuf {
    static NEXT: AtomicU32 = AtomicU32::new(0);
    // Ordering: only uniqueness matters.
    let n = NEXT.fetch_add(1, Ordering::Relaxed);
    let dir = PathBuf::from(env!("CARGO_TARGET_TMPDIR"))
        .join("records")
        .join(format!("{name}-{}-{n}", std::process::id()));
    let _ = std::fs::remove_dir_all(&dir);
    dir
}

fn new_exec(vm: &str, principal: &str, at: u64) -> NewExecution {
    NewExecution {
        principal: principal.to_owned(),
        vm: vm.to_owned(),
        command: "sleep".to_owned(),
        args: vec!["5".to_owned(), "with space é".to_owned()],
        requested_at_ms: at,
        fleet_invocation: None,
    }
}

fn exited(code: i32, at: u64) -> Finish {
    Finish {
        state: if code == 0 {
            ExecState::Succeeded
        } else {
            ExecState::Failed
        },
        exit_code: Some(code),
        signal: None,
        finished_at_ms: at,
        duration_ms: Some(7),
        detail: None,
    }
}

fn stdout_all(records: &Records, id: ExecutionId) -> Vec<u8> {
    let slice = records
        .read_output(id, Stream::Stdout, 0, usize::MAX)
        .expect("read");
    assert_eq!(slice.data.len() as u64, slice.stored_len);
    slice.data
}

/// Deterministic bytes that differ by execution and position.
fn pattern(seed: u64, len: usize) -> Vec<u8> {
    let mut x = seed.wrapping_mul(0x9E37_79B9_7F4A_7C15) | 1;
    (0..len)
        .map(|_| {
            x ^= x << 13;
            x ^= x >> 7;
            x ^= x << 17;
            x as u8
        })
        .collect()
}

#[test]
fn open_creates_a_private_directory_and_database() {
    let dir = scratch("open").join("nested");
    let records = Records::open(&dir, DEFAULT_OUTPUT_CAP).expect("open");
    assert_eq!(records.path(), dir.join(DB_FILE_NAME));
    assert_eq!(records.output_cap(), 16 * 1024 * 1024);
    let mode = |p: &std::path::Path| std::fs::metadata(p).expect("stat").permissions().mode();
    assert_eq!(mode(&dir) & 0o777, 0o700);
    assert_eq!(mode(&dir.join(DB_FILE_NAME)) & 0o777, 0o600);
    drop(records);

    let conn = rusqlite::Connection::open(dir.join(DB_FILE_NAME)).expect("sqlite");
    let version: i64 = conn
        .pragma_query_value(None, "user_version", |r| r.get(0))
        .expect("user_version");
    assert_eq!(version, SCHEMA_VERSION);
    let journal: String = conn
        .pragma_query_value(None, "journal_mode", |r| r.get(0))
        .expect("journal_mode");
    assert_eq!(journal, "wal");
    drop(conn);
    // Opening again migrates nothing and keeps working.
    let records = Records::open(&dir, DEFAULT_OUTPUT_CAP).expect("reopen");
    records
        .create_execution(&new_exec("vm1", "alice", 1))
        .expect("create");
}

#[test]
fn a_newer_schema_is_refused() {
    let dir = scratch("schema");
    drop(Records::open(&dir, 100).expect("open"));
    let conn = rusqlite::Connection::open(dir.join(DB_FILE_NAME)).expect("sqlite");
    conn.pragma_update(None, "user_version", SCHEMA_VERSION + 1)
        .expect("set version");
    drop(conn);
    match Records::open(&dir, 100) {
        Err(RecordsError::UnsupportedSchema { found, supported }) => {
            assert_eq!((found, supported), (SCHEMA_VERSION + 1, SCHEMA_VERSION));
        }
        other => panic!("expected UnsupportedSchema, got {other:?}"),
    }
    let conn = rusqlite::Connection::open(dir.join(DB_FILE_NAME)).expect("sqlite");
    conn.pragma_update(None, "user_version", -1)
        .expect("set version");
    drop(conn);
    assert!(matches!(
        Records::open(&dir, 100),
        Err(RecordsError::UnsupportedSchema { found: -1, .. })
    ));
}

#[test]
fn create_accept_finish_records_the_end_once() {
    let dir = scratch("lifecycle");
    let records = Records::open(&dir, 1024).expect("open");
    let id = records
        .create_execution(&new_exec("vm1", "alice", 1_000))
        .expect("create");
    assert_eq!(id.to_string(), id.0.to_string());

    let rec = records.execution(id).expect("get").expect("exists");
    assert_eq!(rec.state, ExecState::Pending);
    assert_eq!(
        (
            rec.vm.as_str(),
            rec.principal.as_str(),
            rec.command.as_str()
        ),
        ("vm1", "alice", "sleep")
    );
    assert_eq!(rec.args, ["5", "with space é"]);
    assert_eq!(rec.requested_at_ms, 1_000);
    assert_eq!(rec.started_at_ms, None);
    assert_eq!((rec.agent_generation, rec.agent_counter), (None, None));
    assert_eq!(rec.output_cap, 1024);

    records.mark_accepted(id, 7, 1, 1_010).expect("accept");
    // The same acceptance read twice (across a restart) is fine.
    records
        .mark_accepted(id, 7, 1, 1_020)
        .expect("accept again");
    let rec = records.execution(id).expect("get").expect("exists");
    assert_eq!(rec.state, ExecState::Running);
    assert_eq!(rec.started_at_ms, Some(1_010));
    assert_eq!(
        (rec.agent_generation, rec.agent_counter),
        (Some(7), Some(1))
    );
    assert!(matches!(
        records.mark_accepted(id, 7, 2, 1_030),
        Err(RecordsError::NotPending {
            state: ExecState::Running,
            ..
        })
    ));

    let running = Finish {
        state: ExecState::Running,
        ..exited(0, 2_000)
    };
    assert!(matches!(
        records.finish(id, &running),
        Err(RecordsError::NotFinal(ExecState::Running))
    ));

    assert!(records.finish(id, &exited(3, 2_000)).expect("finish"));
    let first = records.execution(id).expect("get").expect("exists");
    assert_eq!(first.state, ExecState::Failed);
    assert_eq!(first.exit_code, Some(3));
    assert_eq!(first.finished_at_ms, Some(2_000));
    assert_eq!(first.duration_ms, Some(7));

    // Recorded once: a second end changes nothing.
    let lost = Finish {
        state: ExecState::AgentLost,
        exit_code: None,
        signal: None,
        finished_at_ms: 3_000,
        duration_ms: None,
        detail: Some("agent restarted".into()),
    };
    assert!(!records.finish(id, &lost).expect("finish again"));
    assert_eq!(records.execution(id).expect("get").expect("exists"), first);
    assert!(matches!(
        records.mark_accepted(id, 8, 1, 3_000),
        Err(RecordsError::NotPending {
            state: ExecState::Failed,
            ..
        })
    ));

    // A pending execution can end without ever running.
    let rejected = records
        .create_execution(&new_exec("vm1", "alice", 4_000))
        .expect("create");
    let end = Finish {
        state: ExecState::Rejected,
        exit_code: None,
        signal: None,
        finished_at_ms: 4_001,
        duration_ms: None,
        detail: Some("unknown command".into()),
    };
    assert!(records.finish(rejected, &end).expect("reject"));
    let rec = records.execution(rejected).expect("get").expect("exists");
    assert_eq!(rec.state, ExecState::Rejected);
    assert_eq!(rec.detail.as_deref(), Some("unknown command"));
    assert!(rejected > id);

    let missing = ExecutionId(9_999);
    assert!(records.execution(missing).expect("get").is_none());
    assert!(matches!(
        records.finish(missing, &end),
        Err(RecordsError::UnknownExecution(m)) if m == missing
    ));
    assert!(matches!(
        records.mark_accepted(missing, 1, 1, 1),
        Err(RecordsError::UnknownExecution(_))
    ));
    assert!(matches!(
        records.append_output(missing, Stream::Stdout, 0, b"x"),
        Err(RecordsError::UnknownExecution(_))
    ));
    assert!(matches!(
        records.read_output(missing, Stream::Stdout, 0, 1),
        Err(RecordsError::UnknownExecution(_))
    ));
}

#[test]
fn output_beyond_the_cap_is_counted_but_not_kept() {
    let dir = scratch("cap");
    // Ten bytes in three chunks: the cap counts each chunk's overhead too.
    let records = Records::open(&dir, 10 + 3 * O).expect("open");
    let id = records
        .create_execution(&new_exec("vm1", "alice", 1))
        .expect("create");
    records
        .append_output(id, Stream::Stdout, 0, b"abcd")
        .expect("append");
    records
        .append_output(id, Stream::Stdout, 4, b"efgh")
        .expect("append");
    let rec = records.execution(id).expect("get").expect("exists");
    assert_eq!(
        (
            rec.stdout.stored_len,
            rec.stdout.total_len,
            rec.stdout.truncated
        ),
        (8, 8, false)
    );
    records
        .append_output(id, Stream::Stdout, 8, b"ijkl")
        .expect("append across the cap");
    records
        .append_output(id, Stream::Stdout, 12, b"mnopq")
        .expect("append past the cap");
    records
        .append_output(id, Stream::Stdout, 17, b"")
        .expect("empty append");
    let rec = records.execution(id).expect("get").expect("exists");
    assert_eq!(
        (
            rec.stdout.stored_len,
            rec.stdout.total_len,
            rec.stdout.truncated
        ),
        (10, 17, true)
    );
    // The other stream is untouched and has a cap of its own (one chunk of ten bytes fits).
    assert_eq!((rec.stderr.stored_len, rec.stderr.total_len), (0, 0));
    assert!(!rec.stderr.truncated);
    records
        .append_output(id, Stream::Stderr, 0, b"0123456789")
        .expect("within the cap");
    let rec = records.execution(id).expect("get").expect("exists");
    assert_eq!(
        (
            rec.stderr.stored_len,
            rec.stderr.total_len,
            rec.stderr.truncated
        ),
        (10, 10, false)
    );

    let slice = records
        .read_output(id, Stream::Stdout, 0, 100)
        .expect("read");
    assert_eq!(slice.data, b"abcdefghij");
    assert_eq!(
        (
            slice.offset,
            slice.stored_len,
            slice.total_len,
            slice.truncated
        ),
        (0, 10, 17, true)
    );
    let past = records
        .read_output(id, Stream::Stdout, 12, 100)
        .expect("read past");
    assert!(past.data.is_empty());
    assert_eq!(past.offset, 10);
    assert_eq!(
        records
            .read_output(id, Stream::Stderr, 0, 100)
            .expect("read")
            .data,
        b"0123456789"
    );

    // Executions keep the cap they were created with.
    drop(records);
    let records = Records::open(&dir, 20 + 3 * O).expect("reopen with a larger cap");
    records
        .append_output(id, Stream::Stdout, 17, b"rs")
        .expect("append");
    let rec = records.execution(id).expect("get").expect("exists");
    assert_eq!(rec.output_cap, 10 + 3 * O);
    assert_eq!((rec.stdout.stored_len, rec.stdout.total_len), (10, 19));
    assert_eq!(stdout_all(&records, id), b"abcdefghij");
    let newer = records
        .create_execution(&new_exec("vm1", "alice", 2))
        .expect("create");
    assert_eq!(
        records
            .execution(newer)
            .expect("get")
            .expect("exists")
            .output_cap,
        20 + 3 * O
    );
}

#[test]
fn a_resend_after_a_restart_adds_only_its_new_part() {
    let dir = scratch("resend");
    // Twelve bytes of stdout in three chunks.
    let cap = 12 + 3 * O;
    let records = Records::open(&dir, cap).expect("open");
    let id = records
        .create_execution(&new_exec("vm1", "alice", 1))
        .expect("create");
    records.mark_accepted(id, 3, 9, 2).expect("accept");
    records
        .append_output(id, Stream::Stdout, 0, b"hello ")
        .expect("append");
    records
        .append_output(id, Stream::Stderr, 0, b"warn")
        .expect("append");
    drop(records);

    // The daemon restarts: everything is still there.
    let records = Records::open(&dir, cap).expect("reopen");
    let rec = records.execution(id).expect("get").expect("exists");
    assert_eq!(rec.state, ExecState::Running);
    assert_eq!(stdout_all(&records, id), b"hello ");
    assert_eq!(rec.stderr.total_len, 4);

    // Frames read again from the ring: one wholly old, one half old.
    records
        .append_output(id, Stream::Stdout, 0, b"hello ")
        .expect("duplicate");
    records
        .append_output(id, Stream::Stdout, 2, b"llo world")
        .expect("overlap");
    assert_eq!(stdout_all(&records, id), b"hello world");
    let rec = records.execution(id).expect("get").expect("exists");
    assert_eq!((rec.stdout.stored_len, rec.stdout.total_len), (11, 11));

    // An overlapping resend that crosses the cap.
    records
        .append_output(id, Stream::Stdout, 6, b"world!!!")
        .expect("overlap past the cap");
    let rec = records.execution(id).expect("get").expect("exists");
    assert_eq!(
        (
            rec.stdout.stored_len,
            rec.stdout.total_len,
            rec.stdout.truncated
        ),
        (12, 14, true)
    );
    assert_eq!(stdout_all(&records, id), b"hello world!");
    // A resend wholly past the cap, partly new.
    records
        .append_output(id, Stream::Stdout, 13, b"!??")
        .expect("resend past the cap");
    let rec = records.execution(id).expect("get").expect("exists");
    assert_eq!((rec.stdout.stored_len, rec.stdout.total_len), (12, 16));
    assert_eq!(stdout_all(&records, id), b"hello world!");

    // The exit, read twice, is recorded once.
    assert!(records.finish(id, &exited(0, 10)).expect("finish"));
    drop(records);
    let records = Records::open(&dir, cap).expect("reopen");
    assert!(!records.finish(id, &exited(0, 11)).expect("finish again"));
    let rec = records.execution(id).expect("get").expect("exists");
    assert_eq!(rec.state, ExecState::Succeeded);
    assert_eq!(rec.finished_at_ms, Some(10));
}

#[test]
fn a_gap_in_the_output_is_an_error_and_stores_nothing() {
    let dir = scratch("gap");
    let records = Records::open(&dir, 100).expect("open");
    let id = records
        .create_execution(&new_exec("vm1", "alice", 1))
        .expect("create");
    match records.append_output(id, Stream::Stdout, 1, b"x") {
        Err(RecordsError::OutputGap {
            id: gap_id,
            stream,
            offset,
            received,
        }) => {
            assert_eq!(
                (gap_id, stream, offset, received),
                (id, Stream::Stdout, 1, 0)
            );
        }
        other => panic!("expected a gap, got {other:?}"),
    }
    records
        .append_output(id, Stream::Stdout, 0, b"abc")
        .expect("append");
    let err = records
        .append_output(id, Stream::Stdout, 4, b"e")
        .expect_err("gap");
    assert!(err.to_string().contains("offset 4"), "{err}");
    assert!(matches!(
        records.append_output(id, Stream::Stdout, u64::MAX - 1, b"abcd"),
        Err(RecordsError::OutputOverflow { .. })
    ));
    let rec = records.execution(id).expect("get").expect("exists");
    assert_eq!((rec.stdout.stored_len, rec.stdout.total_len), (3, 3));
    assert_eq!(stdout_all(&records, id), b"abc");
}

#[test]
fn reads_assemble_ranges_across_chunk_boundaries() {
    let dir = scratch("ranges");
    let records = Records::open(&dir, 1 << 20).expect("open");
    let id = records
        .create_execution(&new_exec("vm1", "alice", 1))
        .expect("create");
    let all = pattern(1, 40);
    let mut at = 0;
    for len in [1, 3, 5, 1, 7, 2, 9, 4, 8] {
        records
            .append_output(id, Stream::Stderr, at as u64, &all[at..at + len])
            .expect("append");
        at += len;
    }
    assert_eq!(at, all.len());
    for offset in 0..=all.len() + 2 {
        for max_len in 0..=all.len() + 2 {
            let slice = records
                .read_output(id, Stream::Stderr, offset as u64, max_len)
                .expect("read");
            let start = offset.min(all.len());
            let end = (start + max_len).min(all.len());
            assert_eq!(slice.offset, start as u64);
            assert_eq!(
                slice.data,
                &all[start..end],
                "offset {offset} max_len {max_len}"
            );
            assert_eq!((slice.stored_len, slice.total_len), (40, 40));
            assert!(!slice.truncated);
        }
    }
    let stdout = records
        .read_output(id, Stream::Stdout, 0, 100)
        .expect("read");
    assert!(stdout.data.is_empty());
    assert_eq!((stdout.stored_len, stdout.total_len), (0, 0));
}

#[test]
fn executions_are_found_by_agent_id_per_vm() {
    let dir = scratch("agent-id");
    let records = Records::open(&dir, 100).expect("open");
    let a = records
        .create_execution(&new_exec("vm1", "alice", 1))
        .expect("create");
    let b = records
        .create_execution(&new_exec("vm2", "alice", 2))
        .expect("create");
    let c = records
        .create_execution(&new_exec("vm1", "alice", 3))
        .expect("create");
    records.mark_accepted(a, 5, 1, 10).expect("accept");
    // The same agent id on another VM is another execution.
    records.mark_accepted(b, 5, 1, 11).expect("accept");
    match records.mark_accepted(c, 5, 1, 12) {
        Err(RecordsError::AgentIdInUse {
            vm,
            generation,
            counter,
            existing,
        }) => {
            assert_eq!(
                (vm.as_str(), generation, counter, existing),
                ("vm1", 5, 1, a)
            );
        }
        other => panic!("expected AgentIdInUse, got {other:?}"),
    }
    assert_eq!(
        records.execution(c).expect("get").expect("exists").state,
        ExecState::Pending
    );
    records.mark_accepted(c, 6, 1, 12).expect("accept");
    drop(records);

    let records = Records::open(&dir, 100).expect("reopen");
    assert_eq!(
        records.find_by_agent_id("vm1", 5, 1).expect("find"),
        Some(a)
    );
    assert_eq!(
        records.find_by_agent_id("vm2", 5, 1).expect("find"),
        Some(b)
    );
    assert_eq!(
        records.find_by_agent_id("vm1", 6, 1).expect("find"),
        Some(c)
    );
    assert_eq!(records.find_by_agent_id("vm1", 5, 2).expect("find"), None);
    assert_eq!(records.find_by_agent_id("vm3", 5, 1).expect("find"), None);
    assert_eq!(
        records
            .find_by_agent_id("vm1", u32::MAX, u32::MAX)
            .expect("find"),
        None
    );
    let d = records
        .create_execution(&new_exec("vm1", "alice", 4))
        .expect("create");
    records
        .mark_accepted(d, u32::MAX, u32::MAX, 13)
        .expect("accept");
    assert_eq!(
        records
            .find_by_agent_id("vm1", u32::MAX, u32::MAX)
            .expect("find"),
        Some(d)
    );
}

#[test]
fn unfinished_lists_pending_and_running_executions_after_a_restart() {
    let dir = scratch("unfinished");
    let records = Records::open(&dir, 100).expect("open");
    let pending = records
        .create_execution(&new_exec("vm1", "alice", 1))
        .expect("create");
    let running = records
        .create_execution(&new_exec("vm1", "bob", 2))
        .expect("create");
    records.mark_accepted(running, 1, 1, 3).expect("accept");
    let done = records
        .create_execution(&new_exec("vm1", "alice", 4))
        .expect("create");
    records.mark_accepted(done, 1, 2, 5).expect("accept");
    records.finish(done, &exited(0, 6)).expect("finish");
    let elsewhere = records
        .create_execution(&new_exec("vm2", "alice", 7))
        .expect("create");
    drop(records);

    let records = Records::open(&dir, 100).expect("reopen");
    let ids = |vm: &str| -> Vec<ExecutionId> {
        records
            .unfinished(vm)
            .expect("unfinished")
            .iter()
            .map(|r| r.id)
            .collect()
    };
    assert_eq!(ids("vm1"), [pending, running]);
    assert_eq!(ids("vm2"), [elsewhere]);
    assert!(ids("vm3").is_empty());

    // Reconciliation: the agent still runs (1, 1); the pending one never arrived.
    let found = records
        .find_by_agent_id("vm1", 1, 1)
        .expect("find")
        .expect("known");
    assert_eq!(found, running);
    records.finish(found, &exited(0, 8)).expect("finish");
    let undeliverable = Finish {
        state: ExecState::Undeliverable,
        exit_code: None,
        signal: None,
        finished_at_ms: 9,
        duration_ms: None,
        detail: Some("vm1 not ready".into()),
    };
    assert!(records.finish(pending, &undeliverable).expect("finish"));
    assert!(ids("vm1").is_empty());
}

#[test]
fn executions_filter_newest_first() {
    let dir = scratch("filter");
    let records = Records::open(&dir, 100).expect("open");
    let mut ids = Vec::new();
    for i in 0..12u64 {
        let vm = if i % 2 == 0 { "vm1" } else { "vm2" };
        let who = if i % 3 == 0 { "alice" } else { "bob" };
        let id = records
            .create_execution(&new_exec(vm, who, i))
            .expect("create");
        if i % 4 == 0 {
            records.finish(id, &exited(0, i + 100)).expect("finish");
        }
        ids.push(id);
    }
    let query = |f: ExecutionQuery| -> Vec<ExecutionId> {
        records
            .executions(&f)
            .expect("query")
            .iter()
            .map(|r| r.id)
            .collect()
    };
    let newest_first: Vec<_> = ids.iter().rev().copied().collect();
    assert_eq!(query(ExecutionQuery::default()), newest_first);
    assert_eq!(
        query(ExecutionQuery {
            limit: Some(3),
            ..Default::default()
        }),
        newest_first[..3]
    );
    assert_eq!(
        query(ExecutionQuery {
            before: Some(ids[5]),
            limit: Some(2),
            ..Default::default()
        }),
        [ids[4], ids[3]]
    );
    assert_eq!(
        query(ExecutionQuery {
            vm: Some("vm1".into()),
            ..Default::default()
        }),
        [ids[10], ids[8], ids[6], ids[4], ids[2], ids[0]]
    );
    assert_eq!(
        query(ExecutionQuery {
            principal: Some("alice".into()),
            ..Default::default()
        }),
        [ids[9], ids[6], ids[3], ids[0]]
    );
    assert_eq!(
        query(ExecutionQuery {
            state: Some(ExecState::Succeeded),
            ..Default::default()
        }),
        [ids[8], ids[4], ids[0]]
    );
    assert_eq!(
        query(ExecutionQuery {
            vm: Some("vm1".into()),
            principal: Some("alice".into()),
            state: Some(ExecState::Pending),
            command: Some("sleep".into()),
            since_ms: Some(6),
            until_ms: Some(7),
            limit: Some(10),
            before: None,
        }),
        [ids[6]]
    );
    // Times are `requested_at_ms` (here the loop's index): since is inclusive, until not.
    assert_eq!(
        query(ExecutionQuery {
            since_ms: Some(3),
            until_ms: Some(6),
            ..Default::default()
        }),
        [ids[5], ids[4], ids[3]]
    );
    assert!(
        query(ExecutionQuery {
            command: Some("uname".into()),
            ..Default::default()
        })
        .is_empty()
    );
    assert!(
        query(ExecutionQuery {
            vm: Some("nope".into()),
            ..Default::default()
        })
        .is_empty()
    );
}

#[test]
fn execution_records_serialise_every_field() {
    let dir = scratch("json");
    let records = Records::open(&dir, 4 + O).expect("open");
    let id = records
        .create_execution(&new_exec("vm1", "alice", 1))
        .expect("create");
    records.mark_accepted(id, 2, 3, 4).expect("accept");
    records
        .append_output(id, Stream::Stdout, 0, b"123456")
        .expect("append");
    records
        .finish(
            id,
            &Finish {
                state: ExecState::TimedOut,
                exit_code: None,
                signal: Some(9),
                finished_at_ms: 5,
                duration_ms: Some(1),
                detail: None,
            },
        )
        .expect("finish");
    let rec = records.execution(id).expect("get").expect("exists");
    let json = serde_json::to_value(&rec).expect("json");
    assert_eq!(
        json,
        serde_json::json!({
            "id": id.0,
            "principal": "alice",
            "vm": "vm1",
            "command": "sleep",
            "args": ["5", "with space é"],
            "state": "timed_out",
            "requested_at_ms": 1,
            "started_at_ms": 4,
            "finished_at_ms": 5,
            "duration_ms": 1,
            "exit_code": null,
            "signal": 9,
            "detail": null,
            "agent_generation": 2,
            "agent_counter": 3,
            "output_cap": 4 + O,
            "stdout": {"stored_len": 4, "total_len": 6, "truncated": true},
            "stderr": {"stored_len": 0, "total_len": 0, "truncated": false},
        })
    );
}

#[test]
fn audit_entries_are_kept_and_filtered() {
    let dir = scratch("audit");
    let records = Records::open(&dir, 100).expect("open");
    let entry = |at_ms, principal: Option<&str>, action: &str, allowed| AuditEntry {
        at_ms,
        principal: principal.map(str::to_owned),
        caller: if principal.is_some() {
            "uid=1000 gid=1000".into()
        } else {
            "token".into()
        },
        action: action.into(),
        target: Some("vm1".into()),
        allowed,
        reason: (!allowed).then(|| "not allowed on vm1".to_owned()),
        count: 1,
    };
    let entries = [
        entry(10, Some("alice"), "exec", true),
        entry(20, Some("bob"), "exec", false),
        entry(30, None, "list_vms", false),
        entry(40, Some("alice"), "list_commands", true),
        entry(50, Some("alice"), "exec", false),
    ];
    for e in &entries {
        records.audit(e).expect("audit");
    }
    drop(records);
    let records = Records::open(&dir, 100).expect("reopen");

    let all = records.audit_log(&AuditQuery::default()).expect("log");
    assert_eq!(all.len(), 5);
    for (rec, e) in all.iter().zip(&entries) {
        assert_eq!(rec.entry.at_ms, e.at_ms);
        assert_eq!(rec.entry.principal, e.principal);
        assert_eq!(rec.entry.caller, e.caller);
        assert_eq!(rec.entry.action, e.action);
        assert_eq!(rec.entry.target, e.target);
        assert_eq!(rec.entry.allowed, e.allowed);
        assert_eq!(rec.entry.reason, e.reason);
    }
    assert!(all.windows(2).all(|w| w[0].id < w[1].id));
    assert_eq!(all[2].entry.principal, None);

    let at = |f: AuditQuery| -> Vec<u64> {
        records
            .audit_log(&f)
            .expect("log")
            .iter()
            .map(|r| r.entry.at_ms)
            .collect()
    };
    assert_eq!(
        at(AuditQuery {
            principal: Some("alice".into()),
            ..Default::default()
        }),
        [10, 40, 50]
    );
    assert_eq!(
        at(AuditQuery {
            action: Some("exec".into()),
            ..Default::default()
        }),
        [10, 20, 50]
    );
    assert_eq!(
        at(AuditQuery {
            allowed: Some(false),
            ..Default::default()
        }),
        [20, 30, 50]
    );
    assert_eq!(
        at(AuditQuery {
            allowed: Some(true),
            ..Default::default()
        }),
        [10, 40]
    );
    assert_eq!(
        at(AuditQuery {
            since_ms: Some(30),
            ..Default::default()
        }),
        [30, 40, 50]
    );
    assert_eq!(
        at(AuditQuery {
            limit: Some(2),
            ..Default::default()
        }),
        [10, 20]
    );
    assert_eq!(
        at(AuditQuery {
            limit: Some(2),
            order: AuditOrder::Newest,
            ..Default::default()
        }),
        [50, 40]
    );
    assert_eq!(
        at(AuditQuery {
            principal: Some("alice".into()),
            action: Some("exec".into()),
            allowed: Some(false),
            since_ms: Some(0),
            limit: Some(10),
            order: AuditOrder::Newest,
        }),
        [50]
    );
    assert!(
        at(AuditQuery {
            since_ms: Some(u64::MAX),
            ..Default::default()
        })
        .is_empty()
    );
}

#[test]
fn two_threads_share_the_records() {
    let dir = scratch("threads");
    let records = Arc::new(Records::open(&dir, 1 << 20).expect("open"));
    let workers: Vec<_> = ["vm1", "vm2"]
        .into_iter()
        .enumerate()
        .map(|(t, vm)| {
            let records = Arc::clone(&records);
            std::thread::spawn(move || {
                let mut mine = Vec::new();
                for i in 0..100u32 {
                    let id = records
                        .create_execution(&new_exec(vm, "alice", u64::from(i)))
                        .expect("create");
                    records.mark_accepted(id, 1, i + 1, 1).expect("accept");
                    let data = pattern(id.0, 300);
                    for (n, chunk) in data.chunks(100).enumerate() {
                        records
                            .append_output(id, Stream::Stdout, n as u64 * 100, chunk)
                            .expect("append");
                    }
                    records.finish(id, &exited(0, 2)).expect("finish");
                    records
                        .audit(&AuditEntry {
                            at_ms: u64::from(i),
                            principal: Some(format!("thread{t}")),
                            caller: "uid=0 gid=0".into(),
                            action: "exec".into(),
                            target: Some(vm.into()),
                            allowed: true,
                            reason: None,
                            count: 1,
                        })
                        .expect("audit");
                    mine.push(id);
                }
                mine
            })
        })
        .collect();
    let mut all = Vec::new();
    for w in workers {
        all.extend(w.join().expect("worker"));
    }
    all.sort();
    all.dedup();
    assert_eq!(all.len(), 200);
    for id in all {
        let rec = records.execution(id).expect("get").expect("exists");
        assert_eq!(rec.state, ExecState::Succeeded);
        assert_eq!(stdout_all(&records, id), pattern(id.0, 300));
        assert_eq!(
            records
                .find_by_agent_id(&rec.vm, 1, rec.agent_counter.expect("accepted"))
                .expect("find"),
            Some(id)
        );
    }
    for t in 0..2 {
        let log = records
            .audit_log(&AuditQuery {
                principal: Some(format!("thread{t}")),
                ..Default::default()
            })
            .expect("log");
        assert_eq!(log.len(), 100);
    }
}

#[test]
fn a_thousand_executions_come_back_byte_for_byte() {
    const N: u64 = 1_000;
    let dir = scratch("thousand");
    let started = Instant::now();
    let records = Records::open(&dir, DEFAULT_OUTPUT_CAP).expect("open");
    let mut ids = Vec::new();
    for i in 0..N {
        let vm = format!("vm{}", i % 4 + 1);
        let id = records
            .create_execution(&NewExecution {
                principal: "alice".into(),
                vm,
                command: "cat".into(),
                args: vec![i.to_string()],
                requested_at_ms: i,
                fleet_invocation: None,
            })
            .expect("create");
        records
            .mark_accepted(id, 1, u32::try_from(i + 1).expect("small"), i)
            .expect("accept");
        let out = pattern(i, 2_048 + (i as usize % 1_024));
        for (n, chunk) in out.chunks(1_000).enumerate() {
            records
                .append_output(id, Stream::Stdout, n as u64 * 1_000, chunk)
                .expect("append");
        }
        let err = pattern(i + N, 100 + i as usize % 50);
        records
            .append_output(id, Stream::Stderr, 0, &err)
            .expect("append");
        records
            .finish(id, &exited((i % 3) as i32, i + 1))
            .expect("finish");
        ids.push(id);
    }
    drop(records);

    let records = Records::open(&dir, DEFAULT_OUTPUT_CAP).expect("reopen");
    let listed = records
        .executions(&ExecutionQuery::default())
        .expect("list");
    assert_eq!(listed.len() as u64, N);
    for (i, id) in ids.iter().enumerate().rev() {
        let i = i as u64;
        let rec = &listed[(N - 1 - i) as usize];
        assert_eq!(rec.id, *id);
        assert_eq!(rec.args, [i.to_string()]);
        assert_eq!(rec.exit_code, Some((i % 3) as i32));
        let out = pattern(i, 2_048 + (i as usize % 1_024));
        let err = pattern(i + N, 100 + i as usize % 50);
        assert_eq!(rec.stdout.total_len, out.len() as u64);
        assert_eq!(rec.stderr.total_len, err.len() as u64);
        assert!(!rec.stdout.truncated && !rec.stderr.truncated);
        assert_eq!(stdout_all(&records, *id), out);
        let slice = records
            .read_output(*id, Stream::Stderr, 0, usize::MAX)
            .expect("read");
        assert_eq!(slice.data, err);
    }
    let elapsed = started.elapsed();
    assert!(
        elapsed.as_secs() < 10,
        "a thousand executions took {elapsed:?}"
    );
    eprintln!("a thousand executions in and out: {elapsed:?}");
}
