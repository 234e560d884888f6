//! `gateway demo`: the whole gateway on one machine with nothing else running.
//!
//! It starts an MQTT broker (rumqttd) and a Kafka mock cluster (librdkafka's, over TCP) in
//! this process, runs the real pipeline against them (the same [`crate::app::run`] as
//! `gateway run`), and drives a simulated fleet of devices moving along GPS tracks. Midway
//! it cuts the uplink (every Kafka broker down) so the spool fills, then restores it so the
//! spool drains. A serial device (our firmware's logic, `crate::simulate`) sends readings
//! over a pseudo-terminal, with a few bytes corrupted on the way, through the same outage.
//! At the end it reads every record back from Kafka and prints a reconciliation:
//! published = delivered + dropped, lost = 0, and the rate of each phase; for the serial
//! device, every acknowledged reading is in Kafka.

use std::collections::HashSet;
use std::net::TcpListener;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use crate::mock::ProxiedCluster;
use anyhow::Context as _;
use indicatif::{ProgressBar, ProgressStyle};
use rdkafka::consumer::{BaseConsumer, Consumer};
use rdkafka::message::{Headers, Message};
use rdkafka::{ClientConfig, Offset, TopicPartitionList};

use crate::metrics::{Metrics, DROP_REASONS};

/// Options of `gateway demo`.
#[derive(Debug, Clone, clap::Args)]
pub struct DemoArgs {
    /// Simulated devices.
    #[arg(long, default_value_t = 50)]
    pub devices: usize,
    /// Events per second per device.
    #[arg(long, default_value_t = 20)]
    pub rate: u32,
    /// Seconds of each phase (uplink up, uplink down, uplink back).
    #[arg(long, default_value_t = 10)]
    pub phase_secs: u64,
    /// One payload in this many is malformed (0: none), to show drops by reason.
    #[arg(long, default_value_t = 500)]
    pub malformed_every: u64,
}

const TOPIC: &str = "telemetry.fleet";
/// The serial device's topic.
const PUMP_TOPIC: &str = "telemetry.pump";
/// Fraction of the serial device's bytes flipped on the way (1 in 500).
const PUMP_CORRUPT: f64 = 0.002;
const PARTITIONS: i32 = 4;

fn free_port() -> anyhow::Result<u16> {
    Ok(TcpListener::bind("127.0.0.1:0")?.local_addr()?.port())
}

fn start_broker(port: u16) -> anyhow::Result<()> {
    let text = format!(
        r#"
id = 0
[router]
id = 0
max_connections = 100
max_outgoing_packet_count = 200
max_segment_size = 104857600
max_segment_count = 10
[v4.1]
name = "demo"
listen = "127.0.0.1:{port}"
next_connection_delay_ms = 1
[v4.1.connections]
connection_timeout_ms = 60000
max_payload_size = 20480
max_inflight_count = 100
dynamic_filters = true
"#
    );
    let config: rumqttd::Config = toml::from_str(&text).context("rumqttd config")?;
    std::thread::Builder::new()
        .name("mqtt-broker".into())
        .spawn(move || {
            let mut broker = rumqttd::Broker::new(config);
            if let Err(e) = broker.start() {
                eprintln!("demo MQTT broker stopped: {e}");
            }
        })?;
    let start = Instant::now();
    while std::net::TcpStream::connect(("127.0.0.1", port)).is_err() {
        anyhow::ensure!(
            start.elapsed() < Duration::from_secs(10),
            "the demo MQTT broker did not start"
        );
        std::thread::sleep(Duration::from_millis(20));
    }
    Ok(())
}

