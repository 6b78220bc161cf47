"""Corpora of `moejax analyze` beyond aligned text files: FLORES-200 and Belebele in their published layouts, any
language code (ISO 639-1/3, FLORES-200, or a name used as written), and corpora whose languages are not parallel.

The end-to-end check of a non-parallel corpus compares analyze's tables with each language's chunks run alone through
`collect` (the same built-in model) and the metrics recomputed here in float64 with scipy: counts exactly, the rest
to 1e-9 relative (the same float32 statistics summed in another order of numpy reductions), plus 1e-12 absolute for
differences near 0 (LSI).
"""

from __future__ import annotations

import csv
import json
import random

import numpy as np
import pytest
from scipy import special
from scipy import stats as sps
from scipy.spatial import distance

from moejax.cli import main
from moejax.commands.analyze import AnalyzeSettings, analyze
from moejax.data.corpus import Corpus, chunk, read_corpus, words_in
from moejax.data.tokenize import ByteTokenizer
from moejax.errors import DataError, SettingsError
from moejax.routing import metrics as M

# Written for these tests; each language's lines say the same thing, so the FLORES and Belebele fixtures are parallel.
SENTENCES = {
    "eng_Latn": ["The river rises in spring.", "Bread needs flour, water and time.", "Trains leave at seven.",
                 "She plays the violin every evening.", "Snow covered the hills overnight.",
                 "The market opens before sunrise."],
    "bam_Latn": ["Baji bɛ yɛlɛn samiya la.", "Buru bɛ farinɛ ni ji ni waati de fɛ.", "Sɔgɔmada wagati wolonwula.",
                 "A bɛ wiyolɔn fɔ wula o wula.", "Nɛnɛ ye kuluw datugu su fɛ.", "Sugu bɛ da yɛlɛ tile bɔ ɲɛ."],
    "asm_Beng": ["বসন্তত নদীখন বাঢ়ে।", "পিঠাৰ বাবে আটা, পানী আৰু সময় লাগে।", "ৰেলগাড়ী সাতটাত যায়।",
                 "তাই প্ৰতি সন্ধিয়া বেহেলা বজায়।", "ৰাতিটোত বৰফে পাহাৰবোৰ ঢাকি দিলে।", "বজাৰখন সূৰ্যোদয়ৰ আগতে খোলে।"],
}


def write_flores(root, sentences=SENTENCES, dev=4):
    """The FLORES-200 tarball's layout: flores200_dataset/dev/{code}.dev and devtest/{code}.devtest."""
    for split, part in (("dev", slice(None, dev)), ("devtest", slice(dev, None))):
        folder = root / "flores200_dataset" / split
        folder.mkdir(parents=True, exist_ok=True)
        for code, lines in sentences.items():
            (folder / f"{code}.{split}").write_text("\n".join(lines[part]) + "\n", encoding="utf-8")
    return root


def passages(code):
    """Three passages of two sentences each, keyed by their link, in link order."""
    lines = SENTENCES[code]
    return {f"https://example.org/wiki/p{i}": " ".join(lines[2 * i:2 * i + 2]) for i in range(3)}


def write_belebele(folder, found: dict[str, dict[str, str]], seed=0):
    """Belebele's layout: {code}.jsonl, one question per line, two questions on each passage (in a shuffled order:
    the rows align by link, not by position)."""
    folder.mkdir(parents=True, exist_ok=True)
    for code, by_link in found.items():
        rows = [{"link": link, "question_number": q, "flores_passage": text, "question": f"Question {q}?",
                 "mc_answer1": "yes", "mc_answer2": "no", "mc_answer3": "maybe", "mc_answer4": "never",
                 "correct_answer_num": "1", "dialect": code, "ds": "2023-05-03"}
                for link, text in by_link.items() for q in (1, 2)]
        random.Random(f"{seed}{code}").shuffle(rows)
        (folder / f"{code}.jsonl").write_text("".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rows),
                                              encoding="utf-8")
    return folder


