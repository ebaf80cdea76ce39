#!/usr/bin/env python3
"""An outbox consumer written against the SQL API only, as any language would use it.

Claims batches, acks them, and fails the first delivery of one chosen key to show retries.
Prints what it delivered as JSON: {"<key>": [[type, attempts], ...]}.
Usage: consumer.py DSN FAIL_KEY
"""
import json
import sys
import time

import psycopg


def consume(dsn: str, fail_key: int) -> dict:
    delivered: dict = {}
    failed_once = False
    with psycopg.connect(dsn, autocommit=True) as conn:
        idle_rounds = 0
        while idle_rounds < 5:
            rows = conn.execute(
                "SELECT id, type, payload, attempts FROM outbox_claim(batch_size => %s, lease => %s::interval)",
                (10, "5 seconds"),
            ).fetchall()
            if not rows:
                idle_rounds += 1
                time.sleep(0.1)
                continue
            idle_rounds = 0
            ok, bad = [], []
            for event_id, event_type, payload, attempts in rows:
                key = payload["key"]["id"]
                if key == fail_key and not failed_once:
                    failed_once = True
                    bad.append(event_id)
                    continue
                ok.append(event_id)
                delivered.setdefault(str(key), []).append([event_type, attempts])
            if bad:
                conn.execute(
                    "SELECT outbox_fail(%s::bigint[], %s, retry_after => %s::interval)",
                    (bad, "simulated failure", "0"),
                )
            if ok:
                (acked,) = conn.execute("SELECT outbox_ack(%s::bigint[])", (ok,)).fetchone()
                if acked != len(ok):
                    raise SystemExit(f"acked {acked} of {len(ok)}")
    return delivered


if __name__ == "__main__":
    print(json.dumps(consume(sys.argv[1], int(sys.argv[2]))))
