//! Claim, ack and fail.
//!
//! Events reach a subscription through a window over the log, as in PgQ: the subscription
//! remembers a snapshot up to which everything has been handed out, and the next window is
//! what became visible since. A transaction that drew a lower id but committed later lands in
//! a later window, so no committed event is skipped. A window claim writes one ledger row and
//! one small claim row, however many events it hands out; only events that need a second
//! delivery (failed, expired, deferred behind their row, replayed) get a row of their own in
//! `outbox_retries`.

use std::cell::{Cell, OnceCell, RefCell};
use std::collections::{BTreeMap, HashMap, HashSet};
use std::rc::Rc;

use pgrx::datum::{Interval, TimestampWithTimeZone};
use pgrx::pg_sys;
use pgrx::prelude::*;
use pgrx::spi::{SpiClient, SpiHeapTupleData, SpiTupleTable};

use crate::arrays::{int8_elements, int8s, timestamps, Int8ArrayDatum};
use crate::error::OutboxError;
use crate::ext::Extension;
use crate::guc;
use crate::metrics::{bucket_of, LATENCY_BUCKETS};
use crate::ordering::{Blocked, IdMap, IdSet, OrderKey, StraddleFloor};
use crate::policy::{check_batch_size, held_by_another, random_unit, RetryPolicy};
use crate::queries::{self as q, run, run_in_segment};
use crate::shape::{event_payload, json_array_elements, push_json_string, EVENTS_PER_ROW};

pub struct Claimed {
    pub id: i64,
    pub attempts: i32,
    /// None when payloads were not asked for, or the event is gone from the log.
    pub event: Option<Event>,
}

/// What a claim returns of an event besides its id and attempts.
pub struct Event {
    /// Shared by the events of a claim that have the same type (see Spelled).
    pub event_type: Rc<str>,
    /// JSON text; `outbox_claim` parses it into jsonb.
    pub payload: String,
    pub created_at: TimestampWithTimeZone,
}

/// Whether a claim renders the events it hands out.
#[derive(Clone, Copy, PartialEq, Eq)]
pub enum Payloads {
    Render,
    /// For `outbox_claim_ids`, whose SQL (0.4.0 and older) renders them itself.
    Skip,
}

/// Microseconds since the Postgres epoch.
type Micros = i64;

pub fn now() -> Micros {
    unsafe { pg_sys::GetCurrentTimestamp() }
}

pub fn timestamp(micros: Micros) -> TimestampWithTimeZone {
    TimestampWithTimeZone::try_from(micros).unwrap_or_else(|_| TimestampWithTimeZone::positive_infinity())
}

fn micros_of(ts: TimestampWithTimeZone) -> Micros {
    pg_sys::TimestampTz::from(ts)
}

pub fn interval_micros(interval: &Interval) -> i64 {
    interval.as_micros().clamp(i64::MIN as i128, i64::MAX as i128) as i64
}

pub fn required<T: FromDatum + IntoDatum>(row: &SpiHeapTupleData, ordinal: usize) -> Result<T, OutboxError> {
    row.get::<T>(ordinal)?
        .ok_or_else(|| OutboxError::Capture("outbox".into(), format!("unexpected NULL in column {ordinal}")))
}

/// The one row a query returns.
pub fn single<'conn>(table: SpiTupleTable<'conn>) -> Result<SpiHeapTupleData<'conn>, OutboxError> {
    table
        .into_iter()
        .next()
        .ok_or_else(|| OutboxError::Capture("outbox".into(), "a query that returns one row returned none".into()))
}

pub fn subscription_by_name(
    client: &mut SpiClient<'_>,
    extension: &Extension,
    name: &str,
) -> Result<(i32, pgrx::JsonB), OutboxError> {
    let found = find_subscription(client, extension, name)?;
    Ok((found.id, found.options))
}

struct FoundSubscription {
    id: i32,
    options: pgrx::JsonB,
    sink: String,
    /// Whether the caller may claim, ack and fail it (its consumer_role).
    consumable: bool,
}

fn find_subscription(client: &mut SpiClient<'_>, extension: &Extension, name: &str) -> Result<FoundSubscription, OutboxError> {
    let table = run(client, extension, q::FIND_SUBSCRIPTION.pick(extension), &[name.into(), caller().into()])?;
    match table.into_iter().next() {
        Some(row) => Ok(FoundSubscription {
            id: required(&row, 1)?,
            options: required(&row, 2)?,
            sink: required(&row, 3)?,
            consumable: required(&row, 4)?,
        }),
        None => Err(OutboxError::UnknownSubscription(name.to_string())),
    }
}

/// Whether this backend is the delivery worker, which alone claims, acks and fails the events
/// of subscriptions with a sink: a consumer holding such a subscription's locks in an open
/// transaction stalled the worker, and every sink with it. (Other background workers, such
/// as pg_cron's, are consumers like any other.)
fn is_worker() -> bool {
    crate::worker::IS_DELIVERY_WORKER.load(std::sync::atomic::Ordering::Relaxed)
}

/// A subscription this backend may claim from, ack and fail in.
fn consumable_subscription(
    client: &mut SpiClient<'_>,
    extension: &Extension,
    name: &str,
) -> Result<(i32, pgrx::JsonB), OutboxError> {
    let found = find_subscription(client, extension, name)?;
    if found.sink != "pull" && !is_worker() {
        return Err(OutboxError::NotPull(name.to_string(), found.sink));
    }
    if !found.consumable {
        let role = crate::sink::consumer_role(&found.options.0)?.unwrap_or_default();
        return Err(OutboxError::NotConsumer(name.to_string(), role.to_string()));
    }
    Ok((found.id, found.options))
}

/// The role calling the API: the session's, since the API functions run as their owner.
fn caller() -> pg_sys::Oid {
    unsafe { pg_sys::GetOuterUserId() }
}

/// An open window claim and the events it handed out.
struct OpenClaim {
    claim_id: i64,
    open_count: i32,
    event_count: i32,
    event_ids: Vec<i64>,
    key_hashes: Vec<i64>,
    table_hashes: Vec<i64>,
    created_ats: Vec<TimestampWithTimeZone>,
}

impl OpenClaim {
    fn order_key(&self, i: usize) -> OrderKey {
        OrderKey { key_hash: self.key_hashes[i], table_hash: self.table_hashes[i] }
    }
}

/// An open claim as SEGMENT_CLAIMS and EXPIRED_CLAIMS return it.
fn read_claim(row: &SpiHeapTupleData) -> Result<OpenClaim, OutboxError> {
    Ok(OpenClaim {
        claim_id: required(row, 1)?,
        open_count: required(row, 2)?,
        event_count: required(row, 3)?,
        event_ids: required(row, 4)?,
        key_hashes: required(row, 5)?,
        table_hashes: required(row, 6)?,
        created_ats: required(row, 7)?,
    })
}

fn read_claims(table: SpiTupleTable<'_>) -> Result<Vec<OpenClaim>, OutboxError> {
    table.into_iter().map(|row| read_claim(&row)).collect()
}

/// The events of a claim that were acked, failed or expired.
fn resolved_events(
    client: &mut SpiClient<'_>,
    extension: &Extension,
    subscription: i32,
    claim_id: i64,
) -> Result<IdSet, OutboxError> {
    let table = run(client, extension, &q::RESOLVED_EVENTS, &[subscription.into(), claim_id.into()])?;
    Ok(table.first().get::<Vec<i64>>(1)?.unwrap_or_default().into_iter().collect())
}

