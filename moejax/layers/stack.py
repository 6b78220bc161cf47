"""A stack of decoder layers, scanned wherever a unit of layers repeats, so compile time stays flat in depth (and,
for generation, their caches with them).

The layer kinds (e.g. "moe"/"mlp", or Nemotron-H's mamba/attention/moe) are split into segments: a
unit of 1-4 consecutive kinds repeated R times. Each unit's parameters are stacked along a leading
"layers" axis and run under `jax.lax.scan`; a kind that does not repeat becomes a unit with R = 1.
"""

from __future__ import annotations

import functools
from collections.abc import Callable, Sequence

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from moejax.config import REMAT_NAMES, is_moe

MAX_UNIT = 4

# Rematerialisation policies for training (`LayerStack.remat`): what a layer's backward pass keeps from
# its forward pass. "none" keeps everything; "full" keeps only each layer's input and recomputes the
# rest; "dots" keeps matmul outputs and recomputes the elementwise work between them.
REMAT_POLICIES = dict(zip(REMAT_NAMES, (None, jax.checkpoint_policies.nothing_saveable,
                                         jax.checkpoint_policies.dots_with_no_batch_dims_saveable), strict=True))


def plan_segments(kinds: Sequence[str]) -> list[tuple[tuple[str, ...], int]]:
    """Greedy split of `kinds` into (unit, repeats) covering the sequence in order."""
    kinds, out, i = tuple(kinds), [], 0
    while i < len(kinds):
        best_unit, best_reps = kinds[i:i + 1], 1
        for p in range(1, MAX_UNIT + 1):
            unit = kinds[i:i + p]
            reps = 1
            while kinds[i + reps * p:i + (reps + 1) * p] == unit:
                reps += 1
            if reps >= 2 and reps * p > best_reps * len(best_unit):
                best_unit, best_reps = unit, reps
        out.append((best_unit, best_reps))
        i += len(best_unit) * best_reps
    return out


def layer_position(path: Sequence) -> tuple[int, int, tuple[str, ...]] | None:
    """(segment, unit position, the path inside the layer) of a parameter path (its keys, or a dotted name) inside
    a LayerStack named "layers" ("layers", "units", S, U, ...); None for a parameter outside it. The one place that
    reads the stacked layout's paths."""
    parts = tuple(str(p) for p in (path.split(".") if isinstance(path, str) else path))
    if len(parts) > 4 and parts[:2] == ("layers", "units"):
        return int(parts[2]), int(parts[3]), parts[4:]
    return None


def segment_layer_ids(kinds: Sequence[str]) -> tuple[tuple[tuple[int, ...], ...], ...]:
    """Per segment, per kind of its unit: the layer index of each repeat (LayerStack.layer_ids)."""
    layer_ids, start = [], 0
    for unit_kinds, reps in plan_segments(kinds):
        layer_ids.append(tuple(tuple(start + r * len(unit_kinds) + u for r in range(reps))
                               for u in range(len(unit_kinds))))
        start += reps * len(unit_kinds)
    return tuple(layer_ids)


def _expert_weight(path, variable) -> bool:
    """The stacked expert weights (logical axes "layers", "expert", ...), read per layer inside the expert loop."""
    axes = variable.get_metadata().get("logical_axes", ()) if isinstance(variable, nnx.Variable) else ()
    return tuple(axes[:2]) == ("layers", "expert")


def _stack_states(modules: list[nnx.Module]) -> nnx.State:
    states = [nnx.state(m) for m in modules]
    stacked = jax.tree.map(lambda *xs: jnp.stack(xs), *states)
    for var in jax.tree.leaves(stacked, is_leaf=lambda x: isinstance(x, nnx.Variable)):
        var.set_metadata("logical_axes", ("layers", *var.get_metadata()["logical_axes"]))
    return stacked


