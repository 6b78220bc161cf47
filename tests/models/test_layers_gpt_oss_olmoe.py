"""The layers OLMoE and GPT-OSS add, each against its transformers module (version pinned in pyproject.toml) built
from a tiny config, its parameters refilled from a seeded normal and copied into moejax's module by hand.

References and bounds, float32 throughout:
- GptOssAttention (biases, sinks; full and sliding window; one left-padded row; more than one query block of
  `causal_attention`; the KV cache, prefill + static-slot chunk + traced-slot token) and OlmoeAttention
  (whole-projection QK-norm, clip_qkv clipping some values, head_dim 22): 1e-5 absolute on outputs of O(1). Both
  sides do the same float32 arithmetic in another order; observed gaps ~1e-6.
- GptOssTopKRouter: logits and weights 1e-6, ids identical (one float32 matmul of 32 terms).
- GptOssExperts and GptOssMLP, with gate and up values past the clamp limit: 1e-5 of the output scale.
- The CPU tiled dispatch (custom VJP), the indexed (`repeat`) path and the ragged_dot path against a dense jnp
  reference and its jax.grad: outputs and gradients (x, combine weights, every weight and bias) 1e-5 of their
  scale, summation order only.
- dequantize_mxfp4 against transformers' convert_moe_packed_tensors: bit-identical in float32 and bfloat16.
- expert_parallel with biases on 8 simulated CPU devices (a subprocess: the device count is fixed when jax starts)
  against one device: outputs and gradients 1e-5 of their scale, as tests/multidevice/test_scaleout.py.
"""

from __future__ import annotations

import functools
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

pytest.importorskip("torch")  # the test extra; without it these tests are skipped

import torch
from transformers import GptOssConfig, OlmoeConfig
from transformers.integrations.mxfp4 import convert_moe_packed_tensors
from transformers.models.gpt_oss import modeling_gpt_oss as gpt_oss
from transformers.models.olmoe import modeling_olmoe as olmoe

from moejax.layers.attention import Attention, KVCache, attention_mask, cache_attention_mask
from moejax.layers.mlp import GPT_OSS_SWIGLU, ClampedSwiGLU, activate
from moejax.layers.moe import Experts, GptOssMoE, Router, RouterControl, mix_experts, topk_softmax
from moejax.mxfp4 import dequantize_mxfp4
from moejax.parallel.mesh import simulated_devices_env

pytestmark = pytest.mark.torch

HERE = Path(__file__).resolve()


def refill(module: torch.nn.Module, seed: int = 0, scale: dict[str, float] | None = None) -> None:
    """Every parameter from a seeded standard normal, times scale[name] where given."""
    torch.manual_seed(seed)
    with torch.no_grad():
        for name, p in module.named_parameters():
            p.data.normal_()
            p.data.mul_((scale or {}).get(name, 1.0))


def arr(t: torch.Tensor) -> jax.Array:
    return jnp.asarray(t.detach().numpy())


def additive(allowed_bts: jax.Array) -> torch.Tensor:
    """A boolean [b, t, s] mask as transformers' eager attention takes it: [b, 1, t, s], 0 or float32 min."""
    allowed = torch.from_numpy(np.array(allowed_bts))[:, None]
    return torch.zeros(allowed.shape).masked_fill(~allowed, torch.finfo(torch.float32).min)


def copy_projections(attn: Attention, ref: torch.nn.Module, n: int, k: int, h: int, bias: bool) -> None:
    d = ref.q_proj.weight.shape[1]
    attn.q_dnh[...] = arr(ref.q_proj.weight.T).reshape(d, n, h)
    attn.k_dkh[...] = arr(ref.k_proj.weight.T).reshape(d, k, h)
    attn.v_dkh[...] = arr(ref.v_proj.weight.T).reshape(d, k, h)
    attn.o_nhd[...] = arr(ref.o_proj.weight.T).reshape(n, h, d)
    if bias:
        attn.q_bias_nh[...] = arr(ref.q_proj.bias).reshape(n, h)
        attn.k_bias_kh[...] = arr(ref.k_proj.bias).reshape(k, h)
        attn.v_bias_kh[...] = arr(ref.v_proj.bias).reshape(k, h)
        attn.o_bias_d[...] = arr(ref.o_proj.bias)


@functools.partial(nnx.jit, static_argnums=5)
def attend(attn: Attention, x_btd, mask, tables, cache=None, slot=0):
    """The attention module jitted (as the models run it): one program, not one per operation."""
    return attn(x_btd, mask, tables, cache, slot)


