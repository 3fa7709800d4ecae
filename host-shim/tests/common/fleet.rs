//! A fleet for the tests: a real PostgreSQL (started here), two control-plane servers
//! (`portless control`) on one database and three host daemons (`portless serve` with
//! `[fleet]`: host1 and host2 `role=web`, host3 `role=db`), each with two VMs and real
//! agents. Principal `ops` (token [`TOKEN`]) may do everything; `viewer` (token
//! [`VIEWER_TOKEN`]) sees the `role=db` VMs only, runs `echo` only, and may not read the
//! audit log.
#![allow(dead_code, unreachable_pub)]

use std::net::TcpListener;
use std::path::PathBuf;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use portless_api::blocking::Client;
use portless_api::{Endpoint, ExecRequest, ExecState, ExecutionId, ExecutionRecord, Stream};
use sha2::Digest;

use super::stack::{Stack, portless_binary};

/// The token of principal `ops`.
pub const TOKEN: &str = "fleet-test-token";
/// The token of principal `viewer`.
pub const VIEWER_TOKEN: &str = "fleet-viewer-token";

/// The fleet, stopped when dropped.
pub struct Fleet {
    pub dir: PathBuf,
    pub pg: pg_harness::Server,
    /// Two control-plane servers on one database, and their addresses.
    pub controls: Vec<Child>,
    pub addrs: Vec<String>,
    /// Which server the next client talks to: they alternate.
    pub turn: std::cell::Cell<usize>,
    pub hosts: Vec<Stack>,
}

pub fn free_port() -> u16 {
    TcpListener::bind("127.0.0.1:0")
        .and_then(|l| l.local_addr())
        .expect("port")
        .port()
}

