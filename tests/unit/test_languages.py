"""moejax.data.languages: the code table (every ISO 639-1 code, every FLORES-200 code, their ISO 639-3 codes), what
each code resolves to, codes passed through as written, and the codes --langs refuses.

The reference for the counts and spot checks is the published lists: ISO 639-1 has 184 codes (sh, deprecated, still
among them in ISO 639-3's Part1 column); FLORES-200's README lists 204 language-script codes.
"""

from __future__ import annotations

import re

import pytest

from moejax.data import languages as L
from moejax.errors import SettingsError


def iso1_codes() -> list[str]:
    return [line.split(" ")[0] for line in L.ISO_639_1.strip().splitlines()]


def test_counts_and_shapes():
    assert len(L.FLORES) == 204
    assert len(set(iso1_codes())) == len(iso1_codes()) == 184
    assert all(re.fullmatch(r"[a-z]{3}_[A-Z][a-z]{3}", code) for code in L.FLORES)
    assert all(re.fullmatch(r"[a-z]{2}", code) for code in iso1_codes())
    for code in ("yor_Latn", "bam_Latn", "asm_Beng", "arb_Latn", "arb_Arab", "zho_Hans", "zho_Hant", "sat_Olck",
                 "min_Arab", "taq_Tfng", "kas_Deva", "knc_Arab", "ace_Arab", "bjn_Arab", "yue_Hant", "ory_Orya"):
        assert code in L.FLORES, code


def test_every_code_resolves_and_round_trips():
    for code, record in L.FLORES.items():
        assert L.lookup(code) is record
        assert (record.flores, record.iso3, record.script) == (code, code[:3], code[4:])
        assert L.lookup(record.display) is record, code  # the display code names the same language and script
        assert L.lookup(record.iso3).iso3 == record.iso3  # the bare ISO 639-3 code: the same language
        assert code not in record.others and all(other[:3] == code[:3] for other in record.others)
    for code in iso1_codes():
        record = L.lookup(code)
        assert record is not None and record.iso1 in (code, "nb"), code  # no (Norwegian) means Bokmål, nb


@pytest.mark.parametrize("code, flores, display", [
    ("yo", "yor_Latn", "yo"), ("yor", "yor_Latn", "yo"), ("yor_Latn", "yor_Latn", "yo"), ("YO-latn", "yor_Latn", "yo"),
    ("bm", "bam_Latn", "bm"), ("bam", "bam_Latn", "bm"), ("asm_Beng", "asm_Beng", "as"), ("as", "asm_Beng", "as"),
    ("arb_Latn", "arb_Latn", "ar-Latn"), ("ar-Latn", "arb_Latn", "ar-Latn"),
    ("ar", "arb_Arab", "ar"), ("ara", "arb_Arab", "ar"), ("arb", "arb_Arab", "ar"),
    ("zh", "zho_Hans", "zh"), ("zho", "zho_Hans", "zh"), ("zh-Hant", "zho_Hant", "zh-Hant"),
    ("ZHO_HANT", "zho_Hant", "zh-Hant"), ("yue_Hant", "yue_Hant", "yue"),
    ("fa", "pes_Arab", "fa"), ("fas", "pes_Arab", "fa"), ("prs_Arab", "prs_Arab", "prs"),
    ("ms", "zsm_Latn", "ms"), ("sw", "swh_Latn", "sw"), ("lv", "lvs_Latn", "lv"), ("et", "est_Latn", "et"),
    ("no", "nob_Latn", "nb"), ("nb", "nob_Latn", "nb"), ("nn", "nno_Latn", "nn"),
    ("ks", "kas_Arab", "ks"), ("kas_Deva", "kas_Deva", "ks-Deva"), ("kr", "knc_Latn", "kr"),
    ("ace", "ace_Latn", "ace"), ("ace_Arab", "ace_Arab", "ace-Arab"), ("sat_Beng", "sat_Olck", "sat"),
    ("en", "eng_Latn", "en"), ("eng", "eng_Latn", "en"), ("he", "heb_Hebr", "he"), ("ja", "jpn_Jpan", "ja"),
])
def test_codes_resolve(code, flores, display):
    record = L.lookup(code)
    assert (record.flores, record.display, L.display(code)) == (flores, display, display)


def test_ambiguous_codes_name_the_other_scripts():
    """ar and zh mean one script by default; the record names the others, and their FLORES-200 codes pick them."""
    assert L.lookup("ar").others == ("arb_Latn",)
    assert L.lookup("zh").others == ("zho_Hant",)
    assert L.lookup("zh-Hant").others == ("zho_Hans",)
    assert L.lookup("en").others == ()


def test_iso_codes_outside_flores():
    record = L.lookup("ab")
    assert (record.flores, record.iso3, record.name, record.script) == (None, "abk", "Abkhazian", None)
    assert L.lookup("abk") is record and L.lookup("sh").iso3 == "hbs"


def test_codes_not_in_the_table_pass_through():
    for code in ("xx", "hin_Latn", "klingon", "en_copy", "my-corpus"):
        assert L.lookup(code) is None
        assert L.display(code) == code and L.identity(code) == code and L.file_names(code) == (code,)
    assert L.check_codes(["xx", "en"], least=2) == ("xx", "en")


def test_file_names_try_the_code_as_written_first():
    assert L.file_names("yo") == ("yo", "yor_Latn", "yor")
    assert L.file_names("eng_Latn") == ("eng_Latn", "en", "eng")
    assert L.file_names("arb_Latn") == ("arb_Latn", "ar-Latn", "ar", "arb")


@pytest.mark.parametrize("codes, message", [
    ([""], "'': a language code is one word"),
    (["en", "my lang"], "'my lang': a language code is one word"),
    (["en", "he\t"], "'he\\t'"),
    (["en", "../he"], "'../he'"),
    (["en", "a\\b"], "path separators"),
    (["en", ".."], "'..'"),
    (["en,he"], "commas"),
    (["en", "eng_Latn"], "en and eng_Latn both name eng_Latn"),
    (["he", "he"], "he is given twice"),
    (["yo"], "needs at least 2 different languages, got yo"),
])
def test_refused_codes(codes, message):
    with pytest.raises(SettingsError, match=re.escape(message)) as info:
        L.check_codes(codes, least=2)
    assert "\n" not in str(info.value) and str(info.value).startswith("--langs")


def test_table_builder_refuses_a_code_naming_two_languages(monkeypatch):
    """The table is checked as it is built: a row that makes one code name two records fails at import."""
    monkeypatch.setattr(L, "ISO_639_1", L.ISO_639_1 + "qq eng Not English yor_Latn\n")
    with pytest.raises(AssertionError, match="'qq' names both .*English.* and .*Yoruba"):
        L._build()
    monkeypatch.setattr(L, "ISO_639_1", L.ISO_639_1.replace("qq eng Not English yor_Latn\n", ""))
    monkeypatch.setattr(L, "FLORES_ALIASES", {"yor_Latn": "bam_Latn"})
    with pytest.raises(AssertionError, match="'yor_Latn' names both"):
        L._build()
