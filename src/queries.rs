//! Every query the extension runs at runtime, and the cache of their prepared plans.
//!
//! `@extschema@` stands for the extension's schema, as in the extension script. Tables and
//! functions are always qualified. The capture trigger's queries and the DDL event trigger's
//! run under the caller's search_path, so their operators are qualified too (a test checks);
//! all other queries run inside functions that pin `search_path = pg_catalog, pg_temp`, where
//! operators can only resolve to pg_catalog.

use std::cell::RefCell;
use std::collections::HashMap;
use std::rc::Rc;

use pgrx::datum::DatumWithOid;
use pgrx::pg_sys::{self, Oid, PgOid};
use pgrx::{FromDatum, Spi};
use pgrx::spi::{OwnedPreparedStatement, SpiClient, SpiTupleTable};

use crate::error::OutboxError;
use crate::ext::Extension;

pub struct Sql {
    pub text: &'static str,
    pub args: &'static [Oid],
}

impl Sql {
    /// The text with `@extschema@` replaced by the extension's schema.
    pub fn text_in(&self, extension: &Extension) -> String {
        self.text.replace("@extschema@", &extension.schema)
    }
}

/// A statement in versions for the releases of the SQL this library keeps working with until a
/// database is updated: the current one; 0.4.0 to 0.7.0, before the subscriptions recorded
/// roles by oid, where that changes the statement; and older ones, before the straddle floor
/// (there the floor stays at the bottom, which holds for any history). Remove the older
/// versions when updates from them are no longer supported.
pub struct ForRelease {
    current: Sql,
    before_0_8: Option<Sql>,
    before_0_4: Sql,
}

impl ForRelease {
    pub fn pick(&'static self, extension: &Extension) -> &'static Sql {
        if !extension.has_straddle_floor {
            &self.before_0_4
        } else if !extension.records_roles {
            self.before_0_8.as_ref().unwrap_or(&self.current)
        } else {
            &self.current
        }
    }
}

use pg_sys::{
    BOOLOID as BOOL, INT2OID as INT2, INT4OID as INT4, INT8ARRAYOID as INT8S, INT8OID as INT8, JSONBOID as JSONB, OIDARRAYOID as OIDS, OIDOID as OID, TEXTARRAYOID as TEXTS, TEXTOID as TEXT, TIMESTAMPTZARRAYOID as TIMES,
    TIMESTAMPTZOID as TIME, INTERVALOID as INTERVAL, TIDOID as TID,
};

thread_local! {
    /// Keyed by statement, and for a statement of one segment by the segment too.
    static PLANS: RefCell<HashMap<(usize, Option<i16>), Rc<OwnedPreparedStatement>>> = RefCell::new(HashMap::new());
}

/// Drops cached plans; called when the extension was created anew under another oid.
pub fn forget_plans() {
    PLANS.with(|p| p.borrow_mut().clear());
}

/// Runs `sql` with a plan prepared once per backend and kept (SPI_keepplan).
pub fn run<'conn>(
    client: &mut SpiClient<'conn>,
    extension: &Extension,
    sql: &'static Sql,
    args: &[DatumWithOid<'_>],
) -> Result<SpiTupleTable<'conn>, OutboxError> {
    let plan = prepared(client, extension, sql, None)?;
    Ok(client.update(&*plan, None, args)?)
}

/// A row of `run_latest`, valid while its SPI connection is.
pub struct LatestRow {
    tuple: pg_sys::HeapTuple,
    columns: pg_sys::TupleDesc,
}

impl LatestRow {
    pub fn get<T: FromDatum>(&self, ordinal: i32) -> Option<T> {
        let mut is_null = false;
        unsafe {
            let datum = pg_sys::SPI_getbinval(self.tuple, self.columns, ordinal, &mut is_null);
            T::from_polymorphic_datum(datum, is_null, pg_sys::SPI_gettypeid(self.columns, ordinal))
        }
    }
}

/// Runs `sql` with the latest snapshot rather than the transaction's, and maps each row with
/// `each`. DDL capture reads the catalog after waiting for locks, and the DDL then acts on the
/// catalog as it is: under REPEATABLE READ the transaction's snapshot predated what committed
/// meanwhile (a partition moved out of a dropped schema had its rows captured as DELETEs, one
/// made meanwhile none). Not a kept plan: DDL runs these seldom.
pub fn run_latest<T>(
    extension: &Extension,
    sql: &'static Sql,
    args: &[DatumWithOid<'_>],
    mut each: impl FnMut(&LatestRow) -> Result<T, OutboxError>,
) -> Result<Vec<T>, OutboxError> {
    let text = std::ffi::CString::new(sql.text_in(extension)).expect("the query has no NUL");
    Spi::connect_mut(|_client| unsafe {
        let mut types = sql.args.to_vec();
        let plan = pg_sys::SPI_prepare(text.as_ptr(), types.len() as i32, types.as_mut_ptr());
        if plan.is_null() {
            Spi::check_status(pg_sys::SPI_result)?;
        }
        let mut values: Vec<pg_sys::Datum> = args.iter().map(|a| a.datum().map_or(pg_sys::Datum::from(0), |d| d.sans_lifetime())).collect();
        let nulls: Vec<std::ffi::c_char> = args.iter().map(|a| if a.datum().is_none() { b'n' } else { b' ' } as std::ffi::c_char).collect();
        let status =
            pg_sys::SPI_execute_snapshot(plan, values.as_mut_ptr(), nulls.as_ptr(), pg_sys::GetLatestSnapshot(), std::ptr::null_mut(), true, false, 0);
        pg_sys::SPI_freeplan(plan);
        Spi::check_status(status)?;
        let table = &*pg_sys::SPI_tuptable;
        (0..pg_sys::SPI_processed as usize).map(|i| each(&LatestRow { tuple: *table.vals.add(i), columns: table.tupdesc })).collect()
    })
}

/// Runs `sql`, whose text names one segment as `@segment@` (`outbox_ledger_@segment@`), in
/// `segment`, with a plan per segment. A generic plan of a query of the partitioned table
/// locks and opens all eight segments and their indexes on every run, even with the segment
/// as a parameter that prunes seven of them: for the ledger's open claims that took 0.13 ms
/// a run against 0.02 ms for the segment's own table.
pub fn run_in_segment<'conn>(
    client: &mut SpiClient<'conn>,
    extension: &Extension,
    sql: &'static Sql,
    segment: i16,
    args: &[DatumWithOid<'_>],
) -> Result<SpiTupleTable<'conn>, OutboxError> {
    let plan = prepared(client, extension, sql, Some(segment))?;
    Ok(client.update(&*plan, None, args)?)
}

fn prepared(
    client: &mut SpiClient<'_>,
    extension: &Extension,
    sql: &'static Sql,
    segment: Option<i16>,
) -> Result<Rc<OwnedPreparedStatement>, OutboxError> {
    let key = (sql as *const Sql as usize, segment);
    if let Some(plan) = PLANS.with(|p| p.borrow().get(&key).cloned()) {
        return Ok(plan);
    }
    let mut text = sql.text_in(extension);
    if let Some(segment) = segment {
        text = text.replace("@segment@", &segment.to_string());
    }
    let types: Vec<PgOid> = sql.args.iter().map(|oid| PgOid::from(*oid)).collect();
    let plan = Rc::new(client.prepare_mut(text.as_str(), &types)?.keep());
    PLANS.with(|p| p.borrow_mut().insert(key, plan.clone()));
    Ok(plan)
}

// ---------------------------------------------------------------------------------------
// capture (runs under the writer's search_path)

pub static CURRENT_SEGMENT: Sql = Sql { text: "SELECT current_slot FROM @extschema@.outbox_rotation", args: &[] };

/// `relid` and the partitioned tables above it, nearest first (`depth`), as a query. Not
/// pg_partition_ancestors, which stops at a partition whose DETACH CONCURRENTLY has not
/// finished: writes to it are still captured, and its rows are still to be deleted.
macro_rules! partition_ancestors {
    ($relid:literal) => {
        concat!(
            "WITH RECURSIVE up(relid, depth) AS (SELECT ",
            $relid,
            "::pg_catalog.oid, 0 UNION ALL SELECT h.inhparent, up.depth OPERATOR(pg_catalog.+) 1 FROM up \
             JOIN pg_catalog.pg_class k ON k.oid OPERATOR(pg_catalog.=) up.relid AND k.relispartition \
             JOIN pg_catalog.pg_inherits h ON h.inhrelid OPERATOR(pg_catalog.=) up.relid) SELECT relid, depth FROM up"
        )
    };
}

