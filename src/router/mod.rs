//! Read routing (issue 4): which reads the target serves.
//!
//! - `policy`: the stable hashed percentage and the routing keys.
//!
//! Not wired into sessions yet: every statement still goes to the source.

pub mod policy;
