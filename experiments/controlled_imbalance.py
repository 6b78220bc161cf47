"""The controlled-imbalance experiment: does a low-resource language's deep-layer routing collapse grow with its
share of the training data? Paper A argues that the collapse follows token frequency in pre-training, not the
language; it could not vary the frequency. This study does: the same small MoE trained from scratch on the same two
languages, only the mixing ratio changed, and the collapse measured against the ratio.

    python -m experiments.controlled_imbalance                       # he:en on the built-in sample, Qwen3-MoE-like
    python -m experiments.controlled_imbalance --arch nemotron_h --minority ja --ratios 1,8,64 --seeds 0,1,2,3
    python -m experiments.controlled_imbalance --data /data/flores200_dataset --minority he --majority en \\
        --steps 2000 --batch-size 16 --seq-len 1024 --dtype bfloat16 --mesh data=8 --out results/imbalance

For each ratio 1:R (minority:majority; default 1:1, 1:4, 1:16, 1:64) and each seed it trains the model from a seeded
initialisation with `moejax train` on the training lines of both languages, mixed R to 1, at the same step count and
batch for every ratio (the same token budget), then measures paper A's metrics per MoE layer for the minority against
the majority on held-out lines (every fifth line by default, the same lines of both languages when the corpus is
parallel). Controls (default: all the corpus allows), each at the smallest and the largest ratio by default:
  lb0       the load-balancing coefficient at 0 instead of --lb-coef;
  shuffled  the minority is majority-language text relabelled (the majority's lines split in two halves): no
            collapse is expected;
  script    the minority transliterated into the Latin script (moejax.data.transliterate; Hebrew only).
Outputs, in OUT (resumable: each run is a `moejax train` run directory, OUT/CONDITION/ratio_R/seed_S/, holding the
routing statistics it was measured with, heldout_routing.npz; an interrupted study resumes where it stopped and never
retrains a finished run; the tables are written again at the end):
    table.csv                per condition, ratio and MoE layer (and the early/middle/deep groups): every metric with
                             its 95% bootstrap interval over seeds and held-out sequences
    slopes.csv               per condition, metric and layer group: the slope against log2(ratio) with its interval,
                             and each control's difference from the main runs
    collapse_vs_ratio.png    the minority-minus-majority usage entropy and Gini per layer group against the ratio
    summary.md               whether collapse grows with imbalance, by how much, and with what uncertainty
"""

from __future__ import annotations

import argparse
import dataclasses
import hashlib
import json
import math
import os
import re
import sys
import tempfile
import time
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402

from experiments.common import DTYPES, study_main  # noqa: E402
from moejax.commands.options import MESH_HELP, add_options, check_options, from_mapping, option  # noqa: E402
from moejax.data.corpus import read_corpus, read_lines  # noqa: E402
from moejax.data.languages import identity  # noqa: E402
from moejax.data.mixture import jsonl_texts  # noqa: E402
from moejax.data.tokenize import ByteTokenizer  # noqa: E402
from moejax.data.transliterate import TABLES, dominant_script, transliterate  # noqa: E402
from moejax.errors import DataError, SettingsError  # noqa: E402
from moejax.io import resumable_directory, write_csv  # noqa: E402
from moejax.models.builtin import LEARNING_RATE, builtin_config  # noqa: E402
from moejax.report.figures import save_figure  # noqa: E402
from moejax.routing import BOOTSTRAP_DRAWS  # noqa: E402
from moejax.routing import imbalance as I  # noqa: E402
from moejax.training.config import DEFAULT_LB_COEF  # noqa: E402

NAME = "controlled_imbalance"
CONTROLS = ("lb0", "shuffled", "script")
LABEL = re.compile(r"[A-Za-z0-9_-]+")  # a language's label in a `moejax train --data` mixture
# What each condition varies, for the summary.
CONDITIONS = {
    "main": "the minority as given, at --lb-coef",
    "lb0": "the same data with the load-balancing loss off (coefficient 0)",
    "shuffled": "majority-language text relabelled as the minority (its lines split in halves): no collapse expected",
    "script": "the minority transliterated into the Latin script (the same text in the majority's characters)",
}
SLOPE_METRICS = ("entropy_gap", "gini_gap")  # tested against log2(ratio); entropy first: the verdict reads it
MEASURE_BATCH = 8  # rows per forward pass of the held-out measurement
MIN_HELDOUT = 4  # held-out texts per language, at least: two for each half of the shuffled control
# The Nemotron-H-like preset: the built-in Qwen3-MoE model's width, experts and top-K (moejax.models.builtin) in a
# hybrid stack of 6 Mamba-2, 2 attention and 8 MoE blocks, interleaved as in Nemotron-3-Nano.
NEMOTRON_H_SMALL = {
    "model_type": "nemotron_h", "vocab_size": ByteTokenizer.vocab_size, "hidden_size": 64,
    "hybrid_override_pattern": "MEME*EMEMEME*EME", "num_attention_heads": 4, "num_key_value_heads": 2,
    "head_dim": 16, "intermediate_size": 128, "mamba_num_heads": 4, "mamba_head_dim": 32, "ssm_state_size": 16,
    "n_groups": 1, "conv_kernel": 4, "chunk_size": 64, "n_routed_experts": 32, "num_experts_per_tok": 4,
    "moe_intermediate_size": 32, "moe_shared_expert_intermediate_size": 64, "routed_scaling_factor": 1.0,
    "norm_topk_prob": True,
}
ARCHS = {"qwen3": lambda: builtin_config().to_hf(), "nemotron_h": lambda: dict(NEMOTRON_H_SMALL)}


