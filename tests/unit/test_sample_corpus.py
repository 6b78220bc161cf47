"""The built-in English / Hebrew / Japanese sample corpus: present, well formed and line-aligned."""

from __future__ import annotations

from pathlib import Path

import pytest

import moejax

SAMPLE_DIR = Path(moejax.__file__).parent / "data" / "sample"
LANGS = ("en", "he", "ja")
N_LINES = 120


def _is_hebrew(ch: str) -> bool:
    return "\u0590" <= ch <= "\u05ff"


def _is_japanese(ch: str) -> bool:
    return "\u3040" <= ch <= "\u30ff" or "\u4e00" <= ch <= "\u9fff"


def _read_lines(lang: str) -> list[str]:
    return (SAMPLE_DIR / f"{lang}.txt").read_text(encoding="utf-8").split("\n")[:-1]


@pytest.fixture(scope="module")
def corpus() -> dict[str, list[str]]:
    return {lang: _read_lines(lang) for lang in LANGS}


@pytest.mark.parametrize("lang", LANGS)
def test_file_exists_and_is_clean_utf8(lang):
    path = SAMPLE_DIR / f"{lang}.txt"
    assert path.is_file(), f"missing {path}"
    raw = path.read_bytes()
    assert not raw.startswith(b"\xef\xbb\xbf"), "file starts with a BOM"
    assert b"\r" not in raw, "file has non-Unix newlines"
    assert raw.endswith(b"\n"), "file does not end with a newline"
    raw.decode("utf-8")


@pytest.mark.parametrize("lang", LANGS)
def test_line_count_and_whitespace(lang):
    lines = _read_lines(lang)
    assert len(lines) == N_LINES
    for i, line in enumerate(lines, start=1):
        assert line, f"{lang}:{i} is empty"
        assert line == line.strip(), f"{lang}:{i} has leading or trailing whitespace"
    assert len(set(lines)) == N_LINES, f"{lang} has duplicate lines"


def test_english_is_ascii(corpus):
    for i, line in enumerate(corpus["en"], start=1):
        assert line.isascii(), f"en:{i} has non-ASCII characters: {line!r}"
        assert any(ch.isalpha() for ch in line), f"en:{i} has no letters"


def test_hebrew_script(corpus):
    for i, line in enumerate(corpus["he"], start=1):
        letters = [ch for ch in line if ch.isalpha()]
        hebrew = sum(_is_hebrew(ch) for ch in letters)
        assert hebrew >= 3, f"he:{i} has fewer than 3 Hebrew characters: {line!r}"
        assert hebrew > len(letters) / 2, f"he:{i} is not mostly Hebrew letters: {line!r}"


def test_japanese_script(corpus):
    for i, line in enumerate(corpus["ja"], start=1):
        assert any(_is_japanese(ch) for ch in line), f"ja:{i} has no kana or kanji: {line!r}"
        assert line[-1] in "。！？", f"ja:{i} does not end with 。, ！ or ？: {line!r}"


@pytest.mark.parametrize("lang", ("he", "ja"))
def test_length_ratio_is_sane(corpus, lang):
    """Catches misalignment: a translation far shorter or longer than its English line."""
    for i, (en, other) in enumerate(zip(corpus["en"], corpus[lang], strict=True), start=1):
        ratio = len(other) / len(en)
        assert 0.2 <= ratio <= 3.0, f"line {i}: len({lang})/len(en) = {ratio:.2f}\n  en: {en}\n  {lang}: {other}"
