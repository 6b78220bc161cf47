"""Paper (b)'s steering protocol end to end: find the experts English in-task data uses more than general English,
steer the router towards them in a window of middle layers, and score every language with and without steering.

    python -m experiments.steering --model /ckpt/Qwen3-30B-A3B \\
        --in-domain en=/data/gsm8k_en_questions.txt --baseline en=/data/flores200_dataset/dev \\
        --tasks mgsm_en,mgsm_he,mgsm_ja --include-path tasks/ --layers 7-34 --tau 0.4 --lam 0.5 --out results/steer

Steps: (1) `moejax experts` (delta, --tau, --layers) on the in-domain and baseline corpora; (2) the selected experts
become a soft steering spec (promote, --lam); (3) each task runs through lm-eval with moejax as the model, unsteered
and steered, with per-item results kept; (4) OUT/steering.csv and OUT/summary.md: per task (language) the score
without and with steering, the difference, and a paired significance test over the items (McNemar's exact test on
0/1 metrics such as acc or exact_match, else a paired bootstrap of the mean difference), with the averages over
tasks; OUT/steering.png plots them. Without arguments it runs the built-in model on the bundled en/he/ja tasks in
a few minutes; that run proves nothing about real models (random weights score at chance).
"""

from __future__ import annotations

import argparse
import csv
import json
import math
import tempfile
from pathlib import Path

import numpy as np

from moejax.commands.experts import ExpertsSettings, find_experts
from moejax.evaluation import TASKS as TASK_DIR
from moejax.models.builtin import NAME as BUILTIN
from moejax.models.steering import Steering

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


def paired_bootstrap(before: np.ndarray, after: np.ndarray, seed: int = 0, draws: int = 10_000) -> float:
    """Two-sided bootstrap p-value of the mean paired difference (items resampled with replacement)."""
    diff = np.asarray(after, np.float64) - np.asarray(before, np.float64)
    if not diff.any():
        return 1.0
    means = np.random.default_rng(seed).choice(diff, (draws, len(diff)), replace=True).mean(axis=1)
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


def evaluate(model: str, tasks: list[str], include: list[str], steering: Steering | None, batch_size: int,
             limit: int | None, fewshot: int | None) -> dict:
    import lm_eval
    from lm_eval.tasks import TaskManager

    from moejax.evaluation.harness import MoejaxLM

    lm = MoejaxLM(pretrained=model, batch_size=batch_size, steering=steering)
    manager = TaskManager(include_path=[str(TASK_DIR), *include], verbosity="ERROR")
    return lm_eval.simple_evaluate(model=lm, tasks=tasks, task_manager=manager, log_samples=True, limit=limit,
                                   num_fewshot=fewshot, verbosity="ERROR")


def run(args) -> Path:
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory() as tmp:
        in_domain = args.in_domain
        if in_domain is None:  # the bundled English task's questions and answers, as in-task English text
            lines = [json.loads(line) for line in (TASK_DIR / "choice_en.jsonl").read_text().splitlines()]
            text = Path(tmp) / "in_domain_en.txt"
            text.write_text("\n".join(f"{d['question']} {d['choices'][d['answer']]}" for d in lines) + "\n")
            in_domain = f"task={text}"
        label, _, path = in_domain.partition("=")
        experts_out = find_experts(ExpertsSettings(model=args.model, target=(f"{label}={path}",),
                                                   baseline=args.baseline, tau=args.tau, layers=args.layers,
                                                   out=out / "experts", quiet=True))
    record = json.loads((experts_out / "experts.json").read_text())
    steering = Steering.from_experts(record, "soft", args.lam, "promote")
    print(f"{record['selected_count']} experts selected in MoE layers {record['window'][0]}-{record['window'][-1]}; "
          f"steering soft, lambda {args.lam}")
    tasks = args.tasks.split(",") if args.tasks else list(BUNDLED_TASKS)
    model = args.model or BUILTIN
    results = {name: evaluate(model, tasks, args.include_path, steer, args.batch_size, args.limit, args.num_fewshot)
               for name, steer in (("base", None), ("steered", steering))}
    rows = [paired_row(task, metric, name, item_scores(results["base"]["samples"][task], metric, name),
                       item_scores(results["steered"]["samples"][task], metric, name))
            for task in tasks for metric, name in metric_filters(results["base"]["results"][task])]
    with open(out / "steering.csv", "w", newline="", encoding="utf-8") as f:
        writer = csv.DictWriter(f, fieldnames=list(rows[0]))
        writer.writeheader()
        writer.writerows(rows)
    lines = ["# Router steering: scores without and with steering", "",
             f"Model: {model}. Experts: delta of {label} against {record['baseline']}, tau {args.tau}, MoE layers "
             f"{record['window'][0]}-{record['window'][-1]}, {record['selected_count']} selected; soft steering, "
             f"lambda {args.lam} (experts/ holds the selection).", "",
             "Each (metric, filter) lm-eval reports is scored and tested on its own (MGSM's strict-match and "
             "flexible-extract are two scores of the same items).", "",
             "| task | metric | filter | items | base | steered | difference | p (paired) |",
             "|---|---|---|---|---|---|---|---|"]
    for r in rows:
        lines.append(f"| {r['task']} | {r['metric']} | {r['filter']} | {r['items']} | {r['base']:.4f} | "
                     f"{r['steered']:.4f} | "
                     f"{r['difference']:+.4f} | {r['p_value']:.3g} ({r['test']}) |")
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
    (out / "summary.md").write_text("\n".join(lines) + "\n", encoding="utf-8")
    _figure(out / "steering.png", rows)
    print((out / "summary.md").read_text())
    return out


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


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", help="checkpoint directory with its tokenizer; default: the built-in model")
    parser.add_argument("--in-domain", metavar="LABEL=CORPUS",
                        help="English in-task text (a text file of sequences, JSONL of {'text'}, or a corpus moejax "
                        "analyze reads); default: the bundled English task's questions with their answers")
    parser.add_argument("--baseline", default="en=builtin", metavar="LABEL=CORPUS",
                        help="general-domain text of the same language (default: the built-in English sample)")
    parser.add_argument("--tau", type=float, help="delta threshold for selecting experts (default 0.3; 0.1 for the "
                        "built-in model, whose in-domain and general English differ little)")
    parser.add_argument("--layers", help="MoE-layer window, e.g. 7-34 (default: the middle half of the MoE layers)")
    parser.add_argument("--lam", type=float, default=0.5, help="soft steering strength lambda")
    parser.add_argument("--tasks", help="lm-eval tasks, comma-separated (default: the bundled en/he/ja choice tasks)")
    parser.add_argument("--include-path", action="append", default=[], help="a folder of task YAML (repeatable)")
    parser.add_argument("--num-fewshot", type=int)
    parser.add_argument("--limit", type=int)
    parser.add_argument("--batch-size", type=int, default=8)
    parser.add_argument("--out", default="steering-experiment", type=Path)
    args = parser.parse_args(argv)
    if args.tau is None:
        args.tau = 0.3 if args.model else 0.1
    if args.layers is None:
        from moejax.commands.analyze import load_model

        layers = len(load_model(args.model)[2].config.moe_layers)
        args.layers = f"{layers // 4}-{max(layers // 4, 3 * layers // 4 - 1)}"
    run(args)


if __name__ == "__main__":
    main()
