//! A control plane takes in at most `MAX_UPLOADS_IN_FLIGHT` (4) program bodies at once:
//! with four slow uploads in progress, a fifth is refused (503) before its body is read,
//! and once they are gone, it is taken.

use std::io::{Read, Write};
use std::net::TcpStream;
use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

use portless_fleet::control::{Control, ControlConfig, serve_on};
use portless_fleet::store::Store;
use sha2::Digest;

const TOKEN: &str = "upload-token";

/// One request on a new connection; the status line.
fn status_of(addr: &str, request: &[u8]) -> String {
    let mut s = TcpStream::connect(addr).expect("connect");
    s.set_read_timeout(Some(Duration::from_secs(20)))
        .expect("timeout");
    s.write_all(request).expect("write");
    let mut answer = Vec::new();
    let mut buf = [0u8; 4096];
    while !answer.windows(2).any(|w| w == b"\r\n") {
        let n = s.read(&mut buf).expect("read");
        if n == 0 {
            break;
        }
        answer.extend_from_slice(&buf[..n]);
    }
    String::from_utf8_lossy(&answer)
        .lines()
        .next()
        .unwrap_or("")
        .to_owned()
}

#[test]
fn a_control_plane_takes_in_four_programs_at_once() {
    let dir = PathBuf::from(env!("CARGO_TARGET_TMPDIR"))
        .join(format!("fleet-uploads-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&dir);
    std::fs::create_dir_all(&dir).expect("dir");
    let pg = pg_harness::Server::start(&dir.join("pg")).expect("postgresql");
    pg.psql("postgres", "CREATE DATABASE fleet").expect("db");
    let url = pg.url("fleet");
    let hash = hex::encode(sha2::Sha256::digest(TOKEN.as_bytes()));
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .expect("runtime");
    let addr = runtime.block_on(async {
        Store::new(&url, 1)
            .expect("store")
            .migrate()
            .await
            .expect("migrate");
        let config = ControlConfig::parse(&format!(
            "[control]\nlisten = \"127.0.0.1:0\"\ndatabase = \"{url}\"\n\n\
             [[principal]]\nname = \"ops\"\ntoken_sha256 = \"{hash}\"\nvms = [\"*\"]\npush = true\n"
        ))
        .expect("config");
        let control = Arc::new(Control::open(config).await.expect("open"));
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0")
            .await
            .expect("bind");
        let addr = listener.local_addr().expect("addr").to_string();
        tokio::spawn(serve_on(control, listener, std::future::pending()));
        addr
    });
    let head = |len: usize| {
        format!(
            "POST /v1/programs HTTP/1.1\r\nHost: {addr}\r\nAuthorization: Bearer {TOKEN}\r\n\
             Content-Type: application/octet-stream\r\nContent-Length: {len}\r\n\r\n"
        )
    };
    // Four uploads that send their headers and a little of their body, then stall.
    let slow: Vec<TcpStream> = (0..4)
        .map(|_| {
            let mut s = TcpStream::connect(&addr).expect("connect");
            s.write_all(head(1 << 20).as_bytes()).expect("head");
            s.write_all(&[0u8; 1024]).expect("some body");
            s
        })
        .collect();
    std::thread::sleep(Duration::from_millis(500));
    let mut fifth = head(5).into_bytes();
    fifth.extend_from_slice(b"hello");
    let refused = status_of(&addr, &fifth);
    assert!(refused.contains(" 503 "), "{refused}");
    drop(slow);
    std::thread::sleep(Duration::from_millis(500));
    let taken = status_of(&addr, &fifth);
    assert!(taken.contains(" 201 "), "{taken}");
    drop(runtime);
}
