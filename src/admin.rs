//! Subscriptions, replay, requeue and retention.

use std::time::Duration;

use pgrx::datum::TimestampWithTimeZone;
use pgrx::pg_sys;
use pgrx::prelude::*;
use serde_json::Value;

use crate::consume::{add_pending, now, required, single, subscription_by_name, timestamp};
use crate::metrics::{Retention, SubscriptionMetrics};
use crate::ordering::OrderKey;
use crate::error::OutboxError;
use crate::ext::Extension;
use crate::guc;
use crate::policy::SubscriptionOptions;
use crate::sink::Sink;
use crate::queries::{self as q, run};

/// Segments of the log and ledger; retention empties whole segments.
pub const SEGMENTS: i16 = 8;

fn check_subscription_name(name: &str) -> Result<(), OutboxError> {
    let invalid = |why| Err(OutboxError::InvalidSubscriptionName(name.to_string(), why));
    if name.trim().is_empty() {
        return invalid("it must not be empty");
    }
    if name.chars().count() > 128 {
        return invalid("it must be at most 128 characters");
    }
    if name.chars().any(char::is_control) {
        return invalid("it must not contain control characters");
    }
    Ok(())
}

pub fn subscribe(name: &str, sink: &str, options: &Value, from_start: bool) -> Result<(), OutboxError> {
    check_subscription_name(name)?;
    // A subscription starts at the snapshot it is made with, and purges are held off from the
    // lock below on: under REPEATABLE READ that snapshot is the transaction's, taken before
    // it, and a purge in between emptied events committed after it, which were this one's.
    if unsafe { pg_sys::XactIsoLevel } >= pg_sys::XACT_REPEATABLE_READ as i32 {
        return Err(OutboxError::NeedsReadCommitted("outbox_subscribe"));
    }
    let parsed = Sink::parse(sink, options)?;
    SubscriptionOptions::parse(options)?;
    let extension = Extension::current()?;
    // A purge decides what no subscription needs with a snapshot that cannot see a
    // subscription whose transaction is still open: hold purges off until this one commits
    // (and wait for one under way), so that the events it is to see are not dropped under it.
    unsafe { pg_sys::LockRelationOid(extension.rotation, pg_sys::RowShareLock as pg_sys::LOCKMODE) };
    let consumer_role = match crate::sink::consumer_role(options)? {
        Some(role) => {
            let oid = std::ffi::CString::new(role).map_or(pg_sys::InvalidOid, |name| unsafe { pg_sys::get_role_oid(name.as_ptr(), true) });
            if oid == pg_sys::InvalidOid {
                return Err(OutboxError::InvalidOptions(format!("consumer_role: role \"{role}\" does not exist")));
            }
            Some(oid)
        }
        None => None,
    };
    Spi::connect_mut(|client| {
        let function_owner = match &parsed {
            Sink::Function { function, .. } => {
                let Some(target) = run(client, &extension, &q::FUNCTION_SINK, &[function.as_str().into()])?.into_iter().next() else {
                    return Err(OutboxError::InvalidOptions(format!("function {function}(jsonb) does not exist")));
                };
                // The worker calls it as its owner, so only its owner may have it called: EXECUTE
                // alone would let a caller run a function as a more privileged owner. The owner is
                // recorded, and the worker calls only a function that still has it.
                let owner: pg_sys::Oid = required(&target, 2)?;
                if !unsafe { pg_sys::has_privs_of_role(pg_sys::GetOuterUserId(), owner) } {
                    return Err(OutboxError::NotFunctionOwner(function.clone()));
                }
                Some(owner)
            }
            _ => None,
        };
        let created = run(
            client,
            &extension,
            q::SUBSCRIBE.pick(&extension),
            &[name.into(), sink.into(), pgrx::JsonB(options.clone()).into(), from_start.into(), extension.event_id_seq.into()],
        )?;
        if created.is_empty() {
            return Err(OutboxError::DuplicateSubscription(name.to_string()));
        }
        // (a database still on an older release's SQL gets them from ALTER EXTENSION UPDATE)
        if extension.records_roles && (function_owner.is_some() || consumer_role.is_some()) {
            run(client, &extension, &q::RECORD_ROLES, &[name.into(), function_owner.into(), consumer_role.into()])?;
        }
        if extension.records_start && !from_start {
            run(client, &extension, &q::RECORD_START, &[name.into()])?;
        }
        if parsed != Sink::Pull {
            crate::worker::wake_at_commit(crate::worker::Wake::Subscriptions);
        }
        Ok(())
    })
}

