//! The MQTT input (rumqttc): persistent session, manual in-order acks, topic templates,
//! reconnect with backoff and jitter.
//!
//! With QoS 1 and `ack_policy` `on_spool` or `on_delivery`, the gateway takes over
//! acknowledging (`set_manual_acks`): every publish goes into an [`AckQueue`] and its PUBACK
//! leaves only when the events decoded from it are safe, in receive order. The broker's
//! in-flight window (Mosquitto `max_inflight_messages`, default 20; MQTT 5 receive maximum)
//! bounds how many publishes wait for their acks, and so QoS 1 throughput: see README.

use std::sync::atomic::{AtomicI64, AtomicU8, Ordering};
use std::sync::Mutex;
use std::time::Duration;

use gateway_config::{AckPolicy, MqttInput, MqttVersion, TopicTemplate};
use rumqttc::{AsyncClient, MqttOptions, TlsConfiguration, Transport};
use tokio::sync::watch;

use super::payload::{Decoder, Origin};
use super::{jittered, sleep_unless_stopped, Closed, Emitter, SourceContext, SourceState};
use crate::ack::{Ack, AckQueue};
use crate::event::now_ns;
use link::{Client, Events, Msg, Net, PollOwned, Polled};

mod link;

/// Everything both protocol versions share: identity, credentials, TLS.
struct Common {
    client_id: String,
    port: u16,
    credentials: Option<(String, String)>,
    transport: Option<Transport>,
}

fn common(cfg: &MqttInput, gateway_id: &str) -> Result<Common, String> {
    let client_id = cfg
        .client_id
        .clone()
        .unwrap_or_else(|| format!("{gateway_id}-{}", cfg.name));
    let port = cfg
        .port
        .unwrap_or(if cfg.tls.is_some() { 8883 } else { 1883 });
    let credentials = match &cfg.username {
        Some(user) => {
            let pass = match &cfg.password {
                Some(s) => s
                    .read()
                    .map_err(|e| format!("input {} password: {e}", cfg.name))?,
                None => String::new(),
            };
            Some((user.clone(), pass))
        }
        None => None,
    };
    let transport = match &cfg.tls {
        Some(tls) => Some(tls_transport(tls, &format!("input {}", cfg.name))?),
        None => None,
    };
    Ok(Common {
        client_id,
        port,
        credentials,
        transport,
    })
}

/// A TLS transport from a `tls` table; errors start with `what` (`input site`).
pub(crate) fn tls_transport(
    tls: &gateway_config::TlsConfig,
    what: &str,
) -> Result<Transport, String> {
    let read = |p: &std::path::Path| {
        std::fs::read(p).map_err(|e| format!("{what}: cannot read {}: {e}", p.display()))
    };
    // rumqttc builds its rustls config with the process-wide provider: ring (see the
    // workspace Cargo.toml). An error only means one is installed.
    let _ = rustls::crypto::ring::default_provider().install_default();
    let ca = read(&tls.ca_file)?;
    let client_auth = match (&tls.client_cert_file, &tls.client_key_file) {
        (Some(c), Some(k)) => Some((read(c)?, read(k)?)),
        _ => None,
    };
    Ok(Transport::tls_with_config(TlsConfiguration::Simple {
        ca,
        alpn: None,
        client_auth,
    }))
}

fn manual_acks(cfg: &MqttInput) -> bool {
    cfg.qos == 1 && cfg.ack_policy != AckPolicy::OnReceive
}

/// Checks that an input's options can be built (reads secrets and certificates).
pub fn check(cfg: &MqttInput, gateway_id: &str) -> Result<(), String> {
    common(cfg, gateway_id).map(|_| ())
}

/// The largest packet an MQTT 3.1.1 input reads. MQTT 3.1.1 cannot tell the broker a
/// limit, and rumqttc drops the connection on a larger packet: with a persistent session
/// the broker sends that message again at every reconnect and the input never gets past
/// it. So the limit reads well past `max_payload` (at least 4 MiB; rumqttc parses up to
/// a few packets per read, so a burst of such messages holds tens of MiB for a moment),
/// and the gateway's own check counts the message as `too_large` and acks it.
/// MQTT 5 announces its limit in CONNECT, and the broker does not send larger packets.
fn v311_max_packet(max_payload: usize) -> usize {
    (max_payload + max_payload / 4 + 1024).max(4 << 20)
}

