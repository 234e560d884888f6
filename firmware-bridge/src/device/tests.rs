//! The device logic against an in-memory link and a simulated gateway.

use super::*;
use crate::frame::{Decoded, Message};
use crate::message::Configure;
use proptest::prelude::*;
use std::collections::VecDeque;
use std::vec::Vec as StdVec;

const BOOT: u32 = 7;
/// Milliseconds between polls.
const TICK: u64 = 100;

/// The board: a clock, a sensor counting up, and a serial link that loses whatever is in
/// flight when it goes down.
struct Link {
    now: u64,
    up: bool,
    sensor_on: bool,
    value: f32,
    to_gateway: StdVec<u8>,
    to_device: VecDeque<u8>,
}

impl Board for Link {
    fn uptime_ms(&self) -> u64 {
        self.now
    }

    fn sample(&mut self) -> Option<Sample> {
        if !self.sensor_on {
            return None;
        }
        self.value += 1.0;
        let mut channels = heapless::Vec::new();
        channels
            .push(Channel {
                id: 1,
                value: self.value,
            })
            .unwrap();
        Some(Sample {
            channels,
            fix: None,
        })
    }

    fn write(&mut self, bytes: &[u8]) {
        assert!(self.up, "the device wrote while the link was down");
        self.to_gateway.extend_from_slice(bytes);
    }

    fn read(&mut self, buf: &mut [u8]) -> usize {
        let n = buf.len().min(self.to_device.len());
        for (slot, b) in buf.iter_mut().zip(self.to_device.drain(..n)) {
            *slot = b;
        }
        n
    }

    fn link_up(&self) -> bool {
        self.up
    }
}

impl Link {
    fn new() -> Self {
        Link {
            now: 0,
            up: true,
            sensor_on: true,
            value: 0.0,
            to_gateway: StdVec::new(),
            to_device: VecDeque::new(),
        }
    }

    /// Takes the link down (or up); bytes in flight either way are lost.
    fn set_up(&mut self, up: bool) {
        self.up = up;
        if !up {
            self.to_gateway.clear();
            self.to_device.clear();
        }
    }
}

/// The gateway's side: decodes what arrives, remembers it, and sends what a test tells it.
#[derive(Default)]
struct Gateway {
    decoder: Decoder,
    /// Everything decoded, in order of arrival.
    log: StdVec<DeviceMessage>,
    errors: usize,
    track: Track,
}

/// The gateway's ack rule (WIRE-FORMAT.md, "The exchange"): the cumulative ack covers the
/// contiguous run of readings it has, from the `resume_from` of the device's `Hello` on.
#[derive(Default)]
struct Track {
    boot: Option<u32>,
    /// Every reading below this one is acknowledged.
    ack_next: u32,
    /// Readings at or above `ack_next` received, waiting for the ones before them.
    have: std::collections::BTreeSet<u32>,
}

impl Track {
    fn hello(&mut self, h: &Hello) {
        if self.boot != Some(h.boot) {
            *self = Track {
                boot: Some(h.boot),
                ack_next: h.resume_from,
                have: Default::default(),
            };
        } else if h.resume_from > self.ack_next {
            // The device dropped the readings below `resume_from`: do not wait for them.
            self.ack_next = h.resume_from;
            self.have = self.have.split_off(&h.resume_from);
        }
        self.advance();
    }

    fn reading(&mut self, seq: u32) {
        if self.boot.is_some() && seq >= self.ack_next {
            self.have.insert(seq);
            self.advance();
        }
    }

    fn advance(&mut self) {
        while self.have.remove(&self.ack_next) {
            self.ack_next += 1;
        }
    }

    fn ack(&self) -> Option<GatewayMessage> {
        Some(GatewayMessage::Ack {
            boot: self.boot?,
            up_to: self.ack_next.checked_sub(1)?,
        })
    }
}

