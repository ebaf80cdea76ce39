\pset footer off
\echo '== An embedding table with capture attached'
CREATE EXTENSION outbox;
CREATE TABLE chunks (id bigint PRIMARY KEY, doc_id int, content text, embedding real[]);
SELECT outbox_attach('chunks', payload_columns => ARRAY['doc_id', 'content']);

\echo '== Writes: each change becomes an event in the same transaction'
INSERT INTO chunks SELECT g, g / 3, 'chunk ' || g, ARRAY[0.1 * g, 0.2, 0.3] FROM generate_series(1, 5) g;
UPDATE chunks SET embedding = ARRAY[0.9, 0.8, 0.7] WHERE id = 2;  -- a second event for row 2
UPDATE chunks SET doc_id = doc_id WHERE id = 3;                   -- nothing changed: no event
DELETE FROM chunks WHERE id = 5;
BEGIN; INSERT INTO chunks VALUES (7, 9, 'rolled back', '{0}'); ROLLBACK;  -- no event
SELECT id, type, payload FROM outbox_events ORDER BY id;

\echo '== A consumer claims a batch (row 2''s second event waits until its first is done)'
CREATE TEMP TABLE batch AS SELECT * FROM outbox_claim(batch_size => 10);
SELECT id, type, payload, attempts FROM batch ORDER BY id;

\echo '== It acks all but one, and fails that one: the vector store answered 503'
SELECT outbox_ack(ARRAY(SELECT id FROM batch WHERE id <> (SELECT max(id) FROM batch))) AS acked;
SELECT outbox_fail(ARRAY(SELECT max(id) FROM batch), 'vector store answered 503') AS failed;
SELECT event_id, attempts, last_error, round(extract(epoch FROM visible_at - now())::numeric, 1) AS retry_in_s
FROM outbox_retries WHERE attempts > 0;
SELECT * FROM outbox_backlog;

\echo '== After the backoff the failed event comes back, with its attempt count'
SELECT pg_sleep(1.2);
CREATE TEMP TABLE retry AS SELECT * FROM outbox_claim(batch_size => 10);
SELECT id, type, payload->'key' AS key, attempts FROM retry ORDER BY id;
SELECT outbox_ack(ARRAY(SELECT id FROM retry)) AS acked;

\echo '== The delivery worker delivers sink subscriptions by itself:'
\echo '   a function sink keeps a mirror table in step, an HTTP sink posts to a receiver'
CREATE TABLE vector_mirror (id bigint PRIMARY KEY, doc_id int, content text);
CREATE FUNCTION mirror(batch jsonb) RETURNS void LANGUAGE sql AS $$
    DELETE FROM vector_mirror m USING jsonb_array_elements(batch) e
    WHERE e->>'type' = 'EMBED_DELETE' AND m.id = (e->'payload'->'key'->>'id')::bigint;
    INSERT INTO vector_mirror
    SELECT (e->'payload'->'key'->>'id')::bigint, (e->'payload'->'data'->>'doc_id')::int, e->'payload'->'data'->>'content'
    FROM jsonb_array_elements(batch) e WHERE e->>'type' = 'EMBED_UPSERT'
    ON CONFLICT (id) DO UPDATE SET doc_id = EXCLUDED.doc_id, content = EXCLUDED.content;
$$;
SELECT outbox_subscribe('mirror', 'function', '{"function": "public.mirror"}', from_start => true);
SELECT outbox_subscribe('search', 'http', jsonb_build_object('url', :'sink_url', 'batch_size', 50), from_start => true);
INSERT INTO chunks VALUES (10, 4, 'written after the sinks were set up', ARRAY[0.5, 0.5, 0.5]);
DELETE FROM chunks WHERE id = 1;
SELECT pg_sleep(1);
SELECT * FROM vector_mirror ORDER BY id;

\echo '== The backlog, per subscription'
SELECT subscription, pending, in_flight, retrying, dead, oldest_pending_age, avg_propagation_latency,
       sink, last_success_at IS NOT NULL AS delivered, backing_off, last_error
FROM outbox_backlog ORDER BY subscription;
