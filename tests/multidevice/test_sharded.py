"""Sharded runs on 8 simulated CPU devices, against the same model on one device.

Run in a worker process with XLA_FLAGS=--xla_force_host_platform_device_count=8 (tests/multidevice/conftest.py:
the flag must be set before jax is imported), each test reported on its own.

Bounds: float32 logits and router logits within 1e-5 of the one-device run (observed ~2-5e-6: the
expert-parallel reduce-scatter and the split matmuls sum in another order), selected experts and the
routing statistics' counts identical, their float sums within 1e-5 relative. The two summation orders may
resolve a routing near tie differently (seen on AVX-512 CPUs): every such token is proven a near tie on the
one-device run's selection scores and its experts are forced into the sharded run, which then must match
like for like (support.forward_up_to_ties, support.assert_forward_equals, support.tie_forcing).
"""

from __future__ import annotations

import csv
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

import moejax
from moejax.cli import main
from moejax.parallel.mesh import MeshError, make_mesh

pytest.importorskip("torch")  # the test extra; without it these tests are skipped

from support import assert_forward_equals, assert_same_statistics, tie_forcing

from moejax.data.corpus import chunk, read_corpus
from moejax.data.tokenize import ByteTokenizer, HFTokenizer
from moejax.models.builtin import NAME, builtin_model
from moejax.parallel.mesh import shard_model
from moejax.parity.fixtures import make_checkpoint, save_byte_tokenizer
from moejax.routing.analysis import ModelRun, build_tables, collect

pytestmark = [pytest.mark.torch, pytest.mark.multidevice, pytest.mark.slow]

MESHES = ["expert=8", "data=2,expert=4", "data=2,expert=2,tensor=2", "fsdp=4,expert=2"]


def test_eight_devices():
    assert jax.device_count() == 8


@pytest.fixture(scope="module", params=["qwen3_moe", "nemotron_h"])
def checkpoint(request, tmp_path_factory):
    path = tmp_path_factory.mktemp(request.param) / "model"
    make_checkpoint(request.param, path, seed=23, vocab_size=259)
    save_byte_tokenizer(path)
    overrides = {"dt_floor": "time_step_min"} if request.param == "nemotron_h" else {}
    return path, overrides, moejax.from_pretrained(path, **overrides)


def batch(rng, rows=3, seq=21):
    """Odd sizes on purpose: 63 tokens do not split evenly over the token axes, rows have padding."""
    ids = rng.integers(3, 259, (rows, seq))
    mask = np.ones((rows, seq), np.int64)
    mask[1, 15:] = 0
    mask[2, :4] = 0
    return ids, mask


@pytest.mark.parametrize("spec", MESHES)
def test_sharded_forward_equals_one_device(checkpoint, spec):
    path, overrides, single = checkpoint
    ids, mask = batch(np.random.default_rng(0))
    mesh = make_mesh(spec)
    sharded = moejax.from_pretrained(path, mesh=mesh, **overrides)
    assert_forward_equals(single, sharded, ids, mask)

    # Each device holds its share of the experts (split over "expert", ffn over "tensor").
    experts = next(var[...] for path, var in nnx.to_flat_state(nnx.state(sharded, nnx.Param)) if path[-1] == "up_edf")
    shard_shape = experts.addressable_shards[0].data.shape
    assert shard_shape[1] == experts.shape[1] // mesh.shape["expert"]
    assert shard_shape[3] == experts.shape[3] // mesh.shape["tensor"]


@pytest.mark.parametrize("spec", ["expert=8", "data=2,expert=4"])
def test_generation_equals_one_device(checkpoint, spec):
    """Greedy generation with caches on a mesh: the same tokens as on one device, and each step's logits within
    1e-5, up to a step whose argmax is a tie on the one-device logits (two summation orders may resolve it apart)."""
    path, overrides, single = checkpoint
    ids, mask = batch(np.random.default_rng(4), rows=4, seq=13)
    mask[1, :5] = 0
    mask[2, :9] = 0
    sharded = moejax.from_pretrained(path, mesh=make_mesh(spec), **overrides)
    assert_same_generation(single, sharded, ids, mask, 16)


