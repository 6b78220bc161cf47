"""Language codes: every ISO 639-1 code, the ISO 639-3 codes of those languages and of FLORES-200's, and every
FLORES-200 code, each resolved to one `Language` record (docs/analysis.md, language codes).

`lookup("yo")`, `lookup("yor")`, `lookup("yor_Latn")` and `lookup("yo-Latn")` give the same record; case and "-"
versus "_" do not matter. A code that is not in the table resolves to nothing: the commands then use it as the user
wrote it (a file name or a column), never refuse it. An ISO code of a language FLORES-200 has in several scripts
means its default script (DEFAULT_SCRIPT: ar is arb_Arab, zh is zho_Hans); the FLORES-200 code, or the display code
("ar-Latn", "zh-Hant"), picks another.
"""

from __future__ import annotations

import dataclasses
import re

from moejax.errors import SettingsError

# ISO 639-1, all 184 codes: code, ISO 639-3 (639-2/T) code, English name, the FLORES-200 code the code means ("-":
# FLORES-200 has no text in it). Where the ISO code names a macrolanguage (ar, fa, zh, ms, ...), the FLORES-200
# code is its standard variety's: Modern Standard Arabic, Western Persian, Standard Malay, ...
ISO_639_1 = """
aa aar Afar -
ab abk Abkhazian -
ae ave Avestan -
af afr Afrikaans afr_Latn
ak aka Akan aka_Latn
am amh Amharic amh_Ethi
an arg Aragonese -
ar ara Arabic arb_Arab
as asm Assamese asm_Beng
av ava Avaric -
ay aym Aymara ayr_Latn
az aze Azerbaijani azj_Latn
ba bak Bashkir bak_Cyrl
be bel Belarusian bel_Cyrl
bg bul Bulgarian bul_Cyrl
bi bis Bislama -
bm bam Bambara bam_Latn
bn ben Bengali ben_Beng
bo bod Tibetan bod_Tibt
br bre Breton -
bs bos Bosnian bos_Latn
ca cat Catalan cat_Latn
ce che Chechen -
ch cha Chamorro -
co cos Corsican -
cr cre Cree -
cs ces Czech ces_Latn
cu chu Church Slavonic -
cv chv Chuvash -
cy cym Welsh cym_Latn
da dan Danish dan_Latn
de deu German deu_Latn
dv div Divehi -
dz dzo Dzongkha dzo_Tibt
ee ewe Ewe ewe_Latn
el ell Greek ell_Grek
en eng English eng_Latn
eo epo Esperanto epo_Latn
es spa Spanish spa_Latn
et est Estonian est_Latn
eu eus Basque eus_Latn
fa fas Persian pes_Arab
ff ful Fulah fuv_Latn
fi fin Finnish fin_Latn
fj fij Fijian fij_Latn
fo fao Faroese fao_Latn
fr fra French fra_Latn
fy fry Western Frisian -
ga gle Irish gle_Latn
gd gla Scottish Gaelic gla_Latn
gl glg Galician glg_Latn
gn grn Guarani grn_Latn
gu guj Gujarati guj_Gujr
gv glv Manx -
ha hau Hausa hau_Latn
he heb Hebrew heb_Hebr
hi hin Hindi hin_Deva
ho hmo Hiri Motu -
hr hrv Croatian hrv_Latn
ht hat Haitian Creole hat_Latn
hu hun Hungarian hun_Latn
hy hye Armenian hye_Armn
hz her Herero -
ia ina Interlingua -
id ind Indonesian ind_Latn
ie ile Interlingue -
ig ibo Igbo ibo_Latn
ii iii Sichuan Yi -
ik ipk Inupiaq -
io ido Ido -
is isl Icelandic isl_Latn
it ita Italian ita_Latn
iu iku Inuktitut -
ja jpn Japanese jpn_Jpan
jv jav Javanese jav_Latn
ka kat Georgian kat_Geor
kg kon Kongo kon_Latn
ki kik Kikuyu kik_Latn
kj kua Kuanyama -
kk kaz Kazakh kaz_Cyrl
kl kal Kalaallisut -
km khm Khmer khm_Khmr
kn kan Kannada kan_Knda
ko kor Korean kor_Hang
kr kau Kanuri knc_Latn
ks kas Kashmiri kas_Arab
ku kur Kurdish kmr_Latn
kv kom Komi -
kw cor Cornish -
ky kir Kyrgyz kir_Cyrl
la lat Latin -
lb ltz Luxembourgish ltz_Latn
lg lug Ganda lug_Latn
li lim Limburgish lim_Latn
ln lin Lingala lin_Latn
lo lao Lao lao_Laoo
lt lit Lithuanian lit_Latn
lu lub Luba-Katanga -
lv lav Latvian lvs_Latn
mg mlg Malagasy plt_Latn
mh mah Marshallese -
mi mri Maori mri_Latn
mk mkd Macedonian mkd_Cyrl
ml mal Malayalam mal_Mlym
mn mon Mongolian khk_Cyrl
mr mar Marathi mar_Deva
ms msa Malay zsm_Latn
mt mlt Maltese mlt_Latn
my mya Burmese mya_Mymr
na nau Nauru -
nb nob Norwegian Bokmål nob_Latn
nd nde North Ndebele -
ne nep Nepali npi_Deva
ng ndo Ndonga -
nl nld Dutch nld_Latn
nn nno Norwegian Nynorsk nno_Latn
no nor Norwegian nob_Latn
nr nbl South Ndebele -
nv nav Navajo -
ny nya Chichewa nya_Latn
oc oci Occitan oci_Latn
oj oji Ojibwa -
om orm Oromo gaz_Latn
or ori Odia ory_Orya
os oss Ossetian -
pa pan Punjabi pan_Guru
pi pli Pali -
pl pol Polish pol_Latn
ps pus Pashto pbt_Arab
pt por Portuguese por_Latn
qu que Quechua quy_Latn
rm roh Romansh -
rn run Rundi run_Latn
ro ron Romanian ron_Latn
ru rus Russian rus_Cyrl
rw kin Kinyarwanda kin_Latn
sa san Sanskrit san_Deva
sc srd Sardinian srd_Latn
sd snd Sindhi snd_Arab
se sme Northern Sami -
sg sag Sango sag_Latn
sh hbs Serbo-Croatian -
si sin Sinhala sin_Sinh
sk slk Slovak slk_Latn
sl slv Slovenian slv_Latn
sm smo Samoan smo_Latn
sn sna Shona sna_Latn
so som Somali som_Latn
sq sqi Albanian als_Latn
sr srp Serbian srp_Cyrl
ss ssw Swati ssw_Latn
st sot Southern Sotho sot_Latn
su sun Sundanese sun_Latn
sv swe Swedish swe_Latn
sw swa Swahili swh_Latn
ta tam Tamil tam_Taml
te tel Telugu tel_Telu
tg tgk Tajik tgk_Cyrl
th tha Thai tha_Thai
ti tir Tigrinya tir_Ethi
tk tuk Turkmen tuk_Latn
tl tgl Tagalog tgl_Latn
tn tsn Tswana tsn_Latn
to ton Tongan -
tr tur Turkish tur_Latn
ts tso Tsonga tso_Latn
tt tat Tatar tat_Cyrl
tw twi Twi twi_Latn
ty tah Tahitian -
ug uig Uyghur uig_Arab
uk ukr Ukrainian ukr_Cyrl
ur urd Urdu urd_Arab
uz uzb Uzbek uzn_Latn
ve ven Venda -
vi vie Vietnamese vie_Latn
vo vol Volapük -
wa wln Walloon -
wo wol Wolof wol_Latn
xh xho Xhosa xho_Latn
yi yid Yiddish ydd_Hebr
yo yor Yoruba yor_Latn
za zha Zhuang -
zh zho Chinese zho_Hans
zu zul Zulu zul_Latn
"""

