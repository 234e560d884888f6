//! Helpers for end-to-end tests and the benchmark: a real Mosquitto on a free port,
//! librdkafka's mock cluster served over TCP, the gateway as a separate process, a Kafka
//! consumer to read back, and a Prometheus scrape.

use std::collections::BTreeMap;
use std::io::{Read, Write};
use std::net::{TcpListener, TcpStream};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use rdkafka::consumer::{BaseConsumer, Consumer};
use rdkafka::message::{Headers, Message};
use rdkafka::{ClientConfig, Offset, TopicPartitionList};

use crate::mock::ProxiedCluster;

/// A free TCP port on 127.0.0.1, below Linux's ephemeral range (32768-60999).
///
/// Not `bind(0)`: the ports handed out here are bound later (by Mosquitto, say), and an
/// ephemeral port may meanwhile be taken by any outgoing connection on the machine.
pub fn free_port() -> u16 {
    use std::sync::atomic::{AtomicU32, Ordering};
    static NEXT: AtomicU32 = AtomicU32::new(0);
    const FIRST: u32 = 20_000;
    const SPAN: u32 = 12_000;
    let start = std::process::id().wrapping_mul(7919) % SPAN;
    for _ in 0..SPAN {
        let n = NEXT.fetch_add(1, Ordering::Relaxed);
        let port = (FIRST + (start + n) % SPAN) as u16;
        if TcpListener::bind(("127.0.0.1", port)).is_ok() {
            return port;
        }
    }
    panic!("no free port between {FIRST} and {}", FIRST + SPAN)
}

/// Polls `cond` every 50 ms until it holds or `timeout` passes.
pub fn wait_for(what: &str, timeout: Duration, mut cond: impl FnMut() -> bool) {
    let start = Instant::now();
    while !cond() {
        assert!(
            start.elapsed() < timeout,
            "timed out after {timeout:?} waiting for {what}"
        );
        std::thread::sleep(Duration::from_millis(50));
    }
}

/// A Mosquitto broker process on a free port, stopped on drop.
pub struct Mosquitto {
    child: Child,
    /// Its port.
    pub port: u16,
    _dir: tempfile::TempDir,
}

impl Mosquitto {
    /// Starts Mosquitto with an unlimited queue for offline persistent sessions and a
    /// QoS 1 in-flight window of 1000 (the README explains why).
    pub fn start() -> Mosquitto {
        Self::start_with("")
    }

    /// Starts Mosquitto with extra lines for its listener (TLS settings, say).
    ///
    /// The port is free when chosen but may be taken before Mosquitto binds it (another
    /// process on the machine): Mosquitto then exits with "Address already in use", and
    /// a connect would reach the other listener. So this waits until Mosquitto's own
    /// process holds the listening socket, and tries another port if it exits first.
    pub fn start_with(listener_extra: &str) -> Mosquitto {
        let dir = tempfile::tempdir().expect("tempdir");
        let conf = dir.path().join("mosquitto.conf");
        for _ in 0..5 {
            let port = free_port();
            std::fs::write(
                &conf,
                format!(
                    "listener {port} 127.0.0.1\n{listener_extra}\nallow_anonymous true\npersistence false\nmax_inflight_messages 1000\nmax_queued_messages 0\nlog_dest stderr\nlog_type error\nlog_type warning\n"
                ),
            )
            .expect("write mosquitto.conf");
            let mut child = Command::new(mosquitto_bin())
                .arg("-c")
                .arg(&conf)
                .stdout(Stdio::null())
                .stderr(Stdio::inherit())
                .spawn()
                .expect("start mosquitto (install it with .ci/setup)");
            match wait_listening(&mut child, port, Duration::from_secs(10)) {
                Listen::Listening => {
                    return Mosquitto {
                        child,
                        port,
                        _dir: dir,
                    }
                }
                Listen::Exited => {
                    eprintln!("mosquitto could not listen on port {port}; trying another")
                }
                Listen::TimedOut => panic!("mosquitto did not listen on port {port} within 10 s"),
            }
        }
        panic!("mosquitto did not start on any of 5 ports");
    }
}

/// How a child process started to listen.
enum Listen {
    /// It holds the listening socket.
    Listening,
    /// It exited first (reaped).
    Exited,
    /// Neither within the time given (killed and reaped).
    TimedOut,
}

