//! The two ends of a channel: the host, which owns the region's layout, and the guest agent.
//!
//! # Sessions
//!
//! The host initialises the region ([`HostEndpoint::create`]): it zeroes the header, writes
//! the layout, marks itself ready for ring epoch `E` and stores the magic last. The guest
//! waits until it sees the magic and `HOST_READY = 1`, attaches to epoch `E` (its producer
//! index and consumer index continue from the region's), publishes `GUEST_EPOCH = E` and
//! re-checks that the host is still ready for `E`. A host process that restarts resumes the
//! region as it is ([`HostEndpoint::resume`]), losing no published frame.
//!
//! When either side finds the rings corrupt, the rings are reset: the guest asks with
//! [`GuestEndpoint::request_reset`]; the host calls [`HostEndpoint::begin_reset`]
//! (`HOST_READY = 0`), waits until the guest has detached (`GUEST_EPOCH != E`, which the guest
//! does the next time it calls [`GuestEndpoint::check_session`]) or until it gives up on the
//! guest, then zeroes the indices and marks itself ready for epoch `E + 1`
//! ([`HostEndpoint::try_finish_reset`]). The guest attaches again. Each side then sends a
//! hello (see PROTOCOL.md).

use core::marker::PhantomData;
use core::sync::atomic::Ordering::{Acquire, Relaxed, Release, SeqCst};

use crate::frame::FrameBuf;
use crate::layout::{self, Direction, Layout, LayoutError, offsets};
use crate::message::{AgentToHost, DecodeError, HostToAgent};
use crate::region::SharedMemory;
use crate::ring::{Consumer, Producer, RingError, SendError, Start};

/// One side of the channel: which ring it writes, which it reads, what it sends.
pub trait Role: sealed::Sealed {
    /// The ring this side produces into.
    const TX: Direction;
    /// The ring this side consumes from.
    const RX: Direction;
    /// Offset of this side's heartbeat word.
    const HEARTBEAT: usize;
    /// Offset of the peer's heartbeat word.
    const PEER_HEARTBEAT: usize;
    /// Offset of the peer's generation word.
    const PEER_GENERATION: usize;
    /// Messages this side sends.
    type Tx<'a>: serde::Serialize;
    /// Messages this side receives.
    type Rx<'a>: serde::Deserialize<'a>;
}

mod sealed {
    pub trait Sealed {}
    impl Sealed for super::Host {}
    impl Sealed for super::Guest {}
}

/// The host side.
#[derive(Debug, Clone, Copy)]
pub enum Host {}

/// The guest side (the agent).
#[derive(Debug, Clone, Copy)]
pub enum Guest {}

impl Role for Host {
    const TX: Direction = Direction::HostToGuest;
    const RX: Direction = Direction::GuestToHost;
    const HEARTBEAT: usize = offsets::HOST_HEARTBEAT;
    const PEER_HEARTBEAT: usize = offsets::GUEST_HEARTBEAT;
    const PEER_GENERATION: usize = offsets::GUEST_GENERATION;
    type Tx<'a> = HostToAgent<'a>;
    type Rx<'a> = AgentToHost<'a>;
}

impl Role for Guest {
    const TX: Direction = Direction::GuestToHost;
    const RX: Direction = Direction::HostToGuest;
    const HEARTBEAT: usize = offsets::GUEST_HEARTBEAT;
    const PEER_HEARTBEAT: usize = offsets::HOST_HEARTBEAT;
    const PEER_GENERATION: usize = offsets::HOST_GENERATION;
    type Tx<'a> = AgentToHost<'a>;
    type Rx<'a> = HostToAgent<'a>;
}

/// The channel cannot be used as it is.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[non_exhaustive]
pub enum ChannelError {
    /// The rings are corrupt: reset the channel.
    Ring(RingError),
    /// The rings are being reset or were reset under us: attach again.
    Detached,
}

impl core::fmt::Display for ChannelError {
    fn fmt(&self, f: &mut core::fmt::Formatter<'_>) -> core::fmt::Result {
        match self {
            Self::Ring(e) => e.fmt(f),
            Self::Detached => f.write_str("channel was reset; attach again"),
        }
    }
}

impl core::error::Error for ChannelError {}

