"""`moejax parity` end to end on tiny save_pretrained checkpoints of both architectures (every parameter random).

What is asserted, and against what:
- float32: the command passes, per-token KL ~ 0 (<= 1e-9 nats; observed ~1e-13), 100% top-1 and expert-set
  agreement, every block's hidden states within 1e-5 relative, the same usage entropy and Gini on both sides.
- one parameter of one block corrupted on the moejax side (the edit_model hook): the command fails, and the
  per-block table names that block as where drift starts (all earlier blocks stay within 1e-5). Its KL
  figures equal an independent recomputation from the two models' logits (torch.log_softmax, float64).
- bfloat16 checkpoints run in bfloat16 on both sides pass with the bfloat16 default tolerances, and the
  KL is > 0 (both sides really ran in 16 bits).
- the exit status gates a job: 0 on pass, 1 when a tolerance fails (--tol), 2 on bad input, which leaves
  no OUT behind.
"""

from __future__ import annotations

import csv
import json

import numpy as np
import pytest
import torch
import transformers

import moejax
from moejax.cli import main
from moejax.data.tokenize import HFTokenizer
from moejax.parity import RouterTally, parity, token_kl
from moejax.reference import make_checkpoint, randomize, save_byte_tokenizer, tiny_qwen3_config

RUN = ["--seq-len", "128", "--batch-size", "2", "--max-tokens", "384", "--quiet"]
TEXT = ("The river rises in spring and the fields turn green; farmers watch the water and the sky. "
        "הנהר עולה באביב והשדות מוריקים. 川は春に増水し、畑は緑になる。") * 3


def _checkpoint(tmp_path_factory, arch, save_dtype=None):
    path = tmp_path_factory.mktemp(f"{arch}-{save_dtype}") / "model"
    make_checkpoint(arch, path, seed=17, vocab_size=259, save_dtype=save_dtype)
    save_byte_tokenizer(path)
    return path


@pytest.fixture(scope="module", params=["qwen3_moe", "nemotron_h"])
def fp32(request, tmp_path_factory):
    return request.param, _checkpoint(tmp_path_factory, request.param)


def read_csv(path):
    with open(path, encoding="utf-8") as f:
        return list(csv.DictReader(f))


def test_fp32_passes_with_kl_zero_and_identical_routing(fp32, tmp_path, capsys):
    arch, path = fp32
    out = tmp_path / "out"
    assert main(["parity", "--model", str(path), "--out", str(out), *RUN]) == 0
    printed = capsys.readouterr().out
    assert "verdict: PASS" in printed
    summary = json.loads((out / "summary.json").read_text())
    assert summary["dtype"] == summary["reference_dtype"] == "float32"
    assert summary["tokens"] == 384 and [g["group"] for g in summary["groups"]] == ["en", "he", "ja"]
    overall = summary["overall"]
    assert overall["kl_mean"] <= 1e-9 and overall["kl_max"] <= 1e-9
    assert overall["top1_agreement"] == 1.0 and overall["expert_set_agreement_min"] == 1.0
    assert summary["first_drift_block"] is None
    layers = read_csv(out / "layers.csv")
    assert [r["kind"] for r in layers] == list(moejax.load_config(path).layer_kinds)
    for row in layers:
        assert float(row["hidden_relative_diff"]) <= 1e-5
        if row["moe_layer"]:
            assert float(row["expert_set_agreement"]) == 1.0 and float(row["expert_jaccard_mean"]) == 1.0
            assert float(row["router_logit_max_abs_diff"]) <= 1e-5
            assert row["usage_entropy_bits_reference"] == row["usage_entropy_bits_moejax"]
            assert row["gini_reference"] == row["gini_moejax"]
    assert sum(1 for r in layers if r["moe_layer"]) == len(moejax.load_config(path).moe_layers)
    assert (out / "drift_per_layer.png").stat().st_size > 10_000
    assert {r["group"] for r in read_csv(out / "groups.csv")} == {"all", "en", "he", "ja"}