/// Opens the client for the configured protocol version.
fn connect(cfg: &MqttInput, gateway_id: &str) -> Result<(Client, Events), String> {
    let c = common(cfg, gateway_id)?;
    // The request channel carries acks and subscriptions; acks are bounded by the
    // broker's in-flight window.
    const REQUESTS: usize = 65_536;
    match cfg.protocol {
        MqttVersion::V311 => {
            let mut o = MqttOptions::new(c.client_id, &cfg.host, c.port);
            o.set_keep_alive(cfg.keep_alive)
                .set_clean_session(cfg.clean_session)
                .set_manual_acks(manual_acks(cfg))
                .set_max_packet_size(v311_max_packet(cfg.max_payload), 64 * 1024);
            if let Some((u, p)) = c.credentials {
                o.set_credentials(u, p);
            }
            if let Some(t) = c.transport {
                o.set_transport(t);
            }
            let (client, events) = AsyncClient::new(o, REQUESTS);
            Ok((Client::V4(client), Events::V4(Box::new(events))))
        }
        MqttVersion::V5 => {
            let mut o = rumqttc::v5::MqttOptions::new(c.client_id, &cfg.host, c.port);
            o.set_keep_alive(cfg.keep_alive)
                .set_clean_start(cfg.clean_session)
                .set_manual_acks(manual_acks(cfg))
                .set_receive_maximum(Some(cfg.receive_maximum))
                .set_max_packet_size(Some((cfg.max_payload + cfg.max_payload / 4 + 1024) as u32));
            if !cfg.clean_session {
                let secs = cfg.session_expiry.as_secs().min(u64::from(u32::MAX)) as u32;
                o.set_session_expiry_interval(Some(secs));
            }
            if let Some((u, p)) = c.credentials {
                o.set_credentials(u, p);
            }
            if let Some(t) = c.transport {
                o.set_transport(t);
            }
            let (client, events) = rumqttc::v5::AsyncClient::new(o, REQUESTS);
            Ok((Client::V5(client), Events::V5(Box::new(events))))
        }
    }
}

