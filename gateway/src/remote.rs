//! Remote configuration: signed pipelines from the control broker, applied live, kept once
//! healthy, rolled back when not, reported back.
//!
//! State, in `<state_dir>/remote/` (every file replaced atomically: temp file, fsync,
//! rename, fsync of the directory):
//! - `version`: the highest version accepted, written before anything else of an apply
//!   (anti-rollback);
//! - `keys.json`: the trusted keys once a signed `keys` envelope changed them;
//! - `applied.json`: the pipeline running now (version, source, hash, text, and whether
//!   it passed its health window);
//! - `last-good.json`: the last pipeline that passed its health window.
//!
//! At start ([`effective`]) the gateway runs `applied.json` if it passed its health window,
//! else `last-good.json` (a restart during a health window rolls back), else the local
//! file's pipeline: after a `kill -9` at any moment it runs an old or a new pipeline,
//! never a mix.

use std::path::{Path, PathBuf};

use gateway_config::remote::{Envelope, Kind, Rejection, TrustedKey};
use gateway_config::Config;
use serde::{Deserialize, Serialize};

/// A pipeline as this gateway keeps it.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
pub struct Applied {
    /// The envelope's version.
    pub version: u64,
    /// `own` or `group:<name>`.
    pub source: String,
    /// SHA-256 of the config text, hex.
    pub hash: String,
    /// The pipeline's TOML.
    pub config: String,
    /// It passed its health window.
    pub kept: bool,
}

/// The highest version accepted.
#[derive(Debug, Clone, Copy, Default, Serialize, Deserialize, PartialEq, Eq)]
pub struct Version {
    /// The version.
    pub version: u64,
    /// What it asked for was carried out (applied, rejected after acceptance, rotated).
    pub done: bool,
}

/// The remote-configuration files of a gateway.
pub struct Store {
    dir: PathBuf,
}

/// Writes `bytes` to `path` so that a crash leaves the old or the new file, never a mix.
pub fn write_atomic(path: &Path, bytes: &[u8]) -> std::io::Result<()> {
    use std::io::Write;
    let dir = path.parent().unwrap_or(Path::new("."));
    std::fs::create_dir_all(dir)?;
    let tmp = path.with_extension("tmp");
    {
        let mut f = std::fs::File::create(&tmp)?;
        f.write_all(bytes)?;
        f.sync_all()?;
    }
    std::fs::rename(&tmp, path)?;
    std::fs::File::open(dir)?.sync_all()
}

impl Store {
    /// The store of the gateway whose state directory `config` names.
    pub fn of(config: &Config) -> Store {
        Store {
            dir: config.gateway.state_dir.join("remote"),
        }
    }

    /// A state file: `None` when it does not exist; an error when it exists and cannot be
    /// read (the caller refuses to go on: a lost version or key file must not reopen the
    /// door to an old envelope or a removed key).
    fn read<T: for<'de> Deserialize<'de>>(&self, name: &str) -> Result<Option<T>, String> {
        let path = self.dir.join(name);
        match std::fs::read_to_string(&path) {
            Ok(text) => serde_json::from_str(&text)
                .map(Some)
                .map_err(|e| format!("{}: {e}", path.display())),
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(None),
            Err(e) => Err(format!("{}: {e}", path.display())),
        }
    }

    fn write<T: Serialize>(&self, name: &str, v: &T) -> std::io::Result<()> {
        let bytes = serde_json::to_vec_pretty(v).unwrap_or_default();
        write_atomic(&self.dir.join(name), &bytes)
    }

    /// The highest version accepted, and whether what it asked for was carried out (a
    /// crash in between leaves `done` false, and the same envelope is taken again).
    pub fn version(&self) -> Result<Version, String> {
        Ok(self.read("version")?.unwrap_or_default())
    }

    /// Records the highest version accepted.
    pub fn set_version(&self, v: Version) -> std::io::Result<()> {
        self.write("version", &v)
    }

    /// The trusted keys: as rotated, else the bootstrap's.
    pub fn keys(&self, bootstrap: &[TrustedKey]) -> Result<Vec<TrustedKey>, String> {
        Ok(self
            .read("keys.json")?
            .unwrap_or_else(|| bootstrap.to_vec()))
    }

    /// The trusted keys a rotation recorded, if one did.
    pub fn rotated_keys(&self) -> Result<Option<Vec<TrustedKey>>, String> {
        self.read("keys.json")
    }

    /// Records the trusted keys after a rotation.
    pub fn set_keys(&self, keys: &[TrustedKey]) -> std::io::Result<()> {
        self.write("keys.json", &keys)
    }

    /// The pipeline running now, if one came remotely.
    pub fn applied(&self) -> Result<Option<Applied>, String> {
        self.read("applied.json")
    }

    /// Records the pipeline running now.
    pub fn set_applied(&self, a: &Applied) -> std::io::Result<()> {
        self.write("applied.json", a)
    }

