//! The device side of the protocol, as a reusable state machine: sampling, framing, the
//! ring buffer of unacknowledged readings, resending, acks, clock sync, heartbeats and
//! remote configuration.
//!
//! `no_std` and no allocator, like the rest of the crate. The hardware is behind the small
//! [`Board`] trait, so the same [`Device`] runs in firmware (a UART and an ADC behind
//! `Board`), in the crate's tests (an in-memory link to a simulated gateway) and in a
//! gateway-side simulator.
//!
//! The firmware's main loop calls [`Device::poll`] often (every few milliseconds, or on
//! every interrupt that brings bytes or ticks the timer); `poll` never blocks except in
//! [`Board::write`]. See `README.md` beside this crate's `Cargo.toml` for an example.
//!
//! What one [`Device::poll`] does, in order:
//!
//! 1. If the link came up since the last poll (or this is the first poll after boot): drop
//!    any partial incoming frame, send a `0x00` (flushes line noise on the gateway side)
//!    and [`Hello`] (with [`Hello::resume_from`], the oldest reading still held), and
//!    rewind so every unacknowledged reading is sent again, oldest first, with its
//!    original `seq` and time.
//! 2. Reads what the gateway sent: [`GatewayMessage::Ack`] forgets acknowledged readings
//!    (acks of another boot are ignored and counted), [`GatewayMessage::TimeSync`] sets
//!    the clock (readings taken from then on are stamped [`Timestamp::UnixMs`], and so
//!    are the ones it still holds from before, with the time their uptime stood for),
//!    [`GatewayMessage::Configure`] sets the sample and heartbeat intervals,
//!    [`GatewayMessage::Resend`] queues the readings the gateway missed (up to 64).
//! 3. Takes a sample when it is due, link up or not, and keeps it in the ring buffer of `N`
//!    readings; when the buffer is full the oldest reading is dropped and counted
//!    ([`Stats::dropped`]).
//! 4. With the link up: sends the readings asked for again, then readings not yet sent,
//!    at most [`Settings::burst`] per poll;
//!    when readings were sent but no ack came for [`Settings::resend_after_ms`], sends
//!    `Hello` and then all of them again, oldest first.
//! 5. With the link up and nothing sent for [`Settings::heartbeat_interval_ms`]: sends a
//!    [`Heartbeat`].
//!
//! Sequence numbers are consecutive within a boot (a sample the board cannot take uses
//! none), so the gateway sees a gap only where the device dropped readings. They never
//! wrap within a boot: once `u32::MAX` is used, the device takes no more samples until it
//! boots again (counted in [`Stats::unsequenced`]). A wrapped `seq` would read as old to
//! the gateway, whose cumulative ack would then cover (and make the device forget) every
//! reading held.
//!
//! ```
//! use firmware_bridge::device::{Board, Device, Identity, Sample, Settings};
//! use firmware_bridge::{Capabilities, Channel};
//!
//! struct MyBoard {/* a timer, an ADC, a UART */}
//!
//! impl Board for MyBoard {
//!     fn uptime_ms(&self) -> u64 {
//!         0 // the timer
//!     }
//!     fn sample(&mut self) -> Option<Sample> {
//!         let mut s = Sample::default();
//!         s.channels.push(Channel { id: 1, value: 21.5 }).ok()?; // the ADC
//!         Some(s)
//!     }
//!     fn write(&mut self, bytes: &[u8]) {
//!         // the UART's transmitter
//!     }
//!     fn read(&mut self, buf: &mut [u8]) -> usize {
//!         0 // what the UART's receive interrupt buffered
//!     }
//! }
//!
//! let identity = Identity {
//!     device_id: "pump-7".try_into().unwrap(),
//!     firmware: "1.4.2".try_into().unwrap(),
//!     capabilities: Capabilities(0),
//!     boot: 42, // a counter in flash, incremented at every start
//!     first_seq: 0,
//! };
//! let mut device = Device::<64>::new(identity, Settings::default());
//! let mut board = MyBoard {};
//! device.poll(&mut board); // firmware: loop { device.poll(&mut board); sleep until an interrupt }
//! assert_eq!(device.unacked(), 1);
//! ```

use heapless::{Deque, String, Vec};

