//! `agent_core::Platform` for Linux: clone/exec into process groups, non-blocking pipes,
//! signals, the push staging file, and figures from /proc. No heap allocation after start-up.

use std::ffi::CStr;
use std::os::fd::{AsRawFd, OwnedFd, RawFd};

use agent_core::platform::{
    Errno, ExitStatus, Identity, LogEvent, Platform, ReadOutcome, Signal, SpawnRequest,
    SystemMetrics,
};
use ring_protocol::message::Stream;

use crate::log::Log;
use crate::sys;

/// Longest path the platform builds (push directory and file name).
const PATH_MAX: usize = 512;

/// A process started by the agent.
pub(crate) struct Process {
    pid: libc::pid_t,
    stdout: Option<OwnedFd>,
    stderr: Option<OwnedFd>,
    reaped: bool,
}

impl Process {
    /// The pipes still open, for the wait loop.
    pub(crate) fn fds(&self) -> impl Iterator<Item = RawFd> + '_ {
        self.stdout
            .iter()
            .chain(self.stderr.iter())
            .map(AsRawFd::as_raw_fd)
    }
}

/// A NUL-terminated path built in a fixed buffer.
struct PathBuf {
    bytes: [u8; PATH_MAX],
    len: usize,
}

impl PathBuf {
    fn new() -> Self {
        Self {
            bytes: [0; PATH_MAX],
            len: 0,
        }
    }

    fn set(&mut self, parts: &[&str]) -> Result<&CStr, Errno> {
        self.len = 0;
        for p in parts {
            let end = self.len + p.len();
            let dst = self
                .bytes
                .get_mut(self.len..end)
                .ok_or(libc::ENAMETOOLONG)?;
            dst.copy_from_slice(p.as_bytes());
            self.len = end;
        }
        *self.bytes.get_mut(self.len).ok_or(libc::ENAMETOOLONG)? = 0;
        CStr::from_bytes_with_nul(self.bytes.get(..=self.len).unwrap_or_default())
            .map_err(|_| libc::EINVAL)
    }
}

/// The Linux platform.
pub(crate) struct LinuxPlatform {
    image: Box<sys::ExecImage>,
    scratch: Box<[u8; 64 * 1024]>,
    push_file: Option<OwnedFd>,
    push_partial: PathBuf,
    push_final: PathBuf,
    log: Log,
}

impl LinuxPlatform {
    pub(crate) fn new(log: Log) -> Self {
        Self {
            image: Box::new(sys::ExecImage::new()),
            scratch: Box::new([0; 64 * 1024]),
            push_file: None,
            push_partial: PathBuf::new(),
            push_final: PathBuf::new(),
            log,
        }
    }

    /// Writes a line to the agent's log.
    pub(crate) fn log_line(&self, args: std::fmt::Arguments<'_>) {
        self.log.line(args);
    }

    /// Resolves a user or group name through `/etc/passwd` or `/etc/group` (the third
    /// field of a `name:x:id:...` line), reading into the platform's scratch buffer.
    fn resolve(&mut self, who: Identity<'_>, file: &CStr) -> Result<u32, Errno> {
        let name = match who {
            Identity::Id(id) => return Ok(id),
            Identity::Name(n) => n,
        };
        let n = sys::read_file(file, &mut self.scratch[..])
            .map_err(|e| e.raw_os_error().unwrap_or(libc::EIO))?;
        let text = self.scratch.get(..n).unwrap_or_default();
        for line in text.split(|b| *b == b'\n') {
            let mut fields = line.split(|b| *b == b':');
            if fields.next() == Some(name.as_bytes()) {
                let id = fields
                    .nth(1)
                    .and_then(|f| std::str::from_utf8(f).ok())
                    .and_then(|f| f.parse().ok());
                return id.ok_or(libc::EINVAL);
            }
        }
        Err(libc::ESRCH)
    }

    fn proc_number(&mut self, path: &CStr, key: &str) -> Option<u64> {
        let n = sys::read_file(path, &mut self.scratch[..]).ok()?;
        let text = std::str::from_utf8(self.scratch.get(..n)?).ok()?;
        text.lines()
            .find_map(|l| l.strip_prefix(key))
            .and_then(|rest| rest.split_whitespace().next())
            .and_then(|v| v.parse().ok())
    }
}

impl Platform for LinuxPlatform {
    type Process = Process;

    fn spawn(&mut self, req: &SpawnRequest<'_>) -> Result<Process, Errno> {
        let uid = req
            .user
            .map(|u| self.resolve(u, c"/etc/passwd"))
            .transpose()?;
        let gid = req
            .group
            .map(|g| self.resolve(g, c"/etc/group"))
            .transpose()?;
        self.image.build(req.program, req.args, req.env, req.cwd)?;
        let child = sys::spawn(&self.image, uid, gid)?;
        Ok(Process {
            pid: child.pid,
            stdout: Some(child.stdout),
            stderr: Some(child.stderr),
            reaped: false,
        })
    }

    fn read_output(&mut self, p: &mut Process, stream: Stream, buf: &mut [u8]) -> ReadOutcome {
        let slot = match stream {
            Stream::Stdout => &mut p.stdout,
            Stream::Stderr => &mut p.stderr,
        };
        let Some(fd) = slot.as_ref() else {
            return ReadOutcome::Closed;
        };
        match sys::read(fd.as_raw_fd(), buf) {
            sys::ReadResult::Data(n) => ReadOutcome::Data(n),
            sys::ReadResult::WouldBlock => ReadOutcome::WouldBlock,
            sys::ReadResult::Closed => {
                *slot = None;
                ReadOutcome::Closed
            }
        }
    }

