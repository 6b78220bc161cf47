"""The PyTorch (transformers) fixtures of parity checks and tests: random tiny models, saved and run. Imported only
by the tests, benchmarks and the parity package's reference runner: it imports torch.

transformers' own init leaves norms at 1, biases at 0 and (Nemotron-H) D at 1 and the correction
bias at 0, which would let a wrong norm, a missing bias or an ignored correction pass unnoticed;
`randomize` refills every parameter and persistent buffer from a seeded normal instead.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch
import transformers

from moejax.data.tokenize import byte_level_tokenizer
from moejax.models import tiny_reference_config


def _scale(name: str, shape: torch.Size) -> tuple[float, float]:
    """(mean, std) of a parameter's refill, by its role."""
    if "norm" in name:
        return 1.0, 0.2
    if name.endswith("A_log"):
        return 0.0, 0.5  # A = -exp(A_log) spread around -1
    if name.endswith("dt_bias"):
        return -1.0, 0.5  # softplus(dt + dt_bias) around 0.3: the state both keeps and forgets
    if name.endswith(".D"):
        return 0.0, 1.0
    if name.endswith("e_score_correction_bias"):
        return 0.0, 0.1  # comparable to the spread of sigmoid scores: it changes selections
    if name.endswith("bias"):
        return 0.0, 0.2
    if "embed" in name:
        return 0.0, 1.0
    return 0.0, shape[-1] ** -0.5


def randomize(model: torch.nn.Module, seed: int) -> torch.nn.Module:
    """Every parameter and persistent buffer refilled from a seeded normal, scaled by its role."""
    gen = torch.Generator().manual_seed(seed)
    persistent = model.state_dict().keys()
    tensors = dict(model.named_parameters()) | {n: b for n, b in model.named_buffers() if n in persistent}
    with torch.no_grad():
        for name, p in sorted(tensors.items()):
            mean, std = _scale(name, p.shape)
            p.copy_((mean + std * torch.randn(p.shape, generator=gen, dtype=torch.float32)).to(p.dtype))
    return model


def make_checkpoint(arch: str, tmp: Path, seed: int = 0, *, save_dtype=None, max_shard_size=None,
                    byte_tokenizer: bool = False, **overrides):
    """A random transformers model of `arch` (a model_type in moejax.models.ARCHITECTURES, built from its
    tiny_reference_config) saved with save_pretrained;
    returns (the float32 reference model reloaded from disk, the directory). byte_tokenizer: the vocabulary is the
    byte-level tokenizer's 259 ids and the tokenizer is saved beside the weights (save_byte_tokenizer)."""
    if byte_tokenizer:
        overrides.setdefault("vocab_size", 259)
    config = tiny_reference_config(arch, **overrides)
    torch.manual_seed(seed)
    model = randomize(transformers.AutoModelForCausalLM.from_config(config), seed).eval()
    save = model if save_dtype is None else model.to(save_dtype)
    kwargs = {} if max_shard_size is None else {"max_shard_size": max_shard_size}
    save.save_pretrained(tmp, **kwargs)
    reference = transformers.AutoModelForCausalLM.from_pretrained(tmp, dtype=torch.float32).eval()
    if byte_tokenizer:
        save_byte_tokenizer(tmp)
    return reference, Path(tmp)


def make_qwen3(tmp: Path, seed: int = 0, **kwargs):
    """make_checkpoint for Qwen3-MoE."""
    return make_checkpoint("qwen3_moe", tmp, seed, **kwargs)


def routers(model: torch.nn.Module) -> list[torch.nn.Module]:
    """transformers' router modules in MoE-layer order (Qwen3MoeTopKRouter, NemotronHTopkRouter)."""
    return [m for m in model.modules() if type(m).__name__.lower().endswith("topkrouter")]


def steering_eps(row: dict, position_t: np.ndarray, experts: int) -> torch.Tensor:
    """Hard steering's eps [tokens, E] for tokens at these positions: the same draws as moejax's (paper (b)'s eq. 5
    with moejax's seeding: moejax.layers.moe.steering_noise), as a float32 tensor."""
    from moejax.layers.moe import steering_noise

    return torch.from_numpy(np.array(steering_noise(row["noise_key"], position_t, experts, row["eps_std"])))


