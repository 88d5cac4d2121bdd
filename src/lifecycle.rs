//! The proxy's lifecycle phase. The listener sets it; every session and
//! background task (the applier, row-image reader, recovery) watches it to
//! know when to drain and when to stop. Kept apart from `proxy` so that
//! those tasks need not know the proxy's whole context.

/// Lifecycle of the whole proxy, watched by every session.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Phase {
    Running,
    /// Stop accepting; end each session at its next idle moment.
    Draining,
    /// The drain deadline passed: end every session now.
    Closing,
}
