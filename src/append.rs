//! Appends log rows with `heap_insert` and `index_insert` instead of an INSERT statement. For
//! a single-row transaction, planning and starting an executor for the outbox row costs more
//! than writing the row; this path costs about as much as the row itself. The log partitions
//! have no triggers, constraints or expression indexes for the executor to take care of.
//!
//! Writing a row takes about fifteen calls into Postgres. pgrx guards each call it binds with
//! a `sigsetjmp` and a thread check (about 130 instructions, 3,000 a single-row transaction),
//! so the write runs as one guarded block of the unguarded declarations below. The block holds
//! no Rust value that needs dropping and cannot panic, which is what `pg_guard_ffi_boundary`
//! asks of it: an ERROR raised inside it skips nothing but plain data.

use std::cell::RefCell;

use pgrx::pg_sys;

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

mod unguarded {
    use pgrx::pg_sys::*;

    unsafe extern "C-unwind" {
        pub fn table_open(relation: Oid, lockmode: LOCKMODE) -> Relation;
        pub fn table_close(relation: Relation, lockmode: LOCKMODE);
        pub fn index_open(relation: Oid, lockmode: LOCKMODE) -> Relation;
        pub fn index_close(relation: Relation, lockmode: LOCKMODE);
        pub fn GetTopFullTransactionId() -> FullTransactionId;
        pub fn nextval_internal(relation: Oid, check_permissions: bool) -> i64;
        pub fn GetCurrentTimestamp() -> TimestampTz;
        pub fn cstring_to_text_with_len(s: *const core::ffi::c_char, len: core::ffi::c_int) -> *mut text;
        pub fn construct_array(
            elems: *mut Datum,
            nelems: core::ffi::c_int,
            elmtype: Oid,
            elmlen: core::ffi::c_int,
            elmbyval: bool,
            elmalign: core::ffi::c_char,
        ) -> *mut ArrayType;
        pub fn heap_form_tuple(descriptor: TupleDesc, values: *const Datum, isnull: *const bool) -> HeapTuple;
        pub fn simple_heap_insert(relation: Relation, tuple: HeapTuple);
        pub fn RelationGetIndexList(relation: Relation) -> *mut List;
        pub fn BuildIndexInfo(index: Relation) -> *mut IndexInfo;
        pub fn index_insert(
            index: Relation,
            values: *mut Datum,
            isnull: *mut bool,
            heap_tid: ItemPointer,
            heap: Relation,
            check_unique: IndexUniqueCheck::Type,
            #[cfg(not(feature = "pg13"))] index_unchanged: bool,
            info: *mut IndexInfo,
        ) -> bool;
    }
}

/// The log's columns, by name.
#[derive(Clone, Copy, PartialEq)]
enum Field {
    Slot,
    Base,
    N,
    Txid,
    CreatedAt,
    Source,
    SourceName,
    Op,
    Type,
    Keys,
    Data,
    KeyHashes,
    TableHash,
    Dropped,
}

impl Field {
    fn named(name: &[u8]) -> Option<Field> {
        Some(match name {
            b"slot" => Field::Slot,
            b"base" => Field::Base,
            b"n" => Field::N,
            b"txid" => Field::Txid,
            b"created_at" => Field::CreatedAt,
            b"source" => Field::Source,
            b"source_name" => Field::SourceName,
            b"op" => Field::Op,
            b"type" => Field::Type,
            b"keys" => Field::Keys,
            b"data" => Field::Data,
            b"key_hashes" => Field::KeyHashes,
            b"table_hash" => Field::TableHash,
            _ => return None,
        })
    }
}

/// More than the log has ever had, dropped columns included; a row's values live on the stack.
const MAX_COLUMNS: usize = 32;
const MAX_INDEX_COLUMNS: usize = pg_sys::INDEX_MAX_KEYS as usize;

