//! Golden bytes pin the wire format; property tests cover round trips and hostile input.

use super::*;
use crate::message::*;
use proptest::prelude::*;

fn hex(b: &[u8]) -> std::string::String {
    b.iter()
        .map(|x| format!("{x:02x}"))
        .collect::<Vec<_>>()
        .join(" ")
}

fn frame<M: Message>(m: &M) -> std::vec::Vec<u8> {
    let mut out = [0u8; MAX_FRAME];
    let n = encode(m, &mut out).expect("encode");
    out[..n].to_vec()
}

/// Every frame in `bytes`, through a fresh decoder.
fn decode_all<M: Message>(bytes: &[u8]) -> std::vec::Vec<Decoded<M>> {
    let mut d = Decoder::new();
    let mut out = std::vec::Vec::new();
    d.feed(bytes, |r| out.push(r));
    out
}

/// The golden check: `m` encodes to exactly `expected` (hex) and decodes back to `m`.
fn check<M: Message + PartialEq + core::fmt::Debug>(m: M, expected: &str) {
    let f = frame(&m);
    assert_eq!(hex(&f), expected, "{m:?}");
    assert_eq!(decode_all::<M>(&f), [Ok(m)]);
}

fn hello() -> DeviceMessage {
    DeviceMessage::Hello(Hello {
        device_id: "pump-7".try_into().unwrap(),
        firmware: "1.4.2".try_into().unwrap(),
        protocol: 1,
        capabilities: Capabilities(Capabilities::CLOCK | Capabilities::GNSS),
        boot: 42,
        resume_from: 295,
    })
}

fn reading() -> DeviceMessage {
    let mut channels = heapless::Vec::new();
    channels.push(Channel { id: 1, value: 21.5 }).unwrap();
    channels
        .push(Channel {
            id: 2,
            value: -0.25,
        })
        .unwrap();
    DeviceMessage::Reading(Reading {
        seq: 300,
        time: Timestamp::UnixMs(1_800_000_000_123),
        fix: Some(Fix {
            lat_e7: 525_200_066,
            lon_e7: 134_049_540,
            alt_cm: Some(3_400),
            accuracy_cm: Some(250),
            hdop_centi: None,
            quality: FixQuality::Fix3d,
        }),
        channels,
        boot: Some(42),
    })
}

/// [`reading`] as a version 1 device sends it: without `boot`.
fn reading_v1() -> DeviceMessage {
    match reading() {
        DeviceMessage::Reading(r) => DeviceMessage::Reading(Reading { boot: None, ..r }),
        _ => unreachable!(),
    }
}

#[test]
fn golden_device_messages() {
    check(
        hello(),
        "01 17 06 70 75 6d 70 2d 37 05 31 2e 34 2e 32 01 03 2a a7 02 7e 6e 6e b4 00",
    );
    // Protocol version 2: `boot` (42) after the channels.
    check(reading(), "04 01 ac 02 17 fb a0 f1 c2 b1 34 01 84 ab ef f4 03 88 bc eb 7f 01 90 35 01 fa 01 04 02 02 01 01 04 ac 41 02 01 08 80 be 2a 27 64 12 1d 00");
    check(
        DeviceMessage::Reading(Reading {
            seq: 0,
            time: Timestamp::UptimeMs(5_000),
            fix: None,
            channels: heapless::Vec::new(),
            boot: Some(42),
        }),
        "02 01 04 01 88 27 01 06 2a de 70 9b 04 00",
    );
    // Version 1: the same readings without `boot`, byte for byte what version 1 wrote.
    check(reading_v1(), "04 01 ac 02 17 fb a0 f1 c2 b1 34 01 84 ab ef f4 03 88 bc eb 7f 01 90 35 01 fa 01 04 02 02 01 01 04 ac 41 02 01 07 80 be c4 4b 20 27 00");
    check(
        DeviceMessage::Reading(Reading {
            seq: 0,
            time: Timestamp::UptimeMs(5_000),
            fix: None,
            channels: heapless::Vec::new(),
            boot: None,
        }),
        "02 01 04 01 88 27 01 05 ad 1c 7c da 00",
    );
    check(
        DeviceMessage::Heartbeat(Heartbeat {
            uptime_ms: 60_000,
            unacked: 3,
        }),
        "0a 02 e0 d4 03 03 59 5e fa 9e 00",
    );
    check(
        DeviceMessage::Error(Log {
            level: Level::Error,
            code: 7,
            text: "sensor 2 open".try_into().unwrap(),
        }),
        "16 04 03 07 0d 73 65 6e 73 6f 72 20 32 20 6f 70 65 6e fd e3 e0 17 00",
    );
}

