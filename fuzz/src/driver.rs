//! The script that `host_driver` runs: the daemon's VM driver (stepped by hand, with its
//! records in SQLite) against a guest that the input plays, together with API requests and
//! time passing. The guest may behave like an agent, answer with the wrong ids or kinds,
//! reuse execution ids, flood output, send garbage, corrupt the header or go silent.
//!
//! After every operation the driver must hold no more than its budget allows; after the
//! script the guest goes silent, time passes, and every execution the script recorded must
//! have ended. Nothing may panic.
//!
//! A script is a sequence of operations, each an opcode byte (taken modulo [`OPS`]) and
//! argument bytes ([`Script`] reads them, missing bytes read as 0). To see what an input
//! does: `FUZZ_TRACE=1 FUZZ_INPUT=path cargo test --manifest-path fuzz/Cargo.toml --
//! --ignored trace_one --nocapture` prints each operation and the driver's footprint.

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, OnceLock};
use std::time::{Duration, Instant};

use host_shim::config::BudgetConfig;
use host_shim::records::{ExecutionId, NewExecution, Records, Writer};
use host_shim::vm::memory::GuestRegion;
use host_shim::vm::stepped::SteppedDriver;
use host_shim::vm::{Request, VmSettings};
use ring_protocol::layout::offsets;
use ring_protocol::message::{
    AgentToHost, Capabilities, CommandInfo, ExecState, ExecutionId as AgentId, Finished, Hello,
    HostToAgent, Metrics, Outcome, PROTOCOL_VERSION, PushOutcome, Rejection, Stream,
};
use ring_protocol::{GuestEndpoint, SharedMemory, Start, frame_buf};

/// Operations in a script, at most.
pub const MAX_OPS: usize = 200;
/// Kinds of operation.
pub const OPS: u8 = 16;
/// The region's size.
const REGION: usize = 64 * 1024;

/// Budgets small enough for a short script to reach every one.
fn budget() -> BudgetConfig {
    BudgetConfig {
        queued_bytes: 32 * 1024,
        listing_entries: 8,
        listing_bytes: 4096,
        requests_in_flight: 8,
        answer_timeout: Duration::from_millis(300),
        frames_per_pass: 16,
        frames_per_s: 2000,
        output_bytes_per_s: 64 * 1024,
        output_rows_per_s: 50,
        violations_per_min: 12,
        backoff: Duration::from_millis(50),
        backoff_max: Duration::from_millis(400),
    }
}

/// Output merged per stream up to this many bytes.
const MERGE: usize = 4096;

/// The records shared by every run of the process (each run uses VMs of its own).
fn records() -> &'static Arc<Records> {
    static RECORDS: OnceLock<Arc<Records>> = OnceLock::new();
    RECORDS.get_or_init(|| {
        let dir = std::env::temp_dir().join(format!("portless-fuzz-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        Arc::new(Records::open(&dir, 1 << 20).expect("records"))
    })
}

/// The input, read a byte at a time (0 past its end).
pub struct Script<'a> {
    data: &'a [u8],
    at: usize,
}

impl<'a> Script<'a> {
    /// A script over `data`.
    pub fn new(data: &'a [u8]) -> Self {
        Self { data, at: 0 }
    }

    fn byte(&mut self) -> u8 {
        let b = self.data.get(self.at).copied().unwrap_or(0);
        self.at += 1;
        b
    }

    fn done(&self) -> bool {
        self.at >= self.data.len()
    }
}

/// The guest the script plays.
struct Guest {
    mem: GuestRegion,
    ep: Option<GuestEndpoint>,
    generation: u32,
    counter: u32,
    /// Request ids the host sent, newest last (a few).
    seen: Vec<u64>,
    /// Execution ids this guest handed out.
    started: Vec<AgentId>,
    offset: u64,
}

impl Guest {
    fn send(&mut self, msg: &AgentToHost<'_>) {
        if let Some(ep) = self.ep.as_mut() {
            let _ = ep.send(&self.mem, msg);
        }
    }

