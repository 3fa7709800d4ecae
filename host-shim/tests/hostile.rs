//! Hostile guests against the real daemon (a process of its own), beside a second VM served by
//! a real `portless-agent`.

mod common;

use std::time::{Duration, Instant};

use common::hostile::{Flood, HostileGuest};
use common::stack::{Stack, latencies};
use serde_json::json;

/// Runs each flood for a few seconds against the daemon (`PORTLESS_BIN`, or this build) and
/// prints its memory and database growth and the other VM's latencies with and without the
/// flood. A measurement, not a check: `cargo test -p host-shim --test hostile --
/// --ignored measure_floods --nocapture`.
#[test]
#[ignore]
fn measure_floods() {
    let seconds: u64 = std::env::var("FLOOD_SECONDS")
        .ok()
        .and_then(|s| s.parse().ok())
        .unwrap_or(3);
    let only = std::env::var("FLOOD").ok();
    for flood in [
        Flood::HelloNoRead,
        Flood::Listing,
        Flood::OneByteOutput,
        Flood::MismatchedReplies,
        Flood::NeverAnswer,
        Flood::IdReuse,
    ] {
        if only.as_deref().is_some_and(|o| o != format!("{flood:?}")) {
            continue;
        }
        let mut s = Stack::new(&format!("measure-{flood:?}"), &["vm1", "vm2"], "");
        s.start_daemon();
        s.start_agent("vm2");
        let mut guest = HostileGuest::start(&s.region("vm1"), Flood::Honest);
        s.wait_ready("vm1", Duration::from_secs(10));
        s.wait_ready("vm2", Duration::from_secs(10));
        let (ping0, exec0, _) = latencies(&s, "vm2", 30);
        let (rss0, _) = s.daemon_rss_kib();
        let db0 = s.db_bytes();
        guest.stop();
        let guest = HostileGuest::start(&s.region("vm1"), flood);
        // What makes the flood bite: executions (and pings) for the hostile VM.
        let socket = s.socket.clone();
        let stop = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(false));
        let stop2 = stop.clone();
        let caller = std::thread::spawn(move || {
            let mut ids = Vec::new();
            // Ordering: Relaxed: a flag.
            while !stop2.load(std::sync::atomic::Ordering::Relaxed) {
                let (st, body) = common::call(
                    &socket,
                    "POST",
                    "/v1/exec",
                    Some(json!({"target": "vm1", "command": "flood"})),
                );
                if st == 200
                    && let Some(id) = body["executions"][0]["id"].as_u64()
                {
                    ids.push(id);
                }
                let _ = common::call(&socket, "POST", "/v1/vms/vm1/ping", None);
                std::thread::sleep(Duration::from_millis(200));
            }
            ids
        });
        let started = Instant::now();
        std::thread::sleep(Duration::from_millis(300));
        let (ping1, exec1, failed1) = latencies(&s, "vm2", 15);
        while started.elapsed() < Duration::from_secs(seconds) {
            std::thread::sleep(Duration::from_millis(50));
        }
        let (rss1, hwm1) = s.daemon_rss_kib();
        let db1 = s.db_bytes();
        // Ordering: Relaxed: a flag.
        stop.store(true, std::sync::atomic::Ordering::Relaxed);
        let ids = caller.join().expect("caller");
        let unfinished = ids
            .iter()
            .filter(|id| {
                let (_, r) = s.call("GET", &format!("/v1/executions/{id}"), None);
                !matches!(
                    r["state"].as_str(),
                    Some(
                        "succeeded"
                            | "failed"
                            | "timed_out"
                            | "cancelled"
                            | "agent_lost"
                            | "undeliverable"
                            | "rejected"
                            | "failed_to_start"
                    )
                )
            })
            .count();
        let vm1 = s.vm("vm1");
        println!(
            "flood {flood:?} for {seconds} s: daemon RSS {rss0} -> {rss1} KiB (peak {hwm1}), \
             db {db0} -> {db1} bytes; vm2 ping {ping0:?} -> {ping1:?} ({:.1}x), exec --wait \
             {exec0:?} -> {exec1:?} ({:.1}x), {failed1} failed; vm1 executions {} of which \
             {unfinished} not ended; vm1 now {vm1}",
            ping1.as_secs_f64() / ping0.as_secs_f64(),
            exec1.as_secs_f64() / exec0.as_secs_f64(),
            ids.len(),
        );
        println!(
            "  guest sent {} frames, read {} requests, attached {} times",
            guest
                .counters
                .sent
                .load(std::sync::atomic::Ordering::Relaxed),
            guest
                .counters
                .received
                .load(std::sync::atomic::Ordering::Relaxed),
            guest
                .counters
                .attaches
                .load(std::sync::atomic::Ordering::Relaxed)
        );
        drop(guest);
    }
}

