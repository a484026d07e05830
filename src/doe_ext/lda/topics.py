"""How a fitted LDA shows its topics: token ids decoded by any tokenizer, and the top tokens of each
topic with its share as a table (in a notebook) or lines of text."""
from __future__ import annotations

import html
import os
from typing import Callable


class Topics(list):
    """Each topic's top tokens (a list of lists), with its share of the tokens; a table in a notebook."""

    def __init__(self, tokens: list[list], shares: list[float]):
        super().__init__(tokens)
        self.shares = shares

    def __str__(self) -> str:
        return "\n".join(f"topic {k} ({p:.1%}): {' '.join(map(str, t))}" for k, (t, p) in enumerate(zip(self, self.shares)))

    def _repr_html_(self) -> str:
        rows = "".join(f"<tr><td>{k}</td><td>{p:.1%}</td><td>{html.escape(' '.join(map(str, t)))}</td></tr>"
                       for k, (t, p) in enumerate(zip(self, self.shares)))
        return f"<table><tr><th>topic</th><th>tokens</th><th>top tokens</th></tr>{rows}</table>"


def token_decoder(tokenizer) -> Callable[[int], str]:
    """``id -> token text`` for a path to a tokenizer.json, a ``tokenizers.Tokenizer`` or a transformers tokenizer."""
    if isinstance(tokenizer, (str, os.PathLike)):
        from tokenizers import Tokenizer
        tokenizer = Tokenizer.from_file(str(tokenizer))
    if hasattr(tokenizer, "id_to_token"):  # tokenizers.Tokenizer
        return lambda i: tokenizer.id_to_token(i) or f"<{i}>"
    if hasattr(tokenizer, "convert_ids_to_tokens"):  # transformers tokenizers
        return lambda i: tokenizer.convert_ids_to_tokens(i)
    if hasattr(tokenizer, "decode"):
        return lambda i: tokenizer.decode([i])
    raise TypeError(f"cannot decode token ids with {type(tokenizer).__name__}")
