"""A CPT run: a model, a language mixture and a train config -> a run directory, resumable after any kill.

RUN_DIR/
    run.json              the run's settings; a second start with the same settings resumes, other settings are refused
    config.json, tokenizer files   the model's, so `moejax export RUN_DIR/checkpoint HF_DIR` needs nothing else
    checkpoint/STEP/      Orbax checkpoints (saved asynchronously every `save_every` steps, the last `keep` kept):
                          "state" (step, float32 parameters, AdamW state) and "data" (the sampler's position)
    eval.csv              with --eval-data: held-out cross-entropy per language, before the first step and every
                          `eval_every` steps (the balance terms never enter it)
    metrics.csv           one row per step: loss, aux_loss, z_loss, lr, grad_norm, tokens/s, and the usage entropy
                          (bits) of every MoE layer per language, from the expert counts the jitted step returns
    tensorboard/          the same scalars as TensorBoard event files
    training.png          loss curves and routing entropy per layer and language, redrawn at the end

A checkpoint is complete only once Orbax has finalised it (written to a temporary directory, then renamed),
so a process killed at any moment, even during a save, restarts from the last complete one: the
metrics rows past it are dropped and the same steps are computed again, identically.
"""

from __future__ import annotations

import csv
import dataclasses
import json
import os
import shutil
import struct
import sys
import time
from pathlib import Path

import jax
import numpy as np
import orbax.checkpoint as ocp
from tensorboardX import SummaryWriter
from tqdm.auto import tqdm

from moejax.checkpoint import COPIED, orbax_errors
from moejax.data.corpus import SAMPLE_DIR
from moejax.data.mixture import Mixture, load_documents, parse_mixture
from moejax.data.sft import ConversationRows, load_conversations
from moejax.data.tokenize import ByteTokenizer, HFTokenizer
from moejax.errors import RunError
from moejax.io import new_directory, refuse_unsafe
from moejax.models.builtin import save_builtin_files
from moejax.opening import CHECKPOINTS, RUN_FILE, open_model
from moejax.parallel.mesh import make_mesh
from moejax.report.figures import training_figure
from moejax.routing.metrics import usage_entropy_bits, usage_fractions
from moejax.training.step import (
    TrainConfig,
    TrainState,
    budget_text,
    init_state,
    make_eval_step,
    make_train_step,
)

LOST_WARNING = 0.5  # warn when a row length keeps less than this share of a language's supervised tokens
BASE_COLUMNS = ("step", "loss", "aux_loss", "z_loss", "total_loss", "lr", "grad_norm", "tokens", "tokens_per_s")


@dataclasses.dataclass(frozen=True)
class RunSettings:
    """Everything that determines a run's trajectory, every value resolved (run.json; built by the train command's
    settings, moejax.commands.train). model None: the built-in model; data None: the built-in sample corpus, 60%
    Hebrew and 40% English."""

    model: str | None
    data: str | None
    steps: int
    seq_len: int
    batch_size: int
    seed: int
    save_every: int
    keep: int
    mesh: str | None
    train: TrainConfig
    eval_data: str | None = None  # "LANG=PATH,...": held-out text per language
    eval_every: int = 0  # steps between evaluations (and before the first step); 0: none
    eval_batches: int = 4  # batches per language per evaluation (the same ones every time)
    sft: bool = False  # data are chat records: whole conversations per row, loss on assistant tokens only
    budget: dict | None = None  # trainable parameters (step.trainable_budget), recorded for the reader

    def to_json(self) -> dict:
        return dataclasses.asdict(self)

    @classmethod
    def from_json(cls, d: dict) -> RunSettings:
        return cls(**(d | {"train": TrainConfig(**d["train"])}))


def sample_mixture() -> str:
    return f"he={SAMPLE_DIR / 'he.txt'}:0.6,en={SAMPLE_DIR / 'en.txt'}:0.4"


def _load_model(settings: RunSettings, allow_nonfinite: bool = False):
    """(model, on the mesh if one is set; its tokenizer)."""
    mesh = make_mesh(settings.mesh) if settings.mesh else None
    opened = open_model(settings.model, mesh=mesh, allow_nonfinite=allow_nonfinite)
    return opened.model, ByteTokenizer() if opened.builtin else HFTokenizer(opened.files)