use crate::frame::{encode, Decoder, MAX_FRAME};
use crate::message::{
    Capabilities, Channel, DeviceMessage, Fix, GatewayMessage, Heartbeat, Hello, Reading,
    Timestamp, MAX_CHANNELS, MAX_DEVICE_ID, MAX_VERSION,
};

/// What [`Device`] needs from the hardware. Every method must return promptly.
pub trait Board {
    /// Milliseconds since boot; never goes backwards.
    fn uptime_ms(&self) -> u64;

    /// Takes one sample. `None` when there is nothing to report this time (a sensor busy
    /// or failed): no reading is made and no sequence number is used.
    fn sample(&mut self) -> Option<Sample>;

    /// Sends all of `bytes` (whole frames) to the gateway. May block until the UART or
    /// its DMA buffer has taken them.
    fn write(&mut self, bytes: &[u8]);

    /// Copies bytes that arrived from the gateway into `buf`, without waiting; returns
    /// how many (0 when there are none).
    fn read(&mut self, buf: &mut [u8]) -> usize;

    /// Whether the link to the gateway is up (a cable detect pin, USB CDC's DTR, a radio
    /// association). The default, always up, suits a plain UART: a gateway that restarts
    /// then gets its readings again by [`Settings::resend_after_ms`].
    fn link_up(&self) -> bool {
        true
    }
}

/// One sample as the board takes it; [`Device`] adds the sequence number and the time.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct Sample {
    /// The values, at most [`MAX_CHANNELS`].
    pub channels: Vec<Channel, MAX_CHANNELS>,
    /// Where, when the board has a GNSS receiver.
    pub fix: Option<Fix>,
}

/// Who the device is; announced in [`Hello`].
#[derive(Debug, Clone, PartialEq)]
pub struct Identity {
    /// Stable device id.
    pub device_id: String<MAX_DEVICE_ID>,
    /// Firmware version.
    pub firmware: String<MAX_VERSION>,
    /// [`Capabilities`] bits. [`Capabilities::CLOCK`] is added once a `TimeSync` has set
    /// the clock.
    pub capabilities: Capabilities,
    /// Changes at every reboot (a counter in flash, or a random number).
    pub boot: u32,
    /// The first sequence number of this boot: 0, or where the last boot stopped for a
    /// device with [`Capabilities::PERSISTENT_SEQ`]. Start a boot at 0 when the kept value
    /// nears `u32::MAX` (erased flash reads `0xFFFF_FFFF`): a boot takes no samples past
    /// `seq` `u32::MAX`.
    pub first_seq: u32,
}

/// Timing. The gateway can change the first two with [`GatewayMessage::Configure`].
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Settings {
    /// Time between samples.
    pub sample_interval_ms: u32,
    /// A [`Heartbeat`] is sent when nothing was sent for this long.
    pub heartbeat_interval_ms: u32,
    /// Readings sent but not acknowledged for this long are sent again, oldest first,
    /// after a `Hello`. Longer than the gateway takes to ack under its ack policy.
    pub resend_after_ms: u32,
    /// Most readings written in one [`Device::poll`] (a backlog goes out over several
    /// polls rather than in one long blocking write). At least 1.
    pub burst: u16,
}

impl Default for Settings {
    /// 1 s samples, 10 s heartbeats, resend after 15 s, 8 readings per poll.
    fn default() -> Self {
        Settings {
            sample_interval_ms: 1_000,
            heartbeat_interval_ms: 10_000,
            resend_after_ms: 15_000,
            burst: 8,
        }
    }
}

/// Counters, for the device's own diagnostics.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Stats {
    /// Readings taken.
    pub sampled: u32,
    /// Unacknowledged readings dropped because the ring buffer was full (oldest first).
    pub dropped: u32,
    /// Readings sent again (after a reconnect or a missing ack).
    pub resent: u32,
    /// Readings acknowledged.
    pub acked: u32,
    /// Acks for another boot, ignored.
    pub foreign_acks: u32,
    /// Frames from the gateway that did not decode (corrupted, or a newer message type).
    pub rx_errors: u32,
    /// Times the link came up (the first poll after boot included).
    pub connects: u32,
    /// Samples not taken because this boot used `seq` `u32::MAX` (see
    /// [`Identity::first_seq`]).
    pub unsequenced: u32,
}

