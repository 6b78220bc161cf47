"""Paper C's expert-selective adaptation, run as the paper ran it: experts are selected among high-resource languages,
a low-resource target gets its parent language's experts, routers train with them, every variant sweeps the paper's
learning rates and keeps the one with the lowest held-out perplexity, and the kept runs are scored on MultiBLiMP and
Belebele through lm-eval with moejax as the model (docs/studies.md, "Paper C: expert-selective adaptation").

    python -m experiments.expert_selective --model /ckpt/OLMoE-M7 --lang sk --select-data /data/held_out \\
        --data sk=/data/sk_train.jsonl:1 --eval-data sk=/data/sk_valid.jsonl --data-dir /data/benchmarks \\
        --steps 2000 --batch-size 16 --seq-len 2048 --dtype bfloat16 --out results/sk

Steps: (1) `moejax experts --method gap` over the --pool languages of --select-data in the last --last-layers MoE
layers (OUT/selection); the target takes its --parent's experts: SEFT (the parent's gap-selected experts), SSFT-k
(those plus the --shared experts most used over the pool), SEFT-Top20 (the --top-n experts the parent routes to
most: the expert-count control), every expert, all in OUT/target_experts.json; (2) per variant (those, and the
complete last layers) and per --lrs learning rate, `moejax train` from the same start on the same data
(OUT/VARIANT/lr_LR); (3) per variant the learning rate with the lowest perplexity on the target's --eval-data
(OUT/sweep.csv); (4) the kept run of each variant through `moejax eval` (OUT/VARIANT/eval_*), MultiBLiMP
zero-shot and Belebele four-shot from --data-dir; (5) OUT/selective.csv, OUT/summary.md (with the protocol: each
choice, and whether it is the paper's, yours, the demo's or a moejax option) and OUT/selective.png. OUT is written
whole when the study completes (moejax.io.output_directory). Extra `moejax train` flags go after `--`.

Without arguments it runs the built-in model on the bundled sample corpus (target he, pool en,ja, parent en) and
the bundled toy task, and says that this proves nothing about real models.
"""

from __future__ import annotations

import argparse
import csv
import json
import math
import shutil
import sys
from pathlib import Path

import numpy as np

from experiments.common import scale_options, study_main
from moejax.commands.evaluate import EvalSettings, evaluate, loadable_tasks
from moejax.commands.experts import ExpertsSettings, find_experts, selected_experts
from moejax.commands.options import add_options, from_mapping
from moejax.commands.train import TrainSettings, train
from moejax.data.corpus import SAMPLE_DIR
from moejax.data.languages import check_codes, display, identity, lookup
from moejax.errors import DataError, RunError, SettingsError
from moejax.evaluation import TASKS as BUNDLED_TASK_DIR
from moejax.io import output_directory, write_csv

# Paper C's recipe (the authors' released configuration where the paper's text is silent).
PAPER_POOL = ("en", "ar", "cs", "es", "fi", "hi", "ru")  # OLMoE-M7's seven high-resource languages
PAPER_PARENTS = {"ca": "es", "et": "fi", "mr": "hi", "sk": "cs", "uk": "ru", "ur": "ar", "nl": "en"}
PAPER_LRS = (1e-5, 1e-4, 4e-4, 1e-3, 4e-3)
PAPER_ALPHA, PAPER_SHARED, PAPER_TOP_N, PAPER_LAST_LAYERS = 0.01, 5, 20, 2
PAPER_FEWSHOT = {"moejax_multiblimp_": 0, "moejax_belebele_": 4}  # task-name prefix -> shots
DEMO_TARGET, DEMO_POOL, DEMO_PARENT = "he", ("en", "ja"), "en"  # the built-in corpus has en, he, ja only
DEMO_HELD_OUT = 0.2  # share of the demo target's sample lines kept out of training for the learning-rate pick

VARIANTS = ("seft", "ssft", "seft_top", "all_experts", "complete_layers")
# What the study itself sets in each `moejax train`; the rest may follow `--`.
STUDY_TRAIN_FIELDS = {"model", "data", "eval_data", "eval_every", "steps", "seq_len", "batch_size", "lr", "out",
                      "train_experts", "train_routers", "route_to_trained", "train_blocks", "mesh", "dtype", "quiet",
                      "seed"}


