//! The script that `hostile_region_script` runs: a host and a guest endpoint on one region,
//! driven by operations decoded from the input, while the input also plays a hostile peer
//! that overwrites header words and ring bytes between operations and in the middle of them
//! (as a peer running concurrently on another CPU can).
//!
//! A script is a sequence of [`Op`]s, each an opcode byte (taken modulo the number of
//! operations) followed by its arguments; [`Op::encode`] writes the form [`Op::decode`]
//! reads, so that seeds are real scripts. Whatever the script did, the channel must recover
//! when the host forces a reset ([`exercise::assert_recovers`]); the target checks that after
//! every script.

use core::cell::Cell;
use core::sync::atomic::Ordering::Relaxed;

use ring_protocol::layout::offsets;
use ring_protocol::message::{
    AgentToHost, ExecRequest, ExecutionId, Finished, Hello, HostToAgent, Outcome, Stream,
};
use ring_protocol::{
    ChannelError, GuestEndpoint, HeapRegion, HostEndpoint, RecvError, SharedMemory, Start,
};

use crate::exercise;
use crate::image::REGION_SIZE;

/// Most operations one script runs.
pub const MAX_OPS: usize = 256;
/// Header words a poke can address: those in use (the rest of the header is never read).
pub const HEADER_WORD_COUNT: usize = offsets::END / 4;

/// How a poke changes a header word. `Add` with a multiple of 8 keeps an index plausible,
/// which is where the interesting bugs would be.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Change {
    /// Replace the word.
    Set(u32),
    /// Add to it, wrapping.
    Add(u32),
    /// Flip bits.
    Xor(u32),
}

impl Change {
    fn apply(self, old: u32) -> u32 {
        match self {
            Self::Set(v) => v,
            Self::Add(v) => old.wrapping_add(v),
            Self::Xor(v) => old ^ v,
        }
    }
}

/// One step of a script.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Op {
    /// The host sends one of a few messages; the byte picks which, and how large.
    HostSend(u8),
    /// The guest sends one of a few messages; the byte picks which, and how large.
    GuestSend(u8),
    /// The host sends these bytes as one frame (the guest must cope with any payload).
    HostSendFrame(Vec<u8>),
    /// The guest sends these bytes as one frame.
    GuestSendFrame(Vec<u8>),
    /// The host receives up to this many frames (at most [`exercise::MAX_RECV`]) and begins
    /// a reset if the rings are corrupt.
    HostRecv(u8),
    /// The guest receives up to this many frames and asks for a reset if the rings are
    /// corrupt, or detaches if the host is resetting.
    GuestRecv(u8),
    /// The host arms its wakeups, waiting for this much space too unless 0.
    HostPrepareWait(u32),
    /// The guest arms its wakeups, waiting for this much space too unless 0.
    GuestPrepareWait(u32),
    /// Both sides disarm their wakeups.
    EndWaits,
    /// Both sides ring the other if they must.
    TakeKicks,
    /// Both sides do their periodic work: heartbeats, looking at the peer's words; the host
    /// begins a reset if the guest asked for one.
    Poll,
    /// The guest checks its session, and detaches if the host is resetting.
    GuestCheckSession,
    /// The guest attaches (again), as an agent process that starts.
    GuestAttach(Start),
    /// The guest asks for a reset (detaching if it was attached).
    GuestRequestReset,
    /// The host begins a reset.
    HostBeginReset,
    /// The host tries to finish a reset.
    HostFinishReset {
        /// Without waiting for the guest to detach.
        force: bool,
    },
    /// A new host process takes the region over: it resumes it if it can, else creates it.
    HostRestart,
    /// The host initialises the region from scratch.
    HostCreate,
    /// The peer changes a header word now.
    Poke {
        /// Index of the word (offset / 4), taken modulo [`HEADER_WORD_COUNT`].
        word: u8,
        /// How it changes.
        change: Change,
    },
    /// The peer overwrites bytes of the region now (clamped to the region).
    PokeBytes {
        /// Offset in the region.
        offset: u16,
        /// The bytes.
        bytes: Vec<u8>,
    },
    /// The peer changes a header word in the middle of what follows: just before the
    /// `after`-th access to the region from now on. Replaces an interference still pending.
    Interfere {
        /// Accesses to let through first.
        after: u8,
        /// Index of the word, as for [`Op::Poke`].
        word: u8,
        /// How it changes.
        change: Change,
    },
    /// The host forces a reset, and the channel must then work
    /// ([`exercise::assert_recovers`]).
    Heal,
}

const OPCODES: u8 = 22;

