//! Access to memory shared with the other side of the hypervisor.
//!
//! The peer can change any byte of the region at any moment, so no Rust reference (`&[u8]`,
//! `&mut u32`) ever points into it: that would let the compiler assume the bytes do not change
//! under it. Everything goes through [`SharedMemory`]: 32-bit atomic loads and stores for the
//! header words and ring indices, volatile copies for the ring data. The rest of the crate is
//! written against the trait; this module holds all of the crate's `unsafe` code.

use core::ptr::NonNull;
use core::sync::atomic::{AtomicU32, Ordering};

/// A region of memory shared with a peer that is not trusted.
///
/// Offsets are in bytes from the start of the region. Callers pass word offsets that are
/// multiples of 4 and byte ranges inside [`len`](SharedMemory::len); implementations must
/// never touch memory outside the region whatever they are given: an out-of-range load returns
/// 0, an out-of-range read fills `dst` with zeros and an out-of-range store or write does
/// nothing.
pub trait SharedMemory {
    /// Size of the region in bytes.
    fn len(&self) -> usize;

    /// Whether the region is empty (never true for a usable region).
    fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// Atomically loads the 32-bit word at `offset`.
    fn load(&self, offset: usize, order: Ordering) -> u32;

    /// Atomically stores `value` into the 32-bit word at `offset`.
    fn store(&self, offset: usize, value: u32, order: Ordering);

    /// A memory fence that orders this side's accesses to the region.
    fn fence(&self, order: Ordering) {
        core::sync::atomic::fence(order);
    }

    /// Copies `dst.len()` bytes starting at `offset` out of the region.
    fn read(&self, offset: usize, dst: &mut [u8]);

    /// Copies `src` into the region starting at `offset`.
    fn write(&self, offset: usize, src: &[u8]);
}

impl<M: SharedMemory + ?Sized> SharedMemory for &M {
    fn len(&self) -> usize {
        (**self).len()
    }
    fn load(&self, offset: usize, order: Ordering) -> u32 {
        (**self).load(offset, order)
    }
    fn store(&self, offset: usize, value: u32, order: Ordering) {
        (**self).store(offset, value, order);
    }
    fn fence(&self, order: Ordering) {
        (**self).fence(order);
    }
    fn read(&self, offset: usize, dst: &mut [u8]) {
        (**self).read(offset, dst);
    }
    fn write(&self, offset: usize, src: &[u8]) {
        (**self).write(offset, src);
    }
}

/// Why a pointer cannot be used as a [`MappedRegion`].
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[non_exhaustive]
pub enum RegionError {
    /// The base address is not aligned to 8 bytes.
    Misaligned,
    /// The length is zero or larger than `isize::MAX`.
    BadLength,
}

impl core::fmt::Display for RegionError {
    fn fmt(&self, f: &mut core::fmt::Formatter<'_>) -> core::fmt::Result {
        match self {
            Self::Misaligned => f.write_str("shared region base is not 8-byte aligned"),
            Self::BadLength => f.write_str("shared region length is zero or too large"),
        }
    }
}

impl core::error::Error for RegionError {}

/// Memory mapped from outside this program (an mmap of a shared file, a PCI BAR), accessed
/// only atomically and volatilely.
#[derive(Debug)]
pub struct MappedRegion {
    base: NonNull<u8>,
    len: usize,
}

// SAFETY: a `MappedRegion` is a pointer and a length; every access through it is atomic or
// volatile and bounds-checked, exactly the accesses that the peer on the other side of the
// hypervisor makes concurrently, so sharing it between threads adds nothing new.
unsafe impl Send for MappedRegion {}
// SAFETY: as for `Send`: no method hands out a reference into the region.
unsafe impl Sync for MappedRegion {}

const WORD: usize = core::mem::size_of::<u64>();

impl MappedRegion {
    /// Wraps `len` bytes at `base`.
    ///
    /// # Safety
    ///
    /// For as long as the returned value (or anything borrowing it) is alive, `base..base+len`
    /// must stay mapped, readable and writable, and this program must not access it except
    /// through this value (no references into it, no non-atomic accesses that race with the
    /// atomic ones). The peer may write any byte at any time; that is the point.
    pub unsafe fn new(base: NonNull<u8>, len: usize) -> Result<Self, RegionError> {
        if !base.as_ptr().addr().is_multiple_of(WORD) {
            return Err(RegionError::Misaligned);
        }
        if len == 0 || len > isize::MAX as usize {
            return Err(RegionError::BadLength);
        }
        Ok(Self { base, len })
    }

