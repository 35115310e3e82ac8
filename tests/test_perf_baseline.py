"""`python -m perf baseline`: the report's structure and sanity on the smallest parameters, and the plot."""

from __future__ import annotations

import argparse
import dataclasses
import itertools
import json
import sys

import pytest

from perf import baseline, plot, servers

PNG_MAGIC = b"\x89PNG\r\n\x1a\n"
TINY = dataclasses.replace(baseline.QUICK, max_tokens=4, concurrency=(1, 3), rounds=2, turns=3, system_sentences=8,
                           agent_max_tokens=4, health_probes=20, health_bursts=2, burst_size=25, agents=1,
                           agent_budget="256MiB")


def parse(*argv: str) -> argparse.Namespace:
    parser = argparse.ArgumentParser()
    baseline.configure(parser)
    return parser.parse_args(argv)


def assert_ordered(p: dict) -> None:
    assert set(p) == {"p50", "p95", "max"}, p
    assert 0 < p["p50"] <= p["p95"] <= p["max"], p


class TestOptions:
    def test_options_and_defaults(self):
        """--quick picks the reduced parameters; --compare takes a URL; the peer's health path defaults to /health."""
        args = parse("--quick", "--compare", "http://127.0.0.1:9/", "--plot", "t.png", "--out", "r.json")
        assert (args.quick, args.compare, args.compare_health, str(args.plot), str(args.out)) == \
            (True, "http://127.0.0.1:9/", "/health", "t.png", "r.json")
        assert baseline.QUICK.quick and not baseline.FULL.quick
        assert baseline.QUICK.agents < baseline.FULL.agents and baseline.QUICK.rounds < baseline.FULL.rounds

    def test_missing_matplotlib_fails_before_measuring(self, tmp_path, monkeypatch):
        """Without matplotlib, --plot stops at once with how to install it, before any daemon starts."""
        monkeypatch.setitem(sys.modules, "matplotlib", None)  # makes `import matplotlib` raise ImportError
        out = tmp_path / "r.json"
        with pytest.raises(SystemExit) as exc:
            baseline.main(parse("--quick", "--out", str(out), "--plot", str(tmp_path / "t.png")))
        assert str(exc.value) == plot.MISSING and "pip install" in plot.MISSING
        assert not out.exists()


@pytest.mark.slow
@pytest.mark.model
class TestBaselineReport:
    def test_tiny_baseline_against_a_second_daemon(self, tmp_path):
        """A full report on the smallest parameters, a second semcache daemon as the peer: every section is
        present and sane, later turns read the cache, ratios cover each figure, the PNG is a PNG."""
        port = servers.free_port()
        cmd = servers.semcache_cmd(port) + ["--cache-dir", str(tmp_path / "peer-cache")]
        out, png = tmp_path / "report.json", tmp_path / "turns.png"
        with servers.running(cmd, "/health/ready", port, tmp_path / "peer.log") as (peer, _, _):
            report = baseline.run(out, TINY, compare=peer, compare_health="/health/ready", plot_path=png)

        assert json.loads(out.read_text()) == json.loads(json.dumps(report))
        assert png.read_bytes()[:8] == PNG_MAGIC and png.stat().st_size > 10_000
        machine = report["machine"]
        assert machine["cores"] >= 1 and machine["memory_gb"] > 0 and machine["blas"]
        assert machine["versions"]["mlx"] and machine["versions"]["msgspec"]  # what the run relied on
        assert report["params"]["compare"] == peer and report["params"]["agents"] == 1
        assert report["config"]["cache_dir"].startswith(str(baseline.tempfile.gettempdir()))
        assert 0 < report["startup"]["seconds_to_ready"] < 120
        assert [r["tokens"] for r in report["first_requests"]] == [4, 4]
        assert len(report["source"]["commit"]) == 40 and isinstance(report["source"]["dirty"], bool)

        for name in ("semcache", "peer"):
            target = report["targets"][name]
            self.check_series(target["agent_series"])
            health = target["health"]
            assert health["statuses"] == {"200": 20 + 2 * 25} and health["concurrent_probes"] == 2 * 25
            assert_ordered(health["alone_ms"])
            assert_ordered(health["concurrent_25_ms"])
            for n in (1, 3):
                c = target[f"concurrent_{n}"]
                assert (c["statuses"], c["num_ok"], c["rounds"]) == ([200], 2 * n, 2)
                assert_ordered(c["ttft_ms"])
                assert_ordered(c["itl_ms"])
                assert c["tok_s"] > 0 and len(c["tok_s_per_round"]) == 2

        ratios = report["ratios"]
        assert set(ratios) == {"concurrent_1", "concurrent_3", "health_alone_ms", "health_concurrent_25_ms",
                               "agent_turn1_ttft", "agent_median_later_ttft"}
        figures = [v for r in ratios.values() for v in (r.values() if isinstance(r, dict) else [r])]
        assert len(figures) == 2 * 3 + 2 * 3 + 2 and all(v > 0 for v in figures), ratios

        multi = report["multi_agent"]
        assert len(multi["turns"]) == 4 and multi["lookups_after_restart"]["miss"] == 0
        assert multi["warm_over_cold"] < 1 and multi["restart_over_cold"] < 1
        summary = report["summary"]
        assert summary["quick"] is True and summary["semcache_over_peer"]["concurrent_3"]["tok_s"] > 0
        assert summary["agent_cached_tokens_per_turn"] == [r["cached_tokens"] for r in
                                                           report["targets"]["semcache"]["agent_series"]["turns"]]

    @staticmethod
    def check_series(series: dict) -> None:
        turns = series["turns"]
        assert [t["turn"] for t in turns] == [1, 2, 3]
        # each turn repeats the whole previous prompt: later turns read at least the first prompt from cache
        assert turns[0]["cached_tokens"] < turns[0]["prompt_tokens"]
        assert all(t["cached_tokens"] >= turns[0]["prompt_tokens"] for t in turns[1:]), turns
        assert all(b["prompt_tokens"] > a["prompt_tokens"] for a, b in itertools.pairwise(turns)), turns
        assert series["turn1_over_median_later"] > 1, turns
