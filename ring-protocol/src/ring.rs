//! Single-producer single-consumer rings of frames, with notification suppression.
//!
//! Each side keeps its own index privately ([`Producer::prod`], [`Consumer::cons`]) and only
//! publishes it; it never reads its own index back from shared memory, where the peer could
//! have changed it. The peer's index is loaded once per operation and checked:
//! `prod - cons` (wrapping) must be a multiple of 8 no larger than the data area, else the ring
//! is corrupt and the caller resets the channel.
//!
//! # Notification rules
//!
//! A side that runs out of work sleeps only after arming a wait word and re-checking:
//!
//! - consumer: store `data_wanted = 1`, full fence, re-load `prod`; sleep only if still empty.
//! - producer: store `space_wanted = n` (bytes it needs), full fence, re-load `cons`; sleep
//!   only if fewer than `n` bytes are still free.
//!
//! The other side, after publishing its index, issues a full fence and loads the wait word:
//!
//! - a producer that published `old..new` rings iff `data_wanted != 0` and `cons == old`:
//!   the consumer had drained the ring, so it may be asleep. Later frames while it is still
//!   asleep find `cons != old` and ring no more (suppression).
//! - a consumer that moved `cons` from `old` to `new` rings iff `space_wanted = n != 0` and
//!   the free space went from below `n` to at least `n`.
//!
//! The two full fences make this a store-buffer (Dekker) pattern: either the waker sees the
//! wait word, or the sleeper's re-check sees the new index, so a wakeup is never lost (the
//! loom model in `tests/loom.rs` checks it). The waker never clears the sleeper's word; the
//! sleeper clears it when it wakes ([`Consumer::end_wait`], [`Producer::end_wait`]). A hostile
//! peer can only cause itself missed or extra wakeups.

use core::sync::atomic::Ordering::{Acquire, Relaxed, Release, SeqCst};

use crate::frame::{self, FRAME_HEADER_LEN, FrameBuf, FrameError, MAX_PAYLOAD_LEN};
use crate::layout::{Direction, Layout, RingArea, RingWords};
use crate::region::SharedMemory;

/// The ring's indices or a frame in it are not valid: the channel must be reset.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[non_exhaustive]
pub enum RingError {
    /// `prod - cons` is larger than the data area or not a multiple of 8.
    BadIndices {
        /// Producer index seen.
        prod: u32,
        /// Consumer index seen.
        cons: u32,
    },
    /// A frame header is invalid.
    Frame(FrameError),
    /// A frame claims more bytes than the producer has published.
    Truncated {
        /// Bytes the frame needs.
        needed: u32,
        /// Bytes published.
        available: u32,
    },
}

impl core::fmt::Display for RingError {
    fn fmt(&self, f: &mut core::fmt::Formatter<'_>) -> core::fmt::Result {
        match self {
            Self::BadIndices { prod, cons } => {
                write!(
                    f,
                    "ring indices out of range (prod {prod:#x}, cons {cons:#x})"
                )
            }
            Self::Frame(e) => write!(f, "corrupt frame: {e}"),
            Self::Truncated { needed, available } => {
                write!(
                    f,
                    "frame needs {needed} bytes but only {available} are published"
                )
            }
        }
    }
}

impl core::error::Error for RingError {}

impl From<FrameError> for RingError {
    fn from(e: FrameError) -> Self {
        Self::Frame(e)
    }
}

/// Why a frame was not sent. Nothing was published; the caller still has the message.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[non_exhaustive]
pub enum SendError {
    /// Not enough free space now; retry once `needed` bytes are free
    /// ([`Producer::prepare_wait`] arms a wakeup for exactly that).
    Full {
        /// Bytes the frame takes, header and padding included.
        needed: u32,
    },
    /// The encoded message is longer than [`MAX_PAYLOAD_LEN`]; it can never be sent.
    TooLarge,
    /// The message could not be encoded.
    Encode,
    /// The ring is corrupt.
    Ring(RingError),
    /// The channel is being reset: attach again before sending.
    Detached,
}

