//! Stage library throughput (criterion). Run: `cargo bench -p gateway --bench stages`.
//!
//! - `chain/typical`: validate → filter (CEL) → enrich (lookup table of 1,000 devices) →
//!   geofence (1,000 zones) → route, one event at a time, with `chain/clone_only` (the
//!   event copy the chain works on, nothing else) as the baseline in the same run.
//! - `geofence/locate_10k`: which of 10,000 zones contain a point (R-tree + exact test).
//! - `geofence/apply_10k`: the whole stage (tagging, enter/exit tracking) per event.
//!
//! Targets (issue 4): the typical chain at 1M events/s or more on one core; geofence with
//! 10,000 zones at 2 µs per event or less. Results: BENCHMARKS.md. The allocator is the
//! gateway's own (mimalloc, set by the library with the default features).

// criterion_group! defines an undocumented function.
#![allow(missing_docs)]

use std::hint::black_box;

use criterion::{criterion_group, criterion_main, Criterion, Throughput};
use gateway::event::{ClockQuality, Event, Fields, Location, Value};
use gateway::stages::{Chain, Outcome};
use gateway_config::Stage as StageConfig;
use rand::rngs::StdRng;
use rand::{Rng, SeedableRng};

/// Zones scattered over a 1° × 1° area north-east of (52, 13): octagons of 50 to 400 m
/// radius, named `zone-N`.
fn zones_geojson(n: usize, rng: &mut StdRng) -> String {
    let mut features = Vec::with_capacity(n);
    for i in 0..n {
        let (clat, clon) = (52.0 + rng.random::<f64>(), 13.0 + rng.random::<f64>());
        let r = rng.random_range(50.0..400.0) / 111_000.0;
        let mut ring: Vec<String> = (0..8)
            .map(|k| {
                let a = k as f64 * std::f64::consts::TAU / 8.0;
                format!("[{},{}]", clon + r * a.cos() * 1.6, clat + r * a.sin())
            })
            .collect();
        ring.push(ring[0].clone());
        features.push(format!(
            r#"{{"type":"Feature","properties":{{"name":"zone-{i}"}},"geometry":{{"type":"Polygon","coordinates":[[{}]]}}}}"#,
            ring.join(",")
        ));
    }
    format!(
        r#"{{"type":"FeatureCollection","features":[{}]}}"#,
        features.join(",")
    )
}

fn events(n: usize, rng: &mut StdRng) -> Vec<Event> {
    (0..n)
        .map(|i| Event {
            id: format!("pump-{}:{i}", i % 1000).into(),
            device: format!("pump-{}", i % 1000).into(),
            source: "site".into(),
            origin: format!("sensors/pump-{}/telemetry", i % 1000).into(),
            time_ns: 1_700_000_000_000_000_000 + i as i64 * 1_000_000,
            clock: ClockQuality::Device,
            received_ns: 1_700_000_000_000_000_000,
            location: Some(Location {
                lat: 52.0 + rng.random::<f64>(),
                lon: 13.0 + rng.random::<f64>(),
                alt: None,
                accuracy: Some(5.0),
            }),
            readings: Fields::from([
                (
                    "temperature".into(),
                    Value::Number(rng.random_range(10.0..40.0)),
                ),
                ("pressure".into(), Value::Number(rng.random_range(0.9..1.1))),
            ]),
            tags: Fields::new(),
            route: None,
            redelivered: false,
        })
        .collect()
}

fn chain(toml: &str) -> Chain {
    let v: toml::Value = toml::from_str(toml).expect("toml");
    let list: Vec<StageConfig> = v["stages"].clone().try_into().expect("stages");
    Chain::build(&list, None, "").expect("builds")
}

