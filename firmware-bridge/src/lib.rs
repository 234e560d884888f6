//! The serial wire protocol shared by device firmware and the gateway.
//!
//! `no_std` unless the `std` feature is on. The message types and the COBS + CRC framing
//! arrive with the firmware-bridge issue; this crate exists now so the workspace layout is
//! final and CI checks that it builds without `std`.

#![cfg_attr(not(feature = "std"), no_std)]

/// Protocol version the gateway speaks.
pub const PROTOCOL_VERSION: u16 = 1;