impl Gateway {
    /// Reads what the device sent; returns the new messages.
    fn receive(&mut self, link: &mut Link) -> StdVec<DeviceMessage> {
        let bytes = std::mem::take(&mut link.to_gateway);
        let mut new = StdVec::new();
        self.decoder
            .feed(&bytes, |r: Decoded<DeviceMessage>| match r {
                Ok(m) => new.push(m),
                Err(_) => self.errors += 1,
            });
        for m in &new {
            match m {
                DeviceMessage::Hello(h) => self.track.hello(h),
                DeviceMessage::Reading(r) => self.track.reading(r.seq),
                _ => {}
            }
        }
        self.log.extend(new.iter().cloned());
        new
    }

    /// Sends the cumulative ack, if there is one.
    fn ack(&self, link: &mut Link) {
        if let Some(ack) = self.track.ack() {
            Gateway::send(link, &ack);
        }
    }

    fn send(link: &mut Link, msg: &GatewayMessage) {
        link.to_device.extend(frame(msg));
    }

    fn readings(&self) -> StdVec<&Reading> {
        self.log
            .iter()
            .filter_map(|m| match m {
                DeviceMessage::Reading(r) => Some(r),
                _ => None,
            })
            .collect()
    }
}

fn frame<M: Message>(m: &M) -> StdVec<u8> {
    let mut out = [0u8; MAX_FRAME];
    let n = encode(m, &mut out).unwrap();
    out[..n].to_vec()
}

fn identity(boot: u32) -> Identity {
    Identity {
        device_id: "pump-7".try_into().unwrap(),
        firmware: "1.4.2".try_into().unwrap(),
        capabilities: Capabilities(Capabilities::GNSS),
        boot,
        first_seq: 0,
    }
}

/// A device, its board and a gateway, stepped together.
struct World<const N: usize> {
    device: Device<N>,
    link: Link,
    gateway: Gateway,
}

impl<const N: usize> World<N> {
    fn new(settings: Settings) -> Self {
        World {
            device: Device::new(identity(BOOT), settings),
            link: Link::new(),
            gateway: Gateway::default(),
        }
    }

    /// One poll at the current time, the gateway reads, then time moves on by a tick.
    /// Returns what the gateway received.
    fn step(&mut self) -> StdVec<DeviceMessage> {
        self.device.poll(&mut self.link);
        let got = self.gateway.receive(&mut self.link);
        self.link.now += TICK;
        got
    }

    /// Steps for `ms` milliseconds; returns what the gateway received.
    fn run(&mut self, ms: u64) -> StdVec<DeviceMessage> {
        let mut got = StdVec::new();
        for _ in 0..ms / TICK {
            got.extend(self.step());
        }
        got
    }

    fn send(&mut self, msg: GatewayMessage) {
        Gateway::send(&mut self.link, &msg);
    }

    fn ack(&mut self, up_to: u32) {
        self.send(GatewayMessage::Ack { boot: BOOT, up_to });
    }
}

fn seqs(msgs: &[DeviceMessage]) -> StdVec<u32> {
    msgs.iter()
        .filter_map(|m| match m {
            DeviceMessage::Reading(r) => Some(r.seq),
            _ => None,
        })
        .collect()
}

fn readings(msgs: &[DeviceMessage]) -> StdVec<Reading> {
    msgs.iter()
        .filter_map(|m| match m {
            DeviceMessage::Reading(r) => Some(r.clone()),
            _ => None,
        })
        .collect()
}

fn hellos(msgs: &[DeviceMessage]) -> StdVec<Hello> {
    msgs.iter()
        .filter_map(|m| match m {
            DeviceMessage::Hello(h) => Some(h.clone()),
            _ => None,
        })
        .collect()
}

#[test]
fn boot_sends_hello_then_readings_stamped_with_uptime() {
    let mut w = World::<8>::new(Settings::default());
    let got = w.run(3_500);
    let DeviceMessage::Hello(hello) = &got[0] else {
        panic!("first message is not Hello: {got:?}");
    };
    assert_eq!(hello.boot, BOOT);
    assert_eq!(hello.protocol, crate::PROTOCOL_VERSION);
    assert_eq!(hello.device_id.as_str(), "pump-7");
    assert!(!hello.capabilities.has(Capabilities::CLOCK));
    let rs = readings(&got);
    assert_eq!(seqs(&got), [0, 1, 2, 3]);
    let times: StdVec<_> = rs.iter().map(|r| r.time).collect();
    assert_eq!(
        times,
        [0, 1_000, 2_000, 3_000].map(Timestamp::UptimeMs),
        "one sample a second, stamped with uptime"
    );
    assert_eq!(rs[2].channels[0], Channel { id: 1, value: 3.0 });
    assert_eq!(w.device.unacked(), 4);
    assert_eq!(w.gateway.errors, 0);
}