def variant_name(key: str, shared: int, top_n: int) -> str:
    return {"seft": "SEFT", "ssft": f"SSFT-k{shared}", "seft_top": f"SEFT-Top{top_n}", "all_experts": "all experts",
            "complete_layers": "complete layers"}[key]


def languages(target: str, pool: tuple[str, ...], parent: str | None) -> str:
    """The parent whose experts `target` takes, spelt as in the pool: --parent, else paper C's; any code of a
    language (sk, slk, slk_Latn) names it, and the target is never in the pool."""
    check_codes(pool, least=2, flag="--pool")
    spelt = {identity(lang): lang for lang in pool}
    if identity(target) in spelt:
        raise SettingsError(f"--pool {','.join(pool)} holds the target --lang {target}: paper C selects experts "
                            "among high-resource languages only and gives the target its parent's; remove it")
    if parent is None:
        if display(target) not in PAPER_PARENTS:
            raise SettingsError(f"--lang {target} has no parent in paper C's mapping ("
                                + ", ".join(f"{k}->{v}" for k, v in PAPER_PARENTS.items())
                                + "); give --parent CODE, one of --pool")
        parent = PAPER_PARENTS[display(target)]
    if identity(parent) not in spelt:
        raise SettingsError(f"--parent {parent} (of --lang {target}) is not in --pool {','.join(pool)}: the target "
                            "takes experts selected among the pool languages")
    return spelt[identity(parent)]


def parent_usage(experts_csv: Path, parent: str, layers: int, experts: int) -> np.ndarray:
    """usage_le [layer, expert]: the parent's usage fraction from `moejax experts --method gap`'s experts.csv."""
    usage_le = np.full((layers, experts), np.nan)
    with open(experts_csv, newline="", encoding="utf-8") as f:
        for row in csv.DictReader(f):
            usage_le[int(row["layer"]), int(row["expert"])] = float(row[f"usage_{parent}"])
    return usage_le


def variant_experts(record: dict, usage_le: np.ndarray, parent: str, top_n: int) -> dict[str, dict[str, list[int]]]:
    """The target's trained experts per variant, {key: {MoE layer: ids}} over the window, from the experts.json of
    a gap selection over the pool: the parent's SEFT and SSFT-k, the top_n experts of the parent's usage_le
    [layer, expert] (the count control, not the gap rule) and every expert."""
    experts = record["experts_per_layer"]
    if not 1 <= top_n <= experts:
        raise SettingsError(f"--top-n {top_n}: the model has {experts} experts per layer")
    if parent not in record["by_label"]:
        raise DataError(f"the selection has no language {parent!r} (it has {', '.join(record['by_label'])})")
    k = record["settings"]["shared"]
    chosen = selected_experts(record, k)[parent]
    top = {str(layer): sorted(int(e) for e in np.argsort(-usage_le[layer], kind="stable")[:top_n])
           for layer in record["window"]}
    return {"seft": chosen["seft"], "ssft": chosen[f"ssft_k{k}"], "seft_top": top,
            "all_experts": {str(layer): list(range(experts)) for layer in record["window"]}}


def perplexity(loss: float) -> float:
    return math.exp(loss) if loss < 700 else math.inf


def pick_lr(rows: list[dict]) -> float | None:
    """The learning rate of the row with the lowest finite val_ppl (the first of equals); None when none is."""
    finite = [r for r in rows if math.isfinite(r["val_ppl"])]
    return min(finite, key=lambda r: r["val_ppl"])["lr"] if finite else None


def default_tasks(target: str) -> tuple[str, ...]:
    """The target's MultiBLiMP and Belebele task names as moejax.evaluation.offline writes them."""
    record = lookup(target)
    if record is None or record.flores is None:
        raise SettingsError(f"--lang {target}: not a language FLORES-200 has, so its MultiBLiMP and Belebele "
                            "task names cannot be formed; name them with --tasks")
    return f"moejax_multiblimp_{record.iso3}", f"moejax_belebele_{record.flores}"


