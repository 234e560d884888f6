//! Framing: `COBS(postcard(message) ++ CRC-32C as 4 little-endian bytes) ++ 0x00`.
//!
//! COBS removes every `0x00` from the frame body, so `0x00` only ever ends a frame: after
//! line noise, a truncated frame or garbage, the [`Decoder`] throws away what it holds at
//! the next `0x00` and the frame after it decodes cleanly. The CRC (CRC-32C, Castagnoli)
//! rejects corrupted bodies; a body whose CRC matches but whose message type is newer
//! than this crate is reported as [`FrameError::UnknownType`] so the caller can skip and
//! count it.

use serde::de::DeserializeOwned;
use serde::Serialize;

use crate::message::{DeviceMessage, GatewayMessage};

/// Largest postcard encoding of one message, before the CRC.
pub const MAX_PAYLOAD: usize = 256;
/// Largest frame on the wire, delimiter included.
pub const MAX_FRAME: usize = cobs::max_encoding_length(MAX_PAYLOAD + CRC_LEN) + 1;

const CRC_LEN: usize = 4;
const CRC: crc::Crc<u32> = crc::Crc::<u32>::new(&crc::CRC_32_ISCSI);

/// A message type that travels in frames: its encoding starts with the variant index
/// (the message type) as a postcard varint.
pub trait Message: Serialize + DeserializeOwned {
    /// How many message types this version knows; indexes from here on are newer.
    const TYPES: u32;
}

impl Message for DeviceMessage {
    const TYPES: u32 = 5;
}

impl Message for GatewayMessage {
    const TYPES: u32 = 4;
}

/// Why a frame was not turned into a message.
#[non_exhaustive]
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum FrameError {
    /// Encoding: the message needs more than [`MAX_PAYLOAD`] bytes, or the output buffer
    /// is shorter than [`MAX_FRAME`].
    TooLarge,
    /// More than [`MAX_FRAME`] bytes arrived without a delimiter; they were discarded up
    /// to the next `0x00`.
    Oversize,
    /// The body is not valid COBS (a `0x00` was lost or bytes were corrupted).
    Cobs,
    /// The body is shorter than a message type and a CRC.
    Short,
    /// The CRC does not match: the bytes were corrupted on the way.
    Crc,
    /// The CRC matches but the message type is one this version does not know (a newer
    /// sender). Skip it and count it.
    UnknownType(u32),
    /// The CRC matches and the type is known, but the message does not decode.
    Malformed,
}

impl core::fmt::Display for FrameError {
    fn fmt(&self, f: &mut core::fmt::Formatter<'_>) -> core::fmt::Result {
        match self {
            FrameError::TooLarge => write!(f, "message too large for a frame"),
            FrameError::Oversize => write!(f, "frame longer than {MAX_FRAME} bytes"),
            FrameError::Cobs => write!(f, "bad COBS encoding"),
            FrameError::Short => write!(f, "frame too short"),
            FrameError::Crc => write!(f, "CRC mismatch"),
            FrameError::UnknownType(t) => write!(f, "unknown message type {t}"),
            FrameError::Malformed => write!(f, "message does not decode"),
        }
    }
}

#[cfg(feature = "std")]
impl std::error::Error for FrameError {}

/// Encodes `msg` as one frame, delimiter included, into `out` (at least [`MAX_FRAME`]
/// bytes); returns how many bytes it wrote.
pub fn encode<M: Message>(msg: &M, out: &mut [u8]) -> Result<usize, FrameError> {
    let mut raw = [0u8; MAX_PAYLOAD + CRC_LEN];
    let used = postcard::to_slice(msg, &mut raw[..MAX_PAYLOAD])
        .map_err(|_| FrameError::TooLarge)?
        .len();
    seal(&mut raw, used, out)
}

/// Frames the message bytes `raw[..used]`: appends the CRC, then COBS and the delimiter
/// into `out`.
fn seal(
    raw: &mut [u8; MAX_PAYLOAD + CRC_LEN],
    used: usize,
    out: &mut [u8],
) -> Result<usize, FrameError> {
    let crc = CRC.checksum(&raw[..used]);
    raw[used..used + CRC_LEN].copy_from_slice(&crc.to_le_bytes());
    let body = &raw[..used + CRC_LEN];
    if out.len() < cobs::max_encoding_length(body.len()) + 1 {
        return Err(FrameError::TooLarge);
    }
    let written = cobs::encode(body, out);
    out[written] = 0;
    Ok(written + 1)
}

/// Decodes one frame body (the bytes between two delimiters, without them), in place.
pub fn decode_frame<M: Message>(frame: &mut [u8]) -> Result<M, FrameError> {
    decode_message(check_frame(frame)?)
}

/// Checks one frame body (the bytes between two delimiters, without them) in place:
/// COBS, length and CRC. Returns the message's bytes (its type, then its fields; the
/// CRC cut off), for [`decode_message`]. A receiver that wants the bytes of a message it
/// cannot decode (to keep them, see [`reading_seq`]) decodes in these two steps.
pub fn check_frame(frame: &mut [u8]) -> Result<&[u8], FrameError> {
    let n = cobs::decode_in_place(frame).map_err(|_| FrameError::Cobs)?;
    if n < 1 + CRC_LEN {
        return Err(FrameError::Short);
    }
    let (body, crc) = frame[..n].split_at(n - CRC_LEN);
    if CRC.checksum(body).to_le_bytes() != crc {
        return Err(FrameError::Crc);
    }
    Ok(body)
}

