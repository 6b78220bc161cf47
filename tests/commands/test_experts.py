"""`moejax experts` against a numpy recomputation from transformers' own router choices, its outputs, and steering
with its experts.json through the commands.

Each corpus sequence runs through transformers alone (its router modules hooked for the experts they choose); the
per-sequence counts a_i[l, e] over content tokens (the byte tokenizer's <s> excluded) give Delta (per sequence and
pooled), the risk difference and the activation gap in float64, which must equal experts.csv (counts exact, so the
frequencies agree to rounding) and select the same experts.
"""

from __future__ import annotations

import csv
import json

import numpy as np
import pytest

pytest.importorskip("torch")  # the test extra

from moejax.cli import main
from moejax.commands.experts import ExpertsSettings, find_experts
from moejax.data.tokenize import ByteTokenizer
from moejax.errors import SettingsError
from moejax.parity.fixtures import make_checkpoint, run_reference

pytestmark = [pytest.mark.torch, pytest.mark.slow]  # the quick loop covers their parts (steering, packing)
TEXTS = {
    "en": ["The river rises in spring.", "Bread needs flour, water and time.", "We walk to the station every day.",
           "Two plus two is four.", "The cat sleeps on the warm stones."],
    "he": ["הנהר עולה באביב.", "לחם צריך קמח, מים וזמן.", "אנחנו הולכים לתחנה כל יום.", "שתיים ועוד שתיים הן ארבע."],
    "ja": ["川は春に増水する。", "パンには小麦粉と水と時間が要る。", "毎日駅まで歩きます。"],
}


@pytest.fixture(scope="module", params=["qwen3_moe", "nemotron_h"])
def setup(request, tmp_path_factory):
    root = tmp_path_factory.mktemp(request.param)
    reference, path = make_checkpoint(request.param, root / "model", seed=6, byte_tokenizer=True)
    for lang, texts in TEXTS.items():
        (root / f"{lang}.txt").write_text("\n".join(texts) + "\n", encoding="utf-8")
    (root / "en.jsonl").write_text("".join(json.dumps({"text": t}) + "\n" for t in TEXTS["en"]), encoding="utf-8")
    counts = {lang: reference_counts(reference, texts) for lang, texts in TEXTS.items()}
    return root, path, counts


def read_csv(path):
    with open(path, newline="", encoding="utf-8") as f:
        return list(csv.DictReader(f))


def reference_counts(reference, texts):
    """Per sequence: a_i [L, E] from transformers' chosen experts at content tokens, and L_i."""
    tokenizer = ByteTokenizer()
    experts = 8  # both tiny configs (moejax.parity.fixtures)
    a, lengths = [], []
    for text in texts:
        ids = np.asarray([tokenizer.encode(text)])
        _, _, chosen = run_reference(reference, ids)
        content = ~np.isin(ids[0], sorted(tokenizer.special_ids))
        a.append(np.stack([np.bincount(c[0][content].ravel(), minlength=experts) for c in chosen]))
        lengths.append(int(content.sum()))
    return np.asarray(a, np.float64), np.asarray(lengths, np.float64)


def run(root, path, name, **settings):
    out = find_experts(ExpertsSettings(model=str(path), out=root / name, quiet=True, **settings))
    rows = read_csv(out / "experts.csv")
    layers = 1 + max(int(r["layer"]) for r in rows)
    experts = 1 + max(int(r["expert"]) for r in rows)

    def grid(column, kind=float):
        values = np.zeros((layers, experts), kind)
        for r in rows:
            values[int(r["layer"]), int(r["expert"])] = kind(r[column]) if kind is float else r[column] == "True"
        return values

    return out, json.loads((out / "experts.json").read_text()), grid


@pytest.mark.parametrize("pooled", [False, True])
def test_delta_equals_numpy_from_transformers_choices(setup, pooled):
    root, path, counts = setup
    out, record, grid = run(root, path, f"delta{pooled}", target=(f"he={root / 'he.txt'}",),
                            baseline=f"en={root / 'en.jsonl'}", tau=0.05, pooled=pooled, layers="1")
    freq = {}
    for lang in ("he", "en"):
        a, n = counts[lang]
        freq[lang] = a.sum(0) / n.sum() if pooled else (a / n[:, None, None]).mean(0)
    want = freq["he"] - freq["en"]
    np.testing.assert_allclose(grid("frequency_target"), freq["he"], rtol=1e-12, atol=1e-15)
    np.testing.assert_allclose(grid("frequency_baseline"), freq["en"], rtol=1e-12, atol=1e-15)
    np.testing.assert_allclose(grid("score"), want, rtol=1e-12, atol=1e-15)
    window = np.zeros(want.shape[0], bool)
    window[1] = True
    selected = (want > 0.05) & window[:, None]
    np.testing.assert_array_equal(grid("selected", bool), selected)
    assert record["selected_count"] == int(selected.sum()) > 0
    for layer, entry in record["experts"].items():
        assert sorted(entry["ids"]) == list(np.flatnonzero(selected[int(layer)]))
        assert entry["scores"] == sorted(entry["scores"], reverse=True)
    for name in ("experts_scores.png", "experts_selected.png", "report.md"):
        assert (out / name).stat().st_size > 0


