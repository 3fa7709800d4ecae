//! The agent's contact with the kernel: small safe wrappers over the libc calls it needs. All
//! of the binary's `unsafe` lives here. Nothing here allocates on the Rust heap, so the
//! steady-state loop stays allocation-free.

use std::ffi::{CStr, c_char, c_int};
use std::io;
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd, RawFd};
use std::ptr::NonNull;

use ring_protocol::MappedRegion;

use crate::platform::Credentials;

/// The calling thread's `errno`.
pub(crate) fn errno() -> i32 {
    io::Error::last_os_error()
        .raw_os_error()
        .unwrap_or(libc::EIO)
}

fn check(ret: c_int) -> io::Result<c_int> {
    if ret < 0 {
        Err(io::Error::last_os_error())
    } else {
        Ok(ret)
    }
}

/// A shared mapping of a file (a memory-backend file, a PCI BAR's sysfs `resourceN`).
pub(crate) struct Mapping {
    region: MappedRegion,
    len: usize,
}

impl Mapping {
    /// Maps `len` bytes of the file at `path` (NUL-terminated) read-write and shared.
    pub(crate) fn map(path: &CStr, len: usize) -> io::Result<Self> {
        // SAFETY: `path` is a valid NUL-terminated string; `open` has no other preconditions.
        let fd = check(unsafe { libc::open(path.as_ptr(), libc::O_RDWR | libc::O_CLOEXEC) })?;
        // SAFETY: `fd` was just returned by `open` and is owned by nothing else.
        let fd = unsafe { OwnedFd::from_raw_fd(fd) };
        Self::map_fd(fd.as_raw_fd(), len, 0)
    }

    /// Maps `len` bytes of `fd` at `offset` read-write and shared.
    pub(crate) fn map_fd(fd: RawFd, len: usize, offset: i64) -> io::Result<Self> {
        // SAFETY: a fresh mapping chosen by the kernel (address NULL) cannot alias any Rust
        // object; the arguments are plain values and errors are reported as MAP_FAILED.
        let ptr = unsafe {
            libc::mmap(
                std::ptr::null_mut(),
                len,
                libc::PROT_READ | libc::PROT_WRITE,
                libc::MAP_SHARED,
                fd,
                offset,
            )
        };
        if ptr == libc::MAP_FAILED {
            return Err(io::Error::last_os_error());
        }
        let base = NonNull::new(ptr.cast::<u8>())
            .ok_or_else(|| io::Error::from_raw_os_error(libc::EFAULT))?;
        // SAFETY: the mapping stays until `Drop` unmaps it, which happens only after the
        // `MappedRegion` (a field of `self`) can no longer be used; nothing in this program
        // makes references into it.
        let region = unsafe { MappedRegion::new(base, len) }
            .map_err(|_| io::Error::from_raw_os_error(libc::EINVAL))?;
        Ok(Self { region, len })
    }

    /// The mapping as shared memory.
    pub(crate) fn region(&self) -> &MappedRegion {
        &self.region
    }

    /// Writes a 32-bit device register (a volatile store, as MMIO wants).
    pub(crate) fn write_register(&self, offset: usize, value: u32) {
        if !offset.is_multiple_of(4) || offset + 4 > self.len {
            return;
        }
        let reg = self.region.as_ptr().wrapping_add(offset).cast::<u32>();
        // SAFETY: `offset + 4 <= len` and 4-aligned inside a page-aligned mapping; a register
        // is written with a single volatile 32-bit store.
        unsafe { reg.write_volatile(value) };
    }

    /// Reads a 32-bit device register.
    pub(crate) fn read_register(&self, offset: usize) -> u32 {
        if !offset.is_multiple_of(4) || offset + 4 > self.len {
            return 0;
        }
        let reg = self.region.as_ptr().wrapping_add(offset).cast::<u32>();
        // SAFETY: as in `write_register`.
        unsafe { reg.read_volatile() }
    }
}

impl Drop for Mapping {
    fn drop(&mut self) {
        // SAFETY: unmaps exactly the range `map_fd` mapped; `self.region` is dropped with
        // `self` right after and is never used again.
        unsafe { libc::munmap(self.region.as_ptr().cast(), self.len) };
    }
}

/// Reads up to `buf.len()` bytes from a non-blocking descriptor.
pub(crate) enum ReadResult {
    Data(usize),
    WouldBlock,
    Closed,
}

pub(crate) fn read(fd: RawFd, buf: &mut [u8]) -> ReadResult {
    loop {
        // SAFETY: `buf` is valid for `buf.len()` bytes of writes for the duration of the call.
        let n = unsafe { libc::read(fd, buf.as_mut_ptr().cast(), buf.len()) };
        match n {
            0 => return ReadResult::Closed,
            n if n > 0 => return ReadResult::Data(n.unsigned_abs()),
            _ => match errno() {
                libc::EINTR => continue,
                libc::EAGAIN => return ReadResult::WouldBlock,
                _ => return ReadResult::Closed,
            },
        }
    }
}

/// Writes all of `data` to a blocking descriptor.
pub(crate) fn write_all(fd: RawFd, mut data: &[u8]) -> io::Result<()> {
    while !data.is_empty() {
        // SAFETY: `data` is valid for `data.len()` bytes of reads for the duration of the call.
        let n = unsafe { libc::write(fd, data.as_ptr().cast(), data.len()) };
        if n < 0 {
            if errno() == libc::EINTR {
                continue;
            }
            return Err(io::Error::last_os_error());
        }
        data = data.get(n.unsigned_abs()..).unwrap_or_default();
    }
    Ok(())
}

