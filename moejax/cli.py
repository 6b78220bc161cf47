"""The `moejax` command line. `moejax analyze --help` and `moejax parity --help` list every option."""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import subprocess
import sys
from pathlib import Path

from moejax.data.corpus import FLORES_CODES


def _mesh(spec: str | None):
    if not spec:
        return None
    from moejax.parallel.mesh import make_mesh

    return make_mesh(spec)


class _HelpFormatter(argparse.ArgumentDefaultsHelpFormatter):
    """Shows defaults, except None ones (their help says what happens without the option)."""

    def _get_help_string(self, action):
        return action.help if action.default is None else super()._get_help_string(action)


MESH_HELP = ("run sharded over a device mesh, e.g. data=2,expert=4 (axes data, fsdp, expert, tensor; the product "
             "must not exceed the devices): parameters split by logical-axis rules, MoE blocks expert-parallel")


def _analyze(args) -> int:
    from moejax.routing.analyze import analyze

    exclude = [int(x) for x in args.exclude_ids.split(",") if x] if args.exclude_ids else []
    out = analyze(args.model or [None], args.langs.split(","), args.data, args.out, chunk_words=args.chunk_words,
                  mode=args.chunk_mode, batch_size=args.batch_size, probabilities=args.probabilities,
                  exclude_ids=exclude, seed=args.seed, show_progress=not args.quiet, mesh=_mesh(args.mesh))
    print(f"wrote {out}/report.md (tables: layers.csv, experts.csv, pairs.csv, lsi.csv; metrics.json; figures)")
    return 0


def _parity(args) -> int:
    from moejax.parity import TOLERANCES, parity, verdict_text

    if args.list_tolerances:
        for name, bounds in TOLERANCES.items():
            listed = (f"{k}={format(v, 'g')}" for k, v in vars(bounds).items() if v is not None)
            print(name, " ".join(listed))
        return 0
    if not args.model:
        raise ValueError("--model DIR is required")
    overrides = {}
    for item in args.tol:
        key, sep, value = item.partition("=")
        if not sep:
            raise ValueError(f"--tol {item!r}: expected NAME=VALUE, e.g. kl_mean=1e-3")
        try:
            overrides[key] = float(value)
        except ValueError:
            raise ValueError(f"--tol {item!r}: {value!r} is not a number") from None
    result = parity(args.model, args.out, text=args.text, langs=args.langs.split(",") if args.langs else None,
                    data=args.data, dtype=args.dtype, reference_dtype=args.reference_dtype, seq_len=args.seq_len,
                    batch_size=args.batch_size, max_tokens=args.max_tokens, tolerances=overrides,
                    dt_floor=args.dt_floor, show_progress=not args.quiet, mesh=_mesh(args.mesh))
    print(verdict_text(result))
    return 0 if result.passed else 1


def _convert(args) -> int:
    import jax.numpy as jnp

    from moejax.checkpoint import save_params
    from moejax.loading import from_pretrained

    dtype = {"float32": jnp.float32, "bfloat16": jnp.bfloat16}[args.dtype]
    model = from_pretrained(args.hf_dir, dtype=dtype, mesh=_mesh(args.mesh))
    out = save_params(model, args.hf_dir, args.out_dir)
    print(f"wrote {out} (Orbax; load with moejax.from_pretrained({str(out)!r}, mesh=...))")
    return 0


