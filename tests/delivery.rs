//! Claim, ack, fail, dead letters, replay and retention, from outside over real connections.
#![cfg(not(feature = "pg_test"))] // run by scripts/test.sh against the installed extension, not by cargo pgrx test

mod common;

use std::collections::{HashMap, HashSet};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use common::*;

fn setup(name: &str, attach_args: &str) -> (String, Client) {
    let cluster = shared();
    let db = cluster.database(name);
    let mut client = cluster.connect(&db);
    chunks(&mut client, attach_args);
    (db, client)
}

fn insert(client: &mut Client, ids: std::ops::RangeInclusive<i64>) {
    for id in ids {
        client.execute("INSERT INTO chunks VALUES ($1, 1, 'c', '{0.5}')", &[&id]).unwrap();
    }
}

#[test]
fn claim_hands_out_oldest_first_with_all_columns() {
    let (_, mut c) = setup("claim_columns", ", payload_columns => ARRAY['content']");
    insert(&mut c, 1..=3);
    let rows = c.query("SELECT * FROM outbox_claim(batch_size => 10)", &[]).unwrap();
    assert_eq!(rows.len(), 3);
    let columns: Vec<&str> = rows[0].columns().iter().map(|c| c.name()).collect();
    assert_eq!(columns, ["id", "type", "payload", "created_at", "attempts"]);
    let ids: Vec<i64> = rows.iter().map(|r| r.get("id")).collect();
    assert!(ids.windows(2).all(|w| w[0] < w[1]), "{ids:?}");
    let payload: serde_json::Value = rows[0].get("payload");
    assert_eq!(payload, serde_json::json!({"table": "public.chunks", "key": {"id": 1}, "data": {"content": "c"}}));
    assert_eq!(rows[0].get::<_, String>("type"), "EMBED_UPSERT");
    assert_eq!(rows[0].get::<_, i32>("attempts"), 1);
    assert!(c.query("SELECT * FROM outbox_claim(10)", &[]).unwrap().is_empty(), "claimed events are leased");
}

/// A claim renders payloads from the log rows it reads (src/consume.rs); the `outbox_events`
/// view renders them in SQL. Every kind of event, claimed in batches that cut through log rows,
/// and again after failing (the retry path), comes out as the view shows it.
#[test]
fn claimed_events_are_the_events_the_view_shows() {
    let cluster = shared();
    let db = cluster.database("claim_rendering");
    let mut c = cluster.connect(&db);
    c.batch_execute(
        r#"CREATE SCHEMA "Mixed Schema";
           CREATE TABLE "Mixed Schema"."Chunks ""v2""" (tenant text, id bigint, content text, note text,
                                                       PRIMARY KEY (tenant, id));
           SELECT outbox_attach('"Mixed Schema"."Chunks ""v2"""', payload_columns => ARRAY['content', 'note']);
           INSERT INTO "Mixed Schema"."Chunks ""v2""" SELECT 't,1', g, 'bulk ' || g, NULL FROM generate_series(1, 700) g;
           INSERT INTO "Mixed Schema"."Chunks ""v2""" SELECT 't]2', g, E'q"uo\te\\ \n é [,]', 'n' FROM generate_series(1, 300) g;
           INSERT INTO "Mixed Schema"."Chunks ""v2""" VALUES ('t3', 1, NULL, NULL);
           UPDATE "Mixed Schema"."Chunks ""v2""" SET content = 'changed' WHERE tenant = 't,1' AND id <= 5;
           UPDATE "Mixed Schema"."Chunks ""v2""" SET id = id + 1000 WHERE tenant = 't]2' AND id <= 3;
           DELETE FROM "Mixed Schema"."Chunks ""v2""" WHERE tenant = 't3';
           TRUNCATE "Mixed Schema"."Chunks ""v2""";
           -- log rows of two tables and types, alternating
           CREATE TABLE "Mixed Schema".other (id bigint PRIMARY KEY);
           SELECT outbox_attach('"Mixed Schema".other', event_prefix => 'OTHER');
           DO $$ BEGIN FOR i IN 1..20 LOOP
               INSERT INTO "Mixed Schema".other VALUES (i);
               INSERT INTO "Mixed Schema"."Chunks ""v2""" VALUES ('t4', i, 'c', NULL);
           END LOOP; END $$;"#,
    )
    .unwrap();
    let expected: HashMap<i64, (String, serde_json::Value, String)> = c
        .query("SELECT id, type, payload, created_at::text FROM outbox_events", &[])
        .unwrap()
        .iter()
        .map(|r| (r.get(0), (r.get(1), r.get(2), r.get(3))))
        .collect();
    assert_eq!(expected.len(), 700 + 300 + 1 + 5 + 6 + 1 + 1 + 40);
    // batches of 333 cut through log rows; the first time it is handed out every seventh event
    // fails and comes back through the retry table, the rest are acked
    let mut seen: HashMap<i64, usize> = HashMap::new();
    let mut failed = 0;
    loop {
        let rows = c.query("SELECT id, type, payload, created_at::text FROM outbox_claim(333)", &[]).unwrap();
        if rows.is_empty() {
            break;
        }
        let (mut ack, mut fail) = (Vec::new(), Vec::new());
        for r in &rows {
            let id: i64 = r.get(0);
            assert_eq!((r.get(1), r.get(2), r.get(3)), expected[&id], "event {id}");
            let times = seen.entry(id).or_default();
            *times += 1;
            if *times == 1 && id % 7 == 0 {
                fail.push(id);
            } else {
                ack.push(id);
            }
        }
        let ids: Vec<i64> = rows.iter().map(|r| r.get(0)).collect();
        assert!(ids.windows(2).all(|w| w[0] < w[1]), "oldest first");
        c.execute("SELECT outbox_fail($1, 'again', retry_after => '0 seconds')", &[&fail]).unwrap();
        let acked: i32 = c.query_one("SELECT outbox_ack($1)", &[&ack]).unwrap().get(0);
        assert_eq!(acked as usize, ack.len(), "window and retried events ack alike");
        failed += fail.len();
    }
    assert_eq!(seen.len(), expected.len(), "every event");
    assert!(failed > 100, "{failed}");
    for (id, times) in seen {
        assert_eq!(times, if id % 7 == 0 { 2 } else { 1 }, "event {id}");
    }
}

#[test]
fn lease_expiry_hands_events_out_again_and_counts_attempts() {
    let (_, mut c) = setup("lease_expiry", "");
    insert(&mut c, 1..=2);
    // leases long enough that the claim right after one still finds it running
    let first = claim(&mut c, "SELECT * FROM outbox_claim(10, lease => '1.5 seconds')");
    assert_eq!(first.len(), 2);
    assert!(claim(&mut c, "SELECT * FROM outbox_claim(10)").is_empty());
    std::thread::sleep(Duration::from_millis(1600));
    let again = claim(&mut c, "SELECT * FROM outbox_claim(10, lease => '1.5 seconds')");
    assert_eq!(ids(&again), ids(&first));
    assert!(again.iter().all(|e| e.3 == 2), "{again:?}");
    std::thread::sleep(Duration::from_millis(1600));
    let third = claim(&mut c, "SELECT * FROM outbox_claim(10)");
    assert!(third.iter().all(|e| e.3 == 3), "{third:?}");
    // a late ack of an expired hand-out still counts
    assert_eq!(c.query_one("SELECT outbox_ack($1)", &[&ids(&first)]).unwrap().get::<_, i32>(0), 2);
}

#[test]
fn only_the_expired_claim_of_two_open_ones_is_handed_out_again() {
    let (_, mut c) = setup("one_lease_expired", "");
    insert(&mut c, 1..=3);
    let short = claim(&mut c, "SELECT * FROM outbox_claim(1, lease => '1 second')");
    let long = claim(&mut c, "SELECT * FROM outbox_claim(1)");
    std::thread::sleep(Duration::from_millis(1100));
    let next = claim(&mut c, "SELECT * FROM outbox_claim(10)");
    let keys_and_attempts: Vec<(i64, i32)> = next.iter().map(|e| (e.2, e.3)).collect();
    assert_eq!(keys_and_attempts, [(1, 2), (3, 1)], "row 1 again, row 2 still in flight, then row 3");
    let all: Vec<i64> = ids(&long).into_iter().chain(ids(&next)).collect();
    assert_eq!(c.query_one("SELECT outbox_ack($1)", &[&all]).unwrap().get::<_, i32>(0), 3);
    assert_eq!(ids(&short), ids(&next)[..1]);
}

#[test]
fn ack_counts_only_newly_processed_events_and_records_the_time() {
    let (_, mut c) = setup("ack_counts", "");
    insert(&mut c, 1..=3);
    let claimed = ids(&claim(&mut c, "SELECT * FROM outbox_claim(10, lease => '200 milliseconds')"));
    let ack = |c: &mut Client, ids: &[i64]| c.query_one("SELECT outbox_ack($1)", &[&ids]).unwrap().get::<_, i32>(0);
    assert_eq!(ack(&mut c, &claimed[..2]), 2);
    assert_eq!(ack(&mut c, &claimed[..2]), 0, "acking twice");
    assert_eq!(ack(&mut c, &[999_999]), 0, "unknown id");
    assert_eq!(ack(&mut c, &claimed), 1, "only the third is new");
    let processed = scalar_i64(&mut c, "SELECT count(*) FROM outbox_processed WHERE processed_at IS NOT NULL AND subscription = 'default'");
    assert_eq!(processed, 3);
    std::thread::sleep(Duration::from_millis(300));
    assert!(claim(&mut c, "SELECT * FROM outbox_claim(10)").is_empty(), "processed events are never claimed again");
}

#[test]
fn fail_retries_after_retry_after_or_backoff() {
    let (_, mut c) = setup("fail_backoff", "");
    c.batch_execute("SELECT outbox_subscribe('quick', options => '{\"backoff_base\": \"400ms\", \"backoff_max\": \"10s\"}', from_start => true)").unwrap();
    insert(&mut c, 1..=1);

    let id = ids(&claim(&mut c, "SELECT * FROM outbox_claim(10)"))[0];
    let failed: i32 = c.query_one("SELECT outbox_fail($1, 'sink said no', retry_after => '1.5 seconds')", &[&vec![id]]).unwrap().get(0);
    assert_eq!(failed, 1);
    let error: String = c.query_one("SELECT last_error FROM outbox_retries WHERE event_id = $1", &[&id]).unwrap().get(0);
    assert_eq!(error, "sink said no");
    assert!(claim(&mut c, "SELECT * FROM outbox_claim(10)").is_empty());
    std::thread::sleep(Duration::from_millis(1600));
    let again = claim(&mut c, "SELECT * FROM outbox_claim(10)");
    assert_eq!((again[0].0, again[0].3), (id, 2));

    // backoff from the subscription's options: 400 ms ± 10 % after the first failure, where
    // the setting's would be 5 s
    c.batch_execute("SET outbox.backoff_base = '5s'").unwrap();
    let id = ids(&claim(&mut c, "SELECT * FROM outbox_claim(10, 'quick')"))[0];
    let started = Instant::now();
    c.query_one("SELECT outbox_fail($1, 'x', 'quick')", &[&vec![id]]).unwrap();
    let mut seen = None;
    while started.elapsed() < Duration::from_secs(3) {
        if !claim(&mut c, "SELECT * FROM outbox_claim(10, 'quick')").is_empty() {
            seen = Some(started.elapsed());
            break;
        }
        std::thread::sleep(Duration::from_millis(20));
    }
    let waited = seen.expect("claimable again after the backoff");
    assert!(waited >= Duration::from_millis(360) && waited < Duration::from_millis(2500), "{waited:?}");
}

#[test]
fn events_move_to_the_dead_letters_after_max_attempts() {
    let (_, mut c) = setup("dead_letters", ", payload_columns => ARRAY['content']");
    c.batch_execute("SELECT outbox_subscribe('strict', options => '{\"max_attempts\": 2}')").unwrap();
    insert(&mut c, 1..=1);
    for attempt in 1..=2 {
        let claimed = claim(&mut c, "SELECT * FROM outbox_claim(10, 'strict')");
        assert_eq!(claimed.len(), 1);
        assert_eq!(claimed[0].3, attempt);
        c.execute("SELECT outbox_fail($1, $2, 'strict', retry_after => '0')", &[&ids(&claimed), &format!("failure {attempt}")]).unwrap();
    }
    let dead = c.query_one("SELECT * FROM outbox_dead_letters", &[]).unwrap();
    assert_eq!(dead.get::<_, String>("subscription"), "strict");
    assert_eq!(dead.get::<_, String>("type"), "EMBED_UPSERT");
    assert_eq!(dead.get::<_, serde_json::Value>("payload")["data"]["content"], "c");
    assert_eq!(dead.get::<_, i32>("attempts"), 2);
    assert_eq!(dead.get::<_, String>("last_error"), "failure 2");
    assert!(c.query("SELECT failed_at FROM outbox_dead_letters WHERE failed_at <= now()", &[]).unwrap().len() == 1);
    assert!(claim(&mut c, "SELECT * FROM outbox_claim(10, 'strict')").is_empty(), "dead events are not claimed");
    assert_eq!(scalar_i64(&mut c, "SELECT dead FROM outbox_backlog WHERE subscription = 'strict'"), 1);
    assert_eq!(scalar_i64(&mut c, "SELECT dead FROM outbox_backlog WHERE subscription = 'default'"), 0);
    assert_eq!(ids(&claim(&mut c, "SELECT * FROM outbox_claim(10)")).len(), 1, "the default subscription is unaffected");

    // requeue resets attempts
    assert_eq!(scalar_i64(&mut c, "SELECT outbox_requeue_dead('strict')"), 1);
    let back = claim(&mut c, "SELECT * FROM outbox_claim(10, 'strict')");
    assert_eq!(back.len(), 1);
    assert_eq!(back[0].3, 1);
    assert_eq!(scalar_i64(&mut c, "SELECT count(*) FROM outbox_dead_letters"), 0);
}

#[test]
fn poison_event_holds_back_only_later_events_of_its_row() {
    let (_, mut c) = setup("poison", "");
    c.batch_execute("SELECT outbox_subscribe('s', options => '{\"max_attempts\": 3}')").unwrap();
    insert(&mut c, 1..=3);
    c.batch_execute("UPDATE chunks SET content = 'again' WHERE id = 1").unwrap(); // a later event of row 1
    insert(&mut c, 4..=4);

    let first = claim(&mut c, "SELECT * FROM outbox_claim(10, 's')");
    assert_eq!(first.iter().map(|e| e.2).collect::<Vec<_>>(), [1, 2, 3, 4], "row 1's second event waits");
    let poison = first[0].0;
    c.execute("SELECT outbox_ack($1, 's')", &[&first[1..].iter().map(|e| e.0).collect::<Vec<_>>()]).unwrap();

    for attempt in 1..=2 {
        c.execute("SELECT outbox_fail($1, 'poison', 's', retry_after => '0')", &[&vec![poison]]).unwrap();
        insert(&mut c, 100 + attempt..=100 + attempt);
        let next = claim(&mut c, "SELECT * FROM outbox_claim(10, 's')");
        assert!(next.iter().any(|e| e.2 == 100 + attempt), "events behind the poison flow: {next:?}");
        assert!(!next.iter().any(|e| e.2 == 1 && e.0 != poison), "row 1's next event waits: {next:?}");
        assert!(next.iter().any(|e| e.0 == poison && e.3 == attempt as i32 + 1), "{next:?}");
        let others: Vec<i64> = next.iter().filter(|e| e.0 != poison).map(|e| e.0).collect();
        c.execute("SELECT outbox_ack($1, 's')", &[&others]).unwrap();
    }
    // the third failure uses up the budget
    c.execute("SELECT outbox_fail($1, 'poison', 's', retry_after => '0')", &[&vec![poison]]).unwrap();
    assert_eq!(scalar_i64(&mut c, "SELECT count(*) FROM outbox_dead_letters WHERE subscription = 's'"), 1);
    let after = claim(&mut c, "SELECT * FROM outbox_claim(10, 's')");
    assert_eq!(after.iter().map(|e| e.2).collect::<Vec<_>>(), [1], "with the poison dead, row 1 moves on");
    assert_ne!(after[0].0, poison);
}

