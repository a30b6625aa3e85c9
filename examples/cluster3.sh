#!/usr/bin/env bash
# A 3-node Warren cluster on one machine: each node is a "host" in a network namespace
# of its own, on a bridge, with the standard ports (AMQP 5672, inter-node 25672).
#
#   sudo examples/cluster3.sh up      # build first: cargo build --release
#   sudo examples/cluster3.sh status  # the metadata leader each node last saw
#   sudo examples/cluster3.sh down    # stop the nodes, remove namespaces and data
#
# Clients connect to amqp://warren:warren@10.99.0.1:5672/ (or .2, .3) from this machine.
# Settings: WARREN (binary, default target/release/warren), PREFIX (names of the
# namespaces, bridge and veths, default wcl), SUBNET (default 10.99.0), DATA (default
# /tmp/$PREFIX). Needs root (ip netns).
set -euo pipefail
cd "$(dirname "$0")/.."

WARREN=${WARREN:-target/release/warren}
PREFIX=${PREFIX:-wcl}
SUBNET=${SUBNET:-10.99.0}
DATA=${DATA:-/tmp/$PREFIX}
SECRET=${SECRET:-$(cat "$DATA/secret" 2>/dev/null || head -c 24 /dev/urandom | base64)}
NODES="n1@$SUBNET.1,n2@$SUBNET.2,n3@$SUBNET.3"

up() {
  [ -x "$WARREN" ] || { echo "no $WARREN: run cargo build --release first" >&2; exit 1; }
  mkdir -p "$DATA"
  echo "$SECRET" > "$DATA/secret"
  ip link add "$PREFIX-br" type bridge
  ip addr add "$SUBNET.254/24" dev "$PREFIX-br"
  ip link set "$PREFIX-br" up
  for i in 1 2 3; do
    ns="$PREFIX-n$i"
    ip netns add "$ns"
    ip link add "$PREFIX-v$i" type veth peer name "$PREFIX-p$i"
    ip link set "$PREFIX-p$i" netns "$ns"
    ip link set "$PREFIX-v$i" master "$PREFIX-br" up
    ip netns exec "$ns" ip link set lo up
    ip netns exec "$ns" ip link set "$PREFIX-p$i" name eth0
    ip netns exec "$ns" ip addr add "$SUBNET.$i/24" dev eth0
    ip netns exec "$ns" ip link set eth0 up
    # guest may log in from loopback only (as in RabbitMQ): the example uses its own user.
    ip netns exec "$ns" env \
      WARREN_NODE_NAME="n$i@$SUBNET.$i" \
      WARREN_CLUSTER_NODES="$NODES" \
      WARREN_CLUSTER_SECRET="$SECRET" \
      WARREN_LISTEN_ADDRESSES=0.0.0.0 \
      WARREN_DATA_DIR="$DATA/n$i" \
      WARREN_DEFAULT_USER=warren WARREN_DEFAULT_PASS=warren \
      nohup "$WARREN" >"$DATA/n$i.log" 2>&1 &
  done
  echo "started; logs in $DATA/n*.log; clients: amqp://warren:warren@$SUBNET.1:5672/ (.2, .3)"
}

status() {
  for i in 1 2 3; do
    leader=$(grep -o 'metadata leader is [^ ]*\|no metadata leader' "$DATA/n$i.log" | tail -1 || true)
    echo "n$i@$SUBNET.$i: ${leader:-no leader seen yet}"
  done
}

down() {
  for i in 1 2 3; do
    ns="$PREFIX-n$i"
    if ip netns list | grep -qw "$ns"; then
      for pid in $(ip netns pids "$ns"); do kill "$pid" 2>/dev/null || true; done
      sleep 1
      for pid in $(ip netns pids "$ns"); do kill -9 "$pid" 2>/dev/null || true; done
      ip netns delete "$ns"
    fi
  done
  ip link delete "$PREFIX-br" 2>/dev/null || true
  rm -rf "$DATA"
}

case "${1:-}" in
  up) up ;;
  status) status ;;
  down) down ;;
  *) echo "usage: $0 up|status|down" >&2; exit 2 ;;
esac
