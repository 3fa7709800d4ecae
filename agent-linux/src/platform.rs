//! `agent_core::Platform` for Linux: clone/exec into process groups, non-blocking pipes,
//! signals, the push staging file, and figures from /proc. No heap allocation after start-up.

use std::ffi::CStr;
use std::os::fd::{AsRawFd, OwnedFd, RawFd};

use agent_core::config::MAX_PRINCIPAL_LEN;
use agent_core::platform::{
    Errno, ExitStatus, Identity, LogEvent, Platform, ReadOutcome, Signal, SpawnRequest,
    SystemMetrics,
};
use ring_protocol::message::Stream;

use crate::contain::{CgroupFiles, Cgroups};
use crate::log::Log;
use crate::sys;

/// A process started by the agent.
pub(crate) struct Process {
    pid: libc::pid_t,
    stdout: Option<OwnedFd>,
    stderr: Option<OwnedFd>,
    reaped: bool,
    /// Its cgroup's number and files, when executions are contained in cgroups.
    cgroup: Option<(u64, CgroupFiles)>,
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

/// The live processes in the process group `pgid` (a scan of /proc; zombies do not count).
/// A group with no process at all, the usual case, costs one system call.
fn group_size(pgid: libc::pid_t) -> u32 {
    if !sys::group_exists(pgid) {
        return 0;
    }
    let mut count = 0u32;
    sys::for_each_pid(|pid| {
        if sys::live_process_group(pid) == Some(pgid) {
            count = count.saturating_add(1);
        }
    });
    count
}

/// Most supplementary groups a process is started with (`initgroups` allows more; a user
/// in more groups than this is refused with E2BIG rather than started with some missing).
pub(crate) const MAX_GROUPS: usize = 64;

/// Who a process runs as, resolved: `None` keeps the agent's own id.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) struct Credentials {
    pub(crate) uid: Option<u32>,
    pub(crate) gid: Option<u32>,
    /// The supplementary groups (the first `ngroups`), set whenever `gid` is.
    pub(crate) groups: [libc::gid_t; MAX_GROUPS],
    pub(crate) ngroups: usize,
}

impl Default for Credentials {
    fn default() -> Self {
        Self {
            uid: None,
            gid: None,
            groups: [0; MAX_GROUPS],
            ngroups: 0,
        }
    }
}

impl Credentials {
    /// The supplementary groups.
    pub(crate) fn groups(&self) -> &[libc::gid_t] {
        self.groups.get(..self.ngroups).unwrap_or_default()
    }
}

/// One line of `/etc/passwd` or `/etc/group`: its name, its id (third field) and, for
/// passwd, its primary group (fourth field).
struct Entry<'t> {
    name: &'t [u8],
    id: u32,
    gid: Option<u32>,
}

fn parse_id(field: &[u8]) -> Option<u32> {
    std::str::from_utf8(field).ok()?.parse().ok()
}

/// The first line of a `name:x:id:...` table whose field `key` matches. Lines starting
/// with `#` or `+`/`-` (NIS) are skipped.
fn find_entry(text: &[u8], matches: impl Fn(&[u8]) -> bool, key: usize) -> Option<Entry<'_>> {
    text.split(|b| *b == b'\n')
        .filter(|l| !matches!(l.first(), None | Some(b'#' | b'+' | b'-')))
        .find_map(|line| {
            let field = line.split(|b| *b == b':').nth(key)?;
            if !matches(field) {
                return None;
            }
            let mut fields = line.split(|b| *b == b':');
            let name = fields.next()?;
            let id = parse_id(fields.nth(1)?)?;
            let gid = fields.next().and_then(parse_id);
            Some(Entry { name, id, gid })
        })
}

/// The groups of `user` as `initgroups` makes them: `primary` first, then every group of
/// `/etc/group` (`text`) whose member list names the user, each once. Returns the count.
fn member_groups(
    text: &[u8],
    user: &[u8],
    primary: u32,
    out: &mut [libc::gid_t; MAX_GROUPS],
) -> Result<usize, Errno> {
    out[0] = primary;
    let mut n = 1;
    for line in text.split(|b| *b == b'\n') {
        if matches!(line.first(), None | Some(b'#' | b'+' | b'-')) {
            continue;
        }
        let mut fields = line.split(|b| *b == b':');
        let (Some(_), Some(_), Some(id), Some(members)) =
            (fields.next(), fields.next(), fields.next(), fields.next())
        else {
            continue;
        };
        let Some(gid) = parse_id(id) else {
            continue;
        };
        let member = members
            .split(|b| *b == b',')
            .any(|m| m.trim_ascii() == user);
        if !member || out.get(..n).unwrap_or_default().contains(&gid) {
            continue;
        }
        *out.get_mut(n).ok_or(libc::E2BIG)? = gid;
        n += 1;
    }
    Ok(n)
}

