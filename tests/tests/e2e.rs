//! End-to-end tests: a real Mosquitto, librdkafka's mock cluster over TCP, the gateway as
//! its own process, and a real Kafka consumer reading back.

mod common;

use std::time::Duration;

use common::*;

const TOPIC: &str = "telemetry.site";

#[test]
fn qos1_events_reach_kafka_in_order_with_key_and_headers() {
    let devices = 50;
    let n = 2000; // 100k events
    let (_dir, mqtt, kafka, gw) = rig(&[TOPIC], Uplink::Up, "", "", "");
    let started = std::time::Instant::now();
    publish(mqtt.port, devices, n, None, None);
    let records = kafka.read(TOPIC, PARTITIONS, Duration::from_secs(180), |r| {
        unique_ids(r) >= devices * n
    });
    eprintln!("{} records in {:?}", records.len(), started.elapsed());
    let dups = check_complete_and_ordered(&records, devices, n);
    assert_eq!(dups, 0, "no reason for duplicates without faults");
    // Every record's headers, not only the first batch's.
    for r in &records {
        assert_eq!(r.headers.get("source").map(String::as_str), Some("site"));
        assert_eq!(
            r.headers.get("gateway-id").map(String::as_str),
            Some("gw-test")
        );
        assert_eq!(
            r.headers.get("content-type").map(String::as_str),
            Some("application/json; schema=edge-gateway.event.v1")
        );
        assert_eq!(r.headers.len(), 4, "{:?}", r.headers);
        assert_eq!(
            r.value["id"].as_str(),
            r.headers.get("event-id").map(String::as_str)
        );
    }
    let r = &records[0];
    assert_eq!(r.value["schema"], "edge-gateway.event.v1");
    assert_eq!(r.value["clock"], "device");
    let seq: i64 = r.headers["event-id"]
        .rsplit(':')
        .next()
        .and_then(|s| s.parse().ok())
        .expect("seq");
    assert_eq!(
        r.timestamp,
        Some(1_750_000_000_000 + seq),
        "record timestamp = event time"
    );
    assert!(r.value["location"]["lat"].is_number());
    assert!(r.value["readings"]["temperature"].is_number());
    let total = (devices * n) as f64;
    wait_for("delivered = received", Duration::from_secs(10), || {
        gw.metric("gateway_events_delivered_total{input=\"site\"}") == total
    });
    assert_eq!(
        gw.metric("gateway_events_received_total{input=\"site\"}"),
        total
    );
    let acked = || gw.metric("gateway_upstream_acks_total{input=\"site\"}") == total;
    let waited = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| {
        wait_for(
            "every message acked upstream",
            Duration::from_secs(10),
            acked,
        )
    }));
    if waited.is_err() {
        panic!("not every message was acknowledged upstream");
    }
}

/// Publishes in a background thread; returns its handle.
fn publish_in_background(
    port: u16,
    devices: usize,
    n: usize,
    pace: Duration,
) -> std::thread::JoinHandle<usize> {
    std::thread::spawn(move || publish(port, devices, n, None, Some(pace)))
}

#[test]
fn kafka_down_for_30s_spools_then_drains_in_order() {
    let (devices, n) = (20, 1500); // 30k events over ~60 s
    let (_dir, mqtt, kafka, gw) = rig(&[TOPIC], Uplink::Up, "", "", "");
    let publisher = publish_in_background(mqtt.port, devices, n, Duration::from_micros(2000));
    wait_for("direct deliveries", Duration::from_secs(30), || {
        gw.metric("gateway_events_delivered_total{input=\"site\"}") > 2000.0
    });
    kafka.down();
    let down_at = std::time::Instant::now();
    wait_for("the spool to fill", Duration::from_secs(20), || {
        gw.metric("gateway_spool_rows") > 1000.0
    });
    assert_eq!(gw.metric("gateway_spooling"), 1.0);
    let mut peak = 0.0f64;
    while down_at.elapsed() < Duration::from_secs(30) {
        peak = peak.max(gw.metric("gateway_spool_rows"));
        std::thread::sleep(Duration::from_millis(200));
    }
    let acked_during_outage = gw.metric("gateway_upstream_acks_total{input=\"site\"}");
    kafka.up();
    eprintln!("spool peak {peak} rows; {acked_during_outage} acks sent during the outage");
    assert!(peak > 5000.0, "the spool absorbed the outage (peak {peak})");
    publisher.join().expect("publisher");
    wait_for("the spool to drain", Duration::from_secs(120), || {
        gw.metric("gateway_spool_rows") == 0.0 && gw.metric("gateway_spooling") == 0.0
    });
    let records = kafka.read(TOPIC, PARTITIONS, Duration::from_secs(120), |r| {
        unique_ids(r) >= devices * n
    });
    if unique_ids(&records) < devices * n {
        use rdkafka::consumer::Consumer;
        let consumer = kafka.consumer(TOPIC, PARTITIONS);
        for p in 0..PARTITIONS {
            let got = records.iter().filter(|r| r.partition == p).count();
            eprintln!(
                "partition {p}: consumed {got}, watermarks {:?}",
                consumer.fetch_watermarks(TOPIC, p, Duration::from_secs(5))
            );
        }
    }
    let dups = check_complete_and_ordered(&records, devices, n);
    eprintln!(
        "{} records, {dups} duplicates (same event ids)",
        records.len()
    );
    assert!(gw.metric("gateway_spool_drained_total") > 0.0);
    assert_eq!(gw.dropped_total(), 0.0, "nothing dropped");
}

#[test]
fn kill_9_at_random_moments_loses_nothing_acknowledged() {
    use rand::{Rng, SeedableRng};
    let (devices, n) = (20, 1000); // 20k events over ~30 s
    let (_dir, mqtt, kafka, mut gw) = rig(&[TOPIC], Uplink::Up, "synchronous = \"full\"", "", "");
    let publisher = publish_in_background(mqtt.port, devices, n, Duration::from_micros(1500));
    // KILL_SEED=N replays a run's kill times.
    let seed = std::env::var("KILL_SEED")
        .ok()
        .and_then(|s| s.parse().ok())
        .unwrap_or_else(|| rand::rng().random::<u64>());
    eprintln!("kill times from KILL_SEED={seed}");
    let mut rng = rand::rngs::StdRng::seed_from_u64(seed);
    // Kills that land while events still stream in (the publisher takes 30 s at least;
    // the six rounds take 21 s on average, 36 s at most).
    let mut mid_stream = 0;
    for round in 0..6 {
        std::thread::sleep(Duration::from_millis(rng.random_range(500..3000)));
        // Cut Kafka sometimes, so kills also land while spooling and draining.
        if round % 2 == 1 {
            kafka.down();
        }
        std::thread::sleep(Duration::from_millis(rng.random_range(100..2500)));
        if !publisher.is_finished() {
            mid_stream += 1;
        }
        gw.kill9();
        kafka.up();
        std::thread::sleep(Duration::from_millis(rng.random_range(50..500)));
        gw.restart();
    }
    assert!(
        mid_stream >= 4,
        "only {mid_stream} of 6 kills landed while events streamed in"
    );
    publisher.join().expect("publisher");
    let records = kafka.read(TOPIC, PARTITIONS, Duration::from_secs(180), |r| {
        unique_ids(r) >= devices * n
    });
    let dups = check_complete_and_ordered(&records, devices, n);
    eprintln!(
        "{} records after 6 kill -9 ({mid_stream} while events streamed in), {dups} duplicates (same event ids)",
        records.len()
    );
    assert_eq!(gw.dropped_total(), 0.0, "nothing dropped");
}

/// The MQTT connection is cut again and again mid-stream (a TCP proxy between the
/// gateway and Mosquitto). The persistent session keeps what the broker holds, the
/// gateway reconnects, and every event reaches Kafka in order; duplicates only as equal
/// event ids; every message is acknowledged upstream in the end.
#[test]
fn mqtt_connection_cuts_lose_nothing() {
    use rand::{Rng, SeedableRng};
    let (devices, n) = (20, 1000); // 20k events over ~30 s
    let dir = tempfile::tempdir().expect("tempdir");
    let mqtt = Mosquitto::start();
    let kafka = Kafka::start(1, &[TOPIC], PARTITIONS);
    let proxy =
        gateway_e2e::mock::Proxy::start(&format!("127.0.0.1:{}", mqtt.port)).expect("proxy");
    let gw = Gateway::start(
        dir.path(),
        &config(dir.path(), proxy.port, &kafka.bootstrap, "", "", ""),
    );
    gw.wait_connected();
    let publisher = publish_in_background(mqtt.port, devices, n, Duration::from_micros(1500));
    // Random cut times, the seed printed so that a failure can be run again.
    let seed = std::env::var("CUT_SEED")
        .ok()
        .and_then(|s| s.parse().ok())
        .unwrap_or_else(|| rand::rng().random::<u64>());
    eprintln!("cut times from CUT_SEED={seed}");
    let mut rng = rand::rngs::StdRng::seed_from_u64(seed);
    let cuts = 6;
    for _ in 0..cuts {
        std::thread::sleep(Duration::from_millis(rng.random_range(300..2500)));
        proxy.cut();
    }
    publisher.join().expect("publisher");
    let records = kafka.read(TOPIC, PARTITIONS, Duration::from_secs(120), |r| {
        unique_ids(r) >= devices * n
    });
    let dups = check_complete_and_ordered(&records, devices, n);
    let reconnects = gw.metric("gateway_input_reconnects_total{input=\"site\"}");
    eprintln!(
        "{} records after {cuts} cuts ({reconnects} reconnects), {dups} duplicates (same event ids)",
        records.len()
    );
    assert!(
        reconnects >= 3.0,
        "the cuts were seen ({reconnects} reconnects)"
    );
    let total = (devices * n) as f64;
    wait_for(
        "every message acked upstream",
        Duration::from_secs(30),
        || gw.metric("gateway_upstream_acks_total{input=\"site\"}") >= total,
    );
    assert_eq!(gw.dropped_total(), 0.0, "nothing dropped");
}

