//! The VM driver against the real `portless-agent` over a shared file (a plain channel):
//! lifecycle, exec with output into the records, rejections, ping, metrics, the command
//! cache, cancel, push, agent restarts (`agent_lost`) and undeliverable requests.

mod common;

use std::path::PathBuf;
use std::process::{Child, Command, Stdio};
use std::sync::Arc;
use std::time::{Duration, Instant};

use host_shim::records::{
    ExecState, ExecutionId, NewExecution, Records, Retention, Stream, Writer,
};
use host_shim::vm::memory::GuestRegion;
use host_shim::vm::{self, ChannelKind, Request, VmError, VmEvent, VmHandle, VmSettings, VmState};
use ring_protocol::message::{ArgProblem, Rejection};
use tokio::sync::{broadcast, oneshot};

const CONFIG: &str = r#"
[agent]
kill_grace_ms = 300

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
charset = "a-z"
max_len = 20

[[command]]
name = "fail"
program = "/bin/sh"
args = ["-c", "echo oops >&2; exit 4"]

[[command]]
name = "sleep"
program = "/bin/sleep"
args = ["30"]
"#;

struct Setup {
    dir: PathBuf,
    records: Arc<Records>,
    vm: VmHandle,
    events: broadcast::Receiver<VmEvent>,
    agent: Option<Child>,
    _thread: std::thread::JoinHandle<()>,
    _writer: Writer,
    _writer_thread: std::thread::JoinHandle<()>,
}