def gpt_oss_config(**overrides) -> GptOssConfig:
    config = GptOssConfig(**dict(hidden_size=32, intermediate_size=16, num_hidden_layers=2, num_attention_heads=4,
                                 num_key_value_heads=2, head_dim=8, num_local_experts=8, num_experts_per_tok=3,
                                 sliding_window=16, vocab_size=64) | overrides)
    config._attn_implementation = "eager"
    config._experts_implementation = "eager"
    return config


# --- attention ---------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("layer", [0, 1], ids=["sliding", "full"])
def test_gpt_oss_attention_with_sinks_matches_transformers(layer):
    """70 queries (two query blocks), row 1 left-padded by 3 (its first queries see no key: all weight on the sink,
    as in transformers); layer 0 slides over 16 tokens."""
    config = gpt_oss_config()
    n, k, h, d = 4, 2, 8, 32
    ref = gpt_oss.GptOssAttention(config, layer_idx=layer).eval()
    refill(ref, seed=layer, scale={name: d**-0.5 for name in ("q_proj.weight", "k_proj.weight", "v_proj.weight")}
           | {"o_proj.weight": (n * h) ** -0.5})
    attn = Attention(d, n, k, h, bias=True, sinks=True, window=ref.sliding_window, rngs=nnx.Rngs(0))
    assert (layer == 0) == (ref.sliding_window == 16)
    copy_projections(attn, ref, n, k, h, bias=True)
    attn.sinks_n[...] = arr(ref.sinks)

    b, t = 2, 70
    x = torch.randn(b, t, d, generator=torch.Generator().manual_seed(1))
    positions = torch.arange(t)[None].expand(b, t)
    cos, sin = gpt_oss.GptOssRotaryEmbedding(config)(x, positions)
    segments = jnp.ones((b, t), jnp.int32).at[1, :3].set(0)
    allowed = attention_mask(segments, t)
    if ref.sliding_window:
        allowed = allowed & (jnp.arange(t)[:, None] - jnp.arange(t)[None, :] < ref.sliding_window)[None]
    with torch.no_grad():
        want = ref(x, (cos, sin), additive(allowed))[0].numpy()
    tables = tuple(jnp.concatenate([arr(a), arr(a)], axis=-1) for a in (cos, sin))
    mask = attention_mask(segments, t)  # the module applies its own window
    got = np.asarray(attend(attn, arr(x), mask, tables))
    np.testing.assert_allclose(got, want, rtol=0, atol=1e-5)
    assert np.abs(want).max() > 0.3
    np.testing.assert_array_equal(got[1, :3], np.broadcast_to(np.asarray(attn.o_bias_d[...]), (3, d)))

    # The cache path: 60 tokens, then 9 at a static slot, then 1 at a traced slot, as generation runs them.
    x_j, length = arr(x[:1]), 80
    cache = attn.cache(1, length, jnp.float32)
    outs = []
    for start, stop in ((0, 60), (60, 69)):
        valid = jnp.arange(length)[None] < stop
        y, cache = attend(attn, x_j[:, start:stop], cache_attention_mask(valid, start, stop - start),
                          tuple(a[:1, start:stop] for a in tables), cache, start)
        outs.append(y)

    @jax.jit
    def decode(attn, x_btd, tables, cache: KVCache, slot):
        valid = jnp.arange(length)[None] <= slot
        return attn(x_btd, cache_attention_mask(valid, slot, 1), tables, cache, slot)

    y, cache = decode(attn, x_j[:, 69:70], tuple(a[:1, 69:70] for a in tables), cache, jnp.int32(69))
    outs.append(y)
    np.testing.assert_allclose(np.asarray(jnp.concatenate(outs, axis=1)), want[:1], rtol=0, atol=1e-5)


