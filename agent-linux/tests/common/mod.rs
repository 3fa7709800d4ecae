//! A test host for `portless-agent --shm-file`: maps the shared file, plays the host's end of
//! the channel, and starts and stops the real agent binary.

#![allow(dead_code, unreachable_pub)]

use std::fs::{self, File};
use std::io::Read;
use std::os::fd::AsRawFd;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::ptr::NonNull;
use std::time::{Duration, Instant};

use ring_protocol::message::{
    AgentToHost, ExecRequest, ExecutionId, Finished, HostToAgent, Outcome, PushOutcome, Rejection,
    Stream,
};
use ring_protocol::{HostEndpoint, MappedRegion, frame_buf};
use vm_harness::{Guest, Ivshmem};

/// Region size used by the tests.
pub const REGION: usize = 1 << 20;

/// A shared-memory file mapped into the test.
pub struct SharedFile {
    region: MappedRegion,
    len: usize,
}

impl SharedFile {
    pub fn create(path: &Path, len: usize) -> Self {
        let file = File::options()
            .read(true)
            .write(true)
            .create(true)
            .truncate(true)
            .open(path)
            .expect("create shm file");
        file.set_len(len as u64).expect("size shm file");
        Self::map(&file, len)
    }

    /// Maps an existing file (one an agent may already have mapped).
    pub fn create_existing(path: &Path, len: usize) -> Self {
        let file = File::options()
            .read(true)
            .write(true)
            .open(path)
            .expect("open shm file");
        Self::map(&file, len)
    }

    fn map(file: &File, len: usize) -> Self {
        // SAFETY: a fresh shared mapping of a file we just sized; nothing else in this process
        // refers to the memory, which stays mapped until `drop`.
        let ptr = unsafe {
            libc::mmap(
                std::ptr::null_mut(),
                len,
                libc::PROT_READ | libc::PROT_WRITE,
                libc::MAP_SHARED,
                file.as_raw_fd(),
                0,
            )
        };
        assert_ne!(ptr, libc::MAP_FAILED, "mmap failed");
        let base = NonNull::new(ptr.cast::<u8>()).expect("non-null mapping");
        // SAFETY: the mapping lives until `drop`, and is only used through the region.
        let region = unsafe { MappedRegion::new(base, len) }.expect("aligned mapping");
        Self { region, len }
    }
}

impl std::ops::Deref for SharedFile {
    type Target = MappedRegion;
    fn deref(&self) -> &MappedRegion {
        &self.region
    }
}

impl Drop for SharedFile {
    fn drop(&mut self) {
        // SAFETY: unmaps what `create` mapped; the region is not used after this.
        unsafe { libc::munmap(self.region.as_ptr().cast(), self.len) };
    }
}

/// A message from the agent, owned.
#[derive(Debug, Clone, PartialEq)]
pub enum Event {
    Hello {
        generation: u32,
        reply: bool,
        config_revision: u32,
    },
    Pong(u64),
    Command {
        index: u16,
        name: String,
    },
    CommandsEnd {
        total: u16,
        next: Option<u16>,
    },
    Accepted {
        request_id: u64,
        execution: ExecutionId,
    },
    Rejected {
        request_id: u64,
        reason: Rejection,
    },
    Output {
        execution: ExecutionId,
        stream: Stream,
        offset: u64,
        data: Vec<u8>,
    },
    /// `Exit`, or `Ended` with its leftovers.
    Exit {
        execution: ExecutionId,
        finished: Finished,
        leftovers: Option<u32>,
    },
    Status,
    PushResult {
        push_id: u64,
        outcome: PushOutcome,
    },
    Metrics {
        rss_kib: u64,
        processes: u32,
    },
    CommandsChanged(u32),
    Error(String),
}