#[test]
fn golden_gateway_messages() {
    check(
        GatewayMessage::Ack {
            boot: 42,
            up_to: 300,
        },
        "01 08 2a ac 02 73 17 f0 68 00",
    );
    check(
        GatewayMessage::TimeSync {
            unix_ms: 1_800_000_000_000,
        },
        "0c 01 80 a0 f1 c2 b1 34 9a 03 46 fc 00",
    );
    check(
        GatewayMessage::Configure(Configure {
            sample_interval_ms: 1_000,
            heartbeat_interval_ms: 10_000,
        }),
        "0a 02 e8 07 90 4e 52 85 c2 b0 00",
    );
    check(
        GatewayMessage::Resend {
            boot: 42,
            from: 11,
            count: 2,
        },
        "09 03 2a 0b 02 f4 4e f7 f4 00",
    );
}

#[test]
fn frame_size_limits() {
    // 256 bytes of body + 4 of CRC, COBS adds 2, the delimiter 1 (WIRE-FORMAT.md).
    assert_eq!(MAX_FRAME, 263);
}

#[test]
fn no_zero_inside_a_frame() {
    let f = frame(&reading());
    assert_eq!(f.iter().position(|&b| b == 0), Some(f.len() - 1));
}

#[test]
fn a_corrupted_byte_is_a_crc_error_and_the_next_frame_decodes() {
    let mut bytes = frame(&hello());
    bytes[5] ^= 0x10;
    bytes.extend(frame(&reading()));
    let got = decode_all::<DeviceMessage>(&bytes);
    assert_eq!(got.len(), 2);
    assert!(matches!(got[0], Err(FrameError::Crc | FrameError::Cobs)));
    assert_eq!(got[1], Ok(reading()));
}

#[test]
fn truncated_frames_and_garbage_between_frames() {
    let full = frame(&reading());
    let mut bytes = full[..full.len() / 2].to_vec(); // cut off, delimiter lost
    bytes.push(0);
    bytes.extend([0x13, 0x37, 0xff, 0x00, 0x00, 0x00]);
    bytes.extend(&full);
    let got = decode_all::<DeviceMessage>(&bytes);
    assert_eq!(got.last(), Some(&Ok(reading())));
    assert!(got[..got.len() - 1].iter().all(Result::is_err));
}

#[test]
fn an_unknown_message_type_is_reported_not_misread() {
    // A newer sender's type 9 with a correct CRC.
    let body = [9u8, 1, 2, 3];
    let mut raw = body.to_vec();
    raw.extend(CRC.checksum(&body).to_le_bytes());
    let mut f = [0u8; 32];
    let n = cobs::encode(&raw, &mut f);
    f[n] = 0;
    assert_eq!(
        decode_all::<DeviceMessage>(&f[..=n]),
        [Err(FrameError::UnknownType(9))]
    );
}

#[test]
fn fields_appended_by_a_newer_sender_are_ignored() {
    let mut raw = [0u8; MAX_PAYLOAD];
    let mut body = postcard::to_slice(&hello(), &mut raw).unwrap().to_vec();
    body.extend([0x05, 0x06]); // a future optional field
    let mut r = body.clone();
    r.extend(CRC.checksum(&body).to_le_bytes());
    let mut f = [0u8; MAX_FRAME];
    let n = cobs::encode(&r, &mut f);
    assert_eq!(decode_frame::<DeviceMessage>(&mut f[..n]), Ok(hello()));
}

/// A frame around `body` with `extra` appended (fields of a newer sender).
fn with_appended(m: &DeviceMessage, extra: &[u8]) -> std::vec::Vec<u8> {
    let mut raw = [0u8; MAX_PAYLOAD];
    let mut body = postcard::to_slice(m, &mut raw).unwrap().to_vec();
    body.extend(extra);
    let mut r = body.clone();
    r.extend(CRC.checksum(&body).to_le_bytes());
    let mut f = [0u8; MAX_FRAME];
    let n = cobs::encode(&r, &mut f);
    f[n] = 0;
    f[..=n].to_vec()
}

#[test]
fn a_version_2_reading_reads_with_fields_a_later_version_appends() {
    let f = with_appended(&reading(), &[0x05, 0x06]);
    assert_eq!(decode_all::<DeviceMessage>(&f), [Ok(reading())]);
    // A version 1 reading with nothing appended reads without `boot` (the golden test
    // above has its bytes).
    assert_eq!(
        decode_all::<DeviceMessage>(&frame(&reading_v1())),
        [Ok(reading_v1())]
    );
}

