//! A client of the QEMU guest agent over its QEMU chardev socket (QMP-style JSON, one reply
//! per line): the lowest-level path to qemu-ga, with nothing (libvirt, a daemon) in between.

use std::io::{BufRead, BufReader, Write};
use std::os::unix::net::UnixStream;
use std::path::Path;
use std::time::{Duration, Instant};

use anyhow::{Context, Result, bail};
use base64::Engine;
use serde_json::{Value, json};

/// How long one reply may take before the bench gives up.
const REPLY_LIMIT: Duration = Duration::from_secs(300);

/// A connection to one guest's qemu-ga.
pub(crate) struct Qga {
    writer: UnixStream,
    reader: BufReader<UnixStream>,
    line: String,
}

/// What one `guest-exec` produced.
pub(crate) struct Run {
    /// The exit code.
    pub(crate) exit_code: i64,
    /// Its standard output (decoded).
    pub(crate) stdout: Vec<u8>,
    /// Whether qemu-ga said it dropped output.
    pub(crate) truncated: bool,
    /// `guest-exec-status` calls it took.
    pub(crate) polls: u32,
}

impl Qga {
    /// Connects to the chardev socket at `path`, waiting up to `limit` for QEMU to create it.
    pub(crate) fn connect(path: &Path, limit: Duration) -> Result<Self> {
        let deadline = Instant::now() + limit;
        let stream = loop {
            match UnixStream::connect(path) {
                Ok(s) => break s,
                Err(e) if Instant::now() > deadline => {
                    return Err(e).with_context(|| format!("connecting to {}", path.display()));
                }
                Err(_) => std::thread::sleep(Duration::from_millis(5)),
            }
        };
        stream.set_read_timeout(Some(REPLY_LIMIT))?;
        Ok(Self {
            writer: stream.try_clone()?,
            reader: BufReader::with_capacity(1 << 16, stream),
            line: String::new(),
        })
    }

    /// Sends one command and returns its `return` value.
    pub(crate) fn call(&mut self, execute: &str, arguments: Value) -> Result<Value> {
        let request = if arguments.is_null() {
            json!({ "execute": execute })
        } else {
            json!({ "execute": execute, "arguments": arguments })
        };
        let mut text = serde_json::to_vec(&request)?;
        text.push(b'\n');
        self.writer.write_all(&text)?;
        self.reply(execute)
    }

    fn reply(&mut self, execute: &str) -> Result<Value> {
        loop {
            self.line.clear();
            let n = self
                .reader
                .read_line(&mut self.line)
                .with_context(|| format!("reading qemu-ga's reply to {execute}"))?;
            if n == 0 {
                bail!("qemu-ga's socket closed during {execute}");
            }
            let text = self
                .line
                .trim_matches(|c: char| c.is_whitespace() || c == '\u{ff}');
            if text.is_empty() {
                continue;
            }
            let mut v: Value = serde_json::from_str(text)
                .with_context(|| format!("qemu-ga's reply to {execute} is not JSON"))?;
            if let Some(e) = v.get("error") {
                bail!("qemu-ga refused {execute}: {e}");
            }
            return match v.get_mut("return") {
                Some(r) => Ok(r.take()),
                None => bail!("qemu-ga's reply to {execute} has no `return`: {text:.200}"),
            };
        }
    }

    /// One no-op round trip (`guest-ping`); returns its time.
    pub(crate) fn ping(&mut self) -> Result<Duration> {
        let t = Instant::now();
        self.call("guest-ping", Value::Null)?;
        Ok(t.elapsed())
    }

    /// Runs `path` with `args` (`guest-exec`, output captured) and polls `guest-exec-status`
    /// back to back until it has exited: the quickest way qemu-ga offers to learn the end.
    pub(crate) fn run(&mut self, path: &str, args: &[&str]) -> Result<Run> {
        let started = self.call(
            "guest-exec",
            json!({ "path": path, "arg": args, "capture-output": true }),
        )?;
        let pid = started["pid"]
            .as_i64()
            .context("guest-exec answered no pid")?;
        let mut polls = 0;
        loop {
            polls += 1;
            let status = self.call("guest-exec-status", json!({ "pid": pid }))?;
            if status["exited"].as_bool() != Some(true) {
                continue;
            }
            let stdout = match status["out-data"].as_str() {
                Some(b64) => base64::engine::general_purpose::STANDARD
                    .decode(b64)
                    .context("qemu-ga's out-data is not base64")?,
                None => Vec::new(),
            };
            let Some(exit_code) = status["exitcode"].as_i64() else {
                bail!("{path} did not exit normally: {status}");
            };
            return Ok(Run {
                exit_code,
                stdout,
                truncated: status["out-truncated"].as_bool() == Some(true),
                polls,
            });
        }
    }

    /// qemu-ga's version (`guest-info`).
    pub(crate) fn version(&mut self) -> Result<String> {
        let info = self.call("guest-info", Value::Null)?;
        Ok(info["version"].as_str().unwrap_or("unknown").to_owned())
    }
}
