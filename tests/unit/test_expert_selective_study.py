"""experiments/expert_selective.py follows paper C's recipe: experts are selected among the high-resource pool and
the target takes its parent's, the Top-n control ranks the parent's routing share (not the gap rule), each variant
keeps the learning rate with the lowest held-out perplexity, and the study runs end to end on the built-in model."""

from __future__ import annotations

import csv
import json
import math

import numpy as np
import pytest

import experiments.expert_selective as study
from moejax.commands.experts import ExpertsSettings, select
from moejax.errors import DataError, OutputError, RunError, SettingsError
from moejax.routing import experts as pick

# Top-2 counts of one 100-token sequence per language (so usage q = count / 200), six experts, three MoE layers. In
# the last two layers: expert 0 is used alike by all (no owner, the most shared), 1 is English's, 2 and 3 Czech's
# (leads of 0.25 and 0.05), 4 and 5 Russian's. In layer 0, outside the window, Czech leads expert 5.
WINDOW_COUNTS = {"en": [60, 60, 20, 20, 20, 20], "cs": [60, 20, 70, 30, 10, 10], "ru": [60, 20, 20, 10, 45, 45]}
LAYER0_COUNTS = {"en": [40, 40, 40, 40, 20, 20], "cs": [10, 10, 10, 10, 10, 150], "ru": [40, 40, 40, 40, 20, 20]}


def gap_record(shared: int = 2) -> tuple[dict, dict[str, np.ndarray]]:
    """The experts.json fields `moejax experts --method gap --last-layers 2` writes for en, cs, ru (through its own
    selection code), and each language's usage [layer, expert]."""
    counts = {lang: pick.Counts(np.array([[LAYER0_COUNTS[lang], WINDOW_COUNTS[lang], WINDOW_COUNTS[lang]]]),
                                np.array([100]), 2) for lang in ("en", "cs", "ru")}
    settings = ExpertsSettings(target=("en=builtin", "cs=builtin"), baseline="ru=builtin", method="gap",
                               last_layers=2, alpha=0.01, shared=shared)
    window = settings.window(3)
    _, extra = select(settings, counts, window)
    record = {**extra, "window": [1, 2], "experts_per_layer": 6, "moe_blocks": [0, 1, 2],
              "settings": {"shared": shared}}
    return record, {lang: c.usage() for lang, c in counts.items()}


def test_target_is_never_in_the_pool_and_takes_its_parents_experts():
    assert study.languages("sk", study.PAPER_POOL, None) == "cs"  # paper C's mapping
    assert study.languages("slk", ("eng", "ces"), None) == "ces"  # any code of a language, spelt as the pool
    assert study.languages("ca", study.PAPER_POOL, None) == "es"
    assert study.languages("he", ("en", "ja"), "ja") == "ja"
    with pytest.raises(SettingsError, match="holds the target --lang sk"):
        study.languages("sk", ("en", "cs", "slk_Latn"), None)
    with pytest.raises(SettingsError, match="--lang xx has no parent"):
        study.languages("xx", study.PAPER_POOL, None)
    with pytest.raises(SettingsError, match="--parent cs .* is not in --pool en,ru"):
        study.languages("sk", ("en", "ru"), None)

    record, _ = gap_record()
    assert set(record["by_label"]) == {"en", "cs", "ru"}  # the target's text never entered the selection
    assert study.languages("sk", ("en", "cs", "ru"), None) == "cs"
    usage_le = gap_record()[1]["cs"]
    chosen = study.variant_experts(record, usage_le, "cs", top_n=4)
    assert chosen["seft"] == {"1": [2, 3], "2": [2, 3]}  # Czech's gap-selected experts, the window only
    assert chosen["ssft"] == {"1": [0, 2, 3], "2": [0, 2, 3]}  # plus the 2 most used over the pool (0 and 2)
    assert chosen["all_experts"] == {"1": list(range(6)), "2": list(range(6))}
    english = study.variant_experts(record, gap_record()[1]["en"], "en", top_n=4)
    assert english["seft"] == {"1": [1], "2": [1]}  # another parent, other experts
    with pytest.raises(DataError, match="no language 'sk'"):
        study.variant_experts(record, usage_le, "sk", top_n=4)