def assert_same_generation(single, sharded, ids, mask, new: int):
    """Greedy generation on one device and on a mesh: the same tokens, each step's logits within 1e-5, up to a step
    whose argmax is a tie on the one-device logits."""
    one = single.generate(ids, mask, max_new_tokens=new, return_logits=True)
    many = sharded.generate(ids, mask, max_new_tokens=new, return_logits=True)
    prompt = ids.shape[1]
    for row in range(len(ids)):
        differ = np.flatnonzero(one.sequences[row, prompt:] != many.sequences[row, prompt:])
        steps = differ[0] + 1 if len(differ) else one.logits.shape[1]
        np.testing.assert_allclose(many.logits[row, :steps], one.logits[row, :steps], atol=1e-5, rtol=0)
        if len(differ):
            chosen = one.logits[row, differ[0]]
            gap = chosen[one.sequences[row, prompt + differ[0]]] - chosen[many.sequences[row, prompt + differ[0]]]
            assert gap <= 1e-5, f"row {row}: the sharded run chose another token at step {differ[0]} (gap {gap})"


def test_routing_statistics_identical(checkpoint):
    """Per-chunk statistics of sample sentences, sharded and on one device: identical counts, float sums within
    1e-5, once any near tie that flipped is forced to the one-device choice."""
    path, overrides, single = checkpoint
    spec = "data=2,expert=4" if single.config.router_kind == "softmax" else "fsdp=4,expert=2"
    sharded = moejax.from_pretrained(path, mesh=make_mesh(spec), **overrides)
    tokenizer = HFTokenizer(path)
    texts = read_corpus(None, ["en", "he"])["he"][:6]
    common = dict(exclude_ids=sorted(tokenizer.special_ids), batch_size=4, probabilities="softmax", seed=0,
                  keep_routing=True)
    one, many = collect(single, tokenizer, texts, **common), collect(sharded, tokenizer, texts, **common)
    forced, _ = tie_forcing(single, one, many)
    assert_same_statistics(one, collect(sharded, tokenizer, texts, forced=forced, **common) if forced else many)


def test_analyze_with_mesh_matches_one_device(tmp_path):
    """`moejax analyze --mesh` writes the tables of the sharded statistics; those equal the one-device statistics
    once any near tie that flipped between the two summation orders is forced to the one-device choice."""
    model = builtin_model()
    sharded = shard_model(builtin_model(), make_mesh("data=2,expert=4"))
    sentences = {lang: lines[:40] for lang, lines in read_corpus(None, ["en", "he"]).items()}
    corpus = chunk(sentences, 60, "paragraph")
    data = tmp_path / "corpus"
    data.mkdir()
    for lang, lines in sentences.items():
        (data / f"{lang}.txt").write_text("\n".join(lines) + "\n")
    common = dict(exclude_ids=sorted(ByteTokenizer.special_ids), batch_size=8, probabilities="softmax", seed=0)
    flips = 0
    for texts in corpus.values():
        one = collect(model, ByteTokenizer(), texts, keep_routing=True, **common)
        many = collect(sharded, ByteTokenizer(), texts, keep_routing=True, **common)
        forced, found = tie_forcing(model, one, many)
        flips += found
        assert_same_statistics(one, collect(sharded, ByteTokenizer(), texts, keep_routing=True, forced=forced,
                                            **common) if forced else many)
    print(f"{flips} token-layers flipped at proven near ties")
    # The command computes the same sharded statistics (without the per-token routing) and writes their tables.
    assert main(["analyze", "--out", str(tmp_path / "mesh"), "--quiet", "--chunk-words", "60", "--langs", "en,he",
                 "--data", str(data), "--mesh", "data=2,expert=4"]) == 0
    runs = {lang: collect(sharded, ByteTokenizer(), texts, **common) for lang, texts in corpus.items()}
    config = model.config
    tables = build_tables([ModelRun(NAME, "builtin", config.model_type, config.moe_layers,
                                    config.num_experts_per_tok, config.num_routed_experts,
                                    sorted(ByteTokenizer.special_ids), runs)], ["en", "he"], 0)
    for table in ("layers", "experts"):
        with open(tmp_path / "mesh" / f"{table}.csv") as f:
            written = list(csv.DictReader(f))
        assert len(written) == len(tables[table]) > 0
        for row, want in zip(written, tables[table], strict=True):
            assert row == {key: str(value) for key, value in want.items()}, table


