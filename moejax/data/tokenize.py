"""Tokenisers: the one in a model directory (local files only), or a byte-level one for the built-in model.
transformers is imported when a transformers tokenizer is first made."""

from __future__ import annotations

import functools
from pathlib import Path

import numpy as np

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

    @functools.cached_property
    def _tok(self):
        """The same tokenizer as transformers', with the chat template (what SFT formats records with)."""
        return byte_level_tokenizer()


def _byte_characters() -> list[str]:
    """The printable character byte-level BPE tokenizers (GPT-2's scheme) write for each byte 0..255: printable
    Latin-1 bytes stand for themselves, the others take the code points from 256 on, in byte order."""
    printable = set(range(ord("!"), ord("~") + 1)) | set(range(0xA1, 0xAC + 1)) | set(range(0xAE, 0xFF + 1))
    shifted = iter(range(256, 512))
    return [chr(b) if b in printable else chr(next(shifted)) for b in range(256)]


# The byte tokenizer's chat template: each turn as "<|role|>", a newline, its text, a newline; an assistant turn ends
# with </s> (the end-of-sequence id generation stops at). A conversation's beginning renders as the beginning of the
# whole, so SFT can tell the assistant tokens apart (moejax.data.sft).
BYTE_CHAT_TEMPLATE = (
    "{{ bos_token }}{% for message in messages %}{{ '<|' + message['role'] + '|>\\n' + message['content'] }}"
    "{% if message['role'] == 'assistant' %}{{ eos_token }}{% endif %}{{ '\\n' }}{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|assistant|>\\n' }}{% endif %}")


def byte_level_tokenizer(chat_template: bool = True):
    """ByteTokenizer as a transformers tokenizer (the same ids: <pad> 0, <s> 1, </s> 2, byte b -> b + 3; each text
    starts with <s>; decoding gives the text back; a chat template, BYTE_CHAT_TEMPLATE, unless chat_template is
    False), for what needs a
    transformers tokenizer (generation's decoding, lm-eval, SFT) with the built-in model, and for tiny test
    checkpoints."""
    import transformers
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors

    vocab = {"<pad>": 0, "<s>": 1, "</s>": 2} | {ch: b + 3 for b, ch in enumerate(_byte_characters())}
    tok = Tokenizer(models.BPE(vocab=vocab, merges=[]))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    tok.post_processor = processors.TemplateProcessing(single="<s> $A", special_tokens=[("<s>", 1)])
    return transformers.PreTrainedTokenizerFast(tokenizer_object=tok, bos_token="<s>", eos_token="</s>",
                                                pad_token="<pad>",
                                                chat_template=BYTE_CHAT_TEMPLATE if chat_template else None)


def transformers_tokenizer(model_dir: str | Path, **kwargs):
    """The tokenizer files of a model directory (local files only; a transformers PreTrainedTokenizerBase), or a
    DataError naming the directory."""
    import transformers

    model_dir = Path(model_dir)
    if not any((model_dir / f).exists() for f in ("tokenizer.json", "tokenizer_config.json", "tokenizer.model")):
        raise DataError(f"{model_dir}: no tokenizer (tokenizer.json / tokenizer_config.json); copy the base "
                        "model's tokenizer files into the checkpoint directory")
    try:
        return transformers.AutoTokenizer.from_pretrained(model_dir, local_files_only=True, **kwargs)
    except Exception as e:  # transformers and huggingface_hub raise many kinds (a malformed config.json among them)
        lines = [line.strip() for line in str(e).splitlines() if line.strip()]
        raise DataError(f"{model_dir}: its tokenizer cannot be loaded ({type(e).__name__}: "
                        f"{' '.join(lines[:2]) if lines else repr(e)})") from None


class HFTokenizer:
    """A transformers tokenizer from the model directory; its special tokens are excluded from metrics."""

    def __init__(self, model_dir: str | Path):
        model_dir = Path(model_dir)
        self._tok = transformers_tokenizer(model_dir)
        self.special_ids = frozenset(self._tok.all_special_ids)
        self.pad_id = self._tok.pad_token_id if self._tok.pad_token_id is not None else 0
        self.eos_id = self._tok.eos_token_id  # ends each training document (None: no end-of-text token)
        self.name = str(model_dir)

    def encode(self, text: str) -> list[int]:
        return list(self._tok(text, add_special_tokens=True)["input_ids"])


def check_ids(ids, vocab_size: int, source: str = "the input") -> None:
    """A DataError naming the first token id of `ids` (any shape) outside [0, vocab_size), with its position."""
    ids = np.asarray(ids)
    bad = np.argwhere((ids < 0) | (ids >= vocab_size))
    if len(bad):
        where = tuple(int(i) for i in bad[0])
        raise DataError(f"{source} holds token id {int(ids[where])} at position {where}, outside the model's "
                        f"vocabulary of {vocab_size} tokens: the tokenizer and the model do not belong together")
