//! Rows that join or leave a captured partition tree by DDL rather than by writes: `ALTER
//! TABLE … ATTACH PARTITION` brings a table's rows in, and `DETACH PARTITION` and `DROP TABLE`
//! of a partition (or `DROP SCHEMA … CASCADE` and `DROP OWNED` of its schema or owner) take
//! them out, without firing a row trigger. An event trigger reads the
//! command's parse tree for the tables concerned and captures their rows as UPSERTs or
//! DELETEs of the attached table (`capture::capture_table_rows`). It also keeps the TRUNCATE
//! trigger each partition of an attached tree has of its own (statement triggers are not
//! cloned to partitions) on the partitions that join, by ATTACH or CREATE TABLE … PARTITION
//! OF, and takes it off those that leave.

use std::collections::HashSet;

use pgrx::pg_sys;
use pgrx::prelude::*;
use pgrx::spi::SpiClient;
use pgrx::PgList;

use crate::error::{OrRaise, OutboxError};
use crate::ext::Extension;
use crate::queries;
use crate::shape::Op;
use crate::triggers::{drop_statement, truncate_statement, TRIGGER_NAMES};

function_info_v1!(pg_finfo_outbox_capture_partition_changes);

/// The event trigger function behind `outbox_capture_partition_changes`: ALTER TABLE at
/// ddl_command_end (the rows are where the command left them), DROP TABLE, DROP SCHEMA and
/// DROP OWNED at ddl_command_start (the rows are still there).
#[pg_guard]
#[unsafe(no_mangle)]
pub unsafe extern "C-unwind" fn outbox_capture_partition_changes(fcinfo: pg_sys::FunctionCallInfo) -> pg_sys::Datum {
    unsafe { capture_partition_changes(fcinfo) }.or_raise();
    pg_sys::Datum::from(0)
}

extension_sql!(
    r#"
CREATE FUNCTION @extschema@.outbox_capture_partition_changes() RETURNS event_trigger
    LANGUAGE c AS 'MODULE_PATHNAME', 'outbox_capture_partition_changes';
"#,
    name = "outbox_capture_partition_changes",
    requires = ["outbox_schema"]
);

unsafe fn capture_partition_changes(fcinfo: pg_sys::FunctionCallInfo) -> Result<(), OutboxError> {
    let command = unsafe {
        let context = (*fcinfo).context;
        if context.is_null() || (*context).type_ != pg_sys::NodeTag::T_EventTriggerData {
            return Err(OutboxError::Capture("?".into(), "outbox_capture_partition_changes() must be called as an event trigger".into()));
        }
        (*(context as *const pg_sys::EventTriggerData)).parsetree
    };
    if command.is_null() {
        return Ok(());
    }
    match unsafe { (*command).type_ } {
        pg_sys::NodeTag::T_AlterTableStmt => unsafe { capture_attached_and_detached(command.cast()) },
        pg_sys::NodeTag::T_DropStmt => unsafe { capture_dropped(command.cast()) },
        pg_sys::NodeTag::T_DropOwnedStmt => unsafe { capture_dropped_owned(command.cast()) },
        pg_sys::NodeTag::T_CreateStmt if unsafe { !(*command.cast::<pg_sys::CreateStmt>()).partbound.is_null() } => {
            give_new_partitions_their_trigger()
        }
        pg_sys::NodeTag::T_CreateSchemaStmt => give_new_partitions_their_trigger(),
        _ => Ok(()),
    }
}

