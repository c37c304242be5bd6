//! The `.npy` tensor file format (NumPy format 1.0-3.0, little-endian
//! float32, C order): calibration sets for `edgefleet compile --calibration`
//! and replayed inputs on the agent share it.
//! Spec: https://numpy.org/doc/stable/reference/generated/numpy.lib.format.html

/// Parses a little-endian float32 C-order `.npy` file (versions 1-3).
///
/// # Errors
/// A message naming what is wrong (magic, version, dtype, order, shape, length).
pub fn parse_npy(b: &[u8]) -> Result<(Vec<usize>, Vec<f32>), String> {
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
    if !header.contains("'descr': '<f4'") {
        return Err(format!(
            "dtype must be '<f4' (little-endian float32), header: {}",
            header.trim()
        ));
    }
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
    let n: usize = shape.iter().product();
    if body.len() != n * 4 {
        return Err(format!(
            "data has {} bytes, shape {shape:?} needs {}",
            body.len(),
            n * 4
        ));
    }
    Ok((
        shape,
        body.chunks_exact(4)
            .map(|c| f32::from_le_bytes([c[0], c[1], c[2], c[3]]))
            .collect(),
    ))
}

/// Writes a float32 `.npy` (version 1.0, header padded to 64 bytes).
pub fn write_npy(shape: &[usize], data: &[f32]) -> Vec<u8> {
    let dims: Vec<String> = shape.iter().map(|d| d.to_string()).collect();
    let shape_s = if dims.len() == 1 {
        format!("({},)", dims[0])
    } else {
        format!("({})", dims.join(", "))
    };
    let mut h = format!("{{'descr': '<f4', 'fortran_order': False, 'shape': {shape_s}, }}");
    while (10 + h.len() + 1) % 64 != 0 {
        h.push(' ');
    }
    h.push('\n');
    let mut out = b"\x93NUMPY\x01\x00".to_vec();
    out.extend((h.len() as u16).to_le_bytes());
    out.extend(h.as_bytes());
    out.extend(data.iter().flat_map(|x| x.to_le_bytes()));
    out
}
