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
