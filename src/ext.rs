//! Where the extension lives and who owns it. SQL run from Rust is qualified with the
//! extension's schema, and work done on behalf of a writer or consumer runs as the owner.

use std::cell::{Cell, RefCell};
use std::rc::Rc;

use pgrx::pg_sys;
use pgrx::prelude::*;

use crate::error::OutboxError;

pub struct Extension {
    pub oid: pg_sys::Oid,
    /// The schema name, quoted for use in SQL text.
    pub schema: String,
    pub owner: pg_sys::Oid,
    /// `outbox_log_0` … `outbox_log_7`, which capture writes to directly.
    pub log_segments: Vec<pg_sys::Oid>,
    pub event_id_seq: pg_sys::Oid,
}

thread_local! {
    static CURRENT: RefCell<Option<Rc<Extension>>> = const { RefCell::new(None) };
    /// Counts ended transactions: the extension can only be dropped or created by one.
    static TRANSACTIONS: Cell<u64> = const { Cell::new(0) };
    static CHECKED_IN: Cell<u64> = const { Cell::new(u64::MAX) };
}

pub fn init() {
    unsafe { pg_sys::RegisterXactCallback(Some(on_xact_end), std::ptr::null_mut()) };
}

#[pg_guard]
unsafe extern "C-unwind" fn on_xact_end(event: pg_sys::XactEvent::Type, _arg: *mut std::ffi::c_void) {
    use pg_sys::XactEvent::*;
    if matches!(event, XACT_EVENT_COMMIT | XACT_EVENT_ABORT | XACT_EVENT_PARALLEL_COMMIT | XACT_EVENT_PARALLEL_ABORT | XACT_EVENT_PREPARE) {
        TRANSACTIONS.with(|t| t.set(t.get() + 1));
    }
}

impl Extension {
    /// The installed extension of the current database. The catalog is consulted once per
    /// transaction (the capture trigger runs for every statement), and the schema and owner
    /// are read again when the extension was dropped and created anew.
    pub fn current() -> Result<Rc<Extension>, OutboxError> {
        let transaction = TRANSACTIONS.with(Cell::get);
        let cached = CURRENT.with(|c| c.borrow().clone());
        if let Some(cached) = &cached {
            if CHECKED_IN.with(Cell::get) == transaction {
                return Ok(cached.clone());
            }
        }
        let oid = unsafe { pg_sys::get_extension_oid(c"outbox".as_ptr(), true) };
        if oid == pg_sys::InvalidOid {
            return Err(OutboxError::NotInstalled);
        }
        if let Some(cached) = cached.filter(|e| e.oid == oid) {
            CHECKED_IN.with(|c| c.set(transaction));
            return Ok(cached);
        }
        // runs under any search_path (from the capture trigger): everything is qualified
        let (schema, owner, log_segments, event_id_seq) = Spi::connect(|client| {
            let row = client
                .select(
                    "SELECT pg_catalog.quote_ident(n.nspname), e.extowner, \
                            ARRAY(SELECT c.oid FROM pg_catalog.pg_class c \
                                  WHERE c.relnamespace OPERATOR(pg_catalog.=) n.oid \
                                    AND c.relname OPERATOR(pg_catalog.~) '^outbox_log_[0-9]+$' \
                                  ORDER BY pg_catalog.substr(c.relname, 12)::pg_catalog.int4), \
                            (SELECT c.oid FROM pg_catalog.pg_class c \
                             WHERE c.relnamespace OPERATOR(pg_catalog.=) n.oid \
                               AND c.relname OPERATOR(pg_catalog.=) 'outbox_event_id_seq') \
                     FROM pg_catalog.pg_extension e \
                     JOIN pg_catalog.pg_namespace n ON n.oid OPERATOR(pg_catalog.=) e.extnamespace \
                     WHERE e.oid OPERATOR(pg_catalog.=) $1",
                    Some(1),
                    &[oid.into()],
                )?
                .first();
            Ok::<_, OutboxError>((
                row.get::<String>(1)?,
                row.get::<pg_sys::Oid>(2)?,
                row.get::<Vec<pg_sys::Oid>>(3)?,
                row.get::<pg_sys::Oid>(4)?,
            ))
        })?;
        let extension = Rc::new(Extension {
            oid,
            schema: schema.ok_or(OutboxError::NotInstalled)?,
            owner: owner.ok_or(OutboxError::NotInstalled)?,
            log_segments: log_segments.unwrap_or_default(),
            event_id_seq: event_id_seq.ok_or(OutboxError::NotInstalled)?,
        });
        crate::queries::forget_plans();
        CURRENT.with(|c| *c.borrow_mut() = Some(extension.clone()));
        CHECKED_IN.with(|c| c.set(transaction));
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