#[test]
fn a_version_1_receiver_reads_a_version_2_reading() {
    // Version 1's `Reading`, as a gateway built before version 2 decodes it.
    #[derive(serde::Deserialize, Debug, PartialEq)]
    struct ReadingV1 {
        seq: u32,
        time: Timestamp,
        fix: Option<Fix>,
        channels: heapless::Vec<Channel, MAX_CHANNELS>,
    }
    #[derive(serde::Deserialize, Debug, PartialEq)]
    enum DeviceMessageV1 {
        Hello(Hello),
        Reading(ReadingV1),
    }
    let DeviceMessage::Reading(r) = reading() else {
        unreachable!()
    };
    let mut raw = [0u8; MAX_PAYLOAD];
    let body = postcard::to_slice(&reading(), &mut raw).unwrap();
    let old: DeviceMessageV1 = postcard::from_bytes(body).unwrap();
    assert_eq!(
        old,
        DeviceMessageV1::Reading(ReadingV1 {
            seq: r.seq,
            time: r.time,
            fix: r.fix,
            channels: r.channels,
        })
    );
}

#[test]
fn an_endless_frame_is_dropped_as_oversize() {
    let mut bytes = std::vec![0x41u8; MAX_FRAME * 3];
    bytes.push(0);
    bytes.extend(frame(&hello()));
    assert_eq!(
        decode_all::<DeviceMessage>(&bytes),
        [Err(FrameError::Oversize), Ok(hello())]
    );
}

#[test]
fn the_largest_message_fits() {
    let mut channels = heapless::Vec::new();
    for id in 0..MAX_CHANNELS as u16 {
        channels
            .push(Channel {
                id: u16::MAX - id,
                value: f32::MIN,
            })
            .unwrap();
    }
    let m = DeviceMessage::Reading(Reading {
        seq: u32::MAX,
        time: Timestamp::UnixMs(u64::MAX),
        fix: Some(Fix {
            lat_e7: i32::MIN,
            lon_e7: i32::MIN,
            alt_cm: Some(i32::MIN),
            accuracy_cm: Some(u32::MAX),
            hdop_centi: Some(u16::MAX),
            quality: FixQuality::RtkFloat,
        }),
        channels,
        boot: Some(u32::MAX),
    });
    assert_eq!(decode_all::<DeviceMessage>(&frame(&m)), [Ok(m)]);
    let log = DeviceMessage::Log(Log {
        level: Level::Warn,
        code: u16::MAX,
        text: core::str::from_utf8(&[b'x'; MAX_TEXT])
            .unwrap()
            .try_into()
            .unwrap(),
    });
    assert_eq!(decode_all::<DeviceMessage>(&frame(&log)), [Ok(log)]);
}

fn arb_fix() -> impl Strategy<Value = Fix> {
    (
        any::<i32>(),
        any::<i32>(),
        any::<Option<i32>>(),
        any::<Option<u32>>(),
        any::<Option<u16>>(),
        0..6u8,
    )
        .prop_map(|(lat_e7, lon_e7, alt_cm, accuracy_cm, hdop_centi, q)| Fix {
            lat_e7,
            lon_e7,
            alt_cm,
            accuracy_cm,
            hdop_centi,
            quality: [
                FixQuality::None,
                FixQuality::Fix2d,
                FixQuality::Fix3d,
                FixQuality::Dgps,
                FixQuality::RtkFixed,
                FixQuality::RtkFloat,
            ][q as usize],
        })
}

fn arb_device_message() -> impl Strategy<Value = DeviceMessage> {
    let reading = (
        any::<u32>(),
        any::<bool>(),
        any::<u64>(),
        proptest::option::of(arb_fix()),
        proptest::collection::vec((any::<u16>(), any::<f32>()), 0..=MAX_CHANNELS),
        any::<Option<u32>>(),
    )
        .prop_map(|(seq, unix, t, fix, ch, boot)| {
            DeviceMessage::Reading(Reading {
                seq,
                time: if unix {
                    Timestamp::UnixMs(t)
                } else {
                    Timestamp::UptimeMs(t)
                },
                fix,
                channels: ch
                    .into_iter()
                    .map(|(id, value)| Channel { id, value })
                    .collect(),
                boot,
            })
        });
    let hello = (
        "[a-z0-9-]{1,32}",
        "[0-9.]{0,16}",
        any::<u16>(),
        any::<u32>(),
        any::<u32>(),
        any::<u32>(),
    )
        .prop_map(|(id, fw, protocol, caps, boot, resume_from)| {
            DeviceMessage::Hello(Hello {
                device_id: id.as_str().try_into().unwrap(),
                firmware: fw.as_str().try_into().unwrap(),
                protocol,
                capabilities: Capabilities(caps),
                boot,
                resume_from,
            })
        });
    let heartbeat = (any::<u64>(), any::<u16>()).prop_map(|(uptime_ms, unacked)| {
        DeviceMessage::Heartbeat(Heartbeat { uptime_ms, unacked })
    });
    let log = (0..4u8, any::<u16>(), "[ -~]{0,96}").prop_map(|(l, code, text)| {
        let level = [Level::Debug, Level::Info, Level::Warn, Level::Error][l as usize];
        DeviceMessage::Log(Log {
            level,
            code,
            text: text.as_str().try_into().unwrap(),
        })
    });
    prop_oneof![reading, hello, heartbeat, log]
}