impl From<RingError> for ChannelError {
    fn from(e: RingError) -> Self {
        Self::Ring(e)
    }
}

/// Why a message was not received.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[non_exhaustive]
pub enum RecvError {
    /// The channel cannot be used (see [`ChannelError`]).
    Channel(ChannelError),
    /// A frame arrived but is not a valid message. It was consumed; the channel is fine.
    Undecodable(DecodeError),
}

impl core::fmt::Display for RecvError {
    fn fmt(&self, f: &mut core::fmt::Formatter<'_>) -> core::fmt::Result {
        match self {
            Self::Channel(e) => e.fmt(f),
            Self::Undecodable(e) => e.fmt(f),
        }
    }
}

impl core::error::Error for RecvError {}

impl From<ChannelError> for RecvError {
    fn from(e: ChannelError) -> Self {
        Self::Channel(e)
    }
}

impl From<RingError> for RecvError {
    fn from(e: RingError) -> Self {
        Self::Channel(ChannelError::Ring(e))
    }
}

/// Why a guest could not attach (yet).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[non_exhaustive]
pub enum AttachError {
    /// No host has set the region up yet, or it is resetting it: try again later.
    NotReady,
    /// The header is invalid.
    Layout(LayoutError),
    /// The ring indices of `epoch` are corrupt: ask for a reset and refuse that epoch.
    Corrupt {
        /// What is wrong.
        error: RingError,
        /// The epoch not to attach to again.
        epoch: u32,
    },
}

impl core::fmt::Display for AttachError {
    fn fmt(&self, f: &mut core::fmt::Formatter<'_>) -> core::fmt::Result {
        match self {
            Self::NotReady => f.write_str("host has not made the region ready"),
            Self::Layout(e) => e.fmt(f),
            Self::Corrupt { error, epoch } => write!(f, "rings of epoch {epoch}: {error}"),
        }
    }
}

impl core::error::Error for AttachError {}

/// One end of an attached channel. Holds only private state; every call takes the region.
#[derive(Debug, Clone)]
pub struct Endpoint<R: Role> {
    layout: Layout,
    epoch: u32,
    tx: Producer,
    rx: Consumer,
    kick: bool,
    peer_doorbell: u32,
    heartbeat: u32,
    frames_in: u64,
    frames_out: u64,
    resetting: bool,
    reset_ack: u32,
    _role: PhantomData<R>,
}

/// The host's end.
pub type HostEndpoint = Endpoint<Host>;
/// The guest's end.
pub type GuestEndpoint = Endpoint<Guest>;

impl<R: Role> Endpoint<R> {
    fn new(
        mem: &(impl SharedMemory + ?Sized),
        layout: Layout,
        epoch: u32,
        start: Start,
    ) -> Result<Self, RingError> {
        let tx = Producer::attach(mem, &layout, R::TX)?;
        let rx = Consumer::attach(mem, &layout, R::RX, start)?;
        let doorbell_word = R::TX.words().consumer_doorbell;
        Ok(Self {
            layout,
            epoch,
            tx,
            rx,
            kick: false,
            // Ordering: Relaxed: a word only this side writes; carry on from its value.
            peer_doorbell: mem.load(doorbell_word, Relaxed),
            // Ordering: Relaxed, as above.
            heartbeat: mem.load(R::HEARTBEAT, Relaxed),
            frames_in: 0,
            frames_out: 0,
            resetting: false,
            // Ordering: Relaxed: a word the host writes; only compared.
            reset_ack: mem.load(offsets::HOST_RESET_ACK, Relaxed),
            _role: PhantomData,
        })
    }

    /// The validated layout in use.
    pub fn layout(&self) -> &Layout {
        &self.layout
    }

    /// The ring epoch this endpoint is attached to.
    pub fn epoch(&self) -> u32 {
        self.epoch
    }

    /// Frames received and sent since this endpoint attached.
    pub fn frame_counts(&self) -> (u64, u64) {
        (self.frames_in, self.frames_out)
    }

    /// Encodes `msg` into the ring. On [`SendError::Full`] nothing was sent: keep the message,
    /// wait for space ([`prepare_wait`](Self::prepare_wait) with `needed`) and try again.
    pub fn send(
        &mut self,
        mem: &(impl SharedMemory + ?Sized),
        msg: &R::Tx<'_>,
    ) -> Result<(), SendError> {
        if self.resetting {
            return Err(SendError::Detached);
        }
        let kick = self.tx.try_send_message(mem, msg)?;
        self.kick |= kick;
        self.frames_out += 1;
        Ok(())
    }

