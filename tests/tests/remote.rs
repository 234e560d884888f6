//! Remote configuration end to end: a real Mosquitto as the control (and data) broker,
//! the Kafka mock over TCP, the gateway as its own process, and the operator's commands
//! (`gateway remote keygen / sign / push / status`) run as a user would.

mod common;

use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use common::*;

const TOPIC: &str = "telemetry.site";
const PREFIX: &str = "fleet";

/// A gateway with `[control]` on the same Mosquitto, one trusted key (`ops`).
/// Fields drop in this order: the gateway stops first (printing its log on a failure,
/// while the directory is still there), then its brokers, then the directory.
struct Rig {
    gw: Gateway,
    mqtt: Mosquitto,
    kafka: Kafka,
    dir: tempfile::TempDir,
    /// Envelopes signed so far (file names).
    n: usize,
}

fn remote(args: &[&str]) -> String {
    let out = gateway_command()
        .arg("remote")
        .args(args)
        .output()
        .expect("gateway remote");
    assert!(
        out.status.success(),
        "gateway remote {args:?}: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8_lossy(&out.stdout).into_owned()
}

/// `gateway remote keygen`: the key file and the public key it printed.
fn keygen(dir: &Path, id: &str) -> (PathBuf, String) {
    let key = dir.join(format!("{id}.key"));
    let snippet = remote(&["keygen", "--out", key.to_str().expect("utf8"), "--id", id]);
    let public = snippet
        .lines()
        .find_map(|l| l.strip_prefix("public_key = "))
        .expect("public key")
        .trim_matches('"')
        .to_string();
    (key, public)
}

impl Rig {
    fn start(health: &str) -> Rig {
        let dir = tempfile::tempdir().expect("tempdir");
        let mqtt = Mosquitto::start();
        let kafka = Kafka::start(1, &[TOPIC], PARTITIONS);
        let (_, public) = keygen(dir.path(), "ops");
        let control = format!(
            "\n[control]\nhost = \"127.0.0.1\"\nport = {}\nprefix = \"{PREFIX}\"\nhealth_window = \"{health}\"\nstatus_interval = \"1s\"\ntrusted_keys = [{{ id = \"ops\", public_key = \"{public}\" }}]\n",
            mqtt.port
        );
        let cfg = config(dir.path(), mqtt.port, &kafka.bootstrap, "", "", &control)
            .replace("id = \"gw-test\"", "id = \"gw-test\"\ngroups = [\"plant\"]");
        let gw = Gateway::start(dir.path(), &cfg);
        gw.wait_connected();
        Rig {
            dir,
            mqtt,
            kafka,
            gw,
            n: 0,
        }
    }

    /// The pipeline TOML a remote config carries: the rig's input and Kafka, tagged
    /// `cfg = <tag>`; `brokers` may point elsewhere.
    fn pipeline(&self, tag: &str, brokers: &str) -> String {
        format!(
            r#"[[inputs]]
type = "mqtt"
name = "site"
host = "127.0.0.1"
port = {}
qos = 1
topics = ["sensors/{{device}}/telemetry"]
reconnect = {{ min = "100ms", max = "1s" }}

[[stages]]
type = "tags"
tags = {{ cfg = "{tag}" }}

[output.kafka]
brokers = "{brokers}"
topic = "telemetry.{{source}}"
linger = "5ms"
message_timeout = "10s"
spool_after = "2s"
"#,
            self.mqtt.port
        )
    }

    /// Signs `pipeline` (or a key change, `extra` flags) as `version` for `target`;
    /// returns the envelope file.
    fn sign(
        &mut self,
        key: &str,
        version: u64,
        target: &str,
        pipeline: Option<&str>,
        extra: &[&str],
    ) -> PathBuf {
        self.n += 1;
        let mut args = vec![
            "sign".to_string(),
            "--key".into(),
            self.dir
                .path()
                .join(format!("{key}.key"))
                .display()
                .to_string(),
            "--key-id".into(),
            key.into(),
            "--version".into(),
            version.to_string(),
            "--target".into(),
            target.into(),
        ];
        args.extend(extra.iter().map(|s| s.to_string()));
        if let Some(p) = pipeline {
            let file = self.dir.path().join(format!("pipeline-{}.toml", self.n));
            std::fs::write(&file, p).expect("pipeline");
            args.push(file.display().to_string());
        }
        let refs: Vec<&str> = args.iter().map(String::as_str).collect();
        let env = remote(&refs);
        let file = self.dir.path().join(format!("envelope-{}.json", self.n));
        std::fs::write(&file, env).expect("envelope");
        file
    }

    fn push(&self, envelope: &Path) {
        let port = self.mqtt.port.to_string();
        remote(&[
            "push",
            envelope.to_str().expect("utf8"),
            "--port",
            &port,
            "--prefix",
            PREFIX,
        ]);
    }

    /// Pushes `envelope` and checks that it is refused, the reason naming `why`.
    fn refused(&self, envelope: &Path, version: u64, why: &str) -> serde_json::Value {
        self.push(envelope);
        let r = self.status(version, "rejected", Duration::from_secs(5));
        assert!(r["reason"].as_str().unwrap_or("").contains(why), "{r}");
        r
    }

    /// Waits for the retained `config/status` report of `version` in `state`.
    fn status(&self, version: u64, state: &str, within: Duration) -> serde_json::Value {
        let topic = format!("{PREFIX}/gw-test/config/status");
        let start = Instant::now();
        let mut last = serde_json::Value::Null;
        while start.elapsed() < within {
            if let Some(v) = retained(self.mqtt.port, &topic) {
                if v["version"] == version && v["state"] == state {
                    return v;
                }
                last = v;
            }
            std::thread::sleep(Duration::from_millis(100));
        }
        panic!("no {state} report for version {version} within {within:?}; last: {last}");
    }

    /// Publishes `n` events per device and waits until Kafka has `n * 5` records tagged
    /// `cfg = tag` in all.
    fn flows_with(&self, tag: &str, round: usize) {
        assert_eq!(self.flows_with_one_of(&[tag], round), tag);
    }

    /// Like [`Rig::flows_with`], for a pipeline that may be any of `tags` (one for all
    /// events of the round: never a mix); returns it.
    fn flows_with_one_of(&self, tags: &[&str], round: usize) -> String {
        let devices = 5;
        let n = 20;
        let messages: Vec<(String, Vec<u8>)> = (0..n)
            .flat_map(|seq| {
                (0..devices).map(move |d| {
                    (
                        format!("sensors/r{round}-{d}/telemetry"),
                        format!(r#"{{"device":"r{round}-{d}","seq":{seq},"temperature":20.0}}"#)
                            .into_bytes(),
                    )
                })
            })
            .collect();
        publish_raw(self.mqtt.port, messages);
        let prefix = format!("r{round}-");
        let records = self
            .kafka
            .read(TOPIC, PARTITIONS, Duration::from_secs(30), |r| {
                r.iter()
                    .filter(|c| {
                        c.value["device"]
                            .as_str()
                            .is_some_and(|d| d.starts_with(&prefix))
                    })
                    .count()
                    >= devices * n
            });
        let ours: Vec<_> = records
            .iter()
            .filter(|c| {
                c.value["device"]
                    .as_str()
                    .is_some_and(|d| d.starts_with(&prefix))
            })
            .collect();
        assert_eq!(ours.len(), devices * n, "every event of round {round}");
        let tag = ours[0].value["tags"]["cfg"]
            .as_str()
            .unwrap_or("")
            .to_string();
        assert!(
            tags.contains(&tag.as_str()),
            "round {round}: {tag:?} not one of {tags:?}"
        );
        for c in &ours {
            assert_eq!(
                c.value["tags"]["cfg"],
                tag.as_str(),
                "round {round}: {}",
                c.value
            );
        }
        tag
    }
}

/// Publishes `n` events of `device` (QoS 1).
fn traffic(port: u16, device: &str, n: usize) {
    publish_raw(
        port,
        (0..n)
            .map(|seq| {
                (
                    format!("sensors/{device}/telemetry"),
                    format!(r#"{{"device":"{device}","seq":{seq},"temperature":20.0}}"#)
                        .into_bytes(),
                )
            })
            .collect(),
    );
}

/// The retained message on `topic`, if any (JSON).
fn retained(port: u16, topic: &str) -> Option<serde_json::Value> {
    let id = format!("probe-{}-{}", std::process::id(), free_port());
    let mut o = rumqttc::MqttOptions::new(id, "127.0.0.1", port);
    o.set_keep_alive(Duration::from_secs(5))
        .set_max_packet_size(8 * 1024 * 1024, 64 * 1024);
    let (client, mut conn) = rumqttc::Client::new(o, 10);
    client.subscribe(topic, rumqttc::QoS::AtLeastOnce).ok()?;
    let until = Instant::now() + Duration::from_millis(500);
    while Instant::now() < until {
        match conn.recv_timeout(Duration::from_millis(100)) {
            Ok(Ok(rumqttc::Event::Incoming(rumqttc::Packet::Publish(p)))) => {
                let _ = client.disconnect();
                return serde_json::from_slice(&p.payload).ok();
            }
            Ok(Err(_)) => return None,
            _ => {}
        }
    }
    let _ = client.disconnect();
    None
}

#[test]
fn a_signed_config_is_applied_live_within_5s_and_reported() {
    let mut rig = Rig::start("1s");
    let pipeline = rig.pipeline("v1", &rig.kafka.bootstrap.clone());
    let env = rig.sign("ops", 1, "gw-test", Some(&pipeline), &[]);
    let pushed = Instant::now();
    rig.push(&env);
    rig.status(1, "applying", Duration::from_secs(5));
    let r = rig.status(1, "applied", Duration::from_secs(10));
    // Live within 5 s: "applied" comes after the 1 s health window that follows it.
    let took = pushed.elapsed();
    assert!(
        took < Duration::from_secs(6),
        "applied within 5 s, then kept after the 1 s health window: took {took:?}"
    );
    assert_eq!(r["running"], 1);
    assert_eq!(r["hash"].as_str().map(str::len), Some(64));
    rig.flows_with("v1", 1);
    // The operator's table.
    let port = rig.mqtt.port.to_string();
    let table = remote(&[
        "status", "--port", &port, "--prefix", PREFIX, "--wait", "1500ms",
    ]);
    let row = table
        .lines()
        .find(|l| l.starts_with("gw-test"))
        .expect(&table);
    assert!(row.contains("applied"), "{table}");
    // The operator's diff against what the gateway runs.
    let same = rig.dir.path().join("pipeline-1.toml");
    let out = remote(&[
        "diff",
        "--gateway",
        "gw-test",
        same.to_str().expect("utf8"),
        "--port",
        &port,
        "--prefix",
        PREFIX,
    ]);
    assert!(out.contains("runs this config (version 1)"), "{out}");
    let candidate = rig.dir.path().join("candidate.toml");
    std::fs::write(&candidate, rig.pipeline("v2", &rig.kafka.bootstrap.clone())).expect("write");
    let out = remote(&[
        "diff",
        "--gateway",
        "gw-test",
        candidate.to_str().expect("utf8"),
        "--port",
        &port,
        "--prefix",
        PREFIX,
    ]);
    assert!(
        out.contains("-tags = { cfg = \"v1\" }") && out.contains("+tags = { cfg = \"v2\" }"),
        "{out}"
    );
    // After a restart the applied pipeline runs again, and its retained envelope is not
    // taken twice.
    rig.gw.kill9();
    rig.gw.restart();
    rig.gw.wait_connected();
    rig.flows_with("v1", 2);
    assert_eq!(
        rig.status(1, "applied", Duration::from_secs(5))["running"],
        1
    );
}

/// A config of 160 KiB (a large rename table; inline GeoJSON gets there too) is applied,
/// published back in full on `config/applied`, and the control connection survives it:
/// the next config still arrives. The client used to send at most 64 KiB, and sending
/// `config/applied` dropped the connection after every connect, so no later config
/// could ever reach the gateway.
#[test]
fn a_large_config_is_applied_and_the_next_one_still_arrives() {
    let mut rig = Rig::start("1s");
    let renames: String = (0..8000)
        .map(|i| format!("absent_{i:05} = \"renamed_{i:05}\"\n"))
        .collect();
    let large = format!(
        "{}\n[[stages]]\ntype = \"rename\"\n[stages.readings]\n{renames}",
        rig.pipeline("big", &rig.kafka.bootstrap.clone())
    );
    assert!(large.len() > 160 * 1024, "{}", large.len());
    let env = rig.sign("ops", 1, "gw-test", Some(&large), &[]);
    rig.push(&env);
    rig.status(1, "applied", Duration::from_secs(20));
    rig.flows_with("big", 1);
    let topic = format!("{PREFIX}/gw-test/config/applied");
    let applied = retained(rig.mqtt.port, &topic).expect("config/applied");
    assert_eq!(applied["version"], 1);
    assert!(
        applied["config"]
            .as_str()
            .is_some_and(|c| c.contains("absent_07999")),
        "the whole pipeline is published"
    );
    let small = rig.pipeline("small", &rig.kafka.bootstrap.clone());
    let env = rig.sign("ops", 2, "gw-test", Some(&small), &[]);
    rig.push(&env);
    rig.status(2, "applied", Duration::from_secs(20));
    rig.flows_with("small", 2);
}

#[test]
fn every_rejection_names_its_reason_and_the_old_config_keeps_running() {
    let mut rig = Rig::start("1s");
    let bootstrap = rig.kafka.bootstrap.clone();
    let v1 = rig.pipeline("v1", &bootstrap);
    let env = rig.sign("ops", 1, "gw-test", Some(&v1), &[]);
    rig.push(&env);
    rig.status(1, "applied", Duration::from_secs(10));
    let v2 = rig.pipeline("v2", &bootstrap);

    // Tampered after signing: bad signature.
    let env = rig.sign("ops", 2, "gw-test", Some(&v2), &[]);
    let text = std::fs::read_to_string(&env)
        .expect("envelope")
        .replace("v2", "evil");
    std::fs::write(&env, text).expect("write");
    rig.refused(&env, 2, "bad_signature");

    // A key the gateway does not trust.
    keygen(rig.dir.path(), "mallory");
    let env = rig.sign("mallory", 3, "gw-test", Some(&v2), &[]);
    rig.refused(&env, 3, "unknown_key");

    // Expired.
    let env = rig.sign(
        "ops",
        4,
        "gw-test",
        Some(&v2),
        &["--not-after", "2020-01-01T00:00:00Z"],
    );
    rig.refused(&env, 4, "expired");

    // For another gateway, delivered on this one's topic.
    let env = rig.sign("ops", 5, "gw-other", Some(&v2), &[]);
    publish_raw(
        rig.mqtt.port,
        vec![(
            format!("{PREFIX}/gw-test/config"),
            std::fs::read(&env).expect("envelope"),
        )],
    );
    let r = rig.status(5, "rejected", Duration::from_secs(5));
    assert!(
        r["reason"].as_str().unwrap_or("").contains("wrong_target"),
        "{r}"
    );

    // A config that does not validate: every field error, with its path.
    let bad = v2
        .replace("qos = 1", "qos = 7")
        .replace(&format!("brokers = \"{bootstrap}\""), "brokers = \"\"");
    let env = rig.sign("ops", 6, "gw-test", Some(&bad), &[]);
    let r = rig.refused(&env, 6, "invalid_config");
    let reason = r["reason"].as_str().unwrap_or("");
    assert!(
        reason.contains("inputs[0].qos") && reason.contains("output.kafka.brokers"),
        "{r}"
    );

    // An expression that does not compile is invalid too (the stages are built).
    let bad = v2.replace(
        "type = \"tags\"\ntags = { cfg = \"v2\" }",
        "type = \"filter\"\nexpr = \"temperature >\"",
    );
    let env = rig.sign("ops", 7, "gw-test", Some(&bad), &[]);
    rig.refused(&env, 7, "stages[0] (filter)");

    // Anti-rollback: a version below the applied one.
    let env = rig.sign("ops", 0, "gw-test", Some(&v2), &[]);
    rig.refused(&env, 0, "old_version");

    // Through all of it, version 1 kept running.
    rig.flows_with("v1", 1);
    assert_eq!(
        retained(rig.mqtt.port, &format!("{PREFIX}/gw-test/config/status")).expect("status")
            ["running"],
        1
    );
}

/// Applies `v1` as version 1, then version 2 with Kafka at an address nothing listens
/// on, where the old one worked; returns once version 2 is in its health window.
fn apply_then_try_a_dead_kafka(rig: &mut Rig, v1: &str) {
    let env = rig.sign("ops", 1, "gw-test", Some(v1), &[]);
    rig.push(&env);
    rig.status(1, "applied", Duration::from_secs(10));
    let dead = format!("127.0.0.1:{}", free_port());
    let env = rig.sign("ops", 2, "gw-test", Some(&rig.pipeline("v2", &dead)), &[]);
    rig.push(&env);
    rig.status(2, "applying", Duration::from_secs(5));
}

/// The health window ends unhealthy, but the last good pipeline cannot be built again
/// (a zones file it names is gone): the report says so, and names the pipeline that
/// keeps running.
#[test]
fn a_rollback_that_cannot_rebuild_the_old_pipeline_says_so() {
    let mut rig = Rig::start("4s");
    let bootstrap = rig.kafka.bootstrap.clone();
    let zones = rig.dir.path().join("zones.geojson");
    std::fs::write(
        &zones,
        r#"{"type":"Polygon","coordinates":[[[13.0,52.0],[14.0,52.0],[14.0,53.0],[13.0,53.0],[13.0,52.0]]]}"#,
    )
    .expect("zones");
    let v1 = format!(
        "{}\n[[stages]]\ntype = \"geofence\"\nfile = \"{}\"\n",
        rig.pipeline("v1", &bootstrap),
        zones.display()
    );
    apply_then_try_a_dead_kafka(&mut rig, &v1);
    std::fs::remove_file(&zones).expect("remove the zones file");
    traffic(rig.mqtt.port, "window-0", 20);
    let r = rig.status(2, "rollback_failed", Duration::from_secs(20));
    let reason = r["reason"].as_str().unwrap_or("");
    assert!(
        reason.contains("Kafka") && reason.contains("the rollback failed too"),
        "{r}"
    );
    assert_eq!(r["running"], 2, "the unhealthy pipeline still runs");
    // A restart cannot run the last good pipeline either: it runs the local file's
    // instead of exiting (under systemd, at every restart).
    rig.gw.kill9();
    rig.gw.restart();
    rig.gw.wait_connected();
    assert!(
        rig.gw.log_text().contains("trying the next one"),
        "{}",
        rig.gw.log_text()
    );
}

/// With no last good pipeline a rollback runs the local file's, as the file is now: a
/// SIGHUP after the start changed it, and the rollback used to run it as it was at the
/// start.
#[test]
fn a_rollback_with_no_last_good_runs_the_local_file_as_it_is_now() {
    let mut rig = Rig::start("3s");
    let file = rig.dir.path().join("gateway.toml");
    let text = std::fs::read_to_string(&file).expect("config");
    let edited = text.replacen(
        "[output.kafka]",
        "[[stages]]\ntype = \"tags\"\ntags = { cfg = \"edited\" }\n\n[output.kafka]",
        1,
    );
    assert_ne!(edited, text);
    std::fs::write(&file, edited).expect("write");
    rig.gw.hup();
    wait_for("the reload", Duration::from_secs(30), || {
        rig.gw.log_text().contains("pipeline reloaded")
    });
    rig.gw.wait_connected();
    rig.flows_with("edited", 1);
    let dead = format!("127.0.0.1:{}", free_port());
    let env = rig.sign("ops", 1, "gw-test", Some(&rig.pipeline("v1", &dead)), &[]);
    rig.push(&env);
    rig.status(1, "applying", Duration::from_secs(5));
    traffic(rig.mqtt.port, "window-0", 20);
    rig.status(1, "rolled_back", Duration::from_secs(20));
    rig.flows_with("edited", 2);
}

/// A quiet site: no event is sent during the health window, so no send fails and the
/// router still counts Kafka as up. A new output whose brokers do not answer must not be
/// kept for that.
#[test]
fn a_new_output_that_reaches_no_broker_is_rolled_back_on_a_quiet_site() {
    let mut rig = Rig::start("2s");
    let bootstrap = rig.kafka.bootstrap.clone();
    let env = rig.sign(
        "ops",
        1,
        "gw-test",
        Some(&rig.pipeline("v1", &bootstrap)),
        &[],
    );
    rig.push(&env);
    rig.status(1, "applied", Duration::from_secs(20));
    let dead = format!("127.0.0.1:{}", free_port());
    let env = rig.sign("ops", 2, "gw-test", Some(&rig.pipeline("v2", &dead)), &[]);
    rig.push(&env);
    let r = rig.status(2, "rolled_back", Duration::from_secs(30));
    assert!(
        r["reason"]
            .as_str()
            .unwrap_or("")
            .contains("did not answer"),
        "{r}"
    );
    assert_eq!(r["running"], 1);
    rig.flows_with("v1", 1);
}

#[test]
fn an_unhealthy_config_is_rolled_back_after_its_health_window() {
    let mut rig = Rig::start("4s");
    let bootstrap = rig.kafka.bootstrap.clone();
    let v1 = rig.pipeline("v1", &bootstrap);
    apply_then_try_a_dead_kafka(&mut rig, &v1);
    // Traffic during the health window: nothing is confirmed, records wait, the router
    // turns to the spool (Kafka down) and the window ends unhealthy.
    traffic(rig.mqtt.port, "window-0", 20);
    let r = rig.status(2, "rolled_back", Duration::from_secs(20));
    assert!(r["reason"].as_str().unwrap_or("").contains("Kafka"), "{r}");
    assert_eq!(r["running"], 1);
    rig.flows_with("v1", 1);

    // A config that drops far more than the old one did (here: everything).
    let drops_all = rig.pipeline("v3", &bootstrap).replace(
        "type = \"tags\"\ntags = { cfg = \"v3\" }",
        "type = \"filter\"\nexpr = \"false\"",
    );
    let env = rig.sign("ops", 3, "gw-test", Some(&drops_all), &[]);
    rig.push(&env);
    rig.status(3, "applying", Duration::from_secs(5));
    traffic(rig.mqtt.port, "window-1", 40);
    let r = rig.status(3, "rolled_back", Duration::from_secs(20));
    assert!(
        r["reason"]
            .as_str()
            .unwrap_or("")
            .contains("100% of events dropped"),
        "{r}"
    );
    rig.flows_with("v1", 2);
}

#[test]
fn group_configs_yield_to_the_gateways_own_and_keys_rotate() {
    let mut rig = Rig::start("1s");
    let bootstrap = rig.kafka.bootstrap.clone();
    let env = rig.sign(
        "ops",
        1,
        "group:plant",
        Some(&rig.pipeline("group-1", &bootstrap)),
        &[],
    );
    rig.push(&env);
    rig.status(1, "applied", Duration::from_secs(10));
    rig.flows_with("group-1", 1);
    let env = rig.sign(
        "ops",
        2,
        "gw-test",
        Some(&rig.pipeline("own-2", &bootstrap)),
        &[],
    );
    rig.push(&env);
    rig.status(2, "applied", Duration::from_secs(10));
    let env = rig.sign(
        "ops",
        3,
        "group:plant",
        Some(&rig.pipeline("group-3", &bootstrap)),
        &[],
    );
    rig.refused(&env, 3, "overridden");
    rig.flows_with("own-2", 2);

    // Rotation: ops adds ops2; ops2 signs a config; ops2 removes ops; ops is refused.
    let (_, public2) = keygen(rig.dir.path(), "ops2");
    let add = format!("ops2={public2}");
    let env = rig.sign("ops", 4, "gw-test", None, &["--add-key", &add]);
    rig.push(&env);
    rig.status(4, "applied", Duration::from_secs(5));
    let env = rig.sign(
        "ops2",
        5,
        "gw-test",
        Some(&rig.pipeline("own-5", &bootstrap)),
        &[],
    );
    rig.push(&env);
    rig.status(5, "applied", Duration::from_secs(10));
    let env = rig.sign("ops2", 6, "gw-test", None, &["--remove-key", "ops"]);
    rig.push(&env);
    rig.status(6, "applied", Duration::from_secs(5));
    let env = rig.sign(
        "ops",
        7,
        "gw-test",
        Some(&rig.pipeline("own-7", &bootstrap)),
        &[],
    );
    rig.refused(&env, 7, "unknown_key");
    rig.flows_with("own-5", 3);
}

#[test]
fn events_flow_through_20_config_changes_and_none_is_lost() {
    let mut rig = Rig::start("100ms");
    let bootstrap = rig.kafka.bootstrap.clone();
    let (devices, n) = (5, 600);
    let port = rig.mqtt.port;
    let publisher =
        std::thread::spawn(move || publish(port, devices, n, None, Some(Duration::from_millis(4))));
    for v in 1..=20u64 {
        let env = rig.sign(
            "ops",
            v,
            "gw-test",
            Some(&rig.pipeline(&format!("v{v}"), &bootstrap)),
            &[],
        );
        rig.push(&env);
        rig.status(v, "applied", Duration::from_secs(10));
    }
    publisher.join().expect("publisher");
    let records = rig
        .kafka
        .read(TOPIC, PARTITIONS, Duration::from_secs(60), |r| {
            let ids: std::collections::HashSet<_> =
                r.iter().filter_map(|c| c.headers.get("event-id")).collect();
            ids.len() >= devices * n
        });
    // Every event, in order per device (duplicates allowed: at least once).
    check_complete_and_ordered(&records, devices, n);
    let tags: std::collections::BTreeSet<_> = records
        .iter()
        .filter_map(|c| c.value["tags"]["cfg"].as_str())
        .collect();
    assert!(tags.len() >= 2, "events crossed config changes: {tags:?}");
}

/// Retained envelopes come again at every reconnect: an older one (a group's, under the
/// gateway's own) is not refused again, which overwrote the status report with a stale
/// rejection; and a config rolled back because the gateway restarted during its health
/// window is not taken again from its retained envelope (one that brought the process
/// down would, at every start).
#[test]
fn retained_envelopes_decided_before_are_not_taken_again() {
    let mut rig = Rig::start("3s");
    let bootstrap = rig.kafka.bootstrap.clone();
    let own = rig.sign(
        "ops",
        5,
        "gw-test",
        Some(&rig.pipeline("v5", &bootstrap)),
        &[],
    );
    rig.push(&own);
    rig.status(5, "applied", Duration::from_secs(10));
    let group = rig.sign(
        "ops",
        3,
        "group:plant",
        Some(&rig.pipeline("g3", &bootstrap)),
        &[],
    );
    rig.push(&group);
    rig.status(3, "rejected", Duration::from_secs(5));
    let own = rig.sign(
        "ops",
        6,
        "gw-test",
        Some(&rig.pipeline("v6", &bootstrap)),
        &[],
    );
    rig.push(&own);
    rig.status(6, "applied", Duration::from_secs(10)); // its health window passed: kept
    rig.gw.kill9();
    rig.gw.restart();
    rig.gw.wait_connected();
    std::thread::sleep(Duration::from_secs(2));
    let r = rig.status(6, "applied", Duration::from_secs(5));
    assert_eq!(r["running"], 6, "{r}");
    // Restarted during the health window of v7: rolled back, and v7 stays rolled back.
    let next = rig.sign(
        "ops",
        7,
        "gw-test",
        Some(&rig.pipeline("v7", &bootstrap)),
        &[],
    );
    rig.push(&next);
    rig.status(7, "applying", Duration::from_secs(10));
    rig.gw.kill9();
    // As if the kill came before the apply was recorded as carried out: the retained
    // envelope would be taken again.
    std::fs::write(
        rig.dir.path().join("state/remote/version"),
        r#"{"version":7,"done":false}"#,
    )
    .expect("version");
    rig.gw.restart();
    rig.gw.wait_connected();
    rig.status(7, "rolled_back", Duration::from_secs(10));
    std::thread::sleep(Duration::from_secs(4));
    let r = rig.status(7, "rolled_back", Duration::from_secs(5));
    assert_eq!(r["running"], 6, "{r}");
    rig.flows_with("v6", 1);
}

#[test]
fn kill_9_during_an_apply_leaves_the_old_or_the_new_config_never_a_mix() {
    let mut rig = Rig::start("1s");
    let bootstrap = rig.kafka.bootstrap.clone();
    let env = rig.sign(
        "ops",
        1,
        "gw-test",
        Some(&rig.pipeline("v1", &bootstrap)),
        &[],
    );
    rig.push(&env);
    rig.status(1, "applied", Duration::from_secs(10));
    let mut old = "v1".to_string();
    for (i, delay_ms) in [0u64, 30, 150, 600, 2500].into_iter().enumerate() {
        let v = i as u64 + 2;
        let new = format!("v{v}");
        let env = rig.sign(
            "ops",
            v,
            "gw-test",
            Some(&rig.pipeline(&new, &bootstrap)),
            &[],
        );
        rig.push(&env);
        std::thread::sleep(Duration::from_millis(delay_ms));
        rig.gw.kill9();
        rig.gw.restart();
        rig.gw.wait_connected();
        let running = rig.flows_with_one_of(&[&old, &new], i + 1);
        // What the report says runs is what runs.
        let want = running
            .trim_start_matches('v')
            .parse::<u64>()
            .expect("version");
        let start = Instant::now();
        loop {
            let r = retained(rig.mqtt.port, &format!("{PREFIX}/gw-test/config/status"));
            if r.as_ref()
                .is_some_and(|r| r["running"] == want && r["state"] != "applying")
            {
                break;
            }
            assert!(
                start.elapsed() < Duration::from_secs(10),
                "report: {r:?}, running {running}"
            );
            std::thread::sleep(Duration::from_millis(100));
        }
        old = running;
    }
}