@dataclasses.dataclass(frozen=True)
class ImbalanceSettings:
    """Everything the study takes; with no argument, Hebrew against English on the built-in sample corpus."""

    ratios: tuple[float, ...] = option((1.0, 4.0, 16.0, 64.0), "mixing ratios: minority and majority mixed 1:R, "
                                       "comma-separated (at least two: the slope is fitted across them)", kind=list,
                                       element=float, above=0, metavar="R1,R2,...")
    seeds: tuple[int, ...] = option((0, 1, 2), "training seeds per ratio: each sets the model's initialisation and "
                                    "the data order, the same for every ratio", kind=list, element=int, minimum=0,
                                    metavar="S1,S2,...")
    arch: str = option("qwen3", "the model trained from scratch: qwen3 (the built-in Qwen3-MoE model's shape: 8 MoE "
                       "layers, 32 experts, top-4) or nemotron_h (the same MoE in a hybrid Mamba-2/attention stack)",
                       choices=tuple(ARCHS))
    model_config: Path | None = option(None, "a config.json of any architecture moejax implements to train from "
                                       "scratch instead of --arch's (vocab_size 259: the byte-level tokenizer)",
                                       kind=Path, metavar="FILE")
    data: str | None = option(None, "corpus holding both languages: a folder of {lang}.txt / {lang}.jsonl files or "
                              "FLORES-200 (default: the built-in sample corpus, en/he/ja, parallel)", metavar="PATH")
    minority: str = option("he", "the low-resource language: LANG (read from --data) or LANG=PATH (a .txt file, a "
                           "text per line, or .jsonl)", metavar="LANG[=PATH]")
    majority: str = option("en", "the high-resource language, as --minority", metavar="LANG[=PATH]")
    controls: tuple[str, ...] = option((), f"controls among {', '.join(CONTROLS)}, comma-separated, or none "
                                       "(default: all the corpus allows; script needs Hebrew text)", kind=list)
    control_ratios: tuple[float, ...] = option((), "ratios the controls run at (default: the smallest and the "
                                               "largest of --ratios)", kind=list, element=float, above=0,
                                               metavar="R1,R2,...")
    steps: int = option(100, "optimizer steps per run, the same for every ratio", kind=int, minimum=1)
    batch_size: int = option(8, "sequences per step", kind=int, minimum=1)
    seq_len: int = option(256, "tokens per packed sequence", kind=int, minimum=2)
    lr: float = option(LEARNING_RATE, "peak learning rate (from a random initialisation)", kind=float, above=0)
    lb_coef: float = option(DEFAULT_LB_COEF, "load-balancing loss coefficient of the main runs (moejax train's "
                            "default)", kind=float, minimum=0)
    heldout: float = option(0.2, "share of the lines held out for the measurement: every (1/share)-th line, the same "
                            "line numbers in both languages", kind=float, above=0, maximum=0.5)
    deep_fraction: float = option(1 / 3, "the deep layers are this last share of the MoE layers", kind=float, above=0,
                                  maximum=2 / 3)
    bootstrap: int = option(BOOTSTRAP_DRAWS, "resamples of the hierarchical bootstrap (seeds, then held-out sequences)",
                            kind=int, minimum=20)
    seed: int = option(0, "seed of the bootstrap's resamples (the training seeds are --seeds)", kind=int, minimum=0)
    out: Path = option(Path("controlled-imbalance"), "output directory: new, or this study's own (unfinished runs "
                       "resume)", kind=Path)
    mesh: str | None = option(None, MESH_HELP, metavar="AXIS=N,...")
    dtype: str = option("float32", "compute dtype of every run and parameter dtype of every measurement (auto: the "
                        "trainer's choice, bfloat16 on an accelerator, float32 on a CPU); routing statistics are "
                        "float32 either way", choices=DTYPES)

    def __post_init__(self):
        check_options(self)
        for flag, values in (("--ratios", self.ratios), ("--seeds", self.seeds),
                             ("--control-ratios", self.control_ratios)):
            if len(set(values)) != len(values):
                raise SettingsError(f"{flag} {','.join(f'{v:g}' for v in values)} names a value twice")
        if len(self.ratios) < 2:
            raise SettingsError(f"--ratios needs at least two ratios to fit a slope across, got {self.ratios[0]:g}")
        if len(self.control_ratios) == 1:
            raise SettingsError("--control-ratios needs at least two ratios to fit a slope across")
        unknown = sorted(set(self.controls) - {*CONTROLS, "none"})
        if unknown or ("none" in self.controls and len(self.controls) > 1):
            raise SettingsError(f"--controls {','.join(self.controls)}: expected none, or some of "
                                f"{', '.join(CONTROLS)}")
        if "lb0" in self.controls and self.lb_coef == 0:
            raise SettingsError("--controls lb0 turns the balance loss off, which --lb-coef 0 already does: give a "
                                "coefficient above 0, or leave lb0 out")
        minority, majority = self.side(self.minority, "--minority")[0], self.side(self.majority, "--majority")[0]
        if identity(minority) == identity(majority):
            raise SettingsError(f"--minority {minority} and --majority {majority} are the same language")

    @staticmethod
    def side(spec: str, flag: str = "--minority/--majority") -> tuple[str, Path | None]:
        """(LANG, PATH or None) of a --minority / --majority value."""
        lang, sep, path = spec.partition("=")
        if not LABEL.fullmatch(lang) or (sep and not path):
            raise SettingsError(f"{flag} {spec!r}: expected LANG or LANG=PATH, LANG made of letters, digits, '_' "
                                "or '-'")
        return lang, Path(path) if sep else None

    @property
    def chosen_controls(self) -> tuple[str, ...] | None:
        """The controls asked for; None: every one the corpus allows."""
        return tuple(c for c in self.controls if c != "none") if self.controls else None


