"""`moejax convert`: a Hugging Face checkpoint -> an Orbax (TensorStore) checkpoint for fast, resharded reloads."""

from __future__ import annotations

import dataclasses
from pathlib import Path

from moejax.commands.options import MESH_HELP, check_options, option
from moejax.config import CHECKPOINT_DTYPES, checkpoint_dtype
from moejax.errors import SettingsError
from moejax.io import check_output


@dataclasses.dataclass(frozen=True)
class ConvertSettings:
    hf_dir: Path | None = option(None, "Hugging Face checkpoint directory", kind=Path, positional=True)
    out_dir: Path | None = option(None, "where to write the Orbax checkpoint", kind=Path, positional=True)
    dtype: str = option("auto", "dtype of the stored parameters; auto: the checkpoint's (config.json dtype)",
                        choices=("auto", *CHECKPOINT_DTYPES))
    allow_nonfinite: bool = option(False, "convert a checkpoint holding NaN or infinite weights instead of refusing "
                                   "it", kind=bool)
    mesh: str | None = option(None, "load (and write) sharded over this mesh, for models larger than one device; "
                              + MESH_HELP.split(": ", 1)[1], metavar="AXIS=N,...")

    def __post_init__(self):
        check_options(self)
        if self.hf_dir is None or self.out_dir is None:
            raise SettingsError("convert needs HF_DIR and OUT_DIR")


def convert(settings: ConvertSettings) -> Path:
    """Writes OUT_DIR: params/ (one TensorStore array per parameter), config.json, the tokenizer files and
    moejax.json; returns OUT_DIR."""
    import jax.numpy as jnp

    from moejax.checkpoint import save_params
    from moejax.loading import from_pretrained
    from moejax.parallel.mesh import make_mesh

    check_output(settings.out_dir, "convert", [settings.hf_dir], flag="OUT_DIR")  # before the load
    dtype = checkpoint_dtype(settings.hf_dir) if settings.dtype == "auto" else settings.dtype
    model = from_pretrained(settings.hf_dir, dtype=jnp.dtype(dtype),
                            mesh=make_mesh(settings.mesh) if settings.mesh else None,
                            allow_nonfinite=settings.allow_nonfinite)
    return save_params(model, settings.hf_dir, settings.out_dir)
