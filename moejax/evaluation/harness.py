"""moejax as an lm-evaluation-harness model: `lm_eval --model moejax --model_args pretrained=DIR,dtype=bfloat16` and
`moejax eval`.

It answers requests as lm-eval's Hugging Face backend (`--model hf`) does, with lm-eval's own helpers for the parts
that decide the numbers: the same tokenization (BOS handling included), the same left truncation to max_length, the
same rolling windows for loglikelihood_rolling, the same stop sequences and end-of-text handling for generate_until.
Only the model underneath differs:
- loglikelihood: each context runs once however many continuations share it (a multiple-choice question's
  answers). For a model whose layers read a tree (`CausalLM.reads_branches`) a context and its continuations are one
  document laid out as a tree, each continuation seeing the context and itself only, in packed rows of one width
  (moejax's segment ids: a document sees only itself, as if alone). For one that cannot (Mamba-2 layers, a sliding
  window) the contexts run into a generation cache, longest first, and each continuation continues from its
  context's cache row (Mamba-2 state, convolution window, keys and values), as decoding does. Identical inputs run
  once, and only the asked tokens' log-probabilities and whether each is the argmax leave the device;
- generate_until: model.generate with its caches, batch_size prompts at a time.
"""

from __future__ import annotations

import dataclasses
import functools
import json
import logging
import types
from collections import defaultdict
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx
from lm_eval import utils as lm_utils
from lm_eval.api.model import TemplateLM
from lm_eval.api.registry import register_model
from lm_eval.models.utils import (
    configure_pad_token,
    handle_stop_sequences,
    has_bos_prefix,
    normalize_gen_kwargs,
    postprocess_generated_text,
    resolve_max_length,
)
from tqdm import tqdm

from moejax.config import read_config_json
from moejax.data.packing import BUCKETS, bucket, pack, passes
from moejax.data.tokenize import byte_level_tokenizer, transformers_tokenizer
from moejax.errors import ConfigError, DataError
from moejax.loading import generation_defaults
from moejax.models.builtin import NAME as BUILTIN
from moejax.models.steering import as_steering, with_steering
from moejax.opening import model_files, open_model, parameter_dtype
from moejax.parallel.mesh import make_mesh, on_mesh

log = logging.getLogger(__name__)

DEFAULT_BATCH_SIZE = 8  # packed rows (or prompts, when generating) per forward pass
DEFAULT_MAX_LENGTH = 2048  # as lm-eval's Hugging Face backend, when neither config nor tokenizer says


def _asked_log_probs(logits_btv, tokens_btx):
    """log softmax(logits)[tokens] at each position [b, t, x] (each asked logit less its position's logsumexp: no
    [b, t, vocab] log_softmax result) and the argmax token [b, t]."""
    logits_btv = logits_btv.astype(jnp.float32)
    logz_bt1 = jax.nn.logsumexp(logits_btv, axis=-1, keepdims=True)
    return jnp.take_along_axis(logits_btv, tokens_btx, axis=-1) - logz_bt1, jnp.argmax(logits_btv, axis=-1)


@functools.partial(jax.jit, static_argnums=(0,))
def _score(graphdef, state, ids_bt, segment_ids_bt, positions_bt, targets_bt, last_bt, extra_btx, control,
           branch_ids_bt=None):
    """Per position t: the log-probability of targets_bt[t] and the argmax token; at the positions where last_bt is
    set, the log-probabilities of the extra_btx tokens too (the tokens several continuations ask for there).
    branch_ids_bt: documents laid out as trees (CausalLM.forward)."""
    logits_btv = nnx.merge(graphdef, state).forward(ids_bt, segment_ids_bt, positions_bt, False, control=control,
                                                    branch_ids_bt=branch_ids_bt).logits
    logp_bt1x, greedy_bt = _asked_log_probs(logits_btv, jnp.concatenate([targets_bt[..., None], extra_btx], axis=-1))
    return logp_bt1x[..., 0], greedy_bt, jnp.where(last_bt[..., None], logp_bt1x[..., 1:], 0.0)


@functools.partial(jax.jit, static_argnums=(0, 5))
def _prefill_contexts(graphdef, state, ids_bt, segment_ids_bt, positions_bt, length: int, asked_bx, control):
    """Contexts (left-padded rows) into a generation cache of `length` slots -> (the cache, the log-probabilities of
    the asked_bx tokens after each context [b, x], whether each is the argmax [b, x])."""
    model = nnx.merge(graphdef, state)
    out = model.forward(ids_bt, segment_ids_bt, positions_bt, False, control=control,
                        cache=model.init_cache(ids_bt.shape[0], length), last_logits=True)
    logp_b1x, greedy_b1 = _asked_log_probs(out.logits, asked_bx[:, None])
    return out.cache, logp_b1x[:, 0], asked_bx == greedy_b1


