//! Delivery policy: argument limits, retry budget and backoff, and the per-subscription
//! options that override the GUC defaults. Pure Rust, so every rule here has a plain test.

use std::time::Duration;

use serde_json::{Map, Value};

use crate::error::OutboxError;

/// Upper bound of `outbox_claim(batch_size)`. Larger batches would hold the subscription's
/// claim lock for longer than a consumer could usefully process them.
pub const MAX_BATCH_SIZE: i32 = 10_000;

/// Jitter spreads retries of events that failed together, so a recovering sink is not hit by
/// the whole failed batch at the same instant (the thundering herd pg-boss and River avoid).
pub const JITTER: f64 = 0.10;

/// How often the delivery worker runs retention at the least, besides when a segment falls
/// due (`retention_wait`): a segment held back past its due time by an unprocessed event or
/// an open claim is emptied within this of being let go, and at least once a minute.
fn retention_interval(retention: Duration) -> Duration {
    (retention / 8).clamp(Duration::from_secs(1), Duration::from_secs(60))
}

/// How long the worker waits for its next retention pass: until the next rotation or
/// emptying falls due (`next_due`, from the last pass), and no longer than the regular
/// interval, which catches what was due but held back (an unprocessed event, an open claim).
/// The latch wait counts whole milliseconds: a little slack keeps it from waking just short
/// of the due time and waiting again.
pub fn retention_wait(retention: Duration, next_due: Option<Duration>) -> Duration {
    const SLACK: Duration = Duration::from_millis(5);
    let interval = retention_interval(retention);
    next_due.map_or(interval, |due| (due + SLACK).min(interval))
}

pub fn check_batch_size(batch_size: i32) -> Result<(), OutboxError> {
    if (1..=MAX_BATCH_SIZE).contains(&batch_size) {
        Ok(())
    } else {
        Err(OutboxError::BatchSize { got: batch_size, max: MAX_BATCH_SIZE })
    }
}

/// How often an event may be handed out and how long to wait between tries.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct RetryPolicy {
    pub max_attempts: i32,
    pub backoff_base: Duration,
    pub backoff_max: Duration,
}

impl RetryPolicy {
    /// The delay before attempt `attempts + 1`, after `attempts` failed hand-outs:
    /// `base × 2^(attempts−1)`, capped at `backoff_max`, then scaled by a jitter factor in
    /// `[1 − JITTER, 1 + JITTER]` (still capped). `unit` is a uniform random number in [0, 1).
    pub fn backoff(&self, attempts: i32, unit: f64) -> Duration {
        let exponent = attempts.saturating_sub(1).clamp(0, 62) as u32;
        let base = self.backoff_base.as_secs_f64();
        let uncapped = base * 2f64.powi(exponent as i32);
        let capped = uncapped.min(self.backoff_max.as_secs_f64());
        let jittered = capped * (1.0 - JITTER + 2.0 * JITTER * unit.clamp(0.0, 1.0));
        Duration::from_secs_f64(jittered.min(self.backoff_max.as_secs_f64()).max(0.0))
    }

    /// True when an event handed out `attempts` times has used up its budget.
    pub fn exhausted(&self, attempts: i32) -> bool {
        attempts >= self.max_attempts
    }

    /// Applies the overrides a subscription carries in its options.
    pub fn with_overrides(self, options: &Value) -> Result<Self, OutboxError> {
        let overrides = SubscriptionOptions::parse(options)?;
        Ok(RetryPolicy {
            max_attempts: overrides.max_attempts.unwrap_or(self.max_attempts),
            backoff_base: overrides.backoff_base.unwrap_or(self.backoff_base),
            backoff_max: overrides.backoff_max.unwrap_or(self.backoff_max),
        })
    }
}

/// A uniform number in [0, 1) for backoff jitter, the `unit` of [`RetryPolicy::backoff`];
/// std's RandomState is freshly keyed per call.
pub fn random_unit() -> f64 {
    use std::hash::{BuildHasher, Hasher};
    let bits = std::collections::hash_map::RandomState::new().build_hasher().finish();
    (bits >> 11) as f64 / (1u64 << 53) as f64
}

