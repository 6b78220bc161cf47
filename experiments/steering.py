"""Paper (b)'s steering protocol end to end: find the experts English in-task data uses more than general English,
steer the router towards them in a window of middle layers, and score every language with and without steering.

    python -m experiments.steering --model /ckpt/Qwen3-30B-A3B --dtype bfloat16 --mesh data=1,model=8 \
        --in-domain en=/data/gsm8k_instruct_en.txt --baseline en=/data/flores200_dataset/dev \
        --window-data /data/flores200_dataset/dev --window-langs en,bn,de,es,fr,ja,ru,sw,te,th,zh \
        --data-dir /data/datasets --tasks moejax_mgsm_native_cot_bn,moejax_mgsm_native_cot_sw --num-fewshot 2 \
        --tau 0.4 --lam 0.5 --out results/steer

Steps: (0) the window: unless --layers gives one, `moejax analyze` computes each language's routing divergence from
English per MoE layer (paper B's entropy-normalised JSD) and the window is the run of middle layers around the mean
curve's minimum (derive_window; paper B read its windows, e.g. 7-34 of Qwen3's 48, off these curves); (1) `moejax
experts` (delta per layer, --tau on each layer's delta) on the in-domain and baseline corpora; (2) the selected experts
become a steering spec (promote; soft with --lam, or hard by eq. 5 with a signed eps per token); the share of the
in-domain tokens at which the promoted experts are then chosen is measured and reported; (3) each task runs through
lm-eval with moejax as the model, unsteered and steered, with per-item results kept; (4) OUT/steering.csv and
OUT/summary.md: per task, metric and filter (MGSM's strict-match and flexible-extract are scored apart) the score
without and with steering, the difference with its 95% bootstrap interval, and a paired test over the items
(McNemar's exact test on 0/1 metrics such as acc or exact_match, else a paired bootstrap), with the averages;
OUT/steering.png plots them; OUT/protocol.json records every choice and the seed. Without arguments it runs the
built-in model on the bundled en/he/ja tasks in a few minutes; that run proves nothing about real models.
"""

from __future__ import annotations

import argparse
import csv
import json
import math
from pathlib import Path

import numpy as np

from experiments.common import scale_options, study_main
from moejax.commands.experts import ExpertsSettings, find_experts, read_sequences
from moejax.evaluation import TASKS as TASK_DIR
from moejax.evaluation.task_index import cache_task_index
from moejax.io import write_csv
from moejax.models.builtin import NAME as BUILTIN
from moejax.models.steering import Steering

NAME = "steering"
BUNDLED_TASKS = ("moejax_choice_en", "moejax_choice_he", "moejax_choice_ja")


def mcnemar_exact(before: np.ndarray, after: np.ndarray) -> float:
    """Two-sided exact McNemar p-value for paired 0/1 outcomes (a binomial test on the discordant pairs)."""
    gained = int(np.sum((after == 1) & (before == 0)))
    lost = int(np.sum((after == 0) & (before == 1)))
    n = gained + lost
    if n == 0:
        return 1.0
    tail = sum(math.comb(n, i) for i in range(min(gained, lost) + 1)) / 2.0 ** n
    return min(1.0, 2 * tail)


def resampled_means(diff: np.ndarray, rng: np.random.Generator, draws: int) -> np.ndarray:
    """[draws] means of the paired differences, the items resampled with replacement each time."""
    return rng.choice(diff, (draws, len(diff)), replace=True).mean(axis=1)


def paired_bootstrap(before: np.ndarray, after: np.ndarray, seed: int = 0, draws: int = 10_000) -> float:
    """Two-sided bootstrap p-value of the mean paired difference (items resampled with replacement)."""
    diff = np.asarray(after, np.float64) - np.asarray(before, np.float64)
    if not diff.any():
        return 1.0
    means = resampled_means(diff, np.random.default_rng(seed), draws)
    return float(min(1.0, 2 * min((means <= 0).mean(), (means >= 0).mean())))


