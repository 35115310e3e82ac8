"""A radix trie over token ids: which stored entries share the longest prefix with a prompt.

Edges carry runs of tokens, so a chain of 2,000 tokens is one node, not 2,000. Keys (entry ids) sit
at the node where their token sequence ends; every node counts the keys in its subtree so empty
branches are pruned on removal.
"""

from __future__ import annotations

from typing import Hashable, Iterator, Sequence


class _Node:
    __slots__ = ("label", "children", "keys", "count")

    def __init__(self, label: tuple[int, ...]):
        self.label = label
        self.children: dict[int, _Node] = {}
        self.keys: set[Hashable] = set()
        self.count = 0  # keys in this subtree


def _shared(label: tuple[int, ...], tokens: Sequence[int], start: int) -> int:
    n = min(len(label), len(tokens) - start)
    for i in range(n):
        if label[i] != tokens[start + i]:
            return i
    return n


class TokenTrie:
    def __init__(self) -> None:
        self.root = _Node(())

    def __len__(self) -> int:
        return self.root.count

    def insert(self, tokens: Sequence[int], key: Hashable) -> None:
        node, i = self.root, 0
        node.count += 1
        while i < len(tokens):
            child = node.children.get(tokens[i])
            if child is None:
                child = node.children[tokens[i]] = _Node(tuple(tokens[i:]))
            n = _shared(child.label, tokens, i)
            if n < len(child.label):  # split the edge where the new sequence leaves it
                middle = _Node(child.label[:n])
                middle.count = child.count
                child.label = child.label[n:]
                middle.children[child.label[0]] = child
                node.children[tokens[i]] = middle
                child = middle
            child.count += 1
            node, i = child, i + n
        node.keys.add(key)

    def remove(self, tokens: Sequence[int], key: Hashable) -> bool:
        """Remove `key` stored under exactly `tokens`; False if it was not there."""
        path, node, i = [self.root], self.root, 0
        while i < len(tokens):
            child = node.children.get(tokens[i])
            if child is None or _shared(child.label, tokens, i) < len(child.label):
                return False
            path.append(child)
            node, i = child, i + len(child.label)
        if key not in node.keys:
            return False
        node.keys.discard(key)
        for parent, child in zip(reversed(path[:-1]), reversed(path)):
            child.count -= 1
            if child.count == 0:
                del parent.children[child.label[0]]
        self.root.count -= 1
        return True

    def along(self, tokens: Sequence[int]) -> tuple[list[Hashable], Iterator[Hashable]]:
        """(prefixes, extensions): the keys stored under a prefix of `tokens` (all of it included),
        and, lazily, those stored under a sequence that strictly extends `tokens`."""
        node, i, prefixes = self.root, 0, list(self.root.keys)
        while i < len(tokens):
            child = node.children.get(tokens[i])
            if child is None:
                return prefixes, iter(())
            n = _shared(child.label, tokens, i)
            if n < len(child.label):  # `tokens` ends inside this edge (all below extend it) or leaves it
                return prefixes, _keys_under(child) if i + n == len(tokens) else iter(())
            node, i = child, i + n
            prefixes += node.keys
        return prefixes, (key for child in node.children.values() for key in _keys_under(child))

    def longest(self, tokens: Sequence[int]) -> tuple[int, Iterator[Hashable]]:
        """(n, keys): n is the longest prefix of `tokens` any stored sequence shares, and keys are
        exactly the entries that share it (lazily, nearest first)."""
        node, i = self.root, 0
        while i < len(tokens):
            child = node.children.get(tokens[i])
            if child is None:
                break
            n = _shared(child.label, tokens, i)
            if n < len(child.label):
                return i + n, _keys_under(child)
            node, i = child, i + n
        return i, _keys_under(node)


def _keys_under(node: _Node) -> Iterator[Hashable]:
    stack = [node]
    while stack:
        current = stack.pop()
        yield from current.keys
        stack.extend(current.children.values())
