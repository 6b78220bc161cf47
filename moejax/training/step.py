"""The CPT train step: float32 master weights and AdamW state, compute in a lower dtype, next-token loss plus
a load-balancing loss (and optionally the router z-loss), global-norm clipping, warmup + cosine
schedule, a parameter mask, gradient accumulation, rematerialisation, and a non-finite guard that
leaves the weights untouched. One jitted function; on a mesh, the parameters and their optimizer
state keep the shardings of the logical-axis rules and the batch is split over the data axes.
The learning rate, its schedule and the loss coefficients (NUMBERS) are data to that function, and a step made again
for the same model and settings up to those numbers reuses it: a sweep over them compiles once.

Qwen3-MoE's balance term is transformers' `load_balancing_loss_func`; Nemotron-H's is DeepSeek-V3's
sequence-wise loss on its sigmoid scores, and the aux-loss-free alternative its published model was
trained with: after each step, every MoE layer's `e_score_correction_bias` moves by `bias_update_rate`
towards balance (up for experts under the mean load, down for those over it). The step also counts,
inside the jit, the top-k assignments per MoE layer, language and expert.

The gradient is taken with respect to what trains alone. In expert-selective training the stacked expert weights are
read in place and enter as TrainedRows: the selected experts' rows are separate small arrays, the expert kernel forms
weight gradients for them alone and passes only the input gradient through the other experts, so no gradient of a
whole [layers, E, d, f] tensor is ever formed.
"""

from __future__ import annotations

import collections
import dataclasses
import functools
import json
import re
from collections.abc import Mapping
from typing import NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
import optax
from flax import nnx
from jax.sharding import NamedSharding, PartitionSpec

from moejax.data.mixture import IGNORE_INDEX
from moejax.data.packing import positions
from moejax.errors import DataError, SettingsError
from moejax.layers.moe import RouterControl, TrainedRows
from moejax.layers.stack import layer_position, segment_layer_ids
from moejax.models import abstract_model
from moejax.parallel.mesh import mesh_of, on_mesh
from moejax.training.adamw import Slices, apply_updates, clipped_adamw, frozen
from moejax.training.config import TrainConfig
from moejax.training.losses import (
    expert_counts,
    load_balancing_loss,
    next_token_loss,
    router_z_loss,
    sigmoid_balance_loss,
)

BATCH_FIELDS = ("input_ids", "segment_ids", "position_ids", "labels", "lang_ids")


def schedule(cfg: TrainConfig) -> optax.Schedule:
    """Linear warmup from 0, then a cosine to learning_rate * min_lr_ratio (cfg resolved): optax's, on the host.
    The step computes the same formula from its numbers (`learning_rate`)."""
    return optax.warmup_cosine_decay_schedule(0.0, cfg.learning_rate, max(cfg.warmup_steps, 1),
                                              max(cfg.total_steps, cfg.warmup_steps + 1),
                                              cfg.learning_rate * cfg.min_lr_ratio)


# The settings that enter the compiled step as data rather than as constants, so that runs differing only in them (a
# learning-rate sweep, a balance-coefficient ablation, another number of steps) run one program.
NUMBERS = ("learning_rate", "warmup_steps", "total_steps", "min_lr_ratio", "lb_coef", "z_coef", "bias_update_rate")


def step_numbers(cfg: TrainConfig) -> dict[str, np.ndarray]:
    """The step's numbers from a resolved cfg, as the step takes them (float32 and int32 scalars)."""
    warmup = max(cfg.warmup_steps, 1)
    return {"learning_rate": np.float32(cfg.learning_rate), "warmup": np.int32(warmup),
            "decay": np.float32(max(cfg.total_steps, cfg.warmup_steps + 1) - warmup),
            "min_lr_ratio": np.float32(cfg.min_lr_ratio), "lb_coef": np.float32(cfg.lb_coef),
            "z_coef": np.float32(cfg.z_coef), "bias_update_rate": np.float32(cfg.bias_update_rate)}