/// A pipe with both ends close-on-exec; the read end non-blocking if asked.
pub(crate) fn pipe(nonblocking_read: bool) -> io::Result<(OwnedFd, OwnedFd)> {
    let mut fds = [0 as c_int; 2];
    // SAFETY: `fds` has room for the two descriptors `pipe2` writes.
    check(unsafe { libc::pipe2(fds.as_mut_ptr(), libc::O_CLOEXEC) })?;
    // SAFETY: the descriptor was just created by `pipe2` and is owned by nothing else.
    let r = unsafe { OwnedFd::from_raw_fd(fds[0]) };
    // SAFETY: as above.
    let w = unsafe { OwnedFd::from_raw_fd(fds[1]) };
    if nonblocking_read {
        set_nonblocking(r.as_raw_fd())?;
    }
    Ok((r, w))
}

pub(crate) fn set_nonblocking(fd: RawFd) -> io::Result<()> {
    // SAFETY: F_GETFL/F_SETFL on a descriptor we own; no pointers involved.
    let flags = check(unsafe { libc::fcntl(fd, libc::F_GETFL) })?;
    // SAFETY: as above.
    check(unsafe { libc::fcntl(fd, libc::F_SETFL, flags | libc::O_NONBLOCK) })?;
    Ok(())
}

/// NUL-terminated strings and the pointer arrays `execve` wants, built in fixed buffers
/// before the child starts (the child may not allocate).
pub(crate) struct ExecImage {
    bytes: [u8; Self::BYTES],
    used: usize,
    argv: [*const c_char; Self::PTRS],
    argc: usize,
    envp: [*const c_char; Self::PTRS],
    envc: usize,
    program: usize,
    cwd: Option<usize>,
}

impl ExecImage {
    const BYTES: usize = 32 * 1024;
    const PTRS: usize = 64;

    pub(crate) fn new() -> Self {
        Self {
            bytes: [0; Self::BYTES],
            used: 0,
            argv: [std::ptr::null(); Self::PTRS],
            argc: 0,
            envp: [std::ptr::null(); Self::PTRS],
            envc: 0,
            program: 0,
            cwd: None,
        }
    }

    /// Copies `s` with a NUL; returns its offset. Fails with E2BIG when full, EINVAL on an
    /// interior NUL.
    fn push_str(&mut self, s: &str) -> Result<usize, i32> {
        if s.as_bytes().contains(&0) {
            return Err(libc::EINVAL);
        }
        let start = self.used;
        let end = start + s.len() + 1;
        let dst = self.bytes.get_mut(start..end).ok_or(libc::E2BIG)?;
        let (body, nul) = dst.split_at_mut(s.len());
        body.copy_from_slice(s.as_bytes());
        nul.fill(0);
        self.used = end;
        Ok(start)
    }

    /// Fills the image: program, `argv[1..]`, environment, working directory.
    pub(crate) fn build(
        &mut self,
        program: &str,
        args: &[&str],
        env: &[&str],
        cwd: Option<&str>,
    ) -> Result<(), i32> {
        self.used = 0;
        self.argc = 0;
        self.envc = 0;
        self.program = self.push_str(program)?;
        let mut arg_offsets = [0usize; Self::PTRS];
        if args.len() + 2 > Self::PTRS || env.len() + 1 > Self::PTRS {
            return Err(libc::E2BIG);
        }
        arg_offsets[0] = self.program;
        for (slot, a) in arg_offsets.iter_mut().skip(1).zip(args) {
            *slot = self.push_str(a)?;
        }
        let mut env_offsets = [0usize; Self::PTRS];
        for (slot, e) in env_offsets.iter_mut().zip(env) {
            *slot = self.push_str(e)?;
        }
        self.cwd = cwd.map(|c| self.push_str(c)).transpose()?;
        let base = self.bytes.as_ptr().cast::<c_char>();
        self.argc = args.len() + 1;
        for (p, off) in self.argv.iter_mut().zip(&arg_offsets[..self.argc]) {
            *p = base.wrapping_add(*off);
        }
        self.argv[self.argc] = std::ptr::null();
        self.envc = env.len();
        for (p, off) in self.envp.iter_mut().zip(&env_offsets[..self.envc]) {
            *p = base.wrapping_add(*off);
        }
        self.envp[self.envc] = std::ptr::null();
        Ok(())
    }
}

/// The cgroup a child starts in: its directory, and its `cgroup.procs` open for writing
/// (for kernels without `CLONE_INTO_CGROUP`).
#[derive(Clone, Copy)]
pub(crate) struct Cgroup {
    pub(crate) dir: RawFd,
    pub(crate) procs: RawFd,
}

/// A started child: its pid (also its process group) and the read ends of its output.
pub(crate) struct Child {
    pub(crate) pid: libc::pid_t,
    pub(crate) stdout: OwnedFd,
    pub(crate) stderr: OwnedFd,
}

/// Bytes of stack the child of [`spawn`] runs on before it `execve`s: its frames are small
/// (musl's `posix_spawn` gives its child about 5 KiB).
const CHILD_STACK: usize = 16 * 1024;

