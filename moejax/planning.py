"""Memory plans of the full-size models on a mesh, from shapes alone: the library behind `moejax plan` (which documents
the method) and the TPU set-up's plans (tpu/)."""

from __future__ import annotations

import dataclasses
import math
import time
from pathlib import Path

import jax
import jax.numpy as jnp
from flax import nnx
from jax.sharding import NamedSharding, PartitionSpec

from moejax.errors import MeshError, SettingsError
from moejax.layers.moe import resolve_exchange
from moejax.loading import load_config
from moejax.models import abstract_model, presets
from moejax.models.common import jitted_forward
from moejax.parallel.hlo import exchange_bytes
from moejax.parallel.mesh import BATCH_AXES, batch_sharding, describe, make_mesh, param_sharding, parse_mesh
from moejax.parallel.topologies import TOPOLOGIES
from moejax.training.config import TrainConfig
from moejax.training.step import (
    BATCH_FIELDS,
    init_state,
    make_train_step,
    optimizer,
    trainable,
    trainable_budget,
)

GiB = 1024 ** 3


def resolve(model: str, mesh_spec: str | None, topology: str | None, expert_exchange: str = "auto"):
    """(config, mesh sizes, Topology or None) for a preset name or a checkpoint directory."""
    known = presets()
    preset = known.get(model.lower())  # OLMoE-1B-7B as olmoe-1b-7b
    if preset is None and not Path(model).is_dir():
        raise SettingsError(f"--model {model!r} is neither a published shape ({', '.join(sorted(known))}) nor a "
                            "checkpoint directory")
    cfg = preset() if preset is not None else load_config(model)
    cfg = dataclasses.replace(cfg, expert_exchange=expert_exchange)
    chip = None
    if topology is not None:
        if topology not in TOPOLOGIES:
            raise SettingsError(f"unknown topology {topology!r}; known: {', '.join(TOPOLOGIES)}")
        chip = TOPOLOGIES[topology]
    if mesh_spec is None:
        if chip is None:
            raise SettingsError("give --mesh, --topology or both")
        mesh_spec = f"expert={chip.chips}"
    sizes = parse_mesh(mesh_spec)
    if chip is not None and math.prod(sizes.values()) != chip.chips:
        raise MeshError(f"mesh {mesh_spec} has {math.prod(sizes.values())} devices, {topology} has {chip.chips} chips")
    return cfg, sizes, chip


def plan_forward(model: str, mesh_spec: str | None = None, topology: str | None = None, *, batch: int = 8,
                 seq: int = 2048, dtype: str = "bfloat16", expert_exchange: str = "auto") -> dict:
    """Compiles the forward of `model` on the mesh; returns the memory plan (see module docstring)."""
    cfg, sizes, chip = resolve(model, mesh_spec, topology, expert_exchange)
    mesh = make_mesh(sizes)
    started = time.perf_counter()
    abstract = sharded_abstract(cfg, model, mesh)
    graphdef, state = nnx.split(abstract)
    count = per_device = 0
    for path, var in nnx.to_flat_state(nnx.state(abstract, nnx.Param)):
        count += math.prod(var.shape)
        # The model's own float32 parameters (Nemotron-H's correction bias) stay float32 in any dtype.
        itemsize = 4 if path[-1] == "correction_e" else jnp.dtype(dtype).itemsize
        per_device += math.prod(var.get_value().sharding.shard_shape(var.shape)) * itemsize
    ids = jax.ShapeDtypeStruct((batch, seq), jnp.int32, sharding=batch_sharding(mesh, (batch, seq)))
    with jax.set_mesh(mesh):
        compiled = jitted_forward.lower(graphdef, state, ids, ids, ids, False, False).compile()
    memory = compiled.memory_analysis()
    dispatch = moe_dispatch_bytes(cfg, mesh, batch * seq, jnp.dtype(dtype).itemsize)
    total = per_device + memory.output_size_in_bytes + memory.temp_size_in_bytes + dispatch \
        - memory.alias_size_in_bytes
    return {
        "model": model, "model_type": cfg.model_type, "mesh": describe(mesh), "topology": topology,
        "dtype": dtype, "batch": batch, "seq": seq, "parameters": count,
        "parameters_analytic": cfg.parameter_count(), "parameter_bytes": count * jnp.dtype(dtype).itemsize,
        "estimate": "exact parameters; outputs and temporaries of the float32-compiled program; MoE dispatch "
                    "buffers of the accelerator path, analytic",
        "parameter_bytes_per_device": per_device, "output_bytes": memory.output_size_in_bytes,
        "temp_bytes": memory.temp_size_in_bytes, "moe_dispatch_bytes": dispatch,
        "per_device_bytes": total, "hbm_bytes": None if chip is None else int(chip.hbm_gib * GiB),
        "fits": None if chip is None else total <= chip.hbm_gib * GiB,
        "compile_s": time.perf_counter() - started, **layout(cfg, mesh, batch * seq, jnp.dtype(dtype).itemsize),
        **(flops := flops_per_token(cfg, abstract, seq)), **time_estimate(flops, batch * seq, chip, train=False),
    }


