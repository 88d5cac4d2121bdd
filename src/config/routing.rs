//! `[routing]`: which reads go to the target, by cohort.

use serde::{Deserialize, Serialize};

/// Which reads go to the target (see `router`).
#[derive(Debug, Clone, PartialEq, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct RoutingConfig {
    /// Share of eligible reads sent to the target, 0 to 100 (fractions allowed).
    #[serde(default)]
    pub read_percent: f64,
    /// What is hashed to decide: one decision per session, per user, ...
    #[serde(default)]
    pub hash_key: HashKey,
    /// With `hash_key = "comment"`: the sqlcommenter key holding the value.
    #[serde(default = "default_comment_key")]
    pub comment_key: String,
    /// A routed read with no complete answer from the target within this
    /// runs on the source instead.
    #[serde(default = "default_target_timeout_ms")]
    pub target_timeout_ms: u64,
}

impl Default for RoutingConfig {
    fn default() -> Self {
        Self {
            read_percent: 0.0,
            hash_key: HashKey::default(),
            comment_key: default_comment_key(),
            target_timeout_ms: default_target_timeout_ms(),
        }
    }
}

/// What a routing decision hashes.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Deserialize, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum HashKey {
    #[default]
    Session,
    User,
    ApplicationName,
    ClientAddr,
    /// A key in the query's sqlcommenter comment, else the session.
    Comment,
}

fn default_comment_key() -> String {
    "route_key".into()
}
fn default_target_timeout_ms() -> u64 {
    2_000
}

impl RoutingConfig {
    pub fn validate(&self) -> Result<(), (String, String)> {
        let err = |k: &str, m: &str| Err((k.to_string(), m.to_string()));
        if !(0.0..=100.0).contains(&self.read_percent) {
            return err("routing.read_percent", "must be between 0 and 100");
        }
        if self.comment_key.is_empty()
            || !self
                .comment_key
                .bytes()
                .all(|b| b.is_ascii_alphanumeric() || b == b'_' || b == b'-' || b == b'.')
        {
            return err(
                "routing.comment_key",
                "must be a non-empty name of letters, digits, '_', '-' or '.'",
            );
        }
        if !(1..=3_600_000).contains(&self.target_timeout_ms) {
            return err("routing.target_timeout_ms", "must be between 1 and 3600000");
        }
        Ok(())
    }
}
