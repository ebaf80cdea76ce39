//! Prometheus text exposition of the outbox's state. Pure Rust: the SQL side gathers one
//! `SubscriptionMetrics` per subscription, this module renders them.

use std::fmt::Write;

/// Upper bounds of the propagation latency histogram, in seconds: from the milliseconds a
/// healthy worker takes to the minutes an outage or a stopped consumer adds.
pub const LATENCY_BUCKETS: [f64; 14] = [0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0, 300.0];

/// The index of the first bucket whose bound is at least `seconds` (LATENCY_BUCKETS.len() for +Inf).
pub fn bucket_of(seconds: f64) -> usize {
    LATENCY_BUCKETS.iter().position(|bound| seconds <= *bound).unwrap_or(LATENCY_BUCKETS.len())
}

#[derive(Debug, Clone, Default, PartialEq)]
pub struct SubscriptionMetrics {
    pub subscription: String,
    pub pending: i64,
    pub in_flight: i64,
    pub retrying: i64,
    pub dead: i64,
    pub oldest_pending_age_seconds: f64,
    pub delivered_total: i64,
    pub failures_total: i64,
    pub dead_lettered_total: i64,
    /// Events per latency bucket (not cumulative), LATENCY_BUCKETS.len() + 1 entries.
    pub latency_buckets: Vec<i64>,
    pub latency_sum_seconds: f64,
    /// For subscriptions with a sink: whether it is delivering (not backing off).
    pub sink_up: Option<bool>,
}

/// The log as a whole: a segment is emptied once all its events are processed and older than
/// the retention, so the oldest event stays within about 1.25 retentions (a segment is
/// written for a quarter of one) unless something holds retention back.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct Retention {
    pub seconds: f64,
    /// 0 when the log is empty.
    pub oldest_retained_age_seconds: f64,
}

fn escape_label(value: &str) -> String {
    value.replace('\\', "\\\\").replace('"', "\\\"").replace('\n', "\\n")
}

fn number(value: f64) -> String {
    if value.is_finite() {
        format!("{value}")
    } else if value > 0.0 {
        "+Inf".into()
    } else {
        "NaN".into()
    }
}

struct Family<'a> {
    name: &'a str,
    kind: &'a str,
    help: &'a str,
}

