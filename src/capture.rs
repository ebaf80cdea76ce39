//! The capture trigger. It encodes the key (and the chosen payload columns) of each changed
//! row into a backend-local buffer, and at the end of each statement writes the buffer as a few
//! packed log rows in the writer's transaction. No SQL runs per row.
//!
//! On a plain table, inserts and deletes arrive as the statement's transition table, which
//! costs less than half of what firing a row trigger per row does (Postgres refetches each row from
//! its page for a row trigger). Updates keep a row trigger, whose WHEN clause drops updates of
//! unwatched columns before Postgres does any work for them. On a partitioned table, row
//! triggers do everything: they are cloned to every partition, so a statement aimed at a
//! partition is captured too, which the parent's statement triggers never see. A partition
//! attached by itself gets row triggers as well: its statement triggers do not fire for rows
//! routed to it through its parent.
//!
//! Subtransaction and transaction aborts drop what their rows captured. A buffer still full at
//! commit (a statement aimed at a partition directly, whose parent's statement trigger does not
//! fire) is written by the pre-commit callback, so nothing captured is ever lost.

use std::cell::{Cell, RefCell};
use std::ffi::CStr;
use std::ops::Range;
use std::rc::Rc;
use std::time::{Duration, Instant};

use pgrx::pg_sys;
use pgrx::pg_sys::panic::CaughtError;
use pgrx::prelude::*;

use crate::error::{OrRaise, OutboxError};
use crate::ext::Extension;
use crate::ordering::{log_rows, order_for_flush, own_events_first, CapturedEvent};
use crate::append::{append, LogRow};
use crate::queries;
use crate::shape::{json_array, key_hash, member_prefix, push_int, push_json_string, table_hash, Op};

/// What a log row records about its source, fixed at capture time.
struct Shape {
    source_name: String,
    /// The event type of each operation, spelled once rather than for every log row.
    upsert: String,
    delete: String,
    truncate: String,
}

impl Shape {
    fn new(source_name: String, prefix: &str) -> Shape {
        Shape {
            source_name,
            upsert: Op::Upsert.event_type(prefix),
            delete: Op::Delete.event_type(prefix),
            truncate: Op::Truncate.event_type(prefix),
        }
    }

    fn event_type(&self, op: Op) -> &str {
        match op {
            Op::Upsert => &self.upsert,
            Op::Delete => &self.delete,
            Op::Truncate => &self.truncate,
        }
    }
}

/// How one column's value becomes JSON.
enum Encoding {
    Int2,
    Int4,
    Int8,
    Bool,
    Text,
    /// float4 and float8, and arrays of them (an embedding): spelled as `to_json` spells them
    /// with extra_float_digits at least 1, the shortest exact decimal (by the function
    /// float4out and float8out call), NaN and the infinities as strings. Through `to_json`, a
    /// 384-float embedding cost 1,500 instructions a float: an output function call, a
    /// palloc'd string and a JSON number check for each.
    Float4,
    Float8,
    Float4Array,
    Float8Array,
    /// Postgres' own `to_json`, for every other type, so payloads match `to_json` exactly.
    ToJson(*mut pg_sys::FmgrInfo),
    /// `to_jsonb`, for types that can hold json text as it was written (json, and arrays,
    /// domains and composites of it): a claim hands payloads out as jsonb, which refuses some
    /// of what json keeps (`\u0000`, numbers beyond numeric's range). Refused here, in the
    /// writer's statement, such a value would otherwise fail every claim after it.
    ToJsonb(*mut pg_sys::FmgrInfo),
}

impl Encoding {
    /// Whether encoding a value may allocate in the current memory context (a text value can
    /// be compressed or stored out of line).
    fn allocates(&self) -> bool {
        matches!(self, Encoding::Text | Encoding::Float4Array | Encoding::Float8Array | Encoding::ToJson(_) | Encoding::ToJsonb(_))
    }
}

struct Column {
    attnum: i32,
    typid: pg_sys::Oid,
    name: String,
    /// `"name":`, ready to append.
    member: String,
    encoding: Encoding,
}

/// An attachment as the trigger uses it, resolved against the columns of the table the trigger
/// fired on (for a partition, attnums may differ from the attached parent's).
struct Attachment {
    /// The attached table: the trigger's table, or the partitioned table it belongs to.
    source: pg_sys::Oid,
    /// The attachment generation as the trigger's argument spells it.
    generation: String,
    shape: Rc<Shape>,
    key: Vec<Column>,
    data: Option<Vec<Column>>,
    /// The session settings `to_json` spells its columns by; none when all are spelled in Rust.
    spelled_by: Option<SpelledBy>,
    /// Holds the `to_json` call descriptors; deleted with the attachment.
    memory: pg_sys::MemoryContext,
}

impl Drop for Attachment {
    fn drop(&mut self) {
        unsafe { pg_sys::MemoryContextDelete(self.memory) };
    }
}

#[derive(Default)]
struct Pending {
    events: Vec<CapturedEvent>,
    /// The keys and data of `events`, which hold ranges of it.
    text: String,
    /// The shape of each source with pending events; rarely more than one.
    shapes: Vec<(u32, Rc<Shape>)>,
}

impl Pending {
    fn shape(&self, source: u32) -> &Shape {
        &self.shapes.iter().find(|(s, _)| *s == source).expect("a shape for every pending source").1
    }

    fn text(&self, range: &Range<usize>) -> &str {
        &self.text[range.clone()]
    }
}

thread_local! {
    /// Attached tables this backend has written to; few, so a list beats hashing.
    static ATTACHMENTS: RefCell<Vec<(pg_sys::Oid, Rc<Attachment>)>> = const { RefCell::new(Vec::new()) };
    static PENDING: RefCell<Pending> = RefCell::new(Pending::default());
    /// The segment new log rows go to, and when it was read.
    static SEGMENT: Cell<Option<(i16, Instant)>> = const { Cell::new(None) };
    /// How many queries are firing their AFTER triggers (`finish_query`), nested ones included.
    static FINISHING: Cell<u32> = const { Cell::new(0) };
    /// The library was loaded by this backend in the current transaction, maybe by a trigger of
    /// a query that is finishing without `finish_query`, and may enclose the queries it sees.
    static LOADED_IN_THIS_TRANSACTION: Cell<bool> = const { Cell::new(false) };
    /// Partitions a TRUNCATE of their attached table truncates too: their own TRUNCATE
    /// triggers, which fire after the attached table's, capture nothing.
    static TRUNCATED_WITH_PARENT: RefCell<Vec<(pg_sys::Oid, u64)>> = const { RefCell::new(Vec::new()) };
    /// The number of the TRUNCATE statement running (the innermost), 0 outside one, and how
    /// many this backend has run.
    static TRUNCATING: Cell<u64> = const { Cell::new(0) };
    static TRUNCATES: Cell<u64> = const { Cell::new(0) };
}

static mut PREVIOUS_EXECUTOR_FINISH: pg_sys::ExecutorFinish_hook_type = None;
#[cfg(not(feature = "pg13"))]
static mut PREVIOUS_PROCESS_UTILITY: pg_sys::ProcessUtility_hook_type = None;

/// How long a backend keeps writing to the segment it last read. Writing to a segment that
/// is no longer current is harmless: retention checks every row of a segment before emptying
/// it, and cannot empty it while a writer holds its lock.
const SEGMENT_RECHECK: Duration = Duration::from_secs(1);

/// Makes the next flush read the current segment again (after this backend rotated).
pub fn forget_segment() {
    SEGMENT.with(|s| s.set(None));
}

fn current_segment(extension: &Extension) -> Result<i16, OutboxError> {
    if let Some((slot, read_at)) = SEGMENT.with(Cell::get) {
        if read_at.elapsed() < SEGMENT_RECHECK {
            return Ok(slot);
        }
    }
    let slot = Spi::connect_mut(|client| {
        Ok::<_, OutboxError>(queries::run(client, extension, &queries::CURRENT_SEGMENT, &[])?.first().get::<i16>(1)?.unwrap_or(0))
    })?;
    SEGMENT.with(|s| s.set(Some((slot, Instant::now()))));
    Ok(slot)
}