/// A TRUNCATE waits for the events of its table that are waiting for a retry, and the rows
/// written after a TRUNCATE wait for it while it waits for its own retry.
#[test]
fn a_truncate_and_its_table_wait_for_each_other_across_retries() {
    let (_, mut c) = setup("truncate_order", "");
    c.batch_execute("CREATE TABLE other (id bigint PRIMARY KEY); SELECT outbox_attach('other')").unwrap();
    let order = |c: &mut Client| -> Vec<(String, i64)> {
        let mut seen = Vec::new();
        for _ in 0..50 {
            let batch = claim(c, "SELECT * FROM outbox_claim(10)");
            seen.extend(batch.iter().map(|e| (e.1.clone(), e.2)));
            c.execute("SELECT outbox_ack($1)", &[&ids(&batch)]).unwrap();
            if batch.is_empty() && scalar_i64(c, "SELECT pending + retrying FROM outbox_backlog WHERE subscription = 'default'") == 0 {
                return seen;
            }
            std::thread::sleep(Duration::from_millis(100));
        }
        panic!("the backlog did not drain: {seen:?}");
    };

    insert(&mut c, 1..=1);
    let row = claim(&mut c, "SELECT * FROM outbox_claim(10)");
    c.execute("SELECT outbox_fail($1, retry_after => '1 second')", &[&ids(&row)]).unwrap();
    // row 2 moves the window on: the claim below reads no log row of row 1's
    insert(&mut c, 2..=2);
    let row = claim(&mut c, "SELECT * FROM outbox_claim(10)");
    assert_eq!(row.iter().map(|e| e.2).collect::<Vec<_>>(), [2]);
    c.execute("SELECT outbox_ack($1)", &[&ids(&row)]).unwrap();
    c.batch_execute("TRUNCATE chunks").unwrap();
    insert(&mut c, 3..=3);
    assert!(claim(&mut c, "SELECT * FROM outbox_claim(10)").is_empty(), "the TRUNCATE waits for row 1's retry, row 3 for the TRUNCATE");
    assert_eq!(
        order(&mut c),
        [("EMBED_UPSERT".into(), 1), ("EMBED_TRUNCATE".into(), -1), ("EMBED_UPSERT".into(), 3)],
    );

    c.batch_execute("TRUNCATE chunks").unwrap();
    let truncate = claim(&mut c, "SELECT * FROM outbox_claim(10)");
    assert_eq!(truncate.iter().map(|e| e.1.as_str()).collect::<Vec<_>>(), ["EMBED_TRUNCATE"]);
    c.execute("SELECT outbox_fail($1, retry_after => '1 second')", &[&ids(&truncate)]).unwrap();
    // an event of another table moves the window on, past the TRUNCATE's log row
    c.batch_execute("INSERT INTO other VALUES (1)").unwrap();
    let other = claim(&mut c, "SELECT * FROM outbox_claim(10)");
    assert_eq!(other.iter().map(|e| e.2).collect::<Vec<_>>(), [1]);
    c.execute("SELECT outbox_ack($1)", &[&ids(&other)]).unwrap();
    insert(&mut c, 4..=4);
    assert!(claim(&mut c, "SELECT * FROM outbox_claim(10)").is_empty(), "row 4 waits for the retried TRUNCATE");
    assert_eq!(order(&mut c), [("EMBED_TRUNCATE".into(), -1), ("EMBED_UPSERT".into(), 4)]);
}

#[test]
fn one_row_is_never_in_flight_twice_and_comes_out_in_commit_order() {
    let (_, mut c) = setup("per_key", ", payload_columns => ARRAY['content']");
    insert(&mut c, 1..=1);
    for round in 1..=4 {
        c.execute("UPDATE chunks SET content = $1 WHERE id = 1", &[&format!("v{round}")]).unwrap();
    }
    insert(&mut c, 2..=3);
    let cluster = shared();
    let mut other = cluster.connect("per_key");
    let mut seen = Vec::new();
    loop {
        let a = c.query("SELECT id, payload FROM outbox_claim(10)", &[]).unwrap();
        let b = other.query("SELECT id, payload FROM outbox_claim(10)", &[]).unwrap();
        let row1: Vec<(i64, String)> = a
            .iter()
            .chain(b.iter())
            .filter(|r| r.get::<_, serde_json::Value>("payload")["key"]["id"] == 1)
            .map(|r| (r.get("id"), r.get::<_, serde_json::Value>("payload")["data"]["content"].as_str().unwrap().to_string()))
            .collect();
        assert!(row1.len() <= 1, "two events of row 1 in flight: {row1:?}");
        seen.extend(row1.into_iter().map(|(_, content)| content));
        let all: Vec<i64> = a.iter().chain(b.iter()).map(|r| r.get("id")).collect();
        if all.is_empty() {
            break;
        }
        c.execute("SELECT outbox_ack($1)", &[&all]).unwrap();
    }
    assert_eq!(seen, ["c", "v1", "v2", "v3", "v4"]);
}

#[test]
fn a_partly_acked_claim_holds_back_only_the_rows_it_still_holds() {
    let (db, mut c) = setup("partly_acked", ", payload_columns => ARRAY['content']");
    insert(&mut c, 1..=2);
    let mut other = shared().connect(&db);
    let claim = |c: &mut Client| -> Vec<(i64, i64)> {
        c.query("SELECT id, (payload->'key'->>'id')::bigint FROM outbox_claim(10)", &[])
            .unwrap()
            .iter()
            .map(|r| (r.get(0), r.get(1)))
            .collect()
    };
    let first = claim(&mut c);
    assert_eq!(first.iter().map(|e| e.1).collect::<Vec<_>>(), [1, 2]);
    c.execute("SELECT outbox_ack($1)", &[&vec![first[0].0]]).unwrap();
    c.batch_execute("UPDATE chunks SET content = 'v2' WHERE id IN (1, 2)").unwrap();

    // row 1's event was acked, row 2's is still in flight in the first claim
    let second = claim(&mut other);
    assert_eq!(second.iter().map(|e| e.1).collect::<Vec<_>>(), [1], "{second:?}");
    assert!(claim(&mut other).is_empty(), "row 2 must wait for its event in flight");

    c.execute("SELECT outbox_ack($1)", &[&vec![first[1].0]]).unwrap();
    let third = claim(&mut other);
    assert_eq!(third.iter().map(|e| e.1).collect::<Vec<_>>(), [2]);
    let rest: Vec<i64> = second.iter().chain(&third).map(|e| e.0).collect();
    assert_eq!(scalar_i64(&mut c, &format!("SELECT outbox_ack(ARRAY{rest:?})::bigint")), 2);
}

#[test]
fn claims_open_in_two_ledger_segments_hold_their_rows_and_are_acked() {
    let (_, mut c) = setup("claims_across_segments", ", payload_columns => ARRAY['content']");
    insert(&mut c, 1..=2);
    let first = claim(&mut c, "SELECT * FROM outbox_claim(1)");
    c.batch_execute("SET outbox.retention = 0; SELECT outbox_purge(); RESET outbox.retention").unwrap();
    let second = claim(&mut c, "SELECT * FROM outbox_claim(1)");
    assert_eq!(
        scalar_i64(&mut c, "SELECT count(DISTINCT ledger_slot) FROM outbox_claims"),
        2,
        "the purge started a new segment between the two claims"
    );
    c.batch_execute("UPDATE chunks SET content = 'v2' WHERE id IN (1, 2)").unwrap();
    assert!(claim(&mut c, "SELECT * FROM outbox_claim(10)").is_empty(), "rows 1 and 2 are in flight");

    // one ack of events held by claims in two segments
    assert_eq!(scalar_i64(&mut c, &format!("SELECT outbox_ack(ARRAY[{}, {}])::bigint", first[0].0, second[0].0)), 2);
    let rest = claim(&mut c, "SELECT * FROM outbox_claim(10)");
    assert_eq!(first.iter().chain(&second).chain(&rest).map(|e| e.2).collect::<Vec<_>>(), [1, 2, 1, 2]);
}

#[test]
fn concurrent_claimers_never_receive_the_same_event() {
    let (db, mut c) = setup("concurrent", "");
    c.batch_execute("INSERT INTO chunks SELECT g, 1, 'x', '{1}' FROM generate_series(1, 3000) g").unwrap();
    for id in 3001i64..=3400 {
        c.execute("INSERT INTO chunks VALUES ($1, 1, 'x', '{1}')", &[&id]).unwrap();
    }
    let seen = Arc::new(Mutex::new(Vec::new()));
    let workers: Vec<_> = (0..4)
        .map(|_| {
            let seen = seen.clone();
            let db = db.clone();
            std::thread::spawn(move || {
                let mut c = shared().connect(&db);
                loop {
                    let got: Vec<i64> = c.query("SELECT id FROM outbox_claim(57)", &[]).unwrap().iter().map(|r| r.get(0)).collect();
                    if got.is_empty() {
                        break;
                    }
                    seen.lock().unwrap().extend(&got);
                    c.execute("SELECT outbox_ack($1)", &[&got]).unwrap();
                }
            })
        })
        .collect();
    for w in workers {
        w.join().unwrap();
    }
    let seen = seen.lock().unwrap();
    let unique: HashSet<i64> = seen.iter().copied().collect();
    assert_eq!(seen.len(), unique.len(), "an event was handed out twice");
    assert_eq!(unique.len(), 3400);
    assert_eq!(scalar_i64(&mut c, "SELECT pending + in_flight FROM outbox_backlog WHERE subscription = 'default'"), 0);
}

#[test]
fn a_transaction_committing_after_a_later_one_is_not_skipped() {
    let (db, mut c) = setup("out_of_order", "");
    let cluster = shared();
    let mut early = cluster.connect(&db);
    let mut late = cluster.connect(&db);
    early.batch_execute("BEGIN; INSERT INTO chunks VALUES (1, 1, 'early', '{1}')").unwrap(); // draws the lower id
    late.batch_execute("BEGIN; INSERT INTO chunks VALUES (2, 1, 'late', '{1}'); COMMIT").unwrap();

    let first = claim(&mut c, "SELECT * FROM outbox_claim(10)");
    assert_eq!(first.iter().map(|e| e.2).collect::<Vec<_>>(), [2]);
    c.execute("SELECT outbox_ack($1)", &[&ids(&first)]).unwrap();
    assert!(claim(&mut c, "SELECT * FROM outbox_claim(10)").is_empty());
    late.batch_execute("INSERT INTO chunks VALUES (3, 1, 'later still', '{1}')").unwrap();
    let second = claim(&mut c, "SELECT * FROM outbox_claim(10)");
    assert_eq!(second.iter().map(|e| e.2).collect::<Vec<_>>(), [3]);
    c.execute("SELECT outbox_ack($1)", &[&ids(&second)]).unwrap();
    // more window advances than the subscription keeps straddle-floor marks
    for key in 100..120 {
        late.batch_execute(&format!("INSERT INTO chunks VALUES ({key}, 1, 'meanwhile', '{{1}}')")).unwrap();
        let one = claim(&mut c, "SELECT * FROM outbox_claim(10)");
        assert_eq!(one.iter().map(|e| e.2).collect::<Vec<_>>(), [key]);
        c.execute("SELECT outbox_ack($1)", &[&ids(&one)]).unwrap();
    }
    let floor = "SELECT straddle_floor FROM outbox_subscriptions WHERE name = 'default'";

    early.batch_execute("COMMIT").unwrap();
    let pending = "SELECT pending FROM outbox_backlog WHERE subscription = 'default'";
    assert_eq!(scalar_i64(&mut c, pending), 1, "the backlog counts it below the handed-out ids");
    let third = claim(&mut c, "SELECT * FROM outbox_claim(10)");
    assert_eq!(third.iter().map(|e| e.2).collect::<Vec<_>>(), [1], "the early transaction's event");
    assert!(third[0].0 < first[0].0, "it has the lower id");
    assert!(scalar_i64(&mut c, floor) < third[0].0, "the floor stayed below it while it was running");
    // xids are the cluster's: other tests' transactions running across a window hold the floor
    // back too, so give them time to end
    let started = Instant::now();
    for key in 200.. {
        late.batch_execute(&format!("INSERT INTO chunks VALUES ({key}, 1, 'after', '{{1}}')")).unwrap();
        assert_eq!(claim(&mut c, "SELECT * FROM outbox_claim(10)").len(), 1);
        if scalar_i64(&mut c, floor) > third[0].0 {
            break;
        }
        assert!(started.elapsed() < Duration::from_secs(60), "the floor never passed the early transaction's event");
        std::thread::sleep(Duration::from_millis(50));
    }
}

/// A small xorshift generator: the mixed load below draws its choices from a seed it prints.
struct Choices(u64);

impl Choices {
    fn next(&mut self) -> u64 {
        self.0 ^= self.0 << 13;
        self.0 ^= self.0 >> 7;
        self.0 ^= self.0 << 17;
        self.0
    }
}

