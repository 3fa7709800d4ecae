//! Containment of executions.
//!
//! Where the guest has cgroup v2, every execution runs in a cgroup of its own,
//! `<base>/exec-N`, which its first process starts in (`clone3` with `CLONE_INTO_CGROUP`, or,
//! on a kernel before 5.7, by joining it before it `execve`s). Whatever the command
//! starts stays in it, whether it leaves its process group (`setsid`) or not. So the
//! execution is signalled as a whole, killed as a whole with `cgroup.kill`, over once the
//! cgroup is empty, and limited by the allow-list's `memory_max`, `pids_max` and
//! `cpu_max_percent` (`memory.max`, `pids.max`, `cpu.max`).
//!
//! Without cgroup v2 (or with `--cgroup off`) the process group is all there is: it is
//! signalled and killed as a whole, and a process that left it escapes. Limits cannot be
//! enforced there, so a command that sets one does not start (EOPNOTSUPP).
//!
//! `base` is, by default, beside the agent: the agent's own cgroup when that is not the
//! root (the agent moves itself into a leaf `agent` below it, so that its cgroup may have
//! controllers for its children: under systemd that needs `Delegate=yes`), or
//! `portless-agent` below the root. `--cgroup DIR` names it instead. Cgroups left by an
//! earlier agent (it was killed) are emptied and removed at start-up.
//!
//! Set-up allocates; the per-execution calls do not (paths are built in fixed buffers, files
//! read into the platform's scratch buffer).

use std::ffi::{CStr, CString};
use std::os::fd::OwnedFd;
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use agent_core::platform::{Errno, Limits};

use crate::sys;

/// Where executions' cgroups go, from `--cgroup`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) enum CgroupMode {
    /// Beside the agent in its own cgroup v2 hierarchy, if the guest has one (the default).
    Auto,
    /// Nowhere: process groups only.
    Off,
    /// Below this cgroup v2 directory (created if missing).
    Under(PathBuf),
}

/// `statfs` type of cgroup v2.
const CGROUP2_SUPER_MAGIC: u64 = 0x6367_7270;

/// The controllers an execution's limits need, as bits.
const MEMORY: u8 = 1;
const PIDS: u8 = 2;
const CPU: u8 = 4;
const CONTROLLERS: [(&str, u8); 3] = [("memory", MEMORY), ("pids", PIDS), ("cpu", CPU)];

/// Most empty cgroups kept for the next executions (as many as can run at once): making and
/// removing a cgroup with its controllers' files costs milliseconds in an emulated guest.
const POOL: usize = agent_core::config::MAX_RUNNING;

/// Longest a removal waits for a killed cgroup to empty.
const EMPTY_WAIT: Duration = Duration::from_secs(1);

/// An execution's cgroup, open: its directory (for `clone3`'s `CLONE_INTO_CGROUP`) and its
/// `cgroup.procs` (for a kernel without it).
pub(crate) struct CgroupFiles {
    dir: OwnedFd,
    procs: OwnedFd,
    /// The limits written to it, as controller bits.
    limited: u8,
    /// Its processes were killed through `cgroup.kill`: it is not used again (a process
    /// started into a cgroup killed before, with `CLONE_INTO_CGROUP`, was seen killed at once
    /// on Linux 6.18).
    pub(crate) killed: bool,
    /// Found empty after its leader was reaped: nothing can enter it again, so it needs no
    /// second look before it is kept for the next execution.
    pub(crate) seen_empty: bool,
}

impl CgroupFiles {
    /// The descriptors, for `sys::spawn`.
    pub(crate) fn raw(&self) -> sys::Cgroup {
        use std::os::fd::AsRawFd;
        sys::Cgroup {
            dir: self.dir.as_raw_fd(),
            procs: self.procs.as_raw_fd(),
        }
    }
}