    /// Forgets the remote pipeline (back to the local file's).
    pub fn clear_applied(&self) -> std::io::Result<()> {
        match std::fs::remove_file(self.dir.join("applied.json")) {
            Err(e) if e.kind() != std::io::ErrorKind::NotFound => Err(e),
            _ => Ok(()),
        }
    }

    /// The last pipeline that passed its health window.
    pub fn last_good(&self) -> Result<Option<Applied>, String> {
        self.read("last-good.json")
    }

    /// Records the last pipeline that passed its health window.
    pub fn set_last_good(&self, a: &Applied) -> std::io::Result<()> {
        self.write("last-good.json", a)
    }

    /// Makes the last good pipeline the applied one if that one was kept; true if it
    /// was not already. A kept config is recorded as applied first, then as last good: a
    /// crash in between (or a failed write) left the one before as last good, and a
    /// later rollback would have gone back to it instead of to the one kept.
    pub fn settle_last_good(&self) -> Result<bool, String> {
        let Some(applied) = self.applied()?.filter(|a| a.kept) else {
            return Ok(false);
        };
        if self.last_good()?.as_ref() == Some(&applied) {
            return Ok(false);
        }
        self.set_last_good(&applied)
            .map_err(|e| format!("{}: {e}", self.dir.join("last-good.json").display()))?;
        Ok(true)
    }
}

/// A stored pipeline that could not run at the start, and what runs instead: the
/// control plane records and reports it ([`start`]).
#[derive(Debug, Clone, PartialEq)]
pub struct Fallback {
    /// The version the status reports on (the one applied before the restart).
    pub version: u64,
    /// Why, for the report.
    pub reason: String,
    /// The stored pipeline that runs instead; `None`: the local file's.
    pub running: Option<Applied>,
}

/// The configuration to run: `local`'s bootstrap with the remotely applied pipeline.
/// At start (`at_start`) that is the applied one if it passed its health window, else the
/// last good one (a restart during a health window rolls back), else `local` as it is; on
/// a SIGHUP, the applied one whatever its window (the one running).
///
/// At start a stored pipeline whose stages or inputs can no longer be built (a zones file
/// or certificate it names is gone) is passed over for the next one (applied, last good,
/// then `local`), and the [`Fallback`] says so: the start would otherwise fail, and under
/// systemd fail again at every restart. On a SIGHUP nothing is passed over: a pipeline
/// that cannot be built fails the reload and the running one stays.
pub fn effective(local: Config, at_start: bool) -> (Config, Option<Fallback>) {
    if local.control.is_none() {
        return (local, None);
    }
    let store = Store::of(&local);
    let applied = match store.applied() {
        Ok(Some(a)) => a,
        Ok(None) => return (local, None),
        Err(e) => {
            tracing::error!(error = %e, "unreadable remote-config state; running the local config");
            return (local, None);
        }
    };
    let mut candidates: Vec<Applied> = Vec::new();
    if applied.kept || !at_start {
        candidates.push(applied.clone());
    } else {
        tracing::warn!(
            version = applied.version,
            "restarted during the health window of a remote config; running the last good one"
        );
    }
    if at_start {
        match store.last_good() {
            Ok(Some(g)) if candidates.first() != Some(&g) => candidates.push(g),
            Ok(_) => {}
            Err(e) => tracing::error!(error = %e, "unreadable last good remote config"),
        }
    }
    let mut failed: Vec<String> = Vec::new();
    for a in candidates {
        let built = gateway_config::remote::pipeline_config(&local, &a.config)
            .map_err(|e| e.to_string())
            .and_then(|c| {
                if at_start {
                    crate::app::check_pipeline(&c.pipeline(), &c.gateway.id, true)?;
                }
                Ok(c)
            });
        match built {
            Ok(c) => {
                let fallback = (!failed.is_empty()).then(|| Fallback {
                    version: applied.version,
                    reason: failed.join("; "),
                    running: Some(a),
                });
                return (c, fallback);
            }
            Err(e) => {
                tracing::error!(
                    version = a.version,
                    "the stored remote config cannot run any more; trying the next one (last good, then the local file):\n{e}"
                );
                failed.push(format!("version {} cannot run: {e}", a.version));
            }
        }
    }
    let fallback = (!failed.is_empty()).then(|| Fallback {
        version: applied.version,
        reason: failed.join("; ") + "; running the local file's pipeline",
        running: None,
    });
    (local, fallback)
}

/// SHA-256 of `text`, hex.
pub fn hash(text: &str) -> String {
    use sha2::Digest;
    sha2::Sha256::digest(text.as_bytes())
        .iter()
        .map(|b| format!("{b:02x}"))
        .collect()
}

/// A `config/status` report.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
pub struct Report {
    /// The gateway.
    pub gateway: String,
    /// The version this report is about.
    pub version: u64,
    /// `applying`, `applied`, `rejected` or `rolled_back`.
    pub state: String,
    /// Why (rejections, rollbacks).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub reason: Option<String>,
    /// The version running now.
    pub running: u64,
    /// SHA-256 of the running pipeline's text (empty: the local file's).
    pub hash: String,
    /// When (RFC 3339).
    pub at: String,
}

