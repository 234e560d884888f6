//! The stage library end to end: real Mosquitto, the Kafka mock over TCP, the gateway as
//! its own process. One input with its own stage, then global stages that reject to the
//! dead-letter topic, geofence (enter and exit events), window (summaries on an idle
//! timeout) and route (topics by rule); every event accounted for.

mod common;

use std::collections::BTreeMap;
use std::time::Duration;

use common::*;

const TOPIC: &str = "telemetry.site";
const TRANSITIONS: &str = "fleet.transitions";
const WINDOWS: &str = "telemetry.windows";
const DEAD: &str = "telemetry.dead-letter";

#[test]
fn stages_filter_reject_geofence_window_and_route_with_every_event_accounted_for() {
    let (devices, n) = (10, 200);
    // The publisher's events: temperature 20 + seq % 10, lat 52.000d, lon 13.0000 + seq
    // / 10000, time 1_750_000_000_000 ms + seq.
    let input_stages = r#"
[[inputs.stages]]
type = "filter"
mode = "drop"
expr = "temperature >= 29.0"
"#;
    let zone = r#"{"type":"Feature","properties":{"name":"yard"},"geometry":{"type":"Polygon","coordinates":[[[12.99,51.99],[13.0105,51.99],[13.0105,52.01],[12.99,52.01],[12.99,51.99]]]}}"#;
    let global = format!(
        r#"dead_letter_topic = "{DEAD}"

[[stages]]
type = "validate"
ranges = {{ temperature = {{ max = 27.5 }} }}
max_future = "1000d"
max_past = "1000d"
action = "dead_letter"

[[stages]]
type = "geofence"
geojson = '{zone}'

[[stages]]
type = "window"
size = "1h"
readings = ["temperature"]
aggregates = ["count", "max"]
idle_timeout = "2s"
keep_events = true

[[stages]]
type = "route"
[[stages.rules]]
when = "has(tags.geofence)"
topic = "{TRANSITIONS}"
[[stages.rules]]
when = "has(tags.window)"
topic = "{WINDOWS}"
"#
    );
    let (_dir, mqtt, kafka, gw) = rig(
        &[TOPIC, TRANSITIONS, WINDOWS, DEAD],
        Uplink::Up,
        "",
        input_stages,
        &global,
    );
    publish(mqtt.port, devices, n, None, None);
    // seq % 10 == 9 dropped by the input's filter, == 8 rejected by validate.
    let passing = devices * n * 8 / 10;
    let records = kafka.read(TOPIC, PARTITIONS, Duration::from_secs(60), |r| {
        r.len() >= passing
    });
    assert_eq!(records.len(), passing);
    for r in &records {
        let t = r.value["readings"]["temperature"]
            .as_f64()
            .expect("temperature");
        assert!(t <= 27.0, "{}", r.value);
        let seq: u64 = r.headers["event-id"]
            .rsplit(':')
            .next()
            .and_then(|s| s.parse().ok())
            .expect("seq");
        // In the yard while lon <= 13.0105 (seq <= 105).
        let zones = r.value["tags"]["zones"].as_str();
        assert_eq!(zones == Some("yard"), seq <= 105, "{}", r.value);
    }
    let dead = kafka.read(DEAD, PARTITIONS, Duration::from_secs(30), |r| {
        r.len() >= devices * n / 10
    });
    assert_eq!(dead.len(), devices * n / 10);
    for d in &dead {
        assert_eq!(d.headers["dead-letter-reason"], "out_of_range");
        assert!(
            d.headers["dead-letter-detail"].starts_with("0-validate: temperature = 28"),
            "{:?}",
            d.headers
        );
        assert_eq!(
            d.value["readings"]["temperature"], 28.0,
            "the event as JSON"
        );
    }
    // Each device enters the yard with its first event and leaves at seq 106.
    let moves = kafka.read(TRANSITIONS, PARTITIONS, Duration::from_secs(30), |r| {
        r.len() >= 2 * devices
    });
    assert_eq!(moves.len(), 2 * devices);
    let mut per_device: BTreeMap<String, Vec<String>> = BTreeMap::new();
    for m in &moves {
        assert_eq!(m.value["tags"]["zone"], "yard");
        per_device
            .entry(m.key.clone())
            .or_default()
            .push(m.value["tags"]["geofence"].as_str().unwrap_or("?").into());
    }
    for (device, seen) in &per_device {
        assert_eq!(seen, &["enter", "exit"], "{device}");
    }
    // Two seconds after the last event each device's window is summarised.
    let windows = kafka.read(WINDOWS, PARTITIONS, Duration::from_secs(30), |r| {
        r.len() >= devices
    });
    assert_eq!(windows.len(), devices);
    for w in &windows {
        assert_eq!(
            w.value["readings"]["temperature_count"],
            (n * 8 / 10) as f64,
            "{}",
            w.value
        );
        assert_eq!(w.value["readings"]["temperature_max"], 27.0);
        assert_eq!(w.value["tags"]["window"], "1h");
    }
    // received + generated = delivered + dropped.
    let received = (devices * n) as f64;
    let generated = (2 * devices + devices) as f64;
    let delivered = (passing + 3 * devices) as f64;
    wait_for("every event accounted for", Duration::from_secs(10), || {
        gw.metric("gateway_events_delivered_total{input=\"site\"}") == delivered
    });
    assert_eq!(
        gw.metric("gateway_events_received_total{input=\"site\"}"),
        received
    );
    assert_eq!(
        gw.metric("gateway_events_generated_total{input=\"site\"}"),
        generated
    );
    assert_eq!(
        gw.metric("gateway_events_dropped_total{input=\"site\",reason=\"filtered\"}"),
        (devices * n / 10) as f64
    );
    assert_eq!(
        gw.metric("gateway_events_dropped_total{input=\"site\",reason=\"out_of_range\"}"),
        (devices * n / 10) as f64
    );
    assert_eq!(received + generated, delivered + gw.dropped_total());
    assert_eq!(
        gw.metric(
            "gateway_stage_events_dropped_total{stage=\"site/0-filter\",reason=\"filtered\"}"
        ),
        (devices * n / 10) as f64
    );
}

#[test]
fn a_bad_expression_is_refused_with_its_stage_and_column() {
    let dir = tempfile::tempdir().expect("tempdir");
    let path = dir.path().join("gateway.toml");
    let cfg = config(
        dir.path(),
        1883,
        "127.0.0.1:9092",
        "",
        "",
        "\n[[stages]]\ntype = \"tags\"\ntags = { a = \"b\" }\n\n[[stages]]\ntype = \"filter\"\nexpr = \"temperature > \"\n",
    );
    std::fs::write(&path, cfg.replace("{metrics_port}", "0")).expect("write");
    let out = gateway_command()
        .arg("check-config")
        .arg(&path)
        .output()
        .expect("gateway check-config");
    let err = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(2), "{err}");
    assert!(
        err.contains("stages[1] (filter): expr: line 1 column"),
        "{err}"
    );
}
