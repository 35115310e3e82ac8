"""Prompt rendering, incremental detokenizing and stop-string matching."""

from semcache.text.chat import ChatMessage, Detokenizer, PromptRenderer, StopMatcher


class TestDetokenizer:
    def test_token_by_token_text_equals_whole_decode(self, tokenizer):
        """Concatenated deltas equal decoding all ids at once, multi-byte characters included."""
        text = "Grüße, 東京! 🚀 naïve café — ok"
        ids = tokenizer.encode(text, add_special_tokens=False)
        detok = Detokenizer(tokenizer)
        out = "".join(detok.add(i) for i in ids) + detok.flush()
        assert out == text

    def test_never_emits_replacement_characters_mid_character(self, tokenizer):
        """A split UTF-8 character is held back until complete, never sent as U+FFFD."""
        ids = tokenizer.encode("🚀🚀", add_special_tokens=False)
        detok = Detokenizer(tokenizer)
        assert all("\ufffd" not in detok.add(i) for i in ids)


class TestStopMatcher:
    def test_stop_split_across_chunks_is_found_and_not_returned(self):
        """A stop string split over two chunks is matched; text before it is kept, the stop is not."""
        m = StopMatcher(("END",))
        out1, hit1 = m.feed("hello E")
        out2, hit2 = m.feed("ND tail")
        assert (out1, hit1) == ("hello ", None)
        assert (out2, hit2) == ("", "END")

    def test_partial_match_that_fails_is_released(self):
        """Held-back text that turns out not to be a stop is emitted later, in order."""
        m = StopMatcher(("STOP",))
        assert m.feed("ab ST") == ("ab ", None)
        assert m.feed("ART") == ("START", None)
        assert m.flush() == ""

    def test_earliest_of_several_stops_wins(self):
        """With several stop strings, the one that occurs first in the text is reported."""
        m = StopMatcher(("world", "lo"))
        assert m.feed("hello world") == ("hel", "lo")

    def test_no_stops_passes_text_through(self):
        """Without stop strings text is never held back."""
        assert StopMatcher(()).feed("abc") == ("abc", None)


class TestPromptRenderer:
    def test_uses_the_models_chat_template(self, tokenizer):
        """A user turn renders with ChatML and ends with the assistant header."""
        ids = PromptRenderer(tokenizer).render([ChatMessage("user", "Hi")])
        text = tokenizer.decode(ids)
        assert text.startswith("<|im_start|>system\n")
        assert text.endswith("<|im_start|>user\nHi<|im_end|>\n<|im_start|>assistant\n")

    def test_trailing_assistant_message_is_continued_on_request(self, tokenizer):
        """With continue_final the prompt ends with the assistant's text; without, a new turn opens."""
        chat = [ChatMessage("user", "Hi"), ChatMessage("assistant", "Hello")]
        assert tokenizer.decode(PromptRenderer(tokenizer).render(chat, continue_final=True)).endswith(
            "<|im_start|>assistant\nHello")
        assert tokenizer.decode(PromptRenderer(tokenizer).render(chat)).endswith(
            "Hello<|im_end|>\n<|im_start|>assistant\n")

    def test_consecutive_turns_of_one_role_are_joined(self, tokenizer):
        """Two user messages in a row become one user turn."""
        ids = PromptRenderer(tokenizer).render([ChatMessage("user", "a"), ChatMessage("user", "b")])
        assert tokenizer.decode(ids).count("<|im_start|>user") == 1

    def test_chatml_fallback_template(self, tokenizer):
        """GGUF files without a template get ChatML."""
        from copy import deepcopy

        from semcache.engine.gguf import CHATML_TEMPLATE

        tok = deepcopy(tokenizer)
        tok.chat_template = CHATML_TEMPLATE
        text = tok.decode(PromptRenderer(tok).render([ChatMessage("system", "S"), ChatMessage("user", "U")]))
        assert text == "<|im_start|>system\nS<|im_end|>\n<|im_start|>user\nU<|im_end|>\n<|im_start|>assistant\n"


class TestMidConversationSystemMessages:
    MESSAGES = [ChatMessage("system", "Be brief."), ChatMessage("user", "hi"), ChatMessage("assistant", "hello"),
                ChatMessage("system", "The time is noon."), ChatMessage("user", "and now?")]

    def test_a_template_that_allows_them_renders_them_in_place(self, tokenizer):
        """ChatML renders a later system message where it stands, so the earlier turns stay a prefix."""
        renderer = PromptRenderer(tokenizer)
        text = renderer.text(self.MESSAGES)
        assert "<|im_end|>\n<|im_start|>assistant\nhello<|im_end|>\n<|im_start|>system\nThe time is noon.<|im_end|>" \
               "\n<|im_start|>user\nand now?<|im_end|>" in text
        assert text.startswith(renderer.text(self.MESSAGES[:3], generate=False))

    def test_a_template_that_rejects_them_gets_system_reminder_user_turns(self, tokenizer):
        """A strict template (it raises on a system message after the first) renders each later one
        as a <system-reminder> user turn, joined with the next user turn."""

        class Strict:
            def encode(self, text, add_special_tokens=False):
                return tokenizer.encode(text, add_special_tokens=add_special_tokens)

            def apply_chat_template(self, dicts, tokenize=False, add_generation_prompt=True, **extra):
                if any(d["role"] == "system" for d in dicts[1:]):
                    raise ValueError("System role only at the start")
                return "".join(f"[{d['role']}]{d['content']}" for d in dicts) + ("[assistant]" if add_generation_prompt else "")

        text = PromptRenderer(Strict()).text(self.MESSAGES)
        assert text == ("[system]Be brief.[user]hi[assistant]hello"
                        "[user]<system-reminder>\nThe time is noon.\n</system-reminder>\n\nand now?[assistant]")