/// Writers of single rows, several rows, savepoints rolled back, updates and deletes, while
/// three consumers of one subscription and one of another claim batches of 1 to 100 and ack
/// them, fail them, ack half or drop them to let the lease run out. Afterwards every event has
/// reached both subscriptions, no claim held two events of a row, and each row's events were
/// first handed out in id (commit) order.
#[test]
fn a_mixed_load_loses_nothing_and_keeps_each_rows_order() {
    let (db, mut c) = setup("mixed_load", "");
    c.batch_execute("SELECT outbox_subscribe('second')").unwrap();
    // OUTBOX_SEED replays a failed run's choices (as far as the threads' timing allows)
    let seed = match std::env::var("OUTBOX_SEED") {
        Ok(seed) => seed.parse::<u64>().expect("OUTBOX_SEED is a number"),
        Err(_) => std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).unwrap().as_nanos() as u64 | 1,
    };
    eprintln!("mixed load seed {seed}");
    let stop = Arc::new(AtomicBool::new(false));
    let writers: Vec<_> = (0..3i64)
        .map(|w| {
            let (db, stop) = (db.clone(), stop.clone());
            std::thread::spawn(move || {
                let mut choices = Choices(seed.wrapping_add(w as u64 * 7919) | 1);
                let mut client = shared().connect(&db);
                let first = w * 10_000_000;
                let mut id = first;
                while !stop.load(Ordering::Relaxed) {
                    id += 5;
                    let earlier = first + (choices.next() % (id - first + 1) as u64) as i64;
                    let sql = match choices.next() % 20 {
                        0..=7 => format!("INSERT INTO chunks VALUES ({id}, 1, 'x', '{{1}}')"),
                        8..=11 => format!("INSERT INTO chunks SELECT g, 1, 'x', '{{1}}' FROM generate_series({id}, {}) g", id + 4),
                        12..=14 => format!(
                            "BEGIN; INSERT INTO chunks VALUES ({id}, 1, 'x', '{{1}}'); SAVEPOINT s; \
                             INSERT INTO chunks VALUES ({}, 1, 'x', '{{1}}'); ROLLBACK TO s; \
                             UPDATE chunks SET content = 'z' WHERE id = {id}; COMMIT",
                            id + 1
                        ),
                        15..=17 => format!("UPDATE chunks SET content = md5(random()::text) WHERE id BETWEEN {earlier} AND {}", earlier + 20),
                        _ => format!("DELETE FROM chunks WHERE id BETWEEN {earlier} AND {}", earlier + 3),
                    };
                    client.batch_execute(&sql).unwrap();
                }
            })
        })
        .collect();
    // (subscription, id, key, when the claim handed it out): claims of a subscription take
    // turns under its row lock, so the claim's clock orders them
    type HandOut = (String, i64, String, i64);
    let claim_sql = "SELECT id, (payload->'key')::text, (extract(epoch FROM clock_timestamp()) * 1e6)::bigint \
                     FROM outbox_claim($1, $2, lease => '200 milliseconds')";
    let hand_outs = Arc::new(Mutex::new(Vec::<HandOut>::new()));
    let record = |hand_outs: &Mutex<Vec<HandOut>>, subscription: &str, rows: &[postgres::Row]| -> Vec<i64> {
        let keys: HashSet<String> = rows.iter().map(|r| r.get(1)).collect();
        assert_eq!(keys.len(), rows.len(), "a claim of {subscription} held two events of one row");
        let mut all = hand_outs.lock().unwrap();
        all.extend(rows.iter().map(|r| (subscription.to_string(), r.get(0), r.get(1), r.get(2))));
        rows.iter().map(|r| r.get(0)).collect()
    };
    let consumers: Vec<_> = ["default", "default", "default", "second"]
        .into_iter()
        .enumerate()
        .map(|(n, subscription)| {
            let (db, stop, hand_outs) = (db.clone(), stop.clone(), hand_outs.clone());
            std::thread::spawn(move || {
                let mut choices = Choices(seed.wrapping_add(1_000 + n as u64 * 104_729) | 1);
                let mut client = shared().connect(&db);
                while !stop.load(Ordering::Relaxed) {
                    let batch = [1, 3, 10, 50, 100][(choices.next() % 5) as usize];
                    let rows = client.query(claim_sql, &[&batch, &subscription]).unwrap();
                    let ids = record(&hand_outs, subscription, &rows);
                    if ids.is_empty() {
                        std::thread::sleep(Duration::from_millis(2));
                        continue;
                    }
                    let answer = choices.next() % 100;
                    if answer < 75 {
                        client.execute("SELECT outbox_ack($1, $2)", &[&ids, &subscription]).unwrap();
                    } else if answer < 88 {
                        client.execute("SELECT outbox_fail($1, 'refused', $2, retry_after => '10 ms')", &[&ids, &subscription]).unwrap();
                    } else if answer < 95 {
                        client.execute("SELECT outbox_ack($1, $2)", &[&ids[..ids.len() / 2].to_vec(), &subscription]).unwrap();
                    } // else dropped: the lease runs out
                }
            })
        })
        .collect();
    // 3 seconds and 1,000 events at least, however slow the machine
    let started = Instant::now();
    std::thread::sleep(Duration::from_secs(3));
    while c.query_one("SELECT count(*) FROM outbox_events", &[]).unwrap().get::<_, i64>(0) < 1000 {
        assert!(started.elapsed() < Duration::from_secs(60), "the writers captured fewer than 1,000 events in a minute");
        std::thread::sleep(Duration::from_millis(500));
    }
    stop.store(true, Ordering::Relaxed);
    writers.into_iter().chain(consumers).for_each(|t| t.join().unwrap());

    let started = Instant::now();
    for subscription in ["default", "second"] {
        loop {
            let rows = c.query(claim_sql, &[&1000, &subscription]).unwrap();
            let ids = record(&hand_outs, subscription, &rows);
            if !ids.is_empty() {
                c.execute("SELECT outbox_ack($1, $2)", &[&ids, &subscription]).unwrap();
                continue;
            }
            let left = c
                .query_one("SELECT pending + in_flight + retrying FROM outbox_backlog WHERE subscription = $1", &[&subscription])
                .unwrap()
                .get::<_, i64>(0);
            if left == 0 {
                break;
            }
            assert!(started.elapsed() < Duration::from_secs(60), "{left} events of {subscription} never came out");
            std::thread::sleep(Duration::from_millis(50));
        }
    }

    let events: Vec<i64> = c.query("SELECT id FROM outbox_events", &[]).unwrap().iter().map(|r| r.get(0)).collect();
    assert!(events.len() > 1000, "{} events", events.len());
    let hand_outs = hand_outs.lock().unwrap();
    for subscription in ["default", "second"] {
        // the first hand-out of each event, and each row's in the claims' order
        let mut first: HashMap<i64, (i64, &str)> = HashMap::new();
        for (_, id, key, at) in hand_outs.iter().filter(|h| h.0 == subscription) {
            let earliest = first.entry(*id).or_insert((*at, key));
            if *at < earliest.0 {
                *earliest = (*at, key);
            }
        }
        let missing: Vec<&i64> = events.iter().filter(|id| !first.contains_key(id)).collect();
        assert!(missing.is_empty(), "{} events never reached {subscription} (seed {seed}): {:?}", missing.len(), &missing[..missing.len().min(10)]);
        let mut by_row: HashMap<&str, Vec<(i64, i64)>> = HashMap::new();
        for (id, (at, key)) in &first {
            by_row.entry(key).or_default().push((*at, *id));
        }
        for (key, mut row) in by_row {
            row.sort_unstable();
            assert!(row.windows(2).all(|w| w[0].1 < w[1].1), "row {key} of {subscription} out of order (seed {seed}): {row:?}");
        }
    }
}

/// A straddle-floor mark pairs the last base drawn with the next xid: every transaction with
/// that xid or a later one draws bases above the mark's, and the floor the marks raise is
/// where claims stop looking for events committed after their window closed. A mark read from
/// the sequence as a table was now and then the value a nextval logs ahead (up to 32 bases
/// above the last drawn) while it wrote its WAL record, and the events of transactions that
/// drew bases below it and committed after a window closed were never handed out. Here one
/// connection draws bases in transactions whose xids it records while another claims, each
/// claim opening a window and making a mark; no drawn base may lie at or below a mark whose
/// xid is at most the drawer's.
#[test]
fn a_floor_mark_is_never_above_a_base_drawn_after_it() {
    let (db, mut c) = setup("floor_marks", "");
    // Transactions of 32 draws, as many as a nextval logs ahead, so that the next transaction's
    // bases lie at or below any mark read while one of them was logging; committed without a
    // flush, and looped in the server, so that they come fast.
    let drawer = {
        let db = db.clone();
        std::thread::spawn(move || {
            let mut d = shared().connect(&db);
            d.batch_execute("SET synchronous_commit = off").unwrap();
            d.batch_execute("CREATE TABLE drawn (xid bigint, base bigint)").unwrap();
            // (a statement of its own: a DO block may commit only outside a transaction block)
            d.batch_execute(
                "DO $$
                 DECLARE
                     started timestamptz := clock_timestamp();
                     draws integer := 0;
                     xid bigint;
                 BEGIN
                     -- 4 seconds and 5,000 transactions at least, so that a slow machine does
                     -- as much; 30 seconds at most
                     WHILE (clock_timestamp() < started + interval '4 seconds' OR draws < 5000)
                           AND clock_timestamp() < started + interval '30 seconds' LOOP
                         draws := draws + 1;
                         xid := pg_current_xact_id()::text::bigint; -- the xid first, as capture draws
                         INSERT INTO drawn SELECT xid, min(nextval('outbox_event_id_seq')) FROM generate_series(1, 32);
                         COMMIT;
                     END LOOP;
                 END $$",
            )
            .unwrap();
        })
    };
    let mut marks = Vec::new();
    while !drawer.is_finished() {
        assert!(claim(&mut c, "SELECT * FROM outbox_claim(1)").is_empty(), "nothing is captured here");
        let row = c
            .query_one(
                "SELECT floor_mark_bases[cardinality(floor_mark_bases)], floor_mark_xids[cardinality(floor_mark_xids)] \
                 FROM outbox_subscriptions WHERE name = 'default'",
                &[],
            )
            .unwrap();
        marks.push((row.get::<_, i64>(0), row.get::<_, i64>(1)));
    }
    drawer.join().unwrap();
    let mut lowest_from: Vec<(i64, i64)> =
        c.query("SELECT xid, base FROM drawn ORDER BY xid", &[]).unwrap().iter().map(|r| (r.get(0), r.get(1))).collect();
    assert!(marks.len() > 100 && lowest_from.len() >= 5000, "{} claims, {} transactions drew", marks.len(), lowest_from.len());
    // the lowest base drawn by a transaction with each xid or a later one
    for i in (0..lowest_from.len().saturating_sub(1)).rev() {
        lowest_from[i].1 = lowest_from[i].1.min(lowest_from[i + 1].1);
    }
    let above: Vec<_> = marks
        .iter()
        .filter_map(|&(base, xid)| {
            let from = lowest_from.partition_point(|&(drawn_xid, _)| drawn_xid < xid);
            lowest_from.get(from).filter(|&&(_, lowest)| lowest <= base).map(|&(_, lowest)| (base, xid, lowest))
        })
        .collect();
    assert!(
        above.is_empty(),
        "{} of {} marks lie at or above a base drawn after them; the first (base, xid, base drawn): {:?}",
        above.len(),
        marks.len(),
        &above[..above.len().min(5)]
    );
}

/// docs/operations.md tells those who ran a library whose marks could rise too high to replay
/// from when they installed it: an event a floor set above its base skipped counts as neither
/// pending nor in flight, and a replay hands it out. The floor is raised here by hand, as such
/// a mark raised it.
#[test]
fn a_replay_hands_out_what_a_floor_set_too_high_skipped() {
    let (db, mut c) = setup("floor_too_high", "");
    let mut early = shared().connect(&db);
    early.batch_execute("BEGIN; INSERT INTO chunks VALUES (1, 1, 'early', '{1}')").unwrap();
    insert(&mut c, 2..=2);
    let first = claim(&mut c, "SELECT * FROM outbox_claim(10)");
    assert_eq!(first.iter().map(|e| e.2).collect::<Vec<_>>(), [2]);
    c.execute("SELECT outbox_ack($1)", &[&ids(&first)]).unwrap();
    c.batch_execute("UPDATE outbox_subscriptions SET straddle_floor = straddle_floor + 64 * 4096").unwrap();
    early.batch_execute("COMMIT").unwrap();
    for key in 3..=5 {
        insert(&mut c, key..=key);
        let got = claim(&mut c, "SELECT * FROM outbox_claim(10)");
        assert_eq!(got.iter().map(|e| e.2).collect::<Vec<_>>(), [key], "the early event is skipped");
        c.execute("SELECT outbox_ack($1)", &[&ids(&got)]).unwrap();
    }
    let backlog = "SELECT pending + in_flight + retrying FROM outbox_backlog WHERE subscription = 'default'";
    assert_eq!(scalar_i64(&mut c, backlog), 0, "a skipped event does not count as waiting");
    assert_eq!(scalar_i64(&mut c, "SELECT outbox_replay('default', since => now() - interval '1 hour')"), 5);
    let again = claim(&mut c, "SELECT * FROM outbox_claim(10)");
    assert_eq!(again.iter().map(|e| e.2).collect::<Vec<_>>(), [1, 2, 3, 4, 5], "the skipped one among the processed ones");
}

/// A transaction holding back xmin keeps every old version of the subscription row, and each
/// claim reads the row: so a claim writes it once, one that finds nothing too. A transaction
/// that drew its id before the windows and commits after them still has its event handed out.
#[test]
fn a_claim_writes_its_subscription_row_once() {
    let (db, mut c) = setup("subscription_writes", "");
    let mut early = shared().connect(&db);
    early.batch_execute("BEGIN; INSERT INTO chunks VALUES (1, 1, 'early', '{1}')").unwrap(); // draws the lower id
    insert(&mut c, 2..=4);
    let updates = "SELECT n_tup_upd FROM pg_stat_xact_user_tables WHERE relid = 'outbox_subscriptions'::regclass";

    // (the counts include earlier transactions' until the backend reports them)
    c.batch_execute("BEGIN").unwrap();
    let before = scalar_i64(&mut c, updates);
    let first = claim(&mut c, "SELECT * FROM outbox_claim(10)");
    assert_eq!(first.iter().map(|e| e.2).collect::<Vec<_>>(), [2, 3, 4]);
    assert_eq!(scalar_i64(&mut c, updates) - before, 1, "the window and its cursor in one write");
    c.batch_execute("COMMIT").unwrap();
    c.execute("SELECT outbox_ack($1)", &[&ids(&first)]).unwrap();

    for _ in 0..5 {
        c.batch_execute("BEGIN").unwrap();
        let before = scalar_i64(&mut c, updates);
        assert!(claim(&mut c, "SELECT * FROM outbox_claim(10)").is_empty());
        assert_eq!(scalar_i64(&mut c, updates) - before, 1, "an empty claim");
        c.batch_execute("COMMIT").unwrap();
    }
    early.batch_execute("COMMIT").unwrap();
    let late = claim(&mut c, "SELECT * FROM outbox_claim(10)");
    assert_eq!(late.iter().map(|e| e.2).collect::<Vec<_>>(), [1], "the early transaction's event");
    c.execute("SELECT outbox_ack($1)", &[&ids(&late)]).unwrap();
    insert(&mut c, 5..=5);
    assert_eq!(claim(&mut c, "SELECT * FROM outbox_claim(10)").iter().map(|e| e.2).collect::<Vec<_>>(), [5]);
    assert!(claim(&mut c, "SELECT * FROM outbox_claim(10)").is_empty());
}

