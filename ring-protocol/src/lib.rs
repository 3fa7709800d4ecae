//! The Portless channel: how a host process and the agent in a guest talk through a region of
//! memory that the hypervisor maps on both sides, with no network.
//!
//! - [`layout`]: where the header words and the two rings live, and how a header read from
//!   the peer is validated.
//! - [`region`]: the only way this crate touches shared memory (atomic words, volatile
//!   copies), and the crate's only `unsafe` code.
//! - [`ring`]: single-producer single-consumer rings of length-prefixed frames, with
//!   notification suppression so that a side is woken only when it waits.
//! - [`message`]: the postcard-encoded messages both sides exchange.
//! - [`channel`]: the host's and the guest's ends, with the attach and reset handshakes.
//!
//! The peer is not trusted: every index and length it writes is loaded once, checked and
//! copied into private memory before use. Bad state is an error the caller recovers from by
//! resetting the channel, never a panic, a hang or an out-of-bounds access.
//!
//! The crate is `no_std` and never allocates. PROTOCOL.md next to this crate specifies the
//! byte layout and the messages precisely enough for a second implementation.
#![no_std]
#![cfg_attr(
    not(test),
    deny(
        clippy::indexing_slicing,
        clippy::unwrap_used,
        clippy::expect_used,
        clippy::panic
    )
)]

#[cfg(any(test, feature = "std"))]
extern crate std;

pub mod channel;
pub mod frame;
pub mod layout;
pub mod message;
pub mod region;
pub mod ring;

pub use channel::{
    AttachError, ChannelError, Endpoint, Guest, GuestEndpoint, Host, HostEndpoint, RecvError, Role,
};
pub use frame::{FrameBuf, MAX_FRAME_LEN, MAX_PAYLOAD_LEN};
pub use layout::{Direction, Layout, LayoutError};
pub use message::{AgentToHost, HostToAgent};
pub use region::{MappedRegion, RegionError, SharedMemory};
pub use ring::{RingError, SendError, Start};

#[cfg(any(test, feature = "std"))]
pub use region::HeapRegion;

/// A zeroed buffer for one received frame.
pub const fn frame_buf() -> FrameBuf {
    [0; MAX_PAYLOAD_LEN]
}
