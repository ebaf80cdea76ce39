//! The commands that read or change the outbox over one session. Each prints a human table
//! or, with `--json`, one JSON document.

use std::io::{BufRead, ErrorKind, IsTerminal, Write};
use std::time::Duration;

use postgres::types::ToSql;
use serde_json::{json, Value};

use crate::connect::Session;
use crate::error::{CliError, Result};
use crate::format::{clip, duration, duration_within_limit, parse_duration, printable, printable_lines, progress, Table};

/// How many events one `outbox_replay` call takes, so a large replay commits in steps and
/// shows progress.
const REPLAY_CHUNK: usize = 1000;

/// Writes `text` to stdout. A reader that went away (`outbox dead-letters list | head -1`)
/// ends the command quietly, as SIGPIPE ends other tools; other failures to write are errors.
pub fn print_out(text: &str) -> Result<()> {
    let mut stdout = std::io::stdout().lock();
    match stdout.write_all(text.as_bytes()).and_then(|()| stdout.flush()) {
        Ok(()) => Ok(()),
        Err(e) if e.kind() == ErrorKind::BrokenPipe => Err(CliError::OutputClosed),
        Err(e) => Err(CliError::Failed(format!("cannot write the output: {e}"))),
    }
}

pub fn print_json(value: &Value) -> Result<()> {
    print_out(&format!("{value}\n"))
}

// ---------------------------------------------------------------------------------------
// status

const STATUS: &str = "\
    SELECT b.subscription, b.pending, b.in_flight, b.retrying, b.dead, \
           extract(epoch FROM b.oldest_pending_age)::float8, \
           extract(epoch FROM b.avg_propagation_latency)::float8, \
           extract(epoch FROM b.p99_propagation_latency)::float8, \
           b.sink, b.backing_off, b.backing_off_until IS NOT NULL, \
           extract(epoch FROM b.backing_off_until - pg_catalog.now())::float8, \
           b.last_error, \
           extract(epoch FROM pg_catalog.now() - b.last_error_at)::float8, \
           extract(epoch FROM pg_catalog.now() - b.last_success_at)::float8 \
    FROM @extschema@.outbox_backlog b ORDER BY b.subscription";

/// One row of `outbox_backlog`, as status shows it.
struct Backlog {
    subscription: String,
    pending: i64,
    in_flight: i64,
    retrying: i64,
    dead: i64,
    oldest_pending_age: Option<f64>,
    avg_latency: Option<f64>,
    p99_latency: Option<f64>,
    sink: String,
    /// The worker waits before trying the sink again.
    backing_off: bool,
    /// The sink failed and has not succeeded since: backing off, or past it and being probed
    /// (the extension's `outbox_sink_up` is 0).
    sink_down: bool,
    backing_off_for: Option<f64>,
    last_error: Option<String>,
    since_last_error: Option<f64>,
    since_last_success: Option<f64>,
}

impl Backlog {
    fn sink_state(&self) -> String {
        if self.sink == "pull" {
            return "-".into();
        }
        let error = self.last_error.as_deref().map(|e| format!(": {}", clip(e, 60))).unwrap_or_default();
        // a smaller age is the more recent
        let failed_since_success = match (self.since_last_error, self.since_last_success) {
            (Some(error_age), Some(success_age)) => error_age < success_age,
            (Some(_), None) => true,
            (None, _) => false,
        };
        if self.backing_off {
            format!("down, retry in {}{error}", duration(self.backing_off_for))
        } else if self.sink_down {
            format!("down, probing{error}")
        } else if failed_since_success {
            format!("failing{error}")
        } else if let Some(ago) = self.since_last_success {
            format!("up, delivered {} ago", duration(Some(ago)))
        } else {
            "up, nothing delivered yet".into()
        }
    }

