//! The proxy's own connections to servers: which database holds which role
//! (`roles`: primary and secondary, where every connection takes its server
//! from), the per-session link to the target, the client side of
//! authentication it needs for that, and the pgpass file its credentials
//! come from. (A client session's connection to the primary is opened in
//! `session::startup`, because its authentication is relayed from the
//! client rather than performed by the proxy.)

pub mod login;
pub mod passfile;
pub mod roles;
pub mod target;
