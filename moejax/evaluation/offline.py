"""The papers' benchmarks as lm-eval tasks over the files a user downloaded once, never the Hub.

`task_folder(DATA_DIR, OUT)` finds each benchmark under DATA_DIR (the folder itself, a subfolder, or one below that)
by its published file layout, and writes one lm-eval task YAML per task into OUT (an lm-eval include path):
`dataset_path: json | csv | parquet` with `data_files` naming the user's files (MGSM, whose few-shot exemplars are
a Python file, goes through `load_mgsm` here instead). Prompts, answer extraction and metrics are those of the
installed lm-eval's own task of the same benchmark, read from its YAML when the file is written, so a moejax task
scores exactly as lm-eval's Hub-backed one would; only where the documents come from differs. Nothing is written
under DATA_DIR.

The families, their layouts and the papers' protocols are documented in docs/evaluation.md.
"""

from __future__ import annotations

import ast
import csv
import dataclasses
import functools
import re
from collections.abc import Callable
from pathlib import Path

from moejax.errors import DataError, SettingsError

# What a task takes from the lm-eval task it mirrors: how a document becomes requests and how they are scored.
PROMPT_KEYS = ("description", "doc_to_text", "doc_to_target", "doc_to_choice", "target_delimiter", "fewshot_delimiter",
               "fewshot_config", "output_type", "generation_kwargs", "filter_list", "metric_list", "num_fewshot",
               "should_decontaminate", "doc_to_decontamination_query", "repeats")
MGSM_SHOTS = 2  # paper B: MGSM 2-shot exact match
MEDICAL = "Medical"  # Global-MMLU's own subject_category of the medicine subjects


@dataclasses.dataclass(frozen=True)
class Function:
    """A `!function module.name` reference in a task YAML (lm-eval imports the module by name)."""
    name: str


@dataclasses.dataclass(frozen=True)
class Variant:
    """One kind of task a benchmark gives per language: its name prefix and how its YAML is made from lm-eval's."""
    prefix: str  # the task is prefix + language (a family without languages: the prefix alone)
    reference: Callable[[str], str]  # language -> the lm-eval task YAML to mirror (relative to lm_eval/tasks)
    config: Callable[[str, dict[str, list[Path]]], dict]  # language, files -> source and splits of the task
    tag: str | None = None
    overrides: tuple[tuple[str, object], ...] = ()  # the paper's protocol where lm-eval's default differs


@dataclasses.dataclass(frozen=True)
class Family:
    """A benchmark: where its files lie in a folder holding its published layout, and the tasks it gives."""
    name: str
    title: str
    folder: str  # the folder name the download command in `fetch` writes under DATA_DIR
    fetch: str
    layout: str
    language: str  # regex of a language code in the task names
    code: str  # what the layout calls that code
    find: Callable[[Path], dict[str, dict[str, list[Path]]]]  # folder -> {language: {role: files}}
    expected: Callable[[Path, str], Path]  # folder, language -> the first file a missing language needs
    variants: tuple[Variant, ...]
    needs: tuple[tuple[str, str], ...] = ()  # (role, path in the folder) of the files every language also needs
    group: str | None = None  # an lm-eval group over all its tasks
    group_reference: str | None = None  # the lm-eval group YAML whose aggregation it takes
    fixed_language: str = ""  # the language of a benchmark whose task names carry none

    def match(self, task: str) -> tuple[Variant, str] | None:
        """(variant, language) of a task name this family gives, or None."""
        for variant in self.variants:
            if not self.language and task == variant.prefix:
                return variant, ""
            found = self.language and re.fullmatch(re.escape(variant.prefix) + f"({self.language})", task)
            if found:
                return variant, found.group(1)
        return None


def _files(pattern: str, folder: Path) -> list[Path]:
    return sorted(p for p in folder.glob(pattern) if p.is_file())


# -- Belebele: facebook/belebele data/{flores_code}.jsonl, or the GitHub release's flat {flores_code}.jsonl ----------
FLORES = r"[a-z]{3}_[A-Z][a-z]{3}"


