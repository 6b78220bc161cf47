"""Continual pre-training data: per-language corpora mixed by ratio and packed into fixed-length rows.

Each language is an infinite token stream: epoch e is its documents in a seeded permutation, concatenated.
Each row of a batch holds the next seq_len tokens of one language's stream, the language drawn by ratio
from a generator seeded by (seed, batch index). The state is a few integers, so a run resumes exactly.
"""

from __future__ import annotations

import dataclasses
import math
import re
import zipfile
from pathlib import Path

import numpy as np

from moejax.data.corpus import jsonl_objects, read_lines
from moejax.data.packing import positions
from moejax.errors import DataError

SUFFIXES = (".txt", ".jsonl", ".npy", ".npz")
# The label the loss ignores (PyTorch's ignore_index, transformers' -100): a token no loss is taken on.
IGNORE_INDEX = -100
STATE_VERSION = 1
_LANG_RE = re.compile(r"[A-Za-z0-9_-]+")
# Row-language draws use the key [seed, _ROWS_KEY, batch]. Keys [seed, batch] would collide with the
# epoch-0 permutation key [seed, lang, 0] of language `batch`: SeedSequence ignores trailing zeros.
_ROWS_KEY = 2**32 - 1
_EPOCH_CACHE = 4


@dataclasses.dataclass(frozen=True)
class Source:
    lang: str
    path: Path
    ratio: float


@dataclasses.dataclass(frozen=True)
class Documents:
    tokens: np.ndarray   # int32 [tokens_n], documents concatenated
    offsets: np.ndarray  # int64 [docs_n + 1], document d is tokens[offsets[d]:offsets[d + 1]]


@dataclasses.dataclass
class Batch:
    input_ids: np.ndarray     # int32 [b, t]
    segment_ids: np.ndarray   # int32 [b, t], 1, 2, ... per document piece within a row
    position_ids: np.ndarray  # int32 [b, t], 0 at the start of every segment
    labels: np.ndarray        # int32 [b, t], input_ids with IGNORE_INDEX where a segment starts past position 0
    lang_ids: np.ndarray      # int32 [b], index into Mixture.langs


def _check_ratios(sources: list[Source], where: str) -> None:
    total = math.fsum(s.ratio for s in sources)
    if abs(total - 1.0) > 1e-6:
        listed = ", ".join(f"{s.lang}={s.ratio:g}" for s in sources)
        raise DataError(f"{where}: ratios sum to {total:.6g}, not 1 ({listed}); adjust them so they sum to 1")


def parse_mixture(spec: str, *, with_ratios: bool = True) -> list[Source]:
    """Sources from "LANG=PATH:RATIO,..." (split on the first '=' and the last ':'; paths may not contain ',').
    Without ratios ("LANG=PATH,...", e.g. held-out evaluation sets) each source gets an equal share."""
    items = [item.strip() for item in spec.split(",")] if spec.strip() else []
    if not items:
        raise DataError("empty mixture spec; expected LANG=PATH:RATIO[,LANG=PATH:RATIO...], e.g. he=he.txt:0.6,"
                        "en=en.txt:0.4")
    sources: list[Source] = []
    for item in items:
        lang, eq, rest = item.partition("=")
        if not with_ratios:
            rest = f"{rest}:{1 / len(items)!r}"
        path, colon, ratio_text = rest.rpartition(":")
        lang, path, ratio_text = lang.strip(), path.strip(), ratio_text.strip()
        if not (eq and colon and path and ratio_text and _LANG_RE.fullmatch(lang)):
            raise DataError(f"mixture item {item!r} is malformed; expected LANG=PATH:RATIO with LANG made of "
                            "letters, digits, '_' or '-' (e.g. he=/data/he.jsonl:0.6)")
        try:
            ratio = float(ratio_text)
        except ValueError:
            raise DataError(f"mixture item {item!r}: ratio {ratio_text!r} is not a number; expected "
                            "LANG=PATH:RATIO (the ratio follows the last ':')") from None
        if not math.isfinite(ratio) or ratio <= 0:
            raise DataError(f"mixture item {item!r}: ratio {ratio_text} must be a positive number")
        if any(s.lang == lang for s in sources):
            raise DataError(f"mixture spec {spec!r} names language {lang!r} twice; give each language once")
        sources.append(Source(lang, Path(path), ratio))
    _check_ratios(sources, f"mixture spec {spec!r}")
    for s in sources:
        if not s.path.is_file():
            raise DataError(f"language {s.lang!r}: data file {s.path} does not exist")
    return sources