def test_flores_tarball_layout(tmp_path):
    """--data at the tarball's parent, at flores200_dataset/ or at one split: any code of each language finds its
    file; dev lines come before devtest lines."""
    write_flores(tmp_path)
    both = {lang: SENTENCES[code] for lang, code in (("bm", "bam_Latn"), ("asm_Beng", "asm_Beng"), ("eng", "eng_Latn"))}
    for where in (tmp_path, tmp_path / "flores200_dataset"):
        corpus = read_corpus(where, ["bm", "asm_Beng", "eng"])
        assert corpus == both and corpus.parallel and corpus.why == "6 aligned lines in every language"
    dev = read_corpus(tmp_path / "flores200_dataset" / "dev", ["bm", "en"])
    assert dev == {"bm": SENTENCES["bam_Latn"][:4], "en": SENTENCES["eng_Latn"][:4]}
    with pytest.raises(DataError, match=r"no FLORES-200 file jpn_Jpan\.dev/\.devtest for language 'ja'"):
        read_corpus(tmp_path, ["ja", "en"])


def test_flores_line_counts_differ(tmp_path):
    """Different line counts: not parallel by default (each language's lines kept whole), an error with --parallel."""
    write_flores(tmp_path, {**SENTENCES, "bam_Latn": SENTENCES["bam_Latn"][:5]})
    corpus = read_corpus(tmp_path, ["bm", "en"])
    assert not corpus.parallel and "line counts differ" in corpus.why and "bam_Latn.devtest: 5" in corpus.why
    assert (len(corpus["bm"]), len(corpus["en"])) == (5, 6)
    with pytest.raises(DataError, match="not aligned: line counts differ .*--parallel needs the same rows"):
        read_corpus(tmp_path, ["bm", "en"], parallel=True)


@pytest.mark.parametrize("folder", ["data", "."])
def test_belebele_layout(tmp_path, folder):
    """One passage per distinct link (each has two questions), aligned by link across languages."""
    write_belebele(tmp_path / folder, {code: passages(code) for code in SENTENCES})
    corpus = read_corpus(tmp_path, ["bm", "asm_Beng", "en"])
    assert corpus.parallel and corpus.why == "3 aligned passages in every language"
    order = list(dict.fromkeys(json.loads(line)["link"]
                               for line in (tmp_path / folder / "bam_Latn.jsonl").read_text().splitlines()))
    assert corpus == {lang: [passages(code)[link] for link in order]
                      for lang, code in (("bm", "bam_Latn"), ("asm_Beng", "asm_Beng"), ("en", "eng_Latn"))}


def test_belebele_passages_differ(tmp_path):
    """A passage one language lacks: not parallel by default; with --parallel an error naming it, or with
    --skip-incomplete the passage dropped and counted."""
    english = passages("eng_Latn")
    missing = dict(list(passages("bam_Latn").items())[1:])
    write_belebele(tmp_path / "data", {"bam_Latn": missing, "eng_Latn": english})
    corpus = read_corpus(tmp_path, ["bm", "en"])
    assert not corpus.parallel and "1 of 3 links are not in every language" in corpus.why
    assert sorted(corpus["bm"]) == sorted(missing.values()) and sorted(corpus["en"]) == sorted(english.values())
    with pytest.raises(DataError, match="bam_Latn.jsonl: passage https://example.org/wiki/p0 has no 'bm' text"):
        read_corpus(tmp_path, ["bm", "en"], parallel=True)
    kept = read_corpus(tmp_path, ["bm", "en"], parallel=True, skip_incomplete=True)
    assert kept.parallel and kept.skipped == {"bm": 1, "en": 0} and len(kept["bm"]) == len(kept["en"]) == 2
    assert all(english[link] in kept["en"] for link in missing)


@pytest.mark.parametrize("row, message", [
    ({"link": "x", "question_number": 1, "flores_passage": 7}, "bam_Latn.jsonl:2: expected a Belebele question"),
    ({"link": "https://example.org/wiki/p0", "flores_passage": "Another text."}, "bam_Latn.jsonl:2: the passage of "
     "https://example.org/wiki/p0 differs from line 1's"),
])
def test_bad_belebele_files(tmp_path, row, message):
    first = {"link": "https://example.org/wiki/p0", "question_number": 1, "flores_passage": "A text."}
    (tmp_path / "bam_Latn.jsonl").write_text(json.dumps(first) + "\n" + json.dumps(row) + "\n")
    (tmp_path / "eng_Latn.jsonl").write_text(json.dumps(first) + "\n")
    with pytest.raises(DataError, match=message):
        read_corpus(tmp_path, ["bm", "en"])


