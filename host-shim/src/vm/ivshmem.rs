//! The host as an ivshmem server (QEMU's `ivshmem-doorbell` device connects to it): it owns
//! the shared memory (a memfd), hands it and the doorbell eventfds to QEMU over a unix socket
//! (docs/specs/ivshmem-spec.rst in QEMU), rings the guest by writing the guest's eventfd and
//! is rung through its own. The host is peer 0; each QEMU that connects gets the next id.
//!
//! This module holds the crate's `unsafe` code: creating descriptors and passing them over
//! the socket. The memory itself is mapped with `vm-memory` (see [`crate::vm::memory`]).

use std::io::{self, Read as _};
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd, RawFd};
use std::os::unix::net::{UnixListener, UnixStream};
use std::path::Path;

use crate::vm::memory::GuestRegion;

/// The host's own peer id.
pub const HOST_PEER: u16 = 0;

/// Most QEMUs connected at once to one region's server: one VM has one, a second may come
/// while a restarted or migrating QEMU replaces the first. Connections beyond are refused.
pub const MAX_PEERS: usize = 4;

/// The user ids of a connected unix socket's peer (`SO_PEERCRED`): pid and uid.
pub fn peer_credentials(stream: &UnixStream) -> io::Result<(i32, u32)> {
    let mut cred = libc::ucred {
        pid: 0,
        uid: u32::MAX,
        gid: u32::MAX,
    };
    let mut len = size_of::<libc::ucred>() as libc::socklen_t;
    // SAFETY: `cred` is a valid, writable `ucred` and `len` its size, as SO_PEERCRED wants.
    check(unsafe {
        libc::getsockopt(
            stream.as_raw_fd(),
            libc::SOL_SOCKET,
            libc::SO_PEERCRED,
            std::ptr::from_mut(&mut cred).cast(),
            &mut len,
        )
    })?;
    Ok((cred.pid, cred.uid))
}

/// This process's effective user id.
fn euid() -> u32 {
    // SAFETY: `geteuid` has no preconditions and cannot fail.
    unsafe { libc::geteuid() }
}

fn check(ret: libc::c_int) -> io::Result<libc::c_int> {
    if ret < 0 {
        Err(io::Error::last_os_error())
    } else {
        Ok(ret)
    }
}

/// A new non-blocking eventfd.
pub fn eventfd() -> io::Result<OwnedFd> {
    // SAFETY: plain values.
    let fd = check(unsafe { libc::eventfd(0, libc::EFD_NONBLOCK | libc::EFD_CLOEXEC) })?;
    // SAFETY: just created, owned by nothing else.
    Ok(unsafe { OwnedFd::from_raw_fd(fd) })
}

/// Adds 1 to an eventfd.
pub fn signal_eventfd(fd: RawFd) -> io::Result<()> {
    let one = 1u64.to_ne_bytes();
    // SAFETY: `one` is 8 readable bytes.
    let n = unsafe { libc::write(fd, one.as_ptr().cast(), one.len()) };
    if n == 8 {
        Ok(())
    } else {
        Err(io::Error::last_os_error())
    }
}

/// An anonymous shared-memory file (a memfd) of `size` bytes, zeroed.
pub fn memfd(size: usize) -> io::Result<std::fs::File> {
    // SAFETY: the name is a NUL-terminated literal.
    let fd = check(unsafe { libc::memfd_create(c"portless-region".as_ptr(), libc::MFD_CLOEXEC) })?;
    // SAFETY: just created, owned by nothing else.
    let memfd = unsafe { OwnedFd::from_raw_fd(fd) };
    let len = i64::try_from(size).map_err(|_| io::Error::from_raw_os_error(libc::EINVAL))?;
    // SAFETY: plain values on a descriptor we own.
    check(unsafe { libc::ftruncate(memfd.as_raw_fd(), len) })?;
    Ok(std::fs::File::from(memfd))
}

