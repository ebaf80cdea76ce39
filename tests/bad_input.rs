//! The bad-input catalog: every public function with NULLs, empty and huge arrays, unknown
//! names, wrong types, and identifiers that need quoting. Each gives a clear error (and
//! changes nothing) or a correct result; none crashes the server.
#![cfg(not(feature = "pg_test"))] // run by scripts/test.sh against the installed extension, not by cargo pgrx test

mod common;

use common::*;

fn setup(name: &str) -> Client {
    let cluster = shared();
    let db = cluster.database(name);
    let mut client = cluster.connect(&db);
    chunks(&mut client, "");
    client.batch_execute("INSERT INTO chunks SELECT g, 1, 'c', '{0.5}' FROM generate_series(1, 2) g").unwrap();
    client
}

/// Everything a refused call must leave as it was.
fn state(c: &mut Client) -> String {
    c.query_one(
        "SELECT concat_ws('|', (SELECT string_agg(name || sink || options::text || window_cursor, ',' ORDER BY name) FROM outbox_subscriptions),
                (SELECT count(*) FROM outbox_claims), (SELECT count(*) FROM outbox_retries),
                (SELECT string_agg(source::text || coalesce(payload_columns::text, '') || event_prefix, ',') FROM outbox_attachments),
                (SELECT count(*) FROM outbox_ledger), (SELECT count(*) FROM outbox_dead_letters),
                (SELECT count(*) FROM outbox_log), (SELECT count(*) FROM pg_trigger WHERE tgname LIKE 'outbox%'))",
        &[],
    )
    .unwrap()
    .get(0)
}

/// Each call fails with a message containing the expected text, and changes nothing.
fn all_refused(c: &mut Client, cases: &[(&str, &str)]) {
    let before = state(c);
    for (sql, expected) in cases {
        let message = error_of(c, sql);
        assert!(message.contains(expected), "{sql}: {message}");
        assert_eq!(state(c), before, "{sql} changed something");
    }
    assert_eq!(scalar_i64(c, "SELECT 1::bigint"), 1, "the server survived");
}

/// A subscription starts at the snapshot it is made with, and purges are held off from its
/// lock on; under REPEATABLE READ or SERIALIZABLE that snapshot is the transaction's, taken
/// before, and a purge in between emptied events committed after it, which were the new
/// subscription's. So `outbox_subscribe` refuses to run there, as `outbox_purge` does.
#[test]
fn subscribing_and_purging_need_read_committed() {
    let mut c = setup("bad_isolation");
    let before = state(&mut c);
    for level in ["REPEATABLE READ", "SERIALIZABLE"] {
        for (call, name) in [("SELECT outbox_subscribe('late')", "outbox_subscribe"), ("SELECT outbox_purge()", "outbox_purge")] {
            let message = error_of(&mut c, &format!("BEGIN ISOLATION LEVEL {level}; {call}"));
            assert!(message.contains(&format!("outbox: {name} must run in a READ COMMITTED transaction")), "{level}: {message}");
            c.batch_execute("ROLLBACK").unwrap();
            assert_eq!(state(&mut c), before, "{level}: {call} changed something");
        }
    }
    c.batch_execute("BEGIN ISOLATION LEVEL READ COMMITTED; SELECT outbox_subscribe('late'); COMMIT; SELECT outbox_purge()").unwrap();
    assert_eq!(scalar_i64(&mut c, "SELECT count(*) FROM outbox_subscriptions WHERE name = 'late'"), 1);
}