def item_scores(samples: list[dict], metric: str, filter_name: str | None = None) -> np.ndarray:
    """Per item, in document order, the metric's value under one filter: lm-eval logs one sample per filter per
    document (MGSM: strict-match and flexible-extract), and each filter is a score of its own. A document met twice
    under the filter asked for is an error, never an average."""
    chosen = [s for s in samples if filter_name is None or s.get("filter", filter_name) == filter_name]
    docs = [s["doc_id"] for s in chosen]
    if len(set(docs)) != len(docs):
        filters = sorted({str(s.get("filter")) for s in chosen})
        raise ValueError(f"{len(docs)} samples for {len(set(docs))} documents (filters {filters}): score one filter "
                         "at a time")
    return np.asarray([float(s[metric]) for s in sorted(chosen, key=lambda s: s["doc_id"])])


def metric_filters(task_results: dict) -> list[tuple[str, str]]:
    """The (metric, filter) pairs lm-eval reports for one task ("exact_match,strict-match" -> that pair)."""
    return [tuple(key.split(",", 1)) for key in task_results
            if "," in key and not key.split(",", 1)[0].endswith("_stderr")]


def paired_row(task: str, metric: str, filter_name: str, before: np.ndarray, after: np.ndarray) -> dict:
    """One (task, metric, filter)'s scores without and with steering and its paired test over the items: McNemar's
    exact test on 0/1 outcomes, else a paired bootstrap."""
    binary = set(np.unique(np.concatenate([before, after]))) <= {0.0, 1.0}
    p = mcnemar_exact(before, after) if binary else paired_bootstrap(before, after)
    return {"task": task, "metric": metric, "filter": filter_name, "items": len(before), "base": before.mean(),
            "steered": after.mean(), "difference": after.mean() - before.mean(), "p_value": p,
            "test": "McNemar exact" if binary else "paired bootstrap"}


def difference_interval(before: np.ndarray, after: np.ndarray, seed: int, draws: int = 10_000,
                        level: float = 0.95) -> tuple[float, float]:
    """Percentile bootstrap interval of the mean paired difference (items resampled with replacement)."""
    diff = np.asarray(after, np.float64) - np.asarray(before, np.float64)
    means = resampled_means(diff, np.random.default_rng([seed, 2]), draws)
    tail = (1 - level) / 2
    return float(np.quantile(means, tail)), float(np.quantile(means, 1 - tail))


def derive_window(divergence_gl: np.ndarray, fraction: float = 0.5) -> tuple[int, int]:
    """The middle window of MoE layers from divergence-from-English curves [languages, layers] (paper B reads it off
    its U-curves): the contiguous layers around the minimum of the mean curve whose mean divergence is at most
    min + fraction * (max - min). Inclusive (first, last)."""
    divergence_gl = np.asarray(divergence_gl, np.float64)
    seen_l = np.isfinite(divergence_gl).any(axis=0)  # a layer no language has stays NaN (not a warning)
    curve = np.full(divergence_gl.shape[1], np.nan)
    curve[seen_l] = np.nanmean(divergence_gl[:, seen_l], axis=0)
    low, high = np.nanmin(curve), np.nanmax(curve)
    below = curve <= low + fraction * (high - low)
    first = last = int(np.nanargmin(curve))
    while first > 0 and below[first - 1]:
        first -= 1
    while last < len(curve) - 1 and below[last + 1]:
        last += 1
    return first, last


def window_from_analysis(args, folder: Path) -> tuple[str, dict]:
    """`moejax analyze` over --window-langs of --window-data (paper B: FLORES, divergence from English per layer),
    then derive_window; returns the window "first-last" and what it was derived from."""
    from moejax.commands.analyze import AnalyzeSettings, analyze
    from moejax.routing.analysis import reference_language
    from moejax.routing.languages import divergence_from_reference

    langs = tuple(args.window_langs.split(","))
    result = analyze(AnalyzeSettings(model=(args.model,) if args.model else (), langs=langs, data=args.window_data,
                                     out=folder, chunk_mode="sentence", mesh=args.mesh, dtype=args.dtype,
                                     seed=args.seed, quiet=True))
    reference = reference_language(list(langs))
    rows = list(csv.DictReader((result / "pairs.csv").open(encoding="utf-8")))
    column = "njsd" if rows and rows[0].get("njsd") not in (None, "") else "njsd_pooled"
    typed = [{**r, "layer": int(r["layer"]), column: float(r[column])} for r in rows]
    curves = divergence_from_reference(typed, rows[0]["model"], reference, column)
    layers = max(max(c) for c in curves.values()) + 1
    divergence = np.array([[c.get(layer, np.nan) for layer in range(layers)] for c in curves.values()])
    first, last = derive_window(divergence, args.window_fraction)
    return f"{first}-{last}", {"langs": list(curves), "reference": reference, "column": column,
                               "fraction": args.window_fraction, "mean_divergence": np.nanmean(divergence, 0).tolist()}