# FLORES-200, all 204 codes (ISO 639-3 code _ ISO 15924 script) and their English names. Dev: 997 sentences per
# language, devtest: 1012, the same sentences in every language.
FLORES_200 = """
ace_Arab Acehnese (Arabic script)
ace_Latn Acehnese (Latin script)
acm_Arab Mesopotamian Arabic
acq_Arab Ta'izzi-Adeni Arabic
aeb_Arab Tunisian Arabic
afr_Latn Afrikaans
ajp_Arab South Levantine Arabic
aka_Latn Akan
als_Latn Tosk Albanian
amh_Ethi Amharic
apc_Arab North Levantine Arabic
arb_Arab Modern Standard Arabic
arb_Latn Modern Standard Arabic (Romanized)
ars_Arab Najdi Arabic
ary_Arab Moroccan Arabic
arz_Arab Egyptian Arabic
asm_Beng Assamese
ast_Latn Asturian
awa_Deva Awadhi
ayr_Latn Central Aymara
azb_Arab South Azerbaijani
azj_Latn North Azerbaijani
bak_Cyrl Bashkir
bam_Latn Bambara
ban_Latn Balinese
bel_Cyrl Belarusian
bem_Latn Bemba
ben_Beng Bengali
bho_Deva Bhojpuri
bjn_Arab Banjar (Arabic script)
bjn_Latn Banjar (Latin script)
bod_Tibt Standard Tibetan
bos_Latn Bosnian
bug_Latn Buginese
bul_Cyrl Bulgarian
cat_Latn Catalan
ceb_Latn Cebuano
ces_Latn Czech
cjk_Latn Chokwe
ckb_Arab Central Kurdish
crh_Latn Crimean Tatar
cym_Latn Welsh
dan_Latn Danish
deu_Latn German
dik_Latn Southwestern Dinka
dyu_Latn Dyula
dzo_Tibt Dzongkha
ell_Grek Greek
eng_Latn English
epo_Latn Esperanto
est_Latn Estonian
eus_Latn Basque
ewe_Latn Ewe
fao_Latn Faroese
fij_Latn Fijian
fin_Latn Finnish
fon_Latn Fon
fra_Latn French
fur_Latn Friulian
fuv_Latn Nigerian Fulfulde
gaz_Latn West Central Oromo
gla_Latn Scottish Gaelic
gle_Latn Irish
glg_Latn Galician
grn_Latn Guarani
guj_Gujr Gujarati
hat_Latn Haitian Creole
hau_Latn Hausa
heb_Hebr Hebrew
hin_Deva Hindi
hne_Deva Chhattisgarhi
hrv_Latn Croatian
hun_Latn Hungarian
hye_Armn Armenian
ibo_Latn Igbo
ilo_Latn Ilocano
ind_Latn Indonesian
isl_Latn Icelandic
ita_Latn Italian
jav_Latn Javanese
jpn_Jpan Japanese
kab_Latn Kabyle
kac_Latn Jingpho
kam_Latn Kamba
kan_Knda Kannada
kas_Arab Kashmiri (Arabic script)
kas_Deva Kashmiri (Devanagari script)
kat_Geor Georgian
kaz_Cyrl Kazakh
kbp_Latn Kabiyè
kea_Latn Kabuverdianu
khk_Cyrl Halh Mongolian
khm_Khmr Khmer
kik_Latn Kikuyu
kin_Latn Kinyarwanda
kir_Cyrl Kyrgyz
kmb_Latn Kimbundu
kmr_Latn Northern Kurdish
knc_Arab Central Kanuri (Arabic script)
knc_Latn Central Kanuri (Latin script)
kon_Latn Kikongo
kor_Hang Korean
lao_Laoo Lao
lij_Latn Ligurian
lim_Latn Limburgish
lin_Latn Lingala
lit_Latn Lithuanian
lmo_Latn Lombard
ltg_Latn Latgalian
ltz_Latn Luxembourgish
lua_Latn Luba-Kasai
lug_Latn Ganda
luo_Latn Luo
lus_Latn Mizo
lvs_Latn Standard Latvian
mag_Deva Magahi
mai_Deva Maithili
mal_Mlym Malayalam
mar_Deva Marathi
min_Arab Minangkabau (Arabic script)
min_Latn Minangkabau (Latin script)
mkd_Cyrl Macedonian
mlt_Latn Maltese
mni_Beng Meitei (Bengali script)
mos_Latn Mossi
mri_Latn Maori
mya_Mymr Burmese
nld_Latn Dutch
nno_Latn Norwegian Nynorsk
nob_Latn Norwegian Bokmål
npi_Deva Nepali
nso_Latn Northern Sotho
nus_Latn Nuer
nya_Latn Nyanja
oci_Latn Occitan
ory_Orya Odia
pag_Latn Pangasinan
pan_Guru Eastern Panjabi
pap_Latn Papiamento
pbt_Arab Southern Pashto
pes_Arab Western Persian
plt_Latn Plateau Malagasy
pol_Latn Polish
por_Latn Portuguese
prs_Arab Dari
quy_Latn Ayacucho Quechua
ron_Latn Romanian
run_Latn Rundi
rus_Cyrl Russian
sag_Latn Sango
san_Deva Sanskrit
sat_Olck Santali
scn_Latn Sicilian
shn_Mymr Shan
sin_Sinh Sinhala
slk_Latn Slovak
slv_Latn Slovenian
smo_Latn Samoan
sna_Latn Shona
snd_Arab Sindhi
som_Latn Somali
sot_Latn Southern Sotho
spa_Latn Spanish
srd_Latn Sardinian
srp_Cyrl Serbian
ssw_Latn Swati
sun_Latn Sundanese
swe_Latn Swedish
swh_Latn Swahili
szl_Latn Silesian
tam_Taml Tamil
taq_Latn Tamasheq (Latin script)
taq_Tfng Tamasheq (Tifinagh script)
tat_Cyrl Tatar
tel_Telu Telugu
tgk_Cyrl Tajik
tgl_Latn Tagalog
tha_Thai Thai
tir_Ethi Tigrinya
tpi_Latn Tok Pisin
tsn_Latn Tswana
tso_Latn Tsonga
tuk_Latn Turkmen
tum_Latn Tumbuka
tur_Latn Turkish
twi_Latn Twi
tzm_Tfng Central Atlas Tamazight
uig_Arab Uyghur
ukr_Cyrl Ukrainian
umb_Latn Umbundu
urd_Arab Urdu
uzn_Latn Northern Uzbek
vec_Latn Venetian
vie_Latn Vietnamese
war_Latn Waray
wol_Latn Wolof
xho_Latn Xhosa
ydd_Hebr Eastern Yiddish
yor_Latn Yoruba
yue_Hant Yue Chinese
zho_Hans Chinese (Simplified)
zho_Hant Chinese (Traditional)
zsm_Latn Standard Malay
zul_Latn Zulu
"""

