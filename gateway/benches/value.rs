//! The Kafka value of an event (criterion). Run: `cargo bench -p gateway --bench value`.
//!
//! - `value/json_same_day`: the JSON value (`edge-gateway.event.v1`) of an event whose
//!   time and receipt time fall on one day, as with a device clock that is right.
//! - `value/json_two_days`: the same with the event time on another day than the receipt
//!   time (a device clock that is off, or the gateway benchmark's fixed timestamps).
//! - `value/rfc3339`: one timestamp alone, a new second each time.
//!
//! Results: BENCHMARKS.md ("The Kafka value").

// criterion_group! defines an undocumented function.
#![allow(missing_docs)]

use std::hint::black_box;

use criterion::{criterion_group, criterion_main, Criterion};
use gateway::event::{write_rfc3339, ClockQuality, Event, Fields, Location, Value};
use gateway::sinks::event_json::event_json_bytes;

/// 2026-12-02T12:00:00.123456789Z
const NOON: i64 = 1_796_212_800_123_456_789;

fn event(time_ns: i64, received_ns: i64) -> Event {
    Event {
        id: "dev-07:123456".into(),
        device: "dev-07".into(),
        source: "site".into(),
        origin: "sensors/dev-07/telemetry".into(),
        time_ns,
        clock: ClockQuality::Device,
        received_ns,
        location: Some(Location {
            lat: 52.0007,
            lon: 13.123456,
            alt: None,
            accuracy: None,
        }),
        readings: Fields::from([("temperature".into(), Value::Number(21.37))]),
        tags: Fields::new(),
        route: None,
        redelivered: false,
    }
}

fn value(c: &mut Criterion) {
    let mut g = c.benchmark_group("value");
    let same = event(NOON - 80_000_000, NOON);
    g.bench_function("json_same_day", |b| {
        b.iter(|| black_box(event_json_bytes(black_box(&same))))
    });
    let apart = event(NOON - 40 * 86_400_000_000_000, NOON);
    g.bench_function("json_two_days", |b| {
        b.iter(|| black_box(event_json_bytes(black_box(&apart))))
    });
    let mut out = Vec::with_capacity(64);
    let mut ns = NOON;
    g.bench_function("rfc3339", |b| {
        b.iter(|| {
            ns += 1_000_000_007;
            out.clear();
            write_rfc3339(black_box(ns), &mut out);
            black_box(out.len())
        })
    });
    g.finish();
}

criterion_group!(benches, value);
criterion_main!(benches);
