//! What the VM tests, `cargo xtask run` and `vm-bench` share to run Portless in QEMU guests:
//!
//! - [`Guest`]: the QEMU command line that boots an image built by `cargo xtask image` with an
//!   ivshmem device of either kind (`ivshmem-doorbell` on q35 with a virtual IOMMU, the agent
//!   woken by VFIO interrupts; or `ivshmem-plain`, the agent polling), and optionally the
//!   QEMU guest agent's virtio-serial port and a monitor socket;
//! - [`Processes`]: children stopped with TERM, then KILL, when dropped;
//! - [`wait_for_socket`]: waiting until a daemon accepts connections.
#![forbid(unsafe_code)]

use std::fs::File;
use std::io;
use std::os::unix::net::UnixStream;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

/// Guest memory, in MiB.
const MEMORY_MIB: u32 = 256;
/// How long a process may take to stop on TERM before it is killed.
const STOP_GRACE: Duration = Duration::from_secs(5);

/// Where a guest's ivshmem device gets its memory, and so how its agent is woken.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Ivshmem {
    /// `ivshmem-doorbell` from the ivshmem server listening on `socket`, on a q35 machine with
    /// a virtual IOMMU; the agent is started with `--wakeup vfio`.
    Doorbell {
        /// The server's unix socket.
        socket: PathBuf,
    },
    /// `ivshmem-plain` on the memory-backend file `file` of `size` bytes (a power of two);
    /// the agent is started with `--wakeup poll`.
    Plain {
        /// The memory-backend file, which the host maps too.
        file: PathBuf,
        /// Its size in bytes.
        size: usize,
    },
}

/// A QEMU guest of a Portless image, to be started with [`Guest::spawn`].
#[derive(Debug, Clone)]
pub struct Guest {
    image: PathBuf,
    ivshmem: Ivshmem,
    accel: String,
    kernel_args: Vec<String>,
    qga: Option<PathBuf>,
    monitor: Option<PathBuf>,
}

impl Guest {
    /// A guest booting `image` (a directory with `vmlinuz` and `initrd.gz`) with `ivshmem`,
    /// under TCG until [`accel`](Self::accel) says otherwise.
    pub fn new(image: &Path, ivshmem: Ivshmem) -> Self {
        Self {
            image: image.to_path_buf(),
            ivshmem,
            accel: "tcg".to_owned(),
            kernel_args: Vec::new(),
            qga: None,
            monitor: None,
        }
    }

    /// The accelerator (`tcg`, `kvm`).
    pub fn accel(mut self, accel: &str) -> Self {
        accel.clone_into(&mut self.accel);
        self
    }

    /// One more kernel command-line word (the image's `/init` reads `agent_log=kmsg`).
    pub fn kernel_arg(mut self, arg: &str) -> Self {
        self.kernel_args.push(arg.to_owned());
        self
    }

    /// A virtio-serial port named `org.qemu.guest_agent.0` on a chardev socket QEMU listens
    /// on at `socket`, for the QEMU guest agent of the bench image.
    pub fn qga(mut self, socket: &Path) -> Self {
        self.qga = Some(socket.to_path_buf());
        self
    }

    /// QEMU's human monitor, listening on `socket`.
    pub fn monitor(mut self, socket: &Path) -> Self {
        self.monitor = Some(socket.to_path_buf());
        self
    }

