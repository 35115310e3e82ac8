"""Claude Code against semcache on the embedded model: does every request succeed, and does each
turn read back from cache what the previous turn sent and received?

python -m perf agents-cc --out report.json [--turns 3] [--max-output 64]

Three runs of the real client, through a recording proxy:
- default mode (`claude -p "Say hello." --model local`): its ~77 KB, 12-tool request cannot fit an
  8K context, so the client must get (and print) the overflow error it understands;
- a `--bare --tools Read` session of `turns` turns (`--session-id`, then `--resume`), then a
  `/compact` turn and one more turn on the compacted history;
- a second session, whose billing line differs, for the shared system and tool prefix.
Per turn: TTFT, prompt tokens and cached tokens of its first request, and the share of what the
previous turn's last request sent and received that was read back from cache (for the turn after
the compaction, whose history was replaced by a summary: the share of the system and tool prefix
it still shares with the session's first request).
"""

from __future__ import annotations

import json
import tempfile
import uuid
from pathlib import Path

from perf import servers
from perf.agents_cc import claude
from perf.agents_cc.recorder import Recorder, prompt_tokens
from perf.common import machine_info, rounded

PROMPTS = ("What is in notes.txt? Answer in one sentence.", "Now say it in five words.",
           "Thanks. One more word?", "And once more, shorter.")
NOTES = "The meeting moved to Thursday at ten. Bring the quarterly numbers.\n"


def configure(parser) -> None:
    parser.add_argument("--out", type=Path, default=Path("perf-agents-cc.json"))
    parser.add_argument("--turns", type=int, default=3)
    parser.add_argument("--max-output", type=int, default=64, help="CLAUDE_CODE_MAX_OUTPUT_TOKENS")
    parser.add_argument("--record", type=Path, help="folder for the scrubbed traffic (replayed by the tests)")


def main(args) -> dict:
    return run(args.out, turns=args.turns, max_output=args.max_output, record=args.record)


def run(out: Path | None, turns: int = 3, max_output: int = 64, record: Path | None = None) -> dict:
    with tempfile.TemporaryDirectory(prefix="semcache-cc-") as tmp:
        work = Path(tmp)
        (work / "notes.txt").write_text(NOTES)
        with servers.daemon(work, "agents-cc", {}) as daemon, Recorder(daemon.base) as rec:
            default = default_mode(rec, work)
            first = session(rec, work, turns, max_output, "bare session", compact=True)
            second = session(rec, work, 1, max_output, "second session")
            if record is not None:
                save_traffic(record, rec.records)
    report = {"benchmark": "agents-cc", "machine": machine_info(), "claude_code": claude.VERSION,
              "params": {"turns": turns, "max_output": max_output}, "default_mode": default,
              "sessions": [first, second], "shared_prefix": shared_prefix(first, second)}
    report["summary"] = summary(report)
    for turn in (t for s in report["sessions"] for t in s["turns"]):
        report.setdefault("bodies", []).append(turn.pop("bodies"))  # prompts and ids: never written
    bodies = report.pop("bodies")
    if out is not None:
        out.write_text(json.dumps(report, indent=1))
    return report | {"bodies": bodies}


def save_traffic(folder: Path, records: list[dict]) -> None:
    """Every request of the run, scrubbed (see scrub.py), in order, one JSON file."""
    from perf.agents_cc.render import count_tokens
    from perf.agents_cc.scrub import Scrubber, dump

    folder.mkdir(parents=True, exist_ok=True)
    scrubber = Scrubber(count_tokens)
    dump(folder / f"claude-code-{claude.VERSION}.json", [scrubber.request(r) for r in records])


def default_mode(rec: Recorder, work: Path) -> dict:
    start, rec.label = len(rec.records), "default mode"
    result = claude.run(rec.base, work / "home-default", ["-p", "Say hello.", "--model", "local"], cwd=work)
    requests = rec.records[start:]
    return {"returncode": result.returncode, "printed": (result.stdout + result.stderr).strip()[:600],
            "requests": [brief(r) for r in requests]}


