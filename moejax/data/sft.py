"""Supervised fine-tuning data: chat records formatted with the model's own chat template, whole conversations packed
into rows with segment ids, the loss on the assistant turns only (docs/training.md, supervised fine-tuning).

A record is a JSON object per line: {"messages": [{"role": ..., "content": ...}, ...]} (at least one assistant
turn), or {"prompt": ..., "response": ...} (one user turn and its answer). Which tokens an assistant turn owns is
read off the template itself: the conversation up to that turn rendered with the generation prompt, then rendered
through that turn; the tokens between the two (the answer and the template's end-of-turn tokens) are trained, the
rest (system and user turns, role headers) are not. The template must render a conversation's prefix as a prefix of
the whole (every usual template does); one that does not is refused.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np

from moejax.data.corpus import jsonl_objects
from moejax.data.mixture import IGNORE_INDEX, STATE_VERSION, Batch, Documents, Source, _check_ratios, _count
from moejax.errors import DataError

ROLES = ("system", "user", "assistant", "tool")


def read_records(path: Path) -> list[list[dict]]:
    """Each line's conversation as a list of {"role", "content"} messages, checked (a DataError naming the line)."""
    expected = 'an SFT record: {"messages": [...]} or {"prompt": ..., "response": ...}'
    conversations = []
    for number, record in jsonl_objects(path, expected):
        where = f"{path}:{number}"
        if "messages" in record:
            messages = record["messages"]
        elif {"prompt", "response"} <= set(record):
            messages = [{"role": "user", "content": record["prompt"]},
                        {"role": "assistant", "content": record["response"]}]
        else:
            raise DataError(f"{where}: an SFT record is {{\"messages\": [...]}} or {{\"prompt\": ..., \"response\": "
                            f"...}}, got {json.dumps(record)[:80]!r}")
        if not isinstance(messages, list) or not all(
                isinstance(m, dict) and m.get("role") in ROLES and isinstance(m.get("content"), str) for m in messages):
            raise DataError(f"{where}: messages must be a list of {{\"role\": one of {', '.join(ROLES)}, "
                            "\"content\": text}")
        if not any(m["role"] == "assistant" for m in messages):
            raise DataError(f"{where}: the record has no assistant turn, so nothing would be trained on it")
        conversations.append(messages)
    if not conversations:
        raise DataError(f"{path}: no SFT records")
    return conversations


def _render(tokenizer, messages: list[dict], generation_prompt: bool) -> list[int]:
    return list(tokenizer.apply_chat_template(messages, tokenize=True, add_generation_prompt=generation_prompt,
                                              return_dict=False))


def format_chat(tokenizer, messages: list[dict], where: str = "a record") -> tuple[np.ndarray, np.ndarray]:
    """(token ids [n] as the chat template renders the whole conversation, trained [n]: the assistant turns' tokens)."""
    ids = _render(tokenizer, messages, False)
    trained = np.zeros(len(ids), bool)
    for i, message in enumerate(messages):
        if message["role"] != "assistant":
            continue
        prefix = _render(tokenizer, messages[:i], True) if i else []
        through = _render(tokenizer, messages[:i + 1], False)
        if through[:len(prefix)] != prefix or ids[:len(through)] != through:
            raise DataError(f"{where}: the chat template does not render a conversation's beginning as the beginning "
                            "of the whole, so the assistant tokens cannot be told apart; use a template that does")
        trained[len(prefix):len(through)] = True
    return np.asarray(ids, np.int32), trained


def chat_tokenizer(tokenizer, what: str):
    """The transformers tokenizer under `tokenizer` (moejax.data.tokenize.HFTokenizer), which must have a chat
    template."""
    inner = getattr(tokenizer, "_tok", tokenizer)
    if not getattr(inner, "chat_template", None):
        raise DataError(f"--sft: {what} has no chat template (chat_template in tokenizer_config.json or "
                        "chat_template.jinja); SFT formats the records with the model's own template")
    return inner


def load_conversations(source: Source, tokenizer, vocab_size: int) -> tuple[Documents, np.ndarray]:
    """(Documents of the formatted conversations, trained [tokens_n]) of one language's .jsonl file."""
    path = Path(source.path)
    if path.suffix.lower() != ".jsonl":
        raise DataError(f"--sft: {path} (language {source.lang!r}) must be a .jsonl file of chat records")
    if not path.is_file():
        raise DataError(f"language {source.lang!r}: data file {path} does not exist")
    chat = chat_tokenizer(tokenizer, getattr(tokenizer, "name", "the tokenizer"))
    tokens, trained, offsets = [], [], [0]
    for number, messages in enumerate(read_records(path), 1):
        ids, mask = format_chat(chat, messages, f"{path} record {number}")
        tokens.append(ids)
        trained.append(mask)
        offsets.append(offsets[-1] + len(ids))
    tokens_n = np.concatenate(tokens)
    bad = (tokens_n < 0) | (tokens_n >= vocab_size)
    if bad.any():
        raise DataError(f"{path}: token id {int(tokens_n[bad][0])} is outside the vocabulary [0, {vocab_size})")
    return Documents(tokens_n, np.asarray(offsets, np.int64)), np.concatenate(trained)


