"""The tokens a parity run compares: a text file or a parallel corpus, cut into sequences and batched."""

from __future__ import annotations

import dataclasses
import re
from pathlib import Path

import numpy as np

from moejax.data.corpus import chunk, read_corpus, read_text
from moejax.errors import DataError, SettingsError


@dataclasses.dataclass
class Sequence:
    group: str  # the language, or "text"
    ids: list[int]


@dataclasses.dataclass
class Batch:
    """One forward pass's sequences: ids and mask [b, t] (right-padded), each content token's group (row-major),
    and the index of its first sequence."""

    groups_n: np.ndarray
    ids: np.ndarray
    mask: np.ndarray
    first_sequence: int

    @property
    def content(self) -> np.ndarray:
        return self.mask.astype(bool)


def text_sequences(path: str | Path, tokenizer, seq_len: int, max_tokens: int) -> list[Sequence]:
    """A UTF-8 text file, tokenised paragraph by paragraph, joined and cut into sequences of seq_len tokens."""
    path = Path(path)
    text = read_text(path, "--text")  # a byte-order mark dropped
    paragraphs = [p.strip() for p in re.split(r"\n\s*\n", text) if p.strip()]
    if not paragraphs:
        raise DataError(f"{path}: no text")
    return _cut("text", paragraphs, tokenizer, seq_len, max_tokens)


def corpus_sequences(data: str | None, langs: list[str], tokenizer, seq_len: int, max_tokens: int,
                     skip_incomplete: bool = False) -> list[Sequence]:
    """Each language's paragraph chunks of a parallel corpus, joined and cut into seq_len-token sequences,
    max_tokens / len(langs) tokens per language (from the same sentences in every language)."""
    corpus = chunk(read_corpus(data, langs, skip_incomplete=skip_incomplete), 300, "paragraph")
    budget = max_tokens // len(langs)
    if budget < 1:
        raise SettingsError(f"--max-tokens {max_tokens} leaves no tokens for {len(langs)} languages")
    return [s for lang in langs for s in _cut(lang, corpus[lang], tokenizer, seq_len, budget)]


def _cut(group: str, texts: list[str], tokenizer, seq_len: int, budget: int) -> list[Sequence]:
    """Texts tokenised one by one (each with the tokenizer's special tokens) until `budget` tokens, joined,
    and cut into seq_len pieces."""
    stream: list[int] = []
    for text in texts:
        if len(stream) >= budget:
            break
        stream += tokenizer.encode(text)
    stream = stream[:budget]
    return [Sequence(group, stream[i:i + seq_len]) for i in range(0, len(stream), seq_len)]


def batches(sequences: list[Sequence], batch_size: int, pad_id: int) -> list[Batch]:
    """The sequences in order, batch_size at a time, right-padded to the longest one."""
    width = max(len(s.ids) for s in sequences)
    out = []
    for first in range(0, len(sequences), batch_size):
        part = sequences[first:first + batch_size]
        ids = np.full((len(part), width), pad_id, np.int64)
        mask = np.zeros((len(part), width), np.int64)
        for row, s in enumerate(part):
            ids[row, :len(s.ids)] = s.ids
            mask[row, :len(s.ids)] = 1
        out.append(Batch(np.repeat(np.array([s.group for s in part]), mask.sum(-1)), ids, mask, first))
    return out


def fill_rows(a: np.ndarray, rows: int) -> np.ndarray:
    """moejax's copy of a short last batch's array [b, ...], topped up to `rows` with repeats of its first row so
    every batch has one shape and compiles once; the extra rows' outputs are dropped."""
    return np.concatenate([a, np.repeat(a[:1], rows - len(a), 0)]) if len(a) < rows else a
