//! What the delivery worker decides without Postgres: sink configuration, how an HTTP answer
//! is judged, when a whole sink backs off, and how a rejected batch is split. Pure Rust.

use std::time::{Duration, Instant};

use serde_json::Value;

use crate::error::OutboxError;
use crate::policy::{as_object, duration_option, RetryPolicy, MAX_BATCH_SIZE};

/// Keys every subscription may carry, whatever its sink.
const POLICY_KEYS: [&str; 3] = ["max_attempts", "backoff_base", "backoff_max"];

#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Sink {
    /// External consumers call outbox_claim; the worker leaves it alone.
    Pull,
    /// A SQL function `function(jsonb)` called with the batch, in the transaction that acks it,
    /// and cancelled after `timeout`.
    Function { function: String, timeout: Duration, batch_size: Option<i32> },
    Http(HttpSink),
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct HttpSink {
    pub url: String,
    pub headers: Vec<(String, String)>,
    pub timeout: Duration,
    pub batch_size: Option<i32>,
}

/// How long an HTTP request or a function call may take unless the subscription says otherwise.
pub const DEFAULT_TIMEOUT: Duration = Duration::from_secs(5);

fn timeout_option(options: &Value) -> Result<Duration, OutboxError> {
    let timeout = match options.get("timeout") {
        None => DEFAULT_TIMEOUT,
        Some(value) => duration_option("timeout", value)?,
    };
    if timeout < Duration::from_secs(1) || timeout > Duration::from_secs(3600) {
        return Err(invalid("timeout must be between 1s and 1h".into()));
    }
    Ok(timeout)
}

fn invalid(message: String) -> OutboxError {
    OutboxError::InvalidOptions(message)
}

fn reject_unknown_keys(options: &Value, allowed: &[&str], sink: &str) -> Result<(), OutboxError> {
    for key in as_object(options)?.keys() {
        if !POLICY_KEYS.contains(&key.as_str()) && !allowed.contains(&key.as_str()) {
            let mut known: Vec<&str> = POLICY_KEYS.iter().chain(allowed).copied().collect();
            known.sort_unstable();
            return Err(invalid(format!("unknown option \"{key}\" for a {sink} sink; known options: {}", known.join(", "))));
        }
    }
    Ok(())
}

fn batch_size_option(options: &Value) -> Result<Option<i32>, OutboxError> {
    match options.get("batch_size") {
        None => Ok(None),
        Some(value) => value
            .as_i64()
            .filter(|n| (1..=i64::from(MAX_BATCH_SIZE)).contains(n))
            .map(|n| Some(n as i32))
            .ok_or_else(|| invalid(format!("batch_size must be an integer between 1 and {MAX_BATCH_SIZE}, got {value}"))),
    }
}

/// A header name is an HTTP token; a value may not break the header line.
fn check_header(name: &str, value: &str) -> Result<(), OutboxError> {
    let token = |c: char| c.is_ascii_alphanumeric() || "!#$%&'*+-.^_`|~".contains(c);
    if name.is_empty() || !name.chars().all(token) {
        return Err(invalid(format!("header name {name:?} is not a valid HTTP header name")));
    }
    if value.chars().any(|c| c == '\r' || c == '\n') {
        return Err(invalid(format!("the value of header {name:?} contains a line break")));
    }
    // The sink sets these itself, and one given here replaced it: a fixed Idempotency-Key made
    // a receiver that drops batches it has seen drop every batch after the first, and a
    // Content-Length cut the body short.
    if RESERVED_HEADERS.iter().any(|reserved| reserved.eq_ignore_ascii_case(name)) {
        return Err(invalid(format!("header {name:?} is set by the HTTP sink itself and cannot be given")));
    }
    Ok(())
}

const RESERVED_HEADERS: [&str; 6] = ["Host", "Content-Length", "Transfer-Encoding", "Connection", "Idempotency-Key", "Expect"];