    /// Sends an already-encoded payload as one frame.
    pub fn send_frame(
        &mut self,
        mem: &(impl SharedMemory + ?Sized),
        payload: &[u8],
    ) -> Result<(), SendError> {
        if self.resetting {
            return Err(SendError::Detached);
        }
        let kick = self.tx.try_send(mem, payload)?;
        self.kick |= kick;
        self.frames_out += 1;
        Ok(())
    }

    /// Copies the next frame into `buf` and returns its payload, or `None` if none is waiting.
    /// The frame is consumed at once, together with every frame [peeked](Self::peek_frame)
    /// before it.
    pub fn recv_frame<'b>(
        &mut self,
        mem: &(impl SharedMemory + ?Sized),
        buf: &'b mut FrameBuf,
    ) -> Result<Option<&'b [u8]>, ChannelError> {
        if self.resetting {
            return Err(ChannelError::Detached);
        }
        match self.rx.try_recv(mem, buf)? {
            None => Ok(None),
            Some((payload, kick)) => {
                self.kick |= kick;
                self.frames_in += 1;
                Ok(Some(payload))
            }
        }
    }

    /// Receives and decodes the next message, borrowing from `buf`.
    pub fn recv<'b>(
        &mut self,
        mem: &(impl SharedMemory + ?Sized),
        buf: &'b mut FrameBuf,
    ) -> Result<Option<R::Rx<'b>>, RecvError> {
        match self.recv_frame(mem, buf)? {
            None => Ok(None),
            Some(payload) => crate::message::decode(payload)
                .map(Some)
                .map_err(RecvError::Undecodable),
        }
    }

    /// Copies the next frame into `buf` without consuming it, and returns its payload, or
    /// `None` if no frame is waiting beyond those already peeked. The peer cannot reuse the
    /// frame's bytes until [`release`](Self::release) is called with an index at or past
    /// [`read_index`](Self::read_index) as it is after this call; an endpoint that restarts
    /// before that (a resumed host) reads the frame again. This is how a side makes a
    /// frame's effect durable before the frame is gone (PROTOCOL.md 3.5, "Deferred release").
    pub fn peek_frame<'b>(
        &mut self,
        mem: &(impl SharedMemory + ?Sized),
        buf: &'b mut FrameBuf,
    ) -> Result<Option<&'b [u8]>, ChannelError> {
        if self.resetting {
            return Err(ChannelError::Detached);
        }
        let got = self.rx.try_peek(mem, buf)?;
        if got.is_some() {
            self.frames_in += 1;
        }
        Ok(got)
    }

    /// [`peek_frame`](Self::peek_frame), decoded; borrows from `buf`.
    pub fn peek<'b>(
        &mut self,
        mem: &(impl SharedMemory + ?Sized),
        buf: &'b mut FrameBuf,
    ) -> Result<Option<R::Rx<'b>>, RecvError> {
        match self.peek_frame(mem, buf)? {
            None => Ok(None),
            Some(payload) => crate::message::decode(payload)
                .map(Some)
                .map_err(RecvError::Undecodable),
        }
    }

    /// Where the next incoming frame starts (past every frame received or peeked); pass it
    /// to [`release`](Self::release) once the frames before it are dealt with.
    pub fn read_index(&self) -> u32 {
        self.rx.read_index()
    }

    /// Bytes of incoming frames read but not yet [released](Self::release). While there are
    /// any, the peer does not ring this side for new data (it sees the ring as not drained,
    /// PROTOCOL.md 4.3), so this side must look again on its own.
    pub fn unreleased(&self) -> u32 {
        self.rx.read_index().wrapping_sub(self.rx.cons())
    }

    /// Publishes that every incoming frame before `upto` (a [`read_index`](Self::read_index)
    /// of this epoch) is consumed, so that the peer may reuse their space. An index that is
    /// not ahead of the last one released, or past what was read, changes nothing; so does
    /// any call while the channel is being reset.
    pub fn release(&mut self, mem: &(impl SharedMemory + ?Sized), upto: u32) {
        if self.resetting {
            return;
        }
        self.kick |= self.rx.release(mem, upto);
    }

    /// Whether the peer must be woken because of what this side sent or consumed since the
    /// last call. When it returns `true` it has bumped the peer's doorbell counter; the caller
    /// then raises the peer's interrupt or eventfd, if the peer has one.
    pub fn take_kick(&mut self, mem: &(impl SharedMemory + ?Sized)) -> bool {
        if !core::mem::take(&mut self.kick) {
            return false;
        }
        self.peer_doorbell = self.peer_doorbell.wrapping_add(1);
        // Ordering: Release: a peer that sees the new count with Acquire also sees the ring
        // updates that caused it.
        mem.store(R::TX.words().consumer_doorbell, self.peer_doorbell, Release);
        true
    }

    /// This side's doorbell counter, bumped by the peer each time it rings us. A polling side
    /// can watch this one word.
    pub fn doorbell(&self, mem: &(impl SharedMemory + ?Sized)) -> u32 {
        // Ordering: Acquire pairs with the Release in the peer's `take_kick`.
        mem.load(R::RX.words().consumer_doorbell, Acquire)
    }

    /// Whether a frame is waiting to be received (one load; for polling).
    pub fn has_incoming(&self, mem: &(impl SharedMemory + ?Sized)) -> bool {
        !matches!(self.rx.available(mem), Ok(0))
    }

    /// Bytes free in the outgoing ring.
    pub fn tx_free(&self, mem: &(impl SharedMemory + ?Sized)) -> Result<u32, ChannelError> {
        Ok(self.tx.free(mem)?)
    }

    /// Arms the wakeups this side needs before it sleeps: data in the incoming ring, and, if
    /// `tx_needed` is given, that many free bytes in the outgoing ring. Returns `true` if the
    /// caller may sleep now, `false` if there is already something to do. Call
    /// [`end_wait`](Self::end_wait) after waking.
    pub fn prepare_wait(
        &mut self,
        mem: &(impl SharedMemory + ?Sized),
        tx_needed: Option<u32>,
    ) -> Result<bool, ChannelError> {
        if self.resetting {
            return Ok(true);
        }
        if !self.rx.prepare_wait(mem)? {
            return Ok(false);
        }
        if let Some(needed) = tx_needed
            && !self.tx.prepare_wait(mem, needed)?
        {
            self.rx.end_wait(mem);
            return Ok(false);
        }
        Ok(true)
    }

    /// Disarms the wakeups armed by [`prepare_wait`](Self::prepare_wait).
    pub fn end_wait(&mut self, mem: &(impl SharedMemory + ?Sized)) {
        self.rx.end_wait(mem);
        self.tx.end_wait(mem);
    }

    /// Bumps this side's heartbeat counter.
    pub fn beat(&mut self, mem: &(impl SharedMemory + ?Sized)) {
        self.heartbeat = self.heartbeat.wrapping_add(1);
        // Ordering: Relaxed: the peer only watches it change.
        mem.store(R::HEARTBEAT, self.heartbeat, Relaxed);
    }

    /// The peer's heartbeat counter.
    pub fn peer_heartbeat(&self, mem: &(impl SharedMemory + ?Sized)) -> u32 {
        // Ordering: Relaxed: only watched for change.
        mem.load(R::PEER_HEARTBEAT, Relaxed)
    }

    /// The peer's generation word.
    pub fn peer_generation(&self, mem: &(impl SharedMemory + ?Sized)) -> u32 {
        // Ordering: Relaxed: informational; the hello carries it authoritatively.
        mem.load(R::PEER_GENERATION, Relaxed)
    }
}

