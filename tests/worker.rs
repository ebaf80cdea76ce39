//! The delivery worker, against a real Postgres started with the extension preloaded, sinks
//! played by an HTTP server in this test and by SQL functions.
#![cfg(not(feature = "pg_test"))] // run by scripts/test.sh against the installed extension, not by cargo pgrx test

mod common;

use std::collections::{HashMap, HashSet};
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::{Arc, OnceLock};
use std::time::{Duration, Instant};

use common::*;

const PRELOAD: [&str; 3] = ["shared_preload_libraries = 'outbox'", "outbox.database = 'postgres'", "outbox.poll_interval = '200ms'"];

/// One preloaded cluster for the tests of this file; the worker serves its `postgres` database.
fn cluster() -> &'static Cluster {
    static CLUSTER: OnceLock<Cluster> = OnceLock::new();
    CLUSTER.get_or_init(|| {
        let cluster = Cluster::start(&PRELOAD);
        let mut c = cluster.connect("postgres");
        c.batch_execute("CREATE EXTENSION outbox; SELECT outbox_unsubscribe('default')").unwrap();
        cluster
    })
}

/// Held by each test on the shared cluster for its whole run. They share its database, so
/// running them at once would let one test's writes reach another's sinks, and one of them
/// pauses the worker for a while.
fn serial() -> std::sync::MutexGuard<'static, ()> {
    static SERIAL: std::sync::Mutex<()> = std::sync::Mutex::new(());
    SERIAL.lock().unwrap_or_else(|poisoned| poisoned.into_inner())
}

/// A table of its own for a test, captured.
fn table(c: &mut Client, name: &str) {
    c.batch_execute(&format!(
        "CREATE TABLE {name} (id bigint PRIMARY KEY, content text);
         SELECT outbox_attach('{name}', payload_columns => ARRAY['content'], event_prefix => '{}');",
        name.to_uppercase()
    ))
    .unwrap();
}

fn http_sink(c: &mut Client, name: &str, recorder: &Recorder, extra: &str) {
    c.batch_execute(&format!(
        "SELECT outbox_subscribe('{name}', 'http', '{{\"url\": \"{}\"{extra}}}')",
        recorder.url()
    ))
    .unwrap();
}

fn backlog(c: &mut Client, subscription: &str) -> postgres::Row {
    c.query_one("SELECT * FROM outbox_backlog WHERE subscription = $1", &[&subscription]).unwrap()
}

fn settled(c: &mut Client, subscription: &str) -> bool {
    let row = backlog(c, subscription);
    row.get::<_, i64>("pending") + row.get::<_, i64>("in_flight") + row.get::<_, i64>("retrying") == 0
}

fn worker_pid(c: &mut Client) -> Option<i32> {
    c.query_opt("SELECT pid FROM pg_stat_activity WHERE backend_type = 'outbox delivery worker'", &[]).unwrap().map(|r| r.get(0))
}

/// Terminates the running worker; returns its pid.
fn terminate_worker(c: &mut Client) -> i32 {
    let pid = worker_pid(c).expect("a worker runs");
    c.execute("SELECT pg_catalog.pg_terminate_backend($1)", &[&pid]).unwrap();
    pid
}

#[test]
fn http_sink_gets_batches_with_idempotency_keys() {
    let _serial = serial();
    let recorder = Recorder::start(|_| Reply::status(200));
    let mut c = cluster().connect("postgres");
    table(&mut c, "docs_http");
    http_sink(&mut c, "search_http", &recorder, ", \"headers\": {\"Authorization\": \"Bearer s3cret\"}");
    c.batch_execute("INSERT INTO docs_http SELECT g, 'doc ' || g FROM generate_series(1, 5) g").unwrap();
    assert!(eventually(Duration::from_secs(10), || recorder.delivered_keys().len() >= 5), "{:?}", recorder.received());
    let requests: Vec<Received> = recorder.received().into_iter().filter(|r| !r.keys().is_empty()).collect();
    let first = &requests[0];
    let events = first.body.as_array().unwrap();
    assert_eq!(events[0]["type"], "DOCS_HTTP_UPSERT");
    assert_eq!(events[0]["payload"]["data"]["content"], "doc 1");
    assert_eq!(events[0]["attempts"], 1);
    assert!(events[0]["created_at"].is_string());
    let key: Vec<String> = first.ids().iter().map(|i| i.to_string()).collect();
    assert_eq!(first.headers["idempotency-key"], key.join(","));
    assert_eq!(first.headers["authorization"], "Bearer s3cret");
    assert_eq!(first.headers["content-type"], "application/json");
    assert!(eventually(Duration::from_secs(5), || settled(&mut c, "search_http")));
    let row = backlog(&mut c, "search_http");
    assert_eq!(row.get::<_, String>("sink"), "http");
    assert!(row.get::<_, Option<std::time::SystemTime>>("last_success_at").is_some());
    assert!(!row.get::<_, bool>("backing_off"));
}

#[test]
fn server_errors_are_retried_until_the_sink_takes_the_batch() {
    let _serial = serial();
    let calls = Arc::new(AtomicUsize::new(0));
    let seen = calls.clone();
    let recorder = Recorder::start(move |_| Reply::status(if seen.fetch_add(1, Ordering::SeqCst) < 2 { 503 } else { 200 }));
    let mut c = cluster().connect("postgres");
    table(&mut c, "docs_5xx");
    http_sink(&mut c, "search_5xx", &recorder, ", \"backoff_base\": \"200ms\", \"backoff_max\": \"1s\", \"max_attempts\": 1");
    c.batch_execute("INSERT INTO docs_5xx SELECT g, 'x' FROM generate_series(1, 3) g").unwrap();
    assert!(eventually(Duration::from_secs(15), || settled(&mut c, "search_5xx")));
    let requests = recorder.received();
    assert!(requests.len() >= 3, "{requests:?}");
    assert_eq!(requests.last().unwrap().keys(), [1, 2, 3]);
    // the sink's fault, not the events': no attempt used, nothing dead even with max_attempts 1
    assert_eq!(backlog(&mut c, "search_5xx").get::<_, i64>("dead"), 0);
    assert_eq!(requests.last().unwrap().body[0]["attempts"], 1);
    let error: Option<String> = backlog(&mut c, "search_5xx").get("last_error");
    assert!(error.unwrap().contains("HTTP 503"));
}

/// minreq follows redirects by default: a 307 sent the batch, with its credentials, to the
/// Location's server, and that server's 200 acked it.
/// A sink that answers something other than HTTP is down, and `last_error` says what it
/// answered: the HTTP client reads a missing status line as a 503, which the sink never sent.
#[test]
fn an_answer_without_a_status_line_is_named() {
    let _serial = serial();
    let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let port = listener.local_addr().unwrap().port();
    std::thread::spawn(move || {
        for mut stream in listener.incoming().flatten() {
            let _ = stream.set_read_timeout(Some(Duration::from_millis(200)));
            let _ = std::io::Read::read(&mut stream, &mut [0u8; 65536]);
            let _ = std::io::Write::write_all(&mut stream, b"SSH-2.0-OpenSSH_9.2\r\n\r\n");
        }
    });
    let mut c = cluster().connect("postgres");
    table(&mut c, "docs_garbled");
    c.batch_execute(&format!("SELECT outbox_subscribe('search_garbled', 'http', '{{\"url\": \"http://127.0.0.1:{port}/events\"}}')")).unwrap();
    c.batch_execute("INSERT INTO docs_garbled VALUES (1, 'x')").unwrap();
    let error = |c: &mut Client| backlog(c, "search_garbled").get::<_, Option<String>>("last_error").unwrap_or_default();
    assert!(eventually(Duration::from_secs(10), || !error(&mut c).is_empty()));
    let said = error(&mut c);
    assert!(said.contains("the sink answered without an HTTP status line") && !said.contains("503"), "{said}");
    assert_eq!(backlog(&mut c, "search_garbled").get::<_, i64>("dead"), 0, "the sink is down, the event not at fault");
    c.batch_execute("SELECT outbox_unsubscribe('search_garbled')").unwrap();
}

#[test]
fn a_redirect_is_not_followed() {
    let _serial = serial();
    let elsewhere = Recorder::start(|_| Reply::status(200));
    let location = elsewhere.url();
    let recorder = Recorder::start(move |_| Reply { headers: vec![("Location".into(), location.clone())], ..Reply::status(307) });
    let mut c = cluster().connect("postgres");
    table(&mut c, "docs_redirect");
    http_sink(&mut c, "search_redirect", &recorder, ", \"headers\": {\"Authorization\": \"Bearer s3cret\"}");
    c.batch_execute("INSERT INTO docs_redirect VALUES (1, 'x')").unwrap();
    assert!(eventually(Duration::from_secs(10), || !recorder.received().is_empty()));
    let error = || backlog(&mut cluster().connect("postgres"), "search_redirect").get::<_, Option<String>>("last_error");
    assert!(eventually(Duration::from_secs(10), || error().is_some_and(|e| e.contains("307"))), "{:?}", error());
    assert!(elsewhere.received().is_empty(), "{:?}", elsewhere.received());
    assert!(!settled(&mut c, "search_redirect"), "nothing was delivered");
    c.batch_execute("SELECT outbox_unsubscribe('search_redirect')").unwrap();
}

/// A subscription changed (here its token rotated by hand) while its sink was answering a
/// batch: the new runner did not know the batch, which stayed claimed for the worker's
/// hour-long lease and held its row's later events back.
#[test]
fn a_batch_in_flight_when_its_subscription_changes_is_delivered_again() {
    let _serial = serial();
    let calls = Arc::new(AtomicUsize::new(0));
    let seen = calls.clone();
    let recorder = Recorder::start(move |_| {
        let first = seen.fetch_add(1, Ordering::SeqCst) == 0;
        Reply { delay: if first { Duration::from_secs(2) } else { Duration::ZERO }, ..Reply::status(200) }
    });
    let mut c = cluster().connect("postgres");
    table(&mut c, "docs_rotate");
    http_sink(&mut c, "search_rotate", &recorder, ", \"headers\": {\"Authorization\": \"Bearer old\"}");
    c.batch_execute("INSERT INTO docs_rotate VALUES (1, 'x')").unwrap();
    assert!(eventually(Duration::from_secs(10), || !recorder.received().is_empty()));
    c.batch_execute(
        "UPDATE outbox_subscriptions SET options = jsonb_set(options, '{headers,Authorization}', '\"Bearer new\"')
         WHERE name = 'search_rotate'",
    )
    .unwrap();
    assert!(eventually(Duration::from_secs(20), || settled(&mut c, "search_rotate")), "{:?}", backlog(&mut c, "search_rotate"));
    let again = recorder.received();
    assert!(again.iter().any(|r| r.headers["authorization"] == "Bearer new" && r.keys() == [1]), "{again:?}");
    c.batch_execute("SELECT outbox_unsubscribe('search_rotate')").unwrap();
}

