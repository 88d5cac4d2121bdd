//! pgpass files: `hostname:port:database:username:password`, `*` matching
//! anything, `\:` and `\\` escapes, first matching line wins (as libpq).

use std::path::Path;

use anyhow::{bail, Context};

#[derive(Clone, Default)]
pub struct PassFile {
    entries: Vec<[String; 5]>,
}

impl std::fmt::Debug for PassFile {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        // Never print passwords.
        write!(f, "PassFile({} entries)", self.entries.len())
    }
}

impl PassFile {
    pub fn load(path: &Path) -> anyhow::Result<Self> {
        #[cfg(unix)]
        {
            use std::os::unix::fs::PermissionsExt;
            let meta = std::fs::metadata(path)
                .with_context(|| format!("cannot read {}", path.display()))?;
            if meta.permissions().mode() & 0o077 != 0 {
                bail!(
                    "{} has group or world access; permissions should be u=rw (0600) or less",
                    path.display()
                );
            }
        }
        let text = std::fs::read_to_string(path)
            .with_context(|| format!("cannot read {}", path.display()))?;
        Ok(Self::parse(&text))
    }

    pub fn parse(text: &str) -> Self {
        let entries = text
            .lines()
            .filter(|l| !l.trim_start().starts_with('#') && !l.trim().is_empty())
            .filter_map(split_line)
            .collect();
        Self { entries }
    }

    pub fn lookup(&self, host: &str, port: u16, database: &str, user: &str) -> Option<&str> {
        let port = port.to_string();
        let wanted = [host, port.as_str(), database, user];
        self.entries
            .iter()
            .find(|e| {
                e[..4]
                    .iter()
                    .zip(wanted)
                    .all(|(pat, v)| pat == "*" || pat == v)
            })
            .map(|e| e[4].as_str())
    }
}

fn split_line(line: &str) -> Option<[String; 5]> {
    let mut fields: Vec<String> = vec![String::new()];
    let mut chars = line.chars();
    while let Some(c) = chars.next() {
        match c {
            '\\' => fields.last_mut()?.push(chars.next().unwrap_or('\\')),
            ':' if fields.len() < 5 => fields.push(String::new()),
            c => fields.last_mut()?.push(c),
        }
    }
    fields.try_into().ok()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn matches_first_line_with_wildcards_and_escapes() {
        let pf = PassFile::parse(
            "# comment\n127.0.0.1:54322:db1:alice:first\n*:*:*:alice:any\n*:54322:*:bob:pa\\:ss\\\\word\nshort:line\n",
        );
        assert_eq!(pf.lookup("127.0.0.1", 54322, "db1", "alice"), Some("first"));
        assert_eq!(pf.lookup("127.0.0.1", 54322, "db2", "alice"), Some("any"));
        assert_eq!(pf.lookup("h", 54322, "x", "bob"), Some("pa:ss\\word"));
        assert_eq!(pf.lookup("h", 1, "x", "bob"), None);
        assert_eq!(pf.lookup("h", 1, "x", "carol"), None);
    }

    #[test]
    fn password_may_contain_colons_unescaped() {
        let pf = PassFile::parse("h:1:d:u:a:b");
        assert_eq!(pf.lookup("h", 1, "d", "u"), Some("a:b"));
    }

    #[test]
    fn debug_hides_passwords() {
        let pf = PassFile::parse("h:1:d:u:secret");
        assert!(!format!("{pf:?}").contains("secret"));
    }
}
