//! What the records cost and keep: a chunk's disk cost against its overhead constant, the
//! VM quota, the disk reserve, pruning by age, size and quota (with the audit kept as long as
//! the executions it covers), the upgrade of a schema-1 database, and the records writer's
//! group commits.

use std::path::PathBuf;
use std::sync::Arc;
use std::sync::atomic::{AtomicU32, Ordering};
use std::time::Duration;

use host_shim::records::{
    AuditEntry, AuditQuery, CHUNK_OVERHEAD, Done, ExecState, ExecutionId, ExecutionQuery, Finish,
    Job, NewExecution, Op, Priority, Records, RecordsError, Retention, StoreLimits, Stream, Writer,
};

fn scratch(name: &str) -> PathBuf {
    static NEXT: AtomicU32 = AtomicU32::new(0);
    // Ordering: only uniqueness matters.
    let n = NEXT.fetch_add(1, Ordering::Relaxed);
    let dir = PathBuf::from(env!("CARGO_TARGET_TMPDIR"))
        .join("retention")
        .join(format!("{name}-{}-{n}", std::process::id()));
    let _ = std::fs::remove_dir_all(&dir);
    dir
}

fn new_exec(vm: &str, at: u64) -> NewExecution {
    NewExecution {
        principal: "alice".into(),
        vm: vm.into(),
        command: "echo".into(),
        args: vec![],
        requested_at_ms: at,
        fleet_invocation: None,
    }
}

fn ended(at: u64) -> Finish {
    Finish {
        state: ExecState::Succeeded,
        exit_code: Some(0),
        signal: None,
        finished_at_ms: at,
        duration_ms: Some(1),
        detail: None,
    }
}

fn audit(records: &Records, at: u64, target: &str) {
    records
        .audit(&AuditEntry {
            at_ms: at,
            principal: Some("alice".into()),
            caller: "uid=1".into(),
            action: "exec".into(),
            target: Some(target.into()),
            allowed: true,
            reason: None,
            count: 1,
        })
        .expect("audit");
}

const DAY: u64 = 86_400_000;

/// Records in `dir` whose VMs may keep `quota` bytes of output each.
fn with_quota(dir: &std::path::Path, quota: u64) -> Records {
    Records::open_with(
        dir,
        StoreLimits {
            output_cap: 1 << 20,
            vm_quota: quota,
            min_free: 0,
        },
    )
    .expect("open")
}

#[test]
fn a_chunk_costs_no_more_than_its_overhead() {
    let dir = scratch("overhead");
    let records = Records::open(&dir, u64::MAX / 2).expect("open");
    // The cost of a database with executions but no output, then the same with 20,000
    // one-byte chunks: the difference per chunk is what a chunk costs on disk.
    let ids: Vec<ExecutionId> = (0..20)
        .map(|k| {
            records
                .create_execution(&new_exec("vm1", k))
                .expect("create")
        })
        .collect();
    let before = records.database_bytes().expect("size");
    for (k, id) in ids.iter().enumerate() {
        for offset in 0..1000u64 {
            let stream = if k % 2 == 0 {
                Stream::Stdout
            } else {
                Stream::Stderr
            };
            records
                .append_output(*id, stream, offset, b"x")
                .expect("append");
        }
    }
    let after = records.database_bytes().expect("size");
    let per_chunk = (after - before) as f64 / 20_000.0;
    println!("one-byte chunk: {per_chunk:.1} bytes on disk (overhead counted: {CHUNK_OVERHEAD})");
    assert!(
        per_chunk <= (1 + CHUNK_OVERHEAD) as f64,
        "a 1-byte chunk takes {per_chunk:.1} bytes, more than 1 + CHUNK_OVERHEAD"
    );
    let rec = records.execution(ids[0]).expect("get").expect("exists");
    assert_eq!(rec.stdout.stored_len, 1000);
}

#[test]
fn output_of_an_ended_execution_is_refused() {
    let dir = scratch("ended");
    let records = Records::open(&dir, 1 << 20).expect("open");
    let id = records
        .create_execution(&new_exec("vm1", 1))
        .expect("create");
    records
        .append_output(id, Stream::Stdout, 0, b"before")
        .expect("append");
    assert!(records.finish(id, &ended(2)).expect("finish"));
    assert!(matches!(
        records.append_output(id, Stream::Stdout, 6, b"after"),
        Err(RecordsError::Ended {
            state: ExecState::Succeeded,
            ..
        })
    ));
    let rec = records.execution(id).expect("get").expect("exists");
    assert_eq!((rec.stdout.stored_len, rec.stdout.total_len), (6, 6));
}

