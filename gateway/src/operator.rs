//! `gateway remote ...`: the operator's side of remote configuration: make a signing
//! key, sign a config (or a key change) into an envelope, push it to a gateway or a group
//! through the control broker, and read a fleet's status.

use std::path::PathBuf;
use std::time::SystemTime;

use anyhow::Context as _;
use gateway_config::remote::{self, Envelope, KeyChange, Kind, TrustedKey};

/// `gateway remote` subcommands.
#[derive(Debug, clap::Subcommand)]
pub enum RemoteCommand {
    /// Make a signing key: writes its secret to FILE (mode 0600) and prints the public
    /// key for `[control] trusted_keys`.
    Keygen {
        /// Where to write the secret key.
        #[arg(long)]
        out: PathBuf,
        /// The key's id (what envelopes name).
        #[arg(long)]
        id: String,
    },
    /// Sign a pipeline config (the TOML of `[[inputs]]`, `[[stages]]`, `[output]`), or a
    /// key change, into an envelope (JSON on stdout).
    Sign {
        /// The secret key file (from `keygen`).
        #[arg(long)]
        key: PathBuf,
        /// The key's id.
        #[arg(long)]
        key_id: String,
        /// The version: above every version the targets accepted.
        #[arg(long)]
        version: u64,
        /// A gateway id, or `group:NAME`.
        #[arg(long)]
        target: String,
        /// Refuse it after this time (RFC 3339).
        #[arg(long)]
        not_after: Option<String>,
        /// A key to trust from now on, `ID=PUBLIC_KEY` (makes a key change).
        #[arg(long = "add-key")]
        add_key: Vec<String>,
        /// A key id to trust no more (makes a key change).
        #[arg(long = "remove-key")]
        remove_key: Vec<String>,
        /// The pipeline config file (not with a key change).
        config: Option<PathBuf>,
    },
    /// Publish an envelope, retained, to its target's topic on the control broker.
    Push {
        /// The envelope file (from `sign`).
        envelope: PathBuf,
        /// The control broker.
        #[command(flatten)]
        broker: Broker,
    },
    /// The difference between a candidate pipeline and the one a gateway runs (as it
    /// published it, retained, on `<prefix>/<gateway>/config/applied`).
    Diff {
        /// The gateway.
        #[arg(long)]
        gateway: String,
        /// The candidate pipeline config.
        candidate: PathBuf,
        /// The control broker.
        #[command(flatten)]
        broker: Broker,
    },
    /// A table of the gateways that reported to the control broker: config version,
    /// state, reason, last seen.
    Status {
        /// The control broker.
        #[command(flatten)]
        broker: Broker,
        /// How long to collect retained reports.
        #[arg(long, default_value = "2s", value_parser = humantime::parse_duration)]
        wait: std::time::Duration,
    },
}

/// The control broker.
#[derive(Debug, clap::Args)]
pub struct Broker {
    /// Host.
    #[arg(long, default_value = "127.0.0.1")]
    pub host: String,
    /// Port.
    #[arg(long, default_value_t = 1883)]
    pub port: u16,
    /// Topic prefix (the gateways' `[control] prefix`).
    #[arg(long, default_value = "edge-gateway")]
    pub prefix: String,
}

/// Runs a `gateway remote` command.
pub fn run(cmd: RemoteCommand) -> anyhow::Result<()> {
    match cmd {
        RemoteCommand::Keygen { out, id } => {
            use rand::Rng;
            let mut secret = [0u8; 32];
            rand::rng().fill(&mut secret);
            let key = remote::signing_key(secret);
            write_secret(&out, remote::encode_signing_key(&key).as_bytes())?;
            println!(
                "[[control.trusted_keys]]\nid = {id:?}\npublic_key = {:?}",
                remote::public_key(&key)
            );
            Ok(())
        }
        RemoteCommand::Sign {
            key,
            key_id,
            version,
            target,
            not_after,
            add_key,
            remove_key,
            config,
        } => {
            let signing = remote::read_signing_key(&key).map_err(anyhow::Error::msg)?;
            let changes_keys = !add_key.is_empty() || !remove_key.is_empty();
            let (kind, config, keys) = match (config, changes_keys) {
                (Some(path), false) => {
                    let text = std::fs::read_to_string(&path)
                        .with_context(|| format!("cannot read {}", path.display()))?;
                    (Kind::Config, Some(text), None)
                }
                (None, true) => {
                    let add = add_key
                        .iter()
                        .map(|a| {
                            let (id, public_key) = a
                                .split_once('=')
                                .with_context(|| format!("--add-key {a:?}: write ID=PUBLIC_KEY"))?;
                            Ok(TrustedKey {
                                id: id.into(),
                                public_key: public_key.into(),
                            })
                        })
                        .collect::<anyhow::Result<Vec<_>>>()?;
                    remote::verifying_keys(&add).map_err(anyhow::Error::msg)?;
                    let change = KeyChange {
                        add,
                        remove: remove_key,
                    };
                    (Kind::Keys, None, Some(change))
                }
                _ => anyhow::bail!("give a config file, or --add-key/--remove-key, not both"),
            };
            let mut env = Envelope {
                version,
                target,
                issued_at: remote::rfc3339(SystemTime::now()),
                not_after,
                kind,
                config,
                keys,
                key_id,
                signature: String::new(),
            };
            env.sign(&signing).map_err(|e| anyhow::anyhow!("{e}"))?;
            println!("{}", serde_json::to_string_pretty(&env)?);
            Ok(())
        }
        RemoteCommand::Push { envelope, broker } => mqtt::push(&envelope, &broker),
        RemoteCommand::Status { broker, wait } => mqtt::status(&broker, wait),
        RemoteCommand::Diff {
            gateway,
            candidate,
            broker,
        } => mqtt::diff(&gateway, &candidate, &broker),
    }
}