def test_parity_command_with_mesh(checkpoint, tmp_path):
    path, _, _ = checkpoint
    assert main(["parity", "--model", str(path), "--mesh", "data=2,expert=4", "--out", str(tmp_path / "p"),
                 "--seq-len", "64", "--batch-size", "2", "--max-tokens", "192", "--quiet"]) == 0


@pytest.mark.parametrize("spec, message", [
    ("expert=3", "'expert' dimension (8) does not divide over mesh axis expert=3"),
    ("tensor=3", "does not divide over mesh axis tensor=3"),
    ("data=4,expert=4", "needs 16 devices, but 8 are available"),
    ("pipeline=2", "mesh axes ['pipeline'] are not among"),
    ("expert", "expected AXIS=SIZE pairs"),
])
def test_bad_meshes(checkpoint, spec, message):
    path, overrides, _ = checkpoint
    with pytest.raises(MeshError, match=message.replace("(", r"\(").replace(")", r"\)").replace("[", r"\[")
                       .replace("]", r"\]")):
        moejax.from_pretrained(path, mesh=make_mesh(spec), **overrides)


def test_orbax_restores_onto_any_mesh(checkpoint, tmp_path):
    """Converted while sharded over expert=8, restored onto another mesh and onto one device: every
    parameter bit-for-bit, in the sharding the target mesh gives it."""
    path, overrides, single = checkpoint
    out = tmp_path / "orbax"
    assert main(["convert", str(path), str(out), "--dtype", "float32", "--mesh", "expert=8"]) == 0
    target = make_mesh("data=2,expert=2,tensor=2")
    for mesh in (target, None):
        restored = moejax.from_pretrained(out, mesh=mesh, **overrides)
        want = dict(nnx.to_flat_state(nnx.state(single, nnx.Param)))
        for key, var in nnx.to_flat_state(nnx.state(restored, nnx.Param)):
            np.testing.assert_array_equal(np.asarray(var[...]), np.asarray(want[key][...]), err_msg=str(key))
            if mesh is not None:
                assert var[...].sharding.mesh.shape == target.shape
    experts = next(var[...] for key, var in nnx.to_flat_state(nnx.state(restored, nnx.Param)) if key[-1] == "up_edf")
    assert len(experts.sharding.device_set) == 1  # the last restore went to one device


def test_loading_onto_a_mesh_streams(tmp_path):
    """A >= 1 GB checkpoint loaded onto expert=8 in a fresh process: host memory beyond the loaded parameters'
    device copies (on a CPU, device memory is host memory, and the replicated parameters are stored once
    per device) peaks below 2x the largest tensor plus a fixed overhead of 256 MiB (measured: see
    README), so the model is never built twice or read whole into memory."""
    import json
    import subprocess
    import sys

    from moejax.models.qwen3_moe import tiny_reference_config as tiny_qwen3_config
    from moejax.safetensors_io import write_safetensors

    # A Qwen3-MoE checkpoint (per-expert keys) written a shard at a time, so no process holds it whole.
    config = tiny_qwen3_config(vocab_size=32768, hidden_size=1024, num_hidden_layers=4, num_experts=32,
                               num_experts_per_tok=4, moe_intermediate_size=512, head_dim=64)
    big = tmp_path / "big"
    big.mkdir()
    config.save_pretrained(big)
    rng = np.random.default_rng(0)
    d, f, v, h = 1024, 512, 32768, 64
    index = {}

    def shard(number, tensors):
        name = f"model-{number:05d}-of-00005.safetensors"
        write_safetensors(big / name, tensors)
        index.update(dict.fromkeys(tensors, name))

    for layer in range(4):
        p = f"model.layers.{layer}."
        tensors = {p + "input_layernorm.weight": np.ones(d, np.float32),
                   p + "post_attention_layernorm.weight": np.ones(d, np.float32),
                   p + "self_attn.q_proj.weight": rng.standard_normal((4 * h, d), np.float32),
                   p + "self_attn.k_proj.weight": rng.standard_normal((2 * h, d), np.float32),
                   p + "self_attn.v_proj.weight": rng.standard_normal((2 * h, d), np.float32),
                   p + "self_attn.o_proj.weight": rng.standard_normal((d, 4 * h), np.float32),
                   p + "self_attn.q_norm.weight": np.ones(h, np.float32),
                   p + "self_attn.k_norm.weight": np.ones(h, np.float32),
                   p + "mlp.gate.weight": rng.standard_normal((32, d), np.float32)}
        for e in range(32):
            for name, shape in (("gate_proj", (f, d)), ("up_proj", (f, d)), ("down_proj", (d, f))):
                tensors[f"{p}mlp.experts.{e}.{name}.weight"] = rng.standard_normal(shape, np.float32)
        shard(layer + 1, tensors)
    shard(5, {"model.embed_tokens.weight": rng.standard_normal((v, d), np.float32),
              "model.norm.weight": np.ones(d, np.float32), "lm_head.weight": rng.standard_normal((v, d), np.float32)})
    (big / "model.safetensors.index.json").write_text(json.dumps({"metadata": {}, "weight_map": index}))
    size = sum(f.stat().st_size for f in big.glob("*.safetensors"))
    assert size >= 1e9
    result = subprocess.run([sys.executable, str(Path(__file__).with_name("load_rss_worker.py")),
                             str(tmp_path / "big"), "expert=8"], capture_output=True, text=True, check=True)
    m = json.loads(result.stdout.strip().splitlines()[-1])
    transient = m["peak"] - m["before"] - m["stored"]
    print(f"checkpoint {size / 2**20:.0f} MiB, largest tensor {m['largest'] / 2**20:.0f} MiB, "
          f"peak beyond the parameters {transient / 2**20:.0f} MiB")
    assert m["params"] >= 0.99 * size
    assert transient <= 2 * m["largest"] + 256 * 2**20


