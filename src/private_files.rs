//! Files and directories only the proxy's own user may read.
//!
//! The proxy writes statement texts, bind parameters, result rows and
//! recorded client traffic to local disk (the audit log, the mismatch and
//! divergence logs, gaps, captures, the spool). Whatever the umask of the
//! process that started it, those must not be readable by other users: files
//! are created `0600` and directories `0700`, and a file or directory the
//! proxy owns that already exists with group or other bits is tightened
//! (with a warning naming it) before anything is written to it.
//!
//! Every module that writes data to disk (the spool, the in-flight journal,
//! the logs, recordings) creates its files through these helpers.

use anyhow::{bail, Context};
use std::fs::{DirBuilder, File, OpenOptions};
use std::io;
use std::os::unix::fs::{DirBuilderExt, OpenOptionsExt, PermissionsExt};
use std::path::Path;

/// Mode of every file the proxy creates.
pub const FILE_MODE: u32 = 0o600;
/// Mode of every directory the proxy creates.
pub const DIR_MODE: u32 = 0o700;
/// Permission bits that let anyone but the owner in.
const OTHERS: u32 = 0o077;

/// `OpenOptions` that create the file with mode 0600 (the mode applies
/// only when the open creates the file; see `tighten_file` for one that
/// exists). Callers add the access flags they need.
pub fn options() -> OpenOptions {
    let mut o = OpenOptions::new();
    o.mode(FILE_MODE);
    o
}

/// Opens `path` for appending, creating it 0600; an existing file with
/// group or other bits is tightened first.
pub fn open_append(path: &Path) -> io::Result<File> {
    let file = options().create(true).append(true).open(path)?;
    tighten_file(&file, path)?;
    Ok(file)
}

/// Creates `path` (which must not exist) for writing, mode 0600.
pub fn create_new(path: &Path) -> io::Result<File> {
    options().write(true).create_new(true).open(path)
}

/// Writes `contents` to `path` (created 0600 or truncated, and tightened
/// when it exists): a private `std::fs::write`.
pub fn write(path: &Path, contents: impl AsRef<[u8]>) -> io::Result<()> {
    use std::io::Write;
    let mut file = options()
        .write(true)
        .create(true)
        .truncate(true)
        .open(path)?;
    tighten_file(&file, path)?;
    file.write_all(contents.as_ref())
}

/// Creates `dir` and any missing parents with mode 0700. Directories that
/// already exist are left as they are (a parent may be shared, such as
/// `/var/lib`); use `private_dir` for a directory the proxy owns.
pub fn create_dir_all(dir: &Path) -> io::Result<()> {
    DirBuilder::new().recursive(true).mode(DIR_MODE).create(dir)
}

/// Creates the parent directory of `path` as `create_dir_all` does, when
/// there is one to create.
pub fn create_parent(path: &Path) -> io::Result<()> {
    match path.parent().filter(|d| !d.as_os_str().is_empty()) {
        Some(dir) => create_dir_all(dir),
        None => Ok(()),
    }
}

/// A directory the proxy owns (the spool): created 0700, or tightened to
/// owner-only when it exists with group or other bits.
pub fn private_dir(dir: &Path) -> io::Result<()> {
    create_dir_all(dir)?;
    tighten(dir)?;
    Ok(())
}

/// Clears the group and other bits of an open file; logs a warning naming
/// `path` when there were any. Returns whether it changed the mode.
pub fn tighten_file(file: &File, path: &Path) -> io::Result<bool> {
    let mode = file.metadata()?.permissions().mode();
    if mode & OTHERS == 0 {
        return Ok(false);
    }
    let new = mode & !OTHERS & 0o7777;
    file.set_permissions(std::fs::Permissions::from_mode(new))?;
    warn_tightened(path, mode, new);
    Ok(true)
}

/// Clears the group and other bits of the file or directory at `path`
/// (following symlinks); logs a warning naming it when there were any.
/// Returns whether it changed the mode.
pub fn tighten(path: &Path) -> io::Result<bool> {
    let mode = std::fs::metadata(path)?.permissions().mode();
    if mode & OTHERS == 0 {
        return Ok(false);
    }
    let new = mode & !OTHERS & 0o7777;
    std::fs::set_permissions(path, std::fs::Permissions::from_mode(new))?;
    warn_tightened(path, mode, new);
    Ok(true)
}

fn warn_tightened(path: &Path, old: u32, new: u32) {
    tracing::warn!(
        path = %path.display(),
        old_mode = format!("{:04o}", old & 0o7777),
        new_mode = format!("{new:04o}"),
        "tightened permissions: other users could read what the proxy writes here"
    );
}