def learning_rate(numbers: Mapping[str, jax.Array], count: jax.Array) -> jax.Array:
    """`schedule`'s learning rate at step `count`, from step_numbers (traced): a linear warmup from 0 over `warmup`
    steps, then a cosine over `decay` steps to learning_rate * min_lr_ratio, where it stays."""
    lr, warmup, decay, ratio = (numbers[k] for k in ("learning_rate", "warmup", "decay", "min_lr_ratio"))
    ramp = lr * (jnp.clip(count, 0, warmup) / warmup)
    t = jnp.minimum(count - warmup, decay)
    cosine = 0.5 * (1 + jnp.cos(jnp.pi * t / decay))
    return jnp.where(count < warmup, ramp, lr * ((1 - ratio) * cosine + ratio))


def _dotted(path) -> str:
    """A pytree path as "layers.units.0.0.mlp.experts.up_edf" (Variable wrappers left out)."""
    parts = [getattr(k, "key", getattr(k, "idx", getattr(k, "name", None))) for k in path]
    return ".".join(str(p) for p in parts if p not in (None, "value", "raw_value"))


def _is_matrix(var: nnx.Variable) -> bool:
    """A weight matrix (decayed): two or more axes besides a stacked "layers" axis."""
    axes = var.get_metadata().get("logical_axes") or (None,) * var.ndim
    return sum(a != "layers" for a in axes) >= 2


def _is_variable(x) -> bool:
    return isinstance(x, nnx.Variable)


def _is_expert_tensor(var: nnx.Variable) -> bool:
    """A layer stack's stacked expert tensor [layers, E, ...], which the stack can read in place."""
    return tuple(var.get_metadata().get("logical_axes") or ())[:2] == ("layers", "expert")


def _experts_in_place(train, params) -> bool:
    """Whether the step reads the stacked expert weights in place (LayerStack.index_experts) and takes their gradients
    at the trained rows alone (TrainedRows): when no expert tensor trains whole and the parameters are on one device
    (the expert-parallel kernel takes whole layers). Frozen expert weights then pass the input gradient only."""
    whole = any(t is True and _is_expert_tensor(var) for t, var in
                zip(jax.tree.leaves(train), jax.tree.leaves(params, is_leaf=_is_variable), strict=True))
    return not whole and mesh_of(params) is None


def _read_as_rows(params, in_place: bool):
    """Per parameter: whether it enters the model as TrainedRows (an expert tensor, when they are read in place)."""
    return jax.tree.map(lambda var: jax.tree.map(lambda _: in_place and _is_expert_tensor(var), var), params,
                        is_leaf=_is_variable)


def _trained_part(train, params, as_rows):
    """What the gradient is taken with respect to, per parameter: its trained rows [n, ...] (Slices read as rows), the
    whole array (it trains whole, or its Slices are taken from its gradient after), or None (frozen)."""
    def one(t, p, rows):
        if isinstance(t, Slices) and rows:
            return t.take(p)
        return None if frozen(t) else p

    return jax.tree.map(one, train, params, as_rows)


def _with_trained(train, params, trained, as_rows):
    """The model's parameters from the frozen ones and the trained part (_trained_part): an expert tensor read as
    rows becomes TrainedRows (no rows when frozen)."""
    def one(t, p, g, rows):
        if not rows:
            return p if g is None else g
        if isinstance(t, Slices):
            return TrainedRows(p, g, *(tuple(int(i) for i in column) for column in t.index))
        return TrainedRows(p, jnp.zeros((0, *p.shape[2:]), p.dtype), (), ())

    return jax.tree.map(one, train, params, trained, as_rows)


