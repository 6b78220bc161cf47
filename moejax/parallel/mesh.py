"""Device meshes over (data, fsdp, expert, tensor), and the one table mapping logical axis names onto them.

Every parameter declares logical axis names (moejax.layers.params); `RULES` says which mesh axis
each name is split over, so moving a model from data-parallel to expert-parallel is a mesh change
and a different split is an edit of this table, never of model code. Activations: the batch is split
and, inside an MoE block, the tokens over `BATCH_AXES`: the expert axis doubles as a data axis
outside the MoE blocks, and inside them each device runs its own experts on the tokens of its expert
group (moejax.layers.moe.expert_parallel).
"""

from __future__ import annotations

import contextlib
import math
import os

import jax
import numpy as np
from flax import nnx
from jax.sharding import AxisType, Mesh, NamedSharding, PartitionSpec

from moejax.errors import MeshError

MESH_AXES = ("data", "fsdp", "expert", "tensor")
BATCH_AXES = ("data", "fsdp", "expert")

RULES: dict[str, str | None] = {
    "layers": None,  # the stacked-layer axis of scanned units
    # Embedding rows and LM-head columns: each tensor device holds a share of the vocabulary, so the logits come out
    # split over it and the loss reduces them in place (moejax.training.losses), without gathering them.
    "vocab": "tensor",
    "embed": "fsdp",
    "q_heads": "tensor",
    "kv_heads": "tensor",
    "head_dim": None,
    "mlp": "tensor",
    "expert": "expert",
    "expert_mlp": "tensor",
    "expert_router": None,
    "latent": None,
    # Mamba-2: every mixer parameter is stored group-major (moejax.layers.mamba2), so splitting the B/C groups over
    # tensor gives each device whole groups: their heads' z, x and dt, their B and C, convolution channels, norm
    # and out_proj rows. The axes within a group stay whole.
    "mamba_groups": "tensor",
    "mamba_group_in": None,
    "mamba_group_conv": None,
    "mamba_group_heads": None,
    "mamba_group_inner": None,
    "conv_kernel": None,
}

# Axes split only where their size divides the mesh axis, and otherwise replicated over it (correct, just not
# split): a vocabulary of 259 byte tokens, or fewer Mamba-2 groups than tensor devices.
REPLICATED_WHEN_UNEVEN = frozenset({"vocab", "mamba_groups"})


def make_mesh(spec: str | dict[str, int], devices=None) -> Mesh:
    """A mesh over MESH_AXES from "data=2,expert=4" (or a dict); axes not named have size 1. Uses the
    first prod(sizes) devices."""
    sizes = parse_mesh(spec) if isinstance(spec, str) else dict(spec)
    unknown = sorted(set(sizes) - set(MESH_AXES))
    if unknown:
        raise MeshError(f"mesh axes {unknown} are not among {MESH_AXES}")
    if any(int(v) < 1 for v in sizes.values()):
        raise MeshError(f"mesh axis sizes must be positive, got {sizes}")
    shape = tuple(int(sizes.get(axis, 1)) for axis in MESH_AXES)
    devices = list(jax.devices() if devices is None else devices)
    needed = math.prod(shape)
    if needed > len(devices):
        raise MeshError(f"the mesh {describe(shape)} needs {needed} devices, but {len(devices)} are available "
                        f"({devices[0].platform}); on a CPU, simulate more with "
                        f"XLA_FLAGS=--xla_force_host_platform_device_count={needed} set before jax is imported")
    return jax.make_mesh(shape, MESH_AXES, axis_types=(AxisType.Auto,) * len(MESH_AXES),
                         devices=devices[:needed])


def simulated_devices_env(devices: int, **extra: str) -> dict[str, str]:
    """This process's environment for a child process that sees `devices` simulated CPU devices: XLA_FLAGS keeps its
    flags and adds --xla_force_host_platform_device_count (XLA reads it when jax starts, so it takes a new process);
    `extra` sets further variables."""
    flags = f"{os.environ.get('XLA_FLAGS', '')} --xla_force_host_platform_device_count={devices}".strip()
    return {**os.environ, "XLA_FLAGS": flags, **extra}


def as_moejax_mesh(mesh: Mesh | None) -> Mesh | None:
    """Any jax Mesh whose axis names are among MESH_AXES (any order, any subset, Explicit or Auto axis types, as
    `jax.make_mesh` builds them) as the mesh moejax computes on: the same devices, the axes in MESH_AXES order with
    the missing ones of size 1, every axis Auto (moejax places parameters and activations itself, by its
    logical-axis rules). A name moejax does not know is a MeshError."""
    if mesh is None:
        return None
    if not isinstance(mesh, Mesh):
        raise MeshError(f"mesh must be a jax.sharding.Mesh (or a spec such as 'data=2,expert=4'), got "
                        f"{type(mesh).__name__}")
    names = tuple(mesh.axis_names)
    unknown = [n for n in names if n not in MESH_AXES]
    if unknown:
        raise MeshError(f"mesh axes {unknown} are not among {MESH_AXES}; name the mesh's axes with those (a missing "
                        "axis has size 1)")
    if len(set(names)) != len(names):
        raise MeshError(f"mesh axis names repeat: {names}")
    if names == MESH_AXES and all(t == AxisType.Auto for t in mesh.axis_types):
        return mesh
    devices = np.transpose(mesh.devices, [names.index(a) for a in MESH_AXES if a in names])
    shape = tuple(mesh.shape[a] if a in names else 1 for a in MESH_AXES)
    return Mesh(devices.reshape(shape), MESH_AXES, axis_types=(AxisType.Auto,) * len(MESH_AXES))