/// Options changed by an UPDATE, which nothing checks as `outbox_subscribe` does, into ones
/// the worker cannot use stop their subscription alone: the worker says why once, in its log
/// and the backlog, goes on delivering the others, and delivers the subscription once they are
/// mended. (A bad retry option ended every round of the worker, and no sink got anything.)
#[test]
fn a_subscription_whose_options_the_worker_cannot_use_waits_alone() {
    let _serial = serial();
    let (mangled, sound) = (Recorder::start(|_| Reply::status(200)), Recorder::start(|_| Reply::status(200)));
    let mut c = cluster().connect("postgres");
    table(&mut c, "docs_mangled");
    http_sink(&mut c, "search_mangled", &mangled, "");
    http_sink(&mut c, "search_sound", &sound, "");
    let warnings = || cluster().log().matches("subscription \"search_mangled\" is not delivered").count();
    let before = warnings();
    let mut written = 0i64;
    let url_back = format!("jsonb_set(options, '{{url}}', '\"{}\"')", mangled.url());
    for (round, (broken, mended, why)) in [
        ("options || '{\"max_attempts\": 0}'", "options - 'max_attempts'", "max_attempts must be a positive integer"),
        ("jsonb_set(options, '{url}', '\"ftp://x\"')", url_back.as_str(), "url must start with http://"),
    ]
    .into_iter()
    .enumerate()
    {
        c.batch_execute(&format!("UPDATE outbox_subscriptions SET options = {broken} WHERE name = 'search_mangled'")).unwrap();
        let refused = |c: &mut Client| backlog(c, "search_mangled").get::<_, Option<String>>("last_error").unwrap_or_default();
        assert!(eventually(Duration::from_secs(10), || refused(&mut c).contains(why)), "{}", refused(&mut c));
        c.batch_execute(&format!("INSERT INTO docs_mangled SELECT g, 'x' FROM generate_series({}, {}) g", written + 1, written + 3)).unwrap();
        written += 3;
        assert!(eventually(Duration::from_secs(10), || sound.delivered_keys().len() as i64 == written), "{:?}", sound.delivered_keys());
        // a few more rounds of the worker, which say nothing more
        std::thread::sleep(Duration::from_secs(1));
        assert_eq!(mangled.delivered_keys().len() as i64, written - 3, "delivered with options it cannot use");
        assert_eq!(backlog(&mut c, "search_mangled").get::<_, i64>("pending"), 3);
        assert!(refused(&mut c).contains("not delivered, its options are invalid"), "{}", refused(&mut c));
        assert_eq!(warnings(), before + round + 1, "said once");
        c.batch_execute(&format!("UPDATE outbox_subscriptions SET options = {mended} WHERE name = 'search_mangled'")).unwrap();
        assert!(eventually(Duration::from_secs(10), || settled(&mut c, "search_mangled")), "{:?}", backlog(&mut c, "search_mangled"));
        let mut keys = mangled.delivered_keys();
        keys.sort_unstable();
        assert_eq!(keys, (1..=written).collect::<Vec<_>>());
    }
    c.batch_execute("SELECT outbox_unsubscribe('search_mangled'); SELECT outbox_unsubscribe('search_sound')").unwrap();
}

/// A claim that fails on one subscription's delivery state (damaged by hand: a claim row
/// naming a ledger segment that does not exist) backs that sink off with the error as its
/// `last_error`; it ended the worker, whose next round failed the same way, and no sink was
/// delivered. Once the state is mended, the sink delivers again.
#[test]
fn a_claim_that_fails_backs_off_its_sink_alone() {
    let _serial = serial();
    let (damaged, sound) = (Recorder::start(|_| Reply::status(200)), Recorder::start(|_| Reply::status(200)));
    let mut c = cluster().connect("postgres");
    table(&mut c, "docs_damaged");
    http_sink(&mut c, "search_damaged", &damaged, ", \"backoff_base\": \"200ms\", \"backoff_max\": \"1s\"");
    http_sink(&mut c, "search_beside", &sound, "");
    assert!(eventually(Duration::from_secs(5), || worker_pid(&mut c).is_some()));
    let worker = worker_pid(&mut c);
    c.batch_execute(
        "INSERT INTO outbox_claims SELECT id, 999998, 99, now() - interval '1 hour', 1, 1, now()
         FROM outbox_subscriptions WHERE name = 'search_damaged';
         INSERT INTO docs_damaged SELECT g, 'x' FROM generate_series(1, 3) g",
    )
    .unwrap();
    assert!(eventually(Duration::from_secs(10), || sound.delivered_keys().len() == 3), "{:?}", sound.delivered_keys());
    let error = |c: &mut Client| backlog(c, "search_damaged").get::<_, Option<String>>("last_error").unwrap_or_default();
    assert!(eventually(Duration::from_secs(5), || error(&mut c).contains("its claim failed")), "{}", error(&mut c));
    assert!(error(&mut c).contains("outbox_ledger_99"), "{}", error(&mut c));
    assert!(damaged.delivered_keys().is_empty());
    assert!(eventually(Duration::from_secs(5), || settled(&mut c, "search_beside")));
    assert_eq!(worker_pid(&mut c), worker, "the worker went on");
    c.batch_execute("DELETE FROM outbox_claims WHERE claim_id = 999998").unwrap();
    assert!(eventually(Duration::from_secs(10), || settled(&mut c, "search_damaged")), "{:?}", backlog(&mut c, "search_damaged"));
    let mut keys = damaged.delivered_keys();
    keys.sort_unstable();
    assert_eq!(keys, [1, 2, 3]);
    c.batch_execute("SELECT outbox_unsubscribe('search_damaged'); SELECT outbox_unsubscribe('search_beside')").unwrap();
}

#[test]
fn a_rejected_batch_is_split_until_the_poison_event_is_alone() {
    let _serial = serial();
    let recorder = Recorder::start(|request| Reply::status(if request.keys().contains(&13) { 400 } else { 200 }));
    let mut c = cluster().connect("postgres");
    table(&mut c, "docs_4xx");
    http_sink(&mut c, "search_4xx", &recorder, ", \"max_attempts\": 1, \"batch_size\": 20");
    c.batch_execute("INSERT INTO docs_4xx SELECT g, 'x' FROM generate_series(1, 20) g").unwrap();
    assert!(eventually(Duration::from_secs(15), || settled(&mut c, "search_4xx")));
    let accepted: HashSet<i64> =
        recorder.received().iter().filter(|r| !r.keys().contains(&13)).flat_map(|r| r.keys()).collect();
    assert_eq!(accepted, (1..=20).filter(|k| *k != 13).collect::<HashSet<_>>(), "the neighbours are delivered");
    let dead: Vec<serde_json::Value> = c
        .query("SELECT payload FROM outbox_dead_letters WHERE subscription = 'search_4xx'", &[])
        .unwrap()
        .iter()
        .map(|r| r.get(0))
        .collect();
    assert_eq!(dead.len(), 1);
    assert_eq!(dead[0]["key"]["id"], 13);
    let error: String = c.query_one("SELECT last_error FROM outbox_dead_letters WHERE subscription = 'search_4xx'", &[]).unwrap().get(0);
    assert!(error.starts_with("HTTP 400"), "{error}");
}

/// A receiver that takes 400 ms an event answers a batch of three or more after the sink's
/// one-second timeout. Sending the same batch again would time out every time.
#[test]
fn a_batch_too_slow_for_the_timeout_is_sent_again_in_smaller_batches() {
    let _serial = serial();
    let recorder = Recorder::start(|request| Reply { status: 200, headers: vec![], delay: Duration::from_millis(400) * request.keys().len() as u32 });
    let mut c = cluster().connect("postgres");
    table(&mut c, "docs_slowbatch");
    http_sink(&mut c, "search_slowbatch", &recorder, ", \"timeout\": \"1s\", \"batch_size\": 8, \"backoff_base\": \"200ms\", \"backoff_max\": \"1s\", \"max_attempts\": 1");
    c.batch_execute("INSERT INTO docs_slowbatch SELECT g, 'x' FROM generate_series(1, 8) g").unwrap();
    assert!(eventually(Duration::from_secs(40), || settled(&mut c, "search_slowbatch")), "{:?}", backlog(&mut c, "search_slowbatch"));
    let requests = recorder.received();
    assert_eq!(requests[0].keys().len(), 8, "the first batch is whole");
    let answered_in_time: HashSet<i64> = requests.iter().filter(|r| r.keys().len() <= 2).flat_map(|r| r.keys()).collect();
    assert_eq!(answered_in_time, (1..=8).collect::<HashSet<_>>());
    let sink = backlog(&mut c, "search_slowbatch");
    assert_eq!(sink.get::<_, i64>("dead"), 0, "a timeout uses no attempt (max_attempts is 1)");
    let error: String = sink.get("last_error");
    assert!(error.contains("no answer within the timeout of 1s"), "{error}");
    c.batch_execute("SELECT outbox_unsubscribe('search_slowbatch')").unwrap();
}

