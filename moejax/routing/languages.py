"""Language-level analyses of `moejax analyze` (docs/metrics.md, "Languages"): paper b's routing divergence from the
reference language against per-language downstream scores (divergence_scores.csv), and paper c's language-level JS
divergence, IG(L;E)/H(L) and vocabulary overlap (languages.csv, columns of pairs.csv).

Everything here is computed from per-language aggregates (top-K counts, mean probabilities, token-id counts) and the
pairs table, so it holds for corpora whose languages are not parallel.
"""

from __future__ import annotations

import csv
import dataclasses
import io
import itertools
import math
from pathlib import Path

import numpy as np

from moejax.data.corpus import read_text
from moejax.data.languages import identity, lookup
from moejax.errors import DataError, SettingsError
from moejax.routing import metrics as M
from moejax.routing.analysis import reference_language

LEAST_SCORED = 3  # Pearson's p-value needs n - 2 >= 1 degrees of freedom
# What metrics.json records of these metrics' variants (docs/metrics.md, "Languages").
LANGUAGE_VARIANTS = {
    "jsd": "language-level JSD (nats) of the languages' top-K usage fractions f (jsd_pbar: of their chunk-averaged "
           "mean probabilities)",
    "ig_norm": "IG(L;E)/H(L) over (token, chosen expert) assignments, languages weighted by their tokens "
               "(ig_norm_uniform: equally)",
    "vocab_overlap": "Jaccard of the content token ids each language used (vocab_weighted: sum over ids of the "
                     "smaller token frequency)",
    "divergence_scores": "the divergence from the reference language (njsd; njsd_pooled when the corpus is not "
                         "parallel) against the score, over the other scored languages",
}


@dataclasses.dataclass(frozen=True)
class Scores:
    """One score per language from a --scores file: `what` names the score (a column, or an eval task and metric);
    label: the model (run name) they belong to, None for every model."""

    path: str
    label: str | None
    what: str
    by_lang: dict[str, float]  # by the language code as the file writes it

    def matched(self, langs: list[str]) -> dict[str, float]:
        """{analysed language: its score}, a code of the file naming the same language as one of `langs` (he,
        heb, heb_Hebr are one language)."""
        written = {identity(code): score for code, score in self.by_lang.items()}
        return {lang: written[identity(lang)] for lang in langs if identity(lang) in written}

    def unmatched(self, langs: list[str]) -> list[str]:
        """The file's languages that are none of `langs`."""
        analysed = {identity(lang) for lang in langs}
        return [code for code in self.by_lang if identity(code) not in analysed]