class ConversationRows:
    """Rows [batch_size, seq_len] of whole conversations (each a segment; a conversation longer than a row is cut
    to it), languages mixed by ratio as Mixture mixes them, the loss on assistant tokens only; seeded, resumable
    (Mixture's interface: langs, next_batch, state_dict, load_state_dict)."""

    def __init__(self, sources: list[Source], documents: dict[str, tuple[Documents, np.ndarray]], *, seq_len: int,
                 batch_size: int, seed: int):
        if not sources:
            raise DataError("a mixture needs at least one source")
        _check_ratios(sources, "mixture")
        self.langs = tuple(s.lang for s in sources)
        self.seq_len, self.batch_size, self.seed = int(seq_len), int(batch_size), int(seed)
        probs = np.array([s.ratio for s in sources], np.float64)
        self._probs = probs / probs.sum()
        self._docs = [documents[lang] for lang in self.langs]
        self._batches = 0
        self._used = [0] * len(self.langs)  # conversations consumed per language
        self.truncated = 0
        self.supervision = self._supervision()

    def _supervision(self) -> dict[str, tuple[int, int]]:
        """{language: (assistant tokens a row of seq_len keeps, assistant tokens in all)}: a conversation longer than
        a row is cut to it, and its first token is never a label. A language with nothing left to learn is a
        DataError naming it."""
        out = {}
        for lang, (docs, trained) in zip(self.langs, self._docs, strict=True):
            kept = total = 0
            for start, end in zip(docs.offsets[:-1], docs.offsets[1:], strict=True):
                mask = trained[start:end]
                total += int(mask[1:].sum())
                kept += int(mask[1:self.seq_len].sum())
            if not kept:
                raise DataError(f"--sft: no assistant token of language {lang!r} lies within --seq-len "
                                f"{self.seq_len} (every conversation's answer comes later in it), so training would "
                                "learn nothing from it; raise --seq-len or shorten the prompts")
            out[lang] = (kept, total)
        return out

    def _conversation(self, li: int, position: int) -> tuple[np.ndarray, np.ndarray]:
        docs, trained = self._docs[li]
        count = len(docs.offsets) - 1
        epoch, within = divmod(position, count)
        d = int(np.random.default_rng([self.seed, li, epoch]).permutation(count)[within])
        span = slice(docs.offsets[d], docs.offsets[d + 1])
        return docs.tokens[span], trained[span]

    def next_batch(self) -> Batch:
        b, t = self.batch_size, self.seq_len
        rng = np.random.default_rng([self.seed, 2**32 - 1, self._batches])
        lang_ids_b = rng.choice(len(self.langs), size=b, p=self._probs).astype(np.int32)
        ids = np.zeros((b, t), np.int32)
        segment_ids = np.zeros((b, t), np.int32)
        positions = np.zeros((b, t), np.int32)
        labels = np.full((b, t), IGNORE_INDEX, np.int32)
        for row, li in enumerate(lang_ids_b.tolist()):
            at, segment = 0, 0
            while at < t:
                tokens, trained = self._conversation(li, self._used[li])
                if at and at + len(tokens) > t:
                    break
                self._used[li] += 1
                if len(tokens) > t:
                    self.truncated += 1
                    tokens, trained = tokens[:t], trained[:t]
                n, segment = len(tokens), segment + 1
                ids[row, at:at + n], segment_ids[row, at:at + n] = tokens, segment
                positions[row, at:at + n] = np.arange(n)
                # The label at j is the token predicted from position j - 1: trained tokens only, never a
                # conversation's first token.
                keep = trained.copy()
                keep[0] = False
                labels[row, at:at + n] = np.where(keep, tokens, IGNORE_INDEX)
                at += n
        self._batches += 1
        return Batch(input_ids=ids, segment_ids=segment_ids, position_ids=positions, labels=labels, lang_ids=lang_ids_b)

    def state_dict(self) -> dict:
        return {"version": STATE_VERSION, "kind": "sft", "seed": self.seed, "seq_len": self.seq_len,
                "langs": list(self.langs), "batches": self._batches,
                "conversations": dict(zip(self.langs, self._used, strict=True))}

    def load_state_dict(self, state: dict) -> None:
        if not isinstance(state, dict) or state.get("kind") != "sft":
            raise DataError("data state is not an SFT stream's (ConversationRows.state_dict); resume with the same "
                            "--sft setting")
        for key, ours in (("langs", list(self.langs)), ("seed", self.seed), ("seq_len", self.seq_len)):
            if state.get(key) != ours:
                raise DataError(f"data state has {key} {state.get(key)!r} but this stream has {ours!r}")
        used = state.get("conversations")
        if not isinstance(used, dict) or set(used) != set(self.langs):
            raise DataError(f"data state conversations {used!r} must map each of {list(self.langs)} to a count")
        self._batches = _count(state.get("batches"), "batches")
        self._used = [_count(used[lang], f"conversations[{lang!r}]") for lang in self.langs]

