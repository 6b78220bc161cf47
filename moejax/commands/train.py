"""`moejax train`: continual pre-training of a model on a language mixture, into a resumable run directory.

TrainSettings owns every default (those of the step come from TrainConfig) and every check; `train(settings)`
resolves what depends on the model and the machine (the learning rate of the built-in model, the balance
coefficient from config.json, the warmup from the step count, the compute dtype from the backend) into the
RunSettings a run directory records, and runs it.
"""

from __future__ import annotations

import dataclasses
import json
import re
import tomllib
from pathlib import Path

from moejax.commands.options import MESH_HELP, check_options, from_mapping, option
from moejax.config import REMAT_NAMES
from moejax.errors import SettingsError
from moejax.models import builtin
from moejax.training.config import TrainConfig

_STEP = TrainConfig()  # the step's defaults


@dataclasses.dataclass(frozen=True)
class TrainSettings:
    """Everything `moejax train` takes; with no argument, the built-in model on the built-in sample corpus."""

    model: str | None = option(None, "Hugging Face or `moejax convert` checkpoint directory (default: the built-in "
                               "small Qwen3-MoE over bytes)", metavar="DIR")
    data: str | None = option(None, "corpora and their share of the sequences, e.g. he=he.txt:0.6,en=en.jsonl:0.4 "
                              "(ratios sum to 1). PATH: .txt (a document per line), .jsonl ({\"text\": ...} per line), "
                              ".npy (token ids, documents ended by the tokenizer's EOS) or .npz (tokens + offsets). "
                              "Default: the built-in sample corpus, he 0.6, en 0.4", metavar="LANG=PATH:RATIO,...")
    eval_data: str | None = option(None, "held-out text per language (same formats as --data, no ratios): its "
                                   "cross-entropy goes to eval.csv before the first step and every --eval-every "
                                   "steps, e.g. to watch English forgetting during Hebrew CPT",
                                   metavar="LANG=PATH,...")
    eval_every: int = option(0, "steps between evaluations (needs --eval-data; 0: none)", kind=int, minimum=0)
    eval_batches: int = option(4, "held-out batches per language per evaluation (the same ones each time)",
                               kind=int, minimum=1)
    out: Path = option(Path("moejax-run"), "run directory (resumed when it holds this same run)", kind=Path)
    steps: int = option(300, "optimizer steps", kind=int, minimum=1)
    seq_len: int = option(256, "tokens per packed sequence", kind=int, minimum=2)
    batch_size: int = option(8, "sequences per step (global, all micro-batches)", kind=int, minimum=1)
    accum_steps: int = option(_STEP.accum_steps, "micro-batches per step (gradient accumulation)", kind=int,
                              minimum=1)
    lr: float | None = option(None, f"peak learning rate; default {_STEP.learning_rate:g} "
                              f"({builtin.LEARNING_RATE:g} for the built-in model)", kind=float, above=0)
    warmup_steps: int | None = option(None, "linear warmup, steps; default 5% of --steps", kind=int, minimum=0)
    min_lr_ratio: float = option(_STEP.min_lr_ratio, "the cosine decays to lr * this", kind=float, minimum=0,
                                 maximum=1)
    weight_decay: float = option(_STEP.weight_decay, "AdamW decay, on weight matrices only", kind=float, minimum=0)
    b1: float = option(_STEP.b1, "AdamW beta1", kind=float, minimum=0, maximum=1)
    b2: float = option(_STEP.b2, "AdamW beta2", kind=float, minimum=0, maximum=1)
    clip_norm: float = option(_STEP.clip_norm, "global gradient-norm clipping", kind=float, above=0)
    lb_coef: float | None = option(None, "load-balancing loss coefficient (0: off); default the model's "
                                   f"router_aux_loss_coef (config.json), else {1e-3:g}", kind=float, minimum=0)
    z_coef: float = option(_STEP.z_coef, "router z-loss coefficient", kind=float, minimum=0)
    bias_update_rate: float = option(_STEP.bias_update_rate, "Nemotron-H aux-loss-free balancing: each step moves "
                                     "every expert's e_score_correction_bias by this, up if under the layer's mean "
                                     "load, down if over (0: off)", kind=float, minimum=0)
    dtype: str | None = option(None, "compute dtype (master weights and AdamW state stay float32); default bfloat16 "
                               "on an accelerator, float32 on a CPU (XLA's CPU compiler has no fast bfloat16 "
                               "matmul)", choices=("float32", "bfloat16"))
    trainable: str | None = option(None, "train only parameters whose path matches, e.g. 'mlp\\.experts\\.' (the "
                                   "rest frozen); default all", metavar="REGEX")
    train_experts: str | None = option(
        None, "train only these experts' slices of the stacked expert tensors (gate, up, down), everything else frozen "
        "bit for bit (plus what --trainable names): a selected_experts.json from `moejax experts --method gap` "
        "(FILE:LANG[:KEY], KEY seft or ssft_k5, the default), an experts.json, or {layer: [ids]}",
        metavar="FILE[:LANG[:KEY]]")
    train_routers: bool = option(False, "with --train-experts: also train the whole router of each selected layer",
                                 kind=bool)
    route_to_trained: bool = option(False, "with --train-experts: during training only, route the selected layers' "
                                    "tokens to the selected experts (the others' logits set to -1e9); evaluation "
                                    "and export use the unrestricted router", kind=bool)
    train_blocks: tuple[int, ...] = option((), "train these decoder blocks whole (their slices of every stacked "
                                           "tensor; e.g. the last two, as the study's full-final-layers baseline), "
                                           "everything else frozen", kind=list, element=int, minimum=0,
                                           metavar="B1,B2")
    sft: bool = option(False, "supervised fine-tuning: --data (and --eval-data) are JSONL records {\"messages\": "
                       "[{\"role\", \"content\"}, ...]} or {\"prompt\", \"response\"}, formatted with the "
                       "model's chat template, packed whole with segment ids, the loss on the assistant tokens only",
                       kind=bool)
    remat: str = option(_STEP.remat, "recompute activations in the backward pass: full keeps only each layer's "
                        "input, dots keeps matmul outputs", choices=REMAT_NAMES)
    mesh: str | None = option(None, MESH_HELP, metavar="AXIS=N,...")
    seed: int = option(0, "data order and mixture draws", kind=int, minimum=0, maximum=2**32 - 1)
    save_every: int = option(100, "checkpoint interval, steps (the last step is always saved)", kind=int, minimum=1)
    keep: int = option(3, "checkpoints kept", kind=int, minimum=1)
    allow_nonfinite: bool = option(False, "start from a checkpoint holding NaN or infinite weights instead of "
                                   "refusing it", kind=bool)
    quiet: bool = option(False, "no progress bar", kind=bool)

    def __post_init__(self):
        check_options(self)
        if self.batch_size % self.accum_steps:
            raise SettingsError(f"--batch-size {self.batch_size} is not divisible by --accum-steps "
                                f"{self.accum_steps}")
        if (self.train_routers or self.route_to_trained) and not self.train_experts:
            raise SettingsError("--train-routers and --route-to-trained need --train-experts FILE")
        if self.train_experts and self.train_blocks:
            raise SettingsError("--train-experts and --train-blocks both say what trains (selected experts, or whole "
                                "blocks): give one of them; training their union is neither")
        if self.trainable is not None:
            try:
                re.compile(self.trainable)
            except re.error as e:
                raise SettingsError(f"--trainable {self.trainable!r} is not a regular expression ({e})") from None
        if bool(self.eval_data) != bool(self.eval_every):
            raise SettingsError("--eval-data LANG=PATH,... and --eval-every N (steps between evaluations) go together")

    @classmethod
    def from_file(cls, path: str | Path, **overrides) -> TrainSettings:
        """Settings from a TOML or JSON file (keys as the fields' names: lr = 3e-4), `overrides` winning."""
        path = Path(path)
        try:
            text = path.read_text(encoding="utf-8")
            values = json.loads(text) if path.suffix == ".json" else tomllib.loads(text)
        except (OSError, UnicodeDecodeError, json.JSONDecodeError, tomllib.TOMLDecodeError) as e:
            raise SettingsError(f"--config {path}: cannot read it ({e})") from None
        return from_mapping(cls, {**values, **overrides}, where=f"--config {path}")

    def run_settings(self):
        """The run these settings make, every value resolved for the model and this machine (run.json)."""
        from flax import nnx

        from moejax.loading import load_config
        from moejax.models import abstract_model
        from moejax.routing.experts import read_selection
        from moejax.training.run import RunSettings
        from moejax.training.step import trainable, trainable_budget

        model = str(Path(self.model).absolute()) if self.model else None
        model_config = load_config(model) if model else builtin.builtin_config()
        lr = self.lr if self.lr is not None else (_STEP.learning_rate if model else builtin.LEARNING_RATE)
        step = TrainConfig(learning_rate=lr, warmup_steps=self.warmup_steps, total_steps=self.steps,
                           min_lr_ratio=self.min_lr_ratio, weight_decay=self.weight_decay, b1=self.b1, b2=self.b2,
                           clip_norm=self.clip_norm, lb_coef=self.lb_coef, z_coef=self.z_coef,
                           bias_update_rate=self.bias_update_rate, compute_dtype=self.dtype, trainable=self.trainable,
                           remat=self.remat, accum_steps=self.accum_steps,
                           train_experts=read_selection(self.train_experts) if self.train_experts else None,
                           train_routers=self.train_routers, route_to_trained=self.route_to_trained,
                           train_blocks=list(self.train_blocks) or None).resolved(model_config)
        graphdef_params = nnx.split(abstract_model(model_config))[1]
        budget = trainable_budget(trainable(step, graphdef_params, model_config), graphdef_params)
        return RunSettings(model=model, data=self.data, steps=self.steps, seq_len=self.seq_len,
                           batch_size=self.batch_size, seed=self.seed, save_every=self.save_every, keep=self.keep,
                           mesh=self.mesh, train=step, eval_data=self.eval_data, eval_every=self.eval_every,
                           eval_batches=self.eval_batches, sft=self.sft, budget=budget)


def train(settings: TrainSettings) -> Path:
    """Runs (or resumes) the run in settings.out; returns it."""
    from moejax.training.run import run_training

    return run_training(settings.run_settings(), settings.out, show_progress=not settings.quiet,
                        allow_nonfinite=settings.allow_nonfinite)
