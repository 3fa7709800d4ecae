//! Host-to-guest interrupts through VFIO: the ivshmem device has MSI-X only, which no
//! in-kernel driver turns into something a program can wait on, so the agent binds the device
//! to `vfio-pci`, takes it through a VFIO container (type-1 IOMMU, which needs a virtual IOMMU
//! in the VM) and has vector 0 delivered to an eventfd. It maps the shared memory and the
//! doorbell register through the VFIO device as well. This module and `sys` hold the
//! binary's `unsafe` code.

use std::ffi::CString;
use std::io;
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd, RawFd};
use std::path::Path;

use crate::sys::{self, Mapping};

const VFIO_TYPE: u32 = b';' as u32;
const VFIO_BASE: u32 = 100;

/// `_IO(VFIO_TYPE, VFIO_BASE + n)`: VFIO ioctls carry no size or direction bits. (The
/// request's C type differs between glibc and musl: `libc::Ioctl`.)
const fn vfio_io(n: u32) -> libc::Ioctl {
    ((VFIO_TYPE << 8) | (VFIO_BASE + n)) as libc::Ioctl
}

const VFIO_GET_API_VERSION: libc::Ioctl = vfio_io(0);
const VFIO_CHECK_EXTENSION: libc::Ioctl = vfio_io(1);
const VFIO_SET_IOMMU: libc::Ioctl = vfio_io(2);
const VFIO_GROUP_GET_STATUS: libc::Ioctl = vfio_io(3);
const VFIO_GROUP_SET_CONTAINER: libc::Ioctl = vfio_io(4);
const VFIO_GROUP_GET_DEVICE_FD: libc::Ioctl = vfio_io(6);
const VFIO_DEVICE_GET_REGION_INFO: libc::Ioctl = vfio_io(8);
const VFIO_DEVICE_SET_IRQS: libc::Ioctl = vfio_io(10);

const VFIO_API_VERSION: libc::c_int = 0;
const VFIO_TYPE1_IOMMU: libc::c_ulong = 1;
const VFIO_GROUP_FLAGS_VIABLE: u32 = 1;
const VFIO_REGION_INFO_FLAG_MMAP: u32 = 1 << 2;
const VFIO_PCI_CONFIG_REGION_INDEX: u32 = 7;
const VFIO_PCI_MSIX_IRQ_INDEX: u32 = 2;
const VFIO_IRQ_SET_DATA_EVENTFD: u32 = 1 << 2;
const VFIO_IRQ_SET_ACTION_TRIGGER: u32 = 1 << 5;

/// PCI command register offset in config space, and its bits.
const PCI_COMMAND: u64 = 4;
const PCI_COMMAND_MEMORY: u16 = 1 << 1;
const PCI_COMMAND_MASTER: u16 = 1 << 2;

#[repr(C)]
#[derive(Default)]
struct RegionInfo {
    argsz: u32,
    flags: u32,
    index: u32,
    cap_offset: u32,
    size: u64,
    offset: u64,
}

#[repr(C)]
struct IrqSetEventfd {
    argsz: u32,
    flags: u32,
    index: u32,
    start: u32,
    count: u32,
    fd: i32,
}

#[repr(C)]
#[derive(Default)]
struct GroupStatus {
    argsz: u32,
    flags: u32,
}

/// A device taken through VFIO, with vector 0 of its MSI-X delivered to `interrupt`.
pub(crate) struct VfioDevice {
    _container: OwnedFd,
    _group: OwnedFd,
    device: OwnedFd,
    /// Readable when the host rings the guest.
    pub(crate) interrupt: OwnedFd,
}

fn os(msg: &str) -> impl FnOnce(io::Error) -> io::Error + '_ {
    move |e| io::Error::new(e.kind(), format!("{msg}: {e}"))
}

fn ioctl_ret(ret: libc::c_int) -> io::Result<libc::c_int> {
    if ret < 0 {
        Err(io::Error::last_os_error())
    } else {
        Ok(ret)
    }
}

fn open_dev(path: &str) -> io::Result<OwnedFd> {
    let c = CString::new(path).map_err(|_| io::Error::from_raw_os_error(libc::EINVAL))?;
    sys::open(&c, libc::O_RDWR, 0).map_err(os(path))
}

