//! Write-path and drain-path benchmarks, each against its baselines in the same run, on a
//! Postgres started for the purpose. Prints markdown tables with ratios.
//!
//!     scripts/bench.sh            (installs a release build, then `cargo bench --bench outbox`)

#[path = "../tests/common/mod.rs"]
mod common;

use std::process::Command;
use std::time::{Duration, Instant};

use common::*;


const ROWS: i64 = 100_000;
const PER_STATEMENT: i64 = 1_000;
const ROUNDS: usize = 11;
const REFERENCE_ROUNDS: usize = 3;
const TPS_ROUNDS: usize = 11;
const TPS_SECONDS: u32 = 5;
/// Drains of the same events per consumer; the table gives the median.
const DRAIN_ROUNDS: usize = 3;

fn main() {
    // `cargo bench --bench outbox -- latency` runs only the sections named
    let wanted: Vec<String> = std::env::args().skip(1).filter(|a| !a.starts_with('-')).collect();
    let run = |section: &str| wanted.is_empty() || wanted.iter().any(|w| w == section);
    println!("# outbox benchmarks\n");
    println!("PostgreSQL 15, {} cores.\n", num_cpus());
    if run("write") || run("tps") || run("drain") {
        capture_and_drain(&run);
    }
    if run("latency") {
        delivery_latency();
    }
}

fn capture_and_drain(run: &dyn Fn(&str) -> bool) {
    let cluster = Cluster::start(&[
        "shared_buffers = 1GB",
        "max_wal_size = 8GB",
        "checkpoint_timeout = 30min",
        "work_mem = 16MB",
    ]);
    let db = cluster.database("bench");
    let mut c = cluster.connect(&db);
    c.batch_execute(&format!(
        "CREATE EXTENSION pgq;
         CREATE TABLE stage AS
             SELECT g::bigint AS id, 'document ' || g AS doc,
                    (SELECT array_agg(random()::real) FROM generate_series(1, 384) WHERE g > 0) AS embedding
             FROM generate_series(1, {ROWS}) g;
         CREATE UNIQUE INDEX ON stage (id);
         CREATE SEQUENCE bench_ids;
         CREATE TABLE t_none (id bigint PRIMARY KEY, doc text, embedding real[]);
         CREATE TABLE t_outbox (LIKE t_none INCLUDING ALL);
         CREATE TABLE t_plpgsql (LIKE t_none INCLUDING ALL);
         CREATE TABLE t_pgq (LIKE t_none INCLUDING ALL);
         SELECT outbox_attach('t_outbox');
         SELECT outbox_unsubscribe('default');
         CREATE TABLE plpgsql_outbox (id bigserial PRIMARY KEY, type text, payload jsonb,
                                      created_at timestamptz DEFAULT clock_timestamp());
         CREATE FUNCTION plpgsql_capture() RETURNS trigger LANGUAGE plpgsql AS $$
         BEGIN
             INSERT INTO plpgsql_outbox (type, payload)
             VALUES ('EMBED_UPSERT', jsonb_build_object('table', TG_TABLE_NAME, 'key', jsonb_build_object('id', NEW.id)));
             RETURN NULL;
         END $$;
         CREATE TRIGGER capture AFTER INSERT ON t_plpgsql FOR EACH ROW EXECUTE FUNCTION plpgsql_capture();
         SELECT pgq.create_queue('writes');
         -- every capture records the key only: logutriga would otherwise url-encode all 384
         -- floats of each embedding, which costs it 30x and compares nothing like with like
         CREATE TRIGGER capture AFTER INSERT ON t_pgq FOR EACH ROW
             EXECUTE FUNCTION pgq.logutriga('writes', 'ignore=doc,embedding');"
    ))
    .unwrap();
    c.batch_execute("VACUUM ANALYZE stage").unwrap();

    println!("Rows of (id bigint primary key, doc text, embedding real[384]).\n");
    if run("write") {
        write_path(&mut c);
    }
    if run("tps") {
        single_row_tps(&cluster, &db, &mut c);
    }
    if run("drain") {
        drain_path(&mut c);
        drain_past_waiting_retries(&mut c);
    }
}

fn num_cpus() -> usize {
    std::thread::available_parallelism().map(|n| n.get()).unwrap_or(1)
}

