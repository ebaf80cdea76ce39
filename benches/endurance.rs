//! Endurance benchmarks: a sustained write and drain with short retention, with and without a
//! transaction holding back xmin; pull consumers scaled across processes; and the write cost
//! of three subscriptions against one. Prints markdown tables with ratios.
//!
//!     scripts/bench.sh endurance              (all of it; the two sustained runs take 10 min side by side)
//!     OUTBOX_SUSTAINED_MINUTES=2 scripts/bench.sh endurance sustained

#[path = "../tests/common/mod.rs"]
mod common;

use std::process::{Command, Stdio};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use common::*;

/// Set in a child process: it is one consumer of the scaling benchmark.
const CONSUMER_ENV: &str = "OUTBOX_BENCH_CONSUMER";
const EVENTS_PER_SECOND: u64 = 2_000;
/// Rows per writer transaction: 10 transactions of 200 rows a second in all, from four sessions
/// (with 100-row transactions this disk could not commit often enough to keep up the rate).
const ROWS_PER_WRITE: u64 = 200;
const WRITERS: u64 = 4;
const SCALE_EVENTS: i64 = 200_000;
/// Consumer counts and batch sizes of the scaling benchmark, and how many times each runs.
const SCALE_CONSUMERS: [usize; 4] = [1, 2, 4, 8];
const SCALE_BATCHES: [i32; 2] = [100, 1000];
const SCALE_REPEATS: usize = 5;
/// Claims and acks each consumer makes on `WARMUP_SUBSCRIPTION` before the clock starts.
const WARMUP_CLAIMS: usize = 8;
const WARMUP_SUBSCRIPTION: &str = "scale_warmup";

fn main() {
    if let Ok(spec) = std::env::var(CONSUMER_ENV) {
        consumer_process(&spec);
        return;
    }
    let wanted: Vec<String> = std::env::args().skip(1).filter(|a| !a.starts_with('-')).collect();
    let run = |section: &str| wanted.is_empty() || wanted.iter().any(|w| w == section);
    println!("# outbox endurance benchmarks\n");
    let cluster = bench_cluster();
    if run("sustained") {
        sustained(&cluster);
    }
    if run("scale") {
        scale(&cluster);
    }
    if run("subscriptions") {
        three_subscriptions(&cluster);
    }
}

/// A cluster with the extension, its worker and an attached `chunks` table.
fn bench_cluster() -> Cluster {
    let cluster = Cluster::start(&[
        "shared_preload_libraries = 'outbox'",
        "outbox.database = 'postgres'",
        "outbox.retention = '1min'",
        "shared_buffers = 1GB",
        "max_wal_size = 8GB",
        "max_connections = 100",
    ]);
    let mut c = cluster.connect("postgres");
    c.batch_execute(
        "CREATE EXTENSION outbox;
         CREATE TABLE chunks (id bigint PRIMARY KEY, doc text, embedding real[]);
         SELECT outbox_attach('chunks');",
    )
    .unwrap();
    cluster
}

struct MinuteSizes {
    minute: u64,
    at_end: i64,
    /// of `at_end`, the log and ledger segments that retention empties; the rest is the
    /// small tables claims and acks update in place
    segments_at_end: i64,
    mean: f64,
}

struct Sustained {
    /// Bytes at the end of each minute, and the mean of the samples taken every 5 s in it.
    /// Retention empties a segment a rotation period (15 s) at a time, so a single sample
    /// catches four to five segments' worth, depending on when it falls.
    sizes: Vec<MinuteSizes>,
    written_per_second: f64,
    drained_per_second: f64,
    /// events not yet acked when the run stopped
    undelivered: i64,
    /// the consumer's claim + ack time per 1,000-event batch, median, in ms
    batch_ms: f64,
    /// CPU the consumer's server process spent per 1,000 events acked, in ms: unlike the
    /// batch time, not lengthened by the writers and autovacuum sharing the two cores
    server_cpu_ms: f64,
}

