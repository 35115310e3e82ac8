"""`python -m perf cache-index`: the report's structure on small parameters, through the perf dispatch."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).parent.parent


def test_small_run_writes_a_report(tmp_path):
    """a run on 400 entries keeps them all live, times every operation and writes the JSON report."""
    out = tmp_path / "report.json"
    done = subprocess.run([sys.executable, "-m", "perf", "cache-index", "--out", str(out), "--entries", "400",
                           "--ops", "50", "--tenants", "4"], cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr
    report = json.loads(out.read_text())
    summary = report["summary"]
    assert report["benchmark"] == "cache-index" and "cpu" in report["machine"]
    assert summary["entries_live"] == 400 and summary["put_ms"]["n"] >= 400
    for name in ("lookup_ms", "put_spilling_one_ms", "evict_agent_ms", "delete_agent_ms"):
        assert summary[name]["n"] == 50 and 0 < summary[name]["p50"] <= summary[name]["p99"] <= summary[name]["max"]
    assert 0 < summary["expire"]["expired"] < summary["expire"]["entries_before"]
    assert isinstance(summary["meets_target"], bool)
