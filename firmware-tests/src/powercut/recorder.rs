//! The recorder: a FUSE filesystem, served from this process, that keeps
//! its files in a [`Fs`] and appends every mutating request to a write log.
//!
//! Mounted with the `mount(2)` system call (root, `/dev/fuse`); the kernel
//! writes through to it (no writeback cache), so every `write`, `fsync` and
//! directory `fsync` of the process under test arrives here in order.

use std::ffi::OsStr;
use std::os::unix::fs::MetadataExt;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::{Duration, UNIX_EPOCH};

use fuser::{
    BsdFileFlags, Config, Errno, FileAttr, FileHandle, FileType, Filesystem, FopenFlags,
    Generation, INodeNo, LockOwner, MountOption, OpenFlags, RenameFlags, ReplyAttr, ReplyCreate,
    ReplyData, ReplyDirectory, ReplyEmpty, ReplyEntry, ReplyStatfs, ReplyWrite, Request, TimeOrNow,
    WriteFlags,
};

use super::model::{Attr, Fs};
use super::{Error, Ino, Op};

/// How long the kernel may cache an entry or attribute: every change goes
/// through this filesystem, so the cache cannot go stale.
const TTL: Duration = Duration::from_secs(1);

/// The live tree and the log, shared by the FUSE thread and the test.
#[derive(Debug, Default)]
struct State {
    fs: Fs,
    log: Vec<Op>,
}

/// A mounted recorder. Dropping it unmounts.
pub struct Recorder {
    state: Arc<Mutex<State>>,
    session: Option<fuser::BackgroundSession>,
    at: PathBuf,
}

impl std::fmt::Debug for Recorder {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Recorder").field("at", &self.at).finish()
    }
}

impl Recorder {
    /// Mounts an empty recorder on the existing directory `at`.
    ///
    /// # Errors
    /// [`Error::Io`] when `at` cannot be read or FUSE cannot mount there
    /// (no `/dev/fuse`, not root).
    pub fn mount(at: &Path) -> Result<Recorder, Error> {
        let io = |what| {
            let path = at.to_path_buf();
            move |source| Error::Io { what, path, source }
        };
        let meta = std::fs::metadata(at).map_err(io("read"))?;
        let state = Arc::new(Mutex::new(State::default()));
        let fs = RecorderFs {
            state: state.clone(),
            uid: meta.uid(),
            gid: meta.gid(),
        };
        let mut cfg = Config::default();
        cfg.mount_options = vec![
            MountOption::FSName("edgefleet-powercut".into()),
            MountOption::RW,
        ];
        let session = fuser::spawn_mount(fs, at, &cfg).map_err(io("FUSE mount"))?;
        Ok(Recorder {
            state,
            session: Some(session),
            at: at.to_path_buf(),
        })
    }

    fn lock(&self) -> MutexGuard<'_, State> {
        self.state.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Operations recorded so far: a cut point.
    pub fn ops(&self) -> usize {
        self.lock().log.len()
    }

    /// Unmounts and returns the write log.
    ///
    /// # Errors
    /// [`Error::Io`] when the unmount fails.
    pub fn finish(mut self) -> Result<Vec<Op>, Error> {
        if let Some(s) = self.session.take() {
            s.umount_and_join().map_err(|source| Error::Io {
                what: "FUSE unmount",
                path: self.at.clone(),
                source,
            })?;
        }
        Ok(std::mem::take(&mut self.lock().log))
    }
}

impl Drop for Recorder {
    fn drop(&mut self) {
        if let Some(s) = self.session.take() {
            let _ = s.umount_and_join();
        }
    }
}

/// The FUSE side.
struct RecorderFs {
    state: Arc<Mutex<State>>,
    uid: u32,
    gid: u32,
}

fn errno(e: &Error) -> Errno {
    match e {
        Error::NotFound(_) | Error::NoSuchInode(_) => Errno::ENOENT,
        Error::Exists(_) | Error::InodeInUse(_) => Errno::EEXIST,
        Error::NotEmpty(_) => Errno::ENOTEMPTY,
        Error::NotADirectory(_) => Errno::ENOTDIR,
        Error::IsADirectory(_) => Errno::EISDIR,
        Error::Replay { .. } | Error::Io { .. } => Errno::EIO,
    }
}

