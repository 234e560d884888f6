//! The MQTT/serial JSON payload decoder (criterion). Run:
//! `cargo bench -p gateway --bench decode`.
//!
//! - `decode/one_pass`: [`Decoder::decode`] with the default mapping, the way an input
//!   decodes: the object read in one pass, its members taken as they are parsed.
//! - `decode/document`: the same payload through [`Decoder::decode_via_document`]: parsed
//!   into a document first, then mapped (what a mapping with dotted names needs). The
//!   baseline for `one_pass`, in the same run.
//!
//! The payload is the gateway benchmark's (`gateway-bench`): device, seq, time, one
//! reading, lat/lon, with the device also in the topic. Results: BENCHMARKS.md ("The
//! payload decoder").

// criterion_group! defines an undocumented function.
#![allow(missing_docs)]

use std::hint::black_box;

use criterion::{criterion_group, criterion_main, Criterion};
use gateway::sources::payload::{Decoder, Origin};
use gateway_config::{JsonMapping, PayloadFormat};

const PAYLOAD: &[u8] = br#"{"device":"dev-07","seq":123456,"ts":1800000001234,"temperature":21.37,"lat":52.0007,"lon":13.123456}"#;

fn decode(c: &mut Criterion) {
    let d = Decoder::new(PayloadFormat::Json, &JsonMapping::default());
    let origin = Origin {
        source: "site",
        topic: "sensors/dev-07/telemetry",
        captures: &[("device", "dev-07")],
        received_ns: 1_796_212_800_123_456_789,
    };
    assert_eq!(
        d.decode(&origin, PAYLOAD),
        d.decode_via_document(&origin, PAYLOAD),
        "both ways decode the same event"
    );
    let mut g = c.benchmark_group("decode");
    g.bench_function("one_pass", |b| {
        b.iter(|| black_box(d.decode(&origin, black_box(PAYLOAD))))
    });
    g.bench_function("document", |b| {
        b.iter(|| black_box(d.decode_via_document(&origin, black_box(PAYLOAD))))
    });
    g.finish();
}

criterion_group!(benches, decode);
criterion_main!(benches);
