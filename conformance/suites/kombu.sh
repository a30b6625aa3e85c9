#!/usr/bin/env bash
# kombu (PyPI): pytest on t/integration/test_py_amqp.py of its source distribution (the
# py-amqp transport), which reads RABBITMQ_HOST and RABBITMQ_5672_TCP. Tests marked flaky
# are not rerun (`-p no:rerunfailures`): a conformance run reports what happened.
set -euo pipefail
# shellcheck source=SCRIPTDIR/../lib/common.sh
source "$CONFORMANCE_DIR/lib/common.sh"
venv="$SUITE_DIR/venv"
AMQP_VERSION=5.4.2   # py-amqp under kombu: pinned, so that a new release changes nothing here

case "$1" in
  prepare)
    py_venv "$venv"
    src=$(pypi_sdist "$venv" kombu "$SUITE_VERSION" "$SUITE_DIR")
    # pytest as pinned in the sdist's requirements/test.txt
    pip_install "$venv" "$src" "amqp==$AMQP_VERSION" "pytest==9.1.1" "pytest-timeout==2.4.0"
    echo "$src" >"$SUITE_DIR/sdist-dir"
    ;;
  test)
    cd "$(cat "$SUITE_DIR/sdist-dir")"
    export RABBITMQ_HOST="$BROKER_HOST" RABBITMQ_5672_TCP="$BROKER_PORT"
    export PYTHONPATH="$CONFORMANCE_DIR/lib"
    "$venv/bin/python" -m pytest -p conformance_pytest -p no:cacheprovider -p no:rerunfailures \
      --timeout=30 -v t/integration/test_py_amqp.py || true
    ;;
  *) die "usage: $0 prepare|test" ;;
esac
