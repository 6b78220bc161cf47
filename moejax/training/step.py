"""The CPT train step: float32 master weights and AdamW state, compute in a lower dtype, next-token loss plus
the load-balancing loss (and optionally the router z-loss), global-norm clipping, warmup + cosine
schedule, a parameter mask, and a non-finite guard that leaves the weights untouched. One jitted
function; on a mesh, the parameters and their optimizer state keep the shardings of the logical-axis
rules and the batch is split over the data axes.
"""

from __future__ import annotations

import dataclasses
import re

import jax
import jax.numpy as jnp
import optax
from flax import nnx

from moejax.models.common import on_mesh
from moejax.training.losses import load_balancing_loss, next_token_loss, router_z_loss


@dataclasses.dataclass(frozen=True)
class TrainConfig:
    learning_rate: float = 1e-5
    warmup_steps: int = 100
    total_steps: int = 1000
    min_lr_ratio: float = 0.1  # the cosine decays to learning_rate * min_lr_ratio
    weight_decay: float = 0.1  # on matrices only (not norms, biases, the correction bias)
    b1: float = 0.9
    b2: float = 0.95
    clip_norm: float = 1.0
    lb_coef: float = 1e-3  # load-balancing loss coefficient (0: none)
    z_coef: float = 0.0  # router z-loss coefficient
    compute_dtype: str = "bfloat16"
    trainable: str | None = None  # a regex over parameter paths ("layers.units.0.0.mlp.experts..."); None: all


def schedule(cfg: TrainConfig) -> optax.Schedule:
    return optax.warmup_cosine_decay_schedule(0.0, cfg.learning_rate, max(cfg.warmup_steps, 1),
                                              max(cfg.total_steps, cfg.warmup_steps + 1),
                                              cfg.learning_rate * cfg.min_lr_ratio)


def _dotted(path) -> str:
    """A pytree path as "layers.units.0.0.mlp.experts.up_edf" (Variable wrappers left out)."""
    parts = [getattr(k, "key", getattr(k, "idx", getattr(k, "name", None))) for k in path]
    return ".".join(str(p) for p in parts if p not in (None, "value", "raw_value"))


def optimizer(cfg: TrainConfig, params) -> optax.GradientTransformation:
    """Clipping, then AdamW (decay on >= 2-D weights); frozen parameters (not matching `trainable`) get no
    update at all."""
    decay = jax.tree.map(lambda x: x.ndim >= 2, params)
    tx = optax.chain(optax.clip_by_global_norm(cfg.clip_norm),
                     optax.adamw(schedule(cfg), cfg.b1, cfg.b2, weight_decay=cfg.weight_decay, mask=decay))
    if cfg.trainable is None:
        return tx
    pattern = re.compile(cfg.trainable)
    labels = jax.tree_util.tree_map_with_path(
        lambda path, _: "train" if pattern.search(_dotted(path)) else "freeze", params)
    if "train" not in jax.tree.leaves(labels):
        names = [_dotted(p) for p, _ in jax.tree_util.tree_flatten_with_path(params)[0]]
        raise ValueError(f"trainable {cfg.trainable!r} matches no parameter; names look like {names[:3]}")
    return optax.multi_transform({"train": tx, "freeze": optax.set_to_zero()}, labels)


@jax.tree_util.register_dataclass
@dataclasses.dataclass
class TrainState:
    step: jax.Array
    params: nnx.State  # float32 master weights
    opt_state: optax.OptState


def init_state(model: nnx.Module, cfg: TrainConfig) -> tuple[nnx.GraphDef, TrainState, optax.GradientTransformation]:
    """(graphdef, state, optimizer) with float32 master weights, keeping the parameters' shardings."""
    if model.config.model_type != "qwen3_moe":
        raise ValueError(f"training {model.config.model_type} is not implemented yet: its load-balancing terms "
                         "(sigmoid routing, correction-bias updates) come with the CPT work; Qwen3-MoE trains")
    graphdef, params = nnx.split(model)
    params = jax.tree.map(lambda x: x.astype(jnp.float32), params)
    tx = optimizer(cfg, params)
    return graphdef, TrainState(jnp.zeros((), jnp.int32), params, tx.init(params)), tx


def make_train_step(graphdef: nnx.GraphDef, tx: optax.GradientTransformation, cfg: TrainConfig, top_k: int):
    """step(state, input_ids [b, t], attention_mask [b, t], labels [b, t]) -> (state, metrics), jitted."""
    compute = jnp.dtype(cfg.compute_dtype)

    def loss_fn(params, ids, mask, labels):
        model = nnx.merge(graphdef, jax.tree.map(lambda x: x.astype(compute), params))
        positions = jnp.broadcast_to(jnp.arange(ids.shape[1], dtype=jnp.int32), ids.shape)
        out = model.forward(ids, mask, positions, True)
        ce = next_token_loss(out.logits, labels)
        aux = load_balancing_loss(out.router_logits, top_k, mask) if out.router_logits else jnp.zeros(())
        z = router_z_loss(out.router_logits, mask) if out.router_logits else jnp.zeros(())
        return ce + cfg.lb_coef * aux + cfg.z_coef * z, {"loss": ce, "aux_loss": aux, "z_loss": z}

    @jax.jit
    def jitted(state: TrainState, ids, mask, labels):
        (total, metrics), grads = jax.value_and_grad(loss_fn, has_aux=True)(state.params, ids, mask, labels)
        grad_norm = optax.tree.norm(grads)
        finite = jnp.isfinite(total) & jnp.isfinite(grad_norm)
        updates, opt_state = tx.update(grads, state.opt_state, state.params)
        params = optax.apply_updates(state.params, updates)
        new = TrainState(state.step + 1, params, opt_state)
        # A non-finite loss or gradient leaves everything as it was; the caller stops on finite == False.
        new = jax.tree.map(lambda a, b: jnp.where(finite, a, b), new, state)
        return new, metrics | {"total_loss": total, "grad_norm": grad_norm, "finite": finite,
                               "lr": schedule(cfg)(state.step)}

    def step(state: TrainState, ids, mask, labels):
        with on_mesh(state.params) as place:  # on a mesh: the batch split, MoE blocks expert-parallel
            return jitted(state, *place(ids, mask, labels))

    return step
