//! A VM's serial console log: the VMM appends to `console.log`; the agent caps its size by
//! rotating (copy to `console.log.1`, truncate), serves its tail and follows new output, and
//! looks for the readiness marker in it.
//!
//! Rotation is copy-and-truncate because the VMM keeps the file open. A VMM that opened it
//! without `O_APPEND` keeps writing at its old offset, leaving a hole of NUL bytes at the
//! start; readers skip NULs so the hole never reaches a client.

use std::io::{Read, Seek, SeekFrom};
use std::path::{Path, PathBuf};
use std::time::Duration;

use thiserror::Error;

/// How often a follower or a marker watcher looks for new output.
pub(crate) const POLL_INTERVAL: Duration = Duration::from_millis(50);

/// Errors of the console log.
#[derive(Debug, Error, strum::IntoStaticStr)]
pub enum ConsoleError {
    #[error("console log I/O on {path}")]
    #[strum(serialize = "ConsoleIoError")]
    Io {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
}

/// The rotated predecessor of a console log.
pub(crate) fn rotated_path(path: &Path) -> PathBuf {
    let mut name = path.as_os_str().to_owned();
    name.push(".1");
    PathBuf::from(name)
}

/// Whether a log of `size` bytes must be rotated under a cap of `max_bytes` (0 = no cap).
pub(crate) fn needs_rotation(size: u64, max_bytes: u64) -> bool {
    max_bytes > 0 && size > max_bytes
}

/// Rotate the log when it is over `max_bytes`; returns whether it did.
pub(crate) fn rotate_if_needed(path: &Path, max_bytes: u64) -> Result<bool, ConsoleError> {
    let io = |source| ConsoleError::Io {
        path: path.to_path_buf(),
        source,
    };
    let size = match std::fs::metadata(path) {
        Ok(m) => m.len(),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(false),
        Err(e) => return Err(io(e)),
    };
    if !needs_rotation(size, max_bytes) {
        return Ok(false);
    }
    std::fs::copy(path, rotated_path(path)).map_err(io)?;
    std::fs::OpenOptions::new()
        .write(true)
        .open(path)
        .and_then(|f| f.set_len(0))
        .map_err(io)?;
    Ok(true)
}

/// The last `n` bytes of the console (reaching into the rotated file when the current one is
/// shorter), NUL holes removed.
pub(crate) fn read_tail(path: &Path, n: u64) -> Result<Vec<u8>, ConsoleError> {
    let current = read_last(path, n)?;
    let mut out = if (current.len() as u64) < n {
        read_last(&rotated_path(path), n - current.len() as u64)?
    } else {
        Vec::new()
    };
    out.extend_from_slice(&current);
    Ok(out)
}

/// The end of the console as text, for exit classification (`GuestPanic`, ...).
pub(crate) fn tail_text(path: &Path, n: u64) -> String {
    read_tail(path, n)
        .map(|bytes| String::from_utf8_lossy(&bytes).into_owned())
        .unwrap_or_default()
}

fn read_last(path: &Path, n: u64) -> Result<Vec<u8>, ConsoleError> {
    let io = |source| ConsoleError::Io {
        path: path.to_path_buf(),
        source,
    };
    let mut file = match std::fs::File::open(path) {
        Ok(f) => f,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(Vec::new()),
        Err(e) => return Err(io(e)),
    };
    let size = file.metadata().map_err(io)?.len();
    let start = size.saturating_sub(n);
    file.seek(SeekFrom::Start(start)).map_err(io)?;
    let mut buf = Vec::new();
    file.take(n).read_to_end(&mut buf).map_err(io)?;
    buf.retain(|b| *b != 0);
    Ok(buf)
}

/// Reads what was appended since the last call; copes with rotation (the file shrinking).
#[derive(Debug)]
pub(crate) struct LogCursor {
    path: PathBuf,
    offset: u64,
}

impl LogCursor {
    /// A cursor at `offset` (the current end of the file when `None`).
    pub(crate) fn new(path: &Path, offset: Option<u64>) -> Self {
        let offset =
            offset.unwrap_or_else(|| std::fs::metadata(path).map(|m| m.len()).unwrap_or(0));
        Self {
            path: path.to_path_buf(),
            offset,
        }
    }

