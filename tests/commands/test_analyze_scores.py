"""`moejax analyze --scores`: the score files it reads (a lang,score CSV; the scores.csv `moejax eval` writes, made
here by eval's own score_rows and write_csv), the errors and warnings it gives before any model runs, and one run
of the built-in model that writes divergence_scores.csv, languages.csv, the new pairs.csv columns and figures, whose
values are checked against the tables written beside them (the correlation by numpy's corrcoef, IG(L;E)/H(L) by
the mutual-information identity from experts.csv's counts).
"""

from __future__ import annotations

import csv
import itertools
import json

import numpy as np
import pytest
from scipy.stats import entropy

from moejax.cli import main
from moejax.commands import analyze as analyze_command
from moejax.commands.evaluate import score_rows
from moejax.data.corpus import SAMPLE_DIR
from moejax.errors import DataError, SettingsError
from moejax.io import write_csv
from moejax.routing.languages import check_scores, read_all_scores, read_scores

EVAL_COLUMNS = ("task", "language", "family", "metric", "filter", "value", "stderr", "samples", "chance")


def write(path, text):
    path.write_text(text, encoding="utf-8")
    return path


def eval_scores(path, tasks: dict[str, dict[str, float]], metadata: dict[str, str] | None = None):
    """A scores.csv as `moejax eval` writes it, from lm-eval-shaped results {task: {"acc,none": value, ...}}."""
    results = {"results": {task: {**m, **{f"{k.split(',')[0]}_stderr,none": 0.01 for k in m}} for task, m in
                           tasks.items()},
               "configs": {task: {"metadata": {"language": lang}} for task, lang in (metadata or {}).items()}}
    write_csv(path, score_rows(results), EVAL_COLUMNS)
    return path


def read(path):
    with open(path, encoding="utf-8") as f:
        return list(csv.DictReader(f))


def test_reads_a_lang_score_csv(tmp_path):
    path = write(tmp_path / "s.csv", "language,score,note\nheb_Hebr,0.61,x\nJA,0.5,\nar,0.42,\nsw,0.3,\n")
    scores = read_scores(str(path), ["builtin"])
    assert scores.by_lang == {"heb_Hebr": 0.61, "JA": 0.5, "ar": 0.42, "sw": 0.3} and scores.label is None
    # matched to the analysed languages whatever code either side uses (he, heb, heb_Hebr; any case)
    assert scores.matched(["en", "he", "jpn", "arb_Arab"]) == {"he": 0.61, "jpn": 0.5, "arb_Arab": 0.42}
    assert scores.unmatched(["en", "he", "jpn", "arb_Arab"]) == ["sw"]
    labelled = read_scores(f"base={path}", ["base", "cpt"])
    assert labelled.label == "base" and labelled.by_lang == scores.by_lang


def test_reads_the_scores_csv_of_moejax_eval(tmp_path):
    tasks = {f"choice_{lang}": {"acc,none": value, "acc_norm,none": value / 2}
             for lang, value in (("en", 0.9), ("he", 0.6), ("ja", 0.5), ("ar", 0.4))}
    tasks |= {"complete_he": {"acc,none": 0.1}, "belebele_jpn_Jpan": {"acc,none": 0.7}}
    path = eval_scores(tmp_path / "scores.csv", tasks)
    with pytest.raises(SettingsError, match=r"several scores per language \(belebele_jpn_Jpan/acc/none, choice/acc/"
                                            r"none, choice/acc_norm/none, complete/acc/none\); choose one with "
                                            r"--score-metric"):
        read_scores(str(path), ["m"])
    with pytest.raises(SettingsError, match="several scores per language"):
        read_scores(str(path), ["m"], "acc")  # three families have an acc
    scores = read_scores(str(path), ["m"], "choice/acc_norm")
    assert scores.by_lang == {"en": 0.45, "he": 0.3, "ja": 0.25, "ar": 0.2}
    assert scores.what == "choice/acc_norm/none"
    assert read_scores(str(path), ["m"], "choice/acc/none").by_lang["he"] == 0.6
    # a task named with a FLORES-200 code (as Belebele's are) has no language column; the code names it
    assert read_scores(str(path), ["m"], "belebele_jpn_Jpan/acc").matched(["en", "ja"]) == {"ja": 0.7}
    with pytest.raises(SettingsError, match="--score-metric choice/f1: .* has no such scores; it holds"):
        read_scores(str(path), ["m"], "choice/f1")