def _plan(args) -> int:
    from moejax.parallel.plan import NeedDevices, plan, plan_text, plan_train

    if not args.train and (args.remat != "none" or args.accum_steps != 1):
        raise ValueError("--remat and --accum-steps plan the train step: add --train")
    try:
        if args.train:
            result = plan_train(args.model, args.mesh, args.topology, batch=args.batch, seq=args.seq,
                                dtype=args.dtype, remat=args.remat, accum_steps=args.accum_steps)
        else:
            result = plan(args.model, args.mesh, args.topology, batch=args.batch, seq=args.seq, dtype=args.dtype)
    except NeedDevices as need:
        if os.environ.get("MOEJAX_PLAN_CHILD"):
            raise ValueError(f"needed {need.count} devices, found fewer after simulating them") from None
        # XLA reads the simulated device count when jax starts: rerun in a fresh process that sets it.
        env = dict(os.environ, MOEJAX_PLAN_CHILD="1",
                   XLA_FLAGS=f"{os.environ.get('XLA_FLAGS', '')} --xla_force_host_platform_device_count={need.count}",
                   JAX_PLATFORMS="cpu")
        return subprocess.run([sys.executable, "-m", "moejax.cli", *args.argv], env=env).returncode
    print(plan_text(result))
    if args.json:
        Path(args.json).write_text(json.dumps(result, indent=2))
    return 0 if result["fits"] is not False else 1


def _export(args) -> int:
    import jax.numpy as jnp

    from moejax.export import export_pretrained
    from moejax.loading import from_pretrained
    from moejax.training.run import is_run_checkpoint, restore_model

    dtype = {"float32": jnp.float32, "bfloat16": jnp.bfloat16}[args.dtype]
    if is_run_checkpoint(args.src):
        model, tokenizer_from = restore_model(args.src, dtype)
    else:
        model, tokenizer_from = from_pretrained(args.src, dtype=dtype), args.src
    out = export_pretrained(model, args.out_dir, tokenizer_from=tokenizer_from,
                            max_shard_bytes=int(args.max_shard_gb * 1024 ** 3))
    print(f"wrote {out} (Hugging Face layout: transformers.AutoModelForCausalLM.from_pretrained({str(out)!r}))")
    return 0