/// The options a subscription may carry. Keys other than these belong to the sink and are
/// validated by it.
#[derive(Debug, Default, PartialEq, Eq)]
pub struct SubscriptionOptions {
    pub max_attempts: Option<i32>,
    pub backoff_base: Option<Duration>,
    pub backoff_max: Option<Duration>,
}

impl SubscriptionOptions {
    pub fn parse(options: &Value) -> Result<Self, OutboxError> {
        let object = as_object(options)?;
        let mut parsed = SubscriptionOptions::default();
        if let Some(value) = object.get("max_attempts") {
            let attempts = value
                .as_i64()
                .filter(|n| (1..=i64::from(i32::MAX)).contains(n))
                .ok_or_else(|| invalid(format!("max_attempts must be a positive integer, got {value}")))?;
            parsed.max_attempts = Some(attempts as i32);
        }
        if let Some(value) = object.get("backoff_base") {
            parsed.backoff_base = Some(duration_option("backoff_base", value)?);
        }
        if let Some(value) = object.get("backoff_max") {
            parsed.backoff_max = Some(duration_option("backoff_max", value)?);
        }
        if let (Some(base), Some(max)) = (parsed.backoff_base, parsed.backoff_max) {
            if base > max {
                return Err(invalid(format!(
                    "backoff_base ({}) must not exceed backoff_max ({})",
                    format_duration(base),
                    format_duration(max)
                )));
            }
        }
        Ok(parsed)
    }
}

pub fn as_object(options: &Value) -> Result<&Map<String, Value>, OutboxError> {
    options.as_object().ok_or_else(|| invalid(format!("options must be a JSON object, got {options}")))
}

fn invalid(message: String) -> OutboxError {
    OutboxError::InvalidOptions(message)
}

pub fn duration_option(name: &str, value: &Value) -> Result<Duration, OutboxError> {
    let text = value
        .as_str()
        .ok_or_else(|| invalid(format!("{name} must be a duration string such as \"500ms\" or \"2s\", got {value}")))?;
    parse_duration(text).map_err(|why| invalid(format!("{name}: {why}")))
}

/// Parses durations written the way Postgres writes GUC times: a number and a unit
/// (`ms`, `s`, `min`, `h`, `d`), optionally separated by spaces, e.g. `250ms`, `1.5 s`, `10min`.
pub fn parse_duration(text: &str) -> Result<Duration, String> {
    let trimmed = text.trim();
    let split = trimmed
        .find(|c: char| !(c.is_ascii_digit() || c == '.'))
        .ok_or_else(|| format!("{text:?} has no unit; use ms, s, min, h or d"))?;
    let (number, unit) = trimmed.split_at(split);
    let amount: f64 = number.parse().map_err(|_| format!("{text:?} does not start with a number"))?;
    let seconds_per_unit = match unit.trim() {
        "ms" => 0.001,
        "s" | "sec" | "secs" | "second" | "seconds" => 1.0,
        "min" | "mins" | "minute" | "minutes" => 60.0,
        "h" | "hour" | "hours" => 3600.0,
        "d" | "day" | "days" => 86_400.0,
        other => return Err(format!("unknown unit {other:?} in {text:?}; use ms, s, min, h or d")),
    };
    let seconds = amount * seconds_per_unit;
    if !seconds.is_finite() || seconds > 365.0 * 86_400.0 {
        return Err(format!("{text:?} is longer than a year"));
    }
    Ok(Duration::from_secs_f64(seconds))
}

pub fn format_duration(duration: Duration) -> String {
    let millis = duration.as_millis();
    if millis % 1000 == 0 {
        format!("{}s", millis / 1000)
    } else {
        format!("{millis}ms")
    }
}

/// Whether an ack or fail of a retried event would cut short a hand-out that is not the
/// caller's: the event's lease is still running, and this session did not take it with these
/// attempts and this lease end (`ours`, what it last leased the event with). That hand-out is
/// a newer one, made after the caller's own lease expired (or in another session), and its
/// holder settles it. Ids alone cannot say which hand-out a call means.
pub fn held_by_another(ours: Option<(i32, i64)>, attempts: i32, lease_end: i64, now: i64) -> bool {
    lease_end > now && ours != Some((attempts, lease_end))
}

