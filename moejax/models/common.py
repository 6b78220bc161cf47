"""What every causal-LM architecture shares: its output type, a jitted __call__, the generation cache and
`generate`."""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx, struct

from moejax.data.packing import positions
from moejax.data.tokenize import check_ids
from moejax.errors import DataError
from moejax.layers.attention import attention_mask, cache_attention_mask
from moejax.layers.moe import RouterControl
from moejax.models import generation
from moejax.models.steering import as_steering, with_steering
from moejax.parallel.mesh import on_mesh


@struct.dataclass
class DecodeCache:
    """Generation state after the tokens seen so far: every layer's cache (LayerStack.cache's layout: K/V for
    attention, convolution window and SSM state for Mamba-2), which of the cache's slots hold a token (valid_bs
    [batch, length]: left padding does not) and the next slot to write (`slot`)."""

    layers: tuple
    valid_bs: jax.Array
    slot: jax.Array | int

    def rows(self, index_r: jax.Array) -> DecodeCache:
        """The cache of rows index_r [r] (a row may repeat): each copy continues from its row's tokens."""
        # Every layer's cache leads with its stack's repeats, then the batch.
        return DecodeCache(jax.tree.map(lambda a: a[:, index_r], self.layers), self.valid_bs[index_r], self.slot)


@struct.dataclass
class CausalLMOutput:
    """logits [batch, seq, vocab]; per MoE layer (tuples, in layer order) when requested:
    router_logits [batch, seq, E] raw float32, router_expert_ids and router_weights [batch, seq, k];
    and per block, when requested, hidden_states [batch, seq, d]: the residual stream each block
    returns (before the final norm), as transformers' decoder layers return it."""

    logits: jax.Array
    router_logits: tuple[jax.Array, ...] | None = None
    router_expert_ids: tuple[jax.Array, ...] | None = None
    router_weights: tuple[jax.Array, ...] | None = None
    hidden_states: tuple[jax.Array, ...] | None = None
    cache: DecodeCache | None = None  # after the tokens, when the forward pass continued from a cache


@struct.dataclass
class ForcedRouting:
    """Experts imposed on some tokens of every MoE layer, as data (one compile for any values): where
    mask [moe layers, batch, seq] is set, the token uses expert_ids [moe layers, batch, seq, k] instead of
    its router's top-k; the combine weights remain the router's own scores of those experts."""

    expert_ids: jax.Array
    mask: jax.Array

    @classmethod
    def none(cls, moe_layers: int, batch: int, seq: int, k: int) -> ForcedRouting:
        """Nothing forced (the same compiled program as any forcing of this shape)."""
        return cls(np.zeros((moe_layers, batch, seq, k), np.int32), np.zeros((moe_layers, batch, seq), bool))

    def control(self) -> RouterControl:
        """Per MoE layer controls over the flattened [batch * seq] tokens."""
        layers, batch, seq, k = self.expert_ids.shape
        return RouterControl(force_ids=jnp.asarray(self.expert_ids, jnp.int32).reshape(layers, batch * seq, k),
                             force_mask=jnp.asarray(self.mask, bool).reshape(layers, batch * seq))


