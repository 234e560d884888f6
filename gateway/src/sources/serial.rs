//! The serial input: one device on a UART or USB serial adapter.
//!
//! Framings:
//! - `firmware-bridge` (crate `firmware-bridge`): COBS frames with a CRC. `Hello` names the
//!   device and its boot; each `Reading` becomes an event with id `device:boot:seq`; the
//!   gateway answers `TimeSync` after every `Hello` and periodically, and acknowledges
//!   readings cumulatively (`Ack { boot, up_to }`) once they are safe under the ack policy,
//!   through the same [`AckQueue`] as MQTT. Readings leave in `seq` order: those that
//!   arrive after a lost frame are held back ([`Track`]) until it is filled, so the
//!   cumulative ack never covers a reading the gateway did not take. A gap is asked for at
//!   once (`Resend`), and the oldest one again every 100 ms while readings keep coming; a
//!   device that hears nothing resends everything unacknowledged after its timeout,
//!   `Hello` first, whose `resume_from` also says which missing readings it gave up. Resends of readings already taken are
//!   dropped as `duplicate` and acknowledged again. A reading that passes its CRC but
//!   does not decode (a newer firmware's value) is taken by its `seq` alone and
//!   dead-lettered in its turn (`malformed_reading`), so its ack does not stop there.
//! - `json-lines`: one JSON object per line, mapped like an MQTT payload; nothing is
//!   acknowledged (the line has no way back).
//! - `nmea`: NMEA 0183 from a GPS receiver; position fixes become location events
//!   ([`super::nmea`]).
//!
//! The port is opened by path (a `/dev/serial/by-id/...` link survives replugs). When it
//! fails (unplugged: EIO or end of file) the input counts a reconnect and tries again with
//! backoff; nothing polls in between. No byte for `silence_timeout` sets
//! `gateway_input_silent` and logs once.

use compact_str::CompactString;
use std::collections::BTreeMap;
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::Duration;

use firmware_bridge::{
    Decoder, DeviceMessage, FrameError, GatewayMessage, Hello, Level, Reading, Timestamp, MAX_FRAME,
};
use gateway_config::{AckPolicy, FlowControl, Parity, PayloadFormat, SerialFraming, SerialInput};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::sync::{mpsc, watch};
use tokio::time::Instant;
use tokio_serial::SerialPortBuilderExt;

use super::payload::{self, location, Origin};
use super::{jittered, sleep_unless_stopped, Closed, Emitter, SourceContext, SourceState};
use crate::ack::{Ack, AckQueue};
use crate::event::{now_ns, ClockQuality, Event, Value};
use crate::metrics::InputMetrics;

/// Runs one serial input until `state` turns [`SourceState::Stop`]. Port errors are
/// retried forever.
pub async fn run(
    cfg: SerialInput,
    ctx: SourceContext,
    mut state: watch::Receiver<SourceState>,
) -> Result<(), String> {
    let m = ctx.metrics.input(&cfg.name);
    let until_delivered = cfg.ack_policy == AckPolicy::OnDelivery;
    let emit = Emitter::new(&ctx, &m, until_delivered).stopped_by(state.clone());
    let mut delay = cfg.reconnect.min;
    let mut failures: u64 = 0;
    // Device, boot, and the seq above every reading the last session took in.
    let mut before: Option<(String, u32, u64)> = None;
    tracing::info!(input = %cfg.name, path = %cfg.path.display(), framing = ?cfg.framing, "serial input starting");
    loop {
        let now = *state.borrow();
        match now {
            SourceState::Stop => break,
            // Between sessions nothing is held.
            SourceState::Quiesce => {
                let _ = emit.settle().await;
            }
            SourceState::Run => {}
        }
        match open(&cfg) {
            Ok(port) => {
                failures = 0;
                delay = cfg.reconnect.min;
                m.connected.set(1);
                tracing::info!(input = %cfg.name, path = %cfg.path.display(), "serial port open");
                let session = Session::new(&cfg, &emit, &m, before.clone());
                let track = session.track.clone();
                let end = session.run(port, &mut state).await;
                // What the device's readings reached, for the next session: the device
                // resends what was not acknowledged, and those repeats are redeliveries.
                let reached = {
                    let t = track.lock().unwrap_or_else(|p| p.into_inner());
                    let seen = t.max_seen.map_or(u64::from(t.next), |m| u64::from(m) + 1);
                    t.device
                        .clone()
                        .map(|(d, b)| (d, b, seen.max(u64::from(t.next))))
                };
                // A session that ended early (after the Hello, before the resends) must
                // not lower the bound for the same boot.
                before = match (before.take(), reached) {
                    (Some(b), Some(r)) if b.0 == r.0 && b.1 == r.1 => {
                        Some((r.0, r.1, b.2.max(r.2)))
                    }
                    (b, None) => b,
                    (_, r) => r,
                };
                m.connected.set(0);
                m.silent.set(0);
                match end {
                    End::Stop => break,
                    End::Closed => return Ok(()),
                    End::Lost(e) => {
                        m.reconnects.inc();
                        tracing::warn!(input = %cfg.name, error = %e, "serial port lost");
                    }
                }
            }
            Err(e) => {
                failures += 1;
                if failures == 1 || failures % 100 == 0 {
                    tracing::warn!(input = %cfg.name, path = %cfg.path.display(), error = %e, attempts = failures, "cannot open the serial port; retrying");
                }
            }
        }
        if !sleep_unless_stopped(jittered(delay), &mut state).await {
            break;
        }
        delay = delay.saturating_mul(2).min(cfg.reconnect.max);
    }
    tracing::info!(input = %cfg.name, "serial input stopped");
    Ok(())
}

fn open(cfg: &SerialInput) -> Result<tokio_serial::SerialStream, tokio_serial::Error> {
    use tokio_serial::{DataBits, StopBits};
    let data_bits = match cfg.data_bits {
        5 => DataBits::Five,
        6 => DataBits::Six,
        7 => DataBits::Seven,
        _ => DataBits::Eight,
    };
    let parity = match cfg.parity {
        Parity::None => tokio_serial::Parity::None,
        Parity::Odd => tokio_serial::Parity::Odd,
        Parity::Even => tokio_serial::Parity::Even,
    };
    let flow = match cfg.flow_control {
        FlowControl::None => tokio_serial::FlowControl::None,
        FlowControl::Software => tokio_serial::FlowControl::Software,
        FlowControl::Hardware => tokio_serial::FlowControl::Hardware,
    };
    let stop = if cfg.stop_bits == 2 {
        StopBits::Two
    } else {
        StopBits::One
    };
    tokio_serial::new(cfg.path.to_string_lossy(), cfg.baud)
        .data_bits(data_bits)
        .parity(parity)
        .stop_bits(stop)
        .flow_control(flow)
        .open_native_async()
}

