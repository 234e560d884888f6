//! The MQTT input (rumqttc): persistent session, manual in-order acks, topic templates,
//! reconnect with backoff and jitter.
//!
//! With QoS 1 and `ack_policy` `on_spool` or `on_delivery`, the gateway takes over
//! acknowledging (`set_manual_acks`): every publish goes into an [`AckQueue`] and its PUBACK
//! leaves only when the events decoded from it are safe, in receive order. The broker's
//! in-flight window (Mosquitto `max_inflight_messages`, default 20; MQTT 5 receive maximum)
//! bounds how many publishes wait for their acks, and so QoS 1 throughput: see README.

use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

use gateway_config::{AckPolicy, MqttInput, MqttVersion, TopicTemplate};
use rand::Rng;
use rumqttc::{
    AsyncClient, Event, MqttOptions, Packet, Publish, QoS, SubscribeFilter, SubscribeReasonCode,
    TlsConfiguration, Transport,
};
use tokio::sync::watch;

use super::payload::{decode, Origin};
use super::{SourceContext, SourceState};
use crate::ack::{Ack, AckQueue};
use crate::event::{now_ns, DeadLetter, Record};
use crate::metrics::InputMetrics;
use crate::router::Item;

/// Builds the rumqttc options for an input (reads secrets and certificates).
pub fn options(cfg: &MqttInput, gateway_id: &str) -> Result<MqttOptions, String> {
    if cfg.protocol == MqttVersion::V5 {
        return Err(format!(
            "input {}: protocol \"v5\" is not supported yet; use \"v311\"",
            cfg.name
        ));
    }
    let client_id = cfg
        .client_id
        .clone()
        .unwrap_or_else(|| format!("{gateway_id}-{}", cfg.name));
    let port = cfg
        .port
        .unwrap_or(if cfg.tls.is_some() { 8883 } else { 1883 });
    let mut o = MqttOptions::new(client_id, &cfg.host, port);
    o.set_keep_alive(cfg.keep_alive)
        .set_clean_session(cfg.clean_session)
        .set_manual_acks(cfg.qos == 1 && cfg.ack_policy != AckPolicy::OnReceive)
        .set_max_packet_size(cfg.max_payload + cfg.max_payload / 4 + 1024, 64 * 1024);
    if let Some(user) = &cfg.username {
        let pass = match &cfg.password {
            Some(s) => s
                .read()
                .map_err(|e| format!("input {} password: {e}", cfg.name))?,
            None => String::new(),
        };
        o.set_credentials(user, pass);
    }
    if let Some(tls) = &cfg.tls {
        let read = |p: &std::path::Path| {
            std::fs::read(p)
                .map_err(|e| format!("input {}: cannot read {}: {e}", cfg.name, p.display()))
        };
        let ca = read(&tls.ca_file)?;
        let client_auth = match (&tls.client_cert_file, &tls.client_key_file) {
            (Some(c), Some(k)) => Some((read(c)?, read(k)?)),
            _ => None,
        };
        o.set_transport(Transport::tls_with_config(TlsConfiguration::Simple {
            ca,
            alpn: None,
            client_auth,
        }));
    }
    Ok(o)
}