/// Locks the subscription named, or every one, as claims do (see LOCK_SUBSCRIPTIONS); returns
/// the first one's id, if any.
fn lock_subscriptions(client: &mut pgrx::spi::SpiClient<'_>, extension: &Extension, name: Option<&str>) -> Result<Option<i32>, OutboxError> {
    let locked = run(client, extension, &q::LOCK_SUBSCRIPTIONS, &[name.into()])?;
    locked.into_iter().next().map(|row| required(&row, 1)).transpose()
}

fn lock_subscription(client: &mut pgrx::spi::SpiClient<'_>, extension: &Extension, name: &str) -> Result<i32, OutboxError> {
    lock_subscriptions(client, extension, Some(name))?.ok_or_else(|| OutboxError::UnknownSubscription(name.to_string()))
}

pub fn unsubscribe(name: &str) -> Result<(), OutboxError> {
    let extension = Extension::current()?;
    Spi::connect_mut(|client| {
        // Locked first, so that the delivery state is deleted with a snapshot taken after a claim
        // that held the lock committed (deleted together, its new claim was left behind, and kept
        // its log segment from ever being retired). A fail committing meanwhile can still leave
        // a retry behind; retention deletes such orphans.
        let id = lock_subscription(client, &extension, name)?;
        run(client, &extension, &q::UNSUBSCRIBE, &[id.into()])?;
        Ok(())
    })
}

/// The events `outbox_replay` would make deliverable again, with what re-queuing needs.
fn replay_candidates(
    client: &mut pgrx::spi::SpiClient<'_>,
    extension: &Extension,
    subscription: i32,
    since: Option<TimestampWithTimeZone>,
    ids: Option<Vec<i64>>,
) -> Result<Vec<(i64, OrderKey, TimestampWithTimeZone)>, OutboxError> {
    run(client, extension, &q::REPLAY_CANDIDATES, &[subscription.into(), since.into(), ids.into()])?
        .into_iter()
        .map(|row| {
            let key = OrderKey { key_hash: required(&row, 2)?, table_hash: required(&row, 3)? };
            Ok((required(&row, 1)?, key, required(&row, 4)?))
        })
        .collect()
}

fn replay_selection(since: Option<TimestampWithTimeZone>, ids: Option<Vec<Option<i64>>>) -> Result<Option<Vec<i64>>, OutboxError> {
    if since.is_none() && ids.is_none() {
        return Err(OutboxError::ReplayWithoutSelection);
    }
    Ok(ids.map(|ids| ids.into_iter().flatten().collect()))
}

pub fn replay(
    subscription: &str,
    since: Option<TimestampWithTimeZone>,
    ids: Option<Vec<Option<i64>>>,
) -> Result<i64, OutboxError> {
    let ids = replay_selection(since, ids)?;
    let extension = Extension::current()?;
    Spi::connect_mut(|client| {
        // Locked as a claim locks it: the candidates leave out events whose row has a newer one
        // in flight, which only committed claims show, and a claim must see the replayed
        // events as pending, not hand out a newer event of their row before them.
        let sub = lock_subscription(client, &extension, subscription)?;
        let events = replay_candidates(client, &extension, sub, since, ids)?;
        add_pending(client, &extension, sub, &events)?;
        Ok(events.len() as i64)
    })
}

/// The ids `outbox_replay` would touch, for tools that confirm or chunk a large replay.
pub fn replayable(
    subscription: &str,
    since: Option<TimestampWithTimeZone>,
    ids: Option<Vec<Option<i64>>>,
) -> Result<Vec<i64>, OutboxError> {
    let ids = replay_selection(since, ids)?;
    let extension = Extension::current()?;
    Spi::connect_mut(|client| {
        let (sub, _) = subscription_by_name(client, &extension, subscription)?;
        Ok(replay_candidates(client, &extension, sub, since, ids)?.into_iter().map(|(id, _, _)| id).collect())
    })
}

