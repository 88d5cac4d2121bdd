//! Which reads go to the target: a stable hash of a routing key, compared
//! with the configured percentage.
//!
//! The hash is part of the contract: the same key must get the same answer
//! on every proxy instance, across restarts and upgrades, so an operator's
//! 5% cohort is the same 5% everywhere. It is
//!
//! ```text
//! bucket(key) = fmix64(fnv1a64(key bytes)) mod 1 000 000
//! ```
//!
//! FNV-1a (64-bit, offset basis 0xcbf29ce484222325, prime 0x100000001b3)
//! followed by MurmurHash3's 64-bit finalizer (which spreads keys that
//! differ only in their last characters, like session numbers). A key goes
//! to the target when its bucket is below `read_percent × 10 000`: raising
//! the percentage only adds buckets, so a key that was on the target stays
//! there, and the resolution is 0.0001%.

use std::borrow::Cow;

use crate::classify::analyze::fnv1a;

/// Buckets keys fall into.
pub const BUCKETS: u64 = 1_000_000;

/// MurmurHash3's fmix64.
fn fmix64(mut k: u64) -> u64 {
    k ^= k >> 33;
    k = k.wrapping_mul(0xff51_afd7_ed55_8ccd);
    k ^= k >> 33;
    k = k.wrapping_mul(0xc4ce_b9fe_1a85_ec53);
    k ^ (k >> 33)
}

/// The bucket of a routing key, in `0..BUCKETS`.
pub fn bucket(key: &[u8]) -> u64 {
    fmix64(fnv1a(key)) % BUCKETS
}

/// Buckets below this go to the target (`read_percent` is clamped to
/// 0..=100; NaN counts as 0).
pub fn threshold(read_percent: f64) -> u64 {
    if read_percent.is_nan() {
        return 0;
    }
    (read_percent.clamp(0.0, 100.0) * (BUCKETS as f64 / 100.0)).round() as u64
}

/// Whether a read with this key goes to the target.
pub fn to_target(key: &[u8], read_percent: f64) -> bool {
    bucket(key) < threshold(read_percent)
}

/// The value of `name` in a query's trailing sqlcommenter comment
/// (`SELECT ... /*route_key='42',action='list'*/`), URL-decoded.
///
/// Only the comment that ends the statement is read, as the sqlcommenter
/// specification places it there: text inside a string literal earlier in
/// the query cannot pose as one.
pub fn comment_value<'a>(sql: &'a str, name: &str) -> Option<Cow<'a, str>> {
    let body = sql
        .trim_end_matches(|c: char| c.is_whitespace() || c == ';' || c == '\0')
        .strip_suffix("*/")?;
    let start = body.rfind("/*")?;
    let comment = &body[start + 2..];
    for pair in comment.split(',') {
        let Some((k, v)) = pair.split_once('=') else {
            continue;
        };
        if url_decode(k.trim()) != name {
            continue;
        }
        let v = v.trim();
        let v = v
            .strip_prefix('\'')
            .and_then(|v| v.strip_suffix('\''))
            .unwrap_or(v);
        return Some(url_decode(v));
    }
    None
}

/// Percent-decoding as sqlcommenter uses it; malformed escapes stay as
/// they are.
fn url_decode(s: &str) -> Cow<'_, str> {
    if !s.contains('%') {
        return Cow::Borrowed(s);
    }
    let b = s.as_bytes();
    let mut out = Vec::with_capacity(b.len());
    let mut i = 0;
    while i < b.len() {
        let hex = |c: u8| (c as char).to_digit(16);
        match (
            b[i],
            b.get(i + 1).and_then(|&c| hex(c)),
            b.get(i + 2).and_then(|&c| hex(c)),
        ) {
            (b'%', Some(h), Some(l)) => {
                out.push((h * 16 + l) as u8);
                i += 3;
            }
            (c, _, _) => {
                out.push(c);
                i += 1;
            }
        }
    }
    Cow::Owned(String::from_utf8_lossy(&out).into_owned())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_hash_is_the_documented_one() {
        // Computed independently (Python) from the definition above: these
        // must never change, or cohorts move between versions.
        assert_eq!(bucket(b"alice"), 557_236);
        assert_eq!(bucket(b"bob"), 329_952);
        assert_eq!(bucket(b""), 514_342);
        assert_eq!(bucket(b"42"), 202_476);
    }

    #[test]
    fn ten_percent_of_5000_sessions_is_within_8_to_12_percent() {
        let n = (1..=5000u64)
            .filter(|i| to_target(i.to_string().as_bytes(), 10.0))
            .count();
        assert!((400..=600).contains(&n), "{n} of 5000 routed");
    }

    #[test]
    fn raising_the_percentage_only_adds_keys() {
        let keys: Vec<String> = (0..20_000).map(|i| format!("user-{i}")).collect();
        for (lo, hi) in [
            (0.0, 1.0),
            (1.0, 5.0),
            (5.0, 25.0),
            (10.0, 20.0),
            (25.0, 100.0),
        ] {
            for k in &keys {
                if to_target(k.as_bytes(), lo) {
                    assert!(to_target(k.as_bytes(), hi), "{k} left at {hi}%");
                }
            }
        }
        assert!(keys.iter().all(|k| to_target(k.as_bytes(), 100.0)));
        assert!(!keys.iter().any(|k| to_target(k.as_bytes(), 0.0)));
        assert_eq!(threshold(0.0001), 1);
        assert_eq!(threshold(f64::NAN), 0);
        assert_eq!(threshold(250.0), BUCKETS);
    }

    #[test]
    fn trailing_sqlcommenter_comment_carries_the_key() {
        let v = |sql: &str| comment_value(sql, "route_key").map(|c| c.into_owned());
        assert_eq!(v("SELECT 1 /*route_key='42'*/"), Some("42".into()));
        assert_eq!(
            v("select * from t /*action='list',route_key='a%2Cb%27c'*/ ;\n"),
            Some("a,b'c".into())
        );
        assert_eq!(v("SELECT 1 /* route_key = '7' */"), Some("7".into()));
        assert_eq!(v("SELECT 1 /*other='1'*/"), None);
        assert_eq!(v("SELECT '/*route_key=''1''*/' AS x"), None);
        assert_eq!(v("SELECT 1 /*route_key='9'*/ WHERE true"), None);
        assert_eq!(v("SELECT 1 -- route_key='1'"), None);
        assert_eq!(v("SELECT 1 /*route_key='%zz'*/"), Some("%zz".into()));
    }
}
