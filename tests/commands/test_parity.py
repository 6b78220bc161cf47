"""`moejax parity` end to end on tiny save_pretrained checkpoints of both architectures (every parameter random),
with honest moejax sides and with deliberately wrong ones of several kinds (the checker is tested too).

What is asserted, and against what:
- float32: the command passes, per-token KL ~ 0 (<= 1e-9 nats; observed ~1e-13), 100% top-1 and expert-set
  agreement, every block's hidden states within 1e-5 relative, the same usage entropy and Gini on both sides,
  every content token compared at every block, end to end and in the implementation check.
- one parameter of one block corrupted on the moejax side: the command fails, and the per-block table names
  that block as where the implementation differs and where drift starts (all earlier blocks stay within 1e-5).
  Its KL figures equal an independent recomputation from the two models' logits (torch.log_softmax, float64).
- a selection made wrong on the moejax side while its router logits stay exact (Nemotron-H: correction bias
  doubled, group limit ignored, renormalisation skipped, another tie-break; Qwen3-MoE: top-k over perturbed
  probabilities; a rare error at a few tokens of one layer): it fails with other_flips > 0 and names a layer.
- a constructed exact tie (two identical router rows): classified as ties, forced into moejax's routing, and
  every token after them compared like for like (KL <= 1e-9 over all tokens), the run passes; the same flips
  without forcing would differ (KL > 1e-6). Near ties at a rate above the bound fail.
- bfloat16: honest checkpoints of both architectures pass (the float32 implementation check, and the end-to-end
  statistics within their multiples of transformers' own bfloat16 error); one MoE layer's expert down projections
  scaled by 1.2, or a norm weight scaled by 1.1, fail the implementation check at their block
  (tests/commands/test_parity_faults.py goes through every kind of error).
- the exit status gates a job: 0 on pass, 1 when a check fails (--tol), 2 on bad input, which leaves no OUT.
"""

from __future__ import annotations

import csv
import json

import jax
import jax.numpy as jnp
import numpy as np
import pytest

pytest.importorskip("torch")  # the test extra; without it these tests are skipped

import torch
import transformers
from support import QUICK_ARCHS

import moejax
import moejax.layers.moe as moe
import moejax.loading
from moejax.cli import main
from moejax.commands.parity import ParitySettings, parity
from moejax.data.tokenize import HFTokenizer
from moejax.models.common import ForcedRouting
from moejax.models.qwen3_moe import tiny_reference_config as tiny_qwen3_config
from moejax.parity.fixtures import make_checkpoint, randomize, save_byte_tokenizer
from moejax.parity.tally import RouterTally, token_kl
from moejax.parity.ties import OTHER, RouterRule, classify_flips
from moejax.parity.tokens import batches, corpus_sequences

pytestmark = pytest.mark.torch

RUN = ["--seq-len", "128", "--batch-size", "2", "--max-tokens", "384", "--quiet"]
SMALL = dict(seq_len=128, batch_size=2, max_tokens=384)


def check(path, out=None, **settings):
    """`moejax parity` from Python on a short run (SMALL unless overridden)."""
    return parity(ParitySettings(model=path, out=out, quiet=True, **{**SMALL, **settings}))
TEXT = ("The river rises in spring and the fields turn green; farmers watch the water and the sky. "
        "הנהר עולה באביב והשדות מוריקים. 川は春に増水し、畑は緑になる。") * 3


def _checkpoint(tmp_path_factory, arch, save_dtype=None, seed=17):
    path = tmp_path_factory.mktemp(f"{arch}-{save_dtype}") / "model"
    make_checkpoint(arch, path, seed=seed, vocab_size=259, save_dtype=save_dtype)
    save_byte_tokenizer(path)
    return path


@pytest.fixture(scope="module", params=QUICK_ARCHS)
def fp32(request, tmp_path_factory):
    return request.param, _checkpoint(tmp_path_factory, request.param)


@pytest.fixture(scope="module", params=QUICK_ARCHS)
def bf16(request, tmp_path_factory):
    return request.param, _checkpoint(tmp_path_factory, request.param, torch.bfloat16)