/// Wall-clock and server CPU seconds to load all rows, PER_STATEMENT rows per INSERT … SELECT,
/// each its own transaction.
fn load(c: &mut Client, table: &str) -> (f64, f64) {
    c.batch_execute(&format!("TRUNCATE {table}; TRUNCATE outbox_log, plpgsql_outbox")).unwrap();
    c.batch_execute("SELECT pgq.drop_queue('writes', true); SELECT pgq.create_queue('writes'); CHECKPOINT").unwrap();
    let insert = c.prepare(&format!("INSERT INTO {table} SELECT * FROM stage WHERE id BETWEEN $1 AND $2")).unwrap();
    let cpu = backend_cpu(c);
    let started = Instant::now();
    let mut first = 1;
    while first <= ROWS {
        c.execute(&insert, &[&first, &(first + PER_STATEMENT - 1)]).unwrap();
        first += PER_STATEMENT;
    }
    (started.elapsed().as_secs_f64(), backend_cpu(c) - cpu)
}

fn write_path(c: &mut Client) {
    // The outbox against no capture in alternating order, round after round: this machine's
    // disk is noisy, so the ratio is taken within each round and the median reported.
    let (mut none, mut outbox, mut ratios, mut cpu_ratios) = (Vec::new(), Vec::new(), Vec::new(), Vec::new());
    for round in 0..ROUNDS {
        let order = if round % 2 == 0 { ["t_none", "t_outbox"] } else { ["t_outbox", "t_none"] };
        let mut times = std::collections::HashMap::new();
        for table in order {
            times.insert(table, load(c, table));
        }
        let ((n, n_cpu), (o, o_cpu)) = (times["t_none"], times["t_outbox"]);
        none.push(n);
        outbox.push(o);
        ratios.push(o / n);
        cpu_ratios.push(o_cpu / n_cpu);
    }
    let references = [("PL/pgSQL row trigger into an outbox table", "t_plpgsql"), ("PgQ 3.5 pgq.logutriga (key only)", "t_pgq")];
    let reference_times: Vec<f64> =
        references.iter().map(|(_, table)| median((0..REFERENCE_ROUNDS).map(|_| load(c, table).0).collect())).collect();
    let base = median(none.clone());
    println!("## Write path: bulk INSERT … SELECT, {PER_STATEMENT} rows per statement, {ROWS} rows\n");
    println!(
        "No capture and outbox alternate for {ROUNDS} rounds; the ratio is taken within each round \
         (median, with the range). References ran {REFERENCE_ROUNDS} times each.\n"
    );
    let range = |v: &[f64]| {
        format!("{:.3}–{:.3}", v.iter().cloned().fold(f64::MAX, f64::min), v.iter().cloned().fold(0.0, f64::max))
    };
    println!("| capture | seconds (median) | ratio to no capture |\n|---|---|---|");
    println!("| no capture | {base:.3} | 1.000 |");
    println!("| outbox | {:.3} | **{:.3}** (range {}) |", median(outbox), median(ratios.clone()), range(&ratios));
    for ((name, _), time) in references.iter().zip(reference_times) {
        println!("| {name} | {time:.3} | {:.3} |", time / base);
    }
    println!("\nServer CPU time, outbox ÷ no capture: {:.3} (median of rounds)\n", median(cpu_ratios));
}

/// Transactions per second, and server CPU seconds per transaction, of `script` run by 4
/// pgbench clients for `seconds`.
fn pgbench(cluster: &Cluster, db: &str, script: &str, seconds: u32) -> (f64, f64) {
    let path = cluster.dir.join("bench.sql");
    std::fs::write(&path, script).unwrap();
    let cpu = server_cpu(cluster);
    let out = Command::new("/usr/lib/postgresql/15/bin/pgbench")
        .args(["-n", "-c", "4", "-j", "2", "-T", &seconds.to_string(), "-f"])
        .arg(&path)
        .args(["-h", &cluster.dir.display().to_string(), "-p", &cluster.port.to_string(), "-U", "postgres", db])
        .output()
        .unwrap();
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(out.status.success(), "pgbench: {text}{}", String::from_utf8_lossy(&out.stderr));
    let field = |prefix: &str, index: usize| -> f64 {
        text.lines()
            .find(|l| l.starts_with(prefix))
            .and_then(|l| l.split_whitespace().nth(index))
            .and_then(|v| v.parse().ok())
            .unwrap_or_else(|| panic!("no {prefix} in {text}"))
    };
    // the clients' backends have exited; give the postmaster a moment to reap them
    std::thread::sleep(Duration::from_millis(200));
    let transactions = field("number of transactions actually processed:", 5);
    (field("tps = ", 2), (server_cpu(cluster) - cpu) / transactions)
}