    fn to_json(&self) -> Value {
        json!({
            "subscription": self.subscription,
            "pending": self.pending,
            "in_flight": self.in_flight,
            "retrying": self.retrying,
            "dead": self.dead,
            "oldest_pending_age_seconds": self.oldest_pending_age,
            "avg_latency_seconds": self.avg_latency,
            "p99_latency_seconds": self.p99_latency,
            "sink": self.sink,
            "sink_up": (self.sink != "pull").then_some(!self.sink_down),
            "backing_off_seconds": self.backing_off_for.filter(|_| self.backing_off),
            "last_error": self.last_error,
            "last_error_seconds_ago": self.since_last_error,
            "last_success_seconds_ago": self.since_last_success,
        })
    }
}

fn backlog(session: &mut Session) -> Result<Vec<Backlog>> {
    let rows = session.client.query(&session.sql(STATUS), &[])?;
    Ok(rows
        .iter()
        .map(|r| Backlog {
            subscription: r.get(0),
            pending: r.get(1),
            in_flight: r.get(2),
            retrying: r.get(3),
            dead: r.get(4),
            oldest_pending_age: r.get(5),
            avg_latency: r.get(6),
            p99_latency: r.get(7),
            sink: r.get(8),
            backing_off: r.get(9),
            sink_down: r.get(10),
            backing_off_for: r.get(11),
            last_error: r.get(12),
            since_last_error: r.get(13),
            since_last_success: r.get(14),
        })
        .collect())
}

fn status_table(rows: &[Backlog]) -> String {
    let mut table = Table::new(&[
        ("SUBSCRIPTION", false),
        ("PENDING", true),
        ("IN FLIGHT", true),
        ("RETRYING", true),
        ("DEAD", true),
        ("OLDEST", true),
        ("AVG LATENCY", true),
        ("P99 LATENCY", true),
        ("SINK", false),
        ("STATE", false),
    ]);
    for row in rows {
        table.push(vec![
            row.subscription.clone(),
            row.pending.to_string(),
            row.in_flight.to_string(),
            row.retrying.to_string(),
            row.dead.to_string(),
            duration(row.oldest_pending_age),
            duration(row.avg_latency),
            duration(row.p99_latency),
            row.sink.clone(),
            row.sink_state(),
        ]);
    }
    table.render()
}

/// `status`, once or (`watch`) every so many seconds. A watch outlives the database going
/// away: it says so on stderr, keeps the last table on the screen, and connects again with
/// `config` at each refresh until it can.
pub fn status(session: &mut Session, config: &postgres::Config, json: bool, watch: Option<f64>) -> Result<()> {
    let Some(interval) = watch else {
        let rows = backlog(session)?;
        return if json {
            print_json(&Value::Array(rows.iter().map(Backlog::to_json).collect()))
        } else {
            print_out(&status_table(&rows))
        };
    };
    let mut lost = false;
    loop {
        if lost {
            match Session::open(config) {
                Ok(again) => {
                    *session = again;
                    lost = false;
                    eprintln!("outbox: connected again");
                }
                Err(_) => {
                    std::thread::sleep(Duration::from_secs_f64(interval));
                    continue;
                }
            }
        }
        let rows = match backlog(session) {
            Ok(rows) => rows,
            Err(error) if session.client.is_closed() => {
                eprintln!("outbox: lost the database ({}); connecting again every {}", printable(&error.to_string()), duration(Some(interval)));
                lost = true;
                continue;
            }
            Err(error) => return Err(error),
        };
        let mut out = std::io::stdout().lock();
        let written = if json {
            writeln!(out, "{}", Value::Array(rows.iter().map(Backlog::to_json).collect()))
        } else {
            // home, clear, and redraw: the table refreshes in place like watch(1)
            write!(out, "\x1b[H\x1b[2Joutbox status, every {}  (Ctrl-C to stop)\n\n{}", duration(Some(interval)), status_table(&rows))
        };
        if written.and_then(|_| out.flush()).is_err() {
            // the reader went away (a closed pipe): stop quietly, as watch(1) does
            return Ok(());
        }
        drop(out);
        std::thread::sleep(Duration::from_secs_f64(interval));
    }
}

