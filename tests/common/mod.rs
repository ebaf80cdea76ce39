//! A real Postgres for integration tests: a throwaway cluster under the temp dir, run by the
//! `postgres` user when the tests run as root (initdb refuses root), reached over its socket.
//! The extension must be installed first (`cargo pgrx install`, which scripts/test.sh does).
#![allow(dead_code)]

use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::OnceLock;
use std::time::{Duration, Instant};

pub use postgres::{Client, NoTls};

static COUNTER: AtomicUsize = AtomicUsize::new(0);

pub struct Cluster {
    pub dir: PathBuf,
    pub port: u16,
    bin: PathBuf,
    as_postgres: bool,
}

fn pg_bindir() -> PathBuf {
    let pg_config = std::env::var("PG_CONFIG").unwrap_or_else(|_| {
        let debian = "/usr/lib/postgresql/15/bin/pg_config";
        if Path::new(debian).exists() { debian.to_string() } else { "pg_config".to_string() }
    });
    let out = Command::new(&pg_config).arg("--bindir").output().expect("pg_config runs");
    PathBuf::from(String::from_utf8(out.stdout).unwrap().trim())
}

fn is_root() -> bool {
    Command::new("id").arg("-u").output().map(|o| o.stdout.starts_with(b"0\n")).unwrap_or(false)
}

fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0").unwrap().local_addr().unwrap().port()
}

