-- 0.9.0 to 0.9.1.
--
-- outbox_backlog counts the part of the log past each subscription's last handed-out id in
-- one pass for every subscription, where it read every pending log row once per
-- subscription and checked each row's transaction against two snapshots: with 200,000
-- events pending in three subscriptions it took about 200 ms, and outbox_metrics() with it
-- (docs/benchmarks.md). Same columns. As in sql/api.sql:
CREATE OR REPLACE VIEW @extschema@.outbox_backlog AS
WITH reach AS MATERIALIZED (
    -- Past the last id a subscription handed out (its window cursor, or the end of its done
    -- part), every event in the log is waiting: no transaction there needs checking against
    -- its snapshots. That part, most of a large backlog, is counted in one pass over the log
    -- for every subscription at once, by how many subscriptions' reach each row is past.
    SELECT s.id, GREATEST(s.window_cursor, s.done_seq, s.straddle_floor) AS handed_to,
           -- older transactions are visible in the snapshot: a comparison, where checking
           -- the snapshot took a call (and a copy of the snapshot) a row
           pg_catalog.pg_snapshot_xmin(s.window_snapshot) AS window_xmin,
           pg_catalog.pg_snapshot_xmin(s.done_snapshot) AS done_xmin
    FROM @extschema@.outbox_subscriptions s
), reaches AS MATERIALIZED (
    SELECT pg_catalog.array_agg(r.handed_to ORDER BY r.handed_to) AS bounds FROM reach r
), beyond AS MATERIALIZED (
    SELECT pg_catalog.width_bucket(l.base OPERATOR(pg_catalog.-) 1, a.bounds) AS past,
           pg_catalog.sum(l.n) AS waiting,
           pg_catalog.min(l.created_at) AS oldest
    FROM reaches a
    JOIN @extschema@.outbox_log l ON l.base OPERATOR(pg_catalog.>) a.bounds[1]
    GROUP BY 1
)
SELECT s.name AS subscription,
       w.waiting OPERATOR(pg_catalog.+) f.waiting OPERATOR(pg_catalog.+) r.pending AS pending,
       c.in_flight OPERATOR(pg_catalog.+) r.in_flight AS in_flight,
       c.expired OPERATOR(pg_catalog.+) r.retrying AS retrying,
       d.dead,
       pg_catalog.now() OPERATOR(pg_catalog.-) LEAST(w.oldest, f.oldest, r.oldest, c.oldest) AS oldest_pending_age,
       lat.latency AS avg_propagation_latency,
       p.p99 AS p99_propagation_latency,
       s.sink,
       k.last_success_at,
       k.last_error,
       k.last_error_at,
       coalesce(k.backing_off_until OPERATOR(pg_catalog.>) pg_catalog.now(), false) AS backing_off,
       k.backing_off_until
FROM @extschema@.outbox_subscriptions s
JOIN reach h ON h.id OPERATOR(pg_catalog.=) s.id
LEFT JOIN @extschema@.outbox_sink_state k ON k.subscription_id OPERATOR(pg_catalog.=) s.id
CROSS JOIN LATERAL (
    SELECT coalesce(pg_catalog.sum(b.waiting), 0)::bigint AS waiting, pg_catalog.min(b.oldest) AS oldest
    FROM beyond b, reaches a
    WHERE b.past OPERATOR(pg_catalog.>=) pg_catalog.width_bucket(h.handed_to, a.bounds)
) f
CROSS JOIN LATERAL (
    -- up to its reach: what is left of the window, and the stragglers
    SELECT coalesce(pg_catalog.sum(x.waiting), 0)::bigint AS waiting,
           pg_catalog.min(x.created_at) FILTER (WHERE x.waiting OPERATOR(pg_catalog.>) 0) AS oldest
    FROM (
        SELECT l.created_at,
               CASE WHEN l.base OPERATOR(pg_catalog.<=) s.window_seq
                         AND (l.txid OPERATOR(pg_catalog.<) h.window_xmin
                              OR pg_catalog.pg_visible_in_snapshot(l.txid, s.window_snapshot))
                    THEN GREATEST(0, LEAST(l.n::bigint,
                         l.base OPERATOR(pg_catalog.+) l.n OPERATOR(pg_catalog.-) 1 OPERATOR(pg_catalog.-) s.window_cursor))
                    ELSE l.n::bigint
               END AS waiting
        FROM @extschema@.outbox_log l
        WHERE l.base OPERATOR(pg_catalog.>) s.straddle_floor
          AND l.base OPERATOR(pg_catalog.<=) h.handed_to
          -- (handed out in this window: nothing waits)
          AND NOT (l.txid OPERATOR(pg_catalog.<) h.window_xmin AND l.base OPERATOR(pg_catalog.<=) s.window_seq
                   AND l.base OPERATOR(pg_catalog.+) l.n OPERATOR(pg_catalog.-) 1 OPERATOR(pg_catalog.<=) s.window_cursor)
          AND (l.base OPERATOR(pg_catalog.>) s.done_seq
               OR (l.txid OPERATOR(pg_catalog.>=) h.done_xmin
                   AND NOT pg_catalog.pg_visible_in_snapshot(l.txid, s.done_snapshot)))
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

-- A partition dropped by DROP SCHEMA … CASCADE or DROP OWNED is captured as DROP TABLE of it
-- is: a DELETE for each of its rows, read before the drop. As in sql/ddl.sql:
DROP EVENT TRIGGER outbox_capture_dropped_partitions;
CREATE EVENT TRIGGER outbox_capture_dropped_partitions ON ddl_command_start WHEN TAG IN ('DROP TABLE', 'DROP SCHEMA', 'DROP OWNED')
    EXECUTE FUNCTION @extschema@.outbox_capture_partition_changes();

-- outbox_rotation keeps its one row, and its slot names one of the eight segments: a row
-- deleted by hand failed every write to an attached table. As in sql/schema.sql:
ALTER TABLE @extschema@.outbox_rotation ADD CONSTRAINT outbox_rotation_current_slot_check
    CHECK (current_slot OPERATOR(pg_catalog.>=) 0 AND current_slot OPERATOR(pg_catalog.<) 8);
CREATE FUNCTION @extschema@.outbox_keep_rotation() RETURNS trigger
LANGUAGE plpgsql SET search_path = pg_catalog, pg_temp AS $$
BEGIN
    RAISE EXCEPTION 'outbox: outbox_rotation keeps its one row, which names the log segment new events go to'
        USING ERRCODE = 'restrict_violation';
END
$$;
REVOKE ALL ON FUNCTION @extschema@.outbox_keep_rotation() FROM PUBLIC;
CREATE TRIGGER outbox_keep_rotation BEFORE DELETE OR TRUNCATE ON @extschema@.outbox_rotation
    FOR EACH STATEMENT EXECUTE FUNCTION @extschema@.outbox_keep_rotation();