def test_olmoe_attention_whole_projection_qk_norm_and_clip_match_transformers():
    """OLMoE: q_norm over all n*h query features, k_norm over all k*h key features (before RoPE), then q, k, v
    clamped to +-clip_qkv; head_dim 22, 2 query heads sharing one KV head."""
    d, n, k = 44, 2, 1
    h = d // n
    clip = 0.9
    config = OlmoeConfig(hidden_size=d, num_attention_heads=n, num_key_value_heads=k, intermediate_size=8,
                         num_hidden_layers=1, num_experts=4, clip_qkv=clip, vocab_size=64)
    config._attn_implementation = "eager"
    ref = olmoe.OlmoeAttention(config, layer_idx=0).eval()
    refill(ref, seed=2, scale={name: d**-0.5 for name in ("q_proj.weight", "k_proj.weight", "v_proj.weight")}
           | {"o_proj.weight": (n * h) ** -0.5})
    attn = Attention(d, n, k, h, qk_norm_eps=config.rms_norm_eps, qk_norm_over="all", clip_qkv=clip,
                     rngs=nnx.Rngs(0))
    copy_projections(attn, ref, n, k, h, bias=False)
    attn.q_norm_all.weight[...] = arr(ref.q_norm.weight).reshape(n, h)
    attn.k_norm_all.weight[...] = arr(ref.k_norm.weight).reshape(k, h)

    b, t = 2, 13
    x = torch.randn(b, t, d, generator=torch.Generator().manual_seed(3))
    with torch.no_grad():
        normed = [ref.q_norm(ref.q_proj(x)), ref.k_norm(ref.k_proj(x)), ref.v_proj(x)]
        cos, sin = olmoe.OlmoeRotaryEmbedding(config)(x, torch.arange(t)[None].expand(b, t))
        segments = jnp.ones((b, t), jnp.int32)
        mask = attention_mask(segments, t)
        want = ref(x, (cos, sin), additive(mask))[0].numpy()
    for a in normed:  # the clamp does something, and not to everything
        assert 0.05 < float((a.abs() > clip).float().mean()) < 0.8
    got = np.asarray(attend(attn, arr(x), mask, (arr(cos), arr(sin))))
    np.testing.assert_allclose(got, want, rtol=0, atol=1e-5)


def test_attention_rejects_an_unknown_qk_norm_span():
    with pytest.raises(ValueError, match="qk_norm_over"):
        Attention(8, 2, 1, 4, qk_norm_eps=1e-6, qk_norm_over="layer", rngs=nnx.Rngs(0))


# --- router and experts ------------------------------------------------------------------------------------------


def test_gpt_oss_router_matches_transformers():
    config = gpt_oss_config()
    ref = gpt_oss.GptOssTopKRouter(config)
    refill(ref, seed=4, scale={"weight": 32**-0.5})
    router = Router(32, 8, bias=True, rngs=nnx.Rngs(0))
    router.w_de[...] = arr(ref.weight.T)
    router.b_e[...] = arr(ref.bias)
    x = torch.randn(40, 32, generator=torch.Generator().manual_seed(5))
    with torch.no_grad():
        want_logits, want_weights, want_ids = (a.numpy() for a in ref(x))
    logits = router(arr(x))
    weights, ids = topk_softmax(logits, 3)
    np.testing.assert_allclose(np.asarray(logits), want_logits, rtol=0, atol=1e-6)
    np.testing.assert_array_equal(np.asarray(ids), want_ids)
    np.testing.assert_allclose(np.asarray(weights), want_weights, rtol=0, atol=1e-6)

    # Forced experts take the softmax over their own logits; steering changes the logits the top-k sees.
    forced = jnp.tile(jnp.array([[7, 0, 2]], jnp.int32), (40, 1))
    control = RouterControl(force_ids=forced, force_mask=jnp.arange(40) % 2 == 0)
    weights, ids = topk_softmax(logits, 3, control)
    chosen = np.where(np.arange(40)[:, None] % 2 == 0, np.asarray(forced), want_ids)
    picked = np.take_along_axis(np.asarray(logits), chosen, axis=-1)
    expected = np.exp(picked - picked.max(-1, keepdims=True))
    np.testing.assert_array_equal(np.asarray(ids), chosen)
    np.testing.assert_allclose(np.asarray(weights), expected / expected.sum(-1, keepdims=True), rtol=0, atol=1e-6)
    promote = jnp.zeros(8, bool).at[5].set(True)
    steer = RouterControl(shift_e=jnp.zeros(8), promote_e=promote, suppress_e=jnp.zeros(8, bool),
                          noise_key=jnp.zeros(2, jnp.uint32), eps_std=jnp.float32(0.0))
    _, ids = topk_softmax(steer.steer(logits), 3, steer)
    assert (np.asarray(ids) == 5).any(axis=-1).all()  # at max(z) (eps 0 here): among the top 3 everywhere
    assert not (np.asarray(topk_softmax(logits, 3)[1]) == 5).any(axis=-1).all()


