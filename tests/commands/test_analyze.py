"""`moejax analyze` end to end: its CSVs against an independent recomputation from transformers' raw router
logits, batching invariance, the content mask, bad input, and the no-argument demo.

The independent side tokenises with the same tokenizer, runs the PyTorch model one chunk at a time
(unpadded), takes router logits (output_router_logits) and chosen experts (router forward hooks),
drops the BOS position, and computes each metric in float64 with numpy/scipy. Bounds: counts exact;
other metrics 1e-6 relative, plus 1e-6 absolute for those that are differences (LSI, Gini, rank
correlations, nJSD), which near 0 inherit the ~1e-7 absolute gap between the two models' logits.
"""

from __future__ import annotations

import csv
import json

import numpy as np
import pytest

pytest.importorskip("torch")  # the test extra; without it these tests are skipped

import torch
import transformers
from scipy import stats as sps
from scipy.spatial import distance
from support import QUICK_ARCHS, assert_same_statistics, tie_forcing

import moejax
from moejax.cli import main
from moejax.commands.analyze import AnalyzeSettings, analyze
from moejax.data.corpus import DataError, chunk, read_corpus
from moejax.data.tokenize import HFTokenizer
from moejax.parity.fixtures import make_checkpoint, run_reference, save_byte_tokenizer
from moejax.routing.analysis import collect

pytestmark = pytest.mark.torch

LANGS = ["he", "en"]
TEXT = {
    "en": ["The river rises in spring.", "Bread needs flour, water and time.", "Trains leave at seven.",
           "She plays the violin every evening.", "Snow covered the hills overnight."],
    "he": ["הנהר עולה באביב.", "לחם צריך קמח, מים וזמן.", "הרכבות יוצאות בשבע.",
           "היא מנגנת בכינור כל ערב.", "שלג כיסה את הגבעות בלילה."],
}


def write_corpus(directory, text=TEXT):
    directory.mkdir(exist_ok=True)
    for lang, lines in text.items():
        (directory / f"{lang}.txt").write_text("\n".join(lines) + "\n", encoding="utf-8")
    return directory


@pytest.fixture(scope="module", params=QUICK_ARCHS)
def checkpoint(request, tmp_path_factory):
    root = tmp_path_factory.mktemp(request.param)
    reference, path = make_checkpoint(request.param, root / "model", seed=31, byte_tokenizer=True)
    return reference, path


def read(path):
    with open(path, encoding="utf-8") as f:
        return list(csv.DictReader(f))


def selection_scores(reference, layer, logits):
    """What each model's top-1 is taken over: the softmax (Qwen3) or the biased sigmoid (Nemotron-H)."""
    routers = [m for m in reference.modules() if type(m).__name__.lower().endswith("topkrouter")]
    bias = getattr(routers[layer], "e_score_correction_bias", None)
    if bias is None:
        return logits
    return 1 / (1 + np.exp(-logits)) + bias.detach().double().numpy()


def independent(reference, path):
    """Per language, per MoE layer: counts [E], prob sums [E], entropy sum, tokens, top-1 counts [E]."""
    tok = transformers.AutoTokenizer.from_pretrained(path, local_files_only=True)
    out = {}
    for lang in LANGS:
        per_chunk = []
        for text in TEXT[lang]:
            ids = np.array([tok(text)["input_ids"]])
            _, logits, chosen = run_reference(reference, ids)
            keep = ids[0] != tok.bos_token_id
            layers = []
            for layer, (lg, ch) in enumerate(zip(logits, chosen, strict=True)):
                p = torch.softmax(torch.from_numpy(lg[0]), -1).numpy()[keep]
                counts = np.bincount(ch[0][keep].ravel(), minlength=p.shape[-1])
                scores = np.take_along_axis(selection_scores(reference, layer, lg[0]), ch[0], axis=-1)
                top1 = np.take_along_axis(ch[0], scores.argmax(-1)[:, None], axis=-1)[keep, 0]
                layers.append((counts, p.sum(0), sps.entropy(p, base=2, axis=-1).sum(), keep.sum(),
                               np.bincount(top1, minlength=p.shape[-1])))
            per_chunk.append(layers)
        out[lang] = per_chunk
    return out


