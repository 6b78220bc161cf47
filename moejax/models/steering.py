"""Router steering (docs/steering.md, steering): which experts of which MoE layers to promote or suppress, and how.

A spec is data: `Steering.control(config)` turns it into per-layer arrays [moe layers, E] that the jitted forward
takes as an argument (RouterControl), so a new spec, lambda or layer window runs the same compiled program.

JSON (or a dict), layer keys being MoE-layer indices as in `moejax analyze`'s layers.csv:

    {"mode": "soft", "lambda": 0.5, "seed": 0,
     "layers": {"10": {"promote": [3, 17], "suppress": [5]}, "11": {"promote": [8]}}}

or the experts.json that `moejax experts` writes, with a mode, a lambda and a direction (`from_experts`).
"""

from __future__ import annotations

import dataclasses
import json
import math
from pathlib import Path

import numpy as np

from moejax.errors import ConfigError, DataError
from moejax.layers.moe import RouterControl

MODES = ("soft", "hard")
DIRECTIONS = ("promote", "suppress")
# Hard steering's tie-breaking eps (paper (b)'s eq. 5, eps ~ N(0, 1e-6)): a signed draw per token and expert. We read
# the 1e-6 as the variance, as N(mu, sigma^2) is written, so its standard deviation is 1e-3 (a spec's "eps_std"
# overrides it; 1e-6 would be the standard-deviation reading, below a float32 step of logits beyond 8).
EPS_STD = 1e-3
# Soft steering shifts a logit by lambda standard deviations of the token's logits. Beyond ~20 the shifted experts'
# float32 probabilities are exactly 0 or 1 for typical logits (a logit gap above ~100 underflows exp), and which of
# the zeroed experts fill the top-k is decided by ties: the routing degenerates. Paper (b) uses 0.5.
MAX_LAMBDA = 20.0


def _layer(key, where: str) -> int:
    """An MoE-layer key as an int: "12", 12, or from the end, -1 for the last (numbered as in layers.csv)."""
    if isinstance(key, bool) or not isinstance(key, int | str):
        raise ConfigError(f"{where}: layer key {key!r} is not an MoE-layer index")
    try:
        return int(key)
    except ValueError:
        raise ConfigError(f"{where}: layer key {key!r} is not an MoE-layer index (0, 1, ... as in layers.csv; "
                          "-1 for the last MoE layer, -2 for the one before)") from None


def _ids(value, where: str) -> tuple[int, ...]:
    if not isinstance(value, list | tuple) or not all(isinstance(v, int | np.integer) and not isinstance(v, bool)
                                                      for v in value):
        raise ConfigError(f"steering: {where} must be a list of expert ids (integers), got {value!r}")
    return tuple(int(v) for v in value)


