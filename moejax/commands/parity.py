"""`moejax parity`: one checkpoint run by moejax and by transformers (PyTorch, CPU) on the same tokens, with a
verdict; the comparison itself is moejax.parity.

Whatever moejax's dtype, the verdict has two parts: the implementation check (each block alone, in float32, on the
reference's own input to it: a wrong moejax fails it even when the run is in 16 bits) and the end-to-end comparison
in moejax's dtype (float32: fixed bounds; 16-bit: calibrated by transformers' own 16-bit error). docs/parity.md.
"""

from __future__ import annotations

import dataclasses
import math
import sys
import time
from pathlib import Path

from moejax.commands.options import MESH_HELP, check_options, option
from moejax.config import CHECKPOINT_DTYPES, checkpoint_dtype
from moejax.errors import DataError, SettingsError
from moejax.io import check_output
from moejax.parity.tolerances import TOLERANCES, Tolerances, tolerances_for

__all__ = ["ParitySettings", "parity", "tolerance_listing", "verdict_text"]


def verdict_text(result) -> str:
    """The verdict for the terminal (moejax.parity.report.verdict_text)."""
    from moejax.parity.report import verdict_text

    return verdict_text(result)


@dataclasses.dataclass(frozen=True)
class ParitySettings:
    """Everything `moejax parity` takes."""

    model: Path | None = option(None, "Hugging Face checkpoint directory (config.json, safetensors, tokenizer) of "
                                "an architecture in docs/models.md", kind=Path, metavar="DIR")
    text: Path | None = option(None, "a UTF-8 text file, tokenised and cut into --seq-len sequences (instead of "
                               "--data)", kind=Path, metavar="FILE")
    langs: tuple[str, ...] = option(("en", "he", "ja"), "with --data (or the built-in sample): comma-separated "
                                    "language codes, each given an equal share of --max-tokens", kind=list)
    data: str | None = option(None, "a parallel corpus as for `moejax analyze` (FLORES-200 directory, TSV, JSONL or "
                              "{lang}.txt files); default, without --text: the built-in sample", metavar="CORPUS")
    dtype: str = option("auto", "moejax's parameter and compute dtype; auto: the checkpoint's (config.json dtype). "
                        "Every verdict includes the float32 implementation check; the end-to-end part is judged by "
                        "fixed bounds in float32, calibrated by transformers' own error in bfloat16/float16 "
                        "(docs/parity.md)", choices=("auto", *CHECKPOINT_DTYPES))
    reference_dtype: str = option("auto", "the 16-bit dtype transformers also runs in for a calibrated verdict "
                                  "(auto: moejax's); the reference always runs in float32 too",
                                  choices=("auto", *CHECKPOINT_DTYPES))
    seq_len: int = option(512, "tokens per sequence at most", kind=int, minimum=1)
    batch_size: int = option(4, "sequences per forward pass", kind=int, minimum=1)
    max_tokens: int = option(4096, "tokens compared in all", kind=int, minimum=1)
    tol: tuple[str, ...] = option((), "override one tolerance (repeatable), e.g. --tol kl_mean=1e-3; names: "
                                  + ", ".join(f.name for f in dataclasses.fields(Tolerances)),
                                  metavar="NAME=VALUE", repeat=True)
    list_tolerances: bool = option(False, "print the default tolerances of each verdict and exit", kind=bool)
    skip_incomplete: bool = option(False, "with --data: drop the corpus rows where a language's cell is empty "
                                   "instead of stopping at the first", kind=bool)
    allow_nonfinite: bool = option(False, "load a checkpoint holding NaN or infinite weights (the comparison then "
                                   "reports NaN and fails) instead of refusing it", kind=bool)
    mesh: str | None = option(None, MESH_HELP + "; the reference stays on the CPU", metavar="AXIS=N,...")
    out: Path | None = option(Path("moejax-parity"), "output directory (replaced only when the run succeeds); None "
                              "from Python: write nothing", kind=Path)
    quiet: bool = option(False, "no progress output", kind=bool)

    def __post_init__(self):
        check_options(self)
        if self.text is not None and self.data is not None:
            raise SettingsError("--text and --data are alternatives: give one")
        if self.model is None and not self.list_tolerances:
            raise SettingsError("--model DIR is required")
        self.tolerances  # noqa: B018 (checks the overrides)

    @property
    def tolerances(self) -> dict[str, float]:
        """The --tol overrides as {name: value}."""
        fields = {f.name for f in dataclasses.fields(Tolerances)}
        overrides = {}
        for item in self.tol:
            key, sep, value = item.partition("=")
            if not sep:
                raise SettingsError(f"--tol {item!r}: expected NAME=VALUE, e.g. kl_mean=1e-3")
            if key not in fields:
                raise SettingsError(f"--tol {item!r}: unknown tolerance {key!r}; known: {sorted(fields)}")
            try:
                overrides[key] = float(value)
            except ValueError:
                raise SettingsError(f"--tol {item!r}: {value!r} is not a number") from None
            if not math.isfinite(overrides[key]) or overrides[key] < 0:
                raise SettingsError(f"--tol {item!r}: a tolerance must be a finite number >= 0")
        return overrides