pub fn purge_dead_letters(older_than: &pgrx::datum::Interval, subscription: Option<&str>) -> Result<i64, OutboxError> {
    let age = crate::consume::interval_micros(older_than);
    if age < 0 {
        return Err(OutboxError::NegativeInterval("older_than", older_than.to_string()));
    }
    let extension = Extension::current()?;
    Spi::connect_mut(|client| {
        if let Some(name) = subscription {
            subscription_by_name(client, &extension, name)?;
        }
        // an age reaching before the first representable time leaves nothing older than it
        // (read as infinity, the cutoff took every dead letter)
        let Ok(cutoff) = TimestampWithTimeZone::try_from(now().saturating_sub(age)) else { return Ok(0) };
        Ok(run(client, &extension, &q::PURGE_DEAD_LETTERS, &[cutoff.into(), subscription.into()])?.first().get::<i64>(1)?.unwrap_or(0))
    })
}

/// `outbox_metrics()`: the Prometheus text exposition of every subscription.
pub fn metrics() -> Result<String, OutboxError> {
    let extension = Extension::current()?;
    let (subscriptions, worker_up, oldest_retained) = Spi::connect_mut(|client| {
        let worker = single(run(client, &extension, &q::WORKER_STATE, &[])?)?;
        let has_sinks: bool = required(&worker, 1)?;
        let worker_up = has_sinks.then_some(required::<bool>(&worker, 2)?);
        let subscriptions = run(client, &extension, &q::METRICS, &[])?
            .into_iter()
            .map(|row| {
                Ok(SubscriptionMetrics {
                    subscription: required(&row, 1)?,
                    pending: required(&row, 2)?,
                    in_flight: required(&row, 3)?,
                    retrying: required(&row, 4)?,
                    dead: required(&row, 5)?,
                    oldest_pending_age_seconds: required(&row, 6)?,
                    delivered_total: required(&row, 7)?,
                    failures_total: required(&row, 8)?,
                    dead_lettered_total: required(&row, 9)?,
                    latency_sum_seconds: required(&row, 10)?,
                    latency_buckets: required(&row, 11)?,
                    sink_up: row.get::<bool>(12)?,
                })
            })
            .collect::<Result<Vec<_>, OutboxError>>()?;
        let oldest_retained = run(client, &extension, &q::OLDEST_RETAINED, &[])?.into_iter().next().map(|row| required::<f64>(&row, 1)).transpose()?;
        Ok::<_, OutboxError>((subscriptions, worker_up, oldest_retained))
    })?;
    let retention = Retention { seconds: guc::retention().as_secs_f64(), oldest_retained_age_seconds: oldest_retained.unwrap_or(0.0).max(0.0) };
    Ok(crate::metrics::render(&subscriptions, worker_up, Some(&retention)))
}

pub fn requeue_dead(subscription: Option<&str>, ids: Option<Vec<Option<i64>>>) -> Result<i64, OutboxError> {
    let ids: Option<Vec<i64>> = ids.map(|ids| ids.into_iter().flatten().collect());
    let extension = Extension::current()?;
    Spi::connect_mut(|client| {
        // for the reason replay locks it
        let locked = lock_subscriptions(client, &extension, subscription)?;
        if let (Some(name), None) = (subscription, locked) {
            return Err(OutboxError::UnknownSubscription(name.to_string()));
        }
        let table = run(client, &extension, &q::REQUEUE_DEAD, &[subscription.into(), ids.into(), timestamp(now()).into()])?;
        Ok(table.first().get::<i64>(1)?.unwrap_or(0))
    })
}

/// What a retention pass did, and when the next one has work to do.
pub struct Purged {
    pub removed: i64,
    /// Until the current segment is due to rotate or a segment's last event passes the
    /// retention, whichever comes first; `None` when neither lies ahead (nothing written yet,
    /// or another purge was running).
    pub next_due: Option<Duration>,
}