def _corrupt_block(block: int):
    """An edit_model hook scaling one parameter of `block` (its norm weight) by 1.5."""
    def edit(model):
        for unit, ids in zip(model.layers.units, model.layers.layer_ids, strict=True):
            for position, repeats in enumerate(ids):
                if block in repeats:
                    layer = unit[position]
                    # Qwen3-MoE's pre-attention norm, Nemotron-H's block norm
                    norm = layer.input_layernorm if hasattr(layer, "input_layernorm") else layer.norm
                    weight = norm.weight
                    weight[...] = weight[...].at[repeats.index(block)].multiply(1.5)
                    return
        raise AssertionError(f"block {block} not found")
    return edit


@pytest.mark.parametrize("block", [2])
def test_corrupted_parameter_fails_and_points_at_its_block(fp32, tmp_path, block):
    arch, path = fp32
    text = tmp_path / "text.txt"
    text.write_text(TEXT, encoding="utf-8")
    result = parity(path, tmp_path / "out", text=text, seq_len=128, batch_size=2, max_tokens=128,
                    edit_model=_corrupt_block(block), show_progress=False)
    assert not result.passed
    assert result.summary["first_drift_block"]["block"] == block
    assert all(r["hidden_relative_diff"] <= 1e-5 for r in result.layers[:block])
    assert result.layers[block]["hidden_relative_diff"] > 1e-2
    failed = {c["check"] for c in result.summary["checks"] if not c["passed"]}
    assert {"kl_mean", "hidden_relative"} <= failed

    # The KL figures against an independent recomputation: both models run directly on the same tokens.
    ids = np.array([HFTokenizer(path).encode(TEXT.strip())[:128]])
    overrides = {"dt_floor": "time_step_min"} if arch == "nemotron_h" else {}
    model = moejax.from_pretrained(path, **overrides)
    _corrupt_block(block)(model)
    ours = torch.from_numpy(np.asarray(model(ids).logits, np.float64))
    reference = transformers.AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32).eval()
    with torch.no_grad():
        theirs = reference(torch.from_numpy(ids)).logits.double()
    lp, lq = torch.log_softmax(theirs, -1), torch.log_softmax(ours, -1)
    kl = (lp.exp() * (lp - lq)).sum(-1).numpy().ravel()
    np.testing.assert_allclose(result.summary["overall"]["kl_mean"], kl.mean(), rtol=1e-6)
    np.testing.assert_allclose(result.summary["overall"]["kl_max"], kl.max(), rtol=1e-6)
    top1 = (theirs.argmax(-1) == ours.argmax(-1)).double().mean().item()
    assert result.summary["overall"]["top1_agreement"] == pytest.approx(top1)


