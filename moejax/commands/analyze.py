"""`moejax analyze`: routing statistics of several models over a parallel corpus, the tables of docs/metrics.md, figures
and a written report in OUT (replaced only when the run completes)."""

from __future__ import annotations

import dataclasses
import json
import sys
import time
from pathlib import Path
from typing import TYPE_CHECKING

from tqdm import tqdm

from moejax.commands.options import MESH_HELP, STEERING_HELP, check_options, option
from moejax.data.corpus import chunk, read_corpus
from moejax.data.languages import check_codes
from moejax.data.tokenize import ByteTokenizer, HFTokenizer
from moejax.errors import DataError, SettingsError
from moejax.io import check_output, output_directory, versions, write_csv
from moejax.models.builtin import NAME
from moejax.routing import BOOTSTRAP_DRAWS, PAIRS_PER_CHUNK, PROBABILITIES, SELECTIONS

if TYPE_CHECKING:
    from moejax.routing.analysis import ModelRun


@dataclasses.dataclass(frozen=True)
class AnalyzeSettings:
    """Everything `moejax analyze` takes; the defaults run the built-in model on the built-in corpus."""

    model: tuple[str, ...] = option(
        (), "Hugging Face or `moejax convert` checkpoint directory with its tokenizer, optionally labelled (repeat "
        "to compare models, e.g. base=DIR1 cpt=DIR2); default: the built-in demonstration model",
        metavar="[LABEL=]DIR", repeat=True)
    # --- languages and corpora (docs/analysis.md): any code, any layout, parallel or not ---
    langs: tuple[str, ...] = option(
        ("en", "he", "ja"), "comma-separated language codes: ISO 639-1 (yo), ISO 639-3 (yor), FLORES-200 (yor_Latn, "
        "arb_Latn), or any other name of a file or column (used as written); the reference is English if present, "
        "else the last", kind=list)
    data: str | None = option(
        None, "a FLORES-200 directory (flores200_dataset/{dev,devtest}/{code}.dev/.devtest), a Belebele directory "
        "(data/{code}.jsonl: its passages), a TSV/CSV (header of language codes) or JSONL file with one column per "
        "language, or a directory of {lang}.txt (a text per line) or {lang}.jsonl ({\"text\": ...}) files, parallel "
        "or not; default: the built-in sample corpus", metavar="CORPUS")
    parallel: bool = option(False, "the languages' texts are translations of each other, row by row: differing "
                            "line counts are an error (default: parallel when every language has the same rows)",
                            kind=bool)
    no_parallel: bool = option(False, "analyse each language's texts alone, pairing no chunks across languages (the "
                               "metrics that need aligned chunks are skipped and listed)", kind=bool)
    # --- end languages and corpora ---
    out: Path = option(Path("moejax-analysis"), "output directory (replaced only when the run succeeds)", kind=Path)
    chunk_mode: str = option("paragraph", "paragraph: consecutive sentences up to ~--chunk-words words; sentence: "
                             "one sentence each", choices=("paragraph", "sentence"))
    chunk_words: int = option(300, "target words per paragraph chunk", kind=int, minimum=1)
    batch_size: int = option(8, "rows per forward pass (each row packs as many chunks as fit)", kind=int, minimum=1)
    no_packing: bool = option(False, "one chunk per row, padded to its length bucket (as before packing: more "
                              "compilations, emptier rows; the tables are the same)", kind=bool)
    selection: str = option("model", "the experts counted as a token's choice: the model's own (for Nemotron-H its "
                            "correction bias and group limit decide), or raw: the top-K of softmax(raw router "
                            "logits), what paper A's hooks on the gate compute (the same experts for Qwen3-MoE, "
                            "OLMoE and GPT-OSS)", choices=SELECTIONS)
    probabilities: str = option("softmax", "P_t for the probability metrics: softmax of the raw logits (paper a), "
                                "or the model's native scores (sigmoid for Nemotron-H)", choices=PROBABILITIES)
    exclude_ids: tuple[int, ...] = option(
        (), "extra token ids to exclude from every metric (e.g. chat-template tokens), comma-separated; the "
        "tokenizer's special tokens are always excluded", kind=list, element=int, minimum=0)
    skip_incomplete: bool = option(False, "drop the corpus rows where a language's cell is empty (reported per "
                                   "language) instead of stopping at the first", kind=bool)
    allow_nonfinite: bool = option(False, "load checkpoints holding NaN or infinite weights (to study broken "
                                   "checkpoints) instead of refusing them", kind=bool)
    seed: int = option(0, "seed for same-language splits and token-pair sampling", kind=int, minimum=0)
    max_chunks: int | None = option(None, "use at most the first N chunks of each language (paper A: 1300); "
                                    "default all", kind=int, minimum=1, metavar="N")
    bootstrap: int = option(BOOTSTRAP_DRAWS, "resamples of the chunks for the collapse summary's 95% interval",
                            kind=int, minimum=10, metavar="N")
    pairs: int = option(PAIRS_PER_CHUNK, "routing consistency: distinct token pairs per chunk, sampled without "
                        "replacement (all of them in a shorter chunk); paper B's 500 per sequence by default",
                        kind=int, minimum=1, metavar="N")
    steering: Path | None = option(
        None, STEERING_HELP + "; each model also runs steered, as LABEL+steered beside LABEL, so the tables compare "
        "the routing with and without steering", kind=Path, metavar="FILE")
    mesh: str | None = option(None, MESH_HELP, metavar="AXIS=N,...")
    dtype: str = option("float32", "parameter dtype (auto: the checkpoint's own, e.g. bfloat16 for a 30B model on a "
                        "TPU slice; the routing statistics are computed in float32 either way)",
                        choices=("float32", "bfloat16", "auto"))
    scores: tuple[str, ...] = option(
        (), "per-language downstream scores (e.g. Belebele accuracy), a CSV of lang,score or the scores.csv of "
        "`moejax eval`: writes divergence_scores.csv (per model and MoE layer, the correlation of the divergence "
        "from the reference language with the score, paper B) and u_curve.png; LABEL=FILE gives one model's own "
        "(repeat for several); needs 3 scored languages besides the reference", metavar="[LABEL=]FILE", repeat=True)
    score_metric: str | None = option(
        None, "which scores of a `moejax eval` scores.csv holding several tasks or metrics: METRIC, FAMILY/METRIC or "
        "FAMILY/METRIC/FILTER (e.g. belebele/acc)", metavar="[FAMILY/]METRIC")
    quiet: bool = option(False, "no progress bars", kind=bool)

    def __post_init__(self):
        check_options(self)
        check_codes(self.langs, least=2)  # languages and corpora
        if self.parallel and self.no_parallel:  # languages and corpora
            raise SettingsError("give --parallel or --no-parallel, not both")
        if self.score_metric is not None and not self.scores:
            raise SettingsError("--score-metric picks among the scores of --scores FILE: give --scores too")


