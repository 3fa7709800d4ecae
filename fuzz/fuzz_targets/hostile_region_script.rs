//! A peer that keeps changing the region while both ends use it: the input is a script (see
//! `ring_protocol_fuzz::script`) of channel operations by a host and a guest, interleaved
//! with header words and ring bytes the peer overwrites between operations and in the middle
//! of them. Nothing may panic, hang or touch memory outside the region, and after the script
//! a host that forces a reset must get a working channel back.
#![no_main]

use libfuzzer_sys::fuzz_target;
use ring_protocol_fuzz::script::World;

fuzz_target!(|data: &[u8]| {
    World::new().run_script(data);
});
