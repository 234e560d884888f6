//! End-to-end tests of the serial input over real pseudo-terminals: `gateway simulate
//! serial` (the firmware-bridge device logic, or JSON lines) on one side, the gateway as
//! its own process on the other, librdkafka's mock cluster over TCP behind it, and a
//! Kafka consumer reading back.

mod common;

use std::collections::{BTreeMap, BTreeSet};
use std::path::Path;
use std::process::Stdio;
use std::time::Duration;

use common::*;

const TOPIC: &str = "telemetry.dev";

fn serial_config(
    dir: &Path,
    link: &Path,
    bootstrap: &str,
    extra: &str,
    kafka_extra: &str,
) -> String {
    let input = format!(
        r#"type = "serial"
name = "dev"
path = "{link}"
reconnect = {{ min = "50ms", max = "300ms" }}
channels = {{ 1 = "temperature", 2 = "humidity" }}
{extra}"#,
        link = link.display(),
    );
    config_with_input(dir, bootstrap, &input, "", kafka_extra)
}

/// What `gateway simulate serial` reported.
#[derive(Debug, serde::Deserialize)]
struct Report {
    boots: Vec<Boot>,
    dropped: u64,
    resent: u64,
    corrupted_bytes: u64,
    garbage: u64,
    unplugs: u64,
    lines: u64,
    lost_hellos: u64,
}

#[derive(Debug, serde::Deserialize)]
struct Boot {
    boot: u32,
    first_seq: u32,
    sampled: u32,
    acked_up_to: Option<u32>,
}

/// Runs the simulator to its end (it stops once `--count` readings are acknowledged).
fn simulate(link: &Path, args: &[&str]) -> std::process::Child {
    gateway_command()
        .args(["simulate", "serial", "--link"])
        .arg(link)
        .args(args)
        .stdout(Stdio::piped())
        .stderr(Stdio::inherit())
        .spawn()
        .expect("start the simulator")
}

fn report(child: std::process::Child) -> Report {
    let out = child.wait_with_output().expect("simulator output");
    assert!(out.status.success(), "simulator failed: {out:?}");
    serde_json::from_slice(&out.stdout).expect("simulator report")
}

/// Starts Kafka, the simulator (which creates the link) and the gateway.
fn rig(extra: &str, sim_args: &[&str]) -> (tempfile::TempDir, Kafka, Gateway, std::process::Child) {
    rig_with(extra, "", &[TOPIC], sim_args)
}

/// [`rig`] with extra lines for `[output.kafka]` and these topics.
fn rig_with(
    extra: &str,
    kafka_extra: &str,
    topics: &[&str],
    sim_args: &[&str],
) -> (tempfile::TempDir, Kafka, Gateway, std::process::Child) {
    let dir = tempfile::tempdir().expect("tempdir");
    let link = dir.path().join("ttyDEV");
    let kafka = Kafka::start(1, topics, PARTITIONS);
    let sim = simulate(&link, sim_args);
    wait_for("the simulator's link", Duration::from_secs(10), || {
        link.exists()
    });
    let gw = Gateway::start(
        dir.path(),
        &serial_config(dir.path(), &link, &kafka.bootstrap, extra, kafka_extra),
    );
    (dir, kafka, gw, sim)
}

/// Every reading the gateway acknowledged, as event ids `sim-1:boot:seq`.
fn acknowledged(r: &Report) -> BTreeSet<String> {
    r.boots
        .iter()
        .flat_map(|b| {
            b.acked_up_to
                .map(|up_to| (b.first_seq..=up_to).map(move |s| format!("sim-1:{}:{s}", b.boot)))
                .into_iter()
                .flatten()
        })
        .collect()
}

/// Reads the topic until every id in `want` is there (or the wait ends); the records and
/// the event ids they carry.
fn read_ids(kafka: &Kafka, want: &BTreeSet<String>) -> (Vec<Consumed>, BTreeSet<String>) {
    let records = kafka.read(TOPIC, PARTITIONS, Duration::from_secs(60), |recs| {
        let got: BTreeSet<&String> = recs
            .iter()
            .filter_map(|c| c.headers.get("event-id"))
            .collect();
        want.iter().all(|w| got.contains(w))
    });
    let got = records
        .iter()
        .filter_map(|c| c.headers.get("event-id").cloned())
        .collect();
    (records, got)
}

