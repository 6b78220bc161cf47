"""Parallel corpora: readers for FLORES-200, TED-style TSV/JSONL and aligned text files; chunking.

Every reader returns {lang: [sentence, ...]} with the same number of aligned sentences per language,
or raises DataError naming the file, the language and what is wrong.
"""

from __future__ import annotations

import csv
import json
from pathlib import Path

from moejax.errors import DataError

SAMPLE_DIR = Path(__file__).parent / "sample"

# ISO 639-1 code -> FLORES-200 code, for the languages the published analyses use and their neighbours.
FLORES_CODES = {
    "en": "eng_Latn", "he": "heb_Hebr", "ja": "jpn_Jpan", "ar": "arb_Arab", "de": "deu_Latn", "fr": "fra_Latn",
    "es": "spa_Latn", "ru": "rus_Cyrl", "zh": "zho_Hans", "ko": "kor_Hang", "hi": "hin_Deva", "tr": "tur_Latn",
    "yi": "ydd_Hebr", "fa": "pes_Arab", "it": "ita_Latn", "pt": "por_Latn", "nl": "nld_Latn", "pl": "pol_Latn",
}


def check_langs(langs: list[str]) -> list[str]:
    unknown = [lang for lang in langs if lang not in FLORES_CODES]
    if unknown:
        raise DataError(f"unknown language code(s) {unknown}; known: {sorted(FLORES_CODES)}")
    if len(set(langs)) != len(langs) or len(langs) < 2:
        raise DataError(f"--langs needs at least two different languages, got {langs}")
    return langs


def _lines(path: Path, lang: str) -> list[str]:
    if not path.is_file():
        raise DataError(f"{path}: missing file for language {lang!r}")
    lines = [line.strip() for line in path.read_text(encoding="utf-8").splitlines()]
    empty = [i + 1 for i, line in enumerate(lines) if not line]
    if empty:
        raise DataError(f"{path}: empty line(s) {empty[:5]} (language {lang!r}); every line must be a sentence")
    if not lines:
        raise DataError(f"{path}: no text (language {lang!r})")
    return lines


def _aligned(corpus: dict[str, list[str]], where: dict[str, str]) -> dict[str, list[str]]:
    counts = {lang: len(lines) for lang, lines in corpus.items()}
    if len(set(counts.values())) != 1:
        detail = ", ".join(f"{where[lang]}: {n}" for lang, n in counts.items())
        raise DataError(f"the parallel corpus is not aligned: line counts differ ({detail})")
    return corpus


def read_corpus(path: str | Path | None, langs: list[str]) -> dict[str, list[str]]:
    """Aligned sentences per language from a FLORES-200 directory, a TSV/JSONL file, or {lang}.txt files.

    None reads the built-in sample corpus (English, Hebrew, Japanese).
    """
    check_langs(langs)
    path = SAMPLE_DIR if path is None else Path(path)
    if path.is_file():
        return _read_table(path, langs)
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
        return _aligned(corpus, where)
    files = {lang: path / f"{lang}.txt" for lang in langs}
    return _aligned({lang: _lines(f, lang) for lang, f in files.items()}, {k: str(v) for k, v in files.items()})


def _read_table(path: Path, langs: list[str]) -> dict[str, list[str]]:
    rows: list[dict]
    if path.suffix == ".jsonl":
        rows = []
        for i, line in enumerate(path.read_text(encoding="utf-8").splitlines(), 1):
            if line.strip():
                try:
                    rows.append(json.loads(line))
                except json.JSONDecodeError as e:
                    raise DataError(f"{path}:{i}: not a JSON object ({e})") from None
    elif path.suffix in (".tsv", ".txt"):
        with open(path, encoding="utf-8", newline="") as f:
            rows = list(csv.DictReader(f, delimiter="\t", quoting=csv.QUOTE_NONE))
    else:
        raise DataError(f"{path}: expected a .tsv (header row of language codes) or .jsonl file")
    if not rows:
        raise DataError(f"{path}: no rows")
    missing = [lang for lang in langs if lang not in rows[0]]
    if missing:
        raise DataError(f"{path}: no column for language(s) {missing}; columns: {sorted(rows[0])}")
    corpus = {lang: [] for lang in langs}
    for i, row in enumerate(rows, 2 if path.suffix == ".tsv" else 1):
        for lang in langs:
            text = (row.get(lang) or "").strip()
            if not text:
                raise DataError(f"{path}: row {i} has no {lang!r} text; a parallel row needs every language")
            corpus[lang].append(text)
    return corpus


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
