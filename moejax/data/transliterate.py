"""Deterministic transliteration into the Latin script: the same text in another script, for the script control of
experiments.controlled_imbalance (docs/studies.md).

A table maps each character of one script to ASCII; characters it does not name (digits, Latin letters, spaces,
common punctuation) are kept as they are. Only Hebrew has a table so far.

Hebrew (moejax's own consonantal scheme, written for this purpose): each letter becomes one fixed ASCII string, a
final form the same as its base letter; the vowel points, dots and cantillation marks (U+0591-U+05C7 apart from the
punctuation below) are dropped, since unpointed text, the usual kind, has none; maqaf, paseq, sof pasuq, geresh and
gershayim become their ASCII look-alikes. Letters that sound alike keep apart where one ASCII letter allows it (kaf
k, qof q; tet t, tav th; samekh s, shin sh; alef ', ayin `). It is not reversible in general (e.g. `sh` is shin, or
samekh followed by he), and need not be: the control asks whether the same text written with the majority
language's characters routes differently.
"""

from __future__ import annotations

import unicodedata

HEBREW_LETTERS = {
    "א": "'", "ב": "b", "ג": "g", "ד": "d", "ה": "h", "ו": "w", "ז": "z", "ח": "kh", "ט": "t", "י": "y",
    "כ": "k", "ך": "k", "ל": "l", "מ": "m", "ם": "m", "נ": "n", "ן": "n", "ס": "s", "ע": "`", "פ": "p",
    "ף": "p", "צ": "ts", "ץ": "ts", "ק": "q", "ר": "r", "ש": "sh", "ת": "th",
    "װ": "ww", "ױ": "wy", "ײ": "yy",  # the Yiddish ligatures: their two letters
}
HEBREW_PUNCTUATION = {"\u05be": "-", "\u05c0": "|", "\u05c3": ":", "\u05f3": "'", "\u05f4": '"'}
# Points, dots and cantillation: every character of U+0591-U+05C7 that is neither a letter nor punctuation above.
HEBREW_MARKS = {chr(c): "" for c in range(0x0591, 0x05C8) if chr(c) not in HEBREW_PUNCTUATION}

TABLES = {"Hebr": {**HEBREW_MARKS, **HEBREW_PUNCTUATION, **HEBREW_LETTERS}}
# The letters that tell a text's script (a table's letters, not its marks or punctuation).
SCRIPT_LETTERS = {"Hebr": frozenset(HEBREW_LETTERS)}


def transliterate(text: str, script: str) -> str:
    """`text` with every character of `script`'s table replaced (presentation forms first decomposed, NFKD, so that
    e.g. U+FB2A shin with shin dot is shin); other characters unchanged."""
    table = str.maketrans(TABLES[script])
    if any("\ufb1d" <= ch <= "\ufb4f" for ch in text):
        text = "".join(unicodedata.normalize("NFKD", ch) if "\ufb1d" <= ch <= "\ufb4f" else ch for ch in text)
    return text.translate(table)


def dominant_script(texts: list[str]) -> str | None:
    """The script with a table whose letters make up most of the letters of `texts`, or None."""
    letters = [ch for text in texts for ch in text if ch.isalpha()]
    for script, own in SCRIPT_LETTERS.items():
        if letters and sum(ch in own for ch in letters) > len(letters) / 2:
            return script
    return None