/// Reads Kafka until every acknowledged id is there; checks ids, order and content.
fn check_delivered(kafka: &Kafka, gw: &Gateway, r: &Report) -> Vec<Consumed> {
    assert_eq!(
        r.dropped, 0,
        "the device never had to give readings up: {r:?}"
    );
    let want = acknowledged(r);
    assert!(!want.is_empty(), "the gateway acknowledged nothing: {r:?}");
    let (records, got) = read_ids(kafka, &want);
    let missing: Vec<_> = want.difference(&got).take(10).collect();
    if !missing.is_empty() {
        eprintln!("{}", gw.log_text());
        eprintln!("simulator: {r:?}");
    }
    assert!(
        missing.is_empty(),
        "acknowledged but not in Kafka: {missing:?}"
    );
    // No false duplicates: every id names one reading of one boot, and a boot's ids stay
    // within what it sampled.
    let sampled: BTreeMap<u32, (u32, u32)> = r
        .boots
        .iter()
        .map(|b| (b.boot, (b.first_seq, b.sampled)))
        .collect();
    for id in &got {
        let mut parts = id.rsplitn(3, ':');
        let seq: u32 = parts.next().and_then(|s| s.parse().ok()).expect("seq");
        let boot: u32 = parts.next().and_then(|s| s.parse().ok()).expect("boot");
        let (first, end) = sampled[&boot];
        assert!(
            (first..end).contains(&seq),
            "{id}: not a reading boot {boot} sampled ({first}..{end})"
        );
    }
    // Per device order: first occurrences come in (boot order, seq) order.
    let order: BTreeMap<u32, usize> = r
        .boots
        .iter()
        .enumerate()
        .map(|(i, b)| (b.boot, i))
        .collect();
    let mut seen = BTreeSet::new();
    let mut last = (0usize, 0u32);
    for c in &records {
        let id = &c.headers["event-id"];
        if !seen.insert(id.clone()) {
            continue;
        }
        let mut parts = id.rsplitn(3, ':');
        let seq: u32 = parts.next().and_then(|s| s.parse().ok()).expect("seq");
        let boot: u32 = parts.next().and_then(|s| s.parse().ok()).expect("boot");
        let at = (order[&boot], seq);
        assert!(at >= last, "{id} after {last:?}: out of order");
        last = at;
    }
    let v = &records[0].value;
    assert!(v["readings"]["temperature"].is_number(), "{v}");
    assert!(v["location"]["lat"].is_number(), "{v}");
    assert_eq!(records[0].key, "sim-1");
    records
}

#[test]
fn every_acknowledged_reading_reaches_kafka_in_order() {
    let (_dir, kafka, gw, sim) = rig("", &["--count", "2000", "--rate", "400"]);
    let r = report(sim);
    assert_eq!(r.boots.len(), 1);
    assert_eq!(r.boots[0].acked_up_to, Some(1999), "{r:?}");
    check_delivered(&kafka, &gw, &r);
    assert!(gw.metric("gateway_upstream_acks_total{input=\"dev\"}") >= 1.0);
    let drops: BTreeMap<_, _> = gw
        .metrics()
        .into_iter()
        .filter(|(k, v)| {
            // Resends the device makes when an ack is slower than --resend-after (a
            // loaded machine) are duplicates by design; nothing else may be dropped.
            k.starts_with("gateway_events_dropped_total")
                && !k.contains("reason=\"duplicate\"")
                && *v > 0.0
        })
        .collect();
    assert!(
        drops.is_empty(),
        "nothing dropped on a clean line: {drops:?}"
    );
}