def plan_train(model: str, mesh_spec: str | None = None, topology: str | None = None, *, batch: int = 8,
               seq: int = 2048, dtype: str = "bfloat16", remat: str = "none", accum_steps: int = 1,
               train_experts: dict[str, list[int]] | None = None, expert_exchange: str = "auto") -> dict:
    """Compiles the train step of `model` on the mesh (float32 master weights, AdamW, load-balancing loss,
    compute in `dtype`); returns its memory plan (see module docstring)."""
    cfg, sizes, chip = resolve(model, mesh_spec, topology, expert_exchange)
    mesh = make_mesh(sizes)
    started = time.perf_counter()
    # Compiled in float32 (module docstring); the lower compute dtype enters the analytic terms below.
    train_cfg = TrainConfig(compute_dtype="float32", remat=remat, accum_steps=accum_steps,
                            train_experts=train_experts).resolved(cfg)
    abstract = sharded_abstract(cfg, model, mesh)
    abstract.layers.remat = remat
    abstract.layers.index_experts = False
    graphdef, params = nnx.split(abstract)
    state = jax.eval_shape(lambda params: init_state(nnx.merge(graphdef, params), train_cfg)[1], params)
    state = with_param_shardings(state, params, mesh)
    tx = optimizer(train_cfg, params, cfg)
    step = make_train_step(graphdef, tx, train_cfg, cfg)
    shapes = {name: (batch,) if name == "lang_ids" else (batch, seq) for name in BATCH_FIELDS}
    inputs = {name: jax.ShapeDtypeStruct(shape, jnp.int32, sharding=batch_sharding(mesh, shape))
              for name, shape in shapes.items()}
    with jax.set_mesh(mesh):
        compiled = step.jitted.lower(state, inputs).compile()
    memory = compiled.memory_analysis()
    count = sum(math.prod(x.shape) for x in jax.tree.leaves(state.params))
    param_bytes = device_bytes(state.params)
    optimizer_bytes = device_bytes(state.opt_state) + device_bytes(state.step)
    itemsize = jnp.dtype(dtype).itemsize
    # The forward's cast of the master weights (a no-op in the float32 compile); XLA may fuse it into the
    # layer loop, so this bounds it from above.
    compute_copy = 0 if itemsize == 4 else param_bytes // 4 * itemsize
    held_layers = len(cfg.moe_layers) if remat == "none" else 1
    dispatch = (held_layers + 1) * moe_dispatch_bytes(cfg, mesh, batch * seq // accum_steps, itemsize)
    total = param_bytes + optimizer_bytes + memory.output_size_in_bytes + memory.temp_size_in_bytes \
        + compute_copy + dispatch - memory.alias_size_in_bytes
    return {
        "model": model, "model_type": cfg.model_type, "mode": "train", "mesh": describe(mesh),
        "topology": topology, "dtype": dtype, "batch": batch, "seq": seq, "remat": remat,
        "accum_steps": accum_steps, "parameters": count, "parameters_analytic": cfg.parameter_count(),
        "trainable": trainable_budget(trainable(train_cfg, params, cfg), params)["trainable"],
        "parameter_bytes": count * 4,
        "estimate": "exact float32 parameters and optimizer state; outputs and temporaries of the float32-compiled "
                    f"program on the tile path; the {dtype} parameter copy and the accelerator path's MoE rows "
                    "(forward and backward), analytic",
        "parameter_bytes_per_device": param_bytes, "optimizer_bytes_per_device": optimizer_bytes,
        "output_bytes": memory.output_size_in_bytes, "alias_bytes": memory.alias_size_in_bytes,
        "temp_bytes": memory.temp_size_in_bytes, "compute_copy_bytes": compute_copy, "moe_dispatch_bytes": dispatch,
        "per_device_bytes": total, "hbm_bytes": None if chip is None else int(chip.hbm_gib * GiB),
        "fits": None if chip is None else total <= chip.hbm_gib * GiB,
        "compile_s": time.perf_counter() - started,
        **layout(cfg, mesh, batch * seq // accum_steps, itemsize),
        **(flops := flops_per_token(cfg, abstract, seq)), **time_estimate(flops, batch * seq, chip, True, remat),
    }


ASSUMED_MFU = 0.4  # the share of the chips' peak a well-tuned MoE step reaches, for the time estimate


def flops_per_token(cfg, abstract: nnx.Module, seq: int) -> dict[str, float]:
    """Forward FLOPs per token, analytic: 2 x the matmul weights a token passes through (of the routed experts, k of
    E; the input embedding is a lookup, not a matmul) plus causal attention's scores and weighted values, 2 x heads x
    head size x seq per attending layer (the full sequence: an upper bound for sliding windows; Mamba-2's scan is left
    out, a few percent of its layers' projections)."""
    experts, k = cfg.num_routed_experts, cfg.num_experts_per_tok
    total = routed = 0
    for path, var in nnx.to_flat_state(nnx.state(abstract, nnx.Param)):
        size = math.prod(var.shape)
        total += size
        if "experts" in map(str, path) and experts in var.shape:
            routed += size
    embedding = cfg.vocab_size * cfg.hidden_size
    matmul = total - embedding - routed + routed * k / max(experts, 1)
    attention = 2 * cfg.attention_width * seq * cfg.attention_layers
    return {"active_matmul_parameters": matmul, "forward_flops_per_token": 2 * matmul + attention}


def time_estimate(flops: dict, tokens: int, chip, train: bool, remat: str = "none") -> dict:
    """Seconds for `tokens` tokens on the slice: the forward (or a train step's forward, backward and, with remat,
    the recomputed forward) at the chips' peak and at ASSUMED_MFU of it."""
    factor = (3 + (1 if remat != "none" else 0)) if train else 1
    work = flops["forward_flops_per_token"] * factor * tokens
    out = {"flops_per_step": work, "step_s_at_peak": None, "step_s_assumed": None, "assumed_mfu": ASSUMED_MFU}
    if chip is not None:
        peak = chip.chips * chip.peak_tflops * 1e12
        out.update(step_s_at_peak=work / peak, step_s_assumed=work / (peak * ASSUMED_MFU),
                   tokens_per_s_assumed=tokens / (work / (peak * ASSUMED_MFU)))
    return out


def sharded_abstract(cfg, model: str, mesh) -> nnx.Module:
    """The float32 model from shapes alone, each parameter a ShapeDtypeStruct sharded by the logical-axis rules."""
    abstract = abstract_model(cfg, jnp.float32)
    for path, var in nnx.to_flat_state(nnx.state(abstract, nnx.Param)):
        sharding = param_sharding(".".join(map(str, path)), var, mesh)
        var.set_value(jax.ShapeDtypeStruct(var.shape, var.dtype, sharding=sharding))
    return abstract


def with_param_shardings(tree, params, mesh):
    """`tree` (shapes) with each leaf whose path ends in a parameter's path (the parameter itself, AdamW's mu and
    nu of it) sharded like that parameter, as init_state's arrays are; the rest (step counts) replicated."""
    owned = {tuple(path): leaf.sharding for path, leaf in jax.tree_util.tree_flatten_with_path(params)[0]
             if getattr(leaf, "sharding", None) is not None}

    def place(path, leaf):
        sharding = next((owned[path[i:]] for i in range(len(path)) if path[i:] in owned
                         and len(owned[path[i:]].spec) <= leaf.ndim), NamedSharding(mesh, PartitionSpec()))
        return jax.ShapeDtypeStruct(leaf.shape, leaf.dtype, sharding=sharding)

    return jax.tree_util.tree_map_with_path(place, tree)


def device_bytes(tree) -> int:
    """Bytes one device holds of a tree of sharded shapes."""
    return sum(math.prod(x.sharding.shard_shape(x.shape)) * x.dtype.itemsize for x in jax.tree.leaves(tree))


def moe_dispatch_bytes(cfg, mesh, tokens: int, itemsize: int) -> int:
    """One MoE layer's grouped rows on the accelerator path, per device: the tokens of its expert group
    (all-gathered), k rows each, holding inputs and outputs (2 x expert dim) and gate/up/activation (3 x f)."""
    if not cfg.moe_layers:
        return 0
    group_tokens = -(-tokens // math.prod(mesh.shape[a] for a in BATCH_AXES)) * mesh.shape["expert"]
    width = cfg.expert_input_size
    ffn = cfg.expert_ffn_size // mesh.shape["tensor"]
    return group_tokens * cfg.num_experts_per_tok * (2 * width + 3 * ffn) * itemsize


def layout(cfg, mesh, tokens: int, itemsize: int) -> dict:
    """How the vocabulary, the Mamba-2 mixer and the KV heads lie on the mesh, and one MoE layer's token exchange on
    the accelerator: the exchange `cfg.expert_exchange` resolves to there and the bytes it moves into each device,
    beside the all-gather's."""
    tensor, experts_axis = mesh.shape["tensor"], mesh.shape["expert"]
    notes = []
    if tensor > 1:
        vocab = cfg.vocab_size
        notes.append(f"vocabulary split over tensor ({vocab // tensor:,} of {vocab:,} rows per device)"
                     if vocab % tensor == 0 else f"vocabulary replicated over tensor ({vocab:,} does not divide by "
                     f"{tensor})")
        groups = getattr(cfg, "n_groups", None)
        if groups is not None and "mamba" in cfg.layer_kinds:
            notes.append(f"Mamba-2 mixer split over tensor ({groups // tensor} of {groups} B/C groups, "
                         f"{cfg.mamba_num_heads // tensor} heads per device)" if groups % tensor == 0 else
                         f"Mamba-2 mixer replicated over tensor ({groups} B/C groups do not divide by {tensor})")
        if cfg.num_key_value_heads < tensor:
            notes.append(f"{cfg.num_key_value_heads} KV heads, each shared by {tensor // cfg.num_key_value_heads} "
                         "tensor devices (one computed and cached per device)")
    out = {"layout": notes, "moe_layers": len(cfg.moe_layers), "expert_exchange": None,
           "exchange_bytes_per_moe_layer": 0, "all_gather_bytes_per_moe_layer": 0}
    if cfg.moe_layers and experts_axis > 1:
        per_device = -(-tokens // math.prod(mesh.shape[a] for a in BATCH_AXES))
        args = (experts_axis, per_device, cfg.expert_input_size, cfg.num_experts_per_tok, itemsize)
        exchange = resolve_exchange(cfg.expert_exchange, experts_axis, platform="tpu")
        experts = cfg.num_routed_experts
        out.update(expert_exchange=exchange, all_gather_bytes_per_moe_layer=int(exchange_bytes("all_gather", *args)),
                   exchange_bytes_per_moe_layer=int(exchange_bytes(
                       "ragged" if exchange == "all_to_all" else "all_gather", *args, experts=experts)))
    return out


