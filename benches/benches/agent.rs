//! Criterion benchmarks of `agent_core::Agent` over a region in ordinary memory with a fake
//! platform (`benches::BenchPlatform`): the cost of dispatching one exec request, and the
//! throughput of process output through the agent's real path (pipe read into its chunk
//! buffer, `Output` encoded into the ring) to a host thread.

use std::hint::spin_loop;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::thread;
use std::time::{Duration, Instant};

use benches::{BenchPlatform, attach_guest, bench_agent, create_host, region};
use criterion::{Criterion, SamplingMode, Throughput, criterion_group, criterion_main};
use ring_protocol::message::{ExecRequest, Rejection};
use ring_protocol::{AgentToHost, FrameBuf, HeapRegion, HostEndpoint, HostToAgent, MappedRegion};

/// An exec request for `command`, without arguments.
fn exec(request_id: u64, command: &str) -> HostToAgent<'_> {
    HostToAgent::Exec(ExecRequest {
        request_id,
        command,
        args: Default::default(),
        timeout_ms: None,
    })
}

/// Receives the agent's greeting, which every bench skips.
fn skip_hello(host: &mut HostEndpoint, mem: &MappedRegion, buf: &mut FrameBuf) {
    loop {
        match host.recv(mem, buf) {
            Ok(Some(AgentToHost::Hello(_))) => return,
            Ok(None) => spin_loop(),
            other => panic!("expected the agent's hello, got {other:?}"),
        }
    }
}

/// `agent_core/dispatch` and `agent_core/dispatch_rejected`: on one thread, the host sends an
/// `Exec`, the agent handles it in one `poll` (allow-list lookup, argument check, spawn on
/// the fake platform, which returns at once; or the rejection of an unknown command), and the
/// host receives the `Accepted` (or `Rejected`) reply. For `dispatch`, the process is then
/// ended, reaped and its `Exit` received outside the timed part, so every iteration starts
/// with no execution running.
fn dispatch(c: &mut Criterion) {
    let region = region();
    let mem: &MappedRegion = &region;
    let mut host = create_host(&region);
    let mut guest = attach_guest(&region);
    let mut agent = bench_agent();
    let mut platform = BenchPlatform::new(0);
    let mut buf = ring_protocol::frame_buf();
    // The agent's request buffer, kept across polls as portless-agent keeps it.
    let mut rx = ring_protocol::frame_buf();
    agent
        .on_attach(&mut guest, mem)
        .expect("the greeting fits in an empty ring");
    skip_hello(&mut host, mem, &mut buf);
    let now = 1_000;
    let mut request_id = 0u64;

    let mut group = c.benchmark_group("agent_core");
    group.bench_function("dispatch", |b| {
        b.iter_custom(|iters| {
            let mut timed = Duration::ZERO;
            for _ in 0..iters {
                request_id += 1;
                platform.running = true;
                let start = Instant::now();
                host.send(mem, &exec(request_id, "bench"))
                    .expect("the ring is drained every iteration");
                agent
                    .poll_with_buffer(now, &mut guest, mem, &mut platform, &mut rx)
                    .expect("the channel is fine");
                match host.recv(mem, &mut buf) {
                    Ok(Some(AgentToHost::Accepted { request_id: r, .. })) if r == request_id => {}
                    other => panic!("expected Accepted, got {other:?}"),
                }
                timed += start.elapsed();
                // Untimed: the process exits; the agent reaps it and reports.
                platform.running = false;
                agent
                    .poll_with_buffer(now, &mut guest, mem, &mut platform, &mut rx)
                    .expect("the channel is fine");
                match host.recv(mem, &mut buf) {
                    Ok(Some(AgentToHost::Exit { .. })) => {}
                    other => panic!("expected Exit, got {other:?}"),
                }
            }
            timed
        });
    });
    group.bench_function("dispatch_rejected", |b| {
        b.iter(|| {
            request_id += 1;
            host.send(mem, &exec(request_id, "no-such-command"))
                .expect("the ring is drained every iteration");
            agent
                .poll_with_buffer(now, &mut guest, mem, &mut platform, &mut rx)
                .expect("the channel is fine");
            match host.recv(mem, &mut buf) {
                Ok(Some(AgentToHost::Rejected {
                    request_id: r,
                    reason: Rejection::UnknownCommand,
                })) if r == request_id => {}
                other => panic!("expected Rejected, got {other:?}"),
            }
        });
    });
    group.finish();
}