impl core::fmt::Display for SendError {
    fn fmt(&self, f: &mut core::fmt::Formatter<'_>) -> core::fmt::Result {
        match self {
            Self::Full { needed } => write!(f, "ring full ({needed} bytes needed)"),
            Self::TooLarge => write!(f, "message exceeds the {MAX_PAYLOAD_LEN}-byte frame limit"),
            Self::Encode => f.write_str("message could not be encoded"),
            Self::Ring(e) => e.fmt(f),
            Self::Detached => f.write_str("channel is being reset"),
        }
    }
}

impl core::error::Error for SendError {}

impl From<RingError> for SendError {
    fn from(e: RingError) -> Self {
        Self::Ring(e)
    }
}

/// `prod - cons` if it describes a valid fill level of a data area of `size` bytes.
fn fill(prod: u32, cons: u32, size: u32) -> Result<u32, RingError> {
    let used = prod.wrapping_sub(cons);
    if used > size || !used.is_multiple_of(frame::FRAME_ALIGN as u32) {
        return Err(RingError::BadIndices { prod, cons });
    }
    Ok(used)
}

/// Indices taken over from the region must be frame-aligned; after that each side advances
/// its own by whole frames and the fill check keeps the peer's aligned, so every index of a
/// valid ring is 8-aligned and a frame header never wraps.
fn check_aligned(prod: u32, cons: u32) -> Result<(), RingError> {
    let align = frame::FRAME_ALIGN as u32;
    if prod.is_multiple_of(align) && cons.is_multiple_of(align) {
        Ok(())
    } else {
        Err(RingError::BadIndices { prod, cons })
    }
}

/// Where in the region the byte of free-running index `index` lives, and how many bytes
/// follow it before the data area wraps.
fn position(area: RingArea, index: u32) -> (usize, usize) {
    let pos = (index & area.mask()) as usize;
    (area.offset as usize + pos, area.size as usize - pos)
}

fn write_wrapping<M: SharedMemory + ?Sized>(mem: &M, area: RingArea, index: u32, data: &[u8]) {
    let (at, room) = position(area, index);
    let (first, rest) = data.split_at(data.len().min(room));
    mem.write(at, first);
    if !rest.is_empty() {
        mem.write(area.offset as usize, rest);
    }
}

fn read_wrapping<M: SharedMemory + ?Sized>(mem: &M, area: RingArea, index: u32, dst: &mut [u8]) {
    let (at, room) = position(area, index);
    let split = dst.len().min(room);
    let (first, rest) = dst.split_at_mut(split);
    mem.read(at, first);
    if !rest.is_empty() {
        mem.read(area.offset as usize, rest);
    }
}

#[allow(clippy::cast_possible_truncation)] // frame lengths are at most MAX_FRAME_LEN
const fn frame_len_u32(payload: usize) -> u32 {
    frame::frame_len(payload) as u32
}

/// The producing end of one ring.
#[derive(Debug, Clone)]
pub struct Producer {
    area: RingArea,
    words: RingWords,
    prod: u32,
}

impl Producer {
    /// Takes the producing end of the `dir` ring, continuing from the producer index in the
    /// region (a fresh region has 0; a restarted producer carries on where its predecessor
    /// stopped, which is always a frame boundary).
    pub fn attach<M: SharedMemory + ?Sized>(
        mem: &M,
        layout: &Layout,
        dir: Direction,
    ) -> Result<Self, RingError> {
        let area = layout.area(dir);
        let words = dir.words();
        // Ordering: Relaxed: we are the only writer of our own index (or its successor).
        let prod = mem.load(words.prod, Relaxed);
        // Ordering: Acquire pairs with the consumer's Release store of `cons`.
        let cons = mem.load(words.cons, Acquire);
        check_aligned(prod, cons)?;
        fill(prod, cons, area.size)?;
        Ok(Self { area, words, prod })
    }

    /// The producing end of a ring whose indices were just zeroed (by the host's reset).
    pub(crate) fn fresh(layout: &Layout, dir: Direction) -> Self {
        Self {
            area: layout.area(dir),
            words: dir.words(),
            prod: 0,
        }
    }