def evaluate(args, tasks: list[str], include: list[str], steering: Steering | None) -> dict:
    import lm_eval
    from lm_eval.tasks import TaskManager

    from moejax.evaluation.harness import MoejaxLM

    cache_task_index()
    lm = MoejaxLM(pretrained=args.model or BUILTIN, batch_size=args.batch_size, steering=steering, dtype=args.dtype,
                  mesh=args.mesh)
    manager = TaskManager(include_path=[str(TASK_DIR), *include], verbosity="ERROR")
    return lm_eval.simple_evaluate(model=lm, tasks=tasks, task_manager=manager, log_samples=True, limit=args.limit,
                                   num_fewshot=args.num_fewshot, verbosity="ERROR", random_seed=args.seed,
                                   numpy_random_seed=args.seed, torch_random_seed=args.seed,
                                   fewshot_random_seed=args.seed)


def selected_share(args, steering: Steering, texts: list[str]) -> dict:
    """Where the steering names experts, the share of the in-domain tokens at which each promoted expert is chosen
    and each suppressed one is (min and max over the steered experts): what the intervention actually did."""
    from moejax.commands.analyze import load_model
    from moejax.parallel.mesh import make_mesh
    from moejax.routing.analysis import collect

    _, _, model, tokenizer = load_model(args.model, make_mesh(args.mesh) if args.mesh else None, dtype=args.dtype)
    run = collect(model, tokenizer, texts, exclude_ids=set(tokenizer.special_ids), batch_size=args.batch_size,
                  probabilities="softmax", seed=args.seed, steering=steering)
    tokens = max(int(run.tokens.sum()), 1)
    counts_le = run.topk_counts.sum(0)
    promoted, suppressed = [], []
    for layer, (up, down) in steering.resolved_layers(model.config).items():
        promoted += [counts_le[layer, e] / tokens for e in up]
        suppressed += [counts_le[layer, e] / tokens for e in down]
    return {"tokens": tokens,
            "promoted_min": float(min(promoted)) if promoted else None,
            "promoted_mean": float(np.mean(promoted)) if promoted else None,
            "suppressed_max": float(max(suppressed)) if suppressed else None}


def run(args) -> Path:
    from moejax.io import output_directory

    inputs = [p for p in (args.model, args.window_data, args.data_dir, *args.include_path) if p]
    with output_directory(args.out, NAME, inputs) as out:
        window_source = {"given": args.layers}
        if args.layers in (None, "auto"):
            args.layers, window_source = window_from_analysis(args, out / "window")
        in_domain = args.in_domain
        if in_domain is None:  # the bundled English task's questions and answers, as in-task English text
            lines = [json.loads(line) for line in (TASK_DIR / "choice_en.jsonl").read_text().splitlines()]
            text = out / "in_domain_en.txt"
            text.write_text("\n".join(f"{d['question']} {d['choices'][d['answer']]}" for d in lines) + "\n")
            in_domain = f"task={text}"
        label, _, path = in_domain.partition("=")
        experts_out = find_experts(ExpertsSettings(model=args.model, target=(f"{label}={path}",),
                                                   baseline=args.baseline, tau=args.tau, layers=args.layers,
                                                   out=out / "experts", quiet=True, mesh=args.mesh, dtype=args.dtype))
        record = json.loads((experts_out / "experts.json").read_text())
        steering = Steering.from_experts(record, args.mode, args.lam, "promote", seed=args.seed)
        print(f"{record['selected_count']} experts selected in MoE layers {record['window'][0]}-"
              f"{record['window'][-1]}; steering {args.mode}" + (f", lambda {args.lam}" if args.mode == "soft" else ""))
        share = (selected_share(args, steering, read_sequences(label, path)[:args.share_sequences])
                 if record["selected_count"] else None)
        tasks = args.tasks.split(",") if args.tasks else list(BUNDLED_TASKS)
        include = list(args.include_path)
        if args.data_dir:
            from moejax.evaluation.offline import task_folder

            include.append(str(task_folder(Path(args.data_dir), out / "tasks", tasks)))
        results = {name: evaluate(args, tasks, include, steer) for name, steer in (("base", None),
                                                                                    ("steered", steering))}
        rows = []
        for task in tasks:
            for metric, name in metric_filters(results["base"]["results"][task]):
                before = item_scores(results["base"]["samples"][task], metric, name)
                after = item_scores(results["steered"]["samples"][task], metric, name)
                row = paired_row(task, metric, name, before, after)
                row["ci_low"], row["ci_high"] = difference_interval(before, after, args.seed, args.bootstrap)
                rows.append(row)
        write_csv(out / "steering.csv", rows)
        (out / "summary.md").write_text(summary(args, record, rows, share, window_source), encoding="utf-8")
        _figure(out / "steering.png", rows)
        (out / "protocol.json").write_text(json.dumps({
            "model": args.model or BUILTIN, "window": args.layers, "window_source": window_source, "tau": args.tau,
            "mode": args.mode, "lambda": args.lam, "eps_std": steering.eps_std, "seed": args.seed,
            "dtype": args.dtype, "mesh": args.mesh, "tasks": tasks, "selected_share": share}, indent=2))
    print((Path(args.out) / "summary.md").read_text())
    return Path(args.out)


