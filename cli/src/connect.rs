//! Reaching the database the way psql does: the settings of `--dsn` (or `DATABASE_URL`), the
//! libpq `PG*` variables for those it leaves unset, then libpq's defaults, and the password file
//! when no password is given; then finding the schema the extension lives in.

use std::collections::BTreeMap;
use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};
use std::str::FromStr;
use std::time::Duration;

use postgres::{Client, Config, NoTls};

use crate::error::{describe, CliError, Result};

/// Connection settings by libpq's keywords, as a DSN names them.
type Settings = BTreeMap<String, String>;

/// The settings a DSN may leave unset and the variables libpq then takes them from.
const ENVIRONMENT: [(&str, &str); 8] = [
    ("host", "PGHOST"),
    ("port", "PGPORT"),
    ("user", "PGUSER"),
    ("dbname", "PGDATABASE"),
    ("password", "PGPASSWORD"),
    ("passfile", "PGPASSFILE"),
    ("connect_timeout", "PGCONNECT_TIMEOUT"),
    ("sslmode", "PGSSLMODE"),
];

/// Debian's libpq looks for the server's socket here when no host is given.
const DEFAULT_SOCKET_DIR: &str = "/var/run/postgresql";

/// The connection settings from a DSN (key=value or a postgres:// URL) and the environment as
/// `lookup` reports it, as libpq puts them together.
pub fn config(dsn: Option<&str>, lookup: impl Fn(&str) -> Option<String>) -> Result<Config> {
    let invalid = |e: String| CliError::Usage(format!("invalid connection string: {e}"));
    let mut settings = match dsn {
        Some(dsn) => parse_dsn(dsn).map_err(invalid)?,
        None => Settings::new(),
    };
    let sslmode_source = if settings.contains_key("sslmode") { "in the connection string" } else { "from PGSSLMODE" };
    for (setting, variable) in ENVIRONMENT {
        if settings.contains_key(setting) {
            continue;
        }
        // libpq treats an empty variable as unset, and so its default applies
        if let Some(value) = lookup(variable).filter(|v| !v.is_empty()) {
            check_variable(variable, &value)?;
            settings.insert(setting.into(), value);
        }
    }
    if let Some(mode) = settings.remove("sslmode") {
        check_sslmode(&mode, sslmode_source)?;
    }
    let user = settings.entry("user".into()).or_insert_with(|| lookup("USER").unwrap_or_else(|| "postgres".into())).clone();
    settings.entry("dbname".into()).or_insert(user);
    if !settings.contains_key("host") && !settings.contains_key("hostaddr") {
        let socket = Path::new(DEFAULT_SOCKET_DIR).is_dir();
        settings.insert("host".into(), if socket { DEFAULT_SOCKET_DIR } else { "localhost" }.into());
    }
    let passfile = settings.remove("passfile").map(PathBuf::from).or_else(|| lookup("HOME").map(|home| Path::new(&home).join(".pgpass")));
    if let Some(passfile) = passfile.filter(|_| settings.get("password").is_none_or(String::is_empty)) {
        match password_from_file(&passfile, &settings) {
            Ok(Some(password)) => {
                settings.insert("password".into(), password);
            }
            Ok(None) => {}
            Err(warning) => eprintln!("outbox: warning: {warning}"),
        }
    }
    // (the client library's error says only "invalid connection string"; its source names
    // the option or value)
    let mut config = Config::from_str(&key_values(&settings))
        .map_err(|e| invalid(std::error::Error::source(&e).map_or_else(|| e.to_string(), ToString::to_string)))?;
    if config.get_connect_timeout().is_none() {
        config.connect_timeout(Duration::from_secs(10));
    }
    if config.get_application_name().is_none() {
        config.application_name("outbox-cli");
    }
    Ok(config)
}