/// Waits up to `timeout` (to the microsecond) for one of `fds` (fills `revents`).
pub fn poll(fds: &mut [libc::pollfd], timeout: std::time::Duration) -> usize {
    let ts = libc::timespec {
        tv_sec: libc::time_t::try_from(timeout.as_secs()).unwrap_or(libc::time_t::MAX),
        tv_nsec: libc::c_long::from(timeout.subsec_nanos() as i32),
    };
    // SAFETY: `fds` is valid for `fds.len()` entries and `ts` is a valid timespec, both for
    // the duration of the call; a null signal mask leaves the mask alone.
    let n = unsafe {
        libc::ppoll(
            fds.as_mut_ptr(),
            fds.len() as libc::nfds_t,
            &ts,
            std::ptr::null(),
        )
    };
    usize::try_from(n).unwrap_or(0)
}

/// Reads and clears an eventfd's count (0 if it was not signalled).
pub fn take_eventfd(fd: RawFd) -> u64 {
    let mut b = [0u8; 8];
    // SAFETY: `b` is 8 writable bytes.
    let n = unsafe { libc::read(fd, b.as_mut_ptr().cast(), b.len()) };
    if n == 8 { u64::from_ne_bytes(b) } else { 0 }
}

/// Sends one 8-byte little-endian integer, with `fd` attached if given.
fn send_msg(stream: &UnixStream, value: i64, fd: Option<RawFd>) -> io::Result<()> {
    let payload = value.to_le_bytes();
    let mut iov = libc::iovec {
        iov_base: payload.as_ptr().cast_mut().cast(),
        iov_len: payload.len(),
    };
    // Room for one SCM_RIGHTS descriptor, aligned for cmsghdr.
    let mut control = [0u64; 4];
    // SAFETY: `msghdr` is plain data; zeroed is a valid empty header.
    let mut msg: libc::msghdr = unsafe { std::mem::zeroed() };
    msg.msg_iov = &mut iov;
    msg.msg_iovlen = 1;
    if let Some(fd) = fd {
        // SAFETY: CMSG_SPACE is a pure size computation.
        let space = unsafe { libc::CMSG_SPACE(size_of::<RawFd>() as u32) } as usize;
        msg.msg_control = control.as_mut_ptr().cast();
        msg.msg_controllen = space as _;
        // SAFETY: `msg` has a control buffer of `space` bytes (<= 32), so the first header
        // fits in it.
        let cmsg = unsafe { libc::CMSG_FIRSTHDR(&msg) };
        if cmsg.is_null() {
            return Err(io::Error::from_raw_os_error(libc::EINVAL));
        }
        #[allow(clippy::multiple_unsafe_ops_per_block)] // one header, one justification
        // SAFETY: `cmsg` points at the start of `control`, large enough for a header and
        // one descriptor (CMSG_SPACE above); this fills in that header and descriptor.
        unsafe {
            (*cmsg).cmsg_level = libc::SOL_SOCKET;
            (*cmsg).cmsg_type = libc::SCM_RIGHTS;
            (*cmsg).cmsg_len = libc::CMSG_LEN(size_of::<RawFd>() as u32) as _;
            libc::CMSG_DATA(cmsg).cast::<RawFd>().write_unaligned(fd);
        }
    }
    // SAFETY: `msg` points at `iov` and `control`, both alive for the call.
    let n = unsafe { libc::sendmsg(stream.as_raw_fd(), &msg, 0) };
    if n == 8 {
        Ok(())
    } else {
        Err(io::Error::last_os_error())
    }
}

/// One connected QEMU.
pub struct Peer {
    /// Its ivshmem peer id.
    pub id: u16,
    /// Written to interrupt it, one per vector.
    events: Vec<OwnedFd>,
    /// Kept open: closing it tells QEMU the server is gone; end-of-file on it, that QEMU is.
    stream: UnixStream,
}

