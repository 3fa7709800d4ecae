//! Where everything lives in the shared region, and the checks that a header read from the
//! peer must pass before any of it is used.
//!
//! ```text
//! 0x0000  line 0   identity (host writes once): magic, version, sizes, ring offsets
//! 0x0040  line 1   host status:  ready, epoch, generation, heartbeat
//! 0x0080  line 2   guest status: attached epoch, generation, heartbeat, reset requests
//! 0x00c0  line 3   h2g producer index        (host writes)
//! 0x0100  line 4   h2g consumer index        (guest writes)
//! 0x0140  line 5   g2h producer index        (guest writes)
//! 0x0180  line 6   g2h consumer index        (host writes)
//! 0x01c0  line 7   host's wait flags and the guest's doorbell counter (host writes)
//! 0x0200  line 8   guest's wait flags and the host's doorbell counter (guest writes)
//! ...     reserved up to HEADER_SIZE
//! size/4  h2g data area (size/4 bytes)    [default layout]
//! size/2  g2h data area (size/2 bytes)    [default layout]
//! ```
//!
//! Every word is a little-endian `u32` (both sides of an x86 or Arm hypervisor are little
//! endian; the magic check rejects a big-endian peer). Each side writes only the lines it
//! owns, so no cache line is written from both sides.

/// Bytes in a cache line; indices and per-side words sit on lines of their own.
pub const CACHE_LINE: usize = 64;
/// Bytes reserved for the header at the start of the region.
pub const HEADER_SIZE: usize = 4096;
/// Smallest region accepted.
pub const MIN_REGION_SIZE: usize = 64 * 1024;
/// Largest region accepted.
pub const MAX_REGION_SIZE: usize = 64 * 1024 * 1024;
/// Smallest data area accepted for a ring: two frames of the largest size fit in it.
pub const MIN_RING_SIZE: usize = 2 * crate::frame::MAX_FRAME_LEN;
/// Layout version written in the header. A peer that finds another refuses the region.
pub const LAYOUT_VERSION: u32 = 1;
/// The first magic word: `b"PORT"` little-endian.
pub const MAGIC0: u32 = u32::from_le_bytes(*b"PORT");
/// The second magic word: `b"LESS"` little-endian.
pub const MAGIC1: u32 = u32::from_le_bytes(*b"LESS");

/// Byte offsets of the header words. The spec (PROTOCOL.md) gives the same table.
pub mod offsets {
    use super::CACHE_LINE as L;

    /// `b"PORT"`; written last when the host initialises the region.
    pub const MAGIC0: usize = 0;
    /// `b"LESS"`.
    pub const MAGIC1: usize = 4;
    /// [`LAYOUT_VERSION`](super::LAYOUT_VERSION).
    pub const VERSION: usize = 8;
    /// Region size in bytes.
    pub const REGION_SIZE: usize = 12;
    /// Offset of the host-to-guest data area.
    pub const H2G_OFFSET: usize = 16;
    /// Size of the host-to-guest data area.
    pub const H2G_SIZE: usize = 20;
    /// Offset of the guest-to-host data area.
    pub const G2H_OFFSET: usize = 24;
    /// Size of the guest-to-host data area.
    pub const G2H_SIZE: usize = 28;
    /// Largest frame (header and payload) either side may write.
    pub const MAX_FRAME: usize = 32;

    /// 1 while the rings of `EPOCH` are usable, 0 while the host resets them.
    pub const HOST_READY: usize = L;
    /// Ring epoch: changes every time the host resets the rings.
    pub const EPOCH: usize = L + 4;
    /// Host generation: changes every time a host process takes the region.
    pub const HOST_GENERATION: usize = L + 8;
    /// Host heartbeat counter.
    pub const HOST_HEARTBEAT: usize = L + 12;
    /// The `GUEST_RESET_REQUEST` value the host has last acted on; a request is pending while
    /// the two differ, across host restarts too.
    pub const HOST_RESET_ACK: usize = L + 16;

    /// Epoch the guest is attached to, 0 when detached.
    pub const GUEST_EPOCH: usize = 2 * L;
    /// Guest generation: changes every time an agent process starts.
    pub const GUEST_GENERATION: usize = 2 * L + 4;
    /// Guest heartbeat counter.
    pub const GUEST_HEARTBEAT: usize = 2 * L + 8;
    /// Bumped by the guest to ask the host for a ring reset.
    pub const GUEST_RESET_REQUEST: usize = 2 * L + 12;

    /// Host-to-guest producer index (host writes).
    pub const H2G_PROD: usize = 3 * L;
    /// Host-to-guest consumer index (guest writes).
    pub const H2G_CONS: usize = 4 * L;
    /// Guest-to-host producer index (guest writes).
    pub const G2H_PROD: usize = 5 * L;
    /// Guest-to-host consumer index (host writes).
    pub const G2H_CONS: usize = 6 * L;

