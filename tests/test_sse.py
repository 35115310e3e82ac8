"""SSE framing."""

import json

from semcache.http import sse


def test_frame_with_event_name():
    """A named event: `event:` line, one compact JSON `data:` line, blank line."""
    raw = sse.frame({"type": "ping", "x": "é"}, "ping")
    assert raw.startswith(b"event: ping\ndata: ") and raw.endswith(b"\n\n")
    assert raw.count(b"\n") == 3
    assert json.loads(raw.split(b"data: ", 1)[1]) == {"type": "ping", "x": "é"}


def test_frame_without_event_name():
    """OpenAI chunks are data-only."""
    assert sse.frame({"a": 1}) == b'data: {"a":1}\n\n'


def test_newlines_in_text_stay_inside_the_json():
    """Text with newlines never breaks the framing (JSON escapes them)."""
    raw = sse.frame({"text": "a\n\nb"}, "content_block_delta")
    assert raw.count(b"\n\n") == 1