/// The role whose members alone may claim, ack and fail a pull subscription, when its options
/// name one; without it, whoever may call the API consumes every pull subscription.
pub fn consumer_role(options: &Value) -> Result<Option<&str>, OutboxError> {
    match options.get("consumer_role") {
        None => Ok(None),
        Some(Value::String(role)) if !role.is_empty() => Ok(Some(role)),
        Some(other) => Err(invalid(format!("consumer_role must be the name of a role, got {other}"))),
    }
}

impl Sink {
    /// Parses and checks a sink and its options, naming whatever is wrong.
    pub fn parse(sink: &str, options: &Value) -> Result<Sink, OutboxError> {
        as_object(options)?;
        match sink {
            "pull" => {
                reject_unknown_keys(options, &["consumer_role"], sink)?;
                consumer_role(options)?;
                Ok(Sink::Pull)
            }
            "function" => {
                reject_unknown_keys(options, &["function", "timeout", "batch_size"], sink)?;
                let function = options
                    .get("function")
                    .and_then(Value::as_str)
                    .filter(|f| !f.trim().is_empty())
                    .ok_or_else(|| invalid("a function sink needs {\"function\": \"schema.name\"}".into()))?;
                check_function_name(function)?;
                Ok(Sink::Function {
                    function: function.to_string(),
                    timeout: timeout_option(options)?,
                    batch_size: batch_size_option(options)?,
                })
            }
            "http" => {
                reject_unknown_keys(options, &["url", "headers", "timeout", "batch_size"], sink)?;
                let url = options
                    .get("url")
                    .and_then(Value::as_str)
                    .ok_or_else(|| invalid("an http sink needs {\"url\": \"http://host:port/path\"}".into()))?;
                check_url(url)?;
                let mut headers = Vec::new();
                if let Some(given) = options.get("headers") {
                    // (the value is not echoed: headers hold credentials)
                    let kind = match given {
                        Value::Array(_) => "an array",
                        Value::String(_) => "a string",
                        _ => "not an object",
                    };
                    let given = given.as_object().ok_or_else(|| invalid(format!("headers must be a JSON object of names and values, got {kind}")))?;
                    for (name, value) in given {
                        let value = value
                            .as_str()
                            .ok_or_else(|| invalid(format!("the value of header {name:?} must be a string")))?;
                        check_header(name, value)?;
                        headers.push((name.clone(), value.to_string()));
                    }
                }
                // (the HTTP client counts its timeout in whole seconds: 1.9 s was 1 s)
                let timeout = timeout_option(options)?;
                if timeout.subsec_nanos() != 0 {
                    return Err(invalid(format!("timeout of an http sink must be whole seconds, got {timeout:?}")));
                }
                Ok(Sink::Http(HttpSink {
                    url: url.to_string(),
                    headers,
                    timeout,
                    batch_size: batch_size_option(options)?,
                }))
            }
            other => Err(OutboxError::UnknownSink(other.to_string())),
        }
    }

    pub fn batch_size(&self) -> Option<i32> {
        match self {
            Sink::Pull => None,
            Sink::Function { batch_size, .. } => *batch_size,
            Sink::Http(http) => http.batch_size,
        }
    }
}

