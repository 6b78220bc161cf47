"""Finding the experts to act on (docs/steering.md, finding experts), from per-sequence top-K counts.

Inputs per corpus: counts a_i[l, e] (tokens of sequence i whose chosen set at MoE layer l contains e) and content
token counts L_i, as the in-jit routing statistics give them (moejax.routing.analysis.collect). Everything here is
numpy over those counts; nothing needs router logits.
"""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path

import numpy as np

from moejax.errors import DataError, SettingsError

METHODS = ("delta", "risk-diff", "gap")


@dataclasses.dataclass
class Counts:
    """One corpus: per-sequence top-K counts [sequences, L, E] and content tokens [sequences]; k experts a token."""

    topk_counts: np.ndarray
    tokens: np.ndarray
    k: int

    def frequency(self, pooled: bool = False) -> np.ndarray:
        """A[l, e]: the share of tokens whose chosen set holds e, averaged per sequence (sequences without content
        tokens left out), or pooled over all tokens."""
        counts = np.asarray(self.topk_counts, np.float64)
        tokens = np.asarray(self.tokens, np.float64)
        if pooled:
            return counts.sum(0) / max(tokens.sum(), 1.0)
        kept = tokens > 0
        if not kept.any():
            return np.zeros(counts.shape[1:])
        return (counts[kept] / tokens[kept, None, None]).mean(0)

    def usage(self) -> np.ndarray:
        """q[l, e] = c_e / (K |T|), docs/metrics.md's usage fraction f, pooled over the corpus."""
        return np.asarray(self.topk_counts, np.float64).sum(0) / max(self.k * float(np.sum(self.tokens)), 1.0)


def parse_window(spec: str | None, layers: int) -> np.ndarray:
    """A bool [L] from "8-35", "3", "0-3,10-12" (MoE-layer indices, inclusive) or None (every layer)."""
    if spec is None or spec == "":
        return np.ones(layers, bool)
    window = np.zeros(layers, bool)
    for part in str(spec).split(","):
        lo, sep, hi = part.strip().partition("-")
        try:
            first, last = int(lo), int(hi) if sep else int(lo)
        except ValueError:
            raise SettingsError(f"--layers {spec!r}: expected MoE-layer ranges like 8-35 or 3,5-7") from None
        if not 0 <= first <= last < layers:
            raise SettingsError(f"--layers {spec!r}: the model has MoE layers 0-{layers - 1} (as in layers.csv)")
        window[first:last + 1] = True
    return window


@dataclasses.dataclass
class Selection:
    """score[l, e] (the method's score of every expert), selected[l, e], and per-corpus frequencies for the table;
    negative[l, e]: risk difference's top-N negative experts (else all False)."""

    score: np.ndarray
    selected: np.ndarray
    negative: np.ndarray
    columns: dict[str, np.ndarray]


def delta(target: Counts, baseline: Counts, window: np.ndarray, tau: float, pooled: bool = False) -> Selection:
    """Delta[e] = A_target[e] - A_baseline[e]; selected where Delta > tau inside the window ((b)'s rule)."""
    a_t, a_b = target.frequency(pooled), baseline.frequency(pooled)
    score = a_t - a_b
    return Selection(score, (score > tau) & window[:, None], np.zeros(score.shape, bool),
                     {"frequency_target": a_t, "frequency_baseline": a_b})


def risk_difference(target: Counts, baseline: Counts, window: np.ndarray, top_n: int) -> Selection:
    """RD[e] = a1/(a1+d1) - a2/(a2+d2) pooled over tokens (SteerMoE); ranked by |RD| over every layer of the window at
    once, the top_n with positive RD selected and the top_n with negative RD marked negative."""
    f_t, f_b = target.frequency(pooled=True), baseline.frequency(pooled=True)
    score = f_t - f_b
    ranked = np.where(window[:, None], score, np.nan).ravel()
    order = np.argsort(-np.nan_to_num(ranked, nan=-np.inf), kind="stable")
    selected = np.zeros(score.size, bool)
    negative = np.zeros(score.size, bool)
    selected[[i for i in order if ranked[i] > 0][:top_n]] = True
    order_neg = np.argsort(np.nan_to_num(ranked, nan=np.inf), kind="stable")
    negative[[i for i in order_neg if ranked[i] < 0][:top_n]] = True
    return Selection(score, selected.reshape(score.shape), negative.reshape(score.shape),
                     {"frequency_target": f_t, "frequency_baseline": f_b})


