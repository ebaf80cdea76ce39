"""Mirror outbox events to an HTTP endpoint: claim a batch, POST it, then ack it, or fail it
so that it comes back after a backoff.

Usage: python3 consumer.py DSN URL [SUBSCRIPTION [STOP_AFTER_IDLE_POLLS]]
"""
import json
import sys
import time
import urllib.request

import psycopg


def run(dsn, url, subscription="default", stop_after_idle_polls=None):
    idle = 0
    with psycopg.connect(dsn, autocommit=True) as conn:
        while stop_after_idle_polls is None or idle < stop_after_idle_polls:
            rows = conn.execute(
                "SELECT id, type, payload FROM outbox_claim(batch_size => 100, subscription => %s)",
                (subscription,),
            ).fetchall()
            if not rows:
                idle += 1
                time.sleep(0.5)
                continue
            idle = 0
            ids = [event_id for event_id, _, _ in rows]
            body = json.dumps([{"id": i, "type": t, "payload": p} for i, t, p in rows]).encode()
            request = urllib.request.Request(url, body, {
                "Content-Type": "application/json",
                # the same batch is retried with the same key: the receiver can drop repeats
                "Idempotency-Key": f"{subscription}-{ids[0]}-{ids[-1]}",
            })
            try:
                urllib.request.urlopen(request, timeout=10).close()
            except OSError as error:  # an HTTP error status or no connection at all
                conn.execute("SELECT outbox_fail(%s::bigint[], %s, %s)", (ids, str(error), subscription))
                continue
            conn.execute("SELECT outbox_ack(%s::bigint[], %s)", (ids, subscription))


if __name__ == "__main__":
    dsn, url, *rest = sys.argv[1:]
    run(dsn, url, rest[0] if rest else "default", int(rest[1]) if len(rest) > 1 else None)