/// Budgets small enough for tests to hit them in seconds.
const FAST: &str =
    "\n[budget]\nanswer_timeout_ms = 1500\nbackoff_ms = 300\nbackoff_max_ms = 1200\n";

/// How much the daemon's peak memory may grow during a flood: the flooding guest's budgets
/// (about 1 MiB: outbox, listing, output batches) plus SQLite's page caches warming up and
/// allocator slack.
const MEMORY_SLACK_KIB: u64 = 24 * 1024;

/// A daemon with a hostile `vm1` and a real agent on `vm2`.
struct Scenario {
    s: Stack,
    guest: Option<HostileGuest>,
    rss0: u64,
    db0: u64,
}

impl Scenario {
    fn start(name: &str, flood: Flood, budget: &str) -> Self {
        let mut s = Stack::new(name, &["vm1", "vm2"], budget);
        s.start_daemon();
        s.start_agent("vm2");
        s.wait_ready("vm2", Duration::from_secs(15));
        // Warm up: the records and the API as they will be used.
        let (_, _, failed) = latencies(&s, "vm2", 5);
        assert_eq!(failed, 0);
        let (rss0, _) = s.daemon_rss_kib();
        let db0 = s.db_bytes();
        let guest = HostileGuest::start(&s.region("vm1"), flood);
        Self {
            s,
            guest: Some(guest),
            rss0,
            db0,
        }
    }

    fn vm1(&self) -> serde_json::Value {
        self.s.vm("vm1")
    }

    /// Waits until vm1 has been cut off for `budget`.
    fn wait_cut_off(&self, budget: &str, within: Duration) -> serde_json::Value {
        let deadline = Instant::now() + within;
        loop {
            let vm = self.vm1();
            if vm["cutoffs"].as_u64().unwrap_or(0) >= 1 {
                assert_eq!(vm["last_cutoff"]["budget"], budget, "{vm}");
                return vm;
            }
            assert!(
                Instant::now() < deadline,
                "vm1 never cut off for {budget}: {vm}\n{}",
                self.s.log()
            );
            std::thread::sleep(Duration::from_millis(50));
        }
    }

    /// The other VM and the API still answer, every time.
    fn other_vm_is_served(&self) {
        let (ping, exec, failed) = latencies(&self.s, "vm2", 10);
        assert_eq!(failed, 0, "vm2 failed during the flood");
        assert!(
            ping < Duration::from_millis(500) && exec < Duration::from_secs(1),
            "vm2 slowed down: ping {ping:?}, exec --wait {exec:?}"
        );
        let (status, _) = self.s.call("GET", "/v1/executions?limit=5", None);
        assert_eq!(status, 200);
    }

    /// Memory stayed within the budget.
    fn memory_is_bounded(&self) {
        let (_, hwm) = self.s.daemon_rss_kib();
        assert!(
            hwm <= self.rss0 + MEMORY_SLACK_KIB,
            "daemon peak {hwm} KiB, from {} KiB before the flood",
            self.rss0
        );
    }

    /// Every execution of vm1 ended.
    fn vm1_records_end(&self, ids: &[u64], within: Duration) -> Vec<serde_json::Value> {
        ids.iter()
            .map(|id| {
                let rec = self.s.wait(*id, within.as_millis() as u64);
                assert!(
                    !matches!(rec["state"].as_str(), Some("pending" | "running")),
                    "execution {id} did not end: {rec}"
                );
                rec
            })
            .collect()
    }

    /// Lines of the daemon's log that contain `text`.
    fn log_lines(&self, text: &str) -> usize {
        self.s.log().lines().filter(|l| l.contains(text)).count()
    }
}

impl Drop for Scenario {
    fn drop(&mut self) {
        if let Some(mut g) = self.guest.take() {
            g.stop();
        }
    }
}

