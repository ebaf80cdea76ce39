//! The delivery worker: with `shared_preload_libraries = 'outbox'` it delivers every
//! subscription that has a sink, through the same claim/ack/fail as any consumer.
//!
//! * A commit that captured events sets the worker's latch (as pg_net does; no NOTIFY), so
//!   delivery starts within milliseconds and an idle worker sleeps.
//! * No transaction stays open while a sink works: a batch for an HTTP sink is claimed and
//!   committed, posted from a thread of its own (one per sink, so a slow sink delays nobody
//!   else), and acked or failed in a new transaction. Those threads never call Postgres.
//! * A function sink runs in the transaction that acks its batch, so an in-database processor
//!   applies each batch exactly once; HTTP sinks are served between two such calls.
//! * A rejected batch (HTTP 4xx, or a function error) is split in halves until the poison
//!   event is alone; an unavailable sink (transport error, timeout, 5xx, 429) gets its events
//!   back without using an attempt and backs off as a whole. After a timeout its batches are
//!   smaller for a while, in case the batch was too big to finish in time.
//! * It runs retention (`outbox_purge`) for its database, so nobody has to schedule it.

use std::collections::{HashMap, HashSet, VecDeque};
use std::io::{Read, Write};
use std::os::unix::io::AsRawFd;
use std::os::unix::net::UnixStream;
use std::panic::AssertUnwindSafe;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::mpsc;
use std::sync::Arc;
use std::time::{Duration, Instant};

use pgrx::bgworkers::{BackgroundWorker, BackgroundWorkerBuilder, BgWorkerStartTime, SignalWakeFlags};
use pgrx::pg_sys;
use pgrx::prelude::*;
use pgrx::spi::SpiClient;
use pgrx::{pg_shmem_init, PgAtomic};

use crate::consume::{self, required};
use crate::error::OutboxError;
use crate::ext::Extension;
use crate::guc;
use crate::policy::{random_unit, read_sink_call_mark, retention_wait, sink_call_mark, RetryPolicy};
use crate::queries::{self as q, run};
use crate::sink::{batch_body, halves, idempotency_key, judge, BatchLimit, Breaker, HttpSink, Outcome, Sink, Transition};

/// The worker's latch, published while it runs; 0 otherwise.
static WORKER_LATCH: PgAtomic<AtomicUsize> = unsafe { PgAtomic::new(c"outbox_worker_latch") };
/// Whether the worker has sinks to serve: capture wakes it only then.
static WORKER_HAS_SINKS: PgAtomic<AtomicBool> = unsafe { PgAtomic::new(c"outbox_worker_has_sinks") };
/// The function sink whose call the worker last ended in, and how many times running: the
/// next worker backs it off that much. Written for each call and removed when the call
/// returns (a call that returns, in time or not, ends the run). A file in the data directory,
/// not shared memory: a call that takes the server down (the kernel's OOM killer, a crash in C
/// code) has every process restarted and shared memory made anew, and the next worker called
/// the sink again at once, into the same crash. It names the postmaster (its start time),
/// which a crash restart keeps and a stop and start does not, and the worker's database.
const STUCK_SINK_FILE: &str = "outbox_sink_in_call";
/// Set in the postmaster when the library is preloaded; backends inherit it.
static PRELOADED: AtomicBool = AtomicBool::new(false);

/// Why the worker should be woken when the current transaction commits.
#[derive(Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
pub enum Wake {
    No,
    /// Events were captured: wake the worker if it has sinks.
    Events,
    /// Subscriptions changed: wake it in any case.
    Subscriptions,
}

thread_local! {
    static WAKE_AT_COMMIT: std::cell::Cell<Wake> = const { std::cell::Cell::new(Wake::No) };
}

/// A claim by the worker is recovered when the worker restarts, so it can be long.
const WORKER_LEASE: Duration = Duration::from_secs(3600);
/// `last_success_at` in `outbox_sink_state` is written at most this often.
const SUCCESS_RECORD_INTERVAL: Duration = Duration::from_secs(1);

pub fn init() {
    unsafe { pg_sys::RegisterXactCallback(Some(on_xact_end), std::ptr::null_mut()) };
    if !unsafe { pg_sys::process_shared_preload_libraries_in_progress } {
        return;
    }
    PRELOADED.store(true, Ordering::SeqCst);
    pg_shmem_init!(WORKER_LATCH = AtomicUsize::new(0));
    pg_shmem_init!(WORKER_HAS_SINKS = AtomicBool::new(false));
    BackgroundWorkerBuilder::new("outbox delivery worker")
        .set_type("outbox delivery worker")
        .set_library("outbox")
        .set_function("outbox_worker_main")
        .enable_spi_access()
        .set_start_time(BgWorkerStartTime::RecoveryFinished)
        .set_restart_time(Some(Duration::from_secs(1)))
        .load();
}

/// Asks for the worker to be woken when the current transaction commits.
pub fn wake_at_commit(why: Wake) {
    WAKE_AT_COMMIT.with(|w| w.set(w.get().max(why)));
}

#[pg_guard]
unsafe extern "C-unwind" fn on_xact_end(event: pg_sys::XactEvent::Type, _arg: *mut std::ffi::c_void) {
    use pg_sys::XactEvent::*;
    match event {
        XACT_EVENT_COMMIT | XACT_EVENT_PARALLEL_COMMIT => {
            let why = WAKE_AT_COMMIT.with(|w| w.replace(Wake::No));
            if why != Wake::No && PRELOADED.load(Ordering::Relaxed) {
                let latch = WORKER_LATCH.get().load(Ordering::Acquire);
                let wanted = why == Wake::Subscriptions || WORKER_HAS_SINKS.get().load(Ordering::Acquire);
                if latch != 0 && wanted {
                    unsafe { pg_sys::SetLatch(latch as *mut pg_sys::Latch) };
                }
            }
        }
        XACT_EVENT_ABORT | XACT_EVENT_PARALLEL_ABORT => WAKE_AT_COMMIT.with(|w| w.set(Wake::No)),
        _ => {}
    }
}

/// Set in the delivery worker's process (consume.rs says what for).
pub static IS_DELIVERY_WORKER: AtomicBool = AtomicBool::new(false);

