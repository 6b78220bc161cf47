"""A multiple-choice task through lm-evaluation-harness: `--model moejax` against `--model hf` (transformers, PyTorch
eager), same checkpoint, same machine, same run.

    python benchmarks/bench_eval.py                         # both bench models, 120 questions x 4 choices
    python benchmarks/bench_eval.py --arch qwen3_moe --questions 40 --repeats 1   # a quick look
    python benchmarks/bench_eval.py --json eval.json     # also the numbers, machine-readable

The task is written here, offline, from the bundled en/he/ja sample corpus: each question is the first half of a
sentence and its choices are that sentence's second half and the second halves of three other sentences of the same
language (480 loglikelihood requests by default). Both backends load one checkpoint written by save_pretrained with
every weight random (the forward benchmark's models) and its byte-level tokenizer, run float32 with the same batch
size and context length, and must give the same accuracy (the benchmark also reports the largest loglikelihood
difference). Reported per side: the evaluation after one warm-up run on a few questions (moejax compiles there; it
compiles one program per packed-row shape), best of --repeats runs alternating between the sides, requests/s, and
the first (cold) run. Target: >= 2x requests/s.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import tempfile
import time
from pathlib import Path

import lm_eval
import numpy as np
import torch
import transformers
from bench_forward import CONFIGS
from bench_load import cpu_model
from lm_eval.models.huggingface import HFLM
from lm_eval.tasks import TaskManager

from moejax.data.corpus import SAMPLE_DIR
from moejax.evaluation.harness import MoejaxLM
from moejax.parity.fixtures import randomize, save_byte_tokenizer

OVERRIDES = {"qwen3_moe": {}, "nemotron_h": {"dt_floor": "time_step_min"}}  # transformers' Mamba-2 dt floor
TASK = """task: bench_choice
dataset_path: json
test_split: train
dataset_kwargs:
  data_files: {file}
output_type: multiple_choice
doc_to_text: "{{{{question}}}}"
doc_to_choice: "{{{{choices}}}}"
doc_to_target: answer
metric_list:
  - metric: acc
  - metric: acc_norm
"""


def write_task(folder: Path, questions: int) -> None:
    rng = np.random.default_rng(0)
    docs = []
    for lang in ("en", "he", "ja"):
        sentences = [s for s in (SAMPLE_DIR / f"{lang}.txt").read_text(encoding="utf-8").splitlines() if len(s) > 20]
        cut = [len(s) // 2 for s in sentences]
        for index in rng.permutation(len(sentences))[:questions // 3 + (lang == "en") * (questions % 3)]:
            others = rng.choice([i for i in range(len(sentences)) if i != index], 3, replace=False)
            choices = [sentences[i][cut[i]:] for i in [index, *others]]
            order = rng.permutation(4)
            docs.append({"question": sentences[index][:cut[index]], "choices": [choices[i] for i in order],
                         "answer": int(np.argmin(order))})
    (folder / "choice.jsonl").write_text("".join(json.dumps(d, ensure_ascii=False) + "\n" for d in docs),
                                         encoding="utf-8")
    (folder / "bench_choice.yaml").write_text(TASK.format(file=folder / "choice.jsonl"), encoding="utf-8")


def evaluate(lm, tasks: TaskManager, limit: int | None):
    start = time.perf_counter()
    out = lm_eval.simple_evaluate(model=lm, tasks=["bench_choice"], task_manager=tasks, limit=limit,
                                  log_samples=True, verbosity="ERROR")
    return time.perf_counter() - start, out


def bench(arch: str, args) -> dict:
    cfg = CONFIGS[arch]
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        write_task(root, args.questions)
        tasks = TaskManager(include_path=str(root), verbosity="ERROR")
        torch.manual_seed(0)
        reference = randomize(transformers.AutoModelForCausalLM.from_config(cfg), 0).eval()
        reference.save_pretrained(root / "model")
        save_byte_tokenizer(root / "model")
        common = {"pretrained": str(root / "model"), "batch_size": args.batch, "max_length": args.context}
        sides = {"hf": HFLM(**common, dtype="float32", device="cpu"),
                 "moejax": MoejaxLM(**common, dtype="float32", **OVERRIDES[arch])}
        cold = {name: evaluate(lm, tasks, 6)[0] for name, lm in sides.items()}
        # The sides alternate, so that a busy spell of the machine does not fall on one side only.
        runs = {name: [] for name in sides}
        for _ in range(args.repeats):
            for name, lm in sides.items():
                time.sleep(1.0)
                runs[name].append(evaluate(lm, tasks, None))
        results = {name: (cold[name], *min(runs[name], key=lambda run: run[0])) for name in sides}
    requests = {name: sum(len(s["resps"]) for s in out["samples"]["bench_choice"])
                for name, (_, _, out) in results.items()}
    loglik = {name: np.array([r[0][0] for s in out["samples"]["bench_choice"] for r in s["resps"]])
              for name, (_, _, out) in results.items()}
    acc = {name: out["results"]["bench_choice"]["acc,none"] for name, (_, _, out) in results.items()}
    print(f"{arch} lm-eval multiple choice, {requests['moejax']} loglikelihood requests ({args.questions} questions, "
          f"en/he/ja), batch {args.batch}, context {args.context}, float32, {os.cpu_count()} CPU threads, "
          f"CPU: {cpu_model()}, lm-eval {lm_eval.__version__}, transformers {transformers.__version__}, "
          f"torch {torch.__version__}")
    for name, (cold_s, warm_s, _) in results.items():
        print(f"  {name:7s} {warm_s:7.2f} s  {requests[name] / warm_s:7.1f} requests/s | first run on 6 questions "
              f"{cold_s:5.1f} s | acc {acc[name]:.4f}")
    print(f"  speed-up: {results['hf'][1] / results['moejax'][1]:.2f}x requests/s (target >= 2x); same accuracy: "
          f"{'yes' if acc['hf'] == acc['moejax'] else 'NO'}; largest loglikelihood difference "
          f"{np.abs(loglik['hf'] - loglik['moejax']).max():.1e}")
    return {"requests": requests["moejax"], "same_accuracy": acc["hf"] == acc["moejax"],
            "largest_loglikelihood_difference": float(np.abs(loglik["hf"] - loglik["moejax"]).max()),
            **{name: {"seconds": warm_s, "first_run_s": cold_s, "acc": acc[name]}
               for name, (cold_s, warm_s, _) in results.items()}}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--arch", choices=[*CONFIGS, "all"], default="all")
    parser.add_argument("--questions", type=int, default=120, help="questions, split over en/he/ja; 4 choices each")
    parser.add_argument("--batch", type=int, default=8, help="both backends' batch_size")
    parser.add_argument("--context", type=int, default=256, help="both backends' max_length")
    parser.add_argument("--repeats", type=int, default=2, help="timed evaluations per side; the best is reported")
    parser.add_argument("--json", type=Path, help="also write the measured seconds and the speed-ups here")
    args = parser.parse_args()
    torch.set_num_threads(os.cpu_count())
    logging.getLogger("lm-eval").setLevel(logging.ERROR)
    results = {arch: bench(arch, args) for arch in (CONFIGS if args.arch == "all" else [args.arch])}
    if args.json:
        ratios = {arch: r["hf"]["seconds"] / r["moejax"]["seconds"] for arch, r in results.items()}
        args.json.write_text(json.dumps({"results": results, "ratios": ratios}, indent=2))


if __name__ == "__main__":
    main()