/// Makes `vfio-pci` the driver of `bdf` (unbinding any other), as the kernel's
/// `driver_override` interface allows.
fn bind_vfio(sysfs: &Path, bdf: &str) -> io::Result<()> {
    let dev = sysfs.join("bus/pci/devices").join(bdf);
    let current = std::fs::read_link(dev.join("driver")).ok();
    if current
        .as_deref()
        .and_then(Path::file_name)
        .is_some_and(|n| n == "vfio-pci")
    {
        return Ok(());
    }
    if !sysfs.join("bus/pci/drivers/vfio-pci").exists() {
        return Err(io::Error::new(
            io::ErrorKind::NotFound,
            "vfio-pci driver not loaded",
        ));
    }
    std::fs::write(dev.join("driver_override"), "vfio-pci").map_err(os("driver_override"))?;
    if current.is_some() {
        std::fs::write(dev.join("driver/unbind"), bdf).map_err(os("unbind"))?;
    }
    std::fs::write(sysfs.join("bus/pci/drivers_probe"), bdf).map_err(os("drivers_probe"))?;
    Ok(())
}

impl VfioDevice {
    /// Binds `bdf` to vfio-pci and sets up its interrupt. Fails when the guest has no VFIO
    /// (no module, no IOMMU): the caller then polls.
    pub(crate) fn open(sysfs: &Path, bdf: &str) -> io::Result<Self> {
        let dev_dir = sysfs.join("bus/pci/devices").join(bdf);
        let group_link = std::fs::read_link(dev_dir.join("iommu_group"))
            .map_err(|_| io::Error::new(io::ErrorKind::NotFound, "device has no IOMMU group"))?;
        let group_id = group_link
            .file_name()
            .and_then(|n| n.to_str())
            .ok_or_else(|| io::Error::from_raw_os_error(libc::EINVAL))?
            .to_owned();
        bind_vfio(sysfs, bdf)?;
        let container = open_dev("/dev/vfio/vfio")?;
        // SAFETY: VFIO_GET_API_VERSION takes no argument.
        let version =
            ioctl_ret(unsafe { libc::ioctl(container.as_raw_fd(), VFIO_GET_API_VERSION) })?;
        // SAFETY: VFIO_CHECK_EXTENSION takes the extension number by value.
        let type1 = ioctl_ret(unsafe {
            libc::ioctl(
                container.as_raw_fd(),
                VFIO_CHECK_EXTENSION,
                VFIO_TYPE1_IOMMU,
            )
        })?;
        if version != VFIO_API_VERSION || type1 == 0 {
            return Err(io::Error::other("VFIO type-1 IOMMU not supported"));
        }
        // The group node may appear a moment after the bind.
        let group_path = format!("/dev/vfio/{group_id}");
        let mut group = open_dev(&group_path);
        for _ in 0..50 {
            if group.is_ok() {
                break;
            }
            std::thread::sleep(std::time::Duration::from_millis(20));
            group = open_dev(&group_path);
        }
        let group = group?;
        let mut status = GroupStatus {
            argsz: size_of::<GroupStatus>() as u32,
            flags: 0,
        };
        // SAFETY: `status` is a valid `vfio_group_status` the kernel fills in.
        ioctl_ret(unsafe { libc::ioctl(group.as_raw_fd(), VFIO_GROUP_GET_STATUS, &mut status) })?;
        if status.flags & VFIO_GROUP_FLAGS_VIABLE == 0 {
            return Err(io::Error::other(
                "VFIO group not viable (other devices in it are bound)",
            ));
        }
        let cfd: RawFd = container.as_raw_fd();
        // SAFETY: VFIO_GROUP_SET_CONTAINER reads an int (the container fd) from the pointer.
        ioctl_ret(unsafe { libc::ioctl(group.as_raw_fd(), VFIO_GROUP_SET_CONTAINER, &cfd) })
            .map_err(os("set container"))?;
        // SAFETY: VFIO_SET_IOMMU takes the IOMMU type by value.
        ioctl_ret(unsafe { libc::ioctl(container.as_raw_fd(), VFIO_SET_IOMMU, VFIO_TYPE1_IOMMU) })
            .map_err(os("set IOMMU"))?;
        let name = CString::new(bdf).map_err(|_| io::Error::from_raw_os_error(libc::EINVAL))?;
        // SAFETY: VFIO_GROUP_GET_DEVICE_FD reads a NUL-terminated device name.
        let dfd = ioctl_ret(unsafe {
            libc::ioctl(group.as_raw_fd(), VFIO_GROUP_GET_DEVICE_FD, name.as_ptr())
        })
        .map_err(os("get device"))?;
        // SAFETY: `dfd` was just returned by the kernel and is owned by nothing else.
        let device = unsafe { OwnedFd::from_raw_fd(dfd) };

        // MSI-X is a DMA write: without bus mastering no interrupt ever arrives.
        let config = region_info(&device, VFIO_PCI_CONFIG_REGION_INDEX)?;
        let mut cmd = [0u8; 2];
        pread(&device, &mut cmd, config.offset + PCI_COMMAND)?;
        let value = u16::from_le_bytes(cmd) | PCI_COMMAND_MASTER | PCI_COMMAND_MEMORY;
        pwrite(&device, &value.to_le_bytes(), config.offset + PCI_COMMAND)?;

        // SAFETY: `eventfd` takes plain values.
        let efd = ioctl_ret(unsafe { libc::eventfd(0, libc::EFD_NONBLOCK | libc::EFD_CLOEXEC) })?;
        // SAFETY: `efd` was just created and is owned by nothing else.
        let interrupt = unsafe { OwnedFd::from_raw_fd(efd) };
        let set = IrqSetEventfd {
            argsz: size_of::<IrqSetEventfd>() as u32,
            flags: VFIO_IRQ_SET_DATA_EVENTFD | VFIO_IRQ_SET_ACTION_TRIGGER,
            index: VFIO_PCI_MSIX_IRQ_INDEX,
            start: 0,
            count: 1,
            fd: interrupt.as_raw_fd(),
        };
        // SAFETY: `set` is a `vfio_irq_set` with one eventfd as its data, `argsz` covering it.
        ioctl_ret(unsafe { libc::ioctl(device.as_raw_fd(), VFIO_DEVICE_SET_IRQS, &set) })
            .map_err(os("MSI-X to eventfd"))?;
        Ok(Self {
            _container: container,
            _group: group,
            device,
            interrupt,
        })
    }

