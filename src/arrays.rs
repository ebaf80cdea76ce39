//! int8 and timestamptz arrays built from slices and read as slices. pgrx builds an array
//! element by element and reads one through a deconstructed copy: a claim of 1,000 events
//! spent 1.1 million instructions building its ledger row's four arrays, and 500 a window row
//! reading its key hashes. Both types are eight bytes and passed by value, so without NULLs an
//! array's data is the plain C array of its elements.

use std::ptr::NonNull;

use pgrx::array::RawArray;
use pgrx::datum::DatumWithOid;
use pgrx::pg_sys;
use pgrx::prelude::*;

/// The array is allocated in the current memory context (SPI's procedure memory at every call
/// site), which outlives the query it is an argument of.
fn build(elements: *const i64, count: usize, element_type: pg_sys::Oid, array_type: pg_sys::Oid) -> DatumWithOid<'static> {
    unsafe {
        // construct_array copies the elements; it only reads through the pointer
        let array = pg_sys::construct_array(
            elements.cast_mut().cast(),
            count as i32,
            element_type,
            8,
            true,
            pg_sys::TYPALIGN_DOUBLE as std::ffi::c_char,
        );
        DatumWithOid::new(pg_sys::Datum::from(array), array_type)
    }
}

/// An `int8[]` argument.
pub fn int8s(values: &[i64]) -> DatumWithOid<'static> {
    build(values.as_ptr(), values.len(), pg_sys::INT8OID, pg_sys::INT8ARRAYOID)
}

/// A `timestamptz[]` argument.
pub fn timestamps(values: &[TimestampWithTimeZone]) -> DatumWithOid<'static> {
    // TimestampWithTimeZone is a transparent i64 (microseconds), as timestamptz is
    build(values.as_ptr().cast(), values.len(), pg_sys::TIMESTAMPTZOID, pg_sys::TIMESTAMPTZARRAYOID)
}

/// An `int8[]` value as a query returned it, left undecoded for `int8_elements`.
pub struct Int8ArrayDatum(pub pg_sys::Datum);

impl FromDatum for Int8ArrayDatum {
    unsafe fn from_polymorphic_datum(datum: pg_sys::Datum, is_null: bool, _: pg_sys::Oid) -> Option<Self> {
        (!is_null).then_some(Int8ArrayDatum(datum))
    }
}

impl IntoDatum for Int8ArrayDatum {
    fn into_datum(self) -> Option<pg_sys::Datum> {
        Some(self.0)
    }

    fn type_oid() -> pg_sys::Oid {
        pg_sys::INT8ARRAYOID
    }
}

/// The elements of an `int8[]` datum, or None if it holds a NULL or has more than one
/// dimension.
///
/// # Safety
/// The slice borrows either the datum itself (an array stored inline and uncompressed) or a
/// detoasted copy made in the current memory context: both must outlive `'a`.
pub unsafe fn int8_elements<'a>(datum: Int8ArrayDatum) -> Option<&'a [i64]> {
    unsafe {
        let array = NonNull::new(pg_sys::pg_detoast_datum(datum.0.cast_mut_ptr()).cast::<pg_sys::ArrayType>())?;
        let mut array = RawArray::from_ptr(array);
        // (a slice of an array that held a NULL keeps its null bitmap with no NULL in it)
        if array.oid() != pg_sys::INT8OID || array.dims().len() > 1 || (array.nulls().is_some() && array.any_nulls()) {
            return None;
        }
        let data = array.data::<i64>();
        Some(std::slice::from_raw_parts(data.as_ptr().cast::<i64>(), array.len()))
    }
}
