"""experiments.controlled_imbalance: the study end to end at a tiny size (interrupted between runs and resumed without
retraining; its table recomputed with plain numpy from the routing statistics each run saved; the shuffled-language
control showing no effect), its statistics on planted and on null data, its conditions and its bad-input rule."""

from __future__ import annotations

import csv
import dataclasses
import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from experiments.controlled_imbalance import Condition, ImbalanceSettings, Side, analyse, conditions, main, split
from moejax.data.corpus import read_corpus
from moejax.data.transliterate import HEBREW_LETTERS, dominant_script, transliterate
from moejax.parallel.mesh import simulated_devices_env
from moejax.routing import imbalance as I
from moejax.routing import metrics as M


def tiny_config(path: Path) -> Path:
    """The built-in model's architecture at a tiny width: 6 MoE layers (groups of 2), 8 experts, top-2."""
    from moejax.models.builtin import builtin_config

    config = dataclasses.replace(builtin_config(), hidden_size=32, num_hidden_layers=6, num_attention_heads=2,
                                 num_key_value_heads=1, head_dim=16, intermediate_size=64, moe_intermediate_size=16,
                                 num_experts=8, num_experts_per_tok=2)
    path.write_text(json.dumps(config.to_hf()))
    return path


def expected_metrics(npz: Path) -> dict[str, np.ndarray]:
    """Every table metric per MoE layer [l] from one run's saved statistics, written out with numpy alone (the
    definitions of docs/metrics.md), not through moejax."""
    saved = np.load(npz)
    k = int(saved["k"])
    out = {}
    for side in ("minority", "majority"):
        counts_le = saved[f"{side}_counts_qle"].sum(axis=0).astype(float)
        f_le = counts_le / counts_le.sum(axis=1, keepdims=True)
        with np.errstate(divide="ignore", invalid="ignore"):
            out[f"entropy_{side}"] = -np.nansum(f_le * np.log2(f_le), axis=1)
        x = np.sort(counts_le, axis=1)
        n = x.shape[1]
        out[f"gini_{side}"] = (2 * (np.arange(1, n + 1) * x).sum(1) / (n * x.sum(1))) - (n + 1) / n
        out[f"f_{side}"] = f_le
        out[f"pbar_{side}"] = saved[f"{side}_probs_qle"].sum(axis=0) / saved[f"{side}_tokens_q"].sum()
    out["entropy_gap"] = out["entropy_minority"] - out["entropy_majority"]
    out["gini_gap"] = out["gini_minority"] - out["gini_majority"]
    a, b = out.pop("pbar_minority"), out.pop("pbar_majority")
    lsi = (a - b) / (a + b)
    out["lsi_minority"] = (lsi > 0.1).mean(axis=1)
    out["lsi_shared"] = (np.abs(lsi) <= 0.1).mean(axis=1)
    p, q = out.pop("f_minority"), out.pop("f_majority")
    m = (p + q) / 2
    with np.errstate(divide="ignore", invalid="ignore"):
        out["jsd"] = (np.nansum(p * np.log(p / m), axis=1) + np.nansum(q * np.log(q / m), axis=1)) / 2
    tops = [[set(sorted(range(len(row)), key=lambda e, row=row: (-row[e], e))[:k]) for row in side] for side in (p, q)]
    out["topk_overlap"] = np.array([len(x & y) / k for x, y in zip(*tops, strict=True)])
    return out