/// Why `envelope` cannot be taken by the gateway running `local`, before anything is
/// written: the signature and the rest ([`Envelope::check`]), then, for a config, the
/// config itself, validated and its stages built.
pub fn vet(
    local: &Config,
    store: &Store,
    envelope: &Envelope,
    applied: u64,
) -> Result<Option<Config>, Rejection> {
    let control = local
        .control
        .as_ref()
        .ok_or_else(|| Rejection::Malformed("no [control] in the local config".into()))?;
    let keys = store
        .keys(&control.trusted_keys)
        .map_err(|e| Rejection::Malformed(format!("the trusted keys: {e}")))?;
    // A key that cannot verify (a weak one a rotation recorded before weak keys were
    // refused) is left out, not made a reason to refuse everything: a key change signed
    // by a good key can still remove it.
    let keys = keys
        .iter()
        .filter_map(
            |k| match gateway_config::remote::verifying_keys(std::slice::from_ref(k)) {
                Ok(one) => Some(one),
                Err(e) => {
                    tracing::warn!("control plane: a trusted key is left out: {e}");
                    None
                }
            },
        )
        .flatten()
        .collect();
    envelope.check(
        &keys,
        &local.gateway.id,
        &local.gateway.groups,
        applied,
        std::time::SystemTime::now(),
    )?;
    match envelope.kind {
        Kind::Keys => {
            let keys = store
                .keys(&control.trusted_keys)
                .map_err(|e| Rejection::Malformed(format!("the trusted keys: {e}")))?;
            envelope
                .keys
                .clone()
                .unwrap_or_default()
                .apply_to(&keys)
                .map_err(Rejection::Invalid)?;
            Ok(None)
        }
        Kind::Config => {
            let text = envelope.config.as_deref().unwrap_or_default();
            let c = gateway_config::remote::pipeline_config(local, text)
                .map_err(|e| Rejection::Invalid(e.to_string().replace('\n', "; ")))?;
            crate::app::check_stages(&c.pipeline()).map_err(Rejection::Invalid)?;
            Ok(Some(c))
        }
    }
}

#[cfg(feature = "mqtt")]
pub use control::start;

#[cfg(not(feature = "mqtt"))]
/// Without the MQTT client there is no control plane: a `[control]` table is an error.
pub fn start(
    _control: gateway_config::Control,
    _config: Config,
    _file: std::path::PathBuf,
    _fallback: Option<Fallback>,
    _metrics: crate::metrics::Metrics,
    _reloads: tokio::sync::mpsc::Sender<crate::app::Reload>,
) {
    tracing::error!("[control] needs the mqtt feature, which this build leaves out; remote configuration is off");
}

#[cfg(feature = "mqtt")]
mod control {
    use std::time::Duration;

    use gateway_config::remote::{rfc3339, Envelope, Kind, Rejection, TrustedKey};
    use gateway_config::{Config, Control};
    use rumqttc::{AsyncClient, Event, MqttOptions, Packet, QoS};
    use tokio::sync::{mpsc, oneshot};
    use tokio::time::Instant;

    use super::{effective_with, hash, vet, Applied, Report, Store, Version};
    use crate::app::Reload;
    use crate::metrics::Metrics;

    /// A pipeline in its health window.
    struct Trial {
        applied: Applied,
        until: Instant,
        kafka_was_up: bool,
        /// It changed `[output.kafka]`: its brokers must answer before it is kept.
        output_changed: bool,
        /// Events received and dropped (all inputs) when it was applied.
        counts: (f64, f64),
    }

    /// Events received and dropped so far, all inputs.
    fn counts(m: &Metrics) -> (f64, f64) {
        (
            m.sum("gateway_events_received_total"),
            m.sum("gateway_events_dropped_total"),
        )
    }

    /// How much higher than the old config's a new one's drop rate may be (absolute).
    const DROP_RATE_TOLERANCE: f64 = 0.05;
    /// How long a new output's brokers have to answer at the end of its health window.
    const KAFKA_PROBE_TIMEOUT: Duration = Duration::from_secs(10);
    /// Largest message taken from the control broker (an envelope).
    const MAX_IN: usize = 4 * 1024 * 1024;
    /// Largest message sent: `config/applied` carries the running pipeline's text,
    /// which a remote config of up to [`MAX_IN`] makes longer once escaped in JSON.
    /// rumqttc drops the connection on a larger one, and on every reconnect after it.
    const MAX_OUT: usize = 2 * MAX_IN;
    /// Longest `reason` in a status report (a list of config problems can be long).
    const MAX_REASON: usize = 4096;
    /// Events a health window must see before its drop rate counts.
    const DROP_RATE_MIN_EVENTS: f64 = 20.0;

