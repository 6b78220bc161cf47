"""Router steering (docs/steering.md, steering) against a PyTorch reference and against its own formula.

The reference is moejax.parity.fixtures.steered: hooks on transformers' router modules that make the router's own
`F.linear` return steered logits, so transformers' softmax top-k (Qwen3-MoE) or sigmoid + correction bias + group
limit (Nemotron-H) choose from them. Both architectures, float32, random checkpoints written by save_pretrained.
"""

from __future__ import annotations

import functools
import json

import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

pytest.importorskip("torch")  # the test extra

import torch
from support import assert_parity, padded_batch

import moejax
from moejax.errors import ConfigError, DataError
from moejax.layers.moe import SigmoidMoE
from moejax.models import ARCHITECTURES, config_class
from moejax.models.common import jitted_forward
from moejax.models.steering import Steering
from moejax.parity.fixtures import make_checkpoint, steered

pytestmark = pytest.mark.torch


@pytest.fixture(scope="module", params=sorted(ARCHITECTURES))
def checkpoint(request, tmp_path_factory):
    reference, path = make_checkpoint(request.param, tmp_path_factory.mktemp(request.param), seed=4)
    overrides = dict(config_class(request.param).transformers_overrides)
    return request.param, reference, moejax.from_pretrained(path, **overrides)


def batch(seed: int = 0):
    return padded_batch(np.random.default_rng(seed), 97, [21, 13, 17], 21, "left")


def spec(model, mode: str, lam: float = 0.5, seed: int = 0) -> Steering:
    """Promote two experts and suppress one in the last MoE layer, promote one in the first."""
    last = len(model.config.moe_layers) - 1
    return Steering(mode=mode, lam=lam, seed=seed, layers={0: ((3,), ()), last: ((1, 5), (2,))})


def numpy_steer(z, shift, promote, suppress, eps):
    z = np.asarray(z, np.float64)
    out = z + shift * z.std(axis=-1, keepdims=True)
    out = np.where(promote, z.max(axis=-1, keepdims=True) + eps, out)
    return np.where(suppress, z.min(axis=-1, keepdims=True) - eps, out)


@pytest.mark.parametrize("noop", ["empty", "no experts", "soft lambda 0"])
def test_steering_that_changes_nothing_is_bit_identical(checkpoint, noop):
    _, _, model = checkpoint
    ids, mask = batch()
    steering = {"empty": Steering(), "no experts": Steering(layers={0: ((), ())}),
                "soft lambda 0": spec(model, "soft", lam=0.0)}[noop]
    assert steering.changes_nothing
    plain = model(ids, mask, return_router_logits=True)
    got = model(ids, mask, return_router_logits=True, steering=steering)
    np.testing.assert_array_equal(np.asarray(got.logits), np.asarray(plain.logits))
    for a, b in zip(got.router_expert_ids, plain.router_expert_ids, strict=True):
        np.testing.assert_array_equal(np.asarray(a), np.asarray(b))


def test_zero_arrays_through_the_steering_path_change_nothing(checkpoint):
    """The data path itself (not only the short cut for a spec that changes nothing) leaves every number as it is
    when its arrays are zero: steering a layer with an expert list elsewhere leaves the other layers' logits equal."""
    _, _, model = checkpoint
    ids, mask = batch()
    plain = model(ids, mask, return_router_logits=True)
    last = len(model.config.moe_layers) - 1
    steering = Steering(mode="soft", lam=1.0, layers={last: ((4,), ())})
    got = model(ids, mask, return_router_logits=True, steering=steering)
    for layer in range(last):  # every MoE layer before the steered one: bit for bit
        np.testing.assert_array_equal(np.asarray(got.router_logits[layer]), np.asarray(plain.router_logits[layer]))
        np.testing.assert_array_equal(np.asarray(got.router_expert_ids[layer]),
                                      np.asarray(plain.router_expert_ids[layer]))


def plain_top_k(model):
    """A copy of a Nemotron-H model whose routers choose by the sigmoid alone (correction bias 0, one group), as
    Qwen3-MoE's choose by the softmax: only there does hard steering decide membership on its own. With a bias or a
    group limit, the steered score feeds the choice as usual (docs/steering.md, steering), and a large bias can
    still choose a suppressed expert (the PyTorch comparison below covers that case)."""
    copy = nnx.clone(model)
    for _, module in nnx.iter_modules(copy):
        if isinstance(module, SigmoidMoE):
            module.n_group = module.topk_group = 1
            module.correction_e[...] = jnp.zeros_like(module.correction_e[...])
    return copy


