//! Privileges and search_path safety, checked with real roles over real connections.
#![cfg(not(feature = "pg_test"))] // run by scripts/test.sh against the installed extension, not by cargo pgrx test

mod common;

use common::*;

/// The GRANT line README.md documents for `role`.
fn documented_grant(role: &str) -> String {
    let readme = std::fs::read_to_string(concat!(env!("CARGO_MANIFEST_DIR"), "/README.md")).unwrap();
    readme
        .lines()
        .find(|line| line.starts_with("GRANT") && line.contains(&format!("TO {role};")))
        .unwrap_or_else(|| panic!("README documents no GRANT for {role}"))
        .to_string()
}

fn setup(name: &str) -> (String, Client) {
    let cluster = shared();
    let db = cluster.database(name);
    let mut owner = cluster.connect(&db);
    chunks(&mut owner, ", payload_columns => ARRAY['content']");
    owner
        .batch_execute(
            "CREATE TABLE private_notes (id int PRIMARY KEY, note text);
             INSERT INTO private_notes VALUES (1, 'salary data');
             INSERT INTO chunks VALUES (1, 1, 'visible', '{1}');",
        )
        .unwrap();
    (db, owner)
}

fn connect_as(db: &str, role: &str) -> Client {
    Client::connect(&format!("{} user={role}", shared().dsn(db)), NoTls).unwrap()
}

fn refused(client: &mut Client, sql: &str) {
    let message = error_of(client, sql);
    assert!(message.contains("permission denied") || message.contains("must be owner"), "{sql}: {message}");
}

#[test]
fn public_can_do_nothing() {
    let (db, mut owner) = setup("public_nothing");
    owner.batch_execute("CREATE ROLE nobody LOGIN").unwrap();
    let mut nobody = connect_as(&db, "nobody");
    for sql in [
        "SELECT * FROM outbox_claim()",
        "SELECT outbox_ack(ARRAY[1])",
        "SELECT outbox_fail(ARRAY[1])",
        "SELECT * FROM outbox_backlog",
        "SELECT * FROM outbox_events",
        "SELECT * FROM outbox_log",
        "SELECT * FROM outbox_dead_letters",
        "SELECT * FROM outbox_subscriptions",
        "SELECT outbox_subscribe('mine')",
        "SELECT outbox_replay('default', ids => ARRAY[1])",
        "SELECT outbox_purge()",
        "SELECT outbox_attach('chunks')",
        "SELECT * FROM outbox_events_for(ARRAY[1])",
        "SELECT outbox_metrics()",
        "SELECT outbox_replayable('default', ids => ARRAY[1])",
        "SELECT outbox_purge_dead_letters(interval '1 day')",
    ] {
        refused(&mut nobody, sql);
    }
}

#[test]
fn documented_consumer_grant_is_enough_and_no_more() {
    let (db, mut owner) = setup("consumer_grant");
    owner.batch_execute("CREATE ROLE outbox_consumer LOGIN").unwrap();
    owner.batch_execute(&documented_grant("outbox_consumer")).unwrap();
    let mut consumer = connect_as(&db, "outbox_consumer");

    let claimed = claim(&mut consumer, "SELECT * FROM outbox_claim(10)");
    assert_eq!(claimed.len(), 1);
    assert_eq!(consumer.query_one("SELECT outbox_ack($1)", &[&ids(&claimed)]).unwrap().get::<_, i32>(0), 1);
    assert_eq!(consumer.query_one("SELECT outbox_fail(ARRAY[12345], 'x')", &[]).unwrap().get::<_, i32>(0), 0);
    assert_eq!(scalar_i64(&mut consumer, "SELECT pending FROM outbox_backlog WHERE subscription = 'default'"), 0);

    // nothing beyond the API: no tables, no admin functions, no other tables through the API
    for sql in [
        "SELECT * FROM outbox_log",
        "SELECT * FROM outbox_subscriptions",
        "SELECT * FROM outbox_dead_letters",
        "SELECT * FROM private_notes",
        "SELECT outbox_subscribe('mine')",
        "SELECT outbox_replay('default', ids => ARRAY[1])",
        "SELECT outbox_attach('private_notes', key_columns => ARRAY['id'])",
        "SELECT * FROM outbox_events_for(ARRAY[1])",
    ] {
        refused(&mut consumer, sql);
    }
    // a consumer never sees a column that was not chosen for the payload
    owner.batch_execute("INSERT INTO chunks VALUES (2, 1, 'also visible', '{9}')").unwrap();
    let rows = consumer.query("SELECT payload::text FROM outbox_claim(10)", &[]).unwrap();
    assert!(rows.iter().all(|r| !r.get::<_, String>(0).contains("embedding")));
}