    struct Plane {
        local: Config,
        /// The local config file: what a rollback with no last good pipeline runs, read
        /// again then (a SIGHUP may have changed it since the start).
        file: std::path::PathBuf,
        control: Control,
        store: Store,
        metrics: Metrics,
        reloads: mpsc::Sender<Reload>,
        client: AsyncClient,
        trial: Option<Trial>,
        started: std::time::Instant,
        last_error: Option<String>,
        /// The last `config/status` report, published again after a reconnect.
        last_report: Option<Vec<u8>>,
        connected: bool,
    }

    /// The control plane's MQTT client id (input client ids may not take it: config
    /// validation refuses `<gateway id>-control` for an input).
    pub fn client_id(gateway_id: &str) -> String {
        format!("{gateway_id}-control")
    }

    /// Starts the control plane: subscribes to this gateway's and its groups' config
    /// topics and applies what is valid.
    pub fn start(
        control: Control,
        local: Config,
        file: std::path::PathBuf,
        fallback: Option<super::Fallback>,
        metrics: Metrics,
        reloads: mpsc::Sender<Reload>,
    ) {
        tokio::spawn(async move {
            if let Err(e) = run(control, local, file, fallback, metrics, reloads).await {
                tracing::error!(error = %e, "remote configuration stopped");
            }
        });
    }

    async fn run(
        control: Control,
        local: Config,
        file: std::path::PathBuf,
        fallback: Option<super::Fallback>,
        metrics: Metrics,
        reloads: mpsc::Sender<Reload>,
    ) -> Result<(), String> {
        let id = local.gateway.id.clone();
        let port = control
            .port
            .unwrap_or(if control.tls.is_some() { 8883 } else { 1883 });
        let mut o = MqttOptions::new(client_id(&id), &control.host, port);
        o.set_keep_alive(Duration::from_secs(30))
            .set_clean_session(true)
            .set_max_packet_size(MAX_IN, MAX_OUT);
        if let Some(user) = &control.username {
            let pass = match &control.password {
                Some(s) => s.read().map_err(|e| format!("control password: {e}"))?,
                None => String::new(),
            };
            o.set_credentials(user.clone(), pass);
        }
        if let Some(tls) = &control.tls {
            o.set_transport(crate::sources::mqtt::tls_transport(tls, "control")?);
        }
        let (client, mut events) = AsyncClient::new(o, 256);
        let mut plane = Plane {
            store: Store::of(&local),
            local,
            file,
            control: control.clone(),
            metrics,
            reloads,
            client,
            trial: None,
            started: std::time::Instant::now(),
            last_error: None,
            last_report: None,
            connected: false,
        };
        plane.after_restart(fallback);
        // After a rotation the recorded keys rule: a key taken out of the local file only
        // (revoked by hand) is still trusted, which must not pass unseen.
        if let Ok(Some(rotated)) = plane.store.rotated_keys() {
            let ids = |keys: &[TrustedKey]| {
                keys.iter()
                    .map(|k| format!("{}={}", k.id, k.public_key))
                    .collect::<std::collections::BTreeSet<_>>()
            };
            if ids(&rotated) != ids(&control.trusted_keys) {
                let names: Vec<&str> = rotated.iter().map(|k| k.id.as_str()).collect();
                tracing::warn!(trusted = ?names, file = %plane.store.dir.join("keys.json").display(),
                    "the trusted keys were rotated remotely and differ from [control] trusted_keys, which is ignored now; to revoke a key on this device, sign a key change or edit that file");
            }
        }
        let mut status = tokio::time::interval(control.status_interval.max(Duration::from_secs(1)));
        let mut backoff = Duration::from_millis(200);
        // A control plane that never connects (wrong host, bad TLS) says so: at the first
        // failure, then once a minute.
        let mut failing_logged: Option<Instant> = None;
        // The backoff starts again only after a connection that lasted: one dropped
        // right after its ConnAck (a retained message over `MAX_IN`) keeps backing off.
        let mut connected_at = Instant::now();
        loop {
            let trial_end = plane.trial.as_ref().map(|t| t.until);
            tokio::select! {
                ev = events.poll() => match ev {
                    Ok(Event::Incoming(Packet::ConnAck(_))) => {
                        connected_at = Instant::now();
                        plane.connected = true;
                        plane.on_connect();
                        tracing::info!(broker = %control.host, "control plane connected");
                    }
                    Ok(Event::Incoming(Packet::Publish(p))) => {
                        if !p.payload.is_empty() {
                            plane.envelope(&p.payload, p.retain).await;
                        }
                    }
                    Ok(_) => {}
                    Err(e) => {
                        if plane.connected {
                            tracing::warn!(error = %e, "control plane: connection lost; retrying");
                            failing_logged = Some(Instant::now());
                        } else if failing_logged.is_none_or(|t| t.elapsed() >= Duration::from_secs(60)) {
                            tracing::warn!(broker = %control.host, error = %e, "control plane: cannot connect; retrying");
                            failing_logged = Some(Instant::now());
                        }
                        if plane.connected && connected_at.elapsed() >= Duration::from_secs(10) {
                            backoff = Duration::from_millis(200);
                        }
                        plane.connected = false;
                        tokio::time::sleep(crate::sources::jittered(backoff)).await;
                        backoff = (backoff * 2).min(Duration::from_secs(30));
                    }
                },
                _ = tokio::time::sleep_until(trial_end.unwrap_or_else(Instant::now)), if trial_end.is_some() => {
                    plane.judge().await;
                }
                _ = status.tick() => plane.status(),
            }
        }
    }