/// Waits until `child` holds a socket listening on 127.0.0.1:`port`, it exits, or
/// `timeout` passes. A child that is not listening in the end is killed and reaped.
fn wait_listening(child: &mut Child, port: u16, timeout: Duration) -> Listen {
    let start = Instant::now();
    let outcome = loop {
        if !matches!(child.try_wait(), Ok(None)) {
            break Listen::Exited;
        }
        if listens_on(child.id(), port) {
            return Listen::Listening;
        }
        if start.elapsed() > timeout {
            break Listen::TimedOut;
        }
        std::thread::sleep(Duration::from_millis(50));
    };
    // Reaped already if it exited, unless `try_wait` itself failed: make sure it is gone.
    let _ = child.kill();
    let _ = child.wait();
    outcome
}

/// Whether process `pid` holds a socket listening on 127.0.0.1:`port` (Linux: the
/// socket inodes of `/proc/net/tcp` against the process's file descriptors).
fn listens_on(pid: u32, port: u16) -> bool {
    let local = format!("0100007F:{port:04X}");
    let tcp = std::fs::read_to_string("/proc/net/tcp").unwrap_or_default();
    // Columns: sl, local_address, rem_address, st (0A: LISTEN), ..., inode (the 10th).
    let inodes: Vec<String> = tcp
        .lines()
        .skip(1)
        .filter_map(|l| {
            let f: Vec<&str> = l.split_whitespace().collect();
            (f.get(1) == Some(&local.as_str()) && f.get(3) == Some(&"0A"))
                .then(|| f.get(9).map(|i| format!("socket:[{i}]")))
                .flatten()
        })
        .collect();
    if inodes.is_empty() {
        return false;
    }
    let Ok(fds) = std::fs::read_dir(format!("/proc/{pid}/fd")) else {
        return false;
    };
    fds.flatten().any(|fd| {
        std::fs::read_link(fd.path())
            .is_ok_and(|target| inodes.iter().any(|i| target.as_os_str() == i.as_str()))
    })
}

fn mosquitto_bin() -> PathBuf {
    for p in ["/usr/sbin/mosquitto", "/usr/bin/mosquitto"] {
        if Path::new(p).exists() {
            return p.into();
        }
    }
    "mosquitto".into()
}

impl Drop for Mosquitto {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// librdkafka's mock cluster, reachable over TCP at `bootstrap` through a proxy per
/// broker (see [`crate::mock`] for why the uplink is cut there).
pub struct Kafka {
    cluster: ProxiedCluster,
    /// `host:port` list.
    pub bootstrap: String,
}

impl Kafka {
    /// A cluster of `brokers` brokers with `topics` created at `partitions` partitions.
    pub fn start(brokers: i32, topics: &[&str], partitions: i32) -> Kafka {
        let cluster = ProxiedCluster::new(brokers).expect("mock cluster");
        for t in topics {
            cluster.create_topic(t, partitions).expect("create topic");
        }
        let bootstrap = cluster.bootstrap.clone();
        Kafka { cluster, bootstrap }
    }

    /// Creates `topic` now (a topic an operator makes while the gateway runs).
    pub fn create_topic(&self, topic: &str, partitions: i32) {
        self.cluster
            .create_topic(topic, partitions)
            .expect("create topic");
    }

    /// Cuts every broker off (the uplink is down).
    pub fn down(&self) {
        self.cluster.down();
    }

    /// Lets every broker be reached again.
    pub fn up(&self) {
        self.cluster.up();
    }

    /// Fails the next `errors.len()` requests of the Kafka protocol API `api_key` (22:
    /// InitProducerId) with `errors`, in order.
    pub fn push_request_errors(&self, api_key: i16, errors: &[rdkafka::types::RDKafkaRespErr]) {
        self.cluster.push_request_errors(api_key, errors);
    }

    /// Delays every broker's responses by `rtt` (a long uplink).
    pub fn set_rtt(&self, rtt: Duration) {
        self.cluster.set_rtt(rtt).expect("mock broker rtt");
    }