/// What the child of [`spawn`] needs, read from the parent's memory it shares.
#[derive(Clone, Copy)]
struct ChildArgs {
    program: *const c_char,
    argv: *const *const c_char,
    envp: *const *const c_char,
    cwd: Option<*const c_char>,
    uid: Option<u32>,
    gid: Option<u32>,
    groups: *const libc::gid_t,
    ngroups: usize,
    cgroup_procs: Option<RawFd>,
    stdio: [RawFd; 3],
    status: RawFd,
}

/// Starts `image` in a new process group (and in `cgroup`, if given), with the credentials given (uid, gid and
/// supplementary groups; those not given stay the agent's), with stdin on /dev/null
/// and stdout/stderr on fresh non-blocking pipes. Returns the exec failure's errno if the
/// program could not be started.
///
/// The child is made the way `posix_spawn` makes it: `clone(CLONE_VM | CLONE_VFORK)`, on a
/// stack of its own inside this function's frame, sharing this process's memory until it
/// `execve`s (this thread is suspended until then). Unlike `fork` it copies no page tables
/// and makes neither side take copy-on-write faults, so starting a command costs the same
/// whatever the agent's own size.
pub(crate) fn spawn(
    image: &ExecImage,
    creds: &Credentials,
    cgroup: Option<Cgroup>,
) -> Result<Child, i32> {
    let io = |e: io::Error| e.raw_os_error().unwrap_or(libc::EIO);
    let (out_r, out_w) = pipe(true).map_err(io)?;
    let (err_r, err_w) = pipe(true).map_err(io)?;
    let (status_r, status_w) = pipe(false).map_err(io)?;
    // SAFETY: the path is a NUL-terminated literal.
    let null =
        check(unsafe { libc::open(c"/dev/null".as_ptr(), libc::O_RDONLY | libc::O_CLOEXEC) })
            .map_err(io)?;
    // SAFETY: `null` was just opened and is owned by nothing else.
    let null = unsafe { OwnedFd::from_raw_fd(null) };
    let base = image.bytes.as_ptr().cast::<c_char>();
    let args = ChildArgs {
        program: base.wrapping_add(image.program),
        argv: image.argv.as_ptr(),
        envp: image.envp.as_ptr(),
        cwd: image.cwd.map(|c| base.wrapping_add(c)),
        uid: creds.uid,
        gid: creds.gid,
        groups: creds.groups().as_ptr(),
        ngroups: creds.groups().len(),
        cgroup_procs: None,
        stdio: [null.as_raw_fd(), out_w.as_raw_fd(), err_w.as_raw_fd()],
        status: status_w.as_raw_fd(),
    };
    let mut stack = [0u8; CHILD_STACK];
    // The stack grows down from its end, aligned to 16 bytes as the ABI wants.
    let end = stack.as_mut_ptr().wrapping_add(CHILD_STACK);
    let top = end.wrapping_sub(end as usize % 16);
    let pid = match cgroup {
        Some(Cgroup { dir, procs }) => match clone_into_cgroup(dir, &args) {
            Ok(pid) => pid,
            // An older kernel: the child joins through `cgroup.procs` instead.
            Err(libc::ENOSYS | libc::EINVAL | libc::E2BIG | libc::EOPNOTSUPP) => {
                let args = ChildArgs {
                    cgroup_procs: Some(procs),
                    ..args
                };
                // SAFETY: as below.
                unsafe { clone_sharing_memory(&args, top) }
            }
            Err(e) => return Err(e),
        },
        // SAFETY: see `clone_sharing_memory`: `top` is the end of `stack`, which outlives
        // the child's use of it, and `args` points into this frame.
        None => unsafe { clone_sharing_memory(&args, top) },
    };
    if pid < 0 {
        return Err(errno());
    }
    drop((out_w, err_w, status_w, null));
    // The status pipe closed on a successful exec (CLOEXEC) or carries the errno.
    let mut buf = [0u8; 4];
    let mut got = 0;
    while got < buf.len() {
        match read(status_r.as_raw_fd(), buf.get_mut(got..).unwrap_or_default()) {
            ReadResult::Data(n) => got += n,
            ReadResult::Closed | ReadResult::WouldBlock => break,
        }
    }
    if got == buf.len() {
        let code = i32::from_ne_bytes(buf);
        // Reap the child that failed to exec.
        let mut status = 0;
        // SAFETY: waiting for our own child; `status` is a valid out-pointer.
        unsafe { libc::waitpid(pid, &mut status, 0) };
        return Err(code);
    }
    Ok(Child {
        pid,
        stdout: out_r,
        stderr: err_r,
    })
}

/// The `clone_args` of `clone3(2)` (version 2, with `cgroup`).
#[repr(C)]
#[derive(Default)]
struct CloneArgs {
    flags: u64,
    pidfd: u64,
    child_tid: u64,
    parent_tid: u64,
    exit_signal: u64,
    stack: u64,
    stack_size: u64,
    tls: u64,
    set_tid: u64,
    set_tid_size: u64,
    cgroup: u64,
}

/// `clone3`'s flag for starting the child in the cgroup `CloneArgs::cgroup` names (Linux 5.7).
const CLONE_INTO_CGROUP: u64 = 0x2_0000_0000;