/// Reads a script's bytes in order; every read fails at the end of the input.
#[derive(Debug)]
pub struct Reader<'a> {
    bytes: &'a [u8],
}

impl<'a> Reader<'a> {
    /// A reader at the start of `bytes`.
    pub fn new(bytes: &'a [u8]) -> Self {
        Self { bytes }
    }

    fn take<const N: usize>(&mut self) -> Option<[u8; N]> {
        let (head, rest) = self.bytes.split_first_chunk::<N>()?;
        self.bytes = rest;
        Some(*head)
    }

    fn u8(&mut self) -> Option<u8> {
        self.take::<1>().map(|[b]| b)
    }

    fn u16(&mut self) -> Option<u16> {
        self.take().map(u16::from_le_bytes)
    }

    fn u32(&mut self) -> Option<u32> {
        self.take().map(u32::from_le_bytes)
    }

    /// A length byte then that many bytes, or fewer at the end of the input.
    fn bytes(&mut self) -> Option<Vec<u8>> {
        let len = usize::from(self.u8()?).min(self.bytes.len());
        let (head, rest) = self.bytes.split_at(len);
        self.bytes = rest;
        Some(head.to_vec())
    }

    fn change(&mut self) -> Option<Change> {
        let kind = self.u8()?;
        let v = self.u32()?;
        Some(match kind % 3 {
            0 => Change::Set(v),
            1 => Change::Add(v),
            _ => Change::Xor(v),
        })
    }
}

impl Op {
    /// Decodes the next operation, or `None` at the end of the script.
    pub fn decode(r: &mut Reader<'_>) -> Option<Self> {
        Some(match r.u8()? % OPCODES {
            0 => Self::HostSend(r.u8()?),
            1 => Self::GuestSend(r.u8()?),
            2 => Self::HostSendFrame(r.bytes()?),
            3 => Self::GuestSendFrame(r.bytes()?),
            4 => Self::HostRecv(r.u8()?),
            5 => Self::GuestRecv(r.u8()?),
            6 => Self::HostPrepareWait(r.u32()?),
            7 => Self::GuestPrepareWait(r.u32()?),
            8 => Self::EndWaits,
            9 => Self::TakeKicks,
            10 => Self::Poll,
            11 => Self::GuestCheckSession,
            12 => Self::GuestAttach(if r.u8()? % 2 == 0 {
                Start::Resume
            } else {
                Start::SkipPending
            }),
            13 => Self::GuestRequestReset,
            14 => Self::HostBeginReset,
            15 => Self::HostFinishReset {
                force: r.u8()? % 2 == 1,
            },
            16 => Self::HostRestart,
            17 => Self::HostCreate,
            18 => Self::Poke {
                word: r.u8()?,
                change: r.change()?,
            },
            19 => Self::PokeBytes {
                offset: r.u16()?,
                bytes: r.bytes()?,
            },
            20 => Self::Interfere {
                after: r.u8()?,
                word: r.u8()?,
                change: r.change()?,
            },
            _ => Self::Heal,
        })
    }

    /// Appends the encoding that [`decode`](Self::decode) reads back as `self`.
    ///
    /// # Panics
    ///
    /// If a byte string is longer than 255 bytes (it could not be read back).
    pub fn encode(&self, out: &mut Vec<u8>) {
        fn bytes(out: &mut Vec<u8>, b: &[u8]) {
            out.push(u8::try_from(b.len()).expect("a script byte string is at most 255 bytes"));
            out.extend_from_slice(b);
        }
        fn change(out: &mut Vec<u8>, c: Change) {
            let (kind, v) = match c {
                Change::Set(v) => (0, v),
                Change::Add(v) => (1, v),
                Change::Xor(v) => (2, v),
            };
            out.push(kind);
            out.extend_from_slice(&v.to_le_bytes());
        }
        match self {
            Self::HostSend(k) => out.extend([0, *k]),
            Self::GuestSend(k) => out.extend([1, *k]),
            Self::HostSendFrame(b) => {
                out.push(2);
                bytes(out, b);
            }
            Self::GuestSendFrame(b) => {
                out.push(3);
                bytes(out, b);
            }
            Self::HostRecv(n) => out.extend([4, *n]),
            Self::GuestRecv(n) => out.extend([5, *n]),
            Self::HostPrepareWait(n) => {
                out.push(6);
                out.extend_from_slice(&n.to_le_bytes());
            }
            Self::GuestPrepareWait(n) => {
                out.push(7);
                out.extend_from_slice(&n.to_le_bytes());
            }
            Self::EndWaits => out.push(8),
            Self::TakeKicks => out.push(9),
            Self::Poll => out.push(10),
            Self::GuestCheckSession => out.push(11),
            Self::GuestAttach(start) => out.extend([12, u8::from(*start == Start::SkipPending)]),
            Self::GuestRequestReset => out.push(13),
            Self::HostBeginReset => out.push(14),
            Self::HostFinishReset { force } => out.extend([15, u8::from(*force)]),
            Self::HostRestart => out.push(16),
            Self::HostCreate => out.push(17),
            Self::Poke { word, change: c } => {
                out.extend([18, *word]);
                change(out, *c);
            }
            Self::PokeBytes { offset, bytes: b } => {
                out.push(19);
                out.extend_from_slice(&offset.to_le_bytes());
                bytes(out, b);
            }
            Self::Interfere {
                after,
                word,
                change: c,
            } => {
                out.extend([20, *after, *word]);
                change(out, *c);
            }
            Self::Heal => out.push(21),
        }
    }