@pytest.mark.parametrize("spec, exchange", [("data=2,expert=4", "all_gather"), ("fsdp=2,expert=2,tensor=2", "auto"),
                                             ("expert=4,tensor=2", "all_to_all")])
def test_sharded_train_step_equals_one_device(tmp_path, spec, exchange):
    """Three float32 train steps (AdamW, load-balancing and z-loss on; rows packing two documents, two
    languages) on the mesh give the same parameters as on one device (<= 1e-5 of each parameter's scale)
    and the same expert counts; the parameters keep their shardings. With either expert exchange."""
    from moejax.training.config import TrainConfig
    from moejax.training.step import init_state, make_train_step

    path = tmp_path / "model"
    make_checkpoint("qwen3_moe", path, seed=4, vocab_size=259)
    cfg = TrainConfig(learning_rate=1e-3, warmup_steps=1, total_steps=10, compute_dtype="float32", lb_coef=1e-2,
                      z_coef=1e-3)
    ids = np.random.default_rng(3).integers(3, 259, (4, 16))
    segments = np.repeat([[1] * 10 + [2] * 6], 4, axis=0)
    batch = {"input_ids": ids, "labels": np.where(np.arange(16) == 10, -100, ids), "segment_ids": segments,
             "position_ids": np.where(segments == 1, np.arange(16), np.arange(16) - 10), "lang_ids": [0, 1, 1, 0]}
    results, counts, losses = [], [], []
    for mesh in (None, make_mesh(spec)):
        model = moejax.from_pretrained(path, mesh=mesh, expert_exchange=exchange)
        graphdef, state, tx = init_state(model, cfg)
        step = make_train_step(graphdef, tx, cfg, model.config, num_langs=2)
        trajectory = []
        for _ in range(3):
            state, metrics = step(state, batch)
            assert bool(metrics["finite"])
            trajectory += [float(metrics["total_loss"]), float(metrics["grad_norm"])]
        losses.append(trajectory)
        results.append(state.params)
        counts.append(np.asarray(metrics["expert_counts"]))
    assert np.array_equal(counts[0], counts[1]) and counts[0].sum() == (
        ids.size * model.config.num_experts_per_tok * len(model.config.moe_layers))
    for (path_, one), many in zip(jax.tree_util.tree_flatten_with_path(results[0])[0], jax.tree.leaves(results[1]),
                                  strict=True):
        # Adam's first updates are ~lr * sign(gradient): where a gradient is ~0, float noise in it can move an
        # element by a fraction of lr. So: nearly every element within 1e-5 of the scale, none off by 5% of lr.
        off = np.abs(np.asarray(one) - np.asarray(many))
        name = jax.tree_util.keystr(path_)
        assert np.mean(off > 1e-5 * max(np.abs(np.asarray(one)).max(), 1e-3)) <= 1e-3, name
        assert off.max() <= 0.05 * cfg.learning_rate, name
    np.testing.assert_allclose(losses[1], losses[0], rtol=1e-5)
    experts = next(v for p, v in jax.tree_util.tree_flatten_with_path(results[1])[0] if "up_edf" in str(p))
    assert experts.sharding.spec[1] == "expert"