    /// Our producer index (as last published).
    pub fn prod(&self) -> u32 {
        self.prod
    }

    /// Bytes free in the ring now.
    pub fn free<M: SharedMemory + ?Sized>(&self, mem: &M) -> Result<u32, RingError> {
        // Ordering: Acquire pairs with the consumer's Release store of `cons`, so the bytes
        // it has finished copying out are not overwritten before it is done with them.
        let cons = mem.load(self.words.cons, Acquire);
        Ok(self.area.size - fill(self.prod, cons, self.area.size)?)
    }

    /// Sends one frame with `payload`. Returns whether the consumer must be woken.
    pub fn try_send<M: SharedMemory + ?Sized>(
        &mut self,
        mem: &M,
        payload: &[u8],
    ) -> Result<bool, SendError> {
        if payload.len() > MAX_PAYLOAD_LEN {
            return Err(SendError::TooLarge);
        }
        let needed = frame_len_u32(payload.len());
        if self.free(mem)? < needed {
            return Err(SendError::Full { needed });
        }
        write_wrapping(
            mem,
            self.area,
            self.prod.wrapping_add(FRAME_HEADER_LEN as u32),
            payload,
        );
        Ok(self.publish(mem, payload.len()))
    }

    /// Encodes `msg` with postcard straight into the ring and sends it as one frame.
    /// Returns whether the consumer must be woken.
    pub fn try_send_message<M, T>(&mut self, mem: &M, msg: &T) -> Result<bool, SendError>
    where
        M: SharedMemory + ?Sized,
        T: serde::Serialize + ?Sized,
    {
        let free = self.free(mem)? as usize;
        let limit = free.saturating_sub(FRAME_HEADER_LEN).min(MAX_PAYLOAD_LEN);
        let start = self.prod.wrapping_add(FRAME_HEADER_LEN as u32);
        let writer = RingWriter::new(mem, self.area, start, limit);
        match postcard::serialize_with_flavor(msg, writer) {
            Ok(len) => Ok(self.publish(mem, len)),
            Err(postcard::Error::SerializeBufferFull) => {
                let size =
                    postcard::serialize_with_flavor(msg, postcard::ser_flavors::Size::default())
                        .map_err(|_| SendError::Encode)?;
                if size > MAX_PAYLOAD_LEN {
                    Err(SendError::TooLarge)
                } else {
                    Err(SendError::Full {
                        needed: frame_len_u32(size),
                    })
                }
            }
            Err(_) => Err(SendError::Encode),
        }
    }

    /// Writes the header of a frame whose payload is already in place and publishes it.
    fn publish<M: SharedMemory + ?Sized>(&mut self, mem: &M, len: usize) -> bool {
        #[allow(clippy::cast_possible_truncation)] // len <= MAX_PAYLOAD_LEN, checked by callers
        let header = frame::encode_header(len as u32);
        write_wrapping(mem, self.area, self.prod, &header);
        let old = self.prod;
        self.prod = old.wrapping_add(frame_len_u32(len));
        // Ordering: Release publishes the frame bytes written above to the consumer's
        // Acquire load of `prod`.
        mem.store(self.words.prod, self.prod, Release);
        // Ordering: SeqCst fence between our store of `prod` and our load of `data_wanted`;
        // the consumer has one between its store of `data_wanted` and its re-load of `prod`.
        // Of the two loads at least one sees the other side's store: no lost wakeup.
        mem.fence(SeqCst);
        // Ordering: Relaxed: ordered by the fence above.
        if mem.load(self.words.data_wanted, Relaxed) == 0 {
            return false;
        }
        // Ordering: Relaxed: ordered by the fence; only compared, never used to index.
        mem.load(self.words.cons, Relaxed) == old
    }

