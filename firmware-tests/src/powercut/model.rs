//! The crash model: a file tree that knows, for every inode, what it holds
//! now (`live`) and what would survive a power cut (`durable`).
//!
//! Rules (a conservative reading of POSIX `fsync(2)` and of what ext4 and
//! xfs guarantee in practice):
//! - a write, a truncation, a `chmod`, a create, a `mkdir`, an unlink and a
//!   rename change only the live tree;
//! - `fsync(file)` makes the file's data and mode durable, and the directory
//!   entries that name it, up to the root (ext4's and xfs's journal commit
//!   does that; POSIX alone asks for a directory fsync as well);
//! - `fsync(dir)` makes that directory's entries durable (not its children's
//!   data);
//! - nothing else survives.
//!
//! [`Fs::image`] projects the tree at a power cut in one of three ways
//! ([`Unsynced`]), each a state some real filesystem can be left in.

use std::collections::{BTreeMap, BTreeSet};
use std::ffi::{OsStr, OsString};
use std::path::PathBuf;

use super::{Error, Ino, Op};

/// The root directory's inode (FUSE's `FUSE_ROOT_ID`).
pub const ROOT: Ino = 1;

/// What survives of the writes that were not made durable.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord, serde::Serialize)]
#[serde(rename_all = "snake_case")]
pub enum Unsynced {
    /// Everything not fsynced is gone: the worst case of a power cut.
    Lost,
    /// Every directory change survived, the data not fsynced did not (ext4
    /// `data=writeback`: a renamed file whose data never reached the disk).
    NamesOnly,
    /// Everything survived: the process died, the kernel did not.
    Kept,
}

impl Unsynced {
    /// The three ways, worst first.
    pub const ALL: [Unsynced; 3] = [Unsynced::Lost, Unsynced::NamesOnly, Unsynced::Kept];
}

/// A node's contents: a regular file's bytes or a directory's entries.
#[derive(Debug, Clone, PartialEq, Eq)]
enum Content {
    File(Vec<u8>),
    Dir(BTreeMap<OsString, Ino>),
}

/// One inode: its live and durable contents and permission bits.
#[derive(Debug, Clone)]
struct Node {
    live: Content,
    durable: Content,
    mode: u32,
    durable_mode: u32,
}

/// Attributes the FUSE layer needs.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Attr {
    /// The inode.
    pub ino: Ino,
    /// True for a directory.
    pub dir: bool,
    /// Size in bytes (files) or entries (directories).
    pub size: u64,
    /// Permission bits (`0o7777`).
    pub mode: u32,
}

/// One entry of a crash image.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub enum ImageEntry {
    /// A directory and its permission bits.
    Dir(u32),
    /// A regular file: permission bits and bytes.
    File(u32, Vec<u8>),
}

/// A file tree as a power cut leaves it: relative path -> entry, sorted.
pub type Image = BTreeMap<PathBuf, ImageEntry>;

/// The tree. Inodes are never freed (a durable entry may still name an
/// inode the live tree has unlinked).
#[derive(Debug, Clone)]
pub struct Fs {
    nodes: BTreeMap<Ino, Node>,
}

impl Default for Fs {
    fn default() -> Self {
        Self::new()
    }
}

impl Fs {
    /// An empty tree: the root directory, durable, mode 0755.
    pub fn new() -> Self {
        let root = Node {
            live: Content::Dir(BTreeMap::new()),
            durable: Content::Dir(BTreeMap::new()),
            mode: 0o755,
            durable_mode: 0o755,
        };
        Fs {
            nodes: BTreeMap::from([(ROOT, root)]),
        }
    }

    /// The next free inode number.
    pub fn next_ino(&self) -> Ino {
        self.nodes.keys().next_back().map_or(ROOT, |i| i + 1)
    }

    fn node(&self, ino: Ino) -> Result<&Node, Error> {
        self.nodes.get(&ino).ok_or(Error::NoSuchInode(ino))
    }