/// The ivshmem server for one region.
///
/// Its socket is created mode 0600, owned by the daemon's user (or, with
/// [`allow_uid`](Self::allow_uid), by the VM's QEMU user). Whatever the file's mode, a client
/// is served only if its peer credentials name root, the daemon's user or the allowed user:
/// anyone else who could connect would get the guest's whole region.
pub struct Server {
    socket: std::path::PathBuf,
    allowed_uid: Option<u32>,
    listener: UnixListener,
    memfd: OwnedFd,
    mapping: GuestRegion,
    vectors: u32,
    /// The host's eventfds, one per vector: readable when a guest rings vector `n`.
    host_events: Vec<OwnedFd>,
    peers: Vec<Peer>,
}

impl Server {
    /// Creates the shared memory (`size` bytes) and listens on `socket` (replacing a stale
    /// socket file). QEMU must be started after this.
    /// Like [`new`](Self::new), but the memory is the file at `region` (created with `size`
    /// bytes if missing or empty, else kept as it is): a daemon that restarts maps the same
    /// memory again and carries on with a QEMU that kept running.
    pub fn with_file(socket: &Path, region: &Path, size: usize, vectors: u32) -> io::Result<Self> {
        let file = GuestRegion::open_file(region, size)?;
        let shm = OwnedFd::from(file.try_clone()?);
        let mapping = GuestRegion::from_file(file, size)?;
        Self::serve(socket, shm, mapping, vectors)
    }

    fn serve(
        socket: &Path,
        memfd: OwnedFd,
        mapping: GuestRegion,
        vectors: u32,
    ) -> io::Result<Self> {
        use std::os::unix::fs::PermissionsExt;
        let _ = std::fs::remove_file(socket);
        let listener = UnixListener::bind(socket)?;
        // The peer check below is what keeps others out; the mode tells them at connect.
        std::fs::set_permissions(socket, std::fs::Permissions::from_mode(0o600))?;
        let host_events = (0..vectors).map(|_| eventfd()).collect::<io::Result<_>>()?;
        Ok(Self {
            socket: socket.to_path_buf(),
            allowed_uid: None,
            listener,
            memfd,
            mapping,
            vectors,
            host_events,
            peers: Vec::new(),
        })
    }

    /// Creates the shared memory (an anonymous memfd of `size` bytes) and listens on
    /// `socket` (replacing a stale socket file). QEMU must be started after this.
    pub fn new(socket: &Path, size: usize, vectors: u32) -> io::Result<Self> {
        let memfd = OwnedFd::from(memfd(size)?);
        let mapping = GuestRegion::from_file(std::fs::File::from(memfd.try_clone()?), size)?;
        Self::serve(socket, memfd, mapping, vectors)
    }

    /// Lets QEMU running as `uid` connect: the socket becomes that user's (which needs
    /// root when it is not the daemon's own user) and its peers are accepted.
    pub fn allow_uid(&mut self, uid: u32) -> io::Result<()> {
        if uid != euid() {
            std::os::unix::fs::chown(&self.socket, Some(uid), None).map_err(|e| {
                io::Error::new(
                    e.kind(),
                    format!(
                        "cannot give {} to uid {uid} (the VM's qemu_user): {e}",
                        self.socket.display()
                    ),
                )
            })?;
        }
        self.allowed_uid = Some(uid);
        Ok(())
    }

    /// Whether a peer with `uid` may connect.
    fn allows(&self, uid: u32) -> bool {
        uid == 0 || uid == euid() || Some(uid) == self.allowed_uid
    }

    /// The shared memory.
    pub fn region(&self) -> &GuestRegion {
        &self.mapping
    }

    /// The host's eventfd for `vector`, readable when a guest rings it.
    pub fn host_event(&self, vector: u32) -> Option<RawFd> {
        self.host_events
            .get(vector as usize)
            .map(AsRawFd::as_raw_fd)
    }

    /// The listening socket, readable when a QEMU connects.
    pub fn listener_fd(&self) -> RawFd {
        self.listener.as_raw_fd()
    }

