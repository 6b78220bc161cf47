"""`moejax analyze --selection raw`: the experts counted are the top-K of softmax(raw router logits), paper A's hook
view, instead of the model's own choice. On a Nemotron-H with a realistic correction bias the two differ at most
token-layers; on a softmax router they are the same experts."""

from __future__ import annotations

import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from moejax.layers.moe import SigmoidMoE
from moejax.models import nemotron_h, qwen3_moe
from moejax.routing.stats import chunk_stats


def tiny(module, seed: int, bias: float = 0.0):
    config = module.Config.from_hf(module.tiny_reference_config().to_dict())
    model = module.Model(config, rngs=nnx.Rngs(seed))
    rng = np.random.default_rng(seed)
    for _, m in nnx.iter_modules(model):
        if isinstance(m, SigmoidMoE) and bias:
            m.correction_e[...] = jnp.asarray(rng.normal(0.0, bias, m.correction_e[...].shape), jnp.float32)
    return model


def views(model, seed: int = 0):
    rng = np.random.default_rng(seed)
    ids = rng.integers(3, model.config.vocab_size, (2, 24))
    mask = np.ones_like(ids)
    pairs = np.zeros((2, 1, 2), np.int64)
    out = {}
    for selection in ("model", "raw"):
        out[selection] = chunk_stats(model, ids, mask, mask.astype(bool), pairs, keep_routing=True,
                                     selection=selection)
    return ids, out


@pytest.mark.slow
@pytest.mark.parametrize("bias", [0.5])
def test_raw_counts_are_top_k_of_softmax_of_the_logits(bias):
    model = tiny(nemotron_h, 1, bias)
    k, experts = model.config.num_experts_per_tok, model.config.num_routed_experts
    _, out = views(model)
    logits = np.asarray(out["raw"].router_logits)  # [b, L, t, E]
    raw_ids = np.argsort(-logits, axis=-1, kind="stable")[..., :k]
    want = np.zeros((*logits.shape[:2], experts), np.int64)
    for e in range(experts):
        want[..., e] = (raw_ids == e).any(-1).sum(-1)
    np.testing.assert_array_equal(np.asarray(out["raw"].topk_counts), want)
    model_ids = np.asarray(out["model"].expert_ids)
    want_model = np.stack([(model_ids == e).any(-1).sum(-1) for e in range(experts)], axis=-1)
    np.testing.assert_array_equal(np.asarray(out["model"].topk_counts), want_model)
    # The views differ where the bias and group limit decide: at most token-layers with a realistic bias.
    differ = (np.sort(raw_ids, -1) != np.sort(model_ids, -1)).any(-1).mean()
    if bias:
        assert differ > 0.5, differ
    assert (np.asarray(out["raw"].topk_counts).sum(-1) == k * 24).all()
    # Probabilities and entropies do not depend on the view.
    np.testing.assert_array_equal(np.asarray(out["raw"].prob_sums), np.asarray(out["model"].prob_sums))


@pytest.mark.slow
def test_softmax_router_views_agree():
    model = tiny(qwen3_moe, 2)
    _, out = views(model)
    np.testing.assert_array_equal(np.asarray(out["raw"].topk_counts), np.asarray(out["model"].topk_counts))
    np.testing.assert_array_equal(np.asarray(out["raw"].top1_counts), np.asarray(out["model"].top1_counts))


@pytest.mark.torch
@pytest.mark.slow
def test_raw_view_equals_paper_a_hooks_on_transformers_gates(tmp_path):
    """Paper A's protocol in PyTorch: a forward hook on each of transformers' gate modules takes the hidden states
    entering it, computes the raw logits (the gate's linear projection), their softmax and its top-K. moejax's
    `selection="raw"` counts equal the hook's, on a Nemotron-H whose correction bias changes the model's choice at
    most token-layers (so the model view differs from both)."""
    torch = pytest.importorskip("torch")
    import moejax
    from moejax.parity.fixtures import make_checkpoint, routers

    reference, path = make_checkpoint("nemotron_h", tmp_path, seed=3)
    generator = torch.Generator().manual_seed(0)
    for router in routers(reference):
        router.e_score_correction_bias.data = torch.randn(router.num_experts, generator=generator) * 0.5
    reference.save_pretrained(path)
    model = moejax.from_pretrained(path)
    k, experts = model.config.num_experts_per_tok, model.config.num_routed_experts
    ids = np.random.default_rng(1).integers(3, model.config.vocab_size, (2, 24))
    hooked = []

    def hook(module, inputs, _output):
        x = inputs[0].reshape(-1, module.weight.shape[-1]).float()
        p = torch.softmax(x @ module.weight.float().T, dim=-1)
        chosen = torch.topk(p, k, dim=-1).indices.reshape(ids.shape[0], ids.shape[1], k)
        hooked.append(torch.stack([(chosen == e).any(-1).sum(-1) for e in range(experts)], -1).numpy())

    handles = [r.register_forward_hook(hook) for r in routers(reference)]
    try:
        with torch.no_grad():
            reference(input_ids=torch.from_numpy(ids).long())
    finally:
        for h in handles:
            h.remove()
    want = np.stack(hooked, axis=1)  # [b, L, E]
    mask = np.ones_like(ids)
    pairs = np.zeros((2, 1, 2), np.int64)
    raw = chunk_stats(model, ids, mask, mask.astype(bool), pairs, selection="raw")
    own = chunk_stats(model, ids, mask, mask.astype(bool), pairs, selection="model")
    np.testing.assert_array_equal(np.asarray(raw.topk_counts), want)
    assert not np.array_equal(np.asarray(own.topk_counts), want), "the bias changed nothing: the test proves nothing"
