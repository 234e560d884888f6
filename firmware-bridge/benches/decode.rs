//! Decoder and encoder throughput for a typical reading (about 40 bytes on the wire):
//! `cargo bench -p firmware-bridge --bench decode`. Results in BENCHMARKS.md. The
//! baseline in the same run is a bare CRC-32C over the same bytes, the floor any checked
//! decoder pays.

// criterion_group! defines an undocumented function.
#![allow(missing_docs)]

use criterion::{black_box, criterion_group, criterion_main, Criterion, Throughput};
use firmware_bridge::{encode, Channel, Decoder, DeviceMessage, Reading, Timestamp, MAX_FRAME};

const FRAMES: usize = 1000;

fn reading(seq: u32) -> DeviceMessage {
    let mut channels = heapless::Vec::new();
    for (id, value) in [(1, 21.5), (2, 48.25), (3, 1013.2), (4, -3.5)] {
        let _ = channels.push(Channel { id, value });
    }
    DeviceMessage::Reading(Reading {
        seq,
        time: Timestamp::UnixMs(1_800_000_000_000 + u64::from(seq)),
        fix: None,
        channels,
        boot: Some(7),
    })
}

fn frames(c: &mut Criterion) {
    let mut stream = Vec::new();
    let mut buf = [0u8; MAX_FRAME];
    for seq in 0..FRAMES as u32 {
        let n = encode(&reading(100_000 + seq), &mut buf).expect("encode");
        stream.extend_from_slice(&buf[..n]);
    }
    let per_frame = stream.len() / FRAMES;
    let mut g = c.benchmark_group(format!("frames of {per_frame} bytes"));
    g.throughput(Throughput::Elements(FRAMES as u64));
    g.bench_function("decode", |b| {
        let mut d = Decoder::new();
        b.iter(|| {
            let mut ok = 0;
            d.feed::<DeviceMessage>(black_box(&stream), |r| ok += usize::from(r.is_ok()));
            assert_eq!(ok, FRAMES);
        })
    });
    g.bench_function("baseline: CRC-32C over the same bytes", |b| {
        let crc = crc::Crc::<u32>::new(&crc::CRC_32_ISCSI);
        b.iter(|| black_box(crc.checksum(black_box(&stream))))
    });
    let msgs: Vec<_> = (0..FRAMES as u32).map(reading).collect();
    g.bench_function("encode", |b| {
        b.iter(|| {
            for m in &msgs {
                black_box(encode(black_box(m), &mut buf).expect("encode"));
            }
        })
    });
    g.finish();
}

criterion_group!(benches, frames);
criterion_main!(benches);