def activation_gap(corpora: dict[str, Counts], owner: str, window: np.ndarray, alpha: float,
                   shared_k: int = 5) -> tuple[Selection, dict[str, np.ndarray], np.ndarray]:
    """(c)'s rule over K >= 2 corpora with pooled usage fractions q: an expert belongs to the language with the
    highest q when q_first - q_second >= alpha (inside the window). Returns the Selection for `owner` (score: its q
    minus the best other q), every language's owned experts [L, E], and the shared experts [L, E] (the shared_k with
    the highest mean q over the languages, per layer, inside the window)."""
    names = list(corpora)
    q = np.stack([corpora[n].usage() for n in names])  # [K, L, E]
    order = np.argsort(-q, axis=0, kind="stable")
    first = np.take_along_axis(q, order[:1], 0)[0]
    second = np.take_along_axis(q, order[1:2], 0)[0]
    owned = {n: (order[0] == i) & (first - second >= alpha) & window[:, None] for i, n in enumerate(names)}
    mine = names.index(owner)
    others = np.delete(q, mine, axis=0).max(axis=0)
    mean_q = q.mean(axis=0)
    shared = np.zeros(mean_q.shape, bool)
    top = np.argsort(-mean_q, axis=1, kind="stable")[:, :shared_k]
    np.put_along_axis(shared, top, True, axis=1)
    shared &= window[:, None]
    columns = {f"usage_{n}": q[i] for i, n in enumerate(names)}
    return Selection(q[mine] - others, owned[owner], np.zeros(shared.shape, bool), columns), owned, shared


def check_threshold(name: str, value: float) -> None:
    if not np.isfinite(value) or value < 0:
        raise SettingsError(f"--{name} must be a finite number >= 0, got {value}")


def read_selection(spec: str) -> dict[str, list[int]]:
    """{MoE layer (as a string): expert ids} from "FILE[:LANG[:KEY]]": a selected_experts.json in (c)'s schema
    ({lang: {"seft": {layer: [ids]}, "ssft_k5": {...}}}; LANG needed when it holds several languages, KEY default
    "ssft_k5" if present, else "seft"), an experts.json from `moejax experts` (its "experts"), or a plain
    {layer: [ids]} object."""
    path, _, rest = str(spec).partition(":")
    lang, _, key = rest.partition(":")
    try:
        record = json.loads(Path(path).read_text(encoding="utf-8"))
    except OSError as exc:
        raise DataError(f"--train-experts {path}: cannot read it ({exc.strerror or exc})") from None
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise DataError(f"--train-experts {path}: not JSON ({exc})") from None
    if not isinstance(record, dict):
        raise DataError(f"--train-experts {path}: expected a JSON object")
    if isinstance(record.get("experts"), dict):  # moejax experts' experts.json
        chosen = {k: v["ids"] if isinstance(v, dict) else v for k, v in record["experts"].items()}
    elif record and all(isinstance(v, dict) and ({"seft"} & set(v) or any(k.startswith("ssft") for k in v))
                        for v in record.values()):
        if not lang:
            if len(record) != 1:
                raise DataError(f"--train-experts {path}: it holds languages {sorted(record)}; name one as "
                                f"{path}:LANG[:KEY]")
            lang = next(iter(record))
        if lang not in record:
            raise DataError(f"--train-experts {path}: no language {lang!r} (it has {', '.join(sorted(record))})")
        keys = record[lang]
        key = key or ("ssft_k5" if "ssft_k5" in keys else "seft")
        if key not in keys:
            raise DataError(f"--train-experts {path}: language {lang!r} has no {key!r} (it has "
                            f"{', '.join(sorted(keys))})")
        chosen = keys[key]
    else:
        chosen = record
    out = {}
    for layer, ids in chosen.items():
        try:
            int(layer)
        except ValueError:
            raise DataError(f"--train-experts {path}: {layer!r} is not an MoE-layer index") from None
        if not isinstance(ids, list) or not all(isinstance(e, int) and not isinstance(e, bool) for e in ids):
            raise DataError(f"--train-experts {path}: layer {layer} must list expert ids, got {ids!r}")
        out[str(int(layer))] = sorted(set(ids))
    if not any(out.values()):
        raise DataError(f"--train-experts {spec}: selects no expert (every layer's list is empty); an empty selection "
                        "would train nothing, so name at least one expert")
    return out