/// NaN != NaN: compare the encodings instead of the values.
fn same(a: &DeviceMessage, b: &DeviceMessage) -> bool {
    frame(a) == frame(b)
}

/// A reading as a newer firmware might send it: a `Timestamp` variant this version does
/// not know (2) in place of `UnixMs` (0), framed with a good CRC.
fn newer_reading() -> (std::vec::Vec<u8>, std::vec::Vec<u8>) {
    let mut body = postcard::to_allocvec(&reading()).expect("postcard");
    // Type 1, seq 300 (ac 02), then the timestamp's variant index.
    assert_eq!(&body[..4], &[0x01, 0xac, 0x02, 0x00]);
    body[3] = 0x02;
    let mut out = [0u8; MAX_FRAME];
    let n = encode_raw(&body, &mut out).expect("frame");
    (body, out[..n].to_vec())
}

#[test]
fn a_reading_that_does_not_decode_is_still_known_by_its_seq() {
    let (body, wire) = newer_reading();
    assert_eq!(
        decode_all::<DeviceMessage>(&wire),
        [Err(FrameError::Malformed)]
    );
    let mut d = Decoder::new();
    let mut checked = std::vec::Vec::new();
    for &b in &wire {
        if let Some(r) = d.push_checked(b) {
            checked.push(r.map(<[u8]>::to_vec));
        }
    }
    assert_eq!(
        checked,
        [Ok(body.clone())],
        "the message's bytes, CRC cut off"
    );
    assert_eq!(reading_seq(&body), Some(300));
    assert_eq!(
        decode_message::<DeviceMessage>(&body),
        Err(FrameError::Malformed)
    );
    // Other messages have no seq to read; a good reading's is its own.
    let hello = postcard::to_allocvec(&hello()).expect("postcard");
    assert_eq!(reading_seq(&hello), None);
    let good = postcard::to_allocvec(&reading()).expect("postcard");
    assert_eq!(reading_seq(&good), Some(300));
    // Cut short, or a seq past u32: none.
    assert_eq!(reading_seq(&[0x01]), None);
    assert_eq!(reading_seq(&[0x01, 0xff, 0xff, 0xff, 0xff, 0x1f]), None);
    assert_eq!(
        reading_seq(&[0x01, 0xff, 0xff, 0xff, 0xff, 0x0f]),
        Some(u32::MAX)
    );
}

#[test]
fn raw_framing_is_the_framing_of_encode() {
    let m = reading();
    let body = postcard::to_allocvec(&m).expect("postcard");
    let mut out = [0u8; MAX_FRAME];
    let n = encode_raw(&body, &mut out).expect("frame");
    assert_eq!(out[..n], frame(&m)[..]);
    assert_eq!(
        encode_raw(&[0u8; MAX_PAYLOAD + 1], &mut out),
        Err(FrameError::TooLarge)
    );
}

proptest! {
    #[test]
    fn decode_of_encode_is_identity(m in arb_device_message()) {
        let got = decode_all::<DeviceMessage>(&frame(&m));
        prop_assert_eq!(got.len(), 1);
        let back = got[0].clone().expect("decodes");
        prop_assert!(same(&back, &m));
    }

    #[test]
    fn arbitrary_bytes_never_panic(bytes in proptest::collection::vec(any::<u8>(), 0..2048)) {
        let _ = decode_all::<DeviceMessage>(&bytes);
        let _ = decode_all::<GatewayMessage>(&bytes);
    }

    #[test]
    fn after_any_garbage_the_decoder_resynchronises(
        garbage in proptest::collection::vec(any::<u8>(), 0..600),
        msgs in proptest::collection::vec(arb_device_message(), 1..5),
    ) {
        let mut bytes = garbage;
        bytes.push(0);
        for m in &msgs {
            bytes.extend(frame(m));
        }
        let got = decode_all::<DeviceMessage>(&bytes);
        let tail = &got[got.len() - msgs.len()..];
        for (g, m) in tail.iter().zip(&msgs) {
            prop_assert!(same(g.as_ref().expect("resynchronised"), m));
        }
    }
}