// ---------------------------------------------------------------------------------------
// confirmation

/// Goes ahead when `count` is at most `threshold`, `--yes` was given, or the operator says yes
/// at the terminal. Without a terminal, a large change needs `--yes`.
pub fn confirm(what: &str, count: usize, threshold: usize, yes: bool) -> Result<()> {
    if yes || count <= threshold {
        return Ok(());
    }
    let stdin = std::io::stdin();
    if !stdin.is_terminal() {
        // (a command that always asks has no --confirm-above to name)
        let limit = if threshold > 0 { format!(", more than --confirm-above {threshold}") } else { String::new() };
        return Err(CliError::Declined(format!("{what} would touch {count} events{limit}; rerun with --yes (nothing was changed)")));
    }
    eprint!("{what} would touch {count} events. Go ahead? [y/N] ");
    let mut answer = String::new();
    stdin.lock().read_line(&mut answer).map_err(|e| CliError::Failed(format!("reading the answer: {e}")))?;
    if matches!(answer.trim().to_ascii_lowercase().as_str(), "y" | "yes") {
        Ok(())
    } else {
        Err(CliError::Declined("declined; nothing was changed".into()))
    }
}

// ---------------------------------------------------------------------------------------
// dead letters

fn subscription_exists(session: &mut Session, name: &str) -> Result<()> {
    let found = session
        .client
        .query_opt(&session.sql("SELECT 1 FROM @extschema@.outbox_subscriptions WHERE name = $1"), &[&name])?;
    match found {
        Some(_) => Ok(()),
        None => Err(CliError::Failed(format!("subscription \"{name}\" does not exist"))),
    }
}

pub fn dead_letters_list(session: &mut Session, json: bool, subscription: Option<&str>, limit: i64) -> Result<()> {
    if let Some(name) = subscription {
        subscription_exists(session, name)?;
    }
    let total: i64 = session
        .client
        .query_one(
            &session.sql("SELECT pg_catalog.count(*) FROM @extschema@.outbox_dead_letters WHERE ($1::text IS NULL OR subscription = $1)"),
            &[&subscription],
        )?
        .get(0);
    let rows = session.client.query(
        &session.sql(
            "SELECT subscription, event_id, type, attempts, pg_catalog.to_json(failed_at) #>> '{}', last_error \
             FROM @extschema@.outbox_dead_letters WHERE ($1::text IS NULL OR subscription = $1) \
             ORDER BY failed_at DESC, event_id LIMIT $2",
        ),
        &[&subscription, &limit],
    )?;
    if json {
        let letters: Vec<Value> = rows
            .iter()
            .map(|r| {
                json!({"subscription": r.get::<_, String>(0), "id": r.get::<_, i64>(1), "type": r.get::<_, String>(2),
                       "attempts": r.get::<_, i32>(3), "failed_at": r.get::<_, String>(4), "last_error": r.get::<_, Option<String>>(5)})
            })
            .collect();
        return print_json(&json!({"total": total, "dead_letters": letters}));
    }
    let mut table =
        Table::new(&[("SUBSCRIPTION", false), ("ID", true), ("TYPE", false), ("ATTEMPTS", true), ("FAILED AT", false), ("LAST ERROR", false)]);
    for r in &rows {
        table.push(vec![
            r.get(0),
            r.get::<_, i64>(1).to_string(),
            r.get(2),
            r.get::<_, i32>(3).to_string(),
            r.get(4),
            clip(r.get::<_, Option<String>>(5).as_deref().unwrap_or("-"), 80),
        ]);
    }
    print_out(&format!("{}{} of {total} dead letters\n", table.render(), rows.len()))
}

