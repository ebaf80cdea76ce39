//! `outbox_attach` and `outbox_detach`: validate the request as the caller, then write the
//! configuration and the capture triggers as the extension owner.

use std::collections::HashSet;
use std::ffi::CStr;

use pgrx::pg_sys;
use pgrx::prelude::*;
use pgrx::spi::SpiClient;
use pgrx::PgRelation;

use crate::consume::{required, single};
use crate::error::OutboxError;
use crate::ext::Extension;
use crate::queries::{self as q, run};
use crate::shape::check_event_prefix;
use crate::triggers::{create_statements, drop_statement, quote_ident, update_condition, TRIGGER_NAMES};

struct TableFacts {
    display: String,
    quoted: String,
    relkind: String,
    /// A partitioned table, a partition, or a table with inheritance parents or children:
    /// captured by row triggers, which fire for the rows of the table they are on. (Transition
    /// tables miss rows routed to a partition through its parent, and hold the rows of
    /// inheritance children without saying which table each is from.)
    row_triggers: bool,
    caller_owns: bool,
    primary_key: Vec<String>,
    /// every live column, in order
    columns: Vec<String>,
}

fn table_facts(client: &mut SpiClient<'_>, extension: &Extension, source: &PgRelation) -> Result<TableFacts, OutboxError> {
    let row = single(run(client, extension, &q::TABLE_FACTS, &[source.oid().into()])?)?;
    let relkind: String = required(&row, 1)?;
    let in_hierarchy: bool = required(&row, 4)?;
    let columns = source
        .tuple_desc()
        .iter()
        .filter(|a| !a.attisdropped)
        .map(|a| unsafe { CStr::from_ptr(a.attname.data.as_ptr()) }.to_string_lossy().into_owned())
        .collect();
    Ok(TableFacts {
        display: format!("{}.{}", source.namespace(), source.name()),
        quoted: format!("{}.{}", quote_ident(source.namespace()), quote_ident(source.name())),
        row_triggers: in_hierarchy,
        relkind,
        caller_owns: required(&row, 2)?,
        primary_key: required(&row, 3)?,
        columns,
    })
}

impl TableFacts {
    /// Checks a column list against the table: no NULLs, no unknown names, not empty.
    fn columns_named(&self, list: Option<Vec<Option<String>>>, argument: &'static str) -> Result<Option<Vec<String>>, OutboxError> {
        let Some(list) = list else { return Ok(None) };
        if list.is_empty() {
            return Err(OutboxError::EmptyColumnList { argument });
        }
        let mut seen = HashSet::new();
        let mut names = Vec::with_capacity(list.len());
        for name in list {
            let name = name.unwrap_or_else(|| "NULL".to_string());
            if !self.columns.contains(&name) {
                return Err(OutboxError::UnknownColumn { table: self.display.clone(), column: name, argument });
            }
            if seen.insert(name.clone()) {
                names.push(name);
            }
        }
        Ok(Some(names))
    }
}