fn check_variable(variable: &str, value: &str) -> Result<()> {
    let valid = match variable {
        "PGPORT" => value.split(',').all(|port| port.is_empty() || port.parse::<u16>().is_ok()),
        "PGCONNECT_TIMEOUT" => value.parse::<u64>().is_ok(),
        _ => true,
    };
    match (valid, variable) {
        (true, _) => Ok(()),
        (false, "PGPORT") => Err(CliError::Usage(format!("PGPORT is not a port number: {value:?}"))),
        (false, _) => Err(CliError::Usage(format!("{variable} is not a number of seconds: {value:?}"))),
    }
}

/// The CLI has no TLS: a mode that demands it is refused rather than quietly connecting in
/// plaintext. The others connect without TLS, as libpq's would when the server offers none.
fn check_sslmode(mode: &str, source: &str) -> Result<()> {
    match mode {
        "disable" | "allow" | "prefer" => Ok(()),
        "require" | "verify-ca" | "verify-full" => Err(CliError::Usage(format!(
            "sslmode={mode} {source} needs TLS, and the outbox CLI does not speak TLS: use sslmode=disable or prefer, \
             a local socket, or an SSH tunnel"
        ))),
        _ => Err(CliError::Usage(format!(
            "invalid sslmode {mode:?} {source}: expected disable, allow, prefer, require, verify-ca or verify-full"
        ))),
    }
}

/// The settings of a DSN, in either of libpq's two forms.
fn parse_dsn(dsn: &str) -> std::result::Result<Settings, String> {
    match ["postgresql://", "postgres://"].iter().find_map(|scheme| dsn.strip_prefix(scheme)) {
        Some(uri) => parse_uri(uri),
        None => parse_key_values(dsn),
    }
}

/// `host=/tmp port = 5433 password='it\'s'`: values quoted or not, `\` escaping the next character.
fn parse_key_values(dsn: &str) -> std::result::Result<Settings, String> {
    let mut settings = Settings::new();
    let mut chars = dsn.chars().peekable();
    loop {
        while chars.next_if(|c| c.is_whitespace()).is_some() {}
        let mut key = String::new();
        while let Some(c) = chars.next_if(|c| !c.is_whitespace() && *c != '=') {
            key.push(c);
        }
        if key.is_empty() {
            return match chars.peek() {
                None => Ok(settings),
                Some(_) => Err("missing a keyword before \"=\"".into()),
            };
        }
        while chars.next_if(|c| c.is_whitespace()).is_some() {}
        if chars.next() != Some('=') {
            return Err(format!("missing \"=\" after \"{key}\""));
        }
        while chars.next_if(|c| c.is_whitespace()).is_some() {}
        let quoted = chars.next_if_eq(&'\'').is_some();
        let mut value = String::new();
        loop {
            match chars.next() {
                Some('\'') if quoted => break,
                Some(c) if c.is_whitespace() && !quoted => break,
                Some('\\') => value.extend(chars.next()),
                Some(c) => value.push(c),
                None if quoted => return Err(format!("unterminated quoted value of \"{key}\"")),
                None => break,
            }
        }
        settings.insert(key, value);
    }
}