#[test]
fn a_vm_quota_stops_keeping_output_of_that_vm_only() {
    let dir = scratch("quota");
    let quota = 4096;
    let records = with_quota(&dir, quota);
    let a = records
        .create_execution(&new_exec("vm1", 1))
        .expect("create");
    let b = records
        .create_execution(&new_exec("vm1", 2))
        .expect("create");
    let other = records
        .create_execution(&new_exec("vm2", 3))
        .expect("create");
    let chunk = vec![b'a'; 1000];
    for k in 0..3u64 {
        records
            .append_output(a, Stream::Stdout, k * 1000, &chunk)
            .expect("append");
    }
    // vm1 has 3 chunks (3,000 bytes and their overhead): a second execution gets what is
    // left of the quota and no more.
    records
        .append_output(b, Stream::Stdout, 0, &[b'b'; 2000])
        .expect("append");
    let used = records.vm_usage("vm1").expect("usage");
    assert!(used <= quota, "vm1 uses {used} of {quota}");
    let rec = records.execution(b).expect("get").expect("exists");
    let room = quota - 3 * (1000 + CHUNK_OVERHEAD) - CHUNK_OVERHEAD;
    assert_eq!(rec.stdout.stored_len, room);
    assert!(rec.stdout.truncated);
    assert_eq!(rec.stdout.total_len, 2000);
    // Another VM is not touched by vm1's quota.
    records
        .append_output(other, Stream::Stdout, 0, &[b'o'; 3000])
        .expect("append");
    let rec = records.execution(other).expect("get").expect("exists");
    assert_eq!(rec.stdout.stored_len, 3000);
}

#[test]
fn below_the_disk_reserve_output_is_counted_not_kept() {
    let dir = scratch("reserve");
    let records = Records::open_with(
        &dir,
        StoreLimits {
            output_cap: 1 << 20,
            vm_quota: u64::MAX,
            // More than any test machine has free.
            min_free: u64::MAX / 2,
        },
    )
    .expect("open");
    let problem = records.disk_problem().expect("the disk counts as full");
    assert!(problem.contains("records.min_free"), "{problem}");
    let id = records
        .create_execution(&new_exec("vm1", 1))
        .expect("create");
    records
        .append_output(id, Stream::Stdout, 0, b"lost for lack of room")
        .expect("append");
    let rec = records.execution(id).expect("get").expect("exists");
    assert_eq!((rec.stdout.stored_len, rec.stdout.total_len), (0, 21));
    assert!(rec.stdout.truncated);
    // The audit log and the end of the execution are still written.
    audit(&records, 1, "execution 1");
    assert!(records.finish(id, &ended(2)).expect("finish"));
}

#[test]
fn pruning_by_age_keeps_running_executions_and_the_audit_that_covers_them() {
    let dir = scratch("age");
    let records = Records::open(&dir, 1 << 20).expect("open");
    let now = 100 * DAY;
    // An old finished execution, an old one still running, a recent finished one.
    let old = records
        .create_execution(&new_exec("vm1", DAY))
        .expect("create");
    records
        .append_output(old, Stream::Stdout, 0, &[b'x'; 5000])
        .expect("append");
    records.finish(old, &ended(DAY)).expect("finish");
    let running = records
        .create_execution(&new_exec("vm1", 2 * DAY))
        .expect("create");
    records
        .mark_accepted(running, 1, 1, 2 * DAY)
        .expect("accept");
    let recent = records
        .create_execution(&new_exec("vm1", 99 * DAY))
        .expect("create");
    records.finish(recent, &ended(99 * DAY)).expect("finish");
    audit(&records, DAY, "old");
    audit(&records, 2 * DAY, "running");
    audit(&records, 99 * DAY, "recent");
    let retention = Retention {
        keep: Some(Duration::from_secs(30 * 86_400)),
        max_bytes: None,
        audit_keep: Some(Duration::from_secs(30 * 86_400)),
    };
    let mut total = 0;
    loop {
        let p = records.prune_step(now, &retention, 64).expect("prune");
        total += p.executions;
        if !p.more {
            break;
        }
    }
    assert_eq!(total, 1);
    assert!(records.execution(old).expect("get").is_none());
    assert!(records.execution(running).expect("get").is_some());
    assert!(records.execution(recent).expect("get").is_some());
    assert_eq!(records.vm_usage("vm1").expect("usage"), 0);
    // The audit of the old execution went; that of the running one, older than the audit
    // retention, stays as long as the execution does.
    let targets: Vec<String> = records
        .audit_log(&AuditQuery::default())
        .expect("audit")
        .into_iter()
        .filter_map(|a| a.entry.target)
        .collect();
    assert_eq!(targets, ["running", "recent"]);
}

