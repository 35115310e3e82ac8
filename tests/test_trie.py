"""The radix trie that finds which stored token sequences share the longest prefix with a prompt."""

from __future__ import annotations

import random

from semcache.cache.trie import TokenTrie


def longest(trie: TokenTrie, tokens) -> tuple[int, set]:
    n, keys = trie.longest(tokens)
    return n, set(keys)


def common(a, b) -> int:
    n = 0
    for x, y in zip(a, b):
        if x != y:
            break
        n += 1
    return n


def edge_count(node) -> int:
    return len(node.children) + sum(edge_count(c) for c in node.children.values())


class TestTokenTrie:
    def test_empty_trie(self):
        """an empty trie has length 0 and answers (0, no keys)."""
        trie = TokenTrie()
        assert len(trie) == 0
        assert longest(trie, [1, 2, 3]) == (0, set())
        assert longest(trie, []) == (0, set())

    def test_exact_and_extended_prompt(self):
        """a prompt equal to, or extending, a stored sequence matches all of it."""
        trie = TokenTrie()
        trie.insert([1, 2, 3, 4], "a")
        assert longest(trie, [1, 2, 3, 4]) == (4, {"a"})
        assert longest(trie, [1, 2, 3, 4, 5, 6]) == (4, {"a"})

    def test_prompt_that_is_a_prefix_of_a_stored_sequence(self):
        """a prompt shorter than a stored sequence matches the whole prompt (ending inside an edge)."""
        trie = TokenTrie()
        trie.insert([1, 2, 3, 4, 5], "a")
        assert longest(trie, [1, 2]) == (2, {"a"})
        assert longest(trie, [1]) == (1, {"a"})

    def test_divergence_inside_an_edge(self):
        """a prompt leaving a stored run midway matches up to the divergence."""
        trie = TokenTrie()
        trie.insert([1, 2, 3, 4, 5], "a")
        assert longest(trie, [1, 2, 3, 9, 9]) == (3, {"a"})
        assert longest(trie, [7, 1, 2]) == (0, {"a"})  # n = 0: the keys are every entry

    def test_insert_splits_an_edge(self):
        """inserting a sequence that leaves an edge midway splits it; both stay findable."""
        trie = TokenTrie()
        trie.insert([1, 2, 3, 4, 5], "a")
        trie.insert([1, 2, 3, 8, 9], "b")
        trie.insert([1, 2], "c")  # ends at the new split point's parent edge: splits again
        assert len(trie) == 3
        assert longest(trie, [1, 2, 3, 4, 5, 6]) == (5, {"a"})
        assert longest(trie, [1, 2, 3, 8]) == (4, {"b"})
        assert longest(trie, [1, 2, 3, 7]) == (3, {"a", "b"})
        assert longest(trie, [1, 2, 6]) == (2, {"a", "b", "c"})
        assert longest(trie, [1, 5]) == (1, {"a", "b", "c"})
        assert longest(trie, [1, 2]) == (2, {"a", "b", "c"})

    def test_runs_are_single_edges(self):
        """a long chain is one edge, not one node per token."""
        trie = TokenTrie()
        trie.insert(list(range(2000)), "a")
        assert edge_count(trie.root) == 1
        trie.insert(list(range(1000)) + [-1], "b")
        assert edge_count(trie.root) == 3

    def test_equal_prefix_entries_all_returned(self):
        """every key sharing the longest prefix is returned, including several at the same sequence."""
        trie = TokenTrie()
        for key in ("a", "b", "c"):
            trie.insert([5, 6, 7], key)
        trie.insert([5, 6, 7, 8], "d")
        trie.insert([5, 6, 9], "e")
        trie.insert([4], "f")
        assert len(trie) == 6
        assert longest(trie, [5, 6, 7]) == (3, {"a", "b", "c", "d"})
        assert longest(trie, [5, 6, 7, 1]) == (3, {"a", "b", "c", "d"})
        assert longest(trie, [5, 6, 7, 8, 9]) == (4, {"d"})
        assert longest(trie, [5, 6]) == (2, {"a", "b", "c", "d", "e"})

    def test_keys_are_nearest_first(self):
        """the keys at the matched node come before deeper ones."""
        trie = TokenTrie()
        trie.insert([1, 2, 3, 4], "deep")
        trie.insert([1, 2], "near")
        _, keys = trie.longest([1, 2])
        assert next(keys) == "near"

    def test_remove_prunes_everything(self):
        """removing every key brings len() back to 0, longest to 0 and the tree to a bare root."""
        trie = TokenTrie()
        seqs = {"a": [1, 2, 3, 4], "b": [1, 2, 3, 8], "c": [1, 2], "d": [9], "e": [1, 2, 3, 4]}
        for key, tokens in seqs.items():
            trie.insert(tokens, key)
        for key, tokens in seqs.items():
            assert trie.remove(tokens, key)
        assert len(trie) == 0
        assert trie.root.children == {}
        assert longest(trie, [1, 2, 3, 4]) == (0, set())

    def test_remove_keeps_the_others(self):
        """removing one key leaves the rest matching as before; a pruned branch no longer matches."""
        trie = TokenTrie()
        trie.insert([1, 2, 3, 4], "a")
        trie.insert([1, 2, 3, 8], "b")
        assert trie.remove([1, 2, 3, 8], "b")
        assert len(trie) == 1
        assert longest(trie, [1, 2, 3, 8]) == (3, {"a"})
        assert longest(trie, [1, 2, 3, 4]) == (4, {"a"})
        trie.insert([1, 2, 3, 8], "b")  # re-insert after pruning
        assert longest(trie, [1, 2, 3, 8]) == (4, {"b"})

    def test_remove_of_absent_key_is_false(self):
        """remove returns False (and changes nothing) for a wrong key or a sequence not stored exactly."""
        trie = TokenTrie()
        trie.insert([1, 2, 3, 4], "a")
        assert not trie.remove([1, 2, 3, 4], "zz")
        assert not trie.remove([1, 2, 3], "a")  # ends inside an edge
        assert not trie.remove([1, 2, 3, 4, 5], "a")  # longer
        assert not trie.remove([2], "a")
        assert not trie.remove([], "a")
        assert len(trie) == 1
        assert longest(trie, [1, 2, 3, 4]) == (4, {"a"})

    def test_empty_sequence_key(self):
        """a key stored under no tokens lives at the root and is removable."""
        trie = TokenTrie()
        trie.insert([], "root")
        trie.insert([1], "a")
        assert len(trie) == 2
        assert longest(trie, [2]) == (0, {"root", "a"})
        assert trie.remove([], "root")
        assert len(trie) == 1 and longest(trie, [2]) == (0, {"a"})

    def test_randomized_against_brute_force(self):
        """over seeded random inserts/removes, longest() depth and keys equal a brute-force scan."""
        rng = random.Random(1234)
        trie = TokenTrie()
        stored: dict[int, list[int]] = {}
        next_key = 0

        def random_seq() -> list[int]:
            # a small alphabet and shared stems make prefixes, splits and duplicates frequent
            if stored and rng.random() < 0.6:
                base = rng.choice(list(stored.values()))
                seq = base[: rng.randint(0, len(base))]
            else:
                seq = []
            return seq + [rng.randint(0, 3) for _ in range(rng.randint(0, 6))]

        for _ in range(600):
            op = rng.random()
            if op < 0.4 or not stored:
                seq = random_seq()
                trie.insert(seq, next_key)
                stored[next_key] = seq
                next_key += 1
            elif op < 0.65:
                key = rng.choice(list(stored))
                assert trie.remove(stored.pop(key), key)
            else:
                prompt = random_seq()
                n, keys = trie.longest(prompt)
                want = max(common(s, prompt) for s in stored.values())
                assert n == want, (prompt, stored)
                assert set(keys) == {k for k, s in stored.items() if common(s, prompt) == want}
            assert len(trie) == len(stored)
        for key, seq in list(stored.items()):
            assert trie.remove(seq, key)
        assert len(trie) == 0 and trie.root.children == {}


