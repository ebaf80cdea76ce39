//! The SQL-callable functions. Each wrapper only converts arguments and raises errors; the
//! work is in the modules it calls. Parameter names are part of the contract (named notation).
//!
//! Consumer and admin functions are SECURITY DEFINER with a pinned search_path, so callers
//! need EXECUTE on them and nothing on the tables. `outbox_attach`/`outbox_detach` run as the
//! caller, who must own the table, and act as the extension owner only after that check.

use pgrx::datum::{Interval, TimestampWithTimeZone};
use pgrx::fcinfo::pg_getarg;
use pgrx::prelude::*;
use pgrx::PgRelation;

use crate::error::{OrRaise, OutboxError};
use crate::consume::{Claimed, Payloads};
use crate::{admin, attach, consume};

fn given<T>(value: Option<T>, name: &'static str) -> T {
    value.ok_or(OutboxError::NullArgument(name)).or_raise()
}

#[pg_extern(volatile, parallel_unsafe)]
#[search_path(pg_catalog, pg_temp)]
fn outbox_attach(
    source: Option<PgRelation>,
    payload_columns: default!(Option<Vec<Option<String>>>, "NULL"),
    watch_columns: default!(Option<Vec<Option<String>>>, "NULL"),
    event_prefix: default!(Option<&str>, "'EMBED'"),
    key_columns: default!(Option<Vec<Option<String>>>, "NULL"),
) {
    let source = given(source, "source");
    attach::attach(&source, payload_columns, watch_columns, given(event_prefix, "event_prefix"), key_columns).or_raise()
}

#[pg_extern(volatile, parallel_unsafe)]
#[search_path(pg_catalog, pg_temp)]
fn outbox_detach(source: Option<PgRelation>) {
    attach::detach(&given(source, "source")).or_raise()
}

#[pg_extern(volatile, parallel_unsafe, security_definer)]
#[search_path(pg_catalog, pg_temp)]
fn outbox_subscribe(
    name: Option<&str>,
    sink: default!(Option<&str>, "'pull'"),
    options: default!(Option<pgrx::JsonB>, "'{}'"),
    from_start: default!(Option<bool>, "false"),
) {
    admin::subscribe(given(name, "name"), given(sink, "sink"), &given(options, "options").0, given(from_start, "from_start"))
        .or_raise()
}

#[pg_extern(volatile, parallel_unsafe, security_definer)]
#[search_path(pg_catalog, pg_temp)]
fn outbox_unsubscribe(name: Option<&str>) {
    admin::unsubscribe(given(name, "name")).or_raise()
}

function_info_v1!(pg_finfo_outbox_claim);

/// `outbox_claim(batch_size, subscription, lease)`, a C function of the SQL API (sql/api.sql).
/// It hands its rows over in one tuplestore (materialize mode) with the payloads as jsonb,
/// where pgrx's set-returning functions return a row per call, and each call would apply and
/// undo the pinned search_path again. Before 0.6.0 a PL/pgSQL function unnested arrays from
/// `outbox_claim_events` and cast each payload: that cost as much as the claim itself.
#[pg_guard]
#[unsafe(no_mangle)]
pub unsafe extern "C-unwind" fn outbox_claim(fcinfo: pg_sys::FunctionCallInfo) -> pg_sys::Datum {
    unsafe { claim_into_tuplestore(fcinfo) }.or_raise();
    pg_sys::Datum::from(0)
}