#[test]
fn the_quota_makes_room_for_new_output_and_pruning_by_size_gives_the_space_back() {
    let dir = scratch("size");
    let quota = 200_000;
    let records = with_quota(&dir, quota);
    // vm1 fills its quota with 20 finished executions of 10 KB each.
    let chunk = vec![b'q'; 10_000];
    let mut ids = Vec::new();
    for k in 0..20 {
        let id = records
            .create_execution(&new_exec("vm1", k))
            .expect("create");
        records
            .append_output(id, Stream::Stdout, 0, &chunk)
            .expect("append");
        records.finish(id, &ended(k)).expect("finish");
        ids.push(id);
    }
    // Each write past the quota made room by deleting the VM's oldest finished executions:
    // the newest output is kept whole.
    let used = records.vm_usage("vm1").expect("usage");
    assert!(used <= quota, "{used}");
    assert!(
        records.execution(ids[0]).expect("get").is_none(),
        "oldest first"
    );
    let newest = records.execution(ids[19]).expect("get").expect("kept");
    assert_eq!(newest.stdout.stored_len, 10_000);
    // A pruning pass finds nothing more to do for the quota.
    let no_age = Retention {
        keep: None,
        max_bytes: None,
        audit_keep: None,
    };
    let p = records.prune_step(100, &no_age, 64).expect("prune");
    assert_eq!(p.executions, 0, "{p:?}");

    // Then a database size limit: pruned until the file is under it, and the file shrinks
    // (closing the database checkpoints its WAL into the file).
    let limits = records.limits();
    drop(records);
    let records = Records::open_with(&dir, limits).expect("reopen");
    let size_before = std::fs::metadata(records.path())
        .map(|m| m.len())
        .unwrap_or(0);
    let max = records.database_bytes().expect("size") / 2;
    let by_size = Retention {
        keep: None,
        max_bytes: Some(max),
        audit_keep: None,
    };
    let in_use_before = records.database_bytes().expect("size");
    while records.prune_step(100, &by_size, 4).expect("prune").more {}
    let in_use_after = records.database_bytes().expect("size");
    println!("in use {in_use_before} -> {in_use_after} (max {max})");
    assert!(in_use_after <= max);
    let remaining = records
        .executions(&ExecutionQuery::default())
        .expect("list");
    assert!(!remaining.is_empty(), "not everything had to go");
    assert_eq!(
        remaining.last().map(|r| r.id),
        remaining.iter().map(|r| r.id).min()
    );
    drop(records);
    let records = Records::open(&dir, 1 << 20).expect("reopen");
    let size_after = std::fs::metadata(records.path())
        .map(|m| m.len())
        .unwrap_or(0);
    println!("database file {size_before} -> {size_after} bytes");
    assert!(
        size_after <= max + 8 * 4096,
        "the file holds {size_after} bytes, past the limit of {max} by more than a few pages"
    );
    assert!(size_after < size_before);
}