def test_text_files_not_parallel(tmp_path):
    """{lang}.txt and {lang}.jsonl ({"text"}) with different texts and counts: each language's non-empty texts; a
    file may be named by any code of its language."""
    (tmp_path / "en.txt").write_text("One.\n\nTwo.\nThree.\n", encoding="utf-8")
    (tmp_path / "yor_Latn.jsonl").write_text("".join(json.dumps({"text": t}) + "\n" for t in ("Ọkan.", "", "Meji.")),
                                             encoding="utf-8")
    corpus = read_corpus(tmp_path, ["en", "yo"])
    assert corpus == {"en": ["One.", "Two.", "Three."], "yo": ["Ọkan.", "Meji."]}
    assert not corpus.parallel and "tmp" in corpus.why and "record counts differ" in corpus.why
    (tmp_path / "bad.jsonl").write_text(json.dumps({"body": "x"}) + "\n")
    with pytest.raises(DataError, match=r'bad\.jsonl:1: expected a JSON object with a string "text" field'):
        read_corpus(tmp_path, ["en", "bad"])


def test_table_columns_by_any_code_and_no_parallel(tmp_path):
    """A TSV whose header uses FLORES-200 codes read with ISO codes; --no-parallel reads each column alone, its
    empty cells dropped rather than an error."""
    tsv = tmp_path / "corpus.tsv"
    tsv.write_text("yor_Latn\teng_Latn\nỌkan.\tOne.\n\tTwo.\nMẹta.\tThree.\n", encoding="utf-8")
    with pytest.raises(DataError, match="row 3 has no 'yo' text"):
        read_corpus(tsv, ["yo", "en"])
    corpus = read_corpus(tsv, ["yo", "en"], parallel=False)
    assert corpus == {"yo": ["Ọkan.", "Mẹta."], "en": ["One.", "Two.", "Three."]}
    assert not corpus.parallel and corpus.why == "--no-parallel"


def test_chunks_of_a_corpus_that_is_not_parallel():
    """Each language is cut by its own words: Japanese counts characters (two to a word) and joins without spaces;
    a text longer than the chunk is cut; a parallel corpus keeps English's boundaries for every language."""
    corpus = Corpus({"en": ["one two three"] * 3 + ["a b c d e f g h"], "ja": ["いちにさん。"] * 4}, False, "test")
    chunks = chunk(corpus, words=6)
    assert chunks["en"] == ["one two three one two three", "one two three a b c d e f", "g h"]
    assert words_in("いちにさん。", "ja") == 3 and chunks["ja"] == ["いちにさん。いちにさん。"] * 2
    aligned = Corpus({"en": ["one two three"] * 4, "ja": ["いちにさん。"] * 4}, True, "test")
    assert chunk(aligned, words=6)["ja"] == ["いちにさん。いちにさん。"] * 2
    assert chunk(aligned, words=9)["ja"] == ["いちにさん。" * 3, "いちにさん。"]


def read(path):
    with open(path, encoding="utf-8") as f:
        return list(csv.DictReader(f))