/// The Linux platform.
pub(crate) struct LinuxPlatform {
    image: Box<sys::ExecImage>,
    scratch: Box<[u8; 64 * 1024]>,
    push_file: Option<OwnedFd>,
    push_partial: sys::PathBuf,
    push_final: sys::PathBuf,
    cgroups: Option<Cgroups>,
    log: Log,
}

impl LinuxPlatform {
    /// The platform, with executions contained by `cgroups` (else by process groups).
    pub(crate) fn new(log: Log, cgroups: Option<Cgroups>) -> Self {
        Self {
            cgroups,
            image: Box::new(sys::ExecImage::new()),
            scratch: Box::new([0; 64 * 1024]),
            push_file: None,
            push_partial: sys::PathBuf::new(),
            push_final: sys::PathBuf::new(),
            log,
        }
    }

    /// Writes a line to the agent's log.
    pub(crate) fn log_line(&self, args: std::fmt::Arguments<'_>) {
        self.log.line(args);
    }

    /// Reads `file` whole into the scratch buffer; a file that fills it is refused (EFBIG)
    /// rather than read in part, so that no entry is silently missed.
    fn read_table(&mut self, file: &CStr) -> Result<usize, Errno> {
        let n = sys::read_file(file, &mut self.scratch[..])
            .map_err(|e| e.raw_os_error().unwrap_or(libc::EIO))?;
        if n == self.scratch.len() {
            return Err(libc::EFBIG);
        }
        Ok(n)
    }

    /// The credentials a process runs with, resolved through `/etc/passwd` and `/etc/group`
    /// the way `runuser`/`initgroups` resolve them:
    /// - a `user` without a `group` runs with the user's primary group and every group whose
    ///   member list names the user (a user without a passwd entry is refused, ESRCH: there
    ///   is no group to give it);
    /// - a `group` runs with that group alone as primary and supplementary group;
    /// - neither keeps the agent's own credentials.
    fn credentials(
        &mut self,
        user: Option<Identity<'_>>,
        group: Option<Identity<'_>>,
    ) -> Result<Credentials, Errno> {
        let mut creds = Credentials::default();
        if let Some(group) = group {
            let gid = match group {
                Identity::Id(id) => id,
                Identity::Name(name) => {
                    let n = self.read_table(c"/etc/group")?;
                    let text = self.scratch.get(..n).unwrap_or_default();
                    find_entry(text, |f| f == name.as_bytes(), 0)
                        .ok_or(libc::ESRCH)?
                        .id
                }
            };
            creds.gid = Some(gid);
            creds.groups[0] = gid;
            creds.ngroups = 1;
        }
        let Some(user) = user else {
            return Ok(creds);
        };
        let n = self.read_table(c"/etc/passwd")?;
        let text = self.scratch.get(..n).unwrap_or_default();
        let entry = match user {
            Identity::Name(name) => find_entry(text, |f| f == name.as_bytes(), 0),
            Identity::Id(id) => find_entry(text, |f| parse_id(f) == Some(id), 2),
        };
        let entry = match entry {
            Some(e) => e,
            None if creds.gid.is_some() => {
                // A numeric user with an explicit group needs no passwd entry.
                let Identity::Id(id) = user else {
                    return Err(libc::ESRCH);
                };
                creds.uid = Some(id);
                return Ok(creds);
            }
            None => return Err(libc::ESRCH),
        };
        creds.uid = Some(entry.id);
        if creds.gid.is_some() {
            return Ok(creds);
        }
        let primary = entry.gid.ok_or(libc::EINVAL)?;
        // The name is copied out: the group table is read into the same buffer.
        let mut name = [0u8; MAX_PRINCIPAL_LEN];
        let name_len = entry.name.len();
        name.get_mut(..name_len)
            .ok_or(libc::ENAMETOOLONG)?
            .copy_from_slice(entry.name);
        let n = self.read_table(c"/etc/group")?;
        let text = self.scratch.get(..n).unwrap_or_default();
        creds.gid = Some(primary);
        creds.ngroups = member_groups(
            text,
            name.get(..name_len).unwrap_or_default(),
            primary,
            &mut creds.groups,
        )?;
        Ok(creds)
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
        let creds = self.credentials(req.user, req.group)?;
        self.image.build(req.program, req.args, req.env, req.cwd)?;
        let cgroup = match self.cgroups.as_mut() {
            Some(c) => Some(c.create(&req.limits)?),
            None if req.limits.any() => return Err(libc::EOPNOTSUPP),
            None => None,
        };
        let child = sys::spawn(
            &self.image,
            &creds,
            cgroup.as_ref().map(|(_, files)| files.raw()),
        );
        match child {
            Ok(child) => Ok(Process {
                pid: child.pid,
                stdout: Some(child.stdout),
                stderr: Some(child.stderr),
                reaped: false,
                cgroup,
            }),
            Err(e) => {
                if let (Some(c), Some((n, files))) = (self.cgroups.as_mut(), cgroup) {
                    c.recycle(n, files, &mut self.scratch[..]);
                }
                Err(e)
            }
        }
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
        if let (Some(c), Some((n, files))) = (self.cgroups.as_mut(), p.cgroup.as_mut()) {
            c.signal(*n, sig, &mut self.scratch[..]);
            files.killed |= sig == libc::SIGKILL;
        }
    }

