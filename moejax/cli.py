"""The `moejax` command line: arguments -> a command's settings -> the command; errors -> exit codes.

Exit status: 0 success, 1 a check that ran and failed (a parity tolerance, a plan that does not fit), 2 bad
input or environment (a MoejaxError, a file that cannot be read or written), with one line naming what and where.
Every option, its default and its check live in the command's settings dataclass (moejax/commands/).
"""

from __future__ import annotations

import argparse
import json
import os
import sys

from moejax.commands import analyze, convert, evaluate, experts, export, generate, parity, plan, train
from moejax.commands.options import add_options, from_mapping
from moejax.errors import MoejaxError
from moejax.io import write_file
from moejax.process import compilation_cache_dir, with_huge_pages

DESCRIPTIONS = {
    "analyze": ("routing statistics, metrics, figures and a report for one or more models",
                "Runs each model over each language's chunks of a parallel corpus, reduces the routing statistics "
                "inside the jitted forward pass and writes layers.csv, experts.csv, pairs.csv, lsi.csv, metrics.json, "
                "PNG figures and report.md to OUT. With no arguments: the built-in small model on the built-in "
                "English/Hebrew/Japanese sample corpus."),
    "parity": ("prove on a checkpoint that moejax computes what the transformers (PyTorch) model computes",
               "Loads one Hugging Face checkpoint in moejax (on the JAX backend present) and in transformers "
               "(PyTorch, CPU, torch.no_grad), runs both on the same tokens and judges moejax in two parts. The "
               "implementation check, in float32 whatever --dtype: each block alone on the reference's own input "
               "to it, and the head on its last block output, at bounds of ~1e-5 (a wrong moejax fails it even in "
               "bfloat16). End to end in moejax's dtype: per-token KL, logits and top-1; per MoE layer the router "
               "logits and the expert sets, where a flip counts only if proven a near tie on the reference's "
               "selection scores (then forced, so every later token stays compared like for like); per block the "
               "hidden states, to show where drift starts; in float32 against fixed bounds, in 16 bits at the "
               "mean, median, p99 and max against transformers' own 16-bit error (docs/parity.md). Writes "
               "summary.json, layers.csv, groups.csv, flips.csv and drift_per_layer.png to OUT and exits 0 on "
               "pass, 1 when a check fails, 2 on an error. Needs PyTorch (pip install -e '.[test]')."),
    "convert": ("Hugging Face checkpoint -> Orbax (TensorStore) checkpoint for fast, resharded reloads",
                "Reads HF_DIR (config.json + safetensors) and writes OUT_DIR: params/ (Orbax StandardCheckpointer, "
                "one TensorStore array per parameter), config.json and the tokenizer files, and moejax.json. "
                "moejax.from_pretrained(OUT_DIR, mesh=...) and every command's --model accept OUT_DIR and restore "
                "it onto any mesh. OUT_DIR is replaced only when the conversion completes."),
    "export": ("a moejax checkpoint (a training run's, Orbax from `moejax convert`, or Hugging Face) -> Hugging Face "
               "layout",
               "Writes SRC's model as a Hugging Face checkpoint that transformers (and lm-eval-harness, vLLM) load: "
               "config.json, sharded model-XXXXX-of-YYYYY.safetensors with model.safetensors.index.json, per-expert "
               "tensor names, and SRC's tokenizer files. OUT_DIR is replaced only when the export completes."),
    "plan": ("per-device memory of a full-size model on a TPU topology, from shapes alone",
             "Compiles the full-size forward pass from shapes alone (no weights are read or made), sharded over the "
             "mesh on simulated CPU devices with the MoE blocks on the accelerator path, and prints the parameter "
             "count and bytes (total and per device) and XLA's per-device memory for the compiled program "
             "(outputs, temporaries), against the chip's HBM. Exit status 1 when it does not fit. The parameter "
             "bytes are exact; outputs and temporaries come from XLA's CPU compiler, compiled in float32 because it "
             "has no bfloat16 matmul and would keep float32 copies of every bfloat16 weight (a TPU does not), so "
             "for bfloat16 they are an upper bound, and either way an estimate of the TPU program's. With --train, "
             "the CPT train step instead (float32 master weights, AdamW mu and nu, load-balancing loss, compute in "
             "--dtype), compiled the same way in float32, plus the --dtype copy of the weights and the accelerator "
             "path's MoE rows kept for the backward pass, analytically."),
    "train": ("continual pre-training (CPT) on a language mixture, resumable, with a load-balancing loss",
              "Trains MODEL on a mixture of per-language corpora packed into fixed-length sequences, with "
              "next-token cross-entropy plus a load-balancing loss, AdamW (warmup + cosine) on float32 master "
              "weights, and writes OUT: Orbax checkpoints (every --save-every steps, the last --keep kept), "
              "metrics.csv (loss, aux loss, lr, grad norm, tokens/s, routing entropy per MoE layer and language), "
              "TensorBoard event files and training.png. Starting the same command again resumes from the last "
              "complete checkpoint, identically. With no arguments: the built-in small model on the built-in sample "
              "corpus (60% Hebrew, 40% English) for a few minutes on a CPU. Settings can also come from --config "
              "FILE (TOML or JSON, keys as the flags' names with underscores: lr = 3e-4); flags given on the "
              "command line win. Export the result with `moejax export OUT/checkpoint HF_DIR`. On Linux the "
              "command restarts itself once with GLIBC_TUNABLES=glibc.malloc.hugetlb=1 (transparent huge pages "
              "for malloc: ~20% faster steps on a CPU); MOEJAX_HUGE_PAGES=0 turns that off."),
    "generate": ("continue prompts with a checkpoint (greedy or sampled), with KV and Mamba-2 caches",
                 "Loads MODEL (or the built-in model) and its tokenizer, continues each prompt (--prompt TEXT, or "
                 "--prompts FILE with one per line) by up to --max-new-tokens tokens, stopping at the checkpoint's "
                 "end-of-sequence ids (generation_config.json, else config.json), and prints the continuations "
                 "(--out FILE also writes them as JSON). Greedy by default; --sample draws with --temperature, "
                 "--top-k and --top-p, reproducibly from --seed. --chat wraps each prompt in the model's own chat "
                 "template. Prompts of a batch are left-padded as transformers' generate pads them; the prompt is "
                 "run once (prefill) and each new token is one compiled step over the caches."),
    "eval": ("downstream scores through lm-evaluation-harness, offline, with moejax underneath",
             "Scores MODEL (or the built-in model) on lm-eval tasks with moejax as the model (the same backend as "
             "`lm_eval --model moejax`): loglikelihood requests packed into rows (identical inputs run once), "
             "rolling loglikelihoods in lm-eval's windows, generation with caches. Writes OUT: lm-eval's results "
             "and per-sample files (as `lm_eval --output_path` writes them), scores.csv (one row per task, language "
             "and metric) and scores.png. Nothing reaches the network: tasks must read local files (the bundled "
             "moejax_* tasks, or your YAML under --include-path with dataset_path: json and local data_files). "
             "With no arguments: the built-in model on the bundled suite (multiple choice and short generation in "
             "en/he/ja, tag moejax_demo), about a minute on a CPU. Needs the eval extra: pip install -e '.[eval]'."),
    "experts": ("find the experts a corpus uses more than a baseline (to steer or train them)",
                "Runs --target and --baseline corpora through MODEL (or the built-in model) with the in-jit routing "
                "statistics (per-sequence top-K counts) and selects experts: delta (activation frequency difference "
                "above --tau in a --layers window), risk-diff (SteerMoE's pooled risk difference, top --top-n), or "
                "gap (the usage lead over the next language, plus shared experts). Writes OUT: experts.json (per MoE "
                "layer: selected ids and scores, with the settings; `--steering` takes it once a mode, lambda and "
                "direction are added), experts.csv (every expert's score), experts_scores.png, experts_selected.png "
                "and report.md. With no arguments: Hebrew against English on the built-in corpus and model."),
}
SETTINGS = {"analyze": analyze.AnalyzeSettings, "parity": parity.ParitySettings, "convert": convert.ConvertSettings,
            "export": export.ExportSettings, "plan": plan.PlanSettings, "train": train.TrainSettings,
            "generate": generate.GenerateSettings, "eval": evaluate.EvalSettings,
            "experts": experts.ExpertsSettings}


