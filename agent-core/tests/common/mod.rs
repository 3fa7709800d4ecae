//! A fake [`Platform`] with scripted processes, in-memory push files, fixed metrics and a
//! recorded log, and a [`Rig`] that plays the host's end of a channel in ordinary memory
//! with a fake clock, so that the agent state machine can be driven message by message.

#![allow(dead_code, unreachable_pub)]

use std::collections::{BTreeMap, VecDeque};

use agent_core::config::Config;
use agent_core::platform::{
    Errno, ExitStatus, Identity, Limits, LogEvent, Platform, ReadOutcome, Signal, SpawnRequest,
    SystemMetrics,
};
use agent_core::{Activity, Agent};
use ring_protocol::message::{
    AgentToHost, ExecRequest, ExecutionId, Finished, HostToAgent, Rejection, Stream,
};
use ring_protocol::{FrameBuf, GuestEndpoint, HeapRegion, HostEndpoint, Start, frame_buf};

/// Region size of every rig: the smallest allowed, so a 32 KiB agent-to-host ring that a
/// few output chunks fill.
pub const REGION_LEN: usize = 64 * 1024;

/// The agent generation in every rig (so in every execution id).
pub const GENERATION: u32 = 0x00ab_cdef;

/// The fake clock's reading when a rig starts (not 0, so that elapsed times and absolute
/// times cannot be confused).
pub const T0: u64 = 10_000;

/// The allow-list of the tests. Commands, in order: `hello` (no parameters, defaults),
/// `greet` (three parameters of every kind, every per-command setting), `small` (10 bytes
/// of output per stream), `timed` (1 s timeout), `forever` (no timeout).
pub const CONFIG: &str = r#"
[agent]
max_running = 3
kill_grace_ms = 500
default_timeout_ms = 60000
default_max_output = 1048576

[push]
enabled = true
max_bytes = 1000
dir = "/srv/push"
timeout_ms = 10000
user = "runner"
group = 100

[[command]]
name = "hello"
description = "Say hello"
program = "/bin/hello"

[[command]]
name = "greet"
description = "Greet someone, a number of times"
program = "/usr/bin/greet"
args = ["--mode", "{mode}", "--", "{name}", "{count}"]
timeout_ms = 5000
max_output = 4096
user = "nobody"
group = 65534
cwd = "/tmp"
env = ["LANG=C", "GREETING=hi"]

[[command.param]]
name = "name"
kind = "string"
charset = "a-z"
min_len = 1
max_len = 8

[[command.param]]
name = "count"
kind = "integer"
min = 1
max = 5

[[command.param]]
name = "mode"
kind = "choice"
choices = ["loud", "quiet"]

[[command]]
name = "small"
description = "At most 10 bytes of output per stream"
program = "/bin/small"
max_output = 10

[[command]]
name = "timed"
description = "Times out after a second"
program = "/bin/timed"
timeout_ms = 1000

[[command]]
name = "forever"
description = "Never times out"
program = "/bin/forever"
timeout_ms = 0
"#;

/// [`CONFIG`] with program push disabled.
pub fn config_without_push() -> String {
    let text = CONFIG.replace("enabled = true", "enabled = false");
    assert_ne!(text, CONFIG);
    text
}

/// Parses an allow-list the tests rely on.
pub fn config(text: &str) -> Config {
    match Config::parse(text) {
        Ok(config) => config,
        Err(e) => panic!("test allow-list does not load: {e}"),
    }
}

/// An execution id of the rig's agent.
pub fn id(counter: u32) -> ExecutionId {
    ExecutionId {
        generation: GENERATION,
        counter,
    }
}

/// An exec request.
pub fn exec_request<'a>(
    request_id: u64,
    command: &'a str,
    args: &[&'a str],
    timeout_ms: Option<u32>,
) -> HostToAgent<'a> {
    HostToAgent::Exec(ExecRequest {
        request_id,
        command,
        args: heapless::Vec::from_slice(args).expect("at most MAX_ARGS arguments"),
        timeout_ms,
    })
}