pub fn dead_letters_show(session: &mut Session, json: bool, id: i64, subscription: Option<&str>) -> Result<()> {
    let rows = session.client.query(
        &session.sql(
            "SELECT subscription, event_id, type, attempts, pg_catalog.to_json(failed_at) #>> '{}', \
                    pg_catalog.to_json(created_at) #>> '{}', last_error, payload \
             FROM @extschema@.outbox_dead_letters WHERE event_id = $1 AND ($2::text IS NULL OR subscription = $2) \
             ORDER BY subscription",
        ),
        &[&id, &subscription],
    )?;
    if rows.is_empty() {
        let scope = subscription.map(|s| format!(" in subscription \"{s}\"")).unwrap_or_default();
        return Err(CliError::Failed(format!("no dead letter with id {id}{scope}")));
    }
    let letters: Vec<Value> = rows
        .iter()
        .map(|r| {
            json!({"subscription": r.get::<_, String>(0), "id": r.get::<_, i64>(1), "type": r.get::<_, String>(2),
                   "attempts": r.get::<_, i32>(3), "failed_at": r.get::<_, String>(4), "created_at": r.get::<_, String>(5),
                   "last_error": r.get::<_, Option<String>>(6), "payload": r.get::<_, Value>(7)})
        })
        .collect();
    if json {
        return print_json(&Value::Array(letters));
    }
    let mut out = String::new();
    for letter in letters {
        for key in ["subscription", "id", "type", "attempts", "created_at", "failed_at", "last_error"] {
            let value = &letter[key];
            // an error may span lines (a response body), the other fields are one line each
            let text = value.as_str().map(str::to_string).unwrap_or_else(|| value.to_string());
            let text = if key == "last_error" { printable_lines(&text) } else { printable(&text) };
            out.push_str(&format!("{key:<13}{text}\n"));
        }
        // JSON escapes C0 in strings, not DEL or C1
        let payload = serde_json::to_string_pretty(&letter["payload"]).unwrap_or_default();
        out.push_str(&format!("payload\n{}\n\n", printable_lines(&payload)));
    }
    print_out(&out)
}

pub fn dead_letters_requeue(
    session: &mut Session,
    json: bool,
    subscription: Option<&str>,
    ids: Option<Vec<i64>>,
    threshold: usize,
    yes: bool,
) -> Result<()> {
    if let Some(name) = subscription {
        subscription_exists(session, name)?;
    }
    if let Some(ids) = &ids {
        let missing: Vec<String> = session
            .client
            .query(
                &session.sql(
                    "SELECT i FROM pg_catalog.unnest($2::bigint[]) AS i \
                     WHERE NOT EXISTS (SELECT 1 FROM @extschema@.outbox_dead_letters d \
                                       WHERE d.event_id = i AND ($1::text IS NULL OR d.subscription = $1)) ORDER BY 1",
                ),
                &[&subscription, ids],
            )?
            .iter()
            .map(|r| r.get::<_, i64>(0).to_string())
            .collect();
        if !missing.is_empty() {
            return Err(CliError::Failed(format!("no dead letter with id {}; nothing was requeued", missing.join(", "))));
        }
    }
    // Counted as outbox_requeue_dead moves them, one per subscription and event: an event dead
    // in two subscriptions is two dead letters, and --id without --subscription takes it from
    // every subscription where it is dead, which the messages name.
    let counts: Vec<(String, i64)> = session
        .client
        .query(
            &session.sql(
                "SELECT d.subscription, pg_catalog.count(*) FROM @extschema@.outbox_dead_letters d \
                 JOIN @extschema@.outbox_subscriptions s ON s.name = d.subscription \
                 WHERE ($1::text IS NULL OR d.subscription = $1) AND ($2::bigint[] IS NULL OR d.event_id = ANY ($2)) \
                 GROUP BY d.subscription ORDER BY d.subscription",
            ),
            &[&subscription, &ids],
        )?
        .iter()
        .map(|r| (r.get(0), r.get(1)))
        .collect();
    let count: i64 = counts.iter().map(|(_, n)| n).sum();
    let names: Vec<String> = counts.iter().map(|(name, _)| format!("\"{}\"", printable(name))).collect();
    let scope = match names.as_slice() {
        [] => String::new(),
        [name] => format!(" of subscription {name}"),
        names => format!(" of subscriptions {}", names.join(", ")),
    };
    confirm(&format!("requeueing dead letters{scope}"), count as usize, threshold, yes)?;
    let requeued: i64 = session
        .client
        .query_one(&session.sql("SELECT @extschema@.outbox_requeue_dead(subscription => $1, ids => $2)"), &[&subscription, &ids])?
        .get(0);
    // those whose row has a newer event stay dead (see outbox_requeue_dead)
    let stay_dead = (count - requeued).max(0);
    if json {
        let subscriptions: Vec<&str> = counts.iter().map(|(name, _)| name.as_str()).collect();
        return print_json(&json!({"requeued": requeued, "stay_dead": stay_dead, "subscriptions": subscriptions}));
    }
    let stay = match stay_dead {
        0 => String::new(),
        stay => format!("; {stay} stay dead, their row having a newer event"),
    };
    print_out(&format!("requeued {requeued} dead letters{scope}{stay}\n"))
}

