//! Criterion benchmarks of the channel over a region in ordinary memory: the cost of one frame
//! through a ring on one thread, the latency of a ping/pong round trip between two spinning
//! threads, and one-way byte throughput from a producer thread to a consumer thread. Together
//! with `codec.rs` they show where the time of a message goes.

use std::hint::{black_box, spin_loop};
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::mpsc::{self, Receiver};
use std::thread;
use std::time::{Duration, Instant};

use benches::{attach_guest, create_host, region};
use criterion::measurement::WallTime;
use criterion::{
    BenchmarkGroup, BenchmarkId, Criterion, SamplingMode, Throughput, criterion_group,
    criterion_main,
};
use ring_protocol::message::{ExecutionId, Stream};
use ring_protocol::{
    AgentToHost, FrameBuf, GuestEndpoint, HeapRegion, HostEndpoint, HostToAgent, MappedRegion,
    SendError, frame_buf,
};

/// `frame/send_recv/<size>`: one `send_frame` by the host and one `recv_frame` by the guest on
/// the same thread: the ring's own cost (copies, index publication, fences), no contention.
fn frame_send_recv(c: &mut Criterion) {
    let region = region();
    let mem: &MappedRegion = &region;
    let mut host = create_host(&region);
    let mut guest = attach_guest(&region);
    let mut buf = frame_buf();
    let mut group = c.benchmark_group("frame");
    for (label, len) in [("64B", 64), ("4KiB", 4096)] {
        let payload: Vec<u8> = (0..len).map(|i| (i % 251) as u8).collect();
        group.throughput(Throughput::Bytes(len as u64));
        group.bench_function(BenchmarkId::new("send_recv", label), |b| {
            b.iter(|| {
                host.send_frame(mem, black_box(&payload))
                    .expect("the ring is drained every iteration");
                let got = guest
                    .recv_frame(mem, &mut buf)
                    .expect("the ring is valid")
                    .expect("the frame just sent");
                black_box(got);
            });
        });
    }
    group.finish();
}

/// `round_trip/spin`: the host sends `Ping`, a guest thread spinning on its ring answers
/// `Pong`, the host spins until the pong arrives. The echo thread lives for the whole
/// benchmark, not one iteration.
fn round_trip(c: &mut Criterion) {
    let region = Arc::new(region());
    let mem: &MappedRegion = &region;
    let mut host = create_host(&region);
    let stop = Arc::new(AtomicBool::new(false));
    let echo = thread::spawn({
        let (region, stop) = (Arc::clone(&region), Arc::clone(&stop));
        move || echo_pings(&region, &stop)
    });
    while !host.guest_attached(mem) {
        thread::yield_now();
    }

    let mut group = c.benchmark_group("round_trip");
    let mut buf = frame_buf();
    let mut nonce = 0u64;
    group.bench_function("spin", |b| {
        b.iter_custom(|iters| {
            let start = Instant::now();
            for _ in 0..iters {
                nonce = nonce.wrapping_add(1);
                host.send(mem, &HostToAgent::Ping { nonce })
                    .expect("a ping-pong never fills the ring");
                let echoed = loop {
                    match host.recv(mem, &mut buf) {
                        Ok(Some(AgentToHost::Pong { nonce })) => break nonce,
                        Ok(None) => spin_loop(),
                        other => panic!("expected a pong, got {other:?}"),
                    }
                };
                assert_eq!(echoed, nonce, "the pong echoes the ping's nonce");
            }
            start.elapsed()
        });
    });
    group.finish();

    // Ordering: Relaxed: the flag carries no data; `join` synchronises with the thread's end.
    stop.store(true, Ordering::Relaxed);
    echo.join().expect("the echo thread does not panic");
}

/// The guest of `round_trip`: answers every ping until `stop` is set.
fn echo_pings(region: &HeapRegion, stop: &AtomicBool) {
    let mem: &MappedRegion = region;
    let mut guest = attach_guest(region);
    let mut buf = frame_buf();
    // Ordering: Relaxed: only a request to stop; nothing is read after seeing it.
    while !stop.load(Ordering::Relaxed) {
        let nonce = match guest.recv(mem, &mut buf) {
            Ok(Some(HostToAgent::Ping { nonce })) => nonce,
            Ok(None) => {
                spin_loop();
                continue;
            }
            other => panic!("expected a ping, got {other:?}"),
        };
        guest
            .send(mem, &AgentToHost::Pong { nonce })
            .expect("a ping-pong never fills the ring");
    }
}

/// Payload bytes per frame in the throughput benches.
const CHUNK: usize = 4096;
/// Payload bytes moved per iteration of a throughput bench.
const BYTES_PER_ITER: u64 = 64 << 20;
/// Frames per iteration of a throughput bench.
const FRAMES_PER_ITER: u64 = BYTES_PER_ITER / CHUNK as u64;

/// Sends chunk number `seq` from the guest; `Full` means retry.
type SendChunk = fn(&mut GuestEndpoint, &MappedRegion, &[u8; CHUNK], u64) -> Result<(), SendError>;
/// Receives one chunk at the host: the payload bytes it carried, or `None` if the ring is
/// empty.
type RecvChunk = fn(&mut HostEndpoint, &MappedRegion, &mut FrameBuf) -> Option<usize>;