/// A subscription with a consumer_role is consumed by that role's members alone; the others
/// are refused without taking its lock.
#[test]
fn a_consumer_role_keeps_a_subscription_to_its_members() {
    let (db, mut owner) = setup("consumer_role");
    owner
        .batch_execute(&format!(
            "CREATE ROLE team_a_cr LOGIN; CREATE ROLE team_b_cr LOGIN; CREATE ROLE \"Team C cr\"; CREATE ROLE outbox_consumer_cr;
             {}
             GRANT outbox_consumer_cr TO team_a_cr, team_b_cr;
             GRANT \"Team C cr\" TO team_a_cr;
             SELECT outbox_subscribe('b_only', options => '{{\"consumer_role\": \"team_b_cr\"}}', from_start => true);
             SELECT outbox_subscribe('c_only', options => '{{\"consumer_role\": \"Team C cr\"}}', from_start => true);",
            documented_grant("outbox_consumer").replace("TO outbox_consumer;", "TO outbox_consumer_cr;")
        ))
        .unwrap();
    let message = error_of(&mut owner, "SELECT outbox_subscribe('ghost', options => '{\"consumer_role\": \"no_such_role\"}')");
    assert!(message.contains("role \"no_such_role\" does not exist"), "{message}");

    let mut team_a = connect_as(&db, "team_a_cr");
    let mut team_b = connect_as(&db, "team_b_cr");
    for sql in ["SELECT * FROM outbox_claim(10, 'b_only')", "SELECT outbox_ack(ARRAY[1], 'b_only')", "SELECT outbox_fail(ARRAY[1], 'x', 'b_only')"] {
        let message = error_of(&mut team_a, sql);
        assert!(message.contains("permission denied for subscription \"b_only\"") && message.contains("team_b_cr"), "{sql}: {message}");
    }
    // a refused claim left in an aborted transaction holds nothing up
    team_a.batch_execute("BEGIN").unwrap();
    assert!(team_a.query("SELECT * FROM outbox_claim(10, 'b_only')", &[]).is_err());
    team_b.batch_execute("SET statement_timeout = '5s'").unwrap();
    let claimed = claim(&mut team_b, "SELECT * FROM outbox_claim(10, 'b_only')");
    assert_eq!(claimed.len(), 1);
    team_a.batch_execute("ROLLBACK").unwrap();
    assert_eq!(team_b.query_one("SELECT outbox_ack($1, 'b_only')", &[&ids(&claimed)]).unwrap().get::<_, i32>(0), 1);
    // members of the role consume it too, whatever its name needs quoting for
    let through_membership = claim(&mut team_a, "SELECT * FROM outbox_claim(10, 'c_only')");
    assert_eq!(team_a.query_one("SELECT outbox_ack($1, 'c_only')", &[&ids(&through_membership)]).unwrap().get::<_, i32>(0), 1);
    assert!(error_of(&mut team_b, "SELECT * FROM outbox_claim(10, 'c_only')").contains("permission denied for subscription \"c_only\""));
    // without a consumer_role, every consumer consumes it
    assert_eq!(claim(&mut team_b, "SELECT * FROM outbox_claim(10)").len(), 1);
    // The role is the one named at subscribe time, not whichever has the name later: renamed,
    // its members keep the subscription; dropped and made again by someone who may create
    // roles, the new one does not get it (it did when matched by name).
    owner.batch_execute("ALTER ROLE \"Team C cr\" RENAME TO \"Team C cr renamed\"").unwrap();
    assert!(team_a.query("SELECT * FROM outbox_claim(10, 'c_only')", &[]).is_ok(), "a member of the renamed role");
    owner.batch_execute("REVOKE \"Team C cr renamed\" FROM team_a_cr; DROP ROLE \"Team C cr renamed\"; CREATE ROLE \"Team C cr\"; GRANT \"Team C cr\" TO team_b_cr").unwrap();
    let message = error_of(&mut team_b, "SELECT * FROM outbox_claim(10, 'c_only')");
    assert!(message.contains("permission denied for subscription \"c_only\""), "{message}");
}