pub fn dead_letters_purge(
    session: &mut Session,
    json: bool,
    older_than: &str,
    subscription: Option<&str>,
    threshold: usize,
    yes: bool,
) -> Result<()> {
    let seconds =
        parse_duration(older_than).and_then(|s| duration_within_limit("--older-than", older_than, s)).map_err(CliError::Usage)?;
    if let Some(name) = subscription {
        subscription_exists(session, name)?;
    }
    let count: i64 = session
        .client
        .query_one(
            &session.sql(
                "SELECT pg_catalog.count(*) FROM @extschema@.outbox_dead_letters \
                 WHERE failed_at < pg_catalog.now() - pg_catalog.make_interval(secs => $1) \
                   AND ($2::text IS NULL OR subscription = $2)",
            ),
            &[&seconds, &subscription],
        )?
        .get(0);
    confirm("purging", count as usize, threshold, yes)?;
    let purged: i64 = session
        .client
        .query_one(
            &session.sql(
                "SELECT @extschema@.outbox_purge_dead_letters(pg_catalog.make_interval(secs => $1), subscription => $2)",
            ),
            &[&seconds, &subscription],
        )?
        .get(0);
    if json {
        print_json(&json!({"purged": purged}))
    } else {
        print_out(&format!("purged {purged} dead letters\n"))
    }
}

// ---------------------------------------------------------------------------------------
// replay

/// `--since` as a timestamp: a duration means that long ago; anything else must be a
/// timestamp Postgres reads.
fn since_timestamp(session: &mut Session, since: &str) -> Result<String> {
    if let Ok(seconds) = parse_duration(since) {
        let seconds = duration_within_limit("--since", since, seconds).map_err(CliError::Usage)?;
        let row = session.client.query_one(
            "SELECT pg_catalog.to_json(pg_catalog.now() - pg_catalog.make_interval(secs => $1)) #>> '{}'",
            &[&seconds],
        )?;
        return Ok(row.get(0));
    }
    match session.client.query_one("SELECT pg_catalog.to_json($1::text::timestamptz) #>> '{}'", &[&since]) {
        Ok(row) => Ok(row.get(0)),
        Err(e) if e.as_db_error().is_some() => Err(CliError::Usage(format!(
            "invalid --since {since:?}: give a timestamp like 2026-11-28T09:00:00Z or a duration like 2h"
        ))),
        Err(e) => Err(e.into()),
    }
}

