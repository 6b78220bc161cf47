"""`moejax plan`: will a model fit a TPU topology on a mesh? Compiled from shapes alone, before renting it.

The full-size forward is traced with abstract parameters (no weights are read or made), sharded by the
logical-axis rules over a mesh of simulated CPU devices, and compiled. The per-device parameter bytes
are exact (from each parameter's shard shape). Outputs and temporaries come from XLA's memory
analysis of the compiled per-device program, with two corrections for compiling on a CPU:
- it is compiled in float32: XLA's CPU compiler has no bfloat16 matmul and keeps float32 copies of
  every bfloat16 weight (measured: temporaries 2.7x the bfloat16 parameters on a 4-layer Qwen3-MoE,
  0.35x in float32), which a TPU does not; float32 activations bound bfloat16 ones from above;
- the MoE blocks compile on the CPU's tile path, which never holds a whole MoE layer's grouped rows;
  the accelerator's ragged_dot path does (gathered inputs, gate/up/activation, outputs: rows x
  (2 d + 3 f)), so that is added analytically. (XLA's CPU lowering of ragged_dot itself expands to a
  dense [rows, local experts, f] product, 6.5x the temporaries here, so it cannot be measured instead.)
XLA's CPU and TPU compilers assign buffers differently, so the total is an estimate (an upper bound
in its float32 parts).

Beside memory, the plan says how each part is laid out on the mesh (the vocabulary and the Mamba-2 groups split
over tensor or replicated, KV heads shared by groups of tensor devices when fewer than them) and how many bytes
one MoE layer's token exchange moves into each device on the accelerator (moejax.parallel.hlo.exchange_bytes; with
all_to_all the ragged exchange's expectation under uniform routing), with the exchange `auto` would choose there.

With `train`, the CPT train step (moejax.training.step) is compiled instead, the same way: float32
master parameters and AdamW's mu and nu (bytes exact, from the shard shapes), compiled in float32 on
the tile path, plus analytic terms for what only the accelerator holds: the compute-dtype copy of the
parameters the forward casts to, and the grouped rows of the MoE layers kept for the backward pass
(every MoE layer's without rematerialisation; with it, one layer's recomputed rows) and one layer's
gradient rows.
"""

from __future__ import annotations

import dataclasses
import json
import math
import subprocess
import sys

from moejax.commands.options import check_options, option
from moejax.config import EXPERT_EXCHANGES, REMAT_NAMES
from moejax.errors import MeshError, SettingsError
from moejax.parallel.topologies import TOPOLOGIES

GiB = 1024 ** 3


@dataclasses.dataclass(frozen=True)
class PlanSettings:
    """Everything `moejax plan` takes."""

    model: str | None = option(None, "a published shape by name (qwen3-30b-a3b, ...: docs/models.md; a wrong name "
                               "lists them) or a checkpoint directory (only its config.json is read)")
    mesh: str | None = option(None, "e.g. data=2,expert=4 (default with --topology: expert=<chips>)",
                              metavar="AXIS=N,...")
    topology: str | None = option(None, "TPU slice: sets the chip count the mesh must use and the HBM per chip to "
                                  "compare with", choices=tuple(sorted(TOPOLOGIES)))
    batch: int = option(8, "sequences per step (global)", kind=int, minimum=1)
    seq: int = option(2048, "tokens per sequence", kind=int, minimum=1)
    dtype: str = option("bfloat16", "parameter dtype (with --train: the compute dtype; master weights are float32)",
                        choices=("bfloat16", "float32"))
    expert_exchange: str = option("auto", "how tokens reach the experts' devices: all_gather, all_to_all (ragged, "
                                  "each token only to the devices of its experts) or auto (all_to_all from 8 expert "
                                  "devices on TPU/GPU)", choices=EXPERT_EXCHANGES)
    train: bool = option(False, "plan the train step rather than the forward", kind=bool)
    remat: str = option("none", "with --train: rematerialise each layer in the backward pass (full: everything; "
                        "dots: keep the dense matmuls' outputs)", choices=REMAT_NAMES)
    accum_steps: int = option(1, "with --train: split the batch into N micro-batches, gradients accumulated",
                              kind=int, minimum=1, metavar="N")
    train_experts: str | None = option(None, "with --train: expert-selective training of these experts (as "
                                       "`moejax train --train-experts`): AdamW state for their slices only",
                                       metavar="FILE[:LANG[:KEY]]")
    tokens: int | None = option(None, "tokens a study or run processes in all (e.g. a corpus's count x the models "
                                "and languages): prints its estimated time", kind=int, minimum=1, metavar="N")
    json: str | None = option(None, "also write the plan as JSON", metavar="FILE")

    def __post_init__(self):
        check_options(self)
        if self.model is None:
            raise SettingsError("--model is required: a published shape by name (e.g. qwen3-30b-a3b) or a "
                                "checkpoint directory")
        if not self.train and (self.remat != "none" or self.accum_steps != 1 or self.train_experts):
            raise SettingsError("--remat, --accum-steps and --train-experts plan the train step: add --train")
        if self.train and self.batch % self.accum_steps:
            raise SettingsError(f"--batch {self.batch} is not divisible by --accum-steps {self.accum_steps}")
        if self.mesh is None and self.topology is None:
            raise SettingsError("give --mesh, --topology or both")


