//! `ALTER EXTENSION outbox UPDATE` from the previous releases, 0.9.0, 0.8.0, 0.7.0, 0.6.0, 0.5.0, 0.4.0, 0.3.0, 0.2.0 and 0.1.0 (through every script),
//! with live data: events processed, pending, in flight and dead, in two subscriptions, on a
//! table attached before the update. The install scripts of the releases are kept in
//! tests/fixtures as they were released; the test puts them next to the current one.
#![cfg(not(feature = "pg_test"))] // run by scripts/test.sh against the installed extension, not by cargo pgrx test

mod common;

use std::path::PathBuf;
use std::process::Command;

use common::*;

const CURRENT: &str = env!("CARGO_PKG_VERSION");

fn install_release_script(release: &str) {
    let sharedir = Command::new(std::env::var("PG_CONFIG").unwrap_or_else(|_| "/usr/lib/postgresql/15/bin/pg_config".into()))
        .arg("--sharedir")
        .output()
        .expect("pg_config runs");
    let target = PathBuf::from(String::from_utf8(sharedir.stdout).unwrap().trim()).join(format!("extension/outbox--{release}.sql"));
    let fixture = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join(format!("tests/fixtures/outbox--{release}.sql"));
    std::fs::copy(&fixture, &target)
        .unwrap_or_else(|e| panic!("cannot copy {} to {}: {e} (run as a user who can write there)", fixture.display(), target.display()));
}

/// Everything the extension owns, as text: each member object with its definition, columns,
/// indexes and privileges. An upgraded database must match a fresh install line for line.
const CATALOG: &str = "
    WITH ext AS (SELECT oid FROM pg_extension WHERE extname = 'outbox'),
    members AS (
        SELECT d.classid, d.objid FROM pg_depend d, ext
        WHERE d.refclassid = 'pg_extension'::regclass AND d.refobjid = ext.oid AND d.deptype = 'e')
    SELECT line FROM (
        SELECT pg_describe_object(m.classid, m.objid, 0) AS line FROM members m
        UNION ALL
        SELECT 'definition of ' || p.oid::regprocedure || ': ' || pg_get_functiondef(p.oid) || ' acl ' || coalesce(p.proacl::text, '-')
        FROM members m JOIN pg_proc p ON m.classid = 'pg_proc'::regclass AND p.oid = m.objid WHERE p.prokind <> 'a'
        UNION ALL
        SELECT 'relation ' || c.relname || ' ' || c.relkind::text || ' acl ' || coalesce(c.relacl::text, '-')
            || coalesce(' view ' || pg_get_viewdef(c.oid), '')
        FROM members m JOIN pg_class c ON m.classid = 'pg_class'::regclass AND c.oid = m.objid
        UNION ALL
        SELECT 'column ' || c.relname || '.' || a.attname || ' ' || format_type(a.atttypid, a.atttypmod)
            || CASE WHEN a.attnotnull THEN ' not null' ELSE '' END
            || coalesce(' default ' || pg_get_expr(ad.adbin, ad.adrelid), '')
        FROM members m JOIN pg_class c ON m.classid = 'pg_class'::regclass AND c.oid = m.objid AND c.relkind IN ('r', 'p', 'v')
        JOIN pg_attribute a ON a.attrelid = c.oid AND a.attnum > 0 AND NOT a.attisdropped
        LEFT JOIN pg_attrdef ad ON ad.adrelid = c.oid AND ad.adnum = a.attnum
        UNION ALL
        SELECT 'index ' || pg_get_indexdef(i.indexrelid)
        FROM members m JOIN pg_index i ON m.classid = 'pg_class'::regclass AND i.indrelid = m.objid
        UNION ALL
        SELECT 'constraint ' || co.conrelid::regclass || ' ' || pg_get_constraintdef(co.oid)
        FROM members m JOIN pg_constraint co ON m.classid = 'pg_class'::regclass AND co.conrelid = m.objid
        UNION ALL
        SELECT 'event trigger ' || e.evtname || ' on ' || e.evtevent || ' ' || e.evtfoid::regproc || ' ' || coalesce(e.evttags::text, '-')
        FROM members m JOIN pg_event_trigger e ON m.classid = 'pg_event_trigger'::regclass AND e.oid = m.objid
    ) all_lines ORDER BY line";

