//! `portless serve` as a process of its own (so that its memory can be read from `/proc` and
//! it can be killed), with plain VMs whose guests are real `portless-agent`s or hostile fake
//! guests, driven through the API on the unix socket.
#![allow(dead_code, unreachable_pub)]

use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use serde_json::{Value, json};

/// The allow-list of the real agents.
pub const AGENT_CONFIG: &str = r#"
[agent]
max_running = 16
kill_grace_ms = 300

[[command]]
name = "echo"
program = "/bin/echo"
args = ["{word}"]

[[command.param]]
name = "word"
kind = "string"
charset = "a-z0-9"
max_len = 20

[[command]]
name = "bytes"
description = "n bytes of a pattern on stdout, then exit with code n % 7"
program = "/bin/sh"
args = ["-c", 'head -c "$1" /dev/zero | tr "\000" "p"; exit $(($1 % 7))', "bytes", "{n}"]
max_output = 16777216

[[command.param]]
name = "n"
kind = "integer"
min = 0
max = 16777216

[[command]]
name = "sleep"
program = "/bin/sleep"
args = ["{seconds}"]

[[command.param]]
name = "seconds"
kind = "integer"
min = 1
max = 600
"#;

/// The `portless` binary: `PORTLESS_BIN` if set (to measure another build), else the one
/// cargo built for these tests.
pub fn portless_binary() -> PathBuf {
    std::env::var_os("PORTLESS_BIN").map_or_else(
        || PathBuf::from(env!("CARGO_BIN_EXE_portless")),
        PathBuf::from,
    )
}

/// A daemon process and its VMs' guests.
pub struct Stack {
    /// The test's directory (config, regions, state, logs).
    pub dir: PathBuf,
    /// The API socket.
    pub socket: PathBuf,
    daemon: Option<Child>,
    agents: Vec<(String, Child)>,
    extra: String,
    vms: Vec<String>,
    /// More keys of each VM's table.
    vm_keys: std::collections::BTreeMap<String, String>,
}

