#!/usr/bin/env bash
# Installs what building, testing and benchmarking need on Debian 12, skipping what is there:
# PostgreSQL 15 with its server headers, clang for pgrx's bindings, sudo for
# `cargo pgrx test --runas`, psycopg for the Python consumer, PgQ for the benchmark baseline,
# promtool (package prometheus) to check the metrics and alert rules, node-postgres for the
# Node.js consumer example, and cargo-pgrx 0.18.1 (the version that works with Rust 1.95).
set -euo pipefail
cd "$(dirname "$0")/.."

packages=(postgresql-15 postgresql-server-dev-15 libclang-dev clang sudo python3-psycopg postgresql-15-pgq3 prometheus)
# Debian's Node.js only when the machine has no npm of its own
command -v npm >/dev/null || packages+=(nodejs npm)
missing=()
for package in "${packages[@]}"; do
    dpkg-query -W -f='${Status}' "$package" 2>/dev/null | grep -q "install ok installed" || missing+=("$package")
done
if ((${#missing[@]})); then
    as_root=()
    [[ $(id -u) -eq 0 ]] || as_root=(sudo)
    export DEBIAN_FRONTEND=noninteractive
    "${as_root[@]}" apt-get update -qq
    "${as_root[@]}" apt-get install -y -qq --no-install-recommends "${missing[@]}" </dev/null
fi

if ! cargo pgrx --version 2>/dev/null | grep -q ' 0\.18\.1'; then
    cargo install cargo-pgrx --version 0.18.1 --locked
fi

PG_CONFIG=/usr/lib/postgresql/15/bin/pg_config
if ! grep -qs '^pg15 *=' "${PGRX_HOME:-$HOME/.pgrx}/config.toml"; then
    cargo pgrx init --pg15 "$PG_CONFIG"
fi

# the Node.js consumer of docs/operations.md
if [[ ! -d docs/examples/node_modules/pg ]]; then
    npm ci --prefix docs/examples --no-audit --no-fund --loglevel=error
fi
