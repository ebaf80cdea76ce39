//! outbox: a transactional outbox for embedding tables.
//!
//! Pure logic (policy, shape, ordering, triggers) has plain tests; the rest is the pgrx glue:
//! the capture trigger, the SQL API and the queries they run.

use pgrx::prelude::*;

/// `PG_FUNCTION_INFO_V1` for a C function written by hand (pgrx declares it only for the
/// functions it wraps): `function_info_v1!(pg_finfo_<function name>)`.
macro_rules! function_info_v1 {
    ($finfo:ident) => {
        #[unsafe(no_mangle)]
        #[doc(hidden)]
        pub extern "C" fn $finfo() -> &'static pgrx::pg_sys::Pg_finfo_record {
            const V1: pgrx::pg_sys::Pg_finfo_record = pgrx::pg_sys::Pg_finfo_record { api_version: 1 };
            &V1
        }
    };
}

mod admin;
mod api;
mod append;
mod arrays;
mod attach;
mod capture;
mod consume;
mod error;
mod ext;
mod guc;
mod jsonb;
mod metrics;
mod ordering;
mod partitions;
mod policy;
mod queries;
mod shape;
mod sink;
mod triggers;
mod tupdesc;
mod worker;

#[cfg(any(test, feature = "pg_test"))]
mod tests;

::pgrx::pg_module_magic!(name, version);

extension_sql_file!("../sql/schema.sql", name = "outbox_schema", bootstrap);
extension_sql_file!(
    "../sql/api.sql",
    name = "outbox_api",
    requires = ["outbox_capture", outbox_ack, outbox_fail]
);
extension_sql_file!("../sql/ddl.sql", name = "outbox_ddl", requires = ["outbox_schema", "outbox_capture_partition_changes"]);
extension_sql_file!("../sql/privileges.sql", name = "outbox_privileges", finalize);

#[pg_guard]
pub extern "C-unwind" fn _PG_init() {
    guc::init();
    ext::init();
    // Transaction callbacks run newest first: consume's decides how a commit waits for its
    // WAL, so it must see the log rows capture's writes at pre-commit.
    consume::init();
    capture::init();
    worker::init();
}

#[cfg(test)]
pub mod pg_test {
    pub fn setup(_options: Vec<&str>) {}

    #[must_use]
    pub fn postgresql_conf_options() -> Vec<&'static str> {
        vec![]
    }
}