/// Decodes a message's bytes (what [`check_frame`] returns).
pub fn decode_message<M: Message>(body: &[u8]) -> Result<M, FrameError> {
    let ty = message_type(body).ok_or(FrameError::Malformed)?;
    if ty >= M::TYPES {
        return Err(FrameError::UnknownType(ty));
    }
    // Trailing bytes are fields a newer sender appended; this version ignores them.
    postcard::from_bytes(body).map_err(|_| FrameError::Malformed)
}

/// The `seq` of a device message's bytes (what [`check_frame`] returns) that are a
/// [`Reading`](crate::Reading), read without decoding the rest: `seq` is its first
/// field. A reading this version cannot decode (a newer firmware put an enum value in
/// it that this one does not know) is still known by its `seq`, so a gateway can keep
/// its bytes and acknowledge it instead of leaving it unacknowledged for good.
pub fn reading_seq(body: &[u8]) -> Option<u32> {
    let ty_len = varint_len(body)?;
    if message_type(body)? != READING_TYPE {
        return None;
    }
    message_type(&body[ty_len..])
}

/// The message type of [`DeviceMessage::Reading`].
const READING_TYPE: u32 = 1;

/// The length of the varint `bytes` starts with, if it ends within 5 bytes.
fn varint_len(bytes: &[u8]) -> Option<usize> {
    bytes
        .iter()
        .take(5)
        .position(|b| b & 0x80 == 0)
        .map(|i| i + 1)
}

/// Frames a message's bytes as they are (what [`check_frame`] returns): CRC, COBS,
/// delimiter, into `out`; the frame's length. For tests and simulators that send bytes
/// a real sender would (a newer firmware's message).
pub fn encode_raw(body: &[u8], out: &mut [u8]) -> Result<usize, FrameError> {
    if body.len() > MAX_PAYLOAD {
        return Err(FrameError::TooLarge);
    }
    let mut raw = [0u8; MAX_PAYLOAD + CRC_LEN];
    raw[..body.len()].copy_from_slice(body);
    seal(&mut raw, body.len(), out)
}

/// The leading varint (the enum variant index) as a u32, as postcard reads one: at most
/// 5 bytes, the fifth carrying 4 bits.
fn message_type(body: &[u8]) -> Option<u32> {
    let mut v: u32 = 0;
    for (i, &b) in body.iter().take(5).enumerate() {
        if i == 4 && b > 0x0f {
            return None;
        }
        v |= u32::from(b & 0x7f) << (7 * i);
        if b & 0x80 == 0 {
            return Some(v);
        }
    }
    None
}

/// Turns a byte stream into frames. Holds at most one frame ([`MAX_FRAME`] bytes); no
/// allocation, no panics on any input.
#[derive(Debug, Clone)]
pub struct Decoder {
    buf: [u8; MAX_FRAME],
    len: usize,
    overflow: bool,
}

impl Default for Decoder {
    fn default() -> Self {
        Self::new()
    }
}

impl Decoder {
    /// An empty decoder.
    pub const fn new() -> Self {
        Decoder {
            buf: [0; MAX_FRAME],
            len: 0,
            overflow: false,
        }
    }

    /// Takes one byte. At a delimiter that ends a non-empty frame it returns the message
    /// or why there is none; empty frames (repeated delimiters) are ignored.
    pub fn push<M: Message>(&mut self, byte: u8) -> Option<Result<M, FrameError>> {
        self.push_checked(byte)
            .map(|checked| checked.and_then(decode_message))
    }

    /// [`Decoder::push`] that stops short of decoding: at a delimiter that ends a
    /// non-empty frame it returns the message's bytes, checked (see [`check_frame`]),
    /// or why there are none.
    pub fn push_checked(&mut self, byte: u8) -> Option<Result<&[u8], FrameError>> {
        if byte == 0 {
            let len = core::mem::take(&mut self.len);
            if core::mem::take(&mut self.overflow) {
                return Some(Err(FrameError::Oversize));
            }
            if len == 0 {
                return None;
            }
            return Some(check_frame(&mut self.buf[..len]));
        }
        if self.overflow {
            return None;
        }
        if self.len == MAX_FRAME - 1 {
            self.overflow = true;
            self.len = 0;
            return None;
        }
        self.buf[self.len] = byte;
        self.len += 1;
        None
    }

    /// Takes a run of bytes and calls `each` for every frame that ends in it.
    pub fn feed<M: Message>(&mut self, bytes: &[u8], mut each: impl FnMut(Result<M, FrameError>)) {
        for &b in bytes {
            if let Some(r) = self.push(b) {
                each(r);
            }
        }
    }

    /// Drops a partial frame (after a reconnect, say).
    pub fn reset(&mut self) {
        self.len = 0;
        self.overflow = false;
    }
}

/// What one delimiter produced; see [`Decoder::push`].
pub type Decoded<M> = Result<M, FrameError>;

#[cfg(test)]
mod tests;