    impl Plane {
        fn topic(&self, leaf: &str) -> String {
            format!("{}/{}/{leaf}", self.control.prefix, self.local.gateway.id)
        }

        /// After every connect (clean session): subscribe, and say again what was said
        /// while away.
        fn on_connect(&mut self) {
            let mut topics = vec![self.topic("config")];
            topics.extend(
                self.local
                    .gateway
                    .groups
                    .iter()
                    .map(|g| format!("{}/groups/{g}/config", self.control.prefix)),
            );
            for t in topics {
                if self.client.try_subscribe(t, QoS::AtLeastOnce).is_err() {
                    tracing::error!("control plane: cannot queue a subscription");
                }
            }
            if let Some(body) = self.last_report.clone() {
                let _ = self.client.try_publish(
                    self.topic("config/status"),
                    QoS::AtLeastOnce,
                    true,
                    body,
                );
            }
            self.publish_applied();
        }

        /// What is running now: the applied remote pipeline's version and hash.
        fn running(&self) -> (u64, String) {
            match self.store.applied() {
                Ok(Some(a)) => (a.version, a.hash),
                _ => (0, String::new()),
            }
        }

        fn report(&mut self, version: u64, state: &str, mut reason: Option<String>) {
            if let Some(r) = reason.as_mut().filter(|r| r.len() > MAX_REASON) {
                let mut end = MAX_REASON;
                while !r.is_char_boundary(end) {
                    end -= 1;
                }
                r.truncate(end);
                r.push_str(" ...");
            }
            let (running, hash) = self.running();
            if matches!(state, "rejected" | "rolled_back" | "rollback_failed") {
                self.last_error = reason.clone();
            }
            let r = Report {
                gateway: self.local.gateway.id.clone(),
                version,
                state: state.into(),
                reason,
                running,
                hash,
                at: rfc3339(std::time::SystemTime::now()),
            };
            match state {
                "rejected" | "rolled_back" | "rollback_failed" => {
                    tracing::warn!(
                        version,
                        state,
                        reason = r.reason.as_deref().unwrap_or(""),
                        "remote config"
                    )
                }
                _ => tracing::info!(version, state, "remote config"),
            }
            let body = serde_json::to_vec(&r).unwrap_or_default();
            self.last_report = Some(body.clone());
            if self.connected
                && self
                    .client
                    .try_publish(self.topic("config/status"), QoS::AtLeastOnce, true, body)
                    .is_err()
            {
                tracing::warn!("control plane: cannot queue the status report");
            }
        }

        /// The local config file as it is now (a SIGHUP may have changed its pipeline
        /// since the start); the one read at the start if it no longer loads.
        fn local_now(&self) -> Config {
            match gateway_config::load(&self.file) {
                Ok(c) => c,
                Err(e) => {
                    tracing::warn!(config = %self.file.display(), "the local config file no longer loads; using it as it was at the start:\n{e}");
                    self.local.clone()
                }
            }
        }

        /// Publishes (retained) the pipeline running now, for `gateway remote diff`.
        fn publish_applied(&mut self) {
            let (version, hash, config) = match self.store.applied() {
                Ok(Some(a)) => (a.version, a.hash, a.config),
                _ => {
                    let local = self.local_now();
                    let mut output = local.output;
                    super::redact_options(&mut output.kafka.options);
                    let doc = gateway_config::remote::PipelineDoc {
                        inputs: local.inputs,
                        stages: local.stages,
                        output,
                    };
                    (0, String::new(), toml::to_string(&doc).unwrap_or_default())
                }
            };
            if !self.connected {
                return; // published on the next connect
            }
            let mut body =
                serde_json::json!({ "version": version, "hash": hash, "config": config })
                    .to_string();
            if body.len() > MAX_OUT - 1024 {
                tracing::warn!(bytes = body.len(), "control plane: the running pipeline is too large to publish in full; config/applied carries its version and hash only");
                body = serde_json::json!({ "version": version, "hash": hash, "config": null, "omitted": "too large" }).to_string();
            }
            let _ =
                self.client
                    .try_publish(self.topic("config/applied"), QoS::AtLeastOnce, true, body);
        }