def trainable(cfg: TrainConfig, params, model_config):
    """What trains, a tree with the parameters' structure: True, False, or Slices (expert-selective training: the
    named experts' [repeat, expert] slices of a stacked expert tensor; with train_routers, the [repeat] slices of
    the routers of those layers; train_blocks: those blocks' [repeat] slices of every stacked tensor). Never the
    correction bias, which moves by its own rule."""
    selection = cfg.expert_selection(model_config)
    blocks = set(cfg.train_blocks or ())
    outside = sorted(b for b in blocks if not 0 <= b < len(model_config.layer_kinds))
    if outside:
        raise SettingsError(f"train_blocks {outside} are not blocks of this model (blocks 0-"
                            f"{len(model_config.layer_kinds) - 1})")
    selective = bool(selection or blocks)
    pattern = re.compile(cfg.trainable or "") if cfg.trainable or not selective else None
    layer_ids = segment_layer_ids(model_config.layer_kinds)
    moe_ordinal = {layer: i for i, layer in enumerate(model_config.moe_layers)}

    def one(path, var):
        name = _dotted(path)
        whole = pattern is not None and bool(pattern.search(name)) and not name.endswith("correction_e")
        where = layer_position(name)
        if whole or not selective or where is None:
            return jax.tree.map(lambda _: whole, var)
        axes = tuple(var.get_metadata().get("logical_axes") or ())
        block_ids = layer_ids[where[0]][where[1]]
        moe = [moe_ordinal.get(block) for block in block_ids]
        everything = range(model_config.num_routed_experts)
        if axes[:2] == ("layers", "expert"):
            rows = [(r, e) for r, (block, layer) in enumerate(zip(block_ids, moe, strict=True))
                    for e in (everything if block in blocks else selection.get(layer, ()))]
        elif name.endswith("correction_e"):
            rows = []
        else:
            router = cfg.train_routers and name.rsplit(".", 1)[0].endswith("router")  # its weight and any bias
            rows = [(r,) for r, (block, layer) in enumerate(zip(block_ids, moe, strict=True))
                    if block in blocks or (router and layer in selection)]
        if not rows:
            return jax.tree.map(lambda _: False, var)
        index = tuple(np.asarray(column, np.int32) for column in zip(*rows, strict=True))
        return jax.tree.map(lambda _: Slices(index), var)

    train = jax.tree_util.tree_map_with_path(one, params, is_leaf=_is_variable)
    if all(frozen(t) for t in jax.tree.leaves(train)):
        names = [_dotted(p) for p, _ in jax.tree_util.tree_flatten_with_path(params)[0]]
        raise SettingsError(f"trainable {cfg.trainable!r} matches no parameter; names look like {names[:3]}")
    return train


def trainable_budget(train, params) -> dict:
    """Trainable parameters per tensor (those that train at all) and in total, with the model's size."""
    per_tensor = {}
    total = 0
    for (path, p), t in zip(jax.tree_util.tree_flatten_with_path(params)[0], jax.tree.leaves(train), strict=True):
        size = int(np.prod(p.shape))
        total += size
        if frozen(t):
            continue
        per_tensor[_dotted(path)] = t.count * int(np.prod(p.shape[len(t.index):])) if isinstance(t, Slices) else size
    count = sum(per_tensor.values())
    return {"trainable": count, "total": total, "share": count / total, "per_tensor": per_tensor}


def budget_text(budget: dict) -> str:
    """ "1.2M of 404.9M parameters train (0.31%)" """
    def short(n: int) -> str:
        for unit, size in (("B", 1e9), ("M", 1e6), ("k", 1e3)):
            if n >= size:
                return f"{n / size:.1f}{unit}"
        return str(n)

    return (f"{short(budget['trainable'])} of {short(budget['total'])} parameters train "
            f"({100 * budget['share']:.2f}%)")


def first_trained_block(cfg: TrainConfig, model_config) -> int:
    """The first decoder block with a trainable parameter, when only blocks train (expert-selective training, whole
    blocks): the blocks before it need no backward pass. 0 when anything outside the blocks may train."""
    if cfg.trainable or not (cfg.train_experts or cfg.train_blocks):
        return 0
    blocks = [model_config.moe_layers[layer] for layer in cfg.expert_selection(model_config)]
    return min([*blocks, *(cfg.train_blocks or ())])


def route_control(cfg: TrainConfig, model_config) -> RouterControl | None:
    """route_to_trained as RouterControl data: in the selected layers only the selected experts may be chosen."""
    if not cfg.route_to_trained:
        return None
    allowed = np.ones((len(model_config.moe_layers), model_config.num_routed_experts), bool)
    for layer, ids in cfg.expert_selection(model_config).items():
        allowed[layer] = False
        allowed[layer, list(ids)] = True
    return RouterControl(allowed_e=allowed)