    fn node_mut(&mut self, ino: Ino) -> Result<&mut Node, Error> {
        self.nodes.get_mut(&ino).ok_or(Error::NoSuchInode(ino))
    }

    fn live_dir(&self, ino: Ino) -> Result<&BTreeMap<OsString, Ino>, Error> {
        match &self.node(ino)?.live {
            Content::Dir(e) => Ok(e),
            Content::File(_) => Err(Error::NotADirectory(ino)),
        }
    }

    fn live_dir_mut(&mut self, ino: Ino) -> Result<&mut BTreeMap<OsString, Ino>, Error> {
        match &mut self.node_mut(ino)?.live {
            Content::Dir(e) => Ok(e),
            Content::File(_) => Err(Error::NotADirectory(ino)),
        }
    }

    fn live_file_mut(&mut self, ino: Ino) -> Result<&mut Vec<u8>, Error> {
        match &mut self.node_mut(ino)?.live {
            Content::File(d) => Ok(d),
            Content::Dir(_) => Err(Error::IsADirectory(ino)),
        }
    }

    /// The inode `name` names in directory `parent`.
    pub fn lookup(&self, parent: Ino, name: &OsStr) -> Result<Ino, Error> {
        self.live_dir(parent)?
            .get(name)
            .copied()
            .ok_or_else(|| Error::NotFound(name.to_os_string()))
    }

    /// The live attributes of `ino`.
    pub fn attr(&self, ino: Ino) -> Result<Attr, Error> {
        let n = self.node(ino)?;
        let (dir, size) = match &n.live {
            Content::File(d) => (false, d.len() as u64),
            Content::Dir(e) => (true, e.len() as u64),
        };
        Ok(Attr {
            ino,
            dir,
            size,
            mode: n.mode,
        })
    }

    /// Up to `size` live bytes of file `ino` from `offset`.
    pub fn read(&self, ino: Ino, offset: u64, size: usize) -> Result<&[u8], Error> {
        match &self.node(ino)?.live {
            Content::File(d) => {
                let start = (offset as usize).min(d.len());
                Ok(&d[start..(start + size).min(d.len())])
            }
            Content::Dir(_) => Err(Error::IsADirectory(ino)),
        }
    }

    /// The live entries of directory `ino`: (name, inode, is a directory).
    pub fn entries(&self, ino: Ino) -> Result<Vec<(OsString, Ino, bool)>, Error> {
        self.live_dir(ino)?
            .iter()
            .map(|(n, &i)| Ok((n.clone(), i, self.attr(i)?.dir)))
            .collect()
    }

    /// Applies one operation to the live tree (and, for the two syncs, to
    /// the durable one). An operation that cannot apply leaves the tree as
    /// it was and says why.
    pub fn apply(&mut self, op: &Op) -> Result<(), Error> {
        match op {
            Op::Create {
                parent,
                name,
                ino,
                mode,
            } => self.link_new(*parent, name, *ino, Content::File(Vec::new()), *mode),
            Op::Mkdir {
                parent,
                name,
                ino,
                mode,
            } => self.link_new(*parent, name, *ino, Content::Dir(BTreeMap::new()), *mode),
            Op::Write { ino, offset, data } => {
                let f = self.live_file_mut(*ino)?;
                let end = *offset as usize + data.len();
                if f.len() < end {
                    f.resize(end, 0);
                }
                f[*offset as usize..end].copy_from_slice(data);
                Ok(())
            }
            Op::SetLen { ino, len } => {
                self.live_file_mut(*ino)?.resize(*len as usize, 0);
                Ok(())
            }
            Op::SetMode { ino, mode } => {
                self.node_mut(*ino)?.mode = *mode & 0o7777;
                Ok(())
            }
            Op::Unlink { parent, name } => self.unlink(*parent, name),
            Op::Rename {
                parent,
                name,
                newparent,
                newname,
            } => self.rename(*parent, name, *newparent, newname),
            Op::Fsync { ino } => self.fsync(*ino),
            Op::FsyncDir { ino } => {
                let n = self.node_mut(*ino)?;
                if !matches!(n.live, Content::Dir(_)) {
                    return Err(Error::NotADirectory(*ino));
                }
                n.durable = n.live.clone();
                n.durable_mode = n.mode;
                Ok(())
            }
        }
    }