impl Endpoint<Host> {
    /// Initialises the region from scratch: layout, zeroed rings, a new epoch.
    ///
    /// A guest still attached to the region (this host restarted and could not
    /// [`resume`](Self::resume)) is told to detach first: the endpoint then stays in reset
    /// until the guest has detached; poll [`try_finish_reset`](Self::try_finish_reset), with
    /// `force` once the guest has had long enough. Otherwise it is ready at once.
    pub fn create(
        mem: &(impl SharedMemory + ?Sized),
        generation: u32,
    ) -> Result<Self, LayoutError> {
        let layout = Layout::for_region(mem.len())?;
        // Ordering: Relaxed: only used to pick the epochs (see below).
        let old_epoch = mem.load(offsets::EPOCH, Relaxed);
        let guest_epoch = mem.load(offsets::GUEST_EPOCH, Relaxed);
        // Ordering: Relaxed stores then a SeqCst fence, as in `begin_reset`: a guest that
        // re-checks after this sees HOST_READY = 0 (or no magic) and detaches.
        mem.store(offsets::HOST_READY, 0, Relaxed);
        mem.store(offsets::MAGIC0, 0, Relaxed);
        mem.fence(SeqCst);
        let mut off = 4;
        while off < layout::HEADER_SIZE {
            if off != offsets::GUEST_EPOCH {
                // Ordering: Relaxed: published by the Release store of the magic below.
                mem.store(off, 0, Relaxed);
            }
            off += 4;
        }
        layout.write(mem);
        // Until the guest detaches, keep the epoch it is attached to: `try_finish_reset`
        // waits for it to leave that epoch, then moves to the next one.
        let epoch = if guest_epoch != 0 {
            guest_epoch
        } else {
            old_epoch
        };
        // Ordering: Relaxed: published by the Release store of the magic below.
        mem.store(offsets::EPOCH, epoch, Relaxed);
        mem.store(offsets::HOST_GENERATION, generation, Relaxed);
        mem.store(offsets::MAGIC1, layout::MAGIC1, Relaxed);
        // Ordering: Release: everything above is visible to a guest that loads the magic
        // with Acquire (it still waits for HOST_READY = 1).
        mem.store(offsets::MAGIC0, layout::MAGIC0, Release);
        let mut ep = Self::fresh(layout, epoch);
        ep.begin_reset(mem);
        ep.try_finish_reset(mem, false);
        Ok(ep)
    }

