"""What every causal-LM architecture shares: its output type and a jitted __call__."""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx, struct

from moejax.errors import DataError
from moejax.layers.moe import RouterControl
from moejax.parallel.mesh import on_mesh


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


def check_ids(ids, vocab_size: int, source: str = "the input") -> None:
    """A DataError naming the first token id of `ids` outside [0, vocab_size), with its position."""
    ids = np.asarray(ids)
    bad = np.argwhere((ids < 0) | (ids >= vocab_size))
    if len(bad):
        where = tuple(int(i) for i in bad[0])
        raise DataError(f"{source} holds token id {int(ids[where])} at position {where}, outside the model's "
                        f"vocabulary of {vocab_size} tokens: the tokenizer and the model do not belong together")


class CausalLM(nnx.Module):
    """Base for the architectures: `model(input_ids, ...)` runs the jitted `forward`."""

    def __call__(self, input_ids, attention_mask=None, *, position_ids=None,
                 return_router_logits: bool = False, return_hidden_states: bool = False,
                 forced_routing: ForcedRouting | None = None, check_token_ids: bool = False) -> CausalLMOutput:
        """input_ids [batch, seq]; attention_mask [batch, seq] (1 = token, 0 = padding). check_token_ids: an id
        outside the vocabulary is a DataError naming it (the commands check; without it the embedding lookup
        clamps silently, as jax indexing does)."""
        if check_token_ids:
            check_ids(input_ids, self.config.vocab_size)
        input_ids = jnp.asarray(input_ids, jnp.int32)
        if input_ids.ndim != 2:
            raise ValueError(f"input_ids must be [batch, seq], got shape {input_ids.shape}")
        if attention_mask is None:
            attention_mask = jnp.ones(input_ids.shape, jnp.int32)
        attention_mask = jnp.asarray(attention_mask, jnp.int32)
        if attention_mask.shape != input_ids.shape:
            raise ValueError(f"attention_mask shape {attention_mask.shape} != input_ids shape {input_ids.shape}")
        if position_ids is None:
            position_ids = jnp.broadcast_to(jnp.arange(input_ids.shape[1], dtype=jnp.int32), input_ids.shape)
        if forced_routing is not None:
            want = (len(self.config.moe_layers), *input_ids.shape, self.config.num_experts_per_tok)
            if tuple(np.shape(forced_routing.expert_ids)) != want or np.shape(forced_routing.mask) != want[:-1]:
                raise ValueError(f"forced_routing: expert_ids must be [moe layers, batch, seq, k] = {want} and mask "
                                 f"{want[:-1]}, got {np.shape(forced_routing.expert_ids)} and "
                                 f"{np.shape(forced_routing.mask)}")
        graphdef, state = nnx.split(self)
        with on_mesh(state) as place:
            return jitted_forward(graphdef, state, *place(input_ids, attention_mask,
                                                           jnp.asarray(position_ids, jnp.int32)),
                                   return_router_logits, return_hidden_states,
                                   None if forced_routing is None else forced_routing.control())


# jax.jit over (graphdef, state) rather than nnx.jit: nnx.jit's per-call graph bookkeeping measured
# ~80 ms here, as much as a small forward pass.
@functools.partial(jax.jit, static_argnums=(0, 5, 6))
def jitted_forward(graphdef, state, input_ids, attention_mask, position_ids, return_router_logits,
                    return_hidden_states, control=None):
    """The compiled forward of a model given as (graphdef, state): what `model(...)` runs (`moejax plan` lowers it
    from shapes alone)."""
    return nnx.merge(graphdef, state).forward(input_ids, attention_mask, position_ids, return_router_logits,
                                              return_hidden_states, control)


def causal_lm_output(logits_btv, aux_by_layer: list, return_router_logits: bool,
                     return_hidden_states: bool) -> CausalLMOutput:
    """The output of a forward pass from its logits and LayerStack's per-layer aux (each a RouterOutput
    or None, paired with the layer's output when return_hidden_states)."""
    batch, seq = logits_btv.shape[:2]
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
    return CausalLMOutput(logits=logits_btv, hidden_states=hidden, **fields)
