//! The chaos loop: writers and consumers run while consumer processes are SIGKILLed mid-batch,
//! the delivery worker is terminated, and Postgres is stopped with `-m immediate` and started
//! again. Afterwards every committed change has exactly one event, every event reached every
//! subscription (a pull consumer, a function sink and an HTTP sink), and repeats come only from
//! batches that were in flight when something was killed.
#![cfg(not(feature = "pg_test"))] // run by scripts/test.sh against the installed extension, not by cargo pgrx test

mod common;

use std::collections::HashMap;
use std::process::{Child, Command, Stdio};
use std::sync::atomic::{AtomicBool, AtomicU32, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use common::*;

/// A pull consumer: claims 50 with a 2 s lease, writes the ids as one line, works a little (where
/// a kill lands), then acks. A line cut short by a kill has no newline and is not counted.
const CONSUMER: &str = r#"
import random, sys, time
import psycopg
dsn, path = sys.argv[1], sys.argv[2]
with psycopg.connect(dsn, autocommit=True) as conn, open(path, "a") as out:
    while True:
        ids = [r[0] for r in conn.execute("SELECT id FROM outbox_claim(50, 'default', '2 seconds')").fetchall()]
        if not ids:
            time.sleep(0.05)
            continue
        out.write(" ".join(map(str, ids)) + "\n")
        out.flush()
        time.sleep(random.random() * 0.05)
        conn.execute("SELECT outbox_ack(%s::bigint[])", (ids,))
"#;
const CONSUMERS: usize = 2;
const CHAOS: Duration = Duration::from_secs(24);
/// Batch sizes, to bound the repeats: 50 for the pull consumers, the worker's default 100.
const PULL_BATCH: u32 = 50;
const SINK_BATCH: u32 = 100;

fn python() -> String {
    std::env::var("OUTBOX_PYTHON").unwrap_or_else(|_| "/usr/bin/python3".to_string())
}

fn spawn_consumer(dsn: &str, log: &std::path::Path) -> Child {
    Command::new(python()).args(["-c", CONSUMER, dsn]).arg(log).stdout(Stdio::null()).stderr(Stdio::null()).spawn().unwrap()
}

fn connect_retrying(cluster: &Cluster, stop: &AtomicBool) -> Option<Client> {
    while !stop.load(Ordering::Relaxed) {
        if let Ok(client) = Client::connect(&cluster.dsn("postgres"), NoTls) {
            return Some(client);
        }
        std::thread::sleep(Duration::from_millis(100));
    }
    None
}

/// What the outbox recorded of `ids`: their log rows, and each ledger row (claims, acks, fails,
/// expiries) and retry of every subscription that names one of them.
fn history(c: &mut Client, ids: &[i64]) -> String {
    let mut lines = vec![format!("ids {ids:?}")];
    let queries = [
        "SELECT format('log base %s n %s txid %s created %s', base, n, txid, created_at) FROM outbox_log
         WHERE base = ANY (SELECT id - (id - 1) % 4096 FROM unnest($1::bigint[]) id) ORDER BY base",
        "SELECT format('ledger %s kind %s claim %s at %s holds %s of %s', s.name, l.kind, l.claim_id, l.at,
                       ARRAY(SELECT e FROM unnest(l.event_ids) e WHERE e = ANY ($1)), cardinality(l.event_ids))
         FROM outbox_ledger l JOIN outbox_subscriptions s ON s.id = l.subscription_id
         WHERE l.event_ids && $1 ORDER BY l.at",
        "SELECT format('retry %s event %s attempts %s visible %s leased %s', s.name, r.event_id, r.attempts, r.visible_at, r.leased_until)
         FROM outbox_retries r JOIN outbox_subscriptions s ON s.id = r.subscription_id WHERE r.event_id = ANY ($1)",
        "SELECT format('subscription %s done %s/%s window %s/%s cursor %s floor %s', name, done_snapshot, done_seq,
                       window_snapshot, window_seq, window_cursor, straddle_floor) FROM outbox_subscriptions",
    ];
    for query in queries {
        match c.query(query, &[&ids]) {
            Ok(rows) => lines.extend(rows.iter().map(|r| r.get::<_, String>(0))),
            Err(e) => lines.push(format!("{query}: {e}")),
        }
    }
    lines.join("\n")
}