@pytest.mark.slow  # the first analyze of a module compiles the built-in model: ~30 s on two cores
def test_not_parallel_end_to_end(tmp_path, capfd):
    """English and Hebrew texts that are not translations, of different lengths: every per-language metric equals
    the one from that language's chunks run alone; the pair metrics follow from the two languages' pooled
    statistics; the metrics that need aligned chunks are skipped, in metrics.json, report.md and the printed lines."""
    from moejax.opening import open_model
    from moejax.routing.analysis import collect

    texts = {"en": [f"Line {i} of the English text says something about rivers and trains." for i in range(9)],
             "he": [f"{line} ({i})" for i, line in enumerate(["הנהר עולה באביב.", "לחם צריך קמח, מים וזמן.",
                                                               "הרכבות יוצאות בשבע.", "שלג כיסה את הגבעות."] * 2)]}
    data = tmp_path / "corpus"
    data.mkdir()
    for lang, lines in texts.items():
        (data / f"{lang}.txt").write_text("\n".join(lines) + "\n", encoding="utf-8")
    out = analyze(AnalyzeSettings(langs=("en", "he"), data=str(data), out=tmp_path / "out", chunk_words=20,
                                  quiet=True))
    assert "moejax analyze: skipped njsd: needs parallel text" in capfd.readouterr().err
    recorded = json.loads((out / "metrics.json").read_text())
    assert recorded["parallel"]["parallel"] is False and recorded["parallel"]["asked"] == "auto"
    assert "line counts differ" in recorded["parallel"]["why"]
    assert list(recorded["skipped"]) == ["njsd"] and recorded["skipped"]["njsd"].startswith("needs parallel text")
    report = (out / "report.md").read_text()
    assert "Parallel text: no" in report and "Skipped: njsd: needs parallel text" in report
    layers, experts, pairs, lsi = (read(out / f"{name}.csv") for name in ("layers", "experts", "pairs", "lsi"))
    assert "njsd" not in pairs[0] and "njsd_pooled" in pairs[0]

    model, tokenizer = open_model(None).model, ByteTokenizer()
    k = model.config.num_experts_per_tok
    alone = {}
    for lang in texts:
        chunks = chunk(read_corpus(data, [lang], least=1), 20)[lang]
        alone[lang] = collect(model, tokenizer, chunks, exclude_ids=sorted(tokenizer.special_ids), batch_size=8,
                              probabilities="softmax", seed=0)
        model_record = next(iter(recorded["models"].values()))
        assert model_record["chunks"][lang] == len(chunks) and model_record["tokens"][lang] == alone[lang].tokens.sum()
    assert len(alone["en"].tokens) != len(alone["he"].tokens) and min(len(r.tokens) for r in alone.values()) >= 2

    def close(got, want, atol=0.0):
        np.testing.assert_allclose(float(got), want, rtol=1e-9, atol=atol)

    def entropy_bits(counts_e):
        return sps.entropy(counts_e / counts_e.sum(), base=2)

    def gini(x):
        x = np.asarray(x, float)
        return np.abs(x[:, None] - x[None]).sum() / (2 * len(x) ** 2 * x.mean())

    pooled = {lang: (run.topk_counts.sum(0), run.prob_sums.sum(0) / run.tokens.sum()) for lang, run in alone.items()}
    for row in layers:
        run, layer = alone[row["lang"]], int(row["layer"])
        counts = run.topk_counts.sum(0)[layer]
        close(row["usage_entropy_bits"], entropy_bits(counts))
        close(row["gini"], gini(counts))
        close(row["selection_entropy_bits"], run.entropy_sums_bits.sum(0)[layer] / run.tokens.sum())
    assert len(layers) == 2 * len(model.config.moe_layers)
    for row in experts:
        counts, pbar = pooled[row["lang"]]
        layer, e = int(row["layer"]), int(row["expert"])
        assert int(row["topk_count"]) == counts[layer, e]
        close(row["mean_prob"], pbar[layer, e])
    for row in pairs:
        layer = int(row["layer"])
        (ca, pa), (cb, pb) = (tuple(x[layer] for x in pooled[lang]) for lang in (row["lang_a"], row["lang_b"]))
        close(row["cosine"], 1 - distance.cosine(ca, cb))
        top = [set(np.lexsort((np.arange(len(c)), -c))[:k]) for c in (ca, cb)]
        close(row["topk_overlap"], len(top[0] & top[1]) / k)
        mid = (pa + pb) / 2  # as computed, not renormalised (scipy's jensenshannon would rescale to sum 1)
        jsd = (special.rel_entr(pa, mid).sum() + special.rel_entr(pb, mid).sum()) / 2
        floor = max(np.log(len(pa)) - (special.entr(pa).sum() + special.entr(pb).sum()) / 2, 1e-6)
        close(row["njsd_pooled"], jsd / floor, atol=1e-12)
    for row in (r for r in lsi if r["layer"] != "mean"):
        layer, e = int(row["layer"]), int(row["expert"])
        a, b = pooled["he"][1][layer, e], pooled["en"][1][layer, e]
        close(row["lsi"], (a - b) / (a + b), atol=1e-12)
    summary = next(iter(recorded["summary"].values()))
    for lang, run in alone.items():
        halves = M.split_halves(len(run.tokens), 0)
        gaps = [abs(entropy_bits(run.topk_counts[halves[0]].sum(0)[layer])
                    - entropy_bits(run.topk_counts[halves[1]].sum(0)[layer])) for layer in range(len(pooled[lang][0]))]
        close(summary["noise_floor"][lang]["usage_entropy_bits"], np.mean(gaps))