fn gateway_config(
    state: &std::path::Path,
    mqtt_port: u16,
    brokers: &str,
    pump_link: &std::path::Path,
) -> anyhow::Result<gateway_config::Config> {
    let text = format!(
        r#"
[gateway]
id = "demo-gw"
state_dir = "{state}"
[spool]
synchronous = "full"
commit_interval = "50ms"
[[inputs]]
type = "mqtt"
name = "fleet"
host = "127.0.0.1"
port = {mqtt_port}
qos = 1
ack_policy = "on_spool"
topics = ["fleet/{{device}}/telemetry"]
reconnect = {{ min = "100ms", max = "2s" }}
[[inputs]]
type = "serial"
name = "pump"
path = "{pump_link}"
channels = {{ 1 = "temperature", 2 = "humidity" }}
reconnect = {{ min = "100ms", max = "1s" }}
[[stages]]
type = "tags"
tags = {{ site = "demo" }}
[[stages]]
type = "range"
reading = "temperature"
min = -40.0
max = 125.0
[output.kafka]
brokers = "{brokers}"
topic = "telemetry.{{source}}"
linger = "10ms"
message_timeout = "10s"
spool_after = "2s"
"#,
        state = state.display(),
        pump_link = pump_link.display(),
    );
    gateway_config::parse(&text, None).map_err(|e| anyhow::anyhow!("demo config: {e}"))
}

/// Phase boundaries and counts, for the report.
struct Phase {
    name: &'static str,
    secs: f64,
    published: u64,
    delivered: u64,
    spool_start: u64,
    spool_end: u64,
}

