//! `portless serve` with two real VMs (QEMU, TCG), driven through its HTTP API on the unix
//! socket: `vmd` on an `ivshmem-doorbell` device served by the daemon (the agent woken by VFIO
//! MSI-X interrupts, the daemon by the guest's doorbell) and `vmp` on an `ivshmem-plain`
//! device backed by a file (both sides poll). Readiness, exec on each and fan-out, output,
//! ping, metrics, the daemon's CPU time while both VMs are idle; how executions end
//! (rejected, failed, timed out, cancelled, 16 MiB of output byte for byte) on both wakeup
//! modes; `agent_lost` on an agent restart and a VM reset (through QEMU's monitor, at
//! `<vm>.monitor`), and the VM ready again with a new agent. Needs a kernel and
//! initramfs in `PORTLESS_VM_DIR` (`cargo xtask image`); `#[ignore]`d otherwise.

mod common;

use std::io::Write;
use std::os::unix::net::UnixStream;
use std::path::{Path, PathBuf};
use std::process::Child;
use std::time::{Duration, Instant};

use serde_json::{Value, json};
use vm_harness::{Guest, Ivshmem};

/// How long a VM under TCG may take to boot and greet.
const BOOT_TIMEOUT: Duration = Duration::from_secs(90);

/// The daemon (in a thread of this test) and the QEMUs of its two VMs.
struct Setup {
    dir: PathBuf,
    socket: PathBuf,
    daemon: Option<common::InProcessDaemon>,
    qemus: Vec<(String, Child)>,
}

fn host_config(dir: &Path) -> String {
    // SAFETY: `getuid` has no preconditions.
    let uid = unsafe { libc::getuid() };
    format!(
        r#"
[daemon]
socket = "{dir}/portless.sock"
state_dir = "{dir}/state"
# 16 MiB of output and what its chunks cost on disk (the cap counts both).
output_cap = 17825792

[[vm]]
name = "vmd"
channel = "doorbell"
socket = "{dir}/vmd.sock"
size = "1M"

[[vm]]
name = "vmp"
channel = "plain"
path = "{dir}/vmp.region"
size = "1M"

[[principal]]
name = "ops"
uids = [{uid}]
vms = ["*"]
commands = ["*"]
"#,
        dir = dir.display()
    )
}

impl Setup {
    fn raw(&self, method: &str, path: &str, body: Option<&[u8]>) -> (u16, Vec<u8>) {
        common::http(&self.socket, method, path, body)
    }

    fn call(&self, method: &str, path: &str, body: Option<Value>) -> (u16, Value) {
        common::call(&self.socket, method, path, body)
    }