    /// The index [`Op::Poke`] and [`Op::Interfere`] take for the header word at `offset`.
    ///
    /// # Panics
    ///
    /// If `offset` is not the offset of a header word in use.
    pub fn word(offset: usize) -> u8 {
        assert!(offset.is_multiple_of(4) && offset < offsets::END);
        u8::try_from(offset / 4).expect("header words in use number fewer than 256")
    }
}

/// The offset of the header word a poke's `word` byte names.
fn word_offset(word: u8) -> usize {
    usize::from(word) % HEADER_WORD_COUNT * 4
}

/// A header word change waiting for its moment.
#[derive(Debug, Clone, Copy)]
struct Interference {
    after: u8,
    offset: usize,
    change: Change,
}

/// The region as the endpoints see it: every access first lets a pending
/// [`Op::Interfere`] count down and, at zero, change its word.
struct Interfering<'a> {
    region: &'a HeapRegion,
    pending: &'a Cell<Option<Interference>>,
}

impl Interfering<'_> {
    fn tick(&self) {
        let Some(i) = self.pending.get() else { return };
        match i.after.checked_sub(1) {
            Some(after) => self.pending.set(Some(Interference { after, ..i })),
            None => {
                self.pending.set(None);
                poke(self.region, i.offset, i.change);
            }
        }
    }
}

impl SharedMemory for Interfering<'_> {
    fn len(&self) -> usize {
        self.region.len()
    }
    fn load(&self, offset: usize, order: core::sync::atomic::Ordering) -> u32 {
        self.tick();
        self.region.load(offset, order)
    }
    fn store(&self, offset: usize, value: u32, order: core::sync::atomic::Ordering) {
        self.tick();
        self.region.store(offset, value, order);
    }
    fn fence(&self, order: core::sync::atomic::Ordering) {
        self.region.fence(order);
    }
    fn read(&self, offset: usize, dst: &mut [u8]) {
        self.tick();
        self.region.read(offset, dst);
    }
    fn write(&self, offset: usize, src: &[u8]) {
        self.tick();
        self.region.write(offset, src);
    }
}

fn poke(region: &HeapRegion, offset: usize, change: Change) {
    // Ordering: Relaxed: the peer's writes are ordered by nothing; that is the point.
    let old = region.load(offset, Relaxed);
    region.store(offset, change.apply(old), Relaxed);
}

/// Bytes of the larger messages the scripts send.
static FILLER: [u8; 8192] = [0xa5; 8192];

fn hello(generation: u32) -> Hello<'static> {
    Hello {
        min_version: 1,
        max_version: 1,
        capabilities: Default::default(),
        generation,
        config_revision: 0,
        software: "fuzz",
        reply: generation % 2 == 1,
    }
}

/// A message from the host: the low two bits of `k` pick which, the rest how large.
fn host_message(k: u8) -> HostToAgent<'static> {
    let size = usize::from(k >> 2) * 128;
    match k % 4 {
        0 => HostToAgent::Hello(hello(u32::from(k))),
        1 => HostToAgent::Ping { nonce: k.into() },
        2 => HostToAgent::Exec(ExecRequest {
            request_id: k.into(),
            command: "uptime",
            args: Default::default(),
            timeout_ms: None,
        }),
        _ => HostToAgent::PushChunk {
            push_id: 1,
            offset: 0,
            data: &FILLER[..size],
        },
    }
}