def steer_logits(z: torch.Tensor, shift_e=None, promote_e=None, suppress_e=None, eps_te=None,
                 allowed_e=None) -> torch.Tensor:
    """docs/steering.md, steering in PyTorch, on raw logits z [tokens, E]: z + shift * std(z) (population), then
    promoted experts at max(z) + eps and suppressed ones at min(z) - eps (eps [tokens, E]), computed in float32; then
    (training only) the experts not in allowed_e at -1e9."""
    out = z
    if shift_e is not None:
        zf = z.float()
        out = zf + torch.as_tensor(shift_e) * zf.std(dim=-1, keepdim=True, unbiased=False)
        top, bottom = zf.max(dim=-1, keepdim=True).values, zf.min(dim=-1, keepdim=True).values
        out = torch.where(torch.as_tensor(promote_e), top + eps_te, out)
        out = torch.where(torch.as_tensor(suppress_e), bottom - eps_te, out).to(z.dtype)
    if allowed_e is not None:
        out = torch.where(torch.as_tensor(allowed_e), out, torch.tensor(-1e9, dtype=out.dtype))
    return out


def steer_choice(choice: torch.Tensor, promote_e, suppress_e, eps_te: torch.Tensor) -> torch.Tensor:
    """Hard steering of a sigmoid router's selection scores [tokens, E] (bias added, before the group limit):
    promoted experts at max + 1 + eps, suppressed ones at -inf."""
    finite = torch.where(torch.isfinite(choice), choice, torch.tensor(-float("inf")))
    top = finite.max(dim=-1, keepdim=True).values
    out = torch.where(torch.as_tensor(promote_e), top + 1.0 + eps_te, choice)
    return torch.where(torch.as_tensor(suppress_e), torch.tensor(-float("inf")), out)