/// Bytes one streaming execution writes.
const STREAM_BYTES: u64 = 16 << 20;

/// `throughput/output_streaming`: an agent thread runs `Agent::poll` in a loop (spinning when
/// a poll did nothing) over a fake process that writes 16 MiB to stdout in 4 KiB chunks; the
/// host (the measuring thread) sends one `Exec` per iteration and receives `Accepted`, the
/// `Output` messages (counting their bytes) and the `Exit`.
fn output_streaming(c: &mut Criterion) {
    let region = Arc::new(region());
    let mem: &MappedRegion = &region;
    let mut host = create_host(&region);
    let stop = Arc::new(AtomicBool::new(false));
    let agent_thread = thread::spawn({
        let (region, stop) = (Arc::clone(&region), Arc::clone(&stop));
        move || run_agent(&region, &stop)
    });
    let mut buf = ring_protocol::frame_buf();
    skip_hello(&mut host, mem, &mut buf);

    let mut group = c.benchmark_group("throughput");
    group
        .sampling_mode(SamplingMode::Flat)
        .sample_size(20)
        .measurement_time(Duration::from_secs(4))
        .throughput(Throughput::Bytes(STREAM_BYTES));
    let mut request_id = 0u64;
    group.bench_function("output_streaming", |b| {
        b.iter_custom(|iters| {
            let start = Instant::now();
            for _ in 0..iters {
                request_id += 1;
                host.send(mem, &exec(request_id, "bench"))
                    .expect("the host-to-guest ring is empty between executions");
                let mut bytes = 0u64;
                loop {
                    match host.recv(mem, &mut buf) {
                        Ok(Some(AgentToHost::Output { data, .. })) => bytes += data.len() as u64,
                        Ok(Some(AgentToHost::Accepted { .. })) => {}
                        Ok(Some(AgentToHost::Exit { finished, .. })) => {
                            assert_eq!(finished.stdout_bytes, STREAM_BYTES);
                            break;
                        }
                        Ok(None) => spin_loop(),
                        other => panic!("expected output, got {other:?}"),
                    }
                }
                assert_eq!(bytes, STREAM_BYTES, "every byte arrives");
            }
            start.elapsed()
        });
    });
    group.finish();

    // Ordering: Relaxed: the flag carries no data; `join` synchronises with the thread's end.
    stop.store(true, Ordering::Relaxed);
    agent_thread
        .join()
        .expect("the agent thread does not panic");
}

/// The guest of `output_streaming`: polls the agent until `stop` is set, spinning while idle.
fn run_agent(region: &HeapRegion, stop: &AtomicBool) {
    let mem: &MappedRegion = region;
    let mut guest = attach_guest(region);
    let mut agent = bench_agent();
    let mut platform = BenchPlatform::new(STREAM_BYTES);
    let mut rx = ring_protocol::frame_buf();
    agent
        .on_attach(&mut guest, mem)
        .expect("the greeting fits in an empty ring");
    let epoch = Instant::now();
    // Ordering: Relaxed: only a request to stop; nothing is read after seeing it.
    while !stop.load(Ordering::Relaxed) {
        let now = u64::try_from(epoch.elapsed().as_millis()).unwrap_or(u64::MAX);
        let activity = agent
            .poll_with_buffer(now, &mut guest, mem, &mut platform, &mut rx)
            .expect("the channel is fine");
        if !activity.worked {
            spin_loop();
        }
    }
}

criterion_group! {
    name = benches;
    // As in channel.rs: fewer bootstrap resamples, short runs.
    config = Criterion::default()
        .nresamples(20_000)
        .warm_up_time(Duration::from_secs(1))
        .measurement_time(Duration::from_secs(3))
        .sample_size(30);
    targets = dispatch, output_streaming
}
criterion_main!(benches);