#[pg_guard]
#[unsafe(no_mangle)]
pub extern "C-unwind" fn outbox_worker_main(_arg: pg_sys::Datum) {
    IS_DELIVERY_WORKER.store(true, Ordering::Relaxed);
    BackgroundWorker::attach_signal_handlers(SignalWakeFlags::SIGHUP);
    // SIGTERM (a server stop, pg_terminate_backend) ends the worker at its next interrupt check,
    // as it ends a backend (Postgres' own handler): also while it waits for a lock (a replay
    // or requeue held open in a transaction, or prepared) or runs a function sink. Whatever
    // its transaction did rolls back, and the next worker gives back what this one had in
    // flight.
    unsafe {
        #[cfg(not(feature = "pg18"))]
        pg_sys::pqsignal(pg_sys::SIGTERM as i32, Some(die));
        #[cfg(feature = "pg18")]
        pg_sys::pqsignal_be(pg_sys::SIGTERM as i32, Some(die));
        pg_sys::before_shmem_exit(Some(unpublish_worker), pg_sys::Datum::from(0));
    }
    let database = guc::worker_database();
    BackgroundWorker::connect_worker_to_spi(Some(&database), None);
    // Nothing the worker commits needs to wait for its WAL flush: a claim or ack lost in a
    // crash means a delivery repeated, which at-least-once allows, and the worker gives back
    // whatever its predecessor had in flight when it starts.
    // Its queries name tables by schema; operators and functions come from pg_catalog only.
    // It writes (claims, acks) and purges in READ COMMITTED whatever the database's defaults
    // say: a database read-only or REPEATABLE READ by default had it restart every second.
    in_transaction(|| {
        Ok(Spi::run(
            "SET synchronous_commit = off; SET search_path = pg_catalog, pg_temp; \
             SET default_transaction_read_only = off; SET default_transaction_isolation = 'read committed'",
        )?)
    });
    WORKER_LATCH.get().store((unsafe { pg_sys::MyLatch }) as usize, Ordering::Release);
    log!("outbox worker started for database \"{database}\"");
    let mut worker = Worker::new();
    loop {
        // SIGTERM ends the worker here, and barriers (DROP DATABASE waits on every backend to
        // absorb one) are taken
        pgrx::check_for_interrupts!();
        if BackgroundWorker::sighup_received() {
            unsafe { pg_sys::ProcessConfigFile(pg_sys::GucContext::PGC_SIGHUP) };
            if guc::worker_database() != database {
                log!("outbox.database changed; the outbox worker restarts to serve \"{}\"", guc::worker_database());
                break;
            }
        }
        let wait = if guc::worker_enabled() { worker.round() } else { worker.pause() };
        worker.wait(wait);
    }
    // exit code 1: the postmaster starts the worker again
    unsafe { pg_sys::proc_exit(1) };
}

// Postgres' SIGTERM handler for backends; pgrx binds it only as a Rust function.
unsafe extern "C-unwind" {
    fn die(signal: std::ffi::c_int);
}

/// Committers stop waking the worker once it is gone, however it ends.
#[pg_guard]
unsafe extern "C-unwind" fn unpublish_worker(_code: std::ffi::c_int, _arg: pg_sys::Datum) {
    WORKER_LATCH.get().store(0, Ordering::Release);
    WORKER_HAS_SINKS.get().store(false, Ordering::Release);
}

/// What a sink's HTTP thread is asked to post.
struct HttpJob {
    subscription: i32,
    /// The runner that posts it (see SinkRunner::generation).
    generation: u64,
    ids: Vec<i64>,
    body: String,
}

struct HttpResult {
    subscription: i32,
    generation: u64,
    ids: Vec<i64>,
    outcome: Outcome,
}

/// A batch an HTTP sink is working through: the piece being posted and the halves still to
/// post after a rejection.
struct InFlight {
    events: HashMap<i64, String>,
    queue: VecDeque<Vec<i64>>,
}

struct SinkRunner {
    /// Which runner of the subscription this is. A runner is replaced when its subscription
    /// changes; the answer to a piece its predecessor posted is not this runner's to settle.
    generation: u64,
    name: String,
    sink: Sink,
    policy: RetryPolicy,
    breaker: Breaker,
    limit: BatchLimit,
    lane: Option<mpsc::Sender<HttpJob>>,
    in_flight: Option<InFlight>,
    last_success_recorded: Option<Instant>,
    /// How many workers in a row ended during a call of this function sink (STUCK_SINK_FILE).
    calls_ended_worker: u32,
}

impl SinkRunner {
    fn batch_size(&self) -> i32 {
        self.sink.batch_size().unwrap_or_else(guc::worker_batch_size)
    }

    fn delivered(&mut self, client: &mut SpiClient<'_>, extension: &Extension, subscription: i32, sent: usize) -> Result<(), OutboxError> {
        self.limit.delivered(sent, self.batch_size());
        record_success(client, extension, subscription, self)
    }

    /// `piece` got no answer within the sink's timeout, and `rest` was still to be sent. The
    /// sink backs off and its next batches are smaller, as after any timeout (BatchLimit). An
    /// event that timed out alone waits `backoff_max` longer than the sink, without using an
    /// attempt, so that the events behind it go first: one too big to ever finish in time
    /// then holds back only its own row, and takes the sink's time once a `backoff_max`.
    fn timed_out(
        &mut self,
        client: &mut SpiClient<'_>,
        extension: &Extension,
        subscription: i32,
        piece: Vec<i64>,
        rest: impl IntoIterator<Item = i64>,
        reason: &str,
    ) -> Result<(), OutboxError> {
        self.limit.timed_out(piece.len());
        if piece.len() > 1 {
            return self.back_off(client, extension, subscription, piece.into_iter().chain(rest), reason, None);
        }
        self.back_off(client, extension, subscription, rest, reason, None)?;
        let sink_waits = self.breaker.open_until().map_or(Duration::ZERO, |until| until.saturating_duration_since(Instant::now()));
        let aside = (sink_waits + self.policy.backoff_max).as_micros() as i64;
        consume::fail_in(client, extension, piece, Some(reason), &self.name, Some(aside), false)?;
        Ok(())
    }

    /// The sink is at fault, not the events (it is down, or too slow): gives `ids` back without
    /// using an attempt and backs the whole sink off.
    fn back_off(
        &mut self,
        client: &mut SpiClient<'_>,
        extension: &Extension,
        subscription: i32,
        ids: impl IntoIterator<Item = i64>,
        reason: &str,
        retry_after: Option<Duration>,
    ) -> Result<(), OutboxError> {
        consume::fail_in(client, extension, ids, Some(reason), &self.name, Some(0), false)?;
        let transition = self.breaker.unavailable(Instant::now(), retry_after, &self.policy, random_unit());
        let until = self.breaker.open_until().map(|u| u.saturating_duration_since(Instant::now()));
        if let Transition::BackingOff { delay } = transition {
            log!("outbox: sink of subscription \"{}\" is unavailable ({reason}); backing off for {delay:?}", self.name);
        }
        record_error(client, extension, subscription, reason, until)
    }
}

