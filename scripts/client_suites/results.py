#!/usr/bin/env python3
"""Results of the client-library suites (scripts/client_suites.sh).

Every suite's outcome is kept as a TSV file, one test a line:
`<pass|fail|skip>\t<test id>`. This helper turns the runners' own outputs
into that form and compares a run straight against Postgres with a run
through pgshift.

    results.py node-file TEST_FILE LOG EXIT_CODE   node-postgres integration file
    results.py mocha JSON PREFIX                    mocha's JSON reporter output
    results.py compare OUT_DIR SUITE...             the verdict (see `compare`)
"""

import json
import os
import re
import sys


def emit(outcome, test_id):
    test_id = test_id.replace("\t", " ").replace("\n", " ")
    print(f"{outcome}\t{test_id}")


def node_file(test_file, log_path, code):
    """node-postgres' integration files print `  name ✔`, `  name FAILED!`
    or `  name ? - SKIPPED` per test and stop at the first failure (the rest
    of the file does not run). The file itself is one more entry, `FILE`,
    failed when node exited non-zero."""
    with open(log_path, encoding="utf-8", errors="replace") as f:
        text = f.read()
    seen = set()
    for line in text.splitlines():
        m = re.match(r"^  (.*?) (✔|FAILED!|\? - SKIPPED)\s*$", line)
        if not m:
            continue
        name, mark = m.group(1), m.group(2)
        test_id = f"{test_file}::{name}"
        n = 2
        while test_id in seen:
            test_id = f"{test_file}::{name} #{n}"
            n += 1
        seen.add(test_id)
        emit({"✔": "pass", "FAILED!": "fail"}.get(mark, "skip"), test_id)
    emit("pass" if int(code) == 0 else "fail", test_file)


def mocha(json_path, prefix):
    try:
        with open(json_path, encoding="utf-8") as f:
            data = json.load(f)
    except (OSError, ValueError) as e:
        emit("fail", f"{prefix}::<no report: {e}>")
        return
    for key, outcome in (("passes", "pass"), ("pending", "skip"), ("failures", "fail")):
        for t in data.get(key, []):
            emit(outcome, f"{prefix}::{t.get('file', '').split('/')[-1]}::{t['fullTitle']}")


def load(path):
    out = {}
    try:
        with open(path, encoding="utf-8") as f:
            for line in f:
                line = line.rstrip("\n")
                if "\t" in line:
                    outcome, test_id = line.split("\t", 1)
                    # A test reported twice counts with its worst outcome.
                    if out.get(test_id) != "fail":
                        out[test_id] = outcome
    except FileNotFoundError:
        pass
    return out


def compare(out_dir, suites):
    """Reads OUT/direct/S.tsv and OUT/proxy/S.tsv for each suite S, plus the
    re-runs OUT/rerun-direct-N/S.tsv and OUT/rerun-proxy-N/S.tsv. A test
    that passed straight against Postgres and failed through pgshift is a
    pgshift failure if it fails through pgshift again in a re-run and never
    straight. One that also failed straight in a re-run is flaky on its own;
    one that failed through pgshift once and passed every re-run through
    pgshift and straight is a one-off: both are reported, neither fails the
    run (a race that shows once in four runs is listed for a person to
    look at, rather than failing CI by chance). Exit code 1 when there is
    any pgshift failure, or a suite ran no test at all."""
    bad = []
    flaky = []
    once = []
    lines = []
    empty = []
    reruns = sorted(
        d for d in os.listdir(out_dir) if d.startswith("rerun-")
    )
    for suite in suites:
        direct = load(os.path.join(out_dir, "direct", f"{suite}.tsv"))
        proxy = load(os.path.join(out_dir, "proxy", f"{suite}.tsv"))
        count = lambda d, o: sum(1 for v in d.values() if v == o)
        lines.append(
            f"{suite}: direct {count(direct, 'pass')} passed, {count(direct, 'fail')} failed, "
            f"{count(direct, 'skip')} skipped; through pgshift {count(proxy, 'pass')} passed, "
            f"{count(proxy, 'fail')} failed, {count(proxy, 'skip')} skipped"
        )
        if not direct or count(direct, "pass") == 0:
            empty.append(suite)
        for test_id in sorted(direct):
            if direct[test_id] != "pass" or proxy.get(test_id, "absent") not in ("fail", "absent"):
                continue
            direct_again = [
                load(os.path.join(out_dir, d, f"{suite}.tsv")).get(test_id, "absent")
                for d in reruns
                if d.startswith("rerun-direct")
            ]
            proxy_again = [
                load(os.path.join(out_dir, d, f"{suite}.tsv")).get(test_id, "absent")
                for d in reruns
                if d.startswith("rerun-proxy")
            ]
            where = f"{suite} {test_id} (through pgshift: {proxy.get(test_id, 'absent')}"
            if proxy_again:
                where += f", again: {', '.join(proxy_again)}"
            where += f"; direct again: {', '.join(direct_again) or 'not re-run'})"
            if "fail" in direct_again:
                flaky.append(where)
            elif proxy_again and all(o == "pass" for o in proxy_again):
                once.append(where)
            else:
                bad.append(where)
        for test_id in sorted(set(proxy) - set(direct)):
            if proxy[test_id] == "fail":
                bad.append(f"{suite} {test_id} (only through pgshift, and failed)")
    print("\n".join(lines))
    if flaky:
        print(f"\n{len(flaky)} test(s) failed through pgshift but also fail straight against Postgres (flaky on their own):")
        print("\n".join("  " + f for f in flaky))
    if once:
        print(f"\n{len(once)} test(s) failed once through pgshift and passed every re-run, through pgshift and straight (look at them; not counted as failures):")
        print("\n".join("  " + f for f in once))
    if empty:
        print(f"\nno test passed straight against Postgres in: {', '.join(empty)} (is the suite set up?)")
    if bad:
        print(f"\n{len(bad)} test(s) pass straight against Postgres and fail through pgshift:")
        print("\n".join("  " + b for b in bad))
    total_direct = sum(1 for s in suites for v in load(os.path.join(out_dir, 'direct', f'{s}.tsv')).values() if v == 'pass')
    print(f"\nclient-suites: {total_direct - len(bad)} passed, {len(bad)} failed")
    return 1 if bad or empty else 0


def main(argv):
    cmd = argv[1] if len(argv) > 1 else ""
    if cmd == "node-file" and len(argv) == 5:
        node_file(argv[2], argv[3], argv[4])
    elif cmd == "mocha" and len(argv) == 4:
        mocha(argv[2], argv[3])
    elif cmd == "compare" and len(argv) >= 4:
        return compare(argv[2], argv[3:])
    else:
        print(__doc__, file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv))