#[test]
fn nulls_are_named_in_the_error() {
    let mut c = setup("bad_nulls");
    all_refused(
        &mut c,
        &[
            ("SELECT outbox_attach(NULL)", "outbox: source must not be NULL"),
            ("SELECT outbox_detach(NULL)", "outbox: source must not be NULL"),
            ("SELECT outbox_subscribe(NULL)", "outbox: name must not be NULL"),
            ("SELECT outbox_subscribe('s', NULL)", "outbox: sink must not be NULL"),
            ("SELECT outbox_subscribe('s', 'pull', NULL)", "outbox: options must not be NULL"),
            ("SELECT outbox_subscribe('s', 'pull', '{}', NULL)", "outbox: from_start must not be NULL"),
            ("SELECT outbox_unsubscribe(NULL)", "outbox: name must not be NULL"),
            ("SELECT * FROM outbox_claim(NULL)", "outbox: batch_size must not be NULL"),
            ("SELECT * FROM outbox_claim(10, NULL)", "outbox: subscription must not be NULL"),
            ("SELECT * FROM outbox_claim(10, 'default', NULL)", "outbox: lease must not be NULL"),
            ("SELECT outbox_ack(NULL)", "outbox: ids must not be NULL"),
            ("SELECT outbox_ack(ARRAY[1], NULL)", "outbox: subscription must not be NULL"),
            ("SELECT outbox_fail(NULL)", "outbox: ids must not be NULL"),
            ("SELECT outbox_fail(ARRAY[1], 'x', NULL)", "outbox: subscription must not be NULL"),
            ("SELECT outbox_replay(NULL, since => now())", "outbox: subscription must not be NULL"),
            ("SELECT outbox_replay('default')", "outbox: outbox_replay needs since or ids"),
            ("SELECT outbox_replayable(NULL, since => now())", "outbox: subscription must not be NULL"),
            ("SELECT outbox_purge_dead_letters(NULL)", "outbox: older_than must not be NULL"),
        ],
    );
    // NULLs where NULL has a meaning
    assert_eq!(scalar_i64(&mut c, "SELECT outbox_ack(ARRAY[NULL]::bigint[])::bigint"), 0, "NULL elements are skipped");
    assert_eq!(scalar_i64(&mut c, "SELECT outbox_requeue_dead(NULL, NULL)"), 0, "every dead letter: none");
    assert_eq!(scalar_i64(&mut c, "SELECT count(*) FROM outbox_claim(10) WHERE payload IS NOT NULL"), 2);
}

#[test]
fn empty_and_huge_arrays_give_correct_results() {
    let mut c = setup("bad_arrays");
    for sql in [
        "SELECT outbox_ack(ARRAY[]::bigint[])",
        "SELECT outbox_fail(ARRAY[]::bigint[], 'x')",
        "SELECT outbox_replay('default', ids => ARRAY[]::bigint[])",
        "SELECT outbox_requeue_dead('default', ARRAY[]::bigint[])",
    ] {
        assert_eq!(c.query_one(&format!("SELECT ({sql})::bigint"), &[]).unwrap().get::<_, i64>(0), 0, "{sql}");
    }
    assert_eq!(scalar_i64(&mut c, "SELECT count(*) FROM outbox_replayable('default', ids => ARRAY[]::bigint[])"), 0);

    // 100,000 ids, two of them real: only the real ones count, and fast enough to be usable
    let claimed = ids(&claim(&mut c, "SELECT * FROM outbox_claim(10)"));
    let huge: Vec<i64> = (1..=100_000i64).map(|i| i * 7 + 1_000_000_000).chain(claimed.iter().copied()).collect();
    let started = std::time::Instant::now();
    assert_eq!(c.query_one("SELECT outbox_fail($1, 'x', retry_after => '0')", &[&huge]).unwrap().get::<_, i32>(0), 2);
    let again = ids(&claim(&mut c, "SELECT * FROM outbox_claim(10)"));
    let huge: Vec<i64> = (1..=100_000i64).map(|i| i * 7 + 1_000_000_000).chain(again.iter().copied()).collect();
    assert_eq!(c.query_one("SELECT outbox_ack($1)", &[&huge]).unwrap().get::<_, i32>(0), 2);
    assert_eq!(c.query_one("SELECT outbox_replay('default', ids => $1)", &[&huge]).unwrap().get::<_, i64>(0), 2);
    assert_eq!(c.query_one("SELECT count(*) FROM outbox_replayable('default', ids => $1)", &[&huge]).unwrap().get::<_, i64>(0), 0);
    assert_eq!(c.query_one("SELECT outbox_requeue_dead('default', $1)", &[&huge]).unwrap().get::<_, i64>(0), 0);
    assert!(started.elapsed() < std::time::Duration::from_secs(30), "{:?} for five calls with 100k ids", started.elapsed());
    let columns = (0..2000).map(|i| format!("c{i}")).collect::<Vec<_>>();
    let message = error_of(&mut c, &format!("SELECT outbox_attach('chunks', payload_columns => ARRAY['{}'])", columns.join("','")));
    assert!(message.contains("column \"c0\" named in payload_columns does not exist"), "{message}");
}