#[test]
fn readings_are_resent_after_a_reconnect_until_acked() {
    let mut w = World::<16>::new(Settings::default());
    let first = readings(&w.run(3_000)); // seq 0, 1, 2
    assert_eq!(first.len(), 3);

    // Link down for 5 s: samples 3..=7 are taken but nothing is written (Link::write
    // would panic) and nothing is received.
    w.link.set_up(false);
    assert!(w.run(5_000).is_empty());
    assert_eq!(w.device.unacked(), 8);
    w.link.sensor_on = false; // no more readings from here on

    // Link up: Hello, then every unacknowledged reading, oldest first, as first sent.
    w.link.set_up(true);
    let got = w.step();
    assert!(matches!(got[0], DeviceMessage::Hello(_)), "{got:?}");
    assert_eq!(hellos(&got)[0].resume_from, 0);
    assert_eq!(seqs(&got), [0, 1, 2, 3, 4, 5, 6, 7]);
    assert_eq!(readings(&got)[..3], first[..], "original seq and time");
    assert_eq!(w.device.stats().resent, 3);

    // Not acked: the next reconnect sends them all again.
    w.link.set_up(false);
    w.step();
    w.link.set_up(true);
    let got = w.step();
    assert_eq!(seqs(&got), [0, 1, 2, 3, 4, 5, 6, 7]);

    // Acked up to 5: the next reconnect sends only 6 and 7.
    w.ack(5);
    w.step();
    assert_eq!(w.device.unacked(), 2);
    w.link.set_up(false);
    w.step();
    w.link.set_up(true);
    let got = w.step();
    assert_eq!(hellos(&got)[0].resume_from, 6);
    assert_eq!(seqs(&got), [6, 7]);

    // All acked: a reconnect sends Hello and nothing else.
    w.ack(7);
    w.step();
    w.link.set_up(false);
    w.step();
    w.link.set_up(true);
    let got = w.step();
    assert_eq!(got.len(), 1, "{got:?}");
    assert_eq!(hellos(&got)[0].resume_from, 8, "the next seq: nothing held");
    assert_eq!(w.device.unacked(), 0);
    assert_eq!(w.device.stats().acked, 8);
    assert_eq!(w.device.stats().connects, 5);
}

#[test]
fn without_an_ack_readings_are_resent_after_the_timeout() {
    let settings = Settings {
        sample_interval_ms: 60_000,
        resend_after_ms: 5_000,
        ..Settings::default()
    };
    let mut w = World::<8>::new(settings);
    let got = w.run(4_900);
    assert_eq!(seqs(&got), [0]);
    // Sent at 0 and never acked: sent again at 5 s, and every 5 s until acked, each time
    // after a Hello.
    let got = w.run(10_000);
    assert_eq!(seqs(&got), [0, 0]);
    let kinds: StdVec<_> = got
        .iter()
        .map(|m| match m {
            DeviceMessage::Hello(h) => format!("hello {}", h.resume_from),
            DeviceMessage::Reading(r) => format!("reading {}", r.seq),
            other => format!("{other:?}"),
        })
        .collect();
    assert_eq!(kinds, ["hello 0", "reading 0", "hello 0", "reading 0"]);
    assert_eq!(readings(&got)[0].time, Timestamp::UptimeMs(0));
    assert_eq!(w.device.stats().resent, 2);
    w.ack(0);
    let got = w.run(20_000);
    assert_eq!(seqs(&got), []);
    assert_eq!(w.device.stats().resent, 2);
}

