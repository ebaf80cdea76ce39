//! SQL behaviour that can be checked inside one transaction: capture, payload shape,
//! validation errors and privileges. Claim/ack/fail need committed events and other sessions,
//! so they are tested from outside in `tests/`.

#[pgrx::pg_schema]
mod tests {
    use pgrx::prelude::*;
    use serde_json::{json, Value};

    fn run(sql: &str) {
        Spi::run(sql).unwrap_or_else(|e| panic!("{sql}: {e}"));
    }

    fn value(sql: &str) -> Value {
        Spi::get_one::<pgrx::JsonB>(sql).unwrap_or_else(|e| panic!("{sql}: {e}")).map(|j| j.0).unwrap_or(Value::Null)
    }

    fn count(sql: &str) -> i64 {
        Spi::get_one::<i64>(sql).unwrap_or_else(|e| panic!("{sql}: {e}")).unwrap_or(0)
    }

    /// (type, payload) of every event in id order.
    fn events() -> Value {
        value("SELECT coalesce(jsonb_agg(jsonb_build_array(type, payload) ORDER BY id), '[]') FROM outbox_events")
    }

    /// (type, key id, payload column `column`) of every event after id `since`, in id order.
    fn changes_since(since: i64, column: &str) -> Value {
        value(&format!(
            "SELECT jsonb_agg(jsonb_build_array(type, payload->'key'->'id', payload->'data'->'{column}') ORDER BY id) \
             FROM outbox_events WHERE id > {since}"
        ))
    }

    /// (type, key id) of every event `statement` captured, in id order.
    fn captured_by(statement: &str) -> Value {
        let since = count("SELECT coalesce(max(id), 0) FROM outbox_events");
        run(statement);
        value(&format!(
            "SELECT coalesce(jsonb_agg(jsonb_build_array(type, payload->'key'->'id') ORDER BY id), '[]') \
             FROM outbox_events WHERE id > {since}"
        ))
    }

    fn chunks() {
        run("CREATE TABLE chunks (id bigint PRIMARY KEY, doc_id int, content text, embedding real[], secret text)");
    }

    #[pg_test]
    fn default_subscription_exists() {
        assert_eq!(count("SELECT count(*) FROM outbox_subscriptions WHERE name = 'default' AND sink = 'pull'"), 1);
    }

    #[pg_test]
    fn insert_update_delete_emit_lean_events() {
        chunks();
        run("SELECT outbox_attach('chunks')");
        run("INSERT INTO chunks VALUES (1, 10, 'a', '{1,2}', 's'), (2, 10, 'b', '{3,4}', 's')");
        run("UPDATE chunks SET content = 'a2' WHERE id = 1");
        run("DELETE FROM chunks WHERE id = 2");
        assert_eq!(
            events(),
            json!([
                ["EMBED_UPSERT", {"table": "public.chunks", "key": {"id": 1}}],
                ["EMBED_UPSERT", {"table": "public.chunks", "key": {"id": 2}}],
                ["EMBED_UPSERT", {"table": "public.chunks", "key": {"id": 1}}],
                ["EMBED_DELETE", {"table": "public.chunks", "key": {"id": 2}}],
            ])
        );
    }

    #[pg_test]
    fn payload_holds_only_key_and_payload_columns() {
        chunks();
        run("SELECT outbox_attach('chunks', payload_columns => ARRAY['doc_id', 'content', 'embedding'])");
        run("INSERT INTO chunks VALUES (1, 10, 'hello \"x\"', '{0.5,-1.25}', 'top secret')");
        run("DELETE FROM chunks");
        assert_eq!(
            events(),
            json!([
                ["EMBED_UPSERT", {"table": "public.chunks", "key": {"id": 1},
                                  "data": {"doc_id": 10, "content": "hello \"x\"", "embedding": [0.5, -1.25]}}],
                ["EMBED_DELETE", {"table": "public.chunks", "key": {"id": 1}}],
            ])
        );
        assert_eq!(count("SELECT count(*) FROM outbox_log WHERE keys::text LIKE '%secret%' OR data::text LIKE '%secret%'"), 0);
    }

    #[pg_test]
    fn payload_values_match_to_jsonb() {
        run("CREATE TABLE typed (id uuid PRIMARY KEY, n numeric, f float8, b boolean, t timestamptz, j jsonb, \
             tags text[], v varchar(10), c char(3), i2 int2, nothing text)");
        run("SELECT outbox_attach('typed', payload_columns => ARRAY['n','f','b','t','j','tags','v','c','i2','nothing'])");
        run("INSERT INTO typed VALUES ('6f1e9a52-8f2b-4c3e-9d7a-0a1b2c3d4e5f', 12.50, 'NaN', true, \
             '2024-05-06 07:08:09+00', '{\"k\": [1, null]}', ARRAY['x', 'y\"z'], 'vc', 'ab', -3, NULL)");
        let expected = value(
            "SELECT jsonb_build_object('table', 'public.typed', 'key', jsonb_build_object('id', id), \
                    'data', jsonb_build_object('n', n, 'f', f, 'b', b, 't', t, 'j', j, 'tags', tags, 'v', v, \
                                               'c', c, 'i2', i2, 'nothing', nothing)) FROM typed",
        );
        assert_eq!(value("SELECT payload FROM outbox_events"), expected);
    }

    #[pg_test]
    fn updates_of_unwatched_columns_and_identical_rows_emit_nothing() {
        chunks();
        run("SELECT outbox_attach('chunks', watch_columns => ARRAY['content', 'embedding'])");
        run("INSERT INTO chunks VALUES (1, 10, 'a', '{1}', 's')");
        run("UPDATE chunks SET secret = 'changed', doc_id = 11");
        run("UPDATE chunks SET content = content, embedding = embedding");
        assert_eq!(count("SELECT count(*) FROM outbox_events"), 1);
        run("UPDATE chunks SET embedding = '{2}'");
        assert_eq!(count("SELECT count(*) FROM outbox_events"), 2);

        run("SELECT outbox_attach('chunks')"); // every column watched
        run("UPDATE chunks SET secret = secret");
        assert_eq!(count("SELECT count(*) FROM outbox_events"), 2, "identical row");
        run("UPDATE chunks SET secret = 'again'");
        assert_eq!(count("SELECT count(*) FROM outbox_events"), 3);
    }