def _check_run_dir(out: Path, settings: RunSettings) -> bool:
    """True when OUT holds this very run (resume); raises when it holds something else."""
    if not out.exists():
        return False
    if not out.is_dir():
        raise RunError(f"{out} is a file, not a run directory; choose another --out")
    marker = out / RUN_FILE
    if not marker.is_file():
        if any(out.iterdir()):
            raise RunError(f"{out} is not empty and holds no {RUN_FILE}: it is not a moejax run; choose another --out")
        return False
    try:
        theirs = json.loads(marker.read_text())
    except ValueError:
        raise RunError(f"{marker} is not valid JSON: {out} is no moejax run this version can resume; choose another "
                       "--out") from None
    ours = json.loads(json.dumps(settings.to_json()))
    if theirs != ours:
        diff = {k: (theirs.get(k), ours.get(k)) for k in ours if theirs.get(k) != ours.get(k)}
        detail = "; ".join(f"{k}: {a!r} there, {b!r} now" for k, (a, b) in diff.items())
        raise RunError(f"{out} holds another run ({detail}); choose a new --out, or delete it to start over")
    return True


def _metric_columns(langs: tuple[str, ...], moe_layers: tuple[int, ...]) -> list[str]:
    return [*BASE_COLUMNS, *(f"entropy_L{layer}_{lang}" for layer in moe_layers for lang in langs)]


def _usage_entropy(counts_lge: np.ndarray, top_k: int) -> np.ndarray:
    """[moe layers, langs]: the usage entropy in bits (docs/metrics.md) of each layer's expert counts
    [moe layers, langs, E] per language; NaN for a language that had no rows in the step."""
    counts_lge = np.asarray(counts_lge)
    return np.where(counts_lge.sum(axis=-1) > 0, usage_entropy_bits(usage_fractions(counts_lge, top_k)), np.nan)


def _keep_rows(path: Path, last_step: int) -> None:
    """Drops metrics.csv rows past `last_step` (computed after the checkpoint a resume starts from), atomically."""
    if not path.is_file():
        return
    with open(path, newline="") as f:
        rows = list(csv.reader(f))
    kept = [rows[0], *(r for r in rows[1:] if int(r[0]) <= last_step)] if rows else []
    tmp = path.with_suffix(".csv.tmp")
    with open(tmp, "w", newline="") as f:
        csv.writer(f).writerows(kept)
    os.replace(tmp, path)


def _checkpoint_manager(directory: Path, settings: RunSettings):
    options = ocp.CheckpointManagerOptions(save_interval_steps=settings.save_every, max_to_keep=settings.keep,
                                           enable_async_checkpointing=True, cleanup_tmp_directories=True)
    return ocp.CheckpointManager(directory.absolute(), options=options, item_names=("state", "data"))


def _abstract_state(state: TrainState):
    return jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=x.sharding), state)


def _restore(manager, step: int, state: TrainState):
    restored = manager.restore(step, args=ocp.args.Composite(state=ocp.args.StandardRestore(_abstract_state(state)),
                                                             data=ocp.args.JsonRestore()))
    return restored.state, restored.data


def _save(manager, step: int, state: TrainState, mixture: Mixture) -> None:
    with orbax_errors(manager.directory):
        manager.save(step, args=ocp.args.Composite(state=ocp.args.StandardSave(state),
                                                   data=ocp.args.JsonSave(mixture.state_dict())))


def prepare(settings: RunSettings, out: Path, allow_nonfinite: bool = False):
    """Checks everything a run needs before anything is written: returns (model, mixture, held-out batches per
    language, resume?)."""
    sources = parse_mixture(settings.data or sample_mixture())
    held_out = parse_mixture(settings.eval_data, with_ratios=False) if settings.eval_data else []
    refuse_unsafe(out, [settings.model, *(s.path for s in sources + held_out)])
    resume = _check_run_dir(out, settings)
    model, tokenizer = _load_model(settings, allow_nonfinite)
    limit = model.config.max_positions
    if limit is not None and settings.seq_len > limit:
        raise RunError(f"--seq-len {settings.seq_len} is above the model's maximum of {limit} positions "
                       "(max_position_embeddings in its config.json)")
    mixture = _stream(settings, sources, tokenizer, model.config.vocab_size)
    return model, mixture, _eval_batches(settings, tokenizer, model.config.vocab_size), resume


def _stream(settings: RunSettings, sources, tokenizer, vocab_size: int):
    """The packed training rows of `sources`: a CPT Mixture of documents, or, with --sft, whole conversations."""
    if settings.sft:
        conversations = {s.lang: load_conversations(s, tokenizer, vocab_size) for s in sources}
        rows = ConversationRows(sources, conversations, seq_len=settings.seq_len, batch_size=settings.batch_size,
                                seed=settings.seed)
        for lang, (kept, total) in rows.supervision.items():
            if kept < LOST_WARNING * total and jax.process_index() == 0:
                print(f"moejax train: warning: --seq-len {settings.seq_len} leaves {kept} of the {total} assistant "
                      f"tokens of {lang!r} ({1 - kept / total:.0%} lost: conversations longer than a row are cut); "
                      "raise --seq-len to train on them", file=sys.stderr)
        return rows
    documents = {s.lang: load_documents(s, tokenizer, vocab_size) for s in sources}
    return Mixture(sources, documents, seq_len=settings.seq_len, batch_size=settings.batch_size, seed=settings.seed)