impl Event {
    fn from(msg: &AgentToHost<'_>) -> Self {
        match msg {
            AgentToHost::Hello(h) => Self::Hello {
                generation: h.generation,
                reply: h.reply,
                config_revision: h.config_revision,
            },
            AgentToHost::Pong { nonce } => Self::Pong(*nonce),
            AgentToHost::Command { index, info, .. } => Self::Command {
                index: *index,
                name: info.name.to_owned(),
            },
            AgentToHost::CommandsEnd { total, next, .. } => Self::CommandsEnd {
                total: *total,
                next: *next,
            },
            AgentToHost::Accepted {
                request_id,
                execution,
            } => Self::Accepted {
                request_id: *request_id,
                execution: *execution,
            },
            AgentToHost::Rejected { request_id, reason } => Self::Rejected {
                request_id: *request_id,
                reason: *reason,
            },
            AgentToHost::Output {
                execution,
                stream,
                offset,
                data,
            } => Self::Output {
                execution: *execution,
                stream: *stream,
                offset: *offset,
                data: data.to_vec(),
            },
            AgentToHost::Exit {
                execution,
                finished,
            } => Self::Exit {
                execution: *execution,
                finished: *finished,
                leftovers: None,
            },
            AgentToHost::Ended {
                execution,
                finished,
                leftovers,
            } => Self::Exit {
                execution: *execution,
                finished: *finished,
                leftovers: Some(*leftovers),
            },
            AgentToHost::Status { .. } => Self::Status,
            AgentToHost::PushResult { push_id, outcome } => Self::PushResult {
                push_id: *push_id,
                outcome: *outcome,
            },
            AgentToHost::Metrics { metrics, .. } => Self::Metrics {
                rss_kib: metrics.agent_rss_kib,
                processes: metrics.processes,
            },
            AgentToHost::CommandsChanged { config_revision } => {
                Self::CommandsChanged(*config_revision)
            }
            AgentToHost::Error(e) => Self::Error(e.detail.to_owned()),
        }
    }
}

/// Everything an execution produced.
#[derive(Debug, Default)]
pub struct Run {
    pub stdout: Vec<u8>,
    pub stderr: Vec<u8>,
    pub finished: Option<Finished>,
    /// What `Ended` said the execution left running (`None`: it came as `Exit`).
    pub leftovers: Option<u32>,
}

impl Run {
    pub fn outcome(&self) -> Outcome {
        self.finished.expect("finished").outcome
    }
}

/// The host's side of the region: a shared file (the agent polls, or QEMU's
/// `ivshmem-plain`), or an ivshmem server (QEMU's `ivshmem-doorbell`, with interrupts).
pub enum Memory {
    File(SharedFile),
    Server(host_shim::vm::ivshmem::Server, u16),
}

impl std::ops::Deref for Memory {
    type Target = dyn ring_protocol::SharedMemory;
    fn deref(&self) -> &Self::Target {
        match self {
            Self::File(f) => &**f,
            Self::Server(s, _) => s.region(),
        }
    }
}

/// The test's host: a scratch directory, the shared memory, the agent process.
pub struct Harness {
    pub dir: PathBuf,
    pub shm: Memory,
    pub host: HostEndpoint,
    pub agent: Option<Child>,
    pub config: PathBuf,
    next_request: u64,
    /// Events received but not yet asked for.
    pub backlog: Vec<Event>,
    /// A command line the agent is started through (it must `exec "$@"` in the end).
    pub wrapper: Vec<String>,
    /// The agent's `--cgroup` (`off` unless a test gives it a cgroup of its own: tests run
    /// side by side, and the host's own cgroups are not theirs to use).
    pub cgroup: String,
}

/// The agent binary under test: `PORTLESS_AGENT_BIN` if set (the shipped static build, for
/// the footprint test), else the one cargo built for these tests.
pub fn agent_binary() -> PathBuf {
    std::env::var_os("PORTLESS_AGENT_BIN").map_or_else(
        || PathBuf::from(env!("CARGO_BIN_EXE_portless-agent")),
        PathBuf::from,
    )
}

/// The resident memory of a process, in KiB.
pub fn rss_kib(pid: u32) -> u64 {
    let status = fs::read_to_string(format!("/proc/{pid}/status")).unwrap_or_default();
    status
        .lines()
        .find_map(|l| l.strip_prefix("VmRSS:"))
        .and_then(|v| v.split_whitespace().next())
        .and_then(|v| v.parse().ok())
        .unwrap_or(0)
}