    /// Accepts a QEMU that is connecting, if one is, without waiting.
    pub fn try_accept(&mut self) -> io::Result<Option<u16>> {
        self.listener.set_nonblocking(true)?;
        let accepted = self.listener.accept();
        self.listener.set_nonblocking(false)?;
        match accepted {
            Ok((stream, _)) => self.welcome(stream).map(Some),
            Err(e) if e.kind() == io::ErrorKind::WouldBlock => Ok(None),
            Err(e) => Err(e),
        }
    }

    /// Waits for the next QEMU to connect and gives it the memory and the eventfds.
    pub fn accept(&mut self) -> io::Result<u16> {
        let (stream, _) = self.listener.accept()?;
        self.welcome(stream)
    }

    /// Forgets peers whose QEMU has gone (their socket reads end-of-file; QEMU never sends
    /// the server anything), closing their eventfds.
    fn prune(&mut self) {
        self.peers.retain(|p| {
            let mut b = [0u8; 1];
            let _ = p.stream.set_nonblocking(true);
            // End-of-file, or a reset (it closed with our messages unread): gone.
            match (&p.stream).read(&mut b) {
                Ok(0) => false,
                Err(e) => {
                    e.kind() == io::ErrorKind::WouldBlock || e.kind() == io::ErrorKind::Interrupted
                }
                Ok(_) => true,
            }
        });
    }

    fn welcome(&mut self, stream: UnixStream) -> io::Result<u16> {
        // Refused before anything is sent: the stream is dropped, which the client reads as
        // the end.
        let (pid, uid) = peer_credentials(&stream)?;
        if !self.allows(uid) {
            return Err(io::Error::new(
                io::ErrorKind::PermissionDenied,
                format!(
                    "refused a client (pid {pid}, uid {uid}): not root, the daemon's user or the VM's qemu_user"
                ),
            ));
        }
        self.prune();
        if self.peers.len() >= MAX_PEERS {
            return Err(io::Error::other(format!(
                "refused a client (pid {pid}, uid {uid}): {MAX_PEERS} QEMUs are connected already"
            )));
        }
        stream.set_nonblocking(false)?;
        // The lowest id not in use (the host is 0).
        let id = (1..=u16::MAX)
            .find(|id| self.peers.iter().all(|p| p.id != *id))
            .ok_or_else(|| io::Error::other("too many peers"))?;
        let events: Vec<OwnedFd> = (0..self.vectors)
            .map(|_| eventfd())
            .collect::<io::Result<_>>()?;
        send_msg(&stream, 0, None)?; // protocol version
        send_msg(&stream, i64::from(id), None)?;
        send_msg(&stream, -1, Some(self.memfd.as_raw_fd()))?;
        // The host as peer 0, then the client's own vectors (which it will listen on).
        for e in &self.host_events {
            send_msg(&stream, i64::from(HOST_PEER), Some(e.as_raw_fd()))?;
        }
        for e in &events {
            send_msg(&stream, i64::from(id), Some(e.as_raw_fd()))?;
        }
        self.peers.push(Peer { id, events, stream });
        Ok(id)
    }

