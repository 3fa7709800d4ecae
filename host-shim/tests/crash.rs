//! The daemon killed with SIGKILL at many points of a stream of executions, and restarted
//! each time: every execution ends exactly once with its true final state, and no output
//! byte is lost or doubled. Two plain VMs, served by real agents that keep running.

mod common;

use std::collections::{BTreeMap, BTreeSet};
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::time::{Duration, Instant};

use common::stack::Stack;
use serde_json::json;

/// Times the daemon is killed.
const KILLS: usize = 24;

/// A small deterministic generator (xorshift), seeded from the clock and printed, so that a
/// failing run can be repeated with `CRASH_SEED`.
struct Rng(u64);

impl Rng {
    fn next(&mut self) -> u64 {
        self.0 ^= self.0 << 13;
        self.0 ^= self.0 >> 7;
        self.0 ^= self.0 << 17;
        self.0
    }

    fn below(&mut self, n: u64) -> u64 {
        self.next() % n
    }
}

#[test]
fn a_daemon_killed_at_any_point_loses_and_doubles_nothing() {
    let seed = std::env::var("CRASH_SEED")
        .ok()
        .and_then(|s| s.parse().ok())
        .unwrap_or_else(|| {
            std::time::SystemTime::now()
                .duration_since(std::time::UNIX_EPOCH)
                .map_or(1, |d| d.as_nanos() as u64)
                | 1
        });
    println!("CRASH_SEED={seed}");
    let mut rng = Rng(seed);
    let mut s = Stack::new("crash", &["vm1", "vm2"], "");
    s.start_daemon();
    s.start_agent("vm1");
    s.start_agent("vm2");
    s.wait_ready("vm1", Duration::from_secs(15));
    s.wait_ready("vm2", Duration::from_secs(15));

    // One submitter per VM: `bytes N` prints N bytes and exits with N % 7, so a record
    // says by itself what its true end and output are.
    let stop = Arc::new(AtomicBool::new(false));
    let submitted = Arc::new(AtomicU64::new(0));
    let submitters: Vec<_> = ["vm1", "vm2"]
        .into_iter()
        .enumerate()
        .map(|(k, vm)| {
            let (stop, submitted, socket) = (stop.clone(), submitted.clone(), s.socket.clone());
            let mut rng = Rng(seed.wrapping_add(k as u64 + 1).wrapping_mul(0x9E37_79B9) | 1);
            std::thread::spawn(move || {
                // Ordering: Relaxed: a flag polled in a loop.
                while !stop.load(Ordering::Relaxed) {
                    let n = match rng.below(4) {
                        0 => 0,
                        1 => rng.below(100),
                        2 => rng.below(70_000),
                        _ => 100_000 + rng.below(300_000),
                    };
                    let body = json!({"target": vm, "command": "bytes", "args": [n.to_string()]})
                        .to_string();
                    match common::try_http(&socket, "POST", "/v1/exec", Some(body.as_bytes())) {
                        Ok((200, _)) => {
                            // Ordering: Relaxed: a counter read after the join.
                            submitted.fetch_add(1, Ordering::Relaxed);
                        }
                        // The daemon is down (or died during the call): try again soon.
                        _ => std::thread::sleep(Duration::from_millis(20)),
                    }
                }
            })
        })
        .collect();

    let started = Instant::now();
    for _ in 0..KILLS {
        std::thread::sleep(Duration::from_millis(100 + rng.below(500)));
        s.kill_daemon();
        std::thread::sleep(Duration::from_millis(rng.below(150)));
        s.start_daemon();
    }
    // Ordering: Relaxed: the join below orders the rest.
    stop.store(true, Ordering::Relaxed);
    for t in submitters {
        t.join().expect("submitter");
    }
    let kill_time = started.elapsed();
    s.wait_ready("vm1", Duration::from_secs(15));
    s.wait_ready("vm2", Duration::from_secs(15));

    // Every execution recorded ends.
    let (status, list) = s.call("GET", "/v1/executions?limit=10000", None);
    assert_eq!(status, 200, "{list}");
    let records = list["executions"].as_array().expect("list").clone();
    let mut finals = Vec::with_capacity(records.len());
    for r in &records {
        let id = r["id"].as_u64().expect("id");
        finals.push(s.wait(id, 60_000));
    }

    // What the agents started, from their logs: each exactly once.
    let mut started_by_agents: BTreeSet<String> = BTreeSet::new();
    for vm in ["vm1", "vm2"] {
        let log = std::fs::read_to_string(s.dir.join(format!("{vm}-agent.log"))).expect("log");
        for line in log.lines() {
            if let Some(rest) = line.split("exec ").nth(1)
                && let Some((id, _)) = rest.split_once(" started")
            {
                assert!(
                    started_by_agents.insert(format!("{vm}/{id}")),
                    "the agent of {vm} started {id} twice"
                );
            }
        }
    }

    let mut states: BTreeMap<String, usize> = BTreeMap::new();
    let mut recorded_agent_ids = BTreeSet::new();
    let mut bytes = 0u64;
    for rec in &finals {
        let state = rec["state"].as_str().expect("state").to_owned();
        *states.entry(state.clone()).or_default() += 1;
        let n: u64 = rec["args"][0]
            .as_str()
            .and_then(|a| a.parse().ok())
            .expect("n");
        let id = rec["id"].as_u64().expect("id");
        if let (Some(g), Some(c)) = (
            rec["agent_generation"].as_u64(),
            rec["agent_counter"].as_u64(),
        ) {
            let vm = rec["vm"].as_str().expect("vm");
            assert!(
                recorded_agent_ids.insert(format!("{vm}/{g:08x}-{c:08x}")),
                "two records of one agent execution: {rec}"
            );
        }
        match state.as_str() {
            "succeeded" | "failed" => {
                assert_eq!(rec["exit_code"].as_u64(), Some(n % 7), "{rec}");
                assert_eq!(state == "succeeded", n.is_multiple_of(7), "{rec}");
                let (status, out) = s.raw("GET", &format!("/v1/executions/{id}/output"));
                assert_eq!(status, 200);
                assert_eq!(
                    out.len() as u64,
                    n,
                    "execution {id}: output lost or doubled"
                );
                assert!(
                    out.iter().all(|&b| b == b'p'),
                    "execution {id}: output damaged"
                );
                assert_eq!(rec["stdout"]["total_len"].as_u64(), Some(n), "{rec}");
                bytes += n;
            }
            // Never reached the agent (the daemon died before sending it), or refused
            // because the agent was running its maximum: true ends, with no agent id.
            "undeliverable" | "rejected" => {
                assert!(rec["agent_generation"].is_null(), "{rec}");
            }
            other => panic!("execution {id} ended {other}, not its true end: {rec}"),
        }
    }
    // At most once: every execution the agents started has one record, and every record
    // that ran was started by an agent.
    let unrecorded: Vec<_> = started_by_agents.difference(&recorded_agent_ids).collect();
    let unstarted: Vec<_> = recorded_agent_ids.difference(&started_by_agents).collect();
    let unrun: Vec<String> = finals
        .iter()
        .filter(|r| r["agent_generation"].is_null())
        .map(|r| format!("{} {} {} {}", r["id"], r["vm"], r["state"], r["detail"]))
        .collect();
    assert!(
        unrecorded.is_empty() && unstarted.is_empty(),
        "the agents' starts and the records disagree: started but not recorded {unrecorded:?}, \
         recorded but not started {unstarted:?}; the records that did not run: {unrun:?} \
         (CRASH_SEED={seed})"
    );
    println!(
        "{KILLS} kills in {kill_time:.1?}; {} executions recorded ({} submitted and answered), \
         each ended once: {states:?}; {bytes} bytes of output, every byte checked",
        finals.len(),
        submitted.load(Ordering::Relaxed)
    );
    assert!(
        states.get("succeeded").copied().unwrap_or(0) + states.get("failed").copied().unwrap_or(0)
            >= KILLS,
        "too few executions ran to prove anything: {states:?}"
    );
}
