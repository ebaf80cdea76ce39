//! Ordering decisions, kept pure: how the events one statement captured are ordered and cut
//! into log rows, which events a claim may hand out without breaking per-key order, and how
//! far back a claim must look for transactions that committed after a window closed.

use std::collections::HashSet;
use std::hash::{BuildHasher, BuildHasherDefault, Hasher, RandomState};
use std::sync::OnceLock;
use std::ops::Range;

use crate::shape::{Op, EVENTS_PER_ROW};

/// One change captured by the row trigger, waiting for the end of its statement.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct CapturedEvent {
    /// Subtransaction that captured it; dropped if that subtransaction rolls back.
    pub subxact: u32,
    pub source: u32,
    /// Command id of the statement that wrote the row.
    pub command: u32,
    pub op: Op,
    /// Where the key's JSON text is in the buffer that holds the event.
    pub key: Range<usize>,
    /// Where the payload data's JSON text is, when the attachment has payload columns.
    pub data: Option<Range<usize>>,
    pub key_hash: i64,
}

/// Within one statement, puts every DELETE of a table before every UPSERT of it. An UPDATE
/// that swaps keys between rows (1→2 and 2→1) captures DELETE 1, UPSERT 2, DELETE 2, UPSERT 1
/// in row order, and so does one that moves rows between partitions (as a delete from one and
/// an insert into the other); replayed in that order the copy would lose key 2. Deletes first
/// is always right, because a statement does not see its own changes: after it every key it
/// wrote exists and every key it only vacated does not (a writable CTE that deletes a key and
/// inserts it again included).
pub fn order_for_flush(events: &mut [CapturedEvent]) {
    // A statement's events need not be consecutive: a trigger's statement on another table
    // can capture between its rows. Each statement's events keep the places they have, and
    // only swap among themselves.
    // (a transaction's buffer can hold many statements' events until its commit: each event
    // looks its statement up only where the statement changes)
    let mut statements: Vec<Vec<usize>> = Vec::new();
    let mut known: std::collections::HashMap<(u32, u32, u32), usize> = std::collections::HashMap::new();
    let mut previous = None;
    for (i, e) in events.iter().enumerate() {
        let statement = (e.source, e.command, e.subxact);
        let place = match previous {
            Some((s, place)) if s == statement => place,
            _ => *known.entry(statement).or_insert_with(|| {
                statements.push(Vec::new());
                statements.len() - 1
            }),
        };
        statements[place].push(i);
        previous = Some((statement, place));
    }
    for places in statements {
        let deletes_after_upserts =
            places.windows(2).any(|w| events[w[0]].op != Op::Delete && events[w[1]].op == Op::Delete);
        if !deletes_after_upserts {
            continue;
        }
        let mut ordered: Vec<CapturedEvent> = places.iter().map(|&i| events[i].clone()).collect();
        // stable: keeps row order among the deletes and among the upserts
        ordered.sort_by_key(|e| e.op != Op::Delete);
        for (&i, e) in places.iter().zip(ordered) {
            events[i] = e;
        }
    }
}

/// Puts a statement's own events (of its `command`) first among `events[from..]`, what was
/// captured while it fired its AFTER triggers, keeping capture order otherwise. Its changes
/// came before anything its AFTER triggers did, but a user's AFTER row trigger that writes to
/// the same table fires before the capture's statement trigger (and may come before its row
/// triggers by name): a DELETE of keys 1 and 3 whose trigger inserted key 1 again was captured
/// UPSERT 1 before DELETE 1. A BEFORE trigger's statements run before the statement's
/// triggers fire, and keep their place ahead of it.
pub fn own_events_first(events: &mut Vec<CapturedEvent>, from: usize, command: u32) {
    let fired = &events[from..];
    let out_of_place = fired.windows(2).any(|w| w[0].command != command && w[1].command == command);
    if !out_of_place {
        return;
    }
    let (own, later): (Vec<_>, Vec<_>) = events.split_off(from).into_iter().partition(|e| e.command == command);
    events.extend(own);
    events.extend(later);
}