impl Cluster {
    /// A new cluster with extra postgresql.conf lines, started.
    pub fn start(settings: &[&str]) -> Cluster {
        let n = COUNTER.fetch_add(1, Ordering::SeqCst);
        let dir = std::env::temp_dir().join(format!("outbox-test-{}-{n}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        std::fs::create_dir_all(&dir).unwrap();
        let cluster = Cluster { dir, port: free_port(), bin: pg_bindir(), as_postgres: is_root() };
        if cluster.as_postgres {
            assert!(Command::new("chown").args(["-R", "postgres:postgres"]).arg(&cluster.dir).status().unwrap().success());
        }
        let data = cluster.data();
        cluster.run("initdb", &["-D", &data, "-U", "postgres", "-A", "trust", "--no-sync", "-E", "UTF8", "--locale=C"]);
        let mut conf = format!(
            "\nport = {}\nlisten_addresses = '127.0.0.1'\nunix_socket_directories = '{}'\nfsync = on\n\
             max_connections = 100\nshared_buffers = 128MB\nlog_min_messages = warning\n",
            cluster.port,
            cluster.dir.display()
        );
        for setting in settings {
            conf.push_str(setting);
            conf.push('\n');
        }
        let conf_path = format!("{data}/postgresql.conf");
        let mut existing = std::fs::read_to_string(&conf_path).unwrap();
        existing.push_str(&conf);
        std::fs::write(&conf_path, existing).unwrap();
        cluster.pg_ctl_start();
        cluster.reap_when_tests_exit();
        cluster
    }

    pub fn data(&self) -> String {
        self.dir.join("data").display().to_string()
    }

    fn command(&self, program: &str, args: &[&str]) -> Command {
        let path = self.bin.join(program);
        let mut command = if self.as_postgres {
            let mut c = Command::new("runuser");
            c.args(["-u", "postgres", "--"]).arg(path);
            c
        } else {
            Command::new(path)
        };
        command.args(args);
        command
    }

    fn run(&self, program: &str, args: &[&str]) {
        let out = self.command(program, args).output().unwrap();
        assert!(out.status.success(), "{program} {args:?}: {}{}", String::from_utf8_lossy(&out.stdout), String::from_utf8_lossy(&out.stderr));
    }

    pub fn pg_ctl_start(&self) {
        let log = self.dir.join("server.log").display().to_string();
        self.run("pg_ctl", &["-D", &self.data(), "-l", &log, "-w", "-t", "60", "start"]);
    }

    /// `pg_ctl stop -m <mode>`: "fast" or "immediate" (a crash: no checkpoint, WAL replay on start).
    pub fn stop(&self, mode: &str) {
        self.run("pg_ctl", &["-D", &self.data(), "-m", mode, "-w", "-t", "60", "stop"]);
    }

    /// Prints the server log when OUTBOX_TEST_SHOW_LOG is set (for debugging a failing test).
    pub fn show_log(&self) {
        if std::env::var_os("OUTBOX_TEST_SHOW_LOG").is_some() {
            eprintln!("{}", self.log());
        }
    }

    pub fn log(&self) -> String {
        std::fs::read_to_string(self.dir.join("server.log")).unwrap_or_default()
    }

    /// Stops the server and removes the directory when the test process is gone, however it
    /// ends (statics are never dropped).
    fn reap_when_tests_exit(&self) {
        let pg_ctl = self.bin.join("pg_ctl");
        let stop = if self.as_postgres {
            format!("runuser -u postgres -- {} -D {} -m immediate stop", pg_ctl.display(), self.data())
        } else {
            format!("{} -D {} -m immediate stop", pg_ctl.display(), self.data())
        };
        let script = format!(
            "while kill -0 {pid} 2>/dev/null; do sleep 0.5; done; {stop} >/dev/null 2>&1; rm -rf {dir}",
            pid = std::process::id(),
            dir = self.dir.display()
        );
        Command::new("sh")
            .args(["-c", &script])
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .expect("spawn reaper");
    }

    /// Runs one of the server's client programs (pg_dump, pg_restore) against this cluster.
    pub fn client_program(&self, program: &str, args: &[&str]) {
        let out = Command::new(self.bin.join(program))
            .args(["-h", &self.dir.display().to_string(), "-p", &self.port.to_string(), "-U", "postgres"])
            .args(args)
            .output()
            .expect("client program runs");
        assert!(out.status.success(), "{program} {args:?}: {}", String::from_utf8_lossy(&out.stderr));
    }

    pub fn dsn(&self, db: &str) -> String {
        format!("host={} port={} user=postgres dbname={db}", self.dir.display(), self.port)
    }

    pub fn connect(&self, db: &str) -> Client {
        let deadline = Instant::now() + Duration::from_secs(30);
        loop {
            match Client::connect(&self.dsn(db), NoTls) {
                Ok(client) => return client,
                Err(e) if Instant::now() < deadline => {
                    let _ = e;
                    std::thread::sleep(Duration::from_millis(100));
                }
                Err(e) => panic!("connect to {db}: {e}"),
            }
        }
    }

    /// A fresh database with the extension created.
    pub fn database(&self, name: &str) -> String {
        let mut admin = self.connect("postgres");
        admin.batch_execute(&format!("DROP DATABASE IF EXISTS {name}")).unwrap();
        admin.batch_execute(&format!("CREATE DATABASE {name}")).unwrap();
        let mut client = self.connect(name);
        client.batch_execute("CREATE EXTENSION outbox").unwrap();
        name.to_string()
    }
}

/// One cluster shared by the tests of a test binary; each test uses its own database.
pub fn shared() -> &'static Cluster {
    static CLUSTER: OnceLock<Cluster> = OnceLock::new();
    CLUSTER.get_or_init(|| Cluster::start(&[]))
}

/// The `chunks` table of the README, attached with the given extra arguments.
pub fn chunks(client: &mut Client, attach_args: &str) {
    client
        .batch_execute(&format!(
            "CREATE TABLE chunks (id bigint PRIMARY KEY, doc_id int, content text, embedding real[]);
             SELECT outbox_attach('chunks'{attach_args});"
        ))
        .unwrap();
}

/// (id, type, key id, attempts) of a claim.
pub fn claim(client: &mut Client, sql: &str) -> Vec<(i64, String, i64, i32)> {
    client
        .query(sql, &[])
        .unwrap()
        .iter()
        .map(|r| {
            let payload: serde_json::Value = r.get("payload");
            (r.get("id"), r.get("type"), payload["key"]["id"].as_i64().unwrap_or(-1), r.get("attempts"))
        })
        .collect()
}

pub fn ids(claimed: &[(i64, String, i64, i32)]) -> Vec<i64> {
    claimed.iter().map(|c| c.0).collect()
}

/// The middle value (the upper one of an even count).
pub fn median(mut samples: Vec<f64>) -> f64 {
    samples.sort_by(|a, b| a.partial_cmp(b).unwrap());
    samples[samples.len() / 2]
}

pub fn scalar_i64(client: &mut Client, sql: &str) -> i64 {
    client.query_one(sql, &[]).unwrap().get::<_, i64>(0)
}

pub fn error_of(client: &mut Client, sql: &str) -> String {
    match client.batch_execute(sql) {
        Ok(()) => panic!("{sql} succeeded"),
        Err(e) => e.as_db_error().map(|d| d.message().to_string()).unwrap_or_else(|| e.to_string()),
    }
}

/// A request the test HTTP server received.
#[derive(Clone, Debug)]
pub struct Received {
    pub at: Instant,
    pub headers: std::collections::HashMap<String, String>,
    pub body: serde_json::Value,
}

impl Received {
    /// The source-row key ids of the events in the batch.
    pub fn keys(&self) -> Vec<i64> {
        self.body.as_array().map(|a| a.iter().filter_map(|e| e["payload"]["key"]["id"].as_i64()).collect()).unwrap_or_default()
    }