/// A message from the guest: the low two bits of `k` pick which, the rest how large.
fn guest_message(k: u8) -> AgentToHost<'static> {
    let size = usize::from(k >> 2) * 128;
    let execution = ExecutionId {
        generation: 1,
        counter: k.into(),
    };
    match k % 4 {
        0 => AgentToHost::Hello(hello(u32::from(k))),
        1 => AgentToHost::Pong { nonce: k.into() },
        2 => AgentToHost::Output {
            execution,
            stream: Stream::Stdout,
            offset: 0,
            data: &FILLER[..size],
        },
        _ => AgentToHost::Exit {
            execution,
            finished: Finished {
                outcome: Outcome::Exited(0),
                duration_ms: 1,
                stdout_bytes: 0,
                stderr_bytes: 0,
                truncated: false,
            },
        },
    }
}

/// A host, maybe a guest, and the region between them.
pub struct World {
    region: HeapRegion,
    pending: Cell<Option<Interference>>,
    host: HostEndpoint,
    guest: Option<GuestEndpoint>,
    /// The epoch the guest asked to have reset, which it must not attach to again.
    refused_epoch: Option<u32>,
    generation: u32,
}

impl Default for World {
    fn default() -> Self {
        Self::new()
    }
}

impl World {
    /// A region the host has just created, with the guest attached.
    ///
    /// # Panics
    ///
    /// If that fails: there is no peer to blame yet.
    pub fn new() -> Self {
        let region = HeapRegion::new(REGION_SIZE);
        let host = HostEndpoint::create(&*region, 1).expect("a fresh region can be created");
        let guest = GuestEndpoint::attach(&*region, 1, Start::SkipPending, None)
            .expect("a guest attaches to a fresh region");
        Self {
            region,
            pending: Cell::new(None),
            host,
            guest: Some(guest),
            refused_epoch: None,
            generation: 1,
        }
    }

    /// Runs up to [`MAX_OPS`] operations of `script`, then checks that the channel recovers.
    pub fn run_script(&mut self, script: &[u8]) {
        let mut reader = Reader::new(script);
        for _ in 0..MAX_OPS {
            let Some(op) = Op::decode(&mut reader) else {
                break;
            };
            self.apply(&op);
        }
        self.heal();
    }

    /// Makes the host force a reset and checks that the channel then works, creating the
    /// region again first if the peer damaged its identity words.
    ///
    /// # Panics
    ///
    /// If the channel does not recover.
    pub fn heal(&mut self) {
        self.pending.set(None);
        let mem = &*self.region;
        if !exercise::identity_intact(mem, &self.host) {
            self.generation = self.generation.wrapping_add(1);
            self.host = HostEndpoint::create(mem, self.generation)
                .expect("creating a region always works with no peer running");
        }
        let guest = exercise::assert_recovers(mem, &mut self.host);
        assert!(guest.is_some(), "a region just created has its identity");
        self.guest = guest;
        self.refused_epoch = None;
    }

