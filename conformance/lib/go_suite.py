#!/usr/bin/env python3
"""Run a Go package's tests for a conformance suite: `go_suite.py GO_TEST_ARG...` in the
package's directory runs `go test -json GO_TEST_ARG...` and appends one `PASS|FAIL|SKIP
name` line per top-level test (or example) to $RESULTS.

A test that panics (or hits `-timeout`) ends the whole test binary, and with it every
test after it. So when tests of $ALL_TESTS are left without a result, the one(s) that
were running are counted as failed and `go test` runs again for the rest (`-run`), until
every test has a result or a run makes no progress. The tests are the authors'; only
the resumption after a crash is this harness's.
"""
import json
import os
import re
import subprocess
import sys

def run(args, only):
    cmd = ["go", "test", "-json", *args]
    if only is not None:
        cmd += ["-run", "^(" + "|".join(re.escape(t) for t in only) + ")$"]
        print(f"$ go test ... -run <{len(only)} tests without a result>", file=sys.stderr, flush=True)
    else:
        print(f"$ {' '.join(cmd)}", file=sys.stderr, flush=True)
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, text=True, errors="replace")
    final, started = {}, []
    for line in proc.stdout:
        try:
            ev = json.loads(line)
        except ValueError:
            sys.stderr.write(line)
            continue
        test, action = ev.get("Test"), ev.get("Action")
        if action == "output":
            sys.stderr.write(ev.get("Output", ""))
        if not test or "/" in test:
            continue
        if action == "run":
            started.append(test)
        elif action in ("pass", "fail", "skip"):
            final[test] = {"pass": "PASS", "fail": "FAIL", "skip": "SKIP"}[action]
    proc.wait()
    for test in started:  # running when the binary died: it took the others down
        if test not in final:
            final[test] = "FAIL"
            print(f"!! {test} ended the test binary (panic or timeout)", file=sys.stderr)
    return final


def main():
    args = sys.argv[1:]
    all_tests = [t for t in open(os.environ["ALL_TESTS"]).read().split() if t]
    results = run(args, None)
    while True:
        left = [t for t in all_tests if t not in results]
        if not left:
            break
        more = run(args, left)
        if not more:
            break
        results.update(more)
    with open(os.environ["RESULTS"], "a") as out:
        out.writelines(f"{status} {test}\n" for test, status in results.items())


if __name__ == "__main__":
    main()