@dataclasses.dataclass(frozen=True)
class Side:
    """One language of a condition: its label in the mixture, the stem of its data files, its training and held-out
    texts."""

    label: str
    stem: str
    train: tuple[str, ...]
    heldout: tuple[str, ...]


@dataclasses.dataclass(frozen=True)
class Condition:
    """One arm of the study: what it trains on and measures, at which balance coefficient and ratios; paired: held-out
    text i is the same text on both sides."""

    name: str
    minority: Side
    majority: Side
    lb_coef: float
    ratios: tuple[float, ...]
    paired: bool


def read_languages(s: ImbalanceSettings) -> tuple[list[str], list[str], bool, str]:
    """(minority texts, majority texts, parallel?, where they come from); parallel: text i is the same text in both."""
    (min_lang, min_path), (maj_lang, maj_path) = s.side(s.minority), s.side(s.majority)
    if min_path is None and maj_path is None:
        corpus = read_corpus(s.data, [min_lang, maj_lang])
        return corpus[min_lang], corpus[maj_lang], corpus.parallel, f"{s.data or 'the built-in sample corpus'} " \
            f"({'parallel: ' if corpus.parallel else 'not parallel: '}{corpus.why})"
    texts = []
    for flag, lang, path in (("--minority", min_lang, min_path), ("--majority", maj_lang, maj_path)):
        if path is None:
            texts.append(read_corpus(s.data, [lang], least=1)[lang])
        elif not path.is_file():
            raise DataError(f"{flag} {lang}={path}: no such file")
        else:
            lines = jsonl_texts(path) if path.suffix == ".jsonl" else read_lines(path, f"{flag} {lang}")
            texts.append([t.strip() for t in lines])
    parallel = len(texts[0]) == len(texts[1])  # two files of as many lines: aligned line by line
    if parallel:
        kept = [i for i, pair in enumerate(zip(*texts, strict=True)) if all(pair)]
        texts = [[t[i] for i in kept] for t in texts]
    else:
        texts = [[t for t in side if t] for side in texts]
    why = "the same number of lines: taken as aligned" if parallel else "line counts differ: not parallel"
    return texts[0], texts[1], parallel, f"--minority {s.minority}, --majority {s.majority} ({why})"


def split(texts: list[str], heldout: float) -> tuple[tuple[str, ...], tuple[str, ...]]:
    """(training texts, held-out texts): every (1/heldout)-th text is held out, the rest train."""
    period = max(2, round(1 / heldout))
    return (tuple(t for i, t in enumerate(texts) if i % period != period - 1),
            tuple(t for i, t in enumerate(texts) if i % period == period - 1))