class LayerStack(nnx.Module):
    """Layers of the given kinds, called in order; `layer_ids[s][u]` lists the layer index per repeat."""

    def __init__(self, kinds: Sequence[str], make_layer: Callable[[str, nnx.Rngs], nnx.Module], *,
                 rngs: nnx.Rngs):
        self.kinds = tuple(kinds)
        units = []
        for unit_kinds, reps in plan_segments(kinds):
            copies = [[make_layer(kind, rngs) for _ in range(reps)] for kind in unit_kinds]
            layers = []
            for kind_copies in copies:
                graphdef, _ = nnx.split(kind_copies[0])
                layers.append(nnx.merge(graphdef, _stack_states(kind_copies)))
            units.append(nnx.List(layers))
        self.units = nnx.List(units)
        self.layer_ids = segment_layer_ids(kinds)
        self.remat = "none"  # a REMAT_POLICIES key; set by training
        # Forward passes read each layer's expert weights inside the expert loop from the stacked arrays (the layer
        # is given to the layer as `repeat`) instead of slicing them out per layer: on a CPU that slice is a copy of
        # every expert's weights, measured at up to 3/4 of a decoding step and ~45% of a 1024-token forward. Training
        # turns it off: gradients through it would add a whole stacked array per layer.
        self.index_experts = True
        # Blocks below this index need no gradient (training whose trainable parameters all sit in later blocks, as
        # expert-selective training of the last layers): their repeats run as a scan of their own, outside the
        # gradient, so the backward pass stops at the first block that trains. Set by training.
        self.grad_from = 0

    def locate(self, layer: int) -> tuple[int, int, int]:
        """(segment, position in its unit, repeat) of layer index `layer`."""
        for segment, ids in enumerate(self.layer_ids):
            for position, repeats in enumerate(ids):
                if layer in repeats:
                    return segment, position, repeats.index(layer)
        raise IndexError(f"layer {layer} is not among the {len(self.kinds)} layers")

    def run_one(self, segment: int, position: int, repeat, x: jax.Array, transform: Callable = lambda tree: tree,
                **kwargs):
        """One layer alone: the layer at (segment, position) with its parameters of `repeat` (an index, possibly
        traced), passed through `transform` (e.g. an upcast), called on x -> (x, aux) as the layer returns them."""
        graphdef, state = nnx.split(self.units[segment][position])
        layer = nnx.merge(graphdef, transform(jax.tree.map(lambda a: a[repeat], state)))
        x, aux, _ = layer(x, **kwargs)
        return x, aux

    def cache(self, batch: int, length: int, dtype) -> tuple:
        """Empty generation caches: per segment, per position in its unit, the kind's `layer.cache(batch, length,
        dtype)` (None for a kind without one) stacked over the repeats: the layout `__call__` takes as caches."""
        def stacked(layer, repeats: int):
            return jax.tree.map(lambda a: jnp.zeros((repeats, *a.shape), a.dtype), layer.cache(batch, length, dtype))

        return tuple(tuple(stacked(layer, len(repeats)) for layer, repeats in zip(unit, ids, strict=True))
                     for unit, ids in zip(self.units, self.layer_ids, strict=True))

    def __call__(self, x: jax.Array, *, keep_hidden: bool = False, moe_inputs=None, caches: tuple | None = None,
                 **context) -> tuple[jax.Array, list, tuple | None]:
        """Runs every layer: each returns (x, aux, cache); gives x, the per-layer aux in layer order and the updated
        caches (None without caches).

        With keep_hidden, each layer's aux is (aux, the x it returned). `moe_inputs`: a pytree whose arrays
        have a leading axis over the MoE layers (in order); each "moe" layer gets its row as `control`. `caches`
        (generation, laid out as `cache` makes them): each layer gets its own as `cache`. With index_experts, each
        layer also gets `repeat` (its index among its unit's repeats) and holds its kind's expert weights for every
        repeat.
        """
        aux_by_layer: list = [None] * len(self.kinds)
        new_caches = []
        moe_row = {layer: row for row, layer in enumerate(i for i, kind in enumerate(self.kinds) if is_moe(kind))}
        for s, (unit, ids) in enumerate(zip(self.units, self.layer_ids, strict=True)):
            if self.index_experts:
                graphdef, whole, state = nnx.split(unit, _expert_weight, ...)
            else:
                (graphdef, state), whole = nnx.split(unit), None
            rows = [None if moe_inputs is None or not is_moe(self.kinds[repeats[0]])
                    else jax.tree.map(lambda a, at=tuple(moe_row[i] for i in repeats): jnp.asarray(a)[np.asarray(at)],
                                      moe_inputs)
                    for repeats in ids]
            unit_caches = (None,) * len(ids) if caches is None else caches[s]

            def body(x, xs, graphdef=graphdef, whole=whole):
                state_r, rows_r, caches_r, repeat = xs
                layers = nnx.merge(graphdef, state_r) if whole is None else nnx.merge(graphdef, whole, state_r)
                aux, updated = [], []
                for layer, row, cache in zip(layers, rows_r, caches_r, strict=True):
                    kwargs = ({} if row is None else {"control": row}) | ({} if caches is None else {"cache": cache})
                    if whole is not None:
                        kwargs["repeat"] = repeat
                    x, a, cache = layer(x, **kwargs, **context)
                    aux.append((a, x) if keep_hidden else a)
                    updated.append(cache)
                return x, (aux, tuple(updated))

            if self.remat != "none":
                body = jax.checkpoint(body, policy=REMAT_POLICIES[self.remat], prevent_cse=False)
            xs = (state, rows, unit_caches, jnp.arange(len(ids[0]), dtype=jnp.int32))
            # Leading repeats whose blocks all lie below grad_from: a scan without gradient, then the rest.
            frozen = sum(all(repeats[r] < self.grad_from for repeats in ids) for r in range(len(ids[0])))
            if frozen:
                head = jax.lax.stop_gradient(jax.tree.map(lambda a, n=frozen: a[:n], xs))
                # The weights read whole as well: they may hold later repeats' trained rows (TrainedRows).
                frozen_body = functools.partial(body, whole=jax.lax.stop_gradient(whole))
                x, (aux_u, caches_u) = jax.lax.scan(frozen_body, x, head)
                x, aux_u = jax.lax.stop_gradient((x, aux_u))
            if frozen < len(ids[0]):
                tail = jax.tree.map(lambda a, n=frozen: a[n:], xs) if frozen else xs
                x, (aux_t, caches_t) = jax.lax.scan(body, x, tail)
                if frozen:
                    aux_t, caches_t = jax.tree.map(lambda a, b: jnp.concatenate([a, b]), (aux_u, caches_u),
                                                   (aux_t, caches_t))
                aux_u, caches_u = aux_t, caches_t
            new_caches.append(caches_u)
            for u, repeats in enumerate(ids):
                for r, layer_index in enumerate(repeats):
                    aux_by_layer[layer_index] = jax.tree.map(lambda a, r=r: a[r], aux_u[u])
        return x, aux_by_layer, None if caches is None else tuple(new_caches)