def _eval_batches(settings: RunSettings, tokenizer, vocab_size: int) -> dict[str, list]:
    """{language: its fixed held-out batches}, packed like the training data."""
    if not settings.eval_data:
        if settings.eval_every:
            raise RunError("--eval-every needs --eval-data LANG=PATH,...")
        return {}
    if settings.eval_every < 1:
        raise RunError("--eval-data needs --eval-every N (steps between evaluations)")
    batches = {}
    for source in parse_mixture(settings.eval_data, with_ratios=False):
        one = dataclasses.replace(source, ratio=1.0)
        stream = _stream(settings, [one], tokenizer, vocab_size)
        batches[one.lang] = [dataclasses.asdict(stream.next_batch()) for _ in range(settings.eval_batches)]
    return batches


def _evaluate(evaluate, params, batches: dict[str, list]) -> dict[str, float]:
    """Mean next-token cross-entropy per language over its held-out batches (token-weighted)."""
    losses = {}
    for lang, items in batches.items():
        sums = [jax.device_get(evaluate(params, b)) for b in items]
        losses[f"eval_loss_{lang}"] = float(sum(float(s) for s, _ in sums) / max(sum(int(n) for _, n in sums), 1))
    return losses


def run_training(settings: RunSettings, out: str | Path, *, show_progress: bool = True,
                 allow_nonfinite: bool = False) -> Path:
    """Runs (or resumes) the CPT run in OUT; returns OUT."""
    out = Path(out)
    model, mixture, eval_batches, resume = prepare(settings, out, allow_nonfinite)
    cfg = settings.train
    graphdef, state, tx = init_state(model, cfg)
    if settings.budget is not None and show_progress and jax.process_index() == 0:
        print(f"moejax train: {budget_text(settings.budget)}", file=sys.stderr)
    step_fn = make_train_step(graphdef, tx, cfg, model.config, num_langs=len(mixture.langs))
    evaluate = make_eval_step(graphdef, cfg, model.config) if eval_batches else None
    columns = _metric_columns(mixture.langs, model.config.moe_layers)
    top_k = model.config.num_experts_per_tok
    del model
    primary = jax.process_index() == 0
    if not resume:
        _start_run_dir(out, settings)
    manager = _checkpoint_manager(out / CHECKPOINTS, settings)
    start = manager.latest_step() or 0
    if start:
        state, data_state = _restore(manager, start, state)
        mixture.load_state_dict(data_state)
    metrics_path, eval_path = out / "metrics.csv", out / "eval.csv"
    if primary:
        _keep_rows(metrics_path, start)
        _keep_rows(eval_path, start)
        _keep_events(out / "tensorboard", start)
    writer = _TensorBoard(out / "tensorboard") if primary else None
    progress = _Progress(start, settings.steps, show_progress and primary)
    try:
        with open(metrics_path, "a", newline="") if primary else open(os.devnull, "w") as f:
            rows = csv.writer(f)
            if primary and f.tell() == 0:
                rows.writerow(columns)
            if evaluate is not None and start == 0:
                _write_eval(eval_path, writer, 0, _evaluate(evaluate, state.params, eval_batches), primary)
            for step in range(start + 1, settings.steps + 1):
                began = time.perf_counter()
                batch = mixture.next_batch()
                state, metrics = step_fn(state, dataclasses.asdict(batch))
                metrics = jax.device_get(metrics)
                if not bool(metrics["finite"]):
                    manager.wait_until_finished()
                    raise RunError(_non_finite_report(step, metrics, start, out))
                row = _row(step, metrics, time.perf_counter() - began)
                entropy_lg = _usage_entropy(metrics["expert_counts"], top_k)
                values = [row[c] for c in BASE_COLUMNS] + [float(x) for x in np.ravel(entropy_lg)]
                rows.writerow(values)
                f.flush()
                if writer is not None:
                    writer.write(step, dict(zip(columns[1:], values[1:], strict=True)))
                if evaluate is not None and (step % settings.eval_every == 0 or step == settings.steps):
                    _write_eval(eval_path, writer, step, _evaluate(evaluate, state.params, eval_batches), primary)
                if step % settings.save_every == 0 or step == settings.steps:
                    _save(manager, step, state, mixture)
                progress.step(step, loss=f"{row['loss']:.4f}", aux=f"{row['aux_loss']:.3f}",
                              tok_s=f"{row['tokens_per_s']:.0f}")
        with orbax_errors(manager.directory):
            manager.wait_until_finished()
    finally:
        progress.close()
        manager.close()
        if writer is not None:
            writer.close()
    if primary:
        training_figure(metrics_path, out / "training.png")
    return out


