//! A VM driver run pass by pass in the caller's thread, over an anonymous region, with the
//! time given by the caller: for the fuzz target and the tests that check the driver's
//! invariants (what a guest can make it hold, and that every record ends) without threads
//! or clocks in the way.

use std::time::Instant;

use tokio::sync::broadcast;

use super::driver::Driver;
use super::{ChannelKind, VmEvent, VmHandle, VmSettings};
use crate::records::Writer;
use crate::vm::memory::GuestRegion;

/// What a driver holds for its guest now, to compare with its budget.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct Footprint {
    /// Bytes of encoded messages waiting for room in the ring.
    pub queued_bytes: usize,
    /// Requests sent and not answered, requests waiting for a ready agent, and pushes
    /// waiting or being streamed.
    pub in_flight: usize,
    /// Commands of the listing in progress.
    pub listing_entries: usize,
    /// Their bytes, as the budget counts them.
    pub listing_bytes: usize,
    /// Output bytes on their way to the records (building and in flight).
    pub batch_bytes: usize,
    /// Executions mapped as running.
    pub running: usize,
}

/// A driver stepped by hand.
pub struct SteppedDriver {
    driver: Driver,
    handle: VmHandle,
}

impl SteppedDriver {
    /// A driver for a plain channel of `size` bytes (created, zeroed) with `settings`,
    /// writing through `writer`; also a second mapping of the same memory, for the guest.
    pub fn new(
        settings: VmSettings,
        size: usize,
        writer: Writer,
    ) -> std::io::Result<(Self, GuestRegion)> {
        let file = crate::vm::ivshmem::memfd(size)?;
        let guest = GuestRegion::from_file(file.try_clone()?, size)?;
        let host = GuestRegion::from_file(file, size)?;
        let (handle, rx) = VmHandle::new(&settings.name)?;
        let (wake, status) = (handle.wake.clone(), handle.status.clone());
        let (events, _) = broadcast::channel::<VmEvent>(16);
        let mut driver = Driver::new(
            settings,
            ChannelKind::Plain(host),
            writer,
            events,
            rx,
            wake,
            status,
        );
        if !driver.open(Instant::now()) {
            return Err(std::io::Error::other("the region could not be opened"));
        }
        Ok((Self { driver, handle }, guest))
    }

    /// The API's end of the driver.
    pub fn handle(&self) -> &VmHandle {
        &self.handle
    }

    /// One pass at time `now`; whether anything happened.
    pub fn step(&mut self, now: Instant) -> bool {
        self.driver.step(now).unwrap_or(false)
    }

    /// When the driver wants to run again if nothing wakes it.
    pub fn next_wake(&self) -> Instant {
        self.driver.next_wake()
    }

    /// What the driver holds now.
    pub fn footprint(&self) -> Footprint {
        let d = &self.driver;
        Footprint {
            queued_bytes: d.outbox_bytes,
            in_flight: d.pending.len()
                + d.queue.len()
                + d.pushes.len()
                + usize::from(d.streaming.is_some()),
            listing_entries: d.listing.as_ref().map_or(0, |l| l.entries.len()),
            listing_bytes: d.listing.as_ref().map_or(0, |l| l.bytes),
            batch_bytes: d.batches.bytes(),
            running: d.running.len(),
        }
    }

    /// Stops as the daemon does: answers what waits and writes what was decided.
    pub fn shut_down(mut self) {
        self.driver.shut_down();
    }
}
