//! Power-cut trials: record every write a real agent process makes to its
//! data directory, then rebuild that directory as a power cut at any point
//! of the recording would have left it, and start an agent on it.
//!
//! - [`recorder`]: a FUSE filesystem (fuser, in this process) mounted as
//!   the agent's data directory. Every mutating request is applied to a
//!   [`model::Fs`] and appended to a write log ([`Op`]).
//! - [`model`]: the crash model: what survives a cut, under three
//!   assumptions about unsynced writes ([`model::Unsynced`]).
//! - [`replay`]: the image at cut point `k` (the first `k` operations of
//!   the log), written to a real directory.
//!
//! The technique is the one of dm-log-writes and CrashMonkey (Mohan et al.,
//! "Finding Crash-Consistency Bugs with Bounded Black-Box Crash Testing",
//! OSDI 2018), done in user space because this machine has FUSE but no
//! device-mapper.

pub mod model;
pub mod recorder;
pub mod replay;

use std::ffi::OsString;

/// An inode number (FUSE node id; 1 is the root).
pub type Ino = u64;

/// One mutating operation on the data directory, in the order the agent's
/// requests reached the filesystem.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Op {
    /// A new, empty regular file `name` in directory `parent`.
    Create {
        /// Directory it is created in.
        parent: Ino,
        /// Its name there.
        name: OsString,
        /// Its inode number.
        ino: Ino,
        /// Permission bits.
        mode: u32,
    },
    /// A new, empty directory.
    Mkdir {
        /// Directory it is created in.
        parent: Ino,
        /// Its name there.
        name: OsString,
        /// Its inode number.
        ino: Ino,
        /// Permission bits.
        mode: u32,
    },
    /// `pwrite(ino, data, offset)`; a gap is filled with zeros.
    Write {
        /// File written.
        ino: Ino,
        /// Byte offset.
        offset: u64,
        /// Bytes written.
        data: Vec<u8>,
    },
    /// `ftruncate(ino, len)` (shorter or longer).
    SetLen {
        /// File.
        ino: Ino,
        /// New length in bytes.
        len: u64,
    },
    /// `chmod(ino, mode)`.
    SetMode {
        /// File or directory.
        ino: Ino,
        /// Permission bits.
        mode: u32,
    },
    /// `unlink` or `rmdir` of `name` in `parent`.
    Unlink {
        /// Directory.
        parent: Ino,
        /// Name removed.
        name: OsString,
    },
    /// `rename(parent/name, newparent/newname)`, replacing the target.
    Rename {
        /// Source directory.
        parent: Ino,
        /// Source name.
        name: OsString,
        /// Target directory.
        newparent: Ino,
        /// Target name.
        newname: OsString,
    },
    /// `fsync` or `fdatasync` of a file.
    Fsync {
        /// File synced.
        ino: Ino,
    },
    /// `fsync` of a directory.
    FsyncDir {
        /// Directory synced.
        ino: Ino,
    },
}

impl Op {
    /// True for the two syncs (the points where durability changes).
    pub fn is_sync(&self) -> bool {
        matches!(self, Op::Fsync { .. } | Op::FsyncDir { .. })
    }
}

/// What went wrong in the model, the recorder or a replay.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// An inode number the tree never had.
    #[error("no inode {0}")]
    NoSuchInode(Ino),
    /// A create with an inode number already in use.
    #[error("inode {0} is already in use")]
    InodeInUse(Ino),
    /// A name that is not in the directory.
    #[error("no entry {0:?}")]
    NotFound(OsString),
    /// A create over an existing name.
    #[error("{0:?} already exists")]
    Exists(OsString),
    /// rmdir of (or rename over) a directory that has entries.
    #[error("directory {0:?} is not empty")]
    NotEmpty(OsString),
    /// A directory operation on a file.
    #[error("inode {0} is not a directory")]
    NotADirectory(Ino),
    /// A file operation on a directory.
    #[error("inode {0} is a directory")]
    IsADirectory(Ino),
    /// Operation `index` of a log did not apply to the tree the operations
    /// before it built (a log that is not from this model).
    #[error("operation {index} of the write log does not apply: {source}")]
    Replay {
        /// Its position in the log.
        index: usize,
        /// Why.
        #[source]
        source: Box<Error>,
    },
    /// Writing an image to disk, or mounting.
    #[error("{what} {path}: {source}")]
    Io {
        /// What was being done.
        what: &'static str,
        /// The path.
        path: std::path::PathBuf,
        /// The error.
        #[source]
        source: std::io::Error,
    },
}