def conditions(s: ImbalanceSettings, minority: list[str], majority: list[str], parallel: bool) -> list[Condition]:
    """The main condition and the controls asked for (or, by default, allowed by the corpus)."""
    (min_lang, _), (maj_lang, _) = s.side(s.minority), s.side(s.majority)
    for lang, texts in ((min_lang, minority), (maj_lang, majority)):
        if len(split(texts, s.heldout)[1]) < MIN_HELDOUT:
            raise DataError(f"language {lang!r} has {len(texts)} texts: too few to hold out {MIN_HELDOUT} (1 in "
                            f"{max(2, round(1 / s.heldout))} is held out); give a larger corpus or a larger --heldout")
    min_side, maj_side = Side(min_lang, min_lang, *split(minority, s.heldout)), Side(maj_lang, maj_lang,
                                                                                      *split(majority, s.heldout))
    control_ratios = s.control_ratios or (min(s.ratios), max(s.ratios))
    out = [Condition("main", min_side, maj_side, s.lb_coef, s.ratios, parallel)]
    asked = s.chosen_controls
    wanted = CONTROLS if asked is None else asked
    script = dominant_script(minority)
    if "script" in wanted and script is None:
        if asked is not None:
            raise SettingsError(f"--controls script: the minority's text ({min_lang}) is not in a script moejax can "
                                f"transliterate ({', '.join(TABLES)}); leave script out")
        wanted = tuple(c for c in wanted if c != "script")
    if "lb0" in wanted and s.lb_coef == 0:
        wanted = tuple(c for c in wanted if c != "lb0")
    if "lb0" in wanted:
        out.append(Condition("lb0", min_side, maj_side, 0.0, control_ratios, parallel))
    if "shuffled" in wanted:
        relabelled = Side(f"{maj_lang}-as-{min_lang}", f"{maj_lang}-as-{min_lang}", maj_side.train[1::2],
                          maj_side.heldout[1::2])
        half = Side(maj_lang, f"{maj_lang}-half", maj_side.train[::2], maj_side.heldout[::2])
        out.append(Condition("shuffled", relabelled, half, s.lb_coef, control_ratios, False))
    if "script" in wanted:
        latin = Side(f"{min_lang}-Latn", f"{min_lang}-Latn", tuple(transliterate(t, script) for t in min_side.train),
                     tuple(transliterate(t, script) for t in min_side.heldout))
        out.append(Condition("script", latin, maj_side, s.lb_coef, control_ratios, parallel))
    return out


def model_config(s: ImbalanceSettings):
    """The moejax config trained from scratch (--model-config, else --arch's preset), checked for the byte-level
    tokenizer and for MoE layers."""
    from moejax.config import read_config_json
    from moejax.models import config_class

    source = str(s.model_config) if s.model_config else f"--arch {s.arch}"
    hf = read_config_json(s.model_config) if s.model_config else ARCHS[s.arch]()
    config = config_class(hf.get("model_type"), source).from_hf(hf, source)
    if config.vocab_size != ByteTokenizer.vocab_size:
        raise SettingsError(f"{source}: vocab_size {config.vocab_size}; the study trains with the byte-level "
                            f"tokenizer: set vocab_size to {ByteTokenizer.vocab_size}")
    if not config.moe_layers:
        raise SettingsError(f"{source}: the model has no MoE layers; there is no routing to measure")
    return config


def _digest(texts) -> str:
    return hashlib.sha256("\n".join(texts).encode("utf-8")).hexdigest()


def write_data(out: Path, conds: list[Condition]) -> dict[str, Path]:
    """Each side's training and held-out texts as OUT/data/STEM.{train,heldout}.jsonl; {stem: training file}."""
    folder = out / "data"
    folder.mkdir(exist_ok=True)
    files = {}
    for side in (side for c in conds for side in (c.minority, c.majority)):
        for part, texts in (("train", side.train), ("heldout", side.heldout)):
            path = folder / f"{side.stem}.{part}.jsonl"
            text = "".join(json.dumps({"text": t}, ensure_ascii=False) + "\n" for t in texts)
            if not path.is_file() or path.read_text(encoding="utf-8") != text:
                tmp = path.with_name(f".{path.name}.tmp")
                tmp.write_text(text, encoding="utf-8")
                os.replace(tmp, path)
        files[side.stem] = folder / f"{side.stem}.train.jsonl"
    return files


def check_record(out: Path, record: dict) -> None:
    """OUT/study.json: what every run of this study shares. A directory started with other values is refused (its
    finished runs would not belong with the new ones); more ratios, seeds or controls just add runs."""
    path = out / "study.json"
    if path.is_file():
        theirs = json.loads(path.read_text())
        ours = json.loads(json.dumps(record))
        changed = [key for key in sorted(set(ours) | set(theirs)) if ours.get(key) != theirs.get(key)]
        if changed:
            raise SettingsError(f"--out {out} holds this study run with other settings ({', '.join(changed)} "
                                "differ); give a new --out, or the same settings to continue it")
        return
    tmp = path.with_name(".study.json.tmp")
    tmp.write_text(json.dumps(record, indent=2))
    os.replace(tmp, path)