impl Setup {
    fn new(name: &str, delivery: Duration) -> Self {
        let dir = PathBuf::from(env!("CARGO_TARGET_TMPDIR"))
            .join(format!("{name}-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        std::fs::create_dir_all(&dir).expect("dir");
        let region = dir.join("region");
        std::fs::File::create(&region)
            .expect("create")
            .set_len(1 << 20)
            .expect("size");
        std::fs::write(
            dir.join("allow-list.toml"),
            CONFIG.replace("PUSHDIR", &dir.join("push").display().to_string()),
        )
        .expect("config");
        let records = Arc::new(Records::open(&dir.join("state"), 1 << 20).expect("records"));
        let (tx, events) = broadcast::channel(1024);
        let settings = VmSettings {
            heartbeat_timeout: Duration::from_secs(3),
            lost_after: Duration::from_secs(10),
            delivery_timeout: delivery,
            reset_timeout: Duration::from_secs(2),
            ..VmSettings::new("vm1")
        };
        let memory = GuestRegion::open(&region).expect("map");
        let (writer, writer_thread) = Writer::start(
            records.clone(),
            Retention::default(),
            Duration::from_secs(60),
        )
        .expect("writer");
        let (vm, thread) =
            vm::spawn(settings, ChannelKind::Plain(memory), writer.clone(), tx).expect("driver");
        Self {
            dir,
            records,
            vm,
            events,
            agent: None,
            _thread: thread,
            _writer: writer,
            _writer_thread: writer_thread,
        }
    }

    fn start_agent(&mut self) {
        let log = std::fs::File::create(self.dir.join("agent.log")).expect("log");
        self.agent = Some(
            Command::new(common::agent_binary())
                .arg("--cgroup")
                .arg("off")
                .arg("--shm-file")
                .arg(self.dir.join("region"))
                .arg("--config")
                .arg(self.dir.join("allow-list.toml"))
                .stderr(log)
                .stdout(Stdio::null())
                .spawn()
                .expect("start agent"),
        );
    }

    fn wait_ready(&self) {
        let deadline = Instant::now() + Duration::from_secs(10);
        while self.vm.status().state != VmState::Ready {
            assert!(
                Instant::now() < deadline,
                "agent never ready: {:?}",
                self.vm.status()
            );
            std::thread::sleep(Duration::from_millis(5));
        }
    }

    fn exec(&self, command: &str, args: &[&str]) -> (ExecutionId, Result<(), VmError>) {
        let id = self
            .records
            .create_execution(&NewExecution {
                principal: "test".into(),
                vm: "vm1".into(),
                command: command.into(),
                args: args.iter().map(|s| s.to_string()).collect(),
                requested_at_ms: 0,
                fleet_invocation: None,
            })
            .expect("record");
        let (reply, rx) = oneshot::channel();
        self.vm
            .request(Request::Exec {
                id,
                command: command.into(),
                args: args.iter().map(|s| s.to_string()).collect(),
                timeout_ms: None,
                reply,
            })
            .expect("queued");
        (id, rx.blocking_recv().expect("answered"))
    }

    fn wait_final(&self, id: ExecutionId) -> host_shim::records::ExecutionRecord {
        let deadline = Instant::now() + Duration::from_secs(20);
        loop {
            let rec = self.records.execution(id).expect("read").expect("exists");
            if rec.state.is_final() {
                return rec;
            }
            assert!(Instant::now() < deadline, "never finished: {rec:?}");
            std::thread::sleep(Duration::from_millis(5));
        }
    }

    fn output(&self, id: ExecutionId, stream: Stream) -> Vec<u8> {
        self.records
            .read_output(id, stream, 0, usize::MAX)
            .expect("read")
            .data
    }
}

impl Drop for Setup {
    fn drop(&mut self) {
        if let Some(mut a) = self.agent.take() {
            let _ = a.kill();
            let _ = a.wait();
        }
    }
}

#[test]
fn exec_output_rejections_and_queries() {
    let mut s = Setup::new("driver-basic", Duration::from_secs(10));
    assert_eq!(s.vm.status().state, VmState::WaitingForAgent);
    s.start_agent();
    s.wait_ready();
    let (id, r) = s.exec("echo", &["hello"]);
    r.expect("accepted");
    let rec = s.wait_final(id);
    assert_eq!(rec.state, ExecState::Succeeded);
    assert_eq!(s.output(id, Stream::Stdout), b"hello\n");
    let (id, r) = s.exec("fail", &[]);
    r.expect("accepted");
    let rec = s.wait_final(id);
    assert_eq!((rec.state, rec.exit_code), (ExecState::Failed, Some(4)));
    assert_eq!(s.output(id, Stream::Stderr), b"oops\n");
    // Refused by the guest: recorded as such.
    let (id, r) = s.exec("echo", &["NOT-lowercase"]);
    assert_eq!(
        r,
        Err(VmError::Rejected(Rejection::InvalidArgument {
            index: 0,
            problem: ArgProblem::BadCharacter
        }))
    );
    assert_eq!(
        s.records
            .execution(id)
            .expect("read")
            .expect("exists")
            .state,
        ExecState::Rejected
    );
    let (_, r) = s.exec("reboot", &[]);
    assert_eq!(r, Err(VmError::Rejected(Rejection::UnknownCommand)));
    // Ping, metrics, commands.
    let (reply, rx) = oneshot::channel();
    s.vm.request(Request::Ping { reply }).expect("queued");
    let rtt = rx.blocking_recv().expect("answered").expect("pong");
    assert!(rtt < Duration::from_secs(1));
    let (reply, rx) = oneshot::channel();
    s.vm.request(Request::Metrics { reply }).expect("queued");
    let m = rx.blocking_recv().expect("answered").expect("metrics");
    assert!(m.mem_total_kib > 0);
    assert_eq!(
        (m.agent.executions, m.agent.rejections),
        (2, 2),
        "two ran, two were refused"
    );
    let (reply, rx) = oneshot::channel();
    s.vm.request(Request::Commands { reply }).expect("queued");
    let list = rx.blocking_recv().expect("answered").expect("list");
    let names: Vec<_> = list.commands.iter().map(|c| c.name.as_str()).collect();
    assert_eq!(names, ["echo", "fail", "sleep"]);
    let _ = s.events.try_recv();
}

#[test]
fn cancel_and_push() {
    let mut s = Setup::new("driver-cancel", Duration::from_secs(10));
    s.start_agent();
    s.wait_ready();
    let (id, r) = s.exec("sleep", &[]);
    r.expect("accepted");
    let (reply, rx) = oneshot::channel();
    s.vm.request(Request::Cancel { id, reply }).expect("queued");
    rx.blocking_recv().expect("answered").expect("sent");
    assert_eq!(s.wait_final(id).state, ExecState::Cancelled);

    let run = s
        .records
        .create_execution(&NewExecution {
            principal: "test".into(),
            vm: "vm1".into(),
            command: "push:fix.sh".into(),
            args: vec![],
            requested_at_ms: 0,
            fleet_invocation: None,
        })
        .expect("record");
    let (reply, rx) = oneshot::channel();
    s.vm.request(Request::Push {
        name: "fix.sh".into(),
        program: host_shim::vm::Program::from_bytes(b"#!/bin/sh\necho fixed\n").expect("program"),
        run: Some(run),
        timeout_ms: None,
        ticket: 1,
        reply,
    })
    .expect("queued");
    let outcome = rx.blocking_recv().expect("answered").expect("pushed");
    assert!(
        matches!(outcome, ring_protocol::message::PushOutcome::Started(_)),
        "{outcome:?}"
    );
    assert_eq!(s.wait_final(run).state, ExecState::Succeeded);
    assert_eq!(s.output(run, Stream::Stdout), b"fixed\n");
}

#[test]
fn an_agent_restart_ends_running_executions_as_agent_lost() {
    let mut s = Setup::new("driver-restart", Duration::from_secs(10));
    s.start_agent();
    s.wait_ready();
    let generation = s.vm.status().agent_generation;
    let (id, r) = s.exec("sleep", &[]);
    r.expect("accepted");
    let mut agent = s.agent.take().expect("running");
    agent.kill().expect("kill");
    agent.wait().expect("reaped");
    s.start_agent();
    let rec = s.wait_final(id);
    assert_eq!(rec.state, ExecState::AgentLost);
    s.wait_ready();
    assert_ne!(s.vm.status().agent_generation, generation);
    assert_eq!(s.vm.status().agent_restarts, 1);
    let (id, r) = s.exec("echo", &["again"]);
    r.expect("accepted");
    assert_eq!(s.wait_final(id).state, ExecState::Succeeded);
}

#[test]
fn requests_to_an_absent_agent_are_undeliverable() {
    let s = Setup::new("driver-undeliverable", Duration::from_millis(300));
    let (id, r) = s.exec("echo", &["x"]);
    assert_eq!(r, Err(VmError::Undeliverable));
    assert_eq!(
        s.records
            .execution(id)
            .expect("read")
            .expect("exists")
            .state,
        ExecState::Undeliverable
    );
}
