//! The fleet end to end: a real PostgreSQL (started by the test), a control plane
//! (`portless control`) and three host daemons (`portless serve` with `[fleet]`), each with
//! two VMs and real agents, driven through the control plane's API and the CLI.

mod common;

use std::path::PathBuf;
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use common::fleet::{Fleet, TOKEN, VIEWER_TOKEN, free_port, local_count};
use common::session::Session;
use common::stack::portless_binary;
use portless_api::blocking::Client;
use portless_api::{
    Endpoint, EventsRequest, ExecRequest, ExecState, ExecutionId, ExecutionRecord, Limit,
    StreamEvent,
};
use serde_json::{Value, json};
use sha2::Digest;

#[test]
fn a_fleet_runs_fans_out_and_survives_its_failures() {
    let mut fleet = Fleet::start("fleet");
    fleet.wait_registered(6);
    let client = fleet.client();
    let hosts = fleet.client().as_async().clone();
    let runtime = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .expect("runtime");
    let list = runtime.block_on(hosts.raw("GET", "/v1/hosts", &[], Vec::new()));
    let list: portless_api::HostList =
        serde_json::from_slice(&list.expect("hosts").body).expect("host list");
    let names: Vec<&str> = list.hosts.iter().map(|h| h.name.as_str()).collect();
    assert_eq!(names, ["host1", "host2", "host3"]);
    assert!(list.hosts.iter().all(|h| h.online && h.vms == 2));
    let commands = fleet.client().commands("host2/vm1").expect("commands");
    assert!(commands.commands.iter().any(|c| c.name == "sleep"));

    // Fan-out by label across two hosts, at most 2 at once: every invocation ends, every
    // byte arrives.
    let answer = client
        .exec(&ExecRequest {
            target: "role=web".into(),
            command: "echo".into(),
            args: vec!["hello".into()],
            timeout_ms: None,
            max_concurrency: Some(Limit::Count(2)),
            max_errors: None,
            idempotency_key: None,
        })
        .expect("exec");
    let vms: Vec<&str> = answer.executions.iter().map(|d| d.vm.as_str()).collect();
    assert_eq!(vms, ["host1/vm1", "host1/vm2", "host2/vm1", "host2/vm2"]);
    assert!(answer.command.is_some());
    for d in &answer.executions {
        let rec = fleet.wait_final(d.id.expect("id"));
        assert_eq!(rec.state, ExecState::Succeeded, "{rec:?}");
        assert_eq!(fleet.output(rec.id), b"hello\n");
    }

    // max_errors 0 with one at a time: the first failure stops the fan-out; the rest end
    // cancelled, not run.
    let answer = client
        .exec(&ExecRequest {
            target: "*".into(),
            command: "bytes".into(),
            args: vec!["3".into()],
            timeout_ms: None,
            max_concurrency: Some(Limit::Count(1)),
            max_errors: Some(Limit::Percent(0)),
            idempotency_key: None,
        })
        .expect("exec");
    let ends: Vec<ExecutionRecord> = answer
        .executions
        .iter()
        .map(|d| fleet.wait_final(d.id.expect("id")))
        .collect();
    let failed = ends.iter().filter(|r| r.state == ExecState::Failed).count();
    let cancelled = ends
        .iter()
        .filter(|r| r.state == ExecState::Cancelled)
        .count();
    assert_eq!((failed, cancelled), (1, 5), "{ends:?}");
    assert!(ends.iter().any(|r| {
        r.detail
            .as_deref()
            .is_some_and(|d| d.contains("max_errors"))
    }));
    let ran: usize = fleet.hosts.iter().map(|h| local_count(h, "bytes")).sum();
    assert_eq!(ran, 1, "only the first ran");

    // The same idempotency key twice: one command, the same executions.
    let keyed = ExecRequest {
        target: "host3/vm1".into(),
        command: "echo".into(),
        args: vec!["once".into()],
        timeout_ms: None,
        max_concurrency: None,
        max_errors: None,
        idempotency_key: Some("deploy-42".into()),
    };
    let first = fleet.client().exec(&keyed).expect("exec");
    // The same key on the other server: the database decides, not the server.
    let second = fleet.client().exec(&keyed).expect("exec again");
    assert_eq!(first.command, second.command);
    assert_eq!(first.executions[0].id, second.executions[0].id);
    let other = client.exec(&ExecRequest {
        args: vec!["twice".into()],
        ..keyed.clone()
    });
    assert_eq!(other.err().and_then(|e| e.status()), Some(409));
    fleet.wait_final(first.executions[0].id.expect("id"));
    assert_eq!(local_count(&fleet.hosts[2], "echo"), 1);

    // Cancel reaches the guest's process.
    let sleeper = fleet.exec("host1/vm1", "sleep", &["600"]).executions[0]
        .id
        .expect("id");
    fleet.wait_state(sleeper, ExecState::Running);
    client.cancel(sleeper).expect("cancel");
    let rec = fleet.wait_final(sleeper);
    assert_eq!(rec.state, ExecState::Cancelled, "{rec:?}");

    // Push by reference: uploaded once, fetched once by each host, run on every VM.
    let script = b"#!/bin/sh\necho pushed-by-reference\n".to_vec();
    let up = client
        .raw("POST", "/v1/programs", &[], script.clone())
        .expect("upload");
    assert_eq!(up.status, 201, "{}", String::from_utf8_lossy(&up.body));
    let program: portless_api::ProgramInfo = serde_json::from_slice(&up.body).expect("info");
    let push = portless_api::FleetPush {
        target: "*".into(),
        name: "fix.sh".into(),
        sha256: program.sha256.clone(),
        run: true,
        timeout_ms: None,
        // One at a time: the two agents of a stack share one push directory here, where
        // guests of real VMs each have their own.
        max_concurrency: Some(Limit::Count(1)),
        max_errors: None,
        idempotency_key: None,
    };
    let pushed = fleet
        .client()
        .raw(
            "POST",
            "/v1/push",
            &[("content-type", "application/json")],
            serde_json::to_vec(&push).expect("json"),
        )
        .expect("push");
    assert_eq!(
        pushed.status,
        200,
        "{}",
        String::from_utf8_lossy(&pushed.body)
    );
    let pushed: portless_api::ExecResponse = serde_json::from_slice(&pushed.body).expect("answer");
    assert_eq!(pushed.executions.len(), 6);
    for d in &pushed.executions {
        let rec = fleet.wait_final(d.id.expect("id"));
        assert_eq!(rec.state, ExecState::Succeeded, "{rec:?}");
        assert_eq!(fleet.output(rec.id), b"pushed-by-reference\n");
    }
    let fetches = fleet.sql(&format!(
        "SELECT string_agg(host || '=' || n, ',' ORDER BY host) FROM \
         (SELECT host, count(*) AS n FROM program_fetches WHERE sha256 = '{}' GROUP BY host) f",
        program.sha256
    ));
    assert_eq!(
        fetches, "host1=1,host2=1,host3=1",
        "each host fetched the program once"
    );
    // A push without run is stored, and ends succeeded.
    let stored = fleet
        .client()
        .raw(
            "POST",
            "/v1/push",
            &[("content-type", "application/json")],
            serde_json::to_vec(&portless_api::FleetPush {
                target: "host1/vm1".into(),
                run: false,
                name: "kept.sh".into(),
                ..push.clone()
            })
            .expect("json"),
        )
        .expect("push");
    let stored: portless_api::ExecResponse = serde_json::from_slice(&stored.body).expect("answer");
    let rec = fleet.wait_final(stored.executions[0].id.expect("id"));
    assert_eq!(rec.state, ExecState::Succeeded, "{rec:?}");
    assert!(fleet.hosts[0].dir.join("guest-push/kept.sh").exists());
    // `portless push` through the control plane, as to a daemon.
    let file = fleet.dir.join("cli.sh");
    std::fs::write(&file, "#!/bin/sh\necho from-the-cli\n").expect("script");
    let out = Command::new(portless_binary())
        .args([
            "--url",
            &format!("http://{}", fleet.addrs[0]),
            "push",
            "--run",
            "host2/vm2",
        ])
        .arg(&file)
        .env("PORTLESS_TOKEN", TOKEN)
        .output()
        .expect("cli push");
    assert!(
        out.status.success(),
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );

    // A host killed (SIGKILL) while its invocation runs, then restarted: it runs once, and
    // ends with its true state.
    let slow = fleet.exec("host2/vm1", "sleep", &["3"]).executions[0]
        .id
        .expect("id");
    fleet.wait_state(slow, ExecState::Running);
    fleet.hosts[1].kill_daemon();
    std::thread::sleep(Duration::from_millis(500));
    fleet.hosts[1].start_daemon();
    let rec = fleet.wait_final(slow);
    assert_eq!(rec.state, ExecState::Succeeded, "{rec:?}");
    assert_eq!(local_count(&fleet.hosts[1], "sleep"), 1, "ran once");

    // PostgreSQL restarted while output streams: nothing lost, no chunk twice.
    let big = fleet.exec("role=web", "bytes", &["2000000"]);
    std::thread::sleep(Duration::from_millis(300));
    fleet.pg.restart_immediate().expect("restart");
    for d in &big.executions {
        let id = d.id.expect("id");
        let rec = fleet.wait_final(id);
        assert_eq!(rec.exit_code, Some(2_000_000 % 7), "{rec:?}");
        let out = fleet.output(id);
        assert_eq!(out.len(), 2_000_000);
        assert!(out.iter().all(|&b| b == b'p'));
        let stored = fleet.sql(&format!(
            "SELECT COALESCE(SUM(length(data)), 0) FROM output WHERE invocation = {id} AND stream = 0"
        ));
        assert_eq!(stored, "2000000", "no chunk stored twice");
    }

    // A host stopped (SIGSTOP) past its lease: the sweeper ends its invocation host_lost,
    // and its late result is refused.
    let stalled = fleet.exec("host3/vm2", "sleep", &["2"]).executions[0]
        .id
        .expect("id");
    fleet.wait_state(stalled, ExecState::Running);
    let pid = fleet.hosts[2].daemon_pid() as i32;
    // SAFETY: `kill` takes plain values; the pid is a child of this test's stack.
    unsafe { libc::kill(pid, libc::SIGSTOP) };
    fleet.wait_state(stalled, ExecState::HostLost);
    // SAFETY: as above.
    unsafe { libc::kill(pid, libc::SIGCONT) };
    std::thread::sleep(Duration::from_secs(3));
    let rec = fleet.client().execution(stalled).expect("execution");
    assert_eq!(
        rec.state,
        ExecState::HostLost,
        "the newer outcome stands: {rec:?}"
    );

    // An offline host at submit time: delayed, then delivery_timed_out.
    fleet.hosts[2].stop_daemon();
    std::thread::sleep(Duration::from_secs(2));
    let late = fleet.exec("host3/vm1", "echo", &["late"]).executions[0].clone();
    assert_eq!(late.state, ExecState::Delayed);
    let rec = fleet.wait_final(late.id.expect("id"));
    assert_eq!(rec.state, ExecState::DeliveryTimedOut, "{rec:?}");

    // The CLI against the control plane, unchanged.
    let out = Command::new(portless_binary())
        .args([
            "--url",
            &format!("http://{}", fleet.addrs[1]),
            "exec",
            "--wait",
            "host1/vm2",
            "echo",
            "cli",
        ])
        .env("PORTLESS_TOKEN", TOKEN)
        .output()
        .expect("cli");
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );

    // Every call is on record, and an unknown token is refused and recorded.
    let bad = Client::at(Endpoint::Tcp(fleet.addrs[0].clone()))
        .expect("client")
        .with_token("wrong");
    assert_eq!(bad.vms().err().and_then(|e| e.status()), Some(401));
    let denied = fleet.sql("SELECT count(*) FROM audit WHERE NOT allowed AND principal IS NULL");
    assert!(denied.parse::<u32>().unwrap_or(0) >= 1);
    let _ = &mut fleet;
}