    pub fn ids(&self) -> Vec<i64> {
        self.body.as_array().map(|a| a.iter().filter_map(|e| e["id"].as_i64()).collect()).unwrap_or_default()
    }
}

/// What the test HTTP server answers.
pub struct Reply {
    pub status: u16,
    pub headers: Vec<(String, String)>,
    pub delay: Duration,
}

impl Reply {
    pub fn status(status: u16) -> Reply {
        Reply { status, headers: Vec::new(), delay: Duration::ZERO }
    }
}

type Responder = Box<dyn FnMut(&Received) -> Reply + Send>;

/// An HTTP server on loopback that records every request and answers as told.
pub struct Recorder {
    pub port: u16,
    received: std::sync::Arc<std::sync::Mutex<Vec<Received>>>,
    responder: std::sync::Arc<std::sync::Mutex<Responder>>,
}

impl Recorder {
    pub fn start(responder: impl FnMut(&Received) -> Reply + Send + 'static) -> Recorder {
        use std::io::{BufRead, BufReader, Read, Write};
        let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        let port = listener.local_addr().unwrap().port();
        let received = std::sync::Arc::new(std::sync::Mutex::new(Vec::new()));
        let responder: std::sync::Arc<std::sync::Mutex<Responder>> = std::sync::Arc::new(std::sync::Mutex::new(Box::new(responder)));
        let (r, s) = (received.clone(), responder.clone());
        std::thread::spawn(move || {
            for stream in listener.incoming() {
                let Ok(mut stream) = stream else { continue };
                let (received, responder) = (r.clone(), s.clone());
                std::thread::spawn(move || {
                    let mut reader = BufReader::new(stream.try_clone().unwrap());
                    let mut headers = std::collections::HashMap::new();
                    let mut line = String::new();
                    if reader.read_line(&mut line).unwrap_or(0) == 0 {
                        return;
                    }
                    loop {
                        line.clear();
                        reader.read_line(&mut line).unwrap();
                        let trimmed = line.trim_end();
                        if trimmed.is_empty() {
                            break;
                        }
                        if let Some((name, value)) = trimmed.split_once(':') {
                            headers.insert(name.trim().to_ascii_lowercase(), value.trim().to_string());
                        }
                    }
                    let length: usize = headers.get("content-length").and_then(|v| v.parse().ok()).unwrap_or(0);
                    let mut body = vec![0; length];
                    reader.read_exact(&mut body).unwrap();
                    let request = Received {
                        at: Instant::now(),
                        headers,
                        body: serde_json::from_slice(&body).unwrap_or(serde_json::Value::Null),
                    };
                    let reply = (responder.lock().unwrap())(&request);
                    received.lock().unwrap().push(request);
                    std::thread::sleep(reply.delay);
                    let mut response = format!("HTTP/1.1 {} X\r\nContent-Length: 0\r\nConnection: close\r\n", reply.status);
                    for (name, value) in reply.headers {
                        response.push_str(&format!("{name}: {value}\r\n"));
                    }
                    response.push_str("\r\n");
                    let _ = stream.write_all(response.as_bytes());
                });
            }
        });
        Recorder { port, received, responder }
    }

    pub fn url(&self) -> String {
        format!("http://127.0.0.1:{}/events", self.port)
    }

    pub fn received(&self) -> Vec<Received> {
        self.received.lock().unwrap().clone()
    }

    pub fn respond(&self, responder: impl FnMut(&Received) -> Reply + Send + 'static) {
        *self.responder.lock().unwrap() = Box::new(responder);
    }

