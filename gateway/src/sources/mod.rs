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

use std::convert::Infallible;
use std::future::Future;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex, PoisonError};

use crate::ack::Ack;
use crate::event::{DeadLetter, Event, Record};
use crate::metrics::{InputMetrics, Metrics};
use crate::router::{Batch, Item, RouterSender, MAX_BATCH};
use crate::stages::{InputStages, Outcome};

/// What every input task gets from the pipeline.
#[derive(Clone)]
pub struct SourceContext {
    /// This gateway's id.
    pub gateway_id: String,
    /// This input's stages, then the pipeline's.
    pub stages: Arc<InputStages>,
    /// The router's input channel.
    pub items: RouterSender,
    /// Metrics.
    pub metrics: Metrics,
    /// Undecodable payloads go to the dead-letter topic (one is configured).
    pub dead_letters: bool,
    /// Where the inputs of this pipeline generation report that they quiesced.
    pub settled: Settled,
}

/// Counts the inputs of one pipeline generation that were told to quiesce and have
/// handed the router everything they had taken in ([`Emitter::settle`]). A shutdown
/// waits for all of them before it stops the router: an input in the middle of a burst
/// holds up to a batch of events that would otherwise reach a router already gone.
#[derive(Clone)]
pub struct Settled(Arc<tokio::sync::Semaphore>);

impl Default for Settled {
    fn default() -> Self {
        Settled(Arc::new(tokio::sync::Semaphore::new(0)))
    }
}

impl Settled {
    /// Waits until `inputs` inputs settled, or `limit` passed (an input waiting for room
    /// in a full router); false on the limit.
    pub async fn wait(&self, inputs: usize, limit: std::time::Duration) -> bool {
        let n = u32::try_from(inputs).unwrap_or(u32::MAX);
        matches!(
            tokio::time::timeout(limit, self.0.acquire_many(n)).await,
            Ok(Ok(_))
        )
    }

    fn signal(&self) {
        self.0.add_permits(1);
    }
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
///
/// Items are gathered into a [`Batch`] and sent when it is full or on
/// [`Emitter::flush`], which an input calls before it waits for its upstream: so nothing
/// waits here for more input, and a burst costs one channel operation per batch.
pub(crate) struct Emitter<'a> {
    pub ctx: &'a SourceContext,
    pub m: &'a InputMetrics,
    /// Hold acks until Kafka confirmed (`on_delivery`).
    pub until_delivered: bool,
    malformed_seen: AtomicU64,
    /// Items not sent yet, and scratch space for the stages (only the input's own task
    /// touches it: never contended).
    pending: Mutex<Pending>,
    /// The input's state, when a flush should give up on `Stop` (see [`Emitter::flush`]).
    state: Option<tokio::sync::watch::Receiver<SourceState>>,
    /// [`Emitter::settle`] told [`SourceContext::settled`] already.
    settled: AtomicBool,
}

/// How long a flush told to stop still waits for room in the router's channel before it
/// drops its batch.
const STOP_GRACE: std::time::Duration = std::time::Duration::from_secs(2);

#[derive(Default)]
struct Pending {
    batch: Batch,
    /// What the stages made of one event, kept between events.
    outcomes: Vec<Outcome>,
}

impl<'a> Emitter<'a> {
    pub fn new(ctx: &'a SourceContext, m: &'a InputMetrics, until_delivered: bool) -> Self {
        Emitter {
            ctx,
            m,
            until_delivered,
            malformed_seen: AtomicU64::new(0),
            pending: Mutex::new(Pending::default()),
            state: None,
            settled: AtomicBool::new(false),
        }
    }

    /// Lets [`Emitter::flush`] give up when `state` turns [`SourceState::Stop`].
    pub fn stopped_by(mut self, state: tokio::sync::watch::Receiver<SourceState>) -> Self {
        self.state = Some(state);
        self
    }

