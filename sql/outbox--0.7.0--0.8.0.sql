-- 0.7.0 to 0.8.0.
--
-- Renaming the extension's schema is refused (a renamed schema's name could be taken by a
-- schema whose owner then chose what the SECURITY DEFINER DDL checks run). As in sql/ddl.sql:
CREATE FUNCTION @extschema@.outbox_keep_schema_name() RETURNS event_trigger
LANGUAGE plpgsql SET search_path = pg_catalog, pg_temp AS $$
BEGIN
    IF EXISTS (SELECT FROM pg_catalog.pg_extension e
               JOIN pg_catalog.pg_namespace n ON n.oid OPERATOR(pg_catalog.=) e.extnamespace
               WHERE e.extname OPERATOR(pg_catalog.=) 'outbox'
                 AND pg_catalog.quote_ident(n.nspname) OPERATOR(pg_catalog.<>) '@extschema@') THEN
        RAISE EXCEPTION 'outbox: schema @extschema@ holds extension outbox and cannot be renamed'
            USING ERRCODE = 'dependent_objects_still_exist',
                  HINT = 'Drop the extension first (DROP EXTENSION outbox), or leave the schema its name.';
    END IF;
END
$$;

CREATE EVENT TRIGGER outbox_keep_schema_name ON ddl_command_end WHEN TAG IN ('ALTER SCHEMA')
    EXECUTE FUNCTION @extschema@.outbox_keep_schema_name();

REVOKE ALL ON FUNCTION @extschema@.outbox_keep_schema_name() FROM PUBLIC;

