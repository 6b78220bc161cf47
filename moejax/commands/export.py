"""`moejax export`: a training run's checkpoint, an Orbax directory or a Hugging Face checkpoint -> the Hugging Face
layout transformers (and lm-eval-harness, vLLM) load."""

from __future__ import annotations

import dataclasses
from pathlib import Path

from moejax.commands.options import check_options, option
from moejax.config import CHECKPOINT_DTYPES, checkpoint_dtype
from moejax.errors import SettingsError
from moejax.io import check_output


@dataclasses.dataclass(frozen=True)
class ExportSettings:
    src: Path | None = option(None, "a training run's checkpoint (RUN_DIR/checkpoint for its latest step, "
                              "RUN_DIR/checkpoint/STEP for another), an Orbax directory written by `moejax convert`, "
                              "or a Hugging Face checkpoint directory", kind=Path, positional=True)
    out_dir: Path | None = option(None, "where to write the Hugging Face checkpoint", kind=Path, positional=True)
    dtype: str = option("auto", "dtype of the written tensors; auto: the model's own (the checkpoint's, or for a run "
                        "the dtype of the model it started from, float32 for the built-in model), so frozen tensors "
                        "come back bit for bit", choices=("auto", *CHECKPOINT_DTYPES))
    max_shard_gb: float = option(2.0, "largest safetensors shard, GiB", kind=float, above=0)
    allow_nonfinite: bool = option(False, "export a checkpoint holding NaN or infinite weights instead of refusing "
                                   "it", kind=bool)

    def __post_init__(self):
        check_options(self)
        if self.src is None or self.out_dir is None:
            raise SettingsError("export needs SRC and OUT_DIR")


def export(settings: ExportSettings) -> Path:
    """Writes OUT_DIR: config.json, model-XXXXX-of-YYYYY.safetensors with their index, per-expert tensor names,
    and SRC's tokenizer files; returns OUT_DIR."""
    import jax.numpy as jnp

    from moejax.export import export_pretrained
    from moejax.opening import model_files, open_model

    source = model_files(settings.src)
    check_output(settings.out_dir, "export", [source], flag="OUT_DIR")
    dtype = jnp.dtype(checkpoint_dtype(source) if settings.dtype == "auto" else settings.dtype)
    opened = open_model(settings.src, dtype, allow_nonfinite=settings.allow_nonfinite)
    return export_pretrained(opened.model, settings.out_dir, tokenizer_from=opened.files,
                             max_shard_bytes=int(settings.max_shard_gb * 1024 ** 3))
