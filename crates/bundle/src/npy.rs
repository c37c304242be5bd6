//! The `.npy` tensor file format (NumPy format 1.0-3.0, little-endian, C
//! order), in every element type of [`DType`]: calibration sets for
//! `edgefleet compile --calibration`, inputs of `edgefleet run` and replayed
//! inputs on the agent share it.
//! Spec: https://numpy.org/doc/stable/reference/generated/numpy.lib.format.html

use crate::payload::{DType, TensorData};

/// Parses a little-endian C-order `.npy` file (versions 1-3) of any
/// [`DType`] (`descr` `<f4 <f2 <f8 |i1 <i2 <i4 <i8 |u1 |b1`; `<` or `|` alike
/// for one-byte types).
///
/// # Errors
/// A message naming what is wrong (magic, version, dtype, order, shape, length).
pub fn parse_npy_data(b: &[u8]) -> Result<(Vec<usize>, TensorData), String> {
    if b.len() < 10 || &b[..6] != b"\x93NUMPY" {
        return Err("not a .npy file".into());
    }
    let (hlen, start) = match b[6] {
        1 => (u16::from_le_bytes([b[8], b[9]]) as usize, 10),
        2 | 3 if b.len() >= 12 => (u32::from_le_bytes([b[8], b[9], b[10], b[11]]) as usize, 12),
        v => return Err(format!("unsupported .npy version {v}")),
    };
    let header = std::str::from_utf8(b.get(start..start + hlen).ok_or("truncated header")?)
        .map_err(|e| e.to_string())?;
    let descr = header
        .split("'descr':")
        .nth(1)
        .and_then(|s| s.split('\'').nth(1))
        .ok_or("no descr in header")?;
    let dtype = DType::ALL
        .into_iter()
        .find(|d| {
            let want = d.npy_descr();
            descr == want
                || (d.size() == 1
                    && descr.get(1..) == want.get(1..)
                    && descr.starts_with(['<', '|']))
        })
        .ok_or_else(|| {
            format!(
                "dtype '{descr}' is not one of {} (little-endian), header: {}",
                DType::ALL.map(DType::npy_descr).join(" "),
                header.trim()
            )
        })?;
    if header.contains("'fortran_order': True") {
        return Err("fortran_order arrays are not supported".into());
    }
    let sh = header
        .split("'shape':")
        .nth(1)
        .and_then(|s| s.split('(').nth(1))
        .and_then(|s| s.split(')').next())
        .ok_or("no shape in header")?;
    let shape: Vec<usize> = sh
        .split(',')
        .map(str::trim)
        .filter(|s| !s.is_empty())
        .map(|s| s.parse::<usize>().map_err(|e| e.to_string()))
        .collect::<Result<_, _>>()?;
    let body = &b[start + hlen..];
    let need = shape
        .iter()
        .try_fold(dtype.size(), |a, &d| a.checked_mul(d))
        .ok_or_else(|| format!("shape {shape:?} overflows"))?;
    if body.len() != need {
        return Err(format!(
            "data has {} bytes, shape {shape:?} of {dtype} needs {need}",
            body.len()
        ));
    }
    Ok((shape, TensorData::from_le_bytes(dtype, body)?))
}

/// Parses a little-endian float32 C-order `.npy` file (versions 1-3).
///
/// # Errors
/// A message naming what is wrong (magic, version, dtype other than `<f4`,
/// order, shape, length).
pub fn parse_npy(b: &[u8]) -> Result<(Vec<usize>, Vec<f32>), String> {
    match parse_npy_data(b)? {
        (shape, TensorData::F32(v)) => Ok((shape, v)),
        (_, d) => Err(format!(
            "dtype must be '<f4' (little-endian float32), the file holds {}",
            d.dtype()
        )),
    }
}

/// Writes a `.npy` (version 1.0, header padded to 64 bytes) of `data`'s type.
pub fn write_npy_data(shape: &[usize], data: &TensorData) -> Vec<u8> {
    let dims: Vec<String> = shape.iter().map(|d| d.to_string()).collect();
    let shape_s = if dims.len() == 1 {
        format!("({},)", dims[0])
    } else {
        format!("({})", dims.join(", "))
    };
    let mut h = format!(
        "{{'descr': '{}', 'fortran_order': False, 'shape': {shape_s}, }}",
        data.dtype().npy_descr()
    );
    while (10 + h.len() + 1) % 64 != 0 {
        h.push(' ');
    }
    h.push('\n');
    let mut out = b"\x93NUMPY\x01\x00".to_vec();
    out.extend((h.len() as u16).to_le_bytes());
    out.extend(h.as_bytes());
    out.extend(data.to_le_bytes());
    out
}

/// Writes a float32 `.npy` (version 1.0, header padded to 64 bytes).
pub fn write_npy(shape: &[usize], data: &[f32]) -> Vec<u8> {
    write_npy_data(shape, &TensorData::F32(data.to_vec()))
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;

    /// `b` with the first `from` replaced by `to` (same length).
    fn replace(b: &[u8], from: &[u8], to: &[u8]) -> Vec<u8> {
        let i = b.windows(from.len()).position(|w| w == from).unwrap();
        let mut out = b.to_vec();
        out[i..i + to.len()].copy_from_slice(to);
        out
    }

    #[test]
    fn every_dtype_round_trips_and_numpy_spellings_parse() {
        let values = [0.0f32, 1.0, -3.0, 100.0];
        for dtype in DType::ALL {
            let d = TensorData::from_f32(dtype, &values);
            let b = write_npy_data(&[2, 2], &d);
            assert_eq!(
                parse_npy_data(&b).unwrap(),
                (vec![2, 2], d.clone()),
                "{dtype}"
            );
        }
        // NumPy writes one-byte types as `|i1`, `|u1`, `|b1`; some writers use `<`.
        let b = write_npy_data(&[1], &TensorData::U8(vec![7]));
        let (_, d) = parse_npy_data(&replace(&b, b"|u1", b"<u1")).unwrap();
        assert_eq!(d, TensorData::U8(vec![7]));
    }

    #[test]
    fn wrong_files_are_named_errors() {
        let good = write_npy_data(&[3], &TensorData::I32(vec![1, 2, 3]));
        let e = parse_npy(&good).unwrap_err();
        assert!(e.contains("'<f4'") && e.contains("i32"), "{e}");
        let e = parse_npy_data(&replace(&good, b"<i4", b">i4")).unwrap_err();
        assert!(e.contains("'>i4'"), "{e}");
        let e = parse_npy_data(&good[..good.len() - 1]).unwrap_err();
        assert!(e.contains("needs 12"), "{e}");
        let mut bad_bool = write_npy_data(&[1], &TensorData::Bool(vec![true]));
        *bad_bool.last_mut().unwrap() = 2;
        let e = parse_npy_data(&bad_bool).unwrap_err();
        assert!(e.contains("not 0 or 1"), "{e}");
    }
}
