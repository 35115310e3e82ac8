"""python -m perf faults --kills 20 --out report.json [--seed 7] [--keep DIR]

Fault injection: SIGKILL the daemon (real embedded model) at random moments of its cache writes,
restart it on the same cache folder, and check what survived: nothing torn served, nothing
finished lost, every answer exact. The procedure is perf.faults.crash's; tests/test_restart.py
runs it with 5 kills. This module is the command line.
"""

from __future__ import annotations

import json
import shutil
import tempfile
from pathlib import Path

from perf.common import machine_info
from perf.faults.crash import CrashRun
from perf.faults.reference import AGENTS


def configure(parser) -> None:
    parser.add_argument("--out", type=Path, default=Path("perf-faults.json"))
    parser.add_argument("--kills", type=int, default=20)
    parser.add_argument("--seed", type=int, default=7)
    parser.add_argument("--agents", type=int, default=len(AGENTS), help=f"concurrent agents (at most {len(AGENTS)})")
    parser.add_argument("--keep", type=Path, help="work in this folder and keep it (logs, cache files)")


def main(args) -> dict:
    workdir = args.keep or Path(tempfile.mkdtemp(prefix="semcache-perf-faults-"))
    workdir.mkdir(parents=True, exist_ok=True)
    try:
        report = CrashRun(workdir, args.kills, args.seed, args.agents, say=lambda s: print(s, flush=True)).run()
    finally:
        if args.keep is None:
            shutil.rmtree(workdir, ignore_errors=True)
    report["machine"] = machine_info()
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(report, indent=1))
    return report