/// A fresh scratch directory under the target directory.
pub fn scratch_dir(name: &str) -> PathBuf {
    let base = PathBuf::from(env!("CARGO_TARGET_TMPDIR"));
    let dir = base.join(format!("{name}-{}", std::process::id()));
    let _ = fs::remove_dir_all(&dir);
    fs::create_dir_all(&dir).expect("scratch dir");
    dir
}

impl Harness {
    /// Sets up the region and starts the agent with `config` as its allow-list.
    pub fn start(name: &str, config: &str) -> Self {
        Self::start_through(scratch_dir(name), config, Vec::new(), "off")
    }

    fn start_through(dir: PathBuf, config: &str, wrapper: Vec<String>, cgroup: &str) -> Self {
        let shm_path = dir.join("region");
        let shm = SharedFile::create(&shm_path, REGION);
        let host = HostEndpoint::create(&*shm, 1).expect("valid region");
        let config_path = dir.join("allow-list.toml");
        fs::write(&config_path, config).expect("write config");
        let mut h = Self {
            dir,
            shm: Memory::File(shm),
            host,
            agent: None,
            config: config_path,
            next_request: 1,
            backlog: Vec::new(),
            wrapper,
            cgroup: cgroup.to_owned(),
        };
        h.spawn_agent();
        h
    }

    /// Like [`Harness::start`], with the agent started inside the cgroup v2 directory
    /// `cgroup` (as a service manager starts it in its own) and `--cgroup auto`.
    pub fn start_as_service_in(name: &str, config: &str, cgroup: &Path) -> Self {
        let script = format!("echo $$ > {}/cgroup.procs && exec \"$@\"", cgroup.display());
        let wrapper = ["sh", "-c", &script, "sh"].map(String::from).to_vec();
        Self::start_through(scratch_dir(name), config, wrapper, "auto")
    }

    /// Like [`Harness::start`], with the agent's executions in cgroups below `cgroup`.
    pub fn start_in_cgroup(name: &str, config: &str, cgroup: &Path) -> Self {
        Self::start_through(
            scratch_dir(name),
            config,
            Vec::new(),
            &cgroup.display().to_string(),
        )
    }

    /// Like [`Harness::start`], with the agent in a private mount namespace where
    /// `/etc/passwd` and `/etc/group` are the files given (needs root and `unshare`).
    pub fn start_with_users(name: &str, config: &str, passwd: &str, group: &str) -> Self {
        let dir = scratch_dir(name);
        fs::write(dir.join("passwd"), passwd).expect("write passwd");
        fs::write(dir.join("group"), group).expect("write group");
        let script = format!(
            "mount --bind {d}/passwd /etc/passwd && mount --bind {d}/group /etc/group && exec \"$@\"",
            d = dir.display()
        );
        let wrapper = [
            "unshare",
            "--mount",
            "--propagation",
            "private",
            "sh",
            "-c",
            &script,
            "sh",
        ]
        .map(String::from)
        .to_vec();
        Self::start_through(dir, config, wrapper, "off")
    }

    /// Boots a VM (kernel and initramfs in `PORTLESS_VM_DIR`) whose agent polls an
    /// `ivshmem-plain` device backed by a region file.
    pub fn start_vm_plain(name: &str) -> Self {
        let dir = scratch_dir(name);
        let shm_path = dir.join("region");
        let shm = SharedFile::create(&shm_path, REGION);
        let host = HostEndpoint::create(&*shm, 1).expect("valid region");
        let agent = Self::boot(
            &dir,
            Ivshmem::Plain {
                file: shm_path,
                size: REGION,
            },
        );
        Self::with(dir, Memory::File(shm), host, agent)
    }

    /// Boots a VM on a q35 machine with a virtual IOMMU whose agent is woken by VFIO MSI-X
    /// interrupts from an `ivshmem-doorbell` device served by this host.
    pub fn start_vm_doorbell(name: &str) -> Self {
        let dir = scratch_dir(name);
        let socket = dir.join("ivshmem.sock");
        let mut server =
            host_shim::vm::ivshmem::Server::new(&socket, REGION, 1).expect("ivshmem server");
        let host = HostEndpoint::create(server.region(), 1).expect("valid region");
        let agent = Self::boot(&dir, Ivshmem::Doorbell { socket });
        let peer = server.accept().expect("QEMU connects");
        Self::with(dir, Memory::Server(server, peer), host, agent)
    }