#[test]
fn corrupt_bytes_truncated_frames_and_garbage_are_rejected_counted_and_resent() {
    let (_dir, kafka, gw, sim) = rig(
        "",
        &[
            "--count",
            "1500",
            "--rate",
            "300",
            "--corrupt",
            "0.01",
            "--garbage",
            "0.05",
        ],
    );
    let r = report(sim);
    assert!(r.corrupted_bytes > 0 && r.garbage > 0, "{r:?}");
    assert_eq!(r.boots[0].acked_up_to, Some(1499), "{r:?}");
    check_delivered(&kafka, &gw, &r);
    let m = gw.metrics();
    let corrupt = m
        .get("gateway_events_dropped_total{input=\"dev\",reason=\"corrupt_frame\"}")
        .copied()
        .unwrap_or(0.0);
    assert!(corrupt > 0.0, "corrupt frames are counted");
    assert!(r.resent > 0, "the device resent what was lost: {r:?}");
}

#[test]
fn a_device_reboot_restarts_seq_without_loss_or_false_duplicates() {
    let (_dir, kafka, gw, sim) = rig(
        "",
        &["--count", "1200", "--rate", "300", "--reboot-every", "400"],
    );
    let r = report(sim);
    assert!(r.boots.len() >= 3, "{r:?}");
    check_delivered(&kafka, &gw, &r);
}

#[test]
fn a_reboot_whose_hello_is_lost_makes_no_false_duplicates() {
    // `seq` goes on across boots, so the new boot's readings look like the next ones of
    // the boot before: only the boot in each reading (protocol version 2) tells them
    // apart until the device, hearing no ack, sends Hello again.
    let (_dir, kafka, gw, sim) = rig(
        "",
        &[
            "--count",
            "1200",
            "--rate",
            "300",
            "--reboot-every",
            "400",
            "--persistent-seq",
            "--lose-hello",
        ],
    );
    let r = report(sim);
    assert!(r.boots.len() >= 3 && r.lost_hellos >= 2, "{r:?}");
    assert_eq!(r.boots[1].first_seq, r.boots[0].sampled, "{r:?}");
    check_delivered(&kafka, &gw, &r);
    assert!(
        gw.metric("gateway_events_dropped_total{input=\"dev\",reason=\"unknown_boot\"}") > 0.0,
        "readings before the lost Hello are refused and counted"
    );
}

#[test]
fn a_nan_channel_is_left_out_and_counted() {
    let (_dir, kafka, gw, sim) = rig(
        "",
        &["--count", "400", "--rate", "400", "--nan-every", "10"],
    );
    let r = report(sim);
    let records = check_delivered(&kafka, &gw, &r);
    let mut first = BTreeMap::new();
    for c in &records {
        first
            .entry(c.headers["event-id"].clone())
            .or_insert(&c.value);
    }
    let without: Vec<_> = first
        .iter()
        .filter(|(_, v)| v["readings"].get("humidity").is_none())
        .collect();
    assert_eq!(without.len(), 40, "every tenth reading lacks channel 2");
    assert!(without
        .iter()
        .all(|(_, v)| v["readings"]["temperature"].is_number()));
    assert_eq!(
        gw.metric("gateway_input_values_skipped_total{input=\"dev\",reason=\"not_finite\"}"),
        40.0
    );
}