/// Starts `flood` on vm1 without waiting (the hostile guest answers, or not, as it likes);
/// the id of its record, when the daemon made one.
fn exec_vm1(s: &Stack) -> Option<u64> {
    let (_, body) = s.call(
        "POST",
        "/v1/exec",
        Some(json!({"target": "vm1", "command": "flood"})),
    );
    body["executions"][0]["id"].as_u64()
}

#[test]
fn a_guest_that_says_hello_and_never_reads_is_cut_off_for_queued_bytes() {
    let budget = format!("{FAST}violations_per_min = 1000000\nqueued_bytes = \"64K\"\n");
    let sc = Scenario::start("hostile-hello", Flood::HelloNoRead, &budget);
    let vm = sc.wait_cut_off("queued_bytes", Duration::from_secs(20));
    println!("vm1 after the flood: {vm}");
    sc.other_vm_is_served();
    sc.memory_is_bounded();
    // Cut off again and again while it keeps flooding, backed off each time; logged once
    // per cut-off, never per frame.
    std::thread::sleep(Duration::from_secs(3));
    let cutoffs = sc.vm1()["cutoffs"].as_u64().unwrap_or(0);
    assert!(cutoffs >= 2, "{cutoffs}");
    let logged = sc.log_lines("cut off: budget queued_bytes");
    assert!(
        logged as u64 <= cutoffs && logged >= 1,
        "{logged} log lines for {cutoffs} cut-offs"
    );
    assert!(sc.log_lines("protocol violation") as u64 <= cutoffs + 1);
    assert!(sc.s.db_bytes() <= sc.db0 + (8 << 20));
}

#[test]
fn a_guest_that_lists_without_end_is_cut_off_for_listing_entries() {
    let sc = Scenario::start("hostile-listing", Flood::Listing, FAST);
    sc.wait_cut_off("listing_entries", Duration::from_secs(20));
    sc.other_vm_is_served();
    sc.memory_is_bounded();
    // A listing asked for meanwhile gets an answer (an error, not a hang).
    let t = Instant::now();
    let (status, body) = sc.s.call("GET", "/v1/vms/vm1/commands", None);
    assert!(t.elapsed() < Duration::from_secs(10), "{status} {body}");
}

#[test]
fn a_one_byte_output_flood_is_paced_merged_and_kept_within_the_quota() {
    let quota = 1 << 20;
    let frames_per_s = 20_000;
    let budget = format!("{FAST}frames_per_s = {frames_per_s}\n\n[records]\nvm_quota = \"1M\"\n");
    let sc = Scenario::start("hostile-output", Flood::OneByteOutput, &budget);
    sc.s.wait_ready("vm1", Duration::from_secs(15));
    let id = exec_vm1(&sc.s).expect("the flood started");
    let pid = sc.s.daemon_pid().to_string();
    let cpu0 = common::cpu_time_of(&pid);
    let sent0 = sc.guest.as_ref().map_or(0, |g| {
        g.counters.sent.load(std::sync::atomic::Ordering::Relaxed)
    });
    let t0 = Instant::now();
    std::thread::sleep(Duration::from_secs(4));
    sc.other_vm_is_served();
    let elapsed = t0.elapsed().as_secs_f64();
    let sent = sc.guest.as_ref().map_or(0, |g| {
        g.counters.sent.load(std::sync::atomic::Ordering::Relaxed)
    }) - sent0;
    let cpu = (common::cpu_time_of(&pid) - cpu0).as_secs_f64() / elapsed;
    let rate = sent as f64 / elapsed;
    println!(
        "1-byte output: {rate:.0} frames/s read, daemon CPU {:.0}% of a core",
        cpu * 100.0
    );
    // Beyond the pace the guest got the ring's capacity (about 22,000 frames of 24 bytes)
    // and the bucket's burst (a second's worth) at the start of the window.
    let slack = (22_000.0 + f64::from(frames_per_s)) / elapsed;
    assert!(
        rate <= f64::from(frames_per_s) * 1.1 + slack,
        "{rate:.0} frames/s, budget {frames_per_s}"
    );
    assert!(cpu < 0.8, "the daemon used {:.0}% of a core", cpu * 100.0);
    sc.memory_is_bounded();
    // The output is merged into chunks and kept within the VM's quota; the rest is counted.
    let rec = sc.s.wait(id, 1);
    assert_eq!(rec["state"], "running");
    let stored = rec["stdout"]["stored_len"].as_u64().unwrap_or(0);
    let total = rec["stdout"]["total_len"].as_u64().unwrap_or(0);
    assert!(stored > 0 && stored <= quota && total >= stored, "{rec}");
    assert!(
        sc.s.db_bytes() <= sc.db0 + quota + (6 << 20),
        "db grew to {}",
        sc.s.db_bytes()
    );
    {
        let conn = rusqlite::Connection::open_with_flags(
            sc.s.state_dir().join("portless.db"),
            rusqlite::OpenFlags::SQLITE_OPEN_READ_ONLY,
        )
        .expect("records");
        let (chunks, bytes): (u64, u64) = conn
            .query_row(
                "SELECT COUNT(*), COALESCE(SUM(LENGTH(data)), 0) FROM output WHERE execution = ?1",
                [id],
                |r| Ok((r.get(0)?, r.get(1)?)),
            )
            .expect("count");
        println!("{bytes} bytes kept in {chunks} chunks");
        assert!(
            bytes / chunks.max(1) >= 8,
            "chunks of {} bytes on average: not merged",
            bytes / chunks.max(1)
        );
    }
    // A cancel the guest ignores: the execution ends agent_lost after the answer timeouts.
    let (status, body) =
        sc.s.call("POST", &format!("/v1/executions/{id}/cancel"), None);
    assert_eq!(status, 202, "{body}");
    let rec = sc.s.wait(id, 15_000);
    assert_eq!(rec["state"], "agent_lost", "{rec}");
    sc.other_vm_is_served();
    if let Some(g) = sc.guest.as_ref() {
        assert!(
            g.counters
                .cancels
                .load(std::sync::atomic::Ordering::Relaxed)
                >= 1
        );
    }
}

