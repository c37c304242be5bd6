//! Delta bundles: the new payload tar compressed with zstd against the base
//! payload tar as reference prefix (zstd "patch-from", zstd 1.4.5+ `--patch-from`).
//!
//! A delta is an ordinary bundle whose manifest sets `delta_from` to the
//! base payload's SHA-256 and whose body is the patch. Its `files` and
//! `payload` fields are those of the full bundle, so the receiver rebuilds the
//! payload tar and verifies it exactly as for the full bundle.

use std::io::Write;

use crate::keys::SigningKey;
use crate::pack::{body_info, sign_and_assemble};
use crate::verify::VerifiedBundle;
use crate::{sha256, Error, MAX_WINDOW_LOG};

/// Encodes `new` as a delta against `base` and signs it with `key`.
///
/// # Errors
/// [`Error::Pack`] when zstd fails; [`Error::ManifestField`] if the result
/// breaks a manifest rule.
pub fn make_delta(
    base: &VerifiedBundle,
    new: &VerifiedBundle,
    key: &SigningKey,
    level: i32,
) -> Result<Vec<u8>, Error> {
    let patch = encode_patch(base.payload_tar(), new.payload_tar(), level)?;
    let mut m = new.manifest().clone();
    m.body = body_info(&patch, m.body.chunk_size);
    m.delta_from = Some(sha256(base.payload_tar()));
    m.key_id = key.key_id();
    sign_and_assemble(&m, key, &patch)
}

/// zstd patch-from: compresses `new` with `base` as reference prefix, window
/// large enough to reach the whole base (capped at 2^[`MAX_WINDOW_LOG`]).
///
/// # Errors
/// [`Error::Pack`] with zstd's message.
pub fn encode_patch(base: &[u8], new: &[u8], level: i32) -> Result<Vec<u8>, Error> {
    let perr = |e: std::io::Error| Error::Pack {
        reason: format!("zstd patch-from: {e}"),
    };
    let total = (base.len() + new.len()).max(1024) as u64;
    let wlog = (64 - (total - 1).leading_zeros()).clamp(10, MAX_WINDOW_LOG);
    let mut enc =
        zstd::stream::write::Encoder::with_ref_prefix(Vec::new(), level, base).map_err(perr)?;
    enc.window_log(wlog).map_err(perr)?;
    enc.long_distance_matching(true).map_err(perr)?;
    enc.include_checksum(true).map_err(perr)?;
    enc.set_pledged_src_size(Some(new.len() as u64))
        .map_err(perr)?;
    enc.write_all(new).map_err(perr)?;
    enc.finish().map_err(perr)
}
