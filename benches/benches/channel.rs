//! Criterion benchmarks of the channel over a region in ordinary memory: the cost of one frame
//! through a ring on one thread, the latency of a ping/pong round trip between two threads
//! (spinning, adaptive polling with sleeps, eventfd doorbells), and one-way byte throughput from a producer thread to a consumer thread. Together
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
    let echo = Echo::start(&region, &host, echo_pings);

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

    echo.finish(|| {});
}

/// A guest thread answering pings for the length of a benchmark.
struct Echo {
    stop: Arc<AtomicBool>,
    thread: thread::JoinHandle<()>,
}

impl Echo {
    /// Starts `guest` on `region` and waits until it has attached.
    fn start(
        region: &Arc<HeapRegion>,
        host: &HostEndpoint,
        guest: impl FnOnce(&HeapRegion, &AtomicBool) + Send + 'static,
    ) -> Self {
        let stop = Arc::new(AtomicBool::new(false));
        let thread = thread::spawn({
            let (region, stop) = (Arc::clone(region), Arc::clone(&stop));
            move || guest(&region, &stop)
        });
        let mem: &MappedRegion = region;
        while !host.guest_attached(mem) {
            thread::yield_now();
        }
        Self { stop, thread }
    }

    /// Stops the guest (`wake` rouses it if it may be asleep) and waits for it.
    fn finish(self, wake: impl FnOnce()) {
        // Ordering: Relaxed: the flag carries no data; `join` synchronises with the thread's
        // end.
        self.stop.store(true, Ordering::Relaxed);
        wake();
        self.thread.join().expect("the echo thread does not panic");
    }
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

/// How long the adaptive guest spins after a message before it starts sleeping (as
/// `portless-agent` does).
const ADAPTIVE_SPIN: Duration = Duration::from_micros(50);
/// Its first sleep; each further one doubles, up to [`ADAPTIVE_MAX_SLEEP`].
const ADAPTIVE_FIRST_SLEEP: Duration = Duration::from_micros(10);
/// Its longest sleep.
const ADAPTIVE_MAX_SLEEP: Duration = Duration::from_millis(1);
/// The host's pause between pings in `round_trip/adaptive_polling_idle_gap`.
const IDLE_GAP: Duration = Duration::from_millis(2);

/// `round_trip/adaptive_polling` and `round_trip/adaptive_polling_idle_gap`: as
/// `round_trip/spin`, but the guest thread waits as `portless-agent` does when it has no
/// doorbell: it spins for 50 us after a message, then sleeps (`thread::sleep`) for 10 us,
/// 20 us, ... up to 1 ms between looks at the ring. Back to back, pings find it spinning;
/// with a 2 ms gap before each ping (not timed) they find it in its 1 ms sleeps.
fn round_trip_adaptive(c: &mut Criterion) {
    let region = Arc::new(region());
    let mem: &MappedRegion = &region;
    let mut host = create_host(&region);
    let echo = Echo::start(&region, &host, echo_pings_adaptive);

    let mut group = c.benchmark_group("round_trip");
    let mut buf = frame_buf();
    let mut nonce = 0u64;
    let mut ping = |host: &mut HostEndpoint, buf: &mut FrameBuf| {
        nonce = nonce.wrapping_add(1);
        host.send(mem, &HostToAgent::Ping { nonce })
            .expect("a ping-pong never fills the ring");
        let echoed = loop {
            match host.recv(mem, buf) {
                Ok(Some(AgentToHost::Pong { nonce })) => break nonce,
                Ok(None) => spin_loop(),
                other => panic!("expected a pong, got {other:?}"),
            }
        };
        assert_eq!(echoed, nonce, "the pong echoes the ping's nonce");
    };
    group.bench_function("adaptive_polling", |b| {
        b.iter_custom(|iters| {
            let start = Instant::now();
            for _ in 0..iters {
                ping(&mut host, &mut buf);
            }
            start.elapsed()
        });
    });
    // Each iteration takes the gap plus the latency of wall time, of which only the latency
    // counts towards criterion's targets: keep them small.
    group
        .sampling_mode(SamplingMode::Flat)
        .sample_size(20)
        .warm_up_time(Duration::from_millis(300))
        .measurement_time(Duration::from_secs(1));
    group.bench_function("adaptive_polling_idle_gap", |b| {
        b.iter_custom(|iters| {
            let mut timed = Duration::ZERO;
            for _ in 0..iters {
                thread::sleep(IDLE_GAP);
                let start = Instant::now();
                ping(&mut host, &mut buf);
                timed += start.elapsed();
            }
            timed
        });
    });
    group.finish();

    echo.finish(|| {});
}

/// The guest of `round_trip_adaptive`: answers every ping until `stop` is set, spinning
/// then sleeping for doubling intervals while idle.
fn echo_pings_adaptive(region: &HeapRegion, stop: &AtomicBool) {
    let mem: &MappedRegion = region;
    let mut guest = attach_guest(region);
    let mut buf = frame_buf();
    let mut last_message = Instant::now();
    let mut sleep = Duration::ZERO;
    // Ordering: Relaxed: only a request to stop; nothing is read after seeing it.
    while !stop.load(Ordering::Relaxed) {
        let nonce = match guest.recv(mem, &mut buf) {
            Ok(Some(HostToAgent::Ping { nonce })) => nonce,
            Ok(None) => {
                if last_message.elapsed() < ADAPTIVE_SPIN {
                    spin_loop();
                } else {
                    sleep = if sleep.is_zero() {
                        ADAPTIVE_FIRST_SLEEP
                    } else {
                        (sleep * 2).min(ADAPTIVE_MAX_SLEEP)
                    };
                    thread::sleep(sleep);
                }
                continue;
            }
            other => panic!("expected a ping, got {other:?}"),
        };
        guest
            .send(mem, &AgentToHost::Pong { nonce })
            .expect("a ping-pong never fills the ring");
        last_message = Instant::now();
        sleep = Duration::ZERO;
    }
}

/// An eventfd, closed on drop.
struct EventFd(libc::c_int);

impl EventFd {
    fn new() -> Self {
        // SAFETY: eventfd takes no pointers; the result is checked.
        let fd = unsafe { libc::eventfd(0, libc::EFD_CLOEXEC) };
        assert!(fd >= 0, "eventfd: {}", std::io::Error::last_os_error());
        Self(fd)
    }