/// Writers at EVENTS_PER_SECOND and one consumer claiming 1,000 at a time, for `minutes`.
fn sustained_run(cluster: &Cluster, minutes: u64, hold_xmin: bool) -> Sustained {
    let mut c = cluster.connect("postgres");
    c.batch_execute("SELECT outbox_unsubscribe(name) FROM outbox_subscriptions; SELECT outbox_subscribe('default'); TRUNCATE chunks")
        .unwrap();
    // an idle REPEATABLE READ transaction: its snapshot holds back xmin for the whole run
    let mut holder = cluster.connect("postgres");
    if hold_xmin {
        holder.batch_execute("BEGIN ISOLATION LEVEL REPEATABLE READ; SELECT count(*) FROM chunks").unwrap();
    }
    let stop = Arc::new(AtomicBool::new(false));
    // several writers, as one cannot commit 20 times a second on a slow disk
    let writers: Vec<_> = (0..WRITERS).map(|_| {
        let (stop, dsn) = (stop.clone(), cluster.dsn("postgres"));
        std::thread::spawn(move || {
            let mut w = Client::connect(&dsn, NoTls).unwrap();
            // every upsert changes its row: one that rewrote the same values would capture nothing
            let upsert = w
                .prepare(
                    "INSERT INTO chunks SELECT id, 'doc', '{0.5,0.25}'
                     FROM (SELECT DISTINCT (random() * 1e6)::bigint AS id FROM generate_series(1, $1::int)) r
                     ON CONFLICT (id) DO UPDATE SET doc = chunks.doc || '.'",
                )
                .unwrap();
            let started = Instant::now();
            let mut written = 0u64;
            while !stop.load(Ordering::Relaxed) {
                let due = Duration::from_secs_f64(written as f64 * WRITERS as f64 / EVENTS_PER_SECOND as f64);
                if let Some(wait) = due.checked_sub(started.elapsed()) {
                    std::thread::sleep(wait);
                }
                written += w.execute(&upsert, &[&(ROWS_PER_WRITE as i32)]).unwrap();
            }
            written
        })
    }).collect();
    let drained = Arc::new(AtomicU64::new(0));
    let consumer = {
        let (stop, dsn, drained) = (stop.clone(), cluster.dsn("postgres"), drained.clone());
        std::thread::spawn(move || {
            let mut k = Client::connect(&dsn, NoTls).unwrap();
            let claim = k.prepare("SELECT array_agg(id) FROM outbox_claim(1000)").unwrap();
            let ack = k.prepare("SELECT outbox_ack($1)").unwrap();
            let cpu_before = backend_cpu(&mut k);
            let mut batch_times = Vec::new();
            while !stop.load(Ordering::Relaxed) {
                let started = Instant::now();
                let ids: Vec<i64> = k.query_one(&claim, &[]).unwrap().get::<_, Option<_>>(0).unwrap_or_default();
                if !ids.is_empty() {
                    k.execute(&ack, &[&ids]).unwrap();
                    drained.fetch_add(ids.len() as u64, Ordering::Relaxed);
                }
                if ids.len() == 1000 {
                    batch_times.push(started.elapsed().as_secs_f64() * 1000.0);
                } else {
                    // let a full batch gather, so that every run times the same work
                    std::thread::sleep(Duration::from_millis(500));
                }
            }
            (batch_times, backend_cpu(&mut k) - cpu_before)
        })
    };
    let started = Instant::now();
    let mut sizes = Vec::new();
    for minute in 1..=minutes {
        let samples: Vec<i64> = (1..=12)
            .map(|k| {
                std::thread::sleep(Duration::from_secs(60 * (minute - 1) + 5 * k).saturating_sub(started.elapsed()));
                outbox_size(&mut c)
            })
            .collect();
        let mean = samples.iter().sum::<i64>() as f64 / samples.len() as f64;
        sizes.push(MinuteSizes { minute, at_end: *samples.last().unwrap(), segments_at_end: segments_size(&mut c), mean });
    }
    stop.store(true, Ordering::Relaxed);
    let written: u64 = writers.into_iter().map(|w| w.join().unwrap()).sum();
    let (mut batch_times, consumer_cpu) = consumer.join().unwrap();
    let elapsed = started.elapsed().as_secs_f64();
    let undelivered = scalar_i64(&mut c, "SELECT (pending + in_flight + retrying)::bigint FROM outbox_backlog WHERE subscription = 'default'");
    if hold_xmin {
        holder.batch_execute("COMMIT").unwrap();
    }
    batch_times.sort_by(|a, b| a.partial_cmp(b).unwrap());
    let batch_ms = batch_times.get(batch_times.len() / 2).copied().unwrap_or(f64::NAN);
    Sustained {
        sizes,
        written_per_second: written as f64 / elapsed,
        drained_per_second: drained.load(Ordering::Relaxed) as f64 / elapsed,
        undelivered,
        batch_ms,
        server_cpu_ms: consumer_cpu * 1e3 / (drained.load(Ordering::Relaxed) as f64 / 1e3),
    }
}

