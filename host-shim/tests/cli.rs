//! The `portless` CLI as a user runs it: the real binary against a real `portless serve`
//! process and three real `portless-agent --shm-file` processes over shared files (vm1 and
//! vm2 labelled `role=web`, vm3 `role=db`), in a scratch directory under
//! `CARGO_TARGET_TMPDIR`. Every verb is checked on its exit code, stdout and stderr: `vms`,
//! `commands`, `exec` (one VM, lists, labels, `--all`, `--wait`, `--follow`, the fan-out
//! limits, and every exit-code rule of `cli.rs`), `status`, `output`, `cancel`, `push`,
//! `ping`, `metrics` and `audit`; then the errors (no daemon, unknown VM, bad usage) and a
//! principal that policy limits to `uname`.
//!
//! The agent binary is `target/debug/portless-agent` (or `$PORTLESS_AGENT_BIN`), built with
//! the workspace (`cargo build -p agent-linux`) as `tests/daemon.rs` expects too. Nothing of
//! `cargo xtask loopback` is needed: each test writes its own `host.toml` and allow-lists.

mod common;

use std::ffi::OsStr;
use std::fs::File;
use std::os::unix::net::{UnixListener, UnixStream};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::{Duration, Instant};

use serde_json::Value;

/// How long one CLI run may take before the test gives up on it (a noisy 2-core machine).
const CLI_TIMEOUT: Duration = Duration::from_secs(180);
/// How long the daemon may take to listen and the agents to become ready.
const START_TIMEOUT: Duration = Duration::from_secs(90);
/// How long an execution may take to reach an expected state when polled with `status`.
const STATE_TIMEOUT: Duration = Duration::from_secs(60);

/// How every "daemon unreachable" error ends, after the socket's path and the OS error.
const NO_DAEMON_TAIL: &str = "; `portless serve` must be running (or pass --socket PATH, or \
                              set PORTLESS_SOCKET)";

fn portless_binary() -> &'static str {
    env!("CARGO_BIN_EXE_portless")
}

/// The allow-list of every agent; `PUSH_ENABLED` and `PUSH_DIR` are filled in.
const AGENT_CONFIG: &str = r#"
[agent]
max_running = 8
kill_grace_ms = 2000

[push]
enabled = PUSH_ENABLED
dir = "PUSH_DIR"

[[command]]
name = "uname"
description = "Print system information"
program = "/bin/uname"
args = ["-a"]
timeout_ms = 5000

[[command]]
name = "sleep"
description = "Sleep for a number of seconds"
program = "/bin/sleep"
args = ["{seconds}"]
timeout_ms = 0

[[command.param]]
name = "seconds"
kind = "integer"
min = 1
max = 3600

[[command]]
name = "fail"
description = "Write to stderr and exit with status 3"
program = "/bin/sh"
args = ["-c", 'echo failing >&2; exit 3']
timeout_ms = 5000

[[command]]
name = "echo"
description = "Print one word"
program = "/bin/echo"
args = ["{word}"]

[[command.param]]
name = "word"
kind = "string"
charset = "a-z0-9"
min_len = 1
max_len = 32

[[command]]
name = "killed"
description = "Kill itself with SIGKILL"
program = "/bin/sh"
args = ["-c", 'kill -9 $$']

[[command]]
name = "slowtimeout"
description = "Sleep past its own timeout"
program = "/bin/sleep"
args = ["30"]
timeout_ms = 300
"#;

/// Which principal the test's uid is.
#[derive(Clone, Copy, PartialEq, Eq)]
enum Policy {
    /// `ops`: every command on every VM, push, audit.
    Ops,
    /// `limited`: only `uname`, no push; may read the audit log.
    UnameOnly,
}

fn host_config(dir: &Path, policy: Policy) -> String {
    // SAFETY: `getuid` has no preconditions and cannot fail.
    let uid = unsafe { libc::getuid() };
    let mut text = format!(
        "[daemon]\nsocket = \"{0}/portless.sock\"\nstate_dir = \"{0}/state\"\n\
         delivery_timeout_ms = 10000\n",
        dir.display()
    );
    for (n, role) in [(1, "web"), (2, "web"), (3, "db")] {
        text.push_str(&format!(
            "\n[[vm]]\nname = \"vm{n}\"\nlabels = {{ role = \"{role}\" }}\nchannel = \"plain\"\n\
             path = \"{}/vm{n}.region\"\n",
            dir.display()
        ));
    }
    text.push_str(&match policy {
        Policy::Ops => format!(
            "\n[[principal]]\nname = \"ops\"\nuids = [{uid}]\nvms = [\"*\"]\ncommands = [\"*\"]\n\
             push = true\naudit = true\n"
        ),
        Policy::UnameOnly => format!(
            "\n[[principal]]\nname = \"limited\"\nuids = [{uid}]\nvms = [\"*\"]\n\
             commands = [\"uname\"]\npush = false\naudit = true\n"
        ),
    });
    text
}

/// What one run of the CLI did.
#[derive(Debug)]
struct Out {
    code: i32,
    stdout: String,
    stderr: String,
}

impl Out {
    /// Asserts the exit code, with everything printed when it is not the expected one.
    fn code(&self, expected: i32) -> &Self {
        assert_eq!(self.code, expected, "unexpected exit code: {self:#?}");
        self
    }

    fn json(&self) -> Value {
        serde_json::from_str(&self.stdout)
            .unwrap_or_else(|e| panic!("stdout is not JSON ({e}): {self:#?}"))
    }
}

static RUNS: AtomicUsize = AtomicUsize::new(0);

/// A child process killed (and reaped) when dropped.
struct Reaped(Option<Child>);

impl Reaped {
    fn id(&self) -> u32 {
        self.0.as_ref().map_or(0, Child::id)
    }

    fn try_wait(&mut self) -> Option<std::process::ExitStatus> {
        self.0.as_mut().and_then(|c| c.try_wait().ok().flatten())
    }
}

impl Drop for Reaped {
    fn drop(&mut self) {
        if let Some(mut child) = self.0.take() {
            let _ = child.kill();
            let _ = child.wait();
        }
    }
}

/// A run of `portless ARGS` in the background, its output going to files of `dir`.
struct Run {
    child: Reaped,
    stdout: PathBuf,
    stderr: PathBuf,
    args: Vec<String>,
}

impl Run {
    fn start(dir: &Path, args: &[&str], env_socket: Option<&OsStr>) -> Self {
        let n = RUNS.fetch_add(1, Ordering::Relaxed);
        let stdout = dir.join(format!("cli-{n}.out"));
        let stderr = dir.join(format!("cli-{n}.err"));
        let mut command = Command::new(portless_binary());
        command
            .args(args)
            .env_remove("PORTLESS_SOCKET")
            .stdin(Stdio::null())
            .stdout(File::create(&stdout).expect("stdout file"))
            .stderr(File::create(&stderr).expect("stderr file"));
        if let Some(socket) = env_socket {
            command.env("PORTLESS_SOCKET", socket);
        }
        Self {
            child: Reaped(Some(command.spawn().expect("portless runs"))),
            stdout,
            stderr,
            args: args.iter().map(|a| (*a).to_owned()).collect(),
        }
    }

    /// Waits for the end (at most [`CLI_TIMEOUT`]) and collects what it printed.
    fn finish(mut self) -> Out {
        let deadline = Instant::now() + CLI_TIMEOUT;
        let status = loop {
            if let Some(status) = self.child.try_wait() {
                break status;
            }
            assert!(
                Instant::now() < deadline,
                "portless {:?} still running after {CLI_TIMEOUT:?}",
                self.args
            );
            std::thread::sleep(Duration::from_millis(10));
        };
        // Reaped already: nothing left for the guard to do.
        self.child.0 = None;
        let read = |p: &Path| String::from_utf8(std::fs::read(p).expect("output file"));
        Out {
            code: status
                .code()
                .unwrap_or_else(|| panic!("portless {:?} died: {status}", self.args)),
            stdout: read(&self.stdout).expect("stdout is UTF-8"),
            stderr: read(&self.stderr).expect("stderr is UTF-8"),
        }
    }
}