/// How a session ended.
enum End {
    /// Asked to stop.
    Stop,
    /// The router is gone.
    Closed,
    /// The port failed (unplugged).
    Lost(String),
}

/// The session's ack queue; each item is (track generation, boot, seq).
type Acks = Arc<AckQueue<(u64, u32, u32)>>;

/// How often the oldest gap is asked for again while readings keep arriving.
const RESEND_AGAIN: Duration = Duration::from_millis(100);

/// Most readings held back behind a gap (waiting for the missing one) per device; more
/// are refused as `out_of_sequence` until the gap is filled.
const MAX_AHEAD: usize = 1024;

/// What the gateway knows of the device on the port (firmware-bridge): which reading it
/// forwards next, and the readings that arrived ahead of a gap, held back so that a
/// device's readings leave in `seq` order.
#[derive(Debug, Default)]
pub(crate) struct Track {
    /// Device id and boot from the last `Hello`; `None` before one.
    device: Option<(String, u32)>,
    /// The next `seq` to forward; every one below it was forwarded (or the device gave it
    /// up).
    next: u32,
    /// Readings above `next`, held until the gap before them is filled.
    ahead: BTreeMap<u32, (Reading, i64)>,
    /// The highest `seq` seen this boot.
    max_seen: Option<u32>,
    /// The last cumulative ack sent for this boot.
    acked: Option<u32>,
    /// `seq` `u32::MAX` was forwarded, so `next` cannot go past it: every reading of this
    /// boot is a duplicate now (a device never wraps `seq` within a boot).
    past_max: bool,
    /// Changes with every new device or boot, so that acks released for readings of
    /// an earlier one (still in the pipeline) are never sent to this one.
    generation: u64,
    /// The bytes of readings this version could not decode, by `seq`, from when they are
    /// taken (in place of each, a reading without values holds its `seq`) until they are
    /// forwarded (dead-lettered and acknowledged, not turned into events).
    undecodable: BTreeMap<u32, Vec<u8>>,
}

/// What to do with one reading.
#[derive(Debug, PartialEq)]
pub(crate) enum Take {
    /// Forward these readings (with their receipt times), in order; ask the device again
    /// for `resend` (`from`, `count`) if set.
    Forward {
        /// Readings now in order.
        ready: Vec<(Reading, i64)>,
        /// Readings the device skipped over, to ask for at once.
        resend: Option<(u32, u16)>,
    },
    /// Forwarded before; repeat the ack, if one was sent.
    Duplicate(Option<u32>),
    /// Too far ahead of a gap.
    OutOfSequence,
    /// No `Hello` yet.
    NoHello,
    /// A reading of another boot than the last `Hello`'s (protocol version 2 says which):
    /// the device rebooted and its `Hello` was lost. Refused unacknowledged; the device
    /// sends `Hello` and the reading again when no ack comes.
    OtherBoot(u32),
}

/// A device's boot, ended by a `Hello` of another boot or device.
#[derive(Debug, PartialEq)]
pub(crate) struct Ended {
    /// Its device id and boot.
    pub(crate) device: (String, u32),
    /// Readings that had arrived behind a gap: the device no longer has what is missing
    /// (unacknowledged readings do not survive its reboot), so they go on now, in order.
    pub(crate) held: Vec<(Reading, i64)>,
    /// Readings in the gaps before them, never received.
    pub(crate) missing: u32,
}

impl Track {
    /// A `Hello`: a new boot starts from `resume_from` (the device's oldest unacknowledged
    /// reading); the same boot again (a reconnect, or a resend after a silent gateway)
    /// keeps its place. Returns what is now ready to forward (readings held behind a gap
    /// the device gave up), the ack to repeat, and how many readings the device gave up
    /// that never arrived.
    pub(crate) fn hello(
        &mut self,
        id: &str,
        boot: u32,
        resume_from: u32,
    ) -> (Vec<(Reading, i64)>, Option<u32>, u32) {
        let same = self
            .device
            .as_ref()
            .is_some_and(|(d, b)| d == id && *b == boot);
        if !same {
            *self = Track {
                device: Some((id.to_string(), boot)),
                next: resume_from,
                generation: self.generation + 1,
                ..Track::default()
            };
            return (Vec::new(), None, 0);
        }
        let mut lost = 0;
        let mut ready = Vec::new();
        if resume_from > self.next {
            // The device no longer has these (its buffer overflowed while we waited):
            // forward what did arrive, in order, and stop waiting for the rest.
            let later = self.ahead.split_off(&resume_from);
            let held = std::mem::replace(&mut self.ahead, later);
            lost = resume_from - self.next - held.len() as u32;
            ready.extend(held.into_values());
            self.next = resume_from;
        }
        ready.extend(self.drain());
        (ready, self.acked, lost)
    }

    /// Ends the current boot if a `Hello` from `id` and `boot` starts another one; returns
    /// what it still held. Call before [`Track::hello`].
    pub(crate) fn end_boot(&mut self, id: &str, boot: u32) -> Option<Ended> {
        let (d, b) = self.device.as_ref()?;
        if d == id && *b == boot {
            return None;
        }
        let held: Vec<_> = std::mem::take(&mut self.ahead).into_values().collect();
        // Every held seq is above `next` and below or at the last: `last - next + 1`
        // seqs, of which `held.len()` arrived.
        let missing = held
            .last()
            .map_or(0, |(r, _)| (r.seq - self.next) - (held.len() as u32 - 1));
        Some(Ended {
            device: (d.clone(), *b),
            held,
            missing,
        })
    }

    /// Takes reading `r` that arrived at `received_ns`.
    pub(crate) fn take(&mut self, r: Reading, received_ns: i64) -> Take {
        let Some((_, boot)) = &self.device else {
            return Take::NoHello;
        };
        if let Some(b) = r.boot.filter(|b| b != boot) {
            return Take::OtherBoot(b);
        }
        let seq = r.seq;
        if seq < self.next || self.past_max || self.ahead.contains_key(&seq) {
            return Take::Duplicate(self.acked);
        }
        if seq > self.next && self.ahead.len() >= MAX_AHEAD {
            return Take::OutOfSequence;
        }
        // After a Hello that skipped ahead, nothing below `next` is asked for again.
        let expected = self
            .max_seen
            .map_or(self.next, |m| m.saturating_add(1))
            .max(self.next);
        self.max_seen = Some(self.max_seen.map_or(seq, |m| m.max(seq)));
        let resend =
            (seq > expected).then(|| (expected, u16::try_from(seq - expected).unwrap_or(u16::MAX)));
        self.ahead.insert(seq, (r, received_ns));
        Take::Forward {
            ready: self.drain(),
            resend,
        }
    }