    /// Maps BAR `index` (0: registers, 2: shared memory).
    pub(crate) fn map_bar(&self, index: u32) -> io::Result<Mapping> {
        let info = region_info(&self.device, index)?;
        if info.flags & VFIO_REGION_INFO_FLAG_MMAP == 0 || info.size == 0 {
            return Err(io::Error::other(format!("BAR{index} cannot be mapped")));
        }
        let len =
            usize::try_from(info.size).map_err(|_| io::Error::from_raw_os_error(libc::EINVAL))?;
        let offset =
            i64::try_from(info.offset).map_err(|_| io::Error::from_raw_os_error(libc::EINVAL))?;
        Mapping::map_fd(self.device.as_raw_fd(), len, offset)
    }

    /// Consumes pending interrupts; returns how many arrived.
    pub(crate) fn take_interrupts(&self) -> u64 {
        let mut b = [0u8; 8];
        match sys::read(self.interrupt.as_raw_fd(), &mut b) {
            sys::ReadResult::Data(8) => u64::from_ne_bytes(b),
            _ => 0,
        }
    }
}

fn region_info(device: &OwnedFd, index: u32) -> io::Result<RegionInfo> {
    let mut info = RegionInfo {
        argsz: size_of::<RegionInfo>() as u32,
        index,
        ..RegionInfo::default()
    };
    // SAFETY: `info` is a valid `vfio_region_info` with `argsz` set; the kernel fills it in.
    ioctl_ret(unsafe { libc::ioctl(device.as_raw_fd(), VFIO_DEVICE_GET_REGION_INFO, &mut info) })
        .map_err(os("region info"))?;
    Ok(info)
}

fn pread(fd: &OwnedFd, buf: &mut [u8], offset: u64) -> io::Result<()> {
    let off = i64::try_from(offset).map_err(|_| io::Error::from_raw_os_error(libc::EINVAL))?;
    // SAFETY: `buf` is valid for `buf.len()` bytes of writes.
    let n = unsafe { libc::pread(fd.as_raw_fd(), buf.as_mut_ptr().cast(), buf.len(), off) };
    if usize::try_from(n).ok() == Some(buf.len()) {
        Ok(())
    } else {
        Err(io::Error::last_os_error())
    }
}

fn pwrite(fd: &OwnedFd, buf: &[u8], offset: u64) -> io::Result<()> {
    let off = i64::try_from(offset).map_err(|_| io::Error::from_raw_os_error(libc::EINVAL))?;
    // SAFETY: `buf` is valid for `buf.len()` bytes of reads.
    let n = unsafe { libc::pwrite(fd.as_raw_fd(), buf.as_ptr().cast(), buf.len(), off) };
    if usize::try_from(n).ok() == Some(buf.len()) {
        Ok(())
    } else {
        Err(io::Error::last_os_error())
    }
}