fn write_secret(path: &std::path::Path, bytes: &[u8]) -> anyhow::Result<()> {
    use std::io::Write;
    use std::os::unix::fs::OpenOptionsExt;
    let mut f = std::fs::OpenOptions::new()
        .write(true)
        .create_new(true)
        .mode(0o600)
        .open(path)
        .with_context(|| format!("cannot create {} (it must not exist yet)", path.display()))?;
    f.write_all(bytes)?;
    f.sync_all()?;
    Ok(())
}

/// The topic an envelope for `target` goes to.
pub fn topic_for(prefix: &str, target: &str) -> String {
    match target.strip_prefix("group:") {
        Some(g) => format!("{prefix}/groups/{g}/config"),
        None => format!("{prefix}/{target}/config"),
    }
}

mod mqtt {
    use std::collections::BTreeMap;
    use std::time::{Duration, Instant};

    use anyhow::Context as _;
    use rumqttc::{Client, Event, MqttOptions, Packet, QoS};

    use super::{topic_for, Broker};
    use crate::remote::Report;

    fn client(b: &Broker, who: &str) -> (Client, rumqttc::Connection) {
        let id = format!("gateway-remote-{who}-{}", std::process::id());
        let mut o = MqttOptions::new(id, &b.host, b.port);
        o.set_keep_alive(Duration::from_secs(10))
            // In: `config/applied`, which the gateway sends up to 8 MiB (remote.rs `MAX_OUT`).
            .set_max_packet_size(8 * 1024 * 1024, 4 * 1024 * 1024);
        Client::new(o, 16)
    }

    /// How long `push` waits for the broker to confirm the publish.
    const PUSH_LIMIT: Duration = Duration::from_secs(30);

    pub fn push(path: &std::path::Path, b: &Broker) -> anyhow::Result<()> {
        let text = std::fs::read_to_string(path)
            .with_context(|| format!("cannot read {}", path.display()))?;
        let env: gateway_config::remote::Envelope =
            serde_json::from_str(&text).context("not an envelope")?;
        let topic = topic_for(&b.prefix, &env.target);
        let (client, mut conn) = client(b, "push");
        client.publish(topic.clone(), QoS::AtLeastOnce, true, text.into_bytes())?;
        // A broker that takes the connection but never confirms must not hang a script.
        let deadline = std::time::Instant::now() + PUSH_LIMIT;
        loop {
            let left = deadline.saturating_duration_since(std::time::Instant::now());
            match conn.recv_timeout(left) {
                Ok(Ok(Event::Incoming(Packet::PubAck(_)))) => {
                    println!("pushed version {} to {topic}", env.version);
                    let _ = client.disconnect();
                    return Ok(());
                }
                Ok(Ok(_)) => {}
                Ok(Err(e)) => {
                    anyhow::bail!("cannot reach the control broker {}:{}: {e}", b.host, b.port)
                }
                Err(_) => anyhow::bail!(
                    "the control broker {}:{} did not confirm the publish within {PUSH_LIMIT:?}",
                    b.host,
                    b.port
                ),
            }
        }
    }