    /// An endpoint over rings whose indices are (about to be) zero.
    fn fresh(layout: Layout, epoch: u32) -> Self {
        Self {
            layout,
            epoch,
            tx: Producer::fresh(&layout, Host::TX),
            rx: Consumer::fresh(&layout, Host::RX),
            kick: false,
            peer_doorbell: 0,
            heartbeat: 0,
            frames_in: 0,
            frames_out: 0,
            resetting: false,
            reset_ack: 0,
            _role: PhantomData,
        }
    }

    /// Takes over a region that a previous host process set up, continuing from its indices:
    /// nothing the guest published is lost. Fails if the region is not in a usable state;
    /// the caller then uses [`create`](Self::create).
    pub fn resume(
        mem: &(impl SharedMemory + ?Sized),
        generation: u32,
    ) -> Result<Self, AttachError> {
        if !layout::read_magic(mem) {
            return Err(AttachError::NotReady);
        }
        let layout = Layout::read(mem).map_err(AttachError::Layout)?;
        // Ordering: Relaxed: these words are ours; the magic was loaded with Acquire.
        if mem.load(offsets::HOST_READY, Relaxed) != 1 {
            return Err(AttachError::NotReady);
        }
        let epoch = mem.load(offsets::EPOCH, Relaxed);
        if epoch == 0 {
            return Err(AttachError::NotReady);
        }
        let ep = Self::new(mem, layout, epoch, Start::Resume)
            .map_err(|error| AttachError::Corrupt { error, epoch })?;
        // Ordering: Relaxed: informational for the guest.
        mem.store(offsets::HOST_GENERATION, generation, Relaxed);
        Ok(ep)
    }

    /// [`resume`](Self::resume) if the region is usable, else [`create`](Self::create).
    pub fn open(mem: &(impl SharedMemory + ?Sized), generation: u32) -> Result<Self, LayoutError> {
        match Self::resume(mem, generation) {
            Ok(ep) => Ok(ep),
            Err(_) => Self::create(mem, generation),
        }
    }

    /// Whether a guest is attached to the current epoch.
    pub fn guest_attached(&self, mem: &(impl SharedMemory + ?Sized)) -> bool {
        // Ordering: Acquire pairs with the guest's Release store in `attach`.
        !self.resetting && mem.load(offsets::GUEST_EPOCH, Acquire) == self.epoch
    }