/// An event the receiver never answers in time (a payload too big to upload in the timeout,
/// say) waits out back-offs of its own, and the events behind it are delivered meanwhile.
#[test]
fn an_event_that_times_out_alone_holds_back_only_its_own_row() {
    let _serial = serial();
    let recorder = Recorder::start(|request| Reply {
        status: 200,
        headers: vec![],
        delay: if request.keys().contains(&13) { Duration::from_secs(2) } else { Duration::ZERO },
    });
    let mut c = cluster().connect("postgres");
    table(&mut c, "docs_slowevent");
    http_sink(&mut c, "search_slowevent", &recorder, ", \"timeout\": \"1s\", \"batch_size\": 10, \"backoff_base\": \"200ms\", \"backoff_max\": \"1s\", \"max_attempts\": 1");
    c.batch_execute("INSERT INTO docs_slowevent SELECT g, 'x' FROM generate_series(11, 20) g").unwrap();
    let others: HashSet<i64> = (11..=20).filter(|k| *k != 13).collect();
    let delivered = || -> HashSet<i64> { recorder.received().iter().filter(|r| !r.keys().contains(&13)).flat_map(|r| r.keys()).collect() };
    assert!(eventually(Duration::from_secs(40), || delivered() == others), "delivered {:?}", delivered());
    assert!(eventually(Duration::from_secs(10), || {
        let sink = backlog(&mut c, "search_slowevent");
        sink.get::<_, i64>("pending") + sink.get::<_, i64>("in_flight") + sink.get::<_, i64>("retrying") == 1
    }));
    assert_eq!(backlog(&mut c, "search_slowevent").get::<_, i64>("dead"), 0, "a timeout uses no attempt (max_attempts is 1)");
    let tried_alone = recorder.received().iter().filter(|r| r.keys() == [13]).count();
    assert!(tried_alone >= 1, "{:?}", recorder.received());
    c.batch_execute("SELECT outbox_unsubscribe('search_slowevent')").unwrap();
}

#[test]
fn too_many_requests_waits_for_retry_after() {
    let _serial = serial();
    let calls = Arc::new(AtomicUsize::new(0));
    let seen = calls.clone();
    let recorder = Recorder::start(move |_| {
        if seen.fetch_add(1, Ordering::SeqCst) == 0 {
            Reply { status: 429, headers: vec![("Retry-After".into(), "2".into())], delay: Duration::ZERO }
        } else {
            Reply::status(200)
        }
    });
    let mut c = cluster().connect("postgres");
    table(&mut c, "docs_429");
    http_sink(&mut c, "search_429", &recorder, ", \"backoff_max\": \"30s\"");
    c.batch_execute("INSERT INTO docs_429 VALUES (1, 'x')").unwrap();
    assert!(eventually(Duration::from_secs(15), || settled(&mut c, "search_429")));
    let requests = recorder.received();
    assert_eq!(requests.len(), 2);
    let waited = requests[1].at - requests[0].at;
    assert!(waited >= Duration::from_millis(1900) && waited < Duration::from_secs(6), "{waited:?}");
}

#[test]
fn a_slow_sink_does_not_delay_the_others() {
    let slow = Recorder::start(|_| Reply { status: 200, headers: vec![], delay: Duration::from_secs(10) });
    let fast = Recorder::start(|_| Reply::status(200));
    let cluster = own_cluster();
    let mut c = cluster.connect("postgres");
    table(&mut c, "docs_iso");
    // waiting for the slow sink would take its whole timeout, 5 s
    http_sink(&mut c, "iso_slow", &slow, ", \"timeout\": \"5s\", \"backoff_base\": \"5s\"");
    http_sink(&mut c, "iso_fast", &fast, "");
    std::thread::sleep(Duration::from_millis(500));
    for id in 1..=5i64 {
        let committed = Instant::now();
        c.execute("INSERT INTO docs_iso VALUES ($1, 'x')", &[&id]).unwrap();
        assert!(eventually(Duration::from_secs(4), || fast.delivered_keys().contains(&id)), "fast sink delayed");
        let latency = fast.received().iter().find(|r| r.keys().contains(&id)).unwrap().at.saturating_duration_since(committed);
        assert!(latency < Duration::from_secs(2), "event {id} took {latency:?}");
    }
    assert!(backlog(&mut c, "iso_slow").get::<_, bool>("backing_off") || !settled(&mut c, "iso_slow"));
}

#[test]
fn function_sink_keeps_a_second_table_in_step_with_the_source() {
    let _serial = serial();
    let mut c = cluster().connect("postgres");
    c.batch_execute(
        "CREATE TABLE docs_fn (id bigint PRIMARY KEY, content text);
         SELECT outbox_attach('docs_fn', payload_columns => ARRAY['content']);
         CREATE TABLE vectors_fn (id bigint PRIMARY KEY, content text);
         -- LANGUAGE sql on purpose: a void SQL function returns NULL, which the worker accepts
         CREATE FUNCTION apply_fn(batch jsonb) RETURNS void LANGUAGE sql AS $$
             DELETE FROM vectors_fn v USING jsonb_array_elements(batch) e
             WHERE e->>'type' = 'EMBED_DELETE' AND v.id = (e->'payload'->'key'->>'id')::bigint;
             INSERT INTO vectors_fn
             SELECT DISTINCT ON ((e->'payload'->'key'->>'id')::bigint)
                    (e->'payload'->'key'->>'id')::bigint, e->'payload'->'data'->>'content'
             FROM jsonb_array_elements(batch) WITH ORDINALITY AS x(e, n)
             WHERE e->>'type' = 'EMBED_UPSERT'
             ORDER BY (e->'payload'->'key'->>'id')::bigint, n DESC
             ON CONFLICT (id) DO UPDATE SET content = EXCLUDED.content;
         $$;
         SELECT outbox_subscribe('vectors_fn', 'function', '{\"function\": \"public.apply_fn\"}');",
    )
    .unwrap();
    // random upserts and deletes, some rolled back
    let mut state: u64 = 42;
    let mut next = move || {
        state = state.wrapping_mul(6364136223846793005).wrapping_add(1442695040888963407);
        state >> 33
    };
    for _ in 0..300 {
        let id = (next() % 40) as i64;
        let rollback = next() % 5 == 0;
        let sql = if next() % 3 == 0 {
            format!("DELETE FROM docs_fn WHERE id = {id}")
        } else {
            format!("INSERT INTO docs_fn VALUES ({id}, 'v{}') ON CONFLICT (id) DO UPDATE SET content = EXCLUDED.content", next() % 1000)
        };
        c.batch_execute(&format!("BEGIN; {sql}; {}", if rollback { "ROLLBACK" } else { "COMMIT" })).unwrap();
    }
    let converged = eventually(Duration::from_secs(20), || settled(&mut c, "vectors_fn"));
    cluster().show_log();
    assert!(converged);
    let differences: i64 = c
        .query_one(
            "SELECT count(*) FROM docs_fn s FULL JOIN vectors_fn v USING (id) \
             WHERE s.id IS NULL OR v.id IS NULL OR s.content IS DISTINCT FROM v.content",
            &[],
        )
        .unwrap()
        .get(0);
    assert_eq!(differences, 0, "the copy converged");
}

#[test]
fn function_sink_errors_fail_only_the_poison_event() {
    let _serial = serial();
    let mut c = cluster().connect("postgres");
    c.batch_execute(
        "CREATE TABLE docs_fe (id bigint PRIMARY KEY, content text);
         SELECT outbox_attach('docs_fe');
         CREATE TABLE applied_fe (id bigint PRIMARY KEY);
         CREATE FUNCTION apply_fe(batch jsonb) RETURNS void LANGUAGE plpgsql AS $$
         BEGIN
             IF EXISTS (SELECT 1 FROM jsonb_array_elements(batch) e WHERE e->'payload'->'key'->>'id' = '7') THEN
                 RAISE EXCEPTION 'cannot embed document 7';
             END IF;
             INSERT INTO applied_fe SELECT (e->'payload'->'key'->>'id')::bigint FROM jsonb_array_elements(batch) e;
         END $$;
         SELECT outbox_subscribe('applied_fe', 'function', '{\"function\": \"public.apply_fe\", \"max_attempts\": 1}');
         INSERT INTO docs_fe SELECT g, 'x' FROM generate_series(1, 12) g;",
    )
    .unwrap();
    assert!(eventually(Duration::from_secs(15), || settled(&mut c, "applied_fe")));
    let applied: i64 = c.query_one("SELECT count(*) FROM applied_fe", &[]).unwrap().get(0);
    assert_eq!(applied, 11, "every event but the poison one is applied, once");
    let error: String = c.query_one("SELECT last_error FROM outbox_dead_letters WHERE subscription = 'applied_fe'", &[]).unwrap().get(0);
    assert!(error.contains("cannot embed document 7"), "{error}");
}

/// A function that removes or renames its own subscription fails its call, which is rolled
/// back: the ack by name after it failed, the next worker called it again, and the worker
/// restarted every second while no other sink was delivered. The other sinks go on, and so
/// does the worker.
#[test]
fn a_function_sink_that_removes_its_own_subscription_fails_alone() {
    let _serial = serial();
    let recorder = Recorder::start(|_| Reply::status(200));
    let mut c = cluster().connect("postgres");
    c.batch_execute(
        "CREATE TABLE docs_selfish (id bigint PRIMARY KEY, content text);
         SELECT outbox_attach('docs_selfish');
         CREATE TABLE applied_selfish (id bigint PRIMARY KEY);
         CREATE FUNCTION apply_selfish(batch jsonb) RETURNS void LANGUAGE plpgsql AS $$
         BEGIN
             IF EXISTS (SELECT 1 FROM jsonb_array_elements(batch) e WHERE e->'payload'->'key'->>'id' = '3') THEN
                 PERFORM outbox_unsubscribe('mirror_selfish');
             ELSIF EXISTS (SELECT 1 FROM jsonb_array_elements(batch) e WHERE e->'payload'->'key'->>'id' = '5') THEN
                 UPDATE outbox_subscriptions SET name = 'renamed_selfish' WHERE name = 'mirror_selfish';
             END IF;
             INSERT INTO applied_selfish SELECT (e->'payload'->'key'->>'id')::bigint FROM jsonb_array_elements(batch) e;
         END $$;
         SELECT outbox_subscribe('mirror_selfish', 'function', '{\"function\": \"public.apply_selfish\", \"max_attempts\": 1}');",
    )
    .unwrap();
    http_sink(&mut c, "search_selfish", &recorder, "");
    assert!(eventually(Duration::from_secs(5), || worker_pid(&mut c).is_some()));
    let worker = worker_pid(&mut c);
    c.batch_execute("INSERT INTO docs_selfish SELECT g, 'x' FROM generate_series(1, 8) g").unwrap();
    assert!(eventually(Duration::from_secs(15), || settled(&mut c, "mirror_selfish")), "{:?}", backlog(&mut c, "mirror_selfish"));
    let applied: Vec<i64> = c.query("SELECT id FROM applied_selfish ORDER BY id", &[]).unwrap().iter().map(|r| r.get(0)).collect();
    assert_eq!(applied, [1, 2, 4, 6, 7, 8]);
    let dead: Vec<String> = c.query("SELECT last_error FROM outbox_dead_letters WHERE subscription = 'mirror_selfish'", &[]).unwrap().iter().map(|r| r.get(0)).collect();
    assert_eq!(dead.len(), 2, "{dead:?}");
    assert!(dead.iter().all(|e| e.contains("the function removed or renamed its own subscription \"mirror_selfish\"")), "{dead:?}");
    assert!(eventually(Duration::from_secs(5), || settled(&mut c, "search_selfish")));
    let mut keys = recorder.delivered_keys();
    keys.sort_unstable();
    assert_eq!(keys, (1..=8).collect::<Vec<_>>(), "the other sink got everything once");
    assert_eq!(worker_pid(&mut c), worker, "the worker did not restart");
    c.batch_execute("SELECT outbox_unsubscribe('mirror_selfish'); SELECT outbox_unsubscribe('search_selfish')").unwrap();
}