def test_risk_difference_equals_numpy(setup):
    root, path, counts = setup
    _, record, grid = run(root, path, "rd", target=(f"ja={root / 'ja.txt'}",), baseline=f"en={root / 'en.txt'}",
                          method="risk-diff", top_n=4)
    (a_t, n_t), (a_b, n_b) = counts["ja"], counts["en"]
    rd = a_t.sum(0) / n_t.sum() - a_b.sum(0) / n_b.sum()
    np.testing.assert_allclose(grid("score"), rd, rtol=1e-12, atol=1e-15)
    flat = rd.ravel()
    top = np.argsort(-flat, kind="stable")[:4]
    bottom = np.argsort(flat, kind="stable")[:4]
    assert set(np.flatnonzero(grid("selected", bool).ravel())) == set(top[flat[top] > 0])
    assert set(np.flatnonzero(grid("negative", bool).ravel())) == set(bottom[flat[bottom] < 0])
    assert sum(len(e["ids"]) for e in record["negative"].values()) == 4


def test_activation_gap_equals_numpy(setup):
    root, path, counts = setup
    _, record, grid = run(root, path, "gap", target=(f"he={root / 'he.txt'}", f"ja={root / 'ja.txt'}"),
                          baseline=f"en={root / 'en.txt'}", method="gap", alpha=0.01, shared=2)
    k = json.loads((root / "gap" / "experts.json").read_text())["top_k"]
    q = {lang: counts[lang][0].sum(0) / (k * counts[lang][1].sum()) for lang in ("he", "ja", "en")}
    stack = np.stack([q["he"], q["ja"], q["en"]])
    for lang in ("he", "ja", "en"):
        np.testing.assert_allclose(grid(f"usage_{lang}"), q[lang], rtol=1e-12, atol=1e-15)
    ordered = np.sort(stack, axis=0)
    lead = ordered[-1] - ordered[-2]
    owner = np.argmax(stack, axis=0)
    np.testing.assert_array_equal(grid("selected", bool), (owner == 0) & (lead >= 0.01))
    for i, lang in enumerate(("he", "ja", "en")):
        want = (owner == i) & (lead >= 0.01)
        got = np.zeros_like(want)
        for layer, entry in record["by_label"][lang].items():
            got[int(layer), entry["ids"]] = True
        np.testing.assert_array_equal(got, want, err_msg=lang)
    mean_q = stack.mean(0)
    for layer, entry in record["shared"].items():
        assert sorted(entry["ids"]) == sorted(np.argsort(-mean_q[int(layer)], kind="stable")[:2].tolist())


def test_steering_with_experts_json_through_the_commands(setup, tmp_path, capsys):
    root, path, _ = setup
    out, record, _ = run(root, path, "to_steer", target=(f"he={root / 'he.txt'}",), baseline=f"en={root / 'en.txt'}",
                         tau=0.0)
    spec = tmp_path / "steer.json"
    spec.write_text(json.dumps({**record, "mode": "hard", "lambda": 0.5, "direction": "promote"}))
    assert main(["generate", "--model", str(path), "--prompt", "abc", "--max-new-tokens", "4",
                 "--steering", str(spec)]) == 0
    # Two short chunks per language (rows of 1024 tokens, not 4096): what is tested is that the spec steers.
    assert main(["analyze", "--model", str(path), "--langs", "en,he", "--steering", str(spec), "--quiet",
                 "--chunk-words", "60", "--max-chunks", "2", "--out", str(tmp_path / "analysis")]) == 0
    models = {r["model"] for r in read_csv(tmp_path / "analysis" / "layers.csv")}
    assert models == {"model", "model+steered"}
    metrics = json.loads((tmp_path / "analysis" / "metrics.json").read_text())
    assert metrics["steering"]["mode"] == "hard"


def test_no_arguments_runs_the_builtin_model(tmp_path, capsys):
    assert main(["experts", "--out", str(tmp_path / "ex"), "--quiet"]) == 0
    record = json.loads((tmp_path / "ex" / "experts.json").read_text())
    assert (record["target"], record["baseline"], record["method"]) == ("he", "en", "delta")
    assert "prove nothing about real models" in (tmp_path / "ex" / "report.md").read_text()


@pytest.mark.parametrize("args,message", [
    (["--tau", "-0.1"], "--tau must be >= 0"),
    (["--layers", "0-99"], "the model has MoE layers"),
    (["--layers", "two"], "expected MoE-layer ranges"),
    (["--target", "en=builtin"], "labels must differ"),
    (["--target", "he"], "expected LABEL=CORPUS"),
    (["--target", "he=/nonexistent/he.txt"], "no such file or directory"),
    (["--target", "he=builtin", "--target", "ja=builtin"], "several targets are for --method gap"),
    (["--target", "xx=builtin"], "the built-in corpus has languages"),
])
def test_bad_input(tmp_path, capsys, args, message):
    assert main(["experts", "--out", str(tmp_path / "ex"), "--quiet", *args]) == 2
    err = capsys.readouterr().err
    assert message in err and err.count("\n") == 1, err
    assert not (tmp_path / "ex").exists()


def test_settings_refuse_negative_thresholds():
    with pytest.raises(SettingsError):
        ExpertsSettings(alpha=-1.0)