class steered:
    """A context in which transformers' model routes with steered logits: hooks on each steered router (forward
    pre-hook and hook) make the `F.linear` that computes its raw logits return them steered by `arrays` (shift_e,
    promote_e, suppress_e [moe layers, E], noise_key [moe layers, 2] and eps_std [moe layers], as
    moejax.Steering.arrays gives them; or allowed_e alone, the training-time restriction of expert-selective
    training), so the router's own code (softmax top-k; sigmoid, correction bias and group limit) chooses from the
    steered logits. Hard steering's eps is drawn per token position, read from the model call's position_ids (or
    cache_position, or 0, 1, ... along the row). A sigmoid router with a correction bias is hard-steered on its
    selection scores too (its output recomputed by _steered_choice). The reference implementation of router
    steering, written for moejax's parity tests (the papers patched vLLM instead)."""

    def __init__(self, model: torch.nn.Module, arrays: dict[str, np.ndarray]):
        self.model, self.arrays, self.hooks, self.restore = model, arrays, [], []
        self.position_t = None

    def _positions(self, _module, args, kwargs):
        ids = kwargs.get("input_ids", args[0] if args else None)
        batch, length = ids.shape
        given = kwargs.get("position_ids")
        if given is None and kwargs.get("cache_position") is not None:
            given = kwargs["cache_position"][None].expand(batch, length)
        if given is None:
            given = torch.arange(length)[None].expand(batch, length)
        self.position_t = given.reshape(-1).numpy().astype(np.int32)

    def __enter__(self):
        import importlib

        self.hooks.append(self.model.register_forward_pre_hook(self._positions, with_kwargs=True))
        for layer, router in enumerate(routers(self.model)):
            row = {name: a[layer] for name, a in self.arrays.items()}
            if not any(np.any(row[name]) for name in ("shift_e", "promote_e", "suppress_e") if name in row) \
                    and not ("allowed_e" in row and np.any(~row["allowed_e"])):
                continue
            namespace = importlib.import_module(type(router).__module__)
            functional = namespace.F
            hard = "promote_e" in row and (np.any(row["promote_e"]) or np.any(row["suppress_e"]))

            steered_f = _SteeredFunctional(functional, row, self)
            bias = getattr(router, "e_score_correction_bias", None)
            masked = None
            if bias is not None and "allowed_e" in row:  # moejax's restriction removes them from the choice too
                masked = torch.where(torch.as_tensor(row["allowed_e"]), bias.detach(), torch.tensor(-float("inf")))

            def before(module, _inputs, namespace=namespace, steered_f=steered_f, masked=masked):
                namespace.F = steered_f
                if masked is not None:
                    module._saved_bias = module.e_score_correction_bias.detach().clone()
                    module.e_score_correction_bias.data.copy_(masked)

            def after(module, inputs, output, namespace=namespace, functional=functional, row=row, hard=hard):
                namespace.F = functional
                if hasattr(module, "_saved_bias"):
                    module.e_score_correction_bias.data.copy_(module._saved_bias)
                    del module._saved_bias
                if hard and getattr(module, "e_score_correction_bias", None) is not None:
                    return self._steered_choice(module, row, output)
                return None

            self.restore.append((namespace, functional))
            self.hooks += [router.register_forward_pre_hook(before), router.register_forward_hook(after)]
        return self.model

    def _steered_choice(self, router, row: dict, output):
        """A sigmoid router's choice, hard-steered on its selection scores: transformers' NemotronHTopkRouter
        algorithm (sigmoid, correction bias, group limit, top-k, normalised and scaled weights) written again here
        with steer_choice on the biased scores, promoted experts kept past the group limit."""
        logits, _, _ = output  # the steered logits (F.linear was steered)
        scores = logits.sigmoid()
        eps = steering_eps(row, self.position_t, logits.shape[-1])
        choice = steer_choice(scores + router.e_score_correction_bias, row["promote_e"], row["suppress_e"], eps)
        tokens, experts = choice.shape
        grouped = choice.view(tokens, router.num_group, experts // router.num_group)
        kept_groups = torch.topk(grouped.topk(2, dim=-1)[0].sum(dim=-1), k=router.topk_group, dim=-1)[1]
        keep = torch.zeros(tokens, router.num_group, dtype=torch.bool)
        keep.scatter_(1, kept_groups, True)
        keep = keep[:, :, None].expand(-1, -1, experts // router.num_group).reshape(tokens, experts)
        keep = keep | torch.as_tensor(row["promote_e"])
        ids = torch.topk(choice.masked_fill(~keep, float("-inf")), k=router.top_k, dim=-1)[1]
        weights = scores.gather(1, ids)
        if router.norm_topk_prob:
            weights = weights / (weights.sum(dim=-1, keepdim=True) + 1e-20)
        return logits, weights * router.routed_scaling_factor, ids

    def __exit__(self, *exc):
        for hook in self.hooks:
            hook.remove()
        for namespace, functional in self.restore:  # also after an exception inside a router
            namespace.F = functional


class _SteeredFunctional:
    """torch.nn.functional with `linear` returning steered logits (steered's row of arrays)."""

    def __init__(self, functional, row: dict, context: steered):
        self.functional, self.row, self.context = functional, row, context

    def __getattr__(self, name):
        return getattr(self.functional, name)

    def linear(self, *args, **kwargs):
        z = self.functional.linear(*args, **kwargs)
        steer = {name: self.row[name] for name in ("shift_e", "promote_e", "suppress_e", "allowed_e")
                 if name in self.row}
        if "noise_key" in self.row:
            steer["eps_te"] = steering_eps(self.row, self.context.position_t, z.shape[-1])
        return steer_logits(z, **steer)


def run_reference(model, ids: np.ndarray, mask: np.ndarray | None = None):
    """logits [b, t, V], router logits per MoE layer [b, t, E] (float64 numpy) and the experts the
    reference chose per MoE layer [b, t, k] (sorted: transformers' Nemotron-H top-k is unordered)."""
    chosen = []
    hooks = [r.register_forward_hook(lambda _m, _i, out: chosen.append(out[2])) for r in routers(model)]
    try:
        with torch.no_grad():
            out = model(input_ids=torch.from_numpy(ids).long(),
                        attention_mask=None if mask is None else torch.from_numpy(mask).long(),
                        output_router_logits=True)
    finally:
        for hook in hooks:
            hook.remove()
    b, t = ids.shape
    logits = [r.reshape(b, t, -1).double().numpy() for r in (out.router_logits or ())]
    ids_out = [np.sort(c.reshape(b, t, -1).numpy(), axis=-1) for c in chosen]
    return out.logits.double().numpy(), logits, ids_out


def save_byte_tokenizer(directory: Path, chat_template: bool = True) -> None:
    """A byte-level transformers tokenizer (259 ids: <pad> 0, <s> 1, </s> 2, then byte b as b + 3, as
    moejax.data.tokenize.ByteTokenizer) that prefixes <s>: tiny test checkpoints carry it so the analysis, generation
    and evaluation read a real tokenizer from the model directory."""
    byte_level_tokenizer(chat_template).save_pretrained(directory)