def fewshot_groups(tasks: tuple[str, ...]) -> dict[int | None, list[str]]:
    """{shots: tasks}: paper C's shots for MultiBLiMP (0) and Belebele (4); None (each task's own) otherwise."""
    groups: dict[int | None, list[str]] = {}
    for task in tasks:
        shots = next((n for prefix, n in PAPER_FEWSHOT.items() if task.startswith(prefix)), None)
        groups.setdefault(shots, []).append(task)
    return groups


def _labels(spec: str) -> list[str]:
    return [part.partition("=")[0].strip() for part in spec.split(",") if part.strip()]


class Plan:
    """Every choice of one study, resolved from the flags, with where it came from (the protocol table)."""

    def __init__(self, args):
        builtin = args.model is None
        demo = builtin and args.lang is None and args.pool is None
        if args.lang is None and not builtin:
            raise SettingsError("--lang: name the target language (e.g. sk; paper C's targets: "
                                + ", ".join(PAPER_PARENTS) + ")")
        self.target = args.lang or DEMO_TARGET
        self.pool = tuple(args.pool.split(",")) if args.pool else DEMO_POOL if demo else PAPER_POOL
        self.parent = languages(self.target, self.pool, args.parent or (DEMO_PARENT if demo else None))
        self.variants = tuple(args.variants.split(",")) if args.variants else VARIANTS
        unknown = sorted(set(self.variants) - set(VARIANTS))
        if unknown or not self.variants:
            raise SettingsError(f"--variants {args.variants!r}: choose among {','.join(VARIANTS)}")
        try:
            self.lrs = tuple(float(x) for x in args.lrs.split(",")) if args.lrs else PAPER_LRS
        except ValueError:
            raise SettingsError(f"--lrs {args.lrs!r}: give learning rates separated by commas") from None
        if not self.lrs or not all(math.isfinite(lr) and lr > 0 for lr in self.lrs) or len(set(self.lrs)) != len(
                self.lrs):
            raise SettingsError(f"--lrs {args.lrs!r}: give distinct positive learning rates")
        self.args, self.demo, self.builtin = args, demo, builtin
        self.train_extra = train_flags(args.train_args)
        self.select_data = self._select_data(args.select_data)
        if builtin and not args.data and not (SAMPLE_DIR / f"{self.target}.txt").is_file():
            raise SettingsError(f"--data: the built-in sample corpus has no {self.target} text; give the target's "
                                "training text (and --eval-data its held-out text)")
        if (args.data or not builtin) and not (args.data and args.eval_data):
            raise SettingsError("--data LANG=PATH:RATIO and --eval-data LANG=PATH (the target's training and "
                                "held-out text) go together, and are needed with --model")
        # The held-out column of eval.csv is named by the label --eval-data gives the target (sk or slk alike).
        self.eval_label = next((x for x in _labels(args.eval_data or "") if identity(x) == identity(self.target)),
                               None if args.eval_data else self.target)
        if self.eval_label is None:
            raise SettingsError(f"--eval-data {args.eval_data}: it has no held-out text for the target {self.target}; "
                                "the learning rate is picked by its perplexity")
        self.tasks, self.task_source = self._tasks(args)

    def _select_data(self, spec: str | None) -> dict[str, str]:
        """{pool language: corpus} for `moejax experts`."""
        if spec is None:
            if not self.builtin:
                raise SettingsError("--select-data: give the pool languages' held-out text (LANG=PATH,... or one "
                                    "parallel corpus) for the expert selection")
            return {lang: "builtin" for lang in self.pool}
        if "=" not in spec:
            return {lang: spec for lang in self.pool}
        given = {identity(k): (k, v) for k, v in (part.split("=", 1) for part in spec.split(",") if part.strip())}
        pool = {identity(lang): lang for lang in self.pool}
        missing = [lang for key, lang in pool.items() if key not in given]
        extra = [k for key, (k, _) in given.items() if key not in pool]
        if missing or extra:
            raise SettingsError(f"--select-data: give one corpus per --pool language ({','.join(self.pool)}); "
                                + (f"missing {','.join(missing)}" if missing else f"{','.join(extra)} not in the "
                                   "pool (the target is never selected on)"))
        return {lang: given[key][1] for key, lang in pool.items()}

    def _tasks(self, args) -> tuple[tuple[str, ...], str]:
        if args.tasks == "none":
            return (), "given (--tasks none)"
        if args.tasks:
            return tuple(args.tasks.split(",")), "given (--tasks)"
        if args.data_dir:
            return default_tasks(self.target), "paper C (MultiBLiMP 0-shot, Belebele 4-shot, from --data-dir)"
        if self.builtin:
            toy = f"moejax_choice_{self.target}"
            if (BUNDLED_TASK_DIR / f"choice_{self.target}.yaml").is_file():
                return (toy,), "built-in demo: the bundled toy task (no --data-dir), not MultiBLiMP or Belebele"
            return (), f"none: no --data-dir, and no bundled toy task for {self.target}"
        raise SettingsError("--data-dir DIR: give the folder of local MultiBLiMP and Belebele files (or --tasks "
                            "T1,T2 of lm-eval tasks on this machine, or --tasks none for perplexity only)")

    def protocol(self) -> list[dict]:
        """One row per choice: what was used and where it came from."""
        a, extra = self.args, self.train_extra

        def source(given: bool, default: str = "paper C") -> str:
            return "given" if given else "built-in demo" if self.demo else default

        tokens = a.steps * a.batch_size * a.seq_len
        return [
            {"choice": "target language", "value": self.target, "source": source(a.lang is not None, "given")},
            {"choice": "selection pool (high-resource; the target never in it)", "value": ",".join(self.pool),
             "source": source(a.pool is not None)},
            {"choice": "parent language (its experts go to the target)", "value": self.parent,
             "source": source(a.parent is not None, "paper C mapping")},
            {"choice": "selection rule", "value": f"activation gap >= {a.alpha:g} over the pool, last "
             f"{a.last_layers} MoE layers", "source": "paper C" if (a.alpha, a.last_layers) == (
                 PAPER_ALPHA, PAPER_LAST_LAYERS) else "given"},
            {"choice": "shared experts in SSFT", "value": str(a.shared),
             "source": "paper C" if a.shared == PAPER_SHARED else "given"},
            {"choice": "Top-n control", "value": f"the {a.top_n} experts the parent routes to most, per layer",
             "source": ("paper C" if a.top_n == PAPER_TOP_N else "given") + " (ranking: moejax's reading)"},
            {"choice": "routers", "value": "frozen" if a.freeze_routers else "trained with the selected experts",
             "source": "given, not paper C" if a.freeze_routers else "paper C"},
            {"choice": "routing while training", "value": "restricted to the trained experts in the expert "
             "variants (evaluation unrestricted)", "source": "paper C (the authors' training code)"},
            {"choice": "auxiliary losses", "value": f"load balancing {extra.get('lb_coef', 0):g}, router z "
             f"{extra.get('z_coef', 0):g}", "source": "given" if {"lb_coef", "z_coef"} & set(extra) else
             "paper C (cross-entropy only)"},
            {"choice": "learning rates", "value": ",".join(f"{lr:g}" for lr in self.lrs),
             "source": "given (--lrs)" if a.lrs else "paper C grid"},
            {"choice": "learning-rate pick", "value": f"lowest perplexity on the held-out {self.target} text, "
             "per variant", "source": "paper C"},
            {"choice": "variants", "value": ", ".join(variant_name(v, a.shared, a.top_n) for v in self.variants),
             "source": "given (--variants)" if a.variants else "paper C"},
            {"choice": "training length", "value": f"{a.steps} steps x {a.batch_size} x {a.seq_len} tokens = "
             f"{tokens:,} tokens", "source": "moejax option (paper C: about 300M target tokens)"},
            {"choice": "downstream tasks", "value": ", ".join(self.tasks) or "none", "source": self.task_source},
            {"choice": "checkpoints kept", "value": "every run" if a.keep_checkpoints else "the picked run of each "
             "variant", "source": "moejax option"},
            {"choice": "mesh, dtype", "value": f"{a.mesh or 'none'}, {a.dtype} (every load; training computes in "
             "it, auto: the trainer's default)", "source": "moejax option"},
            {"choice": "seed", "value": str(a.seed), "source": "given (--seed): data order and initial state of "
             "every run"},
        ]


