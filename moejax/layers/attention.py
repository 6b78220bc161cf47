"""Grouped-query attention with optional QK-norm (before RoPE), optional RoPE, causal + padding mask, and a
key/value cache for generation.

Parameters of `Attention` (n query heads, k key/value heads, head_dim h, hidden d):
- q_dnh [d, n, h], k_dkh [d, k, h], v_dkh [d, k, h], o_nhd [n, h, d];
- with bias: q_bias_nh [n, h], k_bias_kh [k, h], v_bias_kh [k, h], o_bias_d [d];
- QK-norm per head (Qwen3, qk_norm_over="head"): q_norm.weight [h], k_norm.weight [h];
- QK-norm over the whole projection (OLMoE, qk_norm_over="all"): q_norm_all.weight [n, h] and k_norm_all.weight
  [k, h], transformers' self_attn.q_norm.weight [n * h] and self_attn.k_norm.weight [k * h] reshaped head-major;
- with sinks (GPT-OSS): sinks_n [n], one logit per query head (transformers' self_attn.sinks).
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
from flax import nnx, struct
from jax.sharding import PartitionSpec as P

from moejax.layers.norms import RMSNorm, rms_normalize
from moejax.layers.params import param
from moejax.layers.rope import apply_rope


def attention_mask(segment_ids_bs: jax.Array, seq_len: int, branch_ids_bs: jax.Array | None = None) -> jax.Array:
    """[batch, seq, seq] boolean: query t may attend key s when s <= t, s is not padding (0) and, for
    packed rows (ids 1, 2, ... per document), s belongs to t's document. A padding query sees every
    earlier non-padding key, as transformers' masks let it; a 0/1 attention mask is one document.
    branch_ids_bs: documents laid out as trees, 0 for a document's trunk and 1, 2, ... for branches that follow
    it: a key on a branch is seen only from its own branch."""
    causal_ts = jnp.tril(jnp.ones((seq_len, seq_len), dtype=bool))
    query_bt1, key_b1s = segment_ids_bs[:, :, None], segment_ids_bs[:, None, :]
    same_bts = (query_bt1 == key_b1s) | (query_bt1 == 0)
    if branch_ids_bs is not None:
        key_branch_b1s = branch_ids_bs[:, None, :]
        same_bts &= (key_branch_b1s == 0) | (key_branch_b1s == branch_ids_bs[:, :, None])
    return causal_ts[None] & (key_b1s != 0) & same_bts


def within_window(seq_len: int, keys: int, first_slot, window: int) -> jax.Array:
    """[1, seq, keys] boolean: query t (at slot first_slot + t) may see key slot s when it is less than `window`
    slots before it. Slots and tokens advance together (left padding sits before a row's first token), so this is
    the token distance."""
    query_t = first_slot + jnp.arange(seq_len)
    return (query_t[:, None] - jnp.arange(keys)[None, :] < window)[None]


def kv_heads_on_mesh(kv_heads: int) -> int:
    """How many KV heads attention computes and caches: `kv_heads`, or one per tensor device when the current mesh
    has more tensor devices than KV heads (a multiple of them). Device i then holds head i // (tensor / kv_heads),
    the one its query heads share, and computes and caches only that (vLLM's layout for Qwen3-30B-A3B's 4 or
    Nemotron-3-Nano's 2 KV heads on 8 devices); the projection weights stay whole on each device."""
    mesh = jax.sharding.get_abstract_mesh()
    tensor = 1 if mesh.empty else dict(mesh.shape).get("tensor", 1)
    return tensor if tensor > kv_heads and tensor % kv_heads == 0 else kv_heads


def _split_heads(a_bskh: jax.Array, heads: int, kv_heads: int) -> jax.Array:
    """Keys or values over `heads` per-device copies of the KV heads (kv_heads_on_mesh) placed on tensor; as they
    are otherwise."""
    if heads == kv_heads:
        return a_bskh
    return jax.lax.with_sharding_constraint(a_bskh, P(P.UNCONSTRAINED, P.UNCONSTRAINED, "tensor", P.UNCONSTRAINED))


@struct.dataclass
class KVCache:
    """One attention layer's keys and values at every cache slot, [batch, cache length, kv heads, head_dim]."""

    k_bskh: jax.Array
    v_bskh: jax.Array


def cache_attention_mask(valid_bs: jax.Array, first_slot, seq_len: int) -> jax.Array:
    """[batch, seq, cache length] boolean for `seq_len` new tokens written at slots first_slot, first_slot + 1, ...:
    query t may attend the slots up to its own that hold a token (valid_bs, the new ones included)."""
    slot_s = jnp.arange(valid_bs.shape[1])
    query_t = first_slot + jnp.arange(seq_len)
    return (slot_s[None, None, :] <= query_t[None, :, None]) & valid_bs[:, None, :]


def causal_attention(q_btkgh: jax.Array, k_bskh: jax.Array, v_bskh: jax.Array, mask_bts: jax.Array,
                     first_key: int | None = 0, sinks_kg: jax.Array | None = None) -> jax.Array:
    """softmax(q k^T / sqrt(h)) v over allowed keys, for g query heads per kv head -> [b, t, k, g, h].

    sinks_kg: GPT-OSS's attention sinks, one logit per query head [k, g]: each row's softmax runs over its scores and
    the sink's logit, whose column is then dropped, so the weights of a row sum to less than one.

    first_key: the key index of the first query (0 when the keys are the queries' own tokens, a static cache slot
    when they were written into a cache there), or None (a position known only at run time: every key is scored,
    the mask alone decides). Queries go in blocks, each, when first_key is known, against the keys up to its own
    end: under a causal mask the keys after it carry zero weight, so skipping them is exact and saves about half
    the work.
    """
    t, h = q_btkgh.shape[1], q_btkgh.shape[-1]
    block = max(64, -(-t // 16))
    outs = []
    for start in range(0, t, block):
        end = min(start + block, t)
        keys = k_bskh.shape[1] if first_key is None else first_key + end
        scores_bkgts = jnp.einsum("btkgh,bskh->bkgts", q_btkgh[:, start:end], k_bskh[:, :keys],
                                  preferred_element_type=jnp.float32) * h**-0.5
        # A fully masked row (a left-padding query) gets finite uniform weights instead of NaN; with sinks, all its
        # weight goes to the sink (zero output), as in transformers.
        allowed = mask_bts[:, None, None, start:end, :keys]
        scores_bkgts = jnp.where(allowed, scores_bkgts, jnp.finfo(jnp.float32).min)
        if sinks_kg is None:
            probs_bkgts = jax.nn.softmax(scores_bkgts, axis=-1).astype(v_bskh.dtype)
        else:
            probs_bkgts = _softmax_with_sink(scores_bkgts, sinks_kg).astype(v_bskh.dtype)
        outs.append(jnp.einsum("bkgts,bskh->btkgh", probs_bkgts, v_bskh[:, :keys]))
    return jnp.concatenate(outs, axis=1)


def _softmax_with_sink(scores_bkgts: jax.Array, sinks_kg: jax.Array) -> jax.Array:
    """The float32 softmax over each row's scores and its head's sink logit, the sink's column left out."""
    sink_1kg11 = sinks_kg.astype(jnp.float32)[None, :, :, None, None]
    top_bkgt1 = jax.lax.stop_gradient(jnp.maximum(jnp.max(scores_bkgts, axis=-1, keepdims=True), sink_1kg11))
    exp_bkgts = jnp.exp(scores_bkgts - top_bkgt1)
    return exp_bkgts / (jnp.sum(exp_bkgts, axis=-1, keepdims=True) + jnp.exp(sink_1kg11 - top_bkgt1))


QK_NORM_OVER = ("head", "all")


class Attention(nnx.Module):
    """Multi-head attention where n_heads query heads share n_kv_heads key/value heads.

    qk_norm_eps: RMS-normalise queries and keys before RoPE, over each head's head_dim (qk_norm_over="head", Qwen3)
    or over the whole projection, all heads together (qk_norm_over="all", OLMoE). clip_qkv: clamp queries, keys and
    values to [-clip_qkv, clip_qkv] after the projections and the QK-norm (OLMoE's order). sinks: one learned logit
    per query head that takes part in the softmax and is then dropped (GPT-OSS).
    """

    def __init__(self, hidden: int, n_heads: int, n_kv_heads: int, head_dim: int, *, bias: bool = False,
                 qk_norm_eps: float | None = None, qk_norm_over: str = "head", clip_qkv: float | None = None,
                 sinks: bool = False, window: int | None = None, dtype=jnp.float32, rngs: nnx.Rngs):
        if qk_norm_over not in QK_NORM_OVER:
            raise ValueError(f"qk_norm_over {qk_norm_over!r} is not one of {QK_NORM_OVER}")
        d, n, k, h = hidden, n_heads, n_kv_heads, head_dim
        self.q_dnh = param(rngs, (d, n, h), ("embed", "q_heads", "head_dim"), dtype)
        self.k_dkh = param(rngs, (d, k, h), ("embed", "kv_heads", "head_dim"), dtype)
        self.v_dkh = param(rngs, (d, k, h), ("embed", "kv_heads", "head_dim"), dtype)
        self.o_nhd = param(rngs, (n, h, d), ("q_heads", "head_dim", "embed"), dtype, fan_in=n * h)
        if bias:
            self.q_bias_nh = param(rngs, (n, h), ("q_heads", "head_dim"), dtype, init="zeros")
            self.k_bias_kh = param(rngs, (k, h), ("kv_heads", "head_dim"), dtype, init="zeros")
            self.v_bias_kh = param(rngs, (k, h), ("kv_heads", "head_dim"), dtype, init="zeros")
            self.o_bias_d = param(rngs, (d,), ("embed",), dtype, init="zeros")
        self.bias = bias
        if qk_norm_eps is not None and qk_norm_over == "head":
            self.q_norm = RMSNorm(h, qk_norm_eps, axis_name="head_dim", dtype=dtype, rngs=rngs)
            self.k_norm = RMSNorm(h, qk_norm_eps, axis_name="head_dim", dtype=dtype, rngs=rngs)
        if qk_norm_eps is not None and qk_norm_over == "all":
            self.q_norm_all = RMSNorm((n, h), qk_norm_eps, axis_name=("q_heads", "head_dim"), dtype=dtype, rngs=rngs)
            self.k_norm_all = RMSNorm((k, h), qk_norm_eps, axis_name=("kv_heads", "head_dim"), dtype=dtype,
                                      rngs=rngs)
        self.qk_norm = qk_norm_eps is not None
        self.qk_norm_over, self.clip_qkv = qk_norm_over, clip_qkv
        if sinks:
            self.sinks_n = param(rngs, (n,), ("q_heads",), dtype, init="zeros")
        self.sinks = sinks
        # A sliding window: a query sees the keys less than `window` tokens before it (transformers' rule,
        # q - k < window), on top of the mask it is given.
        self.window = window

    def cache(self, batch: int, length: int, dtype) -> KVCache:
        """An empty cache of `length` slots (also called on a stack's layers, whose weights lead with the layers)."""
        k, h = self.k_dkh.shape[-2:]
        heads = kv_heads_on_mesh(k)
        return KVCache(jnp.zeros((batch, length, heads, h), dtype), jnp.zeros((batch, length, heads, h), dtype))

    def __call__(self, x_btd: jax.Array, mask_bts: jax.Array,
                 rope_cos_sin: tuple[jax.Array, jax.Array] | None = None, cache: KVCache | None = None,
                 cache_slot=0) -> jax.Array | tuple[jax.Array, KVCache]:
        """[batch, seq, hidden] -> [batch, seq, hidden]. With a cache: the new tokens' keys and values are written
        at slots cache_slot, cache_slot + 1, ... (a static int, or a traced scalar while decoding), the queries
        attend the cache's slots (mask_bts [batch, seq, cache length]), and the updated cache comes back too."""
        kv = self.k_dkh.shape[-2]
        heads = kv_heads_on_mesh(kv)

        def per_device(w):  # [..., kv, h] -> [..., heads, h]: each KV head repeated for its devices
            return w if heads == kv else jnp.repeat(w, heads // kv, axis=-2)

        q_btnh = jnp.einsum("btd,dnh->btnh", x_btd, self.q_dnh[...])
        k_btkh = _split_heads(jnp.einsum("btd,dkh->btkh", x_btd, per_device(self.k_dkh[...])), heads, kv)
        v_btkh = _split_heads(jnp.einsum("btd,dkh->btkh", x_btd, per_device(self.v_dkh[...])), heads, kv)
        if self.bias:
            q_btnh, k_btkh, v_btkh = (q_btnh + self.q_bias_nh[...], k_btkh + per_device(self.k_bias_kh[...]),
                                      v_btkh + per_device(self.v_bias_kh[...]))
        if self.qk_norm and self.qk_norm_over == "head":
            q_btnh, k_btkh = self.q_norm(q_btnh), self.k_norm(k_btkh)
        if self.qk_norm and self.qk_norm_over == "all":
            # Each KV head's copies (kv_heads_on_mesh) are as many as the others': the mean square over them all is
            # the mean over the k_dkh heads, with each weight row copied alike.
            k_norm = self.k_norm_all
            q_btnh = self.q_norm_all(q_btnh)
            k_btkh = per_device(k_norm.weight[...]) * rms_normalize(k_btkh, k_norm.eps, 2).astype(k_btkh.dtype)
        if self.clip_qkv is not None:
            q_btnh, k_btkh, v_btkh = (jnp.clip(a, -self.clip_qkv, self.clip_qkv) for a in (q_btnh, k_btkh, v_btkh))
        if rope_cos_sin is not None:
            q_btnh, k_btkh = apply_rope(q_btnh, *rope_cos_sin), apply_rope(k_btkh, *rope_cos_sin)
        b, t, n, h = q_btnh.shape
        if self.window is not None:
            mask_bts = mask_bts & within_window(t, mask_bts.shape[-1], 0 if cache is None else cache_slot, self.window)
        first_key = 0
        if cache is not None:
            at = (0, cache_slot, 0, 0)
            cache = KVCache(*(_split_heads(jax.lax.dynamic_update_slice(c, a.astype(c.dtype), at), heads, kv)
                              for c, a in ((cache.k_bskh, k_btkh), (cache.v_bskh, v_btkh))))
            k_btkh, v_btkh = cache.k_bskh, cache.v_bskh
            first_key = cache_slot if isinstance(cache_slot, int) else None
        sinks_kg = self.sinks_n[...].reshape(heads, n // heads) if self.sinks else None
        out_btnh = causal_attention(q_btnh.reshape(b, t, heads, n // heads, h), k_btkh, v_btkh, mask_bts,
                                    first_key, sinks_kg).reshape(b, t, n, h)
        y_btd = jnp.einsum("btnh,nhd->btd", out_btnh, self.o_nhd[...])
        y_btd = y_btd + self.o_bias_d[...] if self.bias else y_btd
        return y_btd if cache is None else (y_btd, cache)
