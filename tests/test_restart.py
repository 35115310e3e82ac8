"""Crash and restart on the real embedded model: SIGKILL the daemon at seeded random moments of its
cache writes, restart it on the same cache folder, and check that what survived is whole and answers
exactly. The procedure (and the Daemon helper) is perf/faults/'s, which `python -m perf faults`
runs 20 times; here 5 kills keep it to about two minutes.

After every kill: the restart is ready; no temp file is left and nothing is quarantined (the write
path is temp file, fsync, rename, fsync folder: never a torn file under the final name); every file
present under its final name at the kill is indexed; every agent with an entry is served from it on
its next turn; and every answer, warm or cold, is token-identical to a daemon without a cache.
"""

from __future__ import annotations

import pytest

from perf.faults.crash import CrashRun

KILLS = 5
SEED = 20261127
AGENTS = 4  # of perf/faults/'s 6: fewer cold reference answers to compute


@pytest.mark.slow
@pytest.mark.model
class TestCrashRestart:
    def test_five_sigkills_during_writes_lose_nothing_finished_and_serve_nothing_torn(self, tmp_path):
        """Five SIGKILLs at random points of write-through (seeded); after each, the restart serves
        every finished entry exactly and nothing torn."""
        report = CrashRun(tmp_path, KILLS, SEED, agents=AGENTS).run()
        summary, kills = report["summary"], report["kills"]
        print(summary)
        assert summary["kills"] == KILLS and summary["all_restarts_ok"], kills
        for k in kills:
            where = f"kill {k['round']} ({k['plan']}; {k['moment']})"
            assert k["temp_files_left"] == 0, f"{where}: temp files left after the restart"
            assert k["quarantined"] == 0, f"{where}: a file was quarantined, so a torn file was renamed"
            assert not k["finished_not_indexed"], f"{where}: finished files not indexed: {k['finished_not_indexed']}"
            assert not k["indexed_not_at_kill"], f"{where}: indexed files not present at the kill"
            assert not k["finished_not_served"], f"{where}: entries not served: {k['finished_not_served']}"
            assert not k["wrong_answers"], f"{where}: {k['wrong_answers']}"
        assert not report["wrong_before_kills"], report["wrong_before_kills"]
        assert summary["torn_served"] == 0
        assert summary["files_at_kill_total"] > 0 and summary["agents_served_total"] > 0, "the kills tested nothing"
        assert summary["writes_caught_in_flight"] >= 1, "no kill landed while a file was being written"