/// Executions' cgroups: where they go and what the kernel offers there.
pub(crate) struct Cgroups {
    base: String,
    /// Controllers enabled for the children of `base`.
    controllers: u8,
    /// The kernel has `cgroup.kill` (Linux 5.14).
    has_kill: bool,
    next: u64,
    /// Empty cgroups of ended executions, ready for the next ones.
    idle: Vec<(u64, CgroupFiles)>,
    path: sys::PathBuf,
    digits: [u8; 20],
}

impl Cgroups {
    /// Sets up containment as `mode` says. `Ok(None)` with `Off`; for `Auto`, an error says
    /// why there is no cgroup v2 to use (the agent then uses process groups); for `Under`,
    /// an error means the directory cannot be used.
    pub(crate) fn setup(mode: &CgroupMode) -> Result<Option<Self>, String> {
        let base = match mode {
            CgroupMode::Off => return Ok(None),
            CgroupMode::Under(dir) => {
                let dir = dir.to_str().ok_or("the cgroup directory is not UTF-8")?;
                make_dir(dir)?;
                if sys::filesystem_type(&cstring(dir)?).map_err(|e| format!("{dir}: {e}"))?
                    != CGROUP2_SUPER_MAGIC
                {
                    return Err(format!("{dir} is not in a cgroup v2 filesystem"));
                }
                enable_controllers(dir);
                dir.trim_end_matches('/').to_owned()
            }
            CgroupMode::Auto => auto_base()?,
        };
        let mut cgroups = Self {
            controllers: enabled_controllers(&base),
            has_kill: Path::new(&base).join("cgroup.kill").exists(),
            base,
            next: 1,
            idle: Vec::with_capacity(POOL),
            path: sys::PathBuf::new(),
            digits: [0; 20],
        };
        cgroups.remove_stale();
        Ok(Some(cgroups))
    }

    /// One line for the log: where executions go and what is enforced.
    pub(crate) fn describe(&self) -> String {
        let names: Vec<&str> = CONTROLLERS
            .iter()
            .filter(|(_, bit)| self.controllers & bit != 0)
            .map(|(name, _)| *name)
            .collect();
        format!(
            "a cgroup per execution in {} (controllers: {})",
            self.base,
            if names.is_empty() {
                "none".to_owned()
            } else {
                names.join(" ")
            }
        )
    }

    /// Empties and removes the `exec-*` cgroups an earlier agent left.
    fn remove_stale(&mut self) {
        let Ok(dir) = cstring(&self.base) else {
            return;
        };
        let mut stale = Vec::new();
        let _ = sys::for_each_entry(&dir, |name| {
            if let Some(n) = name.strip_prefix(b"exec-").and_then(sys::parse_u64) {
                stale.push(n);
            }
            true
        });
        let mut scratch = vec![0u8; 64 * 1024];
        for n in stale {
            self.remove(n, &mut scratch);
            self.next = self.next.max(n.saturating_add(1));
        }
    }

    /// `<base>/exec-<n><leaf>`, NUL-terminated, in the path buffer.
    fn file(&mut self, n: u64, leaf: &str) -> Result<&CStr, Errno> {
        let digits = sys::format_u64(n, &mut self.digits);
        self.path.set(&[&self.base, "/exec-", digits, leaf])
    }

    /// The cgroup of a new execution, with `limits`: an idle one of an ended execution, or a
    /// new one. Returns its number and its files, open, for the child to start in.
    pub(crate) fn create(&mut self, limits: &Limits) -> Result<(u64, CgroupFiles), Errno> {
        let wanted = limit_bits(limits);
        if wanted & !self.controllers != 0 {
            return Err(libc::EOPNOTSUPP);
        }
        if let Some((n, mut files)) = self.idle.pop() {
            match self.apply(n, limits, files.limited) {
                Ok(()) => {
                    files.limited = wanted;
                    files.seen_empty = false;
                    return Ok((n, files));
                }
                Err(_) => self.discard(n),
            }
        }
        self.make(limits)
    }