def gpt_oss_experts(seed: int = 6) -> tuple[torch.nn.Module, dict[str, jax.Array]]:
    """transformers' GptOssExperts (8 experts, d 32, f 16), scaled so that some gate and up values pass the limit,
    and the same weights as moejax's w (gate_up de-interleaved: gate = [..., ::2], up = [..., 1::2])."""
    ref = gpt_oss.GptOssExperts(gpt_oss_config())
    refill(ref, seed=seed, scale={"gate_up_proj": 0.6, "gate_up_proj_bias": 0.5, "down_proj": 0.1,
                                  "down_proj_bias": 0.5})
    gate_up, gate_up_bias = arr(ref.gate_up_proj), arr(ref.gate_up_proj_bias)
    w = {"gate_edf": gate_up[..., ::2], "up_edf": gate_up[..., 1::2], "down_efd": arr(ref.down_proj),
         "gate_bias_ef": gate_up_bias[:, ::2], "up_bias_ef": gate_up_bias[:, 1::2],
         "down_bias_ed": arr(ref.down_proj_bias)}
    return ref, w


def test_gpt_oss_experts_match_transformers():
    ref, w = gpt_oss_experts()
    tokens, k = 45, 3
    g = torch.Generator().manual_seed(7)
    x = torch.randn(tokens, 32, generator=g)
    ids = torch.stack([torch.randperm(8, generator=g)[:k] for _ in range(tokens)])
    weights = torch.softmax(torch.randn(tokens, k, generator=g), -1)
    with torch.no_grad():
        want = ref(x, ids, weights).numpy()
        pre = x @ ref.gate_up_proj[0] + ref.gate_up_proj_bias[0]
    limit = GPT_OSS_SWIGLU.limit
    assert (pre[:, ::2] > limit).any() and (pre[:, 1::2].abs() > limit).any()
    experts = Experts(8, 32, 16, activation=GPT_OSS_SWIGLU, bias=True, rngs=nnx.Rngs(0))
    for name, value in w.items():
        getattr(experts, name)[...] = value
    for tiles in (None, ()):  # the CPU tiles and the ragged_dot path
        got = np.asarray(jax.jit(mix_experts, static_argnums=(4, 5))(arr(x), arr(ids).astype(jnp.int32), arr(weights),
                                                                     w, GPT_OSS_SWIGLU, tiles))
        np.testing.assert_allclose(got, want, rtol=0, atol=1e-5 * np.abs(want).max())
    got = np.asarray(nnx.jit(lambda experts, *args: experts(*args))(experts, arr(x), arr(ids).astype(jnp.int32),
                                                                     arr(weights)))
    np.testing.assert_allclose(got, want, rtol=0, atol=1e-5 * np.abs(want).max())


def test_gpt_oss_block_matches_transformers_mlp():
    config = gpt_oss_config()
    ref = gpt_oss.GptOssMLP(config)
    ref_experts, w = gpt_oss_experts(seed=8)
    ref.experts.load_state_dict(ref_experts.state_dict())
    refill(ref.router, seed=9, scale={"weight": 32**-0.5})
    block = GptOssMoE(32, 16, 8, 3, rngs=nnx.Rngs(0))
    block.router.w_de[...] = arr(ref.router.weight.T)
    block.router.b_e[...] = arr(ref.router.bias)
    for name, value in w.items():
        getattr(block.experts, name)[...] = value
    x = torch.randn(2, 11, 32, generator=torch.Generator().manual_seed(10))
    with torch.no_grad():
        want, want_weights = (a.numpy() for a in ref(x))
    got, routing = block(arr(x))
    np.testing.assert_allclose(np.asarray(got), want, rtol=0, atol=1e-5 * np.abs(want).max())
    np.testing.assert_allclose(np.asarray(routing.weights), want_weights, rtol=0, atol=1e-6)


# --- dispatch paths and gradients ------------------------------------------------------------------------------------


def dense_reference(x_td, ids_tk, weights_tk, w, activation):
    """Each token's k experts computed from gathered weights, no dispatch: sum_k weight * expert(x)."""
    def project(name, bias, a, spec):
        y = jnp.einsum(spec, a, w[name][ids_tk])
        return y + w[bias][ids_tk] if bias in w else y

    up = project("up_edf", "up_bias_ef", x_td, "td,tkdf->tkf")
    gate = project("gate_edf", "gate_bias_ef", x_td, "td,tkdf->tkf") if "gate_edf" in w else None
    y_tkd = project("down_efd", "down_bias_ed", activate(activation, up, gate), "tkf,tkfd->tkd")
    return jnp.einsum("tkd,tk->td", y_tkd, weights_tk)


