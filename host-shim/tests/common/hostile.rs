//! A hostile guest: a fake agent on `ring-protocol` over a plain VM's shared file, which
//! behaves like an agent where it must (hello, heartbeat, listing) and floods or lies where
//! the daemon must hold its ground. One thread per guest, stopped by a flag.
#![allow(dead_code, unreachable_pub)]

use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use host_shim::vm::memory::GuestRegion;
use ring_protocol::message::{
    AgentToHost, Capabilities, CommandInfo, ExecState, ExecutionId, Finished, Hello, HostToAgent,
    MIN_PROTOCOL_VERSION, Outcome, PROTOCOL_VERSION, Rejection, Stream,
};
use ring_protocol::{GuestEndpoint, SendError, Start, frame_buf};

/// What the hostile guest does.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Flood {
    /// An honest minimal agent: answers hello, listings, pings, and runs `flood` as an
    /// execution that exits at once with code 0 and no output.
    Honest,
    /// Sends `Hello { reply: false }` in a loop and never reads its incoming ring.
    HelloNoRead,
    /// Answers the host's listing request with `Command` frames without end.
    Listing,
    /// Accepts every exec and sends its output as 1-byte frames as fast as the ring takes
    /// them, never exiting.
    OneByteOutput,
    /// Answers every exec request with a `Pong` (and every ping with `Metrics`) carrying
    /// its id: replies of the wrong kind.
    MismatchedReplies,
    /// Keeps its heartbeat and reads every request, but never answers one.
    NeverAnswer,
    /// Accepts every exec under the same agent execution id.
    IdReuse,
    /// Answers a push that asks to run with `Started` only after this long, then sends
    /// output for that execution.
    SlowPush(Duration),
}

/// What a hostile guest counted.
#[derive(Debug, Default)]
pub struct Counters {
    /// Frames it sent.
    pub sent: AtomicU64,
    /// Requests it read.
    pub received: AtomicU64,
    /// Times it attached (once, plus once after each reset the host made).
    pub attaches: AtomicU64,
    /// Cancel requests it read.
    pub cancels: AtomicU64,
    /// Pushes it started (`SlowPush`).
    pub started_pushes: AtomicU64,
}

/// A running hostile guest; stops on drop.
pub struct HostileGuest {
    stop: Arc<AtomicBool>,
    thread: Option<JoinHandle<()>>,
    /// What it counted.
    pub counters: Arc<Counters>,
}

impl HostileGuest {
    /// Starts a guest doing `flood` on the plain region at `region`.
    pub fn start(region: &Path, flood: Flood) -> Self {
        let stop = Arc::new(AtomicBool::new(false));
        let counters = Arc::new(Counters::default());
        let (s, c, path) = (stop.clone(), counters.clone(), region.to_owned());
        let thread = std::thread::Builder::new()
            .name(format!("hostile-{flood:?}"))
            .spawn(move || run(&path, flood, &s, &c))
            .expect("hostile guest thread");
        Self {
            stop,
            thread: Some(thread),
            counters,
        }
    }

    /// Stops the guest and waits for its thread.
    pub fn stop(&mut self) {
        // Ordering: Relaxed: a flag polled in a loop; the join orders the rest.
        self.stop.store(true, Ordering::Relaxed);
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
    }
}

impl Drop for HostileGuest {
    fn drop(&mut self) {
        self.stop();
    }
}

/// A request the hostile guest cares about, copied out of the frame.
enum Req {
    Hello { reply: bool },
    Ping(u64),
    List(u64, u16),
    Exec(u64),
    Status(u64, ExecutionId),
    Cancel(u64, ExecutionId),
    Metrics(u64),
    PushCommit(u64, bool),
    Other,
}

fn owned(msg: &HostToAgent<'_>) -> Req {
    match msg {
        HostToAgent::Hello(h) => Req::Hello { reply: h.reply },
        HostToAgent::Ping { nonce } => Req::Ping(*nonce),
        HostToAgent::ListCommands {
            request_id, start, ..
        } => Req::List(*request_id, *start),
        HostToAgent::Exec(e) => Req::Exec(e.request_id),
        HostToAgent::Status {
            request_id,
            execution,
        } => Req::Status(*request_id, *execution),
        HostToAgent::Cancel {
            request_id,
            execution,
        } => Req::Cancel(*request_id, *execution),
        HostToAgent::Metrics { request_id } => Req::Metrics(*request_id),
        HostToAgent::PushCommit { push_id, run, .. } => Req::PushCommit(*push_id, *run),
        _ => Req::Other,
    }
}