/// Each subscription's pending, in-flight, retrying and dead counts, as one line.
fn backlog(c: &mut Client) -> Vec<String> {
    let sql = "SELECT concat_ws(' ', subscription, pending, in_flight, retrying, dead) FROM outbox_backlog ORDER BY 1";
    c.query(sql, &[]).unwrap().iter().map(|r| r.get(0)).collect()
}

fn catalog(c: &mut Client) -> Vec<String> {
    c.query(CATALOG, &[]).unwrap().iter().map(|r| r.get(0)).collect()
}

/// The capture triggers on `chunks`, without the attachment generation they carry.
fn capture_triggers(c: &mut Client) -> Vec<String> {
    let sql = "SELECT regexp_replace(pg_get_triggerdef(oid), 'outbox_capture\\(''[0-9]+''\\)', 'outbox_capture(N)') \
               FROM pg_trigger WHERE tgrelid = 'chunks'::regclass ORDER BY tgname";
    c.query(sql, &[]).unwrap().iter().map(|r| r.get(0)).collect()
}

const SETUP: &str = "CREATE TABLE chunks (id bigint PRIMARY KEY, doc_id int, content text, embedding real[]);
                     SELECT outbox_attach('chunks', payload_columns => ARRAY['content']);";

/// Puts back the insert and delete triggers that `outbox_attach` of 0.1.0 and 0.2.0 created
/// (this library's `outbox_attach` creates its own).
const RELEASED_TRIGGERS: &str = "DO $$
    DECLARE generation text := (SELECT generation FROM outbox_attachments WHERE source = 'chunks'::regclass);
    BEGIN
        DROP TRIGGER outbox_capture_inserts ON chunks;
        DROP TRIGGER outbox_capture_deletes ON chunks;
        DROP TRIGGER outbox_capture_statement ON chunks;
        EXECUTE format('CREATE TRIGGER outbox_capture_rows AFTER INSERT OR DELETE ON chunks
                        FOR EACH ROW EXECUTE FUNCTION outbox_capture(%L)', generation);
        EXECUTE format('CREATE TRIGGER outbox_capture_statement AFTER INSERT OR UPDATE OR DELETE ON chunks
                        FOR EACH STATEMENT EXECUTE FUNCTION outbox_capture(%L)', generation);
    END $$;";

#[test]
fn update_from_the_previous_release_keeps_every_event_and_matches_a_fresh_install() {
    update_from("0.9.0", Triggers::Current);
}

#[test]
fn update_from_the_release_before_partition_ddl_was_captured() {
    update_from("0.8.0", Triggers::Current);
}

#[test]
fn update_from_the_release_before_subscriptions_recorded_roles() {
    update_from("0.7.0", Triggers::Current);
}

#[test]
fn update_from_the_release_before_the_backlog_view_was_replaced() {
    update_from("0.6.0", Triggers::Current);
}

#[test]
fn update_from_the_release_whose_claim_was_written_in_plpgsql() {
    update_from("0.5.0", Triggers::Current);
}

#[test]
fn update_from_the_release_whose_claim_looked_payloads_up_by_id() {
    update_from("0.4.0", Triggers::Current);
}

#[test]
fn update_from_the_release_with_the_txid_index_drops_it() {
    update_from("0.3.0", Triggers::Current);
}

#[test]
fn update_from_the_release_with_row_triggers_replaces_them() {
    update_from("0.2.0", Triggers::Released);
}

#[test]
fn update_from_the_first_release_goes_through_every_script() {
    update_from("0.1.0", Triggers::Released);
}

/// 0.8.0 calls a function sink only while its function has the owner recorded when it was
/// subscribed, and matches a consumer_role by oid; the update records the roles the
/// subscriptions made before name.
#[test]
fn update_to_0_8_0_records_the_roles_subscriptions_name() {
    install_release_script("0.7.0");
    let cluster = shared();
    let mut admin = cluster.connect("postgres");
    admin.batch_execute("DROP DATABASE IF EXISTS function_owner_update").unwrap();
    admin.batch_execute("CREATE DATABASE function_owner_update").unwrap();
    let mut c = cluster.connect("function_owner_update");
    c.batch_execute(
        "CREATE EXTENSION outbox VERSION '0.7.0';
         CREATE ROLE fn_owner_update;
         CREATE FUNCTION public.apply(batch jsonb) RETURNS void LANGUAGE sql AS 'SELECT';
         ALTER FUNCTION public.apply(jsonb) OWNER TO fn_owner_update;
         SELECT outbox_subscribe('applied', 'function', '{\"function\": \"public.apply\"}');
         SELECT outbox_subscribe('pulled', options => '{\"consumer_role\": \"fn_owner_update\"}');
         ALTER EXTENSION outbox UPDATE;
         -- the session that ran the update knows it has 0.8.0's SQL now
         SELECT outbox_subscribe('pulled_after', options => '{\"consumer_role\": \"fn_owner_update\"}');",
    )
    .unwrap();
    let after: Option<String> =
        c.query_one("SELECT consumer_role::text FROM outbox_subscriptions WHERE name = 'pulled_after'", &[]).unwrap().get(0);
    assert_eq!(after.as_deref(), Some("fn_owner_update"));
    let roles: Vec<(String, Option<String>, Option<String>)> = c
        .query(
            "SELECT name, function_owner::text, consumer_role::text FROM outbox_subscriptions WHERE name IN ('applied', 'pulled') ORDER BY name",
            &[],
        )
        .unwrap()
        .iter()
        .map(|r| (r.get(0), r.get(1), r.get(2)))
        .collect();
    assert_eq!(
        roles,
        [("applied".to_string(), Some("fn_owner_update".to_string()), None), ("pulled".to_string(), None, Some("fn_owner_update".to_string()))]
    );
}

/// Which capture triggers the release put on an attached table.
#[derive(PartialEq)]
enum Triggers {
    /// this library's
    Current,
    /// RELEASED_TRIGGERS
    Released,
}

fn update_from(previous: &str, triggers: Triggers) {
    install_release_script(previous);
    let cluster = shared();
    let mut admin = cluster.connect("postgres");
    let suffix = previous.replace('.', "_");
    let (upgraded, fresh_db) = (format!("upgraded_{suffix}"), format!("fresh_{suffix}"));
    for db in [&upgraded, &fresh_db] {
        admin.batch_execute(&format!("DROP DATABASE IF EXISTS {db}")).unwrap();
        admin.batch_execute(&format!("CREATE DATABASE {db}")).unwrap();
    }
    let mut fresh = cluster.connect(&fresh_db);
    fresh.batch_execute("CREATE EXTENSION outbox").unwrap();
    fresh.batch_execute(SETUP).unwrap();

    // the rows are captured by the triggers of the previous release, run by this library
    let mut c = cluster.connect(&upgraded);
    // A transaction of its own: 0.1.0 created `default` so that events written in the same
    // transaction could be skipped (the first-base bug 0.2.0 fixed), depending on when other
    // tests' transactions finish.
    c.batch_execute(&format!("CREATE EXTENSION outbox VERSION '{previous}'")).unwrap();
    let released_triggers = if triggers == Triggers::Released { RELEASED_TRIGGERS } else { "" };
    c.batch_execute(&format!(
        "{SETUP}
         {released_triggers}
         SELECT outbox_subscribe('search', options => '{{\"max_attempts\": 1}}');
         INSERT INTO chunks SELECT g, 1, 'v1', '{{1}}' FROM generate_series(1, 10) g;"
    ))
    .unwrap();
    if triggers == Triggers::Released {
        assert_ne!(capture_triggers(&mut c), capture_triggers(&mut fresh), "the previous release's triggers differ");
    }
    // default: 3 processed, 2 in flight, 5 pending; search: 1 dead, 9 pending
    let processed = ids(&claim(&mut c, "SELECT * FROM outbox_claim(3)"));
    c.execute("SELECT outbox_ack($1)", &[&processed]).unwrap();
    let in_flight = ids(&claim(&mut c, "SELECT * FROM outbox_claim(2, lease => '1 hour')"));
    let dead = ids(&claim(&mut c, "SELECT * FROM outbox_claim(1, 'search')"));
    c.execute("SELECT outbox_fail($1, 'rejected', 'search')", &[&dead]).unwrap();
    let before = backlog(&mut c);
    assert_eq!(before, ["default 5 2 0 0", "search 9 0 0 1"]);

    c.batch_execute("ALTER EXTENSION outbox UPDATE").unwrap();
    let version: String = c.query_one("SELECT extversion FROM pg_extension WHERE extname = 'outbox'", &[]).unwrap().get(0);
    assert_eq!(version, CURRENT);
    let after = backlog(&mut c);
    assert_eq!(after, before, "the backlog is unchanged by the update");
    let fresh_catalog = catalog(&mut fresh);
    assert!(fresh_catalog.iter().filter(|line| line.starts_with("definition of outbox_claim(")).count() == 1, "{fresh_catalog:?}");
    assert_eq!(catalog(&mut c), fresh_catalog, "the updated extension is the fresh install's");
    assert_eq!(capture_triggers(&mut c), capture_triggers(&mut fresh), "the attached table has this release's triggers");

    // everything goes on where it was
    assert_eq!(c.query_one("SELECT outbox_ack($1)", &[&in_flight]).unwrap().get::<_, i32>(0), 2, "the in-flight batch acks");
    let rest = claim(&mut c, "SELECT * FROM outbox_claim(100)");
    assert_eq!(rest.iter().map(|e| e.2).collect::<Vec<_>>(), [6, 7, 8, 9, 10], "the pending events, nothing twice");
    c.execute("SELECT outbox_ack($1)", &[&ids(&rest)]).unwrap();
    assert_eq!(scalar_i64(&mut c, "SELECT outbox_requeue_dead('search')"), 1);
    let search = claim(&mut c, "SELECT * FROM outbox_claim(100, 'search')");
    assert_eq!(search.iter().map(|e| e.2).collect::<Vec<_>>(), (1..=10).collect::<Vec<_>>(), "the requeued dead letter and the rest");
    c.batch_execute(
        "INSERT INTO chunks VALUES (11, 1, 'new', '{1}'); UPDATE chunks SET content = 'v2' WHERE id = 1;
         DELETE FROM chunks WHERE id = 2",
    )
    .unwrap();
    let new = claim(&mut c, "SELECT * FROM outbox_claim(100)");
    assert_eq!(
        new.iter().map(|e| (e.1.as_str(), e.2)).collect::<Vec<_>>(),
        [("EMBED_UPSERT", 11), ("EMBED_UPSERT", 1), ("EMBED_DELETE", 2)]
    );
    c.batch_execute("SELECT outbox_subscribe('late', from_start => true)").unwrap();
    assert_eq!(claim(&mut c, "SELECT * FROM outbox_claim(100, 'late')").len(), 11, "each row's first retained event");
}

/// A dump restored into another database captures as the original did: the attachments are
/// dumped (the capture triggers come with their tables), and the update trigger's condition
/// reads back as written (a `*=` between rows cast to record lost its casts when printed, and
/// every restore and pg_upgrade failed on it).
#[test]
fn a_dump_restored_into_another_database_captures_as_the_original() {
    let cluster = shared();
    let mut admin = cluster.connect("postgres");
    for db in ["dumped", "restored"] {
        admin.batch_execute(&format!("DROP DATABASE IF EXISTS {db}")).unwrap();
    }
    let mut c = cluster.connect(&cluster.database("dumped"));
    c.batch_execute(SETUP).unwrap();
    let file = cluster.dir.join("outbox.dump");
    cluster.client_program("pg_dump", &["-Fc", "-f", &file.display().to_string(), "dumped"]);
    admin.batch_execute("CREATE DATABASE restored").unwrap();
    cluster.client_program("pg_restore", &["--exit-on-error", "-d", "restored", &file.display().to_string()]);

    let mut r = cluster.connect("restored");
    assert_eq!(capture_triggers(&mut r), capture_triggers(&mut c), "every capture trigger, the update trigger's condition included");
    r.batch_execute(
        "INSERT INTO chunks VALUES (1, 1, 'v1', '{1}'); UPDATE chunks SET content = 'v2' WHERE id = 1;
         UPDATE chunks SET content = 'v2' WHERE id = 1;",
    )
    .unwrap();
    let events = claim(&mut r, "SELECT * FROM outbox_claim(10)");
    assert_eq!(events.iter().map(|e| (e.1.as_str(), e.2)).collect::<Vec<_>>(), [("EMBED_UPSERT", 1)], "the row's first event");
    r.execute("SELECT outbox_ack($1)", &[&ids(&events)]).unwrap();
    assert_eq!(claim(&mut r, "SELECT * FROM outbox_claim(10)").len(), 1, "the update that changed content, not the one that did not");
}
