//! Reaching the database the way psql does: `--dsn` (or `DATABASE_URL`), else the libpq
//! `PG*` variables with libpq's defaults, then finding the schema the extension lives in.

use std::path::Path;
use std::str::FromStr;
use std::time::Duration;

use postgres::{Client, Config, NoTls};

use crate::error::{describe, CliError, Result};

/// The connection settings from a DSN (key=value or a postgres:// URL) or, without one, from
/// the environment as `lookup` reports it.
pub fn config(dsn: Option<&str>, lookup: impl Fn(&str) -> Option<String>) -> Result<Config> {
    let mut config = match dsn {
        Some(dsn) => Config::from_str(dsn).map_err(|e| CliError::Usage(format!("invalid connection string: {e}")))?,
        None => {
            let mut config = Config::new();
            let user = lookup("PGUSER").or_else(|| lookup("USER")).unwrap_or_else(|| "postgres".into());
            let host = lookup("PGHOST").unwrap_or_else(|| {
                // Debian's libpq looks in this socket directory first
                let socket = "/var/run/postgresql";
                if Path::new(socket).is_dir() { socket.into() } else { "localhost".into() }
            });
            config.host(&host);
            if let Some(port) = lookup("PGPORT") {
                config.port(port.parse().map_err(|_| CliError::Usage(format!("PGPORT is not a port number: {port:?}")))?);
            }
            config.dbname(&lookup("PGDATABASE").unwrap_or_else(|| user.clone()));
            if let Some(password) = lookup("PGPASSWORD") {
                config.password(password);
            }
            if let Some(timeout) = lookup("PGCONNECT_TIMEOUT") {
                let seconds: u64 =
                    timeout.parse().map_err(|_| CliError::Usage(format!("PGCONNECT_TIMEOUT is not a number of seconds: {timeout:?}")))?;
                config.connect_timeout(Duration::from_secs(seconds));
            }
            config.user(&user);
            config
        }
    };
    if config.get_connect_timeout().is_none() {
        config.connect_timeout(Duration::from_secs(10));
    }
    if config.get_application_name().is_none() {
        config.application_name("outbox-cli");
    }
    Ok(config)
}

/// A connection to a database with the extension, and the schema to qualify its names with.
pub struct Session {
    pub client: Client,
    schema: String,
}

impl Session {
    pub fn open(config: &Config) -> Result<Session> {
        let mut client = config.connect(NoTls).map_err(|e| CliError::Connect(describe(&e)))?;
        let row = client.query_opt(
            "SELECT pg_catalog.quote_ident(n.nspname) FROM pg_catalog.pg_extension e \
             JOIN pg_catalog.pg_namespace n ON n.oid = e.extnamespace WHERE e.extname = 'outbox'",
            &[],
        )?;
        let Some(row) = row else {
            let database: String = client.query_one("SELECT pg_catalog.current_database()::text", &[])?.get(0);
            return Err(CliError::Failed(format!(
                "the outbox extension is not installed in database \"{database}\" (run CREATE EXTENSION outbox)"
            )));
        };
        Ok(Session { client, schema: row.get(0) })
    }

    /// `text` with `@extschema@` replaced by the extension's schema, as in the extension's SQL.
    pub fn sql(&self, text: &str) -> String {
        text.replace("@extschema@", &self.schema)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use postgres::config::Host;
    use std::collections::HashMap;

    fn from_env(vars: &[(&str, &str)]) -> Result<Config> {
        let vars: HashMap<String, String> = vars.iter().map(|(k, v)| (k.to_string(), v.to_string())).collect();
        config(None, |name| vars.get(name).cloned())
    }

    #[test]
    fn libpq_variables_are_honoured() {
        let config = from_env(&[("PGHOST", "/tmp/pg"), ("PGPORT", "5433"), ("PGUSER", "ops"), ("PGDATABASE", "app")]).unwrap();
        assert_eq!(config.get_hosts(), &[Host::Unix("/tmp/pg".into())]);
        assert_eq!(config.get_ports(), &[5433]);
        assert_eq!(config.get_user(), Some("ops"));
        assert_eq!(config.get_dbname(), Some("app"));
        assert_eq!(config.get_connect_timeout(), Some(&Duration::from_secs(10)));
    }

    #[test]
    fn the_database_defaults_to_the_user_name() {
        let config = from_env(&[("USER", "alice"), ("PGHOST", "db.internal")]).unwrap();
        assert_eq!(config.get_user(), Some("alice"));
        assert_eq!(config.get_dbname(), Some("alice"));
        assert_eq!(config.get_hosts(), &[Host::Tcp("db.internal".into())]);
    }

    #[test]
    fn a_dsn_wins_over_the_environment() {
        let config = config(Some("postgresql://u@h:6000/d?connect_timeout=3"), |_| Some("ignored".into())).unwrap();
        assert_eq!(config.get_dbname(), Some("d"));
        assert_eq!(config.get_ports(), &[6000]);
        assert_eq!(config.get_connect_timeout(), Some(&Duration::from_secs(3)));
    }

    #[test]
    fn bad_settings_are_usage_errors() {
        assert!(matches!(from_env(&[("PGPORT", "x")]), Err(CliError::Usage(m)) if m.contains("PGPORT")));
        assert!(matches!(config(Some("host=a port=b"), |_| None), Err(CliError::Usage(m)) if m.contains("invalid connection string")));
    }
}