    /// Arms a wakeup for when `needed` bytes are free. Returns `true` if the caller may sleep
    /// (the space is still missing after arming), `false` if it should retry now.
    pub fn prepare_wait<M: SharedMemory + ?Sized>(
        &self,
        mem: &M,
        needed: u32,
    ) -> Result<bool, RingError> {
        // Ordering: Relaxed store, ordered before the re-check by the SeqCst fence.
        mem.store(self.words.space_wanted, needed.max(1), Relaxed);
        // Ordering: pairs with the fence in `Consumer::try_recv` (see the module docs).
        mem.fence(SeqCst);
        let free = self.free(mem)?;
        if free >= needed {
            self.end_wait(mem);
            return Ok(false);
        }
        Ok(true)
    }

    /// Disarms the wakeup armed by [`prepare_wait`](Self::prepare_wait).
    pub fn end_wait<M: SharedMemory + ?Sized>(&self, mem: &M) {
        // Ordering: Relaxed: at worst the consumer rings once more than needed.
        mem.store(self.words.space_wanted, 0, Relaxed);
    }
}

/// The consuming end of one ring.
#[derive(Debug, Clone)]
pub struct Consumer {
    area: RingArea,
    words: RingWords,
    /// The consumer index as published: the producer may reuse everything before it.
    cons: u32,
    /// Where the next frame starts: `cons` plus the frames read but not yet released
    /// ([`try_peek`](Self::try_peek) then [`release`](Self::release)). Never past `prod`.
    read: u32,
}

/// Where a consumer starts when it attaches.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Start {
    /// Continue at the consumer index in the region: frames published but not consumed are
    /// read (a restarted host picks up the guest's replies).
    Resume,
    /// Skip to the producer index: frames published for a predecessor are dropped.
    SkipPending,
}

impl Consumer {
    /// Takes the consuming end of the `dir` ring.
    pub fn attach<M: SharedMemory + ?Sized>(
        mem: &M,
        layout: &Layout,
        dir: Direction,
        start: Start,
    ) -> Result<Self, RingError> {
        let area = layout.area(dir);
        let words = dir.words();
        // Ordering: Acquire pairs with the producer's Release store of `prod`.
        let prod = mem.load(words.prod, Acquire);
        // Ordering: Relaxed: our own index, last written by us or our predecessor.
        let cons = mem.load(words.cons, Relaxed);
        check_aligned(prod, cons)?;
        fill(prod, cons, area.size)?;
        let mut c = Self {
            area,
            words,
            cons,
            read: cons,
        };
        if start == Start::SkipPending {
            c.skip_pending(mem)?;
        }
        Ok(c)
    }

    /// The consuming end of a ring whose indices were just zeroed (by the host's reset).
    pub(crate) fn fresh(layout: &Layout, dir: Direction) -> Self {
        Self {
            area: layout.area(dir),
            words: dir.words(),
            cons: 0,
            read: 0,
        }
    }

    /// Drops every frame published so far (they were meant for a predecessor).
    pub fn skip_pending<M: SharedMemory + ?Sized>(&mut self, mem: &M) -> Result<(), RingError> {
        // Ordering: Acquire, as in `available`.
        let prod = mem.load(self.words.prod, Acquire);
        fill(prod, self.cons, self.area.size)?;
        if prod != self.cons {
            self.cons = prod;
            // Ordering: Release, as for every publication of `cons`.
            mem.store(self.words.cons, prod, Release);
        }
        self.read = prod;
        Ok(())
    }

    /// Our consumer index (as last published).
    pub fn cons(&self) -> u32 {
        self.cons
    }

    /// Where the next frame to read starts: past the frames read and not yet released.
    pub fn read_index(&self) -> u32 {
        self.read
    }

    /// Bytes published and not yet read.
    pub fn available<M: SharedMemory + ?Sized>(&self, mem: &M) -> Result<u32, RingError> {
        // Ordering: Acquire pairs with the producer's Release store of `prod`, making the
        // frame bytes it wrote before visible.
        let prod = mem.load(self.words.prod, Acquire);
        // The fill is checked against what is published as consumed (the producer's view);
        // what was read but not released lies between, and the producer cannot take it
        // back: `prod` only grows, by at most the free space we published.
        let used = fill(prod, self.cons, self.area.size)?;
        let held = self.read.wrapping_sub(self.cons);
        used.checked_sub(held).ok_or(RingError::BadIndices {
            prod,
            cons: self.read,
        })
    }

