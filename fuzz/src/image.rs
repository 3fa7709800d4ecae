//! How a fuzz input becomes the contents of a shared region, and how a region is captured
//! back into an input (for the seeds), so that the fuzzer plays a peer that wrote any bytes
//! it liked before this side looked.
//!
//! An image is:
//!
//! ```text
//! HEADER_WORDS bytes   the header words (offsets 0..layout::offsets::END), copied as they are
//! 2 bytes, LE          n: the length of the h2g part (clamped to what is left)
//! n bytes              h2g ring bytes
//! the rest             g2h ring bytes
//! ```
//!
//! Ring bytes go into the data areas of the default layout for [`REGION_SIZE`], starting at
//! the consumer index that the header gives and wrapping at the end of the area, so that they
//! are what a consumer reads next whatever index the input chose. A shorter input leaves the
//! rest of the region zero. The reserved rest of the header is always zero: nothing reads it.

use ring_protocol::SharedMemory;
use ring_protocol::layout::{Direction, Layout, RingArea, offsets};

/// Size of the region every target uses: the smallest one the protocol accepts.
pub const REGION_SIZE: usize = ring_protocol::layout::MIN_REGION_SIZE;
/// Bytes of the header that carry words; an image starts with them.
pub const HEADER_WORDS: usize = offsets::END;

/// The default layout of a [`REGION_SIZE`] region, where an image's ring bytes go.
pub fn default_layout() -> Layout {
    match Layout::for_region(REGION_SIZE) {
        Ok(layout) => layout,
        Err(e) => unreachable!("MIN_REGION_SIZE is a valid region size: {e}"),
    }
}

/// Writes `image` over a zeroed region of [`REGION_SIZE`] bytes.
pub fn load(mem: &(impl SharedMemory + ?Sized), image: &[u8]) {
    let (header, rest) = image.split_at(image.len().min(HEADER_WORDS));
    mem.write(0, header);
    let (h2g, g2h) = match rest {
        [lo, hi, rest @ ..] => {
            rest.split_at(rest.len().min(usize::from(u16::from_le_bytes([*lo, *hi]))))
        }
        _ => (&[][..], &[][..]),
    };
    let layout = default_layout();
    for (dir, bytes) in [(Direction::HostToGuest, h2g), (Direction::GuestToHost, g2h)] {
        let area = layout.area(dir);
        let cons = mem.load(dir.words().cons, core::sync::atomic::Ordering::Relaxed);
        let bytes = &bytes[..bytes.len().min(area.size as usize)];
        write_wrapping(mem, area, cons, bytes);
    }
}

/// Captures a region of [`REGION_SIZE`] bytes laid out by default as an image: the header
/// words and, for each ring, the bytes published and not yet consumed.
pub fn capture(mem: &(impl SharedMemory + ?Sized)) -> Vec<u8> {
    let mut image = vec![0u8; HEADER_WORDS];
    mem.read(0, &mut image);
    let layout = default_layout();
    let [h2g, g2h] = [Direction::HostToGuest, Direction::GuestToHost].map(|dir| {
        let area = layout.area(dir);
        let words = dir.words();
        let prod = mem.load(words.prod, core::sync::atomic::Ordering::Relaxed);
        let cons = mem.load(words.cons, core::sync::atomic::Ordering::Relaxed);
        let used = prod.wrapping_sub(cons).min(area.size);
        let mut bytes = vec![0u8; used as usize];
        read_wrapping(mem, area, cons, &mut bytes);
        bytes
    });
    let h2g_len = u16::try_from(h2g.len()).unwrap_or(u16::MAX);
    image.extend_from_slice(&h2g_len.to_le_bytes());
    image.extend_from_slice(&h2g[..usize::from(h2g_len)]);
    image.extend_from_slice(&g2h);
    image
}

/// Where free-running index `index` falls in `area`, and the bytes left before it wraps.
fn position(area: RingArea, index: u32) -> (usize, usize) {
    let pos = (index & area.mask()) as usize;
    (area.offset as usize + pos, area.size as usize - pos)
}

fn write_wrapping(mem: &(impl SharedMemory + ?Sized), area: RingArea, index: u32, bytes: &[u8]) {
    let (at, room) = position(area, index);
    let (first, rest) = bytes.split_at(bytes.len().min(room));
    mem.write(at, first);
    mem.write(area.offset as usize, rest);
}

fn read_wrapping(mem: &(impl SharedMemory + ?Sized), area: RingArea, index: u32, dst: &mut [u8]) {
    let (at, room) = position(area, index);
    let (first, rest) = dst.split_at_mut(dst.len().min(room));
    mem.read(at, first);
    mem.read(area.offset as usize, rest);
}

#[cfg(test)]
mod tests {
    use super::*;
    use ring_protocol::HeapRegion;

    #[test]
    fn capture_of_a_loaded_image_gives_it_back() {
        let region = HeapRegion::new(REGION_SIZE);
        let mut image = vec![0u8; HEADER_WORDS];
        // A consumer index near the end of the h2g area, so that the ring bytes wrap.
        let cons = default_layout().h2g.size - 16;
        image[offsets::H2G_CONS..offsets::H2G_CONS + 4].copy_from_slice(&cons.to_le_bytes());
        image[offsets::H2G_PROD..offsets::H2G_PROD + 4].copy_from_slice(&(cons + 40).to_le_bytes());
        image[offsets::G2H_PROD..offsets::G2H_PROD + 4].copy_from_slice(&8u32.to_le_bytes());
        image.extend_from_slice(&40u16.to_le_bytes());
        image.extend((0..48u8).map(|b| b + 1));
        load(&*region, &image);
        assert_eq!(capture(&*region), image);
    }
}