/// Whether `mode` lets group or others read, write or enter.
pub fn is_shared(mode: u32) -> bool {
    mode & OTHERS != 0
}

/// Reads a bearer token file: its first line, trimmed, must not be empty,
/// and no one but its owner may read or write it.
pub fn read_token(path: &Path) -> anyhow::Result<String> {
    use std::os::unix::fs::PermissionsExt;
    let meta =
        std::fs::metadata(path).with_context(|| format!("cannot read {}", path.display()))?;
    if is_shared(meta.permissions().mode()) {
        bail!(
            "{} has group or world access (mode {:04o}); permissions should be u=rw (0600) or less",
            path.display(),
            meta.permissions().mode() & 0o7777
        );
    }
    let text =
        std::fs::read_to_string(path).with_context(|| format!("cannot read {}", path.display()))?;
    let token = text.lines().next().unwrap_or("").trim().to_string();
    if token.is_empty() {
        bail!("{} holds no token", path.display());
    }
    Ok(token)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn mode(p: &Path) -> u32 {
        std::fs::metadata(p).unwrap().permissions().mode() & 0o7777
    }

    #[test]
    fn files_and_directories_are_created_private_whatever_the_umask_allows() {
        let root = tempfile::tempdir().unwrap();
        let dir = root.path().join("a/b");
        create_dir_all(&dir).unwrap();
        assert_eq!(mode(&root.path().join("a")), 0o700);
        assert_eq!(mode(&dir), 0o700);
        let f = dir.join("log.jsonl");
        drop(open_append(&f).unwrap());
        assert_eq!(mode(&f), 0o600);
        let n = dir.join("segment");
        drop(create_new(&n).unwrap());
        assert_eq!(mode(&n), 0o600);
        assert!(create_new(&n).is_err(), "create_new never overwrites");
        let w = dir.join("written");
        write(&w, b"x").unwrap();
        assert_eq!(
            (mode(&w), std::fs::read(&w).unwrap()),
            (0o600, b"x".to_vec())
        );
    }

    #[test]
    fn existing_shared_files_and_owned_directories_are_tightened() {
        let root = tempfile::tempdir().unwrap();
        let f = root.path().join("audit.jsonl");
        std::fs::write(&f, "old\n").unwrap();
        std::fs::set_permissions(&f, std::fs::Permissions::from_mode(0o664)).unwrap();
        drop(open_append(&f).unwrap());
        assert_eq!(mode(&f), 0o600);
        assert_eq!(std::fs::read_to_string(&f).unwrap(), "old\n");

        let w = root.path().join("id");
        std::fs::write(&w, "x").unwrap();
        std::fs::set_permissions(&w, std::fs::Permissions::from_mode(0o644)).unwrap();
        write(&w, "y").unwrap();
        assert_eq!(mode(&w), 0o600);

        let d = root.path().join("spool");
        std::fs::create_dir(&d).unwrap();
        std::fs::set_permissions(&d, std::fs::Permissions::from_mode(0o777)).unwrap();
        private_dir(&d).unwrap();
        assert_eq!(mode(&d), 0o700);
        assert!(!tighten(&d).unwrap(), "already private");

        // A shared parent the proxy did not create is left alone.
        let shared = root.path().join("shared");
        std::fs::create_dir(&shared).unwrap();
        std::fs::set_permissions(&shared, std::fs::Permissions::from_mode(0o755)).unwrap();
        create_dir_all(&shared.join("mine")).unwrap();
        assert_eq!(mode(&shared), 0o755);
        assert_eq!(mode(&shared.join("mine")), 0o700);
    }

    #[test]
    fn token_files_others_can_read_are_refused() {
        use std::os::unix::fs::PermissionsExt;
        let dir = tempfile::tempdir().unwrap();
        let tf = dir.path().join("t");
        std::fs::write(&tf, "tok\n").unwrap();
        for mode in [0o644, 0o604, 0o660, 0o602] {
            std::fs::set_permissions(&tf, std::fs::Permissions::from_mode(mode)).unwrap();
            let e = read_token(&tf).unwrap_err().to_string();
            assert!(e.contains("group or world access"), "{mode:o}: {e}");
        }
        std::fs::set_permissions(&tf, std::fs::Permissions::from_mode(0o400)).unwrap();
        assert_eq!(read_token(&tf).unwrap(), "tok");
    }
}