def jsonl_texts(path: Path) -> list[str]:
    """The "text" field of each line of a JSONL file (a DataError naming the line otherwise)."""
    expected = 'a JSON object with a string "text" field'
    texts = []
    for i, row in jsonl_objects(path, expected):
        if not isinstance(row.get("text"), str):
            raise DataError(f"{path}:{i}: expected {expected}")
        texts.append(row["text"])
    return texts


def _encode(texts: list[str], tokenizer) -> tuple[np.ndarray, np.ndarray]:
    eos = [] if tokenizer.eos_id is None else [tokenizer.eos_id]
    docs = [list(tokenizer.encode(text)) + eos for text in texts]
    lengths_n = np.fromiter((len(d) for d in docs), np.int64, len(docs))
    tokens = np.fromiter((t for d in docs for t in d), np.int64, int(lengths_n.sum()))
    return tokens, np.concatenate([[0], np.cumsum(lengths_n)])


def _int_array(array, path: Path, what: str) -> np.ndarray:
    if not isinstance(array, np.ndarray) or array.ndim != 1 or not np.issubdtype(array.dtype, np.integer):
        desc = f"{array.dtype} array of shape {array.shape}" if isinstance(array, np.ndarray) else type(array).__name__
        raise DataError(f"{path}: {what} must be a 1-D integer array, got {desc}")
    return array.astype(np.int64)


def _load_array(path: Path):
    try:
        return np.load(path, allow_pickle=False)
    except (OSError, ValueError, EOFError, zipfile.BadZipFile) as e:
        raise DataError(f"{path}: cannot read as a numpy file ({e})") from None


def _check_offsets(offsets_n: np.ndarray, tokens_n: int, where: str) -> None:
    if offsets_n.ndim != 1 or len(offsets_n) < 1 or offsets_n[0] != 0 or offsets_n[-1] != tokens_n:
        raise DataError(f"{where}: offsets must be 1-D, start at 0 and end at the token count {tokens_n}")
    if np.any(np.diff(offsets_n) < 0):
        bad = int(np.flatnonzero(np.diff(offsets_n) < 0)[0])
        raise DataError(f"{where}: offsets decrease at index {bad + 1} ({offsets_n[bad]} -> {offsets_n[bad + 1]})")


