//! `portless serve` with real agents over shared files, driven through its HTTP API on the
//! unix socket: VM list, exec on one VM and fan-out, output, follow, cancel, push, ping,
//! metrics, policy denials with their audit entries, bad requests, and a daemon restart
//! while an execution runs.

mod common;

use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use serde_json::{Value, json};

const AGENT_CONFIG: &str = r#"
[agent]
max_running = 16

[push]
enabled = true
dir = "PUSHDIR"

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
name = "fail"
program = "/bin/sh"
args = ["-c", "echo bad >&2; exit 3"]

[[command]]
name = "slow"
program = "/bin/sh"
args = ["-c", "sleep 1; echo done"]

[[command]]
name = "sleep"
program = "/bin/sleep"
args = ["30"]

[[command]]
name = "secret"
program = "/bin/true"
"#;

/// A daemon (in a thread of this test) with two plain VMs and their agents.
struct Daemon {
    dir: PathBuf,
    socket: PathBuf,
    daemon: Option<common::InProcessDaemon>,
    agents: Vec<(String, Child)>,
}

fn host_config(dir: &Path, vms: usize) -> String {
    // SAFETY: `getuid` has no preconditions.
    let uid = unsafe { libc::getuid() };
    let mut vm_tables = String::new();
    for n in 1..=vms {
        let role = if n == 1 { "web" } else { "db" };
        vm_tables.push_str(&format!(
            "\n[[vm]]\nname = \"vm{n}\"\nlabels = {{ role = \"{role}\" }}\nchannel = \"plain\"\npath = \"{}/vm{n}.region\"\n",
            dir.display()
        ));
    }
    format!(
        r#"
[daemon]
socket = "{dir}/portless.sock"
state_dir = "{dir}/state"
delivery_timeout_ms = 3000
heartbeat_timeout_ms = 500
{vm_tables}

[[principal]]
name = "ops"
uids = [{uid}]
vms = ["*"]
commands = ["echo", "fail", "slow", "sleep"]
push = true
audit = true
"#,
        dir = dir.display()
    )
}

impl Daemon {
    fn raw(&self, method: &str, path: &str, body: Option<&[u8]>) -> (u16, Vec<u8>) {
        common::http(&self.socket, method, path, body)
    }

    fn call(&self, method: &str, path: &str, body: Option<Value>) -> (u16, Value) {
        common::call(&self.socket, method, path, body)
    }

    fn start(name: &str) -> Self {
        Self::start_with(name, 2)
    }