/// The attachment of a table, or for a partition the attachment of its nearest attached
/// ancestor (row triggers are cloned onto partitions).
pub static ATTACHMENT_CONFIG: Sql = Sql {
    text: concat!(
        "SELECT a.source::pg_catalog.oid, a.generation, a.event_prefix, a.key_columns, a.payload_columns FROM (",
        partition_ancestors!("$1"),
        ") AS p JOIN @extschema@.outbox_attachments a ON a.source OPERATOR(pg_catalog.=) p.relid ORDER BY p.depth LIMIT 1"
    ),
    args: &[OID],
};

/// Of a table `$1` that role `$2` is dropping: whether it is a table `$2` may drop (as the
/// owner of the table or of its schema); the partitioned table it is a partition of; and if
/// that is in an attached tree, the attached table and every table above it.
pub static DROPPED_TABLE: Sql = Sql {
    text: concat!(
        "SELECT c.relkind OPERATOR(pg_catalog.=) ANY ('{r,p}'::pg_catalog.\"char\"[]) \
                AND (pg_catalog.pg_has_role($2, c.relowner, 'USAGE') OR pg_catalog.pg_has_role($2, n.nspowner, 'USAGE')), \
                i.inhparent, \
                (SELECT pg_catalog.array_agg(u.relid) FROM (",
        partition_ancestors!("i.inhparent"),
        ") u WHERE EXISTS (SELECT FROM (",
        partition_ancestors!("i.inhparent"),
        ") v JOIN @extschema@.outbox_attachments a ON a.source OPERATOR(pg_catalog.=) v.relid \
                             WHERE v.depth OPERATOR(pg_catalog.<=) u.depth)) \
         FROM pg_catalog.pg_class c \
         JOIN pg_catalog.pg_namespace n ON n.oid OPERATOR(pg_catalog.=) c.relnamespace \
         LEFT JOIN pg_catalog.pg_inherits i ON i.inhrelid OPERATOR(pg_catalog.=) c.oid AND c.relispartition \
         WHERE c.oid OPERATOR(pg_catalog.=) $1"
    ),
    args: &[OID, OID],
};

/// Whether role `$2` may drop every schema of `$1` (it has the privileges of its owner).
pub static SCHEMAS_DROPPABLE: Sql = Sql {
    text: "SELECT coalesce(pg_catalog.bool_and(pg_catalog.pg_has_role($2, n.nspowner, 'USAGE')), true) \
           FROM pg_catalog.pg_namespace n WHERE n.oid OPERATOR(pg_catalog.=) ANY ($1)",
    args: &[OIDS, OID],
};

/// The schemas the roles `$1` own.
pub static SCHEMAS_OWNED: Sql = Sql {
    text: "SELECT pg_catalog.array_agg(n.oid) FROM pg_catalog.pg_namespace n WHERE n.nspowner OPERATOR(pg_catalog.=) ANY ($1)",
    args: &[OIDS],
};

/// The tables a DROP SCHEMA … CASCADE of the schemas `$1` or a DROP OWNED BY the roles `$2`
/// drops: those in the schemas or owned by the roles, and every partition below them, which
/// goes with its parent. Each with the table it is a partition of.
pub static TABLES_DROPPED_WITH: Sql = Sql {
    text: "WITH named AS (SELECT c.oid FROM pg_catalog.pg_class c \
                          WHERE c.relkind OPERATOR(pg_catalog.=) ANY ('{r,p}'::pg_catalog.\"char\"[]) \
                            AND (c.relnamespace OPERATOR(pg_catalog.=) ANY ($1) OR c.relowner OPERATOR(pg_catalog.=) ANY ($2))) \
           SELECT g.relid, i.inhparent \
           FROM (SELECT n.oid AS relid FROM named n \
                 UNION SELECT t.relid::pg_catalog.oid FROM named n, pg_catalog.pg_partition_tree(n.oid) t) g \
           JOIN pg_catalog.pg_class c ON c.oid OPERATOR(pg_catalog.=) g.relid \
           LEFT JOIN pg_catalog.pg_inherits i ON i.inhrelid OPERATOR(pg_catalog.=) g.relid AND c.relispartition \
           ORDER BY g.relid",
    args: &[OIDS, OIDS],
};

/// `$1` and every table of its partition tree, parents before their partitions, and whether
/// each holds rows of its own (an ordinary table, not a partitioned or a foreign one). (A table
/// just detached is in no tree: pg_partition_tree has no row for it.)
pub static TABLES_IN_TREE: Sql = Sql {
    text: "SELECT t.relid::pg_catalog.oid, c.relkind OPERATOR(pg_catalog.=) 'r' \
           FROM (SELECT $1::pg_catalog.regclass, 0 UNION SELECT relid, level FROM pg_catalog.pg_partition_tree($1)) t(relid, level) \
           JOIN pg_catalog.pg_class c ON c.oid OPERATOR(pg_catalog.=) t.relid \
           ORDER BY t.level, t.relid",
    args: &[OID],
};

// ---------------------------------------------------------------------------------------
// attach

pub static TABLE_FACTS: Sql = Sql {
    text: "SELECT c.relkind::text, pg_catalog.pg_has_role(c.relowner, 'USAGE'), \
                  ARRAY(SELECT a.attname::text \
                        FROM pg_catalog.pg_index i \
                        JOIN pg_catalog.pg_attribute a ON a.attrelid = i.indrelid AND a.attnum = ANY (i.indkey) \
                        WHERE i.indrelid = c.oid AND i.indisprimary \
                        ORDER BY pg_catalog.array_position(i.indkey::int2[], a.attnum)), \
                  c.relkind = 'p' OR EXISTS (SELECT FROM pg_catalog.pg_inherits h WHERE c.oid IN (h.inhrelid, h.inhparent)) \
           FROM pg_catalog.pg_class c WHERE c.oid = $1",
    args: &[OID],
};

/// The root of the partition tree `$1` is in; NULL for a table outside any.
pub static PARTITION_ROOT: Sql = Sql { text: "SELECT pg_catalog.pg_partition_root($1)::pg_catalog.oid", args: &[OID] };

/// Another attached table of the partition tree `$1` is in: an ancestor, or a partition below.
pub static ATTACHED_IN_PARTITION_TREE: Sql = Sql {
    text: "SELECT a.source::pg_catalog.oid \
           FROM (SELECT relid FROM pg_catalog.pg_partition_ancestors($1) \
                 UNION ALL SELECT relid FROM pg_catalog.pg_partition_tree($1)) r \
           JOIN @extschema@.outbox_attachments a ON a.source OPERATOR(pg_catalog.=) r.relid \
           WHERE r.relid OPERATOR(pg_catalog.<>) $1 LIMIT 1",
    args: &[OID],
};

pub static SAVE_ATTACHMENT: Sql = Sql {
    text: "INSERT INTO @extschema@.outbox_attachments \
             (source, key_columns, payload_columns, watch_columns, event_prefix, generation) \
           VALUES ($1, $2, $3, $4, $5, pg_catalog.nextval('@extschema@.outbox_attachment_generation')) \
           ON CONFLICT (source) DO UPDATE SET key_columns = EXCLUDED.key_columns, \
             payload_columns = EXCLUDED.payload_columns, watch_columns = EXCLUDED.watch_columns, \
             event_prefix = EXCLUDED.event_prefix, generation = EXCLUDED.generation, attached_at = pg_catalog.now() \
           RETURNING generation",
    args: &[OID, TEXTS, TEXTS, TEXTS, TEXT],
};

/// The tables a CREATE TABLE (or CREATE SCHEMA) made that are partitions, from the event
/// trigger's record of the command.
pub static PARTITIONS_MADE: Sql = Sql {
    text: "SELECT DISTINCT c.objid FROM pg_catalog.pg_event_trigger_ddl_commands() c \
           JOIN pg_catalog.pg_class k ON k.oid OPERATOR(pg_catalog.=) c.objid \
           WHERE c.classid OPERATOR(pg_catalog.=) 'pg_catalog.pg_class'::pg_catalog.regclass \
             AND c.objsubid OPERATOR(pg_catalog.=) 0 AND k.relispartition \
             AND k.relkind OPERATOR(pg_catalog.=) ANY ('{r,p}'::pg_catalog.\"char\"[])",
    args: &[],
};

/// (run by the DDL event trigger too, under the caller's search_path)
pub static CAPTURE_TRIGGERS: Sql = Sql {
    text: "SELECT tgname::pg_catalog.text FROM pg_catalog.pg_trigger \
           WHERE tgrelid OPERATOR(pg_catalog.=) $1 AND tgname::pg_catalog.text OPERATOR(pg_catalog.=) ANY ($2)",
    args: &[OID, TEXTS],
};

