"""PNG of TTFT per turn from a baseline report. Needs the `plot` extra (matplotlib), imported only here.

python -m perf.plot report.json turns.png   (re-draws the plot of an existing report)
"""

from __future__ import annotations

import json
import statistics
import sys
from pathlib import Path

MISSING = "drawing a plot needs matplotlib: pip install -e '.[plot]' (or pip install 'matplotlib>=3.8')"


def require():
    """matplotlib.pyplot on the file-only Agg backend; SystemExit with how to install it if missing."""
    try:
        import matplotlib
    except ImportError:
        raise SystemExit(MISSING) from None
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def plot_turns(report: dict, path: Path) -> Path:
    """Left: one agent's growing conversation, TTFT per turn for each target. Right: the multi-agent
    run, each agent's TTFT per turn and the median, with the restart before the last turn."""
    plt = require()
    fig, (one, many) = plt.subplots(1, 2, figsize=(11, 4.2), constrained_layout=True)
    for name, target in report["targets"].items():
        rows = target["agent_series"]["turns"]
        one.plot([r["turn"] for r in rows], [r["ttft_ms"] for r in rows], marker="o", label=name)
        for r in rows:  # how much of the prompt the server said it reused
            one.annotate(str(r["cached_tokens"]), (r["turn"], r["ttft_ms"]), textcoords="offset points",
                         xytext=(4, 4), fontsize=7)
    one.set(title="One agent, growing conversation (labels: cached tokens)", xlabel="turn",
            ylabel="TTFT (ms, log)", yscale="log", xticks=[r["turn"] for r in rows])
    one.legend()
    turns = report["multi_agent"]["turns"]
    numbers = sorted({t["turn"] for t in turns})
    many.scatter([t["turn"] for t in turns], [t["ttft"] * 1000 for t in turns], alpha=0.35, s=14, label="each agent")
    many.plot(numbers, [statistics.median(t["ttft"] * 1000 for t in turns if t["turn"] == n) for n in numbers],
              marker="o", color="black", label="median")
    many.axvline(numbers[-1] - 0.5, linestyle="--", color="grey")
    many.text(numbers[-1] - 0.45, 0.98, "restart", va="top", color="grey", transform=many.get_xaxis_transform())
    many.set(title=f"{report['multi_agent']['agents']} agents round-robin (semcache)", xlabel="turn",
             ylabel="TTFT (ms, log)", yscale="log", xticks=numbers)
    many.legend(loc="lower left")
    machine = report["machine"]
    fig.suptitle(f"semcache baseline{' (quick)' if report['params']['quick'] else ''}: "
                 f"{machine['cores']} cores, {machine['cpu']}", fontsize=10)
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return Path(path)


if __name__ == "__main__":
    if len(sys.argv) != 3:
        raise SystemExit(__doc__)
    print(plot_turns(json.loads(Path(sys.argv[1]).read_text()), Path(sys.argv[2])))
