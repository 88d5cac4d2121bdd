//! The PostgreSQL v3 wire protocol, as much of it as the proxy needs.
//!
//! The proxy never re-encodes traffic it forwards. This module gives it three
//! things: length framing with hard bounds (`frame`), decoders for the handful
//! of messages whose contents matter to the proxy (`message` for the client's,
//! `rows` for results, `error` for errors and notices, `startup`), and
//! builders for the few messages the proxy itself originates (`error`).
//! Every decoder works on a bounded byte slice and returns an error instead of
//! panicking on malformed input.

pub mod error;
pub mod frame;
pub mod message;
pub mod rows;
pub mod sqlstate;
pub mod startup;

pub use frame::{FrameError, Header};

/// Text from the wire as a `str`: borrowed when it is valid UTF-8 (always,
/// with a UTF-8 client encoding), replaced characters otherwise. Checks
/// with `str::from_utf8` first, which is several times cheaper than
/// `String::from_utf8_lossy` on the valid text every message carries.
pub fn text_lossy(bytes: &[u8]) -> std::borrow::Cow<'_, str> {
    match std::str::from_utf8(bytes) {
        Ok(t) => std::borrow::Cow::Borrowed(t),
        Err(_) => String::from_utf8_lossy(bytes),
    }
}
