//! CI-sized endurance checks; benches/endurance.rs runs the long versions. Retention keeps
//! the outbox small under sustained load even while a transaction holds back xmin, and a
//! subscription that stops consuming keeps its events until it is removed.
#![cfg(not(feature = "pg_test"))] // run by scripts/test.sh against the installed extension, not by cargo pgrx test

mod common;

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use common::*;

fn preloaded(retention: &str) -> Cluster {
    let cluster = Cluster::start(&["shared_preload_libraries = 'outbox'", "outbox.database = 'postgres'", &format!("outbox.retention = '{retention}'")]);
    let mut c = cluster.connect("postgres");
    c.batch_execute(
        "CREATE EXTENSION outbox;
         CREATE TABLE chunks (id bigint PRIMARY KEY, doc text, embedding real[]);
         SELECT outbox_attach('chunks');",
    )
    .unwrap();
    cluster
}

#[test]
fn storage_levels_off_under_sustained_load_with_xmin_held_back() {
    const RETENTION_S: u64 = 8;
    const RUN_S: u64 = 6 * RETENTION_S;
    let cluster = preloaded(&format!("{RETENTION_S}s"));
    let mut c = cluster.connect("postgres");
    let mut holder = cluster.connect("postgres");
    holder.batch_execute("BEGIN ISOLATION LEVEL REPEATABLE READ; SELECT count(*) FROM chunks").unwrap();
    let stop = Arc::new(AtomicBool::new(false));
    let spawn = |work: fn(&mut Client, &AtomicBool) -> u32| {
        let (stop, dsn) = (stop.clone(), cluster.dsn("postgres"));
        std::thread::spawn(move || work(&mut Client::connect(&dsn, NoTls).unwrap(), &stop))
    };
    // 1,000 events/s in transactions of 100 upserts, a tick missed on a slow machine skipped
    // rather than made up: a burst would swell the later samples against the first
    let writer = spawn(|w, stop| {
        let started = Instant::now();
        let tick = Duration::from_millis(100);
        let (mut n, mut writes) = (0u32, 0u32);
        while !stop.load(Ordering::Relaxed) {
            std::thread::sleep((tick * n).saturating_sub(started.elapsed()));
            w.batch_execute(
                "INSERT INTO chunks SELECT id, 'doc', '{0.5}' FROM (SELECT DISTINCT (random() * 1e6)::bigint AS id FROM generate_series(1, 100)) r
                 ON CONFLICT (id) DO UPDATE SET doc = EXCLUDED.doc || '.'",
            )
            .unwrap();
            n = (n + 1).max((started.elapsed().as_millis() / tick.as_millis()) as u32 + 1);
            writes += 1;
        }
        writes
    });
    let consumer = spawn(|k, stop| {
        let mut acked = 0u32;
        while !stop.load(Ordering::Relaxed) {
            let ids: Vec<i64> = k.query_one("SELECT array_agg(id) FROM outbox_claim(1000)", &[]).unwrap().get::<_, Option<_>>(0).unwrap_or_default();
            if !ids.is_empty() {
                k.execute("SELECT outbox_ack($1)", &[&ids]).unwrap();
                acked += ids.len() as u32;
            }
            // batches of about 500, as a consumer that keeps up would take them
            std::thread::sleep(Duration::from_millis(500));
        }
        acked
    });
    let started = Instant::now();
    let mut sizes = Vec::new();
    for second in (RETENTION_S..=RUN_S).step_by(2) {
        std::thread::sleep(Duration::from_secs(second).saturating_sub(started.elapsed()));
        sizes.push(outbox_size(&mut c));
    }
    stop.store(true, Ordering::Relaxed);
    let writes = writer.join().unwrap();
    let acked = consumer.join().unwrap();
    // a machine too slow for the load would pass without testing it
    assert!(writes as u64 >= RUN_S * 10 * 7 / 10, "{writes} writes of 100 rows in {RUN_S} s, under 70 % of the load");
    assert!(acked >= writes * 80, "the consumer kept up: {acked} events acked of some {} written", writes * 100);
    let events = scalar_i64(&mut c, "SELECT count(*) FROM outbox_events");
    holder.batch_execute("COMMIT").unwrap();
    println!("outbox size every 2 s from {RETENTION_S} s on (bytes): {sizes:?}; {events} events retained");
    let first = sizes[0] as f64;
    // once retention has had a full period to act, the size stays near that of one retention's worth
    for (i, size) in sizes.iter().enumerate().skip(RETENTION_S as usize / 2 + 1) {
        assert!((*size as f64) <= 1.5 * first, "size {size} at sample {i} is more than 1.5 × {first}: {sizes:?}");
    }
    assert!(events < (RETENTION_S as i64 * 3) * 1000, "{events} events retained after {RUN_S} s");
}

#[test]
fn a_stopped_subscription_pins_retention_until_it_is_removed() {
    let cluster = preloaded("2s");
    let mut c = cluster.connect("postgres");
    c.batch_execute("SELECT outbox_subscribe('stopped')").unwrap();
    c.batch_execute("INSERT INTO chunks SELECT g, 'doc', '{1}' FROM generate_series(1, 50) g").unwrap();
    let all = ids(&claim(&mut c, "SELECT * FROM outbox_claim(100)"));
    c.execute("SELECT outbox_ack($1)", &[&all]).unwrap();
    std::thread::sleep(Duration::from_secs(6));
    assert_eq!(scalar_i64(&mut c, "SELECT count(*) FROM outbox_events"), 50, "nothing 'stopped' has not processed is dropped");
    let age: f64 = c
        .query_one("SELECT extract(epoch FROM oldest_pending_age)::float8 FROM outbox_backlog WHERE subscription = 'stopped'", &[])
        .unwrap()
        .get(0);
    assert!(age >= 6.0, "the backlog shows the stopped subscription falling behind: {age}");
    let metrics: String = c.query_one("SELECT outbox_metrics()", &[]).unwrap().get(0);
    assert!(metrics.contains("outbox_backlog_events{subscription=\"stopped\"} 50"), "{metrics}");

    c.batch_execute("SELECT outbox_unsubscribe('stopped')").unwrap();
    assert!(
        eventually(Duration::from_secs(15), || scalar_i64(&mut c, "SELECT count(*) FROM outbox_events") == 0),
        "removing the subscription lets retention go on"
    );
}