    /// Adds 1 to the counter, waking a reader.
    fn ring(&self) {
        let one = 1u64;
        // SAFETY: writes 8 bytes from a live u64 to a descriptor this value owns.
        let n = unsafe { libc::write(self.0, (&raw const one).cast(), 8) };
        assert_eq!(n, 8, "eventfd write: {}", std::io::Error::last_os_error());
    }

    /// Blocks until the counter is non-zero, then resets it.
    fn wait(&self) {
        let mut count = 0u64;
        loop {
            // SAFETY: reads 8 bytes into a live u64 from a descriptor this value owns.
            let n = unsafe { libc::read(self.0, (&raw mut count).cast(), 8) };
            if n == 8 {
                return;
            }
            let err = std::io::Error::last_os_error();
            assert_eq!(
                err.kind(),
                std::io::ErrorKind::Interrupted,
                "eventfd read: {err}"
            );
        }
    }
}

impl Drop for EventFd {
    fn drop(&mut self) {
        // SAFETY: the descriptor is owned by this value and closed once.
        unsafe { libc::close(self.0) };
    }
}

/// Sleeps on `own` until a message may be waiting, with the channel's notification
/// protocol: arm, sleep only if the ring is still empty, disarm.
fn sleep_for_message<R: ring_protocol::Role>(
    ep: &mut ring_protocol::Endpoint<R>,
    mem: &MappedRegion,
    own: &EventFd,
) {
    if ep.prepare_wait(mem, None).expect("the ring is valid") {
        own.wait();
    }
    ep.end_wait(mem);
}

/// `round_trip/eventfd_doorbell`: as `round_trip/spin`, but both sides sleep in a blocking
/// `read` of their own eventfd whenever their ring is empty (after `prepare_wait`), and ring
/// the peer's eventfd after sending when `take_kick` says the peer is asleep: every round
/// trip pays for two kernel wakeups.
fn round_trip_eventfd(c: &mut Criterion) {
    let region = Arc::new(region());
    let mem: &MappedRegion = &region;
    let mut host = create_host(&region);
    let host_fd = Arc::new(EventFd::new());
    let guest_fd = Arc::new(EventFd::new());
    let echo = Echo::start(&region, &host, {
        let (host_fd, guest_fd) = (Arc::clone(&host_fd), Arc::clone(&guest_fd));
        move |region: &HeapRegion, stop: &AtomicBool| {
            echo_pings_eventfd(region, stop, &guest_fd, &host_fd);
        }
    });

    let mut group = c.benchmark_group("round_trip");
    let mut buf = frame_buf();
    let mut nonce = 0u64;
    group.bench_function("eventfd_doorbell", |b| {
        b.iter_custom(|iters| {
            let start = Instant::now();
            for _ in 0..iters {
                nonce = nonce.wrapping_add(1);
                host.send(mem, &HostToAgent::Ping { nonce })
                    .expect("a ping-pong never fills the ring");
                if host.take_kick(mem) {
                    guest_fd.ring();
                }
                let echoed = loop {
                    match host.recv(mem, &mut buf) {
                        Ok(Some(AgentToHost::Pong { nonce })) => break nonce,
                        Ok(None) => sleep_for_message(&mut host, mem, &host_fd),
                        other => panic!("expected a pong, got {other:?}"),
                    }
                };
                assert_eq!(echoed, nonce, "the pong echoes the ping's nonce");
            }
            start.elapsed()
        });
    });
    group.finish();

    // The eventfd write wakes the sleeping guest, which then sees the stop flag.
    echo.finish(|| guest_fd.ring());
}

/// The guest of `round_trip_eventfd`: answers every ping until `stop` is set, sleeping on
/// `own` while its ring is empty and ringing `peer` when the host sleeps.
fn echo_pings_eventfd(region: &HeapRegion, stop: &AtomicBool, own: &EventFd, peer: &EventFd) {
    let mem: &MappedRegion = region;
    let mut guest = attach_guest(region);
    let mut buf = frame_buf();
    // Ordering: Relaxed: only a request to stop; nothing is read after seeing it.
    while !stop.load(Ordering::Relaxed) {
        let nonce = match guest.recv(mem, &mut buf) {
            Ok(Some(HostToAgent::Ping { nonce })) => nonce,
            Ok(None) => {
                sleep_for_message(&mut guest, mem, own);
                continue;
            }
            other => panic!("expected a ping, got {other:?}"),
        };
        guest
            .send(mem, &AgentToHost::Pong { nonce })
            .expect("a ping-pong never fills the ring");
        if guest.take_kick(mem) {
            peer.ring();
        }
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
    targets = frame_send_recv, round_trip, round_trip_adaptive, round_trip_eventfd, throughput
}
criterion_main!(benches);