class Optimizer(NamedTuple):
    """`optimizer`'s transformation, with `made_for`: what it was made from (the settings, the model's config and the
    parameters' structure), by which make_train_step knows it may reuse a step compiled with an equal one."""

    init: optax.TransformInitFn
    update: optax.TransformUpdateFn
    made_for: tuple


def optimizer(cfg: TrainConfig, params, model_config, learning_rate_at: optax.Schedule | None = None) -> Optimizer:
    """Clipping, then AdamW (decay on weight matrices); frozen parameters (not matching `trainable`, outside an
    expert selection, and the correction bias, which moves by its own rule) get no update at all. learning_rate_at:
    the schedule (default `schedule(cfg)`; the step passes its numbers' `learning_rate`)."""
    train = trainable(cfg, params, model_config)
    decay = jax.tree.map(lambda var: jax.tree.map(lambda _: _is_matrix(var), var), params, is_leaf=_is_variable)
    tx = clipped_adamw(learning_rate_at or schedule(cfg), cfg.b1, cfg.b2, cfg.weight_decay, cfg.clip_norm, train,
                       decay)
    return Optimizer(tx.init, tx.update, (_program_key(cfg), model_config, jax.tree.structure(params)))


def _program_key(cfg: TrainConfig) -> str:
    """What of cfg the compiled step depends on, as a hashable value: everything but its NUMBERS (whether a correction
    bias moves at all is kept)."""
    fields = dataclasses.asdict(cfg) | {name: None for name in NUMBERS}
    return json.dumps(fields | {"bias_update_rate": bool(cfg.bias_update_rate)}, sort_keys=True, default=str)


# The steps compiled in this process, by what they compute (the most recent few): a run equal to an earlier one in
# everything but its data (a study's runs over other mixtures, a resumed run, a test's second run) reuses that
# program instead of tracing and compiling it again (seconds on a tiny model, minutes at 30B).
_COMPILED: collections.OrderedDict = collections.OrderedDict()
_COMPILED_KEPT = 8


def _reused(key, build):
    """build() the first time `key` is seen (key None: always); the same object again after that."""
    if key is None:
        return build()
    if key not in _COMPILED:
        _COMPILED[key] = build()
        while len(_COMPILED) > _COMPILED_KEPT:
            _COMPILED.popitem(last=False)
    _COMPILED.move_to_end(key)
    return _COMPILED[key]


@jax.tree_util.register_dataclass
@dataclasses.dataclass
class TrainState:
    step: jax.Array
    params: nnx.State  # float32 master weights
    opt_state: optax.OptState


def init_state(model: nnx.Module, cfg: TrainConfig) -> tuple[nnx.GraphDef, TrainState, optax.GradientTransformation]:
    """(graphdef, state, optimizer) with float32 master weights, keeping the parameters' shardings (cfg resolved)."""
    cfg = cfg.resolved(model.config)
    model.layers.remat = cfg.remat
    model.layers.grad_from = first_trained_block(cfg, model.config)
    # Under eval_shape, as `moejax plan --train` and export use it, the caller's graphdef decides how the expert
    # weights are read.
    abstract = any(isinstance(x, jax.core.Tracer) for x in jax.tree.leaves(nnx.state(model)))
    model.layers.index_experts = not abstract and _experts_in_place(trainable(cfg, nnx.state(model), model.config),
                                                                    nnx.state(model))
    graphdef, params = nnx.split(model)
    params = jax.tree.map(lambda x: x.astype(jnp.float32), params)
    tx = optimizer(cfg, params, model.config)
    state = TrainState(jnp.zeros((), jnp.int32), params, tx.init(params))
    # The step counters are created uncommitted; the step returns them committed, which would make its second
    # call compile the whole step again. Placing them as the step will return them avoids that.
    if abstract:
        return graphdef, state, tx
    mesh = mesh_of(params)
    home = (NamedSharding(mesh, PartitionSpec()) if mesh is not None
            else jax.sharding.SingleDeviceSharding(next(iter(jax.tree.leaves(params)[0].sharding.device_set))))
    return graphdef, jax.tree.map(lambda x: x if x.committed else jax.device_put(x, home), state), tx


