//! The MQTT connection of one input, either protocol version: the client (requests:
//! acks, subscriptions, disconnect) and the event loop, which [`Net`] polls on behalf of
//! the input, and also while the input waits for room in the router.

use std::collections::VecDeque;
use std::convert::Infallible;
use std::future::Future;
use std::pin::Pin;
use std::task::{Context, Poll, Waker};
use std::time::Duration;

use std::borrow::Cow;

use rumqttc::v5::mqttbytes::v5 as m5;
use rumqttc::{AsyncClient, Event, Packet, Publish, QoS, SubscribeFilter, SubscribeReasonCode};

/// A received publish of either protocol version, reduced to what the input uses.
///
/// It is moved a few times per message (out of the event loop's queue, through the
/// match), so it holds no more than that: rumqttc's MQTT 5 publish with its properties is
/// 216 bytes, this is 80.
pub(super) struct Msg {
    /// MQTT 3.1.1 gives the topic as text, MQTT 5 as bytes.
    topic: Topic,
    pub payload: bytes::Bytes,
    /// The packet id, for the ack.
    pub pkid: u16,
    pub qos1: bool,
    /// The broker sends it again (DUP): the first copy's ack was never seen.
    pub dup: bool,
}

enum Topic {
    Text(String),
    Bytes(bytes::Bytes),
}

impl Msg {
    fn v4(p: Publish) -> Msg {
        Msg {
            qos1: p.qos == QoS::AtLeastOnce,
            pkid: p.pkid,
            dup: p.dup,
            topic: Topic::Text(p.topic),
            payload: p.payload,
        }
    }

    fn v5(p: m5::Publish) -> Msg {
        Msg {
            qos1: p.qos == rumqttc::v5::mqttbytes::QoS::AtLeastOnce,
            pkid: p.pkid,
            dup: p.dup,
            topic: Topic::Bytes(p.topic),
            payload: p.payload,
        }
    }

    /// rumqttc acknowledged it already, or it needs no ack: QoS 0, or acks left to
    /// rumqttc (`on_receive`, `manual` false). Such a message is the gateway's to keep
    /// from the moment it is read: skipped, it is lost.
    pub fn acked_by_client(&self, manual: bool) -> bool {
        !(manual && self.qos1)
    }

    pub fn topic(&self) -> Cow<'_, str> {
        match &self.topic {
            Topic::Text(t) => Cow::Borrowed(t),
            Topic::Bytes(t) => String::from_utf8_lossy(t),
        }
    }

    /// Memory it holds, roughly: what [`Net`] counts against [`MAX_HELD_BYTES`].
    fn size(&self) -> usize {
        let topic = match &self.topic {
            Topic::Text(t) => t.len(),
            Topic::Bytes(t) => t.len(),
        };
        128 + topic + self.payload.len()
    }
}

/// What a poll of either event loop amounts to here.
// Returned by value once per packet and matched at once; boxing the publish would cost
// an allocation per message.
#[allow(clippy::large_enum_variant)]
pub(super) enum Polled {
    Connected { session_present: bool },
    SubAck { refused: bool },
    Publish(Msg),
    Disconnected,
    Other,
}

/// The client half: requests to the event loop, which sends them when it is polled.
#[derive(Clone)]
pub(super) enum Client {
    V4(AsyncClient),
    V5(rumqttc::v5::AsyncClient),
}

impl Client {
    /// Hands the client the ack of the QoS 1 publish with packet id `pkid`, without
    /// waiting. rumqttc builds an ack from a publish's QoS and packet id alone, so the
    /// ack queue keeps only the id.
    pub fn try_ack(&self, pkid: u16) -> Result<(), String> {
        match self {
            Client::V4(c) => {
                let mut p = Publish::new("", QoS::AtLeastOnce, Vec::new());
                p.pkid = pkid;
                c.try_ack(&p).map_err(|e| e.to_string())
            }
            Client::V5(c) => {
                let mut p = m5::Publish::new(
                    "",
                    rumqttc::v5::mqttbytes::QoS::AtLeastOnce,
                    Vec::new(),
                    None,
                );
                p.pkid = pkid;
                c.try_ack(&p).map_err(|e| e.to_string())
            }
        }
    }

    pub fn subscribe(&self, filters: &[String], qos1: bool) -> Result<(), String> {
        match self {
            Client::V4(c) => {
                let q = if qos1 {
                    QoS::AtLeastOnce
                } else {
                    QoS::AtMostOnce
                };
                c.try_subscribe_many(filters.iter().map(|f| SubscribeFilter::new(f.clone(), q)))
                    .map_err(|e| e.to_string())
            }
            Client::V5(c) => {
                use rumqttc::v5::mqttbytes::QoS as Q5;
                let q = if qos1 {
                    Q5::AtLeastOnce
                } else {
                    Q5::AtMostOnce
                };
                // Retained messages only for a subscription the broker did not have: a
                // session resumed after a restart does not get them all again.
                c.try_subscribe_many(filters.iter().map(|f| m5::Filter {
                    retain_forward_rule: m5::RetainForwardRule::OnNewSubscribe,
                    ..m5::Filter::new(f.clone(), q)
                }))
                .map_err(|e| e.to_string())
            }
        }
    }