def test_top_n_control_ranks_the_parents_routing_share(tmp_path):
    record, usage = gap_record()
    chosen = study.variant_experts(record, usage["cs"], "cs", top_n=4)
    # Czech's usage in the window: 2 (.35), 0 (.30), 3 (.15), 1 (.10): experts 0 and 1, which Czech does not own
    # by the gap rule, are in; nothing of layer 0 (outside the window), where Czech leads expert 5.
    assert chosen["seft_top"] == {"1": [0, 1, 2, 3], "2": [0, 1, 2, 3]}
    assert chosen["seft_top"] != chosen["seft"] and chosen["seft_top"] != chosen["ssft"]
    assert study.variant_experts(record, usage["cs"], "cs", top_n=1)["seft_top"] == {"1": [2], "2": [2]}
    with pytest.raises(SettingsError, match="--top-n 7: the model has 6 experts per layer"):
        study.variant_experts(record, usage["cs"], "cs", top_n=7)

    # experts.csv as `moejax experts` writes it: the parent's usage is read back per (layer, expert).
    path = tmp_path / "experts.csv"
    with open(path, "w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=["layer", "expert", "usage_en", "usage_cs", "usage_ru"])
        writer.writeheader()
        writer.writerows({"layer": layer, "expert": e, **{f"usage_{k}": q[layer, e] for k, q in usage.items()}}
                         for layer in range(3) for e in range(6))
    np.testing.assert_array_equal(study.parent_usage(path, "cs", 3, 6), usage["cs"])


def test_learning_rate_is_picked_by_validation_perplexity():
    rows = [{"lr": 1e-5, "val_ppl": 30.0, "train_loss": 0.1}, {"lr": 1e-4, "val_ppl": 12.0, "train_loss": 3.0},
            {"lr": 4e-4, "val_ppl": 12.0, "train_loss": 2.0}, {"lr": 1e-3, "val_ppl": math.inf},
            {"lr": 4e-3, "val_ppl": math.nan}]
    assert study.pick_lr(rows) == 1e-4  # the lowest perplexity, the first of equals; never the lowest train loss
    assert study.pick_lr(rows[3:]) is None  # diverged or unreadable runs are never picked
    assert study.perplexity(math.log(12.0)) == pytest.approx(12.0, rel=1e-12)
    assert study.perplexity(800.0) == math.inf


def test_a_sweep_run_reads_the_targets_last_held_out_loss(tmp_path, monkeypatch):
    """A finished run's perplexity is exp of the target's loss at the last step; a stopped run is inf, recorded."""
    def fake_train(settings):
        settings.out.mkdir(parents=True)
        (settings.out / "eval.csv").write_text("step,eval_loss_sk,eval_loss_en\n0,3.0,2.0\n2,2.5,2.1\n")
        if settings.lr > 1e-3:
            raise RunError("step 2: the loss or the gradient is not finite (loss=nan)\nmore")

    monkeypatch.setattr(study, "train", fake_train)
    settings = study.TrainSettings(lr=1e-4, out=tmp_path / "a")
    done = study.train_one(settings, 1e-4, "seft", "sk")
    assert done["status"] == "done" and done["val_ppl"] == pytest.approx(math.exp(2.5))
    assert done["val_ppl_start"] == pytest.approx(math.exp(3.0)) and done["held_out_loss_en"] == 2.1
    failed = study.train_one(study.TrainSettings(lr=4e-3, out=tmp_path / "b"), 4e-3, "seft", "sk")
    assert failed["val_ppl"] == math.inf and failed["status"].startswith("failed: step 2") and "\n" not in \
        failed["status"]
    assert study.pick_lr([failed, done]) == 1e-4


def test_default_tasks_are_the_targets_multiblimp_and_belebele(tmp_path):
    tasks = study.default_tasks("sk")
    assert tasks == ("moejax_multiblimp_slk", "moejax_belebele_slk_Latn")
    assert study.fewshot_groups((*tasks, "moejax_choice_he")) == {0: ["moejax_multiblimp_slk"],
                                                                  4: ["moejax_belebele_slk_Latn"],
                                                                  None: ["moejax_choice_he"]}
    assert study.default_tasks("slk_Latn") == tasks and study.default_tasks("ar")[0] == "moejax_multiblimp_arb"
    with pytest.raises(SettingsError, match="--lang xx: not a language FLORES-200 has"):
        study.default_tasks("xx")
    offline = pytest.importorskip("moejax.evaluation.offline",
                                  reason="moejax.evaluation.offline (the --data-dir task writer) is not there yet")
    write_benchmarks(tmp_path / "data", "slk", "slk_Latn")
    folder = offline.task_folder(tmp_path / "data", tmp_path / "tasks", list(tasks))  # the names it gives
    assert sorted(p.name for p in folder.glob("moejax_*_*.yaml")) == sorted(f"{t}.yaml" for t in tasks)


def write_benchmarks(root, iso3: str, flores: str, rows: int = 6) -> None:
    """MultiBLiMP and Belebele files in their published layouts, `rows` items each."""
    (root / "multiblimp" / iso3).mkdir(parents=True)
    (root / "multiblimp" / iso3 / "data.tsv").write_text(
        "sen\twrong_sen\n" + "".join(f"the cat sleeps {i}\tthe cat sleep {i}\n" for i in range(rows)))
    (root / "belebele" / "data").mkdir(parents=True)
    (root / "belebele" / "data" / f"{flores}.jsonl").write_text("".join(
        json.dumps({"flores_passage": f"Passage {i}.", "question": "Which?", "mc_answer1": "a", "mc_answer2": "b",
                    "mc_answer3": "c", "mc_answer4": "d", "correct_answer_num": str(i % 4 + 1)}) + "\n"
        for i in range(rows)))


def plan(argv: list[str]) -> study.Plan:
    return study.Plan(study.parser().parse_args(argv))


def test_protocol_defaults_overrides_and_bad_flags(tmp_path):
    demo = plan([])
    assert (demo.target, demo.pool, demo.parent, demo.lrs) == ("he", ("en", "ja"), "en", study.PAPER_LRS)
    assert demo.tasks == ("moejax_choice_he",) and "bundled toy task" in demo.task_source
    rows = {r["choice"]: r for r in demo.protocol()}
    assert rows["learning rates"]["source"] == "paper C grid"
    assert rows["routers"]["value"] == "trained with the selected experts"
    assert rows["selection pool (high-resource; the target never in it)"]["source"] == "built-in demo"

    real = ["--model", str(tmp_path), "--lang", "sk", "--select-data", str(tmp_path), "--data", "sk=a.txt:1",
            "--eval-data", "sk=b.txt,en=c.txt"]
    paper = plan([*real, "--data-dir", str(tmp_path)])
    assert (paper.pool, paper.parent, paper.tasks) == (study.PAPER_POOL, "cs", study.default_tasks("sk"))
    assert (paper.eval_label, plan([*real[:-2], "--eval-data", "slk=b.txt", "--tasks", "none"]).eval_label) == (
        "sk", "slk")  # eval.csv's column of the target, as --eval-data labels it
    rows = {r["choice"]: r for r in plan([*real, "--lrs", "1e-4,1e-3", "--freeze-routers", "--tasks", "none", "--",
                                          "--lb-coef", "0.01"]).protocol()}
    assert rows["learning rates"] == {"choice": "learning rates", "value": "0.0001,0.001", "source": "given (--lrs)"}
    assert rows["routers"]["source"] == "given, not paper C" and rows["auxiliary losses"]["source"] == "given"
    assert rows["parent language (its experts go to the target)"]["source"] == "paper C mapping"

    for argv, message in [
        ([*real], "--data-dir DIR"),
        (["--model", str(tmp_path), "--lang", "sk", "--data-dir", str(tmp_path)], "--select-data"),
        ([*real, "--pool", "en,cs,sk"], "holds the target --lang sk"),
        ([*real, "--eval-data", "en=c.txt", "--tasks", "none"], "no held-out text for the target sk"),
        ([*real[:4], "--select-data", "en=a,cs=b", "--tasks", "none"], "missing ar,es,fi,hi,ru"),
        ([*real[:4], "--select-data", "en=a,cs=b,sk=c", "--pool", "en,cs", "--tasks", "none"], "sk not in the pool"),
        ([*real, "--tasks", "none", "--variants", "seft,lora"], "--variants 'seft,lora'"),
        ([*real, "--tasks", "none", "--lrs", "1e-4,0"], "distinct positive"),
        (["--data", "he=a.txt:1"], "go together"),
    ]:
        with pytest.raises(SettingsError, match=message):
            plan(argv)


def test_study_refuses_before_any_work(tmp_path):
    with pytest.raises(SettingsError, match="lr, out are set by the study"):
        study.run(study.parser().parse_args(["--out", str(tmp_path / "o"), "--", "--lr", "1e-3", "--out", "x"]))
    foreign = tmp_path / "mine"
    foreign.mkdir()
    (foreign / "notes.txt").write_text("keep me")
    with pytest.raises(OutputError, match="a directory moejax did not write"):
        study.run(study.parser().parse_args(["--out", str(foreign)]))
    assert (foreign / "notes.txt").read_text() == "keep me"


@pytest.mark.slow
def test_end_to_end_on_the_builtin_model(tmp_path):
    """Two variants (selected experts with their routers; complete blocks), two learning rates, two steps each,
    then MultiBLiMP 0-shot and Belebele 4-shot of the picked runs from local files."""
    pytest.importorskip("moejax.evaluation.offline",
                        reason="moejax.evaluation.offline (the --data-dir task writer) is not there yet")
    write_benchmarks(tmp_path / "data", "heb", "heb_Hebr")
    out = tmp_path / "study"
    study.main(["--lrs", "1e-3,4e-3", "--steps", "2", "--seq-len", "32", "--batch-size", "2", "--limit", "2",
                "--variants", "seft,complete_layers", "--data-dir", str(tmp_path / "data"), "--out", str(out)])
    assert json.loads((out / ".moejax-output.json").read_text())["command"] == "expert-selective"
    selection = json.loads((out / "selection" / "selected_experts.json").read_text())
    assert sorted(selection) == ["en", "ja"]  # the pool; the target he never in it
    assert json.loads((out / "target_experts.json").read_text())["he"]["seft"] == selection["en"]["seft"]

    sweep = list(csv.DictReader((out / "sweep.csv").open()))
    assert [(r["variant"], float(r["lr"])) for r in sweep] == [("seft", 1e-3), ("seft", 4e-3),
                                                               ("complete_layers", 1e-3), ("complete_layers", 4e-3)]
    for variant in ("seft", "complete_layers"):
        runs = [r for r in sweep if r["variant"] == variant]
        best = min(runs, key=lambda r: float(r["val_ppl"]))
        assert [r["chosen"] for r in runs] == [str(r is best) for r in runs]
        for r in runs:
            run_dir = out / variant / f"lr_{float(r['lr']):g}"
            assert (run_dir / "checkpoint").is_dir() == (r is best)  # the others' checkpoints removed
            settings = json.loads((run_dir / "run.json").read_text())
            assert settings["train"]["learning_rate"] == float(r["lr"]) and settings["train"]["lb_coef"] == 0
        assert (out / variant / "eval_0shot" / "scores.csv").is_file()
        assert (out / variant / "eval_4shot" / "scores.csv").is_file()
    seft_run = json.loads((out / "seft" / "lr_0.001" / "run.json").read_text())["train"]
    assert seft_run["train_routers"] and seft_run["route_to_trained"]

    rows = {r["variant"]: r for r in csv.DictReader((out / "selective.csv").open())}
    assert float(rows["seft"]["share"]) < float(rows["complete_layers"]["share"])
    assert "moejax_belebele_heb_Hebr (acc)" in rows["seft"] and "moejax_multiblimp_heb (acc)" in rows["seft"]
    text = (out / "summary.md").read_text()
    assert "| learning rates | 0.001,0.004 | given (--lrs) |" in text
    assert "paper C (MultiBLiMP 0-shot, Belebele 4-shot, from --data-dir)" in text
    assert "proves nothing about real models" in text and (out / "selective.png").is_file()