/// `user:password@host:port,host2/dbname?key=value&...` (after the scheme), percent-encoded, as
/// libpq reads it: a host without a port leaves the port to PGPORT, as a missing part leaves
/// its setting to the environment.
fn parse_uri(uri: &str) -> std::result::Result<Settings, String> {
    let mut settings = Settings::new();
    let mut rest = uri;
    // user information ends at the first "@" before the path
    if let Some(at) = rest.find(['@', '/']).filter(|&i| rest[i..].starts_with('@')) {
        let (user, password) = match rest[..at].split_once(':') {
            Some((user, password)) => (user, Some(password)),
            None => (&rest[..at], None),
        };
        for (key, value) in [("user", Some(user)), ("password", password)] {
            if let Some(value) = value.filter(|v| !v.is_empty()) {
                settings.insert(key.into(), percent_decode(value)?);
            }
        }
        rest = &rest[at + 1..];
    }
    let end = rest.find(['/', '?']).unwrap_or(rest.len());
    let (authority, mut rest) = rest.split_at(end);
    let (mut hosts, mut ports) = (Vec::new(), Vec::new());
    for chunk in authority.split(',') {
        let (host, port) = match chunk.strip_prefix('[') {
            Some(bracketed) => {
                let (host, after) = bracketed.split_once(']').ok_or_else(|| format!("missing \"]\" in {chunk:?}"))?;
                match after {
                    "" => (host, None),
                    _ => (host, Some(after.strip_prefix(':').ok_or_else(|| format!("unexpected {after:?} after \"]\""))?)),
                }
            }
            None => match chunk.split_once(':') {
                Some((host, port)) => (host, Some(port)),
                None => (chunk, None),
            },
        };
        hosts.push(percent_decode(host)?);
        ports.push(port.map(percent_decode).transpose()?.unwrap_or_default());
    }
    for (key, values) in [("host", hosts), ("port", ports)] {
        let joined = values.join(",");
        if !joined.is_empty() {
            settings.insert(key.into(), joined);
        }
    }
    if let Some(path) = rest.strip_prefix('/') {
        let end = path.find('?').unwrap_or(path.len());
        if end > 0 {
            settings.insert("dbname".into(), percent_decode(&path[..end])?);
        }
        rest = &path[end..];
    }
    for parameter in rest.strip_prefix('?').into_iter().flat_map(|query| query.split('&')).filter(|p| !p.is_empty()) {
        let (key, value) = parameter.split_once('=').ok_or_else(|| format!("missing \"=\" in URI query parameter {parameter:?}"))?;
        let (key, value) = (percent_decode(key)?, percent_decode(value)?);
        if !key.chars().all(|c| c.is_ascii_alphanumeric() || c == '_') {
            return Err(format!("invalid connection option {key:?}"));
        }
        // libpq's spelling for JDBC users
        if key == "ssl" && value == "true" {
            settings.insert("sslmode".into(), "require".into());
        } else {
            settings.insert(key, value);
        }
    }
    Ok(settings)
}

fn percent_decode(text: &str) -> std::result::Result<String, String> {
    let mut bytes = Vec::with_capacity(text.len());
    let mut rest = text.as_bytes();
    while let Some((&byte, tail)) = rest.split_first() {
        if byte != b'%' {
            bytes.push(byte);
            rest = tail;
            continue;
        }
        let decoded = tail
            .get(..2)
            .filter(|hex| hex.iter().all(u8::is_ascii_hexdigit))
            .and_then(|hex| u8::from_str_radix(std::str::from_utf8(hex).ok()?, 16).ok())
            .filter(|&b| b != 0)
            .ok_or_else(|| format!("invalid percent-encoding in {text:?}"))?;
        bytes.push(decoded);
        rest = &tail[2..];
    }
    String::from_utf8(bytes).map_err(|_| format!("{text:?} is not UTF-8 once decoded"))
}

/// The settings as a key=value DSN, every value quoted, for the client library to read.
fn key_values(settings: &Settings) -> String {
    let quoted = |value: &str| value.replace('\\', "\\\\").replace('\'', "\\'");
    settings.iter().map(|(key, value)| format!("{key}='{}'", quoted(value))).collect::<Vec<_>>().join(" ")
}