@pytest.mark.parametrize("spec", ["data=2,expert=4", "fsdp=2,expert=2,tensor=2"])
def test_expert_selective_step_on_a_mesh(tmp_path, spec):
    """Expert-selective training composes with meshes: three steps on the mesh (selected slices, their layers'
    routers, the training-time routing restriction) give one device's parameters, and every unselected slice and
    frozen tensor is bit-identical to the start on the mesh too."""
    from moejax.training.adamw import Slices
    from moejax.training.step import TrainConfig, init_state, make_train_step, trainable

    path = tmp_path / "model"
    make_checkpoint("qwen3_moe", path, seed=5, vocab_size=259)
    cfg = TrainConfig(learning_rate=1e-3, warmup_steps=1, total_steps=10, compute_dtype="float32",
                      train_experts={"0": [1, 3, 5], "2": [0, 6, 7]}, train_routers=True, route_to_trained=True)
    ids = np.random.default_rng(4).integers(3, 259, (4, 16))
    finals = []
    for mesh in (None, make_mesh(spec)):
        model = moejax.from_pretrained(path, mesh=mesh)
        graphdef, state, tx = init_state(model, cfg)
        start = jax.tree.map(np.asarray, state.params)
        train = trainable(cfg.resolved(model.config), state.params, model.config)
        step = make_train_step(graphdef, tx, cfg, model.config)
        for _ in range(3):
            state, metrics = step(state, {"input_ids": ids})
            assert bool(metrics["finite"])
        end = jax.tree.map(np.asarray, state.params)
        for before, after, t in zip(jax.tree.leaves(start), jax.tree.leaves(end), jax.tree.leaves(train),
                                    strict=True):
            if isinstance(t, Slices):
                kept = np.ones(before.shape[:len(t.index)], bool)
                kept[t.index] = False
                np.testing.assert_array_equal(after[kept], before[kept])
                assert (after[t.index] != before[t.index]).any()
            elif not t:
                np.testing.assert_array_equal(after, before)
        finals.append(end)
    for one, many in zip(jax.tree.leaves(finals[0]), jax.tree.leaves(finals[1]), strict=True):
        assert np.abs(one - many).max() <= 0.05 * cfg.learning_rate


USER_MESHES = [((4,), ("expert",), "Explicit"), ((2, 4), ("data", "expert"), "Explicit"),
               ((2, 2, 2), ("data", "expert", "tensor"), "Explicit"), ((4, 2), ("fsdp", "expert"), "Explicit"),
               ((2, 4), ("expert", "data"), "Auto"), ((2, 2, 2), ("tensor", "expert", "data"), "Explicit"),
               ((2, 2, 2), ("tensor", "expert", "data"), "Auto")]


@pytest.mark.parametrize("shape, names, axis_type", USER_MESHES)
def test_meshes_made_with_jax_make_mesh(checkpoint, shape, names, axis_type):
    """A mesh as a user builds it (`jax.make_mesh`, Explicit or Auto axes, any order, a subset of the axes) loads,
    runs and equals one device."""
    from jax.sharding import AxisType

    path, overrides, single = checkpoint
    ids, mask = batch(np.random.default_rng(7))
    mesh = jax.make_mesh(shape, names, axis_types=(getattr(AxisType, axis_type),) * len(names))
    sharded = moejax.from_pretrained(path, mesh=mesh, **overrides)
    assert_forward_equals(single, sharded, ids, mask)
    experts = next(var[...] for p, var in nnx.to_flat_state(nnx.state(sharded, nnx.Param)) if p[-1] == "up_edf")
    expert_devices = dict(zip(names, shape, strict=True)).get("expert", 1)
    assert experts.addressable_shards[0].data.shape[1] == experts.shape[1] // expert_devices


def test_unknown_mesh_axis_is_a_clear_error(checkpoint):
    path, overrides, _ = checkpoint
    with pytest.raises(MeshError, match=r"mesh axes \['model'\] are not among"):
        moejax.from_pretrained(path, mesh=jax.make_mesh((2, 4), ("data", "model")), **overrides)


