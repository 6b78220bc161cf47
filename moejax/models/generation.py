"""Generation with caches: the prompts go through the model once (prefill) into a DecodeCache, then the new tokens
come from one compiled loop on the device (`lax.while_loop`), each step feeding the token it chose to the next with
the cache updated in place.

Laid out as transformers' `generate` lays it out: prompts left-padded (an attention mask with zeros on the left),
RoPE positions counted over each row's tokens, the new tokens appended, a row that produced an end-of-sequence id
padded from then on, and generation stopping once every row has finished or after max_new_tokens. Choosing a token:
greedy (argmax), or sampled after the logits are divided by the temperature, cut to the top-k, then to the top-p
nucleus. Programs compile once per (batch, prompt bucket, cache bucket), whatever the number of new tokens: prompts
are left-padded to a multiple of PROMPT_BUCKET columns, the cache holds a multiple of CACHE_BUCKET slots, and the loop
takes its number of steps as data. Without a callback (on_token, stop) nothing comes back to the host until the loop
ends; with one, the loop runs one step per call and each token comes back as it is made.
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


@struct.dataclass
class _Decoding:
    """What the decode loop carries from step to step: the cache, the last chosen token [batch], its position
    [batch], which rows have finished [batch], the new tokens so far tokens_bn [batch, room] (the first `made`
    columns filled) and, when kept, the logits each was chosen from logits_bnv [batch, room, vocab]."""

    cache: object
    token_b: jax.Array
    position_b: jax.Array
    finished_b: jax.Array
    tokens_bn: jax.Array
    logits_bnv: jax.Array | None
    made: jax.Array


@functools.partial(jax.jit, static_argnums=(0, 5, 6, 7))
def _prefill(graphdef, state, ids_bt, segment_ids_bt, positions_bt, length: int, sampler: Sampler, keep_logits: bool,
             key, pad_id, eos_ids, control) -> _Decoding:
    """The prompts into a cache of `length` slots, and the first new token chosen from the last position's logits
    (the only ones computed)."""
    model = nnx.merge(graphdef, state)
    batch, columns = ids_bt.shape
    out = model.forward(ids_bt, segment_ids_bt, positions_bt, False, control=control,
                        cache=model.init_cache(batch, length), last_logits=True)
    logits_bv = out.logits[:, -1].astype(jnp.float32)
    token_b, finished_b = _finish(sampler(logits_bv, jax.random.fold_in(key, 0)), jnp.zeros(batch, bool), pad_id,
                                  eos_ids)
    room = length - columns  # every new token has a cache slot, so no more than this many are ever asked for
    tokens_bn = jnp.zeros((batch, room), jnp.int32).at[:, 0].set(token_b)
    logits_bnv = (jnp.zeros((batch, room, logits_bv.shape[-1]), jnp.float32).at[:, 0].set(logits_bv)
                  if keep_logits else None)
    return _Decoding(out.cache, token_b, positions_bt[:, -1] + 1, finished_b, tokens_bn, logits_bnv, jnp.int32(1))


@functools.partial(jax.jit, static_argnums=(0, 4), donate_argnums=(2,))
def _decode(graphdef, state, carry: _Decoding, limit, sampler: Sampler, key, pad_id, eos_ids, control) -> _Decoding:
    """Decode steps until `limit` new tokens are made or every row has finished, all on the device."""
    model = nnx.merge(graphdef, state)
    segment_ids_b1 = jnp.ones((carry.token_b.shape[0], 1), jnp.int32)

    def running(c: _Decoding):
        return (c.made < limit) & ~jnp.all(c.finished_b)

    def step(c: _Decoding) -> _Decoding:
        out = model.forward(c.token_b[:, None], segment_ids_b1, c.position_b[:, None], False, control=control,
                            cache=c.cache)
        logits_bv = out.logits[:, 0].astype(jnp.float32)
        token_b, finished_b = _finish(sampler(logits_bv, jax.random.fold_in(key, c.made)), c.finished_b, pad_id,
                                      eos_ids)
        tokens_bn = jax.lax.dynamic_update_slice(c.tokens_bn, token_b[:, None], (0, c.made))
        logits_bnv = (None if c.logits_bnv is None
                      else jax.lax.dynamic_update_slice(c.logits_bnv, logits_bv[:, None], (0, c.made, 0)))
        return _Decoding(out.cache, token_b, c.position_b + 1, finished_b, tokens_bn, logits_bnv, c.made + 1)

    return jax.lax.while_loop(running, step, carry)


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
    on_token: called with each new token of every row [batch] as soon as it is computed (streaming: the loop then
    stops after every token to bring it to the host, which the default path, one loop on the device, avoids; `stop`
    does the same). On a mesh when the model's parameters are."""
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
    # With a callback the loop stops after each token so that the host sees it; otherwise it runs to the end.
    per_token = on_token is not None or stop is not None
    with on_mesh(state) as place:
        carry = _prefill(graphdef, state, *place(ids_in, mask_in, positions_in), length, sampler, return_logits, key,
                         pad_id, eos_ids, control)
        made, seen = 1, 0
        done_b = np.zeros(batch, bool)
        while True:
            if per_token:
                tokens_bn = np.asarray(jax.device_get(carry.tokens_bn))[:, :made]
                for i in range(seen, made) if on_token is not None else ():
                    on_token(tokens_bn[:, i].copy())
                seen = made
            if made == max_new_tokens:
                break
            if stop is not None:
                done_b |= np.asarray(stop(tokens_bn), bool)
                if eos:
                    carry = carry.replace(finished_b=carry.finished_b | jnp.asarray(done_b))
                if (done_b | np.asarray(jax.device_get(carry.finished_b))).all():
                    break
            elif per_token and eos and np.asarray(jax.device_get(carry.finished_b)).all():
                break
            limit = made + 1 if per_token else max_new_tokens
            carry = _decode(graphdef, state, carry, jnp.int32(limit), sampler, key, pad_id, eos_ids, control)
            made_now = int(carry.made)
            if made_now == made:  # every row had finished: the loop made nothing
                break
            made = made_now
        new_bn, logits = jax.device_get((carry.tokens_bn[:, :made], carry.logits_bnv))
    return GenerateOutput(sequences=np.concatenate([ids_bt, np.asarray(new_bn).astype(ids_bt.dtype)], axis=1),
                          logits=None if logits is None else np.asarray(logits)[:, :made])