/// The password for the first host from a libpq password file, or why the file is ignored.
/// Its lines are `hostname:port:database:username:password`, the first match wins, `*`
/// matches anything and `\` escapes `:` and `\`. As in libpq, the default socket directory
/// (or no host at all) is looked up as `localhost`, and a file others may read is ignored.
fn password_from_file(path: &Path, settings: &Settings) -> std::result::Result<Option<String>, String> {
    let Ok(metadata) = std::fs::metadata(path) else { return Ok(None) };
    if !metadata.is_file() {
        return Err(format!("password file \"{}\" is not a plain file, so it is ignored", path.display()));
    }
    if metadata.permissions().mode() & 0o077 != 0 {
        return Err(format!(
            "password file \"{}\" has group or world access, so it is ignored; permissions should be u=rw (0600) or less",
            path.display()
        ));
    }
    let Ok(text) = std::fs::read(path) else { return Ok(None) };
    // one password serves every host of a multi-host DSN here, so the first host's is taken
    let first = |key: &str| settings.get(key).and_then(|v| v.split(',').next()).filter(|v| !v.is_empty());
    let host = first("host").or_else(|| first("hostaddr")).filter(|h| *h != DEFAULT_SOCKET_DIR).unwrap_or("localhost");
    let wanted = [host, first("port").unwrap_or("5432"), first("dbname").unwrap_or(""), first("user").unwrap_or("")];
    Ok(String::from_utf8_lossy(&text).lines().filter(|line| !line.is_empty() && !line.starts_with('#')).find_map(|line| {
        let fields = split_unescaped_colons(line);
        let matches = fields.len() >= 5 && fields.iter().zip(wanted).all(|(field, value)| *field == "*" || unescape(field) == value);
        matches.then(|| unescape(fields[4]))
    }))
}

fn split_unescaped_colons(line: &str) -> Vec<&str> {
    let mut fields = Vec::new();
    let (mut start, mut escaped) = (0, false);
    for (i, c) in line.char_indices() {
        match c {
            _ if escaped => escaped = false,
            '\\' => escaped = true,
            ':' => {
                fields.push(&line[start..i]);
                start = i + 1;
            }
            _ => {}
        }
    }
    fields.push(&line[start..]);
    fields
}

fn unescape(field: &str) -> String {
    let mut chars = field.chars();
    let mut out = String::with_capacity(field.len());
    while let Some(c) = chars.next() {
        match c {
            '\\' => out.push(chars.next().unwrap_or('\\')),
            c => out.push(c),
        }
    }
    out
}

/// Where `config` connects, as psql names it when it cannot: the servers and ports.
fn target(config: &Config) -> String {
    let ports = config.get_ports();
    let hosts: Vec<String> = config
        .get_hosts()
        .iter()
        .enumerate()
        .map(|(i, host)| {
            // (one port for all hosts, or one each)
            let port = ports.get(i).or(ports.first()).copied().unwrap_or(5432);
            match host {
                postgres::config::Host::Tcp(name) => format!("server at {name}, port {port}"),
                postgres::config::Host::Unix(directory) => format!("socket {}/.s.PGSQL.{port}", directory.display()),
            }
        })
        .collect();
    hosts.join("; ")
}

/// A connection to a database with the extension, and the schema to qualify its names with.
pub struct Session {
    pub client: Client,
    schema: String,
}

impl Session {
    pub fn open(config: &Config) -> Result<Session> {
        let mut client = config.connect(NoTls).map_err(|e| CliError::Connect(format!("{} ({})", describe(&e), target(config))))?;
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
        let config = config(Some("postgresql://u@h:6000/d?connect_timeout=3&sslmode=disable"), |_| Some("ignored".into())).unwrap();
        assert_eq!(config.get_user(), Some("u"));
        assert_eq!(config.get_hosts(), &[Host::Tcp("h".into())]);
        assert_eq!(config.get_dbname(), Some("d"));
        assert_eq!(config.get_ports(), &[6000]);
        assert_eq!(config.get_connect_timeout(), Some(&Duration::from_secs(3)));
    }

