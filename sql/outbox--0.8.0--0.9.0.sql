-- 0.8.0 to 0.9.0.
--
-- Rows that join or leave a captured partition tree without a write: ATTACH PARTITION brings
-- a table's rows in (captured as UPSERTs), DETACH PARTITION and DROP TABLE of a partition take
-- them out (DELETEs, read before the drop). Partitions that join (ATTACH, CREATE TABLE …
-- PARTITION OF, also inside CREATE SCHEMA) get their TRUNCATE trigger; those that leave lose
-- it. As in sql/ddl.sql:
CREATE FUNCTION @extschema@.outbox_capture_partition_changes() RETURNS event_trigger
    LANGUAGE c AS 'MODULE_PATHNAME', 'outbox_capture_partition_changes';
REVOKE ALL ON FUNCTION @extschema@.outbox_capture_partition_changes() FROM PUBLIC;

CREATE EVENT TRIGGER outbox_capture_attached_partitions ON ddl_command_end WHEN TAG IN ('ALTER TABLE', 'CREATE TABLE', 'CREATE SCHEMA')
    EXECUTE FUNCTION @extschema@.outbox_capture_partition_changes();
CREATE EVENT TRIGGER outbox_capture_dropped_partitions ON ddl_command_start WHEN TAG IN ('DROP TABLE')
    EXECUTE FUNCTION @extschema@.outbox_capture_partition_changes();

-- A replay hands out only what the subscription could have been handed: what was committed
-- before it was made was taken as handed out (its first window starts after it). The
-- subscriptions made before this update keep replaying what they did.
ALTER TABLE @extschema@.outbox_subscriptions
    ADD COLUMN start_snapshot pg_catalog.pg_snapshot NOT NULL DEFAULT '1:1:',
    ADD COLUMN start_seq bigint NOT NULL DEFAULT -4095;

-- TRUNCATE is captured before the rows go (the TRUNCATE then comes before what a user's
-- AFTER TRUNCATE trigger writes to the table again), and a partition of an attached table
-- truncated by itself is captured as a DELETE of each of its rows, by a TRUNCATE trigger of
-- its own: every attached table is attached again, its settings unchanged (a brief lock on
-- each, and on each partition of a partitioned one).
-- (outbox_attach refuses a database not in UTF8, where a table attached before it did keeps
-- its triggers)
SELECT @extschema@.outbox_attach(t.source, t.payload_columns, t.watch_columns, t.event_prefix, t.key_columns)
FROM @extschema@.outbox_attachments t
WHERE pg_catalog.getdatabaseencoding() OPERATOR(pg_catalog.=) 'UTF8';