def model_label(spec: str | None) -> tuple[str, str | None]:
    """(label, directory) of a --model value, "DIR" or "LABEL=DIR"; the built-in model's for None."""
    if spec is None:
        return NAME, None
    label, sep, path = spec.partition("=")
    if not sep or not label or Path(spec).exists():
        label, path = Path(spec).name, spec
    return label, path


def load_model(spec: str | None, mesh=None, allow_nonfinite: bool = False, dtype: str = "float32"):
    """(label, path, model, tokenizer) for "DIR" or "LABEL=DIR" (DIR: a checkpoint or a training run), or the
    built-in model for None; parameters in `dtype` ("auto": the checkpoint's)."""
    from moejax.opening import open_model

    if spec is None:
        return NAME, "builtin", open_model(None, mesh=mesh).model, ByteTokenizer()
    label, path = model_label(spec)
    opened = open_model(path, dtype, mesh=mesh, allow_nonfinite=allow_nonfinite)
    model, tokenizer = opened.model, HFTokenizer(opened.files)
    if not model.config.moe_layers:
        raise DataError(f"{path}: the model has no MoE layers; there is no routing to analyse")
    return label, str(path), model, tokenizer


def _run_model(s: AnalyzeSettings, name: str, where: str, model, tokenizer, corpus, excluded, steering,
               layouts: dict) -> ModelRun:
    """One model's statistics over every language (steered when `steering` is given); fills layouts."""
    from moejax.routing.analysis import ModelRun, collect

    langs = list(s.langs)
    lang_runs = {}
    for lang in langs:
        with tqdm(total=len(corpus[lang]), desc=f"{name} {lang}", unit="chunk", disable=s.quiet) as bar:
            tokens_done, t0 = [0], time.perf_counter()

            def progress(n_chunks, n_tokens, bar=bar, tokens_done=tokens_done, t0=t0):
                tokens_done[0] += n_tokens
                bar.update(n_chunks)
                bar.set_postfix(tok_s=f"{tokens_done[0] / max(time.perf_counter() - t0, 1e-9):.0f}")

            report = {}
            lang_runs[lang] = collect(model, tokenizer, corpus[lang], exclude_ids=excluded,
                                      batch_size=s.batch_size, probabilities=s.probabilities, seed=s.seed,
                                      progress=progress, packed=not s.no_packing, report=report,
                                      steering=steering, pairs_per_chunk=s.pairs, selection=s.selection)
        layouts[f"{name}/{lang}"] = report
        if not s.quiet:
            print(f"{name} {lang}: rows of {', '.join(sorted({str(w) for _, w in report['shapes']}))} tokens, "
                  f"{report['fill']:.0%} full, {report['compilations']} compilation(s)", file=sys.stderr)
    cfg = model.config
    return ModelRun(name=name, path=where, model_type=cfg.model_type, moe_blocks=cfg.moe_layers,
                    k=cfg.num_experts_per_tok, experts=cfg.num_routed_experts, excluded_ids=excluded, langs=lang_runs)