struct Guest<'a> {
    mem: &'a GuestRegion,
    ep: GuestEndpoint,
    generation: u32,
    counters: &'a Counters,
    next_counter: u32,
    beat_at: Instant,
}

impl Guest<'_> {
    /// Sends `msg`; `false` when the ring is full or the host is resetting.
    fn send(&mut self, msg: &AgentToHost<'_>) -> bool {
        match self.ep.send(self.mem, msg) {
            Ok(()) => {
                self.counters.sent.fetch_add(1, Ordering::Relaxed);
                true
            }
            Err(SendError::Full { .. } | SendError::Detached) => false,
            Err(e) => panic!("hostile guest: {e}"),
        }
    }

    fn hello(&mut self, reply: bool) -> bool {
        self.send(&AgentToHost::Hello(Hello {
            min_version: MIN_PROTOCOL_VERSION,
            max_version: PROTOCOL_VERSION,
            capabilities: Capabilities::default(),
            generation: self.generation,
            config_revision: 1,
            software: "hostile/0",
            reply,
        }))
    }

    fn beat(&mut self) {
        if self.beat_at.elapsed() >= Duration::from_millis(100) {
            self.ep.beat(self.mem);
            self.beat_at = Instant::now();
        }
    }

    fn new_id(&mut self) -> ExecutionId {
        self.next_counter += 1;
        ExecutionId {
            generation: self.generation,
            counter: self.next_counter,
        }
    }

    /// Answers one listing request with the single command `flood`.
    fn list(&mut self, request_id: u64) {
        let info = CommandInfo {
            name: "flood",
            description: "a hostile guest's command",
            params: heapless::Vec::new(),
            timeout_ms: 0,
            max_output: 1 << 30,
        };
        let _ = self.send(&AgentToHost::Command {
            request_id,
            index: 0,
            info,
        });
        let _ = self.send(&AgentToHost::CommandsEnd {
            request_id,
            total: 1,
            next: None,
        });
    }
}

fn attach<'a>(
    mem: &'a GuestRegion,
    counters: &'a Counters,
    generation: u32,
    stop: &AtomicBool,
) -> Option<Guest<'a>> {
    loop {
        if stop.load(Ordering::Relaxed) {
            return None;
        }
        if let Ok(ep) = GuestEndpoint::attach(mem, generation, Start::SkipPending, None) {
            counters.attaches.fetch_add(1, Ordering::Relaxed);
            return Some(Guest {
                mem,
                ep,
                generation,
                counters,
                next_counter: 0,
                beat_at: Instant::now() - Duration::from_secs(1),
            });
        }
        std::thread::sleep(Duration::from_millis(5));
    }
}