struct Worker {
    /// When the worker next runs retention (`outbox_purge`) for this database.
    next_retention: Instant,
    sinks: HashMap<i32, SinkRunner>,
    /// Subscriptions whose options the worker cannot use, with the reason it last gave.
    refused: HashMap<i32, String>,
    runners_made: u64,
    results: mpsc::Receiver<HttpResult>,
    results_sender: mpsc::Sender<HttpResult>,
    wake_read: UnixStream,
    wake_write: UnixStream,
    /// The function sink a worker before this one ended in a call of, and how many times
    /// running: backed off once, when its first runner is made (which keeps the count for
    /// its next call).
    overrun: Option<(i32, u32)>,
}

/// Runs `work` in a transaction of its own. An error is raised inside it, so the transaction
/// rolls back with everything it did, and ends the worker (the next one gives back what this
/// one had in flight): returned out of `BackgroundWorker::transaction`, which commits whatever
/// its closure returns, an error committed the work done before it.
fn in_transaction<R>(work: impl FnOnce() -> Result<R, OutboxError>) -> R {
    BackgroundWorker::transaction(AssertUnwindSafe(|| work().unwrap_or_else(|e| e.raise())))
}

fn extension_created() -> bool {
    let oid = unsafe { pg_sys::get_extension_oid(c"outbox".as_ptr(), true) };
    oid != pg_sys::InvalidOid
}

/// Retention for the served database, so that nobody has to schedule `outbox_purge`.
/// Returns how long until its next pass has work to do.
fn retain() -> Result<Option<Duration>, OutboxError> {
    if !extension_created() {
        return Ok(None);
    }
    let purged = crate::admin::purge()?;
    if purged.removed > 0 {
        debug1!("outbox: retention removed {} processed events", purged.removed);
    }
    Ok(purged.next_due)
}

impl Worker {
    fn new() -> Worker {
        let (results_sender, results) = mpsc::channel();
        let (wake_read, wake_write) = UnixStream::pair().expect("socket pair");
        wake_read.set_nonblocking(true).expect("non-blocking socket");
        Worker {
            next_retention: Instant::now(),
            sinks: HashMap::new(),
            refused: HashMap::new(),
            runners_made: 0,
            results,
            results_sender,
            wake_read,
            wake_write,
            overrun: Watchdog::overrun(),
        }
    }

    /// With the worker disabled: forget the sinks and let capture stop waking us.
    fn pause(&mut self) -> Duration {
        self.sinks.clear();
        WORKER_HAS_SINKS.get().store(false, Ordering::Release);
        guc::poll_interval()
    }

    /// Sleeps until a commit sets the latch, an HTTP thread finishes, or `timeout` passes.
    fn wait(&mut self, timeout: Duration) {
        if timeout.is_zero() {
            return;
        }
        let events = pg_sys::WL_LATCH_SET | pg_sys::WL_SOCKET_READABLE | pg_sys::WL_TIMEOUT | pg_sys::WL_EXIT_ON_PM_DEATH;
        unsafe {
            pg_sys::WaitLatchOrSocket(
                pg_sys::MyLatch,
                events as i32,
                self.wake_read.as_raw_fd(),
                timeout.as_millis().clamp(1, i32::MAX as u128) as i64,
                pg_sys::PG_WAIT_EXTENSION,
            );
            pg_sys::ResetLatch(pg_sys::MyLatch);
        }
        let mut drained = [0u8; 64];
        while matches!(self.wake_read.read(&mut drained), Ok(n) if n > 0) {}
    }

    /// One pass: settle finished HTTP deliveries, then start new ones. Returns how long to
    /// sleep before the next pass.
    fn round(&mut self) -> Duration {
        self.settle_answers();
        if Instant::now() >= self.next_retention {
            let next_due = in_transaction(retain);
            self.next_retention = Instant::now() + retention_wait(guc::retention(), next_due);
        }
        let (mut wait, functions, jobs) = in_transaction(|| self.deliver());
        self.post_all(jobs);
        // A function sink's call holds the loop for as long as it runs (up to its timeout):
        // each runs in a transaction of its own, and the HTTP sinks that answered meanwhile
        // get their next batch between two calls. (Claimed in the same transaction as the
        // calls, an HTTP batch waited for every function sink, and with function calls just
        // under their timeout a reviewer's HTTP sinks fell further behind by the second.)
        for subscription in functions {
            let busy = in_transaction(|| self.run_function_sink(subscription));
            self.settle_answers();
            let (_, http_busy, jobs) = in_transaction(|| self.claim_http());
            self.post_all(jobs);
            if busy || http_busy {
                wait = Duration::ZERO;
            }
        }
        wait.min(self.next_retention.saturating_duration_since(Instant::now()))
    }

    fn settle_answers(&mut self) {
        while let Ok(result) = self.results.try_recv() {
            in_transaction(|| self.settle(result));
        }
    }

    /// Claims a batch for every HTTP sink that is ready (`claim_http`). Returns how long to
    /// sleep, the function sinks to run, and the HTTP batches to post once the claims have
    /// committed.
    fn deliver(&mut self) -> Result<(Duration, Vec<i32>, Vec<HttpJob>), OutboxError> {
        let (next_due, busy, jobs) = self.claim_http()?;
        let now = Instant::now();
        let mut functions: Vec<i32> = self
            .sinks
            .iter()
            .filter(|(_, r)| matches!(r.sink, Sink::Function { .. }) && r.breaker.allows(now))
            .map(|(id, _)| *id)
            .collect();
        functions.sort_unstable();
        let breakers = self.sinks.values().filter_map(|r| r.breaker.open_until()).min();
        let wait = if busy {
            Duration::ZERO
        } else {
            let mut wait = guc::poll_interval();
            for due in [next_due, breakers].into_iter().flatten() {
                wait = wait.min(due.saturating_duration_since(Instant::now()));
            }
            wait
        };
        Ok((wait, functions, jobs))
    }