impl Stack {
    /// A stack in a fresh directory named `name` with plain VMs `vms`, `extra` appended to
    /// `host.toml`'s `[daemon]` table (and after it: more tables). No guest runs yet.
    pub fn new(name: &str, vms: &[&str], extra: &str) -> Self {
        let dir = PathBuf::from(env!("CARGO_TARGET_TMPDIR"))
            .join(format!("{name}-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        std::fs::create_dir_all(&dir).expect("dir");
        std::fs::write(dir.join("agent.toml"), AGENT_CONFIG).expect("agent.toml");
        let mut s = Self {
            socket: dir.join("portless.sock"),
            dir,
            daemon: None,
            agents: Vec::new(),
            extra: extra.to_owned(),
            vms: vms.iter().map(|v| (*v).to_owned()).collect(),
            vm_keys: std::collections::BTreeMap::new(),
        };
        s.write_config();
        s
    }

    fn write_config(&mut self) {
        // SAFETY: `getuid` has no preconditions.
        let uid = unsafe { libc::getuid() };
        let mut vm_tables = String::new();
        for vm in &self.vms {
            vm_tables.push_str(&format!(
                "\n[[vm]]\nname = \"{vm}\"\nchannel = \"plain\"\npath = \"{}\"\n{}\n",
                self.region(vm).display(),
                self.vm_keys.get(vm).map_or("", String::as_str)
            ));
        }
        let config = format!(
            "[daemon]\nsocket = \"{dir}/portless.sock\"\nstate_dir = \"{dir}/state\"\n\
             delivery_timeout_ms = 3000\nheartbeat_timeout_ms = 1000\n{extra}\n{vm_tables}\n\
             [[principal]]\nname = \"ops\"\nuids = [{uid}]\nvms = [\"*\"]\ncommands = [\"*\"]\n\
             push = true\naudit = true\n",
            dir = self.dir.display(),
            extra = self.extra,
        );
        std::fs::write(self.dir.join("host.toml"), config).expect("host.toml");
    }

    /// Adds TOML `keys` to `vm`'s table of `host.toml` (`labels = { role = "web" }`), for the
    /// next start.
    pub fn vm_keys(&mut self, vm: &str, keys: &str) {
        self.vm_keys.insert(vm.to_owned(), keys.to_owned());
        self.write_config();
    }

    /// Replaces what `host.toml` has after its `[daemon]` keys (for the next start).
    pub fn set_extra(&mut self, extra: &str) {
        extra.clone_into(&mut self.extra);
        self.write_config();
    }

    /// The region file of `vm`.
    pub fn region(&self, vm: &str) -> PathBuf {
        self.dir.join(format!("{vm}.region"))
    }

    /// The state directory.
    pub fn state_dir(&self) -> PathBuf {
        self.dir.join("state")
    }

    /// Starts the daemon process and waits for its socket.
    pub fn start_daemon(&mut self) {
        let log = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(self.dir.join("daemon.log"))
            .expect("log");
        let _ = std::fs::remove_file(&self.socket);
        let child = Command::new(portless_binary())
            .arg("serve")
            .arg("--config")
            .arg(self.dir.join("host.toml"))
            .stdout(Stdio::null())
            .stderr(log)
            .spawn()
            .expect("start portless serve");
        self.daemon = Some(child);
        let deadline = Instant::now() + Duration::from_secs(20);
        while std::os::unix::net::UnixStream::connect(&self.socket).is_err() {
            assert!(Instant::now() < deadline, "daemon never listened");
            if let Some(Ok(Some(st))) = self.daemon.as_mut().map(Child::try_wait) {
                panic!("daemon exited: {st}: {}", self.log());
            }
            std::thread::sleep(Duration::from_millis(10));
        }
    }

    /// Kills the daemon with SIGKILL and reaps it.
    pub fn kill_daemon(&mut self) {
        if let Some(mut d) = self.daemon.take() {
            let _ = d.kill();
            let _ = d.wait();
        }
    }

    /// Stops the daemon with SIGTERM and waits for it.
    pub fn stop_daemon(&mut self) {
        if let Some(mut d) = self.daemon.take() {
            // SAFETY: `kill` takes plain values; the pid is our child's, not yet reaped.
            unsafe { libc::kill(d.id() as i32, libc::SIGTERM) };
            let _ = d.wait();
        }
    }

    /// The daemon's pid.
    pub fn daemon_pid(&self) -> u32 {
        self.daemon.as_ref().expect("daemon runs").id()
    }

    /// The daemon's log so far.
    pub fn log(&self) -> String {
        std::fs::read_to_string(self.dir.join("daemon.log")).unwrap_or_default()
    }

    /// A one-time login link of the console (`POST /v1/console/codes`, as `portless console`).
    pub fn console_code(&self) -> portless_api::ConsoleCode {
        portless_api::blocking::Client::new(&self.socket)
            .expect("client")
            .console_code()
            .expect("a login code")
    }

    /// Starts a real agent for `vm`.
    pub fn start_agent(&mut self, vm: &str) {
        let log = std::fs::File::create(self.dir.join(format!("{vm}-agent.log"))).expect("log");
        let child = Command::new(super::agent_binary())
            .arg("--cgroup")
            .arg("off")
            .arg("--shm-file")
            .arg(self.region(vm))
            .arg("--config")
            .arg(self.dir.join("agent.toml"))
            .stderr(log)
            .stdout(Stdio::null())
            .spawn()
            .expect("agent");
        self.agents.push((vm.to_owned(), child));
    }

    /// Kills `vm`'s agent (as a crash would).
    pub fn kill_agent(&mut self, vm: &str) {
        for (name, child) in &mut self.agents {
            if name == vm {
                let _ = child.kill();
                let _ = child.wait();
            }
        }
        self.agents.retain(|(name, _)| name != vm);
    }

    /// One API call: status and JSON body.
    pub fn call(&self, method: &str, path: &str, body: Option<Value>) -> (u16, Value) {
        super::call(&self.socket, method, path, body)
    }

    /// One API call: status and raw body.
    pub fn raw(&self, method: &str, path: &str) -> (u16, Vec<u8>) {
        super::http(&self.socket, method, path, None)
    }

    /// The VM's entry in `GET /v1/vms`.
    pub fn vm(&self, vm: &str) -> Value {
        let (status, body) = self.call("GET", "/v1/vms", None);
        assert_eq!(status, 200, "{body}");
        body["vms"]
            .as_array()
            .and_then(|l| l.iter().find(|v| v["name"] == vm).cloned())
            .unwrap_or(Value::Null)
    }

    /// Waits until `vm` is ready.
    pub fn wait_ready(&self, vm: &str, within: Duration) {
        let deadline = Instant::now() + within;
        loop {
            let v = self.vm(vm);
            if v["state"] == "ready" {
                return;
            }
            assert!(Instant::now() < deadline, "{vm} never ready: {v}");
            std::thread::sleep(Duration::from_millis(20));
        }
    }

    /// Starts `command` on `vm`; the dispatch answer (`executions[0]`).
    pub fn exec(&self, vm: &str, command: &str, args: &[&str]) -> (u16, Value) {
        let (status, body) = self.call(
            "POST",
            "/v1/exec",
            Some(json!({"target": vm, "command": command, "args": args})),
        );
        (status, body)
    }

    /// Waits for execution `id` to end (up to `timeout_ms`); its record.
    pub fn wait(&self, id: u64, timeout_ms: u64) -> Value {
        let (status, body) = self.call(
            "GET",
            &format!("/v1/executions/{id}/wait?timeout_ms={timeout_ms}"),
            None,
        );
        assert_eq!(status, 200, "{body}");
        body
    }

    /// The time of one ping of `vm` through the API, and whether it succeeded.
    pub fn ping(&self, vm: &str) -> (Duration, bool) {
        let t = Instant::now();
        let (status, _) = self.call("POST", &format!("/v1/vms/{vm}/ping"), None);
        (t.elapsed(), status == 200)
    }

    /// The time of `portless exec VM echo x --wait` through the API, and whether it
    /// succeeded.
    pub fn exec_wait(&self, vm: &str) -> (Duration, bool) {
        let t = Instant::now();
        let (status, body) = self.exec(vm, "echo", &["x"]);
        if status != 200 {
            return (t.elapsed(), false);
        }
        let Some(id) = body["executions"][0]["id"].as_u64() else {
            return (t.elapsed(), false);
        };
        let rec = self.wait(id, 30_000);
        (t.elapsed(), rec["state"] == "succeeded")
    }

    /// Bytes of the records database (with its WAL).
    pub fn db_bytes(&self) -> u64 {
        ["portless.db", "portless.db-wal"]
            .iter()
            .filter_map(|f| std::fs::metadata(self.state_dir().join(f)).ok())
            .map(|m| m.len())
            .sum()
    }

    /// The daemon's resident memory now and at its peak, in KiB.
    pub fn daemon_rss_kib(&self) -> (u64, u64) {
        rss_kib(self.daemon_pid())
    }
}

impl Drop for Stack {
    fn drop(&mut self) {
        for (_, a) in &mut self.agents {
            let _ = a.kill();
            let _ = a.wait();
        }
        self.kill_daemon();
    }
}

/// Resident memory (`VmRSS`) and its peak (`VmHWM`) of process `pid`, in KiB.
pub fn rss_kib(pid: u32) -> (u64, u64) {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).unwrap_or_default();
    let field = |name: &str| {
        status
            .lines()
            .find_map(|l| l.strip_prefix(name))
            .and_then(|r| r.split_whitespace().next())
            .and_then(|n| n.parse().ok())
            .unwrap_or(0)
    };
    (field("VmRSS:"), field("VmHWM:"))
}

/// The median of `samples`.
pub fn median(samples: &mut [Duration]) -> Duration {
    samples.sort();
    samples.get(samples.len() / 2).copied().unwrap_or_default()
}

/// Median latencies of `n` pings and `n` `exec --wait`s of `vm`, alternating, and how many
/// of them failed.
pub fn latencies(stack: &Stack, vm: &str, n: usize) -> (Duration, Duration, usize) {
    let mut pings = Vec::new();
    let mut execs = Vec::new();
    let mut failed = 0;
    for _ in 0..n {
        let (p, ok) = stack.ping(vm);
        failed += usize::from(!ok);
        pings.push(p);
        let (e, ok) = stack.exec_wait(vm);
        failed += usize::from(!ok);
        execs.push(e);
    }
    (median(&mut pings), median(&mut execs), failed)
}

/// Whether `dir` exists (for `Path` arguments in asserts).
pub fn exists(dir: &Path) -> bool {
    dir.exists()
}
