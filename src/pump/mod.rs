//! The session core: moving one session's bytes between its client and its
//! source, with the bookkeeping every session needs, and the hooks through
//! which policies take part.
//!
//! - `forward`: the pump, one per direction (the hot path): walks message
//!   headers, lets an inspector look at the few messages it must, and
//!   forwards runs of bytes as they came.
//! - `core`: the inspectors every session runs (request counting,
//!   transaction status, prepared statements, draining), and the
//!   `ClientHooks` and `ServerHooks` traits policies implement, called in
//!   message order.
//! - `woken`: a select branch polled only after its own waker fired, so a
//!   message on one direction does not poll the other and the session's
//!   rarely firing events.
//!
//! This module knows no policy: mirroring, routing, shadow reads, health
//! and recording sit above it and reach a session only through the hooks
//! (`session::policies` composes those that are configured).

pub mod core;
pub mod forward;
pub mod woken;

pub use self::forward::{pump, Hold, PumpEnd, PumpError, Verdict, MAX_STREAMED_MESSAGE};
pub use self::woken::Woken;
