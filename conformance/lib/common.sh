# shellcheck shell=bash
# Shared helpers for conformance/suites/*.sh. Source it; it expects the variables that
# conformance/run exports (SUITE, SUITE_VERSION, SUITE_DIR, CONFORMANCE_DIR, RESULTS,
# ALL_TESTS; BROKER_* in the test phase). See conformance/README.md for the contract.

say() { printf '[%s] %s\n' "$SUITE" "$*" >&2; }
die() { say "error: $*"; exit 2; }

# need_apt PACKAGE...: install Debian packages that are missing (apt-get update once).
need_apt() {
  local missing=() p
  for p in "$@"; do
    dpkg-query -W -f='${Status}' "$p" 2>/dev/null | grep -q 'install ok installed' || missing+=("$p")
  done
  [ ${#missing[@]} -eq 0 ] && return 0
  say "apt-get install ${missing[*]}"
  local sudo=""
  [ "$(id -u)" -eq 0 ] || sudo="sudo"
  $sudo apt-get update -qq >&2
  DEBIAN_FRONTEND=noninteractive $sudo apt-get install -y -qq "${missing[@]}" >&2
}

# py_venv DIR: make a venv in DIR (kept between runs); its python is DIR/bin/python.
py_venv() {
  local dir=$1
  [ -x "$dir/bin/python" ] && return 0
  rm -rf "$dir"
  if ! python3 -m venv "$dir" >&2 2>/dev/null; then
    rm -rf "$dir"
    need_apt python3-venv
    python3 -m venv "$dir" >&2
  fi
}

# pip_install DIR PIP_ARG...: pip-install into the venv DIR; skipped when the same
# arguments were installed before, so that a rerun needs no network.
pip_install() {
  local dir=$1; shift
  local stamp="$dir/.conformance-installed" want="$*"
  [ -f "$stamp" ] && [ "$(cat "$stamp")" = "$want" ] && return 0
  say "pip install $want"
  "$dir/bin/python" -m pip install -q --disable-pip-version-check "$@" >&2
  printf '%s' "$want" >"$stamp"
}

# pypi_sdist VENV NAME VERSION DEST_DIR: download NAME==VERSION's source distribution from
# PyPI (with the venv's pip) and unpack it under DEST_DIR; prints the unpacked directory.
pypi_sdist() {
  local venv=$1 name=$2 version=$3 dest=$4
  local out="$dest/src/$name-$version"
  if [ ! -f "$out/.conformance-unpacked" ]; then
    rm -rf "$dest/dl" "$out"
    mkdir -p "$dest/dl" "$out"
    "$venv/bin/python" -m pip download -q --disable-pip-version-check --no-binary :all: \
      --no-deps -d "$dest/dl" "$name==$version" >&2
    local archive
    archive=$(find "$dest/dl" -maxdepth 1 -name '*.tar.gz' | head -n 1)
    [ -n "$archive" ] || die "no sdist of $name $version"
    tar -xzf "$archive" -C "$out" --strip-components=1
    touch "$out/.conformance-unpacked"
  fi
  printf '%s\n' "$out"
}

# crate_source NAME VERSION DEST_DIR: fetch crate NAME=VERSION from crates.io (through
# cargo, as a dependency of a scratch crate) and copy its published source to
# DEST_DIR/src/NAME-VERSION; prints that directory. A fresh copy is made only when the
# version changes, so that the suite's own build stays incremental.
crate_source() {
  local name=$1 version=$2 dest=$3
  local out="$dest/src/$name-$version"
  if [ ! -f "$out/.conformance-copied" ]; then
    local scratch="$dest/fetch"
    rm -rf "$scratch" "$out"
    mkdir -p "$scratch/src" "$(dirname "$out")"
    cat >"$scratch/Cargo.toml" <<TOML
[package]
name = "conformance-fetch"
version = "0.0.0"
edition = "2021"
publish = false

[dependencies]
$name = "=$version"

[workspace]
TOML
    : >"$scratch/src/lib.rs"
    (cd "$scratch" && cargo fetch -q >&2)
    local manifest
    manifest=$(cd "$scratch" && cargo metadata -q --format-version 1 | python3 -c '
import json, sys
name, version = sys.argv[1], sys.argv[2]
for p in json.load(sys.stdin)["packages"]:
    if p["name"] == name and p["version"] == version:
        print(p["manifest_path"])
' "$name" "$version")
    [ -n "$manifest" ] || die "cargo did not fetch $name $version"
    cp -a "$(dirname "$manifest")" "$out"
    chmod -R u+w "$out"
    touch "$out/.conformance-copied"
  fi
  printf '%s\n' "$out"
}