#[test]
fn a_control_plane_serves_tls_and_refuses_a_database_without_its_schema() {
    let dir = PathBuf::from(env!("CARGO_TARGET_TMPDIR"))
        .join(format!("fleet-tls-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&dir);
    std::fs::create_dir_all(&dir).expect("dir");
    let pg = pg_harness::Server::start(&dir.join("pg")).expect("postgresql");
    pg.psql("postgres", "CREATE DATABASE fleet")
        .expect("create database");
    let ca = common::tls::certificates(&dir);
    let port = free_port();
    let hash = hex::encode(sha2::Sha256::digest(TOKEN.as_bytes()));
    let config = dir.join("control.toml");
    std::fs::write(
        &config,
        format!(
            "[control]\nlisten = \"127.0.0.1:{port}\"\ndatabase = \"{}\"\n\
             tls_cert = \"{}\"\ntls_key = \"{}\"\n\n\
             [[principal]]\nname = \"ops\"\ntoken_sha256 = \"{hash}\"\nvms = [\"*\"]\n",
            pg.url("fleet"),
            dir.join("cert.pem").display(),
            dir.join("key.pem").display()
        ),
    )
    .expect("control.toml");
    let run = |args: &[&str]| {
        Command::new(portless_binary())
            .args(args)
            .arg(&config)
            .output()
            .expect("portless control")
    };
    let refused = run(&["control", "--config"]);
    assert!(!refused.status.success());
    assert!(
        String::from_utf8_lossy(&refused.stderr).contains("no Portless schema"),
        "{}",
        String::from_utf8_lossy(&refused.stderr)
    );
    assert!(run(&["control", "migrate", "--config"]).status.success());
    let mut server = KillOnDrop(
        Command::new(portless_binary())
            .args(["control", "--config"])
            .arg(&config)
            .stderr(Stdio::null())
            .spawn()
            .expect("portless control"),
    );
    let addr: std::net::SocketAddr = format!("127.0.0.1:{port}").parse().expect("addr");
    let deadline = Instant::now() + Duration::from_secs(20);
    let answer = loop {
        match common::tls::tls_get(addr, &ca, "/v1/whoami", TOKEN) {
            Ok(a) => break a,
            Err(e) => {
                assert!(Instant::now() < deadline, "no TLS answer: {e}");
                std::thread::sleep(Duration::from_millis(50));
            }
        }
    };
    assert_eq!(answer.0, 200, "{}", answer.1);
    assert!(answer.1.contains("\"principal\":\"ops\""), "{}", answer.1);
    // Plain HTTP gets no answer from a TLS listener.
    let plain = Client::at(Endpoint::Tcp(addr.to_string()))
        .expect("client")
        .with_token(TOKEN)
        .whoami();
    assert!(plain.is_err());
    // The API's client and the CLI over https, trusting the CA they are given.
    let https = Endpoint::Https(format!("127.0.0.1:{port}"));
    let ca_pem = std::fs::read(dir.join("ca.pem")).expect("ca.pem");
    let me = Client::at(https.clone())
        .expect("client")
        .with_token(TOKEN)
        .with_ca_pem(&ca_pem)
        .expect("CA")
        .whoami()
        .expect("whoami over TLS");
    assert!(me.fleet && me.principal == "ops", "{me:?}");
    let untrusted = Client::at(https)
        .expect("client")
        .with_token(TOKEN)
        .whoami()
        .expect_err("a certificate of an unknown CA");
    assert!(untrusted.to_string().contains("certificate"), "{untrusted}");
    let url = format!("https://127.0.0.1:{port}");
    let cli = |ca: Option<&std::path::Path>| {
        let mut c = Command::new(portless_binary());
        c.args(["--url", &url, "--json", "vms"])
            .env("PORTLESS_TOKEN", TOKEN);
        if let Some(ca) = ca {
            c.arg("--ca").arg(ca);
        }
        c.output().expect("portless")
    };
    let listed = cli(Some(&dir.join("ca.pem")));
    assert!(
        listed.status.success(),
        "{}",
        String::from_utf8_lossy(&listed.stderr)
    );
    let listed: Value = serde_json::from_slice(&listed.stdout).expect("JSON");
    assert_eq!(listed, json!({"vms": []}));
    let refused = cli(None);
    assert_eq!(refused.status.code(), Some(1));
    assert!(
        String::from_utf8_lossy(&refused.stderr).contains("--ca"),
        "{}",
        String::from_utf8_lossy(&refused.stderr)
    );
    let bad = cli(Some(&dir.join("control.toml")));
    assert_eq!(bad.status.code(), Some(2));
    let _ = server.0.kill();
    let _ = server.0.wait();
}

/// A child process killed when the test ends, passed or not.
struct KillOnDrop(std::process::Child);

impl Drop for KillOnDrop {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

/// The same session through server `i`.
fn on(session: &Session, fleet: &Fleet, i: usize) -> Session {
    Session {
        client: Client::at(Endpoint::Tcp(fleet.addrs[i].clone())).expect("client"),
        origin: format!("http://{}", fleet.addrs[i]),
        cookie: session.cookie.clone(),
    }
}

/// Logs in on server `i` with `form` (`code=...` or `token=...`).
fn console_login(fleet: &Fleet, i: usize, form: &str) -> Result<Session, u16> {
    let client = Client::at(Endpoint::Tcp(fleet.addrs[i].clone())).expect("client");
    let origin = format!("http://{}", fleet.addrs[i]);
    let r = client
        .raw(
            "POST",
            "/console/login",
            &[
                ("content-type", "application/x-www-form-urlencoded"),
                ("origin", &origin),
            ],
            form.as_bytes().to_vec(),
        )
        .expect("login");
    if r.status != 303 {
        return Err(r.status);
    }
    let set = r.header("set-cookie").expect("a cookie").to_owned();
    for flag in ["HttpOnly", "SameSite=Strict"] {
        assert!(set.contains(flag), "{set}");
    }
    Ok(Session {
        client,
        origin,
        cookie: set.split(';').next().expect("pair").to_owned(),
    })
}

#[test]
fn the_console_works_through_either_control_plane_server() {
    let fleet = Fleet::start("fleet-console");
    fleet.wait_registered(6);
    let ops = |i: usize| {
        Client::at(Endpoint::Tcp(fleet.addrs[i].clone()))
            .expect("client")
            .with_token(TOKEN)
    };

    // A code asked of one server by token, used on the other, once.
    let code = ops(0).console_code().expect("code");
    assert!(
        code.url
            .starts_with(&format!("http://{}/console/login?code=", fleet.addrs[0])),
        "{}",
        code.url
    );
    let page = Client::at(Endpoint::Tcp(fleet.addrs[1].clone()))
        .expect("client")
        .raw(
            "GET",
            &format!("/console/login?code={}", code.code),
            &[],
            Vec::new(),
        )
        .expect("login page");
    assert!(String::from_utf8_lossy(&page.body).contains("data-test=\"login-principal\">ops<"));
    let b = console_login(&fleet, 1, &format!("code={}", code.code)).expect("login");
    assert_eq!(
        console_login(&fleet, 0, &format!("code={}", code.code)).err(),
        Some(403),
        "a code works once"
    );

    // The session acts for its principal on both servers, as a fleet.
    let (status, me) = on(&b, &fleet, 0).send("GET", "/v1/whoami", &[], "");
    assert_eq!(status, 200, "{me}");
    assert_eq!(
        (me["principal"].as_str(), me["fleet"].as_bool()),
        (Some("ops"), Some(true))
    );
    assert!(
        me["caller"]
            .as_str()
            .is_some_and(|c| c.contains("console session ")),
        "{me}"
    );
    let (status, vms) = b.send("GET", "/v1/vms", &[], "");
    assert_eq!(status, 200);
    let names: Vec<&str> = vms["vms"]
        .as_array()
        .expect("vms")
        .iter()
        .filter_map(|v| v["name"].as_str())
        .collect();
    assert_eq!(
        names,
        [
            "host1/vm1",
            "host1/vm2",
            "host2/vm1",
            "host2/vm2",
            "host3/vm1",
            "host3/vm2"
        ]
    );

    // A request that changes something needs the CSRF token and the server's Origin; a
    // refused one is audited and runs nothing.
    let exec =
        json!({"target": "role=web", "command": "echo", "args": ["fromconsole"]}).to_string();
    let json_type = ("content-type", "application/json");
    let csrf = b.csrf();
    for headers in [
        vec![json_type, ("origin", b.origin.as_str())],
        vec![
            json_type,
            ("origin", "http://evil.example"),
            ("x-csrf-token", csrf.as_str()),
        ],
        vec![
            json_type,
            ("origin", b.origin.as_str()),
            ("x-csrf-token", "0"),
        ],
    ] {
        let (status, body) = b.send("POST", "/v1/exec", &headers, &exec);
        assert_eq!(status, 403, "{body}");
    }
    assert_eq!(fleet.sql("SELECT count(*) FROM invocations"), "0");
    assert_eq!(
        fleet.sql("SELECT count(*) FROM audit WHERE action = 'console_request' AND NOT allowed"),
        "3"
    );
    // With both, it runs; the other server takes the same token (one session).
    let other = on(&b, &fleet, 0);
    let (status, answer) = other.send(
        "POST",
        "/v1/exec",
        &[
            json_type,
            ("origin", other.origin.as_str()),
            ("x-csrf-token", csrf.as_str()),
        ],
        &exec,
    );
    assert!(status == 200 || status == 201, "{status} {answer}");
    let ids: Vec<ExecutionId> = answer["executions"]
        .as_array()
        .expect("executions")
        .iter()
        .map(|d| ExecutionId(d["id"].as_u64().expect("id")))
        .collect();
    assert_eq!(ids.len(), 4);

    // The event stream: every VM once, then each execution's output and end, with cursors
    // that resume on the other server with nothing lost or twice.
    let runtime = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .expect("runtime");
    let request = EventsRequest {
        vms: true,
        executions: ids.clone(),
        cursor: None,
    };
    let (one, other) = (ops(1), ops(0));
    let (vm_events, first, cursor) = runtime.block_on(async {
        let client = &one;
        let mut events = client.as_async().events(&request).await.expect("events");
        let mut vms = std::collections::BTreeSet::new();
        let mut first = None;
        while first.is_none() || vms.len() < 6 {
            match tokio::time::timeout(Duration::from_secs(20), events.next()).await {
                Ok(Ok(Some((StreamEvent::Vm(vm), _)))) => {
                    vms.insert(vm.name.clone());
                }
                Ok(Ok(Some((
                    StreamEvent::Output {
                        execution, data, ..
                    },
                    Some(c),
                )))) => {
                    if first.is_none() {
                        first = Some((execution, data, c));
                    }
                }
                Ok(Ok(Some(_))) => {}
                other => panic!("the stream ended early: {other:?}"),
            }
        }
        let (id, data, cursor) = first.expect("output");
        (vms, (id, data), cursor)
    });
    assert_eq!(vm_events.len(), 6);
    assert_eq!(first.1, b"fromconsole\n");
    let rest = runtime.block_on(async {
        let client = &other;
        let resumed = EventsRequest {
            cursor: Some(cursor),
            vms: false,
            ..request.clone()
        };
        let mut events = client.as_async().events(&resumed).await.expect("events");
        let mut outputs = Vec::new();
        let mut ends = Vec::new();
        loop {
            match tokio::time::timeout(Duration::from_secs(30), events.next()).await {
                Ok(Ok(Some((
                    StreamEvent::Output {
                        execution, data, ..
                    },
                    _,
                )))) => {
                    outputs.push((execution, data));
                }
                Ok(Ok(Some((StreamEvent::End(rec), _)))) => ends.push(rec),
                Ok(Ok(Some(_))) => {}
                Ok(Ok(None)) => break,
                other => panic!("{other:?}"),
            }
        }
        (outputs, ends)
    });
    assert_eq!(
        rest.0.len(),
        3,
        "the other three outputs, not the first again: {:?}",
        rest.0
    );
    assert!(
        rest.0
            .iter()
            .all(|(id, d)| *id != first.0 && d == b"fromconsole\n")
    );
    assert_eq!(rest.1.len(), 4);
    assert!(rest.1.iter().all(|r| r.state == ExecState::Succeeded));

    // A lesser principal by token: its VMs only, no audit log.
    let viewer = console_login(&fleet, 0, &format!("token={VIEWER_TOKEN}")).expect("viewer");
    let (_, vms) = viewer.send("GET", "/v1/vms", &[], "");
    let names: Vec<&str> = vms["vms"]
        .as_array()
        .expect("vms")
        .iter()
        .filter_map(|v| v["name"].as_str())
        .collect();
    assert_eq!(names, ["host3/vm1", "host3/vm2"]);
    let (status, _) = viewer.send("GET", "/v1/audit", &[], "");
    assert_eq!(status, 403);
    let (status, _) = viewer.send("GET", &format!("/v1/executions/{}", ids[0]), &[], "");
    assert_eq!(status, 404, "another's execution on a VM it may not see");
    assert_eq!(console_login(&fleet, 1, "token=wrong").err(), Some(403));

    // Logged out on one server, ended on both.
    let (status, _) = {
        let r = b
            .client
            .raw(
                "POST",
                "/console/logout",
                &[
                    ("cookie", &b.cookie),
                    ("content-type", "application/x-www-form-urlencoded"),
                    ("origin", &b.origin),
                ],
                format!("csrf={csrf}").into_bytes(),
            )
            .expect("logout");
        (r.status, ())
    };
    assert_eq!(status, 303);
    let (status, body) = on(&b, &fleet, 0).send("GET", "/v1/vms", &[], "");
    assert_eq!(status, 401, "{body}");
    assert!(
        body["error"].as_str().is_some_and(|e| e.contains("ended")),
        "{body}"
    );
    let logins = fleet.sql(
        "SELECT string_agg(action || ':' || allowed, ',' ORDER BY id) FROM audit \
         WHERE action LIKE 'console_log%'",
    );
    assert_eq!(
        logins,
        "console_login:true,console_login:false,console_login:true,console_login:false,\
         console_logout:true"
    );
}
