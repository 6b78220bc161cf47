"""transformers' side of a parity run (PyTorch, CPU, no gradients): the model loaded from the checkpoint, forward
hooks recording what moejax is compared with, and the runs a verdict needs.

torch is imported inside the functions that use it: `import moejax` and every other command run without it.
"""

from __future__ import annotations

import dataclasses
import gc
import re
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import numpy as np
from tqdm import tqdm

from moejax.errors import CheckpointError
from moejax.parity.tally import Outputs
from moejax.parity.ties import RouterRule
from moejax.parity.tokens import Batch


def load_reference(model_dir: Path, dtype: str, quiet: bool = False):
    """transformers' model for the checkpoint, in `dtype`, on the CPU, in eval mode (no remote code), its experts run
    by transformers' reference loop ("eager": its grouped_mm path refuses 16-bit tensors whose rows are not a
    multiple of 16 bytes, e.g. a hidden size of 44, on the CPU)."""
    import torch
    import transformers

    if quiet:
        transformers.utils.logging.set_verbosity_error()
        transformers.utils.logging.disable_progress_bar()
    model = transformers.AutoModelForCausalLM.from_pretrained(model_dir, dtype=getattr(torch, dtype),
                                                              local_files_only=True, trust_remote_code=False,
                                                              experts_implementation="eager")
    return model.eval()


def reference_modules(reference, cfg) -> tuple[list, dict[int, object]]:
    """The reference's decoder layers (one per moejax block) and its routers by block index."""
    layers = reference.model.layers
    if len(layers) != len(cfg.layer_kinds):
        raise CheckpointError(f"the reference has {len(layers)} decoder layers, moejax's config {len(cfg.layer_kinds)}")
    routers = {}
    for name, module in reference.named_modules():
        found = re.search(r"layers\.(\d+)\.", name)
        if found and type(module).__name__.lower().endswith("topkrouter"):
            routers[int(found.group(1))] = module
    if sorted(routers) != list(cfg.moe_layers):
        raise CheckpointError(f"the reference's routers sit in blocks {sorted(routers)}, moejax's MoE layers in "
                              f"{list(cfg.moe_layers)}")
    return list(layers), routers


class Recorder:
    """Forward hooks on a reference model recording, for one batch at a time, its embeddings, each decoder layer's
    output and each router's logits and chosen experts over the batch's content tokens."""

    def __init__(self, reference, cfg):
        self.reference, self.cfg = reference, cfg
        layers, self.routers = reference_modules(reference, cfg)
        self._content = None
        self._hidden, self._logits, self._ids, self._embedded = {}, {}, {}, None
        self._hooks = [reference.get_input_embeddings().register_forward_hook(self._on_embedding)]
        self._hooks += [layer.register_forward_hook(self._on_layer(i)) for i, layer in enumerate(layers)]
        self._hooks += [router.register_forward_hook(self._on_router(j))
                        for j, router in enumerate(self.routers[b] for b in cfg.moe_layers)]

    def rules(self) -> list[RouterRule]:
        """Each MoE layer's selection rule, with the reference's own correction bias (Nemotron-H)."""
        cfg = self.cfg
        if cfg.router_kind != "sigmoid":
            return [RouterRule(cfg.router_kind, cfg.num_experts_per_tok) for _ in cfg.moe_layers]
        return [RouterRule("sigmoid", cfg.num_experts_per_tok, self.routers[b].e_score_correction_bias.double().numpy(),
                           *cfg.router_groups) for b in cfg.moe_layers]

    def _on_embedding(self, _module, _inputs, output):
        self._embedded = output.float().numpy()[self._content]

    def _on_layer(self, index: int):
        def hook(_module, _inputs, output):
            self._hidden[index] = (output[0] if isinstance(output, tuple) else output).float().numpy()[self._content]
        return hook

    def _on_router(self, j: int):
        def hook(_module, _inputs, output):
            logits_ne, _weights, ids_nk = output
            flat = self._content.reshape(-1)
            self._logits[j] = logits_ne.float().numpy()[flat]
            self._ids[j] = ids_nk.numpy()[flat]
        return hook

    def run(self, ids: np.ndarray, mask: np.ndarray) -> Outputs:
        import torch

        self._content = mask.astype(bool)
        self._hidden, self._logits, self._ids = {}, {}, {}
        with torch.no_grad():
            logits = self.reference(input_ids=torch.from_numpy(ids), attention_mask=torch.from_numpy(mask)).logits
        blocks, moe = len(self.cfg.layer_kinds), len(self.cfg.moe_layers)
        return Outputs(logits.float().numpy()[self._content], [self._hidden[i] for i in range(blocks)],
                       [self._logits[j] for j in range(moe)], [self._ids[j] for j in range(moe)], self._embedded)

    def close(self) -> None:
        for hook in self._hooks:
            hook.remove()


