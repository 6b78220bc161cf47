"""`moejax plan`: will a model fit a TPU topology on a mesh? Compiled from shapes alone, before renting it.

The full-size forward is traced with abstract parameters (no weights are read or made), sharded by the
logical-axis rules over a mesh of simulated CPU devices, and compiled. The per-device parameter bytes
are exact (from each parameter's shard shape). Outputs and temporaries come from XLA's memory
analysis of the compiled per-device program, with two corrections for compiling on a CPU:
- it is compiled in float32: XLA's CPU compiler has no bfloat16 matmul and keeps float32 copies of
  every bfloat16 weight (measured: temporaries 2.7x the bfloat16 parameters on a 4-layer Qwen3-MoE,
  0.35x in float32), which a TPU does not; float32 activations bound bfloat16 ones from above;
- the MoE blocks compile on the CPU's tile path, which never holds a whole MoE layer's grouped rows;
  the accelerator's ragged_dot path does (gathered inputs, gate/up/activation, outputs: rows x
  (2 d + 3 f)), so that is added analytically. (XLA's CPU lowering of ragged_dot itself expands to a
  dense [rows, local experts, f] product, 6.5x the temporaries here, so it cannot be measured instead.)
XLA's CPU and TPU compilers assign buffers differently, so the total is an estimate (an upper bound
in its float32 parts).

Beside memory, the plan says how each part is laid out on the mesh (the vocabulary and the Mamba-2 groups split
over tensor or replicated, KV heads shared by groups of tensor devices when fewer than them) and how many bytes
one MoE layer's token exchange moves into each device on the accelerator (moejax.parallel.hlo.exchange_bytes; with
all_to_all the ragged exchange's expectation under uniform routing), with the exchange `auto` would choose there.

With `train`, the CPT train step (moejax.training.step) is compiled instead, the same way: float32
master parameters and AdamW's mu and nu (bytes exact, from the shard shapes), compiled in float32 on
the tile path, plus analytic terms for what only the accelerator holds: the compute-dtype copy of the
parameters the forward casts to, and the grouped rows of the MoE layers kept for the backward pass
(every MoE layer's without rematerialisation; with it, one layer's recomputed rows) and one layer's
gradient rows.
"""

from __future__ import annotations

import dataclasses
import json
import math
import os
import subprocess
import sys
import time

import jax
import jax.numpy as jnp
from flax import nnx
from jax.sharding import NamedSharding, PartitionSpec

from moejax.commands.options import check_options, option
from moejax.config import EXPERT_EXCHANGES, NemotronHConfig, Qwen3MoeConfig
from moejax.errors import MeshError, SettingsError
from moejax.layers.moe import resolve_exchange
from moejax.layers.stack import REMAT_POLICIES
from moejax.loading import load_config
from moejax.models import abstract_model
from moejax.models.common import jitted_forward
from moejax.parallel.hlo import exchange_bytes
from moejax.parallel.mesh import BATCH_AXES, batch_sharding, describe, make_mesh, param_sharding, parse_mesh
from moejax.routing.experts import read_selection
from moejax.training.step import (
    BATCH_FIELDS,
    TrainConfig,
    init_state,
    make_train_step,
    optimizer,
    trainable,
    trainable_budget,
)

GiB = 1024 ** 3


@dataclasses.dataclass(frozen=True)
class Topology:
    chips: int
    hbm_gib: float  # per chip


TOPOLOGIES = {
    "v4-8": Topology(4, 32), "v4-16": Topology(8, 32), "v4-32": Topology(16, 32), "v4-64": Topology(32, 32),
    "v5p-8": Topology(4, 95), "v5p-16": Topology(8, 95), "v5p-32": Topology(16, 95),
    "v5e-4": Topology(4, 16), "v5e-8": Topology(8, 16), "v5e-16": Topology(16, 16), "v5e-32": Topology(32, 16),
    "v5e-64": Topology(64, 16), "v6e-4": Topology(4, 32), "v6e-8": Topology(8, 32), "v6e-16": Topology(16, 32),
}


PRESETS = {"qwen3-30b-a3b": Qwen3MoeConfig.qwen3_30b_a3b,
           "nemotron-3-nano-30b-a3b": NemotronHConfig.nemotron_3_nano_30b_a3b}


