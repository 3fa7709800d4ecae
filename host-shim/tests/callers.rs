//! What a caller may make the daemon spend: follow streams end when their client goes away
//! (even when there is nothing to send) and are bounded per principal; the daemon reports
//! them in `GET /v1/daemon`.

mod common;

use std::time::{Duration, Instant};

use common::stack::Stack;
use portless_api::blocking::{Client, Follow};
use portless_api::{ClientError, ExecutionId, FollowEvent};
use serde_json::Value;

/// Opens `GET /v1/executions/{id}/follow` through the API crate's client: the open stream
/// (to keep or drop), or the daemon's refusal.
fn open_follow(client: &Client, id: u64) -> Result<Follow<'_>, ClientError> {
    client.follow(ExecutionId(id))
}

/// Whether a stream's events reach the execution's end.
fn reaches_the_end(follow: Follow<'_>) -> bool {
    follow
        .map_while(Result::ok)
        .any(|e| matches!(e, FollowEvent::End(_)))
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
    let client = Client::new(&s.socket).expect("client");

    // A client that goes away while there is nothing to send: its stream ends.
    let c = open_follow(&client, id).expect("a stream");
    let state = wait_follows(&s, 1);
    assert_eq!(state["follows"]["ops"], 1, "{state}");
    drop(c);
    wait_follows(&s, 0);

    // At most three at once for one principal; the fourth is refused, and a place freed
    // is taken again.
    let mut open: Vec<Follow<'_>> = (0..3)
        .map(|_| open_follow(&client, id).expect("a stream"))
        .collect();
    wait_follows(&s, 3);
    let refused = open_follow(&client, id).expect_err("a fourth stream");
    assert_eq!(refused.status(), Some(429));
    let body = refused.to_string();
    assert!(body.contains("follows_per_principal"), "{body}");
    drop(open.pop());
    wait_follows(&s, 2);
    let _again = open_follow(&client, id).expect("a stream");
    wait_follows(&s, 3);

    // The execution's end ends every stream, with its end line.
    let (status, body) = s.call("POST", &format!("/v1/executions/{id}/cancel"), None);
    assert_eq!(status, 202, "{body}");
    let first = open.remove(0);
    assert!(
        reaches_the_end(first),
        "the stream ended without its end line"
    );
    drop(open);
    wait_follows(&s, 0);

    // A daemon that stops ends the streams it has open (and does not wait for them).
    let (_, body) = s.exec("vm1", "sleep", &["300"]);
    let id = body["executions"][0]["id"].as_u64().expect("id");
    let c = open_follow(&client, id).expect("a stream");
    wait_follows(&s, 1);
    let t = Instant::now();
    s.stop_daemon();
    assert!(
        t.elapsed() < Duration::from_secs(10),
        "stopping took {:?}",
        t.elapsed()
    );
    // The stream ends (without its end line: the execution did not end).
    let _ = c.count();
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
