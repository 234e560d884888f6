//! The serial wire protocol shared by device firmware and the gateway.
//!
//! `no_std` unless the `std` feature is on, and no allocator either way: firmware and the
//! gateway compile the same message types and the same framing, so they cannot drift.
//! The byte-level specification, with worked examples, is `WIRE-FORMAT.md` beside this
//! crate's `Cargo.toml`; the golden tests in [`frame`] pin it.
//!
//! - [`message`]: what travels. Device to gateway: [`DeviceMessage`] (`Hello`, `Reading`,
//!   `Heartbeat`, `Log`, `Error`). Gateway to device: [`GatewayMessage`] (`Ack`,
//!   `TimeSync`, `Configure`, `Resend`).
//! - [`frame`]: how it travels. A frame is `COBS(postcard(message) ++ CRC-32C) ++ 0x00`.
//!   [`frame::encode`] writes one into a caller's buffer; [`frame::Decoder`] takes bytes
//!   as they arrive, resynchronises at the next `0x00` after any corruption, and never
//!   panics.
//! - [`device`]: the device side of the exchange as a state machine over a small hardware
//!   trait ([`device::Board`]): sampling, the ring buffer of unacknowledged readings,
//!   resending, acks, clock sync, heartbeats and `Configure`. Firmware, tests and
//!   simulators share it.

#![cfg_attr(not(feature = "std"), no_std)]

pub mod device;
pub mod frame;
pub mod message;

pub use frame::{
    check_frame, decode_frame, decode_message, encode, encode_raw, reading_seq, Decoded, Decoder,
    FrameError, MAX_FRAME, MAX_PAYLOAD,
};
pub use message::{
    Capabilities, Channel, Configure, DeviceMessage, Fix, FixQuality, GatewayMessage, Heartbeat,
    Hello, Level, Log, Reading, Timestamp, MAX_CHANNELS, MAX_DEVICE_ID, MAX_TEXT, MAX_VERSION,
};

/// The protocol version this crate speaks; a device sends its own in [`Hello`]. Version 2
/// added [`Reading::boot`]; this crate reads version 1 messages too.
pub const PROTOCOL_VERSION: u16 = 2;
