//! Guest memory as the host sees it: the region shared with a VM (a QEMU memory-backend file,
//! or the memfd the daemon gives QEMU as an ivshmem server), mapped with rust-vmm's
//! `vm-memory`, whose volatile slices offer exactly the accesses the channel needs: atomic
//! loads and stores of aligned words and volatile copies. Never a Rust reference into it.

use std::fs::File;
use std::io;
use std::path::Path;
use std::sync::atomic::Ordering;

use ring_protocol::SharedMemory;
use vm_memory::{Bytes, FileOffset, MmapRegion, VolatileMemory};

/// A region of guest memory mapped shared and read-write.
#[derive(Debug)]
pub struct GuestRegion {
    region: MmapRegion<()>,
}

impl GuestRegion {
    /// Maps all of `file` (`size` bytes) shared.
    pub fn from_file(file: File, size: usize) -> io::Result<Self> {
        let region = MmapRegion::<()>::from_file(FileOffset::new(file, 0), size)
            .map_err(|e| io::Error::other(format!("mapping guest memory: {e}")))?;
        Ok(Self { region })
    }

    /// Opens the region file at `path`, creating it with `size` bytes (mode 0600) if it is
    /// missing or empty; an existing file must have that size. A symbolic link is refused
    /// (`O_NOFOLLOW`), so that nobody can point the daemon at a file of their choosing.
    pub fn open_file(path: &Path, size: usize) -> io::Result<File> {
        let file = crate::sys::open_private(path).map_err(|e| {
            if e.raw_os_error() == Some(libc::ELOOP) {
                io::Error::new(
                    e.kind(),
                    format!(
                        "{} is a symbolic link; a region must be a file of its own",
                        path.display()
                    ),
                )
            } else {
                io::Error::new(e.kind(), format!("opening {}: {e}", path.display()))
            }
        })?;
        let len = file.metadata()?.len();
        if len == 0 {
            file.set_len(size as u64)?;
        } else if len != size as u64 {
            return Err(io::Error::other(format!(
                "{} is {len} bytes but the configuration says {size}",
                path.display()
            )));
        }
        Ok(file)
    }

    /// Maps a new anonymous region of `size` bytes (a memfd), zeroed: a channel without a
    /// VM, for tests and fuzzing.
    pub fn anonymous(size: usize) -> io::Result<Self> {
        Self::from_file(crate::vm::ivshmem::memfd(size)?, size)
    }

    /// Opens and maps a memory-backend file; its size must be a valid region size.
    pub fn open(path: &Path) -> io::Result<Self> {
        let file = File::options().read(true).write(true).open(path)?;
        let len = usize::try_from(file.metadata()?.len())
            .map_err(|_| io::Error::other("region file too large"))?;
        ring_protocol::layout::check_region_size(len).map_err(|e| {
            io::Error::new(
                io::ErrorKind::InvalidData,
                format!("{}: {e}", path.display()),
            )
        })?;
        Self::from_file(file, len)
    }
}

impl SharedMemory for GuestRegion {
    fn len(&self) -> usize {
        self.region.size()
    }

    fn load(&self, offset: usize, order: Ordering) -> u32 {
        // Ordering: chosen by the caller, who documents why.
        self.region
            .as_volatile_slice()
            .load::<u32>(offset, order)
            .unwrap_or(0)
    }

    fn store(&self, offset: usize, value: u32, order: Ordering) {
        // Ordering: chosen by the caller, who documents why.
        let _ = self.region.as_volatile_slice().store(value, offset, order);
    }

    fn read(&self, offset: usize, dst: &mut [u8]) {
        if self
            .region
            .as_volatile_slice()
            .read_slice(dst, offset)
            .is_err()
        {
            dst.fill(0);
        }
    }

    fn write(&self, offset: usize, src: &[u8]) {
        let _ = self.region.as_volatile_slice().write_slice(src, offset);
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use ring_protocol::message::{AgentToHost, HostToAgent};
    use ring_protocol::{GuestEndpoint, HostEndpoint, Start, frame_buf};

    #[test]
    fn a_channel_works_over_a_mapped_file() {
        let dir = std::env::temp_dir().join(format!("portless-memory-{}", std::process::id()));
        std::fs::create_dir_all(&dir).expect("dir");
        let path = dir.join("region");
        let f = File::create(&path).expect("create");
        f.set_len(64 * 1024).expect("size");
        let host_mem = GuestRegion::open(&path).expect("map");
        let guest_mem = GuestRegion::open(&path).expect("map again");
        let mut host = HostEndpoint::create(&host_mem, 1).expect("valid");
        let mut guest =
            GuestEndpoint::attach(&guest_mem, 2, Start::SkipPending, None).expect("ready");
        host.send(&host_mem, &HostToAgent::Ping { nonce: 5 })
            .expect("room");
        let mut buf = frame_buf();
        assert_eq!(
            guest.recv(&guest_mem, &mut buf),
            Ok(Some(HostToAgent::Ping { nonce: 5 }))
        );
        guest
            .send(&guest_mem, &AgentToHost::Pong { nonce: 5 })
            .expect("room");
        assert_eq!(
            host.recv(&host_mem, &mut buf),
            Ok(Some(AgentToHost::Pong { nonce: 5 }))
        );
        // Out of range is inert, not a panic.
        assert_eq!(host_mem.load(64 * 1024, Ordering::Relaxed), 0);
        let _ = std::fs::remove_dir_all(&dir);
    }

    #[test]
    fn a_file_of_the_wrong_size_is_refused() {
        let dir = std::env::temp_dir().join(format!("portless-memory-bad-{}", std::process::id()));
        std::fs::create_dir_all(&dir).expect("dir");
        let path = dir.join("region");
        File::create(&path)
            .expect("create")
            .set_len(100_000)
            .expect("size");
        let err = GuestRegion::open(&path).expect_err("not a power of two");
        assert!(err.to_string().contains("power of two"), "{err}");
        let _ = std::fs::remove_dir_all(&dir);
    }
}