pub fn init() {
    unsafe {
        pg_sys::RegisterXactCallback(Some(on_xact_event), std::ptr::null_mut());
        pg_sys::RegisterSubXactCallback(Some(on_subxact_event), std::ptr::null_mut());
        pg_sys::CacheRegisterRelcacheCallback(Some(on_relcache_invalidation), pg_sys::Datum::from(0));
        PREVIOUS_EXECUTOR_FINISH = pg_sys::ExecutorFinish_hook;
        pg_sys::ExecutorFinish_hook = Some(finish_query);
        #[cfg(not(feature = "pg13"))]
        {
            PREVIOUS_PROCESS_UTILITY = pg_sys::ProcessUtility_hook;
            pg_sys::ProcessUtility_hook = Some(number_truncates);
        }
        LOADED_IN_THIS_TRANSACTION.with(|l| l.set(!pg_sys::process_shared_preload_libraries_in_progress));
    }
}

/// Numbers each TRUNCATE statement while it runs (`TRUNCATING`), so that the TRUNCATE triggers
/// of its tables can tell what the same statement noted (`capture_truncate`).
#[cfg(not(feature = "pg13"))]
#[pg_guard]
unsafe extern "C-unwind" fn number_truncates(
    statement: *mut pg_sys::PlannedStmt,
    query: *const std::ffi::c_char,
    read_only_tree: bool,
    context: pg_sys::ProcessUtilityContext::Type,
    params: pg_sys::ParamListInfo,
    environment: *mut pg_sys::QueryEnvironment,
    destination: *mut pg_sys::DestReceiver,
    completion: *mut pg_sys::QueryCompletion,
) {
    struct Restore(u64);
    impl Drop for Restore {
        fn drop(&mut self) {
            TRUNCATING.with(|t| t.set(self.0));
        }
    }
    let truncates = unsafe { (*(*statement).utilityStmt).type_ } == pg_sys::NodeTag::T_TruncateStmt;
    let _restore = truncates.then(|| {
        let number = TRUNCATES.with(|n| {
            n.set(n.get() + 1);
            n.get()
        });
        Restore(TRUNCATING.with(|t| t.replace(number)))
    });
    unsafe {
        match PREVIOUS_PROCESS_UTILITY {
            Some(previous) => pg_sys::ffi::pg_guard_ffi_boundary(|| {
                previous(statement, query, read_only_tree, context, params, environment, destination, completion)
            }),
            // (guarded already, as every binding: inside another guard an ERROR in it aborted)
            None => pg_sys::standard_ProcessUtility(statement, query, read_only_tree, context, params, environment, destination, completion),
        }
    }
}

/// A query fires its AFTER triggers in ExecutorFinish, those of every part of a statement with
/// writable CTEs (and of every action of a MERGE) one after the other; what they captured is
/// written once the last has fired, so that a statement's deletes go first across its parts.
/// Written part by part, a CTE that inserted key 1 into a table whose old key 1 the main
/// statement deleted was captured UPSERT 1, DELETE 1, and the copy lost the row. What the
/// statements its AFTER triggers run capture waits for it too, and goes after its own events
/// (`own_events_first`). (The query that loads the library has started finishing without
/// this hook: its statement triggers write for themselves, as COPY's and TRUNCATE's do.)
#[pg_guard]
unsafe extern "C-unwind" fn finish_query(query: *mut pg_sys::QueryDesc) {
    struct Finishing;
    impl Drop for Finishing {
        fn drop(&mut self) {
            FINISHING.with(|f| f.set(f.get() - 1));
        }
    }
    // pending already: events of an enclosing statement, or of a BEFORE trigger's statements,
    // or waiting for the commit
    let held = PENDING.with(|p| p.borrow().events.len());
    let command = unsafe { (*(*query).estate).es_output_cid };
    FINISHING.with(|f| f.set(f.get() + 1));
    let finishing = Finishing;
    unsafe {
        match PREVIOUS_EXECUTOR_FINISH {
            Some(previous) => pg_sys::ffi::pg_guard_ffi_boundary(|| previous(query)),
            None => pg_sys::standard_ExecutorFinish(query),
        }
    }
    drop(finishing);
    PENDING.with(|p| own_events_first(&mut p.borrow_mut().events, held, command));
    if FINISHING.with(|f| f.get()) > 0 {
        // a query run by an AFTER trigger waits for the statement that fired it
        return;
    }
    // At the end of a top-level query every statement with pending events is complete (a COPY
    // into a partition, whose row triggers leave events for a statement trigger it does not
    // have, kept a transaction's every later event in memory until the commit): all are written
    // unless some were captured before the savepoint this query runs in, as rolling back to it
    // would take their log row along. Only a query of the transaction that loaded the library
    // may be a trigger's of a query finishing without this hook, and writes only its own.
    let written = if LOADED_IN_THIS_TRANSACTION.with(|l| l.get()) {
        held == 0
    } else {
        let current = unsafe { pg_sys::GetCurrentSubTransactionId() };
        PENDING.with(|p| !p.borrow().events.first().is_some_and(|e| e.subxact < current))
    };
    if written {
        flush().or_raise();
    }
}

#[pg_guard]
unsafe extern "C-unwind" fn on_xact_event(event: pg_sys::XactEvent::Type, _arg: *mut std::ffi::c_void) {
    use pg_sys::XactEvent::*;
    match event {
        XACT_EVENT_PRE_COMMIT | XACT_EVENT_PARALLEL_PRE_COMMIT | XACT_EVENT_PRE_PREPARE => flush().or_raise(),
        XACT_EVENT_COMMIT | XACT_EVENT_PARALLEL_COMMIT | XACT_EVENT_PREPARE => {
            LOADED_IN_THIS_TRANSACTION.with(|l| l.set(false));
            forget_truncations();
        }
        XACT_EVENT_ABORT | XACT_EVENT_PARALLEL_ABORT => {
            PENDING.with(|p| *p.borrow_mut() = Pending::default());
            LOADED_IN_THIS_TRANSACTION.with(|l| l.set(false));
            forget_truncations();
        }
        _ => {}
    }
}

#[pg_guard]
unsafe extern "C-unwind" fn on_subxact_event(
    event: pg_sys::SubXactEvent::Type,
    subxact: pg_sys::SubTransactionId,
    _parent: pg_sys::SubTransactionId,
    _arg: *mut std::ffi::c_void,
) {
    if event == pg_sys::SubXactEvent::SUBXACT_EVENT_ABORT_SUB {
        // (a TRUNCATE that failed between its triggers)
        forget_truncations();
        // Ids grow with time, so what the aborted subtransaction and its children captured has
        // ids at least as large as its own, and was captured after everything else: the tail
        // of the buffer, events and text. (Filtering the whole buffer on each abort made an
        // exception block in a loop quadratic.)
        PENDING.with(|p| {
            let mut pending = p.borrow_mut();
            let kept = pending.events.iter().rposition(|e| e.subxact < subxact).map_or(0, |i| i + 1);
            // (own_events_first may have reordered the tail among itself)
            if let Some(text_start) = pending.events[kept..].iter().map(|e| e.key.start).min() {
                pending.text.truncate(text_start);
                pending.events.truncate(kept);
                if kept == 0 {
                    // (a table whose events are gone would keep other tables' statements waiting)
                    pending.shapes.clear();
                }
            }
        });
    }
}

#[pg_guard]
unsafe extern "C-unwind" fn on_relcache_invalidation(_arg: pg_sys::Datum, relid: pg_sys::Oid) {
    crate::append::forget_layout(relid);
    ATTACHMENTS.with(|a| {
        let mut attachments = a.borrow_mut();
        if relid == pg_sys::InvalidOid {
            attachments.clear();
        } else {
            // a partition's entry names its attached parent, whose rename invalidates only the
            // parent
            attachments.retain(|(r, a)| *r != relid && a.source != relid);
        }
    });
}