/// Runs one MQTT input until `state` turns [`SourceState::Stop`]. Returns an error only
/// for a config the input cannot start with; network errors are retried forever.
pub async fn run(
    cfg: MqttInput,
    ctx: SourceContext,
    mut state: watch::Receiver<SourceState>,
) -> Result<(), String> {
    let (client, events) = connect(&cfg, &ctx.gateway_id)?;
    let mut net = link::net(client, events);
    let templates: Vec<TopicTemplate> = cfg
        .topics
        .iter()
        .map(|t| {
            TopicTemplate::parse(t).map_err(|e| format!("input {} topic {t:?}: {e}", cfg.name))
        })
        .collect::<Result<_, _>>()?;
    let manual = manual_acks(&cfg);
    let until_delivered = cfg.ack_policy == AckPolicy::OnDelivery;
    let m = ctx.metrics.input(&cfg.name);
    // Released acks go through an unbounded queue to a task that hands them to the
    // client: an ack is never thrown away. The queue is bounded in practice by the
    // broker's in-flight window.
    // Each message carries the connection epoch it arrived on: an ack released after a
    // reconnect would name a packet id of the old connection, so it is not sent. The
    // acker compares epochs and hands the ack to the client under the epoch's lock, so
    // once the epoch is bumped no ack of the old connection can enter the client's
    // request queue; the bump then clears that queue of the ones already in it.
    let epoch = std::sync::Arc::new(Mutex::new(0u64));
    let (ack_tx, mut ack_rx) = tokio::sync::mpsc::unbounded_channel::<(u64, u16)>();
    let acks = AckQueue::new(move |p: (u64, u16)| {
        let _ = ack_tx.send(p);
    });
    let acker = {
        let client = net.client.clone();
        let m = m.clone();
        let epoch = epoch.clone();
        tokio::spawn(async move {
            while let Some((e, pkid)) = ack_rx.recv().await {
                loop {
                    let handed = {
                        let current = lock(&epoch);
                        if *current != e {
                            break;
                        }
                        client.try_ack(pkid)
                    };
                    if handed.is_ok() {
                        m.acks.inc();
                        break;
                    }
                    // The request queue is full (it holds 65,536 requests), or the
                    // event loop is gone and this task is about to be aborted.
                    tokio::time::sleep(Duration::from_millis(1)).await;
                }
            }
        })
    };
    let filters: Vec<String> = templates.iter().map(|t| t.filter().to_string()).collect();
    let mut delay = cfg.reconnect.min;
    // The backoff starts again only after a connection that lasted: a broker that
    // accepts and then drops the client at once (a message over the packet limit, a
    // second gateway with the same client id taking the session over) is not retried
    // every few hundred milliseconds for good.
    let mut connected_at: Option<tokio::time::Instant> = None;
    // This run's filters were subscribed (a SUBACK with none refused): a reconnect that
    // resumes the session needs no SUBSCRIBE.
    let mut subscribed = false;
    let input = Input {
        cfg: &cfg,
        templates: &templates,
        decoder: Decoder::new(cfg.format, &cfg.json),
        emit: Emitter::new(&ctx, &m, until_delivered).stopped_by(state.clone()),
        clock: BurstClock::new(),
    };
    tracing::info!(input = %cfg.name, host = %cfg.host, protocol = ?cfg.protocol, ?filters, "MQTT input starting");
    'input: loop {
        // What the event loop has at hand (parsed packets, bytes in the socket) is taken
        // without waiting. When it has nothing, the input has caught up with the broker:
        // it lets the socket fill for a moment before it waits for more. Reading every
        // few packets as they arrive cost more in system calls, wake-ups and TCP window
        // updates than decoding them (BENCHMARKS.md); the pause adds at most a
        // millisecond of latency, and only when there is no backlog. The poll is not
        // dropped for the pause but resumed after it: rumqttc's poll is not cancel-safe
        // once it writes (an ack, a ping). While the input waits for room in the router
        // (handing over, settling, a full batch), `Net::keep_up` polls meanwhile and
        // holds what arrives, which `next_ready` returns first.
        let polled = if let Some(ready) = net.next_ready() {
            ready
        } else {
            match net.try_next() {
                std::task::Poll::Ready(ev) => ev,
                std::task::Poll::Pending => {
                    input.clock.expire();
                    // Caught up: what this burst yielded goes to the router before any
                    // waiting.
                    if input.hand_over(&state, &mut net).await.is_err() {
                        break; // the router is gone
                    }
                    if net.holds() {
                        continue; // read while the router had no room
                    }
                    if *state.borrow() == SourceState::Run
                        && !pause_unless_stopped(&mut state).await
                    {
                        break;
                    }
                    // Told to quiesce during the pause: nothing is held (the batch went
                    // before it), which a shutdown waits to hear.
                    if *state.borrow() != SourceState::Run
                        && input.emit.settle_while(net.keep_up()).await.is_err()
                    {
                        break;
                    }
                    // A change to Quiesce or Run needs nothing from the event loop: the
                    // same poll is awaited again, not dropped half-way through a write.
                    loop {
                        if net.holds() {
                            continue 'input;
                        }
                        tokio::select! {
                            changed = state.changed() => {
                                if changed.is_err() || *state.borrow() == SourceState::Stop {
                                    break 'input;
                                }
                                if *state.borrow() != SourceState::Run
                                    && input.emit.settle_while(net.keep_up()).await.is_err()
                                {
                                    break 'input;
                                }
                            }
                            ev = net.next() => break ev,
                        }
                    }
                }
            }
        };
        match polled {
            Ok(Polled::Connected { session_present }) => {
                // `connected` goes to 1 with the SUBACK: until then the broker does not
                // route new messages to this client (a first session has no
                // subscriptions), and whoever waits for the input means "receiving".
                connected_at = Some(tokio::time::Instant::now());
                tracing::info!(input = %cfg.name, session_present, "MQTT connected");
                if session_present && subscribed && cfg.protocol == MqttVersion::V311 {
                    // The broker kept this run's subscriptions: subscribing again would
                    // only make it send every retained message once more. (MQTT 5 asks
                    // for retained messages of new subscriptions only, and subscribes
                    // again in case a broker lost them.)
                    m.connected.set(1);
                } else if let Err(e) = net.client.subscribe(&filters, cfg.qos == 1) {
                    tracing::error!(input = %cfg.name, error = %e, "cannot subscribe");
                }
            }
            Ok(Polled::SubAck { refused: true }) => {
                tracing::error!(input = %cfg.name, ?filters, "the broker refused a subscription; check the topic filters and ACLs");
            }
            Ok(Polled::SubAck { refused: false }) => {
                subscribed = true;
                m.connected.set(1);
                tracing::info!(input = %cfg.name, ?filters, "MQTT subscribed");
            }
            Ok(Polled::Publish(p)) => {
                let now = *state.borrow();
                let taken = match now {
                    SourceState::Run => input.take(&p, &acks, &epoch, manual, &mut net).await,
                    // A flood that never lets the poll wait must not keep a stop waiting.
                    // A message rumqttc acknowledged already is lost here: counted.
                    SourceState::Stop => {
                        if p.acked_by_client(manual) {
                            m.stopped_unseen(1);
                        }
                        break;
                    }
                    // Quiescing, a message the gateway acknowledges by hand is not taken
                    // and not acknowledged: the broker sends it again. One rumqttc
                    // acknowledged already (QoS 0, `on_receive`) is taken in and handed
                    // over at once, while the router still runs: skipping it would lose
                    // it unseen.
                    SourceState::Quiesce if !p.acked_by_client(manual) => {
                        input.emit.settle_while(net.keep_up()).await
                    }
                    SourceState::Quiesce => {
                        match input.take(&p, &acks, &epoch, manual, &mut net).await {
                            Ok(()) => input.emit.settle_while(net.keep_up()).await,
                            Err(closed) => Err(closed),
                        }
                    }
                };
                if taken.is_err() {
                    break; // the router is gone
                }
            }
            Ok(_) => {}
            Err(e) => {
                input.clock.expire();
                {
                    // Packet ids of the old connection mean nothing on the next one.
                    // rumqttc cleared its request queue of acks when the connection
                    // broke, but the acker may have handed it more since: they go too.
                    let mut current = lock(&epoch);
                    *current += 1;
                    acks.reset();
                    net.clean();
                }
                // Packets parsed before the connection broke are taken without acks:
                // the broker sends those again (a duplicate with the same event id).
                // Quiescing, only those rumqttc acknowledged already are taken.
                // (`keep_up` does not poll after the error, so nothing is held.)
                while let Some(parsed) = net.next_ready() {
                    if let Ok(Polled::Publish(p)) = parsed {
                        let take = *state.borrow() == SourceState::Run || p.acked_by_client(manual);
                        if take && input.handle(&p, Ack::none(), &mut net).await.is_err() {
                            break 'input;
                        }
                    }
                }
                m.connected.set(0);
                m.reconnects.inc();
                if input.hand_over(&state, &mut net).await.is_err() {
                    break;
                }
                if connected_at
                    .take()
                    .is_some_and(|t| t.elapsed() >= STABLE_CONNECTION)
                {
                    delay = cfg.reconnect.min;
                }
                let wait = jittered(delay);
                tracing::warn!(input = %cfg.name, error = %e, retry_in = ?wait, "MQTT connection lost");
                if e.contains("payload size limit exceeded") {
                    tracing::error!(input = %cfg.name, limit = v311_max_packet(cfg.max_payload),
                        "the broker sent a message larger than this input reads; with a persistent session it will send it again at every reconnect. Limit message sizes at the broker (Mosquitto: message_size_limit) or use protocol = \"v5\", which tells the broker the limit");
                }
                if !sleep_unless_stopped(wait, &mut state).await {
                    break;
                }
                delay = delay.saturating_mul(2).min(cfg.reconnect.max);
            }
        }
    }
    // Hand over what was taken in (if the router is gone, dropping the unsent `Batch`
    // keeps those messages unacknowledged). Then let queued acks go out before disconnecting: close
    // the ack queue, let the acker hand over what it holds, then disconnect behind those
    // acks.
    let _ = input.emit.flush().await;
    drop(input);
    // Read while the router had no room, and not taken: lost if rumqttc acknowledged it.
    for held in net.drain_held() {
        if matches!(held, Ok(Polled::Publish(ref p)) if p.acked_by_client(manual)) {
            m.stopped_unseen(1);
        }
    }
    drop(acks);
    // A connection that broke (an error the loop did not get to, held by `keep_up`, or
    // one it was waiting out): a poll would connect again, and acks of the old
    // connection mean nothing on a new one.
    let mut broken = net.broken();
    let _ = tokio::time::timeout(Duration::from_millis(500), async {
        while !broken && !acker.is_finished() {
            tokio::select! {
                polled = net.next() => match polled {
                    // A broken connection: the next poll would connect again, and the
                    // acks of this one mean nothing on another.
                    Err(_) => {
                        broken = true;
                        break;
                    }
                    // Acknowledged by rumqttc already, and too late to take in.
                    Ok(Polled::Publish(p)) if p.acked_by_client(manual) => m.stopped_unseen(1),
                    Ok(_) => {}
                },
                _ = tokio::time::sleep(Duration::from_millis(10)) => {}
            }
        }
    })
    .await;
    acker.abort();
    if broken {
        // Parsed before the connection broke, acknowledged by rumqttc already.
        while let Some(parsed) = net.next_ready() {
            if matches!(parsed, Ok(Polled::Publish(ref p)) if p.acked_by_client(manual)) {
                m.stopped_unseen(1);
            }
        }
    } else {
        net.client.try_disconnect();
        let _ = tokio::time::timeout(Duration::from_millis(500), async {
            while let Ok(ev) = net.next().await {
                match ev {
                    Polled::Disconnected => break,
                    Polled::Publish(p) if p.acked_by_client(manual) => m.stopped_unseen(1),
                    _ => {}
                }
            }
        })
        .await;
    }
    m.connected.set(0);
    tracing::info!(input = %cfg.name, "MQTT input stopped");
    Ok(())
}

