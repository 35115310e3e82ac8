"""The loaded model as the request path sees it: its info, tokenizer, prompt renderer and grammars.

Made together from the engine and replaced together when the model is swapped, so that a prompt
tokenized with one view's renderer is queued with that same view's fingerprint and context length.
"""

from __future__ import annotations

import asyncio
from typing import Any

from semcache.engine.toolformat import format_for
from semcache.engine.types import Engine
from semcache.ops.errors import invalid
from semcache.service.request import Generation
from semcache.text.chat import PromptRenderer
from semcache.text.grammar import GrammarError, Grammars, json_grammar
from semcache.text.reasoning import reasons


class ModelView:
    def __init__(self, engine: Engine):
        self.info = engine.info
        self.tokenizer = engine.tokenizer
        self.renderer = PromptRenderer(self.tokenizer, format_for(self.tokenizer))
        self.reasons = reasons(self.tokenizer)  # the model thinks before it answers (<think> tags)
        self._grammars: Grammars | None = None

    async def constraint(self, gen: Generation) -> Any:
        """A new grammar.Constraint enforcing the request's tool_choice or JSON mode, or None.
        Compiled off the event loop (the first one builds the model's llguidance tokenizer)."""
        if not gen.json_mode and not gen.tools:
            return None
        if self._grammars is None:
            self._grammars = Grammars(self.tokenizer, self.info.eos_token_ids)
        try:
            if gen.json_mode and not gen.tools:
                return await asyncio.to_thread(self._grammars.compile, json_grammar(gen.json_schema))
            return await asyncio.to_thread(self._grammars.for_tools, self.renderer.tool_format, list(gen.tools),
                                           gen.tool_choice, gen.json_schema, gen.json_mode)
        except GrammarError as exc:
            where = "response_format.json_schema.schema" if gen.json_mode else "tools"
            raise invalid(f"{where} cannot be enforced: {exc}", param=where) from None