function_info_v1!(pg_finfo_outbox_capture);

/// The trigger function behind every capture trigger `outbox_attach` creates.
#[pg_guard]
#[unsafe(no_mangle)]
pub unsafe extern "C-unwind" fn outbox_capture(fcinfo: pg_sys::FunctionCallInfo) -> pg_sys::Datum {
    unsafe { capture(fcinfo) }.or_raise();
    pg_sys::Datum::from(0)
}

extension_sql!(
    r#"
CREATE FUNCTION @extschema@.outbox_capture() RETURNS trigger
    LANGUAGE c AS 'MODULE_PATHNAME', 'outbox_capture';
"#,
    name = "outbox_capture",
    requires = ["outbox_schema"]
);

unsafe fn capture(fcinfo: pg_sys::FunctionCallInfo) -> Result<(), OutboxError> {
    let trigger = unsafe {
        let context = (*fcinfo).context;
        if context.is_null() || (*context).type_ != pg_sys::NodeTag::T_TriggerData {
            return Err(OutboxError::Capture("?".into(), "outbox_capture() must be called as a trigger".into()));
        }
        &*(context as *const pg_sys::TriggerData)
    };
    let event = trigger.tg_event;
    let op = event & pg_sys::TRIGGER_EVENT_OPMASK;
    if event & pg_sys::TRIGGER_EVENT_ROW == 0 {
        let attachment = match unsafe { attachment_for(trigger) } {
            // A partition's TRUNCATE trigger outlives its tree where the DETACH ran without
            // event triggers (session_replication_role = replica): the table is attached to
            // nothing now, and its TRUNCATE has nothing to capture.
            Err(OutboxError::NotAttached(_)) if op == pg_sys::TRIGGER_EVENT_TRUNCATE => return Ok(()),
            attachment => attachment?,
        };
        match op {
            // (it writes for itself: what it notes depends on the command id after the write)
            pg_sys::TRIGGER_EVENT_TRUNCATE => return unsafe { capture_truncate(trigger, &attachment) },
            pg_sys::TRIGGER_EVENT_INSERT if !trigger.tg_newtable.is_null() => unsafe {
                capture_transition_table(trigger, trigger.tg_newtable, Op::Upsert)?
            },
            pg_sys::TRIGGER_EVENT_DELETE if !trigger.tg_oldtable.is_null() => unsafe {
                capture_transition_table(trigger, trigger.tg_oldtable, Op::Delete)?
            },
            _ => {}
        }
        if FINISHING.with(|f| f.get()) > 0 {
            return Ok(());
        }
        return flush_statement(attachment.source.into());
    }

    let attachment = unsafe { attachment_for(trigger)? };
    let tupdesc = unsafe { (*trigger.tg_relation).rd_att };
    let mut batch = Batch::new(&attachment, 2, unsafe { writing_command(trigger, op) });
    let settings = unsafe { hold_settings(&attachment) };
    let mut encode = || -> Result<(), OutboxError> {
        match op {
            pg_sys::TRIGGER_EVENT_INSERT => unsafe {
                let key = batch.encode(&attachment.key, trigger.tg_trigtuple, tupdesc)?;
                let data = attachment.data.as_ref().map(|columns| batch.encode(columns, trigger.tg_trigtuple, tupdesc)).transpose()?;
                batch.push(Op::Upsert, key, data);
            },
            pg_sys::TRIGGER_EVENT_DELETE => unsafe {
                let key = batch.encode(&attachment.key, trigger.tg_trigtuple, tupdesc)?;
                batch.push(Op::Delete, key, None);
            },
            pg_sys::TRIGGER_EVENT_UPDATE => unsafe {
                // the trigger's WHEN clause already dropped updates that changed nothing watched
                let old_key = batch.encode(&attachment.key, trigger.tg_trigtuple, tupdesc)?;
                let new_key = batch.encode(&attachment.key, trigger.tg_newtuple, tupdesc)?;
                if batch.slice(&old_key) != batch.slice(&new_key) {
                    batch.push(Op::Delete, old_key, None);
                }
                let data = attachment.data.as_ref().map(|columns| batch.encode(columns, trigger.tg_newtuple, tupdesc)).transpose()?;
                batch.push(Op::Upsert, new_key, data);
            },
            _ => {}
        }
        Ok(())
    };
    let encoded = encode();
    release_settings(settings);
    encoded?;
    batch.keep();
    Ok(())
}

/// TRUNCATE, before the rows go. Of an attached table: one TRUNCATE event; for a partitioned
/// one, its partitions, which the same statement truncates and whose triggers fire next, are
/// noted as done. Of a partition by itself: a DELETE of each of its rows, as no trigger of
/// the attached table fires (partitions truncated with the attached table, or noted by one
/// truncated earlier in the statement, capture nothing more).
unsafe fn capture_truncate(trigger: &pg_sys::TriggerData, attachment: &Attachment) -> Result<(), OutboxError> {
    let relation = trigger.tg_relation;
    let relid = unsafe { (*relation).rd_id };
    // Partitions are noted with the TRUNCATE statement they are truncated by. Where it has no
    // number (the library was loaded by this statement's first trigger, without the hook),
    // with the command id read once the attached table's event is written; a user's BEFORE
    // TRUNCATE trigger that writes moves that on, and the partitions then capture their rows
    // after the TRUNCATE, which deletes nothing the TRUNCATE left. A note left behind
    // (`TRUNCATE part, parent` fires the partition's trigger first) cannot match a later
    // TRUNCATE: it has another number, or wrote rows to truncate and so moved the command id.
    let statement = || match TRUNCATING.with(Cell::get) {
        0 => u64::from(unsafe { pg_sys::GetCurrentCommandId(false) }) | 1 << 63,
        number => number,
    };
    if attachment.source != relid {
        let this = (relid, statement());
        let noted = TRUNCATED_WITH_PARENT.with(|t| {
            let mut truncated = t.borrow_mut();
            truncated.iter().position(|noted| *noted == this).map(|i| truncated.swap_remove(i)).is_some()
        });
        // (the trigger's attachment is resolved against this partition's columns already)
        return if noted { Ok(()) } else { unsafe { capture_every_row(attachment, relation, Op::Delete) } };
    }
    let partitioned = unsafe { (*(*relation).rd_rel).relkind } == pg_sys::RELKIND_PARTITIONED_TABLE as std::ffi::c_char;
    let partitions = if partitioned {
        let extension = Extension::current()?;
        crate::partitions::tables_in_tree(&extension, relid)?
    } else {
        Vec::new()
    };
    let mut batch = Batch::new(attachment, 1, unsafe { statement_command() });
    let key = batch.text("null");
    batch.push(Op::Truncate, key, None);
    batch.keep();
    if FINISHING.with(|f| f.get()) == 0 {
        flush_statement(attachment.source.into())?;
    }
    let at = statement();
    TRUNCATED_WITH_PARENT.with(|t| {
        t.borrow_mut().extend(partitions.into_iter().filter(|&(_, holds_rows)| holds_rows).map(|(table, _)| (table, at)))
    });
    Ok(())
}

fn forget_truncations() {
    TRUNCATED_WITH_PARENT.with(|t| t.borrow_mut().clear());
}

/// The generation of the attachment `relid` is captured under (its own, or its nearest
/// attached ancestor's), if any.
pub fn attached_generation(relid: pg_sys::Oid) -> Result<Option<i64>, OutboxError> {
    let extension = Extension::current()?;
    let config = extension.as_owner(|| attachment_config(&extension, relid))?;
    Ok(config.map(|(_, generation, ..)| generation))
}

