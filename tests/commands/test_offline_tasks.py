"""`moejax eval --data-dir`: the papers' benchmarks from the files a user downloaded (moejax.evaluation.offline).

Each benchmark gets a few rows written here in its published layout (facebook/belebele, juletxara/mgsm,
CohereLabs/Global-MMLU, jumelet/multiblimp, JGLUE), in Hebrew and Japanese. The tasks' documents, prompts and
targets are checked against those rows and the prompts lm-eval 0.4.13 defines for the same benchmarks; a run of the
built-in model checks that every score is the one its requests imply (MultiBLiMP's by construction: a sentence that
extends the other has the lower log-likelihood, whatever the model), and that nothing is written into the data
folder. Missing files are one line naming the task, the file and where, before any model work.
"""

from __future__ import annotations

import csv
import json
import re
import string

import pytest

pytest.importorskip("lm_eval")

from moejax.cli import main
from moejax.errors import DataError, SettingsError
from moejax.evaluation.offline import available, load_mgsm, medical_rows, task_folder

BELEBELE = [  # flores_passage, question, four answers, the correct one (1-based, a string as published)
    ("הספרייה העירונית נפתחת בשמונה בבוקר ונסגרת בשש בערב.", "מתי נסגרת הספרייה?",
     ("בשמונה בבוקר", "בשש בערב", "בחצות", "בצהריים"), "2"),
    ("דנה גידלה עגבניות ומלפפונים בגינה שמאחורי הבית.", "מה גידלה דנה?",
     ("תפוחים", "חיטה", "ורדים", "עגבניות ומלפפונים"), "4"),
    ("הרכבת לחיפה יוצאת מהרציף השלישי.", "מאיזה רציף יוצאת הרכבת?", ("השלישי", "הראשון", "השני", "הרביעי"), "1"),
]
# Each ungrammatical sentence extends the grammatical one, or the reverse: log P(a + more) < log P(a) for any model,
# so the first pair is right and the second wrong: accuracy 1/2 on the first two.
MULTIBLIMP = [("הילד הולך", "הילד הולך הולכת לגן", "SV-G"), ("הילדה הולכת לבית הספר", "הילדה הולכת", "SV-G"),
              ("NA", "None", "SV-#")]
GLOBAL_MMLU = [("law", "Humanities", "מהו חוזה?", "B"), ("anatomy", "Medical", "כמה עצמות יש ביד?", "C"),
               ("physics", "STEM", "מהי מהירות האור?", "A"), ("virology", "Medical", "מהו נגיף?", "D"),
               ("clinical_knowledge", "Medical", "מהו דופק תקין?", "A")]
JCQA_VALID = [("主に子ども向けのものは？", ["世界", "写真集", "絵本", "論文", "図鑑"], 2),
              ("冷蔵庫に入れるものは？", ["牛乳", "靴", "本", "時計", "傘"], 0),
              ("空を飛ぶものは？", ["魚", "鳥", "石", "机", "川"], 1)]
JCQA_TRAIN = [("朝に食べるものは？", ["朝食", "夕食", "夜食", "昼食", "間食"], 0),
              ("雨の日に使うものは？", ["帽子", "手袋", "傘", "靴下", "鞄"], 2),
              ("字を書く道具は？", ["鉛筆", "皿", "箸", "鍋", "枕"], 0),
              ("時間を知る道具は？", ["鏡", "時計", "扇風機", "椅子", "窓"], 1)]
MGSM_TEST = [("りんごが3個あります。2個もらうと何個ですか？", "5"), ("1個200円の本を6冊買うと何円ですか？", "1,200"),
             ("鳥が7羽いて、4羽飛んでいきました。残りは何羽ですか？", "3")]