/// Indexes of the claim's events that were not yet acked, failed or expired.
fn unresolved(
    client: &mut SpiClient<'_>,
    extension: &Extension,
    subscription: i32,
    claim: &OpenClaim,
) -> Result<Vec<usize>, OutboxError> {
    let all = 0..claim.event_ids.len();
    if claim.open_count == claim.event_count {
        return Ok(all.collect());
    }
    let resolved = resolved_events(client, extension, subscription, claim.claim_id)?;
    Ok(all.filter(|&i| !resolved.contains(&claim.event_ids[i])).collect())
}

/// An int8 array column used as a slice of the array (src/arrays.rs): claims and acks read
/// the hash and id arrays of every open claim and window row, and converting each element
/// into a Vec cost more than the rest of reading them.
struct Int8Array<'conn>(&'conn [i64]);

impl<'conn> Int8Array<'conn> {
    /// `ordinal` of `row`; None when it is NULL or holds a NULL.
    fn read(row: &SpiHeapTupleData<'conn>, ordinal: usize) -> Result<Option<Int8Array<'conn>>, OutboxError> {
        Ok(Self::from_datum(row.get::<Int8ArrayDatum>(ordinal)?))
    }

    fn from_datum(datum: Option<Int8ArrayDatum>) -> Option<Int8Array<'conn>> {
        // SAFETY: both callers pass an int8[] column of a row SPI keeps until 'conn ends, and
        // detoast while connected to SPI, whose procedure memory also lasts until then
        datum.and_then(|datum| unsafe { int8_elements(datum) }).map(Int8Array)
    }

    fn elements(&self) -> &'conn [i64] {
        self.0
    }
}

/// An int8 array of an open claim's ledger row, which must be there and hold no NULLs.
fn ledger_array<'conn>(
    row: &SpiHeapTupleData<'conn>,
    ordinal: usize,
    claim: i64,
    column: &'static str,
) -> Result<Int8Array<'conn>, OutboxError> {
    Int8Array::read(row, ordinal)?.ok_or(OutboxError::MalformedClaim { claim, column })
}

/// An open claim as the claims table lists it.
#[derive(Clone, Copy)]
struct ClaimSegment {
    claim_id: i64,
    slot: i16,
    expired: bool,
}

fn open_claim_segments(
    client: &mut SpiClient<'_>,
    extension: &Extension,
    subscription: i32,
    now: Micros,
) -> Result<Vec<ClaimSegment>, OutboxError> {
    run(client, extension, &q::OPEN_CLAIM_SEGMENTS, &[subscription.into(), timestamp(now).into()])?
        .into_iter()
        .map(|row| Ok(ClaimSegment { claim_id: required(&row, 1)?, slot: required(&row, 2)?, expired: required(&row, 3)? }))
        .collect()
}

/// The ledger rows of `claims` in SEGMENT_CLAIMS' columns, read one segment at a time. Their
/// arrays stay undecoded until asked for. These queries see a later snapshot than the listing:
/// a claim closed in between drops out of the join and held nothing any more, and no claim can
/// be added, since only a claim adds one and claims of a subscription are serialized.
fn claim_rows<'conn>(
    client: &mut SpiClient<'conn>,
    extension: &Extension,
    subscription: i32,
    claims: &[ClaimSegment],
) -> Result<Vec<SpiHeapTupleData<'conn>>, OutboxError> {
    let mut slots: Vec<i16> = claims.iter().map(|c| c.slot).collect();
    slots.sort_unstable();
    slots.dedup();
    let mut rows = Vec::with_capacity(claims.len());
    for slot in slots {
        let ids: Vec<i64> = claims.iter().filter(|c| c.slot == slot).map(|c| c.claim_id).collect();
        rows.extend(run_in_segment(client, extension, &q::SEGMENT_CLAIMS, slot, &[subscription.into(), ids.into()])?);
    }
    Ok(rows)
}

/// The rows that events of the open claims `rows` hold: later events of those rows must
/// wait. Leaves room for `more` events.
fn rows_in_flight(
    client: &mut SpiClient<'_>,
    extension: &Extension,
    subscription: i32,
    rows: &[SpiHeapTupleData],
    more: usize,
) -> Result<Blocked, OutboxError> {
    let mut claims = Vec::with_capacity(rows.len());
    for row in rows {
        let claim: i64 = required(row, 1)?;
        let partly_resolved = required::<i32>(row, 2)? < required::<i32>(row, 3)?;
        let keys = ledger_array(row, 5, claim, "key_hashes")?;
        let tables = ledger_array(row, 6, claim, "table_hashes")?;
        if tables.elements().len() != keys.elements().len() {
            return Err(OutboxError::MalformedClaim { claim, column: "table_hashes" });
        }
        let ids = if partly_resolved { Some(ledger_array(row, 4, claim, "event_ids")?) } else { None };
        if ids.as_ref().is_some_and(|ids| ids.elements().len() != keys.elements().len()) {
            return Err(OutboxError::MalformedClaim { claim, column: "event_ids" });
        }
        claims.push((claim, keys, tables, ids));
    }
    let mut blocked = Blocked::with_capacity(claims.iter().map(|(_, keys, ..)| keys.elements().len()).sum::<usize>() + more);
    for (claim, keys, tables, ids) in &claims {
        let (keys, tables) = (keys.elements(), tables.elements());
        let Some(ids) = ids else {
            blocked.add_all(keys, tables);
            continue;
        };
        // partly resolved: its resolved events hold nothing any more
        let resolved = resolved_events(client, extension, subscription, *claim)?;
        for (i, id) in ids.elements().iter().enumerate() {
            if !resolved.contains(id) {
                blocked.add(OrderKey { key_hash: keys[i], table_hash: tables[i] });
            }
        }
    }
    Ok(blocked)
}

/// Events handed out together by a window claim, with what the ledger keeps of each.
#[derive(Default)]
struct EventBatch {
    ids: Vec<i64>,
    key_hashes: Vec<i64>,
    table_hashes: Vec<i64>,
    created_ats: Vec<TimestampWithTimeZone>,
}

impl EventBatch {
    fn push(&mut self, id: i64, key: OrderKey, created_at: TimestampWithTimeZone) {
        self.ids.push(id);
        self.key_hashes.push(key.key_hash);
        self.table_hashes.push(key.table_hash);
        self.created_ats.push(created_at);
    }
}

/// Events that go to `outbox_retries` together, each visible again at its own time.
#[derive(Default)]
struct RetryBatch {
    events: EventBatch,
    visible_ats: Vec<TimestampWithTimeZone>,
}

impl RetryBatch {
    fn push(&mut self, id: i64, key: OrderKey, created_at: TimestampWithTimeZone, visible_at: Micros) {
        self.events.push(id, key, created_at);
        self.visible_ats.push(timestamp(visible_at));
    }

    fn insert(
        self,
        client: &mut SpiClient<'_>,
        extension: &Extension,
        subscription: i32,
        attempts: i32,
        leased_until: Option<Micros>,
        error: Option<&str>,
    ) -> Result<(), OutboxError> {
        if self.events.ids.is_empty() {
            return Ok(());
        }
        let events = self.events;
        run(
            client,
            extension,
            &q::ADD_RETRIES,
            &[
                subscription.into(),
                int8s(&events.ids),
                int8s(&events.key_hashes),
                int8s(&events.table_hashes),
                timestamps(&events.created_ats),
                attempts.into(),
                leased_until.map(timestamp).into(),
                error.into(),
                timestamps(&self.visible_ats),
            ],
        )?;
        Ok(())
    }
}