/// Cuts ordered events into log rows: consecutive events of one table and one operation, at
/// most `EVENTS_PER_ROW` each.
pub fn log_rows(events: &[CapturedEvent]) -> Vec<Range<usize>> {
    let mut rows = Vec::new();
    let mut start = 0;
    for i in 1..=events.len() {
        let boundary = i == events.len()
            || events[i].source != events[start].source
            || events[i].op != events[start].op
            || (i - start) as i64 == EVENTS_PER_ROW;
        if boundary {
            rows.push(start..i);
            start = i;
        }
    }
    rows
}

/// What an event is, as far as ordering is concerned.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct OrderKey {
    /// The source row, or for a TRUNCATE the whole table.
    pub key_hash: i64,
    /// The table the event belongs to.
    pub table_hash: i64,
}

impl OrderKey {
    pub fn is_truncate(&self) -> bool {
        self.key_hash == self.table_hash
    }
}

/// Key and table hashes are already FNV hashes: hashing them again (SipHash) only costs time.
#[derive(Default)]
struct PassThrough(u64);

impl Hasher for PassThrough {
    fn finish(&self) -> u64 {
        self.0
    }

    fn write(&mut self, bytes: &[u8]) {
        for byte in bytes {
            self.0 = (self.0 << 8) | u64::from(*byte);
        }
    }

    fn write_i64(&mut self, value: i64) {
        self.0 = value as u64;
    }
}

type HashSet64 = HashSet<i64, BuildHasherDefault<PassThrough>>;

/// Event ids need no SipHash (acks and claims put thousands into sets). They run in strides
/// (a log row's base steps by 4096), and hashbrown picks a bucket by a hash's low bits and
/// tags it with its top bits, so every bit of the id must reach both ends: MurmurHash3's
/// 64-bit finalizer does that in two multiplications. The id is first xored with a seed drawn
/// once per backend: the finalizer can be inverted, and without the seed a caller of
/// `outbox_ack` could pick ids that all land in one bucket. (A single multiplication by the
/// golden ratio, folded once, spread some seeds' xored runs over only half the buckets.)
#[derive(Clone, Copy)]
pub struct IdState {
    seed: u64,
}

static ID_SEED: OnceLock<u64> = OnceLock::new();

impl Default for IdState {
    fn default() -> Self {
        IdState { seed: *ID_SEED.get_or_init(|| RandomState::new().hash_one(0u64)) }
    }
}

impl BuildHasher for IdState {
    type Hasher = IdHasher;

    fn build_hasher(&self) -> IdHasher {
        IdHasher { hash: 0, seed: self.seed }
    }
}

pub struct IdHasher {
    hash: u64,
    seed: u64,
}

impl Hasher for IdHasher {
    fn finish(&self) -> u64 {
        self.hash
    }

    fn write(&mut self, bytes: &[u8]) {
        for byte in bytes {
            self.write_i64(((self.hash << 8) | u64::from(*byte)) as i64);
        }
    }

    fn write_i64(&mut self, value: i64) {
        let mut mixed = (value as u64) ^ self.seed;
        mixed ^= mixed >> 33;
        mixed = mixed.wrapping_mul(0xFF51_AFD7_ED55_8CCD);
        mixed ^= mixed >> 33;
        mixed = mixed.wrapping_mul(0xC4CE_B9FE_1A85_EC53);
        self.hash = mixed ^ (mixed >> 33);
    }
}

pub type IdSet = HashSet<i64, IdState>;
pub type IdMap<V> = std::collections::HashMap<i64, V, IdState>;

/// The rows and tables that already have an event in flight or waiting ahead in a
/// subscription. An event must wait while its row is blocked; a TRUNCATE must wait while
/// anything of its table is; any row event must wait behind a pending TRUNCATE of its table.
#[derive(Default)]
pub struct Blocked {
    keys: HashSet64,
    tables: HashSet64,
}

impl Blocked {
    /// Room for the rows of `events` events, so that filling it does not rehash it again and
    /// again: a claim fills it with the events of every open claim.
    pub fn with_capacity(events: usize) -> Blocked {
        Blocked { keys: HashSet64::with_capacity_and_hasher(events, Default::default()), tables: HashSet64::default() }
    }

    pub fn blocks(&self, event: OrderKey) -> bool {
        if event.is_truncate() {
            self.tables.contains(&event.table_hash)
        } else {
            self.keys.contains(&event.key_hash) || self.keys.contains(&event.table_hash)
        }
    }