def _belebele(folder: Path) -> dict:
    nested = {p.stem: p for p in _files("data/*.jsonl", folder) if re.fullmatch(FLORES, p.stem)}
    flat = {p.stem: p for p in _files("*.jsonl", folder) if re.fullmatch(FLORES, p.stem)}
    return {code: {"test": [path]} for code, path in (nested or flat).items()}


def _belebele_config(code: str, files: dict) -> dict:
    return {"dataset_path": "json", "dataset_kwargs": {"data_files": {"test": _paths(files["test"])}},
            "test_split": "test", "fewshot_split": "test"}


# -- MGSM: juletxara/mgsm mgsm_{lang}.tsv (question<TAB>answer number) and exemplars.py (the 8 few-shot exemplars) --
def _mgsm(folder: Path) -> dict:
    exemplars = folder / "exemplars.py"
    found = {}
    for path in _files("mgsm_*.tsv", folder):
        lang = path.stem.removeprefix("mgsm_")
        if re.fullmatch("[a-z]{2}", lang):
            found[lang] = {"test": [path], "exemplars": [exemplars] if exemplars.is_file() else []}
    return found


def _mgsm_config(lang: str, files: dict) -> dict:
    return {"custom_dataset": Function(f"{__name__}.load_mgsm"),
            "dataset_kwargs": {"tsv": str(files["test"][0]), "exemplars": str(files["exemplars"][0]),
                               "exemplar_language": lang},
            "training_split": "train", "fewshot_split": "train", "test_split": "test"}


# -- Global-MMLU: CohereLabs/Global-MMLU {lang}/test-*.parquet and {lang}/dev-*.parquet (the few-shot pool) ---------
def _global_mmlu(folder: Path) -> dict:
    found = {}
    for sub in sorted(p for p in folder.iterdir() if p.is_dir() and re.fullmatch("[a-z]{2,3}", p.name)):
        test = _files("test-*.parquet", sub)
        if test:
            found[sub.name] = {"test": test, "dev": _files("dev-*.parquet", sub)}
    return found


def _global_mmlu_config(lang: str, files: dict) -> dict:
    data_files = {"test": _paths(files["test"])}
    splits = {"test_split": "test"}
    if files["dev"]:
        data_files["dev"] = _paths(files["dev"])
        splits["fewshot_split"] = "dev"
    return {"dataset_path": "parquet", "dataset_kwargs": {"data_files": data_files}, **splits}


def _global_mmlu_medical_config(lang: str, files: dict) -> dict:
    return _global_mmlu_config(lang, files) | {"process_docs": Function(f"{__name__}.medical_rows")}


# -- MultiBLiMP: jumelet/multiblimp {iso3}/data.tsv (a header; columns sen, wrong_sen, ...) -------------------------
def _multiblimp(folder: Path) -> dict:
    return {sub.name: {"test": [sub / "data.tsv"]}
            for sub in sorted(p for p in folder.iterdir() if p.is_dir() and re.fullmatch("[a-z]{3}", p.name))
            if (sub / "data.tsv").is_file()}


def _multiblimp_config(iso3: str, files: dict) -> dict:
    # na_filter off: a sentence such as "None" or "NA" stays text.
    return {"dataset_path": "csv", "dataset_kwargs": {"data_files": {"train": _paths(files["test"])}, "sep": "\t",
                                                      "na_filter": False},
            "test_split": "train"}


# -- JCommonsenseQA: JGLUE datasets/jcommonsenseqa-v1.1/{train,valid}-v1.1.json (JSON lines) ------------------------
JCQA = "jcommonsenseqa-v1.1"


def _jcommonsenseqa(folder: Path) -> dict:
    valid, train = folder / JCQA / "valid-v1.1.json", folder / JCQA / "train-v1.1.json"
    return {"": {"validation": [valid], "train": [train] if train.is_file() else []}} if valid.is_file() else {}