fn sustained(cluster: &Cluster) {
    // two at least: growth compares the last minute with the second
    let minutes: u64 = std::env::var("OUTBOX_SUSTAINED_MINUTES").ok().and_then(|m| m.parse().ok()).unwrap_or(10).max(2);
    println!("## Sustained load: {EVENTS_PER_SECOND} events/s for {minutes} min, one consumer, outbox.retention = 1min\n");
    println!(
        "Writers upsert {ROWS_PER_WRITE} rows per transaction; one consumer claims 1,000 and acks. The delivery worker \
         runs retention. Sizes are all outbox tables with indexes and TOAST. The run with held xmin goes on at the \
         same time, in a second cluster on the same machine, with writers and a consumer of its own.\n"
    );
    // The held run has a cluster of its own and runs at the same time as the plain one, so
    // that both meet the same spells of the machine (one after the other, the plain run's batch
    // time moved by more between runs than the held xmin moved it). A held xmin reaches only
    // its own cluster.
    let held_cluster = bench_cluster();
    let (plain, held) = std::thread::scope(|s| {
        let plain = s.spawn(|| sustained_run(cluster, minutes, false));
        let held = s.spawn(|| sustained_run(&held_cluster, minutes, true));
        (plain.join().unwrap(), held.join().unwrap())
    });
    // autovacuum would clean up its ten minutes of upserts while the next benchmarks run
    held_cluster.stop("fast");
    println!(
        "| minute | size at its end (MB) | of it, log and ledger segments | mean over it (MB) | with held xmin, at its end (MB) | of it, segments | with held xmin, mean (MB) |\n|---|---|---|---|---|---|---|"
    );
    let mb = |bytes: i64| bytes as f64 / 1e6;
    for (a, b) in plain.sizes.iter().zip(&held.sizes) {
        println!(
            "| {} | {:.1} | {:.1} | {:.1} | {:.1} | {:.1} | {:.1} |",
            a.minute,
            mb(a.at_end),
            mb(a.segments_at_end),
            a.mean / 1e6,
            mb(b.at_end),
            mb(b.segments_at_end),
            b.mean / 1e6
        );
    }
    // The last minute against the first: by their ends, as the target reads, and by the means
    // of the last and second minutes (the first minute's mean is of a log still filling up)
    let growth = |s: &Sustained| {
        let last = s.sizes.last().unwrap();
        (last.mean / s.sizes[1].mean, last.at_end as f64 / s.sizes[0].at_end as f64)
    };
    println!(
        "\n| run | last minute's mean ÷ second minute's | at the end of the last minute ÷ of the first | written events/s | drained events/s | undelivered at the end | claim + ack of 1,000 (median ms) | drain capacity (events/s) | consumer's server CPU per 1,000 events (ms) |"
    );
    println!("|---|---|---|---|---|---|---|---|---|");
    for (name, s) in [("no held xmin", &plain), ("idle REPEATABLE READ transaction for the whole run", &held)] {
        let (mean_growth, end_growth) = growth(s);
        println!(
            "| {name} | {mean_growth:.2} | {end_growth:.2} | {:.0} | {:.0} | {} | {:.2} | {:.0} | {:.2} |",
            s.written_per_second,
            s.drained_per_second,
            s.undelivered,
            s.batch_ms,
            1000.0 / s.batch_ms * 1000.0,
            s.server_cpu_ms
        );
    }
    println!("\nDrain capacity with held xmin ÷ without: **{:.2}**\n", plain.batch_ms / held.batch_ms);
    println!(
        "Consumer's server CPU per event without held xmin ÷ with: **{:.2}** (the same capacity measured by the \
         work a claim and ack cost, which the machine's other load does not lengthen)\n",
        plain.server_cpu_ms / held.server_cpu_ms
    );
}

