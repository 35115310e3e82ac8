"""A floor on a text's token count from its length alone, so that a prompt that cannot fit the context
is refused without tokenizing it (tokenizing 30 MiB takes 17 s here; this takes milliseconds).

No token covers more bytes of text than the longest piece of the vocabulary, so a text of B bytes
has at least B / longest tokens. The floor must never exceed the real count, so it is 0 (no floor)
for a tokenizer where one token can cover text of any length, or whose workings are not known here:
a pre-tokenizer that drops text (whitespace splitters), unknown characters fused into one token,
special tokens that swallow the whitespace around them, or a normalizer not listed below.
"""

from __future__ import annotations

import json
from typing import Any

# Pre-tokenizers that keep every byte (a "removed" split behaviour drops text, so it is not).
_KEEPING = {"ByteLevel", "Metaspace", "Digits", "Split", "Punctuation", "Sequence", "UnicodeScripts"}
# Normalizers by the most they shrink text (bytes in per byte out): a character of at most 4 bytes
# becomes one of at least 1 (NFKC: "𝐀" to "A"; Hangul jamo compose 9 bytes into 3). Prepending
# and replacing one character by a non-empty string never shrink text by more.
_SHRINK = {"NFC": 4, "NFD": 4, "NFKC": 4, "NFKD": 4, "Lowercase": 4, "Prepend": 1, "Replace": 4}


class Floor:
    """The floor for one tokenizer (`tokenizers.Tokenizer`, e.g. transformers' backend_tokenizer)."""

    def __init__(self, backend: Any):
        self._normalizer = getattr(backend, "normalizer", None)
        self.shrink = self.longest = 0
        try:
            pre, model = _state(backend.pre_tokenizer), _model(backend.model)
            added = list(backend.get_added_tokens_decoder().values())
            self.shrink = _shrink(_state(self._normalizer))
            bounded = _keeps_text(pre) and backend.truncation is None and _bounded(model, added)
        except Exception:  # not a tokenizers.Tokenizer: no floor
            return
        if bounded and self.shrink:
            self.longest = _longest(backend, '"ByteLevel"' in json.dumps(pre), [t.content for t in added])

    def tokens(self, text: str, limit: int) -> int:
        """A number of tokens `text` has at least: exact enough to tell whether it reaches `limit`
        (a text too short to reach it may get 0). The text is normalized only when its raw
        length cannot decide (normalizing is ~5% of the cost of tokenizing)."""
        if not self.longest:
            return 0
        size = len(text.encode("utf-8", "surrogatepass"))
        floor = -(-size // (self.longest * self.shrink))
        if floor >= limit or self.shrink == 1 or -(-size // self.longest) < limit:
            return floor
        normalized = self._normalizer.normalize_str(text) if self._normalizer is not None else text
        return -(-len(normalized.encode("utf-8", "surrogatepass")) // self.longest)


def _state(component: Any) -> dict | None:
    return None if component is None else json.loads(component.__getstate__())


def _model(model: Any) -> dict:
    """The model's type and how it treats unknown text (its vocabulary left out when it can be)."""
    kind = type(model).__name__
    if kind == "BPE":
        return {"type": kind, "unk_token": model.unk_token, "fuse_unk": model.fuse_unk,
                "byte_fallback": model.byte_fallback}
    return {"type": kind, **(json.loads(model.__getstate__()) if kind == "Unigram" else {})}


def _shrink(normalizer: dict | None) -> int:
    """How much the normalizer may shrink text at most (0: not known, no floor)."""
    if normalizer is None:
        return 1
    kind = normalizer.get("type")
    if kind == "Sequence":
        factors = [_shrink(n) for n in normalizer.get("normalizers") or []]
        return 0 if 0 in factors else max([1, *factors])  # each character shrinks once, to >= 1 byte
    if kind == "Replace" and (len((normalizer.get("pattern") or {}).get("String") or "") != 1
                              or not normalizer.get("content")):
        return 0  # a longer pattern or an empty replacement can remove text
    return _SHRINK.get(kind, 0)


def _bounded(model: dict, added: list) -> bool:
    """Whether every token covers a bounded stretch of text (see the module's docstring)."""
    if any(t.lstrip or t.rstrip for t in added):
        return False
    if model.get("type") not in ("BPE", "Unigram"):
        return False  # WordPiece and WordLevel map a whole unknown word to one token
    unknown = model.get("unk_token") if model.get("type") == "BPE" else model.get("unk_id")
    return unknown is None or bool(model.get("byte_fallback")) or (
        model.get("type") == "BPE" and not model.get("fuse_unk"))


def _keeps_text(pre: dict | None) -> bool:
    if pre is None:
        return True
    if pre.get("type") not in _KEEPING or str(pre.get("behavior", "")).lower() == "removed":
        return False
    return all(_keeps_text(p) for p in pre.get("pretokenizers") or [])


def _longest(backend: Any, byte_level: bool, added: list[str]) -> int:
    """The most bytes of (normalized) text one token covers. A byte-level piece's characters stand
    for one byte each; any other piece is the text it covers (or longer: "<0x41>", "##ab")."""
    pieces = backend.get_vocab(with_added_tokens=False)
    longest = max(map(len, pieces)) if byte_level else max(len(p.encode("utf-8", "surrogatepass")) for p in pieces)
    normalizer = getattr(backend, "normalizer", None)
    for content in added:  # matched before normalizing, but counted in the normalized text
        forms = [content, normalizer.normalize_str(content) if normalizer is not None else content]
        longest = max(longest, *(len(f.encode("utf-8", "surrogatepass")) for f in forms))
    return longest
