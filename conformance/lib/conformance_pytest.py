"""pytest plugin for conformance suites: `pytest -p conformance_pytest` (with this folder
on PYTHONPATH) writes every selected test's node id to $ALL_TESTS once collection is done,
and one `PASS|FAIL|SKIP nodeid` line per test to $RESULTS as each one finishes. A test
whose setup or teardown errors counts as failed; xfail counts as skipped."""
import os

_outcomes = {}


def pytest_collection_finish(session):
    path = os.environ.get("ALL_TESTS")
    if path:
        with open(path, "w") as f:
            f.writelines(f"{item.nodeid}\n" for item in session.items)


def pytest_runtest_logreport(report):
    previous = _outcomes.get(report.nodeid)
    if report.failed:
        outcome = "FAIL"
    elif report.skipped:
        outcome = "SKIP"
    elif report.when == "call":
        outcome = "PASS"
    else:
        outcome = None
    if outcome and previous != "FAIL":
        _outcomes[report.nodeid] = outcome
    if report.when == "teardown":
        final = _outcomes.pop(report.nodeid, "PASS")
        path = os.environ.get("RESULTS")
        if path:
            with open(path, "a") as f:
                f.write(f"{final} {report.nodeid}\n")