def train_flags(argv: list[str]) -> dict:
    """The `moejax train` flags after `--` as TrainSettings fields, none of those the study sets itself."""
    flags = argparse.ArgumentParser(prog="moejax train flags (after --)")
    add_options(flags, TrainSettings)
    extra = vars(flags.parse_args(argv[1:] if argv[:1] == ["--"] else argv))
    clash = sorted(STUDY_TRAIN_FIELDS & set(extra))
    if clash:
        raise SettingsError(f"after --: {', '.join(clash)} are set by the study; use its own flags")
    return extra


def run(args) -> Path:
    """The whole study into args.out (written when it completes); returns it."""
    plan = Plan(args)
    if args.data_dir is not None and not Path(args.data_dir).is_dir():
        raise DataError(f"--data-dir {args.data_dir}: no such folder")
    inputs = [args.model, args.data_dir, *(p for p in plan.select_data.values() if p != "builtin")]
    with output_directory(args.out, "expert-selective", inputs) as tmp:
        study(plan, tmp)
    print((Path(args.out) / "summary.md").read_text(encoding="utf-8"))
    return Path(args.out)


def study(plan: Plan, out: Path) -> None:
    a = plan.args
    include = task_include(plan, out) if plan.tasks else ()
    *pool_first, pool_last = plan.pool
    selection = find_experts(ExpertsSettings(
        model=a.model, target=tuple(f"{lang}={plan.select_data[lang]}" for lang in pool_first),
        baseline=f"{pool_last}={plan.select_data[pool_last]}", method="gap", last_layers=a.last_layers,
        alpha=a.alpha, shared=a.shared, mesh=a.mesh, dtype=a.dtype, out=out / "selection", quiet=True))
    record = json.loads((selection / "experts.json").read_text())
    usage_le = parent_usage(selection / "experts.csv", plan.parent, len(record["moe_blocks"]),
                            record["experts_per_layer"])
    chosen = variant_experts(record, usage_le, plan.parent, a.top_n)
    if "seft" in plan.variants and not any(chosen["seft"].values()):
        raise DataError(f"the parent {plan.parent} leads no expert by --alpha {a.alpha:g} in MoE layers "
                        f"{record['window']}: SEFT would train nothing; lower --alpha or give more --select-data text")
    selection_file = out / "target_experts.json"
    selection_file.write_text(json.dumps({plan.target: chosen}, indent=2))
    data, eval_data = a.data, a.eval_data
    if plan.builtin and data is None:
        data, eval_data = demo_data(plan.target, out / "data", eval_data)
    common = {"model": a.model, "data": data, "eval_data": eval_data, "eval_every": a.steps, "steps": a.steps,
              "seq_len": a.seq_len, "batch_size": a.batch_size, "seed": a.seed, "mesh": a.mesh,
              "dtype": None if a.dtype == "auto" else a.dtype,
              "lb_coef": 0.0, "z_coef": 0.0, "save_every": a.steps, "keep": 1, "quiet": True, **plan.train_extra}
    blocks = [record["moe_blocks"][layer] for layer in record["window"]]
    settings = {key: {lr: from_mapping(TrainSettings, {**common, **what_trains(key, selection_file, plan, blocks),
                                                       "lr": lr, "out": out / key / f"lr_{lr:g}"})
                      for lr in plan.lrs} for key in plan.variants}  # every run's settings checked before any trains
    sweep, rows = [], []
    for key, by_lr in settings.items():
        runs = [train_one(s, lr, key, plan.eval_label) for lr, s in by_lr.items()]
        best = pick_lr(runs)
        for r in runs:
            r["chosen"] = r["lr"] == best
            if not r["chosen"] and not a.keep_checkpoints:
                shutil.rmtree(out / key / f"lr_{r['lr']:g}" / "checkpoint", ignore_errors=True)
        sweep += runs
        budget = next(iter(by_lr.values())).run_settings().budget
        picked = next((r for r in runs if r["chosen"]), None)
        scores = downstream(plan, out, key, picked, include) if picked and plan.tasks else {}
        rows.append(variant_row(key, plan, chosen.get(key), blocks, budget, picked, scores))
        print(f"{rows[-1]['name']}: lr {best if best is not None else 'none'}, {plan.target} validation perplexity "
              f"{picked['val_ppl'] if picked else math.nan:.3f}", file=sys.stderr)
    write_csv(out / "sweep.csv", sweep)
    write_csv(out / "selective.csv", rows)
    (out / "protocol.json").write_text(json.dumps({"protocol": plan.protocol(), "parent": plan.parent,
                                                   "pool": list(plan.pool), "lrs": list(plan.lrs)}, indent=2))
    (out / "summary.md").write_text(summary(plan, record, rows, sweep), encoding="utf-8")
    _figure(out / "selective.png", rows, plan.target)