/// Renders the metrics in the Prometheus text format, one family at a time. `worker_up` is
/// given when some subscription has a sink, so a missing delivery worker can be alerted on.
pub fn render(subscriptions: &[SubscriptionMetrics], worker_up: Option<bool>, retention: Option<&Retention>) -> String {
    let mut out = String::new();
    // the gauges of the database as a whole, without a subscription label
    let worker = worker_up.map(|up| ("outbox_worker_up", "1 while the delivery worker runs for this database.", f64::from(u8::from(up))));
    let retention = retention.into_iter().flat_map(|retention| {
        [
            ("outbox_retention_seconds", "outbox.retention: how long processed events are kept.", retention.seconds),
            (
                "outbox_oldest_retained_age_seconds",
                "Age of the oldest event still in the log, processed or not (0 when the log is empty).",
                retention.oldest_retained_age_seconds,
            ),
        ]
    });
    for (name, help, value) in worker.into_iter().chain(retention) {
        let _ = writeln!(out, "# HELP {name} {help}\n# TYPE {name} gauge\n{name} {}", number(value));
    }
    let gauge = |name, help| Family { name, kind: "gauge", help };
    let counter = |name, help| Family { name, kind: "counter", help };
    type Value = fn(&SubscriptionMetrics) -> Option<f64>;
    let simple: [(Family, Value); 10] = [
        (
            gauge("outbox_backlog_events", "Events not yet processed: pending, in flight and retrying."),
            |m| Some((m.pending + m.in_flight + m.retrying) as f64),
        ),
        (gauge("outbox_pending_events", "Events waiting to be handed out."), |m| Some(m.pending as f64)),
        (gauge("outbox_in_flight_events", "Events handed out and neither acked nor failed."), |m| Some(m.in_flight as f64)),
        (gauge("outbox_retrying_events", "Failed or expired events waiting for their next attempt."), |m| Some(m.retrying as f64)),
        (gauge("outbox_dead_letter_events", "Events in outbox_dead_letters."), |m| Some(m.dead as f64)),
        (
            gauge("outbox_oldest_pending_age_seconds", "Age of the oldest event not yet processed."),
            |m| Some(m.oldest_pending_age_seconds),
        ),
        (counter("outbox_delivered_total", "Events acknowledged."), |m| Some(m.delivered_total as f64)),
        (counter("outbox_failures_total", "Failed deliveries (fails, and expired leases a claim has found)."), |m| Some(m.failures_total as f64)),
        (counter("outbox_dead_lettered_total", "Events moved to the dead letters."), |m| Some(m.dead_lettered_total as f64)),
        (gauge("outbox_sink_up", "1 while a subscription's sink answers, 0 from when it is found down until it answers again."), |m| {
            m.sink_up.map(|up| if up { 1.0 } else { 0.0 })
        }),
    ];
    for (family, value) in simple {
        let rows: Vec<(String, f64)> =
            subscriptions.iter().filter_map(|m| value(m).map(|v| (escape_label(&m.subscription), v))).collect();
        if rows.is_empty() {
            continue;
        }
        let _ = writeln!(out, "# HELP {} {}\n# TYPE {} {}", family.name, family.help, family.name, family.kind);
        for (label, v) in rows {
            let _ = writeln!(out, "{}{{subscription=\"{label}\"}} {}", family.name, number(v));
        }
    }
    if !subscriptions.is_empty() {
        let name = "outbox_propagation_latency_seconds";
        let _ = writeln!(out, "# HELP {name} Time from capture to ack.\n# TYPE {name} histogram");
        for m in subscriptions {
            let label = escape_label(&m.subscription);
            let mut cumulative = 0;
            for (i, bound) in LATENCY_BUCKETS.iter().map(|b| number(*b)).chain(["+Inf".to_string()]).enumerate() {
                cumulative += m.latency_buckets.get(i).copied().unwrap_or(0);
                let _ = writeln!(out, "{name}_bucket{{subscription=\"{label}\",le=\"{bound}\"}} {cumulative}");
            }
            let _ = writeln!(out, "{name}_sum{{subscription=\"{label}\"}} {}", number(m.latency_sum_seconds));
            let _ = writeln!(out, "{name}_count{{subscription=\"{label}\"}} {cumulative}");
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn latencies_fall_into_buckets() {
        assert_eq!(bucket_of(0.001), 0);
        assert_eq!(bucket_of(0.005), 0);
        assert_eq!(bucket_of(0.006), 1);
        assert_eq!(bucket_of(299.0), 13);
        assert_eq!(bucket_of(1e6), LATENCY_BUCKETS.len());
    }

    #[test]
    fn renders_every_family_with_subscription_labels() {
        let mut buckets = vec![0; LATENCY_BUCKETS.len() + 1];
        buckets[0] = 3;
        buckets[2] = 1;
        let m = SubscriptionMetrics {
            subscription: "search \"eu\"".into(),
            pending: 4,
            in_flight: 2,
            retrying: 1,
            dead: 1,
            oldest_pending_age_seconds: 12.5,
            delivered_total: 4,
            failures_total: 2,
            dead_lettered_total: 1,
            latency_buckets: buckets,
            latency_sum_seconds: 0.04,
            sink_up: Some(false),
        };
        let retention = Retention { seconds: 86400.0, oldest_retained_age_seconds: 3600.5 };
        let text = render(&[m, SubscriptionMetrics { subscription: "default".into(), ..Default::default() }], Some(true), Some(&retention));
        assert!(text.starts_with("# HELP outbox_worker_up"));
        assert!(text.contains("\noutbox_worker_up 1\n"));
        assert!(text.contains("# TYPE outbox_retention_seconds gauge\noutbox_retention_seconds 86400\n"));
        assert!(text.contains("# TYPE outbox_oldest_retained_age_seconds gauge\noutbox_oldest_retained_age_seconds 3600.5\n"));
        assert!(text.contains("# TYPE outbox_backlog_events gauge\n"));
        assert!(text.contains("outbox_backlog_events{subscription=\"search \\\"eu\\\"\"} 7\n"));
        assert!(text.contains("outbox_oldest_pending_age_seconds{subscription=\"search \\\"eu\\\"\"} 12.5\n"));
        assert!(text.contains("# TYPE outbox_delivered_total counter\n"));
        assert!(text.contains("outbox_sink_up{subscription=\"search \\\"eu\\\"\"} 0\n"));
        assert!(!text.contains("outbox_sink_up{subscription=\"default\"}"), "pull subscriptions have no sink");
        assert!(text.contains("outbox_propagation_latency_seconds_bucket{subscription=\"search \\\"eu\\\"\",le=\"0.005\"} 3\n"));
        assert!(text.contains("outbox_propagation_latency_seconds_bucket{subscription=\"search \\\"eu\\\"\",le=\"0.025\"} 4\n"));
        assert!(text.contains("outbox_propagation_latency_seconds_bucket{subscription=\"search \\\"eu\\\"\",le=\"+Inf\"} 4\n"));
        assert!(text.contains("outbox_propagation_latency_seconds_count{subscription=\"search \\\"eu\\\"\"} 4\n"));
        assert!(text.contains("outbox_propagation_latency_seconds_bucket{subscription=\"default\",le=\"+Inf\"} 0\n"));
    }

    #[test]
    fn backlog_view_interpolates_over_the_same_bounds() {
        let view = include_str!("../sql/api.sql");
        let literal = view.split("(SELECT '{").nth(1).and_then(|rest| rest.split('}').next()).expect("bounds literal in outbox_backlog");
        let bounds: Vec<f64> = literal.split(',').map(|b| b.parse().unwrap()).collect();
        assert_eq!(bounds, LATENCY_BUCKETS);
    }

    #[test]
    fn nothing_to_report_renders_nothing() {
        assert_eq!(render(&[], None, None), "");
    }
}
