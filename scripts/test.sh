#!/usr/bin/env bash
# The whole test suite: plain Rust tests and #[pg_test]s inside Postgres (cargo pgrx test),
# then the integration tests in tests/ and cli/tests/, which start Postgres servers of their
# own and use the extension installed into Debian's PostgreSQL 15, then the alert rules.
set -euo pipefail
cd "$(dirname "$0")/.."
scripts/setup.sh

PG_CONFIG=/usr/lib/postgresql/15/bin/pg_config
pgdata=$(mktemp -d /tmp/outbox-pgtest.XXXXXX)
trap 'rm -rf "$pgdata"' EXIT
if [[ $(id -u) -eq 0 ]]; then
    chown postgres "$pgdata"
    cargo pgrx test pg15 --runas postgres --pgdata "$pgdata/data"
else
    cargo pgrx test pg15 --pgdata "$pgdata/data"
fi

# cargo pgrx test installed a build with the test schema; install the real one
cargo pgrx install --pg-config "$PG_CONFIG"
cargo test --test '*' -- --test-threads 4

# the operator CLI: its unit tests, then every command against a real Postgres
cargo test -p outbox-cli -- --test-threads 4

# the alert rules parse, and each alert fires (and stays quiet) on synthetic series
promtool check rules monitoring/alerts.yml
promtool test rules monitoring/alerts.test.yml
