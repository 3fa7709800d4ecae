//! The host's end of one guest's channel, driven directly (no daemon, no HTTP), the way a
//! control plane that links `ring-protocol` would: the lowest-level path Portless offers,
//! compared with qemu-ga's lowest-level path (its QEMU chardev socket).
//!
//! With interrupts the host sleeps on the eventfd the guest's doorbell makes readable and
//! rings the guest when notification suppression asks for it; when polling, the host spins
//! on the ring for [`SPIN`] while it waits for an answer, then naps [`NAP`] between looks,
//! and looks every [`IDLE_POLL`] while idle (as `portless serve` does).

use std::path::Path;
use std::time::{Duration, Instant};

use anyhow::{Context, Result, bail};
use host_shim::vm::ivshmem::{self, Server};
use host_shim::vm::memory::GuestRegion;
use ring_protocol::message::{
    AgentToHost, ExecRequest, ExecutionId, Finished, HostToAgent, Outcome, Stream,
};
use ring_protocol::{FrameBuf, HostEndpoint, SendError, SharedMemory, frame_buf};

use crate::qemu::{REGION, Wakeup};

/// How long a polling host spins for an answer before it naps between looks: long enough
/// for a no-op's answer, short enough not to take a core from QEMU during a command.
const SPIN: Duration = Duration::from_micros(100);
/// A polling host's nap between looks after [`SPIN`].
const NAP: Duration = Duration::from_micros(20);
/// How often an idle polling host looks at the ring (`portless serve` after 1 s of quiet).
pub(crate) const IDLE_POLL: Duration = Duration::from_millis(10);
/// How long a single answer may take before the bench gives up.
const ANSWER_LIMIT: Duration = Duration::from_secs(120);

enum Link {
    Server { server: Server, peer: Option<u16> },
    File(GuestRegion),
}

/// The host of one channel.
pub(crate) struct Host {
    link: Link,
    ep: HostEndpoint,
    buf: Box<FrameBuf>,
    next_id: u64,
}

/// What one execution produced, as the host saw it.
pub(crate) struct Run {
    /// How it ended.
    pub(crate) finished: Finished,
    /// Its standard output.
    pub(crate) stdout: Vec<u8>,
}

impl Host {
    /// Sets up the region for a guest woken as `wakeup`: an ivshmem server on `socket`
    /// (interrupts) or the memory-backend `file` (polling). Do this before QEMU starts.
    pub(crate) fn create(wakeup: Wakeup, socket: &Path, file: &Path) -> Result<Self> {
        let link = match wakeup {
            Wakeup::Interrupts => Link::Server {
                server: Server::new(socket, REGION, 1).context("ivshmem server")?,
                peer: None,
            },
            Wakeup::Polling => {
                let f = std::fs::File::options()
                    .read(true)
                    .write(true)
                    .create(true)
                    .truncate(true)
                    .open(file)?;
                f.set_len(REGION as u64)?;
                Link::File(GuestRegion::from_file(f, REGION)?)
            }
        };
        let mem: &dyn SharedMemory = match &link {
            Link::Server { server, .. } => server.region(),
            Link::File(region) => region,
        };
        let ep = HostEndpoint::create(mem, 1).map_err(|e| anyhow::anyhow!("region: {e:?}"))?;
        Ok(Self {
            link,
            ep,
            buf: Box::new(frame_buf()),
            next_id: 0,
        })
    }

    fn interrupts(&self) -> bool {
        matches!(self.link, Link::Server { .. })
    }

    /// Sends `msg`, waiting for room, and rings the guest if it asked for it.
    fn send(&mut self, msg: &HostToAgent<'_>) -> Result<()> {
        let deadline = Instant::now() + ANSWER_LIMIT;
        loop {
            let Self { link, ep, .. } = self;
            let sent = ep.send(memory(link), msg);
            match sent {
                Ok(()) => return self.kick(),
                Err(SendError::Full { needed }) => {
                    if Instant::now() > deadline {
                        bail!("the guest never made room in the ring");
                    }
                    self.wait(Some(needed), Duration::from_millis(100))?;
                }
                Err(e) => bail!("send: {e:?}"),
            }
        }
    }

    /// Rings the guest if what this side sent or consumed calls for it.
    fn kick(&mut self) -> Result<()> {
        let Self { link, ep, .. } = self;
        if ep.take_kick(memory(link))
            && let Link::Server {
                server,
                peer: Some(peer),
            } = link
        {
            server.ring(*peer, 0).context("ringing the guest")?;
        }
        Ok(())
    }