/// Runs the demo; fails (non-zero exit) if anything was lost.
pub fn run(args: DemoArgs) -> anyhow::Result<()> {
    let state = tempfile_dir()?;
    let mqtt_port = free_port()?;
    start_broker(mqtt_port)?;
    // Behind a proxy: the uplink is cut there (`crate::mock` says why not with the mock's
    // own broker_down, which can abort the process).
    let cluster = ProxiedCluster::new(1).context("Kafka mock cluster")?;
    for topic in [TOPIC, PUMP_TOPIC] {
        cluster
            .create_topic(topic, PARTITIONS)
            .context("create topic")?;
    }
    let brokers = cluster.bootstrap.clone();
    let pump_link = state.join("ttyPUMP");
    let config = gateway_config(&state, mqtt_port, &brokers, &pump_link)?;
    println!("edge gateway demo");
    println!("  MQTT broker (rumqttd, in process)  127.0.0.1:{mqtt_port}");
    println!("  Kafka (librdkafka mock cluster)    {brokers}, topic {TOPIC}");
    println!(
        "  spool                              {}",
        config.spool_path().display()
    );
    println!(
        "  fleet                              {} devices x {} events/s, one payload in {} malformed",
        args.devices, args.rate, args.malformed_every
    );
    println!(
        "  serial device                      pump-1 on a pseudo-terminal ({}), firmware-bridge, 20 readings/s, 1 byte in 500 corrupted",
        pump_link.display()
    );
    println!();

    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .thread_stack_size(crate::stages::expr::EVAL_STACK)
        .enable_all()
        .build()?;
    // The serial device: our firmware's logic on a pseudo-terminal behind `pump_link`.
    let (pump_stop_tx, pump_stop_rx) = tokio::sync::oneshot::channel::<()>();
    let pump = rt.spawn(crate::simulate::serial(
        crate::simulate::SerialSim {
            link: pump_link.clone(),
            device: "pump-1".into(),
            rate: 20.0,
            count: 0,
            framing: crate::simulate::SimFraming::FirmwareBridge,
            replay: None,
            wait_reader: 0.0,
            corrupt: PUMP_CORRUPT,
            garbage: 0.0,
            reboot_every: 0,
            persistent_seq: false,
            lose_hello: false,
            nan_every: 0,
            newer_every: 0,
            unplug_every: 0.0,
            unplug_for: 1.0,
            resend_after: 1.0,
            settle: 5.0,
            seed: 7,
        },
        async {
            let _ = pump_stop_rx.await;
        },
    ));
    let metrics = Metrics::new();
    let (stop_tx, stop_rx) = tokio::sync::oneshot::channel::<()>();
    let (_reload_tx, reloads) = tokio::sync::mpsc::channel(1);
    let gw = rt.spawn(crate::app::run(config, metrics.clone(), reloads, async {
        let _ = stop_rx.await;
    }));

    // Wait for the input to connect.
    let start = Instant::now();
    while metrics.input("fleet").connected.get() != 1 {
        anyhow::ensure!(
            start.elapsed() < Duration::from_secs(15),
            "the gateway did not connect to the demo broker"
        );
        std::thread::sleep(Duration::from_millis(20));
    }

    let published = Arc::new(AtomicU64::new(0));
    let malformed = Arc::new(AtomicU64::new(0));
    let publishing = Arc::new(AtomicBool::new(true));
    let fleet = rt.spawn(simulate_fleet(
        mqtt_port,
        args.clone(),
        published.clone(),
        malformed.clone(),
        publishing.clone(),
    ));

    let m = metrics.input("fleet");
    let bar = ProgressBar::new_spinner();
    bar.set_style(
        ProgressStyle::with_template("{spinner} {elapsed:>4} {msg}")
            .unwrap_or_else(|_| ProgressStyle::default_spinner()),
    );
    bar.enable_steady_tick(Duration::from_millis(100));
    let status = |phase: &str| {
        let t = metrics.totals();
        format!(
            "{phase:<14} published {:>7}  delivered {:>7}  spool {:>6} rows  kafka {}",
            published.load(Ordering::Relaxed),
            m.delivered.get(),
            t.spool_rows,
            if t.kafka_up { "up" } else { "DOWN" }
        )
    };
    let mut phases = Vec::new();
    let names = ["uplink up", "uplink DOWN", "uplink back"];
    for (i, name) in names.iter().enumerate() {
        if i == 1 {
            cluster.down();
        }
        if i == 2 {
            cluster.up();
        }
        let t0 = Instant::now();
        let (p0, d0, s0) = (
            published.load(Ordering::Relaxed),
            m.delivered.get(),
            metrics.totals().spool_rows,
        );
        while t0.elapsed() < Duration::from_secs(args.phase_secs) {
            bar.set_message(status(name));
            std::thread::sleep(Duration::from_millis(100));
        }
        phases.push(Phase {
            name,
            secs: t0.elapsed().as_secs_f64(),
            published: published.load(Ordering::Relaxed) - p0,
            delivered: m.delivered.get() - d0,
            spool_start: s0,
            spool_end: metrics.totals().spool_rows,
        });
    }
    publishing.store(false, Ordering::Relaxed);
    rt.block_on(fleet).context("fleet task")??;
    // Drain what is left.
    let t0 = Instant::now();
    let (d0, s0) = (m.delivered.get(), metrics.totals().spool_rows);
    let total = published.load(Ordering::Relaxed);
    let mut drained = true;
    loop {
        let dropped = dropped_total(&metrics);
        let t = metrics.totals();
        bar.set_message(status("draining"));
        if m.delivered.get() + dropped >= total && t.spool_rows == 0 && t.inflight == 0 {
            break;
        }
        // A lost event never lets the sum reach `total`: stop waiting and let the table
        // below show it, rather than ending without one.
        if t0.elapsed() >= Duration::from_secs(120) {
            drained = false;
            break;
        }
        std::thread::sleep(Duration::from_millis(100));
    }
    phases.push(Phase {
        name: "final drain",
        secs: t0.elapsed().as_secs_f64(),
        published: 0,
        delivered: m.delivered.get() - d0,
        spool_start: s0,
        spool_end: metrics.totals().spool_rows,
    });
    bar.finish_and_clear();

    // Stop the serial device, then give the gateway a moment to pass on its last readings.
    let _ = pump_stop_tx.send(());
    let pump_report = rt.block_on(pump).context("serial device task")??;
    std::thread::sleep(Duration::from_secs(2));
    let _ = stop_tx.send(());
    rt.block_on(gw).context("gateway task")??;

    // Read everything back from Kafka: the proof.
    let in_kafka = read_back(&brokers, TOPIC)?.len() as u64;
    let delivered = m.delivered.get();
    let received = m.received.get();
    let dropped: Vec<(&str, u64)> = DROP_REASONS
        .iter()
        .map(|r| (*r, metrics.dropped_count("fleet", r)))
        .filter(|(_, n)| *n > 0)
        .collect();
    let dropped_sum: u64 = dropped.iter().map(|(_, n)| n).sum();
    let lost = total as i64 - in_kafka as i64 - dropped_sum as i64;

    println!("phase          seconds  published   delivered   events/s   spool rows");
    for p in &phases {
        println!(
            "{:<14} {:>7.1}  {:>9}   {:>9}   {:>8.0}   {:>6} -> {}",
            p.name,
            p.secs,
            p.published,
            p.delivered,
            p.delivered as f64 / p.secs.max(0.001),
            p.spool_start,
            p.spool_end
        );
    }
    println!();
    println!("reconciliation (input \"fleet\")");
    println!(
        "  published to MQTT          {total:>9}   ({} of them malformed on purpose)",
        malformed.load(Ordering::Relaxed)
    );
    println!("  received by the gateway    {received:>9}");
    println!("  delivered (Kafka confirmed){delivered:>9}");
    println!("  read back from Kafka       {in_kafka:>9}   unique event ids");
    for (r, n) in &dropped {
        println!("  dropped: {r:<18}{n:>9}");
    }
    println!("  lost                       {lost:>9}   = published - in Kafka - dropped");
    println!(
        "  spooled while Kafka was away {:>7}, drained {:>7}",
        m.spooled.get(),
        metrics.totals().drained
    );
    // The serial device: every reading the gateway acknowledged must be in Kafka.
    let pump_ids = read_back(&brokers, PUMP_TOPIC)?;
    let pm = metrics.input("pump");
    let acked: Vec<String> = pump_report
        .boots
        .iter()
        .flat_map(|b| {
            b.acked_up_to
                .map(|up_to| (0..=up_to).map(move |s| format!("pump-1:{}:{s}", b.boot)))
                .into_iter()
                .flatten()
        })
        .collect();
    let pump_lost = acked
        .iter()
        .filter(|id| !pump_ids.contains(id.as_bytes()))
        .count();
    let taken: u64 = pump_report.boots.iter().map(|b| u64::from(b.sampled)).sum();
    println!();
    println!("serial device (input \"pump\", firmware-bridge over a pseudo-terminal)");
    println!("  readings taken by the device   {taken:>9}");
    println!("  acknowledged by the gateway    {:>9}", acked.len());
    println!(
        "  in Kafka                       {:>9}   unique event ids",
        pump_ids.len()
    );
    println!(
        "  corrupt frames dropped         {:>9}   ({} bytes flipped; the device resent {})",
        metrics.dropped_count("pump", "corrupt_frame"),
        pump_report.corrupted_bytes,
        pump_report.resent
    );
    println!(
        "  duplicates dropped             {:>9}",
        metrics.dropped_count("pump", "duplicate")
    );
    println!("  spooled while Kafka was away   {:>9}", pm.spooled.get());
    println!("  lost                           {pump_lost:>9}   = acknowledged - in Kafka");
    let _ = std::fs::remove_dir_all(&state);
    if !drained {
        println!();
        println!("the counts did not add up within 2 minutes of the last event");
    }
    anyhow::ensure!(lost == 0, "{lost} events were lost");
    anyhow::ensure!(
        drained,
        "the counts did not add up within 2 minutes of the last event"
    );
    anyhow::ensure!(
        pump_lost == 0,
        "{pump_lost} acknowledged serial readings are not in Kafka"
    );
    Ok(())
}