@pytest.fixture
def edit_moejax(monkeypatch):
    """edit(fn): the command's moejax model passes through fn after loading (the reference is untouched)."""
    load = moejax.loading.from_pretrained

    def edit(fn):
        # The command's load, not the public name: moejax.from_pretrained stays the honest loader (its lazy lookup
        # would otherwise find, and keep, the edited one).
        monkeypatch.setattr(moejax, "from_pretrained", load, raising=False)
        monkeypatch.setattr(moejax.loading, "from_pretrained", lambda *a, **k: fn(load(*a, **k)) or load)
    return edit


@pytest.fixture
def patch_router(monkeypatch):
    """patch(name, fn): replaces a routing function of moejax.layers.moe (compiled programs are dropped first and
    after, so no trace of another routing is reused)."""
    jax.clear_caches()
    yield lambda name, fn: monkeypatch.setattr(moe, name, fn)
    jax.clear_caches()


def read_csv(path):
    with open(path, encoding="utf-8") as f:
        return list(csv.DictReader(f))


def _layer_of(model, block):
    """(layer module, repeat index) of decoder block `block` inside the stacked units."""
    for unit, ids in zip(model.layers.units, model.layers.layer_ids, strict=True):
        for position, repeats in enumerate(ids):
            if block in repeats:
                return unit[position], repeats.index(block)
    raise AssertionError(f"block {block} not found")


def scale_norm(block: int, factor: float):
    """An edit scaling `block`'s input norm weight (Qwen3-MoE's pre-attention norm, Nemotron-H's block norm)."""
    def edit(model):
        layer, r = _layer_of(model, block)
        norm = layer.input_layernorm if hasattr(layer, "input_layernorm") else layer.norm
        norm.weight[...] = norm.weight[...].at[r].multiply(factor)
        return model
    return edit


def scale_expert_down(block: int, factor: float):
    """An edit scaling every expert's down projection in MoE block `block`."""
    def edit(model):
        layer, r = _layer_of(model, block)
        experts = (layer.mlp if hasattr(layer, "mlp") else layer.mixer).experts
        experts.down_efd[...] = experts.down_efd[...].at[r].multiply(factor)
        return model
    return edit


def test_fp32_passes_with_kl_zero_and_identical_routing(fp32, tmp_path, capsys):
    arch, path = fp32
    out = tmp_path / "out"
    assert main(["parity", "--model", str(path), "--out", str(out), *RUN]) == 0
    printed = capsys.readouterr().out
    assert "verdict: PASS" in printed
    summary = json.loads((out / "summary.json").read_text())
    assert summary["dtype"] == summary["reference_dtype"] == "float32" and summary["mode"] == "float32"
    assert summary["tokens"] == summary["tokens_compared"] == 384
    assert [g["group"] for g in summary["groups"]] == ["en", "he", "ja"]
    overall = summary["overall"]
    assert overall["kl_mean"] <= 1e-9 and overall["kl_max"] <= 1e-9
    assert overall["top1_agreement"] == 1.0 and overall["expert_set_agreement_min"] == 1.0
    assert summary["first_drift_block"] is None and summary["other_flips"] == 0
    assert summary["first_wrong_block"] is None and summary["impl_other_flips"] == 0
    layers = read_csv(out / "layers.csv")
    assert [r["kind"] for r in layers] == list(moejax.load_config(path).layer_kinds)
    for row in layers:
        assert float(row["hidden_relative_diff"]) <= 1e-5 and int(row["tokens_compared"]) == 384
        assert float(row["impl_update_relative"]) <= 1e-5 and int(row["impl_tokens"]) == 384
        if row["moe_layer"]:
            assert float(row["expert_set_agreement"]) == 1.0 and float(row["expert_jaccard_mean"]) == 1.0
            assert float(row["router_logit_max_abs_diff"]) <= 1e-5
            assert row["usage_entropy_bits_reference"] == row["usage_entropy_bits_moejax"]
            assert row["gini_reference"] == row["gini_moejax"]
    assert sum(1 for r in layers if r["moe_layer"]) == len(moejax.load_config(path).moe_layers)
    assert (out / "drift_per_layer.png").stat().st_size > 10_000
    assert {r["group"] for r in read_csv(out / "groups.csv")} == {"all", "en", "he", "ja"}
    assert read_csv(out / "flips.csv") == [] and "reference_experts" in (out / "flips.csv").read_text()


