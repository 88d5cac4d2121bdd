//! Which authentication methods the proxy's own logins accept from a
//! server (`source.require_auth`, `target.require_auth`), with libpq's
//! `require_auth` syntax and meaning.
//!
//! The proxy logs in with passwords from a passfile. A server (or an
//! impostor on the way) can ask for any method, including a cleartext
//! password; without a limit the proxy would send the password as asked.
//! The default therefore leaves out `password`: the proxy answers md5 and
//! SCRAM-SHA-256 requests, and a server that asks for nothing (trust), but
//! never sends a password in the clear unless the operator allows it.

use std::fmt;

/// A method a server can ask for (or not ask for anything: `None`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum AuthMethod {
    Password,
    Md5,
    ScramSha256,
    None,
}

impl AuthMethod {
    const ALL: [AuthMethod; 4] = [
        AuthMethod::Password,
        AuthMethod::Md5,
        AuthMethod::ScramSha256,
        AuthMethod::None,
    ];

    /// Its name in `require_auth`.
    pub fn name(self) -> &'static str {
        match self {
            AuthMethod::Password => "password",
            AuthMethod::Md5 => "md5",
            AuthMethod::ScramSha256 => "scram-sha-256",
            AuthMethod::None => "none",
        }
    }

    /// What a server asking for it asks for, for errors.
    pub fn describe(self) -> &'static str {
        match self {
            AuthMethod::Password => "a cleartext password (\"password\")",
            AuthMethod::Md5 => "an md5 password (\"md5\")",
            AuthMethod::ScramSha256 => "SCRAM-SHA-256 (\"scram-sha-256\")",
            AuthMethod::None => "no authentication (\"none\")",
        }
    }

    fn bit(self) -> u8 {
        1 << self as u8
    }

    fn from_name(name: &str) -> Option<Self> {
        Self::ALL.into_iter().find(|m| m.name() == name)
    }
}

/// A parsed `require_auth`: the methods it lists, and whether they are
/// the ones allowed or (all negated with `!`) the ones refused.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct RequireAuth {
    listed: u8,
    negated: bool,
}

/// The default: everything but a cleartext password.
pub const DEFAULT: &str = "scram-sha-256,md5,none";

impl Default for RequireAuth {
    fn default() -> Self {
        Self {
            listed: AuthMethod::ScramSha256.bit() | AuthMethod::Md5.bit() | AuthMethod::None.bit(),
            negated: false,
        }
    }
}

impl RequireAuth {
    /// Anything the login supports (libpq's behaviour without
    /// `require_auth`).
    pub fn any() -> Self {
        Self {
            listed: 0,
            negated: true,
        }
    }

    pub fn allows(self, m: AuthMethod) -> bool {
        (self.listed & m.bit() != 0) != self.negated
    }
}

impl std::str::FromStr for RequireAuth {
    type Err = String;

    /// libpq's syntax: `method[,method...]`, each optionally negated with
    /// `!` (all or none of them), among `password`, `md5`, `scram-sha-256`
    /// and `none`; no method twice.
    fn from_str(s: &str) -> Result<Self, String> {
        let mut listed = 0u8;
        let mut negated = None;
        for item in s.split(',').map(str::trim) {
            if item.is_empty() {
                return Err(format!(
                    "{s:?} has an empty method; list methods among password, md5, scram-sha-256 and none, separated by commas"
                ));
            }
            let (neg, name) = match item.strip_prefix('!') {
                Some(n) => (true, n),
                None => (false, item),
            };
            if *negated.get_or_insert(neg) != neg {
                return Err(format!(
                    "negated method {:?} cannot be mixed with methods that are not negated",
                    if neg { item } else { s }
                ));
            }
            let m = AuthMethod::from_name(name).ok_or_else(|| {
                format!(
                    "unknown method {name:?}: the proxy's logins support password, md5, scram-sha-256 and none"
                )
            })?;
            if listed & m.bit() != 0 {
                return Err(format!("method {name:?} is listed more than once"));
            }
            listed |= m.bit();
        }
        let negated = negated.unwrap_or(false);
        if negated && listed == AuthMethod::ALL.iter().fold(0, |a, m| a | m.bit()) {
            return Err("every method is negated: no server could be logged in to".into());
        }
        Ok(Self { listed, negated })
    }
}

impl fmt::Display for RequireAuth {
    /// As written (in a canonical order): `scram-sha-256,md5,none`,
    /// `!password`; `any` for no limit.
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        if self.negated && self.listed == 0 {
            return f.write_str("any");
        }
        let names: Vec<String> = [
            AuthMethod::ScramSha256,
            AuthMethod::Md5,
            AuthMethod::Password,
            AuthMethod::None,
        ]
        .into_iter()
        .filter(|m| self.listed & m.bit() != 0)
        .map(|m| format!("{}{}", if self.negated { "!" } else { "" }, m.name()))
        .collect();
        f.write_str(&names.join(","))
    }
}

impl<'de> serde::Deserialize<'de> for RequireAuth {
    fn deserialize<D: serde::Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        let s = String::deserialize(d)?;
        s.parse().map_err(serde::de::Error::custom)
    }
}

impl serde::Serialize for RequireAuth {
    fn serialize<S: serde::Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        s.serialize_str(&self.to_string())
    }
}

#[cfg(test)]
mod tests {
    use super::AuthMethod::*;
    use super::*;

    fn parse(s: &str) -> Result<RequireAuth, String> {
        s.parse()
    }

    #[test]
    fn the_default_allows_everything_but_a_cleartext_password() {
        let d = RequireAuth::default();
        assert!(d.allows(ScramSha256) && d.allows(Md5) && d.allows(None));
        assert!(!d.allows(Password));
        assert_eq!(d.to_string(), DEFAULT);
        assert_eq!(parse(DEFAULT), Ok(d));
        let any = RequireAuth::any();
        assert!(AuthMethod::ALL.iter().all(|&m| any.allows(m)));
    }

    #[test]
    fn listed_methods_are_the_allowed_ones_and_negated_ones_the_refused() {
        let r = parse("scram-sha-256").unwrap();
        assert!(r.allows(ScramSha256));
        assert!(!r.allows(Md5) && !r.allows(Password) && !r.allows(None));
        let r = parse(" password , md5").unwrap();
        assert!(r.allows(Password) && r.allows(Md5));
        assert!(!r.allows(ScramSha256) && !r.allows(None));
        let r = parse("!password,!none").unwrap();
        assert!(r.allows(Md5) && r.allows(ScramSha256));
        assert!(!r.allows(Password) && !r.allows(None));
        assert_eq!(r.to_string(), "!password,!none");
        assert_eq!(parse(&r.to_string()), Ok(r));
    }

    #[test]
    fn libpq_rejections() {
        for (bad, says) in [
            ("", "empty method"),
            ("md5,", "empty method"),
            ("md5,!password", "cannot be mixed"),
            ("!md5,password", "cannot be mixed"),
            ("gss", "unknown method"),
            ("SCRAM", "unknown method"),
            ("md5,md5", "more than once"),
            (
                "!password,!md5,!scram-sha-256,!none",
                "every method is negated",
            ),
        ] {
            let e = parse(bad).unwrap_err();
            assert!(e.contains(says), "{bad:?}: {e}");
        }
    }
}