class CausalLM(nnx.Module):
    """Base for the architectures: `model(input_ids, ...)` runs the jitted `forward`; `model.generate(...)`
    decodes with caches. An architecture has `config`, `embed_vd`, `layers` (a LayerStack), `layer_context` (what
    its layers take besides x and the mask) and `head` (final norm and LM head)."""

    def forward(self, input_ids_bt, segment_ids_bt, position_ids_bt, return_router_logits: bool,
                return_hidden_states: bool = False, control=None, cache=None, last_logits: bool = False,
                branch_ids_bt=None) -> CausalLMOutput:
        """Token ids [batch, seq] -> CausalLMOutput (continuing from a DecodeCache, if given): embeddings, the
        layer stack, the head. segment_ids_bt: 0 = padding, 1, 2, ... = the documents of a row. last_logits: the
        logits of the last column only, [batch, 1, vocab] (generation's prefill needs no others). branch_ids_bt: a
        document laid out as a tree (only where `reads_branches`): 0 = its shared trunk, which comes first, and
        1, 2, ... = branches that each continue the trunk and see it and themselves only (position ids given)."""
        if branch_ids_bt is not None and not self.reads_branches:
            raise ValueError(f"{type(self).__name__} cannot read a document laid out as a tree (branch ids)")
        x_btd = self.embed_vd[...][input_ids_bt]
        context = self.layer_context(segment_ids_bt, position_ids_bt, x_btd.dtype)
        if control is not None and control.noise_key is not None:  # hard steering's eps is drawn per position
            layers = control.noise_key.shape[0]
            control = control.replace(position_t=jnp.broadcast_to(jnp.reshape(position_ids_bt, (-1,)),
                                                                  (layers, position_ids_bt.size)))
        x_btd, aux, cache = self.run_layers(x_btd, segment_ids_bt, cache, keep_hidden=return_hidden_states,
                                            moe_inputs=control, branch_ids_bt=branch_ids_bt, **context)
        logits_btv = self.head(x_btd[:, -1:] if last_logits else x_btd)
        return causal_lm_output(logits_btv, aux, return_router_logits, return_hidden_states, cache, x_btd.shape[:2])

    def block_forward(self, block: int, x_btd, segment_ids_bt, position_ids_bt, control: RouterControl | None = None,
                      dtype=jnp.float32):
        """Decoder block `block` alone on its input x_btd [batch, seq, d], its parameters and computation in
        `dtype` (upcast from the model's own inside the compiled call: one block's copy at a time) -> (its output
        [batch, seq, d], its RouterOutput over the batch * seq tokens or None). control: one MoE layer's
        RouterControl (forcing, steering) over those tokens. One compilation per kind of block, whatever its
        index."""
        segment, position, repeat = self.layers.locate(block)
        if control is not None and control.noise_key is not None:
            control = control.replace(position_t=jnp.reshape(jnp.asarray(position_ids_bt, jnp.int32), (-1,)))
        graphdef, state = nnx.split(self)
        with on_mesh(state) as place:
            x_btd, segment_ids_bt, position_ids_bt = place(jnp.asarray(x_btd, dtype), jnp.asarray(segment_ids_bt),
                                                           jnp.asarray(position_ids_bt, jnp.int32))
            return _jitted_block(graphdef, state, segment, position, jnp.int32(repeat), x_btd, segment_ids_bt,
                                 position_ids_bt, control, jnp.dtype(dtype))

    def head_forward(self, x_btd, dtype=jnp.float32):
        """The final norm and LM head alone on the last block's output [batch, seq, d], in `dtype` -> logits."""
        graphdef, state = nnx.split(self)
        with on_mesh(state) as place:
            return _jitted_head(graphdef, state, *place(jnp.asarray(x_btd, dtype)), jnp.dtype(dtype))

    def init_cache(self, batch: int, length: int) -> DecodeCache:
        """An empty generation cache of `length` slots (prompt plus new tokens), in the parameters' dtype."""
        dtype = self.embed_vd.get_value().dtype
        return DecodeCache(self.layers.cache(batch, length, dtype), jnp.zeros((batch, length), bool), 0)

    # Whether every layer mixes tokens through the attention mask alone, so that a document may be laid out as a
    # tree (forward's branch_ids_bt): not with a recurrence (Mamba-2), nor with a sliding window (it counts columns).
    reads_branches = False

    def run_layers(self, x_btd, segment_ids_bt, cache: DecodeCache | None, branch_ids_bt=None, **context):
        """The layer stack with the attention mask these tokens need: causal within each document (and branch), or,
        continuing from a cache, over its slots (these tokens written at cache.slot onwards) -> (x, aux, the cache
        after them or None)."""
        t = segment_ids_bt.shape[1]
        if cache is None:
            x_btd, aux, _ = self.layers(x_btd, mask_bts=attention_mask(segment_ids_bt, t, branch_ids_bt), **context)
            return x_btd, aux, None
        valid_bs = jax.lax.dynamic_update_slice(cache.valid_bs, segment_ids_bt != 0, (0, cache.slot))
        x_btd, aux, layers = self.layers(x_btd, mask_bts=cache_attention_mask(valid_bs, cache.slot, t),
                                         caches=cache.layers, cache_slot=cache.slot, **context)
        return x_btd, aux, DecodeCache(layers, valid_bs, cache.slot + t)

    def generate(self, input_ids, attention_mask=None, **options):
        """Continues each prompt (greedy by default; steering= as in __call__); see moejax.models.generation.generate
        for the options. attention_mask keeps transformers' name: it is the segment ids of one document per row
        (1 = a prompt token, 0 = left padding)."""
        return generation.generate(self, input_ids, attention_mask, **options)

    def __call__(self, input_ids, attention_mask=None, *, segment_ids=None, position_ids=None,
                 return_router_logits: bool = False, return_hidden_states: bool = False,
                 forced_routing: ForcedRouting | None = None, steering=None,
                 check_token_ids: bool = False) -> CausalLMOutput:
        """input_ids [batch, seq]; attention_mask [batch, seq] (1 = token, 0 = padding); or, for packed rows,
        segment_ids [batch, seq] (0 = padding, 1, 2, ... = the documents of a row): a token interacts only with
        earlier tokens of its own document, in every block, and positions restart at each document unless
        position_ids [batch, seq] are given (default with an attention mask: 0, 1, ... along the row, as
        transformers' forward numbers them). attention_mask keeps transformers' name for its callers but is read as
        segment ids, what forward takes (a row's nonzero values that differ are separate documents there too).
        steering: a moejax.Steering (or its dict, or a JSON path) applied to the router logits, as data
        (router_logits then returns the steered logits the experts were chosen with).
        check_token_ids: an id outside the vocabulary is a DataError naming it (the commands check; unchecked, the
        embedding lookup clamps it, as JAX indexing does)."""
        if check_token_ids:
            check_ids(input_ids, self.config.vocab_size)
        input_ids = jnp.asarray(input_ids, jnp.int32)
        if input_ids.ndim != 2:
            raise DataError(f"input_ids must be [batch, seq], got shape {input_ids.shape}")
        segment_ids_bt = segment_ids if segment_ids is not None else attention_mask
        if segment_ids_bt is None:
            segment_ids_bt = np.ones(input_ids.shape, np.int32)
        segment_ids_bt = np.asarray(segment_ids_bt, np.int32)
        if segment_ids is not None and attention_mask is not None:
            segment_ids_bt = np.where(np.asarray(attention_mask) != 0, segment_ids_bt, 0)
        if segment_ids_bt.shape != input_ids.shape:
            raise DataError(f"attention_mask / segment_ids shape {segment_ids_bt.shape} != input_ids shape "
                            f"{input_ids.shape}")
        position_ids = positions(segment_ids_bt, position_ids, packed=segment_ids is not None)
        if forced_routing is not None:
            want = (len(self.config.moe_layers), *input_ids.shape, self.config.num_experts_per_tok)
            if tuple(np.shape(forced_routing.expert_ids)) != want or np.shape(forced_routing.mask) != want[:-1]:
                raise DataError(f"forced_routing: expert_ids must be [moe layers, batch, seq, k] = {want} and mask "
                                 f"{want[:-1]}, got {np.shape(forced_routing.expert_ids)} and "
                                 f"{np.shape(forced_routing.mask)}")
        graphdef, state = nnx.split(self)
        with on_mesh(state) as place:
            return jitted_forward(graphdef, state, *place(input_ids, jnp.asarray(segment_ids_bt),
                                                           jnp.asarray(position_ids, jnp.int32)),
                                   return_router_logits, return_hidden_states,
                                   with_steering(None if forced_routing is None else forced_routing.control(),
                                                 as_steering(steering), self.config))


