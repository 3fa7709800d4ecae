//! The agent's memory footprint, measured on the binary that ships: run by
//! `cargo xtask footprint` (and `cargo xtask test`) with `PORTLESS_AGENT_BIN` pointing at the
//! static musl build. Prints the figures and checks the targets: resident memory at most
//! 1.5 MiB idle and at most 2 MiB while streaming output.

mod common;

use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::time::Duration;

use common::{CONFIG, Harness, rss_kib};
use ring_protocol::message::Outcome;

const IDLE_MAX_KIB: u64 = 1536;
const STREAMING_MAX_KIB: u64 = 2048;

#[test]
#[ignore = "measures the shipped binary; run by `cargo xtask footprint`"]
fn resident_memory_idle_and_streaming() {
    let mut h = Harness::start("footprint", CONFIG);
    h.hello();
    let pid = h.agent.as_ref().expect("running").id();
    for _ in 0..3 {
        assert_eq!(h.run("true", &[]).outcome(), Outcome::Exited(0));
    }
    std::thread::sleep(Duration::from_millis(300));
    let idle = rss_kib(pid);

    let stop = Arc::new(AtomicBool::new(false));
    let peak = Arc::new(AtomicU64::new(0));
    let sampler = {
        let (stop, peak) = (stop.clone(), peak.clone());
        std::thread::spawn(move || {
            // Ordering: Relaxed: a flag and a statistic, nothing else is synchronised.
            while !stop.load(Ordering::Relaxed) {
                peak.fetch_max(rss_kib(pid), Ordering::Relaxed);
                std::thread::sleep(Duration::from_millis(2));
            }
        })
    };
    // About 16 MiB of output.
    let run = h.run("seq", &["2100000"]);
    // Ordering: Relaxed, as above.
    stop.store(true, Ordering::Relaxed);
    sampler.join().expect("sampler");
    assert_eq!(run.outcome(), Outcome::Exited(0));
    // Ordering: Relaxed: the sampler thread has been joined.
    let streaming = peak.load(Ordering::Relaxed);
    println!(
        "portless-agent footprint: RSS idle {idle} KiB (target <= {IDLE_MAX_KIB}), \
         RSS streaming {} MiB of output {streaming} KiB (target <= {STREAMING_MAX_KIB})",
        run.stdout.len() >> 20
    );
    assert!(idle > 0 && streaming > 0, "could not read the agent's RSS");
    assert!(
        idle <= IDLE_MAX_KIB,
        "idle RSS {idle} KiB over {IDLE_MAX_KIB} KiB"
    );
    assert!(
        streaming <= STREAMING_MAX_KIB,
        "streaming RSS {streaming} KiB over {STREAMING_MAX_KIB} KiB"
    );
}