/// What one read of a fake output stream yields.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Step {
    /// These bytes, over as many reads as the agent's buffer needs. Never empty.
    Data(Vec<u8>),
    /// Nothing this time (the next read goes on with the next step).
    WouldBlock,
    /// End of stream, for this read and every later one.
    Closed,
}

/// A scripted output stream: its steps in order, then `WouldBlock` for as long as no step
/// is added.
#[derive(Debug, Default)]
pub struct FakeStream {
    /// What the next reads yield.
    pub steps: VecDeque<Step>,
    /// `read_output` calls so far.
    pub reads: usize,
}

impl FakeStream {
    /// Queues some bytes.
    pub fn write(&mut self, data: &[u8]) {
        assert!(!data.is_empty(), "a data step is never empty");
        self.steps.push_back(Step::Data(data.to_vec()));
    }

    /// Queues the end of the stream.
    pub fn close(&mut self) {
        self.steps.push_back(Step::Closed);
    }

    /// Bytes queued and not read yet.
    pub fn pending(&self) -> usize {
        self.steps
            .iter()
            .map(|s| match s {
                Step::Data(d) => d.len(),
                _ => 0,
            })
            .sum()
    }

    fn read(&mut self, buf: &mut [u8]) -> ReadOutcome {
        self.reads += 1;
        match self.steps.front_mut() {
            None => ReadOutcome::WouldBlock,
            Some(Step::Closed) => ReadOutcome::Closed,
            Some(Step::WouldBlock) => {
                self.steps.pop_front();
                ReadOutcome::WouldBlock
            }
            Some(Step::Data(data)) => {
                let n = data.len().min(buf.len());
                buf[..n].copy_from_slice(&data[..n]);
                data.drain(..n);
                if data.is_empty() {
                    self.steps.pop_front();
                }
                ReadOutcome::Data(n)
            }
        }
    }
}

/// A user or group as the platform was asked for it, owned.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Who {
    /// By name.
    Name(String),
    /// By id.
    Id(u32),
}

impl From<Identity<'_>> for Who {
    fn from(identity: Identity<'_>) -> Self {
        match identity {
            Identity::Name(name) => Self::Name(name.to_string()),
            Identity::Id(id) => Self::Id(id),
        }
    }
}

/// A [`SpawnRequest`] as the platform saw it, owned.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Spawned {
    pub program: String,
    pub args: Vec<String>,
    pub env: Vec<String>,
    pub cwd: Option<String>,
    pub user: Option<Who>,
    pub group: Option<Who>,
    pub limits: Limits,
}

impl From<&SpawnRequest<'_>> for Spawned {
    fn from(r: &SpawnRequest<'_>) -> Self {
        Self {
            program: r.program.to_string(),
            args: r.args.iter().map(|a| a.to_string()).collect(),
            env: r.env.iter().map(|e| e.to_string()).collect(),
            cwd: r.cwd.map(str::to_string),
            user: r.user.map(Who::from),
            group: r.group.map(Who::from),
            limits: r.limits,
        }
    }
}

/// A scripted process. Until the test says otherwise it runs, silent, forever; a Terminate
/// ends it (`Signaled(15)`) unless it is `stubborn`, a Kill always does (`Signaled(9)`).
#[derive(Debug, Default)]
pub struct FakeProcess {
    pub stdout: FakeStream,
    pub stderr: FakeStream,
    /// What `try_wait` reports, once set.
    pub exit: Option<ExitStatus>,
    /// Whether `try_wait` has reported the exit.
    pub reaped: bool,
    /// Ignores Terminate.
    pub stubborn: bool,
    /// Signals received, in order.
    pub signals: Vec<Signal>,
    /// Whether the agent has released the handle.
    pub released: bool,
    /// Processes it leaves running behind it.
    pub leftovers: u32,
    /// How many `leftovers_gone` checks after the kill still find them (a slow death).
    pub dying_checks: u32,
    /// `kill_leftovers` calls.
    pub leftover_kills: u32,
}

impl FakeProcess {
    /// The stream `stream`.
    pub fn stream(&mut self, stream: Stream) -> &mut FakeStream {
        match stream {
            Stream::Stdout => &mut self.stdout,
            Stream::Stderr => &mut self.stderr,
        }
    }

