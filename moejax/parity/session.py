"""One checkpoint's reference outputs, computed once, against which many moejax models are judged: the detection
floors (benchmarks/parity_floor.py) and the parity tests judge an honest model and faulted copies of it."""

from __future__ import annotations

from pathlib import Path

from moejax.loading import load_config
from moejax.parity.compare import compare
from moejax.parity.reference import ReferenceRun
from moejax.parity.report import ParityResult, judge
from moejax.parity.tokens import Batch
from moejax.parity.tolerances import Tolerances, tolerances_for


class Session:
    """The reference's outputs for `batches` of the checkpoint in `model_dir`, for a verdict in `dtype` (moejax's:
    "float32", or a 16-bit dtype, calibrated by transformers in the same dtype), kept in memory."""

    def __init__(self, model_dir: Path, dtype: str, batches: list[Batch], quiet: bool = True):
        self.model_dir, self.dtype, self.batches = Path(model_dir), dtype, batches
        self.cfg = load_config(model_dir)
        self.mode = "float32" if dtype == "float32" else "calibrated"
        self.calibration_dtype = None if dtype == "float32" else dtype
        run = ReferenceRun(self.model_dir, self.cfg, dtype, self.calibration_dtype, quiet=quiet)
        self.reference = list(run.batches(batches))
        self.rules = run.rules

    def verdict(self, model, bounds: Tolerances | None = None) -> ParityResult:
        """moejax `model` (in this session's dtype) judged against the reference, as `moejax parity` judges it."""
        bounds = bounds or tolerances_for(self.mode)
        tallies = compare(model, self.batches, self.reference, lambda: self.rules,
                          batch_size=len(self.batches[0].ids), calibrated=self.mode == "calibrated",
                          max_logit_diff=bounds.tie_logit_limit)
        return judge(model.config, tallies, bounds, mode=self.mode, dtype=self.dtype,
                     calibration_dtype=self.calibration_dtype, info={"model": str(self.model_dir)})