    /// Copies the next frame's payload into `buf` and consumes the frame (releasing, with it,
    /// every frame [peeked](Self::try_peek) before). Returns the payload and whether the
    /// producer must be woken, or `None` when the ring is empty.
    pub fn try_recv<'b, M: SharedMemory + ?Sized>(
        &mut self,
        mem: &M,
        buf: &'b mut FrameBuf,
    ) -> Result<Option<(&'b [u8], bool)>, RingError> {
        let Some(len) = self.peek_into(mem, buf)? else {
            return Ok(None);
        };
        let kick = self.publish(mem, self.read);
        Ok(buf.get(..len).map(|p| (p, kick)))
    }

    /// Copies the next frame's payload into `buf` without consuming it: the producer cannot
    /// reuse its bytes until [`release`](Self::release) is called with an index at or past
    /// [`read_index`](Self::read_index) as it is after this call. Frames are read in order;
    /// a consumer that restarts before releasing reads them again. `None` when no frame is
    /// waiting beyond those already read.
    pub fn try_peek<'b, M: SharedMemory + ?Sized>(
        &mut self,
        mem: &M,
        buf: &'b mut FrameBuf,
    ) -> Result<Option<&'b [u8]>, RingError> {
        let Some(len) = self.peek_into(mem, buf)? else {
            return Ok(None);
        };
        Ok(buf.get(..len))
    }

    /// Reads the frame at `read` into `buf` and moves `read` past it; its payload length.
    fn peek_into<M: SharedMemory + ?Sized>(
        &mut self,
        mem: &M,
        buf: &mut FrameBuf,
    ) -> Result<Option<usize>, RingError> {
        let available = self.available(mem)?;
        if available == 0 {
            return Ok(None);
        }
        let mut header = [0u8; FRAME_HEADER_LEN];
        read_wrapping(mem, self.area, self.read, &mut header);
        let len = frame::decode_header(header)?;
        let needed = frame_len_u32(len);
        if needed > available {
            return Err(RingError::Truncated { needed, available });
        }
        let payload = buf
            .get_mut(..len)
            .ok_or(RingError::Frame(FrameError::TooLong(needed)))?;
        read_wrapping(
            mem,
            self.area,
            self.read.wrapping_add(FRAME_HEADER_LEN as u32),
            payload,
        );
        self.read = self.read.wrapping_add(needed);
        Ok(Some(len))
    }

    /// Publishes that every frame before index `upto` is consumed: a value from
    /// [`read_index`](Self::read_index), at or after the last one released. An index outside
    /// that range changes nothing. Returns whether the producer must be woken.
    pub fn release<M: SharedMemory + ?Sized>(&mut self, mem: &M, upto: u32) -> bool {
        let ahead = upto.wrapping_sub(self.cons);
        if ahead == 0 || ahead > self.read.wrapping_sub(self.cons) {
            return false;
        }
        self.publish(mem, upto)
    }

    /// Publishes `cons = new` and decides whether to wake the producer.
    fn publish<M: SharedMemory + ?Sized>(&mut self, mem: &M, new: u32) -> bool {
        let old = self.cons;
        self.cons = new;
        // Ordering: Release: our copy of the frame is complete before the producer may reuse
        // its bytes (it loads `cons` with Acquire).
        mem.store(self.words.cons, self.cons, Release);
        // Ordering: SeqCst fence between our store of `cons` and our load of `space_wanted`,
        // pairing with the producer's fence in `prepare_wait`.
        mem.fence(SeqCst);
        // Ordering: Relaxed: ordered by the fence above.
        let wanted = mem.load(self.words.space_wanted, Relaxed);
        if wanted == 0 {
            return false;
        }
        // Ordering: Relaxed: only used for arithmetic on free space, never to index.
        let prod = mem.load(self.words.prod, Relaxed);
        let size = self.area.size;
        let free_after = size.saturating_sub(prod.wrapping_sub(self.cons));
        let free_before = size.saturating_sub(prod.wrapping_sub(old));
        free_before < wanted && wanted <= free_after
    }

    /// Arms a wakeup for when data arrives. Returns `true` if the caller may sleep (the ring
    /// is still empty after arming), `false` if it should receive now.
    pub fn prepare_wait<M: SharedMemory + ?Sized>(&self, mem: &M) -> Result<bool, RingError> {
        // Ordering: Relaxed store, ordered before the re-check by the SeqCst fence.
        mem.store(self.words.data_wanted, 1, Relaxed);
        // Ordering: pairs with the fence in `Producer::publish` (see the module docs).
        mem.fence(SeqCst);
        if self.available(mem)? != 0 {
            self.end_wait(mem);
            return Ok(false);
        }
        Ok(true)
    }

    /// Disarms the wakeup armed by [`prepare_wait`](Self::prepare_wait).
    pub fn end_wait<M: SharedMemory + ?Sized>(&self, mem: &M) {
        // Ordering: Relaxed: at worst the producer rings once more than needed.
        mem.store(self.words.data_wanted, 0, Relaxed);
    }
}