/// A function sink whose function sleeps until `hang_<name>` is emptied, applying the batch's
/// keys to `applied_<name>` once it returns.
fn hanging_function_sink(c: &mut Client, name: &str, options: &str) {
    c.batch_execute(&format!(
        "CREATE TABLE hang_{name} (hang boolean); INSERT INTO hang_{name} VALUES (true);
         CREATE TABLE applied_{name} (id bigint);
         CREATE FUNCTION apply_{name}(batch jsonb) RETURNS void LANGUAGE plpgsql AS $$
         BEGIN
             IF EXISTS (SELECT 1 FROM hang_{name}) THEN PERFORM pg_sleep(600); END IF;
             INSERT INTO applied_{name} SELECT (e->'payload'->'key'->>'id')::bigint FROM jsonb_array_elements(batch) e;
         END $$;
         SELECT outbox_subscribe('{name}', 'function', '{{\"function\": \"public.apply_{name}\"{options}}}');"
    ))
    .unwrap();
}

#[test]
fn a_function_sink_past_its_timeout_is_cancelled_and_backs_off_without_holding_up_the_others() {
    let fast = Recorder::start(|_| Reply::status(200));
    let cluster = own_cluster();
    let mut c = cluster.connect("postgres");
    table(&mut c, "docs_hang");
    // backed off longer than the waits below: a worker that waited out the backoff, or called
    // the function again at once, would hold the other sink up past them
    hanging_function_sink(&mut c, "hung", ", \"timeout\": \"1s\", \"backoff_base\": \"10s\", \"backoff_max\": \"12s\", \"max_attempts\": 1");
    http_sink(&mut c, "beside_hung", &fast, "");
    std::thread::sleep(Duration::from_millis(500));
    let started: f64 = c.query_one("SELECT extract(epoch FROM clock_timestamp())::float8", &[]).unwrap().get(0);
    for id in 1..=5i64 {
        c.execute("INSERT INTO docs_hang VALUES ($1, 'x')", &[&id]).unwrap();
        // a round calls the function for at most its timeout, then the sink backs off
        assert!(eventually(Duration::from_secs(5), || fast.delivered_keys().contains(&id)), "event {id} held up");
        if id == 1 {
            // the first call failed when it was cancelled, a second after it began
            let mut failed_at = None;
            assert!(
                eventually(Duration::from_secs(5), || {
                    failed_at = c
                        .query_one("SELECT extract(epoch FROM last_error_at)::float8 FROM outbox_backlog WHERE subscription = 'hung'", &[])
                        .unwrap()
                        .get::<_, Option<f64>>(0);
                    failed_at.is_some()
                }),
                "the first call's failure is recorded"
            );
            let after = failed_at.unwrap() - started;
            assert!(after >= 1.0, "the failure is dated {after:.3} s after the event, before the call's timeout ran out");
        }
    }
    // down from the first timeout until it delivers again, during its probes too
    let mut samples = Vec::new();
    while samples.len() < 40 {
        let metrics: String = c.query_one("SELECT outbox_metrics()", &[]).unwrap().get(0);
        samples.push(sample(&metrics, "outbox_sink_up{subscription=\"hung\"}").unwrap());
        std::thread::sleep(Duration::from_millis(100));
    }
    assert!(samples.iter().all(|&up| up == 0.0), "{samples:?}");
    let hung = backlog(&mut c, "hung");
    let error: String = hung.get("last_error");
    assert!(error.contains("statement timeout") && error.contains("apply_hung"), "{error}");
    assert_eq!(hung.get::<_, i64>("dead"), 0, "a timeout uses no attempt (max_attempts is 1)");
    c.batch_execute("DELETE FROM hang_hung").unwrap();
    assert!(eventually(Duration::from_secs(30), || settled(&mut c, "hung")), "delivered once the function is quick again");
    let applied: HashSet<i64> = c.query("SELECT id FROM applied_hung", &[]).unwrap().iter().map(|r| r.get(0)).collect();
    assert_eq!(applied, (1..=5).collect::<HashSet<_>>());
    assert_eq!(backlog(&mut c, "hung").get::<_, i64>("dead"), 0);
    let metrics: String = c.query_one("SELECT outbox_metrics()", &[]).unwrap().get(0);
    assert_eq!(sample(&metrics, "outbox_sink_up{subscription=\"hung\"}"), Some(1.0), "up again");
}

/// A function sink is the function `name(jsonb)`: a name with an argument list of its own
/// (`f(int8, int8 --)`, the appended `(jsonb)` commented out) had the worker call a function
/// of other arguments with one jsonb, and crash. And it is called only while it has the owner
/// it had when subscribed: dropped by its owner and made again by a superuser, the function
/// under the subscribed name was called as the superuser.
#[test]
fn a_function_sink_calls_only_the_function_its_subscriber_could_have_called() {
    let _serial = serial();
    let mut c = cluster().connect("postgres");
    table(&mut c, "docs_owner");
    c.batch_execute(
        "CREATE TABLE applied_owner (id bigint, called_as text);
         CREATE ROLE sink_owner; GRANT CREATE ON SCHEMA public TO sink_owner; GRANT INSERT ON applied_owner TO sink_owner;
         SET ROLE sink_owner;
         CREATE FUNCTION public.apply_owner(batch jsonb) RETURNS void LANGUAGE sql
             AS $$ INSERT INTO applied_owner SELECT (e->'payload'->'key'->>'id')::bigint, current_user FROM jsonb_array_elements(batch) e $$;
         RESET ROLE;
         CREATE FUNCTION public.two_args(a bigint, b bigint) RETURNS void LANGUAGE sql AS 'SELECT';
         CREATE PROCEDURE public.a_procedure(batch jsonb) LANGUAGE sql AS 'SELECT';
         CREATE FUNCTION public.a_set(batch jsonb) RETURNS SETOF int LANGUAGE sql AS 'SELECT 1';",
    )
    .unwrap();
    for (function, expected) in [
        ("public.two_args(int8, int8 --)", "must name a function as schema.name"),
        ("a_set", "function must be qualified with its schema, as schema.name"),
        ("public.a_procedure", "function public.a_procedure(jsonb) does not exist"),
        ("public.a_set", "function public.a_set(jsonb) does not exist"),
    ] {
        let message = error_of(&mut c, &format!("SELECT outbox_subscribe('bad_fn', 'function', '{{\"function\": \"{function}\"}}')"));
        assert!(message.contains(expected), "{function}: {message}");
    }
    c.batch_execute("SELECT outbox_subscribe('owned_fn', 'function', '{\"function\": \"public.apply_owner\"}')").unwrap();
    c.batch_execute(
        "DROP FUNCTION public.apply_owner(jsonb);
         CREATE FUNCTION public.apply_owner(batch jsonb) RETURNS void LANGUAGE sql
             AS $$ INSERT INTO applied_owner SELECT (e->'payload'->'key'->>'id')::bigint, current_user FROM jsonb_array_elements(batch) e $$;
         INSERT INTO docs_owner VALUES (1, 'x');",
    )
    .unwrap();
    assert!(eventually(Duration::from_secs(10), || {
        let error: Option<String> = backlog(&mut c, "owned_fn").get("last_error");
        error.is_some_and(|e| e.contains("is owned by postgres, not by sink_owner as when it was subscribed"))
    }));
    assert_eq!(scalar_i64(&mut c, "SELECT count(*) FROM applied_owner"), 0, "not called as the superuser");
    c.batch_execute("ALTER FUNCTION public.apply_owner(jsonb) OWNER TO sink_owner").unwrap();
    assert!(eventually(Duration::from_secs(15), || settled(&mut c, "owned_fn")));
    let called: Vec<(i64, String)> = c.query("SELECT id, called_as FROM applied_owner", &[]).unwrap().iter().map(|r| (r.get(0), r.get(1))).collect();
    assert_eq!(called, [(1, "sink_owner".to_string())]);
    c.batch_execute("SELECT outbox_unsubscribe('owned_fn')").unwrap();
}

/// A function that takes 400 ms an event is cancelled on a batch of three or more: the
/// worker hands it smaller batches until every event is applied.
#[test]
fn a_function_sink_too_slow_for_a_whole_batch_gets_smaller_ones() {
    let cluster = own_cluster();
    let mut c = cluster.connect("postgres");
    table(&mut c, "docs_slowfn");
    c.batch_execute(
        "CREATE TABLE applied_slowfn (id bigint, batch_length integer);
         CREATE FUNCTION apply_slowfn(batch jsonb) RETURNS void LANGUAGE plpgsql AS $$
         BEGIN
             PERFORM pg_sleep(0.4 * jsonb_array_length(batch));
             INSERT INTO applied_slowfn SELECT (e->'payload'->'key'->>'id')::bigint, jsonb_array_length(batch) FROM jsonb_array_elements(batch) e;
         END $$;
         SELECT outbox_subscribe('slowfn', 'function', '{\"function\": \"public.apply_slowfn\", \"timeout\": \"1s\", \"batch_size\": 8, \"backoff_base\": \"200ms\", \"backoff_max\": \"1s\", \"max_attempts\": 1}');
         INSERT INTO docs_slowfn SELECT g, 'x' FROM generate_series(1, 8) g;",
    )
    .unwrap();
    assert!(eventually(Duration::from_secs(40), || settled(&mut c, "slowfn")), "{:?}", backlog(&mut c, "slowfn"));
    let applied: Vec<(i64, i32)> = c.query("SELECT id, batch_length FROM applied_slowfn ORDER BY id", &[]).unwrap().iter().map(|r| (r.get(0), r.get(1))).collect();
    assert_eq!(applied.iter().map(|(id, _)| *id).collect::<Vec<_>>(), (1..=8).collect::<Vec<_>>(), "each applied once");
    assert!(applied.iter().all(|(_, length)| *length <= 2), "{applied:?}");
    assert_eq!(backlog(&mut c, "slowfn").get::<_, i64>("dead"), 0);
}

