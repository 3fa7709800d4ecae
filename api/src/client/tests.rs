//! The client against a fake daemon on a unix socket.

use std::path::PathBuf;

use super::*;
use crate::{AuditOrder, ExecState, Param, PushOutcome, VmState};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::UnixListener;

#[test]
fn encodes_reserved_characters() {
    assert_eq!(encode("vm-1.a_b~"), "vm-1.a_b~");
    assert_eq!(encode("a b/c?d&e=f"), "a%20b%2Fc%3Fd%26e%3Df");
    assert_eq!(encode("é"), "%C3%A9");
}

#[test]
fn unknown_states_deserialize() {
    let s: ExecState = serde_json::from_str("\"exploded\"").expect("state");
    assert_eq!(s, ExecState::Unknown);
    assert!(s.is_final());
    let s: ExecState = serde_json::from_str("\"timed_out\"").expect("state");
    assert_eq!(s, ExecState::TimedOut);
    let v: VmState = serde_json::from_str("\"ready\"").expect("state");
    assert_eq!(v, VmState::Ready);
    let p: Param = serde_json::from_str(r#"{"kind":"float","name":"x"}"#).expect("param");
    assert_eq!(p, Param::Other);
}

#[test]
fn error_messages_prefer_the_json_error() {
    assert_eq!(
        error_message(StatusCode::NOT_FOUND, br#"{"error":"no vm named x"}"#),
        "no vm named x"
    );
    assert_eq!(
        error_message(StatusCode::BAD_GATEWAY, b"\n upstream down \n"),
        "upstream down (502 Bad Gateway)"
    );
    assert_eq!(
        error_message(StatusCode::FORBIDDEN, b""),
        "the daemon answered 403 Forbidden"
    );
}

/// A one-connection-per-answer HTTP server on a unix socket: answers each request with
/// the next canned response and hands back the request heads and bodies it saw.
async fn fake_daemon(
    answers: Vec<Vec<u8>>,
) -> (
    tempdir::Dir,
    PathBuf,
    tokio::task::JoinHandle<Vec<(String, Vec<u8>)>>,
) {
    let dir = tempdir::Dir::new();
    let socket = dir.0.join("d.sock");
    let listener = UnixListener::bind(&socket).expect("bind");
    let task = tokio::spawn(async move {
        let mut seen = Vec::new();
        for answer in answers {
            let (mut conn, _) = listener.accept().await.expect("accept");
            let mut buf = Vec::new();
            let (head, body) = loop {
                let mut chunk = [0u8; 4096];
                let n = conn.read(&mut chunk).await.expect("read");
                buf.extend_from_slice(&chunk[..n]);
                if let Some(at) = buf.windows(4).position(|w| w == b"\r\n\r\n") {
                    let head = String::from_utf8_lossy(&buf[..at]).into_owned();
                    let len = head
                        .lines()
                        .find_map(|l| {
                            l.to_ascii_lowercase()
                                .strip_prefix("content-length:")
                                .map(|v| v.trim().parse::<usize>().expect("length"))
                        })
                        .unwrap_or(0);
                    while buf.len() < at + 4 + len {
                        let n = conn.read(&mut chunk).await.expect("read");
                        assert!(n > 0, "eof in body");
                        buf.extend_from_slice(&chunk[..n]);
                    }
                    break (head, buf[at + 4..at + 4 + len].to_vec());
                }
                assert!(n > 0, "eof in head");
            };
            seen.push((head, body));
            conn.write_all(&answer).await.expect("write");
            conn.shutdown().await.expect("shutdown");
        }
        seen
    });
    (dir, socket, task)
}

fn response(status: &str, headers: &[(&str, &str)], body: &[u8]) -> Vec<u8> {
    let mut out = format!("HTTP/1.1 {status}\r\nconnection: close\r\n");
    for (k, v) in headers {
        out += &format!("{k}: {v}\r\n");
    }
    out += &format!("content-length: {}\r\n\r\n", body.len());
    let mut out = out.into_bytes();
    out.extend_from_slice(body);
    out
}

mod tempdir {
    use std::path::PathBuf;

    /// A private directory under the system's temporary directory, removed on drop.
    pub(super) struct Dir(pub(super) PathBuf);

    impl Dir {
        pub(super) fn new() -> Self {
            use std::sync::atomic::{AtomicU32, Ordering};
            static NEXT: AtomicU32 = AtomicU32::new(0);
            // Ordering: only uniqueness matters.
            let n = NEXT.fetch_add(1, Ordering::Relaxed);
            let path =
                std::env::temp_dir().join(format!("portless-client-{}-{n}", std::process::id()));
            let _ = std::fs::remove_dir_all(&path);
            std::fs::create_dir_all(&path).expect("temp dir");
            Self(path)
        }
    }

    impl Drop for Dir {
        fn drop(&mut self) {
            let _ = std::fs::remove_dir_all(&self.0);
        }
    }
}

#[tokio::test]
async fn requests_and_answers_round_trip() {
    let (_dir, socket, server) = fake_daemon(vec![
        response(
            "200 OK",
            &[("content-type", "application/json")],
            br#"{"executions":[{"vm":"a","id":7,"state":"pending","error":null},{"vm":"b","id":null,"state":"rejected","error":"denied"}],"skipped":["c"]}"#,
        ),
        response(
            "200 OK",
            &[
                ("x-portless-total-len", "10"),
                ("x-portless-stored-len", "4"),
                ("x-portless-truncated", "true"),
            ],
            b"abcd",
        ),
        response("404 Not Found", &[], br#"{"error":"no vm named zz"}"#),
        response("200 OK", &[], br#"{"entries":[]}"#),
        response("200 OK", &[], br#"{"vm":"a","name":"x y","size":3,"sha256":"00","outcome":"started","execution":9,"error":null}"#),
    ])
    .await;
    let client = Client::new(&socket);
    let answer = client
        .exec(&ExecRequest {
            target: "role=web".into(),
            command: "sleep".into(),
            args: vec!["5".into()],
            timeout_ms: Some(1000),
            max_concurrency: None,
            max_errors: Some(crate::Limit::Count(0)),
            idempotency_key: None,
        })
        .await
        .expect("exec");
    assert_eq!(answer.executions.len(), 2);
    assert!(!answer.executions[0].refused());
    assert!(answer.executions[1].refused());
    assert_eq!(answer.skipped, ["c"]);

    let chunk = client
        .output(ExecutionId(7), Stream::Stderr, 2, Some(100))
        .await
        .expect("output");
    assert_eq!(
        chunk,
        OutputChunk {
            data: b"abcd".to_vec(),
            stored_len: 4,
            total_len: 10,
            truncated: true
        }
    );

    let err = client.commands("zz").await.expect_err("404");
    assert_eq!(err.status(), Some(404));
    assert_eq!(err.to_string(), "no vm named zz");

    let entries = client
        .audit(&AuditQuery {
            principal: Some("a b".into()),
            allowed: Some(false),
            limit: Some(5),
            order: AuditOrder::Newest,
            ..AuditQuery::default()
        })
        .await
        .expect("audit");
    assert!(entries.is_empty());

    let pushed = client
        .push(PushRequest {
            vm: "a",
            name: "x y",
            run: true,
            timeout_ms: None,
            program: b"\x7fEL".to_vec(),
        })
        .await
        .expect("push");
    assert_eq!(
        (pushed.outcome, pushed.execution),
        (PushOutcome::Started, Some(ExecutionId(9)))
    );

    let seen = server.await.expect("server");
    let first_line = |i: usize| seen[i].0.lines().next().unwrap_or_default().to_owned();
    assert_eq!(first_line(0), "POST /v1/exec HTTP/1.1");
    let body: serde_json::Value = serde_json::from_slice(&seen[0].1).expect("json body");
    assert_eq!(
        body,
        serde_json::json!({"target":"role=web","command":"sleep","args":["5"],
            "timeout_ms":1000,"max_concurrency":null,"max_errors":0})
    );
    assert_eq!(
        first_line(1),
        "GET /v1/executions/7/output?stream=stderr&offset=2&limit=100 HTTP/1.1"
    );
    assert_eq!(first_line(2), "GET /v1/vms/zz/commands HTTP/1.1");
    assert_eq!(
        first_line(3),
        "GET /v1/audit?principal=a%20b&allowed=false&limit=5&order=newest HTTP/1.1"
    );
    assert_eq!(
        first_line(4),
        "POST /v1/vms/a/push?name=x%20y&run=true HTTP/1.1"
    );
    assert_eq!(seen[4].1, b"\x7fEL");
}

#[tokio::test]
async fn follow_reads_events_split_across_chunks() {
    let stream = concat!(
        r#"{"type":"output","stream":"stdout","offset":0,"data":"aGVs"}"#,
        "\n",
        r#"{"type":"output","stream":"stdout","offset":3,"data":"bG8K"}"#,
        "\n",
        r#"{"type":"end","execution":{"id":1,"vm":"v","command":"c","state":"failed","exit_code":3}}"#,
        "\n"
    );
    // Chunked transfer encoding, cut in the middle of lines.
    let mut answer =
        b"HTTP/1.1 200 OK\r\ncontent-type: application/x-ndjson\r\ntransfer-encoding: chunked\r\n\r\n"
            .to_vec();
    for piece in stream.as_bytes().chunks(17) {
        answer.extend_from_slice(format!("{:x}\r\n", piece.len()).as_bytes());
        answer.extend_from_slice(piece);
        answer.extend_from_slice(b"\r\n");
    }
    answer.extend_from_slice(b"0\r\n\r\n");
    let (_dir, socket, server) = fake_daemon(vec![answer]).await;
    let mut follow = Client::new(&socket)
        .follow(ExecutionId(1))
        .await
        .expect("follow");
    let mut out = Vec::new();
    let mut end = None;
    while let Some(event) = follow.next().await.expect("event") {
        match event {
            FollowEvent::Output { data, .. } => out.extend(data),
            FollowEvent::End(r) => end = Some(r),
        }
    }
    assert_eq!(out, b"hello\n");
    assert_eq!(end.map(|r| r.exit_code), Some(Some(3)));
    server.await.expect("server");
}

#[tokio::test]
async fn an_absent_daemon_names_the_socket() {
    let dir = tempdir::Dir::new();
    let socket = dir.0.join("nobody.sock");
    let err = Client::new(&socket).vms().await.expect_err("no daemon");
    assert!(err.is_transport());
    let text = err.to_string();
    assert!(text.contains(&socket.display().to_string()), "{text}");
    assert!(text.contains("`portless serve` must be running"), "{text}");
}