@pytest.mark.slow
def test_end_to_end_interrupted_and_resumed(tmp_path):
    """Two ratios x two seeds, plus the shuffled-language control, from a directory outside the repository: killed
    once two runs have finished, then run again. The finished runs are kept as they were, the rest train, and every
    table estimate equals the metrics recomputed from the saved statistics."""
    out = tmp_path / "study"
    args = ["--model-config", str(tiny_config(tmp_path / "tiny.json")), "--ratios", "1,4", "--seeds", "0,1",
            "--controls", "shuffled", "--steps", "3", "--batch-size", "2", "--seq-len", "32", "--bootstrap", "200",
            "--out", str(out)]
    command = [sys.executable, "-m", "experiments.controlled_imbalance", *args]
    first = subprocess.Popen(command, cwd=tmp_path, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    seen = []
    for line in first.stderr:  # killed as soon as the second run has finished
        seen.append(line)
        if "run 2/8" in line and "measured in" in line:
            first.kill()
            break
    first.wait(timeout=600)
    assert any("run 2/8" in line and "measured in" in line for line in seen), "".join(seen[-20:])
    assert any("run 1/8 main 1:1 seed 0" in line and "elapsed" in line for line in seen)
    finished = [out / "main" / "ratio_1" / f"seed_{seed}" for seed in (0, 1)]
    stamps = {p: p.stat().st_mtime_ns for d in finished for p in d.rglob("*") if p.is_file()}
    assert any(p.name == "heldout_routing.npz" for p in stamps) and not (out / "summary.md").exists()

    again = subprocess.run(command, cwd=tmp_path, capture_output=True, text=True, timeout=600)
    assert again.returncode == 0, again.stderr[-3000:]
    assert again.stderr.count("done earlier, kept") == 2, again.stderr[-3000:]
    assert {p: p.stat().st_mtime_ns for p in stamps} == stamps  # not trained, measured or rewritten again

    rows = list(csv.DictReader(open(out / "table.csv")))
    assert {(r["condition"], r["ratio"]) for r in rows} == {(c, r) for c in ("main", "shuffled")
                                                           for r in ("1:1", "1:4")}
    for condition in ("main", "shuffled"):
        for ratio in (1, 4):
            per_seed = [expected_metrics(out / condition / f"ratio_{ratio}" / f"seed_{seed}" / "heldout_routing.npz")
                        for seed in (0, 1)]
            expected = {name: np.mean([m[name] for m in per_seed], axis=0) for name in I.METRICS}
            table = {r["layer"]: r for r in rows if r["condition"] == condition and r["ratio"] == f"1:{ratio}"}
            for name in I.METRICS:
                got = np.array([float(table[str(layer)][name]) for layer in range(6)])
                np.testing.assert_allclose(got, expected[name], rtol=1e-9, atol=1e-12, err_msg=f"{condition} {name}")
                # groups: layers 0-1 early, 2-3 middle, 4-5 deep (a third of six)
                for group, layers in (("early", [0, 1]), ("middle", [2, 3]), ("deep", [4, 5])):
                    assert float(table[group][name]) == pytest.approx(expected[name][layers].mean(), abs=1e-12)
                    assert float(table[group][f"{name}_low"]) <= float(table[group][f"{name}_high"])

    slopes = {(r["condition"], r["metric"], r["layers"]): r for r in csv.DictReader(open(out / "slopes.csv"))}
    shuffled = slopes[("shuffled", "entropy_gap", "deep")]
    assert float(shuffled["low"]) <= 0 <= float(shuffled["high"]), shuffled  # no effect: the interval holds 0
    deep_gap = [np.mean([expected_metrics(out / "main" / f"ratio_{r}" / f"seed_{s}" / "heldout_routing.npz")
                         ["entropy_gap"][4:]]) for r in (1, 4) for s in (0, 1)]
    slope = np.polyfit([0, 0, 2, 2], deep_gap, 1)[0]  # least squares over the four runs, x = log2(ratio)
    assert float(slopes[("main", "entropy_gap", "deep")]["slope_per_doubling"]) == pytest.approx(slope, abs=1e-12)
    summary = (out / "summary.md").read_text()
    assert "Per doubling of the ratio" in summary and "MoE layers 4-5 of 0-5" in summary and "shuffled" in summary
    assert (out / "collapse_vs_ratio.png").stat().st_size > 10_000
    record = json.loads((out / "study.json").read_text())
    assert record["steps"] == 3 and sorted(record["data"]) == ["en", "he"] and record["model"]["num_experts"] == 8


@pytest.mark.slow
def test_nemotron_h_on_a_mesh_in_bfloat16(tmp_path):
    """The other architecture, with the scale options: a tiny Nemotron-H trained and measured data-parallel over two
    simulated CPU devices in bfloat16, one seed."""
    from experiments.controlled_imbalance import NEMOTRON_H_SMALL

    config = dict(NEMOTRON_H_SMALL, hidden_size=32, hybrid_override_pattern="ME*EME", num_attention_heads=2,
                  num_key_value_heads=1, mamba_num_heads=2, mamba_head_dim=16, chunk_size=16, n_routed_experts=8,
                  num_experts_per_tok=2, moe_intermediate_size=16, moe_shared_expert_intermediate_size=16)
    (tmp_path / "nemotron.json").write_text(json.dumps(config))
    out = tmp_path / "study"
    done = subprocess.run(
        [sys.executable, "-m", "experiments.controlled_imbalance", "--model-config", str(tmp_path / "nemotron.json"),
         "--ratios", "1,4", "--seeds", "0", "--controls", "none", "--steps", "2", "--batch-size", "2", "--seq-len",
         "32", "--bootstrap", "50", "--mesh", "data=2", "--dtype", "bfloat16", "--out", str(out)],
        cwd=tmp_path, capture_output=True, text=True, timeout=1200,
        env=simulated_devices_env(2))
    assert done.returncode == 0, done.stderr[-3000:]
    run = json.loads((out / "main" / "ratio_4" / "seed_0" / "run.json").read_text())
    assert run["mesh"] == "data=2" and run["train"]["compute_dtype"] == "bfloat16"
    summary = (out / "summary.md").read_text()
    assert "nemotron_h" in summary and "3 MoE layers of 8 experts, top-2" in summary and "mesh data=2" in summary
    rows = list(csv.DictReader(open(out / "table.csv")))
    assert {r["layer"] for r in rows} == {"0", "1", "2", "early", "middle", "deep"}


def synthetic(rng, alpha_l: np.ndarray, q: int = 16, experts: int = 8, k: int = 2, tokens: int = 60) -> I.HeldOut:
    """A run whose minority routes layer l by a distribution over experts peaked by alpha_l (0: uniform) and whose
    majority routes uniformly: counts drawn per held-out sequence."""
    def side(alphas):
        p_le = np.exp(-np.outer(alphas, np.arange(experts)))
        p_le /= p_le.sum(axis=1, keepdims=True)
        counts = np.stack([[rng.multinomial(tokens * k, p) for p in p_le] for _ in range(q)])
        return counts, counts / k, np.full(q, tokens)

    return I.HeldOut(*side(alpha_l), *side(np.zeros_like(alpha_l)), k=k)


def settings_for(**kw) -> ImbalanceSettings:
    return ImbalanceSettings(**{"seeds": (0, 1, 2), "bootstrap": 300, **kw})


def study_of(ratios, make) -> tuple[list[Condition], dict]:
    side = Side("xx", "xx", (), ())
    cond = Condition("main", side, side, 1e-3, tuple(ratios), True)
    return [cond], {("main", r, s): make(r, s) for r in ratios for s in (0, 1, 2)}


def test_slope_finds_a_planted_collapse_and_not_a_null_one():
    """Planted: the minority's deep layers (the last two of six) concentrate by 0.15 per doubling of the ratio, with
    seed noise; the slope's interval must exclude 0 with the collapse's sign. Null: the same noise and no trend; the
    interval must hold 0. Shallow layers carry no trend either way."""
    ratios = (1, 4, 16, 64)
    rng = np.random.default_rng(5)
    noise = {s: rng.normal(0, 0.05) for s in range(3)}

    def planted(r, s):
        return synthetic(rng, np.r_[np.zeros(4), np.full(2, 0.15 * np.log2(r) + 0.2 + noise[s])])

    def null(r, s):
        return synthetic(rng, np.r_[np.zeros(4), np.full(2, 0.6 + noise[s] + rng.normal(0, 0.05))])

    for make, grows in ((planted, True), (null, False)):
        conds, held = study_of(ratios, make)
        results = analyse(conds, settings_for(ratios=ratios), held)
        low, high = I.percentile_interval(results["slopes"][("main", "entropy_gap", "deep")])
        assert (high < 0) == grows and (low <= 0 <= high) == (not grows), (make.__name__, low, high)
        gini_low, gini_high = I.percentile_interval(results["slopes"][("main", "gini_gap", "deep")])
        assert (gini_low > 0) == grows
        early_low, early_high = I.percentile_interval(results["slopes"][("main", "entropy_gap", "early")])
        assert early_low <= 0 <= early_high


def test_hierarchical_rows_and_slopes_against_direct_computation():
    rng = np.random.default_rng(0)
    runs = [synthetic(rng, np.array([0.0, 0.5, 1.0])) for _ in range(3)]
    seeds_bj = I.seed_draws(3, 50, np.random.default_rng(1))
    assert (seeds_bj[0] == [0, 1, 2]).all() and seeds_bj.shape == (51, 3)
    rows = I.hierarchical_metrics(runs, seeds_bj, np.random.default_rng(2), paired=True)
    for j, run in enumerate(runs):  # row 0: each run as measured, pooled over its sequences
        tokens = run.minority_tokens_q.sum()  # both sides: 16 sequences of 60 tokens
        pooled = I.layer_metrics(run.minority_counts_qle.sum(0), run.minority_probs_qle.sum(0) / tokens,
                                 run.majority_counts_qle.sum(0), run.majority_probs_qle.sum(0) / tokens, run.k)
        for name in I.METRICS:
            np.testing.assert_allclose(rows[name][0, j], pooled[name], rtol=1e-12)
    assert not np.allclose(rows["entropy_minority"][1:], rows["entropy_minority"][:1])  # resamples differ
    # slopes: exact on a line, per bootstrap row
    y_rjb = np.stack([np.full((2, 4), 3.0 - 0.5 * x) + np.arange(4) for x in (0.0, 2.0, 6.0)])
    np.testing.assert_allclose(I.slopes(np.array([0.0, 2.0, 6.0]), y_rjb), -0.5)
    # the vectorised top-K overlap equals metrics.topk_overlap's, ties to the lower index included
    f_a, f_b = np.array([0.3, 0.3, 0.2, 0.2, 0.0]), np.array([0.0, 0.3, 0.3, 0.2, 0.2])
    assert I.top_k_overlap(f_a, f_b, 2) == M.topk_overlap(f_a, f_b, 2)[1] == 0.5
    groups = {name: idx.tolist() for name, idx in I.layer_groups(8, 1 / 3).items()}
    assert groups == {"early": [0, 1, 2], "middle": [3, 4], "deep": [5, 6, 7]}
    assert {name: idx.tolist() for name, idx in I.layer_groups(2, 1 / 3).items()} == {"early": [0], "deep": [1]}


def test_conditions_split_transliterate_and_relabel():
    corpus = read_corpus(None, ["he", "en", "ja"])
    train, held = split(corpus["en"], 0.2)
    assert len(held) == 24 and len(train) == 96 and not set(train) & set(held)
    conds = {c.name: c for c in conditions(ImbalanceSettings(), corpus["he"], corpus["en"], corpus.parallel)}
    assert list(conds) == ["main", "lb0", "shuffled", "script"]
    main_, script, shuffled = conds["main"], conds["script"], conds["shuffled"]
    assert main_.minority.heldout[3] == corpus["he"][19] and main_.majority.heldout[3] == corpus["en"][19]
    assert conds["lb0"].lb_coef == 0 and main_.lb_coef > 0 and conds["lb0"].ratios == (1.0, 64.0)
    assert script.minority.label == "he-Latn" and script.paired
    assert [transliterate(t, "Hebr") for t in main_.minority.heldout] == list(script.minority.heldout)
    assert not any("\u0590" <= ch <= "\u05ff" for t in script.minority.train for ch in t)
    assert shuffled.minority.label == "en-as-he" and shuffled.majority.label == "en" and not shuffled.paired
    assert not set(shuffled.minority.train) & set(shuffled.majority.train)
    assert set(shuffled.minority.train) | set(shuffled.majority.train) == set(main_.majority.train)
    # Japanese: no transliteration table, so no script control by default, and an error when asked for
    japanese = conditions(ImbalanceSettings(minority="ja"), corpus["ja"], corpus["en"], True)
    assert [c.name for c in japanese] == ["main", "lb0", "shuffled"]
    with pytest.raises(Exception, match="not in a script moejax can transliterate"):
        conditions(ImbalanceSettings(minority="ja", controls=("script",)), corpus["ja"], corpus["en"], True)


def test_transliteration_table():
    assert all(ch in HEBREW_LETTERS for ch in map(chr, range(0x05D0, 0x05EB)))  # every letter, finals included
    assert all(value.isascii() for value in HEBREW_LETTERS.values())
    assert transliterate("שָׁלוֹם, עוֹלָם־ו״ל 12", "Hebr") == 'shlwm, `wlm-w"l 12'  # points dropped, maqaf, gershayim
    assert transliterate("\ufb2a", "Hebr") == "sh"  # a presentation form decomposed first
    assert transliterate("hello", "Hebr") == "hello"
    assert dominant_script(["שלום עולם world"]) == "Hebr" and dominant_script(["hello world שלום"]) is None
    assert dominant_script(["日本語"]) is None


@pytest.mark.parametrize("args, expected", [
    (["--ratios", "1,0"], "--ratios must be > 0"),
    (["--ratios", "4"], "at least two ratios"),
    (["--seeds", "0,0"], "names a value twice"),
    (["--controls", "lb0,typo"], "--controls lb0,typo"),
    (["--controls", "lb0", "--lb-coef", "0"], "--lb-coef 0 already does"),
    (["--data", "/nonexistent/corpus"], "/nonexistent/corpus"),
    (["--minority", "he=/nonexistent/he.txt"], "/nonexistent/he.txt: no such file"),
    (["--minority", "eng_Latn"], "are the same language"),
    (["--minority", "h e"], "--minority 'h e'"),
])
def test_bad_input_is_one_line_and_exit_2(tmp_path, capsys, args, expected):
    with pytest.raises(SystemExit) as exit_:
        main([*args, "--out", str(tmp_path / "out")])
    err = capsys.readouterr().err.strip()
    assert exit_.value.code == 2 and len(err.splitlines()) == 1 and expected in err, err
    assert not (tmp_path / "out").exists()


def test_refuses_a_folder_that_is_not_its_own(tmp_path, capsys):
    mine = tmp_path / "mine"
    mine.mkdir()
    (mine / "notes.md").write_text("keep")
    with pytest.raises(SystemExit) as exit_:
        main(["--out", str(mine)])
    err = capsys.readouterr().err.strip()
    assert exit_.value.code == 2 and len(err.splitlines()) == 1 and "notes.md" in err
    assert os.listdir(mine) == ["notes.md"]


def test_refuses_to_continue_a_study_of_other_settings(tmp_path, capsys):
    """A directory of this study started with another budget: its finished runs would not belong with new ones."""
    from moejax.io import resumable_directory

    out = resumable_directory(tmp_path / "study", "controlled_imbalance")
    (out / "study.json").write_text(json.dumps({"steps": 5}))
    with pytest.raises(SystemExit) as exit_:
        main(["--out", str(out)])
    err = capsys.readouterr().err.strip()
    assert exit_.value.code == 2 and len(err.splitlines()) == 1 and "other settings" in err and "steps" in err, err
    assert sorted(os.listdir(out)) == [".moejax-study.json", "study.json"]