@pytest.mark.parametrize("block", [2])
def test_corrupted_parameter_fails_and_points_at_its_block(fp32, tmp_path, block, edit_moejax):
    arch, path = fp32
    text = tmp_path / "text.txt"
    text.write_text(TEXT, encoding="utf-8")
    edit_moejax(scale_norm(block, 1.5))
    result = check(path, tmp_path / "out", text=text, max_tokens=128)
    assert not result.passed
    assert result.summary["first_drift_block"]["block"] == result.summary["first_wrong_block"]["block"] == block
    assert all(r["hidden_relative_diff"] <= 1e-5 for r in result.layers[:block])
    assert all(r["impl_update_relative"] <= 1e-5 for r in result.layers[:block])
    assert result.layers[block]["hidden_relative_diff"] > 1e-2
    failed = {c["check"] for c in result.summary["checks"] if not c["passed"]}
    assert {"kl_mean", "hidden_relative", "impl_block_relative"} <= failed

    # The KL figures against an independent recomputation: both models run directly on the same tokens.
    ids = np.array([HFTokenizer(path).encode(TEXT.strip())[:128]])
    overrides = {"dt_floor": "time_step_min"} if arch == "nemotron_h" else {}
    model = scale_norm(block, 1.5)(moejax.from_pretrained(path, **overrides))
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


def _sigmoid_variant(wrong: str):
    """A Nemotron-H selection made wrong in one way, the router logits untouched."""
    original = moe.sigmoid_group_topk

    def routed(logits_te, correction_e, k, n_group, topk_group, normalize, scale, control=None):
        if wrong == "bias_doubled":
            correction_e = 2 * correction_e
        elif wrong == "group_limit_ignored":
            n_group = topk_group = 1
        elif wrong == "renormalisation_skipped":
            normalize = False
        elif wrong == "other_tie_break":  # choice scores within 1/50 of each other ordered by index, highest first
            scores = jax.nn.sigmoid(logits_te.astype(jnp.float32))
            coarse = jnp.round((scores + correction_e) * 50) + 1e-3 * jnp.arange(scores.shape[-1])
            _, ids = jax.lax.top_k(coarse, k)
            ids = control.select(ids) if control is not None else ids
            weights = jnp.take_along_axis(scores, ids, axis=-1)
            return weights / weights.sum(-1, keepdims=True) * scale, ids.astype(jnp.int32)
        return original(logits_te, correction_e, k, n_group, topk_group, normalize, scale, control)
    return routed


def _perturbed_softmax(logits_te, k, normalize, control=None):
    """Qwen3-MoE's selection over probabilities perturbed by up to 5%; weights from the true probabilities."""
    probs = jax.nn.softmax(logits_te.astype(jnp.float32), axis=-1)
    _, ids = jax.lax.top_k(probs * (1 + 0.05 * jnp.sin(7.0 * jnp.arange(probs.shape[-1]))), k)
    weights = jnp.take_along_axis(probs, ids, axis=-1)
    return weights / weights.sum(-1, keepdims=True) if normalize else weights, ids.astype(jnp.int32)


@pytest.mark.parametrize("arch, routing, wrong", [
    pytest.param("nemotron_h", "sigmoid_group_topk", "bias_doubled", marks=pytest.mark.slow),
    pytest.param("nemotron_h", "sigmoid_group_topk", "group_limit_ignored", marks=pytest.mark.slow),
    pytest.param("nemotron_h", "sigmoid_group_topk", "renormalisation_skipped", marks=pytest.mark.slow),
    pytest.param("nemotron_h", "sigmoid_group_topk", "other_tie_break", marks=pytest.mark.slow),
    ("qwen3_moe", "softmax_topk", "perturbed_probabilities"),
])
def test_wrong_selection_with_exact_logits_fails(tmp_path_factory, tmp_path, patch_router, arch, routing, wrong):
    path = _checkpoint(tmp_path_factory, arch)
    patch_router(routing, _perturbed_softmax if routing == "softmax_topk" else _sigmoid_variant(wrong))
    result = check(path, tmp_path / "out")
    s = result.summary
    assert not result.passed and s["other_flips"] > 0
    verdict = next(c for c in s["checks"] if c["check"] == "other_flips")
    assert not verdict["passed"] and "MoE layer" in verdict["what"]
    first = next(r for r in result.layers if "moe_layer" in r)
    if wrong != "renormalisation_skipped":  # the first MoE layer's selection is wrong, its logits exact
        assert first["router_logit_max_abs_diff"] <= 1e-5 and first["other_flips"] > 0
    assert s["tokens_compared"] == s["tokens"]
    flips = read_csv(tmp_path / "out" / "flips.csv")
    for part, count in (("end_to_end", s["other_flips"]), ("implementation", s["impl_other_flips"])):
        assert sum(r["kind"] == OTHER for r in flips if r["check"] == part) == count
    if wrong == "renormalisation_skipped":  # the same experts with other weights: each block alone shows it
        assert s["first_wrong_block"]["block"] == first["block"]
    else:  # the wrong selection at the reference's own input
        assert s["impl_other_flips"] > 0