def analysis(model, corpus, out, **settings):
    """`moejax analyze` from Python: `model` a directory (None: the built-in model), over LANGS of `corpus`."""
    return analyze(AnalyzeSettings(model=() if model is None else (str(model),), langs=tuple(LANGS),
                                   data=None if corpus is None else str(corpus), out=out, quiet=True, **settings))


def test_csvs_match_independent_recomputation(checkpoint, tmp_path):
    reference, path = checkpoint
    out = analysis(path, write_corpus(tmp_path / "corpus"), tmp_path / "out", chunk_mode="sentence", batch_size=2)
    ref = independent(reference, path)
    k = reference.config.num_experts_per_tok
    layers, experts, pairs, lsi = (read(out / f"{n}.csv") for n in ("layers", "experts", "pairs", "lsi"))
    n_layers = len(ref["en"][0])
    totals = {lang: [tuple(sum(c[layer][i] for c in ref[lang]) for i in range(5)) for layer in range(n_layers)]
              for lang in LANGS}

    def gini(x):
        x = np.asarray(x, float)
        return np.abs(x[:, None] - x[None]).sum() / (2 * len(x) ** 2 * x.mean())

    def close(got, want, atol=0.0):
        np.testing.assert_allclose(float(got), want, rtol=1e-6, atol=atol)

    for row in layers:
        counts, probs, ent, tokens, top1 = totals[row["lang"]][int(row["layer"])]
        f = counts / counts.sum()
        close(row["usage_entropy_bits"], sps.entropy(f, base=2))
        close(row["usage_entropy_norm"], sps.entropy(f, base=2) / np.log2(len(f)))
        close(row["gini"], gini(counts), atol=1e-6)
        close(row["gini_top1"], gini(top1), atol=1e-6)
        assert float(row["active_experts"]) == (counts > 0).sum()
        assert float(row["active_experts_0.001"]) == (f > 0.001).sum()
        close(row["selection_entropy_bits"], ent / tokens)
    for row in experts:
        counts, probs, _, tokens, _ = totals[row["lang"]][int(row["layer"])]
        e = int(row["expert"])
        assert int(row["topk_count"]) == counts[e]
        close(row["topk_fraction"], counts[e] / (k * tokens))
        close(row["mean_prob"], probs[e] / tokens, atol=1e-7)
    for row in pairs:
        layer = int(row["layer"])
        fa, fb = (totals[lang][layer][0] / totals[lang][layer][0].sum() for lang in (row["lang_a"], row["lang_b"]))
        close(row["cosine"], 1 - distance.cosine(fa, fb))
        pa, pb = (totals[lang][layer][1] / totals[lang][layer][3] for lang in (row["lang_a"], row["lang_b"]))
        close(row["cosine_pbar"], 1 - distance.cosine(pa, pb))
        top = [set(np.lexsort((np.arange(len(f)), -f))[:k]) for f in (fa, fb)]
        close(row["topk_jaccard"], len(top[0] & top[1]) / len(top[0] | top[1]))
        close(row["topk_overlap"], len(top[0] & top[1]) / k)
        close(row["spearman"], sps.spearmanr(fa, fb).statistic, atol=1e-6)
        close(row["kendall"], sps.kendalltau(fa, fb).statistic, atol=1e-6)
        njsd = []
        for ca, cb in zip(ref[row["lang_a"]], ref[row["lang_b"]], strict=True):
            p, q = ca[layer][1] / ca[layer][3], cb[layer][1] / cb[layer][3]
            floor = max(np.log(len(p)) - (sps.entropy(p) + sps.entropy(q)) / 2, 1e-6)
            njsd.append(distance.jensenshannon(p, q) ** 2 / floor)
        close(row["njsd"], np.mean(njsd), atol=1e-6)
    for row in (r for r in lsi if r["layer"] != "mean"):
        layer, e = int(row["layer"]), int(row["expert"])
        pa, pb = (totals[lang][layer][1][e] / totals[lang][layer][3] for lang in ("he", "en"))
        close(row["lsi"], (pa - pb) / (pa + pb), atol=1e-6)
    settings = json.loads((out / "metrics.json").read_text())
    model = next(iter(settings["models"].values()))
    assert model["excluded_token_ids"] == [0, 1, 2]
    assert model["tokens"] == {lang: int(sum(c[0][3] for c in ref[lang])) for lang in LANGS}