pub static DELETE_ATTACHMENT: Sql = Sql {
    text: "DELETE FROM @extschema@.outbox_attachments WHERE source = $1 RETURNING 1",
    args: &[OID],
};

// ---------------------------------------------------------------------------------------
// subscriptions

/// The highest base drawn so far from the event id sequence (the oid parameter named): a window
/// or a new subscription covers the log rows up to it, and a straddle-floor mark rests on it.
/// pg_sequence_last_value reads it under the sequence's buffer lock. `SELECT last_value FROM`
/// the sequence reads the page unlocked, where every 32nd nextval briefly writes the value it
/// logs ahead, 32 bases on: a mark read then raised the floor over bases not drawn yet, and
/// the events of transactions that drew them and committed after a window closed were skipped.
/// Before the first nextval there is none (NULL), and base 1 must not count as drawn: a
/// subscription created in the transaction that writes the first events, if its snapshot
/// shows its own xid as visible (a later transaction finished first), would skip them. The
/// default subscription's row in sql/api.sql starts from the same expression. PostgreSQL 18
/// also returns NULL to a caller without privileges on the sequence; here the extension's
/// owner reads it (claims and subscribe are SECURITY DEFINER, the worker a superuser).
macro_rules! last_base {
    ($sequence:literal) => {
        concat!("coalesce(pg_catalog.pg_sequence_last_value(", $sequence, "::pg_catalog.regclass), 1 - 4096)")
    };
}

macro_rules! subscribe {
    ($floor_column:literal, $floor:literal) => {
        concat!(
            "INSERT INTO @extschema@.outbox_subscriptions \
               (name, sink, options, done_snapshot, done_seq, window_snapshot, window_seq",
            $floor_column,
            ") \
             SELECT $1, $2, $3, w.snap, w.seq, w.snap, w.seq",
            $floor,
            " FROM (SELECT CASE WHEN $4 THEN '1:1:'::pg_catalog.pg_snapshot ELSE pg_catalog.pg_current_snapshot() END AS snap, \
                           CASE WHEN $4 THEN 1 - 4096 ELSE ",
            last_base!("$5"),
            " END AS seq) w \
             ON CONFLICT (name) DO NOTHING RETURNING id"
        )
    };
}

/// A new subscription's straddle floor is the highest of the others': each holds for every
/// snapshot taken after that subscription's done snapshot, the new one's included.
pub static SUBSCRIBE: ForRelease = ForRelease {
    current: Sql {
        text: subscribe!(
            ", straddle_floor",
            ", CASE WHEN $4 THEN 1 - 4096 \
                    ELSE coalesce((SELECT pg_catalog.max(straddle_floor) FROM @extschema@.outbox_subscriptions), 1 - 4096) END"
        ),
        args: &[TEXT, TEXT, JSONB, BOOL, OID],
    },
    before_0_8: None,
    before_0_4: Sql { text: subscribe!("", ""), args: &[TEXT, TEXT, JSONB, BOOL, OID] },
};

pub static UNSUBSCRIBE: Sql = Sql {
    text: "WITH gone AS (DELETE FROM @extschema@.outbox_subscriptions WHERE id = $1 RETURNING id, name), \
                r AS (DELETE FROM @extschema@.outbox_retries USING gone WHERE subscription_id = gone.id), \
                c AS (DELETE FROM @extschema@.outbox_claims USING gone WHERE subscription_id = gone.id), \
                s AS (DELETE FROM @extschema@.outbox_stats USING gone WHERE subscription_id = gone.id), \
                k AS (DELETE FROM @extschema@.outbox_sink_state USING gone WHERE subscription_id = gone.id) \
           DELETE FROM @extschema@.outbox_dead_letters USING gone WHERE subscription = gone.name",
    args: &[INT4],
};

/// Locks a subscription (or, for NULL, every one) as a claim does, for the operations that
/// must not interleave with claims: an unsubscribe, a replay, a requeue. Their next statements
/// then see what the claims before them committed.
pub static LOCK_SUBSCRIPTIONS: Sql = Sql {
    text: "SELECT id FROM @extschema@.outbox_subscriptions WHERE $1::text IS NULL OR name = $1 ORDER BY id FOR NO KEY UPDATE",
    args: &[TEXT],
};

/// Whether the role `$caller` may consume the subscription row at hand: with the privileges of
/// its `consumer_role`, when its options name one. The role is the one named when the
/// subscription was made (its oid, recorded): a role dropped and made again under the name, by
/// whoever may create roles, is another role. (Before 0.8.0, by the name.)
macro_rules! may_consume {
    (by_oid $caller:literal) => {
        concat!(
            "(NOT options ? 'consumer_role' OR pg_catalog.pg_has_role(",
            $caller,
            ", consumer_role::pg_catalog.oid, 'USAGE') IS TRUE)"
        )
    };
    (by_name $caller:literal) => {
        concat!(
            "(NOT options ? 'consumer_role' OR pg_catalog.pg_has_role(",
            $caller,
            ", pg_catalog.to_regrole(pg_catalog.quote_ident(options ->> 'consumer_role')), 'USAGE') IS TRUE)"
        )
    };
}

macro_rules! find_subscription {
    ($($may_consume:tt)+) => {
        concat!("SELECT id, options, sink, ", $($may_consume)+, " FROM @extschema@.outbox_subscriptions WHERE name = $1")
    };
}

/// `$2`: the caller, for the fourth column (see may_consume).
pub static FIND_SUBSCRIPTION: ForRelease = ForRelease {
    current: Sql { text: find_subscription!(may_consume!(by_oid "$2")), args: &[TEXT, OID] },
    before_0_8: Some(Sql { text: find_subscription!(may_consume!(by_name "$2")), args: &[TEXT, OID] }),
    before_0_4: Sql { text: find_subscription!(may_consume!(by_name "$2")), args: &[TEXT, OID] },
};

// ---------------------------------------------------------------------------------------
// claim

macro_rules! lock_subscription {
    ($floor_columns:literal, $($may_consume:tt)+) => {
        concat!(
            "SELECT id, options, done_seq, window_seq, window_cursor, ",
            $floor_columns,
            ", pg_catalog.pg_snapshot_xmin(window_snapshot)::text::bigint, ctid, done_snapshot::text, window_snapshot::text \
             FROM @extschema@.outbox_subscriptions WHERE name = $1 AND (sink = 'pull' OR $2) AND ",
            $($may_consume)+,
            " FOR NO KEY UPDATE"
        )
    };
}

/// Serializes claims of one subscription; acks and fails do not take this lock. Returns the
/// row's ctid and snapshots too: a claim reads the row once, here, and writes it at most once,
/// by ctid (SAVE_WINDOW, SAVE_CURSOR). Every claim used to update it twice and read it by id
/// five more times; a transaction holding back xmin keeps every old version of the row, and
/// each read walked them all.
/// `$2`: whether a subscription with a sink may be locked (by the delivery worker). `$3`: the
/// caller, who must be one who may consume it (see may_consume): another does not get the
/// lock, which an aborted transaction would otherwise hold until it rolls back.
pub static LOCK_SUBSCRIPTION: ForRelease = ForRelease {
    current: Sql {
        text: lock_subscription!("straddle_floor, floor_mark_bases, floor_mark_xids", may_consume!(by_oid "$3")),
        args: &[TEXT, BOOL, OID],
    },
    before_0_8: Some(Sql {
        text: lock_subscription!("straddle_floor, floor_mark_bases, floor_mark_xids", may_consume!(by_name "$3")),
        args: &[TEXT, BOOL, OID],
    }),
    before_0_4: Sql {
        text: lock_subscription!("-4095::bigint, '{}'::bigint[], '{}'::bigint[]", may_consume!(by_name "$3")),
        args: &[TEXT, BOOL, OID],
    },
};

/// The expired claims of a subscription with everything the ledger keeps of the events they
/// handed out, locked. LATERAL keeps the plan claims-first: the claims table churns, and stale
/// statistics would otherwise make the planner read every ledger row of the subscription.
pub static EXPIRED_CLAIMS: Sql = Sql {
    text: "SELECT c.claim_id, c.open_count, c.event_count, \
                  l.event_ids, l.key_hashes, l.table_hashes, l.created_ats \
           FROM @extschema@.outbox_claims c \
           CROSS JOIN LATERAL (SELECT * FROM @extschema@.outbox_ledger l \
                               WHERE l.slot = c.ledger_slot AND l.subscription_id = c.subscription_id \
                                 AND l.claim_id = c.claim_id AND l.kind = 'c' LIMIT 1) l \
           WHERE c.subscription_id = $1 AND c.expires_at <= $2 ORDER BY c.claim_id FOR UPDATE OF c",
    args: &[INT4, TIME],
};

