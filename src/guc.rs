//! Every setting of the extension, registered once in `init()` and read through typed
//! accessors. The defaults and their reasons are documented in README.md.

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

pub fn init() {
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