def _jcommonsenseqa_config(_: str, files: dict) -> dict:
    return {"dataset_path": "json",
            "dataset_kwargs": {"data_files": {"train": _paths(files["train"]),
                                              "validation": _paths(files["validation"])}},
            "training_split": "train", "validation_split": "validation", "test_split": None, "fewshot_split": "train",
            "process_docs": Function(f"{__name__}.with_choices")}


def _paths(files: list[Path]) -> list[str]:
    return [str(p) for p in files]


FAMILIES = (
    Family(name="belebele", title="Belebele", folder="belebele",
           fetch="huggingface-cli download facebook/belebele --repo-type dataset --local-dir DIR/belebele",
           layout="data/{flores_code}.jsonl (or the GitHub release's {flores_code}.jsonl)",
           language=FLORES, code="flores_code", find=_belebele,
           expected=lambda folder, code: folder / "data" / f"{code}.jsonl",
           variants=(Variant("moejax_belebele_", lambda _: "belebele/_default_template_yaml", _belebele_config),),
           group="moejax_belebele", group_reference="belebele/_belebele.yaml"),
    Family(name="mgsm", title="MGSM", folder="mgsm",
           fetch="huggingface-cli download juletxara/mgsm --repo-type dataset --local-dir DIR/mgsm",
           layout="mgsm_{lang}.tsv and exemplars.py", language="[a-z]{2}", code="lang", find=_mgsm,
           expected=lambda folder, lang: folder / f"mgsm_{lang}.tsv",
           variants=(Variant("moejax_mgsm_direct_", lambda lang: f"mgsm/direct/mgsm_direct_{lang}.yaml",
                             _mgsm_config, tag="moejax_mgsm_direct", overrides=(("num_fewshot", MGSM_SHOTS),)),
                     Variant("moejax_mgsm_native_cot_", lambda lang: f"mgsm/native_cot/mgsm_native_cot_{lang}.yaml",
                             _mgsm_config, tag="moejax_mgsm_native_cot", overrides=(("num_fewshot", MGSM_SHOTS),))),
           needs=(("exemplars", "exemplars.py"),)),
    Family(name="global_mmlu", title="Global-MMLU", folder="global_mmlu",
           fetch="huggingface-cli download CohereLabs/Global-MMLU --repo-type dataset --local-dir DIR/global_mmlu",
           layout="{lang}/test-*.parquet (and {lang}/dev-*.parquet for few-shot)", language="[a-z]{2,3}",
           code="lang", find=_global_mmlu,
           expected=lambda folder, lang: folder / lang / "test-00000-of-00001.parquet",
           variants=(Variant("moejax_global_mmlu_medical_", lambda _: "global_mmlu/full/en/_en_template_yaml",
                             _global_mmlu_medical_config, tag="moejax_global_mmlu_medical",
                             overrides=(("num_fewshot", 0),)),
                     Variant("moejax_global_mmlu_", lambda _: "global_mmlu/full/en/_en_template_yaml",
                             _global_mmlu_config, tag="moejax_global_mmlu"))),
    Family(name="multiblimp", title="MultiBLiMP", folder="multiblimp",
           fetch="huggingface-cli download jumelet/multiblimp --repo-type dataset --local-dir DIR/multiblimp",
           layout="{iso3}/data.tsv", language="[a-z]{3}", code="iso3", find=_multiblimp,
           expected=lambda folder, iso3: folder / iso3 / "data.tsv",
           variants=(Variant("moejax_multiblimp_", lambda _: "multiblimp/_template_yaml", _multiblimp_config,
                             tag="moejax_multiblimp"),)),
    Family(name="jcommonsenseqa", title="JCommonsenseQA", folder="JGLUE/datasets",
           fetch="git clone https://github.com/yahoojapan/JGLUE DIR/JGLUE",
           layout=f"{JCQA}/train-v1.1.json and {JCQA}/valid-v1.1.json", language="", code="", find=_jcommonsenseqa,
           expected=lambda folder, _: folder / JCQA / "valid-v1.1.json",
           variants=(Variant("moejax_jcommonsenseqa",
                             lambda _: "japanese_leaderboard/ja_leaderboard_jcommonsenseqa.yaml",
                             _jcommonsenseqa_config),),
           needs=(("train", f"{JCQA}/train-v1.1.json"),), fixed_language="ja"),
)
DATA_DIR_HELP = ("a folder of benchmark files as published (downloaded once by hand; nothing is written there): "
                 "moejax finds each under it by its layout and writes lm-eval tasks for it: "
                 + "; ".join(f"{f.title} {f.layout} -> "
                             + ", ".join(v.prefix + (f"{{{f.code}}}" if f.code else "") for v in f.variants)
                             for f in FAMILIES)
                 + " (docs/evaluation.md)")