MGSM_EXEMPLARS = """\"\"\"MGSM exemplars (test fixture in the published file's form).\"\"\"
EXEMPLAR_NUMBER_ANSWERS = [11, 29, 39]

EXEMPLAR_EQUATION_SOLUTIONS = [
    "5 + 6 = 11.",
    "4 * 5 = 20. 9 + 20 = 29.",
    "32 + 42 = 74. 74 - 35 = 39.",
]

MGSM_EXEMPLARS = {
    "en": {"1": {"q": "Question: Roger has 5 balls and buys 6 more. How many?",
                 "a": "Step-by-Step Answer: 5 + 6 = 11. The answer is 11."}},
    "ja": {
        "1": {"q": "問題：ロジャーはボールを5個持っていて、6個買いました。何個ですか？",
              "a": "ステップごとの答え： 5 + 6 = 11。答えは11です。"},
        "2": {"q": "問題：コンピューターが9台あり、毎日5台ずつ4日間増えました。何台ですか？",
              "a": "ステップごとの答え： 4 * 5 = 20。9 + 20 = 29。答えは29です。"},
        "3": {"q": "問題：チョコレートが32個と42個あり、35個食べました。残りは何個ですか？",
              "a": "ステップごとの答え： 32 + 42 = 74。74 - 35 = 39。答えは39です。"},
    },
}
"""


def jsonl(path, rows):
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rows), encoding="utf-8")


def write_belebele(folder, flat=False):
    rows = [{"link": f"https://example.org/{i}", "question_number": 1, "flores_passage": passage,
             "question": question, **{f"mc_answer{k + 1}": a for k, a in enumerate(answers)},
             "correct_answer_num": correct, "dialect": "heb_Hebr", "ds": "2023-05-03"}
            for i, (passage, question, answers, correct) in enumerate(BELEBELE)]
    jsonl(folder / ("" if flat else "data") / "heb_Hebr.jsonl", rows)


def write_mgsm(folder, exemplars=True):
    folder.mkdir(parents=True, exist_ok=True)
    with open(folder / "mgsm_ja.tsv", "w", encoding="utf-8", newline="") as f:
        csv.writer(f, delimiter="\t", quotechar='"', lineterminator="\n").writerows(MGSM_TEST)
    if exemplars:
        (folder / "exemplars.py").write_text(MGSM_EXEMPLARS, encoding="utf-8")


def write_global_mmlu(folder):
    import pandas as pd

    def frame(rows):
        return pd.DataFrame([{"sample_id": f"{subject}/test/{i}", "subject": subject, "subject_category": category,
                              "question": question, "option_a": "אחת", "option_b": "שתיים", "option_c": "שלוש",
                              "option_d": "ארבע", "answer": answer, "required_knowledge": "[]",
                              "time_sensitive": "[]", "reference": "[]", "culture": "[]", "region": "[]",
                              "country": "[]", "cultural_sensitivity_label": "CA", "is_annotated": False}
                             for i, (subject, category, question, answer) in enumerate(rows)])

    (folder / "he").mkdir(parents=True, exist_ok=True)
    frame(GLOBAL_MMLU).to_parquet(folder / "he" / "test-00000-of-00001.parquet")
    frame(GLOBAL_MMLU[:2]).to_parquet(folder / "he" / "dev-00000-of-00001.parquet")


def write_multiblimp(folder):
    (folder / "heb").mkdir(parents=True, exist_ok=True)
    with open(folder / "heb" / "data.tsv", "w", encoding="utf-8", newline="") as f:
        writer = csv.writer(f, delimiter="\t", lineterminator="\n")
        writer.writerow(["sen", "verb", "verb_idx", "wrong_sen", "wrong_verb", "phenomenon", "lang"])
        for sen, wrong, phenomenon in MULTIBLIMP:
            writer.writerow([sen, sen.split()[-1], 1, wrong, wrong.split()[-1], phenomenon, "heb"])


def write_jglue(folder):
    def rows(items, start):
        return [{"q_id": start + i, "question": q, **{f"choice{k}": c for k, c in enumerate(choices)}, "label": label}
                for i, (q, choices, label) in enumerate(items)]

    base = folder / "datasets" / "jcommonsenseqa-v1.1"
    jsonl(base / "train-v1.1.json", rows(JCQA_TRAIN, 0))
    jsonl(base / "valid-v1.1.json", rows(JCQA_VALID, 100))