    /// Runs one operation.
    pub fn apply(&mut self, op: &Op) {
        if *op == Op::Heal {
            return self.heal();
        }
        let Self {
            region,
            pending,
            host,
            guest,
            refused_epoch,
            generation,
        } = self;
        let mem = &Interfering { region, pending };
        match op {
            Op::HostSend(k) => {
                let _ = host.send(mem, &host_message(*k));
            }
            Op::GuestSend(k) => {
                if let Some(g) = guest {
                    let _ = g.send(mem, &guest_message(*k));
                }
            }
            Op::HostSendFrame(b) => {
                let _ = host.send_frame(mem, b);
            }
            Op::GuestSendFrame(b) => {
                if let Some(g) = guest {
                    let _ = g.send_frame(mem, b);
                }
            }
            Op::HostRecv(n) => {
                let limit = usize::from(*n).min(exercise::MAX_RECV);
                if let Some(RecvError::Channel(ChannelError::Ring(_))) =
                    exercise::drain(host, mem, limit)
                {
                    host.begin_reset(mem);
                }
            }
            Op::GuestRecv(n) => {
                let limit = usize::from(*n).min(exercise::MAX_RECV);
                if let Some(g) = guest.as_mut() {
                    match exercise::drain(g, mem, limit) {
                        Some(RecvError::Channel(ChannelError::Ring(_))) => {
                            if let Some(g) = guest.take() {
                                *refused_epoch = Some(g.request_reset(mem));
                            }
                        }
                        Some(RecvError::Channel(_)) => *guest = None,
                        _ => {}
                    }
                }
            }
            Op::HostPrepareWait(n) => {
                let _ = host.prepare_wait(mem, (*n != 0).then_some(*n));
            }
            Op::GuestPrepareWait(n) => {
                if let Some(g) = guest {
                    let _ = g.prepare_wait(mem, (*n != 0).then_some(*n));
                }
            }
            Op::EndWaits => {
                host.end_wait(mem);
                if let Some(g) = guest {
                    g.end_wait(mem);
                }
            }
            Op::TakeKicks => {
                let _ = host.take_kick(mem);
                if let Some(g) = guest {
                    let _ = g.take_kick(mem);
                }
            }
            Op::Poll => {
                host.beat(mem);
                let _ = (host.peer_heartbeat(mem), host.peer_generation(mem));
                let _ = (
                    host.doorbell(mem),
                    host.has_incoming(mem),
                    host.tx_free(mem),
                );
                let _ = host.guest_attached(mem);
                if host.reset_requested(mem) {
                    host.begin_reset(mem);
                }
                if let Some(g) = guest {
                    g.beat(mem);
                    let _ = (g.peer_heartbeat(mem), g.peer_generation(mem));
                    let _ = (g.doorbell(mem), g.has_incoming(mem), g.tx_free(mem));
                }
            }
            Op::GuestCheckSession => {
                if let Some(g) = guest
                    && g.check_session(mem).is_err()
                {
                    *guest = None;
                }
            }
            Op::GuestAttach(start) => {
                *generation = generation.wrapping_add(1);
                if let Ok(g) = GuestEndpoint::attach(mem, *generation, *start, *refused_epoch) {
                    *guest = Some(g);
                    *refused_epoch = None;
                }
            }
            Op::GuestRequestReset => match guest.take() {
                Some(g) => *refused_epoch = Some(g.request_reset(mem)),
                None => ring_protocol::channel::request_reset(mem),
            },
            Op::HostBeginReset => host.begin_reset(mem),
            Op::HostFinishReset { force } => {
                let _ = host.try_finish_reset(mem, *force);
            }
            Op::HostRestart => {
                *generation = generation.wrapping_add(1);
                if let Ok(h) = HostEndpoint::open(mem, *generation) {
                    *host = h;
                }
            }
            Op::HostCreate => {
                *generation = generation.wrapping_add(1);
                if let Ok(h) = HostEndpoint::create(mem, *generation) {
                    *host = h;
                }
            }
            Op::Poke { word, change } => poke(region, word_offset(*word), *change),
            Op::PokeBytes { offset, bytes } => {
                let at = usize::from(*offset);
                let len = bytes.len().min(REGION_SIZE - at);
                region.write(at, &bytes[..len]);
            }
            Op::Interfere {
                after,
                word,
                change,
            } => pending.set(Some(Interference {
                after: *after,
                offset: word_offset(*word),
                change: *change,
            })),
            Op::Heal => {}
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn every_op_decodes_to_itself() {
        let ops = [
            Op::HostSend(7),
            Op::GuestSend(255),
            Op::HostSendFrame(vec![1, 2, 3]),
            Op::GuestSendFrame(vec![]),
            Op::HostRecv(3),
            Op::GuestRecv(64),
            Op::HostPrepareWait(0),
            Op::GuestPrepareWait(8200),
            Op::EndWaits,
            Op::TakeKicks,
            Op::Poll,
            Op::GuestCheckSession,
            Op::GuestAttach(Start::Resume),
            Op::GuestAttach(Start::SkipPending),
            Op::GuestRequestReset,
            Op::HostBeginReset,
            Op::HostFinishReset { force: true },
            Op::HostFinishReset { force: false },
            Op::HostRestart,
            Op::HostCreate,
            Op::Poke {
                word: Op::word(offsets::H2G_PROD),
                change: Change::Add(8),
            },
            Op::PokeBytes {
                offset: 16384,
                bytes: vec![0xff; 9],
            },
            Op::Interfere {
                after: 2,
                word: 3,
                change: Change::Xor(1 << 31),
            },
            Op::Heal,
        ];
        let mut script = Vec::new();
        for op in &ops {
            op.encode(&mut script);
        }
        let mut r = Reader::new(&script);
        let back: Vec<Op> = core::iter::from_fn(|| Op::decode(&mut r)).collect();
        assert_eq!(back, ops);
    }

    #[test]
    fn an_honest_script_keeps_the_channel_up() {
        let mut w = World::new();
        for op in [Op::HostSend(1), Op::GuestRecv(4), Op::GuestSend(1)] {
            w.apply(&op);
        }
        assert!(w.guest.is_some());
        let mut buf = ring_protocol::frame_buf();
        assert_eq!(
            w.host.recv(&*w.region, &mut buf),
            Ok(Some(AgentToHost::Pong { nonce: 1 }))
        );
    }
}