@pytest.mark.slow
def test_batching_and_bucketing_invariance(checkpoint, tmp_path):
    """Batch size 1 vs 3 (other padded shapes, other summation orders): the same statistics, once any routing flip
    between the two is proven a near tie and the first run's experts are forced there (support.tie_forcing)."""
    _, path = checkpoint
    model = moejax.from_pretrained(path)
    tokenizer = HFTokenizer(path)
    texts = read_corpus(str(write_corpus(tmp_path / "corpus")), LANGS)
    common = dict(exclude_ids=sorted(tokenizer.special_ids), probabilities="softmax", seed=0, keep_routing=True)
    for lang in LANGS:
        one = collect(model, tokenizer, texts[lang], batch_size=1, **common)
        three = collect(model, tokenizer, texts[lang], batch_size=3, **common)
        forced, _ = tie_forcing(model, one, three)
        assert_same_statistics(one, collect(model, tokenizer, texts[lang], batch_size=3, forced=forced, **common)
                               if forced else three)


@pytest.mark.slow
def test_content_mask_excludes_added_specials(checkpoint, tmp_path):
    """Chat-template-like ids passed with --exclude-ids leave the token counts short by exactly their number."""
    _, path = checkpoint
    corpus = write_corpus(tmp_path / "corpus")
    base = analysis(path, corpus, tmp_path / "a", chunk_mode="sentence")
    space = transformers.AutoTokenizer.from_pretrained(path)(" ", add_special_tokens=False)["input_ids"][0]
    excl = analysis(path, corpus, tmp_path / "b", chunk_mode="sentence", exclude_ids=(space,))
    tokens = [next(iter(json.loads((o / "metrics.json").read_text())["models"].values()))["tokens"]
              for o in (base, excl)]
    spaces = {lang: sum(t.count(" ") for t in TEXT[lang]) for lang in LANGS}
    assert {lang: tokens[0][lang] - tokens[1][lang] for lang in LANGS} == spaces


@pytest.mark.parametrize("text, message", [
    ({"en": TEXT["en"]}, "missing file for language 'he'"),
    ({"en": TEXT["en"], "he": TEXT["he"][:4]}, "not aligned: line counts differ"),
    ({"en": TEXT["en"], "he": [*TEXT["he"][:2], "", *TEXT["he"][3:]]}, "line 3 has no 'he' text"),
])
def test_bad_corpora(tmp_path, text, message):
    """With --parallel asked: a corpus that is not aligned is an error (without it, it is analysed as not
    parallel: tests/commands/test_analyze_corpora.py)."""
    corpus = write_corpus(tmp_path / "corpus", text)
    out = tmp_path / "out"
    with pytest.raises(DataError, match=message.replace("(", r"\(").replace(")", r"\)").replace("[", r"\[")
                       .replace("]", r"\]")):
        analysis(None, corpus, out, parallel=True)
    assert not out.exists()


def test_unknown_language_and_no_moe(tmp_path):
    with pytest.raises(DataError, match="unknown language code"):
        read_corpus(None, ["en", "xx"])
    _, path = make_checkpoint("qwen3_moe", tmp_path / "dense", seed=1, vocab_size=259, mlp_only_layers=[0, 1, 2, 3])
    save_byte_tokenizer(path)
    (tmp_path / "out").mkdir()
    (tmp_path / "out" / "keep.txt").write_text("earlier results")
    code = main(["analyze", "--model", str(path), "--langs", "he,en", "--data", str(write_corpus(tmp_path / "c")),
                 "--out", str(tmp_path / "out"), "--quiet"])
    assert code == 2
    assert (tmp_path / "out" / "keep.txt").read_text() == "earlier results"


def test_missing_tokenizer(tmp_path):
    _, path = make_checkpoint("qwen3_moe", tmp_path / "m", seed=1)
    with pytest.raises(DataError, match="no tokenizer"):
        analysis(path, write_corpus(tmp_path / "c"), tmp_path / "out")


def test_paragraph_chunks_share_boundaries():
    corpus = {"en": ["one two three"] * 5, "ja": ["いち。"] * 5}
    chunks = chunk(corpus, words=6)
    assert chunks["en"] == ["one two three one two three"] * 2 + ["one two three"]
    assert chunks["ja"] == ["いち。いち。"] * 2 + ["いち。"]