    /// The QEMU command, without its standard streams set: the serial console is stdout.
    pub fn command(&self) -> Command {
        let mut c = Command::new("qemu-system-x86_64");
        c.args(["-accel", &self.accel, "-m", &MEMORY_MIB.to_string()]);
        c.args([
            "-nodefaults",
            "-nographic",
            "-serial",
            "stdio",
            "-net",
            "none",
        ]);
        c.arg("-kernel").arg(self.image.join("vmlinuz"));
        c.arg("-initrd").arg(self.image.join("initrd.gz"));
        let mut cmdline = vec!["console=ttyS0", "quiet"];
        match &self.ivshmem {
            Ivshmem::Doorbell { socket } => {
                let chardev = format!("socket,path={},id=iv", socket.display());
                c.args(["-machine", "q35", "-device", "intel-iommu"]);
                c.args(["-chardev", &chardev]);
                c.args(["-device", "ivshmem-doorbell,chardev=iv,vectors=1"]);
                cmdline.extend(["intel_iommu=on", "agent_args=--wakeup,vfio"]);
            }
            Ivshmem::Plain { file, size } => {
                let memory = format!(
                    "memory-backend-file,id=m,size={size},share=on,mem-path={}",
                    file.display()
                );
                c.args(["-object", &memory, "-device", "ivshmem-plain,memdev=m"]);
                cmdline.push("agent_args=--wakeup,poll");
            }
        }
        cmdline.extend(self.kernel_args.iter().map(String::as_str));
        c.arg("-append").arg(cmdline.join(" "));
        if let Some(socket) = &self.qga {
            let chardev = format!("socket,id=qga,path={},server=on,wait=off", socket.display());
            c.args(["-device", "virtio-serial-pci,id=vs", "-chardev", &chardev]);
            c.args([
                "-device",
                "virtserialport,bus=vs.0,chardev=qga,name=org.qemu.guest_agent.0",
            ]);
        }
        if let Some(socket) = &self.monitor {
            let monitor = format!("unix:{},server,nowait", socket.display());
            c.args(["-monitor", &monitor]);
        }
        c
    }

    /// Starts QEMU with the console written to `console` and QEMU's own messages to `errors`
    /// (`None`: dropped).
    pub fn spawn(&self, console: &Path, errors: Option<&Path>) -> io::Result<Child> {
        let errors = match errors {
            Some(path) => Stdio::from(File::create(path)?),
            None => Stdio::null(),
        };
        self.command()
            .stdin(Stdio::null())
            .stdout(File::create(console)?)
            .stderr(errors)
            .spawn()
    }
}

/// Named child processes, stopped (TERM, then KILL after a grace period) and reaped, last
/// started first, when dropped.
#[derive(Debug, Default)]
pub struct Processes(Vec<(String, Child)>);

impl Processes {
    /// Takes charge of `child` under `name`.
    pub fn push(&mut self, name: &str, child: Child) {
        self.0.push((name.to_owned(), child));
    }

    /// The process named `name`.
    pub fn get(&self, name: &str) -> Option<&Child> {
        self.0.iter().find(|(n, _)| n == name).map(|(_, c)| c)
    }

    /// Stops the process named `name` now.
    pub fn stop(&mut self, name: &str) {
        if let Some(i) = self.0.iter().position(|(n, _)| n == name) {
            let (_, mut c) = self.0.remove(i);
            stop_all(std::slice::from_mut(&mut c));
        }
    }

    /// The name and exit status of a process that has exited, if one has.
    pub fn exited(&mut self) -> Option<(String, std::process::ExitStatus)> {
        self.0.iter_mut().find_map(|(n, c)| {
            c.try_wait()
                .ok()
                .flatten()
                .map(|status| (n.clone(), status))
        })
    }
}

impl Drop for Processes {
    fn drop(&mut self) {
        let mut children: Vec<Child> = self.0.drain(..).rev().map(|(_, c)| c).collect();
        stop_all(&mut children);
    }
}

/// Sends TERM to every child, gives them [`STOP_GRACE`] together, then kills and reaps them.
fn stop_all(children: &mut [Child]) {
    for c in children.iter() {
        // `kill` the command: this crate has no unsafe code to call kill(2) with.
        let _ = Command::new("kill")
            .args(["-TERM", &c.id().to_string()])
            .stderr(Stdio::null())
            .status();
    }
    let deadline = Instant::now() + STOP_GRACE;
    for c in children.iter_mut() {
        while c.try_wait().ok().flatten().is_none() && Instant::now() < deadline {
            std::thread::sleep(Duration::from_millis(20));
        }
        let _ = c.kill();
        let _ = c.wait();
    }
}

/// Waits up to `timeout` until something accepts connections on the unix socket `path`;
/// returns whether it did.
pub fn wait_for_socket(path: &Path, timeout: Duration) -> bool {
    let deadline = Instant::now() + timeout;
    while UnixStream::connect(path).is_err() {
        if Instant::now() > deadline {
            return false;
        }
        std::thread::sleep(Duration::from_millis(20));
    }
    true
}

#[cfg(test)]
mod tests {
    use super::*;

