"""pytest plugin for scripts/client_suites.sh: writes one line per test,
`<outcome>\t<node id>`, to the file named by $CLIENT_SUITES_REPORT.

A test counts as failed when any phase (setup, call, teardown) failed, as
skipped when it was skipped and nothing failed, else as passed. Loaded with
`-p report_plugin` (its directory on PYTHONPATH), so the suites under test
need no change.
"""

import os

_outcomes = {}
_rank = {"pass": 0, "skip": 1, "fail": 2}


def _set(nodeid, outcome):
    old = _outcomes.get(nodeid)
    if old is None or _rank[outcome] > _rank[old]:
        _outcomes[nodeid] = outcome


def pytest_runtest_logreport(report):
    if report.failed:
        _set(report.nodeid, "fail")
    elif report.skipped:
        _set(report.nodeid, "skip")
    elif report.when == "call":
        _set(report.nodeid, "pass")


def pytest_collectreport(report):
    # A module that cannot be imported is one failed "test" of its own.
    if report.failed:
        _set(report.nodeid or "<collection>", "fail")


def pytest_sessionfinish(session, exitstatus):
    path = os.environ.get("CLIENT_SUITES_REPORT")
    if not path:
        return
    with open(path, "w", encoding="utf-8") as f:
        for nodeid in sorted(_outcomes):
            f.write(f"{_outcomes[nodeid]}\t{nodeid}\n")