/// Starts the child of `spawn` with `clone3(CLONE_VFORK | CLONE_INTO_CGROUP)`: it is in the
/// cgroup whose directory is open as `dir` from its first instruction, with nothing to
/// migrate (joining through `cgroup.procs` instead takes the cgroup lock for writing, which
/// waits for an RCU grace period: milliseconds in an emulated guest). It gets a copy of this
/// process's memory, as with `fork`, but this thread is suspended until it `execve`s or
/// exits. Returns the child's pid, or the errno of `clone3` (ENOSYS, EINVAL or E2BIG on a
/// kernel without it).
fn clone_into_cgroup(dir: RawFd, args: &ChildArgs) -> Result<libc::pid_t, i32> {
    let clone = CloneArgs {
        flags: libc::CLONE_VFORK as u64 | CLONE_INTO_CGROUP,
        exit_signal: libc::SIGCHLD as u64,
        cgroup: u64::try_from(dir).map_err(|_| libc::EBADF)?,
        ..CloneArgs::default()
    };
    // SAFETY: `clone` is a valid `clone_args` of the size passed. Without CLONE_VM the child
    // has a copy of this process's memory (and of this stack, so it returns here with 0); it
    // only runs `child_exec`, which makes async-signal-safe and raw system calls on values
    // in its own copy, and ends in `execve` or `_exit`: this thread, suspended by CLONE_VFORK
    // meanwhile, shares nothing with it that it could change.
    let pid = unsafe {
        libc::syscall(
            libc::SYS_clone3,
            std::ptr::from_ref(&clone),
            std::mem::size_of::<CloneArgs>(),
        )
    };
    match pid {
        // SAFETY: this is the child, with its own copy of `args` and the image it points to.
        0 => unsafe { child_exec(args) },
        p if p < 0 => Err(errno()),
        p => libc::pid_t::try_from(p).map_err(|_| libc::EINVAL),
    }
}

/// Starts the child of `spawn` the way `posix_spawn` does, sharing this process's memory
/// (`clone(CLONE_VM | CLONE_VFORK)`) on the stack that ends at `top`. Returns what `clone`
/// returns.
///
/// # Safety
///
/// `top` must be the 16-byte aligned end of a stack of [`CHILD_STACK`] bytes that outlives
/// the call, and `args` must hold pointers valid until the child execs.
unsafe fn clone_sharing_memory(args: &ChildArgs, top: *mut u8) -> libc::pid_t {
    // SAFETY: `child_main` runs on the stack that ends at `top`, which outlives the child's
    // use of it: with CLONE_VFORK this thread does not return from `clone` until the child has called
    // `execve` (which replaces its memory) or `_exit`. `args` and `image` are live for the
    // same reason. The child only makes async-signal-safe calls and raw system calls that
    // affect itself alone (see `child_exec`), so the memory it shares stays untouched but
    // for `errno`, which this thread does not read before its next call.
    unsafe {
        libc::clone(
            child_main,
            top.cast(),
            libc::CLONE_VM | libc::CLONE_VFORK | libc::SIGCHLD,
            std::ptr::from_ref(args).cast_mut().cast(),
        )
    }
}

/// The child's entry point on its own stack; never returns.
extern "C" fn child_main(arg: *mut libc::c_void) -> c_int {
    // SAFETY: `spawn` passes a pointer to its `ChildArgs`, live until this child execs.
    let a = unsafe { &*arg.cast_const().cast::<ChildArgs>() };
    // SAFETY: called in the child `spawn` cloned, with the pointers `spawn` built from an
    // `ExecImage` that stays alive and unchanged while the parent is suspended.
    unsafe { child_exec(a) }
}

/// The child's side of `spawn`: only async-signal-safe calls and raw system calls, then
/// `execve` or `_exit`. It shares the parent's memory, so it writes none of it (C library
/// calls that keep process-wide state, such as musl's `setuid`, are avoided: the raw system
/// calls change this child's credentials alone). One `unsafe` block covers the sequence:
/// every call in it has the same justification.
///
/// # Safety
///
/// Must be called in a child cloned by `spawn`, with pointers to NUL-terminated strings and
/// NULL-terminated pointer arrays that stay valid until it execs or exits.
#[allow(clippy::multiple_unsafe_ops_per_block)]
unsafe fn child_exec(a: &ChildArgs) -> ! {
    let ChildArgs {
        program,
        argv,
        envp,
        cwd,
        uid,
        gid,
        groups,
        ngroups,
        cgroup_procs,
        stdio,
        status,
    } = *a;
    let fail = |status: RawFd| -> ! {
        let code = errno().to_ne_bytes();
        // SAFETY: `code` is 4 readable bytes; `write` is async-signal-safe.
        unsafe { libc::write(status, code.as_ptr().cast(), code.len()) };
        // SAFETY: `_exit` is async-signal-safe and ends the child at once.
        unsafe { libc::_exit(127) }
    };
    // SAFETY: every call below is async-signal-safe or a raw system call, and takes plain
    // values, pointers to this frame's locals, or the pointers this function's contract
    // guarantees.
    unsafe {
        // Into the execution's cgroup first, before anything can be forked or escape.
        if let Some(fd) = cgroup_procs
            && libc::write(fd, c"0".as_ptr().cast(), 1) != 1
        {
            fail(status);
        }
        if libc::setpgid(0, 0) != 0 {
            fail(status);
        }
        let mut set: libc::sigset_t = std::mem::zeroed();
        libc::sigemptyset(&mut set);
        libc::sigprocmask(libc::SIG_SETMASK, &set, std::ptr::null_mut());
        // Back to default dispositions (SIGPIPE is ignored by the Rust runtime, and an
        // ignored signal stays ignored across execve).
        for sig in [
            libc::SIGCHLD,
            libc::SIGHUP,
            libc::SIGTERM,
            libc::SIGINT,
            libc::SIGPIPE,
        ] {
            libc::signal(sig, libc::SIG_DFL);
        }
        // Groups first, while the process may still change them; the uid last.
        if let Some(gid) = gid
            && (libc::syscall(libc::SYS_setgroups, ngroups, groups) != 0
                || libc::syscall(libc::SYS_setgid, gid) != 0)
        {
            fail(status);
        }
        if let Some(uid) = uid {
            // A uid without a gid keeps none of the agent's groups.
            if gid.is_none()
                && libc::syscall(libc::SYS_setgroups, 0, std::ptr::null::<libc::gid_t>()) != 0
            {
                fail(status);
            }
            if libc::syscall(libc::SYS_setuid, uid) != 0 {
                fail(status);
            }
        }
        if let Some(cwd) = cwd
            && libc::chdir(cwd) != 0
        {
            fail(status);
        }
        for (target, fd) in stdio.into_iter().enumerate() {
            #[allow(clippy::cast_possible_wrap, clippy::cast_possible_truncation)]
            if libc::dup2(fd, target as c_int) < 0 {
                fail(status);
            }
        }
        libc::execve(program, argv, envp);
        fail(status)
    }
}