def summary(args, record: dict, rows: list[dict], share: dict | None, window_source: dict) -> str:
    model = args.model or BUILTIN
    how = f"soft, lambda {args.lam}" if args.mode == "soft" else "hard (eq. 5: max(z) + eps, eps ~ N(0, 1e-6) " \
        "per token and expert, 1e-6 read as the variance)"
    if "given" in window_source:
        window = f"MoE layers {args.layers} (given with --layers)"
    else:
        window = (f"MoE layers {args.layers}, derived from the divergence from {window_source['reference']} of "
                  f"{', '.join(window_source['langs'])} ({window_source['column']}): the layers around the minimum of "
                  f"the mean curve within {window_source['fraction']:g} of its range above the minimum (window/ "
                  "holds the analysis; --layers overrides)")
    lines = ["# Router steering: scores without and with steering", "",
             f"Model: {model} ({args.dtype}{', mesh ' + args.mesh if args.mesh else ''}). Experts: delta per layer of "
             f"{record['target'] if 'target' in record else 'the in-domain text'} against {record['baseline']}, tau "
             f"{args.tau} on each layer's delta, {record['selected_count']} selected (experts/ holds them). Window: "
             f"{window}. Steering: {how}. Seed {args.seed}.", ""]
    if share is not None:
        lines += [f"Selected share on {share['tokens']} in-domain tokens: each promoted expert is chosen at "
                  f"{share['promoted_min']:.1%} of the tokens or more (mean {share['promoted_mean']:.1%})"
                  + (f"; a suppressed one at {share['suppressed_max']:.1%} at most" if share['suppressed_max']
                     is not None else "") + ".", ""]
    lines += ["Each (metric, filter) lm-eval reports is scored and tested on its own (MGSM's strict-match and "
              "flexible-extract are two scores of the same items). CI: 95% bootstrap interval of the paired "
              "difference over items.", "",
              "| task | metric | filter | items | base | steered | difference [95% CI] | p (paired) |",
              "|---|---|---|---|---|---|---|---|"]
    for r in rows:
        lines.append(f"| {r['task']} | {r['metric']} | {r['filter']} | {r['items']} | {r['base']:.4f} | "
                     f"{r['steered']:.4f} | {r['difference']:+.4f} [{r['ci_low']:+.4f}, {r['ci_high']:+.4f}] | "
                     f"{r['p_value']:.3g} ({r['test']}) |")
    for metric, name in dict.fromkeys((r["metric"], r["filter"]) for r in rows):  # an average per score, never mixed
        group = [r for r in rows if (r["metric"], r["filter"]) == (metric, name)]
        lines.append(f"| **average** | {metric} | {name} | | {np.mean([r['base'] for r in group]):.4f} | "
                     f"{np.mean([r['steered'] for r in group]):.4f} | "
                     f"{np.mean([r['difference'] for r in group]):+.4f} | |")
    if record["selected_count"] == 0:
        lines += ["", f"No expert passed tau {args.tau}: steering changed nothing. Lower --tau or widen --layers."]
    if model == BUILTIN:
        lines += ["", "The built-in model has random weights and the bundled tasks have 12 items each: this run "
                  "shows the protocol working and proves nothing about real models."]
    return "\n".join(lines) + "\n"


