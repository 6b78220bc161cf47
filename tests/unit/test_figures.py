"""What a person looks at: each language keeps one colour in every figure and run; a score panel whose scores are all
0 says so, with the chance line drawn."""

from __future__ import annotations

import matplotlib.pyplot as plt

from moejax.report import figures
from moejax.report.figures import LANG_COLORS, lang_color, scores_figure


def test_language_colours_are_stable_and_distinct():
    assert lang_color("he") == lang_color("heb_Hebr") == lang_color("HE") == LANG_COLORS["he"]
    assert len({lang_color(code) for code in ("en", "he", "ja", "ar", "zh")}) == 5
    assert lang_color("yo") == lang_color("yo") and lang_color("bm") == lang_color("bm")  # the same every time
    fixed = set(LANG_COLORS.values())
    assert all(lang_color(code) not in fixed for code in ("yo", "bm", "as", "sw", "am"))


def test_scores_figure_says_all_zero_and_draws_chance(tmp_path, monkeypatch):
    drawn = {}
    save = plt.Figure.savefig

    def keep(fig, path, **kwargs):
        drawn["texts"] = [t.get_text() for ax in fig.axes for t in ax.texts]
        drawn["lines"] = [line.get_label() for ax in fig.axes for line in ax.get_lines()]
        return save(fig, path, **kwargs)

    monkeypatch.setattr(plt.Figure, "savefig", keep)
    rows = [{"task": f"t_{lang}", "language": lang, "family": "t", "metric": "acc", "filter": "none", "value": 0.0,
             "stderr": 0.0, "samples": 4, "chance": 0.25} for lang in ("en", "he")]
    scores_figure(tmp_path / "s.png", rows, "title")
    assert (tmp_path / "s.png").stat().st_size > 1000
    assert drawn["texts"] == ["all scores 0 (2 tasks)"] and "chance" in drawn["lines"]
    assert figures.LANG_COLORS["en"] != figures.LANG_COLORS["he"]


def test_entropy_gap_is_reference_minus_target():
    """Paper A plots English - Hebrew: positive where Hebrew's routing has collapsed onto fewer experts."""
    from moejax.report.figures import entropy_gaps

    rows = [{"model": "m", "lang": lang, "layer": layer, "usage_entropy_bits": bits}
            for lang, per_layer in (("en", [5.0, 5.0, 5.0]), ("he", [5.0, 4.5, 3.0])) for layer, bits in
            enumerate(per_layer)]
    assert entropy_gaps(rows, "m", "en", "he") == ([0, 1, 2], [0.0, 0.5, 2.0])
