"""Corpora for `moejax analyze` and `moejax experts`: FLORES-200 (its published tarball), Belebele, TSV/CSV/JSONL
tables and per-language text or JSONL files; whether their languages are parallel; chunking (docs/analysis.md).

read_corpus returns a Corpus, {lang: [text, ...]} keyed by the codes as given, which says whether its languages are
parallel (text i is the same text in every language) and why; or raises DataError naming the file, the language and
what is wrong. A file or a column may be named by any code of its language (moejax.data.languages.file_names).
"""

from __future__ import annotations

import csv
import dataclasses
import io
import json
import re
from collections.abc import Callable
from pathlib import Path

from moejax.data.languages import check_codes, file_names, identity, lookup
from moejax.errors import DataError

SAMPLE_DIR = Path(__file__).parent / "sample"
SAMPLE_LANGS = ("en", "he", "ja")

# Where the published FLORES-200 tarball keeps a language's sentences, flores200_dataset/{dev,devtest}/{code}.{split}:
# --data may name the tarball's directory, one split's directory, or a directory holding the files themselves.
FLORES_DIRS = ("", "dev", "devtest", "flores200_dataset/dev", "flores200_dataset/devtest")
FLORES_SPLITS = ("dev", "devtest")
# Belebele keeps one question per line in {code}.jsonl (in data/ as published, or alone); its passages are
# FLORES-200's, the same passage and link for every question on it.
BELEBELE_DIRS = ("", "data")
# Scripts written without spaces between words: a chunk's size counts their characters, CHARS_PER_WORD to a word
# (roughly what Chinese and Japanese text needs per English word). Han and Kana sentences join without a space.
UNSPACED_SCRIPTS = frozenset({"Hans", "Hant", "Jpan", "Thai", "Laoo", "Khmr", "Mymr", "Tibt"})
JOINED_SCRIPTS = frozenset({"Hans", "Hant", "Jpan"})
CHARS_PER_WORD = 2


class Corpus(dict):
    """{lang: [text, ...]}. parallel: text i is the same text in every language (an aligned source, the same rows in
    every language); why: what decided it; skipped: per language, the aligned rows dropped because its text was empty
    (read_corpus(skip_incomplete=True))."""

    def __init__(self, texts: dict[str, list[str]], parallel: bool, why: str, skipped: dict[str, int] | None = None):
        super().__init__(texts)
        self.parallel, self.why, self.skipped = parallel, why, skipped or {}


@dataclasses.dataclass
class _Found:
    """What a layout's reader found: per language its rows (empty where it has no text), the file(s) each came
    from, each row's name for messages, and why the rows do not align (None: they do). by_link: rows were aligned
    by Belebele's link, so a passage one language lacks is an empty cell (that --parallel names or drops)."""

    rows: dict[str, list[str]]
    where: dict[str, str]
    row_name: Callable[[int], str]
    mismatch: str | None = None
    by_link: bool = False


# What ends a line in a text file: Unix, Windows and old Mac line ends, nothing else (str.splitlines would also split
# at form feeds and Unicode line separators, which a JSON string may hold unescaped).
LINE_END = re.compile(r"\r\n|\r|\n")


def read_text(path: Path, what: str | None = None) -> str:
    """A UTF-8 file's text, a leading byte-order mark dropped (line ends as they are); a DataError naming the file,
    and what it was read as, if it is not UTF-8."""
    try:
        return Path(path).read_bytes().decode("utf-8-sig")
    except UnicodeDecodeError as e:
        detail = f"; {what}" if what else ""
        raise DataError(f"{path}: not UTF-8 text ({e.reason} at byte {e.start}{detail}); re-encode it as "
                        "UTF-8") from None


def read_lines(path: Path, what: str | None = None) -> list[str]:
    """A UTF-8 text file's lines, without their ends: a leading byte-order mark dropped, lines ended by "\\n",
    "\\r\\n" or "\\r", a final line end starting no further line (as str.splitlines); what every line-per-record
    reader of moejax (corpora, training data, SFT records) reads."""
    lines = LINE_END.split(read_text(path, what))
    return lines[:-1] if lines[-1] == "" else lines