/// A claim that waited for the subscription row's lock writes the row as the claim before it
/// left it (a claim writes the row by the ctid its lock returned).
#[test]
fn a_claim_that_waited_for_another_writes_after_it() {
    let (db, mut c) = setup("claims_in_turn", "");
    insert(&mut c, 1..=5);
    let mut first = shared().connect(&db);
    first.batch_execute("BEGIN").unwrap();
    let taken = claim(&mut first, "SELECT * FROM outbox_claim(2)");
    assert_eq!(taken.iter().map(|e| e.2).collect::<Vec<_>>(), [1, 2]);
    let waiter = std::thread::spawn(move || {
        let mut second = shared().connect(&db);
        let got = claim(&mut second, "SELECT * FROM outbox_claim(10)");
        second.execute("SELECT outbox_ack($1)", &[&ids(&got)]).unwrap();
        got.iter().map(|e| e.2).collect::<Vec<_>>()
    });
    std::thread::sleep(Duration::from_millis(300)); // the second claim waits for the lock
    assert!(!waiter.is_finished(), "the second claim did not wait for the first");
    first.batch_execute("COMMIT").unwrap();
    assert_eq!(waiter.join().unwrap(), [3, 4, 5]);
    insert(&mut c, 6..=6);
    assert_eq!(claim(&mut c, "SELECT * FROM outbox_claim(10)").iter().map(|e| e.2).collect::<Vec<_>>(), [6], "nothing handed out twice");
}

/// A subscription created while a transaction that already wrote is still open gets that
/// transaction's event once it commits: its straddle floor comes from the other subscriptions,
/// not from the ids drawn so far.
#[test]
fn a_subscription_gets_the_event_of_a_transaction_open_when_it_was_created() {
    let (db, mut c) = setup("open_at_subscribe", "");
    let mut early = shared().connect(&db);
    early.batch_execute("BEGIN; INSERT INTO chunks VALUES (1, 1, 'early', '{1}')").unwrap();
    insert(&mut c, 2..=3);
    assert_eq!(claim(&mut c, "SELECT * FROM outbox_claim(10)").len(), 2, "default moves its windows meanwhile");
    c.batch_execute("SELECT outbox_subscribe('late')").unwrap();
    insert(&mut c, 4..=4);
    early.batch_execute("COMMIT").unwrap();
    let late = claim(&mut c, "SELECT * FROM outbox_claim(10, 'late')");
    assert_eq!(late.iter().map(|e| e.2).collect::<Vec<_>>(), [1, 4], "committed after the subscription was created");
}

/// A subscription opened in the transaction that writes the first events ever gets them, also
/// when a transaction that started later has already finished: its snapshot then shows the
/// opener's own xid as visible.
#[test]
fn the_first_events_ever_reach_a_subscription_opened_in_their_transaction() {
    let cluster = shared();
    for (name, prepare, open, subscription) in [
        ("first_events_install", "", "CREATE EXTENSION outbox", "default"),
        ("first_events_subscribe", "CREATE EXTENSION outbox", "SELECT outbox_subscribe('s')", "s"),
    ] {
        let mut admin = cluster.connect("postgres");
        admin.batch_execute(&format!("DROP DATABASE IF EXISTS {name}")).unwrap();
        admin.batch_execute(&format!("CREATE DATABASE {name}")).unwrap();
        let mut opener = cluster.connect(name);
        let mut other = cluster.connect(name);
        opener.batch_execute(prepare).unwrap();
        opener.batch_execute("BEGIN; SELECT pg_current_xact_id()").unwrap();
        other.batch_execute("SELECT pg_current_xact_id()").unwrap(); // a later xid, finished first
        opener
            .batch_execute(&format!(
                "{open};
                 CREATE TABLE chunks (id bigint PRIMARY KEY, doc_id int, content text, embedding real[]);
                 SELECT outbox_attach('chunks');
                 INSERT INTO chunks SELECT g, 1, 'c', '{{1}}' FROM generate_series(1, 3) g;
                 COMMIT"
            ))
            .unwrap();
        let claimed = claim(&mut opener, &format!("SELECT * FROM outbox_claim(10, '{subscription}')"));
        assert_eq!(claimed.iter().map(|e| e.2).collect::<Vec<_>>(), [1, 2, 3], "{name}");
    }
}

#[test]
fn rollback_leaves_no_event_and_commit_exactly_one_per_change() {
    let (_, mut c) = setup("rollback", "");
    c.batch_execute("BEGIN; INSERT INTO chunks VALUES (1, 1, 'x', '{1}'); ROLLBACK").unwrap();
    assert!(claim(&mut c, "SELECT * FROM outbox_claim(10)").is_empty());
    c.batch_execute("BEGIN; INSERT INTO chunks VALUES (2, 1, 'x', '{1}'); UPDATE chunks SET content = 'y'; DELETE FROM chunks; COMMIT").unwrap();
    let mut events = Vec::new();
    loop {
        let got = claim(&mut c, "SELECT * FROM outbox_claim(10)"); // one at a time: all are row 2
        if got.is_empty() {
            break;
        }
        c.execute("SELECT outbox_ack($1)", &[&ids(&got)]).unwrap();
        events.extend(got.into_iter().map(|e| (e.1, e.2)));
    }
    assert_eq!(
        events,
        [("EMBED_UPSERT".to_string(), 2), ("EMBED_UPSERT".to_string(), 2), ("EMBED_DELETE".to_string(), 2)]
    );
}

/// A COPY into a partition leaves its events for a statement trigger that partitions do not
/// have: the next statement of the transaction writes them with its own. (They stayed in the
/// backend until the commit, and kept every later statement's there too: a reviewer's
/// transaction of 200 INSERTs after such a COPY held 200,000 events, 29 MB.)
#[test]
fn events_a_copy_into_a_partition_leaves_are_written_by_the_next_statement() {
    let db = shared().database("copy_partition");
    let mut c = shared().connect(&db);
    c.batch_execute(
        "CREATE TABLE mp (id int PRIMARY KEY, v text) PARTITION BY RANGE (id);
         CREATE TABLE mp1 PARTITION OF mp FOR VALUES FROM (0) TO (1000);
         CREATE TABLE m1 (id int PRIMARY KEY);
         SELECT outbox_attach('mp'); SELECT outbox_attach('m1');",
    )
    .unwrap();
    let mut tx = c.transaction().unwrap();
    let mut writer = tx.copy_in("COPY mp1 FROM STDIN").unwrap();
    std::io::Write::write_all(&mut writer, b"1\tcopied\n").unwrap();
    writer.finish().unwrap();
    for id in 1..=3 {
        tx.execute("INSERT INTO m1 VALUES ($1)", &[&id]).unwrap();
        let written: i64 = tx.query_one("SELECT count(*) FROM outbox_events", &[]).unwrap().get(0);
        assert_eq!(written, 1 + i64::from(id), "written before the commit");
    }
    tx.commit().unwrap();
    assert_eq!(scalar_i64(&mut c, "SELECT count(*) FROM outbox_events"), 4);
}

/// Two attaches in one partition tree at once: the second waits for the first and is refused
/// with the way out. (Neither saw the other's attachment, and the second failed on a trigger
/// name, "trigger \"outbox_capture_rows\" for relation … already exists".)
#[test]
fn concurrent_attaches_in_one_partition_tree_are_told_apart() {
    let db = shared().database("attach_race");
    let mut first = shared().connect(&db);
    first
        .batch_execute("CREATE TABLE rt (id int PRIMARY KEY) PARTITION BY RANGE (id); CREATE TABLE rt_1 PARTITION OF rt FOR VALUES FROM (0) TO (10)")
        .unwrap();
    first.batch_execute("BEGIN; SELECT outbox_attach('rt')").unwrap();
    let second_db = db.clone();
    let second = std::thread::spawn(move || error_of(&mut shared().connect(&second_db), "SELECT outbox_attach('rt_1')"));
    std::thread::sleep(Duration::from_millis(500));
    first.batch_execute("COMMIT").unwrap();
    let message = second.join().unwrap();
    assert!(message.contains("table public.rt_1 is in the partition tree of public.rt, which is attached"), "{message}");
}

#[test]
fn bulk_insert_and_copy_are_captured() {
    let (_, mut c) = setup("bulk", "");
    c.batch_execute("INSERT INTO chunks SELECT g, 1, 'x', '{1}' FROM generate_series(1, 10000) g").unwrap();
    let data: String = (10001..=15000).map(|i| format!("{i}\t1\tx\t{{1}}\n")).collect();
    let mut writer = c.copy_in("COPY chunks FROM STDIN").unwrap();
    std::io::Write::write_all(&mut writer, data.as_bytes()).unwrap();
    writer.finish().unwrap();
    assert_eq!(scalar_i64(&mut c, "SELECT count(*) FROM outbox_events"), 15000);
    assert_eq!(scalar_i64(&mut c, "SELECT count(DISTINCT payload->'key') FROM outbox_events"), 15000);
    let mut delivered = 0;
    loop {
        let got: Vec<i64> = c.query("SELECT id FROM outbox_claim(1000)", &[]).unwrap().iter().map(|r| r.get(0)).collect();
        if got.is_empty() {
            break;
        }
        delivered += got.len();
        c.execute("SELECT outbox_ack($1)", &[&got]).unwrap();
    }
    assert_eq!(delivered, 15000);
}

#[test]
fn subscriptions_are_independent_and_start_where_they_are_created() {
    let (_, mut c) = setup("subscriptions", "");
    insert(&mut c, 1..=2);
    c.batch_execute("SELECT outbox_subscribe('late'); SELECT outbox_subscribe('all', from_start => true)").unwrap();
    insert(&mut c, 3..=3);
    let keys = |c: &mut Client, sub: &str| -> Vec<i64> {
        claim(c, &format!("SELECT * FROM outbox_claim(10, '{sub}')")).iter().map(|e| e.2).collect()
    };
    assert_eq!(keys(&mut c, "late"), [3]);
    assert_eq!(keys(&mut c, "all"), [1, 2, 3]);
    let default = claim(&mut c, "SELECT * FROM outbox_claim(10)");
    assert_eq!(default.len(), 3);
    c.execute("SELECT outbox_ack($1)", &[&ids(&default)]).unwrap();
    let backlog: HashMap<String, i64> = c
        .query("SELECT subscription, in_flight FROM outbox_backlog", &[])
        .unwrap()
        .iter()
        .map(|r| (r.get(0), r.get(1)))
        .collect();
    assert_eq!(backlog["default"], 0);
    assert_eq!(backlog["late"], 1);
    assert_eq!(backlog["all"], 3, "acking in one subscription leaves the others alone");

    c.batch_execute("SELECT outbox_unsubscribe('all')").unwrap();
    assert_eq!(scalar_i64(&mut c, "SELECT count(*) FROM outbox_subscriptions WHERE name = 'all'"), 0);
    assert_eq!(scalar_i64(&mut c, "SELECT count(*) FROM outbox_claims c JOIN outbox_subscriptions s ON s.id = c.subscription_id"), 1);
    assert!(error_of(&mut c, "SELECT outbox_unsubscribe('all')").contains("subscription \"all\" does not exist"));
}

#[test]
fn replay_makes_processed_events_deliverable_without_duplicating_pending_ones() {
    let (_, mut c) = setup("replay", "");
    insert(&mut c, 1..=3);
    let first = ids(&claim(&mut c, "SELECT * FROM outbox_claim(10)"));
    c.execute("SELECT outbox_ack($1)", &[&first[..2].to_vec()]).unwrap();
    insert(&mut c, 4..=4); // pending, not yet handed out

    // the third is in flight and the fourth is pending: only the two processed ones come back
    let replayed = c.query_one("SELECT outbox_replay('default', since => now() - interval '1 hour')", &[]).unwrap().get::<_, i64>(0);
    assert_eq!(replayed, 2);
    assert_eq!(c.query_one("SELECT outbox_replay('default', ids => $1)", &[&first]).unwrap().get::<_, i64>(0), 0, "already pending");
    c.execute("SELECT outbox_ack($1)", &[&vec![first[2]]]).unwrap();
    let again: Vec<i64> = claim(&mut c, "SELECT * FROM outbox_claim(10)").iter().map(|e| e.2).collect();
    assert_eq!(again, [1, 2, 4]);
}

/// A subscription is handed only what was committed after it was made (or, from_start, all
/// that is retained), and a replay hands out no more: it gave a new subscription every older
/// event, other tables' and TRUNCATEs included.
#[test]
fn replay_hands_out_only_what_the_subscription_could_have_been_handed() {
    let (_, mut c) = setup("replay_start", "");
    insert(&mut c, 1..=2);
    c.batch_execute("TRUNCATE chunks").unwrap();
    c.batch_execute("SELECT outbox_subscribe('late'); SELECT outbox_subscribe('all', from_start => true)").unwrap();
    insert(&mut c, 3..=3);
    let keys = |c: &mut Client, subscription: &str| -> Vec<i64> { drain(c, subscription).into_iter().map(|(_, key)| key).collect() };
    for (subscription, handed) in [("late", vec![3]), ("all", vec![1, 2, 0, 3])] {
        assert_eq!(keys(&mut c, subscription), handed, "{subscription}");
        let replayed = c.query_one("SELECT outbox_replay($1, since => now() - interval '1 hour')", &[&subscription]).unwrap().get::<_, i64>(0);
        assert_eq!(replayed, handed.len() as i64, "{subscription}");
        assert_eq!(keys(&mut c, subscription), handed, "{subscription} after the replay");
    }
}

#[test]
fn purge_removes_processed_events_after_retention_and_keeps_the_rest() {
    let (_, mut c) = setup("retention", "");
    c.batch_execute("SELECT outbox_subscribe('lagging')").unwrap();
    insert(&mut c, 1..=5);
    let all = ids(&claim(&mut c, "SELECT * FROM outbox_claim(10)"));
    c.execute("SELECT outbox_ack($1)", &[&all]).unwrap();
    c.batch_execute("SET outbox.retention = 0").unwrap();
    c.batch_execute("SELECT outbox_purge()").unwrap(); // starts a new segment
    assert_eq!(scalar_i64(&mut c, "SELECT outbox_purge()"), 0, "'lagging' has not processed them");
    assert_eq!(scalar_i64(&mut c, "SELECT count(*) FROM outbox_events"), 5);

    let lagging = ids(&claim(&mut c, "SELECT * FROM outbox_claim(10, 'lagging')"));
    c.execute("SELECT outbox_ack($1, 'lagging')", &[&lagging]).unwrap();
    assert_eq!(scalar_i64(&mut c, "SELECT outbox_purge()"), 5);
    assert_eq!(scalar_i64(&mut c, "SELECT count(*) FROM outbox_events"), 0);

    c.batch_execute("RESET outbox.retention").unwrap();
    insert(&mut c, 6..=6);
    let six = ids(&claim(&mut c, "SELECT * FROM outbox_claim(10)"));
    c.execute("SELECT outbox_ack($1)", &[&six]).unwrap();
    assert_eq!(scalar_i64(&mut c, "SELECT outbox_purge()"), 0, "a day of retention keeps it");
}

