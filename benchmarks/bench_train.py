"""Train-step throughput: moejax (one jitted step) vs transformers + torch (eager), same weights, same batch,
AdamW and the load-balancing loss on both sides, in one run; with model FLOPs utilisation (MFU) against each
framework's dense-matmul FLOP/s measured in the same run.

    python benchmarks/bench_train.py                              # Qwen3-MoE bench model, batch 4 x 256, float32
    python benchmarks/bench_train.py --dtype bfloat16             # bf16 compute, float32 master weights
    python benchmarks/bench_train.py --arch nemotron_h --remat dots --json      # the results as one JSON line
    python benchmarks/bench_train.py --json train.json             # or written to a file

The model is bench_forward.py's, every weight random, written by save_pretrained and loaded from that
directory by both sides, in float32. One step, each side:
- moejax: `make_train_step` (moejax/training/step.py): next-token loss + lb_coef * balance loss,
  global-norm clipping at 1.0, AdamW (b1 0.9, b2 0.95, decay 0.1 on weight matrices), compute in --dtype
  from float32 master weights, --remat as given.
- torch: `model(input_ids, labels=input_ids, output_router_logits=True)`, whose loss already holds
  router_aux_loss_coef (set to lb_coef) * aux_loss, backward, `clip_grad_norm_(1.0)`, `torch.optim.AdamW`
  (same betas and decay, on every parameter), `zero_grad`. --dtype bfloat16 runs the forward under
  `torch.autocast("cpu", torch.bfloat16)`, the usual way to train in bf16 with torch: float32 weights,
  gradients and optimizer, nn.Linear in bf16 (transformers' grouped_mm experts are not on autocast's list:
  Qwen3-MoE's stay float32, being fed by a float32 norm); backward follows the forward's dtypes.
  transformers' Nemotron-H computes no auxiliary loss (its CausalLM forward never does), so for nemotron_h
  the torch side trains on the cross-entropy alone while moejax still computes and adds its sequence-wise
  balance loss: the comparison then slightly favours torch.

Like `moejax train`, the benchmark re-executes itself with glibc's malloc asking for transparent huge
pages (moejax.process.with_huge_pages: GLIBC_TUNABLES=glibc.malloc.hugetlb=1), for both sides, since they share
the process; --no-huge-pages keeps the default allocator, and the report says which ran.

The sides run one after the other (torch first, then its model and optimizer are freed), not alternated
like bench_forward.py: each holds weights, gradients and AdamW state (~7 GB here, ~12 GB for moejax, whose
step keeps the old state until the new one is returned), too much for both at once on a small machine.
Each side runs --warmup steps, then --steps timed ones; the best is reported (time.perf_counter, moejax
waiting on the new state with jax.block_until_ready). moejax's warm-up steps are timed and printed: the first
compiles, and any later one as slow as it compiled again (a cache miss on the state it was given).

How to read the output:
- "step 1": the cross-entropy and balance loss of each side's first step, same weights and batch. In
  float32 they must agree to 1e-4 (relative) or the run stops: otherwise the two sides are not
  training the same objective and the throughput ratio means nothing.
- per side: seconds per step, tokens/s (batch * seq / step), MFU = model FLOP/s over that framework's
  dense-matmul FLOP/s (a square 2048 matmul, jitted jnp.dot or torch's F.linear, best of 5, timed just
  before that side's steps; with --dtype bfloat16 the faster of bf16 and float32, since part of each step
  runs in float32 and, on a CPU without native bf16, float32 is often the faster), and the 1-minute load
  average after the steps: on a shared machine the sides do not run under the same load, and a side timed
  under a higher one was at a disadvantage (torch's OpenMP threads suffer most from oversubscription).
- model FLOPs per step = 3 x forward (backward = 2 x forward), the forward counting 2 FLOPs per
  multiply-add of the parameters each token touches (attention projections, router, its top-k experts,
  shared expert and latent projections, dense MLPs, Mamba in/out projections, lm_head) plus the attention
  scores and weighted sum over the full sequence (2 * 2 * seq * heads * head_dim per token and attention
  layer; not halved for the causal mask, PaLM's convention). Not counted: norms, activations, rotary
  embeddings, routing and dispatch, Mamba's conv and SSD scan, the optimizer. Recomputation from --remat
  is not model FLOPs either, so remat lowers MFU.
- the speed-up is moejax tokens/s over torch tokens/s, against the issue's target (>= 1.5x).
"""

