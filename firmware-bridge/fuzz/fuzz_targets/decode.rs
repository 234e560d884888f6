//! The frame decoder on arbitrary input, for both directions' message types.
//!
//! Each input is used twice:
//!
//! 1. as a raw byte stream fed to a [`Decoder`], which must never panic (corruption,
//!    truncation, oversize frames, COBS errors);
//! 2. as a message body: framed with a correct CRC-32C and COBS, then fed to a `Decoder`.
//!    Random bytes almost never carry a valid CRC, so without this the fuzzer would not get
//!    past the CRC check into postcard's decoding of the message types.
//!
//! Every message that decodes must re-encode into a well-formed frame that decodes again
//! to a message with the same encoding (compared as bytes, since NaN != NaN), and a
//! reading's `reading_seq` must be its `seq`.

#![no_main]

use core::fmt::Debug;

use firmware_bridge::frame::Message;
use firmware_bridge::{encode, Decoder, DeviceMessage, GatewayMessage, MAX_FRAME, MAX_PAYLOAD};
use libfuzzer_sys::fuzz_target;

const CRC: crc::Crc<u32> = crc::Crc::<u32>::new(&crc::CRC_32_ISCSI);

fuzz_target!(|data: &[u8]| {
    stream::<DeviceMessage>(data);
    stream::<GatewayMessage>(data);

    // A little past the largest body a frame can carry, so both sides of the limit are hit.
    let body = &data[..data.len().min(MAX_PAYLOAD + 4)];
    let framed = frame_body(body);
    stream::<DeviceMessage>(&framed);
    stream::<GatewayMessage>(&framed);

    // A reading's seq reads the same without decoding the rest of it.
    let seq = firmware_bridge::reading_seq(body);
    if let Ok(DeviceMessage::Reading(r)) = firmware_bridge::decode_message::<DeviceMessage>(body) {
        assert_eq!(seq, Some(r.seq), "reading_seq of {body:02x?}");
    }
});

/// Feeds `bytes` to a fresh decoder and checks every message that comes out.
fn stream<M: Message + Debug>(bytes: &[u8]) {
    let mut decoder = Decoder::new();
    decoder.feed(bytes, |r: Result<M, _>| {
        if let Ok(m) = r {
            round_trip(&m);
        }
    });
}

/// encode(decode(encode(m))) == encode(m), and the frame is well formed.
fn round_trip<M: Message + Debug>(m: &M) {
    let mut first = [0u8; MAX_FRAME];
    let n = encode(m, &mut first).expect("a decoded message re-encodes");
    let first = &first[..n];
    assert_eq!(first.last(), Some(&0), "a frame ends with its delimiter");
    assert!(
        !first[..n - 1].contains(&0),
        "no 0x00 inside a frame: {first:02x?}"
    );

    let mut got = None;
    let mut frames = 0;
    Decoder::new().feed(first, |r: Result<M, _>| {
        frames += 1;
        got = Some(r);
    });
    assert_eq!(frames, 1, "one frame in, one message out");
    let back = got
        .expect("one frame")
        .unwrap_or_else(|e| panic!("re-encoded {m:?} does not decode: {e:?}"));

    let mut second = [0u8; MAX_FRAME];
    let k = encode(&back, &mut second).expect("re-encodes");
    assert_eq!(
        first,
        &second[..k],
        "encode(decode(encode(m))) != encode(m) for {m:?}"
    );
}

/// `body ++ CRC-32C(body)`, COBS-encoded and delimited, as a sender would frame it.
fn frame_body(body: &[u8]) -> Vec<u8> {
    let mut raw = body.to_vec();
    raw.extend(CRC.checksum(body).to_le_bytes());
    let mut out = vec![0u8; cobs::max_encoding_length(raw.len()) + 1];
    let n = cobs::encode(&raw, &mut out);
    out.truncate(n);
    out.push(0);
    out
}
