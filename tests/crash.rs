//! Postgres killed (`pg_ctl stop -m immediate`) while writers commit and a consumer drains:
//! after restart every committed change has exactly one event, every event is delivered, and
//! only events that were in flight at the crash are delivered twice.
#![cfg(not(feature = "pg_test"))] // run by scripts/test.sh against the installed extension, not by cargo pgrx test

mod common;

use std::collections::{HashMap, HashSet};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use common::*;

#[test]
fn committed_events_survive_an_immediate_stop() {
    let cluster = Arc::new(Cluster::start(&[]));
    let db = cluster.database("crash");
    let mut setup = cluster.connect(&db);
    chunks(&mut setup, "");
    drop(setup);

    let stop = Arc::new(AtomicBool::new(false));
    let writers: Vec<_> = (0..2i64)
        .map(|w| {
            let (cluster, db, stop) = (cluster.clone(), db.clone(), stop.clone());
            std::thread::spawn(move || {
                let mut client = cluster.connect(&db);
                let mut id = w * 1_000_000;
                while !stop.load(Ordering::Relaxed) {
                    id += 1;
                    // one row per transaction; some rows get a second change
                    let sql = format!(
                        "BEGIN; INSERT INTO chunks VALUES ({id}, 1, 'x', '{{1}}'); {} COMMIT",
                        if id % 3 == 0 { format!("UPDATE chunks SET content = 'y' WHERE id = {id};") } else { String::new() }
                    );
                    if client.batch_execute(&sql).is_err() {
                        break;
                    }
                }
            })
        })
        .collect();

    // delivered: how often each event was handed to the consumer; in_doubt: claimed, ack not confirmed
    let delivered = Arc::new(Mutex::new(HashMap::<i64, u32>::new()));
    let in_doubt = Arc::new(Mutex::new(HashSet::<i64>::new()));
    let consumer = {
        let (cluster, db, stop) = (cluster.clone(), db.clone(), stop.clone());
        let (delivered, in_doubt) = (delivered.clone(), in_doubt.clone());
        std::thread::spawn(move || {
            let mut client = cluster.connect(&db);
            while !stop.load(Ordering::Relaxed) {
                let Ok(rows) = client.query("SELECT id FROM outbox_claim(50, lease => '1 second')", &[]) else { break };
                let ids: Vec<i64> = rows.iter().map(|r| r.get(0)).collect();
                {
                    let mut d = delivered.lock().unwrap();
                    for id in &ids {
                        *d.entry(*id).or_default() += 1;
                    }
                }
                in_doubt.lock().unwrap().extend(&ids);
                if client.execute("SELECT outbox_ack($1)", &[&ids]).is_err() {
                    break;
                }
                let mut doubt = in_doubt.lock().unwrap();
                for id in &ids {
                    doubt.remove(id);
                }
            }
        })
    };

    std::thread::sleep(Duration::from_millis(1500));
    cluster.stop("immediate");
    stop.store(true, Ordering::Relaxed);
    for w in writers {
        w.join().unwrap();
    }
    consumer.join().unwrap();
    cluster.pg_ctl_start();

    let mut client = cluster.connect(&db);
    let changes: i64 = client
        .query_one("SELECT count(*) + count(*) FILTER (WHERE content = 'y') FROM chunks", &[])
        .unwrap()
        .get(0);
    assert!(changes > 50, "the writers made progress before the crash: {changes}");
    // exactly one event per committed change, none for changes that did not commit
    let mismatched: i64 = client
        .query_one(
            "SELECT count(*) FROM (
               SELECT (payload->'key'->>'id')::bigint AS id, count(*) AS events FROM outbox_events GROUP BY 1) e
             FULL JOIN chunks c USING (id)
             WHERE c.id IS NULL OR e.id IS NULL OR e.events <> CASE WHEN c.content = 'y' THEN 2 ELSE 1 END",
            &[],
        )
        .unwrap()
        .get(0);
    assert_eq!(mismatched, 0);

    // drain what is left; leases from before the crash expire after a second
    std::thread::sleep(Duration::from_millis(1100));
    loop {
        let ids: Vec<i64> = client.query("SELECT id FROM outbox_claim(500)", &[]).unwrap().iter().map(|r| r.get(0)).collect();
        if ids.is_empty() {
            break;
        }
        let mut d = delivered.lock().unwrap();
        for id in &ids {
            *d.entry(*id).or_default() += 1;
        }
        drop(d);
        client.execute("SELECT outbox_ack($1)", &[&ids]).unwrap();
    }
    let all: Vec<i64> = client.query("SELECT id FROM outbox_events", &[]).unwrap().iter().map(|r| r.get(0)).collect();
    let delivered = delivered.lock().unwrap();
    let missing: Vec<&i64> = all.iter().filter(|id| !delivered.contains_key(id)).collect();
    assert!(missing.is_empty(), "never delivered: {missing:?}");
    let in_doubt = in_doubt.lock().unwrap();
    let duplicates: Vec<i64> = delivered.iter().filter(|(_, n)| **n > 1).map(|(id, _)| *id).collect();
    assert!(duplicates.iter().all(|id| in_doubt.contains(id)), "duplicates outside the in-flight batch: {duplicates:?}");
    println!("{} events, {} delivered twice (in flight at the crash)", all.len(), duplicates.len());
    assert_eq!(scalar_i64(&mut client, "SELECT pending + in_flight + retrying FROM outbox_backlog"), 0);
}

/// A transaction that only claims commits without waiting for its WAL to reach disk (see
/// src/consume.rs): a crash right after it hands its events out again, as for any claim in
/// flight at a crash. An ack, and anything written in the same transaction as a claim, waits.
#[test]
fn a_claim_alone_commits_without_a_flush_and_a_crash_hands_its_events_out_again() {
    // The WAL writer must not write the claim's commit before the crash, nor another
    // transaction's flush: a long writer delay, and no autovacuum.
    let cluster = Cluster::start(&["wal_writer_delay = '10s'", "autovacuum = off"]);
    let db = cluster.database("claims_alone");
    let mut c = cluster.connect(&db);
    chunks(&mut c, "");
    c.batch_execute("CREATE TABLE notes (note text); INSERT INTO chunks SELECT g, 1, 'x', '{1}' FROM generate_series(1, 30) g")
        .unwrap();

    let acked = ids(&claim(&mut c, "SELECT * FROM outbox_claim(10)"));
    c.execute("SELECT outbox_ack($1)", &[&acked]).unwrap();
    c.batch_execute("BEGIN").unwrap();
    let with_work = ids(&claim(&mut c, "SELECT * FROM outbox_claim(10, lease => '1 hour')"));
    c.batch_execute("INSERT INTO notes VALUES ('written with a claim'); COMMIT").unwrap();
    let alone = ids(&claim(&mut c, "SELECT * FROM outbox_claim(10, lease => '1 hour')"));
    assert_eq!((acked.len(), with_work.len(), alone.len()), (10, 10, 10));
    drop(c);
    cluster.stop("immediate");
    cluster.pg_ctl_start();

    let mut c = cluster.connect(&db);
    assert_eq!(scalar_i64(&mut c, "SELECT count(*) FROM notes"), 1, "the transaction with a claim and a write survived");
    let again = claim(&mut c, "SELECT * FROM outbox_claim(100)");
    assert_eq!(ids(&again), alone, "only the claim made alone was lost, and its events come back");
    assert!(again.iter().all(|e| e.3 == 1), "the lost claim left no attempt behind: {again:?}");
    assert_eq!(scalar_i64(&mut c, "SELECT in_flight FROM outbox_backlog"), 20, "the claim with a write is still in flight");
}