from __future__ import annotations

import argparse
import gc
import json
import math
import os
import sys
import tempfile
import time
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import torch
import transformers
from bench_forward import CONFIGS, best_time

import moejax
from moejax.models.nemotron_h import NemotronHConfig
from moejax.models.qwen3_moe import Qwen3MoeConfig
from moejax.parity.fixtures import randomize
from moejax.process import HUGE_PAGES, with_huge_pages
from moejax.training.config import TrainConfig
from moejax.training.step import init_state, make_train_step

LB_COEF = 1e-2
LEARNING_RATE = 1e-4
TARGET = 1.5
MATMUL_SIZE = 2048
LOSS_RTOL = 1e-4  # float32, same weights and batch: the two losses differ only by summation order


def forward_flops_per_token(config: Qwen3MoeConfig | NemotronHConfig, seq: int) -> int:
    """Matmul FLOPs of one token's forward pass over a sequence of `seq` tokens (see the module docstring)."""
    d, h = config.hidden_size, config.head_dim
    projections = d * h * (2 * config.num_attention_heads + 2 * config.num_key_value_heads)  # q, k, v, o
    scores = 2 * seq * config.num_attention_heads * h  # q.k and the weighted sum of v, full sequence
    attention = projections + scores
    if isinstance(config, Qwen3MoeConfig):
        per_kind = {"moe": d * config.num_experts + config.num_experts_per_tok * 3 * d * config.moe_intermediate_size,
                    "mlp": 3 * d * config.intermediate_size}
        blocks = [attention + per_kind[kind] for kind in config.layer_kinds]
    else:
        inner = config.mamba_num_heads * config.mamba_head_dim
        in_proj = d * (2 * inner + 2 * config.n_groups * config.ssm_state_size + config.mamba_num_heads)
        latent = config.moe_latent_size
        routed = config.num_experts_per_tok * 2 * (latent or d) * config.moe_intermediate_size  # up, down
        per_kind = {
            "mamba": in_proj + inner * d,
            "attention": attention,
            "moe": d * config.n_routed_experts + routed + 2 * d * config.moe_shared_expert_intermediate_size
            + (2 * d * latent if latent else 0),
            "mlp": 2 * d * config.intermediate_size,
        }
        blocks = [per_kind[kind] for kind in config.layer_kinds]
    return 2 * (sum(blocks) + d * config.vocab_size)


def train_flops(config: Qwen3MoeConfig | NemotronHConfig, batch: int, seq: int) -> int:
    """Model FLOPs of one train step on [batch, seq] tokens: 3 x the forward's (backward = 2 x forward)."""
    return 3 * batch * seq * forward_flops_per_token(config, seq)


def jax_matmul_flops(dtype: str, repeats: int = 5) -> float:
    """FLOP/s of a jitted square matmul in `dtype`, best of `repeats`."""
    a, b = (jax.random.normal(jax.random.key(i), (MATMUL_SIZE, MATMUL_SIZE), dtype) for i in range(2))
    dot = jax.jit(jnp.dot)
    jax.block_until_ready(dot(a, b))
    seconds = best_time(lambda: jax.block_until_ready(dot(a, b)), repeats)
    return 2 * MATMUL_SIZE**3 / seconds


def torch_matmul_flops(dtype: str, repeats: int = 5) -> float:
    """FLOP/s of a square matmul in `dtype` through F.linear (nn.Linear's call), best of `repeats`.

    Not torch.mm: on a CPU without native bf16 (AVX2), torch.mm in bfloat16 takes a reference path at
    ~1 GFLOP/s (a minute per 2048 matmul) while F.linear goes through oneDNN at ~15; in float32 the two
    are the same MKL call. The faster one is torch's attainable rate, so MFU is not flattered."""
    a, b = (torch.randn(MATMUL_SIZE, MATMUL_SIZE, dtype=getattr(torch, dtype)) for _ in range(2))
    torch.nn.functional.linear(a, b)
    return 2 * MATMUL_SIZE**3 / best_time(lambda: torch.nn.functional.linear(a, b), repeats)