@dataclasses.dataclass(frozen=True)
class Found:
    """A task whose files are under DATA_DIR."""
    family: Family
    variant: Variant
    language: str
    folder: Path
    files: dict[str, list[Path]]


def _folders(data_dir: Path):
    """DATA_DIR, its subfolders and theirs: where a benchmark's own folder may be."""
    def children(folder):
        return sorted(p for p in folder.iterdir() if p.is_dir() and not p.name.startswith("."))

    yield data_dir
    for child in children(data_dir):
        yield child
        yield from children(child)


def discover(data_dir: Path) -> dict[str, Found]:
    """Every task whose benchmark folder is under `data_dir` (its files possibly incomplete: see `missing`)."""
    if not Path(data_dir).is_dir():
        raise DataError(f"--data-dir {data_dir}: no such folder")
    data_dir = Path(data_dir).resolve()  # the task YAML names the files by absolute path
    found: dict[str, Found] = {}
    for family in FAMILIES:
        homes: list[Path] = []
        for folder in _folders(data_dir):
            if any(folder.is_relative_to(home) for home in homes):
                continue
            languages = family.find(folder)
            if languages:
                homes.append(folder)
            for language, files in languages.items():
                for variant in family.variants:
                    name = variant.prefix + language
                    if name in found:
                        raise DataError(f"{name}: two copies of its {family.title} files under --data-dir {data_dir} "
                                        f"({found[name].folder} and {folder}); keep one")
                    found[name] = Found(family, variant, language, folder, files)
    return found


def missing(task: Found) -> Path | None:
    """The first file a found task still needs (MGSM's exemplars, JGLUE's train file), or None."""
    for role, path in task.family.needs:
        if not task.files[role]:
            return task.folder / path
    return None


def available(data_dir: Path) -> dict[str, list[str]]:
    """family name -> the task names whose files are all under `data_dir` (every family listed, [] when none)."""
    found = discover(data_dir)
    return {family.name: sorted(name for name, task in found.items() if task.family is family and _usable(task))
            for family in FAMILIES}


def _usable(task: Found) -> bool:
    """Whether a found task has all its files (and, for MGSM, lm-eval prompts in its language)."""
    return missing(task) is None and (task.family.name != "mgsm" or task.language in _mgsm_languages())


def task_folder(data_dir: Path, out: Path, tasks: list[str] | None = None) -> Path:
    """Writes into `out` the lm-eval task YAML of every task found under `data_dir` (or of those of `tasks` that a
    family here gives, groups and tags included; other names are left to lm-eval); returns `out`, an include path.
    A task asked for whose files are missing is a DataError naming the file expected and where."""
    data_dir, out = Path(data_dir), Path(out)
    if out.resolve().is_relative_to(data_dir.resolve()):
        raise SettingsError(f"{out} is inside --data-dir {data_dir}: moejax writes nothing there; write the tasks "
                            "elsewhere")
    found = discover(data_dir)
    # Unasked, an incomplete task is left out; asked for, it is an error.
    chosen = [n for n in sorted(found) if _usable(found[n])] if tasks is None else _chosen(data_dir, found, tasks)
    out.mkdir(parents=True, exist_ok=True)
    for name in chosen:
        _write(out / f"{name}.yaml", _config(name, found[name]))
    for family in FAMILIES:
        members = [name for name in chosen if found[name].family is family]
        if family.group and members:
            _write(out / f"{family.group}.yaml", _group(family, members))
    return out