def load_documents(source: Source, tokenizer, vocab_size: int) -> Documents:
    """Documents (tokens int32 [tokens_n], offsets int64 [docs_n + 1]) from a .txt/.jsonl/.npy/.npz file."""
    path, suffix = Path(source.path), Path(source.path).suffix.lower()
    if suffix not in SUFFIXES:
        raise DataError(f"{path}: unsupported data file type {suffix or '(no suffix)'!r} (language {source.lang!r}); "
                        f"supported: {', '.join(SUFFIXES)}")
    if not path.is_file():
        raise DataError(f"language {source.lang!r}: data file {path} does not exist")
    if suffix == ".txt":
        lines = read_lines(path, f"language {source.lang!r}")
        tokens, offsets = _encode([line for line in lines if line.strip()], tokenizer)
    elif suffix == ".jsonl":
        tokens, offsets = _encode(jsonl_texts(path), tokenizer)
    elif suffix == ".npy":
        tokens = _int_array(_load_array(path), path, "a .npy file")
        eos = tokenizer.eos_id
        ends = np.flatnonzero(tokens == eos) + 1 if eos is not None else np.zeros(0, np.int64)
        offsets = np.unique(np.concatenate([[0], ends, [len(tokens)]]).astype(np.int64))
    else:
        npz = _load_array(path)
        if not isinstance(npz, np.lib.npyio.NpzFile):
            raise DataError(f"{path}: a .npz file needs arrays 'tokens' and 'offsets', found a single array")
        with npz:
            if not {"tokens", "offsets"} <= set(npz.files):
                raise DataError(f"{path}: a .npz file needs arrays 'tokens' and 'offsets', found {sorted(npz.files)}")
            tokens = _int_array(npz["tokens"], path, "'tokens'")
            offsets = _int_array(npz["offsets"], path, "'offsets'")
        _check_offsets(offsets, len(tokens), str(path))
    if len(tokens) == 0:
        raise DataError(f"language {source.lang!r}: {path} is empty (no documents with tokens)")
    bad = (tokens < 0) | (tokens >= vocab_size)
    if bad.any():
        raise DataError(f"{path}: token id {int(tokens[bad][0])} is outside the vocabulary [0, {vocab_size}) "
                        f"(language {source.lang!r}); tokenise with the model's tokenizer")
    # Empty documents are dropped: repeated offsets collapse.
    return Documents(tokens.astype(np.int32), np.unique(offsets))


def _count(value, what: str) -> int:
    if not isinstance(value, int) or isinstance(value, bool) or value < 0:
        raise DataError(f"data state {what} is {value!r}, expected a non-negative integer")
    return value