    fn pending(&self) -> std::sync::MutexGuard<'_, Pending> {
        self.pending.lock().unwrap_or_else(PoisonError::into_inner)
    }

    /// Adds an item to the batch; sends the batch once it is full, running `meanwhile`
    /// while it waits (see [`Emitter::flush_while`]).
    async fn push_while(
        &self,
        item: Item,
        meanwhile: impl Future<Output = Infallible>,
    ) -> Result<(), Closed> {
        let full = self.gather(&mut self.pending().batch, item);
        if full {
            self.flush_while(meanwhile).await?;
        }
        Ok(())
    }

    /// Puts `item` in `batch`; true when the batch is full.
    fn gather(&self, batch: &mut Batch, mut item: Item) -> bool {
        item.until_delivered = self.until_delivered;
        batch.push(item);
        batch.len() >= MAX_BATCH
    }

    /// Sends what is gathered to the router (waiting while its channel is full:
    /// backpressure). Call it before waiting for more input.
    pub async fn flush(&self) -> Result<(), Closed> {
        self.flush_while(std::future::pending()).await
    }

    /// [`Emitter::flush`] that runs `meanwhile` while it waits for room in the router
    /// (an MQTT input keeps its connection going); `meanwhile` is dropped once the batch
    /// is in, and is never polled when there is room at once.
    pub async fn flush_while(
        &self,
        meanwhile: impl Future<Output = Infallible>,
    ) -> Result<(), Closed> {
        let mut batch = std::mem::take(&mut self.pending().batch);
        if batch.is_empty() {
            return Ok(());
        }
        batch.fit();
        // Told to stop while the router has no room (a full spool with `block`): after
        // a grace period the batch is given up, so that a reload or a shutdown does not
        // wait for Kafka to come back. A batch the router does not take (given up, or
        // the router is gone) disarms its acks when it is dropped (see `Batch`): a QoS 1
        // broker sends its messages again. Its events are counted as dropped
        // (`input_stopped`) on their own inputs, and received again if they come again.
        let state = self.state.clone();
        let stopped = async {
            let Some(mut state) = state else {
                return std::future::pending().await;
            };
            if state.wait_for(|s| *s == SourceState::Stop).await.is_err() {
                return std::future::pending().await;
            }
            tokio::time::sleep(STOP_GRACE).await;
        };
        let sent = tokio::select! {
            biased;
            sent = self.ctx.items.send_unless(batch, stopped) => sent,
            never = meanwhile => match never {},
        };
        let Err(unsent) = sent else {
            return Ok(());
        };
        let events = unsent.count_dropped(&self.ctx.metrics, "input_stopped");
        if events > 0 {
            tracing::warn!(input = %self.m.name, events, "stopped while the router had no room (a full spool?), or the router is gone: dropped what was waiting to go in; QoS 1 messages come again");
        }
        Err(Closed)
    }

    /// Hands over what is gathered and, the first time, reports the input settled
    /// ([`Settled`]). An input calls it once it is quiescing and takes nothing more in
    /// that it holds: a shutdown stops the router only after every input settled.
    pub async fn settle(&self) -> Result<(), Closed> {
        self.settle_while(std::future::pending()).await
    }

    /// [`Emitter::settle`] that runs `meanwhile` while it waits (see
    /// [`Emitter::flush_while`]).
    pub async fn settle_while(
        &self,
        meanwhile: impl Future<Output = Infallible>,
    ) -> Result<(), Closed> {
        let sent = self.flush_while(meanwhile).await;
        if !self.settled.swap(true, Ordering::Relaxed) {
            self.ctx.settled.signal();
        }
        sent
    }

    /// Counts `events` as received and runs them through the stages to the router; each
    /// carries a share of `ack`.
    pub async fn events(
        &self,
        events: impl IntoIterator<Item = Event>,
        ack: &Ack,
    ) -> Result<(), Closed> {
        let mut events = events.into_iter();
        while self.gather_events(&mut events, ack) {
            self.flush().await?;
        }
        Ok(())
    }

    /// [`Emitter::events`] up to a full batch, without waiting: true when the batch is
    /// full, to be flushed before the rest of `events` is gathered. An input's hot path
    /// calls this and flushes itself, so that an event is not moved into one more
    /// future's state on its way (some 240 bytes per hop).
    pub fn gather_events(&self, events: &mut impl Iterator<Item = Event>, ack: &Ack) -> bool {
        let mut pending = self.pending();
        let Pending { batch, outcomes } = &mut *pending;
        for e in events {
            self.m.received.inc();
            let full = if self.ctx.stages.is_empty() {
                // What `outcome` makes of `Outcome::Event { made: false }`, built here:
                // an event is some 240 bytes, copied at every hop, and going through
                // the outcome list or `outcome` itself cost the input thread about 5%
                // (interleaved `--direct 3`, BENCHMARKS.md).
                let item = Item {
                    record: Record::Event(e),
                    ack: ack.clone(),
                    until_delivered: false,
                };
                self.gather(batch, item)
            } else {
                self.ctx.stages.run(e, outcomes);
                let mut full = false;
                for o in outcomes.drain(..) {
                    // Events stages made carry a share of the ack too: the upstream
                    // message is acknowledged once they are safe as well.
                    if let Some(item) = outcome(self.ctx, Some(self.m), o, ack) {
                        full |= self.gather(batch, item);
                    }
                }
                full
            };
            if full {
                return true;
            }
        }
        false
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
        let meanwhile = std::future::pending();
        self.malformed_while(bad, origin, received_ns, payload, ack, meanwhile)
            .await
    }

    /// [`Emitter::malformed`] that runs `meanwhile` while it waits (see
    /// [`Emitter::flush_while`]).
    pub async fn malformed_while(
        &self,
        bad: payload::Malformed,
        origin: &str,
        received_ns: i64,
        payload: &[u8],
        ack: Ack,
        meanwhile: impl Future<Output = Infallible>,
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
            let item = Item {
                record: Record::DeadLetter(dl),
                ack,
                until_delivered: self.until_delivered,
            };
            self.push_while(item, meanwhile).await?;
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::ack::AckQueue;
    use crate::stages::tests::event;
    use crate::stages::{Chain, InputStages};

    fn context(items: RouterSender) -> SourceContext {
        SourceContext {
            gateway_id: "gw".into(),
            stages: Arc::new(InputStages {
                local: None,
                global: Arc::new(Chain::build(&[], None, "").expect("no stages")),
            }),
            items,
            metrics: Metrics::new(),
            dead_letters: false,
            settled: Settled::default(),
        }
    }

    fn devices(batch: &Batch) -> Vec<String> {
        batch
            .iter()
            .map(|i| match &i.record {
                Record::Event(e) => e.device.to_string(),
                Record::DeadLetter(d) => d.origin.clone(),
            })
            .collect()
    }

    #[tokio::test]
    async fn items_go_in_full_batches_and_the_rest_on_flush_in_order() {
        let (tx, rx) = RouterSender::for_test(4096);
        let ctx = context(tx);
        let m = ctx.metrics.input("site");
        let emit = Emitter::new(&ctx, &m, true);
        let n = MAX_BATCH + 3;
        for i in 0..n {
            let e = event(&format!("d{i}"), "t", 1.0);
            emit.events([e], &Ack::none()).await.expect("router there");
        }
        let first = rx.try_recv().expect("a full batch went at once");
        assert_eq!(first.len(), MAX_BATCH);
        assert!(first.iter().all(|i| i.until_delivered));
        assert!(rx.try_recv().is_err(), "the rest waits for the flush");
        emit.flush().await.expect("router there");
        let rest = rx.try_recv().expect("flushed");
        let got: Vec<String> = devices(&first).into_iter().chain(devices(&rest)).collect();
        let want: Vec<String> = (0..n).map(|i| format!("d{i}")).collect();
        assert_eq!(got, want);
        emit.flush().await.expect("nothing to send is fine");
        assert!(rx.try_recv().is_err(), "an empty flush sends nothing");
        assert_eq!(m.received.get(), n as u64);
    }

    #[tokio::test]
    async fn settling_hands_over_the_burst_and_counts_each_input_once() {
        let (tx, rx) = RouterSender::for_test(4096);
        let ctx = context(tx);
        let m = ctx.metrics.input("site");
        let limit = std::time::Duration::from_millis(50);
        let (a, b) = (Emitter::new(&ctx, &m, false), Emitter::new(&ctx, &m, false));
        a.events([event("d", "t", 1.0)], &Ack::none())
            .await
            .expect("only gathered");
        assert!(!ctx.settled.wait(1, limit).await, "nobody settled yet");
        a.settle().await.expect("router there");
        assert_eq!(rx.try_recv().expect("handed over").len(), 1);
        assert!(ctx.settled.wait(1, limit).await);
        a.settle().await.expect("again");
        assert!(!ctx.settled.wait(2, limit).await, "one input, counted once");
        b.settle().await.expect("an empty one settles too");
        assert!(ctx.settled.wait(2, limit).await);
    }

    #[tokio::test]
    async fn what_the_router_never_got_is_not_acknowledged() {
        let (tx, rx) = RouterSender::for_test(4096);
        drop(rx);
        let ctx = context(tx);
        let m = ctx.metrics.input("site");
        let released = Arc::new(Mutex::new(Vec::new()));
        // One queue per case: a message kept back also holds back every later one.
        let queue = || {
            let r = released.clone();
            AckQueue::new(move |msg: u32| r.lock().expect("lock").push(msg))
        };
        let (q1, q2, q3) = (queue(), queue(), queue());
        // A failed flush.
        let emit = Emitter::new(&ctx, &m, false);
        let ack = q1.push(1);
        emit.events([event("d", "t", 1.0)], &ack)
            .await
            .expect("only gathered");
        drop(ack);
        assert!(emit.flush().await.is_err(), "the router is gone");
        // Gathered, never flushed.
        let ack = q2.push(2);
        let emit = Emitter::new(&ctx, &m, false);
        emit.events([event("d", "t", 2.0)], &ack)
            .await
            .expect("only gathered");
        drop(ack);
        drop(emit);
        // The check that can fail: a message with nothing in an emitter is released.
        drop(q3.push(3));
        assert_eq!(*released.lock().expect("lock"), vec![3]);
    }
}