def _lines(path: Path, lang: str) -> list[str]:
    """The lines of one language's file, stripped, in order (empty ones kept: `_complete` judges them)."""
    lines = [line.strip() for line in read_lines(path, f"language {lang!r}")]
    if not any(lines):
        raise DataError(f"{path}: no text (language {lang!r})")
    return lines


def jsonl_objects(path: Path, expected: str, what: str | None = None) -> list[tuple[int, dict]]:
    """(line number, object) of each non-blank line of a JSONL file: what every JSONL reader of moejax reads
    (corpora, training text, SFT records). A line that is not valid JSON, or not an object, is a DataError naming the
    file and the line; `expected` says what a line should be, `what` what the file was read as."""
    rows = []
    for i, line in enumerate(read_lines(path, what), 1):
        if line.strip():
            try:
                row = json.loads(line)
            except json.JSONDecodeError as e:
                raise DataError(f"{path}:{i}: not valid JSON ({e}); expected {expected}") from None
            if not isinstance(row, dict):
                raise DataError(f"{path}:{i}: expected {expected}")
            rows.append((i, row))
    return rows


def first_jsonl_object(path: Path) -> dict:
    """The first line of a JSONL file as an object ({} if it is none): what tells a Belebele file from texts."""
    with open(path, encoding="utf-8-sig", errors="replace") as f:
        first = next((line for line in f if line.strip()), "")
    try:
        row = json.loads(first)
    except json.JSONDecodeError:
        return {}
    return row if isinstance(row, dict) else {}


def _by_line(rows: dict[str, list[str]], where: dict[str, str], unit: str) -> _Found:
    counts = {lang: len(lines) for lang, lines in rows.items()}
    mismatch = None
    if len(set(counts.values())) > 1:
        mismatch = f"{unit} counts differ ({', '.join(f'{where[lang]}: {n}' for lang, n in counts.items())})"
    return _Found(rows, where, lambda i: f"{unit} {i + 1}", mismatch)


def _flores_files(root: Path, lang: str) -> list[Path]:
    """A language's FLORES-200 files under root, dev before devtest, by the first of its names that has any."""
    for name in file_names(lang):
        found = [root / d / f"{name}.{split}" for d in FLORES_DIRS for split in FLORES_SPLITS
                 if (root / d / f"{name}.{split}").is_file()]
        if found:
            return found
    return []


def _belebele_file(root: Path, lang: str) -> Path | None:
    for name in file_names(lang):
        for d in BELEBELE_DIRS:
            path = root / d / f"{name}.jsonl"
            if path.is_file() and "flores_passage" in first_jsonl_object(path):
                return path
    return None


def _text_file(root: Path, lang: str) -> Path | None:
    """{name}.txt or {name}.jsonl under root, by the first of the language's names that has one."""
    for name in file_names(lang):
        for suffix in (".txt", ".jsonl"):
            if (root / f"{name}{suffix}").is_file():
                return root / f"{name}{suffix}"
    return None


def _expected_name(lang: str) -> str:
    record = lookup(lang)
    return record.flores if record and record.flores else lang


def _read_directory(root: Path, langs: list[str]) -> _Found:
    """A FLORES-200 directory if any language has its files there, else a Belebele one, else {lang}.txt/.jsonl."""
    flores = {lang: _flores_files(root, lang) for lang in langs}
    if any(flores.values()):
        for lang, files in flores.items():
            if not files:
                raise DataError(f"{root}: no FLORES-200 file {_expected_name(lang)}.dev/.devtest for language "
                                f"{lang!r} (looked in {', '.join(d or '.' for d in FLORES_DIRS)})")
        return _by_line({lang: [line for f in files for line in _lines(f, lang)] for lang, files in flores.items()},
                        {lang: ", ".join(str(f) for f in files) for lang, files in flores.items()}, "line")
    belebele = {lang: _belebele_file(root, lang) for lang in langs}
    if any(belebele.values()):
        for lang, path in belebele.items():
            if path is None:
                raise DataError(f"{root}: no Belebele file {_expected_name(lang)}.jsonl (in . or data/) for "
                                f"language {lang!r}")
        return _read_belebele(belebele)
    return _read_texts(root, langs)