/// An event whose retry budget is used up.
struct Dead {
    id: i64,
    attempts: i32,
    key: OrderKey,
}

/// Moves events to the dead letters and counts them.
fn bury(
    client: &mut SpiClient<'_>,
    extension: &Extension,
    subscription: i32,
    dead: Vec<Dead>,
    error: Option<&str>,
    now: Micros,
) -> Result<(), OutboxError> {
    if dead.is_empty() {
        return Ok(());
    }
    let count = dead.len() as i64;
    let ids: Vec<i64> = dead.iter().map(|d| d.id).collect();
    let attempts: Vec<i32> = dead.iter().map(|d| d.attempts).collect();
    let key_hashes: Vec<i64> = dead.iter().map(|d| d.key.key_hash).collect();
    let table_hashes: Vec<i64> = dead.iter().map(|d| d.key.table_hash).collect();
    run(
        client,
        extension,
        &q::BURY,
        &[
            subscription.into(),
            ids.into(),
            attempts.into(),
            key_hashes.into(),
            table_hashes.into(),
            error.into(),
            timestamp(now).into(),
        ],
    )?;
    count_stats(client, extension, subscription, now, Stats { dead: count, ..Stats::default() })
}

/// Buries the claim's retry candidates whose last hand-out's lease is over, as far as their
/// rows still say so (see BURY_EXPIRED_RETRIES), and counts those buried, each a dead letter
/// and, unless a rescue counted it, a failed delivery.
fn bury_expired_retries(client: &mut SpiClient<'_>, extension: &Extension, subscription: i32, ids: Vec<i64>, now: Micros) -> Result<(), OutboxError> {
    if ids.is_empty() {
        return Ok(());
    }
    let args = [subscription.into(), ids.into(), "lease expired".into(), timestamp(now).into()];
    let counts = single(run(client, extension, &q::BURY_EXPIRED_RETRIES, &args)?)?;
    let (buried, failed): (i64, i64) = (required(&counts, 1)?, required(&counts, 2)?);
    if buried == 0 {
        return Ok(());
    }
    count_stats(client, extension, subscription, now, Stats { failed, dead: buried, ..Stats::default() })
}

#[derive(Default)]
struct Stats {
    acked: i64,
    latency_sum: f64,
    failed: i64,
    dead: i64,
    /// acked events per latency histogram bucket (empty: none acked)
    latency_buckets: Vec<i64>,
}

impl Stats {
    fn acked_after(&mut self, seconds: f64) {
        if self.latency_buckets.is_empty() {
            self.latency_buckets = vec![0; LATENCY_BUCKETS.len() + 1];
        }
        self.acked += 1;
        self.latency_sum += seconds;
        self.latency_buckets[bucket_of(seconds)] += 1;
    }
}

fn count_stats(
    client: &mut SpiClient<'_>,
    extension: &Extension,
    subscription: i32,
    now: Micros,
    stats: Stats,
) -> Result<(), OutboxError> {
    run(
        client,
        extension,
        &q::COUNT_STATS,
        &[
            subscription.into(),
            timestamp(now).into(),
            stats.acked.into(),
            stats.latency_sum.into(),
            stats.failed.into(),
            stats.dead.into(),
            (!stats.latency_buckets.is_empty()).then_some(stats.latency_buckets).into(),
            (backend_number() % q::STATS_SHARDS).into(),
        ],
    )?;
    Ok(())
}

/// This backend's slot among the server's processes: small and dense among the backends
/// running at once, so consumers' acks land in different counter shards.
fn backend_number() -> i32 {
    #[cfg(any(feature = "pg17", feature = "pg18"))]
    let number = unsafe { pg_sys::MyProcNumber };
    #[cfg(not(any(feature = "pg17", feature = "pg18")))]
    let number = unsafe { pg_sys::MyBackendId };
    number.max(0)
}

/// Closes the claim when its last event is resolved; otherwise records how many are left and
/// when the oldest of them was captured (the backlog's oldest pending age reads it).
fn settle(
    client: &mut SpiClient<'_>,
    extension: &Extension,
    subscription: i32,
    holding: &Holding,
) -> Result<(), OutboxError> {
    let claim = &holding.claim;
    match holding.left.iter().map(|&i| micros_of(claim.created_ats[i])).min() {
        Some(oldest) => {
            let open = holding.left.len() as i32;
            let args = [subscription.into(), claim.claim_id.into(), open.into(), timestamp(oldest).into()];
            run(client, extension, &q::SET_OPEN_COUNT, &args)?;
        }
        None => {
            run(client, extension, &q::CLOSE_CLAIM, &[subscription.into(), claim.claim_id.into()])?;
        }
    }
    Ok(())
}

fn record_resolution(
    client: &mut SpiClient<'_>,
    extension: &Extension,
    subscription: i32,
    claim_id: Option<i64>,
    kind: &str,
    ids: Vec<i64>,
    now: Micros,
) -> Result<(), OutboxError> {
    run(
        client,
        extension,
        &q::RECORD_RESOLUTION,
        &[subscription.into(), claim_id.into(), kind.into(), timestamp(now).into(), int8s(&ids)],
    )?;
    Ok(())
}

/// Returns the expired claims' unresolved events to the retry table, or to the dead letters
/// when one hand-out is all the policy allows.
fn rescue_expired(
    client: &mut SpiClient<'_>,
    extension: &Extension,
    subscription: i32,
    policy: &RetryPolicy,
    now: Micros,
) -> Result<(), OutboxError> {
    let expired = run(client, extension, &q::EXPIRED_CLAIMS, &[subscription.into(), timestamp(now).into()])?;
    for claim in read_claims(expired)? {
        let open = unresolved(client, extension, subscription, &claim)?;
        if !open.is_empty() {
            let ids: Vec<i64> = open.iter().map(|&i| claim.event_ids[i]).collect();
            record_resolution(client, extension, subscription, Some(claim.claim_id), "x", ids, now)?;
            count_stats(client, extension, subscription, now, Stats { failed: open.len() as i64, ..Stats::default() })?;
            if policy.exhausted(1) {
                let dead = open.iter().map(|&i| Dead { id: claim.event_ids[i], attempts: 1, key: claim.order_key(i) }).collect();
                bury(client, extension, subscription, dead, Some("lease expired"), now)?;
            } else {
                let mut batch = RetryBatch::default();
                for &i in &open {
                    batch.push(claim.event_ids[i], claim.order_key(i), claim.created_ats[i], now);
                }
                // leased_until in the past: claimable again, and a late ack still counts
                batch.insert(client, extension, subscription, 1, Some(now), Some("lease expired"))?;
            }
        }
        run(client, extension, &q::CLOSE_CLAIM, &[subscription.into(), claim.claim_id.into()])?;
    }
    Ok(())
}

/// The columns of WINDOW_ROWS and STRADDLERS, by type.
const WINDOW_COLUMNS: usize = 9;
const WINDOW_TYPES: [pg_sys::Oid; WINDOW_COLUMNS] = [
    pg_sys::INT8OID,
    pg_sys::INT4OID,
    pg_sys::INT8OID,
    pg_sys::TIMESTAMPTZOID,
    pg_sys::INT8ARRAYOID,
    pg_sys::TEXTOID,
    pg_sys::TEXTOID,
    pg_sys::TEXTOID,
    pg_sys::TEXTOID,
];