    /// Reads `topic` from the beginning until `stop` says enough or `timeout` passes. A
    /// consumer that makes no progress for 3 s is replaced by a fresh one that resumes at
    /// the next offsets (librdkafka's consumer can stall against the mock cluster after
    /// its brokers went down and up).
    pub fn read(
        &self,
        topic: &str,
        partitions: i32,
        timeout: Duration,
        mut stop: impl FnMut(&[Consumed]) -> bool,
    ) -> Vec<Consumed> {
        let start = Instant::now();
        let mut out: Vec<Consumed> = Vec::new();
        let mut next: Vec<i64> = vec![0; partitions as usize];
        while start.elapsed() < timeout && !stop(&out) {
            let c = self.consumer_at(topic, &next);
            let mut last_progress = Instant::now();
            while start.elapsed() < timeout
                && !stop(&out)
                && last_progress.elapsed() < Duration::from_secs(3)
            {
                let got = consume_until(&c, Duration::from_millis(200), |_| false);
                if !got.is_empty() {
                    last_progress = Instant::now();
                }
                for r in got {
                    next[r.partition as usize] = next[r.partition as usize].max(r.offset + 1);
                    out.push(r);
                }
            }
        }
        out
    }

    fn consumer_at(&self, topic: &str, offsets: &[i64]) -> BaseConsumer {
        let c: BaseConsumer = ClientConfig::new()
            .set("bootstrap.servers", &self.bootstrap)
            .set("group.id", "e2e-reader")
            .set("enable.auto.commit", "false")
            .set("enable.partition.eof", "false")
            .create()
            .expect("consumer");
        let mut tpl = TopicPartitionList::new();
        for (p, o) in offsets.iter().enumerate() {
            tpl.add_partition_offset(topic, p as i32, Offset::Offset(*o))
                .expect("partition");
        }
        c.assign(&tpl).expect("assign");
        c
    }

    /// A consumer assigned to every partition of `topic` from the beginning.
    pub fn consumer(&self, topic: &str, partitions: i32) -> BaseConsumer {
        self.consumer_at(topic, &vec![0; partitions as usize])
    }
}

/// One record read back from Kafka.
#[derive(Debug, Clone)]
pub struct Consumed {
    /// Partition.
    pub partition: i32,
    /// Offset.
    pub offset: i64,
    /// Key text.
    pub key: String,
    /// Headers.
    pub headers: BTreeMap<String, String>,
    /// Value (JSON).
    pub value: serde_json::Value,
    /// Raw value.
    pub raw: Vec<u8>,
    /// Record timestamp (ms).
    pub timestamp: Option<i64>,
}

/// Reads until `stop` says enough or `timeout` passes; returns everything read.
pub fn consume_until(
    c: &BaseConsumer,
    timeout: Duration,
    mut stop: impl FnMut(&[Consumed]) -> bool,
) -> Vec<Consumed> {
    let start = Instant::now();
    let mut out = Vec::new();
    while start.elapsed() < timeout && !stop(&out) {
        match c.poll(Duration::from_millis(100)) {
            Some(Ok(m)) => {
                let mut headers = BTreeMap::new();
                if let Some(h) = m.headers() {
                    for hd in h.iter() {
                        headers.insert(
                            hd.key.to_string(),
                            String::from_utf8_lossy(hd.value.unwrap_or_default()).to_string(),
                        );
                    }
                }
                let raw = m.payload().unwrap_or_default().to_vec();
                out.push(Consumed {
                    partition: m.partition(),
                    offset: m.offset(),
                    key: String::from_utf8_lossy(m.key().unwrap_or_default()).to_string(),
                    headers,
                    value: serde_json::from_slice(&raw).unwrap_or(serde_json::Value::Null),
                    raw,
                    timestamp: m.timestamp().to_millis(),
                });
            }
            Some(Err(e)) => eprintln!("consumer: {e}"),
            None => {}
        }
    }
    out
}

/// The gateway as a separate process.
pub struct Gateway {
    child: Option<Child>,
    /// Its config file.
    pub config: PathBuf,
    /// Its metrics port.
    pub metrics_port: u16,
    /// Its log file.
    pub log: PathBuf,
}

/// The gateway binary built by this package: `GATEWAY_BIN` if set, else
/// `gateway-e2e` next to the running executable (or one directory up, for test
/// binaries in `deps/`).
pub fn gateway_bin() -> PathBuf {
    if let Some(p) = std::env::var_os("GATEWAY_BIN") {
        return p.into();
    }
    let exe = std::env::current_exe().expect("current exe");
    let dir = exe.parent().expect("exe dir");
    for d in [dir, dir.parent().unwrap_or(dir)] {
        let p = d.join("gateway-e2e");
        if p.exists() {
            return p;
        }
    }
    "gateway-e2e".into()
}

/// A command that runs [`gateway_bin`], through `GATEWAY_RUNNER` when that is set
/// (e.g. `qemu-aarch64 -L /usr/aarch64-linux-gnu`: an ARM test binary under qemu-user
/// cannot exec an ARM child by itself where binfmt_misc is not set up).
pub fn gateway_command() -> Command {
    let runner = std::env::var("GATEWAY_RUNNER").unwrap_or_default();
    let mut words = runner.split_whitespace();
    match words.next() {
        Some(program) => {
            let mut c = Command::new(program);
            c.args(words).arg(gateway_bin());
            c
        }
        None => Command::new(gateway_bin()),
    }
}

impl Gateway {
    /// Writes `config` (with `{metrics_port}` replaced) into `dir` and starts the gateway.
    ///
    /// The metrics port is free when chosen but may be taken before the gateway binds it
    /// (another process on the machine): the gateway then exits with "cannot listen on
    /// telemetry.listen", and `/health` could reach the other listener. So this waits
    /// until the gateway's own process holds the port, and tries another port if it
    /// exited for that reason.
    pub fn start(dir: &Path, config: &str) -> Gateway {
        Self::start_on(dir, config, free_port)
    }

