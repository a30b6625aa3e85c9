#!/usr/bin/env bash
# lapin (Rust, crates.io): `cargo test` of the published crate, which ships its tests/.
# The tests read AMQP_ADDR. tests/conn_refused.rs wants localhost:5673 refused, so the
# suite runs in a private network namespace (suites.toml). It and tests/connection_retry.rs
# run fake servers of their own, and the lib:: and doc:: tests need no broker.
set -euo pipefail
# shellcheck source=SCRIPTDIR/../lib/common.sh
source "$CONFORMANCE_DIR/lib/common.sh"

case "$1" in
  prepare)
    src=$(crate_source lapin "$SUITE_VERSION" "$SUITE_DIR")
    echo "$src" >"$SUITE_DIR/crate-dir"
    "$CONFORMANCE_DIR/lib/cargo_suite.py" prepare "$src"
    ;;
  test)
    export AMQP_ADDR="amqp://$BROKER_USER:$BROKER_PASSWORD@$BROKER_HOST:$BROKER_PORT/%2f"
    "$CONFORMANCE_DIR/lib/cargo_suite.py" test "$(cat "$SUITE_DIR/crate-dir")"
    ;;
  *) die "usage: $0 prepare|test" ;;
esac
