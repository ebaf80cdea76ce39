//! The `outbox` binary against a real Postgres with the extension installed (scripts/test.sh
//! installs it): every command, its JSON parsed, its mistakes refused with one line and a
//! meaningful exit code, and the exporter through a database outage.

#[path = "../../tests/common/mod.rs"]
mod common;

use std::io::{BufRead, BufReader, Read, Write};
use std::net::TcpStream;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use common::*;
use serde_json::{json, Value};

struct Run {
    code: i32,
    stdout: String,
    stderr: String,
}

fn outbox(dsn: &str, args: &[&str]) -> Run {
    let out = Command::new(env!("CARGO_BIN_EXE_outbox"))
        .args(["--dsn", dsn])
        .args(args)
        .stdin(Stdio::null())
        .env("RUST_BACKTRACE", "1")
        .output()
        .unwrap();
    Run {
        code: out.status.code().unwrap_or(-1),
        stdout: String::from_utf8(out.stdout).unwrap(),
        stderr: String::from_utf8(out.stderr).unwrap(),
    }
}

/// Runs a command that must succeed and returns its JSON output.
fn json_of(dsn: &str, args: &[&str]) -> Value {
    let run = outbox(dsn, &[&["--json"], args].concat());
    assert_eq!(run.code, 0, "{args:?}: {}", run.stderr);
    serde_json::from_str(&run.stdout).unwrap_or_else(|e| panic!("{args:?} printed no JSON ({e}): {}", run.stdout))
}

/// Runs a command that must fail with `code` and one line naming the problem.
fn refused(dsn: &str, args: &[&str], code: i32, message: &str) {
    let run = outbox(dsn, args);
    assert_eq!(run.code, code, "{args:?}: {}{}", run.stdout, run.stderr);
    assert_eq!(run.stderr.lines().count(), 1, "{args:?} should explain in one line: {}", run.stderr);
    assert!(run.stderr.starts_with("outbox: ") && run.stderr.contains(message), "{args:?}: {}", run.stderr);
    assert!(!run.stderr.contains("panicked") && !run.stderr.contains("backtrace"), "{}", run.stderr);
}

/// A fresh database with `chunks` attached; its DSN and a client.
fn setup(name: &str) -> (String, Client) {
    let cluster = shared();
    let db = cluster.database(name);
    let mut client = cluster.connect(&db);
    chunks(&mut client, "");
    (cluster.dsn(&db), client)
}

fn insert(client: &mut Client, ids: std::ops::RangeInclusive<i64>) {
    client.execute("INSERT INTO chunks SELECT g, 1, 'c', '{0.5}' FROM generate_series($1::bigint, $2::bigint) g", &[ids.start(), ids.end()]).unwrap();
}

fn row_of<'a>(status: &'a Value, subscription: &str) -> &'a Value {
    status.as_array().unwrap().iter().find(|r| r["subscription"] == subscription).unwrap_or_else(|| panic!("{subscription} in {status}"))
}

#[test]
fn status_of_an_empty_outbox() {
    let (dsn, _) = setup("cli_status_empty");
    let status = json_of(&dsn, &["status"]);
    assert_eq!(
        status,
        json!([{"subscription": "default", "pending": 0, "in_flight": 0, "retrying": 0, "dead": 0,
                "oldest_pending_age_seconds": null, "avg_latency_seconds": null, "p99_latency_seconds": null,
                "sink": "pull", "sink_up": null, "backing_off_seconds": null, "last_error": null,
                "last_error_seconds_ago": null, "last_success_seconds_ago": null}])
    );
    let table = outbox(&dsn, &["status"]);
    assert_eq!(table.code, 0);
    let lines: Vec<&str> = table.stdout.lines().collect();
    assert!(lines[0].starts_with("SUBSCRIPTION  PENDING  IN FLIGHT  RETRYING  DEAD  OLDEST  AVG LATENCY  P99 LATENCY  SINK"), "{}", table.stdout);
    assert!(lines[1].starts_with("default") && lines[1].contains("pull"), "{}", table.stdout);
}

#[test]
fn status_of_a_busy_outbox() {
    let (dsn, mut c) = setup("cli_status_busy");
    c.batch_execute("SELECT outbox_subscribe('search', options => '{\"max_attempts\": 1}')").unwrap();
    insert(&mut c, 1..=5);
    let claimed = ids(&claim(&mut c, "SELECT * FROM outbox_claim(2)"));
    c.execute("SELECT outbox_ack($1)", &[&vec![claimed[0]]]).unwrap();
    let failed = ids(&claim(&mut c, "SELECT * FROM outbox_claim(1, 'search')"));
    c.execute("SELECT outbox_fail($1, 'mapping error', 'search')", &[&failed]).unwrap();

    let status = json_of(&dsn, &["status"]);
    let default = row_of(&status, "default");
    assert_eq!((default["pending"].as_i64(), default["in_flight"].as_i64(), default["dead"].as_i64()), (Some(3), Some(1), Some(0)));
    assert!(default["oldest_pending_age_seconds"].as_f64().unwrap() > 0.0);
    assert!(default["avg_latency_seconds"].as_f64().unwrap() > 0.0);
    assert!(default["p99_latency_seconds"].as_f64().unwrap() > 0.0);
    let search = row_of(&status, "search");
    assert_eq!((search["pending"].as_i64(), search["dead"].as_i64()), (Some(4), Some(1)));

    let table = outbox(&dsn, &["status"]).stdout;
    let search_line = table.lines().find(|l| l.starts_with("search")).unwrap();
    let cells: Vec<&str> = search_line.split_whitespace().collect();
    assert_eq!(&cells[..5], ["search", "4", "0", "0", "1"], "{table}");
}

