"""Expert-selective training (docs/training.md, training only some experts): only the selected experts' slices of the
stacked expert tensors train (optionally the routers of their layers), everything else comes out of every step bit
for bit, weight decay included; the gradients of the selected slices equal torch autograd's; the training-time
routing restriction reaches only the selected experts and leaves evaluation and export unrestricted; the optimizer
keeps moments for the trained slices alone."""

from __future__ import annotations

import json
import shutil

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from flax import nnx

pytest.importorskip("torch")  # the test extra

import torch
import transformers
from safetensors.numpy import save_file

import moejax
from moejax.errors import DataError, SettingsError
from moejax.layers import moe
from moejax.layers.stack import layer_position, segment_layer_ids
from moejax.models import config_class
from moejax.parity.fixtures import make_checkpoint, steered
from moejax.routing.experts import read_selection
from moejax.training.adamw import Slices
from moejax.training.config import TrainConfig
from moejax.training.losses import load_balancing_loss, next_token_loss, sigmoid_balance_loss
from moejax.training.step import _dotted, init_state, make_train_step, route_control, schedule, trainable

pytestmark = [pytest.mark.torch, pytest.mark.slow]  # the quick loop covers their parts (steering, packing)
# MoE layers 0 and 1 (the Nemotron-H tiny model has two), k = 3 experts each, for Nemotron-H within one group of its
# group-limited router (2 groups of 4, one chosen): with fewer than k eligible experts, the remaining slots of a
# restricted token are a tie (probability 0, or a choice score of -inf), and which expert fills them is up to each
# framework's top-k (transformers' may even pick an allowed expert of a group it did not choose).
SELECTIONS = {"qwen3_moe": {"1": [2, 5, 6], "0": [1, 3, 7]}, "nemotron_h": {"0": [4, 5, 6], "1": [0, 1, 2]},
              "olmoe": {"0": [0, 4, 5], "2": [1, 2, 7]}, "gpt_oss": {"0": [3, 4, 6], "3": [0, 2, 5]}}
# Per selected expert, its entries over all its tensors (weights and biases); d hidden, x expert input, f expert ffn.
PER_EXPERT = {"qwen3_moe": lambda d, x, f: 3 * d * f, "olmoe": lambda d, x, f: 3 * d * f,
              "nemotron_h": lambda d, x, f: 2 * x * f, "gpt_oss": lambda d, x, f: 3 * d * f + 2 * f + d}
EXPERT_TENSORS = {"qwen3_moe": 3, "olmoe": 3, "nemotron_h": 2, "gpt_oss": 6}


def overrides(arch):
    return dict(config_class(arch).transformers_overrides)


@pytest.fixture(scope="module", params=sorted(SELECTIONS))
def checkpoint(request, tmp_path_factory):
    reference, path = make_checkpoint(request.param, tmp_path_factory.mktemp(request.param) / "model", seed=8)
    return request.param, reference, path


def selected_rows(name: str, config, selection: dict[str, list[int]], routers: bool):
    """{(repeat, expert) or (repeat,)}: the slices of parameter `name` that may change."""
    where = layer_position(name)
    if where is None:
        return set()
    blocks = segment_layer_ids(config.layer_kinds)[where[0]][where[1]]
    moe = {block: i for i, block in enumerate(config.moe_layers)}
    layers = [moe.get(b) for b in blocks]
    if "experts." in name:
        return {(r, e) for r, layer in enumerate(layers) for e in selection.get(str(layer), [])}
    if routers and name.rsplit(".", 1)[0].endswith("router"):  # its weight and any bias
        return {(r,) for r, layer in enumerate(layers) if str(layer) in selection}
    return set()


def selection_training(arch: str, routers: bool) -> TrainConfig:
    """Training of SELECTIONS[arch] with the routing restriction (the tests that share it share its compiled step)."""
    return TrainConfig(learning_rate=1e-2, weight_decay=0.1, total_steps=10, warmup_steps=1,
                       train_experts=SELECTIONS[arch], train_routers=routers, route_to_trained=True)