/// A function sink whose calls take 1.8 s, one after another, and an HTTP sink on
/// the same table: the HTTP sink gets a batch between any two calls. (Its batches were
/// claimed in the function calls' transaction and posted after it, and settled only after the
/// next call: one batch for every two calls, and a reviewer's HTTP sinks fell behind.)
#[test]
fn a_busy_function_sink_delays_an_http_sink_by_at_most_one_call() {
    let fast = Recorder::start(|_| Reply::status(200));
    let cluster = own_cluster();
    let mut c = cluster.connect("postgres");
    table(&mut c, "docs_busyfn");
    c.batch_execute(
        "CREATE FUNCTION apply_busyfn(batch jsonb) RETURNS void LANGUAGE sql AS 'SELECT pg_sleep(1.8)';
         SELECT outbox_subscribe('busyfn', 'function', '{\"function\": \"public.apply_busyfn\", \"timeout\": \"5s\", \"batch_size\": 1}');",
    )
    .unwrap();
    http_sink(&mut c, "beside_busyfn", &fast, "");
    // some 70 s of calls for the function sink
    c.batch_execute("INSERT INTO docs_busyfn SELECT g, 'x' FROM generate_series(1001, 1040) g").unwrap();
    assert!(eventually(Duration::from_secs(5), || fast.delivered_keys().contains(&1040)));
    let mut latencies = Vec::new();
    for id in 1..=10i64 {
        let committed = Instant::now();
        c.execute("INSERT INTO docs_busyfn VALUES ($1, 'x')", &[&id]).unwrap();
        assert!(eventually(Duration::from_secs(5), || fast.delivered_keys().contains(&id)), "event {id} not delivered");
        latencies.push(fast.received().iter().find(|r| r.keys().contains(&id)).unwrap().at.saturating_duration_since(committed));
        std::thread::sleep(Duration::from_millis(300));
    }
    assert!(!settled(&mut c, "busyfn"), "the function sink was busy throughout");
    let worst = latencies.iter().max().unwrap();
    // one call is 1.8 s, two 3.6 s
    assert!(*worst < Duration::from_millis(2700), "{latencies:?}");
}

/// A call that goes past its timeout without being stopped by it (it catches the cancel, or
/// is in code that checks for none when the timer fires) is handled as cancelled: its work
/// rolls back and the sink backs off, and the worker carries on.
#[test]
fn a_function_sink_past_its_timeout_is_given_back_even_if_the_cancel_did_not_stop_it() {
    let cluster = own_cluster();
    let mut c = cluster.connect("postgres");
    table(&mut c, "docs_late");
    c.batch_execute(
        "CREATE TABLE late_mode (mode text); INSERT INTO late_mode VALUES ('catch');
         CREATE TABLE applied_late (id bigint);
         CREATE FUNCTION apply_late(batch jsonb) RETURNS text LANGUAGE plpgsql AS $$
         DECLARE started timestamptz := clock_timestamp(); n int := 30000000;
         BEGIN
             INSERT INTO applied_late SELECT (e->'payload'->'key'->>'id')::bigint FROM jsonb_array_elements(batch) e;
             IF (SELECT mode FROM late_mode) = 'catch' THEN
                 BEGIN PERFORM pg_sleep(3); EXCEPTION WHEN query_canceled THEN NULL; END;
             ELSIF (SELECT mode FROM late_mode) = 'catch, then fail' THEN
                 BEGIN PERFORM pg_sleep(3); EXCEPTION WHEN query_canceled THEN NULL; END;
                 RAISE EXCEPTION 'gave up late';
             ELSIF (SELECT mode FROM late_mode) = 'uninterrupted' THEN
                 -- lpad checks for no interrupt, and takes about 0.3 s: started at 0.95 s, the
                 -- timer fires inside it, and the call returns with the cancel pending, before
                 -- twice its timeout (n is a variable, or the planner would run lpad while
                 -- planning, and check for interrupts after)
                 PERFORM pg_sleep(greatest(0, 0.95 - extract(epoch FROM clock_timestamp() - started)::float8));
                 RETURN lpad('', n, 'x');
             END IF;
             RETURN NULL;
         END $$;
         SELECT outbox_subscribe('late', 'function', '{\"function\": \"public.apply_late\", \"timeout\": \"1s\", \"backoff_base\": \"1s\", \"backoff_max\": \"2s\", \"max_attempts\": 1}');",
    )
    .unwrap();
    assert!(eventually(Duration::from_secs(5), || worker_pid(&mut c).is_some()));
    let worker = worker_pid(&mut c).unwrap();
    c.batch_execute("INSERT INTO docs_late VALUES (1, 'x')").unwrap();
    for mode in ["catch", "catch, then fail", "uninterrupted"] {
        c.execute("UPDATE late_mode SET mode = $1", &[&mode]).unwrap();
        let error = || backlog(&mut cluster.connect("postgres"), "late").get::<_, Option<String>>("last_error").unwrap_or_default();
        // (under load the timer may fire before lpad, and the cancel stop the call as usual)
        let expected = match mode {
            "uninterrupted" => "timeout",
            "catch, then fail" => "then failed: gave up late",
            _ => "ran past its timeout",
        };
        assert!(eventually(Duration::from_secs(10), || error().contains(expected)), "{mode}: {}", error());
        c.batch_execute("UPDATE outbox_sink_state SET last_error = NULL").unwrap();
        assert_eq!(scalar_i64(&mut c, "SELECT count(*) FROM applied_late"), 0, "{mode}: the late call's work rolls back");
        assert_eq!(backlog(&mut c, "late").get::<_, i64>("dead"), 0, "{mode}: a late call uses no attempt");
        assert_eq!(worker_pid(&mut c), Some(worker), "{mode}: the worker carried on");
    }
    c.batch_execute("UPDATE late_mode SET mode = 'quick'").unwrap();
    assert!(eventually(Duration::from_secs(10), || settled(&mut c, "late")));
    assert_eq!(scalar_i64(&mut c, "SELECT count(*) FROM applied_late"), 1);
    assert_eq!(worker_pid(&mut c), Some(worker));
}

/// A function that catches every cancel is stopped the only way left, by ending the worker;
/// the next worker backs its sink off instead of calling it again at once, and the other
/// sinks are held up for no more than twice its timeout.
#[test]
fn a_function_sink_that_keeps_catching_the_cancel_is_ended_with_the_worker() {
    let fast = Recorder::start(|_| Reply::status(200));
    let cluster = own_cluster();
    let mut c = cluster.connect("postgres");
    table(&mut c, "docs_stubborn");
    c.batch_execute(
        "CREATE TABLE stubborn_flag (on_ boolean); INSERT INTO stubborn_flag VALUES (true);
         CREATE TABLE applied_stubborn (id bigint);
         CREATE FUNCTION apply_stubborn(batch jsonb) RETURNS void LANGUAGE plpgsql AS $$
         BEGIN
             WHILE EXISTS (SELECT 1 FROM stubborn_flag) LOOP
                 BEGIN PERFORM pg_sleep(0.2); EXCEPTION WHEN query_canceled THEN NULL; END;
             END LOOP;
             INSERT INTO applied_stubborn SELECT (e->'payload'->'key'->>'id')::bigint FROM jsonb_array_elements(batch) e;
         END $$;
         SELECT outbox_subscribe('stubborn', 'function', '{\"function\": \"public.apply_stubborn\", \"timeout\": \"1s\", \"backoff_base\": \"10s\", \"backoff_max\": \"12s\"}');",
    )
    .unwrap();
    http_sink(&mut c, "beside_stubborn", &fast, "");
    assert!(eventually(Duration::from_secs(5), || worker_pid(&mut c).is_some()));
    let first = worker_pid(&mut c).unwrap();
    c.batch_execute("INSERT INTO docs_stubborn VALUES (1, 'x')").unwrap();
    assert!(eventually(Duration::from_secs(8), || fast.delivered_keys().contains(&1)), "the other sink was held up");
    assert!(eventually(Duration::from_secs(5), || worker_pid(&mut c).is_some_and(|p| p != first)), "the worker was ended to stop the call");
    // (the other sink may have had its event before the call began: wait for the next worker)
    let error = || backlog(&mut cluster.connect("postgres"), "stubborn").get::<_, Option<String>>("last_error").unwrap_or_default();
    assert!(eventually(Duration::from_secs(5), || error().contains("restarted")), "{}", error());
    // backing off: the next insert reaches the other sink at once, and the function is not
    // called again (a call would outlive its watchdog, 2 s, and end the worker)
    let second = worker_pid(&mut c);
    c.batch_execute("INSERT INTO docs_stubborn VALUES (2, 'x')").unwrap();
    assert!(eventually(Duration::from_secs(5), || fast.delivered_keys().contains(&2)), "held up again");
    std::thread::sleep(Duration::from_secs(3));
    assert_eq!(worker_pid(&mut c), second, "the function was called again at once");
    c.batch_execute("DELETE FROM stubborn_flag").unwrap();
    assert!(eventually(Duration::from_secs(20), || settled(&mut c, "stubborn")), "{:?}", backlog(&mut c, "stubborn"));
    let applied: HashSet<i64> = c.query("SELECT id FROM applied_stubborn", &[]).unwrap().iter().map(|r| r.get(0)).collect();
    assert_eq!(applied, HashSet::from([1, 2]));
}