/// ATTACH PARTITION: the partition's rows as UPSERTs; DETACH PARTITION (and its FINALIZE, which
/// completes a CONCURRENTLY that was interrupted): as DELETEs. The command holds locks on both
/// tables that keep writers of the partition out.
unsafe fn capture_attached_and_detached(statement: *mut pg_sys::AlterTableStmt) -> Result<(), OutboxError> {
    let commands = unsafe { PgList::<pg_sys::AlterTableCmd>::from_pg((*statement).cmds) };
    for command in commands.iter_ptr() {
        let op = match unsafe { (*command).subtype } {
            pg_sys::AlterTableType::AT_AttachPartition => Op::Upsert,
            pg_sys::AlterTableType::AT_DetachPartition => Op::Delete,
            #[cfg(not(feature = "pg13"))]
            pg_sys::AlterTableType::AT_DetachPartitionFinalize => Op::Delete,
            _ => continue,
        };
        let (parent, partition) = unsafe {
            let partition = (*command).def.cast::<pg_sys::PartitionCmd>();
            (relation_named((*statement).relation), relation_named((*partition).name))
        };
        if parent == pg_sys::InvalidOid || partition == pg_sys::InvalidOid {
            continue;
        }
        // (most partition trees have nothing attached: nothing to read or lock then)
        let Some(generation) = crate::capture::attached_generation(parent)? else {
            continue;
        };
        unsafe { capture_tree(parent, partition, op, pg_sys::ShareLock as pg_sys::LOCKMODE)? };
        // a partition joining gets its TRUNCATE trigger; one leaving loses it (TRUNCATE of
        // the table it is now would fail for want of an attachment)
        let extension = Extension::current()?;
        let generation = (op == Op::Upsert).then_some(generation);
        Spi::connect_mut(|client| set_partition_truncate_triggers(client, &extension, partition, generation))?;
    }
    Ok(())
}

/// CREATE TABLE … PARTITION OF a table in an attached tree (also inside CREATE SCHEMA): the
/// new partition gets its TRUNCATE trigger (its row triggers are cloned by Postgres). The
/// tables come from what the command made, not from its names, which an unqualified element
/// of CREATE SCHEMA, a temporary table of the same name or IF NOT EXISTS would misread.
fn give_new_partitions_their_trigger() -> Result<(), OutboxError> {
    let extension = Extension::current()?;
    let made = Spi::connect_mut(|client| {
        queries::run(client, &extension, &queries::PARTITIONS_MADE, &[])?
            .into_iter()
            .map(|row| Ok(row.get::<pg_sys::Oid>(1)?.unwrap_or(pg_sys::InvalidOid)))
            .collect::<Result<Vec<_>, OutboxError>>()
    })?;
    for table in made {
        if let Some(generation) = crate::capture::attached_generation(table)? {
            Spi::connect_mut(|client| set_partition_truncate_triggers(client, &extension, table, Some(generation)))?;
        }
    }
    Ok(())
}

/// DROP TABLE of a partition (or of a partitioned table below the attached one): its rows, and
/// those of every partition below it, as DELETEs, read before the drop. Dropping an attached
/// table itself, or a partition together with a table its attached ancestor is or is below,
/// captures nothing, as dropping a plain attached table does.
///
/// The drop has taken no lock yet, and the rows must not change between their reading and the
/// drop, so this takes the locks the drop is about to, in its order: table by table as the
/// statement names them, a partition's parent before the partition. It stops where the drop
/// will stop with an error (a name missing without IF EXISTS, not a table, not the caller's to
/// drop), and takes nothing when no named table is a partition of an attached tree: an
/// ordinary DROP TABLE waits for no lock it would not have waited for.
unsafe fn capture_dropped(statement: *mut pg_sys::DropStmt) -> Result<(), OutboxError> {
    match unsafe { (*statement).removeType } {
        pg_sys::ObjectType::OBJECT_TABLE => {}
        pg_sys::ObjectType::OBJECT_SCHEMA => return unsafe { capture_dropped_schemas(statement) },
        _ => return Ok(()),
    }
    let missing_ok = unsafe { (*statement).missing_ok };
    let names = unsafe { PgList::<pg_sys::List>::from_pg((*statement).objects) };
    let named: Vec<pg_sys::Oid> = names.iter_ptr().map(|name| unsafe { relation_named(pg_sys::makeRangeVarFromNameList(name)) }).collect();
    let extension = Extension::current()?;
    // what the drop will drop before it stops, and which of those are partitions to capture
    let mut dropped = Vec::new();
    for relid in named {
        let table = if relid == pg_sys::InvalidOid { None } else { dropped_table(&extension, relid)? };
        let Some(table) = table else {
            if missing_ok {
                continue;
            }
            break;
        };
        if !table.droppable {
            break;
        }
        dropped.push((relid, table));
    }
    let gone: HashSet<pg_sys::Oid> = dropped.iter().map(|(relid, _)| *relid).collect();
    unsafe { capture_leaving_partitions(&extension, dropped, &gone) }
}