#[test]
fn a_boot_takes_no_samples_past_seq_u32_max() {
    let settings = Settings {
        sample_interval_ms: 100,
        ..Settings::default()
    };
    let mut device = Device::<8>::new(
        Identity {
            first_seq: u32::MAX - 1,
            ..identity(BOOT)
        },
        settings,
    );
    let mut link = Link::new();
    let mut gateway = Decoder::new();
    let mut sent = StdVec::new();
    for _ in 0..10 {
        device.poll(&mut link);
        let bytes = std::mem::take(&mut link.to_gateway);
        gateway.feed(&bytes, |r: Decoded<DeviceMessage>| sent.push(r.unwrap()));
        link.now += TICK;
    }
    // No seq 0 after u32::MAX: the gateway would take it for an old reading and its ack
    // of u32::MAX would make the device forget everything it holds.
    assert_eq!(seqs(&sent), [u32::MAX - 1, u32::MAX]);
    assert_eq!(device.stats().sampled, 2);
    assert_eq!(device.stats().unsequenced, 8);
    // The two are still held until acknowledged, and then forgotten.
    Gateway::send(
        &mut link,
        &GatewayMessage::Ack {
            boot: BOOT,
            up_to: u32::MAX,
        },
    );
    device.poll(&mut link);
    assert_eq!(device.stats().acked, 2);
}

#[test]
fn an_ack_that_makes_progress_restarts_the_timeout() {
    let settings = Settings {
        resend_after_ms: 3_000,
        ..Settings::default()
    };
    let mut w = World::<8>::new(settings);
    // The gateway acks each reading 2 s after it was taken: slower than the samples come,
    // but it makes progress within the timeout, so nothing is sent twice.
    for _ in 0..200 {
        w.step();
        let now = w.link.now;
        if now % 1_000 == 0 && now >= 2_000 {
            w.ack(u32::try_from(now / 1_000 - 2).unwrap());
        }
    }
    assert_eq!(w.device.stats().resent, 0);
    assert_eq!(seqs(&w.gateway.log), (0..20).collect::<StdVec<_>>());
}

#[test]
fn a_full_ring_buffer_drops_the_oldest_and_counts() {
    let mut w = World::<4>::new(Settings::default());
    w.link.set_up(false);
    w.run(10_000); // samples 0..=9 with room for 4
    w.link.sensor_on = false;
    let stats = w.device.stats();
    assert_eq!((stats.sampled, stats.dropped), (10, 6));
    assert_eq!(w.device.unacked(), 4);
    w.link.set_up(true);
    let got = w.step();
    assert!(matches!(got[0], DeviceMessage::Hello(_)));
    assert_eq!(
        hellos(&got)[0].resume_from,
        6,
        "tells the gateway not to wait for 0..=5"
    );
    assert_eq!(seqs(&got), [6, 7, 8, 9], "the newest 4, oldest first");
    // Their times are when they were taken, not when they were sent.
    assert_eq!(readings(&got)[0].time, Timestamp::UptimeMs(6_000));
    assert_eq!(w.device.stats().resent, 0, "never sent before");
}

#[test]
fn acks_of_another_boot_are_ignored() {
    let mut w = World::<8>::new(Settings::default());
    w.run(3_000);
    w.link.sensor_on = false;
    assert_eq!(w.device.unacked(), 3);
    w.send(GatewayMessage::Ack {
        boot: BOOT - 1,
        up_to: 1_000,
    });
    w.send(GatewayMessage::Ack {
        boot: BOOT + 1,
        up_to: 1_000,
    });
    w.step();
    assert_eq!(w.device.unacked(), 3);
    assert_eq!(w.device.stats().foreign_acks, 2);
    w.ack(1);
    w.step();
    let left: StdVec<u32> = w.device.unacked_readings().map(|r| r.seq).collect();
    assert_eq!(left, [2]);
    assert_eq!(w.device.stats().acked, 2);
    // An old ack changes nothing.
    w.ack(0);
    w.step();
    assert_eq!(w.device.unacked(), 1);
}

