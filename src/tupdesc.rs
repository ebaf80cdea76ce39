//! A tuple descriptor's attributes as a slice. PostgreSQL 18 moved them behind an array of
//! compact attributes, so `attrs` is no longer a field there.

use pgrx::pg_sys;

/// # Safety
/// `desc` must be a valid tuple descriptor that outlives the slice.
pub unsafe fn attributes<'a>(desc: pg_sys::TupleDesc) -> &'a [pg_sys::FormData_pg_attribute] {
    unsafe {
        let count = (*desc).natts as usize;
        #[cfg(not(feature = "pg18"))]
        let first = (*desc).attrs.as_ptr();
        #[cfg(feature = "pg18")]
        let first = (*desc).compact_attrs.as_ptr().add(count).cast::<pg_sys::FormData_pg_attribute>();
        std::slice::from_raw_parts(first, count)
    }
}