    fn start_with(name: &str, vms: usize) -> Self {
        let dir = PathBuf::from(env!("CARGO_TARGET_TMPDIR"))
            .join(format!("{name}-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        std::fs::create_dir_all(&dir).expect("dir");
        std::fs::write(dir.join("host.toml"), host_config(&dir, vms)).expect("host.toml");
        std::fs::write(
            dir.join("agent.toml"),
            AGENT_CONFIG.replace("PUSHDIR", &dir.join("push").display().to_string()),
        )
        .expect("agent.toml");
        let mut d = Self {
            socket: dir.join("portless.sock"),
            dir,
            daemon: None,
            agents: Vec::new(),
        };
        d.start_server();
        for n in 1..=vms {
            d.start_agent(&format!("vm{n}"));
        }
        d.wait_ready();
        d
    }

    fn start_server(&mut self) {
        let config = host_shim::config::HostConfig::load(self.dir.join("host.toml"))
            .expect("valid host.toml");
        self.daemon = Some(common::InProcessDaemon::start_on(config));
    }

    fn stop_server(&mut self) {
        if let Some(mut d) = self.daemon.take() {
            d.stop();
        }
    }

    fn start_agent(&mut self, vm: &str) {
        let log = std::fs::File::create(self.dir.join(format!("{vm}.log"))).expect("log");
        self.agents.push((
            vm.to_owned(),
            Command::new(common::agent_binary())
                .arg("--cgroup")
                .arg("off")
                .arg("--shm-file")
                .arg(self.dir.join(format!("{vm}.region")))
                .arg("--config")
                .arg(self.dir.join("agent.toml"))
                .stderr(log)
                .stdout(Stdio::null())
                .spawn()
                .expect("agent"),
        ));
    }

    fn take_agent(&mut self, vm: &str) -> Child {
        let i = self
            .agents
            .iter()
            .position(|(n, _)| n == vm)
            .expect("agent of that vm");
        self.agents.remove(i).1
    }

    fn wait_ready(&self) {
        let deadline = Instant::now() + Duration::from_secs(15);
        loop {
            let (status, body) = self.call("GET", "/v1/vms", None);
            assert_eq!(status, 200, "{body}");
            let ready = body["vms"]
                .as_array()
                .is_some_and(|v| v.iter().all(|vm| vm["state"] == "ready"));
            if ready {
                return;
            }
            assert!(Instant::now() < deadline, "vms never ready: {body}");
            std::thread::sleep(Duration::from_millis(20));
        }
    }

    fn exec(&self, target: &str, command: &str, args: &[&str]) -> Value {
        let (status, body) = self.call(
            "POST",
            "/v1/exec",
            Some(json!({"target": target, "command": command, "args": args})),
        );
        assert_eq!(status, 200, "{body}");
        body
    }

    fn wait(&self, id: &Value) -> Value {
        let (status, body) = self.call(
            "GET",
            &format!("/v1/executions/{id}/wait?timeout_ms=20000"),
            None,
        );
        assert_eq!(status, 200, "{body}");
        body
    }
}

impl Drop for Daemon {
    fn drop(&mut self) {
        for (_, a) in &mut self.agents {
            let _ = a.kill();
            let _ = a.wait();
        }
        self.stop_server();
    }
}

#[test]
fn exec_output_fan_out_and_queries() {
    let d = Daemon::start("daemon-basic");
    let (_, vms) = d.call("GET", "/v1/vms", None);
    let names: Vec<_> = vms["vms"]
        .as_array()
        .expect("list")
        .iter()
        .map(|v| v["name"].clone())
        .collect();
    assert_eq!(names, [json!("vm1"), json!("vm2")]);
    assert_eq!(vms["vms"][0]["labels"]["role"], "web");

    let r = d.exec("vm1", "echo", &["hello"]);
    let id = r["executions"][0]["id"].clone();
    let rec = d.wait(&id);
    assert_eq!(rec["state"], "succeeded");
    assert_eq!(rec["exit_code"], 0);
    let (status, out) = d.raw("GET", &format!("/v1/executions/{id}/output"), None);
    assert_eq!((status, out.as_slice()), (200, &b"hello\n"[..]));

    let r = d.exec("vm1", "fail", &[]);
    let rec = d.wait(&r["executions"][0]["id"]);
    assert_eq!(
        (rec["state"].as_str(), rec["exit_code"].as_i64()),
        (Some("failed"), Some(3))
    );
    let (_, err) = d.raw(
        "GET",
        &format!(
            "/v1/executions/{}/output?stream=stderr",
            r["executions"][0]["id"]
        ),
        None,
    );
    assert_eq!(err, b"bad\n");

    // Fan-out by label and to all.
    let r = d.exec("role=db", "echo", &["db"]);
    assert_eq!(r["executions"].as_array().map(Vec::len), Some(1));
    assert_eq!(r["executions"][0]["vm"], "vm2");
    let r = d.exec("*", "echo", &["all"]);
    let execs = r["executions"].as_array().expect("list").clone();
    assert_eq!(execs.len(), 2);
    for e in &execs {
        assert_eq!(d.wait(&e["id"])["state"], "succeeded");
    }

    // Concurrency and error limits: one at a time, stop after the first failure.
    let (status, r) = d.call(
        "POST",
        "/v1/exec",
        Some(
            json!({"target": "vm1,vm2", "command": "fail", "max_concurrency": 1, "max_errors": 0}),
        ),
    );
    assert_eq!(status, 200, "{r}");
    assert_eq!(r["executions"].as_array().map(Vec::len), Some(1));
    assert_eq!(r["skipped"], json!(["vm2"]));

    // Rejected by the guest.
    let r = d.exec("vm1", "echo", &["UPPER"]);
    assert_eq!(r["executions"][0]["state"], "rejected");

    // Ping, metrics, commands.
    let (status, p) = d.call("POST", "/v1/vms/vm1/ping", None);
    assert_eq!(status, 200, "{p}");
    assert!(p["rtt_us"].as_u64().is_some());
    let (status, m) = d.call("GET", "/v1/vms/vm2/metrics", None);
    assert_eq!(status, 200, "{m}");
    assert!(m["metrics"]["mem_total_kib"].as_u64().unwrap_or(0) > 0);
    let (status, c) = d.call("GET", "/v1/vms/vm1/commands", None);
    assert_eq!(status, 200, "{c}");
    let names: Vec<_> = c["commands"]
        .as_array()
        .expect("list")
        .iter()
        .map(|c| c["name"].clone())
        .collect();
    assert_eq!(
        names,
        [
            json!("echo"),
            json!("fail"),
            json!("slow"),
            json!("sleep"),
            json!("secret")
        ]
    );
    assert_eq!(c["commands"][0]["params"][0]["kind"], "string");
}

#[test]
fn follow_cancel_and_push() {
    let d = Daemon::start("daemon-follow");
    let r = d.exec("vm1", "slow", &[]);
    let id = r["executions"][0]["id"].clone();
    let (status, body) = d.raw("GET", &format!("/v1/executions/{id}/follow"), None);
    assert_eq!(status, 200);
    let lines: Vec<Value> = String::from_utf8_lossy(&body)
        .lines()
        .map(|l| serde_json::from_str(l).expect("json line"))
        .collect();
    let last = lines.last().expect("lines");
    assert_eq!(last["type"], "end");
    assert_eq!(last["execution"]["state"], "succeeded");
    use base64::Engine as _;
    let data: Vec<u8> = lines
        .iter()
        .filter(|l| l["type"] == "output")
        .flat_map(|l| {
            base64::engine::general_purpose::STANDARD
                .decode(l["data"].as_str().unwrap_or(""))
                .expect("base64")
        })
        .collect();
    assert_eq!(data, b"done\n");

    let r = d.exec("vm2", "sleep", &[]);
    let id = r["executions"][0]["id"].clone();
    let (status, body) = d.call("POST", &format!("/v1/executions/{id}/cancel"), None);
    assert_eq!(status, 202, "{body}");
    assert_eq!(d.wait(&id)["state"], "cancelled");
    let (status, body) = d.call("POST", &format!("/v1/executions/{id}/cancel"), None);
    assert_eq!(status, 409, "cancel of an ended execution: {body}");

    let (status, p) = d.raw(
        "POST",
        "/v1/vms/vm1/push?name=fix.sh&run=true",
        Some(b"#!/bin/sh\necho patched\n"),
    );
    let p: Value = serde_json::from_slice(&p).expect("json");
    assert_eq!(status, 200, "{p}");
    assert_eq!(p["outcome"], "started");
    let rec = d.wait(&p["execution"]);
    assert_eq!(rec["state"], "succeeded");
    let (_, out) = d.raw(
        "GET",
        &format!("/v1/executions/{}/output", p["execution"]),
        None,
    );
    assert_eq!(out, b"patched\n");
}

#[test]
fn denials_bad_requests_and_the_audit_log() {
    let d = Daemon::start("daemon-policy");
    // The guest allows "secret", the host's policy does not.
    let (status, body) = d.call(
        "POST",
        "/v1/exec",
        Some(json!({"target": "vm1", "command": "secret"})),
    );
    assert_eq!(status, 403, "{body}");
    assert!(
        body["error"].as_str().unwrap_or("").contains("secret"),
        "{body}"
    );
    let (status, body) = d.call(
        "POST",
        "/v1/exec",
        Some(json!({"target": "nope", "command": "echo", "args": ["x"]})),
    );
    assert_eq!(status, 404, "{body}");
    assert!(
        body["error"].as_str().unwrap_or("").contains("nope"),
        "{body}"
    );
    let (status, body) = d.call("POST", "/v1/exec", Some(json!({"command": "echo"})));
    assert!(
        (400..500).contains(&status),
        "missing target: {status} {body}"
    );
    assert!(
        body["error"].as_str().is_some_and(|e| e.contains("target")),
        "JSON error: {body}"
    );
    let (status, body) = d.call("GET", "/v1/executions/abc", None);
    assert_eq!(status, 400);
    assert!(
        body["error"].is_string(),
        "a malformed id gets a JSON error: {body}"
    );
    let (status, body) = d.call("DELETE", "/v1/vms", None);
    assert_eq!(status, 405);
    assert!(
        body["error"].is_string(),
        "a wrong method gets a JSON error: {body}"
    );
    let (status, _) = d.call("GET", "/v1/executions/999999", None);
    assert_eq!(status, 404);
    let (status, _) = d.call("GET", "/v1/no/such/thing", None);
    assert_eq!(status, 404);
    let (status, log) = d.call("GET", "/v1/audit?allowed=false", None);
    assert_eq!(status, 200, "{log}");
    let denied: Vec<_> = log["entries"]
        .as_array()
        .expect("entries")
        .iter()
        .filter(|e| e["action"] == "exec")
        .collect();
    // The refused command, and the exec to an unknown vm (audited too, with its reason).
    assert_eq!(denied.len(), 2, "{log}");
    assert_eq!(denied[1]["principal"], "ops");
    assert_eq!(denied[1]["target"], "vm1:secret");
    assert_eq!(denied[0]["target"], "nope");
    assert_eq!(denied[0]["reason"], "unknown vm: \"nope\"");
}

#[test]
fn a_daemon_restart_during_an_execution_records_it_once() {
    let mut d = Daemon::start("daemon-restart");
    let r = d.exec("vm1", "slow", &[]);
    let id = r["executions"][0]["id"].clone();
    d.stop_server();
    d.start_server();
    let rec = d.wait(&id);
    assert_eq!(rec["state"], "succeeded", "{rec}");
    let (_, out) = d.raw("GET", &format!("/v1/executions/{id}/output"), None);
    assert_eq!(out, b"done\n");
    // And the daemon still works.
    let r = d.exec("vm2", "echo", &["after"]);
    assert_eq!(d.wait(&r["executions"][0]["id"])["state"], "succeeded");
}

#[test]
fn a_killed_agent_ends_its_executions_as_agent_lost() {
    let mut d = Daemon::start("daemon-agent-lost");
    // Killed and restarted: the new generation settles it at once.
    let r = d.exec("vm1", "sleep", &[]);
    let id = r["executions"][0]["id"].clone();
    let mut agent = d.take_agent("vm1");
    agent.kill().expect("kill");
    agent.wait().expect("reap");
    d.start_agent("vm1");
    let rec = d.wait(&id);
    assert_eq!(rec["state"], "agent_lost", "{rec}");
    d.wait_ready();
    let (_, vms) = d.call("GET", "/v1/vms", None);
    let vm1 = vms["vms"]
        .as_array()
        .expect("vms")
        .iter()
        .find(|v| v["name"] == "vm1")
        .cloned()
        .expect("vm1");
    assert_eq!(vm1["agent_restarts"], 1);
    // Killed for good: unresponsive, then lost once the heartbeat has been silent long enough.
    let r = d.exec("vm2", "sleep", &[]);
    let id = r["executions"][0]["id"].clone();
    let mut agent = d.take_agent("vm2");
    agent.kill().expect("kill");
    agent.wait().expect("reap");
    let rec = d.wait(&id);
    assert_eq!(rec["state"], "agent_lost", "{rec}");
    let (_, vms) = d.call("GET", "/v1/vms", None);
    let vm2 = vms["vms"]
        .as_array()
        .expect("vms")
        .iter()
        .find(|v| v["name"] == "vm2")
        .cloned()
        .expect("vm2");
    assert_eq!(vm2["state"], "unresponsive");
    // An exec to it now cannot be delivered.
    let r = d.exec("vm2", "echo", &["x"]);
    assert_eq!(r["executions"][0]["state"], "undeliverable", "{r}");
}

#[test]
fn hostile_region_contents_hurt_only_their_vm() {
    use std::os::unix::fs::FileExt;
    let d = Daemon::start("daemon-hostile");
    let region = std::fs::File::options()
        .write(true)
        .open(d.dir.join("vm2.region"))
        .expect("open");
    // Garbage over vm2's indices and frame data, as a hostile guest could write.
    let g2h_prod = ring_protocol::layout::offsets::G2H_PROD as u64;
    region
        .write_at(&0x7fff_fff0u32.to_le_bytes(), g2h_prod)
        .expect("write");
    region.write_at(&[0xff; 4096], 32 * 1024).expect("write");
    for k in 0..5 {
        let r = d.exec("vm1", "echo", &[&format!("still{k}")]);
        assert_eq!(d.wait(&r["executions"][0]["id"])["state"], "succeeded");
    }
    // vm2 recovers: reset, the agent attaches again, and runs commands.
    let deadline = Instant::now() + Duration::from_secs(20);
    loop {
        let r = d.exec("vm2", "echo", &["healed"]);
        if let Some(id) = r["executions"][0]["id"].as_u64()
            && d.wait(&json!(id))["state"] == "succeeded"
        {
            break;
        }
        assert!(Instant::now() < deadline, "vm2 never recovered: {r}");
        std::thread::sleep(Duration::from_millis(100));
    }
}

#[test]
fn a_thousand_executions_across_four_vms_are_all_accounted_for() {
    let d = Daemon::start_with("daemon-thousand", 4);
    let mut ids = Vec::new();
    for round in 0..250 {
        let word = format!("w{round}");
        let r = d.exec("*", "echo", &[&word]);
        for e in r["executions"].as_array().expect("executions") {
            ids.push((
                e["id"].clone(),
                e["vm"].as_str().unwrap_or("").to_owned(),
                word.clone(),
            ));
        }
        if round % 4 == 3 {
            // Keep the guests under their max_running.
            for (id, _, _) in ids.iter().rev().take(16) {
                d.wait(id);
            }
        }
    }
    assert_eq!(ids.len(), 1000);
    let mut per_vm = std::collections::BTreeMap::new();
    for (id, vm, word) in &ids {
        let rec = d.wait(id);
        assert_eq!(rec["state"], "succeeded", "{rec}");
        assert_eq!(rec["vm"].as_str(), Some(vm.as_str()));
        let (_, out) = d.raw("GET", &format!("/v1/executions/{id}/output"), None);
        assert_eq!(out, format!("{word}\n").into_bytes(), "execution {id}");
        *per_vm.entry(vm.clone()).or_insert(0) += 1;
    }
    assert_eq!(
        per_vm.values().copied().collect::<Vec<_>>(),
        [250, 250, 250, 250]
    );
    let (_, list) = d.call("GET", "/v1/executions?state=succeeded&limit=2000", None);
    assert_eq!(list["executions"].as_array().map(Vec::len), Some(1000));
}
