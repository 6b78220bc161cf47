"""`moejax analyze`: routing statistics of several models over a parallel corpus, the METRICS.md tables,
figures and a written report.

Each language's chunks run in their own forward passes (never mixed with another language), padded
into a few length buckets and fixed-size batches so a long corpus compiles a handful of programs.
Statistics are reduced in the jitted forward (moejax.routing.stats); only per-chunk [layers, experts]
arrays reach the host. Outputs are written to a temporary directory beside OUT and moved into place
at the end, so a failed run leaves nothing half-written in OUT.
"""

from __future__ import annotations

import dataclasses
import itertools
import json
import time
from pathlib import Path

import jax
import numpy as np

from moejax.data.corpus import CorpusError, chunk, read_corpus
from moejax.data.tokenize import ByteTokenizer, HFTokenizer
from moejax.report.output import atomic_directory, versions, write_csv
from moejax.routing import metrics as M
from moejax.routing.stats import chunk_stats

# Powers of two and 1.5x powers of two: padding stays under a third of a sequence (~15% on average)
# while a corpus compiles at most a dozen shapes.
BUCKETS = (64, 96, 128, 192, 256, 384, 512, 768, 1024, 1536, 2048, 3072, 4096, 6144, 8192)
PAIRS_PER_CHUNK = 64


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


