//! The API from another language: a Python consumer (psycopg) drains the outbox.
#![cfg(not(feature = "pg_test"))] // run by scripts/test.sh against the installed extension, not by cargo pgrx test

mod common;

use std::process::Command;

use common::*;

fn python() -> String {
    // Debian's interpreter has python3-psycopg; a pyenv one on PATH may not.
    std::env::var("OUTBOX_PYTHON").unwrap_or_else(|_| "/usr/bin/python3".to_string())
}

#[test]
fn python_consumer_claims_acks_and_retries() {
    let cluster = shared();
    let db = cluster.database("python_consumer");
    let mut client = cluster.connect(&db);
    chunks(&mut client, "");
    client.batch_execute("INSERT INTO chunks SELECT g, 1, 'x', '{1}' FROM generate_series(1, 30) g").unwrap();
    client.batch_execute("UPDATE chunks SET content = 'y' WHERE id <= 3").unwrap();
    client.batch_execute("DELETE FROM chunks WHERE id = 30").unwrap();

    let script = concat!(env!("CARGO_MANIFEST_DIR"), "/tests/python/consumer.py");
    let out = Command::new(python()).arg(script).arg(cluster.dsn(&db)).arg("5").output().expect("python3 runs");
    assert!(out.status.success(), "consumer failed: {}", String::from_utf8_lossy(&out.stderr));
    let delivered: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    let delivered = delivered.as_object().unwrap();

    assert_eq!(delivered.len(), 30, "every key delivered");
    let types = |key: &str| -> Vec<String> {
        delivered[key].as_array().unwrap().iter().map(|e| e[0].as_str().unwrap().to_string()).collect()
    };
    assert_eq!(types("1"), ["EMBED_UPSERT", "EMBED_UPSERT"], "insert then update, in order");
    assert_eq!(types("30"), ["EMBED_UPSERT", "EMBED_DELETE"]);
    assert_eq!(delivered["5"], serde_json::json!([["EMBED_UPSERT", 2]]), "failed once, delivered on the second attempt");
    assert_eq!(scalar_i64(&mut client, "SELECT pending + in_flight + retrying FROM outbox_backlog"), 0);
}