    /// Interrupts guest `peer` on `vector`.
    pub fn ring(&self, peer: u16, vector: u32) -> io::Result<()> {
        let p = self
            .peers
            .iter()
            .find(|p| p.id == peer)
            .ok_or_else(|| io::Error::other("no such peer"))?;
        let e = p
            .events
            .get(vector as usize)
            .ok_or_else(|| io::Error::other("no such vector"))?;
        signal_eventfd(e.as_raw_fd())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::os::unix::fs::PermissionsExt;

    fn scratch(name: &str) -> std::path::PathBuf {
        let dir =
            std::env::temp_dir().join(format!("portless-ivshmem-{name}-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        std::fs::create_dir_all(&dir).expect("scratch dir");
        dir
    }

    /// Connects to `socket` from a thread running as `uid` (a raw `setresuid`, which changes
    /// that thread alone) and returns the first bytes the server sent, or the error. The
    /// connection stays open (the server would take a close for a client that left) until
    /// `hold` is dropped.
    fn connect_as(
        uid: u32,
        socket: &Path,
        hold: std::sync::mpsc::Receiver<()>,
    ) -> thread::JoinHandle<io::Result<Vec<u8>>> {
        let socket = socket.to_path_buf();
        thread::spawn(move || {
            if uid != euid() {
                // SAFETY: a raw system call on plain values; it changes this thread only.
                let rc = unsafe { libc::syscall(libc::SYS_setresuid, uid, uid, uid) };
                if rc != 0 {
                    return Err(io::Error::last_os_error());
                }
            }
            let mut stream = UnixStream::connect(&socket)?;
            stream.set_read_timeout(Some(std::time::Duration::from_secs(5)))?;
            let mut got = [0u8; 8];
            let n = stream.read(&mut got)?;
            let _ = hold.recv();
            Ok(got[..n].to_vec())
        })
    }

    use std::thread;

    #[test]
    fn only_root_the_daemons_user_and_the_qemu_user_are_served() {
        if euid() != 0 {
            eprintln!("skipped: changing a thread's user needs root");
            return;
        }
        let dir = scratch("peers");
        let socket = dir.join("s");
        let mut server = Server::new(&socket, 1 << 16, 1).expect("server");
        let mode = std::fs::metadata(&socket)
            .expect("socket")
            .permissions()
            .mode();
        assert_eq!(mode & 0o777, 0o600, "{mode:o}");

        // Another user cannot even connect to a 0600 socket...
        let (_hold, held) = std::sync::mpsc::channel();
        let denied = connect_as(65534, &socket, held).join().expect("thread");
        assert_eq!(
            denied.expect_err("connected").kind(),
            io::ErrorKind::PermissionDenied
        );
        // ...and with a careless mode it connects but is refused, without the memory.
        std::fs::set_permissions(&socket, std::fs::Permissions::from_mode(0o666)).expect("chmod");
        let (hold, held) = std::sync::mpsc::channel::<()>();
        let client = connect_as(65534, &socket, held);
        let err = server.accept().expect_err("served another user");
        drop(hold);
        assert_eq!(err.kind(), io::ErrorKind::PermissionDenied);
        assert!(err.to_string().contains("uid 65534"), "{err}");
        assert_eq!(
            client.join().expect("thread").expect("read"),
            b"",
            "sent nothing"
        );

        // The VM's QEMU user, once allowed, is served; so is root.
        server.allow_uid(65534).expect("allow");
        let owner =
            std::os::unix::fs::MetadataExt::uid(&std::fs::metadata(&socket).expect("socket"));
        assert_eq!(owner, 65534);
        let (hold, held) = std::sync::mpsc::channel::<()>();
        let client = connect_as(65534, &socket, held);
        assert_eq!(server.accept().expect("served"), 1);
        drop(hold);
        assert_eq!(
            client.join().expect("thread").expect("read"),
            0i64.to_le_bytes()
        );
        let _ = std::fs::remove_dir_all(&dir);
    }

    #[test]
    fn connections_beyond_the_peer_limit_are_refused() {
        let dir = scratch("limit");
        let socket = dir.join("s");
        let mut server = Server::new(&socket, 1 << 16, 1).expect("server");
        let mut clients = Vec::new();
        for id in 1..=MAX_PEERS {
            clients.push(UnixStream::connect(&socket).expect("connect"));
            assert_eq!(usize::from(server.accept().expect("served")), id);
        }
        let mut extra = UnixStream::connect(&socket).expect("connect");
        let err = server.accept().expect_err("served past the limit");
        assert!(err.to_string().contains("connected already"), "{err}");
        let mut b = [0u8; 8];
        assert_eq!(extra.read(&mut b).expect("read"), 0);
        // A QEMU that goes frees its place.
        drop(clients.pop());
        let _again = UnixStream::connect(&socket).expect("connect");
        assert_eq!(usize::from(server.accept().expect("served")), MAX_PEERS);
        let _ = std::fs::remove_dir_all(&dir);
    }
}
