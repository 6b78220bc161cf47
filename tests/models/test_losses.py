"""Training losses against transformers 5.23 on a tiny Qwen3-MoE (every parameter random, float32, a padded
batch with labels -100 on padding): the cross-entropy and the load-balancing loss equal transformers'
`loss`/`aux_loss` (output_router_logits=True) to 1e-5, and the gradient of CE + coef * aux for every
parameter equals torch autograd's to 1e-4 relative to that gradient's largest entry. The torch
gradients are written as a safetensors checkpoint and read back through moejax's own loader, so they
arrive in moejax's layout by the same key map as the weights. The z-loss is checked against a float64
numpy port of its formula."""

from __future__ import annotations

import shutil

import jax
import jax.numpy as jnp
import numpy as np
import pytest

pytest.importorskip("torch")  # the test extra; without it these tests are skipped

import torch
from flax import nnx
from safetensors.numpy import save_file

import moejax
from moejax.data.mixture import IGNORE_INDEX
from moejax.parity.fixtures import make_checkpoint
from moejax.training.losses import load_balancing_loss, next_token_loss, router_z_loss

pytestmark = pytest.mark.torch

COEF = 0.05


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    root = tmp_path_factory.mktemp("losses")
    reference, path = make_checkpoint("qwen3_moe", root / "model", seed=41, router_aux_loss_coef=COEF)
    rng = np.random.default_rng(0)
    ids = rng.integers(1, 97, (3, 13))
    mask = np.ones_like(ids)
    mask[1, 9:] = 0
    mask[2, 5:] = 0
    labels = np.where(mask == 1, ids, IGNORE_INDEX)
    return reference, path, ids, mask, labels


def moejax_loss(model, ids, mask, labels):
    graphdef, params = nnx.split(model)
    k = model.config.num_experts_per_tok

    def loss(params):
        out = nnx.merge(graphdef, params).forward(jnp.asarray(ids), jnp.asarray(mask),
                                                  jnp.broadcast_to(jnp.arange(ids.shape[1]), ids.shape), True)
        ce = next_token_loss(out.logits, jnp.asarray(labels))
        aux = load_balancing_loss(out.router_logits, k, jnp.asarray(mask))
        return ce + COEF * aux, (ce, aux, out.router_logits)

    return jax.jit(jax.value_and_grad(loss, has_aux=True))(params)


@pytest.mark.slow
def test_losses_and_gradients_equal_transformers(setup, tmp_path):
    reference, path, ids, mask, labels = setup
    reference.zero_grad()
    out = reference(input_ids=torch.from_numpy(ids), attention_mask=torch.from_numpy(mask),
                    labels=torch.from_numpy(labels), output_router_logits=True)
    out.loss.backward()
    (total, (ce, aux, _)), grads = moejax_loss(moejax.from_pretrained(path), ids, mask, labels)
    assert abs(float(aux) - out.aux_loss.item()) <= 1e-5
    assert abs(float(total) - out.loss.item()) <= 1e-5
    assert abs(float(ce) - (out.loss.item() - COEF * out.aux_loss.item())) <= 1e-5
    assert float(aux) > 1.0  # E * sum f P >= top_k-ish: a real, nonzero balance term

    # torch's gradients, through moejax's loader, into moejax's layout.
    grad_dir = tmp_path / "grads"
    grad_dir.mkdir()
    shutil.copy(path / "config.json", grad_dir / "config.json")
    save_file({name: p.grad.numpy().copy() for name, p in reference.named_parameters()},
              str(grad_dir / "model.safetensors"))
    want = dict(nnx.to_flat_state(nnx.state(moejax.from_pretrained(grad_dir), nnx.Param)))
    got = dict(nnx.to_flat_state(grads))
    assert want.keys() == got.keys()
    worst = 0.0
    for key, value in got.items():
        g, w = np.asarray(value[...]), np.asarray(want[key][...])
        scale = np.abs(w).max()
        assert scale > 0, f"{key}: no gradient in the reference"
        assert np.abs(g - w).max() <= 1e-4 * scale, f"{key}: {np.abs(g - w).max()} vs scale {scale}"
        worst = max(worst, np.abs(g - w).max() / scale)
    print(f"largest relative gradient difference: {worst:.2e}")