def plan(settings: PlanSettings) -> dict:
    """The memory plan (module docstring) of the forward, or with `train` of the train step. When the mesh needs
    more devices than this process has, the plan is made in a child process with that many simulated CPU devices
    (XLA reads the count when jax starts)."""
    import jax

    from moejax.planning import plan_forward, plan_train, resolve
    from moejax.routing.experts import read_selection

    s = settings
    cfg, sizes, chip = resolve(s.model, s.mesh, s.topology)
    needed = math.prod(sizes.values())
    if needed > jax.device_count():
        return _plan_in_child(s, needed)
    if s.train:
        result = plan_train(s.model, s.mesh, s.topology, batch=s.batch, seq=s.seq, dtype=s.dtype, remat=s.remat,
                            accum_steps=s.accum_steps, expert_exchange=s.expert_exchange,
                            train_experts=read_selection(s.train_experts) if s.train_experts else None)
    else:
        result = plan_forward(s.model, s.mesh, s.topology, batch=s.batch, seq=s.seq, dtype=s.dtype,
                              expert_exchange=s.expert_exchange)
    return {**result, "tokens": s.tokens}


def _plan_in_child(settings: PlanSettings, devices: int) -> dict:
    from moejax.parallel.mesh import simulated_devices_env

    env = simulated_devices_env(devices, JAX_PLATFORMS="cpu")
    code = ("import dataclasses, json, sys; from moejax.commands.plan import PlanSettings, plan; "
            "print(json.dumps(plan(PlanSettings(**json.loads(sys.stdin.read())))))")
    done = subprocess.run([sys.executable, "-c", code], input=json.dumps(dataclasses.asdict(settings)), env=env,
                          capture_output=True, text=True)
    if done.returncode:
        raise MeshError(f"planning on {devices} simulated devices failed: {done.stderr.strip().splitlines()[-1]}")
    return json.loads(done.stdout.strip().splitlines()[-1])