    /// The missing readings that hold the others back, if any.
    pub(crate) fn gap(&self) -> Option<(u32, u16)> {
        let first = *self.ahead.keys().next()?;
        Some((
            self.next,
            u16::try_from(first - self.next).unwrap_or(u16::MAX),
        ))
    }

    /// Records an ack for readings of generation `generation`; false (nothing to send)
    /// when they belong to an earlier device or boot.
    pub(crate) fn acked(&mut self, generation: u64, up_to: u32) -> bool {
        if generation != self.generation || self.device.is_none() {
            return false;
        }
        self.acked = Some(self.acked.map_or(up_to, |a| a.max(up_to)));
        true
    }

    /// The current generation (see [`Track::acked`]).
    pub(crate) fn generation(&self) -> u64 {
        self.generation
    }

    /// Readings from `next` on that are all there.
    fn drain(&mut self) -> Vec<(Reading, i64)> {
        let mut out = Vec::new();
        while let Some(r) = self.ahead.remove(&self.next) {
            out.push(r);
            match self.next.checked_add(1) {
                Some(n) => self.next = n,
                None => {
                    self.past_max = true;
                    break;
                }
            }
        }
        out
    }

    fn device(&self) -> Option<(&str, u32)> {
        self.device.as_ref().map(|(d, b)| (d.as_str(), *b))
    }
}

/// A frame of a read: a message, or why there is none.
type Frame = Result<DeviceMessage, Undecodable>;

/// Why a frame gave no message.
enum Undecodable {
    /// A `Reading` that passed its CRC but does not decode: known by its `seq`, with its
    /// message bytes (see [`firmware_bridge::reading_seq`]).
    Reading { seq: u32, bytes: Vec<u8> },
    /// Anything else (corrupt, unknown type, a message other than a reading that does
    /// not decode).
    Frame(FrameError),
}

/// Whether a protocol version 2 reading's bytes end with `boot`, its last field (a
/// varint; `Reading` writes it only when there is one). A boot whose varint ends with
/// the same bytes (128 and 1) passes: this tells boots apart, it does not prove one.
fn ends_with_boot(bytes: &[u8], boot: u32) -> bool {
    let mut tail = [0u8; 5];
    postcard::to_slice(&boot, &mut tail).is_ok_and(|varint| bytes.ends_with(varint))
}

/// The frames that end in `bytes`, decoded.
fn read_frames(decoder: &mut Decoder, bytes: &[u8]) -> Vec<Frame> {
    let mut frames = Vec::new();
    for &b in bytes {
        let Some(checked) = decoder.push_checked(b) else {
            continue;
        };
        frames.push(match checked {
            Err(e) => Err(Undecodable::Frame(e)),
            Ok(body) => firmware_bridge::decode_message(body).map_err(|e| {
                match (e, firmware_bridge::reading_seq(body)) {
                    (FrameError::Malformed, Some(seq)) => Undecodable::Reading {
                        seq,
                        bytes: body.to_vec(),
                    },
                    (e, _) => Undecodable::Frame(e),
                }
            }),
        });
    }
    frames
}

/// One open port.
struct Session<'a> {
    cfg: &'a SerialInput,
    emit: &'a Emitter<'a>,
    m: &'a InputMetrics,
    origin: String,
    /// Decodes `json-lines` lines.
    decoder: payload::Decoder,
    track: Arc<Mutex<Track>>,
    no_hello_seen: u64,
    /// The last boot whose readings came before its `Hello` (logged once per boot).
    other_boot_seen: Option<u32>,
    /// The protocol version of the last `Hello`.
    protocol: Option<u16>,
    /// "An undecodable reading of another boot" was logged (once a session).
    undecodable_other_boot_logged: bool,
    /// The last `Resend` asked for the oldest gap, and when.
    asked: Option<(u32, Instant)>,
    /// What the previous session of this port took in: device, boot, and the seq above
    /// every reading it forwarded or held. A reading below it that comes again (the
    /// device resends what it has no ack for) is marked [`crate::event::Event::redelivered`], so that
    /// `dedup` does not drop it and release its ack before its first copy is safe.
    before: Option<(String, u32, u64)>,
}

impl<'a> Session<'a> {
    fn new(
        cfg: &'a SerialInput,
        emit: &'a Emitter<'a>,
        m: &'a InputMetrics,
        before: Option<(String, u32, u64)>,
    ) -> Self {
        Session {
            cfg,
            emit,
            m,
            origin: cfg.path.display().to_string(),
            decoder: payload::Decoder::new(PayloadFormat::Json, &cfg.json),
            track: Arc::new(Mutex::new(Track::default())),
            no_hello_seen: 0,
            other_boot_seen: None,
            protocol: None,
            undecodable_other_boot_logged: false,
            asked: None,
            before,
        }
    }