#[test]
fn chaos_loses_nothing_and_repeats_only_what_was_in_flight() {
    let cluster = Arc::new(Cluster::start(&[
        "shared_preload_libraries = 'outbox'",
        "outbox.database = 'postgres'",
        "outbox.poll_interval = '200ms'",
        "outbox.backoff_max = '1s'",
    ]));
    let recorder = Recorder::start(|_| Reply::status(200));
    let mut c = cluster.connect("postgres");
    c.batch_execute(&format!(
        "CREATE EXTENSION outbox;
         CREATE TABLE chunks (id bigint PRIMARY KEY, doc_id int, content text, embedding real[]);
         SELECT outbox_attach('chunks');
         CREATE TABLE mirrored (event_id bigint);
         CREATE FUNCTION mirror(batch jsonb) RETURNS void LANGUAGE sql
             AS $$ INSERT INTO mirrored SELECT (e->>'id')::bigint FROM jsonb_array_elements(batch) e $$;
         SELECT outbox_subscribe('mirror', 'function', '{{\"function\": \"public.mirror\"}}');
         SELECT outbox_subscribe('search', 'http', '{{\"url\": \"{}\", \"timeout\": \"2s\"}}');",
        recorder.url()
    ))
    .unwrap();
    drop(c);

    let stop = Arc::new(AtomicBool::new(false));
    let writers: Vec<_> = (0..2i64)
        .map(|w| {
            let (cluster, stop) = (cluster.clone(), stop.clone());
            std::thread::spawn(move || {
                let mut id = w * 1_000_000;
                while let Some(mut client) = connect_retrying(&cluster, &stop) {
                    while !stop.load(Ordering::Relaxed) {
                        id += 1;
                        // a commit cut off by the crash may or may not have happened: the table tells
                        if client.execute("INSERT INTO chunks VALUES ($1, 1, 'x', '{1}')", &[&id]).is_err() {
                            break;
                        }
                        std::thread::sleep(Duration::from_millis(5));
                    }
                }
            })
        })
        .collect();

    let logs: Vec<_> = (0..CONSUMERS).map(|i| cluster.dir.join(format!("consumer-{i}.log"))).collect();
    let dsn = format!("postgresql://postgres@127.0.0.1:{}/postgres", cluster.port);
    let mut consumers: Vec<Child> = logs.iter().map(|log| spawn_consumer(&dsn, log)).collect();
    let (consumer_kills, worker_kills, crashes) = (AtomicU32::new(0), AtomicU32::new(0), AtomicU32::new(0));
    let started = Instant::now();
    let mut round = 0u32;
    while started.elapsed() < CHAOS {
        std::thread::sleep(Duration::from_millis(1500));
        round += 1;
        // a consumer dies mid-batch every round; consumers that lost their server are restarted
        let victim = round as usize % CONSUMERS;
        let _ = consumers[victim].kill();
        consumer_kills.fetch_add(1, Ordering::Relaxed);
        for (i, consumer) in consumers.iter_mut().enumerate() {
            if consumer.try_wait().unwrap().is_some() || i == victim {
                let _ = consumer.wait();
                *consumer = spawn_consumer(&dsn, &logs[i]);
            }
        }
        if round % 3 == 0 {
            if let Some(mut c) = connect_retrying(&cluster, &stop) {
                let killed = c.query(
                    "SELECT pg_terminate_backend(pid) FROM pg_stat_activity WHERE backend_type = 'outbox delivery worker'",
                    &[],
                );
                if killed.is_ok_and(|rows| !rows.is_empty()) {
                    worker_kills.fetch_add(1, Ordering::Relaxed);
                }
            }
        }
        if round % 6 == 0 {
            cluster.stop("immediate");
            crashes.fetch_add(1, Ordering::Relaxed);
            cluster.pg_ctl_start();
        }
    }
    stop.store(true, Ordering::Relaxed);
    writers.into_iter().for_each(|w| w.join().unwrap());

    // everything still pending is delivered once the chaos stops
    let mut c = cluster.connect("postgres");
    let settled = eventually(Duration::from_secs(60), || {
        for (i, consumer) in consumers.iter_mut().enumerate() {
            if consumer.try_wait().unwrap().is_some() {
                *consumer = spawn_consumer(&dsn, &logs[i]);
            }
        }
        scalar_i64(&mut c, "SELECT sum(pending + in_flight + retrying + dead)::bigint FROM outbox_backlog") == 0
    });
    for consumer in &mut consumers {
        let _ = consumer.kill();
        let _ = consumer.wait();
    }
    let backlog: String = c
        .query_one(
            "SELECT string_agg(concat_ws(' ', subscription, pending, in_flight, retrying, dead, last_error), '; ') FROM outbox_backlog",
            &[],
        )
        .unwrap()
        .get(0);
    assert!(settled, "not delivered after the chaos: {backlog}\n{}", cluster.log());

    // every committed change has exactly one event, and nothing else has one
    let rows = scalar_i64(&mut c, "SELECT count(*) FROM chunks");
    let mismatched = scalar_i64(
        &mut c,
        "SELECT count(*) FROM (SELECT (payload->'key'->>'id')::bigint AS id, count(*) AS n FROM outbox_events GROUP BY 1) e
         FULL JOIN chunks c USING (id) WHERE c.id IS NULL OR e.id IS NULL OR e.n <> 1",
    );
    assert!(rows > 1000, "the writers made progress: {rows} rows");
    assert_eq!(mismatched, 0, "changes without exactly one event");

    let events: Vec<i64> = c.query("SELECT id FROM outbox_events", &[]).unwrap().iter().map(|r| r.get(0)).collect();
    let count = |ids: &mut dyn Iterator<Item = i64>| -> HashMap<i64, u32> {
        let mut seen = HashMap::new();
        for id in ids {
            *seen.entry(id).or_default() += 1;
        }
        seen
    };
    let pulled = count(&mut logs.iter().flat_map(|log| {
        let text = std::fs::read_to_string(log).unwrap_or_default();
        text.split_inclusive('\n')
            .filter(|line| line.ends_with('\n'))
            .flat_map(|line| line.split_whitespace().map(|id| id.parse::<i64>().unwrap()).collect::<Vec<_>>())
            .collect::<Vec<_>>()
    }));
    let mirrored = count(&mut c.query("SELECT event_id FROM mirrored", &[]).unwrap().iter().map(|r| r.get(0)));
    let posted = count(&mut recorder.received().iter().flat_map(|r| r.ids()));
    let (consumer_kills, worker_kills, crashes) =
        (consumer_kills.into_inner(), worker_kills.into_inner(), crashes.into_inner());
    println!(
        "{} events; {consumer_kills} consumer kills, {worker_kills} worker terminations, {crashes} immediate stops",
        events.len()
    );
    for (name, seen, bound) in [
        // a killed consumer repeats at most its batch; a crash, every consumer's batch
        ("pull consumers", &pulled, (consumer_kills + crashes * CONSUMERS as u32) * PULL_BATCH),
        // the function sink applies each batch in the transaction that acks it
        ("function sink", &mirrored, 0),
        // the worker repeats at most the batch it had posted when it was killed
        ("http sink", &posted, (worker_kills + crashes) * SINK_BATCH),
    ] {
        let missing = events.iter().filter(|id| !seen.contains_key(id)).count();
        let repeats: u32 = seen.values().map(|n| n - 1).sum();
        println!("{name}: {missing} missing, {repeats} repeated deliveries (bound {bound})");
        if missing > 0 {
            let ids: Vec<i64> = events.iter().copied().filter(|id| !seen.contains_key(id)).collect();
            let unreadable = recorder.received().iter().filter(|r| !r.body.is_array()).count();
            panic!(
                "{name} never received {missing} events ({unreadable} posts were not a JSON array)\n{}\n{}",
                history(&mut c, &ids),
                cluster.log()
            );
        }
        assert!(repeats <= bound, "{name}: {repeats} repeats, more than the in-flight batches allow ({bound})");
    }
}