def run_torch(directory: str, ids: np.ndarray, args) -> dict:
    """transformers + torch.optim.AdamW: first-step losses and the best step time."""
    with_aux = args.arch == "qwen3_moe"
    coef = {"router_aux_loss_coef": LB_COEF} if with_aux else {}
    model = transformers.AutoModelForCausalLM.from_pretrained(directory, dtype=torch.float32, **coef)
    model.train()
    if args.selection:  # the experts tensors of the selected layers train; a hook zeroes the other experts' rows
        for p in model.parameters():
            p.requires_grad_(False)
        routers = [m for m in model.modules() if type(m).__name__.lower().endswith("topkrouter")]
        for layer, chosen in args.selection.items():
            block = [m for m in model.modules() if type(m).__name__.endswith("Experts")][int(layer)]
            keep = torch.zeros(routers[int(layer)].weight.shape[0], dtype=torch.bool)
            keep[list(chosen)] = True
            for p in block.parameters():
                p.requires_grad_(True)
                p.register_hook(lambda g, keep=keep: g * keep.view(-1, *([1] * (g.ndim - 1))).to(g.dtype))
    params = [p for p in model.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(params, lr=LEARNING_RATE, betas=(0.9, 0.95), weight_decay=0.1)
    ids_pt = torch.from_numpy(ids)
    autocast = torch.autocast("cpu", dtype=torch.bfloat16, enabled=args.dtype == "bfloat16")

    def step():
        with autocast:
            out = (model(input_ids=ids_pt, labels=ids_pt, output_router_logits=True) if with_aux
                   else model(input_ids=ids_pt, labels=ids_pt))
        out.loss.backward()
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        opt.step()
        opt.zero_grad(set_to_none=True)
        return out

    out = step()
    aux = out.aux_loss.item() if with_aux else None
    first = {"loss": out.loss.item() - (LB_COEF * aux if with_aux else 0.0), "aux_loss": aux}
    for _ in range(args.warmup - 1):
        step()
    state_bytes = sum(t.numel() * t.element_size() for st in opt.state.values() for t in st.values()
                      if torch.is_tensor(t) and t.ndim > 0)
    return {**first, "matmul_flops": max(torch_matmul_flops(d) for d in {args.dtype, "float32"}),
            "step_s": best_time(step, args.steps), "load_avg": os.getloadavg()[0], "optimizer_bytes": state_bytes}


def run_moejax(directory: str, ids: np.ndarray, args, selection: dict | None = None) -> dict:
    """moejax's jitted train step: first-step losses, each warm-up step's time and the best step time."""
    overrides = {"dt_floor": "time_step_min"} if args.arch == "nemotron_h" else {}  # transformers' dt clamp
    model = moejax.from_pretrained(directory, **overrides)
    cfg = TrainConfig(learning_rate=LEARNING_RATE, warmup_steps=10, total_steps=1000, compute_dtype=args.dtype,
                      lb_coef=LB_COEF, remat=args.remat, train_experts=selection)
    graphdef, state, tx = init_state(model, cfg)
    train_step = make_train_step(graphdef, tx, cfg, model.config)
    del model
    batch = {"input_ids": ids, "labels": ids}

    def step():
        nonlocal state
        state, metrics = train_step(state, batch)
        jax.block_until_ready(state)
        return metrics

    warmup_s = []  # the first step compiles; a later one that takes as long compiled again
    for _ in range(args.warmup):
        start = time.perf_counter()
        metrics = step()
        warmup_s.append(time.perf_counter() - start)
        if len(warmup_s) == 1:
            first = {"loss": float(metrics["loss"]), "aux_loss": float(metrics["aux_loss"])}
    optimizer_bytes = sum(x.nbytes for x in jax.tree.leaves(state.opt_state))
    return {**first, "warmup_s": warmup_s,
            "matmul_flops": max(jax_matmul_flops(d) for d in {args.dtype, "float32"}),
            "step_s": best_time(step, args.steps), "load_avg": os.getloadavg()[0], "optimizer_bytes": optimizer_bytes}


def bench(args) -> dict:
    hf_config = CONFIGS[args.arch]
    assert hf_config.attention_dropout == 0 and getattr(hf_config, "hidden_dropout", 0) == 0, "dropout must be off"
    ids = np.random.default_rng(0).integers(0, hf_config.vocab_size, (args.batch, args.seq))
    with tempfile.TemporaryDirectory() as tmp:
        torch.manual_seed(0)
        randomize(transformers.AutoModelForCausalLM.from_config(hf_config), 0).save_pretrained(tmp)
        config = moejax.load_config(tmp)
        args.selection = None
        if args.train_experts:  # K experts (seeded) in each of the last two MoE layers
            layers, experts = len(config.moe_layers), config.num_routed_experts
            chosen = sorted(np.random.default_rng(0).choice(experts, args.train_experts, replace=False).tolist())
            args.selection = {str(layer): chosen for layer in range(max(0, layers - 2), layers)}
        ref = run_torch(tmp, ids, args)
        gc.collect()  # frees the torch model and AdamW state before moejax allocates its own
        ours = run_moejax(tmp, ids, args, args.selection)
        full = None
        if args.selection:
            gc.collect()
            full = run_moejax(tmp, ids, args)
    tokens, flops = args.batch * args.seq, train_flops(config, args.batch, args.seq)
    ref["mfu"], ours["mfu"] = (flops / side["step_s"] / side["matmul_flops"] for side in (ref, ours))
    return {
        "arch": args.arch, "batch": args.batch, "seq": args.seq, "dtype": args.dtype, "remat": args.remat,
        "steps": args.steps, "warmup": args.warmup, "torch_threads": torch.get_num_threads(),
        "torch_aux_loss": args.arch == "qwen3_moe", "train_gflop_per_step": flops / 1e9,
        "torch": {**ref, "tokens_per_s": tokens / ref["step_s"]},
        "moejax": {**ours, "tokens_per_s": tokens / ours["step_s"]},
        "speedup": ref["step_s"] / ours["step_s"], "target": TARGET, "selection": args.selection,
        "moejax_full": None if full is None else {**full, "tokens_per_s": tokens / full["step_s"]},
        "trainable_share": None if full is None else trainable_share(config, args.selection),
    }


def trainable_share(config, selection: dict) -> float:
    """The selected experts' share of the model's parameters."""
    d, f = config.hidden_size, config.moe_intermediate_size
    per_expert = (3 if config.model_type == "qwen3_moe" else 2) * (getattr(config, "moe_latent_size", None) or d) * f
    return sum(len(ids) for ids in selection.values()) * per_expert / config.parameter_count()


def check_losses(r: dict) -> None:
    """In float32 the two sides' first-step losses must match: same weights, batch and objective."""
    if r["dtype"] != "float32":
        return
    names = ["loss", "aux_loss"] if r["torch_aux_loss"] else ["loss"]
    for name in names:
        ours, ref = r["moejax"][name], r["torch"][name]
        if not math.isclose(ours, ref, rel_tol=LOSS_RTOL, abs_tol=LOSS_RTOL):
            raise SystemExit(f"step-1 {name} differs: moejax {ours:.6f} vs transformers {ref:.6f} (tolerance "
                             f"{LOSS_RTOL:g}); the two train steps do not optimise the same objective")


def report(r: dict, command: str) -> None:
    ours, ref = r["moejax"], r["torch"]
    tokens = r["batch"] * r["seq"]
    aux = ("aux loss on both sides" if r["torch_aux_loss"] else
           "transformers' Nemotron-H has no aux loss: torch trains on cross-entropy only, moejax adds its balance loss")
    print(f"{r['arch']} train step, batch {r['batch']} x seq {r['seq']}, {r['dtype']} compute (float32 master weights),"
          f" remat {r['remat']}, AdamW, lb_coef {LB_COEF}; {aux}")
    print(f"  jax {jax.__version__} on {jax.default_backend()}, transformers {transformers.__version__}, torch "
          f"{torch.__version__} ({r['torch_threads']} threads), {os.cpu_count()} CPU cores; best of {r['steps']} "
          f"steps after {r['warmup']} warm-up; malloc huge pages {'on' if r['huge_pages'] else 'off'} (both sides)")
    ref_aux = "none" if ref["aux_loss"] is None else f"{ref['aux_loss']:.6f}"
    print(f"  step 1: moejax loss {ours['loss']:.6f} aux {ours['aux_loss']:.6f} | "
          f"transformers loss {ref['loss']:.6f} aux {ref_aux}")
    dense = "float32" if r["dtype"] == "float32" else f"the faster of {r['dtype']} and float32"
    print(f"  model FLOPs: {r['train_gflop_per_step']:.1f} GFLOP per step ({tokens} tokens); MFU against a dense "
          f"{MATMUL_SIZE}^2 matmul ({dense}) timed just before that side's steps")
    warmup = ", ".join(f"{s:.1f}" for s in ours["warmup_s"])
    for name, side, mm, extra in (("transformers + torch", ref, "F.linear", ""),
                                  ("moejax", ours, "jnp.dot", f"; warm-up steps {warmup} s, the first compiles")):
        print(f"  {name + ':':21} {side['step_s']:7.3f} s/step {side['tokens_per_s']:8.1f} tok/s  "
              f"MFU {side['mfu']:5.1%} of {mm} {side['matmul_flops'] / 1e9:.1f} GFLOP/s  "
              f"(1-min load avg {side['load_avg']:.1f}{extra})")
    if r["selection"]:
        full = r["moejax_full"]
        print(f"  expert-selective: {sum(len(v) for v in r['selection'].values())} experts in MoE layers "
              f"{', '.join(r['selection'])} = {r['trainable_share']:.2%} of the parameters; torch trains those layers' "
              "expert tensors with hooks zeroing the other experts' gradient rows")
        print(f"  moejax full step {full['step_s']:.3f} s, selective {ours['step_s']:.3f} s "
              f"({full['step_s'] / ours['step_s']:.2f}x); optimizer state: moejax full "
              f"{full['optimizer_bytes'] / 2**20:.1f} MiB, selective {ours['optimizer_bytes'] / 2**20:.2f} MiB "
              f"({ours['optimizer_bytes'] / full['optimizer_bytes']:.2%}); torch selective "
              f"{ref['optimizer_bytes'] / 2**20:.1f} MiB")
    verdict = "PASS" if r["speedup"] >= TARGET else "MISS"
    print(f"  speed-up moejax / torch: {r['speedup']:.2f}x (target >= {TARGET}x): {verdict}")
    print(f"  reproduce: {command}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--arch", choices=list(CONFIGS), default="qwen3_moe")
    parser.add_argument("--batch", type=int, default=4)
    parser.add_argument("--seq", type=int, default=256)
    parser.add_argument("--steps", type=int, default=5, help="timed steps per side; the best is reported")
    parser.add_argument("--warmup", type=int, default=2, help="untimed steps per side first (moejax's compiles)")
    parser.add_argument("--dtype", choices=["float32", "bfloat16"], default="float32", help="compute dtype, both sides")
    parser.add_argument("--remat", choices=["none", "full", "dots"], default="none", help="moejax TrainConfig.remat")
    parser.add_argument("--train-experts", type=int, default=0, metavar="K",
                        help="expert-selective: train K experts in each of the last two MoE layers (13 ~ SSFT-k5 of "
                        "a 64-expert model), against transformers with those layers' expert tensors trained behind "
                        "gradient-mask hooks, and against moejax's full step")
    parser.add_argument("--json", nargs="?", const="-", metavar="FILE",
                        help="also write the results, with the speed-ups, to FILE (alone: print them as one line)")
    parser.add_argument("--no-huge-pages", action="store_true",
                        help="keep glibc's default malloc (moejax train asks it for transparent huge pages)")
    args = parser.parse_args()
    if not args.no_huge_pages:
        with_huge_pages()
    if args.warmup < 1 or args.steps < 1:
        parser.error("--warmup and --steps must be >= 1 (the first step gives the losses and moejax's compile)")
    transformers.utils.logging.disable_progress_bar()
    results = {**bench(args), "huge_pages": HUGE_PAGES in os.environ.get("GLIBC_TUNABLES", "")}
    command = " ".join(["python", "benchmarks/bench_train.py", *sys.argv[1:]])
    report(results, command)
    if args.json:
        name = f"{args.arch}_{args.dtype}" + ("_selective" if results["selection"] else "")
        text = json.dumps({**results, "ratios": {name: results["speedup"]}})
        if args.json == "-":
            print(text)
        else:
            Path(args.json).write_text(text)
    check_losses(results)


if __name__ == "__main__":
    main()