def test_hard_promote_always_chosen_and_suppress_never(checkpoint):
    arch, _, model = checkpoint
    if model.config.router_kind == "sigmoid":
        model = plain_top_k(model)
    ids, mask = batch(1)
    content = mask.astype(bool)
    layers = len(model.config.moe_layers)
    steered_layer = layers - 1
    plain = model(ids, mask, return_router_logits=True, return_hidden_states=True)
    for promote, suppress in (((7,), ()), ((), (int(np.asarray(plain.router_expert_ids[steered_layer])[0, -1, 0]),)),
                              ((0, 6), (1,))):
        steering = Steering(mode="hard", layers={steered_layer: (promote, suppress)})
        out = model(ids, mask, return_router_logits=True, return_hidden_states=True, steering=steering)
        chosen = np.asarray(out.router_expert_ids[steered_layer])[content]
        for e in promote:
            assert (chosen == e).any(axis=-1).all(), f"promoted expert {e} not chosen everywhere"
            steered_z = np.asarray(out.router_logits[steered_layer])[content]
            assert (steered_z[:, e] > np.delete(steered_z, list(promote), axis=-1).max(axis=-1)).all()
        for e in suppress:
            assert not (chosen == e).any(), f"suppressed expert {e} chosen"
        for layer in range(steered_layer):
            np.testing.assert_array_equal(np.asarray(out.router_logits[layer]),
                                          np.asarray(plain.router_logits[layer]))
        block = model.config.moe_layers[steered_layer]
        for b in range(block):  # every block before the steered one returns the same residual stream
            np.testing.assert_array_equal(np.asarray(out.hidden_states[b]), np.asarray(plain.hidden_states[b]))


@pytest.mark.parametrize("mode", ["soft", "hard"])
def test_steered_logits_equal_the_formula(checkpoint, mode):
    """Steering one layer: its steered router logits equal a numpy implementation of the formula applied to the
    raw logits the unsteered run computes there (the same numbers: nothing before the layer changed)."""
    _, _, model = checkpoint
    ids, mask = batch(2)
    content = mask.astype(bool)
    layer = len(model.config.moe_layers) - 1
    steering = Steering(mode=mode, lam=0.7, seed=3, layers={layer: ((2, 6), (4,))})
    arrays = steering.arrays(model.config)
    raw = np.asarray(model(ids, mask, return_router_logits=True).router_logits[layer])[content]
    got = np.asarray(model(ids, mask, return_router_logits=True, steering=steering).router_logits[layer])[content]
    want = numpy_steer(raw, *(arrays[name][layer] for name in ("shift_e", "promote_e", "suppress_e", "eps_e")))
    np.testing.assert_allclose(got, want, rtol=0, atol=2e-6)
    if mode == "hard":
        assert (arrays["eps_e"] > 0).all() and arrays["eps_e"].max() < 1e-5
        assert (got[:, [2, 6]] > np.delete(got, [2, 6], axis=-1).max(axis=-1, keepdims=True)).all()
        assert (got[:, 4] < np.delete(got, 4, axis=-1).min(axis=-1)).all()


@pytest.mark.parametrize("mode,lam", [("soft", 0.5), ("soft", 2.0), ("soft", -1.0), ("hard", 0.5)])
def test_steered_forward_equals_pytorch_hooks(checkpoint, mode, lam):
    """moejax steered == transformers with the same intervention hooked into its routers: logits (1e-4), router
    logits (1e-5), chosen experts identical, at every content token of a left-padded batch."""
    _, reference, model = checkpoint
    steering = spec(model, mode, lam, seed=7)
    arrays = steering.arrays(model.config)
    ids, mask = batch(3)
    with steered(reference, arrays):
        assert_parity(functools.partial(model, steering=steering), reference, ids, mask)
    # And the hooks are gone afterwards: the reference computes the unsteered model again.
    assert_parity(model, reference, ids, mask)