/// The open claims of a subscription as the claims table alone lists them: which ledger
/// segment holds each, and whether its lease has expired at $2.
pub static OPEN_CLAIM_SEGMENTS: Sql = Sql {
    text: "SELECT claim_id, ledger_slot, expires_at <= $2 FROM @extschema@.outbox_claims WHERE subscription_id = $1",
    args: &[INT4, TIME],
};

/// Open claims in one ledger segment (see `run_in_segment`), in EXPIRED_CLAIMS' columns.
/// Every claim and ack reads the open claims of its subscription, segment by segment: a join
/// on each claim's segment (as in EXPIRED_CLAIMS, which runs only when a lease has expired)
/// starts a scan of all eight segments for every query. The claims are filtered by the ids on
/// both sides: the claims table churns and its statistics say it is empty, so the plan starts
/// from it, and an ack that reads one claim would otherwise look up the ledger row of each.
pub static SEGMENT_CLAIMS: Sql = Sql {
    text: "SELECT c.claim_id, c.open_count, c.event_count, l.event_ids, l.key_hashes, l.table_hashes, l.created_ats \
           FROM @extschema@.outbox_ledger_@segment@ l \
           JOIN @extschema@.outbox_claims c ON c.subscription_id = l.subscription_id AND c.claim_id = l.claim_id \
           WHERE l.subscription_id = $1 AND l.kind = 'c' AND l.claim_id = ANY ($2) AND c.claim_id = ANY ($2)",
    args: &[INT4, INT8S],
};

/// Locks an open claim against concurrent acks and fails.
pub static LOCK_CLAIM: Sql = Sql {
    text: "SELECT open_count FROM @extschema@.outbox_claims WHERE subscription_id = $1 AND claim_id = $2 FOR UPDATE",
    args: &[INT4, INT8],
};

pub static RESOLVED_EVENTS: Sql = Sql {
    text: "SELECT pg_catalog.array_agg(id) FROM @extschema@.outbox_ledger l, pg_catalog.unnest(l.event_ids) id \
           WHERE l.subscription_id = $1 AND l.claim_id = $2 AND l.kind <> 'c'",
    args: &[INT4, INT8],
};

/// The first pending event of each row (and no row event behind a pending TRUNCATE of its
/// table, no TRUNCATE behind a pending event of its table), oldest first. Read unlocked: a
/// late ack or fail of an expired hand-out may commit while the claim runs, so what the claim
/// then does to a candidate (LEASE_RETRIES, BURY_EXPIRED_RETRIES) checks the row again.
pub static RETRY_CANDIDATES: Sql = Sql {
    text: "SELECT r.event_id, r.key_hash, r.table_hash, r.attempts, r.leased_until IS NOT NULL, \
                  coalesce(r.leased_until > r.visible_at, false) \
           FROM @extschema@.outbox_retries r \
           WHERE r.subscription_id = $1 AND r.visible_at <= $2 \
             AND (r.leased_until IS NULL OR r.leased_until <= $2) \
             AND NOT EXISTS (SELECT 1 FROM @extschema@.outbox_retries p WHERE p.subscription_id = $1 \
                             AND p.key_hash = r.key_hash AND p.event_id < r.event_id) \
             AND NOT EXISTS (SELECT 1 FROM @extschema@.outbox_retries p WHERE p.subscription_id = $1 \
                             AND p.key_hash = r.table_hash AND p.event_id < r.event_id) \
             AND (r.key_hash <> r.table_hash \
                  OR NOT EXISTS (SELECT 1 FROM @extschema@.outbox_retries p WHERE p.subscription_id = $1 \
                                 AND p.table_hash = r.table_hash AND p.event_id < r.event_id)) \
           ORDER BY r.event_id LIMIT $3",
    args: &[INT4, TIME, INT4],
};

pub static HAS_RETRIES: Sql = Sql {
    text: "SELECT EXISTS (SELECT 1 FROM @extschema@.outbox_retries WHERE subscription_id = $1)",
    args: &[INT4],
};

/// Whether a subscription has retries, whether one is due: visible, and not leased or its
/// lease expired (the condition of RETRY_CANDIDATES, as outbox_retries_due indexes it), and
/// whether a hand-out of a processed event has ended (ENDED_PROCESSED_HAND_OUTS). The
/// candidates query walks every retry of the subscription in id order, which for thousands
/// waiting out a backoff is most of a claim.
pub static RETRY_STATE: Sql = Sql {
    text: "SELECT EXISTS (SELECT 1 FROM @extschema@.outbox_retries WHERE subscription_id = $1), \
                  EXISTS (SELECT 1 FROM @extschema@.outbox_retries \
                          WHERE subscription_id = $1 AND GREATEST(visible_at, coalesce(leased_until, visible_at)) <= $2), \
                  EXISTS (SELECT 1 FROM @extschema@.outbox_retries \
                          WHERE subscription_id = $1 AND GREATEST(visible_at, coalesce(leased_until, visible_at)) = 'infinity' \
                            AND leased_until <= $2)",
    args: &[INT4, TIME],
};

/// Pending events that hold back window events: those of these rows (and TRUNCATEs, whose key
/// is their table's), and every event of the tables of the window's TRUNCATEs (`$3`). Asking
/// for every event of each window table would read all the retries a dead consumer left.
pub static RETRY_BLOCKERS: Sql = Sql {
    // Driven from the arrays, so that whatever the plan the work follows the hashes and the
    // retries they match: a plan made while the retry table was nearly empty filtered every
    // retry through the whole array, some 200 ms a claim with 20,000 retries waiting.
    text: "SELECT r.key_hash, r.table_hash FROM pg_catalog.unnest($2) AS k(hash) \
           JOIN @extschema@.outbox_retries r ON r.subscription_id = $1 AND r.key_hash = k.hash \
           UNION ALL \
           SELECT r.key_hash, r.table_hash FROM pg_catalog.unnest($3) AS t(hash) \
           JOIN @extschema@.outbox_retries r ON r.subscription_id = $1 AND r.table_hash = t.hash",
    args: &[INT4, INT8S, INT8S],
};

/// Leases candidates that are still due at $4. Updated by id alone, a candidate that a late
/// fail had just put off (retry_after '1 hour') was handed out at once; the update waits for
/// such a fail, and re-checks the row it left.
pub static LEASE_RETRIES: Sql = Sql {
    text: "UPDATE @extschema@.outbox_retries SET attempts = attempts + 1, leased_until = $3 \
           WHERE subscription_id = $1 AND event_id = ANY ($2) \
             AND visible_at <= $4 AND (leased_until IS NULL OR leased_until <= $4) \
           RETURNING event_id, attempts",
    args: &[INT4, INT8S, TIME, TIME],
};

/// Puts events into the per-event retry table: deferred ones (attempts 0) and failed or
/// expired ones from a window claim (attempts 1).
pub static ADD_RETRIES: Sql = Sql {
    text: "INSERT INTO @extschema@.outbox_retries \
             (subscription_id, event_id, key_hash, table_hash, attempts, visible_at, leased_until, last_error, created_at) \
           SELECT $1, e.id, e.key_hash, e.table_hash, $6, e.visible_at, $7, $8, e.created_at \
           FROM ROWS FROM (pg_catalog.unnest($2), pg_catalog.unnest($3), pg_catalog.unnest($4), pg_catalog.unnest($5), pg_catalog.unnest($9)) AS e(id, key_hash, table_hash, created_at, visible_at) \
           ON CONFLICT DO NOTHING",
    args: &[INT4, INT8S, INT8S, INT8S, TIMES, INT4, TIME, TEXT, TIMES],
};

/// The log rows a claim reads, in the columns `read_window_rows` expects (WINDOW_TYPES).
macro_rules! log_rows {
    () => {
        "SELECT l.base, l.n, l.table_hash, l.created_at, l.key_hashes, l.type, l.source_name, l.keys, l.data \
         FROM @extschema@.outbox_log l"
    };
}

/// Rows of transactions that were still running when the subscription's done snapshot was
/// taken and have committed since: between the straddle floor (the caller's `$3` is never
/// below it) and done_seq.
/// `$4` and `$5` are the done and window snapshots as text, each cast once (a scalar subquery).
pub static STRADDLERS: Sql = Sql {
    text: concat!(log_rows!(), " \
           WHERE l.base <= $1 AND l.base > $2 \
             AND NOT pg_catalog.pg_visible_in_snapshot(l.txid, (SELECT $4::pg_catalog.pg_snapshot)) \
             AND pg_catalog.pg_visible_in_snapshot(l.txid, (SELECT $5::pg_catalog.pg_snapshot)) \
           ORDER BY l.base LIMIT $3"),
    args: &[INT8, INT8, INT8, TEXT, TEXT],
};

