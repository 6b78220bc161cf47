"""What a command's --model names, opened one way for every command: a Hugging Face or `moejax convert` checkpoint
directory, a training run (its directory, its checkpoint directory or one of its steps: the latest or that step's
weights), or nothing (the built-in demonstration model)."""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path

import jax
import jax.numpy as jnp
import orbax.checkpoint as ocp
from flax import nnx

from moejax.config import read_config_json
from moejax.errors import ConfigError, RunError
from moejax.loading import from_pretrained, load_config
from moejax.models import abstract_model, model_class
from moejax.models.builtin import builtin_model
from moejax.parallel.mesh import shard_model
from moejax.training.config import TrainConfig
from moejax.training.step import init_state

RUN_FILE = "run.json"  # what marks a training run's directory (moejax.training.run writes it)
CHECKPOINTS = "checkpoint"  # the run's Orbax checkpoints, one folder per saved step


@dataclasses.dataclass(frozen=True)
class Opened:
    """An opened model and where its config.json and tokenizer files are (None: the built-in model, whose tokenizer
    is moejax.data.tokenize's byte-level one)."""

    model: object
    files: Path | None

    @property
    def builtin(self) -> bool:
        return self.files is None


DTYPES = {"float32": jnp.float32, "bfloat16": jnp.bfloat16, "float16": jnp.float16}


def parameter_dtype(name, declared: dict | None = None):
    """A parameter dtype from its name (or a dtype), "auto" meaning the one the checkpoint's config declares
    (`declared`, its config.json; float32 if none)."""
    if not isinstance(name, str):
        return jnp.dtype(name)
    if name == "auto":
        name = (declared or {}).get("dtype") or (declared or {}).get("torch_dtype") or "float32"
    if name not in DTYPES:
        raise ConfigError(f"dtype={name!r} is not one of {sorted(DTYPES)} or 'auto'")
    return DTYPES[name]


def open_model(spec: str | Path | None, dtype=jnp.float32, mesh=None, allow_nonfinite: bool = False,
               **config_overrides) -> Opened:
    """The model `spec` names (module docstring) in `dtype` (a dtype, or its name; "auto": the checkpoint's),
    placed on `mesh` if given; config_overrides replace fields of its config (e.g. Nemotron-H's dt_floor). The
    built-in model is float32 whatever `dtype`."""
    if isinstance(dtype, str):
        files = model_files(spec)
        dtype = parameter_dtype(dtype, read_config_json(files / "config.json") if dtype == "auto" and files else None)
    if spec is None:
        model = builtin_model()
        return Opened(model if mesh is None else shard_model(model, mesh), None)
    if run_directory(spec) is not None:
        model, run_dir = restore_model(spec, dtype, **config_overrides)
        return Opened(model if mesh is None else shard_model(model, mesh), run_dir)
    model = from_pretrained(spec, dtype=dtype, mesh=mesh, allow_nonfinite=allow_nonfinite, **config_overrides)
    return Opened(model, Path(spec))


def model_files(spec: str | Path | None) -> Path | None:
    """Where the config.json and tokenizer files of what `spec` names are: a checkpoint's own directory, a training
    run's directory (for the run, its checkpoint directory or one of its steps), None for the built-in model."""
    return None if spec is None else run_directory(spec) or Path(spec)


def _locate(path: Path) -> tuple[Path, int | None] | None:
    """(run directory, step or None for the latest) when PATH is a run, its checkpoint directory or one of its
    steps; None otherwise."""
    if (path / RUN_FILE).is_file():
        return path, None
    if path.name == CHECKPOINTS and (path.parent / RUN_FILE).is_file():
        return path.parent, None
    if path.name.isdigit() and path.parent.name == CHECKPOINTS and (path.parent.parent / RUN_FILE).is_file():
        return path.parent.parent, int(path.name)
    return None


def is_run_checkpoint(path: str | Path) -> bool:
    return _locate(Path(path)) is not None


def run_directory(path: str | Path) -> Path | None:
    """The run directory of a run, its checkpoint directory or one of its steps; None for anything else."""
    located = _locate(Path(path))
    return None if located is None else located[0]


def restore_model(path: str | Path, dtype=jnp.float32, **config_overrides):
    """The model of a run's checkpoint (PATH: RUN_DIR, RUN_DIR/checkpoint for the latest step, or
    RUN_DIR/checkpoint/STEP), its float32 master weights cast to `dtype` (config_overrides replace fields of its
    config); and the run directory, which holds the model's config and tokenizer files."""
    located = _locate(Path(path))
    if located is None:
        raise RunError(f"{path}: not a moejax run, its checkpoint directory or one of its steps")
    run_dir, step = located
    train = TrainConfig(**json.loads((run_dir / RUN_FILE).read_text())["train"])
    config = load_config(run_dir)
    device = jax.sharding.SingleDeviceSharding(jax.local_devices()[0])
    abstract = jax.eval_shape(lambda: init_state(model_class(config)(config, dtype=jnp.float32, rngs=nnx.Rngs(0)),
                                                 train)[1])
    abstract = jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=device), abstract)
    manager = ocp.CheckpointManager((run_dir / CHECKPOINTS).absolute(), item_names=("state", "data"),
                                    options=ocp.CheckpointManagerOptions(read_only=True))
    try:
        step = manager.latest_step() if step is None else step
        if step is None or step not in manager.all_steps():
            raise RunError(f"{run_dir / CHECKPOINTS}: no complete checkpoint"
                           + ("" if step is None else f" for step {step} (complete: {list(manager.all_steps())})"))
        state = manager.restore(step, args=ocp.args.Composite(state=ocp.args.StandardRestore(abstract))).state
    finally:
        manager.close()
    model = abstract_model(dataclasses.replace(config, **config_overrides), dtype)
    target = nnx.state(model)
    nnx.update(model, jax.tree.map(lambda new, old: new.astype(old.dtype), state.params, target))
    return model, run_dir
