"""The CPT data mixture: spec parsing, file formats, packing against a plain-Python reference, resume."""

from __future__ import annotations

import json

import numpy as np
import pytest

from moejax.data.mixture import (
    IGNORE_INDEX,
    Batch,
    DataError,
    Documents,
    Mixture,
    Source,
    load_documents,
    parse_mixture,
)
from moejax.data.tokenize import ByteTokenizer

VOCAB = ByteTokenizer.vocab_size
FIELDS = ("input_ids", "segment_ids", "position_ids", "labels", "lang_ids")


class Bytes(ByteTokenizer):
    eos_id = 2


class BytesNoEos(ByteTokenizer):
    eos_id = None


def _ids(text: str) -> list[int]:
    return [1, *(b + 3 for b in text.encode("utf-8"))]


def _docs(*docs: list[int]) -> Documents:
    lengths = [len(d) for d in docs]
    return Documents(np.array([t for d in docs for t in d], np.int32), np.concatenate([[0], np.cumsum(lengths)]))


def _as_lists(docs: Documents) -> list[list[int]]:
    return [docs.tokens[a:b].tolist() for a, b in zip(docs.offsets[:-1], docs.offsets[1:], strict=True)]


def _assert_same(a: Batch, b: Batch) -> None:
    for field in FIELDS:
        assert np.array_equal(getattr(a, field), getattr(b, field)), field


@pytest.fixture
def files(tmp_path):
    """Two small text files, one in a directory whose name contains ':'."""
    (tmp_path / "a:b").mkdir()
    he, en = tmp_path / "a:b" / "he.txt", tmp_path / "en.txt"
    he.write_text("shalom\n", encoding="utf-8")
    en.write_text("hello\n", encoding="utf-8")
    return he, en


# --- parse_mixture -----------------------------------------------------------------------------------------


def test_parse_mixture_splits_on_first_equals_and_last_colon(files):
    he, en = files
    sources = parse_mixture(f"he={he}:0.6, en={en}:0.4")
    assert sources == [Source("he", he, 0.6), Source("en", en, 0.4)]


@pytest.mark.parametrize("spec, words", [
    ("he={he}:0.5,en={en}:0.4", ["sum to 0.9", "he=0.5", "en=0.4"]),
    ("he={he}:0.5,he={en}:0.5", ["'he' twice"]),
    ("he={he}:abc,en={en}:1", ["'abc' is not a number"]),
    ("he={he}:-0.5,en={en}:1.5", ["positive"]),
    ("he={he}:0,en={en}:1", ["positive"]),
    ("he={he}:nan,en={en}:1", ["positive"]),
    ("he:{he}:1", ["LANG=PATH:RATIO"]),
    ("he={he}", ["LANG=PATH:RATIO"]),
    ("he=:1", ["LANG=PATH:RATIO"]),
    ("={he}:1", ["LANG=PATH:RATIO"]),
    ("h e={he}:1", ["LANG=PATH:RATIO"]),
    ("he={he}:1,", ["LANG=PATH:RATIO"]),
    ("", ["empty mixture spec"]),
    ("  ", ["empty mixture spec"]),
    ("he={he}:0.5,en={he}.missing:0.5", ["'en'", "he.txt.missing", "does not exist"]),
])
def test_parse_mixture_errors(files, spec, words):
    he, en = files
    with pytest.raises(DataError) as e:
        parse_mixture(spec.format(he=he, en=en))
    for word in words:
        assert word in str(e.value)


# --- load_documents ----------------------------------------------------------------------------------------


def _load(path, tokenizer=None, vocab=VOCAB, lang="xx") -> Documents:
    docs = load_documents(Source(lang, path, 1.0), tokenizer or Bytes(), vocab)
    assert docs.tokens.dtype == np.int32 and docs.offsets.dtype == np.int64
    return docs


def test_txt_one_document_per_line_blank_lines_skipped(tmp_path):
    path = tmp_path / "d.txt"
    path.write_bytes("ab\n\n  \nשלום\r\nc".encode())
    assert _as_lists(_load(path)) == [_ids("ab") + [2], _ids("שלום") + [2], _ids("c") + [2]]
    assert _as_lists(_load(path, BytesNoEos())) == [_ids("ab"), _ids("שלום"), _ids("c")]


