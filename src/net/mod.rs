//! Sockets and TLS: the stream type every connection uses, rustls set-up,
//! and the libpq-style connect-with-sslmode used for upstream servers.

pub mod connect;
pub mod stream;
pub mod tls;

pub use stream::{send_all, Stream};