/// Runs one MQTT input until `state` turns [`SourceState::Stop`]. Returns an error only
/// for a config the input cannot start with; network errors are retried forever.
pub async fn run(
    cfg: MqttInput,
    ctx: SourceContext,
    mut state: watch::Receiver<SourceState>,
) -> Result<(), String> {
    let opts = options(&cfg, &ctx.gateway_id)?;
    let templates: Vec<TopicTemplate> = cfg
        .topics
        .iter()
        .map(|t| {
            TopicTemplate::parse(t).map_err(|e| format!("input {} topic {t:?}: {e}", cfg.name))
        })
        .collect::<Result<_, _>>()?;
    let qos = if cfg.qos == 1 {
        QoS::AtLeastOnce
    } else {
        QoS::AtMostOnce
    };
    let manual = cfg.qos == 1 && cfg.ack_policy != AckPolicy::OnReceive;
    let until_delivered = cfg.ack_policy == AckPolicy::OnDelivery;
    let (client, mut eventloop) = AsyncClient::new(opts, 65_536);
    let m = ctx.metrics.input(&cfg.name);
    // Released acks go through an unbounded queue to a task that hands them to the
    // client, waiting for room in its request channel: an ack is never thrown away.
    // The queue is bounded in practice by the broker's in-flight window.
    let (ack_tx, mut ack_rx) = tokio::sync::mpsc::unbounded_channel::<Publish>();
    let acks = AckQueue::new(move |p: Publish| {
        let _ = ack_tx.send(p);
    });
    let acker = {
        let client = client.clone();
        let m = m.clone();
        tokio::spawn(async move {
            while let Some(p) = ack_rx.recv().await {
                match client.ack(&p).await {
                    Ok(()) => {
                        m.acks.inc();
                    }
                    Err(_) => break, // the event loop is gone
                }
            }
        })
    };
    let filters: Vec<SubscribeFilter> = templates
        .iter()
        .map(|t| SubscribeFilter::new(t.filter().to_string(), qos))
        .collect();
    let mut delay = cfg.reconnect.min;
    let malformed_seen = AtomicU64::new(0);
    let input = Input {
        cfg: &cfg,
        ctx: &ctx,
        m: &m,
        templates: &templates,
        malformed_seen: &malformed_seen,
        until_delivered,
    };
    tracing::info!(input = %cfg.name, host = %cfg.host, filters = ?filters.iter().map(|f| &f.path).collect::<Vec<_>>(), "MQTT input starting");
    loop {
        let polled = tokio::select! {
            changed = state.changed() => {
                if changed.is_err() || *state.borrow() == SourceState::Stop {
                    break;
                }
                continue;
            }
            ev = eventloop.poll() => ev,
        };
        match polled {
            Ok(Event::Incoming(Packet::ConnAck(ca))) => {
                m.connected.set(1);
                delay = cfg.reconnect.min;
                tracing::info!(input = %cfg.name, session_present = ca.session_present, "MQTT connected");
                if let Err(e) = client.try_subscribe_many(filters.clone()) {
                    tracing::error!(input = %cfg.name, error = %e, "cannot subscribe");
                }
            }
            Ok(Event::Incoming(Packet::SubAck(s))) => {
                if s.return_codes
                    .iter()
                    .any(|c| matches!(c, SubscribeReasonCode::Failure))
                {
                    tracing::error!(input = %cfg.name, codes = ?s.return_codes, "the broker refused a subscription; check the topic filters and ACLs");
                }
            }
            Ok(Event::Incoming(Packet::Publish(p))) => {
                if *state.borrow() != SourceState::Run {
                    // Quiescing: not taken, not acknowledged; the broker redelivers it.
                    continue;
                }
                let ack = if manual && p.qos == QoS::AtLeastOnce {
                    acks.push(p.clone())
                } else {
                    Ack::none()
                };
                if input.handle(&p, ack).await.is_err() {
                    break; // the router is gone
                }
            }
            Ok(_) => {}
            Err(e) => {
                m.connected.set(0);
                m.reconnects.inc();
                // Packet ids of the old connection mean nothing on the next one.
                acks.reset();
                let jittered = delay.mul_f64(rand::rng().random_range(0.5..1.0));
                tracing::warn!(input = %cfg.name, error = %e, retry_in = ?jittered, "MQTT connection lost");
                tokio::select! {
                    changed = state.changed() => {
                        if changed.is_err() || *state.borrow() == SourceState::Stop {
                            break;
                        }
                    }
                    _ = tokio::time::sleep(jittered) => {}
                }
                delay = (delay * 2).min(cfg.reconnect.max);
            }
        }
    }
    // Let queued acks go out before disconnecting: close the ack queue, let the acker
    // hand over what it holds, then disconnect behind those acks.
    drop(acks);
    let _ = tokio::time::timeout(Duration::from_millis(500), async {
        while !acker.is_finished() {
            tokio::select! {
                _ = eventloop.poll() => {}
                _ = tokio::time::sleep(Duration::from_millis(10)) => {}
            }
        }
    })
    .await;
    acker.abort();
    let _ = client.try_disconnect();
    let _ = tokio::time::timeout(Duration::from_millis(500), async {
        while let Ok(ev) = eventloop.poll().await {
            if matches!(ev, Event::Outgoing(rumqttc::Outgoing::Disconnect)) {
                break;
            }
        }
    })
    .await;
    m.connected.set(0);
    tracing::info!(input = %cfg.name, "MQTT input stopped");
    Ok(())
}

struct Input<'a> {
    cfg: &'a MqttInput,
    ctx: &'a SourceContext,
    m: &'a InputMetrics,
    templates: &'a [TopicTemplate],
    malformed_seen: &'a AtomicU64,
    until_delivered: bool,
}

/// The router hung up.
struct Closed;

impl Input<'_> {
    async fn send(&self, record: Record, ack: Ack) -> Result<(), Closed> {
        let item = Item {
            record,
            ack,
            until_delivered: self.until_delivered,
        };
        self.ctx.items.send_async(item).await.map_err(|_| Closed)
    }

    async fn handle(&self, p: &Publish, ack: Ack) -> Result<(), Closed> {
        let received_ns = now_ns();
        let captures = self
            .templates
            .iter()
            .find_map(|t| t.matches(&p.topic))
            .unwrap_or_default();
        let origin = Origin {
            source: &self.cfg.name,
            topic: &p.topic,
            captures: &captures,
            received_ns,
        };
        let decoded = if p.payload.len() > self.cfg.max_payload {
            Err(super::payload::Malformed {
                reason: "too_large",
                detail: format!(
                    "{} bytes, max_payload is {}",
                    p.payload.len(),
                    self.cfg.max_payload
                ),
            })
        } else {
            decode(self.cfg.format, &self.cfg.json, &origin, &p.payload)
        };
        match decoded {
            Ok(events) => {
                for e in events {
                    self.m.received.inc();
                    match self.ctx.chain.run(e) {
                        Ok(e) => self.send(Record::Event(e), ack.clone()).await?,
                        Err(d) => self.m.dropped(d.reason, 1),
                    }
                }
            }
            Err(bad) => {
                self.m.received.inc();
                self.m.dropped(bad.reason, 1);
                let n = self.malformed_seen.fetch_add(1, Ordering::Relaxed);
                if n < 10 || n % 1000 == 0 {
                    tracing::warn!(input = %self.cfg.name, topic = %p.topic, reason = bad.reason, detail = %bad.detail, seen = n + 1, "rejected a payload");
                }
                if self.ctx.dead_letters {
                    self.m.dead_letters.inc();
                    let dl = DeadLetter {
                        source: self.cfg.name.clone(),
                        origin: p.topic.clone(),
                        reason: bad.reason.to_string(),
                        detail: bad.detail,
                        received_ns,
                        payload: p.payload.to_vec(),
                    };
                    self.send(Record::DeadLetter(dl), ack).await?;
                }
            }
        }
        Ok(())
    }
}