def initial_checkpoint(out: Path, config, seed: int) -> Path:
    """OUT/init/seed_S: the model of `config` initialised from `seed`, with the byte-level tokenizer, written once."""
    from flax import nnx

    from moejax.data.tokenize import byte_level_tokenizer
    from moejax.export import export_pretrained
    from moejax.models import model_class

    tokenizer = out / "init" / "tokenizer"
    if not tokenizer.is_dir():
        tokenizer.parent.mkdir(exist_ok=True)
        tmp = Path(tempfile.mkdtemp(prefix=".tokenizer-", dir=tokenizer.parent))
        byte_level_tokenizer().save_pretrained(tmp)
        os.rename(tmp, tokenizer)
    path = out / "init" / f"seed_{seed}"
    if not (path / "config.json").is_file():  # export_pretrained writes the directory whole, or nothing
        export_pretrained(model_class(config)(config, rngs=nnx.Rngs(seed)), path, tokenizer_from=tokenizer)
    return path


def run_dir(out: Path, cond: Condition, ratio: float, seed: int) -> Path:
    return out / cond.name / f"ratio_{ratio:g}" / f"seed_{seed}"


def mixture(cond: Condition, ratio: float, files: dict[str, Path]) -> str:
    """The `moejax train --data` mixture of a condition at 1:ratio."""
    share = 1.0 / (1.0 + ratio)
    return (f"{cond.minority.label}={files[cond.minority.stem]}:{share!r},"
            f"{cond.majority.label}={files[cond.majority.stem]}:{1.0 - share!r}")


def measure(path: Path, cond: Condition, s: ImbalanceSettings) -> I.HeldOut:
    """The trained model's routing over both sides' held-out texts: the top-K of softmax(raw router logits) as paper
    A's hooks count them, content tokens only (the tokenizer's special tokens left out)."""
    from moejax.data.tokenize import HFTokenizer
    from moejax.opening import open_model
    from moejax.parallel.mesh import make_mesh
    from moejax.routing.analysis import collect

    opened = open_model(path, "float32" if s.dtype == "auto" else s.dtype, mesh=make_mesh(s.mesh) if s.mesh else None)
    tokenizer = HFTokenizer(opened.files)
    sides = {name: collect(opened.model, tokenizer, list(side.heldout), exclude_ids=sorted(tokenizer.special_ids),
                           batch_size=MEASURE_BATCH, probabilities="softmax", seed=0, selection="raw")
             for name, side in (("minority", cond.minority), ("majority", cond.majority))}
    return I.HeldOut(**{f"{name}_{field}": getattr(r, attr) for name, r in sides.items()
                        for field, attr in (("counts_qle", "topk_counts"), ("probs_qle", "prob_sums"),
                                            ("tokens_q", "tokens"))},
                     k=opened.model.config.num_experts_per_tok)


def train_and_measure(path: Path, cond: Condition, ratio: float, seed: int, init: Path, files: dict[str, Path],
                      s: ImbalanceSettings) -> dict[str, float]:
    """Trains (or resumes) one run, then measures it into RUN/heldout_routing.npz; returns the seconds each took."""
    from moejax.commands.train import TrainSettings, train

    began = time.perf_counter()
    train(TrainSettings(model=str(init), data=mixture(cond, ratio, files), out=path, steps=s.steps,
                        seq_len=s.seq_len, batch_size=s.batch_size, lr=s.lr, lb_coef=cond.lb_coef,
                        dtype=None if s.dtype == "auto" else s.dtype, mesh=s.mesh, seed=seed, save_every=s.steps,
                        keep=1, quiet=True))
    trained = time.perf_counter()
    held_out = measure(path, cond, s)
    seconds = {"train_seconds": trained - began, "measure_seconds": time.perf_counter() - trained}
    (path / "timing.json").write_text(json.dumps(seconds))
    held_out.save(path / "heldout_routing.npz")  # last: its presence marks the run finished
    return seconds


def run(s: ImbalanceSettings) -> Path:
    """Trains and measures every run not yet done, then writes the tables, the figure and the summary."""
    config = model_config(s)
    minority, majority, parallel, where = read_languages(s)
    conds = conditions(s, minority, majority, parallel)
    inputs = [p for p in (s.data, s.model_config, s.side(s.minority)[1], s.side(s.majority)[1]) if p]
    out = resumable_directory(s.out, NAME, inputs)
    check_record(out, {"model": config.to_hf(), "steps": s.steps, "batch_size": s.batch_size, "seq_len": s.seq_len,
                       "lr": s.lr, "lb_coef": s.lb_coef, "dtype": s.dtype, "mesh": s.mesh,
                       "heldout": s.heldout, "data": {side.stem: [_digest(side.train), _digest(side.heldout)]
                                                      for side in (conds[0].minority, conds[0].majority)}})
    files = write_data(out, conds)
    runs = [(c, ratio, seed) for c in conds for ratio in c.ratios for seed in s.seeds]
    began, trained = time.perf_counter(), []
    for i, (cond, ratio, seed) in enumerate(runs, 1):
        path = run_dir(out, cond, ratio, seed)
        what = f"{NAME}: run {i}/{len(runs)} {cond.name} 1:{ratio:g} seed {seed}"
        if (path / "heldout_routing.npz").is_file():
            print(f"{what}: done earlier, kept", file=sys.stderr, flush=True)
            continue
        print(f"{what}: training {s.steps} steps ...", file=sys.stderr, flush=True)
        seconds = train_and_measure(path, cond, ratio, seed, initial_checkpoint(out, config, seed), files, s)
        trained.append(seconds)
        print(f"{what}: trained in {seconds['train_seconds']:.0f} s, measured in {seconds['measure_seconds']:.0f} s; "
              f"elapsed {(time.perf_counter() - began) / 60:.1f} min", file=sys.stderr, flush=True)
    held = {(c.name, ratio, seed): I.HeldOut.load(run_dir(out, c, ratio, seed) / "heldout_routing.npz")
            for c, ratio, seed in runs}
    results = analyse(conds, s, held)
    write_tables(out, results)
    figure(out, conds, results)
    timing = [json.loads((run_dir(out, c, r, seed) / "timing.json").read_text()) for c, r, seed in runs]
    write_summary(out, s, config, conds, results, where, parallel, timing,
                  {"runs": len(trained), "minutes": (time.perf_counter() - began) / 60})
    return out