    fn link_new(
        &mut self,
        parent: Ino,
        name: &OsStr,
        ino: Ino,
        content: Content,
        mode: u32,
    ) -> Result<(), Error> {
        if self.nodes.contains_key(&ino) {
            return Err(Error::InodeInUse(ino));
        }
        if self.live_dir(parent)?.contains_key(name) {
            return Err(Error::Exists(name.to_os_string()));
        }
        let durable = match &content {
            Content::File(_) => Content::File(Vec::new()),
            Content::Dir(_) => Content::Dir(BTreeMap::new()),
        };
        self.nodes.insert(
            ino,
            Node {
                live: content,
                durable,
                mode: mode & 0o7777,
                durable_mode: mode & 0o7777,
            },
        );
        self.live_dir_mut(parent)?.insert(name.to_os_string(), ino);
        Ok(())
    }

    fn unlink(&mut self, parent: Ino, name: &OsStr) -> Result<(), Error> {
        let ino = self.lookup(parent, name)?;
        if let Content::Dir(e) = &self.node(ino)?.live {
            if !e.is_empty() {
                return Err(Error::NotEmpty(name.to_os_string()));
            }
        }
        self.live_dir_mut(parent)?.remove(name);
        Ok(())
    }

    fn rename(
        &mut self,
        parent: Ino,
        name: &OsStr,
        newparent: Ino,
        newname: &OsStr,
    ) -> Result<(), Error> {
        let ino = self.lookup(parent, name)?;
        self.live_dir(newparent)?;
        if let Ok(old) = self.lookup(newparent, newname) {
            if old == ino {
                return Ok(());
            }
            let (src_dir, dst) = (self.attr(ino)?.dir, self.node(old)?);
            match (&dst.live, src_dir) {
                (Content::Dir(e), true) if !e.is_empty() => {
                    return Err(Error::NotEmpty(newname.to_os_string()));
                }
                (Content::Dir(_), false) => return Err(Error::IsADirectory(old)),
                (Content::File(_), true) => return Err(Error::NotADirectory(old)),
                _ => {}
            }
        }
        self.live_dir_mut(parent)?.remove(name);
        self.live_dir_mut(newparent)?
            .insert(newname.to_os_string(), ino);
        Ok(())
    }

    /// `fsync(file)`: data and mode, then every entry naming it (and the
    /// entries that named it before a rename) in every directory, and the
    /// same for those directories up to the root.
    fn fsync(&mut self, ino: Ino) -> Result<(), Error> {
        let n = self.node_mut(ino)?;
        if matches!(n.live, Content::Dir(_)) {
            // fsync on a directory handle arrives as FSYNCDIR; treat both alike.
            return self.apply(&Op::FsyncDir { ino });
        }
        n.durable = n.live.clone();
        n.durable_mode = n.mode;
        let mut todo = vec![ino];
        let mut seen = BTreeSet::new();
        while let Some(child) = todo.pop() {
            if !seen.insert(child) || child == ROOT {
                continue;
            }
            for dir in self.dirs_naming(child) {
                self.persist_names_of(dir, child)?;
                todo.push(dir);
            }
        }
        Ok(())
    }

    /// Directories whose live or durable entries name `child`.
    fn dirs_naming(&self, child: Ino) -> Vec<Ino> {
        self.nodes
            .iter()
            .filter(|(_, n)| {
                [&n.live, &n.durable]
                    .iter()
                    .any(|c| matches!(c, Content::Dir(e) if e.values().any(|&i| i == child)))
            })
            .map(|(&i, _)| i)
            .collect()
    }

