//! The web console's side of the daemon, without a browser: a login code from the unix
//! socket, the session cookie acting for its principal on the console's loopback listener,
//! CSRF and `Origin` on every request that changes something, expiry, and the event stream
//! that feeds the pages (VM states live; output resumed without gap or duplicate).

mod common;

use std::time::{Duration, Instant};

use common::session::Session;
use common::stack::Stack;
use portless_api::blocking::Client;
use portless_api::{Cursor, Endpoint, EventsRequest, ExecutionId, Stream, StreamEvent, VmState};
use serde_json::json;

/// The console listener's address in a login URL.
fn authority(url: &str) -> String {
    url.trim_start_matches("http://")
        .split('/')
        .next()
        .expect("authority")
        .to_owned()
}

/// Logs in on the console listener with a code from `portless console`'s route.
fn log_in(s: &Stack) -> Session {
    let unix = Client::new(&s.socket).expect("client");
    let code = unix.console_code().expect("code");
    let addr = authority(&code.url);
    let client = Client::at(Endpoint::Tcp(addr.clone())).expect("tcp client");
    let origin = format!("http://{addr}");
    let form = [
        ("content-type", "application/x-www-form-urlencoded"),
        ("origin", origin.as_str()),
    ];
    let body = format!("code={}", code.code).into_bytes();
    let r = client
        .raw("POST", "/console/login", &form, body.clone())
        .expect("login");
    assert_eq!(r.status, 303, "{}", String::from_utf8_lossy(&r.body));
    let set = r.header("set-cookie").expect("a cookie").to_owned();
    for flag in ["HttpOnly", "SameSite=Strict"] {
        assert!(set.contains(flag), "{set}");
    }
    let cookie = set.split(';').next().expect("pair").to_owned();
    // The code works once.
    let again = client
        .raw("POST", "/console/login", &form, body)
        .expect("again");
    assert_eq!(again.status, 403);
    assert!(again.header("set-cookie").is_none());
    Session {
        client,
        origin,
        cookie,
    }
}

#[test]
fn a_session_acts_for_its_principal_and_changes_nothing_without_csrf_and_origin() {
    let mut s = Stack::new(
        "console-session",
        &["vm1"],
        "\n[console]\nsession_idle_s = 3\n",
    );
    s.start_daemon();
    s.start_agent("vm1");
    s.wait_ready("vm1", Duration::from_secs(15));
    let b = log_in(&s);

    let (status, me) = b.send("GET", "/v1/whoami", &[], "");
    assert_eq!(status, 200, "{me}");
    assert_eq!(me["principal"], "ops");
    assert!(
        me["caller"]
            .as_str()
            .is_some_and(|c| c.starts_with("console session ")),
        "{me}"
    );
    assert_eq!(me["rights"]["audit"], true);

    let exec = json!({"target": "vm1", "command": "echo", "args": ["hi"]}).to_string();
    let json_type = ("content-type", "application/json");
    let csrf = b.csrf();
    let evil = "http://evil.example";
    for (headers, why) in [
        (
            vec![json_type, ("origin", b.origin.as_str())],
            "X-CSRF-Token",
        ),
        (
            vec![
                json_type,
                ("origin", b.origin.as_str()),
                ("x-csrf-token", "0"),
            ],
            "does not match",
        ),
        (vec![json_type, ("x-csrf-token", csrf.as_str())], "Origin"),
        (
            vec![json_type, ("origin", evil), ("x-csrf-token", csrf.as_str())],
            "evil.example",
        ),
    ] {
        let (status, body) = b.send("POST", "/v1/exec", &headers, &exec);
        assert_eq!(status, 403, "{body}");
        assert!(
            body["error"].as_str().is_some_and(|e| e.contains(why)),
            "{why}: {body}"
        );
    }
    let (_, list) = s.call("GET", "/v1/executions", None);
    assert_eq!(
        list["executions"],
        json!([]),
        "a refused request ran nothing"
    );
    let (_, audit) = s.call("GET", "/v1/audit?action=console_request", None);
    assert_eq!(
        audit["entries"].as_array().map(Vec::len),
        Some(4),
        "{audit}"
    );
    assert_eq!(audit["entries"][0]["allowed"], false);
    assert_eq!(audit["entries"][0]["target"], "POST /v1/exec");

    let ok = [
        json_type,
        ("origin", b.origin.as_str()),
        ("x-csrf-token", csrf.as_str()),
    ];
    let (status, body) = b.send("POST", "/v1/exec", &ok, &exec);
    assert_eq!(status, 200, "{body}");
    let id = body["executions"][0]["id"].as_u64().expect("id");
    let rec = s.wait(id, 10_000);
    assert_eq!(rec["principal"], "ops");
    let (_, audit) = s.call("GET", "/v1/audit?action=console_login", None);
    assert_eq!(
        audit["entries"].as_array().map(Vec::len),
        Some(2),
        "login and the reuse: {audit}"
    );

    // Idle past session_idle_s, the session has ended.
    std::thread::sleep(Duration::from_millis(3500));
    let (status, body) = b.send("GET", "/v1/whoami", &[], "");
    assert_eq!(status, 403, "{body}");
    assert!(
        body["error"]
            .as_str()
            .is_some_and(|e| e.contains("session has ended")),
        "{body}"
    );
    let shell = b
        .client
        .raw(
            "GET",
            "/console/",
            &[("cookie", b.cookie.as_str())],
            Vec::new(),
        )
        .expect("shell");
    assert_eq!(shell.status, 303);
}