/// How a reaped child ended.
pub(crate) enum WaitStatus {
    Exited(i32),
    Signaled(i32),
}

/// Reaps `pid` if it has ended; never blocks.
pub(crate) fn try_wait(pid: libc::pid_t) -> Option<WaitStatus> {
    let mut status = 0;
    // SAFETY: `status` is a valid out-pointer; WNOHANG never blocks.
    let r = unsafe { libc::waitpid(pid, &mut status, libc::WNOHANG) };
    if r != pid {
        return None;
    }
    if libc::WIFEXITED(status) {
        Some(WaitStatus::Exited(libc::WEXITSTATUS(status)))
    } else if libc::WIFSIGNALED(status) {
        Some(WaitStatus::Signaled(libc::WTERMSIG(status)))
    } else {
        None
    }
}

/// Whether the process group `pgid` has any process in it (zombies included).
pub(crate) fn group_exists(pgid: libc::pid_t) -> bool {
    // SAFETY: `kill` takes plain values; signal 0 only checks that the group exists.
    unsafe { libc::kill(-pgid, 0) == 0 || errno() != libc::ESRCH }
}

/// Sends `sig` to the process group `pgid`.
pub(crate) fn kill_group(pgid: libc::pid_t, sig: c_int) {
    // SAFETY: `kill` takes plain values; a negative pid addresses the group.
    unsafe { libc::kill(-pgid, sig) };
}

/// Blocks `signals` for the process and returns a signalfd that reports them.
#[allow(clippy::multiple_unsafe_ops_per_block)] // one sequence, one justification
pub(crate) fn signalfd(signals: &[c_int]) -> io::Result<OwnedFd> {
    // SAFETY: `set` is initialised by `sigemptyset` before use; the pointers are valid.
    unsafe {
        let mut set: libc::sigset_t = std::mem::zeroed();
        libc::sigemptyset(&mut set);
        for s in signals {
            libc::sigaddset(&mut set, *s);
        }
        check(libc::sigprocmask(
            libc::SIG_BLOCK,
            &set,
            std::ptr::null_mut(),
        ))?;
        let fd = check(libc::signalfd(
            -1,
            &set,
            libc::SFD_NONBLOCK | libc::SFD_CLOEXEC,
        ))?;
        Ok(OwnedFd::from_raw_fd(fd))
    }
}

/// Reads the next pending signal number from a signalfd, if any.
pub(crate) fn next_signal(fd: RawFd) -> Option<u32> {
    let mut info = [0u8; std::mem::size_of::<libc::signalfd_siginfo>()];
    match read(fd, &mut info) {
        ReadResult::Data(n) if n == info.len() => {
            let [a, b, c, d, ..] = info;
            Some(u32::from_ne_bytes([a, b, c, d]))
        }
        _ => None,
    }
}

/// Ignores SIGPIPE so that a closed pipe is an error, not death.
pub(crate) fn ignore_sigpipe() {
    // SAFETY: setting a standard disposition for a signal; no handler code is installed.
    unsafe { libc::signal(libc::SIGPIPE, libc::SIG_IGN) };
}

/// Waits until one of `fds` is ready or `timeout_ns` passes (`None`: forever). Returns the
/// number of ready descriptors; `revents` is filled in.
pub(crate) fn poll(fds: &mut [libc::pollfd], timeout_ns: Option<u64>) -> usize {
    let ts = timeout_ns.map(|ns| libc::timespec {
        // At most i32::MAX seconds: representable whatever the width of `time_t`.
        tv_sec: (ns / 1_000_000_000).min(i32::MAX as u64) as _,
        tv_nsec: libc::c_long::try_from(ns % 1_000_000_000).unwrap_or(0),
    });
    let tsp = ts
        .as_ref()
        .map_or(std::ptr::null(), |t| t as *const libc::timespec);
    // SAFETY: `fds` is valid for `fds.len()` entries; `tsp` is NULL or points to `ts`, which
    // lives until the call returns; the signal mask pointer is NULL (unchanged).
    let n = unsafe {
        libc::ppoll(
            fds.as_mut_ptr(),
            fds.len() as libc::nfds_t,
            tsp,
            std::ptr::null(),
        )
    };
    usize::try_from(n).unwrap_or(0)
}

