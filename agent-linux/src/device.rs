//! Finding the channel: an ivshmem PCI device (1af4:1110) whose shared memory (BAR2) carries
//! the Portless magic, or a plain file for running next to the host without a VM. Also the
//! BAR0 doorbell register through which the guest rings the host.

use std::ffi::CString;
use std::io;
use std::path::{Path, PathBuf};

use ring_protocol::{MappedRegion, SharedMemory};

use crate::sys::Mapping;

/// The ivshmem vendor and device ids.
const IVSHMEM_VENDOR: &str = "0x1af4";
const IVSHMEM_DEVICE: &str = "0x1110";
/// BAR0 register: this guest's peer id.
const IV_POSITION: usize = 8;
/// BAR0 register: write `(peer << 16) | vector` to ring a peer.
const DOORBELL: usize = 12;

/// Where the agent finds its channel.
#[derive(Debug, Clone)]
pub(crate) enum Source {
    /// A shared-memory file (a QEMU memory-backend file, or a host-side test).
    File(PathBuf),
    /// The ivshmem device at this PCI address (`0000:00:04.0`).
    Pci(String),
    /// The first ivshmem device whose memory carries the Portless magic.
    Scan,
}

/// How the agent learns that the host rang.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Wakeup {
    /// VFIO interrupts if the guest has them, else polling.
    Auto,
    /// VFIO interrupts, or fail.
    Vfio,
    /// Always poll.
    Poll,
}

/// The shared region and, for `ivshmem-doorbell` devices, the register to ring the host and
/// the interrupt the host rings.
pub(crate) struct Channel {
    memory: Mapping,
    registers: Option<Mapping>,
    vfio: Option<crate::vfio::VfioDevice>,
    host_peer: u32,
    /// What was opened, for logs.
    pub(crate) name: String,
}

impl Channel {
    /// The shared region.
    pub(crate) fn memory(&self) -> &MappedRegion {
        self.memory.region()
    }

    /// Rings the host, if the device has a doorbell (`ivshmem-doorbell`); otherwise the
    /// host polls and there is nothing to do.
    pub(crate) fn ring_host(&self) {
        if let Some(regs) = &self.registers {
            regs.write_register(DOORBELL, self.host_peer << 16);
        }
    }

    /// The descriptor that becomes readable when the host rings, if interrupts work.
    pub(crate) fn interrupt_fd(&self) -> Option<std::os::fd::RawFd> {
        use std::os::fd::AsRawFd;
        self.vfio.as_ref().map(|v| v.interrupt.as_raw_fd())
    }

    /// Consumes pending interrupts.
    pub(crate) fn take_interrupts(&self) -> u64 {
        self.vfio
            .as_ref()
            .map_or(0, crate::vfio::VfioDevice::take_interrupts)
    }

    /// This guest's ivshmem peer id, when the device has registers.
    pub(crate) fn own_peer_id(&self) -> Option<u32> {
        self.registers
            .as_ref()
            .map(|r| r.read_register(IV_POSITION))
    }
}

fn file_len(path: &Path) -> io::Result<usize> {
    let len = std::fs::metadata(path)?.len();
    usize::try_from(len).map_err(|_| io::Error::other("region too large"))
}

fn cpath(path: &Path) -> io::Result<CString> {
    CString::new(path.as_os_str().as_encoded_bytes())
        .map_err(|_| io::Error::new(io::ErrorKind::InvalidInput, "path contains NUL"))
}

/// Maps a shared-memory file.
pub(crate) fn open_file(path: &Path) -> io::Result<Channel> {
    let len = file_len(path)?;
    ring_protocol::layout::check_region_size(len).map_err(|e| {
        io::Error::new(
            io::ErrorKind::InvalidData,
            format!("{}: {e}", path.display()),
        )
    })?;
    let memory = Mapping::map(&cpath(path)?, len)?;
    Ok(Channel {
        memory,
        registers: None,
        vfio: None,
        host_peer: 0,
        name: path.display().to_string(),
    })
}

fn read_trimmed(path: &Path) -> Option<String> {
    std::fs::read_to_string(path)
        .ok()
        .map(|s| s.trim().to_owned())
}

/// The PCI addresses of every ivshmem device, sorted.
pub(crate) fn ivshmem_devices(sysfs: &Path) -> Vec<String> {
    let mut found = Vec::new();
    let Ok(entries) = std::fs::read_dir(sysfs.join("bus/pci/devices")) else {
        return found;
    };
    for entry in entries.flatten() {
        let dir = entry.path();
        if read_trimmed(&dir.join("vendor")).as_deref() == Some(IVSHMEM_VENDOR)
            && read_trimmed(&dir.join("device")).as_deref() == Some(IVSHMEM_DEVICE)
        {
            found.push(entry.file_name().to_string_lossy().into_owned());
        }
    }
    found.sort();
    found
}