/// The connection epoch, poisoned or not (nothing is left half-done under it).
fn lock(epoch: &Mutex<u64>) -> std::sync::MutexGuard<'_, u64> {
    epoch.lock().unwrap_or_else(|p| p.into_inner())
}

/// How long a connection must have lasted for the reconnect backoff to start again from
/// `reconnect.min`.
const STABLE_CONNECTION: Duration = Duration::from_secs(10);

/// How long the input lets the socket fill once it has caught up.
const COALESCE_PAUSE: Duration = Duration::from_millis(1);

/// Sleeps [`COALESCE_PAUSE`]; false when the input was told to stop meanwhile.
async fn pause_unless_stopped(state: &mut watch::Receiver<SourceState>) -> bool {
    tokio::select! {
        changed = state.changed() => changed.is_ok() && *state.borrow() != SourceState::Stop,
        _ = tokio::time::sleep(COALESCE_PAUSE) => true,
    }
}

struct Input<'a> {
    cfg: &'a MqttInput,
    templates: &'a [TopicTemplate],
    decoder: Decoder,
    emit: Emitter<'a>,
    clock: BurstClock,
}

/// The receipt time of messages taken in one burst (what the event loop had at hand
/// without waiting): the clock is read for every [`BurstClock::READS`]th message, and
/// again after every wait (for the broker, for room in the router's channel, for a
/// reconnect). Reading it per message was 4% of the input thread; a burst takes about a
/// microsecond per message, so a receipt time is at most some 16 us early. Every call
/// returns a later time than the one before (by a nanosecond within a burst): an event
/// without a time of its own has its receipt time in its id, and two messages of one
/// burst with the same payload must not share one.
struct BurstClock {
    // Atomics only to keep the input's future `Send`: one task uses them.
    now: AtomicI64,
    left: AtomicU8,
}

