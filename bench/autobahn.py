"""Autobahn|Testsuite against raafd's WebSocket frame code: groups 1-10 of the fuzzing client
(framing, pings and pongs, reserved bits, opcodes, fragmentation, UTF-8, the close handshake,
limits and performance) against ``websocket.echo_path`` of a raafd of its own. Prints the
result of every group and each case that is not OK; the exit status is 1 when any case FAILED.

    .venv/bin/python bench/autobahn.py              # or: make autobahn
    .venv/bin/python bench/autobahn.py --cases 1.* 5.*

Autobahn|Testsuite runs on Python 2.7 only. The script finds a ``python2.7`` (``--python2``,
``$AUTOBAHN_PYTHON2``, ``PATH``, then pyenv's versions) and installs the pinned suite
(``bench/autobahn-requirements.txt``) into ``.autobahn/venv`` once. The reports (an HTML page
per case) go to ``.autobahn/reports``.

The daemon (bench/daemon_proc.py, pinned to one core) has auth on, with its token stored as a
``sha256:`` digest; the suite's URL carries the token in the query, as a conformance client
cannot send a header. ``max_frame`` is 16 MiB, the largest message of group 9.
"""

from __future__ import annotations

import argparse
import glob
import hashlib
import json
import os
import secrets
import shutil
import subprocess
import sys
import time
from collections import Counter
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

from daemon_proc import ROOT, running_daemon

WORK = ROOT / ".autobahn"
VENV = WORK / "venv"
REQUIREMENTS = ROOT / "bench" / "autobahn-requirements.txt"
GROUPS = [f"{n}.*" for n in range(1, 11)]
# What a case may end as (the suite's own words); only FAILED fails the run.
BAD = "FAILED"


def find_python2(given: str | None) -> str | None:
    candidates = [given, os.environ.get("AUTOBAHN_PYTHON2")]
    candidates += sorted(glob.glob(os.path.expanduser("~/.pyenv/versions/2.7*/bin/python2.7")))
    candidates.append(shutil.which("python2.7"))  # maybe a pyenv shim that finds none
    for candidate in candidates:
        if candidate and os.access(candidate, os.X_OK):
            probe = subprocess.run([candidate, "-c", "import sys"], capture_output=True)
            if probe.returncode == 0:
                return candidate
    return None


def install(python2: str) -> Path:
    """The suite's ``wstest`` in ``.autobahn/venv``, installed once from the pinned list."""
    wstest = VENV / "bin" / "wstest"
    stamp = VENV / ".requirements"
    wanted = REQUIREMENTS.read_text()
    if wstest.exists() and stamp.exists() and stamp.read_text() == wanted:
        return wstest
    shutil.rmtree(VENV, ignore_errors=True)
    tools = WORK / "virtualenv"
    print(f"installing Autobahn|Testsuite for {python2} into {VENV} ...", flush=True)
    quiet = ["--quiet", "--disable-pip-version-check"]
    subprocess.run(
        [python2, "-m", "pip", "install", *quiet, "--target", str(tools), "virtualenv<20.22"],
        check=True,
    )
    env = {**os.environ, "PYTHONPATH": str(tools)}
    subprocess.run([python2, "-m", "virtualenv", "--quiet", str(VENV)], check=True, env=env)
    pip = [str(VENV / "bin" / "python"), "-m", "pip", "install", *quiet]
    subprocess.run([*pip, "-r", str(REQUIREMENTS)], check=True)
    stamp.write_text(wanted)
    return wstest


