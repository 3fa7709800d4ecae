//! The frame format: how one message is laid into a ring.
//!
//! A frame is an 8-byte header, `len: u32` then `reserved: u32` (zero), both little endian,
//! followed by `len` payload bytes and zero to seven bytes of padding that keep the next frame
//! 8-aligned. Because frames start 8-aligned and data areas are powers of two no smaller than
//! a frame, a header never wraps around the end of the data area; a payload may.

/// Bytes in a frame header.
pub const FRAME_HEADER_LEN: usize = 8;
/// Largest frame, header and padding included.
pub const MAX_FRAME_LEN: usize = 8192;
/// Largest payload of one frame.
pub const MAX_PAYLOAD_LEN: usize = MAX_FRAME_LEN - FRAME_HEADER_LEN;
/// Frame alignment in the data area.
pub const FRAME_ALIGN: usize = 8;

/// A private buffer that one received payload is copied into before it is decoded.
pub type FrameBuf = [u8; MAX_PAYLOAD_LEN];

/// The room a payload of `len` bytes takes in a ring: header, payload and padding.
pub const fn frame_len(len: usize) -> usize {
    FRAME_HEADER_LEN + len.next_multiple_of(FRAME_ALIGN)
}

/// Encodes a frame header.
pub const fn encode_header(len: u32) -> [u8; FRAME_HEADER_LEN] {
    let l = len.to_le_bytes();
    [l[0], l[1], l[2], l[3], 0, 0, 0, 0]
}

/// Why a frame header read from the peer was refused.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[non_exhaustive]
pub enum FrameError {
    /// The payload length is over [`MAX_PAYLOAD_LEN`].
    TooLong(u32),
    /// The reserved word is not zero.
    Reserved(u32),
}

impl core::fmt::Display for FrameError {
    fn fmt(&self, f: &mut core::fmt::Formatter<'_>) -> core::fmt::Result {
        match self {
            Self::TooLong(n) => write!(f, "frame payload of {n} bytes exceeds {MAX_PAYLOAD_LEN}"),
            Self::Reserved(v) => write!(f, "frame reserved word is {v:#x}, not zero"),
        }
    }
}

impl core::error::Error for FrameError {}

/// Decodes a frame header copied out of the ring; returns the payload length.
pub fn decode_header(bytes: [u8; FRAME_HEADER_LEN]) -> Result<usize, FrameError> {
    let [a, b, c, d, e, f, g, h] = bytes;
    let len = u32::from_le_bytes([a, b, c, d]);
    let reserved = u32::from_le_bytes([e, f, g, h]);
    if reserved != 0 {
        return Err(FrameError::Reserved(reserved));
    }
    if len as usize > MAX_PAYLOAD_LEN {
        return Err(FrameError::TooLong(len));
    }
    Ok(len as usize)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn header_round_trip_and_limits() {
        #[allow(clippy::cast_possible_truncation)]
        let max = MAX_PAYLOAD_LEN as u32;
        for len in [0, 1, 7, 8, 4096, max] {
            assert_eq!(decode_header(encode_header(len)), Ok(len as usize));
        }
        assert_eq!(
            decode_header(encode_header(max + 1)),
            Err(FrameError::TooLong(max + 1))
        );
        let mut h = encode_header(3);
        h[7] = 1;
        assert_eq!(decode_header(h), Err(FrameError::Reserved(0x0100_0000)));
        assert_eq!(frame_len(0), 8);
        assert_eq!(frame_len(1), 16);
        assert_eq!(frame_len(MAX_PAYLOAD_LEN), MAX_FRAME_LEN);
    }
}
