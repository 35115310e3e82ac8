"""Recorded requests reduced to their structure, safe to commit and replay: roles, block types,
headers and sizes stay; every text becomes filler of the same token length (on the embedded
model's tokenizer), and session and device ids become stable fakes."""

from __future__ import annotations

import json
import re
import uuid

_UUID = re.compile(r"[0-9a-f]{8}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{12}")
_HEX = re.compile(r"\b[0-9a-f]{32,}\b")
# Strings that are content (prompts, replies, tool descriptions and inputs): replaced by filler.
# Everything else (types, roles, names, schemas' property names and `required` lists) is structure.
_TEXT_KEYS = {"text", "content", "description", "thinking", "data", "system", "title", "signature", "input"}


class Scrubber:
    def __init__(self, count_tokens):
        self.count_tokens = count_tokens  # str -> int
        self._fakes: dict[str, str] = {}

    def fake(self, value: str) -> str:
        """The same fake for the same id everywhere, so a session's requests stay one session."""
        return self._fakes.setdefault(value, str(uuid.UUID(int=len(self._fakes) + 1)))

    def ids(self, text: str) -> str:
        text = _UUID.sub(lambda m: self.fake(m.group()), text)
        return _HEX.sub(lambda m: self.fake(m.group()).replace("-", ""), text)

    def filler(self, text: str) -> str:
        """Filler of the same token count ("the" tokens; each is one token on this vocabulary)."""
        return " ".join(["the"] * self.count_tokens(text)) if text else ""

    def value(self, key: str | None, value, text: bool = False):
        """`text`: inside content (a tool_use input), where every string is content."""
        if isinstance(value, dict):
            inside = text or key == "input"
            return {k: self.value(k, v, inside) for k, v in value.items()}
        if isinstance(value, list):
            return [self.value(key, v, text) for v in value]
        if not isinstance(value, str):
            return value
        if value.startswith("x-anthropic-billing-header:"):
            return value  # its version and entry point only: the line the daemon leaves out
        if text or key in _TEXT_KEYS:
            return self.filler(value)
        return self.ids(value)

    def request(self, record: dict) -> dict:
        return {"label": record["label"], "path": record["path"], "status": record["status"],
                "headers": {k: self.ids(v) for k, v in record["headers"].items()},
                "body": self.value(None, record["body"]), "error": _error_shape(record.get("error"))}


def _error_shape(message: str | None) -> str | None:
    return re.sub(r"\d+", "N", message) if message else None


def dump(path, requests: list[dict]) -> None:
    path.write_text(json.dumps(requests, indent=1) + "\n")