#[test]
fn vm_states_stream_live_and_output_resumes_without_gap_or_duplicate() {
    let mut s = Stack::new("console-events", &["vm1"], "");
    s.start_daemon();
    s.start_agent("vm1");
    s.wait_ready("vm1", Duration::from_secs(15));
    let client = Client::new(&s.socket).expect("client");

    // VM states: the snapshot, then the agent's loss and return.
    let mut vms = client
        .events(&EventsRequest {
            vms: true,
            ..EventsRequest::default()
        })
        .expect("events");
    let mut next_vm = |want: &dyn Fn(VmState) -> bool, within: Duration| {
        let deadline = Instant::now() + within;
        loop {
            assert!(Instant::now() < deadline, "no such vm event in {within:?}");
            match vms.next() {
                Some(Ok((StreamEvent::Vm(vm), None))) if want(vm.state) => return vm,
                Some(Ok(_)) => {}
                other => panic!("{other:?}"),
            }
        }
    };
    let first = next_vm(&|st| st == VmState::Ready, Duration::from_secs(5));
    assert_eq!(first.name, "vm1");
    s.kill_agent("vm1");
    next_vm(&|st| st != VmState::Ready, Duration::from_secs(20));
    s.start_agent("vm1");
    let back = next_vm(&|st| st == VmState::Ready, Duration::from_secs(20));
    assert!(back.agent_restarts >= 1 || back.agent_generation != first.agent_generation);

    // 3 MB of output, read in two connections: the second resumes from the cursor.
    let (status, body) = s.exec("vm1", "bytes", &["3000000"]);
    assert_eq!(status, 200, "{body}");
    let id = ExecutionId(body["executions"][0]["id"].as_u64().expect("id"));
    let request = EventsRequest {
        executions: vec![id],
        ..EventsRequest::default()
    };
    let mut got = Vec::new();
    let mut cursor: Option<Cursor> = None;
    {
        let events = client.events(&request).expect("events");
        for item in events {
            let (event, id_after) = item.expect("event");
            if let StreamEvent::Output {
                offset,
                data,
                stream: Stream::Stdout,
                ..
            } = event
            {
                assert_eq!(offset, got.len() as u64, "no gap, no overlap");
                got.extend_from_slice(&data);
                cursor = id_after;
                if got.len() >= 1_000_000 {
                    break; // the connection drops here
                }
            }
        }
    }
    assert!(
        got.len() >= 1_000_000 && got.len() < 3_000_000,
        "{}",
        got.len()
    );
    let resumed = client
        .events(&EventsRequest { cursor, ..request })
        .expect("resumed");
    let mut ended = None;
    for item in resumed {
        match item.expect("event") {
            (
                StreamEvent::Output {
                    offset,
                    data,
                    stream: Stream::Stdout,
                    ..
                },
                _,
            ) => {
                assert_eq!(offset, got.len() as u64, "resumed exactly where it stopped");
                got.extend_from_slice(&data);
            }
            (StreamEvent::End(rec), Some(c)) => {
                assert_eq!(c.to_string(), format!("{id}:end"));
                ended = Some(rec);
            }
            _ => {}
        }
    }
    let rec = ended.expect("an end event, then the stream ends");
    assert_eq!(rec.stdout.total_len, 3_000_000);
    let whole = client.output(id, Stream::Stdout, 0, None).expect("output");
    assert_eq!(got.len(), whole.data.len());
    assert!(
        got == whole.data,
        "the streamed bytes are the recorded bytes"
    );

    // A cursor that does not parse is refused, not taken as a restart.
    let bad = client.raw(
        "GET",
        &format!("/v1/events?execution={id}"),
        &[("last-event-id", "nonsense")],
        Vec::new(),
    );
    assert_eq!(bad.expect("answer").status, 400);
}
