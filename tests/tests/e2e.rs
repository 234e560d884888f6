//! End-to-end tests: a real Mosquitto, librdkafka's mock cluster over TCP, the gateway as
//! its own process, and a real Kafka consumer reading back.

mod common;

use std::time::Duration;

use common::*;

const TOPIC: &str = "telemetry.site";
const PARTITIONS: i32 = 4;

#[test]
fn qos1_events_reach_kafka_in_order_with_key_and_headers() {
    let devices = 50;
    let n = 2000; // 100k events
    let dir = tempfile::tempdir().expect("tempdir");
    let mqtt = Mosquitto::start();
    let kafka = Kafka::start(1, &[TOPIC], PARTITIONS);
    let gw = Gateway::start(dir.path(), &config(dir.path(), mqtt.port, &kafka.bootstrap, "", "", ""));
    wait_for("the MQTT input to connect", Duration::from_secs(10), || gw.metric("gateway_input_connected{input=\"site\"}") == 1.0);
    let started = std::time::Instant::now();
    publish(mqtt.port, devices, n, None, None);
    let consumer = kafka.consumer(TOPIC, PARTITIONS);
    let records = consume_until(&consumer, Duration::from_secs(180), |r| r.len() >= devices * n);
    eprintln!("{} records in {:?}", records.len(), started.elapsed());
    let dups = check_complete_and_ordered(&records, devices, n);
    assert_eq!(dups, 0, "no reason for duplicates without faults");
    let r = &records[0];
    assert_eq!(r.headers.get("source").map(String::as_str), Some("site"));
    assert_eq!(r.headers.get("gateway-id").map(String::as_str), Some("gw-test"));
    assert_eq!(r.headers.get("content-type").map(String::as_str), Some("application/json"));
    assert_eq!(r.headers.get("schema").map(String::as_str), Some("edge-gateway.event.v1"));
    assert_eq!(r.value["schema"], "edge-gateway.event.v1");
    assert_eq!(r.value["clock"], "device");
    let seq: i64 = r.headers["event-id"].rsplit(':').next().and_then(|s| s.parse().ok()).expect("seq");
    assert_eq!(r.timestamp, Some(1_800_000_000_000 + seq), "record timestamp = event time");
    assert!(r.value["location"]["lat"].is_number());
    assert!(r.value["readings"]["temperature"].is_number());
    let total = (devices * n) as f64;
    wait_for("delivered = received", Duration::from_secs(10), || gw.metric("gateway_events_delivered_total{input=\"site\"}") == total);
    assert_eq!(gw.metric("gateway_events_received_total{input=\"site\"}"), total);
    wait_for("every message acked upstream", Duration::from_secs(10), || {
        let acks = gw.metric("gateway_upstream_acks_total{input=\"site\"}");
        eprintln!("acks {acks}");
        if acks != total {
            let log = gw.log_text();
            let mut lines: Vec<&str> = log.lines().filter(|l| l.contains("INFO")).collect();
            lines.extend(log.lines().filter(|l| !l.contains("INFO")).take(2));
            lines.extend(log.lines().filter(|l| !l.contains("INFO")).last());
            eprintln!("{}", lines.join("\n"));
        }
        acks == total
    });
}