/// The command that wrote the row a row trigger fired for, from the row's header. The current
/// command id has moved on if anything ran SQL since (another AFTER trigger, a foreign-key
/// check), which split one statement's events into runs that `order_for_flush` kept apart.
unsafe fn writing_command(trigger: &pg_sys::TriggerData, op: u32) -> pg_sys::CommandId {
    unsafe {
        match op {
            pg_sys::TRIGGER_EVENT_UPDATE => pg_sys::HeapTupleHeaderGetCmin((*trigger.tg_newtuple).t_data),
            pg_sys::TRIGGER_EVENT_INSERT => pg_sys::HeapTupleHeaderGetCmin((*trigger.tg_trigtuple).t_data),
            _ => pg_sys::HeapTupleHeaderGetCmax((*trigger.tg_trigtuple).t_data),
        }
    }
}

/// The command id of the statement whose AFTER STATEMENT trigger fires, for events read from
/// its transition table: that of its snapshot, taken when it started. The current command id
/// has moved on if anything ran SQL since its rows were written (a foreign-key check, another
/// AFTER trigger), which filed a statement's transition-table events apart from its row
/// events, and a MERGE that deleted key 1 and updated key 2 to 1 was captured as DELETE 2,
/// UPSERT 1, DELETE 1.
unsafe fn statement_command() -> pg_sys::CommandId {
    unsafe {
        if pg_sys::ActiveSnapshotSet() {
            (*pg_sys::GetActiveSnapshot()).curcid
        } else {
            pg_sys::GetCurrentCommandId(false)
        }
    }
}

/// Every row of a statement's transition table, as events of `op`.
unsafe fn capture_transition_table(
    trigger: &pg_sys::TriggerData,
    table: *mut pg_sys::Tuplestorestate,
    op: Op,
) -> Result<(), OutboxError> {
    let attachment = unsafe { attachment_for(trigger)? };
    unsafe {
        let rows = pg_sys::tuplestore_tuple_count(table) as usize;
        let mut batch = Batch::new(&attachment, rows, statement_command());
        // Transition tables hold rows in the trigger table's row type (only tables outside any
        // partition or inheritance hierarchy are captured through them). Another trigger may
        // be reading the same table, so this reader gets a read pointer of its own.
        let tupdesc = (*trigger.tg_relation).rd_att;
        let slot = pg_sys::MakeSingleTupleTableSlot(tupdesc, &pg_sys::TTSOpsMinimalTuple);
        let reader = pg_sys::tuplestore_alloc_read_pointer(table, 0);
        pg_sys::tuplestore_select_read_pointer(table, reader);
        pg_sys::tuplestore_rescan(table);
        let captured = capture_rows(
            &mut batch,
            tupdesc,
            op,
            // a minimal tuple slot keeps a heap tuple header over its tuple
            || pg_sys::tuplestore_gettupleslot(table, true, false, slot).then(|| (*slot.cast::<pg_sys::MinimalTupleTableSlot>()).tuple),
            // A table that spilled to disk reads each row into the current context, and the
            // slot frees it when the next row is stored: it lets go of it before the reset.
            || {
                pg_sys::ExecClearTuple(slot);
            },
        );
        pg_sys::ExecDropSingleTupleTableSlot(slot);
        captured?;
        batch.keep();
    }
    Ok(())
}

/// Adds an event of `op` to `batch` for every row `next_row` returns (rows of `tupdesc`).
/// `release_row` lets go of a row before the memory encoding it took is reset.
unsafe fn capture_rows(
    batch: &mut Batch,
    tupdesc: pg_sys::TupleDesc,
    op: Op,
    mut next_row: impl FnMut() -> Option<pg_sys::HeapTuple>,
    mut release_row: impl FnMut(),
) -> Result<(), OutboxError> {
    let attachment = batch.attachment;
    let data = if op == Op::Upsert { attachment.data.as_ref() } else { None };
    // to_json and detoasting allocate, and a statement may have millions of rows
    let allocates = attachment.key.iter().chain(data.into_iter().flatten()).any(|c| c.encoding.allocates());
    unsafe {
        let settings = hold_settings(attachment);
        // (the per-row context, and the context it replaced)
        let per_row = allocates.then(|| {
            let context = pg_sys::AllocSetContextCreateExtended(
                pg_sys::CurrentMemoryContext,
                c"outbox capture row".as_ptr(),
                pg_sys::ALLOCSET_DEFAULT_MINSIZE as usize,
                pg_sys::ALLOCSET_DEFAULT_INITSIZE as usize,
                pg_sys::ALLOCSET_DEFAULT_MAXSIZE as usize,
            );
            (context, pg_sys::MemoryContextSwitchTo(context))
        });
        let mut captured = Ok(());
        while let Some(tuple) = next_row() {
            captured = batch.encode(&attachment.key, tuple, tupdesc).and_then(|key| {
                let data = data.map(|columns| batch.encode(columns, tuple, tupdesc)).transpose()?;
                batch.push(op, key, data);
                Ok(())
            });
            if let Some((context, _)) = per_row {
                release_row();
                pg_sys::MemoryContextReset(context);
            }
            if captured.is_err() {
                break;
            }
        }
        if let Some((context, previous)) = per_row {
            pg_sys::MemoryContextSwitchTo(previous);
            pg_sys::MemoryContextDelete(context);
        }
        release_settings(settings);
        captured
    }
}

/// Captures every row of `relation`, a table that joins or leaves a partition tree by DDL
/// (ATTACH PARTITION, DETACH PARTITION, DROP TABLE of a partition), as events of `op`, under
/// the attachment of `parent`, the partitioned table it joins or leaves, or of its nearest
/// attached ancestor; nothing when there is none. Otherwise its rows come and go in the
/// attached table without an event, and the copies keep or miss them. The caller holds a lock
/// on `relation` that keeps writers out.
pub unsafe fn capture_table_rows(parent: pg_sys::Oid, relation: pg_sys::Relation, op: Op) -> Result<(), OutboxError> {
    let extension = Extension::current()?;
    let Some(config) = extension.as_owner(|| attachment_config(&extension, parent))? else {
        return Ok(());
    };
    let attachment = unsafe { attachment_for_columns_of(config, relation)? };
    unsafe { capture_every_row(&attachment, relation, op) }
}

/// Every row of `relation` as events of `op` of `attachment` (resolved against its columns),
/// read with a snapshot taken now and written a part at a time.
unsafe fn capture_every_row(attachment: &Attachment, relation: pg_sys::Relation, op: Op) -> Result<(), OutboxError> {
    unsafe {
        if (*(*relation).rd_rel).relam != pg_sys::HEAP_TABLE_AM_OID {
            return Err(OutboxError::Capture(
                qualified_name((*relation).rd_id),
                format!("its rows cannot be read to capture them as they join or leave {}: it is not a heap table", attachment.shape.source_name),
            ));
        }
        let snapshot = pg_sys::RegisterSnapshot(pg_sys::GetLatestSnapshot());
        use pg_sys::ScanOptions::*;
        let scan = pg_sys::heap_beginscan(
            relation,
            snapshot,
            0,
            std::ptr::null_mut(),
            std::ptr::null_mut(),
            SO_TYPE_SEQSCAN | SO_ALLOW_STRAT | SO_ALLOW_SYNC | SO_ALLOW_PAGEMODE,
        );
        // Written as it goes, a part at a time: a partition dropped for retention may hold
        // more rows than a backend can keep encoded in memory at once.
        let parts = || -> Result<(), OutboxError> {
            loop {
                let (mut rows, mut exhausted) = (0, false);
                let mut batch = Batch::new(attachment, 0, pg_sys::GetCurrentCommandId(false));
                capture_rows(
                    &mut batch,
                    (*relation).rd_att,
                    op,
                    || {
                        if rows == ROWS_PER_PART {
                            return None;
                        }
                        let tuple = pg_sys::heap_getnext(scan, pg_sys::ScanDirection::ForwardScanDirection);
                        exhausted = tuple.is_null();
                        rows += 1;
                        (!exhausted).then_some(tuple)
                    },
                    // (the scan's rows stay in its buffers)
                    || {},
                )?;
                batch.keep();
                // (a query firing its AFTER triggers writes what they captured once they are done)
                if FINISHING.with(Cell::get) == 0 {
                    flush_statement(attachment.source.into())?;
                }
                if exhausted {
                    return Ok(());
                }
            }
        };
        let captured = parts();
        pg_sys::heap_endscan(scan);
        pg_sys::UnregisterSnapshot(snapshot);
        captured
    }
}

