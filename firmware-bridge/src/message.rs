//! The messages. Their postcard encoding is the wire format: field order is part of it,
//! and so is each enum's variant order. Rules for changing them are in `WIRE-FORMAT.md`
//! (append only; new fields go at the end of a message; never reorder or remove).

use heapless::{String, Vec};
use serde::{Deserialize, Serialize};

/// Most channels one [`Reading`] carries.
pub const MAX_CHANNELS: usize = 16;
/// Longest device id, in bytes of UTF-8.
pub const MAX_DEVICE_ID: usize = 32;
/// Longest firmware version string, in bytes.
pub const MAX_VERSION: usize = 16;
/// Longest log or error text, in bytes.
pub const MAX_TEXT: usize = 96;

/// Device to gateway. The variant index is the message type on the wire.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub enum DeviceMessage {
    /// Type 0: sent at start and after every (re)connect.
    Hello(Hello),
    /// Type 1: one sample.
    Reading(Reading),
    /// Type 2: sent when there is nothing else to say, so silence means trouble.
    Heartbeat(Heartbeat),
    /// Type 3: a log line.
    Log(Log),
    /// Type 4: a fault the device wants an operator to see.
    Error(Log),
}

/// Gateway to device. The variant index is the message type on the wire.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub enum GatewayMessage {
    /// Type 0: every [`Reading`] of boot `boot` with `seq <= up_to` is safe; the device
    /// may forget them.
    Ack {
        /// The boot the sequence numbers belong to (from [`Hello::boot`]).
        boot: u32,
        /// The highest sequence number acknowledged (cumulative).
        up_to: u32,
    },
    /// Type 1: the gateway's clock, for devices without one (or with a drifting one).
    TimeSync {
        /// Milliseconds since the Unix epoch, UTC.
        unix_ms: u64,
    },
    /// Type 2: settings the device applies.
    Configure(Configure),
    /// Type 3: readings `from .. from + count` of boot `boot` did not arrive (lost or
    /// corrupted on the line): send those again now, if still held. Asked as soon as the
    /// gateway sees a gap, so a lost frame costs one round trip rather than a resend
    /// timeout.
    Resend {
        /// The boot the sequence numbers belong to.
        boot: u32,
        /// The first missing sequence number.
        from: u32,
        /// How many, from `from` on.
        count: u16,
    },
}

/// Bit flags of what a device can do.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Serialize, Deserialize)]
pub struct Capabilities(pub u32);

impl Capabilities {
    /// The device has a real-time clock (or was set by `TimeSync`) and stamps unix time.
    pub const CLOCK: u32 = 1 << 0;
    /// The device has a GNSS receiver and sends fixes.
    pub const GNSS: u32 = 1 << 1;
    /// The sequence number survives reboots (kept in flash or similar).
    pub const PERSISTENT_SEQ: u32 = 1 << 2;

    /// Whether every bit of `flag` is set.
    pub fn has(self, flag: u32) -> bool {
        self.0 & flag == flag
    }
}

/// Who the device is, announced at start and after reconnects.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Hello {
    /// Stable device id (the Kafka key).
    pub device_id: String<MAX_DEVICE_ID>,
    /// Firmware version, free text such as `1.4.2`.
    pub firmware: String<MAX_VERSION>,
    /// The protocol version the device speaks ([`crate::PROTOCOL_VERSION`]).
    pub protocol: u16,
    /// [`Capabilities`] bits.
    pub capabilities: Capabilities,
    /// Changes at every reboot (a boot counter, or random where there is no storage).
    /// With [`Reading::seq`] it makes the event id unique across reboots.
    pub boot: u32,
    /// The `seq` of the oldest reading the device still holds unacknowledged, or of its
    /// next reading when it holds none. Every reading of this boot below it was either
    /// acknowledged or dropped by the device (its buffer was full), so the gateway does
    /// not wait for those before acknowledging further.
    pub resume_from: u32,
}

/// When a reading was taken.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub enum Timestamp {
    /// Variant 0: milliseconds since the Unix epoch, UTC; the device clock is set.
    UnixMs(u64),
    /// Variant 1: milliseconds since boot; the device has no clock (the gateway stamps
    /// its own time and flags the event).
    UptimeMs(u64),
}

/// GNSS fix quality.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub enum FixQuality {
    /// Variant 0: no fix (the position is a last known one).
    None,
    /// Variant 1: 2D fix.
    Fix2d,
    /// Variant 2: 3D fix.
    Fix3d,
    /// Variant 3: differential (DGPS/SBAS).
    Dgps,
    /// Variant 4: RTK fixed.
    RtkFixed,
    /// Variant 5: RTK float.
    RtkFloat,
}