    /// A new cgroup with `limits`.
    fn make(&mut self, limits: &Limits) -> Result<(u64, CgroupFiles), Errno> {
        let errno = |e: std::io::Error| e.raw_os_error().unwrap_or(libc::EIO);
        let mut n = self.next;
        let mut tries = 0;
        loop {
            self.next = n.saturating_add(1);
            match sys::mkdir(self.file(n, "")?, 0o755) {
                Ok(()) => break,
                Err(e) if e.raw_os_error() == Some(libc::EEXIST) && tries < 8 => {
                    tries += 1;
                    n = self.next;
                }
                Err(e) => return Err(errno(e)),
            }
        }
        let result = self.apply(n, limits, 0).and_then(|()| {
            let dir = sys::open(self.file(n, "")?, libc::O_RDONLY | libc::O_DIRECTORY, 0)
                .map_err(errno)?;
            let procs =
                sys::open(self.file(n, "/cgroup.procs")?, libc::O_WRONLY, 0).map_err(errno)?;
            Ok(CgroupFiles {
                dir,
                procs,
                limited: limit_bits(limits),
                killed: false,
                seen_empty: false,
            })
        });
        match result {
            Ok(files) => Ok((n, files)),
            Err(e) => {
                self.discard(n);
                Err(e)
            }
        }
    }

    /// An ended execution's cgroup: kept for the next one if it is empty and the pool has
    /// room, else emptied and removed.
    pub(crate) fn recycle(&mut self, n: u64, files: CgroupFiles, scratch: &mut [u8]) {
        if !files.killed
            && self.idle.len() < POOL
            && (files.seen_empty || self.is_empty(n, scratch))
        {
            self.idle.push((n, files));
        } else {
            drop(files);
            self.remove(n, scratch);
        }
    }

    /// Removes cgroup `n`, which has never held a process.
    fn discard(&mut self, n: u64) {
        if let Ok(dir) = self.file(n, "") {
            let _ = sys::rmdir(dir);
        }
    }

    /// Writes `limits` to cgroup `n`, and lifts those of `before` (controller bits) that
    /// `limits` does not set.
    fn apply(&mut self, n: u64, limits: &Limits, before: u8) -> Result<(), Errno> {
        let mut digits = [0u8; 20];
        match limits.memory_max {
            Some(bytes) => {
                let value = sys::format_u64(bytes, &mut digits);
                self.write(n, "/memory.max", &[value])?;
                // No swap either: the limit is on what the execution may use at all.
                let _ = self.write(n, "/memory.swap.max", &["0"]);
            }
            None if before & MEMORY != 0 => {
                self.write(n, "/memory.max", &["max"])?;
                let _ = self.write(n, "/memory.swap.max", &["max"]);
            }
            None => {}
        }
        match limits.pids_max {
            Some(pids) => {
                let value = sys::format_u64(u64::from(pids), &mut digits);
                self.write(n, "/pids.max", &[value])?;
            }
            None if before & PIDS != 0 => self.write(n, "/pids.max", &["max"])?,
            None => {}
        }
        match limits.cpu_max_percent {
            Some(percent) => {
                // "$QUOTA $PERIOD" in microseconds: the percentage of one CPU per 100 ms.
                let quota = sys::format_u64(u64::from(percent).saturating_mul(1000), &mut digits);
                self.write(n, "/cpu.max", &[quota, " 100000"])?;
            }
            None if before & CPU != 0 => self.write(n, "/cpu.max", &["max 100000"])?,
            None => {}
        }
        Ok(())
    }