/// CPU seconds the server has used so far: the postmaster with the children it has reaped,
/// and the children still running.
fn server_cpu(cluster: &Cluster) -> f64 {
    let pid_file = std::fs::read_to_string(format!("{}/postmaster.pid", cluster.data())).unwrap();
    let postmaster: i64 = pid_file.lines().next().unwrap().trim().parse().unwrap();
    let ticks = |fields: &[i64], range: std::ops::Range<usize>| fields[range].iter().sum::<i64>();
    let mut total = ticks(&proc_stat(postmaster).unwrap(), 11..15);
    for entry in std::fs::read_dir("/proc").unwrap().flatten() {
        let Ok(pid) = entry.file_name().to_string_lossy().parse::<i64>() else { continue };
        if let Some(fields) = proc_stat(pid).filter(|fields| fields[1] == postmaster) {
            total += ticks(&fields, 11..13);
        }
    }
    total as f64 / 100.0
}

fn single_row_tps(cluster: &Cluster, db: &str, c: &mut Client) {
    let script = |table: &str| {
        format!(
            "\\set id random(1, {ROWS})\n\
             INSERT INTO {table} SELECT nextval('bench_ids'), doc, embedding FROM stage WHERE id = :id;\n"
        )
    };
    // Alternating short runs, the ratio taken within each round: the VM's speed drifts by
    // more than the difference being measured over a few minutes.
    let (mut none, mut outbox, mut ratios, mut cpu_ratios) = (Vec::new(), Vec::new(), Vec::new(), Vec::new());
    for round in 0..TPS_ROUNDS {
        let order = if round % 2 == 0 { ["t_none", "t_outbox"] } else { ["t_outbox", "t_none"] };
        let mut results = std::collections::HashMap::new();
        for table in order {
            c.batch_execute("TRUNCATE t_none, t_outbox, outbox_log; CHECKPOINT").unwrap();
            results.insert(table, pgbench(cluster, db, &script(table), TPS_SECONDS));
        }
        let ((n, n_cpu), (o, o_cpu)) = (results["t_none"], results["t_outbox"]);
        none.push(n);
        outbox.push(o);
        ratios.push(o / n);
        cpu_ratios.push(o_cpu / n_cpu);
    }
    let spread = |v: &[f64], digits: usize| {
        format!("{:.digits$}–{:.digits$}", v.iter().cloned().fold(f64::MAX, f64::min), v.iter().cloned().fold(0.0, f64::max))
    };
    println!(
        "## Write path: single-row transactions, 4 concurrent clients (pgbench, {TPS_ROUNDS} rounds of {TPS_SECONDS} s runs, alternating)\n"
    );
    println!("| capture | transactions/s (median) | range |\n|---|---|---|");
    println!("| no capture | {:.0} | {} |", median(none.clone()), spread(&none, 0));
    println!("| outbox | {:.0} | {} |", median(outbox.clone()), spread(&outbox, 0));
    println!(
        "\nTPS with capture ÷ TPS without, median of rounds: **{:.3}** (range {})",
        median(ratios.clone()),
        spread(&ratios, 3)
    );
    println!(
        "Server CPU per transaction with capture ÷ without, median of rounds: {:.3} (range {})\n",
        median(cpu_ratios.clone()),
        spread(&cpu_ratios, 3)
    );
}

/// Events per second for one consumer draining `events` events with `round_trip`.
fn drain(events: i64, mut round_trip: impl FnMut() -> usize) -> f64 {
    let started = Instant::now();
    let mut drained = 0usize;
    loop {
        let n = round_trip();
        if n == 0 {
            break;
        }
        drained += n;
    }
    assert_eq!(drained as i64, events, "drained everything exactly once");
    events as f64 / started.elapsed().as_secs_f64()
}

