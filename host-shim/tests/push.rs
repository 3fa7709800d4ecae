//! Pushes through the daemon: a program is spooled to the state directory and streamed into
//! the ring from there, so a 64 MiB push costs the daemon a few MiB of memory, not the
//! program's size several times over; pushes in flight are bounded.

mod common;

use std::time::Duration;

use common::stack::{AGENT_CONFIG, Stack};
use sha2::{Digest, Sha256};

/// Pushes `program` to `vm` as `name`; the status and the answer.
fn push(s: &Stack, vm: &str, name: &str, program: &[u8]) -> (u16, serde_json::Value) {
    let (status, body) = common::try_http_with(
        &s.socket,
        "POST",
        &format!("/v1/vms/{vm}/push?name={name}"),
        &[],
        Some(program),
    )
    .expect("answer");
    let v = serde_json::from_slice(&body)
        .unwrap_or_else(|_| serde_json::Value::String(String::from_utf8_lossy(&body).into()));
    (status, v)
}

#[test]
fn a_64_mib_push_is_spooled_not_held_in_memory() {
    let mut s = Stack::new("push-spool", &["vm1"], "");
    let guest_dir = s.dir.join("guest-push");
    std::fs::write(
        s.dir.join("agent.toml"),
        format!(
            "[push]\nenabled = true\nmax_bytes = 67108864\ndir = \"{}\"\n{AGENT_CONFIG}",
            guest_dir.display()
        ),
    )
    .expect("agent.toml");
    s.start_daemon();
    s.start_agent("vm1");
    s.wait_ready("vm1", Duration::from_secs(15));
    // A warm-up push, so that the baseline includes what any push costs once.
    let (status, body) = push(&s, "vm1", "small.bin", b"#!/bin/sh\n");
    assert_eq!(status, 200, "{body}");
    let (before, _) = s.daemon_rss_kib();

    let program: Vec<u8> = (0..64u32 << 20).map(|i| (i % 251) as u8).collect();
    let (status, body) = push(&s, "vm1", "big.bin", &program);
    assert_eq!(status, 200, "{body}");
    assert_eq!(body["outcome"], "stored", "{body}");
    assert_eq!(body["size"], 64 << 20);
    assert_eq!(body["sha256"], hex::encode(Sha256::digest(&program)));
    let stored = std::fs::read(guest_dir.join("big.bin")).expect("stored in the guest");
    assert!(stored == program, "the stored program differs");

    // The bound: the daemon's peak resident memory grew by less than 16 MiB.
    let (_, peak) = s.daemon_rss_kib();
    println!("daemon resident memory: {before} KiB before, peak {peak} KiB during a 64 MiB push");
    assert!(
        peak < before + 16 * 1024,
        "peak {peak} KiB, {before} KiB before the push"
    );
    // Nothing is left in the spool.
    let spool: Vec<_> = std::fs::read_dir(s.state_dir().join("spool"))
        .expect("spool dir")
        .collect();
    assert!(spool.is_empty(), "{spool:?}");

    // Too large: refused from its Content-Length, before any of it is read.
    use std::io::{Read, Write};
    let mut c = std::os::unix::net::UnixStream::connect(&s.socket).expect("connect");
    write!(
        c,
        "POST /v1/vms/vm1/push?name=huge.bin HTTP/1.1\r\nHost: portless\r\n\
         Content-Length: {}\r\nConnection: close\r\n\r\n",
        (64 << 20) + 1
    )
    .expect("request");
    let mut answer = String::new();
    c.read_to_string(&mut answer).expect("answer");
    assert!(answer.starts_with("HTTP/1.1 413"), "{answer}");
    assert!(answer.contains("at most 67108864 bytes"), "{answer}");
}

#[test]
fn pushes_in_flight_are_bounded() {
    // No agent: a push waits for the VM (up to the delivery timeout) and holds its place.
    let mut s = Stack::new(
        "push-bound",
        &["vm1"],
        "\n[callers]\npushes_in_flight = 1\n",
    );
    s.start_daemon();
    let socket = s.socket.clone();
    let waiting = std::thread::spawn(move || {
        common::try_http_with(&socket, "POST", "/v1/vms/vm1/push?name=a", &[], Some(b"x"))
            .expect("answer")
            .0
    });
    let deadline = std::time::Instant::now() + Duration::from_secs(10);
    loop {
        let (status, body) = s.call("GET", "/v1/daemon", None);
        assert_eq!(status, 200, "{body}");
        if body["pushes_in_flight"] == 1 {
            break;
        }
        assert!(std::time::Instant::now() < deadline, "{body}");
        std::thread::sleep(Duration::from_millis(10));
    }
    let (status, body) = push(&s, "vm1", "b", b"y");
    assert_eq!(status, 503, "{body}");
    assert!(
        body["error"]
            .as_str()
            .is_some_and(|e| e.contains("callers.pushes_in_flight")),
        "{body}"
    );
    // The first ends (the VM never became ready) and gives its place back.
    assert_eq!(waiting.join().expect("thread"), 503);
    let (_, body) = s.call("GET", "/v1/daemon", None);
    assert_eq!(body["pushes_in_flight"], 0, "{body}");
}
