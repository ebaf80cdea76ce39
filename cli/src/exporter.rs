//! `outbox metrics serve`: a Prometheus exporter serving `outbox_metrics()` on `/metrics`.
//! It holds one connection, reconnects on the next scrape after the database went away,
//! and answers `outbox_up 0` meanwhile, so an outage is a metric rather than a failed scrape.
//! Each client is served on its own thread, so a slow one delays no other; only the query
//! waits its turn for the connection.

use std::io::{ErrorKind, Read, Write};
use std::net::{TcpListener, TcpStream};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex, PoisonError};
use std::time::{Duration, Instant};

use postgres::Config;

use crate::connect::Session;
use crate::error::{CliError, Result};
use crate::format::printable;

const UP_HELP: &str = "# HELP outbox_up 1 when the exporter could read the outbox on this scrape.\n# TYPE outbox_up gauge\n";

/// A GET needs far less: a longer request is refused before it costs memory.
const REQUEST_HEAD_LIMIT: usize = 8 * 1024;

/// The time a client has to send its request, and again to take the answer, however it
/// dribbles: a timeout on each read or write alone lets a byte now and then hold on forever.
const CLIENT_DEADLINE: Duration = Duration::from_secs(10);
/// How long the metrics query may take: under Prometheus' default scrape timeout of 10 s.
const STATEMENT_TIMEOUT: Duration = Duration::from_secs(5);

/// Clients served at once; more are turned away, so a flood of idle connections cannot pile
/// up threads.
const MAX_CLIENTS: usize = 64;

/// The scrape body: `outbox_up` and, when up, the extension's metrics.
pub fn body(metrics: Option<&str>) -> String {
    match metrics {
        Some(metrics) => format!("{UP_HELP}outbox_up 1\n{metrics}"),
        None => format!("{UP_HELP}outbox_up 0\n"),
    }
}

struct Exporter {
    config: Config,
    session: Option<Session>,
    /// Why the last scrape could not read the outbox, until one can.
    last_error: Option<String>,
}

impl Exporter {
    fn scrape(&mut self) -> String {
        match self.read_metrics() {
            Ok(metrics) => {
                self.last_error = None;
                body(Some(&metrics))
            }
            Err(error) => {
                // a broken connection is replaced on the next scrape; a failed query leaves it usable
                let lost = self.session.take_if(|s| s.client.is_closed()).is_some();
                if let Some(line) = self.failure_to_log(lost, error.to_string()) {
                    eprintln!("{line}");
                }
                body(None)
            }
        }
    }

    /// The line to log for a failed scrape: each scrape of an outage fails alike, so the reason
    /// is logged when it first appears and again only when it changes.
    fn failure_to_log(&mut self, lost: bool, error: String) -> Option<String> {
        let repeated = self.last_error.as_ref() == Some(&error);
        let line = printable(&error);
        self.last_error = Some(error);
        match (lost, repeated) {
            (true, _) => Some(format!("outbox: lost the database: {line}")),
            (false, false) => Some(format!("outbox: cannot read the outbox: {line}")),
            (false, true) => None,
        }
    }

    fn read_metrics(&mut self) -> Result<String> {
        // A connection the database closed since the last scrape (it restarted) shows only when
        // the query fails: then one new connection is asked, rather than answering 0 while the
        // database is up.
        let mut reconnected = false;
        loop {
            if self.session.as_ref().is_none_or(|s| s.client.is_closed()) {
                let mut session = Session::open(&self.config)?;
                // A table locked by DDL, VACUUM FULL or an update would hold every scrape: the
                // query gives up in time for the scrape to answer outbox_up 0.
                session.client.batch_execute(&format!("SET statement_timeout = {}", STATEMENT_TIMEOUT.as_millis()))?;
                self.session = Some(session);
                reconnected = true;
                eprintln!("outbox: connected");
            }
            let session = self.session.as_mut().expect("just opened");
            let sql = session.sql("SELECT @extschema@.outbox_metrics()");
            match session.client.query_one(&sql, &[]) {
                Ok(row) => return Ok(row.get(0)),
                Err(_) if !reconnected && session.client.is_closed() => self.session = None,
                Err(error) => return Err(error.into()),
            }
        }
    }
}

