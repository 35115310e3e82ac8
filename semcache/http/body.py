"""Request bodies, decoded once by a typed msgspec decoder; errors name the JSON path of the bad field."""

from __future__ import annotations

import re
from typing import Any, TypeVar

import msgspec

from semcache.ops.errors import invalid

T = TypeVar("T")
_PATH_RE = re.compile(r"at `\$\.?([^`]*)`")
PRIORITY_RANGE = (0, 9)
# Every generated token is matched against the stop strings, on the event loop: their number and
# total length are capped far above what clients send (OpenAI's API takes at most 4).
MAX_STOPS = 64
MAX_STOP_CHARS = 8192


def decode_body(raw: bytes, decoder: msgspec.json.Decoder[T]) -> T:
    """Decode a request body once; msgspec's message names the JSON path of the bad field."""
    if not raw.strip():
        raise invalid("the request body is empty; expected a JSON object")
    try:
        return decoder.decode(raw)
    except msgspec.ValidationError as exc:
        match = _PATH_RE.search(str(exc))
        raise invalid(str(exc), param=match.group(1) if match else None) from None
    except (msgspec.DecodeError, UnicodeDecodeError) as exc:
        # msgspec's wording and exception type for bad UTF-8 differ between releases (0.19 raised
        # UnicodeDecodeError, 0.23 a DecodeError "Invalid UTF-8"): say it in our own words.
        raise invalid(_undecodable(raw, exc)) from None
    except RecursionError:  # msgspec's depth limit: [[[...]]] anywhere, even in an ignored field
        raise invalid("the request body is nested too deeply to decode") from None


def _undecodable(raw: bytes, exc: Exception) -> str:
    """What is wrong with a body the decoder refused: bad UTF-8 (with its byte offset) or bad JSON."""
    try:
        raw.decode("utf-8")
    except UnicodeDecodeError as bad:
        return f"the request body is not valid UTF-8: byte {bad.start} cannot start or continue a character"
    return f"the request body is not valid JSON: {exc}"


def parse_priority(header: str | None, body_value: int | None, default: int) -> int:
    """X-Priority header wins over a body `priority`; lower is served first."""
    raw: Any = header if header is not None else body_value
    if raw is None:
        return default
    try:
        value = int(raw)
    except (TypeError, ValueError):
        raise invalid(f"priority must be an integer, got {raw!r}", param="priority") from None
    low, high = PRIORITY_RANGE
    if not low <= value <= high:
        raise invalid(f"priority must be between {low} and {high}, got {value}", param="priority")
    return value


def stop_strings(value: str | list[str] | None, field: str) -> tuple[str, ...]:
    """The request's stop strings (one string or a list), or a 400 naming `field` past MAX_STOPS
    strings or MAX_STOP_CHARS characters in all."""
    stops = (value,) if isinstance(value, str) else tuple(value or ())
    if len(stops) > MAX_STOPS:
        raise invalid(f"{field}: at most {MAX_STOPS} stop sequences are allowed, got {len(stops)}", param=field)
    total = sum(map(len, stops))
    if total > MAX_STOP_CHARS:
        raise invalid(f"{field}: the stop sequences may have at most {MAX_STOP_CHARS} characters in all, "
                      f"got {total}", param=field)
    return stops
