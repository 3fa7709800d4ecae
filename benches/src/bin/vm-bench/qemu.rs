//! One QEMU guest of the bench image, with both agents: `portless-agent` on an ivshmem
//! device (doorbell with VFIO interrupts, or plain with polling) and qemu-ga on a
//! virtio-serial port; and the CPU time processes spend, from `/proc`.

use std::path::{Path, PathBuf};
use std::process::Child;
use std::time::{Duration, Instant};

use anyhow::{Context, Result};
use vm_harness::{Guest, Ivshmem};

/// The shared region's size (a power of two, as ivshmem wants).
pub(crate) const REGION: usize = 1 << 20;

/// How the guest's agent is woken.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Wakeup {
    /// `ivshmem-doorbell` on q35 with a virtual IOMMU: VFIO MSI-X into the guest, the BAR0
    /// doorbell out of it; the host sleeps on an eventfd.
    Interrupts,
    /// `ivshmem-plain`: no interrupts; the agent polls adaptively.
    Polling,
}

impl Wakeup {
    /// The name used in figures and file names.
    pub(crate) fn name(self) -> &'static str {
        match self {
            Self::Interrupts => "interrupts",
            Self::Polling => "polling",
        }
    }
}

/// A running guest; stopped (killed and reaped) on drop.
pub(crate) struct Vm {
    /// The guest's name (for its files).
    pub(crate) name: String,
    child: Child,
    /// When QEMU was started.
    pub(crate) started: Instant,
    /// qemu-ga's socket.
    pub(crate) qga: PathBuf,
    /// The console log.
    pub(crate) console: PathBuf,
}

impl Vm {
    /// Boots `image` (vmlinuz, initrd.gz) with `accel` and `ivshmem`, the QEMU guest agent's
    /// port on `<name>.qga` and the agent logging to the kernel log only; its files go in
    /// `dir`.
    pub(crate) fn boot(
        image: &Path,
        dir: &Path,
        name: &str,
        accel: &str,
        ivshmem: Ivshmem,
    ) -> Result<Self> {
        Self::boot_with(image, dir, name, accel, ivshmem, &[])
    }

    /// [`boot`](Self::boot) with more kernel arguments (an `agent_args=...` there, being
    /// last, is the one the image's init uses).
    pub(crate) fn boot_with(
        image: &Path,
        dir: &Path,
        name: &str,
        accel: &str,
        ivshmem: Ivshmem,
        kernel_args: &[&str],
    ) -> Result<Self> {
        let qga = dir.join(format!("{name}.qga"));
        let console = dir.join(format!("{name}.console"));
        let _ = std::fs::remove_file(&qga);
        let started = Instant::now();
        let guest = kernel_args.iter().fold(
            Guest::new(image, ivshmem)
                .accel(accel)
                .kernel_arg("agent_log=kmsg"),
            |g, a| g.kernel_arg(a),
        );
        let child = guest
            .qga(&qga)
            .spawn(&console, Some(&dir.join(format!("{name}.qemu-err"))))
            .context("starting qemu-system-x86_64")?;
        Ok(Self {
            name: name.to_owned(),
            child,
            started,
            qga,
            console,
        })
    }

    /// QEMU's process id.
    pub(crate) fn pid(&self) -> u32 {
        self.child.id()
    }

    /// CPU time QEMU has used so far (all its threads).
    pub(crate) fn cpu(&self) -> Duration {
        process_cpu(self.pid())
    }

    /// The end of the console log, for error messages.
    pub(crate) fn console_tail(&self) -> String {
        let text = std::fs::read_to_string(&self.console).unwrap_or_default();
        let lines: Vec<&str> = text.lines().collect();
        lines[lines.len().saturating_sub(15)..].join("\n")
    }

    /// Fails if QEMU has exited.
    pub(crate) fn check_alive(&mut self) -> Result<()> {
        if let Some(status) = self.child.try_wait()? {
            anyhow::bail!(
                "QEMU of {} exited ({status}); console:\n{}",
                self.name,
                self.console_tail()
            );
        }
        Ok(())
    }
}

impl Drop for Vm {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// The CPU time of every live thread of process `pid` (`/proc/<pid>/task/*/schedstat`,
/// nanoseconds on the CPU).
pub(crate) fn process_cpu(pid: u32) -> Duration {
    let Ok(tasks) = std::fs::read_dir(format!("/proc/{pid}/task")) else {
        return Duration::ZERO;
    };
    tasks
        .filter_map(|t| t.ok())
        .map(|t| schedstat(&t.path().join("schedstat")))
        .sum()
}

/// The CPU time of the calling thread.
pub(crate) fn thread_cpu() -> Duration {
    schedstat(Path::new("/proc/thread-self/schedstat"))
}

fn schedstat(path: &Path) -> Duration {
    std::fs::read_to_string(path)
        .ok()
        .and_then(|s| s.split_whitespace().next()?.parse().ok())
        .map_or(Duration::ZERO, Duration::from_nanos)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn this_thread_uses_cpu_time() {
        let before = thread_cpu();
        let mut x = 0u64;
        let t = Instant::now();
        while t.elapsed() < Duration::from_millis(30) {
            x = std::hint::black_box(x.wrapping_add(1));
        }
        assert!(thread_cpu() > before);
        assert!(process_cpu(std::process::id()) >= thread_cpu());
        assert_eq!(process_cpu(u32::MAX), Duration::ZERO);
    }
}
