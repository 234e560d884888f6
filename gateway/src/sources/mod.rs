//! Inputs: tasks that turn upstream messages into records for the router.

// A build without any input type (`--no-default-features`) uses none of the helpers.
#![cfg_attr(not(any(feature = "mqtt", feature = "serial")), allow(dead_code))]

pub mod json;
#[cfg(feature = "mqtt")]
pub mod mqtt;
#[cfg(feature = "serial")]
pub mod nmea;
pub mod payload;
#[cfg(feature = "serial")]
pub mod serial;

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;

use crate::ack::Ack;
use crate::event::{DeadLetter, Event, Record};
use crate::metrics::{InputMetrics, Metrics};
use crate::router::Item;
use crate::stages::{InputStages, Outcome};

/// What every input task gets from the pipeline.
#[derive(Clone)]
pub struct SourceContext {
    /// This gateway's id.
    pub gateway_id: String,
    /// This input's stages, then the pipeline's.
    pub stages: Arc<InputStages>,
    /// The router's input channel.
    pub items: flume::Sender<Item>,
    /// Metrics.
    pub metrics: Metrics,
    /// Undecodable payloads go to the dead-letter topic (one is configured).
    pub dead_letters: bool,
}

/// The counters of input `source`: `m` when it is that input, else looked up.
fn input_of<'a>(
    ctx: &SourceContext,
    m: Option<&'a InputMetrics>,
    source: &str,
) -> std::borrow::Cow<'a, InputMetrics> {
    match m {
        Some(m) if m.name == source => std::borrow::Cow::Borrowed(m),
        _ => std::borrow::Cow::Owned(ctx.metrics.input(source)),
    }
}

/// Accounts for one chain outcome and returns what goes to the router, if anything.
/// `m` is the input whose event went in (`None` for the pipeline's timers); an event a
/// stage made is counted on its own source's input (`generated`, and any drop of it).
pub(crate) fn outcome(
    ctx: &SourceContext,
    m: Option<&InputMetrics>,
    o: Outcome,
    ack: &Ack,
) -> Option<Item> {
    match o {
        Outcome::Event { event, made } => {
            if made {
                input_of(ctx, m, &event.source).generated.inc();
            }
            Some(Item {
                record: Record::Event(event),
                ack: ack.clone(),
                until_delivered: false,
            })
        }
        Outcome::Dropped(d) => {
            match (&d.made_by, m) {
                (Some(source), _) => {
                    // Made by a stage and dropped by a later one: both sides counted.
                    let m = input_of(ctx, m, source);
                    m.generated.inc();
                    m.dropped(d.reason, 1);
                }
                (None, Some(m)) => m.dropped(d.reason, 1),
                (None, None) => {}
            }
            None
        }
        Outcome::Rejected {
            dropped,
            detail,
            event,
        } => {
            let m = input_of(ctx, m, &event.source);
            if dropped.made_by.is_some() {
                m.generated.inc();
            }
            m.dropped(dropped.reason, 1);
            if !ctx.dead_letters {
                return None;
            }
            m.dead_letters.inc();
            let dl = DeadLetter {
                source: event.source.to_string(),
                origin: event.origin.to_string(),
                reason: dropped.reason.to_string(),
                detail: format!("{}: {detail}", dropped.stage),
                received_ns: event.received_ns,
                payload: crate::sinks::kafka::event_json_bytes(&event),
            };
            Some(Item {
                record: Record::DeadLetter(dl),
                ack: ack.clone(),
                until_delivered: false,
            })
        }
    }
}

/// What an input task should be doing.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum SourceState {
    /// Take in messages.
    Run,
    /// Stay connected so acknowledgements can still go out, but take in nothing new.
    Quiesce,
    /// Flush acknowledgements, disconnect and return.
    Stop,
}

/// `delay` with jitter (50 to 100% of it), so inputs that lost the same peer do not
/// come back in step.
#[cfg(any(feature = "mqtt", feature = "serial"))]
pub(crate) fn jittered(delay: std::time::Duration) -> std::time::Duration {
    use rand::Rng;
    delay.mul_f64(rand::rng().random_range(0.5..1.0))
}