def test_jsonl_reads_text_field(tmp_path):
    path = tmp_path / "d.jsonl"
    path.write_text('{"text": "one", "id": 1}\n\n{"text": "two\\nlines"}\n', encoding="utf-8")
    assert _as_lists(_load(path)) == [_ids("one") + [2], _ids("two\nlines") + [2]]


@pytest.mark.parametrize("body, words", [
    ('{"text": "ok"}\n{"text": oops}\n', [":2:", "not valid JSON"]),
    ('{"text": "ok"}\n\n{"body": "x"}\n', [":3:", '"text"']),
    ('["text"]\n', [":1:", '"text"']),
])
def test_jsonl_bad_line_names_file_and_line(tmp_path, body, words):
    path = tmp_path / "bad.jsonl"
    path.write_text(body, encoding="utf-8")
    with pytest.raises(DataError) as e:
        _load(path)
    assert str(path) in str(e.value)
    for word in words:
        assert word in str(e.value)


def test_npy_splits_after_each_eos(tmp_path):
    path = tmp_path / "d.npy"
    np.save(path, np.array([5, 6, 2, 7, 2, 8, 9], np.int64))
    assert _as_lists(_load(path)) == [[5, 6, 2], [7, 2], [8, 9]]
    np.save(path, np.array([5, 2, 2, 7, 2], np.uint16))
    assert _as_lists(_load(path)) == [[5, 2], [2], [7, 2]]
    assert _as_lists(_load(path, BytesNoEos())) == [[5, 2, 2, 7, 2]]


def test_npz_reads_offsets_and_drops_empty_documents(tmp_path):
    path = tmp_path / "d.npz"
    np.savez(path, tokens=np.array([4, 5, 6, 7, 8], np.int32), offsets=np.array([0, 2, 2, 5, 5]))
    assert _as_lists(_load(path)) == [[4, 5], [6, 7, 8]]


@pytest.mark.parametrize("offsets", [[1, 5], [0, 3], [0, 4, 2, 5], [], [[0, 5]], [0.0, 5.0]])
def test_npz_malformed_offsets(tmp_path, offsets):
    path = tmp_path / "d.npz"
    np.savez(path, tokens=np.arange(5, dtype=np.int32), offsets=np.array(offsets))
    with pytest.raises(DataError, match="offsets"):
        _load(path)


def test_npz_missing_array_and_bad_dtype(tmp_path):
    path = tmp_path / "d.npz"
    np.savez(path, tokens=np.arange(5, dtype=np.int32))
    with pytest.raises(DataError, match="'tokens' and 'offsets'"):
        _load(path)
    npy = tmp_path / "f.npy"
    np.save(npy, np.ones(4, np.float32))
    with pytest.raises(DataError, match="1-D integer array"):
        _load(npy)


@pytest.mark.parametrize("name, write", [
    ("e.txt", lambda p: p.write_text("\n  \n\n", encoding="utf-8")),
    ("e.jsonl", lambda p: p.write_text("", encoding="utf-8")),
    ("e.npy", lambda p: np.save(p, np.zeros(0, np.int32))),
    ("e.npz", lambda p: np.savez(p, tokens=np.zeros(0, np.int32), offsets=np.array([0, 0]))),
])
def test_empty_file_names_language_and_file(tmp_path, name, write):
    path = tmp_path / name
    write(path)
    with pytest.raises(DataError) as e:
        _load(path, lang="he")
    assert str(path) in str(e.value) and "'he'" in str(e.value) and "empty" in str(e.value)


