//! Where the extension lives and who owns it. SQL run from Rust is qualified with the
//! extension's schema, and work done on behalf of a writer or consumer runs as the owner.

use std::cell::RefCell;
use std::rc::Rc;

use pgrx::pg_sys;
use pgrx::prelude::*;

use crate::error::OutboxError;

pub struct Extension {
    pub oid: pg_sys::Oid,
    /// The schema name, quoted for use in SQL text.
    pub schema: String,
    pub owner: pg_sys::Oid,
}

thread_local! {
    static CURRENT: RefCell<Option<Rc<Extension>>> = const { RefCell::new(None) };
}

impl Extension {
    /// The installed extension of the current database. The catalog lookup is cached per
    /// backend and redone when the extension is dropped and created again.
    pub fn current() -> Result<Rc<Extension>, OutboxError> {
        let oid = unsafe { pg_sys::get_extension_oid(c"outbox".as_ptr(), true) };
        if oid == pg_sys::InvalidOid {
            return Err(OutboxError::NotInstalled);
        }
        if let Some(cached) = CURRENT.with(|c| c.borrow().clone()).filter(|e| e.oid == oid) {
            return Ok(cached);
        }
        let (schema, owner) = Spi::connect(|client| {
            let row = client
                .select(
                    "SELECT pg_catalog.quote_ident(n.nspname), e.extowner \
                     FROM pg_catalog.pg_extension e \
                     JOIN pg_catalog.pg_namespace n ON n.oid OPERATOR(pg_catalog.=) e.extnamespace \
                     WHERE e.oid OPERATOR(pg_catalog.=) $1",
                    Some(1),
                    &[oid.into()],
                )?
                .first();
            Ok::<_, OutboxError>((row.get::<String>(1)?, row.get::<pg_sys::Oid>(2)?))
        })?;
        let extension = Rc::new(Extension {
            oid,
            schema: schema.ok_or(OutboxError::NotInstalled)?,
            owner: owner.ok_or(OutboxError::NotInstalled)?,
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