/// A function that ends the worker in its call (a FATAL, or `pg_terminate_backend` of its own
/// backend, which a superuser's function may do) had the worker restart every second, calling
/// it again each time, and nothing the other sinks were sent was acked. The next worker backs
/// that sink off, as after a call that ran past twice its timeout, and the others go on.
#[test]
fn a_function_sink_that_ends_the_worker_is_backed_off() {
    let fast = Recorder::start(|_| Reply::status(200));
    let cluster = own_cluster();
    let mut c = cluster.connect("postgres");
    table(&mut c, "docs_fatal");
    c.batch_execute(
        "CREATE TABLE fatal_flag (on_ boolean); INSERT INTO fatal_flag VALUES (true);
         CREATE TABLE applied_fatal (id bigint);
         CREATE FUNCTION apply_fatal(batch jsonb) RETURNS void LANGUAGE plpgsql AS $$
         BEGIN
             IF EXISTS (SELECT 1 FROM fatal_flag) THEN
                 PERFORM pg_terminate_backend(pg_backend_pid());
             END IF;
             INSERT INTO applied_fatal SELECT (e->'payload'->'key'->>'id')::bigint FROM jsonb_array_elements(batch) e;
         END $$;
         SELECT outbox_subscribe('fatal', 'function', '{\"function\": \"public.apply_fatal\", \"backoff_base\": \"10s\", \"backoff_max\": \"12s\"}');",
    )
    .unwrap();
    http_sink(&mut c, "beside_fatal", &fast, "");
    assert!(eventually(Duration::from_secs(5), || worker_pid(&mut c).is_some()));
    let first = worker_pid(&mut c).unwrap();
    c.batch_execute("INSERT INTO docs_fatal VALUES (1, 'x')").unwrap();
    assert!(eventually(Duration::from_secs(5), || worker_pid(&mut c).is_some_and(|p| p != first)), "the function ended the worker");
    let error = || backlog(&mut cluster.connect("postgres"), "fatal").get::<_, Option<String>>("last_error").unwrap_or_default();
    assert!(eventually(Duration::from_secs(5), || error().contains("the worker ended during a call")), "{}", error());
    // backing off: the other sink gets its events, acked by this worker
    let second = worker_pid(&mut c);
    c.batch_execute("INSERT INTO docs_fatal VALUES (2, 'x')").unwrap();
    assert!(eventually(Duration::from_secs(5), || settled(&mut c, "beside_fatal")), "{:?}", backlog(&mut c, "beside_fatal"));
    assert!(fast.delivered_keys().contains(&2));
    assert_eq!(worker_pid(&mut c), second, "the function was not called again at once");
    c.batch_execute("DELETE FROM fatal_flag").unwrap();
    assert!(eventually(Duration::from_secs(20), || settled(&mut c, "fatal")), "{:?}", backlog(&mut c, "fatal"));
    let applied: HashSet<i64> = c.query("SELECT id FROM applied_fatal", &[]).unwrap().iter().map(|r| r.get(0)).collect();
    assert_eq!(applied, HashSet::from([1, 2]));
}

/// A call that takes the server down with it (the kernel's OOM killer, a crash in C code; here
/// SIGKILL of the worker in the call) has the postmaster restart every process and make shared
/// memory anew. The worker after the restart still backs that sink off, from the mark the call
/// left in the data directory, rather than calling it again at once into the same crash.
#[test]
fn a_function_sink_whose_call_crashed_the_server_is_backed_off_after_the_restart() {
    let cluster = own_cluster();
    let mut c = cluster.connect("postgres");
    table(&mut c, "docs_crash");
    c.batch_execute(
        "CREATE TABLE crash_flag (on_ boolean); INSERT INTO crash_flag VALUES (true);
         CREATE TABLE applied_crash (id bigint);
         CREATE FUNCTION apply_crash(batch jsonb) RETURNS void LANGUAGE plpgsql AS $$
         BEGIN
             WHILE EXISTS (SELECT 1 FROM crash_flag) LOOP PERFORM pg_sleep(0.05); END LOOP;
             INSERT INTO applied_crash SELECT (e->'payload'->'key'->>'id')::bigint FROM jsonb_array_elements(batch) e;
         END $$;
         SELECT outbox_subscribe('crash', 'function', '{\"function\": \"public.apply_crash\", \"timeout\": \"1min\", \"backoff_base\": \"3s\", \"backoff_max\": \"5s\"}');",
    )
    .unwrap();
    assert!(eventually(Duration::from_secs(5), || worker_pid(&mut c).is_some()));
    c.batch_execute("INSERT INTO docs_crash VALUES (1, 'x')").unwrap();
    let in_call = "SELECT count(*) FROM pg_stat_activity WHERE backend_type = 'outbox delivery worker' AND wait_event = 'PgSleep'";
    assert!(eventually(Duration::from_secs(10), || scalar_i64(&mut c, in_call) == 1), "the worker is in the call");
    let pid = worker_pid(&mut c).unwrap();
    let killed = std::process::Command::new("kill").args(["-9", &pid.to_string()]).status().unwrap();
    assert!(killed.success());
    drop(c);
    // every backend ends with it; connect again once the server is back
    std::thread::sleep(Duration::from_millis(500));
    let mut c = cluster.connect("postgres");
    let error = || backlog(&mut cluster.connect("postgres"), "crash").get::<_, Option<String>>("last_error").unwrap_or_default();
    assert!(eventually(Duration::from_secs(10), || error().contains("the worker ended during a call")), "{}", error());
    assert_eq!(scalar_i64(&mut c, in_call), 0, "the function was not called again at once");
    c.batch_execute("DELETE FROM crash_flag").unwrap();
    assert!(eventually(Duration::from_secs(20), || settled(&mut c, "crash")), "{:?}", backlog(&mut c, "crash"));
    let applied: Vec<i64> = c.query("SELECT id FROM applied_crash", &[]).unwrap().iter().map(|r| r.get(0)).collect();
    assert_eq!(applied, [1]);
}

/// A replay or requeue held open locks the subscriptions the worker claims from; SIGTERM must
/// still end the worker at once.
#[test]
fn the_worker_can_be_terminated_while_it_waits_for_a_subscription() {
    let recorder = Recorder::start(|_| Reply::status(200));
    let cluster = own_cluster();
    let mut c = cluster.connect("postgres");
    table(&mut c, "docs_wait");
    http_sink(&mut c, "search_wait", &recorder, "");
    assert!(eventually(Duration::from_secs(5), || worker_pid(&mut c).is_some()));
    let mut admin = cluster.connect("postgres");
    admin.batch_execute("BEGIN; SELECT outbox_requeue_dead()").unwrap();
    c.batch_execute("INSERT INTO docs_wait VALUES (1, 'x')").unwrap();
    let waiting = "SELECT count(*) FROM pg_stat_activity WHERE backend_type = 'outbox delivery worker' AND wait_event_type = 'Lock'";
    assert!(eventually(Duration::from_secs(10), || scalar_i64(&mut c, waiting) == 1), "the worker waits for the lock");
    let before = terminate_worker(&mut c);
    assert!(eventually(Duration::from_secs(5), || worker_pid(&mut c).is_none_or(|p| p != before)), "the worker ended");
    admin.batch_execute("ROLLBACK").unwrap();
    assert!(eventually(Duration::from_secs(10), || recorder.delivered_keys().contains(&1)));
}

#[test]
fn the_worker_can_be_terminated_while_a_function_sink_runs() {
    let cluster = own_cluster();
    let mut c = cluster.connect("postgres");
    table(&mut c, "docs_busy");
    hanging_function_sink(&mut c, "busy", ", \"timeout\": \"1h\"");
    c.batch_execute("INSERT INTO docs_busy SELECT g, 'x' FROM generate_series(1, 3) g").unwrap();
    let in_call = || "SELECT count(*) FROM pg_locks l JOIN pg_class t ON t.oid = l.relation \
                      WHERE t.relname = 'hang_busy' AND l.pid = (SELECT pid FROM pg_stat_activity WHERE backend_type = 'outbox delivery worker')";
    assert!(eventually(Duration::from_secs(10), || scalar_i64(&mut c, in_call()) > 0), "the worker is in the function");
    // (the call already sleeps; the next worker's call will not)
    c.batch_execute("DELETE FROM hang_busy").unwrap();
    let before = terminate_worker(&mut c);
    assert!(eventually(Duration::from_secs(10), || worker_pid(&mut c).is_some_and(|p| p != before)), "restarted");
    assert!(eventually(Duration::from_secs(15), || settled(&mut c, "busy")), "the batch in the call is delivered again");
    let applied: HashSet<i64> = c.query("SELECT id FROM applied_busy", &[]).unwrap().iter().map(|r| r.get(0)).collect();
    assert_eq!(applied, (1..=3).collect::<HashSet<_>>());
}

/// A cluster of its own, for tests that measure time or CPU and must not share the worker.
fn own_cluster() -> Cluster {
    own_cluster_with(&PRELOAD)
}

fn own_cluster_with(settings: &[&str]) -> Cluster {
    let cluster = Cluster::start(settings);
    let mut c = cluster.connect("postgres");
    c.batch_execute("CREATE EXTENSION outbox; SELECT outbox_unsubscribe('default')").unwrap();
    cluster
}

#[test]
fn an_outage_longer_than_the_retry_budget_loses_nothing() {
    let down = Arc::new(AtomicBool::new(true));
    let flag = down.clone();
    let recorder = Recorder::start(move |_| Reply::status(if flag.load(Ordering::SeqCst) { 503 } else { 200 }));
    let cluster = own_cluster();
    let mut c = cluster.connect("postgres");
    table(&mut c, "docs_outage");
    http_sink(&mut c, "search_outage", &recorder, ", \"max_attempts\": 2, \"backoff_base\": \"200ms\", \"backoff_max\": \"1s\"");
    for id in 1..=10i64 {
        c.execute("INSERT INTO docs_outage VALUES ($1, 'x')", &[&id]).unwrap();
    }
    std::thread::sleep(Duration::from_secs(4)); // several backoff periods, beyond two attempts
    assert!(backlog(&mut c, "search_outage").get::<_, bool>("backing_off") || recorder.received().len() > 2);
    assert_eq!(backlog(&mut c, "search_outage").get::<_, i64>("dead"), 0);
    let probes = recorder.received().len();
    assert!((1..20).contains(&probes), "the sink is probed, not hammered: {probes} requests");
    down.store(false, Ordering::SeqCst);
    assert!(eventually(Duration::from_secs(5), || settled(&mut c, "search_outage")));
    // the wait between the last refused probe and the next request is one backoff: at most the
    // cap (1 s), where uncapped it would be the fifth, 3.2 s less 10 % jitter
    let requests = recorder.received();
    let resumed = requests[probes].at.saturating_duration_since(requests[probes - 1].at);
    assert!(resumed <= Duration::from_millis(1400), "resumed after {resumed:?}, more than one backoff cap (1 s)");
    let delivered: HashSet<i64> = requests[probes..].iter().flat_map(|r| r.keys()).collect();
    assert_eq!(delivered, (1..=10).collect::<HashSet<_>>());
    assert_eq!(backlog(&mut c, "search_outage").get::<_, i64>("dead"), 0);
}