    /// Host is the h2g producer: bytes of free space it waits for, 0 when not waiting.
    pub const H2G_SPACE_WANTED: usize = 7 * L;
    /// Host is the g2h consumer: 1 while it waits for data.
    pub const G2H_DATA_WANTED: usize = 7 * L + 4;
    /// Bumped by the host each time it rings the guest.
    pub const GUEST_DOORBELL: usize = 7 * L + 8;

    /// Guest is the h2g consumer: 1 while it waits for data.
    pub const H2G_DATA_WANTED: usize = 8 * L;
    /// Guest is the g2h producer: bytes of free space it waits for, 0 when not waiting.
    pub const G2H_SPACE_WANTED: usize = 8 * L + 4;
    /// Bumped by the guest each time it rings the host.
    pub const HOST_DOORBELL: usize = 8 * L + 8;

    /// End of the words in use; the rest of the header is reserved and zero.
    pub const END: usize = 9 * L;

    /// Every header word, in offset order.
    pub const ALL: [usize; 28] = [
        MAGIC0,
        MAGIC1,
        VERSION,
        REGION_SIZE,
        H2G_OFFSET,
        H2G_SIZE,
        G2H_OFFSET,
        G2H_SIZE,
        MAX_FRAME,
        HOST_READY,
        EPOCH,
        HOST_GENERATION,
        HOST_HEARTBEAT,
        HOST_RESET_ACK,
        GUEST_EPOCH,
        GUEST_GENERATION,
        GUEST_HEARTBEAT,
        GUEST_RESET_REQUEST,
        H2G_PROD,
        H2G_CONS,
        G2H_PROD,
        G2H_CONS,
        H2G_SPACE_WANTED,
        G2H_DATA_WANTED,
        GUEST_DOORBELL,
        H2G_DATA_WANTED,
        G2H_SPACE_WANTED,
        HOST_DOORBELL,
    ];
}

/// The two directions of the channel.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Direction {
    /// Host to guest: requests.
    HostToGuest,
    /// Guest to host: replies and output.
    GuestToHost,
}

impl Direction {
    /// The words that belong to the ring of this direction.
    pub const fn words(self) -> RingWords {
        match self {
            Self::HostToGuest => RingWords {
                prod: offsets::H2G_PROD,
                cons: offsets::H2G_CONS,
                data_wanted: offsets::H2G_DATA_WANTED,
                space_wanted: offsets::H2G_SPACE_WANTED,
                consumer_doorbell: offsets::GUEST_DOORBELL,
                producer_doorbell: offsets::HOST_DOORBELL,
            },
            Self::GuestToHost => RingWords {
                prod: offsets::G2H_PROD,
                cons: offsets::G2H_CONS,
                data_wanted: offsets::G2H_DATA_WANTED,
                space_wanted: offsets::G2H_SPACE_WANTED,
                consumer_doorbell: offsets::HOST_DOORBELL,
                producer_doorbell: offsets::GUEST_DOORBELL,
            },
        }
    }
}

/// Offsets of the header words that control one ring.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct RingWords {
    /// Producer index.
    pub prod: usize,
    /// Consumer index.
    pub cons: usize,
    /// Consumer's "wake me when data arrives" flag.
    pub data_wanted: usize,
    /// Producer's "wake me when this much space is free" word.
    pub space_wanted: usize,
    /// Doorbell counter of the consumer's side (the producer bumps it to wake the consumer).
    pub consumer_doorbell: usize,
    /// Doorbell counter of the producer's side (the consumer bumps it to wake the producer).
    pub producer_doorbell: usize,
}

/// Where one ring's data area lives.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct RingArea {
    /// Offset of the data area in the region.
    pub offset: u32,
    /// Size of the data area: a power of two.
    pub size: u32,
}

impl RingArea {
    /// The mask that turns a free-running index into an offset in the data area.
    pub const fn mask(self) -> u32 {
        self.size.wrapping_sub(1)
    }
}

/// A validated layout: the sizes and offsets of a region, held privately once checked.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Layout {
    /// Size of the whole region.
    pub region_size: u32,
    /// The host-to-guest ring.
    pub h2g: RingArea,
    /// The guest-to-host ring.
    pub g2h: RingArea,
}