    /// Waits up to `limit` for something to read (or `tx_needed` bytes of room): sleeps on
    /// the doorbell with interrupts, spins when polling.
    fn wait(&mut self, tx_needed: Option<u32>, limit: Duration) -> Result<()> {
        let Self { link, ep, .. } = self;
        match link {
            Link::Server { server, peer } => {
                if peer.is_none() {
                    *peer = server.try_accept().context("accepting QEMU")?;
                }
                let mem = server.region();
                if ep
                    .prepare_wait(mem, tx_needed)
                    .map_err(|e| anyhow::anyhow!("ring: {e:?}"))?
                {
                    let Some(fd) = server.host_event(0) else {
                        bail!("no host eventfd");
                    };
                    let mut fds = [libc::pollfd {
                        fd,
                        events: libc::POLLIN,
                        revents: 0,
                    }];
                    // Until QEMU connects its doorbell cannot ring: look again soon.
                    let wait = if peer.is_some() {
                        limit
                    } else {
                        Duration::from_millis(5)
                    };
                    ivshmem::poll(&mut fds, wait);
                    ivshmem::take_eventfd(fd);
                }
                ep.end_wait(mem);
            }
            Link::File(region) => {
                let start = Instant::now();
                while !ep.has_incoming(region)
                    && tx_needed.is_none_or(|n| ep.tx_free(region).is_ok_and(|f| f < n))
                    && start.elapsed() < limit
                {
                    if start.elapsed() < SPIN {
                        std::hint::spin_loop();
                    } else {
                        std::thread::sleep(NAP);
                    }
                }
            }
        }
        Ok(())
    }

    /// Receives messages until `f` returns `Some` for one, or `limit` passes.
    fn until<T>(
        &mut self,
        limit: Duration,
        mut f: impl FnMut(&AgentToHost<'_>) -> Option<T>,
    ) -> Result<T> {
        let deadline = Instant::now() + limit;
        loop {
            let got = {
                let Self { link, ep, buf, .. } = self;
                ep.recv(memory(link), buf)
                    .map_err(|e| anyhow::anyhow!("recv: {e:?}"))?
                    .map(|msg| f(&msg))
            };
            match got {
                Some(Some(t)) => {
                    self.kick()?;
                    return Ok(t);
                }
                Some(None) => {}
                None => {
                    // Consuming may have freed room the agent waits for.
                    self.kick()?;
                    let left = deadline.saturating_duration_since(Instant::now());
                    if left.is_zero() {
                        bail!("no answer from the agent within {limit:?}");
                    }
                    self.wait(None, left.min(Duration::from_millis(100)))?;
                }
            }
        }
    }

    /// Waits for the agent's hello (after its attach), up to `limit`.
    pub(crate) fn hello(&mut self, limit: Duration) -> Result<()> {
        self.until(limit, |m| matches!(m, AgentToHost::Hello(_)).then_some(()))
    }

    /// One no-op round trip; returns its time.
    pub(crate) fn ping(&mut self) -> Result<Duration> {
        self.next_id += 1;
        let nonce = self.next_id;
        let t = Instant::now();
        self.send(&HostToAgent::Ping { nonce })?;
        self.until(ANSWER_LIMIT, |m| {
            matches!(m, AgentToHost::Pong { nonce: n } if *n == nonce).then_some(())
        })?;
        Ok(t.elapsed())
    }

    /// Runs `command` with `args` and collects its stdout until its exit.
    pub(crate) fn run(&mut self, command: &str, args: &[&str]) -> Result<Run> {
        self.next_id += 1;
        let request_id = self.next_id;
        self.send(&HostToAgent::Exec(ExecRequest {
            request_id,
            command,
            args: args.iter().copied().collect(),
            timeout_ms: None,
        }))?;
        let mut id: Option<ExecutionId> = None;
        let mut stdout = Vec::new();
        let mut refused = None;
        let finished = self.until(ANSWER_LIMIT, |m| match m {
            AgentToHost::Accepted {
                request_id: r,
                execution,
            } if *r == request_id => {
                id = Some(*execution);
                None
            }
            AgentToHost::Rejected {
                request_id: r,
                reason,
            } if *r == request_id => {
                refused = Some(format!("{reason:?}"));
                Some(None)
            }
            AgentToHost::Output {
                execution,
                stream: Stream::Stdout,
                data,
                ..
            } if Some(*execution) == id => {
                stdout.extend_from_slice(data);
                None
            }
            AgentToHost::Exit {
                execution,
                finished,
            } if Some(*execution) == id => Some(Some(*finished)),
            _ => None,
        })?;
        match (finished, refused) {
            (Some(finished), _) => Ok(Run { finished, stdout }),
            (None, reason) => bail!("`{command}` was refused: {}", reason.unwrap_or_default()),
        }
    }

    /// Runs `command` and requires exit status 0.
    pub(crate) fn run_ok(&mut self, command: &str, args: &[&str]) -> Result<Run> {
        let run = self.run(command, args)?;
        if run.finished.outcome != Outcome::Exited(0) {
            bail!("`{command}` ended {:?}", run.finished.outcome);
        }
        Ok(run)
    }

    /// Stays idle for `time`, as a host with nothing to ask does: asleep on the doorbell
    /// with interrupts, looking every [`IDLE_POLL`] when polling. Consumes whatever arrives.
    pub(crate) fn idle(&mut self, time: Duration) -> Result<()> {
        let end = Instant::now() + time;
        while Instant::now() < end {
            let Self { link, ep, buf, .. } = self;
            while ep
                .recv(memory(link), buf)
                .map_err(|e| anyhow::anyhow!("recv: {e:?}"))?
                .is_some()
            {}
            self.kick()?;
            let left = end.saturating_duration_since(Instant::now());
            if self.interrupts() {
                self.wait(None, left)?;
            } else {
                std::thread::sleep(left.min(IDLE_POLL));
            }
        }
        Ok(())
    }
}

fn memory(link: &Link) -> &dyn SharedMemory {
    match link {
        Link::Server { server, .. } => server.region(),
        Link::File(region) => region,
    }
}