class _InjectedError:
    """A moejax model whose MoE layer `layer` routes the given (row, column) positions of every batch to a wrong
    expert set: its top-k with the k-th expert replaced by another. Everything else is the model's own."""

    def __init__(self, model, layer: int, positions: list[tuple[int, int]]):
        self.model, self.layer, self.positions, self.config = model, layer, positions, model.config

    def __getattr__(self, name):  # everything else (the implementation check's block and head runs): the model's
        return getattr(self.model, name)

    def __call__(self, ids, mask, **kwargs):
        forced = kwargs.pop("forced_routing")
        plain = self.model(ids, mask, forced_routing=forced, **kwargs)
        chosen = np.asarray(plain.router_expert_ids[self.layer])
        expert_ids, where = np.array(forced.expert_ids), np.array(forced.mask)
        experts = self.config.num_routed_experts
        for row, col in self.positions:
            wrong = chosen[row, col].copy()
            wrong[-1] = next(e for e in range(experts) if e not in wrong)
            expert_ids[self.layer, row, col], where[self.layer, row, col] = wrong, True
        return self.model(ids, mask, forced_routing=ForcedRouting(expert_ids, where), **kwargs)


def test_rare_selection_error_fails(tmp_path_factory, tmp_path, edit_moejax):
    """One MoE layer routes three tokens of each batch to a wrong set: the run fails with exactly those flips in
    that layer named, and nothing after them leaves the comparison."""
    path = _checkpoint(tmp_path_factory, "qwen3_moe")
    positions = [(0, 5), (0, 90), (1, 40)]
    edit_moejax(lambda model: _InjectedError(model, 1, positions))
    result = check(path, tmp_path / "out")
    s = result.summary
    assert not result.passed and s["tokens_compared"] == s["tokens"]
    per_layer = [r["other_flips"] for r in result.layers if "moe_layer" in r]
    assert per_layer[:2] == [0, 3 + 2]  # the last batch has one real row: its second row's error is padding
    verdict = next(c for c in s["checks"] if c["check"] == "other_flips")
    assert not verdict["passed"] and "MoE layer 1" in verdict["what"]
    assert s["ties"] == 0


def _tied_checkpoint(tmp_path, offset: float):
    """A Qwen3-MoE whose last layer routes experts 4 and 5 through identical router rows (offset 0: exact ties at
    every token where the pair straddles the top-k boundary) or rows 1 + offset apart (near ties)."""
    torch.manual_seed(0)
    reference = randomize(transformers.AutoModelForCausalLM.from_config(tiny_qwen3_config(vocab_size=259)), 5)
    with torch.no_grad():
        gate = reference.model.layers[3].mlp.gate.weight
        gate[5] = gate[4] * (1 + offset)
    path = tmp_path / "model"
    reference.save_pretrained(path)
    save_byte_tokenizer(path)
    return path


def _scale_router_column(expert: int, factor: float):
    def edit(model):
        w_de = model.layers.units[0][0].mlp.router.w_de
        w_de[...] = w_de[...].at[3, :, expert].multiply(factor)
        return model
    return edit