#[test]
fn replies_of_the_wrong_kind_count_as_violations_and_cut_the_guest_off() {
    let budget = format!("{FAST}violations_per_min = 6\n");
    let sc = Scenario::start("hostile-mismatch", Flood::MismatchedReplies, &budget);
    sc.s.wait_ready("vm1", Duration::from_secs(15));
    let mut ids = Vec::new();
    for _ in 0..4 {
        ids.extend(exec_vm1(&sc.s));
        let (status, _) = sc.s.call("POST", "/v1/vms/vm1/ping", None);
        assert_ne!(status, 200, "a ping answered with metrics is not a pong");
    }
    sc.wait_cut_off("violations_per_min", Duration::from_secs(20));
    let recs = sc.vm1_records_end(&ids, Duration::from_secs(10));
    for rec in &recs {
        assert_eq!(rec["state"], "agent_lost", "{rec}");
    }
    assert!(sc.vm1()["violations"].as_u64().unwrap_or(0) >= 7);
    sc.other_vm_is_served();
    sc.memory_is_bounded();
}

#[test]
fn requests_a_guest_never_answers_end_at_their_deadline_within_the_in_flight_budget() {
    let budget = format!("{FAST}requests_in_flight = 4\n");
    let sc = Scenario::start("hostile-silent", Flood::NeverAnswer, &budget);
    sc.s.wait_ready("vm1", Duration::from_secs(15));
    // Eight execs at once: four are in flight, the others are refused at once (503).
    let socket = sc.s.socket.clone();
    let calls: Vec<_> = (0..8)
        .map(|_| {
            let socket = socket.clone();
            std::thread::spawn(move || {
                let t = Instant::now();
                let (status, body) = common::call(
                    &socket,
                    "POST",
                    "/v1/exec",
                    Some(json!({"target": "vm1", "command": "flood"})),
                );
                (status, body, t.elapsed())
            })
        })
        .collect();
    let results: Vec<_> = calls.into_iter().map(|c| c.join().expect("call")).collect();
    let ids: Vec<u64> = results
        .iter()
        .filter_map(|(_, b, _)| b["executions"][0]["id"].as_u64())
        .collect();
    let busy = results
        .iter()
        .filter(|(_, b, _)| {
            b["executions"][0]["error"]
                .as_str()
                .is_some_and(|e| e.contains("requests_in_flight"))
        })
        .count();
    assert!(busy >= 1, "{results:?}");
    for (_, _, took) in &results {
        assert!(*took < Duration::from_secs(8), "an exec waited {took:?}");
    }
    let recs = sc.vm1_records_end(&ids, Duration::from_secs(10));
    let lost = recs.iter().filter(|r| r["state"] == "agent_lost").count();
    assert!(lost >= 1, "{recs:?}");
    for r in recs.iter().filter(|r| r["state"] == "agent_lost") {
        assert!(
            r["detail"]
                .as_str()
                .is_some_and(|d| d.contains("did not answer")),
            "{r}"
        );
    }
    let t = Instant::now();
    let (status, _) = sc.s.call("POST", "/v1/vms/vm1/ping", None);
    assert_eq!(status, 504);
    assert!(t.elapsed() < Duration::from_secs(5));
    sc.other_vm_is_served();
    sc.memory_is_bounded();
}