    fn with(dir: PathBuf, shm: Memory, host: HostEndpoint, agent: Child) -> Self {
        Self {
            config: dir.join("unused"),
            dir,
            shm,
            host,
            agent: Some(agent),
            next_request: 1,
            backlog: Vec::new(),
            wrapper: Vec::new(),
            cgroup: "auto".to_owned(),
        }
    }

    /// Boots the image in `PORTLESS_VM_DIR`; the console (where the agent logs) goes to
    /// `agent.log`.
    fn boot(dir: &Path, ivshmem: Ivshmem) -> Child {
        let image = PathBuf::from(std::env::var("PORTLESS_VM_DIR").expect("PORTLESS_VM_DIR"));
        Guest::new(&image, ivshmem)
            .spawn(&dir.join("agent.log"), None)
            .expect("start qemu")
    }

    /// Rings the guest if the last sends call for it and the guest can be rung.
    pub fn kick(&mut self) {
        if self.host.take_kick(&*self.shm)
            && let Memory::Server(server, peer) = &self.shm
        {
            server.ring(*peer, 0).expect("ring guest");
        }
    }

    /// Arms the host's doorbell and sleeps on it (no polling) until the guest rings or
    /// `timeout` passes; returns whether it rang (or data was already there).
    pub fn wait_rung(&mut self, timeout: Duration) -> bool {
        let Memory::Server(server, _) = &self.shm else {
            return false;
        };
        let fd = server.host_event(0).expect("vector 0");
        let may_sleep = self
            .host
            .prepare_wait(&*self.shm, None)
            .expect("valid ring");
        let rung = !may_sleep || {
            let mut pfd = libc::pollfd {
                fd,
                events: libc::POLLIN,
                revents: 0,
            };
            let ms = i32::try_from(timeout.as_millis()).unwrap_or(i32::MAX);
            // SAFETY: one valid pollfd.
            unsafe { libc::poll(&mut pfd, 1, ms) == 1 }
        };
        host_shim::vm::ivshmem::take_eventfd(fd);
        self.host.end_wait(&*self.shm);
        rung
    }

    /// Doorbells the guest rang since the last call (interrupt mode only).
    pub fn rings_from_guest(&self) -> u64 {
        match &self.shm {
            Memory::Server(server, _) => server
                .host_event(0)
                .map_or(0, host_shim::vm::ivshmem::take_eventfd),
            Memory::File(_) => 0,
        }
    }

    /// Starts (or restarts) the agent process.
    pub fn spawn_agent(&mut self) {
        let log = File::create(self.dir.join("agent.log")).expect("log file");
        let mut cmd = match self.wrapper.split_first() {
            Some((program, args)) => {
                let mut c = Command::new(program);
                c.args(args).arg(agent_binary());
                c
            }
            None => Command::new(agent_binary()),
        };
        let child = cmd
            .arg("--shm-file")
            .arg(self.dir.join("region"))
            .arg("--config")
            .arg(&self.config)
            .arg("--cgroup")
            .arg(&self.cgroup)
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(log)
            .spawn()
            .expect("start portless-agent");
        self.agent = Some(child);
    }

    /// The agent's log so far.
    pub fn log(&self) -> String {
        let mut s = String::new();
        if let Ok(mut f) = File::open(self.dir.join("agent.log")) {
            let _ = f.read_to_string(&mut s);
        }
        s
    }

    /// Sends a signal to the agent.
    pub fn signal(&self, sig: i32) {
        let pid = self.agent.as_ref().expect("agent running").id();
        // SAFETY: `kill` takes plain values.
        unsafe { libc::kill(pid as libc::pid_t, sig) };
    }

    pub fn request_id(&mut self) -> u64 {
        self.next_request += 1;
        self.next_request
    }

    /// Sends a message, waiting for room.
    pub fn send(&mut self, msg: &HostToAgent<'_>) {
        let deadline = Instant::now() + Duration::from_secs(10);
        loop {
            match self.host.send(&*self.shm, msg) {
                Ok(()) => {
                    self.kick();
                    return;
                }
                Err(ring_protocol::SendError::Full { .. }) => {
                    self.pump();
                    assert!(Instant::now() < deadline, "ring stayed full");
                    std::thread::sleep(Duration::from_micros(200));
                }
                Err(e) => panic!("send: {e}"),
            }
        }
    }

