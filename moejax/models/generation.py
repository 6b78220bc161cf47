"""Generation with caches: the prompts go through the model once (prefill) into a DecodeCache, then each new token
is one jitted call that donates the cache and gets it back updated.

Laid out as transformers' `generate` lays it out: prompts left-padded (an attention mask with zeros on the left),
RoPE positions counted over each row's tokens, the new tokens appended, a row that produced an end-of-sequence id
padded from then on, and generation stopping once every row has finished or after max_new_tokens. Choosing a token:
greedy (argmax), or sampled after the logits are divided by the temperature, cut to the top-k, then to the top-p
nucleus. Programs compile once per (batch, prompt bucket, cache bucket): prompts are left-padded to a multiple of
PROMPT_BUCKET columns and the cache holds a multiple of CACHE_BUCKET slots.
"""

from __future__ import annotations

import dataclasses
import functools
from collections.abc import Callable

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx, struct

from moejax.data.tokenize import check_ids
from moejax.errors import DataError
from moejax.models.steering import as_steering, with_steering
from moejax.parallel.mesh import on_mesh

PROMPT_BUCKET = 64
CACHE_BUCKET = 128


@struct.dataclass
class GenerateOutput:
    """sequences [batch, prompt + new] (numpy int32: the prompts as given, then the new tokens); with
    return_logits, logits [batch, new, vocab] (float32): the scores each new token was chosen from (before
    temperature, top-k and top-p)."""

    sequences: np.ndarray
    logits: np.ndarray | None = None


@dataclasses.dataclass(frozen=True)
class Sampler:
    """How the next token is chosen from the logits: greedy, or sampled (temperature, then top-k, then top-p)."""

    do_sample: bool = False
    temperature: float = 1.0
    top_k: int | None = None
    top_p: float | None = None

    def check(self) -> Sampler:
        if not self.temperature > 0:
            raise DataError(f"temperature must be > 0, got {self.temperature}")
        if self.top_k is not None and self.top_k < 1:
            raise DataError(f"top_k must be >= 1 (or None for no cut), got {self.top_k}")
        if self.top_p is not None and not 0 < self.top_p <= 1:
            raise DataError(f"top_p must be in (0, 1] (or None for no cut), got {self.top_p}")
        return self

    def allowed(self, logits_bv: jax.Array) -> jax.Array:
        """[batch, vocab] bool: the tokens sampling may pick, after temperature, top-k and top-p (tokens tied with
        the last one kept are kept too)."""
        scores_bv = logits_bv.astype(jnp.float32) / self.temperature
        keep_bv = jnp.ones(scores_bv.shape, bool)
        if self.top_k is not None and self.top_k < scores_bv.shape[-1]:
            kth_b1 = jax.lax.top_k(scores_bv, self.top_k)[0][:, -1:]
            keep_bv = scores_bv >= kth_b1
        if self.top_p is not None and self.top_p < 1:
            probs_bv = jax.nn.softmax(jnp.where(keep_bv, scores_bv, -jnp.inf), axis=-1)
            # The smallest set of most probable tokens whose probability reaches top_p.
            sorted_bv = -jnp.sort(-probs_bv, axis=-1)
            before_bv = jnp.cumsum(sorted_bv, axis=-1) - sorted_bv
            count_b = jnp.sum(before_bv < self.top_p, axis=-1)
            last_b1 = jnp.take_along_axis(sorted_bv, count_b[:, None] - 1, axis=-1)
            keep_bv &= probs_bv >= last_b1
        return keep_bv

    def __call__(self, logits_bv: jax.Array, key: jax.Array) -> jax.Array:
        """[batch] int32: the chosen tokens."""
        if not self.do_sample:
            return jnp.argmax(logits_bv, axis=-1).astype(jnp.int32)
        scores_bv = logits_bv.astype(jnp.float32) / self.temperature
        scores_bv = jnp.where(self.allowed(logits_bv), scores_bv, -jnp.inf)
        return jax.random.categorical(key, scores_bv, axis=-1).astype(jnp.int32)