def run_steps(path, arch, cfg, steps=3):
    model = moejax.from_pretrained(path, **overrides(arch))
    graphdef, state, tx = init_state(model, cfg)
    before = jax.tree.map(np.array, state.params)
    step = make_train_step(graphdef, tx, cfg, model.config)
    ids = np.random.default_rng(0).integers(1, 97, (2, 16))
    for _ in range(steps):
        state, metrics = step(state, {"input_ids": ids})
        assert bool(metrics["finite"])
    return model.config, before, state


@pytest.mark.parametrize("routers", [False, True])
def test_only_the_selected_slices_change(checkpoint, routers):
    arch, _, path = checkpoint
    SELECTION = SELECTIONS[arch]
    config, before, state = run_steps(path, arch, selection_training(arch, routers))
    changed_somewhere = set()
    for (p, old), new in zip(jax.tree_util.tree_flatten_with_path(before)[0], jax.tree.leaves(state.params),
                             strict=True):
        name = _dotted(p)
        new = np.asarray(new)
        allowed = selected_rows(name, config, SELECTION, routers)
        if not allowed:
            np.testing.assert_array_equal(new, old, err_msg=f"{name} changed but is frozen")
            continue
        depth = len(next(iter(allowed)))
        differs = (new != old).reshape(*old.shape[:depth], -1).any(-1)
        moved = {tuple(int(i) for i in at) for at in np.argwhere(differs)}
        assert moved <= allowed, f"{name}: frozen slices {sorted(moved - allowed)} changed"
        changed_somewhere |= {(name, a) for a in moved}
        for at in allowed - moved:
            raise AssertionError(f"{name}: selected slice {at} did not change")
    assert changed_somewhere


def test_whole_blocks_train_alone(checkpoint):
    """train_blocks (the study's complete-final-layers baseline): only those blocks' slices of the stacked tensors
    move, every one of them, and nothing else."""
    arch, _, path = checkpoint
    model = moejax.from_pretrained(path)
    last = len(model.config.layer_kinds) - 1
    cfg = TrainConfig(learning_rate=1e-2, total_steps=10, warmup_steps=1, train_blocks=[last])
    config, before, state = run_steps(path, arch, cfg, steps=2)
    moved_blocks = set()
    for (p, old), new in zip(jax.tree_util.tree_flatten_with_path(before)[0], jax.tree.leaves(state.params),
                             strict=True):
        name = _dotted(p)
        new = np.asarray(new)
        where = layer_position(name)
        if where is None or name.endswith("correction_e"):
            np.testing.assert_array_equal(new, old, err_msg=name)
            continue
        blocks = segment_layer_ids(config.layer_kinds)[where[0]][where[1]]
        for r, block in enumerate(blocks):
            if block == last:
                assert (new[r] != old[r]).any(), f"{name}: block {block} did not move"
                moved_blocks.add(block)
            else:
                np.testing.assert_array_equal(new[r], old[r], err_msg=f"{name} block {block}")
    assert moved_blocks == {last}


def test_optimizer_state_holds_the_trained_slices_only(checkpoint):
    arch, _, path = checkpoint
    SELECTION = SELECTIONS[arch]
    model = moejax.from_pretrained(path)
    cfg = TrainConfig(train_experts=SELECTION, train_routers=True)
    _, state, _ = init_state(model, cfg)
    config = model.config
    d, f = config.hidden_size, config.expert_ffn_size
    per_expert = PER_EXPERT[arch](d, config.expert_input_size, f)
    slices = sum(len(ids) for ids in SELECTION.values())
    routers = len(SELECTION) * (d + (arch == "gpt_oss")) * config.num_routed_experts  # GPT-OSS: and its bias
    want = slices * per_expert + routers
    moments = [x for x in jax.tree.leaves(state.opt_state.mu)]
    assert sum(int(np.prod(x.shape)) for x in moments) == want
    assert sum(int(np.prod(x.shape)) for x in jax.tree.leaves(state.opt_state.nu)) == want