@functools.partial(jax.jit, static_argnums=(0,))
def _continue_contexts(graphdef, state, cache, context_r, ids_rt, segment_ids_rt, positions_rt, asked_rtx, control):
    """Continuations (right-padded rows), row r after the context in cache row context_r[r] -> the log-probabilities
    of the asked_rtx tokens at each position [r, t, x] and whether each is the argmax [r, t, x]."""
    out = nnx.merge(graphdef, state).forward(ids_rt, segment_ids_rt, positions_rt, False, control=control,
                                             cache=cache.rows(context_r))
    logp_rtx, greedy_rt = _asked_log_probs(out.logits, asked_rtx)
    return logp_rtx, asked_rtx == greedy_rt[..., None]


@dataclasses.dataclass
class _Segment:
    """One packed segment of loglikelihood inputs: its tokens, their branch ids (0: the shared trunk) and positions,
    and per column the tokens asked for as the next token there (sorted)."""

    tokens: list[int]
    branches: list[int]
    positions: list[int]
    asked: dict[int, list[int]]


def _segments(trees: dict[tuple[int, ...], dict[tuple[int, ...], set[int]]]):
    """Loglikelihood inputs grouped by context, laid out as trees -> (segments, where).

    trees: {trunk: {branch: last tokens}}: a request's model input is its context (the trunk) and its continuation's
    tokens but the last (a branch, possibly empty), and it asks for each continuation token after the token before it.
    A segment per trunk holds it once and each of its branches after it. where: {(trunk, branch): the (segment,
    column) that predicts each continuation token}.
    """
    segments, where = [], {}
    for trunk, branches in trees.items():
        end, index = len(trunk) - 1, len(segments)
        segment = _Segment(list(trunk), [0] * len(trunk), list(range(len(trunk))), {})
        segments.append(segment)
        for branch, lasts in branches.items():
            if not branch:
                continue
            start = len(segment.tokens)
            segment.tokens += branch
            segment.branches += [segment.branches[-1] + 1] * len(branch)
            segment.positions += range(len(trunk), len(trunk) + len(branch))
            segment.asked.update(_branch_asks(branch, lasts, start))
            where[trunk, branch] = [(index, end)] + [(index, start + i) for i in range(len(branch))]
        # The trunk's last position predicts every continuation's first token, once.
        segment.asked[end] = _first_asks(branches)
        if () in branches:
            where[trunk, ()] = [(index, end)]
    return segments, where


def _first_asks(branches: dict[tuple[int, ...], set[int]]) -> list[int]:
    """The tokens asked after a trunk: every continuation's first (a branch's first, or a one-token continuation)."""
    return sorted({branch[0] for branch in branches if branch} | branches.get((), set()))


def _branch_asks(branch: tuple[int, ...], lasts: set[int], start: int = 0) -> dict[int, list[int]]:
    """{column: the tokens asked there} along a branch placed at `start`: each of its tokens predicts the next, its
    last predicts every last token of the continuations that end after it."""
    return {start + i: [branch[i + 1]] if i + 1 < len(branch) else sorted(lasts) for i in range(len(branch))}


def _short_bucket(length: int) -> int:
    """Continuation rows' width: powers of two from 8 up to packing's first bucket, then packing's buckets."""
    return max(8, 1 << (length - 1).bit_length()) if length <= BUCKETS[0] else bucket(length)