/// Sends the answer, failing with `TimedOut` at `deadline`.
fn respond(stream: &mut TcpStream, deadline: Instant, status: &str, content_type: &str, body: &str) -> std::io::Result<()> {
    let answer = format!(
        "HTTP/1.1 {status}\r\nContent-Type: {content_type}\r\nContent-Length: {}\r\nConnection: close\r\n\r\n{body}",
        body.len()
    );
    let mut rest = answer.as_bytes();
    while !rest.is_empty() {
        let left = deadline.saturating_duration_since(Instant::now());
        if left.is_zero() {
            return Err(ErrorKind::TimedOut.into());
        }
        stream.set_write_timeout(Some(left))?;
        match stream.write(rest) {
            Ok(0) => return Err(ErrorKind::WriteZero.into()),
            Ok(n) => rest = &rest[n..],
            // (a write timeout is WouldBlock on Linux) the next turn sees whether time is up
            Err(e) if matches!(e.kind(), ErrorKind::Interrupted | ErrorKind::WouldBlock | ErrorKind::TimedOut) => continue,
            Err(e) => return Err(e),
        }
    }
    Ok(())
}

/// The request line and headers, read until the blank line that ends them; `None` when they
/// exceed `REQUEST_HEAD_LIMIT`. Fails with `TimedOut` at `deadline`.
fn read_request_head(stream: &mut TcpStream, deadline: Instant) -> std::io::Result<Option<String>> {
    let mut head = Vec::new();
    let mut buffer = [0u8; 1024];
    loop {
        let left = deadline.saturating_duration_since(Instant::now());
        if left.is_zero() {
            return Err(ErrorKind::TimedOut.into());
        }
        stream.set_read_timeout(Some(left))?;
        let n = match stream.read(&mut buffer) {
            Ok(0) => return Err(ErrorKind::UnexpectedEof.into()),
            Ok(n) => n,
            // (a read timeout is WouldBlock on Linux) the next turn sees whether time is up
            Err(e) if matches!(e.kind(), ErrorKind::Interrupted | ErrorKind::WouldBlock | ErrorKind::TimedOut) => continue,
            Err(e) => return Err(e),
        };
        head.extend_from_slice(&buffer[..n]);
        let end = head.windows(4).position(|w| w == b"\r\n\r\n").or_else(|| head.windows(2).position(|w| w == b"\n\n"));
        match end {
            Some(end) if end <= REQUEST_HEAD_LIMIT => return Ok(Some(String::from_utf8_lossy(&head[..end]).into_owned())),
            _ if head.len() > REQUEST_HEAD_LIMIT => return Ok(None),
            Some(_) | None => {}
        }
    }
}

fn handle(exporter: &Mutex<Exporter>, mut stream: TcpStream) -> std::io::Result<()> {
    let Some(head) = read_request_head(&mut stream, Instant::now() + CLIENT_DEADLINE)? else {
        let deadline = Instant::now() + CLIENT_DEADLINE;
        return respond(&mut stream, deadline, "431 Request Header Fields Too Large", "text/plain", "request too large\n");
    };
    let mut parts = head.lines().next().unwrap_or_default().split_whitespace();
    let (method, path) = (parts.next().unwrap_or(""), parts.next().unwrap_or(""));
    let (status, content_type, body) = match (method, path.split('?').next().unwrap_or("")) {
        ("GET", "/metrics") => {
            // one query at a time on the one connection; a poisoned lock only means a scrape
            // panicked, and the exporter's state stays usable
            let body = exporter.lock().unwrap_or_else(PoisonError::into_inner).scrape();
            ("200 OK", "text/plain; version=0.0.4; charset=utf-8", body)
        }
        ("GET", "/") => ("200 OK", "text/html", "<a href=\"/metrics\">/metrics</a>\n".into()),
        ("GET", _) => ("404 Not Found", "text/plain", "not found; metrics are at /metrics\n".into()),
        _ => ("405 Method Not Allowed", "text/plain", "only GET\n".into()),
    };
    // the time the query took, waiting for the connection too, is not the client's
    respond(&mut stream, Instant::now() + CLIENT_DEADLINE, status, content_type, &body)
}

/// A client that left, or dawdled past its deadline, is no news worth a log line.
fn client_went_away(error: &std::io::Error) -> bool {
    matches!(
        error.kind(),
        ErrorKind::UnexpectedEof | ErrorKind::TimedOut | ErrorKind::WouldBlock | ErrorKind::ConnectionReset | ErrorKind::BrokenPipe
    )
}

/// Counts a client in for as long as it is served.
struct ClientSlot(Arc<AtomicUsize>);

impl ClientSlot {
    fn take(clients: &Arc<AtomicUsize>) -> Option<ClientSlot> {
        let taken = clients.fetch_update(Ordering::SeqCst, Ordering::SeqCst, |n| (n < MAX_CLIENTS).then_some(n + 1));
        taken.ok().map(|_| ClientSlot(Arc::clone(clients)))
    }
}

impl Drop for ClientSlot {
    fn drop(&mut self) {
        self.0.fetch_sub(1, Ordering::SeqCst);
    }
}

