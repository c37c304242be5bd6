//! Payload tensors to and from tract tensors (feature `tract`): the one
//! place where [`DType`] meets tract's `DatumType`, shared by the compiler
//! and the agent so both feed a model the same way.

use tract_data::prelude::{DatumType, Tensor as TractTensor};

use crate::payload::{DType, TensorData};

/// tract's datum type of `d`.
pub fn datum_type(d: DType) -> DatumType {
    match d {
        DType::F32 => DatumType::F32,
        DType::F16 => DatumType::F16,
        DType::F64 => DatumType::F64,
        DType::I8 => DatumType::I8,
        DType::I16 => DatumType::I16,
        DType::I32 => DatumType::I32,
        DType::I64 => DatumType::I64,
        DType::U8 => DatumType::U8,
        DType::Bool => DatumType::Bool,
    }
}

/// The [`DType`] of a tract datum type, `None` for types no payload carries
/// (strings, complex, quantized, u16..u64).
pub fn dtype_of(t: DatumType) -> Option<DType> {
    DType::ALL.into_iter().find(|d| datum_type(*d) == t)
}

/// A tract tensor of `shape` holding `d`.
///
/// # Errors
/// tract's error when the element count does not match the shape.
pub fn to_tract(d: &TensorData, shape: &[usize]) -> tract_data::TractResult<TractTensor> {
    match d {
        TensorData::F32(v) => TractTensor::from_shape(shape, v),
        TensorData::F16(v) => TractTensor::from_shape(shape, v),
        TensorData::F64(v) => TractTensor::from_shape(shape, v),
        TensorData::I8(v) => TractTensor::from_shape(shape, v),
        TensorData::I16(v) => TractTensor::from_shape(shape, v),
        TensorData::I32(v) => TractTensor::from_shape(shape, v),
        TensorData::I64(v) => TractTensor::from_shape(shape, v),
        TensorData::U8(v) => TractTensor::from_shape(shape, v),
        TensorData::Bool(v) => TractTensor::from_shape(shape, v),
    }
}

/// The elements of a tract tensor in its own type; other types are cast to
/// f32.
///
/// # Errors
/// tract's error when the tensor cannot be read or cast.
pub fn from_tract(t: &TractTensor) -> tract_data::TractResult<TensorData> {
    fn plain<T: tract_data::prelude::Datum + Copy>(
        t: &TractTensor,
    ) -> tract_data::TractResult<Vec<T>> {
        Ok(t.to_plain_array_view::<T>()?.iter().copied().collect())
    }
    Ok(match dtype_of(t.datum_type()) {
        Some(DType::F32) => TensorData::F32(plain(t)?),
        Some(DType::F16) => TensorData::F16(plain(t)?),
        Some(DType::F64) => TensorData::F64(plain(t)?),
        Some(DType::I8) => TensorData::I8(plain(t)?),
        Some(DType::I16) => TensorData::I16(plain(t)?),
        Some(DType::I32) => TensorData::I32(plain(t)?),
        Some(DType::I64) => TensorData::I64(plain(t)?),
        Some(DType::U8) => TensorData::U8(plain(t)?),
        Some(DType::Bool) => TensorData::Bool(plain(t)?),
        None => TensorData::F32(plain(&*t.cast_to::<f32>()?)?),
    })
}

/// A tensor of zeros (false) of `dtype` and `shape`.
pub fn zeros(dtype: DType, shape: &[usize]) -> TractTensor {
    TractTensor::zero_dt(datum_type(dtype), shape).unwrap_or_else(|_| TractTensor::default())
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;

    #[test]
    fn every_dtype_round_trips_through_tract() {
        for d in DType::ALL {
            let data = TensorData::from_f32(d, &[0.0, 1.0, 0.0, 1.0]);
            let t = to_tract(&data, &[2, 2]).unwrap();
            assert_eq!(t.datum_type(), datum_type(d));
            assert_eq!(from_tract(&t).unwrap(), data, "{d}");
            assert_eq!(zeros(d, &[3]).datum_type(), datum_type(d));
        }
    }
}