/// TRUNCATE needs every other transaction to be done with a segment: a session idle in a
/// transaction after reading the outbox holds every segment it read, and retention stalls
/// there until it ends. `outbox_purge` says so, and `outbox_oldest_retained_age_seconds` shows
/// the stall (the OutboxRetentionStalled alert watches it).
#[test]
fn a_transaction_holding_a_segment_stalls_retention_visibly() {
    let (db, mut c) = setup("retention_held", "");
    let notices = Arc::new(Mutex::new(Vec::new()));
    let heard = notices.clone();
    let mut purger = shared()
        .dsn(&db)
        .parse::<postgres::Config>()
        .unwrap()
        .notice_callback(move |notice| heard.lock().unwrap().push(notice.message().to_string()))
        .connect(NoTls)
        .unwrap();
    insert(&mut c, 1..=5);
    let all = ids(&claim(&mut c, "SELECT * FROM outbox_claim(10)"));
    c.execute("SELECT outbox_ack($1)", &[&all]).unwrap();
    let retained = |c: &mut Client| {
        let metrics: String = c.query_one("SELECT outbox_metrics()", &[]).unwrap().get(0);
        (sample(&metrics, "outbox_oldest_retained_age_seconds").unwrap(), sample(&metrics, "outbox_retention_seconds").unwrap())
    };
    let mut idle = shared().connect(&db);
    idle.batch_execute("BEGIN; SELECT count(*) FROM outbox_backlog").unwrap();
    purger.batch_execute("SET outbox.retention = 0; SELECT outbox_purge()").unwrap(); // starts a new segment
    assert_eq!(scalar_i64(&mut purger, "SELECT outbox_purge()"), 0, "the idle reader holds the old segment");
    let said = notices.lock().unwrap().clone();
    assert!(said.iter().any(|n| n.contains("segment 0 is due but another transaction is using it")), "{said:?}");
    let (age, retention) = retained(&mut purger);
    assert!(age > 0.0 && retention == 0.0, "{age} {retention}");
    idle.batch_execute("COMMIT").unwrap();
    assert_eq!(scalar_i64(&mut purger, "SELECT outbox_purge()"), 5);
    assert_eq!(retained(&mut purger).0, 0.0, "an empty log");
}

/// Ids alone do not say which hand-out an ack or fail means. A consumer whose lease expired
/// after the event was handed out again used to settle the newer hand-out: a late fail handed
/// it to a third consumer (or dead-lettered it) while the second still held it, and a late ack
/// let the row's next event out while the second consumer still wrote the older version.
#[test]
fn a_late_ack_or_fail_leaves_a_newer_hand_out_in_flight() {
    let (db, mut c) = setup("late_settle", "");
    c.batch_execute("SELECT outbox_subscribe('s', options => '{\"max_attempts\": 2}')").unwrap();
    let (mut late, mut holder) = (shared().connect(&db), shared().connect(&db));
    let claim_in = |client: &mut Client, lease: &str| {
        let claimed = claim(client, &format!("SELECT * FROM outbox_claim(10, 's', '{lease}')"));
        claimed.iter().map(|e| (e.0, e.3)).collect::<Vec<_>>()
    };
    let in_flight = |c: &mut Client| scalar_i64(c, "SELECT in_flight FROM outbox_backlog WHERE subscription = 's'");

    insert(&mut c, 1..=1);
    let first = claim_in(&mut late, "1 second");
    assert_eq!(first.len(), 1);
    let event = first[0].0;
    std::thread::sleep(Duration::from_millis(1200));
    assert_eq!(claim_in(&mut holder, "3 seconds"), [(event, 2)], "handed out again after the lease expired");
    c.execute("UPDATE chunks SET content = 'v2' WHERE id = 1", &[]).unwrap();

    // the expired consumer fails it: the holder's hand-out stands (at its last attempt, a
    // counted failure would have dead-lettered it)
    let failed = c.query_one("SELECT outbox_fail($1, 'late', 's', '0')", &[&vec![event]]).unwrap().get::<_, i32>(0);
    assert_eq!(failed, 0);
    assert!(claim_in(&mut c, "1 minute").is_empty(), "neither the event nor its row's next one");
    assert_eq!(scalar_i64(&mut c, "SELECT count(*) FROM outbox_dead_letters"), 0);

    // it acks it after all: processed, but the row stays held while the holder works on it
    assert_eq!(late.query_one("SELECT outbox_ack($1, 's')", &[&vec![event]]).unwrap().get::<_, i32>(0), 1);
    assert!(claim_in(&mut c, "1 minute").is_empty(), "the row's next event waits for the holder");
    assert_eq!(in_flight(&mut c), 1);
    // and when the holder's lease ends the next event goes out, the processed one not again
    std::thread::sleep(Duration::from_millis(3100));
    let retrying = scalar_i64(&mut c, "SELECT retrying FROM outbox_backlog WHERE subscription = 's'");
    assert_eq!((in_flight(&mut c), retrying), (0, 0), "the processed event's hand-out is over, not retrying");
    let next = claim_in(&mut c, "1 minute");
    assert_eq!(next.len(), 1);
    assert!(next[0].0 > event, "{next:?} after {event}");
    assert_eq!(holder.query_one("SELECT outbox_ack($1, 's')", &[&vec![event]]).unwrap().get::<_, i32>(0), 0, "acked before");
    c.execute("SELECT outbox_ack($1, 's')", &[&vec![next[0].0]]).unwrap();

    // the holder settling its own hand-out lets the row's next event out at once
    insert(&mut c, 2..=2);
    let second = claim_in(&mut late, "1 second")[0].0;
    std::thread::sleep(Duration::from_millis(1200));
    assert_eq!(claim_in(&mut holder, "1 minute"), [(second, 2)]);
    c.execute("UPDATE chunks SET content = 'v2' WHERE id = 2", &[]).unwrap();
    assert_eq!(late.query_one("SELECT outbox_ack($1, 's')", &[&vec![second]]).unwrap().get::<_, i32>(0), 1);
    assert_eq!(holder.query_one("SELECT outbox_ack($1, 's')", &[&vec![second]]).unwrap().get::<_, i32>(0), 0);
    assert_eq!(claim_in(&mut c, "1 minute").len(), 1, "the row's next event");
    assert_eq!(in_flight(&mut c), 1);
}

/// A purge cannot see a subscription whose transaction is still open: without a lock between
/// the two it emptied the segments a `from_start` subscription was about to read.
#[test]
fn a_subscription_being_created_and_a_purge_keep_apart() {
    let (db, mut c) = setup("purge_subscribe", "");
    insert(&mut c, 1..=1);
    let first = ids(&claim(&mut c, "SELECT * FROM outbox_claim(10)"));
    c.execute("SELECT outbox_ack($1)", &[&first]).unwrap();
    c.batch_execute("SET outbox.retention = 0; SELECT outbox_purge()").unwrap(); // starts a new segment

    let mut late = shared().connect(&db);
    late.batch_execute("BEGIN; SELECT outbox_subscribe('late', from_start => true)").unwrap();
    assert_eq!(scalar_i64(&mut c, "SELECT outbox_purge()"), 0, "skipped while 'late' is being created");
    late.batch_execute("COMMIT").unwrap();
    assert_eq!(scalar_i64(&mut c, "SELECT outbox_purge()"), 0, "'late' has not processed it");
    let seen = ids(&claim(&mut late, "SELECT * FROM outbox_claim(10, 'late')"));
    assert_eq!(seen, first);
    late.execute("SELECT outbox_ack($1, 'late')", &[&seen]).unwrap();
    assert_eq!(scalar_i64(&mut c, "SELECT outbox_purge()"), 1);

    // and a subscription being created waits for a purge under way
    c.batch_execute("BEGIN; SELECT outbox_purge()").unwrap();
    let dsn = shared().dsn(&db);
    let subscriber = std::thread::spawn(move || {
        let mut s = Client::connect(&dsn, NoTls).unwrap();
        s.batch_execute("SELECT outbox_subscribe('later')").unwrap();
    });
    let waiting = "SELECT count(*) FROM pg_stat_activity WHERE wait_event_type = 'Lock' AND query LIKE '%outbox_subscribe%'";
    assert!(eventually(Duration::from_secs(10), || scalar_i64(&mut late, waiting) == 1), "the subscription waits");
    c.batch_execute("COMMIT").unwrap();
    subscriber.join().unwrap();
    assert_eq!(scalar_i64(&mut c, "SELECT count(*) FROM outbox_subscriptions WHERE name = 'later'"), 1);
}

/// A subscription with a sink is the delivery worker's: a consumer that claimed from one in
/// an open transaction held its lock and stalled the worker, and every sink with it.
#[test]
fn consumers_cannot_claim_ack_or_fail_in_a_subscription_with_a_sink() {
    let (_, mut c) = setup("sink_not_pull", "");
    c.batch_execute("SELECT outbox_subscribe('hook', 'http', '{\"url\": \"http://127.0.0.1:9/\"}', from_start => true)").unwrap();
    insert(&mut c, 1..=1);
    for sql in ["SELECT * FROM outbox_claim(10, 'hook')", "SELECT outbox_ack('{1}', 'hook')", "SELECT outbox_fail('{1}', 'x', 'hook')"] {
        let message = error_of(&mut c, sql);
        assert!(message.contains("subscription \"hook\" delivers to its http sink through the delivery worker"), "{sql}: {message}");
    }
    assert_eq!(scalar_i64(&mut c, "SELECT pending FROM outbox_backlog WHERE subscription = 'hook'"), 1);
    assert_eq!(ids(&claim(&mut c, "SELECT * FROM outbox_claim(10)")).len(), 1, "pull subscriptions are claimed as before");
}

/// Handed out after a newer event of their row, replayed or requeued events would leave the
/// copy at an older version than the table (or bring back a deleted row).
#[test]
fn replay_and_requeue_do_not_take_a_row_back_to_an_older_version() {
    let (_, mut c) = setup("replay_order", ", payload_columns => ARRAY['content']");
    c.batch_execute("SELECT outbox_subscribe('s', options => '{\"max_attempts\": 1}')").unwrap();
    let contents = |c: &mut Client, sql: &str| -> Vec<(i64, String)> {
        c.query(sql, &[]).unwrap().iter().map(|r| (r.get("id"), r.get::<_, serde_json::Value>("payload")["data"]["content"].to_string())).collect()
    };
    // row 1 at v1, then v2, both processed; v3 in flight
    c.batch_execute("INSERT INTO chunks VALUES (1, 1, 'v1', '{1}'), (2, 1, 'w1', '{1}')").unwrap();
    let first = contents(&mut c, "SELECT * FROM outbox_claim(10)");
    c.execute("SELECT outbox_ack($1)", &[&first.iter().map(|e| e.0).collect::<Vec<_>>()]).unwrap();
    c.batch_execute("UPDATE chunks SET content = 'v2' WHERE id = 1").unwrap();
    let second = contents(&mut c, "SELECT * FROM outbox_claim(10)");
    c.execute("SELECT outbox_ack($1)", &[&vec![second[0].0]]).unwrap();
    c.batch_execute("UPDATE chunks SET content = 'v3' WHERE id = 1").unwrap();
    let third = contents(&mut c, "SELECT * FROM outbox_claim(10, lease => '1 minute')");
    assert_eq!(third[0].1, "\"v3\"");
    // row 2's event comes back; row 1's do not, v3 will bring it up to date
    assert_eq!(scalar_i64(&mut c, "SELECT outbox_replay('default', since => now() - interval '1 hour')"), 1);
    c.execute("SELECT outbox_ack($1)", &[&vec![third[0].0]]).unwrap();
    let replayed = contents(&mut c, "SELECT * FROM outbox_claim(10)");
    assert_eq!(replayed.iter().map(|e| e.1.as_str()).collect::<Vec<_>>(), ["\"w1\""]);
    c.execute("SELECT outbox_ack($1)", &[&vec![replayed[0].0]]).unwrap();

    // in 's', row 1's first event and row 2's are dead; row 1 was deleted since
    let dead = contents(&mut c, "SELECT * FROM outbox_claim(2, 's')");
    c.execute("SELECT outbox_fail($1, 'bad', 's')", &[&dead.iter().map(|e| e.0).collect::<Vec<_>>()]).unwrap();
    c.batch_execute("DELETE FROM chunks WHERE id = 1").unwrap();
    loop {
        let rest = ids(&claim(&mut c, "SELECT * FROM outbox_claim(10, 's')"));
        if rest.is_empty() {
            break;
        }
        c.execute("SELECT outbox_ack($1, 's')", &[&rest]).unwrap();
    }
    assert_eq!(scalar_i64(&mut c, "SELECT outbox_requeue_dead('s')"), 1, "only row 2's");
    let requeued = contents(&mut c, "SELECT * FROM outbox_claim(10, 's')");
    assert_eq!(requeued.iter().map(|e| e.1.as_str()).collect::<Vec<_>>(), ["\"w1\""]);
    assert_eq!(scalar_i64(&mut c, "SELECT count(*) FROM outbox_dead_letters WHERE subscription = 's'"), 1, "row 1's stays dead");
    c.execute("SELECT outbox_ack($1, 's')", &[&requeued.iter().map(|e| e.0).collect::<Vec<_>>()]).unwrap();

    // a dead TRUNCATE stays dead once the table has newer rows: it would empty them
    c.batch_execute("TRUNCATE chunks").unwrap();
    let truncate = ids(&claim(&mut c, "SELECT * FROM outbox_claim(10, 's')"));
    c.execute("SELECT outbox_fail($1, 'bad', 's')", &[&truncate]).unwrap();
    c.batch_execute("INSERT INTO chunks VALUES (3, 1, 'x1', '{1}')").unwrap();
    let newer = ids(&claim(&mut c, "SELECT * FROM outbox_claim(10, 's')"));
    c.execute("SELECT outbox_ack($1, 's')", &[&newer]).unwrap();
    assert_eq!(scalar_i64(&mut c, &format!("SELECT outbox_requeue_dead('s', ARRAY[{}])", truncate[0])), 0);
}

/// Anything that runs SQL between a statement's row events (an audit trigger, a foreign-key
/// check) moves the current command id on, and a nested statement on an attached table wrote
/// the outer statement's events so far: either cut a key swap into runs that kept DELETE 1,
/// UPSERT 2, DELETE 2, UPSERT 1 in row order, and the copy lost key 1.
#[test]
fn a_key_swap_stays_one_run_when_triggers_run_sql_between_its_rows() {
    let (_, mut c) = setup("swap_audit", "");
    for audit_attached in [false, true] {
        c.batch_execute(
            "DROP TABLE IF EXISTS a, audit CASCADE;
             CREATE TABLE a (id int PRIMARY KEY DEFERRABLE INITIALLY DEFERRED, v text);
             CREATE TABLE audit (n serial PRIMARY KEY, old_id int);
             SELECT outbox_attach('a');
             INSERT INTO a VALUES (1, 'one'), (2, 'two');
             CREATE OR REPLACE FUNCTION audit_row() RETURNS trigger LANGUAGE plpgsql AS
                 $$ BEGIN INSERT INTO audit (old_id) VALUES (OLD.id); RETURN NULL; END $$;
             CREATE TRIGGER audit_row AFTER UPDATE ON a FOR EACH ROW EXECUTE FUNCTION audit_row();",
        )
        .unwrap();
        if audit_attached {
            c.batch_execute("SELECT outbox_attach('audit')").unwrap();
        }
        let before = scalar_i64(&mut c, "SELECT coalesce(max(id), 0) FROM outbox_events");
        c.batch_execute("UPDATE a SET id = 3 - id").unwrap();
        let events: Vec<(String, i64)> = c
            .query(
                "SELECT type, (payload->'key'->>'id')::int8 FROM outbox_events WHERE payload->>'table' = 'public.a' AND id > $1 ORDER BY id",
                &[&before],
            )
            .unwrap()
            .iter()
            .map(|r| (r.get(0), r.get(1)))
            .collect();
        let expected: Vec<(String, i64)> =
            [("EMBED_DELETE", 1), ("EMBED_DELETE", 2), ("EMBED_UPSERT", 2), ("EMBED_UPSERT", 1)]
                .iter()
                .map(|(t, k)| (t.to_string(), *k))
                .collect();
        assert_eq!(events, expected, "audit table attached: {audit_attached}");
        c.batch_execute("SELECT outbox_detach('a')").unwrap();
    }
}

