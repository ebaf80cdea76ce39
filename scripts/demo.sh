#!/usr/bin/env bash
# Builds and installs the extension, starts a throwaway Postgres 15 under a temp dir, runs the
# demo in scripts/demo.sql, shows `outbox status`, and removes the server again.
set -euo pipefail
cd "$(dirname "$0")/.."
scripts/setup.sh

BIN=/usr/lib/postgresql/15/bin
cargo pgrx install --pg-config "$BIN/pg_config"

dir=$(mktemp -d /tmp/outbox-demo.XXXXXX)
# the HTTP sink of the demo: prints what the worker posts
python3 scripts/receiver.py > "$dir/received.log" &
receiver=$!
as_postgres=()
if [[ $(id -u) -eq 0 ]]; then
    chown postgres "$dir"
    as_postgres=(runuser -u postgres --)
fi
stop() {
    "${as_postgres[@]}" "$BIN/pg_ctl" -D "$dir/data" -m fast -w stop >/dev/null 2>&1 || true
    kill "$receiver" 2>/dev/null || true
    rm -rf "$dir"
}
trap stop EXIT
"${as_postgres[@]}" "$BIN/initdb" -D "$dir/data" -U postgres -A trust --no-sync >/dev/null
"${as_postgres[@]}" "$BIN/pg_ctl" -D "$dir/data" -l "$dir/server.log" -w \
    -o "-c listen_addresses='' -c unix_socket_directories='$dir' -p 5432 -c shared_preload_libraries=outbox" start >/dev/null

until [[ -s "$dir/received.log" ]]; do sleep 0.1; done
port=$(head -1 "$dir/received.log")
"$BIN/psql" -X -q -h "$dir" -U postgres -d postgres -v ON_ERROR_STOP=1 -v sink_url="http://127.0.0.1:$port/upsert" \
    -f scripts/demo.sql
echo "== What the HTTP sink received"
tail -n +2 "$dir/received.log"
echo
echo "== The operator's view: outbox status"
cargo build --quiet -p outbox-cli
target/debug/outbox --dsn "host=$dir user=postgres dbname=postgres" status
