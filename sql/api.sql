-- The SQL half of the API: the default subscription, event expansion, outbox_claim and the
-- views. Operators are qualified here; function bodies with a pinned search_path need not.

INSERT INTO @extschema@.outbox_subscriptions (name, done_snapshot, done_seq, window_snapshot, window_seq)
SELECT 'default', pg_catalog.pg_current_snapshot(), s.last_value, pg_catalog.pg_current_snapshot(), s.last_value
FROM @extschema@.outbox_event_id_seq s;

-- {"table": ..., "key": {...}, "data": {...}}; no key for a TRUNCATE, no data unless captured.
CREATE FUNCTION @extschema@.outbox_payload(source_name text, key jsonb, data jsonb) RETURNS jsonb
LANGUAGE sql IMMUTABLE PARALLEL SAFE AS $$
    SELECT CASE
        WHEN pg_catalog.jsonb_typeof(key) OPERATOR(pg_catalog.=) 'null'
            THEN pg_catalog.jsonb_build_object('table', source_name)
        WHEN data IS NULL THEN pg_catalog.jsonb_build_object('table', source_name, 'key', key)
        ELSE pg_catalog.jsonb_build_object('table', source_name, 'key', key, 'data', data)
    END
$$;

-- Every retained event, one row each.
CREATE VIEW @extschema@.outbox_events AS
SELECT l.base OPERATOR(pg_catalog.+) e.ord OPERATOR(pg_catalog.-) 1 AS id,
       l.type,
       @extschema@.outbox_payload(l.source_name, e.key, e.data) AS payload,
       l.created_at,
       l.source,
       l.txid
FROM @extschema@.outbox_log l
CROSS JOIN LATERAL ROWS FROM (pg_catalog.jsonb_array_elements(l.keys::pg_catalog.jsonb),
                               pg_catalog.jsonb_array_elements(l.data::pg_catalog.jsonb))
    WITH ORDINALITY AS e(key, data, ord);

-- The events with these ids, reading only the log rows that hold them.
CREATE FUNCTION @extschema@.outbox_events_for(ids bigint[])
RETURNS TABLE(id bigint, type text, payload jsonb, created_at timestamptz)
LANGUAGE sql STABLE SET search_path = pg_catalog, pg_temp AS $$
    SELECT l.base + e.ord - 1, l.type, @extschema@.outbox_payload(l.source_name, e.key, e.data), l.created_at
    FROM @extschema@.outbox_log l
    CROSS JOIN LATERAL ROWS FROM (jsonb_array_elements(l.keys::jsonb), jsonb_array_elements(l.data::jsonb))
        WITH ORDINALITY AS e(key, data, ord)
    JOIN unnest(ids) AS wanted(id) ON wanted.id = l.base + e.ord - 1
    WHERE l.base = ANY (ARRAY(SELECT DISTINCT i - (i - 1) % 4096 FROM unnest(ids) AS i))
$$;

CREATE FUNCTION @extschema@.outbox_claim(
    batch_size integer DEFAULT 100,
    subscription text DEFAULT 'default',
    lease interval DEFAULT '30 seconds')
RETURNS TABLE(id bigint, type text, payload jsonb, created_at timestamptz, attempts integer)
LANGUAGE sql VOLATILE SECURITY DEFINER SET search_path = pg_catalog, pg_temp AS $$
    WITH claimed AS MATERIALIZED (
        SELECT c.id, c.attempts
        FROM @extschema@.outbox_claim_ids(outbox_claim.batch_size, outbox_claim.subscription, outbox_claim.lease) c
    ), copies AS (
        -- events requeued from the dead letters carry their own copy
        SELECT r.event_id, r.type, r.payload, r.created_at
        FROM @extschema@.outbox_retries r
        WHERE r.payload IS NOT NULL
          AND r.event_id IN (SELECT claimed.id FROM claimed)
          AND r.subscription_id = (SELECT s.id FROM @extschema@.outbox_subscriptions s
                                   WHERE s.name = outbox_claim.subscription)
    )
    SELECT c.id, coalesce(k.type, e.type), coalesce(k.payload, e.payload),
           coalesce(k.created_at, e.created_at), c.attempts
    FROM claimed c
    LEFT JOIN copies k ON k.event_id = c.id
    LEFT JOIN @extschema@.outbox_events_for(ARRAY(SELECT claimed.id FROM claimed)) e ON e.id = c.id
    ORDER BY c.id
$$;

-- One row per subscription. pending: not yet handed out (or waiting behind its row);
-- in_flight: leased; retrying: failed or expired, waiting for their next attempt.
CREATE VIEW @extschema@.outbox_backlog AS
SELECT s.name AS subscription,
       w.waiting OPERATOR(pg_catalog.+) r.pending AS pending,
       c.in_flight OPERATOR(pg_catalog.+) r.in_flight AS in_flight,
       c.expired OPERATOR(pg_catalog.+) r.retrying AS retrying,
       d.dead,
       pg_catalog.now() OPERATOR(pg_catalog.-) LEAST(w.oldest, r.oldest, c.oldest) AS oldest_pending_age,
       lat.latency AS avg_propagation_latency
FROM @extschema@.outbox_subscriptions s
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
        WHERE l.base OPERATOR(pg_catalog.>) s.done_seq
           OR ((l.txid OPERATOR(pg_catalog.>=) pg_catalog.pg_snapshot_xmax(s.done_snapshot)
                OR l.txid OPERATOR(pg_catalog.=) ANY (ARRAY(SELECT pg_catalog.pg_snapshot_xip(s.done_snapshot))))
               AND NOT pg_catalog.pg_visible_in_snapshot(l.txid, s.done_snapshot))
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
          WHERE rr.subscription_id OPERATOR(pg_catalog.=) s.id) q
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
) lat;

-- When each acked event was processed, per subscription, while its ledger segment is retained.
CREATE VIEW @extschema@.outbox_processed AS
SELECT s.name AS subscription, e.id AS event_id, l.at AS processed_at
FROM @extschema@.outbox_ledger l
JOIN @extschema@.outbox_subscriptions s ON s.id OPERATOR(pg_catalog.=) l.subscription_id
CROSS JOIN LATERAL pg_catalog.unnest(l.event_ids) AS e(id)
WHERE l.kind OPERATOR(pg_catalog.=) 'a';
