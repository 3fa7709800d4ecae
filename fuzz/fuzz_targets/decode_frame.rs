//! Decodes arbitrary bytes as a frame header and as a message of either direction: decoding
//! must never panic, and whatever decodes must re-encode to something that decodes to the
//! same message (and re-encodes to the same bytes).
#![no_main]

use libfuzzer_sys::fuzz_target;
use ring_protocol::MAX_PAYLOAD_LEN;
use ring_protocol::frame::{self, FRAME_HEADER_LEN};
use ring_protocol::message::{self, AgentToHost, HostToAgent};

fuzz_target!(|data: &[u8]| {
    if let Some(header) = data.first_chunk::<FRAME_HEADER_LEN>()
        && let Ok(len) = frame::decode_header(*header)
    {
        assert!(len <= MAX_PAYLOAD_LEN);
        let len = u32::try_from(len).expect("a payload length fits in u32");
        assert_eq!(&frame::encode_header(len), header);
    }
    // Payloads come out of frames, so only those fit in one must survive a round trip.
    if data.len() <= MAX_PAYLOAD_LEN {
        if let Ok(msg) = message::decode::<HostToAgent<'_>>(data) {
            host_to_agent_round_trip(&msg, data.len());
        }
        if let Ok(msg) = message::decode::<AgentToHost<'_>>(data) {
            agent_to_host_round_trip(&msg, data.len());
        }
    } else {
        let _ = message::decode::<HostToAgent<'_>>(data);
        let _ = message::decode::<AgentToHost<'_>>(data);
    }
});

fn host_to_agent_round_trip(msg: &HostToAgent<'_>, input_len: usize) {
    let mut buf = [0u8; MAX_PAYLOAD_LEN];
    let encoded = message::encode(msg, &mut buf).expect("a decoded message re-encodes");
    assert!(encoded.len() <= input_len, "re-encoding grew the message");
    let again: HostToAgent<'_> = message::decode(encoded).expect("a re-encoding decodes");
    assert_eq!(&again, msg);
    let mut buf2 = [0u8; MAX_PAYLOAD_LEN];
    let encoded_again = message::encode(&again, &mut buf2).expect("re-encodes");
    assert_eq!(encoded_again, encoded, "encoding is not canonical");
}

fn agent_to_host_round_trip(msg: &AgentToHost<'_>, input_len: usize) {
    let mut buf = [0u8; MAX_PAYLOAD_LEN];
    let encoded = message::encode(msg, &mut buf).expect("a decoded message re-encodes");
    assert!(encoded.len() <= input_len, "re-encoding grew the message");
    let again: AgentToHost<'_> = message::decode(encoded).expect("a re-encoding decodes");
    assert_eq!(&again, msg);
    let mut buf2 = [0u8; MAX_PAYLOAD_LEN];
    let encoded_again = message::encode(&again, &mut buf2).expect("re-encodes");
    assert_eq!(encoded_again, encoded, "encoding is not canonical");
}
