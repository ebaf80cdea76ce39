-- 0.4.0 to 0.5.0.
--
-- A claim renders the payloads of the events it hands out from the log rows it reads for its
-- window, instead of outbox_claim looking every event up again by id in each log segment
-- (outbox_events_for, which stays for the rest). outbox_claim now returns what
-- outbox_claim_events returns; outbox_claim_ids, which returned ids and attempts, goes. Claims find
-- whether a retry is due through a new index instead of reading every retry waiting out its
-- backoff.
CREATE FUNCTION @extschema@.outbox_claim_events(
    "batch_size" INT,
    "subscription" TEXT,
    "lease" interval
) RETURNS TABLE (
    "ids" bigint[],
    "event_types" TEXT[],
    "payloads" TEXT[],
    "created_ats" timestamp with time zone[],
    "attempts" INT[]
)
VOLATILE PARALLEL UNSAFE
SET search_path TO pg_catalog, pg_temp
LANGUAGE c
AS 'MODULE_PATHNAME', 'outbox_claim_events_wrapper';

REVOKE ALL ON FUNCTION @extschema@.outbox_claim_events(integer, text, interval) FROM PUBLIC;

-- as in sql/api.sql
CREATE OR REPLACE FUNCTION @extschema@.outbox_claim(
    batch_size integer DEFAULT 100,
    subscription text DEFAULT 'default',
    lease interval DEFAULT '30 seconds')
RETURNS TABLE(id bigint, type text, payload jsonb, created_at timestamptz, attempts integer)
LANGUAGE plpgsql VOLATILE SECURITY DEFINER
SET search_path = pg_catalog, pg_temp SET max_parallel_workers_per_gather = 0 AS $$
BEGIN
    RETURN QUERY
    SELECT e.id, e.event_type, e.payload::jsonb, e.created_at, e.attempts
    FROM @extschema@.outbox_claim_events(outbox_claim.batch_size, outbox_claim.subscription, outbox_claim.lease) c
    CROSS JOIN LATERAL unnest(c.ids, c.event_types, c.payloads, c.created_ats, c.attempts)
        AS e(id, event_type, payload, created_at, attempts);
END
$$;

DROP FUNCTION @extschema@.outbox_claim_ids(integer, text, interval);

CREATE INDEX outbox_retries_due ON @extschema@.outbox_retries
    (subscription_id, (GREATEST(visible_at, coalesce(leased_until, visible_at))));