/// Bytes of the log and ledger segments, indexes and TOAST included.
fn segments_size(c: &mut Client) -> i64 {
    scalar_i64(
        c,
        "SELECT coalesce(sum(pg_total_relation_size(c.oid)), 0)::bigint FROM pg_class c
         WHERE c.relkind = 'r' AND c.relname ~ '^outbox_(log|ledger)_[0-9]+$'",
    )
}

/// Microseconds since the Unix epoch: consumer processes and the benchmark share the clock.
fn unix_micros() -> i64 {
    std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).unwrap().as_micros() as i64
}

/// One consumer of the scaling benchmark, given `dsn|subscription|batch_size`: connects, says
/// it is ready, waits for the go, drains until three claims in a row find nothing, then prints
/// how many events it acked and when it acked the last of them.
fn consumer_process(spec: &str) {
    let mut parts = spec.split('|');
    let (dsn, subscription, batch): (&str, &str, i32) =
        (parts.next().unwrap(), parts.next().unwrap(), parts.next().unwrap().parse().unwrap());
    let mut c = Client::connect(dsn, NoTls).unwrap();
    let claim = c.prepare("SELECT array_agg(id) FROM outbox_claim($1, $2)").unwrap();
    let ack = c.prepare("SELECT outbox_ack($1, $2)").unwrap();
    // A backend's first claims load its catalog caches and plan each query (Postgres plans
    // a prepared query afresh five times before it settles on one plan). A long-running
    // consumer pays that once; here it would be paid eight times within the clocked second
    // or two with eight consumers. So each consumer warms up on a subscription of its own.
    for _ in 0..WARMUP_CLAIMS {
        let ids: Option<Vec<i64>> = c.query_one(&claim, &[&10i32, &WARMUP_SUBSCRIPTION]).unwrap().get(0);
        c.query_one(&ack, &[&ids.expect("warm-up events"), &WARMUP_SUBSCRIPTION]).unwrap();
    }
    println!("ready");
    std::io::stdin().read_line(&mut String::new()).unwrap();
    let (mut acked, mut last_ack, mut empty) = (0i64, 0i64, 0);
    while empty < 3 {
        let ids: Option<Vec<i64>> = c.query_one(&claim, &[&batch, &subscription]).unwrap().get(0);
        match ids {
            Some(ids) => {
                empty = 0;
                acked += i64::from(c.query_one(&ack, &[&ids, &subscription]).unwrap().get::<_, i32>(0));
                last_ack = unix_micros();
            }
            None => {
                empty += 1;
                std::thread::sleep(Duration::from_millis(20));
            }
        }
    }
    println!("{acked} {last_ack}");
}

