"""Incremental detokenization: new text as tokens arrive, never splitting a multi-byte character.

A byte-level BPE token can end in the middle of a UTF-8 character, which decodes to U+FFFD until the rest
arrives. We decode a short window of recent tokens and only emit text once the window decodes cleanly.
"""
from __future__ import annotations

from promptcot_engine.models.tokenizer import Tokenizer


class IncrementalDetokenizer:
    def __init__(self, tokenizer: Tokenizer, skip_special_tokens: bool = True):
        self.tokenizer = tokenizer
        self.skip_special_tokens = skip_special_tokens
        self.token_ids: list[int] = []
        self.prefix_offset = 0  # window start: a token boundary where the text so far was complete
        self.read_offset = 0  # tokens before this are already part of the emitted text

    def add(self, token_id: int) -> str:
        """Append one token; return the text it completes (possibly empty)."""
        self.token_ids.append(token_id)
        decode = self.tokenizer.decode
        prefix_text = decode(self.token_ids[self.prefix_offset:self.read_offset], self.skip_special_tokens)
        window_text = decode(self.token_ids[self.prefix_offset:], self.skip_special_tokens)
        if len(window_text) <= len(prefix_text) or window_text.endswith("\ufffd"):
            return ""
        self.prefix_offset, self.read_offset = self.read_offset, len(self.token_ids)
        return window_text[len(prefix_text):]