    /// Ends the process: both streams close after what they still hold, and `try_wait`
    /// reports `status`.
    pub fn end(&mut self, status: ExitStatus) {
        self.stdout.close();
        self.stderr.close();
        self.exit = Some(status);
    }

    /// `read_output` calls so far, both streams.
    pub fn reads(&self) -> usize {
        self.stdout.reads + self.stderr.reads
    }
}

/// The fake's handle: an index into [`FakePlatform::processes`].
#[derive(Debug)]
pub struct Handle(usize);

/// A push file operation, as recorded.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum PushOp {
    Create { dir: String, name: String },
    Write(usize),
    Finish { keep: bool },
}

/// A log event, owned.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Logged {
    Started {
        execution: ExecutionId,
        command: String,
    },
    Finished {
        execution: ExecutionId,
        finished: Finished,
        leftovers: u32,
    },
    Rejected {
        what: String,
        reason: Rejection,
    },
    Pushed {
        name: String,
        size: u64,
    },
    Protocol(String),
}

/// The figures the fake reports.
pub const METRICS: SystemMetrics = SystemMetrics {
    uptime_ms: 123_456_789,
    load_milli: [250, 500, 1_000],
    mem_total_kib: 2_000_000,
    mem_available_kib: 1_500_000,
    processes: 42,
    agent_rss_kib: 900,
};

/// The fake operating system.
#[derive(Debug)]
pub struct FakePlatform {
    /// Every spawn request, failed ones included, in order.
    pub spawns: Vec<Spawned>,
    /// The processes started, in order ([`Handle`] indexes this).
    pub processes: Vec<FakeProcess>,
    /// Scripts for the next processes, in order; a spawn without one gets a default process.
    pub scripts: VecDeque<FakeProcess>,
    /// Every spawn fails with this errno while set.
    pub spawn_error: Option<Errno>,
    /// The staging file of the push in progress: directory, name, bytes.
    pub staging: Option<(String, String, Vec<u8>)>,
    /// Stored programs by path.
    pub files: BTreeMap<String, Vec<u8>>,
    /// Push file operations, in order.
    pub push_ops: Vec<PushOp>,
    /// `push_create` fails with this errno while set.
    pub push_create_error: Option<Errno>,
    /// The log.
    pub log: Vec<Logged>,
}

impl Default for FakePlatform {
    fn default() -> Self {
        Self::new()
    }
}

impl FakePlatform {
    pub fn new() -> Self {
        Self {
            spawns: Vec::new(),
            processes: Vec::new(),
            scripts: VecDeque::new(),
            spawn_error: None,
            staging: None,
            files: BTreeMap::new(),
            push_ops: Vec::new(),
            push_create_error: None,
            log: Vec::new(),
        }
    }

    /// Processes not released yet.
    pub fn live(&self) -> usize {
        self.processes.iter().filter(|p| !p.released).count()
    }
}

impl Platform for FakePlatform {
    type Process = Handle;

    fn spawn(&mut self, request: &SpawnRequest<'_>) -> Result<Handle, Errno> {
        self.spawns.push(Spawned::from(request));
        if let Some(errno) = self.spawn_error {
            return Err(errno);
        }
        self.processes
            .push(self.scripts.pop_front().unwrap_or_default());
        Ok(Handle(self.processes.len() - 1))
    }

    fn read_output(&mut self, process: &mut Handle, stream: Stream, buf: &mut [u8]) -> ReadOutcome {
        let p = &mut self.processes[process.0];
        assert!(!p.released, "read from a released process");
        p.stream(stream).read(buf)
    }

    fn try_wait(&mut self, process: &mut Handle) -> Option<ExitStatus> {
        let p = &mut self.processes[process.0];
        assert!(!p.reaped, "try_wait after the process was reaped");
        if p.exit.is_some() {
            p.reaped = true;
        }
        p.exit
    }