/// Monotonic nanoseconds.
pub(crate) fn now_ns() -> u64 {
    let mut ts = libc::timespec {
        tv_sec: 0,
        tv_nsec: 0,
    };
    // SAFETY: `ts` is a valid out-pointer.
    unsafe { libc::clock_gettime(libc::CLOCK_MONOTONIC, &mut ts) };
    u64::try_from(ts.tv_sec).unwrap_or(0) * 1_000_000_000 + u64::try_from(ts.tv_nsec).unwrap_or(0)
}

/// Four random bytes that never wait for the kernel's random pool: early in boot a read of
/// `/dev/urandom` (or `getrandom` without flags) first tries to seed the pool from timing
/// jitter, which took 1.3 s of a TCG guest's boot. `GRND_INSECURE` (Linux 5.6) answers at
/// once; older kernels get `GRND_NONBLOCK`, and without a seeded pool the clocks and the
/// process id are mixed instead. Good enough for ids that only have to differ between starts.
pub(crate) fn random_u32() -> u32 {
    let mut b = [0u8; 4];
    for flags in [libc::GRND_INSECURE, libc::GRND_NONBLOCK] {
        // SAFETY: `b` is valid for writes of its length.
        let n = unsafe { libc::getrandom(b.as_mut_ptr().cast(), b.len(), flags) };
        if n == 4 {
            return u32::from_ne_bytes(b);
        }
    }
    let mut ts = libc::timespec {
        tv_sec: 0,
        tv_nsec: 0,
    };
    // SAFETY: `ts` is a valid out-pointer.
    unsafe { libc::clock_gettime(libc::CLOCK_REALTIME, &mut ts) };
    // SAFETY: `getpid` has no preconditions.
    let pid = unsafe { libc::getpid() };
    let mut x = now_ns()
        ^ (u64::try_from(ts.tv_nsec).unwrap_or(0) << 20)
        ^ u64::try_from(ts.tv_sec).unwrap_or(0)
        ^ (u64::from(pid.unsigned_abs()) << 40);
    // splitmix64's finaliser spreads the bits.
    x = (x ^ (x >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
    x = (x ^ (x >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
    x ^= x >> 31;
    (x >> 32) as u32 ^ (x as u32)
}

/// Monotonic milliseconds.
pub(crate) fn now_ms() -> u64 {
    now_ns() / 1_000_000
}

/// The system page size.
pub(crate) fn page_size() -> u64 {
    // SAFETY: `sysconf` takes a plain value.
    u64::try_from(unsafe { libc::sysconf(libc::_SC_PAGESIZE) }).unwrap_or(4096)
}

/// Opens `path` (NUL-terminated) with `flags` and `mode`.
pub(crate) fn open(path: &CStr, flags: c_int, mode: libc::mode_t) -> io::Result<OwnedFd> {
    // SAFETY: `path` is NUL-terminated; `mode` is passed as the variadic third argument.
    let fd = check(unsafe { libc::open(path.as_ptr(), flags | libc::O_CLOEXEC, mode) })?;
    // SAFETY: `fd` was just returned by `open`.
    Ok(unsafe { OwnedFd::from_raw_fd(fd) })
}

/// Reads as much of the file at `path` as fits in `buf`; returns the length read.
pub(crate) fn read_file(path: &CStr, buf: &mut [u8]) -> io::Result<usize> {
    let fd = open(path, libc::O_RDONLY, 0)?;
    let mut got = 0;
    while got < buf.len() {
        match read(fd.as_raw_fd(), buf.get_mut(got..).unwrap_or_default()) {
            ReadResult::Data(n) => got += n,
            ReadResult::Closed | ReadResult::WouldBlock => break,
        }
    }
    Ok(got)
}

/// Longest path built in a [`PathBuf`].
const PATH_MAX: usize = 512;

/// A NUL-terminated path built in a fixed buffer.
pub(crate) struct PathBuf {
    bytes: [u8; PATH_MAX],
    len: usize,
}

impl PathBuf {
    pub(crate) fn new() -> Self {
        Self {
            bytes: [0; PATH_MAX],
            len: 0,
        }
    }

    /// Makes the path the concatenation of `parts`.
    pub(crate) fn set(&mut self, parts: &[&str]) -> Result<&CStr, i32> {
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
        self.get().ok_or(libc::EINVAL)
    }

    /// The path last set.
    pub(crate) fn get(&self) -> Option<&CStr> {
        CStr::from_bytes_with_nul(self.bytes.get(..=self.len)?).ok()
    }
}

/// Calls `f` with the name of every entry of the directory `dir`, read with `getdents64`
/// into a stack buffer: no allocation, not even libc's. Stops early when `f` says false.
pub(crate) fn for_each_entry(dir: &CStr, mut f: impl FnMut(&[u8]) -> bool) -> io::Result<()> {
    let dir = open(dir, libc::O_RDONLY | libc::O_DIRECTORY, 0)?;
    let mut buf = [0u8; 8192];
    loop {
        // SAFETY: `buf` is valid for `buf.len()` bytes of writes.
        let n = unsafe {
            libc::syscall(
                libc::SYS_getdents64,
                dir.as_raw_fd(),
                buf.as_mut_ptr(),
                buf.len(),
            )
        };
        let Ok(n) = usize::try_from(n) else {
            return Err(io::Error::last_os_error());
        };
        if n == 0 {
            return Ok(());
        }
        let mut off = 0;
        // struct linux_dirent64 { u64 ino; i64 off; u16 reclen; u8 type; char name[]; }
        while off + 19 < n {
            let reclen = buf
                .get(off + 16..off + 18)
                .map_or(0, |b| u16::from_ne_bytes([b[0], b[1]]));
            if reclen == 0 {
                return Ok(());
            }
            let record = buf
                .get(off + 19..off + usize::from(reclen))
                .unwrap_or_default();
            let name = record.split(|b| *b == 0).next().unwrap_or_default();
            if !f(name) {
                return Ok(());
            }
            off += usize::from(reclen);
        }
    }
}

/// The process ids in /proc, in directory order.
pub(crate) fn for_each_pid(mut f: impl FnMut(libc::pid_t)) {
    let _ = for_each_entry(c"/proc", |name| {
        if let Some(pid) = parse_u64(name).and_then(|p| libc::pid_t::try_from(p).ok()) {
            f(pid);
        }
        true
    });
}

/// Counts the processes (the numeric entries of /proc).
pub(crate) fn count_processes() -> u32 {
    let mut count = 0u32;
    for_each_pid(|_| count = count.saturating_add(1));
    count
}

/// A decimal number made of ASCII digits only.
pub(crate) fn parse_u64(text: &[u8]) -> Option<u64> {
    if text.is_empty() || text.len() > 19 {
        return None;
    }
    text.iter().try_fold(0u64, |n, b| {
        b.is_ascii_digit().then(|| n * 10 + u64::from(b - b'0'))
    })
}

/// The process group of a live process, from `/proc/PID/stat`; `None` if it is gone or a
/// zombie (dead, waiting to be reaped: it runs nothing and holds nothing but its pid).
pub(crate) fn live_process_group(pid: libc::pid_t) -> Option<libc::pid_t> {
    let mut path = [0u8; 32];
    let mut digits = [0u8; 20];
    let pid_text = format_u64(u64::try_from(pid).ok()?, &mut digits);
    let parts: [&[u8]; 3] = [b"/proc/", pid_text.as_bytes(), b"/stat\0"];
    let mut len = 0;
    for part in parts {
        path.get_mut(len..len + part.len())?.copy_from_slice(part);
        len += part.len();
    }
    let path = CStr::from_bytes_with_nul(path.get(..len)?).ok()?;
    let mut buf = [0u8; 512];
    let n = read_file(path, &mut buf).ok()?;
    // "pid (comm) state ppid pgrp ...": comm may hold anything, so parse after its last ')'.
    let text = buf.get(..n)?;
    let close = text.iter().rposition(|b| *b == b')')?;
    let mut fields = text
        .get(close + 1..)?
        .split(|b| *b == b' ')
        .filter(|f| !f.is_empty());
    let state = fields.next()?;
    if matches!(state, b"Z" | b"X" | b"x") {
        return None;
    }
    let _ppid = fields.next()?;
    parse_u64(fields.next()?).and_then(|g| libc::pid_t::try_from(g).ok())
}

/// Writes `n` in decimal into `buf`; returns the digits.
pub(crate) fn format_u64(mut n: u64, buf: &mut [u8; 20]) -> &str {
    let mut at = buf.len();
    loop {
        at -= 1;
        #[allow(clippy::cast_possible_truncation)] // a digit
        if let Some(slot) = buf.get_mut(at) {
            *slot = b'0' + (n % 10) as u8;
        }
        n /= 10;
        if n == 0 || at == 0 {
            break;
        }
    }
    std::str::from_utf8(buf.get(at..).unwrap_or_default()).unwrap_or("0")
}

/// Writes `data` to the file at `path` in one `write` (cgroup files take one value per
/// write).
pub(crate) fn write_file(path: &CStr, data: &[u8]) -> io::Result<()> {
    let fd = open(path, libc::O_WRONLY, 0)?;
    write_all(fd.as_raw_fd(), data)
}

/// `mkdir(path, mode)`; an existing entry is `EEXIST`.
pub(crate) fn mkdir(path: &CStr, mode: libc::mode_t) -> io::Result<()> {
    // SAFETY: `path` is NUL-terminated.
    check(unsafe { libc::mkdir(path.as_ptr(), mode) }).map(|_| ())
}

/// `rmdir(path)`.
pub(crate) fn rmdir(path: &CStr) -> io::Result<()> {
    // SAFETY: `path` is NUL-terminated.
    check(unsafe { libc::rmdir(path.as_ptr()) }).map(|_| ())
}

/// Sends `sig` to the process `pid`, ignoring errors (it may have just ended).
pub(crate) fn kill_process(pid: libc::pid_t, sig: c_int) {
    if pid > 0 {
        // SAFETY: `kill` takes plain values; `pid` is positive, so one process.
        unsafe { libc::kill(pid, sig) };
    }
}

/// The filesystem type (`f_type`) of the filesystem holding `path`.
pub(crate) fn filesystem_type(path: &CStr) -> io::Result<u64> {
    // SAFETY: `st` is plain data, fully written by a successful `statfs`.
    let mut st: libc::statfs = unsafe { std::mem::zeroed() };
    // SAFETY: `path` is NUL-terminated and `st` a valid out-pointer.
    check(unsafe { libc::statfs(path.as_ptr(), &mut st) })?;
    // `f_type` is signed in glibc and unsigned in musl; magic numbers fit either way.
    #[allow(clippy::cast_sign_loss, clippy::unnecessary_cast)]
    Ok(st.f_type as u64)
}

/// Ensures `dir` (NUL-terminated) exists with mode 0700, creating the last component.
///
/// One that exists must be a real directory (not a symbolic link), owned by this process's
/// user and writable by nobody else: otherwise another user could swap what the agent
/// stores and runs. EPERM if it is not.
pub(crate) fn ensure_private_dir(dir: &CStr) -> io::Result<()> {
    // SAFETY: `dir` is NUL-terminated.
    if unsafe { libc::mkdir(dir.as_ptr(), 0o700) } != 0 && errno() != libc::EEXIST {
        return Err(io::Error::last_os_error());
    }
    // SAFETY: `st` is plain data, fully written by a successful `lstat`.
    let mut st: libc::stat = unsafe { std::mem::zeroed() };
    // SAFETY: `dir` is NUL-terminated and `st` a valid out-pointer.
    check(unsafe { libc::lstat(dir.as_ptr(), &mut st) })?;
    // SAFETY: `geteuid` has no preconditions.
    let euid = unsafe { libc::geteuid() };
    if st.st_mode & libc::S_IFMT != libc::S_IFDIR || st.st_uid != euid || st.st_mode & 0o022 != 0 {
        return Err(io::Error::from_raw_os_error(libc::EPERM));
    }
    Ok(())
}

/// `fsync` then `fchmod`.
pub(crate) fn sync_and_chmod(fd: RawFd, mode: libc::mode_t) -> io::Result<()> {
    // SAFETY: plain calls on a descriptor we own.
    check(unsafe { libc::fsync(fd) })?;
    // SAFETY: as above.
    check(unsafe { libc::fchmod(fd, mode) })?;
    Ok(())
}

/// `rename(from, to)`.
pub(crate) fn rename(from: &CStr, to: &CStr) -> io::Result<()> {
    // SAFETY: both paths are NUL-terminated.
    check(unsafe { libc::rename(from.as_ptr(), to.as_ptr()) }).map(|_| ())
}

/// `unlink(path)`, ignoring errors.
pub(crate) fn unlink(path: &CStr) {
    // SAFETY: `path` is NUL-terminated.
    unsafe { libc::unlink(path.as_ptr()) };
}

/// The global allocator: the system's, counting every allocation, so that the agent can show
/// that its steady state allocates nothing (SIGUSR1 logs the count).
pub(crate) struct CountingAllocator;

static ALLOCATIONS: std::sync::atomic::AtomicU64 = std::sync::atomic::AtomicU64::new(0);

/// Heap allocations (and reallocations) since the agent started.
pub(crate) fn allocations() -> u64 {
    // Ordering: Relaxed: a statistic read by the same thread that counts it.
    ALLOCATIONS.load(std::sync::atomic::Ordering::Relaxed)
}

// SAFETY: every method forwards to `System` with the same arguments, so `System`'s
// guarantees hold; the counter has no effect on the memory returned.
unsafe impl std::alloc::GlobalAlloc for CountingAllocator {
    unsafe fn alloc(&self, layout: std::alloc::Layout) -> *mut u8 {
        // Ordering: Relaxed: a statistic; nothing is synchronised through it.
        ALLOCATIONS.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
        // SAFETY: the caller upholds `GlobalAlloc::alloc`'s contract, which `System` shares.
        unsafe { std::alloc::System.alloc(layout) }
    }

    unsafe fn alloc_zeroed(&self, layout: std::alloc::Layout) -> *mut u8 {
        // Ordering: Relaxed, as above.
        ALLOCATIONS.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
        // SAFETY: as for `alloc`.
        unsafe { std::alloc::System.alloc_zeroed(layout) }
    }

    unsafe fn dealloc(&self, ptr: *mut u8, layout: std::alloc::Layout) {
        // SAFETY: `ptr` came from this allocator, i.e. from `System`, with `layout`.
        unsafe { std::alloc::System.dealloc(ptr, layout) }
    }

    unsafe fn realloc(&self, ptr: *mut u8, layout: std::alloc::Layout, new_size: usize) -> *mut u8 {
        // Ordering: Relaxed, as above.
        ALLOCATIONS.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
        // SAFETY: as for `dealloc`; the caller upholds `realloc`'s contract.
        unsafe { std::alloc::System.realloc(ptr, layout, new_size) }
    }
}

#[cfg(test)]
mod tests {
    #[test]
    fn random_words_differ() {
        let words: Vec<u32> = (0..8).map(|_| super::random_u32()).collect();
        // Eight equal draws of 32 random bits would be a broken source, not bad luck.
        assert!(words.iter().any(|w| *w != words[0]), "{words:?}");
    }
}
