//! `portless-agent`: the Portless guest agent for Linux. It finds its shared-memory channel,
//! attaches to it, and runs the agent state machine of `agent-core` over it with real
//! processes, waking on doorbells, pipes, child exits and timers, or polling adaptively when
//! the host cannot ring it.

mod contain;
mod device;
mod log;
mod platform;
mod sys;
mod vfio;
mod wait;

use std::path::PathBuf;
use std::process::ExitCode;

use agent_core::Agent;
use agent_core::config::Config;

use crate::device::{Source, Wakeup};

#[global_allocator]
static ALLOCATOR: sys::CountingAllocator = sys::CountingAllocator;

const USAGE: &str = "\
usage: portless-agent [options]

Runs allow-listed commands for the Portless host through a shared-memory channel.

options:
  --config PATH      the allow-list (default /etc/portless-agent/allow-list.toml)
  --shm-file PATH    use this shared-memory file instead of an ivshmem device
  --pci BDF          use the ivshmem device at this PCI address (default: the first
                     ivshmem device whose memory carries the Portless magic)
  --host-peer N      the host's ivshmem peer id, for ringing it (default 0)
  --wakeup MODE      how the host wakes the agent: `vfio` (MSI-X interrupts through
                     vfio-pci; needs the vfio-pci module and an IOMMU), `poll`, or `auto`
                     (vfio when it works, else poll; the default)
  --poll-max-us N    longest sleep between polls when the host cannot wake the agent
                     (default 1000)
  --cgroup MODE      how executions are contained: `auto` (a cgroup v2 each, beside the
                     agent's own, where the guest has cgroup v2; else process groups; the
                     default), `off` (process groups only), or a cgroup v2 directory to
                     make them in
  --kmsg             also log to the kernel log (/dev/kmsg)
  --quiet            do not log each execution
  --check-config     check the allow-list and exit
  --help             this text

Signals: SIGHUP reloads the allow-list (a bad one is reported and the old one kept);
SIGUSR1 logs the agent's heap allocations since start (its steady state makes none);
SIGTERM and SIGINT stop the agent and the processes it started.
";

/// Command-line options.
pub(crate) struct Options {
    pub(crate) config: PathBuf,
    pub(crate) source: Source,
    pub(crate) host_peer: u32,
    pub(crate) wakeup: Wakeup,
    pub(crate) poll_max_us: u64,
    pub(crate) kmsg: bool,
    pub(crate) quiet: bool,
    pub(crate) check_config: bool,
    pub(crate) sysfs: PathBuf,
    pub(crate) cgroup: contain::CgroupMode,
}

impl Options {
    fn parse(mut args: impl Iterator<Item = String>) -> Result<Option<Self>, String> {
        let mut o = Self {
            config: PathBuf::from("/etc/portless-agent/allow-list.toml"),
            source: Source::Scan,
            host_peer: 0,
            wakeup: Wakeup::Auto,
            poll_max_us: 1000,
            kmsg: false,
            quiet: false,
            check_config: false,
            sysfs: PathBuf::from("/sys"),
            cgroup: contain::CgroupMode::Auto,
        };
        while let Some(arg) = args.next() {
            let mut value = |name: &str| args.next().ok_or_else(|| format!("{name} needs a value"));
            match arg.as_str() {
                "--config" => o.config = value("--config")?.into(),
                "--shm-file" => o.source = Source::File(value("--shm-file")?.into()),
                "--pci" => o.source = Source::Pci(value("--pci")?),
                "--sysfs" => o.sysfs = value("--sysfs")?.into(),
                "--host-peer" => {
                    let v = value("--host-peer")?;
                    o.host_peer = v.parse().ok().filter(|p| *p <= 0xffff).ok_or_else(|| {
                        format!("--host-peer takes a peer id 0..65535, not `{v}`")
                    })?;
                }
                "--poll-max-us" => {
                    let v = value("--poll-max-us")?;
                    o.poll_max_us = v
                        .parse()
                        .ok()
                        .filter(|us| (1..=1_000_000).contains(us))
                        .ok_or_else(|| format!("--poll-max-us takes 1..1000000, not `{v}`"))?;
                }
                "--wakeup" => {
                    o.wakeup = match value("--wakeup")?.as_str() {
                        "auto" => Wakeup::Auto,
                        "vfio" => Wakeup::Vfio,
                        "poll" => Wakeup::Poll,
                        other => {
                            return Err(format!(
                                "--wakeup takes auto, vfio or poll, not `{other}`"
                            ));
                        }
                    };
                }
                "--cgroup" => {
                    o.cgroup = match value("--cgroup")?.as_str() {
                        "auto" => contain::CgroupMode::Auto,
                        "off" => contain::CgroupMode::Off,
                        dir if dir.starts_with('/') => contain::CgroupMode::Under(dir.into()),
                        other => {
                            return Err(format!(
                                "--cgroup takes auto, off or an absolute directory, not `{other}`"
                            ));
                        }
                    };
                }
                "--kmsg" => o.kmsg = true,
                "--quiet" => o.quiet = true,
                "--check-config" => o.check_config = true,
                "--help" | "-h" => return Ok(None),
                other => return Err(format!("unknown option `{other}`")),
            }
        }
        Ok(Some(o))
    }
}

/// Largest allow-list file accepted.
pub(crate) const MAX_CONFIG_FILE: usize = 256 * 1024;

/// Reads and parses the allow-list into `into`, using `buf` for the text (so that reloads do
/// not allocate). On error `into` is unchanged and the message names file, line and reason.
pub(crate) fn load_config(
    path: &std::path::Path,
    buf: &mut [u8],
    into: &mut Config,
) -> Result<(), String> {
    let cpath = std::ffi::CString::new(path.as_os_str().as_encoded_bytes())
        .map_err(|_| format!("{}: path contains NUL", path.display()))?;
    let n = sys::read_file(&cpath, buf).map_err(|e| format!("{}: {e}", path.display()))?;
    if n == buf.len() {
        return Err(format!(
            "{}: larger than {} bytes",
            path.display(),
            buf.len()
        ));
    }
    let text = std::str::from_utf8(buf.get(..n).unwrap_or_default())
        .map_err(|e| format!("{}: not UTF-8 ({e})", path.display()))?;
    into.load(text)
        .map_err(|e| format!("{}: {e}", path.display()))
}

/// A generation for execution ids that differs across agent starts: random, never 0.
fn new_generation() -> u32 {
    sys::random_u32().max(1)
}

fn main() -> ExitCode {
    let opts = match Options::parse(std::env::args().skip(1)) {
        Ok(Some(o)) => o,
        Ok(None) => {
            print!("{USAGE}");
            return ExitCode::SUCCESS;
        }
        Err(e) => {
            eprintln!("portless-agent: {e}\n\n{USAGE}");
            return ExitCode::from(2);
        }
    };
    let mut text = vec![0u8; MAX_CONFIG_FILE].into_boxed_slice();
    let mut config = Box::new(Config::new());
    if let Err(e) = load_config(&opts.config, &mut text, &mut config) {
        eprintln!("portless-agent: {e}");
        return ExitCode::FAILURE;
    }
    if opts.check_config {
        println!(
            "{}: {} commands, ok",
            opts.config.display(),
            config.command_count()
        );
        return ExitCode::SUCCESS;
    }
    let log = log::Log::new(opts.kmsg, opts.quiet);
    let agent = Box::new(Agent::new(*config, new_generation()));
    match wait::run(&opts, agent, text, log) {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("portless-agent: {e}");
            ExitCode::FAILURE
        }
    }
}