@pytest.fixture
def data_dir(tmp_path):
    root = tmp_path / "downloads"
    write_belebele(root / "belebele")
    write_mgsm(root / "mgsm")
    write_global_mmlu(root / "global_mmlu")
    write_multiblimp(root / "multiblimp")
    write_jglue(root / "JGLUE")
    return root


def snapshot(folder):
    return {str(p.relative_to(folder)): (p.stat().st_size, p.stat().st_mtime_ns, p.read_bytes() if p.is_file() else b"")
            for p in sorted(folder.rglob("*"))}


ALL = {"belebele": ["moejax_belebele_heb_Hebr"], "mgsm": ["moejax_mgsm_direct_ja", "moejax_mgsm_native_cot_ja"],
       "global_mmlu": ["moejax_global_mmlu_he", "moejax_global_mmlu_medical_he"],
       "multiblimp": ["moejax_multiblimp_heb"], "jcommonsenseqa": ["moejax_jcommonsenseqa"]}


def test_available_finds_each_published_layout(data_dir, tmp_path):
    assert available(data_dir) == ALL
    # The GitHub release of Belebele (flat {code}.jsonl), a folder passed directly, and a nested download.
    write_belebele(tmp_path / "gh" / "Belebele", flat=True)
    assert available(tmp_path / "gh")["belebele"] == ["moejax_belebele_heb_Hebr"]
    assert available(data_dir / "multiblimp") == {family: ALL[family] if family == "multiblimp" else []
                                                  for family in ALL}
    # Unusable without the files each needs: MGSM without exemplars, Global-MMLU's without a test file.
    (data_dir / "mgsm" / "exemplars.py").unlink()
    for p in (data_dir / "global_mmlu" / "he").glob("test-*"):
        p.unlink()
    assert available(data_dir)["mgsm"] == [] and available(data_dir)["global_mmlu"] == []