unsafe fn claim_into_tuplestore(fcinfo: pg_sys::FunctionCallInfo) -> Result<(), OutboxError> {
    let result = unsafe { (*fcinfo).resultinfo as *mut pg_sys::ReturnSetInfo };
    let accepts_a_set = !result.is_null()
        && unsafe { (*result).type_ == pg_sys::NodeTag::T_ReturnSetInfo }
        && unsafe { (*result).allowedModes } & pg_sys::SetFunctionReturnMode::SFRM_Materialize as i32 != 0;
    if !accepts_a_set {
        return Err(OutboxError::NotInSetContext("outbox_claim"));
    }
    // the rows outlive this call: they go into the query's memory
    let query_memory = unsafe { (*(*result).econtext).ecxt_per_query_memory };
    let mut desc: pg_sys::TupleDesc = std::ptr::null_mut();
    let kind = unsafe {
        let previous = pg_sys::MemoryContextSwitchTo(query_memory);
        let kind = pg_sys::get_call_result_type(fcinfo, std::ptr::null_mut(), &mut desc);
        pg_sys::MemoryContextSwitchTo(previous);
        kind
    };
    if kind != pg_sys::TypeFuncClass::TYPEFUNC_COMPOSITE {
        return Err(OutboxError::NotInSetContext("outbox_claim"));
    }

    let (batch_size, subscription, lease) = unsafe {
        (pg_getarg::<i32>(fcinfo, 0), pg_getarg::<&str>(fcinfo, 1), pg_getarg::<Interval>(fcinfo, 2))
    };
    let claimed = claim(batch_size, subscription, lease, Payloads::Render);

    let store = unsafe {
        let previous = pg_sys::MemoryContextSwitchTo(query_memory);
        let random_access = (*result).allowedModes & pg_sys::SetFunctionReturnMode::SFRM_Materialize_Random as i32 != 0;
        let store = pg_sys::tuplestore_begin_heap(random_access, false, pg_sys::work_mem);
        pg_sys::MemoryContextSwitchTo(previous);
        store
    };
    // the text datum of the last event type: events of a type share one (tuplestore copies it)
    let mut type_datum: Option<(std::rc::Rc<str>, pg_sys::Datum)> = None;
    for c in claimed {
        let mut values = [pg_sys::Datum::from(0); 5];
        let mut nulls = [false; 5];
        values[0] = c.id.into_datum().expect("an int8 datum");
        values[4] = c.attempts.into_datum().expect("an int4 datum");
        match c.event {
            Some(event) => {
                values[1] = match &type_datum {
                    Some((event_type, datum)) if std::rc::Rc::ptr_eq(event_type, &event.event_type) => *datum,
                    _ => {
                        let datum = (*event.event_type).into_datum().expect("a text datum");
                        type_datum = Some((event.event_type.clone(), datum));
                        datum
                    }
                };
                values[2] = jsonb(event.payload);
                values[3] = event.created_at.into_datum().expect("a timestamptz datum");
            }
            None => nulls[1..4].fill(true),
        }
        unsafe { pg_sys::tuplestore_putvalues(store, desc, values.as_mut_ptr(), nulls.as_mut_ptr()) };
    }
    unsafe {
        (*result).returnMode = pg_sys::SetFunctionReturnMode::SFRM_Materialize;
        (*result).setResult = store;
        (*result).setDesc = desc;
    }
    Ok(())
}

/// A payload, which the claim wrote as JSON text, as jsonb: written directly where
/// `crate::jsonb` can, else parsed by `jsonb_in`.
pub fn jsonb(payload: String) -> pg_sys::Datum {
    if let Some(bytes) = crate::jsonb::encode(&payload, &mut numeric_bytes) {
        unsafe {
            let datum = pg_sys::palloc(bytes.len()).cast::<u8>();
            std::ptr::copy_nonoverlapping(bytes.as_ptr(), datum, bytes.len());
            pgrx::varlena::set_varsize_4b(datum.cast(), bytes.len() as i32);
            return pg_sys::Datum::from(datum);
        }
    }
    let text = std::ffi::CString::new(payload).expect("JSON text has no NUL byte");
    unsafe { pgrx::direct_function_call_as_datum(pg_sys::jsonb_in, &[text.as_c_str().into_datum()]) }.expect("jsonb_in returns a value")
}

/// Appends the bytes of Postgres' numeric for `value`, as jsonb stores it.
pub fn numeric_bytes(value: i64, out: &mut Vec<u8>) {
    #[cfg(feature = "pg13")]
    let numeric = unsafe { pgrx::direct_function_call_as_datum(pg_sys::int8_numeric, &[value.into_datum()]) }
        .expect("a numeric")
        .cast_mut_ptr::<pg_sys::varlena>();
    #[cfg(not(feature = "pg13"))]
    let numeric = unsafe { pg_sys::int64_to_numeric(value) }.cast::<pg_sys::varlena>();
    out.extend_from_slice(unsafe { std::slice::from_raw_parts(numeric.cast::<u8>(), pgrx::varlena::varsize_any(numeric)) });
}

/// Claims and renders the events, as one row of arrays, for the `outbox_claim` of databases
/// still at 0.5.0 (PL/pgSQL, which unnests them). Not in the 0.6.0 SQL; the update drops it.
#[pg_extern(volatile, parallel_unsafe, sql = false)]
#[search_path(pg_catalog, pg_temp)]
fn outbox_claim_events(
    batch_size: Option<i32>,
    subscription: Option<&str>,
    lease: Option<Interval>,
) -> TableIterator<
    'static,
    (
        name!(ids, Vec<i64>),
        name!(event_types, Vec<Option<String>>),
        name!(payloads, Vec<Option<String>>),
        name!(created_ats, Vec<Option<TimestampWithTimeZone>>),
        name!(attempts, Vec<i32>),
    ),
