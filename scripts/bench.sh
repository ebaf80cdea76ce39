#!/usr/bin/env bash
# Benchmarks with their baselines side by side (see docs/benchmarks.md): installs a release
# build of the extension, then runs benches/*.rs against a Postgres of their own.
#   scripts/bench.sh                      both benchmarks, every section (about 20 minutes)
#   scripts/bench.sh outbox [drain …]     benches/outbox.rs: write, tps, drain, latency
#   scripts/bench.sh endurance [scale …]  benches/endurance.rs: sustained, scale, subscriptions
set -euo pipefail
cd "$(dirname "$0")/.."
scripts/setup.sh
cargo pgrx install --release --pg-config /usr/lib/postgresql/15/bin/pg_config
if (($# == 0)); then
    cargo bench --bench outbox
    cargo bench --bench endurance
else
    cargo bench --bench "$1" -- "${@:2}"
fi