def _read_scores(s: AnalyzeSettings, langs: list[str], steering) -> list:
    """--scores, read and checked against the languages and the model labels before any model runs; prints the
    warnings (languages scored but not analysed, analysed but not scored)."""
    from moejax.routing.languages import read_all_scores

    labels = [model_label(spec)[0] for spec in s.model or (None,)]
    labels += [f"{label}+steered" for label in labels] if steering is not None else []
    scores, warnings = read_all_scores(list(s.scores), labels, langs, s.score_metric)
    for warning in warnings:
        print(f"moejax analyze: {warning}", file=sys.stderr)
    return scores


def analyze(settings: AnalyzeSettings) -> Path:
    """Runs the whole analysis and writes OUT (CSV tables, metrics.json, figures, report.md); with a mesh, each
    model is loaded onto it and runs sharded (MoE blocks expert-parallel). Returns OUT."""
    import jax

    from moejax.models.steering import Steering
    from moejax.parallel.mesh import make_mesh
    from moejax.report.figures import language_figures, write_figures
    from moejax.report.markdown import write_report
    from moejax.routing.analysis import build_tables
    from moejax.routing.languages import LANGUAGE_VARIANTS, add_language_tables, split_scores_spec, vocabulary_counts

    s = settings
    inputs = [s.data, s.steering, *(spec.partition("=")[2] if "=" in spec and not Path(spec).exists() else spec
                                    for spec in s.model)]
    inputs += [split_scores_spec(spec)[1] for spec in s.scores]
    out = check_output(s.out, "analyze", inputs)  # before any work: nothing of the user's is replaced
    steering = None if s.steering is None else Steering.from_json(s.steering)
    langs = list(s.langs)
    scores = _read_scores(s, langs, steering)
    mesh = make_mesh(s.mesh) if s.mesh else None
    # --- languages and corpora: parallel or not, decided by the flags or by the data ---
    sentences = read_corpus(s.data, langs, skip_incomplete=s.skip_incomplete,
                            parallel=True if s.parallel else False if s.no_parallel else None)
    # --- end languages and corpora ---
    if any(sentences.skipped.values()):
        print("moejax analyze: skipped incomplete corpus rows, by language whose text was empty: "
              + ", ".join(f"{lang} {n}" for lang, n in sentences.skipped.items()), file=sys.stderr)
    corpus = chunk(sentences, s.chunk_words, s.chunk_mode)
    if s.max_chunks is not None:
        corpus = {lang: texts[:s.max_chunks] for lang, texts in corpus.items()}
    runs, layouts, vocabularies = [], {}, []
    started = time.perf_counter()
    for spec in s.model or (None,):
        base_name, where, model, tokenizer = load_model(spec, mesh, s.allow_nonfinite, s.dtype)
        outside = [i for i in s.exclude_ids if i >= model.config.vocab_size]
        if outside:
            raise SettingsError(f"--exclude-ids {outside[0]} is outside {base_name}'s vocabulary of "
                                f"{model.config.vocab_size} tokens")
        if steering is not None:
            steering.check(model.config)
        excluded = sorted(set(tokenizer.special_ids) | set(s.exclude_ids))
        vocabulary = vocabulary_counts(tokenizer, corpus, excluded, model.config.vocab_size)
        for name, steer in [(base_name, None)] + ([] if steering is None else [(f"{base_name}+steered", steering)]):
            runs.append(_run_model(s, name, where, model, tokenizer, corpus, excluded, steer, layouts))
            vocabularies.append(vocabulary)
    names = [r.name for r in runs]
    if len(set(names)) != len(names):
        for i, run in enumerate(runs):
            run.name = f"{i}:{run.name}"
    if not s.quiet:  # said once the input is known good (bad input gets its one line alone)
        print(f"moejax analyze: {'parallel' if sentences.parallel else 'not parallel'} ({sentences.why})",
              file=sys.stderr)
    tables = build_tables(runs, langs, s.seed, sentences.parallel, s.bootstrap)
    for metric, why in tables["skipped"].items():  # languages and corpora: what a non-parallel corpus cannot give
        print(f"moejax analyze: skipped {metric}: {why}", file=sys.stderr)
    add_language_tables(tables, runs, vocabularies, scores)  # papers B and C: languages.csv, divergence_scores.csv
    if jax.process_index() != 0:  # multi-host: every host computed the same tables; the first writes them
        return out
    with output_directory(out, "analyze", inputs) as tmp:
        for table in ("layers", "experts", "pairs", "lsi"):
            write_csv(tmp / f"{table}.csv", tables[table])
        for table in ("languages", "divergence_scores"):  # the second only with --scores
            if table in tables:
                write_csv(tmp / f"{table}.csv", tables[table])
        recorded = {
            "models": {r.name: {"path": r.path, "model_type": r.model_type, "moe_blocks": list(r.moe_blocks),
                                "experts": r.experts, "top_k": r.k, "excluded_token_ids": r.excluded_ids,
                                "tokens": {lang: int(lr.tokens.sum()) for lang, lr in r.langs.items()},
                                "chunks": {lang: len(lr.tokens) for lang, lr in r.langs.items()}} for r in runs},
            "langs": langs, "reference": tables["reference"], "data": s.data or "builtin sample corpus",
            "skipped_incomplete_rows": sentences.skipped,
            "parallel": {"asked": "--parallel" if s.parallel else "--no-parallel" if s.no_parallel else "auto",
                         "parallel": sentences.parallel, "why": sentences.why},
            "skipped": tables["skipped"],
            "packing": {"packed": not s.no_packing, "batch_rows": s.batch_size,
                        "layouts": {key: {"fill": r["fill"], "compilations": r["compilations"],
                                          "row_shapes": [list(shape) for shape in r["shapes"]]}
                                    for key, r in layouts.items()}},
            "chunking": {"mode": s.chunk_mode, "words": s.chunk_words}, "probabilities": s.probabilities,
            "selection": s.selection, "dtype": s.dtype,
            "steering": None if steering is None else steering.to_dict(),
            "seed": s.seed,
            "variants": {"usage": "top-K counts (f)", "gini": "top-K counts (gini_top1: top-1 counts)",
                         "active_experts": "theta 0 (active_experts_0.001: theta 0.001)",
                         "cosine": "f vectors (cosine_pbar: mean probabilities)", "lsi_theta": 0.1,
                         "njsd": "per aligned chunk, averaged (parallel corpora only)",
                         "njsd_pooled": "of each language's mean probabilities over all its tokens",
                         "activation_difference": "a_e over all MoE layers",
                         "routing_consistency": f"mean Jaccard of {s.pairs} distinct token pairs per chunk, sampled "
                                                "without replacement"},
            "seconds": time.perf_counter() - started, "versions": versions(),
            "summary": tables["summary"],
            "scores": tables.get("scores"),
        }
        recorded["variants"].update(LANGUAGE_VARIANTS)
        (tmp / "metrics.json").write_text(json.dumps(recorded, indent=2))
        figures = write_figures(tmp, tables, runs, langs)
        figures.update(language_figures(tmp, tables, [r.name for r in runs]))
        write_report(tmp / "report.md", tables, recorded, figures)
    return out