@pytest.mark.parametrize("text, choice, error, message", [
    ("lang,score\nhe,0.5\nja,0.4\nhe,0.3\n", None, DataError, r"two scores for language 'he' \(lines 2 and 4\)"),
    ("lang,score\nhe,0.5\nheb_Hebr,0.3\n", None, DataError, r"two scores for language 'heb_Hebr' \(lines 2 and 3\)"),
    ("lang,score\nhe,0.5\nja,high\n", None, DataError, r"line 3, column score: 'high' is not a number"),
    ("lang,score\nhe,nan\n", None, DataError, r"line 2, column score: the score is 'nan'"),
    ("lang,accuracy\nhe,0.5\n", None, DataError, r"needs a language column \(lang or language\) and a score column"),
    ("lang,score\n,0.5\n", None, DataError, r"line 2 names no language"),
    ("lang,score\n", None, DataError, r"no scores"),
    ("lang,score\nhe,0.5\n", "acc", SettingsError, r"--score-metric acc: .* holds one score per language"),
])
def test_bad_score_files(tmp_path, text, choice, error, message):
    with pytest.raises(error, match=message):
        read_scores(str(write(tmp_path / "s.csv", text)), ["m"], choice)


def test_labels_and_missing_files(tmp_path):
    path = write(tmp_path / "s.csv", "lang,score\nhe,0.5\n")
    with pytest.raises(SettingsError, match=r"no model is labelled 'cpt' \(the models: base\)"):
        read_scores(f"cpt={path}", ["base"])
    with pytest.raises(DataError, match="no such file"):
        read_scores(str(tmp_path / "absent.csv"), ["base"])
    named = write(tmp_path / "a=b.csv", "lang,score\nhe,0.5\n")  # an existing file whose name holds "="
    assert read_scores(str(named), ["base"]).label is None


def test_one_score_file_per_model(tmp_path):
    path = write(tmp_path / "s.csv", "lang,score\nhe,0.5\nja,0.4\nar,0.3\n")
    langs = ["en", "he", "ja", "ar"]
    scores, warnings = read_all_scores([f"base={path}", f"cpt={path}", str(path)], ["base", "cpt", "x"], langs)
    assert [s.label for s in scores] == ["base", "cpt", None] and warnings == []
    with pytest.raises(SettingsError, match="--scores given twice for model 'base'"):
        read_all_scores([f"base={path}", f"base={path}"], ["base"], langs)
    with pytest.raises(SettingsError, match="--scores given twice for every model"):
        read_all_scores([str(path), str(path)], ["base"], langs)


def test_needs_three_scored_languages_besides_the_reference(tmp_path):
    path = write(tmp_path / "s.csv", "lang,score\nen,0.9\nhe,0.6\nja,0.5\nar,0.4\nsw,0.2\n")
    scores = read_scores(str(path), ["m"])
    with pytest.raises(DataError, match=r"2 of the languages compared with en have a score \(he, ja of he, ja\); the "
                                        r"correlation needs at least 3"):
        check_scores(scores, ["en", "he", "ja"])  # en's own score does not count: its divergence is 0 by definition
    warnings = check_scores(scores, ["en", "he", "ja", "ar", "de"])
    assert warnings == [f"--scores {path}: languages not analysed, their scores unused: sw",
                        f"--scores {path}: analysed languages without a score, left out of the correlation: de"]
    assert check_scores(scores, ["he", "ja", "ar", "sw", "en"]) == []


def test_too_few_scores_stop_before_any_model_runs(tmp_path, monkeypatch, capsys):
    def never(*args, **kwargs):
        raise AssertionError("a model was loaded")

    monkeypatch.setattr(analyze_command, "load_model", never)
    path = write(tmp_path / "s.csv", "lang,score\nen,0.9\nhe,0.6\nja,0.5\n")
    code = main(["analyze", "--langs", "en,he,ja", "--scores", str(path), "--out", str(tmp_path / "out"), "--quiet"])
    err = capsys.readouterr().err.strip().splitlines()
    assert code == 2 and len(err) == 1 and "2 of the languages compared with en have a score" in err[0], err
    assert not (tmp_path / "out").exists()
    assert main(["analyze", "--score-metric", "acc", "--out", str(tmp_path / "out")]) == 2
    assert "--score-metric picks among the scores of --scores FILE" in capsys.readouterr().err


