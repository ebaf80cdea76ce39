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

\echo '== The backlog, per subscription'
SELECT * FROM outbox_backlog;
