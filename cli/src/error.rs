//! What can go wrong, each with its exit code, printed as one line.

use std::process::ExitCode;

#[derive(Debug, thiserror::Error)]
pub enum CliError {
    /// The command line asks for something impossible (exit 2, as clap's own errors).
    #[error("{0}")]
    Usage(String),
    /// The database cannot be reached or refuses the login (exit 3).
    #[error("cannot connect to the database: {0}")]
    Connect(String),
    /// The database refused the operation, or it went away midway (exit 1).
    #[error("{0}")]
    Failed(String),
    /// The operator did not confirm a large change (exit 4).
    #[error("{0}")]
    Declined(String),
    /// The reader of the output went away, as `head` does when it has its lines: the command
    /// ends quietly (exit 0), as `status --watch` does.
    #[error("the output was closed")]
    OutputClosed,
}

impl CliError {
    pub fn exit_code(&self) -> ExitCode {
        ExitCode::from(match self {
            CliError::OutputClosed => 0,
            CliError::Failed(_) => 1,
            CliError::Usage(_) => 2,
            CliError::Connect(_) => 3,
            CliError::Declined(_) => 4,
        })
    }
}

/// One line from a database error: the server's message with its detail and hint, or the
/// client's own message when the connection broke.
pub fn describe(error: &postgres::Error) -> String {
    let text = match error.as_db_error() {
        Some(db) => {
            // the extension's messages name it already; the CLI adds its own prefix
            let message = db.message();
            let mut text = message.strip_prefix("outbox: ").unwrap_or(message).to_string();
            if let Some(detail) = db.detail() {
                text.push_str(&format!(" ({detail})"));
            }
            if let Some(hint) = db.hint() {
                text.push_str(&format!(" hint: {hint}"));
            }
            text
        }
        None => {
            // the client's message is terse ("error connecting to server"); its causes say why
            let mut text = error.to_string();
            let mut source = std::error::Error::source(error);
            while let Some(cause) = source {
                text.push_str(&format!(": {cause}"));
                source = cause.source();
            }
            text
        }
    };
    text.replace('\n', " ")
}

impl From<postgres::Error> for CliError {
    fn from(error: postgres::Error) -> Self {
        CliError::Failed(describe(&error))
    }
}

pub type Result<T> = std::result::Result<T, CliError>;