@dataclasses.dataclass(frozen=True)
class Steering:
    """mode "soft": z_k += lambda * std(z) for a promoted expert k (-lambda for a suppressed one); mode "hard"
    (paper (b)'s eq. 5): z_k = max(z) + eps (promoted) or min(z) - eps (suppressed), eps a signed N(0, eps_std^2)
    draw per token and expert from `seed`, the layer and the token's position (so a promoted expert is chosen except
    where more than k experts tie within eps of the maximum, the edge case the paper's appendix describes).
    `layers`: MoE-layer index -> (promoted ids, suppressed ids). Acts on the raw logits, before the softmax
    (Qwen3-MoE, OLMoE), the top-k (GPT-OSS) or the sigmoid (Nemotron-H); on Nemotron-H, where the correction bias
    and the group limit choose, hard steering also acts on those selection scores: a promoted expert is chosen at
    every token and a suppressed one never."""

    mode: str = "soft"
    lam: float = 0.5
    seed: int = 0
    layers: dict[int, tuple[tuple[int, ...], tuple[int, ...]]] = dataclasses.field(default_factory=dict)
    eps_std: float = EPS_STD

    def __post_init__(self):
        if self.mode not in MODES:
            raise ConfigError(f"steering: mode {self.mode!r} is not one of {', '.join(MODES)}")
        if isinstance(self.lam, bool) or not isinstance(self.lam, int | float) or not math.isfinite(self.lam):
            raise ConfigError(f"steering: lambda must be a finite number, got {self.lam!r}")
        if abs(self.lam) > MAX_LAMBDA:
            raise ConfigError(f"steering: lambda {self.lam:g} is beyond +-{MAX_LAMBDA:g} standard deviations, where "
                              "the shifted experts' probabilities are exactly 0 or 1 and ties decide the routing; use "
                              "mode hard to force experts in or out (paper b found 0.5 best)")
        if isinstance(self.seed, bool) or not isinstance(self.seed, int):
            raise ConfigError(f"steering: seed must be an integer, got {self.seed!r}")
        if isinstance(self.eps_std, bool) or not isinstance(self.eps_std, int | float) or not 0 <= self.eps_std < 1:
            raise ConfigError(f"steering: eps_std must be a number in [0, 1), got {self.eps_std!r}")
        for layer, (promote, suppress) in self.layers.items():
            both = sorted(set(promote) & set(suppress))
            if both:
                raise ConfigError(f"steering: layer {layer} both promotes and suppresses expert(s) {both}")
            negative = [e for e in (*promote, *suppress) if e < 0]
            if negative:
                raise ConfigError(f"steering: layer {layer} names negative expert id(s) {negative}")

    @classmethod
    def from_dict(cls, spec: dict, where: str = "the steering spec") -> Steering:
        """A spec as in the module docstring; an experts.json (from `moejax experts`) is accepted as well when it
        also has "mode", "lambda" and "direction"."""
        if not isinstance(spec, dict):
            raise ConfigError(f"{where}: a steering spec is a JSON object, got {type(spec).__name__}")
        if "experts" in spec and "layers" not in spec:
            return cls.from_experts(spec, spec.get("mode", "soft"), spec.get("lambda", 0.5),
                                    spec.get("direction", "promote"), spec.get("seed", 0), where)
        unknown = sorted(set(spec) - {"mode", "lambda", "seed", "layers", "eps_std"})
        if unknown:
            raise ConfigError(f"{where}: unknown key(s) {unknown}; a spec has mode, lambda, seed, eps_std and layers")
        layers_spec = spec.get("layers", {})
        if not isinstance(layers_spec, dict):
            raise ConfigError(f"{where}: layers must map MoE-layer indices to {{'promote': [...], 'suppress': [...]}}")
        layers = {}
        for key, entry in layers_spec.items():
            layer = _layer(key, where)
            if not isinstance(entry, dict) or set(entry) - set(DIRECTIONS):
                raise ConfigError(f"{where}: layer {key} must be {{'promote': [ids], 'suppress': [ids]}}, got "
                                  f"{entry!r}")
            layers[layer] = (_ids(entry.get("promote", []), f"layer {key} promote"),
                             _ids(entry.get("suppress", []), f"layer {key} suppress"))
        return cls(mode=spec.get("mode", "soft"), lam=spec.get("lambda", 0.5), seed=spec.get("seed", 0),
                   layers=layers, eps_std=spec.get("eps_std", EPS_STD))

    @classmethod
    def from_experts(cls, experts: dict, mode: str = "soft", lam: float = 0.5, direction: str = "promote",
                     seed: int = 0, where: str = "experts.json") -> Steering:
        """Steer the experts that `moejax experts` selected (its experts.json) in the given direction."""
        if direction not in DIRECTIONS:
            raise ConfigError(f"{where}: direction {direction!r} is not one of {', '.join(DIRECTIONS)}")
        selected = experts.get("experts")
        if not isinstance(selected, dict):
            raise ConfigError(f"{where}: no 'experts' mapping of MoE layers to selected experts")
        layers = {}
        for key, entry in selected.items():
            ids = _ids(entry.get("ids") if isinstance(entry, dict) else entry, f"{where}: layer {key} ids")
            if ids:
                layers[_layer(key, where)] = (ids, ()) if direction == "promote" else ((), ids)
        return cls(mode=mode, lam=lam, seed=seed, layers=layers)

    @classmethod
    def from_json(cls, path: str | Path, **overrides) -> Steering:
        """A spec from a JSON file (keyword arguments, e.g. mode= or lam=, override the file's)."""
        path = Path(path)
        try:
            spec = json.loads(path.read_text(encoding="utf-8"))
        except OSError as exc:
            raise DataError(f"cannot read the steering spec {path}: {exc.strerror or exc}") from None
        except (json.JSONDecodeError, UnicodeDecodeError) as exc:
            raise DataError(f"{path} is not a JSON steering spec: {exc}") from None
        if isinstance(spec, dict):
            spec = {**spec, **{("lambda" if k == "lam" else k): v for k, v in overrides.items() if v is not None}}
        return cls.from_dict(spec, str(path))

    def to_dict(self) -> dict:
        return {"mode": self.mode, "lambda": self.lam, "seed": self.seed, "eps_std": self.eps_std,
                "layers": {str(layer): {"promote": list(p), "suppress": list(s)}
                           for layer, (p, s) in sorted(self.layers.items())}}

    @property
    def changes_nothing(self) -> bool:
        """No expert named, or soft steering with lambda 0: the model runs unsteered (bit for bit)."""
        named = any(p or s for p, s in self.layers.values())
        return not named or (self.mode == "soft" and self.lam == 0)

    def resolved_layers(self, config) -> dict[int, tuple[tuple[int, ...], tuple[int, ...]]]:
        """The layers as MoE-layer indices of `config` (a negative one counted from the last), checked: a
        ConfigError naming the first layer that is not an MoE layer of the model, a layer given twice, an expert id
        >= E, or a layer whose suppressed experts leave fewer than top-k to choose from."""
        moe_layers, experts, k = len(config.moe_layers), config.num_routed_experts, config.num_experts_per_tok
        out = {}
        for given, (promote, suppress) in sorted(self.layers.items()):
            if not -moe_layers <= given < moe_layers:
                raise ConfigError(f"steering: layer {given} is not an MoE layer of this model (MoE layers 0-"
                                  f"{moe_layers - 1}, numbered as in layers.csv; -1 is the last)")
            layer = given % moe_layers
            if layer in out:
                raise ConfigError(f"steering: MoE layer {layer} is given twice (as {layer} and as "
                                  f"{layer - moe_layers})")
            beyond = [e for e in (*promote, *suppress) if e >= experts]
            if beyond:
                raise ConfigError(f"steering: layer {given} names expert id(s) {beyond}, but the model has "
                                  f"{experts} experts (0-{experts - 1})")
            if experts - len(set(suppress)) < k:
                raise ConfigError(f"steering: layer {given} suppresses {len(set(suppress))} of its {experts} experts, "
                                  f"leaving fewer than the {k} each token must choose; suppress at most {experts - k}")
            out[layer] = (promote, suppress)
        return out

    def check(self, config) -> None:
        """The spec fits `config` (resolved_layers' ConfigError otherwise)."""
        self.resolved_layers(config)

    def arrays(self, config) -> dict[str, np.ndarray]:
        """RouterControl's steering fields, each with a leading MoE-layer axis: shift_e, promote_e, suppress_e
        [moe layers, E], noise_key [moe layers, 2] and eps_std [moe layers]."""
        moe_layers, experts = len(config.moe_layers), config.num_routed_experts
        shift = np.zeros((moe_layers, experts), np.float32)
        promote = np.zeros((moe_layers, experts), bool)
        suppress = np.zeros((moe_layers, experts), bool)
        for layer, (up, down) in self.resolved_layers(config).items():
            if self.mode == "soft":
                shift[layer, list(up)] = self.lam
                shift[layer, list(down)] = -self.lam
            else:
                promote[layer, list(up)] = True
                suppress[layer, list(down)] = True
        return {"shift_e": shift, "promote_e": promote, "suppress_e": suppress,
                "noise_key": self.noise_keys(moe_layers), "eps_std": np.full(moe_layers, self.eps_std, np.float32)}

    def noise_keys(self, moe_layers: int) -> np.ndarray:
        """[moe layers, 2] uint32: each MoE layer's key for eps (moejax.layers.moe.steering_noise), from the seed."""
        import jax

        base = jax.random.key(self.seed)
        return np.stack([np.asarray(jax.random.key_data(jax.random.fold_in(base, layer)), np.uint32)
                         for layer in range(moe_layers)])

    def control(self, config) -> RouterControl | None:
        """The steering as RouterControl arrays for every MoE layer of `config` (None when it changes nothing)."""
        self.check(config)
        if self.changes_nothing:
            return None
        return RouterControl(**self.arrays(config))


def as_steering(value) -> Steering | None:
    """A Steering from a Steering, a dict, or a JSON file path (None stays None)."""
    if value is None or isinstance(value, Steering):
        return value
    if isinstance(value, dict):
        return Steering.from_dict(value)
    if isinstance(value, str | Path):
        return Steering.from_json(value)
    raise ConfigError(f"steering must be a Steering, a dict or a JSON file path, got {type(value).__name__}")


def with_steering(control: RouterControl | None, steering: Steering | None, config) -> RouterControl | None:
    """`control` (forcing, or None) with the steering's arrays added."""
    steer = None if steering is None else steering.control(config)
    if steer is None:
        return control
    if control is None:
        return steer
    return control.replace(shift_e=steer.shift_e, promote_e=steer.promote_e, suppress_e=steer.suppress_e,
                           noise_key=steer.noise_key, eps_std=steer.eps_std)