pub fn serve(config: Config, listen: &str) -> Result<()> {
    // an address that cannot be is bad usage (exit 2); one that cannot be had now is a failure
    std::net::ToSocketAddrs::to_socket_addrs(listen)
        .map_err(|e| CliError::Usage(format!("--listen {listen}: {e} (give an address and port, such as 127.0.0.1:9187)")))?;
    let listener = TcpListener::bind(listen).map_err(|e| CliError::Failed(format!("cannot listen on {listen}: {e}")))?;
    let address = listener.local_addr().map_err(|e| CliError::Failed(e.to_string()))?;
    eprintln!("outbox: serving metrics on http://{address}/metrics");
    let exporter = Arc::new(Mutex::new(Exporter { config, session: None, last_error: None }));
    let clients = Arc::new(AtomicUsize::new(0));
    for stream in listener.incoming() {
        let Ok(stream) = stream else { continue };
        let Some(slot) = ClientSlot::take(&clients) else { continue };
        let exporter = Arc::clone(&exporter);
        let served = std::thread::Builder::new().spawn(move || {
            let _slot = slot;
            match handle(&exporter, stream) {
                Err(e) if client_went_away(&e) => {}
                Err(e) => eprintln!("outbox: answering a scrape: {e}"),
                Ok(()) => {}
            }
        });
        if let Err(e) = served {
            eprintln!("outbox: cannot serve a client: {e}");
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn down_is_a_metric() {
        assert_eq!(body(None), format!("{UP_HELP}outbox_up 0\n"));
        let up = body(Some("# HELP x y\n# TYPE x gauge\nx 1\n"));
        assert!(up.starts_with(UP_HELP) && up.contains("\noutbox_up 1\n# HELP x y\n"));
    }

    #[test]
    fn an_outage_is_logged_when_it_starts_and_when_its_reason_changes() {
        let mut exporter = Exporter { config: Config::new(), session: None, last_error: None };
        let refused = "cannot connect to the database: refused";
        assert_eq!(exporter.failure_to_log(false, refused.into()), Some(format!("outbox: cannot read the outbox: {refused}")));
        assert_eq!(exporter.failure_to_log(false, refused.into()), None);
        assert_eq!(exporter.failure_to_log(false, "timed out".into()).as_deref(), Some("outbox: cannot read the outbox: timed out"));
        assert_eq!(exporter.failure_to_log(true, "timed out".into()).as_deref(), Some("outbox: lost the database: timed out"));
        assert_eq!(exporter.failure_to_log(false, "\x1b[2J".into()).as_deref(), Some("outbox: cannot read the outbox: \\u{1b}[2J"));
    }

    fn connected_pair() -> (TcpStream, TcpStream) {
        let listener = TcpListener::bind("127.0.0.1:0").unwrap();
        let client = TcpStream::connect(listener.local_addr().unwrap()).unwrap();
        (client, listener.accept().unwrap().0)
    }

    #[test]
    fn a_request_head_is_bounded_in_size_and_time() {
        let in_a_while = || Instant::now() + Duration::from_secs(5);
        let (mut client, mut server) = connected_pair();
        client.write_all(b"GET /metrics HTTP/1.1\r\nHost: x\r\n\r\n").unwrap();
        assert_eq!(read_request_head(&mut server, in_a_while()).unwrap().as_deref(), Some("GET /metrics HTTP/1.1\r\nHost: x"));

        let (mut client, mut server) = connected_pair();
        client.write_all(&[b'A'; REQUEST_HEAD_LIMIT + 1]).unwrap();
        assert_eq!(read_request_head(&mut server, in_a_while()).unwrap(), None);

        // a byte now and then keeps each read alive, not the request
        let (mut client, mut server) = connected_pair();
        let dribbler = std::thread::spawn(move || {
            for _ in 0..40 {
                if client.write_all(b"G").is_err() {
                    break;
                }
                std::thread::sleep(Duration::from_millis(25));
            }
        });
        let started = Instant::now();
        let error = read_request_head(&mut server, started + Duration::from_millis(300)).unwrap_err();
        assert_eq!(error.kind(), ErrorKind::TimedOut);
        assert!(started.elapsed() < Duration::from_millis(800), "{:?}", started.elapsed());
        drop(server);
        dribbler.join().unwrap();
    }

    #[test]
    fn an_answer_is_bounded_in_time_when_the_client_does_not_read() {
        let (_client, mut server) = connected_pair();
        let started = Instant::now();
        let body = "x".repeat(64 << 20);
        let error = respond(&mut server, started + Duration::from_millis(300), "200 OK", "text/plain", &body).unwrap_err();
        assert_eq!(error.kind(), ErrorKind::TimedOut);
        assert!(started.elapsed() < Duration::from_millis(1500), "{:?}", started.elapsed());
    }
}