def parse_mesh(spec: str) -> dict[str, int]:
    """"data=2,expert=4" -> {"data": 2, "expert": 4}."""
    sizes = {}
    for part in filter(None, (p.strip() for p in spec.split(","))):
        name, sep, value = part.partition("=")
        if not sep or not value.strip().isdigit():
            raise MeshError(f"mesh {spec!r}: expected AXIS=SIZE pairs such as data=2,expert=4, got {part!r}")
        sizes[name.strip()] = int(value)
    return sizes


def describe(shape_or_mesh) -> str:
    shape = shape_or_mesh.devices.shape if isinstance(shape_or_mesh, Mesh) else shape_or_mesh
    return ",".join(f"{a}={n}" for a, n in zip(MESH_AXES, shape, strict=True) if n > 1) or "one device"


def partition_spec(axes: tuple[str, ...], shape: tuple[int, ...], mesh: Mesh, where: str) -> PartitionSpec:
    """The PartitionSpec of an array with these logical axes; a MeshError where a dimension does not divide."""
    spec = []
    for name, size in zip(axes, shape, strict=True):
        if name not in RULES:
            raise MeshError(f"{where}: logical axis {name!r} has no sharding rule in moejax.parallel.mesh.RULES")
        mesh_axis = RULES[name]
        parts = mesh.shape[mesh_axis] if mesh_axis else 1
        if name == "kv_heads" and size < parts and parts % size == 0:
            # Fewer KV heads than tensor devices (Qwen3-30B-A3B has 4, Nemotron-3-Nano 2): the K/V projections are
            # replicated over tensor while the query heads stay split, as vLLM serves such models.
            spec.append(None)
            continue
        if size % parts and name in REPLICATED_WHEN_UNEVEN:
            spec.append(None)
            continue
        if size % parts:
            also = (f" (fewer KV heads than tensor devices are replicated, but only when {parts} is a multiple of "
                    f"{size})" if name == "kv_heads" else "")
            raise MeshError(f"{where}: its {name!r} dimension ({size}) does not divide over mesh axis "
                            f"{mesh_axis}={parts}{also}; pick a {mesh_axis} size that divides {size}")
        spec.append(mesh_axis if parts > 1 else None)
    return PartitionSpec(*spec)


def param_sharding(path: str, var: nnx.Variable, mesh: Mesh) -> NamedSharding:
    """Where a parameter lives on `mesh`, from its logical axes."""
    return NamedSharding(mesh, partition_spec(var.get_metadata()["logical_axes"], var.shape, mesh, path))


def batch_sharding(mesh: Mesh, shape: tuple[int, ...]) -> NamedSharding:
    """Inputs [batch, ...]: the batch split over as many of BATCH_AXES (in order) as it divides over."""
    axes = [a for a in BATCH_AXES if mesh.shape[a] > 1]
    while axes and shape[0] % math.prod(mesh.shape[a] for a in axes):
        axes.pop()
    return NamedSharding(mesh, PartitionSpec(tuple(axes) or None, *([None] * (len(shape) - 1))))


def mesh_of(tree) -> Mesh | None:
    """The mesh the arrays of `tree` are sharded over, or None when they are not on a mesh."""
    for leaf in jax.tree.leaves(tree):
        sharding = getattr(leaf, "sharding", None)
        if isinstance(sharding, NamedSharding) and np.prod(sharding.mesh.devices.shape) > 1:
            return sharding.mesh
    return None


def shard_model(model: nnx.Module, mesh: Mesh) -> nnx.Module:
    """Moves an existing model's parameters onto `mesh` (any jax Mesh over MESH_AXES' names), each split by its
    logical axes (in place)."""
    mesh = as_moejax_mesh(mesh)
    for path, var in nnx.to_flat_state(nnx.state(model, nnx.Param)):
        var.set_value(jax.device_put(var.get_value(), param_sharding(".".join(map(str, path)), var, mesh)))
    return model


@contextlib.contextmanager
def on_mesh(state):
    """When the parameters in `state` live on a mesh: makes it the current mesh (so MoE blocks run
    expert-parallel) and yields a function placing [batch, ...] inputs split over its batch axes;
    otherwise yields the identity."""
    mesh = mesh_of(state)
    if mesh is None:
        yield lambda *arrays: arrays
        return
    with jax.set_mesh(mesh):
        yield lambda *arrays: tuple(_place(np.asarray(a), batch_sharding(mesh, np.shape(a))) for a in arrays)


def _place(a: np.ndarray, sharding) -> jax.Array:
    """Every process holds the whole batch and gives each of its own devices its part (multi-host too)."""
    return jax.make_array_from_callback(a.shape, sharding, lambda index: a[index])
