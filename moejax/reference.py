"""The PyTorch reference (transformers) side of parity checks: random tiny models, saved and run.

transformers' own init leaves norms at 1 and biases at 0, which would let a wrong norm or a missing
bias pass unnoticed; `randomize` refills every parameter from a seeded normal instead.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch
import transformers


def tiny_qwen3_config(**overrides) -> transformers.Qwen3MoeConfig:
    base = dict(vocab_size=97, hidden_size=48, intermediate_size=40, num_hidden_layers=4, num_attention_heads=4,
                num_key_value_heads=2, head_dim=16, num_experts=8, num_experts_per_tok=3,
                moe_intermediate_size=24, norm_topk_prob=True, rms_norm_eps=1e-6, max_position_embeddings=256,
                rope_parameters={"rope_type": "default", "rope_theta": 10000.0})
    base.update(overrides)
    return transformers.Qwen3MoeConfig(**base)


def randomize(model: torch.nn.Module, seed: int) -> torch.nn.Module:
    """Every parameter from N(0, 1): norms as 1 + 0.2 N, biases as 0.2 N, matrices scaled by fan_in^-1/2."""
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in sorted(model.named_parameters()):
            noise = torch.randn(p.shape, generator=gen, dtype=torch.float32)
            if "norm" in name:
                value = 1.0 + 0.2 * noise
            elif name.endswith("bias"):
                value = 0.2 * noise
            elif "embed" in name:
                value = noise
            else:
                value = noise * p.shape[-1] ** -0.5
            p.copy_(value.to(p.dtype))
    return model


def make_qwen3(tmp: Path, seed: int = 0, *, save_dtype=None, max_shard_size=None, **overrides):
    """A random Qwen3MoeForCausalLM saved with save_pretrained; returns (fp32 reference model, dir)."""
    torch.manual_seed(seed)
    model = randomize(transformers.Qwen3MoeForCausalLM(tiny_qwen3_config(**overrides)), seed).eval()
    save = model if save_dtype is None else model.to(save_dtype)
    kwargs = {} if max_shard_size is None else {"max_shard_size": max_shard_size}
    save.save_pretrained(tmp, **kwargs)
    reference = transformers.AutoModelForCausalLM.from_pretrained(tmp, dtype=torch.float32).eval()
    return reference, Path(tmp)


def run_reference(model, ids: np.ndarray, mask: np.ndarray | None = None):
    """logits [b, t, V] and router logits per MoE layer [b, t, E], as float64 numpy."""
    with torch.no_grad():
        out = model(input_ids=torch.from_numpy(ids).long(),
                    attention_mask=None if mask is None else torch.from_numpy(mask).long(),
                    output_router_logits=True)
    b, t = ids.shape
    routers = [r.reshape(b, t, -1).double().numpy() for r in (out.router_logits or ())]
    return out.logits.double().numpy(), routers
