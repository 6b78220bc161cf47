"""Parallel corpora: readers for FLORES-200, TED-style TSV/JSONL and aligned text files; chunking.

Every reader returns {lang: [sentence, ...]} with the same number of aligned sentences per language,
or raises DataError naming the file, the language and what is wrong.
"""

from __future__ import annotations

import csv
import io
import json
import re
from pathlib import Path

from moejax.errors import DataError

SAMPLE_DIR = Path(__file__).parent / "sample"

# ISO 639-1 code -> FLORES-200 code, for the languages the published analyses use and their neighbours.
FLORES_CODES = {
    "en": "eng_Latn", "he": "heb_Hebr", "ja": "jpn_Jpan", "ar": "arb_Arab", "de": "deu_Latn", "fr": "fra_Latn",
    "es": "spa_Latn", "ru": "rus_Cyrl", "zh": "zho_Hans", "ko": "kor_Hang", "hi": "hin_Deva", "tr": "tur_Latn",
    "yi": "ydd_Hebr", "fa": "pes_Arab", "it": "ita_Latn", "pt": "por_Latn", "nl": "nld_Latn", "pl": "pol_Latn",
}


def check_langs(langs: list[str], least: int = 2) -> list[str]:
    unknown = [lang for lang in langs if lang not in FLORES_CODES]
    if unknown:
        raise DataError(f"unknown language code(s) {unknown}; known: {sorted(FLORES_CODES)}")
    if len(set(langs)) != len(langs) or len(langs) < least:
        raise DataError(f"--langs needs at least two different languages, got {langs}")
    return langs


class ParallelCorpus(dict):
    """{lang: [aligned sentence, ...]}; `skipped` counts, per language, the rows dropped because that language's
    cell was empty (read_corpus(skip_incomplete=True))."""

    def __init__(self, texts: dict[str, list[str]], skipped: dict[str, int] | None = None):
        super().__init__(texts)
        self.skipped = skipped or {}


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
    if not path.is_file():
        raise DataError(f"{path}: missing file for language {lang!r}")
    lines = [line.strip() for line in read_lines(path, f"language {lang!r}")]
    if not any(lines):
        raise DataError(f"{path}: no text (language {lang!r})")
    return lines


def _aligned(corpus: dict[str, list[str]], where: dict[str, str]) -> dict[str, list[str]]:
    counts = {lang: len(lines) for lang, lines in corpus.items()}
    if len(set(counts.values())) != 1:
        detail = ", ".join(f"{where[lang]}: {n}" for lang, n in counts.items())
        raise DataError(f"the parallel corpus is not aligned: line counts differ ({detail})")
    return corpus


def _complete(corpus: dict[str, list[str]], where: dict[str, str], row_name, skip_incomplete: bool
              ) -> ParallelCorpus:
    """Aligned rows with text in every language. A row with an empty cell is an error naming it, or, with
    skip_incomplete, dropped and counted per language whose cell was empty."""
    langs = list(corpus)
    rows = len(corpus[langs[0]])
    empty = {lang: [i for i, text in enumerate(corpus[lang]) if not text] for lang in langs}
    incomplete = sorted(set().union(*(set(e) for e in empty.values())))
    if incomplete and not skip_incomplete:
        first = incomplete[0]
        lang = next(lang for lang in langs if first in empty[lang])
        label, _, line = row_name(first).partition(" (")
        more = f"; {len(incomplete)} such rows in all" if len(incomplete) > 1 else ""
        raise DataError(f"{where[lang]}: {label} has no {lang!r} text{' (' + line if line else ''}{more}; every row "
                        "of a parallel corpus needs every language, or pass --skip-incomplete to drop such rows")
    kept = [i for i in range(rows) if i not in set(incomplete)]
    if not kept:
        raise DataError(f"{', '.join(sorted(set(where.values())))}: no row has text in every language {langs}")
    return ParallelCorpus({lang: [corpus[lang][i] for i in kept] for lang in langs},
                          {lang: len(empty[lang]) for lang in langs})