def test_steered_generation_equals_pytorch_hooks(checkpoint):
    _, reference, model = checkpoint
    steering = spec(model, "soft", 1.5)
    arrays = steering.arrays(model.config)
    ids, mask = batch(4)
    with steered(reference, arrays), torch.no_grad():
        want = reference.generate(input_ids=torch.from_numpy(ids), attention_mask=torch.from_numpy(mask),
                                  max_new_tokens=12, do_sample=False, eos_token_id=None, pad_token_id=0).numpy()
    got = model.generate(ids, mask, max_new_tokens=12, steering=steering).sequences
    np.testing.assert_array_equal(got, want)
    unsteered = model.generate(ids, mask, max_new_tokens=12).sequences
    assert not np.array_equal(unsteered, got), "steering changed no generated token: the test proves nothing"


def test_a_new_spec_does_not_recompile(checkpoint):
    _, _, model = checkpoint
    ids, mask = batch()
    layers = len(model.config.moe_layers)
    model(ids, mask, steering=Steering(mode="soft", lam=0.5, layers={0: ((1,), ())}))
    compiled = jitted_forward._cache_size()
    for steering in (Steering(mode="soft", lam=1.5, layers={layers - 1: ((2, 3), (4,))}),
                     Steering(mode="hard", seed=9, layers={0: ((5,), ()), layers - 1: ((), (6,))}),
                     Steering(mode="soft", lam=-0.3, layers={i: ((i,), ()) for i in range(layers)})):
        model(ids, mask, steering=steering)
    assert jitted_forward._cache_size() == compiled


def test_spec_from_json_and_from_experts(tmp_path, checkpoint):
    _, _, model = checkpoint
    path = tmp_path / "steer.json"
    path.write_text(json.dumps({"mode": "hard", "lambda": 0.5, "seed": 2,
                                "layers": {"1": {"promote": [3, 7], "suppress": [5]}}}))
    s = Steering.from_json(path)
    assert s == Steering(mode="hard", lam=0.5, seed=2, layers={1: ((3, 7), (5,))})
    assert Steering.from_dict(s.to_dict()) == s
    experts = {"settings": {"method": "delta"}, "experts": {"0": {"ids": [1, 2], "scores": [0.4, 0.35]},
                                                            "1": {"ids": [], "scores": []}}}
    (tmp_path / "experts.json").write_text(json.dumps({**experts, "mode": "soft", "lambda": 0.25,
                                                       "direction": "suppress"}))
    s = Steering.from_json(tmp_path / "experts.json")
    assert s == Steering(mode="soft", lam=0.25, layers={0: ((), (1, 2))})
    assert Steering.from_experts(experts, "hard") == Steering(mode="hard", layers={0: ((1, 2), ())})
    # The JSON path itself works wherever a Steering does.
    got = model(*batch(), steering=str(path)).logits
    np.testing.assert_array_equal(np.asarray(got), np.asarray(model(*batch(), steering=s.__class__.from_json(
        path)).logits))


@pytest.mark.parametrize("bad,message", [
    ({"layers": {"99": {"promote": [1]}}}, "layer 99 is not an MoE layer"),
    ({"layers": {"0": {"promote": [10_000]}}}, "names expert id(s) [10000]"),
    ({"mode": "sideways", "layers": {"0": {"promote": [1]}}}, "mode 'sideways' is not one of soft, hard"),
    ({"layers": {"0": {"promote": [1, 2], "suppress": [2]}}}, "both promotes and suppresses expert(s) [2]"),
    ({"layers": {"0": {"promote": [-1]}}}, "negative expert id"),
    ({"lambda": float("nan"), "layers": {"0": {"promote": [1]}}}, "lambda must be a finite number"),
    ({"layers": {"zero": {"promote": [1]}}}, "layer key 'zero' is not an MoE-layer index"),
    ({"layers": {"0": {"boost": [1]}}}, "must be {'promote': [ids], 'suppress': [ids]}"),
    ({"layers": {"0": {"promote": "1"}}}, "must be a list of expert ids"),
    ({"mode": "soft", "gain": 2}, "unknown key(s) ['gain']"),
])
def test_bad_specs(checkpoint, bad, message):
    _, _, model = checkpoint
    with pytest.raises(ConfigError) as caught:
        model(*batch(), steering=bad)
    assert message in str(caught.value)


def test_unreadable_spec_files(tmp_path):
    with pytest.raises(DataError, match="cannot read the steering spec"):
        Steering.from_json(tmp_path / "missing.json")
    (tmp_path / "bad.json").write_text("{not json")
    with pytest.raises(DataError, match="is not a JSON steering spec"):
        Steering.from_json(tmp_path / "bad.json")