def session(rec: Recorder, work: Path, turns: int, max_output: int, name: str, compact: bool = False) -> dict:
    """One Claude Code session of `turns` turns (then, with `compact`, a `/compact` turn and a turn
    after it); its requests grouped by turn."""
    sid, home, out = str(uuid.uuid4()), work / f"home-{uuid.uuid4().hex[:8]}", []
    steps = [(f"turn {i + 1}", claude.bare(PROMPTS[i % len(PROMPTS)], sid, resume=i > 0)) for i in range(turns)]
    if compact:
        steps += [("compaction", claude.bare("/compact", sid, resume=True)),
                  ("after compaction", claude.bare(PROMPTS[turns % len(PROMPTS)], sid, resume=True))]
    for i, (kind, args) in enumerate(steps):
        start, rec.label = len(rec.records), f"{name} {kind}"
        result = claude.run(rec.base, home, args, max_output=max_output, cwd=work)
        requests = rec.records[start:]
        out.append({"turn": i + 1, "kind": kind, "returncode": result.returncode, "answer": result.stdout.strip()[:300],
                    "requests": [brief(r) for r in requests], "bodies": [r["body"] for r in requests]})
    for prev, turn in zip(out, out[1:]):
        if not (prev["requests"] and turn["requests"]):
            turn["reuse"] = None
        elif turn["kind"] == "after compaction":
            turn["reuse"] = prefix_reuse(out[0]["bodies"][0], turn["bodies"][0], turn["requests"][0])
        else:
            turn["reuse"] = reuse(prev["requests"][-1], turn["requests"][0])
    return {"session": "scrubbed", "turns": out}


def brief(r: dict) -> dict:
    usage = r.get("usage") or {}
    return {"path": r["path"], "status": r["status"], "error": r.get("error"), "ttft_s": rounded(r.get("ttft_s")),
            "seconds": rounded(r["seconds"]), "stop_reason": r.get("stop_reason"),
            "prompt_tokens": prompt_tokens(usage) if usage else None,
            "cached_tokens": usage.get("cache_read_input_tokens"), "output_tokens": usage.get("output_tokens")}


def reuse(prev: dict, first: dict) -> dict:
    """How much of the previous turn's last request (prompt and reply) this turn read back."""
    sent = (prev["prompt_tokens"] or 0) + (prev["output_tokens"] or 0)
    return {"previous_prompt_and_reply": sent, "cached": first["cached_tokens"],
            "fraction": rounded(first["cached_tokens"] / sent) if sent and first["cached_tokens"] is not None else None}


def shared_prefix(first: dict, second: dict) -> dict:
    """Tokens the two sessions' first prompts share, and how many of those the second session read
    from cache."""
    return prefix_reuse(first["turns"][0]["bodies"][0], second["turns"][0]["bodies"][0],
                        second["turns"][0]["requests"][0])


def prefix_reuse(earlier_body: dict, body: dict, request: dict) -> dict:
    """Tokens two requests' prompts share (rendered here exactly as the daemon renders them), and
    how many of those the later `request` read from cache."""
    from perf.agents_cc.render import render_ids
    from semcache.cache.entry import common_prefix

    shared = common_prefix(render_ids(earlier_body), render_ids(body))
    cached = request["cached_tokens"] or 0
    return {"shared_tokens": shared, "cached": cached, "fraction": rounded(cached / shared) if shared else None}


def summary(report: dict) -> dict:
    turns = report["sessions"][0]["turns"]
    statuses = [r["status"] for s in report["sessions"] for t in s["turns"] for r in t["requests"]]
    fractions = [t["reuse"]["fraction"] for t in turns[1:] if t.get("reuse") and t["kind"] != "after compaction"]
    after = [t["reuse"]["fraction"] for t in turns if t["kind"] == "after compaction" and t.get("reuse")]
    default = report["default_mode"]["requests"]
    return {"default_mode_overflow_printed": "Prompt is too long" in report["default_mode"]["printed"],
            "default_mode_errors": sorted({r["error"] for r in default if r["error"]}),
            "session_statuses": sorted(set(statuses)), "min_turn_reuse": min(fractions) if fractions else None,
            "turn_reuse": fractions, "shared_prefix_fraction": report["shared_prefix"]["fraction"],
            "after_compaction_prefix_fraction": after[0] if after else None,
            "ttft_s_by_turn": [t["requests"][0]["ttft_s"] if t["requests"] else None for t in turns]}