    #[test]
    fn a_dsn_takes_what_it_leaves_unset_from_the_environment() {
        let vars = |vars: &'static [(&str, &str)]| move |name: &str| vars.iter().find(|(k, _)| *k == name).map(|(_, v)| v.to_string());
        let env = vars(&[("PGHOST", "/tmp/pg"), ("PGPORT", "5433"), ("PGUSER", "ops"), ("PGPASSWORD", "pw"), ("PGCONNECT_TIMEOUT", "4")]);
        let connection = config(Some("dbname=app"), env).unwrap();
        assert_eq!(connection.get_hosts(), &[Host::Unix("/tmp/pg".into())]);
        assert_eq!(connection.get_ports(), &[5433]);
        assert_eq!(connection.get_user(), Some("ops"));
        assert_eq!(connection.get_dbname(), Some("app"));
        assert_eq!(connection.get_password(), Some(&b"pw"[..]));
        assert_eq!(connection.get_connect_timeout(), Some(&Duration::from_secs(4)));
        // a URL host without a port leaves it to PGPORT, as in libpq
        let connection = config(Some("postgres://u@db.internal/app"), env).unwrap();
        assert_eq!((connection.get_hosts(), connection.get_ports()), (&[Host::Tcp("db.internal".into())][..], &[5433][..]));
        assert_eq!(connection.get_password(), Some(&b"pw"[..]));
        // no host at all: libpq's default
        let connection = config(Some("dbname=app"), vars(&[("USER", "alice")])).unwrap();
        assert_eq!(connection.get_user(), Some("alice"));
        assert!(matches!(connection.get_hosts(), [Host::Unix(_)] | [Host::Tcp(_)]), "{:?}", connection.get_hosts());
    }

    #[test]
    fn dsns_are_read_as_libpq_reads_them() {
        let connection = config(Some("postgresql://svc:p%40ss@[::1]:6000,db2/my%20db?application_name=x&host=%2Ftmp%2Fpg"), |_| None).unwrap();
        assert_eq!((connection.get_user(), connection.get_password()), (Some("svc"), Some(&b"p@ss"[..])));
        assert_eq!(connection.get_hosts(), &[Host::Unix("/tmp/pg".into())], "a query parameter overrides the authority");
        assert_eq!((connection.get_dbname(), connection.get_application_name()), (Some("my db"), Some("x")));
        let connection = config(Some("postgresql://[::1]:6000,db2/d"), |_| None).unwrap();
        assert_eq!(connection.get_hosts(), &[Host::Tcp("::1".into()), Host::Tcp("db2".into())]);
        assert_eq!(connection.get_ports(), &[6000, 5432]);
        let connection = config(Some(r"host = '/tmp/my dir' password='it\'s' user=a\ b"), |_| None).unwrap();
        assert_eq!(connection.get_hosts(), &[Host::Unix("/tmp/my dir".into())]);
        assert_eq!((connection.get_password(), connection.get_user()), (Some(&b"it's"[..]), Some("a b")));
        for bad in ["host", "host='x", "postgresql://[::1/d", "postgresql://h/d?sslmode", "postgresql://h/%zz", "user=a frob=1"] {
            assert!(matches!(config(Some(bad), |_| None), Err(CliError::Usage(m)) if m.starts_with("invalid connection string")), "{bad}");
        }
    }

    #[test]
    fn tls_modes_are_refused_as_the_cli_has_no_tls() {
        for (dsn, env) in [
            (None, Some("require")),
            (Some("host=h sslmode=verify-full"), None),
            (Some("postgresql://h/d?sslmode=verify-ca"), Some("disable")),
            (Some("postgresql://h/d?ssl=true"), None),
        ] {
            let error = config(dsn, |name| if name == "PGSSLMODE" { env.map(String::from) } else { None }).unwrap_err();
            assert!(matches!(&error, CliError::Usage(m) if m.contains("does not speak TLS") && m.contains("SSH tunnel")), "{dsn:?} {env:?}: {error}");
        }
        for mode in ["disable", "allow", "prefer"] {
            assert!(from_env(&[("PGSSLMODE", mode)]).is_ok(), "{mode}");
            assert!(config(Some(&format!("host=h sslmode={mode}")), |_| None).is_ok(), "{mode}");
        }
        assert!(config(Some("host=h sslmode=disable"), |name| (name == "PGSSLMODE").then(|| "require".into())).is_ok(), "the DSN's mode wins");
        assert!(matches!(from_env(&[("PGSSLMODE", "on")]), Err(CliError::Usage(m)) if m.contains("invalid sslmode \"on\" from PGSSLMODE")));
    }

    /// A password file with `lines` and `mode`, removed when dropped.
    struct Passfile(PathBuf);

