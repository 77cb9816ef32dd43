"""Word-level instruction tokenizer.

A suite's instructions come from a small closed set of phrases, so a word
vocabulary built from them (`EnvSuite.vocabulary`) is exact, tiny, and needs nothing downloaded. The
vocabulary is stored in :class:`~vlapt.policies.vla.config.PolicyConfig` so a
checkpoint always carries the tokenizer it was trained with.
"""

from __future__ import annotations

import re
from collections import Counter
from typing import Iterable, Sequence

import torch

PAD_TOKEN = "[PAD]"
UNK_TOKEN = "[UNK]"
PAD_ID = 0
UNK_ID = 1
SPECIAL_TOKENS = (PAD_TOKEN, UNK_TOKEN)

_WORD = re.compile(r"[a-z0-9]+")


def check_vocab(vocab: Sequence[str]) -> None:
    """A vocabulary starts with the special tokens and names each word once."""
    vocab = list(vocab)
    if vocab[: len(SPECIAL_TOKENS)] != list(SPECIAL_TOKENS):
        raise ValueError(f"vocab must start with {list(SPECIAL_TOKENS)}, got {vocab[:len(SPECIAL_TOKENS)]}; "
                         "build it with Tokenizer.build(texts)")
    duplicates = sorted(word for word, count in Counter(vocab).items() if count > 1)
    if duplicates:
        raise ValueError(f"vocab names {', '.join(duplicates)} more than once; build it with Tokenizer.build(texts)")


class Tokenizer:
    """Maps instructions to fixed-length id rows plus a mask of real tokens."""

    def __init__(self, vocab: Sequence[str] = ()):
        vocab = list(vocab) or list(SPECIAL_TOKENS)
        check_vocab(vocab)
        self.vocab: list[str] = vocab
        self._ids = {word: i for i, word in enumerate(vocab)}

    @classmethod
    def build(cls, texts: Iterable[str]) -> "Tokenizer":
        """Vocabulary of every word in ``texts``, sorted so the result is independent of order."""
        words = {word for text in texts for word in cls.split(text)}
        words.difference_update(SPECIAL_TOKENS)
        return cls([*SPECIAL_TOKENS, *sorted(words)])

    @staticmethod
    def split(text: str) -> list[str]:
        return _WORD.findall(text.lower())

    def __len__(self) -> int:
        return len(self.vocab)

    @property
    def vocab_size(self) -> int:
        return len(self.vocab)

    def ids(self, text: str) -> list[int]:
        """Token ids of one text; never empty, so attention always has a real key."""
        ids = [self._ids.get(word, UNK_ID) for word in self.split(text)]
        return ids or [UNK_ID]

    def encode(self, texts: Sequence[str] | str, max_len: int) -> tuple[torch.Tensor, torch.Tensor]:
        """Ids ``(B, max_len)`` (long) and mask ``(B, max_len)`` (bool, True = real token).

        Rows are padded to exactly ``max_len`` so batches from different calls
        stack, and truncated when longer.
        """
        if isinstance(texts, str):
            texts = [texts]
        if max_len < 1:
            raise ValueError(f"max_len must be >= 1, got {max_len}")
        ids = torch.full((len(texts), max_len), PAD_ID, dtype=torch.long)
        for row, text in enumerate(texts):
            if not isinstance(text, str):
                raise TypeError(f"instruction {row} must be a str, got {type(text).__name__}")
            tokens = self.ids(text)[:max_len]
            ids[row, : len(tokens)] = torch.tensor(tokens, dtype=torch.long)
        return ids, ids != PAD_ID

    def decode(self, ids: Sequence[int] | torch.Tensor) -> str:
        """Words of one id row, padding dropped; for debugging and logs."""
        if isinstance(ids, torch.Tensor):
            ids = ids.tolist()
        return " ".join(self.vocab[i] if 0 <= i < len(self.vocab) else UNK_TOKEN for i in ids if i != PAD_ID)

    def __eq__(self, other: object) -> bool:
        return isinstance(other, Tokenizer) and other.vocab == self.vocab

    def __repr__(self) -> str:
        return f"Tokenizer(vocab_size={len(self.vocab)})"
