-- 0.5.0 to 0.6.0.
--
-- outbox_claim is a C function that hands its rows over in one go, with the payloads parsed
-- into jsonb. The PL/pgSQL function it replaces unnested the arrays outbox_claim_events
-- returned and cast each payload, which cost as much as the claim; outbox_claim_events goes.
-- as in sql/api.sql
CREATE OR REPLACE FUNCTION @extschema@.outbox_claim(
    batch_size integer DEFAULT 100,
    subscription text DEFAULT 'default',
    lease interval DEFAULT '30 seconds')
RETURNS TABLE(id bigint, type text, payload jsonb, created_at timestamptz, attempts integer)
LANGUAGE c VOLATILE SECURITY DEFINER
SET search_path = pg_catalog, pg_temp SET max_parallel_workers_per_gather = 0
AS 'MODULE_PATHNAME', 'outbox_claim';

DROP FUNCTION @extschema@.outbox_claim_events(integer, text, interval);