/// `$4`: the window snapshot as text.
pub static WINDOW_ROWS: Sql = Sql {
    text: concat!(log_rows!(), " \
           WHERE l.base > $1 AND l.base <= $2 \
             AND pg_catalog.pg_visible_in_snapshot(l.txid, (SELECT $4::pg_catalog.pg_snapshot)) \
           ORDER BY l.base LIMIT $3"),
    args: &[INT8, INT8, INT8, TEXT],
};

/// The copies kept of events requeued from the dead letters, whose log rows may be gone.
pub static RETRY_COPIES: Sql = Sql {
    text: "SELECT event_id, type, payload::text, created_at FROM @extschema@.outbox_retries \
           WHERE subscription_id = $1 AND event_id = ANY ($2) AND payload IS NOT NULL",
    args: &[INT4, INT8S],
};

/// The log rows with these bases, in WINDOW_ROWS' columns: a claim renders the events it takes
/// from the retry table from them, as it renders the window's.
pub static LOG_ROWS: Sql = Sql {
    text: concat!(log_rows!(), " WHERE l.base = ANY ($1)"),
    args: &[INT8S],
};

/// The next window: the current snapshot and the last base drawn (events of transactions the
/// snapshot does not see are the next window's straddlers), which is also the base of a
/// straddle-floor mark. `$1`: the sequence.
pub static NEXT_WINDOW: Sql =
    Sql { text: concat!("SELECT pg_catalog.pg_current_snapshot()::text, ", last_base!("$1")), args: &[OID] };

macro_rules! save_window {
    ($set_floor:literal) => {
        concat!(
            "UPDATE @extschema@.outbox_subscriptions \
             SET done_snapshot = window_snapshot, done_seq = window_seq, \
                 window_snapshot = $3::pg_catalog.pg_snapshot, window_seq = $4, window_cursor = $5",
            $set_floor,
            " WHERE ctid = $2 AND id = $1 RETURNING id"
        )
    };
}

/// Closes the exhausted window and records the next one (NEXT_WINDOW) with its cursor, and the
/// straddle floor and marks as `StraddleFloor::close_window` left them. `$2`: the row's ctid,
/// which the claim's lock keeps.
pub static SAVE_WINDOW: ForRelease = ForRelease {
    current: Sql {
        text: save_window!(", straddle_floor = $6, floor_mark_bases = $7, floor_mark_xids = $8"),
        args: &[INT4, TID, TEXT, INT8, INT8, INT8, INT8S, INT8S],
    },
    before_0_8: None,
    before_0_4: Sql { text: save_window!(""), args: &[INT4, TID, TEXT, INT8, INT8, INT8, INT8S, INT8S] },
};

pub static SAVE_CURSOR: Sql = Sql {
    text: "UPDATE @extschema@.outbox_subscriptions SET window_cursor = $3 WHERE ctid = $2 AND id = $1 RETURNING id",
    args: &[INT4, TID, INT8],
};

pub static RECORD_CLAIM: Sql = Sql {
    text: "WITH l AS (INSERT INTO @extschema@.outbox_ledger \
                        (slot, subscription_id, claim_id, kind, at, event_ids, key_hashes, table_hashes, created_ats) \
                      SELECT r.current_slot, $1, pg_catalog.nextval('@extschema@.outbox_claim_id_seq'), 'c', $2, $4, $5, $6, $7 \
                      FROM @extschema@.outbox_rotation r RETURNING slot, claim_id) \
           INSERT INTO @extschema@.outbox_claims \
             (subscription_id, claim_id, ledger_slot, expires_at, event_count, open_count, oldest_created_at) \
           SELECT $1, l.claim_id, l.slot, $3, pg_catalog.cardinality($4), pg_catalog.cardinality($4), \
                  (SELECT min(t) FROM pg_catalog.unnest($7) t) \
           FROM l RETURNING claim_id, ledger_slot",
    args: &[INT4, TIME, TIME, INT8S, INT8S, INT8S, TIMES],
};

// ---------------------------------------------------------------------------------------
// ack and fail

/// Records acks ('a'), fails ('f') and lease expiries ('x'). Ack rows are the processed
/// times of events.
pub static RECORD_RESOLUTION: Sql = Sql {
    text: "INSERT INTO @extschema@.outbox_ledger (slot, subscription_id, claim_id, kind, at, event_ids) \
           SELECT r.current_slot, $1, $2, $3::\"char\", $4, $5 FROM @extschema@.outbox_rotation r",
    args: &[INT4, INT8, TEXT, TIME, INT8S],
};

pub static SET_OPEN_COUNT: Sql = Sql {
    text: "UPDATE @extschema@.outbox_claims SET open_count = $3, oldest_created_at = $4 WHERE subscription_id = $1 AND claim_id = $2",
    args: &[INT4, INT8, INT4, TIME],
};

pub static CLOSE_CLAIM: Sql = Sql {
    text: "DELETE FROM @extschema@.outbox_claims WHERE subscription_id = $1 AND claim_id = $2",
    args: &[INT4, INT8],
};

/// The retry-table hand-outs of these events, running or expired, locked. A visible_at of
/// infinity marks one whose event an ack from outside it has processed: it is never handed out
/// again, and it holds its row back until it is settled or its lease ends.
pub static RETRY_HAND_OUTS: Sql = Sql {
    text: "SELECT event_id, attempts, key_hash, table_hash, leased_until, visible_at = 'infinity', created_at \
           FROM @extschema@.outbox_retries \
           WHERE subscription_id = $1 AND event_id = ANY ($2) AND leased_until IS NOT NULL \
           ORDER BY event_id FOR UPDATE",
    args: &[INT4, INT8S],
};

pub static DROP_RETRIES: Sql = Sql {
    text: "DELETE FROM @extschema@.outbox_retries WHERE subscription_id = $1 AND event_id = ANY ($2)",
    args: &[INT4, INT8S],
};

pub static PROCESSED_IN_FLIGHT: Sql = Sql {
    text: "UPDATE @extschema@.outbox_retries SET visible_at = 'infinity' WHERE subscription_id = $1 AND event_id = ANY ($2)",
    args: &[INT4, INT8S],
};

/// Hand-outs of processed events (see RETRY_HAND_OUTS) whose lease has ended by $2.
pub static ENDED_PROCESSED_HAND_OUTS: Sql = Sql {
    text: "DELETE FROM @extschema@.outbox_retries \
           WHERE subscription_id = $1 AND GREATEST(visible_at, coalesce(leased_until, visible_at)) = 'infinity' \
             AND leased_until <= $2",
    args: &[INT4, TIME],
};

/// `$5` is 1 to give the hand-out back (an uncounted failure), 0 otherwise.
pub static RETRY_LATER: Sql = Sql {
    text: "UPDATE @extschema@.outbox_retries r \
           SET visible_at = e.visible_at, last_error = $4, leased_until = NULL, attempts = r.attempts - $5 \
           FROM ROWS FROM (pg_catalog.unnest($2), pg_catalog.unnest($3)) AS e(id, visible_at) \
           WHERE r.subscription_id = $1 AND r.event_id = e.id",
    args: &[INT4, INT8S, TIMES, TEXT, INT4],
};

pub static IN_FLIGHT_RETRIES: Sql = Sql {
    text: "SELECT event_id FROM @extschema@.outbox_retries WHERE subscription_id = $1 AND leased_until > pg_catalog.now()",
    args: &[INT4],
};

/// The dead-letter insert of BURY and BURY_EXPIRED_RETRIES, from a CTE `dead` of the events.
macro_rules! insert_dead_letters {
    ($error:literal, $failed_at:literal) => {
        concat!(
            "INSERT INTO @extschema@.outbox_dead_letters \
               (subscription, event_id, type, payload, attempts, last_error, failed_at, created_at, key_hash, table_hash) \
             SELECT s.name, dead.id, dead.type, dead.payload, dead.attempts, ",
            $error,
            ", ",
            $failed_at,
            ", dead.created_at, dead.key_hash, dead.table_hash \
             FROM dead, @extschema@.outbox_subscriptions s WHERE s.id = $1 \
             ON CONFLICT (subscription, event_id) DO UPDATE SET type = EXCLUDED.type, payload = EXCLUDED.payload, \
               attempts = EXCLUDED.attempts, last_error = EXCLUDED.last_error, failed_at = EXCLUDED.failed_at"
        )
    };
}