@pytest.mark.slow  # the first analyze of a module compiles the built-in model: ~30 s on two cores
def test_flores_codes_end_to_end(tmp_path, capfd):
    """`--langs bm,asm_Beng` on the FLORES-200 layout: the files are found by FLORES-200 code, the tables keep the
    codes as given, the corpus is parallel, so nothing is skipped and njsd is computed; the reference is the last
    language when English is not analysed."""
    write_flores(tmp_path / "flores")
    assert main(["analyze", "--langs", "bm,asm_Beng", "--data", str(tmp_path / "flores"), "--out",
                 str(tmp_path / "out"), "--chunk-mode", "sentence", "--quiet"]) == 0
    recorded = json.loads((tmp_path / "out" / "metrics.json").read_text())
    assert recorded["langs"] == ["bm", "asm_Beng"] and recorded["reference"] == "asm_Beng"
    assert recorded["parallel"] == {"asked": "auto", "parallel": True, "why": "6 aligned lines in every language"}
    assert recorded["skipped"] == {}
    pairs = read(tmp_path / "out" / "pairs.csv")
    assert {(r["lang_a"], r["lang_b"]) for r in pairs} == {("bm", "asm_Beng")} and all(r["njsd"] for r in pairs)
    assert "skipped" not in capfd.readouterr().err


@pytest.mark.parametrize("argv, message", [
    (["--langs", "en,he", "--parallel", "--no-parallel"], "give --parallel or --no-parallel, not both"),
    (["--langs", "en,../he"], "--langs '../he': a language code is one word without spaces, commas or path"),
    (["--langs", "en,eng_Latn"], "--langs: en and eng_Latn both name eng_Latn"),
    (["--langs", "en,xx"], "unknown language code(s) ['xx'] for the built-in sample corpus"),
])
def test_refused_settings(argv, message, tmp_path, capsys):
    assert main(["analyze", *argv, "--out", str(tmp_path / "out"), "--quiet"]) == 2
    err = capsys.readouterr().err
    assert message in err and len(err.strip().splitlines()) == 1
    assert not (tmp_path / "out").exists()


def test_parallel_asked_for_but_line_counts_differ(tmp_path, capsys):
    (tmp_path / "corpus").mkdir()
    for lang, n in (("en", 3), ("he", 2)):
        (tmp_path / "corpus" / f"{lang}.txt").write_text("".join(f"Line {i}.\n" for i in range(n)), encoding="utf-8")
    assert main(["analyze", "--langs", "en,he", "--data", str(tmp_path / "corpus"), "--parallel", "--out",
                 str(tmp_path / "out"), "--quiet"]) == 2
    assert "not aligned: line counts differ" in capsys.readouterr().err
    with pytest.raises(SettingsError, match="give --parallel or --no-parallel"):
        AnalyzeSettings(parallel=True, no_parallel=True)


def test_experts_reads_any_code_from_any_layout(tmp_path):
    """`moejax experts --target LABEL=CORPUS` (and --langs with --data) read one language of these layouts by any
    of its codes."""
    from moejax.commands.experts import read_sequences

    write_flores(tmp_path / "flores")
    write_belebele(tmp_path / "belebele" / "data", {code: passages(code) for code in SENTENCES})
    assert read_sequences("bm", str(tmp_path / "flores")) == SENTENCES["bam_Latn"]
    assert sorted(read_sequences("asm", str(tmp_path / "belebele"))) == sorted(passages("asm_Beng").values())
    assert read_sequences("eng_Latn", "builtin") == read_corpus(None, ["en"], least=1)["en"]