#[test]
fn status_watch_refreshes_in_place() {
    let (dsn, mut c) = setup("cli_status_watch");
    let spawn = |json: bool| -> Child {
        let mut args = vec!["--dsn", &dsn, "status", "--watch", "--interval", "0.2"];
        if json {
            args.push("--json");
        }
        Command::new(env!("CARGO_BIN_EXE_outbox")).args(args).stdout(Stdio::piped()).stderr(Stdio::null()).spawn().unwrap()
    };
    let mut watcher = spawn(true);
    let mut lines = BufReader::new(watcher.stdout.take().unwrap()).lines();
    let first: Value = serde_json::from_str(&lines.next().unwrap().unwrap()).unwrap();
    assert_eq!(row_of(&first, "default")["pending"], 0);
    insert(&mut c, 1..=2);
    let refreshed = lines.take(50).map(|l| serde_json::from_str::<Value>(&l.unwrap()).unwrap()).any(|s| row_of(&s, "default")["pending"] == 2);
    watcher.kill().unwrap();
    watcher.wait().unwrap();
    assert!(refreshed, "a later refresh shows the new events");

    let mut watcher = spawn(false);
    let mut stdout = watcher.stdout.take().unwrap();
    let mut seen = Vec::new();
    let mut buffer = [0u8; 4096];
    while seen.windows(4).filter(|w| w == b"\x1b[2J").count() < 3 {
        let n = stdout.read(&mut buffer).unwrap();
        assert!(n > 0, "the watcher stopped");
        seen.extend_from_slice(&buffer[..n]);
    }
    watcher.kill().unwrap();
    watcher.wait().unwrap();
    let text = String::from_utf8_lossy(&seen);
    assert!(text.starts_with("\x1b[H\x1b[2J") && text.matches("SUBSCRIPTION").count() >= 2, "{text}");
}

/// A watch outlives a restart of the database: it says so on stderr and connects again,
/// where it exited on the first refresh after the restart.
#[test]
fn status_watch_connects_again_after_a_restart() {
    // its own server, which this test stops and starts
    let cluster = Cluster::start(&[]);
    let db = cluster.database("watch_restart");
    let mut c = cluster.connect(&db);
    chunks(&mut c, "");
    drop(c);
    let mut watcher = Command::new(env!("CARGO_BIN_EXE_outbox"))
        .args(["--dsn", &cluster.dsn(&db), "--json", "status", "--watch", "--interval", "0.2"])
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    let mut lines = BufReader::new(watcher.stdout.take().unwrap()).lines();
    lines.next().unwrap().unwrap();
    cluster.stop("fast");
    std::thread::sleep(Duration::from_millis(600));
    cluster.pg_ctl_start();
    let mut c = cluster.connect(&db);
    insert(&mut c, 1..=2);
    let refreshed = lines.take(100).map(|l| serde_json::from_str::<Value>(&l.unwrap()).unwrap()).any(|s| row_of(&s, "default")["pending"] == 2);
    assert!(watcher.try_wait().unwrap().is_none(), "the watch is still running");
    watcher.kill().unwrap();
    let mut stderr = String::new();
    watcher.stderr.take().unwrap().read_to_string(&mut stderr).unwrap();
    watcher.wait().unwrap();
    assert!(refreshed, "it shows what was written after the restart; {stderr}");
    assert!(stderr.contains("outbox: lost the database (") && stderr.contains("outbox: connected again"), "{stderr}");
}