    fn signal(&mut self, process: &mut Handle, signal: Signal) {
        let p = &mut self.processes[process.0];
        p.signals.push(signal);
        if p.exit.is_some() {
            return;
        }
        match signal {
            Signal::Terminate if !p.stubborn => p.end(ExitStatus::Signaled(15)),
            Signal::Terminate => {}
            Signal::Kill => p.end(ExitStatus::Signaled(9)),
        }
    }

    fn kill_leftovers(&mut self, process: &mut Handle) -> u32 {
        let p = &mut self.processes[process.0];
        assert!(p.reaped, "leftovers killed before the leader was reaped");
        p.leftover_kills += 1;
        std::mem::take(&mut p.leftovers)
    }

    fn leftovers_gone(&mut self, process: &mut Handle) -> bool {
        let p = &mut self.processes[process.0];
        if p.dying_checks == 0 {
            return true;
        }
        p.dying_checks -= 1;
        false
    }

    fn release(&mut self, process: Handle) {
        let p = &mut self.processes[process.0];
        assert!(!p.released, "released twice");
        p.released = true;
    }

    fn push_create(&mut self, dir: &str, name: &str) -> Result<(), Errno> {
        self.push_ops.push(PushOp::Create {
            dir: dir.to_string(),
            name: name.to_string(),
        });
        if let Some(errno) = self.push_create_error {
            return Err(errno);
        }
        self.staging = Some((dir.to_string(), name.to_string(), Vec::new()));
        Ok(())
    }

    fn push_write(&mut self, data: &[u8]) -> Result<(), Errno> {
        self.push_ops.push(PushOp::Write(data.len()));
        match self.staging.as_mut() {
            Some((_, _, bytes)) => {
                bytes.extend_from_slice(data);
                Ok(())
            }
            None => Err(9), // EBADF
        }
    }

    fn push_finish(&mut self, keep: bool) -> Result<(), Errno> {
        self.push_ops.push(PushOp::Finish { keep });
        let Some((dir, name, bytes)) = self.staging.take() else {
            return Err(9); // EBADF
        };
        if keep {
            self.files.insert(format!("{dir}/{name}"), bytes);
        }
        Ok(())
    }

    fn metrics(&mut self) -> SystemMetrics {
        METRICS
    }

    fn log(&mut self, event: &LogEvent<'_>) {
        self.log.push(match *event {
            LogEvent::Started { execution, command } => Logged::Started {
                execution,
                command: command.to_string(),
            },
            LogEvent::Finished {
                execution,
                finished,
                leftovers,
            } => Logged::Finished {
                execution,
                finished,
                leftovers,
            },
            LogEvent::Rejected { what, reason } => Logged::Rejected {
                what: what.to_string(),
                reason,
            },
            LogEvent::Pushed { name, size } => Logged::Pushed {
                name: name.to_string(),
                size,
            },
            LogEvent::Protocol(detail) => Logged::Protocol(detail.to_string()),
        });
    }
}

/// A channel in ordinary memory with the agent attached to the guest's end, the test on the
/// host's, a fake platform and a fake clock.
pub struct Rig {
    pub region: HeapRegion,
    pub host: HostEndpoint,
    pub guest: GuestEndpoint,
    pub agent: Agent<FakePlatform>,
    pub fake: FakePlatform,
    /// The fake clock, in ms.
    pub now: u64,
    buf: Box<FrameBuf>,
    /// A request buffer kept across polls (`Agent::poll_with_buffer`), if set; else `poll`.
    pub kept: Option<Box<FrameBuf>>,
}

impl Rig {
    /// A rig whose agent has `config` and has greeted the host (the greeting is waiting in
    /// the ring).
    pub fn with_greeting(config_text: &str) -> Self {
        let region = HeapRegion::new(REGION_LEN);
        let host = HostEndpoint::create(&region, 1).expect("region layout");
        let mut guest = GuestEndpoint::attach(&region, GENERATION, Start::SkipPending, None)
            .expect("guest attaches");
        let mut agent = Agent::new(config(config_text), GENERATION);
        agent.on_attach(&mut guest, &region).expect("greeting sent");
        Self {
            region,
            host,
            guest,
            agent,
            fake: FakePlatform::new(),
            now: T0,
            buf: Box::new(frame_buf()),
            kept: None,
        }
    }

