// Mirror outbox events to an HTTP endpoint: claim a batch, POST it, then ack it, or fail it
// so that it comes back after a backoff.
// Usage: node consumer.mjs DSN URL [SUBSCRIPTION [STOP_AFTER_IDLE_POLLS]]
import pg from "pg";

const [dsn, url, subscription = "default", stopAfterIdlePolls] = process.argv.slice(2);
const client = new pg.Client({ connectionString: dsn });
await client.connect();
let idle = 0;
while (stopAfterIdlePolls === undefined || idle < Number(stopAfterIdlePolls)) {
  const { rows } = await client.query(
    "SELECT id, type, payload FROM outbox_claim(batch_size => 100, subscription => $1)",
    [subscription],
  );
  if (rows.length === 0) {
    idle += 1;
    await new Promise((resolve) => setTimeout(resolve, 500));
    continue;
  }
  idle = 0;
  // bigint ids arrive as strings: they go back to Postgres unchanged
  const ids = rows.map((row) => row.id);
  try {
    const response = await fetch(url, {
      method: "POST",
      headers: {
        "Content-Type": "application/json",
        // the same batch is retried with the same key: the receiver can drop repeats
        "Idempotency-Key": `${subscription}-${ids[0]}-${ids[ids.length - 1]}`,
      },
      body: JSON.stringify(rows.map((row) => ({ id: Number(row.id), type: row.type, payload: row.payload }))),
    });
    if (!response.ok) throw new Error(`HTTP ${response.status}`);
  } catch (error) {
    await client.query("SELECT outbox_fail($1::bigint[], $2, $3)", [ids, String(error), subscription]);
    continue;
  }
  await client.query("SELECT outbox_ack($1::bigint[], $2)", [ids, subscription]);
}
await client.end();