    /// Records an event that is in flight or pending, so later events of its row wait.
    pub fn add(&mut self, event: OrderKey) {
        self.keys.insert(event.key_hash);
        self.tables.insert(event.table_hash);
    }

    /// Records events given as their key and table hashes. A claim's events come in runs of
    /// one table, so a table is recorded once per run rather than once per event.
    pub fn add_all(&mut self, key_hashes: &[i64], table_hashes: &[i64]) {
        self.keys.extend(key_hashes);
        let mut previous = None;
        for &table in table_hashes {
            if previous != Some(table) {
                self.tables.insert(table);
                previous = Some(table);
            }
        }
    }
}

/// The most marks a subscription keeps while a long transaction holds its floor back.
pub const FLOOR_MARKS: usize = 8;

/// A lower bound on the bases of the log rows that transactions still running at a
/// subscription's done snapshot wrote or will write: the straddlers a claim must still hand
/// out lie between it and `done_seq`, so they are found through the base index and the log
/// needs no index on txid.
///
/// It rests on marks. A mark pairs the last base handed out with the next xid to be assigned,
/// read in that order: a transaction whose xid is at least the mark's xid got it after the
/// read, and capture draws a base only once its transaction has an xid, so every base it
/// draws is greater than the mark's base. That needs a base already drawn: read without the
/// sequence's lock it could be one nextval had logged ahead (see last_base! in queries.rs).
/// When a window closes, the marks whose xid is at most the closing snapshot's xmin (the
/// oldest xid still running then) are confirmed and the floor moves up to the newest of them.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct StraddleFloor {
    pub floor: i64,
    /// (base, next xid), oldest first
    pub marks: Vec<(i64, i64)>,
}

