"""`moejax experts`: find the experts to steer or train (docs/steering.md, finding experts) by running a target corpus
and a baseline corpus through the in-jit routing statistics (per-sequence top-K counts; no router logits reach the
host).

Methods: delta ((b): per-sequence activation frequency, target minus baseline, selected above tau in a layer window),
risk-diff (SteerMoE: pooled over tokens, the top N by |RD| over all layers at once), gap ((c): over the target(s)
and the baseline, an expert belongs to the language using it most when it leads the next by alpha; plus the shared
experts). Writes experts.json (selected ids and scores per MoE layer, with the settings: `moejax generate/eval/
analyze --steering` take it once a mode, lambda and direction are added), experts.csv (every expert's score),
experts_scores.png, experts_selected.png and report.md.
"""

from __future__ import annotations

import dataclasses
import json
import time
from pathlib import Path

import numpy as np
from tqdm import tqdm

from moejax.commands.options import MESH_HELP, check_options, option
from moejax.data.corpus import SAMPLE_LANGS, first_jsonl_object, read_corpus
from moejax.data.languages import check_codes, file_names, identity
from moejax.data.mixture import jsonl_texts
from moejax.errors import DataError, SettingsError
from moejax.io import check_output, output_directory, versions, write_csv
from moejax.routing import experts as pick

BUILTIN_CORPUS = "builtin"


@dataclasses.dataclass(frozen=True)
class ExpertsSettings:
    """Everything `moejax experts` takes; the defaults find the built-in model's Hebrew experts against English on
    the built-in sample corpus."""

    model: str | None = option(None, "Hugging Face or `moejax convert` checkpoint directory with its tokenizer; "
                               "default: the built-in demonstration model", metavar="DIR")
    target: tuple[str, ...] = option(
        (), "LABEL=CORPUS whose experts to find (repeat for the gap method's languages; the first is the one selected "
        "for). CORPUS: a text file (one sequence per line), a JSONL file of {\"text\": ...}, any corpus `moejax "
        "analyze` reads (then LABEL is its language column), or 'builtin' (the sample corpus of language LABEL). "
        "Default: he=builtin", metavar="LABEL=CORPUS", repeat=True)
    baseline: str | None = option(None, "LABEL=CORPUS to compare with (the same forms as --target); default "
                                  "en=builtin", metavar="LABEL=CORPUS")
    langs: tuple[str, ...] = option((), "instead of --target/--baseline: languages of one parallel corpus (--data), "
                                    "the first the target, the last the baseline; gap selects for every one and "
                                    "writes selected_experts.json", kind=list, metavar="L1,L2,...")
    data: str | None = option(None, "with --langs: the corpus (any format `moejax analyze` reads); default the "
                              "built-in sample corpus", metavar="CORPUS")
    method: str = option("delta", "delta: per-sequence activation frequency difference above --tau (b); risk-diff: "
                         "pooled risk difference, top --top-n each sign over all layers (SteerMoE); gap: the usage "
                         "lead over the next language of at least --alpha (c)", choices=pick.METHODS)
    tau: float = option(0.3, "delta's threshold: an expert is selected where Delta > tau", kind=float, minimum=0)
    top_n: int = option(10, "risk-diff: experts taken with the largest positive (and negative) RD", kind=int,
                        minimum=1)
    alpha: float = option(0.01, "gap: the lead in usage fraction over the second language", kind=float, minimum=0)
    shared: int = option(5, "gap: shared experts per layer (highest mean usage over the languages)", kind=int,
                         minimum=0)
    pooled: bool = option(False, "delta: pool the activation frequency over all tokens instead of averaging it "
                          "per sequence", kind=bool)
    layers: str | None = option(None, "MoE-layer window, inclusive, as in layers.csv (e.g. 8-35 or 0-3,10-12); "
                                "default: every MoE layer", metavar="RANGE")
    last_layers: int | None = option(None, "the window is the last N MoE layers (instead of --layers), as (c) "
                                     "selects in the final layers", kind=int, minimum=1, metavar="N")
    batch_size: int = option(8, "rows per forward pass (each row packs as many sequences as fit)", kind=int,
                             minimum=1)
    max_sequences: int | None = option(None, "use at most the first N sequences of each corpus", kind=int,
                                       minimum=1, metavar="N")
    out: Path = option(Path("moejax-experts"), "output directory (replaced only when the run succeeds)", kind=Path)
    mesh: str | None = option(None, MESH_HELP, metavar="AXIS=N,...")
    dtype: str = option("float32", "parameter dtype (auto: the checkpoint's own; the counts are computed in float32 "
                        "either way)", choices=("float32", "bfloat16", "auto"))
    allow_nonfinite: bool = option(False, "load a checkpoint holding NaN or infinite weights instead of refusing it",
                                   kind=bool)
    quiet: bool = option(False, "no progress bars", kind=bool)

    def __post_init__(self):
        check_options(self)
        pick.check_threshold("tau", self.tau)
        pick.check_threshold("alpha", self.alpha)
        if self.langs and (self.target or self.baseline):
            raise SettingsError("give either --langs (with --data) or --target/--baseline, not both")
        if self.data and not self.langs:
            raise SettingsError("--data goes with --langs L1,L2,...; with --target give LABEL=CORPUS")
        if self.langs:
            check_codes(self.langs, least=2)
        if self.layers and self.last_layers:
            raise SettingsError("give --layers or --last-layers, not both")
        labels = [label for label, _ in self.corpora()]
        if len(set(labels)) != len(labels):
            raise SettingsError(f"--target and --baseline labels must differ, got {', '.join(labels)}")
        if self.method != "gap" and len(labels) > 2:
            raise SettingsError(f"--method {self.method} compares one --target with --baseline; several targets are "
                                "for --method gap")


    def corpora(self) -> list[tuple[str, str]]:
        """(label, corpus) of every corpus: the targets first, the baseline last."""
        if self.langs:
            return [(lang, self.data or BUILTIN_CORPUS) for lang in self.langs]
        return [corpus_spec(spec) for spec in (*(self.target or ("he=builtin",)), self.baseline or "en=builtin")]

    def window(self, moe_layers: int):
        if self.last_layers:
            return pick.parse_window(f"{max(moe_layers - self.last_layers, 0)}-{moe_layers - 1}", moe_layers)
        return pick.parse_window(self.layers, moe_layers)