#[test]
fn the_worker_comes_back_after_being_terminated() {
    let _serial = serial();
    let recorder = Recorder::start(|_| Reply::status(200));
    let mut c = cluster().connect("postgres");
    table(&mut c, "docs_term");
    http_sink(&mut c, "search_term", &recorder, "");
    assert!(eventually(Duration::from_secs(5), || worker_pid(&mut c).is_some()));
    let before = terminate_worker(&mut c);
    assert!(eventually(Duration::from_secs(10), || worker_pid(&mut c).is_some_and(|p| p != before)), "restarted");
    c.batch_execute("INSERT INTO docs_term VALUES (1, 'after restart')").unwrap();
    assert!(eventually(Duration::from_secs(10), || recorder.delivered_keys().contains(&1)));
}

#[test]
fn settings_reload_on_sighup() {
    let _serial = serial();
    let recorder = Recorder::start(|_| Reply::status(200));
    let mut c = cluster().connect("postgres");
    table(&mut c, "docs_hup");
    c.batch_execute("ALTER SYSTEM SET outbox.worker_enabled = off").unwrap();
    c.batch_execute("SELECT pg_reload_conf()").unwrap();
    // the signal wakes the worker at once; the time is for a loaded machine
    std::thread::sleep(Duration::from_secs(2));
    http_sink(&mut c, "search_hup", &recorder, "");
    c.batch_execute("INSERT INTO docs_hup SELECT g, 'x' FROM generate_series(1, 6) g").unwrap();
    std::thread::sleep(Duration::from_secs(1));
    assert!(recorder.received().is_empty(), "a disabled worker delivers nothing");
    c.batch_execute("ALTER SYSTEM SET outbox.worker_enabled = on").unwrap();
    c.batch_execute("ALTER SYSTEM SET outbox.batch_size = 2").unwrap();
    c.batch_execute("SELECT pg_reload_conf()").unwrap();
    assert!(eventually(Duration::from_secs(10), || recorder.delivered_keys().len() >= 6));
    assert!(recorder.received().iter().all(|r| r.keys().len() <= 2), "batches of outbox.batch_size");
    c.batch_execute("ALTER SYSTEM RESET outbox.batch_size").unwrap();
    c.batch_execute("SELECT pg_reload_conf()").unwrap();
}

#[test]
fn the_worker_uses_no_measurable_cpu_when_idle() {
    // default settings (poll_interval 5 s): the worker sleeps until a commit wakes it
    let cluster = own_cluster_with(&PRELOAD[..2]);
    let mut c = cluster.connect("postgres");
    let recorder = Recorder::start(|_| Reply::status(200));
    table(&mut c, "idle_docs");
    http_sink(&mut c, "idle_sink", &recorder, "");
    c.batch_execute("INSERT INTO idle_docs VALUES (1, 'x')").unwrap();
    assert!(eventually(Duration::from_secs(5), || settled(&mut c, "idle_sink")));
    assert!(eventually(Duration::from_secs(5), || worker_pid(&mut c).is_some()));
    let pid = worker_pid(&mut c).unwrap();
    let cpu = || cpu_seconds(pid.into());
    let before = cpu();
    std::thread::sleep(Duration::from_secs(10));
    let used = cpu() - before;
    println!("worker CPU over 10 idle seconds: {:.2} s ({:.2} % of a core)", used, used * 10.0);
    assert!(used < 0.1, "{used} s of CPU in 10 idle seconds (1 % of a core)");
}

/// The worker runs as a superuser, so a database owner who puts hostile operators and
/// functions first on the database's search_path must not get them run through deliveries, a
/// 4xx batch split down to its poison event, dead letters, a function sink or retention.
#[test]
fn the_worker_ignores_hostile_objects_on_the_database_search_path() {
    let recorder = Recorder::start(|r| Reply::status(if r.keys().contains(&3) { 400 } else { 200 }));
    let cluster = own_cluster_with(&[&PRELOAD[..], &["outbox.retention = '2s'"]].concat());
    let mut c = cluster.connect("postgres");
    plant_hostile_objects(&mut c);
    c.batch_execute("ALTER DATABASE postgres SET search_path = evil, public, pg_catalog").unwrap();
    // a new worker session starts with that search_path
    assert!(eventually(Duration::from_secs(5), || worker_pid(&mut c).is_some()));
    let old = terminate_worker(&mut c);
    assert!(eventually(Duration::from_secs(10), || worker_pid(&mut c).is_some_and(|pid| pid != old)));
    table(&mut c, "docs_hostile");
    c.batch_execute(
        "CREATE TABLE public.applied (event_id bigint);
         CREATE FUNCTION public.apply(batch jsonb) RETURNS void LANGUAGE sql
             AS $$ INSERT INTO public.applied SELECT (e->>'id')::bigint FROM pg_catalog.jsonb_array_elements(batch) e $$;
         SELECT outbox_subscribe('hostile_fn', 'function', '{\"function\": \"public.apply\"}');",
    )
    .unwrap();
    http_sink(&mut c, "hostile_http", &recorder, ", \"max_attempts\": 1");
    c.batch_execute(
        "INSERT INTO docs_hostile SELECT g, 'doc' FROM pg_catalog.generate_series(1, 6) g;
         UPDATE docs_hostile SET content = 'changed' WHERE id OPERATOR(pg_catalog.=) 1;
         DELETE FROM docs_hostile WHERE id OPERATOR(pg_catalog.=) 6;",
    )
    .unwrap();
    let delivered = || {
        let accepted = recorder.received().into_iter().filter(|r| !r.keys().contains(&3));
        let mut keys: Vec<i64> = accepted.flat_map(|r| r.keys()).collect();
        keys.sort_unstable();
        keys.dedup();
        keys
    };
    assert!(eventually(Duration::from_secs(10), || delivered() == [1, 2, 4, 5, 6]), "{:?}", recorder.received());
    assert!(eventually(Duration::from_secs(10), || scalar_i64(&mut c, "SELECT count(*)::bigint FROM public.applied") == 8));
    assert!(eventually(Duration::from_secs(10), || {
        scalar_i64(&mut c, "SELECT count(*)::bigint FROM outbox_dead_letters WHERE subscription OPERATOR(pg_catalog.=) 'hostile_http'") == 1
    }));
    // retention drops what both subscriptions have processed, the dead letter aside
    assert!(eventually(Duration::from_secs(15), || scalar_i64(&mut c, "SELECT count(*)::bigint FROM outbox_events") <= 1));
    let calls: Vec<String> = c.query("SELECT what FROM public.attack_log", &[]).unwrap().iter().map(|r| r.get(0)).collect();
    assert!(calls.is_empty(), "hostile objects were called: {calls:?}");
}

/// A function sink runs as its owner, and what it sets must not stay set in the worker: with
/// the database's search_path left behind, the worker's next queries, run as superuser, called
/// the owner's operators.
#[test]
fn settings_a_function_sink_makes_do_not_outlive_its_call() {
    let recorder = Recorder::start(|_| Reply::status(200));
    let cluster = own_cluster();
    let mut c = cluster.connect("postgres");
    plant_hostile_objects(&mut c);
    table(&mut c, "docs_meddle");
    c.batch_execute(
        "CREATE TABLE public.applied_meddle (event_id bigint);
         CREATE FUNCTION public.meddle(batch jsonb) RETURNS void LANGUAGE plpgsql AS $$
         BEGIN
             PERFORM pg_catalog.set_config('search_path', 'evil, public, pg_catalog', false);
             INSERT INTO public.applied_meddle SELECT (e->>'id')::bigint FROM pg_catalog.jsonb_array_elements(batch) e;
         END $$;
         SELECT outbox_subscribe('meddled', 'function', '{\"function\": \"public.meddle\"}');",
    )
    .unwrap();
    http_sink(&mut c, "beside_meddled", &recorder, "");
    for round in 0..3i32 {
        c.execute("INSERT INTO docs_meddle SELECT g, 'x' FROM pg_catalog.generate_series($1 * 10 + 1, $1 * 10 + 10) g", &[&round])
            .unwrap();
        assert!(eventually(Duration::from_secs(10), || settled(&mut c, "meddled") && settled(&mut c, "beside_meddled")));
    }
    assert_eq!(scalar_i64(&mut c, "SELECT count(*)::bigint FROM public.applied_meddle"), 30);
    let calls: Vec<String> = c.query("SELECT what FROM public.attack_log", &[]).unwrap().iter().map(|r| r.get(0)).collect();
    assert!(calls.is_empty(), "the worker called the sink owner's objects: {calls:?}");
}

/// The worker writes (claims, acks) and purges in READ COMMITTED whatever the database's
/// defaults say: in a database read-only by default (`ALTER DATABASE … SET
/// default_transaction_read_only = on`, whose writers turn it off), or REPEATABLE READ by
/// default (which `outbox_purge` refuses), it restarted every second and delivered nothing.
#[test]
fn the_worker_delivers_whatever_the_database_defaults_say() {
    let recorder = Recorder::start(|_| Reply::status(200));
    let cluster = own_cluster();
    let mut c = cluster.connect("postgres");
    table(&mut c, "docs_read_only");
    http_sink(&mut c, "search_read_only", &recorder, "");
    assert!(eventually(Duration::from_secs(5), || worker_pid(&mut c).is_some()));
    c.batch_execute(
        "ALTER DATABASE postgres SET default_transaction_read_only = on;
         ALTER DATABASE postgres SET default_transaction_isolation = 'repeatable read'",
    )
    .unwrap();
    // the next worker connects with it (this session does not: it connected before)
    let before = terminate_worker(&mut c);
    assert!(eventually(Duration::from_secs(10), || worker_pid(&mut c).is_some_and(|p| p != before)), "restarted");
    let worker = worker_pid(&mut c);
    c.batch_execute("INSERT INTO docs_read_only VALUES (1, 'x')").unwrap();
    assert!(eventually(Duration::from_secs(10), || settled(&mut c, "search_read_only")), "{:?}", backlog(&mut c, "search_read_only"));
    assert_eq!(recorder.delivered_keys(), [1]);
    assert_eq!(worker_pid(&mut c), worker, "the same worker delivered it");
}