def test_token_out_of_range_names_file_id_and_vocab(tmp_path):
    path = tmp_path / "d.npy"
    np.save(path, np.array([3, 2, 300, 2], np.int64))
    with pytest.raises(DataError) as e:
        _load(path)
    assert str(path) in str(e.value) and "300" in str(e.value) and str(VOCAB) in str(e.value)
    np.save(path, np.array([3, -1], np.int64))
    with pytest.raises(DataError, match="-1"):
        _load(path)
    txt = tmp_path / "d.txt"
    txt.write_text("z\n", encoding="utf-8")  # byte 'z' is id 125
    with pytest.raises(DataError, match=r"125 is outside the vocabulary \[0, 100\)"):
        _load(txt, vocab=100)


def test_non_utf8_and_unsupported_suffix_name_the_file(tmp_path):
    path = tmp_path / "latin1.txt"
    path.write_bytes("café\n".encode("latin-1"))
    with pytest.raises(DataError, match="not UTF-8") as e:
        _load(path)
    assert str(path) in str(e.value)
    csv = tmp_path / "d.csv"
    csv.write_text("a\n", encoding="utf-8")
    with pytest.raises(DataError, match=r"\.txt, \.jsonl, \.npy, \.npz") as e:
        _load(csv)
    assert str(csv) in str(e.value)


# --- packing -----------------------------------------------------------------------------------------------

ROWS_KEY = 2**32 - 1


def _reference_batches(sources, documents, seq_len, batch_size, seed, n_batches):
    """The spec spelled out with Python lists: each language's stream built epoch by epoch from the same
    permutations, rows cut from it in order, segments/positions/labels counted token by token."""
    langs = [s.lang for s in sources]
    probs = np.array([s.ratio for s in sources])
    streams = {lang: {"tokens": [], "starts": [], "epochs": 0, "rows": 0} for lang in langs}
    batches = []
    for b in range(n_batches):
        draw = np.random.default_rng([seed, ROWS_KEY, b]).choice(len(langs), size=batch_size, p=probs / probs.sum())
        rows = []
        for li in draw.tolist():
            stream, docs = streams[langs[li]], _as_lists(documents[langs[li]])
            lo = stream["rows"] * seq_len
            stream["rows"] += 1
            while len(stream["tokens"]) < lo + seq_len:
                for d in np.random.default_rng([seed, li, stream["epochs"]]).permutation(len(docs)).tolist():
                    stream["tokens"].extend(docs[d])
                    stream["starts"].extend([True] + [False] * (len(docs[d]) - 1))
                stream["epochs"] += 1
            row_ids, row_starts = stream["tokens"][lo:lo + seq_len], stream["starts"][lo:lo + seq_len]
            seg, pos, segs, poss, labels = 0, 0, [], [], []
            for col, (tok, first) in enumerate(zip(row_ids, row_starts, strict=True)):
                if col == 0 or first:
                    seg, pos = seg + 1, 0
                else:
                    pos += 1
                segs.append(seg)
                poss.append(pos)
                labels.append(IGNORE_INDEX if first and col > 0 else tok)
            rows.append((row_ids, segs, poss, labels, li))
        batches.append(Batch(*(np.array([r[i] for r in rows]) for i in range(5))))
    return batches


def _corpus(seed=0):
    """Three languages: many short and long (> seq_len) documents, a few, and one shorter than a row."""
    rng = np.random.default_rng(seed)
    he = _docs(*(rng.integers(3, VOCAB, rng.integers(1, 40)).tolist() for _ in range(25)))
    en = _docs([10, 11, 12, 13, 14, 15, 16, 17, 18, 19, 20, 21, 22, 23, 24, 25, 26, 27, 28, 29, 30], [40, 41], [50])
    ja = _docs([60, 61, 62], [70, 71])
    sources = [Source("he", "he.txt", 0.5), Source("en", "en.txt", 0.3), Source("ja", "ja.txt", 0.2)]
    return sources, {"he": he, "en": en, "ja": ja}


