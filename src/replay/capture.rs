//! Reading a pgshift capture (see `record::format`) as replay events.

use std::collections::HashSet;
use std::fs::File;
use std::io::BufReader;
use std::path::{Path, PathBuf};

use super::source::Event;
use crate::record::format::{self, FormatError, Record, SegmentReader};

/// The segment files of the capture `path` names, in order: the file
/// itself when it is one (a single segment), otherwise every
/// `<path>.NNNNNN`. Gaps in the numbering (segments deleted by
/// `record.max_files`) are allowed; each segment stands alone.
pub fn segments(path: &Path) -> anyhow::Result<Vec<PathBuf>> {
    if path.is_file() {
        return Ok(vec![path.to_path_buf()]);
    }
    let dir = match path.parent() {
        Some(d) if !d.as_os_str().is_empty() => d.to_path_buf(),
        _ => PathBuf::from("."),
    };
    let base = path
        .file_name()
        .ok_or_else(|| anyhow::anyhow!("{}: not a capture path", path.display()))?
        .to_string_lossy()
        .into_owned();
    let mut found: Vec<(u32, PathBuf)> = Vec::new();
    let entries = std::fs::read_dir(&dir)
        .map_err(|e| anyhow::anyhow!("{}: cannot list {}: {e}", path.display(), dir.display()))?;
    for entry in entries.flatten() {
        let name = entry.file_name().to_string_lossy().into_owned();
        let Some(n) = name
            .strip_prefix(&base)
            .and_then(|r| r.strip_prefix('.'))
            .filter(|n| n.len() == 6 && n.bytes().all(|b| b.is_ascii_digit()))
            .and_then(|n| n.parse().ok())
        else {
            continue;
        };
        found.push((n, entry.path()));
    }
    if found.is_empty() {
        anyhow::bail!(
            "{}: no such capture (neither that file nor segments {}.000001, ...)",
            path.display(),
            path.display()
        );
    }
    found.sort();
    Ok(found.into_iter().map(|(_, p)| p).collect())
}

/// Events of a capture's segments in order, with absolute times.
pub struct CaptureReader {
    files: std::vec::IntoIter<PathBuf>,
    current: Option<SegmentReader<BufReader<File>>>,
    /// Sessions whose START was seen (repeats in later segments are not
    /// new sessions).
    started: HashSet<u64>,
    /// Header flags of the segments read so far, or-ed.
    pub flags: u16,
}

impl CaptureReader {
    pub fn open(files: Vec<PathBuf>) -> Self {
        Self {
            files: files.into_iter(),
            current: None,
            started: HashSet::new(),
            flags: 0,
        }
    }

    pub fn next_event(&mut self) -> Result<Option<Event>, FormatError> {
        loop {
            if self.current.is_none() {
                let Some(path) = self.files.next() else {
                    return Ok(None);
                };
                let name = path.display().to_string();
                let f = File::open(&path).map_err(|source| FormatError::Io {
                    file: name.clone(),
                    source,
                })?;
                let r = SegmentReader::open(BufReader::with_capacity(1 << 20, f), name)?;
                self.flags |= r.header.flags;
                self.current = Some(r);
            }
            let Some(r) = self.current.as_mut() else {
                continue;
            };
            let base = r.header.start_unix_us;
            match r.next_record()? {
                None => self.current = None,
                Some(Record::Start {
                    session,
                    at_us,
                    started_unix_us,
                    flags,
                    params,
                }) => {
                    if !self.started.insert(session) {
                        continue; // a repeat at the top of a later segment
                    }
                    let at_us = if flags & format::START_CONTINUED != 0 {
                        started_unix_us
                    } else {
                        base + at_us
                    };
                    return Ok(Some(Event::Start {
                        session,
                        at_us,
                        params,
                    }));
                }
                Some(Record::Message {
                    session,
                    at_us,
                    frame,
                }) => {
                    if self.started.contains(&session) {
                        return Ok(Some(Event::Message {
                            session,
                            at_us: base + at_us,
                            frame,
                        }));
                    }
                }
                Some(Record::End { session, at_us, .. }) => {
                    if self.started.remove(&session) {
                        return Ok(Some(Event::End {
                            session,
                            at_us: base + at_us,
                        }));
                    }
                }
            }
        }
    }
}
