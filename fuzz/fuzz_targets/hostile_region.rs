//! A peer that wrote anything it liked into the region before this side looked: the input is
//! a region image (see `ring_protocol_fuzz::image`). A guest attaches to it (once per start
//! mode) and a host resumes it (or creates it again when it cannot); each then runs every
//! operation of the channel. Nothing may panic, hang or touch memory outside the region (the
//! region's accessors assert that in fuzz builds), and a host that forces a reset must get a
//! working channel back.
#![no_main]

use libfuzzer_sys::fuzz_target;
use ring_protocol::{GuestEndpoint, HeapRegion, HostEndpoint, Start};
use ring_protocol_fuzz::exercise;
use ring_protocol_fuzz::image::{self, REGION_SIZE};

fuzz_target!(|data: &[u8]| {
    for start in [Start::Resume, Start::SkipPending] {
        let region = HeapRegion::new(REGION_SIZE);
        image::load(&*region, data);
        if let Ok(guest) = GuestEndpoint::attach(&*region, 2, start, None) {
            exercise::guest(&*region, guest);
        }
    }

    let region = HeapRegion::new(REGION_SIZE);
    image::load(&*region, data);
    let host = match HostEndpoint::resume(&*region, 3) {
        Ok(host) => host,
        Err(_) => {
            HostEndpoint::create(&*region, 3).expect("any region of a valid size can be created")
        }
    };
    exercise::host(&*region, host);
});
