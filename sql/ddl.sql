-- Schema changes to captured tables. Capture names columns, so a column dropped or renamed
-- under it would silently drop out of every payload, or change what identifies a row; and
-- DROP COLUMN ... CASCADE of a watched column drops the update trigger that watches it. Either
-- would break the copies downstream without a word, so such DDL is refused with the way out.
-- A dropped table takes its attachment with it. Events captured before stay as they are.

CREATE FUNCTION @extschema@.outbox_check_altered_tables() RETURNS event_trigger
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

-- (CREATE TABLE: a table made an inheritance child of a captured table)
CREATE EVENT TRIGGER outbox_check_altered_tables ON ddl_command_end WHEN TAG IN ('ALTER TABLE', 'CREATE TABLE')
    EXECUTE FUNCTION @extschema@.outbox_check_altered_tables();

-- Rows that join or leave a captured partition tree without a write: ATTACH PARTITION brings
-- a table's rows in (captured as UPSERTs), DETACH PARTITION and DROP TABLE of a partition take
-- them out (DELETEs, read before the drop), as do DROP SCHEMA … CASCADE and DROP OWNED of a
-- schema or role a partition belongs to. Partitions that join (ATTACH, CREATE TABLE …
-- PARTITION OF, also inside CREATE SCHEMA) get their TRUNCATE trigger; those that leave lose
-- it. src/partitions.rs reads the command's parse tree.
CREATE EVENT TRIGGER outbox_capture_attached_partitions ON ddl_command_end WHEN TAG IN ('ALTER TABLE', 'CREATE TABLE', 'CREATE SCHEMA')
    EXECUTE FUNCTION @extschema@.outbox_capture_partition_changes();
CREATE EVENT TRIGGER outbox_capture_dropped_partitions ON ddl_command_start WHEN TAG IN ('DROP TABLE', 'DROP SCHEMA', 'DROP OWNED')
    EXECUTE FUNCTION @extschema@.outbox_capture_partition_changes();

CREATE FUNCTION @extschema@.outbox_forget_dropped_tables() RETURNS event_trigger
LANGUAGE plpgsql SECURITY DEFINER SET search_path = pg_catalog, pg_temp AS $$
BEGIN
    DELETE FROM @extschema@.outbox_attachments t
    USING pg_catalog.pg_event_trigger_dropped_objects() d
    WHERE d.classid OPERATOR(pg_catalog.=) 'pg_catalog.pg_class'::pg_catalog.regclass
      AND d.objsubid OPERATOR(pg_catalog.=) 0
      AND t.source::pg_catalog.oid OPERATOR(pg_catalog.=) d.objid;
END
$$;

CREATE EVENT TRIGGER outbox_forget_dropped_tables ON sql_drop
    EXECUTE FUNCTION @extschema@.outbox_forget_dropped_tables();

-- The extension's schema keeps its name. Its SECURITY DEFINER functions above name their
-- tables and functions through it, and backends keep it for their queries: renamed, the name
-- would resolve to whatever schema took it, where its owner (the database owner, for public)
-- could put a same-named table or function and have it used with the extension owner's
-- rights. Not SECURITY DEFINER: it only reads the catalog.
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
