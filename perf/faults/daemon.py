"""The daemon as the crash test runs it, with blocking chat requests on plain urllib."""

from __future__ import annotations

import json
import threading
import urllib.error
import urllib.request
from pathlib import Path

from perf import servers

MAX_TOKENS = 8
REQUEST_TIMEOUT = 120.0


class Daemon(servers.Daemon):
    """A semcache daemon as the crash test runs it: prompts from 4 tokens cached, a long queue wait,
    and blocking chat requests (one thread each when sent together)."""

    def __init__(self, cache_dir: Path, log: Path, **env: str):
        super().__init__(cache_dir, log, **{"SEMCACHE_CACHE_MIN_PREFIX": "4", "SEMCACHE_MAX_QUEUE_WAIT": "300", **env})

    def chat(self, agent: str, messages: list[dict]) -> dict:
        body = {"model": "m", "messages": messages, "max_tokens": MAX_TOKENS, "temperature": 0}
        req = urllib.request.Request(self.base + "/v1/chat/completions", json.dumps(body).encode(),
                                     {"Content-Type": "application/json", "X-Agent-ID": agent})
        try:
            with urllib.request.urlopen(req, timeout=REQUEST_TIMEOUT) as r:
                return json.load(r)
        except urllib.error.HTTPError as exc:
            raise AssertionError(f"{agent}: HTTP {exc.code}: {exc.read()[:500]!r}") from None

    def chat_all(self, requests: dict[str, list[dict]]) -> dict[str, dict]:
        """All requests at once, one thread each; waits for every answer."""
        results: dict[str, dict | Exception] = {}
        threads = self.chat_in_background(requests, results)
        for t in threads:
            t.join(REQUEST_TIMEOUT + 10)
        assert not any(t.is_alive() for t in threads), "a request did not finish in time"
        errors = {a: r for a, r in results.items() if isinstance(r, Exception)}
        assert not errors, f"requests failed: {errors}"
        return results  # type: ignore[return-value]

    def chat_in_background(self, requests: dict[str, list[dict]], results: dict) -> list[threading.Thread]:
        def run(agent: str, messages: list[dict]) -> None:
            try:
                results[agent] = self.chat(agent, messages)
            except Exception as exc:  # noqa: BLE001 -- the daemon may be killed mid-request: recorded, not raised
                results[agent] = exc

        threads = [threading.Thread(target=run, args=item, daemon=True) for item in requests.items()]
        for t in threads:
            t.start()
        return threads


def text_of(response: dict) -> str:
    return response["choices"][0]["message"]["content"]


def cached_of(response: dict) -> int:
    return response["usage"]["prompt_tokens_details"]["cached_tokens"]