-- Tables with inheritance parents or children are captured by row triggers, each table for
-- its own rows (transition tables hold a child's rows without saying whose they are), and the
-- DDL check switches a table that joins or leaves a hierarchy, on CREATE TABLE … INHERITS too.
-- As in sql/ddl.sql:
CREATE OR REPLACE FUNCTION @extschema@.outbox_check_altered_tables() RETURNS event_trigger
LANGUAGE plpgsql SECURITY DEFINER SET search_path = pg_catalog, pg_temp AS $$
DECLARE
    attachment record;
    missing text;
BEGIN
    -- A table captured through transition tables that has just become a partition would miss
    -- the rows routed to it through its parent, and one that has just gained an inheritance
    -- parent or child would file rows of other tables under its own name: it switches to row
    -- triggers, as outbox_attach gives a table in a hierarchy. A plain table that has just left
    -- one switches back (the guard below expects a plain table's triggers, and refused every
    -- ALTER TABLE of it).
    PERFORM @extschema@.outbox_attach(t.source, t.payload_columns, t.watch_columns, t.event_prefix, t.key_columns)
    FROM @extschema@.outbox_attachments t
    JOIN pg_catalog.pg_class c ON c.oid OPERATOR(pg_catalog.=) t.source::pg_catalog.oid
    CROSS JOIN LATERAL (SELECT EXISTS (SELECT FROM pg_catalog.pg_inherits h
                                       WHERE c.oid OPERATOR(pg_catalog.=) ANY (ARRAY[h.inhrelid, h.inhparent])) AS in_hierarchy) i
    WHERE (i.in_hierarchy
           AND EXISTS (SELECT FROM pg_catalog.pg_trigger g
                       WHERE g.tgrelid OPERATOR(pg_catalog.=) c.oid AND g.tgname OPERATOR(pg_catalog.=) 'outbox_capture_inserts'))
       OR (NOT i.in_hierarchy AND c.relkind OPERATOR(pg_catalog.=) 'r'
           AND EXISTS (SELECT FROM pg_catalog.pg_trigger g
                       WHERE g.tgrelid OPERATOR(pg_catalog.=) c.oid AND g.tgname OPERATOR(pg_catalog.=) 'outbox_capture_rows'
                         AND g.tgparentid OPERATOR(pg_catalog.=) 0));
    -- The tables the command names and their partitions and children: a column renamed or
    -- dropped through a parent reaches them unreported.
    FOR attachment IN
        WITH RECURSIVE touched AS (
            SELECT c.objid AS relid FROM pg_catalog.pg_event_trigger_ddl_commands() c
            WHERE c.classid OPERATOR(pg_catalog.=) 'pg_catalog.pg_class'::pg_catalog.regclass
            UNION
            SELECT i.inhrelid FROM pg_catalog.pg_inherits i
            JOIN touched ON i.inhparent OPERATOR(pg_catalog.=) touched.relid)
        SELECT DISTINCT t.source, t.key_columns, t.payload_columns, t.watch_columns
        FROM touched
        JOIN @extschema@.outbox_attachments t ON t.source::pg_catalog.oid OPERATOR(pg_catalog.=) touched.relid
    LOOP
        SELECT pg_catalog.string_agg(DISTINCT pg_catalog.quote_ident(n), ', ') INTO missing
        FROM pg_catalog.unnest(attachment.key_columns
                               OPERATOR(pg_catalog.||) coalesce(attachment.payload_columns, '{}')
                               OPERATOR(pg_catalog.||) coalesce(attachment.watch_columns, '{}')) AS n
        WHERE NOT EXISTS (SELECT FROM pg_catalog.pg_attribute a
                          WHERE a.attrelid OPERATOR(pg_catalog.=) attachment.source
                            AND a.attname OPERATOR(pg_catalog.=) n
                            AND a.attnum OPERATOR(pg_catalog.>) 0 AND NOT a.attisdropped);
        -- (none at all is a table being restored: pg_restore makes triggers after ALTER TABLEs)
        IF missing IS NULL AND (SELECT pg_catalog.count(*) FROM pg_catalog.pg_trigger g
                                WHERE g.tgrelid OPERATOR(pg_catalog.=) attachment.source
                                  AND g.tgname OPERATOR(pg_catalog.=) ANY (ARRAY['outbox_capture_inserts', 'outbox_capture_deletes',
                                                    'outbox_capture_updates', 'outbox_capture_statement',
                                                    'outbox_capture_truncate', 'outbox_capture_rows']))
                               OPERATOR(pg_catalog.<>) ALL (ARRAY[0, (SELECT CASE WHEN c.relkind OPERATOR(pg_catalog.=) 'p'
                                                                         OR EXISTS (SELECT FROM pg_catalog.pg_inherits h
                                                                                    WHERE c.oid OPERATOR(pg_catalog.=) ANY (ARRAY[h.inhrelid, h.inhparent]))
                                                                    THEN 4 ELSE 5 END
                                                        FROM pg_catalog.pg_class c
                                                        WHERE c.oid OPERATOR(pg_catalog.=) attachment.source)]) THEN
            RAISE EXCEPTION 'outbox: this change to table % would drop its capture triggers', attachment.source
                USING ERRCODE = 'dependent_objects_still_exist',
                      HINT = 'Change the attachment in the same transaction first: outbox_attach() with watch_columns '
                             'that leave out the column, or outbox_detach().';
        END IF;
        IF missing IS NOT NULL THEN
            RAISE EXCEPTION 'outbox: table % is captured with column(s) % by name', attachment.source, missing
                USING ERRCODE = 'dependent_objects_still_exist',
                      HINT = 'Change the attachment in the same transaction first: outbox_attach() without those '
                             'columns, then the ALTER TABLE, then outbox_attach() with the new ones.';
        END IF;
    END LOOP;
END
$$;

DROP EVENT TRIGGER outbox_check_altered_tables;
CREATE EVENT TRIGGER outbox_check_altered_tables ON ddl_command_end WHEN TAG IN ('ALTER TABLE', 'CREATE TABLE')
    EXECUTE FUNCTION @extschema@.outbox_check_altered_tables();

-- the attached tables already in a hierarchy
SELECT @extschema@.outbox_attach(t.source, t.payload_columns, t.watch_columns, t.event_prefix, t.key_columns)
FROM @extschema@.outbox_attachments t
WHERE EXISTS (SELECT FROM pg_catalog.pg_inherits h
              WHERE t.source::pg_catalog.oid OPERATOR(pg_catalog.=) ANY (ARRAY[h.inhrelid, h.inhparent]))
  AND EXISTS (SELECT FROM pg_catalog.pg_trigger g
              WHERE g.tgrelid OPERATOR(pg_catalog.=) t.source::pg_catalog.oid
                AND g.tgname OPERATOR(pg_catalog.=) 'outbox_capture_inserts');

-- A function sink's function is called only while it has the owner it had when it was
-- subscribed (a name can come to mean another function, of a more privileged owner). The
-- functions subscribed now are taken as they are.
ALTER TABLE @extschema@.outbox_subscriptions ADD COLUMN function_owner pg_catalog.regrole;
UPDATE @extschema@.outbox_subscriptions s SET function_owner = p.proowner
FROM pg_catalog.pg_proc p
WHERE s.sink OPERATOR(pg_catalog.=) 'function'
  AND p.oid OPERATOR(pg_catalog.=) pg_catalog.to_regprocedure((s.options OPERATOR(pg_catalog.->>) 'function') OPERATOR(pg_catalog.||) '(jsonb)');

-- A subscription's consumer_role is the role of that name when it was made, by oid (a role
-- dropped and made again under the name is another role). Taken as the roles are now.
ALTER TABLE @extschema@.outbox_subscriptions ADD COLUMN consumer_role pg_catalog.regrole;
UPDATE @extschema@.outbox_subscriptions
SET consumer_role = pg_catalog.to_regrole(pg_catalog.quote_ident(options OPERATOR(pg_catalog.->>) 'consumer_role'))
WHERE options OPERATOR(pg_catalog.?) 'consumer_role';