def what_trains(key: str, selection_file: Path, plan: Plan, blocks: list[int]) -> dict:
    """TrainSettings fields of a variant: the target's experts of that key (with the routers, and routing restricted
    to them while training, as the authors trained), or the complete last blocks."""
    if key == "complete_layers":
        return {"train_blocks": blocks}
    return {"train_experts": f"{selection_file}:{plan.target}:{key}", "train_routers": not plan.args.freeze_routers,
            "route_to_trained": True}


def train_one(settings: TrainSettings, lr: float, key: str, target: str) -> dict:
    """One sweep run: the validation loss and perplexity of `target` (its --eval-data label) at the last step (inf
    when the run stopped early)."""
    try:
        train(settings)
        status = "done"
    except RunError as e:  # a learning rate too high for the model: the sweep records it and goes on
        status = f"failed: {str(e).splitlines()[0]}"
    table = settings.out / "eval.csv"
    rows = list(csv.DictReader(table.read_text(encoding="utf-8").splitlines())) if table.is_file() else []
    column = f"eval_loss_{target}"
    start = float(rows[0][column]) if rows else math.nan
    end = float(rows[-1][column]) if status == "done" else math.inf
    return {"variant": key, "lr": lr, "status": status, "val_loss_start": start, "val_loss": end,
            "val_ppl_start": perplexity(start) if rows else math.nan, "val_ppl": perplexity(end),
            **{f"held_out_loss_{k.removeprefix('eval_loss_')}": float(v) for k, v in (rows[-1] if status == "done"
                                                                                     else {}).items() if k != "step"}}