/// Moves events to the dead letters, taking type and payload from the retry table's copy or
/// from the log.
pub static BURY: Sql = Sql {
    text: concat!(
        "WITH dead AS ( \
             SELECT d.id, d.attempts, d.key_hash, d.table_hash, \
                    coalesce(r.type, e.type) AS type, coalesce(r.payload, e.payload) AS payload, \
                    coalesce(r.created_at, e.created_at) AS created_at \
             FROM ROWS FROM (pg_catalog.unnest($2), pg_catalog.unnest($3), pg_catalog.unnest($4), pg_catalog.unnest($5)) AS d(id, attempts, key_hash, table_hash) \
             LEFT JOIN @extschema@.outbox_retries r ON r.subscription_id = $1 AND r.event_id = d.id \
             LEFT JOIN @extschema@.outbox_events_for($2) e ON e.id = d.id), \
           gone AS (DELETE FROM @extschema@.outbox_retries r USING dead \
                    WHERE r.subscription_id = $1 AND r.event_id = dead.id) ",
    insert_dead_letters!("$6", "$7")),
    args: &[INT4, INT8S, pg_sys::INT4ARRAYOID, INT8S, INT8S, TEXT, TIME],
};

/// Buries the retry hand-outs among $2 whose lease is still over at $4 (and that are still
/// due: not processed meanwhile), with last error $3; returns how many, and how many of them
/// had been leased by a claim of the retry table (not given back by a rescue, which counted
/// them). Buried by id alone,
/// an event whose late ack committed while the claim ran was processed and dead at once (and
/// a requeue sent it out again).
pub static BURY_EXPIRED_RETRIES: Sql = Sql {
    text: concat!(
        "WITH gone AS (DELETE FROM @extschema@.outbox_retries r \
                       WHERE r.subscription_id = $1 AND r.event_id = ANY ($2) AND r.leased_until <= $4 AND r.visible_at <= $4 \
                       RETURNING r.event_id, r.attempts, r.key_hash, r.table_hash, r.type, r.payload, r.created_at, \
                                 r.leased_until > r.visible_at AS leased), \
              dead AS (SELECT g.event_id AS id, g.attempts, g.key_hash, g.table_hash, \
                              coalesce(g.type, e.type) AS type, coalesce(g.payload, e.payload) AS payload, \
                              coalesce(g.created_at, e.created_at) AS created_at \
                       FROM gone g LEFT JOIN @extschema@.outbox_events_for($2) e ON e.id = g.event_id), \
              buried AS (",
        insert_dead_letters!("$3", "$4"),
        " RETURNING 1) \
         SELECT (SELECT pg_catalog.count(*) FROM buried), (SELECT pg_catalog.count(*) FROM gone WHERE gone.leased)"
    ),
    args: &[INT4, INT8S, TEXT, TIME],
};

/// Adds to the counters of the minute of $2, in the row of shard $8 (`STATS_SHARDS`): the
/// minute plus $8 microseconds. Every ack counts itself here and keeps the row locked until
/// its commit has flushed; with one row a minute, the acks of all consumers waited for each
/// other's flushes. Readers sum the rows of a range of buckets, so shards are invisible.
pub static COUNT_STATS: Sql = Sql {
    text: "INSERT INTO @extschema@.outbox_stats AS s \
             (subscription_id, bucket, acked, latency_sum, failed, dead, latency_buckets) \
           VALUES ($1, pg_catalog.date_trunc('minute', $2) + $8 * interval '1 microsecond', $3, $4, $5, $6, $7) \
           ON CONFLICT (subscription_id, bucket) DO UPDATE SET acked = s.acked + EXCLUDED.acked, \
             latency_sum = s.latency_sum + EXCLUDED.latency_sum, failed = s.failed + EXCLUDED.failed, \
             dead = s.dead + EXCLUDED.dead, \
             latency_buckets = ARRAY(SELECT coalesce(a, 0) + coalesce(b, 0) \
                                     FROM ROWS FROM (pg_catalog.unnest(s.latency_buckets), \
                                                     pg_catalog.unnest(EXCLUDED.latency_buckets)) AS t(a, b))",
    args: &[INT4, TIME, INT8, pg_sys::FLOAT8OID, INT8, INT8, INT8S, INT4],
};

/// Rows each minute's counters are spread over, by backend.
pub const STATS_SHARDS: i32 = 8;

/// Whether any subscription has a sink, and whether the delivery worker serves this database.
pub static WORKER_STATE: Sql = Sql {
    text: "SELECT EXISTS (SELECT 1 FROM @extschema@.outbox_subscriptions WHERE sink <> 'pull'), \
                  EXISTS (SELECT 1 FROM pg_catalog.pg_stat_activity \
                          WHERE backend_type = 'outbox delivery worker' AND datname = pg_catalog.current_database())",
    args: &[],
};

/// How old the oldest event still in the log is, processed or not (no row when it is empty):
/// by id, which the `base` index reads from the first segment's start.
pub static OLDEST_RETAINED: Sql = Sql {
    text: "SELECT extract(epoch FROM pg_catalog.now() - l.created_at)::float8 FROM @extschema@.outbox_log l ORDER BY l.base LIMIT 1",
    args: &[],
};

/// Per subscription: its backlog, and its counters summed over every stats bucket.
pub static METRICS: Sql = Sql {
    text: "SELECT b.subscription, b.pending, b.in_flight, b.retrying, b.dead, \
                  coalesce(extract(epoch FROM b.oldest_pending_age), 0)::float8, \
                  coalesce(t.acked, 0)::int8, coalesce(t.failed, 0)::int8, coalesce(t.dead, 0)::int8, \
                  coalesce(t.latency_sum, 0)::float8, \
                  ARRAY(SELECT sum(u.v)::int8 FROM @extschema@.outbox_stats x, \
                        pg_catalog.unnest(x.latency_buckets) WITH ORDINALITY AS u(v, i) \
                        WHERE x.subscription_id = s.id GROUP BY u.i ORDER BY u.i), \
                  CASE WHEN b.sink = 'pull' THEN NULL ELSE b.backing_off_until IS NULL END \
           FROM @extschema@.outbox_backlog b \
           JOIN @extschema@.outbox_subscriptions s ON s.name = b.subscription \
           LEFT JOIN LATERAL (SELECT sum(acked) AS acked, sum(failed) AS failed, sum(dead) AS dead, \
                                     sum(latency_sum) AS latency_sum \
                              FROM @extschema@.outbox_stats WHERE subscription_id = s.id) t ON true \
           ORDER BY b.subscription",
    args: &[],
};

// ---------------------------------------------------------------------------------------
// replay, requeue

/// Events of the subscription that were handed out and are neither in flight, pending, nor
/// dead, restricted to those captured since `$2` and/or with the ids `$3`: what a replay
/// makes deliverable again. Not those committed before the subscription was made, which its
/// first `done` snapshot counts as handed out: a replay gave a new subscription other tables'
/// events and a TRUNCATE. Not those with a newer event of their row (or a TRUNCATE of their
/// table, or for a TRUNCATE any newer event of its table) in flight: handed out after it, they
/// would leave the copy at an older version. (The start is read through `to_jsonb`: a database
/// not yet updated to 0.9.0 has no such columns, and replays as before.)
pub static REPLAY_CANDIDATES: Sql = Sql {
    text: "WITH s AS (SELECT x.*, \
                  coalesce((pg_catalog.to_jsonb(x) ->> 'start_seq')::bigint, -4095) AS origin_seq, \
                  coalesce((pg_catalog.to_jsonb(x) ->> 'start_snapshot')::pg_catalog.pg_snapshot, '1:1:') AS origin_snapshot \
                  FROM @extschema@.outbox_subscriptions x WHERE x.id = $1), \
           handed_out AS ( \
             SELECT l.base + e.ord - 1 AS id, e.key_hash, l.table_hash, l.created_at \
             FROM s, @extschema@.outbox_log l \
             CROSS JOIN LATERAL pg_catalog.unnest(l.key_hashes) WITH ORDINALITY AS e(key_hash, ord) \
             WHERE ($2::timestamptz IS NULL OR l.created_at >= $2) \
               AND ($3::bigint[] IS NULL OR l.base = ANY (ARRAY(SELECT DISTINCT i - (i - 1) % 4096 FROM pg_catalog.unnest($3) i))) \
               AND ((l.base <= s.done_seq AND pg_catalog.pg_visible_in_snapshot(l.txid, s.done_snapshot)) \
                    OR (l.base + e.ord - 1 <= s.window_cursor AND l.base <= s.window_seq \
                        AND pg_catalog.pg_visible_in_snapshot(l.txid, s.window_snapshot))) \
               AND NOT (l.base <= s.origin_seq AND pg_catalog.pg_visible_in_snapshot(l.txid, s.origin_snapshot))), \
           in_flight AS ( \
             SELECT u.id, pg_catalog.max(u.key_hash) AS key_hash, pg_catalog.max(u.table_hash) AS table_hash \
             FROM @extschema@.outbox_claims c \
             JOIN @extschema@.outbox_ledger l ON l.subscription_id = c.subscription_id AND l.claim_id = c.claim_id \
             CROSS JOIN LATERAL ROWS FROM (pg_catalog.unnest(l.event_ids), pg_catalog.unnest(l.key_hashes), \
                                          pg_catalog.unnest(l.table_hashes)) AS u(id, key_hash, table_hash) \
             WHERE c.subscription_id = $1 \
             GROUP BY u.id HAVING pg_catalog.bool_and(l.kind = 'c') \
             UNION ALL \
             SELECT event_id, key_hash, table_hash FROM @extschema@.outbox_retries \
             WHERE subscription_id = $1 AND leased_until > pg_catalog.now()) \
           SELECT h.id, h.key_hash, h.table_hash, h.created_at FROM handed_out h \
           WHERE ($3::bigint[] IS NULL OR h.id IN (SELECT pg_catalog.unnest($3))) \
             AND NOT EXISTS (SELECT 1 FROM in_flight f WHERE f.id = h.id) \
             AND NOT EXISTS (SELECT 1 FROM in_flight f WHERE f.id > h.id AND f.table_hash = h.table_hash \
                             AND (f.key_hash IN (h.key_hash, h.table_hash) OR h.key_hash = h.table_hash)) \
             AND NOT EXISTS (SELECT 1 FROM @extschema@.outbox_retries r WHERE r.subscription_id = $1 AND r.event_id = h.id) \
             AND NOT EXISTS (SELECT 1 FROM @extschema@.outbox_dead_letters d, s \
                             WHERE d.subscription = s.name AND d.event_id = h.id) \
           ORDER BY h.id",
    args: &[INT4, TIME, INT8S],
};