    /// In `dir`, makes durable exactly the live entries that name `child`
    /// and drops the durable ones that no longer do.
    fn persist_names_of(&mut self, dir: Ino, child: Ino) -> Result<(), Error> {
        let n = self.node_mut(dir)?;
        let (Content::Dir(live), Content::Dir(durable)) = (&n.live, &mut n.durable) else {
            return Err(Error::NotADirectory(dir));
        };
        durable.retain(|name, i| *i != child || live.get(name) == Some(&child));
        for (name, &i) in live {
            if i == child {
                durable.insert(name.clone(), child);
            }
        }
        Ok(())
    }

    /// The tree a power cut would leave now, under `unsynced`.
    pub fn image(&self, unsynced: Unsynced) -> Image {
        let mut out = Image::new();
        let mut on_path = BTreeSet::from([ROOT]);
        self.walk(ROOT, PathBuf::new(), unsynced, &mut on_path, &mut out);
        out
    }

    fn walk(
        &self,
        dir: Ino,
        at: PathBuf,
        unsynced: Unsynced,
        on_path: &mut BTreeSet<Ino>,
        out: &mut Image,
    ) {
        let Some(n) = self.nodes.get(&dir) else {
            return;
        };
        let names = match unsynced {
            Unsynced::Lost => &n.durable,
            Unsynced::NamesOnly | Unsynced::Kept => &n.live,
        };
        let Content::Dir(entries) = names else {
            return;
        };
        for (name, &ino) in entries {
            let Some(c) = self.nodes.get(&ino) else {
                continue;
            };
            let path = at.join(name);
            let (content, mode) = match unsynced {
                Unsynced::Kept => (&c.live, c.mode),
                Unsynced::Lost | Unsynced::NamesOnly => (&c.durable, c.durable_mode),
            };
            match content {
                Content::File(d) => {
                    out.insert(path, ImageEntry::File(mode, d.clone()));
                }
                Content::Dir(_) => {
                    // A directory renamed into its own subtree by a partial
                    // durable state would loop: cut the cycle.
                    if on_path.insert(ino) {
                        out.insert(path.clone(), ImageEntry::Dir(mode));
                        self.walk(ino, path, unsynced, on_path, out);
                        on_path.remove(&ino);
                    }
                }
            }
        }
    }
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;

    fn os(s: &str) -> OsString {
        s.into()
    }

    fn file(fs: &Fs, u: Unsynced, p: &str) -> Option<Vec<u8>> {
        match fs.image(u).get(&PathBuf::from(p)) {
            Some(ImageEntry::File(_, d)) => Some(d.clone()),
            _ => None,
        }
    }

    /// temp file, write, fsync, rename, fsync(dir): the classic atomic
    /// replace, cut after each step.
    #[test]
    fn atomic_replace_survives_only_when_done_in_order() {
        let mut fs = Fs::new();
        let ops = [
            Op::Create {
                parent: ROOT,
                name: os("f"),
                ino: 2,
                mode: 0o644,
            },
            Op::Write {
                ino: 2,
                offset: 0,
                data: b"old".to_vec(),
            },
            Op::Fsync { ino: 2 },
            Op::Create {
                parent: ROOT,
                name: os("f.tmp"),
                ino: 3,
                mode: 0o644,
            },
            Op::Write {
                ino: 3,
                offset: 0,
                data: b"new".to_vec(),
            },
            Op::Rename {
                parent: ROOT,
                name: os("f.tmp"),
                newparent: ROOT,
                newname: os("f"),
            },
        ];
        for op in &ops {
            fs.apply(op).unwrap();
        }
        // Renamed but neither synced: the worst case keeps the old file,
        // writeback ordering may show an empty new one, a process crash the new.
        assert_eq!(file(&fs, Unsynced::Lost, "f"), Some(b"old".to_vec()));
        assert_eq!(file(&fs, Unsynced::NamesOnly, "f"), Some(Vec::new()));
        assert_eq!(file(&fs, Unsynced::Kept, "f"), Some(b"new".to_vec()));
        assert_eq!(file(&fs, Unsynced::Lost, "f.tmp"), None);
        fs.apply(&Op::Fsync { ino: 3 }).unwrap();
        for u in Unsynced::ALL {
            assert_eq!(file(&fs, u, "f"), Some(b"new".to_vec()), "{u:?}");
            assert_eq!(fs.image(u).len(), 1, "{u:?}: {:?}", fs.image(u));
        }
    }

