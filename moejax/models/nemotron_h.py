"""Nemotron-H (e.g. Nemotron-3-Nano-30B-A3B): a hybrid stack of Mamba-2, attention (no RoPE), MoE and MLP
blocks, each x + mixer(norm(x))."""

from __future__ import annotations

import jax.numpy as jnp
from flax import nnx

from moejax.config import NemotronHConfig
from moejax.layers.attention import Attention, attention_mask
from moejax.layers.mamba2 import Mamba2Mixer
from moejax.layers.mlp import MLP
from moejax.layers.moe import SigmoidMoE
from moejax.layers.norms import RMSNorm
from moejax.layers.params import param
from moejax.layers.stack import LayerStack
from moejax.models.common import CausalLM, causal_lm_output


def make_mixer(cfg: NemotronHConfig, kind: str, *, dtype, rngs: nnx.Rngs) -> nnx.Module:
    """The mixer of one block: "mamba", "attention", "moe" or "mlp"."""
    d = cfg.hidden_size
    if kind == "mamba":
        return Mamba2Mixer(d, cfg.mamba_num_heads, cfg.mamba_head_dim, cfg.ssm_state_size, cfg.n_groups,
                           cfg.conv_kernel, cfg.chunk_size, conv_bias=cfg.use_conv_bias, eps=cfg.layer_norm_epsilon,
                           dt_limits=cfg.dt_limits, dtype=dtype, rngs=rngs)
    if kind == "attention":
        return Attention(d, cfg.num_attention_heads, cfg.num_key_value_heads, cfg.head_dim, dtype=dtype, rngs=rngs)
    if kind == "moe":
        return SigmoidMoE(d, cfg.moe_intermediate_size, cfg.moe_shared_expert_intermediate_size,
                          cfg.n_routed_experts, cfg.num_experts_per_tok, latent=cfg.moe_latent_size,
                          n_group=cfg.n_group, topk_group=cfg.topk_group, normalize=cfg.norm_topk_prob,
                          scale=cfg.routed_scaling_factor, dtype=dtype, rngs=rngs)
    return MLP(d, cfg.intermediate_size, activation="relu2", dtype=dtype, rngs=rngs)


class Block(nnx.Module):
    """x + mixer(norm(x)); an MoE block also returns its routing."""

    def __init__(self, cfg: NemotronHConfig, kind: str, *, dtype, rngs: nnx.Rngs):
        self.kind = kind
        self.norm = RMSNorm(cfg.hidden_size, cfg.layer_norm_epsilon, axis_name="embed", weight_in_float32=True,
                            dtype=dtype, rngs=rngs)
        self.mixer = make_mixer(cfg, kind, dtype=dtype, rngs=rngs)

    def __call__(self, x_btd, *, mask_bts, valid_bt, control=None):
        h_btd = self.norm(x_btd)
        if self.kind == "mamba":
            return x_btd + self.mixer(h_btd, valid_bt), None
        if self.kind == "attention":
            return x_btd + self.mixer(h_btd, mask_bts), None
        if self.kind == "moe":
            y_btd, routing = self.mixer(h_btd, control)
            return x_btd + y_btd, routing
        return x_btd + self.mixer(h_btd), None


class NemotronHForCausalLM(CausalLM):
    """Embeddings, the hybrid block stack (repeating units scanned), final norm and LM head."""

    def __init__(self, cfg: NemotronHConfig, *, dtype=jnp.float32, rngs: nnx.Rngs):
        self.config = cfg
        self.embed_vd = param(rngs, (cfg.vocab_size, cfg.hidden_size), ("vocab", "embed"), dtype, fan_in=1)
        self.layers = LayerStack(cfg.layer_kinds, lambda kind, rngs: Block(cfg, kind, dtype=dtype, rngs=rngs),
                                 rngs=rngs)
        self.norm_f = RMSNorm(cfg.hidden_size, cfg.layer_norm_epsilon, axis_name="embed", weight_in_float32=True,
                              dtype=dtype, rngs=rngs)
        self.lm_head_dv = param(rngs, (cfg.hidden_size, cfg.vocab_size), ("embed", "vocab"), dtype)

    def forward(self, input_ids_bt, attention_mask_bt, position_ids_bt, return_router_logits: bool,
                return_hidden_states: bool = False, control=None):
        """Token ids [batch, seq] -> CausalLMOutput. There is no RoPE: positions are implicit in the scan."""
        x_btd = self.embed_vd[...][input_ids_bt]
        mask_bts = attention_mask(attention_mask_bt, input_ids_bt.shape[1])
        x_btd, aux = self.layers(x_btd, keep_hidden=return_hidden_states, moe_inputs=control,
                                 mask_bts=mask_bts, valid_bt=attention_mask_bt != 0)
        logits_btv = self.norm_f(x_btd) @ self.lm_head_dv[...]
        return causal_lm_output(logits_btv, aux, return_router_logits, return_hidden_states)
