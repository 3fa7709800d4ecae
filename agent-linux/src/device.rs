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

/// The shared region and, for `ivshmem-doorbell` devices, the register to ring the host.
pub(crate) struct Channel {
    memory: Mapping,
    registers: Option<Mapping>,
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

/// Maps the ivshmem device at `bdf`: BAR2 as the region, BAR0 (if present) for the doorbell.
pub(crate) fn open_pci(sysfs: &Path, bdf: &str, host_peer: u32) -> io::Result<Channel> {
    let dir = sysfs.join("bus/pci/devices").join(bdf);
    if read_trimmed(&dir.join("vendor")).as_deref() != Some(IVSHMEM_VENDOR)
        || read_trimmed(&dir.join("device")).as_deref() != Some(IVSHMEM_DEVICE)
    {
        return Err(io::Error::new(
            io::ErrorKind::NotFound,
            format!("{bdf} is not an ivshmem device (1af4:1110)"),
        ));
    }
    let bar2 = dir.join("resource2");
    let len = file_len(&bar2)?;
    let memory = Mapping::map(&cpath(&bar2)?, len)?;
    let bar0 = dir.join("resource0");
    // ivshmem-plain has a BAR0 too, but only ivshmem-doorbell has a peer to ring; the host
    // tells which by its capabilities. Map it whenever it is there; ringing an absent peer
    // is harmless.
    let registers = match file_len(&bar0) {
        Ok(l) if l >= 16 => Some(Mapping::map(&cpath(&bar0)?, l.min(256))?),
        _ => None,
    };
    Ok(Channel {
        memory,
        registers,
        host_peer,
        name: format!("ivshmem {bdf}"),
    })
}

/// Finds the channel. For [`Source::Scan`], the first ivshmem device whose region carries the
/// Portless magic; `Ok(None)` if there are devices but none carries it yet (the host has not
/// set the region up: try again later).
pub(crate) fn open(source: &Source, sysfs: &Path, host_peer: u32) -> io::Result<Option<Channel>> {
    match source {
        Source::File(path) => open_file(path).map(Some),
        Source::Pci(bdf) => open_pci(sysfs, bdf, host_peer).map(Some),
        Source::Scan => {
            let devices = ivshmem_devices(sysfs);
            if devices.is_empty() {
                return Err(io::Error::new(
                    io::ErrorKind::NotFound,
                    "no ivshmem device (PCI 1af4:1110) found; give --pci BDF or --shm-file PATH",
                ));
            }
            for bdf in &devices {
                let ch = open_pci(sysfs, bdf, host_peer)?;
                if ring_protocol::layout::read_magic(ch.memory()) {
                    return Ok(Some(ch));
                }
            }
            // With a single device there is nothing to choose: wait on it.
            if let [only] = devices.as_slice() {
                return open_pci(sysfs, only, host_peer).map(Some);
            }
            Ok(None)
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