/// Why a header or a region size was refused.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[non_exhaustive]
pub enum LayoutError {
    /// The magic words are not `PORTLESS` (not initialised yet, or not a Portless region).
    BadMagic,
    /// The header is of a layout version this side does not speak.
    UnsupportedVersion(u32),
    /// The region size is not a power of two between 64 KiB and 64 MiB.
    BadRegionSize(usize),
    /// The header's region size differs from the size of the mapping.
    SizeMismatch {
        /// What the header says.
        header: u32,
        /// What this side mapped.
        mapped: usize,
    },
    /// A ring's data area is misplaced, too small or not a power of two.
    BadRing(Direction),
    /// The two rings' data areas overlap.
    Overlap,
    /// The header's frame limit differs from this side's.
    BadFrameLimit(u32),
}

impl core::fmt::Display for LayoutError {
    fn fmt(&self, f: &mut core::fmt::Formatter<'_>) -> core::fmt::Result {
        match self {
            Self::BadMagic => f.write_str("region header has no Portless magic"),
            Self::UnsupportedVersion(v) => write!(f, "unsupported region layout version {v}"),
            Self::BadRegionSize(s) => write!(
                f,
                "region size {s} is not a power of two between {MIN_REGION_SIZE} and {MAX_REGION_SIZE}"
            ),
            Self::SizeMismatch { header, mapped } => {
                write!(
                    f,
                    "header says region is {header} bytes but {mapped} are mapped"
                )
            }
            Self::BadRing(d) => write!(f, "invalid {d:?} ring placement in header"),
            Self::Overlap => f.write_str("the two rings overlap"),
            Self::BadFrameLimit(v) => write!(f, "header frame limit {v} differs from ours"),
        }
    }
}

impl core::error::Error for LayoutError {}

/// Checks a region size: a power of two from [`MIN_REGION_SIZE`] to [`MAX_REGION_SIZE`].
pub fn check_region_size(size: usize) -> Result<u32, LayoutError> {
    if !size.is_power_of_two() || !(MIN_REGION_SIZE..=MAX_REGION_SIZE).contains(&size) {
        return Err(LayoutError::BadRegionSize(size));
    }
    u32::try_from(size).map_err(|_| LayoutError::BadRegionSize(size))
}

impl Layout {
    /// The layout the host writes for a region of `size` bytes: the h2g ring in the second
    /// quarter, the g2h ring (which carries the bulk, command output) in the second half.
    pub fn for_region(size: usize) -> Result<Self, LayoutError> {
        let region_size = check_region_size(size)?;
        Ok(Self {
            region_size,
            h2g: RingArea {
                offset: region_size / 4,
                size: region_size / 4,
            },
            g2h: RingArea {
                offset: region_size / 2,
                size: region_size / 2,
            },
        })
    }

    /// Reads and validates the layout words of a header written by the peer, loading each
    /// word once. The caller must have seen the magic with `Acquire` first (see
    /// [`read_magic`]).
    pub fn read<M: crate::SharedMemory + ?Sized>(mem: &M) -> Result<Self, LayoutError> {
        use core::sync::atomic::Ordering::Relaxed;
        // Ordering: Relaxed suffices for all of these: the host writes them before its
        // Release store of the magic, which the caller loaded with Acquire.
        let version = mem.load(offsets::VERSION, Relaxed);
        if version != LAYOUT_VERSION {
            return Err(LayoutError::UnsupportedVersion(version));
        }
        let mapped = mem.len();
        check_region_size(mapped)?;
        let region_size = mem.load(offsets::REGION_SIZE, Relaxed);
        if region_size as usize != mapped {
            return Err(LayoutError::SizeMismatch {
                header: region_size,
                mapped,
            });
        }
        let max_frame = mem.load(offsets::MAX_FRAME, Relaxed);
        if max_frame as usize != crate::frame::MAX_FRAME_LEN {
            return Err(LayoutError::BadFrameLimit(max_frame));
        }
        let h2g = RingArea {
            offset: mem.load(offsets::H2G_OFFSET, Relaxed),
            size: mem.load(offsets::H2G_SIZE, Relaxed),
        };
        let g2h = RingArea {
            offset: mem.load(offsets::G2H_OFFSET, Relaxed),
            size: mem.load(offsets::G2H_SIZE, Relaxed),
        };
        let layout = Self {
            region_size,
            h2g,
            g2h,
        };
        layout.validate()?;
        Ok(layout)
    }

    /// Checks the placement of both rings.
    pub fn validate(&self) -> Result<(), LayoutError> {
        let region = u64::from(self.region_size);
        let ring_ok = |r: RingArea| {
            let (off, size) = (u64::from(r.offset), u64::from(r.size));
            r.size.is_power_of_two()
                && size >= MIN_RING_SIZE as u64
                && off >= HEADER_SIZE as u64
                && off % CACHE_LINE as u64 == 0
                && off + size <= region
        };
        if !ring_ok(self.h2g) {
            return Err(LayoutError::BadRing(Direction::HostToGuest));
        }
        if !ring_ok(self.g2h) {
            return Err(LayoutError::BadRing(Direction::GuestToHost));
        }
        let (a, b) = (self.h2g, self.g2h);
        let overlap = u64::from(a.offset) < u64::from(b.offset) + u64::from(b.size)
            && u64::from(b.offset) < u64::from(a.offset) + u64::from(a.size);
        if overlap {
            return Err(LayoutError::Overlap);
        }
        Ok(())
    }