    /// Moves whatever the agent sent into the backlog.
    pub fn pump(&mut self) -> bool {
        let mut buf = frame_buf();
        let mut any = false;
        loop {
            match self.host.recv(&*self.shm, &mut buf) {
                Ok(Some(msg)) => {
                    self.backlog.push(Event::from(&msg));
                    any = true;
                }
                Ok(None) => {
                    // Consuming may free space a waiting agent needs.
                    self.kick();
                    return any;
                }
                Err(e) => panic!("recv: {e}"),
            }
        }
    }

    /// Waits up to `timeout` for the first event matching `want`, removing it (and keeping
    /// the others).
    pub fn wait_for(&mut self, timeout: Duration, mut want: impl FnMut(&Event) -> bool) -> Event {
        let deadline = Instant::now() + timeout;
        loop {
            if let Some(i) = self.backlog.iter().position(&mut want) {
                return self.backlog.remove(i);
            }
            if !self.pump() {
                assert!(
                    Instant::now() < deadline,
                    "timed out; backlog: {:?}\nagent log:\n{}",
                    self.backlog.iter().take(5).collect::<Vec<_>>(),
                    self.log()
                );
                std::thread::sleep(Duration::from_micros(200));
            }
        }
    }

    /// Greets the agent as a host that reads `Ended` (as `portless` does).
    pub fn greet_reading_ended(&mut self) {
        use ring_protocol::message::{Capabilities, Hello};
        self.send(&HostToAgent::Hello(Hello {
            min_version: 1,
            max_version: 1,
            capabilities: Capabilities::ENDED,
            generation: 1,
            config_revision: 0,
            software: "test-host",
            reply: false,
        }));
        self.wait_for(Duration::from_secs(10), |e| {
            matches!(e, Event::Hello { reply: true, .. })
        });
    }

    /// Waits for the agent's hello.
    pub fn hello(&mut self) -> u32 {
        self.hello_within(Duration::from_secs(10))
    }

    /// Waits up to `timeout` for the agent's hello.
    pub fn hello_within(&mut self, timeout: Duration) -> u32 {
        match self.wait_for(timeout, |e| matches!(e, Event::Hello { reply: false, .. })) {
            Event::Hello { generation, .. } => generation,
            _ => unreachable!(),
        }
    }

    /// Runs `command` with `args`; returns the request's answer.
    pub fn exec(
        &mut self,
        command: &str,
        args: &[&str],
        timeout_ms: Option<u32>,
    ) -> Result<ExecutionId, Rejection> {
        let request_id = self.request_id();
        let args = args.iter().copied().collect();
        self.send(&HostToAgent::Exec(ExecRequest {
            request_id,
            command,
            args,
            timeout_ms,
        }));
        match self.wait_for(Duration::from_secs(10), |e| {
            matches!(e, Event::Accepted { request_id: r, .. } | Event::Rejected { request_id: r, .. } if *r == request_id)
        }) {
            Event::Accepted { execution, .. } => Ok(execution),
            Event::Rejected { reason, .. } => Err(reason),
            _ => unreachable!(),
        }
    }

    /// Collects an execution's output until its exit.
    pub fn collect(&mut self, id: ExecutionId, timeout: Duration) -> Run {
        let mut run = Run::default();
        let deadline = Instant::now() + timeout;
        loop {
            let left = deadline.saturating_duration_since(Instant::now());
            let ev = self.wait_for(left, |e| {
                matches!(e, Event::Output { execution, .. } | Event::Exit { execution, .. } if *execution == id)
            });
            match ev {
                Event::Output {
                    stream,
                    offset,
                    data,
                    ..
                } => {
                    let out = match stream {
                        Stream::Stdout => &mut run.stdout,
                        Stream::Stderr => &mut run.stderr,
                    };
                    assert_eq!(offset, out.len() as u64, "output offsets are contiguous");
                    out.extend_from_slice(&data);
                }
                Event::Exit {
                    finished,
                    leftovers,
                    ..
                } => {
                    run.leftovers = leftovers;
                    if !finished.truncated {
                        assert_eq!(finished.stdout_bytes, run.stdout.len() as u64);
                        assert_eq!(finished.stderr_bytes, run.stderr.len() as u64);
                    }
                    run.finished = Some(finished);
                    return run;
                }
                _ => unreachable!(),
            }
        }
    }