    /// [`Gateway::start`] with the metrics ports to try from `next_port`.
    fn start_on(dir: &Path, config: &str, mut next_port: impl FnMut() -> u16) -> Gateway {
        let path = dir.join("gateway.toml");
        let mut g = Gateway {
            child: None,
            config: path,
            metrics_port: 0,
            log: dir.join("gateway.log"),
        };
        for _ in 0..5 {
            g.metrics_port = next_port();
            std::fs::write(
                &g.config,
                config.replace("{metrics_port}", &g.metrics_port.to_string()),
            )
            .expect("write config");
            let logged = g.log_text().len();
            if g.launch(true) {
                return g;
            }
            let log = g.log_text();
            if !log
                .get(logged..)
                .unwrap_or(&log)
                .contains("cannot listen on telemetry.listen")
            {
                panic!("the gateway exited while starting; its log:\n{log}");
            }
            eprintln!(
                "the gateway could not listen on port {}; trying another",
                g.metrics_port
            );
        }
        panic!(
            "the gateway could not listen on any of 5 ports; its log:\n{}",
            g.log_text()
        );
    }

    /// Starts the process again with the same config (after a kill).
    pub fn restart(&mut self) {
        if !self.launch(true) {
            panic!(
                "the gateway exited while starting; its log:\n{}",
                self.log_text()
            );
        }
    }

    /// [`Gateway::restart`], returning once the gateway listens on its metrics port,
    /// without waiting for `/health` to say it runs (a gateway that waits for its spool).
    pub fn restart_unready(&mut self) {
        if !self.launch(false) {
            panic!(
                "the gateway exited while starting; its log:\n{}",
                self.log_text()
            );
        }
    }

    /// Starts the process; true once it serves `/health` (or, without `ready`, listens)
    /// on a metrics port it holds itself, false if it exited first.
    fn launch(&mut self, ready: bool) -> bool {
        let log = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(&self.log)
            .expect("log file");
        let mut child = gateway_command()
            .args(["run", "--config"])
            .arg(&self.config)
            .env("RUST_LOG", "info,librdkafka=warn,rdkafka=warn")
            .stdout(Stdio::null())
            .stderr(log)
            .spawn()
            .expect("start the gateway");
        let port = self.metrics_port;
        let limit = Duration::from_secs(20);
        let start = Instant::now();
        match wait_listening(&mut child, port, limit) {
            Listen::Listening => {}
            Listen::Exited => return false,
            Listen::TimedOut => {
                panic!("the gateway did not come up; its log:\n{}", self.log_text())
            }
        }
        // Held from here on: a panic below kills it (and prints its log) on drop.
        self.child = Some(child);
        if !ready {
            return true;
        }
        wait_for(
            "the gateway's /health",
            limit.saturating_sub(start.elapsed()),
            || http_get(port, "/health").is_some(),
        );
        true
    }

    /// The process id, while running.
    pub fn pid(&self) -> Option<u32> {
        self.child.as_ref().map(Child::id)
    }