# The token floor: a prompt far past the context is refused without tokenizing it ------------------------

import pytest  # noqa: E402
from hypothesis import given, settings, strategies as st  # noqa: E402
from tokenizers import Tokenizer, decoders, models, normalizers, pre_tokenizers, trainers  # noqa: E402

from semcache.text.tokenfloor import Floor  # noqa: E402

CORPUS = ["hello world, the quick brown fox", "naïve café über Straße", "東京 한국어 😀 ﬁ Ａ 𝐀 K",
          "    indented\n\tcode = 1234567", "-----====== ////"] * 20
PIECES = st.sampled_from(["\n" + " " * 80, " " * 200, "-" * 64, "1234567890", "<|im_start|>", "<|im_end|>",
                          "e\u0301", "\u1100\u1161\u11a8", "Ａ", "𝐀", "K", "İ", "\ufdfa", "ﬁ", "\ud800", "▁"])
TEXTS = st.lists(PIECES | st.text(max_size=30), max_size=40).map("".join)


def trained(model, trainer, normalizer=None, pre=None, decoder=None) -> Tokenizer:
    tok = Tokenizer(model)
    tok.normalizer, tok.pre_tokenizer = normalizer, pre
    if decoder is not None:
        tok.decoder = decoder
    tok.train_from_iterator(CORPUS, trainer)
    tok.add_special_tokens(["<|im_start|>", "<|im_end|>"])
    return tok


def sentencepiece_like() -> Tokenizer:
    """Llama 2 style: BPE over "▁"-joined words, NFKC, unknown bytes as <0x..> tokens."""
    bytes_ = [f"<0x{b:02X}>" for b in range(256)]
    return trained(models.BPE(unk_token="<unk>", fuse_unk=True, byte_fallback=True),
                   trainers.BpeTrainer(special_tokens=["<unk>", *bytes_], vocab_size=600),
                   normalizers.Sequence([normalizers.NFKC(), normalizers.Prepend("▁"), normalizers.Replace(" ", "▁")]))


def byte_level_nfc() -> Tokenizer:
    """Qwen style: NFC, then byte-level BPE."""
    return trained(models.BPE(), trainers.BpeTrainer(vocab_size=600, initial_alphabet=pre_tokenizers.ByteLevel.alphabet()),
                   normalizers.NFC(), pre_tokenizers.ByteLevel(add_prefix_space=False), decoders.ByteLevel())


@pytest.fixture(scope="module")
def tokenizers_(tokenizer):
    return {"smollm2": tokenizer.backend_tokenizer, "sentencepiece-like": sentencepiece_like(),
            "byte-level + NFC": byte_level_nfc()}


@settings(max_examples=300, deadline=None, derandomize=True)
@given(text=TEXTS, limit=st.sampled_from([1, 3, 10, 50, 10**9]))
def test_the_floor_never_exceeds_the_real_count(tokenizers_, text, limit):
    """Whatever the text (runs of the longest tokens, special tokens, characters a normalizer
    shrinks or grows, lone surrogates), the floor is at most the tokens the text really has."""
    for name, tok in tokenizers_.items():
        try:
            real = len(tok.encode(text, add_special_tokens=False).ids)
        except Exception:  # a text the tokenizer itself refuses (a lone surrogate): nothing to bound
            continue
        assert Floor(tok).tokens(text, limit) <= real, name


def test_the_floor_is_tight_on_the_longest_tokens(tokenizer):
    """On SmolLM2 the longest token is a newline and 80 spaces (81 bytes): a text made of it has
    exactly the floor's count, so the floor refuses nothing that fits."""
    floor = Floor(tokenizer.backend_tokenizer)
    text = ("\n" + " " * 80) * 1000
    assert floor.longest == 81
    assert floor.tokens(text, 10) == len(tokenizer.encode(text, add_special_tokens=False)) == 1000


@pytest.mark.parametrize("change", ["whitespace split", "rstrip special", "word piece", "truncation",
                                    "unknown runs fused", "strip normalizer"])
def test_tokenizers_where_a_token_can_cover_any_length_get_no_floor(change):
    """Where one token can cover text of any length, or a normalizer may remove text, the floor is
    0: the prompt is tokenized to be counted."""
    from tokenizers import AddedToken

    tok = byte_level_nfc()
    if change == "whitespace split":
        tok.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    elif change == "rstrip special":
        tok.add_special_tokens([AddedToken("<eot>", rstrip=True)])
    elif change == "word piece":
        tok = trained(models.WordPiece(unk_token="[UNK]"), trainers.WordPieceTrainer(special_tokens=["[UNK]"]),
                      pre=pre_tokenizers.Whitespace())
    elif change == "truncation":
        tok.enable_truncation(16)
    elif change == "unknown runs fused":
        tok = trained(models.BPE(unk_token="<unk>", fuse_unk=True), trainers.BpeTrainer(special_tokens=["<unk>"]))
    else:
        tok.normalizer = normalizers.Strip()
    assert Floor(tok).tokens("x" * 100_000, 1) == 0