    /// The first retained message on `topic`, waiting at most `wait`.
    fn retained(b: &Broker, topic: &str, wait: Duration) -> anyhow::Result<Option<Vec<u8>>> {
        let (client, mut conn) = client(b, "read");
        client.subscribe(topic, QoS::AtLeastOnce)?;
        let until = Instant::now() + wait;
        let mut answered = false;
        while Instant::now() < until {
            match conn.recv_timeout(until.saturating_duration_since(Instant::now())) {
                Ok(Ok(Event::Incoming(Packet::Publish(p)))) => return Ok(Some(p.payload.to_vec())),
                Ok(Ok(Event::Incoming(Packet::SubAck(_)))) => answered = true,
                Ok(Ok(_)) => {}
                Ok(Err(e)) => {
                    anyhow::bail!("cannot reach the control broker {}:{}: {e}", b.host, b.port)
                }
                Err(_) => break,
            }
        }
        silent_broker(answered, b, wait)?;
        Ok(None)
    }

    /// An error when the broker never confirmed the subscription: no answer is not
    /// "nothing published".
    fn silent_broker(answered: bool, b: &Broker, wait: Duration) -> anyhow::Result<()> {
        if answered {
            Ok(())
        } else {
            anyhow::bail!(
                "the control broker {}:{} did not answer within {wait:?}",
                b.host,
                b.port
            )
        }
    }

    pub fn diff(gateway: &str, candidate: &std::path::Path, b: &Broker) -> anyhow::Result<()> {
        let new = std::fs::read_to_string(candidate)
            .with_context(|| format!("cannot read {}", candidate.display()))?;
        let topic = format!("{}/{gateway}/config/applied", b.prefix);
        let body = retained(b, &topic, Duration::from_secs(3))?
            .with_context(|| format!("{gateway} has published no applied config on {topic}"))?;
        let applied: serde_json::Value = serde_json::from_slice(&body).context("not JSON")?;
        let version = applied["version"].as_u64().unwrap_or(0);
        let Some(old) = applied["config"].as_str() else {
            anyhow::bail!("{gateway} published only the version ({version}) and hash of its config, not the text (too large to publish): nothing to compare with")
        };
        let diff = similar::TextDiff::from_lines(old, new.as_str());
        if diff.ratio() == 1.0 {
            println!("{gateway} runs this config (version {version})");
            return Ok(());
        }
        print!(
            "{}",
            diff.unified_diff().context_radius(3).header(
                &format!("{gateway} (version {version})"),
                &candidate.display().to_string()
            )
        );
        Ok(())
    }

    pub fn status(b: &Broker, wait: Duration) -> anyhow::Result<()> {
        let (client, mut conn) = client(b, "status");
        client.subscribe(format!("{}/+/config/status", b.prefix), QoS::AtLeastOnce)?;
        client.subscribe(format!("{}/+/status", b.prefix), QoS::AtLeastOnce)?;
        let mut reports: BTreeMap<String, Report> = BTreeMap::new();
        let mut seen: BTreeMap<String, String> = BTreeMap::new();
        let until = Instant::now() + wait;
        let mut answered = false;
        while Instant::now() < until {
            match conn.recv_timeout(until.saturating_duration_since(Instant::now())) {
                Ok(Ok(Event::Incoming(Packet::SubAck(_)))) => answered = true,
                Ok(Ok(Event::Incoming(Packet::Publish(p)))) => {
                    if p.topic.ends_with("/config/status") {
                        if let Ok(r) = serde_json::from_slice::<Report>(&p.payload) {
                            reports.insert(r.gateway.clone(), r);
                        }
                    } else if let Ok(v) = serde_json::from_slice::<serde_json::Value>(&p.payload) {
                        if let (Some(g), Some(at)) = (v["gateway"].as_str(), v["at"].as_str()) {
                            seen.insert(g.to_string(), at.to_string());
                        }
                    }
                }
                Ok(Ok(_)) => {}
                Ok(Err(e)) => {
                    anyhow::bail!("cannot reach the control broker {}:{}: {e}", b.host, b.port)
                }
                Err(_) => break,
            }
        }
        silent_broker(answered, b, wait)?;
        println!(
            "{:<24} {:>8} {:>8} {:<12} {:<21} reason",
            "gateway", "running", "version", "state", "last seen"
        );
        let gateways: std::collections::BTreeSet<&String> =
            reports.keys().chain(seen.keys()).collect();
        for g in gateways {
            let r = reports.get(g);
            println!(
                "{:<24} {:>8} {:>8} {:<12} {:<21} {}",
                g,
                r.map_or("-".into(), |r| r.running.to_string()),
                r.map_or("-".into(), |r| r.version.to_string()),
                r.map_or("-", |r| r.state.as_str()),
                seen.get(g)
                    .map_or_else(|| r.map_or("-", |r| r.at.as_str()), String::as_str),
                r.and_then(|r| r.reason.as_deref()).unwrap_or(""),
            );
        }
        Ok(())
    }
}