class Mixture:
    """Packed rows [batch_size, seq_len] from several languages, mixed by ratio; seeded and resumable."""

    def __init__(self, sources: list[Source], documents: dict[str, Documents], *, seq_len: int, batch_size: int,
                 seed: int):
        if not sources:
            raise DataError("a mixture needs at least one source")
        langs = [s.lang for s in sources]
        if len(set(langs)) != len(langs):
            raise DataError(f"mixture languages {langs} repeat; give each language once")
        if any(not math.isfinite(s.ratio) or s.ratio <= 0 for s in sources):
            raise DataError(f"mixture ratios must be positive, got {[s.ratio for s in sources]}")
        _check_ratios(sources, "mixture")
        missing = [lang for lang in langs if lang not in documents]
        if missing:
            raise DataError(f"no documents loaded for language(s) {missing}; load_documents for every source")
        if seq_len < 2:
            raise DataError(f"seq_len {seq_len} must be at least 2")
        if batch_size < 1:
            raise DataError(f"batch_size {batch_size} must be at least 1")
        if not 0 <= seed < 2**32:
            raise DataError(f"seed {seed} must be in [0, 2**32)")
        for lang in langs:
            docs = documents[lang]
            if np.ndim(docs.tokens) != 1 or len(docs.tokens) == 0:
                raise DataError(f"language {lang!r}: Documents.tokens must be a non-empty 1-D array")
            _check_offsets(np.asarray(docs.offsets), len(docs.tokens), f"language {lang!r}")
        self.langs = tuple(langs)
        self.seq_len, self.batch_size, self.seed = int(seq_len), int(batch_size), int(seed)
        probs = np.array([s.ratio for s in sources], np.float64)
        self._probs = probs / probs.sum()
        self._docs = [documents[lang] for lang in langs]
        self._lengths = [np.diff(d.offsets).astype(np.int64) for d in self._docs]
        self._epoch_cache: list[dict[int, tuple[np.ndarray, np.ndarray]]] = [{} for _ in langs]
        self._batches = 0
        self._rows = [0] * len(langs)

    def _epoch(self, lang_index: int, epoch: int) -> tuple[np.ndarray, np.ndarray]:
        """Document order [docs_n] of one epoch and its start offsets in the epoch [docs_n + 1]."""
        cache = self._epoch_cache[lang_index]
        if epoch not in cache:
            lengths = self._lengths[lang_index]
            perm = np.random.default_rng([self.seed, lang_index, epoch]).permutation(len(lengths))
            cache[epoch] = perm, np.concatenate([[0], np.cumsum(lengths[perm])])
            if len(cache) > _EPOCH_CACHE:
                del cache[min(cache)]
        return cache[epoch]

    def _stream(self, lang_index: int, start: int, stop: int) -> tuple[np.ndarray, np.ndarray]:
        """Tokens [stop - start] of a language's stream and whether each begins a document."""
        docs = self._docs[lang_index]
        pos = np.arange(start, stop, dtype=np.int64)
        epoch_len = len(docs.tokens)
        epochs, within = pos // epoch_len, pos % epoch_len
        tokens = np.empty(len(pos), np.int32)
        starts = np.empty(len(pos), bool)
        for epoch in np.unique(epochs):
            sel = epochs == epoch
            perm, begins = self._epoch(lang_index, int(epoch))
            # side="right" skips empty documents, whose begin equals the next one's.
            rank = np.searchsorted(begins, within[sel], side="right") - 1
            into_doc = within[sel] - begins[rank]
            tokens[sel] = docs.tokens[docs.offsets[perm[rank]] + into_doc]
            starts[sel] = into_doc == 0
        return tokens, starts

    def next_batch(self) -> Batch:
        """The next Batch of int32 [batch_size, seq_len] rows; advances the state."""
        b, t = self.batch_size, self.seq_len
        rng = np.random.default_rng([self.seed, _ROWS_KEY, self._batches])
        lang_ids_b = rng.choice(len(self.langs), size=b, p=self._probs).astype(np.int32)
        ids_bt = np.empty((b, t), np.int32)
        starts_bt = np.empty((b, t), bool)
        for li in np.unique(lang_ids_b).tolist():
            rows = np.flatnonzero(lang_ids_b == li)
            first = self._rows[li]
            tokens, starts = self._stream(li, first * t, (first + len(rows)) * t)
            ids_bt[rows], starts_bt[rows] = tokens.reshape(-1, t), starts.reshape(-1, t)
            self._rows[li] += len(rows)
        self._batches += 1
        new_bt = starts_bt.copy()
        new_bt[:, 0] = True
        labels_bt = np.where(starts_bt & (np.arange(t) > 0), IGNORE_INDEX, ids_bt).astype(np.int32)
        segment_ids_bt = np.cumsum(new_bt, axis=1, dtype=np.int32)
        return Batch(input_ids=ids_bt, segment_ids=segment_ids_bt, position_ids=positions(segment_ids_bt),
                     labels=labels_bt, lang_ids=lang_ids_b)

    def state_dict(self) -> dict:
        """JSON-serialisable position: batches produced and rows consumed per language."""
        return {"version": STATE_VERSION, "seed": self.seed, "seq_len": self.seq_len, "langs": list(self.langs),
                "batches": self._batches, "rows": dict(zip(self.langs, self._rows, strict=True))}

    def load_state_dict(self, state: dict) -> None:
        """Resume from state_dict(); the seed, seq_len and languages (in order) must match this mixture."""
        if not isinstance(state, dict) or state.get("version") != STATE_VERSION:
            version = state.get("version") if isinstance(state, dict) else type(state).__name__
            raise DataError(f"data state version {version!r} is not {STATE_VERSION}; it was not written by this "
                            "Mixture.state_dict")
        for key, ours in (("langs", list(self.langs)), ("seed", self.seed), ("seq_len", self.seq_len)):
            if state.get(key) != ours:
                raise DataError(f"data state has {key} {state.get(key)!r} but this mixture has {ours!r}; resume "
                                f"with the same mixture, seed and seq_len, or start the data stream afresh")
        rows = state.get("rows")
        if not isinstance(rows, dict) or set(rows) != set(self.langs):
            raise DataError(f"data state rows {rows!r} must map each of {list(self.langs)} to a row count")
        batches = _count(state.get("batches"), "batches")
        self._rows = [_count(rows[lang], f"rows[{lang!r}]") for lang in self.langs]
        self._batches = batches
