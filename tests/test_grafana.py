"""config/grafana/semcache.json: every panel's PromQL names only metrics (and labels) the daemon
exposes, and parses (promtool checks the expressions as recording rules); the shipped Prometheus
scrape config, which sends the scraper's own key, is valid too."""

import json
import re
import shutil
import subprocess
from pathlib import Path

import pytest

from prometheus_client.metrics import MetricWrapperBase

from semcache.ops.metrics import Metrics

ROOT = Path(__file__).parent.parent
DASHBOARD = ROOT / "config" / "grafana" / "semcache.json"
SCRAPE = ROOT / "config" / "prometheus.yml"
SUFFIXES = {"counter": ("_total",), "histogram": ("_bucket", "_sum", "_count"), "gauge": ("",)}
# Grafana's own variables, as a Prometheus range would read them
GRAFANA_VARS = {"$__rate_interval": "5m", "$__interval": "1m", "$__range": "1h"}
promtool = pytest.mark.skipif(shutil.which("promtool") is None,
                              reason="promtool is not installed: `make test` installs it as root, else run "
                                     "`sudo apt-get install prometheus`")


def exposed() -> dict[str, set[str]]:
    """Every semcache series name /metrics can show, with its labels (a histogram's buckets: plus `le`)."""
    names = {}
    for metric in vars(Metrics()).values():
        if not isinstance(metric, MetricWrapperBase):
            continue
        for suffix in SUFFIXES[metric._type]:
            names[metric._name + suffix] = set(metric._labelnames) | ({"le"} if suffix == "_bucket" else set())
    return names


def expressions() -> list[tuple[str, str]]:
    dashboard = json.loads(DASHBOARD.read_text())
    return [(panel["title"], target["expr"]) for panel in dashboard["panels"] for target in panel["targets"]]


def test_the_dashboard_has_the_panels_asked_for():
    titles = " ".join(title.lower() for title, _ in expressions())
    for topic in ("first token", "inter-token", "queue", "hit rate", "bytes", "evictions", "disk errors"):
        assert topic in titles


def test_every_metric_and_label_exists():
    names = exposed()
    for title, expr in expressions():
        used = re.findall(r"\b(semcache_[a-z0-9_]+)\b(\{[^}]*\})?", expr)
        assert used, (title, expr)
        labels = set()
        for name, matchers in used:
            assert name in names, f"{title}: {name} is not a metric the daemon exposes"
            labels |= names[name]
            for label in re.findall(r"([a-z_]+)\s*=~?", matchers):
                assert label in names[name], f"{title}: {name} has no label {label}"
        for group in re.findall(r"\bby\s*\(([^)]*)\)", expr):
            for label in (part.strip() for part in group.split(",")):
                assert label in labels, f"{title}: no metric of {expr!r} has the label {label}"


@promtool
def test_promtool_accepts_every_expression(tmp_path):
    rules = []
    for i, (_, expr) in enumerate(expressions()):
        for var, value in GRAFANA_VARS.items():
            expr = expr.replace(var, value)
        rules.append({"record": f"semcache:dashboard_{i}", "expr": expr})
    path = tmp_path / "rules.yml"
    path.write_text(json.dumps({"groups": [{"name": "dashboard", "rules": rules}]}))  # JSON is YAML
    out = subprocess.run(["promtool", "check", "rules", str(path)], capture_output=True, text=True, timeout=60)
    assert out.returncode == 0, out.stdout + out.stderr
    assert f"SUCCESS: {len(rules)} rules found" in out.stdout + out.stderr


@promtool
def test_promtool_accepts_the_scrape_config_with_its_key_file(tmp_path):
    key_file = tmp_path / "metrics-key"
    key_file.write_text("scraper-key\n")
    config = tmp_path / "prometheus.yml"
    config.write_text(SCRAPE.read_text().replace("/etc/prometheus/semcache-metrics-key", str(key_file)))
    out = subprocess.run(["promtool", "check", "config", str(config)], capture_output=True, text=True, timeout=60)
    assert out.returncode == 0, out.stdout + out.stderr


def test_a_broken_expression_is_caught(tmp_path):
    """The name check fails on a renamed metric (so the test can fail at all)."""
    names = exposed()
    assert "semcache_time_to_first_token_seconds_bucket" in names and "semcache_ttft_bucket" not in names
    assert names["semcache_cache_bytes"] == {"tier"}