#[test]
fn dead_letters_list_show_requeue_purge() {
    let (dsn, mut c) = setup("cli_dead_letters");
    c.batch_execute("SELECT outbox_subscribe('search', options => '{\"max_attempts\": 1}')").unwrap();
    insert(&mut c, 1..=3);
    let dead = ids(&claim(&mut c, "SELECT * FROM outbox_claim(10, 'search')"));
    c.execute("SELECT outbox_fail($1, 'HTTP 400: bad vector', 'search')", &[&dead]).unwrap();

    let listed = json_of(&dsn, &["dead-letters", "list"]);
    assert_eq!(listed["total"], 3);
    let letters = listed["dead_letters"].as_array().unwrap();
    assert_eq!(letters.len(), 3);
    assert!(letters.iter().all(|l| l["subscription"] == "search" && l["last_error"] == "HTTP 400: bad vector" && l["attempts"] == 1));
    let limited = json_of(&dsn, &["dead-letters", "list", "--subscription", "search", "--limit", "2"]);
    assert_eq!((limited["total"].as_i64(), limited["dead_letters"].as_array().unwrap().len()), (Some(3), 2));
    let table = outbox(&dsn, &["dead-letters", "list"]);
    assert!(table.stdout.contains("LAST ERROR") && table.stdout.contains("3 of 3 dead letters"), "{}", table.stdout);

    let id = dead[0].to_string();
    let shown = json_of(&dsn, &["dead-letters", "show", &id]);
    assert_eq!(shown[0]["payload"], json!({"table": "public.chunks", "key": {"id": 1}}));
    assert_eq!(shown[0]["type"], "EMBED_UPSERT");
    assert!(outbox(&dsn, &["dead-letters", "show", &id]).stdout.contains("\"table\": \"public.chunks\""));
    refused(&dsn, &["dead-letters", "show", "424242"], 1, "no dead letter with id 424242");

    assert_eq!(json_of(&dsn, &["dead-letters", "requeue", "--id", &id]), json!({"requeued": 1, "stay_dead": 0, "subscriptions": ["search"]}));
    assert_eq!(claim(&mut c, "SELECT * FROM outbox_claim(10, 'search')").len(), 1, "requeued and claimable");
    refused(&dsn, &["dead-letters", "requeue", "--id", "424242"], 1, "no dead letter with id 424242; nothing was requeued");
    refused(&dsn, &["dead-letters", "requeue", "--subscription", "search", "--confirm-above", "1"], 4, "rerun with --yes");
    assert_eq!(scalar_i64(&mut c, "SELECT count(*) FROM outbox_dead_letters"), 2, "declining changed nothing");
    assert_eq!(
        json_of(&dsn, &["dead-letters", "requeue", "--subscription", "search", "--confirm-above", "1", "--yes"]),
        json!({"requeued": 2, "stay_dead": 0, "subscriptions": ["search"]})
    );

    let again = ids(&claim(&mut c, "SELECT * FROM outbox_claim(10, 'search')"));
    c.execute("SELECT outbox_fail($1, 'still bad', 'search')", &[&again]).unwrap();
    let dead_now = scalar_i64(&mut c, "SELECT count(*) FROM outbox_dead_letters");
    assert!(dead_now >= 2, "{dead_now}");
    assert_eq!(json_of(&dsn, &["dead-letters", "purge", "--older-than", "1d"]), json!({"purged": 0}));
    assert_eq!(json_of(&dsn, &["dead-letters", "purge", "--older-than", "0s", "--yes"]), json!({"purged": dead_now}));
    refused(&dsn, &["dead-letters", "purge", "--older-than", "banana"], 2, "invalid duration \"banana\"");
    refused(&dsn, &["dead-letters", "list", "--subscription", "nope"], 1, "subscription \"nope\" does not exist");
}

/// Each of `ids` dead in `subscription` with `error`.
fn kill(client: &mut Client, subscription: &str, error: &str) -> Vec<i64> {
    let dead = ids(&claim(client, &format!("SELECT * FROM outbox_claim(10000, '{subscription}')")));
    client.execute("SELECT outbox_fail($1, $2, $3)", &[&dead, &error, &subscription]).unwrap();
    dead
}

#[test]
fn requeue_counts_and_names_every_subscription_it_touches() {
    let (dsn, mut c) = setup("cli_requeue_subscriptions");
    c.batch_execute(
        "SELECT outbox_subscribe('search', options => '{\"max_attempts\": 1}');
         SELECT outbox_subscribe('archive', options => '{\"max_attempts\": 1}');",
    )
    .unwrap();
    insert(&mut c, 1..=3);
    let dead = kill(&mut c, "search", "HTTP 400");
    assert_eq!(kill(&mut c, "archive", "HTTP 400"), dead);

    // three events, six dead letters: more than --confirm-above 4
    refused(
        &dsn,
        &["dead-letters", "requeue", "--confirm-above", "4"],
        4,
        "requeueing dead letters of subscriptions \"archive\", \"search\" would touch 6 events",
    );
    assert_eq!(scalar_i64(&mut c, "SELECT count(*) FROM outbox_dead_letters"), 6, "declining changed nothing");

    let id = dead[0].to_string();
    let run = outbox(&dsn, &["dead-letters", "requeue", "--id", &id]);
    assert_eq!(
        (run.code, run.stdout.as_str()),
        (0, "requeued 2 dead letters of subscriptions \"archive\", \"search\"\n"),
        "{}",
        run.stderr
    );
    let id = dead[1].to_string();
    assert_eq!(
        json_of(&dsn, &["dead-letters", "requeue", "--id", &id]),
        json!({"requeued": 2, "stay_dead": 0, "subscriptions": ["archive", "search"]})
    );
    let run = outbox(&dsn, &["dead-letters", "requeue", "--subscription", "archive"]);
    assert_eq!((run.code, run.stdout.as_str()), (0, "requeued 1 dead letters of subscription \"archive\"\n"), "{}", run.stderr);
    assert_eq!(scalar_i64(&mut c, "SELECT count(*) FROM outbox_dead_letters"), 1);
    // the last one's row changes again: its dead letter stays dead, and --json says so
    c.batch_execute("UPDATE chunks SET content = 'newer' WHERE id = (SELECT (payload->'key'->>'id')::bigint FROM outbox_dead_letters)")
        .unwrap();
    assert_eq!(json_of(&dsn, &["dead-letters", "requeue", "--yes"]), json!({"requeued": 0, "stay_dead": 1, "subscriptions": ["search"]}));
}