> {
    let claimed = claim(batch_size, subscription, lease, Payloads::Render);
    let (mut ids, mut event_types, mut payloads, mut created_ats, mut attempts) =
        (Vec::new(), Vec::new(), Vec::new(), Vec::new(), Vec::new());
    for c in claimed {
        ids.push(c.id);
        attempts.push(c.attempts);
        let (event_type, payload, created_at) = match c.event {
            Some(e) => (Some(e.event_type.to_string()), Some(e.payload), Some(e.created_at)),
            None => (None, None, None),
        };
        event_types.push(event_type);
        payloads.push(payload);
        created_ats.push(created_at);
    }
    TableIterator::once((ids, event_types, payloads, created_ats, attempts))
}

/// The claim decision as one row of two arrays, which the `outbox_claim` of databases still at
/// 0.4.0 or older renders itself. Not in the 0.5.0 SQL; the update drops it.
#[pg_extern(volatile, parallel_unsafe, sql = false)]
#[search_path(pg_catalog, pg_temp)]
fn outbox_claim_ids(
    batch_size: Option<i32>,
    subscription: Option<&str>,
    lease: Option<Interval>,
) -> TableIterator<'static, (name!(ids, Vec<i64>), name!(attempts, Vec<i32>))> {
    let claimed = claim(batch_size, subscription, lease, Payloads::Skip);
    let (ids, attempts) = claimed.into_iter().map(|c| (c.id, c.attempts)).unzip();
    TableIterator::once((ids, attempts))
}

fn claim(batch_size: Option<i32>, subscription: Option<&str>, lease: Option<Interval>, payloads: Payloads) -> Vec<Claimed> {
    consume::claim(given(batch_size, "batch_size"), given(subscription, "subscription"), &given(lease, "lease"), payloads)
        .or_raise()
}

#[pg_extern(volatile, parallel_unsafe, security_definer)]
#[search_path(pg_catalog, pg_temp)]
fn outbox_ack(ids: Option<Vec<Option<i64>>>, subscription: default!(Option<&str>, "'default'")) -> i32 {
    consume::ack(ids, given(subscription, "subscription")).or_raise()
}

#[pg_extern(volatile, parallel_unsafe, security_definer)]
#[search_path(pg_catalog, pg_temp)]
fn outbox_fail(
    ids: Option<Vec<Option<i64>>>,
    error: default!(Option<&str>, "NULL"),
    subscription: default!(Option<&str>, "'default'"),
    retry_after: default!(Option<Interval>, "NULL"),
) -> i32 {
    consume::fail(ids, error, given(subscription, "subscription"), retry_after.as_ref()).or_raise()
}

#[pg_extern(volatile, parallel_unsafe, security_definer)]
#[search_path(pg_catalog, pg_temp)]
fn outbox_replay(
    subscription: Option<&str>,
    since: default!(Option<TimestampWithTimeZone>, "NULL"),
    ids: default!(Option<Vec<Option<i64>>>, "NULL"),
) -> i64 {
    admin::replay(given(subscription, "subscription"), since, ids).or_raise()
}

/// The ids `outbox_replay` would make deliverable again (what a tool shows before replaying).
#[pg_extern(volatile, parallel_unsafe, security_definer)]
#[search_path(pg_catalog, pg_temp)]
fn outbox_replayable(
    subscription: Option<&str>,
    since: default!(Option<TimestampWithTimeZone>, "NULL"),
    ids: default!(Option<Vec<Option<i64>>>, "NULL"),
) -> SetOfIterator<'static, i64> {
    SetOfIterator::new(admin::replayable(given(subscription, "subscription"), since, ids).or_raise())
}

/// Deletes dead letters that failed longer than `older_than` ago; returns how many.
#[pg_extern(volatile, parallel_unsafe, security_definer)]
#[search_path(pg_catalog, pg_temp)]
fn outbox_purge_dead_letters(older_than: Option<Interval>, subscription: default!(Option<&str>, "NULL")) -> i64 {
    admin::purge_dead_letters(&given(older_than, "older_than"), subscription).or_raise()
}

/// Every subscription's state in the Prometheus text format.
#[pg_extern(volatile, parallel_unsafe, security_definer)]
#[search_path(pg_catalog, pg_temp)]
fn outbox_metrics() -> String {
    admin::metrics().or_raise()
}

#[pg_extern(volatile, parallel_unsafe, security_definer)]
#[search_path(pg_catalog, pg_temp)]
fn outbox_requeue_dead(
    subscription: default!(Option<&str>, "NULL"),
    ids: default!(Option<Vec<Option<i64>>>, "NULL"),
) -> i64 {
    admin::requeue_dead(subscription, ids).or_raise()
}

#[pg_extern(volatile, parallel_unsafe, security_definer)]
#[search_path(pg_catalog, pg_temp)]
fn outbox_purge() -> i64 {
    admin::purge().map(|purged| purged.removed).or_raise()
}