def plan_text(p: dict) -> str:
    where = f"mesh {p['mesh']}" + (f" on {p['topology']}" if p["topology"] else "")
    train = p.get("mode") == "train"
    counted = (f"  parameters: {p['parameters']:,} (analytic count from the config: {p['parameters_analytic']:,}), "
               f"{p['parameter_bytes'] / GiB:.1f} GiB" + (" in float32" if train else "")
               + f"; per device {p['parameter_bytes_per_device'] / GiB:.2f} GiB")
    if train and p["trainable"] != p["parameters"]:
        counted += (f"\n  trainable: {p['trainable']:,} ({100 * p['trainable'] / p['parameters']:.2f}%); AdamW "
                    "moments are held for these alone")
    if not train:
        lines = [f"moejax plan: {p['model']} ({p['model_type']}), forward, batch {p['batch']} x {p['seq']} tokens, "
                 f"{p['dtype']}, {where}", counted,
                 f"  per device: parameters {p['parameter_bytes_per_device'] / GiB:.2f} GiB + outputs "
                 f"{p['output_bytes'] / GiB:.2f} GiB + temporaries {p['temp_bytes'] / GiB:.2f} GiB + MoE dispatch "
                 f"{p['moe_dispatch_bytes'] / GiB:.2f} GiB = {p['per_device_bytes'] / GiB:.2f} GiB "
                 f"(compiled in {p['compile_s']:.0f} s)"]
        remedies = "shard further (more expert/fsdp devices) or lower --batch/--seq"
    else:
        micro = f"{p['accum_steps']} micro-batches" if p["accum_steps"] > 1 else "no accumulation"
        terms = [("parameters", "parameter_bytes_per_device"), ("optimizer state", "optimizer_bytes_per_device"),
                 ("outputs", "output_bytes"), ("temporaries", "temp_bytes"),
                 (f"{p['dtype']} parameter copy", "compute_copy_bytes"), ("MoE rows", "moe_dispatch_bytes")]
        lines = [f"moejax plan: {p['model']} ({p['model_type']}), train step (AdamW, float32 master weights, "
                 f"{p['dtype']} compute, remat {p['remat']}, {micro}), batch {p['batch']} x {p['seq']} tokens, {where}",
                 counted,
                 "  per device: " + " + ".join(f"{name} {p[key] / GiB:.2f} GiB" for name, key in terms)
                 + (f" - aliased {p['alias_bytes'] / GiB:.2f} GiB" if p["alias_bytes"] else "")
                 + f" = {p['per_device_bytes'] / GiB:.2f} GiB (compiled in {p['compile_s']:.0f} s)"]
        if not p["alias_bytes"]:
            state = (p["parameter_bytes_per_device"] + p["optimizer_bytes_per_device"]) / GiB
            lines.append("  (the step does not donate its input state, so its outputs hold a second copy of the "
                         f"parameters and optimizer state: {state:.2f} GiB that donating it would save)")
        remedies = "shard further (more expert/fsdp devices), lower --batch/--seq" \
            + (", --remat full" if p["remat"] == "none" else "") + " or raise --accum-steps"
    if p["layout"]:
        lines.append("  layout: " + "; ".join(p["layout"]))
    if p["expert_exchange"]:
        per_layer, gathered = p["exchange_bytes_per_moe_layer"] / GiB, p["all_gather_bytes_per_moe_layer"] / GiB
        compared = "" if p["expert_exchange"] == "all_gather" else f" (all-gather: {gathered:.3f} GiB)"
        lines.append(f"  expert exchange on the accelerator: {p['expert_exchange']}, {per_layer:.3f} GiB into each "
                     f"device per MoE layer{compared}, {p['moe_layers']} MoE layers per forward")
    lines.append(f"  ({p['estimate']}; see moejax plan --help)")
    what = "train step" if train else "forward"
    lines.append(f"  compute: {p['forward_flops_per_token'] / 1e9:.2f} GFLOP per token forward (analytic: "
                 f"{p['active_matmul_parameters'] / 1e9:.2f} B active matmul weights + attention), "
                 f"{p['flops_per_step'] / 1e12:.1f} TFLOP per {what}")
    if p["step_s_at_peak"] is not None:
        lines.append(f"  time: {p['step_s_at_peak']:.3f} s per {what} at {p['topology']}'s peak, "
                     f"{p['step_s_assumed']:.3f} s at an assumed {p['assumed_mfu']:.0%} of it "
                     f"(~{p['tokens_per_s_assumed']:,.0f} tokens/s)")
        if p.get("tokens"):
            lines.append(f"  {p['tokens']:,} tokens: ~{p['tokens'] / p['tokens_per_s_assumed'] / 60:.1f} min at "
                         f"{p['assumed_mfu']:.0%} of peak")
    if p["fits"] is not None:
        hbm = p["hbm_bytes"] / GiB
        lines.append(f"  FITS: {p['per_device_bytes'] / GiB:.1f} of {hbm:.0f} GiB HBM per chip" if p["fits"] else
                     f"  DOES NOT FIT: needs {p['per_device_bytes'] / GiB:.1f} GiB per chip, {p['topology']} has "
                     f"{hbm:.0f} GiB; {remedies}")
    return "\n".join(lines)