#[test]
fn time_sync_switches_timestamps_to_unix_time() {
    const UNIX: u64 = 1_800_000_000_000;
    let mut w = World::<16>::new(Settings::default());
    w.run(2_500); // readings at uptime 0, 1000, 2000
    assert_eq!(w.device.unix_ms(2_500), None);
    // The device reads it in the poll at uptime 2500.
    w.send(GatewayMessage::TimeSync { unix_ms: UNIX });
    let got = w.run(1_000);
    assert_eq!(
        readings(&got)[0].time,
        Timestamp::UnixMs(UNIX + 500),
        "sampled at uptime 3000, 500 ms after the sync"
    );
    assert_eq!(w.device.unix_ms(4_000), Some(UNIX + 1_500));
    // A later sync moves the clock (drift).
    w.send(GatewayMessage::TimeSync {
        unix_ms: UNIX + 1_600,
    });
    let got = w.run(1_000); // read at 3500, sampled at 4000
    assert_eq!(readings(&got)[0].time, Timestamp::UnixMs(UNIX + 2_100));

    // After a reconnect, Hello says the clock is set, and the readings taken before the
    // first sync are resent with the Unix time their uptime stood for (the sync at
    // uptime 2500 said UNIX).
    w.link.set_up(false);
    w.step();
    w.link.set_up(true);
    let got = w.step();
    assert!(hellos(&got)[0].capabilities.has(Capabilities::CLOCK));
    let times: StdVec<_> = readings(&got).iter().map(|r| r.time).collect();
    assert_eq!(
        times[..5],
        [
            Timestamp::UnixMs(UNIX - 2_500),
            Timestamp::UnixMs(UNIX - 1_500),
            Timestamp::UnixMs(UNIX - 500),
            Timestamp::UnixMs(UNIX + 500),
            Timestamp::UnixMs(UNIX + 2_100),
        ]
    );
}

#[test]
fn a_backlog_taken_before_the_clock_was_set_gets_its_own_times() {
    const UNIX: u64 = 1_800_000_000_000;
    let mut w = World::<16>::new(Settings::default());
    // Booted with the link down: readings at uptime 0 to 4000, no clock.
    w.link.set_up(false);
    w.run(4_500);
    w.link.sensor_on = false;
    assert_eq!(w.device.unacked(), 5);
    // The link comes up at uptime 4500: Hello and the first readings go out.
    w.link.set_up(true);
    let first = w.step();
    assert_eq!(
        readings(&first)[0].time,
        Timestamp::UptimeMs(0),
        "before the sync"
    );
    // Read in the next poll, at uptime 4600.
    w.send(GatewayMessage::TimeSync { unix_ms: UNIX });
    w.step();
    let held: StdVec<_> = w.device.unacked_readings().map(|r| r.time).collect();
    assert_eq!(
        held,
        [4_600, 3_600, 2_600, 1_600, 600].map(|ago| Timestamp::UnixMs(UNIX - ago)),
        "each when it was taken"
    );
}

#[test]
fn a_reboot_is_announced_by_hello_and_seq_restarts() {
    let mut w = World::<8>::new(Settings::default());
    let got = w.run(3_000);
    assert_eq!(hellos(&got)[0].boot, BOOT);
    assert_eq!(seqs(&got), [0, 1, 2]);

    // Reboot: RAM is lost, the boot counter in flash went up, seq starts again at 0.
    w.device = Device::new(identity(BOOT + 1), Settings::default());
    w.link.now = 0;
    let got = w.run(2_000);
    assert_eq!(hellos(&got).len(), 1);
    assert_eq!(hellos(&got)[0].boot, BOOT + 1);
    assert!(matches!(got[0], DeviceMessage::Hello(_)), "Hello first");
    assert_eq!(
        seqs(&got),
        [0, 1],
        "the old boot's unacked readings are gone"
    );
    w.link.sensor_on = false;

    // The gateway acks the old boot (its ack crossed the reboot): ignored.
    w.ack(2);
    w.step();
    assert_eq!(w.device.unacked(), 2);
    assert_eq!(w.device.stats().foreign_acks, 1);
    w.send(GatewayMessage::Ack {
        boot: BOOT + 1,
        up_to: 0,
    });
    w.step();
    assert_eq!(w.device.unacked(), 1);
}