/// DROP SCHEMA … CASCADE drops every table in the schemas, and with a partitioned one every
/// partition below it, wherever that is: the partitions among them whose attached tree stays
/// are captured as DROP TABLE of them is. (Without CASCADE a schema holding a table is not
/// dropped.) Nothing is read or locked unless the caller may drop every schema named: the
/// drop then stops with an error, as it would have without outbox. The schemas are locked
/// first, as the drop locks them, so that no table is made in one or moved into it meanwhile.
unsafe fn capture_dropped_schemas(statement: *mut pg_sys::DropStmt) -> Result<(), OutboxError> {
    if unsafe { (*statement).behavior } != pg_sys::DropBehavior::DROP_CASCADE {
        return Ok(());
    }
    let names = unsafe { PgList::<pg_sys::Node>::from_pg((*statement).objects) };
    let schemas: Vec<pg_sys::Oid> = names
        .iter_ptr()
        .map(|name| unsafe { pg_sys::get_namespace_oid(pg_sys::NameListToString(pg_sys::lappend(std::ptr::null_mut(), name.cast())), true) })
        .filter(|schema| *schema != pg_sys::InvalidOid)
        .collect();
    let extension = Extension::current()?;
    let caller = unsafe { pg_sys::GetUserId() };
    let droppable = queries::run_latest(&extension, &queries::SCHEMAS_DROPPABLE, &[schemas.clone().into(), caller.into()], |row| Ok(row.get::<bool>(1)))?;
    if droppable.first() != Some(&Some(true)) {
        return Ok(());
    }
    unsafe { capture_dropped_with(&extension, schemas, Vec::new()) }
}

/// DROP OWNED BY drops the roles' tables, CASCADE or not (a partition goes with its
/// parent), and with CASCADE their schemas with whatever is in them: the partitions among
/// them whose attached tree stays are captured as DROP TABLE of them is. Nothing is read or
/// locked unless the caller has the privileges of every role named (the drop stops
/// otherwise).
unsafe fn capture_dropped_owned(statement: *mut pg_sys::DropOwnedStmt) -> Result<(), OutboxError> {
    let specs = unsafe { PgList::<pg_sys::RoleSpec>::from_pg((*statement).roles) };
    let roles: Vec<pg_sys::Oid> = specs.iter_ptr().map(|role| unsafe { pg_sys::get_rolespec_oid(role, true) }).collect();
    let caller = unsafe { pg_sys::GetUserId() };
    // (the bootstrap superuser's objects are the system's: the drop refuses them)
    let refused = |role: pg_sys::Oid| {
        role == pg_sys::InvalidOid || role == pg_sys::Oid::from(pg_sys::BOOTSTRAP_SUPERUSERID) || !unsafe { pg_sys::has_privs_of_role(caller, role) }
    };
    if roles.iter().any(|&role| refused(role)) {
        return Ok(());
    }
    let extension = Extension::current()?;
    let mut schemas = Vec::new();
    if unsafe { (*statement).behavior } == pg_sys::DropBehavior::DROP_CASCADE {
        schemas = queries::run_latest(&extension, &queries::SCHEMAS_OWNED, &[roles.clone().into()], |row| Ok(row.get::<Vec<pg_sys::Oid>>(1)))?
            .into_iter()
            .flatten()
            .flatten()
            .collect();
    }
    unsafe { capture_dropped_with(&extension, schemas, roles) }
}

/// The tables in `schemas` or owned by `owners` go, with every partition below them: those
/// that are partitions of an attached tree that stays have their rows leave it. The schemas
/// are locked first. Locking the partitions to capture (and their parents) can wait for a
/// session that holds them, which can move one out of a schema, give it to another owner or
/// make a new one meanwhile: once the locks are held, the tables are listed again, until the
/// partitions to capture hold still. (Only they: a role's sessions making temporary tables
/// kept the whole list moving.)
unsafe fn capture_dropped_with(extension: &Extension, schemas: Vec<pg_sys::Oid>, owners: Vec<pg_sys::Oid>) -> Result<(), OutboxError> {
    if schemas.is_empty() && owners.is_empty() {
        return Ok(());
    }
    for &schema in &schemas {
        unsafe { pg_sys::LockDatabaseObject(pg_sys::NamespaceRelationId, schema, 0, pg_sys::AccessExclusiveLock as pg_sys::LOCKMODE) };
    }
    let list = || {
        queries::run_latest(extension, &queries::TABLES_DROPPED_WITH, &[schemas.clone().into(), owners.clone().into()], |row| {
            Ok((row.get::<pg_sys::Oid>(1).unwrap_or(pg_sys::InvalidOid), row.get::<pg_sys::Oid>(2)))
        })
    };
    let leaving = || -> Result<(Vec<(pg_sys::Oid, DroppedTable)>, HashSet<pg_sys::Oid>), OutboxError> {
        let tables = list()?;
        let gone: HashSet<pg_sys::Oid> = tables.iter().map(|(relid, _)| *relid).collect();
        let mut leaving = Vec::new();
        for &(relid, parent) in &tables {
            if parent.is_some_and(|parent| !gone.contains(&parent)) {
                if let Some(table) = dropped_table(extension, relid)?.filter(|table| in_attached_tree(table, &gone)) {
                    leaving.push((relid, table));
                }
            }
        }
        Ok((leaving, gone))
    };
    let (mut partitions, _) = leaving()?;
    loop {
        lock_with_parents(&partitions);
        let (again, gone) = leaving()?;
        let settled = again.iter().map(|(relid, t)| (*relid, t.parent)).eq(partitions.iter().map(|(relid, t)| (*relid, t.parent)));
        partitions = again;
        if settled {
            // (each is locked, with its parent, and read as it is now)
            return unsafe { capture_partitions(&partitions, &gone) };
        }
    }
}

