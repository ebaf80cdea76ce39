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