@dataclasses.dataclass(frozen=True)
class PlanSettings:
    """Everything `moejax plan` takes."""

    model: str | None = option(None, "qwen3-30b-a3b, nemotron-3-nano-30b-a3b, or a checkpoint directory (only its "
                               "config.json is read)")
    mesh: str | None = option(None, "e.g. data=2,expert=4 (default with --topology: expert=<chips>)",
                              metavar="AXIS=N,...")
    topology: str | None = option(None, "TPU slice: sets the chip count the mesh must use and the HBM per chip to "
                                  "compare with", choices=tuple(sorted(TOPOLOGIES)))
    batch: int = option(8, "sequences per step (global)", kind=int, minimum=1)
    seq: int = option(2048, "tokens per sequence", kind=int, minimum=1)
    dtype: str = option("bfloat16", "parameter dtype (with --train: the compute dtype; master weights are float32)",
                        choices=("bfloat16", "float32"))
    expert_exchange: str = option("auto", "how tokens reach the experts' devices: all_gather, all_to_all (ragged, "
                                  "each token only to the devices of its experts) or auto (all_to_all from 8 expert "
                                  "devices on TPU/GPU)", choices=EXPERT_EXCHANGES)
    train: bool = option(False, "plan the train step rather than the forward", kind=bool)
    remat: str = option("none", "with --train: rematerialise each layer in the backward pass (full: everything; "
                        "dots: keep the dense matmuls' outputs)", choices=tuple(REMAT_POLICIES))
    accum_steps: int = option(1, "with --train: split the batch into N micro-batches, gradients accumulated",
                              kind=int, minimum=1, metavar="N")
    train_experts: str | None = option(None, "with --train: expert-selective training of these experts (as "
                                       "`moejax train --train-experts`): AdamW state for their slices only",
                                       metavar="FILE[:LANG[:KEY]]")
    json: str | None = option(None, "also write the plan as JSON", metavar="FILE")

    def __post_init__(self):
        check_options(self)
        if self.model is None:
            raise SettingsError("--model is required: a preset (qwen3-30b-a3b, nemotron-3-nano-30b-a3b) or a "
                                "checkpoint directory")
        if not self.train and (self.remat != "none" or self.accum_steps != 1 or self.train_experts):
            raise SettingsError("--remat, --accum-steps and --train-experts plan the train step: add --train")
        if self.train and self.batch % self.accum_steps:
            raise SettingsError(f"--batch {self.batch} is not divisible by --accum-steps {self.accum_steps}")
        if self.mesh is None and self.topology is None:
            raise SettingsError("give --mesh, --topology or both")


def plan(settings: PlanSettings) -> dict:
    """The memory plan (module docstring) of the forward, or with `train` of the train step. When the mesh needs
    more devices than this process has, the plan is made in a child process with that many simulated CPU devices
    (XLA reads the count when jax starts)."""
    s = settings
    cfg, sizes, chip = resolve(s.model, s.mesh, s.topology)
    needed = math.prod(sizes.values())
    if needed > jax.device_count():
        return _plan_in_child(s, needed)
    if s.train:
        return plan_train(s.model, s.mesh, s.topology, batch=s.batch, seq=s.seq, dtype=s.dtype, remat=s.remat,
                          accum_steps=s.accum_steps, expert_exchange=s.expert_exchange,
                          train_experts=read_selection(s.train_experts) if s.train_experts else None)
    return plan_forward(s.model, s.mesh, s.topology, batch=s.batch, seq=s.seq, dtype=s.dtype,
                        expert_exchange=s.expert_exchange)


def _plan_in_child(settings: PlanSettings, devices: int) -> dict:
    env = dict(os.environ, JAX_PLATFORMS="cpu",
               XLA_FLAGS=f"{os.environ.get('XLA_FLAGS', '')} --xla_force_host_platform_device_count={devices}")
    code = ("import dataclasses, json, sys; from moejax.commands.plan import PlanSettings, plan; "
            "print(json.dumps(plan(PlanSettings(**json.loads(sys.stdin.read())))))")
    done = subprocess.run([sys.executable, "-c", code], input=json.dumps(dataclasses.asdict(settings)), env=env,
                          capture_output=True, text=True)
    if done.returncode:
        raise MeshError(f"planning on {devices} simulated devices failed: {done.stderr.strip().splitlines()[-1]}")
    return json.loads(done.stdout.strip().splitlines()[-1])


def resolve(model: str, mesh_spec: str | None, topology: str | None, expert_exchange: str = "auto"):
    """(config, mesh sizes, Topology or None) for a preset name or a checkpoint directory."""
    cfg = PRESETS[model]() if model in PRESETS else load_config(model)
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
    }


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
    ffn = cfg.moe_intermediate_size // mesh.shape["tensor"]
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


