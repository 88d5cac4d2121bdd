//! The proxy's own connections to servers: the per-session link to the
//! target, the client side of authentication it needs for that, and the
//! pgpass file its credentials come from. (The source connection of a client
//! session is opened in `session::startup`, because its authentication is
//! relayed from the client rather than performed by the proxy.)

pub mod login;
pub mod passfile;
pub mod target;