#[test]
fn heartbeats_when_idle() {
    let settings = Settings {
        sample_interval_ms: 60_000,
        heartbeat_interval_ms: 10_000,
        resend_after_ms: 60_000,
        ..Settings::default()
    };
    let mut w = World::<8>::new(settings);
    let got = w.run(25_000);
    let beats: StdVec<_> = got
        .iter()
        .filter_map(|m| match m {
            DeviceMessage::Heartbeat(h) => Some(*h),
            _ => None,
        })
        .collect();
    assert_eq!(
        beats,
        [10_000, 20_000].map(|uptime_ms| Heartbeat {
            uptime_ms,
            unacked: 1
        }),
        "10 s after the reading at 0, then every 10 s"
    );
    // Readings are traffic too: at 1 reading a second there is no heartbeat.
    let mut w = World::<8>::new(Settings::default());
    w.link.set_up(true);
    let got = w.run(25_000);
    assert!(!got.iter().any(|m| matches!(m, DeviceMessage::Heartbeat(_))));
}

#[test]
fn configure_sets_the_intervals() {
    let mut w = World::<64>::new(Settings::default());
    w.run(1_100); // readings at 0 and 1000
    w.send(GatewayMessage::Configure(Configure {
        sample_interval_ms: 250,
        heartbeat_interval_ms: 5_000,
    }));
    let got = w.run(1_000); // read at 1100: next sample 1250
    let times: StdVec<_> = readings(&got).iter().map(|r| r.time).collect();
    assert_eq!(times, [1_300, 1_500, 1_800, 2_000].map(Timestamp::UptimeMs));
    let s = w.device.settings();
    assert_eq!(
        (s.sample_interval_ms, s.heartbeat_interval_ms),
        (250, 5_000)
    );

    // Zeros leave a setting alone; the same Configure again does not shift the schedule.
    w.send(GatewayMessage::Configure(Configure {
        sample_interval_ms: 0,
        heartbeat_interval_ms: 0,
    }));
    w.send(GatewayMessage::Configure(Configure {
        sample_interval_ms: 250,
        heartbeat_interval_ms: 5_000,
    }));
    let got = w.run(500);
    let times: StdVec<_> = readings(&got).iter().map(|r| r.time).collect();
    assert_eq!(times, [2_300, 2_500].map(Timestamp::UptimeMs));
    assert_eq!(w.device.settings(), s);
}

#[test]
fn garbage_from_the_gateway_is_counted_and_skipped() {
    let mut w = World::<8>::new(Settings::default());
    w.run(2_000);
    w.link.sensor_on = false;
    w.link.to_device.extend([0x13, 0x37, 0xff, 0x00, 0x42]);
    w.link.to_device.push_back(0);
    // A newer gateway's message type 9, with a good CRC: skipped and counted too.
    let mut future = [0u8; 32];
    let n = cobs::encode(&with_crc(&[9, 1, 2]), &mut future);
    w.link.to_device.extend(&future[..n]);
    w.link.to_device.push_back(0);
    w.ack(1);
    w.step();
    assert_eq!(w.device.stats().rx_errors, 3);
    assert_eq!(w.device.unacked(), 0);
}

fn with_crc(body: &[u8]) -> StdVec<u8> {
    let crc = crc::Crc::<u32>::new(&crc::CRC_32_ISCSI).checksum(body);
    let mut v = body.to_vec();
    v.extend(crc.to_le_bytes());
    v
}

#[test]
fn a_backlog_goes_out_in_bursts() {
    let settings = Settings {
        burst: 8,
        ..Settings::default()
    };
    let mut w = World::<64>::new(settings);
    w.link.set_up(false);
    w.run(20_000);
    w.link.sensor_on = false;
    w.link.set_up(true);
    let per_poll: StdVec<usize> = (0..4).map(|_| seqs(&w.step()).len()).collect();
    assert_eq!(per_poll, [8, 8, 4, 0]);
    assert_eq!(seqs(&w.gateway.log), (0..20).collect::<StdVec<_>>());
}

