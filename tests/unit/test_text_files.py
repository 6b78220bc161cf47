"""moejax.data.corpus.read_lines / read_text: the one reader of line-per-record text files (parallel corpora, training
data, SFT records). The reference is str.splitlines restricted to "\\n", "\\r\\n" and "\\r", after the "utf-8-sig"
codec has dropped a leading byte-order mark; exact equality, these are strings."""

from __future__ import annotations

import pytest

from moejax.commands.experts import read_sequences
from moejax.data.corpus import read_corpus, read_lines, read_text
from moejax.data.mixture import Source, jsonl_texts, load_documents
from moejax.data.sft import read_records
from moejax.data.tokenize import ByteTokenizer
from moejax.errors import DataError

BOM = "\ufeff"


@pytest.mark.parametrize("text, lines", [
    ("", []),
    ("one", ["one"]),
    ("one\n", ["one"]),
    ("one\ntwo", ["one", "two"]),
    ("one\r\ntwo\r\n", ["one", "two"]),
    ("one\rtwo\r", ["one", "two"]),
    ("one\r\n\r\ntwo\n\nthree\r\rfour", ["one", "", "two", "", "three", "", "four"]),
    ("\n", [""]),
    ("one\n\n", ["one", ""]),
    # Only \n, \r\n and \r end a line: a JSON string may hold U+2028 or a form feed unescaped.
    ("a\u2028b\x0cc\x85d\n", ["a\u2028b\x0cc\x85d"]),
])
@pytest.mark.parametrize("bom", ["", BOM])
def test_lines_end_at_any_line_end_and_a_leading_bom_is_dropped(tmp_path, text, lines, bom):
    path = tmp_path / "f.txt"
    path.write_bytes((bom + text).encode("utf-8"))
    assert read_lines(path) == lines
    assert read_text(path) == text  # the line ends as they are (the CSV reader needs them)


def test_only_a_leading_bom_is_dropped(tmp_path):
    path = tmp_path / "f.txt"
    path.write_bytes(f"{BOM}{BOM}one\n{BOM}two\n".encode())
    assert read_lines(path) == [f"{BOM}one", f"{BOM}two"]


def test_not_utf8_names_the_file_and_what_it_was_read_as(tmp_path):
    path = tmp_path / "latin1.txt"
    path.write_bytes("café\n".encode("latin-1"))
    with pytest.raises(DataError, match=r"latin1\.txt: not UTF-8 text \(invalid continuation byte at byte 3; "
                                        r"language 'fr'\); re-encode it as UTF-8"):
        read_lines(path, "language 'fr'")
    with pytest.raises(DataError, match=r"latin1\.txt: not UTF-8 text \(invalid continuation byte at byte 3\)"):
        read_text(path)


def test_corpora_training_data_and_sft_records_read_the_same_lines(tmp_path):
    """Files with a BOM and all three line ends: the parallel corpus, the CPT data (.txt and .jsonl) and the SFT
    records see the same three lines."""
    texts = ["one", "two", "three"]
    for lang in ("en", "he"):
        (tmp_path / f"{lang}.txt").write_bytes(f"{BOM}one\r\ntwo\rthree\n".encode())
    records = [f'{{"text": "{t}", "prompt": "{t}", "response": "{t}"}}' for t in texts]
    jsonl = tmp_path / "d.jsonl"
    jsonl.write_bytes(f"{BOM}{records[0]}\r\n{records[1]}\r{records[2]}\n".encode())
    assert read_corpus(tmp_path, ["en", "he"]) == {"en": texts, "he": texts}
    tokenizer = ByteTokenizer()
    for path in (tmp_path / "en.txt", jsonl):
        docs = load_documents(Source("en", path, 1.0), tokenizer, tokenizer.vocab_size)
        special = list(tokenizer.special_ids)
        assert [bytes(int(t) - 3 for t in docs.tokens[a:b] if t not in special).decode()
                for a, b in zip(docs.offsets[:-1], docs.offsets[1:], strict=True)] == texts
    assert [r[0]["content"] for r in read_records(jsonl)] == texts


@pytest.mark.parametrize("line, says", [('{"text": oops}', "not valid JSON"), ('["text"]', "expected"),
                                        ('"text"', "expected"), ("3", "expected")])
def test_every_jsonl_reader_names_the_bad_line(tmp_path, line, says):
    """One JSONL reader (corpus.jsonl_objects) under the corpora, the CPT data, the SFT records and `moejax experts`'
    text files: blank lines are skipped but counted, so the line named is the file's own, whatever the line ends."""
    good = '{"text": "a", "prompt": "a", "response": "a", "en": "a", "he": "a"}'
    path = tmp_path / "d.jsonl"
    path.write_bytes(f"{BOM}{good}\r\n\r\n{good}\r{line}\n{good}\n".encode())
    readers = [lambda: read_corpus(path, ["en", "he"]), lambda: jsonl_texts(path), lambda: read_records(path),
               lambda: read_sequences("en", str(path))]
    for read in readers:
        with pytest.raises(DataError) as caught:
            read()
        assert f"d.jsonl:4: {says}" in str(caught.value)
    first_bad = tmp_path / "first.jsonl"  # `moejax experts` looks at the first object to tell texts from a table
    first_bad.write_text(f"\n{line}\n{good}\n", encoding="utf-8")
    with pytest.raises(DataError) as caught:
        read_sequences("en", str(first_bad))
    assert f"first.jsonl:2: {says}" in str(caught.value)
