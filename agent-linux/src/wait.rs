//! The agent's main loop: attach to the channel, let the state machine work, and sleep in the
//! cheapest way the guest allows until something may have happened (a doorbell, a pipe, a
//! child exit, a signal, a timer). Without a host-to-guest interrupt the agent polls: it
//! spins briefly after activity, then sleeps for doubling intervals up to a cap.

use std::os::fd::AsRawFd;
use std::time::Duration;

use agent_core::Agent;
use agent_core::config::Config;
use ring_protocol::{AttachError, ChannelError, GuestEndpoint, Start};

use crate::contain::{CgroupMode, Cgroups};
use crate::device::{self, Channel};
use crate::log::Log;
use crate::platform::LinuxPlatform;
use crate::{Options, sys};

/// How often the agent bumps its heartbeat and re-checks its session while idle.
const TICK_MS: u64 = 1000;
/// Looks at the ring between two clock reads while spinning.
const SPIN_CHECKS: u32 = 16;
/// How often a busy agent (one that has not slept) looks for signals.
const SIGNAL_CHECK_MS: u64 = 10;
/// How long the agent spins on the channel after activity before it sleeps.
const SPIN_NS: u64 = 50_000;
/// How often the agent looks for the region while no host has set it up.
const ATTACH_POLL: Duration = Duration::from_millis(50);
/// Most descriptors polled at once: signals, interrupt, two pipes per execution.
const MAX_FDS: usize = 2 + 2 * agent_core::config::MAX_RUNNING;

/// What ended one attached session.
enum SessionEnd {
    /// The host reset the channel: attach again.
    Reattach,
    /// The channel is corrupt: a reset was requested; attach again, but not to this epoch.
    Corrupt(u32),
    /// Asked to stop.
    Stop,
}

/// Signals the loop reacts to.
struct Signals {
    fd: std::os::fd::OwnedFd,
}

enum SignalAction {
    None,
    Reload,
    Stop,
    Report,
}

impl Signals {
    fn new() -> std::io::Result<Self> {
        let fd = sys::signalfd(&[
            libc::SIGCHLD,
            libc::SIGHUP,
            libc::SIGTERM,
            libc::SIGINT,
            libc::SIGUSR1,
        ])?;
        Ok(Self { fd })
    }

    /// Drains pending signals; SIGCHLD needs nothing (the poll reaps).
    fn take(&self) -> SignalAction {
        let mut action = SignalAction::None;
        while let Some(sig) = sys::next_signal(self.fd.as_raw_fd()) {
            match i32::try_from(sig).unwrap_or(0) {
                libc::SIGTERM | libc::SIGINT => return SignalAction::Stop,
                libc::SIGHUP => action = SignalAction::Reload,
                libc::SIGUSR1 if matches!(action, SignalAction::None) => {
                    action = SignalAction::Report
                }
                _ => {}
            }
        }
        action
    }
}

struct Runner<'o> {
    opts: &'o Options,
    agent: Box<Agent<LinuxPlatform>>,
    platform: LinuxPlatform,
    text: Box<[u8]>,
    spare: Box<Config>,
    signals: Signals,
    generation: u32,
    /// Where requests are copied out of the ring (kept, so no poll clears 8 KiB).
    frame: Box<ring_protocol::FrameBuf>,
}

/// Runs until SIGTERM/SIGINT.
pub(crate) fn run(
    opts: &Options,
    agent: Box<Agent<LinuxPlatform>>,
    text: Box<[u8]>,
    log: Log,
) -> Result<(), String> {
    sys::ignore_sigpipe();
    let signals = Signals::new().map_err(|e| format!("signalfd: {e}"))?;
    let generation = agent.generation();
    let cgroups = match Cgroups::setup(&opts.cgroup) {
        Ok(Some(c)) => {
            log.line(format_args!("containment: {}", c.describe()));
            Some(c)
        }
        Ok(None) => {
            log.line(format_args!("containment: process groups (--cgroup off)"));
            None
        }
        Err(e) if opts.cgroup == CgroupMode::Auto => {
            log.line(format_args!("containment: process groups only: {e}"));
            None
        }
        Err(e) => return Err(format!("--cgroup: {e}")),
    };
    let mut r = Runner {
        opts,
        agent,
        platform: LinuxPlatform::new(log, cgroups),
        text,
        spare: Box::new(Config::new()),
        signals,
        generation,
        frame: Box::new(ring_protocol::frame_buf()),
    };
    let channel = r.find_channel()?;
    let Some(channel) = channel else {
        return Ok(());
    };
    r.platform.log_line(format_args!(
        "channel {} ({}), generation {:08x}, {} commands",
        channel.name,
        match channel.own_peer_id() {
            Some(_) => "can ring the host",
            None => "host polls",
        },
        generation,
        r.agent.config().command_count()
    ));
    r.agent.set_interrupts(channel.interrupt_fd().is_some());
    let mut refused = None;
    while let Some(mut ep) = r.attach(&channel, &mut refused) {
        r.platform
            .log_line(format_args!("attached to epoch {}", ep.epoch()));
        if r.agent.on_attach(&mut ep, channel.memory()).is_ok() && ep.take_kick(channel.memory()) {
            channel.ring_host();
        }
        match r.session(&channel, &mut ep) {
            SessionEnd::Stop => break,
            SessionEnd::Reattach => r.agent.note_reset(),
            SessionEnd::Corrupt(epoch) => {
                r.agent.note_reset();
                refused = Some(epoch);
            }
        }
    }
    r.agent.shutdown(&mut r.platform);
    r.platform.log_line(format_args!("stopped"));
    Ok(())
}

