//! Where the extension lives and who owns it. SQL run from Rust is qualified with the
//! extension's schema, and work done on behalf of a writer or consumer runs as the owner.

use std::cell::RefCell;
use std::rc::Rc;

use pgrx::pg_sys;
use pgrx::prelude::*;

use crate::error::OutboxError;

pub struct Extension {
    /// The schema name, quoted for use in SQL text.
    pub schema: String,
    pub owner: pg_sys::Oid,
    /// `outbox_log_0` … `outbox_log_7`, which capture writes to directly.
    pub log_segments: Vec<pg_sys::Oid>,
    pub event_id_seq: pg_sys::Oid,
    /// `outbox_rotation`, whose table lock keeps a purge and a subscription being created apart.
    pub rotation: pg_sys::Oid,
    /// `outbox_subscriptions`, whose columns say which release's SQL the database has.
    subscriptions: pg_sys::Oid,
    /// The subscriptions have a straddle floor (0.4.0). False in a database whose SQL is still
    /// an older release's, which this library keeps claiming from until it is updated.
    pub has_straddle_floor: bool,
    /// The subscriptions record the roles they name by oid: a function sink's owner and the
    /// consumer_role (0.8.0).
    pub records_roles: bool,
    /// The subscriptions record what was committed before they were made (0.9.0).
    pub records_start: bool,
}

thread_local! {
    static CURRENT: RefCell<Option<Rc<Extension>>> = const { RefCell::new(None) };
}

pub fn init() {
    unsafe { pg_sys::CacheRegisterRelcacheCallback(Some(on_relcache_invalidation), pg_sys::Datum::from(0)) };
}

/// Dropping the extension drops its relations, which invalidates them in every backend: the
/// cached lookup goes with them, and the capture trigger needs no catalog lookup otherwise.
/// (The update to 0.4.0 drops an index of the log segments, which invalidates them too, and
/// the update to 0.8.0 adds columns to the subscriptions: a session open across it kept
/// treating the database as 0.7.0, and made subscriptions without their roles recorded.)
#[pg_guard]
unsafe extern "C-unwind" fn on_relcache_invalidation(_arg: pg_sys::Datum, relid: pg_sys::Oid) {
    CURRENT.with(|c| {
        let mut current = c.borrow_mut();
        let ours = current.as_ref().is_some_and(|e| e.event_id_seq == relid || e.subscriptions == relid || e.log_segments.contains(&relid));
        if relid == pg_sys::InvalidOid || ours {
            *current = None;
        }
    });
}

impl Extension {
    /// The installed extension of the current database, looked up once per backend.
    pub fn current() -> Result<Rc<Extension>, OutboxError> {
        if let Some(cached) = CURRENT.with(|c| c.borrow().clone()) {
            return Ok(cached);
        }
        let oid = unsafe { pg_sys::get_extension_oid(c"outbox".as_ptr(), true) };
        if oid == pg_sys::InvalidOid {
            return Err(OutboxError::NotInstalled);
        }
        // Catalog lookups rather than a query: every backend that captures or consumes does this
        // once, and the query, the backend's first through SPI, cost 6 million instructions.
        let (namespace, owner) = unsafe { extension_row(oid) }.ok_or(OutboxError::NotInstalled)?;
        let relation = |name: &str| {
            let name = std::ffi::CString::new(name).expect("relation names have no NUL byte");
            unsafe { pg_sys::get_relname_relid(name.as_ptr(), namespace) }
        };
        let schema = unsafe {
            let name = pg_sys::get_namespace_name(namespace);
            if name.is_null() {
                return Err(OutboxError::NotInstalled);
            }
            std::ffi::CStr::from_ptr(pg_sys::quote_identifier(name)).to_string_lossy().into_owned()
        };
        // slots from 0 up, consecutive: capture picks a segment by its slot's place here
        let log_segments: Vec<pg_sys::Oid> =
            (0..).map(|slot| relation(&format!("outbox_log_{slot}"))).take_while(|&relid| relid != pg_sys::InvalidOid).collect();
        let event_id_seq = relation("outbox_event_id_seq");
        let subscriptions = relation("outbox_subscriptions");
        let rotation = relation("outbox_rotation");
        if [event_id_seq, subscriptions, rotation].contains(&pg_sys::InvalidOid) {
            return Err(OutboxError::NotInstalled);
        }
        let has_column = |name: &std::ffi::CStr| unsafe { pg_sys::get_attnum(subscriptions, name.as_ptr()) } != 0;
        let (has_straddle_floor, records_roles, records_start) =
            (has_column(c"straddle_floor"), has_column(c"consumer_role"), has_column(c"start_seq"));
        let extension = Rc::new(Extension {
            schema,
            owner,
            log_segments,
            event_id_seq,
            rotation,
            subscriptions,
            has_straddle_floor,
            records_roles,
            records_start,
        });
        crate::queries::forget_plans();
        CURRENT.with(|c| *c.borrow_mut() = Some(extension.clone()));
        Ok(extension)
    }

    /// Runs `f` with the privileges of the extension owner, the way foreign-key triggers act
    /// as the table owner: writers and consumers need no privileges on the outbox tables.
    /// If `f` raises an ERROR, (sub)transaction abort restores the user.
    pub fn as_owner<R>(&self, f: impl FnOnce() -> R) -> R {
        let mut user = pg_sys::InvalidOid;
        let mut context = 0;
        unsafe {
            pg_sys::GetUserIdAndSecContext(&mut user, &mut context);
            pg_sys::SetUserIdAndSecContext(self.owner, context | pg_sys::SECURITY_LOCAL_USERID_CHANGE as i32);
        }
        let result = f();
        unsafe { pg_sys::SetUserIdAndSecContext(user, context) };
        result
    }
}

/// The schema and owner of the extension `oid`, from its `pg_extension` row.
unsafe fn extension_row(oid: pg_sys::Oid) -> Option<(pg_sys::Oid, pg_sys::Oid)> {
    unsafe {
        let catalog = pg_sys::table_open(pg_sys::ExtensionRelationId, pg_sys::AccessShareLock as pg_sys::LOCKMODE);
        let mut key = pg_sys::ScanKeyData::default();
        pg_sys::ScanKeyInit(
            &mut key,
            pg_sys::Anum_pg_extension_oid as pg_sys::AttrNumber,
            pg_sys::BTEqualStrategyNumber as pg_sys::StrategyNumber,
            pg_sys::F_OIDEQ.into(),
            oid.into(),
        );
        let scan = pg_sys::systable_beginscan(catalog, pg_sys::ExtensionOidIndexId.into(), true, std::ptr::null_mut(), 1, &mut key);
        let tuple = pg_sys::systable_getnext(scan);
        let found = (!tuple.is_null()).then(|| {
            let row = &*pg_sys::heap_tuple_get_struct::<pg_sys::FormData_pg_extension>(tuple);
            (row.extnamespace, row.extowner)
        });
        pg_sys::systable_endscan(scan);
        pg_sys::table_close(catalog, pg_sys::AccessShareLock as pg_sys::LOCKMODE);
        found
    }
}