/// A postcard flavor that serialises straight into the free part of a ring. Small pushes are
/// staged privately and written in batches; nothing is published until the frame is complete.
struct RingWriter<'m, M: ?Sized> {
    mem: &'m M,
    area: RingArea,
    start: u32,
    written: usize,
    limit: usize,
    stage: [u8; 64],
    staged: usize,
}

impl<'m, M: SharedMemory + ?Sized> RingWriter<'m, M> {
    fn new(mem: &'m M, area: RingArea, start: u32, limit: usize) -> Self {
        Self {
            mem,
            area,
            start,
            written: 0,
            limit,
            stage: [0; 64],
            staged: 0,
        }
    }

    fn flush(&mut self) {
        if let Some(staged) = self.stage.get(..self.staged) {
            #[allow(clippy::cast_possible_truncation)] // written <= MAX_PAYLOAD_LEN
            let at = self.start.wrapping_add((self.written - self.staged) as u32);
            write_wrapping(self.mem, self.area, at, staged);
        }
        self.staged = 0;
    }
}

impl<M: SharedMemory + ?Sized> postcard::ser_flavors::Flavor for RingWriter<'_, M> {
    type Output = usize;

    fn try_push(&mut self, data: u8) -> postcard::Result<()> {
        if self.written >= self.limit {
            return Err(postcard::Error::SerializeBufferFull);
        }
        if self.staged == self.stage.len() {
            self.flush();
        }
        if let Some(slot) = self.stage.get_mut(self.staged) {
            *slot = data;
        }
        self.staged += 1;
        self.written += 1;
        Ok(())
    }

    fn try_extend(&mut self, data: &[u8]) -> postcard::Result<()> {
        if data.len() > self.limit - self.written {
            return Err(postcard::Error::SerializeBufferFull);
        }
        if self.staged + data.len() <= self.stage.len() {
            if let Some(dst) = self.stage.get_mut(self.staged..self.staged + data.len()) {
                dst.copy_from_slice(data);
            }
            self.staged += data.len();
            self.written += data.len();
            return Ok(());
        }
        self.flush();
        #[allow(clippy::cast_possible_truncation)] // written <= MAX_PAYLOAD_LEN
        let at = self.start.wrapping_add(self.written as u32);
        write_wrapping(self.mem, self.area, at, data);
        self.written += data.len();
        Ok(())
    }

    fn finalize(mut self) -> postcard::Result<usize> {
        self.flush();
        Ok(self.written)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::region::HeapRegion;
    use std::vec::Vec;

    fn ring(size: usize) -> (HeapRegion, Layout) {
        let region = HeapRegion::new(size);
        let layout = Layout::for_region(size).expect("valid size");
        (region, layout)
    }

    #[test]
    fn frames_arrive_in_order_and_whole() {
        let (mem, layout) = ring(64 * 1024);
        let mut p = Producer::attach(&*mem, &layout, Direction::HostToGuest).expect("attach");
        let mut c = Consumer::attach(&*mem, &layout, Direction::HostToGuest, Start::Resume)
            .expect("attach");
        let mut buf = [0u8; MAX_PAYLOAD_LEN];
        for round in 0..100usize {
            let payload: Vec<u8> = (0..round * 37 % 3000).map(|i| (i + round) as u8).collect();
            let _ = p.try_send(&*mem, &payload).expect("room");
            let (got, _) = c
                .try_recv(&*mem, &mut buf)
                .expect("valid")
                .expect("a frame");
            assert_eq!(got, &payload[..]);
        }
        assert!(c.try_recv(&*mem, &mut buf).expect("valid").is_none());
    }

    #[test]
    fn full_ring_hands_the_frame_back() {
        let (mem, layout) = ring(64 * 1024);
        let mut p = Producer::attach(&*mem, &layout, Direction::HostToGuest).expect("attach");
        let payload = [7u8; 4000];
        let mut sent = 0;
        loop {
            match p.try_send(&*mem, &payload) {
                Ok(_) => sent += 1,
                Err(SendError::Full { needed }) => {
                    assert_eq!(needed as usize, frame::frame_len(4000));
                    break;
                }
                Err(e) => panic!("{e}"),
            }
        }
        assert_eq!(sent, layout.h2g.size as usize / frame::frame_len(4000));
        assert_eq!(
            p.try_send(&*mem, &[0; MAX_PAYLOAD_LEN + 1]),
            Err(SendError::TooLarge)
        );
    }

    #[test]
    fn hostile_indices_are_errors_not_panics() {
        let (mem, layout) = ring(64 * 1024);
        let w = Direction::HostToGuest.words();
        let mut c = Consumer::attach(&*mem, &layout, Direction::HostToGuest, Start::Resume)
            .expect("attach");
        let mut buf = [0u8; MAX_PAYLOAD_LEN];
        for prod in [layout.h2g.size + 8, 4, u32::MAX, 0x8000_0000] {
            mem.store(w.prod, prod, Relaxed);
            assert!(matches!(
                c.try_recv(&*mem, &mut buf),
                Err(RingError::BadIndices { .. })
            ));
        }
        // A frame header that claims more than was published.
        mem.write(layout.h2g.offset as usize, &frame::encode_header(100));
        mem.store(w.prod, 16, Relaxed);
        assert_eq!(
            c.try_recv(&*mem, &mut buf),
            Err(RingError::Truncated {
                needed: 112,
                available: 16
            })
        );
        mem.write(layout.h2g.offset as usize, &frame::encode_header(u32::MAX));
        assert!(matches!(
            c.try_recv(&*mem, &mut buf),
            Err(RingError::Frame(_))
        ));
    }

    #[test]
    fn wakeups_are_suppressed_while_the_consumer_sleeps() {
        let (mem, layout) = ring(64 * 1024);
        let mut p = Producer::attach(&*mem, &layout, Direction::GuestToHost).expect("attach");
        let mut c = Consumer::attach(&*mem, &layout, Direction::GuestToHost, Start::Resume)
            .expect("attach");
        // Not waiting: never rings.
        assert_eq!(p.try_send(&*mem, b"a"), Ok(false));
        let mut buf = [0u8; MAX_PAYLOAD_LEN];
        let _ = c.try_recv(&*mem, &mut buf).expect("ok");
        assert_eq!(c.prepare_wait(&*mem), Ok(true));
        assert_eq!(
            p.try_send(&*mem, b"b"),
            Ok(true),
            "first frame after sleep rings"
        );
        assert_eq!(
            p.try_send(&*mem, b"c"),
            Ok(false),
            "second one is suppressed"
        );
        c.end_wait(&*mem);
        assert_eq!(p.try_send(&*mem, b"d"), Ok(false));
        // Data present: no sleep.
        assert_eq!(c.prepare_wait(&*mem), Ok(false));
    }

    #[test]
    fn producer_is_woken_once_enough_space_is_free() {
        let (mem, layout) = ring(64 * 1024);
        let mut p = Producer::attach(&*mem, &layout, Direction::GuestToHost).expect("attach");
        let mut c = Consumer::attach(&*mem, &layout, Direction::GuestToHost, Start::Resume)
            .expect("attach");
        let payload = [1u8; 8000];
        let needed = loop {
            match p.try_send(&*mem, &payload) {
                Ok(_) => {}
                Err(SendError::Full { needed }) => break needed,
                Err(e) => panic!("{e}"),
            }
        };
        assert_eq!(p.prepare_wait(&*mem, needed), Ok(true));
        let mut buf = [0u8; MAX_PAYLOAD_LEN];
        let (_, kick) = c.try_recv(&*mem, &mut buf).expect("ok").expect("frame");
        assert!(kick, "freeing a whole frame wakes the waiting producer");
        let (_, kick) = c.try_recv(&*mem, &mut buf).expect("ok").expect("frame");
        assert!(!kick, "already enough space before: no second wakeup");
        p.end_wait(&*mem);
        assert!(p.try_send(&*mem, &payload).is_ok());
    }

    /// Two threads stream frames through a ring; under miri this checks that every payload
    /// byte is ordered by the Release/Acquire pairing of the indices (no data race).
    #[test]
    fn two_threads_stream_frames_without_races() {
        // Under miri, 120 frames (about 180 KB, the 64 KiB ring wrapped twice and more): each
        // byte is interpreted, and 300 frames took 4.5 minutes of CI.
        let frames: u32 = if cfg!(miri) { 120 } else { 20_000 };
        let (mem, layout) = ring(64 * 1024);
        let mem = std::sync::Arc::new(mem);
        let mut p = Producer::attach(&*mem, &layout, Direction::GuestToHost).expect("attach");
        let mut c = Consumer::attach(&*mem, &layout, Direction::GuestToHost, Start::Resume)
            .expect("attach");
        let m = mem.clone();
        let producer = std::thread::spawn(move || {
            let mut k = 0u32;
            while k < frames {
                let len = (k as usize * 997) % 3000;
                let payload: Vec<u8> = (0..len).map(|i| (i as u32 ^ k) as u8).collect();
                match p.try_send(&*m, &payload) {
                    Ok(_) => k += 1,
                    Err(SendError::Full { .. }) => std::thread::yield_now(),
                    Err(e) => panic!("{e}"),
                }
            }
        });
        let mut buf = [0u8; MAX_PAYLOAD_LEN];
        let mut k = 0u32;
        while k < frames {
            match c.try_recv(&*mem, &mut buf).expect("valid") {
                Some((got, _)) => {
                    let len = (k as usize * 997) % 3000;
                    assert_eq!(got.len(), len);
                    assert!(
                        got.iter()
                            .enumerate()
                            .all(|(i, b)| *b == (i as u32 ^ k) as u8)
                    );
                    k += 1;
                }
                None => std::thread::yield_now(),
            }
        }
        producer.join().expect("producer");
    }

    #[test]
    fn messages_encode_in_place_including_across_the_wrap() {
        let (mem, layout) = ring(64 * 1024);
        let mut p = Producer::attach(&*mem, &layout, Direction::HostToGuest).expect("attach");
        let mut c = Consumer::attach(&*mem, &layout, Direction::HostToGuest, Start::Resume)
            .expect("attach");
        let mut buf = [0u8; MAX_PAYLOAD_LEN];
        let data: Vec<u8> = (0..3000u32).map(|i| i as u8).collect();
        for i in 0..50u32 {
            let msg = (i, "some text", &data[..(i as usize * 61) % 3000]);
            let _ = p.try_send_message(&*mem, &msg).expect("room");
            let (got, _) = c.try_recv(&*mem, &mut buf).expect("ok").expect("frame");
            let back: (u32, &str, &[u8]) = postcard::from_bytes(got).expect("decodes");
            assert_eq!(back, msg);
        }
        let huge = [0u8; MAX_PAYLOAD_LEN];
        assert_eq!(
            p.try_send_message(&*mem, &&huge[..]),
            Err(SendError::TooLarge)
        );
    }
}