fn dropped_total(metrics: &Metrics) -> u64 {
    DROP_REASONS
        .iter()
        .map(|r| metrics.dropped_count("fleet", r))
        .sum()
}

fn tempfile_dir() -> anyhow::Result<std::path::PathBuf> {
    let dir = std::env::temp_dir().join(format!("edge-gateway-demo-{}", std::process::id()));
    std::fs::create_dir_all(&dir)?;
    Ok(dir)
}

/// Devices drive circles around a depot; each publishes its position and readings.
async fn simulate_fleet(
    port: u16,
    args: DemoArgs,
    published: Arc<AtomicU64>,
    malformed: Arc<AtomicU64>,
    running: Arc<AtomicBool>,
) -> anyhow::Result<()> {
    let mut o = rumqttc::MqttOptions::new("demo-fleet", "127.0.0.1", port);
    o.set_inflight(100).set_keep_alive(Duration::from_secs(30));
    let (client, mut ev) = rumqttc::AsyncClient::new(o, 10_000);
    let pump = tokio::spawn(async move {
        loop {
            if let Err(e) = ev.poll().await {
                eprintln!("demo fleet connection: {e}");
                tokio::time::sleep(Duration::from_millis(200)).await;
            }
        }
    });
    let tick = Duration::from_secs_f64(1.0 / f64::from(args.rate.max(1)));
    let mut interval = tokio::time::interval(tick);
    let mut seq = 0u64;
    let mut n = 0u64;
    while running.load(Ordering::Relaxed) {
        interval.tick().await;
        for d in 0..args.devices {
            n += 1;
            let topic = format!("fleet/truck-{d:03}/telemetry");
            let payload = if args.malformed_every > 0 && n % args.malformed_every == 0 {
                malformed.fetch_add(1, Ordering::Relaxed);
                "{\"device\": \"truck\", broken".to_string()
            } else {
                let angle = (seq as f64 / 200.0) + d as f64;
                let radius = 0.01 + 0.001 * (d % 10) as f64;
                let now_ms = crate::event::now_ns() / 1_000_000;
                format!(
                    r#"{{"seq":{seq},"ts":{now_ms},"lat":{:.6},"lon":{:.6},"speed_kmh":{:.1},"temperature":{:.1},"fuel_pct":{:.1}}}"#,
                    52.52 + radius * angle.sin(),
                    13.405 + radius * angle.cos(),
                    30.0 + 20.0 * (angle * 3.0).sin().abs(),
                    4.0 + 3.0 * (angle / 5.0).sin(),
                    100.0 - (seq as f64 / 100.0) % 100.0
                )
            };
            client
                .publish(topic, rumqttc::QoS::AtLeastOnce, false, payload)
                .await?;
            published.fetch_add(1, Ordering::Relaxed);
        }
        seq += 1;
    }
    tokio::time::sleep(Duration::from_millis(500)).await;
    pump.abort();
    Ok(())
}