#[test]
fn backlog_reports_every_state_and_latency() {
    let (_, mut c) = setup("backlog", "");
    c.batch_execute("SELECT outbox_subscribe('s', options => '{\"max_attempts\": 1}')").unwrap();
    insert(&mut c, 1..=4);
    let claimed = ids(&claim(&mut c, "SELECT * FROM outbox_claim(3, 's')"));
    c.execute("SELECT outbox_ack($1, 's')", &[&vec![claimed[0]]]).unwrap();
    c.execute("SELECT outbox_fail($1, 'bad', 's')", &[&vec![claimed[1]]]).unwrap();
    let row = c.query_one("SELECT * FROM outbox_backlog WHERE subscription = 's'", &[]).unwrap();
    assert_eq!(row.get::<_, i64>("pending"), 1);
    assert_eq!(row.get::<_, i64>("in_flight"), 1);
    assert_eq!(row.get::<_, i64>("retrying"), 0);
    assert_eq!(row.get::<_, i64>("dead"), 1);
    let ages = c
        .query_one(
            "SELECT extract(epoch FROM oldest_pending_age)::float8, extract(epoch FROM avg_propagation_latency)::float8 \
             FROM outbox_backlog WHERE subscription = 's'",
            &[],
        )
        .unwrap();
    let (age, latency): (f64, f64) = (ages.get(0), ages.get(1));
    assert!(age > 0.0 && age < 60.0, "{age}");
    assert!(latency > 0.0 && latency < 60.0, "{latency}");
    c.execute("SELECT outbox_fail($1, 'again', 's', retry_after => '1 hour')", &[&vec![claimed[2]]]).unwrap();
}

/// A claim that waited for its turn behind a claim in an open transaction gets its whole
/// lease: the lease starts when it has the subscription, not when it was asked for.
#[test]
fn a_lease_runs_from_when_the_claim_gets_its_turn() {
    let (db, mut first) = setup("lease_turn", "");
    insert(&mut first, 1..=3);
    first.batch_execute("BEGIN; SELECT * FROM outbox_claim(1)").unwrap();
    let waiting_db = db.clone();
    let waiting = std::thread::spawn(move || {
        let mut c = shared().connect(&waiting_db);
        let claimed = claim(&mut c, "SELECT * FROM outbox_claim(1, lease => '2 seconds')");
        (ids(&claimed), Instant::now())
    });
    std::thread::sleep(Duration::from_millis(2500)); // longer than the waiting claim's lease
    first.batch_execute("COMMIT").unwrap();
    let (leased, at) = waiting.join().unwrap();
    assert_eq!(leased.len(), 1);
    let mut third = shared().connect(&db);
    let others = ids(&claim(&mut third, "SELECT * FROM outbox_claim(10)"));
    assert!(at.elapsed() < Duration::from_secs(2), "the check ran within the lease");
    assert!(!others.contains(&leased[0]), "event {} went out again under a valid lease", leased[0]);
}

/// A statement that a trigger of a table not captured runs on a captured table (a `documents`
/// trigger that fills `chunks`) is captured like any other, and committed with its transaction.
#[test]
fn a_statement_run_by_a_trigger_of_another_table_is_captured() {
    let (_db, mut c) = setup("trigger_pipeline", "");
    c.batch_execute(
        "CREATE TABLE documents (id bigint PRIMARY KEY, body text);
         CREATE FUNCTION split_document() RETURNS trigger LANGUAGE plpgsql AS $$
         BEGIN
             INSERT INTO chunks SELECT NEW.id * 10 + g, NEW.id, NEW.body, '{0.5}' FROM generate_series(1, 3) g;
             RETURN NULL;
         END $$;
         CREATE TRIGGER split AFTER INSERT ON documents FOR EACH ROW EXECUTE FUNCTION split_document();
         BEGIN;
         INSERT INTO documents VALUES (1, 'a'), (2, 'b');",
    )
    .unwrap();
    c.batch_execute("COMMIT").unwrap();
    let keys: Vec<i64> = claim(&mut c, "SELECT * FROM outbox_claim(100)").iter().map(|e| e.2).collect();
    assert_eq!(keys, [11, 12, 13, 21, 22, 23]);
}

/// A late ack or fail of a retry hand-out whose lease has ended, committing while a claim
/// handles that hand-out, is not overridden by the claim: the claim waits for it, and then
/// neither buries the event the ack processed nor hands out the event the fail put off.
#[test]
fn a_late_ack_or_fail_of_an_expired_retry_wins_over_a_claim_running_meanwhile() {
    let (db, mut c) = setup("late_settle_vs_claim", "");
    c.batch_execute(
        "SELECT outbox_subscribe('acked', options => '{\"max_attempts\": 2}', from_start => true);
         SELECT outbox_subscribe('failed', options => '{\"max_attempts\": 5}', from_start => true)",
    )
    .unwrap();
    insert(&mut c, 1..=1);
    let mut observer = shared().connect(&db);
    for (subscription, settle) in [("acked", "SELECT outbox_ack($1, 'acked')"), ("failed", "SELECT outbox_fail($1, 'late', 'failed', '1 hour')")] {
        let first = ids(&claim(&mut c, &format!("SELECT * FROM outbox_claim(10, '{subscription}')")));
        c.execute("SELECT outbox_fail($1, 'boom', $2, '0')", &[&first, &subscription]).unwrap();
        let retried = claim(&mut c, &format!("SELECT * FROM outbox_claim(10, '{subscription}', '200 ms')"));
        assert_eq!((ids(&retried), retried[0].3), (first.clone(), 2));
        std::thread::sleep(Duration::from_millis(300)); // the hand-out's lease ends
        c.batch_execute("BEGIN").unwrap();
        assert_eq!(c.query_one(settle, &[&first]).unwrap().get::<_, i32>(0), 1, "{subscription}: a late settle counts");
        let claiming_db = db.clone();
        let sql = format!("SELECT * FROM outbox_claim(10, '{subscription}')");
        let claiming = std::thread::spawn(move || ids(&claim(&mut shared().connect(&claiming_db), &sql)));
        let waiting = "SELECT count(*) FROM pg_stat_activity WHERE wait_event_type = 'Lock' AND query LIKE '%outbox_claim(10, %'";
        assert!(eventually(Duration::from_secs(10), || scalar_i64(&mut observer, waiting) == 1), "{subscription}: the claim waits");
        c.batch_execute("COMMIT").unwrap();
        assert_eq!(claiming.join().unwrap(), Vec::<i64>::new(), "{subscription}: nothing to hand out");
        let dead = format!("SELECT count(*) FROM outbox_dead_letters WHERE subscription = '{subscription}'");
        assert_eq!(scalar_i64(&mut c, &dead), 0, "{subscription}: not dead");
    }
    assert_eq!(scalar_i64(&mut c, "SELECT count(*) FROM outbox_processed WHERE subscription = 'acked'"), 1);
    let put_off = "SELECT count(*) FROM outbox_retries WHERE visible_at > now() + interval '50 minutes' AND leased_until IS NULL";
    assert_eq!(scalar_i64(&mut c, put_off), 1, "the fail's retry_after holds");
}

/// An unsubscribe that waited for an open claim deletes what that claim recorded; retention
/// deletes what a fail committing meanwhile can still leave behind.
#[test]
fn unsubscribing_leaves_no_delivery_state_behind() {
    let (db, mut c) = setup("unsubscribe_open_claim", "");
    c.batch_execute("SELECT outbox_subscribe('leaving', from_start => true)").unwrap();
    insert(&mut c, 1..=3);
    c.batch_execute("BEGIN; SELECT * FROM outbox_claim(2, 'leaving')").unwrap();
    let removing_db = db.clone();
    let removing = std::thread::spawn(move || shared().connect(&removing_db).batch_execute("SELECT outbox_unsubscribe('leaving')"));
    std::thread::sleep(Duration::from_millis(500));
    c.batch_execute("COMMIT").unwrap();
    removing.join().unwrap().unwrap();
    let orphans = "SELECT (SELECT count(*) FROM outbox_claims WHERE subscription_id NOT IN (SELECT id FROM outbox_subscriptions)) \
                        + (SELECT count(*) FROM outbox_retries WHERE subscription_id NOT IN (SELECT id FROM outbox_subscriptions))";
    assert_eq!(scalar_i64(&mut c, orphans), 0);
    // such a row, as a racing fail leaves it, is gone after the next purge
    c.batch_execute(
        "INSERT INTO outbox_claims (subscription_id, claim_id, ledger_slot, expires_at, event_count, open_count, oldest_created_at) \
         VALUES (987654, 987654, 0, now() + interval '1 hour', 1, 1, now())",
    )
    .unwrap();
    c.batch_execute("SELECT outbox_purge()").unwrap();
    assert_eq!(scalar_i64(&mut c, orphans), 0);
}

/// Replay and requeue take the subscription as claims do: a newer event of the row that a
/// claim has in hand, or is about to hand out, is never followed by an older one.
#[test]
fn replay_and_requeue_racing_claims_never_put_an_older_event_after_a_newer_one() {
    let (db, mut c) = setup("replay_race", "");
    c.batch_execute("SELECT outbox_subscribe('r', options => '{\"max_attempts\": 1}', from_start => true)").unwrap();
    insert(&mut c, 1..=1);
    let first = ids(&claim(&mut c, "SELECT * FROM outbox_claim(10, 'r')"));
    c.execute("SELECT outbox_ack($1, 'r')", &[&first]).unwrap();
    c.batch_execute("UPDATE chunks SET content = 'v2' WHERE id = 1").unwrap();

    // a replay of the older event while a claim of the newer one is not yet committed
    c.batch_execute("BEGIN; SELECT * FROM outbox_claim(10, 'r')").unwrap();
    let replay_db = db.clone();
    let older = first.clone();
    let replay = std::thread::spawn(move || {
        shared().connect(&replay_db).query_one("SELECT outbox_replay('r', ids => $1)", &[&older]).unwrap().get::<_, i64>(0)
    });
    std::thread::sleep(Duration::from_millis(500));
    c.batch_execute("COMMIT").unwrap();
    assert_eq!(replay.join().unwrap(), 0, "the row has a newer event in flight");
    let newer: Vec<i64> = c.query("SELECT id FROM outbox_events WHERE id > $1", &[&first[0]]).unwrap().iter().map(|r| r.get(0)).collect();
    c.execute("SELECT outbox_ack($1, 'r')", &[&newer]).unwrap();
    assert!(claim(&mut c, "SELECT * FROM outbox_claim(10, 'r')").is_empty());

    // a requeue of a dead older event, still uncommitted while a newer one is written and claimed
    c.batch_execute("UPDATE chunks SET content = 'v3' WHERE id = 1").unwrap();
    let v3 = ids(&claim(&mut c, "SELECT * FROM outbox_claim(10, 'r')"));
    c.execute("SELECT outbox_fail($1, 'rejected', 'r')", &[&v3]).unwrap();
    assert_eq!(scalar_i64(&mut c, "SELECT count(*) FROM outbox_dead_letters WHERE subscription = 'r'"), 1);
    c.batch_execute("BEGIN; SELECT outbox_requeue_dead('r')").unwrap();
    let claim_db = db.clone();
    let claimer = std::thread::spawn(move || {
        let mut other = shared().connect(&claim_db);
        other.batch_execute("UPDATE chunks SET content = 'v4' WHERE id = 1").unwrap();
        let mut order = Vec::new();
        for _ in 0..3 {
            let got = ids(&claim(&mut other, "SELECT * FROM outbox_claim(10, 'r')"));
            other.execute("SELECT outbox_ack($1, 'r')", &[&got]).unwrap();
            order.extend(got);
        }
        order
    });
    std::thread::sleep(Duration::from_millis(500));
    c.batch_execute("COMMIT").unwrap();
    let order = claimer.join().unwrap();
    assert_eq!(order.first(), Some(&v3[0]), "the requeued event goes first: {order:?}");
    assert!(order.windows(2).all(|w| w[0] < w[1]), "{order:?}");
}

/// A REPEATABLE READ writer whose snapshot was taken before `outbox_attach` captures with the
/// settings of the triggers it fires.
#[test]
fn a_repeatable_read_writer_captures_with_the_settings_attached_after_its_snapshot() {
    let (db, mut c) = setup("attach_after_snapshot", "");
    c.batch_execute("CREATE TABLE rr_docs (id int PRIMARY KEY, v int)").unwrap();
    let mut writer = shared().connect(&db);
    for (prefix, id) in [("FIRST", 1), ("SECOND", 2)] {
        writer.batch_execute("BEGIN ISOLATION LEVEL REPEATABLE READ; SELECT 1").unwrap();
        c.execute("SELECT outbox_attach('rr_docs', payload_columns => ARRAY['v'], event_prefix => $1)", &[&prefix]).unwrap();
        writer.batch_execute(&format!("INSERT INTO rr_docs VALUES ({id}, {id}); COMMIT")).unwrap();
        let row = c
            .query_one("SELECT type, payload->'data' FROM outbox_events WHERE payload->>'table' = 'public.rr_docs' ORDER BY id DESC LIMIT 1", &[])
            .unwrap();
        assert_eq!(row.get::<_, String>(0), format!("{prefix}_UPSERT"));
        assert_eq!(row.get::<_, serde_json::Value>(1), serde_json::json!({"v": id}));
    }
}

/// The oldest pending age counts only events not yet processed, also within a claim that was
/// acked or failed in part.
#[test]
fn oldest_pending_age_leaves_out_the_settled_part_of_a_claim() {
    let (_, mut c) = setup("oldest_partial", "");
    insert(&mut c, 1..=1);
    std::thread::sleep(std::time::Duration::from_secs(3));
    insert(&mut c, 2..=3);
    let oldest = |c: &mut Client| -> f64 {
        c.query_one("SELECT extract(epoch FROM oldest_pending_age)::float8 FROM outbox_backlog WHERE subscription = 'default'", &[])
            .unwrap()
            .get(0)
    };
    let claimed = ids(&claim(&mut c, "SELECT * FROM outbox_claim(3)"));
    assert!(oldest(&mut c) >= 3.0);
    c.execute("SELECT outbox_ack($1)", &[&vec![claimed[0]]]).unwrap();
    let age = oldest(&mut c);
    assert!(age < 2.0, "the acked event still counts: {age}");
    c.execute("SELECT outbox_fail($1, 'x', retry_after => '1 hour')", &[&vec![claimed[1]]]).unwrap();
    assert!(oldest(&mut c) < 2.0);
}