    /// Starts the daemon (listening on the doorbell VM's ivshmem socket and having created the
    /// plain VM's region file), then boots both VMs.
    fn start(name: &str) -> Self {
        let dir = PathBuf::from(env!("CARGO_TARGET_TMPDIR"))
            .join(format!("{name}-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        std::fs::create_dir_all(&dir).expect("dir");
        let mut s = Self {
            socket: dir.join("portless.sock"),
            dir,
            daemon: None,
            qemus: Vec::new(),
        };
        s.start_daemon();
        assert!(s.dir.join("vmd.sock").exists(), "no ivshmem socket");
        assert!(s.dir.join("vmp.region").exists(), "no plain region file");

        let vmd = Ivshmem::Doorbell {
            socket: s.dir.join("vmd.sock"),
        };
        s.boot("vmd", vmd);
        let vmp = Ivshmem::Plain {
            file: s.dir.join("vmp.region"),
            size: 1 << 20,
        };
        s.boot("vmp", vmp);
        s
    }

    /// Starts the daemon in a thread of this test and waits for its API socket (bound after
    /// every VM's channel exists: the ivshmem server listens, the region file is there).
    fn start_daemon(&mut self) {
        let config = host_shim::config::HostConfig::parse(&host_config(&self.dir), "host.toml")
            .expect("valid host.toml");
        self.daemon = Some(common::InProcessDaemon::start_on(config));
    }

    /// Stops the daemon (the VMs keep running).
    fn stop_daemon(&mut self) {
        if let Some(mut d) = self.daemon.take() {
            d.stop();
        }
        // Its VM drivers notice that the daemon is gone at their next wake-up.
        std::thread::sleep(Duration::from_millis(700));
    }

    /// Boots a QEMU for `vm`; its console goes to `<vm>.console`, QEMU's own errors to
    /// `<vm>.qemu-err` in the scratch directory; its human monitor listens on `<vm>.monitor`.
    fn boot(&mut self, vm: &str, ivshmem: Ivshmem) {
        let image = PathBuf::from(std::env::var("PORTLESS_VM_DIR").expect("PORTLESS_VM_DIR"));
        let file = |ext: &str| self.dir.join(format!("{vm}.{ext}"));
        let child = Guest::new(&image, ivshmem)
            .monitor(&file("monitor"))
            .spawn(&file("console"), Some(&file("qemu-err")))
            .expect("start qemu");
        self.qemus.push((vm.to_owned(), child));
    }

    /// A VM's console (the agent logs there through /dev/kmsg) and QEMU's errors.
    fn log(&self, vm: &str) -> String {
        let console =
            std::fs::read_to_string(self.dir.join(format!("{vm}.console"))).unwrap_or_default();
        let errors =
            std::fs::read_to_string(self.dir.join(format!("{vm}.qemu-err"))).unwrap_or_default();
        format!("--- {vm} console ---\n{console}\n--- {vm} qemu stderr ---\n{errors}")
    }

    fn logs(&self) -> String {
        format!("{}\n{}", self.log("vmd"), self.log("vmp"))
    }

    /// QEMU's process id for `vm`.
    fn pid(&self, vm: &str) -> u32 {
        self.qemus
            .iter()
            .find(|(n, _)| n == vm)
            .map(|(_, c)| c.id())
            .expect("qemu of that vm")
    }

    /// Waits until every VM is ready; returns when each became so (since `since`).
    fn wait_ready(&self, since: Instant) -> Vec<(String, Duration)> {
        let deadline = Instant::now() + BOOT_TIMEOUT;
        let mut ready: Vec<(String, Duration)> = Vec::new();
        loop {
            let (status, body) = self.call("GET", "/v1/vms", None);
            assert_eq!(status, 200, "{body}");
            let vms = body["vms"].as_array().cloned().unwrap_or_default();
            for vm in &vms {
                let name = vm["name"].as_str().unwrap_or("").to_owned();
                if vm["state"] == "ready" && !ready.iter().any(|(n, _)| *n == name) {
                    ready.push((name, since.elapsed()));
                }
            }
            if !vms.is_empty() && ready.len() == vms.len() {
                return ready;
            }
            for (vm, child) in &self.qemus {
                // A QEMU that exited will never become ready.
                let running = std::fs::metadata(format!("/proc/{}", child.id())).is_ok()
                    && !std::fs::read_to_string(format!("/proc/{}/stat", child.id()))
                        .unwrap_or_default()
                        .contains(") Z");
                assert!(running, "qemu of {vm} exited\n{}", self.logs());
            }
            assert!(
                Instant::now() < deadline,
                "vms never ready: {body}\n{}",
                self.logs()
            );
            std::thread::sleep(Duration::from_millis(100));
        }
    }

    /// Starts `command` on `target`; the executions.
    fn exec(&self, target: &str, command: &str) -> Vec<Value> {
        let (status, body) = self.call(
            "POST",
            "/v1/exec",
            Some(json!({"target": target, "command": command})),
        );
        assert_eq!(status, 200, "{body}\n{}", self.logs());
        body["executions"].as_array().cloned().expect("executions")
    }

    /// Waits for an execution to end; its record.
    fn wait(&self, id: &Value) -> Value {
        let (status, body) = self.call(
            "GET",
            &format!("/v1/executions/{id}/wait?timeout_ms=30000"),
            None,
        );
        assert_eq!(status, 200, "{body}");
        body
    }

    /// Waits for an execution, checks that it succeeded; its stdout.
    fn succeeded(&self, exec: &Value) -> String {
        let id = &exec["id"];
        let rec = self.wait(id);
        assert_eq!(rec["state"], "succeeded", "{rec}\n{}", self.logs());
        assert_eq!(rec["exit_code"], 0, "{rec}");
        let (status, out) = self.raw("GET", &format!("/v1/executions/{id}/output"), None);
        assert_eq!(status, 200);
        String::from_utf8_lossy(&out).into_owned()
    }

    /// Starts `command` with `args` (and a timeout) on one VM; its dispatch record.
    fn start_one(&self, vm: &str, command: &str, args: &[&str], timeout_ms: Option<u32>) -> Value {
        let mut body = json!({"target": vm, "command": command, "args": args});
        if let Some(ms) = timeout_ms {
            body["timeout_ms"] = json!(ms);
        }
        let (status, body) = self.call("POST", "/v1/exec", Some(body));
        assert_eq!(status, 200, "{body}\n{}", self.logs());
        let execs = body["executions"].as_array().cloned().expect("executions");
        assert_eq!(execs.len(), 1, "{body}");
        execs[0].clone()
    }

    /// Waits for an execution to end in `state`; its record.
    fn ends(&self, exec: &Value, state: &str) -> Value {
        let id = &exec["id"];
        assert!(id.is_u64(), "no execution id: {exec}");
        let deadline = Instant::now() + BOOT_TIMEOUT;
        let mut rec = self.wait(id);
        while (rec["state"] == "running" || rec["state"] == "pending") && Instant::now() < deadline
        {
            rec = self.wait(id);
        }
        assert_eq!(rec["state"], state, "{rec}\n{}", self.logs());
        rec
    }

    /// The stored bytes of one stream of an execution.
    fn output(&self, id: &Value, stream: &str) -> Vec<u8> {
        let (status, out) = self.raw(
            "GET",
            &format!("/v1/executions/{id}/output?stream={stream}"),
            None,
        );
        assert_eq!(status, 200, "{}", String::from_utf8_lossy(&out));
        out
    }

    /// The VM's entry in `GET /v1/vms`.
    fn vm(&self, vm: &str) -> Value {
        let (status, body) = self.call("GET", "/v1/vms", None);
        assert_eq!(status, 200, "{body}");
        body["vms"]
            .as_array()
            .and_then(|vms| vms.iter().find(|v| v["name"] == vm).cloned())
            .unwrap_or_else(|| panic!("no vm {vm}: {body}"))
    }

    /// Waits until `vm` is ready with an agent generation other than `old`; the new one.
    fn wait_new_generation(&self, vm: &str, old: &Value) -> Value {
        let deadline = Instant::now() + BOOT_TIMEOUT;
        loop {
            let v = self.vm(vm);
            if v["state"] == "ready"
                && v["agent_generation"].is_u64()
                && v["agent_generation"] != *old
            {
                return v["agent_generation"].clone();
            }
            assert!(
                Instant::now() < deadline,
                "{vm} never came back with a new agent: {v}\n{}",
                self.log(vm)
            );
            std::thread::sleep(Duration::from_millis(100));
        }
    }

    /// Sends one command line to a VM's QEMU monitor.
    fn monitor(&self, vm: &str, line: &str) {
        let mut m = UnixStream::connect(self.dir.join(format!("{vm}.monitor"))).expect("monitor");
        m.write_all(format!("{line}\n").as_bytes())
            .expect("monitor write");
        // Let QEMU read it before the connection goes.
        std::thread::sleep(Duration::from_millis(500));
    }
}

impl Drop for Setup {
    fn drop(&mut self) {
        for (_, q) in &mut self.qemus {
            let _ = q.kill();
            let _ = q.wait();
        }
        self.daemon = None;
    }
}

#[test]
#[ignore = "boots two VMs; needs PORTLESS_VM_DIR"]
fn a_doorbell_vm_and_a_plain_vm_through_the_daemon() {
    let started = Instant::now();
    let s = Setup::start("host-vm");

    // Both agents greet the daemon.
    for (vm, after) in s.wait_ready(started) {
        println!("{vm} ready (agent's hello answered) after {after:.2?}");
    }
    assert!(
        s.log("vmd").contains("vfio interrupts"),
        "the doorbell VM's agent is not on interrupts:\n{}",
        s.log("vmd")
    );
    let (_, vms) = s.call("GET", "/v1/vms", None);
    for vm in vms["vms"].as_array().expect("vms") {
        assert!(vm["agent_generation"].as_u64().is_some(), "{vm}");
        assert!(
            vm["agent_software"]
                .as_str()
                .is_some_and(|sw| sw.contains("portless")),
            "{vm}"
        );
    }

    // One command on each VM.
    for vm in ["vmd", "vmp"] {
        let t = Instant::now();
        let execs = s.exec(vm, "uname");
        assert_eq!(execs.len(), 1);
        assert_eq!(execs[0]["vm"], vm);
        let out = s.succeeded(&execs[0]);
        println!("{vm}: uname in {:.1?}: {}", t.elapsed(), out.trim_end());
        assert!(out.starts_with("Linux portless-guest "), "{vm}: {out:?}");
    }

    // Fan-out to both.
    let t = Instant::now();
    let execs = s.exec("*", "uname");
    let mut seen: Vec<String> = execs
        .iter()
        .map(|e| e["vm"].as_str().unwrap_or("").to_owned())
        .collect();
    seen.sort();
    assert_eq!(seen, ["vmd", "vmp"]);
    for e in &execs {
        let out = s.succeeded(e);
        assert!(out.contains("Linux"), "{}: {out:?}", e["vm"]);
    }
    println!("fan-out of uname to both: {:.1?}", t.elapsed());
    let (_, list) = s.call("GET", "/v1/executions?state=succeeded", None);
    assert_eq!(
        list["executions"].as_array().map(Vec::len),
        Some(4),
        "{list}"
    );

    // Ping and metrics.
    for vm in ["vmd", "vmp"] {
        let mut rtts = Vec::new();
        for _ in 0..5 {
            let (status, p) = s.call("POST", &format!("/v1/vms/{vm}/ping"), None);
            assert_eq!(status, 200, "{p}");
            rtts.push(p["rtt_us"].as_u64().expect("rtt_us"));
        }
        println!("{vm}: ping rtt_us {rtts:?}");
        let (status, m) = s.call("GET", &format!("/v1/vms/{vm}/metrics"), None);
        assert_eq!(status, 200, "{m}");
        let m = &m["metrics"];
        println!(
            "{vm}: metrics: uptime {} ms, mem {} of {} KiB available, {} processes, agent rss {} KiB",
            m["uptime_ms"],
            m["mem_available_kib"],
            m["mem_total_kib"],
            m["processes"],
            m["agent_rss_kib"]
        );
        let total = m["mem_total_kib"].as_u64().unwrap_or(0);
        assert!(total > 100_000 && total <= 256 * 1024, "{m}");
        assert!(m["mem_available_kib"].as_u64().unwrap_or(0) <= total, "{m}");
        assert!(m["uptime_ms"].as_u64().unwrap_or(0) > 1000, "{m}");
        assert!(m["processes"].as_u64().unwrap_or(0) > 1, "{m}");
        assert!(m["agent_rss_kib"].as_u64().unwrap_or(0) > 0, "{m}");
    }

    // Idle: the doorbell VM's driver sleeps until rung (or its tick); the plain one polls,
    // backing off once the agent has been quiet for a second.
    std::thread::sleep(Duration::from_millis(1500));
    let (vmd, vmp) = (s.pid("vmd").to_string(), s.pid("vmp").to_string());
    let before = (
        common::cpu_time(),
        common::cpu_time_of(&vmd),
        common::cpu_time_of(&vmp),
    );
    std::thread::sleep(Duration::from_secs(3));
    let used = common::cpu_time() - before.0;
    let qemu_d = common::cpu_time_of(&vmd) - before.1;
    let qemu_p = common::cpu_time_of(&vmp) - before.2;
    println!(
        "idle 3 s: daemon (this process) {used:?} of CPU; QEMU of vmd (interrupts) {qemu_d:?}, \
         of vmp (polling guest) {qemu_p:?}"
    );
    assert!(
        used < Duration::from_millis(300),
        "idle daemon used {used:?} of CPU in 3 s"
    );
    let (_, vms) = s.call("GET", "/v1/vms", None);
    for vm in vms["vms"].as_array().expect("vms") {
        assert_eq!(vm["state"], "ready", "still ready after idling: {vm}");
    }

    // After the idle spell the doorbell VM's agent sleeps in the kernel (its idle tick is a
    // second): a quick answer means the daemon rang it and it rang back.
    for vm in ["vmd", "vmp"] {
        let (status, p) = s.call("POST", &format!("/v1/vms/{vm}/ping"), None);
        assert_eq!(status, 200, "{p}");
        println!("{vm}: ping after idle: rtt_us {}", p["rtt_us"]);
        if vm == "vmd" {
            assert!(
                p["rtt_us"].as_u64().is_some_and(|us| us < 400_000),
                "woken by its tick, not the doorbell: {p}"
            );
        }
    }
}

#[test]
#[ignore = "boots two VMs; needs PORTLESS_VM_DIR (cargo xtask test runs it)"]
fn a_daemon_restart_loses_nothing_of_a_running_doorbell_vm() {
    let started = Instant::now();
    let mut s = Setup::start("host-vm-restart");
    s.wait_ready(started);
    let (status, body) = s.call(
        "POST",
        "/v1/exec",
        Some(serde_json::json!({"target": "vmd,vmp", "command": "sleep", "args": ["3"]})),
    );
    assert_eq!(status, 200, "{body}");
    let ids: Vec<Value> = body["executions"]
        .as_array()
        .expect("executions")
        .iter()
        .map(|e| e["id"].clone())
        .collect();
    assert_eq!(ids.len(), 2, "{body}");
    // The daemon goes away while both run, and comes back: QEMU (and its memory) kept going.
    s.stop_daemon();
    s.start_daemon();
    for id in &ids {
        let rec = s.wait(id);
        assert_eq!(rec["state"], "succeeded", "{rec}\n{}", s.logs());
    }
    // And both VMs take new work (the doorbell VM by polling until its QEMU reconnects).
    for e in s.exec("vmd,vmp", "uname") {
        let out = s.succeeded(&e);
        assert!(out.starts_with("Linux"), "{out}");
    }
}

/// What the image's `bytes COUNT` prints: `yes 0123…XYZ | head -c COUNT`.
fn pattern(count: usize) -> Vec<u8> {
    let line = b"0123456789abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ\n";
    line.iter().copied().cycle().take(count).collect()
}

#[test]
#[ignore = "boots two VMs; needs PORTLESS_VM_DIR (cargo xtask test runs it)"]
fn commands_end_as_they_should_on_both_wakeup_modes() {
    let started = Instant::now();
    let s = Setup::start("host-vm-outcomes");
    s.wait_ready(started);
    for vm in ["vmd", "vmp"] {
        let t = Instant::now();
        // Long ones first, so that they run while the others are checked.
        let timed = s.start_one(vm, "sleep", &["30"], Some(1000));
        let cancel = s.start_one(vm, "sleep", &["600"], None);

        // Not in the guest's allow-list, and bad arguments: refused by the agent.
        for (command, args) in [
            ("no-such-command", &[][..]),
            ("sleep", &["0"][..]),
            ("sleep", &["abc"][..]),
        ] {
            let d = s.start_one(vm, command, args, None);
            let state = if d["id"].is_u64() {
                s.wait(&d["id"])["state"].clone()
            } else {
                d["state"].clone()
            };
            assert_eq!(state, "rejected", "{vm}: {command} {args:?}: {d}");
        }

        // Exit codes.
        let rec = s.ends(&s.start_one(vm, "fail", &[], None), "failed");
        assert_eq!(rec["exit_code"], 3, "{vm}: {rec}");
        assert_eq!(s.output(&rec["id"], "stderr"), b"failing on purpose\n");
        let rec = s.ends(&s.start_one(vm, "uname", &[], None), "succeeded");
        assert_eq!(rec["exit_code"], 0, "{vm}: {rec}");

        // Cancel, then the timeout (1 s, long past by now).
        let (status, body) = s.call(
            "POST",
            &format!("/v1/executions/{}/cancel", cancel["id"]),
            None,
        );
        assert!(status == 200 || status == 202, "{status}: {body}");
        s.ends(&cancel, "cancelled");
        s.ends(&timed, "timed_out");
        println!(
            "{vm}: rejected, failed, succeeded, cancelled, timed out in {:.1?}",
            t.elapsed()
        );
    }

    // Large output, byte for byte, through the doorbell VM.
    const N: usize = 16 << 20;
    let t = Instant::now();
    let rec = s.ends(
        &s.start_one("vmd", "bytes", &[&N.to_string()], None),
        "succeeded",
    );
    let took = t.elapsed();
    assert_eq!(rec["stdout"]["total_len"], N, "{rec}");
    let out = s.output(&rec["id"], "stdout");
    assert_eq!(out.len(), N);
    assert!(
        out == pattern(N),
        "vmd: 16 MiB of output differs from the pattern"
    );
    println!(
        "vmd: 16 MiB of output in {took:.1?} ({:.1} MiB/s)",
        16.0 / took.as_secs_f64()
    );
}

#[test]
#[ignore = "boots two VMs; needs PORTLESS_VM_DIR (cargo xtask test runs it)"]
fn an_agent_restart_and_a_vm_reset_lose_running_executions() {
    let started = Instant::now();
    let s = Setup::start("host-vm-lost");
    s.wait_ready(started);
    let vm = "vmd";

    // The agent restarts inside the guest.
    let old = s.vm(vm)["agent_generation"].clone();
    let sleeping = s.start_one(vm, "sleep", &["600"], None);
    let t = Instant::now();
    let restart = s.start_one(vm, "restart-agent", &[], None);
    s.ends(&sleeping, "agent_lost");
    let new = s.wait_new_generation(vm, &old);
    println!(
        "{vm}: agent restarted (generation {old} -> {new}) in {:.1?}",
        t.elapsed()
    );
    let rec = s.wait(&restart["id"]);
    println!("{vm}: restart-agent itself ended {}", rec["state"]);
    let out = s.succeeded(&s.exec(vm, "uname")[0]);
    assert!(out.starts_with("Linux"), "{out}");

    // The VM resets.
    let old = new;
    let sleeping = s.start_one(vm, "sleep", &["600"], None);
    let t = Instant::now();
    s.monitor(vm, "system_reset");
    s.ends(&sleeping, "agent_lost");
    let new = s.wait_new_generation(vm, &old);
    println!(
        "{vm}: back after a reset (generation {old} -> {new}) in {:.1?}",
        t.elapsed()
    );
    let boots = s.log(vm).matches("init: starting portless-agent").count();
    assert_eq!(boots, 2, "the guest did not boot again:\n{}", s.log(vm));
    let out = s.succeeded(&s.exec(vm, "uname")[0]);
    assert!(out.starts_with("Linux"), "{out}");
}