pub fn replay(
    session: &mut Session,
    json: bool,
    subscription: &str,
    since: Option<&str>,
    ids: Option<Vec<i64>>,
    threshold: usize,
    yes: bool,
) -> Result<()> {
    subscription_exists(session, subscription)?;
    let since = since.map(|s| since_timestamp(session, s)).transpose()?;
    let replayable: Vec<i64> = session
        .client
        .query(
            &session.sql("SELECT r FROM @extschema@.outbox_replayable(subscription => $1, since => $2::text::timestamptz, ids => $3) r"),
            &[&subscription, &since, &ids],
        )?
        .iter()
        .map(|r| r.get(0))
        .collect();
    confirm(&format!("replaying subscription \"{subscription}\""), replayable.len(), threshold, yes)?;
    let show_progress = replayable.len() > REPLAY_CHUNK;
    let stderr_is_terminal = std::io::stderr().is_terminal();
    let mut replayed = 0i64;
    for (done, chunk) in replayable.chunks(REPLAY_CHUNK).enumerate() {
        let chunk = chunk.to_vec();
        let args: [&(dyn ToSql + Sync); 2] = [&subscription, &chunk];
        replayed += session
            .client
            .query_one(&session.sql("SELECT @extschema@.outbox_replay(subscription => $1, ids => $2)"), &args)?
            .get::<_, i64>(0);
        if show_progress {
            let bar = progress((done * REPLAY_CHUNK + chunk.len()).min(replayable.len()), replayable.len());
            // a progress bar nobody reads (`2>&1 | head`) is no reason to stop a replay halfway
            let _ = if stderr_is_terminal { write!(std::io::stderr(), "\r{bar}") } else { writeln!(std::io::stderr(), "{bar}") };
        }
    }
    if show_progress && stderr_is_terminal {
        let _ = writeln!(std::io::stderr());
    }
    if json {
        print_json(&json!({"subscription": subscription, "replayed": replayed}))
    } else {
        print_out(&format!("replayed {replayed} events of subscription \"{subscription}\"\n"))
    }
}

// ---------------------------------------------------------------------------------------
// subscriptions, attach, detach

const REDACTED: &str = "<redacted>";

/// Header values of http sinks are credentials as often as not, and so are the user
/// information and query values of their URL (`http://svc:pw@host/v1?api_key=...`): show only
/// the names.
fn redact_options(mut options: Value) -> Value {
    if let Some(headers) = options.get_mut("headers").and_then(Value::as_object_mut) {
        for value in headers.values_mut() {
            *value = Value::String(REDACTED.into());
        }
    }
    if let Some(url) = options.get_mut("url") {
        if let Some(redacted) = url.as_str().map(redact_url) {
            *url = Value::String(redacted);
        }
    }
    options
}

fn redact_url(url: &str) -> String {
    let (scheme, rest) = match url.split_once("://") {
        Some((scheme, rest)) => (format!("{scheme}://"), rest),
        None => (String::new(), url),
    };
    let (authority, rest) = rest.split_at(rest.find(['/', '?', '#']).unwrap_or(rest.len()));
    // all of the user information: a token is often given as the user name
    let authority = match authority.rsplit_once('@') {
        Some((_, host)) => format!("{REDACTED}@{host}"),
        None => authority.to_string(),
    };
    let Some((path, query)) = rest.split_once('?') else { return format!("{scheme}{authority}{rest}") };
    let parameters: Vec<String> = query
        .split('&')
        .map(|parameter| match parameter.split_once('=') {
            Some((name, _)) => format!("{name}={REDACTED}"),
            None if parameter.is_empty() => String::new(),
            None => REDACTED.into(),
        })
        .collect();
    format!("{scheme}{authority}{path}?{}", parameters.join("&"))
}