def read_corpus(path: str | Path | None, langs: list[str], skip_incomplete: bool = False,
                least: int = 2) -> ParallelCorpus:
    """Aligned sentences per language from a FLORES-200 directory, a TSV/CSV/JSONL file, or {lang}.txt files.

    None reads the built-in sample corpus (English, Hebrew, Japanese). An empty cell (or line) is an error naming
    its row, unless skip_incomplete: then every row missing any language is dropped and counted (`.skipped`).
    least: the fewest languages asked for (one language's column alone: 1).
    """
    check_langs(langs, least)
    path = SAMPLE_DIR if path is None else Path(path)
    if path.is_file():
        return _read_table(path, langs, skip_incomplete)
    if not path.is_dir():
        raise DataError(f"{path}: no such corpus file or directory")
    flores = {lang: sorted(path.glob(f"{FLORES_CODES[lang]}.dev*")) + sorted(path.glob(f"*/{FLORES_CODES[lang]}.dev*"))
              for lang in langs}
    if any(flores.values()):
        corpus, where = {}, {}
        for lang, files in flores.items():
            if not files:
                raise DataError(f"{path}: no FLORES-200 file {FLORES_CODES[lang]}.dev/.devtest for language {lang!r}")
            corpus[lang] = [line for f in files for line in _lines(f, lang)]
            where[lang] = ", ".join(str(f) for f in files)
    else:
        files = {lang: path / f"{lang}.txt" for lang in langs}
        corpus, where = {lang: _lines(f, lang) for lang, f in files.items()}, {k: str(v) for k, v in files.items()}
    return _complete(_aligned(corpus, where), where, lambda i: f"line {i + 1}", skip_incomplete)


def _read_table(path: Path, langs: list[str], skip_incomplete: bool) -> ParallelCorpus:
    """A JSONL file (an object per line), or a TSV (.tsv, .txt) or CSV (.csv) file as spreadsheets and Python's csv
    module write them: a header row of language codes, quoted cells (with tabs, commas, newlines inside), CRLF
    line ends, an optional UTF-8 BOM."""
    rows, lines = [], []
    if path.suffix == ".jsonl":
        for i, line in enumerate(read_lines(path, "a JSONL corpus"), 1):
            if line.strip():
                try:
                    row = json.loads(line)
                except json.JSONDecodeError as e:
                    raise DataError(f"{path}:{i}: not a JSON object ({e})") from None
                if not isinstance(row, dict):
                    raise DataError(f"{path}:{i}: expected a JSON object with a key per language")
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
    missing = [lang for lang in langs if lang not in columns]
    if missing:
        raise DataError(f"{path}: no column for language(s) {missing}; columns: {sorted(columns)}")
    corpus = {lang: [(row.get(lang) or "").strip() for row in rows] for lang in langs}
    return _complete(corpus, dict.fromkeys(langs, str(path)), row_name, skip_incomplete)


def chunk(corpus: dict[str, list[str]], words: int = 300, mode: str = "paragraph",
          boundary_lang: str | None = None) -> dict[str, list[str]]:
    """Aligned chunks per language: single sentences ("sentence"), or consecutive sentences joined until
    the boundary language's chunk reaches ~`words` whitespace words ("paragraph"; the same boundaries
    for every language, from English if present since Japanese has no spaces)."""
    if mode == "sentence":
        return {lang: list(lines) for lang, lines in corpus.items()}
    if mode != "paragraph":
        raise DataError(f"chunk mode {mode!r} is not 'paragraph' or 'sentence'")
    ref = boundary_lang or ("en" if "en" in corpus else next(iter(corpus)))
    bounds, start, count = [], 0, 0
    for i, sentence in enumerate(corpus[ref]):
        count += len(sentence.split())
        if count >= words:
            bounds.append((start, i + 1))
            start, count = i + 1, 0
    if start < len(corpus[ref]):
        bounds.append((start, len(corpus[ref])))
    return {lang: [" ".join(lines[a:b]) if lang != "ja" else "".join(lines[a:b]) for a, b in bounds]
            for lang, lines in corpus.items()}