def _write_eval(path: Path, writer, step: int, losses: dict[str, float], primary: bool) -> None:
    """One eval.csv row (step, eval_loss_LANG...) and its TensorBoard scalars."""
    if not primary:
        return
    new = not path.is_file() or path.stat().st_size == 0
    with open(path, "a", newline="") as f:
        rows = csv.writer(f)
        if new:
            rows.writerow(["step", *losses])
        rows.writerow([step, *losses.values()])
    writer.write(step, {name.replace("eval_loss_", "eval/loss_"): value for name, value in losses.items()})


def _start_run_dir(out: Path, settings: RunSettings) -> None:
    """run.json, the model's config and tokenizer, written before the first step, all at once (new_directory): a
    start that is interrupted leaves OUT as it was, never a directory without run.json that no run can use."""
    if jax.process_index() != 0:
        return
    with new_directory(out, "train") as tmp:
        if settings.model is None:
            save_builtin_files(tmp)
        else:
            for name in COPIED:
                if (Path(settings.model) / name).is_file():
                    shutil.copy2(Path(settings.model) / name, tmp / name)
        (tmp / RUN_FILE).write_text(json.dumps(settings.to_json(), indent=2))


def _row(step: int, metrics: dict, seconds: float) -> dict:
    tokens = int(metrics["tokens"])
    return {"step": step, **{k: float(metrics[k]) for k in ("loss", "aux_loss", "z_loss", "total_loss", "lr",
                                                               "grad_norm")},
            "tokens": tokens, "tokens_per_s": tokens / max(seconds, 1e-9)}


def _non_finite_report(step: int, metrics: dict, last_saved: int, out: Path) -> str:
    values = ", ".join(f"{k}={float(metrics[k]):.6g}" for k in ("loss", "aux_loss", "z_loss", "grad_norm"))
    return (f"step {step}: the loss or the gradient is not finite ({values}); training stopped without applying "
            f"the step or saving it. The last checkpoint in {out / CHECKPOINTS} is step {last_saved} or a later "
            "save of this run. Lower --lr, raise --warmup-steps or check the data, then start a new run.")


class _TensorBoard:
    """Scalars to TensorBoard event files (tensorboardX); a resume first drops the events past its checkpoint
    (_keep_events), so no step appears twice."""

    def __init__(self, directory: Path):
        self._writer = SummaryWriter(str(directory))

    def write(self, step: int, scalars: dict[str, float]) -> None:
        for name, value in scalars.items():
            if np.isfinite(value):
                self._writer.add_scalar(name.replace("entropy_", "routing_entropy/"), value, step)

    def close(self) -> None:
        self._writer.close()


def _keep_events(directory: Path, last_step: int) -> None:
    """Drops from the TensorBoard event files the events of steps past `last_step` (written after the checkpoint a
    resume starts from, and computed again), each file rewritten atomically."""
    from tensorboardX.proto.event_pb2 import Event
    from tensorboardX.record_writer import masked_crc32c

    for path in sorted(directory.glob("events.out.tfevents.*")) if directory.is_dir() else ():
        data, kept, at, dropped = path.read_bytes(), [], 0, False
        while at + 12 <= len(data):
            (length,) = struct.unpack("<Q", data[at:at + 8])
            record = data[at + 12:at + 12 + length]
            at += 12 + length + 4
            if len(record) < length:  # a record cut short by a kill: dropped with what follows
                dropped = True
                break
            event = Event.FromString(record)
            if event.step > last_step:
                dropped = True
                continue
            kept.append(record)
        if dropped:
            rewritten = b"".join(struct.pack("<Q", len(r)) + struct.pack("<I", masked_crc32c(struct.pack("<Q", len(r))))
                              + r + struct.pack("<I", masked_crc32c(r)) for r in kept)
            tmp = path.with_name(path.name + ".tmp")
            tmp.write_bytes(rewritten)
            os.replace(tmp, path)


class _Progress:
    """The progress bar: the first step (which compiles the step, minutes for a large model) is announced, and the
    bar, with its rate and ETA, starts after it."""

    def __init__(self, start: int, total: int, show: bool):
        self.start, self.total, self.show, self.bar = start, total, show, None
        if show and start < total:
            print(f"moejax train: compiling the train step (step {start + 1} of {total}) ...", file=sys.stderr,
                  flush=True)

    def step(self, step: int, **postfix) -> None:
        if self.bar is None:
            self.bar = tqdm(total=self.total, initial=step, desc="train", unit="step", disable=not self.show,
                            dynamic_ncols=True)
        else:
            self.bar.update(1)
        self.bar.set_postfix(**postfix)

    def close(self) -> None:
        if self.bar is not None:
            self.bar.close()