def _number(path, line: int, column: str, text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        raise DataError(f"{path}: line {line}, column {column}: {text!r} is not a number") from None
    if not math.isfinite(value):
        raise DataError(f"{path}: line {line}, column {column}: the score is {text!r}, not a finite number")
    return value


def _eval_language(row: dict) -> str:
    """The language of a `moejax eval` scores.csv row: its language column, else a FLORES-200 code ending the task
    name (belebele_heb_Hebr)."""
    if (row.get("language") or "").strip():
        return row["language"].strip()
    found = lookup("_".join((row.get("task") or "").split("_")[-2:]))
    return found.flores if found is not None and found.flores else ""


def _choose(path, rows: list[tuple[int, dict]], choice: str | None) -> tuple[str, list[tuple[int, dict]]]:
    """The rows of one task family, metric and filter: the only one the file holds, or the one `choice` names."""
    def key(row):
        return f"{row['family'] or row['task']}/{row['metric']}/{row['filter']}"

    def named(found_key: str, parts: list[str]) -> bool:  # METRIC, FAMILY/METRIC or FAMILY/METRIC/FILTER
        family, metric, filter_name = found_key.split("/")
        return [metric] == parts if len(parts) == 1 else [family, metric, filter_name][:len(parts)] == parts

    found = sorted({key(row) for _, row in rows})
    chosen = found
    if choice is not None:
        parts = choice.strip("/").split("/")
        chosen = [k for k in found if named(k, parts)]
        if not chosen:
            raise SettingsError(f"--score-metric {choice}: {path} has no such scores; it holds {', '.join(found)}")
    if len(chosen) > 1:
        raise SettingsError(f"{path} holds several scores per language ({', '.join(chosen)}); choose one with "
                            f"--score-metric FAMILY/METRIC[/FILTER] (e.g. --score-metric {chosen[0]})")
    return chosen[0], [(line, row) for line, row in rows if key(row) == chosen[0]]


def split_scores_spec(spec: str) -> tuple[str | None, str]:
    """(label or None, file) of a --scores value "FILE" or "LABEL=FILE" (a file whose name holds "=" is a file)."""
    label, sep, path = spec.partition("=")
    if not sep or not label or Path(spec).exists():
        return None, spec
    return label, path


def read_scores(spec: str, labels: list[str], choice: str | None = None) -> Scores:
    """One --scores value, "FILE" or "LABEL=FILE" (LABEL one of `labels`, the runs' names): a CSV of `lang,score`
    (a language column `lang` or `language`, a `score` column), or the scores.csv `moejax eval` writes (task,
    language, family, metric, filter, value, ...), of which `choice` (--score-metric) picks a family and metric."""
    label, path = split_scores_spec(spec)
    if label is not None and label not in labels:
        raise SettingsError(f"--scores {spec}: no model is labelled {label!r} (the models: {', '.join(labels)})")
    if not Path(path).is_file():
        raise DataError(f"--scores {path}: no such file")
    reader = csv.DictReader(io.StringIO(read_text(Path(path), "a scores CSV")))
    header = [name.strip() for name in reader.fieldnames or []]
    reader.fieldnames = header
    rows = list(enumerate(reader, start=2))
    if {"task", "metric", "value"} <= set(header):  # `moejax eval`'s scores.csv
        rows = [(line, row) for line, row in rows if _eval_language(row)]
        if not rows:
            raise DataError(f"{path}: no row names a language (its language column is empty and no task name ends "
                            "in a FLORES-200 code)")
        what, rows = _choose(path, rows, choice)
        entries = [(line, _eval_language(row), row["value"], "value") for line, row in rows]
    else:
        lang_column = next((c for c in ("lang", "language") if c in header), None)
        if lang_column is None or "score" not in header:
            raise DataError(f"{path}: needs a language column (lang or language) and a score column (score), as in "
                            f"`lang,score`, or the scores.csv of `moejax eval`; its columns are {header}")
        if choice is not None:
            raise SettingsError(f"--score-metric {choice}: {path} holds one score per language (lang,score); "
                                "--score-metric picks among the tasks of a `moejax eval` scores.csv")
        what = "score"
        entries = [(line, (row[lang_column] or "").strip(), row["score"] or "", "score") for line, row in rows]
    by_lang, first_line = {}, {}
    for line, lang, text, column in entries:
        if not lang:
            raise DataError(f"{path}: line {line} names no language")
        if identity(lang) in first_line:
            raise DataError(f"{path}: two scores for language {lang!r} (lines {first_line[identity(lang)]} and "
                            f"{line}); keep one score per language")
        by_lang[lang], first_line[identity(lang)] = _number(path, line, column, text), line
    if not by_lang:
        raise DataError(f"{path}: no scores")
    return Scores(path=str(path), label=label, what=what, by_lang=by_lang)


def check_scores(scores: Scores, langs: list[str]) -> list[str]:
    """The warnings for one Scores against the analysed languages; a DataError when fewer than LEAST_SCORED of the
    languages other than the reference have a score (the correlation needs them)."""
    reference = reference_language(langs)
    targets = [lang for lang in langs if lang != reference]
    matched = scores.matched(targets)
    scored = [lang for lang in targets if lang in matched]
    if len(scored) < LEAST_SCORED:
        raise DataError(f"--scores {scores.path}: {len(scored)} of the languages compared with {reference} have a "
                        f"score ({', '.join(scored) or 'none'} of {', '.join(targets)}); the correlation needs at "
                        f"least {LEAST_SCORED}: analyse more languages (--langs) or score more")
    warnings = []
    unused = scores.unmatched(langs)
    if unused:
        warnings.append(f"--scores {scores.path}: languages not analysed, their scores unused: {', '.join(unused)}")
    missing = [lang for lang in targets if lang not in matched]
    if missing:
        warnings.append(f"--scores {scores.path}: analysed languages without a score, left out of the correlation: "
                        f"{', '.join(missing)}")
    return warnings


def read_all_scores(specs: list[str], labels: list[str], langs: list[str], choice: str | None = None
                    ) -> tuple[list[Scores], list[str]]:
    """Every --scores value read (read_scores) and checked against the languages (check_scores), at most one per
    model label and one unlabelled; returns them and the warnings."""
    scores = [read_scores(spec, labels, choice) for spec in specs]
    seen = [s.label for s in scores]
    twice = next((label for label in seen if seen.count(label) > 1), "")
    if twice != "":
        raise SettingsError(f"--scores given twice for {'model ' + repr(twice) if twice else 'every model'}: "
                            "give one file per model (LABEL=FILE) and at most one without a label")
    return scores, [warning for s in scores for warning in check_scores(s, langs)]


def vocabulary_counts(tokenizer, texts: dict[str, list[str]], excluded, vocab_size: int) -> dict[str, np.ndarray]:
    """Per language, how often each token id [V] occurs in its texts as `tokenizer` encodes them, the excluded ids
    (special tokens, --exclude-ids) left out as the routing metrics leave them out."""
    drop = np.array(sorted(excluded), np.int64)
    out = {}
    for lang, chunks in texts.items():
        ids = np.concatenate([np.asarray(tokenizer.encode(t), np.int64) for t in chunks])
        ids = ids[~np.isin(ids, drop) & (ids >= 0) & (ids < vocab_size)]
        out[lang] = np.bincount(ids, minlength=vocab_size)
    return out


def divergence_from_reference(pair_rows: list[dict], model: str, reference: str, column: str = "njsd"
                              ) -> dict[str, dict[int, float]]:
    """{language: {MoE layer: nJSD from the reference}}: paper b's routing divergence, the pairs table's njsd (or,
    for a corpus that is not parallel, njsd_pooled)."""
    out: dict[str, dict[int, float]] = {}
    for row in pair_rows:
        if row["model"] == model and reference in (row["lang_a"], row["lang_b"]):
            other = row["lang_b"] if row["lang_a"] == reference else row["lang_a"]
            out.setdefault(other, {})[row["layer"]] = row[column]
    return out


def chunk_mean_probabilities(run, layer: int) -> np.ndarray:
    """[E] the mean over a language's chunks of each chunk's mean routing probabilities at one layer (paper c's
    language-level expert importance: documents weigh the same whatever their length)."""
    return M.mean_probabilities(run.prob_sums[:, layer], run.tokens).mean(axis=0)


def scores_of(scores: list[Scores], model: str) -> Scores | None:
    """The scores that belong to a run: those labelled with its name, else the unlabelled ones."""
    return next((s for s in scores if s.label == model), next((s for s in scores if s.label is None), None))


def add_language_tables(tables: dict, runs, vocabularies: list[dict[str, np.ndarray]], scores: list[Scores]) -> None:
    """Adds to build_tables' `tables`: "languages" (per model and MoE layer), paper c's columns of "pairs" (jsd,
    jsd_pbar, vocab_jaccard, vocab_weighted), and with scores "divergence_scores" (per model and layer) and
    "scores" ({model: {"file", "score", "values"}}). vocabularies: per run, vocabulary_counts."""
    reference = tables["reference"]
    languages, correlations, used = [], [], {}
    pairs_by_key = {(r["model"], r["layer"], r["lang_a"], r["lang_b"]): r for r in tables["pairs"]}
    for run, vocab in zip(runs, vocabularies, strict=True):
        langs = list(run.langs)
        pooled = {lang: lr.pooled(run.k) for lang, lr in run.langs.items()}
        counts_lge = np.stack([pooled[lang][0] for lang in langs], axis=1)
        overlap = {(a, b): M.vocabulary_overlap(vocab[a], vocab[b]) for a, b in itertools.combinations(langs, 2)}
        for layer, block in enumerate(run.moe_blocks):
            f_ge = np.stack([pooled[lang][1][layer] for lang in langs])
            jsd_gg = M.jsd_matrix(f_ge)
            jsd_pbar_gg = M.jsd_matrix(np.stack([chunk_mean_probabilities(lr, layer) for lr in run.langs.values()]))
            pair_jsd, pair_overlap = [], []
            for (i, a), (j, b) in itertools.combinations(enumerate(langs), 2):
                row = pairs_by_key.get((run.name, layer, a, b))
                if row is not None:
                    row.update(jsd=float(jsd_gg[i, j]), jsd_pbar=float(jsd_pbar_gg[i, j]),
                               vocab_jaccard=overlap[a, b][0], vocab_weighted=overlap[a, b][1])
                pair_jsd.append(jsd_gg[i, j])
                pair_overlap.append(overlap[a, b][0])
            others = [i for i, lang in enumerate(langs) if lang != reference]
            without = [jsd_gg[i, j] for i, j in itertools.combinations(others, 2)]
            fit = M.correlation(pair_overlap, pair_jsd)
            languages.append({
                "model": run.name, "layer": layer, "block": block,
                "ig_norm": M.language_information_gain(counts_lge[layer]),
                "ig_norm_uniform": M.language_information_gain(counts_lge[layer], "uniform"),
                "mean_jsd": float(np.mean(pair_jsd)) if pair_jsd else float("nan"),
                "mean_jsd_no_reference": float(np.mean(without)) if without else float("nan"),
                "vocab_pairs": fit.pop("n"), **{f"vocab_jsd_{name}": value for name, value in fit.items()}})
        chosen = scores_of(scores, run.name)
        if chosen is None:
            continue
        column = tables.get("divergence", "njsd")
        divergence = divergence_from_reference(tables["pairs"], run.name, reference, column)
        values = chosen.matched(langs)
        scored = [lang for lang in langs if lang != reference and lang in values]
        used[run.name] = {"file": chosen.path, "score": chosen.what, "divergence": column, "values": values}
        for layer, block in enumerate(run.moe_blocks):
            fit = M.correlation([divergence[lang][layer] for lang in scored], [values[lang] for lang in scored])
            correlations.append({"model": run.name, "layer": layer, "block": block, "langs": " ".join(scored), **fit})
    tables["languages"] = languages
    if scores:
        tables["divergence_scores"] = correlations
        tables["scores"] = used