/// Drains subscription `name` with `consumers` processes; returns events/s and how many of the
/// machine's cores were busy meanwhile. The clock runs from when every consumer has connected
/// to its last ack: starting processes and backends is not consuming, and it would weigh eight
/// times as much with eight consumers.
fn drain_with(cluster: &Cluster, name: &str, consumers: usize, batch: i32) -> (f64, f64) {
    use std::io::{BufRead, BufReader, Write};
    let mut children: Vec<_> = (0..consumers)
        .map(|_| {
            let mut child = Command::new(std::env::current_exe().unwrap())
                .env(CONSUMER_ENV, format!("{}|{name}|{batch}", cluster.dsn("postgres")))
                .stdin(Stdio::piped())
                .stdout(Stdio::piped())
                .spawn()
                .unwrap();
            let mut output = BufReader::new(child.stdout.take().unwrap());
            let mut ready = String::new();
            output.read_line(&mut ready).unwrap();
            assert_eq!(ready.trim(), "ready");
            (child, output)
        })
        .collect();
    let busy_before = busy_cpu_seconds();
    let go = unix_micros();
    for (child, _) in &mut children {
        child.stdin.take().unwrap().write_all(b"go\n").unwrap();
    }
    let (mut acked, mut last_ack) = (0i64, go);
    for (mut child, mut output) in children {
        let mut report = String::new();
        output.read_line(&mut report).unwrap();
        assert!(child.wait().unwrap().success());
        let (count, at) = report.trim().split_once(' ').unwrap();
        acked += count.parse::<i64>().unwrap();
        last_ack = last_ack.max(at.parse().unwrap());
    }
    // (until the last consumer has exited: its three empty claims 20 ms apart count too)
    let busy = (busy_cpu_seconds() - busy_before) / ((unix_micros() - go) as f64 / 1e6);
    assert_eq!(acked, SCALE_EVENTS, "every event acked exactly once");
    (SCALE_EVENTS as f64 / ((last_ack - go) as f64 / 1e6), busy)
}

/// CPU seconds the machine's cores have spent busy since boot (/proc/stat: user, nice, system,
/// irq, softirq, steal).
fn busy_cpu_seconds() -> f64 {
    let stat = std::fs::read_to_string("/proc/stat").unwrap();
    let ticks: Vec<f64> = stat.lines().next().unwrap().split_whitespace().skip(1).map(|t| t.parse().unwrap()).collect();
    [0, 1, 2, 5, 6, 7].iter().map(|&i| ticks[i]).sum::<f64>() / 100.0
}

fn scale(cluster: &Cluster) {
    let mut c = cluster.connect("postgres");
    // one set of events for every run: each run drains a subscription of its own, all of them
    // created before the events are written
    let runs: Vec<(String, usize, usize, i32)> = (0..SCALE_REPEATS)
        .flat_map(|round| {
            SCALE_CONSUMERS.into_iter().enumerate().flat_map(move |(i, consumers)| {
                SCALE_BATCHES.into_iter().enumerate().map(move |(j, batch)| (format!("scale_{round}_{consumers}_{batch}"), i, j, batch))
            })
        })
        .collect();
    c.batch_execute("SELECT outbox_unsubscribe(name) FROM outbox_subscriptions; TRUNCATE chunks").unwrap();
    for name in runs.iter().map(|(name, ..)| name.as_str()).chain([WARMUP_SUBSCRIPTION]) {
        c.execute("SELECT outbox_subscribe($1)", &[&name]).unwrap();
    }
    // single-row events, written by four sessions at once as a real write load would be
    let writers: Vec<_> = (0..4)
        .map(|w| {
            let dsn = cluster.dsn("postgres");
            std::thread::spawn(move || {
                let mut k = Client::connect(&dsn, NoTls).unwrap();
                let insert = k.prepare("INSERT INTO chunks VALUES ($1, 'doc', '{0.5}')").unwrap();
                for id in (w..SCALE_EVENTS).step_by(4) {
                    k.execute(&insert, &[&id]).unwrap();
                }
            })
        })
        .collect();
    writers.into_iter().for_each(|w| w.join().unwrap());
    // Vacuum and checkpoint now, as the drain benchmark does: otherwise the autovacuum of the
    // 200,000 new rows and the checkpoint after them land on whichever runs come first, and
    // took up to half the throughput of the runs they met.
    c.batch_execute("VACUUM ANALYZE").unwrap();
    c.batch_execute("CHECKPOINT").unwrap();

    // runs go through every configuration in turn, so that a slow spell of the machine does
    // not land on one configuration only
    let mut rates = vec![vec![Vec::new(); SCALE_BATCHES.len()]; SCALE_CONSUMERS.len()];
    let mut busy = rates.clone();
    for (name, i, j, batch) in &runs {
        let (rate, cores) = drain_with(cluster, name, SCALE_CONSUMERS[*i], *batch);
        rates[*i][*j].push(rate);
        busy[*i][*j].push(cores);
        c.execute("SELECT outbox_unsubscribe($1)", &[name]).unwrap();
    }
    let medians_of = |runs: Vec<Vec<Vec<f64>>>| -> Vec<Vec<f64>> { runs.into_iter().map(|row| row.into_iter().map(median).collect()).collect() };
    let (medians, busy) = (medians_of(rates), medians_of(busy));

    println!("## Pull consumers on one subscription, each a process of its own\n");
    println!(
        "{SCALE_EVENTS} events captured by single-row transactions from four sessions, drained by N consumers \
         through a subscription of its own each run; median of {SCALE_REPEATS} interleaved runs. Each consumer \
         first makes {WARMUP_CLAIMS} claims and acks on a subscription of its own, and the clock runs from when \
         all are ready to the last ack. Cores busy: the machine's, consumers included, while they drain.\n"
    );
    println!("| consumers | batch_size 100 (events/s) | ÷ 1 consumer | cores busy | batch_size 1000 (events/s) | ÷ 1 consumer | cores busy |");
    println!("|---|---|---|---|---|---|---|");
    let mut worst = f64::MAX;
    for (i, consumers) in SCALE_CONSUMERS.into_iter().enumerate() {
        let ratio = |j: usize| medians[i][j] / medians[0][j];
        if i > 0 {
            worst = worst.min(medians[i][0] / medians[i - 1][0]).min(medians[i][1] / medians[i - 1][1]);
        }
        let (rate, cores) = (&medians[i], &busy[i]);
        println!("| {consumers} | {:.0} | {:.2} | {:.2} | {:.0} | {:.2} | {:.2} |", rate[0], ratio(0), cores[0], rate[1], ratio(1), cores[1]);
    }
    println!("\nLowest ratio of a row to the one before (more consumers ÷ fewer): **{worst:.2}**\n");
}