fn typical(c: &mut Criterion) {
    let mut rng = StdRng::seed_from_u64(7);
    let dir = tempfile::tempdir().expect("tempdir");
    let zones = dir.path().join("zones.geojson");
    std::fs::write(&zones, zones_geojson(1_000, &mut rng)).expect("zones");
    let table = dir.path().join("devices.csv");
    let mut csv = String::from("device,owner,site\n");
    for d in 0..1000 {
        csv.push_str(&format!("pump-{d},ops,plant-{}\n", d % 7));
    }
    std::fs::write(&table, csv).expect("table");
    let stages = chain(&format!(
        r#"
[[stages]]
type = "validate"
required = ["readings.temperature"]
ranges = {{ temperature = {{ min = -40.0, max = 125.0 }} }}
max_past = "100000d"
max_future = "100000d"

[[stages]]
type = "filter"
expr = 'device.startsWith("pump-") && temperature < 100.0'

[[stages]]
type = "enrich"
table = "{}"

[[stages]]
type = "geofence"
file = "{}"

[[stages]]
type = "route"
[[stages.rules]]
when = 'has(tags.zones)'
topic = "telemetry.zoned"
"#,
        table.display(),
        zones.display()
    ));
    let input = events(4096, &mut rng);
    // Each stage of the chain alone (on events the earlier stages would have passed).
    let alone = [
        ("validate", "type = 'validate'\nrequired = ['readings.temperature']\nranges = { temperature = { min = -40.0, max = 125.0 } }\nmax_past = '100000d'\nmax_future = '100000d'".to_string()),
        ("filter", "type = 'filter'\nexpr = 'device.startsWith(\"pump-\") && temperature < 100.0'".to_string()),
        ("enrich", format!("type = 'enrich'\ntable = '{}'", table.display())),
        ("geofence_1k", format!("type = 'geofence'\nfile = '{}'", zones.display())),
        ("route", "type = 'route'\n[[stages.rules]]\nwhen = 'has(tags.zones)'\ntopic = 'telemetry.zoned'".to_string()),
    ];
    let mut g = c.benchmark_group("stage");
    g.throughput(Throughput::Elements(1));
    let mut out = Vec::with_capacity(4);
    let mut i = 0;
    for (name, toml) in alone {
        let one = chain(&format!("[[stages]]\n{toml}"));
        g.bench_function(name, |b| {
            b.iter(|| {
                i = (i + 1) & 4095;
                one.run(input[i].clone(), &mut out);
                out.clear();
            })
        });
    }
    g.finish();
    let mut g = c.benchmark_group("chain");
    g.throughput(Throughput::Elements(1));
    g.bench_function("clone_only", |b| {
        b.iter(|| {
            i = (i + 1) & 4095;
            black_box(input[i].clone())
        })
    });
    g.bench_function("typical", |b| {
        b.iter(|| {
            i = (i + 1) & 4095;
            stages.run(input[i].clone(), &mut out);
            let kept = matches!(out.first(), Some(Outcome::Event { .. }));
            out.clear();
            black_box(kept)
        })
    });
    g.finish();
}

fn geofence(c: &mut Criterion) {
    let mut rng = StdRng::seed_from_u64(11);
    let text = zones_geojson(10_000, &mut rng);
    let toml = format!("type = 'geofence'\ngeojson = '''{text}'''");
    let cfg: gateway_config::GeofenceStage = match toml::from_str::<StageConfig>(&toml) {
        Ok(StageConfig::Geofence(g)) => g,
        other => panic!("{other:?}"),
    };
    let fence = gateway::stages::Geofence::new(&cfg, Default::default()).expect("10,000 zones");
    let input = events(4096, &mut rng);
    let hits: usize = input
        .iter()
        .filter_map(|e| e.location)
        .map(|l| fence.locate(l.lon, l.lat).len())
        .sum();
    eprintln!("geofence: {hits} hits for {} points", input.len());
    let mut g = c.benchmark_group("geofence");
    g.throughput(Throughput::Elements(1));
    let mut i = 0;
    g.bench_function("locate_10k", |b| {
        b.iter(|| {
            i = (i + 1) & 4095;
            let l = input[i].location.unwrap_or(Location {
                lat: 0.0,
                lon: 0.0,
                alt: None,
                accuracy: None,
            });
            black_box(fence.locate(l.lon, l.lat))
        })
    });
    let stage: &dyn gateway::stages::Stage = &fence;
    let mut made = Vec::new();
    g.bench_function("apply_10k", |b| {
        b.iter(|| {
            i = (i + 1) & 4095;
            let mut e = input[i].clone();
            let v = stage.apply(&mut e, &mut made);
            made.clear();
            black_box((v, e))
        })
    });
    g.finish();
}

criterion_group!(benches, typical, geofence);
criterion_main!(benches);
