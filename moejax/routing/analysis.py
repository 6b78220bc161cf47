"""Routing analysis of a corpus, parallel or not: per-chunk statistics of each language (`collect`) and the
docs/metrics.md tables built from them (`build_tables`), for `moejax analyze`.

Each language's chunks run in their own forward passes (never mixed with another language), packed into rows of
one width, each chunk a segment of its own that sees only itself (as if alone), so a corpus compiles one program
and its rows come out nearly full.
Statistics are reduced in the jitted forward (moejax.routing.stats); only per-chunk [layers, experts]
arrays reach the host, unless every token's routing is asked for.
"""

from __future__ import annotations

import dataclasses
import itertools

import jax
import numpy as np

from moejax.data.languages import identity
from moejax.data.packing import one_per_row, pack, passes
from moejax.data.tokenize import check_ids
from moejax.errors import DataError
from moejax.models.common import ForcedRouting
from moejax.routing import BOOTSTRAP_DRAWS, PAIRS_PER_CHUNK
from moejax.routing import metrics as M
from moejax.routing.stats import segment_stats, stats_cache_size


@dataclasses.dataclass
class LangRun:
    """One model over one language: ChunkStats' fields stacked over chunks ([C, L, E], [C, L], [C])."""

    topk_counts: np.ndarray
    top1_counts: np.ndarray
    prob_sums: np.ndarray
    entropy_sums_bits: np.ndarray
    tokens: np.ndarray
    pair_jaccard_sums: np.ndarray
    pairs: np.ndarray
    tokenization: dict
    routing: list[ChunkRouting] | None = None  # per chunk, with collect(keep_routing=True)

    def pooled(self, k: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """Over all chunks, per layer: top-K counts, usage fractions f and mean probabilities pbar, [L, E]."""
        counts_le = self.topk_counts.sum(0)
        return (counts_le, M.usage_fractions(counts_le, k),
                M.mean_probabilities(self.prob_sums.sum(0), np.full(counts_le.shape[0], self.tokens.sum())))


@dataclasses.dataclass
class ModelRun:
    name: str
    path: str
    model_type: str
    moe_blocks: tuple[int, ...]
    k: int
    experts: int
    excluded_ids: list[int]
    langs: dict[str, LangRun]


@dataclasses.dataclass
class ChunkRouting:
    """One chunk's routing at every MoE layer, over all its n tokens (special ones included): the experts
    chosen [L, n, k] (in the router's order) and the raw router logits [L, n, E]."""

    expert_ids: np.ndarray
    router_logits: np.ndarray


def sample_pairs(n: int, count: int, rng: np.random.Generator) -> np.ndarray:
    """[count, 2] token positions: `count` distinct pairs of two distinct tokens of an n-token chunk, drawn without
    replacement (all n(n-1)/2 of them when there are no more; the rows past them pair a token with itself, which the
    statistics ignore)."""
    first, second = np.triu_indices(n, 1)
    chosen = rng.choice(len(first), size=min(count, len(first)), replace=False)
    out = np.zeros((count, 2), np.int64)
    out[:len(chosen)] = np.stack([first[chosen], second[chosen]], axis=1)
    return out


def collect(model, tokenizer, texts: list[str], *, exclude_ids, batch_size: int, probabilities: str, seed: int,
            progress=None, forced: dict[int, ChunkRouting | tuple] | None = None, keep_routing: bool = False,
            packed: bool = True, report: dict | None = None, steering=None,
            pairs_per_chunk: int = PAIRS_PER_CHUNK, selection: str = "model") -> LangRun:
    """Runs every chunk of one language through the model; returns its per-chunk statistics.

    packed: chunks share rows of one width, each a segment of its own (it sees only itself, as if alone), batch_size
    rows per forward pass; else each chunk has a row of its own, padded to its length bucket. forced: per chunk index,
    (mask [L, n], expert ids [L, n, k]): experts imposed at those tokens and layers (ForcedRouting). keep_routing:
    LangRun.routing holds each chunk's ChunkRouting. report: filled with the rows' fill ratio, the row shapes run
    and the compilations this call caused. steering: the router steered (a moejax.Steering). pairs_per_chunk: the
    token pairs of the routing consistency (sample_pairs). selection: the experts counted (segment_stats).
    """
    encoded = [tokenizer.encode(t) for t in texts]
    if any(len(e) == 0 for e in encoded):
        raise DataError("a chunk tokenised to no tokens")
    cfg = model.config
    for i, ids in enumerate(encoded):
        check_ids(ids, cfg.vocab_size, f"chunk {i} as tokenised by {tokenizer.name}")
    layers, k = len(cfg.moe_layers), cfg.num_experts_per_tok
    lengths = [len(e) for e in encoded]
    layouts = [pack(lengths)] if packed else one_per_row(lengths)
    excluded = np.array(sorted(exclude_ids), np.int64)
    results: dict[int, dict] = {}
    compiled = stats_cache_size()
    shapes = set()

    def batches():
        for layout in layouts:
            for rows, size in passes(layout.rows, batch_size):
                shapes.add((size, layout.width))
                ids = np.full((size, layout.width), tokenizer.pad_id, np.int64)
                segment_ids = np.zeros((size, layout.width), np.int32)
                pairs = np.zeros((size, layout.slots, pairs_per_chunk, 2), np.int64)
                imposed = None if forced is None else ForcedRouting.none(layers, size, layout.width, k)
                for r, row in enumerate(rows):
                    for slot, (i, at) in enumerate(row):
                        n = lengths[i]
                        ids[r, at:at + n], segment_ids[r, at:at + n] = encoded[i], slot + 1
                        pairs[r, slot] = at + sample_pairs(n, pairs_per_chunk, np.random.default_rng([seed, i]))
                        if imposed is not None and i in forced:
                            where, experts = forced[i]
                            imposed.mask[:, r, at:at + n], imposed.expert_ids[:, r, at:at + n] = where, experts
                content = (segment_ids != 0) & ~np.isin(ids, excluded)
                yield rows, segment_stats(model, ids, segment_ids, content, pairs, probabilities, forced=imposed,
                                          steering=steering, keep_routing=keep_routing, selection=selection)

    def unpack(rows, stats):
        stats = jax.device_get(stats)
        for r, row in enumerate(rows):
            for slot, (i, at) in enumerate(row):
                results[i] = {f.name: np.asarray(getattr(stats, f.name))[r, slot]
                              for f in dataclasses.fields(stats) if f.name not in ("expert_ids", "router_logits")}
                if keep_routing:
                    span = slice(at, at + lengths[i])
                    results[i]["routing"] = ChunkRouting(np.asarray(stats.expert_ids)[r, :, span],
                                                         np.asarray(stats.router_logits)[r, :, span])
        if progress is not None:
            progress(sum(len(row) for row in rows), sum(lengths[i] for row in rows for i, _ in row))

    # One pass in flight while the host reads the previous one's statistics and builds the next batch.
    pending = None
    for dispatched in batches():
        if pending is not None:
            unpack(*pending)
        pending = dispatched
    if pending is not None:
        unpack(*pending)
    if report is not None:
        tokens = sum(lengths)
        report["fill"] = tokens / sum(len(layout.rows) * layout.width for layout in layouts)
        report["compilations"] = stats_cache_size() - compiled
        report["shapes"] = sorted(shapes)
    routing = [results[i].pop("routing") for i in range(len(texts))] if keep_routing else None
    stacked = {name: np.stack([results[i][name] for i in range(len(texts))]) for name in results[0]}
    return LangRun(**stacked, tokenization=M.tokenization_stats(texts, stacked["tokens"].tolist()),
                   routing=routing)


def layer_metrics(run: LangRun, k: int, chunks=None) -> dict[str, np.ndarray]:
    """Load metrics per MoE layer over the given chunks (all by default): arrays [L]."""
    sel = slice(None) if chunks is None else chunks
    counts = run.topk_counts[sel].sum(0)
    f = M.usage_fractions(counts, k)
    return {"usage_entropy_bits": M.usage_entropy_bits(f), "usage_entropy_norm": M.usage_entropy_normalized(f),
            "gini": M.gini(counts), "gini_top1": M.gini(run.top1_counts[sel].sum(0)),
            "active_experts": M.active_experts(f).astype(float),
            "active_experts_0.001": M.active_experts(f, 0.001).astype(float),
            "selection_entropy_bits": M.selection_entropy_bits(run.entropy_sums_bits[sel].sum(0),
                                                               np.full(counts.shape[0], run.tokens[sel].sum()))}


def collapse_intervals(run: LangRun, k: int, seed: int, draws: int = BOOTSTRAP_DRAWS,
                       level: float = 0.95) -> dict[str, list[float]]:
    """Basic (reverse-percentile) bootstrap intervals (`level`, chunks resampled with replacement, `draws` times, from
    `seed`) of the collapse summary (metrics.collapse_summary) of usage entropy and Gini: [low, high] per metric. The
    basic interval, 2 x estimate - the resamples' upper and lower quantiles, corrects the plug-in entropy's bias under
    resampling (a resample repeats chunks, which shifts its entropy), where a plain percentile interval can miss the
    estimate itself."""
    rng = np.random.default_rng([seed, 29])
    chunks = len(run.tokens)
    counts_cle = np.asarray(run.topk_counts, np.float64)
    values: dict[str, list[float]] = {"usage_entropy_bits": [], "gini": []}
    for start in range(0, draws, 100):
        weights_bc = rng.multinomial(chunks, np.full(chunks, 1.0 / chunks), size=min(100, draws - start))
        counts_ble = np.einsum("bc,cle->ble", weights_bc, counts_cle)
        per_layer = {"usage_entropy_bits": M.usage_entropy_bits(M.usage_fractions(counts_ble, k)),
                     "gini": M.gini(counts_ble)}
        for name, values_bl in per_layer.items():
            values[name] += [M.collapse_summary(v_l) for v_l in values_bl]
    tail = (1 - level) / 2
    per_layer = layer_metrics(run, k)
    estimate = {name: M.collapse_summary(per_layer[name]) for name in values}
    return {name: [float(2 * estimate[name] - np.quantile(v, 1 - tail)),
                   float(2 * estimate[name] - np.quantile(v, tail))] for name, v in values.items()}


def chunk_stds(run: LangRun, k: int) -> dict[str, np.ndarray]:
    per_chunk = [layer_metrics(run, k, [c]) for c in range(len(run.tokens))]
    return {name: np.array([M.chunk_spread(np.array([pc[name][layer] for pc in per_chunk]))[1]
                            for layer in range(run.topk_counts.shape[1])]) for name in per_chunk[0]}


# The metrics that pair chunk i of one language with chunk i of another: a corpus whose languages are not parallel
# has no such pairs, and build_tables leaves them out, saying why.
NEEDS_PARALLEL = {
    "njsd": "needs parallel text: the normalised JS divergence of each aligned chunk pair, averaged over the pairs; "
            "njsd_pooled (of each language's pooled mean probabilities) is given instead",
}


def reference_language(langs: list[str]) -> str:
    """The language the others are compared with: English (any of its codes) if analysed, else the last."""
    return next((lang for lang in langs if identity(lang) == "eng_Latn"), langs[-1])


def build_tables(runs: list[ModelRun], langs: list[str], seed: int, parallel: bool = True,
                 bootstrap: int = BOOTSTRAP_DRAWS) -> dict:
    """All rows of layers/experts/pairs/lsi.csv and the summary for metrics.json and the report. parallel: chunk i
    is the same text in every language; without it the NEEDS_PARALLEL metrics are left out (`skipped` says why).
    bootstrap: resamples of the collapse summary's interval."""
    reference = reference_language(langs)
    targets = [lang for lang in langs if lang != reference]
    layers, experts, pairs, lsi_rows, summary = [], [], [], [], {}
    for run in runs:
        per_lang = {lang: layer_metrics(r, run.k) for lang, r in run.langs.items()}
        pooled = {lang: r.pooled(run.k) for lang, r in run.langs.items()}
        stds = {lang: chunk_stds(r, run.k) for lang, r in run.langs.items()}
        model_summary = {"collapse": {}, "collapse_ci": {}, "noise_floor": {}, "flags": {}, "lsi_sweep": {},
                         "activation_difference": {},
                         "routing_consistency": {},
                         "tokenization": {lang: r.tokenization for lang, r in run.langs.items()}}
        for lang, r in run.langs.items():
            for layer, block in enumerate(run.moe_blocks):
                row = {"model": run.name, "lang": lang, "layer": layer, "block": block}
                row.update({name: float(v[layer]) for name, v in per_lang[lang].items()})
                row.update({f"{name}_chunk_std": float(v[layer]) for name, v in stds[lang].items()})
                layers.append(row)
                counts, f, pbar = (x[layer] for x in pooled[lang])
                experts += [{"model": run.name, "lang": lang, "layer": layer, "block": block, "expert": e,
                             "topk_count": int(counts[e]), "topk_fraction": float(f[e]), "mean_prob": float(pbar[e])}
                            for e in range(run.experts)]
            model_summary["collapse"][lang] = {
                name: M.collapse_summary(per_lang[lang][name]) for name in ("usage_entropy_bits", "gini")}
            model_summary["collapse_ci"][lang] = collapse_intervals(r, run.k, seed, bootstrap)
            first, second = M.split_halves(len(r.tokens), seed)
            halves = [layer_metrics(r, run.k, idx) for idx in (first, second)]
            model_summary["noise_floor"][lang] = {
                name: float(np.mean(np.abs(halves[0][name] - halves[1][name])))
                for name in ("usage_entropy_bits", "gini")}
            model_summary["routing_consistency"][lang] = [
                float(v) for v in r.pair_jaccard_sums.sum(0) / max(int(r.pairs.sum()), 1)]
        for a, b in itertools.combinations(langs, 2):
            ra, rb = run.langs[a], run.langs[b]
            for layer, block in enumerate(run.moe_blocks):
                (_, fa, pbar_a), (_, fb, pbar_b) = ((x[layer] for x in pooled[lang]) for lang in (a, b))
                jac, over = M.topk_overlap(fa, fb, run.k)
                pairs.append({"model": run.name, "layer": layer, "block": block, "lang_a": a, "lang_b": b,
                              "cosine": M.cosine(fa, fb), "cosine_pbar": M.cosine(pbar_a, pbar_b),
                              "topk_jaccard": jac, "topk_overlap": over,
                              "spearman": M.spearman(fa, fb), "kendall": M.kendall_tau_b(fa, fb),
                              "njsd_pooled": M.normalized_jsd(pbar_a, pbar_b)})
                if parallel:
                    p, q = (M.mean_probabilities(x.prob_sums[:, layer], x.tokens) for x in (ra, rb))
                    pairs[-1]["njsd"] = M.normalized_jsd(p, q)
        for target in targets:
            ra, rb = run.langs[target], run.langs[reference]
            per_layer = M.lsi(pooled[target][2], pooled[reference][2])
            for layer, block in enumerate(run.moe_blocks):
                values = per_layer[layer]
                lsi_rows += [{"model": run.name, "lang_a": target, "lang_b": reference, "layer": layer,
                              "block": block, "expert": e, "lsi": float(values[e])} for e in range(run.experts)]
            mean = np.mean(per_layer, axis=0)
            cats = M.lsi_categories(mean)
            lsi_rows += [{"model": run.name, "lang_a": target, "lang_b": reference, "layer": "mean", "block": "mean",
                          "expert": e, "lsi": float(mean[e]), "category": int(cats[e])} for e in range(run.experts)]
            model_summary["lsi_sweep"][f"{target}-{reference}"] = {str(t): c for t, c in M.lsi_sweep(mean).items()}
            delta = M.activation_difference(ra.topk_counts.sum((0, 1)), ra.tokens.sum() * len(run.moe_blocks),
                                            rb.topk_counts.sum((0, 1)), rb.tokens.sum() * len(run.moe_blocks))
            per_seq = M.activation_difference_per_sequence(ra.topk_counts.sum(1), ra.tokens * len(run.moe_blocks),
                                                           rb.topk_counts.sum(1), rb.tokens * len(run.moe_blocks))
            model_summary["activation_difference"][f"{target}-{reference}"] = {
                "pooled": [float(x) for x in delta], "per_sequence": [float(x) for x in per_seq]}
            flags = []
            for layer in range(len(run.moe_blocks)):
                name = "usage_entropy_bits"
                if M.gap_exceeds_spread(per_lang[target][name][layer], per_lang[reference][name][layer],
                                        stds[target][name][layer], stds[reference][name][layer]):
                    flags.append(layer)
            model_summary["flags"][f"{target}-{reference}"] = flags
        summary[run.name] = model_summary
    return {"layers": layers, "experts": experts, "pairs": pairs, "lsi": lsi_rows, "summary": summary,
            "reference": reference, "targets": targets, "parallel": parallel,
            "skipped": {} if parallel else dict(NEEDS_PARALLEL),
            "divergence": "njsd" if parallel else "njsd_pooled"}  # the pairs column the figures and report show
