-- 0.6.0 to 0.7.0.
--
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