def _cast(params, compute):
    """Float32 master weights cast to the compute dtypes (a tree from _compute_dtypes)."""
    return jax.tree.map(lambda x, dtype: x.astype(dtype), params, compute)


def _call_placed(jitted, first, params, batch: Mapping[str, np.ndarray], accum_steps: int):
    """jitted(first, batch) with the batch completed and, when `params` live on a mesh, split over its batch
    axes under that mesh (so MoE blocks run expert-parallel)."""
    batch = _complete(batch, accum_steps)
    with on_mesh(params) as place:
        return jitted(first, dict(zip(BATCH_FIELDS, place(*(batch[k] for k in BATCH_FIELDS)), strict=True)))


def _compute_dtypes(model_config, compute_dtype: str):
    """The dtype of each parameter in the model built at the compute dtype (some stay float32 there,
    such as the correction bias), as a tree of the state's structure."""
    return jax.tree.map(lambda x: x.dtype, nnx.state(abstract_model(model_config, jnp.dtype(compute_dtype))))


def make_train_step(graphdef: nnx.GraphDef, tx: optax.GradientTransformation, cfg: TrainConfig, model_config,
                    num_langs: int = 1):
    """step(state, batch) -> (state, metrics), jitted. batch: a mapping of numpy/jax arrays [b, t]:
    input_ids, segment_ids (0 = padding, else the document within the row; a 0/1 attention mask is one
    document), labels (-100: not predicted), and optionally position_ids (default 0..t-1) and lang_ids
    [b] (each row's language, in [0, num_langs); default 0).

    metrics: loss (cross-entropy), aux_loss, z_loss, total_loss, grad_norm (of what trains: the norm the clipping
    sees), lr (of this step), finite,
    tokens (predicted labels), expert_counts [moe layers, num_langs, E] (int32; moejax.training.run turns them
    into usage entropies).

    tx: the optimizer init_state made for cfg. A step equal to one made before in this process (the same graph,
    settings, model and languages, and an optimizer `optimizer` made for them) reuses its compiled program."""
    cfg = cfg.resolved(model_config)
    if cfg.bias_update_rate and model_config.router_kind != "sigmoid":
        raise SettingsError("bias_update_rate (aux-loss-free balancing) needs a sigmoid router with a correction "
                            f"bias (Nemotron-H); {model_config.model_type} has none")
    made_for = getattr(tx, "made_for", None)
    ours = made_for is not None and made_for[:2] == (_program_key(cfg), model_config)
    jitted = _reused(("train", graphdef, made_for, num_langs) if ours else None,
                     lambda: _jitted_step(graphdef, None if ours else tx, cfg, model_config, num_langs))
    bound = RunStep(jitted, step_numbers(cfg))

    def step(state: TrainState, batch: Mapping[str, np.ndarray]):
        return _call_placed(bound, state, state.params, batch, cfg.accum_steps)

    step.jitted = bound  # for lowering from abstract shapes (moejax plan --train)
    return step


@dataclasses.dataclass(frozen=True)
class RunStep:
    """A compiled step (`program`, jitted (state, batch, numbers), shared by equal runs) with one run's numbers
    bound: called and lowered as (state, batch)."""

    program: object
    numbers: dict

    def __call__(self, state, batch):
        return self.program(state, batch, self.numbers)

    def lower(self, state, batch):
        return self.program.lower(state, batch, self.numbers)


