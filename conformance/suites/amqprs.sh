#!/usr/bin/env bash
# amqprs (Rust, crates.io): `cargo test` of the published crate (unit, integration and doc
# tests). They connect to the hard-coded localhost:5672 (so suites.toml gives this suite
# a private network namespace) as user "user" / password "bitnami" (the authors' docker
# broker); the fetched copy is rewritten to use $BROKER_USER / $BROKER_PASSWORD instead.
set -euo pipefail
# shellcheck source=SCRIPTDIR/../lib/common.sh
source "$CONFORMANCE_DIR/lib/common.sh"

case "$1" in
  prepare)
    src=$(crate_source amqprs "$SUITE_VERSION" "$SUITE_DIR")
    if [ ! -f "$src/.conformance-adapted" ]; then
      # Every place that names the fixed credentials: OpenConnectionArguments::new(...,
      # "user", "bitnami"), amqp://user:bitnami@ URIs, the user-id property (a broker
      # checks that it is the connection's user), the RABBIT-CR-DEMO exchange, and the
      # multi-line doc-test in src/api/channel/basic.rs.
      grep -rlE 'bitnami|with_user_id\("user"\)' "$src/src" "$src/tests" | while read -r f; do
        sed -i -E \
          -e "s/\"user\", \"bitnami\"/\"$BROKER_USER\", \"$BROKER_PASSWORD\"/g" \
          -e "s/user:bitnami@/$BROKER_USER:$BROKER_PASSWORD@/g" \
          -e "s/with_user_id\(\"user\"\)/with_user_id(\"$BROKER_USER\")/g" \
          -e "s/My password is bitnami/My password is $BROKER_PASSWORD/g" \
          -e "s/^(\s*(\/\/\/ #)?\s*)\"user\",\s*$/\1\"$BROKER_USER\",/" \
          -e "s/^(\s*(\/\/\/ #)?\s*)\"bitnami\",\s*$/\1\"$BROKER_PASSWORD\",/" \
          "$f"
      done
      sed -i -E "s/^(\s*)\"user\"\.try_into\(\)\.unwrap\(\),/\1\"$BROKER_USER\".try_into().unwrap(),/" \
        "$src/src/net/split_connection.rs"
      if grep -rqE 'bitnami' "$src/src" "$src/tests"; then
        grep -rnE 'bitnami' "$src/src" "$src/tests" >&2
        die "credentials left unadapted (see above): update the rewrite in $0"
      fi
      touch "$src/.conformance-adapted"
    fi
    echo "$src" >"$SUITE_DIR/crate-dir"
    "$CONFORMANCE_DIR/lib/cargo_suite.py" prepare "$src"
    ;;
  test)
    [ "$BROKER_HOST:$BROKER_PORT" = "127.0.0.1:5672" ] || die "amqprs needs the broker on localhost:5672"
    "$CONFORMANCE_DIR/lib/cargo_suite.py" test "$(cat "$SUITE_DIR/crate-dir")"
    ;;
  *) die "usage: $0 prepare|test" ;;
esac
