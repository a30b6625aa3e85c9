# shellcheck shell=bash
# What Warren's container tests share (docker/ci, docker/ci-smoke, docker/ci-cluster):
# the tools they install, the dockerd they start, the image they build, the pika venv
# their client (docker/smoke.py) runs in, and their step / ok / fail lines.
#
# Sourced, not run. The caller sets TEST_NAME (its log prefix, e.g. docker-smoke) first,
# and may define test_cleanup (removes what the test made) and test_diagnostics (prints
# what helps to understand a failure); both run as the test ends. What the library
# starts or makes is removed at exit: its dockerd, the image it built, its work
# directory. What it finds already there is used and left alone: a running dockerd, an
# image named by WARREN_TEST_IMAGE, a python with pika named by WARREN_TEST_PYTHON
# (docker/ci sets the last two so that its tests share one build).

cd "$(dirname "${BASH_SOURCE[0]}")/.." || exit 1

work=$(mktemp -d "/tmp/warren-$TEST_NAME.XXXXXX")
started=$SECONDS
passed=0
dockerd_pid=
built_image=
background_pids=()
python=${WARREN_TEST_PYTHON:-}
venv_pid=

step() { echo "$TEST_NAME: [$((SECONDS - started))s] $*"; }
# One check group done (the closing line counts them, as test runners do).
ok() {
  passed=$((passed + 1))
  echo "$TEST_NAME: ok: $*"
}

fail() {
  echo "$TEST_NAME: FAILED: $*" >&2
  echo "$TEST_NAME: $passed passed, 1 failed"
  if declare -F test_diagnostics >/dev/null; then test_diagnostics >&2 || true; fi
  exit 1
}

lib_exit() {
  local status=$?
  set +e
  for pid in "${background_pids[@]}"; do kill "$pid" 2>/dev/null; done
  if [ -n "$dockerd_pid" ] || "$DOCKER" info >/dev/null 2>&1; then
    if declare -F test_cleanup >/dev/null; then test_cleanup; fi
    [ -n "$built_image" ] && "$DOCKER" image rm "$built_image" >/dev/null 2>&1
  fi
  if [ -n "$dockerd_pid" ]; then
    kill "$dockerd_pid" 2>/dev/null
    for _ in $(seq 1 100); do kill -0 "$dockerd_pid" 2>/dev/null || break; sleep 0.2; done
  fi
  rm -rf "$work"
  exit "$status"
}
trap lib_exit EXIT