    fn id(&mut self, pick: u8) -> u64 {
        if pick < 200 && !self.seen.is_empty() {
            self.seen[usize::from(pick) % self.seen.len()]
        } else {
            u64::from(pick) << 8 | u64::from(pick)
        }
    }

    fn execution(&mut self, pick: u8) -> AgentId {
        if pick < 128 && !self.started.is_empty() {
            self.started[usize::from(pick) % self.started.len()]
        } else {
            AgentId {
                generation: self.generation ^ u32::from(pick & 1),
                counter: u32::from(pick),
            }
        }
    }

    fn new_execution(&mut self) -> AgentId {
        self.counter += 1;
        let id = AgentId {
            generation: self.generation,
            counter: self.counter,
        };
        self.started.push(id);
        if self.started.len() > 16 {
            self.started.remove(0);
        }
        id
    }

    fn hello(&mut self, reply: bool) {
        let generation = self.generation;
        self.send(&AgentToHost::Hello(Hello {
            min_version: 1,
            max_version: PROTOCOL_VERSION,
            capabilities: Capabilities::default(),
            generation,
            config_revision: 1,
            software: "fuzz",
            reply,
        }));
    }

    /// Reads what the host sent and answers like an agent would, or (by `mode`) with the
    /// wrong kind, a reused id, or not at all.
    fn answer(&mut self, mode: u8, max: u8) {
        let Some(ep) = self.ep.as_mut() else { return };
        let mut buf = frame_buf();
        let mut asked = Vec::new();
        for _ in 0..=max {
            match ep.recv(&self.mem, &mut buf) {
                Ok(Some(msg)) => asked.push(match msg {
                    HostToAgent::Hello(h) => (0, 0, h.reply, None),
                    HostToAgent::Ping { nonce } => (1, nonce, false, None),
                    HostToAgent::ListCommands { request_id, .. } => (2, request_id, false, None),
                    HostToAgent::Exec(e) => (3, e.request_id, false, None),
                    HostToAgent::Status {
                        request_id,
                        execution,
                    } => (4, request_id, false, Some(execution)),
                    HostToAgent::Cancel {
                        request_id,
                        execution,
                    } => (5, request_id, false, Some(execution)),
                    HostToAgent::PushCommit { push_id, run, .. } => (6, push_id, run, None),
                    HostToAgent::Metrics { request_id } => (7, request_id, false, None),
                    _ => (8, 0, false, None),
                }),
                _ => break,
            }
        }
        for (kind, id, flag, execution) in asked {
            if id != 0 {
                self.seen.push(id);
                if self.seen.len() > 16 {
                    self.seen.remove(0);
                }
            }
            if mode % 4 == 3 && kind != 0 {
                continue; // silent
            }
            let wrong = mode % 4 == 1;
            match (kind, wrong) {
                (0, _) if !flag => self.hello(true),
                (1, false) => self.send(&AgentToHost::Pong { nonce: id }),
                (2, false) => {
                    let info = CommandInfo {
                        name: "run",
                        description: "a fuzzed command",
                        params: heapless::Vec::new(),
                        timeout_ms: u32::from(mode) * 10,
                        max_output: 1 << 20,
                    };
                    self.send(&AgentToHost::Command {
                        request_id: id,
                        index: 0,
                        info,
                    });
                    self.send(&AgentToHost::CommandsEnd {
                        request_id: id,
                        total: 1,
                        next: None,
                    });
                }
                (3, false) => {
                    let execution = if mode % 4 == 2 {
                        self.started.first().copied().unwrap_or(AgentId {
                            generation: self.generation,
                            counter: 1,
                        })
                    } else {
                        self.new_execution()
                    };
                    self.send(&AgentToHost::Accepted {
                        request_id: id,
                        execution,
                    });
                }
                (4, false) => {
                    let execution = execution.unwrap_or(AgentId {
                        generation: 0,
                        counter: 0,
                    });
                    let state = if mode & 8 != 0 {
                        ExecState::Unknown
                    } else {
                        ExecState::Finished(Finished {
                            outcome: Outcome::Exited(i32::from(mode)),
                            duration_ms: 1,
                            stdout_bytes: 0,
                            stderr_bytes: 0,
                            truncated: false,
                        })
                    };
                    self.send(&AgentToHost::Status {
                        request_id: id,
                        execution,
                        state,
                    });
                }
                (5, false) => {
                    if let Some(execution) = execution {
                        self.send(&AgentToHost::Exit {
                            execution,
                            finished: Finished {
                                outcome: Outcome::Cancelled,
                                duration_ms: 1,
                                stdout_bytes: 0,
                                stderr_bytes: 0,
                                truncated: false,
                            },
                        });
                    }
                }
                (6, false) => {
                    let outcome = if flag {
                        PushOutcome::Started(self.new_execution())
                    } else {
                        PushOutcome::Stored
                    };
                    self.send(&AgentToHost::PushResult {
                        push_id: id,
                        outcome,
                    });
                }
                (7, false) => self.send(&AgentToHost::Metrics {
                    request_id: id,
                    metrics: Metrics::default(),
                }),
                // Of the wrong kind.
                (1 | 7, true) => self.send(&AgentToHost::Rejected {
                    request_id: id,
                    reason: Rejection::Failed,
                }),
                (_, true) => self.send(&AgentToHost::Pong { nonce: id }),
                _ => {}
            }
        }
    }