    /// Writes the concatenation of `parts` to a file of execution `n`'s cgroup, in one
    /// `write` (a cgroup file takes one value per write).
    fn write(&mut self, n: u64, leaf: &str, parts: &[&str]) -> Result<(), Errno> {
        let mut value = [0u8; 64];
        let mut len = 0;
        for part in parts {
            value
                .get_mut(len..len + part.len())
                .ok_or(libc::EINVAL)?
                .copy_from_slice(part.as_bytes());
            len += part.len();
        }
        let path = self.file(n, leaf)?;
        sys::write_file(path, value.get(..len).unwrap_or_default())
            .map_err(|e| e.raw_os_error().unwrap_or(libc::EIO))
    }

    /// Calls `f` with every process in the cgroup (as `cgroup.procs` lists them, read into
    /// `scratch`); returns how many there were.
    fn each_process(&mut self, n: u64, scratch: &mut [u8], mut f: impl FnMut(libc::pid_t)) -> u32 {
        let Ok(path) = self.file(n, "/cgroup.procs") else {
            return 0;
        };
        let Ok(len) = sys::read_file(path, scratch) else {
            return 0;
        };
        let mut count = 0u32;
        for line in scratch
            .get(..len)
            .unwrap_or_default()
            .split(|b| *b == b'\n')
        {
            if let Some(pid) = sys::parse_u64(line).and_then(|p| libc::pid_t::try_from(p).ok()) {
                f(pid);
                count = count.saturating_add(1);
            }
        }
        count
    }

    /// Signals every process in execution `n`'s cgroup: SIGKILL through `cgroup.kill`
    /// where the kernel has it (which also catches processes forked meanwhile), otherwise,
    /// and for other signals, process by process.
    pub(crate) fn signal(&mut self, n: u64, sig: libc::c_int, scratch: &mut [u8]) {
        if sig == libc::SIGKILL && self.has_kill && self.write(n, "/cgroup.kill", &["1"]).is_ok() {
            return;
        }
        self.each_process(n, scratch, |pid| sys::kill_process(pid, sig));
    }

    /// How many processes are in execution `n`'s cgroup.
    pub(crate) fn count(&mut self, n: u64, scratch: &mut [u8]) -> u32 {
        self.each_process(n, scratch, |_| {})
    }

    /// Whether execution `n`'s cgroup is empty (`populated 0` in `cgroup.events`; it
    /// counts the processes below it too). An unreadable cgroup counts as empty.
    pub(crate) fn is_empty(&mut self, n: u64, scratch: &mut [u8]) -> bool {
        let Ok(path) = self.file(n, "/cgroup.events") else {
            return true;
        };
        let Ok(len) = sys::read_file(path, scratch) else {
            return true;
        };
        !scratch
            .get(..len)
            .unwrap_or_default()
            .split(|b| *b == b'\n')
            .any(|line| line == b"populated 1")
    }

    /// Kills what is left in execution `n`'s cgroup, waits (a bounded time) for it to
    /// empty, and removes it. The kernel may still refuse the removal (`EBUSY`) for a
    /// moment after `populated 0`, while the killed processes are released: that is
    /// retried within the same bound.
    pub(crate) fn remove(&mut self, n: u64, scratch: &mut [u8]) {
        let started = Instant::now();
        while !self.is_empty(n, scratch) && started.elapsed() < EMPTY_WAIT {
            self.signal(n, libc::SIGKILL, scratch);
            std::thread::sleep(Duration::from_millis(1));
        }
        loop {
            let Ok(dir) = self.file(n, "") else { return };
            match sys::rmdir(dir) {
                Err(e)
                    if e.raw_os_error() == Some(libc::EBUSY) && started.elapsed() < EMPTY_WAIT =>
                {
                    std::thread::sleep(Duration::from_millis(1));
                }
                _ => return,
            }
        }
    }
}

impl Drop for Cgroups {
    /// The idle cgroups go with the agent (a killed agent's are removed by the next one).
    fn drop(&mut self) {
        while let Some((n, files)) = self.idle.pop() {
            drop(files);
            self.discard(n);
        }
    }
}