        /// The periodic status message (skipped while disconnected: it would only fill
        /// the client's queue).
        fn status(&mut self) {
            if !self.connected {
                return;
            }
            let t = self.metrics.totals();
            let (running, hash) = self.running();
            let body = serde_json::json!({
                "gateway": self.local.gateway.id,
                "software": env!("CARGO_PKG_VERSION"),
                "uptime_s": self.started.elapsed().as_secs(),
                "config_version": running,
                "config_hash": hash,
                "spool_rows": t.spool_rows,
                "spool_bytes": t.spool_bytes,
                "kafka_up": t.kafka_up,
                "spooling": t.spooling,
                "last_error": self.last_error,
                "at": rfc3339(std::time::SystemTime::now()),
            });
            let _ = self.client.try_publish(
                self.topic("status"),
                QoS::AtLeastOnce,
                true,
                body.to_string(),
            );
        }

        /// After a restart: a pipeline that had not passed its health window was rolled
        /// back by [`super::effective`]; record and say so.
        /// Records `version`, accepted but left not done by the last run, as decided (a
        /// rollback at the start): its retained envelope is not taken again, since a config
        /// that brought the process down would do so at every start.
        fn decided(&self, version: u64) {
            if self
                .store
                .version()
                .is_ok_and(|v| v.version == version && !v.done)
            {
                let done = Version {
                    version,
                    done: true,
                };
                if let Err(e) = self.store.set_version(done) {
                    tracing::error!(error = %e, version, "cannot record the version as decided");
                }
            }
        }

        fn after_restart(&mut self, fallback: Option<super::Fallback>) {
            if let Some(f) = fallback {
                // What runs is recorded as applied, so reports name it; the version
                // passed over is decided.
                let saved = match &f.running {
                    Some(a) => self.store.set_applied(a),
                    None => self.store.clear_applied(),
                };
                if let Err(e) = saved {
                    tracing::error!(error = %e, "cannot record the pipeline running instead");
                }
                self.decided(f.version);
                self.report(f.version, "rolled_back", Some(f.reason));
                return;
            }
            let Ok(Some(a)) = self.store.applied() else {
                return;
            };
            if a.kept {
                match self.store.settle_last_good() {
                    Ok(true) => {
                        tracing::warn!(version = a.version, "the kept remote config was not recorded as the last good one; recorded it now");
                    }
                    Ok(false) => {}
                    Err(e) => tracing::error!(error = %e, "cannot record the last good config"),
                }
                return;
            }
            let result = match self.store.last_good() {
                Ok(Some(g)) => self.store.set_applied(&g).map_err(|e| e.to_string()),
                Ok(None) => self.store.clear_applied().map_err(|e| e.to_string()),
                Err(e) => Err(e),
            };
            if let Err(e) = result {
                tracing::error!(error = %e, "cannot record the rollback");
            }
            self.decided(a.version);
            self.report(
                a.version,
                "rolled_back",
                Some("the gateway restarted during the health window".into()),
            );
        }

        /// Takes one envelope; `retained`: the broker replays it at a (re)subscription
        /// rather than someone publishing it now.
        async fn envelope(&mut self, payload: &[u8], retained: bool) {
            let env: Envelope = match serde_json::from_slice(payload) {
                Ok(e) => e,
                Err(e) => {
                    let r = Rejection::Malformed(e.to_string());
                    self.report(0, "rejected", Some(format!("{}: {r}", r.label())));
                    return;
                }
            };
            let stored = match self.store.version() {
                Ok(v) => v,
                Err(e) => {
                    self.report(env.version, "rejected", Some(format!("state: {e}")));
                    return;
                }
            };
            // Retained messages come again on every reconnect: the version decided last
            // is not news. One accepted but cut short by a crash is taken again.
            if env.version == stored.version && stored.done {
                return;
            }
            // An older retained envelope (a group's, under a newer own one) was refused
            // when it was new; refusing it again at every reconnect would overwrite the
            // retained status report with a stale rejection.
            if retained && env.version < stored.version {
                tracing::debug!(
                    version = env.version,
                    "retained remote config older than the one decided last; ignored"
                );
                return;
            }
            let floor = if env.version == stored.version {
                stored.version.saturating_sub(1)
            } else {
                stored.version
            };
            let candidate = match vet(&self.local, &self.store, &env, floor) {
                Ok(c) => c,
                Err(r) => {
                    self.report(env.version, "rejected", Some(format!("{}: {r}", r.label())));
                    return;
                }
            };
            let accepted = Version {
                version: env.version,
                done: false,
            };
            if let Err(e) = self.store.set_version(accepted) {
                self.report(
                    env.version,
                    "rejected",
                    Some(format!("cannot record the version: {e}")),
                );
                return;
            }
            // Whose it is comes from the signed target, not from the topic.
            let own = env.target == self.local.gateway.id;
            let source = if own {
                "own".to_string()
            } else {
                env.target.clone()
            };
            match (env.kind, candidate) {
                (Kind::Keys, _) => self.rotate(&env),
                (Kind::Config, Some(config)) => {
                    let applied_own = self
                        .store
                        .applied()
                        .ok()
                        .flatten()
                        .filter(|a| a.source == "own");
                    if let (false, Some(a)) = (own, applied_own) {
                        self.report(
                            env.version,
                            "rejected",
                            Some(format!(
                                "overridden: this gateway runs its own config (version {})",
                                a.version
                            )),
                        );
                    } else {
                        let text = env.config.clone().unwrap_or_default();
                        let applied = Applied {
                            version: env.version,
                            source,
                            hash: hash(&text),
                            config: text,
                            kept: false,
                        };
                        self.apply(applied, config).await;
                    }
                }
                (Kind::Config, None) => {}
            }
            let done = Version {
                version: env.version,
                done: true,
            };
            if let Err(e) = self.store.set_version(done) {
                tracing::error!(error = %e, "cannot record the version as carried out");
            }
        }