def demo_data(target: str, folder: Path, eval_data: str | None) -> tuple[str, str]:
    """The built-in sample of the target split into training and held-out lines (the last DEMO_HELD_OUT), and the
    other sample languages held out whole (for forgetting)."""
    folder.mkdir(parents=True)
    lines = [x for x in (SAMPLE_DIR / f"{target}.txt").read_text(encoding="utf-8").splitlines() if x.strip()]
    cut = len(lines) - max(1, int(len(lines) * DEMO_HELD_OUT))
    (folder / f"{target}_train.txt").write_text("\n".join(lines[:cut]) + "\n", encoding="utf-8")
    (folder / f"{target}_held_out.txt").write_text("\n".join(lines[cut:]) + "\n", encoding="utf-8")
    others = [f"{p.stem}={p}" for p in sorted(SAMPLE_DIR.glob("*.txt")) if p.stem != target]
    return (f"{target}={folder / f'{target}_train.txt'}:1",
            eval_data or ",".join([f"{target}={folder / f'{target}_held_out.txt'}", *others]))


def task_include(plan: Plan, out: Path) -> tuple[Path, ...]:
    """The lm-eval task folder for --data-dir (written under OUT), with every task checked to exist and to load
    offline before anything trains."""
    a = plan.args
    include: tuple[Path, ...] = ()
    if a.data_dir:
        try:
            from moejax.evaluation.offline import task_folder
        except ImportError:
            raise SettingsError("--data-dir: this moejax has no moejax.evaluation.offline (the writer of local "
                                "MultiBLiMP and Belebele tasks)") from None
        include = (Path(task_folder(Path(a.data_dir), out / "tasks", list(plan.tasks))),)
    loadable_tasks(EvalSettings(tasks=plan.tasks, include_path=include))
    return include