/// The device's protocol logic, keeping up to `N` unacknowledged readings.
///
/// Its size is about `N` times 192 bytes plus 500: in firmware, make it a `static` (with
/// `static_cell` or a `Mutex`) or keep it in `main`'s frame rather than in a small task
/// stack.
#[derive(Debug, Clone)]
pub struct Device<const N: usize> {
    hello: Hello,
    settings: Settings,
    next_seq: u32,
    /// This boot used `seq` `u32::MAX`: no more readings until the next boot.
    seq_used_up: bool,
    /// Unacknowledged readings, oldest first, with consecutive `seq`.
    unacked: Deque<Reading, N>,
    /// Index in `unacked` of the next reading to send; those before it were sent.
    next_send: usize,
    /// How many readings at the back of `unacked` were never sent.
    never_sent: usize,
    decoder: Decoder,
    /// Readings the gateway asked for again (`Resend`), sent before anything else.
    resend: Deque<u32, RESEND_QUEUE>,
    /// `unix_ms = uptime_ms + offset` (wrapping) once a `TimeSync` arrived.
    clock_offset: Option<u64>,
    link: bool,
    next_sample_ms: u64,
    last_sample_ms: Option<u64>,
    last_tx_ms: u64,
    /// When the oldest unacknowledged reading was last sent, or an ack last made progress.
    resend_timer_ms: u64,
    stats: Stats,
}

/// Most sequence numbers waiting to be sent again on the gateway's request; further
/// requests wait for the resend timeout.
const RESEND_QUEUE: usize = 64;

/// Bytes read from the board per call, and calls per poll.
const READ_CHUNK: usize = 64;
const READS_PER_POLL: usize = 8;

impl<const N: usize> Device<N> {
    /// A device that has just booted. Its first [`poll`](Self::poll) sends `Hello` (if the
    /// link is up) and takes the first sample.
    pub fn new(identity: Identity, settings: Settings) -> Self {
        const { assert!(N > 0, "a Device needs room for at least one reading") };
        Device {
            hello: Hello {
                device_id: identity.device_id,
                firmware: identity.firmware,
                protocol: crate::PROTOCOL_VERSION,
                capabilities: identity.capabilities,
                boot: identity.boot,
                resume_from: identity.first_seq,
            },
            settings,
            next_seq: identity.first_seq,
            seq_used_up: false,
            unacked: Deque::new(),
            next_send: 0,
            never_sent: 0,
            decoder: Decoder::new(),
            resend: Deque::new(),
            clock_offset: None,
            link: false,
            next_sample_ms: 0,
            last_sample_ms: None,
            last_tx_ms: 0,
            resend_timer_ms: 0,
            stats: Stats::default(),
        }
    }

    /// Does whatever is due now; call it from the main loop. See the [module
    /// docs](self) for what, in which order.
    pub fn poll<B: Board>(&mut self, board: &mut B) {
        let now = board.uptime_ms();
        let up = board.link_up();
        if up && !self.link {
            self.connected(board, now);
        }
        self.link = up;
        if up {
            self.receive(board, now);
        }
        if now >= self.next_sample_ms {
            self.take_sample(board, now);
        }
        if up {
            self.transmit(board, now);
            if now.saturating_sub(self.last_tx_ms) >= u64::from(self.settings.heartbeat_interval_ms)
            {
                let unacked = u16::try_from(self.unacked.len()).unwrap_or(u16::MAX);
                let hb = DeviceMessage::Heartbeat(Heartbeat {
                    uptime_ms: now,
                    unacked,
                });
                self.send(board, &hb, now);
            }
        }
    }

    /// Tells the device the link came back by some way [`Board::link_up`] does not show
    /// (a modem event, a gateway that asked for it): the next poll sends `Hello` and every
    /// unacknowledged reading again.
    pub fn reconnected(&mut self) {
        self.link = false;
    }

    /// This boot's id (from [`Identity::boot`]).
    pub fn boot(&self) -> u32 {
        self.hello.boot
    }

    /// The sequence number the next reading gets.
    pub fn next_seq(&self) -> u32 {
        self.next_seq
    }

    /// How many readings wait for an ack.
    pub fn unacked(&self) -> usize {
        self.unacked.len()
    }