    /// Claims a batch for every HTTP sink that is ready, with the sink list brought up to date
    /// first: a function sink's call can take seconds, in which a subscription may have been
    /// dropped and made again under its name, and a claim by name would take the new one's
    /// events for the old one's sink. Returns when the next retry of a sink falls due (see
    /// `refresh`), whether a batch came back full (more is waiting), and the batches to post
    /// once the claims have committed.
    fn claim_http(&mut self) -> Result<(Option<Instant>, bool, Vec<HttpJob>), OutboxError> {
        if !extension_created() {
            // not created yet, or dropped: check again later instead of failing
            self.sinks.clear();
            WORKER_HAS_SINKS.get().store(false, Ordering::Release);
            return Ok((None, false, Vec::new()));
        }
        let extension = Extension::current()?;
        Spi::connect_mut(|client| {
            let next_due = self.refresh(client, &extension)?;
            let now = Instant::now();
            let mut busy = false;
            // in id order, as a requeue of every subscription locks them, so the two never wait
            // for each other's locks in a circle
            let mut ids: Vec<i32> =
                self.sinks.iter().filter(|(_, r)| matches!(r.sink, Sink::Http(_))).map(|(id, _)| *id).collect();
            ids.sort_unstable();
            let mut jobs = Vec::new();
            for id in ids {
                let runner = self.sinks.get_mut(&id).expect("listed");
                if runner.in_flight.is_some() || !runner.breaker.allows(now) {
                    continue;
                }
                let batch_size = runner.limit.of(runner.batch_size());
                let events = claim_for(client, &extension, id, runner, batch_size)?;
                if events.is_empty() {
                    continue;
                }
                busy |= events.len() == batch_size as usize;
                let ids: Vec<i64> = events.iter().map(|(id, _)| *id).collect();
                let body = batch_body(events.iter().map(|(_, e)| e.as_str()));
                runner.in_flight = Some(InFlight { events: events.into_iter().collect(), queue: VecDeque::new() });
                jobs.push(HttpJob { subscription: id, generation: runner.generation, ids, body });
            }
            Ok((next_due, busy, jobs))
        })
    }

    /// Claims a batch for function sink `subscription` and calls it, in a transaction of its
    /// own. Returns whether the batch was full (more is waiting).
    fn run_function_sink(&mut self, subscription: i32) -> Result<bool, OutboxError> {
        if !extension_created() {
            return Ok(false);
        }
        let extension = Extension::current()?;
        let Some(runner) = self.sinks.get_mut(&subscription).filter(|r| r.breaker.allows(Instant::now())) else {
            return Ok(false);
        };
        let Sink::Function { function, timeout, .. } = runner.sink.clone() else { return Ok(false) };
        Spi::connect_mut(|client| {
            let batch_size = runner.limit.of(runner.batch_size());
            let events = claim_for(client, &extension, subscription, runner, batch_size)?;
            if events.is_empty() {
                return Ok(false);
            }
            let busy = events.len() == batch_size as usize;
            let ids: Vec<i64> = events.iter().map(|(id, _)| *id).collect();
            let rendered: HashMap<i64, String> = events.into_iter().collect();
            apply_function(client, &extension, subscription, runner, (&function, timeout), &rendered, ids)?;
            Ok(busy)
        })
    }

    /// Brings the sink list up to date. Returns when the next retry or lease expiry of a sink
    /// that could deliver it falls due.
    fn refresh(&mut self, client: &mut SpiClient<'_>, extension: &Extension) -> Result<Option<Instant>, OutboxError> {
        let mut seen = HashSet::new();
        let mut due_at: HashMap<i32, Instant> = HashMap::new();
        let now_micros = consume::now();
        for row in run(client, extension, &q::SINK_SUBSCRIPTIONS, &[])? {
            let id: i32 = required(&row, 1)?;
            let name: String = required(&row, 2)?;
            let sink_name: String = required(&row, 3)?;
            let options: pgrx::JsonB = required(&row, 4)?;
            if let Some(due) = row.get::<pgrx::datum::TimestampWithTimeZone>(5)? {
                // a due time already past was claimable in this round, or is held back by its row
                let micros = pg_sys::TimestampTz::from(due) - now_micros;
                if micros > 0 {
                    due_at.insert(id, Instant::now() + Duration::from_micros(micros as u64));
                }
            }
            seen.insert(id);
            let usable = Sink::parse(&sink_name, &options.0).and_then(|sink| Ok((sink, guc::retry_policy().with_overrides(&options.0)?)));
            let (sink, policy) = match usable {
                Ok(usable) => {
                    self.refused.remove(&id);
                    usable
                }
                Err(e) => {
                    // Options changed by an UPDATE are not checked as outbox_subscribe checks
                    // them. Such a subscription waits until they are mended, said once in the
                    // log and in the backlog; a retry option the worker could not read ended
                    // every round, and no sink was delivered. What its runner had in flight is
                    // given back by the runner made once they are mended.
                    let reason = format!("not delivered, its options are invalid: {e}");
                    if self.refused.get(&id) != Some(&reason) {
                        warning!("outbox: subscription \"{name}\" is {reason}");
                        record_error(client, extension, id, &reason, None)?;
                        self.refused.insert(id, reason);
                    }
                    self.sinks.remove(&id);
                    continue;
                }
            };
            let changed = self.sinks.get(&id).is_none_or(|r| r.sink != sink || r.name != name);
            if changed {
                // whatever this subscription had in flight belongs to a runner (or a worker)
                // that is gone: a changed subscription's was stranded until its lease ended
                consume::recover_in(client, extension, &name)?;
                self.runners_made += 1;
                let lane = match &sink {
                    Sink::Http(http) => Some(spawn_lane(http.clone(), self.results_sender.clone(), self.wake_write.try_clone().expect("socket clone"))),
                    _ => None,
                };
                log!("outbox: delivering subscription \"{name}\" to its {sink_name} sink");
                let mut breaker = Breaker::default();
                let ended = self.overrun.take_if(|(stuck, _)| *stuck == id).map_or(0, |(_, times)| times);
                if ended > 0 {
                    // a worker before this one ended in a call of this sink: calling it again
                    // at once would hold up every other sink as long again, or end this worker
                    for _ in 0..ended.min(32) {
                        breaker.unavailable(Instant::now(), None, &policy, random_unit());
                    }
                    let until = breaker.open_until().map(|u| u.saturating_duration_since(Instant::now()));
                    let reason = "the worker ended during a call and was restarted (the call ran past twice its timeout, \
                                  the function or an administrator ended the worker, or the server crashed in it)";
                    let seconds = until.unwrap_or_default().as_secs_f64();
                    warning!("outbox: sink of subscription \"{name}\": {reason}; backing off for {seconds:.1} s");
                    record_error(client, extension, id, reason, until)?;
                }
                self.sinks.insert(
                    id,
                    SinkRunner {
                        generation: self.runners_made,
                        name,
                        sink,
                        policy,
                        breaker,
                        limit: BatchLimit::default(),
                        lane,
                        in_flight: None,
                        last_success_recorded: None,
                        calls_ended_worker: ended,
                    },
                );
            } else if let Some(runner) = self.sinks.get_mut(&id) {
                runner.policy = policy;
            }
        }
        self.sinks.retain(|id, _| seen.contains(id));
        self.refused.retain(|id, _| seen.contains(id));
        let now = Instant::now();
        let next_due = due_at
            .into_iter()
            .filter(|(id, _)| self.sinks.get(id).is_some_and(|r| r.in_flight.is_none() && r.breaker.allows(now)))
            .map(|(_, at)| at)
            .min();
        WORKER_HAS_SINKS.get().store(!self.sinks.is_empty(), Ordering::Release);
        Ok(next_due)
    }