    /// Whether the guest has asked for a reset that no host has carried out yet (requests
    /// made while no host ran count too).
    pub fn reset_requested(&self, mem: &(impl SharedMemory + ?Sized)) -> bool {
        // Ordering: Relaxed: a counter only compared with the last one acted on.
        !self.resetting && mem.load(offsets::GUEST_RESET_REQUEST, Relaxed) != self.reset_ack
    }

    /// Starts a reset: tells the guest to detach. Sending and receiving fail with
    /// [`SendError::Detached`] / [`ChannelError::Detached`] until
    /// [`try_finish_reset`](Self::try_finish_reset) returns `true`. Every reset request the
    /// guest has made so far is answered by this reset.
    pub fn begin_reset(&mut self, mem: &(impl SharedMemory + ?Sized)) {
        self.resetting = true;
        // Ordering: Relaxed: only compared.
        self.reset_ack = mem.load(offsets::GUEST_RESET_REQUEST, Relaxed);
        mem.store(offsets::HOST_RESET_ACK, self.reset_ack, Relaxed);
        // Ordering: Relaxed store then a SeqCst fence before `try_finish_reset` loads
        // GUEST_EPOCH; the guest stores GUEST_EPOCH, fences, and re-loads HOST_READY when it
        // attaches. Either it sees 0 and backs off, or we see it attached and wait for it.
        mem.store(offsets::HOST_READY, 0, Relaxed);
        mem.fence(SeqCst);
        self.kick = true;
    }

    /// Finishes a reset once the guest has detached, or at once if `force` (the guest is not
    /// responding). Returns whether the reset is done; the caller then wakes the guest
    /// ([`take_kick`](Self::take_kick)) so that it attaches again. The host learns that the
    /// guest detached only by calling this again: poll it on a timer while resetting.
    pub fn try_finish_reset(&mut self, mem: &(impl SharedMemory + ?Sized), force: bool) -> bool {
        if !self.resetting {
            return true;
        }
        // Ordering: Acquire pairs with the guest's Release store of GUEST_EPOCH when it
        // detaches: its last ring writes happened before.
        let guest_epoch = mem.load(offsets::GUEST_EPOCH, Acquire);
        if !force && guest_epoch != 0 && guest_epoch == self.epoch {
            return false;
        }
        for off in [
            offsets::H2G_PROD,
            offsets::H2G_CONS,
            offsets::G2H_PROD,
            offsets::G2H_CONS,
            offsets::H2G_SPACE_WANTED,
            offsets::G2H_DATA_WANTED,
            offsets::H2G_DATA_WANTED,
            offsets::G2H_SPACE_WANTED,
        ] {
            // Ordering: Relaxed: published by the Release store of HOST_READY below.
            mem.store(off, 0, Relaxed);
        }
        // Never the epoch a (late) guest may still think it is attached to.
        let mut epoch = next_epoch(self.epoch);
        if epoch == guest_epoch {
            epoch = next_epoch(epoch);
        }
        // Ordering: Relaxed: published by the Release store of HOST_READY below.
        mem.store(offsets::EPOCH, epoch, Relaxed);
        // Ordering: Release: a guest that sees HOST_READY = 1 with Acquire sees the zeroed
        // indices and the new epoch.
        mem.store(offsets::HOST_READY, 1, Release);
        self.epoch = epoch;
        self.tx = Producer::fresh(&self.layout, Host::TX);
        self.rx = Consumer::fresh(&self.layout, Host::RX);
        self.resetting = false;
        self.kick = true;
        true
    }

    /// Whether a reset is in progress.
    pub fn is_resetting(&self) -> bool {
        self.resetting
    }
}