# The script an ISO 639-3 code means where FLORES-200 has the language in several (an ISO 639-1 code means the one
# its row above names): the script most of its written text uses today.
DEFAULT_SCRIPT = {"ace": "Latn", "bjn": "Latn", "min": "Latn", "taq": "Latn"}

# Other spellings of a FLORES-200 code: NLLB's models and its first FLORES-200 release name Santali's Ol Chiki text
# sat_Beng.
FLORES_ALIASES = {"sat_Beng": "sat_Olck"}


@dataclasses.dataclass(frozen=True)
class Language:
    """One language in one script: the label tables and figures show (`display`), its codes, name and script.

    display: the ISO 639-1 code where the language has one, else its ISO 639-3 code, with "-Script" added for a
    script other than the one the bare code means (ar-Latn, zh-Hant, kas-Deva). flores: its FLORES-200 code (None:
    not in FLORES-200); others: the FLORES-200 codes of the same language in its other scripts (what a bare ISO code
    does not pick). script: ISO 15924 (None outside FLORES-200).
    """

    display: str
    iso3: str
    flores: str | None
    name: str
    script: str | None
    iso1: str | None = None
    others: tuple[str, ...] = ()

    @property
    def names(self) -> tuple[str, ...]:
        """Every code naming this record, the most specific first: FLORES-200, display, ISO 639-1, ISO 639-3."""
        return tuple(dict.fromkeys(c for c in (self.flores, self.display, self.iso1, self.iso3) if c))