def _read_texts(root: Path, langs: list[str]) -> _Found:
    """{lang}.txt (a text per line) or {lang}.jsonl (a {"text": ...} object per line) for each language."""
    rows, where = {}, {}
    for lang in langs:
        path = _text_file(root, lang)
        if path is None:
            raise DataError(f"{root / (lang + '.txt')}: missing file for language {lang!r} (or {lang}.jsonl, or a "
                            f"file named by another code of the language: {', '.join(file_names(lang)[1:]) or 'none'})")
        if path.suffix == ".txt":
            rows[lang] = _lines(path, lang)
        else:
            expected = 'a JSON object with a string "text" field'
            rows[lang] = []
            for i, row in jsonl_objects(path, expected, f"language {lang!r}"):
                if not isinstance(row.get("text"), str):
                    raise DataError(f"{path}:{i}: expected {expected}")
                rows[lang].append(row["text"].strip())
        where[lang] = str(path)
    return _by_line(rows, where, "line" if all(Path(w).suffix == ".txt" for w in where.values()) else "record")


def _read_belebele(files: dict[str, Path]) -> _Found:
    """Belebele's passages, one per distinct link, aligned across languages by link (in first-seen order); a
    passage some language lacks is an empty cell of its row."""
    passages = {}
    for lang, path in files.items():
        passages[lang], first_line = {}, {}
        expected = "a Belebele question: a JSON object with \"link\" and \"flores_passage\" strings"
        for i, row in jsonl_objects(path, expected, f"a Belebele file (language {lang!r})"):
            link, passage = row.get("link"), row.get("flores_passage")
            if not isinstance(link, str) or not isinstance(passage, str):
                raise DataError(f"{path}:{i}: expected {expected}")
            if passages[lang].setdefault(link, passage.strip()) != passage.strip():
                raise DataError(f"{path}:{i}: the passage of {link} differs from line {first_line[link]}'s")
            first_line.setdefault(link, i)
        if not passages[lang]:
            raise DataError(f"{path}: no passages (language {lang!r})")
    links = list(dict.fromkeys(link for found in passages.values() for link in found))
    where = {lang: str(path) for lang, path in files.items()}
    mismatch = None
    if any(len(found) != len(links) for found in passages.values()):
        shared = set.intersection(*(set(found) for found in passages.values()))
        counts = ", ".join(f"{where[lang]}: {len(found)}" for lang, found in passages.items())
        mismatch = (f"passage counts differ ({counts}; {len(links) - len(shared)} of {len(links)} links are not in "
                    "every language)")
    rows = {lang: [found.get(link, "") for link in links] for lang, found in passages.items()}
    return _Found(rows, where, lambda i: f"passage {links[i]}", mismatch, by_link=True)


def _complete(found: _Found, skip_incomplete: bool) -> tuple[dict[str, list[str]], dict[str, int]]:
    """Aligned rows with text in every language, and per language the rows dropped for its empty cell. A row with
    an empty cell is an error naming it, or, with skip_incomplete, dropped and counted."""
    corpus, where = found.rows, found.where
    langs = list(corpus)
    rows = len(corpus[langs[0]])
    empty = {lang: [i for i, text in enumerate(corpus[lang]) if not text] for lang in langs}
    incomplete = sorted(set().union(*(set(e) for e in empty.values())))
    if incomplete and not skip_incomplete:
        first = incomplete[0]
        lang = next(lang for lang in langs if first in empty[lang])
        label, _, line = found.row_name(first).partition(" (")
        more = f"; {len(incomplete)} such rows in all" if len(incomplete) > 1 else ""
        raise DataError(f"{where[lang]}: {label} has no {lang!r} text{' (' + line if line else ''}{more}; every row "
                        "of a parallel corpus needs every language: pass --skip-incomplete to drop such rows, or "
                        "--no-parallel if the languages' texts are not translations of each other")
    dropped = set(incomplete)
    kept = [i for i in range(rows) if i not in dropped]
    if not kept:
        raise DataError(f"{', '.join(sorted(set(where.values())))}: no row has text in every language {langs}")
    return {lang: [corpus[lang][i] for i in kept] for lang in langs}, {lang: len(empty[lang]) for lang in langs}