impl RecorderFs {
    fn lock(&self) -> MutexGuard<'_, State> {
        self.state.lock().unwrap_or_else(|p| p.into_inner())
    }

    fn file_attr(&self, a: Attr) -> FileAttr {
        FileAttr {
            ino: INodeNo(a.ino),
            size: a.size,
            blocks: a.size.div_ceil(512),
            atime: UNIX_EPOCH,
            mtime: UNIX_EPOCH,
            ctime: UNIX_EPOCH,
            crtime: UNIX_EPOCH,
            kind: if a.dir {
                FileType::Directory
            } else {
                FileType::RegularFile
            },
            perm: a.mode as u16,
            nlink: if a.dir { 2 } else { 1 },
            uid: self.uid,
            gid: self.gid,
            rdev: 0,
            flags: 0,
            blksize: 4096,
        }
    }

    /// Applies `op` to the tree and, when it applied, logs it.
    fn record(st: &mut State, op: Op) -> Result<(), Errno> {
        st.fs.apply(&op).map_err(|e| errno(&e))?;
        st.log.push(op);
        Ok(())
    }

    /// Creates a file or directory and answers with its attributes.
    fn make(&self, parent: INodeNo, name: &OsStr, mode: u32, dir: bool) -> Result<FileAttr, Errno> {
        let mut st = self.lock();
        let ino = st.fs.next_ino();
        let (parent, name) = (parent.0, name.to_os_string());
        let op = if dir {
            Op::Mkdir {
                parent,
                name,
                ino,
                mode,
            }
        } else {
            Op::Create {
                parent,
                name,
                ino,
                mode,
            }
        };
        Self::record(&mut st, op)?;
        let a = st.fs.attr(ino).map_err(|e| errno(&e))?;
        Ok(self.file_attr(a))
    }

    fn attr_of(&self, ino: Ino) -> Result<FileAttr, Errno> {
        let a = self.lock().fs.attr(ino).map_err(|e| errno(&e))?;
        Ok(self.file_attr(a))
    }

    /// Records `op` and answers the request that carried it.
    fn record_reply(&self, op: Op, reply: ReplyEmpty) {
        match Self::record(&mut self.lock(), op) {
            Ok(()) => reply.ok(),
            Err(e) => reply.error(e),
        }
    }

    fn unlink_any(&self, parent: INodeNo, name: &OsStr, reply: ReplyEmpty) {
        let op = Op::Unlink {
            parent: parent.0,
            name: name.to_os_string(),
        };
        self.record_reply(op, reply);
    }
}

impl Filesystem for RecorderFs {
    fn lookup(&self, _req: &Request, parent: INodeNo, name: &OsStr, reply: ReplyEntry) {
        let found = self.lock().fs.lookup(parent.0, name);
        match found.map_err(|e| errno(&e)).and_then(|i| self.attr_of(i)) {
            Ok(a) => reply.entry(&TTL, &a, Generation(0)),
            Err(e) => reply.error(e),
        }
    }

    fn getattr(&self, _req: &Request, ino: INodeNo, _fh: Option<FileHandle>, reply: ReplyAttr) {
        match self.attr_of(ino.0) {
            Ok(a) => reply.attr(&TTL, &a),
            Err(e) => reply.error(e),
        }
    }

    fn setattr(
        &self,
        _req: &Request,
        ino: INodeNo,
        mode: Option<u32>,
        _uid: Option<u32>,
        _gid: Option<u32>,
        size: Option<u64>,
        _atime: Option<TimeOrNow>,
        _mtime: Option<TimeOrNow>,
        _ctime: Option<std::time::SystemTime>,
        _fh: Option<FileHandle>,
        _crtime: Option<std::time::SystemTime>,
        _chgtime: Option<std::time::SystemTime>,
        _bkuptime: Option<std::time::SystemTime>,
        _flags: Option<BsdFileFlags>,
        reply: ReplyAttr,
    ) {
        let done = {
            let mut st = self.lock();
            let len = size.map(|len| Op::SetLen { ino: ino.0, len });
            let chmod = mode.map(|mode| Op::SetMode { ino: ino.0, mode });
            len.into_iter()
                .chain(chmod)
                .try_for_each(|op| Self::record(&mut st, op))
        };
        match done.and_then(|()| self.attr_of(ino.0)) {
            Ok(a) => reply.attr(&TTL, &a),
            Err(e) => reply.error(e),
        }
    }

    fn mkdir(
        &self,
        _req: &Request,
        parent: INodeNo,
        name: &OsStr,
        mode: u32,
        umask: u32,
        reply: ReplyEntry,
    ) {
        match self.make(parent, name, mode & !umask, true) {
            Ok(a) => reply.entry(&TTL, &a, Generation(0)),
            Err(e) => reply.error(e),
        }
    }

    fn unlink(&self, _req: &Request, parent: INodeNo, name: &OsStr, reply: ReplyEmpty) {
        self.unlink_any(parent, name, reply);
    }