#[test]
fn samples_the_board_cannot_take_use_no_seq() {
    let mut w = World::<8>::new(Settings::default());
    w.run(1_000);
    w.link.sensor_on = false;
    w.run(3_000);
    w.link.sensor_on = true;
    let got = w.run(1_000);
    assert_eq!(seqs(&w.gateway.log), [0, 1]);
    assert_eq!(readings(&got)[0].time, Timestamp::UptimeMs(4_000));
    assert_eq!(w.device.stats().sampled, 2);
}

#[test]
fn reconnected_resends_without_a_link_signal() {
    let mut w = World::<8>::new(Settings::default());
    w.run(2_000);
    w.link.sensor_on = false;
    w.device.reconnected();
    let got = w.step();
    assert!(matches!(got[0], DeviceMessage::Hello(_)));
    assert_eq!(seqs(&got), [0, 1]);
}

#[test]
fn the_largest_reading_fits_a_frame() {
    // Device::send ignores encode errors because there are none: check the worst case.
    let mut channels = heapless::Vec::new();
    for id in 0..MAX_CHANNELS as u16 {
        channels
            .push(Channel {
                id: u16::MAX - id,
                value: f32::NAN,
            })
            .unwrap();
    }
    let sample = Sample {
        channels,
        fix: Some(Fix {
            lat_e7: i32::MIN,
            lon_e7: i32::MIN,
            alt_cm: Some(i32::MIN),
            accuracy_cm: Some(u32::MAX),
            hdop_centi: Some(u16::MAX),
            quality: crate::message::FixQuality::RtkFloat,
        }),
    };
    let r = DeviceMessage::Reading(Reading {
        seq: u32::MAX,
        time: Timestamp::UnixMs(u64::MAX),
        fix: sample.fix,
        channels: sample.channels,
        boot: Some(u32::MAX),
    });
    assert!(encode(&r, &mut [0u8; MAX_FRAME]).is_ok());
}

#[test]
fn a_frame_lost_on_the_way_is_resent_and_the_gateway_waits_for_it() {
    let settings = Settings {
        resend_after_ms: 3_000,
        ..Settings::default()
    };
    let mut w = World::<16>::new(settings);
    for _ in 0..35 {
        if w.link.now == 1_000 {
            // Reading 1 goes out in this poll; a bit flips on the way.
            w.device.poll(&mut w.link);
            let n = w.link.to_gateway.len();
            w.link.to_gateway[n - 3] ^= 0x40;
            w.gateway.receive(&mut w.link);
            w.link.now += TICK;
        } else {
            w.step();
        }
        w.gateway.ack(&mut w.link);
    }
    // At 3.4 s: 0, 2 and 3 arrived, the ack stays at 0 (1 is missing).
    assert_eq!(w.gateway.errors, 1);
    assert_eq!(seqs(&w.gateway.log), [0, 2, 3]);
    assert_eq!(w.device.unacked(), 3);
    // 3 s after the ack for 0 (at 0.1 s) came the Hello and the resend; by 4.5 s all is acked.
    for _ in 0..11 {
        w.step();
        w.gateway.ack(&mut w.link);
    }
    assert_eq!(seqs(&w.gateway.log), [0, 2, 3, 1, 2, 3, 4]);
    assert_eq!(w.device.unacked(), 0);
    assert_eq!(w.device.stats().dropped, 0);
}