/// A position.
#[derive(Debug, Clone, Copy, PartialEq, Serialize, Deserialize)]
pub struct Fix {
    /// Latitude in 1e-7 degrees (WGS 84).
    pub lat_e7: i32,
    /// Longitude in 1e-7 degrees (WGS 84).
    pub lon_e7: i32,
    /// Altitude above mean sea level in centimetres.
    pub alt_cm: Option<i32>,
    /// Horizontal accuracy (1 sigma) in centimetres.
    pub accuracy_cm: Option<u32>,
    /// Horizontal dilution of precision times 100.
    pub hdop_centi: Option<u16>,
    /// Fix quality.
    pub quality: FixQuality,
}

/// One channel's value.
#[derive(Debug, Clone, Copy, PartialEq, Serialize, Deserialize)]
pub struct Channel {
    /// Channel id; the gateway maps ids to reading names in its config.
    pub id: u16,
    /// The value.
    pub value: f32,
}

/// One sample.
///
/// On the wire its fields follow in this order; [`Reading::boot`] (protocol version 2) is
/// written only when set, as a bare varint after the channels, and read as `None` when a
/// version 1 device's message ends before it (see `WIRE-FORMAT.md`, "Versioning").
#[derive(Debug, Clone, PartialEq)]
pub struct Reading {
    /// Only grows within a boot (and across boots where the device can keep it).
    pub seq: u32,
    /// When it was taken.
    pub time: Timestamp,
    /// Where, when the device knows.
    pub fix: Option<Fix>,
    /// The values.
    pub channels: Vec<Channel, MAX_CHANNELS>,
    /// The boot it was taken in ([`Hello::boot`]); protocol version 2, `None` from a
    /// version 1 device. With it the gateway knows a reading of a boot whose `Hello` it
    /// missed, and does not take it for one of the boot before.
    pub boot: Option<u32>,
}

impl Serialize for Reading {
    fn serialize<S: serde::Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        use serde::ser::SerializeStruct;
        let mut st = s.serialize_struct("Reading", 4 + usize::from(self.boot.is_some()))?;
        st.serialize_field("seq", &self.seq)?;
        st.serialize_field("time", &self.time)?;
        st.serialize_field("fix", &self.fix)?;
        st.serialize_field("channels", &self.channels)?;
        if let Some(boot) = self.boot {
            st.serialize_field("boot", &boot)?;
        }
        st.end()
    }
}

impl<'de> Deserialize<'de> for Reading {
    fn deserialize<D: serde::Deserializer<'de>>(d: D) -> Result<Reading, D::Error> {
        use serde::de::{Error, SeqAccess, Visitor};
        struct V;
        impl<'de> Visitor<'de> for V {
            type Value = Reading;
            fn expecting(&self, f: &mut core::fmt::Formatter<'_>) -> core::fmt::Result {
                f.write_str("a firmware-bridge reading")
            }
            fn visit_seq<A: SeqAccess<'de>>(self, mut a: A) -> Result<Reading, A::Error> {
                let seq = a
                    .next_element()?
                    .ok_or_else(|| A::Error::invalid_length(0, &self))?;
                let time = a
                    .next_element()?
                    .ok_or_else(|| A::Error::invalid_length(1, &self))?;
                let fix = a
                    .next_element()?
                    .ok_or_else(|| A::Error::invalid_length(2, &self))?;
                let channels = a
                    .next_element()?
                    .ok_or_else(|| A::Error::invalid_length(3, &self))?;
                // Version 2's field. A version 1 message ends here: postcard then reports
                // the end of its input, which is how an absent trailing field reads (the
                // frame's CRC already ruled out a body cut short on the line).
                let boot = a.next_element().unwrap_or(None);
                Ok(Reading {
                    seq,
                    time,
                    fix,
                    channels,
                    boot,
                })
            }
        }
        d.deserialize_struct("Reading", &["seq", "time", "fix", "channels", "boot"], V)
    }
}

/// Alive, and how far behind.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub struct Heartbeat {
    /// Milliseconds since boot.
    pub uptime_ms: u64,
    /// Readings the device holds that the gateway has not acknowledged.
    pub unacked: u16,
}

/// Log severity.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub enum Level {
    /// Variant 0.
    Debug,
    /// Variant 1.
    Info,
    /// Variant 2.
    Warn,
    /// Variant 3.
    Error,
}

/// A log line or an error report.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Log {
    /// Severity.
    pub level: Level,
    /// A device-specific code (0 when none).
    pub code: u16,
    /// The text, cut to [`MAX_TEXT`] bytes by the sender.
    pub text: String<MAX_TEXT>,
}

/// Settings the gateway pushes to a device.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub struct Configure {
    /// Time between samples, in milliseconds.
    pub sample_interval_ms: u32,
    /// Time between heartbeats, in milliseconds.
    pub heartbeat_interval_ms: u32,
}