    async fn run(
        mut self,
        port: tokio_serial::SerialStream,
        state: &mut watch::Receiver<SourceState>,
    ) -> End {
        let (mut rd, mut wr) = tokio::io::split(port);
        let (bell, mut rung) = mpsc::channel::<()>(1);
        let out = Out {
            outbox: Arc::new(Mutex::new(Outbox::default())),
            bell,
        };
        // A write that fails ends the session (the port is opened again): reading on
        // while no ack, resend or time sync reaches the device would leave it resending
        // for good.
        let (write_failed_tx, mut write_failed) = tokio::sync::oneshot::channel::<String>();
        let mut write_checked = false;
        let writer = {
            let outbox = out.outbox.clone();
            tokio::spawn(async move {
                let mut buf = [0u8; MAX_FRAME];
                let mut written = None;
                // Ends once every `Out` is gone (the session's and the ack queue's).
                while rung.recv().await.is_some() {
                    let due = std::mem::take(&mut *lock_outbox(&outbox)).messages(&mut written);
                    for msg in due {
                        let Ok(n) = firmware_bridge::encode(&msg, &mut buf) else {
                            continue;
                        };
                        if let Err(e) = wr.write_all(&buf[..n]).await {
                            let _ = write_failed_tx.send(e.to_string());
                            return;
                        }
                    }
                }
            })
        };
        // Readings are forwarded in `seq` order, so the queue releases them in order and
        // each release is a cumulative ack.
        let acks = {
            let out = out.clone();
            let track = self.track.clone();
            let acked = self.m.acks.clone();
            AckQueue::new(move |(generation, boot, up_to): (u64, u32, u32)| {
                if lock(&track).acked(generation, up_to) {
                    acked.inc();
                    out.ack(generation, boot, up_to);
                }
            })
        };
        let bridge = self.cfg.framing == SerialFraming::FirmwareBridge;
        let mut decoder = Decoder::new();
        let mut line: Vec<u8> = Vec::new();
        let mut line_too_long = false;
        let mut buf = [0u8; 4096];
        let silence = self.cfg.silence_timeout;
        let mut silent_at = Instant::now() + silence;
        let mut sync = tokio::time::interval(self.cfg.time_sync_interval);
        let mut quiescing = *state.borrow() != SourceState::Run;
        if quiescing {
            let _ = self.emit.settle().await;
        }
        let end = loop {
            tokio::select! {
                changed = state.changed() => {
                    if changed.is_err() || *state.borrow() == SourceState::Stop {
                        break End::Stop;
                    }
                    // Quiescing: read nothing more (the device keeps it); acks still go
                    // out. Every read was handed over before this select waited again.
                    quiescing = *state.borrow() != SourceState::Run;
                    if quiescing && self.emit.settle().await.is_err() {
                        break End::Closed;
                    }
                }
                read = rd.read(&mut buf), if !quiescing => {
                    let n = match read {
                        Ok(0) => break End::Lost("end of file".into()),
                        Ok(n) => n,
                        Err(e) => break End::Lost(e.to_string()),
                    };
                    silent_at = Instant::now() + silence;
                    if self.m.silent.get() == 1 {
                        self.m.silent.set(0);
                        tracing::info!(input = %self.cfg.name, "the serial device is heard again");
                    }
                    let received_ns = now_ns();
                    let r = if bridge {
                        let frames = read_frames(&mut decoder, &buf[..n]);
                        self.frames(frames, &acks, &out, received_ns).await
                    } else {
                        let mut lines = Vec::new();
                        for &b in &buf[..n] {
                            if b == b'\n' {
                                if std::mem::take(&mut line_too_long) {
                                    lines.push(Err(line.len()));
                                } else {
                                    lines.push(Ok(std::mem::take(&mut line)));
                                }
                                line.clear();
                            } else if line.len() >= self.cfg.max_line {
                                line_too_long = true;
                            } else {
                                line.push(b);
                            }
                        }
                        self.lines(lines, received_ns).await
                    };
                    // What this read yielded goes to the router before the next wait.
                    if r.is_err() || self.emit.flush().await.is_err() {
                        break End::Closed;
                    }
                }
                _ = tokio::time::sleep_until(silent_at), if !quiescing => {
                    if self.m.silent.get() == 0 {
                        self.m.silent.set(1);
                        tracing::warn!(input = %self.cfg.name, silent_for = ?silence, "the serial device is silent");
                    }
                    silent_at = Instant::now() + silence;
                }
                _ = sync.tick(), if bridge => out.time_sync(),
                failed = &mut write_failed, if !write_checked => {
                    write_checked = true;
                    if let Ok(e) = failed {
                        break End::Lost(format!("write: {e}"));
                    }
                }
            }
        };
        // A line cut off by a lost port goes through the decoder like any other (it is
        // counted: decoded, or malformed), not dropped unseen.
        // Only when the port was lost: at a reload (`Stop`) the port reopens and the rest
        // of the line comes, which would make it two malformed lines.
        if !bridge && matches!(end, End::Lost(_)) && (line_too_long || !line.is_empty()) {
            let last = if line_too_long {
                Err(line.len())
            } else {
                Ok(std::mem::take(&mut line))
            };
            let _ = self.lines(vec![last], now_ns()).await;
        }
        // Readings held behind a gap: a device that still has them resends them, but one
        // that lost power with its cable (USB-powered) does not. They go on now, without
        // acks (an ack would also cover the missing ones), instead of vanishing uncounted.
        if matches!(end, End::Lost(_)) {
            let device = lock(&self.track).device.clone();
            let held: Vec<_> = std::mem::take(&mut lock(&self.track).ahead)
                .into_values()
                .collect();
            if let (Some((id, boot)), false) = (device, held.is_empty()) {
                tracing::warn!(input = %self.cfg.name, device = %id, boot, readings = held.len(), "the port was lost: forwarding the readings that waited behind a gap");
                let _ = self.forward(held, &id, boot, None).await;
            }
        }
        // Hand over what was taken in (if the router is gone, dropping the unsent `Batch`
        // keeps it unacknowledged), then let released acks reach the device before the port closes.
        let _ = self.emit.flush().await;
        drop(acks);
        drop(out);
        // Tokens still in the pipeline keep the ack queue (and a sender) alive: stop the
        // writer so the port closes now and can be opened again (ports are exclusive).
        let abort = writer.abort_handle();
        let _ = tokio::time::timeout(Duration::from_millis(500), writer).await;
        abort.abort();
        end
    }