/// The ids of a claimed batch of (id, type, payload jsonb), each payload decoded as a
/// consumer would.
fn decoded_ids(rows: &[postgres::Row]) -> Vec<i64> {
    rows.iter()
        .map(|r| {
            let _payload: serde_json::Value = r.get(2);
            r.get(0)
        })
        .collect()
}

/// Each drain starts with the loading's dead tuples vacuumed and its dirty pages written, so
/// that neither autovacuum nor a checkpoint lands in one contender's run and not another's.
fn settle(c: &mut Client) {
    c.batch_execute("VACUUM ANALYZE").unwrap();
    c.batch_execute("CHECKPOINT").unwrap();
}

/// Claims of 1,000 with their acks, through a prepared pair, until `subscription` is drained.
fn drain_subscription(c: &mut Client, subscription: &str, events: i64) -> f64 {
    let claim = c.prepare("SELECT id, type, payload FROM outbox_claim(1000, $1)").unwrap();
    let ack = c.prepare("SELECT outbox_ack($1, $2)").unwrap();
    drain(events, || {
        let ids = decoded_ids(&c.query(&claim, &[&subscription]).unwrap());
        if !ids.is_empty() {
            c.query_one(&ack, &[&ids, &subscription]).unwrap();
        }
        ids.len()
    })
}