    /// `kill -9`.
    pub fn kill9(&mut self) {
        if let Some(mut c) = self.child.take() {
            let _ = c.kill();
            let _ = c.wait();
        }
    }

    /// SIGTERM and wait for a clean exit.
    pub fn terminate(&mut self) -> std::process::ExitStatus {
        let mut c = self.child.take().expect("running");
        let _ = Command::new("kill")
            .arg("-TERM")
            .arg(c.id().to_string())
            .status();
        let start = Instant::now();
        loop {
            if let Ok(Some(s)) = c.try_wait() {
                return s;
            }
            if start.elapsed() >= Duration::from_secs(30) {
                // Not left running behind the failed test.
                let _ = c.kill();
                let _ = c.wait();
                panic!("the gateway did not stop on SIGTERM");
            }
            std::thread::sleep(Duration::from_millis(50));
        }
    }

    /// Sends SIGHUP.
    pub fn hup(&self) {
        let c = self.child.as_ref().expect("running");
        let _ = Command::new("kill")
            .arg("-HUP")
            .arg(c.id().to_string())
            .status();
    }

    /// Waits until the MQTT input `site` is connected and subscribed (its `connected`
    /// gauge goes to 1 with the SUBACK), so that what a test publishes next reaches it.
    pub fn wait_connected(&self) {
        wait_for("the MQTT input to connect", Duration::from_secs(10), || {
            self.metric("gateway_input_connected{input=\"site\"}") == 1.0
        });
    }

    /// Its metrics, `name{labels}` → value. Panics when `/metrics` cannot be read: a
    /// check that a count is 0 must not pass because the gateway is gone.
    pub fn metrics(&self) -> BTreeMap<String, f64> {
        parse_metrics(&self.metrics_text())
    }

    /// The `/metrics` text (five tries over about a second).
    fn metrics_text(&self) -> String {
        for _ in 0..5 {
            if let Some(text) = http_get(self.metrics_port, "/metrics") {
                return text;
            }
            std::thread::sleep(Duration::from_millis(200));
        }
        panic!(
            "cannot read the gateway's /metrics (is it running?); its log:\n{}",
            self.log_text()
        )
    }

    /// All drops, every input and reason.
    pub fn dropped_total(&self) -> f64 {
        self.metrics()
            .iter()
            .filter(|(k, _)| k.starts_with("gateway_events_dropped_total"))
            .map(|(_, v)| v)
            .sum()
    }

    /// One metric (0 when its labels have not been counted yet). Its family must exist:
    /// a misspelt name would read as 0 for ever.
    pub fn metric(&self, key: &str) -> f64 {
        let text = self.metrics_text();
        let family = key.split('{').next().unwrap_or(key);
        // Counters are read as `<family>_total`, histograms by their parts, the rest bare.
        let known = text
            .lines()
            .filter_map(|l| l.strip_prefix("# TYPE ")?.split_once(' '))
            .any(|(name, kind)| {
                let suffixes: &[&str] = match kind.trim() {
                    "counter" => &["_total"],
                    "histogram" => &["_bucket", "_sum", "_count"],
                    _ => &[""],
                };
                suffixes
                    .iter()
                    .any(|suffix| family.strip_suffix(suffix) == Some(name))
            });
        assert!(known, "no metric family for {key}");
        parse_metrics(&text).get(key).copied().unwrap_or(0.0)
    }

    /// Prints the gateway's metrics, its first warnings and errors and the last lines of
    /// its log. A gateway dropped during a test's panic does this itself.
    pub fn dump(&self) {
        let text = http_get(self.metrics_port, "/metrics").unwrap_or_default();
        for (k, v) in parse_metrics(&text) {
            if k.starts_with("gateway_") && !k.contains("bucket") {
                eprintln!("{k} {v}");
            }
        }
        let log = self.log_text();
        let lines: Vec<&str> = log.lines().collect();
        for l in lines.iter().filter(|l| !l.contains("INFO")).take(40) {
            eprintln!("{l}");
        }
        eprintln!("--- the log's last lines");
        for l in &lines[lines.len().saturating_sub(30)..] {
            eprintln!("{l}");
        }
    }