def parser() -> argparse.ArgumentParser:
    top = argparse.ArgumentParser(prog="moejax", description="MoE routing research in JAX: analysis of how "
                                  "Mixture-of-Experts routers spread each language's tokens over experts, and "
                                  "parity checks of moejax against the PyTorch reference on a checkpoint.")
    sub = top.add_subparsers(dest="command", required=True)
    a = sub.add_parser(
        "analyze", help="routing statistics, metrics, figures and a report for one or more models",
        description="Runs each model over each language's chunks of a parallel corpus, reduces the routing "
        "statistics inside the jitted forward pass and writes layers.csv, experts.csv, pairs.csv, lsi.csv, "
        "metrics.json, PNG figures and report.md to OUT. With no arguments: the built-in small model on the "
        "built-in English/Hebrew/Japanese sample corpus.",
        formatter_class=_HelpFormatter)
    a.add_argument("--model", action="append", metavar="[LABEL=]DIR",
                   help="Hugging Face checkpoint directory with its tokenizer, optionally labelled (repeat to compare "
                   "models, e.g. base=DIR1 cpt=DIR2); default: the built-in demonstration model")
    a.add_argument("--langs", default="en,he,ja",
                   help=f"comma-separated language codes; the reference is en if present, else the last. "
                   f"Known: {','.join(sorted(FLORES_CODES))}")
    a.add_argument("--data", metavar="CORPUS",
                   help="a FLORES-200 directory ({code}.dev/.devtest), a TSV (header of language codes) or JSONL "
                   "file with one column per language, or a directory of aligned {lang}.txt files; default: the "
                   "built-in sample corpus")
    a.add_argument("--out", default="moejax-analysis", help="output directory (replaced only when the run succeeds)")
    a.add_argument("--chunk-mode", choices=["paragraph", "sentence"], default="paragraph",
                   help="paragraph: consecutive sentences up to ~--chunk-words words; sentence: one sentence each")
    a.add_argument("--chunk-words", type=int, default=300, help="target words per paragraph chunk")
    a.add_argument("--batch-size", type=int, default=8, help="chunks per forward pass")
    a.add_argument("--probabilities", choices=["softmax", "native"], default="softmax",
                   help="P_t for the probability metrics: softmax of the raw logits (paper a), or the model's "
                   "native scores (sigmoid for Nemotron-H)")
    a.add_argument("--exclude-ids", default="",
                   help="extra token ids to exclude from every metric (e.g. chat-template tokens), comma-separated; "
                   "the tokenizer's special tokens are always excluded")
    a.add_argument("--seed", type=int, default=0, help="seed for same-language splits and token-pair sampling")
    a.add_argument("--mesh", metavar="AXIS=N,...", help=MESH_HELP)
    a.add_argument("--quiet", action="store_true", help="no progress bars")
    a.set_defaults(run=_analyze)

    from moejax.parity import Tolerances

    p = sub.add_parser(
        "parity", help="prove on a checkpoint that moejax computes what the transformers (PyTorch) model computes",
        description="Loads one Hugging Face checkpoint in moejax (on the JAX backend present) and in transformers "
        "(PyTorch, CPU, torch.no_grad), runs both on the same tokens and compares: per-token KL(reference || "
        "moejax) and top-1 agreement; per MoE layer the router logits, expert-set agreement (identical sets, "
        "Jaccard) and the usage entropy and Gini each side gives; per block the relative difference of the "
        "hidden states, to show where drift starts. Prints a verdict against tolerances (defaults per dtype, "
        "see --list-tolerances; override with --tol), writes summary.json, layers.csv, groups.csv and "
        "drift_per_layer.png to OUT, and exits 0 on pass, 1 when a tolerance fails, 2 on an error. "
        "Needs PyTorch (pip install -e '.[test]').",
        formatter_class=_HelpFormatter)
    p.add_argument("--model", metavar="DIR", help="Hugging Face checkpoint directory (config.json, safetensors, "
                   "tokenizer); qwen3_moe or nemotron_h")
    p.add_argument("--text", metavar="FILE", help="a UTF-8 text file, tokenised and cut into --seq-len sequences "
                   "(instead of --data)")
    p.add_argument("--langs", help="with --data: comma-separated language codes, each given an equal share of "
                   "--max-tokens (default en,he,ja)")
    p.add_argument("--data", metavar="CORPUS", help="a parallel corpus as for `moejax analyze` (FLORES-200 "
                   "directory, TSV, JSONL or {lang}.txt files); default, without --text: the built-in sample")
    p.add_argument("--dtype", default="auto", choices=["auto", "float32", "bfloat16", "float16"],
                   help="moejax's parameter and compute dtype; auto: the checkpoint's (config.json dtype)")
    p.add_argument("--reference-dtype", default="auto", choices=["auto", "float32", "bfloat16", "float16"],
                   help="the PyTorch model's dtype; auto: the checkpoint's, so a 30B bf16 model takes ~61 GB of "
                   "host memory rather than 122")
    p.add_argument("--seq-len", type=int, default=512, help="tokens per sequence at most")
    p.add_argument("--batch-size", type=int, default=4, help="sequences per forward pass")
    p.add_argument("--max-tokens", type=int, default=4096, help="tokens compared in all")
    p.add_argument("--tol", action="append", default=[], metavar="NAME=VALUE",
                   help="override one tolerance (repeatable), e.g. --tol kl_mean=1e-3; names: "
                   + ", ".join(f.name for f in dataclasses.fields(Tolerances)))
    p.add_argument("--list-tolerances", action="store_true", help="print the default tolerances per dtype and exit")
    p.add_argument("--dt-floor", choices=["time_step_min", "time_step_limit"], default="time_step_min",
                   help="Nemotron-H only: where moejax floors the Mamba-2 dt; time_step_min is what transformers' "
                   "PyTorch path does (moejax's own default is time_step_limit, see README)")
    p.add_argument("--mesh", metavar="AXIS=N,...", help=MESH_HELP + "; the reference stays on the CPU")
    p.add_argument("--out", default="moejax-parity", help="output directory (replaced only when the run succeeds)")
    p.add_argument("--quiet", action="store_true", help="no progress output")
    p.set_defaults(run=_parity)

    c = sub.add_parser(
        "convert", help="Hugging Face checkpoint -> Orbax (TensorStore) checkpoint for fast, resharded reloads",
        description="Reads HF_DIR (config.json + safetensors) and writes OUT_DIR: params/ (Orbax StandardCheckpointer, "
        "one TensorStore array per parameter), config.json and the tokenizer files, and moejax.json. "
        "moejax.from_pretrained(OUT_DIR, mesh=...) and every command's --model accept OUT_DIR and restore it "
        "onto any mesh. OUT_DIR is replaced only when the conversion completes.",
        formatter_class=_HelpFormatter)
    c.add_argument("hf_dir", metavar="HF_DIR", help="Hugging Face checkpoint directory")
    c.add_argument("out_dir", metavar="OUT_DIR", help="where to write the Orbax checkpoint")
    c.add_argument("--dtype", choices=["float32", "bfloat16"], default="bfloat16",
                   help="dtype of the stored parameters")
    c.add_argument("--mesh", metavar="AXIS=N,...", help="load (and write) sharded over this mesh, for models "
                   "larger than one device; " + MESH_HELP.split(": ", 1)[1])
    c.set_defaults(run=_convert)

    from moejax.parallel.plan import TOPOLOGIES

    pl = sub.add_parser(
        "plan", help="per-device memory of a full-size model on a TPU topology, from shapes alone",
        description="Compiles the full-size forward pass from shapes alone (no weights are read or made), sharded "
        "over the mesh on simulated CPU devices with the MoE blocks on the accelerator path, and prints the "
        "parameter count and bytes (total and per device) and XLA's per-device memory for the compiled program "
        "(outputs, temporaries), against the chip's HBM. Exit status 1 when it does not fit. The parameter bytes are "
        "exact; outputs and temporaries come from XLA's CPU compiler, compiled in float32 because it has no bfloat16 "
        "matmul and would keep float32 copies of every bfloat16 weight (a TPU does not), so for bfloat16 they are an "
        "upper bound, and either way an estimate of the TPU program's. With --train, the CPT train step instead "
        "(float32 master weights, AdamW mu and nu, load-balancing loss, compute in --dtype), compiled the same way "
        "in float32, plus the --dtype copy of the weights and the accelerator path's MoE rows kept for the "
        "backward pass, analytically.",
        formatter_class=_HelpFormatter)
    pl.add_argument("--model", required=True, help="qwen3-30b-a3b, nemotron-3-nano-30b-a3b, or a checkpoint "
                    "directory (only its config.json is read)")
    pl.add_argument("--mesh", metavar="AXIS=N,...", help="e.g. data=2,expert=4 (default with --topology: "
                    "expert=<chips>)")
    pl.add_argument("--topology", choices=sorted(TOPOLOGIES), help="TPU slice: sets the chip count the mesh must "
                    "use and the HBM per chip to compare with")
    pl.add_argument("--batch", type=int, default=8, help="sequences per step (global)")
    pl.add_argument("--seq", type=int, default=2048, help="tokens per sequence")
    pl.add_argument("--dtype", choices=["bfloat16", "float32"], default="bfloat16",
                    help="parameter dtype (with --train: the compute dtype; master weights are float32)")
    pl.add_argument("--train", action="store_true", help="plan the train step rather than the forward")
    pl.add_argument("--remat", choices=["none", "full", "dots"], default="none",
                    help="with --train: rematerialise each layer in the backward pass (full: everything; dots: "
                    "keep the dense matmuls' outputs)")
    pl.add_argument("--accum-steps", type=int, default=1, metavar="N",
                    help="with --train: split the batch into N micro-batches, gradients accumulated")
    pl.add_argument("--json", metavar="FILE", help="also write the plan as JSON")
    pl.set_defaults(run=_plan)

    x = sub.add_parser(
        "export", help="a moejax checkpoint (a training run's, Orbax from `moejax convert`, or Hugging Face) -> "
        "Hugging Face layout",
        description="Writes SRC's model as a Hugging Face checkpoint that transformers (and lm-eval-harness, vLLM) "
        "load: config.json, sharded model-XXXXX-of-YYYYY.safetensors with model.safetensors.index.json, "
        "per-expert tensor names, and SRC's tokenizer files. OUT_DIR is replaced only when the export completes.",
        formatter_class=_HelpFormatter)
    x.add_argument("src", metavar="SRC", help="a training run's checkpoint (RUN_DIR/checkpoint for its latest step, "
                   "RUN_DIR/checkpoint/STEP for another), an Orbax directory written by `moejax convert`, or a "
                   "Hugging Face checkpoint directory")
    x.add_argument("out_dir", metavar="OUT_DIR", help="where to write the Hugging Face checkpoint")
    x.add_argument("--dtype", choices=["float32", "bfloat16"], default="bfloat16", help="dtype of the written tensors")
    x.add_argument("--max-shard-gb", type=float, default=2.0, help="largest safetensors shard, GiB")
    x.set_defaults(run=_export)
    _train_parser(sub)
    top.subcommands = sub.choices
    return top