/// A function sink's function is looked up as `schema.name(jsonb)`: a name with more in it,
/// such as `f(int8, int8 --)`, resolved to a function of other arguments, which the worker then
/// called with one jsonb (a reviewer crashed the server in a loop with it). So only a schema
/// and a name, each a plain or a double-quoted identifier. The schema is needed: the lookup
/// runs with `search_path` pinned to pg_catalog, as every query of outbox_subscribe and of the
/// worker does, so a bare name could only ever find a built-in function.
fn check_function_name(function: &str) -> Result<(), OutboxError> {
    fn identifier(rest: &str) -> Option<&str> {
        if let Some(quoted) = rest.strip_prefix('"') {
            let mut chars = quoted.char_indices().peekable();
            while let Some((i, c)) = chars.next() {
                match c {
                    '"' if chars.peek().is_some_and(|&(_, next)| next == '"') => {
                        chars.next();
                    }
                    '"' => return (i > 0).then(|| &quoted[i + 1..]),
                    '\0' => return None,
                    _ => {}
                }
            }
            return None;
        }
        let end = rest.find(|c: char| !(c.is_alphanumeric() || c == '_' || c == '$')).unwrap_or(rest.len());
        let first = rest.chars().next()?;
        (end > 0 && (first.is_alphabetic() || first == '_')).then(|| &rest[end..])
    }
    let after_first = identifier(function);
    let valid = after_first.is_some_and(|rest| rest.is_empty() || rest.strip_prefix('.').and_then(identifier) == Some(""));
    if !valid {
        return Err(invalid(format!(
            "function must name a function as schema.name, without its arguments (it is called as schema.name(jsonb)), got {function:?}"
        )));
    }
    let Some(schema) = after_first.filter(|rest| !rest.is_empty()).map(|rest| &function[..function.len() - rest.len()]) else {
        return Err(invalid(format!(
            "function must be qualified with its schema, as schema.name (it is looked up with search_path = pg_catalog), got {function:?}"
        )));
    };
    // (the worker's session has temporary schemas of its own, where the function is not)
    let schema = schema.strip_prefix('"').and_then(|q| q.strip_suffix('"')).map_or_else(|| schema.to_lowercase(), |q| q.replace("\"\"", "\""));
    if schema == "pg_temp" || schema.starts_with("pg_temp_") {
        return Err(invalid(format!("function {function:?} is in a temporary schema, which the delivery worker does not see")));
    }
    Ok(())
}

fn check_url(url: &str) -> Result<(), OutboxError> {
    let schemes: &[&str] = if cfg!(feature = "https") { &["http://", "https://"] } else { &["http://"] };
    let Some(rest) = schemes.iter().find_map(|s| url.strip_prefix(s)) else {
        let why = if cfg!(feature = "https") {
            "url must start with http:// or https://"
        } else {
            "url must start with http:// (this build has no TLS; put a TLS-terminating proxy in front, or build with --features https)"
        };
        return Err(invalid(format!("{why}, got {url:?}")));
    };
    // The URL goes into the request line as written: a space there made every request a 400,
    // which the worker takes for a batch at fault, and the events went to the dead letters.
    if url.chars().any(|c| c.is_whitespace() || c.is_control()) {
        return Err(invalid(format!("url {url:?} contains spaces or control characters; percent-encode them (a space is %20)")));
    }
    let authority = rest.split(['/', '?', '#']).next().unwrap_or_default();
    if authority.contains('@') {
        return Err(invalid(format!(
            "url {url:?} holds credentials (user:password@), which the HTTP sink does not send; \
             give them as a header instead, e.g. \"headers\": {{\"Authorization\": \"Basic …\"}}"
        )));
    }
    if authority.starts_with('[') {
        return Err(invalid(format!("url {url:?} names an IPv6 address, which the HTTP sink cannot connect to; use a host name")));
    }
    let (host, port) = match authority.rsplit_once(':') {
        Some((host, port)) => (host, Some(port)),
        None => (authority, None),
    };
    if host.is_empty() {
        return Err(invalid(format!("url {url:?} names no host")));
    }
    if let Some(port) = port {
        if !port.parse::<u16>().is_ok_and(|p| p > 0) {
            return Err(invalid(format!("url {url:?} has port {port:?}; a port is a number from 1 to 65535")));
        }
    }
    Ok(())
}

/// What a delivery attempt came to.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Outcome {
    /// 2xx: ack.
    Delivered,
    /// A 4xx other than 408 and 429: something in the batch is at fault.
    Rejected(String),
    /// Transport errors, 5xx, 408, 429 and redirects: the sink is at fault. The events go
    /// back without using an attempt; the sink backs off as a whole.
    Unavailable { reason: String, retry_after: Option<Duration> },
    /// No answer within the timeout. The sink may be down, or the batch too big to send or
    /// process in time: handled as unavailable, and the next batches are smaller (BatchLimit).
    TimedOut(String),
}