impl BurstClock {
    const READS: u8 = 16;

    fn new() -> Self {
        BurstClock {
            now: AtomicI64::new(0),
            left: AtomicU8::new(0),
        }
    }

    /// ns since the epoch, read afresh every [`BurstClock::READS`] calls; strictly
    /// increasing.
    fn now(&self) -> i64 {
        let last = self.now.load(Ordering::Relaxed);
        let next = match self.left.load(Ordering::Relaxed) {
            0 => {
                self.left.store(Self::READS - 1, Ordering::Relaxed);
                now_ns().max(last.saturating_add(1))
            }
            n => {
                self.left.store(n - 1, Ordering::Relaxed);
                last.saturating_add(1)
            }
        };
        self.now.store(next, Ordering::Relaxed);
        next
    }

    /// The burst ended (the input is about to wait): the next call reads the clock.
    fn expire(&self) {
        self.left.store(0, Ordering::Relaxed);
    }
}

impl Input<'_> {
    /// Sends what was gathered before the input waits; quiescing, also reports it
    /// settled (nothing of its own held).
    async fn hand_over<F: PollOwned>(
        &self,
        state: &watch::Receiver<SourceState>,
        net: &mut Net<F>,
    ) -> Result<(), Closed> {
        let running = *state.borrow() == SourceState::Run;
        if running {
            self.emit.flush_while(net.keep_up()).await
        } else {
            self.emit.settle_while(net.keep_up()).await
        }
    }

    /// Takes one publish: queues its ack when the gateway acknowledges by hand, then
    /// decodes it and hands its events on.
    async fn take<F: PollOwned>(
        &self,
        p: &Msg,
        acks: &std::sync::Arc<AckQueue<(u64, u16)>>,
        epoch: &Mutex<u64>,
        manual: bool,
        net: &mut Net<F>,
    ) -> Result<(), Closed> {
        let ack = if !p.acked_by_client(manual) {
            acks.push((*lock(epoch), p.pkid))
        } else {
            Ack::none()
        };
        self.handle(p, ack, net).await
    }

    async fn handle<F: PollOwned>(
        &self,
        p: &Msg,
        ack: Ack,
        net: &mut Net<F>,
    ) -> Result<(), Closed> {
        let received_ns = self.clock.now();
        let topic = p.topic();
        let payload = &p.payload[..];
        let Some(captures) = self.templates.iter().find_map(|t| t.matches(&topic)) else {
            // No template of this input matches: a subscription an earlier config made
            // that the broker keeps in the persistent session. Counted and dead-lettered
            // (its bytes kept), not decoded as if it were this input's.
            let bad = super::payload::Malformed {
                reason: "unsubscribed_topic",
                detail: "no topic template of this input matches it (a subscription of an earlier config, kept in the broker's session?)".into(),
            };
            let kept = &p.payload[..p.payload.len().min(self.cfg.max_payload)];
            let sent = self
                .emit
                .malformed_while(bad, &topic, received_ns, kept, ack, net.keep_up())
                .await;
            self.clock.expire();
            return sent;
        };
        let origin = Origin {
            source: &self.cfg.name,
            topic: &topic,
            captures: &captures,
            received_ns,
        };
        let decoded = if payload.len() > self.cfg.max_payload {
            Err(super::payload::Malformed {
                reason: "too_large",
                detail: format!(
                    "{} bytes, max_payload is {} (a dead letter keeps that many)",
                    payload.len(),
                    self.cfg.max_payload
                ),
            })
        } else {
            self.decoder.decode(&origin, payload)
        };
        match decoded {
            Ok(mut events) => {
                if p.dup {
                    for e in events.iter_mut() {
                        e.redelivered = true;
                    }
                }
                // `Emitter::events`, inlined (see `gather_events`).
                let mut events = events.into_iter();
                while self.emit.gather_events(&mut events, &ack) {
                    self.emit.flush_while(net.keep_up()).await?;
                    // The router may have held the batch back (backpressure).
                    self.clock.expire();
                }
                Ok(())
            }
            Err(bad) => {
                // Only what the input reads goes on: a message over `max_payload` (up
                // to some MiB under MQTT 3.1.1) is cut to it, as dead letters wait in
                // memory on their way to the router.
                let kept = &payload[..payload.len().min(self.cfg.max_payload)];
                let sent = self
                    .emit
                    .malformed_while(bad, &topic, received_ns, kept, ack, net.keep_up())
                    .await;
                // A dead letter may have filled the batch and waited for the router.
                self.clock.expire();
                sent
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_burst_clock_is_read_every_sixteenth_time_and_after_a_wait() {
        let clock = BurstClock::new();
        let first = clock.now();
        std::thread::sleep(Duration::from_millis(2));
        for i in 1..BurstClock::READS {
            assert_eq!(
                clock.now(),
                first + i64::from(i),
                "within the burst, one ns on"
            );
        }
        let next = clock.now();
        assert!(
            next > first + 1_000_000,
            "read afresh on the seventeenth call"
        );
        std::thread::sleep(Duration::from_millis(2));
        clock.expire();
        assert!(clock.now() > next, "read afresh after a wait");
    }
}
