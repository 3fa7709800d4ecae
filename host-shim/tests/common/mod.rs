//! Pieces the host-shim integration tests share: where the agent binary is, one request to
//! the daemon through the API crate's client (the raw answer, to check the server's JSON
//! itself), and CPU time from /proc.
#![allow(dead_code, unreachable_pub)]

pub mod fleet;
pub mod hostile;
pub mod proxy;
pub mod session;
pub mod stack;
pub mod tls;
pub mod webdriver;

use std::os::unix::net::UnixStream;
use std::path::{Path, PathBuf};
use std::time::Duration;

use serde_json::Value;

/// The agent binary cargo built for the workspace's tests (or `PORTLESS_AGENT_BIN`).
pub fn agent_binary() -> PathBuf {
    if let Some(p) = std::env::var_os("PORTLESS_AGENT_BIN") {
        return p.into();
    }
    let exe = std::env::current_exe().expect("test path");
    exe.parent()
        .and_then(|d| d.parent())
        .expect("target/debug")
        .join("portless-agent")
}

/// One HTTP/1.1 request on the daemon's unix socket: the status and the (de-chunked) body.
pub fn http(socket: &Path, method: &str, path: &str, body: Option<&[u8]>) -> (u16, Vec<u8>) {
    try_http(socket, method, path, body).unwrap_or_else(|e| panic!("{method} {path}: {e}"))
}

/// [`http`], or why there was no answer (no daemon, or it died during the call).
pub fn try_http(
    socket: &Path,
    method: &str,
    path: &str,
    body: Option<&[u8]>,
) -> Result<(u16, Vec<u8>), String> {
    try_http_with(socket, method, path, &[], body)
}

/// [`try_http`] with extra header lines (`Authorization: Bearer ...`).
pub fn try_http_with(
    socket: &Path,
    method: &str,
    path: &str,
    headers: &[&str],
    body: Option<&[u8]>,
) -> Result<(u16, Vec<u8>), String> {
    let client = portless_api::blocking::Client::new(socket).map_err(|e| e.to_string())?;
    raw(&client, method, path, headers, body)
}

/// One request through the API crate's client, whatever its status: the status and the
/// body. `headers` are lines (`Name: value`).
pub fn raw(
    client: &portless_api::blocking::Client,
    method: &str,
    path: &str,
    headers: &[&str],
    body: Option<&[u8]>,
) -> Result<(u16, Vec<u8>), String> {
    let headers: Vec<(&str, &str)> = headers
        .iter()
        .map(|h| h.split_once(':').map_or((*h, ""), |(k, v)| (k, v.trim())))
        .collect();
    client
        .raw(method, path, &headers, body.unwrap_or_default().to_vec())
        .map(|r| (r.status, r.body))
        .map_err(|e| e.to_string())
}

/// One request with a JSON body; the status and the body as JSON (or as a string when it is
/// not JSON).
pub fn call(socket: &Path, method: &str, path: &str, body: Option<Value>) -> (u16, Value) {
    let bytes = body.map(|b| b.to_string().into_bytes());
    let (status, body) = http(socket, method, path, bytes.as_deref());
    let v = serde_json::from_slice(&body)
        .unwrap_or_else(|_| Value::String(String::from_utf8_lossy(&body).into_owned()));
    (status, v)
}

/// CPU time (user + system) of a process so far, from `/proc/<pid>/stat` (`self` for this
/// one).
pub fn cpu_time_of(pid: &str) -> Duration {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).expect("stat");
    let rest = stat.rsplit_once(')').map(|(_, r)| r).expect("format");
    let f: Vec<&str> = rest.split_whitespace().collect();
    // Fields 14 and 15 (utime, stime) are the 12th and 13th after the command name.
    let ticks: u64 = f[11].parse::<u64>().expect("utime") + f[12].parse::<u64>().expect("stime");
    // SAFETY: `sysconf` takes a plain value.
    let hz = u64::try_from(unsafe { libc::sysconf(libc::_SC_CLK_TCK) }).unwrap_or(100);
    Duration::from_millis(ticks * 1000 / hz)
}

/// CPU time of this process.
pub fn cpu_time() -> Duration {
    cpu_time_of("self")
}

/// `portless serve` in a thread of the test; stopped and joined by [`stop`](Self::stop) or
/// on drop.
pub struct InProcessDaemon {
    server: Option<std::thread::JoinHandle<()>>,
    stop: Option<tokio::sync::oneshot::Sender<()>>,
}

impl InProcessDaemon {
    /// Starts the daemon with `config` and waits (up to 10 s) until `listening()` says it
    /// answers.
    pub fn start(config: host_shim::config::HostConfig, listening: impl Fn() -> bool) -> Self {
        let (tx, rx) = tokio::sync::oneshot::channel::<()>();
        let server = std::thread::spawn(move || {
            let rt = tokio::runtime::Builder::new_multi_thread()
                .enable_all()
                .build()
                .expect("runtime");
            rt.block_on(async move {
                tokio::select! {
                    r = host_shim::daemon::serve(config) => r.expect("daemon runs"),
                    _ = rx => {}
                }
            });
        });
        let deadline = std::time::Instant::now() + Duration::from_secs(10);
        while !listening() {
            assert!(!server.is_finished(), "daemon stopped before listening");
            assert!(
                std::time::Instant::now() < deadline,
                "daemon never listened"
            );
            std::thread::sleep(Duration::from_millis(10));
        }
        Self {
            server: Some(server),
            stop: Some(tx),
        }
    }

    /// Starts the daemon and waits for its API socket.
    pub fn start_on(config: host_shim::config::HostConfig) -> Self {
        let socket = config.daemon.socket.clone();
        let _ = std::fs::remove_file(&socket);
        Self::start(config, move || UnixStream::connect(&socket).is_ok())
    }

    /// Stops the daemon and waits for its thread.
    pub fn stop(&mut self) {
        if let Some(tx) = self.stop.take() {
            let _ = tx.send(());
        }
        if let Some(t) = self.server.take() {
            t.join().expect("daemon thread");
        }
    }
}

impl Drop for InProcessDaemon {
    fn drop(&mut self) {
        if let Some(tx) = self.stop.take() {
            let _ = tx.send(());
        }
        if let Some(t) = self.server.take() {
            let _ = t.join();
        }
    }
}