@register_model("moejax")
class MoejaxLM(TemplateLM):
    """An lm-eval model over a moejax model.

    pretrained: a Hugging Face checkpoint directory or an Orbax directory from `moejax convert` (with its tokenizer
    files), or "builtin" (the built-in demonstration model, byte-level). dtype: float32, bfloat16, float16 or auto
    (the checkpoint's). batch_size: packed rows of loglikelihood requests, or prompts being generated, per forward
    pass. max_length: the context lm-eval truncates to (default: as lm-eval's Hugging Face backend resolves it).
    mesh: e.g. "data=2,expert=4". steering: a steering spec (a JSON file path, a dict or a moejax.Steering) applied
    to every request. add_bos_token / prefix_token_id: as lm-eval's Hugging Face backend. Other keyword arguments
    are moejax config overrides (e.g. dt_floor=time_step_min for Nemotron-H, as transformers computes it).
    """

    def __init__(self, pretrained: str = BUILTIN, dtype: str = "float32", batch_size: int | str = DEFAULT_BATCH_SIZE,
                 max_length: int | None = None, max_gen_toks: int = 256, add_bos_token: bool | None = None,
                 prefix_token_id: int | None = None, mesh: str | None = None, allow_nonfinite: bool = False,
                 steering=None, device: str | None = None, max_batch_size: int | None = None, **config_overrides):
        super().__init__()
        del device, max_batch_size  # lm-eval passes them to every model; the mesh decides where moejax runs
        builtin = str(pretrained) in (BUILTIN, "builtin")
        model_dir = None if builtin else Path(pretrained)
        files = None if builtin else model_files(model_dir)
        mesh = make_mesh(mesh) if mesh else None
        if builtin:
            self.model = open_model(None, mesh=mesh).model
            self.tokenizer = byte_level_tokenizer()
            declared = types.SimpleNamespace(max_position_embeddings=self.model.config.max_positions)
        else:
            config = read_config_json(files / "config.json")
            self.model = open_model(model_dir, parameter_dtype(str(dtype), config), mesh, allow_nonfinite,
                                    **config_overrides).model
            self.tokenizer = transformers_tokenizer(files, **({} if add_bos_token is None else
                                                              {"add_bos_token": add_bos_token}))
            declared = types.SimpleNamespace(**config)
        self.tokenizer = configure_pad_token(self.tokenizer, model_config=declared)
        self.name = BUILTIN if builtin else str(model_dir)
        self.add_bos_token = add_bos_token
        self.custom_prefix_token_id = prefix_token_id
        self._max_length = int(max_length) if max_length else resolve_max_length(declared, self.tokenizer,
                                                                                 default=DEFAULT_MAX_LENGTH)
        self._max_gen_toks = int(max_gen_toks)
        self.batch_size = _batch_size(batch_size)
        self.steering = as_steering(steering)
        self._control = with_steering(None, self.steering, self.model.config)  # checks it against the model
        # What transformers' generate stops at (and pads after), as lm-eval's Hugging Face backend runs it.
        self.eos_ids = [self.tokenizer.eos_token_id] if builtin else generation_defaults(files)
        vocab = self.model.config.vocab_size
        if len(self.tokenizer) > vocab:
            raise DataError(f"{pretrained}: its tokenizer has {len(self.tokenizer)} tokens but the model's vocabulary "
                            f"only {vocab}: the tokenizer and the model do not belong together")

    # -- what lm-eval asks of a model -----------------------------------------------------------------------------
    @property
    def eot_token_id(self) -> int:
        return self.tokenizer.eos_token_id

    @property
    def prefix_token_id(self) -> int:
        if self.custom_prefix_token_id is not None:
            return self.custom_prefix_token_id
        if self.tokenizer.bos_token_id is not None:
            return self.tokenizer.bos_token_id
        return self.tokenizer.eos_token_id

    @property
    def max_length(self) -> int:
        return self._max_length

    @property
    def max_gen_toks(self) -> int:
        return self._max_gen_toks

    @property
    def tokenizer_name(self) -> str:
        return self.name.replace("/", "__")

    def tok_encode(self, string: str, add_special_tokens: bool | None = None, left_truncate_len: int | None = None,
                   **kwargs) -> list[int]:
        if add_special_tokens is not None:
            special = {"add_special_tokens": add_special_tokens}
        elif has_bos_prefix(string, self.tokenizer.decode(self.prefix_token_id)):
            special = {"add_special_tokens": False}
        elif self.add_bos_token is not None:
            special = {"add_special_tokens": self.add_bos_token}
        else:
            special = {}
        encoding = self.tokenizer.encode(string, **special)
        return encoding[-left_truncate_len:] if left_truncate_len else encoding

    def tok_decode(self, tokens, skip_special_tokens: bool = True) -> str:
        return self.tokenizer.decode(tokens, skip_special_tokens=skip_special_tokens)

    def apply_chat_template(self, chat_history: list[dict[str, str]], add_generation_prompt: bool = True) -> str:
        return self.tokenizer.apply_chat_template(chat_history, tokenize=False,
                                                  add_generation_prompt=add_generation_prompt,
                                                  continue_final_message=not add_generation_prompt)

    def _loglikelihood_tokens(self, requests, disable_tqdm: bool = False, **kwargs) -> list[tuple[float, bool]]:
        """(log P(continuation | context), whether greedy decoding reproduces it) per request, from token ids."""
        trees = defaultdict(lambda: defaultdict(set))  # {context: {continuation but its last token: last tokens}}
        asked = []
        for _, context_enc, continuation_enc in requests:
            if not continuation_enc or not context_enc:
                raise DataError("a loglikelihood request has an empty context or continuation after tokenizing")
            # As lm-eval's Hugging Face backend: the last max_length tokens of the input (the whole but its last).
            whole = (context_enc + continuation_enc)[-(self.max_length + 1):]
            n = len(continuation_enc)
            if n >= len(whole):
                raise DataError(f"a loglikelihood request's continuation of {n} tokens leaves no context within "
                                f"max_length={self.max_length}")
            trunk, continuation = tuple(whole[:-n]), tuple(whole[-n:])
            trees[trunk][continuation[:-1]].add(continuation[-1])
            asked.append((trunk, continuation))
        if self.model.reads_branches:
            segments, where = _segments(trees)
            scored = self._score_segments(segments, disable_tqdm)
            per_token = {key: [scored[at] for at in ats] for key, ats in where.items()}
        else:
            per_token = self._score_from_contexts(trees, disable_tqdm)
        results = []
        for trunk, continuation in asked:
            logps, greedy = zip(*(scores[token] for scores, token in zip(per_token[trunk, continuation[:-1]],
                                                                         continuation, strict=True)), strict=True)
            results.append((float(np.sum(logps, dtype=np.float64)), all(greedy)))
        return results

    def _score_segments(self, segments: list[_Segment], disable_tqdm: bool) -> dict:
        """{(segment, column): {asked token: (its log-probability, whether it is the argmax)}}, the segments (trees)
        packed into rows of one width, batch_size rows per forward pass."""
        layout = pack([len(s.tokens) for s in segments])
        extra = 1 << (max(len(t) for s in segments for t in s.asked.values()) - 1).bit_length()
        graphdef, state = nnx.split(self.model)
        out = {}
        bar = tqdm(total=len(segments), desc="moejax loglikelihood", disable=disable_tqdm)
        with on_mesh(state) as place:
            for rows, size in passes(layout.rows, self.batch_size):
                ids, segment_ids, branch_ids, positions, targets = (np.zeros((size, layout.width), np.int32)
                                                                    for _ in range(5))
                last = np.zeros((size, layout.width), bool)
                extras = np.zeros((size, layout.width, extra), np.int32)
                for r, row in enumerate(rows):
                    for slot, (i, at) in enumerate(row):
                        segment = segments[i]
                        n = len(segment.tokens)
                        ids[r, at:at + n], segment_ids[r, at:at + n] = segment.tokens, slot + 1
                        branch_ids[r, at:at + n], positions[r, at:at + n] = segment.branches, segment.positions
                        for column, tokens in segment.asked.items():
                            targets[r, at + column] = tokens[0]
                            if len(tokens) > 1:
                                last[r, at + column] = True
                                extras[r, at + column, :len(tokens)] = tokens
                arrays = place(ids, segment_ids, positions, targets, last, extras)
                target_logp, greedy, extra_logp = jax.device_get(_score(graphdef, state, *arrays, self._control,
                                                                        *place(branch_ids)))
                for r, row in enumerate(rows):
                    for i, at in row:
                        for column, tokens in segments[i].asked.items():
                            t = at + column
                            logps = extra_logp[r, t, :len(tokens)] if len(tokens) > 1 else target_logp[r, t, None]
                            out[i, column] = {token: (float(logp), token == int(greedy[r, t]))
                                              for token, logp in zip(tokens, logps, strict=True)}
                bar.update(sum(len(row) for row in rows))
        bar.close()
        return out

    def _score_from_contexts(self, trees: dict[tuple[int, ...], dict[tuple[int, ...], set[int]]],
                             disable_tqdm: bool) -> dict:
        """{(trunk, branch): per continuation token, {asked token: (its log-probability, whether it is the
        argmax)}}, for a model that cannot read a tree (Mamba-2 layers, a sliding window): each context runs once,
        batch_size contexts (longest first, left-padded) into a generation cache, and every continuation of it
        continues from its row of that cache, batch_size continuations (right-padded) per forward pass."""
        trunks = sorted(trees, key=len, reverse=True)
        firsts = {trunk: _first_asks(trees[trunk]) for trunk in trunks}
        first_width = 1 << (max(map(len, firsts.values())) - 1).bit_length()
        later_width = 1 << (max((len(lasts) for b in trees.values() for lasts in b.values()), default=1)
                            - 1).bit_length()
        graphdef, state = nnx.split(self.model)
        out = {}
        bar = tqdm(total=len(trunks), desc="moejax loglikelihood", disable=disable_tqdm)
        with on_mesh(state) as place:
            for batch, rows in passes(trunks, self.batch_size):
                width = bucket(len(batch[0]))
                ids, segment_ids, positions = (np.zeros((rows, width), np.int32) for _ in range(3))
                asked = np.zeros((rows, first_width), np.int32)
                for r, trunk in enumerate(batch):
                    n = len(trunk)
                    ids[r, width - n:], segment_ids[r, width - n:], positions[r, width - n:] = trunk, 1, range(n)
                    asked[r, :len(firsts[trunk])] = firsts[trunk]
                pairs = sorted(((r, branch) for r, trunk in enumerate(batch) for branch in trees[trunk] if branch),
                               key=lambda pair: -len(pair[1]))
                room = _short_bucket(len(pairs[0][1])) if pairs else 0
                cache, logp, greedy = _prefill_contexts(graphdef, state, *place(ids, segment_ids, positions),
                                                        width + room, *place(asked), self._control)
                for r, trunk in enumerate(batch):
                    logp_r, greedy_r = np.asarray(logp[r]), np.asarray(greedy[r])
                    first = {token: (float(logp_r[x]), bool(greedy_r[x])) for x, token in enumerate(firsts[trunk])}
                    out.update({(trunk, branch): [first] for branch in trees[trunk]})
                for chunk, chunk_rows in passes(pairs, self.batch_size):
                    self._continue_pass(graphdef, state, place, cache, batch, trees, chunk, chunk_rows, later_width,
                                        out)
                bar.update(len(batch))
        bar.close()
        return out

    def _continue_pass(self, graphdef, state, place, cache, batch, trees, pairs, rows: int, asked_width: int,
                       out: dict) -> None:
        """One forward pass (`rows` rows) of continuations from their contexts' cache rows; each (trunk, branch) in
        `pairs` (its context's row, its branch) gets its per-token scores appended in `out`."""
        width = _short_bucket(len(pairs[0][1]))
        context, ids, segment_ids, positions = (np.zeros(shape, np.int32) for shape in
                                                ((rows,), (rows, width), (rows, width), (rows, width)))
        asked = np.zeros((rows, width, asked_width), np.int32)
        asks = [_branch_asks(branch, trees[batch[r]][branch]) for r, branch in pairs]
        for row, (r, branch) in enumerate(pairs):
            n = len(branch)
            context[row], ids[row, :n], segment_ids[row, :n] = r, branch, 1
            positions[row, :n] = range(len(batch[r]), len(batch[r]) + n)
            for column, tokens in asks[row].items():
                asked[row, column, :len(tokens)] = tokens
        logp, greedy = jax.device_get(_continue_contexts(graphdef, state, cache, *place(context, ids, segment_ids,
                                                                                          positions, asked),
                                                         self._control))
        for row, (r, branch) in enumerate(pairs):
            out[batch[r], branch] += [{token: (float(logp[row, column, x]), bool(greedy[row, column, x]))
                                       for x, token in enumerate(asks[row][column])} for column in range(len(branch))]

    def loglikelihood_rolling(self, requests, disable_tqdm: bool = False) -> list[float]:
        """lm-eval's rolling windows (as its Hugging Face backend cuts them), scored as loglikelihood requests."""
        windows, owners = [], []
        for owner, (string,) in enumerate(req.args for req in requests):
            for context, continuation in map(lm_utils.make_disjoint_window, lm_utils.get_rolling_token_windows(
                    token_list=self.tok_encode(string), prefix_token=self.prefix_token_id,
                    max_seq_len=self.max_length, context_len=1)):
                windows.append((None, context, continuation))
                owners.append(owner)
        totals = np.zeros(len(requests))
        for owner, (logp, _) in zip(owners, self._loglikelihood_tokens(windows, disable_tqdm), strict=True):
            totals[owner] += logp
        for req, total in zip(requests, totals, strict=True):
            self.cache_hook.add_partial("loglikelihood_rolling", req.args, float(total))
        return [float(t) for t in totals]

    def generate_until(self, requests, disable_tqdm: bool = False) -> list[str]:
        """Greedy (or sampled) continuations cut at the first stop sequence, prompts grouped by their generation
        settings, batch_size at a time."""
        results: list[str | None] = [None] * len(requests)
        groups = defaultdict(list)
        for index, (context, gen_kwargs) in enumerate(req.args for req in requests):
            groups[json.dumps(gen_kwargs, sort_keys=True, default=str)].append((index, context, gen_kwargs))
        eos_text = self.tok_decode(self.eot_token_id, skip_special_tokens=False)
        bar = tqdm(total=len(requests), desc="moejax generate_until", disable=disable_tqdm)
        for members in groups.values():
            kwargs = normalize_gen_kwargs(members[0][2], self.max_gen_toks)
            until = handle_stop_sequences(kwargs.pop("until", None), eos=eos_text)
            max_gen_toks = kwargs.pop("max_gen_toks")
            max_context = self.max_length - max_gen_toks
            if max_context <= 0:
                raise DataError(f"max_gen_toks={max_gen_toks} leaves no room for a prompt within max_length="
                                f"{self.max_length}")
            sampling = _sampling(kwargs)
            # Longest first, as lm-eval orders them.
            members.sort(key=lambda m: -len(self.tok_encode(m[1])))
            for start in range(0, len(members), self.batch_size):
                chunk = members[start:start + self.batch_size]
                texts = self._generate([m[1] for m in chunk], max_context, max_gen_toks, until, sampling)
                for (index, context, gen_kwargs), text in zip(chunk, texts, strict=True):
                    results[index] = text
                    self.cache_hook.add_partial("generate_until", (context, gen_kwargs), text)
                bar.update(len(chunk))
        bar.close()
        return results

    def _generate(self, contexts: list[str], max_context: int, max_new: int, until: list[str],
                  sampling: dict) -> list[str]:
        """One batch of prompts, encoded as lm-eval's Hugging Face backend encodes a batch (BOS rule of the first
        prompt, left truncation), padded to batch_size rows so that batches share compiled programs."""
        if has_bos_prefix(contexts[0], getattr(self.tokenizer, "bos_token", None)):
            special = {"add_special_tokens": False}
        elif self.add_bos_token is not None:
            special = {"add_special_tokens": self.add_bos_token}
        else:
            special = {}
        encoded = [self.tokenizer.encode(c, **special)[-max_context:] for c in contexts]
        rows = max(self.batch_size, len(encoded))
        width = max(len(e) for e in encoded)
        ids = np.full((rows, width), self.tokenizer.pad_token_id, np.int64)
        mask = np.zeros((rows, width), np.int64)
        for r in range(rows):
            tokens = encoded[r] if r < len(encoded) else encoded[0]  # filler rows repeat the first prompt
            ids[r, width - len(tokens):], mask[r, width - len(tokens):] = tokens, 1

        def stop(new_bn):
            texts = self.tokenizer.batch_decode(new_bn, skip_special_tokens=False)
            return np.array([any(s in text for s in until if s) for text in texts])

        out = self.model.generate(ids, mask, max_new_tokens=max_new, eos_token_id=self.eos_ids or None,
                                  pad_token_id=self.tokenizer.pad_token_id, stop=stop, steering=self.steering,
                                  **sampling)
        new = out.sequences[:len(contexts), width:]
        return [postprocess_generated_text(self.tok_decode(row.tolist()), until, None) for row in new]


def _sampling(kwargs: dict) -> dict:
    """model.generate's sampling options from lm-eval's normalized generation kwargs (temperature 0 or do_sample
    false: greedy)."""
    do_sample = bool(kwargs.pop("do_sample", False))
    temperature = float(kwargs.pop("temperature", 0.0) or 0.0)
    top_k, top_p = kwargs.pop("top_k", None), kwargs.pop("top_p", None)
    ignored = sorted(set(kwargs) - {"seed"})
    if ignored:
        log.warning("moejax generate_until ignores the generation settings %s", ignored)
    if not do_sample or temperature == 0.0:
        return {}
    return {"do_sample": True, "temperature": temperature, "top_k": None if top_k is None else int(top_k),
            "top_p": None if top_p is None else float(top_p), "seed": int(kwargs.get("seed", 0) or 0)}


def _batch_size(value) -> int:
    text = str(value)
    if text.startswith("auto"):
        log.warning("batch_size=%s: moejax does not search for a batch size; using %d", text, DEFAULT_BATCH_SIZE)
        return DEFAULT_BATCH_SIZE
    if not text.isdigit() or int(text) < 1:
        raise ConfigError(f"batch_size must be a positive integer, got {value!r}")
    return int(text)