/// How many rows of a table joining or leaving a partition tree are encoded before they are
/// written.
const ROWS_PER_PART: usize = 65_536;

/// Events of one trigger call, added to the pending buffer in one go. Keys and data are
/// encoded into one string rather than a string each: a bulk insert captures thousands.
struct Batch<'a> {
    attachment: &'a Attachment,
    subxact: u32,
    command: u32,
    text: String,
    events: Vec<CapturedEvent>,
}

impl<'a> Batch<'a> {
    /// `command`: the statement's command id, which a row trigger reads from the row.
    fn new(attachment: &'a Attachment, rows: usize, command: pg_sys::CommandId) -> Self {
        Batch {
            attachment,
            subxact: unsafe { pg_sys::GetCurrentSubTransactionId() },
            command,
            text: String::with_capacity(rows * 16),
            events: Vec::with_capacity(rows),
        }
    }

    fn text(&mut self, text: &str) -> Range<usize> {
        let start = self.text.len();
        self.text.push_str(text);
        start..self.text.len()
    }

    fn slice(&self, range: &Range<usize>) -> &str {
        &self.text[range.clone()]
    }

    /// Encodes `columns` of `tuple` as a JSON object.
    unsafe fn encode(
        &mut self,
        columns: &[Column],
        tuple: pg_sys::HeapTuple,
        tupdesc: pg_sys::TupleDesc,
    ) -> Result<Range<usize>, OutboxError> {
        let start = self.text.len();
        unsafe { encode_object(columns, tuple, tupdesc, &mut self.text) }.map_err(|(column, reason)| OutboxError::Unrepresentable {
            table: self.attachment.shape.source_name.to_string(),
            column,
            reason,
        })?;
        Ok(start..self.text.len())
    }

    fn push(&mut self, op: Op, key: Range<usize>, data: Option<Range<usize>>) {
        let source = self.attachment.source.into();
        let key_hash = if op == Op::Truncate { table_hash(source) } else { key_hash(source, self.slice(&key)) };
        self.events.push(CapturedEvent { subxact: self.subxact, source, command: self.command, op, key, data, key_hash });
    }

    fn keep(self) {
        let source = self.attachment.source.into();
        PENDING.with(|p| {
            let mut pending = p.borrow_mut();
            if !pending.shapes.iter().any(|(s, _)| *s == source) {
                pending.shapes.push((source, self.attachment.shape.clone()));
            }
            let offset = pending.text.len();
            let shift = |r: Range<usize>| r.start + offset..r.end + offset;
            pending.text.push_str(&self.text);
            pending.events.extend(self.events.into_iter().map(|mut e| {
                e.key = shift(e.key);
                e.data = e.data.map(shift);
                e
            }));
        });
    }
}

/// Writes what the statement on `source` captured, when no query's finish_query will (a
/// TRUNCATE's or a COPY's statement trigger), unless the buffer also holds events that
/// are not this statement's to write: captured before the savepoint this statement runs in (a
/// partition's row events, which wait for a statement), as rolling back to the savepoint would
/// take their log row along; or of another table, which may be those of an enclosing
/// statement still running (this one a trigger's), whose row events would be cut into runs
/// `order_for_flush` keeps apart. Then everything waits for the next statement of that table,
/// or the commit, as the log keeps capture order.
fn flush_statement(source: u32) -> Result<(), OutboxError> {
    // subtransaction ids grow with time, and events are kept in capture order
    let current = unsafe { pg_sys::GetCurrentSubTransactionId() };
    let others = PENDING.with(|p| {
        let pending = p.borrow();
        // (the shapes name every table with pending events: few, where the events may be many)
        pending.events.first().is_some_and(|e| e.subxact < current) || pending.shapes.iter().any(|(s, _)| *s != source)
    });
    if others {
        return Ok(());
    }
    flush()
}

/// Writes everything captured so far as log rows, in capture order.
fn flush() -> Result<(), OutboxError> {
    let mut pending = PENDING.with(|p| std::mem::take(&mut *p.borrow_mut()));
    if pending.events.is_empty() {
        return Ok(());
    }
    order_for_flush(&mut pending.events);
    let extension = Extension::current()?;
    crate::worker::wake_at_commit(crate::worker::Wake::Events);
    // At commit no statement is running, and reading the current segment needs a snapshot.
    // (Only here, with events to write: every commit of the database passes by.)
    let pushed = unsafe { !pg_sys::ActiveSnapshotSet() };
    if pushed {
        unsafe { pg_sys::PushActiveSnapshot(pg_sys::GetTransactionSnapshot()) };
    }
    // as the owner: the writer may use neither the rotation table nor the id sequence
    let written = extension.as_owner(|| write_log_rows(&extension, &pending));
    if pushed {
        unsafe { pg_sys::PopActiveSnapshot() };
    }
    written
}

fn write_log_rows(extension: &Extension, pending: &Pending) -> Result<(), OutboxError> {
    let events = &pending.events;
    let slot = current_segment(extension)?;
    let segment = *extension
        .log_segments
        .get(slot as usize)
        .ok_or_else(|| OutboxError::Capture("outbox_log".into(), format!("no log segment {slot}")))?;
    let rows = log_rows(events);
    // What writing a row allocates is garbage once it is written: where there are many (a
    // partition leaving its tree is written part after part in one call), each row's goes with
    // the next. (Not for one row: a context costs a single-row transaction more than it saves.)
    let scratch = (rows.len() > 1).then(|| unsafe {
        pg_sys::AllocSetContextCreateExtended(
            pg_sys::CurrentMemoryContext,
            c"outbox log row".as_ptr(),
            pg_sys::ALLOCSET_DEFAULT_MINSIZE as usize,
            pg_sys::ALLOCSET_DEFAULT_INITSIZE as usize,
            pg_sys::ALLOCSET_DEFAULT_MAXSIZE as usize,
        )
    });
    let written = rows.into_iter().try_for_each(|row| {
        let events = &events[row];
        let first = &events[0];
        let shape = pending.shape(first.source);
        let keys = json_array(events.iter().map(|e| pending.text(&e.key)));
        let data = first.data.is_some().then(|| json_array(events.iter().map(|e| e.data.as_ref().map_or("null", |d| pending.text(d)))));
        let hashes: Vec<i64> = events.iter().map(|e| e.key_hash).collect();
        let row = LogRow {
            slot,
            n: events.len() as i32,
            source: pg_sys::Oid::from(first.source),
            source_name: &shape.source_name,
            op: first.op,
            event_type: shape.event_type(first.op),
            keys: &keys,
            data: data.as_deref(),
            key_hashes: &hashes,
            table_hash: table_hash(first.source),
        };
        unsafe {
            let previous = scratch.map(|context| pg_sys::MemoryContextSwitchTo(context));
            let appended = append(segment, extension.event_id_seq, &row);
            if let (Some(context), Some(previous)) = (scratch, previous) {
                pg_sys::MemoryContextSwitchTo(previous);
                pg_sys::MemoryContextReset(context);
            }
            appended
        }
    });
    if let Some(context) = scratch {
        unsafe { pg_sys::MemoryContextDelete(context) };
    }
    written
}