#[test]
fn documented_admin_grant_runs_the_outbox() {
    let (db, mut owner) = setup("admin_grant");
    owner.batch_execute("CREATE ROLE outbox_admin LOGIN").unwrap();
    owner.batch_execute(&documented_grant("outbox_admin")).unwrap();
    owner.batch_execute("CREATE TABLE admin_docs (id int PRIMARY KEY, body text); ALTER TABLE admin_docs OWNER TO outbox_admin").unwrap();
    let mut admin = connect_as(&db, "outbox_admin");
    admin.batch_execute("SELECT outbox_subscribe('search', from_start => true)").unwrap();
    admin.batch_execute("SELECT outbox_attach('admin_docs')").unwrap();
    admin.batch_execute("INSERT INTO admin_docs VALUES (1, 'x')").unwrap();
    assert_eq!(scalar_i64(&mut admin, "SELECT count(*) FROM outbox_events"), 2);
    let claimed = claim(&mut admin, "SELECT * FROM outbox_claim(10, 'search')");
    assert_eq!(claimed.len(), 2);
    admin.execute("SELECT outbox_fail($1, 'no', 'search', retry_after => '0')", &[&ids(&claimed)]).unwrap();
    assert_eq!(scalar_i64(&mut admin, "SELECT count(*) FROM outbox_dead_letters"), 0);
    assert_eq!(scalar_i64(&mut admin, "SELECT outbox_purge()"), 0);
    let again = claim(&mut admin, "SELECT * FROM outbox_claim(10, 'search')");
    assert_eq!(admin.query_one("SELECT outbox_ack($1, 'search')", &[&ids(&again)]).unwrap().get::<_, i32>(0), 2);
    assert_eq!(scalar_i64(&mut admin, "SELECT count(*) FROM outbox_replayable('search', since => now() - interval '1 hour')"), 2);
    assert_eq!(scalar_i64(&mut admin, "SELECT outbox_purge_dead_letters(interval '1 day')"), 0);
    let metrics: String = admin.query_one("SELECT outbox_metrics()", &[]).unwrap().get(0);
    assert!(metrics.contains("outbox_delivered_total{subscription=\"search\"} 2"), "{metrics}");
    assert_eq!(scalar_i64(&mut admin, "SELECT count(*) FROM outbox_subscriptions"), 2, "the CLI lists subscriptions");
    admin.batch_execute("SELECT outbox_detach('admin_docs')").unwrap();
    // attaching needs ownership of the table, not just EXECUTE
    refused(&mut admin, "SELECT outbox_attach('private_notes', key_columns => ARRAY['id'])");
    admin.batch_execute("SELECT outbox_unsubscribe('search')").unwrap();
    // The worker calls a function sink as the function's owner: naming a function owned by a
    // more privileged role, even one anybody may execute, would have it run with that role's
    // rights. The admin may name its own functions only.
    owner
        .batch_execute(
            "CREATE FUNCTION public.copy_notes(batch jsonb) RETURNS void LANGUAGE sql
                 AS 'INSERT INTO private_notes SELECT 2, current_user';
             GRANT EXECUTE ON FUNCTION public.copy_notes(jsonb) TO outbox_admin;
             GRANT CREATE ON SCHEMA public TO outbox_admin;",
        )
        .unwrap();
    let message = error_of(&mut admin, "SELECT outbox_subscribe('escalate', 'function', '{\"function\": \"public.copy_notes\"}')");
    assert!(message.contains("must be owner of function public.copy_notes"), "{message}");
    assert_eq!(scalar_i64(&mut admin, "SELECT count(*) FROM outbox_subscriptions WHERE name = 'escalate'"), 0);
    admin
        .batch_execute(
            "CREATE FUNCTION admin_sink(batch jsonb) RETURNS void LANGUAGE sql AS 'SELECT 1';
             SELECT outbox_subscribe('own', 'function', '{\"function\": \"public.admin_sink\"}');
             SELECT outbox_unsubscribe('own');",
        )
        .unwrap();
}