    #[test]
    fn a_new_file_in_a_new_directory_needs_its_fsync() {
        let mut fs = Fs::new();
        fs.apply(&Op::Mkdir {
            parent: ROOT,
            name: os("d"),
            ino: 2,
            mode: 0o700,
        })
        .unwrap();
        fs.apply(&Op::Create {
            parent: 2,
            name: os("x"),
            ino: 3,
            mode: 0o600,
        })
        .unwrap();
        fs.apply(&Op::Write {
            ino: 3,
            offset: 2,
            data: b"ab".to_vec(),
        })
        .unwrap();
        assert!(fs.image(Unsynced::Lost).is_empty());
        assert_eq!(
            fs.image(Unsynced::NamesOnly).get(&PathBuf::from("d/x")),
            Some(&ImageEntry::File(0o600, vec![]))
        );
        fs.apply(&Op::Fsync { ino: 3 }).unwrap();
        let img = fs.image(Unsynced::Lost);
        assert_eq!(img.get(&PathBuf::from("d")), Some(&ImageEntry::Dir(0o700)));
        assert_eq!(
            img.get(&PathBuf::from("d/x")),
            Some(&ImageEntry::File(0o600, vec![0, 0, b'a', b'b']))
        );
    }

    #[test]
    fn unlink_is_undone_by_a_cut_until_the_directory_is_synced() {
        let mut fs = Fs::new();
        for op in [
            Op::Create {
                parent: ROOT,
                name: os("a"),
                ino: 2,
                mode: 0o644,
            },
            Op::Fsync { ino: 2 },
            Op::Unlink {
                parent: ROOT,
                name: os("a"),
            },
        ] {
            fs.apply(&op).unwrap();
        }
        assert_eq!(fs.image(Unsynced::Lost).len(), 1);
        assert!(fs.image(Unsynced::Kept).is_empty());
        fs.apply(&Op::FsyncDir { ino: ROOT }).unwrap();
        assert!(fs.image(Unsynced::Lost).is_empty());
    }

    #[test]
    fn refusals_name_what_is_wrong_and_change_nothing() {
        let mut fs = Fs::new();
        fs.apply(&Op::Mkdir {
            parent: ROOT,
            name: os("d"),
            ino: 2,
            mode: 0o755,
        })
        .unwrap();
        fs.apply(&Op::Create {
            parent: 2,
            name: os("x"),
            ino: 3,
            mode: 0o644,
        })
        .unwrap();
        let before = fs.image(Unsynced::Kept);
        let e = fs
            .apply(&Op::Unlink {
                parent: ROOT,
                name: os("d"),
            })
            .unwrap_err();
        assert!(matches!(e, Error::NotEmpty(ref n) if n == "d"), "{e}");
        let e = fs
            .apply(&Op::Write {
                ino: 2,
                offset: 0,
                data: vec![1],
            })
            .unwrap_err();
        assert!(matches!(e, Error::IsADirectory(2)), "{e}");
        let e = fs
            .apply(&Op::Create {
                parent: 2,
                name: os("x"),
                ino: 4,
                mode: 0o644,
            })
            .unwrap_err();
        assert!(matches!(e, Error::Exists(ref n) if n == "x"), "{e}");
        assert_eq!(fs.image(Unsynced::Kept), before);
    }
}