#[test]
fn readings_the_device_dropped_do_not_hold_up_the_ack() {
    let settings = Settings {
        resend_after_ms: 8_000,
        ..Settings::default()
    };
    let mut w = World::<4>::new(settings);
    // Reading 1 is lost on the way, and the gateway (rightly) acks no further than 0. The
    // device runs out of room and drops 1: only resume_from in the Hello before the
    // resend tells the gateway to stop waiting for it.
    for _ in 0..150 {
        if w.link.now == 1_000 {
            w.device.poll(&mut w.link);
            w.link.to_gateway.clear();
            w.link.now += TICK;
        } else {
            w.step();
        }
        w.gateway.ack(&mut w.link);
    }
    let stats = w.device.stats();
    assert!(stats.dropped >= 1, "{stats:?}");
    assert!(!seqs(&w.gateway.log).contains(&1));
    assert!(
        w.device.unacked() <= 1,
        "the ack moved on: {:?}",
        w.device
            .unacked_readings()
            .map(|r| r.seq)
            .collect::<StdVec<_>>()
    );
    assert!(w.gateway.track.ack_next + 1 >= w.device.next_seq());
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(256))]

    /// Link flaps that lose frames in flight, bit flips both ways, a gateway that reads
    /// late and acks late or not at all (and acks only what it has, from the device's
    /// `resume_from` on): every reading reaches the gateway or is counted as dropped;
    /// every copy of a reading is the same; once the link holds, everything is acked.
    #[test]
    fn nothing_is_lost_without_being_counted(
        steps in proptest::collection::vec(
            (0..10u8, any::<bool>(), 0..4u8, 0..12u8, any::<usize>(), 1..=255u8),
            1..400,
        ),
    ) {
        let settings = Settings {
            sample_interval_ms: 300,
            heartbeat_interval_ms: 2_000,
            resend_after_ms: 1_500,
            burst: 3,
        };
        let mut device = Device::<8>::new(identity(BOOT), settings);
        let mut link = Link::new();
        let mut gw = Gateway::default();
        for (flap, gw_reads, gw_acks, corrupt, at, mask) in steps {
            if flap == 0 {
                link.set_up(!link.up);
            }
            device.poll(&mut link);
            match corrupt {
                0 if !link.to_gateway.is_empty() => {
                    let i = at % link.to_gateway.len();
                    link.to_gateway[i] ^= mask;
                }
                1 if !link.to_device.is_empty() => {
                    let i = at % link.to_device.len();
                    link.to_device[i] ^= mask;
                }
                _ => {}
            }
            if gw_reads {
                gw.receive(&mut link);
                if gw_acks == 0 && link.up {
                    gw.ack(&mut link);
                }
            }
            link.now += TICK;
        }
        // The link holds, the sensor stops, the gateway reads and acks at every step.
        link.set_up(true);
        link.sensor_on = false;
        for _ in 0..200 {
            device.poll(&mut link);
            gw.receive(&mut link);
            gw.ack(&mut link);
            link.now += TICK;
        }
        prop_assert_eq!(device.unacked(), 0);
        let stats = device.stats();
        let got = gw.readings();
        let missing = (0..device.next_seq())
            .filter(|s| !got.iter().any(|r| r.seq == *s))
            .count();
        prop_assert!(
            missing <= stats.dropped as usize,
            "{} readings never arrived, {} dropped", missing, stats.dropped
        );
        for r in &got {
            let first = got.iter().find(|x| x.seq == r.seq).unwrap();
            prop_assert_eq!(*r, *first, "a resend differs from the first copy");
        }
        prop_assert_eq!(stats.sampled, device.next_seq());
        prop_assert_eq!(gw.track.ack_next, device.next_seq());
        prop_assert!(hellos(&gw.log).iter().all(|h| h.boot == BOOT));
    }
}

#[test]
fn resend_sends_the_asked_readings_at_once() {
    let settings = Settings {
        sample_interval_ms: 1_000,
        resend_after_ms: 60_000,
        ..Settings::default()
    };
    let mut w = World::<8>::new(settings);
    let got = w.run(3_500);
    assert_eq!(seqs(&got), [0, 1, 2, 3]);
    // The gateway missed 1 and 2: they come again at once, nothing else does.
    let boot = w.device.boot();
    w.send(GatewayMessage::Resend {
        boot,
        from: 1,
        count: 2,
    });
    let got = w.run(TICK);
    assert_eq!(seqs(&got), [1, 2]);
    assert_eq!(w.device.stats().resent, 2);
    // Asking for what was never sent, was acked, or is of another boot sends nothing.
    w.ack(2);
    for (boot, from) in [(boot, 0), (boot, 40), (boot + 1, 3)] {
        w.send(GatewayMessage::Resend {
            boot,
            from,
            count: 1,
        });
    }
    assert_eq!(seqs(&w.run(TICK)), []);
}