def corpus_spec(spec: str) -> tuple[str, str]:
    label, sep, path = spec.partition("=")
    if not sep or not label or not path:
        raise SettingsError(f"expected LABEL=CORPUS, got {spec!r}")
    return label, path


def read_sequences(label: str, path: str) -> list[str]:
    """The sequences of one corpus (see ExpertsSettings.target)."""
    if path == BUILTIN_CORPUS:
        if identity(label) not in {identity(lang) for lang in SAMPLE_LANGS}:
            raise DataError(f"{label}=builtin: the built-in corpus has languages {', '.join(SAMPLE_LANGS)}")
        return read_corpus(None, [label], least=1)[label]
    where = Path(path)
    if not where.exists():
        raise DataError(f"{label}={path}: no such file or directory")
    if where.is_file() and where.suffix == ".jsonl":  # texts, or a table with a key per language (read_corpus)
        row = first_jsonl_object(where)
        if "text" in row and not set(file_names(label)) & set(row):
            return jsonl_texts(where)
    elif where.is_file() and where.suffix != ".csv":
        lines = where.read_text(encoding="utf-8").splitlines()
        header = lines[0].lstrip("\ufeff").split("\t") if lines else []
        if not set(file_names(label)) & {h.strip() for h in header}:
            return [line for line in lines if line.strip()]
    return read_corpus(where, [label], least=1)[label]  # a column, or a file, named by any code of the language