    /// The data area of the ring of `dir`.
    pub const fn area(&self, dir: Direction) -> RingArea {
        match dir {
            Direction::HostToGuest => self.h2g,
            Direction::GuestToHost => self.g2h,
        }
    }

    /// Writes the layout words (not the magic, not the status words).
    pub(crate) fn write<M: crate::SharedMemory + ?Sized>(&self, mem: &M) {
        use core::sync::atomic::Ordering::Relaxed;
        // Ordering: Relaxed; published by the Release store of the magic that follows.
        mem.store(offsets::VERSION, LAYOUT_VERSION, Relaxed);
        mem.store(offsets::REGION_SIZE, self.region_size, Relaxed);
        mem.store(offsets::H2G_OFFSET, self.h2g.offset, Relaxed);
        mem.store(offsets::H2G_SIZE, self.h2g.size, Relaxed);
        mem.store(offsets::G2H_OFFSET, self.g2h.offset, Relaxed);
        mem.store(offsets::G2H_SIZE, self.g2h.size, Relaxed);
        #[allow(clippy::cast_possible_truncation)] // a small constant
        mem.store(
            offsets::MAX_FRAME,
            crate::frame::MAX_FRAME_LEN as u32,
            Relaxed,
        );
    }
}

/// Whether the region carries the Portless magic, loaded with `Acquire` so that the layout
/// words the host wrote before it are visible.
pub fn read_magic<M: crate::SharedMemory + ?Sized>(mem: &M) -> bool {
    use core::sync::atomic::Ordering::{Acquire, Relaxed};
    // Ordering: MAGIC0 is stored last, with Release, when the host initialises the region;
    // Acquire here makes everything written before it visible. MAGIC1 is written before it.
    mem.load(offsets::MAGIC0, Acquire) == MAGIC0 && mem.load(offsets::MAGIC1, Relaxed) == MAGIC1
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn default_layouts_validate_for_every_size() {
        let mut size = MIN_REGION_SIZE;
        while size <= MAX_REGION_SIZE {
            let l = Layout::for_region(size).expect("valid size");
            l.validate().expect("default layout is valid");
            size *= 2;
        }
    }

    #[test]
    fn bad_sizes_are_refused() {
        for s in [
            0,
            1,
            4096,
            MIN_REGION_SIZE - 1,
            MIN_REGION_SIZE + 4096,
            2 * MAX_REGION_SIZE,
        ] {
            assert_eq!(Layout::for_region(s), Err(LayoutError::BadRegionSize(s)));
        }
    }

    #[test]
    fn misplaced_rings_are_refused() {
        let good = Layout::for_region(MIN_REGION_SIZE).expect("valid");
        let cases = [
            Layout {
                h2g: RingArea {
                    offset: 0,
                    ..good.h2g
                },
                ..good
            },
            Layout {
                h2g: RingArea {
                    size: good.h2g.size + 64,
                    ..good.h2g
                },
                ..good
            },
            Layout {
                h2g: RingArea {
                    offset: good.h2g.offset + 8,
                    ..good.h2g
                },
                ..good
            },
            Layout {
                g2h: RingArea {
                    offset: u32::MAX - 63,
                    ..good.g2h
                },
                ..good
            },
            Layout {
                g2h: good.h2g,
                ..good
            },
            Layout {
                h2g: RingArea {
                    size: 4096,
                    ..good.h2g
                },
                ..good
            },
        ];
        for l in cases {
            assert!(l.validate().is_err(), "{l:?}");
        }
    }

    #[test]
    fn header_words_do_not_overlap_and_fit() {
        let words = offsets::ALL;
        assert!(words.is_sorted(), "ALL is in offset order");
        assert!(words.windows(2).all(|w| w[0] + 4 <= w[1]));
        assert!(words.iter().all(|w| w % 4 == 0 && *w + 4 <= offsets::END));
        const { assert!(offsets::END <= HEADER_SIZE) };
        // Each index on a line of its own.
        for idx in [
            offsets::H2G_PROD,
            offsets::H2G_CONS,
            offsets::G2H_PROD,
            offsets::G2H_CONS,
        ] {
            assert_eq!(idx % CACHE_LINE, 0);
            assert!(
                words
                    .iter()
                    .filter(|w| **w / CACHE_LINE == idx / CACHE_LINE)
                    .count()
                    == 1
            );
        }
    }
}
