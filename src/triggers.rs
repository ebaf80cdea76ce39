//! The capture triggers `outbox_attach` puts on a table, as DDL text. Pure Rust.

/// Trigger names, chosen to sort after most user trigger names so that capture sees rows as
/// the user's own AFTER triggers left them. A plain table gets the first five; a partitioned
/// table or a partition gets row triggers, the last four (src/capture.rs says why), and each
/// partition of an attached partitioned table a TRUNCATE trigger of its own.
pub const TRIGGER_NAMES: [&str; 6] = [
    "outbox_capture_inserts",
    "outbox_capture_deletes",
    "outbox_capture_updates",
    "outbox_capture_statement",
    "outbox_capture_truncate",
    "outbox_capture_rows",
];

/// Double-quotes an identifier. Always quoting is valid SQL and needs no keyword list.
pub fn quote_ident(name: &str) -> String {
    format!("\"{}\"", name.replace('"', "\"\""))
}

/// The WHEN condition of the UPDATE trigger: true when any of the watched columns changed.
/// Postgres evaluates it before queuing the trigger, so updates of unwatched columns cost
/// nothing. Values are compared by their bytes (`record_image_eq`, the `*=` of records), not
/// by their type's equality, which calls 1.0 and 1.000, `'key'` and `'KEY'` under a
/// case-insensitive collation, or two jsonb numbers of different scale equal although their
/// JSON differs.
pub fn update_condition(columns: &[&str]) -> String {
    let values = |row: &str| columns.iter().map(|c| format!("{row}.{}", quote_ident(c))).collect::<Vec<_>>().join(", ");
    // (the function rather than `*=`: between two row constructors an operator compares
    // column by column, and a cast to record that prevents it is not kept in the trigger's
    // stored definition, which pg_dump prints and restores)
    format!("NOT pg_catalog.record_image_eq(ROW({}), ROW({}))", values("OLD"), values("NEW"))
}

/// Statements that (re)create the capture triggers. `table` and `function` are qualified and
/// quoted; `generation` tells the trigger's cache that the settings changed.
pub fn create_statements(table: &str, function: &str, generation: i64, condition: &str, row_triggers: bool) -> Vec<String> {
    let [inserts, deletes, updates, statement, _, rows] = TRIGGER_NAMES;
    let call = format!("EXECUTE FUNCTION {function}('{generation}')");
    let updates = format!("CREATE TRIGGER {updates} AFTER UPDATE ON {table} FOR EACH ROW WHEN ({condition}) {call}");
    let truncate = truncate_statement(table, function, generation);
    if row_triggers {
        vec![
            format!("CREATE TRIGGER {rows} AFTER INSERT OR DELETE ON {table} FOR EACH ROW {call}"),
            updates,
            format!("CREATE TRIGGER {statement} AFTER INSERT OR UPDATE OR DELETE ON {table} FOR EACH STATEMENT {call}"),
            truncate,
        ]
    } else {
        vec![
            format!("CREATE TRIGGER {inserts} AFTER INSERT ON {table} REFERENCING NEW TABLE AS outbox_inserted FOR EACH STATEMENT {call}"),
            format!("CREATE TRIGGER {deletes} AFTER DELETE ON {table} REFERENCING OLD TABLE AS outbox_deleted FOR EACH STATEMENT {call}"),
            updates,
            format!("CREATE TRIGGER {statement} AFTER UPDATE ON {table} FOR EACH STATEMENT {call}"),
            truncate,
        ]
    }
}

/// The TRUNCATE trigger, of an attached table or of a partition of one. It fires before the
/// rows go: a partition truncated by itself is captured as a DELETE of each of its rows (no
/// trigger of the partitioned table fires for it), and the TRUNCATE of a table comes before
/// what its user's AFTER TRUNCATE triggers write to it again.
pub fn truncate_statement(table: &str, function: &str, generation: i64) -> String {
    format!("CREATE TRIGGER {} BEFORE TRUNCATE ON {table} FOR EACH STATEMENT EXECUTE FUNCTION {function}('{generation}')", TRIGGER_NAMES[4])
}