/// Whether `table` is a partition of an attached tree that stays: no table `gone` is its
/// attached table or above it.
fn in_attached_tree(table: &DroppedTable, gone: &HashSet<pg_sys::Oid>) -> bool {
    !table.attached_and_above.is_empty() && !table.attached_and_above.iter().any(|a| gone.contains(a))
}

/// Takes the lock a drop takes of each table, after its parent's, as the drop does.
fn lock_with_parents(tables: &[(pg_sys::Oid, DroppedTable)]) {
    let exclusive = pg_sys::AccessExclusiveLock as pg_sys::LOCKMODE;
    for (relid, table) in tables {
        if let Some(parent) = table.parent {
            unsafe { pg_sys::LockRelationOid(parent, exclusive) };
        }
        unsafe { pg_sys::LockRelationOid(*relid, exclusive) };
    }
}

/// Of the tables in `dropped`, the partitions of an attached tree that stays (no table `gone`
/// is it or above it) have their rows, and those of every partition below them, captured as
/// DELETEs. Each is locked first, after its parent, as the drop is about to lock them; nothing
/// is locked when none is such a partition.
unsafe fn capture_leaving_partitions(
    extension: &Extension,
    dropped: Vec<(pg_sys::Oid, DroppedTable)>,
    gone: &HashSet<pg_sys::Oid>,
) -> Result<(), OutboxError> {
    if !dropped.iter().any(|(_, table)| in_attached_tree(table, gone)) {
        return Ok(());
    }
    let exclusive = pg_sys::AccessExclusiveLock as pg_sys::LOCKMODE;
    lock_with_parents(&dropped);
    // with the locks held, as the tables are now: one may have joined or left a tree while
    // this waited (a partition moved to another parent has that one locked too, late)
    let mut now = Vec::with_capacity(dropped.len());
    for (relid, before) in dropped {
        let Some(table) = dropped_table(extension, relid)? else { continue };
        if let Some(parent) = table.parent.filter(|parent| before.parent != Some(*parent)) {
            unsafe { pg_sys::LockRelationOid(parent, exclusive) };
        }
        now.push((relid, table));
    }
    unsafe { capture_partitions(&now, gone) }
}

/// The rows of each of `tables` (locked with their parents) that is a partition of an
/// attached tree that stays, and of every partition below it, as DELETEs.
unsafe fn capture_partitions(tables: &[(pg_sys::Oid, DroppedTable)], gone: &HashSet<pg_sys::Oid>) -> Result<(), OutboxError> {
    for (relid, table) in tables {
        if let (true, Some(parent)) = (in_attached_tree(table, gone), table.parent) {
            unsafe { capture_tree(parent, *relid, Op::Delete, pg_sys::AccessExclusiveLock as pg_sys::LOCKMODE)? };
        }
    }
    Ok(())
}

