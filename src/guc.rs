//! Every setting of the extension, registered once in `init()` and read through typed
//! accessors. The defaults and their reasons are documented in docs/operations.md.

use std::ffi::CString;
use std::time::Duration;

use pgrx::{GucContext, GucFlags, GucRegistry, GucSetting};

use crate::policy::RetryPolicy;

// 12 hand-outs with a 1 s base and a 10 min cap retry for about 27 minutes: long enough to
// ride out a downstream deploy or failover for a single event, short enough that a poison
// event reaches the dead letters within the half hour an operator would look.
static MAX_ATTEMPTS: GucSetting<i32> = GucSetting::<i32>::new(12);
static BACKOFF_BASE_MS: GucSetting<i32> = GucSetting::<i32>::new(1_000);
static BACKOFF_MAX_MS: GucSetting<i32> = GucSetting::<i32>::new(600_000);
// One day of processed events keeps "replay what we sent since yesterday" possible, while
// a busy outbox stays a small fraction of the embedding table it mirrors.
static RETENTION_S: GucSetting<i32> = GucSetting::<i32>::new(86_400);
// The delivery worker serves one database, as pg_cron does; `postgres` unless told otherwise.
static DATABASE: GucSetting<Option<CString>> = GucSetting::<Option<CString>>::new(Some(c"postgres"));
static WORKER_ENABLED: GucSetting<bool> = GucSetting::<bool>::new(true);
// Sinks without their own batch_size: big enough to amortise a request, small enough that one
// batch of embeddings stays a modest HTTP body.
static BATCH_SIZE: GucSetting<i32> = GucSetting::<i32>::new(100);
// Commits wake the worker through its latch; this only bounds how late it notices anything
// else (a lost wakeup, a subscription changed by hand), so it can be long.
static POLL_INTERVAL_MS: GucSetting<i32> = GucSetting::<i32>::new(5_000);
// A claim lost in a crash hands its events out again, which at-least-once delivery allows,
// and claims of a subscription wait for each other's commits (see src/consume.rs).
static FAST_CLAIM_COMMITS: GucSetting<bool> = GucSetting::<bool>::new(true);

pub fn init() {
    init_worker_settings();
    GucRegistry::define_int_guc(
        c"outbox.max_attempts",
        c"Hand-outs of an event before it moves to outbox_dead_letters.",
        c"Subscriptions may override it with the max_attempts option.",
        &MAX_ATTEMPTS,
        1,
        1_000_000,
        GucContext::Suset,
        GucFlags::default(),
    );
    GucRegistry::define_int_guc(
        c"outbox.backoff_base",
        c"Delay before the second attempt; each later attempt waits twice as long.",
        c"Subscriptions may override it with the backoff_base option.",
        &BACKOFF_BASE_MS,
        1,
        i32::MAX,
        GucContext::Suset,
        GucFlags::UNIT_MS,
    );
    GucRegistry::define_int_guc(
        c"outbox.backoff_max",
        c"Longest delay between two attempts.",
        c"Subscriptions may override it with the backoff_max option.",
        &BACKOFF_MAX_MS,
        1,
        i32::MAX,
        GucContext::Suset,
        GucFlags::UNIT_MS,
    );
    GucRegistry::define_int_guc(
        c"outbox.retention",
        c"How long processed events are kept for replay before retention removes them.",
        c"Removal is by whole log segment, once every event in it is processed by every subscription.",
        &RETENTION_S,
        0,
        i32::MAX,
        GucContext::Suset,
        GucFlags::UNIT_S,
    );
}

fn init_worker_settings() {
    GucRegistry::define_string_guc(
        c"outbox.database",
        c"The database the outbox delivery worker serves.",
        c"Changing it restarts the worker.",
        &DATABASE,
        GucContext::Sighup,
        GucFlags::default(),
    );
    GucRegistry::define_bool_guc(
        c"outbox.fast_claim_commits",
        c"Whether a claim made in a statement of its own commits without waiting for its WAL flush.",
        c"Off: such claims commit as synchronous_commit says, like any transaction.",
        &FAST_CLAIM_COMMITS,
        GucContext::Userset,
        GucFlags::default(),
    );
    GucRegistry::define_bool_guc(
        c"outbox.worker_enabled",
        c"Whether the outbox delivery worker delivers to sinks.",
        c"When off, the worker idles and sink subscriptions are not delivered.",
        &WORKER_ENABLED,
        GucContext::Sighup,
        GucFlags::default(),
    );
    GucRegistry::define_int_guc(
        c"outbox.batch_size",
        c"Events per batch for sinks that do not set batch_size.",
        c"",
        &BATCH_SIZE,
        1,
        crate::policy::MAX_BATCH_SIZE,
        GucContext::Sighup,
        GucFlags::default(),
    );
    GucRegistry::define_int_guc(
        c"outbox.poll_interval",
        c"Longest the delivery worker sleeps without being woken by a commit.",
        c"",
        &POLL_INTERVAL_MS,
        10,
        i32::MAX,
        GucContext::Sighup,
        GucFlags::UNIT_MS,
    );
}

pub fn worker_database() -> String {
    DATABASE.get().map(|d| d.to_string_lossy().into_owned()).unwrap_or_else(|| "postgres".into())
}

pub fn fast_claim_commits() -> bool {
    FAST_CLAIM_COMMITS.get()
}

pub fn worker_enabled() -> bool {
    WORKER_ENABLED.get()
}

pub fn worker_batch_size() -> i32 {
    BATCH_SIZE.get()
}

pub fn poll_interval() -> Duration {
    Duration::from_millis(POLL_INTERVAL_MS.get() as u64)
}

pub fn retry_policy() -> RetryPolicy {
    RetryPolicy {
        max_attempts: MAX_ATTEMPTS.get(),
        backoff_base: Duration::from_millis(BACKOFF_BASE_MS.get() as u64),
        backoff_max: Duration::from_millis(BACKOFF_MAX_MS.get() as u64),
    }
}

pub fn retention() -> Duration {
    Duration::from_secs(RETENTION_S.get() as u64)
}