/// A log row as a claim reads it. Its arrays, a thousand elements and TOASTed for a bulk
/// statement, are decoded only when the claim reaches the row's events, or looks up the
/// retries waiting on them (only a subscription with retries does): a claim asks for as many
/// rows as it wants events, and would otherwise decode each bulk row it leaves to the next
/// claims once per claim.
struct WindowRow<'conn> {
    base: i64,
    n: i32,
    table_hash: i64,
    created_at: TimestampWithTimeZone,
    /// Every column, as `heap_deform_tuple` left it in SPI's copy of the row.
    values: [pg_sys::Datum; WINDOW_COLUMNS],
    nulls: [bool; WINDOW_COLUMNS],
    key_hashes: OnceCell<Int8Array<'conn>>,
}

impl<'conn> WindowRow<'conn> {
    /// Column `ordinal` (1-based), None when NULL.
    fn column<T: FromDatum>(&self, ordinal: usize) -> Option<T> {
        deformed(&self.values, &self.nulls, ordinal)
    }

    fn key_hashes(&self) -> Result<&[i64], OutboxError> {
        if let Some(hashes) = self.key_hashes.get() {
            return Ok(hashes.elements());
        }
        let hashes = Int8Array::from_datum(self.column(5))
            .filter(|hashes| hashes.elements().len() >= self.n as usize)
            .ok_or_else(|| self.broken("key_hashes"))?;
        Ok(self.key_hashes.get_or_init(|| hashes).elements())
    }

    fn broken(&self, column: &'static str) -> OutboxError {
        OutboxError::MalformedLogRow { base: self.base, column }
    }

    /// Appends the events at these ordinals, with their payloads, to `out`.
    fn render(&self, ords: &[usize], spelled: &mut Spelled, out: &mut Vec<Event>) -> Result<(), OutboxError> {
        let broken = |column| self.broken(column);
        let event_type = spelled.event_type(self.column(6).ok_or_else(|| broken("type"))?);
        let table = spelled.table(self.column(7).ok_or_else(|| broken("source_name"))?);
        let keys: &str = self.column(8).ok_or_else(|| broken("keys"))?;
        let data: Option<&str> = self.column(9);
        let keys = json_array_elements(keys).ok_or_else(|| broken("keys"))?;
        let data = data.map(|d| json_array_elements(d).ok_or_else(|| broken("data"))).transpose()?;
        for &ord in ords {
            let key = keys.get(ord - 1).ok_or_else(|| broken("keys"))?;
            let data = match &data {
                Some(data) => Some(*data.get(ord - 1).ok_or_else(|| broken("data"))?),
                None => None,
            };
            out.push(Event {
                event_type: event_type.clone(),
                payload: event_payload(table, key, data),
                created_at: self.created_at,
            });
        }
        Ok(())
    }
}