#[test]
fn a_reused_execution_id_is_refused() {
    let budget = format!("{FAST}violations_per_min = 3\n");
    let sc = Scenario::start("hostile-reuse", Flood::IdReuse, &budget);
    sc.s.wait_ready("vm1", Duration::from_secs(15));
    let first = exec_vm1(&sc.s).expect("first");
    let rec = sc.s.wait(first, 1);
    assert_eq!(rec["state"], "running", "{rec}");
    let second = exec_vm1(&sc.s).expect("second");
    let rec = sc.s.wait(second, 5_000);
    assert_eq!(rec["state"], "agent_lost", "{rec}");
    assert!(
        rec["detail"].as_str().is_some_and(|d| d.contains("reused")),
        "{rec}"
    );
    let mut ids = vec![first, second];
    while sc.vm1()["cutoffs"] == 0 && ids.len() < 10 {
        ids.extend(exec_vm1(&sc.s));
    }
    sc.wait_cut_off("violations_per_min", Duration::from_secs(20));
    // The guest does not come back: what waits for it ends undeliverable.
    let mut sc = sc;
    if let Some(mut g) = sc.guest.take() {
        g.stop();
    }
    // Cut off: the first one, still running, ends too, naming the budget.
    let recs = sc.vm1_records_end(&ids, Duration::from_secs(10));
    assert!(
        recs[0]["detail"]
            .as_str()
            .is_some_and(|d| d.contains("violations_per_min")),
        "{}",
        recs[0]
    );
    sc.other_vm_is_served();
    sc.memory_is_bounded();
}

#[test]
fn a_push_given_up_on_is_withdrawn_and_its_late_start_cancelled() {
    let extra = "\n[budget]\nanswer_timeout_ms = 20000\n";
    let sc = Scenario::start(
        "hostile-push",
        Flood::SlowPush(Duration::from_secs(10)),
        extra,
    );
    sc.s.wait_ready("vm1", Duration::from_secs(15));
    // The daemon waits the delivery timeout (3 s here) and 5 s more, then gives up; the
    // guest starts it 2 s after that.
    let (status, body) = common::http(
        &sc.s.socket,
        "POST",
        "/v1/vms/vm1/push?name=fix.sh&run=true",
        Some(b"#!/bin/sh\necho fixed\n"),
    );
    assert_eq!(status, 504, "{}", String::from_utf8_lossy(&body));
    let (_, list) = sc.s.call("GET", "/v1/executions?vm=vm1", None);
    let rec = list["executions"][0].clone();
    assert_eq!(rec["command"], "push:fix.sh");
    assert_eq!(rec["state"], "undeliverable", "{rec}");
    let id = rec["id"].as_u64().expect("id");
    // The guest starts it anyway, a moment later, and prints: cancelled, nothing attached.
    let deadline = Instant::now() + Duration::from_secs(10);
    let guest = sc.guest.as_ref().expect("guest");
    while guest
        .counters
        .cancels
        .load(std::sync::atomic::Ordering::Relaxed)
        == 0
    {
        assert!(
            Instant::now() < deadline,
            "the late start was not cancelled"
        );
        std::thread::sleep(Duration::from_millis(50));
    }
    assert_eq!(
        guest
            .counters
            .started_pushes
            .load(std::sync::atomic::Ordering::Relaxed),
        1
    );
    std::thread::sleep(Duration::from_millis(300));
    let rec = sc.s.wait(id, 1);
    assert_eq!(rec["state"], "undeliverable");
    assert_eq!(rec["stdout"]["total_len"], 0, "{rec}");
    assert_eq!(sc.vm1()["violations"], 0);
    sc.other_vm_is_served();
}