    /// A rig whose agent has `config`, its greeting already received.
    pub fn new(config_text: &str) -> Self {
        let mut rig = Self::with_greeting(config_text);
        match rig.recv() {
            Some(AgentToHost::Hello(h)) if !h.reply => {}
            other => panic!("expected the agent's greeting, got {other:?}"),
        }
        rig
    }

    /// A rig with [`CONFIG`].
    pub fn standard() -> Self {
        Self::new(CONFIG)
    }

    /// Sends a request to the agent (without polling it).
    pub fn send(&mut self, msg: &HostToAgent<'_>) {
        self.host
            .send(&self.region, msg)
            .expect("host ring has room");
    }

    /// Sends raw bytes as one frame.
    pub fn send_frame(&mut self, payload: &[u8]) {
        self.host
            .send_frame(&self.region, payload)
            .expect("host ring has room");
    }

    /// Polls the agent once at the current time.
    pub fn poll(&mut self) -> Activity {
        match &mut self.kept {
            Some(buf) => self.agent.poll_with_buffer(
                self.now,
                &mut self.guest,
                &self.region,
                &mut self.fake,
                buf,
            ),
            None => self
                .agent
                .poll(self.now, &mut self.guest, &self.region, &mut self.fake),
        }
        .expect("channel is fine")
    }

    /// Polls until a poll does nothing; returns that poll's activity (what the agent then
    /// waits for).
    pub fn pump(&mut self) -> Activity {
        for _ in 0..10_000 {
            let act = self.poll();
            if !act.worked {
                return act;
            }
        }
        panic!("the agent keeps working without settling");
    }

    /// Advances the clock by `ms` and pumps.
    pub fn advance(&mut self, ms: u64) -> Activity {
        self.now += ms;
        self.pump()
    }

    /// Sends a request and pumps.
    pub fn request(&mut self, msg: &HostToAgent<'_>) -> Activity {
        self.send(msg);
        self.pump()
    }

    /// Receives the next message from the agent, if any. Its payload is leaked so that the
    /// message can be kept and compared as a value (tests are short-lived).
    pub fn recv(&mut self) -> Option<AgentToHost<'static>> {
        let payload = self
            .host
            .recv_frame(&self.region, &mut self.buf)
            .expect("channel is fine")?;
        let owned: &'static [u8] = Box::leak(payload.to_vec().into_boxed_slice());
        match ring_protocol::message::decode(owned) {
            Ok(msg) => Some(msg),
            Err(e) => panic!("the agent sent an undecodable frame: {e}"),
        }
    }

    /// Receives everything the agent has sent.
    pub fn recv_all(&mut self) -> Vec<AgentToHost<'static>> {
        std::iter::from_fn(|| self.recv()).collect()
    }

    /// Asserts that the agent has sent exactly `want` since the last receive.
    #[track_caller]
    pub fn expect(&mut self, want: &[AgentToHost<'_>]) {
        let got = self.recv_all();
        assert_eq!(got.as_slice(), want);
    }

    /// Asserts that the agent has sent nothing.
    #[track_caller]
    pub fn expect_nothing(&mut self) {
        self.expect(&[]);
    }

    /// Runs `command` and expects it to be accepted and nothing else sent; returns the new
    /// execution's id.
    #[track_caller]
    pub fn exec(&mut self, request_id: u64, command: &str, args: &[&str]) -> ExecutionId {
        self.request(&exec_request(request_id, command, args, None));
        match self.recv_all().as_slice() {
            [
                AgentToHost::Accepted {
                    request_id: r,
                    execution,
                },
            ] if *r == request_id && execution.generation == GENERATION => *execution,
            other => panic!("expected Accepted for request {request_id}, got {other:?}"),
        }
    }

    /// The process of the `n`-th successful spawn (from 0).
    pub fn process(&mut self, n: usize) -> &mut FakeProcess {
        &mut self.fake.processes[n]
    }

    /// Bytes free in the agent-to-host ring.
    pub fn tx_free(&self) -> u32 {
        self.guest.tx_free(&self.region).expect("ring is fine")
    }
}