pub fn attach(
    source: &PgRelation,
    payload_columns: Option<Vec<Option<String>>>,
    watch_columns: Option<Vec<Option<String>>>,
    event_prefix: &str,
    key_columns: Option<Vec<Option<String>>>,
) -> Result<(), OutboxError> {
    // Payloads are JSON text built in Rust strings, and handed out as jsonb: UTF-8 throughout.
    if unsafe { pg_sys::GetDatabaseEncoding() } != pg_sys::pg_enc::PG_UTF8 as i32 {
        let name = unsafe { CStr::from_ptr(pg_sys::GetDatabaseEncodingName()) }.to_string_lossy().into_owned();
        return Err(OutboxError::NotUtf8(name));
    }
    let extension = Extension::current()?;
    Spi::connect_mut(|client| {
        let facts = table_facts(client, &extension, source)?;
        if facts.relkind != "r" && facts.relkind != "p" {
            return Err(OutboxError::NotATable(facts.display));
        }
        if !facts.caller_owns {
            return Err(OutboxError::NotOwner(facts.display));
        }
        // Partitions carry their attached ancestor's row triggers under the same names: two
        // attachments in one tree would collide there (Postgres refused with a trigger error).
        // Two attaches in one tree at once would both pass the check: the second waits for the
        // first here, on a lock of the tree's root as an object, which no relation lock (of
        // writers, DDL, vacuum) conflicts with or waits in a circle with. As the owner: the
        // caller need not read outbox_attachments.
        let root = extension.as_owner(|| run(client, &extension, &q::PARTITION_ROOT, &[source.oid().into()]))?;
        if let Some(root) = root.first().get::<pg_sys::Oid>(1)? {
            unsafe { pg_sys::LockDatabaseObject(pg_sys::RelationRelationId, root, 0, pg_sys::ExclusiveLock as pg_sys::LOCKMODE) };
        }
        let relative = extension.as_owner(|| run(client, &extension, &q::ATTACHED_IN_PARTITION_TREE, &[source.oid().into()]))?;
        if let Some(row) = relative.into_iter().next() {
            let attached: pg_sys::Oid = required(&row, 1)?;
            return Err(OutboxError::AttachedInPartitionTree(facts.display, unsafe { crate::capture::qualified_name(attached) }));
        }
        check_event_prefix(event_prefix).map_err(|why| OutboxError::EventPrefix(event_prefix.to_string(), why))?;
        let key = match facts.columns_named(key_columns, "key_columns")? {
            Some(key) => key,
            None if facts.primary_key.is_empty() => return Err(OutboxError::NoKey(facts.display)),
            None => facts.primary_key.clone(),
        };
        let payload = facts.columns_named(payload_columns, "payload_columns")?;
        let watch = facts.columns_named(watch_columns, "watch_columns")?;

        // A key change is always an event, so the key is always watched.
        let watched: Vec<&str> = match &watch {
            None => facts.columns.iter().map(String::as_str).collect(),
            Some(watch) => facts.columns.iter().filter(|name| watch.contains(name) || key.contains(name)).map(String::as_str).collect(),
        };
        let condition = update_condition(&watched);

        extension.as_owner(|| {
            let saved = run(
                client,
                &extension,
                &q::SAVE_ATTACHMENT,
                &[source.oid().into(), key.into(), payload.into(), watch.into(), event_prefix.into()],
            )?;
            let generation: i64 = required(&single(saved)?, 1)?;
            drop_capture_triggers(client, &extension, source, &facts.quoted)?;
            let function = format!("{}.outbox_capture", extension.schema);
            for statement in create_statements(&facts.quoted, &function, generation, &condition, facts.row_triggers) {
                client.update(statement.as_str(), None, &[])?;
            }
            if facts.relkind == "p" {
                crate::partitions::set_partition_truncate_triggers(client, &extension, source.oid(), Some(generation))?;
            }
            Ok(())
        })
    })
}

pub fn detach(source: &PgRelation) -> Result<(), OutboxError> {
    let extension = Extension::current()?;
    Spi::connect_mut(|client| {
        let facts = table_facts(client, &extension, source)?;
        if !facts.caller_owns {
            return Err(OutboxError::NotOwner(facts.display));
        }
        extension.as_owner(|| {
            if run(client, &extension, &q::DELETE_ATTACHMENT, &[source.oid().into()])?.is_empty() {
                return Err(OutboxError::NotAttached(facts.display.clone()));
            }
            if facts.relkind == "p" {
                crate::partitions::set_partition_truncate_triggers(client, &extension, source.oid(), None)?;
            }
            drop_capture_triggers(client, &extension, source, &facts.quoted)
        })
    })
}

fn drop_capture_triggers(
    client: &mut SpiClient<'_>,
    extension: &Extension,
    source: &PgRelation,
    quoted: &str,
) -> Result<(), OutboxError> {
    let names: Vec<String> = TRIGGER_NAMES.iter().map(|n| n.to_string()).collect();
    let existing = run(client, extension, &q::CAPTURE_TRIGGERS, &[source.oid().into(), names.into()])?
        .into_iter()
        .map(|row| required::<String>(&row, 1))
        .collect::<Result<Vec<_>, _>>()?;
    for trigger in existing {
        client.update(drop_statement(quoted, &trigger).as_str(), None, &[])?;
    }
    Ok(())
}
