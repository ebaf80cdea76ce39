//! Mirror outbox events to an HTTP endpoint: claim a batch, POST it, then ack it, or fail it
//! so that it comes back after a backoff. Crates: postgres (with-serde_json-1), minreq,
//! serde_json. Call `run` from your main.

use std::time::Duration;

use postgres::{Client, NoTls};
use serde_json::{json, Value};

pub fn run(dsn: &str, url: &str, subscription: &str, stop_after_idle_polls: Option<u32>) -> Result<(), Box<dyn std::error::Error>> {
    let mut client = Client::connect(dsn, NoTls)?;
    let mut idle = 0;
    while stop_after_idle_polls.is_none_or(|stop| idle < stop) {
        let rows = client.query(
            "SELECT id, type, payload FROM outbox_claim(batch_size => 100, subscription => $1)",
            &[&subscription],
        )?;
        if rows.is_empty() {
            idle += 1;
            std::thread::sleep(Duration::from_millis(500));
            continue;
        }
        idle = 0;
        let ids: Vec<i64> = rows.iter().map(|row| row.get("id")).collect();
        let batch: Vec<Value> = rows
            .iter()
            .map(|row| json!({"id": row.get::<_, i64>("id"), "type": row.get::<_, String>("type"), "payload": row.get::<_, Value>("payload")}))
            .collect();
        let sent = minreq::post(url)
            .with_header("Content-Type", "application/json")
            // the same batch is retried with the same key: the receiver can drop repeats
            .with_header("Idempotency-Key", format!("{subscription}-{}-{}", ids[0], ids[ids.len() - 1]))
            .with_body(serde_json::to_vec(&batch)?)
            .with_timeout(10)
            .send();
        match sent {
            Ok(response) if (200..300).contains(&response.status_code) => {
                client.execute("SELECT outbox_ack($1, $2)", &[&ids, &subscription])?;
            }
            Ok(response) => {
                client.execute("SELECT outbox_fail($1, $2, $3)", &[&ids, &format!("HTTP {}", response.status_code), &subscription])?;
            }
            Err(error) => {
                client.execute("SELECT outbox_fail($1, $2, $3)", &[&ids, &error.to_string(), &subscription])?;
            }
        }
    }
    Ok(())
}