def analyse(conds: list[Condition], s: ImbalanceSettings, held: dict) -> dict:
    """Every metric per condition, ratio and column (each MoE layer, then each layer group) as bootstrap rows
    [b, column], averaged over the seeds drawn; and the slopes [b] against log2(ratio) per condition, metric and
    group. The bootstrap is hierarchical: each row resamples the training seeds (the same draw for every condition
    and ratio, since seed S is one initialisation), then, for each seed drawn, that run's held-out sequences."""
    first = next(iter(held.values()))
    layers = first.minority_counts_qle.shape[1]
    groups = I.layer_groups(layers, s.deep_fraction)
    rng = np.random.default_rng([s.seed, 31])
    seeds_bj = I.seed_draws(len(s.seeds), s.bootstrap, rng)
    per_run = {}  # (condition, ratio) -> metric -> [b, j, column]
    for c in conds:
        for ratio in c.ratios:
            metrics = I.hierarchical_metrics([held[(c.name, ratio, seed)] for seed in s.seeds], seeds_bj, rng,
                                             c.paired)
            per_run[(c.name, ratio)] = {
                name: np.concatenate([v, *(v[..., idx].mean(axis=-1, keepdims=True) for idx in groups.values())],
                                     axis=-1) for name, v in metrics.items()}
    values = {key: {name: v.mean(axis=1) for name, v in metrics.items()} for key, metrics in per_run.items()}

    def y_rjb(cond: str, name: str, column: int, ratios) -> np.ndarray:
        return np.stack([per_run[(cond, r)][name][:, :, column].T for r in ratios])

    slopes = {}
    for c in conds:
        x_r = np.log2(c.ratios)
        for name in SLOPE_METRICS:
            for g, group in enumerate(groups):
                column = layers + g
                slopes[(c.name, name, group)] = I.slopes(x_r, y_rjb(c.name, name, column, c.ratios))
                if c.name != "main" and all(("main", r) in per_run for r in c.ratios):
                    # The main runs at the control's ratios, minus the control.
                    slopes[(f"main-{c.name}", name, group)] = (I.slopes(x_r, y_rjb("main", name, column, c.ratios))
                                                               - slopes[(c.name, name, group)])
    return {"values": values, "slopes": slopes, "columns": [*range(layers), *groups], "groups": groups,
            "layers": layers, "k": first.k, "experts": first.minority_counts_qle.shape[2]}


def _interval(values_b: np.ndarray) -> tuple[float, float, float]:
    low, high = I.percentile_interval(values_b)
    return float(values_b[0]), float(low), float(high)


def write_tables(out: Path, results: dict) -> None:
    rows = []
    for (cond, ratio), metrics in results["values"].items():
        for column, label in enumerate(results["columns"]):
            row = {"condition": cond, "ratio": f"1:{ratio:g}", "layer": label}
            for name, values_bc in metrics.items():
                row[name], row[f"{name}_low"], row[f"{name}_high"] = _interval(values_bc[:, column])
            rows.append(row)
    _replace(out / "table.csv", lambda tmp: write_csv(tmp, rows))
    slope_rows = []
    for (cond, name, group), values_b in results["slopes"].items():
        estimate, low, high = _interval(values_b)
        slope_rows.append({"condition": cond, "metric": name, "layers": group, "slope_per_doubling": estimate,
                           "low": low, "high": high})
    _replace(out / "slopes.csv", lambda tmp: write_csv(tmp, slope_rows))


def _replace(path: Path, write) -> None:
    tmp = path.with_name(f".{path.name}.tmp")
    write(tmp)
    os.replace(tmp, path)