pub fn drop_statement(table: &str, trigger: &str) -> String {
    format!("DROP TRIGGER {} ON {table}", quote_ident(trigger))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn identifiers_are_always_quoted() {
        assert_eq!(quote_ident("id"), "\"id\"");
        assert_eq!(quote_ident("Doc \"Id\""), "\"Doc \"\"Id\"\"\"");
    }

    #[test]
    fn condition_compares_the_watched_columns_by_their_bytes() {
        assert_eq!(
            update_condition(&["embedding", "Meta"]),
            "NOT pg_catalog.record_image_eq(ROW(OLD.\"embedding\", OLD.\"Meta\"), ROW(NEW.\"embedding\", NEW.\"Meta\"))"
        );
    }

    const TABLE: &str = "\"public\".\"chunks\"";
    const CONDITION: &str = "OLD.\"a\" IS DISTINCT FROM NEW.\"a\"";

    fn trigger_count(row_triggers: bool) -> usize {
        create_statements(TABLE, "f", 1, CONDITION, row_triggers).len()
    }

    #[test]
    fn a_plain_table_gets_transition_tables_for_inserts_and_deletes() {
        let create = create_statements(TABLE, "\"public\".outbox_capture", 7, CONDITION, false);
        assert_eq!(create.len(), 5);
        assert!(create[0].contains("AFTER INSERT ON \"public\".\"chunks\" REFERENCING NEW TABLE AS outbox_inserted FOR EACH STATEMENT"));
        assert!(create[1].contains("AFTER DELETE ON \"public\".\"chunks\" REFERENCING OLD TABLE AS outbox_deleted FOR EACH STATEMENT"));
        assert!(create[2].contains("AFTER UPDATE ON \"public\".\"chunks\" FOR EACH ROW WHEN (OLD.\"a\" IS DISTINCT FROM NEW.\"a\")"));
        assert!(create[3].contains("AFTER UPDATE ON \"public\".\"chunks\" FOR EACH STATEMENT"));
        assert!(create[4].contains("BEFORE TRUNCATE ON \"public\".\"chunks\" FOR EACH STATEMENT"));
        assert!(create.iter().all(|s| s.ends_with("\"public\".outbox_capture('7')")));
        assert_eq!(drop_statement("t", "outbox_capture_rows"), "DROP TRIGGER \"outbox_capture_rows\" ON t");
    }

    #[test]
    fn a_partitioned_table_gets_row_triggers_its_partitions_inherit() {
        let create = create_statements(TABLE, "\"public\".outbox_capture", 7, CONDITION, true);
        assert_eq!(create.len(), 4);
        assert!(create[0].contains("AFTER INSERT OR DELETE ON \"public\".\"chunks\" FOR EACH ROW"));
        assert!(create[1].contains("WHEN (OLD.\"a\" IS DISTINCT FROM NEW.\"a\")"));
        assert!(create[2].contains("AFTER INSERT OR UPDATE OR DELETE ON \"public\".\"chunks\" FOR EACH STATEMENT"));
        assert!(create[3].starts_with("CREATE TRIGGER outbox_capture_truncate BEFORE TRUNCATE"));
        assert!(create.iter().all(|s| !s.contains("REFERENCING")));
    }

    #[test]
    fn the_ddl_guard_knows_every_trigger() {
        let guard = include_str!("../sql/ddl.sql");
        for name in TRIGGER_NAMES {
            assert!(guard.contains(&format!("'{name}'")), "sql/ddl.sql must check for {name}");
        }
        // the guard counts a table's capture triggers to see that none was dropped
        assert!(guard.contains(&format!("THEN {} ELSE {} END", trigger_count(true), trigger_count(false))));
        assert!(create_statements(TABLE, "f", 1, CONDITION, false)
            .iter()
            .chain(&create_statements(TABLE, "f", 1, CONDITION, true))
            .all(|s| TRIGGER_NAMES.iter().any(|n| s.starts_with(&format!("CREATE TRIGGER {n} ")))));
    }
}