def test_tasks_are_the_files_rows_with_lm_evals_prompts(data_dir, tmp_path):
    """Documents, prompts, targets and shots of every task, as lm-eval 0.4.13's own task of the benchmark gives them
    (its YAML: belebele/_default_template_yaml, mgsm/{direct,native_cot}, global_mmlu/full, multiblimp,
    japanese_leaderboard/ja_leaderboard_jcommonsenseqa)."""
    from lm_eval.tasks import TaskManager

    before = snapshot(data_dir)
    out = task_folder(data_dir, tmp_path / "tasks")
    assert snapshot(data_dir) == before
    assert {p.name for p in out.iterdir()} == {f"{name}.yaml" for names in ALL.values() for name in names} | {
        "moejax_belebele.yaml"}
    manager = TaskManager(include_path=str(out), include_defaults=False)
    tasks = manager.load(sorted(n for names in ALL.values() for n in names))["tasks"]

    belebele = tasks["moejax_belebele_heb_Hebr"]
    docs = list(belebele.eval_docs)
    assert [d["question"] for d in docs] == [q for _, q, _, _ in BELEBELE]
    passage, question, answers, _ = BELEBELE[0]
    assert belebele.doc_to_text(docs[0]) == (f"P: {passage}\nQ: {question}\nA: {answers[0]}\nB: {answers[1]}\n"
                                             f"C: {answers[2]}\nD: {answers[3]}\nAnswer:")
    assert [belebele.doc_to_target(d) for d in docs] == [1, 3, 0]
    assert belebele.doc_to_choice(docs[0]) == ["A", "B", "C", "D"]

    direct, native = tasks["moejax_mgsm_direct_ja"], tasks["moejax_mgsm_native_cot_ja"]
    docs = list(direct.eval_docs)
    assert [d["question"] for d in docs] == [q for q, _ in MGSM_TEST]
    assert [direct.doc_to_target(d) for d in docs] == ["5", "1200", "3"]  # "1,200" read as the dataset script does
    assert direct.doc_to_text(docs[0]) == f"問題： {MGSM_TEST[0][0]}\nAnswer:"
    assert native.doc_to_text(docs[0]) == f"問題： {MGSM_TEST[0][0]}\nステップごとの答え:"
    shots = list(direct.fewshot_docs())
    assert [s["question"][:5] for s in shots] == ["問題：ロジ", "問題：コン", "問題：チョ"]  # ja's, not en's
    assert [direct.doc_to_target(s) for s in shots] == ["11", "29", "39"]
    assert native.doc_to_target(shots[1]) == "4 * 5 = 20。9 + 20 = 29。答えは29です。"
    assert direct.config.num_fewshot == native.config.num_fewshot == 2  # paper B: 2-shot
    assert [f.name for f in native._filters] == ["strict-match", "flexible-extract"]
    assert "問題：" in direct.config.generation_kwargs["until"]

    full, medical = tasks["moejax_global_mmlu_he"], tasks["moejax_global_mmlu_medical_he"]
    assert [d["question"] for d in full.eval_docs] == [q for _, _, q, _ in GLOBAL_MMLU]
    assert [d["question"] for d in medical.eval_docs] == [q for _, c, q, _ in GLOBAL_MMLU if c == "Medical"]
    doc = next(iter(medical.eval_docs))
    assert medical.doc_to_text(doc) == f"{GLOBAL_MMLU[1][2]}\nA. אחת\nB. שתיים\nC. שלוש\nD. ארבע\nAnswer:"
    assert medical.doc_to_target(doc) == "C" and medical.config.num_fewshot == 0  # paper B: 0-shot

    blimp = tasks["moejax_multiblimp_heb"]
    docs = list(blimp.eval_docs)
    assert [blimp.doc_to_choice(d) for d in docs] == [[s, w] for s, w, _ in MULTIBLIMP]  # "NA", "None" stay text
    assert {blimp.doc_to_text(d) for d in docs} == {""} and {blimp.doc_to_target(d) for d in docs} == {0}
    assert blimp.config.target_delimiter == ""

    jcqa = tasks["moejax_jcommonsenseqa"]
    docs = list(jcqa.eval_docs)
    assert [jcqa.doc_to_choice(d) for d in docs] == [c for _, c, _ in JCQA_VALID]
    assert [jcqa.doc_to_target(d) for d in docs] == [label for _, _, label in JCQA_VALID]
    assert jcqa.doc_to_text(docs[0]).endswith(f"### 入力：\n{JCQA_VALID[0][0]}\n\n### 応答：")
    assert jcqa.config.num_fewshot == 3 and len(list(jcqa.fewshot_docs())) == len(JCQA_TRAIN)


@pytest.mark.parametrize("case", ["language_absent", "benchmark_absent", "no_exemplars", "no_jglue_train",
                                  "group_empty", "mgsm_language_without_prompts", "no_data_dir"])
