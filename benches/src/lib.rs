//! Set-up shared by the Portless criterion benchmarks in `benches/` (see README.md): a region
//! in ordinary memory and the two ends of a channel over it, the guest attaching the way an
//! agent does, by retrying until the host has made the region ready.

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