/// Moves dead letters back to the retry table, but not one whose row has a newer event (or
/// its table a newer TRUNCATE; for a TRUNCATE, its table any newer event) in the retained
/// log: that event has brought, or will bring, the copy further than the dead one would, and
/// handed out after it the dead one would take the copy back (an UPSERT after a DELETE, a row
/// that exists again, a TRUNCATE emptying rows written since).
pub static REQUEUE_DEAD: Sql = Sql {
    text: "WITH moved AS ( \
             DELETE FROM @extschema@.outbox_dead_letters d USING @extschema@.outbox_subscriptions s \
             WHERE s.name = d.subscription AND ($1::text IS NULL OR d.subscription = $1) \
               AND ($2::bigint[] IS NULL OR d.event_id = ANY ($2)) \
               AND NOT EXISTS (SELECT 1 FROM @extschema@.outbox_log l \
                               CROSS JOIN LATERAL pg_catalog.unnest(l.key_hashes) WITH ORDINALITY AS e(key_hash, ord) \
                               WHERE l.base > d.event_id - 4096 AND l.base + l.n - 1 > d.event_id \
                                 AND l.table_hash = d.table_hash \
                                 AND (d.key_hash = d.table_hash OR d.key_hash = ANY (l.key_hashes) \
                                      OR l.table_hash = ANY (l.key_hashes)) \
                                 AND l.base + e.ord - 1 > d.event_id \
                                 AND (d.key_hash = d.table_hash OR e.key_hash IN (d.key_hash, d.table_hash))) \
             RETURNING s.id AS subscription_id, d.*), \
           requeued AS ( \
             INSERT INTO @extschema@.outbox_retries (subscription_id, event_id, key_hash, table_hash, attempts, \
                                                     visible_at, last_error, created_at, type, payload) \
             SELECT subscription_id, event_id, key_hash, table_hash, 0, $3, last_error, created_at, type, payload \
             FROM moved ON CONFLICT DO NOTHING) \
           SELECT count(*) FROM moved",
    args: &[TEXT, INT8S, TIME],
};

pub static PURGE_DEAD_LETTERS: Sql = Sql {
    text: "WITH gone AS (DELETE FROM @extschema@.outbox_dead_letters \
                         WHERE failed_at < $1 AND ($2::text IS NULL OR subscription = $2) RETURNING 1) \
           SELECT count(*) FROM gone",
    args: &[TIME, TEXT],
};

// ---------------------------------------------------------------------------------------
// retention

pub static LOCK_ROTATION: Sql = Sql {
    text: "SELECT current_slot, switched_at FROM @extschema@.outbox_rotation FOR UPDATE",
    args: &[],
};

/// Delivery state of subscriptions that no longer exist: a fail that committed while its
/// subscription was being removed (see admin::unsubscribe). Left, it would keep its segments.
pub static DELETE_ORPHANS: Sql = Sql {
    text: "WITH c AS (DELETE FROM @extschema@.outbox_claims x WHERE NOT EXISTS \
                        (SELECT 1 FROM @extschema@.outbox_subscriptions s WHERE s.id = x.subscription_id)), \
                r AS (DELETE FROM @extschema@.outbox_retries x WHERE NOT EXISTS \
                        (SELECT 1 FROM @extschema@.outbox_subscriptions s WHERE s.id = x.subscription_id)), \
                t AS (DELETE FROM @extschema@.outbox_stats x WHERE NOT EXISTS \
                        (SELECT 1 FROM @extschema@.outbox_subscriptions s WHERE s.id = x.subscription_id)) \
           DELETE FROM @extschema@.outbox_sink_state x WHERE NOT EXISTS \
             (SELECT 1 FROM @extschema@.outbox_subscriptions s WHERE s.id = x.subscription_id)",
    args: &[],
};

pub static SEGMENT_IN_USE: Sql = Sql {
    text: "SELECT EXISTS (SELECT 1 FROM @extschema@.outbox_log WHERE slot = $1) \
               OR EXISTS (SELECT 1 FROM @extschema@.outbox_ledger WHERE slot = $1)",
    args: &[INT2],
};

/// True when nothing in the segment is still needed: everything is older than the retention
/// cut, every subscription has handed out all of it, and no open claim or retry refers to it.
pub static SEGMENT_RETIRABLE: Sql = Sql {
    text: "SELECT NOT EXISTS (SELECT 1 FROM @extschema@.outbox_log l WHERE l.slot = $1 AND l.created_at > $2) \
             AND NOT EXISTS (SELECT 1 FROM @extschema@.outbox_ledger l WHERE l.slot = $1 AND l.at > $2) \
             AND NOT EXISTS (SELECT 1 FROM @extschema@.outbox_log l, @extschema@.outbox_subscriptions s \
                             WHERE l.slot = $1 \
                               AND NOT (l.base <= s.done_seq \
                                        AND pg_catalog.pg_visible_in_snapshot(l.txid, s.done_snapshot)) \
                               AND NOT (l.base + l.n - 1 <= s.window_cursor AND l.base <= s.window_seq \
                                        AND pg_catalog.pg_visible_in_snapshot(l.txid, s.window_snapshot))) \
             AND NOT EXISTS (SELECT 1 FROM @extschema@.outbox_ledger l \
                             JOIN @extschema@.outbox_claims c USING (subscription_id, claim_id) WHERE l.slot = $1) \
             AND NOT EXISTS (SELECT 1 FROM @extschema@.outbox_claims c \
                             JOIN @extschema@.outbox_ledger lc ON lc.slot = c.ledger_slot \
                               AND lc.subscription_id = c.subscription_id AND lc.claim_id = c.claim_id \
                             CROSS JOIN LATERAL pg_catalog.unnest(lc.event_ids) id \
                             JOIN @extschema@.outbox_log l ON l.slot = $1 AND l.base = id - (id - 1) % 4096) \
             AND NOT EXISTS (SELECT 1 FROM @extschema@.outbox_retries r \
                             JOIN @extschema@.outbox_log l ON l.slot = $1 \
                               AND l.base = r.event_id - (r.event_id - 1) % 4096 \
                             WHERE r.payload IS NULL)",
    args: &[INT2, TIME],
};

/// When the segment was last written to: its newest log row (by base: ids are drawn as rows
/// are written) or its subscriptions' newest ledger rows, each found by an index rather than
/// by reading a segment that a long retention makes large.
pub static SEGMENT_LAST_WRITE: Sql = Sql {
    text: "SELECT GREATEST( \
               (SELECT l.created_at FROM @extschema@.outbox_log l WHERE l.slot = $1 ORDER BY l.base DESC LIMIT 1), \
               (SELECT pg_catalog.max(g.at) FROM @extschema@.outbox_subscriptions s, \
                  LATERAL (SELECT g.at FROM @extschema@.outbox_ledger g \
                           WHERE g.slot = $1 AND g.subscription_id = s.id ORDER BY g.at DESC LIMIT 1) g))",
    args: &[INT2],
};