/// Runs `portless ARGS` to its end.
fn run(dir: &Path, args: &[&str], env_socket: Option<&OsStr>) -> Out {
    Run::start(dir, args, env_socket).finish()
}

/// `portless serve` and three agents, stopped (and reaped) on drop.
struct Portless {
    dir: PathBuf,
    socket: PathBuf,
    daemon: Reaped,
    agents: Vec<(String, Reaped)>,
}

impl Portless {
    fn start(name: &str, policy: Policy) -> Self {
        let dir = scratch_dir(name);
        std::fs::write(dir.join("host.toml"), host_config(&dir, policy)).expect("host.toml");
        let push_dir = dir.join("push").display().to_string();
        for (file, enabled) in [("agent.toml", "true"), ("agent-nopush.toml", "false")] {
            let text = AGENT_CONFIG
                .replace("PUSH_ENABLED", enabled)
                .replace("PUSH_DIR", &push_dir);
            std::fs::write(dir.join(file), text).expect("allow-list");
        }
        let socket = dir.join("portless.sock");
        let daemon = Command::new(portless_binary())
            .arg("serve")
            .arg("--config")
            .arg(dir.join("host.toml"))
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(File::create(dir.join("portless.log")).expect("log"))
            .spawn()
            .expect("portless serve");
        let mut p = Self {
            dir,
            socket,
            daemon: Reaped(Some(daemon)),
            agents: Vec::new(),
        };
        p.wait_listening();
        for vm in ["vm1", "vm2", "vm3"] {
            // vm3's guest does not take pushed programs.
            let config = if vm == "vm3" {
                "agent-nopush.toml"
            } else {
                "agent.toml"
            };
            p.start_agent(vm, config);
        }
        p.wait_ready();
        p
    }

    fn log(&self, name: &str) -> String {
        std::fs::read_to_string(self.dir.join(name)).unwrap_or_default()
    }

    fn wait_listening(&mut self) {
        let deadline = Instant::now() + START_TIMEOUT;
        while UnixStream::connect(&self.socket).is_err() {
            if let Some(status) = self.daemon.try_wait() {
                panic!(
                    "portless serve exited ({status}):\n{}",
                    self.log("portless.log")
                );
            }
            assert!(
                Instant::now() < deadline,
                "portless serve never listened:\n{}",
                self.log("portless.log")
            );
            std::thread::sleep(Duration::from_millis(20));
        }
    }

    fn start_agent(&mut self, vm: &str, config: &str) {
        let agent = Command::new(common::agent_binary())
            .arg("--cgroup")
            .arg("off")
            .arg("--shm-file")
            .arg(self.dir.join(format!("{vm}.region")))
            .arg("--config")
            .arg(self.dir.join(config))
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(File::create(self.dir.join(format!("agent-{vm}.log"))).expect("log"))
            .spawn()
            .unwrap_or_else(|e| {
                panic!(
                    "{}: {e} (build it: cargo build -p agent-linux)",
                    common::agent_binary().display()
                )
            });
        self.agents.push((vm.to_owned(), Reaped(Some(agent))));
    }

    /// Waits until `portless vms` shows the three VMs ready.
    fn wait_ready(&self) {
        let deadline = Instant::now() + START_TIMEOUT;
        loop {
            let out = self.cli(&["--json", "vms"]);
            if out.code == 0 {
                let vms = out.json()["vms"].as_array().cloned().unwrap_or_default();
                if vms.len() == 3 && vms.iter().all(|vm| vm["state"] == "ready") {
                    return;
                }
            }
            assert!(
                Instant::now() < deadline,
                "the VMs never became ready: {out:#?}\n{}",
                self.log("portless.log")
            );
            std::thread::sleep(Duration::from_millis(100));
        }
    }

    /// `portless --socket SOCKET ARGS`.
    fn cli(&self, args: &[&str]) -> Out {
        self.cli_start(args).finish()
    }

    /// `portless --socket SOCKET ARGS`, in the background.
    fn cli_start(&self, args: &[&str]) -> Run {
        let socket = self.socket.to_str().expect("UTF-8 path");
        let mut all = vec!["--socket", socket];
        all.extend_from_slice(args);
        Run::start(&self.dir, &all, None)
    }

    /// `PORTLESS_SOCKET=SOCKET portless ARGS`.
    fn cli_env(&self, args: &[&str]) -> Out {
        run(&self.dir, args, Some(self.socket.as_os_str()))
    }

    /// Polls `portless --json status ID` until the execution is in a final state; its record.
    fn wait_final(&self, id: u64) -> Value {
        let deadline = Instant::now() + STATE_TIMEOUT;
        loop {
            let out = self.cli(&["--json", "status", &id.to_string()]);
            out.code(0);
            let record = out.json();
            let state = record["state"].as_str().unwrap_or_default().to_owned();
            if !["pending", "running"].contains(&state.as_str()) {
                return record;
            }
            assert!(
                Instant::now() < deadline,
                "execution {id} still {state}: {record}"
            );
            std::thread::sleep(Duration::from_millis(100));
        }
    }

    /// Stops an agent for good (SIGKILL, as a crashed guest would).
    fn kill_agent(&mut self, vm: &str) {
        let i = self
            .agents
            .iter()
            .position(|(n, _)| n == vm)
            .expect("agent of that vm");
        drop(self.agents.remove(i));
    }
}

/// SIGTERM (the agents stop the programs they started; the daemon closes its records),
/// then SIGKILL for whatever lingers; every child reaped.
fn stop(children: &mut [&mut Reaped]) {
    for child in children.iter() {
        if let Ok(pid) = i32::try_from(child.id())
            && pid > 0
        {
            // SAFETY: `kill` takes plain values; `pid` is a child of this process that has
            // not been reaped (the guard still holds it), so the id is not reused.
            unsafe { libc::kill(pid, libc::SIGTERM) };
        }
    }
    let deadline = Instant::now() + Duration::from_secs(10);
    for child in children.iter_mut() {
        while child.0.is_some() && child.try_wait().is_none() && Instant::now() < deadline {
            std::thread::sleep(Duration::from_millis(20));
        }
        // Kills what is still running and reaps it.
        drop(child.0.take().map(|c| Reaped(Some(c))));
    }
}

impl Drop for Portless {
    fn drop(&mut self) {
        let mut children: Vec<&mut Reaped> = self.agents.iter_mut().map(|(_, a)| a).collect();
        children.push(&mut self.daemon);
        stop(&mut children);
        // The logs and records stay for a failed test to be looked into.
        if !std::thread::panicking() {
            let _ = std::fs::remove_dir_all(&self.dir);
        }
    }
}