/// The attachment of the trigger's table, from the backend cache or freshly loaded. The
/// trigger's argument is the attachment generation, so a re-attach with new settings is seen
/// even without a relcache invalidation.
unsafe fn attachment_for(trigger: &pg_sys::TriggerData) -> Result<Rc<Attachment>, OutboxError> {
    let relation = trigger.tg_relation;
    let relid = unsafe { (*relation).rd_id };
    let generation: &[u8] = unsafe {
        let t = &*trigger.tg_trigger;
        if t.tgnargs < 1 { b"" } else { CStr::from_ptr(*t.tgargs).to_bytes() }
    };
    let cached = ATTACHMENTS.with(|a| a.borrow().iter().find(|(r, _)| *r == relid).map(|(_, a)| a.clone()));
    if let Some(attachment) = cached.filter(|a| a.generation.as_bytes() == generation) {
        return Ok(attachment);
    }
    let attachment = Rc::new(unsafe { load_attachment(relation)? });
    ATTACHMENTS.with(|a| {
        let mut attachments = a.borrow_mut();
        attachments.retain(|(r, _)| *r != relid);
        attachments.push((relid, attachment.clone()));
    });
    Ok(attachment)
}

/// The attachment row of `relid` (or of its nearest attached ancestor): source, generation,
/// event prefix, key columns, payload columns.
type AttachmentConfig = (pg_sys::Oid, i64, String, Vec<String>, Option<Vec<String>>);

/// Reads the attachment as committed now rather than as the transaction's snapshot has it. A
/// REPEATABLE READ writer whose snapshot predates an `outbox_attach` fires the new triggers
/// (the catalog is always read current) and must capture with their settings; through its own
/// snapshot it found no attachment, and its write failed, or the previous settings. The
/// writer's lock on the table waited for the attach to commit, so the latest row is the
/// triggers' own. (Not a kept plan: a backend reads an attachment once per generation.)
fn attachment_config(extension: &Extension, relid: pg_sys::Oid) -> Result<Option<AttachmentConfig>, OutboxError> {
    let configs = queries::run_latest(extension, &queries::ATTACHMENT_CONFIG, &[relid.into()], |row| {
        Ok((
            row.get::<pg_sys::Oid>(1).unwrap_or(relid),
            row.get::<i64>(2).unwrap_or_default(),
            row.get::<String>(3).unwrap_or_default(),
            row.get::<Vec<String>>(4).unwrap_or_default(),
            row.get::<Vec<String>>(5),
        ))
    })?;
    Ok(configs.into_iter().next())
}

unsafe fn load_attachment(relation: pg_sys::Relation) -> Result<Attachment, OutboxError> {
    let relid = unsafe { (*relation).rd_id };
    let extension = Extension::current()?;
    let config = extension.as_owner(|| attachment_config(&extension, relid))?;
    let Some(config) = config else {
        return Err(OutboxError::NotAttached(unsafe { qualified_name(relid) }));
    };
    unsafe { attachment_for_columns_of(config, relation) }
}

/// The attachment `config`, with its columns resolved against those of `relation`.
unsafe fn attachment_for_columns_of(config: AttachmentConfig, relation: pg_sys::Relation) -> Result<Attachment, OutboxError> {
    let (source, generation, prefix, key_columns, payload_columns) = config;
    let source_name = unsafe { qualified_name(source) };
    let memory = unsafe {
        pg_sys::AllocSetContextCreateExtended(
            pg_sys::CacheMemoryContext,
            c"outbox capture".as_ptr(),
            pg_sys::ALLOCSET_SMALL_MINSIZE as usize,
            pg_sys::ALLOCSET_SMALL_INITSIZE as usize,
            pg_sys::ALLOCSET_SMALL_MAXSIZE as usize,
        )
    };
    let mut attachment = Attachment {
        source,
        generation: generation.to_string(),
        shape: Rc::new(Shape::new(source_name.clone(), &prefix)),
        key: Vec::new(),
        data: None,
        spelled_by: None,
        memory,
    };
    let tupdesc = unsafe { (*relation).rd_att };
    attachment.key = unsafe { resolve_columns(&source_name, tupdesc, &key_columns, "key_columns", memory)? };
    if let Some(columns) = payload_columns {
        attachment.data = Some(unsafe { resolve_columns(&source_name, tupdesc, &columns, "payload_columns", memory)? });
    }
    let by_to_json: Vec<pg_sys::Oid> = attachment
        .key
        .iter()
        .chain(attachment.data.iter().flatten())
        .filter(|c| matches!(c.encoding, Encoding::ToJson(_) | Encoding::ToJsonb(_)))
        .map(|c| c.typid)
        .collect();
    if !by_to_json.is_empty() {
        let mut spelled_by = SpelledBy::default();
        let mut seen = Vec::new();
        for typid in by_to_json {
            unsafe { spelled_by.add_type(typid, &mut seen) };
        }
        attachment.spelled_by = Some(spelled_by);
    }
    Ok(attachment)
}

/// `schema.table` as payloads name it.
pub unsafe fn qualified_name(relid: pg_sys::Oid) -> String {
    match unsafe { name_parts(relid) } {
        Some((namespace, name)) => format!("{namespace}.{name}"),
        None => format!("{}", u32::from(relid)),
    }
}

/// `"schema"."table"`, for SQL text.
pub unsafe fn quoted_name(relid: pg_sys::Oid) -> Result<String, OutboxError> {
    let (namespace, name) = unsafe { name_parts(relid) }.ok_or_else(|| OutboxError::Capture(format!("{}", u32::from(relid)), "the table is gone".into()))?;
    Ok(format!("{}.{}", crate::triggers::quote_ident(&namespace), crate::triggers::quote_ident(&name)))
}

unsafe fn name_parts(relid: pg_sys::Oid) -> Option<(String, String)> {
    unsafe {
        let namespace = pg_sys::get_namespace_name(pg_sys::get_rel_namespace(relid));
        let name = pg_sys::get_rel_name(relid);
        (!namespace.is_null() && !name.is_null())
            .then(|| (CStr::from_ptr(namespace).to_string_lossy().into_owned(), CStr::from_ptr(name).to_string_lossy().into_owned()))
    }
}

unsafe fn resolve_columns(
    table: &str,
    tupdesc: pg_sys::TupleDesc,
    names: &[String],
    argument: &'static str,
    memory: pg_sys::MemoryContext,
) -> Result<Vec<Column>, OutboxError> {
    let attributes = unsafe { crate::tupdesc::attributes(tupdesc) };
    let mut columns = Vec::with_capacity(names.len());
    for name in names {
        let found = attributes.iter().zip(1..).find_map(|(attr, attnum)| {
            let attname = unsafe { CStr::from_ptr(attr.attname.data.as_ptr()) };
            (!attr.attisdropped && attname.to_bytes() == name.as_bytes()).then_some((attnum, attr.atttypid, attr.atttypmod, attr.attcollation))
        });
        let Some((attnum, typid, typmod, collation)) = found else {
            return Err(OutboxError::Capture(
                table.to_string(),
                format!("column \"{name}\" named in {argument} no longer exists; run outbox_attach again"),
            ));
        };
        let encoding = unsafe { encoding_for(typid, typmod, collation, memory) };
        columns.push(Column { attnum, typid, name: name.clone(), member: member_prefix(name), encoding });
    }
    Ok(columns)
}

unsafe fn encoding_for(typid: pg_sys::Oid, typmod: i32, collation: pg_sys::Oid, memory: pg_sys::MemoryContext) -> Encoding {
    // (outbox_attach refuses other encodings; a table attached before it did is not read as UTF-8)
    let utf8 = unsafe { pg_sys::GetDatabaseEncoding() } == pg_sys::pg_enc::PG_UTF8 as i32;
    match typid {
        pg_sys::INT2OID => Encoding::Int2,
        pg_sys::INT4OID => Encoding::Int4,
        pg_sys::INT8OID => Encoding::Int8,
        pg_sys::BOOLOID => Encoding::Bool,
        pg_sys::FLOAT4OID => Encoding::Float4,
        pg_sys::FLOAT8OID => Encoding::Float8,
        pg_sys::FLOAT4ARRAYOID => Encoding::Float4Array,
        pg_sys::FLOAT8ARRAYOID => Encoding::Float8Array,
        pg_sys::TEXTOID | pg_sys::VARCHAROID if utf8 => Encoding::Text,
        _ if unsafe { holds_json(typid) } => Encoding::ToJsonb(unsafe { json_function(c"to_jsonb", pg_sys::JSONBOID, typid, typmod, collation, memory) }),
        _ => Encoding::ToJson(unsafe { json_function(c"to_json", pg_sys::JSONOID, typid, typmod, collation, memory) }),
    }
}