/// What each column of a log segment holds, read from its descriptor once per backend.
#[derive(Clone, Copy)]
struct Layout {
    fields: [Field; MAX_COLUMNS],
    columns: usize,
}

thread_local! {
    static LAYOUTS: RefCell<Vec<(pg_sys::Oid, Layout)>> = const { RefCell::new(Vec::new()) };
}

/// Called on relcache invalidation: the segment's columns may have changed.
pub fn forget_layout(relid: pg_sys::Oid) {
    LAYOUTS.with(|l| l.borrow_mut().retain(|(r, _)| relid != pg_sys::InvalidOid && *r != relid));
}

/// Writes `row` into the log partition `partition`, drawing its base from `sequence`.
pub unsafe fn append(partition: pg_sys::Oid, sequence: pg_sys::Oid, row: &LogRow) -> Result<(), OutboxError> {
    // Locked before the layout is looked up: taking the lock processes the invalidations of a
    // change to the segment's columns committed since, which forget its layout.
    unsafe { pg_sys::LockRelationOid(partition, pg_sys::RowExclusiveLock as pg_sys::LOCKMODE) };
    let layout = match LAYOUTS.with(|l| l.borrow().iter().find(|(r, _)| *r == partition).map(|(_, layout)| *layout)) {
        Some(layout) => layout,
        None => {
            let layout = unsafe { read_layout(partition)? };
            LAYOUTS.with(|l| l.borrow_mut().push((partition, layout)));
            layout
        }
    };
    let outcome = unsafe { pg_sys::ffi::pg_guard_ffi_boundary(|| write_row(partition, sequence, row, &layout)) };
    let refused = |what: &str| Err(OutboxError::Capture("outbox_log".into(), what.into()));
    match outcome {
        Written::Row => Ok(()),
        Written::NotWithExpressionIndex => refused("expression indexes are not supported"),
        Written::StaleLayout => refused("its columns changed while the row was written"),
    }
}

unsafe fn read_layout(partition: pg_sys::Oid) -> Result<Layout, OutboxError> {
    let unexpected = |what: String| OutboxError::Capture("outbox_log".into(), what);
    unsafe {
        // (append holds the segment's lock, so its columns stay as read here)
        let relation = pg_sys::table_open(partition, pg_sys::NoLock as pg_sys::LOCKMODE);
        let attributes = crate::tupdesc::attributes((*relation).rd_att);
        let columns = attributes.len();
        let mut layout = Layout { fields: [Field::Dropped; MAX_COLUMNS], columns };
        let mut found = Ok(());
        if columns > MAX_COLUMNS {
            found = Err(unexpected(format!("{columns} columns, more than {MAX_COLUMNS}")));
        }
        for (i, attribute) in attributes.iter().enumerate().take(MAX_COLUMNS) {
            if attribute.attisdropped {
                continue;
            }
            let name = std::ffi::CStr::from_ptr(attribute.attname.data.as_ptr()).to_bytes();
            match Field::named(name) {
                Some(field) => layout.fields[i] = field,
                None => found = Err(unexpected(format!("unexpected column {}", String::from_utf8_lossy(name)))),
            }
        }
        pg_sys::table_close(relation, pg_sys::NoLock as pg_sys::LOCKMODE);
        found.map(|()| layout)
    }
}

enum Written {
    Row,
    NotWithExpressionIndex,
    /// The segment does not have the columns its cached layout says (append locks the segment
    /// before it looks the layout up, so this is only a backstop).
    StaleLayout,
}