/// The rows WINDOW_ROWS or STRADDLERS just returned, each deformed with one call into
/// Postgres. pgrx reads a result row column by column, two calls each, and finds a column
/// that follows a variable-width one by walking the row from its start: eighteen calls and
/// five walks for each row, which a claim of single-row events makes per event.
fn read_window_rows(table: SpiTupleTable<'_>) -> Result<Vec<WindowRow<'_>>, OutboxError> {
    if table.is_empty() {
        return Ok(Vec::new());
    }
    // SAFETY: `table` wraps the result SPI keeps of the query just run, SPI_tuptable; the
    // rows and their datums stay in SPI's memory for as long as `table` could be used
    let (tupdesc, tuples) = unsafe {
        let result = pg_sys::SPI_tuptable;
        ((*result).tupdesc, std::slice::from_raw_parts((*result).vals, table.len()))
    };
    // the datums are converted without pgrx's type checks: check the types once
    let types = unsafe { crate::tupdesc::attributes(tupdesc) }.iter().map(|a| a.atttypid);
    if !types.eq(WINDOW_TYPES) {
        return Err(OutboxError::Capture("outbox_log".into(), "a window query returned unexpected columns".into()));
    }
    tuples
        .iter()
        .map(|&tuple| {
            let mut values = [pg_sys::Datum::from(0); WINDOW_COLUMNS];
            let mut nulls = [true; WINDOW_COLUMNS];
            unsafe { pg_sys::heap_deform_tuple(tuple, tupdesc, values.as_mut_ptr(), nulls.as_mut_ptr()) };
            let null_at = |ordinal| OutboxError::Capture("outbox".into(), format!("unexpected NULL in column {ordinal}"));
            Ok(WindowRow {
                base: deformed(&values, &nulls, 1).ok_or_else(|| null_at(1))?,
                n: deformed(&values, &nulls, 2).ok_or_else(|| null_at(2))?,
                table_hash: deformed(&values, &nulls, 3).ok_or_else(|| null_at(3))?,
                created_at: deformed(&values, &nulls, 4).ok_or_else(|| null_at(4))?,
                values,
                nulls,
                key_hashes: OnceCell::new(),
            })
        })
        .collect()
}

/// The type and table of the last log row a claim rendered: the rows of a window mostly share
/// them, and spelling them again for every row cost a sixth of rendering a single-row event.
#[derive(Default)]
struct Spelled {
    event_type: Rc<str>,
    source_name: String,
    /// `source_name` as a JSON string.
    table: String,
}

impl Spelled {
    fn event_type(&mut self, event_type: &str) -> Rc<str> {
        if *self.event_type != *event_type {
            self.event_type = Rc::from(event_type);
        }
        self.event_type.clone()
    }

    fn table(&mut self, source_name: &str) -> &str {
        if self.table.is_empty() || self.source_name != source_name {
            self.source_name.clear();
            self.source_name.push_str(source_name);
            self.table.clear();
            push_json_string(&mut self.table, source_name);
        }
        &self.table
    }
}

/// Column `ordinal` (1-based) of a deformed window row, None when NULL.
fn deformed<T: FromDatum>(values: &[pg_sys::Datum; WINDOW_COLUMNS], nulls: &[bool; WINDOW_COLUMNS], ordinal: usize) -> Option<T> {
    // SAFETY: the datum is of the column's type (the window queries fix it) and lives in
    // SPI's result, which outlives the row
    unsafe { T::from_datum(values[ordinal - 1], nulls[ordinal - 1]) }
}

/// Makes events of `subscription` pending again, as new (attempts 0).
pub fn add_pending(
    client: &mut SpiClient<'_>,
    extension: &Extension,
    subscription: i32,
    events: &[(i64, OrderKey, TimestampWithTimeZone)],
) -> Result<(), OutboxError> {
    let now = now();
    let mut batch = RetryBatch::default();
    for (id, key, created_at) in events {
        batch.push(*id, *key, *created_at, now);
    }
    batch.insert(client, extension, subscription, 0, None, None)
}

thread_local! {
    /// Where this transaction's WAL ended when its last claim returned, while claims are all
    /// the transaction has written.
    static CLAIMS_ONLY_UNTIL: Cell<Option<pg_sys::XLogRecPtr>> = const { Cell::new(None) };
    /// The window claim this backend made last in each subscription it claimed from.
    static LAST_CLAIMS: RefCell<Vec<(i32, ClaimSegment)>> = const { RefCell::new(Vec::new()) };
    /// What this backend leased retried events with, by (subscription, event): (attempts, lease
    /// end). A lease still running that is not in here is another hand-out's (see
    /// `policy::held_by_another`); an entry of a claim that rolled back matches no row. Entries
    /// stay after an ack or fail (which may roll back and be retried) until their lease ends.
    static RETRY_LEASES: RefCell<HashMap<(i32, i64), (i32, Micros)>> = RefCell::new(HashMap::new());
}

/// Beyond this many remembered leases, the ended ones are forgotten (a consumer that abandons
/// what it claims would otherwise grow the map without end).
const REMEMBERED_LEASES: usize = 65_536;

fn remember_leases(subscription: i32, leased: &[(i64, i32)], lease_end: Micros, now: Micros) {
    RETRY_LEASES.with(|l| {
        let mut leases = l.borrow_mut();
        if leases.len() + leased.len() > REMEMBERED_LEASES {
            leases.retain(|_, &mut (_, end)| end > now);
        }
        leases.extend(leased.iter().map(|&(id, attempts)| ((subscription, id), (attempts, lease_end))));
    });
}

/// A retry-table hand-out an ack or fail names (RETRY_HAND_OUTS).
struct RetryHandOut {
    id: i64,
    attempts: i32,
    key: OrderKey,
    created_at: TimestampWithTimeZone,
    /// A lease still running that another claim took: its holder settles it.
    held_by_another: bool,
    /// An ack from outside the hand-out has processed the event.
    processed: bool,
}

fn retry_hand_outs(
    client: &mut SpiClient<'_>,
    extension: &Extension,
    subscription: i32,
    ids: Vec<i64>,
    now: Micros,
) -> Result<Vec<RetryHandOut>, OutboxError> {
    let rows = run(client, extension, &q::RETRY_HAND_OUTS, &[subscription.into(), ids.into()])?;
    RETRY_LEASES.with(|l| {
        let leases = l.borrow();
        rows.into_iter()
            .map(|row| {
                let id: i64 = required(&row, 1)?;
                let attempts: i32 = required(&row, 2)?;
                let lease_end = micros_of(required(&row, 5)?);
                Ok(RetryHandOut {
                    id,
                    attempts,
                    key: OrderKey { key_hash: required(&row, 3)?, table_hash: required(&row, 4)? },
                    created_at: required(&row, 7)?,
                    held_by_another: held_by_another(leases.get(&(subscription, id)).copied(), attempts, lease_end, now),
                    processed: required(&row, 6)?,
                })
            })
            .collect()
    })
}

pub fn init() {
    unsafe { pg_sys::RegisterXactCallback(Some(on_xact_event), std::ptr::null_mut()) };
}

/// A claim made in a statement of its own (no transaction block), in a transaction that wrote
/// nothing else, commits without waiting for its WAL to reach disk (`synchronous_commit =
/// off` for that commit alone; `outbox.fast_claim_commits` turns this off). Claims of a
/// subscription take turns, and a turn lasts until commit: the flush was a third of each turn
/// with eight consumers. A crash can lose such a claim, which hands its events out again, as
/// for any claim in flight at a crash; the acks that follow it commit with a flush, which
/// writes the claim's commit first. A transaction that wrote anything else, as far as this
/// backend's WAL shows when this callback runs, keeps its setting: other libraries' callbacks
/// registered before this one run after it, so writes they make at pre-commit are not seen.
#[pg_guard]
unsafe extern "C-unwind" fn on_xact_event(event: pg_sys::XactEvent::Type, _arg: *mut std::ffi::c_void) {
    let claims_only_until = CLAIMS_ONLY_UNTIL.with(|c| c.take());
    if event == pg_sys::XactEvent::XACT_EVENT_PRE_COMMIT && claims_only_until == Some(unsafe { pg_sys::XactLastRecEnd }) {
        unsafe {
            pg_sys::set_config_option(
                c"synchronous_commit".as_ptr(),
                c"off".as_ptr(),
                pg_sys::GucContext::PGC_USERSET,
                pg_sys::GucSource::PGC_S_SESSION,
                pg_sys::GucAction::GUC_ACTION_LOCAL,
                true,
                0,
                false,
            )
        };
    }
}

/// Whether this claim may commit without a flush: a statement of its own, and claims wrote
/// all the WAL this transaction has written so far, if any.
fn claims_only_so_far() -> bool {
    let written = unsafe { pg_sys::XactLastRecEnd };
    guc::fast_claim_commits()
        && !unsafe { pg_sys::IsTransactionBlock() }
        && (written == 0 || CLAIMS_ONLY_UNTIL.with(Cell::get) == Some(written))
}

pub fn claim(batch_size: i32, subscription: &str, lease: &Interval, payloads: Payloads) -> Result<Vec<Claimed>, OutboxError> {
    let claims_only = claims_only_so_far();
    let claimed = claim_events(batch_size, subscription, lease, payloads)?;
    let until = claims_only.then(|| unsafe { pg_sys::XactLastRecEnd });
    CLAIMS_ONLY_UNTIL.with(|c| c.set(until));
    Ok(claimed)
}

fn claim_events(batch_size: i32, subscription: &str, lease: &Interval, payloads: Payloads) -> Result<Vec<Claimed>, OutboxError> {
    check_batch_size(batch_size)?;
    let lease_micros = interval_micros(lease);
    if lease_micros <= 0 {
        return Err(OutboxError::Lease(lease.to_string()));
    }
    let extension = Extension::current()?;
    let batch = batch_size as usize;
    Spi::connect_mut(|client| {
        let locked =
            run(client, &extension, q::LOCK_SUBSCRIPTION.pick(&extension), &[subscription.into(), is_worker().into(), caller().into()])?;
        let Some(row) = locked.into_iter().next() else {
            // unknown, one with a sink (which is the worker's), or one the caller may not consume:
            // not locked
            consumable_subscription(client, &extension, subscription)?;
            return Err(OutboxError::UnknownSubscription(subscription.to_string()));
        };
        // The lease runs from here: waiting for the lock behind another claim (one in an open
        // transaction, or prepared) must not use it up, or the events would go out again
        // while this consumer still works on them.
        let now = now();
        let expires = now.saturating_add(lease_micros);
        let sub: i32 = required(&row, 1)?;
        let options: pgrx::JsonB = required(&row, 2)?;
        let mut done_seq: i64 = required(&row, 3)?;
        let mut window_seq: i64 = required(&row, 4)?;
        let mut cursor: i64 = required(&row, 5)?;
        let bases: Vec<i64> = required(&row, 7)?;
        let xids: Vec<i64> = required(&row, 8)?;
        let mut floor = StraddleFloor { floor: required(&row, 6)?, marks: bases.into_iter().zip(xids).collect() };
        let window_xmin: i64 = required(&row, 9)?;
        let ctid: pg_sys::ItemPointerData = required(&row, 10)?;
        let mut done_snapshot: String = required(&row, 11)?;
        let mut window_snapshot: String = required(&row, 12)?;
        let saved_cursor = cursor;
        let policy = guc::retry_policy().with_overrides(&options.0)?;

        let mut open = open_claim_segments(client, &extension, sub, now)?;
        if open.iter().any(|c| c.expired) {
            rescue_expired(client, &extension, sub, &policy, now)?;
            open = open_claim_segments(client, &extension, sub, now)?;
        }
        let open = claim_rows(client, &extension, sub, &open)?;
        let mut blocked = rows_in_flight(client, &extension, sub, &open, batch)?;

        // The retry table first: it holds the oldest undelivered events.
        let mut claimed = Vec::with_capacity(batch);
        let state = single(run(client, &extension, &q::RETRY_STATE, &[sub.into(), timestamp(now).into()])?)?;
        let (has_retries, has_due_retries): (bool, bool) = (required(&state, 1)?, required(&state, 2)?);
        if required(&state, 3)? {
            run(client, &extension, &q::ENDED_PROCESSED_HAND_OUTS, &[sub.into(), timestamp(now).into()])?;
        }
        if has_due_retries {
            let candidates =
                run(client, &extension, &q::RETRY_CANDIDATES, &[sub.into(), timestamp(now).into(), batch_size.into()])?;
            let mut lease_ids = Vec::new();
            // A retry hand-out whose lease ran out is a failed delivery, counted when its event
            // is handed out again or buried (one still held back by its row is found again).
            // An event a rescue gave back (leased until then) was counted by the rescue.
            let mut expired = HashSet::new();
            let mut dead = Vec::new();
            for row in candidates {
                let id: i64 = required(&row, 1)?;
                let key = OrderKey { key_hash: required(&row, 2)?, table_hash: required(&row, 3)? };
                let attempts: i32 = required(&row, 4)?;
                let lease_expired: bool = required(&row, 5)?;
                let leased_by_retry_claim: bool = required(&row, 6)?;
                if lease_expired && policy.exhausted(attempts) {
                    dead.push(id);
                    continue;
                }
                if !blocked.blocks(key) {
                    lease_ids.push(id);
                    if leased_by_retry_claim {
                        expired.insert(id);
                    }
                }
                blocked.add(key);
            }
            bury_expired_retries(client, &extension, sub, dead, now)?;
            if !lease_ids.is_empty() {
                let leased = run(
                    client,
                    &extension,
                    &q::LEASE_RETRIES,
                    &[sub.into(), lease_ids.into(), timestamp(expires).into(), timestamp(now).into()],
                )?;
                let leased = leased
                    .into_iter()
                    .map(|row| Ok((required::<i64>(&row, 1)?, required::<i32>(&row, 2)?)))
                    .collect::<Result<Vec<_>, OutboxError>>()?;
                let failed = leased.iter().filter(|(id, _)| expired.contains(id)).count() as i64;
                if failed > 0 {
                    count_stats(client, &extension, sub, now, Stats { failed, ..Stats::default() })?;
                }
                remember_leases(sub, &leased, micros_of(timestamp(expires)), now);
                claimed.extend(leased.into_iter().map(|(id, attempts)| Claimed { id, attempts, event: None }));
            }
        }

        // Then the window, in id order, deferring events whose row is busy.
        let mut taken = EventBatch::default();
        let mut rendered = Vec::new();
        let mut spelled = Spelled::default();
        let mut deferred = RetryBatch::default();
        let mut advanced = false;
        let last_straddler = |done_seq: i64| done_seq + EVENTS_PER_ROW - 1;
        'window: while claimed.len() + taken.ids.len() < batch {
            let wanted = (batch - claimed.len() - taken.ids.len()) as i64;
            let straddling = cursor < last_straddler(done_seq);
            let rows = if straddling {
                run(
                    client,
                    &extension,
                    &q::STRADDLERS,
                    &[
                        done_seq.into(),
                        (cursor - EVENTS_PER_ROW).max(floor.floor).into(),
                        (wanted + 1).into(),
                        done_snapshot.as_str().into(),
                        window_snapshot.as_str().into(),
                    ],
                )?
            } else {
                let lower = done_seq.max(cursor - EVENTS_PER_ROW);
                run(client, &extension, &q::WINDOW_ROWS, &[lower.into(), window_seq.into(), (wanted + 1).into(), window_snapshot.as_str().into()])?
            };
            let rows = read_window_rows(rows)?;
            let fetched = rows.len() as i64;
            if has_retries && !rows.is_empty() {
                add_retry_blockers(client, &extension, sub, &rows, &mut blocked)?;
            }
            for row in &rows {
                let mut row_taken = Vec::new();
                let mut full = false;
                for ord in 1..=i64::from(row.n) {
                    let id = row.base + ord - 1;
                    if id <= cursor {
                        continue;
                    }
                    if claimed.len() + taken.ids.len() == batch {
                        full = true;
                        break;
                    }
                    let key = OrderKey { key_hash: row.key_hashes()?[(ord - 1) as usize], table_hash: row.table_hash };
                    if blocked.blocks(key) {
                        deferred.push(id, key, row.created_at, now);
                    } else {
                        taken.push(id, key, row.created_at);
                        row_taken.push(ord as usize);
                    }
                    blocked.add(key);
                    cursor = id;
                }
                if payloads == Payloads::Render && !row_taken.is_empty() {
                    row.render(&row_taken, &mut spelled, &mut rendered)?;
                }
                if full {
                    break 'window;
                }
            }
            if fetched > wanted {
                continue;
            }
            // fewer rows than asked for: this part of the window is used up
            if straddling {
                cursor = cursor.max(last_straddler(done_seq));
            } else if advanced {
                break;
            } else {
                let next = single(run(client, &extension, &q::NEXT_WINDOW, &[extension.event_id_seq.into()])?)?;
                // the new window's last base is the mark's, read before its xid, as
                // StraddleFloor requires
                let mark_xid = unsafe { pg_sys::ReadNextFullTransactionId() }.value as i64;
                done_seq = window_seq;
                window_seq = required(&next, 2)?;
                floor.close_window(window_xmin, (window_seq, mark_xid));
                done_snapshot = std::mem::replace(&mut window_snapshot, required(&next, 1)?);
                cursor = 0;
                advanced = true;
            }
        }

        deferred.insert(client, &extension, sub, 0, None, None)?;
        if !taken.ids.is_empty() {
            debug_assert!(payloads == Payloads::Skip || rendered.len() == taken.ids.len(), "an event per id");
            let mut rendered = rendered.into_iter();
            claimed.extend(taken.ids.iter().map(|&id| Claimed { id, attempts: 1, event: rendered.next() }));
            let recorded = run(
                client,
                &extension,
                &q::RECORD_CLAIM,
                &[
                    sub.into(),
                    timestamp(now).into(),
                    timestamp(expires).into(),
                    int8s(&taken.ids),
                    int8s(&taken.key_hashes),
                    int8s(&taken.table_hashes),
                    timestamps(&taken.created_ats),
                ],
            )?;
            let recorded = single(recorded)?;
            let made = ClaimSegment { claim_id: required(&recorded, 1)?, slot: required(&recorded, 2)?, expired: false };
            LAST_CLAIMS.with(|l| {
                let mut last = l.borrow_mut();
                last.retain(|(s, _)| *s != sub);
                last.push((sub, made));
            });
        }
        // one write of the row a claim: the window it opened with its cursor, or the cursor
        let saved = if advanced {
            let (bases, xids): (Vec<i64>, Vec<i64>) = floor.marks.iter().copied().unzip();
            Some(run(
                client,
                &extension,
                q::SAVE_WINDOW.pick(&extension),
                &[
                    sub.into(),
                    ctid.into(),
                    window_snapshot.as_str().into(),
                    window_seq.into(),
                    cursor.into(),
                    floor.floor.into(),
                    bases.into(),
                    xids.into(),
                ],
            )?)
        } else if cursor != saved_cursor {
            Some(run(client, &extension, &q::SAVE_CURSOR, &[sub.into(), ctid.into(), cursor.into()])?)
        } else {
            None
        };
        // the row lock keeps the row where LOCK_SUBSCRIPTION found it
        if saved.is_some_and(|updated| updated.is_empty()) {
            return Err(OutboxError::SubscriptionRowMoved(subscription.to_string()));
        }
        if payloads == Payloads::Render {
            render_retries(client, &extension, sub, &mut claimed)?;
        }
        claimed.sort_unstable_by_key(|c| c.id);
        Ok(claimed)
    })
}