def test_selected_gradients_equal_torch_autograd(checkpoint, tmp_path):
    """The loss of the first step (cross-entropy plus the balance term, routing restricted to the selected experts
    in their layers), its gradient in moejax against torch autograd on transformers' model with the same restriction
    hooked into its routers, compared on the selected slices and the routers of their layers."""
    arch, reference, path = checkpoint
    SELECTION = SELECTIONS[arch]
    cfg = TrainConfig(train_experts=SELECTION, train_routers=True, route_to_trained=True, lb_coef=0.05)
    model = moejax.from_pretrained(path, **overrides(arch))
    config = model.config
    control = route_control(cfg, config)
    ids = np.random.default_rng(1).integers(1, 97, (2, 12))
    graphdef, params = nnx.split(model)

    def loss(params):
        out = nnx.merge(graphdef, params).forward(jnp.asarray(ids), jnp.ones(ids.shape, jnp.int32),
                                                  jnp.broadcast_to(jnp.arange(ids.shape[1]), ids.shape), True,
                                                  control=control)
        ce = next_token_loss(out.logits, jnp.asarray(ids))
        valid = jnp.ones(ids.shape, bool)
        sigmoid = config.router_kind == "sigmoid"  # transformers' Nemotron-H computes no balance loss
        aux = (sigmoid_balance_loss(out.router_logits, out.router_expert_ids, valid) if sigmoid
               else load_balancing_loss(out.router_logits, config.num_experts_per_tok, valid))
        return ce + (0.0 if sigmoid else 0.05 * aux), out

    (total, out), grads = jax.jit(jax.value_and_grad(loss, has_aux=True))(params)
    reference.zero_grad()
    arrays = {"allowed_e": np.asarray(route_control(cfg, config).allowed_e)}
    with steered(reference, arrays):
        kwargs = {"output_router_logits": True} if config.router_kind != "sigmoid" else {}
        if config.router_kind != "sigmoid":
            reference.router_aux_loss_coef = 0.05
        torch_out = reference(input_ids=torch.from_numpy(ids), labels=torch.from_numpy(ids), **kwargs)
        torch_out.loss.backward()
    assert abs(float(total) - torch_out.loss.item()) <= 1e-5, (float(total), torch_out.loss.item())
    grad_dir = tmp_path / "grads"
    grad_dir.mkdir()
    shutil.copy(path / "config.json", grad_dir / "config.json")
    grads_pt = {name: (p.grad if p.grad is not None else torch.zeros_like(p)).numpy().copy()
                for name, p in reference.named_parameters()}
    grads_pt |= {name: np.zeros(b.shape, np.float32) for name, b in reference.named_buffers()
                 if name.endswith("e_score_correction_bias")}  # the loader wants it; no gradient
    save_file(grads_pt, str(grad_dir / "model.safetensors"))
    want = dict(nnx.to_flat_state(nnx.state(moejax.from_pretrained(grad_dir), nnx.Param)))
    compared = 0
    for key, value in nnx.to_flat_state(grads):
        name = ".".join(str(k) for k in key)
        rows = selected_rows(name, config, SELECTION, routers=True)
        for at in rows:
            g, w = np.asarray(value[...])[at], np.asarray(want[key][...])[at]
            scale = np.abs(w).max()
            assert scale > 0, f"{name}{at}: no gradient in the reference"
            assert np.abs(g - w).max() <= 1e-4 * scale, f"{name}{at}: {np.abs(g - w).max()} vs scale {scale}"
            compared += 1
    assert compared == (sum(len(v) for v in SELECTION.values()) * EXPERT_TENSORS[arch]
                        + len(SELECTION) * (2 if arch == "gpt_oss" else 1))


def test_training_routes_only_to_the_selected_experts(checkpoint):
    """With --route-to-trained, a selected layer's tokens reach only its selected experts (k of them selected here);
    with fewer than k selected, the other slots carry weight 0."""
    arch, _, path = checkpoint
    model = moejax.from_pretrained(path)
    config = model.config
    ids = jnp.asarray(np.random.default_rng(3).integers(1, 97, (2, 12)))
    graphdef, params = nnx.split(model)

    @jax.jit  # the restriction is data: one program for both selections
    def first_layer_routing(params, control):
        out = nnx.merge(graphdef, params).forward(ids, jnp.ones(ids.shape, jnp.int32),
                                                  jnp.broadcast_to(jnp.arange(12), ids.shape), True, control=control)
        return out.router_expert_ids[0], out.router_weights[0]

    for layer0 in (SELECTIONS[arch]["0"], [2]):
        cfg = TrainConfig(train_experts={"0": layer0}, route_to_trained=True)
        chosen, weights = map(np.asarray, first_layer_routing(params, route_control(cfg, config)))
        inside = np.isin(chosen, layer0)
        assert inside.any(axis=-1).all()
        assert (weights[~inside] == 0).all(), "a restricted expert carries weight"
        if len(layer0) >= config.num_experts_per_tok:
            assert inside.all()


