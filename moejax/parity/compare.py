"""moejax against the reference, batch by batch: the implementation check in float32 (each block alone on the
reference's own input to it) and the end-to-end comparison in moejax's dtype (with proven routing ties forced in
float32, against transformers' own 16-bit error in 16 bits)."""

from __future__ import annotations

import concurrent.futures
import dataclasses
import time
from collections.abc import Callable, Iterable

import jax
import jax.numpy as jnp
import numpy as np
from tqdm import tqdm

from moejax.layers.moe import RouterControl
from moejax.models.common import ForcedRouting
from moejax.parity.reference import ReferenceBatch
from moejax.parity.tally import ImplementationTally, Outputs, SideTally, moejax_outputs
from moejax.parity.ties import OTHER, classify_flips, differing
from moejax.parity.tokens import Batch, fill_rows

FLIP_COLUMNS = ("check", "moe_layer", "block", "group", "batch", "sequence", "position", "token_id",
                "reference_experts", "moejax_experts", "kind", "score_gap", "window", "boundary_score",
                "router_logit_diff", "forced")


@dataclasses.dataclass
class Tallies:
    """Everything a verdict is built from: moejax end to end, transformers' 16-bit run (calibrated verdicts), the
    implementation check, the flips (flips.csv rows) and the timings."""

    moejax: SideTally
    reference: SideTally | None
    implementation: ImplementationTally
    flips: list[dict]
    timings: dict


def compare(model, batches: list[Batch], reference: Iterable[ReferenceBatch], rules_of: Callable[[], list], *,
            batch_size: int, calibrated: bool, max_logit_diff: float, quiet: bool = True,
            timings: dict | None = None) -> Tallies:
    """Runs moejax on every batch (the reference gives them back with its outputs, in order) and accumulates the
    comparisons. rules_of: the MoE layers' RouterRules (known once the reference is loaded). max_logit_diff: a flip
    at a token whose router logits differ by more is never a tie."""
    cfg = model.config
    timings = timings if timings is not None else {}
    for name in ("moejax_forward_s", "moejax_first_batch_s", "implementation_s", "compare_s"):
        timings.setdefault(name, 0.0)
    timings.setdefault("moejax_reruns", 0)
    tallies = Tallies(SideTally(cfg), SideTally(cfg) if calibrated else None, ImplementationTally(cfg), [], timings)

    def run_moejax(batch: Batch, forced: ForcedRouting | None = None) -> Outputs:
        """The batch end to end through moejax (always with a ForcedRouting, so forcing never recompiles)."""
        start = time.perf_counter()
        forced = forced or ForcedRouting.none(len(cfg.moe_layers), batch_size, batch.ids.shape[1],
                                              cfg.num_experts_per_tok)
        out = jax.block_until_ready(model(fill_rows(batch.ids, batch_size), fill_rows(batch.mask, batch_size),
                                          return_router_logits=True, return_hidden_states=True,
                                          forced_routing=forced))
        timings["moejax_forward_s"] += time.perf_counter() - start
        timings["moejax_first_batch_s"] = timings["moejax_first_batch_s"] or time.perf_counter() - start
        return moejax_outputs(out, batch.content)

    # moejax compiles and runs its first batch while the reference loads.
    worker = concurrent.futures.ThreadPoolExecutor(1, thread_name_prefix="moejax")
    first = worker.submit(run_moejax, batches[0])
    tokens = sum(int(b.mask.sum()) for b in batches)
    bar = None
    try:
        for number, rb in enumerate(reference):
            if bar is None:
                bar = tqdm(total=tokens, desc=f"parity {'16-bit' if calibrated else 'float32'}", unit="tok",
                           disable=quiet)
            got = first.result() if number == 0 else run_moejax(rb.batch)
            rules = rules_of()
            start = time.perf_counter()
            if calibrated:
                tallies.flips += _compare_calibrated(cfg, rules, rb, got, tallies, number)
            else:
                tallies.flips += _compare_float32(cfg, rules, max_logit_diff, rb, got, tallies.moejax, number,
                                                  batch_size, lambda forced, b=rb.batch: run_moejax(b, forced),
                                                  timings)
            timings["compare_s"] += time.perf_counter() - start
            start = time.perf_counter()
            tallies.flips += check_implementation(model, rules, rb, tallies.implementation, number, max_logit_diff,
                                                  batch_size)
            timings["implementation_s"] += time.perf_counter() - start
            bar.update(int(rb.batch.mask.sum()))
            if not calibrated:
                bar.set_postfix(kl_mean=f"{np.concatenate(tallies.moejax.logits.kl_n).mean():.2e}")
    finally:
        if bar is not None:
            bar.close()
        worker.shutdown(cancel_futures=True)
    return tallies


