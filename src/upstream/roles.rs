//! Roles, not names, for the two databases.
//!
//! The configuration names them `source` (the system of record when the
//! migration starts) and `target` (the database being migrated to). What
//! the proxy does with each follows from its role:
//!
//! - the **primary** gets every client session: its writes, its unrouted
//!   reads, its authentication; the in-doubt resolver and the row-image
//!   streams read it;
//! - the **secondary** is mirrored to, routed to and shadowed to, and is
//!   the database reads fail back from.
//!
//! Every connection the proxy opens takes its server from here, by role.
//! Today the source is always the primary. The write switch makes the
//! target primary (and mirrors back to the source) by changing which name
//! holds which role here, not the code that connects.

use crate::config::Config;
use crate::net::connect::Upstream;
use crate::upstream::passfile::PassFile;

/// One of the two databases, by the configuration's name: what health
/// samples, shadow reads and status are about. (Its discriminant indexes
/// per-database arrays.)
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Db {
    Source = 0,
    Target = 1,
}

impl Db {
    pub fn label(self) -> &'static str {
        match self {
            Db::Source => "source",
            Db::Target => "target",
        }
    }

    /// The other database.
    pub fn other(self) -> Db {
        match self {
            Db::Source => Db::Target,
            Db::Target => Db::Source,
        }
    }
}

/// What a database is for (see the module doc).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Role {
    Primary,
    Secondary,
}

impl Role {
    pub fn label(self) -> &'static str {
        match self {
            Role::Primary => "primary",
            Role::Secondary => "secondary",
        }
    }
}

/// One of the two databases as the configuration names it, with what the
/// proxy needs to reach it and to log in on its own.
#[derive(Clone)]
pub struct Database {
    /// Which of the two it is (`db.label()`: "source" or "target", the
    /// configuration's name, used in logs, metrics and status).
    pub db: Db,
    pub upstream: Upstream,
    /// The pgpass file of the proxy's own logins (`passfile` in its
    /// section), loaded once at start.
    pub passfile: Option<PassFile>,
}

impl Database {
    fn new(db: Db, cfg: &crate::config::UpstreamConfig) -> anyhow::Result<Self> {
        Ok(Self {
            db,
            upstream: Upstream::new(db.label(), cfg)?,
            passfile: cfg.passfile.as_deref().map(PassFile::load).transpose()?,
        })
    }
}

/// Both databases, and which one holds which role.
pub struct Databases {
    source: Database,
    target: Database,
}

impl Databases {
    /// Both databases from the configuration (TLS settings prepared and
    /// passfiles loaded once), the source primary.
    pub fn new(cfg: &Config) -> anyhow::Result<Self> {
        Ok(Self {
            source: Database::new(Db::Source, &cfg.source)?,
            target: Database::new(Db::Target, &cfg.target)?,
        })
    }

    /// The database the configuration calls `source`.
    pub fn source(&self) -> &Database {
        &self.source
    }

    /// The database the configuration calls `target`.
    pub fn target(&self) -> &Database {
        &self.target
    }

    /// `db`'s connection settings.
    pub fn named(&self, db: Db) -> &Database {
        match db {
            Db::Source => &self.source,
            Db::Target => &self.target,
        }
    }

    /// The database holding `role`.
    pub fn get(&self, role: Role) -> &Database {
        match role {
            Role::Primary => &self.source,
            Role::Secondary => &self.target,
        }
    }

    pub fn primary(&self) -> &Database {
        self.get(Role::Primary)
    }

    pub fn secondary(&self) -> &Database {
        self.get(Role::Secondary)
    }

    /// The role `db` holds.
    pub fn role_of(&self, db: Db) -> Role {
        if self.primary().db == db {
            Role::Primary
        } else {
            Role::Secondary
        }
    }

    /// For status: `{"primary": "source", "secondary": "target"}`.
    pub fn to_json(&self) -> serde_json::Value {
        serde_json::json!({
            "primary": self.primary().db.label(),
            "secondary": self.secondary().db.label(),
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_source_is_primary_and_each_role_names_its_database() {
        let text = crate::config::MINIMAL_CONFIG
            .replace("54321", "5001")
            .replace("54322", "5002");
        let cfg = Config::parse(&text, "t.toml", None).unwrap();
        let dbs = Databases::new(&cfg).unwrap();
        assert_eq!(dbs.primary().db.label(), "source");
        assert_eq!(dbs.primary().upstream.port, 5001);
        assert_eq!(dbs.secondary().db.label(), "target");
        assert_eq!(dbs.secondary().upstream.port, 5002);
        assert_eq!(dbs.role_of(Db::Source), Role::Primary);
        assert_eq!(dbs.role_of(Db::Target), Role::Secondary);
        assert_eq!(dbs.named(Db::Target).upstream.port, 5002);
        assert_eq!(Db::Source.other(), Db::Target);
        assert_eq!(
            dbs.to_json(),
            serde_json::json!({"primary": "source", "secondary": "target"})
        );
    }
}