def _chosen(data_dir: Path, found: dict[str, Found], tasks: list[str]) -> list[str]:
    """The found tasks `tasks` names (directly, or through a family's group or a variant's tag), each checked
    complete; a name a family gives but whose files are not there is a DataError."""
    chosen: list[str] = []
    for asked in tasks:
        for family in FAMILIES:
            tagged = [v for v in family.variants if asked in (v.tag, family.group)]
            matched = family.match(asked)
            if not tagged and not matched:
                continue
            if tagged:
                names = sorted(n for n, t in found.items() if t.family is family and t.variant in tagged)
                if not names:
                    raise DataError(f"--tasks {asked}: no {family.title} files under --data-dir {data_dir} (expected "
                                    f"{_home(data_dir, found, family) / family.layout}; `{family.fetch}` puts them "
                                    "there)")
            else:
                _, language = matched
                names = [asked]
                if asked not in found:
                    expected = family.expected(_home(data_dir, found, family), language)
                    raise DataError(f"--tasks {asked}: needs {expected}, which is not there ({family.title} as "
                                    f"`{family.fetch}` lays it out under --data-dir {data_dir})")
            for name in names:
                _check_complete(name, found[name])
            chosen += [n for n in names if n not in chosen]
    return chosen


def _check_complete(name: str, task: Found) -> None:
    lacking = missing(task)
    if lacking is not None:
        raise DataError(f"--tasks {name}: needs {lacking}, which is not there (the few-shot examples of "
                        f"{task.family.title}; `{task.family.fetch}` puts it there)")
    if task.family.name == "mgsm" and task.language not in _mgsm_languages():
        raise DataError(f"--tasks {name}: lm-eval defines MGSM prompts for {', '.join(sorted(_mgsm_languages()))}, "
                        f"not for {task.language!r} ({task.files['test'][0]})")


def _home(data_dir: Path, found: dict[str, Found], family: Family) -> Path:
    """Where the family's files are (or, if none was found, where its download command puts them)."""
    homes = [t.folder for t in found.values() if t.family is family]
    return homes[0] if homes else data_dir / family.folder


def _lm_eval_tasks() -> Path:
    try:
        import lm_eval.tasks
    except ImportError:
        raise SettingsError("the offline benchmark tasks need lm-evaluation-harness: pip install -e '.[eval]'") \
            from None
    return Path(lm_eval.tasks.__file__).parent


@functools.cache
def _mgsm_languages() -> frozenset[str]:
    """The languages lm-eval gives MGSM prompts for (both variants)."""
    root = _lm_eval_tasks() / "mgsm"
    direct = {p.stem.removeprefix("mgsm_direct_") for p in root.glob("direct/mgsm_direct_*.yaml")}
    native = {p.stem.removeprefix("mgsm_native_cot_") for p in root.glob("native_cot/mgsm_native_cot_*.yaml")}
    return frozenset(direct & native)


def _reference(relative: str) -> dict:
    """The lm-eval task YAML `relative` (includes merged, functions unresolved)."""
    from lm_eval.tasks._yaml_loader import load_yaml

    return load_yaml(_lm_eval_tasks() / relative, resolve_func=False)


def _config(name: str, task: Found) -> dict:
    """The task's YAML: lm-eval's prompts and metrics for the benchmark, over the user's files."""
    reference_name = task.variant.reference(task.language)
    reference = _reference(reference_name)
    language = task.language or task.family.fixed_language
    config = {"task": name}
    if task.variant.tag:
        config["tag"] = task.variant.tag
    config |= task.variant.config(task.language, task.files)
    config |= {key: reference[key] for key in PROMPT_KEYS if key in reference}
    config |= dict(task.variant.overrides)
    config["metadata"] = {"version": 1.0, "language": language, "benchmark": task.family.title,
                          "prompts": f"lm-eval {reference_name}"}
    return config


