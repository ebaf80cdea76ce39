-- 0.1.0 to 0.2.0.
--
-- outbox_events_for finds log rows by equality on their bases instead of by ranges, whose
-- generic plan read the whole log on every claim.
CREATE OR REPLACE FUNCTION @extschema@.outbox_events_for(ids bigint[])
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

-- The library of 0.2.0 no longer counts base 1 as drawn before the first event is written,
-- which let a subscription created in the transaction that wrote the first events ever skip
-- them. It changes no SQL object, and the library runs databases still at 0.1.0 as well, so
-- installing it first and updating each database afterwards is safe.