#[test]
fn text_stored_by_others_reaches_the_terminal_escaped() {
    let (dsn, mut c) = setup("cli_control_characters");
    c.batch_execute(
        "CREATE TABLE notes (id text PRIMARY KEY);
         SELECT outbox_attach('notes');
         SELECT outbox_subscribe('search', options => '{\"max_attempts\": 1}');",
    )
    .unwrap();
    c.execute("INSERT INTO notes VALUES ($1)", &[&"a\u{9b}2Jb\x1b[8m"]).unwrap();
    let dead = kill(&mut c, "search", "\x1b]0;pwned\x07HTTP 500\r\x1b[2K\nbody: \u{9b}31m");

    let terminal_safe = |text: &str, line_breaks: bool| !text.chars().any(|c| c.is_control() && !(line_breaks && c == '\n'));
    let list = outbox(&dsn, &["dead-letters", "list"]);
    assert_eq!(list.code, 0, "{}", list.stderr);
    assert!(terminal_safe(&list.stdout, true), "{:?}", list.stdout);
    assert!(list.stdout.contains("\\u{1b}]0;pwned\\u{7}HTTP 500 \\u{1b}[2K body: \\u{9b}31m"), "{}", list.stdout);
    let show = outbox(&dsn, &["dead-letters", "show", &dead[0].to_string()]);
    assert_eq!(show.code, 0, "{}", show.stderr);
    assert!(terminal_safe(&show.stdout, true), "{:?}", show.stdout);
    assert!(show.stdout.contains("last_error   \\u{1b}]0;pwned\\u{7}HTTP 500\\u{d}\\u{1b}[2K\nbody: \\u{9b}31m\n"), "{}", show.stdout);
    assert!(show.stdout.contains(r#""id": "a\u{9b}2Jb\u001b[8m""#), "{}", show.stdout);
    // JSON keeps the text as it is, escaped by JSON's rules
    let shown = json_of(&dsn, &["dead-letters", "show", &dead[0].to_string()]);
    assert_eq!(shown[0]["payload"]["key"]["id"], "a\u{9b}2Jb\x1b[8m");
}

#[test]
fn a_reader_that_goes_away_ends_the_output_quietly() {
    let (dsn, mut c) = setup("cli_closed_pipe");
    c.batch_execute("SELECT outbox_subscribe('search', options => '{\"max_attempts\": 1}')").unwrap();
    insert(&mut c, 1..=5000);
    kill(&mut c, "search", "HTTP 400: bad vector");
    // as `outbox dead-letters list --limit 5000 | head -1`: far more than a pipe holds
    for (args, heading) in [(&["dead-letters", "list", "--limit", "5000"][..], "SUBSCRIPTION"), (&["status", "--watch", "--interval", "0.05"], "outbox status")] {
        let mut child = Command::new(env!("CARGO_BIN_EXE_outbox"))
            .args(["--dsn", &dsn])
            .args(args)
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .unwrap();
        let mut first = String::new();
        BufReader::new(child.stdout.take().unwrap()).read_line(&mut first).unwrap();
        assert!(first.contains(heading), "{args:?}: {first}");
        let out = child.wait_with_output().unwrap();
        let stderr = String::from_utf8_lossy(&out.stderr);
        assert_eq!((out.status.code(), stderr.as_ref()), (Some(0), ""), "{args:?}");
    }
}

#[test]
fn replay_confirms_large_replays_and_shows_progress() {
    let (dsn, mut c) = setup("cli_replay");
    insert(&mut c, 1..=2500);
    let all = ids(&claim(&mut c, "SELECT * FROM outbox_claim(10000)"));
    assert_eq!(all.len(), 2500);
    c.execute("SELECT outbox_ack($1)", &[&all]).unwrap();

    refused(&dsn, &["replay", "--subscription", "default", "--since", "1h"], 4, "would touch 2500 events");
    assert_eq!(scalar_i64(&mut c, "SELECT pending FROM outbox_backlog"), 0, "nothing replayed without confirmation");

    let run = outbox(&dsn, &["--json", "replay", "--subscription", "default", "--since", "1h", "--yes"]);
    assert_eq!(run.code, 0, "{}", run.stderr);
    assert_eq!(serde_json::from_str::<Value>(&run.stdout).unwrap(), json!({"subscription": "default", "replayed": 2500}));
    let bars: Vec<&str> = run.stderr.lines().collect();
    assert_eq!(bars.len(), 3, "{}", run.stderr);
    assert!(bars[0].ends_with("] 1000/2500  40%") && bars[2].ends_with("] 2500/2500 100%"), "{}", run.stderr);
    assert_eq!(scalar_i64(&mut c, "SELECT pending FROM outbox_backlog"), 2500);

    let again = ids(&claim(&mut c, "SELECT * FROM outbox_claim(10000)"));
    c.execute("SELECT outbox_ack($1)", &[&again]).unwrap();
    let picked = format!("{},{}", all[0], all[1]);
    let run = outbox(&dsn, &["replay", "--subscription", "default", "--id", &picked]);
    assert_eq!((run.code, run.stdout.as_str()), (0, "replayed 2 events of subscription \"default\"\n"), "{}", run.stderr);
    assert!(run.stderr.is_empty(), "no progress bar for small replays: {}", run.stderr);
    let since = c.query_one("SELECT (now() - interval '1 hour')::text", &[]).unwrap().get::<_, String>(0);
    assert_eq!(json_of(&dsn, &["replay", "--subscription", "default", "--since", &since, "--confirm-above", "5000"])["replayed"], 2498);

    refused(&dsn, &["replay", "--subscription", "default", "--since", "last tuesday-ish"], 2, "invalid --since");
    refused(&dsn, &["replay", "--subscription", "nope", "--since", "1h"], 1, "subscription \"nope\" does not exist");
    refused(&dsn, &["replay", "--subscription", "default"], 2, "--since");
    refused(&dsn, &["replay", "--subscription", "default", "--id", "x"], 2, "invalid value 'x' for '--id");
}

#[test]
fn status_tells_a_failing_sink_from_a_working_one() {
    let (dsn, mut c) = setup("cli_status_sink_state");
    c.batch_execute(
        "CREATE FUNCTION public.mirror(jsonb) RETURNS void LANGUAGE sql AS '';
         SELECT outbox_subscribe('mirror', 'function', '{\"function\": \"public.mirror\"}');",
    )
    .unwrap();
    // what the delivery worker (not running here) records of the sink
    let record = |c: &mut Client, success_ago: &str, error_ago: &str, backing_off_until: &str| {
        c.batch_execute(&format!(
            "INSERT INTO outbox_sink_state (subscription_id, last_success_at, last_error, last_error_at, backing_off_until)
             SELECT id, now() - interval '{success_ago}', 'HTTP 503', now() - interval '{error_ago}', {backing_off_until}
             FROM outbox_subscriptions WHERE name = 'mirror'
             ON CONFLICT (subscription_id) DO UPDATE SET last_success_at = excluded.last_success_at,
                 last_error = excluded.last_error, last_error_at = excluded.last_error_at,
                 backing_off_until = excluded.backing_off_until"
        ))
        .unwrap();
    };
    let state = || {
        let table = outbox(&dsn, &["status"]).stdout;
        let line = table.lines().find(|l| l.starts_with("mirror")).unwrap_or_else(|| panic!("{table}")).to_string();
        let status = json_of(&dsn, &["status"]);
        (line, row_of(&status, "mirror")["sink_up"].clone())
    };

    // it delivered a while ago and has failed every batch since
    record(&mut c, "7 seconds", "1 second", "NULL");
    let (line, up) = state();
    assert!(line.ends_with("failing: HTTP 503"), "{line}");
    assert_eq!(up, json!(true));
    // backing off
    record(&mut c, "7 seconds", "1 second", "now() + interval '30 seconds'");
    let (line, up) = state();
    assert!(line.contains("down, retry in ") && line.ends_with(": HTTP 503"), "{line}");
    assert_eq!(up, json!(false));
    // the backoff ran out and the worker probes the sink
    record(&mut c, "7 seconds", "1 second", "now() - interval '1 second'");
    let (line, up) = state();
    assert!(line.ends_with("down, probing: HTTP 503"), "{line}");
    assert_eq!(up, json!(false), "as the extension's outbox_sink_up");
    // it recovered: the error is older than the last success
    record(&mut c, "1 second", "7 seconds", "NULL");
    let (line, up) = state();
    assert!(line.contains("up, delivered 1."), "{line}");
    assert_eq!(up, json!(true));
}

#[test]
fn subscriptions_list_add_remove() {
    let (dsn, mut c) = setup("cli_subscriptions");
    // (credentials in the URL's user part are refused by outbox_subscribe; its unit tests
    // show that list would redact them too)
    let options = r#"{"url": "http://127.0.0.1:9/v1/upsert?api_key=TOPSECRET", "headers": {"Authorization": "Bearer s3cret"}}"#;
    assert_eq!(json_of(&dsn, &["subscriptions", "add", "search", "--sink", "http", "--options", options]), json!({"subscribed": "search"}));
    assert_eq!(json_of(&dsn, &["subscriptions", "add", "archive", "--from-start"]), json!({"subscribed": "archive"}));
    let listed = json_of(&dsn, &["subscriptions", "list"]);
    let names: Vec<&str> = listed.as_array().unwrap().iter().map(|s| s["name"].as_str().unwrap()).collect();
    assert_eq!(names, ["archive", "default", "search"]);
    let search = &listed[2];
    assert_eq!(search["sink"], "http");
    assert_eq!(search["options"]["headers"]["Authorization"], "<redacted>");
    assert_eq!(search["options"]["url"], "http://127.0.0.1:9/v1/upsert?api_key=<redacted>");
    let table = outbox(&dsn, &["subscriptions", "list"]).stdout;
    assert!(table.starts_with("NAME") && table.contains("127.0.0.1:9/v1/upsert?api_key="), "{table}");
    for secret in ["s3cret", "TOPSECRET"] {
        assert!(!table.contains(secret), "{secret} in {table}");
    }

    refused(&dsn, &["subscriptions", "add", "search"], 1, "subscription \"search\" already exists");
    refused(&dsn, &["subscriptions", "add", "x", "--options", "{nope"], 2, "--options is not valid JSON");
    refused(&dsn, &["subscriptions", "add", "x", "--sink", "kafka"], 1, "unknown sink \"kafka\"");

    insert(&mut c, 1..=1);
    refused(&dsn, &["subscriptions", "remove", "archive"], 4, "rerun with --yes");
    assert_eq!(json_of(&dsn, &["subscriptions", "remove", "archive", "--yes"]), json!({"unsubscribed": "archive"}));
    c.batch_execute("SELECT outbox_subscribe('idle')").unwrap();
    assert_eq!(json_of(&dsn, &["subscriptions", "remove", "idle"]), json!({"unsubscribed": "idle"}), "nothing undelivered: no question");
    refused(&dsn, &["subscriptions", "remove", "archive", "--yes"], 1, "subscription \"archive\" does not exist");
}

#[test]
fn attach_and_detach() {
    let (dsn, mut c) = setup("cli_attach");
    c.batch_execute("CREATE TABLE docs (id bigint PRIMARY KEY, body text, secret text)").unwrap();
    assert_eq!(
        json_of(&dsn, &["attach", "docs", "--payload-columns", "body", "--watch-columns", "body", "--event-prefix", "DOC"]),
        json!({"attached": "docs"})
    );
    c.batch_execute("INSERT INTO docs VALUES (1, 'b', 's'); UPDATE docs SET secret = 't'").unwrap();
    let rows = c.query("SELECT type, payload FROM outbox_claim(10)", &[]).unwrap();
    assert_eq!(rows.len(), 1, "the secret column is not watched");
    assert_eq!(rows[0].get::<_, String>(0), "DOC_UPSERT");
    assert_eq!(rows[0].get::<_, Value>(1), json!({"table": "public.docs", "key": {"id": 1}, "data": {"body": "b"}}));

    let run = outbox(&dsn, &["attach", "public.docs"]);
    assert_eq!((run.code, run.stdout.as_str()), (0, "capturing changes of public.docs\n"), "{}", run.stderr);
    c.batch_execute("INSERT INTO docs VALUES (2, 'b', 's')").unwrap();
    let rows = c.query("SELECT type, payload FROM outbox_claim(10)", &[]).unwrap();
    assert_eq!(rows[0].get::<_, String>(0), "EMBED_UPSERT", "attaching again resets what was not given");
    assert_eq!(rows[0].get::<_, Value>(1), json!({"table": "public.docs", "key": {"id": 2}}));

    assert_eq!(json_of(&dsn, &["detach", "docs"]), json!({"detached": "docs"}));
    c.batch_execute("INSERT INTO docs VALUES (3, 'b', 's')").unwrap();
    assert!(c.query("SELECT * FROM outbox_claim(10)", &[]).unwrap().is_empty());
    refused(&dsn, &["detach", "docs"], 1, "table public.docs is not attached to the outbox");
    refused(&dsn, &["attach", "nosuch"], 1, "relation \"nosuch\" does not exist");
    refused(&dsn, &["attach", "docs", "--payload-columns", "nope"], 1, "column \"nope\" named in payload_columns does not exist");
}

#[test]
fn bad_arguments_and_unreachable_databases_are_one_line_errors() {
    let (dsn, _) = setup("cli_bad_arguments");
    refused(&dsn, &["frobnicate"], 2, "unrecognized subcommand 'frobnicate'");
    refused(&dsn, &["status", "--interval", "0"], 2, "expected a positive number of seconds");
    refused(&dsn, &["dead-letters", "list", "--limit", "0"], 2, "--limit must be at least 1");
    refused(&dsn, &["status", "--watch", "--interval", "1e30"], 2, "invalid value '1e30' for '--interval <INTERVAL>'");
    let forever = "99999999999999999999999d";
    refused(&dsn, &["dead-letters", "purge", "--older-than", forever], 2, &format!("--older-than \"{forever}\" is too long"));
    refused(&dsn, &["replay", "--subscription", "default", "--since", forever], 2, &format!("--since \"{forever}\" is too long"));
    refused(&format!("{dsn} sslmode=require"), &["status"], 2, "the outbox CLI does not speak TLS");
    refused("host=/nonexistent-dir port=5432 user=postgres", &["status"], 3, "(socket /nonexistent-dir/.s.PGSQL.5432)");
    refused(&dsn, &["metrics", "serve", "--listen", "bogus"], 2, "--listen bogus: ");
    refused(&dsn, &["metrics", "serve", "--listen", "127.0.0.1:70000"], 2, "give an address and port, such as 127.0.0.1:9187");
    refused("port=notaport", &["status"], 2, "invalid connection string");
    refused(&shared().dsn("postgres"), &["status"], 1, "the outbox extension is not installed in database \"postgres\"");

    // without --dsn: DATABASE_URL, then the PG* variables
    let cluster = shared();
    let by_env = |args: &[&str], vars: &[(&str, String)]| {
        let mut command = Command::new(env!("CARGO_BIN_EXE_outbox"));
        command.args(args).args(["--json", "status"]).env_remove("DATABASE_URL").env_remove("PGSSLMODE").stdin(Stdio::null());
        for (k, v) in vars {
            command.env(k, v);
        }
        command.output().unwrap()
    };
    let out = by_env(&[], &[("DATABASE_URL", dsn.clone())]);
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    let server = [("PGHOST", cluster.dir.display().to_string()), ("PGPORT", cluster.port.to_string()), ("PGUSER", "postgres".into())];
    let out = by_env(&[], &[&server[..], &[("PGDATABASE", "cli_bad_arguments".into())]].concat());
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    assert_eq!(serde_json::from_slice::<Value>(&out.stdout).unwrap()[0]["subscription"], "default");
    // a DSN takes what it leaves unset from the environment, as libpq does
    let out = by_env(&["--dsn", "dbname=cli_bad_arguments"], &server);
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    let out = by_env(&["--dsn", "dbname=cli_bad_arguments"], &[&server[..], &[("PGSSLMODE", "require".into())]].concat());
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(2), "{stderr}");
    assert!(stderr.starts_with("outbox: sslmode=require from PGSSLMODE needs TLS") && stderr.contains("SSH tunnel"), "{stderr}");
}

/// An exporter on a free port, once it accepts connections. The port is free when chosen, but
/// tests running at once (and the servers they start) choose ports too: an exporter that could
/// not listen on it is started again on another.
fn spawn_exporter(dsn: &str, piped_stderr: bool) -> (Child, u16) {
    for _ in 0..5 {
        let port = std::net::TcpListener::bind("127.0.0.1:0").unwrap().local_addr().unwrap().port();
        let mut exporter = Command::new(env!("CARGO_BIN_EXE_outbox"))
            .args(["--dsn", dsn, "metrics", "serve", "--listen", &format!("127.0.0.1:{port}")])
            .stdout(Stdio::null())
            .stderr(if piped_stderr { Stdio::piped() } else { Stdio::null() })
            .spawn()
            .unwrap();
        let listening = eventually(Duration::from_secs(10), || {
            TcpStream::connect(("127.0.0.1", port)).is_ok() || exporter.try_wait().unwrap().is_some()
        });
        if listening && exporter.try_wait().unwrap().is_none() {
            return (exporter, port);
        }
        let _ = exporter.kill();
        let _ = exporter.wait();
    }
    panic!("the exporter did not listen on any of five free ports");
}

#[test]
fn exporter_says_once_why_it_cannot_reach_the_database() {
    let (exporter, port) = spawn_exporter("host=/nonexistent-dir port=5432 user=postgres dbname=x", true);
    for _ in 0..3 {
        let (status, body) = scrape(port).unwrap();
        assert_eq!((status.as_str(), sample(&body, "outbox_up")), ("HTTP/1.1 200 OK", Some(0.0)));
    }
    let mut exporter = exporter;
    exporter.kill().unwrap();
    let stderr = String::from_utf8(exporter.wait_with_output().unwrap().stderr).unwrap();
    let reasons: Vec<&str> = stderr.lines().filter(|line| line.contains("cannot connect to the database")).collect();
    assert_eq!(reasons.len(), 1, "the first failure is logged, and only once while it lasts: {stderr}");
    assert!(reasons[0].starts_with("outbox: cannot read the outbox: cannot connect to the database: "), "{stderr}");
}

#[test]
fn exporter_serves_each_client_on_its_own_and_bounds_requests() {
    let (dsn, _) = setup("cli_exporter_clients");
    let (mut exporter, port) = spawn_exporter(&dsn, false);

    // half a request, and then nothing
    let mut dawdler = TcpStream::connect(("127.0.0.1", port)).unwrap();
    dawdler.write_all(b"GET /metrics HTTP/1.1\r\n").unwrap();
    std::thread::sleep(Duration::from_millis(200));
    let started = Instant::now();
    let (status, body) = scrape(port).unwrap();
    assert_eq!((status.as_str(), sample(&body, "outbox_up")), ("HTTP/1.1 200 OK", Some(1.0)));
    assert!(started.elapsed() < Duration::from_secs(3), "a scrape waited {:?} behind a slow client", started.elapsed());

    // a request line larger than any request: refused before it costs memory
    let mut flooder = TcpStream::connect(("127.0.0.1", port)).unwrap();
    flooder.set_write_timeout(Some(Duration::from_secs(10))).unwrap();
    flooder.set_read_timeout(Some(Duration::from_secs(10))).unwrap();
    let started = Instant::now();
    let wrote = flooder.write_all(&vec![b'A'; 64 << 20]);
    let mut response = Vec::new();
    let _ = flooder.read_to_end(&mut response);
    let response = String::from_utf8_lossy(&response);
    assert!(wrote.is_err() || response.starts_with("HTTP/1.1 431 "), "{wrote:?} {response}");
    assert!(started.elapsed() < Duration::from_secs(5), "{:?}", started.elapsed());

    assert_eq!(scrape(port).map(|(status, _)| status).as_deref(), Some("HTTP/1.1 200 OK"));
    drop(dawdler);
    exporter.kill().unwrap();
    exporter.wait().unwrap();
}

fn scrape(port: u16) -> Option<(String, String)> {
    let mut stream = TcpStream::connect(("127.0.0.1", port)).ok()?;
    stream.set_read_timeout(Some(Duration::from_secs(30))).unwrap();
    stream.write_all(b"GET /metrics HTTP/1.1\r\nHost: localhost\r\n\r\n").ok()?;
    let mut response = String::new();
    stream.read_to_string(&mut response).ok()?;
    let (head, body) = response.split_once("\r\n\r\n")?;
    Some((head.lines().next()?.to_string(), body.to_string()))
}


#[test]
fn exporter_serves_outbox_up_0_while_the_database_is_away_and_recovers() {
    // its own server, which this test stops and starts
    let cluster = Cluster::start(&[]);
    let db = cluster.database("exporter");
    let mut c = cluster.connect(&db);
    chunks(&mut c, "");
    insert(&mut c, 1..=2);
    let claimed = ids(&claim(&mut c, "SELECT * FROM outbox_claim(10)"));
    c.execute("SELECT outbox_ack($1)", &[&claimed]).unwrap();
    // a sink subscription, so the sink and worker families are served too
    c.batch_execute(
        "CREATE FUNCTION public.mirror(jsonb) RETURNS void LANGUAGE sql AS '';
         SELECT outbox_subscribe('mirror', 'function', '{\"function\": \"public.mirror\"}');",
    )
    .unwrap();
    drop(c);

    let (mut exporter, port) = spawn_exporter(&cluster.dsn(&db), false);
    let mut last = None;
    assert!(eventually(Duration::from_secs(10), || {
        last = scrape(port);
        last.is_some()
    }));
    let (status, body) = last.unwrap();
    assert_eq!(status, "HTTP/1.1 200 OK");
    assert_eq!(sample(&body, "outbox_up"), Some(1.0), "{body}");
    assert_eq!(sample(&body, "outbox_delivered_total{subscription=\"default\"}"), Some(2.0), "{body}");
    promtool_check_metrics(&body);
    monitoring_uses_only_served_metrics(&body);

    cluster.stop("fast");
    let (status, body) = scrape(port).expect("the exporter answers while the database is down");
    assert_eq!(status, "HTTP/1.1 200 OK");
    assert_eq!(body, "# HELP outbox_up 1 when the exporter could read the outbox on this scrape.\n# TYPE outbox_up gauge\noutbox_up 0\n");
    assert!(exporter.try_wait().unwrap().is_none(), "the exporter is still running");

    cluster.pg_ctl_start();
    let mut recovered = String::new();
    assert!(eventually(Duration::from_secs(20), || {
        recovered = scrape(port).map(|(_, body)| body).unwrap_or_default();
        sample(&recovered, "outbox_up") == Some(1.0)
    }));
    assert_eq!(sample(&recovered, "outbox_delivered_total{subscription=\"default\"}"), Some(2.0), "counters survive the restart");

    // restarted between two scrapes: the next one reconnects and reads, where it answered 0
    cluster.stop("fast");
    cluster.pg_ctl_start();
    let (_, body) = scrape(port).unwrap();
    assert_eq!(sample(&body, "outbox_up"), Some(1.0), "{body}");

    // an outbox table locked (DDL, VACUUM FULL, an update): the scrape answers 0 in time
    // rather than waiting with every scrape after it
    let mut locker = cluster.connect(&db);
    locker.batch_execute("BEGIN; LOCK outbox_log IN ACCESS EXCLUSIVE MODE").unwrap();
    let started = Instant::now();
    let (_, body) = scrape(port).unwrap();
    assert_eq!(sample(&body, "outbox_up"), Some(0.0), "{body}");
    assert!(started.elapsed() < Duration::from_secs(9), "{:?}", started.elapsed());
    locker.batch_execute("ROLLBACK").unwrap();
    let (_, body) = scrape(port).unwrap();
    assert_eq!(sample(&body, "outbox_up"), Some(1.0), "{body}");
    let (status, _) = {
        let mut stream = TcpStream::connect(("127.0.0.1", port)).unwrap();
        stream.write_all(b"GET /other HTTP/1.1\r\n\r\n").unwrap();
        let mut response = String::new();
        stream.read_to_string(&mut response).unwrap();
        (response.lines().next().unwrap_or_default().to_string(), ())
    };
    assert_eq!(status, "HTTP/1.1 404 Not Found");
    exporter.kill().unwrap();
    exporter.wait().unwrap();
}

/// The alert rules and the dashboard query only metric families the exporter serves.
fn monitoring_uses_only_served_metrics(body: &str) {
    let families: Vec<&str> = body.lines().filter_map(|l| l.strip_prefix("# TYPE ")).filter_map(|l| l.split(' ').next()).collect();
    for file in ["alerts.yml", "alerts.test.yml", "dashboard.json"] {
        let text = std::fs::read_to_string(format!("{}/../monitoring/{file}", env!("CARGO_MANIFEST_DIR"))).unwrap();
        // queries and synthetic series only: descriptions may name SQL views
        let mut used: Vec<&str> = text
            .lines()
            .filter(|line| line.contains("expr") || line.contains("series:"))
            .flat_map(|line| line.split(|c: char| !(c.is_ascii_alphanumeric() || c == '_')))
            .filter(|word| word.starts_with("outbox_"))
            .collect();
        used.sort();
        used.dedup();
        assert!(!used.is_empty(), "{file} names no metric");
        for metric in used {
            let family = ["_bucket", "_sum", "_count"].iter().find_map(|s| metric.strip_suffix(s)).filter(|f| families.contains(f)).unwrap_or(metric);
            assert!(families.contains(&family), "{file} uses {metric}, which the exporter does not serve; it serves {families:?}");
        }
    }
}