#[test]
fn documented_monitor_grant_reads_metrics_and_nothing_else() {
    let (db, mut owner) = setup("monitor_grant");
    owner.batch_execute("CREATE ROLE outbox_monitor LOGIN").unwrap();
    owner.batch_execute(&documented_grant("outbox_monitor")).unwrap();
    let mut monitor = connect_as(&db, "outbox_monitor");
    let metrics: String = monitor.query_one("SELECT outbox_metrics()", &[]).unwrap().get(0);
    assert!(metrics.contains("outbox_backlog_events{subscription=\"default\"} 1"), "{metrics}");
    assert_eq!(scalar_i64(&mut monitor, "SELECT pending FROM outbox_backlog"), 1);
    for sql in [
        "SELECT * FROM outbox_claim()",
        "SELECT * FROM outbox_events",
        "SELECT * FROM outbox_dead_letters",
        "SELECT * FROM outbox_subscriptions",
        "SELECT outbox_replay('default', ids => ARRAY[1])",
    ] {
        refused(&mut monitor, sql);
    }
}

#[test]
fn writers_need_no_outbox_privileges() {
    let (db, mut owner) = setup("writer");
    owner.batch_execute("CREATE ROLE writer LOGIN; GRANT INSERT, UPDATE, DELETE, SELECT ON chunks TO writer").unwrap();
    let mut writer = connect_as(&db, "writer");
    writer.batch_execute("INSERT INTO chunks VALUES (10, 1, 'from writer', '{1}'); UPDATE chunks SET content = 'w2' WHERE id = 10").unwrap();
    assert_eq!(scalar_i64(&mut owner, "SELECT count(*) FROM outbox_events WHERE payload->'key'->>'id' = '10'"), 2);
    refused(&mut writer, "SELECT * FROM outbox_events");
}

#[test]
fn hostile_search_path_objects_change_nothing() {
    let (db, mut owner) = setup("search_path_attack");
    // Hostile same-named objects in a schema searched before pg_catalog.
    owner
        .batch_execute(
            "CREATE SCHEMA evil;
             CREATE FUNCTION evil.now() RETURNS timestamptz LANGUAGE sql AS $$ SELECT '2000-01-01'::timestamptz $$;
             CREATE FUNCTION evil.clock_timestamp() RETURNS timestamptz LANGUAGE sql AS $$ SELECT '2000-01-01'::timestamptz $$;
             CREATE FUNCTION evil.nextval(regclass) RETURNS bigint LANGUAGE sql AS $$ SELECT 1::bigint $$;
             CREATE FUNCTION evil.pg_current_xact_id() RETURNS xid8 LANGUAGE sql AS $$ SELECT '1'::xid8 $$;
             CREATE FUNCTION evil.jsonb_build_object(text, jsonb) RETURNS jsonb LANGUAGE sql AS $$ SELECT '{}'::jsonb $$;
             CREATE FUNCTION evil.never(bigint, bigint) RETURNS boolean LANGUAGE sql AS $$ SELECT false $$;
             CREATE OPERATOR evil.= (LEFTARG = bigint, RIGHTARG = bigint, FUNCTION = evil.never);
             CREATE FUNCTION evil.never_text(text, text) RETURNS boolean LANGUAGE sql AS $$ SELECT false $$;
             CREATE OPERATOR evil.= (LEFTARG = text, RIGHTARG = text, FUNCTION = evil.never_text);
             GRANT USAGE ON SCHEMA evil TO PUBLIC;",
        )
        .unwrap();
    let mut victim = shared().connect(&db);
    victim.batch_execute("SET search_path = evil, public, pg_catalog").unwrap();
    victim.batch_execute("INSERT INTO chunks VALUES (2, 1, 'second', '{2}'); UPDATE chunks SET content = 'third' WHERE id = 2").unwrap();
    let claimed = claim(&mut victim, "SELECT * FROM outbox_claim(10)");
    assert_eq!(claimed.iter().map(|e| e.2).collect::<Vec<_>>(), [1, 2], "row 2's update waits behind its insert");
    assert_eq!(victim.query_one("SELECT outbox_ack($1)", &[&ids(&claimed)]).unwrap().get::<_, i32>(0), 2);
    let next = claim(&mut victim, "SELECT * FROM outbox_claim(10)");
    assert_eq!(next.len(), 1);
    let created: bool = victim.query_one("SELECT bool_and(created_at > pg_catalog.now() - interval '1 hour') FROM outbox_events", &[]).unwrap().get(0);
    assert!(created, "timestamps come from pg_catalog");
    // (this test's own query must not use the hostile `=`)
    let in_flight: i64 = victim.query_one("SELECT in_flight FROM outbox_backlog", &[]).unwrap().get(0);
    assert_eq!(in_flight, 1);
}

