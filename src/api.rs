//! The SQL-callable functions. Each wrapper only converts arguments and raises errors; the
//! work is in the modules it calls. Parameter names are part of the contract (named notation).
//!
//! Consumer and admin functions are SECURITY DEFINER with a pinned search_path, so callers
//! need EXECUTE on them and nothing on the tables. `outbox_attach`/`outbox_detach` run as the
//! caller, who must own the table, and act as the extension owner only after that check.

use pgrx::datum::{Interval, TimestampWithTimeZone};
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

/// Claims and renders the events, as one row of arrays: a set-returning function is called
/// once per row, and each call would apply and undo the pinned search_path again.
/// `outbox_claim` (SQL) unnests them and casts the payloads to jsonb.
#[pg_extern(volatile, parallel_unsafe)]
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
            Some(e) => (Some(e.event_type), Some(e.payload), Some(e.created_at)),
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
    admin::purge().or_raise()
}