        fn rotate(&mut self, env: &Envelope) {
            let change = env.keys.clone().unwrap_or_default();
            let result = self
                .store
                .keys(&self.control.trusted_keys)
                .and_then(|keys| change.apply_to(&keys))
                .and_then(|keys| self.store.set_keys(&keys).map_err(|e| e.to_string()));
            match result {
                Ok(()) => self.report(env.version, "applied", None),
                Err(e) => self.report(
                    env.version,
                    "rejected",
                    Some(format!("invalid_config: {e}")),
                ),
            }
        }

        async fn reload(&self, config: Config) -> Result<(), String> {
            let (done, result) = oneshot::channel();
            self.reloads
                .send(Reload {
                    config,
                    local_file: false,
                    done: Some(done),
                })
                .await
                .map_err(|_| "the gateway is stopping".to_string())?;
            result
                .await
                .map_err(|_| "the gateway is stopping".to_string())?
        }

        async fn apply(&mut self, applied: Applied, config: Config) {
            let kafka_was_up = self.metrics.totals().kafka_up;
            let previous = self.store.applied().ok().flatten();
            let running_output = match &previous {
                Some(p) => effective_with(&self.local, p).output,
                None => self.local_now().output,
            };
            let output_changed = running_output != config.output;
            if let Err(e) = self.store.set_applied(&applied) {
                self.report(
                    applied.version,
                    "rejected",
                    Some(format!("cannot write the config: {e}")),
                );
                return;
            }
            self.report(applied.version, "applying", None);
            if let Err(e) = self.reload(config).await {
                // The running pipeline was left as it was: back to what the store said.
                let _ = match &previous {
                    Some(p) => self.store.set_applied(p),
                    None => self.store.clear_applied(),
                };
                self.report(
                    applied.version,
                    "rejected",
                    Some(format!("invalid_config: {e}")),
                );
                return;
            }
            self.trial = Some(Trial {
                until: Instant::now() + self.control.health_window,
                kafka_was_up,
                output_changed,
                counts: counts(&self.metrics),
                applied,
            });
        }