def mutual_information_share(counts_ge):
    joint = counts_ge / counts_ge.sum()
    h_l, h_e, h_le = (entropy(p[p > 0], base=2) for p in (joint.sum(1), joint.sum(0), joint.ravel()))
    return (h_l + h_e - h_le) / h_l


@pytest.mark.slow  # ~20 s here, nearly all of it compiling the built-in model's programs
def test_builtin_model_writes_scores_and_language_tables(tmp_path, capsys):
    """`moejax analyze --langs en,he,ja,de --scores tmp.csv` with the built-in model, on the sample corpus's first
    lines (de: the English lines upper-cased, a fourth script-sharing language)."""
    corpus = tmp_path / "corpus"
    corpus.mkdir()
    for lang in ("en", "he", "ja"):
        lines = (SAMPLE_DIR / f"{lang}.txt").read_text(encoding="utf-8").splitlines()[:4]
        write(corpus / f"{lang}.txt", "\n".join(lines) + "\n")
    write(corpus / "de.txt", (corpus / "en.txt").read_text().upper())
    scores = write(tmp_path / "tmp.csv", "lang,score\nhe,0.55\nja,0.4\nde,0.8\nsw,0.3\n")
    out = tmp_path / "out"
    langs = ["en", "he", "ja", "de"]
    assert main(["analyze", "--langs", ",".join(langs), "--data", str(corpus), "--scores", str(scores), "--out",
                 str(out), "--quiet", "--chunk-mode", "sentence"]) == 0
    assert "languages not analysed, their scores unused: sw" in capsys.readouterr().err
    layers = 8  # the built-in model's MoE layers
    table = read(out / "divergence_scores.csv")
    assert [int(r["layer"]) for r in table] == list(range(layers))
    pairs = read(out / "pairs.csv")
    for row in table:
        assert row["langs"] == "he ja de" and row["n"] == "3"
        divergence = [next(float(p["njsd"]) for p in pairs if p["layer"] == row["layer"] and {p["lang_a"], p["lang_b"]}
                           == {"en", lang}) for lang in ("he", "ja", "de")]
        assert float(row["pearson_r"]) == pytest.approx(np.corrcoef(divergence, [0.55, 0.4, 0.8])[0, 1], abs=1e-9)
    languages = read(out / "languages.csv")
    assert len(languages) == layers
    experts = read(out / "experts.csv")
    for row in languages:
        counts_ge = np.array([[float(e["topk_count"]) for e in experts if e["lang"] == lang and e["layer"] ==
                               row["layer"]] for lang in langs])
        assert float(row["ig_norm"]) == pytest.approx(mutual_information_share(counts_ge), abs=1e-9)
        assert int(row["vocab_pairs"]) == 6
    assert {(p["lang_a"], p["lang_b"]) for p in pairs} == set(itertools.combinations(langs, 2))
    assert all(0 <= float(p["jsd"]) <= np.log(2) and 0 <= float(p["vocab_jaccard"]) <= 1 for p in pairs)
    en_de = next(p for p in pairs if (p["lang_a"], p["lang_b"]) == ("en", "de"))
    assert 0 < float(en_de["vocab_jaccard"]) < 1  # upper-casing keeps the spaces and punctuation, not the letters
    for name in ("u_curve.png", "language_routing.png", "vocabulary_overlap.png"):
        assert (out / name).stat().st_size > 10_000, name
    recorded = json.loads((out / "metrics.json").read_text())
    assert recorded["scores"]["builtin-tiny-qwen3-moe"]["values"] == {"he": 0.55, "ja": 0.4, "de": 0.8}
    report = (out / "report.md").read_text()
    assert "## Language-level routing" in report and "## Divergence from en and downstream scores" in report
    assert "![divergence from en per layer, coloured by score](u_curve.png)" in report
