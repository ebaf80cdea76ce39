//! `outbox metrics serve`: a Prometheus exporter serving `outbox_metrics()` on `/metrics`.
//! It holds one connection, reconnects on the next scrape after the database went away,
//! and answers `outbox_up 0` meanwhile, so an outage is a metric rather than a failed scrape.

use std::io::{BufRead, BufReader, Write};
use std::net::{TcpListener, TcpStream};
use std::time::Duration;

use postgres::Config;

use crate::connect::Session;
use crate::error::{CliError, Result};

const UP_HELP: &str = "# HELP outbox_up 1 when the exporter could read the outbox on this scrape.\n# TYPE outbox_up gauge\n";

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
}

impl Exporter {
    fn scrape(&mut self) -> String {
        match self.read_metrics() {
            Ok(metrics) => body(Some(&metrics)),
            Err(error) => {
                if self.session.take().is_some() {
                    eprintln!("outbox: lost the database: {error}");
                }
                body(None)
            }
        }
    }

    fn read_metrics(&mut self) -> Result<String> {
        if self.session.as_ref().is_none_or(|s| s.client.is_closed()) {
            self.session = Some(Session::open(&self.config)?);
            eprintln!("outbox: connected");
        }
        let session = self.session.as_mut().expect("just opened");
        let sql = session.sql("SELECT @extschema@.outbox_metrics()");
        Ok(session.client.query_one(&sql, &[])?.get(0))
    }
}

fn respond(stream: &mut TcpStream, status: &str, content_type: &str, body: &str) -> std::io::Result<()> {
    write!(
        stream,
        "HTTP/1.1 {status}\r\nContent-Type: {content_type}\r\nContent-Length: {}\r\nConnection: close\r\n\r\n{body}",
        body.len()
    )?;
    stream.flush()
}

fn handle(exporter: &mut Exporter, mut stream: TcpStream) -> std::io::Result<()> {
    stream.set_read_timeout(Some(Duration::from_secs(5)))?;
    let mut reader = BufReader::new(stream.try_clone()?);
    let mut request_line = String::new();
    reader.read_line(&mut request_line)?;
    // the headers are not needed, but must be read before answering
    let mut header = String::new();
    while reader.read_line(&mut header)? > 2 {
        header.clear();
    }
    let mut parts = request_line.split_whitespace();
    let (method, path) = (parts.next().unwrap_or(""), parts.next().unwrap_or(""));
    match (method, path.split('?').next().unwrap_or("")) {
        ("GET", "/metrics") => respond(&mut stream, "200 OK", "text/plain; version=0.0.4; charset=utf-8", &exporter.scrape()),
        ("GET", "/") => respond(&mut stream, "200 OK", "text/html", "<a href=\"/metrics\">/metrics</a>\n"),
        ("GET", _) => respond(&mut stream, "404 Not Found", "text/plain", "not found; metrics are at /metrics\n"),
        _ => respond(&mut stream, "405 Method Not Allowed", "text/plain", "only GET\n"),
    }
}

pub fn serve(config: Config, listen: &str) -> Result<()> {
    let listener = TcpListener::bind(listen).map_err(|e| CliError::Failed(format!("cannot listen on {listen}: {e}")))?;
    let address = listener.local_addr().map_err(|e| CliError::Failed(e.to_string()))?;
    eprintln!("outbox: serving metrics on http://{address}/metrics");
    let mut exporter = Exporter { config, session: None };
    for stream in listener.incoming() {
        let Ok(stream) = stream else { continue };
        // one scrape at a time: Prometheus scrapes seldom, and one connection is enough
        if let Err(error) = handle(&mut exporter, stream) {
            eprintln!("outbox: answering a scrape: {error}");
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
}