impl Endpoint<Guest> {
    /// Attaches to the rings the host has made ready. `start` says what to do with requests
    /// the host published before (for a predecessor); `refuse_epoch` is the epoch this side
    /// asked to have reset, which it must not attach to again.
    pub fn attach(
        mem: &(impl SharedMemory + ?Sized),
        generation: u32,
        start: Start,
        refuse_epoch: Option<u32>,
    ) -> Result<Self, AttachError> {
        if !layout::read_magic(mem) {
            return Err(AttachError::NotReady);
        }
        let layout = Layout::read(mem).map_err(AttachError::Layout)?;
        // Ordering: Acquire pairs with the host's Release store of HOST_READY after a reset.
        if mem.load(offsets::HOST_READY, Acquire) != 1 {
            // We are not attached: say so, in case a predecessor that died attached left its
            // epoch there and a resetting host is waiting for it to leave.
            detach(mem);
            return Err(AttachError::NotReady);
        }
        // Ordering: Relaxed: ordered by the Acquire load above.
        let epoch = mem.load(offsets::EPOCH, Relaxed);
        if epoch == 0 || Some(epoch) == refuse_epoch {
            return Err(AttachError::NotReady);
        }
        let corrupt = |error| AttachError::Corrupt { error, epoch };
        let mut ep = Self::new(mem, layout, epoch, Start::Resume).map_err(corrupt)?;
        // Ordering: Relaxed: published by the Release store of GUEST_EPOCH.
        mem.store(offsets::GUEST_GENERATION, generation, Relaxed);
        // Ordering: Release, then a SeqCst fence before re-checking HOST_READY: pairs with
        // `HostEndpoint::begin_reset` (see there).
        mem.store(offsets::GUEST_EPOCH, epoch, Release);
        mem.fence(SeqCst);
        // Ordering: the fence orders this load after our GUEST_EPOCH store. Acquire, because
        // the value seen may be the HOST_READY = 1 of a reset that finished meanwhile: then
        // the EPOCH load below must see that reset's new epoch, not ours (loom found this).
        let ready = mem.load(offsets::HOST_READY, Acquire);
        // Ordering: Relaxed: ordered by the Acquire load above.
        if ready != 1 || mem.load(offsets::EPOCH, Relaxed) != epoch {
            detach(mem);
            return Err(AttachError::NotReady);
        }
        // Only now that the attach stands may we write an index: before, a reset could have
        // zeroed the rings under us.
        if start == Start::SkipPending
            && let Err(error) = ep.rx.skip_pending(mem)
        {
            detach(mem);
            return Err(corrupt(error));
        }
        Ok(ep)
    }

    /// Checks that the host has not started a reset. On [`ChannelError::Detached`] this side
    /// has detached and must [`attach`](Self::attach) again. Call it once per loop.
    pub fn check_session(&self, mem: &(impl SharedMemory + ?Sized)) -> Result<(), ChannelError> {
        // Ordering: Acquire, pairing with the host's Release stores of HOST_READY.
        let ready = mem.load(offsets::HOST_READY, Acquire);
        // Ordering: Relaxed: ordered by the Acquire load above.
        let epoch = mem.load(offsets::EPOCH, Relaxed);
        if ready != 1 || epoch != self.epoch {
            detach(mem);
            return Err(ChannelError::Detached);
        }
        Ok(())
    }

    /// Detaches and asks the host to reset the rings (after finding them corrupt). Returns
    /// the epoch not to attach to again.
    pub fn request_reset(self, mem: &(impl SharedMemory + ?Sized)) -> u32 {
        request_reset(mem);
        self.epoch
    }
}

/// Detaches a guest that has no endpoint (it could not attach) and asks for a reset. Bumps
/// the host's doorbell counter; the caller then raises the host's eventfd, if it has one.
pub fn request_reset(mem: &(impl SharedMemory + ?Sized)) {
    detach(mem);
    // Ordering: Relaxed loads: our own words, only counted on.
    let n = mem.load(offsets::GUEST_RESET_REQUEST, Relaxed);
    let bell = mem.load(offsets::HOST_DOORBELL, Relaxed);
    // Ordering: Release: the detach above is visible to a host that sees the new count.
    mem.store(offsets::GUEST_RESET_REQUEST, n.wrapping_add(1), Release);
    mem.store(offsets::HOST_DOORBELL, bell.wrapping_add(1), Release);
}

fn detach(mem: &(impl SharedMemory + ?Sized)) {
    // Ordering: Release: our last ring writes happen before the host, which loads
    // GUEST_EPOCH with Acquire, zeroes the indices.
    mem.store(offsets::GUEST_EPOCH, 0, Release);
}

/// The epoch after `e`, skipping 0 (which means "detached").
fn next_epoch(e: u32) -> u32 {
    match e.wrapping_add(1) {
        0 => 1,
        n => n,
    }
}