# jax.jit over (graphdef, state) rather than nnx.jit: nnx.jit's per-call graph bookkeeping measured
# ~80 ms here, as much as a small forward pass.
@functools.partial(jax.jit, static_argnums=(0, 5, 6))
def jitted_forward(graphdef, state, input_ids, segment_ids, position_ids, return_router_logits,
                   return_hidden_states, control=None):
    """The compiled forward of a model given as (graphdef, state): what `model(...)` runs (`moejax plan` lowers it
    from shapes alone)."""
    return nnx.merge(graphdef, state).forward(input_ids, segment_ids, position_ids, return_router_logits,
                                              return_hidden_states, control)


def upcast(tree, dtype):
    """Every floating array of `tree` narrower than `dtype` converted to it (float32 stays float32)."""
    def one(a):
        floating = jnp.issubdtype(a.dtype, jnp.floating)
        return a.astype(dtype) if floating and jnp.finfo(a.dtype).bits < jnp.finfo(dtype).bits else a
    return jax.tree.map(one, tree)


@functools.partial(jax.jit, static_argnums=(0, 2, 3, 9))
def _jitted_block(graphdef, state, segment, position, repeat, x_btd, segment_ids_bt, position_ids_bt, control, dtype):
    model = nnx.merge(graphdef, state)
    t = segment_ids_bt.shape[1]
    context = model.layer_context(segment_ids_bt, position_ids_bt, dtype)
    return model.layers.run_one(segment, position, repeat, x_btd, lambda tree: upcast(tree, dtype),
                                mask_bts=attention_mask(segment_ids_bt, t), control=control, **context)


@functools.partial(jax.jit, static_argnums=(0, 3))
def _jitted_head(graphdef, state, x_btd, dtype):
    # Unused upcasts (every other parameter) are dead code the compiler drops.
    return nnx.merge(graphdef, upcast(state, dtype)).head(x_btd)


def causal_lm_output(logits_btv, aux_by_layer: list, return_router_logits: bool,
                     return_hidden_states: bool, cache: DecodeCache | None = None,
                     tokens: tuple[int, int] | None = None) -> CausalLMOutput:
    """The output of a forward pass from its logits and LayerStack's per-layer aux (each a RouterOutput
    or None, paired with the layer's output when return_hidden_states); tokens: the (batch, seq) the layers ran on,
    when the logits cover fewer columns."""
    batch, seq = logits_btv.shape[:2] if tokens is None else tokens
    hidden = None
    if return_hidden_states:
        aux_by_layer, hidden = zip(*aux_by_layer, strict=True)
    fields = {}
    if return_router_logits:
        routing = [r for r in aux_by_layer if r is not None]
        fields = {
            "router_logits": tuple(r.logits.reshape(batch, seq, -1) for r in routing),
            "router_expert_ids": tuple(r.expert_ids.reshape(batch, seq, -1) for r in routing),
            "router_weights": tuple(r.weights.reshape(batch, seq, -1) for r in routing),
        }
    return CausalLMOutput(logits=logits_btv, hidden_states=hidden, cache=cache, **fields)