def _decide(found: _Found, parallel: bool | None, skip_incomplete: bool) -> Corpus:
    """Parallel when asked for (aligned rows required) or, by default, when the rows align; else each language's
    non-empty texts alone."""
    if parallel is False or (parallel is None and found.mismatch):
        texts = {lang: [text for text in rows if text] for lang, rows in found.rows.items()}
        for lang, kept in texts.items():
            if not kept:
                raise DataError(f"{found.where[lang]}: no text (language {lang!r})")
        return Corpus(texts, False, found.mismatch if parallel is None else "--no-parallel")
    if found.mismatch and not found.by_link:
        raise DataError(f"the parallel corpus is not aligned: {found.mismatch}; --parallel needs the same rows in "
                        "every language (leave it out, or pass --no-parallel, to analyse each language's texts alone)")
    texts, skipped = _complete(found, skip_incomplete)
    rows = len(next(iter(texts.values())))
    unit = found.row_name(0).split(" ")[0]
    return Corpus(texts, True, f"{rows} aligned {unit}s in every language", skipped)


def read_corpus(path: str | Path | None, langs: list[str], skip_incomplete: bool = False, least: int = 2,
                parallel: bool | None = None) -> Corpus:
    """Each language's texts from a FLORES-200 or Belebele directory, a TSV/CSV/JSONL table, or a directory of
    {lang}.txt / {lang}.jsonl files; None reads the built-in sample corpus (English, Hebrew, Japanese).

    parallel: True requires aligned rows (differing line counts are an error), False reads each language alone,
    None decides by the data: parallel when every language has the same rows of an aligned source (lines, table rows,
    Belebele links). In a parallel corpus an empty cell is an error naming its row, unless skip_incomplete: then
    every row missing any language is dropped and counted (`.skipped`); otherwise empty texts are dropped.
    least: the fewest languages asked for (one language's column alone: 1).
    """
    langs = list(check_codes(langs, least))
    if path is None:
        unknown = [lang for lang in langs if _text_file(SAMPLE_DIR, lang) is None]
        if unknown:
            raise DataError(f"unknown language code(s) {unknown} for the built-in sample corpus, which has "
                            f"{', '.join(SAMPLE_LANGS)}; give --data for other languages")
        return _decide(_read_texts(SAMPLE_DIR, langs), parallel, skip_incomplete)
    path = Path(path)
    if path.is_file():
        return _decide(_read_table(path, langs), parallel, skip_incomplete)
    if not path.is_dir():
        raise DataError(f"{path}: no such corpus file or directory")
    return _decide(_read_directory(path, langs), parallel, skip_incomplete)


def _read_table(path: Path, langs: list[str]) -> _Found:
    """A JSONL file (an object per line), or a TSV (.tsv, .txt) or CSV (.csv) file as spreadsheets and Python's csv
    module write them: a header row of language codes, quoted cells (with tabs, commas, newlines inside), CRLF
    line ends, an optional UTF-8 BOM. A language's column is the first of its names (file_names) the table has."""
    rows, lines = [], []
    if path.suffix == ".jsonl":
        for i, row in jsonl_objects(path, "a JSON object with a key per language", "a JSONL corpus"):
            rows.append({k: v if isinstance(v, str) else "" for k, v in row.items()})
            lines.append(i)
        row_name = lambda i: f"row {i + 1} (line {lines[i]})"  # noqa: E731
    elif path.suffix in (".tsv", ".txt", ".csv"):
        reader = csv.reader(io.StringIO(read_text(path, "a parallel corpus table"), newline=""),
                            delimiter="," if path.suffix == ".csv" else "\t")
        try:
            header = [h.strip() for h in next(reader, [])]
            for values in reader:
                if any(v.strip() for v in values):
                    rows.append(dict(zip(header, values, strict=False)))
                    lines.append(reader.line_num)
        except csv.Error as e:
            raise DataError(f"{path}: line {reader.line_num}: not a valid table ({e})") from None
        row_name = lambda i: f"row {i + 2} (line {lines[i]})"  # noqa: E731
    else:
        raise DataError(f"{path}: expected a .tsv or .csv file (a header row of language codes) or a .jsonl file")
    if not rows:
        raise DataError(f"{path}: no rows")
    columns = set().union(*rows) if path.suffix == ".jsonl" else set(header)
    column = {lang: next((name for name in file_names(lang) if name in columns), None) for lang in langs}
    missing = [lang for lang, name in column.items() if name is None]
    if missing:
        raise DataError(f"{path}: no column for language(s) {missing}; columns: {sorted(columns)}")
    corpus = {lang: [(row.get(column[lang]) or "").strip() for row in rows] for lang in langs}
    return _Found(corpus, dict.fromkeys(langs, str(path)), row_name)