/// Separate clusters: these stop and restart the server.
#[test]
fn waits_for_the_extension_instead_of_crash_looping() {
    let cluster = Cluster::start(&["shared_preload_libraries = 'outbox'", "outbox.database = 'postgres'", "outbox.poll_interval = '100ms'"]);
    let mut c = cluster.connect("postgres");
    assert!(eventually(Duration::from_secs(5), || worker_pid(&mut c).is_some()));
    let pid = worker_pid(&mut c).unwrap();
    std::thread::sleep(Duration::from_secs(2));
    assert_eq!(worker_pid(&mut c), Some(pid), "the same worker keeps waiting");
    // DROP DATABASE waits for every backend to absorb a barrier, the worker included
    c.batch_execute("CREATE DATABASE scratch").unwrap();
    c.batch_execute("SET statement_timeout = '10s'").unwrap();
    c.batch_execute("DROP DATABASE scratch").expect("DROP DATABASE within 10 s");
    c.batch_execute("RESET statement_timeout").unwrap();
    let recorder = Recorder::start(|_| Reply::status(200));
    c.batch_execute("CREATE EXTENSION outbox").unwrap();
    table(&mut c, "late");
    http_sink(&mut c, "late_sink", &recorder, "");
    c.batch_execute("INSERT INTO late VALUES (1, 'x')").unwrap();
    assert!(eventually(Duration::from_secs(10), || recorder.delivered_keys() == [1]));
    c.batch_execute("DROP EXTENSION outbox CASCADE").unwrap();
    std::thread::sleep(Duration::from_secs(1));
    assert_eq!(worker_pid(&mut c), Some(pid), "dropping the extension does not kill the worker");

    // a fast shutdown is prompt even while a sink hangs
    c.batch_execute("CREATE EXTENSION outbox").unwrap();
    let hanging = Recorder::start(|_| Reply { status: 200, headers: vec![], delay: Duration::from_secs(30) });
    table(&mut c, "hang");
    http_sink(&mut c, "hang_sink", &hanging, ", \"timeout\": \"60s\"");
    c.batch_execute("INSERT INTO hang VALUES (1, 'x')").unwrap();
    assert!(eventually(Duration::from_secs(5), || !hanging.received().is_empty()));
    let stopping = Instant::now();
    cluster.stop("fast");
    // (waiting for the sink would take 30 s)
    assert!(stopping.elapsed() < Duration::from_secs(15), "fast shutdown took {:?}", stopping.elapsed());
    assert!(!cluster.log().contains("terminated by signal"), "{}", cluster.log());
}

#[test]
fn every_committed_event_reaches_the_sink_after_an_immediate_stop() {
    let cluster = Arc::new(Cluster::start(&PRELOAD));
    let mut c = cluster.connect("postgres");
    c.batch_execute("CREATE EXTENSION outbox; SELECT outbox_unsubscribe('default')").unwrap();
    let recorder = Recorder::start(|_| Reply::status(200));
    table(&mut c, "crash_docs");
    http_sink(&mut c, "crash_sink", &recorder, "");
    let committed = Arc::new(std::sync::Mutex::new(Vec::new()));
    let writer = {
        let (cluster, committed) = (cluster.clone(), committed.clone());
        std::thread::spawn(move || {
            let mut c = cluster.connect("postgres");
            for id in 1i64.. {
                if c.execute("INSERT INTO crash_docs VALUES ($1, 'x')", &[&id]).is_err() {
                    break;
                }
                committed.lock().unwrap().push(id);
            }
        })
    };
    // 1.5 s and 200 commits at least, however slow the disk
    std::thread::sleep(Duration::from_millis(1500));
    assert!(eventually(Duration::from_secs(30), || committed.lock().unwrap().len() >= 200), "the writer made progress");
    cluster.stop("immediate");
    writer.join().unwrap();
    let before_restart = recorder.received().len();
    cluster.pg_ctl_start();
    let committed: Vec<i64> = committed.lock().unwrap().clone();
    let mut c = cluster.connect("postgres");
    let in_table: HashSet<i64> = c.query("SELECT id FROM crash_docs", &[]).unwrap().iter().map(|r| r.get(0)).collect();
    assert!(committed.iter().all(|id| in_table.contains(id)));
    assert!(eventually(Duration::from_secs(20), || {
        let delivered: HashSet<i64> = recorder.delivered_keys().into_iter().collect();
        in_table.iter().all(|id| delivered.contains(id))
    }));
    let mut counts: HashMap<i64, usize> = HashMap::new();
    for key in recorder.delivered_keys() {
        *counts.entry(key).or_default() += 1;
    }
    let duplicates = counts.values().filter(|n| **n > 1).count();
    println!(
        "{} committed events, {} requests before the crash, {duplicates} events delivered twice (in flight at the crash)",
        in_table.len(),
        before_restart
    );
    assert!(duplicates <= 100, "only a batch in flight can repeat: {duplicates}");
}

/// The worker purges when something falls due rather than on its next regular pass (every
/// second here): writing moves to a new segment once the current one is a quarter of the
/// retention old, and a segment is emptied once its newest event is older than the
/// retention. On regular passes alone, rotations came 2 s apart and emptying half a second
/// late, typically.
#[test]
fn the_worker_rotates_and_empties_segments_when_they_fall_due() {
    const RETENTION_S: f64 = 6.0;
    let cluster = own_cluster_with(&[PRELOAD[0], PRELOAD[1], "outbox.retention = '6s'"]);
    let mut c = cluster.connect("postgres");
    table(&mut c, "due_docs");
    let stop = Arc::new(AtomicBool::new(false));
    let writer = {
        let (stop, dsn) = (stop.clone(), cluster.dsn("postgres"));
        std::thread::spawn(move || {
            let mut w = Client::connect(&dsn, NoTls).unwrap();
            for id in 1.. {
                if stop.load(Ordering::Relaxed) {
                    break;
                }
                w.execute("INSERT INTO due_docs VALUES ($1, 'x')", &[&(id as i64)]).unwrap();
                std::thread::sleep(Duration::from_millis(100));
            }
        })
    };
    let epoch = |column: &str| format!("extract(epoch FROM {column})::float8");
    let (mut last_write, mut switches, mut lags) = (HashMap::<i16, f64>::new(), Vec::<f64>::new(), Vec::new());
    let started = Instant::now();
    while started.elapsed() < Duration::from_secs(25) {
        let switched: f64 = c.query_one(&format!("SELECT {} FROM outbox_rotation", epoch("switched_at")), &[]).unwrap().get(0);
        if switches.last() != Some(&switched) {
            switches.push(switched);
        }
        let written: HashMap<i16, f64> = c
            .query(&format!("SELECT slot, {} FROM outbox_log GROUP BY slot", epoch("max(created_at)")), &[])
            .unwrap()
            .iter()
            .map(|r| (r.get(0), r.get(1)))
            .collect();
        // read after the log: a segment this read found gone was emptied by now
        let now: f64 = c.query_one(&format!("SELECT {}", epoch("clock_timestamp()")), &[]).unwrap().get(0);
        for (slot, newest) in std::mem::replace(&mut last_write, written.clone()) {
            if !written.contains_key(&slot) {
                lags.push(now - (newest + RETENTION_S));
            }
        }
        std::thread::sleep(Duration::from_millis(50));
    }
    stop.store(true, Ordering::Relaxed);
    writer.join().unwrap();
    let periods: Vec<f64> = switches.windows(2).map(|w| w[1] - w[0]).collect();
    assert!(periods.len() >= 8 && lags.len() >= 6, "rotations {periods:?}, emptied segments {lags:?}");
    assert!(lags.iter().all(|&lag| lag >= 0.0), "a segment was emptied before its newest event passed the retention: {lags:?}");
    let (period, lag) = (median(periods.clone()), median(lags.clone()));
    println!("rotations every {period:.3} s and segments emptied {lag:.3} s after they fell due (medians): {periods:?} {lags:?}");
    assert!((1.5..1.75).contains(&period), "rotations every {period:.3} s (median), not a quarter of the retention: {periods:?}");
    assert!(lag < 0.25, "segments emptied {lag:.3} s (median) after they fell due: {lags:?}");
}

#[test]
fn the_worker_runs_retention_by_itself() {
    let cluster = own_cluster_with(&[PRELOAD[0], PRELOAD[1], "outbox.retention = '2s'"]);
    let mut c = cluster.connect("postgres");
    c.batch_execute("SELECT outbox_subscribe('pull')").unwrap();
    table(&mut c, "kept_docs");
    c.batch_execute("INSERT INTO kept_docs SELECT g, 'x' FROM generate_series(1, 100) g").unwrap();
    let processed = ids(&claim(&mut c, "SELECT * FROM outbox_claim(1000, 'pull')"));
    c.execute("SELECT outbox_ack($1, 'pull')", &[&processed]).unwrap();
    // retention starts a new log segment every quarter of the retention; a later event lands
    // in a later segment, which must stay while that event is unprocessed
    let slot = |c: &mut Client| scalar_i64(c, "SELECT current_slot::bigint FROM outbox_rotation");
    let first_slot = slot(&mut c);
    assert!(eventually(Duration::from_secs(15), || slot(&mut c) != first_slot), "the worker started a new segment");
    // (from a new session: one that wrote goes on writing to the segment it read for a second)
    cluster.connect("postgres").batch_execute("INSERT INTO kept_docs VALUES (101, 'not yet processed')").unwrap();
    let stored = |c: &mut Client| scalar_i64(c, "SELECT count(*) FROM outbox_events");
    assert!(
        eventually(Duration::from_secs(30), || stored(&mut c) == 1),
        "nobody called outbox_purge: the worker should have removed the processed events, {} left",
        stored(&mut c)
    );
    let kept = claim(&mut c, "SELECT * FROM outbox_claim(10, 'pull')");
    assert_eq!(kept.iter().map(|e| e.2).collect::<Vec<_>>(), [101], "the unprocessed event stays");
}