def test_restriction_is_training_only_and_export_loads_in_transformers(checkpoint, tmp_path):
    """After --route-to-trained training, the model (forward, export) routes with the unrestricted router, and
    transformers loads the export with logits matching moejax's. The training is test_only_the_selected_slices_change's
    without routers (the same train step, compiled once): k experts selected in the first MoE layer, so a leaked
    restriction would route every token there to those k alone."""
    arch, _, path = checkpoint
    selected = SELECTIONS[arch]["0"]
    config, _, state = run_steps(path, arch, selection_training(arch, routers=False), steps=2)
    assert len(selected) == config.num_experts_per_tok
    model = moejax.from_pretrained(path, **overrides(arch))
    nnx.update(model, state.params)
    ids = np.random.default_rng(2).integers(1, 97, (2, 12))
    out = model(ids, return_router_logits=True)
    chosen = np.unique(np.asarray(out.router_expert_ids[0]))
    assert set(chosen.tolist()) - set(selected), "evaluation routes as in training: the restriction leaked"
    moejax.export_pretrained(model, tmp_path / "hf")
    shutil.copy(path / "config.json", tmp_path / "hf" / "config.json")
    exported = transformers.AutoModelForCausalLM.from_pretrained(tmp_path / "hf", dtype=torch.float32).eval()
    with torch.no_grad():
        want = exported(input_ids=torch.from_numpy(ids)).logits.numpy()
    assert np.abs(np.asarray(out.logits) - want).max() <= 1e-4


def test_selection_files(tmp_path):
    gap = {"he": {"seft": {"3": [1, 2]}, "ssft_k5": {"3": [1, 2, 7]}}, "en": {"seft": {"3": [4]},
                                                                          "ssft_k5": {"3": [4, 7]}}}
    (tmp_path / "sel.json").write_text(json.dumps(gap))
    assert read_selection(f"{tmp_path / 'sel.json'}:he") == {"3": [1, 2, 7]}
    assert read_selection(f"{tmp_path / 'sel.json'}:en:seft") == {"3": [4]}
    (tmp_path / "experts.json").write_text(json.dumps({"experts": {"0": {"ids": [3, 1], "scores": [1, 0]}}}))
    assert read_selection(str(tmp_path / "experts.json")) == {"0": [1, 3]}
    (tmp_path / "plain.json").write_text(json.dumps({"2": [5]}))
    assert read_selection(str(tmp_path / "plain.json")) == {"2": [5]}
    with pytest.raises(DataError, match="no language 'ja'"):
        read_selection(f"{tmp_path / 'sel.json'}:ja")
    with pytest.raises(DataError, match="name one as"):
        read_selection(str(tmp_path / "sel.json"))
    with pytest.raises(DataError, match="has no 'ssft_k3'"):
        read_selection(f"{tmp_path / 'sel.json'}:he:ssft_k3")


@pytest.mark.parametrize("selection,message", [
    ({"9": [1]}, "layer 9 is not an MoE layer"),
    ({"0": [99]}, "names expert id(s) [99]"),
    ({"0": []}, "selects no expert"),
])
def test_bad_selections(checkpoint, selection, message):
    _, _, path = checkpoint
    with pytest.raises(SettingsError) as caught:
        init_state(moejax.from_pretrained(path), TrainConfig(train_experts=selection))
    assert message in str(caught.value)