    /// The log so far.
    pub fn log_text(&self) -> String {
        std::fs::read_to_string(&self.log).unwrap_or_default()
    }
}

impl Drop for Gateway {
    fn drop(&mut self) {
        // A test failed while this gateway ran: what it counted and logged, before it
        // and its temporary directory are gone.
        if std::thread::panicking() {
            eprintln!("--- gateway {} at the failure", self.log.display());
            self.dump();
        }
        self.kill9();
    }
}

/// `name{labels}` → value, from a `/metrics` text.
fn parse_metrics(text: &str) -> BTreeMap<String, f64> {
    text.lines()
        .filter(|l| !l.starts_with('#'))
        .filter_map(|l| {
            let (k, v) = l.rsplit_once(' ')?;
            Some((k.to_string(), v.parse().ok()?))
        })
        .collect()
}

/// A plain HTTP GET on 127.0.0.1; the body, or `None` on any failure.
pub fn http_get(port: u16, path: &str) -> Option<String> {
    let mut s = TcpStream::connect(("127.0.0.1", port)).ok()?;
    s.set_read_timeout(Some(Duration::from_secs(5))).ok()?;
    write!(s, "GET {path} HTTP/1.1\r\nhost: localhost\r\n\r\n").ok()?;
    let mut buf = String::new();
    s.read_to_string(&mut buf).ok()?;
    let (head, body) = buf.split_once("\r\n\r\n")?;
    head.starts_with("HTTP/1.1 200").then(|| body.to_string())
}

/// A gateway config for the tests: one MQTT input `site` on `sensors/{device}/telemetry`,
/// Kafka topic `telemetry.site`. `extra_input` and `extra` are appended where they go.
pub fn config(
    dir: &Path,
    mqtt_port: u16,
    bootstrap: &str,
    extra_spool: &str,
    extra_input: &str,
    extra_kafka: &str,
) -> String {
    let input = format!(
        r#"type = "mqtt"
name = "site"
host = "127.0.0.1"
port = {mqtt_port}
qos = 1
topics = ["sensors/{{device}}/telemetry"]
reconnect = {{ min = "100ms", max = "1s" }}
{extra_input}"#
    );
    config_with_input(dir, bootstrap, &input, extra_spool, extra_kafka)
}

/// A gateway config for the tests with one input whose fields are `input` (the lines
/// under `[[inputs]]`); the spool is `synchronous = "normal"` unless `extra_spool` says,
/// Kafka lingers 5 ms and spools after 2 s.
pub fn config_with_input(
    dir: &Path,
    bootstrap: &str,
    input: &str,
    extra_spool: &str,
    extra_kafka: &str,
) -> String {
    format!(
        r#"
[gateway]
id = "gw-test"
state_dir = "{state}"

[spool]
{sync}
{extra_spool}

[telemetry]
listen = "127.0.0.1:{{metrics_port}}"

[[inputs]]
{input}

[output.kafka]
brokers = "{bootstrap}"
topic = "telemetry.{{source}}"
linger = "5ms"
message_timeout = "10s"
spool_after = "2s"
{extra_kafka}
"#,
        state = dir.join("state").display(),
        sync = if extra_spool.contains("synchronous") {
            ""
        } else {
            "synchronous = \"normal\""
        },
    )
}

/// Publishes every `(topic, payload)` in order with `qos`, one per `pace` on average. With QoS 1 it
/// waits for every PUBACK; with QoS 0 it disconnects and waits until the disconnect (and
/// so everything before it) went out. Returns the time taken. Messages are produced
/// lazily, so a benchmark pays for formatting them as it goes, as a device would.
pub fn send_all<I>(port: u16, qos: rumqttc::QoS, pace: Option<Duration>, messages: I) -> Duration
where
    I: IntoIterator<Item = (String, Vec<u8>)> + Send + 'static,
    I::IntoIter: Send,
{
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(1)
        .enable_all()
        .build()
        .expect("runtime");
    rt.block_on(async move {
        let mut o =
            rumqttc::MqttOptions::new(format!("publisher-{}", free_port()), "127.0.0.1", port);
        o.set_inflight(1000)
            .set_keep_alive(Duration::from_secs(60))
            .set_max_packet_size(1 << 20, 1 << 20);
        let (client, mut ev) = rumqttc::AsyncClient::new(o, 10_000);
        let start = Instant::now();
        // The number sent, once all are; QoS 1 waits for as many PUBACKs.
        let (total_tx, mut total_rx) = tokio::sync::watch::channel(None::<usize>);
        let qos1 = qos == rumqttc::QoS::AtLeastOnce;
        let pump = tokio::spawn(async move {
            let mut acked = 0;
            loop {
                tokio::select! {
                    polled = ev.poll() => match polled {
                        Ok(rumqttc::Event::Incoming(rumqttc::Packet::PubAck(_))) => acked += 1,
                        Ok(rumqttc::Event::Outgoing(rumqttc::Outgoing::Disconnect)) => break,
                        Ok(_) => {}
                        Err(e) => panic!("publisher connection: {e}"),
                    },
                    _ = total_rx.changed() => {}
                }
                if qos1 && total_rx.borrow().is_some_and(|t| acked >= t) {
                    break;
                }
            }
        });
        let mut sent = 0;
        for (topic, payload) in messages {
            client
                .publish(topic, qos, false, payload)
                .await
                .expect("publish");
            sent += 1;
            // Message `sent` is due at `start + sent * pace`: sleep only when ahead by a
            // millisecond or more (the timer's grain), so paces under 1 ms keep their rate.
            if let Some(p) = pace {
                let due = start + p.saturating_mul(u32::try_from(sent).unwrap_or(u32::MAX));
                if due > Instant::now() + Duration::from_millis(1) {
                    tokio::time::sleep_until(due.into()).await;
                }
            }
        }
        let _ = total_tx.send(Some(sent));
        if !qos1 {
            client.disconnect().await.expect("disconnect");
        }
        tokio::time::timeout(Duration::from_secs(60), pump)
            .await
            .expect("the publisher finished")
            .expect("pump");
        start.elapsed()
    })
}

/// Publishes `n` QoS 1 JSON events per device for `devices` devices (interleaved), with
/// `seq` 0..n, then waits for every PUBACK. `malformed_every` mixes in bad payloads.
/// Returns how many messages went out.
pub fn publish(
    port: u16,
    devices: usize,
    n: usize,
    malformed_every: Option<usize>,
    pace: Option<Duration>,
) -> usize {
    let mut messages = Vec::new();
    for seq in 0..n {
        for d in 0..devices {
            let topic = format!("sensors/dev-{d}/telemetry");
            let payload = format!(
                r#"{{"device":"dev-{d}","seq":{seq},"ts":{},"temperature":{:.1},"lat":52.{d:04},"lon":13.{seq:04}}}"#,
                1_750_000_000_000u64 + seq as u64,
                20.0 + (seq % 10) as f64
            );
            messages.push((topic.clone(), payload.into_bytes()));
            if malformed_every.is_some_and(|every| (seq * devices + d + 1) % every == 0) {
                messages.push((topic, b"{not json".to_vec()));
            }
        }
    }
    let total = messages.len();
    send_all(port, rumqttc::QoS::AtLeastOnce, pace, messages);
    total
}

/// How many different `event-id`s the records carry.
pub fn unique_ids(records: &[Consumed]) -> usize {
    records
        .iter()
        .filter_map(|r| r.headers.get("event-id"))
        .collect::<std::collections::HashSet<_>>()
        .len()
}

/// Checks what Kafka holds: every `dev-d` has seq 0..n in order of first appearance,
/// and returns the number of duplicate records (same event id seen twice). A duplicate
/// must be the same record again: key, headers and value equal to the first copy's,
/// but for the receive time (a message the broker sent again is received again) and the
/// tags (received again after a reload, it went through the new pipeline's stages).
pub fn check_complete_and_ordered(records: &[Consumed], devices: usize, n: usize) -> usize {
    let mut per_device: BTreeMap<String, Vec<u64>> = BTreeMap::new();
    let mut seen: std::collections::HashMap<String, &Consumed> = Default::default();
    let mut dups = 0;
    let without_received = |v: &serde_json::Value| {
        let mut v = v.clone();
        if let Some(o) = v.as_object_mut() {
            o.remove("received");
            o.remove("tags");
        }
        v
    };
    for r in records {
        let id = r.headers.get("event-id").cloned().unwrap_or_default();
        if let Some(first) = seen.get(&id) {
            assert_eq!(r.key, first.key, "{id}: a duplicate's key");
            assert_eq!(r.headers, first.headers, "{id}: a duplicate's headers");
            assert_eq!(
                without_received(&r.value),
                without_received(&first.value),
                "{id}: a duplicate's value"
            );
            dups += 1;
            continue;
        }
        seen.insert(id.clone(), r);
        let dev = r.value["device"].as_str().unwrap_or_default().to_string();
        assert_eq!(r.key, dev, "key = device");
        let seq: u64 = id
            .rsplit(':')
            .next()
            .and_then(|s| s.parse().ok())
            .expect("seq in event id");
        per_device.entry(dev).or_default().push(seq);
    }
    assert_eq!(per_device.len(), devices, "devices seen");
    for (dev, seqs) in &per_device {
        let expected: Vec<u64> = (0..n as u64).collect();
        if seqs != &expected {
            let missing: Vec<u64> = expected
                .iter()
                .filter(|s| !seqs.contains(s))
                .copied()
                .take(20)
                .collect();
            let out_of_order = seqs.windows(2).position(|w| w[0] >= w[1]);
            panic!("{dev}: {} of {n} events, missing (first 20) {missing:?}, first out-of-order at {out_of_order:?}", seqs.len());
        }
    }
    dups
}

/// Publishes the given (topic, payload) pairs with QoS 1, in order, and waits for every
/// PUBACK.
pub fn publish_raw(port: u16, messages: Vec<(String, Vec<u8>)>) {
    send_all(port, rumqttc::QoS::AtLeastOnce, None, messages);
}

/// Partitions of every test topic.
pub const PARTITIONS: i32 = 4;

/// Whether Kafka is reachable when a rig starts.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Uplink {
    /// Brokers up.
    Up,
    /// Brokers down from the start.
    Down,
}