/// Judges an HTTP answer.
pub fn judge(status: u16, retry_after: Option<&str>, body: &str) -> Outcome {
    let snippet: String = body.chars().take(200).collect();
    let reason = if snippet.trim().is_empty() { format!("HTTP {status}") } else { format!("HTTP {status}: {}", snippet.trim()) };
    match status {
        200..=299 => Outcome::Delivered,
        400..=499 if status != 408 && status != 429 => Outcome::Rejected(reason),
        // 1xx, 3xx, 5xx and anything outside the standard range: the sink is at fault
        _ => Outcome::Unavailable { reason, retry_after: retry_after.and_then(parse_retry_after) },
    }
}

/// `Retry-After` in delta-seconds. (An HTTP-date is rare from APIs and falls back to backoff.)
pub fn parse_retry_after(value: &str) -> Option<Duration> {
    value.trim().parse::<u64>().ok().map(|s| Duration::from_secs(s.min(86_400)))
}

/// The `Idempotency-Key` header for a batch: its event ids, so a receiver can drop repeats.
pub fn idempotency_key(ids: &[i64]) -> String {
    ids.iter().map(i64::to_string).collect::<Vec<_>>().join(",")
}

/// Joins events already rendered as JSON objects into the request body.
pub fn batch_body<'a, I>(events: I) -> String
where
    I: IntoIterator<Item = &'a str>,
    I::IntoIter: Clone,
{
    crate::shape::json_array(events)
}

/// How many events a sink is sent at once, cut below its batch size after a batch timed out.
/// A batch whose upload or processing outlasts the timeout would time out every time and hold
/// back every event behind it, and a timeout cannot tell a slow batch from a sink that is
/// down: so each timeout halves the batches, and each batch delivered at the limit raises it
/// by a quarter, back to the batch size.
#[derive(Debug, Default, Clone, Copy, PartialEq, Eq)]
pub struct BatchLimit(Option<i32>);

impl BatchLimit {
    /// The size of the next batch of a sink whose batch size is `batch_size`.
    pub fn of(self, batch_size: i32) -> i32 {
        self.0.map_or(batch_size, |limit| limit.min(batch_size))
    }

    pub fn timed_out(&mut self, sent: usize) {
        self.0 = Some((sent / 2).max(1) as i32);
    }

    pub fn delivered(&mut self, sent: usize, batch_size: i32) {
        if let Some(limit) = self.0.filter(|&limit| sent as i32 >= limit) {
            let raised = limit + (limit / 4).max(1);
            self.0 = (raised < batch_size).then_some(raised);
        }
    }
}

/// The halves a rejected batch is retried as. A single event is not split: it is failed.
pub fn halves<T: Clone>(batch: &[T]) -> Option<(Vec<T>, Vec<T>)> {
    (batch.len() > 1).then(|| {
        let (a, b) = batch.split_at(batch.len() / 2);
        (a.to_vec(), b.to_vec())
    })
}

/// A whole sink backs off while it is unavailable, as a circuit breaker would: no claims until
/// `open_until`, then one batch as a probe. The delay grows like the retry backoff and never
/// exceeds `backoff_max`, so delivery resumes within one backoff cap of the sink returning.
#[derive(Debug, Default, Clone)]
pub struct Breaker {
    failures: u32,
    open_until: Option<Instant>,
}

/// A change of a sink's state, worth one log line.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Transition {
    Unchanged,
    BackingOff { delay: Duration },
    Recovered,
}

impl Breaker {
    pub fn allows(&self, now: Instant) -> bool {
        self.open_until.is_none_or(|until| now >= until)
    }

    pub fn open_until(&self) -> Option<Instant> {
        self.open_until
    }

    pub fn delivered(&mut self) -> Transition {
        let was_failing = self.failures > 0;
        self.failures = 0;
        self.open_until = None;
        if was_failing {
            Transition::Recovered
        } else {
            Transition::Unchanged
        }
    }