    /// The first byte of the region.
    pub fn as_ptr(&self) -> *mut u8 {
        self.base.as_ptr()
    }

    fn word(&self, offset: usize) -> Option<&AtomicU32> {
        if !offset.is_multiple_of(4) || offset.checked_add(4)? > self.len {
            debug_assert!(false, "word access out of bounds: {offset:#x}");
            return None;
        }
        // SAFETY: `offset + 4 <= len`, so the four bytes are inside the mapping that `new`'s
        // contract keeps alive; the base is 8-aligned and `offset` a multiple of 4, so the
        // result is aligned for `AtomicU32`.
        let ptr = unsafe { self.base.as_ptr().add(offset) }.cast::<u32>();
        // SAFETY: `ptr` is aligned and inside the mapping (above); every access to these words,
        // here and in the peer, is atomic, as `AtomicU32::from_ptr` requires.
        Some(unsafe { AtomicU32::from_ptr(ptr) })
    }

    fn range_ok(&self, offset: usize, len: usize) -> bool {
        let ok = offset.checked_add(len).is_some_and(|end| end <= self.len);
        debug_assert!(ok, "byte range out of bounds: {offset:#x}+{len:#x}");
        ok
    }
}

impl SharedMemory for MappedRegion {
    fn len(&self) -> usize {
        self.len
    }

    fn load(&self, offset: usize, order: Ordering) -> u32 {
        // Ordering: chosen by the caller, who documents why.
        self.word(offset).map_or(0, |w| w.load(order))
    }

    fn store(&self, offset: usize, value: u32, order: Ordering) {
        if let Some(w) = self.word(offset) {
            // Ordering: chosen by the caller, who documents why.
            w.store(value, order);
        }
    }

    fn read(&self, offset: usize, dst: &mut [u8]) {
        if !self.range_ok(offset, dst.len()) {
            dst.fill(0);
            return;
        }
        let mut src = self.base.as_ptr().wrapping_add(offset).cast_const();
        // Bytes up to the first 8-aligned source address, then whole words, then the tail.
        let head_len = dst.len().min(src.addr().wrapping_neg() % WORD);
        let (head, body) = dst.split_at_mut(head_len);
        for b in head {
            // SAFETY: `src` lies in `offset..offset + dst.len()`, checked to be inside the
            // mapping; a volatile read of one byte has no alignment requirement.
            *b = unsafe { src.read_volatile() };
            src = src.wrapping_add(1);
        }
        let mut words = body.chunks_exact_mut(WORD);
        for chunk in &mut words {
            // SAFETY: `src` is 8-aligned and `src..src + 8` lies inside the checked range.
            let w = unsafe { src.cast::<u64>().read_volatile() };
            chunk.copy_from_slice(&w.to_ne_bytes());
            src = src.wrapping_add(WORD);
        }
        for b in words.into_remainder() {
            // SAFETY: inside the checked range, as above.
            *b = unsafe { src.read_volatile() };
            src = src.wrapping_add(1);
        }
    }

    fn write(&self, offset: usize, src: &[u8]) {
        if !self.range_ok(offset, src.len()) {
            return;
        }
        let mut dst = self.base.as_ptr().wrapping_add(offset);
        let head_len = src.len().min(dst.addr().wrapping_neg() % WORD);
        let (head, body) = src.split_at(head_len);
        for b in head {
            // SAFETY: `dst` lies inside the checked range `offset..offset + src.len()`.
            unsafe { dst.write_volatile(*b) };
            dst = dst.wrapping_add(1);
        }
        let mut words = body.chunks_exact(WORD);
        for chunk in &mut words {
            let mut w = [0u8; WORD];
            w.copy_from_slice(chunk);
            // SAFETY: `dst` is 8-aligned and `dst..dst + 8` lies inside the checked range.
            unsafe { dst.cast::<u64>().write_volatile(u64::from_ne_bytes(w)) };
            dst = dst.wrapping_add(WORD);
        }
        for b in words.remainder() {
            // SAFETY: inside the checked range, as above.
            unsafe { dst.write_volatile(*b) };
            dst = dst.wrapping_add(1);
        }
    }
}

