"""Which short prompts prefill together (batch.py), without MLX: as many as fit the step's budget,
and the prefix they share, computed once when it is long enough to pay."""

from __future__ import annotations

from semcache.cache.entry import common_prefix

# Below this many common tokens, a group is cheaper to prefill with plain left padding.
MIN_SHARED_PREFIX = 16


def group_cost(size: int, longest: int, shared: int) -> int:
    """Prompt tokens a group costs to prefill: the shared prefix once, the padded rest per row."""
    if shared < MIN_SHARED_PREFIX:
        return size * longest
    return shared + size * (longest - shared)


def short_group(prompts: list[list[int]], budget: int) -> tuple[int, int]:
    """(how many of `prompts` from the first fit `budget`, at least one; the prefix they all share,
    leaving each at least one token of its own, or 0 when too short to prefill once)."""
    first = prompts[0]
    size, shared, longest = 1, len(first) - 1, len(first)
    for ids in prompts[1:]:
        lcp = min(shared, common_prefix(ids, first), len(ids) - 1)
        if group_cost(size + 1, max(longest, len(ids)), lcp) > budget:
            break
        size, shared, longest = size + 1, lcp, max(longest, len(ids))
    return size, shared if size > 1 and shared >= MIN_SHARED_PREFIX else 0