    fn post_all(&mut self, jobs: Vec<HttpJob>) {
        for job in jobs {
            self.post(job.subscription, job);
        }
    }

    fn post(&mut self, subscription: i32, job: HttpJob) {
        if let Some(lane) = self.sinks.get(&subscription).and_then(|r| r.lane.as_ref()) {
            if lane.send(job).is_err() {
                warning!("outbox: the HTTP thread of subscription {subscription} is gone");
            }
        }
    }

    /// Acks, fails or gives back a piece an HTTP sink answered, and posts the next piece.
    fn settle(&mut self, result: HttpResult) -> Result<(), OutboxError> {
        let Some(runner) = self.sinks.get_mut(&result.subscription).filter(|r| r.generation == result.generation) else {
            return Ok(());
        };
        let extension = Extension::current()?;
        let Some(mut in_flight) = runner.in_flight.take() else { return Ok(()) };
        let next = Spi::connect_mut(|client| -> Result<Option<HttpJob>, OutboxError> {
            match &result.outcome {
                Outcome::Delivered => {
                    consume::ack_in(client, &extension, result.ids.clone(), &runner.name)?;
                    runner.delivered(client, &extension, result.subscription, result.ids.len())?;
                }
                Outcome::Rejected(reason) => match halves(&result.ids) {
                    Some((first, second)) => {
                        in_flight.queue.push_front(second);
                        in_flight.queue.push_front(first);
                    }
                    None => {
                        consume::fail_in(client, &extension, result.ids.clone(), Some(reason), &runner.name, None, true)?;
                        record_error(client, &extension, result.subscription, reason, None)?;
                    }
                },
                Outcome::Unavailable { reason, retry_after } => {
                    let back = result.ids.iter().copied().chain(in_flight.queue.drain(..).flatten());
                    runner.back_off(client, &extension, result.subscription, back, reason, *retry_after)?;
                }
                Outcome::TimedOut(reason) => {
                    let rest = in_flight.queue.drain(..).flatten();
                    runner.timed_out(client, &extension, result.subscription, result.ids.clone(), rest, reason)?;
                }
            }
            let Some(piece) = in_flight.queue.pop_front() else { return Ok(None) };
            let body = batch_body(piece.iter().map(|id| in_flight.events[id].as_str()));
            Ok(Some(HttpJob { subscription: result.subscription, generation: result.generation, ids: piece, body }))
        })?;
        if next.is_some() {
            runner.in_flight = Some(in_flight);
        }
        if let Some(job) = next {
            self.post(result.subscription, job);
        }
        Ok(())
    }
}

fn record_success(client: &mut SpiClient<'_>, extension: &Extension, subscription: i32, runner: &mut SinkRunner) -> Result<(), OutboxError> {
    if let Transition::Recovered = runner.breaker.delivered() {
        log!("outbox: sink of subscription \"{}\" is delivering again", runner.name);
        runner.last_success_recorded = None;
    }
    if runner.last_success_recorded.is_none_or(|at| at.elapsed() >= SUCCESS_RECORD_INTERVAL) {
        run(client, extension, &q::SINK_SUCCEEDED, &[subscription.into()])?;
        runner.last_success_recorded = Some(Instant::now());
    }
    Ok(())
}

fn record_error(
    client: &mut SpiClient<'_>,
    extension: &Extension,
    subscription: i32,
    error: &str,
    backing_off: Option<Duration>,
) -> Result<(), OutboxError> {
    let until = backing_off.map(|d| consume::timestamp(consume::now() + d.as_micros() as i64));
    run(client, extension, &q::SINK_FAILED, &[subscription.into(), error.into(), until.into()])?;
    Ok(())
}

/// Claims a batch for `runner`'s sink, in a subtransaction. A claim that fails (the
/// subscription's delivery state damaged by hand: a claim row naming a ledger segment that
/// does not exist) backs that sink off with the error as its `last_error`: it ended the worker,
/// whose next round failed the same way, and no sink was delivered.
fn claim_for(
    client: &mut SpiClient<'_>,
    extension: &Extension,
    subscription: i32,
    runner: &mut SinkRunner,
    batch_size: i32,
) -> Result<Vec<(i64, String)>, OutboxError> {
    let reason = match in_subtransaction(|| claim_rendered(client, extension, &runner.name, batch_size)) {
        Ok(events) => return Ok(events),
        Err(SubtransactionFailed::Raised(report)) => report.message().to_string(),
        Err(SubtransactionFailed::Returned(error)) => error.to_string(),
    };
    runner.back_off(client, extension, subscription, std::iter::empty(), &format!("its claim failed: {reason}"), None)?;
    Ok(Vec::new())
}

/// How work in a subtransaction failed; either way the subtransaction is rolled back.
enum SubtransactionFailed<E> {
    /// It raised this ERROR.
    Raised(pg_sys::panic::ErrorReportWithLevel),
    /// It returned this error.
    Returned(E),
}