/// Empties every segment whose events are all processed by every subscription and older
/// than `outbox.retention`, then starts a new segment when the current one is a quarter of
/// the retention old. Removes nothing while another purge runs or a subscription is being
/// created, as the worker will purge again.
pub fn purge() -> Result<Purged, OutboxError> {
    // Deciding that a segment is unused needs a fresh snapshot after its lock is taken.
    if unsafe { pg_sys::XactIsoLevel } >= pg_sys::XACT_REPEATABLE_READ as i32 {
        return Err(OutboxError::NeedsReadCommitted("outbox_purge"));
    }
    let extension = Extension::current()?;
    // Not waiting: the worker purges between deliveries, and a subscription may be created in
    // a long transaction (see subscribe).
    if !unsafe { pg_sys::ConditionalLockRelationOid(extension.rotation, pg_sys::ExclusiveLock as pg_sys::LOCKMODE) } {
        pgrx::notice!("outbox_purge: skipped, another purge is running or a subscription is being created");
        return Ok(Purged { removed: 0, next_due: None });
    }
    let now = now();
    let retention = guc::retention().as_micros() as i64;
    let cutoff = timestamp(now - retention);
    Spi::connect_mut(|client| {
        let rotation = single(run(client, &extension, &q::LOCK_ROTATION, &[])?)?;
        let current: i16 = required(&rotation, 1)?;
        let switched_at: TimestampWithTimeZone = required(&rotation, 2)?;
        run(client, &extension, &q::DELETE_ORPHANS, &[])?;
        let in_use = |client: &mut pgrx::spi::SpiClient<'_>, slot: i16| -> Result<bool, OutboxError> {
            Ok(run(client, &extension, &q::SEGMENT_IN_USE, &[slot.into()])?.first().get::<bool>(1)?.unwrap_or(true))
        };
        let retirable = |client: &mut pgrx::spi::SpiClient<'_>, slot: i16| -> Result<bool, OutboxError> {
            let table = run(client, &extension, &q::SEGMENT_RETIRABLE, &[slot.into(), cutoff.into()])?;
            Ok(table.first().get::<bool>(1)?.unwrap_or(false))
        };

        let mut removed = 0i64;
        for slot in (0..SEGMENTS).filter(|&s| s != current) {
            if !in_use(client, slot)? || !retirable(client, slot)? {
                continue;
            }
            let tables = single(run(client, &extension, &q::SEGMENT_TABLES, &[slot.into()])?)?;
            let names: String = required(&tables, 1)?;
            let log: pg_sys::Oid = required(&tables, 2)?;
            let ledger: pg_sys::Oid = required(&tables, 3)?;
            // a writer still inserting into the segment holds a lock: try again next time
            let locked = unsafe {
                pg_sys::ConditionalLockRelationOid(log, pg_sys::AccessExclusiveLock as i32)
                    && pg_sys::ConditionalLockRelationOid(ledger, pg_sys::AccessExclusiveLock as i32)
            };
            if !locked {
                // A transaction that read or wrote the segment holds it until it ends (a session
                // idle in a transaction after reading outbox_backlog, an open or prepared writer),
                // and until then retention stalls at it (outbox_oldest_retained_age_seconds).
                pgrx::notice!("outbox_purge: segment {slot} is due but another transaction is using it; it is emptied once that transaction ends");
                continue;
            }
            if !retirable(client, slot)? {
                continue;
            }
            removed += run(client, &extension, &q::SEGMENT_EVENTS, &[slot.into()])?.first().get::<i64>(1)?.unwrap_or(0);
            client.update(format!("TRUNCATE {names}").as_str(), None, &[])?;
        }

        let rotation_period = retention / 4;
        let age = now - pg_sys::TimestampTz::from(switched_at);
        let next = (current + 1) % SEGMENTS;
        let (current, switched_at) = if age >= rotation_period && in_use(client, current)? && !in_use(client, next)? {
            run(client, &extension, &q::ROTATE, &[next.into(), timestamp(now).into()])?;
            crate::capture::forget_segment();
            (next, now)
        } else {
            (current, pg_sys::TimestampTz::from(switched_at))
        };
        run(client, &extension, &q::FOLD_STATS, &[timestamp(now - 3_600_000_000).into()])?;

        // Purging on a fixed interval left each segment up to an interval past its due time,
        // and the outbox that much larger (#5's held-xmin run).
        // (saturating: the rotation row's time may be set to 'infinity' by hand)
        let mut dues = vec![switched_at.saturating_add(rotation_period)];
        for slot in (0..SEGMENTS).filter(|&s| s != current) {
            let last = run(client, &extension, &q::SEGMENT_LAST_WRITE, &[slot.into()])?.first().get::<TimestampWithTimeZone>(1)?;
            dues.extend(last.map(|at| pg_sys::TimestampTz::from(at).saturating_add(retention)));
        }
        let next_due = dues.into_iter().filter(|&due| due > now).min().map(|due| Duration::from_micros((due - now) as u64));
        Ok(Purged { removed, next_due })
    })
}