def _key(code: str) -> str:
    return code.strip().lower().replace("-", "_")


def _rows(table: str) -> list[list[str]]:
    return [line.split(" ") for line in table.strip().splitlines()]


def _build() -> tuple[dict[str, Language], dict[str, Language]]:
    """({FLORES-200 code: record}, {lower-cased code or alias: record}); a code naming two records fails here."""
    iso1_of = {row[-1]: row[0] for row in _rows(ISO_639_1) if row[-1] != "-"}  # FLORES code -> the ISO code meaning it
    scripts: dict[str, list[str]] = {}
    for code, *_ in _rows(FLORES_200):
        scripts.setdefault(code[:3], []).append(code[4:])
    default = {iso3: DEFAULT_SCRIPT.get(iso3, found[0]) for iso3, found in scripts.items()}
    default |= {flores[:3]: flores[4:] for flores in iso1_of}
    family_iso1 = {flores[:3]: iso1 for flores, iso1 in iso1_of.items()}
    # nb, not no, for Bokmål: where two ISO 639-1 codes mean one FLORES-200 language, the one of that very language.
    family_iso1 |= {row[1]: row[0] for row in _rows(ISO_639_1) if row[1] in scripts}
    records, index = {}, {}

    def add(code: str, record: Language) -> None:
        key = _key(code)
        if index.setdefault(key, record) != record:
            raise AssertionError(f"language code {code!r} names both {index[key]} and {record}")

    for code, *name in _rows(FLORES_200):
        iso3, script = code.split("_")
        iso1 = family_iso1.get(iso3)
        suffix = "" if script == default[iso3] else f"-{script}"
        records[code] = Language(display=f"{iso1 or iso3}{suffix}", iso3=iso3, flores=code, name=" ".join(name),
                                 script=script, iso1=iso1,
                                 others=tuple(f"{iso3}_{s}" for s in scripts[iso3] if s != script))
    for record in records.values():
        add(record.flores, record)
        add(record.display, record)
        if record.iso1:
            add(f"{record.iso1}-{record.script}", record)
        if record.script == default[record.iso3]:
            add(record.iso3, record)
    for iso1, iso3, *rest in _rows(ISO_639_1):
        name, flores = " ".join(rest[:-1]), rest[-1]
        record = records[flores] if flores != "-" else Language(display=iso1, iso3=iso3, flores=None, name=name,
                                                                 script=None, iso1=iso1)
        add(iso1, record)
        add(iso3, record)
    for alias, flores in FLORES_ALIASES.items():
        add(alias, records[flores])
    return records, index