/// Runs `work` in a subtransaction, released when it returns `Ok` and rolled back when it
/// returns an error or raises one; the transaction goes on either way.
fn in_subtransaction<T, E>(work: impl FnOnce() -> Result<T, E>) -> Result<T, SubtransactionFailed<E>> {
    unsafe {
        let memory = pg_sys::CurrentMemoryContext;
        let resources = pg_sys::CurrentResourceOwner;
        pg_sys::BeginInternalSubTransaction(std::ptr::null());
        pg_sys::MemoryContextSwitchTo(memory);
        // (the outcome, and whether the subtransaction is rolled back already)
        let (outcome, rolled_back) = PgTryBuilder::new(AssertUnwindSafe(|| (work().map_err(SubtransactionFailed::Returned), false)))
            .catch_others(|error| {
                pg_sys::MemoryContextSwitchTo(memory);
                pg_sys::RollbackAndReleaseCurrentSubTransaction();
                let report = match error {
                    pg_sys::panic::CaughtError::PostgresError(report)
                    | pg_sys::panic::CaughtError::ErrorReport(report)
                    | pg_sys::panic::CaughtError::RustPanic { ereport: report, .. } => report,
                };
                (Err(SubtransactionFailed::Raised(report)), true)
            })
            .execute();
        // Finished outside the try: an error in finishing it is the worker's own, and the catch
        // must not roll back a second time, the level above.
        if !rolled_back {
            if outcome.is_ok() {
                pg_sys::ReleaseCurrentSubTransaction();
            } else {
                pg_sys::RollbackAndReleaseCurrentSubTransaction();
            }
        }
        pg_sys::MemoryContextSwitchTo(memory);
        pg_sys::CurrentResourceOwner = resources;
        outcome
    }
}

/// Claims a batch for the worker, each event rendered as the JSON object a sink receives.
fn claim_rendered(client: &mut SpiClient<'_>, extension: &Extension, subscription: &str, batch_size: i32) -> Result<Vec<(i64, String)>, OutboxError> {
    let lease = pgrx::datum::Interval::from_micros(WORKER_LEASE.as_micros() as i64);
    let rows = run(client, extension, &q::WORKER_CLAIM, &[batch_size.into(), subscription.into(), lease.into()])?;
    rows.into_iter().map(|row| Ok((required(&row, 1)?, required(&row, 2)?))).collect()
}

/// Calls a function sink with `ids` and acks them; on an error, splits the batch until the
/// failing event is alone and fails it. Each call runs in a subtransaction, as its function's
/// owner, so the function neither aborts the worker's transaction nor runs as superuser. A call
/// that outlasts the sink's timeout is cancelled and handled like an HTTP timeout: the worker
/// serves every sink from one loop, so a stuck function must not hold the others up.
fn apply_function(
    client: &mut SpiClient<'_>,
    extension: &Extension,
    subscription: i32,
    runner: &mut SinkRunner,
    (function, timeout): (&str, Duration),
    events: &HashMap<i64, String>,
    ids: Vec<i64>,
) -> Result<(), OutboxError> {
    let resolved = run(client, extension, &q::FUNCTION_SINK, &[function.into()])?.into_iter().next();
    let recorded: Option<String> = run(client, extension, &q::SUBSCRIBED_FUNCTION_OWNER, &[subscription.into()])?.first().get(1)?;
    // The name may have come to mean another function since it was subscribed (dropped and
    // made again by someone else, or given to another owner): a reviewer had the worker call,
    // as a superuser, a function of a trusted extension installed under the subscribed name.
    let refusal = match (&resolved, recorded) {
        (None, _) => Some(format!("function {function}(jsonb) does not exist")),
        (Some(_), None) => Some(format!(
            "no owner is recorded for function {function}(jsonb) (outbox_subscribe records it, and ALTER EXTENSION outbox UPDATE to 0.8.0): update the extension, or subscribe it again"
        )),
        (Some(target), Some(recorded)) => {
            let owner: String = required(target, 3)?;
            (owner != recorded).then(|| {
                format!("function {function}(jsonb) is owned by {owner}, not by {recorded} as when it was subscribed: subscribe it again")
            })
        }
    };
    if let Some(reason) = refusal {
        // the sink as a whole cannot be called: failing batch after batch went through the
        // whole backlog at full speed
        return runner.back_off(client, extension, subscription, ids, &reason, None);
    }
    let target = resolved.expect("refused above when missing");
    let function_oid: pg_sys::Oid = required(&target, 1)?;
    let owner: pg_sys::Oid = required(&target, 2)?;
    let mut pending = VecDeque::from([ids]);
    let name = runner.name.clone();
    while let Some(piece) = pending.pop_front() {
        let body = batch_body(piece.iter().map(|id| events[id].as_str()));
        let watchdog = Watchdog::arm(subscription, runner.calls_ended_worker, timeout.saturating_mul(2));
        // A function that removes or renames its own subscription fails its call: the ack by
        // name after it failed, and the next worker called it again, every second, while no
        // other sink was delivered.
        let outcome = call_in_subtransaction(function_oid, owner, &body, timeout, &mut || {
            let now_named = run(client, extension, &q::SUBSCRIPTION_NAME, &[subscription.into()])
                .and_then(|t| if t.is_empty() { Ok(None) } else { Ok(t.first().get::<String>(1)?) });
            match now_named {
                Ok(Some(current)) if current == name => None,
                Ok(_) => Some(format!("the function removed or renamed its own subscription \"{name}\"; that is rolled back with its call")),
                Err(e) => Some(e.to_string()),
            }
        });
        // it returned, in time or not: the worker lives on
        watchdog.disarm();
        runner.calls_ended_worker = 0;
        match outcome {
            Ok(()) => {
                let sent = piece.len();
                consume::ack_in(client, extension, piece, &runner.name)?;
                runner.delivered(client, extension, subscription, sent)?;
            }
            Err(CallFailed::Raised(reason)) => match halves(&piece) {
                Some((first, second)) => {
                    pending.push_front(second);
                    pending.push_front(first);
                }
                None => {
                    consume::fail_in(client, extension, piece, Some(&reason), &runner.name, None, true)?;
                    record_error(client, extension, subscription, &reason, None)?;
                }
            },
            Err(CallFailed::Cancelled(message)) => {
                let reason = format!("{message} (function {function}, timeout {timeout:?})");
                return runner.timed_out(client, extension, subscription, piece, pending.drain(..).flatten(), &reason);
            }
        }
    }
    Ok(())
}

enum CallFailed {
    /// The function raised this error.
    Raised(String),
    /// It was cancelled: its timeout passed (or someone cancelled the worker's query). The
    /// message says which.
    Cancelled(String),
}