def flip_rows(check: str, flips, b: Batch, number: int, layer: int, block: int, forced: bool, ref_ids_nk,
              got_ids_nk) -> list[dict]:
    """flips.csv rows: where each flip is (sequence, position, token), the two expert sets and its classification."""
    rows_b, cols_t = np.nonzero(b.content)
    out = []
    for i, t in enumerate(flips.token):
        out.append({"check": check, "moe_layer": layer, "block": block, "group": b.groups_n[t], "batch": number,
                    "sequence": b.first_sequence + int(rows_b[t]), "position": int(cols_t[t]),
                    "token_id": int(b.ids[rows_b[t], cols_t[t]]),
                    "reference_experts": " ".join(map(str, sorted(ref_ids_nk[t].tolist()))),
                    "moejax_experts": " ".join(map(str, sorted(got_ids_nk[t].tolist()))),
                    "kind": flips.kind[i], "score_gap": float(flips.gap[i]), "window": float(flips.window[i]),
                    "boundary_score": float(flips.boundary[i]), "router_logit_diff": float(flips.logit_diff[i]),
                    "forced": forced and flips.kind[i] != OTHER})
    return out


def _compare_float32(cfg, rules, max_logit_diff: float, rb: ReferenceBatch, got: Outputs, side: SideTally,
                     number: int, batch_size: int, rerun: Callable[[ForcedRouting], Outputs],
                     timings: dict) -> list[dict]:
    """End to end in float32, block by block in order: at each MoE layer the flips are classified, the proven ties
    forced into moejax's routing (and moejax run again from its current forcing), then the block's output
    compared; every content token is compared at every block."""
    b, truth = rb.batch, rb.truth
    moe_index = {block: j for j, block in enumerate(cfg.moe_layers)}
    rows_b, cols_t = np.nonzero(b.content)
    forced = None
    rows = []
    for block in range(len(cfg.layer_kinds)):
        j = moe_index.get(block)
        if j is not None:
            flips = classify_flips(rules[j], truth.router_logits[j], truth.router_ids[j], got.router_logits[j],
                                   got.router_ids[j], max_logit_diff)
            side.routing[j].add(b.groups_n, truth.router_logits[j], truth.router_ids[j], got.router_logits[j],
                                got.router_ids[j], flips)
            rows += flip_rows("end_to_end", flips, b, number, j, block, True, truth.router_ids[j], got.router_ids[j])
            ties = flips.token[flips.ties]
            if len(ties):
                if forced is None:
                    blank = ForcedRouting.none(len(cfg.moe_layers), batch_size, b.ids.shape[1],
                                               cfg.num_experts_per_tok)
                    forced = ForcedRouting(np.array(blank.expert_ids), np.array(blank.mask))
                forced.mask[j, rows_b[ties], cols_t[ties]] = True
                forced.expert_ids[j, rows_b[ties], cols_t[ties]] = truth.router_ids[j][ties]
                side.routing[j].forced += len(ties)
                got = rerun(forced)
                timings["moejax_reruns"] += 1
        side.blocks[block].add(truth.hidden[block], got.hidden[block])
    side.logits.add(b.groups_n, truth.logits, got.logits)
    return rows