#[test]
fn malformed_payloads_are_counted_and_dead_lettered() {
    let (devices, n) = (10, 1000);
    let (_dir, mqtt, kafka, gw) = rig(
        &[TOPIC, "telemetry.dead-letter"],
        Uplink::Up,
        "",
        "",
        "dead_letter_topic = \"telemetry.dead-letter\"",
    );
    publish(mqtt.port, devices, n, Some(100), None);
    let bad = devices * n / 100;
    let records = kafka.read(TOPIC, PARTITIONS, Duration::from_secs(60), |r| {
        unique_ids(r) >= devices * n
    });
    check_complete_and_ordered(&records, devices, n);
    let dead = kafka.read(
        "telemetry.dead-letter",
        PARTITIONS,
        Duration::from_secs(30),
        |r| r.len() >= bad,
    );
    assert_eq!(dead.len(), bad);
    for d in &dead {
        assert_eq!(d.raw, b"{not json");
        assert_eq!(
            d.headers.get("dead-letter-reason").map(String::as_str),
            Some("malformed_json")
        );
        assert!(d.headers["origin"].starts_with("sensors/dev-"));
        assert!(d.headers["event-id"].starts_with('h'), "a content-hash id");
    }
    wait_for("counters", Duration::from_secs(10), || {
        gw.metric("gateway_events_dropped_total{input=\"site\",reason=\"malformed_json\"}")
            == bad as f64
            && gw.metric("gateway_dead_letters_total{input=\"site\"}") == bad as f64
            && gw.metric("gateway_events_received_total{input=\"site\"}")
                == (devices * n + bad) as f64
            && gw.metric("gateway_events_delivered_total{input=\"site\"}") == (devices * n) as f64
    });
}

/// A full spool with `block` holds the input back, and the input keeps its connection
/// meanwhile: with a 1 s keep-alive, Mosquitto drops a client it has not heard from for
/// 1.5 s, and the broker would send the whole unacknowledged window again.
#[test]
fn a_full_spool_with_block_holds_back_and_drops_nothing() {
    let (devices, n) = (10, 300);
    let (_dir, mqtt, kafka, gw) = rig(
        &[TOPIC],
        Uplink::Down,
        "max_bytes = 65536\noverflow = \"block\"",
        "keep_alive = \"1s\"",
        "",
    );
    publish(mqtt.port, devices, n, None, None);
    wait_for("backpressure", Duration::from_secs(30), || {
        gw.metric("gateway_spool_blocked") == 1.0
    });
    // Acks stop: the same count a second apart, short of everything.
    let acked = || gw.metric("gateway_upstream_acks_total{input=\"site\"}");
    let mut acks = acked();
    wait_for("the acks to stop", Duration::from_secs(30), || {
        std::thread::sleep(Duration::from_secs(1));
        let now = acked();
        std::mem::replace(&mut acks, now) == now
    });
    assert!(
        acks < (devices * n) as f64,
        "only what fits was acknowledged ({acks})"
    );
    // Held back for several keep-alive periods.
    std::thread::sleep(Duration::from_secs(4));
    assert_eq!(acked(), acks, "no ack while the spool is full");
    assert!(gw.metric("gateway_spool_bytes") <= 65536.0 + 1000.0 * 200.0);
    kafka.up();
    let records = kafka.read(TOPIC, PARTITIONS, Duration::from_secs(90), |r| {
        unique_ids(r) >= devices * n
    });
    let duplicates = check_complete_and_ordered(&records, devices, n);
    assert_eq!(gw.dropped_total(), 0.0, "nothing dropped");
    assert_eq!(
        gw.metric("gateway_input_reconnects_total{input=\"site\"}"),
        0.0,
        "the connection held while the input waited"
    );
    assert_eq!(duplicates, 0, "no message came twice");
}