    /// Where the next read starts.
    pub(crate) fn offset(&self) -> u64 {
        self.offset
    }

    /// New bytes since the last read (at most `max` bytes), NULs removed.
    pub(crate) fn read_new(&mut self, max: u64) -> Result<Vec<u8>, ConsoleError> {
        let io = |source| ConsoleError::Io {
            path: self.path.clone(),
            source,
        };
        let mut file = match std::fs::File::open(&self.path) {
            Ok(f) => f,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(Vec::new()),
            Err(e) => return Err(io(e)),
        };
        let size = file.metadata().map_err(io)?.len();
        if size < self.offset {
            // Rotated: the file starts over.
            self.offset = 0;
        }
        if size == self.offset {
            return Ok(Vec::new());
        }
        file.seek(SeekFrom::Start(self.offset)).map_err(io)?;
        let mut buf = Vec::new();
        file.take(max).read_to_end(&mut buf).map_err(io)?;
        self.offset += buf.len() as u64;
        buf.retain(|b| *b != 0);
        Ok(buf)
    }
}

/// Finds a marker in a stream of chunks, including one split across two chunks.
#[derive(Debug)]
pub(crate) struct MarkerScanner {
    marker: Vec<u8>,
    carry: Vec<u8>,
}

impl MarkerScanner {
    pub(crate) fn new(marker: &str) -> Self {
        Self {
            marker: marker.as_bytes().to_vec(),
            carry: Vec::new(),
        }
    }

    /// Feed the next chunk; true once the marker has been seen.
    pub(crate) fn feed(&mut self, chunk: &[u8]) -> bool {
        if self.marker.is_empty() {
            return true;
        }
        self.carry.extend_from_slice(chunk);
        if self
            .carry
            .windows(self.marker.len())
            .any(|w| w == self.marker.as_slice())
        {
            return true;
        }
        let keep = self.marker.len() - 1;
        if self.carry.len() > keep {
            self.carry.drain(..self.carry.len() - keep);
        }
        false
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_marker_split_across_chunks_is_found() {
        let mut scanner = MarkerScanner::new("ignis: ready");
        assert!(!scanner.feed(b"booting...\nign"));
        assert!(!scanner.feed(b"is: re"));
        assert!(scanner.feed(b"ady\n"));
        let mut other = MarkerScanner::new("ignis: ready");
        assert!(!other.feed(b"ignis: not ready"));
    }

    #[test]
    fn rotation_caps_the_log_and_the_tail_spans_both_files() {
        let tmp = tempfile::tempdir().expect("tmp");
        let log = tmp.path().join("console.log");
        std::fs::write(&log, b"0123456789").expect("write");
        assert!(!rotate_if_needed(&log, 10).expect("no rotate"));
        assert!(!rotate_if_needed(&log, 0).expect("no cap"));
        std::fs::write(&log, b"0123456789abc").expect("write");
        assert!(rotate_if_needed(&log, 10).expect("rotate"));
        assert_eq!(std::fs::metadata(&log).expect("meta").len(), 0);
        std::fs::write(&log, b"XYZ").expect("write");
        assert_eq!(read_tail(&log, 5).expect("tail"), b"bcXYZ");
        assert_eq!(read_tail(&log, 2).expect("tail"), b"YZ");
        assert!(
            read_tail(&tmp.path().join("none"), 5)
                .expect("missing")
                .is_empty()
        );
    }

    #[test]
    fn a_cursor_follows_appends_and_restarts_after_rotation() {
        let tmp = tempfile::tempdir().expect("tmp");
        let log = tmp.path().join("console.log");
        std::fs::write(&log, b"old").expect("write");
        let mut cursor = LogCursor::new(&log, None);
        assert!(cursor.read_new(1024).expect("read").is_empty());
        std::fs::write(&log, b"old+new").expect("write");
        assert_eq!(cursor.read_new(1024).expect("read"), b"+new");
        // A writer without O_APPEND after a truncate: NUL hole, then text.
        std::fs::write(&log, b"\0\0z").expect("write");
        assert_eq!(cursor.read_new(1024).expect("read"), b"z");
    }
}
