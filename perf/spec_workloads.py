"""The speculative decoding benchmark's turns: each a ~600-token context on the embedded model.

copy-heavy: the answer mostly repeats the context (a file rewritten with one change, a tool result
repeated with its numbers doubled, a JSON document edited); free: open-ended questions after a
context of the same size that the answer need not quote.
"""

from __future__ import annotations

import json

_FUNCS = ("load", "save", "parse", "render", "check", "merge", "split", "count")


def _source_file(salt: int) -> str:
    parts = []
    for i, name in enumerate(_FUNCS):
        parts.append(
            f"def {name}_items(items, limit={10 + i + salt}):\n"
            f"    \"\"\"{name.capitalize()} the items, at most limit of them.\"\"\"\n"
            f"    result = []\n"
            f"    for item in items[:limit]:\n"
            f"        if item is not None:\n"
            f"            result.append(item)\n"
            f"    return result\n")
    return "\n\n".join(parts)


def _tool_result(salt: int) -> str:
    rows = [f"server-{i + salt}: cpu {3 * i + 7}%, memory {11 * i + 40} MB, requests {17 * i + 120}"
            for i in range(22)]
    return "\n".join(rows)


def _json_doc(salt: int) -> str:
    users = [{"id": i + salt, "name": f"user{i}", "email": f"user{i}@example.com", "active": i % 3 != 0,
              "roles": ["reader", "writer"] if i % 2 else ["reader"]} for i in range(9)]
    return json.dumps({"version": 3, "users": users}, indent=2)


def copy_heavy(salt: int = 0) -> list[str]:
    return [
        "Here is a Python file:\n\n" + _source_file(salt) + "\n\nRewrite this whole file, changing only "
        "the name of the function check_items to verify_items. Output the complete file.",
        "Here is a tool result:\n\n" + _tool_result(salt) + "\n\nRepeat the tool result line by line, "
        "with every number doubled.",
        "Here is a JSON document:\n\n" + _json_doc(salt) + "\n\nOutput the same JSON document with "
        "\"version\" set to 4. Output the whole document.",
    ]


_BACKGROUND = ("The museum opened in the spring. Visitors walked through rooms of old maps, ship models, "
               "clocks and letters. The guide spoke about the sea, the trade routes and the towns along "
               "the coast. ")


def free(salt: int = 0) -> list[str]:
    context = _BACKGROUND * 9
    return [
        f"{context}\nWrite a short poem about a lighthouse keeper (take {salt}).",
        f"{context}\nWhat are three good habits for learning a new language? (take {salt})",
        f"{context}\nInvent a new board game and describe how to play it (take {salt}).",
    ]
