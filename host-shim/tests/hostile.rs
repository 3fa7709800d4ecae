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