def test_exact_ties_are_forced_and_every_token_compared(tmp_path):
    """transformers breaks the exact ties its own way, moejax by index: the flips are exact ties, forced into
    moejax's routing, and then every token of every later block agrees like for like."""
    path = _tied_checkpoint(tmp_path, 0.0)
    result = check(path, tmp_path / "out")
    s = result.summary
    assert result.passed and s["ties"] >= 1 and s["exact_ties"] == s["ties"] == s["forced_tokens"]
    assert s["other_flips"] == 0 and s["tokens_compared"] == s["tokens"] == 384
    assert s["overall"]["kl_max"] <= 1e-9  # every token, the ones after a tie included
    assert [r["ties"] for r in result.layers] == [0, 0, 0, s["ties"]]
    assert s["overall"]["expert_set_agreement_min"] == pytest.approx(1 - s["ties"] / 384)
    flips = [r for r in read_csv(tmp_path / "out" / "flips.csv") if r["check"] == "end_to_end"]
    assert len(flips) == s["ties"] and {r["kind"] for r in flips} == {"exact_tie"}
    assert all(r["forced"] == "True" and {r["reference_experts"], r["moejax_experts"]} != {""} for r in flips)
    assert all(set(r["reference_experts"].split()) ^ set(r["moejax_experts"].split()) == {"4", "5"} for r in flips)

    # Without forcing the same tokens differ: the forcing is what makes the comparison like for like.
    model = moejax.from_pretrained(path)
    tokenizer = HFTokenizer(path)
    batch = batches(corpus_sequences(None, ["en", "he", "ja"], tokenizer, 128, 384), 2, tokenizer.pad_id)[0]
    ids, mask = batch.ids, batch.mask
    reference = transformers.AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32).eval()
    with torch.no_grad():
        theirs = reference(torch.from_numpy(ids), attention_mask=torch.from_numpy(mask)).logits.double().numpy()
    ours = np.asarray(model(ids, mask).logits, np.float64)
    content = mask.astype(bool)
    assert token_kl(theirs[content], ours[content]).max() > 1e-6


def test_near_ties_above_the_rate_bound_fail(tmp_path, edit_moejax):
    """Router rows 1e-5 apart in the reference and moejax's copy moved the other way by 4e-5: dozens of near ties
    (proven, forced, compared), far above the float32 rate, so the run fails on tie_rate (and the implementation
    check sees the router column itself); with those bounds lifted it passes and every token agrees."""
    path = _tied_checkpoint(tmp_path, 1e-5)
    edit_moejax(_scale_router_column(5, 1 - 4e-5))
    strict = check(path)
    s = strict.summary
    assert s["ties"] - s["exact_ties"] >= 10 and s["other_flips"] == 0
    assert [c["check"] for c in s["checks"] if not c["passed"]] == ["impl_router_relative", "impl_tie_rate",
                                                                      "tie_rate"]
    lifted = check(path, tol=("tie_rate=1", "impl_router_relative=1e-3"))
    assert lifted.passed and lifted.summary["overall"]["kl_max"] <= 1e-9


def test_bf16_honest_checkpoints_pass_calibrated(bf16, tmp_path):
    arch, path = bf16
    out = tmp_path / "out"
    assert main(["parity", "--model", str(path), "--out", str(out), *RUN]) == 0
    summary = json.loads((out / "summary.json").read_text())
    assert summary["mode"] == "calibrated" and summary["dtype"] == summary["calibration_dtype"] == "bfloat16"
    assert summary["reference_dtype"] == "float32" and summary["tolerances"]["calibration_mean"] == 2.5
    overall = summary["overall"]
    assert overall["kl_mean"] > 1e-7 and overall["kl_mean_reference"] > 1e-7  # both really ran in 16 bits
    assert overall["impl_kl_mean"] < 1e-9  # the implementation check ran in float32
    for row in read_csv(out / "layers.csv"):
        for stat in ("mean", "median", "p99", "max"):
            assert float(row[f"hidden_{stat}"]) <= float(row[f"hidden_{stat}_bound"])
            assert float(row[f"hidden_{stat}_reference"]) > 0
        assert float(row["impl_update_relative"]) <= 1e-5


@pytest.mark.parametrize("edit", ["expert_down_1.2", "norm_1.1"])
def test_bf16_real_errors_fail(bf16, tmp_path, edit_moejax, edit):
    """Errors that the former fixed 16-bit bounds let through: the implementation check (float32, each block alone)
    fails on them and names the block."""
    arch, path = bf16
    block = moejax.load_config(path).moe_layers[0] if edit.startswith("expert") else 2
    edit_moejax(scale_expert_down(block, 1.2) if edit.startswith("expert") else scale_norm(block, 1.1))
    result = check(path)
    assert not result.passed
    assert result.summary["first_wrong_block"]["block"] == block
    assert all(r["impl_update_relative"] <= 1e-5 for r in result.layers[:block])
    failed = {c["check"] for c in result.summary["checks"] if not c["passed"]}
    assert "impl_block_relative" in failed


