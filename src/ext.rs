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
    /// The subscriptions have a straddle floor (0.4.0). False in a database whose SQL is still
    /// an older release's, which this library keeps claiming from until it is updated.
    pub has_straddle_floor: bool,
}

thread_local! {
    static CURRENT: RefCell<Option<Rc<Extension>>> = const { RefCell::new(None) };
}

pub fn init() {
    unsafe { pg_sys::CacheRegisterRelcacheCallback(Some(on_relcache_invalidation), pg_sys::Datum::from(0)) };
}

/// Dropping the extension drops its relations, which invalidates them in every backend: the
/// cached lookup goes with them, and the capture trigger needs no catalog lookup otherwise.
/// (The update to 0.4.0 drops an index of the log segments, which invalidates them too.)
#[pg_guard]
unsafe extern "C-unwind" fn on_relcache_invalidation(_arg: pg_sys::Datum, relid: pg_sys::Oid) {
    CURRENT.with(|c| {
        let mut current = c.borrow_mut();
        let ours = current.as_ref().is_some_and(|e| e.event_id_seq == relid || e.log_segments.contains(&relid));
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
        // runs under any search_path (from the capture trigger): everything is qualified
        let (schema, owner, log_segments, event_id_seq, has_straddle_floor) = Spi::connect(|client| {
            let row = client
                .select(
                    "SELECT pg_catalog.quote_ident(n.nspname), e.extowner, \
                            ARRAY(SELECT c.oid FROM pg_catalog.pg_class c \
                                  WHERE c.relnamespace OPERATOR(pg_catalog.=) n.oid \
                                    AND c.relname OPERATOR(pg_catalog.~) '^outbox_log_[0-9]+$' \
                                  ORDER BY pg_catalog.substr(c.relname, 12)::pg_catalog.int4), \
                            (SELECT c.oid FROM pg_catalog.pg_class c \
                             WHERE c.relnamespace OPERATOR(pg_catalog.=) n.oid \
                               AND c.relname OPERATOR(pg_catalog.=) 'outbox_event_id_seq'), \
                            EXISTS (SELECT FROM pg_catalog.pg_attribute a \
                                    JOIN pg_catalog.pg_class c ON c.oid OPERATOR(pg_catalog.=) a.attrelid \
                                    WHERE c.relnamespace OPERATOR(pg_catalog.=) n.oid \
                                      AND c.relname OPERATOR(pg_catalog.=) 'outbox_subscriptions' \
                                      AND a.attname OPERATOR(pg_catalog.=) 'straddle_floor' AND NOT a.attisdropped) \
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
                row.get::<bool>(5)?,
            ))
        })?;
        let extension = Rc::new(Extension {
            schema: schema.ok_or(OutboxError::NotInstalled)?,
            owner: owner.ok_or(OutboxError::NotInstalled)?,
            log_segments: log_segments.unwrap_or_default(),
            event_id_seq: event_id_seq.ok_or(OutboxError::NotInstalled)?,
            has_straddle_floor: has_straddle_floor.unwrap_or(false),
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