    /// Handles the firmware-bridge frames of one read.
    async fn frames(
        &mut self,
        frames: Vec<Frame>,
        acks: &Acks,
        out: &Out,
        received_ns: i64,
    ) -> Result<(), Closed> {
        for f in frames {
            match f {
                Ok(DeviceMessage::Hello(h)) => self.hello(h, acks, out).await?,
                Ok(DeviceMessage::Reading(r)) => {
                    self.reading(r, None, acks, out, received_ns).await?
                }
                Err(Undecodable::Reading { seq, bytes }) => {
                    // Known by its seq alone: it takes its place in the order and its
                    // ack moves on past it, or the device would send it for good and
                    // hold back every reading after it. A version 2 reading ends with
                    // its boot: one of another boot than the last Hello's (a reboot
                    // whose Hello was lost) waits for the device to introduce itself,
                    // as a reading that decodes would (`unknown_boot`).
                    let boot = lock(&self.track).device().map(|(_, b)| b);
                    if let (Some(2), Some(boot)) = (self.protocol, boot) {
                        if !ends_with_boot(&bytes, boot) {
                            self.m.received.inc();
                            self.m.dropped("unknown_boot", 1);
                            if !self.undecodable_other_boot_logged {
                                self.undecodable_other_boot_logged = true;
                                tracing::warn!(input = %self.cfg.name, seq, "an undecodable reading of another boot than the last Hello's (the device rebooted); waiting for it to introduce itself");
                            }
                            continue;
                        }
                    }
                    let placeholder = Reading {
                        seq,
                        time: Timestamp::UptimeMs(0),
                        fix: None,
                        channels: heapless::Vec::new(),
                        boot: None,
                    };
                    self.reading(placeholder, Some(bytes), acks, out, received_ns)
                        .await?
                }
                Ok(DeviceMessage::Heartbeat(h)) => {
                    tracing::debug!(input = %self.cfg.name, uptime_ms = h.uptime_ms, unacked = h.unacked, "heartbeat");
                }
                Ok(DeviceMessage::Log(l) | DeviceMessage::Error(l)) => {
                    let device = lock(&self.track)
                        .device()
                        .map_or_else(|| "?".to_string(), |(d, _)| d.to_string());
                    let device = device.as_str();
                    let (input, code, text) = (&self.cfg.name, l.code, l.text.as_str());
                    match l.level {
                        Level::Error => {
                            tracing::error!(input = %input, device, code, "device: {text}")
                        }
                        Level::Warn => {
                            tracing::warn!(input = %input, device, code, "device: {text}")
                        }
                        Level::Info => {
                            tracing::info!(input = %input, device, code, "device: {text}")
                        }
                        Level::Debug => {
                            tracing::debug!(input = %input, device, code, "device: {text}")
                        }
                    }
                }
                Err(Undecodable::Frame(FrameError::UnknownType(t))) => {
                    self.m.received.inc();
                    self.m.dropped("unknown_message", 1);
                    tracing::debug!(input = %self.cfg.name, message_type = t, "skipped a message type this version does not know");
                }
                Err(Undecodable::Frame(e)) => {
                    // A lost reading is resent by the device (it was not acknowledged).
                    self.m.received.inc();
                    self.m.dropped("corrupt_frame", 1);
                    tracing::debug!(input = %self.cfg.name, error = %e, "dropped a frame");
                }
            }
        }
        Ok(())
    }

    async fn hello(&mut self, h: Hello, acks: &Acks, out: &Out) -> Result<(), Closed> {
        self.protocol = Some(h.protocol);
        tracing::info!(input = %self.cfg.name, device = %h.device_id, boot = h.boot, resume_from = h.resume_from, firmware = %h.firmware, protocol = h.protocol, "device hello");
        let ended = lock(&self.track).end_boot(&h.device_id, h.boot);
        if let Some(Ended {
            device: (id, boot),
            held,
            missing,
        }) = ended.filter(|e| !e.held.is_empty())
        {
            // Never acknowledged: an ack up to the last of them would also cover the
            // missing ones, and the port may now hold another device whose boot number
            // happens to be the same.
            tracing::warn!(input = %self.cfg.name, device = %id, boot, readings = held.len(), missing, "a new boot: forwarding the previous boot's readings that waited behind a gap; the device no longer has the missing ones");
            self.m.device_lost.inc_by(u64::from(missing));
            self.forward(held, &id, boot, None).await?;
        }
        let (ready, ack, lost) = lock(&self.track).hello(&h.device_id, h.boot, h.resume_from);
        if lost > 0 {
            tracing::warn!(input = %self.cfg.name, device = %h.device_id, readings = lost, "the device dropped readings it could not keep until acknowledged");
            self.m.device_lost.inc_by(u64::from(lost));
        }
        out.time_sync();
        if let Some(up_to) = ack {
            out.ack(lock(&self.track).generation(), h.boot, up_to);
        }
        self.forward(ready, h.device_id.as_str(), h.boot, Some((acks, out)))
            .await
    }

    /// Takes a reading; `undecodable` holds the bytes of one this version could not
    /// decode (`r` then holds only its seq).
    async fn reading(
        &mut self,
        r: Reading,
        undecodable: Option<Vec<u8>>,
        acks: &Acks,
        out: &Out,
        received_ns: i64,
    ) -> Result<(), Closed> {
        let (take, device, gap) = {
            let mut t = lock(&self.track);
            let seq = r.seq;
            let take = t.take(r, received_ns);
            if let (Take::Forward { .. }, Some(bytes)) = (&take, undecodable) {
                t.undecodable.insert(seq, bytes);
            }
            (take, t.device().map(|(d, b)| (d.to_string(), b)), t.gap())
        };
        let (ready, resend, (id, boot)) = match (take, device) {
            (Take::Forward { ready, resend }, Some(d)) => (ready, resend, d),
            (Take::Duplicate(ack), Some((_, boot))) => {
                self.m.received.inc();
                self.m.dropped("duplicate", 1);
                if let Some(up_to) = ack {
                    out.ack(lock(&self.track).generation(), boot, up_to);
                }
                return Ok(());
            }
            (Take::OutOfSequence, _) => {
                self.m.received.inc();
                self.m.dropped("out_of_sequence", 1);
                return Ok(());
            }
            (Take::OtherBoot(b), _) => {
                self.m.received.inc();
                self.m.dropped("unknown_boot", 1);
                if self.other_boot_seen != Some(b) {
                    self.other_boot_seen = Some(b);
                    tracing::warn!(input = %self.cfg.name, boot = b, "readings of a boot whose Hello was not received (the device rebooted); waiting for it to introduce itself");
                }
                return Ok(());
            }
            _ => {
                // Unknown device (the gateway started while it was mid-stream): it sends
                // Hello before it resends, and the readings come again.
                self.m.received.inc();
                self.m.dropped("no_hello", 1);
                self.no_hello_seen += 1;
                if self.no_hello_seen == 1 {
                    tracing::warn!(input = %self.cfg.name, "readings before a Hello; waiting for the device to introduce itself");
                }
                return Ok(());
            }
        };
        // Ask again for what is missing: a new gap at once, the oldest one (what holds
        // the rest back) again every RESEND_AGAIN while readings keep coming.
        let now = Instant::now();
        if let Some((from, count)) = resend {
            out.resend(boot, from, count);
            if gap.is_some_and(|(f, _)| f == from) {
                self.asked = Some((from, now));
            }
        }
        // One request per reading: the outbox holds one, and the oldest gap's repeat
        // would replace the new gap's request before the writer took it.
        if let Some((from, count)) = gap.filter(|_| resend.is_none()) {
            let due = match self.asked {
                Some((f, at)) => f != from || now.duration_since(at) >= RESEND_AGAIN,
                None => true,
            };
            if due {
                self.asked = Some((from, now));
                out.resend(boot, from, count);
            }
        }
        self.forward(ready, &id, boot, Some((acks, out))).await
    }