def run_suite(wstest: Path, cases: list[str], timeout: float) -> dict[str, dict[str, object]]:
    token = secrets.token_urlsafe(24)
    digest = hashlib.sha256(token.encode()).hexdigest()
    extra = f"""
[websocket]
echo_path = "/v1/echo"
max_frame = {16 << 20}
[auth]
tokens = ["sha256:{digest}"]
"""
    reports = WORK / "reports"
    shutil.rmtree(reports, ignore_errors=True)
    with running_daemon(extra) as daemon:
        spec = {
            "outdir": str(reports),
            "servers": [{"agent": "raafd", "url": f"ws://{daemon.address}/v1/echo?token={token}"}],
            "cases": cases,
            "exclude-cases": [],
            "exclude-agent-cases": {},
        }
        spec_path = WORK / "fuzzingclient.json"
        spec_path.write_text(json.dumps(spec, indent=2))
        cmd = [str(wstest), "-m", "fuzzingclient", "-s", str(spec_path)]
        if shutil.which("taskset"):
            cmd = ["taskset", "-c", daemon.load_core, *cmd]
        started = time.monotonic()
        log = WORK / "wstest.log"
        with log.open("w") as out:
            try:
                subprocess.run(cmd, cwd=WORK, stdout=out, stderr=subprocess.STDOUT, timeout=timeout)
            except subprocess.TimeoutExpired:
                raise SystemExit(f"wstest did not finish in {timeout:.0f} s; see {log}") from None
        print(f"wstest ran {time.monotonic() - started:.0f} s; raafd alive: {daemon.alive()}")
        errors = daemon.error_lines()
        if errors:
            print(f"raafd logged {len(errors)} error lines, the first: {errors[0]}")
    index = reports / "index.json"
    if not index.exists():
        raise SystemExit(f"wstest wrote no {index}; see {log}")
    results: dict[str, dict[str, object]] = json.loads(index.read_text())["raafd"]
    return results


def _case_key(case: str) -> tuple[int, ...]:
    return tuple(int(part) for part in case.split("."))


def report(results: dict[str, dict[str, object]]) -> int:
    groups: dict[str, Counter[str]] = {}
    for case, result in results.items():
        groups.setdefault(case.split(".")[0], Counter())[str(result["behavior"])] += 1
    total: Counter[str] = Counter()
    print(f"\n{'group':>6}  {'cases':>5}  results")
    for group in sorted(groups, key=int):
        counts = groups[group]
        total += counts
        described = ", ".join(f"{n} {kind}" for kind, n in sorted(counts.items()))
        print(f"{group:>6}  {sum(counts.values()):>5}  {described}")
    described = ", ".join(f"{n} {kind}" for kind, n in sorted(total.items()))
    print(f"{'all':>6}  {sum(total.values()):>5}  {described}")
    unusual = sorted(
        (c for c, r in results.items() if r["behavior"] != "OK" or r["behaviorClose"] != "OK"),
        key=_case_key,
    )
    if unusual:
        print("\nnot OK (case: behavior / close behavior / close code):")
        for case in unusual:
            r = results[case]
            print(f"  {case}: {r['behavior']} / {r['behaviorClose']} / {r['remoteCloseCode']}")
    failed = [c for c, r in results.items() if BAD in (r["behavior"], r["behaviorClose"])]
    named = f" ({', '.join(sorted(failed, key=_case_key))})" if failed else ""
    print(f"\nFAILED: {len(failed)}{named}")
    return 1 if failed else 0


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--cases", nargs="+", default=GROUPS, help="case patterns (1.* … 10.*)")
    parser.add_argument("--python2", help="the python2.7 to run the suite with")
    parser.add_argument(
        "--skip-without-python2", action="store_true", help="exit 0 when there is no Python 2.7"
    )
    parser.add_argument("--timeout", type=float, default=1800.0, help="seconds for the suite")
    args = parser.parse_args()
    # Python 2 packages warn about Python 2 on every start; the reports say what matters.
    os.environ["PYTHONWARNINGS"] = "ignore"
    python2 = find_python2(args.python2)
    if python2 is None:
        print(
            "Autobahn|Testsuite needs Python 2.7: none found on PATH or in ~/.pyenv/versions"
            " (install one with `pyenv install 2.7.18`, or name it with --python2)"
        )
        sys.exit(0 if args.skip_without_python2 else 1)
    WORK.mkdir(exist_ok=True)
    wstest = install(python2)
    sys.exit(report(run_suite(wstest, args.cases, args.timeout)))


if __name__ == "__main__":
    main()