    fn args(c: &Command) -> Vec<String> {
        c.get_args()
            .map(|a| a.to_string_lossy().into_owned())
            .collect()
    }

    fn after<'a>(args: &'a [String], flag: &str) -> Vec<&'a str> {
        args.windows(2)
            .filter(|w| w[0] == flag)
            .map(|w| w[1].as_str())
            .collect()
    }

    #[test]
    fn a_doorbell_guest_gets_q35_an_iommu_and_vfio_wakeup() {
        let g = Guest::new(
            Path::new("/img"),
            Ivshmem::Doorbell {
                socket: "/d/iv.sock".into(),
            },
        )
        .kernel_arg("agent_log=kmsg")
        .monitor(Path::new("/d/mon"));
        let a = args(&g.command());
        assert_eq!(after(&a, "-accel"), ["tcg"]);
        assert_eq!(after(&a, "-machine"), ["q35"]);
        assert_eq!(
            after(&a, "-device"),
            ["intel-iommu", "ivshmem-doorbell,chardev=iv,vectors=1"]
        );
        assert_eq!(after(&a, "-chardev"), ["socket,path=/d/iv.sock,id=iv"]);
        assert_eq!(
            after(&a, "-append"),
            ["console=ttyS0 quiet intel_iommu=on agent_args=--wakeup,vfio agent_log=kmsg"]
        );
        assert_eq!(after(&a, "-kernel"), ["/img/vmlinuz"]);
        assert_eq!(after(&a, "-initrd"), ["/img/initrd.gz"]);
        assert_eq!(after(&a, "-monitor"), ["unix:/d/mon,server,nowait"]);
    }

    #[test]
    fn a_plain_guest_polls_a_memory_backend_file_and_may_have_qemu_ga() {
        let g = Guest::new(
            Path::new("/img"),
            Ivshmem::Plain {
                file: "/dev/shm/r".into(),
                size: 1 << 20,
            },
        )
        .accel("kvm")
        .qga(Path::new("/d/qga"));
        let a = args(&g.command());
        assert_eq!(after(&a, "-accel"), ["kvm"]);
        assert!(after(&a, "-machine").is_empty());
        assert_eq!(
            after(&a, "-object"),
            ["memory-backend-file,id=m,size=1048576,share=on,mem-path=/dev/shm/r"]
        );
        assert_eq!(
            after(&a, "-device"),
            [
                "ivshmem-plain,memdev=m",
                "virtio-serial-pci,id=vs",
                "virtserialport,bus=vs.0,chardev=qga,name=org.qemu.guest_agent.0"
            ]
        );
        assert_eq!(
            after(&a, "-chardev"),
            ["socket,id=qga,path=/d/qga,server=on,wait=off"]
        );
        assert_eq!(
            after(&a, "-append"),
            ["console=ttyS0 quiet agent_args=--wakeup,poll"]
        );
    }

    #[test]
    fn processes_are_stopped_on_drop_and_exits_are_seen() {
        let mut p = Processes::default();
        p.push(
            "long",
            Command::new("sleep").arg("30").spawn().expect("sleep"),
        );
        p.push("short", Command::new("true").spawn().expect("true"));
        let started = Instant::now();
        let mut exited = None;
        while exited.is_none() && started.elapsed() < Duration::from_secs(5) {
            exited = p.exited();
            std::thread::sleep(Duration::from_millis(10));
        }
        assert_eq!(
            exited.map(|(n, s)| (n, s.success())),
            Some(("short".into(), true))
        );
        let pid = p.get("long").expect("long").id();
        drop(p);
        assert!(started.elapsed() < STOP_GRACE, "TERM stopped it");
        assert!(!Path::new(&format!("/proc/{pid}")).exists(), "reaped");
    }

    #[test]
    fn waiting_for_a_socket() {
        let dir = std::env::temp_dir().join(format!("vm-harness-{}", std::process::id()));
        std::fs::create_dir_all(&dir).expect("dir");
        let path = dir.join("s.sock");
        assert!(!wait_for_socket(&path, Duration::from_millis(50)));
        let _listener = std::os::unix::net::UnixListener::bind(&path).expect("bind");
        assert!(wait_for_socket(&path, Duration::from_secs(1)));
        let _ = std::fs::remove_dir_all(&dir);
    }
}
