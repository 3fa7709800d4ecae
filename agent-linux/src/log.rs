//! One line per event on stderr, and optionally in the kernel log (`/dev/kmsg`), so that a
//! guest without a logging daemon still keeps a record. Lines are formatted into a fixed
//! buffer: logging never allocates.

use std::fmt::Write as _;
use std::os::fd::{AsRawFd, OwnedFd};

use agent_core::platform::LogEvent;
use ring_protocol::message::Outcome;

use crate::sys;

/// Where log lines go.
pub(crate) struct Log {
    kmsg: Option<OwnedFd>,
    quiet: bool,
}

/// A line being formatted; too long a line is cut, never an error.
struct Line {
    buf: [u8; 512],
    len: usize,
}

impl std::fmt::Write for Line {
    fn write_str(&mut self, s: &str) -> std::fmt::Result {
        let room = self.buf.len().saturating_sub(self.len + 1);
        let take = s.len().min(room);
        if let Some(dst) = self.buf.get_mut(self.len..self.len + take) {
            dst.copy_from_slice(s.as_bytes().get(..take).unwrap_or_default());
            self.len += take;
        }
        Ok(())
    }
}

impl Log {
    /// Logs to stderr, and to the kernel log if `kmsg`; `quiet` drops per-execution lines.
    pub(crate) fn new(kmsg: bool, quiet: bool) -> Self {
        let kmsg = kmsg
            .then(|| sys::open(c"/dev/kmsg", libc::O_WRONLY, 0).ok())
            .flatten();
        Self { kmsg, quiet }
    }

    /// Writes one line (a newline is added).
    pub(crate) fn line(&self, args: std::fmt::Arguments<'_>) {
        let mut line = Line {
            buf: [0; 512],
            len: 0,
        };
        let _ = line.write_str("portless-agent: ");
        let _ = line.write_fmt(args);
        let _ = line.write_str("\n");
        let bytes = line.buf.get(..line.len).unwrap_or_default();
        let _ = sys::write_all(libc::STDERR_FILENO, bytes);
        if let Some(k) = &self.kmsg {
            let _ = sys::write_all(k.as_raw_fd(), bytes);
        }
    }

    /// Logs an event of the state machine.
    pub(crate) fn event(&self, event: &LogEvent<'_>) {
        match event {
            LogEvent::Started { execution, command } if !self.quiet => {
                self.line(format_args!("exec {execution} started: {command}"));
            }
            LogEvent::Finished {
                execution,
                finished,
                leftovers,
            } if !self.quiet => {
                let how = match finished.outcome {
                    Outcome::Exited(c) => Ended::Code(c),
                    Outcome::Signaled(s) => Ended::Signal(s),
                    Outcome::TimedOut => Ended::Word("timed out"),
                    Outcome::Cancelled => Ended::Word("cancelled"),
                    Outcome::FailedToStart(e) => Ended::FailedToStart(e),
                };
                self.line(format_args!(
                    "exec {execution} ended: {how} after {} ms ({} + {} bytes of output{}){}",
                    finished.duration_ms,
                    finished.stdout_bytes,
                    finished.stderr_bytes,
                    if finished.truncated {
                        ", truncated"
                    } else {
                        ""
                    },
                    Leftovers(*leftovers),
                ));
            }
            LogEvent::Rejected { what, reason } => {
                self.line(format_args!("rejected {what}: {reason:?}"));
            }
            LogEvent::Pushed { name, size } => {
                self.line(format_args!("program {name} pushed ({size} bytes)"));
            }
            LogEvent::Protocol(what) => self.line(format_args!("protocol: {what}")),
            _ => {}
        }
    }
}

/// ", killed N processes it left running", or nothing.
struct Leftovers(u32);

impl std::fmt::Display for Leftovers {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self.0 {
            0 => Ok(()),
            1 => f.write_str(", killed 1 process it left running"),
            n => write!(f, ", killed {n} processes it left running"),
        }
    }
}

enum Ended {
    Code(i32),
    Signal(i32),
    Word(&'static str),
    FailedToStart(i32),
}

impl std::fmt::Display for Ended {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Self::Code(c) => write!(f, "exit code {c}"),
            Self::Signal(s) => write!(f, "signal {s}"),
            Self::Word(w) => f.write_str(w),
            Self::FailedToStart(e) => write!(f, "failed to start (errno {e})"),
        }
    }
}
