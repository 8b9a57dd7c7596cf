"""Token counts with the served tokenizer (the tokenizer.json Triton's `tokenizer` model loads, with its special
tokens, truncated at the served max length): the gateway's `usage.prompt_tokens`, and the tokens/s of a catalog
embedded through Triton."""
from __future__ import annotations

import json
from pathlib import Path


class TokenCounter:
    def __init__(self, tokenizer_file: Path):
        from tokenizers import Tokenizer

        self.tokenizer = Tokenizer.from_file(str(tokenizer_file))
        self.tokenizer.no_padding()  # the shipped tokenizer.json pads to 128 by itself
        serving = Path(tokenizer_file).with_name("serving.json")
        self.max_length = json.loads(serving.read_text())["max_length"] if serving.exists() else None
        if self.max_length:
            self.tokenizer.enable_truncation(max_length=self.max_length)

    def count(self, texts: list[str]) -> int:
        if len(texts) == 1:  # encode_batch would hand one text to the tokenizer's thread pool
            return len(self.tokenizer.encode(texts[0]).ids)
        return sum(len(encoding.ids) for encoding in self.tokenizer.encode_batch(texts))