@pytest.mark.parametrize("seq_len, batch_size, seed", [(16, 5, 0), (7, 3, 12345), (2, 1, 7)])
def test_packing_matches_plain_python_reference(seq_len, batch_size, seed):
    sources, documents = _corpus()
    mixture = Mixture(sources, documents, seq_len=seq_len, batch_size=batch_size, seed=seed)
    drawn = np.zeros(len(sources), int)
    for b, want in enumerate(_reference_batches(sources, documents, seq_len, batch_size, seed, 40)):
        got = mixture.next_batch()
        for field in FIELDS:
            value = getattr(got, field)
            assert value.dtype == np.int32, field
            np.testing.assert_array_equal(value, getattr(want, field), err_msg=f"batch {b} {field}")
        drawn += np.bincount(want.lang_ids, minlength=len(sources))
    assert mixture.state_dict()["rows"] == dict(zip(mixture.langs, drawn.tolist(), strict=True))
    assert mixture.state_dict()["batches"] == 40


def test_row_boundaries_by_hand():
    """One 3-token document, rows of 4: the stream repeats it, so every row is known without the permutation."""
    mixture = Mixture([Source("xx", "x.txt", 1.0)], {"xx": _docs([10, 11, 12])}, seq_len=4, batch_size=3, seed=0)
    batch = mixture.next_batch()
    np.testing.assert_array_equal(batch.input_ids, [[10, 11, 12, 10], [11, 12, 10, 11], [12, 10, 11, 12]])
    np.testing.assert_array_equal(batch.segment_ids, [[1, 1, 1, 2], [1, 1, 2, 2], [1, 2, 2, 2]])
    np.testing.assert_array_equal(batch.position_ids, [[0, 1, 2, 0], [0, 1, 0, 1], [0, 0, 1, 2]])
    np.testing.assert_array_equal(batch.labels, [[10, 11, 12, -100], [11, 12, -100, 11], [12, -100, 11, 12]])
    np.testing.assert_array_equal(batch.lang_ids, [0, 0, 0])


def test_long_document_is_split_across_rows_and_empty_documents_are_skipped():
    doc = list(range(3, 14))  # 11 tokens
    mixture = Mixture([Source("xx", "x.txt", 1.0)], {"xx": _docs([], doc, [])}, seq_len=4, batch_size=3, seed=3)
    batch = mixture.next_batch()
    np.testing.assert_array_equal(batch.input_ids.ravel(), (doc + doc)[:12])
    np.testing.assert_array_equal(batch.segment_ids, [[1, 1, 1, 1], [1, 1, 1, 1], [1, 1, 1, 2]])
    np.testing.assert_array_equal(batch.position_ids, [[0, 1, 2, 3], [0, 1, 2, 3], [0, 1, 2, 0]])
    np.testing.assert_array_equal(batch.labels[2], [11, 12, 13, -100])


def test_same_seed_same_batches_different_seed_different():
    sources, documents = _corpus()
    a, b, c = (Mixture(sources, documents, seq_len=16, batch_size=4, seed=s) for s in (1, 1, 2))
    batches_a, batches_c = [a.next_batch() for _ in range(5)], [c.next_batch() for _ in range(5)]
    for batch in batches_a:
        _assert_same(batch, b.next_batch())
    assert not all(np.array_equal(x.input_ids, y.input_ids) for x, y in zip(batches_a, batches_c, strict=True))


def test_resume_from_state_dict_is_exact():
    sources, documents = _corpus()
    mixture = Mixture(sources, documents, seq_len=8, batch_size=4, seed=5)
    for _ in range(5):
        mixture.next_batch()
    state = json.loads(json.dumps(mixture.state_dict()))
    expected = [mixture.next_batch() for _ in range(3)]
    resumed = Mixture(sources, documents, seq_len=8, batch_size=4, seed=5)
    resumed.load_state_dict(state)
    for want in expected:
        _assert_same(resumed.next_batch(), want)
    assert resumed.state_dict() == mixture.state_dict()
    assert state["batches"] == 5 and sum(state["rows"].values()) == 20


def test_row_fractions_converge_to_ratios():
    sources, documents = _corpus()
    mixture = Mixture(sources, documents, seq_len=4, batch_size=50, seed=11)
    lang_ids = np.concatenate([mixture.next_batch().lang_ids for _ in range(40)])
    fractions = np.bincount(lang_ids, minlength=3) / len(lang_ids)
    # 2,000 draws: the binomial standard deviation is at most 0.011, so 0.03 is about 2.7 sigma.
    np.testing.assert_allclose(fractions, [0.5, 0.3, 0.2], atol=0.03)