/// `relid` as the current user drops it, as it is now (see run_latest); None when it is gone
/// (dropped by another session meanwhile: the drop finds it gone too). Read as the extension's
/// owner: the caller need not read outbox_attachments.
fn dropped_table(extension: &Extension, relid: pg_sys::Oid) -> Result<Option<DroppedTable>, OutboxError> {
    let caller = unsafe { pg_sys::GetUserId() };
    let rows = extension.as_owner(|| {
        queries::run_latest(extension, &queries::DROPPED_TABLE, &[relid.into(), caller.into()], |row| {
            Ok(DroppedTable {
                droppable: row.get::<bool>(1).unwrap_or(false),
                parent: row.get::<pg_sys::Oid>(2),
                attached_and_above: row.get::<Vec<pg_sys::Oid>>(3).unwrap_or_default(),
            })
        })
    })?;
    Ok(rows.into_iter().next())
}

/// A table a DROP TABLE names, as it is now.
struct DroppedTable {
    /// A table (not a view, sequence or foreign table) the caller may drop.
    droppable: bool,
    /// The partitioned table it is a partition of.
    parent: Option<pg_sys::Oid>,
    /// For a partition in an attached tree, the attached table and every table above it;
    /// otherwise empty.
    attached_and_above: Vec<pg_sys::Oid>,
}

/// The rows of every table in the partition tree of `table` as events of `op` of the
/// attachment that `parent` belongs to, each table locked in `lock` mode first.
unsafe fn capture_tree(parent: pg_sys::Oid, table: pg_sys::Oid, op: Op, lock: pg_sys::LOCKMODE) -> Result<(), OutboxError> {
    let extension = Extension::current()?;
    let tables = tables_in_tree(&extension, table)?;
    // every table locked, parents first as writers and DDL lock them, before any is read
    for &(relid, _) in &tables {
        unsafe { pg_sys::LockRelationOid(relid, lock) };
    }
    for (relid, holds_rows) in tables {
        if holds_rows {
            unsafe {
                let relation = pg_sys::table_open(relid, pg_sys::NoLock as pg_sys::LOCKMODE);
                let captured = crate::capture::capture_table_rows(parent, relation, op);
                pg_sys::table_close(relation, pg_sys::NoLock as pg_sys::LOCKMODE);
                captured?;
            }
        }
    }
    Ok(())
}

/// `table` and every table of its partition tree, parents first, each with whether it holds
/// rows of its own (an ordinary table).
/// (Current, as the DDL that asks sees them: see run_latest.)
pub fn tables_in_tree(extension: &Extension, table: pg_sys::Oid) -> Result<Vec<(pg_sys::Oid, bool)>, OutboxError> {
    queries::run_latest(extension, &queries::TABLES_IN_TREE, &[table.into()], |row| {
        Ok((row.get::<pg_sys::Oid>(1).unwrap_or(pg_sys::InvalidOid), row.get::<bool>(2).unwrap_or(false)))
    })
}

/// Puts the TRUNCATE trigger of a partition (src/triggers.rs) on every table holding rows in
/// the partition tree of `table`, `table` included, replacing one there already; with
/// `generation` None, removes it. As the extension owner, as `outbox_attach` makes triggers.
pub fn set_partition_truncate_triggers(
    client: &mut SpiClient<'_>,
    extension: &Extension,
    table: pg_sys::Oid,
    generation: Option<i64>,
) -> Result<(), OutboxError> {
    let function = format!("{}.outbox_capture", extension.schema);
    extension.as_owner(|| {
        for (relid, holds_rows) in tables_in_tree(extension, table)? {
            if !holds_rows {
                continue;
            }
            let quoted = unsafe { crate::capture::quoted_name(relid)? };
            // (looked up first: DROP TRIGGER IF EXISTS tells the caller it skipped, per partition)
            let truncate = vec![TRIGGER_NAMES[4].to_string()];
            if !queries::run(client, extension, &queries::CAPTURE_TRIGGERS, &[relid.into(), truncate.into()])?.is_empty() {
                client.update(&drop_statement(&quoted, TRIGGER_NAMES[4]), None, &[])?;
            }
            if let Some(generation) = generation {
                client.update(&truncate_statement(&quoted, &function, generation), None, &[])?;
            }
        }
        Ok(())
    })
}

/// The table `name` names, without locking it; InvalidOid when there is none (`IF EXISTS`).
unsafe fn relation_named(name: *mut pg_sys::RangeVar) -> pg_sys::Oid {
    unsafe { pg_sys::RangeVarGetRelidExtended(name, pg_sys::NoLock as pg_sys::LOCKMODE, pg_sys::RVROption::RVR_MISSING_OK, None, std::ptr::null_mut()) }
}