TRAIN_DEFAULTS = {"lr": "1e-5 (1e-3 for the built-in model)", "warmup_steps": "5%% of --steps",
                  "lb_coef": "the model's router_aux_loss_coef, else 1e-3", "dtype": "bfloat16 on an accelerator, "
                  "float32 on a CPU (XLA's CPU compiler has no fast bfloat16 matmul)"}


def _train_parser(sub) -> None:
    t = sub.add_parser(
        "train", help="continual pre-training (CPT) on a language mixture, resumable, with a load-balancing loss",
        description="Trains MODEL on a mixture of per-language corpora packed into fixed-length sequences, "
        "with next-token cross-entropy plus a load-balancing loss, AdamW (warmup + cosine) on float32 master "
        "weights, and writes OUT: Orbax checkpoints (every --save-every steps, the last --keep kept), "
        "metrics.csv (loss, aux loss, lr, grad norm, tokens/s, routing entropy per MoE layer and language), "
        "TensorBoard event files and training.png. Starting the same command again resumes from the last "
        "complete checkpoint, identically. With no arguments: the built-in small model on the built-in sample "
        "corpus (60% Hebrew, 40% English) for a few minutes on a CPU. Flags can also come from --config FILE "
        "(TOML or JSON, keys as the flags' names with underscores: lr = 3e-4); flags given on the command line "
        "win. Export the result with `moejax export OUT/checkpoint HF_DIR`. On Linux the command restarts "
        "itself once with GLIBC_TUNABLES=glibc.malloc.hugetlb=1 (transparent huge pages for malloc: ~20% "
        "faster steps on a CPU); MOEJAX_HUGE_PAGES=0 turns that off.",
        formatter_class=_HelpFormatter)
    t.add_argument("--config", metavar="FILE", help="TOML or JSON file of flag values")
    t.add_argument("--model", metavar="DIR", help="Hugging Face or `moejax convert` checkpoint directory "
                   "(default: the built-in small Qwen3-MoE over bytes)")
    t.add_argument("--data", metavar="LANG=PATH:RATIO,...", help="corpora and their share of the sequences, e.g. "
                   "he=he.txt:0.6,en=en.jsonl:0.4 (ratios sum to 1). PATH: .txt (a document per line), .jsonl "
                   "({\"text\": ...} per line), .npy (token ids, documents ended by the tokenizer's EOS) or .npz "
                   "(tokens + offsets). Default: the built-in sample corpus, he 0.6, en 0.4")
    t.add_argument("--eval-data", metavar="LANG=PATH,...", help="held-out text per language (same formats as --data, "
                   "no ratios): its cross-entropy goes to eval.csv before the first step and every --eval-every "
                   "steps, e.g. to watch English forgetting during Hebrew CPT")
    t.add_argument("--eval-every", type=int, default=0, help="steps between evaluations (needs --eval-data)")
    t.add_argument("--eval-batches", type=int, default=4, help="held-out batches per language per evaluation (the "
                   "same ones each time)")
    t.add_argument("--out", default="moejax-run", help="run directory (resumed when it holds this same run)")
    t.add_argument("--steps", type=int, default=300, help="optimizer steps")
    t.add_argument("--seq-len", type=int, default=256, help="tokens per packed sequence")
    t.add_argument("--batch-size", type=int, default=8, help="sequences per step (global, all micro-batches)")
    t.add_argument("--accum-steps", type=int, default=1, help="micro-batches per step (gradient accumulation)")
    t.add_argument("--lr", type=float, help=f"peak learning rate; default {TRAIN_DEFAULTS['lr']}")
    t.add_argument("--warmup-steps", type=int, help=f"linear warmup; default {TRAIN_DEFAULTS['warmup_steps']}")
    t.add_argument("--min-lr-ratio", type=float, default=0.1, help="the cosine decays to lr * this")
    t.add_argument("--weight-decay", type=float, default=0.1, help="AdamW decay, on weight matrices only")
    t.add_argument("--b1", type=float, default=0.9, help="AdamW beta1")
    t.add_argument("--b2", type=float, default=0.95, help="AdamW beta2")
    t.add_argument("--clip-norm", type=float, default=1.0, help="global gradient-norm clipping")
    t.add_argument("--lb-coef", type=float, help=f"load-balancing loss coefficient (0: off); default "
                   f"{TRAIN_DEFAULTS['lb_coef']}")
    t.add_argument("--z-coef", type=float, default=0.0, help="router z-loss coefficient")
    t.add_argument("--bias-update-rate", type=float, default=0.0, help="Nemotron-H aux-loss-free balancing: each "
                   "step moves every expert's e_score_correction_bias by this, up if under the layer's mean load, "
                   "down if over (0: off)")
    t.add_argument("--dtype", choices=["float32", "bfloat16"], help=f"compute dtype (master weights and AdamW "
                   f"state stay float32); default {TRAIN_DEFAULTS['dtype']}")
    t.add_argument("--trainable", metavar="REGEX", help="train only parameters whose path matches, e.g. "
                   "'mlp\\.experts\\.' (the rest frozen); default all")
    t.add_argument("--remat", choices=["none", "full", "dots"], default="none", help="recompute activations in the "
                   "backward pass: full keeps only each layer's input, dots keeps matmul outputs")
    t.add_argument("--mesh", help=MESH_HELP)
    t.add_argument("--seed", type=int, default=0, help="data order and mixture draws")
    t.add_argument("--save-every", type=int, default=100, help="checkpoint interval, steps (the last step is "
                   "always saved)")
    t.add_argument("--keep", type=int, default=3, help="checkpoints kept")
    t.add_argument("--quiet", action="store_true", help="no progress bar")
    t.set_defaults(run=_train)