def dispatch_problem(activation, tokens=53, experts=6, k=2, d=16, f=12, seed=0):
    keys = jax.random.split(jax.random.key(seed), 9)
    ids = np.array(jax.random.randint(keys[0], (tokens, k), 0, experts - 1))
    ids[:, 1] = np.where(ids[:, 0] == ids[:, 1], (ids[:, 0] + 1) % (experts - 1), ids[:, 1])  # the last expert idle
    # Pre-activations of scale ~4 reach past the limit 3 used here, both ways.
    shapes = {"gate_edf": (experts, d, f), "up_edf": (experts, d, f), "down_efd": (experts, f, d),
              "gate_bias_ef": (experts, f), "up_bias_ef": (experts, f), "down_bias_ed": (experts, d)}
    w = {name: jax.random.normal(key, shape) for key, (name, shape) in zip(keys[1:7], shapes.items(), strict=True)}
    w["down_efd"] = w["down_efd"] * f**-0.5
    x = jax.random.normal(keys[7], (tokens, d))
    weights = jax.nn.softmax(jax.random.normal(keys[8], (tokens, k)), -1)
    return x, jnp.asarray(ids, jnp.int32), weights, w


def assert_close_trees(got, want):
    for a, b in zip(jax.tree.leaves(got), jax.tree.leaves(want), strict=True):
        scale = float(jnp.abs(b).max())
        assert scale > 0
        np.testing.assert_allclose(np.asarray(a), np.asarray(b), rtol=0, atol=1e-5 * scale)


@pytest.mark.slow
def test_biased_dispatch_paths_and_gradients_match_a_dense_reference():
    """Tiled (custom VJP), indexed (a layer of stacked weights, read in place) and ragged_dot: outputs and gradients
    w.r.t. x, the combine weights and every weight and bias; and each with a device's share of the experts."""
    activation = ClampedSwiGLU(alpha=1.702, limit=3.0)
    x, ids, weights, w = dispatch_problem(activation)
    pre = jnp.einsum("td,edf->tef", x, w["gate_edf"]) + w["gate_bias_ef"]
    assert float(jnp.mean(pre > 3.0)) > 0.05

    def loss(run):
        return jax.jit(jax.value_and_grad(lambda x, wt, w: jnp.sum(jnp.sin(run(x, wt, w))), argnums=(0, 1, 2)))

    want = loss(lambda x, wt, w: dense_reference(x, ids, wt, w, activation))(x, weights, w)
    for tiles in ((16, 8), ()):
        assert_close_trees(loss(lambda x, wt, w, t=tiles: mix_experts(x, ids, wt, w, activation, t))(x, weights, w),
                           want)
        # One device's share of the experts (expert_parallel): the shares' outputs add up to the whole.
        mix = jax.jit(mix_experts, static_argnums=(4, 5))
        shares = sum(mix(x, ids, weights, jax.tree.map(lambda a, f=first: a[f:f + 3], w), activation, tiles,
                         first_expert=jnp.int32(first)) for first in (0, 3))
        assert_close_trees(shares, dense_reference(x, ids, weights, w, activation))

    # The indexed path: layer 1 of a stack of 2; its gradient lands in row 1 of the stack, row 0 stays zero.
    stacked = jax.tree.map(lambda a: jnp.stack([a * 0.5, a]), w)
    value, (dx, dwt, dw) = loss(lambda x, wt, w: mix_experts(x, ids, wt, w, activation, repeat=jnp.int32(1)))(
        x, weights, stacked)
    assert_close_trees((value, dx, dwt, jax.tree.map(lambda a: a[1], dw)), want)
    assert all(float(jnp.abs(a[0]).max()) == 0 for a in jax.tree.leaves(dw))