def test_missing_files_are_one_line_before_any_model_work(case, data_dir, tmp_path, capsys):
    task, want = {
        "language_absent": ("moejax_belebele_jpn_Jpan", f"{data_dir}/belebele/data/jpn_Jpan.jsonl"),
        "benchmark_absent": ("moejax_multiblimp_jpn", f"{data_dir}/multiblimp/jpn/data.tsv"),
        "no_exemplars": ("moejax_mgsm_direct_ja", f"{data_dir}/mgsm/exemplars.py"),
        "no_jglue_train": ("moejax_jcommonsenseqa",
                           f"{data_dir}/JGLUE/datasets/jcommonsenseqa-v1.1/train-v1.1.json"),
        "group_empty": ("moejax_multiblimp", f"{data_dir}/multiblimp/{{iso3}}/data.tsv"),
        "mgsm_language_without_prompts": ("moejax_mgsm_direct_he", "not for 'he'"),
        "no_data_dir": ("moejax_belebele_heb_Hebr", "no such folder"),
    }[case]
    if case == "benchmark_absent" or case == "group_empty":
        for p in sorted((data_dir / "multiblimp").rglob("*"), reverse=True):
            p.unlink() if p.is_file() else p.rmdir()
        (data_dir / "multiblimp").rmdir()
    if case == "no_exemplars":
        (data_dir / "mgsm" / "exemplars.py").unlink()
    if case == "no_jglue_train":
        (data_dir / "JGLUE" / "datasets" / "jcommonsenseqa-v1.1" / "train-v1.1.json").unlink()
    if case == "mgsm_language_without_prompts":
        (data_dir / "mgsm" / "mgsm_he.tsv").write_text("כמה זה 2 ועוד 3?\t5\n", encoding="utf-8")
    given = tmp_path / "nowhere" if case == "no_data_dir" else data_dir
    before = snapshot(data_dir)
    capsys.readouterr()
    out = tmp_path / "out"
    assert main(["eval", "--data-dir", str(given), "--tasks", task, "--out", str(out)]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and want in err, err
    assert case == "no_data_dir" or task in err
    assert not out.exists() and snapshot(data_dir) == before


@pytest.mark.slow  # lm-eval indexes all its own tasks first (~15 s)
def test_a_malformed_file_is_one_line(data_dir, tmp_path, capsys):
    """Found when lm-eval first loads the task, before any model work: the file and line."""
    (data_dir / "mgsm" / "mgsm_ja.tsv").write_text("一たす一は？\t2\n二たす二は？\t四\n", encoding="utf-8")
    capsys.readouterr()
    out = tmp_path / "out"
    assert main(["eval", "--data-dir", str(data_dir), "--tasks", "moejax_mgsm_direct_ja", "--out", str(out)]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "moejax_mgsm_direct_ja" in err, err
    assert f"{data_dir}/mgsm/mgsm_ja.tsv:2: expected a question, a tab and an integer answer" in err
    assert not out.exists()


@pytest.mark.parametrize("case", ["exemplars_without_numbers", "exemplars_not_python", "no_exemplars_of_language"])
def test_mgsm_exemplars_are_parsed_never_run(case, data_dir):
    exemplars = data_dir / "mgsm" / "exemplars.py"
    text, language, want = {
        "exemplars_without_numbers": (MGSM_EXEMPLARS.replace("EXEMPLAR_NUMBER_ANSWERS", "NUMBERS"), "ja",
                                      "no EXEMPLAR_NUMBER_ANSWERS"),
        "exemplars_not_python": ("MGSM_EXEMPLARS = {\n", "ja", "not the MGSM exemplars file"),
        "no_exemplars_of_language": (MGSM_EXEMPLARS, "de", "MGSM_EXEMPLARS has no 'de' exemplars"),
    }[case]
    # A statement that would leave a trace if the file were run.
    exemplars.write_text(f"open({str(data_dir / 'ran')!r}, 'w')\n" + text, encoding="utf-8")
    with pytest.raises(DataError, match=re.escape(want)):
        load_mgsm(str(data_dir / "mgsm" / "mgsm_ja.tsv"), str(exemplars), language)
    assert not (data_dir / "ran").exists()
    exemplars.write_text(f"open({str(data_dir / 'ran')!r}, 'w')\n" + MGSM_EXEMPLARS, encoding="utf-8")
    loaded = load_mgsm(str(data_dir / "mgsm" / "mgsm_ja.tsv"), str(exemplars), "ja", version=1.0, language="ja")
    assert loaded["train"]["answer_number"] == [11, 29, 39] and loaded["test"]["answer_number"] == [5, 1200, 3]
    assert not (data_dir / "ran").exists()


def test_the_medical_subset_is_the_medical_rows():
    import datasets

    rows = datasets.Dataset.from_list([{"subject_category": c, "question": q} for _, c, q, _ in GLOBAL_MMLU])
    assert medical_rows(rows)["question"] == [q for _, c, q, _ in GLOBAL_MMLU if c == "Medical"]
    with pytest.raises(DataError, match=r"no row has subject_category 'Medical' \(found \['Humanities', 'STEM'\]\)"):
        medical_rows(rows.filter(lambda row: row["subject_category"] != "Medical"))


def test_task_folder_refuses_to_write_into_the_data_and_two_copies(data_dir, tmp_path):
    with pytest.raises(SettingsError, match="inside --data-dir"):
        task_folder(data_dir, data_dir / "tasks")
    assert not (data_dir / "tasks").exists()
    write_belebele(data_dir / "belebele-github", flat=True)
    with pytest.raises(DataError, match=r"moejax_belebele_heb_Hebr: two copies .*belebele.* and .*belebele-github"):
        task_folder(data_dir, tmp_path / "tasks")
    # Names no family here gives are lm-eval's business: nothing written for them, no error.
    (data_dir / "belebele-github" / "heb_Hebr.jsonl").unlink()
    out = task_folder(data_dir, tmp_path / "only", ["moejax_choice_he", "belebele_heb_Hebr", "moejax_multiblimp"])
    assert sorted(p.name for p in out.iterdir()) == ["moejax_multiblimp_heb.yaml"]


def samples_of(out, task):
    (path,) = out.glob(f"*/samples_{task}_*.jsonl")
    return [json.loads(line) for line in path.read_text(encoding="utf-8").splitlines()]


def choice_lls(sample):
    """The log-likelihood of each choice (lm-eval logs them as text)."""
    return [float(resp[0][0]) for resp in sample["resps"]]


@pytest.mark.slow
def test_eval_scores_the_downloaded_benchmarks(data_dir, tmp_path):
    """One run of the built-in model over four benchmarks (--limit 2): each task scored the fixture's first items,
    each accuracy is the share of documents whose highest-log-likelihood choice is the fixture's answer, MultiBLiMP's
    is 1/2 as its pairs force, and the data folder is untouched."""
    before = snapshot(data_dir)
    out = tmp_path / "out"
    tasks = "moejax_belebele,moejax_multiblimp_heb,moejax_global_mmlu_medical_he,moejax_jcommonsenseqa"
    assert main(["eval", "--data-dir", str(data_dir), "--tasks", tasks, "--limit", "2", "--out", str(out)]) == 0
    assert snapshot(data_dir) == before
    (results_file,) = out.glob("*/results_*.json")
    results = json.loads(results_file.read_text())["results"]
    # The fixture's answers of the first two documents, as each task's target and as the index of the choice.
    targets = {"moejax_belebele_heb_Hebr": ["1", "3"], "moejax_multiblimp_heb": ["0", "0"],
               "moejax_global_mmlu_medical_he": ["C", "D"], "moejax_jcommonsenseqa": ["2", "0"]}
    for task, want in targets.items():
        samples = samples_of(out, task)
        assert [s["doc_id"] for s in samples] == [0, 1] and [str(s["target"]) for s in samples] == want, task
        gold = ["ABCD".index(t) if t in "ABCD" else int(t) for t in want]
        chosen = [max(range(len(choice_lls(s))), key=choice_lls(s).__getitem__) for s in samples]
        assert results[task]["acc,none"] == pytest.approx(sum(map(int.__eq__, chosen, gold)) / 2), task
    blimp = samples_of(out, "moejax_multiblimp_heb")
    for sample, (sen, wrong, _) in zip(blimp, MULTIBLIMP, strict=False):
        assert [tuple(a.values()) for a in sample["arguments"].values()] == [("", sen), ("", wrong)]
    assert results["moejax_multiblimp_heb"]["acc,none"] == 0.5
    medical = samples_of(out, "moejax_global_mmlu_medical_he")
    assert [s["doc"]["subject"] for s in medical] == ["anatomy", "virology"]
    jcqa = samples_of(out, "moejax_jcommonsenseqa")
    context = next(iter(jcqa[0]["arguments"].values()))["arg_0"]
    assert context.count("### 入力：") == 4 and JCQA_VALID[0][0] in context  # 3 shots from train, then the question
    assert "moejax_belebele" in results  # the group
    rows = {r.split(",")[0]: r.split(",")[1] for r in (out / "scores.csv").read_text().splitlines()[1:]}
    assert {t: rows[t] for t in targets} == {"moejax_belebele_heb_Hebr": "heb_Hebr", "moejax_multiblimp_heb": "heb",
                                             "moejax_global_mmlu_medical_he": "he", "moejax_jcommonsenseqa": "ja"}
    assert sorted(p.name for p in (out / "tasks").iterdir()) == sorted(
        f"{t}.yaml" for t in (*targets, "moejax_belebele"))


@pytest.mark.slow
def test_mgsm_generates_two_shot_and_scores_its_filters(data_dir, tmp_path):
    """MGSM through generation: 2-shot prompts from the file's Japanese exemplars, and each filter's exact match is
    the share of generations whose extracted answer is the TSV's number (the filters recomputed here)."""
    out = tmp_path / "out"
    assert main(["eval", "--data-dir", str(data_dir), "--tasks", "moejax_mgsm_direct_ja,moejax_mgsm_native_cot_ja",
                 "--limit", "2", "--out", str(out), "--model-args", "max_gen_toks=24"]) == 0
    (results_file,) = out.glob("*/results_*.json")
    results = json.loads(results_file.read_text())["results"]
    flexible = re.compile(r"(-?[$0-9.,]{2,})|(-?[0-9]+)")

    def plain(text):
        return text.lower().translate(str.maketrans("", "", string.punctuation))

    extract = {"remove_whitespace": lambda text: text.lstrip(),
               "flexible-extract": lambda text: next(
                   (m[0] or m[1] for m in reversed(flexible.findall(text))), "[invalid]"),
               "strict-match": lambda text: next(iter(re.findall(r"答えは(\-?[0-9\.\,]+)です。", text)), "[invalid]")}
    for task, filters in (("moejax_mgsm_direct_ja", ("remove_whitespace", "flexible-extract")),
                          ("moejax_mgsm_native_cot_ja", ("strict-match", "flexible-extract"))):
        samples = samples_of(out, task)
        for filter_name in filters:
            mine = [s for s in samples if s["filter"] == filter_name]
            assert [s["target"] for s in mine] == ["5", "1200"]
            context = next(iter(mine[0]["arguments"].values()))["arg_0"]
            assert context.count("問題：") == 3 and context.endswith(f"問題： {MGSM_TEST[0][0]}\n" + (
                "Answer:" if "direct" in task else "ステップごとの答え:"))
            assert "Question:" not in context  # the exemplars of the task's language only
            # exact_match with ignore_case and ignore_punctuation, as the task's metric_list sets it.
            right = [plain(extract[filter_name](s["resps"][0][0])) == plain(s["target"]) for s in mine]
            assert [extract[filter_name](s["resps"][0][0]) for s in mine] == [s["filtered_resps"][0] for s in mine]
            assert results[task][f"exact_match,{filter_name}"] == pytest.approx(sum(right) / len(right))


@pytest.mark.slow
def test_multiblimp_loglikelihoods_are_the_models_sentence_loglikelihoods(data_dir, tmp_path):
    """What the comparison ranks: log P(sentence | BOS) of the whole sentence, from the built-in model's own forward
    pass on one unpacked row (float32; packing puts each request in a segment of its own, so within 1e-4). Each row
    is right-padded to one width (one compiled forward; a causal model's tokens do not see what follows them)."""
    import numpy as np
    from support import log_softmax

    from moejax.data.tokenize import byte_level_tokenizer
    from moejax.models.builtin import builtin_model

    out = tmp_path / "out"
    assert main(["eval", "--data-dir", str(data_dir), "--tasks", "moejax_multiblimp_heb", "--out", str(out)]) == 0
    model, tokenizer = builtin_model(), byte_level_tokenizer()
    cases = [([tokenizer.bos_token_id, *tokenizer.encode(sentence, add_special_tokens=False)], sentence, got)
             for sample in samples_of(out, "moejax_multiblimp_heb")
             for (_, sentence), got in zip((tuple(a.values()) for a in sample["arguments"].values()),
                                           choice_lls(sample), strict=True)]
    assert cases
    width = max(len(ids) for ids, _, _ in cases)
    for ids, sentence, got in cases:
        ids_bt = np.zeros((1, width), np.int32)
        ids_bt[0, :len(ids)] = ids
        logp = log_softmax(np.asarray(model(ids_bt, (np.arange(width) < len(ids))[None].astype(np.int32)).logits[0]))
        want = float(sum(logp[t, ids[t + 1]] for t in range(len(ids) - 1)))
        assert got == pytest.approx(want, abs=1e-4), sentence