/// Ordinary memory standing in for a shared region, for tests and benches.
#[cfg(any(test, feature = "std"))]
pub struct HeapRegion {
    region: MappedRegion,
    words: NonNull<[u64]>,
}

#[cfg(any(test, feature = "std"))]
impl HeapRegion {
    /// Allocates `len` zeroed bytes (rounded up to a multiple of 8).
    ///
    /// # Panics
    ///
    /// If `len` is zero.
    #[allow(clippy::panic)] // test support: a zero-sized region is a bug in the test
    pub fn new(len: usize) -> Self {
        assert!(len > 0, "a region needs at least one byte");
        let words: std::boxed::Box<[u64]> = std::vec![0u64; len.div_ceil(WORD)].into();
        let words = NonNull::from(std::boxed::Box::leak(words));
        // SAFETY: the allocation is leaked until `drop`, so it stays valid for as long as
        // `region`; nothing else refers to it (the box was consumed), so every access goes
        // through `region`. A `Box<[u64]>` is 8-aligned.
        let region = unsafe { MappedRegion::new(words.cast::<u8>(), len) };
        match region {
            Ok(region) => Self { region, words },
            Err(e) => panic!("heap allocation unusable as a region: {e}"),
        }
    }
}

#[cfg(any(test, feature = "std"))]
impl Drop for HeapRegion {
    fn drop(&mut self) {
        // SAFETY: `words` came from `Box::leak` in `new` and is freed only here, once; the
        // `MappedRegion` that points into it is dropped with `self` and cannot be used after.
        drop(unsafe { std::boxed::Box::from_raw(self.words.as_ptr()) });
    }
}

#[cfg(any(test, feature = "std"))]
impl core::ops::Deref for HeapRegion {
    type Target = MappedRegion;
    fn deref(&self) -> &MappedRegion {
        &self.region
    }
}

#[cfg(any(test, feature = "std"))]
impl SharedMemory for HeapRegion {
    fn len(&self) -> usize {
        self.region.len()
    }
    fn load(&self, offset: usize, order: Ordering) -> u32 {
        self.region.load(offset, order)
    }
    fn store(&self, offset: usize, value: u32, order: Ordering) {
        self.region.store(offset, value, order);
    }
    fn read(&self, offset: usize, dst: &mut [u8]) {
        self.region.read(offset, dst);
    }
    fn write(&self, offset: usize, src: &[u8]) {
        self.region.write(offset, src);
    }
}

#[cfg(any(test, feature = "std"))]
// SAFETY: the region is only accessed atomically or volatilely (see `MappedRegion`).
unsafe impl Send for HeapRegion {}
#[cfg(any(test, feature = "std"))]
// SAFETY: as for `Send`.
unsafe impl Sync for HeapRegion {}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn copies_round_trip_at_every_alignment() {
        let region = HeapRegion::new(256);
        for offset in 0..16 {
            for len in 0..40 {
                let src: std::vec::Vec<u8> = (0..len).map(|i| (i * 7 + offset) as u8).collect();
                region.write(offset, &src);
                let mut back = std::vec![0xAAu8; len];
                region.read(offset, &mut back);
                assert_eq!(back, src, "offset {offset} len {len}");
            }
        }
    }

    #[test]
    fn words_and_bytes_agree() {
        let region = HeapRegion::new(64);
        region.store(8, 0x0403_0201, Ordering::Relaxed);
        let mut b = [0u8; 4];
        region.read(8, &mut b);
        assert_eq!(u32::from_ne_bytes(b), 0x0403_0201);
    }

    #[test]
    #[cfg(not(debug_assertions))]
    fn out_of_range_is_inert() {
        let region = HeapRegion::new(64);
        assert_eq!(region.load(64, Ordering::Relaxed), 0);
        region.store(usize::MAX - 1, 1, Ordering::Relaxed);
        let mut b = [1u8; 8];
        region.read(60, &mut b);
        assert_eq!(b, [0; 8]);
    }
}