#[test]
fn create_extension_and_every_security_definer_function_ignore_hostile_objects() {
    let cluster = shared();
    let mut admin = cluster.connect("postgres");
    admin.batch_execute("DROP DATABASE IF EXISTS hostile_install").unwrap();
    admin.batch_execute("CREATE DATABASE hostile_install").unwrap();
    let mut c = cluster.connect("hostile_install");
    plant_hostile_objects(&mut c);
    c.batch_execute(
        "SET search_path = evil, public, pg_catalog;
         CREATE EXTENSION outbox;
         CREATE TABLE public.chunks (id bigint PRIMARY KEY, doc_id int, content text, embedding real[]);
         SELECT outbox_attach('public.chunks', payload_columns => ARRAY['content']);
         SELECT outbox_subscribe('search', options => '{\"max_attempts\": 1}');
         INSERT INTO public.chunks SELECT g, 1, 'c', '{0.5}' FROM generate_series(1, 5) g;
         UPDATE public.chunks SET content = 'changed' WHERE id OPERATOR(pg_catalog.=) 1;
         DELETE FROM public.chunks WHERE id OPERATOR(pg_catalog.=) 5;
         ALTER TABLE public.chunks ADD COLUMN note text;",
    )
    .unwrap();
    let claimed = claim(&mut c, "SELECT * FROM outbox_claim(10)");
    assert_eq!(claimed.iter().map(|e| e.2).collect::<Vec<_>>(), [1, 2, 3, 4, 5], "each row's first event, in order");
    assert_eq!(c.query_one("SELECT outbox_ack($1)", &[&ids(&claimed)]).unwrap().get::<_, i32>(0), 5);
    let later = claim(&mut c, "SELECT * FROM outbox_claim(10)");
    assert_eq!(later.iter().map(|e| (e.1.as_str(), e.2)).collect::<Vec<_>>(), [("EMBED_UPSERT", 1), ("EMBED_DELETE", 5)]);
    // row 2's first event (row 1 has a newer one, which a requeue would not go back behind)
    let dead = ids(&claim(&mut c, "SELECT * FROM outbox_claim(2, 'search')"))[1..].to_vec();
    assert_eq!(c.query_one("SELECT outbox_fail($1, 'no', 'search')", &[&dead]).unwrap().get::<_, i32>(0), 1);
    for (sql, expected) in [
        ("SELECT outbox_ack($1)", 2i64),
        ("SELECT count(*) FROM outbox_replayable('default', ids => $1)", 2),
        ("SELECT outbox_replay('default', ids => $1)", 2),
    ] {
        let got = c.query_one(&format!("SELECT ({sql})::bigint"), &[&ids(&later)]).unwrap().get::<_, i64>(0);
        assert_eq!(got, expected, "{sql}");
    }
    assert_eq!(scalar_i64(&mut c, "SELECT outbox_requeue_dead('search')"), 1);
    let dead = ids(&claim(&mut c, "SELECT * FROM outbox_claim(1, 'search')"));
    c.execute("SELECT outbox_fail($1, 'no', 'search')", &[&dead]).unwrap();
    assert_eq!(scalar_i64(&mut c, "SELECT outbox_purge_dead_letters('0')"), 1);
    assert_eq!(scalar_i64(&mut c, "SELECT outbox_purge()"), 0);
    let metrics: String = c.query_one("SELECT outbox_metrics()", &[]).unwrap().get(0);
    assert!(metrics.contains("outbox_delivered_total{subscription=\"default\"} 7"), "{metrics}");
    // the DDL event trigger runs under the caller's search_path, partly as the extension owner
    c.batch_execute(
        "CREATE TABLE public.parts (id bigint PRIMARY KEY) PARTITION BY RANGE (id);
         CREATE TABLE public.parts_a PARTITION OF public.parts FOR VALUES FROM (0) TO (10);
         SELECT outbox_attach('public.parts');
         CREATE TABLE public.parts_b PARTITION OF public.parts FOR VALUES FROM (10) TO (20);
         CREATE TABLE public.parts_c (id bigint PRIMARY KEY);
         INSERT INTO public.parts_c VALUES (21);
         ALTER TABLE public.parts ATTACH PARTITION public.parts_c FOR VALUES FROM (20) TO (30);
         INSERT INTO public.parts VALUES (1), (11);
         TRUNCATE public.parts_a;
         ALTER TABLE public.parts DETACH PARTITION public.parts_c;
         DROP TABLE public.parts_b;
         TRUNCATE public.parts;
         SELECT outbox_detach('public.parts');",
    )
    .unwrap();
    c.batch_execute("SELECT outbox_detach('public.chunks'); SELECT outbox_unsubscribe('search'); DROP TABLE public.chunks").unwrap();
    c.batch_execute("RESET search_path").unwrap();
    let parts: String = c
        .query_one(
            "SELECT string_agg(type || ' ' || coalesce(payload->'key'->>'id', ''), ', ' ORDER BY id) FROM evil.outbox_events WHERE payload->>'table' = 'public.parts'",
            &[],
        )
        .unwrap()
        .get(0);
    assert_eq!(parts, "EMBED_UPSERT 21, EMBED_UPSERT 1, EMBED_UPSERT 11, EMBED_DELETE 1, EMBED_DELETE 21, EMBED_DELETE 11, EMBED_TRUNCATE ");
    let calls: Vec<String> = c.query("SELECT what FROM public.attack_log", &[]).unwrap().iter().map(|r| r.get(0)).collect();
    assert!(calls.is_empty(), "hostile objects were called: {calls:?}");
    assert_eq!(
        scalar_i64(&mut c, "SELECT count(*) FROM pg_proc p JOIN pg_depend d ON d.objid = p.oid AND d.deptype = 'e' WHERE p.prosecdef"),
        scalar_i64(
            &mut c,
            "SELECT count(*) FROM pg_proc p JOIN pg_depend d ON d.objid = p.oid AND d.deptype = 'e' \
             WHERE p.prosecdef AND 'search_path=pg_catalog, pg_temp' = ANY (p.proconfig)"
        ),
        "every SECURITY DEFINER function pins its search_path"
    );
}