    pub fn try_disconnect(&self) {
        match self {
            Client::V4(c) => {
                let _ = c.try_disconnect();
            }
            Client::V5(c) => {
                let _ = c.try_disconnect();
            }
        }
    }
}

/// The event loop half, MQTT 3.1.1 or 5.
pub(super) enum Events {
    V4(Box<rumqttc::EventLoop>),
    V5(Box<rumqttc::v5::EventLoop>),
}

impl Events {
    async fn poll(&mut self) -> Result<Polled, String> {
        match self {
            Events::V4(ev) => ev.poll().await.map(polled_v4).map_err(|e| e.to_string()),
            Events::V5(ev) => ev.poll().await.map(polled_v5).map_err(|e| e.to_string()),
        }
    }

    /// The next event the event loop has already parsed, if any, without a poll.
    ///
    /// One read of the socket parses every packet in it into the event loop's queue, and
    /// its `poll` hands them out one per call. Each call built rumqttc's poll future and
    /// moved the event through it several times (`memcpy` was a tenth of the input
    /// thread); the queue is public, so the input takes what it holds directly and polls
    /// only when it is empty. `poll` itself returns the same queue's front first, so the
    /// order is the same.
    fn next_parsed(&mut self) -> Option<Polled> {
        match self {
            Events::V4(ev) => ev.state.events.pop_front().map(polled_v4),
            Events::V5(ev) => ev.state.events.pop_front().map(polled_v5),
        }
    }

    /// Forgets the broken connection's state: rumqttc's `clean`, which also drops the
    /// acks waiting in the request queue (the broker sends their messages again).
    fn clean(&mut self) {
        match self {
            Events::V4(ev) => ev.clean(),
            Events::V5(ev) => ev.clean(),
        }
    }
}

/// What an MQTT 3.1.1 event amounts to here.
fn polled_v4(event: Event) -> Polled {
    match event {
        Event::Incoming(Packet::ConnAck(ca)) => Polled::Connected {
            session_present: ca.session_present,
        },
        Event::Incoming(Packet::SubAck(s)) => Polled::SubAck {
            refused: s
                .return_codes
                .iter()
                .any(|c| matches!(c, SubscribeReasonCode::Failure)),
        },
        Event::Incoming(Packet::Publish(p)) => Polled::Publish(Msg::v4(p)),
        Event::Outgoing(rumqttc::Outgoing::Disconnect) => Polled::Disconnected,
        _ => Polled::Other,
    }
}

/// What an MQTT 5 event amounts to here.
fn polled_v5(event: rumqttc::v5::Event) -> Polled {
    use rumqttc::v5::Event as E5;
    match event {
        E5::Incoming(m5::Packet::ConnAck(ca)) => Polled::Connected {
            session_present: ca.session_present,
        },
        E5::Incoming(m5::Packet::SubAck(s)) => Polled::SubAck {
            refused: s
                .return_codes
                .iter()
                .any(|c| !matches!(c, m5::SubscribeReasonCode::Success(_))),
        },
        E5::Incoming(m5::Packet::Publish(p)) => Polled::Publish(Msg::v5(p)),
        E5::Outgoing(rumqttc::Outgoing::Disconnect) => Polled::Disconnected,
        _ => Polled::Other,
    }
}

/// How long an input waits for room in the router before it polls its connection
/// meanwhile ([`Net::keep_up`]). Under load the router's channel is full for moments at
/// a time; reading ahead then would only move messages through one more queue.
const KEEP_UP_AFTER: Duration = Duration::from_millis(200);

/// What [`Net::keep_up`] holds at most (payloads, topics and 128 bytes a message). A
/// QoS 1 broker stops at its in-flight window first (at most 65,535 messages); QoS 0
/// traffic, or acks left to rumqttc, may not: at the bound the input stops reading, and
/// the broker's queue or the socket holds the rest.
pub(super) const MAX_HELD_BYTES: usize = 8 << 20;

/// A poll that owns the event loop, so that it can be left half-way and resumed later.
async fn owned_poll(mut events: Events) -> (Events, Result<Polled, String>) {
    let polled = events.poll().await;
    (events, polled)
}

/// An input's connection, polled by the input and, while the input waits for room in
/// the router, by [`Net::keep_up`].
///
/// rumqttc's `poll` is not cancel-safe once it writes (an ack, a ping): a poll that was
/// started is never dropped but resumed, by whichever of the two polls next. So the poll
/// owns the event loop while it is under way ([`owned_poll`], in a slot allocated once)
/// and gives it back when it ends.
pub(super) struct Net<F> {
    /// The request half.
    pub client: Client,
    /// The event loop, while no poll is under way.
    events: Option<Events>,
    /// The poll under way, if any.
    polling: Pin<Box<Option<F>>>,
    start: fn(Events) -> F,
    /// What `keep_up` read, in order, before anything the event loop still holds.
    held: VecDeque<Result<Polled, String>>,
    held_bytes: usize,
    /// A poll ended in an error, and the input has not polled since: the next poll would
    /// connect again at once, which is the input's to do (after its backoff), not
    /// `keep_up`'s.
    broken: bool,
    /// When the event loop was last polled: `keep_up` starts polling [`KEEP_UP_AFTER`]
    /// from then, not from the start of each wait (an input working through what it
    /// held, waiting a little for each batch, would otherwise never poll).
    polled_at: tokio::time::Instant,
}

