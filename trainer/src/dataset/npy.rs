//! .npy reading (via `npyz`) and writing (NPY format 1.0, little-endian, C order) for the two
//! dtypes datasets use: f32 inputs (`<f4`) and i64 labels (`<i8`).

use std::io::Write;
use std::path::Path;

use crate::Error;

/// An array read from a .npy file: its shape and row-major data.
#[derive(Debug, Clone, PartialEq)]
pub struct Array<T> {
    /// Shape, outermost first.
    pub shape: Vec<u64>,
    /// Row-major (C order) data, `shape.iter().product()` values.
    pub data: Vec<T>,
}

fn npy_err(path: &Path, reason: impl Into<String>) -> Error {
    Error::Npy {
        path: path.to_path_buf(),
        reason: reason.into(),
    }
}

/// Parses `bytes` (the content of `path`) as a C-order .npy of dtype `descr` (`<f4` or `<i8`).
fn parse<T: npyz::Deserialize>(path: &Path, bytes: &[u8], descr: &str) -> Result<Array<T>, Error> {
    let npy = npyz::NpyFile::new(bytes).map_err(|e| npy_err(path, format!("bad header: {e}")))?;
    // npyz renders the descr as a Python literal, quotes included ('<f4').
    let dtype = npy.dtype().descr();
    if dtype.trim_matches('\'') != descr {
        return Err(npy_err(path, format!("dtype {dtype}, expected {descr}")));
    }
    if npy.order() != npyz::Order::C {
        return Err(npy_err(path, "Fortran order; expected C order"));
    }
    let shape = npy.shape().to_vec();
    let n: u64 = shape.iter().product();
    let data: Vec<T> = npy
        .into_vec()
        .map_err(|e| npy_err(path, format!("bad data: {e}")))?;
    if data.len() as u64 != n {
        return Err(npy_err(
            path,
            format!("{} values for shape {shape:?}", data.len()),
        ));
    }
    Ok(Array { shape, data })
}

/// Parses f32 (`<f4`) .npy bytes of `path`; refuses NaN and infinities.
pub fn parse_f32(path: &Path, bytes: &[u8]) -> Result<Array<f32>, Error> {
    let a = parse::<f32>(path, bytes, "<f4")?;
    if let Some(i) = a.data.iter().position(|v| !v.is_finite()) {
        return Err(npy_err(
            path,
            format!("value {i} is not finite ({})", a.data[i]),
        ));
    }
    Ok(a)
}

/// Parses i64 (`<i8`) .npy bytes of `path`.
pub fn parse_i64(path: &Path, bytes: &[u8]) -> Result<Array<i64>, Error> {
    parse::<i64>(path, bytes, "<i8")
}

/// The NPY 1.0 header for `descr` and `shape`, padded to a multiple of 64 bytes.
fn header(descr: &str, shape: &[usize]) -> Vec<u8> {
    let dims: Vec<String> = shape.iter().map(|d| d.to_string()).collect();
    let shape_txt = if dims.len() == 1 {
        format!("({},)", dims[0])
    } else {
        format!("({})", dims.join(", "))
    };
    let mut dict =
        format!("{{'descr': '{descr}', 'fortran_order': False, 'shape': {shape_txt}, }}");
    let total = 10 + dict.len() + 1;
    dict.push_str(&" ".repeat((64 - total % 64) % 64));
    dict.push('\n');
    let mut out = b"\x93NUMPY\x01\x00".to_vec();
    out.extend_from_slice(&(dict.len() as u16).to_le_bytes());
    out.extend_from_slice(dict.as_bytes());
    out
}

/// Encodes f32 data of `shape` as .npy bytes.
pub fn encode_f32(shape: &[usize], data: &[f32]) -> Vec<u8> {
    let mut out = header("<f4", shape);
    out.reserve(data.len() * 4);
    for v in data {
        out.extend_from_slice(&v.to_le_bytes());
    }
    out
}

/// Encodes i64 data of `shape` as .npy bytes.
pub fn encode_i64(shape: &[usize], data: &[i64]) -> Vec<u8> {
    let mut out = header("<i8", shape);
    out.reserve(data.len() * 8);
    for v in data {
        out.extend_from_slice(&v.to_le_bytes());
    }
    out
}

/// Writes `bytes` to `path` and fsyncs it.
pub fn write_synced(path: &Path, bytes: &[u8]) -> Result<(), Error> {
    let mut f = std::fs::File::create(path).map_err(|e| Error::io(path, e))?;
    f.write_all(bytes).map_err(|e| Error::io(path, e))?;
    f.sync_all().map_err(|e| Error::io(path, e))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn round_trips_and_header_is_aligned() {
        let b = encode_f32(&[2, 3], &[1.0, 2.0, 3.0, 4.0, 5.0, 6.5]);
        assert_eq!((b.len() - 24) % 64, 0);
        let a = parse_f32(Path::new("x.npy"), &b).expect("parse");
        assert_eq!(a.shape, vec![2, 3]);
        assert_eq!(a.data[5], 6.5);
        let b = encode_i64(&[3], &[0, 1, -1]);
        let a = parse_i64(Path::new("y.npy"), &b).expect("parse");
        assert_eq!(a.data, vec![0, 1, -1]);
        assert!(parse_i64(Path::new("x.npy"), &encode_f32(&[1], &[1.0])).is_err());
    }
}