    impl Passfile {
        fn new(name: &str, mode: u32, lines: &[&str]) -> Passfile {
            let path = std::env::temp_dir().join(format!("outbox-cli-pgpass-{}-{name}", std::process::id()));
            std::fs::write(&path, lines.join("\n") + "\n").unwrap();
            std::fs::set_permissions(&path, std::fs::Permissions::from_mode(mode)).unwrap();
            Passfile(path)
        }

        fn password_for(&self, dsn: &str, vars: &[(&str, &str)]) -> Option<String> {
            let path = self.0.display().to_string();
            let config = config(Some(dsn), |name| match name {
                "PGPASSFILE" => Some(path.clone()),
                _ => vars.iter().find(|(k, _)| *k == name).map(|(_, v)| v.to_string()),
            })
            .unwrap();
            config.get_password().map(|p| String::from_utf8(p.to_vec()).unwrap())
        }
    }

    impl Drop for Passfile {
        fn drop(&mut self) {
            let _ = std::fs::remove_file(&self.0);
        }
    }

    #[test]
    fn the_password_file_is_read_like_libpq() {
        let file = Passfile::new(
            "read",
            0o600,
            &[
                "# host:port:database:user:password",
                "db.internal:5432:other:ops:wrong-database",
                "db.internal:5432:app:ops:first",
                "db.internal:5432:app:ops:second",
                "db.internal:6000:*:ops:any-database",
                "localhost:5432:app:ops:socket",
                "/tmp/pg:5432:app:ops:own-socket",
                r"*:*:*:o\:ps:pa\:ss\\word:ignored-after-an-unescaped-colon",
                r"\*:*:*:*:not-a-wildcard",
                "*:*:*:*:fallback",
            ],
        );
        assert_eq!(file.password_for("host=db.internal user=ops dbname=app", &[]).as_deref(), Some("first"));
        assert_eq!(file.password_for("host=db.internal port=6000 user=ops dbname=x", &[]).as_deref(), Some("any-database"));
        assert_eq!(file.password_for("dbname=app", &[("PGHOST", DEFAULT_SOCKET_DIR), ("PGUSER", "ops")]).as_deref(), Some("socket"));
        assert_eq!(file.password_for("host=/tmp/pg user=ops dbname=app", &[]).as_deref(), Some("own-socket"));
        assert_eq!(file.password_for("host=h user=o:ps", &[]).as_deref(), Some(r"pa:ss\word"));
        assert_eq!(file.password_for("host=h user=x", &[]).as_deref(), Some("fallback"));
        assert_eq!(file.password_for("host=h user=x password=given", &[]).as_deref(), Some("given"));
        assert_eq!(file.password_for("host=h user=x", &[("PGPASSWORD", "from-env")]).as_deref(), Some("from-env"));
        let file = Passfile::new("loose", 0o644, &["*:*:*:*:secret"]);
        assert_eq!(file.password_for("host=h user=x", &[]), None);
        let settings: Settings = [("host".to_string(), "h".to_string())].into();
        assert!(password_from_file(&file.0, &settings).unwrap_err().contains("has group or world access, so it is ignored"));
        assert_eq!(password_from_file(Path::new("/nonexistent/.pgpass"), &settings), Ok(None));
    }

    #[test]
    fn bad_settings_are_usage_errors() {
        assert!(matches!(from_env(&[("PGPORT", "x")]), Err(CliError::Usage(m)) if m.contains("PGPORT")));
        assert!(matches!(config(Some("host=a port=b"), |_| None), Err(CliError::Usage(m)) if m.contains("invalid connection string")));
        for (dsn, named) in [("host=a bogus=1", "bogus"), ("host=a port=notaport", "port")] {
            let error = config(Some(dsn), |_| None).err().map(|e| e.to_string()).unwrap_or_default();
            assert!(error.contains(named) && !error.ends_with("invalid connection string: invalid connection string"), "{dsn}: {error}");
        }
    }
}
