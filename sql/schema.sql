-- Storage of the outbox. Names are qualified with @extschema@ and operators with
-- OPERATOR(pg_catalog.x): an extension script must not depend on the caller's search_path.
--
-- Layout, in short (docs/design.md has the long form):
--   outbox_log        packed, insert-only event rows; one row per statement and table
--   outbox_ledger     insert-only record of claims and their acks, fails and expiries
--   outbox_claims     the open claims (small, mutable)
--   outbox_retries    per-event state for the few events that need more than one delivery
--   outbox_dead_letters, outbox_subscriptions, outbox_attachments, outbox_stats
-- The log and the ledger are split into segments that retention empties with TRUNCATE, so
-- a long transaction elsewhere never leaves dead tuples behind in them.

CREATE TABLE @extschema@.outbox_subscriptions (
    id integer GENERATED ALWAYS AS IDENTITY PRIMARY KEY,
    name text NOT NULL UNIQUE,
    sink text NOT NULL DEFAULT 'pull',
    options jsonb NOT NULL DEFAULT '{}'::jsonb,
    created_at timestamptz NOT NULL DEFAULT pg_catalog.now(),
    -- Everything with base <= done_seq whose transaction is visible in done_snapshot has
    -- been handed out. The current window holds what became visible up to window_snapshot;
    -- its events up to window_cursor have been handed out too.
    done_snapshot pg_catalog.pg_snapshot NOT NULL,
    done_seq bigint NOT NULL,
    window_snapshot pg_catalog.pg_snapshot NOT NULL,
    window_seq bigint NOT NULL,
    window_cursor bigint NOT NULL DEFAULT 0,
    -- Rows of transactions still running at done_snapshot have bases above straddle_floor.
    -- floor_mark_bases and floor_mark_xids are the marks it moves up by (see StraddleFloor).
    straddle_floor bigint NOT NULL DEFAULT -4095,
    floor_mark_bases bigint[] NOT NULL DEFAULT '{}',
    floor_mark_xids bigint[] NOT NULL DEFAULT '{}',
    -- The owner a function sink's function had when it was subscribed (the subscriber had to
    -- have its privileges); the worker calls the function only while it still has this owner.
    function_owner pg_catalog.regrole,
    -- The role options' consumer_role named when the subscription was made, by oid: a role
    -- made again under the name later is another role.
    consumer_role pg_catalog.regrole,
    -- What was committed before the subscription was made (base <= start_seq, visible in
    -- start_snapshot) was never its to hand out, and a replay must not hand it out either.
    -- A from_start subscription starts at the bottom.
    start_snapshot pg_catalog.pg_snapshot NOT NULL DEFAULT '1:1:',
    start_seq bigint NOT NULL DEFAULT -4095
);

CREATE TABLE @extschema@.outbox_attachments (
    source regclass PRIMARY KEY,
    key_columns text[] NOT NULL,
    payload_columns text[],
    watch_columns text[],
    event_prefix text NOT NULL,
    generation bigint NOT NULL,
    attached_at timestamptz NOT NULL DEFAULT pg_catalog.now()
);

CREATE SEQUENCE @extschema@.outbox_attachment_generation;