fn drain_path(c: &mut Client) {
    c.batch_execute(
        "CREATE TABLE skip_queue (id bigserial PRIMARY KEY, type text, payload jsonb,
                                  created_at timestamptz DEFAULT now(), locked_until timestamptz,
                                  attempts int NOT NULL DEFAULT 0, processed_at timestamptz);
         CREATE INDEX skip_queue_pending ON skip_queue (id) WHERE processed_at IS NULL;
         SELECT pgq.create_queue('drain');
         UPDATE pgq.queue SET queue_ticker_max_count = 1000 WHERE queue_name = 'drain';
         SELECT pgq.register_consumer('drain', 'bench');
         CREATE PROCEDURE load_single(n bigint) LANGUAGE plpgsql AS $$
         BEGIN
             FOR i IN 1..n LOOP
                 INSERT INTO t_outbox SELECT * FROM stage WHERE id = i;
                 COMMIT;
             END LOOP;
         END $$;",
    )
    .unwrap();

    let mut results = Vec::new();
    for (label, bulk) in [("bulk-captured (1,000-row statements)", true), ("single-row transactions", false)] {
        // the log after the table: the TRUNCATE of t_outbox is an event too
        c.batch_execute("TRUNCATE t_outbox").unwrap();
        c.batch_execute("TRUNCATE outbox_log, outbox_ledger, outbox_claims, outbox_retries").unwrap();
        if bulk {
            load(c, "t_outbox");
        } else {
            c.batch_execute("SET synchronous_commit = off").unwrap();
            c.batch_execute(&format!("CALL load_single({ROWS})")).unwrap();
            c.batch_execute("RESET synchronous_commit").unwrap();
        }
        let mut rates = Vec::new();
        for round in 0..DRAIN_ROUNDS {
            // a subscription of its own for each round: every round drains the same events
            let name = format!("drain_{round}");
            c.execute("SELECT outbox_subscribe($1, from_start => true)", &[&name]).unwrap();
            settle(c);
            rates.push(drain_subscription(c, &name, ROWS));
            c.execute("SELECT outbox_unsubscribe($1)", &[&name]).unwrap();
        }
        results.push((format!("outbox, {label}"), rates));
    }

    // FOR UPDATE SKIP LOCKED with per-row claim and ack updates, on the same events
    let claim = c
        .prepare(
            "UPDATE skip_queue q SET locked_until = now() + interval '30 seconds', attempts = attempts + 1
             FROM (SELECT id FROM skip_queue WHERE processed_at IS NULL AND (locked_until IS NULL OR locked_until < now())
                   ORDER BY id LIMIT 1000 FOR UPDATE SKIP LOCKED) c
             WHERE q.id = c.id RETURNING q.id, q.type, q.payload",
        )
        .unwrap();
    let ack = c.prepare("UPDATE skip_queue SET processed_at = now() WHERE id = ANY ($1)").unwrap();
    let mut rates = Vec::new();
    for _ in 0..DRAIN_ROUNDS {
        c.batch_execute(&format!(
            "TRUNCATE skip_queue;
             INSERT INTO skip_queue (type, payload)
             SELECT 'EMBED_UPSERT', jsonb_build_object('table', 'public.t_outbox', 'key', jsonb_build_object('id', g))
             FROM generate_series(1, {ROWS}) g"
        ))
        .unwrap();
        settle(c);
        rates.push(drain(ROWS, || {
            let ids = decoded_ids(&c.query(&claim, &[]).unwrap());
            if !ids.is_empty() {
                c.execute(&ack, &[&ids]).unwrap();
            }
            ids.len()
        }));
    }
    results.push(("FOR UPDATE SKIP LOCKED claim + UPDATE processed_at ack".to_string(), rates));

    // PgQ: the same events, a tick after every 1,000
    let next = c.prepare("SELECT pgq.next_batch('drain', 'bench')").unwrap();
    let events = c.prepare("SELECT ev_id, ev_type, ev_data FROM pgq.get_batch_events($1)").unwrap();
    let finish = c.prepare("SELECT pgq.finish_batch($1)").unwrap();
    let mut rates = Vec::new();
    for _ in 0..DRAIN_ROUNDS {
        c.batch_execute(&format!(
            "DO $$ BEGIN
                 FOR b IN 0..{} LOOP
                     PERFORM pgq.insert_event('drain', 'EMBED_UPSERT',
                         jsonb_build_object('table', 'public.t_outbox', 'key', jsonb_build_object('id', g))::text)
                     FROM generate_series(b * 1000 + 1, b * 1000 + 1000) g;
                     COMMIT;
                     PERFORM pgq.ticker();
                 END LOOP;
             END $$;",
            ROWS / 1000 - 1
        ))
        .unwrap();
        c.batch_execute("SELECT pgq.force_tick('drain'); SELECT pgq.ticker()").unwrap();
        std::thread::sleep(Duration::from_millis(100));
        c.batch_execute("SELECT pgq.ticker()").unwrap();
        settle(c);
        rates.push(drain(ROWS, || loop {
            let batch: Option<i64> = c.query_one(&next, &[]).unwrap().get(0);
            let Some(batch) = batch else { return 0 };
            let rows = c.query(&events, &[&batch]).unwrap();
            for r in &rows {
                let _payload: serde_json::Value = serde_json::from_str(r.get::<_, &str>(2)).unwrap();
            }
            c.query_one(&finish, &[&batch]).unwrap();
            if !rows.is_empty() {
                return rows.len();
            }
        }));
    }
    results.push(("PgQ 3.5 next_batch / get_batch_events / finish_batch".to_string(), rates));

    println!("## Drain path: {ROWS} queued events, one consumer, batches of 1,000\n");
    println!(
        "Every consumer decodes each payload as JSON and acknowledges each batch. Each drains the same events \
         {DRAIN_ROUNDS} times, after VACUUM ANALYZE and CHECKPOINT; the median with the range.\n"
    );
    let medians: Vec<f64> = results.iter().map(|(_, rates)| median(rates.clone())).collect();
    let (skip, pgq) = (medians[2], medians[3]);
    println!("| consumer | events/s (median) | range | ÷ SKIP LOCKED | ÷ PgQ |\n|---|---|---|---|---|");
    for ((name, rates), rate) in results.iter().zip(&medians) {
        let (low, high) = rates.iter().fold((f64::MAX, 0.0f64), |(l, h), r| (l.min(*r), h.max(*r)));
        println!("| {name} | {rate:.0} | {low:.0}–{high:.0} | {:.2} | {:.2} |", rate / skip, rate / pgq);
    }
    println!();
}