def figure(out: Path, conds: list[Condition], results: dict) -> None:
    layers = results["layers"]
    fig, axes = plt.subplots(len(conds), 2, figsize=(10, 3.2 * len(conds)), squeeze=False)
    for row, c in enumerate(conds):
        for col, (name, label) in enumerate((("entropy_gap", "usage entropy, minority - majority (bits)"),
                                             ("gini_gap", "Gini, minority - majority"))):
            ax = axes[row, col]
            for g, group in enumerate(results["groups"]):
                est, low, high = np.array([_interval(results["values"][(c.name, r)][name][:, layers + g])
                                           for r in c.ratios]).T
                shifted = np.array(c.ratios) * 2 ** (0.06 * (g - 1))  # the groups' bars side by side
                ax.errorbar(shifted, est, yerr=[est - low, high - est], marker="o", ms=4, capsize=3, label=group)
            ax.set_xscale("log", base=2)
            ax.set_xticks(c.ratios, [f"1:{r:g}" for r in c.ratios])
            ax.axhline(0, color="grey", lw=0.8)
            ax.set_title(f"{c.name}: {c.minority.label} vs {c.majority.label}", fontsize=9)
            ax.set_xlabel("minority : majority")
            ax.set_ylabel(label, fontsize=8)
            ax.grid(alpha=0.3)
            ax.legend(fontsize=8, title="MoE layers", title_fontsize=8)
    tmp_name = ".collapse_vs_ratio.tmp.png"
    save_figure(fig, out, tmp_name)
    os.replace(out / tmp_name, out / "collapse_vs_ratio.png")


def _cell(values_b: np.ndarray, digits: int = 3) -> str:
    estimate, low, high = _interval(values_b)
    return f"{estimate:+.{digits}f} [{low:+.{digits}f}, {high:+.{digits}f}]"


def verdict(values_b: np.ndarray, growing_sign: int, what: str) -> str:
    """Whether the slope of a gap says the collapse grows with imbalance (`growing_sign`: the slope's sign when it
    does), read from its interval alone."""
    _, low, high = _interval(values_b)
    if low > 0 or high < 0:
        grows = (low > 0) == (growing_sign > 0)
        return f"{what} {'grows' if grows else 'shrinks'} with imbalance (the 95% interval excludes 0)"
    return f"no change of {what} with the ratio is detected (the 95% interval includes 0)"


def _span(layers: np.ndarray) -> str:
    return f"{layers[0]}" if len(layers) == 1 else f"{layers[0]}-{layers[-1]}"


def _sentence(text: str) -> str:
    return text[:1].upper() + text[1:]


def _difference(values_b: np.ndarray) -> str:
    _, low, high = _interval(values_b)
    return "the slopes differ (the interval excludes 0)" if low > 0 or high < 0 else "no difference detected"