/// Renders the events that came from the retry table (the claim has not read their log rows);
/// those requeued from the dead letters carry their own copy.
fn render_retries(
    client: &mut SpiClient<'_>,
    extension: &Extension,
    subscription: i32,
    claimed: &mut [Claimed],
) -> Result<(), OutboxError> {
    let ids: Vec<i64> = claimed.iter().filter(|c| c.event.is_none()).map(|c| c.id).collect();
    if ids.is_empty() {
        return Ok(());
    }
    let mut events = IdMap::with_capacity_and_hasher(ids.len(), Default::default());
    for row in run(client, extension, &q::RETRY_COPIES, &[subscription.into(), ids.as_slice().into()])? {
        let event_type: String = required(&row, 2)?;
        events.insert(required::<i64>(&row, 1)?, Event { event_type: Rc::from(event_type), payload: required(&row, 3)?, created_at: required(&row, 4)? });
    }
    // the ordinals wanted of each log row, by base (ids are base + ordinal - 1)
    let mut wanted: BTreeMap<i64, Vec<usize>> = BTreeMap::new();
    for &id in ids.iter().filter(|id| !events.contains_key(id)) {
        let ordinal = (id - 1).rem_euclid(EVENTS_PER_ROW) + 1;
        wanted.entry(id - ordinal + 1).or_default().push(ordinal as usize);
    }
    if !wanted.is_empty() {
        let bases: Vec<i64> = wanted.keys().copied().collect();
        let rows = read_window_rows(run(client, extension, &q::LOG_ROWS, &[bases.into()])?)?;
        let mut spelled = Spelled::default();
        let mut rendered = Vec::new();
        for row in &rows {
            let Some(ordinals) = wanted.get_mut(&row.base) else { continue };
            // an ordinal past the row's events names no event, as an id whose row is gone
            ordinals.retain(|&ordinal| ordinal <= row.n as usize);
            ordinals.sort_unstable();
            rendered.clear();
            row.render(ordinals, &mut spelled, &mut rendered)?;
            for (&ordinal, event) in ordinals.iter().zip(rendered.drain(..)) {
                events.insert(row.base + ordinal as i64 - 1, event);
            }
        }
    }
    for c in claimed.iter_mut().filter(|c| c.event.is_none()) {
        c.event = events.remove(&c.id);
    }
    Ok(())
}