/// The owner of the extension's schema (for `public`, the database owner) renamed it and made
/// a new schema of the old name, holding an `outbox_attach` and an `outbox_attachments` of its
/// own: the DDL checks, SECURITY DEFINER and naming them through the schema's name, ran that
/// `outbox_attach` as the extension owner, a superuser. Renaming the schema is refused.
#[test]
fn the_schema_owner_cannot_rename_the_extensions_schema_to_plant_objects() {
    let cluster = shared();
    let mut admin = cluster.connect("postgres");
    admin.batch_execute("CREATE ROLE mallory LOGIN").unwrap();
    admin.batch_execute("CREATE DATABASE schema_owner OWNER mallory").unwrap();
    let mut c = cluster.connect("schema_owner");
    c.batch_execute(
        "CREATE SCHEMA s AUTHORIZATION mallory;
         CREATE EXTENSION outbox SCHEMA s;
         CREATE TABLE public.mine (id int PRIMARY KEY);
         ALTER TABLE public.mine OWNER TO mallory;
         SELECT s.outbox_attach('public.mine');",
    )
    .unwrap();
    let mut mallory = connect_as("schema_owner", "mallory");
    for (client, who) in [(&mut mallory, "the schema's owner"), (&mut c, "a superuser")] {
        let message = error_of(client, "ALTER SCHEMA s RENAME TO s_real");
        assert!(message.contains("schema s holds extension outbox and cannot be renamed"), "{who}: {message}");
    }
    mallory
        .batch_execute(
            "CREATE SCHEMA s2; ALTER SCHEMA s2 RENAME TO s3;
             ALTER TABLE public.mine ADD COLUMN x int;
             INSERT INTO public.mine VALUES (1, 1);",
        )
        .expect("other schemas and the DDL checks are unaffected");
    c.batch_execute("ALTER SCHEMA s OWNER TO postgres").expect("a new owner keeps the name");
    assert_eq!(scalar_i64(&mut c, "SELECT count(*) FROM pg_roles WHERE rolname = 'mallory' AND rolsuper"), 0);
    assert_eq!(scalar_i64(&mut c, "SELECT count(*) FROM s.outbox_events"), 1);
}