def count_corpora(settings: ExpertsSettings, model, tokenizer, corpora: dict[str, list[str]]) -> dict[str, pick.Counts]:
    """Per corpus, the in-jit statistics' per-sequence top-K counts (special tokens excluded)."""
    from moejax.routing.analysis import collect

    counts = {}
    k = model.config.num_experts_per_tok
    for label, texts in corpora.items():
        with tqdm(total=len(texts), desc=label, unit="seq", disable=settings.quiet) as bar:
            run = collect(model, tokenizer, texts, exclude_ids=tokenizer.special_ids, batch_size=settings.batch_size,
                          probabilities="softmax", seed=0, progress=lambda n, _tokens, bar=bar: bar.update(n))
        counts[label] = pick.Counts(run.topk_counts, run.tokens, k)
    return counts


def select(settings: ExpertsSettings, counts: dict[str, pick.Counts], window: np.ndarray):
    """(Selection, extra experts.json fields) for the settings' method."""
    labels = [label for label, _ in settings.corpora()]
    target, baseline = labels[0], labels[-1]
    if settings.method == "delta":
        return pick.delta(counts[target], counts[baseline], window, settings.tau, settings.pooled), {}
    if settings.method == "risk-diff":
        chosen = pick.risk_difference(counts[target], counts[baseline], window, settings.top_n)
        return chosen, {"negative": _by_layer(chosen.negative, chosen.score)}
    chosen, owned, shared = pick.activation_gap(counts, target, window, settings.alpha, settings.shared)
    return chosen, {"by_label": {label: _by_layer(mask, chosen.score) for label, mask in owned.items()},
                    "shared": _by_layer(shared, None)}


def selected_experts(record: dict, shared: int) -> dict:
    """(c)'s selected_experts.json: {lang: {"seft": {layer: [ids]}, "ssft_k<shared>": {layer: [ids]}}} over the
    window's layers."""
    out = {}
    for lang, owned in record["by_label"].items():
        seft = {layer: sorted(entry["ids"]) for layer, entry in owned.items() if int(layer) in record["window"]}
        ssft = {layer: sorted(set(ids) | set(record["shared"][layer]["ids"])) for layer, ids in seft.items()}
        out[lang] = {"seft": seft, f"ssft_k{shared}": ssft}
    return out


def _by_layer(mask_le: np.ndarray, score_le: np.ndarray | None) -> dict[str, dict]:
    out = {}
    for layer in range(mask_le.shape[0]):
        ids = [int(e) for e in np.flatnonzero(mask_le[layer])]
        if score_le is not None:
            ids.sort(key=lambda e: -score_le[layer, e])
        out[str(layer)] = {"ids": ids, **({} if score_le is None else
                                          {"scores": [float(score_le[layer, e]) for e in ids]})}
    return out