def tolerance_listing() -> str:
    """The default tolerances of each verdict, one line each (`--list-tolerances`)."""
    return "\n".join(name + " " + " ".join(f"{k}={format(v, 'g')}" for k, v in vars(bounds).items() if v is not None)
                     for name, bounds in TOLERANCES.items())


def parity(settings: ParitySettings):
    """Runs the comparison; writes summary.json, layers.csv, groups.csv, flips.csv and drift_per_layer.png to OUT.

    The text: a UTF-8 file cut into seq_len-token sequences; otherwise a parallel corpus (default the built-in
    sample) in `langs`. dtype: moejax's ("auto": the checkpoint's); bfloat16 or float16 give the calibrated
    end-to-end verdict, where reference_dtype ("auto": moejax's) is the 16-bit dtype the reference also runs in.
    moejax runs with the architecture's `transformers_overrides` (where transformers' PyTorch code computes
    differently from the published model, e.g. Nemotron-H's dt floor). Returns a
    moejax.parity.report.ParityResult.
    """
    import jax
    import jax.numpy as jnp

    from moejax.data.tokenize import HFTokenizer
    from moejax.loading import from_pretrained, load_config
    from moejax.parallel.mesh import describe, make_mesh
    from moejax.parity.compare import compare
    from moejax.parity.reference import ReferenceRun
    from moejax.parity.report import judge, write
    from moejax.parity.tokens import batches, corpus_sequences, text_sequences

    s = settings
    started = time.perf_counter()
    model_dir, out = Path(s.model), s.out
    inputs = [model_dir, s.text, s.data]
    if out is not None:
        check_output(out, "parity", inputs)  # before any work: nothing of the user's is replaced
    mesh = make_mesh(s.mesh) if s.mesh else None
    if jax.process_count() > 1:
        raise SettingsError("moejax parity runs in one process (the PyTorch reference is on one host); run it on one "
                            "worker, with a mesh over that worker's devices")
    cfg = load_config(model_dir)  # an unknown architecture stops here, before anything loads
    dtype = checkpoint_dtype(model_dir) if s.dtype == "auto" else s.dtype
    mode = "float32" if dtype == "float32" else "calibrated"
    if mode == "float32" and s.reference_dtype not in ("auto", "float32"):
        raise SettingsError(f"--reference-dtype {s.reference_dtype} with a float32 moejax run: the float32 verdict "
                            "compares float32 with float32; leave --reference-dtype out, or give --dtype bfloat16 for "
                            "the calibrated 16-bit verdict")
    calibration_dtype = None
    if mode == "calibrated":
        calibration_dtype = dtype if s.reference_dtype == "auto" else s.reference_dtype
        if calibration_dtype == "float32":
            raise SettingsError(f"--reference-dtype float32 with --dtype {dtype}: the 16-bit verdict runs the "
                                "reference in float32 and in a 16-bit dtype (its own rounding is the yardstick); "
                                "leave --reference-dtype out or give bfloat16/float16")
    bounds = tolerances_for(mode, s.tolerances)
    tokenizer = HFTokenizer(model_dir)
    sequences = (text_sequences(s.text, tokenizer, s.seq_len, s.max_tokens) if s.text is not None
                 else corpus_sequences(s.data, list(s.langs), tokenizer, s.seq_len, s.max_tokens, s.skip_incomplete))
    if not sequences:
        raise DataError(f"{s.text or s.data or 'the sample corpus'}: no tokens to compare")
    too_big = [i for seq in sequences for i in seq.ids if not 0 <= i < cfg.vocab_size]
    if too_big:
        raise DataError(f"the tokenizer in {model_dir} gives token id {too_big[0]}, outside the model's vocabulary "
                        f"of {cfg.vocab_size} ({model_dir / 'config.json'}): the tokenizer does not belong to the "
                        "model")
    all_batches = batches(sequences, s.batch_size, tokenizer.pad_id)
    timings: dict = {}
    where = f"mesh {describe(mesh)}" if mesh is not None else "one device"
    if not s.quiet:
        print(f"loading {model_dir} in moejax ({dtype}, JAX backend {jax.default_backend()}, {where})",
              file=sys.stderr, flush=True)
    start = time.perf_counter()
    overrides = dict(cfg.transformers_overrides)
    model = from_pretrained(model_dir, dtype=jnp.dtype(dtype), mesh=mesh, allow_nonfinite=s.allow_nonfinite,
                            **overrides)
    timings["moejax_load_s"] = time.perf_counter() - start
    reference = ReferenceRun(model_dir, cfg, dtype, calibration_dtype, quiet=s.quiet, timings=timings)
    tallies = compare(model, all_batches, reference.batches(all_batches), lambda: reference.rules,
                      batch_size=s.batch_size, calibrated=mode == "calibrated",
                      max_logit_diff=bounds.tie_logit_limit, quiet=s.quiet, timings=timings)
    timings["total_s"] = time.perf_counter() - started
    info = {"model": str(model_dir), "mesh": where, "sequences": len(sequences), "seq_len": s.seq_len,
            "batch_size": s.batch_size, "overrides": overrides,
            "source": str(s.text) if s.text is not None else (s.data or "builtin sample corpus")}
    result = judge(cfg, tallies, bounds, mode=mode, dtype=dtype, calibration_dtype=calibration_dtype, info=info)
    if out is not None:
        write(out, inputs, result)
    return result