class TestAlong:
    def test_prefixes_and_extensions(self):
        """along(tokens): the keys stored under a prefix of tokens (tokens included), and those under
        sequences strictly extending tokens (ending inside an edge or below its node)."""
        trie = TokenTrie()
        trie.insert([1, 2], "ab")
        trie.insert([1, 2, 3], "abc")
        trie.insert([1, 2, 3, 4, 5], "abcde")
        trie.insert([1, 2, 3, 9], "abc9")
        trie.insert([7], "g")
        prefixes, extensions = trie.along([1, 2, 3])
        assert sorted(prefixes) == ["ab", "abc"] and sorted(extensions) == ["abc9", "abcde"]
        prefixes, extensions = trie.along([1, 2, 3, 4])  # ends inside the edge to [.., 5]
        assert sorted(prefixes) == ["ab", "abc"] and list(extensions) == ["abcde"]
        prefixes, extensions = trie.along([1, 2, 3, 4, 6])  # leaves that edge
        assert sorted(prefixes) == ["ab", "abc"] and list(extensions) == []
        prefixes, extensions = trie.along([1])
        assert prefixes == [] and sorted(extensions) == ["ab", "abc", "abc9", "abcde"]
        prefixes, extensions = trie.along([5])
        assert prefixes == [] and list(extensions) == []

    def test_against_brute_force(self):
        """random sequences: along agrees with checking every stored sequence."""
        rng = random.Random(5)
        trie, stored = TokenTrie(), {}
        for i in range(300):
            tokens = [rng.randrange(3) for _ in range(rng.randrange(1, 8))]
            stored[i] = tokens
            trie.insert(tokens, i)
        for _ in range(200):
            probe = [rng.randrange(3) for _ in range(rng.randrange(0, 8))]
            prefixes, extensions = trie.along(probe)
            assert sorted(prefixes) == sorted(k for k, t in stored.items() if probe[:len(t)] == t)
            assert sorted(extensions) == sorted(k for k, t in stored.items() if len(t) > len(probe)
                                                and t[:len(probe)] == probe)