/// A call descriptor of `to_json` or `to_jsonb` for arguments of type `typid`, in `memory`.
unsafe fn json_function(
    name: &CStr,
    result: pg_sys::Oid,
    typid: pg_sys::Oid,
    typmod: i32,
    collation: pg_sys::Oid,
    memory: pg_sys::MemoryContext,
) -> *mut pg_sys::FmgrInfo {
    unsafe {
        let previous = pg_sys::MemoryContextSwitchTo(memory);
        let function = pg_sys::fmgr_internal_function(name.as_ptr());
        let finfo = pg_sys::palloc0(std::mem::size_of::<pg_sys::FmgrInfo>()) as *mut pg_sys::FmgrInfo;
        pg_sys::fmgr_info_cxt(function, finfo, memory);
        // to_json learns its argument type from the call expression
        let argument = pg_sys::makeNullConst(typid, typmod, collation);
        let arguments = pg_sys::lappend(std::ptr::null_mut(), argument.cast());
        (*finfo).fn_expr = pg_sys::makeFuncExpr(
            function,
            result,
            arguments,
            pg_sys::InvalidOid,
            pg_sys::InvalidOid,
            pg_sys::CoercionForm::COERCE_EXPLICIT_CALL,
        )
        .cast();
        pg_sys::MemoryContextSwitchTo(previous);
        finfo
    }
}

/// Whether values of `typid` can hold json text as written: json itself, or a domain, array or
/// composite type with json in it.
unsafe fn holds_json(typid: pg_sys::Oid) -> bool {
    unsafe {
        if typid == pg_sys::JSONOID {
            return true;
        }
        let base = pg_sys::getBaseType(typid);
        if base != typid {
            return holds_json(base);
        }
        let element = pg_sys::get_element_type(typid);
        if element != pg_sys::InvalidOid {
            return holds_json(element);
        }
        if typid == pg_sys::RECORDOID || !pg_sys::type_is_rowtype(typid) {
            return false;
        }
        let desc = pg_sys::lookup_rowtype_tupdesc(typid, -1);
        let found = crate::tupdesc::attributes(desc).iter().any(|a| !a.attisdropped && holds_json(a.atttypid));
        pg_sys::DecrTupleDescRefCount(desc);
        found
    }
}

/// Appends the JSON object of `columns` of `tuple` to `out`, in column order; an error names
/// the column whose value jsonb refused.
unsafe fn encode_object(
    columns: &[Column],
    tuple: pg_sys::HeapTuple,
    tupdesc: pg_sys::TupleDesc,
    out: &mut String,
) -> Result<(), (String, String)> {
    out.push('{');
    for (i, column) in columns.iter().enumerate() {
        if i > 0 {
            out.push(',');
        }
        out.push_str(&column.member);
        let mut isnull = false;
        let value = unsafe { pg_sys::heap_getattr(tuple, column.attnum, tupdesc, &mut isnull) };
        if isnull {
            out.push_str("null");
        } else if let Encoding::ToJsonb(_) = column.encoding {
            let encoded = PgTryBuilder::new(|| {
                let mut text = String::new();
                unsafe { encode_value(&column.encoding, value, &mut text) };
                Ok(text)
            })
            .catch_others(|error| match error {
                // what jsonb refuses is a data exception (22xxx); a cancel, a timeout or an
                // out-of-memory is not this column's fault and goes on as it was
                CaughtError::PostgresError(report) if is_data_exception(report.sql_error_code()) => {
                    let reason = match report.detail() {
                        Some(detail) => format!("{} ({detail})", report.message()),
                        None => report.message().to_string(),
                    };
                    Err((column.name.clone(), reason))
                }
                other => other.rethrow(),
            })
            .execute()?;
            out.push_str(&encoded);
        } else {
            unsafe { encode_value(&column.encoding, value, out) };
        }
    }
    out.push('}');
    Ok(())
}

/// Whether `code` is in SQLSTATE class 22, data exception. (A code packs its five characters
/// six bits each, the class first.)
fn is_data_exception(code: PgSqlErrorCode) -> bool {
    const CLASS_BITS: i32 = 0o7777;
    (code as i32) & CLASS_BITS == (PgSqlErrorCode::ERRCODE_DATA_EXCEPTION as i32) & CLASS_BITS
}

unsafe fn encode_value(encoding: &Encoding, value: pg_sys::Datum, out: &mut String) {
    match encoding {
        Encoding::Int2 => push_int(out, i64::from(value.value() as i16)),
        Encoding::Int4 => push_int(out, i64::from(value.value() as i32)),
        Encoding::Int8 => push_int(out, value.value() as i64),
        Encoding::Bool => out.push_str(if value.value() != 0 { "true" } else { "false" }),
        Encoding::Float4 => push_float(out, Float::Four(f32::from_bits(value.value() as u32))),
        Encoding::Float8 => push_float(out, Float::Eight(f64::from_bits(value.value() as u64))),
        Encoding::Float4Array => unsafe { push_float_array(out, value, pg_sys::FLOAT4OID) },
        Encoding::Float8Array => unsafe { push_float_array(out, value, pg_sys::FLOAT8OID) },
        Encoding::Text => unsafe {
            let text = pg_sys::pg_detoast_datum_packed(value.cast_mut_ptr());
            push_json_string(out, pgrx::varlena::text_to_rust_str_unchecked(text));
        },
        Encoding::ToJson(finfo) => unsafe {
            let json = pg_sys::FunctionCall1Coll(*finfo, pg_sys::InvalidOid, value);
            let text = pg_sys::pg_detoast_datum_packed(json.cast_mut_ptr());
            out.push_str(&String::from_utf8_lossy(pgrx::varlena::varlena_to_byte_slice(text)));
        },
        Encoding::ToJsonb(finfo) => unsafe {
            let jsonb = pg_sys::FunctionCall1Coll(*finfo, pg_sys::InvalidOid, value);
            let jsonb = pg_sys::pg_detoast_datum(jsonb.cast_mut_ptr()).cast::<pg_sys::Jsonb>();
            let text = pg_sys::JsonbToCString(std::ptr::null_mut(), &mut (*jsonb).root, -1);
            out.push_str(&CStr::from_ptr(text).to_string_lossy());
        },
    }
}

unsafe extern "C" {
    /// (utils/bytea.h, which pgrx does not bind)
    static bytea_output: core::ffi::c_int;
    /// (common/shortest_dec.h, which pgrx does not bind) What float4out and float8out write
    /// when extra_float_digits is above 0, NaN and the infinities included, unterminated;
    /// they return its length.
    fn float_to_shortest_decimal_bufn(f: f32, result: *mut core::ffi::c_char) -> core::ffi::c_int;
    fn double_to_shortest_decimal_bufn(f: f64, result: *mut core::ffi::c_char) -> core::ffi::c_int;
}

#[derive(Clone, Copy)]
enum Float {
    Four(f32),
    Eight(f64),
}

/// A float as `to_json` writes it: a number, or NaN and the infinities as strings (JSON has no
/// such numbers).
fn push_float(out: &mut String, value: Float) {
    // DOUBLE_SHORTEST_DECIMAL_LEN, the longer of the two
    let mut buf = [0u8; 25];
    let (length, finite) = match value {
        Float::Four(f) => (unsafe { float_to_shortest_decimal_bufn(f, buf.as_mut_ptr().cast()) }, f.is_finite()),
        Float::Eight(f) => (unsafe { double_to_shortest_decimal_bufn(f, buf.as_mut_ptr().cast()) }, f.is_finite()),
    };
    // SAFETY: ASCII (digits, sign, point and exponent, or NaN and Infinity), so still UTF-8;
    // checking it cost a fifth as much as writing it
    let bytes = unsafe { out.as_mut_vec() };
    if finite {
        bytes.extend_from_slice(&buf[..length as usize]);
    } else {
        bytes.push(b'"');
        bytes.extend_from_slice(&buf[..length as usize]);
        bytes.push(b'"');
    }
}