def parser() -> argparse.ArgumentParser:
    top = argparse.ArgumentParser(prog="moejax", description="MoE routing research in JAX: analysis of how "
                                  "Mixture-of-Experts routers spread each language's tokens over experts, parity "
                                  "checks against the PyTorch reference, scale-out, continual pre-training, generation "
                                  "and downstream evaluation.")
    sub = top.add_subparsers(dest="command", required=True)
    for name, settings_cls in SETTINGS.items():
        short, long = DESCRIPTIONS[name]
        command = sub.add_parser(name, help=short, description=long.replace("%", "%%"))
        add_options(command, settings_cls)
        if name == "train":
            command.add_argument("--config", metavar="FILE", default=argparse.SUPPRESS,
                                 help="TOML or JSON file of settings; flags given on the command line win")
    return top


def settings_from(args: argparse.Namespace):
    """The command's settings from the flags given (the dataclass supplies every default)."""
    given = {k: v for k, v in vars(args).items() if k not in ("command", "config")}
    if "config" in args:
        return train.TrainSettings.from_file(args.config, **given)
    return from_mapping(SETTINGS[args.command], given)


def run(command: str, settings) -> int:
    """Runs a command; prints what it wrote or found; returns the exit status."""
    if command == "analyze":
        out = analyze.analyze(settings)
        print(f"wrote {out}/report.md (tables: layers.csv, experts.csv, pairs.csv, lsi.csv; metrics.json; figures)")
    elif command == "parity":
        if settings.list_tolerances:
            print(parity.tolerance_listing())
            return 0
        result = parity.parity(settings)
        print(parity.verdict_text(result))
        return 0 if result.passed else 1
    elif command == "convert":
        out = convert.convert(settings)
        print(f"wrote {out} (Orbax; load with moejax.from_pretrained({str(out)!r}, mesh=...))")
    elif command == "export":
        out = export.export(settings)
        print(f"wrote {out} (Hugging Face layout: transformers.AutoModelForCausalLM.from_pretrained({str(out)!r}))")
    elif command == "plan":
        result = plan.plan(settings)
        print(plan.plan_text(result))
        if settings.json:
            write_file(settings.json, json.dumps({"written_by": "moejax plan", **result}, indent=2), "plan", "--json")
        return 0 if result["fits"] is not False else 1
    elif command == "generate":
        results = generate.generate(settings)
        for i, result in enumerate(results if not settings.streaming else (), 1):  # streamed: printed already
            print(f"[{i}] {result['prompt']}\n{result['continuation']}\n")
        if settings.out:
            print(f"wrote {settings.out}")
    elif command == "experts":
        print(experts.main_summary(experts.find_experts(settings)))
    elif command == "eval":
        from lm_eval.utils import make_table

        out, results = evaluate.evaluate(settings)
        print(make_table(results))
        print(f"wrote {out} (scores.csv, scores.png, lm-eval's results and samples)")
    else:
        out = train.train(settings)
        print(f"wrote {out} (metrics.csv, tensorboard/, training.png; export: moejax export {out}/checkpoint HF_DIR)")
    return 0


def main(argv: list[str] | None = None) -> int:
    """Parses and checks the arguments before JAX (or anything heavy) is imported, so a bad flag fails in a moment;
    then runs the command."""
    from_command_line = argv is None
    argv = sys.argv[1:] if argv is None else list(argv)
    try:
        args = parser().parse_args(argv)
    except SystemExit as e:  # argparse's own errors (exit 2) and --help (exit 0)
        return int(e.code or 0)
    try:
        settings = settings_from(args)
    except (MoejaxError, OSError) as e:
        print(f"moejax {args.command}: error: {e}", file=sys.stderr)
        return 2
    if from_command_line and args.command == "train":
        with_huge_pages()
    import jax

    cache = compilation_cache_dir()
    if cache and jax.config.jax_compilation_cache_dir is None:
        jax.config.update("jax_compilation_cache_dir", cache)
    if os.environ.get("MOEJAX_DISTRIBUTED"):  # one process per host of a TPU pod (tpu/launch.py sets it)
        jax.distributed.initialize()
    try:
        return run(args.command, settings)
    except (MoejaxError, OSError) as e:
        print(f"moejax {args.command}: error: {e}", file=sys.stderr)
        return 2