FLORES, _INDEX = _build()

# A language code as a user may write one: no spaces, commas or path separators (it may name a file).
_MALFORMED = re.compile(r"[\s,/\\]|[\x00-\x1f\x7f]")


def lookup(code: str) -> Language | None:
    """The record of an ISO 639-1, ISO 639-3, FLORES-200 or display code (any case, "-" or "_"); None if unknown."""
    return _INDEX.get(_key(code))


def display(code: str) -> str:
    """The short label of a code: its record's display code, or the code as written when it is not in the table."""
    record = lookup(code)
    return record.display if record else code


def identity(code: str) -> str:
    """What two codes share when they name the same language in the same script (en and eng_Latn)."""
    record = lookup(code)
    if record is None:
        return code
    return record.flores or record.iso3


def file_names(code: str) -> tuple[str, ...]:
    """The names a file or column of this language may have, tried in order: the code as written, then its
    record's other codes (FLORES-200, display, ISO 639-1, ISO 639-3)."""
    record = lookup(code)
    return tuple(dict.fromkeys((code, *(record.names if record else ()))))


def check_codes(codes, least: int = 1, flag: str = "--langs") -> tuple[str, ...]:
    """The codes, unchanged, if each is well formed and they name `least` or more different languages; else a
    SettingsError naming the code."""
    codes = tuple(codes)
    for code in codes:
        if not isinstance(code, str) or not code or code in (".", "..") or _MALFORMED.search(code):
            raise SettingsError(f"{flag} {code!r}: a language code is one word without spaces, commas or path "
                                "separators (e.g. yo, yor, yor_Latn)")
    seen: dict[str, str] = {}
    for code in codes:
        first = seen.setdefault(identity(code), code)
        if first != code or codes.count(code) > 1:
            same = f"{first} and {code} both name {identity(code)}" if first != code else f"{code} is given twice"
            raise SettingsError(f"{flag}: {same}; give each language once")
    if len(codes) < least:
        raise SettingsError(f"{flag} needs at least {least} different languages, got {','.join(codes) or 'none'}")
    return codes