    /// A type's equality can call values equal whose JSON differs; an update between them is
    /// a change the copy must see.
    #[pg_test]
    fn updates_that_change_only_how_a_value_is_written_are_captured() {
        run("CREATE COLLATION outbox_ci (provider = icu, locale = 'und-u-ks-level2', deterministic = false)");
        run("CREATE TABLE notes (name text COLLATE outbox_ci PRIMARY KEY, amount numeric, meta jsonb)");
        run("SELECT outbox_attach('notes', payload_columns => ARRAY['amount', 'meta'])");
        run(r#"INSERT INTO notes VALUES ('key', 1.0, '{"x": 1.0}')"#);
        run("UPDATE notes SET amount = 1.000");
        run(r#"UPDATE notes SET meta = '{"x": 1}'"#);
        run("UPDATE notes SET name = 'KEY'");
        run("UPDATE notes SET amount = amount"); // identical: nothing
        assert_eq!(
            value("SELECT jsonb_agg(jsonb_build_array(type, payload->'key'->>'name', payload->'data') ORDER BY id) FROM outbox_events"),
            json!([
                ["EMBED_UPSERT", "key", {"amount": 1.0, "meta": {"x": 1.0}}],
                ["EMBED_UPSERT", "key", {"amount": 1.000, "meta": {"x": 1.0}}],
                ["EMBED_UPSERT", "key", {"amount": 1.000, "meta": {"x": 1}}],
                ["EMBED_DELETE", "key", null],
                ["EMBED_UPSERT", "KEY", {"amount": 1.000, "meta": {"x": 1}}],
            ])
        );
    }

    #[pg_test]
    fn key_change_is_a_delete_then_an_upsert() {
        run("CREATE TABLE chunks (id bigint PRIMARY KEY DEFERRABLE INITIALLY DEFERRED, doc_id int, content text, \
             embedding real[], secret text)");
        run("SELECT outbox_attach('chunks', watch_columns => ARRAY['content'])");
        run("INSERT INTO chunks VALUES (1, 10, 'a', '{1}', 's'), (2, 10, 'b', '{1}', 's')");
        run("DELETE FROM outbox_log");
        run("UPDATE chunks SET id = 3 - id"); // swaps keys 1 and 2
        let got = events();
        let ops: Vec<(String, i64)> = got
            .as_array()
            .unwrap()
            .iter()
            .map(|e| (e[0].as_str().unwrap().to_string(), e[1]["key"]["id"].as_i64().unwrap()))
            .collect();
        assert_eq!(ops.len(), 4);
        assert!(ops[..2].iter().all(|(t, _)| t == "EMBED_DELETE"), "{ops:?}");
        assert!(ops[2..].iter().all(|(t, _)| t == "EMBED_UPSERT"), "{ops:?}");
    }

    #[pg_test]
    fn truncate_emits_one_event_and_prefix_is_used() {
        chunks();
        run("SELECT outbox_attach('chunks', event_prefix => 'DOC')");
        run("INSERT INTO chunks SELECT g, 1, 'x', '{1}', 's' FROM generate_series(1, 5) g");
        run("TRUNCATE chunks");
        assert_eq!(count("SELECT count(*) FROM outbox_events WHERE type = 'DOC_UPSERT'"), 5);
        assert_eq!(value("SELECT jsonb_agg(payload) FROM outbox_events WHERE type = 'DOC_TRUNCATE'"), json!([{"table": "public.chunks"}]));
    }

    #[pg_test]
    fn key_columns_replace_the_primary_key() {
        run("CREATE TABLE nokey (doc text, part int, body text)");
        run("SELECT outbox_attach('nokey', key_columns => ARRAY['doc', 'part'])");
        run("INSERT INTO nokey VALUES ('d', 1, 'x')");
        assert_eq!(value("SELECT payload FROM outbox_events"), json!({"table": "public.nokey", "key": {"doc": "d", "part": 1}}));
    }

    #[pg_test]
    fn bulk_statements_share_log_rows() {
        chunks();
        run("SELECT outbox_attach('chunks')");
        run("INSERT INTO chunks SELECT g, 1, 'x', '{1}', 's' FROM generate_series(1, 5000) g");
        assert_eq!(count("SELECT count(*) FROM outbox_events"), 5000);
        assert_eq!(count("SELECT count(*) FROM outbox_log"), 2, "4096 events per log row");
        assert_eq!(count("SELECT count(DISTINCT id) FROM outbox_events"), 5000);
    }

    #[pg_test]
    fn rolled_back_subtransaction_leaves_no_event() {
        chunks();
        run("SELECT outbox_attach('chunks')");
        run("DO $$ BEGIN
                INSERT INTO chunks VALUES (1, 1, 'kept', '{1}', 's');
                BEGIN
                    INSERT INTO chunks VALUES (2, 1, 'lost', '{1}', 's');
                    RAISE EXCEPTION 'roll back';
                EXCEPTION WHEN OTHERS THEN NULL;
                END;
             END $$");
        assert_eq!(value("SELECT jsonb_agg(payload->'key') FROM outbox_events"), json!([{"id": 1}]));
    }

    /// SQL that a BEFORE trigger runs on the same table changes its rows before the statement
    /// that fired the trigger, and its events come first: a row replaced by a BEFORE INSERT
    /// row trigger, or a table emptied by a BEFORE INSERT statement trigger, is deleted before
    /// the insert (ordered by command id, the insert came first and the copy lost the row).
    #[pg_test]
    fn a_before_triggers_statement_on_the_same_table_comes_before_the_statement_that_fired_it() {
        run("CREATE TABLE tb (id int PRIMARY KEY, v text)");
        run("SELECT outbox_attach('tb', payload_columns => ARRAY['v'])");
        run("INSERT INTO tb VALUES (1, 'one'), (2, 'two')");
        run("CREATE FUNCTION replace_row() RETURNS trigger LANGUAGE plpgsql AS $$
             BEGIN DELETE FROM tb WHERE id = NEW.id; RETURN NEW; END $$");
        run("CREATE FUNCTION empty_table() RETURNS trigger LANGUAGE plpgsql AS $$
             BEGIN DELETE FROM tb WHERE v LIKE 'old%'; RETURN NULL; END $$");
        run("CREATE TRIGGER replace_row BEFORE INSERT ON tb FOR EACH ROW EXECUTE FUNCTION replace_row()");
        run("CREATE TRIGGER empty_table BEFORE INSERT ON tb FOR EACH STATEMENT EXECUTE FUNCTION empty_table()");
        run("UPDATE tb SET v = 'old' WHERE id = 2");
        let since = count("SELECT max(id) FROM outbox_events");
        run("INSERT INTO tb VALUES (1, 'new'), (2, 'new')");
        assert_eq!(
            changes_since(since, "v"),
            json!([["EMBED_DELETE", 2, null], ["EMBED_DELETE", 1, null], ["EMBED_UPSERT", 1, "new"], ["EMBED_UPSERT", 2, "new"]])
        );
        assert_eq!(value("SELECT jsonb_object_agg(id, v) FROM tb"), json!({"1": "new", "2": "new"}));
    }

    /// A statement that deletes key 1 and moves key 2 to 1 leaves a row 1: its deletes come
    /// first, also when a foreign-key check or another AFTER trigger ran SQL between its rows
    /// and its transition table (the deleted rows' events were filed under that SQL's later
    /// command id, after the upsert, and the copy lost row 1).
    #[pg_test]
    fn a_statements_deletes_come_first_when_a_foreign_key_check_or_trigger_ran_sql_meanwhile() {
        run("CREATE TABLE docs (id int PRIMARY KEY)");
        run("INSERT INTO docs VALUES (1), (2)");
        run("CREATE TABLE audit (op text)");
        run("CREATE FUNCTION audit() RETURNS trigger LANGUAGE plpgsql AS $$ BEGIN INSERT INTO audit VALUES (TG_OP); RETURN NULL; END $$");
        run("CREATE TABLE m (id int PRIMARY KEY, doc int REFERENCES docs, a text)");
        run("CREATE TABLE n (id int PRIMARY KEY, a text)");
        run("CREATE TRIGGER audit AFTER UPDATE ON n FOR EACH ROW EXECUTE FUNCTION audit()");
        run("SELECT outbox_attach('m', payload_columns => ARRAY['a'])");
        run("SELECT outbox_attach('n', payload_columns => ARRAY['a'])");
        let statements = [
            // the update changes doc: its foreign-key check runs a query
            "MERGE INTO m USING (VALUES (1, 'd'), (2, 'u')) s(k, v) ON m.id = s.k              WHEN MATCHED AND s.v = 'd' THEN DELETE WHEN MATCHED THEN UPDATE SET id = 1, doc = 2",
            "MERGE INTO n USING (VALUES (1, 'd'), (2, 'u')) s(k, v) ON n.id = s.k              WHEN MATCHED AND s.v = 'd' THEN DELETE WHEN MATCHED THEN UPDATE SET id = 1",
        ];
        for (table, statement) in ["m", "n"].into_iter().zip(statements) {
            let columns = if table == "m" { "1, 1, 'one'), (2, 1, 'two'" } else { "1, 'one'), (2, 'two'" };
            run(&format!("INSERT INTO {table} VALUES ({columns})"));
            let since = count("SELECT coalesce(max(id), 0) FROM outbox_events");
            run(statement);
            assert_eq!(
                changes_since(since, "a"),
                json!([["EMBED_DELETE", 2, null], ["EMBED_DELETE", 1, null], ["EMBED_UPSERT", 1, "two"]]),
                "{statement}"
            );
            assert_eq!(value(&format!("SELECT jsonb_agg(jsonb_build_array(id, a)) FROM {table}")), json!([[1, "two"]]));
        }
        assert_eq!(count("SELECT count(*) FROM audit"), 1, "the trigger ran");
    }

    /// The parts of a statement with writable CTEs fire their statement triggers one after the
    /// other, the CTE's first: an insert of key 1 in the CTE and a delete of the old key 1 in the
    /// main statement were written in that order, and the copy lost the row.
    #[pg_test]
    fn a_statements_deletes_come_first_across_its_writable_ctes() {
        run("CREATE TABLE cte (id int PRIMARY KEY DEFERRABLE, a text)");
        run("SELECT outbox_attach('cte', payload_columns => ARRAY['a'])");
        run("INSERT INTO cte VALUES (1, 'old'), (2, 'two')");
        let since = count("SELECT max(id) FROM outbox_events");
        run("WITH i AS (INSERT INTO cte VALUES (1, 'new'), (3, 'three') RETURNING id) DELETE FROM cte WHERE id IN (SELECT id FROM i)");
        assert_eq!(
            changes_since(since, "a"),
            json!([["EMBED_DELETE", 1, null], ["EMBED_UPSERT", 1, "new"], ["EMBED_UPSERT", 3, "three"]])
        );
        assert_eq!(value("SELECT jsonb_object_agg(id, a) FROM cte"), json!({"1": "new", "2": "two", "3": "three"}));
    }

    /// A table with inheritance children is captured for its own rows, and an attached child
    /// for its rows, whichever table a statement names. (The parent's transition table held
    /// the child's rows too: a delete of the child's row 3 through the parent was captured as
    /// a delete of the parent's row 3.) A table that gains a child after it is attached, by
    /// CREATE TABLE … INHERITS or ALTER TABLE … INHERIT, switches over.
    #[pg_test]
    fn inheritance_parents_and_children_are_each_captured_for_their_own_rows() {
        run("CREATE TABLE ip (id int PRIMARY KEY, a text)");
        run("CREATE TABLE other (id int PRIMARY KEY, a text)");
        run("SELECT outbox_attach('ip', payload_columns => ARRAY['a'])");
        run("SELECT outbox_attach('other', payload_columns => ARRAY['a'])");
        run("CREATE TABLE ic (PRIMARY KEY (id)) INHERITS (ip)");
        run("CREATE TABLE ic2 (id int PRIMARY KEY, a text)");
        run("ALTER TABLE ic2 INHERIT other");
        for child in ["ic", "ic2"] {
            run(&format!("SELECT outbox_attach('{child}', payload_columns => ARRAY['a'])"));
        }
        let since = count("SELECT coalesce(max(id), 0) FROM outbox_events");
        run("INSERT INTO ip VALUES (3, 'parent row 3')");
        run("INSERT INTO ic VALUES (3, 'child row 3'), (4, 'child row 4')");
        run("DELETE FROM ip WHERE a = 'child row 3'");
        run("UPDATE ip SET a = a || '!' WHERE id = 4");
        run("INSERT INTO ic2 VALUES (5, 'child of other')");
        run("DELETE FROM other");
        assert_eq!(
            value(&format!(
                "SELECT jsonb_agg(jsonb_build_array(type, payload->>'table', payload->'key'->'id', payload->'data'->'a') ORDER BY id) \
                 FROM outbox_events WHERE id > {since}"
            )),
            json!([
                ["EMBED_UPSERT", "public.ip", 3, "parent row 3"],
                ["EMBED_UPSERT", "public.ic", 3, "child row 3"],
                ["EMBED_UPSERT", "public.ic", 4, "child row 4"],
                ["EMBED_DELETE", "public.ic", 3, null],
                ["EMBED_UPSERT", "public.ic", 4, "child row 4!"],
                ["EMBED_UPSERT", "public.ic2", 5, "child of other"],
                ["EMBED_DELETE", "public.ic2", 5, null],
            ])
        );
        // and a plain table again once it has left its hierarchy
        run("ALTER TABLE ic2 NO INHERIT other");
        assert_eq!(count("SELECT count(*) FROM pg_trigger WHERE tgrelid = 'other'::regclass AND tgname = 'outbox_capture_inserts'"), 1);
        assert_eq!(count("SELECT count(*) FROM pg_trigger WHERE tgrelid = 'ip'::regclass AND tgname = 'outbox_capture_rows'"), 1);
    }

    /// A user's AFTER trigger that writes to the table it fires on runs after the statement's
    /// changes, and its events come after the statement's, whichever fires first: the
    /// statement's are captured by its statement trigger (or by a row trigger whose name sorts
    /// after the user's). Captured first, the trigger's re-insert of a deleted key, or its
    /// second update of a row, was undone by the statement's older event, and the copy lost the
    /// row or kept a stale value. Partitioned tables (row triggers) too.
    #[pg_test]
    fn an_after_triggers_writes_to_its_own_table_come_after_the_statement_that_fired_it() {
        run("CREATE TABLE ta (id int PRIMARY KEY, v text)");
        run("CREATE TABLE tp (id int PRIMARY KEY, v text) PARTITION BY RANGE (id)");
        run("CREATE TABLE tp_1 PARTITION OF tp FOR VALUES FROM (0) TO (100)");
        for table in ["ta", "tp"] {
            run(&format!("SELECT outbox_attach('{table}', payload_columns => ARRAY['v'])"));
            run(&format!("INSERT INTO {table} VALUES (1, 'one'), (2, 'two'), (3, 'three')"));
            run(&format!(
                "CREATE FUNCTION keep_{table}() RETURNS trigger LANGUAGE plpgsql AS $$
                 BEGIN
                     IF TG_OP = 'DELETE' AND OLD.id = 1 THEN INSERT INTO {table} VALUES (1, 'kept'); END IF;
                     IF TG_OP = 'UPDATE' AND pg_trigger_depth() = 1 THEN UPDATE {table} SET v = v || '!' WHERE id = NEW.id; END IF;
                     RETURN NULL;
                 END $$"
            ));
            // "aa_": fires before the capture's row triggers
            run(&format!("CREATE TRIGGER aa_keep AFTER DELETE OR UPDATE ON {table} FOR EACH ROW EXECUTE FUNCTION keep_{table}()"));
            let since = count("SELECT coalesce(max(id), 0) FROM outbox_events");
            run(&format!("DELETE FROM {table} WHERE id IN (1, 3)"));
            run(&format!("UPDATE {table} SET v = 'new' WHERE id = 2"));
            // what a consumer applying the events in order ends with
            let replayed = value(&format!(
                "SELECT coalesce(jsonb_object_agg(k, d), '{{}}') FROM (
                     SELECT DISTINCT ON (payload->'key'->>'id') payload->'key'->>'id' AS k, type, payload->'data'->'v' AS d
                     FROM outbox_events WHERE id > {since} AND payload->>'table' = 'public.{table}'
                     ORDER BY payload->'key'->>'id', id DESC) last WHERE type = 'EMBED_UPSERT'"
            ));
            assert_eq!(replayed, json!({"1": "kept", "2": "new!"}), "{table}");
            assert_eq!(value(&format!("SELECT jsonb_object_agg(id, v) FROM {table}")), json!({"1": "kept", "2": "new!"}), "{table}");
        }
    }

    #[pg_test]
    fn other_triggers_read_the_same_transition_tables_whole() {
        chunks();
        run("SELECT outbox_attach('chunks')");
        run("CREATE TABLE audit (trigger text, op text, n bigint)");
        run("CREATE FUNCTION audit() RETURNS trigger LANGUAGE plpgsql AS $$
             BEGIN
                 IF TG_OP = 'INSERT' THEN
                     INSERT INTO audit SELECT TG_NAME, TG_OP, count(*) FROM inserted;
                 ELSE
                     INSERT INTO audit SELECT TG_NAME, TG_OP, count(*) FROM deleted;
                 END IF;
                 RETURN NULL;
             END $$");
        // one fires before the capture trigger and one after it (triggers fire in name order)
        for name in ["aa_audit", "zz_audit"] {
            run(&format!("CREATE TRIGGER {name}_i AFTER INSERT ON chunks REFERENCING NEW TABLE AS inserted FOR EACH STATEMENT EXECUTE FUNCTION audit()"));
            run(&format!("CREATE TRIGGER {name}_d AFTER DELETE ON chunks REFERENCING OLD TABLE AS deleted FOR EACH STATEMENT EXECUTE FUNCTION audit()"));
        }
        run("INSERT INTO chunks SELECT g, 1, 'x', '{1}', 's' FROM generate_series(1, 100) g");
        run("DELETE FROM chunks WHERE id <= 40");
        assert_eq!(
            value("SELECT jsonb_agg(jsonb_build_array(trigger, op, n) ORDER BY trigger, op DESC) FROM audit"),
            json!([["aa_audit_d", "DELETE", 40], ["aa_audit_i", "INSERT", 100], ["zz_audit_d", "DELETE", 40], ["zz_audit_i", "INSERT", 100]])
        );
        assert_eq!(count("SELECT count(*) FROM outbox_events WHERE type = 'EMBED_UPSERT'"), 100);
        assert_eq!(count("SELECT count(*) FROM outbox_events WHERE type = 'EMBED_DELETE'"), 40);
        assert_eq!(count("SELECT count(DISTINCT payload->'key') FROM outbox_events WHERE type = 'EMBED_DELETE' AND (payload->'key'->>'id')::int <= 40"), 40);
    }

    #[pg_test]
    fn cascaded_deletes_are_captured() {
        run("CREATE TABLE docs (id int PRIMARY KEY)");
        run("CREATE TABLE parts (id bigint PRIMARY KEY, doc_id int REFERENCES docs ON DELETE CASCADE)");
        run("SELECT outbox_attach('parts')");
        run("INSERT INTO docs VALUES (1), (2)");
        run("INSERT INTO parts SELECT g, 1 + g % 2 FROM generate_series(1, 6) g");
        run("DELETE FROM docs WHERE id = 1");
        assert_eq!(
            value("SELECT jsonb_agg((payload->'key'->>'id')::int ORDER BY (payload->'key'->>'id')::int) FROM outbox_events WHERE type = 'EMBED_DELETE'"),
            json!([2, 4, 6]),
            "the chunks of a deleted document"
        );
    }

    #[pg_test]
    fn merge_and_upsert_capture_every_action() {
        chunks();
        run("SELECT outbox_attach('chunks', payload_columns => ARRAY['content'])");
        run("INSERT INTO chunks VALUES (1, 1, 'a', '{1}', 's'), (2, 1, 'b', '{1}', 's')");
        run("INSERT INTO chunks VALUES (2, 1, 'b2', '{1}', 's'), (3, 1, 'c', '{1}', 's')
             ON CONFLICT (id) DO UPDATE SET content = EXCLUDED.content");
        run("MERGE INTO chunks t
             USING (VALUES (1, 'gone'), (3, 'c2'), (4, 'd')) AS s(id, content) ON t.id = s.id
             WHEN MATCHED AND s.content = 'gone' THEN DELETE
             WHEN MATCHED THEN UPDATE SET content = s.content
             WHEN NOT MATCHED THEN INSERT VALUES (s.id, 1, s.content, '{1}', 's')");
        let mut captured: Vec<(String, i64, Value)> = Vec::new();
        let Value::Array(all) = events() else { panic!("events are an array") };
        for event in &all[2..] {
            captured.push((event[0].as_str().unwrap().to_string(), event[1]["key"]["id"].as_i64().unwrap(), event[1]["data"].clone()));
        }
        // within one statement, events of different rows keep no particular order
        captured.sort_by_key(|(_, id, _)| *id);
        assert_eq!(
            captured,
            vec![
                ("EMBED_DELETE".to_string(), 1, Value::Null),
                ("EMBED_UPSERT".to_string(), 2, json!({"content": "b2"})),
                ("EMBED_UPSERT".to_string(), 3, json!({"content": "c"})),
                ("EMBED_UPSERT".to_string(), 3, json!({"content": "c2"})),
                ("EMBED_UPSERT".to_string(), 4, json!({"content": "d"})),
            ]
        );
    }

    #[pg_test]
    fn a_statement_larger_than_work_mem_is_captured_whole() {
        chunks();
        // text and to_json encodings, whose allocations are freed row by row
        run("SELECT outbox_attach('chunks', payload_columns => ARRAY['content', 'embedding'])");
        run("SET LOCAL work_mem = '64kB'");
        run("INSERT INTO chunks SELECT g, 1, repeat('x', 500) || g, ARRAY[g, 0.5]::real[], 's' FROM generate_series(1, 3000) g");
        run("DELETE FROM chunks WHERE id > 1000");
        assert_eq!(count("SELECT count(*) FROM outbox_events WHERE type = 'EMBED_UPSERT'"), 3000);
        assert_eq!(count("SELECT count(*) FROM outbox_events WHERE type = 'EMBED_DELETE'"), 2000);
        assert_eq!(
            value("SELECT payload FROM outbox_events WHERE type = 'EMBED_UPSERT' AND payload->'key'->>'id' = '2999'"),
            json!({"table": "public.chunks", "key": {"id": 2999}, "data": {"content": format!("{}2999", "x".repeat(500)), "embedding": [2999, 0.5]}})
        );
    }

    /// A text key is detoasted and encoded in the per-row memory, which a transition table
    /// that spilled to disk also reads its rows into: freeing the row twice crashed the server.
    #[pg_test]
    fn a_spilled_statement_with_text_keys_is_captured_whole() {
        run("CREATE TABLE tk (k text PRIMARY KEY, pad text)");
        run("SELECT outbox_attach('tk', payload_columns => ARRAY['pad'])");
        run("SET LOCAL work_mem = '64kB'");
        run("INSERT INTO tk SELECT 'key' || g, repeat('p', 100) FROM generate_series(1, 20000) g");
        run("DELETE FROM tk");
        assert_eq!(count("SELECT count(DISTINCT payload->'key'->>'k') FROM outbox_events WHERE type = 'EMBED_UPSERT'"), 20000);
        assert_eq!(count("SELECT count(DISTINCT payload->'key'->>'k') FROM outbox_events WHERE type = 'EMBED_DELETE'"), 20000);
    }

    /// json keeps text as written, jsonb refuses some of it; a payload is handed out as jsonb,
    /// so such a value failed every claim after it. Now the write that holds it is refused.
    #[pg_test(error = "outbox: column \"doc\" of table public.docs holds a value that a jsonb payload cannot: unsupported Unicode escape sequence (\\u0000 cannot be converted to text.)")]
    fn a_json_value_jsonb_cannot_hold_is_refused_at_write() {
        run("CREATE TABLE docs (id int PRIMARY KEY, doc json)");
        run("SELECT outbox_attach('docs', payload_columns => ARRAY['doc'])");
        run(r#"INSERT INTO docs VALUES (1, '{"a": "\u0000"}')"#);
    }

    /// The same refusal in a statement whose transition table spilled to disk, whose rows are
    /// read into memory that is reset per row: the error path freed a row after its memory was
    /// gone.
    #[pg_test(error = "outbox: column \"doc\" of table public.docs holds a value that a jsonb payload cannot: unsupported Unicode escape sequence (\\u0000 cannot be converted to text.)")]
    fn a_json_value_jsonb_cannot_hold_is_refused_in_a_spilled_statement() {
        run("CREATE TABLE docs (id int PRIMARY KEY, doc json, filler text)");
        run("SELECT outbox_attach('docs', payload_columns => ARRAY['doc'])");
        run("SET LOCAL work_mem = '64kB'");
        run(r#"INSERT INTO docs SELECT g, CASE WHEN g = 3000 THEN '{"a": "\u0000"}' ELSE '{"a": 1}' END::json, repeat('x', 200) FROM generate_series(1, 5000) g"#);
    }

    #[pg_test]
    fn json_values_and_composites_holding_them_reach_payloads_as_jsonb() {
        run("CREATE TYPE tagged AS (tag text, doc json)");
        run("CREATE TABLE docs (id int PRIMARY KEY, doc json, docs json[], t tagged)");
        run("SELECT outbox_attach('docs', payload_columns => ARRAY['doc', 'docs', 't'])");
        run(r#"INSERT INTO docs VALUES (1, '{"b": 1, "a": [1.50, "x"]}', ARRAY['{"c": null}'::json], ROW('t', '{"d": 2}'))"#);
        assert_eq!(
            value("SELECT payload->'data' FROM outbox_events"),
            json!({"doc": {"a": [1.50, "x"], "b": 1}, "docs": [{"c": null}], "t": {"tag": "t", "doc": {"d": 2}}})
        );
    }

    #[pg_test]
    fn partitions_are_captured_by_row_triggers() {
        chunks();
        run("SELECT outbox_attach('chunks')");
        assert_eq!(count("SELECT count(*) FROM pg_trigger WHERE tgrelid = 'chunks'::regclass AND tgname = 'outbox_capture_inserts'"), 1);
        run("CREATE TABLE all_chunks (LIKE chunks) PARTITION BY RANGE (id)");
        run("ALTER TABLE all_chunks ATTACH PARTITION chunks FOR VALUES FROM (0) TO (1000)");
        assert_eq!(
            value("SELECT jsonb_agg(tgname ORDER BY tgname) FROM pg_trigger WHERE tgrelid = 'chunks'::regclass"),
            json!(["outbox_capture_rows", "outbox_capture_statement", "outbox_capture_truncate", "outbox_capture_updates"]),
            "a captured table that became a partition switched to row triggers"
        );
        run("INSERT INTO all_chunks VALUES (1, 1, 'routed', '{1}', 's')");
        run("INSERT INTO chunks VALUES (2, 1, 'direct', '{1}', 's')");
        run("DELETE FROM all_chunks WHERE id = 1");
        // rows written through the parent wait for a statement on the partition, or the commit
        run("DELETE FROM chunks WHERE false");
        assert_eq!(
            events(),
            json!([
                ["EMBED_UPSERT", {"table": "public.chunks", "key": {"id": 1}}],
                ["EMBED_UPSERT", {"table": "public.chunks", "key": {"id": 2}}],
                ["EMBED_DELETE", {"table": "public.chunks", "key": {"id": 1}}],
            ])
        );
        run("CREATE TABLE more_chunks PARTITION OF all_chunks FOR VALUES FROM (1000) TO (2000)");
        run("SELECT outbox_attach('more_chunks', key_columns => ARRAY['id'])");
        assert_eq!(count("SELECT count(*) FROM pg_trigger WHERE tgrelid = 'more_chunks'::regclass AND tgname = 'outbox_capture_rows'"), 1);
    }

    /// A partition's own row triggers leave their events for the next statement trigger to
    /// write. One inside a savepoint wrote them there, and rolling back to it lost them.
    #[pg_test]
    fn a_rolled_back_savepoint_keeps_what_a_partition_captured_before_it() {
        run("CREATE TABLE pt (id int PRIMARY KEY, a text) PARTITION BY RANGE (id)");
        run("CREATE TABLE p1 PARTITION OF pt FOR VALUES FROM (0) TO (100)");
        run("SELECT outbox_attach('pt', payload_columns => ARRAY['a'])");
        run("CREATE TABLE t (id int PRIMARY KEY)");
        run("SELECT outbox_attach('t')");
        run("INSERT INTO pt VALUES (1, 'a')");
        run("DO $$ BEGIN
                UPDATE p1 SET a = 'x' WHERE id = 1;
                BEGIN
                    UPDATE pt SET a = 'z' WHERE id = 1;
                    RAISE EXCEPTION 'roll back';
                EXCEPTION WHEN OTHERS THEN NULL;
                END;
                BEGIN
                    UPDATE pt SET a = 'y' WHERE id = 1;
                EXCEPTION WHEN OTHERS THEN RAISE;
                END;
             END $$");
        run("UPDATE pt SET a = a WHERE false"); // a statement of the parent's writes what waits
        run("INSERT INTO t VALUES (2)");
        assert_eq!(
            events(),
            json!([
                ["EMBED_UPSERT", {"table": "public.pt", "key": {"id": 1}, "data": {"a": "a"}}],
                ["EMBED_UPSERT", {"table": "public.pt", "key": {"id": 1}, "data": {"a": "x"}}],
                ["EMBED_UPSERT", {"table": "public.pt", "key": {"id": 1}, "data": {"a": "y"}}],
                ["EMBED_UPSERT", {"table": "public.t", "key": {"id": 2}}],
            ])
        );
    }

    /// A partition attached by itself has a partition's row triggers; detached, it is a plain
    /// table again, whose every ALTER TABLE the guard refused for the triggers it expected.
    #[pg_test]
    fn a_detached_partition_goes_back_to_a_plain_tables_triggers() {
        run("CREATE TABLE parent (id int PRIMARY KEY, a text) PARTITION BY RANGE (id)");
        run("CREATE TABLE part PARTITION OF parent FOR VALUES FROM (0) TO (100)");
        run("SELECT outbox_attach('part')");
        run("ALTER TABLE parent DETACH PARTITION part");
        assert_eq!(
            value("SELECT jsonb_agg(tgname ORDER BY tgname) FROM pg_trigger WHERE tgrelid = 'part'::regclass"),
            json!(["outbox_capture_deletes", "outbox_capture_inserts", "outbox_capture_statement", "outbox_capture_truncate", "outbox_capture_updates"])
        );
        run("ALTER TABLE part ADD COLUMN b text");
        run("INSERT INTO part VALUES (1, 'x', 'y')");
        assert_eq!(events(), json!([["EMBED_UPSERT", {"table": "public.part", "key": {"id": 1}}]]));
    }

    /// A backend caches each partition's attachment; renaming the attached parent invalidates
    /// only the parent, and the partition's events kept its old name.
    #[pg_test]
    fn renaming_a_partitioned_table_renames_its_partitions_events() {
        run("CREATE TABLE pp (id int PRIMARY KEY) PARTITION BY RANGE (id)");
        run("CREATE TABLE pp_low PARTITION OF pp FOR VALUES FROM (0) TO (100)");
        run("SELECT outbox_attach('pp')");
        run("INSERT INTO pp VALUES (1)");
        run("ALTER TABLE pp RENAME TO pp_renamed");
        run("INSERT INTO pp_renamed VALUES (2)");
        run("UPDATE pp_renamed SET id = id WHERE false"); // writes what waits
        assert_eq!(
            value("SELECT jsonb_agg(payload->>'table' ORDER BY id) FROM outbox_events"),
            json!(["public.pp", "public.pp_renamed"])
        );
    }

    /// One attachment per partition tree: an attached table's row triggers reach every
    /// partition below it under the same names, and a second attachment collided with them
    /// (Postgres refused with "trigger … already exists" or "cannot drop trigger …").
    #[pg_test]
    fn a_second_attachment_in_a_partition_tree_is_refused() {
        run("CREATE FUNCTION error_of(statement text) RETURNS text LANGUAGE plpgsql AS $$
             BEGIN EXECUTE statement; RETURN NULL; EXCEPTION WHEN OTHERS THEN RETURN SQLERRM; END $$");
        let error_of = |sql: &str| Spi::get_one_with_args::<String>("SELECT error_of($1)", &[sql.into()]).unwrap();
        for tree in ["pt", "qt"] {
            run(&format!("CREATE TABLE {tree} (id int PRIMARY KEY, v text) PARTITION BY RANGE (id)"));
            run(&format!("CREATE TABLE {tree}_1 PARTITION OF {tree} FOR VALUES FROM (0) TO (100)"));
        }
        run("SELECT outbox_attach('pt')");
        run("SELECT outbox_attach('qt_1')");
        assert_eq!(
            error_of("SELECT outbox_attach('pt_1')").as_deref(),
            Some("outbox: table public.pt_1 is in the partition tree of public.pt, which is attached: each row would be captured twice; outbox_detach('public.pt') first")
        );
        assert_eq!(
            error_of("SELECT outbox_attach('qt')").as_deref(),
            Some("outbox: table public.qt is in the partition tree of public.qt_1, which is attached: each row would be captured twice; outbox_detach('public.qt_1') first")
        );
        // attaching again with other settings is not a second attachment
        run("SELECT outbox_attach('pt', payload_columns => ARRAY['v'])");
        run("SELECT outbox_detach('qt_1')");
        run("SELECT outbox_attach('qt')");
        run("INSERT INTO qt VALUES (1, 'a')");
        assert_eq!(value("SELECT jsonb_agg(payload->>'table') FROM outbox_events"), json!(["public.qt"]));
    }

    /// DDL on a parent reaches its partitions without naming them to the event trigger.
    #[pg_test(error = "outbox: table public.pf is captured with column(s) v by name")]
    fn renaming_a_captured_column_through_a_parent_is_refused() {
        run("CREATE TABLE pf (id int PRIMARY KEY, v text)");
        run("SELECT outbox_attach('pf', payload_columns => ARRAY['v'])");
        run("CREATE TABLE uf (id int PRIMARY KEY, v text) PARTITION BY RANGE (id)");
        run("ALTER TABLE uf ATTACH PARTITION pf FOR VALUES FROM (0) TO (100)");
        run("ALTER TABLE uf RENAME COLUMN v TO v2");
    }

    #[pg_test]
    fn reattach_changes_settings_and_detach_stops_capture() {
        chunks();
        run("SELECT outbox_attach('chunks')");
        run("INSERT INTO chunks VALUES (1, 1, 'a', '{1}', 's')");
        run("SELECT outbox_attach('chunks', payload_columns => ARRAY['content'], event_prefix => 'V2')");
        run("INSERT INTO chunks VALUES (2, 1, 'b', '{1}', 's')");
        assert_eq!(
            value("SELECT jsonb_agg(jsonb_build_array(type, payload->'data') ORDER BY id) FROM outbox_events"),
            json!([["EMBED_UPSERT", null], ["V2_UPSERT", {"content": "b"}]])
        );
        assert_eq!(count("SELECT count(*) FROM pg_trigger WHERE tgrelid = 'chunks'::regclass"), 5);
        run("SELECT outbox_detach('chunks')");
        run("INSERT INTO chunks VALUES (3, 1, 'c', '{1}', 's')");
        assert_eq!(count("SELECT count(*) FROM outbox_events"), 2);
        assert_eq!(count("SELECT count(*) FROM pg_trigger WHERE tgrelid = 'chunks'::regclass"), 0);
        assert_eq!(count("SELECT count(*) FROM outbox_attachments"), 0);
    }

    // --- schema changes under capture ---------------------------------------------------

    #[pg_test(error = "outbox: table public.chunks is captured with column(s) content by name")]
    fn dropping_a_payload_column_is_refused() {
        chunks();
        run("SELECT outbox_attach('chunks', payload_columns => ARRAY['content'], watch_columns => ARRAY['embedding'])");
        run("ALTER TABLE chunks DROP COLUMN content");
    }

    #[pg_test(error = "cannot drop column secret of table chunks because other objects depend on it")]
    fn postgres_itself_refuses_to_drop_a_watched_column() {
        chunks();
        run("SELECT outbox_attach('chunks')");
        run("ALTER TABLE chunks DROP COLUMN secret");
    }

    #[pg_test(error = "outbox: this change to table public.chunks would drop its capture triggers")]
    fn dropping_a_watched_column_with_cascade_is_refused() {
        chunks();
        run("SELECT outbox_attach('chunks')");
        run("ALTER TABLE chunks DROP COLUMN secret CASCADE");
    }

    #[pg_test(error = "outbox: table public.chunks is captured with column(s) content by name")]
    fn renaming_a_watched_column_is_refused() {
        chunks();
        run("SELECT outbox_attach('chunks', watch_columns => ARRAY['content', 'embedding'])");
        run("ALTER TABLE chunks RENAME COLUMN content TO body");
    }

    /// Capture reads a log segment's columns once per backend; a change to them (as an update
    /// script might make) is seen by the next capture rather than written past.
    #[pg_test(error = "outbox: captured changes of table outbox_log could not be encoded: unexpected column extra")]
    fn a_change_to_the_log_is_seen_by_the_next_capture() {
        // Tests run side by side in one database. Altering the log after capturing waited for
        // another test's lock on the log while holding its own, and deadlocked once in CI:
        // locked first, the log is altered without waiting, and a table of its own name keeps
        // this test from waiting for another test's `chunks` while it holds the log.
        run("LOCK TABLE outbox_log IN ACCESS EXCLUSIVE MODE");
        run("CREATE TABLE log_change (id bigint PRIMARY KEY)");
        run("SELECT outbox_attach('log_change')");
        run("INSERT INTO log_change VALUES (1)");
        run("ALTER TABLE outbox_log ADD COLUMN extra int");
        run("INSERT INTO log_change VALUES (2)");
    }

    /// The log row is written by Postgres calls under one guard (src/append.rs); an ERROR among
    /// them is the statement's own, with its SQLSTATE, and the transaction goes on after it.
    #[pg_test]
    fn an_error_while_writing_the_log_is_the_statements_own() {
        chunks();
        run("SELECT outbox_attach('chunks')");
        run("CREATE FUNCTION insert_chunk(id bigint) RETURNS text LANGUAGE plpgsql AS $$ \
             BEGIN INSERT INTO chunks VALUES (id, 10, 'a', '{1}', 's'); RETURN 'inserted'; \
             EXCEPTION WHEN sequence_generator_limit_exceeded THEN RETURN SQLERRM; END $$");
        let insert = |id: i64| Spi::get_one::<String>(&format!("SELECT insert_chunk({id})")).unwrap().unwrap();
        assert_eq!(insert(1), "inserted");
        // room for exactly one more log row (the first ALTER locks the sequence until this test
        // ends: tests run side by side, and theirs draw from it)
        run("ALTER SEQUENCE outbox_event_id_seq NO CYCLE");
        run("DO $$ BEGIN EXECUTE pg_catalog.format('ALTER SEQUENCE outbox_event_id_seq MAXVALUE %s', \
             (SELECT last_value + 4096 FROM outbox_event_id_seq)); END $$");
        assert_eq!(insert(2), "inserted");
        assert!(insert(3).starts_with("nextval: reached maximum value of sequence \"outbox_event_id_seq\""));
        run("ALTER SEQUENCE outbox_event_id_seq NO MAXVALUE");
        assert_eq!(insert(4), "inserted");
        assert_eq!(count("SELECT count(*) FROM chunks"), 3);
        assert_eq!(value("SELECT jsonb_agg(payload->'key'->'id' ORDER BY id) FROM outbox_events"), json!([1, 2, 4]));
    }

    #[pg_test]
    fn captured_columns_change_through_the_attachment() {
        chunks();
        run("SELECT outbox_attach('chunks', payload_columns => ARRAY['content'], watch_columns => ARRAY['content'])");
        // other columns come and go freely, and payloads keep their shape
        run("ALTER TABLE chunks ADD COLUMN extra int, DROP COLUMN secret");
        run("INSERT INTO chunks VALUES (1, 1, 'a', '{1}', 7)");
        // the documented way to rename a payload column: attach without it, rename, attach with it
        run("SELECT outbox_attach('chunks', watch_columns => ARRAY['doc_id'])");
        run("ALTER TABLE chunks RENAME COLUMN content TO body");
        run("SELECT outbox_attach('chunks', payload_columns => ARRAY['body'], watch_columns => ARRAY['body'])");
        run("INSERT INTO chunks VALUES (2, 1, 'b', '{1}', 7)");
        assert_eq!(
            value("SELECT jsonb_agg(payload->'data' ORDER BY id) FROM outbox_events"),
            json!([{"content": "a"}, {"body": "b"}])
        );
    }

    #[pg_test]
    fn dropping_an_attached_table_forgets_its_attachment() {
        chunks();
        run("SELECT outbox_attach('chunks')");
        run("INSERT INTO chunks VALUES (1, 1, 'a', '{1}', 's')");
        run("DROP TABLE chunks");
        assert_eq!(count("SELECT count(*) FROM outbox_attachments"), 0);
        assert_eq!(count("SELECT count(*) FROM outbox_events"), 1, "what was captured stays");
        chunks();
        run("INSERT INTO chunks VALUES (1, 1, 'a', '{1}', 's')");
        assert_eq!(count("SELECT count(*) FROM outbox_events"), 1, "a new table of the same name is not captured");
    }

    #[pg_test]
    fn partitioned_tables_are_captured() {
        run("CREATE TABLE parts (id int, region text, PRIMARY KEY (id, region)) PARTITION BY LIST (region)");
        run("CREATE TABLE parts_eu PARTITION OF parts FOR VALUES IN ('eu')");
        run("CREATE TABLE parts_us PARTITION OF parts FOR VALUES IN ('us')");
        run("SELECT outbox_attach('parts')");
        run("INSERT INTO parts VALUES (1, 'eu'), (2, 'us')");
        run("INSERT INTO parts_eu VALUES (3, 'eu')"); // the parent's statement trigger does not fire
        run("UPDATE parts SET region = 'us' WHERE id = 1"); // moves between partitions: a key change
        // the direct insert waited for the next statement's flush (or commit)
        assert_eq!(
            value("SELECT jsonb_agg(jsonb_build_array(type, payload) ORDER BY id) FROM outbox_events"),
            json!([
                ["EMBED_UPSERT", {"table": "public.parts", "key": {"id": 1, "region": "eu"}}],
                ["EMBED_UPSERT", {"table": "public.parts", "key": {"id": 2, "region": "us"}}],
                ["EMBED_UPSERT", {"table": "public.parts", "key": {"id": 3, "region": "eu"}}],
                ["EMBED_DELETE", {"table": "public.parts", "key": {"id": 1, "region": "eu"}}],
                ["EMBED_UPSERT", {"table": "public.parts", "key": {"id": 1, "region": "us"}}],
            ])
        );
    }

    /// A row's key is spelled the same whichever session writes it: the session's TimeZone,
    /// extra_float_digits, IntervalStyle and bytea_output changed how to_json spelled it, and a
    /// DELETE named another key than the row's UPSERT (or, with extra_float_digits = 0,
    /// another row's). The session keeps its settings.
    /// Floats and arrays of them are spelled in Rust (capture.rs, `Encoding::Float4` and the
    /// others) as `to_json` spells them with extra_float_digits at least 1: every value's text
    /// is compared with to_json's, over random values of every magnitude, the special ones,
    /// and arrays of every shape, written from a session with extra_float_digits 0.
    #[pg_test]
    fn floats_and_float_arrays_are_spelled_as_to_json_spells_them() {
        run("CREATE TABLE fl (id int PRIMARY KEY, f4 real, f8 float8, a4 real[], a8 float8[])");
        run("SELECT outbox_attach('fl', payload_columns => ARRAY['f4', 'f8', 'a4', 'a8'])");
        run("SET LOCAL extra_float_digits = 0");
        run("INSERT INTO fl SELECT g, (random() * 2 - 1) * 10 ^ (random() * 70 - 35), (random() * 2 - 1) * 10 ^ (random() * 600 - 300), \
                    ARRAY[(random() * 2 - 1) * 10 ^ (random() * 70 - 35), random(), g]::real[], \
                    ARRAY[(random() - 0.5) * 10 ^ (random() * 40 - 20), g / 7.0] \
             FROM generate_series(1, 3000) g");
        run("INSERT INTO fl VALUES \
             (-1, 'NaN', 'Infinity', '{NaN,Infinity,-Infinity,-0,0,1e-45,3.4028235e38,1e6,1e-5,123456.7}', '{{1.5,NULL},{NULL,-2.5e-300}}'), \
             (-2, '-Infinity', '-0', '{}', '[0:2]={1,2,3}'), \
             (-3, 1.17549435e-38, 5e-324, '{{{1}},{{2}}}', NULL), \
             (-4, NULL, 2.2250738585072014e-308, '{NULL}', '{1e15,1e16,1e-4,1e-5,0.1,100,1.7976931348623157e308}')");
        run("SET LOCAL extra_float_digits = 1");
        let compared = "FROM outbox_log l, \
                             ROWS FROM (json_array_elements(l.keys::json), json_array_elements(l.data::json)) AS e(key, data) \
                        JOIN fl ON fl.id = (e.key->>'id')::int";
        let spelled = |column: &str| format!("(e.data->'{column}')::text IS DISTINCT FROM coalesce(to_json(fl.{column})::text, 'null')");
        let differ = ["f4", "f8", "a4", "a8"].map(spelled).join(" OR ");
        assert_eq!(count(&format!("SELECT count(*) {compared}")), 3004, "every row captured once");
        let wrong = Spi::get_one::<String>(&format!(
            "SELECT string_agg(fl.id || ': ' || e.data::text || ' where to_json has ' \
                               || concat_ws(' ', to_json(fl.f4), to_json(fl.f8), to_json(fl.a4), to_json(fl.a8)), E'\\n') \
             {compared} WHERE {differ}"
        ));
        assert_eq!(wrong, Ok(None));
    }

    #[pg_test]
    fn keys_and_data_are_spelled_alike_under_any_session_settings() {
        run("CREATE TABLE t (at timestamptz, f float8, b bytea, i interval, PRIMARY KEY (at, f, b, i))");
        run("SELECT outbox_attach('t', payload_columns => ARRAY['f', 'i'])");
        run("INSERT INTO t VALUES ('2024-01-01 00:00+00', 0.30000000000000004, '\\x41ff', '1 day 2 hours')");
        run("SET LOCAL TimeZone = 'Asia/Tokyo'");
        run("SET LOCAL extra_float_digits = 0");
        run("SET LOCAL IntervalStyle = 'sql_standard'");
        run("SET LOCAL bytea_output = 'escape'");
        run("UPDATE t SET f = f");
        run("DELETE FROM t");
        let key = json!({"at": "2024-01-01T00:00:00+00:00", "f": 0.30000000000000004, "b": "\\x41ff", "i": "1 day 02:00:00"});
        let data = json!({"f": 0.30000000000000004, "i": "1 day 02:00:00"});
        assert_eq!(
            events(),
            json!([
                ["EMBED_UPSERT", {"table": "public.t", "key": key, "data": data}],
                ["EMBED_DELETE", {"table": "public.t", "key": key}],
            ])
        );
        assert_eq!(
            Spi::get_one::<String>("SELECT concat_ws(' ', current_setting('TimeZone'), current_setting('extra_float_digits'), current_setting('IntervalStyle'), current_setting('bytea_output'))").unwrap(),
            Some("Asia/Tokyo 0 sql_standard escape".to_string())
        );
    }

    /// The same for what type output functions spell by DateStyle (ranges of times) and
    /// search_path (regclass), and for a value whose cast to json runs
    /// a function with a SET TimeZone clause of its own, which put the session's zone back
    /// in the middle of the value.
    #[pg_test]
    fn keys_of_ranges_regclass_and_casts_are_spelled_alike() {
        run("CREATE SCHEMA s1");
        run("CREATE TABLE s1.x ()");
        run("CREATE TYPE mood AS ENUM ('ok')");
        run("CREATE FUNCTION mood_json(mood) RETURNS json LANGUAGE sql SET TimeZone = 'Asia/Kolkata' AS $$ SELECT to_json($1::text) $$");
        run("CREATE CAST (mood AS json) WITH FUNCTION mood_json(mood)");
        run("CREATE TYPE tagged AS (tag mood, at timestamptz)");
        run("CREATE TABLE k (r tstzrange, m money, c regclass, t tagged, PRIMARY KEY (r, m, c, t))");
        run("SELECT outbox_attach('k')");
        run("SET LOCAL TimeZone = 'UTC'");
        run("INSERT INTO k VALUES ('[2024-03-01 12:00+00, 2024-03-01 13:00+00)', 1234.5, 's1.x', '(ok, \"2024-03-01 12:00+00\")')");
        run("SET LOCAL TimeZone = 'America/New_York'");
        run("SET LOCAL DateStyle = 'SQL, DMY'");
        run("SET LOCAL search_path = s1, public");
        run("DELETE FROM k");
        let keys = value("SELECT jsonb_agg(payload->'key' ORDER BY id) FROM outbox_events");
        assert_eq!(keys[0], keys[1], "{keys}");
        assert_eq!(
            keys[0],
            json!({"r": "[\"2024-03-01 12:00:00+00\",\"2024-03-01 13:00:00+00\")", "m": "$1,234.50", "c": "s1.x", "t": {"tag": "ok", "at": "2024-03-01T12:00:00+00:00"}})
        );
    }

    /// A table attached as a partition brings its rows into the attached tree without firing
    /// a trigger: they are captured as UPSERTs, its columns found by name (here at other
    /// positions than the parent's). Attaching to a tree nobody attached captures nothing.
    #[pg_test]
    fn attaching_a_partition_captures_its_rows() {
        run("CREATE TABLE docs (id int PRIMARY KEY, body text, secret text) PARTITION BY RANGE (id)");
        run("CREATE TABLE docs_low PARTITION OF docs FOR VALUES FROM (0) TO (10)");
        run("SELECT outbox_attach('docs', payload_columns => ARRAY['body'])");
        run("CREATE TABLE docs_high (dropped int, secret text, body text, id int PRIMARY KEY)");
        run("ALTER TABLE docs_high DROP COLUMN dropped");
        run("INSERT INTO docs_high (id, body, secret) VALUES (10, 'ten', 's'), (11, 'eleven', 's')");
        run("CREATE TABLE other (id int PRIMARY KEY) PARTITION BY RANGE (id)");
        run("CREATE TABLE other_1 (id int PRIMARY KEY)");
        run("INSERT INTO other_1 VALUES (1)");
        let since = count("SELECT coalesce(max(id), 0) FROM outbox_events");
        run("ALTER TABLE docs ATTACH PARTITION docs_high FOR VALUES FROM (10) TO (20)");
        run("ALTER TABLE other ATTACH PARTITION other_1 FOR VALUES FROM (0) TO (10)");
        run("INSERT INTO docs VALUES (12, 'twelve', 's')");
        assert_eq!(
            value(&format!("SELECT jsonb_agg(jsonb_build_array(type, payload) ORDER BY id) FROM outbox_events WHERE id > {since}")),
            json!([
                ["EMBED_UPSERT", {"table": "public.docs", "key": {"id": 10}, "data": {"body": "ten"}}],
                ["EMBED_UPSERT", {"table": "public.docs", "key": {"id": 11}, "data": {"body": "eleven"}}],
                ["EMBED_UPSERT", {"table": "public.docs", "key": {"id": 12}, "data": {"body": "twelve"}}],
            ])
        );
    }

    /// Detaching a partition, or dropping one, takes its rows out of the attached tree: they
    /// are captured as DELETEs, read before the drop, from every partition below a dropped
    /// partitioned one as well. Dropping the attached table with it, as dropping any attached
    /// table, captures nothing.
    #[pg_test]
    fn detaching_or_dropping_a_partition_captures_its_rows_as_deletes() {
        run("CREATE TABLE docs (id int PRIMARY KEY, body text) PARTITION BY RANGE (id)");
        run("CREATE TABLE docs_a PARTITION OF docs FOR VALUES FROM (0) TO (10)");
        run("CREATE TABLE docs_b PARTITION OF docs FOR VALUES FROM (10) TO (20)");
        run("CREATE TABLE docs_c PARTITION OF docs FOR VALUES FROM (20) TO (40) PARTITION BY RANGE (id)");
        run("CREATE TABLE docs_c1 PARTITION OF docs_c FOR VALUES FROM (20) TO (30)");
        run("CREATE TABLE docs_c2 PARTITION OF docs_c FOR VALUES FROM (30) TO (40)");
        run("INSERT INTO docs VALUES (1, 'a'), (11, 'b'), (21, 'c1'), (31, 'c2')");
        run("SELECT outbox_attach('docs')");
        assert_eq!(captured_by("ALTER TABLE docs DETACH PARTITION docs_a"), json!([["EMBED_DELETE", 1]]));
        assert_eq!(captured_by("INSERT INTO docs_a VALUES (2, 'x')"), json!([]), "a detached partition is not captured");
        assert_eq!(captured_by("DROP TABLE docs_c"), json!([["EMBED_DELETE", 21], ["EMBED_DELETE", 31]]));
        assert_eq!(captured_by("DROP TABLE IF EXISTS docs_a, no_such_table"), json!([]), "no longer a partition");
        assert_eq!(captured_by("DROP TABLE docs_b, docs"), json!([]));

        // a partition dropped with a table above its attached one
        run("CREATE TABLE top (id int PRIMARY KEY) PARTITION BY RANGE (id)");
        run("CREATE TABLE mid PARTITION OF top FOR VALUES FROM (0) TO (100) PARTITION BY RANGE (id)");
        run("CREATE TABLE low PARTITION OF mid FOR VALUES FROM (0) TO (100)");
        run("INSERT INTO top VALUES (1)");
        run("SELECT outbox_attach('mid')");
        assert_eq!(captured_by("DROP TABLE top, low"), json!([]));
    }

    /// DROP SCHEMA … CASCADE and DROP OWNED drop partitions with no DROP TABLE naming them:
    /// their rows are captured as DROP TABLE of them captures them, read before the drop, with
    /// those of partitions elsewhere below a dropped partitioned one. A partition that goes
    /// with its attached table, and tables outside attached trees, add nothing.
    #[pg_test]
    fn partitions_dropped_with_their_schema_or_owner_capture_their_rows_as_deletes() {
        run("CREATE TABLE docs (id int PRIMARY KEY, body text) PARTITION BY RANGE (id)");
        run("CREATE SCHEMA tenant_a");
        run("CREATE TABLE tenant_a.docs_a PARTITION OF docs FOR VALUES FROM (0) TO (10)");
        run("CREATE TABLE tenant_a.docs_b PARTITION OF docs FOR VALUES FROM (10) TO (30) PARTITION BY RANGE (id)");
        run("CREATE TABLE public.docs_b1 PARTITION OF tenant_a.docs_b FOR VALUES FROM (10) TO (20)");
        run("CREATE TABLE tenant_a.plain (id int PRIMARY KEY)");
        run("CREATE TABLE docs_c PARTITION OF docs FOR VALUES FROM (30) TO (40)");
        run("CREATE ROLE outbox_test_tenant_b");
        run("CREATE TABLE docs_d PARTITION OF docs FOR VALUES FROM (40) TO (50)");
        run("ALTER TABLE docs_d OWNER TO outbox_test_tenant_b");
        run("INSERT INTO docs VALUES (1, 'a'), (11, 'b1'), (31, 'c'), (41, 'd')");
        run("INSERT INTO tenant_a.plain VALUES (1)");
        run("SELECT outbox_attach('docs')");
        assert_eq!(
            captured_by("DROP SCHEMA IF EXISTS no_such_schema, tenant_a CASCADE"),
            json!([["EMBED_DELETE", 1], ["EMBED_DELETE", 11]])
        );
        assert_eq!(count("SELECT count(*) FROM pg_class WHERE relname = 'docs_b1'"), 0, "dropped with its parent");
        assert_eq!(captured_by("DROP OWNED BY outbox_test_tenant_b"), json!([["EMBED_DELETE", 41]]));
        assert_eq!(captured_by("INSERT INTO docs VALUES (32, 'c')"), json!([["EMBED_UPSERT", 32]]), "the rest is captured as before");

        // the attached table goes with its owner's other tables: nothing, as for any attached table
        run("ALTER TABLE docs OWNER TO outbox_test_tenant_b");
        assert_eq!(captured_by("DROP OWNED BY outbox_test_tenant_b"), json!([]));
        assert_eq!(count("SELECT count(*) FROM pg_class WHERE relname IN ('docs', 'docs_c')"), 0);
        run("DROP ROLE outbox_test_tenant_b");
    }

    /// A partition truncated by itself loses its rows without a trigger of the attached table
    /// firing: its own TRUNCATE trigger captures each as a DELETE, before they go. Truncated
    /// with the attached table, it adds nothing to the TRUNCATE. New partitions get the
    /// trigger, and detached ones lose it.
    #[pg_test]
    fn truncating_a_partition_captures_its_rows_as_deletes() {
        run("CREATE TABLE docs (id int PRIMARY KEY, body text) PARTITION BY RANGE (id)");
        run("CREATE TABLE docs_a PARTITION OF docs FOR VALUES FROM (0) TO (10)");
        run("CREATE TABLE docs_b PARTITION OF docs FOR VALUES FROM (10) TO (30) PARTITION BY RANGE (id)");
        run("CREATE TABLE docs_b1 PARTITION OF docs_b FOR VALUES FROM (10) TO (20)");
        run("SELECT outbox_attach('docs')");
        run("CREATE TABLE docs_b2 PARTITION OF docs_b FOR VALUES FROM (20) TO (30)");
        run("CREATE TABLE docs_c (id int PRIMARY KEY, body text)");
        run("ALTER TABLE docs ATTACH PARTITION docs_c FOR VALUES FROM (30) TO (40)");
        let fill = "INSERT INTO docs VALUES (1, 'a'), (11, 'b1'), (21, 'b2'), (31, 'c')";
        run(fill);
        assert_eq!(captured_by("TRUNCATE docs_a"), json!([["EMBED_DELETE", 1]]));
        assert_eq!(captured_by("TRUNCATE docs_b"), json!([["EMBED_DELETE", 11], ["EMBED_DELETE", 21]]), "a partitioned partition");
        assert_eq!(captured_by("TRUNCATE docs_c"), json!([["EMBED_DELETE", 31]]), "an attached partition");
        run(fill);
        assert_eq!(captured_by("TRUNCATE docs"), json!([["EMBED_TRUNCATE", null]]));
        run(fill);
        assert_eq!(captured_by("TRUNCATE docs_a, docs"), json!([["EMBED_DELETE", 1], ["EMBED_TRUNCATE", null]]));
        run(fill);
        // (the tables were made in this transaction: TRUNCATE empties them in place, in
        // statements of one start)
        assert_eq!(captured_by("TRUNCATE docs_a"), json!([["EMBED_DELETE", 1]]), "the statement before left nothing behind");
        run("ALTER TABLE docs DETACH PARTITION docs_c");
        assert_eq!(captured_by("TRUNCATE docs_c"), json!([]), "a detached partition is not captured, and can be truncated");
        // a user's BEFORE TRUNCATE trigger that writes does not make the partitions' own
        // triggers capture their rows as well
        run("CREATE TABLE audit (at timestamptz)");
        run("CREATE FUNCTION audit() RETURNS trigger LANGUAGE plpgsql AS $$ BEGIN INSERT INTO audit VALUES (now()); RETURN NULL; END $$");
        run("CREATE TRIGGER trg_audit BEFORE TRUNCATE ON docs FOR EACH STATEMENT EXECUTE FUNCTION audit()");
        run("CREATE TRIGGER a_audit BEFORE TRUNCATE ON docs_a FOR EACH STATEMENT EXECUTE FUNCTION audit()");
        assert_eq!(captured_by("TRUNCATE docs"), json!([["EMBED_TRUNCATE", null]]));
        // a partition made in a CREATE SCHEMA gets its trigger too
        run("CREATE SCHEMA more CREATE TABLE docs_d PARTITION OF public.docs FOR VALUES FROM (40) TO (50)");
        run("INSERT INTO docs VALUES (41, 'd')");
        assert_eq!(captured_by("TRUNCATE more.docs_d"), json!([["EMBED_DELETE", 41]]));
        run("SELECT outbox_detach('docs')");
        assert_eq!(
            count("SELECT count(*) FROM pg_trigger WHERE tgname LIKE 'outbox_capture%'"),
            0,
            "detach takes every capture trigger off"
        );
    }

    /// A large partition leaving is written a part at a time, every row once.
    #[pg_test]
    fn a_large_partition_detached_is_captured_whole() {
        run("CREATE TABLE docs (id int PRIMARY KEY) PARTITION BY RANGE (id)");
        run("CREATE TABLE docs_a PARTITION OF docs FOR VALUES FROM (0) TO (1000000)");
        run("SELECT outbox_attach('docs')");
        run("INSERT INTO docs SELECT generate_series(1, 70000)");
        let since = count("SELECT coalesce(max(id), 0) FROM outbox_events");
        run("ALTER TABLE docs DETACH PARTITION docs_a");
        assert_eq!(
            count(&format!("SELECT count(DISTINCT payload->'key'->>'id') FROM outbox_events WHERE id > {since} AND type = 'EMBED_DELETE'")),
            70000
        );
        assert_eq!(count(&format!("SELECT count(*) FROM outbox_events WHERE id > {since}")), 70000);
    }

    /// A partition's TRUNCATE trigger left behind by a DETACH that fired no event trigger
    /// (session_replication_role = replica) does not stop the table being truncated.
    #[pg_test]
    fn a_truncate_trigger_left_on_a_detached_partition_captures_nothing() {
        run("CREATE TABLE docs (id int PRIMARY KEY) PARTITION BY RANGE (id)");
        run("CREATE TABLE docs_a PARTITION OF docs FOR VALUES FROM (0) TO (10)");
        run("SELECT outbox_attach('docs')");
        run("INSERT INTO docs VALUES (1)");
        run("SET LOCAL session_replication_role = replica");
        run("ALTER TABLE docs DETACH PARTITION docs_a");
        run("RESET session_replication_role");
        assert_eq!(captured_by("TRUNCATE docs_a"), json!([]));
        assert_eq!(count("SELECT count(*) FROM docs_a"), 0);
    }

    /// A user's AFTER TRUNCATE trigger that fills the table again is captured after the
    /// TRUNCATE, which is captured before the rows go: the copy keeps what it wrote.
    #[pg_test]
    fn an_after_truncate_trigger_refilling_the_table_comes_after_the_truncate() {
        chunks();
        run("SELECT outbox_attach('chunks')");
        run("CREATE FUNCTION refill() RETURNS trigger LANGUAGE plpgsql AS $$ BEGIN INSERT INTO chunks (id) VALUES (7); RETURN NULL; END $$");
        run("CREATE TRIGGER refill AFTER TRUNCATE ON chunks FOR EACH STATEMENT EXECUTE FUNCTION refill()");
        run("TRUNCATE chunks");
        assert_eq!(
            value("SELECT jsonb_agg(jsonb_build_array(type, payload->'key'->'id') ORDER BY id) FROM outbox_events"),
            json!([["EMBED_TRUNCATE", null], ["EMBED_UPSERT", 7]])
        );
    }

    /// Rows that swap keys across partitions are deleted from one and inserted into the other,
    /// each by its own row trigger; in row order the copy lost key 2.
    #[pg_test]
    fn keys_swapped_across_partitions_come_out_deletes_first() {
        run("CREATE TABLE q (id int, PRIMARY KEY (id) DEFERRABLE INITIALLY DEFERRED) PARTITION BY RANGE (id)");
        run("CREATE TABLE q_low PARTITION OF q FOR VALUES FROM (0) TO (2)");
        run("CREATE TABLE q_high PARTITION OF q FOR VALUES FROM (2) TO (10)");
        run("SELECT outbox_attach('q')");
        run("INSERT INTO q VALUES (1), (2)");
        run("UPDATE q SET id = 3 - id");
        run("UPDATE q SET id = id WHERE false"); // a statement on the parent writes what waits
        assert_eq!(
            value("SELECT jsonb_agg(jsonb_build_array(type, payload->'key'->'id') ORDER BY id) FROM outbox_events"),
            json!([
                ["EMBED_UPSERT", 1],
                ["EMBED_UPSERT", 2],
                ["EMBED_DELETE", 1],
                ["EMBED_DELETE", 2],
                ["EMBED_UPSERT", 2],
                ["EMBED_UPSERT", 1],
            ])
        );
    }

    // --- bad input: each names the problem and changes nothing --------------------------

    #[pg_test(error = "outbox: table public.nokey has no primary key; pass key_columns to say which columns identify a row")]
    fn table_without_key_is_refused() {
        run("CREATE TABLE nokey (a int)");
        run("SELECT outbox_attach('nokey')");
    }

    #[pg_test(error = "outbox: column \"nope\" named in payload_columns does not exist in table public.chunks")]
    fn unknown_payload_column_is_refused() {
        chunks();
        run("SELECT outbox_attach('chunks', payload_columns => ARRAY['content', 'nope'])");
    }

    #[pg_test(error = "outbox: column \"Content\" named in watch_columns does not exist in table public.chunks")]
    fn unknown_watch_column_is_refused() {
        chunks();
        run("SELECT outbox_attach('chunks', watch_columns => ARRAY['Content'])");
    }

    #[pg_test(error = "outbox: column \"nope\" named in key_columns does not exist in table public.chunks")]
    fn unknown_key_column_is_refused() {
        chunks();
        run("SELECT outbox_attach('chunks', key_columns => ARRAY['nope'])");
    }

    #[pg_test(error = "outbox: invalid event_prefix \"a b\": only letters, digits and underscores are allowed")]
    fn bad_prefix_is_refused() {
        chunks();
        run("SELECT outbox_attach('chunks', event_prefix => 'a b')");
    }

    #[pg_test(error = "outbox: public.v is not a table; outbox_attach needs an ordinary or partitioned table")]
    fn views_are_refused() {
        chunks();
        run("CREATE VIEW v AS SELECT * FROM chunks");
        run("SELECT outbox_attach('v')");
    }

    #[pg_test(error = "outbox: table public.chunks is not attached to the outbox")]
    fn detaching_an_unattached_table_is_refused() {
        chunks();
        run("SELECT outbox_detach('chunks')");
    }

    #[pg_test(error = "outbox: subscription \"search\" already exists")]
    fn duplicate_subscription_is_refused() {
        run("SELECT outbox_subscribe('search')");
        run("SELECT outbox_subscribe('search')");
    }

    #[pg_test(error = "outbox: subscription \"nope\" does not exist")]
    fn unknown_subscription_in_claim() {
        run("SELECT * FROM outbox_claim(subscription => 'nope')");
    }

    #[pg_test(error = "outbox: subscription \"nope\" does not exist")]
    fn unknown_subscription_in_ack() {
        run("SELECT outbox_ack(ARRAY[1], 'nope')");
    }

    #[pg_test(error = "outbox: batch_size must be between 1 and 10000, got 0")]
    fn zero_batch_is_refused() {
        run("SELECT * FROM outbox_claim(0)");
    }

    #[pg_test(error = "outbox: batch_size must be between 1 and 10000, got -5")]
    fn negative_batch_is_refused() {
        run("SELECT * FROM outbox_claim(-5)");
    }

    #[pg_test(error = "outbox: batch_size must be between 1 and 10000, got 10001")]
    fn oversized_batch_is_refused() {
        run("SELECT * FROM outbox_claim(10001)");
    }

    #[pg_test(error = "outbox: lease must be a positive interval, got 00:00:00")]
    fn zero_lease_is_refused() {
        run("SELECT * FROM outbox_claim(lease => '0 seconds')");
    }

    #[pg_test(error = "outbox: lease must be a positive interval, got -00:00:05")]
    fn negative_lease_is_refused() {
        run("SELECT * FROM outbox_claim(lease => '-5 seconds')");
    }

    #[pg_test(error = "outbox: ids must not be NULL")]
    fn null_ids_in_ack_are_refused() {
        run("SELECT outbox_ack(NULL)");
    }

    #[pg_test(error = "outbox: ids must not be NULL")]
    fn null_ids_in_fail_are_refused() {
        run("SELECT outbox_fail(NULL, 'x')");
    }

    #[pg_test(error = "outbox: invalid options for subscription: max_attempts must be a positive integer, got 0")]
    fn bad_subscription_options_are_refused() {
        run("SELECT outbox_subscribe('s', options => '{\"max_attempts\": 0}')");
    }

    #[pg_test(error = "outbox: unknown sink \"kafka\"; expected one of: pull, function, http")]
    fn unknown_sink_is_refused() {
        run("SELECT outbox_subscribe('s', 'kafka')");
    }

    #[pg_test(error = "outbox: outbox_replay needs since or ids to say which events to replay")]
    fn replay_needs_a_selection() {
        run("SELECT outbox_replay('default')");
    }

    #[pg_test]
    fn acking_unknown_ids_counts_zero() {
        assert_eq!(count("SELECT outbox_ack(ARRAY[42, 4242])::bigint"), 0);
        assert_eq!(count("SELECT outbox_fail(ARRAY[]::bigint[], 'x')::bigint"), 0);
    }

    // --- settings ---------------------------------------------------------------------

    #[pg_test]
    fn settings_have_documented_defaults() {
        assert_eq!(Spi::get_one::<String>("SHOW outbox.max_attempts").unwrap().unwrap(), "12");
        assert_eq!(Spi::get_one::<String>("SHOW outbox.backoff_base").unwrap().unwrap(), "1s");
        assert_eq!(Spi::get_one::<String>("SHOW outbox.backoff_max").unwrap().unwrap(), "10min");
        assert_eq!(Spi::get_one::<String>("SHOW outbox.retention").unwrap().unwrap(), "1d");
    }

    // --- privileges -------------------------------------------------------------------

    #[pg_test]
    fn public_is_granted_nothing() {
        assert_eq!(
            count(
                "SELECT count(*) FROM pg_proc p JOIN pg_depend d ON d.objid = p.oid AND d.deptype = 'e' \
                 JOIN pg_extension e ON e.oid = d.refobjid AND e.extname = 'outbox' \
                 WHERE has_function_privilege('public', p.oid, 'EXECUTE')"
            ),
            0
        );
        assert_eq!(
            count(
                "SELECT count(*) FROM pg_class c JOIN pg_depend d ON d.objid = c.oid AND d.deptype = 'e' \
                 JOIN pg_extension e ON e.oid = d.refobjid AND e.extname = 'outbox' \
                 WHERE c.relkind IN ('r', 'p', 'v', 'S') \
                   AND (has_table_privilege('public', c.oid, 'SELECT') OR has_table_privilege('public', c.oid, 'INSERT'))"
            ),
            0
        );
    }

    #[pg_test]
    fn security_definer_functions_pin_search_path() {
        assert_eq!(
            count(
                "SELECT count(*) FROM pg_proc p JOIN pg_depend d ON d.objid = p.oid AND d.deptype = 'e' \
                 JOIN pg_extension e ON e.oid = d.refobjid AND e.extname = 'outbox' \
                 WHERE p.prosecdef AND NOT coalesce('search_path=pg_catalog, pg_temp' = ANY (p.proconfig), false)"
            ),
            0
        );
        assert!(count("SELECT count(*) FROM pg_proc WHERE prosecdef AND proname LIKE 'outbox%'") >= 8);
    }
    /// The datum `jsonb_in` makes of `json`, as bytes.
    fn jsonb_in_bytes(json: &str) -> Vec<u8> {
        let text = std::ffi::CString::new(json).unwrap();
        unsafe {
            let datum = pgrx::direct_function_call_as_datum(pg_sys::jsonb_in, &[text.as_c_str().into_datum()]).unwrap();
            let ptr = datum.cast_mut_ptr::<pg_sys::varlena>();
            std::slice::from_raw_parts(ptr.cast::<u8>(), pgrx::varlena::varsize_any(ptr)).to_vec()
        }
    }

    #[pg_test]
    fn payloads_written_as_jsonb_match_jsonb_in_byte_for_byte() {
        let many = |n: usize, value: &dyn Fn(usize) -> String| {
            format!("{{{}}}", (0..n).map(|i| format!("\"k{i}\":{}", value(i))).collect::<Vec<_>>().join(","))
        };
        let mut corpus: Vec<String> = [
            r#"{"table":"public.chunks","key":{"id":1}}"#,
            r#"{"table":"public.chunks","key":{"id":-9223372036854775808}}"#,
            r#"{"table":"s.t","key":{"id":9223372036854775807,"doc":"é"},"data":{"content":"","flag":true,"n":null,"f":false}}"#,
            r#"{"table":"public.chunks"}"#,
            r#"{}"#,
            r#"{"a":{"b":{"c":{"d":1}}},"e":{}}"#,
            r#"{"b":1,"a":2,"ab":3,"aa":4,"":5}"#,
            r#"{"a":"x","b":1,"cc":"yyy","d":{"e":2},"f":"zz","g":-0,"h":0,"i":12345678901234}"#,
            r#"{"ключ":"значение","k":"日本語"}"#,
            r#" { "a" : 1 , "b" : { } } "#,
        ]
        .iter()
        .map(|s| s.to_string())
        .collect();
        corpus.push(many(40, &|i| i.to_string()));
        corpus.push(many(70, &|i| format!("\"{}\"", "v".repeat(i % 7))));
        corpus.push(many(33, &|i| format!("{{\"n\":{i},\"s\":\"{}\"}}", "w".repeat(i))));
        for json in &corpus {
            let written = crate::jsonb::encode(json, &mut crate::api::numeric_bytes)
                .unwrap_or_else(|| panic!("written directly: {json}"));
            let mut written = written;
            unsafe { pgrx::varlena::set_varsize_4b(written.as_mut_ptr().cast(), written.len() as i32) };
            assert_eq!(written, jsonb_in_bytes(json), "{json}");
        }
        // what is left to jsonb_in comes out as jsonb_in makes it
        for json in [r#"{"a":[1,2]}"#, r#"{"a":1.5}"#, r#"{"a":"q\"uote"}"#, r#"{"a":1,"a":2}"#] {
            assert!(crate::jsonb::encode(json, &mut crate::api::numeric_bytes).is_none(), "{json}");
            let datum = crate::api::jsonb(json.to_string());
            let ptr = datum.cast_mut_ptr::<pg_sys::varlena>();
            let bytes = unsafe { std::slice::from_raw_parts(ptr.cast::<u8>(), pgrx::varlena::varsize_any(ptr)) };
            assert_eq!(bytes, jsonb_in_bytes(json).as_slice(), "{json}");
        }
    }
}