-- pg_dump keeps which tables are attached (their capture triggers are dumped with them and
-- name their attachment's generation). Delivery state is not dumped: its snapshots name
-- transaction ids of the cluster that took them.
SELECT pg_catalog.pg_extension_config_dump('@extschema@.outbox_attachments', '');
SELECT pg_catalog.pg_extension_config_dump('@extschema@.outbox_attachment_generation', '');

-- Steps by 4096, the most events one log row holds: event id = base + ordinal - 1.
CREATE SEQUENCE @extschema@.outbox_event_id_seq AS bigint INCREMENT BY 4096 START WITH 1;

-- Which segment new log and ledger rows go to.
CREATE TABLE @extschema@.outbox_rotation (
    singleton boolean PRIMARY KEY DEFAULT true CHECK (singleton),
    current_slot smallint NOT NULL CHECK (current_slot OPERATOR(pg_catalog.>=) 0 AND current_slot OPERATOR(pg_catalog.<) 8),
    switched_at timestamptz NOT NULL
);
INSERT INTO @extschema@.outbox_rotation (current_slot, switched_at) VALUES (0, pg_catalog.now());

-- Capture and retention read the one row: without it every write to an attached table
-- failed, and the worker restarted every second. DELETE and TRUNCATE of it are refused
-- (DROP EXTENSION takes the table whole).
CREATE FUNCTION @extschema@.outbox_keep_rotation() RETURNS trigger
LANGUAGE plpgsql SET search_path = pg_catalog, pg_temp AS $$
BEGIN
    RAISE EXCEPTION 'outbox: outbox_rotation keeps its one row, which names the log segment new events go to'
        USING ERRCODE = 'restrict_violation';
END
$$;
CREATE TRIGGER outbox_keep_rotation BEFORE DELETE OR TRUNCATE ON @extschema@.outbox_rotation
    FOR EACH STATEMENT EXECUTE FUNCTION @extschema@.outbox_keep_rotation();

CREATE TABLE @extschema@.outbox_log (
    slot smallint NOT NULL,
    base bigint NOT NULL DEFAULT pg_catalog.nextval('@extschema@.outbox_event_id_seq'::pg_catalog.regclass),
    n integer NOT NULL,
    txid pg_catalog.xid8 NOT NULL DEFAULT pg_catalog.pg_current_xact_id(),
    created_at timestamptz NOT NULL DEFAULT pg_catalog.clock_timestamp(),
    source regclass NOT NULL,
    source_name text NOT NULL,
    op "char" NOT NULL,
    type text NOT NULL,
    -- JSON arrays, one element per event, kept as text: the capture trigger writes valid JSON,
    -- and parsing a thousand keys into jsonb would cost more than the rest of a bulk insert
    keys text NOT NULL,
    data text,
    key_hashes bigint[] NOT NULL,
    table_hash bigint NOT NULL
) PARTITION BY LIST (slot);
-- The only index: straddlers are found by base too (see outbox_subscriptions.straddle_floor).
CREATE INDEX outbox_log_base ON @extschema@.outbox_log (base);

CREATE TABLE @extschema@.outbox_ledger (
    slot smallint NOT NULL,
    subscription_id integer NOT NULL,
    claim_id bigint,
    -- c: claimed from the window, a: acked, f: failed, x: lease expired
    kind "char" NOT NULL,
    at timestamptz NOT NULL,
    event_ids bigint[] NOT NULL,
    -- only on claim rows: what per-key exclusivity and latency need of each event
    key_hashes bigint[],
    table_hashes bigint[],
    created_ats timestamptz[]
) PARTITION BY LIST (slot);
CREATE INDEX outbox_ledger_claim ON @extschema@.outbox_ledger (subscription_id, claim_id);
CREATE INDEX outbox_ledger_at ON @extschema@.outbox_ledger (subscription_id, at);

-- Eight segments: with a rotation every retention/4, about six hold events at a time.
DO $$
BEGIN
    FOR slot IN 0..7 LOOP
        EXECUTE pg_catalog.format(
            'CREATE TABLE @extschema@.%I PARTITION OF @extschema@.outbox_log FOR VALUES IN (%s)',
            'outbox_log_' OPERATOR(pg_catalog.||) slot, slot);
        EXECUTE pg_catalog.format(
            'CREATE TABLE @extschema@.%I PARTITION OF @extschema@.outbox_ledger FOR VALUES IN (%s)',
            'outbox_ledger_' OPERATOR(pg_catalog.||) slot, slot);
    END LOOP;
END
$$;

-- Key hashes are random and do not compress: store them uncompressed rather than let pglz
-- try on every row. Where lz4 is available (PostgreSQL 14 and later, built --with-lz4), the
-- compressible arrays and key lists use it: pglz was the largest single cost of a claim.
ALTER TABLE @extschema@.outbox_log ALTER COLUMN key_hashes SET STORAGE EXTERNAL;
ALTER TABLE @extschema@.outbox_ledger ALTER COLUMN key_hashes SET STORAGE EXTERNAL;
DO $$
DECLARE
    slot integer;
BEGIN
    IF 'lz4' OPERATOR(pg_catalog.=) ANY (
        SELECT pg_catalog.unnest(enumvals) FROM pg_catalog.pg_settings WHERE name OPERATOR(pg_catalog.=) 'default_toast_compression')
    THEN
        -- SET COMPRESSION does not recurse to partitions
        FOR slot IN 0..7 LOOP
            EXECUTE pg_catalog.format(
                'ALTER TABLE @extschema@.%I ALTER COLUMN keys SET COMPRESSION lz4, ALTER COLUMN data SET COMPRESSION lz4',
                'outbox_log_' OPERATOR(pg_catalog.||) slot);
            EXECUTE pg_catalog.format(
                'ALTER TABLE @extschema@.%I ALTER COLUMN event_ids SET COMPRESSION lz4, '
                'ALTER COLUMN table_hashes SET COMPRESSION lz4, ALTER COLUMN created_ats SET COMPRESSION lz4',
                'outbox_ledger_' OPERATOR(pg_catalog.||) slot);
        END LOOP;
    END IF;
END
$$;

CREATE SEQUENCE @extschema@.outbox_claim_id_seq AS bigint;

CREATE TABLE @extschema@.outbox_claims (
    subscription_id integer NOT NULL,
    claim_id bigint NOT NULL,
    ledger_slot smallint NOT NULL,
    expires_at timestamptz NOT NULL,
    event_count integer NOT NULL,
    open_count integer NOT NULL,
    oldest_created_at timestamptz NOT NULL,
    PRIMARY KEY (subscription_id, claim_id)
);

CREATE TABLE @extschema@.outbox_retries (
    subscription_id integer NOT NULL,
    event_id bigint NOT NULL,
    key_hash bigint NOT NULL,
    table_hash bigint NOT NULL,
    attempts integer NOT NULL,
    visible_at timestamptz NOT NULL,
    -- set while handed out; an expired lease leaves it in the past, so a late ack still counts
    leased_until timestamptz,
    last_error text,
    created_at timestamptz NOT NULL,
    -- a copy of the event, for events requeued from the dead letters whose segment may be gone
    type text,
    payload jsonb,
    PRIMARY KEY (subscription_id, event_id)
);
CREATE INDEX outbox_retries_key ON @extschema@.outbox_retries (subscription_id, key_hash, event_id);
CREATE INDEX outbox_retries_table ON @extschema@.outbox_retries (subscription_id, table_hash, event_id);
-- when each retry is due: claims look here before reading the retries in id order
CREATE INDEX outbox_retries_due ON @extschema@.outbox_retries
    (subscription_id, (GREATEST(visible_at, coalesce(leased_until, visible_at))));

CREATE TABLE @extschema@.outbox_dead_letters (
    subscription text NOT NULL,
    event_id bigint NOT NULL,
    type text NOT NULL,
    payload jsonb NOT NULL,
    attempts integer NOT NULL,
    last_error text,
    failed_at timestamptz NOT NULL,
    created_at timestamptz NOT NULL,
    key_hash bigint NOT NULL,
    table_hash bigint NOT NULL,
    PRIMARY KEY (subscription, event_id)
);

-- Per-minute delivery counters; outbox_purge folds buckets older than an hour into one, so
-- the totals survive restarts and retention. latency_buckets counts acked events per bucket
-- of the propagation latency histogram (src/metrics.rs has the bounds).
CREATE TABLE @extschema@.outbox_stats (
    subscription_id integer NOT NULL,
    bucket timestamptz NOT NULL,
    acked bigint NOT NULL DEFAULT 0,
    latency_sum double precision NOT NULL DEFAULT 0,
    failed bigint NOT NULL DEFAULT 0,
    dead bigint NOT NULL DEFAULT 0,
    latency_buckets bigint[],
    PRIMARY KEY (subscription_id, bucket)
);

-- What the delivery worker last saw of each sink, written when it changes (outbox_backlog).
CREATE TABLE @extschema@.outbox_sink_state (
    subscription_id integer PRIMARY KEY,
    last_success_at timestamptz,
    last_error text,
    last_error_at timestamptz,
    backing_off_until timestamptz
);