impl Fleet {
    /// Starts the fleet in a directory named after `name`, the control planes on a
    /// database just migrated, and waits for every agent.
    pub fn start(name: &str) -> Self {
        let dir = PathBuf::from(env!("CARGO_TARGET_TMPDIR"))
            .join(format!("{name}-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        std::fs::create_dir_all(&dir).expect("dir");
        let pg = pg_harness::Server::start(&dir.join("pg")).expect("postgresql");
        pg.psql("postgres", "CREATE DATABASE fleet")
            .expect("create database");
        let url = pg.url("fleet");
        let hash = hex::encode(sha2::Sha256::digest(TOKEN.as_bytes()));
        let viewer = hex::encode(sha2::Sha256::digest(VIEWER_TOKEN.as_bytes()));
        let addrs: Vec<String> = (0..2)
            .map(|_| format!("127.0.0.1:{}", free_port()))
            .collect();
        for (i, addr) in addrs.iter().enumerate() {
            std::fs::write(
                dir.join(format!("control{i}.toml")),
                format!(
                    "[control]\nlisten = \"{addr}\"\ndatabase = \"{url}\"\ndelivery_timeout_s = 6\n\
                     host_offline_after_ms = 1500\nhost_lost_after_ms = 3000\nsweep_interval_ms = 200\n\n\
                     [[principal]]\nname = \"ops\"\ntoken_sha256 = \"{hash}\"\nvms = [\"*\"]\n\
                     commands = [\"*\"]\npush = true\naudit = true\nread_all = true\ncancel_all = true\n\n\
                     [[principal]]\nname = \"viewer\"\ntoken_sha256 = \"{viewer}\"\n\
                     vms = [\"role=db\"]\ncommands = [\"echo\"]\n"
                ),
            )
            .expect("control.toml");
        }
        let mut fleet = Self {
            dir,
            pg,
            controls: Vec::new(),
            addrs,
            turn: std::cell::Cell::new(0),
            hosts: Vec::new(),
        };
        // A server refuses to start on a database without the schema.
        let out = fleet
            .control_cmd(0, &["control", "--config"])
            .output()
            .expect("control");
        assert!(!out.status.success());
        assert!(
            String::from_utf8_lossy(&out.stderr).contains("portless control migrate"),
            "{}",
            String::from_utf8_lossy(&out.stderr)
        );
        let out = fleet
            .control_cmd(0, &["control", "migrate", "--config"])
            .output()
            .expect("migrate");
        assert!(
            out.status.success(),
            "{}",
            String::from_utf8_lossy(&out.stderr)
        );
        // Migrating again applies nothing.
        let out = fleet
            .control_cmd(1, &["control", "migrate", "--config"])
            .output()
            .expect("migrate");
        assert!(String::from_utf8_lossy(&out.stdout).contains("up to date"));
        fleet.start_control(0);
        fleet.start_control(1);
        for (i, labels) in [
            (1, "role = \"web\""),
            (2, "role = \"web\""),
            (3, "role = \"db\""),
        ] {
            let host = format!("host{i}");
            let extra = format!(
                "\n[fleet]\ndatabase = \"{url}\"\nhost = \"{host}\"\nprincipal = \"ops\"\n\
                 lease_ms = 1500\nheartbeat_ms = 250\nlabels = {{ {labels} }}\n"
            );
            let mut stack = Stack::new(&format!("{name}-{host}"), &["vm1", "vm2"], &extra);
            // Guests that take pushes.
            let guest = stack.dir.join("guest-push");
            std::fs::write(
                stack.dir.join("agent.toml"),
                format!(
                    "[push]\nenabled = true\ndir = \"{}\"\n{}",
                    guest.display(),
                    super::stack::AGENT_CONFIG
                ),
            )
            .expect("agent.toml");
            stack.start_daemon();
            stack.start_agent("vm1");
            stack.start_agent("vm2");
            stack.wait_ready("vm1", Duration::from_secs(20));
            stack.wait_ready("vm2", Duration::from_secs(20));
            fleet.hosts.push(stack);
        }
        fleet
    }

    pub fn control_cmd(&self, i: usize, args: &[&str]) -> Command {
        let mut c = Command::new(portless_binary());
        c.args(args).arg(self.dir.join(format!("control{i}.toml")));
        c
    }

    pub fn start_control(&mut self, i: usize) {
        let log = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(self.dir.join(format!("control{i}.log")))
            .expect("log");
        let child = self
            .control_cmd(i, &["control", "--config"])
            .stdout(Stdio::null())
            .stderr(log)
            .spawn()
            .expect("portless control");
        self.controls.push(child);
        let deadline = Instant::now() + Duration::from_secs(20);
        while std::net::TcpStream::connect(&self.addrs[i]).is_err() {
            assert!(
                Instant::now() < deadline,
                "the control plane never listened"
            );
            std::thread::sleep(Duration::from_millis(20));
        }
    }

    /// A client of one of the two servers, the other one next time.
    pub fn client(&self) -> Client {
        let i = self.turn.get();
        self.turn.set(i + 1);
        Client::at(Endpoint::Tcp(self.addrs[i % 2].clone()))
            .expect("client")
            .with_token(TOKEN)
    }

    /// Waits until the control plane lists `n` VMs, all ready.
    pub fn wait_registered(&self, n: usize) {
        let deadline = Instant::now() + Duration::from_secs(30);
        loop {
            let vms = self.client().vms().expect("vms");
            if vms.len() == n && vms.iter().all(|v| v.state == portless_api::VmState::Ready) {
                return;
            }
            assert!(Instant::now() < deadline, "vms never registered: {vms:?}");
            std::thread::sleep(Duration::from_millis(100));
        }
    }

    pub fn exec(&self, target: &str, command: &str, args: &[&str]) -> portless_api::ExecResponse {
        self.client()
            .exec(&ExecRequest {
                target: target.into(),
                command: command.into(),
                args: args.iter().map(|a| (*a).to_owned()).collect(),
                timeout_ms: None,
                max_concurrency: None,
                max_errors: None,
                idempotency_key: None,
            })
            .expect("exec")
    }

    pub fn wait_final(&self, id: ExecutionId) -> ExecutionRecord {
        let deadline = Instant::now() + Duration::from_secs(60);
        loop {
            let r = self.client().wait(id, Some(5000)).expect("wait");
            if r.state.is_final() {
                return r;
            }
            assert!(Instant::now() < deadline, "never ended: {r:?}");
        }
    }

    pub fn wait_state(&self, id: ExecutionId, state: ExecState) {
        let deadline = Instant::now() + Duration::from_secs(30);
        loop {
            let r = self.client().execution(id).expect("execution");
            if r.state == state {
                return;
            }
            assert!(Instant::now() < deadline, "never {state}: {r:?}");
            std::thread::sleep(Duration::from_millis(50));
        }
    }

    pub fn output(&self, id: ExecutionId) -> Vec<u8> {
        self.client()
            .output(id, Stream::Stdout, 0, None)
            .expect("output")
            .data
    }

    pub fn sql(&self, query: &str) -> String {
        self.pg
            .psql("fleet", query)
            .expect("psql")
            .trim()
            .to_owned()
    }
}

impl Drop for Fleet {
    fn drop(&mut self) {
        for c in &mut self.controls {
            let _ = c.kill();
            let _ = c.wait();
        }
    }
}

/// Executions of the host's own records that carry out fleet invocations.
pub fn local_count(stack: &Stack, command: &str) -> usize {
    let (status, body) = stack.call(
        "GET",
        &format!("/v1/executions?command={command}&limit=1000"),
        None,
    );
    assert_eq!(status, 200, "{body}");
    body["executions"].as_array().map_or(0, Vec::len)
}