def _figure(path: Path, rows: list[dict]) -> None:
    from moejax.report.figures import plt, save_figure  # pyplot with the Agg backend

    x = np.arange(len(rows))
    fig, ax = plt.subplots(figsize=(1.2 * len(rows) + 3, 3.2))
    ax.bar(x - 0.2, [r["base"] for r in rows], 0.4, label="base")
    ax.bar(x + 0.2, [r["steered"] for r in rows], 0.4, label="steered")
    ax.set_xticks(x, [f"{r['task']}\n{r['filter']}" if r["filter"] != "none" else r["task"] for r in rows],
                  rotation=20, fontsize=8)
    ax.set_ylabel(rows[0]["metric"])
    ax.legend(fontsize=8)
    save_figure(fig, path.parent, path.name)


def parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog=f"python -m experiments.{NAME}", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", help="checkpoint directory with its tokenizer; default: the built-in model")
    p.add_argument("--in-domain", metavar="LABEL=CORPUS",
                   help="English in-task text (a text file of sequences, JSONL of {'text'}, or a corpus moejax "
                   "analyze reads); default: the bundled English task's questions with their answers")
    p.add_argument("--baseline", default="en=builtin", metavar="LABEL=CORPUS",
                   help="general-domain text of the same language (paper B: FLORES English; default: the built-in "
                   "English sample)")
    p.add_argument("--tau", type=float, help="delta threshold, applied to each layer's delta (paper B: 0.3-0.5 by "
                   "model; default 0.3, 0.1 for the built-in model, whose in-domain and general English differ little)")
    p.add_argument("--layers", default="auto", help="MoE-layer window, e.g. 7-34 (paper B's Qwen3 window, "
                   "0-indexed); default auto: derived from the divergence curves (--window-data, --window-langs)")
    p.add_argument("--window-data", help="parallel corpus for the window's divergence curves (paper B: FLORES-200 "
                   "dev; default: the built-in sample corpus)")
    p.add_argument("--window-langs", default="en,he,ja", help="languages of the divergence curves, with en")
    p.add_argument("--window-fraction", type=float, default=0.5,
                   help="the window holds the layers within this fraction of the mean curve's range above its minimum")
    p.add_argument("--mode", choices=["soft", "hard"], default="soft", help="soft: z + lambda std(z); hard: eq. 5")
    p.add_argument("--lam", type=float, default=0.5, help="soft steering strength lambda (paper B: 0.5)")
    p.add_argument("--tasks", help="lm-eval tasks, comma-separated (default: the bundled en/he/ja choice tasks); "
                   "with --data-dir e.g. moejax_mgsm_native_cot_bn,moejax_global_mmlu_medical_sw")
    p.add_argument("--data-dir", help="the folder of downloaded datasets the offline tasks read (MGSM, Global-MMLU, "
                   "Belebele: docs/evaluation.md)")
    p.add_argument("--include-path", action="append", default=[], help="a folder of task YAML (repeatable)")
    p.add_argument("--num-fewshot", type=int, help="few-shot examples (default: each task's own; MGSM 2 in paper B)")
    p.add_argument("--limit", type=int, help="documents per task")
    p.add_argument("--batch-size", type=int, default=8)
    p.add_argument("--share-sequences", type=int, default=64, help="in-domain sequences on which the selected share "
                   "of the steered experts is measured")
    p.add_argument("--bootstrap", type=int, default=10_000, help="resamples of the items for each interval")
    p.add_argument("--out", default=NAME, type=Path, help="output directory (a new one, or this study's own)")
    scale_options(p)
    return p


def main(argv: list[str] | None = None) -> None:
    def run_with_defaults(args):
        if args.tau is None:
            args.tau = 0.3 if args.model else 0.1
        return run(args)

    study_main(NAME, run_with_defaults, parser(), argv)


if __name__ == "__main__":
    main()