    /// Runs a command to completion.
    pub fn run(&mut self, command: &str, args: &[&str]) -> Run {
        let id = self.exec(command, args, None).expect("accepted");
        self.collect(id, Duration::from_secs(60))
    }

    /// Stops the agent (SIGTERM) and waits for it.
    pub fn stop_agent(&mut self) -> std::process::ExitStatus {
        self.signal(libc::SIGTERM);
        let mut child = self.agent.take().expect("agent running");
        let deadline = Instant::now() + Duration::from_secs(10);
        loop {
            if let Some(status) = child.try_wait().expect("wait") {
                return status;
            }
            assert!(Instant::now() < deadline, "agent did not stop on SIGTERM");
            std::thread::sleep(Duration::from_millis(10));
        }
    }
}

impl Drop for Harness {
    fn drop(&mut self) {
        if let Some(mut child) = self.agent.take() {
            let _ = child.kill();
            let _ = child.wait();
        }
    }
}

/// Writes an allow-list at a path.
pub fn write_config(path: &Path, text: &str) {
    fs::write(path, text).expect("write config");
}

/// An allow-list for the tests.
pub const CONFIG: &str = r#"
[agent]
max_running = 8
kill_grace_ms = 500

[[command]]
name = "true"
program = "/bin/true"

[[command]]
name = "fail"
program = "/bin/sh"
args = ["-c", "echo failing >&2; exit 3"]

[[command]]
name = "killed"
program = "/bin/sh"
args = ["-c", "kill -9 $$"]

[[command]]
name = "seq"
program = "/usr/bin/seq"
args = ["1", "{count}"]
timeout_ms = 60000
max_output = 67108864

[[command.param]]
name = "count"
kind = "integer"
min = 1
max = 10000000

[[command]]
name = "sleep"
program = "/bin/sleep"
args = ["{seconds}"]

[[command.param]]
name = "seconds"
kind = "integer"
min = 1
max = 3600

[[command]]
name = "stubborn"
description = "ignores SIGTERM"
program = "/bin/sh"
args = ["-c", "trap '' TERM; echo ready; exec sleep 30"]
timeout_ms = 300

[[command]]
name = "seq-capped"
program = "/usr/bin/seq"
args = ["1", "100000"]
max_output = 1000

[[command]]
name = "env"
program = "/usr/bin/env"
env = ["ONLY=this"]
cwd = "/"

[[command]]
name = "nothere"
program = "/nonexistent/program"
"#;

/// A cgroup v2 directory of this test's own, below the test process's cgroup; `None` (the
/// test is skipped) where the host has no cgroup v2 this process may write.
pub fn test_cgroup(name: &str) -> Option<PathBuf> {
    let info = std::fs::read_to_string("/proc/self/mountinfo").ok()?;
    let mount = info.lines().find_map(|l| {
        let (left, right) = l.split_once(" - ")?;
        (right.split(' ').next() == Some("cgroup2")).then(|| {
            let mut f = left.split(' ');
            (f.nth(3).map(str::to_owned), f.next().map(str::to_owned))
        })
    })?;
    let (Some(root), Some(point)) = mount else {
        return None;
    };
    if root != "/" {
        return None;
    }
    let cgroups = std::fs::read_to_string("/proc/self/cgroup").ok()?;
    let own = cgroups.lines().find_map(|l| l.strip_prefix("0::"))?;
    let dir = Path::new(&point)
        .join(own.trim_start_matches('/'))
        .join(format!("portless-test-{}-{name}", std::process::id()));
    match std::fs::create_dir(&dir) {
        Ok(()) => Some(dir),
        Err(e) => {
            eprintln!(
                "skipped: no cgroup v2 to write here ({}: {e})",
                dir.display()
            );
            None
        }
    }
}