/// The mark of a function sink call in progress: whose it is (the postmaster's start time and
/// the database, as the worker spells them), the subscription, and how many calls in a row
/// ended a worker.
pub fn sink_call_mark(whose: &str, subscription: i32, times: u32) -> String {
    format!("{whose} {subscription} {times}")
}

/// The subscription and count of a mark (sink_call_mark) that is `whose`; None for another
/// postmaster's or database's mark, or a damaged one.
pub fn read_sink_call_mark(text: &str, whose: &str) -> Option<(i32, u32)> {
    let mut fields = text.split_whitespace();
    let (postmaster, database) = (fields.next()?, fields.next()?);
    if format!("{postmaster} {database}") != whose {
        return None;
    }
    let (subscription, times) = (fields.next()?.parse().ok()?, fields.next()?.parse().ok()?);
    fields.next().is_none().then_some((subscription, times))
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    #[test]
    fn a_sink_call_mark_counts_only_for_its_own_postmaster_and_database() {
        let mark = sink_call_mark("817000000000 16384", 3, 2);
        assert_eq!(read_sink_call_mark(&mark, "817000000000 16384"), Some((3, 2)));
        // a stop and start (another postmaster), or the worker moved to another database
        assert_eq!(read_sink_call_mark(&mark, "817000009999 16384"), None);
        assert_eq!(read_sink_call_mark(&mark, "817000000000 16385"), None);
        assert_eq!(read_sink_call_mark(&mark, "817000000000 1638"), None);
        for damaged in ["", "817000000000 16384", "817000000000 16384 3", "817000000000 16384 x 2", "817000000000 16384 3 2 1"] {
            assert_eq!(read_sink_call_mark(damaged, "817000000000 16384"), None, "{damaged:?}");
        }
    }

    fn policy() -> RetryPolicy {
        RetryPolicy {
            max_attempts: 5,
            backoff_base: Duration::from_secs(1),
            backoff_max: Duration::from_secs(10),
        }
    }

    #[test]
    fn batch_size_limits() {
        assert!(check_batch_size(1).is_ok());
        assert!(check_batch_size(MAX_BATCH_SIZE).is_ok());
        for bad in [0, -1, MAX_BATCH_SIZE + 1] {
            let message = check_batch_size(bad).unwrap_err().to_string();
            assert!(message.contains("batch_size must be between 1 and 10000"), "{message}");
        }
    }

    #[test]
    fn backoff_doubles_from_the_base_and_is_capped() {
        let p = policy();
        // unit 0.5 is the centre of the jitter range: no jitter
        assert_eq!(p.backoff(1, 0.5), Duration::from_secs(1));
        assert_eq!(p.backoff(2, 0.5), Duration::from_secs(2));
        assert_eq!(p.backoff(3, 0.5), Duration::from_secs(4));
        assert_eq!(p.backoff(4, 0.5), Duration::from_secs(8));
        assert_eq!(p.backoff(5, 0.5), Duration::from_secs(10));
        assert_eq!(p.backoff(60, 0.5), Duration::from_secs(10));
        assert_eq!(p.backoff(i32::MAX, 0.5), Duration::from_secs(10));
    }

    #[test]
    fn jitter_stays_within_ten_percent_and_under_the_cap() {
        let p = policy();
        let low = p.backoff(3, 0.0).as_secs_f64();
        let high = p.backoff(3, 0.999_999).as_secs_f64();
        assert!((low - 3.6).abs() < 1e-6, "{low}");
        assert!((high - 4.4).abs() < 1e-3, "{high}");
        assert!(p.backoff(20, 0.999).as_secs_f64() <= 10.0);
    }

    #[test]
    fn jitter_units_are_spread_over_zero_to_one() {
        let units: Vec<f64> = (0..4000).map(|_| random_unit()).collect();
        assert!(units.iter().all(|u| (0.0..1.0).contains(u)));
        // each tenth holds 400 on average, give or take 19
        for tenth in 0..10 {
            let held = units.iter().filter(|u| (**u * 10.0) as usize == tenth).count();
            assert!((250..550).contains(&held), "{held} of 4000 in tenth {tenth}");
        }
    }

    #[test]
    fn budget_is_exhausted_at_max_attempts() {
        let p = policy();
        assert!(!p.exhausted(4));
        assert!(p.exhausted(5));
        assert!(p.exhausted(6));
    }

    #[test]
    fn overrides_replace_only_what_they_name() {
        let p = policy().with_overrides(&json!({"max_attempts": 2, "url": "http://x"})).unwrap();
        assert_eq!(p.max_attempts, 2);
        assert_eq!(p.backoff_base, Duration::from_secs(1));
        let p = policy().with_overrides(&json!({"backoff_base": "250ms", "backoff_max": "1min"})).unwrap();
        assert_eq!(p.backoff_base, Duration::from_millis(250));
        assert_eq!(p.backoff_max, Duration::from_secs(60));
    }

    #[test]
    fn bad_options_are_named_in_the_error() {
        let cases = [
            (json!([1]), "options must be a JSON object"),
            (json!({"max_attempts": 0}), "max_attempts must be a positive integer"),
            (json!({"max_attempts": "3"}), "max_attempts must be a positive integer"),
            (json!({"backoff_base": 5}), "backoff_base must be a duration string"),
            (json!({"backoff_max": "5 fortnights"}), "backoff_max: unknown unit"),
            (json!({"backoff_base": "10s", "backoff_max": "1s"}), "must not exceed backoff_max"),
        ];
        for (options, expected) in cases {
            let message = SubscriptionOptions::parse(&options).unwrap_err().to_string();
            assert!(message.contains(expected), "{options}: {message}");
        }
    }

    #[test]
    fn durations_parse_like_guc_times() {
        assert_eq!(parse_duration("250ms").unwrap(), Duration::from_millis(250));
        assert_eq!(parse_duration(" 1.5 s ").unwrap(), Duration::from_millis(1500));
        assert_eq!(parse_duration("10min").unwrap(), Duration::from_secs(600));
        assert_eq!(parse_duration("2h").unwrap(), Duration::from_secs(7200));
        assert_eq!(parse_duration("1d").unwrap(), Duration::from_secs(86_400));
        assert!(parse_duration("12").unwrap_err().contains("no unit"));
        assert!(parse_duration("ms").unwrap_err().contains("does not start with a number"));
        assert!(parse_duration("400d").unwrap_err().contains("longer than a year"));
    }

    #[test]
    fn durations_format_compactly() {
        assert_eq!(format_duration(Duration::from_secs(3)), "3s");
        assert_eq!(format_duration(Duration::from_millis(1500)), "1500ms");
    }

    #[test]
    fn retention_runs_eight_times_per_retention_between_a_second_and_a_minute() {
        assert_eq!(retention_interval(Duration::ZERO), Duration::from_secs(1));
        assert_eq!(retention_interval(Duration::from_secs(60)), Duration::from_millis(7500));
        assert_eq!(retention_interval(Duration::from_secs(86_400)), Duration::from_secs(60));
    }

    #[test]
    fn retention_waits_for_what_falls_due_first() {
        let minute = Duration::from_secs(60);
        assert_eq!(retention_wait(minute, None), Duration::from_millis(7500), "nothing due: the regular interval");
        assert_eq!(retention_wait(minute, Some(Duration::from_secs(2))), Duration::from_millis(2005), "due before the interval ends");
        assert_eq!(retention_wait(minute, Some(Duration::from_secs(20))), Duration::from_millis(7500), "due after it");
    }

    #[test]
    fn only_a_running_lease_of_another_hand_out_is_held_by_another() {
        let (now, later, earlier) = (1_000, 2_000, 500);
        assert!(!held_by_another(Some((2, later)), 2, later, now), "our own running lease");
        assert!(held_by_another(None, 2, later, now), "a running lease this session never took");
        assert!(held_by_another(Some((1, earlier)), 2, later, now), "re-leased after ours expired");
        assert!(held_by_another(Some((2, 1_999)), 2, later, now), "the same attempt count, another lease");
        assert!(!held_by_another(None, 2, earlier, now), "an expired lease holds nothing");
        assert!(!held_by_another(None, 2, now, now), "a lease ends at its end");
    }
}
