-- 0.6.0 to 0.7.0.
--
-- pg_dump keeps which tables are attached, as in sql/schema.sql:
SELECT pg_catalog.pg_extension_config_dump('@extschema@.outbox_attachments', '');
SELECT pg_catalog.pg_extension_config_dump('@extschema@.outbox_attachment_generation', '');

-- The DDL guard lets a restored table's ALTER TABLEs through before its capture triggers are
-- made, a table detached from its parent goes back to a plain table's triggers, and the
-- partitions and children of the tables a command names are checked too, as DDL through a
-- parent reaches them unreported. As in sql/ddl.sql:
CREATE OR REPLACE FUNCTION @extschema@.outbox_check_altered_tables() RETURNS event_trigger
LANGUAGE plpgsql SECURITY DEFINER SET search_path = pg_catalog, pg_temp AS $$
DECLARE
    attachment record;
    missing text;
BEGIN
    -- A table captured through transition tables that has just become a partition would miss
    -- the rows routed to it through its parent: it switches to the row triggers of a partition.
    -- A plain table that has just stopped being one switches back (the guard below expects a
    -- plain table's triggers, and refused every ALTER TABLE of it).
    PERFORM @extschema@.outbox_attach(t.source, t.payload_columns, t.watch_columns, t.event_prefix, t.key_columns)
    FROM @extschema@.outbox_attachments t
    JOIN pg_catalog.pg_class c ON c.oid OPERATOR(pg_catalog.=) t.source::pg_catalog.oid
    WHERE (c.relispartition
           AND EXISTS (SELECT FROM pg_catalog.pg_trigger g
                       WHERE g.tgrelid OPERATOR(pg_catalog.=) c.oid AND g.tgname OPERATOR(pg_catalog.=) 'outbox_capture_inserts'))
       OR (NOT c.relispartition AND c.relkind OPERATOR(pg_catalog.=) 'r'
           AND EXISTS (SELECT FROM pg_catalog.pg_trigger g
                       WHERE g.tgrelid OPERATOR(pg_catalog.=) c.oid AND g.tgname OPERATOR(pg_catalog.=) 'outbox_capture_rows'
                         AND g.tgparentid OPERATOR(pg_catalog.=) 0));
    -- The tables the command names and their partitions and children: a column renamed or
    -- dropped through a parent reaches them unreported.
    FOR attachment IN
        WITH RECURSIVE touched AS (
            SELECT c.objid AS relid FROM pg_catalog.pg_event_trigger_ddl_commands() c
            WHERE c.classid OPERATOR(pg_catalog.=) 'pg_catalog.pg_class'::pg_catalog.regclass
            UNION
            SELECT i.inhrelid FROM pg_catalog.pg_inherits i
            JOIN touched ON i.inhparent OPERATOR(pg_catalog.=) touched.relid)
        SELECT DISTINCT t.source, t.key_columns, t.payload_columns, t.watch_columns
        FROM touched
        JOIN @extschema@.outbox_attachments t ON t.source::pg_catalog.oid OPERATOR(pg_catalog.=) touched.relid
    LOOP
        SELECT pg_catalog.string_agg(DISTINCT pg_catalog.quote_ident(n), ', ') INTO missing
        FROM pg_catalog.unnest(attachment.key_columns
                               OPERATOR(pg_catalog.||) coalesce(attachment.payload_columns, '{}')
                               OPERATOR(pg_catalog.||) coalesce(attachment.watch_columns, '{}')) AS n
        WHERE NOT EXISTS (SELECT FROM pg_catalog.pg_attribute a
                          WHERE a.attrelid OPERATOR(pg_catalog.=) attachment.source
                            AND a.attname OPERATOR(pg_catalog.=) n
                            AND a.attnum OPERATOR(pg_catalog.>) 0 AND NOT a.attisdropped);
        -- (none at all is a table being restored: pg_restore makes triggers after ALTER TABLEs)
        IF missing IS NULL AND (SELECT pg_catalog.count(*) FROM pg_catalog.pg_trigger g
                                WHERE g.tgrelid OPERATOR(pg_catalog.=) attachment.source
                                  AND g.tgname OPERATOR(pg_catalog.=) ANY (ARRAY['outbox_capture_inserts', 'outbox_capture_deletes',
                                                    'outbox_capture_updates', 'outbox_capture_statement',
                                                    'outbox_capture_truncate', 'outbox_capture_rows']))
                               OPERATOR(pg_catalog.<>) ALL (ARRAY[0, (SELECT CASE WHEN c.relkind OPERATOR(pg_catalog.=) 'p' OR c.relispartition
                                                                    THEN 4 ELSE 5 END
                                                        FROM pg_catalog.pg_class c
                                                        WHERE c.oid OPERATOR(pg_catalog.=) attachment.source)]) THEN
            RAISE EXCEPTION 'outbox: this change to table % would drop its capture triggers', attachment.source
                USING ERRCODE = 'dependent_objects_still_exist',
                      HINT = 'Change the attachment in the same transaction first: outbox_attach() with watch_columns '
                             'that leave out the column, or outbox_detach().';
        END IF;
        IF missing IS NOT NULL THEN
            RAISE EXCEPTION 'outbox: table % is captured with column(s) % by name', attachment.source, missing
                USING ERRCODE = 'dependent_objects_still_exist',
                      HINT = 'Change the attachment in the same transaction first: outbox_attach() without those '
                             'columns, then the ALTER TABLE, then outbox_attach() with the new ones.';
        END IF;
    END LOOP;
END
$$;

-- An ack from outside an event's newer hand-out (a consumer whose lease had expired) marks
-- the retry row processed (visible_at infinity) and leaves it holding its row back until the
-- hand-out ends; the backlog counts such a row only while its lease runs, not as retrying
-- afterwards. As in sql/api.sql:
-- One row per subscription. pending: not yet handed out (or waiting behind its row);
-- in_flight: leased; retrying: failed or expired, waiting for their next attempt. For sink
-- subscriptions, what the delivery worker last saw of the sink.
CREATE OR REPLACE VIEW @extschema@.outbox_backlog AS
SELECT s.name AS subscription,
       w.waiting OPERATOR(pg_catalog.+) r.pending AS pending,
       c.in_flight OPERATOR(pg_catalog.+) r.in_flight AS in_flight,
       c.expired OPERATOR(pg_catalog.+) r.retrying AS retrying,
       d.dead,
       pg_catalog.now() OPERATOR(pg_catalog.-) LEAST(w.oldest, r.oldest, c.oldest) AS oldest_pending_age,
       lat.latency AS avg_propagation_latency,
       p.p99 AS p99_propagation_latency,
       s.sink,
       k.last_success_at,
       k.last_error,
       k.last_error_at,
       coalesce(k.backing_off_until OPERATOR(pg_catalog.>) pg_catalog.now(), false) AS backing_off,
       k.backing_off_until
FROM @extschema@.outbox_subscriptions s
LEFT JOIN @extschema@.outbox_sink_state k ON k.subscription_id OPERATOR(pg_catalog.=) s.id
CROSS JOIN LATERAL (
    SELECT coalesce(pg_catalog.sum(x.waiting), 0)::bigint AS waiting,
           pg_catalog.min(x.created_at) FILTER (WHERE x.waiting OPERATOR(pg_catalog.>) 0) AS oldest
    FROM (
        SELECT l.created_at,
               CASE WHEN pg_catalog.pg_visible_in_snapshot(l.txid, s.window_snapshot)
                         AND l.base OPERATOR(pg_catalog.<=) s.window_seq
                    THEN GREATEST(0, LEAST(l.n::bigint,
                         l.base OPERATOR(pg_catalog.+) l.n OPERATOR(pg_catalog.-) 1 OPERATOR(pg_catalog.-) s.window_cursor))
                    ELSE l.n::bigint
               END AS waiting
        FROM @extschema@.outbox_log l
        WHERE l.base OPERATOR(pg_catalog.>) s.straddle_floor
          AND (l.base OPERATOR(pg_catalog.>) s.done_seq
               OR NOT pg_catalog.pg_visible_in_snapshot(l.txid, s.done_snapshot))
    ) x
) w
CROSS JOIN LATERAL (
    SELECT pg_catalog.count(*) FILTER (WHERE q.attempts OPERATOR(pg_catalog.=) 0 AND NOT q.leased) AS pending,
           pg_catalog.count(*) FILTER (WHERE q.leased) AS in_flight,
           pg_catalog.count(*) FILTER (WHERE q.attempts OPERATOR(pg_catalog.>) 0 AND NOT q.leased) AS retrying,
           pg_catalog.min(q.created_at) AS oldest
    FROM (SELECT rr.attempts, rr.created_at,
                 coalesce(rr.leased_until OPERATOR(pg_catalog.>) pg_catalog.now(), false) AS leased
          FROM @extschema@.outbox_retries rr
          WHERE rr.subscription_id OPERATOR(pg_catalog.=) s.id
            -- the hand-out of an event acked from outside it counts while its lease runs
            AND (rr.visible_at OPERATOR(pg_catalog.<>) 'infinity'::pg_catalog.timestamptz
                 OR rr.leased_until IS NULL OR rr.leased_until OPERATOR(pg_catalog.>) pg_catalog.now())) q
) r
CROSS JOIN LATERAL (
    SELECT coalesce(pg_catalog.sum(cl.open_count)
                    FILTER (WHERE cl.expires_at OPERATOR(pg_catalog.>) pg_catalog.now()), 0)::bigint AS in_flight,
           coalesce(pg_catalog.sum(cl.open_count)
                    FILTER (WHERE cl.expires_at OPERATOR(pg_catalog.<=) pg_catalog.now()), 0)::bigint AS expired,
           pg_catalog.min(cl.oldest_created_at) AS oldest
    FROM @extschema@.outbox_claims cl
    WHERE cl.subscription_id OPERATOR(pg_catalog.=) s.id
) c
CROSS JOIN LATERAL (
    SELECT pg_catalog.count(*) AS dead
    FROM @extschema@.outbox_dead_letters dl
    WHERE dl.subscription OPERATOR(pg_catalog.=) s.name
) d
CROSS JOIN LATERAL (
    -- the current minute and the four before it
    SELECT pg_catalog.make_interval(secs => pg_catalog.sum(st.latency_sum)
               OPERATOR(pg_catalog./) NULLIF(pg_catalog.sum(st.acked), 0)::double precision) AS latency
    FROM @extschema@.outbox_stats st
    WHERE st.subscription_id OPERATOR(pg_catalog.=) s.id
      AND st.bucket OPERATOR(pg_catalog.>=)
          (pg_catalog.date_trunc('minute', pg_catalog.now()) OPERATOR(pg_catalog.-) '4 minutes'::interval)
) lat
LEFT JOIN LATERAL (
    -- Over the same minutes, interpolated inside the histogram bucket that holds it, as
    -- Prometheus' histogram_quantile does. The bounds are metrics::LATENCY_BUCKETS; a test
    -- checks the two agree. Past the last bound it reports the last bound.
    -- (OPERATOR() forms all share one precedence: the parentheses are load-bearing)
    SELECT pg_catalog.make_interval(secs =>
               coalesce(b.bounds[h.i OPERATOR(pg_catalog.-) 1], 0) OPERATOR(pg_catalog.+)
               ((coalesce(b.bounds[h.i], b.bounds[h.i OPERATOR(pg_catalog.-) 1])
                 OPERATOR(pg_catalog.-) coalesce(b.bounds[h.i OPERATOR(pg_catalog.-) 1], 0))
                OPERATOR(pg_catalog.*)
                (((0.99::float8 OPERATOR(pg_catalog.*) h.total) OPERATOR(pg_catalog.-) (h.upto OPERATOR(pg_catalog.-) h.n))
                 OPERATOR(pg_catalog./) h.n))) AS p99
    FROM (SELECT x.i, x.n::float8 AS n,
                 (pg_catalog.sum(x.n) OVER (ORDER BY x.i))::float8 AS upto,
                 (pg_catalog.sum(x.n) OVER ())::float8 AS total
          FROM (SELECT u.i, pg_catalog.sum(u.n) AS n
                FROM @extschema@.outbox_stats st,
                     pg_catalog.unnest(st.latency_buckets) WITH ORDINALITY AS u(n, i)
                WHERE st.subscription_id OPERATOR(pg_catalog.=) s.id
                  AND st.bucket OPERATOR(pg_catalog.>=)
                      (pg_catalog.date_trunc('minute', pg_catalog.now()) OPERATOR(pg_catalog.-) '4 minutes'::interval)
                GROUP BY u.i) x) h,
         (SELECT '{0.005,0.01,0.025,0.05,0.1,0.25,0.5,1,2.5,5,10,30,60,300}'::float8[] AS bounds) b
    WHERE h.n OPERATOR(pg_catalog.>) 0
      AND h.upto OPERATOR(pg_catalog.>=) (0.99::float8 OPERATOR(pg_catalog.*) h.total)
    ORDER BY h.i
    LIMIT 1
) p ON true;