    /// Every key delivered (with repeats), in arrival order.
    pub fn delivered_keys(&self) -> Vec<i64> {
        self.received().iter().flat_map(|r| r.keys()).collect()
    }
}

/// Polls `check` until it holds or `timeout` passes.
pub fn eventually(timeout: Duration, mut check: impl FnMut() -> bool) -> bool {
    let deadline = Instant::now() + timeout;
    while Instant::now() < deadline {
        if check() {
            return true;
        }
        std::thread::sleep(Duration::from_millis(50));
    }
    check()
}

/// The fields of `/proc/<pid>/stat` after the command name, in clock ticks where they are
/// times: state 0, ppid 1, utime 11, stime 12, cutime 13 and cstime 14 (reaped children).
pub fn proc_stat(pid: i64) -> Option<Vec<i64>> {
    let text = std::fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
    Some(text.rsplit_once(')')?.1.split_whitespace().map(|f| f.parse().unwrap_or(0)).collect())
}

/// CPU seconds a process has used so far (user and system).
pub fn cpu_seconds(pid: i64) -> f64 {
    let fields = proc_stat(pid).unwrap_or_else(|| panic!("no process {pid}"));
    (fields[11] + fields[12]) as f64 / 100.0
}

/// CPU seconds the server process of `c` has used so far.
pub fn backend_cpu(c: &mut Client) -> f64 {
    let pid: i32 = c.query_one("SELECT pg_backend_pid()", &[]).unwrap().get(0);
    cpu_seconds(pid.into())
}

/// Bytes on disk of every outbox table with its indexes and TOAST.
pub fn outbox_size(c: &mut Client) -> i64 {
    c.query_one(
        "SELECT sum(pg_total_relation_size(c.oid))::bigint FROM pg_class c
         JOIN pg_depend d ON d.objid = c.oid AND d.deptype = 'e'
         JOIN pg_extension e ON e.oid = d.refobjid AND e.extname = 'outbox'
         WHERE c.relkind = 'r'",
        &[],
    )
    .unwrap()
    .get(0)
}

/// The value of one sample of a Prometheus text exposition, `series` being its name and labels.
pub fn sample(exposition: &str, series: &str) -> Option<f64> {
    exposition.lines().find_map(|line| line.strip_prefix(series).and_then(|rest| rest.strip_prefix(' '))).map(|v| v.parse().unwrap())
}

/// Fails unless `promtool check metrics` (Debian package prometheus) accepts the exposition.
pub fn promtool_check_metrics(exposition: &str) {
    use std::io::Write;
    let mut promtool = Command::new("promtool")
        .args(["check", "metrics"])
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("promtool (Debian package prometheus) is installed");
    promtool.stdin.take().unwrap().write_all(exposition.as_bytes()).unwrap();
    let checked = promtool.wait_with_output().unwrap();
    assert!(
        checked.status.success(),
        "promtool check metrics: {}{}\n{exposition}",
        String::from_utf8_lossy(&checked.stdout),
        String::from_utf8_lossy(&checked.stderr)
    );
}

/// Hostile objects in `evil` and `public` that record every call: comparison operators on
/// the types the outbox compares, and functions it calls, all with signatures of their own.
pub fn plant_hostile_objects(c: &mut Client) {
    let mut sql = String::from(
        "CREATE SCHEMA evil; GRANT USAGE ON SCHEMA evil TO PUBLIC;
         CREATE TABLE public.attack_log (what text); GRANT INSERT ON public.attack_log TO PUBLIC;",
    );
    for schema in ["evil", "public"] {
        for (i, t) in ["bigint", "integer", "smallint", "text", "timestamptz", "oid", "regclass", "boolean"].iter().enumerate() {
            for (j, op) in ["=", "<>", "<", "<=", ">", ">="].iter().enumerate() {
                sql.push_str(&format!(
                    "CREATE FUNCTION {schema}.hostile_{i}_{j}({t}, {t}) RETURNS boolean LANGUAGE sql
                         AS $$ INSERT INTO public.attack_log VALUES ('{schema} {op} {t}') RETURNING false $$;
                     CREATE OPERATOR {schema}.{op} (LEFTARG = {t}, RIGHTARG = {t}, FUNCTION = {schema}.hostile_{i}_{j});"
                ));
            }
        }
        for (name, args, returns) in [
            ("now", "", "timestamptz"),
            ("clock_timestamp", "", "timestamptz"),
            ("nextval", "regclass", "bigint"),
            ("pg_current_xact_id", "", "xid8"),
            ("quote_ident", "text", "text"),
            ("format", "text, text", "text"),
            ("to_regclass", "text", "regclass"),
            ("make_interval", "integer", "interval"),
        ] {
            sql.push_str(&format!(
                "CREATE FUNCTION {schema}.{name}({args}) RETURNS {returns} LANGUAGE sql
                     AS $$ INSERT INTO public.attack_log VALUES ('{schema}.{name}') RETURNING NULL::{returns} $$;"
            ));
        }
    }
    c.batch_execute(&sql).unwrap();
}