@dataclasses.dataclass
class ReferenceBatch:
    """A batch with the reference's outputs: `truth`, transformers in float32 on moejax's weights, and
    `calibration`, transformers in a 16-bit dtype (the yardstick of a 16-bit verdict; None for float32)."""

    batch: Batch
    truth: Outputs
    calibration: Outputs | None = None


class ReferenceRun:
    """The reference's outputs for a parity run, batch by batch.

    float32 (moejax in float32): transformers loaded in float32. 16-bit: transformers loaded in the calibration
    dtype runs every batch first (its outputs are kept: the yardstick), then the same model is converted to float32
    and is the truth. The truth therefore computes in float32 on the checkpoint's weights as moejax holds them
    (rounded to moejax's 16-bit dtype when the checkpoint is wider), so a 16-bit verdict measures the rounding of
    the computation, which is what differs between the sides, and the implementation check compares like with
    like. When the calibration dtype is not moejax's, the truth is loaded again in moejax's dtype.
    `rules` (each MoE layer's RouterRule) is set once the reference is loaded."""

    def __init__(self, model_dir: Path, cfg, dtype: str, calibration_dtype: str | None = None, quiet: bool = False,
                 timings: dict | None = None):
        self.model_dir, self.cfg, self.dtype, self.calibration_dtype = Path(model_dir), cfg, dtype, calibration_dtype
        self.quiet = quiet
        self.timings = timings if timings is not None else {}
        self.timings.setdefault("reference_load_s", 0.0)
        self.timings.setdefault("reference_forward_s", 0.0)
        self.rules: list[RouterRule] | None = None

    def _say(self, message: str) -> None:
        if not self.quiet:
            print(message, file=sys.stderr, flush=True)

    def _load(self, dtype: str, purpose: str) -> Recorder:
        self._say(f"loading {self.model_dir} in transformers {dtype} (PyTorch, CPU){purpose}")
        start = time.perf_counter()
        recorder = Recorder(load_reference(self.model_dir, dtype, quiet=self.quiet), self.cfg)
        self.timings["reference_load_s"] += time.perf_counter() - start
        self.rules = recorder.rules()
        return recorder

    def _run(self, recorder: Recorder, batch: Batch) -> Outputs:
        start = time.perf_counter()
        out = recorder.run(batch.ids, batch.mask)
        self.timings["reference_forward_s"] += time.perf_counter() - start
        return out

    def batches(self, batches: list[Batch]) -> Iterator[ReferenceBatch]:
        """Each batch with the reference's outputs, in order (loading, and for 16-bit the calibration pass, happen
        before the first is given)."""
        recorder, calibrations = None, [None] * len(batches)
        try:
            if self.calibration_dtype is not None:
                recorder = self._load(self.calibration_dtype, ": the 16-bit yardstick")
                tokens = sum(int(b.mask.sum()) for b in batches)
                with tqdm(total=tokens, desc=f"reference {self.calibration_dtype}", unit="tok",
                          disable=self.quiet) as bar:
                    for number, batch in enumerate(batches):
                        calibrations[number] = self._run(recorder, batch)
                        bar.update(int(batch.mask.sum()))
                if self.calibration_dtype != self.dtype:
                    recorder.close()
                    recorder = None
                    gc.collect()
                    recorder = self._load(self.dtype, ": moejax's weights")
                self._say("converting the reference to float32 (moejax's weights, computed in float32): the truth")
                recorder.reference.float()
            else:
                recorder = self._load("float32", "")
            for number, batch in enumerate(batches):
                yield ReferenceBatch(batch, self._run(recorder, batch), calibrations[number])
                calibrations[number] = None
        finally:
            if recorder is not None:
                recorder.close()