def write_summary(out: Path, s: ImbalanceSettings, config, conds: list[Condition], results: dict, where: str,
                  parallel: bool, timing: list[dict], this_call: dict) -> None:
    groups, layers, slopes = results["groups"], results["layers"], results["slopes"]
    deep = groups["deep"]
    tokens = s.steps * s.batch_size * s.seq_len
    main = conds[0]
    span = math.log2(max(main.ratios) / min(main.ratios))
    entropy, gini = slopes[("main", "entropy_gap", "deep")], slopes[("main", "gini_gap", "deep")]
    lines = [f"# Controlled imbalance: {main.minority.label} against {main.majority.label}", "",
             f"**{_sentence(verdict(entropy, -1, 'the deep-layer collapse'))}.** Per doubling of the ratio, the "
             f"deep-layer usage entropy of {main.minority.label} minus that of {main.majority.label} changes by "
             f"{_cell(entropy)} bits ({_cell(entropy * span)} bits from 1:{min(main.ratios):g} to "
             f"1:{max(main.ratios):g}), and the Gini gap by {_cell(gini)}: {verdict(gini, +1, 'the Gini gap')}. "
             f"Deep layers: MoE layers {_span(deep)} of 0-{layers - 1} (the last {s.deep_fraction:.0%}, "
             f"--deep-fraction). 95% bootstrap intervals over the {len(s.seeds)} training seeds and the held-out "
             "sequences.", "",
             "## Deep layers per ratio", "",
             "| condition | ratio | entropy gap (bits) | Gini gap | JSD (nats) | top-K overlap | shared experts "
             "(LSI) |", "|---|---|---|---|---|---|---|"]
    column = layers + list(groups).index("deep")
    for c in conds:
        for r in c.ratios:
            v = results["values"][(c.name, r)]
            lines.append(f"| {c.name} | 1:{r:g} | " + " | ".join(
                _cell(v[name][:, column]) for name in ("entropy_gap", "gini_gap", "jsd", "topk_overlap",
                                                         "lsi_shared")) + " |")
    lines += ["", "## Slopes against log2(ratio), deep layers", "",
              "| condition | what it varies | entropy gap per doubling | Gini gap per doubling | reading |",
              "|---|---|---|---|---|"]
    for c in conds:
        e, g = slopes[(c.name, "entropy_gap", "deep")], slopes[(c.name, "gini_gap", "deep")]
        lines.append(f"| {c.name} (1:{', 1:'.join(f'{r:g}' for r in c.ratios)}) | {CONDITIONS[c.name]} | {_cell(e)} "
                     f"| {_cell(g)} | {verdict(e, -1, 'collapse')} |")
    for c in conds[1:]:
        key = (f"main-{c.name}", "entropy_gap", "deep")
        if key in slopes:
            lines.append(f"| main - {c.name} | the difference of the slopes at the same ratios | {_cell(slopes[key])} "
                         f"| {_cell(slopes[(key[0], 'gini_gap', 'deep')])} | "
                         f"{_difference(slopes[key])} |")
    seconds = np.array([t["train_seconds"] + t["measure_seconds"] for t in timing])
    source = f"--model-config {s.model_config}" if s.model_config else f"--arch {s.arch}"
    total_runs = sum(len(c.ratios) for c in conds) * len(s.seeds)
    lines += ["", "## Protocol", "",
              f"- Model: {config.model_type} trained from scratch ({source}), "
              f"{layers} MoE layers of {results['experts']} experts, top-{results['k']}, byte-level tokenizer; each "
              f"seed S is one initialisation (OUT/init/seed_S) shared by every ratio and condition.",
              f"- Data: {where}. Every {max(2, round(1 / s.heldout))}th line is held out "
              f"({len(main.minority.heldout)} {main.minority.label}, {len(main.majority.heldout)} "
              f"{main.majority.label}); the rest train. "
              + ("The held-out lines are parallel: the two languages are compared on the same text, and resampled "
                 "together." if parallel else "The corpus is not parallel: each language's held-out lines are "
                 "resampled on their own, and every metric compares the languages' pooled routing."),
              f"- Budget: {s.steps} steps x {s.batch_size} x {s.seq_len} tokens = {tokens:,} tokens per run at every "
              f"ratio (the minority's expected share 1/(1+R)); learning rate {s.lr:g}; load-balancing coefficient "
              f"{s.lb_coef:g} (lb0: 0); compute dtype {s.dtype}" + (f"; mesh {s.mesh}" if s.mesh else "") + ".",
              "- Metrics (docs/metrics.md): usage entropy and Gini of each language's top-K counts (the top-K of "
              "softmax(raw router logits), paper A's view; content tokens only), their minority-minus-majority gaps, "
              f"LSI shares at theta {I.LSI_THETA:g}, JSD of the two usage distributions, top-K overlap. table.csv has "
              "every MoE layer and the early / middle / deep groups ("
              + ", ".join(f"{g} {_span(idx)}" for g, idx in groups.items()) + ").",
              f"- Intervals: percentile bootstrap, {s.bootstrap} resamples (seed {s.seed}), hierarchical: each "
              "resamples the training seeds (the same draw at every ratio), then each drawn run's held-out sequences "
              "anew, which counts the choice of held-out text as noise between runs too (conservative for "
              "differences between ratios); a metric is averaged over the seeds drawn. Slopes: least squares of the "
              "per-run deep-layer gap on log2(ratio) over every (ratio, seed) run, in the same resamples. \"Grows\" "
              "is said only when the slope's interval excludes 0.",
              f"- Time: {total_runs} runs, {np.mean(seconds):.0f} s each on average (train and measure; the first run "
              f"of a process also compiles); this call trained {this_call['runs']} in {this_call['minutes']:.1f} min. "
              f"The cost on an accelerator (your slice as --topology): `moejax plan --model "
              f"{out / 'init' / f'seed_{s.seeds[0]}'} --train --topology v5p-8 --batch {s.batch_size} --seq "
              f"{s.seq_len} --tokens {tokens * total_runs}`.", ""]
    _replace(out / "summary.md", lambda tmp: tmp.write_text("\n".join(lines), encoding="utf-8"))


def parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog=f"python -m experiments.{NAME}", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    add_options(p, ImbalanceSettings)
    return p


def main(argv: list[str] | None = None) -> None:
    from moejax.process import compilation_cache_dir, with_huge_pages

    if argv is None:
        with_huge_pages()  # as `moejax train`: faster steps on a CPU
    import jax

    cache = compilation_cache_dir()
    if cache and jax.config.jax_compilation_cache_dir is None:
        jax.config.update("jax_compilation_cache_dir", cache)  # every run after the first reuses its programs

    def run_args(args) -> None:
        out = run(from_mapping(ImbalanceSettings, vars(args)))
        print(f"wrote {out}/summary.md, table.csv, slopes.csv and collapse_vs_ratio.png")

    study_main(NAME, run_args, parser(), argv)


if __name__ == "__main__":
    main()