    fn try_wait(&mut self, p: &mut Process) -> Option<ExitStatus> {
        if p.reaped {
            return None;
        }
        let status = sys::try_wait(p.pid)?;
        p.reaped = true;
        Some(match status {
            sys::WaitStatus::Exited(c) => ExitStatus::Exited(c),
            sys::WaitStatus::Signaled(s) => ExitStatus::Signaled(s),
        })
    }

    fn signal(&mut self, p: &mut Process, signal: Signal) {
        let sig = match signal {
            Signal::Terminate => libc::SIGTERM,
            Signal::Kill => libc::SIGKILL,
        };
        // The group outlives the leader when children linger: signal it even once reaped.
        sys::kill_group(p.pid, sig);
    }

    fn release(&mut self, mut p: Process) {
        // Whatever the process left behind in its group has had its chance.
        if !p.reaped {
            sys::kill_group(p.pid, libc::SIGKILL);
            while self.try_wait(&mut p).is_none() {
                std::thread::yield_now();
            }
        }
    }

    fn push_create(&mut self, dir: &str, name: &str) -> Result<(), Errno> {
        let errno = |e: std::io::Error| e.raw_os_error().unwrap_or(libc::EIO);
        sys::ensure_dir(self.push_final.set(&[dir])?).map_err(errno)?;
        self.push_final.set(&[dir, "/", name])?;
        let partial = self.push_partial.set(&[dir, "/.", name, ".partial"])?;
        let fd = sys::open(
            partial,
            libc::O_WRONLY | libc::O_CREAT | libc::O_TRUNC | libc::O_NOFOLLOW,
            0o600,
        )
        .map_err(errno)?;
        self.push_file = Some(fd);
        Ok(())
    }

    fn push_write(&mut self, data: &[u8]) -> Result<(), Errno> {
        let fd = self.push_file.as_ref().ok_or(libc::EBADF)?;
        sys::write_all(fd.as_raw_fd(), data).map_err(|e| e.raw_os_error().unwrap_or(libc::EIO))
    }

    fn push_finish(&mut self, keep: bool) -> Result<(), Errno> {
        let errno = |e: std::io::Error| e.raw_os_error().unwrap_or(libc::EIO);
        let Some(fd) = self.push_file.take() else {
            return Err(libc::EBADF);
        };
        let partial = CStr::from_bytes_with_nul(
            self.push_partial
                .bytes
                .get(..=self.push_partial.len)
                .unwrap_or_default(),
        )
        .map_err(|_| libc::EINVAL)?;
        if !keep {
            sys::unlink(partial);
            return Ok(());
        }
        let result = sys::sync_and_chmod(fd.as_raw_fd(), 0o700).and_then(|()| {
            let to = CStr::from_bytes_with_nul(
                self.push_final
                    .bytes
                    .get(..=self.push_final.len)
                    .unwrap_or_default(),
            )
            .map_err(|_| std::io::Error::from_raw_os_error(libc::EINVAL))?;
            sys::rename(partial, to)
        });
        if result.is_err() {
            sys::unlink(partial);
        }
        result.map_err(errno)
    }

    fn metrics(&mut self) -> SystemMetrics {
        let mut m = SystemMetrics::default();
        if let Ok(n) = sys::read_file(c"/proc/uptime", &mut self.scratch[..]) {
            let text = std::str::from_utf8(self.scratch.get(..n).unwrap_or_default()).unwrap_or("");
            if let Some(Ok(secs)) = text.split_whitespace().next().map(str::parse::<f64>) {
                #[allow(clippy::cast_possible_truncation, clippy::cast_sign_loss)]
                let ms = (secs * 1000.0) as u64;
                m.uptime_ms = ms;
            }
        }
        if let Ok(n) = sys::read_file(c"/proc/loadavg", &mut self.scratch[..]) {
            let text = std::str::from_utf8(self.scratch.get(..n).unwrap_or_default()).unwrap_or("");
            for (slot, field) in m.load_milli.iter_mut().zip(text.split_whitespace()) {
                #[allow(clippy::cast_possible_truncation, clippy::cast_sign_loss)]
                if let Ok(v) = field.parse::<f64>() {
                    *slot = (v * 1000.0) as u32;
                }
            }
        }
        m.mem_total_kib = self.proc_number(c"/proc/meminfo", "MemTotal:").unwrap_or(0);
        m.mem_available_kib = self
            .proc_number(c"/proc/meminfo", "MemAvailable:")
            .unwrap_or(0);
        m.processes = sys::count_processes();
        if let Ok(n) = sys::read_file(c"/proc/self/statm", &mut self.scratch[..]) {
            let text = std::str::from_utf8(self.scratch.get(..n).unwrap_or_default()).unwrap_or("");
            if let Some(Ok(pages)) = text.split_whitespace().nth(1).map(str::parse::<u64>) {
                m.agent_rss_kib = pages * sys::page_size() / 1024;
            }
        }
        m
    }

    fn log(&mut self, event: &LogEvent<'_>) {
        self.log.event(event);
    }
}
