#!/usr/bin/env bash
# amqp091-go (Go): `go test -tags integration` of the package's source as Debian ships it
# (golang-github-rabbitmq-amqp091-go-dev, with its tests), built offline in GOPATH mode.
# The integration tests read AMQP_URL; without -tags they would be left out. Results are
# per top-level test (and example); a failing subtest fails its parent. A test that
# panics ends the test binary: lib/go_suite.py then resumes with the tests after it.
set -euo pipefail
# shellcheck source=SCRIPTDIR/../lib/common.sh
source "$CONFORMANCE_DIR/lib/common.sh"
pkg=github.com/rabbitmq/amqp091-go
export GO111MODULE=off GOFLAGS='' GOPATH="$SUITE_DIR/gopath:/usr/share/gocode"
export GOCACHE="$SUITE_DIR/gocache" CGO_ENABLED=0

case "$1" in
  prepare)
    need_apt golang-go golang-github-rabbitmq-amqp091-go-dev
    have=$(dpkg-query -W -f='${Version}' golang-github-rabbitmq-amqp091-go-dev)
    case "$have" in
      "$SUITE_VERSION"-*) ;;
      *) die "Debian has golang-github-rabbitmq-amqp091-go-dev $have, suites.toml says $SUITE_VERSION" ;;
    esac
    # A writable copy (go test writes nothing there, but keep /usr/share/gocode pristine);
    # /usr/share/gocode stays on GOPATH for the test dependencies (goleak).
    rm -rf "$SUITE_DIR/gopath/src/$pkg"
    mkdir -p "$SUITE_DIR/gopath/src/$(dirname "$pkg")"
    cp -a "/usr/share/gocode/src/$pkg" "$SUITE_DIR/gopath/src/$pkg"
    cd "$SUITE_DIR/gopath/src/$pkg"
    go test -tags integration -count=1 -list '.*' | grep -E '^(Test|Example|Fuzz)' >"$ALL_TESTS"
    echo "$(wc -l <"$ALL_TESTS") tests" >&2
    ;;
  test)
    cd "$SUITE_DIR/gopath/src/$pkg"
    export AMQP_URL="amqp://$BROKER_USER:$BROKER_PASSWORD@$BROKER_HOST:$BROKER_PORT/"
    "$CONFORMANCE_DIR/lib/go_suite.py" -tags integration -count=1 -timeout "${GO_TEST_TIMEOUT:-3m}"
    ;;
  *) die "usage: $0 prepare|test" ;;
esac
