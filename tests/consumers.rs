//! The consumers of docs/operations.md, in Python (psycopg), Node.js (pg) and Rust (postgres),
//! run against a real Postgres and a real HTTP receiver: each mirrors every change, in order
//! per row, and a batch the receiver refuses comes back and is delivered.
#![cfg(not(feature = "pg_test"))] // run by scripts/test.sh against the installed extension, not by cargo pgrx test

mod common;

#[path = "../docs/examples/consumer.rs"]
mod rust_consumer;

use std::process::Command;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;

use common::*;

/// Long enough to outlast the backoff of the refused batch (outbox.backoff_base, 1s).
const STOP_AFTER_IDLE_POLLS: u32 = 6;

/// A database with changes to mirror, and a receiver that refuses the first batch holding
/// key 5. Returns the connection URL.
fn scenario(name: &str) -> (String, Client, Recorder) {
    let cluster = shared();
    let db = cluster.database(name);
    let mut client = cluster.connect(&db);
    chunks(&mut client, "");
    client.batch_execute("INSERT INTO chunks SELECT g, 1, 'x', '{1}' FROM generate_series(1, 30) g").unwrap();
    client.batch_execute("UPDATE chunks SET content = 'y' WHERE id <= 3").unwrap();
    client.batch_execute("DELETE FROM chunks WHERE id = 30").unwrap();
    let refused = Arc::new(AtomicBool::new(false));
    let recorder = Recorder::start(move |request| {
        if request.keys().contains(&5) && !refused.swap(true, Ordering::SeqCst) {
            Reply::status(503)
        } else {
            Reply::status(200)
        }
    });
    (format!("postgresql://postgres@127.0.0.1:{}/{db}", cluster.port), client, recorder)
}

fn check_mirrored(client: &mut Client, recorder: &Recorder) {
    let received = recorder.received();
    assert!(received.len() >= 2, "{received:?}");
    assert!(received[0].keys().contains(&5), "the first batch was refused");
    assert!(received.iter().all(|r| r.headers.contains_key("idempotency-key")));
    // what was accepted, in arrival order: every request after the refused one
    let accepted: Vec<(i64, String)> = received[1..]
        .iter()
        .flat_map(|r| r.body.as_array().unwrap().clone())
        .map(|e| (e["payload"]["key"]["id"].as_i64().unwrap(), e["type"].as_str().unwrap().to_string()))
        .collect();
    let of = |key: i64| -> Vec<&str> { accepted.iter().filter(|(k, _)| *k == key).map(|(_, t)| t.as_str()).collect() };
    for key in 1..=30 {
        assert!(!of(key).is_empty(), "key {key} mirrored");
    }
    assert_eq!(of(1), ["EMBED_UPSERT", "EMBED_UPSERT"], "insert then update, in order");
    assert_eq!(of(30), ["EMBED_UPSERT", "EMBED_DELETE"]);
    assert_eq!(of(5), ["EMBED_UPSERT"], "refused once, then delivered once");
    assert_eq!(scalar_i64(client, "SELECT pending + in_flight + retrying + dead FROM outbox_backlog"), 0);
}

fn run_script(program: &str, script: &str, url: &str, recorder: &Recorder) {
    let path = format!("{}/docs/examples/{script}", env!("CARGO_MANIFEST_DIR"));
    let out = Command::new(program)
        .args([path.as_str(), url, &recorder.url(), "default", &STOP_AFTER_IDLE_POLLS.to_string()])
        .output()
        .unwrap_or_else(|e| panic!("{program} runs: {e}"));
    assert!(out.status.success(), "{script} failed: {}{}", String::from_utf8_lossy(&out.stdout), String::from_utf8_lossy(&out.stderr));
}

#[test]
fn python_consumer_mirrors_every_change() {
    let (url, mut client, recorder) = scenario("python_consumer");
    // Debian's interpreter has python3-psycopg; a pyenv one first on PATH may not
    let python = std::env::var("OUTBOX_PYTHON").unwrap_or_else(|_| "/usr/bin/python3".to_string());
    run_script(&python, "consumer.py", &url, &recorder);
    check_mirrored(&mut client, &recorder);
}

#[test]
fn node_consumer_mirrors_every_change() {
    let (url, mut client, recorder) = scenario("node_consumer");
    run_script("node", "consumer.mjs", &url, &recorder);
    check_mirrored(&mut client, &recorder);
}

#[test]
fn rust_consumer_mirrors_every_change() {
    let (url, mut client, recorder) = scenario("rust_consumer");
    rust_consumer::run(&url, &recorder.url(), "default", Some(STOP_AFTER_IDLE_POLLS)).unwrap();
    check_mirrored(&mut client, &recorder);
}

#[test]
fn the_operator_docs_show_the_tested_consumers() {
    let docs = std::fs::read_to_string(concat!(env!("CARGO_MANIFEST_DIR"), "/docs/operations.md")).unwrap();
    for example in ["consumer.py", "consumer.mjs", "consumer.rs"] {
        let code = std::fs::read_to_string(format!("{}/docs/examples/{example}", env!("CARGO_MANIFEST_DIR"))).unwrap();
        assert!(docs.contains(&code), "docs/operations.md must show docs/examples/{example} as it is");
    }
}
