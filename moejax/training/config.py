"""The training step's settings (moejax.training.step runs them): one frozen dataclass with the defaults, checked when
built, imported without JAX (the command line builds it before anything heavy loads)."""

from __future__ import annotations

import dataclasses
import re

from moejax.config import REMAT_NAMES
from moejax.errors import SettingsError

DEFAULT_LB_COEF = 1e-3  # for a model whose config.json records no router_aux_loss_coef


@dataclasses.dataclass(frozen=True)
class TrainConfig:
    """The step's hyperparameters. None marks a value resolved from the model and the machine
    (`resolved`): the balance coefficient from the model's config.json, the warmup from total_steps, the
    compute dtype from the JAX backend."""

    learning_rate: float = 1e-5
    warmup_steps: int | None = None  # None: 5% of total_steps (at least 1)
    total_steps: int = 1000
    min_lr_ratio: float = 0.1  # the cosine decays to learning_rate * min_lr_ratio
    weight_decay: float = 0.1  # on weight matrices only (not norms, biases, per-head vectors)
    b1: float = 0.9
    b2: float = 0.95
    clip_norm: float = 1.0
    lb_coef: float | None = None  # load-balancing coefficient (0: none); None: config.json's router_aux_loss_coef
    z_coef: float = 0.0  # router z-loss coefficient
    bias_update_rate: float = 0.0  # Nemotron-H aux-loss-free balancing: correction-bias step per train step
    compute_dtype: str | None = None  # None: bfloat16 on an accelerator, float32 on a CPU
    trainable: str | None = None  # a regex over parameter paths ("layers.units.0.0.mlp.experts..."); None: all
    # Expert-selective training (docs/training.md, training only some experts): {MoE layer: expert ids}. Only those
    # experts' slices of the stacked expert tensors train (plus what `trainable` names, when given); with train_routers,
    # the whole router of each layer named; with route_to_trained, training routes those layers' tokens to the named
    # experts only (the others' logits RESTRICTED; evaluation and export are unrestricted).
    train_experts: dict[str, list[int]] | None = None
    train_routers: bool = False
    route_to_trained: bool = False
    train_blocks: list[int] | None = None  # decoder blocks trained whole (their slices of every stacked tensor)
    remat: str = "none"  # a REMAT_NAMES value: none, full, dots
    accum_steps: int = 1  # micro-batches per step; the batch is split into this many

    def __post_init__(self):
        if self.remat not in REMAT_NAMES:
            raise SettingsError(f"remat {self.remat!r} is not one of {', '.join(REMAT_NAMES)}")
        if self.accum_steps < 1:
            raise SettingsError(f"accum_steps must be >= 1, got {self.accum_steps}")
        if self.compute_dtype is not None and self.compute_dtype not in ("float32", "bfloat16", "float16"):
            raise SettingsError(f"compute_dtype {self.compute_dtype!r} is not float32, bfloat16 or float16")
        if (self.train_routers or self.route_to_trained) and not self.train_experts:
            raise SettingsError("train_routers and route_to_trained apply to the layers of train_experts: give a "
                                "selection (--train-experts FILE)")
        if self.train_experts is not None and not any(self.train_experts.values()):
            raise SettingsError("train_experts selects no expert: an empty selection would train nothing (it must "
                                "not be read as everything); name at least one {layer: [expert ids]}")
        if self.train_experts is not None and self.train_blocks:
            raise SettingsError("train_experts and train_blocks both say what trains (selected experts, or whole "
                                "blocks); give one of them")
        if self.train_blocks is not None and not self.train_blocks:
            raise SettingsError("train_blocks names no block")
        if self.trainable is not None:
            try:
                re.compile(self.trainable)
            except re.error as e:
                raise SettingsError(f"trainable {self.trainable!r} is not a regular expression ({e})") from None

    def expert_selection(self, model_config) -> dict[int, tuple[int, ...]]:
        """train_experts as {MoE layer: expert ids}, checked against the model (a SettingsError naming what is
        wrong)."""
        if self.train_experts is None:
            return {}
        layers, experts = len(model_config.moe_layers), model_config.num_routed_experts
        out = {}
        for key, ids in self.train_experts.items():
            layer = int(key)
            if not 0 <= layer < layers:
                raise SettingsError(f"train_experts: layer {key} is not an MoE layer of this model (MoE layers 0-"
                                    f"{layers - 1}, as in layers.csv)")
            beyond = [e for e in ids if not 0 <= int(e) < experts]
            if beyond:
                raise SettingsError(f"train_experts: layer {key} names expert id(s) {beyond}; the model has "
                                    f"{experts} experts (0-{experts - 1})")
            if ids:
                out[layer] = tuple(sorted({int(e) for e in ids}))
        if not out:
            raise SettingsError("train_experts selects no expert")
        return out

    def resolved(self, model_config) -> TrainConfig:
        """Every None replaced by its value for this model on this machine."""
        import jax

        lb = self.lb_coef
        if lb is None:
            lb = DEFAULT_LB_COEF if model_config.router_aux_loss_coef is None else model_config.router_aux_loss_coef
        return dataclasses.replace(
            self, lb_coef=lb,
            warmup_steps=max(1, self.total_steps // 20) if self.warmup_steps is None else self.warmup_steps,
            # XLA's CPU compiler has no fast bfloat16 matmul: float32 is the faster choice there.
            compute_dtype=self.compute_dtype or ("float32" if jax.default_backend() == "cpu" else "bfloat16"))