def test_near_tie_flips_are_told_apart_from_errors(tmp_path):
    """Experts 4 and 5 get identical router weights in the last layer, so their logits tie (to float32
    rounding). moejax's copy of expert 5's router column is scaled by 1 -+ 1e-6 (logits move by ~1e-6,
    float32 noise), so it breaks the ties towards expert 4, then towards 5; transformers breaks them its own
    way, so one of the two runs flips wherever the pair straddles the top-k boundary. Those are near-tie
    flips: the runs pass, the positions from each flip onwards are not compared from that layer on, and
    their KL (the *_all_tokens figures) is real. With the tie tolerance below the logits' change, the same
    flips fail the run."""
    torch.manual_seed(0)
    reference = randomize(transformers.AutoModelForCausalLM.from_config(tiny_qwen3_config(vocab_size=259)), 5)
    with torch.no_grad():
        reference.model.layers[3].mlp.gate.weight[5] = reference.model.layers[3].mlp.gate.weight[4]
    path = tmp_path / "model"
    reference.save_pretrained(path)
    save_byte_tokenizer(path)
    text = tmp_path / "t.txt"
    text.write_text(TEXT, encoding="utf-8")
    run = dict(text=text, seq_len=128, batch_size=2, max_tokens=256, show_progress=False)

    def scale_expert_5(factor):
        def edit(model):
            w_de = model.layers.units[0][0].mlp.router.w_de
            w_de[...] = w_de[...].at[3, :, 5].multiply(factor)
        return edit

    results = [parity(path, None, edit_model=scale_expert_5(f), **run) for f in (1 - 1e-6, 1 + 1e-6)]
    assert all(r.passed for r in results)
    flipped = max(results, key=lambda r: r.summary["near_tie_flips"])
    s = flipped.summary
    assert s["near_tie_flips"] >= 1 and s["tokens_after_near_tie"] >= s["near_tie_flips"]
    assert s["overall"]["kl_mean_all_tokens"] > 1e-6 and s["overall"]["kl_mean"] < 1e-9
    assert s["overall"]["tokens_compared"] == s["tokens"] - s["tokens_after_near_tie"]
    assert [r["near_tie_flips"] for r in flipped.layers] == [0, 0, 0, s["near_tie_flips"]]
    assert all(r["other_flips"] == 0 for r in flipped.layers)
    assert [r["tokens_compared"] for r in flipped.layers[:3]] == [256] * 3 > [flipped.layers[3]["tokens_compared"]]

    factor = 1 - 1e-6 if flipped is results[0] else 1 + 1e-6
    strict = parity(path, None, edit_model=scale_expert_5(factor), tolerances={"router_logit_max_abs": 1e-9},
                    **run)
    assert not strict.passed and strict.summary["near_tie_flips"] == 0
    assert sum(r["other_flips"] for r in strict.layers if "moe_layer" in r) >= 1


@pytest.mark.parametrize("arch", ["qwen3_moe", "nemotron_h"])
def test_bf16_passes_with_bf16_defaults(arch, tmp_path_factory, tmp_path):
    path = _checkpoint(tmp_path_factory, arch, torch.bfloat16)
    out = tmp_path / "out"
    assert main(["parity", "--model", str(path), "--out", str(out), *RUN]) == 0
    summary = json.loads((out / "summary.json").read_text())
    assert summary["dtype"] == summary["reference_dtype"] == "bfloat16"
    assert summary["tolerances"]["kl_mean"] == 1e-2
    assert summary["overall"]["kl_mean"] > 1e-7  # 16-bit rounding really happened on both sides


def test_failing_tolerance_exits_1(fp32, tmp_path, capsys):
    _, path = fp32
    assert main(["parity", "--model", str(path), "--out", str(tmp_path / "o"), "--tol", "kl_mean=0", *RUN]) == 1
    assert "FAIL kl_mean" in capsys.readouterr().out
    assert json.loads((tmp_path / "o" / "summary.json").read_text())["verdict"] == "fail"


def test_text_file_source(fp32, tmp_path):
    _, path = fp32
    text = tmp_path / "t.txt"
    text.write_text(TEXT + "\n\n" + TEXT, encoding="utf-8")
    result = parity(path, None, text=text, seq_len=100, batch_size=3, max_tokens=350, show_progress=False)
    assert result.passed and result.summary["tokens"] == 350 and result.summary["sequences"] == 4
    assert [g["group"] for g in result.summary["groups"]] == ["text"]


@pytest.mark.parametrize("args, message", [
    (["--text", "T", "--data", "D"], "alternatives"),
    (["--tol", "kl_average=1"], "unknown tolerance"),
    (["--tol", "kl_mean"], "expected NAME=VALUE"),
    (["--langs", "en,xx"], "xx"),
    (["--max-tokens", "0"], "must be positive"),
])
def test_bad_arguments_exit_2_and_write_nothing(fp32, tmp_path, capsys, args, message):
    _, path = fp32
    out = tmp_path / "out"
    assert main(["parity", "--model", str(path), "--out", str(out), "--quiet", *args]) == 2
    assert message in capsys.readouterr().err
    assert not out.exists() and not list(tmp_path.glob(".out.*"))