    /// The readings waiting for an ack, oldest first.
    pub fn unacked_readings(&self) -> impl Iterator<Item = &Reading> + '_ {
        self.unacked.iter()
    }

    /// Unix time in milliseconds at uptime `uptime_ms`, once a `TimeSync` set the clock.
    pub fn unix_ms(&self, uptime_ms: u64) -> Option<u64> {
        self.clock_offset.map(|off| uptime_ms.wrapping_add(off))
    }

    /// The current timing (as changed by `Configure`).
    pub fn settings(&self) -> Settings {
        self.settings
    }

    /// The counters.
    pub fn stats(&self) -> Stats {
        self.stats
    }

    /// The `Hello` this device sends now.
    pub fn hello(&self) -> Hello {
        Hello {
            resume_from: self.unacked.front().map_or(self.next_seq, |r| r.seq),
            ..self.hello.clone()
        }
    }

    fn connected<B: Board>(&mut self, board: &mut B, now: u64) {
        self.stats.connects = self.stats.connects.wrapping_add(1);
        self.decoder.reset();
        board.write(&[0]);
        self.send(board, &DeviceMessage::Hello(self.hello()), now);
        self.next_send = 0;
    }

    fn receive<B: Board>(&mut self, board: &mut B, now: u64) {
        let mut buf = [0u8; READ_CHUNK];
        for _ in 0..READS_PER_POLL {
            let n = board.read(&mut buf).min(buf.len());
            if n == 0 {
                break;
            }
            for &b in &buf[..n] {
                match self.decoder.push::<GatewayMessage>(b) {
                    Some(Ok(msg)) => self.handle(msg, now),
                    Some(Err(_)) => self.stats.rx_errors = self.stats.rx_errors.wrapping_add(1),
                    None => {}
                }
            }
        }
    }

    fn handle(&mut self, msg: GatewayMessage, now: u64) {
        match msg {
            GatewayMessage::Ack { boot, up_to } => {
                if boot != self.hello.boot {
                    self.stats.foreign_acks = self.stats.foreign_acks.wrapping_add(1);
                    return;
                }
                let mut acked = 0;
                while self.unacked.front().is_some_and(|r| r.seq <= up_to) {
                    self.forget_oldest();
                    acked += 1;
                }
                if acked > 0 {
                    self.stats.acked = self.stats.acked.wrapping_add(acked);
                    self.resend_timer_ms = now;
                }
            }
            GatewayMessage::TimeSync { unix_ms } => {
                let offset = unix_ms.wrapping_sub(now);
                self.clock_offset = Some(offset);
                self.hello.capabilities.0 |= Capabilities::CLOCK;
                // Readings taken before the clock was set carry their uptime: they get
                // the time it stood for. Else the gateway, which cannot tell when they
                // were taken, stamps them with when they arrive, and a backlog gathered
                // while the link was down would all read as the moment it came back.
                for r in self.unacked.iter_mut() {
                    if let Timestamp::UptimeMs(uptime) = r.time {
                        r.time = Timestamp::UnixMs(uptime.wrapping_add(offset));
                    }
                }
            }
            GatewayMessage::Resend { boot, from, count } => {
                if boot != self.hello.boot {
                    self.stats.foreign_acks = self.stats.foreign_acks.wrapping_add(1);
                    return;
                }
                for seq in (0..u32::from(count)).filter_map(|i| from.checked_add(i)) {
                    if !self.resend.iter().any(|&s| s == seq) && self.resend.push_back(seq).is_err()
                    {
                        break;
                    }
                }
            }
            GatewayMessage::Configure(c) => {
                // Zero would mean "sample on every poll" or "heartbeat on every poll":
                // never what an operator wants, so it leaves the setting as it is.
                if c.sample_interval_ms > 0 {
                    self.settings.sample_interval_ms = c.sample_interval_ms;
                    // Due one new interval after the last sample (now, if that has passed):
                    // the gateway repeating the same Configure does not shift the schedule.
                    if let Some(last) = self.last_sample_ms {
                        self.next_sample_ms = last.saturating_add(u64::from(c.sample_interval_ms));
                    }
                }
                if c.heartbeat_interval_ms > 0 {
                    self.settings.heartbeat_interval_ms = c.heartbeat_interval_ms;
                }
            }
        }
    }

    fn take_sample<B: Board>(&mut self, board: &mut B, now: u64) {
        let interval = u64::from(self.settings.sample_interval_ms.max(1));
        // Keep the cadence; after a stall, start again from now rather than catching up.
        self.next_sample_ms = self.next_sample_ms.saturating_add(interval);
        if self.next_sample_ms <= now {
            self.next_sample_ms = now.saturating_add(interval);
        }
        self.last_sample_ms = Some(now);
        if self.seq_used_up {
            self.stats.unsequenced = self.stats.unsequenced.wrapping_add(1);
            return;
        }
        let Some(sample) = board.sample() else {
            return;
        };
        let time = match self.unix_ms(now) {
            Some(t) => Timestamp::UnixMs(t),
            None => Timestamp::UptimeMs(now),
        };
        let reading = Reading {
            seq: self.next_seq,
            time,
            fix: sample.fix,
            channels: sample.channels,
            boot: Some(self.hello.boot),
        };
        match self.next_seq.checked_add(1) {
            Some(next) => self.next_seq = next,
            None => self.seq_used_up = true,
        }
        self.stats.sampled = self.stats.sampled.wrapping_add(1);
        if self.unacked.is_full() {
            self.forget_oldest();
            self.stats.dropped = self.stats.dropped.wrapping_add(1);
        }
        if self.unacked.push_back(reading).is_ok() {
            self.never_sent += 1;
        }
    }

    /// Removes the oldest unacknowledged reading (acked or dropped).
    fn forget_oldest(&mut self) {
        if self.unacked.pop_front().is_some() {
            self.next_send = self.next_send.saturating_sub(1);
            self.never_sent = self.never_sent.min(self.unacked.len());
        }
    }

    fn transmit<B: Board>(&mut self, board: &mut B, now: u64) {
        if self.next_send > 0
            && now.saturating_sub(self.resend_timer_ms) >= u64::from(self.settings.resend_after_ms)
        {
            // Hello first: its `resume_from` tells the gateway which missing readings this
            // device no longer has (dropped while the gateway was not acknowledging).
            self.send(board, &DeviceMessage::Hello(self.hello()), now);
            self.next_send = 0;
        }
        let mut budget = self.settings.burst.max(1);
        // What the gateway asked for again comes first (only what was sent before and
        // is still held; anything else is already on its way or gone).
        while budget > 0 {
            let Some(seq) = self.resend.pop_front() else {
                break;
            };
            let Some(i) = self
                .unacked
                .front()
                .and_then(|f| usize::try_from(seq.checked_sub(f.seq)?).ok())
                .filter(|&i| i < self.next_send)
            else {
                continue;
            };
            if let Some(reading) = nth(&self.unacked, i) {
                let msg = DeviceMessage::Reading(reading.clone());
                self.stats.resent = self.stats.resent.wrapping_add(1);
                self.send(board, &msg, now);
                budget -= 1;
            }
        }
        for _ in 0..budget {
            let i = self.next_send;
            let Some(reading) = nth(&self.unacked, i) else {
                break;
            };
            let msg = DeviceMessage::Reading(reading.clone());
            if i == 0 {
                self.resend_timer_ms = now;
            }
            if i < self.unacked.len() - self.never_sent {
                self.stats.resent = self.stats.resent.wrapping_add(1);
            } else {
                self.never_sent -= 1;
            }
            self.send(board, &msg, now);
            self.next_send += 1;
        }
    }

    fn send<B: Board>(&mut self, board: &mut B, msg: &DeviceMessage, now: u64) {
        let mut frame = [0u8; MAX_FRAME];
        // Cannot fail: every message with bounded fields fits in a frame (the frame tests
        // pin the largest).
        if let Ok(n) = encode(msg, &mut frame) {
            board.write(&frame[..n]);
            self.last_tx_ms = now;
        }
    }
}

/// The `i`th element of a deque, oldest first.
fn nth<T, const N: usize>(q: &Deque<T, N>, i: usize) -> Option<&T> {
    let (a, b) = q.as_slices();
    a.get(i).or_else(|| b.get(i.checked_sub(a.len())?))
}

#[cfg(test)]
mod tests;