def downstream(plan: Plan, out: Path, key: str, picked: dict, include: tuple[Path, ...]) -> dict[str, float]:
    """The picked run's scores through `moejax eval`, one call per few-shot setting; {"task (metric)": value}."""
    a = plan.args
    scores = {}
    for shots, tasks in fewshot_groups(plan.tasks).items():
        name = "eval" if shots is None else f"eval_{shots}shot"
        _, results = evaluate(EvalSettings(model=out / key / f"lr_{picked['lr']:g}", tasks=tuple(tasks),
                                           include_path=include, num_fewshot=shots, limit=a.limit, mesh=a.mesh,
                                           dtype=a.dtype, out=out / key / name))
        for task in tasks:
            metrics = {k.partition(",")[0]: v for k, v in results["results"][task].items()
                       if "," in k and "_stderr" not in k and isinstance(v, int | float)}
            metric = next((m for m in ("acc", "exact_match") if m in metrics), next(iter(metrics)))
            scores[f"{task} ({metric})"] = float(metrics[metric])
    return scores


def variant_row(key: str, plan: Plan, experts: dict | None, blocks: list[int], budget: dict, picked: dict | None,
                scores: dict) -> dict:
    a = plan.args
    trained = (f"blocks {','.join(map(str, blocks))}" if experts is None
               else "; ".join(f"layer {layer}: {len(ids)}" for layer, ids in experts.items()))
    return {"variant": key, "name": variant_name(key, a.shared, a.top_n), "trains": trained,
            "trainable": budget["trainable"], "share": budget["share"], "lr": picked["lr"] if picked else "",
            "val_ppl_start": picked["val_ppl_start"] if picked else "", "val_ppl": picked["val_ppl"] if picked else "",
            **({k: v for k, v in picked.items() if k.startswith("held_out_loss_")} if picked else {}), **scores}


def summary(plan: Plan, record: dict, rows: list[dict], sweep: list[dict]) -> str:
    t = plan.target
    lines = [f"# Expert-selective adaptation (paper C): {t}, with the experts of {plan.parent}", "",
             f"Model: {plan.args.model or 'the built-in model'}. MoE layers {record['window']} (blocks "
             f"{[record['moe_blocks'][x] for x in record['window']]}), {record['experts_per_layer']} experts each.",
             "", "## Protocol", "", _row(["choice", "used", "source"]), _row(["---"] * 3)]
    lines += [_row([p["choice"], p["value"], p["source"]]) for p in plan.protocol()]
    score_keys = list(dict.fromkeys(k for r in rows for k in r if " (" in k))
    head = ["variant", "trains", "trainable parameters", "share", "lr",
            f"{t} validation perplexity (start -> end)", *score_keys]
    lines += ["", "## Variants, each at its picked learning rate", "", _row(head), _row(["---"] * len(head))]
    for r in rows:
        picked = r["lr"] != ""
        lines.append(_row([r["name"], r["trains"], f"{r['trainable']:,}", f"{r['share']:.2%}",
                           f"{r['lr']:g}" if picked else "none",
                           f"{r['val_ppl_start']:.3f} -> {r['val_ppl']:.3f}" if picked else "no run finished",
                           *(f"{r[k]:.4f}" if k in r else "-" for k in score_keys)]))
    head = ["variant", "lr", f"{t} validation perplexity", "chosen", "status"]
    lines += ["", "## Learning-rate sweep", "", _row(head), _row(["---"] * len(head))]
    lines += [_row([variant_name(r["variant"], plan.args.shared, plan.args.top_n), f"{r['lr']:g}",
                    f"{r['val_ppl']:.3f}", "yes" if r["chosen"] else "", r["status"]]) for r in sweep]
    lines += ["", "Top-n control: paper C names it a control for the number of experts and does not spell out its "
              "ranking; moejax takes the experts the parent language routes to most (usage fraction), not the gap "
              "rule. Checkpoints of the runs not picked are removed unless --keep-checkpoints."]
    if plan.builtin:
        lines += ["", "The built-in model has random weights and the sample corpus is tiny: this run shows the "
                  "protocol working and proves nothing about real models."
                  + (" Its downstream score is the bundled toy task, not MultiBLiMP or Belebele."
                     if plan.tasks and not plan.args.data_dir and not plan.args.tasks else "")]
    return "\n".join(lines) + "\n"


