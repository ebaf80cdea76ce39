-- The SQL half of the API: the default subscription, event expansion, outbox_claim and the
-- views. Operators are qualified here; function bodies with a pinned search_path need not.

INSERT INTO @extschema@.outbox_subscriptions (name, done_snapshot, done_seq, window_snapshot, window_seq)
SELECT 'default', pg_catalog.pg_current_snapshot(), b.base, pg_catalog.pg_current_snapshot(), b.base
FROM (SELECT coalesce(pg_catalog.pg_sequence_last_value('@extschema@.outbox_event_id_seq'::pg_catalog.regclass),
                      1 OPERATOR(pg_catalog.-) 4096) AS base) b;  -- as last_base! in src/queries.rs says

-- The events of one log row. The payload is put together as text and parsed once:
-- {"table": ..., "key": {...}, "data": {...}}, with no key for a TRUNCATE and no data unless
-- payload columns were captured. Inlined by the planner into the queries that use it.
CREATE FUNCTION @extschema@.outbox_log_events(l @extschema@.outbox_log)
RETURNS TABLE(id bigint, type text, payload jsonb, created_at timestamptz)
LANGUAGE sql STABLE PARALLEL SAFE AS $$
    SELECT l.base OPERATOR(pg_catalog.+) e.ord OPERATOR(pg_catalog.-) 1,
           l.type,
           (CASE
                WHEN pg_catalog.json_typeof(e.key) OPERATOR(pg_catalog.=) 'null'
                    THEN '{"table":' OPERATOR(pg_catalog.||) pg_catalog.to_json(l.source_name)::text
                         OPERATOR(pg_catalog.||) '}'
                WHEN e.data IS NULL
                    THEN '{"table":' OPERATOR(pg_catalog.||) pg_catalog.to_json(l.source_name)::text
                         OPERATOR(pg_catalog.||) ',"key":' OPERATOR(pg_catalog.||) e.key::text OPERATOR(pg_catalog.||) '}'
                ELSE '{"table":' OPERATOR(pg_catalog.||) pg_catalog.to_json(l.source_name)::text
                     OPERATOR(pg_catalog.||) ',"key":' OPERATOR(pg_catalog.||) e.key::text
                     OPERATOR(pg_catalog.||) ',"data":' OPERATOR(pg_catalog.||) e.data::text OPERATOR(pg_catalog.||) '}'
            END)::pg_catalog.jsonb,
           l.created_at
    FROM ROWS FROM (pg_catalog.json_array_elements(l.keys::pg_catalog.json),
                    pg_catalog.json_array_elements(l.data::pg_catalog.json)) WITH ORDINALITY AS e(key, data, ord)
$$;

-- Every retained event, one row each.
CREATE VIEW @extschema@.outbox_events AS
SELECT e.id, e.type, e.payload, e.created_at, l.source, l.txid
FROM @extschema@.outbox_log l
CROSS JOIN LATERAL @extschema@.outbox_log_events(l) e;

-- The events with these ids, reading only the log rows that hold them, each found by its base
-- through the index. A SQL function's query is planned without its argument's value, and a
-- range condition (consecutive bases as one range) left that plan guessing: it read every
-- log row, up to 25 ms a call with 2,000 of them. An equality on the bases is an index lookup
-- whatever the plan. jit off: the estimates can still be large enough to JIT-compile a query
-- of a few milliseconds for most of a second.
CREATE FUNCTION @extschema@.outbox_events_for(ids bigint[])
RETURNS TABLE(id bigint, type text, payload jsonb, created_at timestamptz)
LANGUAGE sql STABLE SET jit = off AS $$
    SELECT e.id, e.type, e.payload, e.created_at
    FROM @extschema@.outbox_log l
    CROSS JOIN LATERAL @extschema@.outbox_log_events(l) e
    JOIN pg_catalog.unnest(ids) AS wanted(id) ON wanted.id OPERATOR(pg_catalog.=) e.id
    WHERE l.base OPERATOR(pg_catalog.=) ANY (ARRAY(
              SELECT DISTINCT i OPERATOR(pg_catalog.-) ((i OPERATOR(pg_catalog.-) 1) OPERATOR(pg_catalog.%) 4096)
              FROM pg_catalog.unnest(ids) AS i))
$$;

-- In C (src/api.rs): it hands its rows over in one go, oldest first, with the payloads
-- rendered from the log rows the claim reads and parsed into jsonb.
CREATE FUNCTION @extschema@.outbox_claim(
    batch_size integer DEFAULT 100,
    subscription text DEFAULT 'default',
    lease interval DEFAULT '30 seconds')
RETURNS TABLE(id bigint, type text, payload jsonb, created_at timestamptz, attempts integer)
LANGUAGE c VOLATILE SECURITY DEFINER
-- a claim is a few milliseconds of work: starting parallel workers for it costs more
SET search_path = pg_catalog, pg_temp SET max_parallel_workers_per_gather = 0
AS 'MODULE_PATHNAME', 'outbox_claim';

-- One row per subscription. pending: not yet handed out (or waiting behind its row);
-- in_flight: leased; retrying: failed or expired, waiting for their next attempt. For sink
-- subscriptions, what the delivery worker last saw of the sink.
CREATE VIEW @extschema@.outbox_backlog AS
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

-- When each acked event was processed, per subscription, while its ledger segment is retained.
CREATE VIEW @extschema@.outbox_processed AS
SELECT s.name AS subscription, e.id AS event_id, l.at AS processed_at
FROM @extschema@.outbox_ledger l
JOIN @extschema@.outbox_subscriptions s ON s.id OPERATOR(pg_catalog.=) l.subscription_id
CROSS JOIN LATERAL pg_catalog.unnest(l.event_ids) AS e(id)
WHERE l.kind OPERATOR(pg_catalog.=) 'a';
