//! Appends log rows with `heap_insert` and `index_insert` instead of an INSERT statement. For
//! a single-row transaction, planning and starting an executor for the outbox row costs more
//! than writing the row; this path costs about as much as the row itself. The log partitions
//! have no triggers, constraints or expression indexes for the executor to take care of.

use pgrx::pg_sys;
use pgrx::prelude::*;

use crate::error::OutboxError;
use crate::shape::Op;

pub struct LogRow<'a> {
    pub slot: i16,
    pub n: i32,
    pub source: pg_sys::Oid,
    pub source_name: &'a str,
    pub op: Op,
    pub event_type: &'a str,
    pub keys: &'a str,
    pub data: Option<&'a str>,
    pub key_hashes: &'a [i64],
    pub table_hash: i64,
}

unsafe fn text(value: &str) -> pg_sys::Datum {
    unsafe { pg_sys::Datum::from(pg_sys::cstring_to_text_with_len(value.as_ptr().cast(), value.len() as i32)) }
}

/// Writes `row` into the log partition `partition`, drawing its base from `sequence`.
pub unsafe fn append(partition: pg_sys::Oid, sequence: pg_sys::Oid, row: &LogRow) -> Result<(), OutboxError> {
    unsafe {
        let relation = pg_sys::table_open(partition, pg_sys::RowExclusiveLock as pg_sys::LOCKMODE);
        let desc = (*relation).rd_att;
        let natts = (*desc).natts as usize;
        let mut values = vec![pg_sys::Datum::from(0); natts];
        let mut nulls = vec![true; natts];

        // The xid first: a claim's straddle floor relies on every base being drawn after its
        // transaction got its xid (see StraddleFloor).
        let txid = pg_sys::GetTopFullTransactionId().value;
        let base = pgrx::direct_function_call::<i64>(pg_sys::nextval_oid, &[sequence.into_datum()])
            .expect("nextval returns a value");
        let hashes: Vec<pg_sys::Datum> = row.key_hashes.iter().map(|h| pg_sys::Datum::from(*h)).collect();
        let hash_array = pg_sys::construct_array(
            hashes.as_ptr().cast_mut(),
            hashes.len() as i32,
            pg_sys::INT8OID,
            8,
            true,
            pg_sys::TYPALIGN_DOUBLE as std::ffi::c_char,
        );
        for i in 0..natts {
            let attribute = &*(*desc).attrs.as_ptr().add(i);
            if attribute.attisdropped {
                continue;
            }
            let name = std::ffi::CStr::from_ptr(attribute.attname.data.as_ptr()).to_bytes();
            let value = match name {
                b"slot" => pg_sys::Datum::from(row.slot),
                b"base" => pg_sys::Datum::from(base),
                b"n" => pg_sys::Datum::from(row.n),
                b"txid" => pg_sys::Datum::from(txid),
                b"created_at" => pg_sys::Datum::from(pg_sys::GetCurrentTimestamp()),
                b"source" => pg_sys::Datum::from(row.source),
                b"source_name" => text(row.source_name),
                b"op" => pg_sys::Datum::from(row.op.code()),
                b"type" => text(row.event_type),
                b"keys" => text(row.keys),
                b"data" => match row.data {
                    Some(data) => text(data),
                    None => continue,
                },
                b"key_hashes" => pg_sys::Datum::from(hash_array),
                b"table_hash" => pg_sys::Datum::from(row.table_hash),
                other => {
                    return Err(OutboxError::Capture(
                        "outbox_log".into(),
                        format!("unexpected column {}", String::from_utf8_lossy(other)),
                    ))
                }
            };
            values[i] = value;
            nulls[i] = false;
        }

        let tuple = pg_sys::heap_form_tuple(desc, values.as_mut_ptr(), nulls.as_mut_ptr());
        pg_sys::simple_heap_insert(relation, tuple);

        let indexes = pg_sys::RelationGetIndexList(relation);
        let count = if indexes.is_null() { 0 } else { (*indexes).length };
        for i in 0..count {
            let index = pg_sys::index_open(pg_sys::list_nth_oid(indexes, i), pg_sys::RowExclusiveLock as pg_sys::LOCKMODE);
            let info = pg_sys::BuildIndexInfo(index);
            let columns = (*info).ii_NumIndexAttrs as usize;
            let mut index_values = vec![pg_sys::Datum::from(0); columns];
            let mut index_nulls = vec![false; columns];
            for c in 0..columns {
                let attnum = (*info).ii_IndexAttrNumbers[c] as usize;
                if attnum == 0 {
                    return Err(OutboxError::Capture("outbox_log".into(), "expression indexes are not supported".into()));
                }
                index_values[c] = values[attnum - 1];
                index_nulls[c] = nulls[attnum - 1];
            }
            #[cfg(feature = "pg13")]
            pg_sys::index_insert(
                index,
                index_values.as_mut_ptr(),
                index_nulls.as_mut_ptr(),
                &mut (*tuple).t_self,
                relation,
                pg_sys::IndexUniqueCheck::UNIQUE_CHECK_NO,
                info,
            );
            #[cfg(not(feature = "pg13"))]
            pg_sys::index_insert(
                index,
                index_values.as_mut_ptr(),
                index_nulls.as_mut_ptr(),
                &mut (*tuple).t_self,
                relation,
                pg_sys::IndexUniqueCheck::UNIQUE_CHECK_NO,
                false,
                info,
            );
            pg_sys::index_close(index, pg_sys::NoLock as pg_sys::LOCKMODE);
        }
        pg_sys::table_close(relation, pg_sys::NoLock as pg_sys::LOCKMODE);
        Ok(())
    }
}