def _row(cells: list[str]) -> str:
    return "| " + " | ".join(cells) + " |"


def _figure(path: Path, rows: list[dict], target: str) -> None:
    from moejax.report.figures import plt, save_figure  # pyplot with the Agg backend

    fig, ax = plt.subplots(figsize=(5, 3.4))
    for i, r in enumerate(rows):
        if r["lr"] != "":
            ax.scatter(r["share"], r["val_ppl"], color=f"C{i}", label=f"{r['name']} (lr {r['lr']:g})")
    ax.set_xscale("log")
    ax.set_xlabel("trainable share of the parameters")
    ax.set_ylabel(f"{target} validation perplexity")
    ax.legend(fontsize=7)
    save_figure(fig, path.parent, path.name)


def parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", help="checkpoint directory with its tokenizer; default: the built-in model")
    p.add_argument("--lang", help="the low-resource target (needed with --model; demo: he)")
    p.add_argument("--pool", metavar="L1,L2,...", help="high-resource languages the experts are selected among, "
                   f"never the target (default: paper C's {','.join(PAPER_POOL)}; demo: {','.join(DEMO_POOL)})")
    p.add_argument("--parent", help="the pool language whose experts the target takes (default: paper C's "
                   "mapping " + ", ".join(f"{k}->{v}" for k, v in PAPER_PARENTS.items()) + f"; demo: {DEMO_PARENT})")
    p.add_argument("--select-data", metavar="LANG=PATH,...|CORPUS", help="held-out text of each pool language "
                   "(text or JSONL files), or one corpus holding them all (a folder of {lang}.txt files, FLORES-200, "
                   "a table with a column per language); default with the built-in model: its sample corpus")
    p.add_argument("--data", help="the target's training text LANG=PATH:RATIO (default: the demo sample's training "
                   "lines)")
    p.add_argument("--eval-data", help="held-out text LANG=PATH,... with the target's (the learning-rate pick) and "
                   "any others (forgetting); default: the demo sample's held-out lines and the other samples")
    p.add_argument("--last-layers", type=int, default=PAPER_LAST_LAYERS, help="the final MoE layers adapted")
    p.add_argument("--alpha", type=float, default=PAPER_ALPHA, help="the gap rule's lead")
    p.add_argument("--shared", type=int, default=PAPER_SHARED, help="shared experts added in SSFT")
    p.add_argument("--top-n", type=int, default=PAPER_TOP_N, help="experts per layer of the Top-n control")
    p.add_argument("--variants", help=f"a subset of {','.join(VARIANTS)} (default: all)")
    p.add_argument("--lrs", help="learning rates swept per variant (default: paper C's "
                   + ",".join(f"{x:g}" for x in PAPER_LRS) + ")")
    p.add_argument("--freeze-routers", action="store_true", help="keep the routers frozen (not paper C)")
    p.add_argument("--steps", type=int, default=30)
    p.add_argument("--seq-len", type=int, default=128)
    p.add_argument("--batch-size", type=int, default=4)
    p.add_argument("--data-dir", type=Path, help="local MultiBLiMP and Belebele files (moejax.evaluation.offline): "
                   "the target's tasks are scored from them")
    p.add_argument("--tasks", help="lm-eval tasks instead of the target's MultiBLiMP and Belebele; 'none' for "
                   "perplexity only")
    p.add_argument("--limit", type=int, help="documents per task")
    p.add_argument("--keep-checkpoints", action="store_true", help="keep every sweep run's checkpoint, not only "
                   "the picked ones")
    scale_options(p)
    p.add_argument("--out", default=Path("expert-selective"), type=Path)
    p.add_argument("train_args", nargs=argparse.REMAINDER, help="after --: more `moejax train` flags")
    return p


def main(argv: list[str] | None = None) -> None:
    study_main("expert_selective", run, parser(), argv)


if __name__ == "__main__":
    main()