    /// Turns readings now in order into events and sends them on; `ack_to` is where
    /// their acks go (`None`: not acknowledged).
    async fn forward(
        &self,
        ready: Vec<(Reading, i64)>,
        id: &str,
        boot: u32,
        ack_to: Option<(&Acks, &Out)>,
    ) -> Result<(), Closed> {
        for (r, received_ns) in ready {
            let ack = match ack_to {
                Some((acks, out)) => self.ack(acks, out, boot, r.seq),
                None => Ack::none(),
            };
            let undecodable = {
                let mut t = lock(&self.track);
                (!t.undecodable.is_empty())
                    .then(|| t.undecodable.remove(&r.seq))
                    .flatten()
            };
            if let Some(bytes) = undecodable {
                let bad = super::payload::Malformed {
                    reason: "malformed_reading",
                    detail: format!(
                        "reading {} of boot {boot} passed its CRC but does not decode (a value of a newer firmware?); acknowledged, its bytes go to the dead-letter topic if one is set",
                        r.seq
                    ),
                };
                self.emit
                    .malformed(bad, &self.origin, received_ns, &bytes, ack)
                    .await?;
                continue;
            }
            // A NaN or infinite value (a sensor fault) has no JSON form: the reading goes
            // on without it, counted.
            let not_finite = r.channels.iter().filter(|c| !c.value.is_finite()).count();
            if not_finite > 0 {
                self.m.values_skipped("not_finite", not_finite as u64);
            }
            match reading_event(self.cfg, id, boot, &r, &self.origin, received_ns) {
                Ok(mut event) => {
                    event.redelivered = self.before.as_ref().is_some_and(|(d, b, above)| {
                        d == id && *b == boot && u64::from(r.seq) < *above
                    });
                    self.emit.events([event], &ack).await?
                }
                Err(bad) => {
                    // The device forgets it once acknowledged: keep its bytes.
                    let raw = postcard::to_allocvec(&r).unwrap_or_default();
                    self.emit
                        .malformed(bad, &self.origin, received_ns, &raw, ack)
                        .await?
                }
            }
        }
        Ok(())
    }

    /// The acknowledgement share for reading `seq` under the ack policy.
    fn ack(&self, acks: &Acks, out: &Out, boot: u32, seq: u32) -> Ack {
        let generation = lock(&self.track).generation();
        if self.cfg.ack_policy == AckPolicy::OnReceive {
            if lock(&self.track).acked(generation, seq) {
                self.m.acks.inc();
                out.ack(generation, boot, seq);
            }
            Ack::none()
        } else {
            acks.push((generation, boot, seq))
        }
    }

    /// Handles the complete lines of one read (`json-lines`, `nmea`); `Err(len)` is a
    /// line that was too long.
    async fn lines(
        &self,
        lines: Vec<Result<Vec<u8>, usize>>,
        received_ns: i64,
    ) -> Result<(), Closed> {
        let captures: Vec<(&str, &str)> = self
            .cfg
            .device
            .as_deref()
            .map(|d| vec![("device", d)])
            .unwrap_or_default();
        let mut origin = Origin {
            source: &self.cfg.name,
            topic: &self.origin,
            captures: &captures,
            received_ns,
        };
        for (i, l) in lines.into_iter().enumerate() {
            // The lines of one read get receipt times a nanosecond apart: a line without
            // its own time has its receipt time in its id, and two equal lines (the same
            // value read twice) must not share one.
            let received_ns = received_ns.saturating_add(i as i64);
            origin.received_ns = received_ns;
            let l = match l {
                Ok(l) => l,
                Err(len) => {
                    let bad = super::payload::Malformed {
                        reason: "too_large",
                        detail: format!("a line of more than {len} bytes (max_line)"),
                    };
                    self.emit
                        .malformed(bad, &self.origin, received_ns, &[], Ack::none())
                        .await?;
                    continue;
                }
            };
            let text = l.strip_suffix(b"\r").unwrap_or(&l);
            if text.iter().all(u8::is_ascii_whitespace) {
                continue;
            }
            let decoded = if self.cfg.framing == SerialFraming::Nmea {
                let device = self.cfg.device.as_deref().unwrap_or("gps");
                std::str::from_utf8(text)
                    .map_err(|_| super::payload::Malformed {
                        reason: "malformed_nmea",
                        detail: "not ASCII".into(),
                    })
                    .and_then(|line| super::nmea::decode(&origin, device, line.trim()))
                    .map(|e| smallvec::smallvec![e])
            } else {
                self.decoder.decode(&origin, text)
            };
            match decoded {
                Ok(events) => self.emit.events(events, &Ack::none()).await?,
                Err(bad) if matches!(bad.reason, "unsupported_sentence" | "no_fix") => {
                    self.emit.ignored(bad.reason);
                }
                Err(bad) => {
                    self.emit
                        .malformed(bad, &self.origin, received_ns, text, Ack::none())
                        .await?
                }
            }
        }
        Ok(())
    }
}

/// What the gateway has yet to tell the device, for the port's writer.
///
/// Bounded by construction, where a queue of messages grew with every frame received
/// while the port could not be written (hardware flow control holding it): acks are
/// cumulative, so the highest stands for the rest; a time sync is written with the time
/// of writing; a resend request replaces the one before (the gateway asks for what holds
/// the others back).
#[derive(Default)]
struct Outbox {
    /// `(generation, boot, up_to)`: the generation is the [`Track`]'s, which changes with
    /// the device or its boot.
    ack: Option<(u64, u32, u32)>,
    time_sync: bool,
    /// `(boot, from, count)`.
    resend: Option<(u32, u32, u16)>,
}

impl Outbox {
    fn ack(&mut self, generation: u64, boot: u32, up_to: u32) {
        match self.ack {
            Some((g, _, u)) if g == generation && u >= up_to => {}
            // A release checked against an older generation just before a new boot's
            // Hello must not replace the new boot's pending ack.
            Some((g, _, _)) if g > generation => {}
            _ => self.ack = Some((generation, boot, up_to)),
        }
    }

    /// The messages to write, in order: time sync, ack, resend. `written` is the last
    /// ack written, `(generation, up_to)`: an ack below it for the same generation is
    /// left out (releases from different threads can arrive out of order, and a lower
    /// cumulative ack would make the device resend what is already safe). The same ack
    /// again is written again: that is how a device whose ack was lost on the line, and
    /// which sent its readings again, learns they are safe.
    fn messages(self, written: &mut Option<(u64, u32)>) -> Vec<GatewayMessage> {
        let mut due = Vec::with_capacity(3);
        if self.time_sync {
            due.push(time_sync());
        }
        if let Some((generation, boot, up_to)) = self.ack {
            if !matches!(*written, Some((g, u)) if g == generation && u > up_to) {
                *written = Some((generation, up_to));
                due.push(GatewayMessage::Ack { boot, up_to });
            }
        }
        if let Some((boot, from, count)) = self.resend {
            due.push(GatewayMessage::Resend { boot, from, count });
        }
        due
    }
}