def words_in(text: str, lang: str) -> float:
    """A text's size in words: whitespace-separated words, or in a script without spaces between words its
    characters over CHARS_PER_WORD."""
    record = lookup(lang)
    if record is not None and record.script in UNSPACED_SCRIPTS:
        return len("".join(text.split())) / CHARS_PER_WORD
    return len(text.split())


def _joiner(lang: str) -> str:
    record = lookup(lang)
    return "" if record is not None and record.script in JOINED_SCRIPTS else " "


def _pieces(text: str, words: int, lang: str) -> list[str]:
    """A text of more than `words` words cut into pieces of `words` (at spaces; by characters in a script without
    them); a shorter one whole."""
    if words_in(text, lang) <= words:
        return [text]
    record = lookup(lang)
    if record is not None and record.script in UNSPACED_SCRIPTS:
        size = words * CHARS_PER_WORD
        return [text[i:i + size] for i in range(0, len(text), size)]
    split = text.split()
    return [" ".join(split[i:i + words]) for i in range(0, len(split), words)]


def _greedy(units: list[str], words: int, count) -> list[tuple[int, int]]:
    """[start, end) spans of consecutive units, each closed once its words reach `words` (the last may be short)."""
    bounds, start, total = [], 0, 0.0
    for i, unit in enumerate(units):
        total += count(unit)
        if total >= words:
            bounds.append((start, i + 1))
            start, total = i + 1, 0.0
    if start < len(units):
        bounds.append((start, len(units)))
    return bounds


def chunk(corpus: dict[str, list[str]], words: int = 300, mode: str = "paragraph",
          boundary_lang: str | None = None) -> dict[str, list[str]]:
    """Chunks per language: single texts ("sentence"), or consecutive texts joined until a chunk reaches ~`words`
    words ("paragraph", words as `words_in` counts them).

    A parallel corpus (a Corpus that says so, or a plain dict of equally long lists) gets the same boundaries in
    every language, from the boundary language (English if present, else the first), so chunk i stays aligned. Any
    other corpus is chunked language by language, each by its own words, a text longer than `words` cut first.
    """
    if mode == "sentence":
        return {lang: list(lines) for lang, lines in corpus.items()}
    if mode != "paragraph":
        raise DataError(f"chunk mode {mode!r} is not 'paragraph' or 'sentence'")
    parallel = corpus.parallel if isinstance(corpus, Corpus) else len({len(v) for v in corpus.values()}) == 1
    if not parallel:
        out = {}
        for lang, texts in corpus.items():
            units = [piece for text in texts for piece in _pieces(text, words, lang)]
            out[lang] = [_joiner(lang).join(units[a:b])
                         for a, b in _greedy(units, words, lambda u, lang=lang: words_in(u, lang))]
        return out
    ref = boundary_lang or next((lang for lang in corpus if identity(lang) == "eng_Latn"), next(iter(corpus)))
    bounds = _greedy(corpus[ref], words, lambda u: words_in(u, ref))
    return {lang: [_joiner(lang).join(lines[a:b]) for a, b in bounds] for lang, lines in corpus.items()}