impl Runner<'_> {
    fn report(&self) {
        self.platform.log_line(format_args!(
            "heap allocations since start: {}",
            sys::allocations()
        ));
    }

    fn reload(&mut self) {
        match crate::load_config(&self.opts.config, &mut self.text, &mut self.spare) {
            Ok(()) => {
                self.agent.swap_config(&mut self.spare);
                self.platform.log_line(format_args!(
                    "allow-list reloaded: revision {}, {} commands",
                    self.agent.config_revision(),
                    self.agent.config().command_count()
                ));
            }
            Err(e) => self.platform.log_line(format_args!(
                "allow-list not reloaded, keeping the old one: {e}"
            )),
        }
    }

    /// Sleeps `d` unless a signal arrives; returns false when asked to stop.
    fn idle(&mut self, d: Duration) -> bool {
        let mut fds = [libc::pollfd {
            fd: self.signals.fd.as_raw_fd(),
            events: libc::POLLIN,
            revents: 0,
        }];
        sys::poll(
            &mut fds,
            Some(u64::try_from(d.as_nanos()).unwrap_or(u64::MAX)),
        );
        match self.signals.take() {
            SignalAction::Stop => false,
            SignalAction::Reload => {
                self.reload();
                true
            }
            SignalAction::Report => {
                self.report();
                true
            }
            SignalAction::None => true,
        }
    }

    fn find_channel(&mut self) -> Result<Option<Channel>, String> {
        let mut said = false;
        loop {
            let log = &self.platform;
            let mut note = |m: &str| log.log_line(format_args!("{m}"));
            match device::open(
                &self.opts.source,
                &self.opts.sysfs,
                self.opts.host_peer,
                self.opts.wakeup,
                &mut note,
            ) {
                Ok(Some(ch)) => return Ok(Some(ch)),
                Ok(None) => {
                    if !said {
                        self.platform
                            .log_line(format_args!("waiting for a region with the Portless magic"));
                        said = true;
                    }
                }
                Err(e) => return Err(e.to_string()),
            }
            if !self.idle(ATTACH_POLL) {
                return Ok(None);
            }
        }
    }

    fn attach(&mut self, channel: &Channel, refused: &mut Option<u32>) -> Option<GuestEndpoint> {
        let mem = channel.memory();
        let mut last_reason = String::new();
        loop {
            match GuestEndpoint::attach(mem, self.generation, Start::SkipPending, *refused) {
                Ok(ep) => return Some(ep),
                Err(AttachError::Corrupt { error, epoch }) => {
                    self.platform.log_line(format_args!(
                        "channel corrupt ({error}); asking the host to reset it"
                    ));
                    ring_protocol::channel::request_reset(mem);
                    channel.ring_host();
                    *refused = Some(epoch);
                }
                Err(e) => {
                    let reason = e.to_string();
                    if reason != last_reason {
                        self.platform.log_line(format_args!(
                            "waiting for the host: {reason} ({})",
                            device::describe(mem)
                        ));
                        last_reason = reason;
                    }
                }
            }
            if !self.idle(ATTACH_POLL) {
                return None;
            }
        }
    }

    fn session(&mut self, channel: &Channel, ep: &mut GuestEndpoint) -> SessionEnd {
        let mem = channel.memory();
        let mut next_tick = sys::now_ms();
        let mut sleep_ns = 0u64;
        let cap_ns = self.opts.poll_max_us * 1000;
        let mut pending_announce = false;
        // Signals are read after every sleep (the signalfd is among the descriptors it
        // watches) and, while busy, every SIGNAL_CHECK_MS: not on every pass, which would
        // add a system call to every request's path.
        let mut signals_due = true;
        let mut signals_checked = 0u64;
        loop {
            // One clock read per pass serves the signal check and the poll.
            let mut now = sys::now_ms();
            if signals_due || now.saturating_sub(signals_checked) >= SIGNAL_CHECK_MS {
                signals_due = false;
                signals_checked = now;
                match self.signals.take() {
                    SignalAction::Stop => return SessionEnd::Stop,
                    SignalAction::Reload => {
                        let before = self.agent.config_revision();
                        self.reload();
                        pending_announce |= self.agent.config_revision() != before;
                        now = sys::now_ms();
                    }
                    SignalAction::Report => self.report(),
                    SignalAction::None => {}
                }
            }
            if ep.check_session(mem).is_err() {
                self.platform
                    .log_line(format_args!("the host reset the channel"));
                return SessionEnd::Reattach;
            }
            if pending_announce && self.agent.announce_config(ep, mem).is_ok() {
                pending_announce = false;
            }
            let activity =
                match self
                    .agent
                    .poll_with_buffer(now, ep, mem, &mut self.platform, &mut self.frame)
                {
                    Ok(a) => a,
                    Err(ChannelError::Detached) => return SessionEnd::Reattach,
                    Err(ChannelError::Ring(e)) => {
                        self.platform.log_line(format_args!(
                            "channel corrupt ({e}); asking the host to reset it"
                        ));
                        let refused = ep.clone().request_reset(mem);
                        channel.ring_host();
                        return SessionEnd::Corrupt(refused);
                    }
                    Err(_) => return SessionEnd::Reattach,
                };
            if now >= next_tick {
                ep.beat(mem);
                next_tick = now + TICK_MS;
            }
            if ep.take_kick(mem) {
                channel.ring_host();
            }
            if activity.worked {
                sleep_ns = 0;
                continue;
            }
            // A doorbell that arrived while we worked.
            if channel.take_interrupts() > 0 {
                continue;
            }
            // Spin briefly: a reply often follows a request closely.
            if sleep_ns == 0 {
                let bell = ep.doorbell(mem);
                let until = sys::now_ns() + SPIN_NS;
                let mut spun = false;
                // The clock is read once per SPIN_CHECKS looks at the ring, not every time:
                // under emulation a clock read costs more than a look.
                'spin: while sys::now_ns() < until {
                    for _ in 0..SPIN_CHECKS {
                        if ep.has_incoming(mem) || ep.doorbell(mem) != bell {
                            spun = true;
                            break 'spin;
                        }
                        std::hint::spin_loop();
                    }
                }
                sleep_ns = 10_000;
                if spun {
                    continue;
                }
            }
            // Sleep until a pipe, a child, a signal, a timer, or the next poll.
            let may_sleep = match ep.prepare_wait(mem, activity.tx_needed) {
                Ok(s) => s,
                Err(_) => continue,
            };
            if may_sleep {
                let mut fds = [libc::pollfd {
                    fd: -1,
                    events: libc::POLLIN,
                    revents: 0,
                }; MAX_FDS];
                let mut n = 0;
                let mut add = |fd: i32| {
                    if let Some(slot) = fds.get_mut(n) {
                        slot.fd = fd;
                        n += 1;
                    }
                };
                add(self.signals.fd.as_raw_fd());
                if let Some(fd) = channel.interrupt_fd() {
                    add(fd);
                }
                // Pipes only while there is room to forward what they hold.
                if activity.tx_needed.is_none() {
                    for fd in self.agent.processes().flat_map(|p| p.fds()) {
                        add(fd);
                    }
                }
                let now = sys::now_ms();
                let mut timeout_ms = next_tick.saturating_sub(now);
                if let Some(d) = activity.next_deadline {
                    timeout_ms = timeout_ms.min(d.saturating_sub(now));
                }
                let mut timeout_ns = timeout_ms * 1_000_000;
                // Without an interrupt the host cannot wake us: come back to look.
                if channel.interrupt_fd().is_none() {
                    timeout_ns = timeout_ns.min(sleep_ns);
                }
                sys::poll(fds.get_mut(..n).unwrap_or_default(), Some(timeout_ns));
                signals_due = true;
                channel.take_interrupts();
                sleep_ns = (sleep_ns * 2).min(cap_ns);
            }
            ep.end_wait(mem);
        }
    }
}
