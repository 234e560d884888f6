//! Inputs: tasks that turn upstream messages into records for the router.

// A build without any input type (`--no-default-features`) uses none of the helpers.
#![cfg_attr(not(any(feature = "mqtt", feature = "serial")), allow(dead_code))]

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
use crate::stages::Chain;

/// What every input task gets from the pipeline.
#[derive(Clone)]
pub struct SourceContext {
    /// This gateway's id.
    pub gateway_id: String,
    /// The pipeline's stages.
    pub chain: Arc<Chain>,
    /// The router's input channel.
    pub items: flume::Sender<Item>,
    /// Metrics.
    pub metrics: Metrics,
    /// Undecodable payloads go to the dead-letter topic (one is configured).
    pub dead_letters: bool,
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
    pub async fn events(&self, events: Vec<Event>, ack: &Ack) -> Result<(), Closed> {
        for e in events {
            self.m.received.inc();
            match self.ctx.chain.run(e) {
                Ok(e) => self.send(Record::Event(e), ack.clone()).await?,
                Err(d) => self.m.dropped(d.reason, 1),
            }
        }
        Ok(())
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