    /// Sends one message built from the script's bytes.
    fn send_built(&mut self, s: &mut Script<'_>) {
        let kind = s.byte() % 12;
        let pick = s.byte();
        let id = self.id(pick);
        let execution = self.execution(s.byte());
        let n = s.byte();
        match kind {
            0 => self.hello(n & 1 == 1),
            1 => self.send(&AgentToHost::Pong { nonce: id }),
            2 => self.send(&AgentToHost::Command {
                request_id: id,
                index: u16::from(n),
                info: CommandInfo {
                    name: "x",
                    description: "y",
                    params: heapless::Vec::new(),
                    timeout_ms: 0,
                    max_output: 0,
                },
            }),
            3 => self.send(&AgentToHost::CommandsEnd {
                request_id: id,
                total: u16::from(n),
                next: (n & 1 == 1).then_some(u16::from(n)),
            }),
            4 => self.send(&AgentToHost::Accepted {
                request_id: id,
                execution,
            }),
            5 => self.send(&AgentToHost::Rejected {
                request_id: id,
                reason: Rejection::UnknownExecution,
            }),
            6 => {
                let data = vec![b'o'; usize::from(n)];
                let offset = if pick & 1 == 0 {
                    self.offset
                } else {
                    u64::from(pick)
                };
                self.send(&AgentToHost::Output {
                    execution,
                    stream: if n & 1 == 0 {
                        Stream::Stdout
                    } else {
                        Stream::Stderr
                    },
                    offset,
                    data: &data,
                });
                self.offset = offset + u64::from(n);
            }
            7 => self.send(&AgentToHost::Exit {
                execution,
                finished: Finished {
                    outcome: Outcome::Exited(i32::from(n)),
                    duration_ms: u64::from(n),
                    stdout_bytes: 0,
                    stderr_bytes: 0,
                    truncated: n & 1 == 1,
                },
            }),
            8 => self.send(&AgentToHost::PushResult {
                push_id: id,
                outcome: PushOutcome::Started(execution),
            }),
            9 => self.send(&AgentToHost::Metrics {
                request_id: id,
                metrics: Metrics::default(),
            }),
            10 => self.send(&AgentToHost::Status {
                request_id: id,
                execution,
                state: ExecState::Running {
                    elapsed_ms: 1,
                    stdout_bytes: 0,
                    stderr_bytes: 0,
                },
            }),
            _ => self.send(&AgentToHost::CommandsChanged {
                config_revision: u32::from(n),
            }),
        }
    }
}

