#!/usr/bin/env bash
# py-amqp (PyPI `amqp`): pytest on t/integration of its source distribution, which reads
# RABBITMQ_HOST and RABBITMQ_5672_TCP. The TLS tests are deselected (`-k "not tls"`): the
# sdist has no t/certs and Warren has no TLS listener. t/integration/test_integration.py
# drives the client against mocks and needs no broker; test_rmq.py talks to the broker.
set -euo pipefail
# shellcheck source=SCRIPTDIR/../lib/common.sh
source "$CONFORMANCE_DIR/lib/common.sh"
venv="$SUITE_DIR/venv"

case "$1" in
  prepare)
    py_venv "$venv"
    src=$(pypi_sdist "$venv" amqp "$SUITE_VERSION" "$SUITE_DIR")
    # pytest within the range of the sdist's requirements/test.txt
    pip_install "$venv" "$src" "pytest>=6.2.5,<=8.0.0" "pytest-timeout==2.4.0"
    echo "$src" >"$SUITE_DIR/sdist-dir"
    ;;
  test)
    cd "$(cat "$SUITE_DIR/sdist-dir")"
    export RABBITMQ_HOST="$BROKER_HOST" RABBITMQ_5672_TCP="$BROKER_PORT"
    export PYTHONPATH="$CONFORMANCE_DIR/lib"
    "$venv/bin/python" -m pytest -p conformance_pytest -p no:cacheprovider \
      --timeout=30 -v -k "not tls" t/integration || true
    ;;
  *) die "usage: $0 prepare|test" ;;
esac