def _round_up(n: int, multiple: int) -> int:
    return -(-n // multiple) * multiple


def _finish(token_b, finished_b, pad_id, eos_ids):
    """A finished row gets the pad id; a row finishes once it has produced an end-of-sequence id."""
    token_b = jnp.where(finished_b, pad_id, token_b)
    return token_b, finished_b | jnp.isin(token_b, eos_ids)


@functools.partial(jax.jit, static_argnums=(0, 5, 6))
def _prefill(graphdef, state, ids_bt, segment_ids_bt, positions_bt, length: int, sampler: Sampler, key, pad_id,
             eos_ids, control):
    model = nnx.merge(graphdef, state)
    out = model.forward(ids_bt, segment_ids_bt, positions_bt, False, control=control,
                        cache=model.init_cache(ids_bt.shape[0], length))
    logits_bv = out.logits[:, -1].astype(jnp.float32)
    token_b, finished_b = _finish(sampler(logits_bv, jax.random.fold_in(key, 0)),
                                  jnp.zeros(ids_bt.shape[0], bool), pad_id, eos_ids)
    return token_b, finished_b, logits_bv, out.cache


@functools.partial(jax.jit, static_argnums=(0, 6), donate_argnums=(2,))
def _decode(graphdef, state, cache, token_b, position_b, finished_b, sampler: Sampler, key, step, pad_id, eos_ids,
            control):
    model = nnx.merge(graphdef, state)
    segment_ids_b1 = jnp.ones((token_b.shape[0], 1), jnp.int32)
    out = model.forward(token_b[:, None], segment_ids_b1, position_b[:, None], False, control=control, cache=cache)
    logits_bv = out.logits[:, 0].astype(jnp.float32)
    token_b, finished_b = _finish(sampler(logits_bv, jax.random.fold_in(key, step)), finished_b, pad_id, eos_ids)
    return token_b, finished_b, logits_bv, out.cache


def _eos_list(eos_token_id) -> list[int]:
    if eos_token_id is None:
        return []
    return [int(eos_token_id)] if np.ndim(eos_token_id) == 0 else [int(e) for e in eos_token_id]


def generate(model, input_ids, attention_mask=None, *, max_new_tokens: int, do_sample: bool = False,
             temperature: float = 1.0, top_k: int | None = None, top_p: float | None = None, seed: int = 0,
             eos_token_id: int | list[int] | None = None, pad_token_id: int | None = None,
             stop: Callable[[np.ndarray], np.ndarray] | None = None, return_logits: bool = False,
             steering=None, on_token: Callable[[np.ndarray], None] | None = None) -> GenerateOutput:
    """Continues each prompt of input_ids [batch, prompt] (left-padded where attention_mask [batch, prompt] is 0:
    transformers' name for what is here the segment ids of one document per row, 1 = a prompt token)
    by up to max_new_tokens tokens; greedy unless do_sample. eos_token_id (one id or several): a row stops there
    and is padded with pad_token_id (default: the first end-of-sequence id, else 0).
    stop: a stopping criterion, as transformers' StoppingCriteria: given the new tokens so far [batch, n], the rows
    that are done; generation ends once every row is done or has ended, and, as transformers does, a done row is
    padded from then on only when eos_token_id is set. Sampling is reproducible from `seed`. steering: a
    moejax.Steering (or its dict, or a JSON path) applied at every MoE layer, prompt and new tokens alike.
    on_token: called with each new token of every row [batch] as soon as it is computed (streaming; this brings
    each token to the host, one sync per token, which the default path avoids). On a mesh when the model's
    parameters are."""
    ids_bt = np.asarray(input_ids)
    if ids_bt.ndim != 2 or ids_bt.shape[1] == 0:
        raise DataError(f"input_ids must be [batch, prompt] with at least one token, got shape {ids_bt.shape}")
    mask_bt = np.ones(ids_bt.shape, np.int32) if attention_mask is None else np.asarray(attention_mask, np.int32)
    if mask_bt.shape != ids_bt.shape:
        raise DataError(f"attention_mask shape {mask_bt.shape} != input_ids shape {ids_bt.shape}")
    if isinstance(max_new_tokens, bool) or not isinstance(max_new_tokens, int | np.integer) or max_new_tokens < 1:
        raise DataError(f"max_new_tokens must be an integer >= 1, got {max_new_tokens!r}")
    empty = np.flatnonzero(mask_bt.sum(axis=1) == 0)
    if len(empty):
        raise DataError(f"prompt {int(empty[0])} has no tokens (its attention mask is all zeros)")
    right = np.flatnonzero((np.diff(mask_bt, axis=1) < 0).any(axis=1))
    if len(right):
        raise DataError(f"prompt {int(right[0])} is padded on the right; generation needs left padding "
                        "(a tokenizer's padding_side='left')")
    cfg = model.config
    check_ids(np.where(mask_bt != 0, ids_bt, 0), cfg.vocab_size, "input_ids")
    batch, prompt = ids_bt.shape
    longest = int(mask_bt.sum(axis=1).max())
    if cfg.max_positions is not None and longest + max_new_tokens > cfg.max_positions:
        raise DataError(f"a prompt of {longest} tokens plus max_new_tokens={max_new_tokens} exceeds the model's "
                        f"{cfg.max_positions} positions (max_position_embeddings); shorten the prompt or ask for "
                        f"at most {max(cfg.max_positions - longest, 0)} new tokens")
    control = with_steering(None, as_steering(steering), cfg)
    sampler = Sampler(do_sample, float(temperature), top_k, top_p).check() if do_sample else Sampler()
    eos = _eos_list(eos_token_id)
    if pad_token_id is None:
        pad_token_id = (eos or [0])[0]

    # Left-pad to the prompt bucket: extra masked columns change no token's result.
    columns = _round_up(prompt, PROMPT_BUCKET)
    extra = columns - prompt
    ids_in = np.pad(np.where(mask_bt != 0, ids_bt, 0), ((0, 0), (extra, 0))).astype(np.int32)
    mask_in = np.pad(mask_bt, ((0, 0), (extra, 0)))
    positions_in = np.maximum(np.cumsum(mask_in, axis=1) - 1, 0).astype(np.int32)
    length = _round_up(columns + max_new_tokens, CACHE_BUCKET)
    eos_ids = jnp.asarray(eos or [-1], jnp.int32)
    pad_id = jnp.int32(pad_token_id)
    key = jax.random.key(seed)

    graphdef, state = nnx.split(model)
    tokens, logits = [], []
    with on_mesh(state) as place:
        token_b, finished_b, logits_bv, cache = _prefill(graphdef, state, *place(ids_in, mask_in, positions_in),
                                                         length, sampler, key, pad_id, eos_ids, control)
        position_b = jnp.asarray(mask_bt.sum(axis=1), jnp.int32)
        done_b = np.zeros(batch, bool)
        for step in range(1, max_new_tokens + 1):
            tokens.append(token_b)
            if on_token is not None:
                on_token(np.asarray(jax.device_get(token_b)))
            if return_logits:
                logits.append(logits_bv)
            if step == max_new_tokens:
                break
            if stop is not None:
                done_b |= np.asarray(stop(np.stack(jax.device_get(tokens), axis=1)), bool)
                if eos:
                    finished_b = finished_b | jnp.asarray(done_b)
            if (eos or stop is not None) and (done_b | np.asarray(jax.device_get(finished_b))).all():
                break
            token_b, finished_b, logits_bv, cache = _decode(graphdef, state, cache, token_b, position_b, finished_b,
                                                            sampler, key, step, pad_id, eos_ids, control)
            position_b = position_b + 1
    new_bn = np.stack(jax.device_get(tokens), axis=1).astype(ids_bt.dtype)
    return GenerateOutput(sequences=np.concatenate([ids_bt, new_bn], axis=1),
                          logits=np.stack(jax.device_get(logits), axis=1) if return_logits else None)