def _compare_calibrated(cfg, rules, rb: ReferenceBatch, got: Outputs, tallies: Tallies, number: int) -> list[dict]:
    """moejax and transformers' 16-bit run, each against the float32 truth, every content token. A 16-bit routing
    flip (another expert set than the truth's) moves the tokens it touches a lot, and which tokens flip is chance:
    the per-token statistics are therefore taken over the tokens that neither side has flipped at any MoE layer
    so far (rounding, like for like), and the flips are counted apart. moejax's flips are listed (with the
    reference's score gap) but not classified: 16-bit rounding moves router logits by far more than a float32
    window."""
    b, truth = rb.batch, rb.truth
    moe_index = {block: j for j, block in enumerate(cfg.moe_layers)}
    sides = ((tallies.moejax, got), (tallies.reference, rb.calibration))
    clean_n = np.ones(len(truth.logits), bool)  # no flip on either side in the MoE layers so far
    rows = []
    for block in range(len(cfg.layer_kinds)):
        j = moe_index.get(block)
        if j is not None:
            for side, outputs in sides:
                side.routing[j].add(b.groups_n, truth.router_logits[j], truth.router_ids[j], outputs.router_logits[j],
                                    outputs.router_ids[j], clean=clean_n)
            for _, outputs in sides:
                clean_n = clean_n & ~differing(truth.router_ids[j], outputs.router_ids[j])
            flips = classify_flips(rules[j], truth.router_logits[j], truth.router_ids[j], got.router_logits[j],
                                   got.router_ids[j])
            flips.kind[:] = "16-bit"
            rows += flip_rows("end_to_end", flips, b, number, j, block, False, truth.router_ids[j], got.router_ids[j])
        for side, outputs in sides:
            side.blocks[block].add(truth.hidden[block], outputs.hidden[block], clean=clean_n)
    for side, outputs in sides:
        side.logits.add(b.groups_n, truth.logits, outputs.logits, clean=clean_n)
    return rows


def check_implementation(model, rules, rb: ReferenceBatch, tally: ImplementationTally, number: int,
                         max_logit_diff: float, batch_size: int) -> list[dict]:
    """The implementation check on one batch, in float32 whatever moejax's dtype: moejax's embeddings of the
    tokens; each block run alone (moejax.models.common.CausalLM.block_forward, its parameters upcast) on the
    reference's own input to it, its routing's flips classified and the proven ties forced (the block run again);
    and the head on the reference's last block output. Each against the reference's own float32 output. A block
    judged on the reference's input carries no error from the blocks before it, and float32 rounding hides
    nothing: what is left is summation order."""
    cfg = model.config
    b, truth = rb.batch, rb.truth
    content = b.content
    rows_b, cols_t = np.nonzero(content)
    width = b.ids.shape[1]
    ids, mask = fill_rows(b.ids, batch_size), fill_rows(b.mask, batch_size)
    positions = np.broadcast_to(np.arange(width, dtype=np.int32), ids.shape)
    flat = rows_b * width + cols_t  # content tokens among the block's batch_size * width routed tokens
    k, moe_index = cfg.num_experts_per_tok, {block: j for j, block in enumerate(cfg.moe_layers)}

    def scatter(x_nd):
        x = np.zeros((batch_size, width, x_nd.shape[-1]), np.float32)
        x[rows_b, cols_t] = x_nd
        return x

    embedded = np.asarray(jnp.asarray(model.embed_vd[...])[jnp.asarray(ids)], np.float32)[:len(b.ids)][content]
    tally.embedding.add(truth.embedded, embedded)
    rows, x_nd = [], truth.embedded
    for block in range(len(cfg.layer_kinds)):
        x_btd = scatter(x_nd)
        j = moe_index.get(block)
        control = None if j is None else RouterControl(force_ids=np.zeros((batch_size * width, k), np.int32),
                                                       force_mask=np.zeros(batch_size * width, bool))
        y_btd, routing = model.block_forward(block, x_btd, mask, positions, control)
        if j is not None:
            logits_ne, ids_nk = np.asarray(routing.logits)[flat], np.asarray(routing.expert_ids)[flat]
            flips = classify_flips(rules[j], truth.router_logits[j], truth.router_ids[j], logits_ne, ids_nk,
                                   max_logit_diff)
            tally.routing[j].add(b.groups_n, truth.router_logits[j], truth.router_ids[j], logits_ne, ids_nk, flips)
            rows += flip_rows("implementation", flips, b, number, j, block, True, truth.router_ids[j], ids_nk)
            ties = flips.token[flips.ties]
            if len(ties):
                control.force_mask[flat[ties]] = True
                control.force_ids[flat[ties]] = truth.router_ids[j][ties]
                tally.routing[j].forced += len(ties)
                y_btd, _ = model.block_forward(block, x_btd, mask, positions, control)
        tally.blocks[block].add(x_nd, truth.hidden[block], np.asarray(y_btd)[:len(b.ids)][content])
        x_nd = truth.hidden[block]
    logits = np.asarray(model.head_forward(scatter(x_nd)))[:len(b.ids)][content]
    tally.logits.add(b.groups_n, truth.logits, logits)
    return rows