def _group(family: Family, members: list[str]) -> dict:
    reference = _reference(family.group_reference)
    return {"group": family.group, "task": members, "aggregate_metric_list": reference["aggregate_metric_list"],
            "metadata": {"version": 1.0}}


def _write(path: Path, config: dict) -> None:
    import yaml

    class Dumper(yaml.SafeDumper):
        """Writes a Function as `!function module.name`."""

    Dumper.add_representer(Function, lambda dumper, f: dumper.represent_scalar("!function", f.name))
    # Prompts over several lines as block text, as lm-eval's own YAML writes them.
    Dumper.add_representer(str, lambda dumper, text: dumper.represent_scalar(
        "tag:yaml.org,2002:str", text, style="|" if "\n" in text else None))
    path.write_text(yaml.dump(config, Dumper=Dumper, allow_unicode=True, sort_keys=False, width=1000),
                    encoding="utf-8")


# -- what the task YAML calls by `!function` --------------------------------------------------------------------------
def load_mgsm(tsv: str, exemplars: str, exemplar_language: str, **_metadata):
    """MGSM as its dataset script builds it: test from the TSV (question, answer number; no answer text), train from
    exemplars.py's exemplars of that language (question and step-by-step answer), read without running the file."""
    import datasets

    test = []
    with open(tsv, encoding="utf-8", newline="") as f:
        for line, row in enumerate(csv.reader(f, quotechar='"', delimiter="\t"), 1):
            try:
                number = int(row[1].replace(",", ""))
            except (IndexError, ValueError):
                raise DataError(f"{tsv}:{line}: expected a question, a tab and an integer answer") from None
            test.append({"question": row[0], "answer": None, "answer_number": number, "equation_solution": None})
    values = _literals(Path(exemplars), ("MGSM_EXEMPLARS", "EXEMPLAR_NUMBER_ANSWERS", "EXEMPLAR_EQUATION_SOLUTIONS"))
    shots = values["MGSM_EXEMPLARS"].get(exemplar_language)
    if not shots:
        raise DataError(f"{exemplars}: MGSM_EXEMPLARS has no {exemplar_language!r} exemplars")
    train = [{"question": shot["q"], "answer": shot["a"],
              "answer_number": values["EXEMPLAR_NUMBER_ANSWERS"][int(key) - 1],
              "equation_solution": values["EXEMPLAR_EQUATION_SOLUTIONS"][int(key) - 1]}
             for key, shot in shots.items()]
    return datasets.DatasetDict({"train": datasets.Dataset.from_list(train),
                                 "test": datasets.Dataset.from_list(test)})


def _literals(path: Path, names: tuple[str, ...]) -> dict:
    """The literal values assigned to `names` at the top of a Python file (parsed, never run)."""
    values = {}
    try:
        tree = ast.parse(path.read_text(encoding="utf-8"), filename=str(path))
        for node in tree.body:
            target = node.targets[0] if isinstance(node, ast.Assign) and len(node.targets) == 1 else None
            if isinstance(target, ast.Name) and target.id in names:
                values[target.id] = ast.literal_eval(node.value)
    except (SyntaxError, ValueError) as e:
        raise DataError(f"{path}: not the MGSM exemplars file ({type(e).__name__}: {e})") from None
    absent = [n for n in names if n not in values]
    if absent:
        raise DataError(f"{path}: no {', '.join(absent)} (the MGSM exemplars file assigns them)")
    return values


def medical_rows(dataset):
    """Global-MMLU's rows whose subject_category is Medical (paper B's medicine subset)."""
    if MEDICAL not in set(dataset["subject_category"]):
        found = sorted(set(dataset["subject_category"]))
        raise DataError(f"Global-MMLU: no row has subject_category {MEDICAL!r} (found {found})")
    return dataset.filter(lambda row: row["subject_category"] == MEDICAL)


def with_choices(dataset):
    """JCommonsenseQA rows with their five answers as one list, `choices`, as lm-eval's prompt reads them."""
    return dataset.map(lambda row: {"choices": [row[f"choice{i}"] for i in range(5)]})