/// A sink failed the first 20,000 of the single-row events (their retry is an hour away) while
/// the rest keep coming: the drain of the rest, against the same drain after the 20,000 were
/// acked instead. Claims check each window event against the waiting retries of its row.
fn drain_past_waiting_retries(c: &mut Client) {
    const WAITING: i64 = 20_000;
    let (mut waiting, mut acked, mut ratios) = (Vec::new(), Vec::new(), Vec::new());
    for round in 0..DRAIN_ROUNDS {
        let mut rates = [0.0; 2];
        for (i, fail) in [true, false].into_iter().enumerate() {
            let name = format!("retries_{round}_{i}");
            c.execute("SELECT outbox_subscribe($1, from_start => true)", &[&name]).unwrap();
            for _ in 0..WAITING / 1000 {
                let ids = decoded_ids(&c.query("SELECT id, type, payload FROM outbox_claim(1000, $1)", &[&name]).unwrap());
                let resolve = if fail { "SELECT outbox_fail($1, 'sink down', $2, retry_after => '1 hour')" } else { "SELECT outbox_ack($1, $2)" };
                c.query_one(resolve, &[&ids, &name]).unwrap();
            }
            settle(c);
            rates[i] = drain_subscription(c, &name, ROWS - WAITING);
            c.execute("SELECT outbox_unsubscribe($1)", &[&name]).unwrap();
        }
        waiting.push(rates[0]);
        acked.push(rates[1]);
        ratios.push(rates[0] / rates[1]);
    }
    println!("## Drain past retries: the last {} single-row events, with the first {WAITING} failed and waiting
", ROWS - WAITING);
    println!("| first {WAITING} events | events/s (median of {DRAIN_ROUNDS}) |
|---|---|");
    println!("| acked | {:.0} |", median(acked));
    println!("| failed, retry in an hour | {:.0} |", median(waiting));
    println!("\nWith waiting retries ÷ without, median of rounds: **{:.3}**\n", median(ratios));
}

/// Commit-to-arrival latency of the delivery worker to a loopback HTTP sink, at a steady
/// 500 events/s for 30 s, one event per transaction.
fn delivery_latency() {
    const RATE: u64 = 500;
    const SECONDS: u64 = 30;
    let cluster = Cluster::start(&["shared_preload_libraries = 'outbox'", "outbox.database = 'postgres'"]);
    let recorder = Recorder::start(|_| Reply::status(200));
    let mut c = cluster.connect("postgres");
    c.batch_execute(&format!(
        "CREATE EXTENSION outbox;
         SELECT outbox_unsubscribe('default');
         CREATE TABLE chunks (id bigint PRIMARY KEY, doc text, embedding real[]);
         SELECT outbox_attach('chunks');
         SELECT outbox_subscribe('search', 'http', '{{\"url\": \"{}\"}}');",
        recorder.url()
    ))
    .unwrap();
    std::thread::sleep(Duration::from_secs(1));
    let insert = c.prepare("INSERT INTO chunks VALUES ($1, 'doc', '{0.1,0.2,0.3}')").unwrap();
    let mut committed = Vec::with_capacity((RATE * SECONDS) as usize);
    let start = Instant::now();
    for n in 0..RATE * SECONDS {
        let slot = start + Duration::from_micros(n * 1_000_000 / RATE);
        if let Some(wait) = slot.checked_duration_since(Instant::now()) {
            std::thread::sleep(wait);
        }
        let id = n as i64 + 1;
        let mut tx = c.transaction().unwrap();
        tx.execute(&insert, &[&id]).unwrap();
        let at = Instant::now();
        tx.commit().unwrap();
        committed.push((id, at));
    }
    let achieved = committed.len() as f64 / start.elapsed().as_secs_f64();
    assert!(eventually(Duration::from_secs(30), || recorder.delivered_keys().len() >= committed.len()));
    let mut arrival = std::collections::HashMap::new();
    for request in recorder.received() {
        for key in request.keys() {
            arrival.entry(key).or_insert(request.at);
        }
    }
    let mut latencies: Vec<f64> = committed
        .iter()
        .map(|(id, at)| arrival[id].saturating_duration_since(*at).as_secs_f64() * 1000.0)
        .collect();
    latencies.sort_by(|a, b| a.partial_cmp(b).unwrap());
    let pick = |q: f64| latencies[((latencies.len() as f64 - 1.0) * q).round() as usize];
    let requests = recorder.received().len();
    println!("## Delivery latency: writer COMMIT to the request arriving at a loopback HTTP sink\n");
    println!(
        "{} events, one per transaction, at {achieved:.0} events/s for {SECONDS} s; the worker sent {requests} requests \
         ({:.1} events per request).\n",
        committed.len(),
        committed.len() as f64 / requests as f64
    );
    println!("| p50 | p99 | max |\n|---|---|---|");
    println!("| {:.2} ms | {:.2} ms | {:.2} ms |\n", pick(0.5), pick(0.99), pick(1.0));
}
