//! Crash-safe file writes: write a temp file in the same directory, fsync it,
//! rename it over the target, fsync the directory. A power cut leaves either
//! the old file or the new one, never a torn one.

use std::fs::{self, File, OpenOptions};
use std::io::Write;
use std::os::unix::fs::OpenOptionsExt;
use std::path::Path;

use crate::Error;

/// Writes `bytes` to `path` atomically with mode 0644.
///
/// # Errors
/// [`Error::Io`] naming the temp file, the target or its directory.
pub fn write_atomic(path: &Path, bytes: &[u8]) -> Result<(), Error> {
    write_atomic_mode(path, bytes, 0o644)
}

/// Writes `bytes` to `path` atomically with the given Unix mode (0600 for
/// private keys): the file never exists with a wider mode.
///
/// # Errors
/// [`Error::Io`] naming the temp file, the target or its directory.
pub fn write_atomic_mode(path: &Path, bytes: &[u8], mode: u32) -> Result<(), Error> {
    let dir = match path.parent() {
        Some(d) if !d.as_os_str().is_empty() => d.to_path_buf(),
        _ => std::path::PathBuf::from("."),
    };
    let name = path
        .file_name()
        .ok_or_else(|| Error::io(path, std::io::Error::other("path has no file name")))?;
    let tmp = dir.join(format!(
        ".{}.tmp-{}-{}",
        name.to_string_lossy(),
        std::process::id(),
        rand::random::<u32>()
    ));
    let result = (|| {
        let mut f = OpenOptions::new()
            .write(true)
            .create_new(true)
            .mode(mode)
            .open(&tmp)
            .map_err(|e| Error::io(&tmp, e))?;
        f.write_all(bytes).map_err(|e| Error::io(&tmp, e))?;
        f.sync_all().map_err(|e| Error::io(&tmp, e))?;
        drop(f);
        fs::rename(&tmp, path).map_err(|e| Error::io(path, e))?;
        sync_dir(&dir)
    })();
    if result.is_err() {
        let _ = fs::remove_file(&tmp);
    }
    result
}

/// fsyncs a directory so a rename inside it survives a power cut.
///
/// # Errors
/// [`Error::Io`] naming the directory.
pub fn sync_dir(dir: &Path) -> Result<(), Error> {
    File::open(dir)
        .and_then(|d| d.sync_all())
        .map_err(|e| Error::io(dir, e))
}

/// Reads a whole file, naming it in the error.
///
/// # Errors
/// [`Error::Io`] naming the file.
pub fn read(path: &Path) -> Result<Vec<u8>, Error> {
    fs::read(path).map_err(|e| Error::io(path, e))
}