pub fn subscriptions_list(session: &mut Session, json: bool) -> Result<()> {
    let rows = session.client.query(
        &session.sql(
            "SELECT name, sink, options, pg_catalog.to_json(created_at) #>> '{}' FROM @extschema@.outbox_subscriptions ORDER BY name",
        ),
        &[],
    )?;
    let subscriptions: Vec<Value> = rows
        .iter()
        .map(|r| {
            json!({"name": r.get::<_, String>(0), "sink": r.get::<_, String>(1),
                   "options": redact_options(r.get(2)), "created_at": r.get::<_, String>(3)})
        })
        .collect();
    if json {
        return print_json(&Value::Array(subscriptions));
    }
    let mut table = Table::new(&[("NAME", false), ("SINK", false), ("OPTIONS", false), ("CREATED AT", false)]);
    for s in subscriptions {
        table.push(vec![
            s["name"].as_str().unwrap_or_default().into(),
            s["sink"].as_str().unwrap_or_default().into(),
            s["options"].to_string(),
            s["created_at"].as_str().unwrap_or_default().into(),
        ]);
    }
    print_out(&table.render())
}

pub fn subscriptions_add(session: &mut Session, json: bool, name: &str, sink: &str, options: &str, from_start: bool) -> Result<()> {
    let options: Value =
        serde_json::from_str(options).map_err(|e| CliError::Usage(format!("--options is not valid JSON: {e}")))?;
    session.client.execute(
        &session.sql("SELECT @extschema@.outbox_subscribe(name => $1, sink => $2, options => $3, from_start => $4)"),
        &[&name, &sink, &options, &from_start],
    )?;
    if json {
        print_json(&json!({"subscribed": name}))
    } else {
        print_out(&format!("subscription \"{name}\" added\n"))
    }
}

pub fn subscriptions_remove(session: &mut Session, json: bool, name: &str, yes: bool) -> Result<()> {
    subscription_exists(session, name)?;
    let backlog: i64 = session
        .client
        .query_one(
            &session.sql(
                "SELECT pending + in_flight + retrying + dead FROM @extschema@.outbox_backlog WHERE subscription = $1",
            ),
            &[&name],
        )?
        .get(0);
    // removing drops the subscription's undelivered events and dead letters with it
    confirm(&format!("removing subscription \"{name}\" with its undelivered events"), backlog as usize, 0, yes)?;
    session.client.execute(&session.sql("SELECT @extschema@.outbox_unsubscribe(name => $1)"), &[&name])?;
    if json {
        print_json(&json!({"unsubscribed": name}))
    } else {
        print_out(&format!("subscription \"{name}\" removed\n"))
    }
}

pub struct Attach<'a> {
    pub table: &'a str,
    pub payload_columns: Option<Vec<String>>,
    pub watch_columns: Option<Vec<String>>,
    pub event_prefix: Option<String>,
    pub key_columns: Option<Vec<String>>,
}

pub fn attach(session: &mut Session, json: bool, attach: Attach<'_>) -> Result<()> {
    // only the given settings are passed, so the function's defaults hold for the rest
    let mut named = vec!["source => $1::text::pg_catalog.regclass".to_string()];
    let mut args: Vec<&(dyn ToSql + Sync)> = vec![&attach.table];
    for (name, value) in
        [("payload_columns", &attach.payload_columns), ("watch_columns", &attach.watch_columns), ("key_columns", &attach.key_columns)]
    {
        if let Some(value) = value {
            args.push(value);
            named.push(format!("{name} => ${}::text[]", args.len()));
        }
    }
    if let Some(prefix) = &attach.event_prefix {
        args.push(prefix);
        named.push(format!("event_prefix => ${}::text", args.len()));
    }
    session.client.execute(&session.sql(&format!("SELECT @extschema@.outbox_attach({})", named.join(", "))), &args)?;
    if json {
        print_json(&json!({"attached": attach.table}))
    } else {
        print_out(&format!("capturing changes of {}\n", attach.table))
    }
}