@pytest.mark.parametrize("spec", ["tensor=4", "tensor=8", "data=2,tensor=4"])
def test_fewer_kv_heads_than_tensor_devices(tmp_path, spec):
    """2 KV heads (8 query heads) on tensor=4 and tensor=8: K/V weights replicated over tensor, query heads split,
    and each device computes and caches only the KV head its query heads share (vLLM's layout); the forward and
    greedy generation equal one device."""
    path = tmp_path / "model"
    make_checkpoint("qwen3_moe", path, seed=6, vocab_size=259, num_attention_heads=8, num_key_value_heads=2)
    ids, mask = batch(np.random.default_rng(8))
    single = moejax.from_pretrained(path)
    sharded = moejax.from_pretrained(path, mesh=make_mesh(spec))
    assert_forward_equals(single, sharded, ids, mask)
    q = next(var[...] for p, var in nnx.to_flat_state(nnx.state(sharded, nnx.Param)) if p[-1] == "q_dnh")
    k = next(var[...] for p, var in nnx.to_flat_state(nnx.state(sharded, nnx.Param)) if p[-1] == "k_dkh")
    tensor = make_mesh(spec).shape["tensor"]
    assert q.addressable_shards[0].data.shape[2] == 8 // tensor and k.addressable_shards[0].data.shape[2] == 2
    graphdef, state = nnx.split(sharded)

    def prefill(state, ids, mask):
        model = nnx.merge(graphdef, state)
        positions = jnp.maximum(jnp.cumsum(mask, axis=1) - 1, 0)
        return model.forward(ids, mask, positions, False, cache=model.init_cache(ids.shape[0], 32)).cache

    with jax.set_mesh(make_mesh(spec)):
        cache = jax.jit(prefill)(state, jnp.asarray(ids[:4]), jnp.asarray(mask[:4]))
    kv_caches = [a for a in jax.tree.leaves(cache) if a.ndim == 5]  # [layers, batch, slots, heads, head_dim]
    assert kv_caches
    for a in kv_caches:
        assert a.shape[3] == tensor and a.sharding.shard_shape(a.shape)[3] == 1
    prompt = ids[:, :9]
    np.testing.assert_array_equal(sharded.generate(prompt, max_new_tokens=6).sequences,
                                  single.generate(prompt, max_new_tokens=6).sequences)


@pytest.mark.parametrize("arch", ["olmoe", "gpt_oss"])
@pytest.mark.parametrize("spec", ["data=2,expert=2,tensor=2", "fsdp=4,expert=2"])
def test_new_architectures_sharded(tmp_path, arch, spec):
    """OLMoE and GPT-OSS streamed onto a mesh (their biases, sinks and whole-projection norms sharded by their
    logical axes) compute what one device does, forward and greedy generation with caches."""
    path = tmp_path / "model"
    make_checkpoint(arch, path, seed=29, vocab_size=259)
    single = moejax.from_pretrained(path)
    sharded = moejax.from_pretrained(path, mesh=make_mesh(spec))
    ids, mask = batch(np.random.default_rng(6))
    assert_forward_equals(single, sharded, ids, mask)
    ids, mask = batch(np.random.default_rng(7), rows=4, seq=13)
    assert_same_generation(single, sharded, ids, mask, 12)


@pytest.mark.parametrize("name, args", [
    ("multilingual_routing", ["--pairs", "he-en", "--chunk-words", "60"]),
    ("steering", ["--mode", "hard", "--limit", "2", "--layers", "2-5"]),
    ("expert_selective", ["--variants", "seft", "--lrs", "1e-3", "--steps", "2", "--tasks", "none"]),
])
def test_studies_on_a_two_device_mesh(name, args, tmp_path, monkeypatch):
    """Each study runs end to end with --mesh data=2 (two simulated devices) from outside the repository, and says
    the mesh in what it records."""
    import importlib

    monkeypatch.chdir(tmp_path)
    study = importlib.import_module(f"experiments.{name}")
    study.main([*args, "--mesh", "data=2", "--out", str(tmp_path / "out")])
    summary = (tmp_path / "out" / "summary.md").read_text()
    assert "data=2" in summary