def test_bad_checkpoints_exit_2(fp32, tmp_path, capsys):
    _, path = fp32
    llama = tmp_path / "llama"
    llama.mkdir()
    (llama / "config.json").write_text(json.dumps({"model_type": "llama"}))
    assert main(["parity", "--model", str(llama), "--quiet"]) == 2
    assert "model_type 'llama' is not supported" in capsys.readouterr().err
    bare = tmp_path / "bare"
    bare.mkdir()
    for f in path.iterdir():
        if not f.name.startswith(("tokenizer", "special_tokens")):
            (bare / f.name).write_bytes(f.read_bytes())
    assert main(["parity", "--model", str(bare), "--quiet"]) == 2
    assert "no tokenizer" in capsys.readouterr().err
    binary = tmp_path / "b.txt"
    binary.write_bytes(b"\xff\xfe\x00bad")
    assert main(["parity", "--model", str(path), "--text", str(binary), "--quiet"]) == 2
    assert "not UTF-8" in capsys.readouterr().err


def test_help_and_tolerance_listing(capsys):
    with pytest.raises(SystemExit):
        main(["parity", "--help"])
    text = capsys.readouterr().out
    for option in ("--model", "--text", "--langs", "--data", "--dtype", "--reference-dtype", "--seq-len",
                   "--batch-size", "--max-tokens", "--tol", "--list-tolerances", "--dt-floor", "--out", "--quiet"):
        assert option in text
    assert main(["parity", "--list-tolerances"]) == 0
    listed = capsys.readouterr().out
    assert listed.startswith("float32 kl_mean=1e-06") and "bfloat16 kl_mean=0.01" in listed


def test_kl_and_expert_set_arithmetic():
    rng = np.random.default_rng(0)
    p, q = rng.normal(size=(5, 11)), rng.normal(size=(5, 11))
    lp, lq = torch.log_softmax(torch.tensor(p), -1), torch.log_softmax(torch.tensor(q), -1)
    want = torch.nn.functional.kl_div(lq, lp, log_target=True, reduction="none").sum(-1).numpy()
    np.testing.assert_allclose(token_kl(p, q, rows=2), want, rtol=1e-12)
    tally = RouterTally(6)
    ref_ids = np.array([[0, 1, 2], [3, 4, 5], [0, 2, 4], [1, 2, 3]])
    got_ids = np.array([[2, 1, 0], [3, 4, 0], [1, 3, 5], [1, 2, 4]])
    ref_logits = rng.normal(size=(4, 6))
    got_logits = ref_logits + np.array([[0.5], [1e-4], [2e-3], [1e-4]])
    compared = np.array([True, True, True, False])
    ties = tally.add(np.array(["a", "a", "b", "b"]), compared, ref_logits, got_logits, ref_ids, got_ids, 1e-3)
    # token 1 changed an expert with logits within 1e-3: a near tie; token 2 changed beyond it; token 3
    # changed too but comes after a tie, so it is not compared.
    assert ties.tolist() == [False, True, False, False]
    assert (tally.near_ties, tally.other_flips, tally.compared) == (1, 1, 3)
    assert tally.agreement_beyond_ties == pytest.approx(2 / 3)
    assert tally.agreement() == pytest.approx(1 / 4) and tally.agreement("a") == 0.5 and tally.agreement("b") == 0
    assert tally.jaccard_sum == pytest.approx(1 + 2 / 4 + 0 + 2 / 4)
    assert tally.max_abs == pytest.approx(0.5)  # over compared tokens only
    assert tally.counts_got.tolist() == [2, 3, 2, 2, 2, 1]
    assert RouterTally(6).add(np.array(["a"]), np.array([True]), ref_logits[1:2], got_logits[1:2], ref_ids[1:2],
                              got_ids[1:2], None).tolist() == [False]  # no tie tolerance: every flip counts
