//! Set-up shared by the Portless criterion benchmarks in `benches/` (see README.md): a region
//! in ordinary memory and the two ends of a channel over it, the guest attaching the way an
//! agent does, by retrying until the host has made the region ready; and a fake platform
//! for driving `agent_core::Agent` without processes.

pub mod plot;

use agent_core::Agent;
use agent_core::agent::OUTPUT_CHUNK;
use agent_core::config::Config;
use agent_core::platform::{
    Errno, ExitStatus, LogEvent, Platform, ReadOutcome, Signal, SpawnRequest, SystemMetrics,
};
use ring_protocol::message::Stream;
use ring_protocol::{AttachError, GuestEndpoint, HeapRegion, HostEndpoint, Start};

/// Size of the region every bench uses: 1 MiB, so a 256 KiB host-to-guest ring and a
/// 512 KiB guest-to-host ring in the default layout.
pub const REGION_SIZE: usize = 1 << 20;

/// Generation the bench host writes; any value does.
const HOST_GENERATION: u32 = 1;
/// Generation the bench guest writes; any value does.
const GUEST_GENERATION: u32 = 2;

/// A zeroed region of [`REGION_SIZE`] bytes in ordinary memory.
pub fn region() -> HeapRegion {
    HeapRegion::new(REGION_SIZE)
}

/// Initialises `region` as the host does and returns the host's end.
///
/// # Panics
///
/// If the region is not a valid size (never for [`region`]).
pub fn create_host(region: &HeapRegion) -> HostEndpoint {
    HostEndpoint::create(&**region, HOST_GENERATION).expect("a 1 MiB region is a valid size")
}

/// Attaches the guest's end, retrying while the host has not made the region ready.
///
/// # Panics
///
/// If the header or the rings are invalid, which only a bug in the bench could cause.
pub fn attach_guest(region: &HeapRegion) -> GuestEndpoint {
    loop {
        match GuestEndpoint::attach(&**region, GUEST_GENERATION, Start::Resume, None) {
            Ok(guest) => return guest,
            Err(AttachError::NotReady) => std::thread::yield_now(),
            Err(e) => panic!("guest cannot attach: {e}"),
        }
    }
}

/// The allow-list of the agent benches: `bench`, a command without parameters, timeout or
/// output limit worth speaking of (1 GiB per stream), so that it runs as long as the fake
/// process says.
pub const AGENT_CONFIG: &str = r#"
[agent]
max_running = 16
default_timeout_ms = 0

[[command]]
name = "bench"
description = "A fake process"
program = "/bin/bench"
timeout_ms = 0
max_output = 1073741824
"#;

/// Parses [`AGENT_CONFIG`] into an agent.
///
/// # Panics
///
/// If the allow-list does not load, which only a bug in the bench could cause.
pub fn bench_agent() -> Box<Agent<BenchPlatform>> {
    let config = match Config::parse(AGENT_CONFIG) {
        Ok(config) => config,
        Err(e) => panic!("bench allow-list does not load: {e}"),
    };
    Box::new(Agent::new(config, GUEST_GENERATION))
}

/// A fake operating system for `agent_core::Agent`: every spawn succeeds at once and gives a
/// process that writes `output_len` bytes to stdout in chunks of up to
/// [`OUTPUT_CHUNK`] bytes, copied from one preallocated buffer, and nothing to stderr.
/// Once its output is read, a process exits with status 0 unless `running` is set, in which
/// case its pipes stay open and empty and it does not exit until `running` is cleared.
#[derive(Debug)]
pub struct BenchPlatform {
    /// Bytes of stdout each new process writes.
    pub output_len: u64,
    /// Processes with no output left keep running while this is set.
    pub running: bool,
    chunk: Box<[u8; OUTPUT_CHUNK]>,
}

/// A process of [`BenchPlatform`]: the stdout bytes it has still to write.
#[derive(Debug)]
pub struct BenchProcess {
    stdout_left: u64,
}

impl BenchPlatform {
    /// A platform whose processes write `output_len` bytes and then exit.
    pub fn new(output_len: u64) -> Self {
        let mut chunk = Box::new([0u8; OUTPUT_CHUNK]);
        for (i, b) in chunk.iter_mut().enumerate() {
            *b = (i % 251) as u8;
        }
        Self {
            output_len,
            running: false,
            chunk,
        }
    }
}

impl Platform for BenchPlatform {
    type Process = BenchProcess;

    fn spawn(&mut self, _request: &SpawnRequest<'_>) -> Result<BenchProcess, Errno> {
        Ok(BenchProcess {
            stdout_left: self.output_len,
        })
    }

    fn read_output(
        &mut self,
        process: &mut BenchProcess,
        stream: Stream,
        buf: &mut [u8],
    ) -> ReadOutcome {
        if stream == Stream::Stdout && process.stdout_left > 0 {
            let n = buf
                .len()
                .min(OUTPUT_CHUNK)
                .min(usize::try_from(process.stdout_left).unwrap_or(usize::MAX));
            buf[..n].copy_from_slice(&self.chunk[..n]);
            process.stdout_left -= n as u64;
            ReadOutcome::Data(n)
        } else if self.running {
            ReadOutcome::WouldBlock
        } else {
            ReadOutcome::Closed
        }
    }

    fn try_wait(&mut self, process: &mut BenchProcess) -> Option<ExitStatus> {
        (process.stdout_left == 0 && !self.running).then_some(ExitStatus::Exited(0))
    }

    fn signal(&mut self, _process: &mut BenchProcess, _signal: Signal) {}

    fn kill_leftovers(&mut self, _process: &mut BenchProcess) -> u32 {
        0
    }

    fn leftovers_gone(&mut self, _process: &mut BenchProcess) -> bool {
        true
    }

    fn release(&mut self, _process: BenchProcess) {}

    fn push_create(&mut self, _dir: &str, _name: &str) -> Result<(), Errno> {
        Err(ENOSYS)
    }

    fn push_write(&mut self, _data: &[u8]) -> Result<(), Errno> {
        Err(ENOSYS)
    }

    fn push_finish(&mut self, _keep: bool) -> Result<(), Errno> {
        Err(ENOSYS)
    }

    fn metrics(&mut self) -> SystemMetrics {
        SystemMetrics::default()
    }

    fn log(&mut self, _event: &LogEvent<'_>) {}
}

/// ENOSYS (Linux): the bench platform stores no pushed programs.
const ENOSYS: Errno = 38;