/// A function sink's call is cancelled after its timeout by the statement timeout's timer,
/// which a background worker has registered (InitPostgres does it for every backend), with
/// SIGINT handled as a query cancel, so it ends with the usual "canceling statement due to
/// statement timeout".
mod call_timer {
    use std::ffi::c_int;
    use std::time::Duration;

    use pgrx::pg_sys;

    /// `STATEMENT_TIMEOUT` of `TimeoutId`, the same in PostgreSQL 13 to 18.
    const STATEMENT_TIMEOUT: c_int = 3;

    // timeout.h, which pgrx does not bind
    unsafe extern "C-unwind" {
        fn enable_timeout_after(id: c_int, delay_ms: c_int);
        fn disable_timeout(id: c_int, keep_indicator: bool);
        fn get_timeout_indicator(id: c_int, reset_indicator: bool) -> bool;
    }

    pub fn start(timeout: Duration) {
        let ms = timeout.as_millis().clamp(1, c_int::MAX as u128) as c_int;
        unsafe { pg_sys::ffi::pg_guard_ffi_boundary(|| enable_timeout_after(STATEMENT_TIMEOUT, ms)) };
    }

    /// Stops the timer; returns whether it fired with its cancel not yet acted on (the call
    /// was in code that checks for none), and drops that cancel, which would otherwise stop the
    /// worker's own next query.
    pub fn stop() -> bool {
        unsafe {
            pg_sys::ffi::pg_guard_ffi_boundary(|| {
                disable_timeout(STATEMENT_TIMEOUT, true);
                let fired = get_timeout_indicator(STATEMENT_TIMEOUT, true);
                if fired {
                    pg_sys::QueryCancelPending = 0;
                }
                fired
            })
        }
    }
}

/// Ends the worker (SIGTERM to itself, which `die` handles) when a function sink's call
/// outlives its timeout by as much again: a function that catches the cancel (`EXCEPTION WHEN
/// query_canceled`) in a loop stops for nothing less, and would hold up every other sink for
/// as long as it ran. Whatever ends the worker during a call (that, or the function ending it
/// with a FATAL, or `pg_terminate_backend` of its own backend), the next worker backs that sink
/// off (see `Worker::refresh`) rather than calling it again at once: a function that ended the
/// worker at each call had it restart every second, and no other sink was delivered.
struct Watchdog {
    disarm: mpsc::Sender<()>,
    /// Whether it ended the worker.
    thread: std::thread::JoinHandle<bool>,
}

impl Watchdog {
    /// Marks a call of `subscription`'s sink, `ended_before` calls of which in a row ended a
    /// worker, and ends the worker if it lasts `after`.
    fn arm(subscription: i32, ended_before: u32, after: Duration) -> Watchdog {
        let times = ended_before.saturating_add(1);
        // (a file that cannot be written costs only the guard against a worker ended in a call)
        let _ = std::fs::write(STUCK_SINK_FILE, sink_call_mark(&Self::whose(), subscription, times));
        let (disarm, disarmed) = mpsc::channel::<()>();
        let thread = spawn_without_signals(move || {
            let overran = disarmed.recv_timeout(after) == Err(mpsc::RecvTimeoutError::Timeout);
            if overran {
                unsafe { libc::kill(libc::getpid(), libc::SIGTERM) };
            }
            overran
        });
        Watchdog { disarm, thread }
    }

    /// The call returned: the worker lives on, unless the watchdog ended it just then.
    fn disarm(self) {
        let _ = self.disarm.send(());
        if !self.thread.join().unwrap_or(false) {
            let _ = std::fs::remove_file(STUCK_SINK_FILE);
        }
    }

    /// The postmaster and the database a mark is of.
    fn whose() -> String {
        format!("{} {}", unsafe { pg_sys::PgStartTime }, unsafe { pg_sys::MyDatabaseId }.to_u32())
    }

    /// The sink whose call a worker of this postmaster and database last ended in, and how many
    /// times running.
    fn overrun() -> Option<(i32, u32)> {
        read_sink_call_mark(&std::fs::read_to_string(STUCK_SINK_FILE).ok()?, &Self::whose())
    }
}

/// Runs `function(batch)` as `owner` in a subtransaction, cancelled after `timeout`; an ERROR
/// rolls the subtransaction back and comes back as its message, as does a reason `refuse`
/// gives once the function has returned.
fn call_in_subtransaction(
    function: pg_sys::Oid,
    owner: pg_sys::Oid,
    batch: &str,
    timeout: Duration,
    refuse: &mut dyn FnMut() -> Option<String>,
) -> Result<(), CallFailed> {
    let started = std::time::Instant::now();
    unsafe {
        let batch = std::ffi::CString::new(batch).map_err(|e| CallFailed::Raised(e.to_string()))?;
        let outcome = in_subtransaction(|| {
            let mut user = pg_sys::InvalidOid;
            let mut context = 0;
            pg_sys::GetUserIdAndSecContext(&mut user, &mut context);
            pg_sys::SetUserIdAndSecContext(
                owner,
                context | (pg_sys::SECURITY_LOCAL_USERID_CHANGE | pg_sys::SECURITY_RESTRICTED_OPERATION) as i32,
            );
            // The worker pins search_path for its own queries; the function gets the database's
            // default, as when its owner calls it. Nothing the function sets outlives the call,
            // a session-level `set_config(…, false)` included: AtEOXact_GUC below undoes every
            // setting made since, as rolling the subtransaction back after an error does. A
            // search_path left behind would have the worker's own queries, run as superuser,
            // call the owner's operators.
            let nest_level = pg_sys::NewGUCNestLevel();
            let default_path = pg_sys::pstrdup(pg_sys::GetConfigOptionResetString(c"search_path".as_ptr()));
            pg_sys::set_config_option(
                c"search_path".as_ptr(),
                default_path,
                pg_sys::GucContext::PGC_USERSET,
                pg_sys::GucSource::PGC_S_SESSION,
                pg_sys::GucAction::GUC_ACTION_SAVE,
                true,
                0,
                false,
            );
            let jsonb = pgrx::direct_function_call_as_datum(pg_sys::jsonb_in, &[Some(pg_sys::Datum::from(batch.as_ptr()))])
                .expect("jsonb_in returns a value");
            call_timer::start(timeout);
            call_ignoring_result(function, jsonb);
            // (a call that caught the cancel has had it acted on: only its time tells)
            let late = call_timer::stop() || started.elapsed() >= timeout;
            pg_sys::AtEOXact_GUC(false, nest_level);
            pg_sys::SetUserIdAndSecContext(user, context);
            if let Some(reason) = refuse() {
                pgrx::error!("{reason}");
            }
            // past its timeout (it caught the cancel, or ran on where it checks for none): rolled
            // back, and the batch goes back as if it had been cancelled
            if late { Err(()) } else { Ok(()) }
        });
        // (an error left the timer armed)
        call_timer::stop();
        // Nor do session advisory locks it took outlive it, which the subtransaction's end keeps
        // (released after a rollback, which releases the LWLocks an error may have left held).
        pg_sys::LockReleaseSession(pg_sys::USER_LOCKMETHOD as pg_sys::LOCKMETHODID);
        match outcome {
            Ok(()) => Ok(()),
            Err(SubtransactionFailed::Returned(())) => Err(CallFailed::Cancelled("the call ran past its timeout".into())),
            Err(SubtransactionFailed::Raised(report)) if report.sql_error_code() == pgrx::PgSqlErrorCode::ERRCODE_QUERY_CANCELED => {
                Err(CallFailed::Cancelled(report.message().to_string()))
            }
            // (it caught the cancel, then failed: the sink was too slow all the same)
            Err(SubtransactionFailed::Raised(report)) if started.elapsed() >= timeout => {
                Err(CallFailed::Cancelled(format!("the call ran past its timeout, then failed: {}", report.message())))
            }
            Err(SubtransactionFailed::Raised(report)) => Err(CallFailed::Raised(report.message().to_string())),
        }
    }
}

