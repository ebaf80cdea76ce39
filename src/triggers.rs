//! The capture triggers `outbox_attach` puts on a table, as DDL text. Pure Rust.

/// Trigger names, chosen to sort after most user trigger names so that capture sees rows as
/// the user's own AFTER triggers left them.
pub const TRIGGER_NAMES: [&str; 4] =
    ["outbox_capture_rows", "outbox_capture_updates", "outbox_capture_statement", "outbox_capture_truncate"];

/// Double-quotes an identifier. Always quoting is valid SQL and needs no keyword list.
pub fn quote_ident(name: &str) -> String {
    format!("\"{}\"", name.replace('"', "\"\""))
}

/// A column whose change makes an UPDATE an event.
pub struct Watched<'a> {
    pub name: &'a str,
    /// Its type's equality operator lives in pg_catalog, so `IS DISTINCT FROM` resolves to it
    /// under the pinned search_path. Other types are compared by their text form.
    pub builtin_equality: bool,
}

/// The WHEN condition of the UPDATE trigger: true when any watched column changed. Postgres
/// evaluates it before queuing the trigger, so updates of unwatched columns cost nothing.
pub fn update_condition(columns: &[Watched]) -> String {
    columns
        .iter()
        .map(|c| {
            let name = quote_ident(c.name);
            if c.builtin_equality {
                format!("OLD.{name} IS DISTINCT FROM NEW.{name}")
            } else {
                format!("OLD.{name}::pg_catalog.text IS DISTINCT FROM NEW.{name}::pg_catalog.text")
            }
        })
        .collect::<Vec<_>>()
        .join(" OR ")
}

/// Statements that (re)create the capture triggers. `table` and `function` are qualified and
/// quoted; `generation` tells the trigger's cache that the settings changed.
pub fn create_statements(table: &str, function: &str, generation: i64, condition: &str) -> Vec<String> {
    let [rows, updates, statement, truncate] = TRIGGER_NAMES;
    vec![
        format!("CREATE TRIGGER {rows} AFTER INSERT OR DELETE ON {table} FOR EACH ROW EXECUTE FUNCTION {function}('{generation}')"),
        format!(
            "CREATE TRIGGER {updates} AFTER UPDATE ON {table} FOR EACH ROW WHEN ({condition}) EXECUTE FUNCTION {function}('{generation}')"
        ),
        format!(
            "CREATE TRIGGER {statement} AFTER INSERT OR UPDATE OR DELETE ON {table} FOR EACH STATEMENT EXECUTE FUNCTION {function}('{generation}')"
        ),
        format!("CREATE TRIGGER {truncate} AFTER TRUNCATE ON {table} FOR EACH STATEMENT EXECUTE FUNCTION {function}('{generation}')"),
    ]
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
    fn condition_compares_each_watched_column() {
        let columns = [
            Watched { name: "embedding", builtin_equality: true },
            Watched { name: "Meta", builtin_equality: false },
        ];
        assert_eq!(
            update_condition(&columns),
            "OLD.\"embedding\" IS DISTINCT FROM NEW.\"embedding\" OR \
             OLD.\"Meta\"::pg_catalog.text IS DISTINCT FROM NEW.\"Meta\"::pg_catalog.text"
        );
    }

    #[test]
    fn statements_cover_rows_updates_statements_and_truncate() {
        let create = create_statements("\"public\".\"chunks\"", "\"public\".outbox_capture", 7, "OLD.\"a\" IS DISTINCT FROM NEW.\"a\"");
        assert_eq!(create.len(), 4);
        assert!(create[0].contains("AFTER INSERT OR DELETE ON \"public\".\"chunks\" FOR EACH ROW"));
        assert!(create[1].contains("WHEN (OLD.\"a\" IS DISTINCT FROM NEW.\"a\")"));
        assert!(create[2].contains("FOR EACH STATEMENT"));
        assert!(create[3].contains("AFTER TRUNCATE"));
        assert!(create.iter().all(|s| s.ends_with("\"public\".outbox_capture('7')")));
        assert_eq!(drop_statement("t", "outbox_capture_rows"), "DROP TRIGGER \"outbox_capture_rows\" ON t");
    }

    #[test]
    fn the_ddl_guard_knows_every_trigger() {
        let guard = include_str!("../sql/ddl.sql");
        for name in TRIGGER_NAMES {
            assert!(guard.contains(&format!("'{name}'")), "sql/ddl.sql must check for {name}");
        }
        assert!(guard.contains(&format!("<>) {}", TRIGGER_NAMES.len())));
    }
}
