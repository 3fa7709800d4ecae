//! What a caller may make the daemon spend: follow streams end when their client goes away
//! (even when there is nothing to send) and are bounded per principal; the daemon reports
//! them in `GET /v1/daemon`.

mod common;

use std::io::{Read, Write};
use std::os::unix::net::UnixStream;
use std::time::{Duration, Instant};

use common::stack::Stack;
use serde_json::Value;

/// Opens `GET /v1/executions/{id}/follow` and reads the answer's head; the connection, to
/// keep or drop, and the status.
fn open_follow(s: &Stack, id: u64) -> (UnixStream, u16) {
    let mut c = UnixStream::connect(&s.socket).expect("connect");
    c.set_read_timeout(Some(Duration::from_secs(10)))
        .expect("timeout");
    write!(
        c,
        "GET /v1/executions/{id}/follow HTTP/1.1\r\nHost: portless\r\nConnection: close\r\n\r\n"
    )
    .expect("request");
    let mut head = Vec::new();
    let mut b = [0u8; 1];
    while !head.ends_with(b"\r\n\r\n") {
        assert_eq!(c.read(&mut b).expect("read"), 1, "closed before the head");
        head.push(b[0]);
    }
    let status = String::from_utf8_lossy(&head)
        .split_whitespace()
        .nth(1)
        .and_then(|c| c.parse().ok())
        .expect("status");
    (c, status)
}

fn follows_open(s: &Stack) -> Value {
    let (status, body) = s.call("GET", "/v1/daemon", None);
    assert_eq!(status, 200, "{body}");
    body
}

/// Waits until the daemon reports `n` follow streams open.
fn wait_follows(s: &Stack, n: u64) -> Value {
    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        let state = follows_open(s);
        if state["follows_open"] == n {
            return state;
        }
        assert!(Instant::now() < deadline, "follows never {n}: {state}");
        std::thread::sleep(Duration::from_millis(20));
    }
}

#[test]
fn follow_streams_end_with_their_client_and_are_bounded_per_principal() {
    let mut s = Stack::new(
        "callers-follow",
        &["vm1"],
        "\n[callers]\nfollows_per_principal = 3\n",
    );
    s.start_daemon();
    s.start_agent("vm1");
    s.wait_ready("vm1", Duration::from_secs(15));
    let (status, body) = s.exec("vm1", "sleep", &["300"]);
    assert_eq!(status, 200, "{body}");
    let id = body["executions"][0]["id"].as_u64().expect("id");
    assert_eq!(follows_open(&s)["follows_open"], 0);

    // A client that goes away while there is nothing to send: its stream ends.
    let (c, status) = open_follow(&s, id);
    assert_eq!(status, 200);
    let state = wait_follows(&s, 1);
    assert_eq!(state["follows"]["ops"], 1, "{state}");
    drop(c);
    wait_follows(&s, 0);

    // At most three at once for one principal; the fourth is refused, and a place freed
    // is taken again.
    let mut open: Vec<UnixStream> = (0..3)
        .map(|_| {
            let (c, status) = open_follow(&s, id);
            assert_eq!(status, 200);
            c
        })
        .collect();
    wait_follows(&s, 3);
    let (mut refused, status) = open_follow(&s, id);
    assert_eq!(status, 429);
    let mut body = String::new();
    let _ = refused.read_to_string(&mut body);
    assert!(body.contains("follows_per_principal"), "{body}");
    drop(open.pop());
    wait_follows(&s, 2);
    let (_again, status) = open_follow(&s, id);
    assert_eq!(status, 200);
    wait_follows(&s, 3);

    // The execution's end ends every stream, with its end line.
    let (status, body) = s.call("POST", &format!("/v1/executions/{id}/cancel"), None);
    assert_eq!(status, 202, "{body}");
    let mut rest = String::new();
    open[0].read_to_string(&mut rest).expect("read to the end");
    assert!(rest.contains("\"type\":\"end\""), "{rest}");
    drop(open);
    wait_follows(&s, 0);

    // A daemon that stops ends the streams it has open (and does not wait for them).
    let (_, body) = s.exec("vm1", "sleep", &["300"]);
    let id = body["executions"][0]["id"].as_u64().expect("id");
    let (mut c, status) = open_follow(&s, id);
    assert_eq!(status, 200);
    wait_follows(&s, 1);
    let t = Instant::now();
    s.stop_daemon();
    assert!(
        t.elapsed() < Duration::from_secs(10),
        "stopping took {:?}",
        t.elapsed()
    );
    let mut rest = Vec::new();
    let _ = c.read_to_end(&mut rest);
}

#[test]
fn the_daemons_state_needs_the_audit_right() {
    let token = "no-audit-token";
    let extra = format!(
        "\n[[principal]]\nname = \"viewer\"\ntoken_sha256 = \"{}\"\nvms = [\"*\"]\n",
        host_shim::http::policy::hash_token(token)
    );
    let mut s = Stack::new("callers-state", &["vm1"], &extra);
    s.start_daemon();
    let state = follows_open(&s);
    assert_eq!(state["follows_open"], 0);
    assert_eq!(state["pushes_in_flight"], 0);
    assert_eq!(state["vms"], 1);
    let auth = format!("Authorization: Bearer {token}");
    let (status, body) =
        common::try_http_with(&s.socket, "GET", "/v1/daemon", &[&auth], None).expect("answer");
    assert_eq!(status, 403, "{}", String::from_utf8_lossy(&body));
    assert!(
        String::from_utf8_lossy(&body).contains("may not read the daemon's state"),
        "{}",
        String::from_utf8_lossy(&body)
    );
}
