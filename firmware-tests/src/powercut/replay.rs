//! Cut points: the image a power cut after the first `k` operations of a
//! write log leaves, as a value, a digest and a real directory.

use std::hash::{Hash, Hasher};
use std::os::unix::fs::PermissionsExt;
use std::path::Path;

use super::model::{Fs, Image, ImageEntry};
use super::{Error, Op};

/// Replays `log` cut by cut: calls `visit(k, fs)` for every cut point
/// `k = 0..=log.len()` (the tree after the first `k` operations).
///
/// # Errors
/// [`Error::Replay`] naming the first operation that does not apply.
pub fn each_cut(log: &[Op], mut visit: impl FnMut(usize, &Fs)) -> Result<(), Error> {
    let mut fs = Fs::new();
    visit(0, &fs);
    for (i, op) in log.iter().enumerate() {
        fs.apply(op).map_err(|e| Error::Replay {
            index: i,
            source: Box::new(e),
        })?;
        visit(i + 1, &fs);
    }
    Ok(())
}

/// A digest of an image (paths, kinds, modes, bytes), equal for equal
/// images within one process: a trial's outcome depends only on the image,
/// so equal images are started once.
pub fn digest(img: &Image) -> u64 {
    let mut h = std::collections::hash_map::DefaultHasher::new();
    img.hash(&mut h);
    h.finish()
}

/// Writes `img` under `dir` (which must exist): directories, then files
/// with their bytes and permission bits.
///
/// # Errors
/// [`Error::Io`] naming the path that could not be written.
pub fn materialise(img: &Image, dir: &Path) -> Result<(), Error> {
    let io = |what, path: &Path| {
        let path = path.to_path_buf();
        move |source| Error::Io { what, path, source }
    };
    for (rel, e) in img {
        let p = dir.join(rel);
        match e {
            ImageEntry::Dir(mode) => {
                std::fs::create_dir_all(&p).map_err(io("create directory", &p))?;
                std::fs::set_permissions(&p, std::fs::Permissions::from_mode(*mode | 0o700))
                    .map_err(io("chmod", &p))?;
            }
            ImageEntry::File(mode, data) => {
                std::fs::write(&p, data).map_err(io("write", &p))?;
                std::fs::set_permissions(&p, std::fs::Permissions::from_mode(*mode))
                    .map_err(io("chmod", &p))?;
            }
        }
    }
    Ok(())
}