        /// The end of a health window: keep the pipeline, or roll back.
        async fn judge(&mut self) {
            let Some(trial) = self.trial.take() else {
                return;
            };
            let t = self.metrics.totals();
            let config = effective_with(&self.local, &trial.applied);
            let mut problems = Vec::new();
            for input in &config.inputs {
                if self.metrics.input(input.name()).connected.get() != 1 {
                    problems.push(format!("input {} is not connected", input.name()));
                }
            }
            if trial.kafka_was_up && !t.kafka_up {
                problems.push("Kafka is not reachable (it was with the previous config)".into());
            } else if trial.kafka_was_up && trial.output_changed {
                // Up may only mean nothing was sent yet (a quiet site): ask the brokers.
                let kafka = config.output.kafka.clone();
                let id = config.gateway.id.clone();
                let answered = tokio::task::spawn_blocking(move || {
                    crate::sinks::kafka::answers(&kafka, &id, KAFKA_PROBE_TIMEOUT)
                })
                .await
                .unwrap_or_else(|e| Err(e.to_string()));
                if let Err(e) = answered {
                    problems.push(format!(
                        "Kafka at {} did not answer a metadata request within {}s (it was reachable with the previous config): {e}",
                        config.output.kafka.brokers,
                        KAFKA_PROBE_TIMEOUT.as_secs()
                    ));
                }
            }
            // Drops (malformed, filtered, ...) per event received: not above the old
            // config's, within a tolerance, once the window saw enough events.
            let (r0, d0) = trial.counts;
            let (r1, d1) = counts(&self.metrics);
            let old_rate = if r0 > 0.0 { d0 / r0 } else { 0.0 };
            if r1 - r0 >= DROP_RATE_MIN_EVENTS {
                let rate = (d1 - d0) / (r1 - r0);
                if rate > old_rate + DROP_RATE_TOLERANCE {
                    problems.push(format!(
                        "{:.0}% of events dropped, against {:.0}% with the previous config",
                        rate * 100.0,
                        old_rate * 100.0
                    ));
                }
            }
            if problems.is_empty() {
                let mut kept = trial.applied.clone();
                kept.kept = true;
                // Applied first: a crash between the two runs the kept pipeline.
                let saved = self
                    .store
                    .set_applied(&kept)
                    .and_then(|()| self.store.set_last_good(&kept));
                match saved {
                    Ok(()) => self.report(kept.version, "applied", None),
                    // It runs and is healthy, but a restart may not know it was kept:
                    // reported, not left at "applying".
                    Err(e) => {
                        tracing::error!(error = %e, "cannot record the kept config");
                        self.report(
                            kept.version,
                            "applied",
                            Some(format!("kept, but it could not be recorded ({e}): a restart may run the last good config instead")),
                        );
                    }
                }
                self.publish_applied();
                return;
            }
            let reason = problems.join("; ");
            let back = self.store.last_good().ok().flatten();
            let config = match &back {
                Some(g) => effective_with(&self.local, g),
                None => self.local_now(),
            };
            let recorded = match &back {
                Some(g) => self.store.set_applied(g),
                None => self.store.clear_applied(),
            };
            let reason = match recorded {
                Ok(()) => reason,
                Err(e) => {
                    tracing::error!(error = %e, "cannot record the rollback");
                    format!("{reason}; the rollback could not be recorded ({e}), so the status may still name the version rolled back from")
                }
            };
            match self.reload(config).await {
                Ok(()) => self.report(trial.applied.version, "rolled_back", Some(reason)),
                Err(e) => {
                    // The unhealthy pipeline still runs: say so, and name it as running.
                    // Not kept, so a restart runs the last good one.
                    tracing::error!(error = %e, "rollback failed");
                    if let Err(e) = self.store.set_applied(&trial.applied) {
                        tracing::error!(error = %e, "cannot record the running config");
                    }
                    let reason = format!("{reason}; the rollback failed too: {e}");
                    self.report(trial.applied.version, "rollback_failed", Some(reason));
                }
            }
            self.publish_applied();
        }
    }
}

/// `local`'s bootstrap with `a`'s pipeline (`local` itself if that no longer validates).
pub fn effective_with(local: &Config, a: &Applied) -> Config {
    gateway_config::remote::pipeline_config(local, &a.config).unwrap_or_else(|_| local.clone())
}

/// Replaces the values of librdkafka options that hold secrets (`ssl.key.password`,
/// `sasl.oauthbearer.client.secret`, a PEM key, ...) before a local config is published
/// to the control plane, whose topics other clients may read.
#[cfg(feature = "mqtt")]
fn redact_options(options: &mut std::collections::BTreeMap<String, String>) {
    for (k, v) in options.iter_mut() {
        let k = k.to_ascii_lowercase();
        if [
            "password",
            "secret",
            "ssl.key.pem",
            "oauthbearer.config",
            "sasl.jaas",
        ]
        .iter()
        .any(|s| k.contains(s))
        {
            *v = "(redacted)".into();
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[cfg(feature = "mqtt")]
    #[test]
    fn secrets_in_kafka_options_are_not_published() {
        let mut o: std::collections::BTreeMap<String, String> = [
            ("ssl.key.password", "hunter2"),
            ("sasl.oauthbearer.client.secret", "s3"),
            ("linger.ms", "50"),
        ]
        .into_iter()
        .map(|(k, v)| (k.to_string(), v.to_string()))
        .collect();
        redact_options(&mut o);
        assert_eq!(o["ssl.key.password"], "(redacted)");
        assert_eq!(o["sasl.oauthbearer.client.secret"], "(redacted)");
        assert_eq!(o["linger.ms"], "50");
    }

    fn applied(version: u64, kept: bool) -> Applied {
        Applied {
            version,
            source: "own".into(),
            hash: format!("h{version}"),
            config: format!("# v{version}"),
            kept,
        }
    }

    #[test]
    fn a_kept_config_missing_as_last_good_is_recorded_at_start() {
        let dir = tempfile::tempdir().expect("tempdir");
        let store = Store {
            dir: dir.path().to_path_buf(),
        };
        std::fs::create_dir_all(&store.dir).expect("dir");
        assert_eq!(store.settle_last_good(), Ok(false), "nothing applied");
        // v2 kept, the crash before last-good was written: last-good is still v1.
        store.set_last_good(&applied(1, true)).expect("write");
        store.set_applied(&applied(2, true)).expect("write");
        assert_eq!(store.settle_last_good(), Ok(true));
        assert_eq!(store.last_good(), Ok(Some(applied(2, true))));
        assert_eq!(store.settle_last_good(), Ok(false), "settled");
        // A config still in its health window is not last good.
        store.set_applied(&applied(3, false)).expect("write");
        assert_eq!(store.settle_last_good(), Ok(false));
        assert_eq!(store.last_good(), Ok(Some(applied(2, true))));
    }
}