/// The DDL event trigger reads the catalog under the caller's search_path, partly as the
/// extension owner: a type named there (a domain whose CHECK runs for each value cast to it)
/// would run the caller's code with the owner's rights. Every type it names is qualified.
#[test]
fn partition_ddl_ignores_hostile_types_on_the_callers_search_path() {
    let cluster = shared();
    let db = cluster.database("hostile_types");
    let mut c = cluster.connect(&db);
    c.batch_execute(
        "CREATE TABLE public.attack_log (what text);
         CREATE SCHEMA evil;
         CREATE FUNCTION evil.pwn(pg_catalog.text) RETURNS boolean LANGUAGE sql
             AS $$ INSERT INTO public.attack_log VALUES ('called') RETURNING true $$;
         CREATE DOMAIN evil.text AS pg_catalog.text CHECK (evil.pwn(VALUE));
         CREATE DOMAIN evil.oid AS pg_catalog.oid CHECK (evil.pwn(VALUE::pg_catalog.text));
         CREATE DOMAIN evil.regclass AS pg_catalog.regclass CHECK (evil.pwn(VALUE::pg_catalog.text));
         CREATE TABLE public.parts (id bigint PRIMARY KEY) PARTITION BY RANGE (id);
         CREATE TABLE public.parts_a PARTITION OF public.parts FOR VALUES FROM (0) TO (10);
         SELECT outbox_attach('public.parts');
         SET search_path = evil, pg_catalog;
         CREATE TABLE public.parts_b PARTITION OF public.parts FOR VALUES FROM (10) TO (20);
         INSERT INTO public.parts VALUES (1), (11);
         TRUNCATE public.parts_b;
         ALTER TABLE public.parts DETACH PARTITION public.parts_a;
         DROP TABLE public.parts_b;
         RESET search_path;",
    )
    .unwrap();
    let calls: Vec<String> = c.query("SELECT what FROM public.attack_log", &[]).unwrap().iter().map(|r| r.get(0)).collect();
    assert!(calls.is_empty(), "hostile types were used: {calls:?}");
    assert_eq!(scalar_i64(&mut c, "SELECT count(*) FROM outbox_events WHERE type = 'EMBED_DELETE'"), 2, "TRUNCATE of parts_b, DETACH of parts_a");
}
