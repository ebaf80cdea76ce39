#!/usr/bin/env bash
# Benchmarks with their baselines side by side (see docs/benchmarks.md): installs a release
# build of the extension, then runs benches/outbox.rs against a Postgres of its own.
set -euo pipefail
cd "$(dirname "$0")/.."
scripts/setup.sh
cargo pgrx install --release --pg-config /usr/lib/postgresql/15/bin/pg_config
cargo bench --bench outbox