fn three_subscriptions(cluster: &Cluster) {
    let mut c = cluster.connect("postgres");
    c.batch_execute(
        "CREATE TABLE IF NOT EXISTS stage AS
             SELECT g::bigint AS id, 'document ' || g AS doc,
                    (SELECT array_agg(random()::real) FROM generate_series(1, 384) WHERE g > 0) AS embedding
             FROM generate_series(1, 100000) g;
         SELECT outbox_unsubscribe(name) FROM outbox_subscriptions;",
    )
    .unwrap();
    let load = |c: &mut Client| -> f64 {
        c.batch_execute("TRUNCATE chunks; CHECKPOINT").unwrap();
        let started = Instant::now();
        for first in (1..=100_000i64).step_by(1000) {
            c.execute("INSERT INTO chunks SELECT * FROM stage WHERE id BETWEEN $1 AND $1 + 999", &[&first]).unwrap();
        }
        started.elapsed().as_secs_f64()
    };
    let mut ratios = Vec::new();
    for _ in 0..7 {
        c.batch_execute("SELECT outbox_unsubscribe(name) FROM outbox_subscriptions; SELECT outbox_subscribe('one')").unwrap();
        let one = load(&mut c);
        c.batch_execute("SELECT outbox_subscribe('two'); SELECT outbox_subscribe('three')").unwrap();
        let three = load(&mut c);
        ratios.push(three / one);
    }
    ratios.sort_by(|a, b| a.partial_cmp(b).unwrap());
    println!("## Write path with three subscriptions against one\n");
    println!("100,000 rows of (id, doc, embedding real[384]) in 1,000-row INSERT … SELECT statements, 7 alternating rounds.\n");
    println!(
        "Load time with 3 subscriptions ÷ with 1: **{:.3}** (median; range {:.3}–{:.3}). Events are written once, whatever the number of subscriptions.\n",
        ratios[3], ratios[0], ratios[6]
    );
}