/// Reads the topic back (resuming with a fresh consumer if one stalls) and counts unique
/// event ids.
/// Every event id in `topic`.
fn read_back(brokers: &str, topic: &str) -> anyhow::Result<HashSet<Vec<u8>>> {
    let mut ids = HashSet::new();
    let mut next = vec![0i64; PARTITIONS as usize];
    let start = Instant::now();
    let mut idle_rounds = 0;
    while idle_rounds < 3 && start.elapsed() < Duration::from_secs(60) {
        let c: BaseConsumer = ClientConfig::new()
            .set("bootstrap.servers", brokers)
            .set("group.id", "demo-reader")
            .set("enable.auto.commit", "false")
            .create()?;
        let mut tpl = TopicPartitionList::new();
        for (p, o) in next.iter().enumerate() {
            tpl.add_partition_offset(topic, p as i32, Offset::Offset(*o))?;
        }
        c.assign(&tpl)?;
        let mut last = Instant::now();
        let before = ids.len();
        while last.elapsed() < Duration::from_secs(2) {
            if let Some(Ok(m)) = c.poll(Duration::from_millis(100)) {
                last = Instant::now();
                next[m.partition() as usize] = m.offset() + 1;
                if let Some(h) = m.headers() {
                    if let Some(id) = h.iter().find(|h| h.key == "event-id").and_then(|h| h.value) {
                        ids.insert(id.to_vec());
                    }
                }
            }
        }
        idle_rounds = if ids.len() == before {
            idle_rounds + 1
        } else {
            0
        };
    }
    Ok(ids)
}