/// A float4[] or float8[] as `to_json` writes it: nested JSON arrays, one level per dimension
/// (bounds dropped), NULL elements as null.
unsafe fn push_float_array(out: &mut String, value: pg_sys::Datum, element_type: pg_sys::Oid) {
    let array = unsafe { pg_sys::pg_detoast_datum(value.cast_mut_ptr()).cast::<pg_sys::ArrayType>() };
    let mut raw = unsafe { pgrx::array::RawArray::from_ptr(std::ptr::NonNull::new_unchecked(array)) };
    let dims: Vec<usize> = raw.dims().iter().map(|&d| d as usize).collect();
    out.reserve(raw.len() * 12);
    let nulls = raw.nulls().map(|bitmap| unsafe { bitmap.as_ref() });
    // elements are stored one after another (four or eight bytes, as aligned), NULLs left out
    let data = raw.data::<u8>().as_ptr().cast::<u8>();
    let (mut item, mut stored) = (0usize, 0usize);
    let mut next = |out: &mut String| {
        let present = nulls.is_none_or(|bitmap| bitmap[item / 8] & (1 << (item % 8)) != 0);
        item += 1;
        if !present {
            out.push_str("null");
            return;
        }
        let float = unsafe {
            if element_type == pg_sys::FLOAT4OID {
                Float::Four(data.add(stored * 4).cast::<f32>().read_unaligned())
            } else {
                Float::Eight(data.add(stored * 8).cast::<f64>().read_unaligned())
            }
        };
        stored += 1;
        push_float(out, float);
    };
    fn dimension(out: &mut String, dims: &[usize], next: &mut dyn FnMut(&mut String)) {
        out.push('[');
        for i in 0..dims.first().copied().unwrap_or(0) {
            if i > 0 {
                out.push(',');
            }
            if dims.len() == 1 {
                next(out);
            } else {
                dimension(out, &dims[1..], next);
            }
        }
        out.push(']');
    }
    dimension(out, &dims, &mut next);
}

/// `bytea_output = hex`
const BYTEA_OUTPUT_HEX: core::ffi::c_int = 1;

/// The session settings `to_json` spells an attachment's values by, beyond those it always
/// may (TimeZone, extra_float_digits, IntervalStyle, bytea_output, DateStyle): `lc_monetary`
/// for `money`, `search_path` for the `reg*` types, anywhere in a column's type (an array's
/// elements, a domain's base, a range's bounds, a composite's fields).
#[derive(Default)]
struct SpelledBy {
    lc_monetary: bool,
    search_path: bool,
}

impl SpelledBy {
    unsafe fn add_type(&mut self, typid: pg_sys::Oid, seen: &mut Vec<pg_sys::Oid>) {
        if typid == pg_sys::InvalidOid || seen.contains(&typid) {
            return;
        }
        seen.push(typid);
        use pg_sys::*;
        match typid {
            MONEYOID => self.lc_monetary = true,
            REGCLASSOID | REGPROCOID | REGPROCEDUREOID | REGOPEROID | REGOPERATOROID | REGTYPEOID | REGCONFIGOID
            | REGDICTIONARYOID | REGNAMESPACEOID | REGROLEOID | REGCOLLATIONOID => self.search_path = true,
            _ => {}
        }
        unsafe {
            self.add_type(getBaseType(typid), seen);
            self.add_type(get_element_type(typid), seen);
            self.add_type(get_range_subtype(typid), seen);
            #[cfg(not(feature = "pg13"))]
            self.add_type(get_multirange_range(typid), seen);
            let fields = get_typ_typrelid(typid);
            if fields != InvalidOid {
                let relation = RelationIdGetRelation(fields);
                if !relation.is_null() {
                    let types: Vec<Oid> = crate::tupdesc::attributes((*relation).rd_att).iter().map(|a| a.atttypid).collect();
                    RelationClose(relation);
                    for field in types {
                        self.add_type(field, seen);
                    }
                }
            }
        }
    }
}

/// Holds the settings `to_json` spells values by at one value while a batch is encoded, so that
/// a row's key is spelled alike by every session: a DELETE from a session in another time zone
/// named a key its UPSERT never had, and under `extra_float_digits = 0` the DELETE of key
/// 0.30000000000000004 named key 0.3, another row. The values: TimeZone UTC (or any zone of
/// offset 0), shortest exact floats (any extra_float_digits above 0), IntervalStyle postgres,
/// bytea_output hex, DateStyle ISO, and where the types need them lc_monetary C and
/// search_path pg_catalog. Set as a function's SET clause sets them (a GUC nest level), and
/// only those the session has otherwise, which it seldom does: code that to_json runs (a
/// cast, an output function) sees them, and a SET it makes behaves as in any function. Returns
/// the level for `release_settings`; an error unwinds it with its (sub)transaction.
unsafe fn hold_settings(attachment: &Attachment) -> Option<core::ffi::c_int> {
    let spelled_by = attachment.spelled_by.as_ref()?;
    let mut held: Vec<(&CStr, &CStr)> = Vec::new();
    unsafe {
        let mut offset: core::ffi::c_long = 0;
        if !(pg_sys::pg_get_timezone_offset(pg_sys::session_timezone, &mut offset) && offset == 0) {
            held.push((c"TimeZone", c"UTC"));
        }
        if pg_sys::extra_float_digits < 1 {
            held.push((c"extra_float_digits", c"1"));
        }
        if pg_sys::IntervalStyle != pg_sys::INTSTYLE_POSTGRES as core::ffi::c_int {
            held.push((c"IntervalStyle", c"postgres"));
        }
        if bytea_output != BYTEA_OUTPUT_HEX {
            held.push((c"bytea_output", c"hex"));
        }
        if pg_sys::DateStyle != pg_sys::USE_ISO_DATES as core::ffi::c_int {
            held.push((c"DateStyle", c"ISO"));
        }
        let differs = |name: &CStr, value: &CStr| CStr::from_ptr(pg_sys::GetConfigOption(name.as_ptr(), false, false)) != value;
        if spelled_by.lc_monetary && differs(c"lc_monetary", c"C") {
            held.push((c"lc_monetary", c"C"));
        }
        if spelled_by.search_path && differs(c"search_path", c"pg_catalog") {
            held.push((c"search_path", c"pg_catalog"));
        }
        if held.is_empty() {
            return None;
        }
        let level = pg_sys::NewGUCNestLevel();
        for (name, value) in held {
            pg_sys::set_config_option(
                name.as_ptr(),
                value.as_ptr(),
                pg_sys::GucContext::PGC_USERSET,
                pg_sys::GucSource::PGC_S_SESSION,
                pg_sys::GucAction::GUC_ACTION_SAVE,
                true,
                PgLogLevel::ERROR as core::ffi::c_int,
                false,
            );
        }
        Some(level)
    }
}

/// Gives the session its settings back after `hold_settings`.
fn release_settings(level: Option<core::ffi::c_int>) {
    if let Some(level) = level {
        unsafe { pg_sys::AtEOXact_GUC(true, level) };
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn jsonb_refusals_are_data_exceptions_and_a_cancel_is_not() {
        assert!(is_data_exception(PgSqlErrorCode::ERRCODE_UNTRANSLATABLE_CHARACTER));
        assert!(is_data_exception(PgSqlErrorCode::ERRCODE_NUMERIC_VALUE_OUT_OF_RANGE));
        assert!(is_data_exception(PgSqlErrorCode::ERRCODE_INVALID_TEXT_REPRESENTATION));
        assert!(!is_data_exception(PgSqlErrorCode::ERRCODE_QUERY_CANCELED));
        assert!(!is_data_exception(PgSqlErrorCode::ERRCODE_OUT_OF_MEMORY));
    }
}