fn scratch_dir(name: &str) -> PathBuf {
    let dir = PathBuf::from(env!("CARGO_TARGET_TMPDIR"))
        .join(format!("cli-{name}-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&dir);
    std::fs::create_dir_all(&dir).expect("scratch dir");
    dir
}

/// A table as `cli::render_table` draws it, read back into cells: each column starts where
/// its header does (headers are two or more spaces apart).
#[derive(Debug)]
struct Table {
    header: Vec<String>,
    rows: Vec<Vec<String>>,
}

impl Table {
    fn parse(text: &str) -> Self {
        let mut lines = text.lines();
        let head = lines.next().expect("a header line");
        let bytes = head.as_bytes();
        let starts: Vec<usize> = (0..bytes.len())
            .filter(|&i| bytes[i] != b' ' && (i == 0 || (i >= 2 && &bytes[i - 2..i] == b"  ")))
            .collect();
        let cells = |line: &str| -> Vec<String> {
            starts
                .iter()
                .enumerate()
                .map(|(k, &start)| {
                    let end = starts.get(k + 1).copied().unwrap_or(usize::MAX);
                    let end = end.min(line.len());
                    line.get(start.min(end)..end)
                        .unwrap_or_default()
                        .trim()
                        .to_owned()
                })
                .collect()
        };
        Self {
            header: cells(head),
            rows: lines.map(cells).collect(),
        }
    }

    fn index(&self, column: &str) -> usize {
        self.header
            .iter()
            .position(|h| h == column)
            .unwrap_or_else(|| panic!("no column {column} in {:?}", self.header))
    }

    fn column(&self, column: &str) -> Vec<String> {
        let i = self.index(column);
        self.rows.iter().map(|r| r[i].clone()).collect()
    }

    /// The rows without the columns named (those that vary from run to run).
    fn without(&self, columns: &[&str]) -> Vec<Vec<String>> {
        let drop: Vec<usize> = columns.iter().map(|c| self.index(c)).collect();
        self.rows
            .iter()
            .map(|r| {
                r.iter()
                    .enumerate()
                    .filter(|(i, _)| !drop.contains(i))
                    .map(|(_, c)| c.clone())
                    .collect()
            })
            .collect()
    }

    /// The column's cells as execution ids.
    fn ids(&self) -> Vec<u64> {
        self.column("ID")
            .iter()
            .map(|id| {
                id.parse()
                    .unwrap_or_else(|_| panic!("id {id:?} in {self:?}"))
            })
            .collect()
    }
}

fn rows(rows: &[&[&str]]) -> Vec<Vec<String>> {
    rows.iter()
        .map(|r| r.iter().map(|c| (*c).to_owned()).collect())
        .collect()
}

const SUMMARY_HEADER: [&str; 6] = ["VM", "ID", "STATE", "EXIT", "DURATION", "REASON"];
const DISPATCH_HEADER: [&str; 4] = ["VM", "ID", "STATE", "ERROR"];

/// A duration as the CLI writes it (`350ms`, `1.2s`, `3m05s`...).
fn is_duration(cell: &str) -> bool {
    let digits = cell.trim_end_matches(|c: char| c.is_ascii_alphabetic());
    !digits.is_empty()
        && digits
            .chars()
            .all(|c| c.is_ascii_digit() || c == '.' || c == 'm')
        && (cell.ends_with("ms") || cell.ends_with('s'))
}

/// The `exec --wait` summary: its rows without ID and DURATION, and the ids.
fn summary(out: &Out) -> (Vec<Vec<String>>, Vec<u64>) {
    let t = Table::parse(&out.stdout);
    assert_eq!(t.header, SUMMARY_HEADER, "{out:#?}");
    for (d, state) in t.column("DURATION").iter().zip(t.column("STATE")) {
        // Only what ran has a duration.
        if ["skipped", "rejected", "undeliverable", "agent_lost"].contains(&state.as_str()) {
            assert_eq!(d, "-", "{out:#?}");
        } else {
            assert!(is_duration(d), "duration {d:?}: {out:#?}");
        }
    }
    let ids = t
        .column("ID")
        .iter()
        .filter(|id| *id != "-")
        .map(|id| id.parse().expect("id"))
        .collect();
    (t.without(&["ID", "DURATION"]), ids)
}

/// The one id of a single-VM `exec` summary or dispatch table.
fn only_id(out: &Out) -> u64 {
    let ids = Table::parse(&out.stdout).ids();
    assert_eq!(ids.len(), 1, "{out:#?}");
    ids[0]
}

/// What `/bin/uname -a` prints here, where the agents run too.
fn local_uname() -> String {
    let out = Command::new("/bin/uname")
        .arg("-a")
        .output()
        .expect("uname");
    String::from_utf8(out.stdout).expect("UTF-8")
}

fn status_field(out: &Out, key: &str) -> String {
    let prefix = format!("{key}:");
    out.stdout
        .lines()
        .find_map(|l| l.strip_prefix(&prefix))
        .map(|v| v.trim().to_owned())
        .unwrap_or_else(|| panic!("no {key} in {out:#?}"))
}

#[test]
fn vms_commands_ping_and_metrics_with_the_socket_from_the_environment() {
    let p = Portless::start("listing", Policy::Ops);

    // `vms`: a table for people, through $PORTLESS_SOCKET alone.
    let out = p.cli_env(&["vms"]);
    out.code(0);
    assert_eq!(out.stderr, "");
    let t = Table::parse(&out.stdout);
    assert_eq!(
        t.header,
        [
            "NAME",
            "STATE",
            "CHANNEL",
            "AGENT",
            "GENERATION",
            "REVISION",
            "HEARTBEAT",
            "RESTARTS",
            "RUNNING",
            "CUTOFFS",
            "VIOLATIONS",
            "LABELS"
        ]
    );
    let agent = format!("portless-agent/{}", env!("CARGO_PKG_VERSION"));
    let expected: Vec<Vec<String>> = [("vm1", "web"), ("vm2", "web"), ("vm3", "db")]
        .iter()
        .map(|&(vm, role)| {
            let labels = format!("role={role}");
            let cells = [
                vm, "ready", "plain", &agent, "1", "0", "0", "0", "0", &labels,
            ];
            cells.iter().map(|c| (*c).to_owned()).collect()
        })
        .collect();
    assert_eq!(t.without(&["GENERATION", "HEARTBEAT"]), expected);
    for g in t.column("GENERATION") {
        assert!(
            g.len() == 8 && g.chars().all(|c| c.is_ascii_hexdigit()),
            "generation {g:?}"
        );
    }
    for h in t.column("HEARTBEAT") {
        assert!(is_duration(&h), "heartbeat age {h:?}");
    }

    // `vms --json`: the same, for scripts.
    let out = p.cli_env(&["vms", "--json"]);
    out.code(0);
    assert_eq!(out.stderr, "");
    let vms = out.json();
    let vms = vms["vms"].as_array().expect("vms");
    let names: Vec<&str> = vms.iter().filter_map(|v| v["name"].as_str()).collect();
    assert_eq!(names, ["vm1", "vm2", "vm3"]);
    for (vm, role) in vms.iter().zip(["web", "web", "db"]) {
        assert_eq!(vm["state"], "ready", "{vm}");
        assert_eq!(vm["channel"], "plain", "{vm}");
        assert_eq!(vm["labels"], serde_json::json!({ "role": role }), "{vm}");
        assert_eq!(vm["running"], 0, "{vm}");
    }

    // `commands vm1`: the summary line, then the allow-list in file order.
    let out = p.cli_env(&["commands", "vm1"]);
    out.code(0);
    assert_eq!(out.stderr, "");
    let (first, table) = out.stdout.split_once('\n').expect("two parts");
    let age = first
        .strip_prefix("vm1: 6 commands, revision 1, listed ")
        .and_then(|r| r.strip_suffix(" ago"))
        .unwrap_or_else(|| panic!("first line {first:?}"));
    assert!(is_duration(age), "{first:?}");
    let t = Table::parse(table);
    assert_eq!(
        t.header,
        ["COMMAND", "PARAMS", "TIMEOUT", "MAX OUTPUT", "DESCRIPTION"]
    );
    // The agent's default timeout (60 s) and output cap (1 MiB) where none is given.
    assert_eq!(
        t.rows,
        rows(&[
            &["uname", "-", "5.0s", "1 MiB", "Print system information"],
            &[
                "sleep",
                "seconds:int[1..3600]",
                "none",
                "1 MiB",
                "Sleep for a number of seconds"
            ],
            &[
                "fail",
                "-",
                "5.0s",
                "1 MiB",
                "Write to stderr and exit with status 3"
            ],
            &[
                "echo",
                "word:str[1..32,a-z0-9]",
                "1m00s",
                "1 MiB",
                "Print one word"
            ],
            &["killed", "-", "1m00s", "1 MiB", "Kill itself with SIGKILL"],
            &[
                "slowtimeout",
                "-",
                "300ms",
                "1 MiB",
                "Sleep past its own timeout"
            ],
        ])
    );

    // `commands vm1 --json`.
    let out = p.cli(&["commands", "vm1", "--json"]);
    out.code(0);
    assert_eq!(out.stderr, "");
    let list = out.json();
    assert_eq!(list["vm"], "vm1");
    assert_eq!(list["config_revision"], 1);
    let names: Vec<&str> = list["commands"]
        .as_array()
        .expect("commands")
        .iter()
        .filter_map(|c| c["name"].as_str())
        .collect();
    assert_eq!(
        names,
        ["uname", "sleep", "fail", "echo", "killed", "slowtimeout"]
    );
    assert_eq!(
        list["commands"][1]["params"],
        serde_json::json!([{ "kind": "integer", "name": "seconds", "min": 1, "max": 3600 }])
    );
    assert_eq!(list["commands"][5]["timeout_ms"], 300);

    // `ping vm1 --count 3`: three round trips, then their summary.
    let out = p.cli(&["ping", "vm1", "--count", "3"]);
    out.code(0);
    assert_eq!(out.stderr, "");
    let lines: Vec<&str> = out.stdout.lines().collect();
    assert_eq!(lines.len(), 4, "{out:#?}");
    let rtts: Vec<u64> = lines[..3]
        .iter()
        .map(|l| {
            l.strip_prefix("vm1: rtt ")
                .and_then(|r| r.strip_suffix(" us"))
                .and_then(|n| n.parse().ok())
                .unwrap_or_else(|| panic!("ping line {l:?}"))
        })
        .collect();
    let (min, max) = (rtts.iter().min().expect("3"), rtts.iter().max().expect("3"));
    let avg = rtts.iter().sum::<u64>() / 3;
    assert_eq!(
        lines[3],
        format!("3 round trips: min {min} us, avg {avg} us, max {max} us")
    );
    let out = p.cli(&["--json", "ping", "vm2", "-c", "2"]);
    out.code(0);
    let ping = out.json();
    assert_eq!(ping["vm"], "vm2");
    assert_eq!(ping["rtt_us"].as_array().map(Vec::len), Some(2), "{ping}");

    // `metrics vm1`: the guest's figures; its memory is this machine's (the agents run here).
    let out = p.cli(&["metrics", "vm1"]);
    out.code(0);
    assert_eq!(out.stderr, "");
    let keys: Vec<&str> = out
        .stdout
        .lines()
        .map(|l| l.split_once(':').expect("key: value").0)
        .collect();
    assert_eq!(
        keys,
        [
            "vm",
            "uptime",
            "load",
            "memory",
            "processes",
            "agent rss",
            "agent frames",
            "agent output",
            "agent executions",
            "agent resets"
        ]
    );
    assert_eq!(status_field(&out, "vm"), "vm1");
    let meminfo = std::fs::read_to_string("/proc/meminfo").expect("meminfo");
    let total: u64 = meminfo
        .lines()
        .find_map(|l| l.strip_prefix("MemTotal:"))
        .and_then(|v| v.trim().trim_end_matches("kB").trim().parse().ok())
        .expect("MemTotal");
    let memory = status_field(&out, "memory");
    let available: u64 = memory
        .strip_suffix(&format!(" KiB available of {total} KiB"))
        .and_then(|a| a.parse().ok())
        .unwrap_or_else(|| panic!("memory {memory:?}, MemTotal {total} kB"));
    assert!(0 < available && available <= total, "{memory}");
    assert_eq!(status_field(&out, "agent resets"), "0");
    let out = p.cli(&["metrics", "vm3", "--json"]);
    out.code(0);
    let m = out.json();
    assert_eq!(m["vm"], "vm3");
    assert_eq!(m["metrics"]["mem_total_kib"], total, "{m}");
}

#[test]
fn exec_wait_and_follow_exit_with_the_documented_codes() {
    let p = Portless::start("exit-codes", Policy::Ops);

    // Success: the summary row; the program's output is `uname -a` of this machine.
    let out = p.cli(&["exec", "vm1", "uname", "--wait"]);
    out.code(0);
    assert_eq!(out.stderr, "");
    let (r, ids) = summary(&out);
    assert_eq!(r, rows(&[&["vm1", "succeeded", "0", "-"]]));
    let out = p.cli(&["output", &ids[0].to_string()]);
    out.code(0);
    assert_eq!(out.stdout, local_uname());
    assert!(out.stdout.starts_with("Linux "), "{out:#?}");

    // The remote exit code, with its reason on stderr.
    let out = p.cli(&["exec", "vm1", "fail", "--wait"]);
    out.code(3);
    let (r, ids) = summary(&out);
    assert_eq!(r, rows(&[&["vm1", "failed", "3", "exited with code 3"]]));
    assert_eq!(
        out.stderr,
        format!("portless: vm1: execution {}: exited with code 3\n", ids[0])
    );

    // Killed by a signal: 128 + 9.
    let out = p.cli(&["exec", "vm1", "killed", "--wait"]);
    out.code(137);
    let (r, ids) = summary(&out);
    assert_eq!(
        r,
        rows(&[&["vm1", "failed", "137", "killed by signal 9 (SIGKILL)"]])
    );
    assert_eq!(
        out.stderr,
        format!(
            "portless: vm1: execution {}: killed by signal 9 (SIGKILL)\n",
            ids[0]
        )
    );

    // Past the command's own timeout: 124.
    let out = p.cli(&["exec", "vm1", "slowtimeout", "--wait"]);
    out.code(124);
    let (r, ids) = summary(&out);
    assert_eq!(r, rows(&[&["vm1", "timed_out", "124", "timed out"]]));
    assert_eq!(
        out.stderr,
        format!("portless: vm1: execution {}: timed out\n", ids[0])
    );
    // And past one given on the command line.
    let out = p.cli(&["exec", "vm2", "sleep", "20", "--timeout", "300", "--wait"]);
    out.code(124);
    assert_eq!(
        summary(&out).0,
        rows(&[&["vm2", "timed_out", "124", "timed out"]])
    );

    // Not in the allow-list: rejected by the agent, 125, one line of reason.
    let out = p.cli(&["exec", "vm1", "nosuchcmd", "--wait"]);
    out.code(125);
    let (r, ids) = summary(&out);
    assert_eq!(r.len(), 1, "{out:#?}");
    assert_eq!(r[0][..3], ["vm1", "rejected", "125"]);
    assert!(r[0][3].starts_with("rejected by the agent: "), "{out:#?}");
    assert_eq!(
        out.stderr,
        format!("portless: vm1: execution {}: {}\n", ids[0], r[0][3])
    );
    assert_eq!(out.stderr.lines().count(), 1);
    // An argument that fails the parameter's checks: the same.
    let out = p.cli(&["exec", "vm1", "sleep", "0", "--wait"]);
    out.code(125);
    assert_eq!(summary(&out).0[0][..3], ["vm1", "rejected", "125"]);
    assert_eq!(out.stderr.lines().count(), 1, "{out:#?}");

    // `--json` with `--wait`: the exit code and every VM's result.
    let out = p.cli(&["--json", "exec", "vm1", "fail", "--wait"]);
    out.code(3);
    let s = out.json();
    assert_eq!(s["exit_code"], 3, "{s}");
    assert_eq!(s["results"][0]["vm"], "vm1");
    assert_eq!(s["results"][0]["state"], "failed");
    assert_eq!(s["results"][0]["remote_exit_code"], 3);
    assert_eq!(s["results"][0]["reason"], "exited with code 3");

    // `--follow`: the program's output as it comes, nothing else, then as `--wait` exits.
    let out = p.cli(&["exec", "vm1", "echo", "hello", "--follow"]);
    out.code(0);
    assert_eq!(out.stdout, "hello\n");
    assert_eq!(out.stderr, "");
    let out = p.cli(&["exec", "vm2", "fail", "--follow"]);
    out.code(3);
    assert_eq!(out.stdout, "");
    let (first, reason) = out.stderr.split_once('\n').expect("two lines");
    assert_eq!(first, "failing");
    assert!(
        reason.starts_with("portless: vm2: execution ")
            && reason.ends_with(": exited with code 3\n"),
        "{out:#?}"
    );
    let out = p.cli(&["exec", "vm1", "killed", "--follow"]);
    out.code(137);
    assert_eq!(out.stdout, "");
    let out = p.cli(&["exec", "vm1", "nosuchcmd", "--follow"]);
    out.code(125);
    assert_eq!(out.stdout, "");
    assert!(
        out.stderr.starts_with("portless: vm1: execution ")
            && out.stderr.contains(": rejected by the agent: ")
            && out.stderr.lines().count() == 1,
        "{out:#?}"
    );

    // An unknown VM: the daemon refuses the request, so exit 1 (not 125, which is for what
    // Portless could not run), with `portless: <message>`.
    let out = p.cli(&["exec", "vm9", "uname", "--wait"]);
    out.code(1);
    assert_eq!(out.stdout, "");
    assert_eq!(out.stderr, "portless: unknown vm: \"vm9\"\n");
    let out = p.cli(&["exec", "role=none", "uname"]);
    out.code(1);
    assert_eq!(out.stderr, "portless: no vm has label role=none\n");
    for verb in [
        &["ping", "vm9"][..],
        &["metrics", "vm9"],
        &["commands", "vm9"],
    ] {
        let out = p.cli(verb);
        out.code(1);
        assert_eq!(out.stdout, "");
        assert_eq!(out.stderr, "portless: no vm named \"vm9\"\n", "{verb:?}");
    }
}

#[test]
fn exec_without_wait_then_status_output_and_cancel() {
    let p = Portless::start("ids", Policy::Ops);

    // Without --wait: the execution's id at once, exit 0.
    let out = p.cli(&["exec", "vm1", "echo", "hello"]);
    out.code(0);
    assert_eq!(out.stderr, "");
    let t = Table::parse(&out.stdout);
    assert_eq!(t.header, DISPATCH_HEADER);
    let state = t.column("STATE").remove(0);
    // Accepted by the agent; a program this short may be done already.
    assert!(state == "running" || state == "succeeded", "{out:#?}");
    assert_eq!(t.without(&["ID", "STATE"]), rows(&[&["vm1", "-"]]));
    let id = only_id(&out);
    assert_eq!(p.wait_final(id)["state"], "succeeded");

    // `status ID`.
    let out = p.cli(&["status", &id.to_string()]);
    out.code(0);
    assert_eq!(out.stderr, "");
    let keys: Vec<&str> = out
        .stdout
        .lines()
        .map(|l| l.split_once(':').expect("key: value").0)
        .collect();
    assert_eq!(
        keys,
        [
            "id",
            "vm",
            "command",
            "principal",
            "state",
            "exit code",
            "signal",
            "detail",
            "requested",
            "started",
            "finished",
            "duration",
            "agent id",
            "stdout",
            "stderr"
        ]
    );
    for (key, value) in [
        ("id", id.to_string()),
        ("vm", "vm1".into()),
        ("command", "echo hello".into()),
        ("principal", "ops".into()),
        ("state", "succeeded".into()),
        ("exit code", "0".into()),
        ("signal", "-".into()),
        ("detail", "-".into()),
        ("stdout", "6 bytes".into()),
        ("stderr", "0 bytes".into()),
    ] {
        assert_eq!(status_field(&out, key), value, "{key}: {out:#?}");
    }
    let out = p.cli(&["--json", "status", &id.to_string()]);
    out.code(0);
    let rec = out.json();
    assert_eq!(rec["id"], id);
    assert_eq!(rec["args"], serde_json::json!(["hello"]));
    assert_eq!(rec["exit_code"], 0);

    // `output ID`, both streams.
    let out = p.cli(&["output", &id.to_string()]);
    out.code(0);
    assert_eq!((out.stdout.as_str(), out.stderr.as_str()), ("hello\n", ""));
    let out = p.cli(&["output", &id.to_string(), "--stream", "stderr"]);
    out.code(0);
    assert_eq!((out.stdout.as_str(), out.stderr.as_str()), ("", ""));
    let out = p.cli(&["exec", "vm2", "fail"]);
    out.code(0);
    let failed = only_id(&out);
    assert_eq!(p.wait_final(failed)["exit_code"], 3);
    let out = p.cli(&["output", &failed.to_string(), "--stream", "stderr"]);
    out.code(0);
    assert_eq!(
        (out.stdout.as_str(), out.stderr.as_str()),
        ("failing\n", "")
    );
    let out = p.cli(&["output", &failed.to_string()]);
    out.code(0);
    assert_eq!(out.stdout, "");
    let out = p.cli(&["--json", "output", &id.to_string()]);
    out.code(0);
    let chunk = out.json();
    assert_eq!(chunk["data"], "aGVsbG8K", "base64 of hello\\n: {chunk}");
    assert_eq!(chunk["stored_len"], 6);
    assert_eq!(chunk["total_len"], 6);
    assert_eq!(chunk["truncated"], false);

    // `exec vm1 sleep 30`, `cancel ID`, then `status ID`: cancelled.
    let out = p.cli(&["exec", "vm1", "sleep", "30"]);
    out.code(0);
    let t = Table::parse(&out.stdout);
    assert_eq!(t.without(&["ID"]), rows(&[&["vm1", "running", "-"]]));
    let sleeping = only_id(&out);
    let out = p.cli(&["cancel", &sleeping.to_string()]);
    out.code(0);
    assert_eq!(out.stderr, "");
    assert_eq!(
        out.stdout,
        format!("execution {sleeping}: cancel requested (state running)\n")
    );
    assert_eq!(p.wait_final(sleeping)["state"], "cancelled");
    let out = p.cli(&["status", &sleeping.to_string()]);
    out.code(0);
    assert_eq!(status_field(&out, "state"), "cancelled");
    assert_eq!(status_field(&out, "command"), "sleep 30");
    // A second cancel: the daemon says it is over, exit 1.
    let out = p.cli(&["cancel", &sleeping.to_string()]);
    out.code(1);
    assert_eq!(out.stdout, "");
    assert_eq!(
        out.stderr,
        format!("portless: execution {sleeping} already ended (cancelled)\n")
    );

    // A `--wait` in progress when its execution is cancelled: 128 + SIGTERM. Nothing else
    // runs on this daemon, so the waited execution is the next id.
    let waited = sleeping + 1;
    let waiting = p.cli_start(&["exec", "vm3", "sleep", "30", "--wait"]);
    let deadline = Instant::now() + STATE_TIMEOUT;
    loop {
        let out = p.cli(&["--json", "status", &waited.to_string()]);
        if out.code == 0 && out.json()["state"] == "running" {
            assert_eq!(out.json()["vm"], "vm3");
            break;
        }
        assert!(Instant::now() < deadline, "{waited} never ran: {out:#?}");
        std::thread::sleep(Duration::from_millis(100));
    }
    p.cli(&["cancel", &waited.to_string()]).code(0);
    let out = waiting.finish();
    out.code(143);
    let (r, ids) = summary(&out);
    assert_eq!(ids, [waited]);
    assert_eq!(r, rows(&[&["vm3", "cancelled", "143", "cancelled"]]));
    assert_eq!(
        out.stderr,
        format!("portless: vm3: execution {waited}: cancelled\n")
    );

    // Ids that do not exist: exit 1.
    for verb in ["status", "output", "cancel"] {
        let out = p.cli(&[verb, "999999"]);
        out.code(1);
        assert_eq!(out.stdout, "");
        assert_eq!(out.stderr, "portless: no execution 999999\n", "{verb}");
    }
}

#[test]
fn fan_out_by_label_list_and_all_with_concurrency_and_error_limits() {
    let p = Portless::start("fan-out", Policy::Ops);

    // A label: both web VMs.
    let out = p.cli(&["exec", "role=web", "uname", "--wait"]);
    out.code(0);
    assert_eq!(out.stderr, "");
    let (r, ids) = summary(&out);
    assert_eq!(
        r,
        rows(&[
            &["vm1", "succeeded", "0", "-"],
            &["vm2", "succeeded", "0", "-"]
        ])
    );
    assert!(ids[0] != ids[1], "{ids:?}");
    for id in ids {
        let out = p.cli(&["output", &id.to_string()]);
        assert_eq!(out.stdout, local_uname());
    }

    // A list.
    let out = p.cli(&["exec", "vm1,vm3", "echo", "x", "--wait"]);
    out.code(0);
    assert_eq!(out.stderr, "");
    let (r, ids) = summary(&out);
    assert_eq!(
        r,
        rows(&[
            &["vm1", "succeeded", "0", "-"],
            &["vm3", "succeeded", "0", "-"]
        ])
    );
    for id in ids {
        assert_eq!(p.cli(&["output", &id.to_string()]).stdout, "x\n");
    }

    // All.
    let out = p.cli(&["exec", "--all", "uname", "--wait"]);
    out.code(0);
    assert_eq!(out.stderr, "");
    assert_eq!(
        summary(&out).0,
        rows(&[
            &["vm1", "succeeded", "0", "-"],
            &["vm2", "succeeded", "0", "-"],
            &["vm3", "succeeded", "0", "-"]
        ])
    );

    // One at a time, stop after the first failure: vm1 runs and fails, vm2 and vm3 are
    // skipped. The exit code is the first non-zero one in VM order: vm1's 3.
    let out = p.cli(&[
        "exec",
        "--all",
        "fail",
        "--wait",
        "--max-concurrency",
        "1",
        "--max-errors",
        "0",
    ]);
    out.code(3);
    let (r, ids) = summary(&out);
    assert_eq!(
        r,
        rows(&[
            &["vm1", "failed", "3", "exited with code 3"],
            &[
                "vm2",
                "skipped",
                "125",
                "not dispatched: more than 0 executions failed (--max-errors)"
            ],
            &[
                "vm3",
                "skipped",
                "125",
                "not dispatched: more than 0 executions failed (--max-errors)"
            ],
        ])
    );
    assert_eq!(ids.len(), 1, "only vm1 dispatched: {out:#?}");
    assert_eq!(
        out.stderr,
        format!(
            "portless: vm1: execution {}: exited with code 3\n\
             portless: vm2: not dispatched: more than 0 executions failed (--max-errors)\n\
             portless: vm3: not dispatched: more than 0 executions failed (--max-errors)\n",
            ids[0]
        )
    );
    // Without --wait: what was dispatched, and 125 since not every VM took it. "VM order"
    // is the order of the list.
    let out = p.cli(&[
        "exec",
        "vm3,vm2,vm1",
        "fail",
        "--max-concurrency",
        "1",
        "--max-errors",
        "0",
    ]);
    out.code(125);
    let t = Table::parse(&out.stdout);
    assert_eq!(t.header, DISPATCH_HEADER);
    assert_eq!(
        t.without(&["ID", "STATE"]),
        rows(&[
            &["vm3", "-"],
            &["vm2", "not dispatched (--max-errors)"],
            &["vm1", "not dispatched (--max-errors)"]
        ])
    );
    assert_eq!(t.column("ID")[1..], ["-", "-"]);
    let vm3: u64 = t.column("ID")[0].parse().expect("vm3's id");
    assert_eq!(p.wait_final(vm3)["exit_code"], 3);
    assert_eq!(
        out.stderr,
        "portless: vm2: not dispatched: more than 0 executions failed (--max-errors)\n\
         portless: vm1: not dispatched: more than 0 executions failed (--max-errors)\n"
    );
    // Enough room for errors: all three run and fail.
    let out = p.cli(&["exec", "--all", "fail", "--wait", "--max-errors", "5"]);
    out.code(3);
    let (r, ids) = summary(&out);
    assert_eq!(r.len(), 3);
    assert!(r.iter().all(|r| r[1..3] == ["failed", "3"]), "{out:#?}");
    assert_eq!(out.stderr.lines().count(), 3, "{out:#?}");
    assert_eq!(ids.len(), 3);

    // `--all` without --wait: three ids.
    let out = p.cli(&["exec", "--all", "echo", "all"]);
    out.code(0);
    assert_eq!(out.stderr, "");
    let t = Table::parse(&out.stdout);
    assert_eq!(t.column("VM"), ["vm1", "vm2", "vm3"]);
    for id in t.ids() {
        assert_eq!(p.wait_final(id)["state"], "succeeded");
        assert_eq!(p.cli(&["output", &id.to_string()]).stdout, "all\n");
    }
    let out = p.cli(&["--json", "exec", "role=db", "echo", "db"]);
    out.code(0);
    let d = out.json();
    assert_eq!(d["executions"].as_array().map(Vec::len), Some(1), "{d}");
    assert_eq!(d["executions"][0]["vm"], "vm3");
    assert_eq!(d["skipped"], serde_json::json!([]));

    // `--follow` on several VMs: each line prefixed with its VM, the summary on stderr.
    let out = p.cli(&["exec", "role=web", "echo", "hi", "--follow"]);
    out.code(0);
    let mut lines: Vec<&str> = out.stdout.lines().collect();
    lines.sort_unstable();
    assert_eq!(lines, ["vm1: hi", "vm2: hi"], "{out:#?}");
    let t = Table::parse(&out.stderr);
    assert_eq!(t.header, SUMMARY_HEADER);
    assert_eq!(
        t.without(&["ID", "DURATION"]),
        rows(&[
            &["vm1", "succeeded", "0", "-"],
            &["vm2", "succeeded", "0", "-"]
        ])
    );
}

#[test]
fn push_stores_runs_and_is_refused_by_a_guest_without_push() {
    use sha2::Digest as _;
    let p = Portless::start("push", Policy::Ops);
    let script = b"#!/bin/sh\necho pushed-ok\necho to-err >&2\n";
    let file = p.dir.join("fix.sh");
    std::fs::write(&file, script).expect("script");
    let file = file.to_str().expect("UTF-8");
    let sha = hex::encode(sha2::Sha256::digest(script));
    let size = script.len();

    // Stored only.
    let out = p.cli(&["push", "vm1", file]);
    out.code(0);
    assert_eq!(out.stderr, "");
    assert_eq!(
        out.stdout,
        format!("vm1: stored fix.sh ({size} bytes, sha256 {sha})\n")
    );
    assert_eq!(
        std::fs::read(p.dir.join("push/fix.sh")).expect("stored in the push dir"),
        script
    );

    // Stored and run: the execution's id, then its record and output.
    let out = p.cli(&["push", "vm2", file, "--run", "--name", "run.sh"]);
    out.code(0);
    assert_eq!(out.stderr, "");
    let (first, second) = out.stdout.split_once('\n').expect("two lines");
    assert_eq!(
        first,
        format!("vm2: started run.sh ({size} bytes, sha256 {sha})")
    );
    let id: u64 = second
        .strip_prefix("execution ")
        .and_then(|r| r.split_once(' '))
        .and_then(|(id, _)| id.parse().ok())
        .unwrap_or_else(|| panic!("{out:#?}"));
    assert_eq!(
        second,
        format!("execution {id} (portless status {id}, portless output {id})\n")
    );
    let rec = p.wait_final(id);
    assert_eq!(rec["state"], "succeeded", "{rec}");
    let out = p.cli(&["status", &id.to_string()]);
    out.code(0);
    assert_eq!(status_field(&out, "command"), "push:run.sh");
    assert_eq!(status_field(&out, "vm"), "vm2");
    assert_eq!(status_field(&out, "exit code"), "0");
    let out = p.cli(&["output", &id.to_string()]);
    out.code(0);
    assert_eq!(out.stdout, "pushed-ok\n");
    let out = p.cli(&["output", &id.to_string(), "--stream", "stderr"]);
    assert_eq!(out.stdout, "to-err\n");

    // `--json`.
    let out = p.cli(&["--json", "push", "vm1", file, "--name", "again.sh"]);
    out.code(0);
    let answer = out.json();
    assert_eq!(answer["outcome"], "stored", "{answer}");
    assert_eq!(answer["sha256"], sha.as_str());
    assert_eq!(answer["size"], size);

    // vm3's guest takes no pushed programs: the push fails, exit 1, one line of reason.
    let out = p.cli(&["push", "vm3", file]);
    out.code(1);
    assert_eq!(
        out.stdout,
        format!("vm3: failed fix.sh ({size} bytes, sha256 {sha})\n")
    );
    assert!(
        out.stderr
            .starts_with("portless: vm3: push of fix.sh failed: ")
            && out.stderr.lines().count() == 1,
        "{out:#?}"
    );

    // A file that cannot be read.
    let missing = p.dir.join("missing.sh");
    let out = p.cli(&["push", "vm1", missing.to_str().expect("UTF-8")]);
    out.code(1);
    assert_eq!(out.stdout, "");
    assert_eq!(
        out.stderr,
        format!(
            "portless: cannot read {}: No such file or directory (os error 2)\n",
            missing.display()
        )
    );
}

#[test]
fn a_principal_limited_to_uname_is_denied_the_rest_and_the_audit_shows_it() {
    let p = Portless::start("denied", Policy::UnameOnly);

    // Allowed.
    let out = p.cli(&["exec", "vm1", "uname", "--wait"]);
    out.code(0);
    assert_eq!(summary(&out).0, rows(&[&["vm1", "succeeded", "0", "-"]]));

    // Denied by policy: 125 with the daemon's reason, nothing run.
    let out = p.cli(&["exec", "vm1", "sleep", "1", "--wait"]);
    out.code(125);
    assert_eq!(out.stdout, "");
    assert_eq!(
        out.stderr,
        "portless: principal \"limited\" may not run \"sleep\" on vm \"vm1\"\n"
    );
    let out = p.cli(&["exec", "vm2", "fail"]);
    out.code(125);
    assert_eq!(
        out.stderr,
        "portless: principal \"limited\" may not run \"fail\" on vm \"vm2\"\n"
    );
    let out = p.cli(&["exec", "--all", "sleep", "1", "--follow"]);
    out.code(125);
    assert_eq!(out.stdout, "");
    assert_eq!(
        out.stderr,
        "portless: no vm in \"*\" allows this caller to run \"sleep\"\n"
    );
    // Push is not `exec`: a refusal of the daemon, exit 1.
    let file = p.dir.join("x.sh");
    std::fs::write(&file, "#!/bin/sh\n").expect("file");
    let out = p.cli(&["push", "vm1", file.to_str().expect("UTF-8")]);
    out.code(1);
    assert_eq!(out.stdout, "");
    assert!(
        out.stderr
            .starts_with("portless: principal \"limited\" may not push"),
        "{out:#?}"
    );

    // `audit`: every call, newest last, the denials with their reasons.
    let out = p.cli(&["audit"]);
    out.code(0);
    assert_eq!(out.stderr, "");
    let t = Table::parse(&out.stdout);
    assert_eq!(
        t.header,
        [
            "TIME (UTC)",
            "ID",
            "PRINCIPAL",
            "CALLER",
            "ACTION",
            "TARGET",
            "RESULT",
            "REASON"
        ]
    );
    let denied = rows(&[&[
        "limited",
        "exec",
        "vm1:sleep",
        "denied",
        "principal \"limited\" may not run \"sleep\" on vm \"vm1\"",
    ]]);
    let picked: Vec<Vec<String>> = t.without(&["TIME (UTC)", "ID", "CALLER"]);
    assert!(
        picked.iter().any(|r| *r == denied[0]),
        "no denied exec in {out:#?}"
    );
    assert!(
        picked
            .iter()
            .any(|r| r[..4] == ["limited", "exec", "vm1:uname", "allowed"]),
        "{out:#?}"
    );
    // The audit read itself comes last.
    assert_eq!(
        picked.last().map(|r| r[..4].to_vec()),
        Some(rows(&[&["limited", "read_audit", "-", "allowed"]])[0].clone())
    );
    // SAFETY: `getuid` has no preconditions and cannot fail.
    let uid = unsafe { libc::getuid() };
    for caller in t.column("CALLER") {
        assert!(caller.starts_with(&format!("uid={uid} gid=")), "{caller}");
    }
    for time in t.column("TIME (UTC)") {
        assert_eq!(time.len(), "2026-01-01 00:00:00".len(), "{time}");
    }

    // Only the denials, the newest three: `--all` was denied VM by VM, then the push.
    let out = p.cli(&["audit", "--denied", "--limit", "3"]);
    out.code(0);
    let t = Table::parse(&out.stdout);
    assert_eq!(
        t.without(&["TIME (UTC)", "ID", "CALLER"]),
        rows(&[
            &[
                "limited",
                "exec",
                "vm2:sleep",
                "denied",
                "principal \"limited\" may not run \"sleep\" on vm \"vm2\""
            ],
            &[
                "limited",
                "exec",
                "vm3:sleep",
                "denied",
                "principal \"limited\" may not run \"sleep\" on vm \"vm3\""
            ],
            &[
                "limited",
                "push",
                "vm1:x.sh",
                "denied",
                "principal \"limited\" may not push programs"
            ],
        ])
    );
    let ids = t.ids();
    assert!(ids.windows(2).all(|w| w[0] < w[1]), "newest last: {ids:?}");

    // `audit --json`: the same entries for scripts.
    let out = p.cli(&["audit", "--json", "--denied", "--action", "exec"]);
    out.code(0);
    let log = out.json();
    let entries = log["entries"].as_array().expect("entries");
    let targets: Vec<&str> = entries
        .iter()
        .filter_map(|e| e["target"].as_str())
        .collect();
    assert_eq!(
        targets,
        [
            "vm1:sleep",
            "vm2:fail",
            "vm1:sleep",
            "vm2:sleep",
            "vm3:sleep"
        ]
    );
    let first = &entries[0];
    assert_eq!(first["principal"], "limited");
    assert_eq!(first["action"], "exec");
    assert_eq!(first["allowed"], false);
    assert_eq!(
        first["reason"],
        "principal \"limited\" may not run \"sleep\" on vm \"vm1\""
    );
    assert_eq!(
        first["caller"]
            .as_str()
            .map(|c| c.starts_with(&format!("uid={uid} "))),
        Some(true),
        "{first}"
    );
    let out = p.cli(&["--json", "audit", "--principal", "limited", "--limit", "1"]);
    out.code(0);
    let log = out.json();
    assert_eq!(log["entries"].as_array().map(Vec::len), Some(1), "{log}");
    assert_eq!(log["entries"][0]["action"], "read_audit");
}

#[test]
fn an_exec_to_a_vm_whose_agent_is_gone_is_undeliverable() {
    let mut p = Portless::start("gone", Policy::Ops);
    p.kill_agent("vm3");
    // Once the heartbeat has been missed (5 s, the default), `vms` says so.
    let deadline = Instant::now() + START_TIMEOUT;
    loop {
        let out = p.cli(&["vms"]);
        out.code(0);
        let t = Table::parse(&out.stdout);
        if t.column("STATE") == ["ready", "ready", "unresponsive"] {
            break;
        }
        assert!(
            Instant::now() < deadline,
            "vm3 never unresponsive: {out:#?}"
        );
        std::thread::sleep(Duration::from_millis(200));
    }
    // Not delivered within the delivery timeout (10 s here): Portless could not run it, 125.
    let reason = "undeliverable: the agent was not ready within the delivery timeout";
    let out = p.cli(&["exec", "vm1,vm3", "uname", "--wait"]);
    out.code(125);
    let (r, ids) = summary(&out);
    assert_eq!(
        r,
        rows(&[
            &["vm1", "succeeded", "0", "-"],
            &["vm3", "undeliverable", "125", reason]
        ])
    );
    assert_eq!(
        out.stderr,
        format!("portless: vm3: execution {}: {reason}\n", ids[1])
    );
    assert_eq!(p.wait_final(ids[1])["state"], "undeliverable");
    // Without --wait: 125 as well, with the reason.
    let out = p.cli(&["exec", "vm3", "echo", "x"]);
    out.code(125);
    let t = Table::parse(&out.stdout);
    assert_eq!(
        t.without(&["ID"]),
        rows(&[&["vm3", "undeliverable", reason]])
    );
    let id = only_id(&out);
    assert_eq!(
        out.stderr,
        format!("portless: vm3: execution {id}: {reason}\n")
    );
    // Not an execution: the daemon's error, exit 1.
    let out = p.cli(&["ping", "vm3"]);
    out.code(1);
    assert_eq!(out.stderr, format!("portless: {reason}\n"));
}

#[test]
fn errors_without_a_daemon_and_bad_usage() {
    let dir = scratch_dir("errors");

    // Nothing at the socket: exit 1, naming it, whether from --socket or the environment.
    let missing = dir.join("nobody.sock");
    let no_daemon = |socket: &Path, why: &str| {
        format!(
            "portless: cannot connect to the daemon at {}: {why}{NO_DAEMON_TAIL}\n",
            socket.display()
        )
    };
    let enoent = "No such file or directory (os error 2)";
    let out = run(
        &dir,
        &["--socket", missing.to_str().expect("UTF-8"), "vms"],
        None,
    );
    out.code(1);
    assert_eq!(out.stdout, "");
    assert_eq!(out.stderr, no_daemon(&missing, enoent));
    let out = run(
        &dir,
        &["exec", "vm1", "uname", "--wait"],
        Some(missing.as_os_str()),
    );
    out.code(1);
    assert_eq!(out.stderr, no_daemon(&missing, enoent));
    // --socket wins over the environment.
    let other = dir.join("other.sock");
    let out = run(
        &dir,
        &["--socket", other.to_str().expect("UTF-8"), "status", "1"],
        Some(missing.as_os_str()),
    );
    out.code(1);
    assert_eq!(out.stderr, no_daemon(&other, enoent));
    // A socket file nobody listens on any more.
    let stale = dir.join("stale.sock");
    drop(UnixListener::bind(&stale).expect("bind"));
    let out = run(&dir, &["ping", "vm1"], Some(stale.as_os_str()));
    out.code(1);
    assert_eq!(
        out.stderr,
        no_daemon(&stale, "Connection refused (os error 111)")
    );
    // Neither: the default socket of `portless serve` (unless a daemon runs there).
    let default = Path::new("/run/portless/portless.sock");
    if !default.exists() {
        let out = run(&dir, &["audit"], None);
        out.code(1);
        assert_eq!(out.stderr, no_daemon(default, enoent));
    }

    // Bad usage: clap's exit code 2, nothing on stdout, nothing sent anywhere.
    for args in [
        &["exec"][..],
        &["exec", "vm1"],
        &["exec", "--all"],
        &["exec", "vm1,", "uname"],
        &["exec", "vm1", "uname", "--max-concurrency", "0"],
        &["exec", "vm1", "uname", "--timeout", "soon"],
        &["status", "seven"],
        &["output", "1", "--stream", "both"],
        &["ping", "vm1", "--count", "0"],
        &["push", "vm1"],
        &["commands"],
        &["bogus"],
    ] {
        let out = run(&dir, args, Some(missing.as_os_str()));
        out.code(2);
        assert_eq!(out.stdout, "", "{args:?}");
        assert!(
            out.stderr.starts_with("error: ") || out.stderr.starts_with("Usage: "),
            "{args:?}: {out:#?}"
        );
        assert!(!out.stderr.contains("cannot connect"), "{args:?}: {out:#?}");
    }
    let out = run(&dir, &["exec", "vm1"], None);
    assert_eq!(
        out.stderr.lines().next(),
        Some("error: a TARGET and a COMMAND are needed (or --all and a COMMAND)")
    );
    let out = run(&dir, &["bogus"], None);
    assert_eq!(
        out.stderr.lines().next(),
        Some("error: unrecognized subcommand 'bogus'")
    );
    // Nothing at all: the help, on stderr.
    let out = run(&dir, &[], None);
    out.code(2);
    assert_eq!(out.stdout, "");
    assert!(
        out.stderr
            .contains("\nUsage: portless [OPTIONS] <COMMAND>\n"),
        "{out:#?}"
    );
    // `serve` anywhere but first is a usage error too.
    let out = run(&dir, &["--json", "serve"], None);
    out.code(2);
    assert_eq!(
        out.stderr,
        "portless: `serve` must be the first argument: portless serve --config PATH\n"
    );
    let _ = std::fs::remove_dir_all(&dir);
}

/// The commands `cargo xtask loopback` offers (from `examples/allow-list.toml`) are the ones
/// these tests run: same programs, arguments and parameters; the tests set everything up
/// themselves, without xtask or its `target/loopback` directory.
#[test]
fn the_tests_need_no_loopback_setup_and_run_its_example_commands() {
    let root = Path::new(env!("CARGO_MANIFEST_DIR")).join("..");
    let example: toml::Table = std::fs::read_to_string(root.join("examples/allow-list.toml"))
        .expect("example allow-list")
        .parse()
        .expect("TOML");
    let ours: toml::Table = AGENT_CONFIG
        .replace("PUSH_ENABLED", "true")
        .parse()
        .expect("TOML");
    let command = |t: &toml::Table, name: &str| -> toml::Table {
        let c = t["command"]
            .as_array()
            .expect("commands")
            .iter()
            .filter_map(toml::Value::as_table)
            .find(|c| c["name"].as_str() == Some(name))
            .unwrap_or_else(|| panic!("no command {name}"));
        ["program", "args", "param"]
            .iter()
            .filter_map(|k| c.get(*k).map(|v| ((*k).to_owned(), v.clone())))
            .collect()
    };
    for name in ["uname", "sleep", "fail"] {
        assert_eq!(command(&example, name), command(&ours, name), "{name}");
    }
    // Everything a test starts lives under CARGO_TARGET_TMPDIR.
    let dir = scratch_dir("standalone");
    let host = host_config(&dir, Policy::Ops);
    assert!(!host.contains("loopback"), "{host}");
    assert!(dir.starts_with(env!("CARGO_TARGET_TMPDIR")));
    let parsed = host_shim::config::HostConfig::parse(&host, "host.toml").expect("valid");
    assert_eq!(parsed.vms.len(), 3);
    assert!(parsed.daemon.socket.starts_with(&dir));
    let _ = std::fs::remove_dir_all(&dir);
}
