//! What a replay reads: a stream of session events in time order, from a
//! pgshift capture or a Postgres csvlog.

use bytes::Bytes;

/// One thing a recorded client did. Times are Unix microseconds.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Event {
    /// A session logged in with these startup parameters (user, database,
    /// application_name, ...). Always before the session's messages.
    Start {
        session: u64,
        at_us: u64,
        params: Vec<(String, String)>,
    },
    /// A frontend message, as the client sent it: tag, length word, payload.
    Message {
        session: u64,
        at_us: u64,
        frame: Bytes,
    },
    /// The session ended (or its recording did).
    End { session: u64, at_us: u64 },
}

impl Event {
    pub fn session(&self) -> u64 {
        match self {
            Event::Start { session, .. }
            | Event::Message { session, .. }
            | Event::End { session, .. } => *session,
        }
    }
    pub fn at_us(&self) -> u64 {
        match self {
            Event::Start { at_us, .. }
            | Event::Message { at_us, .. }
            | Event::End { at_us, .. } => *at_us,
        }
    }
}
