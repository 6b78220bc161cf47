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
from moejax.parity.fixtures import make_checkpoint, steered, steering_eps

pytestmark = pytest.mark.torch


@pytest.fixture(scope="module", params=[  # the quick loop runs Qwen3-MoE; the full suite all four
    arch if arch == "qwen3_moe" else pytest.param(arch, marks=pytest.mark.slow)
    for arch in sorted(ARCHITECTURES)])
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


def with_realistic_bias(model, seed: int = 0):
    """A copy of a Nemotron-H model whose correction bias is as large as its sigmoid scores' spread (N(0, 0.5)), so
    that the bias, not the logits, decides most choices (the case where steering the logits alone fails)."""
    copy = nnx.clone(model)
    rng = np.random.default_rng(seed)
    for _, module in nnx.iter_modules(copy):
        if isinstance(module, SigmoidMoE):
            shape = module.correction_e[...].shape
            module.correction_e[...] = jnp.asarray(rng.normal(0.0, 0.5, shape), jnp.float32)
    return copy


def positions_of(mask) -> np.ndarray:
    """moejax's positions for an attention-mask batch, flattened: 0, 1, ... along each row."""
    return np.tile(np.arange(mask.shape[1], dtype=np.int32), mask.shape[0])


def test_hard_promote_chosen_and_suppress_never(checkpoint):
    """Hard steering (eq. 5, a signed eps per token): on the softmax and top-k routers a promoted expert is chosen
    at every token except where k experts tie with it within eps (counted, and rare); on Nemotron-H, whose bias and
    group limit choose, steering acts on the selection scores and a promoted expert is chosen at every token, a
    suppressed one never, with a bias that decides most choices."""
    arch, _, model = checkpoint
    sigmoid = model.config.router_kind == "sigmoid"
    if sigmoid:
        model = with_realistic_bias(model)
    ids, mask = batch(1)
    content = mask.astype(bool)
    k = model.config.num_experts_per_tok
    layers = len(model.config.moe_layers)
    steered_layer = layers - 1
    plain = model(ids, mask, return_router_logits=True, return_hidden_states=True)
    plain_chosen = np.asarray(plain.router_expert_ids[steered_layer])[content]
    never = int(np.bincount(plain_chosen.ravel(), minlength=model.config.num_routed_experts).argmin())
    for promote, suppress in (((never,), ()), ((), (int(plain_chosen[-1, 0]),)), ((0, 6), (1,))):
        steering = Steering(mode="hard", layers={steered_layer: (promote, suppress)})
        out = model(ids, mask, return_router_logits=True, return_hidden_states=True, steering=steering)
        chosen = np.asarray(out.router_expert_ids[steered_layer])[content]
        steered_z = np.asarray(out.router_logits[steered_layer])[content]
        for e in promote:
            hit = (chosen == e).any(axis=-1)
            if sigmoid:
                assert hit.all(), f"promoted expert {e} chosen at {hit.mean():.1%} of the tokens"
            else:  # missed only where at least k other experts reach its steered logit (eq. 5's edge case)
                ahead = (np.delete(steered_z, e, axis=-1) >= steered_z[:, [e]]).sum(axis=-1)
                np.testing.assert_array_equal(hit, ahead < k)
                assert hit.mean() > 0.95
        for e in suppress:
            assert not (chosen == e).any(), f"suppressed expert {e} chosen"
        for layer in range(steered_layer):
            np.testing.assert_array_equal(np.asarray(out.router_logits[layer]),
                                          np.asarray(plain.router_logits[layer]))
        block = model.config.moe_layers[steered_layer]
        for b in range(block):  # every block before the steered one returns the same residual stream
            np.testing.assert_array_equal(np.asarray(out.hidden_states[b]), np.asarray(plain.hidden_states[b]))
    if sigmoid:  # steering the logits alone would not do: the bias defeats max(z) + eps at some tokens
        from moejax.layers.moe import RouterControl, sigmoid_group_topk

        moe = [m for _, m in nnx.iter_modules(model) if isinstance(m, SigmoidMoE)][-1]
        z = np.asarray(plain.router_logits[steered_layer]).reshape(-1, model.config.num_routed_experts)
        arrays = Steering(mode="hard", layers={steered_layer: ((never,), ())}).arrays(model.config)
        row = {name: jnp.asarray(a[steered_layer]) for name, a in arrays.items()}
        logits_only = RouterControl(shift_e=row["shift_e"], promote_e=row["promote_e"], suppress_e=row["suppress_e"],
                                    noise_key=row["noise_key"], eps_std=row["eps_std"])
        _, ids_tk = sigmoid_group_topk(logits_only.steer(jnp.asarray(z)), moe.correction_e[...], k, moe.n_group,
                                       moe.topk_group, moe.normalize, moe.scale)
        assert not (np.asarray(ids_tk) == never).any(axis=-1).all(), "the bias never mattered: the test proves nothing"


@pytest.mark.parametrize("mode", ["soft", "hard"])
def test_steered_logits_equal_the_formula(checkpoint, mode):
    """Steering one layer: its steered router logits equal a numpy implementation of the formula applied to the
    raw logits the unsteered run computes there (the same numbers: nothing before the layer changed), with eq. 5's
    eps a signed draw per token position and expert, of standard deviation 1e-3."""
    _, _, model = checkpoint
    ids, mask = batch(2)
    content = mask.astype(bool)
    layer = len(model.config.moe_layers) - 1
    steering = Steering(mode=mode, lam=0.7, seed=3, layers={layer: ((2, 6), (4,))})
    arrays = steering.arrays(model.config)
    row = {name: a[layer] for name, a in arrays.items()}
    experts = model.config.num_routed_experts
    eps_te = steering_eps(row, positions_of(mask), experts).numpy().reshape(*mask.shape, experts)[content]
    raw = np.asarray(model(ids, mask, return_router_logits=True).router_logits[layer])[content]
    got = np.asarray(model(ids, mask, return_router_logits=True, steering=steering).router_logits[layer])[content]
    want = numpy_steer(raw, row["shift_e"], row["promote_e"], row["suppress_e"], eps_te)
    np.testing.assert_allclose(got, want, rtol=0, atol=2e-6)
    # eps is signed, per token and expert, with the standard deviation of N(0, 1e-6) read as a variance.
    assert (eps_te < 0).any() and (eps_te > 0).any()
    distinct_positions = len(np.unique(positions_of(mask).reshape(mask.shape)[content]))
    assert 0.8e-3 < eps_te.std() < 1.2e-3 and len(np.unique(eps_te[:, 2])) == distinct_positions > 10
    # The same position draws the same eps whatever the batch around it; another seed draws others.
    length = mask.shape[1]
    alone = steering_eps(row, np.arange(length, dtype=np.int32), experts).numpy()
    in_batch = steering_eps(row, positions_of(mask), experts).numpy().reshape(*mask.shape, experts)
    for b in range(mask.shape[0]):
        np.testing.assert_array_equal(in_batch[b], alone)
    other = Steering(mode=mode, seed=4, layers=steering.layers).arrays(model.config)
    assert not np.array_equal(steering_eps({n: a[layer] for n, a in other.items()},
                                           np.arange(length, dtype=np.int32), experts).numpy(), alone)


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