# Installs with apt-get the Debian packages of the commands given as command:package
# that are missing.
install_missing() {
  local install=() pair
  for pair in "$@"; do
    command -v "${pair%%:*}" >/dev/null || install+=("${pair#*:}")
  done
  [ ${#install[@]} -eq 0 ] && return 0
  step "installing ${install[*]}"
  export DEBIAN_FRONTEND=noninteractive
  apt-get -o DPkg::Lock::Timeout=600 update -q >/dev/null
  apt-get -o DPkg::Lock::Timeout=600 install -y -q "${install[@]}" >/dev/null
}

# Debian's docker client matches its engine and has BuildKit built in (a newer client
# elsewhere on PATH may want the buildx plugin).
install_missing dockerd:docker.io
DOCKER=docker
[ -x /usr/bin/docker ] && DOCKER=/usr/bin/docker
export DOCKER DOCKER_BUILDKIT=1

# Uses the running dockerd, or starts one that leaves the host's network settings alone
# (--iptables=false --ip-forward=false): published ports then go through docker-proxy,
# and containers on one bridge network reach each other and the host directly.
start_dockerd() {
  if "$DOCKER" info >/dev/null 2>&1; then
    step "using the running dockerd"
    return
  fi
  step "starting dockerd"
  dockerd --iptables=false --ip-forward=false >"$work/dockerd.log" 2>&1 &
  dockerd_pid=$!
  for _ in $(seq 1 150); do "$DOCKER" info >/dev/null 2>&1 && break; sleep 0.2; done
  "$DOCKER" info >/dev/null 2>&1 || { tail -20 "$work/dockerd.log" >&2; fail "dockerd did not start"; }
}

# Starts making a venv with pika in the background, unless WARREN_TEST_PYTHON names a
# python that has it; wait_python waits for it.
start_python() {
  [ -n "$python" ] && return
  step "python venv with pika (meanwhile)"
  (python3 -m venv "$work/venv" \
    && "$work/venv/bin/pip" install -q --disable-pip-version-check pika) >"$work/venv.log" 2>&1 &
  venv_pid=$!
  background_pids+=("$venv_pid")
}
wait_python() {
  [ -n "$python" ] && return
  wait "$venv_pid" || { cat "$work/venv.log" >&2; fail "pip install pika"; }
  python=$work/venv/bin/python
}
# The test's AMQP client (docker/smoke.py), with the subcommand and arguments given.
client() { "$python" docker/smoke.py "$@"; }

# Sets `image`: WARREN_TEST_IMAGE when given, else an image built here (and removed at
# exit) on a base image made from Debian's archive (docker/base-images): from
# target/release/warren (`--target prebuilt`), or, with from_source=1, compiling Warren
# inside the build in a Rust image made from Debian's rustc-web (slower).
build_image() {
  local from_source=${1:-0} base=warren-local/debian:bookworm-slim
  if [ -n "${WARREN_TEST_IMAGE:-}" ]; then
    image=$WARREN_TEST_IMAGE
    step "using the image $image"
    return
  fi
  install_missing debootstrap:debootstrap
  image=warren-$TEST_NAME:$$
  if [ "$from_source" = 1 ]; then
    docker/base-images --rust
    step "building the image from source (Rust inside the build)"
    built_image=$image
    "$DOCKER" build --network host --progress plain -t "$image" \
      --build-arg RUST_IMAGE=warren-local/rust:bookworm --build-arg BASE_IMAGE="$base" . \
      >"$work/build.log" 2>&1 || { tail -40 "$work/build.log" >&2; fail "docker build"; }
  else
    docker/base-images
    step "cargo build --release (for the prebuilt image)"
    cargo build --release --locked --bin warren -q
    step "building the image from target/release/warren"
    built_image=$image
    "$DOCKER" build --progress plain --target prebuilt -t "$image" \
      --build-arg BASE_IMAGE="$base" . \
      >"$work/build.log" 2>&1 || { tail -40 "$work/build.log" >&2; fail "docker build"; }
  fi
}

# Waits (up to 60 s) for a container's HEALTHCHECK to report it healthy.
wait_healthy() {
  local status=
  for _ in $(seq 1 300); do
    status=$("$DOCKER" inspect --format '{{.State.Health.Status}}' "$1")
    [ "$status" = healthy ] && return 0
    [ "$("$DOCKER" inspect --format '{{.State.Running}}' "$1")" = true ] || break
    sleep 0.2
  done
  fail "$1 is not healthy ($status)"
}

# The host port that a container's port ($2, default 5672) is published on (it changes
# when a container starts again).
port_of() { "$DOCKER" port "$1" "${2:-5672}/tcp" | head -1 | sed 's/.*://'; }

# Writes a container's log (stdout and stderr) to $work/log, to grep as a file: with
# pipefail, `docker logs | grep -q` fails when grep stops reading early.
log_of() { "$DOCKER" logs "${@:2}" "$1" >"$work/log" 2>&1 || fail "docker logs $1"; }

# Prints the last lines of the logs of the containers given that exist.
print_logs() {
  local c
  for c in "$@"; do
    if "$DOCKER" container inspect "$c" >/dev/null 2>&1; then
      echo "---- docker logs $c (last 40 lines)"
      "$DOCKER" logs --tail 40 "$c" 2>&1
    fi
  done
}