/// A whole test setup: a temp dir, Mosquitto, the Kafka mock with `topics`, and a
/// connected gateway running [`config`] with the given extra lines. Bind the parts in
/// this order so the gateway stops first.
pub fn rig(
    topics: &[&str],
    uplink: Uplink,
    spool: &str,
    input: &str,
    kafka: &str,
) -> (tempfile::TempDir, Mosquitto, Kafka, Gateway) {
    rig_in(
        tempfile::tempdir().expect("tempdir"),
        topics,
        uplink,
        spool,
        input,
        kafka,
    )
}

/// [`rig`] in a prepared directory (a planted spool file, a small file system...).
pub fn rig_in(
    dir: tempfile::TempDir,
    topics: &[&str],
    uplink: Uplink,
    spool: &str,
    input: &str,
    kafka_extra: &str,
) -> (tempfile::TempDir, Mosquitto, Kafka, Gateway) {
    let mqtt = Mosquitto::start();
    let kafka = Kafka::start(1, topics, PARTITIONS);
    if uplink == Uplink::Down {
        kafka.down();
    }
    let gw = Gateway::start(
        dir.path(),
        &config(
            dir.path(),
            mqtt.port,
            &kafka.bootstrap,
            spool,
            input,
            kafka_extra,
        ),
    );
    gw.wait_connected();
    (dir, mqtt, kafka, gw)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn listens_on_tells_whose_socket_listens() {
        let l = TcpListener::bind(("127.0.0.1", 0)).expect("bind");
        let port = l.local_addr().expect("addr").port();
        assert!(listens_on(std::process::id(), port));
        // Another process's listener is not this one's.
        assert!(!listens_on(1, port));
        drop(l);
        assert!(!listens_on(std::process::id(), port));
    }

    #[test]
    fn mosquitto_starts_on_a_port_it_holds_itself() {
        let m = Mosquitto::start();
        assert!(listens_on(m.child.id(), m.port));
    }

    #[test]
    fn a_gateway_whose_metrics_port_was_taken_starts_on_another() {
        let taken = TcpListener::bind(("127.0.0.1", 0)).expect("bind");
        let taken_port = taken.local_addr().expect("addr").port();
        let dir = tempfile::tempdir().expect("tempdir");
        // Nothing listens on the MQTT and Kafka ports: the gateway keeps retrying them.
        let config = config(dir.path(), free_port(), "127.0.0.1:1", "", "", "");
        let mut ports = [taken_port, free_port()].into_iter();
        let mut g = Gateway::start_on(dir.path(), &config, || ports.next().expect("port"));
        assert_ne!(g.metrics_port, taken_port);
        assert!(listens_on(g.pid().expect("running"), g.metrics_port));
        assert!(g.log_text().contains("cannot listen on telemetry.listen"));
        g.kill9();
    }
}