/// `throughput/one_way/4KiB` (raw frames) and `throughput/output_messages/4KiB` (`Output`
/// messages encoded into the ring and decoded on receipt): 64 MiB per iteration through the
/// 512 KiB guest-to-host ring, a producer thread against the measuring consumer.
fn throughput(c: &mut Criterion) {
    let mut group = c.benchmark_group("throughput");
    // Tens of milliseconds per iteration: flat sampling keeps the run short.
    group
        .sampling_mode(SamplingMode::Flat)
        .sample_size(20)
        .measurement_time(Duration::from_secs(5))
        .throughput(Throughput::Bytes(BYTES_PER_ITER));
    one_way(&mut group, "one_way/4KiB", send_frame, recv_frame);
    one_way(&mut group, "output_messages/4KiB", send_output, recv_output);
    group.finish();
}

fn send_frame(
    guest: &mut GuestEndpoint,
    mem: &MappedRegion,
    chunk: &[u8; CHUNK],
    _seq: u64,
) -> Result<(), SendError> {
    guest.send_frame(mem, chunk)
}

fn recv_frame(host: &mut HostEndpoint, mem: &MappedRegion, buf: &mut FrameBuf) -> Option<usize> {
    let payload = host.recv_frame(mem, buf).expect("the ring is valid")?;
    Some(payload.len())
}

const EXECUTION: ExecutionId = ExecutionId {
    generation: 2,
    counter: 1,
};

fn send_output(
    guest: &mut GuestEndpoint,
    mem: &MappedRegion,
    chunk: &[u8; CHUNK],
    seq: u64,
) -> Result<(), SendError> {
    let output = AgentToHost::Output {
        execution: EXECUTION,
        stream: Stream::Stdout,
        offset: seq * CHUNK as u64,
        data: chunk,
    };
    guest.send(mem, &output)
}

fn recv_output(host: &mut HostEndpoint, mem: &MappedRegion, buf: &mut FrameBuf) -> Option<usize> {
    match host.recv(mem, buf).expect("the ring is valid")? {
        AgentToHost::Output { data, .. } => Some(data.len()),
        other => panic!("expected output, got {other:?}"),
    }
}

fn one_way(group: &mut BenchmarkGroup<'_, WallTime>, id: &str, send: SendChunk, recv: RecvChunk) {
    let region = Arc::new(region());
    let mem: &MappedRegion = &region;
    let mut host = create_host(&region);
    // Each job is a number of chunks to send; dropping `jobs` stops the producer.
    let (jobs, job_queue) = mpsc::channel::<u64>();
    let producer = thread::spawn({
        let region = Arc::clone(&region);
        move || produce(&region, &job_queue, send)
    });

    let mut buf = frame_buf();
    group.bench_function(id, |b| {
        b.iter_custom(|iters| {
            let frames = iters * FRAMES_PER_ITER;
            let start = Instant::now();
            jobs.send(frames)
                .expect("the producer runs until `jobs` is dropped");
            let (mut received, mut bytes) = (0u64, 0u64);
            while received < frames {
                match recv(&mut host, mem, &mut buf) {
                    Some(len) => {
                        received += 1;
                        bytes += len as u64;
                    }
                    None => spin_loop(),
                }
            }
            let elapsed = start.elapsed();
            assert_eq!(bytes, iters * BYTES_PER_ITER, "every byte arrives");
            elapsed
        });
    });

    drop(jobs);
    producer.join().expect("the producer does not panic");
}

/// The guest of `one_way`: for each job, sends that many chunks, spinning while the ring is
/// too full for the next one.
fn produce(region: &HeapRegion, job_queue: &Receiver<u64>, send: SendChunk) {
    let mem: &MappedRegion = region;
    let mut guest = attach_guest(region);
    let mut chunk = [0u8; CHUNK];
    for (i, b) in chunk.iter_mut().enumerate() {
        *b = (i % 251) as u8;
    }
    let mut seq = 0u64;
    while let Ok(frames) = job_queue.recv() {
        for _ in 0..frames {
            loop {
                match send(&mut guest, mem, &chunk, seq) {
                    Ok(()) => break,
                    // Wait for the space the frame needs before trying again, as a real
                    // producer does (it would arm `prepare_wait(needed)` and sleep): a failed
                    // `send` costs an encoding attempt, a `tx_free` only a load.
                    Err(SendError::Full { needed }) => {
                        while guest.tx_free(mem).expect("the ring is valid") < needed {
                            spin_loop();
                        }
                    }
                    Err(e) => panic!("send failed: {e}"),
                }
            }
            seq += 1;
        }
    }
}

criterion_group! {
    name = benches;
    // 20 000 bootstrap resamples instead of 100 000: plenty for 20-30 samples, and it
    // halves the time spent on analysis and plots.
    config = Criterion::default()
        .nresamples(20_000)
        .warm_up_time(Duration::from_secs(1))
        .measurement_time(Duration::from_secs(4))
        .sample_size(30);
    targets = frame_send_recv, round_trip, throughput
}
criterion_main!(benches);