/// Runs one script; panics if an invariant breaks.
pub fn run(data: &[u8]) {
    static RUN: AtomicU64 = AtomicU64::new(0);
    // Ordering: Relaxed: only uniqueness matters.
    let run = RUN.fetch_add(1, Ordering::Relaxed);
    let records = records();
    let vm = format!("vm{run}");
    let budget = budget();
    let settings = VmSettings {
        heartbeat_timeout: Duration::from_millis(200),
        lost_after: Duration::from_millis(1200),
        delivery_timeout: Duration::from_millis(500),
        reset_timeout: Duration::from_millis(200),
        budget,
        merge_bytes: MERGE,
        merge_wait: Duration::from_millis(5),
        ..VmSettings::new(vm.clone())
    };
    let writer = Writer::inline(records.clone());
    let Ok((mut driver, mem)) = SteppedDriver::new(settings, REGION, writer) else {
        return;
    };
    let mut guest = Guest {
        mem,
        ep: None,
        generation: 1,
        counter: 0,
        seen: Vec::new(),
        started: Vec::new(),
        offset: 0,
    };
    let start = Instant::now();
    let mut clock = Duration::ZERO;
    let mut created: Vec<ExecutionId> = Vec::new();
    let mut tickets = 0u64;
    let mut s = Script::new(data);
    let mut ops = 0;
    while !s.done() && ops < MAX_OPS {
        ops += 1;
        let op = s.byte() % OPS;
        if std::env::var_os("FUZZ_TRACE").is_some() {
            eprintln!(
                "op {op} at byte {} clock {clock:?} {:?}",
                s.at,
                driver.footprint()
            );
        }
        match op {
            0 => {
                guest.generation = u32::from(s.byte()) | 1;
                guest.counter = 0;
                guest.ep =
                    GuestEndpoint::attach(&guest.mem, guest.generation, Start::Resume, None).ok();
                guest.hello(false);
            }
            1 => {
                let mode = s.byte();
                let max = s.byte() % 32;
                guest.answer(mode, max);
            }
            2 => guest.send_built(&mut s),
            3 => {
                let len = usize::from(s.byte());
                let fill = s.byte();
                if let Some(ep) = guest.ep.as_mut() {
                    let _ = ep.send_frame(&guest.mem, &vec![fill; len]);
                }
            }
            4 => {
                // Output of the newest execution, in 1-byte or larger frames.
                let n = s.byte();
                let size = usize::from(s.byte() % 64) + 1;
                if let Some(&execution) = guest.started.last() {
                    for _ in 0..n {
                        let data = vec![b'x'; size];
                        let offset = guest.offset;
                        guest.send(&AgentToHost::Output {
                            execution,
                            stream: Stream::Stdout,
                            offset,
                            data: &data,
                        });
                        guest.offset += size as u64;
                    }
                }
            }
            5 => {
                if let Some(ep) = guest.ep.as_mut() {
                    ep.beat(&guest.mem);
                }
            }
            6 => {
                if let Some(ep) = guest.ep.take() {
                    let _ = ep.request_reset(&guest.mem);
                }
            }
            7 => {
                // The peer writes a header word.
                let word = usize::from(s.byte()) % (offsets::END / 4);
                let value = u32::from_le_bytes([s.byte(), s.byte(), s.byte(), s.byte()]);
                guest
                    .mem
                    .store(word * 4, value, core::sync::atomic::Ordering::Relaxed);
            }
            8 => {
                let n = s.byte();
                let new = NewExecution {
                    principal: "fuzz".into(),
                    vm: vm.clone(),
                    command: if n & 1 == 0 { "run" } else { "other" }.into(),
                    args: vec![],
                    requested_at_ms: 0,
                    fleet_invocation: None,
                };
                if let Ok(id) = records.create_execution(&new) {
                    created.push(id);
                    let (reply, _) = tokio::sync::oneshot::channel();
                    let timeout_ms = (n & 2 != 0).then_some(u32::from(n) * 5);
                    let _ = driver.handle().request(Request::Exec {
                        id,
                        command: new.command,
                        args: vec![],
                        timeout_ms,
                        reply,
                    });
                }
            }
            9 => {
                let (reply, _) = tokio::sync::oneshot::channel();
                let _ = driver.handle().request(Request::Ping { reply });
            }
            10 => {
                let (reply, _) = tokio::sync::oneshot::channel();
                let _ = driver.handle().request(Request::Metrics { reply });
            }
            11 => {
                let (reply, _) = tokio::sync::oneshot::channel();
                let _ = driver.handle().request(Request::Commands { reply });
            }
            12 => {
                let pick = usize::from(s.byte());
                if let Some(&id) = created.get(pick % created.len().max(1)) {
                    let (reply, _) = tokio::sync::oneshot::channel();
                    let _ = driver.handle().request(Request::Cancel { id, reply });
                }
            }
            13 => {
                let size = usize::from(s.byte()) * 97;
                let run = s.byte() & 1 == 1;
                let run = if run {
                    let new = NewExecution {
                        principal: "fuzz".into(),
                        vm: vm.clone(),
                        command: "push:p".into(),
                        args: vec![],
                        requested_at_ms: 0,
                        fleet_invocation: None,
                    };
                    records
                        .create_execution(&new)
                        .ok()
                        .inspect(|id| created.push(*id))
                } else {
                    None
                };
                tickets += 1;
                if std::env::var_os("FUZZ_TRACE").is_some() {
                    eprintln!("push ticket {tickets} run {run:?} size {size}");
                }
                let (reply, _) = tokio::sync::oneshot::channel();
                let _ = driver.handle().request(Request::Push {
                    name: "p".into(),
                    program: host_shim::vm::Program::from_bytes(&vec![7; size]).expect("program"),
                    run,
                    timeout_ms: None,
                    ticket: tickets,
                    reply,
                });
            }
            14 => {
                let ticket = u64::from(s.byte()) % (tickets + 1);
                if std::env::var_os("FUZZ_TRACE").is_some() {
                    eprintln!("withdraw ticket {ticket}");
                }
                let _ = driver.handle().request(Request::WithdrawPush { ticket });
            }
            _ => clock += Duration::from_millis(u64::from(s.byte()) * 4),
        }
        for _ in 0..3 {
            driver.step(start + clock);
            check(&driver, &budget);
        }
    }
    // The guest goes silent; time passes past every deadline and its heartbeat's loss.
    for _ in 0..200 {
        clock += Duration::from_millis(50);
        driver.step(start + clock);
        check(&driver, &budget);
    }
    if std::env::var_os("FUZZ_TRACE").is_some() {
        eprintln!(
            "end: {:?} {:?}",
            driver.footprint(),
            driver.handle().status()
        );
    }
    for id in created {
        let rec = records
            .execution(id)
            .expect("records readable")
            .expect("record exists");
        assert!(
            rec.state.is_final(),
            "execution {id} did not end after the guest went silent: {rec:?}"
        );
    }
    driver.shut_down();
}

/// The driver holds no more than its budget allows.
fn check(driver: &SteppedDriver, b: &BudgetConfig) {
    let f = driver.footprint();
    assert!(f.queued_bytes as u64 <= b.queued_bytes, "{f:?}");
    assert!(f.listing_entries <= b.listing_entries as usize, "{f:?}");
    assert!(f.listing_bytes as u64 <= b.listing_bytes + 1024, "{f:?}");
    assert!(
        f.batch_bytes <= 4 * MERGE + 2 * ring_protocol::MAX_FRAME_LEN,
        "{f:?}"
    );
    assert!(
        f.in_flight <= b.requests_in_flight as usize + f.running + 2,
        "{f:?}"
    );
}