def test_trained_rows_take_the_stacks_gradient_at_those_rows():
    """The expert kernel on TrainedRows (a stacked expert tensor of which a few (repeat, expert) rows train) against
    the same kernel on the plain stack: same output, same input and combine-weight gradients, and the rows' gradient
    is the stack's gradient at those rows, on the tiled CPU path and the ragged_dot path, for a layer with several
    trained rows, one whose trained expert gets no token, and one with none. Bound: float32 summation order (the
    input gradient adds the experts' tiles in another order)."""
    tokens, experts, k, d, f = 40, 6, 2, 16, 12
    keys = jax.random.split(jax.random.key(0), 6)
    stack = {"up_edf": jax.random.normal(keys[0], (3, experts, d, f)) * d**-0.5,
             "gate_edf": jax.random.normal(keys[1], (3, experts, d, f)) * d**-0.5,
             "down_efd": jax.random.normal(keys[2], (3, experts, f, d)) * f**-0.5}
    x = jax.random.normal(keys[3], (tokens, d))
    ids = jnp.stack([jnp.arange(tokens) % 5, (jnp.arange(tokens) + 2) % 5], -1).astype(jnp.int32)  # 5 gets none
    weights = jax.nn.softmax(jax.random.normal(keys[4], (tokens, k)), -1)
    repeat_n, expert_n = (0, 0, 1, 1), (1, 4, 2, 5)
    rows = {name: value[np.array(repeat_n), np.array(expert_n)] for name, value in stack.items()}

    def loss(x, weights, w, tiles, repeat):
        return jnp.sum(jnp.sin(moe.mix_experts(x, ids, weights, w, "swiglu", tiles, repeat=repeat)))

    def selective(x, weights, rows, tiles, repeat):
        w = {name: moe.TrainedRows(stack[name], rows[name], repeat_n, expert_n) for name in stack}
        return loss(x, weights, w, tiles, repeat)

    plain = jax.jit(jax.value_and_grad(loss, argnums=(0, 1, 2)), static_argnums=3)
    trained = jax.jit(jax.value_and_grad(selective, argnums=(0, 1, 2)), static_argnums=3)
    for tiles in [(16, 8), ()]:
        for repeat in range(3):
            want, want_g = plain(x, weights, stack, tiles, jnp.int32(repeat))
            got, got_g = trained(x, weights, rows, tiles, jnp.int32(repeat))
            assert float(got) == pytest.approx(float(want), rel=1e-6)
            for a, b in zip(want_g[:2], got_g[:2], strict=True):
                np.testing.assert_allclose(b, a, rtol=0, atol=1e-5 * float(jnp.abs(a).max()))
            mine = np.array(repeat_n) == repeat
            for name in stack:
                at = np.asarray(want_g[2][name])[np.array(repeat_n), np.array(expert_n)]
                got_rows = np.asarray(got_g[2][name])
                np.testing.assert_allclose(got_rows, at, rtol=0, atol=1e-5 * max(np.abs(at).max(), 1))
                busy = mine & (np.array(expert_n) != 5)
                assert all(np.abs(got_rows[i]).max() > 0 for i in np.flatnonzero(busy)), "a trained row got none"
                assert not got_rows[~busy].any(), "a row of another layer, or of an expert without tokens, moved"
    with pytest.raises(TypeError, match="read whole"):
        moe.TrainedRows(stack["up_edf"], rows["up_edf"], repeat_n, expert_n)[0]


# One MoE layer with a frozen MoE layer above it (its tokens need the input gradient through it, its weights none),
# and several layers with their routers.
STEP_SELECTIONS = [("qwen3_moe", {"2": [1, 4, 6]}, False), ("qwen3_moe", {"0": [0, 5], "1": [2, 3, 7], "3": [4]}, True),
                   ("nemotron_h", {"0": [4, 5, 6]}, False), ("nemotron_h", {"0": [1, 2], "1": [0, 3, 5]}, True)]