/// A session's way to the port's writer: the [`Outbox`] and a bell that wakes the
/// writer (one ring pending is enough).
#[derive(Clone)]
struct Out {
    outbox: Arc<Mutex<Outbox>>,
    bell: mpsc::Sender<()>,
}

impl Out {
    fn ack(&self, generation: u64, boot: u32, up_to: u32) {
        lock_outbox(&self.outbox).ack(generation, boot, up_to);
        let _ = self.bell.try_send(());
    }

    fn time_sync(&self) {
        lock_outbox(&self.outbox).time_sync = true;
        let _ = self.bell.try_send(());
    }

    fn resend(&self, boot: u32, from: u32, count: u16) {
        lock_outbox(&self.outbox).resend = Some((boot, from, count));
        let _ = self.bell.try_send(());
    }
}

fn lock_outbox(o: &Mutex<Outbox>) -> MutexGuard<'_, Outbox> {
    o.lock().unwrap_or_else(|p| p.into_inner())
}

fn lock(t: &Mutex<Track>) -> MutexGuard<'_, Track> {
    t.lock().unwrap_or_else(|p| p.into_inner())
}

fn time_sync() -> GatewayMessage {
    GatewayMessage::TimeSync {
        unix_ms: u64::try_from(now_ns() / 1_000_000).unwrap_or(0),
    }
}