#[test]
fn a_schema_1_database_is_upgraded_with_its_output_counted() {
    let dir = scratch("upgrade");
    std::fs::create_dir_all(&dir).expect("dir");
    let path = dir.join(host_shim::records::DB_FILE_NAME);
    {
        let conn = rusqlite::Connection::open(&path).expect("sqlite");
        conn.execute_batch(host_shim::records::MIGRATIONS[0])
            .expect("schema 1");
        conn.execute_batch(
            "INSERT INTO executions (principal, vm, command, args, state, requested_at_ms, \
             output_cap, stdout_stored, stdout_total) \
             VALUES ('alice', 'vm1', 'echo', '[]', 'succeeded', 1, 100, 6, 6); \
             INSERT INTO output VALUES (1, 0, 0, X'68656c'), (1, 0, 3, X'6c6f0a'); \
             PRAGMA user_version = 1;",
        )
        .expect("data");
    }
    let records = Records::open(&dir, 100).expect("upgrade");
    let slice = records
        .read_output(ExecutionId(1), Stream::Stdout, 0, 100)
        .expect("read");
    assert_eq!(slice.data, b"hello\n");
    assert_eq!(
        records.vm_usage("vm1").expect("usage"),
        6 + 2 * CHUNK_OVERHEAD
    );
    // The upgraded file gives pruned pages back (incremental vacuum).
    let conn = rusqlite::Connection::open(&path).expect("sqlite");
    let vacuum: i64 = conn
        .pragma_query_value(None, "auto_vacuum", |r| r.get(0))
        .expect("pragma");
    assert_eq!(vacuum, 2);
}

#[test]
fn the_writer_commits_groups_and_keeps_one_jobs_failure_to_itself() {
    let dir = scratch("writer");
    let records = Arc::new(Records::open(&dir, 1 << 20).expect("open"));
    let (writer, thread) = Writer::start(
        records.clone(),
        Retention::default(),
        Duration::from_secs(60),
    )
    .expect("writer");
    let Ok(mut results) = writer.run_blocking(vec![Op::Create(new_exec("vm1", 1))]) else {
        panic!("create");
    };
    let Some(Ok(Done::Created(id))) = results.pop() else {
        panic!("an id");
    };
    // Many jobs from many threads at once: each gets its own results, in order.
    let threads: Vec<_> = (0..8u64)
        .map(|t| {
            let w = writer.clone();
            std::thread::spawn(move || {
                for k in 0..50u64 {
                    let r = w
                        .run_blocking(vec![Op::Audit(AuditEntry {
                            at_ms: t * 1000 + k,
                            principal: None,
                            caller: format!("thread {t}"),
                            action: "ping".into(),
                            target: None,
                            allowed: true,
                            reason: None,
                            count: 1,
                        })])
                        .expect("committed");
                    assert!(matches!(r.as_slice(), [Ok(Done::Ok)]));
                }
            })
        })
        .collect();
    for t in threads {
        t.join().expect("thread");
    }
    assert_eq!(
        records
            .audit_log(&AuditQuery::default())
            .expect("log")
            .len(),
        400
    );
    // An op refused for its own reason (a gap) fails alone; the rest of its job stands.
    let (tx, rx) = std::sync::mpsc::channel();
    writer.submit(
        Priority::Driver,
        Job {
            ops: vec![
                Op::Output {
                    id,
                    stream: Stream::Stdout,
                    offset: 0,
                    data: b"ok".to_vec(),
                },
                Op::Output {
                    id,
                    stream: Stream::Stdout,
                    offset: 10,
                    data: b"gap".to_vec(),
                },
                Op::Finish { id, end: ended(5) },
                Op::Output {
                    id,
                    stream: Stream::Stdout,
                    offset: 2,
                    data: b"late".to_vec(),
                },
            ],
            done: Box::new(move |r| drop(tx.send(r))),
        },
    );
    let results = rx.recv().expect("answer").expect("committed");
    assert!(
        matches!(
            results.as_slice(),
            [
                Ok(Done::Ok),
                Err(RecordsError::OutputGap { .. }),
                Ok(Done::Finished(true)),
                Err(RecordsError::Ended { .. })
            ]
        ),
        "{results:?}"
    );
    let rec = records.execution(id).expect("get").expect("exists");
    assert_eq!(
        (rec.state, rec.stdout.stored_len),
        (ExecState::Succeeded, 2)
    );
    writer.stop();
    thread.join().expect("writer thread");
    // After it stopped, jobs fail at once rather than hang.
    assert!(
        writer
            .run_blocking(vec![Op::Audit(AuditEntry {
                at_ms: 0,
                principal: None,
                caller: "late".into(),
                action: "ping".into(),
                target: None,
                allowed: true,
                reason: None,
                count: 1,
            })])
            .is_err()
    );
}