def test_end_to_end_from_files(tmp_path):
    he, en = tmp_path / "he.txt", tmp_path / "en.jsonl"
    he.write_text("שלום עולם\nמה נשמע\n", encoding="utf-8")
    en.write_text('{"text": "hello world"}\n{"text": "how are you"}\n', encoding="utf-8")
    sources = parse_mixture(f"he={he}:0.6,en={en}:0.4")
    documents = {s.lang: load_documents(s, Bytes(), VOCAB) for s in sources}
    mixture = Mixture(sources, documents, seq_len=32, batch_size=8, seed=0)
    assert mixture.langs == ("he", "en")
    batch = mixture.next_batch()
    assert batch.input_ids.shape == (8, 32) and (batch.segment_ids >= 1).all()
    for row, lang in zip(batch.input_ids, batch.lang_ids, strict=True):
        allowed = set(documents[mixture.langs[lang]].tokens.tolist())
        assert set(row.tolist()) <= allowed


# --- errors ------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("change, words", [
    ({"seq_len": 1}, ["seq_len 1"]),
    ({"batch_size": 0}, ["batch_size 0"]),
    ({"seed": -1}, ["seed -1"]),
    ({"documents": {"he": _docs([5])}}, ["'en'", "load_documents"]),
    ({"documents": {"he": _docs([5]), "en": Documents(np.zeros(0, np.int32), np.array([0]))}}, ["'en'"]),
    ({"documents": {"he": _docs([5]), "en": Documents(np.arange(4, dtype=np.int32), np.array([0, 3]))}},
     ["'en'", "offsets"]),
    ({"sources": [Source("he", "he.txt", 0.5), Source("en", "en.txt", 0.6)]}, ["sum to 1.1"]),
    ({"sources": [Source("he", "he.txt", 0.5), Source("he", "en.txt", 0.5)]}, ["repeat"]),
    ({"sources": []}, ["at least one source"]),
])
def test_constructor_errors(change, words):
    kwargs = {"sources": [Source("he", "he.txt", 0.5), Source("en", "en.txt", 0.5)],
              "documents": {"he": _docs([5]), "en": _docs([6, 7])}, "seq_len": 4, "batch_size": 2, "seed": 0}
    kwargs.update(change)
    with pytest.raises(DataError) as e:
        Mixture(kwargs.pop("sources"), kwargs.pop("documents"), **kwargs)
    for word in words:
        assert word in str(e.value)


def _state_change(state, key, value):
    return {**state, key: value}


@pytest.mark.parametrize("edit, words", [
    (lambda s: _state_change(s, "langs", ["ja", "en", "he"]), ["langs", "['he', 'en', 'ja']"]),
    (lambda s: _state_change(s, "langs", ["he", "en"]), ["langs"]),
    (lambda s: _state_change(s, "seed", 4), ["seed 4", "5"]),
    (lambda s: _state_change(s, "seq_len", 16), ["seq_len 16", "8"]),
    (lambda s: _state_change(s, "version", 2), ["version 2"]),
    (lambda s: _state_change(s, "batches", -1), ["batches", "-1"]),
    (lambda s: _state_change(s, "batches", True), ["batches"]),
    (lambda s: _state_change(s, "rows", {"he": 1, "en": 2}), ["rows"]),
    (lambda s: _state_change(s, "rows", {"he": 1, "en": 2, "ja": 1.5}), ["rows['ja']"]),
    (lambda s: [s], ["version"]),
])
def test_load_state_dict_validates(edit, words):
    sources, documents = _corpus()
    mixture = Mixture(sources, documents, seq_len=8, batch_size=4, seed=5)
    mixture.next_batch()
    before = mixture.state_dict()
    with pytest.raises(DataError) as e:
        mixture.load_state_dict(edit(before))
    for word in words:
        assert word in str(e.value)
    assert mixture.state_dict() == before