@pytest.mark.parametrize("arch,selection,routers", STEP_SELECTIONS)
def test_selective_step_equals_the_full_gradient_masked(tmp_path, arch, selection, routers):
    """The selective step against an independent computation: the gradient of the whole model's loss (every
    parameter, jax.grad through the plain stacked expert weights), masked to the trained slices, then optax's
    clip_by_global_norm + adamw on those slices. Step 1 (learning rate 0 in warm-up) leaves its gradient in the first
    moment: mu = (1 - b1) * clip * g, compared at float32 summation order (1e-5 of the largest entry); step 2 (same
    batch, same parameters) gives the update, compared to 1e-6 relative (plus, where a gradient is near 0, what its
    rounding does to Adam's g / |g|). Everything else stays bit for bit."""
    _, path = make_checkpoint(arch, tmp_path / "model", seed=3)
    cfg = TrainConfig(learning_rate=1e-2, warmup_steps=1, total_steps=10, weight_decay=0.1, lb_coef=0.05,
                      compute_dtype="float32", train_experts=selection, train_routers=routers)
    model = moejax.from_pretrained(path)
    config = model.config
    ids = np.random.default_rng(5).integers(1, 97, (2, 16))
    graphdef, params = nnx.split(model)

    def loss(params):
        out = nnx.merge(graphdef, params).forward(jnp.asarray(ids), jnp.ones(ids.shape, jnp.int32),
                                                  jnp.broadcast_to(jnp.arange(ids.shape[1]), ids.shape), True)
        valid = jnp.ones(ids.shape, bool)
        aux = (sigmoid_balance_loss(out.router_logits, out.router_expert_ids, valid) if config.router_kind == "sigmoid"
               else load_balancing_loss(out.router_logits, config.num_experts_per_tok, valid))
        return next_token_loss(out.logits, jnp.asarray(ids)) + 0.05 * aux

    full = jax.jit(jax.grad(loss))(params)
    graphdef, state, tx = init_state(model, cfg)
    start = jax.tree.map(np.array, state.params)
    train = trainable(cfg.resolved(config), state.params, config)
    step = make_train_step(graphdef, tx, cfg, config)
    state, metrics = step(state, {"input_ids": ids})
    masked = [np.asarray(t.take(g)) for t, g in zip(jax.tree.leaves(train), jax.tree.leaves(full), strict=True)
              if isinstance(t, Slices)]
    norm = np.sqrt(sum(np.sum(g.astype(np.float64) ** 2) for g in masked))
    assert float(metrics["grad_norm"]) == pytest.approx(norm, rel=1e-5)
    clip = min(1.0, cfg.clip_norm / float(metrics["grad_norm"]))
    stepped = [np.asarray(mu) / ((1 - cfg.b1) * clip) for mu in jax.tree.leaves(state.opt_state.mu)]
    for got, want in zip(stepped, masked, strict=True):
        np.testing.assert_allclose(got, want, rtol=0, atol=1e-5 * np.abs(want).max())
    state, _ = step(state, {"input_ids": ids})

    reference = optax.chain(optax.clip_by_global_norm(cfg.clip_norm),
                            optax.adamw(schedule(cfg.resolved(config)), cfg.b1, cfg.b2, weight_decay=cfg.weight_decay))
    slices = [t.take(p) for t, p in zip(jax.tree.leaves(train), jax.tree.leaves(start), strict=True)
              if isinstance(t, Slices)]
    opt_state = reference.init(slices)

    @jax.jit
    def reference_step(gradients, opt_state, slices):  # one program, not each optax operation on its own
        updates, opt_state = reference.update(gradients, opt_state, slices)
        return optax.apply_updates(slices, updates), opt_state

    for _ in range(2):
        slices, opt_state = reference_step([jnp.asarray(g) for g in masked], opt_state, slices)
    # Adam's early updates are ~lr * g / |g|: where a gradient is near 0, its rounding (measured above) moves the
    # update by up to ~lr * |dg| / |g|; everywhere else the new slices agree to 1e-6 relative.
    expected = iter(zip(slices, masked, stepped, strict=True))
    for (p, before), after, t in zip(jax.tree_util.tree_flatten_with_path(start)[0], jax.tree.leaves(state.params),
                                     jax.tree.leaves(train), strict=True):
        after = np.asarray(after)
        if not isinstance(t, Slices):
            np.testing.assert_array_equal(after, before, err_msg=f"{_dotted(p)} is frozen")
            continue
        kept = np.ones(before.shape[:len(t.index)], bool)
        kept[t.index] = False
        np.testing.assert_array_equal(after[kept], before[kept], err_msg=f"{_dotted(p)}: a frozen slice moved")
        want, g, g_step = (np.asarray(a) for a in next(expected))
        sensitive = cfg.learning_rate * np.minimum(2, 2 * np.abs(g_step - g) / np.maximum(np.abs(g), 1e-30))
        off = np.abs(after[t.index] - want)
        rounding = 1e-6 * (np.abs(want) + np.abs(before[t.index]))  # float32's p + u, relative to its operands
        assert (off <= rounding + sensitive).all(), f"{_dotted(p)}: {off.max()} off"