@pytest.mark.slow
def test_no_argument_demo(tmp_path, monkeypatch):
    """`moejax analyze` alone: the built-in model on the built-in en/he/ja corpus, the whole output set."""
    monkeypatch.chdir(tmp_path)
    assert main(["analyze", "--quiet"]) == 0
    out = tmp_path / "moejax-analysis"
    for name in ("layers.csv", "experts.csv", "pairs.csv", "lsi.csv", "metrics.json", "report.md",
                 "entropy_per_layer.png", "gini_active_per_layer.png", "lsi.png", "cosine_per_layer.png",
                 "divergence_per_layer.png"):
        assert (out / name).stat().st_size > 0, name
    settings = json.loads((out / "metrics.json").read_text())
    assert settings["langs"] == ["en", "he", "ja"] and settings["reference"] == "en"
    report = (out / "report.md").read_text()
    assert "he-en" in report and "ja-en" in report and "![LSI](lsi.png)" in report
    assert len(read(out / "layers.csv")) == 3 * 8


def test_help_documents_every_option(capsys):
    assert main(["analyze", "--help"]) == 0
    text = capsys.readouterr().out
    for flag in ("--model", "--langs", "--data", "--out", "--chunk-mode", "--chunk-words", "--batch-size",
                 "--probabilities", "--exclude-ids", "--seed", "--quiet"):
        assert flag in text


@pytest.mark.slow
def test_experiment_compares_labelled_models(checkpoint, tmp_path):
    """experiments.multilingual_routing: two labelled models side by side, one directory per pair, a summary."""
    from experiments.multilingual_routing import main as experiment

    _, path = checkpoint
    corpus = write_corpus(tmp_path / "corpus", {**TEXT, "ja": ["川は春に増える。", "パンには小麦粉と水と時間が要る。",
                                                               "列車は七時に出る。", "彼女は毎晩バイオリンを弾く。",
                                                               "雪が一晩で丘を覆った。"]})
    experiment(["--model", f"base={path}", "--model", f"cpt={path}/.", "--data", str(corpus),
                "--out", str(tmp_path / "exp"), "--chunk-mode", "sentence"])
    for pair in ("he-en", "ja-en"):
        models = {r["model"] for r in read(tmp_path / "exp" / pair / "layers.csv")}
        assert models == {"base", "cpt"}
    summary = (tmp_path / "exp" / "summary.md").read_text()
    assert "| ja-en | cpt | ja |" in summary


def test_corpus_formats(tmp_path):
    """FLORES-200 (flat or split dev/devtest), TSV with a header of codes, JSONL: the same aligned corpus."""
    flores = tmp_path / "flores"
    (flores / "dev").mkdir(parents=True)
    (flores / "devtest").mkdir()
    for lang, code in (("en", "eng_Latn"), ("he", "heb_Hebr")):
        (flores / "dev" / f"{code}.dev").write_text("\n".join(TEXT[lang][:3]) + "\n", encoding="utf-8")
        (flores / "devtest" / f"{code}.devtest").write_text("\n".join(TEXT[lang][3:]) + "\n", encoding="utf-8")
    tsv = tmp_path / "ted.tsv"
    tsv.write_text("en\the\n" + "".join(f"{e}\t{h}\n" for e, h in zip(TEXT["en"], TEXT["he"], strict=True)),
                   encoding="utf-8")
    jsonl = tmp_path / "ted.jsonl"
    jsonl.write_text("".join(json.dumps({"en": e, "he": h}, ensure_ascii=False) + "\n"
                             for e, h in zip(TEXT["en"], TEXT["he"], strict=True)), encoding="utf-8")
    for source in (flores, tsv, jsonl, write_corpus(tmp_path / "plain")):
        assert read_corpus(str(source), ["he", "en"]) == {"he": TEXT["he"], "en": TEXT["en"]}, source
    with pytest.raises(DataError, match=r"no column for language\(s\) \['ja'\]"):
        read_corpus(str(tsv), ["ja", "en"])
    with pytest.raises(DataError, match="no FLORES-200 file jpn_Jpan"):
        read_corpus(str(flores), ["ja", "en"])
    jsonl.write_text(json.dumps({"en": "x", "he": ""}) + "\n")
    with pytest.raises(DataError, match="row 1 has no 'he' text"):
        read_corpus(str(jsonl), ["he", "en"])