fn run(region: &Path, flood: Flood, stop: &AtomicBool, counters: &Counters) {
    let mem = GuestRegion::open(region).expect("hostile guest: region");
    // A generation of its own, as a restarted agent would have.
    let mut generation = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0x0bad_0000, |d| d.subsec_nanos() << 2);
    'attach: loop {
        generation += 1;
        let Some(mut g) = attach(&mem, counters, generation, stop) else {
            return;
        };
        let _ = g.hello(false);
        let mut buf = frame_buf();
        let mut flooding: Vec<ExecutionId> = Vec::new();
        let mut listing: Option<u64> = None;
        let mut output_offset = 0u64;
        let mut reused: Option<ExecutionId> = None;
        let mut slow_push: Option<(u64, Instant)> = None;
        while !stop.load(Ordering::Relaxed) {
            g.beat();
            if g.ep.check_session(g.mem).is_err() {
                continue 'attach;
            }
            let mut worked = false;
            if flood == Flood::HelloNoRead {
                worked |= g.hello(false);
                if !worked {
                    std::thread::sleep(Duration::from_micros(50));
                }
                continue;
            }
            // Read what the host sent.
            loop {
                let req = match g.ep.recv(g.mem, &mut buf) {
                    Ok(Some(m)) => owned(&m),
                    Ok(None) => break,
                    Err(_) => continue 'attach,
                };
                worked = true;
                counters.received.fetch_add(1, Ordering::Relaxed);
                if flood == Flood::NeverAnswer && !matches!(req, Req::Hello { .. }) {
                    continue;
                }
                match req {
                    Req::Hello { reply } => {
                        if !reply {
                            let _ = g.hello(true);
                        }
                    }
                    Req::Ping(nonce) => {
                        if flood == Flood::MismatchedReplies {
                            let _ = g.send(&AgentToHost::Metrics {
                                request_id: nonce,
                                metrics: Default::default(),
                            });
                        } else {
                            let _ = g.send(&AgentToHost::Pong { nonce });
                        }
                    }
                    Req::List(request_id, _) => {
                        if flood == Flood::Listing {
                            listing = Some(request_id);
                        } else {
                            g.list(request_id);
                        }
                    }
                    Req::Exec(request_id) => match flood {
                        Flood::MismatchedReplies => {
                            let _ = g.send(&AgentToHost::Pong { nonce: request_id });
                        }
                        Flood::IdReuse => {
                            let id = *reused.get_or_insert_with(|| g.new_id());
                            let _ = g.send(&AgentToHost::Accepted {
                                request_id,
                                execution: id,
                            });
                        }
                        Flood::OneByteOutput => {
                            let id = g.new_id();
                            let _ = g.send(&AgentToHost::Accepted {
                                request_id,
                                execution: id,
                            });
                            flooding.push(id);
                        }
                        _ => {
                            let id = g.new_id();
                            let _ = g.send(&AgentToHost::Accepted {
                                request_id,
                                execution: id,
                            });
                            let _ = g.send(&AgentToHost::Exit {
                                execution: id,
                                finished: Finished {
                                    outcome: Outcome::Exited(0),
                                    duration_ms: 1,
                                    stdout_bytes: 0,
                                    stderr_bytes: 0,
                                    truncated: false,
                                },
                            });
                        }
                    },
                    Req::Status(request_id, execution) => {
                        let _ = g.send(&AgentToHost::Status {
                            request_id,
                            execution,
                            state: ExecState::Unknown,
                        });
                    }
                    Req::Cancel(..) => {
                        counters.cancels.fetch_add(1, Ordering::Relaxed);
                    }
                    Req::Metrics(request_id) => {
                        let _ = g.send(&AgentToHost::Rejected {
                            request_id,
                            reason: Rejection::NotAllowed,
                        });
                    }
                    Req::PushCommit(push_id, true) if matches!(flood, Flood::SlowPush(_)) => {
                        if let Flood::SlowPush(delay) = flood {
                            slow_push = Some((push_id, Instant::now() + delay));
                        }
                    }
                    Req::PushCommit(push_id, _) => {
                        let _ = g.send(&AgentToHost::PushResult {
                            push_id,
                            outcome: ring_protocol::message::PushOutcome::Failed(
                                Rejection::NotAllowed,
                            ),
                        });
                    }
                    Req::Other => {}
                }
            }
            // A slow push starts late, and prints.
            if let Some((push_id, at)) = slow_push
                && Instant::now() >= at
            {
                slow_push = None;
                let id = g.new_id();
                let _ = g.send(&AgentToHost::PushResult {
                    push_id,
                    outcome: ring_protocol::message::PushOutcome::Started(id),
                });
                let _ = g.send(&AgentToHost::Output {
                    execution: id,
                    stream: Stream::Stdout,
                    offset: 0,
                    data: b"late output\n",
                });
                counters.started_pushes.fetch_add(1, Ordering::Relaxed);
                worked = true;
            }
            // Flood what this guest floods.
            if let Some(request_id) = listing {
                for _ in 0..64 {
                    let info = CommandInfo {
                        name: "flood",
                        description: "one more command, and one more",
                        params: heapless::Vec::new(),
                        timeout_ms: 0,
                        max_output: 0,
                    };
                    if !g.send(&AgentToHost::Command {
                        request_id,
                        index: 0,
                        info,
                    }) {
                        break;
                    }
                    worked = true;
                }
            }
            if let Some(&execution) = flooding.first() {
                for _ in 0..256 {
                    if !g.send(&AgentToHost::Output {
                        execution,
                        stream: Stream::Stdout,
                        offset: output_offset,
                        data: b"x",
                    }) {
                        break;
                    }
                    output_offset += 1;
                    worked = true;
                }
            }
            if !worked {
                std::thread::sleep(Duration::from_micros(200));
            }
        }
        return;
    }
}

/// The path of a plain VM's region file in a test directory.
pub fn region_path(dir: &Path, vm: &str) -> PathBuf {
    dir.join(format!("{vm}.region"))
}