    fn rmdir(&self, _req: &Request, parent: INodeNo, name: &OsStr, reply: ReplyEmpty) {
        self.unlink_any(parent, name, reply);
    }

    fn rename(
        &self,
        _req: &Request,
        parent: INodeNo,
        name: &OsStr,
        newparent: INodeNo,
        newname: &OsStr,
        flags: RenameFlags,
        reply: ReplyEmpty,
    ) {
        let mut st = self.lock();
        if flags.contains(RenameFlags::RENAME_EXCHANGE)
            || flags.contains(RenameFlags::RENAME_WHITEOUT)
        {
            return reply.error(Errno::EINVAL);
        }
        if flags.contains(RenameFlags::RENAME_NOREPLACE)
            && st.fs.lookup(newparent.0, newname).is_ok()
        {
            return reply.error(Errno::EEXIST);
        }
        let op = Op::Rename {
            parent: parent.0,
            name: name.to_os_string(),
            newparent: newparent.0,
            newname: newname.to_os_string(),
        };
        match Self::record(&mut st, op) {
            Ok(()) => reply.ok(),
            Err(e) => reply.error(e),
        }
    }

    fn read(
        &self,
        _req: &Request,
        ino: INodeNo,
        _fh: FileHandle,
        offset: u64,
        size: u32,
        _flags: OpenFlags,
        _lock_owner: Option<LockOwner>,
        reply: ReplyData,
    ) {
        let st = self.lock();
        match st.fs.read(ino.0, offset, size as usize) {
            Ok(d) => reply.data(d),
            Err(e) => reply.error(errno(&e)),
        }
    }

    fn write(
        &self,
        _req: &Request,
        ino: INodeNo,
        _fh: FileHandle,
        offset: u64,
        data: &[u8],
        _write_flags: WriteFlags,
        _flags: OpenFlags,
        _lock_owner: Option<LockOwner>,
        reply: ReplyWrite,
    ) {
        let op = Op::Write {
            ino: ino.0,
            offset,
            data: data.to_vec(),
        };
        match Self::record(&mut self.lock(), op) {
            Ok(()) => reply.written(data.len() as u32),
            Err(e) => reply.error(e),
        }
    }

    fn flush(
        &self,
        _req: &Request,
        _ino: INodeNo,
        _fh: FileHandle,
        _lock_owner: LockOwner,
        reply: ReplyEmpty,
    ) {
        reply.ok();
    }

    fn fsync(
        &self,
        _req: &Request,
        ino: INodeNo,
        _fh: FileHandle,
        _datasync: bool,
        reply: ReplyEmpty,
    ) {
        self.record_reply(Op::Fsync { ino: ino.0 }, reply);
    }

    fn readdir(
        &self,
        _req: &Request,
        ino: INodeNo,
        _fh: FileHandle,
        offset: u64,
        mut reply: ReplyDirectory,
    ) {
        let entries = match self.lock().fs.entries(ino.0) {
            Ok(e) => e,
            Err(e) => return reply.error(errno(&e)),
        };
        let dots = [(ino.0, true, ".".into()), (ino.0, true, "..".into())];
        let all = dots
            .into_iter()
            .chain(entries.into_iter().map(|(n, i, d)| (i, d, n)));
        for (k, (i, dir, name)) in all.enumerate().skip(offset as usize) {
            let kind = if dir {
                FileType::Directory
            } else {
                FileType::RegularFile
            };
            let name: std::ffi::OsString = name;
            if reply.add(INodeNo(i), (k + 1) as u64, kind, &name) {
                break;
            }
        }
        reply.ok();
    }

    fn fsyncdir(
        &self,
        _req: &Request,
        ino: INodeNo,
        _fh: FileHandle,
        _datasync: bool,
        reply: ReplyEmpty,
    ) {
        self.record_reply(Op::FsyncDir { ino: ino.0 }, reply);
    }

    fn statfs(&self, _req: &Request, _ino: INodeNo, reply: ReplyStatfs) {
        reply.statfs(1 << 20, 1 << 19, 1 << 19, 1 << 16, 1 << 15, 4096, 255, 4096);
    }

    fn access(&self, _req: &Request, _ino: INodeNo, _mask: fuser::AccessFlags, reply: ReplyEmpty) {
        reply.ok();
    }

    fn create(
        &self,
        _req: &Request,
        parent: INodeNo,
        name: &OsStr,
        mode: u32,
        umask: u32,
        _flags: i32,
        reply: ReplyCreate,
    ) {
        match self.make(parent, name, mode & !umask, false) {
            Ok(a) => reply.created(&TTL, &a, Generation(0), FileHandle(0), FopenFlags::empty()),
            Err(e) => reply.error(e),
        }
    }
}