def _bucket(length: int) -> int:
    for size in BUCKETS:
        if length <= size:
            return size
    return -(-length // BUCKETS[-1]) * BUCKETS[-1]


def collect(model, tokenizer, texts: list[str], *, exclude_ids, batch_size: int, probabilities: str, seed: int,
            progress=None) -> LangRun:
    """Runs every chunk of one language through the model; returns its per-chunk statistics."""
    encoded = [tokenizer.encode(t) for t in texts]
    if any(len(e) == 0 for e in encoded):
        raise CorpusError("a chunk tokenised to no tokens")
    excluded = np.array(sorted(exclude_ids), np.int64)
    order = sorted(range(len(encoded)), key=lambda i: len(encoded[i]))
    results: dict[int, dict] = {}
    for bucket, members in itertools.groupby(order, key=lambda i: _bucket(len(encoded[i]))):
        members = list(members)
        for start in range(0, len(members), batch_size):
            rows = members[start:start + batch_size]
            ids = np.full((batch_size, bucket), tokenizer.pad_id, np.int64)
            mask = np.zeros((batch_size, bucket), np.int64)
            pairs = np.zeros((batch_size, PAIRS_PER_CHUNK, 2), np.int64)
            for r, i in enumerate(rows):
                n = len(encoded[i])
                ids[r, :n], mask[r, :n] = encoded[i], 1
                pairs[r] = np.random.default_rng([seed, i]).integers(0, n, (PAIRS_PER_CHUNK, 2))
            content = mask.astype(bool) & ~np.isin(ids, excluded)
            stats = jax.device_get(chunk_stats(model, ids, mask, content, pairs, probabilities))
            for r, i in enumerate(rows):
                results[i] = {f.name: np.asarray(getattr(stats, f.name))[r] for f in dataclasses.fields(stats)}
            if progress is not None:
                progress(len(rows), int(mask.sum()))
    stacked = {name: np.stack([results[i][name] for i in range(len(texts))]) for name in results[0]}
    return LangRun(**stacked, tokenization=M.tokenization_stats(texts, stacked["tokens"].tolist()))


def _load(spec: str | None, mesh=None):
    """(name, path, model, tokenizer) for "DIR" or "LABEL=DIR", or the built-in model for None."""
    from moejax.loading import from_pretrained
    from moejax.models.builtin import NAME, builtin_model
    from moejax.parallel.mesh import shard_model

    if spec is None:
        model = builtin_model()
        return NAME, "builtin", model if mesh is None else shard_model(model, mesh), ByteTokenizer()
    label, sep, path = spec.partition("=")
    if not sep or not label or Path(spec).exists():
        label, path = Path(spec).name, spec
    tokenizer = HFTokenizer(path)
    model = from_pretrained(path, mesh=mesh)
    if not model.config.moe_layers:
        raise CorpusError(f"{path}: the model has no MoE layers; there is no routing to analyse")
    return label, str(path), model, tokenizer


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


def chunk_stds(run: LangRun, k: int) -> dict[str, np.ndarray]:
    per_chunk = [layer_metrics(run, k, [c]) for c in range(len(run.tokens))]
    return {name: np.array([M.chunk_spread(np.array([pc[name][layer] for pc in per_chunk]))[1]
                            for layer in range(run.topk_counts.shape[1])]) for name in per_chunk[0]}


def build_tables(runs: list[ModelRun], langs: list[str], seed: int) -> dict:
    """All rows of layers/experts/pairs/lsi.csv and the summary for metrics.json and the report."""
    reference = "en" if "en" in langs else langs[-1]
    targets = [lang for lang in langs if lang != reference]
    layers, experts, pairs, lsi_rows, summary = [], [], [], [], {}
    for run in runs:
        per_lang = {lang: layer_metrics(r, run.k) for lang, r in run.langs.items()}
        pooled = {lang: r.pooled(run.k) for lang, r in run.langs.items()}
        stds = {lang: chunk_stds(r, run.k) for lang, r in run.langs.items()}
        model_summary = {"collapse": {}, "noise_floor": {}, "flags": {}, "lsi_sweep": {}, "activation_difference": {},
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
                p, q = (M.mean_probabilities(x.prob_sums[:, layer], x.tokens) for x in (ra, rb))
                pairs.append({"model": run.name, "layer": layer, "block": block, "lang_a": a, "lang_b": b,
                              "cosine": M.cosine(fa, fb), "cosine_pbar": M.cosine(pbar_a, pbar_b),
                              "topk_jaccard": jac, "topk_overlap": over,
                              "spearman": M.spearman(fa, fb), "kendall": M.kendall_tau_b(fa, fb),
                              "njsd": M.normalized_jsd(p, q)})
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
            "reference": reference, "targets": targets}


def analyze(models: list[str | None], langs: list[str], data: str | None, out: str | Path, *, chunk_words: int = 300,
            mode: str = "paragraph", batch_size: int = 8, probabilities: str = "softmax",
            exclude_ids: list[int] | None = None, seed: int = 0, show_progress: bool = True, mesh=None) -> Path:
    """Runs the whole analysis and writes OUT (CSV tables, metrics.json, figures, report.md); with `mesh`,
    each model is loaded onto it and runs sharded (MoE blocks expert-parallel)."""
    from tqdm import tqdm

    from moejax.report.figures import write_figures
    from moejax.report.markdown import write_report

    out = Path(out)
    corpus = chunk(read_corpus(data, langs), chunk_words, mode)
    runs = []
    started = time.perf_counter()
    for path in models:
        name, where, model, tokenizer = _load(path, mesh)
        excluded = sorted(set(tokenizer.special_ids) | set(exclude_ids or ()))
        lang_runs = {}
        for lang in langs:
            bar = tqdm(total=len(corpus[lang]), desc=f"{name} {lang}", unit="chunk", disable=not show_progress)
            tokens_done, t0 = [0], time.perf_counter()

            def progress(n_chunks, n_tokens, bar=bar, tokens_done=tokens_done, t0=t0):
                tokens_done[0] += n_tokens
                bar.update(n_chunks)
                bar.set_postfix(tok_s=f"{tokens_done[0] / max(time.perf_counter() - t0, 1e-9):.0f}")

            lang_runs[lang] = collect(model, tokenizer, corpus[lang], exclude_ids=excluded, batch_size=batch_size,
                                      probabilities=probabilities, seed=seed, progress=progress)
            bar.close()
        cfg = model.config
        runs.append(ModelRun(name=name, path=where, model_type=cfg.model_type, moe_blocks=cfg.moe_layers,
                             k=cfg.num_experts_per_tok,
                             experts=getattr(cfg, "num_experts", None) or cfg.n_routed_experts,
                             excluded_ids=excluded, langs=lang_runs))
    names = [r.name for r in runs]
    if len(set(names)) != len(names):
        for i, run in enumerate(runs):
            run.name = f"{i}:{run.name}"
    tables = build_tables(runs, langs, seed)
    if jax.process_index() != 0:  # multi-host: every host computed the same tables; the first writes them
        return out
    with atomic_directory(out) as tmp:
        for name in ("layers", "experts", "pairs", "lsi"):
            write_csv(tmp / f"{name}.csv", tables[name])
        settings = {
            "models": {r.name: {"path": r.path, "model_type": r.model_type, "moe_blocks": list(r.moe_blocks),
                                "experts": r.experts, "top_k": r.k, "excluded_token_ids": r.excluded_ids,
                                "tokens": {lang: int(lr.tokens.sum()) for lang, lr in r.langs.items()},
                                "chunks": {lang: len(lr.tokens) for lang, lr in r.langs.items()}} for r in runs},
            "langs": langs, "reference": tables["reference"], "data": data or "builtin sample corpus",
            "chunking": {"mode": mode, "words": chunk_words}, "probabilities": probabilities, "seed": seed,
            "variants": {"usage": "top-K counts (f)", "gini": "top-K counts (gini_top1: top-1 counts)",
                         "active_experts": "theta 0 (active_experts_0.001: theta 0.001)",
                         "cosine": "f vectors (cosine_pbar: mean probabilities)", "lsi_theta": 0.1,
                         "njsd": "per aligned chunk, averaged", "activation_difference": "a_e over all MoE layers",
                         "routing_consistency": f"mean Jaccard of {PAIRS_PER_CHUNK} sampled token pairs per chunk"},
            "seconds": time.perf_counter() - started, "versions": versions(),
            "summary": tables["summary"],
        }
        (tmp / "metrics.json").write_text(json.dumps(settings, indent=2))
        figures = write_figures(tmp, tables, runs, langs)
        write_report(tmp / "report.md", tables, settings, figures)
    return out