def plan_text(p: dict) -> str:
    where = f"mesh {p['mesh']}" + (f" on {p['topology']}" if p["topology"] else "")
    train = p.get("mode") == "train"
    counted = (f"  parameters: {p['parameters']:,} (analytic count from the config: {p['parameters_analytic']:,}), "
               f"{p['parameter_bytes'] / GiB:.1f} GiB" + (" in float32" if train else "")
               + f"; per device {p['parameter_bytes_per_device'] / GiB:.2f} GiB")
    if train and p["trainable"] != p["parameters"]:
        counted += (f"\n  trainable: {p['trainable']:,} ({100 * p['trainable'] / p['parameters']:.2f}%); AdamW "
                    "moments are held for these alone")
    if not train:
        lines = [f"moejax plan: {p['model']} ({p['model_type']}), forward, batch {p['batch']} x {p['seq']} tokens, "
                 f"{p['dtype']}, {where}", counted,
                 f"  per device: parameters {p['parameter_bytes_per_device'] / GiB:.2f} GiB + outputs "
                 f"{p['output_bytes'] / GiB:.2f} GiB + temporaries {p['temp_bytes'] / GiB:.2f} GiB + MoE dispatch "
                 f"{p['moe_dispatch_bytes'] / GiB:.2f} GiB = {p['per_device_bytes'] / GiB:.2f} GiB "
                 f"(compiled in {p['compile_s']:.0f} s)"]
        remedies = "shard further (more expert/fsdp devices) or lower --batch/--seq"
    else:
        micro = f"{p['accum_steps']} micro-batches" if p["accum_steps"] > 1 else "no accumulation"
        terms = [("parameters", "parameter_bytes_per_device"), ("optimizer state", "optimizer_bytes_per_device"),
                 ("outputs", "output_bytes"), ("temporaries", "temp_bytes"),
                 (f"{p['dtype']} parameter copy", "compute_copy_bytes"), ("MoE rows", "moe_dispatch_bytes")]
        lines = [f"moejax plan: {p['model']} ({p['model_type']}), train step (AdamW, float32 master weights, "
                 f"{p['dtype']} compute, remat {p['remat']}, {micro}), batch {p['batch']} x {p['seq']} tokens, {where}",
                 counted,
                 "  per device: " + " + ".join(f"{name} {p[key] / GiB:.2f} GiB" for name, key in terms)
                 + (f" - aliased {p['alias_bytes'] / GiB:.2f} GiB" if p["alias_bytes"] else "")
                 + f" = {p['per_device_bytes'] / GiB:.2f} GiB (compiled in {p['compile_s']:.0f} s)"]
        if not p["alias_bytes"]:
            state = (p["parameter_bytes_per_device"] + p["optimizer_bytes_per_device"]) / GiB
            lines.append("  (the step does not donate its input state, so its outputs hold a second copy of the "
                         f"parameters and optimizer state: {state:.2f} GiB that donating it would save)")
        remedies = "shard further (more expert/fsdp devices), lower --batch/--seq" \
            + (", --remat full" if p["remat"] == "none" else "") + " or raise --accum-steps"
    if p["layout"]:
        lines.append("  layout: " + "; ".join(p["layout"]))
    if p["expert_exchange"]:
        per_layer, gathered = p["exchange_bytes_per_moe_layer"] / GiB, p["all_gather_bytes_per_moe_layer"] / GiB
        compared = "" if p["expert_exchange"] == "all_gather" else f" (all-gather: {gathered:.3f} GiB)"
        lines.append(f"  expert exchange on the accelerator: {p['expert_exchange']}, {per_layer:.3f} GiB into each "
                     f"device per MoE layer{compared}, {p['moe_layers']} MoE layers per forward")
    lines.append(f"  ({p['estimate']}; see moejax plan --help)")
    if p["fits"] is not None:
        hbm = p["hbm_bytes"] / GiB
        lines.append(f"  FITS: {p['per_device_bytes'] / GiB:.1f} of {hbm:.0f} GiB HBM per chip" if p["fits"] else
                     f"  DOES NOT FIT: needs {p['per_device_bytes'] / GiB:.1f} GiB per chip, {p['topology']} has "
                     f"{hbm:.0f} GiB; {remedies}")
    return "\n".join(lines)