fn has_retries(client: &mut SpiClient<'_>, extension: &Extension, subscription: i32) -> Result<bool, OutboxError> {
    Ok(run(client, extension, &q::HAS_RETRIES, &[subscription.into()])?.first().get::<bool>(1)?.unwrap_or(false))
}

/// Adds the pending retries that hold back these log rows' events.
fn add_retry_blockers(
    client: &mut SpiClient<'_>,
    extension: &Extension,
    subscription: i32,
    rows: &[WindowRow<'_>],
    blocked: &mut Blocked,
) -> Result<(), OutboxError> {
    // a row event waits for its row and for a TRUNCATE of its table; a TRUNCATE (whose key is
    // its table) for anything of its table, which only then needs reading
    let (mut keys, mut truncated) = (Vec::new(), Vec::new());
    for row in rows {
        let hashes = row.key_hashes()?;
        if hashes.contains(&row.table_hash) {
            truncated.push(row.table_hash);
        }
        keys.extend_from_slice(hashes);
        keys.push(row.table_hash);
    }
    for hashes in [&mut keys, &mut truncated] {
        hashes.sort_unstable();
        hashes.dedup();
    }
    let found = run(client, extension, &q::RETRY_BLOCKERS, &[subscription.into(), keys.into(), truncated.into()])?;
    for row in found {
        blocked.add(OrderKey { key_hash: required(&row, 1)?, table_hash: required(&row, 2)? });
    }
    Ok(())
}

fn wanted_ids(ids: Option<Vec<Option<i64>>>) -> Result<IdSet, OutboxError> {
    Ok(ids.ok_or(OutboxError::NullArgument("ids"))?.into_iter().flatten().collect())
}

/// An open window claim holding some of the ids an ack or fail names.
struct Holding {
    claim: OpenClaim,
    /// Indexes of its unresolved events among the ids named.
    hits: Vec<usize>,
    /// Indexes of its other unresolved events.
    left: Vec<usize>,
}

/// The open window claims holding any of `wanted`, locked.
fn claims_holding(
    client: &mut SpiClient<'_>,
    extension: &Extension,
    subscription: i32,
    wanted: &IdSet,
    now: Micros,
) -> Result<Vec<Holding>, OutboxError> {
    // Claims hand out ids in runs, so another consumer's claim rarely has an id in this range.
    let (lowest, highest) = (wanted.iter().min().copied(), wanted.iter().max().copied());
    let (Some(lowest), Some(highest)) = (lowest, highest) else { return Ok(Vec::new()) };
    // A consumer mostly acks what its own last claim handed out. A window claim hands out an
    // id once and no other window claim ever holds it, so a claim holding every id wanted is
    // the only holder, and the other open claims need not be read (with eight consumers they
    // were most of what an ack read).
    let last = LAST_CLAIMS.with(|l| l.borrow().iter().find(|(s, _)| *s == subscription).map(|(_, c)| *c));
    if let Some(last) = last {
        if let Some(row) = claim_rows(client, extension, subscription, &[last])?.first() {
            let ids = ledger_array(row, 4, last.claim_id, "event_ids")?.elements();
            // (a claim that spans a window advance holds its stragglers' lower ids last)
            if ids.iter().filter(|id| wanted.contains(id)).count() == wanted.len() {
                return lock_holding(client, extension, subscription, wanted, vec![read_claim(row)?]);
            }
        }
    }
    // Only the ids of each claim are read to find the holders; the rest stays undecoded.
    let open = open_claim_segments(client, extension, subscription, now)?;
    let mut candidates = Vec::new();
    for row in claim_rows(client, extension, subscription, &open)? {
        let claim: i64 = required(&row, 1)?;
        let ids = ledger_array(&row, 4, claim, "event_ids")?;
        if ids.elements().iter().any(|id| (lowest..=highest).contains(id) && wanted.contains(id)) {
            candidates.push(row);
        }
    }
    let candidates = candidates.iter().map(read_claim).collect::<Result<Vec<_>, _>>()?;
    lock_holding(client, extension, subscription, wanted, candidates)
}

/// Locks the `candidates` still open that hold unresolved events among `wanted`.
fn lock_holding(
    client: &mut SpiClient<'_>,
    extension: &Extension,
    subscription: i32,
    wanted: &IdSet,
    mut candidates: Vec<OpenClaim>,
) -> Result<Vec<Holding>, OutboxError> {
    // locked in claim order, as a claim rescuing expired claims locks them (EXPIRED_CLAIMS)
    candidates.sort_unstable_by_key(|claim| claim.claim_id);
    let mut holding = Vec::new();
    for claim in candidates {
        // an ack or fail of the rest of it may have closed it meanwhile
        let locked = run(client, extension, &q::LOCK_CLAIM, &[subscription.into(), claim.claim_id.into()])?;
        let Some(locked) = locked.into_iter().next() else { continue };
        let claim = OpenClaim { open_count: required(&locked, 1)?, ..claim };
        let (hits, left): (Vec<usize>, Vec<usize>) =
            unresolved(client, extension, subscription, &claim)?.into_iter().partition(|&i| wanted.contains(&claim.event_ids[i]));
        if !hits.is_empty() {
            holding.push(Holding { claim, hits, left });
        }
    }
    Ok(holding)
}

pub fn ack(ids: Option<Vec<Option<i64>>>, subscription: &str) -> Result<i32, OutboxError> {
    let wanted = wanted_ids(ids)?;
    let extension = Extension::current()?;
    Spi::connect_mut(|client| ack_in(client, &extension, wanted, subscription))
}

/// Acks `ids` in `subscription`; returns how many were newly processed.
pub fn ack_in(
    client: &mut SpiClient<'_>,
    extension: &Extension,
    ids: impl IntoIterator<Item = i64>,
    subscription: &str,
) -> Result<i32, OutboxError> {
    let mut wanted: IdSet = ids.into_iter().collect();
    let (sub, _) = consumable_subscription(client, extension, subscription)?;
    if wanted.is_empty() {
        return Ok(0);
    }
    let now = now();
    let age = |created_at: TimestampWithTimeZone| (now - micros_of(created_at)) as f64 / 1e6;
    let mut stats = Stats::default();
    for holding in claims_holding(client, extension, sub, &wanted, now)? {
        let Holding { claim, hits, .. } = &holding;
        let ids = hits.iter().map(|&i| claim.event_ids[i]).collect();
        record_resolution(client, extension, sub, Some(claim.claim_id), "a", ids, now)?;
        settle(client, extension, sub, &holding)?;
        for &i in hits {
            stats.acked_after(age(claim.created_ats[i]));
            // an event handed out by a window claim has no leased retry
            wanted.remove(&claim.event_ids[i]);
        }
    }
    let mut retried = Vec::new();
    if !wanted.is_empty() && has_retries(client, extension, sub)? {
        // An event another claim has taken over is processed all the same, but that hand-out
        // stays in flight, holding its row back, until its holder settles it or its lease ends.
        let (mut settled, mut taken_over) = (Vec::new(), Vec::new());
        for hand_out in retry_hand_outs(client, extension, sub, wanted.into_iter().collect(), now)? {
            if !hand_out.processed {
                retried.push(hand_out.id);
                stats.acked_after(age(hand_out.created_at));
            }
            match (hand_out.held_by_another, hand_out.processed) {
                (false, _) => settled.push(hand_out.id),
                (true, false) => taken_over.push(hand_out.id),
                (true, true) => {}
            }
        }
        for (sql, ids) in [(&q::DROP_RETRIES, settled), (&q::PROCESSED_IN_FLIGHT, taken_over)] {
            if !ids.is_empty() {
                run(client, extension, sql, &[sub.into(), ids.into()])?;
            }
        }
    }
    if !retried.is_empty() {
        record_resolution(client, extension, sub, None, "a", retried, now)?;
    }
    let acked = stats.acked as i32;
    if acked > 0 {
        count_stats(client, extension, sub, now, stats)?;
    }
    Ok(acked)
}

pub fn fail(
    ids: Option<Vec<Option<i64>>>,
    error: Option<&str>,
    subscription: &str,
    retry_after: Option<&Interval>,
) -> Result<i32, OutboxError> {
    let wanted = wanted_ids(ids)?;
    let retry_after = match retry_after {
        Some(interval) if interval_micros(interval) < 0 => return Err(OutboxError::NegativeInterval("retry_after", interval.to_string())),
        Some(interval) => Some(interval_micros(interval)),
        None => None,
    };
    let extension = Extension::current()?;
    Spi::connect_mut(|client| fail_in(client, &extension, wanted, error, subscription, retry_after, true))
}

/// Fails `ids` in `subscription`: they are delivered again after `retry_after` (microseconds)
/// or the backoff. A `counted` failure uses up an attempt and may dead-letter the event; an
/// uncounted one (the sink was down, or the worker restarted) gives the hand-out back.
pub fn fail_in(
    client: &mut SpiClient<'_>,
    extension: &Extension,
    ids: impl IntoIterator<Item = i64>,
    error: Option<&str>,
    subscription: &str,
    retry_after: Option<i64>,
    counted: bool,
) -> Result<i32, OutboxError> {
    let wanted: IdSet = ids.into_iter().collect();
    let (sub, options) = consumable_subscription(client, extension, subscription)?;
    if wanted.is_empty() {
        return Ok(0);
    }
    let policy = guc::retry_policy().with_overrides(&options.0)?;
    let now = now();
    let retry_at = |attempts: i32| {
        let delay = retry_after.unwrap_or_else(|| policy.backoff(attempts.max(1), random_unit()).as_micros() as i64);
        now.saturating_add(delay)
    };
    let exhausted = |attempts: i32| counted && policy.exhausted(attempts);
    let mut failed = 0i64;
    let mut dead = Vec::new();

    // events of window claims have been handed out once
    let mut later = RetryBatch::default();
    for holding in claims_holding(client, extension, sub, &wanted, now)? {
        let Holding { claim, hits, .. } = &holding;
        let ids = hits.iter().map(|&i| claim.event_ids[i]).collect();
        record_resolution(client, extension, sub, Some(claim.claim_id), "f", ids, now)?;
        settle(client, extension, sub, &holding)?;
        failed += hits.len() as i64;
        for &i in hits {
            if exhausted(1) {
                dead.push(Dead { id: claim.event_ids[i], attempts: 1, key: claim.order_key(i) });
            } else {
                later.push(claim.event_ids[i], claim.order_key(i), claim.created_ats[i], retry_at(1));
            }
        }
    }
    later.insert(client, extension, sub, if counted { 1 } else { 0 }, None, error)?;

    let mut again = (Vec::new(), Vec::new());
    let mut ended = Vec::new();
    for hand_out in retry_hand_outs(client, extension, sub, wanted.into_iter().collect(), now)? {
        let RetryHandOut { id, attempts, key, .. } = hand_out;
        // A counted failure is a consumer's, which may be one whose lease expired before the
        // event was handed out again; an uncounted one is the delivery worker's, which owns
        // every hand-out of its subscription.
        if hand_out.held_by_another && counted {
            continue;
        }
        if hand_out.processed {
            ended.push(id);
            continue;
        }
        failed += 1;
        if exhausted(attempts) {
            dead.push(Dead { id, attempts, key });
        } else {
            again.0.push(id);
            again.1.push(timestamp(retry_at(attempts)));
        }
    }
    if !ended.is_empty() {
        run(client, extension, &q::DROP_RETRIES, &[sub.into(), ended.into()])?;
    }
    if !again.0.is_empty() {
        let given_back = if counted { 0 } else { 1 };
        run(client, extension, &q::RETRY_LATER, &[sub.into(), again.0.into(), again.1.into(), error.into(), given_back.into()])?;
    }
    bury(client, extension, sub, dead, error, now)?;
    if failed > 0 {
        count_stats(client, extension, sub, now, Stats { failed, ..Stats::default() })?;
    }
    Ok(failed as i32)
}

/// Gives back, uncounted, every event of `subscription` that is in flight: a worker that
/// starts owns nothing its predecessor claimed.
pub fn recover_in(client: &mut SpiClient<'_>, extension: &Extension, subscription: &str) -> Result<i32, OutboxError> {
    let (sub, _) = subscription_by_name(client, extension, subscription)?;
    let mut ids = Vec::new();
    let open = open_claim_segments(client, extension, sub, now())?;
    for row in claim_rows(client, extension, sub, &open)? {
        let claim = read_claim(&row)?;
        ids.extend(unresolved(client, extension, sub, &claim)?.into_iter().map(|i| claim.event_ids[i]));
    }
    for row in run(client, extension, &q::IN_FLIGHT_RETRIES, &[sub.into()])? {
        ids.push(required(&row, 1)?);
    }
    fail_in(client, extension, ids, Some("delivery worker restarted"), subscription, Some(0), false)
}