def _jitted_step(graphdef: nnx.GraphDef, tx: optax.GradientTransformation | None, cfg: TrainConfig, model_config,
                 num_langs: int):
    """make_train_step's jitted (state, batch, numbers) -> (state, metrics), for a resolved cfg; its NUMBERS come as
    data (step_numbers). tx None: `optimizer`'s, made in the trace with the numbers' learning rate."""
    compute = _compute_dtypes(model_config, cfg.compute_dtype)
    experts = model_config.num_routed_experts
    top_k = model_config.num_experts_per_tok
    sigmoid = model_config.router_kind == "sigmoid"
    control = route_control(cfg, model_config)

    def loss_fn(trained, params, micro, train, as_rows, numbers):
        # The gradient is taken with respect to `trained` alone: XLA computes none for the frozen parameters.
        cast = jax.tree.map(lambda dtype, x: None if x is None else x.astype(dtype), compute, trained)
        model = nnx.merge(graphdef, _with_trained(train, _cast(params, compute), cast, as_rows))
        valid_bt = micro["segment_ids"] != 0
        out = model.forward(micro["input_ids"], micro["segment_ids"], micro["position_ids"], True, control=control)
        ce = next_token_loss(out.logits, micro["labels"])
        zero = jnp.zeros((), jnp.float32)
        if not out.router_logits:
            return ce, ({"loss": ce, "aux_loss": zero, "z_loss": zero}, jnp.zeros((0, num_langs, experts), jnp.int32))
        if sigmoid:
            aux = sigmoid_balance_loss(out.router_logits, out.router_expert_ids, valid_bt)
        else:
            aux = load_balancing_loss(out.router_logits, top_k, valid_bt)
        z = router_z_loss(out.router_logits, valid_bt)
        counts = expert_counts(out.router_expert_ids, experts, micro["lang_ids"], num_langs, valid_bt)
        total = ce + numbers["lb_coef"] * aux + numbers["z_coef"] * z
        return total, ({"loss": ce, "aux_loss": aux, "z_loss": z}, counts)

    def accumulated(params, batch, train, numbers):
        """((total, (metrics, counts)), grads), averaged over accum_steps micro-batches (counts summed). grads: per
        parameter, the gradient of what trains (a Slices parameter's: of its slices alone, [slices, ...]), None for
        a frozen one."""
        as_rows = _read_as_rows(params, nnx.merge(graphdef, params).layers.index_experts)
        trained = _trained_part(train, params, as_rows)
        grad_fn = jax.value_and_grad(functools.partial(loss_fn, train=train, as_rows=as_rows, numbers=numbers),
                                     has_aux=True)
        if cfg.accum_steps == 1:
            out, grads = grad_fn(trained, params, batch)
        else:
            micro = jax.tree.map(lambda a: a.reshape(cfg.accum_steps, a.shape[0] // cfg.accum_steps, *a.shape[1:]),
                                 batch)
            zeros = jax.tree.map(jnp.zeros_like,
                                 jax.eval_shape(grad_fn, trained, params, jax.tree.map(lambda a: a[0], micro)))
            summed, _ = jax.lax.scan(lambda carry, m: (jax.tree.map(jnp.add, carry, grad_fn(trained, params, m)),
                                                       None), zeros, micro)
            (total, (metrics, counts)), grads = summed
            mean = jax.tree.map(lambda x: x / cfg.accum_steps, (total, metrics, grads))
            out, grads = (mean[0], (mean[1], counts)), mean[2]
        return out, jax.tree.map(lambda t, g, rows: t.take(g) if isinstance(t, Slices) and not rows else g,
                                 train, grads, as_rows)

    # The state is donated: the new parameters and optimizer state take the old ones' buffers, so a step
    # holds one copy of them, not two (callers rebind: state = step(state, batch)[0]).
    @functools.partial(jax.jit, donate_argnums=0)
    def jitted(state: TrainState, batch, numbers):
        train = trainable(cfg, state.params, model_config)
        (total, (metrics, counts_lge)), grads = accumulated(state.params, batch, train, numbers)
        update_fn = (tx or optimizer(cfg, state.params, model_config, lambda n: learning_rate(numbers, n))).update
        grad_norm = optax.tree.norm(grads)
        finite = jnp.isfinite(total) & jnp.isfinite(grad_norm)

        def update(state, grads):
            updates, opt_state = update_fn(grads, state.opt_state, state.params)
            params = apply_updates(state.params, updates, train)
            if cfg.bias_update_rate:
                params = _move_correction_bias(params, model_config, jnp.sum(counts_lge, axis=1),
                                               numbers["bias_update_rate"])
            return TrainState(state.step + 1, params, opt_state)

        # A non-finite loss or gradient leaves everything as it was; the caller stops on finite == False. A
        # cond, not a select: the update then runs in place, one pass over the state (a select keeps both).
        new = jax.lax.cond(finite, update, lambda state, grads: state, state, grads)
        tokens = jnp.sum(batch["labels"][:, 1:] != IGNORE_INDEX)
        return new, metrics | {"total_loss": total, "grad_norm": grad_norm, "finite": finite, "tokens": tokens,
                               "lr": learning_rate(numbers, state.step), "expert_counts": counts_lge}

    return jitted


def make_eval_step(graphdef: nnx.GraphDef, cfg: TrainConfig, model_config):
    """evaluate(params, batch) -> (summed next-token cross-entropy, predicted tokens), jitted: the language-model
    loss alone, in the train step's compute dtype, never a balance term. batch: as make_train_step's. Reuses the
    program of an equal evaluation made before in this process (the same graph, model and compute dtype)."""
    compute_dtype = cfg.resolved(model_config).compute_dtype
    jitted = _reused(("eval", graphdef, model_config, compute_dtype),
                     lambda: _jitted_eval(graphdef, _compute_dtypes(model_config, compute_dtype)))
    return lambda params, batch: _call_placed(jitted, params, params, batch, 1)


def _jitted_eval(graphdef: nnx.GraphDef, compute):
    @jax.jit
    def jitted(params, batch):
        model = nnx.merge(graphdef, _cast(params, compute))
        out = model.forward(batch["input_ids"], batch["segment_ids"], batch["position_ids"], False)
        tokens = jnp.sum(batch["labels"][:, 1:] != IGNORE_INDEX)
        return next_token_loss(out.logits, batch["labels"]) * tokens, tokens

    return jitted


def _complete(batch: Mapping[str, np.ndarray], accum_steps: int) -> dict[str, np.ndarray]:
    """The batch with default position_ids and lang_ids, checked."""
    unknown = set(batch) - set(BATCH_FIELDS)
    if unknown:
        raise DataError(f"unknown batch fields {sorted(unknown)}; expected {BATCH_FIELDS}")
    ids = np.asarray(batch["input_ids"], np.int32)
    if ids.ndim != 2:
        raise DataError(f"input_ids must be [batch, seq], got shape {ids.shape}")
    out = {"input_ids": ids,
           "segment_ids": np.asarray(batch.get("segment_ids", np.ones_like(ids)), np.int32),
           "position_ids": positions(batch.get("segment_ids", np.ones_like(ids)), batch.get("position_ids"),
                                     packed="segment_ids" in batch),
           "labels": np.asarray(batch.get("labels", ids), np.int32),
           "lang_ids": np.asarray(batch.get("lang_ids", np.zeros(ids.shape[0])), np.int32)}
    for name in ("segment_ids", "position_ids", "labels"):
        if out[name].shape != ids.shape:
            raise DataError(f"{name} shape {out[name].shape} != input_ids shape {ids.shape}")
    if out["lang_ids"].shape != ids.shape[:1]:
        raise DataError(f"lang_ids must be [batch] = {ids.shape[:1]}, got {out['lang_ids'].shape}")
    if ids.shape[0] % accum_steps:
        raise DataError(f"batch size {ids.shape[0]} is not divisible by accum_steps={accum_steps}")
    return out


def _move_correction_bias(params, model_config, load_le: jax.Array, rate: float):
    """params with each MoE layer's correction bias moved by rate * sign(mean load - load), from the layers'
    top-k loads [moe layers, E]. A stacked bias [repeats, E] gets the steps of its repeats' layers."""
    moe_ordinal = {layer: i for i, layer in enumerate(model_config.moe_layers)}
    layer_ids = segment_layer_ids(model_config.layer_kinds)
    step_le = rate * jnp.sign(jnp.mean(load_le, axis=-1, keepdims=True) - load_le.astype(jnp.float32))

    def move(path, x):
        name = _dotted(path)
        if not name.endswith("correction_e"):
            return x
        s, u, _ = layer_position(name)
        rows = jnp.asarray([moe_ordinal[layer] for layer in layer_ids[s][u]])
        return x + step_le[rows]

    return jax.tree_util.tree_map_with_path(move, params)