/// The event of one firmware-bridge reading.
fn reading_event(
    cfg: &SerialInput,
    device: &str,
    boot: u32,
    r: &Reading,
    origin: &str,
    received_ns: i64,
) -> Result<Event, super::payload::Malformed> {
    let (time_ns, clock) = match r.time {
        Timestamp::UnixMs(ms) => match i64::try_from(ms)
            .ok()
            .and_then(|ms| ms.checked_mul(1_000_000))
        {
            // A clock never set (before 2001), as for the other inputs.
            Some(ns) if ns < super::payload::UNSET_CLOCK_BEFORE_NS => {
                (received_ns, ClockQuality::Gateway)
            }
            Some(ns) => (ns, ClockQuality::Device),
            None => {
                return Err(super::payload::Malformed {
                    reason: "bad_time",
                    detail: format!("unix time {ms} ms is out of range"),
                })
            }
        },
        // No clock on the device: the gateway's, flagged.
        Timestamp::UptimeMs(_) => (received_ns, ClockQuality::Gateway),
    };
    let location = match r.fix {
        Some(f) if f.quality != firmware_bridge::FixQuality::None => location(
            Some(f64::from(f.lat_e7) / 1e7),
            Some(f64::from(f.lon_e7) / 1e7),
            f.alt_cm.map(|c| f64::from(c) / 100.0),
            f.accuracy_cm.map(|c| f64::from(c) / 100.0),
        )?,
        _ => None,
    };
    let readings = r
        .channels
        .iter()
        .filter(|c| c.value.is_finite())
        .map(|c| {
            let name = match cfg.channels.get(&c.id.to_string()) {
                Some(n) => CompactString::from(n.as_str()),
                None => compact_str::format_compact!("ch{}", c.id),
            };
            (name, Value::Number(f64::from(c.value)))
        })
        .collect();
    Ok(Event {
        id: compact_str::format_compact!("{device}:{boot}:{}", r.seq),
        device: device.into(),
        source: cfg.name.as_str().into(),
        origin: origin.into(),
        time_ns,
        clock,
        received_ns,
        location,
        readings,
        tags: Default::default(),
        route: None,
        redelivered: false,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_version_2_reading_ends_with_its_boot() {
        let reading = |boot| Reading {
            seq: 7,
            time: Timestamp::UnixMs(1_800_000_000_000),
            fix: None,
            channels: heapless::Vec::new(),
            boot: Some(boot),
        };
        for boot in [0, 1, 127, 128, 300_000, u32::MAX] {
            let bytes = postcard::to_allocvec(&reading(boot)).expect("postcard");
            assert!(ends_with_boot(&bytes, boot), "{boot}");
            assert!(!ends_with_boot(&bytes, boot.wrapping_add(1)), "{boot}");
            assert!(!ends_with_boot(&bytes, boot.wrapping_add(2)), "{boot}");
        }
    }

    fn r(seq: u32) -> Reading {
        Reading {
            seq,
            time: Timestamp::UptimeMs(u64::from(seq)),
            fix: None,
            channels: heapless::Vec::new(),
            boot: None,
        }
    }

    /// The seqs of a Forward.
    fn fwd(t: Take) -> (Vec<u32>, Option<(u32, u16)>) {
        match t {
            Take::Forward { ready, resend } => (ready.iter().map(|(r, _)| r.seq).collect(), resend),
            other => panic!("not forwarded: {other:?}"),
        }
    }

    #[test]
    fn readings_leave_in_order_and_gaps_are_asked_for() {
        let mut t = Track::default();
        assert_eq!(t.take(r(0), 0), Take::NoHello);
        assert_eq!(t.hello("d", 7, 10).0.len(), 0);
        assert_eq!(fwd(t.take(r(10), 0)), (vec![10], None));
        // 11 lost on the line: 12 and 13 wait, 11 is asked for.
        assert_eq!(fwd(t.take(r(12), 0)), (vec![], Some((11, 1))));
        assert_eq!(fwd(t.take(r(13), 0)), (vec![], None));
        assert_eq!(t.gap(), Some((11, 1)));
        assert_eq!(t.take(r(12), 0), Take::Duplicate(None));
        assert_eq!(fwd(t.take(r(11), 0)), (vec![11, 12, 13], None));
        assert_eq!(t.gap(), None);
        assert!(t.acked(t.generation(), 13));
        assert_eq!(t.take(r(12), 0), Take::Duplicate(Some(13)));
        // Acks released for an earlier device or boot are not sent to this one.
        let old = t.generation();
        t.hello("other", 7, 0);
        assert!(!t.acked(old, 99), "same boot number, another device");
        assert_eq!(
            t.take(r(5), 0),
            Take::Forward {
                ready: vec![],
                resend: Some((0, 5))
            }
        );
    }

    #[test]
    fn a_reboot_starts_over_and_readings_the_device_gave_up_are_not_waited_for() {
        let mut t = Track::default();
        t.hello("d", 1, 0);
        assert_eq!(fwd(t.take(r(0), 0)).0, vec![0]);
        assert_eq!(fwd(t.take(r(2), 0)), (vec![], Some((1, 1))));
        assert_eq!(fwd(t.take(r(4), 0)), (vec![], Some((3, 1))));
        // Same boot: the device no longer has 1 (its buffer overflowed) but has 3.
        let (ready, ack, lost) = t.hello("d", 1, 3);
        assert_eq!(
            ready.iter().map(|(r, _)| r.seq).collect::<Vec<_>>(),
            vec![2]
        );
        assert_eq!((ack, lost), (None, 1));
        assert_eq!(fwd(t.take(r(3), 0)).0, vec![3, 4]);
        // A reboot: seq restarts.
        assert_eq!(t.hello("d", 2, 0).0.len(), 0);
        assert_eq!(fwd(t.take(r(0), 0)).0, vec![0]);
    }

    #[test]
    fn a_reading_of_a_boot_whose_hello_was_lost_is_refused() {
        let mut t = Track::default();
        t.hello("d", 1, 0);
        let of = |seq, boot| Reading {
            boot: Some(boot),
            ..r(seq)
        };
        assert_eq!(fwd(t.take(of(0, 1), 0)).0, vec![0]);
        // The device rebooted (seq kept across boots) and its Hello was lost: without
        // `boot` in the reading this would be forwarded as boot 1's seq 1.
        assert_eq!(t.take(of(1, 2), 0), Take::OtherBoot(2));
        // A version 1 reading (no boot) is taken as the last Hello's.
        assert_eq!(fwd(t.take(r(1), 0)).0, vec![1]);
        assert_eq!(t.end_boot("d", 2).map(|e| e.device), Some(("d".into(), 1)));
        t.hello("d", 2, 1);
        assert_eq!(fwd(t.take(of(1, 2), 0)).0, vec![1]);
    }

    #[test]
    fn a_new_boot_hands_over_what_waited_behind_a_gap() {
        let mut t = Track::default();
        t.hello("d", 1, 0);
        assert_eq!(fwd(t.take(r(0), 0)).0, vec![0]);
        // 1 and 3 lost on the line; 2 and 4 wait.
        assert_eq!(fwd(t.take(r(2), 0)).0, Vec::<u32>::new());
        assert_eq!(fwd(t.take(r(4), 0)).0, Vec::<u32>::new());
        // The same boot ends nothing.
        assert_eq!(t.end_boot("d", 1), None);
        // The device rebooted before resending 1 and 3: 2 and 4 go on, 2 never came.
        let e = t.end_boot("d", 2).expect("ended");
        assert_eq!(e.device, ("d".to_string(), 1));
        assert_eq!(
            e.held.iter().map(|(r, _)| r.seq).collect::<Vec<_>>(),
            vec![2, 4]
        );
        assert_eq!(e.missing, 2);
        t.hello("d", 2, 0);
        assert_eq!(fwd(t.take(r(0), 0)).0, vec![0]);
        // At the top of the range: no overflow.
        t.hello("d", 3, 0);
        assert_eq!(fwd(t.take(r(u32::MAX), 0)).0, Vec::<u32>::new());
        let e = t.end_boot("e", 1).expect("another device");
        assert_eq!((e.held.len(), e.missing), (1, u32::MAX));
    }

    #[test]
    fn seq_u32_max_is_forwarded_once() {
        let mut t = Track::default();
        t.hello("d", 1, u32::MAX - 1);
        assert_eq!(
            fwd(t.take(r(u32::MAX), 0)),
            (vec![], Some((u32::MAX - 1, 1)))
        );
        assert_eq!(
            fwd(t.take(r(u32::MAX - 1), 0)).0,
            vec![u32::MAX - 1, u32::MAX]
        );
        assert!(t.acked(t.generation(), u32::MAX));
        assert_eq!(t.take(r(u32::MAX), 0), Take::Duplicate(Some(u32::MAX)));
        assert_eq!(t.take(r(0), 0), Take::Duplicate(Some(u32::MAX)));
        // A new boot starts over.
        t.hello("d", 2, 0);
        assert_eq!(fwd(t.take(r(0), 0)).0, vec![0]);
    }

    #[test]
    fn the_writer_repeats_an_ack_and_leaves_out_a_lower_one() {
        let ack = |g, up_to| {
            let mut o = Outbox::default();
            o.ack(g, 7, up_to);
            o
        };
        let mut written = None;
        let acks = |o: Outbox, written: &mut Option<(u64, u32)>| -> Vec<u32> {
            o.messages(written)
                .into_iter()
                .filter_map(|m| match m {
                    GatewayMessage::Ack { up_to, .. } => Some(up_to),
                    _ => None,
                })
                .collect()
        };
        assert_eq!(acks(ack(1, 13), &mut written), [13]);
        // The same ack again (a device whose ack was lost resent 12 and 13): written.
        assert_eq!(acks(ack(1, 13), &mut written), [13]);
        // A release that arrived late, below what was written: left out.
        assert_eq!(acks(ack(1, 12), &mut written), Vec::<u32>::new());
        // Another device or boot (a new generation) starts low: written.
        assert_eq!(acks(ack(2, 3), &mut written), [3]);
        // A release of an older generation does not replace a newer one's pending ack.
        let mut o = ack(3, 2);
        o.ack(2, 7, 40);
        assert_eq!(o.ack, Some((3, 7, 2)));
        // Acks waiting together: the highest of the generation stands for them.
        let mut o = ack(2, 9);
        o.ack(2, 7, 5);
        o.time_sync = true;
        o.resend = Some((7, 10, 2));
        let due = o.messages(&mut written);
        assert_eq!(due.len(), 3);
        assert!(matches!(due[0], GatewayMessage::TimeSync { .. }));
        assert_eq!(due[1], GatewayMessage::Ack { boot: 7, up_to: 9 });
        assert_eq!(
            due[2],
            GatewayMessage::Resend {
                boot: 7,
                from: 10,
                count: 2
            }
        );
    }

    #[test]
    fn readings_far_ahead_of_a_gap_are_refused() {
        let mut t = Track::default();
        t.hello("d", 1, 0);
        for s in 1..=MAX_AHEAD as u32 {
            assert!(matches!(t.take(r(s), 0), Take::Forward { .. }));
        }
        assert_eq!(t.take(r(MAX_AHEAD as u32 + 1), 0), Take::OutOfSequence);
        assert_eq!(fwd(t.take(r(0), 0)).0.len(), MAX_AHEAD + 1);
    }
}