    /// Records an unavailable sink. `unit` is a random number in [0, 1) for jitter.
    pub fn unavailable(&mut self, now: Instant, retry_after: Option<Duration>, policy: &RetryPolicy, unit: f64) -> Transition {
        self.failures = self.failures.saturating_add(1);
        // Retry-After lengthens the back-off, never shortens it: `Retry-After: 0` from a sink
        // answering 503 had the worker ask it again at once, some 40 times a second.
        let backoff = policy.backoff(self.failures as i32, unit);
        let delay = retry_after.map_or(backoff, |asked| asked.max(backoff)).min(policy.backoff_max);
        self.open_until = Some(now + delay);
        if self.failures == 1 {
            Transition::BackingOff { delay }
        } else {
            Transition::Unchanged
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    #[test]
    fn batches_shrink_after_a_timeout_and_grow_back_as_they_are_delivered() {
        let mut limit = BatchLimit::default();
        assert_eq!(limit.of(100), 100);
        limit.delivered(100, 100);
        assert_eq!(limit.of(100), 100);
        limit.timed_out(100);
        assert_eq!(limit.of(100), 50);
        // a smaller batch (all there was) says nothing about a bigger one
        limit.delivered(7, 100);
        assert_eq!(limit.of(100), 50);
        for expected in [62, 77, 96, 100] {
            limit.delivered(limit.of(100) as usize, 100);
            assert_eq!(limit.of(100), expected);
        }
        assert_eq!(limit, BatchLimit::default(), "back at the batch size, the limit is gone");
        for _ in 0..10 {
            limit.timed_out(limit.of(100) as usize);
        }
        assert_eq!(limit.of(100), 1, "a single event is as small as batches go");
        limit.delivered(1, 100);
        assert_eq!(limit.of(100), 2);
        // a batch size lowered below the limit wins
        assert_eq!(limit.of(1), 1);
    }

    #[test]
    fn a_function_sink_names_a_function_and_nothing_more() {
        for function in ["app.apply", "\"My App\".\"Apply \"\"v2\"\"\"", "_s._f$1", "über.änderung"] {
            assert!(Sink::parse("function", &json!({ "function": function })).is_ok(), "{function}");
        }
        for function in ["app.f(int8, int8 --)", "app.f(jsonb)", "app.f --", "a.b.c", "a.", ".f", "\"unclosed", "\"\"", "1f", "app.f;", "app.f g", "app.\"f\"x"] {
            let error = Sink::parse("function", &json!({ "function": function })).unwrap_err().to_string();
            assert!(error.contains("must name a function as schema.name"), "{function}: {error}");
        }
        for function in ["apply", "_f$1", "\"Apply\""] {
            let error = Sink::parse("function", &json!({ "function": function })).unwrap_err().to_string();
            assert!(error.contains("must be qualified with its schema"), "{function}: {error}");
        }
        for function in ["pg_temp.f", "PG_TEMP.f", "\"pg_temp_3\".f"] {
            let error = Sink::parse("function", &json!({ "function": function })).unwrap_err().to_string();
            assert!(error.contains("is in a temporary schema"), "{function}: {error}");
        }
        assert!(Sink::parse("function", &json!({ "function": "\"PG_TEMP\".f" })).is_ok(), "a schema that only looks like it");
    }

    #[test]
    fn urls_the_worker_cannot_send_to_are_refused() {
        let error = |url: &str| Sink::parse("http", &json!({ "url": url })).unwrap_err().to_string();
        for url in ["http://127.0.0.1:8080/v1", "http://h/", "http://h:80/a@b?q=1#f", "http://h:1"] {
            assert!(Sink::parse("http", &json!({ "url": url })).is_ok(), "{url}");
        }
        assert!(error("http://127.0.0.1:8080/x y").contains("percent-encode"));
        assert!(error("http://h/x\ty").contains("control characters"));
        assert!(error("http://svc:pw@127.0.0.1/v1").contains("give them as a header"));
        assert!(error("http://[::1]:80/x").contains("use a host name"));
        for port in ["99999", "0", "x", ""] {
            assert!(error(&format!("http://h:{port}/")).contains("a port is a number from 1 to 65535"), "{port}");
        }
        assert!(error("http:///v1").contains("names no host"));
        assert!(error("http://:80/").contains("names no host"));
    }

    #[test]
    fn sinks_parse_with_their_options() {
        assert_eq!(Sink::parse("pull", &json!({"max_attempts": 3})).unwrap(), Sink::Pull);
        assert_eq!(Sink::parse("pull", &json!({"consumer_role": "Team B"})).unwrap(), Sink::Pull);
        assert_eq!(consumer_role(&json!({"consumer_role": "Team B"})).unwrap(), Some("Team B"));
        assert_eq!(consumer_role(&json!({})).unwrap(), None);
        assert_eq!(
            Sink::parse("function", &json!({"function": "app.apply", "batch_size": 50})).unwrap(),
            Sink::Function { function: "app.apply".into(), timeout: DEFAULT_TIMEOUT, batch_size: Some(50) }
        );
        assert_eq!(
            Sink::parse("function", &json!({"function": "app.apply", "timeout": "2 min"})).unwrap(),
            Sink::Function { function: "app.apply".into(), timeout: Duration::from_secs(120), batch_size: None }
        );
        let http = Sink::parse(
            "http",
            &json!({"url": "http://127.0.0.1:8080/v1/upsert", "headers": {"Authorization": "Bearer x"}, "timeout": "2s"}),
        )
        .unwrap();
        assert_eq!(
            http,
            Sink::Http(HttpSink {
                url: "http://127.0.0.1:8080/v1/upsert".into(),
                headers: vec![("Authorization".into(), "Bearer x".into())],
                timeout: Duration::from_secs(2),
                batch_size: None,
            })
        );
        assert_eq!(http.batch_size(), None);
    }

    #[test]
    fn bad_sink_options_are_named() {
        let cases = [
            ("function", json!({}), "a function sink needs"),
            ("function", json!({"function": "app.f", "url": "x"}), "unknown option \"url\" for a function sink"),
            ("function", json!({"function": "app.f", "timeout": "2h"}), "timeout must be between 1s and 1h"),
            ("http", json!({}), "an http sink needs"),
            ("http", json!({"url": "ftp://x"}), "url must start with http://"),
            ("http", json!({"url": "http:///path"}), "names no host"),
            ("http", json!({"url": "http://h", "headers": ["a"]}), "headers must be a JSON object"),
            ("http", json!({"url": "http://h", "headers": {"a b": "x"}}), "not a valid HTTP header name"),
            ("http", json!({"url": "http://h", "headers": {"X": "a\r\nb"}}), "contains a line break"),
            ("http", json!({"url": "http://h", "headers": {"X": 1}}), "must be a string"),
            ("http", json!({"url": "http://h", "headers": {"idempotency-key": "fixed"}}), "set by the HTTP sink itself"),
            ("http", json!({"url": "http://h", "headers": {"Content-Length": "5"}}), "set by the HTTP sink itself"),
            ("http", json!({"url": "http://h", "headers": {"Host": "evil"}}), "set by the HTTP sink itself"),
            ("http", json!({"url": "http://h", "timeout": "1500ms"}), "timeout of an http sink must be whole seconds"),
            ("http", json!({"url": "http://h", "timeout": "10ms"}), "timeout must be between 1s and 1h"),
            ("http", json!({"url": "http://h", "batch_size": 0}), "batch_size must be an integer between 1 and 10000"),
            ("http", json!({"url": "http://h", "retries": 3}), "unknown option \"retries\""),
            ("pull", json!({"url": "http://h"}), "unknown option \"url\" for a pull sink"),
            ("pull", json!({"consumer_role": ""}), "consumer_role must be the name of a role"),
            ("pull", json!({"consumer_role": ["a"]}), "consumer_role must be the name of a role"),
            ("http", json!({"url": "http://h", "consumer_role": "a"}), "unknown option \"consumer_role\" for a http sink"),
        ];
        for (sink, options, expected) in cases {
            let message = Sink::parse(sink, &options).unwrap_err().to_string();
            assert!(message.contains(expected), "{sink} {options}: {message}");
        }
        assert!(Sink::parse("kafka", &json!({})).unwrap_err().to_string().contains("unknown sink"));
    }

    #[test]
    fn answers_are_judged_by_status() {
        assert_eq!(judge(200, None, ""), Outcome::Delivered);
        assert_eq!(judge(204, None, ""), Outcome::Delivered);
        assert_eq!(judge(400, None, "bad vector\n"), Outcome::Rejected("HTTP 400: bad vector".into()));
        assert_eq!(judge(422, None, ""), Outcome::Rejected("HTTP 422".into()));
        assert_eq!(
            judge(429, Some("7"), "slow down"),
            Outcome::Unavailable { reason: "HTTP 429: slow down".into(), retry_after: Some(Duration::from_secs(7)) }
        );
        for status in [408, 500, 502, 503, 301, 600, 999, 101] {
            assert!(matches!(judge(status, None, ""), Outcome::Unavailable { retry_after: None, .. }), "{status}");
        }
    }

    #[test]
    fn retry_after_is_delta_seconds() {
        assert_eq!(parse_retry_after(" 3 "), Some(Duration::from_secs(3)));
        assert_eq!(parse_retry_after("Wed, 21 Oct 2015 07:28:00 GMT"), None);
        assert_eq!(parse_retry_after("999999999"), Some(Duration::from_secs(86_400)));
    }

    #[test]
    fn batches_carry_ids_and_split_in_halves() {
        assert_eq!(idempotency_key(&[4097, 4098, 8193]), "4097,4098,8193");
        assert_eq!(batch_body(["{\"id\":1}", "{\"id\":2}"]), "[{\"id\":1},{\"id\":2}]");
        assert_eq!(halves(&[1, 2, 3]), Some((vec![1], vec![2, 3])));
        assert_eq!(halves(&[1]), None);
    }

    fn policy() -> RetryPolicy {
        RetryPolicy { max_attempts: 3, backoff_base: Duration::from_secs(1), backoff_max: Duration::from_secs(4) }
    }

    #[test]
    fn breaker_backs_off_once_grows_and_recovers() {
        let now = Instant::now();
        let mut breaker = Breaker::default();
        assert!(breaker.allows(now));
        assert_eq!(breaker.unavailable(now, None, &policy(), 0.5), Transition::BackingOff { delay: Duration::from_secs(1) });
        assert!(!breaker.allows(now));
        assert!(breaker.allows(now + Duration::from_secs(1)));
        assert_eq!(breaker.unavailable(now, None, &policy(), 0.5), Transition::Unchanged);
        assert_eq!(breaker.open_until(), Some(now + Duration::from_secs(2)));
        for _ in 0..10 {
            breaker.unavailable(now, None, &policy(), 0.99);
        }
        assert!(breaker.open_until().unwrap() <= now + Duration::from_secs(4), "never beyond backoff_max");
        assert_eq!(breaker.delivered(), Transition::Recovered);
        assert!(breaker.allows(now));
        assert_eq!(breaker.delivered(), Transition::Unchanged);
    }

    #[test]
    fn retry_after_lengthens_the_pause_up_to_the_cap() {
        let now = Instant::now();
        let mut breaker = Breaker::default();
        breaker.unavailable(now, Some(Duration::from_secs(3)), &policy(), 0.5);
        assert_eq!(breaker.open_until(), Some(now + Duration::from_secs(3)));
        breaker.unavailable(now, Some(Duration::from_secs(60)), &policy(), 0.5);
        assert_eq!(breaker.open_until(), Some(now + Duration::from_secs(4)));
        let mut breaker = Breaker::default();
        breaker.unavailable(now, Some(Duration::ZERO), &policy(), 0.5);
        assert_eq!(breaker.open_until(), Some(now + Duration::from_secs(1)), "Retry-After: 0 does not skip the back-off");
    }
}