#[test]
fn unknown_names_and_wrong_values_are_refused() {
    let mut c = setup("bad_names");
    c.batch_execute("CREATE TABLE nokey (a int); CREATE VIEW chunk_view AS SELECT * FROM chunks").unwrap();
    all_refused(
        &mut c,
        &[
            ("SELECT outbox_attach('no_such_table')", "relation \"no_such_table\" does not exist"),
            ("SELECT outbox_attach('nokey')", "public.nokey has no primary key"),
            ("SELECT outbox_attach('chunk_view')", "chunk_view is not a table"),
            ("SELECT outbox_attach('chunks', payload_columns => ARRAY['content', 'x'])", "column \"x\" named in payload_columns does not exist"),
            ("SELECT outbox_attach('chunks', payload_columns => ARRAY[NULL]::text[])", "payload_columns"),
            ("SELECT outbox_attach('chunks', watch_columns => ARRAY['y'])", "column \"y\" named in watch_columns does not exist"),
            ("SELECT outbox_attach('chunks', key_columns => ARRAY['z'])", "column \"z\" named in key_columns does not exist"),
            ("SELECT outbox_attach('chunks', payload_columns => ARRAY[]::text[])", "payload_columns must not be empty"),
            ("SELECT outbox_attach('chunks', event_prefix => '')", "invalid event_prefix"),
            ("SELECT outbox_attach('chunks', event_prefix => 'has space')", "invalid event_prefix"),
            ("SELECT outbox_detach('nokey')", "public.nokey is not attached to the outbox"),
            ("SELECT outbox_subscribe('default')", "subscription \"default\" already exists"),
            ("SELECT outbox_subscribe('')", "invalid subscription name \"\": it must not be empty"),
            ("SELECT outbox_subscribe(repeat('x', 129))", "it must be at most 128 characters"),
            ("SELECT outbox_subscribe(E'a\\nb')", "it must not contain control characters"),
            ("SELECT outbox_subscribe('s', 'kafka')", "unknown sink \"kafka\""),
            ("SELECT outbox_subscribe('s', options => '[1]')", "options"),
            ("SELECT outbox_subscribe('s', options => '{\"max_attempts\": \"many\"}')", "max_attempts must be a positive integer"),
            ("SELECT outbox_subscribe('s', 'http', '{}')", "url"),
            ("SELECT outbox_subscribe('s', 'function', '{\"function\": \"public.no_such_fn\"}')", "function public.no_such_fn(jsonb) does not exist"),
            ("SELECT outbox_unsubscribe('nope')", "subscription \"nope\" does not exist"),
            ("SELECT * FROM outbox_claim(subscription => 'nope')", "subscription \"nope\" does not exist"),
            ("SELECT * FROM outbox_claim(0)", "batch_size must be between 1 and 10000, got 0"),
            ("SELECT * FROM outbox_claim(-1)", "batch_size must be between 1 and 10000, got -1"),
            ("SELECT * FROM outbox_claim(10001)", "batch_size must be between 1 and 10000, got 10001"),
            ("SELECT * FROM outbox_claim(lease => '0')", "lease must be a positive interval"),
            ("SELECT * FROM outbox_claim(lease => '-1 second')", "lease must be a positive interval"),
            ("SELECT outbox_ack(ARRAY[1], 'nope')", "subscription \"nope\" does not exist"),
            ("SELECT outbox_fail(ARRAY[1], subscription => 'nope')", "subscription \"nope\" does not exist"),
            ("SELECT outbox_fail(ARRAY[1], retry_after => '-1 second')", "retry_after must not be negative"),
            ("SELECT outbox_replay('nope', since => now())", "subscription \"nope\" does not exist"),
            ("SELECT outbox_requeue_dead('nope')", "subscription \"nope\" does not exist"),
            ("SELECT outbox_purge_dead_letters('-1 day')", "older_than must not be negative"),
            ("SELECT outbox_purge_dead_letters('1 day', 'nope')", "subscription \"nope\" does not exist"),
            // wrong types stop at Postgres' own input functions, before the extension runs
            ("SELECT * FROM outbox_claim('ten')", "invalid input syntax for type integer: \"ten\""),
            ("SELECT outbox_ack('{a,b}')", "invalid input syntax for type bigint: \"a\""),
            ("SELECT * FROM outbox_claim(lease => 'soon')", "invalid input syntax for type interval: \"soon\""),
            ("SELECT outbox_subscribe('s', options => 'not json')", "invalid input syntax for type json"),
        ],
    );
    // the attachment kept its settings through every refused change
    let payload: Option<Vec<String>> = c.query_one("SELECT payload_columns FROM outbox_attachments", &[]).unwrap().get(0);
    assert_eq!(payload, None);
}