fn is_ivshmem(dir: &Path) -> bool {
    read_trimmed(&dir.join("vendor")).as_deref() == Some(IVSHMEM_VENDOR)
        && read_trimmed(&dir.join("device")).as_deref() == Some(IVSHMEM_DEVICE)
}

/// Maps the ivshmem device at `bdf` through sysfs: BAR2 as the region, BAR0 (if present) for
/// the doorbell register.
fn open_sysfs(sysfs: &Path, bdf: &str, host_peer: u32) -> io::Result<Channel> {
    let dir = sysfs.join("bus/pci/devices").join(bdf);
    if !is_ivshmem(&dir) {
        return Err(io::Error::new(
            io::ErrorKind::NotFound,
            format!("{bdf} is not an ivshmem device (1af4:1110)"),
        ));
    }
    let bar2 = dir.join("resource2");
    let len = file_len(&bar2)?;
    let memory = Mapping::map(&cpath(&bar2)?, len)?;
    // ivshmem-plain has register BAR0 too, but no peer to ring: only ivshmem-doorbell has the
    // MSI-X BAR1 (and a server that hands out doorbells).
    let bar0 = dir.join("resource0");
    let doorbell = dir.join("resource1").exists();
    let registers = match file_len(&bar0) {
        Ok(l) if l >= 16 && doorbell => Some(Mapping::map(&cpath(&bar0)?, l.min(256))?),
        _ => None,
    };
    Ok(Channel {
        memory,
        registers,
        vfio: None,
        host_peer,
        name: format!("ivshmem {bdf}"),
    })
}

/// Opens the ivshmem device at `bdf`, with VFIO interrupts as `wakeup` asks. In `Auto`
/// mode a guest without VFIO (no module, no IOMMU) falls back to polling; `note` hears why.
pub(crate) fn open_pci(
    sysfs: &Path,
    bdf: &str,
    host_peer: u32,
    wakeup: Wakeup,
    note: &mut dyn FnMut(&str),
) -> io::Result<Channel> {
    if wakeup == Wakeup::Poll {
        return open_sysfs(sysfs, bdf, host_peer);
    }
    if !is_ivshmem(&sysfs.join("bus/pci/devices").join(bdf)) {
        return open_sysfs(sysfs, bdf, host_peer);
    }
    match crate::vfio::VfioDevice::open(sysfs, bdf) {
        Ok(vfio) => {
            let memory = vfio.map_bar(2)?;
            let registers = vfio.map_bar(0).ok();
            Ok(Channel {
                memory,
                registers,
                vfio: Some(vfio),
                host_peer,
                name: format!("ivshmem {bdf} (vfio interrupts)"),
            })
        }
        Err(e) if wakeup == Wakeup::Auto => {
            note(&format!("no interrupts for {bdf} ({e}); polling"));
            open_sysfs(sysfs, bdf, host_peer)
        }
        Err(e) => Err(e),
    }
}

/// Finds the channel. For [`Source::Scan`], the first ivshmem device whose region carries the
/// Portless magic; `Ok(None)` if there are devices but none carries it yet (the host has not
/// set the region up: try again later).
pub(crate) fn open(
    source: &Source,
    sysfs: &Path,
    host_peer: u32,
    wakeup: Wakeup,
    note: &mut dyn FnMut(&str),
) -> io::Result<Option<Channel>> {
    match source {
        Source::File(path) => open_file(path).map(Some),
        Source::Pci(bdf) => open_pci(sysfs, bdf, host_peer, wakeup, note).map(Some),
        Source::Scan => {
            let devices = ivshmem_devices(sysfs);
            if devices.is_empty() {
                return Err(io::Error::new(
                    io::ErrorKind::NotFound,
                    "no ivshmem device (PCI 1af4:1110) found; give --pci BDF or --shm-file PATH",
                ));
            }
            let mut chosen = None;
            for bdf in &devices {
                let ch = open_sysfs(sysfs, bdf, host_peer)?;
                if ring_protocol::layout::read_magic(ch.memory()) {
                    chosen = Some(bdf);
                    break;
                }
            }
            // With a single device there is nothing to choose: wait on it.
            if let [only] = devices.as_slice() {
                chosen = Some(only);
            }
            match chosen {
                Some(bdf) => open_pci(sysfs, bdf, host_peer, wakeup, note).map(Some),
                None => Ok(None),
            }
        }
    }
}

/// Whether the region is (still) too small or unset to attach: used for messages only.
pub(crate) fn describe(mem: &MappedRegion) -> &'static str {
    if ring_protocol::layout::read_magic(mem) {
        "ready"
    } else if mem.is_empty() {
        "empty"
    } else {
        "waiting for the host to set up the region"
    }
}