/// Messages of many events each (SenML packs of 20) fill the router's waiting room (8192
/// records) long before the broker's window (1000 messages) runs out, so with a full
/// spool and `block` the input itself waits for room. It keeps its connection meanwhile:
/// with a 1 s keep-alive Mosquitto drops a client it has not heard from for 1.5 s, and
/// after the reconnect the whole unacknowledged window would come again (duplicates).
#[test]
fn an_input_waiting_for_a_full_spool_keeps_its_connection() {
    let (devices, n, pack) = (10, 100, 20);
    let (_dir, mqtt, kafka, gw) = rig(
        &[TOPIC],
        Uplink::Down,
        "max_bytes = 65536\noverflow = \"block\"",
        "keep_alive = \"1s\"\nformat = \"senml\"",
        "",
    );
    let mut messages = Vec::new();
    for seq in 0..n {
        for d in 0..devices {
            let records: Vec<String> = (0..pack)
                .map(|k| format!(r#"{{"n":"temperature","t":{},"v":{k}}}"#, seq * pack + k))
                .collect();
            let payload = format!(r#"[{{"bt":1750000000}},{}]"#, records.join(","));
            messages.push((format!("sensors/dev-{d}/telemetry"), payload.into_bytes()));
        }
    }
    publish_raw(mqtt.port, messages);
    let total = devices * n * pack;
    wait_for("backpressure", Duration::from_secs(30), || {
        gw.metric("gateway_spool_blocked") == 1.0
    });
    // The input waits for room: received stays short of everything.
    let received = || gw.metric("gateway_events_received_total{input=\"site\"}");
    let mut last = -1.0;
    wait_for("the input held back", Duration::from_secs(30), || {
        std::thread::sleep(Duration::from_millis(1000));
        std::mem::replace(&mut last, received()) == last
    });
    assert!(last < total as f64, "held back at {last}");
    // Several keep-alive periods.
    std::thread::sleep(Duration::from_secs(4));
    kafka.up();
    let records = kafka.read(TOPIC, PARTITIONS, Duration::from_secs(90), |r| {
        unique_ids(r) >= total
    });
    assert_eq!(unique_ids(&records), total);
    assert_eq!(
        gw.metric("gateway_input_reconnects_total{input=\"site\"}"),
        0.0,
        "the connection held while the input waited"
    );
    assert_eq!(records.len(), total, "no message came twice");
    // Each device's events in order of their time.
    let mut last_time = std::collections::BTreeMap::<String, i64>::new();
    for r in &records {
        let time = r.value["time_ms"].as_i64().expect("time_ms");
        let before = last_time.insert(r.key.clone(), time);
        assert!(before.is_none_or(|b| b < time), "{} out of order", r.key);
    }
    assert_eq!(gw.dropped_total(), 0.0, "nothing dropped");
}

/// A reload while the router takes nothing (a full spool with `block`, Kafka down, its
/// channel full): the input stops without waiting for room, counting what it held as
/// dropped (`input_stopped`), and the stages' open windows are handed over or, when
/// there is no room for them either, counted as dropped after 5 s
/// (`stage_flush_timeout`). The reload does not wait for Kafka to come back.
#[test]
fn a_reload_while_the_spool_is_full_does_not_wait_for_kafka() {
    let devices = 10;
    let dir = tempfile::tempdir().expect("tempdir");
    let mqtt = Mosquitto::start();
    let kafka = Kafka::start(1, &[TOPIC], PARTITIONS);
    kafka.down();
    // QoS 0, so the broker's in-flight window does not stop the flow before the
    // router's channel is full.
    let cfg = config(
        dir.path(),
        mqtt.port,
        &kafka.bootstrap,
        "max_bytes = 65536\noverflow = \"block\"",
        "",
        "\n[[stages]]\ntype = \"window\"\nsize = \"1h\"\nreadings = [\"temperature\"]\naggregates = [\"count\"]\nkeep_events = true\n",
    )
    .replace("qos = 1", "qos = 0");
    let gw = Gateway::start(dir.path(), &cfg);
    gw.wait_connected();
    let messages: Vec<_> = (0..20_000)
        .map(|i| {
            let d = i % devices;
            (
                format!("sensors/dev-{d}/telemetry"),
                format!(r#"{{"device":"dev-{d}","temperature":20.5}}"#).into_bytes(),
            )
        })
        .collect();
    send_all(mqtt.port, rumqttc::QoS::AtMostOnce, None, messages);
    wait_for("backpressure", Duration::from_secs(30), || {
        gw.metric("gateway_spool_blocked") == 1.0
    });
    // The router's channel full and the input waiting for room: nothing more comes in.
    let mut last = -1.0;
    wait_for("the input held back", Duration::from_secs(30), || {
        std::thread::sleep(Duration::from_millis(1000));
        let now = gw.metric("gateway_events_received_total{input=\"site\"}");
        std::mem::replace(&mut last, now) == now
    });
    // A changed pipeline (the same config is not rebuilt).
    let file = dir.path().join("gateway.toml");
    let text = std::fs::read_to_string(&file).expect("config");
    std::fs::write(&file, text.replace("size = \"1h\"", "size = \"2h\"")).expect("config");
    gw.hup();
    wait_for("the reload", Duration::from_secs(30), || {
        gw.log_text().contains("pipeline reloaded")
    });
    let dropped = |reason: &str| {
        gw.metric(&format!(
            "gateway_events_dropped_total{{input=\"site\",reason=\"{reason}\"}}"
        ))
    };
    assert!(dropped("input_stopped") > 0.0, "the input's waiting batch");
    assert!(gw
        .log_text()
        .contains("stopped while the router had no room"));
    // One window per device: handed over whole, or counted whole (whether the channel
    // had room for them when the input let go of its batch varies).
    assert_eq!(
        gw.metric("gateway_events_generated_total{input=\"site\"}"),
        devices as f64
    );
    let flushed = dropped("stage_flush_timeout");
    assert!(flushed == 0.0 || flushed == devices as f64, "{flushed}");
    assert!(http_get(gw.metrics_port, "/health").is_some());
}

#[test]
fn a_full_spool_with_drop_oldest_counts_every_drop() {
    let (devices, n) = (10, 300);
    let total = devices * n;
    let (_dir, mqtt, kafka, gw) = rig(
        &[TOPIC],
        Uplink::Down,
        "max_bytes = 65536\noverflow = \"drop_oldest\"",
        "",
        "",
    );
    publish(mqtt.port, devices, n, None, None);
    wait_for(
        "every message acknowledged",
        Duration::from_secs(30),
        || gw.metric("gateway_upstream_acks_total{input=\"site\"}") == total as f64,
    );
    // Drops are counted as the budget is enforced at commits: read once they settle.
    let dropped_now =
        || gw.metric("gateway_events_dropped_total{input=\"site\",reason=\"spool_overflow\"}");
    let mut dropped = dropped_now();
    wait_for("the drop count to settle", Duration::from_secs(30), || {
        std::thread::sleep(Duration::from_secs(1));
        let now = dropped_now();
        std::mem::replace(&mut dropped, now) == now
    });
    assert!(dropped > 0.0);
    // The budget holds, give or take the one-row probe that may be in flight.
    assert!(
        gw.metric("gateway_spool_bytes") <= 65536.0 + 1024.0,
        "{}",
        gw.metric("gateway_spool_bytes")
    );
    kafka.up();
    let kept = total - dropped as usize;
    let records = kafka.read(TOPIC, PARTITIONS, Duration::from_secs(60), |r| {
        unique_ids(r) >= kept
    });
    // The gateway is done: everything it delivered is in Kafka, so anything beyond what
    // was kept shows up in one more read.
    wait_for(
        "delivered + dropped = published",
        Duration::from_secs(60),
        || {
            gw.metric("gateway_events_delivered_total{input=\"site\"}") + dropped_now()
                >= total as f64
        },
    );
    assert_eq!(dropped_now(), dropped, "no drop once Kafka is back");
    let all = kafka.read(TOPIC, PARTITIONS, Duration::from_secs(4), |r| {
        r.len() > records.len()
    });
    assert_eq!(
        unique_ids(&all),
        kept,
        "delivered + dropped = published, exactly"
    );
    // drop_oldest never drops the newest: the last event of every device is there.
    for d in 0..devices {
        let id = format!("dev-{d}:{}", n - 1);
        assert!(
            all.iter().any(|r| r.headers["event-id"] == id),
            "{id} delivered"
        );
    }
}

#[test]
fn a_corrupt_spool_at_start_is_quarantined_and_the_gateway_runs() {
    let dir = tempfile::tempdir().expect("tempdir");
    let state = dir.path().join("state");
    std::fs::create_dir_all(&state).expect("state dir");
    std::fs::write(state.join("spool.sqlite"), vec![0x5Au8; 64 * 1024]).expect("garbage");
    // Kafka down: the events must go through the fresh spool, not past it.
    let (_dir, mqtt, kafka, gw) = rig_in(dir, &[TOPIC], Uplink::Down, "", "", "");
    assert_eq!(gw.metric("gateway_spool_quarantined_total"), 1.0);
    let moved = std::fs::read_dir(&state)
        .expect("list")
        .filter_map(|e| e.ok())
        .any(|e| e.file_name().to_string_lossy().contains(".corrupt-"));
    assert!(moved, "the corrupt file was kept aside");
    publish(mqtt.port, 5, 100, None, None);
    wait_for(
        "the fresh spool to hold the events",
        Duration::from_secs(30),
        || gw.metric("gateway_spool_rows") == 500.0,
    );
    kafka.up();
    let records = kafka.read(TOPIC, PARTITIONS, Duration::from_secs(60), |r| {
        unique_ids(r) >= 500
    });
    check_complete_and_ordered(&records, 5, 100);
    wait_for("the spool to drain", Duration::from_secs(30), || {
        gw.metric("gateway_spool_rows") == 0.0
    });
    assert_eq!(gw.dropped_total(), 0.0, "nothing dropped");
}

#[test]
fn sighup_rebuilds_the_pipeline_and_sigterm_spools_the_rest() {
    let (_dir, mqtt, kafka, mut gw) = rig(&[TOPIC, "v2.site"], Uplink::Up, "", "", "");
    publish(mqtt.port, 5, 100, None, None);
    let first = kafka.read(TOPIC, PARTITIONS, Duration::from_secs(30), |r| {
        r.len() >= 500
    });
    assert_eq!(first.len(), 500);
    // New pipeline: another topic and a tag stage.
    let text = std::fs::read_to_string(&gw.config).expect("config");
    let text = text.replace("topic = \"telemetry.{source}\"", "topic = \"v2.{source}\"")
        + "\n[[stages]]\ntype = \"tags\"\ntags = { generation = \"2\" }\n";
    std::fs::write(&gw.config, text).expect("rewrite");
    gw.hup();
    wait_for("the reload", Duration::from_secs(20), || {
        gw.log_text().contains("pipeline reloaded")
    });
    wait_for(
        "the MQTT input to reconnect",
        Duration::from_secs(10),
        || gw.metric("gateway_input_connected{input=\"site\"}") == 1.0,
    );
    // Kafka away, then SIGTERM: what is not confirmed must be in the spool.
    kafka.down();
    let late: Vec<_> = (0..200)
        .map(|i| {
            (
                "sensors/late/telemetry".to_string(),
                format!(r#"{{"seq":{i},"v":1}}"#).into_bytes(),
            )
        })
        .collect();
    publish_raw(mqtt.port, late);
    wait_for("200 more received", Duration::from_secs(20), || {
        gw.metric("gateway_events_received_total{input=\"site\"}") >= 700.0
    });
    let status = gw.terminate();
    assert!(status.success(), "clean exit on SIGTERM: {status:?}");
    // In the spool, not merely unacknowledged (the broker would send those again).
    let config = gw.config.to_str().expect("utf8").to_string();
    let stats = cli(&["spool", "stats", "--config", &config]);
    let text = String::from_utf8_lossy(&stats.stdout);
    assert!(
        stats.status.success() && text.lines().any(|l| l.trim() == "rows:           200"),
        "SIGTERM spooled the 200 unconfirmed events: {text}"
    );
    kafka.up();
    gw.restart();
    let second = kafka.read("v2.site", PARTITIONS, Duration::from_secs(60), |r| {
        unique_ids(r) >= 200
    });
    wait_for("the spool drained", Duration::from_secs(20), || {
        gw.metric("gateway_spool_drained_total") == 200.0
    });
    assert_eq!(
        unique_ids(&second),
        200,
        "events spooled at shutdown were delivered after the restart"
    );
    assert!(second.iter().all(|r| r.value["tags"]["generation"] == "2"));
    assert!(second.iter().all(|r| r.key == "late"));
}

/// Over a 100 ms round trip the router's send gate holds new records while a batch waits
/// for its answer: nothing may be lost, reordered or left waiting, and the gateway stays
/// in direct mode for most records (the gate must not make Kafka look slow).
#[test]
fn over_a_long_uplink_events_arrive_complete_and_in_order() {
    let (devices, n) = (20, 500);
    let (_dir, mqtt, kafka, gw) = rig(&[TOPIC], Uplink::Up, "", "", "");
    kafka.set_rtt(Duration::from_millis(100));
    publish(mqtt.port, devices, n, None, None);
    let records = kafka.read(TOPIC, PARTITIONS, Duration::from_secs(120), |r| {
        unique_ids(r) >= devices * n
    });
    assert_eq!(check_complete_and_ordered(&records, devices, n), 0);
    let total = (devices * n) as f64;
    wait_for(
        "every message acked upstream",
        Duration::from_secs(20),
        || gw.metric("gateway_upstream_acks_total{input=\"site\"}") == total,
    );
    assert_eq!(
        gw.metric("gateway_events_delivered_total{input=\"site\"}"),
        total
    );
    // A gate that waited for `spool_after` (2 s here) would send most records through
    // the spool; a busy machine may now and then push a few there.
    let drained = gw.metric("gateway_spool_drained_total");
    assert!(
        drained < total / 2.0,
        "{drained} of {total} records took the spool's way"
    );
}

#[test]
fn mqtt_5_input_delivers_in_order() {
    let (devices, n) = (10, 1000);
    let (_dir, mqtt, kafka, gw) = rig(
        &[TOPIC],
        Uplink::Up,
        "",
        "protocol = \"v5\"\nreceive_maximum = 500",
        "",
    );
    publish(mqtt.port, devices, n, None, None);
    let records = kafka.read(TOPIC, PARTITIONS, Duration::from_secs(60), |r| {
        unique_ids(r) >= devices * n
    });
    assert_eq!(check_complete_and_ordered(&records, devices, n), 0);
    wait_for(
        "every message acked upstream",
        Duration::from_secs(10),
        || gw.metric("gateway_upstream_acks_total{input=\"site\"}") == (devices * n) as f64,
    );
}

#[test]
fn on_delivery_holds_acks_until_kafka_confirms() {
    let (devices, n) = (5, 200);
    let (_dir, mqtt, kafka, gw) = rig(
        &[TOPIC],
        Uplink::Down,
        "",
        "ack_policy = \"on_delivery\"",
        "",
    );
    publish(mqtt.port, devices, n, None, None);
    wait_for("the events in the spool", Duration::from_secs(20), || {
        gw.metric("gateway_events_spooled_total{input=\"site\"}") >= (devices * n) as f64
    });
    std::thread::sleep(Duration::from_secs(1));
    assert_eq!(
        gw.metric("gateway_upstream_acks_total{input=\"site\"}"),
        0.0,
        "spooled is not delivered"
    );
    kafka.up();
    let records = kafka.read(TOPIC, PARTITIONS, Duration::from_secs(60), |r| {
        unique_ids(r) >= devices * n
    });
    check_complete_and_ordered(&records, devices, n);
    wait_for("acks after delivery", Duration::from_secs(20), || {
        gw.metric("gateway_upstream_acks_total{input=\"site\"}") == (devices * n) as f64
    });
}

/// A tmpfs mount that is unmounted on drop.
struct Tmpfs(std::path::PathBuf);

impl Tmpfs {
    fn mount(path: &std::path::Path, size: &str) -> Option<Tmpfs> {
        std::fs::create_dir_all(path).expect("mount point");
        let ok = std::process::Command::new("mount")
            .args(["-t", "tmpfs", "-o", &format!("size={size}"), "tmpfs"])
            .arg(path)
            .status()
            .is_ok_and(|s| s.success());
        ok.then(|| Tmpfs(path.to_path_buf()))
    }

    /// [`Tmpfs::mount`], or `None` after a SKIPPED line where mounting needs root and
    /// this is not CI (which must be able to).
    fn mount_or_skip(path: &std::path::Path, size: &str) -> Option<Tmpfs> {
        let mounted = Tmpfs::mount(path, size);
        if mounted.is_none() {
            assert!(
                std::env::var_os("CI").is_none(),
                "CI must be able to mount a tmpfs for this test (run as root)"
            );
            eprintln!("SKIPPED: cannot mount a tmpfs here (not root)");
        }
        mounted
    }

    fn resize(&self, size: &str) {
        let ok = std::process::Command::new("mount")
            .args(["-o", &format!("remount,size={size}")])
            .arg(&self.0)
            .status()
            .is_ok_and(|s| s.success());
        assert!(ok, "remount {}", self.0.display());
    }
}

impl Drop for Tmpfs {
    fn drop(&mut self) {
        let _ = std::process::Command::new("umount")
            .arg("-l")
            .arg(&self.0)
            .status();
    }
}

#[test]
fn a_full_disk_holds_inputs_back_and_recovers_when_space_returns() {
    let (devices, n) = (10, 1000);
    let dir = tempfile::tempdir().expect("tempdir");
    // A real full file system: a 1 MiB tmpfs under the spool (needs root, as CI has).
    // Without a reserve, which would not fit (SQLite's own full-disk errors are the
    // subject here; `a_spool_that_fills_its_own_disk_drains_when_kafka_returns` has it).
    let Some(disk) = Tmpfs::mount_or_skip(&dir.path().join("state"), "1m") else {
        return;
    };
    let (_dir, mqtt, kafka, gw) = rig_in(dir, &[TOPIC], Uplink::Down, "reserve_bytes = 0", "", "");
    publish(mqtt.port, devices, n, None, None);
    wait_full_and_held_back(&gw, Duration::from_secs(30));
    assert!(
        http_get(gw.metrics_port, "/health").is_some(),
        "the gateway keeps running"
    );
    let acked = gw.metric("gateway_upstream_acks_total{input=\"site\"}");
    assert!(
        acked < (devices * n) as f64,
        "what could not be stored was not acknowledged ({acked})"
    );
    // Tried again once a second, not on every turn of the router's loop.
    let full = || gw.metric("gateway_spool_errors_total{kind=\"disk_full\"}");
    let before = full();
    std::thread::sleep(Duration::from_secs(3));
    let tries = full() - before;
    assert!(tries <= 5.0, "{tries} writes in 3 s");
    // Space returns, then Kafka: everything arrives, nothing was dropped.
    disk.resize("64m");
    wait_for("spool writes to resume", Duration::from_secs(20), || {
        gw.metric("gateway_spool_blocked") == 0.0
    });
    kafka.up();
    let records = kafka.read(TOPIC, PARTITIONS, Duration::from_secs(90), |r| {
        unique_ids(r) >= devices * n
    });
    check_complete_and_ordered(&records, devices, n);
    assert_eq!(gw.dropped_total(), 0.0, "nothing dropped");
    drop(gw);
}

/// The spool itself fills its disk (its budget is larger than the file system), and no
/// one makes room: once Kafka returns, the spool drains all the same. The reserve file
/// it gave up when the disk filled lets SQLite finish its checkpoint and write the
/// deletes that make room; once the spool is empty the space goes back to the file
/// system and the reserve is taken again.
#[test]
fn a_spool_that_fills_its_own_disk_drains_when_kafka_returns() {
    let (devices, n) = (20, 8000);
    let dir = tempfile::tempdir().expect("tempdir");
    let Some(_disk) = Tmpfs::mount_or_skip(&dir.path().join("state"), "24m") else {
        return;
    };
    let (_dir, mqtt, kafka, gw) = rig_in(
        dir,
        &[TOPIC],
        Uplink::Down,
        "max_bytes = 1073741824",
        "",
        "",
    );
    let reserve = gw.metric("gateway_spool_reserve_bytes");
    assert_eq!(
        reserve,
        8.0 * 1024.0 * 1024.0,
        "the default reserve is held"
    );
    publish(mqtt.port, devices, n, None, None);
    wait_full_and_held_back(&gw, Duration::from_secs(60));
    assert_eq!(
        gw.metric("gateway_spool_reserve_bytes"),
        0.0,
        "the reserve was given up"
    );
    let spooled = gw.metric("gateway_spool_rows");
    assert!(
        spooled < (devices * n) as f64,
        "the disk filled before the spool took everything ({spooled} rows)"
    );
    kafka.up();
    let records = kafka.read(TOPIC, PARTITIONS, Duration::from_secs(120), |r| {
        unique_ids(r) >= devices * n
    });
    check_complete_and_ordered(&records, devices, n);
    wait_for(
        "the spool empty, writes working and the reserve back",
        Duration::from_secs(30),
        || {
            gw.metric("gateway_spool_rows") == 0.0
                && gw.metric("gateway_spool_blocked") == 0.0
                && gw.metric("gateway_spool_reserve_bytes") == reserve
        },
    );
    assert_eq!(
        gw.log_text().matches("cannot write the spool").count(),
        1,
        "SQLite found the disk full once: from then on the spool kept the reserve's room free"
    );
    assert_eq!(gw.dropped_total(), 0.0, "nothing dropped");
}

/// Waits until the spool's disk is full (SQLite said so, or appends were held back for
/// want of room) within `fill_within`, and then until the inputs are held back.
fn wait_full_and_held_back(gw: &Gateway, fill_within: Duration) {
    wait_for("the disk to fill", fill_within, || {
        gw.metric("gateway_spool_errors_total{kind=\"disk_full\"}") > 0.0
    });
    wait_for("inputs held back", Duration::from_secs(10), || {
        gw.metric("gateway_spool_blocked") == 1.0
    });
}

/// Fills the file system of `dir` with a file; returns its path.
fn fill_up(dir: &std::path::Path) -> std::path::PathBuf {
    use std::io::Write;
    let filler = dir.join("filler");
    let mut f = std::fs::File::create(&filler).expect("filler");
    while f.write_all(&[0u8; 4096]).and_then(|()| f.flush()).is_ok() {}
    filler
}

/// Kafka stops confirming while the disk is full: the spool copies of the direct
/// records cannot be written (the reserve is given up, and new rows keep out of its
/// room), and then Kafka confirms the records after all. The copies are forgotten with
/// the deletes that confirm them, not spooled once there is room and sent again.
#[test]
fn copies_of_records_kafka_confirms_while_the_disk_is_full_are_not_sent_again() {
    let (devices, n) = (10, 100);
    let dir = tempfile::tempdir().expect("tempdir");
    let state = dir.path().join("state");
    let Some(_disk) = Tmpfs::mount_or_skip(&state, "20m") else {
        return;
    };
    let (_dir, mqtt, kafka, gw) = rig_in(dir, &[TOPIC], Uplink::Up, "", "", "");
    let reserve = gw.metric("gateway_spool_reserve_bytes");
    assert!(reserve > 0.0, "the reserve is held");
    let filler = fill_up(&state);
    kafka.down();
    publish(mqtt.port, devices, n, None, None);
    wait_for("the reserve given up", Duration::from_secs(30), || {
        gw.metric("gateway_spool_reserve_bytes") == 0.0
    });
    wait_for("inputs held back", Duration::from_secs(10), || {
        gw.metric("gateway_spool_blocked") == 1.0
    });
    // Kafka confirms what was sent straight to it; the rest waits for room.
    kafka.up();
    wait_for(
        "the direct records confirmed",
        Duration::from_secs(30),
        || {
            gw.metric("gateway_kafka_inflight") == 0.0
                && gw.metric("gateway_events_delivered_total{input=\"site\"}") > 0.0
        },
    );
    let direct = gw.metric("gateway_events_delivered_total{input=\"site\"}");
    // Room again: copies still kept would be spooled now with the rest, and drained.
    std::fs::remove_file(&filler).expect("free the space");
    let records = kafka.read(TOPIC, PARTITIONS, Duration::from_secs(60), |r| {
        unique_ids(r) >= devices * n
    });
    check_complete_and_ordered(&records, devices, n);
    wait_for("the spool drained", Duration::from_secs(30), || {
        gw.metric("gateway_spool_rows") == 0.0 && gw.metric("gateway_spool_blocked") == 0.0
    });
    assert_eq!(records.len(), devices * n, "no record twice");
    assert_eq!(
        gw.metric("gateway_spool_drained_total"),
        (devices * n) as f64 - direct,
        "what Kafka confirmed straight away did not go through the spool"
    );
}

/// The spool's disk is full when the gateway starts (it stopped cleanly, so SQLite has
/// to create the WAL's shared-memory file again, and cannot). The gateway waits for room
/// instead of exiting, which under a service manager is a restart loop that never
/// drains the backlog, and opens the spool once space returns.
#[test]
fn a_full_disk_at_start_is_waited_out() {
    full_disk_at_start(false);
}

/// The same with a reserve file: the gateway gives it up and opens the spool at once.
#[test]
fn a_full_disk_at_start_takes_the_reserve() {
    full_disk_at_start(true);
}

fn full_disk_at_start(reserve: bool) {
    let (devices, n) = (5, 100);
    let dir = tempfile::tempdir().expect("tempdir");
    let state = dir.path().join("state");
    let Some(_disk) = Tmpfs::mount_or_skip(&state, if reserve { "24m" } else { "1m" }) else {
        return;
    };
    let spool = if reserve { "" } else { "reserve_bytes = 0" };
    let (_dir, mqtt, kafka, mut gw) = rig_in(dir, &[TOPIC], Uplink::Down, spool, "", "");
    publish(mqtt.port, devices, n, None, None);
    wait_for("spooled", Duration::from_secs(30), || {
        gw.metric("gateway_spool_rows") == (devices * n) as f64
    });
    assert_eq!(
        gw.metric("gateway_spool_reserve_bytes") > 0.0,
        reserve,
        "the reserve held or not"
    );
    assert!(gw.terminate().success());
    let filler = fill_up(&state);
    gw.restart_unready();
    if reserve {
        wait_for("the spool open", Duration::from_secs(20), || {
            http_get(gw.metrics_port, "/health").is_some()
        });
        assert!(
            gw.log_text()
                .contains("gave up its reserve and trying again"),
            "opened in the reserve's room"
        );
    } else {
        wait_for("the spool tried again", Duration::from_secs(20), || {
            gw.log_text()
                .contains("cannot open the spool (is the disk full?)")
                && gw.metric("gateway_spool_errors_total{kind=\"io\"}") >= 2.0
        });
        assert!(
            http_get(gw.metrics_port, "/health").is_none(),
            "not healthy without a spool"
        );
        std::fs::remove_file(&filler).expect("free the space");
        wait_for("the spool open", Duration::from_secs(20), || {
            http_get(gw.metrics_port, "/health").is_some()
        });
    }
    kafka.up();
    let records = kafka.read(TOPIC, PARTITIONS, Duration::from_secs(60), |r| {
        unique_ids(r) >= devices * n
    });
    check_complete_and_ordered(&records, devices, n);
}

fn cli(args: &[&str]) -> std::process::Output {
    gateway_command()
        .args(args)
        .output()
        .expect("run the gateway command")
}

#[test]
fn check_config_reports_positions_and_print_config_is_valid() {
    let dir = tempfile::tempdir().expect("tempdir");
    let bad = dir.path().join("bad.toml");
    std::fs::write(&bad, "[gateway]\nid = \"g\"\nstate_dir = \"/tmp\"\ncolour = 1\n[output.kafka]\nbrokers = \"k:1\"\n").expect("write");
    let out = cli(&["check-config", bad.to_str().expect("utf8")]);
    assert_eq!(out.status.code(), Some(2));
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(
        err.contains("bad.toml:4:1") && err.contains("colour"),
        "{err}"
    );

    let printed = cli(&["print-config"]);
    assert!(printed.status.success());
    let good = dir.path().join("good.toml");
    std::fs::write(&good, &printed.stdout).expect("write");
    let out = cli(&["check-config", good.to_str().expect("utf8")]);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
}

#[test]
fn spool_stats_and_export_read_what_sigterm_left() {
    let (_dir, mqtt, _kafka, mut gw) = rig(&[TOPIC], Uplink::Down, "", "", "");
    publish(mqtt.port, 5, 10, None, None);
    wait_for("50 received", Duration::from_secs(10), || {
        gw.metric("gateway_events_received_total{input=\"site\"}") == 50.0
    });
    assert!(gw.terminate().success());
    let config = gw.config.to_str().expect("utf8").to_string();
    let stats = cli(&["spool", "stats", "--config", &config]);
    let text = String::from_utf8_lossy(&stats.stdout);
    assert!(
        stats.status.success() && text.contains("rows:           50"),
        "{text}"
    );
    assert!(text.contains("input site: 50 rows"), "{text}");
    let check = cli(&["spool", "check", "--config", &config]);
    assert!(
        check.status.success(),
        "{}",
        String::from_utf8_lossy(&check.stdout)
    );
    let export = cli(&["spool", "export", "--config", &config]);
    let lines: Vec<serde_json::Value> = String::from_utf8_lossy(&export.stdout)
        .lines()
        .map(|l| serde_json::from_str(l).expect("a JSON line"))
        .collect();
    assert_eq!(lines.len(), 50);
    assert!(lines
        .iter()
        .all(|l| l["schema"] == "edge-gateway.event.v1" && l["seq"].is_u64()));
    let seqs: Vec<u64> = lines.iter().filter_map(|l| l["seq"].as_u64()).collect();
    assert!(
        seqs.windows(2).all(|w| w[0] < w[1]),
        "exported in spool order"
    );
}

#[test]
fn a_record_kafka_rejects_for_good_is_counted_and_does_not_block_the_spool() {
    rejected_for_good(false);
}

/// The same with the quarantine table refusing rows (as on a full disk): a rejected
/// spool row is deleted instead, counted once, and the spool empties.
#[test]
fn a_rejected_row_that_cannot_be_quarantined_is_deleted_and_counted_once() {
    rejected_for_good(true);
}

fn rejected_for_good(quarantine_fails: bool) {
    // Records above 4000 bytes are refused by the producer (as a broker's limit would).
    let (dir, mqtt, kafka, gw) = rig(
        &[TOPIC],
        Uplink::Up,
        "",
        "",
        "[output.kafka.options]\n\"message.max.bytes\" = \"4000\"",
    );
    let event = |seq: usize| {
        (
            "sensors/dev-0/telemetry".to_string(),
            format!(r#"{{"seq":{seq},"v":1}}"#).into_bytes(),
        )
    };
    let poison = || {
        let big = "x".repeat(6000);
        (
            "sensors/poison/telemetry".to_string(),
            format!(r#"{{"note":"{big}"}}"#).into_bytes(),
        )
    };
    // Direct mode, then spooling mode: a poison record in each.
    let mut first: Vec<_> = (0..100).map(event).collect();
    first.push(poison());
    first.extend((100..200).map(event));
    publish_raw(mqtt.port, first);
    wait_for("direct deliveries", Duration::from_secs(20), || {
        gw.metric("gateway_events_delivered_total{input=\"site\"}") == 200.0
    });
    kafka.down();
    publish_raw(mqtt.port, (200..300).map(event).collect());
    // The second poison record only once the router spools: it is refused as a spool
    // row, when the drain sends it.
    wait_for("spooling", Duration::from_secs(20), || {
        gw.metric("gateway_spooling") == 1.0
    });
    let mut second = vec![poison()];
    second.extend((300..400).map(event));
    publish_raw(mqtt.port, second);
    wait_for("spooled", Duration::from_secs(20), || {
        gw.metric("gateway_spool_rows") >= 200.0
    });
    if quarantine_fails {
        // Another connection to the running gateway's spool adds a trigger that fails
        // every insert into the quarantine table.
        let spool = rusqlite::Connection::open(dir.path().join("state/spool.sqlite"))
            .expect("open the spool");
        spool
            .execute_batch(
                "CREATE TRIGGER no_room BEFORE INSERT ON quarantine \
                 BEGIN SELECT RAISE(FAIL, 'no room (test)'); END;",
            )
            .expect("trigger");
    }
    kafka.up();
    let records = kafka.read(TOPIC, PARTITIONS, Duration::from_secs(60), |r| {
        unique_ids(r) >= 400
    });
    check_complete_and_ordered(&records, 1, 400);
    let rejected = "gateway_events_dropped_total{input=\"site\",reason=\"kafka_rejected\"}";
    wait_for("both rejects counted", Duration::from_secs(20), || {
        gw.metric(rejected) == 2.0
    });
    wait_for("the spool empty", Duration::from_secs(20), || {
        gw.metric("gateway_spool_rows") == 0.0
    });
    let quarantined: i64 = rusqlite::Connection::open(dir.path().join("state/spool.sqlite"))
        .and_then(|c| c.query_row("SELECT count(*) FROM quarantine", [], |r| r.get(0)))
        .expect("count the quarantine table");
    if !quarantine_fails {
        assert_eq!(quarantined, 2, "both poison records set aside");
    } else {
        assert_eq!(quarantined, 1, "the direct one, before the trigger");
        assert!(
            gw.log_text()
                .contains("cannot quarantine spool rows; deleting them"),
            "{}",
            gw.log_text()
        );
        // Not sent, refused and counted again by later drains.
        std::thread::sleep(Duration::from_secs(2));
        assert_eq!(gw.metric(rejected), 2.0);
        assert_eq!(gw.metric("gateway_spooling"), 0.0, "back in direct mode");
    }
}

/// Kafka options for the refused-topic tests: auto-creation off, a missing topic known
/// for one after a second, and a `route` stage that sends device "ghost" to `topic`.
fn ghost_routed_to(topic: &str, topic_refused_after: &str) -> String {
    format!(
        r#"topic_refused_after = "{topic_refused_after}"
options = {{ "allow.auto.create.topics" = "false", "topic.metadata.propagation.max.ms" = "1000" }}

[[stages]]
type = "route"

[[stages.rules]]
when = 'device == "ghost"'
topic = "{topic}"
"#
    )
}

/// A small JSON reading of `device` numbered `seq` (and `pad` bytes of padding).
fn numbered(device: &str, seq: usize, pad: usize) -> (String, Vec<u8>) {
    let pad = if pad > 0 {
        format!(r#","pad":"{}""#, "x".repeat(pad))
    } else {
        String::new()
    };
    (
        format!("sensors/{device}/telemetry"),
        format!(r#"{{"seq":{seq},"v":1{pad}}}"#).into_bytes(),
    )
}

#[test]
fn a_record_for_a_missing_topic_is_set_aside_and_the_rest_flow() {
    // With topic auto-creation off, a `route` to a topic that does not exist made Kafka
    // "unhealthy": the record went to the spool, the drain probed with it once a second,
    // and nothing behind it, of any device, was sent again. Now it is retried for
    // `topic_refused_after`, then set aside.
    let kafka_extra = &ghost_routed_to("nowhere", "3s");
    let (dir, mqtt, kafka, gw) = rig(&[TOPIC], Uplink::Up, "", "", kafka_extra);
    let event = |device: &str, seq: usize| numbered(device, seq, 0);
    let mut messages: Vec<_> = (0..100).map(|i| event("dev-0", i)).collect();
    messages.push(event("ghost", 0));
    messages.extend((100..200).map(|i| event("dev-0", i)));
    publish_raw(mqtt.port, messages);
    wait_for(
        "the ghost record set aside",
        Duration::from_secs(30),
        || {
            gw.metric("gateway_events_dropped_total{input=\"site\",reason=\"kafka_rejected\"}")
                == 1.0
        },
    );
    // And the gateway still sends: more events after the refusal, in direct mode.
    publish_raw(mqtt.port, (200..300).map(|i| event("dev-0", i)).collect());
    let records = kafka.read(TOPIC, PARTITIONS, Duration::from_secs(60), |r| {
        unique_ids(r) >= 300
    });
    assert_eq!(unique_ids(&records), 300, "every dev-0 event, none lost");
    wait_for("every event delivered", Duration::from_secs(20), || {
        gw.metric("gateway_events_delivered_total{input=\"site\"}") == 300.0
            && gw.metric("gateway_spool_rows") == 0.0
    });
    let (quarantined, data): (i64, Vec<u8>) =
        rusqlite::Connection::open(dir.path().join("state/spool.sqlite"))
            .and_then(|c| {
                c.query_row("SELECT count(*), max(data) FROM quarantine", [], |r| {
                    Ok((r.get(0)?, r.get(1)?))
                })
            })
            .expect("read the quarantine table");
    assert_eq!(quarantined, 1, "the ghost's record set aside, not lost");
    assert!(
        String::from_utf8_lossy(&data).contains("ghost"),
        "the quarantined row is the ghost's record"
    );
}

#[test]
fn a_refused_topic_holds_back_only_its_own_records() {
    // A route to a topic not made yet (auto-creation off): its records wait in the
    // spool, every other record flows meanwhile, and once the topic exists they go, in
    // order, well inside topic_refused_after. (It held everything back before.)
    let kafka_extra = &ghost_routed_to("later", "10m");
    let (_dir, mqtt, kafka, gw) = rig(&[TOPIC], Uplink::Up, "", "", kafka_extra);
    let event = |device: &str, seq: usize| numbered(device, seq, 0);
    let mut messages: Vec<_> = (0..100).map(|i| event("dev-0", i)).collect();
    messages.extend([event("ghost", 0), event("ghost", 1)]);
    messages.extend((100..200).map(|i| event("dev-0", i)));
    messages.push(event("ghost", 2));
    publish_raw(mqtt.port, messages);
    let records = kafka.read(TOPIC, PARTITIONS, Duration::from_secs(30), |r| {
        unique_ids(r) >= 200
    });
    assert_eq!(
        unique_ids(&records),
        200,
        "every dev-0 event while the ghost's wait"
    );
    wait_for(
        "the ghost's records parked",
        Duration::from_secs(20),
        || {
            gw.metric("gateway_spool_rows") == 3.0
                && gw.metric("gateway_events_delivered_total{input=\"site\"}") == 200.0
        },
    );
    // More flows while they wait.
    publish_raw(mqtt.port, (200..300).map(|i| event("dev-0", i)).collect());
    let records = kafka.read(TOPIC, PARTITIONS, Duration::from_secs(30), |r| {
        unique_ids(r) >= 300
    });
    assert_eq!(unique_ids(&records), 300);
    assert_eq!(gw.metric("gateway_spool_rows"), 3.0, "still parked");
    // The operator makes the topic: the parked records go, in order.
    kafka.create_topic("later", PARTITIONS);
    let ghost = kafka.read("later", PARTITIONS, Duration::from_secs(30), |r| {
        unique_ids(r) >= 3
    });
    let first_seen: Vec<String> = {
        let mut seen = std::collections::BTreeSet::new();
        ghost
            .iter()
            .map(|r| r.headers["event-id"].clone())
            .filter(|id| seen.insert(id.clone()))
            .collect()
    };
    assert_eq!(first_seen, ["ghost:0", "ghost:1", "ghost:2"], "in order");
    wait_for("everything delivered", Duration::from_secs(20), || {
        gw.metric("gateway_events_delivered_total{input=\"site\"}") == 303.0
            && gw.metric("gateway_spool_rows") == 0.0
    });
    assert_eq!(gw.dropped_total(), 0.0, "nothing set aside or dropped");
}

#[test]
fn drop_oldest_takes_a_refused_topics_parked_records_first() {
    // A full spool (drop_oldest) while one topic is refused: its parked records are the
    // oldest and go first; the other topic's records all get through.
    let kafka_extra = &ghost_routed_to("later", "10m");
    let (_dir, mqtt, kafka, gw) = rig(
        &[TOPIC],
        Uplink::Up,
        "max_bytes = 65536\noverflow = \"drop_oldest\"",
        "",
        kafka_extra,
    );
    let event = |device: &str, seq: usize| numbered(device, seq, 100);
    // 1500 of the ghost's (far over the budget once parked), then 300 of dev-0.
    publish_raw(mqtt.port, (0..1500).map(|i| event("ghost", i)).collect());
    publish_raw(mqtt.port, (0..300).map(|i| event("dev-0", i)).collect());
    let records = kafka.read(TOPIC, PARTITIONS, Duration::from_secs(30), |r| {
        unique_ids(r) >= 300
    });
    assert_eq!(unique_ids(&records), 300, "every dev-0 event");
    let dropped =
        || gw.metric("gateway_events_dropped_total{input=\"site\",reason=\"spool_overflow\"}");
    assert!(dropped() > 0.0, "the budget was enforced");
    // The topic is made: the ghost's records left go, in order, and are the newest.
    kafka.create_topic("later", PARTITIONS);
    wait_for("the spool to empty", Duration::from_secs(60), || {
        gw.metric("gateway_spool_rows") == 0.0
    });
    let dropped = dropped() as usize;
    let ghost = kafka.read("later", PARTITIONS, Duration::from_secs(30), |r| {
        unique_ids(r) + dropped >= 1500
    });
    let mut seen = std::collections::BTreeSet::new();
    let seqs: Vec<usize> = ghost
        .iter()
        .filter(|r| seen.insert(r.headers["event-id"].clone()))
        .map(|r| {
            let id = &r.headers["event-id"];
            id.rsplit(':')
                .next()
                .and_then(|n| n.parse().ok())
                .expect("seq in id")
        })
        .collect();
    assert_eq!(
        seqs.len() + dropped,
        1500,
        "delivered + dropped = published"
    );
    assert_eq!(
        seqs,
        (dropped..1500).collect::<Vec<_>>(),
        "the oldest dropped, the rest in order"
    );
}

#[test]
fn a_missing_topic_that_is_all_there_is_is_probed_until_it_is_made() {
    // Every record goes to one topic, which does not exist (auto-creation off), and
    // librdkafka takes longer than spool_after to say so: the router spools as for a slow
    // Kafka ("unhealthy"), and every spooled row is parked. Probes go on regardless, so
    // once the topic is made everything goes, in order.
    let kafka_extra = r#"topic_refused_after = "10m"
options = { "allow.auto.create.topics" = "false", "topic.metadata.propagation.max.ms" = "4000" }
"#;
    let (_dir, mqtt, kafka, gw) = rig(&[], Uplink::Up, "", "", kafka_extra);
    publish(mqtt.port, 5, 100, None, None);
    wait_for("every event parked", Duration::from_secs(30), || {
        gw.metric("gateway_spool_rows") == 500.0
            && gw.metric("gateway_kafka_errors_total{kind=\"unknown_topic\"}") > 0.0
    });
    kafka.create_topic(TOPIC, PARTITIONS);
    let records = kafka.read(TOPIC, PARTITIONS, Duration::from_secs(60), |r| {
        unique_ids(r) >= 500
    });
    check_complete_and_ordered(&records, 5, 100);
    wait_for("the spool to empty", Duration::from_secs(30), || {
        gw.metric("gateway_spool_rows") == 0.0
    });
    assert_eq!(gw.dropped_total(), 0.0, "nothing set aside or dropped");
}

#[test]
fn a_topic_removed_by_a_reload_is_counted_not_decoded() {
    // The broker keeps a persistent session's subscriptions: after a reload that
    // removed a topic, it still sends that topic's messages. They were decoded as the
    // input's own (with no device from the topic), and those naming a device in the
    // payload went to Kafka.
    let dir = tempfile::tempdir().expect("tempdir");
    let mqtt = Mosquitto::start();
    let kafka = Kafka::start(1, &[TOPIC], PARTITIONS);
    let both = config(dir.path(), mqtt.port, &kafka.bootstrap, "", "", "").replace(
        r#"topics = ["sensors/{device}/telemetry"]"#,
        r#"topics = ["sensors/{device}/telemetry", "legacy/#"]"#,
    );
    let gw = Gateway::start(dir.path(), &both);
    gw.wait_connected();
    let legacy = |seq: usize| {
        (
            "legacy/old".to_string(),
            format!(r#"{{"device":"dev-legacy","seq":{seq},"v":1}}"#).into_bytes(),
        )
    };
    publish_raw(mqtt.port, vec![legacy(0)]);
    wait_for("the legacy topic taken", Duration::from_secs(20), || {
        gw.metric("gateway_events_delivered_total{input=\"site\"}") == 1.0
    });
    let text = std::fs::read_to_string(&gw.config).expect("config");
    std::fs::write(&gw.config, text.replace(r#", "legacy/#""#, "")).expect("rewrite");
    gw.hup();
    wait_for("the reload", Duration::from_secs(20), || {
        gw.log_text().contains("pipeline reloaded")
    });
    gw.wait_connected();
    let mut messages: Vec<_> = (1..4).map(legacy).collect();
    messages.push((
        "sensors/dev-0/telemetry".to_string(),
        br#"{"seq":0,"v":1}"#.to_vec(),
    ));
    publish_raw(mqtt.port, messages);
    wait_for(
        "the new topic's event delivered",
        Duration::from_secs(20),
        || gw.metric("gateway_events_delivered_total{input=\"site\"}") == 2.0,
    );
    wait_for("the legacy ones counted", Duration::from_secs(20), || {
        gw.metric("gateway_events_dropped_total{input=\"site\",reason=\"unsubscribed_topic\"}")
            == 3.0
    });
    std::thread::sleep(Duration::from_millis(500));
    assert_eq!(
        gw.metric("gateway_events_delivered_total{input=\"site\"}"),
        2.0,
        "the removed topic's messages are not decoded and sent"
    );
}

#[test]
fn an_oversized_mqtt_message_is_counted_not_a_reconnect_loop() {
    // MQTT 3.1.1 cannot tell the broker a size limit. A message far over `max_payload`
    // used to make rumqttc drop the connection, and with a persistent session the broker
    // sent it again at every reconnect: the input never got past it.
    let (_dir, mqtt, kafka, gw) = rig(&[TOPIC], Uplink::Up, "", "max_payload = 1000", "");
    let event = |seq: usize| {
        (
            "sensors/dev-0/telemetry".to_string(),
            format!(r#"{{"seq":{seq},"v":1}}"#).into_bytes(),
        )
    };
    let mut messages: Vec<_> = (0..50).map(event).collect();
    messages.push((
        "sensors/dev-0/telemetry".to_string(),
        format!(r#"{{"note":"{}"}}"#, "x".repeat(100_000)).into_bytes(),
    ));
    messages.extend((50..100).map(event));
    publish_raw(mqtt.port, messages);
    let records = kafka.read(TOPIC, PARTITIONS, Duration::from_secs(60), |r| {
        unique_ids(r) >= 100
    });
    assert_eq!(unique_ids(&records), 100);
    wait_for("the large message counted", Duration::from_secs(20), || {
        gw.metric("gateway_events_dropped_total{input=\"site\",reason=\"too_large\"}") == 1.0
    });
    assert_eq!(
        gw.metric("gateway_input_reconnects_total{input=\"site\"}"),
        0.0
    );
}

#[test]
fn a_batch_the_broker_refuses_as_a_whole_loses_no_record() {
    // A broker refuses a whole produce request as too large (a topic whose
    // max.message.bytes is below the batch) or with a bad timestamp (brokers without
    // per-record errors): the records are sent again one at a time, and only one that
    // fails alone would be set aside. Here the refusal is the broker's once: nothing is.
    let (_dir, mqtt, kafka, gw) = rig(&[TOPIC], Uplink::Up, "", "", "");
    kafka.push_request_errors(
        0,
        &[rdkafka::types::RDKafkaRespErr::RD_KAFKA_RESP_ERR_MSG_SIZE_TOO_LARGE],
    );
    publish(mqtt.port, 1, 300, None, None);
    let records = kafka.read(TOPIC, PARTITIONS, Duration::from_secs(60), |r| {
        unique_ids(r) >= 300
    });
    // Complete, but not necessarily in order: records sent after the refused batch, and
    // confirmed before its report came, are ahead of it (ARCHITECTURE invariant 4).
    let seqs: std::collections::BTreeSet<u64> = records
        .iter()
        .filter_map(|r| r.headers.get("event-id")?.rsplit(':').next()?.parse().ok())
        .collect();
    assert_eq!(seqs, (0..300).collect(), "every event, once at least");
    wait_for("every event delivered", Duration::from_secs(20), || {
        gw.metric("gateway_events_delivered_total{input=\"site\"}") == 300.0
    });
    let log = gw.log_text();
    assert!(
        log.contains("sending them one at a time"),
        "the refused batch was taken apart:\n{log}"
    );
    // Every record went through alone: the warning points at batch_bytes.
    wait_for("the end of the isolation", Duration::from_secs(20), || {
        gw.log_text()
            .contains("every record of the refused batch went through alone")
    });
    assert_eq!(
        gw.metric("gateway_events_dropped_total{input=\"site\",reason=\"kafka_rejected\"}"),
        0.0
    );
}

#[test]
fn after_a_fatal_producer_error_the_producer_is_recreated_and_nothing_is_lost() {
    // The first InitProducerId is refused with an error librdkafka's idempotent producer
    // cannot recover from (a fatal error); a new producer asks again and is let in.
    let (_dir, mqtt, kafka, gw) = rig(&[TOPIC], Uplink::Down, "", "", "");
    kafka.push_request_errors(
        22,
        &[rdkafka::types::RDKafkaRespErr::RD_KAFKA_RESP_ERR_CLUSTER_AUTHORIZATION_FAILED],
    );
    kafka.up();
    publish(mqtt.port, 1, 300, None, None);
    let records = kafka.read(TOPIC, PARTITIONS, Duration::from_secs(60), |r| {
        unique_ids(r) >= 300
    });
    check_complete_and_ordered(&records, 1, 300);
    let log = gw.log_text();
    assert!(
        log.contains("fatal Kafka producer error"),
        "the fatal error was noticed:\n{log}"
    );
    assert!(
        log.contains("Kafka output replaced"),
        "the producer was recreated:\n{log}"
    );
    wait_for("every event delivered", Duration::from_secs(20), || {
        gw.metric("gateway_events_delivered_total{input=\"site\"}") == 300.0
    });
    assert_eq!(gw.metric("gateway_kafka_errors_total{kind=\"fatal\"}"), 1.0);
}

/// A CA, a server certificate for 127.0.0.1 and a client certificate, made with the
/// openssl command.
fn make_certs(dir: &std::path::Path) {
    let run = |args: &str| {
        let ok = std::process::Command::new("sh")
            .arg("-c")
            .arg(format!("cd '{}' && openssl {args}", dir.display()))
            .stdout(std::process::Stdio::null())
            .stderr(std::process::Stdio::null())
            .status()
            .is_ok_and(|s| s.success());
        assert!(ok, "openssl {args}");
    };
    let key = "-newkey ec -pkeyopt ec_paramgen_curve:prime256v1 -nodes";
    run(&format!(
        "req -x509 {key} -keyout ca.key -out ca.pem -days 2 -subj /CN=test-ca"
    ));
    std::fs::write(
        dir.join("server.ext"),
        "subjectAltName=IP:127.0.0.1\nextendedKeyUsage=serverAuth\n",
    )
    .expect("ext");
    std::fs::write(dir.join("client.ext"), "extendedKeyUsage=clientAuth\n").expect("ext");
    for who in ["server", "client"] {
        run(&format!(
            "req {key} -keyout {who}.key -out {who}.csr -subj /CN={who}"
        ));
        run(&format!(
            "x509 -req -in {who}.csr -CA ca.pem -CAkey ca.key -CAcreateserial -out {who}.pem -days 2 -extfile {who}.ext"
        ));
    }
}

/// `openssl s_server` on a free port (one connection at a time), requiring a client certificate
/// signed by `ca.pem` in `server_certs` and presenting that directory's `server.pem`.
/// Returns the port, the process (stdin held open: s_server stops at its end) and the
/// file its output goes to.
fn tls_server(server_certs: &std::path::Path) -> (u16, std::process::Child, std::path::PathBuf) {
    let out = server_certs.join(format!("s_server-{}.out", free_port()));
    let port = free_port();
    let child = std::process::Command::new("openssl")
        .current_dir(server_certs)
        .args(["s_server", "-accept"])
        .arg(port.to_string())
        .args([
            "-cert",
            "server.pem",
            "-key",
            "server.key",
            "-CAfile",
            "ca.pem",
        ])
        .args(["-Verify", "1", "-verify_return_error"])
        .stdin(std::process::Stdio::piped())
        .stdout(std::fs::File::create(&out).expect("output file"))
        .stderr(std::process::Stdio::from(
            std::fs::OpenOptions::new()
                .append(true)
                .open(&out)
                .expect("output file"),
        ))
        .spawn()
        .expect("openssl s_server (.ci/setup installs openssl)");
    let text = || std::fs::read_to_string(&out).unwrap_or_default();
    wait_for("s_server to listen", Duration::from_secs(10), || {
        text().contains("ACCEPT")
    });
    (port, child, out)
}

/// The Kafka output's TLS, on the binary under test (the device builds, with their
/// reduced OpenSSL, in `.ci/arm`): librdkafka verifies a real TLS server against the
/// configured CA and its IP address, presents the client certificate, and speaks Kafka
/// over the connection (its first request carries the client id). No Kafka-protocol broker
/// the suite can start serves TLS, so the server is `openssl s_server`; a server whose
/// certificate another CA signed must be refused.
#[test]
fn kafka_over_mutual_tls() {
    let certs = tempfile::tempdir().expect("tempdir");
    make_certs(certs.path());
    let other = tempfile::tempdir().expect("tempdir");
    make_certs(other.path());
    // The impostor presents a certificate of another CA but accepts our client.
    std::fs::copy(certs.path().join("ca.pem"), other.path().join("ca.pem")).expect("copy");
    let c = |f: &str| certs.path().join(f).display().to_string();
    for (server_certs, trusted) in [(certs.path(), true), (other.path(), false)] {
        let (port, mut server, out) = tls_server(server_certs);
        let dir = tempfile::tempdir().expect("tempdir");
        let text = config(dir.path(), free_port(), "unused", "", "", "").replace(
            "brokers = \"unused\"",
            &format!(
                "brokers = \"127.0.0.1:{port}\"\nsecurity = {{ protocol = \"ssl\", ca_file = \"{}\", client_cert_file = \"{}\", client_key_file = \"{}\" }}",
                c("ca.pem"),
                c("client.pem"),
                c("client.key")
            ),
        );
        let gw = Gateway::start(dir.path(), &text);
        let seen = || std::fs::read_to_string(&out).unwrap_or_default();
        if trusted {
            wait_for(
                "the Kafka client's first request over TLS",
                Duration::from_secs(30),
                || seen().contains("edge-gateway-gw-test"),
            );
            let seen = seen().replace(" = ", "=");
            assert!(
                seen.contains("subject=CN=client"),
                "client certificate: {seen}"
            );
            assert!(seen.contains("CIPHER is TLS_"), "a TLS 1.3 suite: {seen}");
        } else {
            let start = std::time::Instant::now();
            while !gw.log_text().contains("certificate verify failed") {
                let log = gw.log_text();
                let kafka: Vec<&str> = log.lines().filter(|l| l.contains("kafka")).collect();
                assert!(
                    start.elapsed() < Duration::from_secs(30),
                    "no refusal in the gateway's log; its Kafka lines:\n{}\ns_server:\n{}",
                    kafka.join("\n"),
                    seen()
                );
                std::thread::sleep(Duration::from_millis(100));
            }
            assert!(
                !seen().contains("edge-gateway-gw-test"),
                "nothing sent: {}",
                seen()
            );
        }
        drop(gw);
        let _ = server.kill();
        let _ = server.wait();
    }
}

#[test]
fn mqtt_over_mutual_tls() {
    let certs = tempfile::tempdir().expect("tempdir");
    make_certs(certs.path());
    // Mosquitto started as root drops to its own user before it reads the files.
    let readable = std::process::Command::new("chmod")
        .args(["-R", "a+rX"])
        .arg(certs.path())
        .status()
        .is_ok_and(|s| s.success());
    assert!(readable, "chmod the certificates");
    let c = |f: &str| certs.path().join(f).display().to_string();
    let tls_port = free_port();
    let mqtt = Mosquitto::start_with(&format!(
        "listener {tls_port} 127.0.0.1\ncafile {}\ncertfile {}\nkeyfile {}\nrequire_certificate true\n",
        c("ca.pem"),
        c("server.pem"),
        c("server.key")
    ));
    wait_for("the TLS listener", Duration::from_secs(10), || {
        std::net::TcpStream::connect(("127.0.0.1", tls_port)).is_ok()
    });
    let kafka = Kafka::start(1, &[TOPIC], PARTITIONS);
    let dir = tempfile::tempdir().expect("tempdir");
    let tls = format!(
        "tls = {{ ca_file = \"{}\", client_cert_file = \"{}\", client_key_file = \"{}\" }}",
        c("ca.pem"),
        c("client.pem"),
        c("client.key")
    );
    let text = config(dir.path(), tls_port, &kafka.bootstrap, "", &tls, "");
    let gw = Gateway::start(dir.path(), &text);
    gw.wait_connected();
    // The publisher uses the plain listener of the same broker.
    publish(mqtt.port, 5, 200, None, None);
    let records = kafka.read(TOPIC, PARTITIONS, Duration::from_secs(30), |r| {
        unique_ids(r) >= 1000
    });
    check_complete_and_ordered(&records, 5, 200);
}