/// A reading that passes its CRC but does not decode (a newer firmware's `Timestamp`
/// variant) is dead-lettered with its bytes and acknowledged in its turn: the readings
/// after it go on, and the device is not left sending it for good.
#[test]
fn a_reading_that_does_not_decode_is_dead_lettered_and_the_rest_go_on() {
    let dead = "telemetry.dead-letter";
    let (_dir, kafka, gw, sim) = rig_with(
        "",
        &format!("dead_letter_topic = \"{dead}\""),
        &[TOPIC, dead],
        // Some frames corrupted too: gaps, resends and readings held behind them.
        &[
            "--count",
            "400",
            "--rate",
            "400",
            "--newer-every",
            "50",
            "--corrupt",
            "0.005",
        ],
    );
    let r = report(sim);
    assert!(r.corrupted_bytes > 0, "{r:?}");
    assert_eq!(r.boots.len(), 1, "{r:?}");
    let boot = &r.boots[0];
    assert_eq!(
        boot.acked_up_to,
        Some(399),
        "every reading acknowledged: {r:?}"
    );
    let newer: BTreeSet<u32> = (0..400).filter(|s| s % 50 == 0).collect();
    let want: BTreeSet<String> = (0..400)
        .filter(|s| !newer.contains(s))
        .map(|s| format!("sim-1:{}:{s}", boot.boot))
        .collect();
    let (_, got) = read_ids(&kafka, &want);
    assert_eq!(got, want, "an event for every reading but the newer ones");
    let letters = kafka.read(dead, PARTITIONS, Duration::from_secs(30), |l| {
        l.len() >= newer.len()
    });
    assert_eq!(letters.len(), newer.len(), "one dead letter each");
    for l in &letters {
        assert_eq!(
            l.headers.get("dead-letter-reason").map(String::as_str),
            Some("malformed_reading")
        );
        // The reading's message bytes as they came: type 1 (Reading), then its seq.
        assert_eq!(l.raw.first(), Some(&1), "{:?}", l.raw);
    }
    assert_eq!(
        gw.metric("gateway_events_dropped_total{input=\"dev\",reason=\"malformed_reading\"}"),
        newer.len() as f64
    );
}

#[test]
fn an_unplugged_port_is_reopened_and_the_device_resends() {
    let (_dir, kafka, gw, sim) = rig(
        "",
        &[
            "--count",
            "1500",
            "--rate",
            "250",
            "--unplug-every",
            "1.5",
            "--unplug-for",
            "0.7",
        ],
    );
    let r = report(sim);
    assert!(r.unplugs >= 2, "{r:?}");
    assert_eq!(r.boots[0].acked_up_to, Some(1499), "{r:?}");
    check_delivered(&kafka, &gw, &r);
    assert!(gw.metric("gateway_input_reconnects_total{input=\"dev\"}") >= r.unplugs as f64);
}

#[test]
fn silence_raises_the_alarm_and_a_reading_clears_it() {
    // One reading every 4 s (heartbeats every 5 s): silent in between.
    let (_dir, _kafka, gw, mut sim) = rig("silence_timeout = \"1s\"", &["--rate", "0.25"]);
    wait_for("connected", Duration::from_secs(10), || {
        gw.metric("gateway_input_connected{input=\"dev\"}") == 1.0
    });
    wait_for("the silence alarm", Duration::from_secs(10), || {
        gw.metric("gateway_input_silent{input=\"dev\"}") == 1.0
    });
    wait_for("the alarm to clear", Duration::from_secs(10), || {
        gw.metric("gateway_input_silent{input=\"dev\"}") == 0.0
    });
    let _ = sim.kill();
    let _ = sim.wait();
}

#[test]
fn json_lines_become_events() {
    let (_dir, kafka, gw, sim) = rig(
        "framing = \"json-lines\"",
        &[
            "--framing",
            "json-lines",
            "--count",
            "500",
            "--rate",
            "500",
            "--wait-reader",
            "30",
        ],
    );
    let r = report(sim);
    assert_eq!(r.lines, 500);
    let records = kafka.read(TOPIC, PARTITIONS, Duration::from_secs(30), |recs| {
        recs.len() >= 500
    });
    let ids: BTreeSet<_> = records
        .iter()
        .filter_map(|c| c.headers.get("event-id"))
        .collect();
    assert_eq!(ids.len(), 500);
    assert!(ids.contains(&"sim-1:499".to_string()));
    assert_eq!(gw.dropped_total(), 0.0);
}

/// Equal lines without a time or sequence of their own (a meter sending the same value)
/// are different readings: each gets its own event id, also when many come in one read
/// (the lines of a read shared one receipt time, and so one id).
#[test]
fn equal_json_lines_in_one_read_get_their_own_ids() {
    let dir = tempfile::tempdir().expect("tempdir");
    let lines = dir.path().join("lines.jsonl");
    std::fs::write(
        &lines,
        "{\"device\":\"m\",\"temperature\":21.5}\n".repeat(300),
    )
    .expect("lines");
    let (_dir, kafka, gw, sim) = rig(
        "framing = \"json-lines\"",
        &[
            "--framing",
            "json-lines",
            "--replay",
            lines.to_str().expect("path"),
            "--rate",
            "100000",
            "--wait-reader",
            "30",
        ],
    );
    let r = report(sim);
    assert_eq!(r.lines, 300);
    let records = kafka.read(TOPIC, PARTITIONS, Duration::from_secs(30), |recs| {
        recs.len() >= 300
    });
    assert_eq!(unique_ids(&records), 300, "one id per line");
    assert_eq!(gw.dropped_total(), 0.0);
}

