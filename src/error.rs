//! The one error type of the extension. Every public function returns `Result<_, OutboxError>`
//! and the thin `#[pg_extern]` wrappers turn an error into an ERROR with a SQLSTATE that lets
//! callers branch on the kind of mistake.

use pgrx::pg_sys::panic::ErrorReport;
use pgrx::prelude::*;
use pgrx::spi;

#[derive(Debug, thiserror::Error)]
pub enum OutboxError {
    #[error("subscription \"{0}\" does not exist")]
    UnknownSubscription(String),
    #[error("subscription \"{0}\" delivers to its {1} sink through the delivery worker; consumers claim, ack and fail only pull subscriptions")]
    NotPull(String, String),
    #[error("permission denied for subscription \"{0}\": only roles with the privileges of its consumer_role \"{1}\" may claim, ack or fail its events")]
    NotConsumer(String, String),
    #[error("subscription \"{0}\" already exists")]
    DuplicateSubscription(String),
    #[error("invalid subscription name {0:?}: {1}")]
    InvalidSubscriptionName(String, &'static str),
    #[error("batch_size must be between 1 and {max}, got {got}")]
    BatchSize { got: i32, max: i32 },
    #[error("lease must be a positive interval, got {0}")]
    Lease(String),
    #[error("{0} must not be negative, got {1}")]
    NegativeInterval(&'static str, String),
    #[error("{0} must not be NULL")]
    NullArgument(&'static str),
    #[error("table {0} has no primary key; pass key_columns to say which columns identify a row")]
    NoKey(String),
    #[error("column \"{column}\" named in {argument} does not exist in table {table}")]
    UnknownColumn { table: String, column: String, argument: &'static str },
    #[error("{argument} must not be empty; pass NULL instead")]
    EmptyColumnList { argument: &'static str },
    #[error("{0} is not a table; outbox_attach needs an ordinary or partitioned table")]
    NotATable(String),
    #[error("table {0} is not attached to the outbox")]
    NotAttached(String),
    #[error("must be owner of table {0} to attach or detach it")]
    NotOwner(String),
    #[error("table {0} is in the partition tree of {1}, which is attached: each row would be captured twice; outbox_detach('{1}') first")]
    AttachedInPartitionTree(String, String),
    #[error("must be owner of function {0} to have the delivery worker call it, which it does as its owner")]
    NotFunctionOwner(String),
    #[error("invalid event_prefix {0:?}: {1}")]
    EventPrefix(String, &'static str),
    #[error("unknown sink {0:?}; expected one of: pull, function, http")]
    UnknownSink(String),
    #[error("invalid options for subscription: {0}")]
    InvalidOptions(String),
    #[error("outbox_replay needs since or ids to say which events to replay")]
    ReplayWithoutSelection,
    #[error("{0} must run in a READ COMMITTED transaction")]
    NeedsReadCommitted(&'static str),
    #[error("{0} returns a set of rows; call it in FROM, as in SELECT * FROM {0}()")]
    NotInSetContext(&'static str),
    #[error("extension \"outbox\" is not installed in this database")]
    NotInstalled,
    #[error("capture needs a database in UTF8 encoding; this one is in {0}")]
    NotUtf8(String),
    #[error("captured changes of table {0} could not be encoded: {1}")]
    Capture(String, String),
    #[error("column \"{column}\" of table {table} holds a value that a jsonb payload cannot: {reason}")]
    Unrepresentable { table: String, column: String, reason: String },
    #[error("log row {base} has a malformed {column} array; its events cannot be handed out")]
    MalformedLogRow { base: i64, column: &'static str },
    #[error("the ledger row of claim {claim} has a malformed {column} array")]
    MalformedClaim { claim: i64, column: &'static str },
    #[error("the row of subscription \"{0}\" moved while a claim held it locked; the claim changed nothing")]
    SubscriptionRowMoved(String),
    #[error(transparent)]
    Spi(#[from] spi::Error),
}

impl OutboxError {
    fn sqlstate(&self) -> PgSqlErrorCode {
        use OutboxError::*;
        use PgSqlErrorCode::*;
        match self {
            UnknownSubscription(_) | NotAttached(_) | NotInstalled => ERRCODE_UNDEFINED_OBJECT,
            DuplicateSubscription(_) => ERRCODE_DUPLICATE_OBJECT,
            NullArgument(_) => ERRCODE_NULL_VALUE_NOT_ALLOWED,
            NoKey(_) => ERRCODE_INVALID_TABLE_DEFINITION,
            UnknownColumn { .. } => ERRCODE_UNDEFINED_COLUMN,
            NotATable(_) => ERRCODE_WRONG_OBJECT_TYPE,
            AttachedInPartitionTree(..) => ERRCODE_OBJECT_NOT_IN_PREREQUISITE_STATE,
            NotOwner(_) | NotFunctionOwner(_) | NotConsumer(..) => ERRCODE_INSUFFICIENT_PRIVILEGE,
            NeedsReadCommitted(_) => ERRCODE_ACTIVE_SQL_TRANSACTION,
            NotInSetContext(_) | NotUtf8(_) => ERRCODE_FEATURE_NOT_SUPPORTED,
            NotPull(..) => ERRCODE_WRONG_OBJECT_TYPE,
            Capture(..) | SubscriptionRowMoved(_) | Spi(_) => ERRCODE_INTERNAL_ERROR,
            Unrepresentable { .. } => ERRCODE_DATA_EXCEPTION,
            MalformedLogRow { .. } | MalformedClaim { .. } => ERRCODE_DATA_CORRUPTED,
            InvalidSubscriptionName(..)
            | BatchSize { .. }
            | Lease(_)
            | NegativeInterval(..)
            | EmptyColumnList { .. }
            | EventPrefix(..)
            | UnknownSink(_)
            | InvalidOptions(_)
            | ReplayWithoutSelection => ERRCODE_INVALID_PARAMETER_VALUE,
        }
    }

    /// Raises the error as a Postgres ERROR. Never returns.
    pub fn raise(self) -> ! {
        ErrorReport::new(self.sqlstate(), format!("outbox: {self}"), function_name!()).report(PgLogLevel::ERROR);
        unreachable!("ERROR does not return")
    }
}

/// Unwraps a result for a `#[pg_extern]` wrapper, raising the error as a Postgres ERROR.
pub trait OrRaise<T> {
    fn or_raise(self) -> T;
}

impl<T> OrRaise<T> for Result<T, OutboxError> {
    fn or_raise(self) -> T {
        match self {
            Ok(value) => value,
            Err(err) => err.raise(),
        }
    }
}