def find_experts(settings: ExpertsSettings) -> Path:
    """Runs both corpora, selects, writes OUT; returns OUT."""
    from moejax.commands.analyze import load_model
    from moejax.parallel.mesh import make_mesh
    from moejax.report.figures import expert_score_figures

    s = settings
    specs = s.corpora()
    inputs = [s.model, *(path for _, path in specs if path != BUILTIN_CORPUS)]
    out = check_output(s.out, "experts", [p for p in inputs if p is not None])
    corpora = {label: read_sequences(label, path)[:s.max_sequences] for label, path in specs}
    for label, texts in corpora.items():
        if not texts:
            raise DataError(f"--target/--baseline {label}: the corpus has no sequences")
    started = time.perf_counter()
    mesh = make_mesh(s.mesh) if s.mesh else None
    name, where, model, tokenizer = load_model(s.model, mesh, s.allow_nonfinite, s.dtype)
    window = s.window(len(model.config.moe_layers))
    counts = count_corpora(s, model, tokenizer, corpora)
    chosen, extra = select(s, counts, window)
    cfg = model.config
    rows = [{"layer": layer, "block": cfg.moe_layers[layer], "expert": e, "in_window": bool(window[layer]),
             "score": float(chosen.score[layer, e]), "selected": bool(chosen.selected[layer, e]),
             **({"negative": bool(chosen.negative[layer, e])} if s.method == "risk-diff" else {}),
             **{column: float(values[layer, e]) for column, values in chosen.columns.items()}}
            for layer in range(chosen.score.shape[0]) for e in range(chosen.score.shape[1])]
    given = {k: str(v) if isinstance(v, Path) else v for k, v in dataclasses.asdict(s).items()}
    threshold = {"delta": s.tau, "gap": s.alpha}.get(s.method)
    record = {
        "written_by": "moejax experts", "model": where, "model_type": cfg.model_type,
        "moe_blocks": list(cfg.moe_layers), "experts_per_layer": cfg.num_routed_experts,
        "top_k": cfg.num_experts_per_tok,
        "method": s.method, "target": specs[0][0], "baseline": specs[-1][0],
        "window": [int(layer) for layer in np.flatnonzero(window)], "settings": given,
        "sequences": {label: len(c.tokens) for label, c in counts.items()},
        "tokens": {label: int(np.sum(c.tokens)) for label, c in counts.items()},
        "selected_count": int(chosen.selected.sum()),
        "experts": _by_layer(chosen.selected, chosen.score), **extra,
        "steering_hint": "add \"mode\": \"soft\", \"lambda\": 0.5, \"direction\": \"promote\" to steer with this file",
        "seconds": time.perf_counter() - started, "versions": versions(),
    }
    with output_directory(out, "experts", [p for p in inputs if p is not None]) as tmp:
        (tmp / "experts.json").write_text(json.dumps(record, indent=2))
        if s.method == "gap":  # (c)'s file: per language, SEFT and SSFT-k (SEFT plus the shared experts)
            (tmp / "selected_experts.json").write_text(json.dumps(selected_experts(record, s.shared), indent=2))
        write_csv(tmp / "experts.csv", rows)
        figures = expert_score_figures(tmp, chosen.score, chosen.selected, window, s.method, threshold)
        (tmp / "report.md").write_text(_report(record, chosen, figures, name))
    return out


def _report(record: dict, chosen, figures: list[str], model_name: str) -> str:
    per_layer = chosen.selected.sum(axis=1)
    lines = [f"# Experts: {record['method']}, {record['target']} against {record['baseline']}", "",
             f"Model: {model_name} ({record['model_type']}, {len(per_layer)} MoE layers, "
             f"{record['experts_per_layer']} experts, top-{record['top_k']}). Sequences: "
             + ", ".join(f"{k} {v} ({record['tokens'][k]} content tokens)" for k, v in record["sequences"].items())
             + f". Layer window: MoE layers {_ranges(record['window'])}.", "",
             f"**{record['selected_count']} experts selected**; per MoE layer: "
             + ", ".join(f"{layer}: {n}" for layer, n in enumerate(per_layer) if n) + ".", "",
             "| MoE layer | selected experts (score) |", "|---|---|"]
    for layer, entry in record["experts"].items():
        if entry["ids"]:
            lines.append(f"| {layer} | " + ", ".join(f"{e} ({s:+.3f})" for e, s in
                                                     zip(entry["ids"], entry["scores"], strict=True)) + " |")
    lines += [""] + [f"![{f}]({f})" for f in figures]
    lines += ["", "Every expert's score: experts.csv. To steer with these experts, add a mode, a lambda and a "
              "direction to experts.json (or pass it to moejax.Steering.from_experts) and give it to "
              "`moejax generate/eval/analyze --steering`."]
    if record["model"] == "builtin":
        lines += ["", "The built-in model has random weights: these experts prove nothing about real models."]
    return "\n".join(lines) + "\n"


def _ranges(layers: list[int]) -> str:
    if not layers:
        return "none"
    parts, start = [], layers[0]
    for prev, cur in zip(layers, [*layers[1:], None], strict=True):
        if cur != prev + 1 if cur is not None else True:
            parts.append(f"{start}-{prev}" if prev != start else str(start))
            start = cur
    return ",".join(parts)


def main_summary(out: Path) -> str:
    record = json.loads((out / "experts.json").read_text())
    files = "experts.json, selected_experts.json" if record["method"] == "gap" else "experts.json"
    return (f"{record['selected_count']} experts selected ({record['method']}, {record['target']} against "
            f"{record['baseline']}); wrote {out} ({files}, experts.csv, figures, report.md)")