def _train_settings(args):
    import jax

    from moejax.training.run import RunSettings
    from moejax.training.step import TrainConfig

    model_cfg = None
    if args.model:
        from moejax.loading import load_config

        model_cfg = load_config(args.model)
    lr = args.lr if args.lr is not None else (1e-5 if args.model else 1e-3)
    lb = args.lb_coef
    if lb is None:
        lb = getattr(model_cfg, "router_aux_loss_coef", None) or 1e-3
    dtype = args.dtype or ("float32" if jax.default_backend() == "cpu" else "bfloat16")
    warmup = args.warmup_steps if args.warmup_steps is not None else max(1, args.steps // 20)
    train = TrainConfig(learning_rate=lr, warmup_steps=warmup, total_steps=args.steps,
                        min_lr_ratio=args.min_lr_ratio, weight_decay=args.weight_decay, b1=args.b1, b2=args.b2,
                        clip_norm=args.clip_norm, lb_coef=lb, z_coef=args.z_coef,
                        bias_update_rate=args.bias_update_rate, compute_dtype=dtype, trainable=args.trainable,
                        remat=args.remat, accum_steps=args.accum_steps)
    model = str(Path(args.model).absolute()) if args.model else None
    return RunSettings(model=model, data=args.data, steps=args.steps, seq_len=args.seq_len, batch_size=args.batch_size,
                       seed=args.seed, save_every=args.save_every, keep=args.keep, mesh=args.mesh, train=train,
                       eval_data=args.eval_data, eval_every=args.eval_every, eval_batches=args.eval_batches)


def _train(args) -> int:
    from moejax.training.run import train

    out = train(_train_settings(args), args.out, show_progress=not args.quiet)
    print(f"wrote {out} (metrics.csv, tensorboard/, training.png; export: moejax export {out}/checkpoint HF_DIR)")
    return 0


def _with_config_file(top: argparse.ArgumentParser, argv: list[str] | None) -> argparse.Namespace:
    """Parses argv; for `train --config FILE`, FILE's values become the defaults the command line overrides."""
    import tomllib

    args = top.parse_args(argv)

    path = Path(args.config)
    try:
        text = path.read_text(encoding="utf-8")
        values = json.loads(text) if path.suffix == ".json" else tomllib.loads(text)
    except (OSError, UnicodeDecodeError, json.JSONDecodeError, tomllib.TOMLDecodeError) as e:
        raise ValueError(f"--config {path}: cannot read it ({e})") from None
    sub = top.subcommands["train"]
    known = set(vars(sub.parse_args([]))) - {"config", "run"}
    unknown = sorted(set(values) - known)
    if unknown:
        raise ValueError(f"--config {path}: unknown field(s) {unknown}; known: {sorted(known)}")
    sub.set_defaults(**values)
    return top.parse_args(argv)


def _compilation_cache() -> None:
    """XLA's persistent compilation cache for the commands (e.g. ~7 s -> ~2.5 s to a Nemotron-H benchmark
    model's first forward on a CPU): $MOEJAX_COMPILATION_CACHE, default ~/.cache/moejax/xla; empty: off."""
    import jax

    where = os.environ.get("MOEJAX_COMPILATION_CACHE", str(Path.home() / ".cache" / "moejax" / "xla"))
    if where and jax.config.jax_compilation_cache_dir is None:
        jax.config.update("jax_compilation_cache_dir", where)


HUGE_PAGES = "glibc.malloc.hugetlb=1"


def with_huge_pages() -> None:
    """Re-executes this process with glibc's malloc asking for transparent huge pages, unless it already does
    or $MOEJAX_HUGE_PAGES is 0. XLA on a CPU allocates each step's large temporaries afresh, and on a kernel
    whose THP mode is `madvise` every 4 KiB page of them faults in: huge pages make a bench-model train step
    ~20% faster (README, Performance). glibc reads its tunables only at start-up, hence the exec; a glibc
    without the tunable ignores it."""
    tunables = os.environ.get("GLIBC_TUNABLES", "")
    if sys.platform != "linux" or HUGE_PAGES in tunables or os.environ.get("MOEJAX_HUGE_PAGES") == "0":
        return
    env = {**os.environ, "GLIBC_TUNABLES": f"{tunables}:{HUGE_PAGES}" if tunables else HUGE_PAGES}
    sys.stdout.flush()
    os.execve(sys.executable, sys.orig_argv, env)


def main(argv: list[str] | None = None) -> int:
    from_command_line = argv is None
    argv = sys.argv[1:] if argv is None else list(argv)
    top = parser()
    args = top.parse_args(argv)
    args.argv = argv
    if from_command_line and args.command == "train":
        with_huge_pages()
    _compilation_cache()
    if os.environ.get("MOEJAX_DISTRIBUTED"):  # one process per host of a TPU pod (tpu/launch.py sets it)
        import jax

        jax.distributed.initialize()
    try:
        if getattr(args, "config", None) is not None:
            args = _with_config_file(top, argv)
            args.argv = argv
        return args.run(args)
    except (ValueError, OSError) as e:
        print(f"moejax {args.command}: error: {e}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