/// The controllers `limits` needs, as bits.
fn limit_bits(limits: &Limits) -> u8 {
    [
        (limits.memory_max.is_some(), MEMORY),
        (limits.pids_max.is_some(), PIDS),
        (limits.cpu_max_percent.is_some(), CPU),
    ]
    .iter()
    .filter(|(set, _)| *set)
    .fold(0, |bits, (_, bit)| bits | bit)
}

fn cstring(path: &str) -> Result<CString, String> {
    CString::new(path).map_err(|_| format!("{path}: contains NUL"))
}

/// Creates `dir` (its last component) unless it exists.
fn make_dir(dir: &str) -> Result<(), String> {
    match std::fs::create_dir(dir) {
        Ok(()) => Ok(()),
        Err(e) if e.kind() == std::io::ErrorKind::AlreadyExists => Ok(()),
        Err(e) => Err(format!("cannot create {dir}: {e}")),
    }
}

/// The default base: beside the agent in its cgroup v2 hierarchy.
fn auto_base() -> Result<String, String> {
    let mount = cgroup2_mount()?;
    let cgroups = std::fs::read_to_string("/proc/self/cgroup")
        .map_err(|e| format!("/proc/self/cgroup: {e}"))?;
    let own = cgroups
        .lines()
        .find_map(|l| l.strip_prefix("0::"))
        .ok_or("the agent is in no cgroup v2 (no 0:: line in /proc/self/cgroup)")?;
    let mount = mount.trim_end_matches('/');
    if own == "/" {
        let base = format!("{mount}/portless-agent");
        make_dir(&base)?;
        enable_controllers(mount);
        enable_controllers(&base);
        return Ok(base);
    }
    // Not the root: the agent's cgroup becomes the parent of its executions' cgroups, and
    // the agent moves into a leaf of it ("no internal processes").
    let own_dir = format!("{mount}{own}");
    let leaf = format!("{own_dir}/agent");
    make_dir(&leaf)?;
    std::fs::write(format!("{leaf}/cgroup.procs"), "0")
        .map_err(|e| format!("cannot move the agent into {leaf}: {e}"))?;
    enable_controllers(&own_dir);
    Ok(own_dir)
}

/// Where cgroup v2 is mounted, from `/proc/self/mountinfo`.
fn cgroup2_mount() -> Result<String, String> {
    let info = std::fs::read_to_string("/proc/self/mountinfo")
        .map_err(|e| format!("/proc/self/mountinfo: {e}"))?;
    for line in info.lines() {
        // "id parent major:minor root mount-point options [optional...] - type source ..."
        let Some((left, right)) = line.split_once(" - ") else {
            continue;
        };
        if right.split(' ').next() != Some("cgroup2") {
            continue;
        }
        let mut fields = left.split(' ');
        let (Some(root), Some(point)) = (fields.nth(3), fields.next()) else {
            continue;
        };
        if root == "/" && !point.contains('\\') {
            return Ok(point.to_owned());
        }
    }
    Err("the guest has no cgroup v2 mounted".to_owned())
}

/// Enables, for the children of `dir`, the controllers limits need that `dir` has (one at a
/// time: a controller that cannot be enabled does not keep the others off).
fn enable_controllers(dir: &str) {
    let available =
        std::fs::read_to_string(format!("{dir}/cgroup.controllers")).unwrap_or_default();
    for (name, _) in CONTROLLERS {
        if available.split_whitespace().any(|c| c == name) {
            let _ = std::fs::write(format!("{dir}/cgroup.subtree_control"), format!("+{name}"));
        }
    }
}

/// The controllers enabled for the children of `dir`.
fn enabled_controllers(dir: &str) -> u8 {
    let enabled =
        std::fs::read_to_string(format!("{dir}/cgroup.subtree_control")).unwrap_or_default();
    CONTROLLERS
        .iter()
        .filter(|(name, _)| enabled.split_whitespace().any(|c| c == *name))
        .fold(0, |bits, (_, bit)| bits | bit)
}