pub fn detach(session: &mut Session, json: bool, table: &str) -> Result<()> {
    session.client.execute(&session.sql("SELECT @extschema@.outbox_detach($1::text::pg_catalog.regclass)"), &[&table])?;
    if json {
        print_json(&json!({"detached": table}))
    } else {
        print_out(&format!("no longer capturing changes of {table}\n"))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn header_values_are_redacted() {
        let options = json!({"url": "http://h/x", "headers": {"Authorization": "Bearer secret"}, "timeout": "2s"});
        let shown = redact_options(options);
        assert_eq!(shown["headers"]["Authorization"], "<redacted>");
        assert_eq!(shown["url"], "http://h/x");
        assert!(!shown.to_string().contains("secret"));
    }

    #[test]
    fn url_credentials_and_query_values_are_redacted() {
        let shown = redact_options(json!({"url": "http://svc:hunter2@host:8080/v1?api_key=TOPSECRET&x=1&bare#f"}));
        assert_eq!(shown["url"], "http://<redacted>@host:8080/v1?api_key=<redacted>&x=<redacted>&<redacted>");
        for (url, shown) in [
            ("http://token@host/v1", "http://<redacted>@host/v1"),
            ("http://u:p@ss@host", "http://<redacted>@host"),
            ("http://host/v1/upsert", "http://host/v1/upsert"),
            ("http://host?", "http://host?"),
            ("http://[::1]:80/a@b", "http://[::1]:80/a@b"),
        ] {
            assert_eq!(redact_url(url), shown, "{url}");
        }
    }

    fn backlog(sink: &str) -> Backlog {
        Backlog {
            subscription: "s".into(),
            pending: 0,
            in_flight: 0,
            retrying: 0,
            dead: 0,
            oldest_pending_age: None,
            avg_latency: None,
            p99_latency: None,
            sink: sink.into(),
            backing_off: false,
            sink_down: false,
            backing_off_for: None,
            last_error: None,
            since_last_error: None,
            since_last_success: None,
        }
    }

    #[test]
    fn sink_states() {
        let mut row = backlog("pull");
        assert_eq!(row.sink_state(), "-");
        assert_eq!(row.to_json()["sink_up"], Value::Null);
        row.sink = "http".into();
        assert_eq!(row.sink_state(), "up, nothing delivered yet");
        row.since_last_success = Some(3.0);
        assert_eq!(row.sink_state(), "up, delivered 3.0s ago");
        assert_eq!(row.to_json()["sink_up"], json!(true));
        // an error older than the last success is past
        row.last_error = Some("HTTP 503".into());
        row.since_last_error = Some(10.0);
        assert_eq!(row.sink_state(), "up, delivered 3.0s ago");
        // every batch since the last success failed
        row.since_last_error = Some(1.0);
        row.since_last_success = Some(6.6);
        assert_eq!(row.sink_state(), "failing: HTTP 503");
        row.since_last_success = None;
        assert_eq!(row.sink_state(), "failing: HTTP 503");
        assert_eq!(row.to_json()["sink_up"], json!(true));
        row.backing_off = true;
        row.sink_down = true;
        row.backing_off_for = Some(30.0);
        assert_eq!(row.sink_state(), "down, retry in 30.0s: HTTP 503");
        assert_eq!(row.to_json()["sink_up"], json!(false));
        assert_eq!(row.to_json()["backing_off_seconds"], json!(30.0));
        // the backoff ran out and the worker is trying the sink again
        row.backing_off = false;
        row.backing_off_for = Some(-2.0);
        assert_eq!(row.sink_state(), "down, probing: HTTP 503");
        assert_eq!(row.to_json()["sink_up"], json!(false));
        assert_eq!(row.to_json()["backing_off_seconds"], Value::Null);
    }

    #[test]
    fn the_status_table_escapes_control_characters() {
        let mut row = backlog("http");
        row.subscription = "s\x1b[8m".into();
        row.last_error = Some("\x1b]0;owned\x07HTTP 500\u{9b}2J".into());
        row.since_last_error = Some(1.0);
        let table = status_table(&[row]);
        assert!(!table.chars().any(|c| c.is_control() && c != '\n'), "{table:?}");
        assert!(table.contains("s\\u{1b}[8m") && table.contains("failing: \\u{1b}]0;owned\\u{7}HTTP 500\\u{9b}2J"), "{table}");
    }
}
