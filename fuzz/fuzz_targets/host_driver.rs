//! The daemon's VM driver against a guest the input plays (`ring_protocol_fuzz::driver`):
//! well-formed and malformed messages, replies of every kind to any request id, reused
//! execution ids, output floods, garbage frames, header pokes and silence, with API requests
//! and time passing between them. Nothing may panic, the driver must stay within its budget
//! after every step, and every execution recorded must end once the guest goes silent.
#![no_main]

use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    ring_protocol_fuzz::driver::run(data);
});
