#!/usr/bin/env python3
"""Build and run a Rust crate's own tests (`cargo test`) for a conformance suite.

    cargo_suite.py prepare CRATE_DIR [CARGO_ARG...]   build every test target, list tests
    cargo_suite.py test    CRATE_DIR [CARGO_ARG...]   run them, one `cargo test` per target

CARGO_ARG are passed to every `cargo test` (e.g. `--features smol`). The build goes to
$SUITE_DIR/cargo-target (never the project's own target dir, so no lock is shared).
`prepare` writes $ALL_TESTS; `test` writes $RESULTS (`PASS|FAIL|SKIP name` lines). Test
names are `TARGET::NAME` as libtest prints them, TARGET being `lib`, `doc` or the name of
the test target (tests/TARGET.rs). Each target runs under its own time limit
($TARGET_TIMEOUT seconds, default 150), so one hanging test binary costs only its own
tests, which then count as failed.
"""
import json
import os
import re
import signal
import subprocess
import sys
from pathlib import Path

SUITE_DIR = Path(os.environ["SUITE_DIR"])
TARGETS_FILE = SUITE_DIR / "cargo-targets.json"
TEST_LINE = re.compile(r"^test (.+?)(?: - should panic| - compile fail| - compile)? "
                       r"\.\.\. (ok|FAILED|ignored)\b")


def cargo_env(offline):
    env = dict(os.environ, CARGO_TARGET_DIR=str(SUITE_DIR / "cargo-target"))
    if offline:
        env["CARGO_NET_OFFLINE"] = "true"
    return env


def selector(target):
    kind, name = target["kind"], target["name"]
    return {"lib": ["--lib"], "doc": ["--doc"], "test": ["--test", name],
            "bin": ["--bin", name]}.get(kind, ["--test", name])


def prefix(target):
    return {"lib": "lib", "doc": "doc"}.get(target["kind"], target["name"])


def listed(output):
    return [line[: -len(": test")] for line in output.splitlines() if line.endswith(": test")]


def prepare(crate, args):
    env = cargo_env(offline=False)
    build = subprocess.run(
        ["cargo", "test", "--no-run", "--message-format=json-render-diagnostics", *args],
        cwd=crate, env=env, stdout=subprocess.PIPE, text=True)
    if build.returncode != 0:
        sys.exit(f"cargo test --no-run failed ({build.returncode})")
    targets, names = [], []
    for line in build.stdout.splitlines():
        msg = json.loads(line) if line.startswith("{") else {}
        if msg.get("reason") != "compiler-artifact" or not msg.get("profile", {}).get("test"):
            continue
        if msg.get("package_id") and "path+file" not in msg["package_id"]:
            continue  # a dependency's artifact
        target = msg["target"]
        kind = "lib" if "lib" in target["kind"] or "rlib" in target["kind"] else target["kind"][0]
        entry = {"kind": kind, "name": target["name"]}
        targets.append(entry)
        out = subprocess.run([msg["executable"], "--list"], cwd=crate, env=env,
                             stdout=subprocess.PIPE, text=True, check=True).stdout
        names += [f"{prefix(entry)}::{n}" for n in listed(out)]
        if kind == "lib" and target.get("doctest"):
            doc = {"kind": "doc", "name": target["name"]}
            out = subprocess.run(["cargo", "test", "--doc", *args, "--", "--list"], cwd=crate,
                                 env=env, stdout=subprocess.PIPE, text=True, check=True).stdout
            doc_names = listed(out)
            if doc_names:
                targets.append(doc)
                names += [f"doc::{n}" for n in doc_names]
    order = {"lib": 0, "bin": 1, "test": 2, "doc": 3}
    targets.sort(key=lambda t: (order.get(t["kind"], 2), t["name"]))
    TARGETS_FILE.write_text(json.dumps(targets, indent=1))
    Path(os.environ["ALL_TESTS"]).write_text("".join(f"{n}\n" for n in names))
    print(f"{len(targets)} test targets, {len(names)} tests", file=sys.stderr)


def test(crate, args):
    env = cargo_env(offline=True)
    limit = int(os.environ.get("TARGET_TIMEOUT", "150"))
    results = open(os.environ["RESULTS"], "a")
    for target in json.loads(TARGETS_FILE.read_text()):
        cmd = ["cargo", "test", *args, *selector(target)]
        print(f"$ {' '.join(cmd)}", file=sys.stderr, flush=True)
        proc = subprocess.Popen(cmd, cwd=crate, env=env, stdout=subprocess.PIPE,
                                text=True, errors="replace", start_new_session=True)
        try:
            out, _ = proc.communicate(timeout=limit)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)
            out, _ = proc.communicate()
            print(f"!! {target['name']} ({target['kind']}) killed after {limit} s; "
                  "its unfinished tests count as failed", file=sys.stderr)
        sys.stderr.write(out)
        for line in out.splitlines():
            m = TEST_LINE.match(line)
            if m:
                status = {"ok": "PASS", "FAILED": "FAIL", "ignored": "SKIP"}[m.group(2)]
                results.write(f"{status} {prefix(target)}::{m.group(1)}\n")
        results.flush()


if __name__ == "__main__":
    if len(sys.argv) < 3 or sys.argv[1] not in ("prepare", "test"):
        sys.exit(__doc__)
    {"prepare": prepare, "test": test}[sys.argv[1]](sys.argv[2], sys.argv[3:])