/// Calls `function(argument)`. Unlike OidFunctionCall1, a NULL result (a void function) is fine.
unsafe fn call_ignoring_result(function: pg_sys::Oid, argument: pg_sys::Datum) {
    unsafe {
        let flinfo = pg_sys::palloc0(std::mem::size_of::<pg_sys::FmgrInfo>()) as *mut pg_sys::FmgrInfo;
        pg_sys::fmgr_info(function, flinfo);
        let size = std::mem::size_of::<pg_sys::FunctionCallInfoBaseData>() + std::mem::size_of::<pg_sys::NullableDatum>();
        let fcinfo = pg_sys::palloc0(size) as *mut pg_sys::FunctionCallInfoBaseData;
        (*fcinfo).flinfo = flinfo;
        (*fcinfo).nargs = 1;
        (*fcinfo).fncollation = pg_sys::InvalidOid;
        (*fcinfo).args.as_mut_slice(1)[0] = pg_sys::NullableDatum { value: argument, isnull: false };
        let call = (*flinfo).fn_addr.expect("a function has an address");
        // through pgrx's boundary, so an ERROR in the function reaches the caller's PgTryBuilder
        pg_sys::submodules::ffi::pg_guard_ffi_boundary(|| call(fcinfo));
    }
}

/// Starts the thread that posts a sink's batches.
fn spawn_lane(http: HttpSink, results: mpsc::Sender<HttpResult>, mut wake: UnixStream) -> mpsc::Sender<HttpJob> {
    let (sender, jobs) = mpsc::channel::<HttpJob>();
    let http = Arc::new(http);
    spawn_without_signals(move || {
        for job in jobs {
            let outcome = post_batch(&http, &job);
            let result = HttpResult { subscription: job.subscription, generation: job.generation, ids: job.ids, outcome };
            if results.send(result).is_err() {
                break;
            }
            let _ = wake.write(&[1]);
        }
    });
    sender
}

/// A thread of the worker that never calls Postgres, spawned with every signal blocked, so
/// that signals reach the main thread, whose handlers Postgres expects to run.
fn spawn_without_signals<T: Send + 'static>(work: impl FnOnce() -> T + Send + 'static) -> std::thread::JoinHandle<T> {
    unsafe {
        let mut all: libc::sigset_t = std::mem::zeroed();
        let mut previous: libc::sigset_t = std::mem::zeroed();
        libc::sigfillset(&mut all);
        libc::pthread_sigmask(libc::SIG_BLOCK, &all, &mut previous);
        let thread = std::thread::spawn(work);
        libc::pthread_sigmask(libc::SIG_SETMASK, &previous, std::ptr::null_mut());
        thread
    }
}

/// How much of a response body the worker reads (`judge` keeps 200 characters of it).
const KEPT_BODY_BYTES: u64 = 4096;

fn post_batch(http: &HttpSink, job: &HttpJob) -> Outcome {
    // A redirect is the sink's answer, not a sink to deliver to: following it would send the
    // batch and its headers (credentials included) to wherever the Location says, and ack on
    // that server's word.
    let mut request = minreq::post(http.url.as_str())
        .with_follow_redirects(false)
        .with_timeout(http.timeout.as_secs().max(1))
        .with_header("Content-Type", "application/json")
        .with_header("Idempotency-Key", idempotency_key(&job.ids))
        .with_body(job.body.as_bytes());
    for (name, value) in &http.headers {
        request = request.with_header(name.as_str(), value.as_str());
    }
    match request.send_lazy() {
        // (minreq's word for an answer whose first line is not an HTTP status line, or none)
        Ok(response) if response.status_code == 503 && response.reason_phrase == "Server did not provide a status line" => Outcome::Unavailable {
            reason: "the sink answered without an HTTP status line (it closed the connection, or does not speak HTTP)".into(),
            retry_after: None,
        },
        Ok(response) => {
            let status = response.status_code.clamp(0, 999) as u16;
            let retry_after = response.headers.get("retry-after").cloned();
            // Only the start of the body is kept, as the reason of a failure: a sink streaming
            // a large body must not fill the worker's memory.
            let mut body = Vec::new();
            // (a body cut short by the sink still says what it says)
            let _ = std::io::Read::read_to_end(&mut std::io::Read::take(response, KEPT_BODY_BYTES), &mut body);
            judge(status, retry_after.as_deref(), &String::from_utf8_lossy(&body))
        }
        Err(minreq::Error::IoError(error)) if matches!(error.kind(), std::io::ErrorKind::TimedOut | std::io::ErrorKind::WouldBlock) => {
            Outcome::TimedOut(format!("no answer within the timeout of {}s", http.timeout.as_secs()))
        }
        Err(error) => Outcome::Unavailable { reason: error.to_string(), retry_after: None },
    }
}