pub static SEGMENT_EVENTS: Sql = Sql {
    text: "SELECT coalesce(sum(n), 0)::bigint FROM @extschema@.outbox_log WHERE slot = $1",
    args: &[INT2],
};

pub static SEGMENT_TABLES: Sql = Sql {
    text: "SELECT pg_catalog.format('%s, %s', l.oid::regclass, g.oid::regclass), l.oid, g.oid \
           FROM pg_catalog.pg_class l, pg_catalog.pg_class g \
           WHERE l.oid = pg_catalog.to_regclass('@extschema@.outbox_log_' || $1) \
             AND g.oid = pg_catalog.to_regclass('@extschema@.outbox_ledger_' || $1)",
    args: &[INT2],
};

pub static ROTATE: Sql = Sql {
    text: "UPDATE @extschema@.outbox_rotation SET current_slot = $1, switched_at = $2",
    args: &[INT2, TIME],
};

/// Folds per-minute counters older than an hour into one row per subscription.
pub static FOLD_STATS: Sql = Sql {
    text: "WITH old AS (DELETE FROM @extschema@.outbox_stats \
                        WHERE bucket < $1 AND bucket > '-infinity' RETURNING *), \
           sums AS (SELECT subscription_id, sum(acked) AS acked, sum(latency_sum) AS latency_sum, \
                           sum(failed) AS failed, sum(dead) AS dead \
                    FROM old GROUP BY subscription_id), \
           buckets AS (SELECT subscription_id, array_agg(v ORDER BY i) AS latency_buckets \
                       FROM (SELECT o.subscription_id, u.i, sum(u.v)::int8 AS v \
                             FROM old o, pg_catalog.unnest(o.latency_buckets) WITH ORDINALITY AS u(v, i) \
                             GROUP BY 1, 2) x \
                       GROUP BY subscription_id) \
           INSERT INTO @extschema@.outbox_stats AS s \
             (subscription_id, bucket, acked, latency_sum, failed, dead, latency_buckets) \
           SELECT sums.subscription_id, '-infinity', sums.acked, sums.latency_sum, sums.failed, sums.dead, \
                  buckets.latency_buckets \
           FROM sums LEFT JOIN buckets USING (subscription_id) \
           ON CONFLICT (subscription_id, bucket) DO UPDATE SET acked = s.acked + EXCLUDED.acked, \
             latency_sum = s.latency_sum + EXCLUDED.latency_sum, failed = s.failed + EXCLUDED.failed, \
             dead = s.dead + EXCLUDED.dead, \
             latency_buckets = ARRAY(SELECT coalesce(a, 0) + coalesce(b, 0) \
                                     FROM ROWS FROM (pg_catalog.unnest(s.latency_buckets), \
                                                     pg_catalog.unnest(EXCLUDED.latency_buckets)) AS t(a, b))",
    args: &[TIME],
};

// ---------------------------------------------------------------------------------------
// delivery worker

/// Subscriptions with a sink, and when their next retry or expiring lease is due.
pub static SINK_SUBSCRIPTIONS: Sql = Sql {
    text: "SELECT s.id, s.name, s.sink, s.options, \
                  LEAST((SELECT min(GREATEST(r.visible_at, coalesce(r.leased_until, r.visible_at))) \
                         FROM @extschema@.outbox_retries r WHERE r.subscription_id = s.id), \
                        (SELECT min(c.expires_at) FROM @extschema@.outbox_claims c WHERE c.subscription_id = s.id)) \
           FROM @extschema@.outbox_subscriptions s WHERE s.sink <> 'pull' ORDER BY s.id",
    args: &[],
};

/// A batch for a sink, each event as the JSON object the sink receives.
pub static WORKER_CLAIM: Sql = Sql {
    text: "SELECT c.id, pg_catalog.jsonb_build_object('id', c.id, 'type', c.type, 'payload', c.payload, \
                  'created_at', c.created_at, 'attempts', c.attempts)::text \
           FROM @extschema@.outbox_claim($1, $2, $3) c",
    args: &[INT4, TEXT, INTERVAL],
};

/// The function of a function sink, `name(jsonb)`, and its owner, who it runs as.
pub static FUNCTION_SINK: Sql = Sql {
    text: "SELECT p.oid, p.proowner, p.proowner::pg_catalog.regrole::text FROM pg_catalog.pg_proc p \
           WHERE p.oid = pg_catalog.to_regprocedure($1 || '(jsonb)') \
             AND p.prokind = 'f' AND NOT p.proretset AND p.pronargs = 1 \
             AND p.proargtypes[0] = 'pg_catalog.jsonb'::pg_catalog.regtype",
    args: &[TEXT],
};

/// The name a subscription has now, if it still exists.
pub static SUBSCRIPTION_NAME: Sql = Sql {
    text: "SELECT s.name FROM @extschema@.outbox_subscriptions s WHERE s.id = $1",
    args: &[INT4],
};

/// The owner a function sink's function had when it was subscribed. (Read from the row as
/// jsonb: a database not yet updated to 0.8.0 has no such column, and no owner recorded.)
pub static SUBSCRIBED_FUNCTION_OWNER: Sql = Sql {
    text: "SELECT pg_catalog.to_jsonb(s) ->> 'function_owner' FROM @extschema@.outbox_subscriptions s WHERE s.id = $1",
    args: &[INT4],
};

/// What was committed before a new subscription was made: where its first window starts.
pub static RECORD_START: Sql = Sql {
    text: "UPDATE @extschema@.outbox_subscriptions SET start_snapshot = done_snapshot, start_seq = done_seq WHERE name = $1",
    args: &[TEXT],
};

/// The roles a new subscription names, by oid: its function's owner and its consumer_role.
pub static RECORD_ROLES: Sql = Sql {
    text: "UPDATE @extschema@.outbox_subscriptions SET function_owner = $2, consumer_role = $3 WHERE name = $1",
    args: &[TEXT, OID, OID],
};

/// (The times are when the answer came, not when the worker's transaction began: a call
/// cancelled at its timeout ended that much later.)
pub static SINK_SUCCEEDED: Sql = Sql {
    text: "INSERT INTO @extschema@.outbox_sink_state (subscription_id, last_success_at) VALUES ($1, pg_catalog.clock_timestamp()) \
           ON CONFLICT (subscription_id) DO UPDATE SET last_success_at = pg_catalog.clock_timestamp(), backing_off_until = NULL",
    args: &[INT4],
};

pub static SINK_FAILED: Sql = Sql {
    text: "INSERT INTO @extschema@.outbox_sink_state (subscription_id, last_error, last_error_at, backing_off_until) \
           VALUES ($1, $2, pg_catalog.clock_timestamp(), $3) \
           ON CONFLICT (subscription_id) DO UPDATE SET last_error = $2, last_error_at = pg_catalog.clock_timestamp(), \
             backing_off_until = $3",
    args: &[INT4, TEXT, TIME],
};

#[cfg(test)]
mod tests {
    use super::*;

    /// The queries that run under the caller's search_path, where an operator or a type written
    /// bare resolves to whatever a schema earlier on the path holds (a domain's CHECK runs for
    /// each value cast to it), and runs as the extension owner.
    #[test]
    fn queries_run_under_the_callers_search_path_qualify_every_operator() {
        for sql in [&CURRENT_SEGMENT, &ATTACHMENT_CONFIG, &DROPPED_TABLE, &TABLES_IN_TREE, &CAPTURE_TRIGGERS, &PARTITIONS_MADE] {
            let mut text = sql.text.replace("@extschema@", "s");
            // what may stand: qualified operators, string literals, casts and parameters
            while let Some(start) = text.find("OPERATOR(pg_catalog.") {
                let end = start + text[start..].find(')').expect("a closed OPERATOR()");
                text.replace_range(start..=end, " ");
            }
            let mut bare = String::new();
            let mut in_literal = false;
            for c in text.chars() {
                if c == '\'' {
                    in_literal = !in_literal;
                } else if !in_literal {
                    bare.push(c);
                }
            }
            for (i, _) in bare.match_indices("::") {
                assert!(bare[i + 2..].starts_with("pg_catalog."), "a type written bare in: {}", sql.text);
            }
            let bare = bare.replace("::", " ");
            assert!(!bare.contains(|c| "=<>+-*/|!~@#%^&?".contains(c)), "an operator written bare in: {}", sql.text);
        }
    }
}