/// The backlog counts the log past each subscription's last handed-out id in one pass for
/// all of them, and below it row by row against the subscription's snapshots. Three
/// subscriptions at three points, a straggler among them: each one's `pending` and oldest
/// pending event are what its claims then hand out.
#[test]
fn pending_is_what_claims_hand_out_wherever_each_subscription_is() {
    let (db, mut c) = setup("pending_reach", "");
    c.batch_execute("SELECT outbox_subscribe('partway'); SELECT outbox_subscribe('untouched')").unwrap();
    let mut early = shared().connect(&db);
    early.batch_execute("BEGIN; INSERT INTO chunks VALUES (1000, 1, 'early', '{1}')").unwrap(); // the lowest id
    c.batch_execute("INSERT INTO chunks SELECT g, 1, 'bulk', '{1}' FROM generate_series(1, 50) g").unwrap(); // one log row
    // 'partway' has handed out the bulk row's first event only: its cursor is the row's base
    let first = claim(&mut c, "SELECT * FROM outbox_claim(1, 'partway')");
    assert_eq!(first.iter().map(|e| e.2).collect::<Vec<_>>(), [1]);
    insert(&mut c, 51..=60);
    // 'default' is past the bulk row and five single rows, the early transaction still running
    assert_eq!(claim(&mut c, "SELECT * FROM outbox_claim(55)").len(), 55);
    early.batch_execute("COMMIT").unwrap();
    insert(&mut c, 61..=65);

    for (subscription, expected) in [("default", 11), ("partway", 65), ("untouched", 66)] {
        let row = c
            .query_one(
                "SELECT pending, extract(epoch FROM now() - oldest_pending_age)::float8 FROM outbox_backlog WHERE subscription = $1",
                &[&subscription],
            )
            .unwrap();
        let (pending, oldest): (i64, f64) = (row.get(0), row.get(1));
        let mut handed_out = Vec::new();
        loop {
            let batch = c
                .query("SELECT id, extract(epoch FROM created_at)::float8 FROM outbox_claim(7, $1)", &[&subscription])
                .unwrap();
            if batch.is_empty() {
                break;
            }
            handed_out.extend(batch.iter().map(|r| (r.get::<_, i64>(0), r.get::<_, f64>(1))));
        }
        assert_eq!(pending, handed_out.len() as i64, "{subscription}: pending is what its claims hand out");
        assert_eq!(pending, expected, "{subscription}");
        let first_captured = handed_out.iter().map(|e| e.1).fold(f64::MAX, f64::min);
        assert!((oldest - first_captured).abs() < 0.001, "{subscription}: oldest pending {oldest}, first handed out {first_captured}");
    }
}

#[test]
fn a_write_aimed_at_a_partition_is_captured_at_commit() {
    let cluster = shared();
    let db = cluster.database("partition_direct");
    let mut c = cluster.connect(&db);
    c.batch_execute(
        "CREATE TABLE parts (id int, region text, PRIMARY KEY (id, region)) PARTITION BY LIST (region);
         CREATE TABLE parts_eu PARTITION OF parts FOR VALUES IN ('eu');
         SELECT outbox_attach('parts');",
    )
    .unwrap();
    // the parent's statement trigger does not fire: the events are written at commit
    c.batch_execute("INSERT INTO parts_eu VALUES (1, 'eu')").unwrap();
    std::thread::sleep(Duration::from_millis(1100)); // past the cached segment, so commit reads it
    c.batch_execute("INSERT INTO parts_eu VALUES (2, 'eu')").unwrap();
    let claimed = c.query("SELECT payload FROM outbox_claim(10)", &[]).unwrap();
    let keys: Vec<serde_json::Value> = claimed.iter().map(|r| r.get::<_, serde_json::Value>(0)["key"].clone()).collect();
    assert_eq!(keys, [serde_json::json!({"id": 1, "region": "eu"}), serde_json::json!({"id": 2, "region": "eu"})]);
}

#[test]
fn metrics_report_backlog_counters_and_latency_per_subscription() {
    let (_, mut c) = setup("metrics", "");
    c.batch_execute(
        "SELECT outbox_subscribe('s', options => '{\"max_attempts\": 1}');
         CREATE FUNCTION public.mirror(jsonb) RETURNS void LANGUAGE sql AS '';
         SELECT outbox_subscribe('fn', 'function', '{\"function\": \"public.mirror\"}');",
    )
    .unwrap();
    insert(&mut c, 1..=5);
    let claimed = ids(&claim(&mut c, "SELECT * FROM outbox_claim(4, 's')"));
    c.execute("SELECT outbox_ack($1, 's')", &[&claimed[..2].to_vec()]).unwrap();
    c.execute("SELECT outbox_fail($1, 'bad', 's')", &[&vec![claimed[2]]]).unwrap();
    let metrics: String = c.query_one("SELECT outbox_metrics()", &[]).unwrap().get(0);

    let s = |name: &str| sample(&metrics, &format!("{name}{{subscription=\"s\"}}")).unwrap();
    assert_eq!(s("outbox_backlog_events"), 2.0, "one pending and one in flight");
    assert_eq!(s("outbox_pending_events"), 1.0);
    assert_eq!(s("outbox_in_flight_events"), 1.0);
    assert_eq!(s("outbox_dead_letter_events"), 1.0);
    assert_eq!(s("outbox_delivered_total"), 2.0);
    assert_eq!(s("outbox_failures_total"), 1.0);
    assert_eq!(s("outbox_dead_lettered_total"), 1.0);
    assert!(s("outbox_oldest_pending_age_seconds") > 0.0);
    assert_eq!(s("outbox_propagation_latency_seconds_count"), 2.0);
    assert_eq!(sample(&metrics, "outbox_propagation_latency_seconds_bucket{subscription=\"s\",le=\"+Inf\"}").unwrap(), 2.0);
    assert!(s("outbox_propagation_latency_seconds_sum") > 0.0);
    assert_eq!(sample(&metrics, "outbox_backlog_events{subscription=\"default\"}").unwrap(), 5.0);
    assert_eq!(sample(&metrics, "outbox_sink_up{subscription=\"fn\"}").unwrap(), 1.0, "a sink not backing off is up");
    assert!(!metrics.contains("outbox_sink_up{subscription=\"s\"}"), "pull subscriptions have no sink");
    assert_eq!(sample(&metrics, "outbox_worker_up").unwrap(), 0.0, "this cluster does not preload the worker");

    promtool_check_metrics(&metrics);
}

/// Every lease that runs out is a failed delivery once a claim finds it, the first hand-out's
/// and each later one's alike, and the last one allowed a dead letter as well.
#[test]
fn every_expired_lease_counts_as_a_failure() {
    let (_, mut c) = setup("expiries_counted", "");
    c.batch_execute("SELECT outbox_subscribe('s', options => '{\"max_attempts\": 3}')").unwrap();
    insert(&mut c, 1..=1);
    let counters = |c: &mut Client| -> (f64, f64) {
        let metrics: String = c.query_one("SELECT outbox_metrics()", &[]).unwrap().get(0);
        let s = |name: &str| sample(&metrics, &format!("{name}{{subscription=\"s\"}}")).unwrap();
        (s("outbox_failures_total"), s("outbox_dead_lettered_total"))
    };
    for attempt in 1..=3 {
        let claimed = claim(&mut c, "SELECT * FROM outbox_claim(1, 's', lease => '300 milliseconds')");
        assert_eq!(claimed.iter().map(|e| e.3).collect::<Vec<_>>(), [attempt], "hand-out {attempt}");
        assert_eq!(counters(&mut c), (f64::from(attempt - 1), 0.0), "each lease before hand-out {attempt} counted once");
        std::thread::sleep(Duration::from_millis(400));
    }
    assert!(claim(&mut c, "SELECT * FROM outbox_claim(1, 's')").is_empty(), "three hand-outs are all it gets");
    assert_eq!(counters(&mut c), (3.0, 1.0));
}

/// Every ack adds to the minute's delivery counters and keeps their row locked until it
/// commits. The counters are spread over rows by backend, so consumers' acks do not wait for
/// each other, and every reader sums the rows.
#[test]
fn acks_of_two_consumers_do_not_wait_for_each_other() {
    let (db, mut a) = setup("acks_side_by_side", "");
    insert(&mut a, 1..=40);
    let mut acked = 0;
    // which counter row a backend's acks go to: the microseconds of its bucket
    let mut shard_of = |c: &mut Client| -> i64 {
        let rows = |c: &mut Client| -> Vec<(i64, i64)> {
            c.query("SELECT (extract(microseconds FROM bucket))::int8 % 1000000, acked FROM outbox_stats WHERE bucket > '-infinity'", &[])
                .unwrap()
                .iter()
                .map(|r| (r.get(0), r.get(1)))
                .collect()
        };
        let before = rows(c);
        let id = ids(&claim(c, "SELECT * FROM outbox_claim(1)"));
        c.execute("SELECT outbox_ack($1)", &[&id]).unwrap();
        acked += 1;
        rows(c).into_iter().find(|row| !before.contains(row)).expect("the ack counted itself").0
    };
    let shard_a = shard_of(&mut a);
    // connections stay open, so that each new one takes another backend slot
    let mut others = Vec::new();
    let mut b = loop {
        let mut c = shared().connect(&db);
        if shard_of(&mut c) != shard_a {
            break c;
        }
        others.push(c);
        assert!(others.len() < 16, "sixteen backends all count into one row");
    };
    let first = ids(&claim(&mut a, "SELECT * FROM outbox_claim(10)"));
    let second = ids(&claim(&mut b, "SELECT * FROM outbox_claim(10)"));

    a.batch_execute("BEGIN").unwrap();
    a.execute("SELECT outbox_ack($1)", &[&first]).unwrap();
    // with one counter row a minute, this ack would wait for the first to commit
    b.batch_execute("SET statement_timeout = '5s'").unwrap();
    assert_eq!(b.query_one("SELECT outbox_ack($1)", &[&second]).unwrap().get::<_, i32>(0), 10);
    a.batch_execute("COMMIT").unwrap();
    acked += 20;

    let metrics: String = a.query_one("SELECT outbox_metrics()", &[]).unwrap().get(0);
    let total = |series: &str| sample(&metrics, &format!("{series}{{subscription=\"default\"}}")).unwrap();
    assert_eq!(total("outbox_delivered_total"), acked as f64);
    assert_eq!(total("outbox_propagation_latency_seconds_count"), acked as f64);
    assert!(scalar_i64(&mut a, "SELECT count(*) FROM outbox_stats WHERE bucket > '-infinity'") >= 2, "a row per shard");
    let latency: Option<f64> = a
        .query_one("SELECT extract(epoch FROM avg_propagation_latency)::float8 FROM outbox_backlog WHERE subscription = 'default'", &[])
        .unwrap()
        .get(0);
    assert!(latency.is_some_and(|l| l > 0.0), "the backlog view averages over the rows: {latency:?}");
}

#[test]
fn p99_latency_interpolates_inside_its_histogram_bucket() {
    let (_, mut c) = setup("p99", "");
    insert(&mut c, 1..=3);
    let claimed = ids(&claim(&mut c, "SELECT * FROM outbox_claim(10)"));
    std::thread::sleep(Duration::from_millis(1100));
    c.execute("SELECT outbox_ack($1)", &[&claimed]).unwrap();
    let row = c
        .query_one(
            "SELECT extract(epoch FROM avg_propagation_latency)::float8, extract(epoch FROM p99_propagation_latency)::float8 \
             FROM outbox_backlog WHERE subscription = 'default'",
            &[],
        )
        .unwrap();
    let (avg, p99): (f64, f64) = (row.get(0), row.get(1));
    assert!(avg > 1.1 && avg < 2.5, "{avg}");
    // all three latencies fall in the bucket (1s, 2.5s]: the 99th percentile sits 99% of the way in
    assert!((p99 - 2.485).abs() < 1e-6, "{p99}");
}

#[test]
fn replayable_lists_what_replay_would_touch() {
    let (_, mut c) = setup("replayable", "");
    insert(&mut c, 1..=4);
    let claimed = ids(&claim(&mut c, "SELECT * FROM outbox_claim(3)"));
    c.execute("SELECT outbox_ack($1)", &[&claimed[..2].to_vec()]).unwrap();
    let replayable = |c: &mut Client, sql: &str| -> Vec<i64> { c.query(sql, &[]).unwrap().iter().map(|r| r.get(0)).collect() };
    assert_eq!(
        replayable(&mut c, "SELECT outbox_replayable('default', since => now() - interval '1 hour')"),
        claimed[..2].to_vec(),
        "in-flight and never handed out events are not replayable"
    );
    assert_eq!(replayable(&mut c, &format!("SELECT outbox_replayable('default', ids => ARRAY[{}])", claimed[1])), vec![claimed[1]]);
    assert!(replayable(&mut c, "SELECT outbox_replayable('default', since => now() + interval '1 hour')").is_empty());
    assert_eq!(scalar_i64(&mut c, "SELECT count(*) FROM outbox_retries"), 0, "listing replays nothing");
    assert_eq!(error_of(&mut c, "SELECT outbox_replayable('nope', since => now())"), "outbox: subscription \"nope\" does not exist");
}

#[test]
fn purging_dead_letters_keeps_the_recent_ones() {
    let (_, mut c) = setup("purge_dead", "");
    c.batch_execute(
        "SELECT outbox_subscribe('a', options => '{\"max_attempts\": 1}');
         SELECT outbox_subscribe('b', options => '{\"max_attempts\": 1}');",
    )
    .unwrap();
    insert(&mut c, 1..=3);
    for sub in ["a", "b"] {
        let claimed = ids(&claim(&mut c, &format!("SELECT * FROM outbox_claim(10, '{sub}')")));
        c.execute("SELECT outbox_fail($1, 'bad', $2)", &[&claimed, &sub]).unwrap();
    }
    c.batch_execute("UPDATE outbox_dead_letters SET failed_at = now() - interval '2 days' WHERE event_id = (SELECT min(event_id) FROM outbox_dead_letters)").unwrap();
    assert_eq!(scalar_i64(&mut c, "SELECT outbox_purge_dead_letters(interval '7000 years')"), 0, "older than time itself");
    assert_eq!(scalar_i64(&mut c, "SELECT outbox_purge_dead_letters(interval '1 day', 'a')"), 1);
    assert_eq!(scalar_i64(&mut c, "SELECT count(*) FROM outbox_dead_letters WHERE subscription = 'a'"), 2);
    assert_eq!(scalar_i64(&mut c, "SELECT count(*) FROM outbox_dead_letters WHERE subscription = 'b'"), 3);
    assert_eq!(scalar_i64(&mut c, "SELECT outbox_purge_dead_letters(interval '1 day')"), 1, "then b's old one");
    assert_eq!(scalar_i64(&mut c, "SELECT outbox_purge_dead_letters(interval '0')"), 4);
    assert_eq!(
        error_of(&mut c, "SELECT outbox_purge_dead_letters(interval '-1 day')"),
        "outbox: older_than must not be negative, got -1 days"
    );
}