@pytest.mark.slow
def test_expert_parallel_with_biases_matches_one_device(tmp_path):
    """In a subprocess with 8 simulated CPU devices (about a minute): meshes with tensor=2 (the down bias must enter
    the tensor sum once), with and without a data axis, both exchanges, against mix_experts on one device; outputs
    and gradients."""
    script = tmp_path / "expert_parallel.py"
    script.write_text(textwrap.dedent(f"""
        import sys
        sys.path.insert(0, {str(HERE.parent)!r})
        import jax, jax.numpy as jnp
        from moejax.layers.mlp import GPT_OSS_SWIGLU
        from moejax.layers.moe import expert_parallel, mix_experts
        from moejax.parallel.mesh import make_mesh
        from test_layers_gpt_oss_olmoe import assert_close_trees, dispatch_problem

        assert jax.device_count() == 8
        x, ids, weights, w = dispatch_problem(GPT_OSS_SWIGLU, tokens=61, experts=8, k=3, d=16, f=12, seed=3)

        def loss(run):
            return jax.value_and_grad(lambda x, wt, w: jnp.sum(jnp.sin(run(x, wt, w))), argnums=(0, 1, 2))

        want = jax.jit(loss(lambda x, wt, w: mix_experts(x, ids, wt, w, GPT_OSS_SWIGLU)))(x, weights, w)
        for spec in ("expert=4,tensor=2", "data=2,expert=2,tensor=2"):
            mesh = make_mesh(spec)
            for exchange in ("all_gather", "all_to_all"):
                run = loss(lambda x, wt, w, ex=exchange: expert_parallel(x, ids, wt, w, GPT_OSS_SWIGLU, mesh,
                                                                         exchange=ex))
                with jax.set_mesh(mesh):
                    assert_close_trees(jax.jit(run)(x, weights, w), want)
                print("ok", spec, exchange)
    """))
    env = simulated_devices_env(8, PYTHONPATH=os.pathsep.join([str(HERE.parents[2]), os.environ.get("PYTHONPATH", "")]))
    done = subprocess.run([sys.executable, str(script)], capture_output=True, text=True, env=env, timeout=600,
                          cwd=HERE.parents[2])
    assert done.returncode == 0, done.stdout + done.stderr[-4000:]
    assert done.stdout.count("ok ") == 4


# --- MXFP4 ---------------------------------------------------------------------------------------------------------


def test_dequantize_mxfp4_matches_transformers_bit_for_bit():
    rng = np.random.default_rng(11)
    blocks = rng.integers(0, 256, (3, 6, 2, 16), dtype=np.uint8)  # [E, rows, groups, 16 bytes]
    scales = rng.integers(0, 253, (3, 6, 2), dtype=np.uint8)  # up to 6 * 2**125, within range
    scales[0, 0] = (0, 254)  # the smallest exponent, and the largest on values up to 1.5 (codes 0-3 and 8-11)
    small = np.array([0, 1, 2, 3, 8, 9, 10, 11], np.uint8)
    blocks[0, 0, 1] = small[rng.integers(0, 8, 16)] | small[rng.integers(0, 8, 16)] << 4
    got = dequantize_mxfp4(blocks, scales, name="model.layers.0.mlp.experts.down_proj")
    assert got.dtype == np.float32 and got.shape == (3, 64, 6)
    for dtype, bits in ((torch.float32, torch.int32), (torch.bfloat16, torch.int16)):
        want = convert_moe_packed_tensors(torch.from_numpy(blocks), torch.from_numpy(scales), dtype=dtype)
        assert want.shape == got.shape
        assert torch.equal(torch.from_numpy(got).to(dtype).view(bits), want.view(bits)), dtype


def test_dequantize_mxfp4_refuses_a_nan_scale_or_an_overflow_and_names_the_tensor():
    blocks = np.zeros((2, 4, 1, 16), np.uint8)
    scales = np.full((2, 4, 1), 127, np.uint8)
    scales[1, 2, 0] = 255
    with pytest.raises(ValueError, match=r"gate_up_proj.*255"):
        dequantize_mxfp4(blocks, scales, name="model.layers.3.mlp.experts.gate_up_proj")
    scales[1, 2, 0] = 254
    blocks[1, 2, 0, 5] = 0x40  # 2.0 * 2**127 in the high nibble: past the range
    with pytest.raises(ValueError, match=r"gate_up_proj_blocks: 1 MXFP4 value"):
        dequantize_mxfp4(blocks, scales, name="gate_up_proj_blocks")
    blocks[1, 2, 0, 5] = 0x30  # 1.5 * 2**127 fits
    assert dequantize_mxfp4(blocks, scales).max() == np.float32(1.5 * 2.0**127)
    with pytest.raises(ValueError, match="down_proj.*uint8"):
        dequantize_mxfp4(blocks.astype(np.int8), scales, name="down_proj")