/// The guarded block: unguarded calls and plain data only (see the module comment).
unsafe fn write_row(partition: pg_sys::Oid, sequence: pg_sys::Oid, row: &LogRow, layout: &Layout) -> Written {
    use unguarded::*;
    unsafe {
        let text = |value: &str| pg_sys::Datum::from(cstring_to_text_with_len(value.as_ptr().cast(), value.len() as i32));
        // (append took the lock)
        let relation = table_open(partition, pg_sys::NoLock as pg_sys::LOCKMODE);
        if (*(*relation).rd_att).natts as usize != layout.columns {
            table_close(relation, pg_sys::NoLock as pg_sys::LOCKMODE);
            return Written::StaleLayout;
        }
        // The xid first: a claim's straddle floor relies on every base being drawn after its
        // transaction got its xid (see StraddleFloor). The owner runs this, so nextval needs no
        // permission check.
        let txid = GetTopFullTransactionId().value;
        let base = nextval_internal(sequence, false);
        // int8 is passed by value, so the hashes already are the array's datums
        let hashes = construct_array(
            row.key_hashes.as_ptr().cast_mut().cast(),
            row.key_hashes.len() as i32,
            pg_sys::INT8OID,
            8,
            true,
            pg_sys::TYPALIGN_DOUBLE as core::ffi::c_char,
        );
        let mut values = [pg_sys::Datum::from(0); MAX_COLUMNS];
        let mut nulls = [true; MAX_COLUMNS];
        for (i, field) in layout.fields.iter().take(layout.columns).enumerate() {
            values[i] = match field {
                Field::Dropped => continue,
                Field::Slot => pg_sys::Datum::from(row.slot),
                Field::Base => pg_sys::Datum::from(base),
                Field::N => pg_sys::Datum::from(row.n),
                Field::Txid => pg_sys::Datum::from(txid),
                Field::CreatedAt => pg_sys::Datum::from(GetCurrentTimestamp()),
                Field::Source => pg_sys::Datum::from(row.source),
                Field::SourceName => text(row.source_name),
                Field::Op => pg_sys::Datum::from(row.op.code()),
                Field::Type => text(row.event_type),
                Field::Keys => text(row.keys),
                Field::Data => match row.data {
                    Some(data) => text(data),
                    None => continue,
                },
                Field::KeyHashes => pg_sys::Datum::from(hashes),
                Field::TableHash => pg_sys::Datum::from(row.table_hash),
            };
            nulls[i] = false;
        }
        let tuple = heap_form_tuple((*relation).rd_att, values.as_ptr(), nulls.as_ptr());
        simple_heap_insert(relation, tuple);

        let indexes = RelationGetIndexList(relation);
        let count = if indexes.is_null() { 0 } else { (*indexes).length as usize };
        for i in 0..count {
            let index = index_open((*(*indexes).elements.add(i)).oid_value, pg_sys::RowExclusiveLock as pg_sys::LOCKMODE);
            let info = BuildIndexInfo(index);
            let mut index_values = [pg_sys::Datum::from(0); MAX_INDEX_COLUMNS];
            let mut index_nulls = [false; MAX_INDEX_COLUMNS];
            let columns = ((*info).ii_NumIndexAttrs as usize).min(MAX_INDEX_COLUMNS);
            for c in 0..columns {
                let attnum = (*info).ii_IndexAttrNumbers[c] as usize;
                if attnum == 0 || attnum > layout.columns {
                    index_close(index, pg_sys::NoLock as pg_sys::LOCKMODE);
                    table_close(relation, pg_sys::NoLock as pg_sys::LOCKMODE);
                    return if attnum == 0 { Written::NotWithExpressionIndex } else { Written::StaleLayout };
                }
                index_values[c] = values[attnum - 1];
                index_nulls[c] = nulls[attnum - 1];
            }
            index_insert(
                index,
                index_values.as_mut_ptr(),
                index_nulls.as_mut_ptr(),
                &mut (*tuple).t_self,
                relation,
                pg_sys::IndexUniqueCheck::UNIQUE_CHECK_NO,
                #[cfg(not(feature = "pg13"))]
                false,
                info,
            );
            index_close(index, pg_sys::NoLock as pg_sys::LOCKMODE);
        }
        table_close(relation, pg_sys::NoLock as pg_sys::LOCKMODE);
        Written::Row
    }
}