/// Whether a line of an NMEA log should become a location event, worked out here without
/// the gateway's parser (otherwise it is a counted drop: no fix, bad checksum, another
/// sentence type).
fn nmea_expect(line: &str) -> bool {
    let Some((body, sum)) = line.strip_prefix('$').and_then(|l| l.rsplit_once('*')) else {
        return false;
    };
    let xor = body.bytes().fold(0u8, |a, b| a ^ b);
    if u8::from_str_radix(sum.trim(), 16).ok() != Some(xor) {
        return false;
    }
    let f: Vec<&str> = body.split(',').collect();
    let kind = f[0].get(2..).unwrap_or("");
    let field = |i: usize| f.get(i).copied().unwrap_or("");
    match kind {
        // Quality 1-5 (GPS, DGPS, PPS, RTK, float RTK) is a fix; 0 and 6-8 are not.
        "GGA" => matches!(field(6), "1" | "2" | "3" | "4" | "5") && !field(2).is_empty(),
        "RMC" => matches!(field(2), "A" | "D") && !field(3).is_empty(),
        "GLL" => field(6) == "A" && !field(1).is_empty(),
        _ => false,
    }
}

#[test]
fn nmea_logs_from_real_receivers_are_replayed() {
    let data = Path::new(env!("CARGO_MANIFEST_DIR")).join("data/nmea");
    for log in ["receiver-multi-gnss.log", "receiver-moving.log"] {
        let path = data.join(log);
        let text = std::fs::read_to_string(&path).expect("log");
        let lines: Vec<&str> = text.lines().filter(|l| !l.trim().is_empty()).collect();
        let fixes = lines.iter().filter(|l| nmea_expect(l)).count();
        assert!(fixes > 10, "{log}: the log has fixes");
        let (_dir, kafka, gw, sim) = rig(
            "framing = \"nmea\"\ndevice = \"gps-1\"",
            &[
                "--framing",
                "nmea",
                "--replay",
                path.to_str().expect("path"),
                "--rate",
                "1000",
                "--wait-reader",
                "30",
            ],
        );
        let r = report(sim);
        assert_eq!(r.lines as usize, lines.len(), "{log}");
        let records = kafka.read(TOPIC, PARTITIONS, Duration::from_secs(30), |recs| {
            recs.len() >= fixes
        });
        assert_eq!(records.len(), fixes, "{log}: one event per fix");
        for c in &records {
            let v = &c.value;
            assert_eq!(v["device"], "gps-1");
            let (lat, lon) = (
                v["location"]["lat"].as_f64().expect("lat"),
                v["location"]["lon"].as_f64().expect("lon"),
            );
            assert!(lat.abs() <= 90.0 && lon.abs() <= 180.0 && lat != 0.0, "{v}");
            assert_eq!(v["clock"], "device", "GPS time: {v}");
        }
        // Everything else is a counted drop: received = delivered + dropped.
        wait_for("every line accounted for", Duration::from_secs(10), || {
            gw.metric("gateway_events_received_total{input=\"dev\"}") as usize == lines.len()
        });
        // One delivery per fix, exactly (the read above stops at `fixes` records, so it
        // cannot see an extra one).
        wait_for("a delivery per fix", Duration::from_secs(10), || {
            gw.metric("gateway_events_delivered_total{input=\"dev\"}") as usize >= fixes
        });
        let delivered = gw.metric("gateway_events_delivered_total{input=\"dev\"}");
        assert_eq!(delivered as usize, fixes, "{log}");
        assert_eq!(
            delivered as usize + gw.dropped_total() as usize,
            lines.len(),
            "{log}"
        );
    }
}