impl StraddleFloor {
    /// The window whose snapshot has xmin `closing_xmin` becomes the done one; `mark` was read
    /// just now.
    pub fn close_window(&mut self, closing_xmin: i64, mark: (i64, i64)) {
        let confirmed = self.marks.iter().filter(|(_, xid)| *xid <= closing_xmin).map(|(base, _)| *base).max();
        if let Some(base) = confirmed {
            self.floor = self.floor.max(base);
        }
        self.marks.retain(|(_, xid)| *xid > closing_xmin);
        // A long transaction keeps every mark unconfirmed: keep the oldest ones, which will be
        // confirmed first, and let the newest slot follow the present.
        if self.marks.len() == FLOOR_MARKS {
            self.marks.pop();
        }
        self.marks.push(mark);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ids_spread_over_buckets_and_tags() {
        // hashbrown picks a bucket by the low bits and keeps the top 7 bits as a tag. 1,024
        // random hashes fill 647 of 1,024 buckets on average, give or take 10; the backend's
        // seed is random, so fixed seeds make a failure repeatable. The first filled only 475
        // with a single multiplication by the golden ratio.
        let seeds = std::iter::once(0xEDE8_7AAB_419A_489F)
            .chain((0..256u64).map(|k| k.wrapping_mul(0x9E37_79B9_7F4A_7C15) ^ (k << 7)));
        for hasher in std::iter::once(IdState::default()).chain(seeds.map(|seed| IdState { seed })) {
            for ids in [(1_000_000i64..1_001_024).collect::<Vec<_>>(), (0..1024).map(|k| k * 4096 + 1).collect()] {
                let buckets: HashSet<u64> = ids.iter().map(|&id| hasher.hash_one(id) & 1023).collect();
                let tags: HashSet<u64> = ids.iter().map(|&id| hasher.hash_one(id) >> 57).collect();
                assert!(buckets.len() > 580, "only {} of 1024 buckets with seed {:#x}", buckets.len(), hasher.seed);
                assert!(tags.len() > 100, "only {} of 128 tags with seed {:#x}", tags.len(), hasher.seed);
            }
        }
        let ids: IdSet = (1..=10_000).collect();
        assert!((1..=10_000).all(|id| ids.contains(&id)) && !ids.contains(&0) && !ids.contains(&10_001));
    }

    #[test]
    fn a_statements_own_events_go_before_what_its_after_triggers_did() {
        // held from before: 0 (command 3); fired: a trigger's upsert of key 1 (command 6), then
        // the statement's deletes of keys 1 and 3 (command 5), then another trigger statement's
        let mut events = vec![event(3, Op::Upsert, 0), event(6, Op::Upsert, 1), event(5, Op::Delete, 2), event(5, Op::Delete, 3), event(7, Op::Upsert, 4)];
        own_events_first(&mut events, 1, 5);
        let keys: Vec<usize> = events.iter().map(|e| e.key.start).collect();
        assert_eq!(keys, [0, 2, 3, 1, 4], "the statement's own first, the rest in capture order, nothing before `from` moved");
        // in place already: untouched
        let mut events = vec![event(5, Op::Delete, 0), event(6, Op::Upsert, 1)];
        own_events_first(&mut events, 0, 5);
        assert_eq!(events.iter().map(|e| e.key.start).collect::<Vec<_>>(), [0, 1]);
        let mut events = vec![event(6, Op::Upsert, 0)];
        own_events_first(&mut events, 1, 5);
        assert_eq!(events.len(), 1);
    }

    /// Events whose key text is the single byte at `key` of their buffer.
    fn event(command: u32, op: Op, key: usize) -> CapturedEvent {
        CapturedEvent {
            subxact: 1,
            source: 10,
            command,
            op,
            key: key..key + 1,
            data: None,
            key_hash: 0,
        }
    }

    fn keys(events: &[CapturedEvent]) -> Vec<(Op, usize)> {
        events.iter().map(|e| (e.op, e.key.start)).collect()
    }

    #[test]
    fn key_swap_puts_deletes_first() {
        let mut events = vec![
            event(1, Op::Delete, 1),
            event(1, Op::Upsert, 2),
            event(1, Op::Delete, 2),
            event(1, Op::Upsert, 1),
            event(1, Op::Upsert, 3),
        ];
        order_for_flush(&mut events);
        assert_eq!(
            keys(&events),
            vec![(Op::Delete, 1), (Op::Delete, 2), (Op::Upsert, 2), (Op::Upsert, 1), (Op::Upsert, 3)]
        );
    }

    #[test]
    fn separate_statements_tables_and_subtransactions_are_not_reordered() {
        let mut other_table = event(3, Op::Delete, 6);
        other_table.source = 11;
        let mut released_savepoint = event(4, Op::Delete, 7);
        released_savepoint.subxact = 2;
        let mut events = vec![
            event(1, Op::Upsert, 2),
            event(2, Op::Delete, 2),
            event(3, Op::Upsert, 5),
            other_table,
            event(4, Op::Upsert, 7),
            released_savepoint,
        ];
        let before = events.clone();
        order_for_flush(&mut events);
        assert_eq!(events, before);
    }

    #[test]
    fn a_statement_cut_by_another_tables_events_still_puts_deletes_first() {
        let mut audit = event(1, Op::Upsert, 9);
        audit.source = 11;
        let mut events = vec![event(1, Op::Delete, 1), event(1, Op::Upsert, 2), audit.clone(), event(1, Op::Delete, 2), event(1, Op::Upsert, 1)];
        order_for_flush(&mut events);
        assert_eq!(keys(&events), vec![(Op::Delete, 1), (Op::Delete, 2), (Op::Upsert, 9), (Op::Upsert, 2), (Op::Upsert, 1)]);
        assert_eq!(events[2], audit, "the other table's event keeps its place");
    }

    #[test]
    fn rows_moving_between_partitions_put_deletes_first() {
        // UPDATE … SET id = 3 - id over partitions [0, 2) and [2, 10): each row's delete from
        // its partition and insert into the other, in row order
        let mut events = vec![event(1, Op::Delete, 1), event(1, Op::Upsert, 2), event(1, Op::Delete, 2), event(1, Op::Upsert, 1)];
        order_for_flush(&mut events);
        assert_eq!(keys(&events), vec![(Op::Delete, 1), (Op::Delete, 2), (Op::Upsert, 2), (Op::Upsert, 1)]);
    }

    #[test]
    fn log_rows_split_by_table_operation_and_size() {
        let mut events = vec![event(1, Op::Upsert, 10); 5000];
        events.push(event(1, Op::Delete, 11));
        let mut other = event(1, Op::Delete, 12);
        other.source = 11;
        events.push(other);
        assert_eq!(log_rows(&events), vec![0..4096, 4096..5000, 5000..5001, 5001..5002]);
        assert!(log_rows(&[]).is_empty());
    }

    fn row(key: i64, table: i64) -> OrderKey {
        OrderKey { key_hash: key, table_hash: table }
    }

    fn truncate(table: i64) -> OrderKey {
        OrderKey { key_hash: table, table_hash: table }
    }

    #[test]
    fn a_row_in_flight_blocks_only_its_own_row() {
        let mut blocked = Blocked::default();
        assert!(!blocked.blocks(row(1, 100)));
        blocked.add(row(1, 100));
        assert!(blocked.blocks(row(1, 100)));
        assert!(!blocked.blocks(row(2, 100)));
    }

    #[test]
    fn truncate_waits_for_its_table_and_holds_back_later_rows() {
        let mut blocked = Blocked::default();
        blocked.add(row(1, 100));
        assert!(blocked.blocks(truncate(100)));
        assert!(!blocked.blocks(truncate(200)));

        let mut blocked = Blocked::default();
        blocked.add(truncate(100));
        assert!(blocked.blocks(row(7, 100)));
        assert!(blocked.blocks(truncate(100)));
        assert!(!blocked.blocks(row(7, 200)));
    }

    #[test]
    fn events_added_in_bulk_block_what_they_block_one_by_one() {
        // a claim of two tables, with a TRUNCATE of the second among its row events
        let events = [row(1, 100), row(2, 100), row(3, 200), truncate(200), row(4, 200), row(5, 100)];
        let (keys, tables): (Vec<i64>, Vec<i64>) = events.iter().map(|e| (e.key_hash, e.table_hash)).unzip();
        let mut one_by_one = Blocked::default();
        events.iter().for_each(|&e| one_by_one.add(e));
        let mut bulk = Blocked::with_capacity(events.len());
        bulk.add_all(&keys, &tables);
        for probe in [row(1, 100), row(6, 100), row(7, 200), row(8, 300), truncate(100), truncate(200), truncate(300)] {
            assert_eq!(bulk.blocks(probe), one_by_one.blocks(probe), "{probe:?}");
        }
        assert!(bulk.blocks(truncate(100)) && bulk.blocks(row(7, 200)) && !bulk.blocks(row(8, 300)));
    }

    #[test]
    fn the_floor_moves_to_the_newest_mark_older_than_every_running_transaction() {
        let mut floor = StraddleFloor { floor: -4095, marks: vec![] };
        floor.close_window(100, (4097, 110));
        assert_eq!(floor, StraddleFloor { floor: -4095, marks: vec![(4097, 110)] }, "nothing confirmed yet");
        floor.close_window(105, (8193, 120));
        assert_eq!(floor.floor, -4095, "xid 105 may have drawn a base below 4097");
        floor.close_window(120, (12289, 130));
        assert_eq!(floor, StraddleFloor { floor: 8193, marks: vec![(12289, 130)] });
    }

    #[test]
    fn the_floor_never_moves_down() {
        let mut floor = StraddleFloor { floor: 9000, marks: vec![(4097, 110)] };
        floor.close_window(200, (12289, 210));
        assert_eq!(floor.floor, 9000);
    }

    #[test]
    fn a_long_transaction_keeps_the_oldest_marks_and_the_newest() {
        let mut floor = StraddleFloor { floor: 0, marks: vec![] };
        for i in 0..20 {
            floor.close_window(50, (1000 * (i + 1), 100 + i));
        }
        assert_eq!(floor.floor, 0, "xid 50 is still running");
        assert_eq!(floor.marks.len(), FLOOR_MARKS);
        assert_eq!(floor.marks[..FLOOR_MARKS - 1], (0..7).map(|i| (1000 * (i + 1), 100 + i)).collect::<Vec<_>>()[..]);
        assert_eq!(floor.marks[FLOOR_MARKS - 1], (20000, 119));
        // it ends: the marks older than the transactions running now are confirmed
        floor.close_window(115, (21000, 130));
        assert_eq!(floor.floor, 7000);
        assert_eq!(floor.marks, [(20000, 119), (21000, 130)]);
    }
}