/// Sleeps for `wait` unless the input is told to stop first; false means stop.
#[cfg(any(feature = "mqtt", feature = "serial"))]
pub(crate) async fn sleep_unless_stopped(
    wait: std::time::Duration,
    state: &mut tokio::sync::watch::Receiver<SourceState>,
) -> bool {
    tokio::select! {
        changed = state.changed() => {
            changed.is_ok() && *state.borrow() != SourceState::Stop
        }
        _ = tokio::time::sleep(wait) => true,
    }
}

/// The router hung up.
#[derive(Debug)]
pub(crate) struct Closed;

/// Hands an input's decoded events (through the stages) and rejected payloads to the
/// router, with the accounting every input shares.
pub(crate) struct Emitter<'a> {
    pub ctx: &'a SourceContext,
    pub m: &'a InputMetrics,
    /// Hold acks until Kafka confirmed (`on_delivery`).
    pub until_delivered: bool,
    malformed_seen: AtomicU64,
}

impl<'a> Emitter<'a> {
    pub fn new(ctx: &'a SourceContext, m: &'a InputMetrics, until_delivered: bool) -> Self {
        Emitter {
            ctx,
            m,
            until_delivered,
            malformed_seen: AtomicU64::new(0),
        }
    }

    async fn send(&self, record: Record, ack: Ack) -> Result<(), Closed> {
        let item = Item {
            record,
            ack,
            until_delivered: self.until_delivered,
        };
        self.ctx.items.send_async(item).await.map_err(|_| Closed)
    }

    /// Counts `events` as received and runs them through the stages to the router; each
    /// carries a share of `ack`.
    pub async fn events(
        &self,
        events: impl IntoIterator<Item = Event>,
        ack: &Ack,
    ) -> Result<(), Closed> {
        let mut out = Vec::new();
        for e in events {
            self.m.received.inc();
            self.ctx.stages.run(e, &mut out);
            for o in out.drain(..) {
                // Events stages made carry a share of the ack too: the upstream message
                // is acknowledged once they are safe as well.
                let item = outcome(self.ctx, Some(self.m), o, ack);
                if let Some(item) = item {
                    self.send_item(item).await?;
                }
            }
        }
        Ok(())
    }

    async fn send_item(&self, mut item: Item) -> Result<(), Closed> {
        item.until_delivered = self.until_delivered;
        self.ctx.items.send_async(item).await.map_err(|_| Closed)
    }

    /// Counts a line that is not an event as received and dropped for `reason`, without
    /// a log line or a dead letter: ordinary traffic that is not for us (a GPS receiver's
    /// satellite sentences, positions without a fix).
    #[cfg(feature = "serial")]
    pub fn ignored(&self, reason: &'static str) {
        self.m.received.inc();
        self.m.dropped(reason, 1);
    }

    /// Counts a rejected payload as received and dropped for `bad.reason`, logs it (the
    /// first ten, then every thousandth) and sends it to the dead-letter topic when one is
    /// configured.
    pub async fn malformed(
        &self,
        bad: payload::Malformed,
        origin: &str,
        received_ns: i64,
        payload: &[u8],
        ack: Ack,
    ) -> Result<(), Closed> {
        self.m.received.inc();
        self.m.dropped(bad.reason, 1);
        let n = self.malformed_seen.fetch_add(1, Ordering::Relaxed);
        if n < 10 || n % 1000 == 0 {
            tracing::warn!(input = %self.m.name, origin, reason = bad.reason, detail = %bad.detail, seen = n + 1, "rejected a payload");
        }
        if self.ctx.dead_letters {
            self.m.dead_letters.inc();
            let dl = DeadLetter {
                source: self.m.name.clone(),
                origin: origin.to_string(),
                reason: bad.reason.to_string(),
                detail: bad.detail,
                received_ns,
                payload: payload.to_vec(),
            };
            self.send(Record::DeadLetter(dl), ack).await?;
        }
        Ok(())
    }
}