/// An input's connection over `client` and `events`.
pub(super) fn net(
    client: Client,
    events: Events,
) -> Net<impl Future<Output = (Events, Result<Polled, String>)> + Send> {
    Net {
        client,
        events: Some(events),
        polling: Box::pin(None),
        start: owned_poll,
        held: VecDeque::new(),
        held_bytes: 0,
        broken: false,
        polled_at: tokio::time::Instant::now(),
    }
}

/// The type of [`owned_poll`]'s future, for the input's functions that take a [`Net`].
pub(super) trait PollOwned: Future<Output = (Events, Result<Polled, String>)> {}

impl<T: Future<Output = (Events, Result<Polled, String>)>> PollOwned for T {}

impl<F: PollOwned> Net<F> {
    /// The next event at hand without waiting: what `keep_up` read first, then what the
    /// event loop parsed already (while no poll is under way; one under way returns
    /// that first).
    pub fn next_ready(&mut self) -> Option<Result<Polled, String>> {
        if let Some(held) = self.held.pop_front() {
            if let Ok(Polled::Publish(p)) = &held {
                self.held_bytes -= p.size();
            }
            return Some(held);
        }
        self.events.as_mut()?.next_parsed().map(Ok)
    }

    /// Whether `keep_up` read anything the input has not taken.
    pub fn holds(&self) -> bool {
        !self.held.is_empty()
    }

    /// Resumes the poll under way, or starts one.
    fn poll_events(&mut self, cx: &mut Context<'_>) -> Poll<Result<Polled, String>> {
        self.polled_at = tokio::time::Instant::now();
        if self.polling.is_none() {
            let Some(events) = self.events.take() else {
                // Only a poll that panicked could have taken it.
                return Poll::Ready(Err("the MQTT event loop is gone".into()));
            };
            self.polling.set(Some((self.start)(events)));
        }
        let Some(poll) = self.polling.as_mut().as_pin_mut() else {
            return Poll::Pending;
        };
        let Poll::Ready((events, polled)) = poll.poll(cx) else {
            return Poll::Pending;
        };
        self.polling.set(None);
        self.events = Some(events);
        self.broken = polled.is_err();
        Poll::Ready(polled)
    }

    /// The input's poll, once and without waiting: the next event, if the socket had
    /// one. A poll left pending here is resumed by the next call of this, [`Net::next`]
    /// or [`Net::keep_up`].
    pub fn try_next(&mut self) -> Poll<Result<Polled, String>> {
        self.broken = false;
        self.poll_events(&mut Context::from_waker(Waker::noop()))
    }

    /// The input's poll: waits for the next event. After a connection error this
    /// connects again.
    pub async fn next(&mut self) -> Result<Polled, String> {
        self.broken = false;
        std::future::poll_fn(|cx| self.poll_events(cx)).await
    }

    /// Keeps the connection going while the input waits for room in the router; never
    /// returns (the wait drops it). [`KEEP_UP_AFTER`] after the last poll it polls the
    /// event loop, so that acks and pings go out and the broker does not drop a client
    /// it stopped hearing from (after 1.5 x `keep_alive`, sending its unacknowledged
    /// window again); what arrives is held for the input, in order, up to
    /// [`MAX_HELD_BYTES`]. It stops polling at that bound and at a broken connection
    /// (reconnecting is the input's part, after its backoff).
    pub async fn keep_up(&mut self) -> Infallible {
        tokio::time::sleep_until(self.polled_at + KEEP_UP_AFTER).await;
        loop {
            if self.broken || self.held_bytes >= MAX_HELD_BYTES {
                return std::future::pending().await;
            }
            let polled = std::future::poll_fn(|cx| self.poll_events(cx)).await;
            match polled {
                // Acks and pings going out, a ping's answer: nothing for the input.
                Ok(Polled::Other) => {}
                Ok(Polled::Publish(p)) => {
                    self.held_bytes += p.size();
                    self.held.push_back(Ok(Polled::Publish(p)));
                }
                other => self.held.push_back(other),
            }
        }
    }

    /// The last poll ended in a connection error, and nothing polled since (the next
    /// poll would connect again).
    pub fn broken(&self) -> bool {
        self.broken
    }

    /// Forgets a broken connection's state (see `Events::clean`); only between polls.
    pub fn clean(&mut self) {
        if let Some(events) = &mut self.events {
            events.clean();
        }
    }

    /// Takes what `keep_up` read and the input will not take (it stops).
    pub fn drain_held(&mut self) -> impl Iterator<Item = Result<Polled, String>> + '_ {
        self.held_bytes = 0;
        self.held.drain(..)
    }
}