    fn kill_leftovers(&mut self, p: &mut Process) -> u32 {
        let left = match (self.cgroups.as_mut(), p.cgroup.as_mut()) {
            (Some(c), Some((n, files))) => {
                let left = c.count(*n, &mut self.scratch[..]);
                files.seen_empty = left == 0;
                left
            }
            _ => group_size(p.pid),
        };
        if left > 0 {
            self.signal(p, Signal::Kill);
        }
        left
    }

    fn leftovers_gone(&mut self, p: &mut Process) -> bool {
        let gone = match (self.cgroups.as_mut(), p.cgroup.as_ref()) {
            (Some(c), Some((n, _))) => c.is_empty(*n, &mut self.scratch[..]),
            _ => group_size(p.pid) == 0,
        };
        if !gone {
            // Whatever was forked while the kill went out.
            self.signal(p, Signal::Kill);
        }
        gone
    }

    fn release(&mut self, mut p: Process) {
        // Whatever the process left behind has had its chance.
        if !p.reaped {
            self.signal(&mut p, Signal::Kill);
            while self.try_wait(&mut p).is_none() {
                std::thread::yield_now();
            }
        }
        if let (Some(c), Some((n, files))) = (self.cgroups.as_mut(), p.cgroup.take()) {
            c.recycle(n, files, &mut self.scratch[..]);
        }
    }

    fn push_create(&mut self, dir: &str, name: &str) -> Result<(), Errno> {
        let errno = |e: std::io::Error| e.raw_os_error().unwrap_or(libc::EIO);
        sys::ensure_private_dir(self.push_final.set(&[dir])?).map_err(errno)?;
        self.push_final.set(&[dir, "/", name])?;
        let partial = self.push_partial.set(&[dir, "/.", name, ".partial"])?;
        // A new file every time: whatever has the staging name (an earlier partial file, or
        // a link to some other file) is unlinked, never opened, written or truncated.
        sys::unlink(partial);
        let fd = sys::open(
            partial,
            libc::O_WRONLY | libc::O_CREAT | libc::O_EXCL | libc::O_NOFOLLOW,
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
        let partial = self.push_partial.get().ok_or(libc::EINVAL)?;
        if !keep {
            sys::unlink(partial);
            return Ok(());
        }
        let result = sys::sync_and_chmod(fd.as_raw_fd(), 0o700).and_then(|()| {
            let to = self
                .push_final
                .get()
                .ok_or_else(|| std::io::Error::from_raw_os_error(libc::EINVAL))?;
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

#[cfg(test)]
mod tests {
    use super::*;

    const PASSWD: &[u8] = b"root:x:0:0:root:/root:/bin/sh\n# a comment\n\
        nobody:x:65534:65534:nobody:/nonexistent:/bin/false\n\
        ops:x:1000:1000::/home/ops:/bin/sh\n";
    const GROUP: &[u8] = b"root:x:0:\nnogroup:x:65534:\nops:x:1000:\n\
        adm:x:4:syslog,ops\nwheel:x:10:root\ndisk:x:6: ops \nbroken:x\nops-again:x:1000:ops\n";

    #[test]
    fn users_are_found_by_name_or_uid_with_their_primary_group() {
        let e = find_entry(PASSWD, |f| f == b"ops", 0).expect("found");
        assert_eq!((e.name, e.id, e.gid), (&b"ops"[..], 1000, Some(1000)));
        let e = find_entry(PASSWD, |f| parse_id(f) == Some(65534), 2).expect("found");
        assert_eq!(e.name, b"nobody");
        assert!(find_entry(PASSWD, |f| f == b"a comment", 0).is_none());
        assert!(find_entry(PASSWD, |f| f == b"nope", 0).is_none());
    }

    #[test]
    fn supplementary_groups_are_the_primary_then_every_group_naming_the_user_once() {
        let mut out = [0; MAX_GROUPS];
        let n = member_groups(GROUP, b"ops", 1000, &mut out).expect("fits");
        assert_eq!(&out[..n], [1000, 4, 6]);
        let n = member_groups(GROUP, b"nobody", 65534, &mut out).expect("fits");
        assert_eq!(&out[..n], [65534]);
        let n = member_groups(GROUP, b"root", 0, &mut out).expect("fits");
        assert_eq!(&out[..n], [0, 10]);
    }

    #[test]
    fn too_many_groups_are_refused_not_cut() {
        let mut text = Vec::new();
        for g in 0..MAX_GROUPS as u32 + 1 {
            text.extend_from_slice(format!("g{g}:x:{}:u\n", g + 100).as_bytes());
        }
        let mut out = [0; MAX_GROUPS];
        assert_eq!(member_groups(&text, b"u", 1, &mut out), Err(libc::E2BIG));
    }
}