@pytest.mark.slow
def test_aux_loss_ignores_padding_and_z_loss(setup):
    _, path, ids, mask, labels = setup
    model = moejax.from_pretrained(path)
    (_, (_, aux, router_logits)), _ = moejax_loss(model, ids, mask, labels)
    # Changing the padded tokens changes nothing.
    ids2 = np.where(mask == 1, ids, 7)
    (_, (_, aux2, _)), _ = moejax_loss(model, ids2, mask, labels)
    assert abs(float(aux) - float(aux2)) <= 1e-6
    logits = [np.asarray(r, np.float64) for r in router_logits]
    lse = [np.log(np.exp(x - x.max(-1, keepdims=True)).sum(-1)) + x.max(-1) for x in logits]
    want = sum((v ** 2 * mask).sum() for v in lse) / (mask.sum() * len(logits))
    np.testing.assert_allclose(float(router_z_loss(router_logits, jnp.asarray(mask))), want, rtol=1e-5)


def test_cross_entropy_ignores_labels():
    logits = jax.random.normal(jax.random.key(0), (2, 5, 11))
    labels = jnp.array([[1, 2, IGNORE_INDEX, 4, 5], [IGNORE_INDEX] * 5])
    lp = jax.nn.log_softmax(logits, -1)
    want = -(lp[0, 0, 2] + lp[0, 2, 4] + lp[0, 3, 5]) / 3
    np.testing.assert_allclose(float(next_token_loss(logits, labels)), float(want), rtol=1e-6)
    assert float(next_token_loss(logits, jnp.full((2, 5), IGNORE_INDEX))) == 0.0


def test_sigmoid_balance_loss_expert_counts_and_entropy():
    """Nemotron-H's sequence-wise balance loss, the in-jit expert counts and the usage entropy metrics.csv shows of
    them against plain float64 numpy."""
    from moejax.training.losses import expert_counts, sigmoid_balance_loss
    from moejax.training.run import _usage_entropy

    rng = np.random.default_rng(3)
    b, t, e, k, layers = 3, 7, 6, 2, 2
    logits = [rng.normal(size=(b, t, e)).astype(np.float32) for _ in range(layers)]
    ids = [np.argsort(-x, axis=-1)[..., :k] for x in logits]
    valid = np.ones((b, t))
    valid[2, 4:] = 0
    want = 0.0
    for x, chosen in zip(logits, ids, strict=True):
        s = 1 / (1 + np.exp(-x.astype(np.float64)))
        s = s / s.sum(-1, keepdims=True)
        for row in range(b):
            n = valid[row].sum()
            load = np.zeros(e)
            for pos in range(t):
                if valid[row, pos]:
                    load[chosen[row, pos]] += 1
            f = load * e / (k * n)
            p = (s[row] * valid[row][:, None]).sum(0) / n
            want += (f * p).sum() / b
    got = float(sigmoid_balance_loss(tuple(map(jnp.asarray, logits)), tuple(map(jnp.asarray, ids)),
                                     jnp.asarray(valid)))
    np.testing.assert_allclose(got, want / layers, rtol=1e-6)

    lang = np.array([1, 0, 1])
    counts = np.asarray(expert_counts(tuple(map(jnp.asarray, ids)), e, jnp.asarray(lang), 2, jnp.asarray(valid)))
    assert counts.shape == (layers, 2, e)
    for layer in range(layers):
        for g in range(2):
            rows = [r for r in range(b) if lang[r] == g]
            chosen = np.concatenate([ids[layer][r][valid[r] == 1].ravel() for r in rows])
            assert np.array_equal(counts[layer, g], np.bincount(chosen, minlength=e))
    f = counts / counts.sum(-1, keepdims=True)
    want_h = -(np.where(f > 0, f * np.log2(np.where(f > 0, f, 1)), 0)).sum(-1)
    np.testing.assert_allclose(_usage_entropy(counts, k), want_h, rtol=1e-12)
    assert np.isnan(_usage_entropy(np.zeros((1, 1, e), np.int32), k)).all()
