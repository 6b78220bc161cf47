"""Tokenisers: the one in a model directory (local files only), or a byte-level one for the built-in model."""

from __future__ import annotations

from pathlib import Path

import transformers

from moejax.data.corpus import DataError


class ByteTokenizer:
    """UTF-8 bytes shifted past three special ids (0 pad, 1 BOS, 2 EOS); each text starts with BOS."""

    vocab_size = 259
    pad_id = 0
    eos_id = 2
    special_ids = frozenset({0, 1, 2})
    name = "bytes"

    def encode(self, text: str) -> list[int]:
        return [1, *(b + 3 for b in text.encode("utf-8"))]


class HFTokenizer:
    """A transformers tokenizer from the model directory; its special tokens are excluded from metrics."""

    def __init__(self, model_dir: str | Path):
        model_dir = Path(model_dir)
        if not any((model_dir / f).exists() for f in ("tokenizer.json", "tokenizer_config.json", "tokenizer.model")):
            raise DataError(f"{model_dir}: no tokenizer (tokenizer.json / tokenizer_config.json); copy the base "
                              "model's tokenizer files into the checkpoint directory")
        try:
            self._tok = transformers.AutoTokenizer.from_pretrained(model_dir, local_files_only=True)
        except (OSError, ValueError, TypeError, KeyError) as e:
            raise DataError(f"{model_dir}: its tokenizer cannot be loaded ({type(e).__name__}: "
                            f"{str(e).splitlines()[0] if str(e) else e!r})") from None
        self.special_ids = frozenset(self._tok.all_special_ids)
        self.pad_id = self._tok.pad_token_id if self._tok.pad_token_id is not None else 0
        self.eos_id = self._tok.eos_token_id  # ends each training document (None: no end-of-text token)
        self.name = str(model_dir)

    def encode(self, text: str) -> list[int]:
        return list(self._tok(text, add_special_tokens=True)["input_ids"])