#[test]
fn drop_extension_refuses_while_tables_are_attached_and_cascade_leaves_them_working() {
    let (_, mut c) = setup("drop_extension", "");
    insert(&mut c, 1..=1);
    let refused = error_of(&mut c, "DROP EXTENSION outbox");
    assert!(refused.contains("cannot drop extension outbox because other objects depend on it"), "{refused}");
    assert_eq!(scalar_i64(&mut c, "SELECT count(*) FROM outbox_events"), 1, "nothing was dropped");
    c.batch_execute("DROP EXTENSION outbox CASCADE").unwrap();
    insert(&mut c, 2..=2);
    assert_eq!(scalar_i64(&mut c, "SELECT count(*) FROM chunks"), 2, "the table works without capture");
    assert_eq!(scalar_i64(&mut c, "SELECT count(*) FROM pg_trigger WHERE tgrelid = 'chunks'::regclass"), 0);
}

/// An ack first reads the claim its backend made last (src/consume.rs): ids of another
/// consumer's claim, of an older claim, and a mix of them are acked all the same, once each,
/// and so are fails.
#[test]
fn acks_and_fails_reach_every_claim_not_only_the_last() {
    let (db, mut a) = setup("acks_across_claims", "");
    insert(&mut a, 1..=12);
    let mut b = shared().connect(&db);
    let first = ids(&claim(&mut a, "SELECT * FROM outbox_claim(3)"));
    let others = ids(&claim(&mut b, "SELECT * FROM outbox_claim(3)"));
    let last = ids(&claim(&mut a, "SELECT * FROM outbox_claim(3)"));
    let fourth = ids(&claim(&mut b, "SELECT * FROM outbox_claim(3)"));
    let ack = |c: &mut Client, ids: &[i64]| -> i32 { c.query_one("SELECT outbox_ack($1)", &[&ids]).unwrap().get(0) };
    assert_eq!(ack(&mut a, &others), 3, "another consumer's claim");
    assert_eq!(ack(&mut a, &[first.clone(), vec![last[0]]].concat()), 4, "an older claim and the last one together");
    assert_eq!(ack(&mut a, &last), 2, "the rest of the last claim");
    assert_eq!(ack(&mut a, &last), 0, "acked before");
    let failed: i32 = a.query_one("SELECT outbox_fail($1, 'x')", &[&fourth]).unwrap().get(0);
    assert_eq!(failed, 3, "fails of another consumer's claim");
    assert_eq!(scalar_i64(&mut a, "SELECT in_flight FROM outbox_backlog WHERE subscription = 'default'"), 0);
    assert_eq!(scalar_i64(&mut a, "SELECT retrying FROM outbox_backlog WHERE subscription = 'default'"), 3);
}

/// DETACH PARTITION CONCURRENTLY runs in transactions of its own, outside any block (so the
/// pg_tests cannot run it): the partition's rows still leave the attached table as DELETEs,
/// which a consumer receives.
#[test]
fn a_partition_detached_concurrently_is_delivered_as_deletes() {
    let (_, mut c) = setup("detach_concurrently", "");
    c.batch_execute(
        "CREATE TABLE docs (id int PRIMARY KEY, body text) PARTITION BY RANGE (id);
         CREATE TABLE docs_a PARTITION OF docs FOR VALUES FROM (0) TO (10);
         CREATE TABLE docs_b PARTITION OF docs FOR VALUES FROM (10) TO (20);
         SELECT outbox_attach('docs');
         SELECT outbox_subscribe('copy');
         INSERT INTO docs VALUES (1, 'a'), (2, 'a'), (11, 'b');",
    )
    .unwrap();
    c.batch_execute("ALTER TABLE docs DETACH PARTITION docs_a CONCURRENTLY").unwrap();
    assert_eq!(drain(&mut c, "copy"), typed(&[("EMBED_UPSERT", 1), ("EMBED_UPSERT", 2), ("EMBED_UPSERT", 11), ("EMBED_DELETE", 1), ("EMBED_DELETE", 2)]));
}

/// (type, key id) pairs as `drain` returns them.
fn typed(events: &[(&str, i64)]) -> Vec<(String, i64)> {
    events.iter().map(|(t, k)| (t.to_string(), *k)).collect()
}

/// Waits until backend `pid` of database `db` waits for a lock.
fn waits_for_a_lock(db: &str, pid: i32) {
    let mut watcher = shared().connect(db);
    let sql = format!("SELECT count(*) FROM pg_stat_activity WHERE pid = {pid} AND wait_event_type = 'Lock'");
    assert!(eventually(Duration::from_secs(10), || scalar_i64(&mut watcher, &sql) == 1), "backend {pid} waits for a lock");
}

/// The type and key id (0 for a TRUNCATE) of every event `subscription` is handed, in order,
/// each batch acked.
fn drain(c: &mut Client, subscription: &str) -> Vec<(String, i64)> {
    let mut events = Vec::new();
    loop {
        let batch = c
            .query(
                "SELECT id, type, coalesce((payload->'key'->>'id')::int8, 0) FROM outbox_claim(10, $1) ORDER BY id",
                &[&subscription],
            )
            .unwrap();
        if batch.is_empty() {
            return events;
        }
        let ids: Vec<i64> = batch.iter().map(|r| r.get(0)).collect();
        events.extend(batch.iter().map(|r| (r.get(1), r.get(2))));
        c.execute("SELECT outbox_ack($1, $2)", &[&ids, &subscription]).unwrap();
    }
}

/// A DETACH … CONCURRENTLY cancelled in its wait leaves the partition detach-pending: still a
/// partition, no longer seen through its parent. Writes to it are still captured (they failed
/// with "not attached"), a sub-partition dropped meanwhile is captured as DELETEs (it was
/// missed), and the FINALIZE that ends the detach captures the rest.
#[test]
fn an_interrupted_concurrent_detach_loses_nothing() {
    let (db, mut c) = setup("detach_pending", "");
    c.batch_execute(
        "CREATE TABLE docs (id int PRIMARY KEY) PARTITION BY RANGE (id);
         CREATE TABLE docs_a PARTITION OF docs FOR VALUES FROM (0) TO (100) PARTITION BY RANGE (id);
         CREATE TABLE docs_a1 PARTITION OF docs_a FOR VALUES FROM (0) TO (50);
         CREATE TABLE docs_a2 PARTITION OF docs_a FOR VALUES FROM (50) TO (100);
         SELECT outbox_attach('docs');
         SELECT outbox_subscribe('copy');
         INSERT INTO docs VALUES (1), (51);",
    )
    .unwrap();
    // an old snapshot makes the detach wait, and it is cancelled there
    let mut holder = shared().connect(&db);
    holder.batch_execute("BEGIN ISOLATION LEVEL REPEATABLE READ; SELECT count(*) FROM docs").unwrap();
    let mut detacher = shared().connect(&db);
    let pid: i32 = detacher.query_one("SELECT pg_backend_pid()", &[]).unwrap().get(0);
    let detach = std::thread::spawn(move || detacher.batch_execute("ALTER TABLE docs DETACH PARTITION docs_a CONCURRENTLY"));
    waits_for_a_lock(&db, pid);
    c.execute("SELECT pg_cancel_backend($1)", &[&pid]).unwrap();
    assert!(detach.join().unwrap().is_err(), "cancelled");
    holder.batch_execute("COMMIT").unwrap();
    assert!(scalar_i64(&mut c, "SELECT count(*) FROM pg_inherits WHERE inhdetachpending") == 1, "detach pending");

    c.batch_execute("INSERT INTO docs_a1 VALUES (2)").unwrap();
    c.batch_execute("DROP TABLE docs_a2").unwrap();
    c.batch_execute("ALTER TABLE docs DETACH PARTITION docs_a FINALIZE").unwrap();
    assert_eq!(
        drain(&mut c, "copy"),
        typed(&[("EMBED_UPSERT", 1), ("EMBED_UPSERT", 51), ("EMBED_UPSERT", 2), ("EMBED_DELETE", 51), ("EMBED_DELETE", 1), ("EMBED_DELETE", 2)])
    );
}

/// A DROP TABLE naming a plain table before a partition of an attached tree takes its locks
/// in the order it names them, as Postgres does: a writer holding the plain table and then
/// writing to the partitioned one waits for no one (the partition's parent was locked first,
/// and the two deadlocked).
#[test]
fn dropping_a_table_and_a_partition_locks_in_the_order_named() {
    let (db, mut c) = setup("drop_lock_order", "");
    c.batch_execute(
        "CREATE TABLE t (id int);
         CREATE TABLE docs (id int PRIMARY KEY) PARTITION BY RANGE (id);
         CREATE TABLE docs_a PARTITION OF docs FOR VALUES FROM (0) TO (10);
         CREATE TABLE docs_b PARTITION OF docs FOR VALUES FROM (10) TO (20);
         SELECT outbox_attach('docs');
         SELECT outbox_subscribe('copy');
         INSERT INTO docs VALUES (1), (11);",
    )
    .unwrap();
    c.batch_execute("BEGIN; INSERT INTO t VALUES (1)").unwrap();
    let mut dropper = shared().connect(&db);
    let pid: i32 = dropper.query_one("SELECT pg_backend_pid()", &[]).unwrap().get(0);
    let drop = std::thread::spawn(move || dropper.batch_execute("DROP TABLE t, docs_a"));
    waits_for_a_lock(&db, pid);
    c.batch_execute("INSERT INTO docs VALUES (12); COMMIT").unwrap();
    drop.join().unwrap().unwrap();
    assert_eq!(drain(&mut c, "copy"), typed(&[("EMBED_UPSERT", 1), ("EMBED_UPSERT", 11), ("EMBED_UPSERT", 12), ("EMBED_DELETE", 1)]));
}

/// DROP SCHEMA … CASCADE and DROP OWNED name no table: what they drop is listed first, and a
/// session holding a partition meanwhile can move it out of the schema, give it to another
/// owner or make a new one. Each drop captures what it drops once it holds the locks, and
/// nothing else, whatever its isolation level. DROP OWNED … CASCADE takes the roles' schemas
/// with what is in them, and a role that may not drop a schema, or a DROP OWNED of the
/// bootstrap superuser, is refused at once, without waiting for the attached table.
#[test]
fn schema_and_owner_drops_capture_what_they_drop_once_they_hold_the_locks() {
    let (db, mut c) = setup("drops_settle", "");
    c.batch_execute(
        "DROP ROLE IF EXISTS outbox_drops_r1; DROP ROLE IF EXISTS outbox_drops_r2; DROP ROLE IF EXISTS outbox_drops_r3;
         CREATE ROLE outbox_drops_r1; CREATE ROLE outbox_drops_r2 LOGIN; CREATE ROLE outbox_drops_r3;
         CREATE TABLE m (id int PRIMARY KEY) PARTITION BY RANGE (id);
         CREATE SCHEMA a; CREATE SCHEMA elsewhere;
         CREATE TABLE a.p1 PARTITION OF m FOR VALUES FROM (0) TO (100);
         CREATE TABLE a.p2 PARTITION OF m FOR VALUES FROM (100) TO (200);
         CREATE TABLE q1 PARTITION OF m FOR VALUES FROM (200) TO (300);
         ALTER TABLE q1 OWNER TO outbox_drops_r1;
         CREATE SCHEMA r3_schema AUTHORIZATION outbox_drops_r3;
         CREATE TABLE r3_schema.p PARTITION OF m FOR VALUES FROM (400) TO (500);
         INSERT INTO m VALUES (1), (101), (201), (401);
         SELECT outbox_attach('m');
         SELECT outbox_subscribe('copy');",
    )
    .unwrap();
    let run_waiting = |sql: &'static str| {
        let db = db.clone();
        let (pid_sender, pid) = std::sync::mpsc::channel();
        let handle = std::thread::spawn(move || {
            let mut d = shared().connect(&db);
            pid_sender.send(d.query_one("SELECT pg_backend_pid()", &[]).unwrap().get::<_, i32>(0)).unwrap();
            d.batch_execute(sql).unwrap();
        });
        (pid.recv().unwrap(), handle)
    };

    // a partition moved out of the schema while the drop waits for it stays, and is not
    // deleted, under REPEATABLE READ too (the drop's snapshot predates the move)
    let mut b = shared().connect(&db);
    b.batch_execute("BEGIN; ALTER TABLE a.p1 SET SCHEMA elsewhere").unwrap();
    let (pid, dropping) = run_waiting("BEGIN ISOLATION LEVEL REPEATABLE READ; SELECT 1; DROP SCHEMA a CASCADE; COMMIT");
    waits_for_a_lock(&db, pid);
    b.batch_execute("COMMIT").unwrap();
    dropping.join().unwrap();
    assert_eq!(drain(&mut c, "copy"), typed(&[("EMBED_DELETE", 101)]), "only the partition the drop dropped");

    // a partition made and given to the role while DROP OWNED waits goes with the role's others
    b.batch_execute(
        "BEGIN; CREATE TABLE q2 PARTITION OF m FOR VALUES FROM (300) TO (400); ALTER TABLE q2 OWNER TO outbox_drops_r1;
         INSERT INTO m VALUES (301)",
    )
    .unwrap();
    let (pid, dropping) = run_waiting("DROP OWNED BY outbox_drops_r1");
    waits_for_a_lock(&db, pid);
    b.batch_execute("COMMIT").unwrap();
    dropping.join().unwrap();
    assert_eq!(drain(&mut c, "copy"), typed(&[("EMBED_UPSERT", 301), ("EMBED_DELETE", 201), ("EMBED_DELETE", 301)]));

    // DROP OWNED … CASCADE drops the role's schema, and the partition in it owned by another
    c.batch_execute("DROP OWNED BY outbox_drops_r3 CASCADE").unwrap();
    assert_eq!(drain(&mut c, "copy"), typed(&[("EMBED_DELETE", 401)]));

    // a role that may not drop the schema waits for nothing before it is refused
    b.batch_execute("BEGIN; LOCK m IN ACCESS SHARE MODE").unwrap();
    let mut r2 = Client::connect(&format!("{} user=outbox_drops_r2", shared().dsn(&db)), NoTls).unwrap();
    r2.batch_execute("SET statement_timeout = '5s'").unwrap();
    let error = error_of(&mut r2, "DROP SCHEMA elsewhere CASCADE");
    assert!(error.contains("must be owner of schema elsewhere"), "{error}");
    c.batch_execute("SET statement_timeout = '5s'").unwrap();
    let error = error_of(&mut c, "DROP OWNED BY postgres");
    assert!(error.contains("required by the database system"), "{error}");
    c.batch_execute("RESET statement_timeout").unwrap();
    b.batch_execute("ROLLBACK").unwrap();
    c.batch_execute("INSERT INTO m VALUES (2)").unwrap();
    assert_eq!(drain(&mut c, "copy"), typed(&[("EMBED_UPSERT", 2)]), "the moved partition is captured as before");
    c.batch_execute("DROP TABLE m; DROP ROLE outbox_drops_r1; DROP ROLE outbox_drops_r2; DROP ROLE outbox_drops_r3").unwrap();
}