#[test]
fn identifiers_that_need_quoting_work_everywhere() {
    let mut c = setup("bad_quoting");
    c.batch_execute(
        r#"CREATE SCHEMA "Vector Store";
           CREATE TABLE "Vector Store"."Doc ""Chunks""" ("Chunk Id" bigint, "Doc's Title" text, "select" text, PRIMARY KEY ("Chunk Id"));
           SELECT outbox_attach('"Vector Store"."Doc ""Chunks"""', payload_columns => ARRAY['Doc''s Title', 'select'],
                                watch_columns => ARRAY['Doc''s Title'], event_prefix => 'DOC');
           SELECT outbox_subscribe('search "eu" / west''s');
           INSERT INTO "Vector Store"."Doc ""Chunks""" VALUES (1, 'It''s "quoted"', 'x');
           UPDATE "Vector Store"."Doc ""Chunks""" SET "select" = 'y';"#,
    )
    .unwrap();
    let rows = c.query("SELECT type, payload FROM outbox_claim(10, 'search \"eu\" / west''s')", &[]).unwrap();
    assert_eq!(rows.len(), 1, "the update touched no watched column");
    assert_eq!(rows[0].get::<_, String>(0), "DOC_UPSERT");
    assert_eq!(
        rows[0].get::<_, serde_json::Value>(1),
        serde_json::json!({"table": "Vector Store.Doc \"Chunks\"", "key": {"Chunk Id": 1},
                           "data": {"Doc's Title": "It's \"quoted\"", "select": "x"}})
    );
    let metrics: String = c.query_one("SELECT outbox_metrics()", &[]).unwrap().get(0);
    assert!(metrics.contains("outbox_in_flight_events{subscription=\"search \\\"eu\\\" / west's\"} 1"), "{metrics}");
    c.batch_execute(r#"SELECT outbox_detach('"Vector Store"."Doc ""Chunks"""'); SELECT outbox_unsubscribe('search "eu" / west''s');"#).unwrap();
    assert_eq!(scalar_i64(&mut c, "SELECT count(*) FROM outbox_attachments WHERE source::text LIKE '%Vector%'"), 0);
}

/// The extension installed into a schema whose name needs quoting, used from a session whose
/// search_path does not include it: everything Rust builds names that schema, quoted.
/// (Postgres refuses quotes in the schema of an extension that uses @extschema@.)
#[test]
fn an_extension_schema_that_needs_quoting_works() {
    let cluster = shared();
    let db = cluster.database("quoted_extension_schema");
    let mut c = cluster.connect(&db);
    c.batch_execute(
        r#"DROP EXTENSION outbox;
           CREATE SCHEMA "Out Box";
           CREATE EXTENSION outbox SCHEMA "Out Box";
           SET search_path = public;
           CREATE TABLE chunks (id bigint PRIMARY KEY, content text);
           SELECT "Out Box".outbox_attach('chunks', payload_columns => ARRAY['content']);
           INSERT INTO chunks SELECT g, 'c' || g FROM generate_series(1, 3) g;
           DELETE FROM chunks WHERE id = 3;"#,
    )
    .unwrap();
    let rows = c.query(r#"SELECT id, type, payload FROM "Out Box".outbox_claim(10)"#, &[]).unwrap();
    let got: Vec<(String, serde_json::Value)> = rows.iter().map(|r| (r.get(1), r.get(2))).collect();
    let upsert = |id: i64| ("EMBED_UPSERT".to_string(), serde_json::json!({"table": "public.chunks", "key": {"id": id}, "data": {"content": format!("c{id}")}}));
    assert_eq!(got[..2], [upsert(1), upsert(2)]);
    // the DELETE of row 3 waits behind its UPSERT, in flight in this claim
    assert_eq!(got[2], upsert(3));
    let ids: Vec<i64> = rows.iter().map(|r| r.get(0)).collect();
    let acked: i32 = c.query_one(r#"SELECT "Out Box".outbox_ack($1)"#, &[&ids]).unwrap().get(0);
    assert_eq!(acked, 3);
    let next = c.query(r#"SELECT type FROM "Out Box".outbox_claim(10)"#, &[]).unwrap();
    assert_eq!(next.iter().map(|r| r.get::<_, String>(0)).collect::<Vec<_>>(), ["EMBED_DELETE"]);
    let pending = scalar_i64(&mut c, r#"SELECT in_flight FROM "Out Box".outbox_backlog WHERE subscription = 'default'"#);
    assert_eq!(pending, 1);
}

/// A log row whose arrays do not match its events (only a capture bug could write one) stops
/// the claims that reach it with an error naming the row, hands out nothing, and once the row
/// is mended its events come out as captured.
#[test]
fn a_malformed_log_row_is_named_and_loses_nothing() {
    let mut c = setup("malformed_log_row");
    let keys: String = c.query_one("SELECT keys FROM outbox_log WHERE base = 1", &[]).unwrap().get(0);
    c.batch_execute("UPDATE outbox_log SET keys = '[' WHERE base = 1").unwrap();
    let before = state(&mut c);
    let error = error_of(&mut c, "SELECT * FROM outbox_claim(10)");
    assert!(error.contains("log row 1 has a malformed keys array"), "{error}");
    assert_eq!(state(&mut c), before, "the failed claim changed nothing");
    c.execute("UPDATE outbox_log SET keys = $1 WHERE base = 1", &[&keys]).unwrap();
    c.batch_execute("UPDATE outbox_log SET key_hashes = key_hashes || NULL::bigint WHERE base = 1").unwrap();
    let error = error_of(&mut c, "SELECT * FROM outbox_claim(10)");
    assert!(error.contains("log row 1 has a malformed key_hashes array"), "{error}");
    assert_eq!(state(&mut c), before);
    c.batch_execute("UPDATE outbox_log SET key_hashes = key_hashes[1:2] WHERE base = 1").unwrap();
    let claimed = claim(&mut c, "SELECT * FROM outbox_claim(10)");
    assert_eq!(claimed.iter().map(|e| e.2).collect::<Vec<_>>(), [1, 2]);
}

/// Capture and retention read outbox_rotation's one row, the segment new events go to: a row
/// deleted by hand failed every write to an attached table. Deleting it, truncating the table
/// and naming a segment past the eight are refused, and capture goes on.
#[test]
fn the_rotation_row_stays_and_names_a_segment() {
    let mut c = setup("rotation_row");
    let before: String = c.query_one("SELECT current_slot || ' ' || switched_at FROM outbox_rotation", &[]).unwrap().get(0);
    for (sql, expected) in [
        ("DELETE FROM outbox_rotation", "outbox_rotation keeps its one row"),
        ("TRUNCATE outbox_rotation", "outbox_rotation keeps its one row"),
        ("UPDATE outbox_rotation SET current_slot = 8", "outbox_rotation_current_slot_check"),
        ("UPDATE outbox_rotation SET current_slot = -1", "outbox_rotation_current_slot_check"),
    ] {
        let message = error_of(&mut c, sql);
        assert!(message.contains(expected), "{sql}: {message}");
    }
    let after: String = c.query_one("SELECT current_slot || ' ' || switched_at FROM outbox_rotation", &[]).unwrap().get(0);
    assert_eq!(after, before);
    c.batch_execute("INSERT INTO chunks VALUES (3, 1, 'c', '{0.5}')").unwrap();
    assert_eq!(claim(&mut c, "SELECT * FROM outbox_claim(10)").iter().map(|e| e.2).collect::<Vec<_>>(), [1, 2, 3]);
    assert_eq!(scalar_i64(&mut c, "SELECT outbox_purge()"), 0, "retention runs");
}

/// Capture reads each log segment's columns once per backend. A change to them committed by
/// another session (as an update script makes one) is seen by the next capture of a backend
/// that read them before, even inside a transaction that already holds the source table's
/// locks: capture refuses to write a row the segment no longer fits, and writes again once the
/// segment is back to columns it knows (a dropped column among them).
#[test]
fn a_change_to_the_log_by_another_session_is_seen_by_capture() {
    let cluster = shared();
    let db = cluster.database("log_changed_elsewhere");
    let mut c = cluster.connect(&db);
    chunks(&mut c, "");
    // A prepared statement is not parsed again, and this transaction already holds every lock
    // its plan and executor take (the table and its index): only capture itself can notice
    // the change, when it locks the log segment.
    let insert = c.prepare("INSERT INTO chunks VALUES ($1, 1, 'c', '{0.5}')").unwrap();
    c.execute(&insert, &[&1i64]).unwrap();
    let mut other = cluster.connect(&db);
    c.batch_execute("BEGIN; UPDATE chunks SET content = content WHERE false").unwrap();
    other.batch_execute("ALTER TABLE outbox_log ADD COLUMN extra int").unwrap();
    let error = c.execute(&insert, &[&2i64]).expect_err("capture wrote a row the segment no longer fits");
    let message = error.as_db_error().map(|e| e.message().to_string()).unwrap_or_default();
    assert!(message.contains("unexpected column extra"), "{error}");
    c.batch_execute("ROLLBACK").unwrap();
    other.batch_execute("ALTER TABLE outbox_log DROP COLUMN extra").unwrap();
    c.execute(&insert, &[&3i64]).unwrap();
    let keys: Vec<i64> = c
        .query("SELECT (payload->'key'->>'id')::bigint FROM outbox_events ORDER BY id", &[])
        .unwrap()
        .iter()
        .map(|r| r.get(0))
        .collect();
    assert_eq!(keys, [1, 3]);
}

/// An index on the log that the writer cannot fill (an expression index) stops capture with an
/// error after the log row's heap insert; the statement's rollback leaves neither the source
/// row nor the log row.
#[test]
fn an_index_the_log_writer_cannot_fill_leaves_nothing() {
    let mut c = setup("log_expression_index");
    let before = state(&mut c);
    c.batch_execute("CREATE INDEX outbox_log_odd ON outbox_log ((base + 1))").unwrap();
    let error = error_of(&mut c, "INSERT INTO chunks VALUES (3, 1, 'c', '{0.5}')");
    assert!(error.contains("expression indexes are not supported"), "{error}");
    c.batch_execute("DROP INDEX outbox_log_odd").unwrap();
    assert_eq!(state(&mut c), before);
    assert_eq!(scalar_i64(&mut c, "SELECT count(*) FROM chunks"), 2);
}

#[test]
fn a_malformed_claim_is_named_and_loses_nothing() {
    let mut c = setup("malformed_claim");
    let first = claim(&mut c, "SELECT * FROM outbox_claim(1)");
    let claim_id = scalar_i64(&mut c, "SELECT claim_id FROM outbox_claims");
    // the open claim's row hashes gain a NULL: the next claim cannot tell which rows it holds
    c.batch_execute("UPDATE outbox_ledger SET key_hashes = key_hashes || NULL::bigint WHERE kind = 'c'").unwrap();
    let before = state(&mut c);
    let error = error_of(&mut c, "SELECT * FROM outbox_claim(10)");
    assert!(error.contains(&format!("the ledger row of claim {claim_id} has a malformed key_hashes array")), "{error}");
    assert_eq!(state(&mut c), before, "the failed claim changed nothing");
    c.batch_execute("UPDATE outbox_ledger SET key_hashes = key_hashes[1:1] WHERE kind = 'c'").unwrap();
    // a table hash short of the row hashes
    c.batch_execute("UPDATE outbox_ledger SET table_hashes = '{}' WHERE kind = 'c'").unwrap();
    let error = error_of(&mut c, "SELECT * FROM outbox_claim(10)");
    assert!(error.contains(&format!("the ledger row of claim {claim_id} has a malformed table_hashes array")), "{error}");
    assert_eq!(state(&mut c), before);
    c.batch_execute("UPDATE outbox_ledger SET table_hashes = ARRAY[table_hash] FROM outbox_log WHERE kind = 'c' AND base = 1")
        .unwrap();
    let second = claim(&mut c, "SELECT * FROM outbox_claim(10)");
    assert_eq!(first.iter().chain(&second).map(|e| e.2).collect::<Vec<_>>(), [1, 2]);
    let all: Vec<i64> = first.iter().chain(&second).map(|e| e.0).collect();
    assert_eq!(c.query_one("SELECT outbox_ack($1)", &[&all]).unwrap().get::<_, i32>(0), 2);
}

/// Payloads are UTF-8 JSON: a database in another encoding is refused by name at attach.
#[test]
fn attaching_in_a_database_not_in_utf8_is_refused() {
    let cluster = shared();
    let mut admin = cluster.connect("postgres");
    admin
        .batch_execute("CREATE DATABASE latin1 ENCODING 'LATIN1' LC_COLLATE 'C' LC_CTYPE 'C' TEMPLATE template0")
        .unwrap();
    let mut c = cluster.connect("latin1");
    c.batch_execute("CREATE EXTENSION outbox; CREATE TABLE t (id int PRIMARY KEY, doc text)").unwrap();
    let error = error_of(&mut c, "SELECT outbox_attach('t')");
    assert!(error.contains("capture needs a database in UTF8 encoding; this one is in LATIN1"), "{error}");
    assert_eq!(scalar_i64(&mut c, "SELECT count(*) FROM outbox_attachments"), 0);
}
