"""The baseline report's semcache/peer ratios and its summary."""

from __future__ import annotations

from perf.common import rounded


def _ratio(a: float | None, b: float | None) -> float | None:
    return a / b if a is not None and b else None


def ratios(ours: dict, peer: dict) -> dict:
    """semcache / peer for each figure both produced: below 1 is better for latencies, above 1 for tok/s."""
    out = {}
    for key in (k for k in ours if k.startswith("concurrent_")):
        a, b = ours[key], peer[key]
        out[key] = {"ttft_p50": _ratio(a["ttft_ms"].get("p50"), b["ttft_ms"].get("p50")),
                    "itl_p50": _ratio(a["itl_ms"].get("p50"), b["itl_ms"].get("p50")),
                    "tok_s": _ratio(a["tok_s"], b["tok_s"])}
    for key in (k for k in ours["health"] if k.endswith("_ms")):
        out[f"health_{key}"] = {p: _ratio(ours["health"][key].get(p), peer["health"][key].get(p))
                                for p in ("p50", "p95", "max")}
    a, b = ours["agent_series"], peer["agent_series"]
    out["agent_turn1_ttft"] = _ratio(a["turn1_ttft_ms"], b["turn1_ttft_ms"])
    out["agent_median_later_ttft"] = _ratio(a["median_later_ttft_ms"], b["median_later_ttft_ms"])
    return out


def summarize(report: dict) -> dict:
    ours = report["targets"]["semcache"]
    series, health_ = ours["agent_series"], ours["health"]
    multi = report["multi_agent"]
    summary = {
        "quick": report["params"]["quick"], "wall_seconds": round(report["wall_seconds"], 1),
        "seconds_to_ready": round(report["startup"]["seconds_to_ready"], 2),
        "first_request_ttft_ms": round(report["first_requests"][0]["ttft_ms"], 1),
        "agent_turn1_ttft_ms": round(series["turn1_ttft_ms"], 1),
        "agent_median_later_ttft_ms": rounded(series["median_later_ttft_ms"], 1),
        "agent_turn1_over_later": rounded(series["turn1_over_median_later"], 2),
        "agent_cached_tokens_per_turn": [row["cached_tokens"] for row in series["turns"]],
        "health_ms": {k: {p: round(v, 2) for p, v in health_[k].items()} for k in health_ if k.endswith("_ms")},
        "multi_agent_warm_over_cold_ttft": round(multi["warm_over_cold"], 4),
        "multi_agent_restart_over_cold_ttft": round(multi["restart_over_cold"], 4),
        "seconds_to_ready_after_restart": round(multi["seconds_to_ready_after_restart"], 2),
    }
    for key in (k for k in ours if k.startswith("concurrent_")):
        c = ours[key]
        summary[key] = {"ttft_p50_ms": rounded(c["ttft_ms"].get("p50"), 1),
                        "itl_p50_ms": rounded(c["itl_ms"].get("p50"), 1),
                        "itl_p95_ms": rounded(c["itl_ms"].get("p95"), 1), "tok_s": round(c["tok_s"], 1)}
    if "ratios" in report:
        summary["semcache_over_peer"] = rounded(report["ratios"], 3)
    return summary