def test_failing_tolerance_exits_1(fp32, tmp_path, capsys):
    _, path = fp32
    assert main(["parity", "--model", str(path), "--out", str(tmp_path / "o"), "--tol", "kl_mean=0", *RUN]) == 1
    assert "FAIL kl_mean" in capsys.readouterr().out
    assert json.loads((tmp_path / "o" / "summary.json").read_text())["verdict"] == "fail"


@pytest.mark.slow
def test_text_file_source(fp32, tmp_path):
    _, path = fp32
    text = tmp_path / "t.txt"
    text.write_text(TEXT + "\n\n" + TEXT, encoding="utf-8")
    result = check(path, text=text, seq_len=100, batch_size=3, max_tokens=350)
    assert result.passed and result.summary["tokens"] == 350 and result.summary["sequences"] == 4
    assert [g["group"] for g in result.summary["groups"]] == ["text"]


@pytest.mark.parametrize("args, message", [
    (["--text", "T", "--data", "D"], "alternatives"),
    (["--tol", "kl_average=1"], "unknown tolerance"),
    (["--tol", "kl_mean"], "expected NAME=VALUE"),
    (["--langs", "en,xx"], "xx"),
    (["--max-tokens", "0"], "--max-tokens must be >= 1"),
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
    assert main(["parity", "--help"]) == 0
    text = capsys.readouterr().out
    for option in ("--model", "--text", "--langs", "--data", "--dtype", "--reference-dtype", "--seq-len",
                   "--batch-size", "--max-tokens", "--tol", "--list-tolerances", "--out", "--quiet"):
        assert option in text
    assert main(["parity", "--list-tolerances"]) == 0
    listed = capsys.readouterr().out
    assert listed.startswith("float32 impl_embedding_relative=1e-06") and "tie_rate=0.001" in listed
    assert "kl_mean=1e-06" in listed and "calibrated" in listed and "calibration_mean=2.5" in listed


def test_kl_and_router_tally_arithmetic():
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
    flips = classify_flips(RouterRule("softmax", 3), ref_logits, ref_ids, got_logits, got_ids)
    tally.add(np.array(["a", "a", "b", "b"]), ref_logits, ref_ids, got_logits, got_ids, flips)
    assert tally.ties + tally.other_flips == 3 and tally.total == 4
    assert tally.agreement() == pytest.approx(1 / 4) and tally.agreement("a") == 0.5 and tally.agreement("b") == 0
    assert tally.jaccard_sum == pytest.approx(1 + 2 / 4 + 0 + 2 / 4)
    assert tally.max_abs == pytest.approx(0.5)  # over every token
    assert tally.counts_got.tolist() == [2, 3, 2, 2, 2, 1]
    assert tally.misses == 3


def test_forced_routing_is_data(fp32):
    """ForcedRouting imposes the given experts where its mask is set (weights from the router's own scores),
    changes nothing elsewhere, and a new forcing of the same shape does not recompile."""
    arch, path = fp32
    overrides = {"dt_floor": "time_step_min"} if arch == "nemotron_h" else {}
    model = moejax.from_pretrained(path, **overrides)
    cfg = model.config
    ids = np.random.default_rng(0).integers(3, 259, (2, 12))
    plain = model(ids, return_router_logits=True)
    none = ForcedRouting.none(len(cfg.moe_layers), 2, 12, cfg.num_experts_per_tok)
    np.testing.assert_array_equal(np.asarray(model(ids, forced_routing=none).logits), np.asarray(plain.logits))
    forced = ForcedRouting(np.array(none.expert_ids), np.array(none.mask))
    natural = set(np.asarray(plain.router_expert_ids[0])[1, 5].tolist())
    others = [e for e in range(cfg.num_routed_experts) if e not in natural][:cfg.num_experts_per_tok]
    forced.mask[0, 1, 5] = True
    forced.expert_ids[0, 1, 5] = others
    out = model(ids, return_router_logits=True, forced_routing=forced)
    assert sorted(np.asarray(out.router_expert_ids[0])[1, 5].tolist()) == others
    logits = np.asarray(out.logits)
    np.testing.assert_array_equal(logits[0], np.asarray(plain.logits)[0])
    np.testing.assert_array_equal(logits[1, :5], np.asarray(plain.logits)[1, :5])
    assert np.abs(logits[1, 5:] - np.asarray(plain.logits)[1, 5:]).max() > 1e-4
    with pytest.raises(ValueError, match="forced_routing"):
        model(ids, forced_routing=ForcedRouting(forced.expert_ids[:, :1], forced.mask))
